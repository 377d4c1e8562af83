//! A counter in shared remote memory that processes on several hosts increment together: two
//! pages on a server, mapped by each process as a coherent `RemoteRegion`
//! (`Coherence::Shared`); a lock word taken with compare-and-swap in page 0 guards a plain
//! counter in page 1. The pages' home keeps the copies coherent (docs/paging.md "Sharing").
//!
//! ```sh
//! # once: two shared pages on server host 2 (kept when this process exits)
//! PAGES=$(ip netns exec <ns-a> target/release/examples/shared_counter --iface <if> \
//!     --next-hop-mac <mac> create --host 2)
//! # on every host at once: 1000 increments each, then the total this host sees
//! ip netns exec <ns-b> target/release/examples/shared_counter --iface <if> --local <addr> \
//!     --next-hop-mac <mac> add --pages "$PAGES" --times 1000
//! # afterwards
//! ... free --pages "$PAGES"
//! ```

use std::net::Ipv6Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bluebridge_client::region::{Coherence, HandlerCpu, OnClose};
use bluebridge_client::{Client, NetArgs, RegionOptions, RemoteRegion};
use bluebridge_proto::{HostId, PAGE_SIZE, RemoteAddr};
use clap::{Parser, Subcommand};

/// Increment a lock-protected counter in shared remote memory, together with other processes.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    net: NetArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Allocate the counter's two pages (shared, detached so they outlive this process) on a
    /// server and print their addresses, comma-separated.
    Create {
        /// The server's host id.
        #[arg(long)]
        host: HostId,
    },
    /// Map the pages, add 1 to the counter TIMES times under the lock, print what it reads.
    Add {
        /// The two pages `create` printed, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        pages: Vec<Ipv6Addr>,
        /// Increments.
        #[arg(long, default_value_t = 1000, value_parser = bluebridge_xsk::cli::count(0, 100_000_000))]
        times: usize,
        /// Then keep a read copy of the counter's page and wait (until SIGINT/SIGTERM),
        /// printing "holding": what a reader that stops answering looks like to the others.
        #[arg(long)]
        hold: bool,
        /// Give up waiting for the lock after this many seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        lock_timeout_s: u64,
    },
    /// Free the pages.
    Free {
        /// The two pages `create` printed, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        pages: Vec<Ipv6Addr>,
    },
}

fn addrs<T: bluebridge_client::Transport>(
    c: &Client<T>,
    pages: &[Ipv6Addr],
) -> Result<Vec<RemoteAddr>> {
    pages
        .iter()
        .map(|&p| RemoteAddr::from_ipv6(p, c.prefix()).with_context(|| format!("page address {p}")))
        .collect()
}

fn main() -> Result<()> {
    let a = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    bluebridge_xsk::cli::stop_on_signals(&stop).context("installing signal handlers")?;
    let (t, ec) = a.net.open().context("opening the transport")?;
    let mut client = Client::new(ec, t);
    match a.cmd {
        Cmd::Create { host } => {
            let pages = client.alloc_bulk(host, 2, true).context("allocating")?;
            client.detach_all(&pages).context("detaching")?;
            let list: Vec<String> = pages.iter().map(|p| p.to_ipv6().to_string()).collect();
            println!("{}", list.join(","));
        }
        Cmd::Free { pages } => {
            let pages = addrs(&client, &pages)?;
            if let Some((p, e)) = client.free_all(&pages).into_iter().next() {
                bail!("freeing {}: {e}", p.to_ipv6());
            }
        }
        Cmd::Add {
            pages,
            times,
            hold,
            lock_timeout_s,
        } => {
            let pages = addrs(&client, &pages)?;
            let me = u64::from(u16::from_be_bytes(
                a.net.local.octets()[4..6].try_into().expect("2 bytes"),
            )) << 16
                | u64::from(std::process::id() & 0xffff)
                | 1;
            let region = RemoteRegion::attach(
                client,
                pages,
                RegionOptions {
                    coherence: Coherence::Shared,
                    on_close: OnClose::Detach,
                    handler_cpu: HandlerCpu::Any,
                    ..RegionOptions::default()
                },
            )?;
            let w = region.as_atomic_words();
            let (lock, counter) = (&w[0], &w[PAGE_SIZE / 8]);
            let t0 = Instant::now();
            for _ in 0..times {
                let start = Instant::now();
                // Test, then test-and-set: waiting on a read copy costs no write copy.
                while lock.load(Ordering::SeqCst) != 0
                    || lock
                        .compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                {
                    if stop.load(Ordering::Relaxed) {
                        bail!("interrupted");
                    }
                    if start.elapsed() > Duration::from_secs(lock_timeout_s) {
                        bail!("the lock did not come within {lock_timeout_s} s");
                    }
                    std::thread::yield_now();
                }
                let v = counter.load(Ordering::SeqCst);
                counter.store(v + 1, Ordering::SeqCst);
                lock.store(0, Ordering::SeqCst);
            }
            let took = t0.elapsed();
            println!(
                "counter {} after {times} increments here in {:.1} ms",
                counter.load(Ordering::SeqCst),
                took.as_secs_f64() * 1e3
            );
            let st = region.stats();
            println!(
                "copies: {} faults, {} upgrades, {} notices answered, {} write-backs, {} errors",
                st.faults, st.upgrades, st.revokes, st.writebacks, st.errors
            );
            if hold {
                counter.load(Ordering::SeqCst);
                println!("holding");
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if let Some(e) = region.last_error() {
                bail!("the region met an error: {e}");
            }
            region.close().context("closing the region")?;
        }
    }
    Ok(())
}
