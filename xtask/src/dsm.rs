//! `cargo xtask dsm`: distributed shared memory on a small rack. Three hosts around the XDP
//! switch and its controller, a server on each; the clients of all three map the same pages
//! of one server as coherent regions and run the litmus suite, a lock-protected counter, a
//! parallel job and the coherence latencies (`bluebridge-dsm`). Fails on any forbidden
//! outcome, wrong total or region error.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::lab;
use crate::rack::{RackLab, ctl};
use crate::root;
use crate::stage::{self, Stages};

/// Options of the shared-memory run.
#[derive(Debug, clap::Args)]
pub(crate) struct DsmArgs {
    /// Runs of each litmus test.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    runs: u32,
    /// Lock-protected increments per host.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    rounds: u32,
    /// Samples of each latency.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(3..=100_000))]
    samples: u32,
    /// A short run (the CI's): 40 runs, 40 rounds, 30 samples.
    #[arg(long)]
    quick: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Do not check or install Debian packages.
    #[arg(long)]
    no_packages: bool,
}

const NAME: &str = "bbdsm";

pub(crate) fn run(a: &DsmArgs) -> Result<()> {
    let interrupted = lab::interrupt_flag()?;
    let mut s = Stages::new();
    let _huge = lab::prepare(
        &mut s,
        a.no_packages,
        &["bluebridge-server", "bluebridge-switch", "bluebridge-bench"],
        NAME,
        8 * 3,
    )?;
    let bin = root().join("target/release");
    let out = root().join(&a.out);
    std::fs::create_dir_all(&out)?;
    let (runs, rounds, samples) = if a.quick {
        (40, 40, 30)
    } else {
        (a.runs, a.rounds, a.samples)
    };
    let opts = crate::rack::LabOptions {
        backend: "xdp".into(),
        ..Default::default()
    };
    let lab = RackLab::start(&mut s, NAME, 3, &opts, &bin, &interrupted)?;
    let layout = out.join("dsm-layout.json");
    std::fs::write(&layout, serde_json::to_string_pretty(&lab.rack.hosts)?)?;
    let report = out.join("dsm.json");
    let suite = s.run(
        &format!(
            "shared memory on 3 hosts: litmus suite ({runs} runs each), lock counter ({rounds} per host), parallel job, coherence latencies ({samples} samples)"
        ),
        || {
            stage::status(
                Command::new(bin.join("bluebridge-dsm"))
                    .arg("--layout")
                    .arg(&layout)
                    .args(["--runs", &runs.to_string()])
                    .args(["--rounds", &rounds.to_string()])
                    .args(["--samples", &samples.to_string()])
                    .arg("--json")
                    .arg(&report),
            )
        },
    );
    if suite.is_ok() {
        s.run(
            "the shared pages' coherence traffic at the switch (bluebridge-ctl hot-pages)",
            || stage::status(&mut ctl(&bin, &lab.socket, &["hot-pages", "--top", "5"])),
        )?;
    }
    lab.stop(&mut s)?;
    suite?;
    s.finish();
    Ok(())
}
