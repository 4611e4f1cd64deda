//! Modules spread over several workers in one process: each worker is its
//! own in-process cluster with its own data directory and TCP server, and
//! they reach each other only through `net` (as separate processes do; the
//! cluster tests in `cli/` run them as processes under Supervisors).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{seed, sentence, Rng};
use engine::cluster::peer::WorkerPart;
use engine::cluster::{AckLevel, InProcessCluster};
use engine::module::{Module, ModuleDef};
use engine::pstate::Nav;
use engine::runtime::partition::task_for_key;
use engine::runtime::placement::{Parallelism, Placement};
use engine::value::Value;
use engine::Error;
use net::peers::NetPeers;
use net::remote::RemoteCluster;
use rama_examples::{words, BankTransferModule, WordCountModule};

struct Workers {
    clusters: Vec<Arc<InProcessCluster>>,
    servers: Vec<net::Server>,
    remotes: Vec<RemoteCluster>,
    placement: Placement,
    _dir: tempfile::TempDir,
}

impl Workers {
    fn start(define: fn() -> engine::Result<ModuleDef>, tasks: u32, threads: u32, workers: u32) -> Workers {
        let dir = tempfile::tempdir().unwrap();
        let name = define().unwrap().name;
        let addrs: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(vec![None; workers as usize]));
        let mut clusters = Vec::new();
        let mut servers = Vec::new();
        let secret = net::auth::Secret::generate();
        for w in 0..workers {
            let found = addrs.clone();
            let peers = NetPeers::with_resolver(
                &name,
                Box::new(move |i| {
                    found.lock().unwrap()[i as usize]
                        .clone()
                        .ok_or_else(|| Error::Unavailable(format!("worker {i} has no address yet")))
                }),
                secret.clone(),
            );
            let mut cluster = InProcessCluster::new(dir.path().join(format!("worker-{w}")));
            cluster
                .launch_worker(
                    define().unwrap(),
                    tasks,
                    threads,
                    WorkerPart {
                        workers,
                        worker: w,
                        peers: Arc::new(peers),
                        replication: None,
                    },
                )
                .unwrap();
            let cluster = Arc::new(cluster);
            let server =
                daemons::worker::serve_worker(cluster.clone(), &name, "127.0.0.1:0", &secret, Default::default())
                    .unwrap();
            addrs.lock().unwrap()[w as usize] = Some(server.local_addr().to_string());
            clusters.push(cluster);
            servers.push(server);
        }
        for c in &clusters {
            c.start_processing(&name).unwrap();
        }
        let remotes = servers
            .iter()
            .map(|s| RemoteCluster::connect(&s.local_addr().to_string(), &secret).unwrap())
            .collect();
        Workers {
            clusters,
            servers,
            remotes,
            placement: Placement::new(Parallelism::new(tasks, threads, workers).unwrap()),
            _dir: dir,
        }
    }

    fn worker_of(&self, task: u32) -> u32 {
        self.placement.worker_of_thread[self.placement.thread_of_task[task as usize] as usize]
    }

    fn stop(self) {
        drop(self.remotes);
        drop(self.servers);
        for c in self.clusters {
            shut_down(c);
        }
    }
}

/// Shuts `cluster` down once the servers that held it have let it go
/// (their threads do shortly after they are dropped).
fn shut_down(cluster: Arc<InProcessCluster>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut c = cluster;
    let cluster = loop {
        match Arc::try_unwrap(c) {
            Ok(cluster) => break cluster,
            Err(again) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the server still holds the cluster 60 s after it was dropped"
                );
                c = again;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    cluster.shutdown().unwrap();
}

fn word_counts(sentences: &[String]) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for s in sentences {
        for w in words(s) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn wordcount_over_two_workers_matches_reference() {
    let ws = Workers::start(WordCountModule::define, 8, 4, 2);
    let m = "WordCountModule";
    let mut rng = Rng::new(seed());
    let sentences: Vec<String> = (0..2000).map(|_| sentence(&mut rng)).collect();
    // Half through each worker's remote client, half through each worker's
    // in-process client; every append waits for the count updates (Ack).
    let mut crossed = 0;
    for (i, s) in sentences.iter().enumerate() {
        let w = i % 2;
        let record = Value::from(s.as_str());
        let r = if i % 4 < 2 {
            ws.remotes[w]
                .depot(m, "*sentences")
                .append(&record, AckLevel::Ack)
                .unwrap()
        } else {
            ws.clusters[w]
                .depot(m, "*sentences")
                .unwrap()
                .append(&record, AckLevel::Ack)
                .unwrap()
        };
        // The sentence was taken by a task of the worker it was sent to
        // (random depot: local tasks), and some of its words are counted on
        // the other worker.
        assert_eq!(ws.worker_of(r.task), w as u32, "sentence {i} taken on task {}", r.task);
        crossed += words(s)
            .filter(|word| ws.worker_of(task_for_key(&Value::from(word.as_str()), 8)) != w as u32)
            .count();
    }
    assert!(crossed > 1000, "only {crossed} words were counted on another worker");
    let expected = word_counts(&sentences);
    for (w, remote) in ws.remotes.iter().enumerate() {
        let counts = remote.pstate(m, "$$wordCounts");
        for (word, c) in &expected {
            assert_eq!(
                counts.select_one(&[Nav::key(word.as_str())]).unwrap(),
                Value::Int(*c),
                "count of {word:?} through worker {w}"
            );
        }
        // The query runs on tasks of both workers.
        let top = remote.query(m, "topWords").invoke(&Value::Int(3)).unwrap();
        let Value::List(top) = top else {
            panic!("topWords is a list")
        };
        assert_eq!(top.len(), 3);
    }
    // In-process clients of either worker read the other's tasks too.
    let counts = ws.clusters[1].pstate(m, "$$wordCounts").unwrap();
    for (word, c) in &expected {
        assert_eq!(counts.select_one(&[Nav::key(word.as_str())]).unwrap(), Value::Int(*c));
    }
    ws.stop();
}

#[test]
fn microbatches_over_three_workers_are_exactly_once_and_atomic() {
    let ws = Workers::start(BankTransferModule::define, 8, 4, 3);
    let m = "BankTransferModule";
    let mut rng = Rng::new(seed());
    let accounts = 20;
    let deposit = 500i64;
    for a in 0..accounts {
        let d = Value::map([
            ("account", Value::from(format!("acct{a}"))),
            ("amount", Value::Int(deposit)),
        ]);
        ws.remotes[a % 3]
            .depot(m, "*deposits")
            .append(&d, AckLevel::AppendAck)
            .unwrap();
    }
    let total = deposit * accounts as i64;
    let coordinator = ws.worker_of(0) as usize;
    ws.clusters[coordinator]
        .wait_microbatch(m, "banking", Duration::from_secs(120))
        .unwrap();
    assert_eq!(
        ws.remotes[0].query(m, "totalFunds").invoke(&Value::Nil).unwrap(),
        Value::Int(total)
    );
    // Reads while transfers commit on all three workers never see part of
    // a microbatch: the total is always the same.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (q, stop) = (ws.remotes[1].query(m, "totalFunds"), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(q.invoke(&Value::Nil).unwrap(), Value::Int(total), "read {reads}");
                reads += 1;
            }
            reads
        })
    };
    for id in 0..600 {
        let from = format!("acct{}", rng.below(accounts as u64));
        let to = format!("acct{}", rng.below(accounts as u64));
        let t = Value::map([
            ("id", Value::Int(id)),
            ("from", Value::from(from)),
            ("to", Value::from(to)),
            ("amount", Value::Int(1 + rng.below(200) as i64)),
        ]);
        ws.remotes[id as usize % 3]
            .depot(m, "*transfers")
            .append(&t, AckLevel::AppendAck)
            .unwrap();
    }
    ws.clusters[coordinator]
        .wait_microbatch(m, "banking", Duration::from_secs(120))
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    // Every balance is non-negative and they add up.
    let funds = ws.remotes[2].pstate(m, "$$funds");
    let mut sum = 0;
    for a in 0..accounts {
        let b = funds
            .select_one(&[Nav::key(format!("acct{a}").as_str())])
            .unwrap()
            .as_int()
            .unwrap();
        assert!(b >= 0, "acct{a} went negative: {b}");
        sum += b;
    }
    assert_eq!(sum, total);
    ws.stop();
}

/// A worker serves each client connection on one of its task threads: the
/// one the client names, or any when it names none (or one it does not
/// run). Every connection answers for every task (a request for another
/// thread's task is passed on), and an idle one is closed by the thread
/// that serves it.
#[test]
fn client_connections_are_served_by_task_threads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(4, 2).unwrap();
    let cluster = Arc::new(cluster);
    let secret = net::auth::Secret::generate();
    let limits = net::transport::ServerLimits {
        idle_timeout: Duration::from_millis(600),
        ..Default::default()
    };
    let server =
        daemons::worker::serve_worker(cluster.clone(), "WordCountModule", "127.0.0.1:0", &secret, limits).unwrap();
    let addr = server.local_addr().to_string();
    let remotes = vec![
        RemoteCluster::connect_to_thread(&addr, 0, &secret).unwrap(),
        RemoteCluster::connect_to_thread(&addr, 1, &secret).unwrap(),
        // Not a thread of this worker: served by one of its own.
        RemoteCluster::connect_to_thread(&addr, 77, &secret).unwrap(),
        RemoteCluster::connect(&addr, &secret).unwrap(),
    ];
    let mut sentences = Vec::new();
    let mut rng = Rng::new(seed());
    let placement =
        engine::runtime::placement::Placement::new(engine::runtime::placement::Parallelism::new(4, 2, 1).unwrap());
    for (i, r) in remotes.iter().enumerate() {
        let depot = r.depot("WordCountModule", "*sentences");
        for _ in 0..25 {
            let s = sentence(&mut rng);
            let result = depot.append(&Value::from(s.as_str()), AckLevel::Ack).unwrap();
            // A connection to a named thread: its appends (of a random
            // depot) go to that thread's own tasks.
            if i < 2 {
                assert_eq!(placement.thread_of_task[result.task as usize], i as u32, "{result:?}");
            }
            sentences.push(s);
        }
    }
    let expected = word_counts(&sentences);
    for r in &remotes {
        let counts = r.pstate("WordCountModule", "$$wordCounts");
        for (w, c) in &expected {
            assert_eq!(
                counts.select_one(&[Nav::key(w.as_str())]).unwrap(),
                Value::Int(*c),
                "{w}"
            );
        }
        // A bad request is answered with an error; the connection goes on.
        assert!(r.query("WordCountModule", "noSuchQuery").invoke(&Value::Nil).is_err());
        assert!(!r.is_closed());
    }
    // Idle past the timeout: every connection is closed by its thread.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while remotes.iter().any(|r| !r.is_closed()) {
        assert!(std::time::Instant::now() < deadline, "idle connections stay open");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(remotes);
    drop(server);
    shut_down(cluster);
}
