//! SVG charts of a [`Report`]: the latency CDF of every operation of every run, or, for a rate
//! sweep, latency (p50 and p99) against the achieved rate, one line per transport.

use std::path::Path;

use plotters::prelude::*;

use crate::Report;

/// A chart failed to draw or could not be written.
#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

const SIZE: (u32, u32) = (960, 600);

/// Draws `report` into the SVG file `path`: a sweep's throughput–latency curve, or otherwise
/// the latency CDFs.
pub fn write(report: &Report, path: &Path) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if report.is_sweep() {
        sweep(report, path).map_err(|e| err(&e))
    } else {
        cdf(report, path).map_err(|e| err(&e))
    }
}

type Failure = Box<dyn std::error::Error>;

fn palette(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 6] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
    ];
    COLOURS[i % COLOURS.len()]
}

/// Latency (log x) against the fraction of operations completed within it.
fn cdf(report: &Report, path: &Path) -> Result<(), Failure> {
    let mut series: Vec<(String, &[[f64; 2]])> = Vec::new();
    for run in &report.runs {
        for (op, pts) in &run.cdf {
            series.push((format!("{} {op}", run.transport), pts));
        }
    }
    let all = series.iter().flat_map(|(_, p)| p.iter().map(|p| p[0]));
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(0.1);
    let hi = all.fold(0.0, f64::max).max(lo * 2.0);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency CDF", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("fraction of operations")
        .draw()?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let colour = palette(i);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p[0], p[1])),
                colour.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Achieved rate against p50 and p99 latency (log y), one pair of lines per transport.
fn sweep(report: &Report, path: &Path) -> Result<(), Failure> {
    let transports: Vec<&str> = report.best_rate.keys().map(String::as_str).collect();
    let max_rate = report
        .runs
        .iter()
        .map(|r| r.ops_per_second.max(r.offered_rate.unwrap_or(0.0)))
        .fold(1.0, f64::max);
    let lats = report.runs.iter().flat_map(|r| [r.p50_us(), r.p99_us()]);
    let lo = lats.clone().fold(f64::INFINITY, f64::min).max(0.1);
    let hi = lats.fold(0.0, f64::max).max(lo * 2.0);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Throughput against latency", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_rate * 1.05, (lo * 0.8..hi * 1.25).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("achieved operations per second")
        .y_desc("latency from intended send (µs, log scale)")
        .draw()?;
    for (i, t) in transports.iter().enumerate() {
        let runs: Vec<_> = report.runs.iter().filter(|r| r.transport == *t).collect();
        for (j, (name, value)) in [
            (
                "p50",
                (|r: &crate::Run| r.p50_us()) as fn(&crate::Run) -> f64,
            ),
            ("p99", |r: &crate::Run| r.p99_us()),
        ]
        .into_iter()
        .enumerate()
        {
            let colour = palette(2 * i + j);
            let pts: Vec<(f64, f64)> = runs.iter().map(|r| (r.ops_per_second, value(r))).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))?
                .label(format!("{t} {name}"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The paging benchmark's chart (like the paper's Figure 5): one stacked bar of median
/// components per kind of fault, the p95 of the total marked above it.
pub fn paging(report: &crate::paging::PagingReport, path: &Path) -> Result<(), PlotError> {
    paging_bars(report, path).map_err(|e| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn paging_bars(report: &crate::paging::PagingReport, path: &Path) -> Result<(), Failure> {
    let vs = &report.variants;
    let n = vs.len().max(1);
    let top = vs
        .iter()
        .map(|v| {
            v.total
                .p95_us
                .max(v.enter.p50_us + v.directory.p50_us + v.data.p50_us + v.exit.p50_us)
        })
        .fold(1.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = vs.iter().map(|v| v.name.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Page fault latency: median components, p95 of the total marked",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("µs")
        .draw()?;
    type Part = (&'static str, fn(&crate::paging::Variant) -> f64);
    let parts: [Part; 4] = [
        ("enter handler", |v| v.enter.p50_us),
        ("directory", |v| v.directory.p50_us),
        ("get data", |v| v.data.p50_us),
        ("install and return", |v| v.exit.p50_us),
    ];
    for (k, (label, value)) in parts.iter().enumerate() {
        let colour = palette(k);
        chart
            .draw_series(vs.iter().enumerate().map(|(i, v)| {
                let below: f64 = parts[..k].iter().map(|(_, f)| f(v)).sum();
                let x = i as f64;
                Rectangle::new(
                    [(x + 0.2, below), (x + 0.8, below + value(v))],
                    colour.filled(),
                )
            }))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart.draw_series(vs.iter().enumerate().map(|(i, v)| {
        let x = i as f64;
        PathElement::new(
            [(x + 0.3, v.total.p95_us), (x + 0.7, v.total.p95_us)],
            BLACK.stroke_width(2),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
