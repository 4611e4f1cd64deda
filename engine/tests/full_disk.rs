//! A PState store on a device that fills up and then has room again.
//!
//! Regression: after ENOSPC the store's WAL stayed poisoned and a failed
//! memtable flush poisoned the store for good, so the worker had to be
//! restarted by hand even once space was free. Now nothing is acknowledged
//! while the device is full, the store heals by itself once it has room,
//! and every acknowledged batch survives a reopen.

use engine::executor::ExecutorConfig;
use engine::lsm::{LsmConfig, Store, WriteBatch};

mod common;

fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    ExecutorConfig::default().block_on(fut).expect("executor starts")
}

fn config() -> LsmConfig {
    // Small memtables: flushes (table writes) happen while the device is
    // full too.
    common::small_store_config()
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

fn value(i: u32) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; 1500];
    v[..4].copy_from_slice(&i.to_le_bytes());
    v
}

/// One write of key `i`, given `wait` to finish; `None` if it is still
/// waiting then (the future is kept, to be awaited later).
async fn write_within(
    pending: &mut std::pin::Pin<Box<dyn std::future::Future<Output = engine::Result<()>> + '_>>,
    wait: std::time::Duration,
) -> Option<engine::Result<()>> {
    futures_lite::future::or(async { Some(pending.as_mut().await) }, async {
        glommio::timer::sleep(wait).await;
        None
    })
    .await
}

fn batch(i: u32) -> WriteBatch {
    let mut b = WriteBatch::new();
    b.put(key(i), value(i));
    b
}

/// Fills the device at `dir` to the last byte.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).unwrap();
    while f.write_all(&[1u8; 4096]).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_device_stops_writes_until_space_returns_and_loses_nothing() {
    let mount = common::Tmpfs::mount("1m");
    let dir = mount.path().join("store");
    let mut acked = Vec::new();
    run(async {
        let mut c = config();
        // The WAL's zero fill runs far ahead, so WAL writes keep going into
        // space it already holds while a table flush finds the device full.
        c.wal.prewrite_bytes = 192 << 10;
        c.wal.segment_bytes_max = 256 << 10;
        let (store, _) = Store::open(&dir, c).await.unwrap();
        let ballast = fill(mount.path());
        let mut i = 0u32;
        // Writes until one fails or waits (a memtable full behind a flush
        // that cannot write its table): nothing after that is acknowledged.
        let mut stuck = loop {
            i += 1;
            let mut pending: std::pin::Pin<Box<dyn std::future::Future<Output = engine::Result<()>>>> =
                Box::pin(store.write(batch(i)));
            match write_within(&mut pending, std::time::Duration::from_secs(3)).await {
                Some(Ok(())) => acked.push(i),
                Some(Err(_)) => break None,
                None => break Some((i, pending)),
            }
            assert!(i < 10_000, "a 1 MiB device cannot hold this much");
        };
        assert!(!acked.is_empty());
        std::fs::remove_file(&ballast).unwrap();
        // The waiting write finishes once there is room, without a restart.
        if let Some((k, pending)) = stuck.take() {
            pending.await.expect("the write that waited for room is taken");
            acked.push(k);
        }
        common::until_healed(|| {
            i += 1;
            store.write(batch(i))
        })
        .await;
        acked.push(i);
        for _ in 0..100 {
            i += 1;
            store.write(batch(i)).await.expect("writes go on after healing");
            acked.push(i);
        }
        for &k in &acked {
            assert_eq!(store.get(&key(k)).unwrap(), Some(value(k)), "key {k} before reopen");
        }
        store.flush().await.expect("a flush works once there is room");
        assert!(
            store.stats().retries > 0,
            "a flush failed on the full device and was tried again"
        );
        store.close().await.unwrap();
    });
    run(async {
        let (store, _) = Store::open(&dir, config()).await.unwrap();
        for &k in &acked {
            assert_eq!(store.get(&key(k)).unwrap(), Some(value(k)), "key {k} after reopen");
        }
        store.close().await.unwrap();
    });
}

/// Flipped bits in a store's WAL and tables: reopening either restores
/// every acknowledged batch or refuses with an error naming the damaged
/// file; a read of a damaged table block is an error, never wrong data.
/// Regression for the store side of a depot segment whose damage was taken
/// for a torn tail (the WAL is the same log code).
#[test]
fn flipped_bits_in_wal_and_tables_are_refused_or_harmless() {
    let seed = common::seed_from_env("RAMA_DAMAGE_SEED");
    println!("seed {seed} (RAMA_DAMAGE_SEED replays it)");
    let mut rng = common::Rng::new(seed);
    let pristine = tempfile::tempdir().unwrap();
    let n = 600u32;
    run(async {
        let (store, _) = Store::open(pristine.path(), config()).await.unwrap();
        for i in 0..n {
            store.write(batch(i)).await.unwrap();
        }
        store.close().await.unwrap();
    });
    let files: Vec<std::path::PathBuf> = walk(pristine.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log" || e == "sst"))
        .collect();
    assert!(
        files.iter().any(|p| p.extension().is_some_and(|e| e == "sst")),
        "tables were flushed"
    );
    assert!(
        files.iter().any(|p| p.extension().is_some_and(|e| e == "log")),
        "the WAL has segments"
    );
    for trial in 0..24 {
        let copy = tempfile::tempdir().unwrap();
        for f in walk(pristine.path()) {
            let to = copy.path().join(f.strip_prefix(pristine.path()).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&f, &to).unwrap();
        }
        let victim = &files[rng.below(files.len() as u64) as usize];
        let target = copy.path().join(victim.strip_prefix(pristine.path()).unwrap());
        let mut bytes = std::fs::read(&target).unwrap();
        // Within the data (a WAL segment's zero fill is not data).
        let end = bytes.iter().rposition(|&b| b != 0).unwrap_or(0) + 1;
        let at = rng.below(end as u64) as usize;
        bytes[at] ^= 1 << rng.below(8);
        std::fs::write(&target, &bytes).unwrap();
        let ctx = format!(
            "seed {seed} trial {trial}: bit flipped at byte {at} of {}",
            target.display()
        );
        run(async {
            let (store, _) = match Store::open(copy.path(), config()).await {
                Ok(s) => s,
                Err(e) => {
                    assert!(
                        matches!(e, engine::Error::Corrupt { .. }),
                        "{ctx}: a refused open is a corruption error, got {e}"
                    );
                    return;
                }
            };
            for i in 0..n {
                match store.get(&key(i)) {
                    Ok(v) => assert!(
                        v.as_deref() == Some(&value(i)[..]),
                        "{ctx}: key {i} must be whole or refused, got {:?} bytes",
                        v.map(|v| v.len())
                    ),
                    Err(e) => assert!(matches!(e, engine::Error::Corrupt { .. }), "{ctx}: key {i}: {e}"),
                }
            }
            let _ = store.close().await;
        });
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
