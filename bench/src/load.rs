//! Load threads: each pinned, with its own transport, client and share of the working set,
//! running the phases (closed loop, or one open-loop rate each) in lock-step with the others
//! so a phase's parts can be merged into one run.

use std::collections::BTreeMap;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bluebridge_bench::{Access, Arrival, Latencies, Mix, Schedule, op_label};
use bluebridge_client::{AnyTransport, Client, Connect, EngineConfig, Request, SharedSteer};
use bluebridge_proto::{HostId, NetPrefix, Opcode, RemoteAddr};
use rand::{RngExt, SeedableRng};

/// What every thread runs (read-only, shared).
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) connect: Connect,
    pub(crate) rto: Duration,
    pub(crate) retries: u32,
    pub(crate) cores: Vec<usize>,
    pub(crate) host: HostId,
    pub(crate) prefix: NetPrefix,
    pub(crate) mix: Mix,
    pub(crate) access: Access,
    /// Pages each thread allocates (its share of the working set).
    pub(crate) pages: usize,
    pub(crate) payload: u16,
    pub(crate) window: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) arrival: Arrival,
    pub(crate) warmup: Duration,
    pub(crate) measure: Duration,
}

/// One phase's load.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Load {
    /// `window` requests always in flight.
    Closed,
    /// Requests at this rate per thread, timed from their intended send time.
    Open(f64),
}

/// One thread's measurements of one phase.
#[derive(Debug, Default)]
pub(crate) struct Part {
    pub(crate) lat: Latencies,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) done: u64,
    pub(crate) unsent: u64,
    pub(crate) retransmits: u64,
    pub(crate) timeouts: u64,
    pub(crate) inline_sent: u64,
    pub(crate) inline_served: u64,
    pub(crate) late_replies: u64,
    pub(crate) tx_dropped: u64,
    /// The phase ended early: no reply for [`SILENCE`].
    pub(crate) cut_short: bool,
}

impl Part {
    /// Adds another thread's part.
    pub(crate) fn merge(&mut self, o: Part) {
        self.lat.merge(&o.lat);
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.done += o.done;
        self.unsent += o.unsent;
        self.retransmits += o.retransmits;
        self.timeouts += o.timeouts;
        self.inline_sent += o.inline_sent;
        self.inline_served += o.inline_served;
        self.late_replies += o.late_replies;
        self.tx_dropped += o.tx_dropped;
        self.cut_short |= o.cut_short;
    }
}

/// The running threads of one transport, each waiting for the next phase.
pub(crate) struct Group {
    threads: Vec<(JoinHandle<Result<()>>, mpsc::Sender<Load>)>,
    parts: mpsc::Receiver<Part>,
}

/// Set by SIGINT/SIGTERM once [`catch_interrupts`] ran: phases stop early, and the threads
/// free their working sets before the program exits.
static INTERRUPTED: std::sync::LazyLock<Arc<std::sync::atomic::AtomicBool>> =
    std::sync::LazyLock::new(Default::default);

/// Turns Ctrl-C (and SIGTERM) into a request to stop cleanly (see [`interrupted`]).
pub(crate) fn catch_interrupts() -> Result<()> {
    bluebridge_xsk::cli::stop_on_signals(&INTERRUPTED).context("installing signal handlers")
}

/// Whether the user asked to stop.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

impl Drop for Group {
    /// Every way out (an error, `?`, Ctrl-C) lets the threads free their working sets first.
    fn drop(&mut self) {
        for (t, cmd) in self.threads.drain(..) {
            drop(cmd);
            let _ = t.join();
        }
    }
}

/// Opens a client on `queue` (see [`Connect::open_on`]) with the plan's timeouts.
pub(crate) fn client(
    plan: &Plan,
    queue: u32,
    shared: Option<&SharedSteer>,
) -> Result<Client<AnyTransport>> {
    let (t, mut ec): (AnyTransport, EngineConfig) =
        plan.connect.open_on(queue, shared).with_context(|| {
            format!(
                "opening the {:?} transport on {} queue {queue}",
                plan.connect.kind, plan.connect.ifname
            )
        })?;
    ec.rto = plan.rto;
    ec.retries = plan.retries;
    Ok(Client::new(ec, t))
}

impl Group {
    /// Starts `n` threads, one after the other (the first attaches the steering program the
    /// others join); returns once every one has its transport open and its working set
    /// allocated, or with the first error after the started ones have freed theirs.
    pub(crate) fn start(plan: &Arc<Plan>, n: usize) -> Result<Group> {
        let (part_tx, parts) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Option<SharedSteer>>>();
        let mut group = Group {
            threads: Vec::new(),
            parts,
        };
        let mut shared: Option<SharedSteer> = None;
        for i in 0..n {
            let (plan, ready, parts, steer) = (
                plan.clone(),
                ready_tx.clone(),
                part_tx.clone(),
                shared.clone(),
            );
            let (cmd_tx, cmd_rx) = mpsc::channel();
            let t = std::thread::Builder::new()
                .name(format!("bb-load-{i}"))
                .spawn(move || worker(i, &plan, steer, &ready, &cmd_rx, &parts))
                .context("spawning a load thread")?;
            group.threads.push((t, cmd_tx));
            let started = ready_rx
                .recv()
                .map_err(|_| anyhow!("load thread {i} died while starting"))
                .and_then(|r| r);
            match started {
                Ok(steer) => shared = shared.or(steer),
                Err(e) => {
                    // The started threads see their command channel close, free and exit.
                    let _ = group.finish();
                    return Err(e.context(format!("starting load thread {i}")));
                }
            }
        }
        Ok(group)
    }

    /// Runs one phase on every thread at once; `tick` is called about every 200 ms meanwhile.
    pub(crate) fn run(&self, load: Load, mut tick: impl FnMut()) -> Result<Part> {
        for (_, cmd) in &self.threads {
            cmd.send(load)
                .map_err(|_| anyhow!("a load thread has exited"))?;
        }
        let mut total = Part::default();
        let mut got = 0;
        while got < self.threads.len() {
            match self.parts.recv_timeout(Duration::from_millis(200)) {
                Ok(p) => {
                    total.merge(p);
                    got += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => tick(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(anyhow!("a load thread died during the run"));
                }
            }
        }
        Ok(total)
    }

    /// Lets the threads free their working sets and exit; the first error any of them had.
    pub(crate) fn finish(mut self) -> Result<()> {
        let mut first = Ok(());
        for (t, cmd) in std::mem::take(&mut self.threads) {
            drop(cmd);
            let r = t.join().map_err(|_| anyhow!("a load thread panicked"))?;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

fn worker(
    i: usize,
    plan: &Plan,
    steer: Option<SharedSteer>,
    ready: &mpsc::Sender<Result<Option<SharedSteer>>>,
    commands: &mpsc::Receiver<Load>,
    parts: &mpsc::Sender<Part>,
) -> Result<()> {
    let set_up = || -> Result<(Client<AnyTransport>, Vec<RemoteAddr>)> {
        let core = (!plan.cores.is_empty()).then(|| plan.cores[i % plan.cores.len()]);
        bluebridge_xsk::busy_poll_thread(core, true).context("setting up the load thread")?;
        let mut c = client(plan, i as u32, steer.as_ref())?;
        let mut pages = Vec::with_capacity(plan.pages);
        while pages.len() < plan.pages {
            let n = (plan.pages - pages.len()).min(128) as u16;
            let got = if interrupted() {
                Err(anyhow!("interrupted"))
            } else {
                c.alloc_bulk(plan.host, n, false)
                    .context("allocating the working set")
            };
            match got {
                Ok(more) => pages.extend(more),
                Err(e) => {
                    // What was allocated before the failure goes back too.
                    let _ = c.free_all(&pages);
                    return Err(e);
                }
            }
        }
        Ok((c, pages))
    };
    let (mut c, pages) = match set_up() {
        Ok((mut c, pages)) => {
            let steer = c.transport_mut().xdp_mut().map(|x| x.steer());
            let _ = ready.send(Ok(steer));
            (c, pages)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed + i as u64);
    let mut cut_short = false;
    while let Ok(load) = commands.recv() {
        let part = run_phase(&mut c, plan, &pages, load, &mut rng);
        cut_short |= part.cut_short;
        if parts.send(part).is_err() {
            break;
        }
    }
    let failed = c.free_all(&pages);
    match (failed.first(), cut_short) {
        (None, _) => Ok(()),
        (Some((_, e)), true) => Err(anyhow!(
            "the server stopped answering (no reply for {SILENCE:?}: run cut short); {} of {} \
             pages could not be freed ({e}); a server that still runs frees them once it has \
             not heard from this client for its grace period (a restarted one has none)",
            failed.len(),
            pages.len()
        )),
        (Some((p, e)), false) => Err(anyhow!("freeing the working set: {p}: {e}")),
    }
}

/// Tags carry the operation (low 8 bits) and the intended send time, ns after the phase's
/// start (the rest), back with the completion.
fn tag(op: Opcode, at_ns: u64) -> u64 {
    (at_ns << 8) | u64::from(op.0)
}

fn untag(tag: u64) -> (Opcode, u64) {
    (Opcode(tag as u8), tag >> 8)
}

fn request(
    plan: &Plan,
    pages: &[RemoteAddr],
    payload: &[u8],
    seg: u16,
    rng: &mut rand::rngs::SmallRng,
) -> Request {
    let op = plan.mix.pick(rng.random::<f64>());
    let page = pages[plan.access.sample(rng)];
    match op {
        Opcode::READ => Request::new(op, page).range(0, plan.payload),
        Opcode::WRITE | Opcode::WRITE_BLIND => {
            // One request frame per segment: a larger write is several requests.
            let len = plan.payload.min(seg);
            Request::new(op, page)
                .range(0, len)
                .payload(payload[..usize::from(len)].to_vec())
        }
        Opcode::FETCH_ADD | Opcode::CAS => {
            let mut r = Request::new(op, page).range(8 * rng.random_range(0..8u16), 8);
            r.operand0 = 1;
            r
        }
        _ => Request::new(
            Opcode::PING,
            RemoteAddr::host_op(plan.prefix, plan.host, Opcode::PING),
        ),
    }
}

/// How long a thread waits without any reply before it gives up on the run.
const SILENCE: Duration = Duration::from_secs(2);

/// One phase: warm-up, then the measured window; requests whose (intended) send time falls in
/// the window are the ones counted. Open loop keeps sending what fell due in the window for at
/// most one more second after it, then counts the rest as unsent.
fn run_phase(
    c: &mut Client<AnyTransport>,
    plan: &Plan,
    pages: &[RemoteAddr],
    load: Load,
    rng: &mut rand::rngs::SmallRng,
) -> Part {
    let payload = vec![0xa5u8; usize::from(plan.payload)];
    let seg = c.max_request_data();
    let warm_ns = plan.warmup.as_nanos() as u64;
    let end_ns = (plan.warmup + plan.measure).as_nanos() as u64;
    let grace_ns = end_ns + plan.measure.min(Duration::from_secs(1)).as_nanos() as u64;
    let (mut schedule, cap) = match load {
        Load::Closed => (None, plan.window),
        Load::Open(rate) => (
            Some(Schedule::new(plan.arrival, rate).expect("rate checked")),
            plan.max_in_flight,
        ),
    };
    let mut part = Part::default();
    let mut stats_at = None;
    let start = Instant::now();
    let mut last_answer = Instant::now();
    loop {
        let now_ns = start.elapsed().as_nanos() as u64;
        let stopping = interrupted();
        if stopping && c.in_flight() == 0 {
            *part.errors.entry("interrupted".into()).or_default() += 1;
            break;
        }
        if last_answer.elapsed() > SILENCE && c.in_flight() > 0 {
            // The server died or the path is gone: say so now rather than at the scheduled end.
            *part
                .errors
                .entry(format!("no reply for {SILENCE:?}: run cut short"))
                .or_default() += 1;
            part.cut_short = true;
            break;
        }
        if stats_at.is_none() && now_ns >= warm_ns {
            stats_at = Some(c.stats());
        }
        match &mut schedule {
            None if now_ns < end_ns && !stopping => {
                while c.in_flight() < cap {
                    let req = request(plan, pages, &payload, seg, rng);
                    let op = req.op;
                    c.submit(req.tag(tag(op, start.elapsed().as_nanos() as u64)));
                }
            }
            Some(s) if now_ns < grace_ns && !stopping => {
                while s.due_ns() <= now_ns.min(end_ns - 1) && c.in_flight() < cap {
                    let due = s.advance(rng);
                    let req = request(plan, pages, &payload, seg, rng);
                    let op = req.op;
                    c.submit(req.tag(tag(op, due)));
                }
            }
            _ => {}
        }
        while let Some(comp) = c.poll() {
            let (op, at_ns) = untag(comp.tag);
            if comp.result.is_ok() && op != Opcode::WRITE_BLIND {
                last_answer = Instant::now();
            }
            if at_ns < warm_ns {
                continue;
            }
            part.done += 1;
            let ns = match load {
                Load::Closed => comp.latency.as_nanos() as u64,
                Load::Open(_) => (start.elapsed().as_nanos() as u64).saturating_sub(at_ns),
            };
            match comp.result {
                // A blind write completes when sent: counted, no latency to report.
                Ok(_) if op == Opcode::WRITE_BLIND => {}
                Ok(r) => {
                    part.lat.record(op_label(op), ns);
                    c.recycle(r.data);
                }
                Err(e) => *part.errors.entry(format!("{e}")).or_default() += 1,
            }
        }
        let sending = match &schedule {
            None => now_ns < end_ns,
            Some(s) => now_ns < grace_ns && (now_ns < end_ns || s.due_ns() < end_ns),
        };
        if !sending && c.in_flight() == 0 {
            break;
        }
    }
    if let Some(mut s) = schedule {
        // What fell due in the window but never left: the load outran the system.
        while s.due_ns() < end_ns {
            s.advance(rng);
            part.unsent += 1;
        }
    }
    let (before, after) = (stats_at.unwrap_or_default(), c.stats());
    part.retransmits = after.retransmits - before.retransmits;
    part.timeouts = after.timeouts - before.timeouts;
    part.inline_sent = after.inline_sent - before.inline_sent;
    part.inline_served = after.inline_served - before.inline_served;
    part.late_replies = after.stray - before.stray;
    part.tx_dropped = after.tx_dropped - before.tx_dropped;
    part
}
