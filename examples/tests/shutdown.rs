//! A cluster that shuts down frees its task threads' state (stores,
//! memtables, logs): a process that launches modules again and again (the
//! benchmark harness, a worker relaunching a module) does not grow.
//! Alone in its binary: it counts every task thread of the process.

use std::time::Duration;

use engine::cluster::{live_task_threads, AckLevel, InProcessCluster};
use engine::module::Module;
use engine::pstate::Nav;
use engine::value::Value;
use rama_examples::{BankTransferModule, WordCountModule};

#[test]
fn shutdown_frees_every_task_thread() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3i64 {
        let mut cluster = InProcessCluster::new(dir.path());
        cluster.launch(WordCountModule::define().unwrap(), 8, 2).unwrap();
        cluster.launch(BankTransferModule::define().unwrap(), 4, 2).unwrap();
        assert_eq!(live_task_threads(), 4, "round {round}");

        // A stream topology and a microbatch topology both did work.
        let sentences = cluster.depot("WordCountModule", "*sentences").unwrap();
        for _ in 0..50 {
            sentences.append(&Value::from("the cat"), AckLevel::Ack).unwrap();
        }
        let deposits = cluster.depot("BankTransferModule", "*deposits").unwrap();
        deposits
            .append(
                &Value::map([("account", Value::from("a")), ("amount", Value::Int(5))]),
                AckLevel::AppendAck,
            )
            .unwrap();
        cluster
            .wait_microbatch("BankTransferModule", "banking", Duration::from_secs(120))
            .unwrap();
        let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
        assert_eq!(
            counts.select(&[Nav::key("cat")]).unwrap(),
            [Value::Int(50 * (round + 1))]
        );
        let funds = cluster.pstate("BankTransferModule", "$$funds").unwrap();
        assert_eq!(funds.select(&[Nav::key("a")]).unwrap(), [Value::Int(5 * (round + 1))]);
        drop((sentences, deposits, counts, funds));

        cluster.shutdown().unwrap();
        assert_eq!(
            live_task_threads(),
            0,
            "round {round}: task thread state outlived the shutdown"
        );
    }
}
