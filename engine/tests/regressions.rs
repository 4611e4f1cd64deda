//! Regression tests for bugs found in review. Each opens with the bug it
//! guards against.

use std::rc::Rc;

use engine::executor::ExecutorConfig;
use engine::log::{Log, LogConfig};
use engine::lsm::{LsmConfig, Store, WriteBatch};
use engine::Error;

fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    ExecutorConfig::default().block_on(fut).expect("executor starts")
}

/// Bug: `close()` racing an appender failed the append with `Closed` while
/// its record was still written (a retry would duplicate it). Now an append
/// either succeeds or is refused before anything is queued.
#[test]
fn close_never_fails_an_append_it_then_writes() {
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let outcome = run(async {
            let (log, _) = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let big = vec![7u8; 900 << 10];
            let l = log.clone();
            let a = glommio::spawn_local(async move { l.append_batch([&big[..], &big[..], &big[..]]).await });
            futures_lite::future::yield_now().await;
            let l = log.clone();
            let c = glommio::spawn_local(async move { l.close().await });
            futures_lite::future::yield_now().await;
            let l = log.clone();
            let b = glommio::spawn_local(async move { l.append(b"b").await });
            let (rb, ra, rc) = (b.await, a.await, c.await);
            assert!(ra.is_ok(), "an append queued before close is written: {ra:?}");
            assert!(rc.is_ok(), "{rc:?}");
            rb
        });
        let on_disk = run(async {
            let (log, _) = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let records = log.read(0, u64::MAX, usize::MAX).await.unwrap();
            records.iter().any(|r| r.payload == b"b")
        });
        match outcome {
            Ok(_) => assert!(on_disk, "an acknowledged append is durable"),
            Err(Error::Closed(_)) => assert!(!on_disk, "a refused append was written anyway"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

/// Bug: reopening a log with smaller limits took intact, acknowledged
/// frames above the new limits for a torn tail and zeroed them.
#[test]
fn smaller_limits_never_cut_written_records() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (log, _) = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        log.append(b"first").await.unwrap();
        log.append(&vec![1u8; 200 << 10]).await.unwrap();
        log.append(b"third").await.unwrap();
        log.close().await.unwrap();
    });
    run(async {
        let config = LogConfig {
            record_bytes_max: 64 << 10,
            write_bytes_max: 64 << 10,
            ..LogConfig::default()
        };
        let (log, recovery) = Log::open(dir.path(), config).await.unwrap();
        assert_eq!(recovery.truncated_bytes, 0, "{recovery:?}");
        assert_eq!(log.end_offset(), 3);
        let records = log.read(0, 3, usize::MAX).await.unwrap();
        assert_eq!(records[1].payload, vec![1u8; 200 << 10]);
        // New appends still obey the new limit.
        assert!(matches!(
            log.append(&vec![0u8; 100 << 10]).await,
            Err(Error::LimitExceeded { .. })
        ));
    });
}

/// Bug: a store whose WAL ended below the manifest's checkpoint handed out
/// offsets below it, and the next replay skipped acknowledged batches.
/// Also: a smaller batch limit on reopen must not cut the WAL.
#[test]
fn store_keeps_batches_across_a_smaller_batch_limit() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (store, _) = Store::open(dir.path(), LsmConfig::default()).await.unwrap();
        let mut b = WriteBatch::new();
        for i in 0..3u8 {
            b.put([b'x', i], vec![i; 1 << 20]);
        }
        store.write(b).await.unwrap();
        store.flush().await.unwrap();
        store.close().await.unwrap();
    });
    let small = || LsmConfig {
        batch_bytes_max: 2 << 20,
        ..LsmConfig::default()
    };
    run(async {
        let (store, _) = Store::open(dir.path(), small()).await.unwrap();
        let mut b = WriteBatch::new();
        b.put(b"acked", b"yes");
        store.write(b).await.unwrap();
        store.close().await.unwrap();
    });
    run(async {
        let (store, _) = Store::open(dir.path(), small()).await.unwrap();
        assert_eq!(store.get(b"acked").unwrap().as_deref(), Some(&b"yes"[..]));
        assert_eq!(store.get(&[b'x', 2]).unwrap(), Some(vec![2u8; 1 << 20]));
    });
}

/// Bug: a flush whose manifest store failed left its table and the
/// advanced WAL checkpoint in the in-memory manifest; a compaction running
/// meanwhile then stored that manifest without the table, losing
/// acknowledged writes on reopen.
#[test]
fn failed_flush_manifest_is_never_persisted_by_a_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let config = || LsmConfig {
        compaction_trigger: 2,
        memtable_bytes_max: 256 << 20,
        ..LsmConfig::default()
    };
    run(async {
        let (store, _) = Store::open(dir.path(), config()).await.unwrap();
        for t in 0..2u32 {
            for chunk in 0..8u32 {
                let mut b = WriteBatch::new();
                for i in 0..3u32 {
                    b.put(format!("t{t}-{chunk:04}-{i}"), vec![t as u8; 1 << 20]);
                }
                store.write(b).await.unwrap();
            }
            store.flush().await.unwrap();
        }
        // The compaction started by the second flush runs; make the next
        // manifest store fail.
        let tmp = dir.path().join("MANIFEST.tmp");
        std::fs::create_dir(&tmp).unwrap();
        let mut b = WriteBatch::new();
        b.put(b"lost", b"acked");
        store.write(b).await.unwrap();
        assert!(store.flush().await.is_err(), "the flush's manifest store fails");
        std::fs::remove_dir(&tmp).unwrap();
        let _ = store.compact(false).await;
        assert_eq!(store.get(b"lost").unwrap().as_deref(), Some(&b"acked"[..]));
    });
    run(async {
        let (store, _) = Store::open(dir.path(), config()).await.unwrap();
        assert_eq!(
            store.get(b"lost").unwrap().as_deref(),
            Some(&b"acked"[..]),
            "an acknowledged write survives the failed flush"
        );
        assert_eq!(store.get(b"t0-0000-0").unwrap(), Some(vec![0u8; 1 << 20]));
    });
}

/// Bug: a read racing a trim failed with an I/O error (or returned nothing,
/// which a consumer takes for "caught up"); now it is data or
/// `OffsetOutOfRange` naming the new start.
#[test]
fn read_racing_a_trim_is_data_or_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            segment_bytes_max: 64 << 10,
            record_bytes_max: 4096,
            prewrite_bytes: 4096,
            ..LogConfig::default()
        };
        let (log, _) = Log::open(dir.path(), config).await.unwrap();
        for _ in 0..200 {
            log.append(&[3u8; 1000]).await.unwrap();
        }
        let log = Rc::new(log);
        let l = log.clone();
        let reader = glommio::spawn_local(async move { l.read(0, 10, usize::MAX).await });
        futures_lite::future::yield_now().await;
        let start = log.trim_before(150).unwrap();
        match reader.await {
            Ok(records) => assert_eq!(records.len(), 10),
            Err(Error::OffsetOutOfRange { start: s, .. }) => assert_eq!(s, start),
            Err(e) => panic!("a read racing a trim failed with {e}"),
        }
    });
}
