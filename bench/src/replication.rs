//! Replicated store writes in one process: the replication driver
//! (`engine::replication::local`: replicas on task threads of their own,
//! over real stores on the same disk, linked by channels) against the
//! plain store a task group writes to today. `writers` tasks on the
//! leader's thread each write one small batch at a time and wait for it
//! (acknowledged = applied: durable on every ISR member).
//!
//! This isolates the protocol's cost (fetch round trips, the followers'
//! durable writes, the apply limit) from the network's; the cluster
//! benchmark of issue 13 measures appends end to end.

use std::path::Path;
use std::time::{Duration, Instant};

use engine::executor::ExecutorConfig;
use engine::lsm::{LsmConfig, Store, WriteBatch};
use engine::replication::local::{LocalGroup, LocalReplica};
use engine::replication::Settings;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::results::{ensure, new_histogram, record, BenchResult, Latency, LatencyRun, Throughput};

/// Bytes of each write's value.
pub const VALUE_BYTES: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicatedWrites {
    pub value_bytes: usize,
    pub writers: usize,
    pub writes: u64,
    /// The store alone, as a task group with RF 1 writes today.
    pub plain: LatencyRun,
    /// One replica through the driver (min-ISR 1).
    pub rf1: LatencyRun,
    /// Three replicas, min-ISR 2: each write is acknowledged once every
    /// ISR member (all three, while they keep up) holds it.
    pub rf3: LatencyRun,
}

impl ReplicatedWrites {
    /// RF 3 throughput over the plain store's.
    pub fn ratio(&self) -> f64 {
        self.rf3.throughput.ops_per_sec / self.plain.throughput.ops_per_sec
    }
}

fn batch(writer: usize, seq: u64) -> WriteBatch {
    let mut batch = WriteBatch::new();
    let key = format!("w{writer:03}-{seq:08}");
    let mut value = key.clone().into_bytes();
    value.resize(VALUE_BYTES, b'.');
    batch.put(key.into_bytes(), value);
    batch
}

/// `writers` tasks writing `per_writer` batches each to `store`: the
/// elapsed time and every write's latency.
async fn load(store: Store, writers: usize, per_writer: u64) -> BenchResult<(Duration, Histogram<u64>)> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            glommio::spawn_local(async move {
                let mut latency = new_histogram();
                for seq in 0..per_writer {
                    let t = Instant::now();
                    store.write(batch(w, seq)).await?;
                    record(&mut latency, t.elapsed());
                }
                Ok::<_, engine::Error>(latency)
            })
        })
        .collect();
    let mut latency = new_histogram();
    for task in tasks {
        latency
            .add(&task.await?)
            .map_err(|e| format!("merging histograms: {e}"))?;
    }
    Ok((start.elapsed(), latency))
}

fn run_of(writes: u64, (elapsed, latency): (Duration, Histogram<u64>)) -> LatencyRun {
    LatencyRun {
        throughput: Throughput::new(writes, writes * VALUE_BYTES as u64, elapsed),
        latency: Latency::from_histogram(&latency),
    }
}

fn replicated(dir: &Path, rf: u32, writers: usize, per_writer: u64) -> BenchResult<(Duration, Histogram<u64>)> {
    let group = LocalGroup::new(rf);
    let settings = Settings {
        min_isr: (rf as usize - 1).max(1),
        ..Settings::default()
    };
    let replicas = (0..rf)
        .map(|id| {
            LocalReplica::start(
                group.clone(),
                id,
                1,
                dir.join(format!("r{id}")),
                LsmConfig::default(),
                settings,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let live: Vec<&LocalReplica> = replicas.iter().collect();
    group.elect(&live).ok_or("no replica was elected")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        if let Some(leader) = replicas.iter().find(|r| r.status().serving) {
            break leader;
        }
        ensure(Instant::now() < deadline, || "no replica started serving".to_string())?;
        std::thread::sleep(Duration::from_millis(5));
    };
    let measured =
        leader.on(move |store, _| async move { load(store, writers, per_writer).await.map_err(|e| e.to_string()) })?;
    // Every write is applied on the leader; the ISR held it before.
    let applied = leader.status().applied;
    ensure(applied >= writers as u64 * per_writer, || {
        format!("the leader applied {applied} of {} writes", writers as u64 * per_writer)
    })?;
    drop(live);
    for replica in replicas {
        replica.kill();
    }
    Ok(measured)
}

/// Runs the three configurations one after another in fresh directories
/// under `dir`.
pub fn run(dir: &Path, writers: usize, per_writer: u64) -> BenchResult<ReplicatedWrites> {
    let writes = writers as u64 * per_writer;
    let plain_dir = dir.join("replication-plain");
    let config = ExecutorConfig {
        name: "bench-replication-plain".into(),
        ..ExecutorConfig::default()
    };
    let plain = config.run_on_thread({
        let plain_dir = plain_dir.clone();
        move || async move {
            let (store, _) = Store::open(&plain_dir, LsmConfig::default()).await?;
            let measured = load(store.clone(), writers, per_writer).await;
            store.close().await?;
            measured
        }
    })??;
    let rf1 = replicated(&dir.join("replication-rf1"), 1, writers, per_writer)?;
    let rf3 = replicated(&dir.join("replication-rf3"), 3, writers, per_writer)?;
    for sub in ["replication-plain", "replication-rf1", "replication-rf3"] {
        let _ = std::fs::remove_dir_all(dir.join(sub));
    }
    let result = ReplicatedWrites {
        value_bytes: VALUE_BYTES,
        writers,
        writes,
        plain: run_of(writes, plain),
        rf1: run_of(writes, rf1),
        rf3: run_of(writes, rf3),
    };
    for (name, run) in [("plain", &result.plain), ("rf1", &result.rf1), ("rf3", &result.rf3)] {
        run.throughput.check(&format!("replicated writes ({name})"), writes)?;
    }
    Ok(result)
}
