//! The module artifact as a worker process: remote clients over the wire
//! protocol get what in-process clients get; SIGTERM stops it cleanly and
//! a new worker over the same directory finds the data.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{secret_in, seed, sentence, start_worker, stop_worker, Rng};
use engine::cluster::AckLevel;
use engine::pstate::Nav;
use engine::value::Value;
use engine::Error;
use net::remote::RemoteCluster;
use rama_examples::words;

#[test]
fn wordcount_through_a_worker_process() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = start_worker(dir.path(), "WordCountModule");
    let cluster = RemoteCluster::connect(&addr, &secret_in(dir.path()).1).unwrap();
    let depot = cluster.depot("WordCountModule", "*sentences");
    let mut rng = Rng::new(seed());
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let depot = depot.clone();
                let batch: Vec<String> = (0..100).map(|_| sentence(&mut rng)).collect();
                for t in &batch {
                    for w in words(t) {
                        *expected.entry(w).or_insert(0) += 1;
                    }
                }
                s.spawn(move || {
                    for t in batch {
                        let r = depot.append(&Value::from(t), AckLevel::Ack).unwrap();
                        assert!(r.offset.is_some());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    let counts = cluster.pstate("WordCountModule", "$$wordCounts");
    for (w, c) in &expected {
        assert_eq!(
            counts.select_one(&[Nav::key(w.as_str())]).unwrap(),
            Value::Int(*c),
            "{w}"
        );
    }
    let top = cluster
        .query("WordCountModule", "topWords")
        .invoke(&Value::Int(1))
        .unwrap();
    let (best, n) = expected
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .unwrap();
    assert_eq!(
        top,
        Value::list([Value::list([Value::from(best.as_str()), Value::Int(*n)])])
    );
    let total: usize = (0..8)
        .map(|t| depot.read(t, 0, u64::MAX, usize::MAX).unwrap().len())
        .sum();
    assert_eq!(total, 400);

    // Bad input comes back as the same kinds of errors.
    let err = cluster
        .depot("WordCountModule", "*nope")
        .append(&Value::from("x"), AckLevel::Ack);
    assert!(
        matches!(&err, Err(Error::Schema(m)) if m.contains("has no depot *nope")),
        "{err:?}"
    );
    let err = depot.append(&Value::Int(3), AckLevel::Ack);
    assert!(
        matches!(&err, Err(Error::Topology(m)) if m.contains("must be a string")),
        "{err:?}"
    );
    let err = counts.select(&[Nav::All]);
    assert!(
        matches!(&err, Err(Error::Schema(m)) if m.contains("must start with a key")),
        "{err:?}"
    );

    drop((cluster, depot, counts));
    stop_worker(child);

    // A new worker over the same directory serves the same counts.
    let (child, addr) = start_worker(dir.path(), "WordCountModule");
    let cluster = RemoteCluster::connect(&addr, &secret_in(dir.path()).1).unwrap();
    let counts = cluster.pstate("WordCountModule", "$$wordCounts");
    for (w, c) in &expected {
        assert_eq!(
            counts.select_one(&[Nav::key(w.as_str())]).unwrap(),
            Value::Int(*c),
            "{w}"
        );
    }
    drop((cluster, counts));
    stop_worker(child);
}

#[test]
fn worker_refuses_unknown_modules_and_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rama-examples"))
        .args(["worker", "--module", "Nope", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no module Nope") && err.contains("WordCountModule"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_rama-examples"))
        .args(["worker", "--module", "WordCountModule", "--port", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_rama-examples"))
        .args(["worker", "--module", "WordCountModule", "--tasks", "3", "--secretFile"])
        .arg(secret_in(dir.path()).0)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    // Fail closed: a worker without the cluster secret does not start.
    let out = Command::new(env!("CARGO_BIN_EXE_rama-examples"))
        .args(["worker", "--module", "WordCountModule", "--dir"])
        .arg(dir.path().join("nosecret"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs the cluster secret"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("nosecret").exists(),
        "nothing is stored by a worker that did not start"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_rama-examples"))
        .arg("describe")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"engine_version\"") && text.contains("BankTransferModule"));
}

#[test]
fn a_worker_rotates_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rama-examples"))
        .args([
            "worker",
            "--module",
            "WordCountModule",
            "--tasks",
            "2",
            "--threads",
            "1",
        ])
        .arg("--secretFile")
        .arg(secret_in(dir.path()).0)
        .args(["--logRotateBytes", "4096", "--logKeep", "2", "--log"])
        .arg(&log)
        .arg("--dir")
        .arg(dir.path().join("data"))
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    common::eventually("the worker to start", std::time::Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("worker listening on"))
    });
    // Someone else's lines pass the limit: the worker rotates the file and
    // goes on writing to a new one.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &[b'x'; 5000]))
        .unwrap();
    let rotated = dir.path().join("worker.log.1");
    common::eventually("the log to be rotated", std::time::Duration::from_secs(30), || {
        rotated.is_file()
    });
    assert!(std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("worker listening on"));
    assert!(std::fs::metadata(&log).unwrap().len() < 4096);
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
