//! `cargo xtask bench --xdp-fast`: the fast READ (an INLINE READ answered by the steering
//! XDP program from its hot-page store) against the floor of the path (the XDP_TX bounce), the
//! READ served by an AF_XDP worker and the kernel-UDP READ, all in one run, at window 1, at a
//! light constant rate (1,000/s) and pipelined (window 32).

use std::path::Path;

use anyhow::{Result, bail};
use bluebridge_bench::{ECHO, Report};

use super::{Lab, load};
use crate::stage::{self, Stages};

/// Pages read: all fit the store, so after the warm-up every READ can be a hit.
const PAGES: &str = "256";
const CACHE: &str = "64MiB";
/// The light constant rate, requests per second.
const RATE: &str = "1000";

/// (name, what, server flags, client flags): the READ configurations compared.
const READS: [(&str, &str, &[&str], &[&str]); 4] = [
    (
        "fast",
        "fast READ (XDP, hot store)",
        &["--xdp-cache", CACHE],
        &[],
    ),
    ("afxdp", "AF_XDP READ (INLINE, no store)", &[], &[]),
    (
        "afxdp-plain",
        "AF_XDP READ (plain, no store)",
        &[],
        &["--no-inline-reads"],
    ),
    (
        "udp",
        "kernel UDP READ (both ends sockets)",
        &["--transport", "udp"],
        &["--transport", "udp", "--no-inline-reads"],
    ),
];

/// The loads each READ configuration runs: (suffix, label, flags).
const LOADS: [(&str, &str, &[&str]); 3] = [
    ("w1", "window 1", &["--window", "1"]),
    (
        "1k",
        "1,000/s evenly spaced",
        &["--rate", RATE, "--arrival", "constant"],
    ),
    ("w32", "window 32", &["--window", "32"]),
];

impl Lab<'_> {
    /// Runs every measurement of the fast-READ comparison into `results/fast-*.json`.
    pub(super) fn xdp_fast(&self, s: &mut Stages) -> Result<()> {
        let server = self.server(s, &["--xdp-bounce", "--arena", "2MiB"])?;
        for (suffix, what, flags) in [
            ("w1", "window 1", &["--window", "1"][..]),
            ("1k", "1,000/s evenly spaced", &["--rate", RATE][..]),
            ("w32", "window 32", &["--window", "32"][..]),
        ] {
            let mut args = vec!["--echo", "--payload", "4096"];
            args.extend_from_slice(flags);
            self.load(
                s,
                &format!("XDP_TX bounce floor: 4,206 B frames, {what}"),
                &args,
                &format!("fast-floor-{suffix}"),
            )?;
        }
        s.run("stop the bounce server", || server.stop())?;
        for (name, what, server_flags, client_flags) in READS {
            let mut sf = vec!["--arena", "128MiB"];
            sf.extend_from_slice(server_flags);
            let server = self.server(s, &sf)?;
            // READs of `payload` bytes under `load_flags`, into results/fast-<report>.json.
            let reads = |s: &mut Stages,
                         payload: &str,
                         size: &str,
                         load_what: &str,
                         load_flags: &[&str],
                         report: String|
             -> Result<()> {
                let mut args = vec!["--mix", "read=100", "--payload", payload, "--pages", PAGES];
                args.extend_from_slice(client_flags);
                args.extend_from_slice(load_flags);
                let label = format!("{what}: {size}, {PAGES} pages, {load_what}");
                self.load(s, &label, &args, &report)
            };
            for (suffix, load_what, load_flags) in LOADS {
                if name == "afxdp-plain" && suffix != "w1" {
                    continue; // the padding's cost: window 1 is enough
                }
                if suffix == "w1" && matches!(name, "fast" | "afxdp") {
                    // A short read (a pointer chased in remote memory).
                    let report = format!("fast-{name}-small");
                    reads(s, "64", "64 B", load_what, load_flags, report)?;
                }
                let report = format!("fast-{name}-{suffix}");
                reads(s, "4096", "4 KiB", load_what, load_flags, report)?;
            }
            s.run(&format!("stop the {name} server"), || server.stop())?;
        }
        let server = self.server(s, &["--xdp-cache", CACHE, "--arena", "128MiB"])?;
        let faults = if self.seconds == "1" { "300" } else { "1500" };
        s.run(
            &format!(
                "paging: {faults} faults, each page cold (the worker answers) then hot (XDP answers)"
            ),
            || {
                stage::status(
                    self.client_command(&self.bin.join("bluebridge-paging"))
                        .args(["--faults", faults, "--hot", "--no-disk", "--scan-budget", "0"])
                        .arg("--json")
                        .arg(self.out.join("fast-paging.json")),
                )
            },
        )?;
        s.run("stop the paging server", || server.stop())
    }
}

/// Prints the comparison from the reports of [`Lab::xdp_fast`].
pub(super) fn print(out: &Path) -> Result<()> {
    let p50 =
        |r: &Report, op: &str| -> f64 { r.runs[0].latency.get(op).map_or(f64::NAN, |p| p.p50_us) };
    let read = |name: &str| load(out, &format!("fast-{name}"));
    println!(
        "\nThe fast READ ({PAGES} pages of 4 KiB, all in a {CACHE} XDP hot-page store after the warm-up), \
         against the floor and the other READs of this run (p50 µs; reports in {}):",
        out.display()
    );
    println!(
        "| load | XDP_TX bounce floor | fast READ | AF_XDP READ | kernel UDP READ | fast / floor | AF_XDP / fast | UDP / fast | served by XDP |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut w1 = (f64::NAN, f64::NAN, f64::NAN);
    for (suffix, what, _) in &LOADS[..2] {
        let floor = p50(&load(out, &format!("fast-floor-{suffix}"))?, ECHO);
        let fast = read(&format!("fast-{suffix}"))?;
        let (f, x, u) = (
            p50(&fast, "READ"),
            p50(&read(&format!("afxdp-{suffix}"))?, "READ"),
            p50(&read(&format!("udp-{suffix}"))?, "READ"),
        );
        let run = &fast.runs[0];
        let served = run.inline_served as f64 / run.inline_sent.max(1) as f64;
        println!(
            "| {what} | {floor:.2} | {f:.2} | {x:.2} | {u:.2} | {:.2}× | {:.2}× | {:.2}× | {:.1}% |",
            f / floor,
            x / f,
            u / f,
            100.0 * served
        );
        if *suffix == "w1" {
            w1 = (floor, f, x);
            if served < 0.9 {
                bail!(
                    "only {:.1}% of the fast READs at window 1 were answered by XDP: the \
                     comparison would not measure the fast path",
                    100.0 * served
                );
            }
        }
    }
    let rate = |name: &str| -> Result<f64> { Ok(read(name)?.runs[0].ops_per_second) };
    let (fast32, x32) = (rate("fast-w32")?, rate("afxdp-w32")?);
    let floor32 = load(out, "fast-floor-w32")?.runs[0].ops_per_second;
    println!(
        "- pipelined (window 32): fast READ {fast32:.0}/s, AF_XDP READ {x32:.0}/s: {:.2}×; the \
         XDP_TX bounce at window 32: {floor32:.0}/s (the fast READ reaches {:.2}× of it)",
        fast32 / x32,
        fast32 / floor32
    );
    let (fs, xs) = (
        p50(&read("fast-small")?, "READ"),
        p50(&read("afxdp-small")?, "READ"),
    );
    println!(
        "- 64-byte READs at window 1 (a short range, as a pointer chase reads): fast READ \
         {fs:.2} µs, AF_XDP READ {xs:.2} µs: {:.2}×",
        xs / fs
    );
    let plain = p50(&read("afxdp-plain-w1")?, "READ");
    println!(
        "- the INLINE padding on a server without a store: AF_XDP READ p50 {:.2} µs padded, \
         {plain:.2} µs plain ({:+.2} µs)",
        w1.2,
        w1.2 - plain
    );
    let text = std::fs::read_to_string(out.join("fast-paging.json"))?;
    let paging: bluebridge_bench::paging::PagingReport = serde_json::from_str(&text)?;
    let variant = |n: &str| paging.variants.iter().find(|v| v.name == n);
    if let (Some(cold), Some(hot)) = (variant("bluebridge"), variant("bluebridge-hot")) {
        println!(
            "- page faults through a RemoteRegion (p50 µs): total {:.2} cold → {:.2} hot; \
             \"get data\" {:.2} → {:.2} ({:.2}× less)",
            cold.total.p50_us,
            hot.total.p50_us,
            cold.data.p50_us,
            hot.data.p50_us,
            cold.data.p50_us / hot.data.p50_us
        );
    }
    let (floor, f, x) = w1;
    println!(
        "- targets at window 1: fast READ ≤ 1.6× the floor ({:.2}×: {}), ≥ 2× faster than the \
         AF_XDP READ ({:.2}×: {}); pipelined ≥ 1.5× the AF_XDP rate ({:.2}×: {})",
        f / floor,
        met(f / floor <= 1.6),
        x / f,
        met(x / f >= 2.0),
        fast32 / x32,
        met(fast32 / x32 >= 1.5)
    );
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "not met" }
}
