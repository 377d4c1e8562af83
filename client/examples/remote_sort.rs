//! An ordinary-looking workload on remote memory: sort an array of `u64` that lives in a
//! `RemoteRegion` several times larger than its resident budget, and the same array in local
//! memory, and compare. The sort is `slice::sort_unstable` on a plain `&mut [u64]`: it does
//! not know its pages come from the network.
//!
//! ```sh
//! ip netns exec <client-ns> target/release/examples/remote_sort \
//!     --iface <if> --next-hop-mac <server-mac> --host 2 --core 0
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use bluebridge_client::region::RegionStats;
use bluebridge_client::region::{Eviction, OnClose};
use bluebridge_client::{Client, NetArgs, RegionOptions, RemoteRegion};
use bluebridge_proto::{HostId, PAGE_SIZE};
use clap::Parser;

/// Sort N pages of random u64 in remote memory (resident budget: a fraction of them) and in
/// local memory; print both times and the paging counters.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    net: NetArgs,
    /// Server host id holding the array.
    #[arg(long)]
    host: HostId,
    /// Pages in the array (512 u64 each).
    #[arg(long, default_value_t = 2048, value_parser = bluebridge_xsk::cli::count(1, 1 << 24))]
    pages: usize,
    /// Pages of it resident at once.
    #[arg(long, default_value_t = 512, value_parser = bluebridge_xsk::cli::count(1, 1 << 24))]
    budget: usize,
    /// CPU to run on (the fault handler runs there too).
    #[arg(long, value_parser = bluebridge_xsk::cli::cpu)]
    core: Option<usize>,
    /// Most pages a stream of faults prefetches ahead (0: no prefetching).
    #[arg(long, default_value_t = bluebridge_client::region::DEFAULT_PREFETCH,
          value_parser = bluebridge_xsk::cli::count(0, 1 << 20))]
    prefetch: usize,
    /// Eviction policy: clock (second chance) or fifo.
    #[arg(long, value_enum, default_value_t = Policy::Clock)]
    eviction: Policy,
    /// Also write the times and counters as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// `--eviction`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Policy {
    /// CLOCK (second chance).
    Clock,
    /// Oldest first.
    Fifo,
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        a.pages >= 1 && a.budget >= 1,
        "--pages and --budget must be positive"
    );
    if let Some(c) = a.core {
        ensure!(
            core_affinity::set_for_current(core_affinity::CoreId { id: c }),
            "cannot run on CPU {c}"
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    bluebridge_xsk::cli::stop_on_signals(&stop).context("installing signal handlers")?;
    let (t, ec) = a.net.open().context("opening the transport")?;
    let client = Client::new(ec, t);
    let mut region = RemoteRegion::new(
        client,
        a.pages,
        &[a.host],
        RegionOptions {
            resident_pages: a.budget,
            on_close: OnClose::Free,
            prefetch: a.prefetch,
            eviction: match a.eviction {
                Policy::Clock => Eviction::Clock,
                Policy::Fifo => Eviction::Fifo,
            },
            ..RegionOptions::default()
        },
    )?;
    let n = a.pages * PAGE_SIZE / 8;
    let mut local = vec![0u64; n];
    let remote: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let t = Instant::now();
    for (r, l) in remote.iter_mut().zip(local.iter_mut()) {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        *r = v;
        *l = v;
    }
    let fill = t.elapsed();
    let before = region.stats();
    // Ctrl-C is taken between phases; leaving by `?` drops the region, which frees its pages.
    ensure!(
        !stop.load(Ordering::Relaxed),
        "interrupted (the pages were freed)"
    );

    let t = Instant::now();
    local.sort_unstable();
    let local_time = t.elapsed();
    let remote: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    let t = Instant::now();
    remote.sort_unstable();
    let remote_time = t.elapsed();
    ensure!(
        !stop.load(Ordering::Relaxed),
        "interrupted (the pages were freed)"
    );
    let sorted_alike = remote == local.as_slice();
    let after = region.stats();
    ensure!(sorted_alike, "the remote sort differs from the local one");

    println!(
        "sorted {n} u64 ({} MiB, {} pages; resident budget {} pages = {:.0}%)",
        (n * 8) >> 20,
        a.pages,
        a.budget,
        100.0 * a.budget as f64 / a.pages as f64
    );
    println!("filling: {:.1} ms (both arrays)", fill.as_secs_f64() * 1e3);
    println!("local memory:  {:.1} ms", local_time.as_secs_f64() * 1e3);
    println!(
        "remote memory: {:.1} ms ({:.1}× local)",
        remote_time.as_secs_f64() * 1e3,
        remote_time.as_secs_f64() / local_time.as_secs_f64()
    );
    let d = |f: fn(&RegionStats) -> u64| f(&after) - f(&before);
    println!(
        "during the sort: {} page faults, {} first writes to clean pages, {} evictions, {} pages written back; {} errors",
        d(|s| s.faults),
        d(|s| s.write_faults),
        d(|s| s.evictions),
        d(|s| s.writebacks),
        after.errors
    );
    println!(
        "prefetching: {} pages prefetched, {} hits ({} late), {} wasted; {} faults fetched their own page; {} pages evicted unchanged (not written back)",
        d(|s| s.prefetches),
        d(|s| s.prefetch_hits),
        d(|s| s.prefetch_late),
        d(|s| s.prefetch_wasted),
        d(|s| s.prefetch_misses),
        d(|s| s.unchanged),
    );
    if let Some(p) = &a.json {
        let name = format!(
            "sort ({}{})",
            match a.eviction {
                Policy::Clock => "CLOCK",
                Policy::Fifo => "FIFO",
            },
            if a.prefetch == 0 {
                ", no prefetching"
            } else {
                ", prefetching"
            }
        );
        let report = serde_json::json!({
            "name": name, "pages": a.pages, "resident_pages": a.budget,
            "local_ms": local_time.as_secs_f64() * 1e3,
            "remote_ms": remote_time.as_secs_f64() * 1e3,
            "faults": d(|s| s.faults), "prefetches": d(|s| s.prefetches),
            "fetches": d(|s| s.prefetch_misses + s.prefetches),
            "prefetch_hits": d(|s| s.prefetch_hits), "prefetch_wasted": d(|s| s.prefetch_wasted),
            "evictions": d(|s| s.evictions), "writebacks": d(|s| s.writebacks),
        });
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    region.close()?;
    Ok(())
}
