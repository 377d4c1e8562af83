//! The bench client's pieces that do not touch the network: operation mixes, access
//! distributions, latency statistics and the JSON report.
#![forbid(unsafe_code)]

pub mod dsm;
pub mod paging;
pub mod plot;
#[cfg(feature = "load")]
pub mod rack_host;

use std::collections::BTreeMap;
use std::str::FromStr;

use bluebridge_proto::Opcode;
use hdrhistogram::Histogram;
use rand::RngExt;
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};

/// A bad `--mix`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MixError {
    /// Not `op=weight`.
    #[error("`{0}` is not OP=WEIGHT (e.g. read=90)")]
    Syntax(String),
    /// Not an operation the bench drives.
    #[error("unknown operation `{0}`; known: {known}", known = Mix::KNOWN.join(", "))]
    UnknownOp(String),
    /// All weights zero.
    #[error("the weights add up to zero")]
    Empty,
}

/// Operations and their weights, e.g. `read=90,write=10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    ops: Vec<(Opcode, u32)>,
    total: u32,
}

impl Mix {
    /// Operation names `--mix` accepts.
    pub const KNOWN: [&'static str; 6] =
        ["read", "write", "fetch_add", "cas", "ping", "write_blind"];

    fn op(name: &str) -> Option<Opcode> {
        Some(match name {
            "read" => Opcode::READ,
            "write" => Opcode::WRITE,
            "write_blind" => Opcode::WRITE_BLIND,
            "fetch_add" => Opcode::FETCH_ADD,
            "cas" => Opcode::CAS,
            "ping" => Opcode::PING,
            _ => return None,
        })
    }

    /// Picks an operation for a uniform `roll` in `0..1`.
    pub fn pick(&self, roll: f64) -> Opcode {
        let mut at = (roll * f64::from(self.total)) as u32;
        for &(op, w) in &self.ops {
            if at < w {
                return op;
            }
            at -= w;
        }
        self.ops.last().expect("non-empty").0
    }

    /// The operations.
    pub fn ops(&self) -> impl Iterator<Item = Opcode> + '_ {
        self.ops.iter().map(|(o, _)| *o)
    }
}

/// As written on the command line: `read=90,write=10`.
impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (op, w)) in self.ops.iter().enumerate() {
            let name = Mix::KNOWN
                .iter()
                .find(|n| Mix::op(n) == Some(*op))
                .expect("every op has a name");
            write!(f, "{}{name}={w}", if i > 0 { "," } else { "" })?;
        }
        Ok(())
    }
}

impl FromStr for Mix {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ops = Vec::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (name, w) = part
                .split_once('=')
                .ok_or_else(|| MixError::Syntax(part.into()))?;
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| MixError::Syntax(part.into()))?;
            let op =
                Self::op(name.trim()).ok_or_else(|| MixError::UnknownOp(name.trim().into()))?;
            if w > 0 {
                ops.push((op, w));
            }
        }
        let total = ops.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err(MixError::Empty);
        }
        Ok(Mix { ops, total })
    }
}

/// Which page of the working set a request goes to.
#[derive(Debug, Clone)]
pub enum Access {
    /// Every page equally likely.
    Uniform(usize),
    /// Zipf-distributed over the pages (rank 1 the hottest).
    Zipf(Zipf<f64>),
}

impl Access {
    /// Over `pages` pages; `zipf_s` 0 means uniform.
    pub fn new(pages: usize, zipf_s: f64) -> Result<Self, String> {
        if pages == 0 {
            return Err("the working set needs at least one page".into());
        }
        if zipf_s == 0.0 {
            return Ok(Access::Uniform(pages));
        }
        Zipf::new(pages as f64, zipf_s)
            .map(Access::Zipf)
            .map_err(|e| format!("zipf exponent {zipf_s}: {e}"))
    }

    /// A page index.
    pub fn sample(&self, rng: &mut impl rand::Rng) -> usize {
        match self {
            Access::Uniform(n) => rng.random_range(0..*n),
            Access::Zipf(z) => z.sample(rng) as usize - 1,
        }
    }
}

/// How open-loop requests are spaced in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Exactly 1/rate apart.
    Constant,
    /// Exponentially distributed gaps with mean 1/rate (a Poisson process).
    Poisson,
}

/// The intended send times of an open-loop load: offsets in nanoseconds from its start.
/// Latency is measured from these, not from when a request actually left, so a stall that
/// delays sending is charged to every request it delayed (no coordinated omission).
#[derive(Debug, Clone)]
pub struct Schedule {
    arrival: Arrival,
    gap_ns: f64,
    exp: rand_distr::Exp1,
    next_ns: f64,
}

impl Schedule {
    /// `rate` requests per second.
    pub fn new(arrival: Arrival, rate: f64) -> Result<Self, String> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!(
                "rate {rate}: must be a positive number of requests per second"
            ));
        }
        Ok(Schedule {
            arrival,
            gap_ns: 1e9 / rate,
            exp: rand_distr::Exp1,
            next_ns: 0.0,
        })
    }

    /// When the next request is due, ns from the start (peek; does not advance).
    pub fn due_ns(&self) -> u64 {
        self.next_ns as u64
    }

    /// Takes the due request's time and schedules the one after it.
    pub fn advance(&mut self, rng: &mut impl rand::Rng) -> u64 {
        let due = self.due_ns();
        self.next_ns += match self.arrival {
            Arrival::Constant => self.gap_ns,
            Arrival::Poisson => {
                let e: f64 = self.exp.sample(rng);
                e * self.gap_ns
            }
        };
        due
    }
}

/// Latency percentiles of one operation, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Completed operations.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// Kernel threads known to steal a busy-polling CPU for a millisecond at a time (DAMON's
/// `kdamond.N` samples memory access on this VM kind), as `name (pid N)`: a benchmark reports
/// them with its environment, since their stalls land in the latency tail.
pub fn noisy_kernel_threads() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let comm = comm.trim();
            comm.starts_with("kdamond")
                .then(|| format!("{comm} (pid {pid})"))
        })
        .collect();
    found.sort();
    found
}

/// The BlueBridge paper's Table 1, µs: (operation, median of its UDP implementation, median of
/// its RDMA implementation). UPDATE is acquire + commit; ALLOC and FREE are the paper's CREATE
/// and DELETE.
pub const PAPER_TABLE1: [(&str, f64, f64); 4] = [
    ("ALLOC", 34.9, 5.84),
    ("READ", 33.7, 5.92),
    ("UPDATE", 34.2, 5.96),
    ("FREE", 33.0, 5.84),
];

/// The label under which the bare-echo baseline is recorded (not an operation of the protocol).
pub const ECHO: &str = "ECHO";

/// The label of an operation: its protocol name (`READ`, `WRITE`, ...).
pub fn op_label(op: Opcode) -> &'static str {
    op.name().unwrap_or("UNKNOWN")
}

/// Per-operation latency histograms (nanoseconds, 3 significant digits, up to 60 s), keyed by
/// label: an operation's name, or a composite such as `UPDATE` (acquire + commit).
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    by_op: BTreeMap<&'static str, Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

impl Latencies {
    /// Records one operation's latency.
    pub fn record(&mut self, label: &'static str, ns: u64) {
        self.by_op
            .entry(label)
            .or_insert_with(histogram)
            .saturating_record(ns.max(1));
    }

    /// Adds every sample of `other` (another thread's, say).
    pub fn merge(&mut self, other: &Latencies) {
        for (label, h) in &other.by_op {
            self.by_op
                .entry(label)
                .or_insert_with(histogram)
                .add(h)
                .expect("same bounds");
        }
    }

    /// Samples recorded, all labels together.
    pub fn count(&self) -> u64 {
        self.by_op.values().map(Histogram::len).sum()
    }

    /// The `q` quantile over all labels together, in microseconds (0 when empty).
    pub fn overall_quantile_us(&self, q: f64) -> f64 {
        let mut all = histogram();
        for h in self.by_op.values() {
            all.add(h).expect("same bounds");
        }
        if all.is_empty() {
            0.0
        } else {
            all.value_at_quantile(q) as f64 / 1000.0
        }
    }

    /// Percentiles per label.
    pub fn percentiles(&self) -> BTreeMap<String, Percentiles> {
        let us = |ns: u64| ns as f64 / 1000.0;
        self.by_op
            .iter()
            .map(|(op, h)| {
                (
                    (*op).to_owned(),
                    Percentiles {
                        count: h.len(),
                        p50_us: us(h.value_at_quantile(0.5)),
                        p90_us: us(h.value_at_quantile(0.9)),
                        p95_us: us(h.value_at_quantile(0.95)),
                        p99_us: us(h.value_at_quantile(0.99)),
                        p999_us: us(h.value_at_quantile(0.999)),
                        max_us: us(h.max()),
                        mean_us: h.mean() / 1000.0,
                    },
                )
            })
            .collect()
    }

    /// The cumulative distribution per label: `[latency µs, fraction of samples ≤ it]`, one
    /// point per distinct histogram bucket (HdrHistogram's 3-digit precision), at most ~`max`
    /// points (evenly thinned), always ending at the maximum with fraction 1.
    pub fn cdf(&self, max: usize) -> BTreeMap<String, Vec<[f64; 2]>> {
        self.by_op
            .iter()
            .map(|(op, h)| {
                let total = h.len().max(1) as f64;
                let pts: Vec<[f64; 2]> = h
                    .iter_recorded()
                    .map(|v| {
                        [
                            h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
                            v.count_since_last_iteration() as f64,
                        ]
                    })
                    .scan(0.0, |seen, [us, n]| {
                        *seen += n;
                        Some([us, *seen / total])
                    })
                    .collect();
                let step = pts.len().div_ceil(max.max(2));
                let mut thin: Vec<[f64; 2]> = pts.iter().step_by(step.max(1)).copied().collect();
                if let Some(&last) = pts.last()
                    && thin.last() != Some(&last)
                {
                    thin.push(last);
                }
                ((*op).to_owned(), thin)
            })
            .collect()
    }
}

/// One measured run: one transport at one load (closed loop, or one open-loop rate).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// `xdp` or `udp` (the client's transport).
    pub transport: String,
    /// Load threads.
    pub threads: usize,
    /// Open loop: the rate offered, operations per second (all threads); `None` closed loop.
    pub offered_rate: Option<f64>,
    /// Seconds measured (after warm-up).
    pub seconds: f64,
    /// Operations completed per second (achieved).
    pub ops_per_second: f64,
    /// Latency per operation (open loop: from the intended send time).
    pub latency: BTreeMap<String, Percentiles>,
    /// Cumulative latency distribution per operation, `[µs, fraction]` points.
    pub cdf: BTreeMap<String, Vec<[f64; 2]>>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Open loop: requests that fell due in the measured window but could not be sent (the
    /// load outran the system; their latency is unknown and not in the percentiles).
    #[serde(default)]
    pub unsent: u64,
    /// Retransmissions.
    pub retransmissions: u64,
    /// Timeouts.
    pub timeouts: u64,
    /// READs sent INLINE (padded for the server's XDP fast path, docs/protocol.md §6.1).
    #[serde(default)]
    pub inline_sent: u64,
    /// READ replies that came INLINE: answered by the server's XDP program.
    #[serde(default)]
    pub inline_served: u64,
    /// Replies that matched nothing outstanding: the answer to a retransmitted request that
    /// had been answered already, or that came after its request had timed out (the server
    /// or the path was slow, not silent).
    #[serde(default)]
    pub late_replies: u64,
    /// Requests the client's transport could not hand to the kernel (kernel UDP: `sendmmsg`
    /// failed), dropped and sent again after a timeout.
    #[serde(default)]
    pub tx_dropped: u64,
}

impl Run {
    /// The p99 over all operations of the run, µs.
    pub fn p99_us(&self) -> f64 {
        self.overall("p99")
    }

    fn overall(&self, which: &str) -> f64 {
        // Weighted by count, the per-operation p99s bound the overall p99 from above; the
        // largest is what a sweep compares against its target (conservative).
        self.latency
            .values()
            .map(|p| match which {
                "p50" => p.p50_us,
                _ => p.p99_us,
            })
            .fold(0.0, f64::max)
    }

    /// The largest per-operation p50, µs.
    pub fn p50_us(&self) -> f64 {
        self.overall("p50")
    }

    /// Whether an open-loop run kept up with its rate and met `p99_target_us` without errors:
    /// achieved ≥ 95% of offered.
    pub fn meets(&self, p99_target_us: f64) -> bool {
        let kept_up = self
            .offered_rate
            .is_none_or(|r| self.ops_per_second >= 0.95 * r);
        kept_up && self.unsent == 0 && self.errors.is_empty() && self.p99_us() <= p99_target_us
    }
}

/// The JSON document of one invocation: settings, machine, and every run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The command line's settings.
    pub config: serde_json::Value,
    /// Machine and link.
    pub environment: serde_json::Value,
    /// The runs, in the order measured (a sweep: one per rate, per transport).
    pub runs: Vec<Run>,
    /// A sweep's answer per transport: the highest offered rate that met the p99 target
    /// (`None`: no rate did).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub best_rate: BTreeMap<String, Option<f64>>,
}

impl Report {
    /// The (first) run over `transport`.
    pub fn run(&self, transport: &str) -> Option<&Run> {
        self.runs.iter().find(|r| r.transport == transport)
    }

    /// Whether the runs form a rate sweep.
    pub fn is_sweep(&self) -> bool {
        !self.best_rate.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn mixes() {
        let m: Mix = "read=90,write=10".parse().unwrap();
        assert_eq!(m.pick(0.0), Opcode::READ);
        assert_eq!(m.pick(0.899), Opcode::READ);
        assert_eq!(m.pick(0.9), Opcode::WRITE);
        assert_eq!(m.pick(0.999_999), Opcode::WRITE);
        assert_eq!(
            "read=1,cas=0"
                .parse::<Mix>()
                .unwrap()
                .ops()
                .collect::<Vec<_>>(),
            [Opcode::READ]
        );
        assert_eq!("read".parse::<Mix>(), Err(MixError::Syntax("read".into())));
        assert_eq!(
            "read=x".parse::<Mix>(),
            Err(MixError::Syntax("read=x".into()))
        );
        assert_eq!(
            "delete=1".parse::<Mix>(),
            Err(MixError::UnknownOp("delete".into()))
        );
        assert_eq!("read=0".parse::<Mix>(), Err(MixError::Empty));
        assert_eq!(m.to_string(), "read=90,write=10");
    }

    #[test]
    fn percentiles_of_synthetic_latencies() {
        // 1..=10,000 µs, once each: every percentile is known exactly (to HdrHistogram's 0.1%).
        let mut l = Latencies::default();
        for us in 1..=10_000u64 {
            l.record("READ", us * 1000);
        }
        let p = l.percentiles()["READ"];
        assert_eq!(p.count, 10_000);
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(p.p50_us, 5_000.0), "{p:?}");
        assert!(near(p.p90_us, 9_000.0), "{p:?}");
        assert!(near(p.p99_us, 9_900.0), "{p:?}");
        assert!(near(p.p999_us, 9_990.0), "{p:?}");
        assert!(near(p.max_us, 10_000.0), "{p:?}");
        assert!(near(p.mean_us, 5_000.5), "{p:?}");
        // A bimodal distribution: 99% at 5 µs, 1% at 4 ms (a scheduler tick).
        let mut l = Latencies::default();
        for i in 0..100_000u64 {
            l.record("PING", if i % 100 == 0 { 4_000_000 } else { 5_000 });
        }
        let p = l.percentiles()["PING"];
        assert!(near(p.p50_us, 5.0) && near(p.p90_us, 5.0), "{p:?}");
        assert!(near(p.p999_us, 4_000.0) && near(p.max_us, 4_000.0), "{p:?}");
    }

    #[test]
    fn merging_and_cdf() {
        let (mut a, mut b) = (Latencies::default(), Latencies::default());
        for us in 1..=500u64 {
            a.record("READ", us * 1000);
        }
        for us in 501..=1000u64 {
            b.record("READ", us * 1000);
        }
        b.record("WRITE", 7_000);
        a.merge(&b);
        assert_eq!(a.count(), 1001);
        let p = a.percentiles()["READ"];
        assert_eq!(p.count, 1000);
        assert!((p.p50_us - 500.0).abs() <= 0.5, "{p:?}");
        assert!((p.p95_us - 950.0).abs() <= 1.0, "{p:?}");
        let cdf = &a.cdf(50)["READ"];
        assert!(cdf.len() <= 51, "{}", cdf.len());
        assert!(
            cdf.windows(2)
                .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1])
        );
        let last = cdf.last().unwrap();
        assert!(
            (last[0] - 1000.0).abs() <= 1.0 && last[1] == 1.0,
            "{last:?}"
        );
        // The point nearest 250 µs has a quarter of the samples below it.
        let q = cdf
            .iter()
            .min_by(|x, y| (x[0] - 250.0).abs().total_cmp(&(y[0] - 250.0).abs()));
        let q = q.unwrap();
        assert!((q[1] - q[0] / 1000.0).abs() < 0.02, "{q:?}");
        let w = &a.cdf(50)["WRITE"];
        assert!(
            w.len() == 1 && (w[0][0] - 7.0).abs() < 0.01 && w[0][1] == 1.0,
            "{w:?}"
        );
    }

    #[test]
    fn schedules() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut c = Schedule::new(Arrival::Constant, 100_000.0).unwrap();
        let times: Vec<u64> = (0..4).map(|_| c.advance(&mut rng)).collect();
        assert_eq!(times, [0, 10_000, 20_000, 30_000]);
        assert_eq!(c.due_ns(), 40_000);
        // Poisson at 1 M/s: 100,000 gaps average 1 µs; their coefficient of variation is 1.
        let mut p = Schedule::new(Arrival::Poisson, 1e6).unwrap();
        let mut prev = p.advance(&mut rng);
        let gaps: Vec<f64> = (0..100_000)
            .map(|_| {
                let t = p.advance(&mut rng);
                let g = (t - prev) as f64;
                prev = t;
                g
            })
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
        assert!((mean - 1000.0).abs() < 15.0, "{mean}");
        assert!((sd / mean - 1.0).abs() < 0.03, "{sd}");
        assert!(Schedule::new(Arrival::Poisson, 0.0).is_err());
        assert!(Schedule::new(Arrival::Poisson, f64::NAN).is_err());
    }

    #[test]
    fn open_loop_latency_counts_a_stall_for_every_delayed_request() {
        // A server answering in 10 µs that stalls for 50 ms half-way through a 1 s run at
        // 10,000 requests/s. Measured from the intended send time (what the bench does), the
        // 500 requests due during the stall wait up to 50 ms; measured from the actual send,
        // a sender blocked by the stall would see one slow request and hide the rest.
        let mut s = Schedule::new(Arrival::Constant, 10_000.0).unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let (stall_from, stall_to) = (500_000_000u64, 550_000_000u64);
        let mut corrected = Latencies::default();
        let mut naive = Latencies::default();
        let mut free_at = 0u64;
        for _ in 0..10_000 {
            let due = s.advance(&mut rng);
            let start = due.max(free_at);
            let start = if (stall_from..stall_to).contains(&start) {
                stall_to
            } else {
                start
            };
            let done = start + 10_000;
            free_at = done;
            corrected.record("READ", done - due);
            naive.record("READ", done - start);
        }
        let (c, n) = (corrected.percentiles()["READ"], naive.percentiles()["READ"]);
        assert!(n.p99_us <= 10.1 && n.max_us <= 10.1, "{n:?}");
        assert!(c.p99_us >= 20_000.0 && c.max_us >= 49_000.0, "{c:?}");
        assert!(c.p90_us <= 10.1, "{c:?}");
    }

    fn run(transport: &str, offered: Option<f64>, achieved: f64, p99: f64) -> Run {
        let mut latency = BTreeMap::new();
        latency.insert(
            "READ".to_owned(),
            Percentiles {
                count: 1,
                p50_us: p99 / 2.0,
                p90_us: p99,
                p95_us: p99,
                p99_us: p99,
                p999_us: p99,
                max_us: p99,
                mean_us: p99,
            },
        );
        Run {
            transport: transport.into(),
            threads: 1,
            offered_rate: offered,
            seconds: 1.0,
            ops_per_second: achieved,
            latency,
            cdf: BTreeMap::new(),
            errors: BTreeMap::new(),
            unsent: 0,
            retransmissions: 0,
            timeouts: 0,
            inline_sent: 0,
            inline_served: 0,
            late_replies: 0,
            tx_dropped: 0,
        }
    }

    #[test]
    fn sweep_points_meet_or_miss_the_target() {
        assert!(run("xdp", Some(100_000.0), 99_000.0, 20.0).meets(30.0));
        assert!(
            !run("xdp", Some(100_000.0), 90_000.0, 20.0).meets(30.0),
            "fell behind"
        );
        assert!(
            !run("xdp", Some(100_000.0), 100_000.0, 31.0).meets(30.0),
            "too slow"
        );
        let mut e = run("xdp", Some(1.0), 1.0, 1.0);
        e.errors.insert("timeout".into(), 1);
        assert!(!e.meets(30.0), "errors");
        let mut u = run("xdp", Some(1.0), 1.0, 1.0);
        u.unsent = 1;
        assert!(!u.meets(30.0), "unsent");
        let svg = std::env::temp_dir().join(format!("bb-plot-{}.svg", std::process::id()));
        let mut r = Report {
            config: serde_json::Value::Null,
            environment: serde_json::Value::Null,
            runs: vec![
                run("xdp", Some(1e5), 1e5, 10.0),
                run("xdp", Some(2e5), 1.9e5, 40.0),
                run("udp", Some(1e5), 0.9e5, 50.0),
            ],
            best_rate: BTreeMap::new(),
        };
        r.best_rate.insert("xdp".into(), Some(1e5));
        r.best_rate.insert("udp".into(), None);
        plot::write(&r, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("xdp p99") && text.contains("udp p50"));
        let _ = std::fs::remove_file(&svg);
    }

    #[test]
    fn access_distributions() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let u = Access::new(10, 0.0).unwrap();
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            hits[u.sample(&mut rng)] += 1;
        }
        assert!(
            hits.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hits:?}"
        );
        let z = Access::new(1000, 1.0).unwrap();
        let mut hot = 0;
        for _ in 0..100_000 {
            let i = z.sample(&mut rng);
            assert!(i < 1000);
            hot += u32::from(i == 0);
        }
        // Zipf(1) over 1000 ranks: P(rank 1) = 1/H(1000) ≈ 0.1336.
        assert!((12_500..14_300).contains(&hot), "{hot}");
        assert!(Access::new(0, 0.0).is_err());
    }
}
