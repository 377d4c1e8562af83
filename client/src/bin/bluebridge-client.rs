//! `bluebridge-client`: talk to BlueBridge servers from the command line.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_client::{AnyTransport, Client, NetArgs, Request};
use bluebridge_proto::{HostId, Opcode, PAGE_SIZE, RemoteAddr};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

/// A BlueBridge client over AF_XDP.
///
/// Loads the steering XDP program for --local on IFACE, opens an AF_XDP socket and sends
/// requests to the next hop's MAC (no neighbour discovery). Needs root.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-client", version)]
struct Args {
    #[command(flatten)]
    net: NetArgs,
    /// CPU core to pin this client to (strongly recommended for measurements).
    #[arg(long, value_parser = bluebridge_xsk::cli::cpu)]
    core: Option<usize>,
    /// Keep normal scheduling priority instead of SCHED_IDLE while busy-polling (see the
    /// server's --normal-priority); use it when the client's core is shared.
    #[arg(long)]
    normal_priority: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Round-trip a PING to a server.
    Ping {
        /// Server host id (decimal or 0x-hex).
        #[arg(long)]
        host: HostId,
        /// How many pings (1 to 1000000).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
    },
    /// Print a server's STAT record.
    Stat {
        /// Server host id.
        #[arg(long)]
        host: HostId,
    },
    /// A short workload: alloc, write, read back and verify, free; window-1 latency of 4 KiB
    /// READs and small requests; then pipelined 4 KiB READs. Prints what happened.
    Demo {
        /// Server host id.
        #[arg(long)]
        host: HostId,
        /// Pages in the working set (1 to 65535).
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
        pages: u16,
        /// Round trips measured at window 1, per kind (1 to 10000000).
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        samples: u32,
        /// Seconds of pipelined READs (more than 0, at most 86400).
        #[arg(long, default_value_t = 3.0, value_parser = bluebridge_xsk::cli::positive_seconds)]
        seconds: f64,
        /// Requests in flight during the pipelined phase (1 to 128).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=128))]
        window: u16,
    },
}

fn main() -> Result<ExitCode> {
    bluebridge_client::init_logging("warn");
    let a = Args::parse();
    bluebridge_xsk::busy_poll_thread(a.core, !a.normal_priority)
        .context("setting up the polling thread")?;
    let (t, ec) = a.net.open().with_context(|| {
        format!(
            "opening the {:?} transport on {}",
            a.net.transport, a.net.iface
        )
    })?;
    eprintln!(
        "bluebridge-client: {} {} | {}",
        a.net.iface,
        a.net.local,
        t.describe()
    );
    let mut c = Client::new(ec, t);
    match a.cmd {
        Cmd::Ping { host, count } => {
            for i in 0..count {
                let rtt = c.ping(host)?;
                println!("ping {i}: {:.1} µs", rtt.as_secs_f64() * 1e6);
            }
        }
        Cmd::Stat { host } => println!("{:#?}", c.stat(host)?),
        Cmd::Demo {
            host,
            pages,
            samples,
            seconds,
            window,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            bluebridge_xsk::cli::stop_on_signals(&stop).context("installing signal handlers")?;
            let plan = Demo {
                host,
                pages,
                samples,
                seconds,
                window: usize::from(window),
                stop,
            };
            return plan.run(&mut c);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds are valid")
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// SIGINT or SIGTERM stopped the demo.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// The demo's workload.
struct Demo {
    host: HostId,
    pages: u16,
    samples: u32,
    seconds: f64,
    window: usize,
    /// Set by SIGINT/SIGTERM: stop early (the pages are freed all the same).
    stop: Arc<AtomicBool>,
}

impl Demo {
    /// Allocates the working set, runs the phases and frees every page it allocated on every
    /// way out: success, an error in a phase, or Ctrl-C (then the exit status is 130, as for
    /// a shell's interrupted command).
    fn run(&self, c: &mut Client<AnyTransport>) -> Result<ExitCode> {
        let mut set = Vec::new();
        let outcome = self.phases(c, &mut set);
        let freed = free_all(c, &set);
        if let Err(e) = &freed {
            eprintln!("bluebridge-client: freeing the demo's pages: {e:#}");
        }
        if let Err(e) = &outcome
            && e.is::<Interrupted>()
        {
            freed?;
            println!("client: interrupted; all {} pages freed", set.len());
            return Ok(ExitCode::from(130));
        }
        outcome?;
        freed?;
        let s = c.stats();
        println!(
            "client: {} requests, {} retransmissions, {} timeouts; all {} pages freed",
            s.submitted,
            s.retransmits,
            s.timeouts,
            set.len()
        );
        ensure!(s.timeouts == 0, "the demo saw timeouts");
        Ok(ExitCode::SUCCESS)
    }

    fn check_stop(&self) -> Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(Interrupted.into());
        }
        Ok(())
    }

    fn phases(&self, c: &mut Client<AnyTransport>, set: &mut Vec<RemoteAddr>) -> Result<()> {
        let (host, pages, samples, window) = (self.host, self.pages, self.samples, self.window);
        // 1. Correctness: allocate, write a distinct pattern per page, read back, verify.
        let t0 = Instant::now();
        while set.len() < usize::from(pages) {
            self.check_stop()?;
            let n = (usize::from(pages) - set.len()).min(128) as u16;
            set.extend(c.alloc_bulk(host, n, false)?);
        }
        let pattern = |i: usize| -> Vec<u8> {
            (0..PAGE_SIZE)
                .map(|b| (b ^ i.wrapping_mul(131)) as u8)
                .collect()
        };
        for (i, &p) in set.iter().enumerate() {
            c.write(p, 0, &pattern(i))?;
        }
        let mut verified = 0;
        for (i, &p) in set.iter().enumerate() {
            if c.read(p)? != pattern(i) {
                bail!("page {i} read back differently from what was written");
            }
            verified += 1;
        }
        println!(
            "correctness: {} pages allocated, written and read back intact ({verified} verified) in {:.1} ms",
            set.len(),
            t0.elapsed().as_secs_f64() * 1e3
        );

        // 2. Window-1 latency.
        let mut read4k = hist();
        let mut small = hist();
        let mut ping = hist();
        for i in 0..samples as usize {
            if i % 1024 == 0 {
                self.check_stop()?;
            }
            let p = set[i % set.len()];
            let t = Instant::now();
            c.read(p)?;
            read4k.record(t.elapsed().as_nanos() as u64)?;
            let t = Instant::now();
            c.read_range(p, 0, 64)?;
            small.record(t.elapsed().as_nanos() as u64)?;
            let t = Instant::now();
            c.ping(host)?;
            ping.record(t.elapsed().as_nanos() as u64)?;
        }
        println!("latency at window 1 ({samples} round trips each):");
        for (name, h) in [
            ("READ 4 KiB", &read4k),
            ("READ 64 B", &small),
            ("PING", &ping),
        ] {
            println!(
                "  {name:<11} p50 {:>7.2} µs   p99 {:>7.2} µs   p99.9 {:>7.2} µs   max {:>8.2} µs",
                us(h.value_at_quantile(0.5)),
                us(h.value_at_quantile(0.99)),
                us(h.value_at_quantile(0.999)),
                us(h.max())
            );
        }

        // 3. Pipelined 4 KiB READs.
        let dur = Duration::from_secs_f64(self.seconds);
        let mut lat = hist();
        let (mut done, mut errors, mut next) = (0u64, 0u64, 0usize);
        let start = Instant::now();
        let running = |start: Instant| start.elapsed() < dur && !self.stop.load(Ordering::Relaxed);
        while running(start) || c.in_flight() > 0 {
            while running(start) && c.in_flight() < window {
                c.submit(
                    Request::new(Opcode::READ, set[next % set.len()]).range(0, PAGE_SIZE as u16),
                );
                next += 1;
            }
            while let Some(comp) = c.poll() {
                match comp.result {
                    Ok(r) if r.data.len() == PAGE_SIZE => {
                        done += 1;
                        lat.record(comp.latency.as_nanos().max(1) as u64)?;
                    }
                    _ => errors += 1,
                }
            }
        }
        self.check_stop()?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "pipelined READ 4 KiB, {window} in flight: {done} pages in {secs:.2} s = {:.0} pages/s ({:.2} Gbit/s), \
             p50 {:.2} µs p99 {:.2} µs, errors {errors}",
            done as f64 / secs,
            done as f64 * PAGE_SIZE as f64 * 8.0 / secs / 1e9,
            us(lat.value_at_quantile(0.5)),
            us(lat.value_at_quantile(0.99)),
        );
        ensure!(errors == 0, "{errors} pipelined READs failed");
        Ok(())
    }
}

/// Frees `set`, every page tried even if some fail.
fn free_all(c: &mut Client<AnyTransport>, set: &[RemoteAddr]) -> Result<()> {
    let failed = c.free_all(set);
    match failed.first() {
        None => Ok(()),
        Some((p, e)) => bail!(
            "{} of {} pages not freed (first: {p}: {e})",
            failed.len(),
            set.len()
        ),
    }
}
