//! The replication driver over real stores: three replicas of one task
//! group on three task threads (`replication::local`: channels between
//! them, an in-memory metastore node, the Conductor's election run by the
//! test). Writes through the leader are acknowledged only once the ISR
//! holds them; a leader cut off from its followers acknowledges nothing;
//! after it is killed another is elected and takes writes; restarted, the
//! old leader cuts its unreplicated tail and catches up; all logs agree on
//! the applied prefix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::lsm::{LsmConfig, WriteBatch};
use engine::replication::local::{LocalGroup, LocalReplica};
use engine::replication::Settings;

fn settings() -> Settings {
    Settings {
        min_isr: 2,
        max_lag_ms: 2_000,
        fetch_timeout_ms: 300,
        max_fetch_entries: 256,
    }
}

fn start(group: &Arc<LocalGroup>, dir: &std::path::Path, id: u32, incarnation: u64) -> LocalReplica {
    LocalReplica::start(
        group.clone(),
        id,
        incarnation,
        dir.join(format!("r{id}")),
        LsmConfig::default(),
        settings(),
    )
    .unwrap()
}

/// Waits (bounded, generously: CI machines are loaded) for `done`.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serving_leader(replicas: &[Option<LocalReplica>]) -> Option<usize> {
    replicas
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.as_ref().filter(|r| r.status().serving).map(|_| i))
}

/// Starts a write of `key` on the replica; the receiver gets its outcome.
fn write(replica: &LocalReplica, key: String) -> flume::Receiver<Result<(), String>> {
    let (tx, rx) = flume::bounded(1);
    replica.on(move |store, _| async move {
        glommio::spawn_local(async move {
            let mut batch = WriteBatch::new();
            batch.put(key.as_bytes(), format!("value of {key}").as_bytes());
            let _ = tx.send(store.write(batch).await.map_err(|e| e.to_string()));
        })
        .detach();
    });
    rx
}

fn get(replica: &LocalReplica, key: &str) -> Option<Vec<u8>> {
    let key = key.to_string();
    replica.on(move |store, _| async move { store.get(key.as_bytes()).unwrap() })
}

fn wal(replica: &LocalReplica) -> Vec<(u64, u32, Vec<u8>)> {
    replica.on(|store, _| async move {
        let end = store.wal().end_offset();
        let records = store.wal().read(0, end, usize::MAX).await.unwrap();
        records.into_iter().map(|r| (r.offset, r.epoch, r.payload)).collect()
    })
}

fn live(replicas: &[Option<LocalReplica>]) -> Vec<&LocalReplica> {
    replicas.iter().flatten().collect()
}

#[test]
fn writes_survive_a_failover_and_a_diverged_leader_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::new(3);
    let mut replicas: Vec<Option<LocalReplica>> = (0..3u32)
        .map(|id| Some(start(&group, dir.path(), id, 1 + id as u64)))
        .collect();
    group.elect(&live(&replicas)).expect("a first leader");
    let mut leader = None;
    eventually("a serving leader", || {
        leader = serving_leader(&replicas);
        leader.is_some()
    });
    let first = leader.unwrap();

    // Acknowledged writes are on every ISR member.
    let acks: Vec<_> = (0..200)
        .map(|i| write(replicas[first].as_ref().unwrap(), format!("a{i:03}")))
        .collect();
    for (i, ack) in acks.into_iter().enumerate() {
        let result = ack.recv_timeout(Duration::from_secs(60)).expect("an answer");
        assert_eq!(result, Ok(()), "write a{i:03}");
    }
    for replica in replicas.iter().flatten() {
        eventually("the followers to apply what was acknowledged", || {
            get(replica, "a199").is_some()
        });
        assert_eq!(get(replica, "a000"), Some(b"value of a000".to_vec()));
    }

    // Cut off, the leader acknowledges nothing (min-ISR 2 needs a follower).
    group.cut(first as u32, true);
    let stranded: Vec<_> = (0..20)
        .map(|i| write(replicas[first].as_ref().unwrap(), format!("s{i:03}")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for ack in &stranded {
        assert!(ack.try_recv().is_err(), "a write of a cut-off leader was acknowledged");
    }
    let old_end = replicas[first].as_ref().unwrap().status().log_end;
    replicas[first].take().unwrap().kill();
    for ack in stranded {
        // Killed with them pending: no answer, or an error; never a success.
        if let Ok(result) = ack.try_recv() {
            assert!(result.is_err(), "{result:?}");
        }
    }

    // Another replica is elected and takes writes.
    group.elect(&live(&replicas)).expect("a new leader");
    let mut second = None;
    eventually("a new serving leader", || {
        second = serving_leader(&replicas);
        second.is_some()
    });
    let second = second.unwrap();
    assert_ne!(second, first);
    let state = group.state();
    assert!(state.epoch >= 2 && state.osr.contains(&(first as u32)), "{state:?}");
    let acks: Vec<_> = (0..100)
        .map(|i| write(replicas[second].as_ref().unwrap(), format!("b{i:03}")))
        .collect();
    for ack in acks {
        assert_eq!(ack.recv_timeout(Duration::from_secs(60)).expect("an answer"), Ok(()));
    }

    // The old leader returns (a new incarnation): it cuts the tail nobody
    // else has, catches up, and rejoins the ISR.
    group.cut(first as u32, false);
    replicas[first] = Some(start(&group, dir.path(), first as u32, 10));
    eventually("the old leader back in the ISR", || group.state().isr.len() == 3);
    let back = replicas[first].as_ref().unwrap();
    eventually("the old leader to apply the new leader's writes", || {
        get(back, "b099").is_some()
    });
    assert_eq!(get(back, "s000"), None, "never acknowledged, cut");
    assert_eq!(get(back, "a150"), Some(b"value of a150".to_vec()));
    let status = back.status();
    assert!(
        status.log_end < old_end + 100,
        "the stranded tail was cut: {status:?}, was {old_end}"
    );

    // Every log agrees on the applied prefix, entry for entry and epoch.
    let applied = live(&replicas).iter().map(|r| r.status().applied).min().unwrap();
    assert!(applied >= 300, "{applied}");
    let wals: Vec<_> = live(&replicas).into_iter().map(wal).collect();
    for other in &wals[1..] {
        assert_eq!(other[..applied as usize], wals[0][..applied as usize]);
    }
    for replica in replicas.into_iter().flatten() {
        replica.kill();
    }
}
