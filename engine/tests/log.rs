//! Depot partition log: appends, reads, segment rolls, recovery, limits.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use engine::executor::ExecutorConfig;
use engine::log::{format, Log, LogConfig};
use engine::Error;

mod common;

fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    ExecutorConfig::default().block_on(fut).expect("executor starts")
}

fn small() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        prewrite_bytes: 1024,
        index_interval_bytes: 256,
        record_bytes_max: 1000,
        pending_bytes_max: 64 << 10,
        ..LogConfig::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    let len = (i * 37 % 300) as usize;
    (0..len).map(|j| (i as usize + j) as u8).collect()
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn appends_read_back_across_segments_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (log, rec) = Log::open(dir.path(), small()).await.unwrap();
        assert_eq!(rec.truncated_bytes, 0);
        for i in 0..200u64 {
            assert_eq!(log.append(&payload(i)).await.unwrap(), i);
        }
        let all = log.read(0, u64::MAX, usize::MAX).await.unwrap();
        assert_eq!(all.len(), 200);
        for r in &all {
            assert_eq!(r.payload, payload(r.offset));
        }
        log.close().await.unwrap();
    });
    assert!(segments(dir.path()).len() > 5, "small segments must have rolled");
    run(async {
        let (log, rec) = Log::open(dir.path(), small()).await.unwrap();
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(log.end_offset(), 200);
        // Ranged reads from every start, with a byte cap.
        for start in (0..200).step_by(7) {
            let got = log.read(start, start + 10, 500).await.unwrap();
            assert!(!got.is_empty());
            assert_eq!(got[0].offset, start);
            let bytes: usize = got.iter().map(|r| r.payload.len()).sum();
            assert!(got.len() == 1 || bytes - got.last().unwrap().payload.len() < 500);
            for r in &got {
                assert_eq!(r.payload, payload(r.offset));
                assert!(r.offset < start + 10);
            }
        }
        assert_eq!(log.append(b"after reopen").await.unwrap(), 200);
        assert!(matches!(
            log.read(202, 300, 10).await,
            Err(Error::OffsetOutOfRange { .. })
        ));
        assert!(
            log.read(201, 300, 10).await.unwrap().is_empty(),
            "reading at the end is empty"
        );
        assert!(log.read(200, 300, 10).await.unwrap()[0].payload == b"after reopen");
    });
}

#[test]
fn many_appenders_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (log, _) = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let log = log.clone();
                glommio::spawn_local(async move {
                    let mut offsets = Vec::new();
                    for i in 0..20u64 {
                        let bytes = (t * 1000 + i).to_le_bytes();
                        offsets.push((log.append(&bytes).await.unwrap(), t * 1000 + i));
                    }
                    offsets
                })
            })
            .collect();
        let mut acked = Vec::new();
        for t in tasks {
            acked.extend(t.await);
        }
        assert_eq!(acked.len(), 64 * 20);
        let all = log.read(0, u64::MAX, usize::MAX).await.unwrap();
        for (offset, value) in acked {
            assert_eq!(all[offset as usize].payload, value.to_le_bytes());
        }
    });
}

#[test]
fn torn_tail_is_truncated_and_later_appends_survive() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (log, _) = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        for i in 0..10u64 {
            log.append(&payload(i)).await.unwrap();
        }
        log.close().await.unwrap();
    });
    // Simulate a crash during a write: no clean-close marker, and half a
    // frame of garbage right after the data.
    std::fs::remove_file(dir.path().join("CLOSED_CLEANLY")).expect("a clean close leaves its marker");
    let tail = segments(dir.path()).pop().unwrap();
    // Sequential appends: one frame per record.
    let data_end = 32
        + (0..10u64)
            .map(|i| format::frame_bytes([payload(i).len()]) as u64)
            .sum::<u64>();
    let mut f = OpenOptions::new().write(true).open(&tail).unwrap();
    f.seek(SeekFrom::Start(data_end)).unwrap();
    f.write_all(&[7u8; 9]).unwrap();
    drop(f);
    run(async {
        let (log, rec) = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        assert!(rec.truncated_bytes > 0, "{rec:?}");
        assert!(rec.reason.as_deref().unwrap().contains("offset 10"), "{rec:?}");
        assert_eq!(log.end_offset(), 10);
        // A shorter record now, so stale bytes could line up behind it if
        // the tail had not been zeroed.
        assert_eq!(log.append(b"x").await.unwrap(), 10);
        log.close().await.unwrap();
    });
    run(async {
        let (log, rec) = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        assert_eq!(rec.truncated_bytes, 0, "{rec:?}");
        assert_eq!(log.end_offset(), 11);
        assert_eq!(log.read(10, 11, 100).await.unwrap()[0].payload, b"x");
    });
}

#[test]
fn flipped_bit_in_a_closed_segment_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (log, _) = Log::open(dir.path(), small()).await.unwrap();
        for i in 0..100u64 {
            log.append(&payload(i + 1)).await.unwrap();
        }
        log.close().await.unwrap();
    });
    let first = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[32 + 16 + 3] ^= 0x10; // inside the first record's payload
    std::fs::write(&first, &bytes).unwrap();
    run(async {
        let (log, _) = Log::open(dir.path(), small()).await.unwrap();
        match log.read(0, 10, usize::MAX).await {
            Err(Error::Corrupt {
                path, offset, reason, ..
            }) => {
                assert_eq!(path, first);
                assert_eq!(offset, 0);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected a corruption error, got {other:?}"),
        }
    });
}

#[test]
fn limits_are_typed_errors_and_nothing_is_appended() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (log, _) = Log::open(dir.path(), small()).await.unwrap();
        log.append(b"ok").await.unwrap();
        let big = vec![1u8; 1001];
        let batch: Vec<&[u8]> = vec![b"fine", &big];
        match log.append_batch(batch.iter().copied()).await {
            Err(Error::LimitExceeded { limit, size, max, .. }) => {
                assert_eq!((limit, size, max), ("record_bytes_max", 1001, 1000));
            }
            other => panic!("expected a limit error, got {other:?}"),
        }
        assert_eq!(log.end_offset(), 1, "a refused batch appends nothing");
        assert!(log.append(b"").await.is_ok(), "empty records are valid");
    });
    let bad = LogConfig {
        segment_bytes_max: 10,
        ..LogConfig::default()
    };
    let err = run(async { Log::open(dir.path(), bad).await.map(|_| ()) }).unwrap_err();
    assert!(err.to_string().contains("segment_bytes_max"), "{err}");
}

#[test]
fn entries_max_trims_whole_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            entries_max: Some(50),
            ..small()
        };
        let (log, _) = Log::open(dir.path(), config).await.unwrap();
        for i in 0..300u64 {
            log.append(&payload(i)).await.unwrap();
        }
        let start = log.start_offset();
        assert!(start > 0 && start <= 250, "start {start}");
        assert!(matches!(
            log.read(0, 10, 100).await,
            Err(Error::OffsetOutOfRange { .. })
        ));
        let kept = log.read(start, u64::MAX, usize::MAX).await.unwrap();
        assert_eq!(kept.len() as u64, 300 - start);
        assert_eq!(kept[0].payload, payload(start));
    });
}

/// A write that fails (here: the file system is full) poisons the log:
/// the append that hit it fails, and nothing is acknowledged while the
/// device stays full; once space comes back the log heals by itself and
/// takes appends at its durable end, losing nothing acknowledged. Needs
/// root to mount a small tmpfs (CI runs as root).
#[test]
fn a_full_device_poisons_the_log_until_space_returns() {
    let mount = common::Tmpfs::mount("256k");
    // Ballast takes most of the space, so the log fills the rest quickly.
    let ballast = mount.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 128 << 10]).unwrap();
    let config = LogConfig {
        segment_bytes_max: 64 << 10,
        prewrite_bytes: 4 << 10,
        prewrite_skip_bytes: u64::MAX,
        record_bytes_max: 8 << 10,
        ..LogConfig::default()
    };
    // Every acknowledged record, by offset: each is distinct, so a record
    // in the wrong place would show.
    let payload = |n: usize| {
        let mut p = vec![(n % 251) as u8; 4000];
        p[..8].copy_from_slice(&(n as u64).to_le_bytes());
        p
    };
    let mut acked: Vec<Vec<u8>> = Vec::new();
    run(async {
        let (log, _) = Log::open(mount.path().join("log"), config.clone()).await.unwrap();
        let mut n = 0;
        let err = loop {
            n += 1;
            match log.append(&payload(n)).await {
                Ok(offset) => {
                    assert_eq!(offset, acked.len() as u64);
                    acked.push(payload(n));
                    assert!(acked.len() < 1000, "a 256 KiB file system cannot hold this much");
                }
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::Io { .. } | Error::Poisoned { .. }), "{err}");
        // While the device is full, nothing more is acknowledged.
        for _ in 0..5 {
            n += 1;
            assert!(log.append(&payload(n)).await.is_err(), "acknowledged on a full device");
        }
        assert_eq!(
            log.end_offset(),
            acked.len() as u64,
            "nothing is acknowledged past the failure"
        );
        // Regression: the log stayed poisoned until the process restarted,
        // even once space was free. It heals by itself now.
        std::fs::remove_file(&ballast).unwrap();
        let offset = common::until_healed(|| {
            n += 1;
            let p = payload(n);
            let log = &log;
            async move { log.append(&p).await }
        })
        .await;
        assert_eq!(offset, acked.len() as u64, "the failed records left no trace");
        acked.push(payload(n));
        for _ in 0..10 {
            n += 1;
            let offset = log.append(&payload(n)).await.expect("appends go on after healing");
            assert_eq!(offset, acked.len() as u64);
            acked.push(payload(n));
        }
        log.close().await.unwrap();
    });
    // Reopened: exactly the acknowledged records, in order.
    run(async {
        let (log, _) = Log::open(mount.path().join("log"), config).await.unwrap();
        let records = log.read(0, u64::MAX, usize::MAX).await.unwrap();
        assert_eq!(records.len(), acked.len());
        for (r, want) in records.iter().zip(&acked) {
            assert_eq!(&r.payload, want, "record {}", r.offset);
        }
        log.close().await.unwrap();
    });
}

/// A log closed cleanly had no write in flight: a bad frame at its end is
/// damage, not a torn write, and is refused (twice: the refusal leaves the
/// evidence in place) instead of being cut away as a torn tail would be.
#[test]
fn damage_at_the_end_of_a_cleanly_closed_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (log, _) = Log::open(dir.path(), small()).await.unwrap();
        for i in 0..50u64 {
            log.append(&payload(i)).await.unwrap();
        }
        log.close().await.unwrap();
    });
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = bytes.iter().rposition(|&b| b != 0).unwrap();
    bytes[last - 3] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    for _ in 0..2 {
        run(async {
            match Log::open(dir.path(), small()).await {
                Err(Error::Corrupt { path, reason, .. }) => {
                    assert_eq!(path, seg);
                    assert!(reason.contains("closed cleanly"), "{reason}");
                }
                Err(e) => panic!("expected Corrupt, got {e}"),
                Ok((log, r)) => panic!("opened a damaged log at end {}: {r:?}", log.end_offset()),
            }
        });
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing was changed");
    }
}

/// Fills a log with records in multi-record frames of several epochs and
/// returns (epoch, payload) per offset.
async fn filled(log: &Log, rng: &mut common::Rng, n: u64) -> Vec<(u32, Vec<u8>)> {
    let mut model = Vec::new();
    let mut epoch = 1;
    log.set_epoch(epoch);
    while (model.len() as u64) < n {
        if rng.below(4) == 0 {
            epoch += 1;
            log.set_epoch(epoch);
        }
        let batch: Vec<Vec<u8>> = (0..rng.range(1, 12)).map(|_| payload(rng.below(1000))).collect();
        log.append_batch(batch.iter().map(|p| p.as_slice())).await.unwrap();
        model.extend(batch.into_iter().map(|p| (epoch, p)));
    }
    model
}

async fn assert_holds(log: &Log, model: &[(u32, Vec<u8>)]) {
    let start = log.start_offset();
    let got = log.read(start, u64::MAX, usize::MAX).await.unwrap();
    assert_eq!(log.end_offset(), model.len() as u64);
    assert_eq!(got.len() as u64, model.len() as u64 - start);
    for r in got {
        let (epoch, payload) = &model[r.offset as usize];
        assert_eq!((r.epoch, &r.payload), (*epoch, payload), "record {}", r.offset);
    }
}

#[test]
fn a_tail_cut_anywhere_holds_across_crashes_at_every_step() {
    use engine::log::CutStop;
    let seed = common::seed_from_env("RAMA_TRUNCATE_SEED");
    let mut rng = common::Rng::new(seed);
    for round in 0..24 {
        let dir = tempfile::tempdir().unwrap();
        let stop = [CutStop::Never, CutStop::AfterRedo, CutStop::AfterFrame][round % 3];
        let (mut model, to, epoch) = run(async {
            let (log, _) = Log::open(dir.path(), small()).await.unwrap();
            let n = rng.range(1, 120);
            let model = filled(&log, &mut rng, n).await;
            // Sometimes exactly at a segment's start or at the very start.
            let to = match rng.below(5) {
                0 => 0,
                1 => *segments(dir.path())
                    .iter()
                    .filter_map(|p| p.file_stem()?.to_str()?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
                    .last()
                    .unwrap(),
                _ => rng.below(model.len() as u64 + 1),
            };
            log.truncate_stopping(to, stop).await.unwrap();
            if stop == CutStop::Never {
                let mut cut = model.clone();
                cut.truncate(to as usize);
                assert_holds(&log, &cut).await;
                assert_eq!(log.append(b"after").await.unwrap(), to, "seed {seed}");
                log.close().await.unwrap();
            }
            // Otherwise the process "dies" here: no close.
            (model, to, log.epoch())
        });
        let cut_something = to < model.len() as u64;
        model.truncate(to as usize);
        if stop == CutStop::Never {
            model.push((epoch, b"after".to_vec()));
        }
        run(async {
            let (log, recovery) = Log::open(dir.path(), small()).await.unwrap();
            let redone = (stop != CutStop::Never && cut_something).then_some(to);
            assert_eq!(recovery.completed_truncation, redone, "seed {seed}, round {round}");
            assert!(!dir.path().join("TRUNCATE").exists());
            assert_holds(&log, &model).await;
            let next = log.append(b"next").await.unwrap();
            assert_eq!(next, model.len() as u64, "seed {seed}");
            model.push((log.epoch(), b"next".to_vec()));
            log.close().await.unwrap();
        });
        run(async {
            let (log, _) = Log::open(dir.path(), small()).await.unwrap();
            assert_holds(&log, &model).await;
        });
    }
}

#[test]
fn a_cut_below_the_trimmed_start_is_refused_and_appends_wait_for_none() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (log, _) = Log::open(dir.path(), small()).await.unwrap();
        for i in 0..200u64 {
            log.append(&payload(i)).await.unwrap();
        }
        let start = log.trim_before(100).unwrap();
        assert!(start > 0);
        match log.truncate(start - 1).await {
            Err(Error::OffsetOutOfRange { requested, .. }) => assert_eq!(requested, start - 1),
            other => panic!("expected a refusal, got {other:?}"),
        }
        log.truncate(500).await.unwrap();
        assert_eq!(log.end_offset(), 200, "a cut past the end changes nothing");
        log.truncate(start).await.unwrap();
        assert_eq!((log.start_offset(), log.end_offset()), (start, start));
        assert_eq!(log.append(b"x").await.unwrap(), start);
        log.close().await.unwrap();
    });
}
