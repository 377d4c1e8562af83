//! `cargo xtask bench [--quick | --table1]`: one topology that carries both transports, the
//! server pinned on one core and `bluebridge-bench` on the other, the standard scenarios for
//! AF_XDP and the kernel-UDP baseline back to back, the paper's Table 1, JSON reports and SVG
//! plots in `results/`, and the comparison printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use bluebridge_bench::paging::{PAPER_FAULTS, PagingReport, Workload, workload_table};
use bluebridge_bench::{ECHO, PAPER_TABLE1, Percentiles, Report, Run, plot};
use bluebridge_topology::{Pair, fmt_mac, namespaces_with_prefix};

use crate::lab::{self, ServerProc};

mod fast;
mod refusals;
use crate::root;
use crate::stage::{self, Stages};

/// Options of the bench run.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// A smoke run (about a minute): short measurements, same scenarios.
    #[arg(long)]
    quick: bool,
    /// Where the JSON reports go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Do not check or install Debian packages.
    #[arg(long)]
    no_packages: bool,
    /// Only the paper's Table 1: 1,500 each of ALLOC, READ, UPDATE and FREE over both
    /// transports, median and p95 next to the paper's UDP and RDMA columns.
    #[arg(long, conflicts_with = "paging")]
    table1: bool,
    /// Only remote paging (the paper's Figures 4 and 5): 1,500 page faults each through a
    /// RemoteRegion, with a directory-service round trip, and from the local disk (O_DIRECT and
    /// cached), with their breakdown; then the remote-sort example.
    #[arg(long, conflicts_with = "table1")]
    paging: bool,
    /// Only the shard scaling of the server's request path (parse, shard, store, reply frame;
    /// no sockets) on 1 and on 2 pinned threads, and its cost per READ, WRITE and FETCH_ADD.
    #[arg(long, conflicts_with_all = ["table1", "paging"])]
    scaling: bool,
    /// Only the XDP fast READ: the XDP_TX bounce floor, the fast READ from a `--xdp-cache`
    /// server, the AF_XDP worker's READ and the kernel-UDP READ, at window 1, at 1,000/s and
    /// at window 32, with their ratios (docs/benchmarks.md "Hot pages in XDP").
    #[arg(long, conflicts_with_all = ["table1", "paging", "scaling"])]
    xdp_fast: bool,
}

const NAME: &str = "bbbench";

/// (name, mix, window, payload): READ and WRITE latency at window 1, pipelined READ
/// throughput, and the small-request rate one server core sustains.
const SCENARIOS: [(&str, &str, usize, u16); 4] = [
    ("read-w1", "read=100", 1, 4096),
    ("write-w1", "write=100", 1, 4096),
    ("read-w32", "read=100", 32, 4096),
    ("read64-w32", "read=100", 32, 64),
];
/// The open-loop sweep of 4 KiB READs: (from, to, step) requests/s, full and quick, and the
/// p99 target in µs. 1 ms, because on this VM kind DAMON's `kdamond` takes a busy-polling CPU
/// for ~1 ms several times a second: at 100 µs the sweep measures that noise, not the system.
const SWEEP: (&str, &str, &str) = ("25000:400000:25000", "50000:150000:50000", "1000");
const TRANSPORTS: [&str; 2] = ["xdp", "udp"];
/// The remote sorts of the paging run: (what, extra arguments, report name). The first is
/// the default configuration; the others measure what CLOCK and prefetching each bring.
const SORTS: [(&str, &[&str], &str); 3] = [
    ("CLOCK, prefetching", &[], "sort"),
    ("FIFO, prefetching", &["--eviction", "fifo"], "sort-fifo"),
    (
        "CLOCK, no prefetching",
        &["--prefetch", "0"],
        "sort-noprefetch",
    ),
];
/// (name, payload, window) of the bare echoes: the floors the operations are compared with.
const ECHOES: [(&str, u16, usize); 4] = [
    ("echo-small", 8, 1),
    ("echo-page", 4096, 1),
    ("echo-page-w32", 4096, 32),
    ("echo-small-w32", 8, 32),
];

/// Retransmissions before a client of the lab gives up on a request: after waits of 1, 2, 4,
/// 8 and then 16 ms each (RTO 1 ms), 0.35 s in all instead of the default's 95 ms. Twice in
/// CI a READ went unanswered for the default's 95 ms just after the server's watchdog found
/// its worker starved — most likely its virtual CPU stood still (docs/benchmarks.md, "Noise on
/// this VM kind") — and the run failed. A benchmark shows such a stall in its maximum latency;
/// it fails only on a request the server never answers.
const RETRIES: &str = "24";

/// The topology and binaries of one run, and how to start a server and a load in it.
struct Lab<'a> {
    pair: Pair,
    bin: PathBuf,
    interrupted: &'a AtomicBool,
    cores: (usize, usize),
    seconds: &'static str,
    warmup: &'static str,
    out: PathBuf,
}

impl Lab<'_> {
    /// Starts `bluebridge-server <extra> …` pinned to the server CPU.
    fn server(&self, s: &mut Stages, extra: &[&str]) -> Result<ServerProc> {
        let server_core = self.cores.1.to_string();
        let mut args: Vec<String> = extra.iter().map(|x| (*x).to_owned()).collect();
        for x in [
            "--iface",
            &self.pair.server.ifname,
            "--host-id",
            "2",
            "--cores",
            &server_core,
            "--stats-interval",
            "0",
        ] {
            args.push(x.to_owned());
        }
        let mut proc = None;
        s.run(
            &format!(
                "start bluebridge-server {} (CPU {server_core})",
                extra.join(" ")
            ),
            || {
                proc = Some(ServerProc::start(
                    &self.pair.server.ns,
                    &self.bin.join("bluebridge-server"),
                    &args,
                    self.interrupted,
                )?);
                Ok(())
            },
        )?;
        Ok(proc.expect("started"))
    }

    /// `bin --iface … --next-hop-mac … --host 2 --core <client CPU>` in the client namespace.
    fn client_command(&self, bin: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.pair.client.ns])
            .arg(bin)
            .args([
                "--iface",
                &self.pair.client.ifname,
                "--next-hop-mac",
                &fmt_mac(self.pair.server.mac),
            ])
            .args(["--host", "2", "--core", &self.cores.0.to_string()])
            .args(["--retries", RETRIES]);
        c
    }

    /// The paging benchmark (`--faults` each; JSON and SVG into results/) and the remote-sort
    /// example, against an AF_XDP server.
    fn paging(&self, s: &mut Stages, faults: &str, sort_pages: &str) -> Result<()> {
        let server = self.server(s, &["--arena", "128MiB"])?;
        s.run(
            &format!(
                "paging: {faults} faults each, BlueBridge / with a directory service / disk O_DIRECT / disk cached"
            ),
            || {
                stage::status(
                    self.client_command(&self.bin.join("bluebridge-paging"))
                        .args(["--faults", faults, "--json"])
                        .arg(self.out.join("paging.json"))
                        .arg("--plot")
                        .arg(self.out.join("paging.svg")),
                )
            },
        )?;
        for (what, extra, name) in SORTS {
            s.run(
                &format!(
                    "example: sort {sort_pages} pages of u64 in a RemoteRegion (25% resident, {what}) and locally"
                ),
                || {
                    let budget = (sort_pages.parse::<usize>()? / 4).to_string();
                    stage::status(
                        self.client_command(&self.bin.join("examples/remote_sort"))
                            .args(["--pages", sort_pages, "--budget", &budget])
                            .args(extra)
                            .arg("--json")
                            .arg(self.out.join(format!("{name}.json"))),
                    )
                },
            )?;
        }
        s.run("stop the server", || server.stop())
    }

    /// Runs `bluebridge-bench <args> …` pinned to the client CPU, writing `results/<name>.json`.
    fn load(&self, s: &mut Stages, label: &str, args: &[&str], name: &str) -> Result<()> {
        self.load_for(s, label, args, name, (self.seconds, self.warmup))
    }

    /// [`Lab::load`] measuring `(seconds, warm-up)` instead of the run's default.
    fn load_for(
        &self,
        s: &mut Stages,
        label: &str,
        args: &[&str],
        name: &str,
        (seconds, warmup): (&str, &str),
    ) -> Result<()> {
        let json = self.out.join(format!("{name}.json"));
        s.run(label, || {
            stage::status(
                self.client_command(&self.bin.join("bluebridge-bench"))
                    .args(args)
                    .args([
                        "--seconds",
                        seconds,
                        "--warmup",
                        warmup,
                        "--quiet",
                        "--json",
                    ])
                    .arg(&json),
            )
        })
    }
}

pub(crate) fn run(a: &BenchArgs) -> Result<()> {
    let interrupted = lab::interrupt_flag()?;
    let mut s = Stages::new();
    let _huge = lab::prepare(
        &mut s,
        a.no_packages,
        &["bluebridge-server", "bluebridge-bench"],
        NAME,
        64 + 2 * 8 + 4,
    )?;
    let out = root().join(&a.out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bin = root().join("target/release");
    if a.scaling || !a.table1 && !a.paging && !a.xdp_fast {
        // Before any traffic: it needs both CPUs to itself.
        let (seconds, repeats) = if a.quick { ("0.3", "1") } else { ("1", "3") };
        s.run(
            &format!(
                "scaling: the request path (parse, shard, store, reply frame; no sockets) on 1 \
                 and 2 shards, {seconds} s each, {repeats} time(s)"
            ),
            || {
                stage::status(
                    Command::new(bin.join("bluebridge-scaling"))
                        .args(["--seconds", seconds, "--repeats", repeats, "--json"])
                        .arg(out.join("scaling.json")),
                )
            },
        )?;
    }
    if a.scaling {
        s.finish();
        return print_scaling(&out);
    }
    if !a.table1 && !a.xdp_fast {
        s.run("build the remote_sort example (release)", || {
            stage::status(crate::cargo().args([
                "build",
                "--release",
                "--locked",
                "-p",
                "bluebridge-client",
                "--example",
                "remote_sort",
            ]))
        })?;
    }
    let mut pair = None;
    s.run(
        &format!("topology: {NAME}-c ⇄ {NAME}-s, MTU 9000, kernel routes for the UDP baseline"),
        || {
            let p = Pair::create(NAME, 9000)?;
            p.route_kernel_udp(
                "fd00:bb::/32",
                "fd00:bb:1::1",
                "fd00:bb:1::/48",
                "fd00:bb:2::/48",
            )?;
            pair = Some(p);
            Ok(())
        },
    )?;
    let (seconds, warmup) = if a.quick { ("1", "0.5") } else { ("5", "1") };
    let lab = Lab {
        pair: pair.expect("created"),
        bin,
        interrupted: &interrupted,
        cores: lab::cores(),
        seconds,
        warmup,
        out: out.clone(),
    };
    let ops = if a.quick { "300" } else { "1500" };
    if a.xdp_fast {
        lab.xdp_fast(&mut s)?;
        drop(lab);
        let left = namespaces_with_prefix(NAME);
        if !left.is_empty() {
            bail!("namespaces left behind: {left:?}");
        }
        fast::print(&out)?;
        s.finish();
        return Ok(());
    }
    let everything = !a.table1 && !a.paging;

    for transport in TRANSPORTS {
        if a.paging {
            break;
        }
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let server = lab.server(&mut s, &["--transport", transport, "--arena", "128MiB"])?;
        let table1 = format!("{transport}-table1");
        lab.load(
            &mut s,
            &format!("{transport}: Table 1 ({ops} each of ALLOC, READ, UPDATE, FREE)"),
            &["--transport", transport, "--table1", "--ops", ops],
            &table1,
        )?;
        if everything {
            for (name, mix, window, payload) in SCENARIOS {
                let (w, p) = (window.to_string(), payload.to_string());
                let label = format!(
                    "{transport}: {name} ({mix}, {payload} B, window {window}; {seconds} s)"
                );
                lab.load(
                    &mut s,
                    &label,
                    &[
                        "--transport",
                        transport,
                        "--mix",
                        mix,
                        "--window",
                        &w,
                        "--payload",
                        &p,
                    ],
                    &format!("{transport}-{name}"),
                )?;
            }
            let (rates, timing) = if a.quick {
                (SWEEP.1, ("0.5", "0.2"))
            } else {
                (SWEEP.0, ("2", "0.5"))
            };
            lab.load_for(
                &mut s,
                &format!(
                    "{transport}: open-loop sweep of 4 KiB READs, {rates} requests/s (Poisson, {} s each), p99 target {} µs",
                    timing.0, SWEEP.2
                ),
                &[
                    "--transport",
                    transport,
                    "--sweep",
                    rates,
                    "--p99-target-us",
                    SWEEP.2,
                ],
                &format!("{transport}-sweep"),
                timing,
            )?;
        }
        if everything && transport == "xdp" {
            lab.refusals(&mut s, server)?;
        } else {
            s.run(&format!("stop the {transport} server"), || server.stop())?;
        }
    }
    if everything {
        // The floors, in the same run, for the ratios: the bare AF_XDP echo (frames bounced
        // unparsed by a userspace worker), then the XDP_TX bounce (by the steering program,
        // no userspace at all).
        for (mode, flag, what) in [
            ("echo", "--echo", "bare echo"),
            ("bounce", "--xdp-bounce", "XDP_TX bounce"),
        ] {
            let server = lab.server(&mut s, &[flag, "--arena", "2MiB"])?;
            for (name, payload, window) in ECHOES {
                let label = format!(
                    "{what}: {name} ({} B frames, window {window}; {seconds} s)",
                    110 + payload
                );
                lab.load(
                    &mut s,
                    &label,
                    &[
                        "--echo",
                        "--payload",
                        &payload.to_string(),
                        "--window",
                        &window.to_string(),
                    ],
                    &format!("xdp-{}", name.replacen("echo", mode, 1)),
                )?;
            }
            s.run(&format!("stop the {what} server"), || server.stop())?;
        }
    }
    if !a.table1 {
        let (faults, sort_pages) = if a.quick {
            ("300", "512")
        } else {
            ("1500", "2048")
        };
        lab.paging(&mut s, faults, sort_pages)?;
    }
    drop(lab);
    let left = namespaces_with_prefix(NAME);
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    s.run("plots", || plots(&out, a))?;
    if !a.paging {
        print_table1(&out)?;
    }
    if !a.table1 && !a.paging {
        print_comparison(&out)?;
    }
    if !a.table1 {
        print_paging(&out)?;
    }
    if !a.table1 && !a.paging {
        print_scaling(&out)?;
    }
    s.finish();
    Ok(())
}

/// The scaling line and the per-request costs, from `results/scaling.json`.
fn print_scaling(out: &Path) -> Result<()> {
    let p = out.join("scaling.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let num = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
    println!(
        "scaling: 1 shard {:.0} ops/s, 2 shards {:.0} ops/s, ratio {:.2}",
        num(&v["ops_per_s"]["1"]),
        num(&v["ops_per_s"]["2"]),
        num(&v["ratio"])
    );
    if let Some(costs) = v["ns_per_request"].as_object() {
        let c: Vec<String> = costs
            .iter()
            .map(|(op, ns)| format!("{op} {:.0} ns", num(ns)))
            .collect();
        println!("cost per request (one core): {}", c.join(", "));
    }
    Ok(())
}

fn load(out: &Path, name: &str) -> Result<Report> {
    let p = out.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Merges the runs of several reports into one (for a chart of them side by side).
fn merged(out: &Path, names: &[&str]) -> Result<Report> {
    let mut all = load(out, names[0])?;
    for n in &names[1..] {
        let r = load(out, n)?;
        all.runs.extend(r.runs);
        all.best_rate.extend(r.best_rate);
    }
    Ok(all)
}

/// `results/latency.svg` (CDFs of READ and WRITE at window 1 and the page echo),
/// `results/sweep.svg` (throughput against latency, both transports), `results/table1.svg`
/// (the paging chart is drawn by `bluebridge-paging` itself).
fn plots(out: &Path, a: &BenchArgs) -> Result<()> {
    let mut charts = Vec::new();
    if !a.paging {
        charts.push(("table1.svg", vec!["xdp-table1", "udp-table1"]));
    }
    if !a.table1 && !a.paging {
        charts.push((
            "latency.svg",
            vec![
                "xdp-read-w1",
                "udp-read-w1",
                "xdp-write-w1",
                "udp-write-w1",
                "xdp-echo-page",
            ],
        ));
        charts.push(("sweep.svg", vec!["xdp-sweep", "udp-sweep"]));
    }
    for (file, names) in charts {
        let mut r = merged(out, &names)?;
        if file == "latency.svg" {
            // Tell the echo apart from the AF_XDP operations in the legend.
            for run in r.runs.iter_mut().filter(|run| run.cdf.contains_key(ECHO)) {
                run.transport = "bare".into();
            }
        }
        let path = out.join(file);
        plot::write(&r, &path)?;
        println!("      {}", path.display());
    }
    Ok(())
}

fn print_paging(out: &Path) -> Result<()> {
    let p = out.join("paging.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let r: PagingReport = serde_json::from_str(&text)?;
    println!(
        "\nPage faults (the paper's Figures 4 and 5; µs, {} faults each on distinct pages; components are medians):",
        r.variants.first().map_or(0, |v| v.faults)
    );
    print!("{}", r.table());
    if let Some(w) = r.first_write {
        println!(
            "- first write to a clean resident page (write-protect fault): p50 {:.2} µs, p95 {:.2} µs",
            w.p50_us, w.p95_us
        );
    }
    for (what, us) in PAPER_FAULTS {
        println!("- paper, {what}: {us} µs");
    }
    let mut workloads = Vec::new();
    for (_, _, name) in SORTS {
        let p = out.join(format!("{name}.json"));
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        workloads.push(
            serde_json::from_str::<Workload>(&text)
                .with_context(|| format!("parsing {}", p.display()))?,
        );
    }
    if let Some(sc) = &r.scans {
        workloads.push(sc.sequential.clone());
        workloads.push(sc.random.clone());
    }
    println!("\nRemote paging against local memory (the same work on a local array):");
    print!("{}", workload_table(&workloads));
    if let Some(sc) = &r.scans {
        print!("{}", sc.summary());
        for w in workloads.iter().filter(|w| w.writebacks > 0) {
            let floor = sc.transfer_floor_ms(w);
            println!(
                "{}: its {} fetches and {} write-backs take at least {floor:.1} ms at these pipelined rates ({:.1}× its local time)",
                w.name,
                w.fetches,
                w.writebacks,
                floor / w.local_ms
            );
        }
    }
    Ok(())
}

fn print_table1(out: &Path) -> Result<()> {
    let r = merged(out, &["xdp-table1", "udp-table1"])?;
    println!(
        "\nThe paper's Table 1 (µs; ours: median / p95 of {} operations each, one at a time):",
        r.runs[0].latency.get("READ").map_or(0, |p| p.count)
    );
    println!(
        "| operation | AF_XDP (ours) | kernel UDP (ours) | UDP / AF_XDP | paper UDP | paper RDMA |"
    );
    println!("|---|---|---|---|---|---|");
    for (op, udp, rdma) in PAPER_TABLE1 {
        let p = |t: &str| r.run(t).and_then(|run| run.latency.get(op).copied());
        let (Some(x), Some(u)) = (p("xdp"), p("udp")) else {
            bail!("{op} missing from the Table 1 reports");
        };
        println!(
            "| {op} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}× | {udp:.1} | {rdma:.2} |",
            x.p50_us,
            x.p95_us,
            u.p50_us,
            u.p95_us,
            u.p50_us / x.p50_us
        );
    }
    Ok(())
}

fn print_comparison(out: &Path) -> Result<()> {
    println!(
        "\nAF_XDP against the kernel-UDP baseline, measured in this run (reports in {}):",
        out.display()
    );
    println!(
        "| scenario | AF_XDP p50 / p99 µs | kernel UDP p50 / p99 µs | p50 ratio | AF_XDP ops/s | UDP ops/s | rate ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, mix, _, _) in SCENARIOS {
        let op = if mix.starts_with("read") {
            "READ"
        } else {
            "WRITE"
        };
        let x = load(out, &format!("xdp-{name}"))?;
        let u = load(out, &format!("udp-{name}"))?;
        let (x, u) = (&x.runs[0], &u.runs[0]);
        let f = |r: &Run, k: fn(&Percentiles) -> f64| r.latency.get(op).map_or(f64::NAN, k);
        println!(
            "| {name} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}× | {:.0} | {:.0} | {:.2}× |",
            f(x, |p| p.p50_us),
            f(x, |p| p.p99_us),
            f(u, |p| p.p50_us),
            f(u, |p| p.p99_us),
            f(u, |p| p.p50_us) / f(x, |p| p.p50_us),
            x.ops_per_second,
            u.ops_per_second,
            x.ops_per_second / u.ops_per_second,
        );
    }
    let best = |t: &str| -> Result<Option<f64>> {
        Ok(load(out, &format!("{t}-sweep"))?
            .best_rate
            .get(t)
            .copied()
            .flatten())
    };
    let show = |r: Option<f64>| r.map_or("none".to_owned(), |r| format!("{r:.0}/s"));
    let (bx, bu) = (best("xdp")?, best("udp")?);
    println!(
        "\nOpen-loop sweep (4 KiB READ, Poisson), highest offered rate with p99 ≤ {} µs: AF_XDP {}, kernel UDP {}{}",
        SWEEP.2,
        show(bx),
        show(bu),
        match (bx, bu) {
            (Some(x), Some(u)) => format!(" ({:.2}×)", x / u),
            _ => String::new(),
        }
    );
    let small = load(out, "xdp-read64-w32")?.runs[0].ops_per_second;
    println!(
        "Small requests (64 B READ, window 32) on one server core: {small:.0} ops/s (target 1 M; the single client core generating them is the limit when the server core is not saturated)"
    );
    let p50 = |name: &str, op: &str| -> Result<f64> {
        Ok(load(out, name)?.runs[0]
            .latency
            .get(op)
            .map_or(f64::NAN, |p| p.p50_us))
    };
    let (small, page) = (p50("xdp-echo-small", ECHO)?, p50("xdp-echo-page", ECHO)?);
    let echo_rate = load(out, "xdp-echo-page")?.runs[0].ops_per_second;
    println!(
        "\nAgainst the bare AF_XDP echo of this run (118 B frames p50 {small:.2} µs; 4,206 B page frames p50 {page:.2} µs, {echo_rate:.0}/s at window 1):"
    );
    println!(
        "- READ 4 KiB p50 / page-echo p50: {:.2}×",
        p50("xdp-read-w1", "READ")? / page
    );
    println!(
        "- WRITE 4 KiB p50 / page-echo p50: {:.2}×",
        p50("xdp-write-w1", "WRITE")? / page
    );
    let (bsmall, bpage) = (
        p50("xdp-bounce-small", ECHO)?,
        p50("xdp-bounce-page", ECHO)?,
    );
    println!(
        "\nAgainst the XDP_TX bounce of this run (the steering program sends frames straight back; no userspace: the floor of the path; 118 B p50 {bsmall:.2} µs, 4,206 B page p50 {bpage:.2} µs):"
    );
    println!(
        "- READ 4 KiB p50 / bounce floor p50: {:.2}×; the bare AF_XDP page echo: {:.2}× the floor",
        p50("xdp-read-w1", "READ")? / bpage,
        page / bpage
    );
    let rate = |name: &str| -> Result<f64> { Ok(load(out, name)?.runs[0].ops_per_second) };
    println!(
        "- page bounce at window 32: {:.0}/s; READ 4 KiB at window 32 is {:.2}× that",
        rate("xdp-bounce-page-w32")?,
        rate("xdp-read-w32")? / rate("xdp-bounce-page-w32")?
    );
    let (read32, echo32) = (rate("xdp-read-w32")?, rate("xdp-echo-page-w32")?);
    println!(
        "- READ 4 KiB at window 32: {read32:.0}/s = {:.2}× the page echo at window 32 ({echo32:.0}/s)",
        read32 / echo32
    );
    let (small32, esmall32) = (rate("xdp-read64-w32")?, rate("xdp-echo-small-w32")?);
    println!(
        "- READ 64 B at window 32: {small32:.0}/s = {:.2}× the 118 B echo at window 32 ({esmall32:.0}/s: what this client core and link carry with no server work)",
        small32 / esmall32
    );
    Ok(())
}
