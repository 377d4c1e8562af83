//! `bluebridge-paging`: page-fault latency through a `RemoteRegion` and its breakdown, next to
//! the prototype's directory-service variant and a local disk (the BlueBridge paper's
//! Figures 4 and 5).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use bluebridge_bench::paging::{FaultSample, PAPER_FAULTS, PagingReport, Summary, Variant};
use bluebridge_client::region::{
    Backing, Directory, FileBacking, HandlerCpu, OnClose, PagedRegion, RemoteBacking,
};
use bluebridge_client::{AnyTransport, Client, NetArgs, RegionOptions};
use bluebridge_proto::{HostId, PAGE_SIZE};
use clap::Parser;
use rand::SeedableRng;
use rand::seq::SliceRandom;

mod scan;

/// Page-fault latency: `--faults` first touches of distinct pages of a userfaultfd region, one
/// at a time from a pinned thread, each timed and split into entering the handler, locating
/// the page, getting its data, and installing it and returning. Variants: BlueBridge (the page
/// address is the route), the prototype's "remote with directory service" (a READ of a
/// directory entry first), the handler on another CPU, and a local disk with `O_DIRECT` and
/// through the page cache. Prints a table next to the paper's numbers; `--json`, `--plot`.
#[derive(Parser, Debug)]
#[command(name = "bluebridge-paging", version)]
struct Args {
    #[command(flatten)]
    net: NetArgs,
    /// Server host id holding the pages (decimal or 0x-hex).
    #[arg(long)]
    host: HostId,
    /// Host id of the directory server for the directory-service variant (default --host).
    #[arg(long)]
    directory_host: Option<HostId>,
    /// Faults measured per variant (each on a distinct page).
    #[arg(long, default_value_t = 1500, value_parser = bluebridge_xsk::cli::count(1, 10_000_000))]
    faults: usize,
    /// Untimed faults before measuring, per variant.
    #[arg(long, default_value_t = 100, value_parser = bluebridge_xsk::cli::count(0, 10_000_000))]
    warmup: usize,
    /// CPU for the faulting thread (and the handler).
    #[arg(long, value_parser = bluebridge_xsk::cli::cpu)]
    core: Option<usize>,
    /// Also measure with the handler on this other CPU (a cross-CPU wake-up per fault). It
    /// must be a CPU nothing else busy-polls on: a server's pinned worker there would be
    /// starved by the handler's wait for its own reply.
    #[arg(long, value_parser = bluebridge_xsk::cli::cpu)]
    xcpu_core: Option<usize>,
    /// File for the disk variants (created, 64 MiB or 4 pages per fault, whichever is more;
    /// removed afterwards). Put it on the disk you want measured.
    #[arg(long, default_value = "/var/tmp/bluebridge-paging.img")]
    disk_file: PathBuf,
    /// Skip the disk variants.
    #[arg(long)]
    no_disk: bool,
    /// Resident budget (pages) of the scans: a region four times this size read in order and
    /// at random, next to the pipelined and the window-1 READ rates (0: no scans).
    #[arg(long, default_value_t = 1024, value_parser = bluebridge_xsk::cli::count(0, 1 << 20))]
    scan_budget: usize,
    /// Against a server with `--xdp-cache`: fault every page twice, cold (the worker answers
    /// and the page goes into the server's XDP hot-page store) and hot (the XDP program
    /// answers), instead of the directory-service and cross-CPU variants.
    #[arg(long)]
    hot: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the breakdown as an SVG bar chart here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Set by SIGINT or SIGTERM.
static STOP: std::sync::LazyLock<Arc<AtomicBool>> = std::sync::LazyLock::new(Default::default);

/// An error once SIGINT or SIGTERM came.
fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted (every page allocated is freed)");
    }
    Ok(())
}

fn main() -> Result<()> {
    bluebridge_client::init_logging("warn");
    let a = Args::parse();
    ensure!(a.faults >= 1, "--faults must be at least 1");
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(c) = a.core {
        ensure!(c < ncpu, "--core {c}: this machine has {ncpu} CPUs");
    }
    let core = a.core.unwrap_or(0);
    // The faulting thread is pinned at normal priority: the handler must be able to run on
    // the same CPU while it waits.
    bluebridge_xsk::busy_poll_thread(Some(core), false).context("pinning")?;
    if let Some(x) = a.xcpu_core {
        ensure!(
            x < ncpu && x != core,
            "--xcpu-core must be another CPU of this machine"
        );
    }
    let n = a.faults + a.warmup;
    let dir_host = a.directory_host.unwrap_or(a.host);
    // Ctrl-C (or SIGTERM) stops the measurement cleanly: the pages are freed on the way out.
    bluebridge_xsk::cli::stop_on_signals(&STOP).context("installing signal handlers")?;

    let (t, ec) = a.net.open().context("opening the transport")?;
    let mut client = Client::new(ec, t);
    let pages = alloc(&mut client, a.host, n)?;
    let directory = match Directory::publish(&mut client, dir_host, &pages) {
        Ok(d) => d,
        Err(e) => {
            let _ = client.free_all(&pages);
            return Err(anyhow::Error::new(e).context("writing the directory"));
        }
    };
    let allocated: Vec<_> = pages.iter().chain(directory.pages()).copied().collect();
    let measured = measure_all(&a, n, client, pages, directory);
    let measured = match measured {
        Ok((variants, first_write, client)) if a.scan_budget > 0 => {
            // The scans free their own pages, also when they fail.
            scan::run(client, a.host, a.scan_budget, &check_stop)
                .map(|(r, _)| (variants, first_write, Some(r)))
        }
        Ok((variants, first_write, _)) => Ok((variants, first_write, None)),
        Err(e) => Err(e),
    };
    if measured.is_err() {
        // The client went down with the error: free everything through a fresh one.
        if let Ok((t, ec)) = a.net.open() {
            let failed = Client::new(ec, t).free_all(&allocated);
            if !failed.is_empty() {
                eprintln!("bluebridge-paging: {} pages not freed", failed.len());
            }
        }
    }
    let (mut variants, first_write, scans) = measured?;

    if !a.no_disk {
        let file_pages = (64 << 20) / PAGE_SIZE;
        let file_pages = file_pages.max(4 * n);
        prepare_file(&a.disk_file, file_pages)?;
        let mut offsets: Vec<u64> = (0..file_pages as u64)
            .map(|p| p * PAGE_SIZE as u64)
            .collect();
        offsets.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(7));
        offsets.truncate(n);
        for (name, description, direct) in [
            (
                "disk-direct",
                "local disk: the handler reads the page with O_DIRECT at a random offset",
                true,
            ),
            (
                "disk-cached",
                "local disk through the page cache (file read once before: the paper's disk numbers came from the buffer cache)",
                false,
            ),
        ] {
            if !direct {
                let f = std::fs::File::open(&a.disk_file)?;
                let mut buf = vec![0u8; 1 << 20];
                let mut at = 0u64;
                while at < (file_pages * PAGE_SIZE) as u64 {
                    at += f.read_at(&mut buf, at)? as u64;
                }
            }
            let b = FileBacking::open(&a.disk_file, offsets.clone(), direct)
                .with_context(|| format!("opening {}", a.disk_file.display()))?;
            let (samples, _, _) = measure(b, n, a.warmup, HandlerCpu::Caller, false)?;
            variants.push(Variant::new(name, description, &samples));
        }
        let _ = std::fs::remove_file(&a.disk_file);
    }

    let report = PagingReport {
        config: serde_json::json!({
            "host": a.host.to_string(), "directory_host": dir_host.to_string(),
            "faults": a.faults, "warmup": a.warmup, "core": core,
            "transport": format!("{:?}", a.net.transport).to_lowercase(), "hot": a.hot,
            "disk_file": a.disk_file, "disk": !a.no_disk,
        }),
        environment: serde_json::json!({
            "iface": a.net.iface, "cpus": ncpu,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "noisy_kernel_threads": bluebridge_bench::noisy_kernel_threads(),
        }),
        variants,
        first_write,
        scans,
    };
    println!(
        "{} faults per variant on distinct pages (after {} untimed), one at a time, thread on CPU {core}:",
        a.faults, a.warmup
    );
    print!("{}", report.table());
    println!("(components are medians; they need not add up to the median total)");
    if let Some(w) = report.first_write {
        println!(
            "first write to a clean resident page (a write-protect fault: dirty tracking): p50 {:.2} µs, p95 {:.2} µs",
            w.p50_us, w.p95_us
        );
    }
    for (what, us) in PAPER_FAULTS {
        println!("paper: {what}: {us} µs");
    }
    if let Some(sc) = &report.scans {
        println!(
            "\nscans of a region four times its resident budget ({} pages, {} resident):",
            sc.sequential.pages, sc.sequential.resident_pages
        );
        print!(
            "{}",
            bluebridge_bench::paging::workload_table(&[sc.sequential.clone(), sc.random.clone()])
        );
        print!("{}", sc.summary());
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("report written to {}", p.display());
    }
    if let Some(p) = &a.plot {
        bluebridge_bench::plot::paging(&report, p)?;
        println!("plot written to {}", p.display());
    }
    Ok(())
}

/// Runs the three fault-path variants over `pages` and frees them and the directory.
fn measure_all(
    a: &Args,
    n: usize,
    client: Client<AnyTransport>,
    pages: Vec<bluebridge_proto::RemoteAddr>,
    directory: Directory,
) -> Result<(Vec<Variant>, Option<Summary>, Client<AnyTransport>)> {
    let mut variants = Vec::new();
    let mut first_write = None;
    let mut backing = RemoteBacking::new(client, pages.clone());
    for (name, description, dir, cpu) in [
        (
            "bluebridge",
            "BlueBridge: READ from the page's own address (no directory)",
            false,
            HandlerCpu::Caller,
        ),
        (
            "bluebridge-hot",
            "BlueBridge, the pages faulted again: hot in the server's XDP store, answered by XDP",
            false,
            HandlerCpu::Caller,
        ),
        (
            "remote-ds",
            "remote with a directory service: READ the page's directory entry, then the page",
            true,
            HandlerCpu::Caller,
        ),
        (
            "bluebridge-xcpu",
            "BlueBridge with the handler on another CPU (a cross-CPU wake-up per fault)",
            false,
            HandlerCpu::Cpu(a.xcpu_core.unwrap_or(usize::MAX)),
        ),
    ] {
        // --hot: the first touch and the second; otherwise all but the second (the
        // cross-CPU one only with --xcpu-core).
        let wanted = if a.hot {
            matches!(name, "bluebridge" | "bluebridge-hot")
        } else {
            name != "bluebridge-hot" && cpu != HandlerCpu::Cpu(usize::MAX)
        };
        if !wanted {
            continue;
        }
        let b = RemoteBacking::new(backing.into_client(), pages.clone());
        let b = if dir {
            b.with_directory(directory.clone())
        } else {
            b
        };
        let (samples, writes, b) = measure(b, n, a.warmup, cpu, name == "bluebridge")?;
        backing = b;
        variants.push(Variant::new(name, description, &samples));
        if !writes.is_empty() {
            first_write = Some(Summary::of(writes));
        }
    }
    // Free the pages and the directory.
    let mut b = RemoteBacking::new(backing.into_client(), pages).with_directory(directory);
    b.close(true)
        .map_err(|e| anyhow::anyhow!("freeing the pages: {e}"))?;
    Ok((variants, first_write, b.into_client()))
}

pub(crate) fn alloc(
    c: &mut Client<AnyTransport>,
    host: HostId,
    n: usize,
) -> Result<Vec<bluebridge_proto::RemoteAddr>> {
    let mut pages = Vec::with_capacity(n);
    while pages.len() < n {
        let k = (n - pages.len()).min(128) as u16;
        match c.alloc_bulk(host, k, false) {
            Ok(more) => pages.extend(more),
            Err(e) => {
                let _ = c.free_all(&pages); // what was allocated before the failure goes back
                return Err(anyhow::Error::new(e).context("allocating pages"));
            }
        }
    }
    Ok(pages)
}

/// Faults every page of a fresh region over `backing` once, in a shuffled order, timing each
/// from the access to its return, and matches the handler's timestamps to it.
/// With `first_writes`, then also times the first write to each (now clean) page: a
/// write-protect fault, ns each.
fn measure<B: Backing>(
    backing: B,
    n: usize,
    warmup: usize,
    cpu: HandlerCpu,
    first_writes: bool,
) -> Result<(Vec<FaultSample>, Vec<u64>, B)> {
    let mut region = PagedRegion::with_backing(
        backing,
        n,
        RegionOptions {
            trace: true,
            on_close: OnClose::Detach,
            handler_cpu: cpu,
            // Every access must be a fault of its own: the figure times faults.
            prefetch: 0,
            ..RegionOptions::default()
        },
    )?;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(42));
    let mem = region.as_slice();
    let mut app = Vec::with_capacity(n);
    for &p in &order {
        check_stop()?;
        let t0 = Instant::now();
        std::hint::black_box(mem[p * PAGE_SIZE]);
        app.push((p, t0, Instant::now()));
    }
    let mut writes = Vec::new();
    if first_writes {
        let mem = region.as_mut_slice();
        for &p in &order[warmup..] {
            check_stop()?;
            let t0 = Instant::now();
            mem[p * PAGE_SIZE] = 1;
            writes.push(t0.elapsed().as_nanos() as u64);
        }
    }
    let stats = region.stats();
    if stats.errors > 0 {
        bail!(
            "{} faults failed: {}",
            stats.errors,
            region.last_error().unwrap_or_default()
        );
    }
    // The handler files a fault's trace just after waking the thread, so the last one may
    // still be on its way.
    let mut traces = vec![None; n];
    let (mut got, since) = (0, Instant::now());
    while got < n && since.elapsed() < std::time::Duration::from_secs(2) {
        for t in region.take_traces() {
            got += usize::from(traces[t.page].replace(t).is_none());
        }
    }
    let backing = region.close()?;
    let mut samples = Vec::with_capacity(n - warmup);
    for &(p, t0, t1) in &app[warmup..] {
        let t = traces[p].with_context(|| format!("no handler trace for page {p}"))?;
        let ns = |a: Instant, b: Instant| b.saturating_duration_since(a).as_nanos() as u64;
        samples.push(FaultSample {
            enter_ns: ns(t0, t.entered),
            directory_ns: ns(t.entered, t.located),
            data_ns: ns(t.located, t.fetched),
            exit_ns: ns(t.fetched, t1),
        });
    }
    Ok((samples, writes, backing))
}

/// A file of `pages` pages of non-zero data, synced to disk.
fn prepare_file(path: &std::path::Path, pages: usize) -> Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    let mut at = 0u64;
    while at < (pages * PAGE_SIZE) as u64 {
        f.write_all_at(&chunk, at)?;
        at += chunk.len() as u64;
    }
    // On disk: O_DIRECT reads go to the device whatever the page cache holds.
    f.sync_all()?;
    Ok(())
}
