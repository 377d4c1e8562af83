//! The bench client's pieces that do not touch the network: operation mixes, access
//! distributions, latency statistics and the JSON report.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::str::FromStr;

use bluebridge_proto::Opcode;
use hdrhistogram::Histogram;
use rand::RngExt;
use rand_distr::{Distribution, Zipf};
use serde::Serialize;

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

/// Latency percentiles of one operation, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    /// Completed operations.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// The label under which the bare-echo baseline is recorded (not an opcode of the protocol).
pub const ECHO: Opcode = Opcode(0);

/// Per-operation latency histograms (nanoseconds, 3 significant digits, up to 60 s).
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    by_op: BTreeMap<Opcode, Histogram<u64>>,
}

impl Latencies {
    /// Records one operation's latency.
    pub fn record(&mut self, op: Opcode, ns: u64) {
        let h = self.by_op.entry(op).or_insert_with(|| {
            Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
        });
        h.saturating_record(ns.max(1));
    }

    /// Percentiles per operation.
    pub fn percentiles(&self) -> BTreeMap<String, Percentiles> {
        let us = |ns: u64| ns as f64 / 1000.0;
        self.by_op
            .iter()
            .map(|(op, h)| {
                (
                    if *op == ECHO {
                        "ECHO".to_owned()
                    } else {
                        format!("{op:?}")
                    },
                    Percentiles {
                        count: h.len(),
                        p50_us: us(h.value_at_quantile(0.5)),
                        p90_us: us(h.value_at_quantile(0.9)),
                        p99_us: us(h.value_at_quantile(0.99)),
                        p999_us: us(h.value_at_quantile(0.999)),
                        max_us: us(h.max()),
                        mean_us: h.mean() / 1000.0,
                    },
                )
            })
            .collect()
    }
}

/// The JSON document of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command line's settings.
    pub config: serde_json::Value,
    /// Machine and link.
    pub environment: serde_json::Value,
    /// Seconds measured (after warm-up).
    pub seconds: f64,
    /// Operations completed per second.
    pub ops_per_second: f64,
    /// Latency per operation.
    pub latency: BTreeMap<String, Percentiles>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Retransmissions.
    pub retransmissions: u64,
    /// Timeouts.
    pub timeouts: u64,
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
            l.record(Opcode::READ, us * 1000);
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
            l.record(Opcode::PING, if i % 100 == 0 { 4_000_000 } else { 5_000 });
        }
        let p = l.percentiles()["PING"];
        assert!(near(p.p50_us, 5.0) && near(p.p90_us, 5.0), "{p:?}");
        assert!(near(p.p999_us, 4_000.0) && near(p.max_us, 4_000.0), "{p:?}");
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
