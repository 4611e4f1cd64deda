//! BankTransferModule killed with SIGKILL while microbatches commit: after
//! each restart every microbatch is applied exactly once on every task.
//!
//! The test re-runs its own binary as the child (`RAMA_BANK_CRASH_DIR`
//! set): it appends deposits of 1 and transfers between accounts as fast as
//! it can while microbatches run, and the parent kills it at a varying
//! moment. After the last kill the parent relaunches the module and waits
//! for microbatches to catch up. Then:
//! - money is conserved: total funds equal the sum of every deposit record
//!   in the depot (a microbatch applied twice, or applied on some tasks
//!   only, breaks the equality: deposits would count twice, or a debit
//!   would stand without its credit);
//! - no balance is negative (transfers never overdraw).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Rng;
use engine::cluster::{AckLevel, InProcessCluster};
use engine::pstate::Nav;
use engine::value::Value;
use rama_examples::BankTransferModule;

const M: &str = "BankTransferModule";
const CHILD_ENV: &str = "RAMA_BANK_CRASH_DIR";
const ACCOUNTS: u64 = 32;
const TASKS: u32 = 8;
const THREADS: u32 = 2;

fn deposit(account: u64, amount: i64) -> Value {
    Value::map([
        ("account", Value::from(format!("acct{account}"))),
        ("amount", Value::Int(amount)),
    ])
}

/// The child: appends until killed (or a deadline, if never killed).
#[test]
fn bank_crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let seed: u64 = std::env::var("RAMA_BANK_CRASH_SEED").unwrap().parse().unwrap();
    let mut rng = Rng::new(seed);
    let mut cluster = InProcessCluster::new(&dir);
    cluster.launch_module::<BankTransferModule>(TASKS, THREADS).unwrap();
    let deposits = cluster.depot(M, "*deposits").unwrap();
    let transfers = cluster.depot(M, "*transfers").unwrap();
    println!("ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut id = (seed as i64) << 20;
    while Instant::now() < deadline {
        for _ in 0..8 {
            deposits
                .append(&deposit(rng.below(ACCOUNTS), 1), AckLevel::None)
                .unwrap();
        }
        for _ in 0..8 {
            id += 1;
            let record = Value::map([
                ("id", Value::Int(id)),
                ("from", Value::from(format!("acct{}", rng.below(ACCOUNTS)))),
                ("to", Value::from(format!("acct{}", rng.below(ACCOUNTS)))),
                ("amount", Value::Int(1 + rng.below(3) as i64)),
            ]);
            transfers.append(&record, AckLevel::None).unwrap();
        }
        deposits
            .append(&deposit(rng.below(ACCOUNTS), 1), AckLevel::AppendAck)
            .unwrap();
    }
    eprintln!("bank crash child: not killed within the deadline; exiting");
    std::process::exit(3);
}

#[test]
fn microbatches_survive_sigkill_exactly_once() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seed = common::seed();
    let mut rng = Rng::new(seed);
    for cycle in 0..5u64 {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["--exact", "bank_crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env("RAMA_BANK_CRASH_SEED", (seed + cycle).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Wait for "ready", then let microbatches run a varying while.
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 64];
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("ready") {
            let n = std::io::Read::read(&mut out, &mut buf).unwrap();
            assert!(n > 0, "cycle {cycle}: the child exited before it was ready");
            seen.extend_from_slice(&buf[..n]);
        }
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.code().is_none(),
            "cycle {cycle}: the child exited on its own: {status}"
        );
    }

    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<BankTransferModule>(TASKS, THREADS).unwrap();
    cluster.wait_microbatch(M, "banking", Duration::from_secs(180)).unwrap();
    let deposits = cluster.depot(M, "*deposits").unwrap();
    let mut deposited = 0i64;
    let mut records = 0usize;
    for task in 0..TASKS {
        let mut next = 0;
        loop {
            let got = deposits.read(task, next, u64::MAX, 1 << 20).unwrap();
            let Some((last, _)) = got.last() else {
                break;
            };
            next = last + 1;
            records += got.len();
            deposited += got
                .iter()
                .map(|(_, r)| r.as_map().unwrap()[&Value::from("amount")].as_int().unwrap())
                .sum::<i64>();
        }
    }
    assert!(records > 0, "the children appended nothing");
    let total = cluster.query(M, "totalFunds").unwrap().invoke(&Value::Nil).unwrap();
    assert_eq!(total, Value::Int(deposited), "funds vs {records} deposit records");
    let funds = cluster.pstate(M, "$$funds").unwrap();
    for a in 0..ACCOUNTS {
        let b = funds.select_one(&[Nav::key(format!("acct{a}"))]).unwrap();
        assert!(b.as_int().unwrap_or(0) >= 0, "acct{a} has {b:?}");
    }
    let progress = cluster.microbatch_progress(M, "banking").unwrap();
    eprintln!(
        "after 5 kills: {records} deposits, total {deposited}, microbatch {}",
        progress.id
    );
    cluster.shutdown().unwrap();
}
