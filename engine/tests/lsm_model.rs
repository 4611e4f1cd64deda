//! The LSM store against a `BTreeMap` model under random operations,
//! including flushes, compactions and reopening. The seed is printed on
//! failure; rerun one with `LSM_MODEL_SEED=<seed>`.

use std::collections::BTreeMap;
use std::ops::Bound;

use engine::executor::ExecutorConfig;
use engine::lsm::{table::TableOptions, LsmConfig, Store, WriteBatch};

mod common;
use common::Rng;

fn config() -> LsmConfig {
    LsmConfig {
        memtable_bytes_max: 8 << 10,
        compaction_trigger: 3,
        table: TableOptions {
            block_bytes: 256,
            ..TableOptions::default()
        },
        ..LsmConfig::default()
    }
}

fn key(rng: &mut Rng) -> Vec<u8> {
    // A small key space so overwrites and deletes hit existing keys.
    let k = rng.below(400);
    format!("k{k:04}").into_bytes()
}

fn bound(rng: &mut Rng) -> Bound<Vec<u8>> {
    match rng.below(3) {
        0 => Bound::Unbounded,
        1 => Bound::Included(key(rng)),
        _ => Bound::Excluded(key(rng)),
    }
}

fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn run_model(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(seed);
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut steps = 0;
    for _round in 0..4 {
        let path = dir.path().to_path_buf();
        let ops = 300 + rng.below(300);
        let (m, r, s) = ExecutorConfig::default()
            .block_on(async move {
                let (store, _) = Store::open(&path, config()).await.unwrap();
                for _ in 0..ops {
                    steps += 1;
                    match rng.below(100) {
                        0..=59 => {
                            let mut batch = WriteBatch::new();
                            let mut expect = Vec::new();
                            for _ in 0..1 + rng.below(8) {
                                let k = key(&mut rng);
                                if rng.below(4) == 0 {
                                    batch.delete(k.clone());
                                    expect.push((k, None));
                                } else {
                                    let v =
                                        format!("v{}-{}", rng.next(), "x".repeat(rng.below(40) as usize)).into_bytes();
                                    batch.put(k.clone(), v.clone());
                                    expect.push((k, Some(v)));
                                }
                            }
                            store.write(batch).await.unwrap();
                            for (k, v) in expect {
                                match v {
                                    Some(v) => model.insert(k, v),
                                    None => model.remove(&k),
                                };
                            }
                        }
                        60..=79 => {
                            let k = key(&mut rng);
                            assert_eq!(
                                store.get(&k).unwrap(),
                                model.get(&k).cloned(),
                                "get {k:?} at step {steps}"
                            );
                        }
                        80..=93 => {
                            let (lo, hi) = (bound(&mut rng), bound(&mut rng));
                            let reverse = rng.below(2) == 0;
                            let limit = 1 + rng.below(50) as usize;
                            let got = store.scan(as_ref(&lo), as_ref(&hi), reverse, limit).unwrap();
                            let valid = match (&lo, &hi) {
                                (Bound::Included(l), Bound::Included(h)) => l <= h,
                                (Bound::Included(l) | Bound::Excluded(l), Bound::Included(h) | Bound::Excluded(h)) => {
                                    l < h
                                }
                                _ => true,
                            };
                            let want: Vec<(Vec<u8>, Vec<u8>)> = if !valid {
                                Vec::new()
                            } else if reverse {
                                model
                                    .range((lo.clone(), hi.clone()))
                                    .rev()
                                    .take(limit)
                                    .map(|(k, v)| (k.clone(), v.clone()))
                                    .collect()
                            } else {
                                model
                                    .range((lo.clone(), hi.clone()))
                                    .take(limit)
                                    .map(|(k, v)| (k.clone(), v.clone()))
                                    .collect()
                            };
                            assert_eq!(got, want, "scan {lo:?}..{hi:?} reverse={reverse} at step {steps}");
                        }
                        94..=97 => store.flush().await.unwrap(),
                        _ => store.compact(rng.below(2) == 0).await.unwrap(),
                    }
                }
                let stats = store.stats();
                store.close().await.unwrap();
                (model, rng, stats)
            })
            .unwrap();
        model = m;
        rng = r;
        assert!(
            s.flushes > 0 || s.tables > 0 || steps < 100,
            "memtable limit should force flushes: {s:?}"
        );
        let _ = s;
    }
    // Final reopen: everything matches.
    let path = dir.path().to_path_buf();
    ExecutorConfig::default()
        .block_on(async move {
            let (store, _) = Store::open(&path, config()).await.unwrap();
            let all = store
                .scan(Bound::Unbounded, Bound::Unbounded, false, usize::MAX)
                .unwrap();
            let want: Vec<_> = model.into_iter().collect();
            assert_eq!(all, want);
        })
        .unwrap();
}

#[test]
fn lsm_matches_a_btreemap_model() {
    let seeds: Vec<u64> = match std::env::var("LSM_MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("LSM_MODEL_SEED is a u64")],
        Err(_) => {
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            (0..6).map(|i| base.wrapping_add(i * 0x9E37_79B9)).collect()
        }
    };
    for seed in seeds {
        let result = std::panic::catch_unwind(|| run_model(seed));
        if let Err(e) = result {
            eprintln!("LSM model test failed with seed {seed}; rerun with LSM_MODEL_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}

/// Replication's hook: a batch past the apply limit is durable but neither
/// visible nor acknowledged until the limit moves past it.
#[test]
fn a_batch_past_the_apply_limit_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    ExecutorConfig::default()
        .block_on(async move {
            let (store, _) = Store::open(&path, config()).await.unwrap();
            let mut first = WriteBatch::new();
            first.put("a", "1");
            store.write(first).await.unwrap();
            let limit = store.applied_end();
            store.set_apply_limit(limit);
            let mut second = WriteBatch::new();
            second.put("b", "2");
            let queued = store.enqueue(second).await.unwrap();
            let done = std::rc::Rc::new(std::cell::Cell::new(false));
            let waiter = glommio::spawn_local({
                let (store, done) = (store.clone(), done.clone());
                async move {
                    store.wait_written(queued).await.unwrap();
                    done.set(true);
                }
            });
            for _ in 0..500 {
                if store.wal().end_offset() > limit {
                    break;
                }
                glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
            }
            assert!(store.wal().end_offset() > limit, "the batch became durable");
            glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            assert_eq!(store.get(b"b").unwrap(), None, "durable, not applied: not visible");
            assert!(!done.get(), "not acknowledged before it is applied");
            assert_eq!(store.applied_end(), limit);
            store.set_apply_limit(u64::MAX);
            assert_eq!(store.get(b"b").unwrap(), Some(b"2".to_vec()));
            waiter.await;
            assert!(done.get());
            assert_eq!(store.get(b"a").unwrap(), Some(b"1".to_vec()));
        })
        .unwrap();
}

/// A follower's store: the leader's WAL entries written at the leader's
/// offsets and epochs, applied only up to the limit (batches into the
/// tables, other kinds through the entry hook), cut above the applied
/// end, and reopened applying only what was applied.
#[test]
fn a_follower_store_takes_the_leaders_entries_applies_to_the_limit_and_cuts_its_tail() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let dir = tempfile::tempdir().unwrap();
    let (leader_dir, follower_dir) = (dir.path().join("leader"), dir.path().join("follower"));
    ExecutorConfig::default()
        .block_on(async move {
            // The leader: batches and depot-like entries (kind 1) in three epochs.
            let (leader, _) = Store::open(&leader_dir, config()).await.unwrap();
            for i in 0..60u32 {
                leader.wal().set_epoch(1 + i / 20);
                if i % 3 == 0 {
                    let queued = leader
                        .enqueue_entry(1, 4, |b, _| b.copy_from_slice(&i.to_le_bytes()), Box::new(|| {}))
                        .await
                        .unwrap();
                    leader.wait_written(queued).await.unwrap();
                } else {
                    let mut batch = WriteBatch::new();
                    batch.put(format!("k{i:03}"), format!("v{i}"));
                    leader.write(batch).await.unwrap();
                }
            }
            let records = leader.wal().read(0, u64::MAX, usize::MAX).await.unwrap();
            assert_eq!(records.len(), 60);

            let (follower, _) = Store::open_limited(&follower_dir, config(), 0).await.unwrap();
            let hooked = Rc::new(RefCell::new(Vec::new()));
            let sink = hooked.clone();
            follower.set_entry_hook(Box::new(move |offset, bytes| {
                sink.borrow_mut().push((offset, bytes.to_vec()))
            }));
            let wrong = follower.enqueue_replicated(1, 5, &[b"\x00"]).await;
            assert!(
                matches!(wrong, Err(engine::Error::OffsetOutOfRange { requested: 5, .. })),
                "{wrong:?}"
            );
            let mut bad = vec![0u8];
            bad.extend_from_slice(b"not a batch");
            assert!(follower.enqueue_replicated(1, 0, &[&bad]).await.is_err());
            assert_eq!(follower.wal().next_offset(), 0, "a refused entry writes nothing");
            for chunk in records.chunk_by(|a, b| a.epoch == b.epoch && b.offset - a.offset == 1 && b.offset % 7 != 0) {
                let payloads: Vec<&[u8]> = chunk.iter().map(|r| r.payload.as_slice()).collect();
                let _queued = follower
                    .enqueue_replicated(chunk[0].epoch, chunk[0].offset, &payloads)
                    .await
                    .unwrap();
            }
            follower.wal().wait_durable(60).await.unwrap();
            assert_eq!(follower.get(b"k001").unwrap(), None, "durable but not applied");
            follower.set_apply_limit(30);
            assert_eq!(follower.applied_end(), 30);
            assert_eq!(follower.get(b"k029").unwrap(), Some(b"v29".to_vec()));
            assert_eq!(follower.get(b"k031").unwrap(), None);
            let hooked_offsets: Vec<u64> = hooked.borrow().iter().map(|(o, _)| *o).collect();
            assert_eq!(hooked_offsets, (0..30).step_by(3).collect::<Vec<u64>>());
            assert_eq!(
                hooked.borrow()[1].1,
                records[3].payload,
                "the hook gets the entry's bytes"
            );

            assert!(
                matches!(follower.truncate(29).await, Err(engine::Error::OffsetOutOfRange { .. })),
                "never below the applied end"
            );
            follower.truncate(45).await.unwrap();
            assert_eq!(follower.wal().end_offset(), 45);
            let mine = follower.wal().read(0, u64::MAX, usize::MAX).await.unwrap();
            assert_eq!(
                mine,
                records[..45].to_vec(),
                "same offsets, epochs and bytes as the leader's"
            );
            follower.close().await.unwrap();

            // Reopened with what it had applied: the rest waits for the limit.
            let (follower, _) = Store::open_limited(&follower_dir, config(), 30).await.unwrap();
            let again = Rc::new(RefCell::new(Vec::new()));
            let sink = again.clone();
            follower.set_entry_hook(Box::new(move |offset, _| sink.borrow_mut().push(offset)));
            assert_eq!(follower.get(b"k029").unwrap(), Some(b"v29".to_vec()));
            assert_eq!(follower.get(b"k031").unwrap(), None, "past the recorded applied offset");
            follower.set_apply_limit(u64::MAX);
            assert_eq!(follower.get(b"k044").unwrap(), Some(b"v44".to_vec()));
            assert_eq!(follower.get(b"k046").unwrap(), None, "cut");
            assert_eq!(*again.borrow(), vec![30, 33, 36, 39, 42]);
            // Then it takes the leader's next entries after the cut.
            let tail: Vec<&[u8]> = records[45..].iter().map(|r| r.payload.as_slice()).collect();
            let queued = follower.enqueue_replicated(3, 45, &tail).await.unwrap();
            follower.wait_written(queued).await.unwrap();
            assert_eq!(follower.get(b"k059").unwrap(), Some(b"v59".to_vec()));
        })
        .unwrap();
}
