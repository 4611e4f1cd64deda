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
    let value = format!("value of {key}");
    write_value(replica, key, value)
}

fn write_value(replica: &LocalReplica, key: String, value: String) -> flume::Receiver<Result<(), String>> {
    let (tx, rx) = flume::bounded(1);
    replica.on(move |store, _| async move {
        glommio::spawn_local(async move {
            let mut batch = WriteBatch::new();
            batch.put(key.as_bytes(), value.as_bytes());
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

mod common;

/// A leader whose disk fills: its log fails a write and loses what was
/// queued, so the driver stops the replica (it must not go on in its
/// epoch with entries the core counted and the log does not hold);
/// nothing unapplied is acknowledged, another replica is elected, and the
/// old one, restarted with room, rejoins.
#[test]
fn a_leader_whose_log_fails_a_write_stops_and_the_group_goes_on() {
    let mount = common::Tmpfs::mount("6m");
    let dir = tempfile::tempdir().unwrap();
    let group = LocalGroup::new(3);
    // A memtable that never fills here, small WAL segments: the log itself
    // runs out of room (a segment roll fails), not a table flush (which
    // the store retries while writes wait).
    let lsm = LsmConfig {
        memtable_bytes_max: 64 << 20,
        ..common::small_store_config()
    };
    let place = |id: u32| {
        if id == 0 {
            mount.path().join("r0")
        } else {
            dir.path().join(format!("r{id}"))
        }
    };
    let start_at = |id: u32, incarnation: u64| {
        LocalReplica::start(group.clone(), id, incarnation, place(id), lsm.clone(), settings()).unwrap()
    };
    let mut replicas: Vec<Option<LocalReplica>> = (0..3).map(|id| Some(start_at(id, 1))).collect();
    group.elect(&live(&replicas)).expect("a first leader");
    eventually("replica 0 to serve", || replicas[0].as_ref().unwrap().status().serving);
    for i in 0..50 {
        let ack = write(replicas[0].as_ref().unwrap(), format!("k{i:04}"));
        assert_eq!(ack.recv_timeout(Duration::from_secs(60)).unwrap(), Ok(()));
    }
    // Fill the leader's device, then keep writing until its log fails.
    let ballast = mount.path().join("ballast");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&ballast).unwrap();
        while f.write_all(&[1u8; 4096]).is_ok() {}
    }
    let mut outcomes = Vec::new();
    let mut i = 50;
    eventually("the leader's log to fail a write", || {
        let leader = replicas[0].as_ref().unwrap();
        if leader.failure().is_some() {
            return true;
        }
        for _ in 0..20 {
            outcomes.push((i, write_value(leader, format!("k{i:05}"), "x".repeat(2000))));
            i += 1;
        }
        false
    });
    let failure = replicas[0].as_ref().unwrap().failure().unwrap();
    assert!(failure.contains("lost queued writes"), "{failure}");
    replicas[0].take().unwrap().kill();
    std::fs::remove_file(&ballast).unwrap();

    // What was acknowledged is on the followers; another leads and writes.
    group.elect(&live(&replicas)).expect("a new leader");
    let mut next = None;
    eventually("a new serving leader", || {
        next = serving_leader(&replicas);
        next.is_some()
    });
    let next = replicas[next.unwrap()].as_ref().unwrap();
    for (i, outcome) in outcomes {
        if let Ok(Ok(())) = outcome.try_recv() {
            let key = format!("k{i:05}");
            assert!(
                get(next, &key).is_some(),
                "acknowledged {key} is missing after failover"
            );
        }
    }
    assert!(get(next, "k0049").is_some());
    let ack = write(next, "after".into());
    assert_eq!(ack.recv_timeout(Duration::from_secs(60)).unwrap(), Ok(()));
    replicas[0] = Some(start_at(0, 2));
    eventually("the restarted replica to catch up", || {
        get(replicas[0].as_ref().unwrap(), "after").is_some()
    });
    assert!(replicas[0].as_ref().unwrap().failure().is_none());
    for replica in replicas.into_iter().flatten() {
        replica.kill();
    }
}
