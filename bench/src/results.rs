//! The result file: written by `rama-bench run`, read by `rama-bench report`.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::lsm::LsmComparison;
use crate::machine::Machine;

/// Errors of the harness. Boxed: every failure ends the run with a message.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;
pub type BenchResult<T> = Result<T, BenchError>;

/// Fails with `message` unless `cond` holds (sanity checks of a run).
pub fn ensure(cond: bool, message: impl FnOnce() -> String) -> BenchResult<()> {
    if cond {
        Ok(())
    } else {
        Err(message().into())
    }
}

/// Everything one `rama-bench run` run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// `quick` (harness check, tiny counts) or `full`.
    pub mode: String,
    /// The command that produced this file.
    pub invocation: String,
    /// Unix time the run started.
    pub started_unix: u64,
    /// Wall time of the whole run.
    pub seconds: f64,
    pub machine: Machine,
    pub depot_batched: DepotBatched,
    pub depot_single: DepotSingle,
    pub depot_concurrent: DepotConcurrent,
    pub lsm: LsmComparison,
    /// WordCount end to end (absent in results of older runs).
    #[serde(default)]
    pub wordcount: Option<crate::wordcount::WordCount>,
    /// Through the network on a real cluster (absent in older runs).
    #[serde(default)]
    pub remote: Option<crate::remote::Remote>,
    /// WordCount on Redis, per durability setting (absent in older runs).
    #[serde(default)]
    pub redis_wordcount: Vec<crate::redis::RedisWordCount>,
    /// Loopback TCP round trips: the network's physical limit (absent in
    /// older runs).
    #[serde(default)]
    pub tcp: Option<crate::tcp::TcpLoopback>,
    /// `rama bench` workloads and a sweep (absent in older runs).
    #[serde(default)]
    pub harness: Option<crate::harness::Record>,
    /// Replicated store writes in one process (absent in older runs).
    #[serde(default)]
    pub replication: Option<crate::replication::ReplicatedWrites>,
    /// WordCount with RF 1 and RF 3 through a real cluster, and failover
    /// times (absent in older runs).
    #[serde(default)]
    pub replicated_cluster: Option<crate::failover::ReplicatedCluster>,
}

/// `ops` operations moving `bytes` payload bytes in `seconds`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Throughput {
    pub ops: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_sec: f64,
}

impl Throughput {
    pub fn new(ops: u64, bytes: u64, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64();
        Throughput {
            ops,
            bytes,
            seconds,
            ops_per_sec: ops as f64 / seconds,
            mb_per_sec: bytes as f64 / seconds / 1e6,
        }
    }

    /// Fails unless the run did `ops` operations at a positive, finite rate.
    pub fn check(&self, what: &str, ops: u64) -> BenchResult<()> {
        ensure(self.ops == ops, || {
            format!("{what}: {} operations, expected {ops}", self.ops)
        })?;
        ensure(self.ops_per_sec.is_finite() && self.ops_per_sec > 0.0, || {
            format!("{what}: rate {} is not a positive number", self.ops_per_sec)
        })
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Latency {
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// A histogram of nanoseconds, 3 significant digits, up to a minute.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Records one latency sample.
pub fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    hist.saturating_record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
}

impl Latency {
    /// `p50 1.234 ms  p90 ...  max ...`, for a terminal.
    pub fn line(&self) -> String {
        let ms = |us: f64| format!("{:.3} ms", us / 1000.0);
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us)
        )
    }

    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1e3;
        Latency {
            samples: h.len(),
            mean_us: h.mean() / 1e3,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Benchmark 1: batched appends of one task thread next to raw
/// `pwrite` + `fdatasync` of the same batch size and total bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepotBatched {
    pub record_bytes: usize,
    pub batch_records: usize,
    /// Rounds ours and the raw loops were interleaved in.
    pub rounds: u64,
    /// `Log::append_batch`; bytes are payload bytes.
    pub ours: Throughput,
    /// Bytes of the frames holding those records.
    pub ours_frame_bytes: u64,
    /// Records read back and verified after reopening the log.
    pub ours_read_back: u64,
    /// Raw loop on a file that grows with every write.
    pub raw_growing: Throughput,
    /// Raw loop over a file zero-filled (and synced) beforehand.
    pub raw_prewritten: Throughput,
}

/// A latency benchmark: rate and percentiles of one operation in flight.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LatencyRun {
    pub throughput: Throughput,
    pub latency: Latency,
}

/// Benchmark 2: durable single appends, one in flight, next to a raw 4 KiB
/// `pwrite` + `fdatasync` loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepotSingle {
    pub record_bytes: usize,
    pub raw_write_bytes: usize,
    /// Rounds ours and the raw loops were interleaved in.
    pub rounds: u64,
    pub ours: LatencyRun,
    pub ours_read_back: u64,
    pub raw_growing: LatencyRun,
    pub raw_prewritten: LatencyRun,
}

/// Benchmark 3: many appenders on one log, group-committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepotConcurrent {
    pub record_bytes: usize,
    pub tasks: usize,
    /// Acknowledged appends over the whole run, and each append's latency.
    pub ours: LatencyRun,
    pub ours_read_back: u64,
}
