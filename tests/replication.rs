//! Replication across real processes on loopback: ZooKeeper, a Conductor
//! and three Supervisors (127.0.0.1, 127.0.0.2, 127.0.0.3). WordCountModule
//! with replication factor 3 (one worker, so three worker processes, one
//! per Supervisor): appends acknowledged through the remote client, the
//! leader of a task group killed with SIGKILL under load, a new leader in
//! a higher epoch, appends acknowledged again, the killed replica back in
//! sync after its Supervisor restarts it, and every acknowledged sentence
//! counted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod common;

use common::{eventually, examples_artifact, free_port, text, DumpLogsOnFailure, KillWorkers, Node};
use control::config::Side;
use control::layout::{GroupNode, Layout};
use engine::cluster::AckLevel;
use engine::pstate::Nav;
use engine::value::Value;
use net::manager::ClusterManager;

const MODULE: &str = "WordCountModule";

fn words(i: u64) -> String {
    const WORDS: &[&str] = &["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];
    (0..3)
        .map(|k| WORDS[((i * 7 + k * 3) % WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether every word's count is at least what the acknowledged
/// sentences add up to, and at most that plus the words of the sentences
/// whose appends failed (their outcome is unknown).
fn counted(expected: &BTreeMap<String, i64>, unknown: &[u64], count_of: impl Fn(&str) -> Option<i64>) -> bool {
    expected.iter().all(|(w, c)| {
        let extra = unknown
            .iter()
            .map(|&u| words(u).split(' ').filter(|x| x == w).count() as i64)
            .sum::<i64>();
        count_of(w).is_some_and(|n| n >= *c && n <= c + extra)
    })
}

/// The group node of task group `tg`.
fn group(meta: &dyn control::metastore::Metastore, tg: u32) -> Option<GroupNode> {
    Layout::new(meta).group(MODULE, 0, tg).ok()?.map(|(node, _)| node)
}

/// ZooKeeper, a Conductor and three Supervisors on 127.0.0.1-3, and the
/// guards that stop them and their workers.
struct Cluster {
    conductor: Node,
    nodes: Vec<Node>,
    // Dropped in order: Supervisors, Conductor, ZooKeeper; then workers
    // killed and the logs shown if the test failed.
    _sups: Vec<(common::Daemon, std::io::BufReader<std::process::ChildStdout>)>,
    _conductor: (common::Daemon, std::io::BufReader<std::process::ChildStdout>),
    _zk: (common::Daemon, std::io::BufReader<std::process::ChildStdout>),
    _kill_workers: KillWorkers,
    _logs: DumpLogsOnFailure,
    _root: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let kill_workers = KillWorkers(root.path().to_path_buf());
        let logs = DumpLogsOnFailure(root.path().to_path_buf());
        let (zk, cport) = (free_port(), free_port());
        let zk_node = Node::new(root.path(), "zk", zk, cport, "");
        let conductor = Node::new(root.path(), "conductor", zk, cport, "");
        let base = free_port().max(20000) / 2 + 20000;
        let nodes: Vec<Node> = (1..=3u16)
            .map(|i| {
                let first = base + i * 1000;
                Node::new(
                    root.path(),
                    &format!("s{i}"),
                    zk,
                    cport,
                    &format!(
                        "supervisor.host: \"127.0.0.{i}\"\nsupervisor.port.range: [{first}, {}]\n",
                        first + 50
                    ),
                )
            })
            .collect();
        let zk_daemon = zk_node.daemon("devZookeeper", "ZooKeeper running");
        let conductor_daemon = conductor.daemon("conductor", "admin API on");
        let sups = nodes.iter().map(|n| n.daemon("supervisor", "supervisor ")).collect();
        Cluster {
            conductor,
            nodes,
            _sups: sups,
            _conductor: conductor_daemon,
            _zk: zk_daemon,
            _kill_workers: kill_workers,
            _logs: logs,
            _root: root,
        }
    }

    fn deploy(&self, module: &str, rf: &str) -> std::process::Output {
        let jar = examples_artifact();
        self.conductor.rama(&[
            "deploy",
            "--action",
            "launch",
            "--jar",
            jar.to_str().unwrap(),
            "--module",
            module,
            "--tasks",
            "4",
            "--threads",
            "2",
            "--workers",
            "1",
            "--replicationFactor",
            rf,
        ])
    }

    fn metastore(&self) -> control::metastore::ZkMetastore {
        let config = net::manager::load_config(Some(&self.conductor.dir.join("rama.yaml")), &[]).unwrap();
        net::manager::connect_metastore(&config, Side::Internal).unwrap()
    }

    fn manager(&self) -> ClusterManager {
        ClusterManager::open_with(Some(&self.conductor.dir.join("rama.yaml")), &[], Side::External).unwrap()
    }

    /// The pid of the worker process that leads task group `tg` of
    /// `module` now, and the group's epoch.
    fn leader_pid(&self, meta: &dyn control::metastore::Metastore, module: &str, tg: u32) -> (u32, u32, u32) {
        let (node, _) = Layout::new(meta).group(module, 0, tg).unwrap().unwrap();
        let leader = node.leader.expect("a leader").replica;
        let i = node_of(meta, module, node.replicas[leader as usize].worker);
        let pid = worker_pid_of(&self.nodes[i], module).expect("the leader's pid");
        (pid, leader, node.epoch)
    }
}

/// Which of the three nodes (0-2: 127.0.0.1-3) runs worker process
/// `process` of `module`, by the address it registered.
fn node_of(meta: &dyn control::metastore::Metastore, module: &str, process: u32) -> usize {
    let (registration, _) = Layout::new(meta)
        .read::<control::layout::WorkerRegistration>(&control::layout::worker(module, 0, process))
        .unwrap()
        .expect("the process's registration");
    let host = registration.address.split(':').next().unwrap().to_string();
    (1..=3)
        .position(|i| host == format!("127.0.0.{i}"))
        .expect("a node of the cluster")
}

/// The pid of `module`'s worker on `node` (its Supervisor's pid file).
fn worker_pid_of(node: &Node, module: &str) -> Option<u32> {
    let dir = node.dir.join("data/supervisor/workers");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        (name.ends_with(".pid") && name.contains(module))
            .then(|| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .flatten()
    })
}

#[test]
fn a_killed_leader_is_replaced_and_nothing_acknowledged_is_lost() {
    let cluster = Cluster::start();
    let (conductor, nodes) = (&cluster.conductor, &cluster.nodes);
    let deploy = |rf: &str| cluster.deploy(MODULE, rf);
    // Four replicas cannot be placed apart on three Supervisors.
    let out = deploy("4");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("needs 4 Supervisors"), "{}", text(&out));
    let out = deploy("3");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("[:running]"), "{}", text(&out));
    // One worker process on each Supervisor.
    for n in nodes {
        assert!(n.worker_pid().is_some(), "a Supervisor has no replica");
    }
    // The status commands show the replicas.
    let status = text(&conductor.rama(&["moduleStatus", MODULE]));
    assert!(
        status.contains("3 of 3 workers registered, 4 tasks on 2 threads, replication factor 3"),
        "{status}"
    );
    eventually("taskGroupsStatus showing a leader and three replicas in sync", || {
        let groups = text(&conductor.rama(&["taskGroupsStatus", MODULE]));
        groups.matches("leader replica").count() == 2
            && groups.matches("in sync [0, 1, 2], out of sync [] (min-ISR 2)").count() == 2
            && groups.matches(": leader, process").count() == 2
            && groups.matches(": in sync, process").count() == 4
    });
    let meta = cluster.metastore();
    eventually("a leader for every task group", || {
        (0..2).all(|tg| group(&meta, tg).is_some_and(|g| g.leader.is_some()))
    });

    let manager = cluster.manager();
    let depot = manager.depot(MODULE, "*sentences").unwrap();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut acked = 0u64;
    let append = |i: u64, expected: &mut BTreeMap<String, i64>| -> bool {
        let text = words(i);
        match depot.append(&Value::from(text.as_str()), AckLevel::Ack) {
            Ok(_) => {
                for w in text.split(' ') {
                    *expected.entry(w.to_string()).or_insert(0) += 1;
                }
                true
            }
            Err(e) => {
                eprintln!("append {i}: {e}");
                false
            }
        }
    };
    for i in 0..300 {
        assert!(append(i, &mut expected), "append {i} before any fault");
        acked += 1;
    }
    let counts = manager.pstate(MODULE, "$$wordCounts").unwrap();
    let count_of = |w: &str| match counts.select_one(&[Nav::key(w)]) {
        Ok(Value::Int(n)) => Some(n),
        Ok(Value::Nil) => Some(0),
        _ => None,
    };
    let all_counted = |expected: &BTreeMap<String, i64>| expected.iter().all(|(w, c)| count_of(w) == Some(*c));
    eventually("the first 300 sentences counted", || all_counted(&expected));

    // kill -9 the leader of task group 0's process.
    let (pid, _, epoch) = cluster.leader_pid(&meta, MODULE, 0);
    let killed_at = Instant::now();
    // SAFETY: kills a worker this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // A new leader in a higher epoch (the restarted replica itself may
    // lead again, in a new incarnation, if its log is the longest).
    eventually("a new leader of task group 0", || {
        group(&meta, 0).is_some_and(|g| g.leader.is_some() && g.epoch > epoch)
    });
    // Appends go on: the first acknowledged one after the kill ends the
    // failover. Appends whose outcome the client cannot know are not
    // counted on either side (they may or may not be in).
    let mut unknown = Vec::new();
    let mut first_ok = None;
    let mut i = 300;
    while acked < 600 {
        assert!(killed_at.elapsed() < Duration::from_secs(120), "appends did not resume");
        if append(i, &mut expected) {
            acked += 1;
            first_ok.get_or_insert(killed_at.elapsed());
        } else {
            unknown.push(i);
            std::thread::sleep(Duration::from_millis(50));
        }
        i += 1;
    }
    eprintln!(
        "failover: first acknowledged append {:?} after the kill; {} appends failed meanwhile",
        first_ok.unwrap(),
        unknown.len()
    );
    // Every acknowledged sentence is counted; failed ones may add at most
    // their own words.
    eventually("every acknowledged sentence counted", || {
        counted(&expected, &unknown, |w| count_of(w))
    });
    // The killed replica is restarted by its Supervisor and returns to the
    // ISR of every group.
    eventually("all three replicas in sync again", || {
        (0..2).all(|tg| group(&meta, tg).is_some_and(|g| g.isr.len() == 3))
    });
    // SIGSTOP the leader of task group 1 past its session timeout: it
    // loses its lease and is replaced; once it runs again (SIGCONT) it
    // acknowledges nothing of its old epoch and rejoins as a follower.
    let (paused, leader, epoch) = cluster.leader_pid(&meta, MODULE, 1);
    let paused_at = Instant::now();
    // SAFETY: pauses a worker this test's cluster started (resumed below,
    // and killed by KillWorkers whatever happens).
    unsafe { libc::kill(paused as i32, libc::SIGSTOP) };
    eventually("a new leader of task group 1 while the old one is paused", || {
        group(&meta, 1).is_some_and(|g| g.leader.is_some_and(|l| l.replica != leader) && g.epoch > epoch)
    });
    let elected = paused_at.elapsed();
    // A client made now reaches the module through a process that runs
    // (a paused one does not finish the handshake).
    let manager2 = cluster.manager();
    let depot2 = manager2.depot(MODULE, "*sentences").unwrap();
    let mut first_ok = None;
    while acked < 700 {
        assert!(paused_at.elapsed() < Duration::from_secs(120), "appends did not resume");
        let text = words(i);
        match depot2.append(&Value::from(text.as_str()), AckLevel::Ack) {
            Ok(_) => {
                for w in text.split(' ') {
                    *expected.entry(w.to_string()).or_insert(0) += 1;
                }
                acked += 1;
                first_ok.get_or_insert(paused_at.elapsed());
            }
            Err(e) => {
                eprintln!("append {i} while paused: {e}");
                unknown.push(i);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        i += 1;
    }
    eprintln!(
        "pause: new leader elected {elected:?} after SIGSTOP, first acknowledged append {:?} after it",
        first_ok.unwrap()
    );
    // SAFETY: resumes the worker paused above.
    unsafe { libc::kill(paused as i32, libc::SIGCONT) };
    eventually("the paused replica back in sync", || {
        (0..2).all(|tg| group(&meta, tg).is_some_and(|g| g.isr.len() == 3))
    });
    let counts2 = manager2.pstate(MODULE, "$$wordCounts").unwrap();
    eventually("every acknowledged sentence counted after the pause", || {
        counted(&expected, &unknown, |w| match counts2.select_one(&[Nav::key(w)]) {
            Ok(Value::Int(n)) => Some(n),
            _ => None,
        })
    });
    // Wipe a follower's data directory (paused, wiped, killed: its
    // Supervisor starts it again on an empty directory). It says it lost
    // its data, is never elected meanwhile, catches up from the leader's
    // log and returns to the ISR holding what the others hold.
    let (node, _) = Layout::new(&meta).group(MODULE, 0, 0).unwrap().unwrap();
    let leader = node.leader.unwrap().replica;
    let follower = (0..3).find(|r| *r != leader).unwrap();
    let at = node_of(&meta, MODULE, node.replicas[follower as usize].worker);
    let wiped = worker_pid_of(&nodes[at], MODULE).unwrap();
    let data = nodes[at].dir.join("data/supervisor/data").join(MODULE);
    // SAFETY: signals a worker this test's cluster started.
    unsafe { libc::kill(wiped as i32, libc::SIGSTOP) };
    std::fs::remove_dir_all(&data).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(wiped as i32, libc::SIGKILL) };
    eventually("the wiped replica restarted", || {
        worker_pid_of(&nodes[at], MODULE).is_some_and(|p| p != wiped)
    });
    eventually("the wiped replica back in sync with the same log", || {
        (0..2).all(|tg| {
            let Some(g) = group(&meta, tg) else { return false };
            let live = Layout::new(&meta).live_replicas(MODULE, 0, tg).unwrap_or_default();
            g.isr.len() == 3 && live.len() == 3 && live.iter().all(|r| r.log_end == live[0].log_end && r.log_end > 0)
        })
    });
    eventually("the counts unchanged after the wipe", || {
        counted(&expected, &unknown, |w| match counts2.select_one(&[Nav::key(w)]) {
            Ok(Value::Int(n)) => Some(n),
            _ => None,
        })
    });
    let groups = text(&conductor.rama(&["taskGroupsStatus", MODULE]));
    eprintln!("{groups}");
    let out = conductor.rama(&["destroy", MODULE]);
    assert!(out.status.success(), "{}", text(&out));
}

/// BankTransferModule with replication factor 3: transfers keep running
/// (microbatches, exactly-once across task groups) while the leader of
/// each task group in turn is killed with SIGKILL; afterwards the total
/// of all balances is exactly the deposits and every replica is in sync.
#[test]
fn microbatches_stay_exactly_once_across_failovers() {
    const BANK: &str = "BankTransferModule";
    let cluster = Cluster::start();
    let out = cluster.deploy(BANK, "3");
    assert!(out.status.success(), "{}", text(&out));
    let meta = cluster.metastore();
    eventually("a leader for every task group", || {
        (0..2).all(|tg| {
            Layout::new(&meta)
                .group(BANK, 0, tg)
                .ok()
                .flatten()
                .is_some_and(|(g, _)| g.leader.is_some())
        })
    });
    let manager = cluster.manager();
    let deposits = manager.depot(BANK, "*deposits").unwrap();
    let accounts: Vec<String> = (0..16).map(|a| format!("acct{a}")).collect();
    for a in &accounts {
        let record = Value::map([("account", Value::from(a.as_str())), ("amount", Value::Int(1000))]);
        deposits.append(&record, AckLevel::Ack).unwrap();
    }
    let total = 1000 * accounts.len() as i64;
    let funds = manager.query(BANK, "totalFunds").unwrap();
    eventually("the deposits processed", || {
        funds.invoke(&Value::Nil).ok() == Some(Value::Int(total))
    });

    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let transfers = manager.depot(BANK, "*transfers").unwrap();
            let mut id = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                id += 1;
                let (from, to) = (&accounts[(id % 16) as usize], &accounts[((id * 7 + 3) % 16) as usize]);
                let record = Value::map([
                    ("id", Value::Int(id)),
                    ("from", Value::from(from.as_str())),
                    ("to", Value::from(to.as_str())),
                    ("amount", Value::Int(1 + id % 40)),
                ]);
                // Failures while a leader is replaced are expected: a
                // transfer either happens whole or not at all.
                let _ = transfers.append(&record, AckLevel::AppendAck);
            }
        });
        for tg in 0..2 {
            std::thread::sleep(Duration::from_secs(2));
            let (pid, _, epoch) = cluster.leader_pid(&meta, BANK, tg);
            // SAFETY: kills a worker this test's cluster started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            eventually("a new leader", || {
                Layout::new(&meta)
                    .group(BANK, 0, tg)
                    .ok()
                    .flatten()
                    .is_some_and(|(g, _)| g.leader.is_some() && g.epoch > epoch)
            });
        }
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    eventually("every replica in sync again", || {
        (0..2).all(|tg| {
            Layout::new(&meta)
                .group(BANK, 0, tg)
                .ok()
                .flatten()
                .is_some_and(|(g, _)| g.isr.len() == 3 && g.leader.is_some())
        })
    });
    // Money is neither made nor lost, through any number of failovers.
    let funds = cluster.manager().query(BANK, "totalFunds").unwrap();
    let mut last = None;
    eventually("the total stable at the deposits", || {
        let now = funds.invoke(&Value::Nil).ok();
        let stable = now.is_some() && now == last;
        last = now;
        stable
    });
    assert_eq!(last, Some(Value::Int(total)), "the bank's total after failovers");
    let balances = cluster.manager().pstate(BANK, "$$funds").unwrap();
    let sum: i64 = accounts
        .iter()
        .map(|a| {
            balances
                .select_one(&[Nav::key(a.as_str())])
                .unwrap()
                .as_int()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(sum, total, "the balances one by one");
}
