//! `bluebridge-scaling`: how the server's request path scales with shards, without sockets.
//!
//! Each thread owns one shard (a handler over its own store, as a server worker does) and
//! drives it with pre-built request frames of a READ/WRITE/FETCH_ADD mix on its own pages:
//! find the frame's shard, parse and check it, run it against the store, and build the reply
//! frame into a buffer that is then dropped (a null sink). The same work runs on 1 pinned
//! thread and then on 2 at once; the ratio of their rates is the scaling. Single-threaded runs
//! of each operation alone give its CPU cost per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bluebridge_proto::frame::{Endpoints, FrameSink, build, request_shard};
use bluebridge_proto::{
    BbRepr, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PAGE_SIZE, PageHandle, RemoteAddr,
    SESSION_SLOT_BITS, SESSION_SLOTS, UDP_PORT,
};
use bluebridge_server::stats::HostCounters;
use bluebridge_server::{Handler, HandlerConfig, Store};
use clap::Parser;

/// Measure the server's request path (parse → shard → store → reply frame) on 1 and 2 shards.
#[derive(Parser, Debug, Clone)]
#[command(name = "bluebridge-scaling", version)]
struct Args {
    /// Seconds each measurement runs (the mix on 1 and on 2 shards; each operation alone).
    #[arg(long, default_value_t = 2.0, value_parser = bluebridge_xsk::cli::positive_seconds)]
    seconds: f64,
    /// CPUs to pin the threads to: the first for the 1-shard run, both for the 2-shard run.
    #[arg(long, value_delimiter = ',', default_value = "0,1", value_parser = bluebridge_xsk::cli::cpu)]
    cores: Vec<usize>,
    /// Pages per shard the requests touch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pages: u32,
    /// The mix, in requests per 8: READ, WRITE, FETCH_ADD (e.g. 4,2,2).
    #[arg(long, value_delimiter = ',', default_value = "4,2,2", value_parser = clap::value_parser!(u32).range(0..=1000))]
    mix: Vec<u32>,
    /// Measurements of each rate: the 1- and 2-shard runs alternate and the medians count
    /// (the VM this was made on drifts between a fast and a slow regime).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=99))]
    repeats: u32,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const HOST: HostId = HostId(2);

/// A sink that builds every reply frame, then forgets it.
struct NullSink {
    buf: Vec<u8>,
    frames: u64,
}

impl FrameSink for NullSink {
    fn send(&mut self, ep: &Endpoints, header: &BbRepr, payload: &[u8]) -> bool {
        let n = build(&mut self.buf, ep, header, payload).expect("sized for a page");
        std::hint::black_box(&self.buf[..n]);
        self.frames += 1;
        true
    }
}

/// One shard and the requests that drive it.
struct Driver {
    handler: Handler,
    shards: usize,
    sink: NullSink,
    frames: Vec<Vec<u8>>,
    /// FETCH_ADDs sent: each gets a new request id (slot and sequence), as a client's would.
    fetch_adds: u64,
    now_ns: u64,
}

fn endpoints(dst: RemoteAddr) -> Endpoints {
    Endpoints {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        src: "fd00:bb:1::1".parse().expect("literal"),
        dst: dst.to_ipv6(),
        src_port: 40000,
        dst_port: UDP_PORT,
    }
}

fn frame(dst: RemoteAddr, h: &BbRepr, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; bluebridge_proto::FRAME_OVERHEAD + payload.len()];
    build(&mut b, &endpoints(dst), h, payload).expect("sized");
    b
}

impl Driver {
    fn new(shard: usize, counters: Arc<HostCounters>, a: &Args, ops: &[Opcode]) -> Result<Self> {
        let mut cfg = HandlerConfig::new(NetPrefix::DEFAULT, HOST, PAGE_SIZE as u16);
        cfg.shards = counters.len();
        let bytes = (u64::from(a.pages) * PAGE_SIZE as u64).next_multiple_of(2 << 20);
        let store = Store::for_shard(shard, bytes, true).context("the shard's store")?;
        let mut d = Driver {
            handler: Handler::with_counters(cfg, store, counters.clone()),
            shards: counters.len(),
            sink: NullSink {
                buf: vec![0u8; 9014],
                frames: 0,
            },
            frames: Vec::new(),
            fetch_adds: 0,
            now_ns: 1_000_000_000,
        };
        // Allocate the pages through the handler, reading each handle off the reply.
        let mut pages = Vec::new();
        for i in 0..a.pages {
            let h = BbRepr {
                count: 1,
                request_id: u64::from(i % SESSION_SLOTS as u32)
                    | u64::from(i / SESSION_SLOTS as u32 + 1) << SESSION_SLOT_BITS,
                ..BbRepr::default()
            };
            let f = frame(
                RemoteAddr::host_op(NetPrefix::DEFAULT, HOST, Opcode::ALLOC),
                &h,
                &[],
            );
            let mut cap = Capture(None);
            d.handler.handle_frame(&f, d.now_ns, &mut cap);
            let handle = cap.0.context("ALLOC answered nothing")?;
            ensure!(!handle.is_none(), "ALLOC failed");
            pages.push(handle);
        }
        let data = vec![0x5au8; PAGE_SIZE];
        for (i, &p) in pages.iter().enumerate() {
            let op = ops[i % ops.len()];
            let (h, payload): (BbRepr, &[u8]) = match op {
                Opcode::READ => (range(0, PAGE_SIZE as u16), &[]),
                Opcode::WRITE => (range(0, PAGE_SIZE as u16), &data),
                Opcode::FETCH_ADD => (
                    BbRepr {
                        operand0: 1,
                        ..range(0, 8)
                    },
                    &[],
                ),
                other => bail!("{other:?} is not in the benchmark"),
            };
            let dst = RemoteAddr::new(NetPrefix::DEFAULT, HOST, p, op, OpFlags::NONE);
            d.frames
                .push(frame(dst, &BbRepr { request_id: 1, ..h }, payload));
        }
        Ok(d)
    }

    /// Runs requests until `stop`; returns how many.
    fn run(&mut self, stop: &AtomicBool) -> u64 {
        let mut n = 0u64;
        let mut i = 0usize;
        let len = self.frames.len();
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..256 {
                let f = &mut self.frames[i];
                if f[OPCODE_AT] == Opcode::FETCH_ADD.0 {
                    // A new request each time (a retransmission would be answered from the
                    // session instead): the next slot and sequence, checksum patched.
                    let c = self.fetch_adds;
                    self.fetch_adds += 1;
                    let slot = c % SESSION_SLOTS as u64;
                    set_request_id(
                        f,
                        (c / SESSION_SLOTS as u64 + 2) << SESSION_SLOT_BITS | slot,
                    );
                }
                let owner = request_shard(f, self.shards);
                std::hint::black_box(owner);
                self.handler.handle_frame(f, self.now_ns, &mut self.sink);
                i = if i + 1 == len { 0 } else { i + 1 };
                n += 1;
            }
            self.now_ns += 1_000;
        }
        n
    }
}

/// The destination address's opcode byte (frame bytes 38..54 are the destination).
const OPCODE_AT: usize = 14 + 24 + 14;
/// The BlueBridge header's request id (frame bytes 70..78) and the UDP checksum (60..62).
const REQUEST_ID_AT: usize = 62 + 8;
const UDP_CHECKSUM_AT: usize = 60;

/// Rewrites a frame's request id, updating its UDP checksum incrementally (RFC 1624).
fn set_request_id(f: &mut [u8], id: u64) {
    let old: [u8; 8] = f[REQUEST_ID_AT..REQUEST_ID_AT + 8].try_into().expect("8");
    let new = id.to_be_bytes();
    let mut sum = u32::from(!u16::from_be_bytes([
        f[UDP_CHECKSUM_AT],
        f[UDP_CHECKSUM_AT + 1],
    ]));
    for k in (0..8).step_by(2) {
        sum += u32::from(!u16::from_be_bytes([old[k], old[k + 1]]));
        sum += u32::from(u16::from_be_bytes([new[k], new[k + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut c = !(sum as u16);
    if c == 0 {
        c = 0xffff;
    }
    f[UDP_CHECKSUM_AT..UDP_CHECKSUM_AT + 2].copy_from_slice(&c.to_be_bytes());
    f[REQUEST_ID_AT..REQUEST_ID_AT + 8].copy_from_slice(&new);
}

fn range(offset: u16, length: u16) -> BbRepr {
    BbRepr {
        count: 1,
        offset,
        length,
        ..BbRepr::default()
    }
}

/// Keeps the handle an ALLOC reply carries.
struct Capture(Option<PageHandle>);

impl FrameSink for Capture {
    fn send(&mut self, ep: &Endpoints, header: &BbRepr, _payload: &[u8]) -> bool {
        if header.status.is_ok()
            && let Ok(a) = RemoteAddr::from_ipv6(ep.src, NetPrefix::DEFAULT)
        {
            self.0 = Some(a.handle());
        }
        true
    }
}

/// Runs `shards` drivers on their own pinned threads for `seconds`; returns requests/s and
/// the drivers' errors (replies with a status other than OK must be none).
fn measure(a: &Args, shards: usize, ops: &[Opcode]) -> Result<(f64, u64)> {
    let counters = Arc::new(HostCounters::new(shards));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(std::sync::Barrier::new(shards + 1));
    let mut threads = Vec::new();
    for s in 0..shards {
        let mut d = Driver::new(s, counters.clone(), a, ops)?;
        let (stop, ready) = (stop.clone(), ready.clone());
        let core = a.cores[s % a.cores.len()];
        threads.push(std::thread::spawn(move || {
            let pinned = bluebridge_xsk::busy_poll_thread(Some(core), false).is_ok();
            ready.wait();
            let t = Instant::now();
            let n = d.run(&stop);
            (n, t.elapsed(), pinned)
        }));
    }
    ready.wait();
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut rate = 0.0;
    for t in threads {
        let (n, dt, pinned) = t.join().map_err(|_| anyhow::anyhow!("a driver panicked"))?;
        ensure!(pinned, "could not pin a thread to its core (--cores)");
        rate += n as f64 / dt.as_secs_f64();
    }
    let errors = counters.total().errors();
    Ok((rate, errors))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        a.seconds.is_finite() && a.seconds > 0.0,
        "--seconds must be a positive number"
    );
    ensure!(!a.cores.is_empty(), "--cores needs at least one CPU");
    ensure!(
        a.mix.len() == 3 && a.mix.iter().sum::<u32>() > 0,
        "--mix is three counts: READ,WRITE,FETCH_ADD"
    );
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    for &c in &a.cores {
        ensure!(
            c < cpus,
            "--cores: CPU {c} is not available here ({cpus} CPUs)"
        );
    }
    let mut mix = Vec::new();
    for (op, n) in [Opcode::READ, Opcode::WRITE, Opcode::FETCH_ADD]
        .into_iter()
        .zip(&a.mix)
    {
        mix.extend(std::iter::repeat_n(op, *n as usize));
    }
    let (mut ones, mut twos) = (Vec::new(), Vec::new());
    for _ in 0..a.repeats {
        let (one, e1) = measure(&a, 1, &mix)?;
        let (two, e2) = measure(&a, 2, &mix)?;
        ensure!(
            e1 + e2 == 0,
            "{} requests were answered with an error",
            e1 + e2
        );
        ones.push(one);
        twos.push(two);
    }
    let (one, two) = (median(&ones), median(&twos));
    let ratio = two / one;
    println!("scaling: 1 shard {one:.0} ops/s, 2 shards {two:.0} ops/s, ratio {ratio:.2}");
    if a.repeats > 1 {
        println!(
            "  (medians of {}; ratios of the pairs: {})",
            a.repeats,
            ones.iter()
                .zip(&twos)
                .map(|(o, t)| format!("{:.2}", t / o))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut costs = Vec::new();
    for op in [Opcode::READ, Opcode::WRITE, Opcode::FETCH_ADD] {
        let short = Args {
            seconds: a.seconds / 2.0,
            ..a.clone()
        };
        let (r, e) = measure(&short, 1, &[op])?;
        ensure!(e == 0, "{op:?}: {e} errors");
        costs.push((op, 1e9 / r));
    }
    println!(
        "cost per request (one core): {}",
        costs
            .iter()
            .map(|(op, ns)| format!("{op:?} {ns:.0} ns"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "seconds": a.seconds,
            "cores": a.cores,
            "pages_per_shard": a.pages,
            "mix": {"read": a.mix[0], "write": a.mix[1], "fetch_add": a.mix[2]},
            "ops_per_s": {"1": one, "2": two},
            "runs": {"1": ones, "2": twos},
            "ratio": ratio,
            "ns_per_request": costs.iter().map(|(op, ns)| (format!("{op:?}"), *ns)).collect::<std::collections::BTreeMap<_, _>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
