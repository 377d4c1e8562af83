//! The paging benchmark's numbers: per-fault breakdowns (the BlueBridge paper's Figures 4
//! and 5) summarised as median, p95 and mean per component, and their report.

use serde::{Deserialize, Serialize};

/// One fault, in nanoseconds per component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultSample {
    /// From the access to the handler reading the fault.
    pub enter_ns: u64,
    /// Locating the page (the directory round trip, when there is one).
    pub directory_ns: u64,
    /// Getting the data (the READ, or the disk read).
    pub data_ns: u64,
    /// Installing the page, waking the thread, and the access completing.
    pub exit_ns: u64,
}

impl FaultSample {
    /// The whole fault, access to access.
    pub fn total_ns(&self) -> u64 {
        self.enter_ns + self.directory_ns + self.data_ns + self.exit_ns
    }
}

/// Median, 95th percentile and mean of one component, µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Median.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Summary {
    /// Of `ns` (nearest-rank percentiles over the exact samples).
    pub fn of(mut ns: Vec<u64>) -> Summary {
        if ns.is_empty() {
            return Summary::default();
        }
        ns.sort_unstable();
        let rank = |q: f64| ns[((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len()) - 1];
        Summary {
            p50_us: rank(0.5) as f64 / 1000.0,
            p95_us: rank(0.95) as f64 / 1000.0,
            mean_us: ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1000.0,
        }
    }
}

/// One kind of fault measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Variant {
    /// Short name (`bluebridge`, `remote-ds`, `disk-direct`, ...).
    pub name: String,
    /// What it is.
    pub description: String,
    /// Faults measured.
    pub faults: usize,
    /// The whole fault.
    pub total: Summary,
    /// Access → handler.
    pub enter: Summary,
    /// Directory step.
    pub directory: Summary,
    /// Data.
    pub data: Summary,
    /// Install, wake, return.
    pub exit: Summary,
}

impl Variant {
    /// Summarises `samples`.
    pub fn new(name: &str, description: &str, samples: &[FaultSample]) -> Variant {
        let col = |f: fn(&FaultSample) -> u64| Summary::of(samples.iter().map(f).collect());
        Variant {
            name: name.to_owned(),
            description: description.to_owned(),
            faults: samples.len(),
            total: col(FaultSample::total_ns),
            enter: col(|s| s.enter_ns),
            directory: col(|s| s.directory_ns),
            data: col(|s| s.data_ns),
            exit: col(|s| s.exit_ns),
        }
    }
}

/// The paper's fault latencies (µs) this benchmark is compared with.
pub const PAPER_FAULTS: [(&str, f64); 2] = [
    ("remote without directory service, RDMA", 22.1),
    ("local disk", 24.3),
];

/// The paging benchmark's JSON document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PagingReport {
    /// Settings.
    pub config: serde_json::Value,
    /// Machine.
    pub environment: serde_json::Value,
    /// One entry per kind of fault.
    pub variants: Vec<Variant>,
    /// The first write to a clean resident page (a write-protect fault), if measured.
    #[serde(default)]
    pub first_write: Option<Summary>,
    /// The scans of a region larger than its budget, if measured.
    #[serde(default)]
    pub scans: Option<ScanReport>,
}

/// One workload run in local memory and in a `RemoteRegion`, with the region's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// What it is.
    pub name: String,
    /// Pages it covers.
    pub pages: usize,
    /// The region's resident budget, pages.
    pub resident_pages: usize,
    /// Time in local memory.
    pub local_ms: f64,
    /// Time in the region.
    pub remote_ms: f64,
    /// Missing-page faults taken.
    pub faults: u64,
    /// Pages fetched (by their faults or prefetched).
    #[serde(default)]
    pub fetches: u64,
    /// Pages prefetched.
    pub prefetches: u64,
    /// Prefetched pages used.
    pub prefetch_hits: u64,
    /// Prefetched pages evicted unused.
    pub prefetch_wasted: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Dirty pages written back.
    pub writebacks: u64,
}

impl Workload {
    /// Remote time over local time.
    pub fn ratio(&self) -> f64 {
        self.remote_ms / self.local_ms
    }
}

/// Workloads as a Markdown table.
pub fn workload_table(ws: &[Workload]) -> String {
    let mut t = String::from(
        "| workload | pages (resident) | local ms | remote ms | remote / local | faults | prefetched (hits, wasted) | evictions | write-backs |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for w in ws {
        t += &format!(
            "| {} | {} ({}) | {:.1} | {:.1} | {:.1}× | {} | {} ({}, {}) | {} | {} |\n",
            w.name,
            w.pages,
            w.resident_pages,
            w.local_ms,
            w.remote_ms,
            w.ratio(),
            w.faults,
            w.prefetches,
            w.prefetch_hits,
            w.prefetch_wasted,
            w.evictions,
            w.writebacks
        );
    }
    t
}

/// A sequential and a random scan of a region four times its resident budget, next to the
/// READ rates of the same client in the same run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScanReport {
    /// One READ at a time: latency.
    pub read_window1: Summary,
    /// READs kept `pipeline_window` in flight: pages per second.
    pub pipelined_reads_per_s: f64,
    /// Whole-page WRITEs kept `pipeline_window` in flight: pages per second.
    #[serde(default)]
    pub pipelined_writes_per_s: f64,
    /// The window of that rate.
    pub pipeline_window: usize,
    /// Every page read in order, whole.
    pub sequential: Workload,
    /// One word of every page, in a shuffled order.
    pub random: Workload,
    /// The random scan's accesses that took a missing-page fault: latency.
    pub random_fault: Summary,
}

impl ScanReport {
    /// The least time `w`'s transfers (its fetches and write-backs) take at this run's pipelined
    /// READ and WRITE rates, ms: what paging costs before the work itself.
    pub fn transfer_floor_ms(&self, w: &Workload) -> f64 {
        1e3 * (w.fetches as f64 / self.pipelined_reads_per_s
            + w.writebacks as f64 / self.pipelined_writes_per_s)
    }

    /// The sequential scan's pages per second.
    pub fn sequential_pages_per_s(&self) -> f64 {
        self.sequential.pages as f64 / (self.sequential.remote_ms / 1e3)
    }

    /// The lines comparing the scans with the READ rates (the targets of docs/paging.md).
    pub fn summary(&self) -> String {
        format!(
            "pipelined WRITEs of whole pages: {:.0} pages/s (window {})\n\
             sequential scan: {:.0} pages/s = {:.2}× the pipelined READ rate ({:.0} pages/s, window {})\n\
             random scan: fault p50 {:.2} µs = {:.2}× a window-1 READ (p50 {:.2} µs)\n",
            self.pipelined_writes_per_s,
            self.pipeline_window,
            self.sequential_pages_per_s(),
            self.sequential_pages_per_s() / self.pipelined_reads_per_s,
            self.pipelined_reads_per_s,
            self.pipeline_window,
            self.random_fault.p50_us,
            self.random_fault.p50_us / self.read_window1.p50_us,
            self.read_window1.p50_us
        )
    }
}

impl PagingReport {
    /// The variants as a Markdown table (µs; components are medians).
    pub fn table(&self) -> String {
        let mut t = String::from(
            "| variant | total p50 / p95 µs | enter handler | directory | get data | install + return |\n|---|---|---|---|---|---|\n",
        );
        for v in &self.variants {
            t += &format!(
                "| {} | {:.2} / {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                v.name,
                v.total.p50_us,
                v.total.p95_us,
                v.enter.p50_us,
                v.directory.p50_us,
                v.data.p50_us,
                v.exit.p50_us
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_of_known_samples() {
        let s = Summary::of((1..=100).map(|us| us * 1000).collect());
        assert_eq!((s.p50_us, s.p95_us), (50.0, 95.0));
        assert!((s.mean_us - 50.5).abs() < 1e-9);
        assert_eq!(Summary::of(vec![]), Summary::default());
        let samples: Vec<FaultSample> = (1..=20)
            .map(|i| FaultSample {
                enter_ns: 1000,
                directory_ns: 0,
                data_ns: i * 1000,
                exit_ns: 2000,
            })
            .collect();
        let v = Variant::new("x", "test", &samples);
        assert_eq!(v.faults, 20);
        assert_eq!(v.data.p50_us, 10.0);
        assert_eq!(v.total.p50_us, 13.0);
        assert_eq!(v.total.p95_us, 22.0);
        assert_eq!(v.enter.p95_us, 1.0);
    }
}
