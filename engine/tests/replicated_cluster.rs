//! A replicated module in one process: every task thread runs as three
//! replicas (min-ISR 2), each over its own copy of the task group's
//! storage. Appends are acknowledged once in sync; a killed leader is
//! replaced in a new epoch and appends go on; killed replicas rejoin and
//! catch up; a restart finds everything and goes on from the epochs it
//! left; every replica ends with the same depot partitions.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use engine::cluster::config::ModuleConfig;
use engine::cluster::{AckLevel, InProcessCluster, ReplicationConfig, TaskGroupStatus};
use engine::log::{Log, LogConfig};
use engine::module::ModuleDef;
use engine::pstate::Nav;
use engine::value::Value;

const TASKS: u32 = 4;
const THREADS: u32 = 2;
const NAME: &str = "Replicated";

fn module() -> ModuleDef {
    common::word_count(NAME)
}

fn config() -> ModuleConfig {
    ModuleConfig {
        checkpoint_interval: Duration::from_millis(50),
        replication: ReplicationConfig {
            factor: 3,
            min_isr: Some(2),
            ..ReplicationConfig::default()
        },
        ..ModuleConfig::default()
    }
}

fn word(i: u64) -> String {
    format!("w{}", i % 23)
}

/// Waits (generously: a loaded machine) until `ok` holds of every task
/// group's status.
fn wait_groups(cluster: &mut InProcessCluster, what: &str, ok: impl Fn(&TaskGroupStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all: Vec<TaskGroupStatus> = (0..THREADS).map(|t| cluster.task_group(NAME, t).unwrap()).collect();
        if all.iter().all(&ok) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {all:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_in_sync(s: &TaskGroupStatus) -> bool {
    let applied: Vec<u64> = s.replicas.iter().flatten().map(|r| r.applied).collect();
    s.state.isr.len() == 3
        && s.replicas.iter().all(Option::is_some)
        && s.replicas.iter().flatten().any(|r| r.serving)
        && applied.windows(2).all(|w| w[0] == w[1])
}

/// Appends words `range` with `Ack`, retrying a refused one (no leader,
/// stalled) after a pause; an error saying the outcome is unknown counts
/// as maybe-appended. Returns (acknowledged, unknown) counts per word.
fn append_words(
    cluster: &InProcessCluster,
    range: std::ops::Range<u64>,
    acked: &mut BTreeMap<String, i64>,
    unknown: &mut BTreeMap<String, i64>,
) {
    let words = cluster.depot(NAME, "*words").unwrap();
    for i in range {
        let w = word(i);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match words.append(&Value::from(w.as_str()), AckLevel::Ack) {
                Ok(_) => {
                    *acked.entry(w.clone()).or_default() += 1;
                    break;
                }
                Err(e) => {
                    let why = e.to_string();
                    let refused = why.contains("not the leader")
                        || why.contains("no replica leads")
                        || why.contains("stalled below min-ISR")
                        || why.contains("stopping");
                    if !refused {
                        // Maybe written: never resent (the caller's own
                        // retry is what makes duplicates).
                        *unknown.entry(w.clone()).or_default() += 1;
                        break;
                    }
                    assert!(Instant::now() < deadline, "appends refused for too long: {why}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn check_counts(cluster: &InProcessCluster, acked: &BTreeMap<String, i64>, unknown: &BTreeMap<String, i64>) {
    let counts = cluster.pstate(NAME, "$$counts").unwrap();
    for (w, &n) in acked {
        let got = counts.select_one(&[Nav::Key(Value::from(w.as_str()))]).unwrap();
        let got = got.as_int().unwrap_or(0);
        let maybe = unknown.get(w).copied().unwrap_or(0);
        assert!(
            got >= n && got <= n + maybe,
            "word {w}: counted {got}, acknowledged {n}, unknown {maybe}"
        );
    }
}

/// Every record of every partition of task group `thread`, as replica
/// `r`'s files hold them (read after the cluster stopped).
fn partitions(dir: &std::path::Path, r: u32, thread: u32) -> BTreeMap<String, Vec<Vec<u8>>> {
    let tg = InProcessCluster::new(dir)
        .replica_dir(NAME, r)
        .join(format!("tg-{thread}/depot-0"));
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&tg).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let records = engine::executor::ExecutorConfig::default()
            .block_on(async {
                let (log, _) = Log::open(&path, LogConfig::default()).await.unwrap();
                let records = log.read(0, u64::MAX, usize::MAX).await.unwrap();
                log.close().await.unwrap();
                records.into_iter().map(|r| r.payload).collect::<Vec<_>>()
            })
            .unwrap();
        out.insert(name, records);
    }
    out
}

#[test]
fn a_replicated_module_acknowledges_in_sync_appends_and_its_replicas_agree() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.set_module_config(config());
    cluster.launch(module(), TASKS, THREADS).unwrap();
    wait_groups(&mut cluster, "every replica in sync at launch", all_in_sync);
    let (mut acked, mut unknown) = (BTreeMap::new(), BTreeMap::new());
    append_words(&cluster, 0..200, &mut acked, &mut unknown);
    check_counts(&cluster, &acked, &unknown);
    assert!(unknown.is_empty(), "no failure yet, yet outcomes unknown: {unknown:?}");

    // Kill the leader of task group 0: another replica leads in a new
    // epoch and appends go on.
    let before = cluster.task_group(NAME, 0).unwrap().state;
    let old = before.leader.expect("task group 0 has a leader").id;
    cluster.kill_replica(NAME, 0, old).unwrap();
    append_words(&cluster, 200..400, &mut acked, &mut unknown);
    let after = cluster.task_group(NAME, 0).unwrap().state;
    assert!(after.epoch > before.epoch, "{before:?} -> {after:?}");
    assert_ne!(after.leader.map(|m| m.id), Some(old), "{after:?}");
    // Kill a follower of task group 1: its leader goes on with the other.
    let s1 = cluster.task_group(NAME, 1).unwrap().state;
    let follower = (0..3).find(|r| Some(*r) != s1.leader.map(|m| m.id)).unwrap();
    cluster.kill_replica(NAME, 1, follower).unwrap();
    append_words(&cluster, 400..500, &mut acked, &mut unknown);
    // Both come back, catch up and rejoin the ISR.
    cluster.start_replica(NAME, 0, old).unwrap();
    cluster.start_replica(NAME, 1, follower).unwrap();
    append_words(&cluster, 500..600, &mut acked, &mut unknown);
    wait_groups(&mut cluster, "every replica back in sync after the kills", all_in_sync);
    check_counts(&cluster, &acked, &unknown);

    // A restart of the whole module finds everything again, and no epoch
    // is used twice (the group's state is kept as a metastore keeps it).
    let epochs: Vec<u32> = (0..THREADS)
        .map(|t| cluster.task_group(NAME, t).unwrap().state.epoch)
        .collect();
    cluster.shutdown().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.set_module_config(config());
    cluster.launch(module(), TASKS, THREADS).unwrap();
    wait_groups(&mut cluster, "every replica in sync after a restart", all_in_sync);
    for t in 0..THREADS {
        let epoch = cluster.task_group(NAME, t).unwrap().state.epoch;
        assert!(
            epoch > epochs[t as usize],
            "task group {t}: epoch {epoch} after {}",
            epochs[t as usize]
        );
    }
    check_counts(&cluster, &acked, &unknown);
    cluster.shutdown().unwrap();
    assert_eq!(engine::cluster::live_task_threads(), 0);

    // Every replica holds the same partitions, record for record.
    for thread in 0..THREADS {
        let first = partitions(dir.path(), 0, thread);
        let total: usize = first.values().map(Vec::len).sum();
        assert!(total > 0);
        for r in 1..3 {
            assert_eq!(
                partitions(dir.path(), r, thread),
                first,
                "replica {r} of task group {thread}"
            );
        }
    }
}
