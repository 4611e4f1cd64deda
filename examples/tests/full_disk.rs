//! A worker whose data device fills up, then has room again.
//!
//! Regression: after ENOSPC the depot log stayed poisoned and the stream
//! topology stopped until the worker was restarted by hand, even once
//! space was free. Now appends fail while the device is full (nothing
//! unproven is acknowledged), and once space returns the same worker
//! process takes appends again and its topology processes them: an `Ack`
//! append succeeds only after WordCount counted it. Needs root to mount a
//! small tmpfs (CI runs as root).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use common::{secret_in, start_worker_with, stop_worker};
use engine::cluster::AckLevel;
use engine::pstate::Nav;
use engine::value::Value;
use net::remote::RemoteCluster;

struct Tmpfs(tempfile::TempDir);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_worker_recovers_from_a_full_disk_without_a_restart() {
    let home = tempfile::tempdir().unwrap();
    let mount = Tmpfs(tempfile::tempdir().unwrap());
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(mount.0.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot mount a tmpfs (this test needs root, as CI has)");
    let data = mount.0.path().join("worker");
    let (child, addr) = start_worker_with(home.path(), &data, "WordCountModule", ["2", "1"]);
    let cluster = RemoteCluster::connect(&addr, &secret_in(home.path()).1).unwrap();
    let depot = cluster.depot("WordCountModule", "*sentences");
    let counts = cluster.pstate("WordCountModule", "$$wordCounts");
    let mut acked: BTreeMap<String, i64> = BTreeMap::new();
    let ack = |word: String, acked: &mut BTreeMap<String, i64>| *acked.entry(word).or_insert(0) += 1;
    // A few appends while there is room.
    for i in 0..20 {
        let w = format!("before{i}");
        depot.append(&Value::from(w.as_str()), AckLevel::Ack).unwrap();
        ack(w, &mut acked);
    }
    // Fill the device to the last byte.
    let ballast = mount.0.path().join("ballast");
    {
        let mut f = std::fs::File::create(&ballast).unwrap();
        while f.write_all(&[7u8; 1 << 16]).is_ok() {}
        let _ = f.sync_all();
    }
    // Appends fail (with a clear error) once the logs need room. Records
    // several kilobytes long use up the space the logs hold in advance.
    let big = |i: u64| format!("full{i} {}", "pad ".repeat(15_000));
    let mut failed = None;
    for i in 0..2000u64 {
        match depot.append(&Value::from(big(i)), AckLevel::AppendAck) {
            Ok(_) => {}
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    let failed = failed.expect("appends fail on a full device");
    assert!(failed.contains("I/O") || failed.contains("took no writes"), "{failed}");
    // Space comes back: the same worker takes Ack appends again, which
    // means the stream topology runs again too.
    std::fs::remove_file(&ballast).unwrap();
    let started = Instant::now();
    loop {
        match depot.append(&Value::from("after"), AckLevel::Ack) {
            Ok(_) => {
                ack("after".into(), &mut acked);
                break;
            }
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "the worker never recovered: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    // Each partition's log heals on its own (with its own backoff): an
    // append may still meet one that has not yet.
    for i in 0..50 {
        let w = format!("later{i}");
        loop {
            match depot.append(&Value::from(w.as_str()), AckLevel::Ack) {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(90),
                        "the worker never recovered: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        ack(w, &mut acked);
    }
    // Every acknowledged word is counted: at least once (a batch that met
    // the full disk runs again), and the words appended one per record
    // exactly once here.
    for (w, n) in &acked {
        let got = counts.select_one(&[Nav::key(w.as_str())]).unwrap();
        let got = got.as_int().unwrap_or(0);
        assert!(got >= *n, "{w}: counted {got}, acknowledged {n}");
    }
    drop((depot, counts, cluster));
    stop_worker(child);
}
