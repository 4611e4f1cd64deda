//! The baselines behind `rama bench --baseline NAME`: the same comparisons
//! `bench/run` records in BENCHMARKS.md, one at a time, sized by the
//! harness's options. Each starts and stops what it runs (Redis by its
//! process id), uses only loopback, and says which package to install when
//! a tool is missing.
//!
//! - `disk`: sequential 4 KiB writes, each followed by `fdatasync`, to a
//!   file that grows (the least a durable log does per acknowledged write).
//! - `tcp`: loopback round trips, one in flight and pipelined.
//! - `lsm`, `ours`, `fjall`, `rocksdb`: fillrandom (synced batches),
//!   readrandom and range scans on our LSM, fjall and RocksDB's `db_bench`.
//! - `redis`: `redis-benchmark` GETs, and WordCount as pipelined `HINCRBY`s
//!   with `appendfsync always` and `everysec`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::results::{ensure, new_histogram, record, BenchResult, Latency};

pub const NAMES: [&str; 7] = ["disk", "tcp", "lsm", "ours", "fjall", "rocksdb", "redis"];

/// How big a baseline run is.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Data goes in a new directory under this one (a real disk, not tmpfs).
    pub dir: PathBuf,
    /// Seconds per timed phase (disk, tcp).
    pub duration: Duration,
    /// Keys written and read (lsm engines, Redis GETs); sentences (Redis
    /// WordCount) are ten times as many.
    pub keys: u64,
    /// Connections (tcp, Redis).
    pub clients: usize,
}

/// What a baseline measured: a few lines for a terminal, and JSON.
#[derive(Debug)]
pub struct Outcome {
    pub summary: String,
    pub json: serde_json::Value,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DiskRun {
    path_kind: &'static str,
    write_bytes: usize,
    writes: u64,
    writes_per_sec: f64,
    mb_per_sec: f64,
    latency: Latency,
}

fn disk(plan: &Plan, dir: &Path) -> BenchResult<Outcome> {
    const WRITE: usize = 4096;
    let mut file = crate::raw::RawFile::create(dir.join("raw"), crate::raw::Layout::Growing, 0, WRITE)?;
    let mut hist = new_histogram();
    let started = Instant::now();
    let mut writes = 0u64;
    while started.elapsed() < plan.duration {
        record(&mut hist, file.write_synced(WRITE)?);
        writes += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    file.remove()?;
    let r = DiskRun {
        path_kind: "a file that grows with every write",
        write_bytes: WRITE,
        writes,
        writes_per_sec: writes as f64 / seconds,
        mb_per_sec: (writes * WRITE as u64) as f64 / seconds / 1e6,
        latency: Latency::from_histogram(&hist),
    };
    Ok(Outcome {
        summary: format!(
            "disk: sequential {WRITE}-byte pwrite + fdatasync in {}: {:.0} writes/s ({:.2} MB/s); \
             p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            dir.display(),
            r.writes_per_sec,
            r.mb_per_sec,
            r.latency.p50_us,
            r.latency.p99_us,
            r.latency.max_us
        ),
        json: serde_json::to_value(&r)?,
    })
}

fn tcp(plan: &Plan) -> BenchResult<Outcome> {
    let r = crate::tcp::loopback(64, plan.clients, crate::remote::PIPELINE, plan.duration)?;
    Ok(Outcome {
        summary: format!(
            "tcp (loopback, {}-byte messages): one in flight {:.0} round trips/s (p50 {:.1} µs, p99 {:.1} µs); \
             {} connections x {} pipelined {:.0} messages/s",
            r.message_bytes,
            r.sequential_per_sec,
            r.round_trip.p50_us,
            r.round_trip.p99_us,
            r.connections,
            r.pipeline,
            r.pipelined_per_sec
        ),
        json: serde_json::to_value(&r)?,
    })
}

fn lsm(plan: &Plan, dir: &Path, engines: &[&str]) -> BenchResult<Outcome> {
    ensure(plan.keys >= 1000, || {
        "--keys: the LSM baselines need at least 1000 keys".into()
    })?;
    let w = crate::lsm::Workload {
        keys: plan.keys,
        key_bytes: 16,
        value_bytes: 100,
        batch: 1000,
        reads: plan.keys,
        scans: (plan.keys / 100).max(100),
        scan_len: 100,
        repeats: 1,
    };
    let r = crate::lsm::run_engines(&w, dir, engines)?;
    let mut summary = format!(
        "lsm ({} keys of 16 bytes, values of 100 bytes; fill in synced batches of 1000):",
        w.keys
    );
    for e in &r.engines {
        summary += &format!(
            "\n  {}{}: fill {:.0}/s, read {:.0}/s, scan {:.0}/s",
            e.engine,
            e.version.as_ref().map(|v| format!(" {v}")).unwrap_or_default(),
            e.fill.ops_per_sec,
            e.read.ops_per_sec,
            e.scan.ops_per_sec
        );
    }
    Ok(Outcome {
        summary,
        json: serde_json::to_value(&r)?,
    })
}

fn redis(plan: &Plan, dir: &Path) -> BenchResult<Outcome> {
    let connections = plan.clients;
    let keys = usize::try_from(plan.keys)?;
    let (gets, version, setup) = crate::remote::redis_gets(dir, connections, plan.keys * 10, keys)?;
    let wc = crate::wordcount::Plan {
        tasks: 1,
        threads: 1,
        sentences: keys * 10,
        words_per_sentence: 10,
        vocabulary: keys.max(10),
        clients: connections,
        window: 0,
        latency_seconds: 0.0,
    };
    let sentences = crate::wordcount::sample_sentences(&wc, wc.sentences);
    let mut summary = format!(
        "redis ({version}): GET {:.0}/s (redis-benchmark -P {} -c {connections}, {setup})",
        gets.ops_per_sec,
        crate::remote::PIPELINE
    );
    let mut counts = Vec::new();
    for policy in ["always", "everysec"] {
        let r = crate::redis::wordcount(&dir.join(format!("wc-{policy}")), policy, &sentences, connections, 256)?;
        summary += &format!(
            "\n  WordCount (HINCRBY per word, 256 sentences per pipeline), appendfsync {policy}: {:.0} increments/s",
            r.increments_per_sec
        );
        counts.push(r);
    }
    Ok(Outcome {
        summary,
        json: serde_json::json!({"version": version, "gets": gets, "getSetup": setup, "wordcount": counts}),
    })
}

/// Runs baseline `name` (one of [`NAMES`]).
pub fn run(name: &str, plan: &Plan) -> BenchResult<Outcome> {
    ensure(NAMES.contains(&name), || {
        format!("unknown baseline {name:?} (baselines: {})", NAMES.join(", "))
    })?;
    ensure(plan.clients > 0 && plan.keys > 0 && !plan.duration.is_zero(), || {
        "clients, keys and duration must be more than 0".into()
    })?;
    if name == "tcp" {
        return tcp(plan);
    }
    std::fs::create_dir_all(&plan.dir).map_err(|e| format!("creating {}: {e}", plan.dir.display()))?;
    let dir = plan.dir.join(format!("rama-baseline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let outcome = crate::machine::check_real_disk(&dir).and_then(|()| match name {
        "disk" => disk(plan, &dir),
        "lsm" => lsm(plan, &dir, &["ours", "fjall", "rocksdb"]),
        "redis" => redis(plan, &dir),
        engine => lsm(plan, &dir, &[engine]),
    });
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}
