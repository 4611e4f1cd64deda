//! BankTransferModule: exactly-once microbatches under injected failures,
//! atomic visibility across tasks, pause/resume and restart.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{seed, Rng};
use engine::cluster::{AckLevel, InProcessCluster};
use engine::pstate::Nav;
use engine::value::Value;
use rama_examples::BankTransferModule;

const M: &str = "BankTransferModule";
const WAIT: Duration = Duration::from_secs(120);
const SOURCES: usize = 24;
const SINKS: usize = 16;
const DEPOSIT: i64 = 1000;

fn deposit(account: &str, amount: i64) -> Value {
    Value::map([("account", Value::from(account)), ("amount", Value::Int(amount))])
}

fn transfer(id: i64, from: &str, to: &str, amount: i64) -> Value {
    Value::map([
        ("id", Value::Int(id)),
        ("from", Value::from(from)),
        ("to", Value::from(to)),
        ("amount", Value::Int(amount)),
    ])
}

/// Transfers only from source accounts to sink accounts, so whether one is
/// rejected depends only on its source's earlier transfers (in depot
/// order), never on the order credits arrive in.
struct Reference {
    balances: BTreeMap<String, i64>,
    rejected: BTreeMap<String, BTreeSet<i64>>,
}

fn run_transfers(cluster: &InProcessCluster, rng: &mut Rng, count: i64, first_id: i64, reference: &mut Reference) {
    let transfers = cluster.depot(M, "*transfers").unwrap();
    let pending: Vec<_> = (first_id..first_id + count)
        .map(|id| {
            let from = format!("src{}", rng.below(SOURCES as u64));
            let to = format!("dst{}", rng.below(SINKS as u64));
            let amount = 1 + rng.below(300) as i64;
            let balance = reference.balances.entry(from.clone()).or_insert(0);
            if *balance >= amount {
                *balance -= amount;
                *reference.balances.entry(to.clone()).or_insert(0) += amount;
            } else {
                reference.rejected.entry(from.clone()).or_default().insert(id);
            }
            // Appends from one thread, in order: each source's transfers are
            // in its partition in this order.
            transfers
                .append(&transfer(id, &from, &to, amount), AckLevel::AppendAck)
                .unwrap()
        })
        .collect();
    assert_eq!(pending.len() as i64, count);
}

fn check(cluster: &InProcessCluster, reference: &Reference) {
    let funds = cluster.pstate(M, "$$funds").unwrap();
    let rejected = cluster.pstate(M, "$$rejectedTransfers").unwrap();
    for (account, balance) in &reference.balances {
        assert_eq!(
            funds.select_one(&[Nav::key(account.as_str())]).unwrap(),
            Value::Int(*balance),
            "balance of {account}"
        );
    }
    for s in 0..SOURCES {
        let account = format!("src{s}");
        let got: BTreeSet<i64> = rejected
            .select(&[Nav::key(account.as_str()), Nav::All])
            .unwrap()
            .iter()
            .map(|v| v.as_int().unwrap())
            .collect();
        let want = reference.rejected.get(&account).cloned().unwrap_or_default();
        assert_eq!(got, want, "rejected transfers of {account}");
    }
    let total: i64 = reference.balances.values().sum();
    assert_eq!(
        cluster.query(M, "totalFunds").unwrap().invoke(&Value::Nil).unwrap(),
        Value::Int(total)
    );
}

fn exactly_once_under_failures(tasks: u32, threads: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(seed());
    let injected = Arc::new(AtomicU64::new(0));
    let mut cluster = InProcessCluster::new(dir.path());
    {
        let injected = injected.clone();
        let victim = tasks - 1;
        // Fail the first two attempts of every third microbatch on one task,
        // in the credit stage (after other tasks already computed their
        // part), and the first attempt of every fifth in stage 0.
        cluster.set_fault_hook(move |p| {
            let Some((id, attempt)) = p.microbatch else {
                return false;
            };
            let fail = p.task == victim
                && ((p.stage == 1 && id % 3 == 0 && attempt < 2) || (p.stage == 0 && id % 5 == 0 && attempt == 0));
            if fail {
                injected.fetch_add(1, Ordering::Relaxed);
            }
            fail
        });
    }
    cluster.launch_module::<BankTransferModule>(tasks, threads).unwrap();
    let deposits = cluster.depot(M, "*deposits").unwrap();
    let mut reference = Reference {
        balances: BTreeMap::new(),
        rejected: BTreeMap::new(),
    };
    for s in 0..SOURCES {
        let account = format!("src{s}");
        deposits
            .append(&deposit(&account, DEPOSIT), AckLevel::AppendAck)
            .unwrap();
        reference.balances.insert(account, DEPOSIT);
    }
    cluster.wait_microbatch(M, "banking", WAIT).unwrap();
    let total = DEPOSIT * SOURCES as i64;
    assert_eq!(
        cluster.query(M, "totalFunds").unwrap().invoke(&Value::Nil).unwrap(),
        Value::Int(total)
    );

    // While transfers commit, every read of the total sees whole
    // microbatches only: money is never missing or doubled.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = std::thread::scope(|s| {
        let reader = {
            let stop = stop.clone();
            let query = cluster.query(M, "totalFunds").unwrap();
            s.spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(query.invoke(&Value::Nil).unwrap(), Value::Int(total), "read {reads}");
                    reads += 1;
                }
                reads
            })
        };
        run_transfers(&cluster, &mut rng, 1500, 1, &mut reference);
        cluster.wait_microbatch(M, "banking", WAIT).unwrap();
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    });
    assert!(reads > 0);
    check(&cluster, &reference);
    let progress = cluster.microbatch_progress(M, "banking").unwrap();
    assert!(injected.load(Ordering::Relaxed) > 0, "no fault was injected");
    assert!(progress.failed_attempts > 0, "{progress:?}");
    assert!(
        progress.last_error.as_deref().unwrap_or("").contains("fault injected"),
        "{progress:?}"
    );
    cluster.shutdown().unwrap();

    // Restart: nothing applied twice, and new input is processed.
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<BankTransferModule>(tasks, threads).unwrap();
    check(&cluster, &reference);
    run_transfers(&cluster, &mut rng, 200, 5000, &mut reference);
    cluster.wait_microbatch(M, "banking", WAIT).unwrap();
    check(&cluster, &reference);
    cluster.shutdown().unwrap();
}

#[test]
fn exactly_once_under_failures_8_tasks_4_threads() {
    exactly_once_under_failures(8, 4);
}

#[test]
fn exactly_once_under_failures_1_task_1_thread() {
    exactly_once_under_failures(1, 1);
}

#[test]
fn pause_holds_microbatches_and_resume_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<BankTransferModule>(4, 2).unwrap();
    let deposits = cluster.depot(M, "*deposits").unwrap();
    deposits.append(&deposit("a", 5), AckLevel::AppendAck).unwrap();
    cluster.wait_microbatch(M, "banking", WAIT).unwrap();
    cluster.pause_microbatch(M, "banking").unwrap();
    let before = cluster.microbatch_progress(M, "banking").unwrap().id;
    deposits.append(&deposit("a", 7), AckLevel::AppendAck).unwrap();
    let err = cluster
        .wait_microbatch(M, "banking", Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not catch up"), "{err}");
    let funds = cluster.pstate(M, "$$funds").unwrap();
    assert_eq!(funds.select_one(&[Nav::key("a")]).unwrap(), Value::Int(5));
    assert_eq!(cluster.microbatch_progress(M, "banking").unwrap().id, before);
    cluster.resume_microbatch(M, "banking").unwrap();
    cluster.wait_microbatch(M, "banking", WAIT).unwrap();
    assert_eq!(funds.select_one(&[Nav::key("a")]).unwrap(), Value::Int(12));
    let err = cluster.pause_microbatch(M, "nope").unwrap_err().to_string();
    assert!(err.contains("has no topology nope"), "{err}");
    cluster.shutdown().unwrap();
}

/// Reads started and answered but not yet awaited never hold a commit
/// back: the gate ticket belongs to the request, released by its answer.
#[test]
fn unawaited_reads_do_not_block_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<BankTransferModule>(4, 2).unwrap();
    let deposits = cluster.depot(M, "*deposits").unwrap();
    let funds = cluster.pstate(M, "$$funds").unwrap();
    let totals = cluster.query(M, "totalFunds").unwrap();
    deposits.append(&deposit("a", DEPOSIT), AckLevel::AppendAck).unwrap();
    cluster.wait_microbatch(M, "banking", WAIT).unwrap();
    // Many reads in flight (more than a task thread's channel holds), none
    // awaited, while more microbatches must commit.
    let selects: Vec<_> = (0..5000)
        .map(|_| funds.select_future(None, vec![Nav::key("a")]))
        .collect();
    let queries: Vec<_> = (0..16).map(|_| totals.invoke_future(&Value::Nil)).collect();
    for round in 0..3 {
        deposits.append(&deposit("a", DEPOSIT), AckLevel::AppendAck).unwrap();
        cluster
            .wait_microbatch(M, "banking", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    for f in selects {
        let v = futures_lite::future::block_on(f).unwrap();
        assert!(
            matches!(v[..], [Value::Int(n)] if n >= DEPOSIT && n % DEPOSIT == 0),
            "{v:?}"
        );
    }
    for q in queries {
        futures_lite::future::block_on(q).unwrap();
    }
    assert_eq!(funds.select_one(&[Nav::key("a")]).unwrap(), Value::Int(4 * DEPOSIT));
    cluster.shutdown().unwrap();
}
