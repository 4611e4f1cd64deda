//! A cluster of real processes on loopback: ZooKeeper, a Conductor and
//! three Supervisors (127.0.0.1, 127.0.0.2 and 127.0.0.3), each with its
//! own local.dir. WordCountModule over two workers (tasks 8, threads 4):
//! deploy, 10,000 sentences through the remote client and `rama
//! depotAppend`, counts against a reference, worker and Supervisor
//! crashes, destroy, and bad deploys through the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

mod common;

use common::{alive, eventually, examples_artifact, free_port, text, KillWorkers, Node};
use control::config::Side;
use engine::cluster::AckLevel;
use engine::pstate::Nav;
use engine::runtime::partition::task_for_key;
use engine::runtime::placement::{Parallelism, Placement};
use engine::value::Value;
use net::manager::ClusterManager;

/// A sentence of 3 to 10 words, deterministic in `i`.
fn sentence(i: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "cat", "dog", "and", "a", "river", "stone", "light", "of", "runs", "over", "under", "quick", "brown",
        "fox", "jumps", "lazy", "night", "day", "sea", "sky", "tree", "leaf", "wind",
    ];
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let n = 3 + next() % 8;
    (0..n)
        .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_counts(manager: &ClusterManager, expected: &BTreeMap<String, i64>) {
    let counts = manager.pstate("WordCountModule", "$$wordCounts").unwrap();
    for (w, c) in expected {
        assert_eq!(
            counts.select_one(&[Nav::key(w.as_str())]).unwrap(),
            Value::Int(*c),
            "count of {w:?}"
        );
    }
}

#[test]
fn deploy_serve_survive_crashes_and_destroy() {
    let root = tempfile::tempdir().unwrap();
    let _kill_workers = KillWorkers(root.path().to_path_buf());
    let (zk, cport) = (free_port(), free_port());
    let ports = |first: u16| format!("supervisor.port.range: [{first}, {}]\n", first + 50);
    let zk_node = Node::new(root.path(), "zk", zk, cport, "");
    let conductor = Node::new(root.path(), "conductor", zk, cport, "");
    let base = free_port().max(20000) / 2 + 20000;
    let nodes: Vec<Node> = (1..=3u16)
        .map(|i| {
            Node::new(
                root.path(),
                &format!("s{i}"),
                zk,
                cport,
                &format!("supervisor.host: \"127.0.0.{i}\"\n{}", ports(base + i * 1000)),
            )
        })
        .collect();
    let _zk = zk_node.daemon("devZookeeper", "ZooKeeper running");
    let _conductor = conductor.daemon("conductor", "admin API on");
    let mut sups: Vec<_> = nodes
        .iter()
        .map(|n| Some(n.daemon("supervisor", "supervisor ")))
        .collect();
    let jar = examples_artifact();
    let jar = jar.to_str().unwrap();
    let deploy = |args: &[&str]| {
        let mut all = vec![
            "deploy",
            "--action",
            "launch",
            "--jar",
            jar,
            "--module",
            "WordCountModule",
        ];
        all.extend_from_slice(args);
        conductor.rama(&all)
    };
    let shape = |tasks: &'static str, threads: &'static str, workers: &'static str| {
        vec!["--tasks", tasks, "--threads", threads, "--workers", workers]
    };

    let overrides = root.path().join("overrides.yaml");
    std::fs::write(
        &overrides,
        "worker.child.opts: \"--spinBeforeParkMicros 20 --recordBytesMax 65536\"\nworker.child.env:\n  \
         RAMA_TEST_MARK: cluster-test\n",
    )
    .unwrap();
    let bad_overrides = root.path().join("bad-overrides.yaml");
    std::fs::write(&bad_overrides, "worker.child.opts: \"-Xmx8192m\"\n").unwrap();
    let small_records = root.path().join("small-records.yaml");
    std::fs::write(&small_records, "worker.child.opts: \"--recordBytesMax 10\"\n").unwrap();
    let (overrides, bad_overrides) = (overrides.to_str().unwrap(), bad_overrides.to_str().unwrap());
    let small_records = small_records.to_str().unwrap();

    // Bad deploys: each refused with its reason, nothing left behind.
    for (args, why) in [
        (
            [shape("8", "2", "1"), vec!["--configOverrides", bad_overrides]].concat(),
            "unknown worker option -Xmx8192m",
        ),
        (
            // An engine limit out of its range is refused at deploy.
            [shape("8", "2", "1"), vec!["--configOverrides", small_records]].concat(),
            "--recordBytesMax 10: takes a whole number from 1024",
        ),
        (shape("6", "2", "1"), "power of two"),
        (shape("8", "16", "1"), "at most tasks (8), got 16"),
        (shape("8", "2", "4"), "at most threads (2), got 4"),
        (shape("256", "256", "200"), "not enough Supervisor ports"),
        (
            [shape("8", "2", "1"), vec!["--replicationFactor", "4"]].concat(),
            "--replicationFactor 4 needs 4 Supervisors",
        ),
        (
            [shape("8", "2", "1"), vec!["--replicationFactor", "10"]].concat(),
            "a task group has 1 to 9 replicas",
        ),
    ] {
        let out = deploy(&args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(why), "{why}: {}", text(&out));
    }
    for (jar, module, why) in [
        ("/nonexistent.jar", "M", "no such file"),
        (jar, "Nope", "has no module Nope"),
    ] {
        let out = conductor.rama(
            &[
                &["deploy", "--action", "launch", "--jar", jar, "--module", module][..],
                &shape("8", "2", "1"),
            ]
            .concat(),
        );
        assert!(text(&out).contains(why), "{}", text(&out));
    }
    let not_artifact = root.path().join("not-an-artifact.sh");
    std::fs::write(&not_artifact, "#!/bin/sh\necho hello\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&not_artifact, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = conductor.rama(
        &[
            &[
                "deploy",
                "--action",
                "launch",
                "--jar",
                not_artifact.to_str().unwrap(),
                "--module",
                "M",
            ][..],
            &shape("8", "2", "1"),
        ]
        .concat(),
    );
    assert!(text(&out).contains("not a module artifact"), "{}", text(&out));
    let out = conductor.rama(&["moduleStatus", "WordCountModule"]);
    assert!(text(&out).contains("no module named WordCountModule"), "{}", text(&out));
    for n in &nodes {
        assert!(n.worker_pid().is_none(), "a refused deploy left a worker");
    }

    // Deploy over two workers, with progress, until running.
    let out = deploy(&[shape("8", "4", "2"), vec!["--configOverrides", overrides]].concat());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("WordCountModule: [:running]"), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&conductor.rama(&["moduleStatus", "WordCountModule"]).stdout),
        "[:running]\ninstance 0: running, 2 of 2 workers registered, 8 tasks on 4 threads (read target, append \
         target)\n"
    );
    let out = deploy(&shape("8", "4", "2"));
    assert!(text(&out).contains("already deployed"), "{}", text(&out));
    let placement = Placement::new(Parallelism::new(8, 4, 2).unwrap());
    let out = conductor.rama(&["taskGroupsStatus", "WordCountModule"]);
    let groups = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(groups.starts_with("module WordCountModule instance 0:\n"), "{groups}");
    // The instance can be named, as the seed's command takes it.
    let named = conductor.rama(&["taskGroupsStatus", "WordCountModule", "0"]);
    assert_eq!(String::from_utf8_lossy(&named.stdout), groups);
    let out = conductor.rama(&["taskGroupsStatus", "WordCountModule", "7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("module WordCountModule has no instance 7 (instances: 0)"),
        "{}",
        text(&out)
    );
    for thread in 0..4u32 {
        let tasks: Vec<String> = placement.tasks_of_thread(thread).iter().map(u32::to_string).collect();
        let line = format!(
            "task group {thread}: tasks [{}] on worker {} at 127.0.0.",
            tasks.join(", "),
            placement.worker_of_thread[thread as usize]
        );
        assert!(groups.contains(&line), "{line:?} in {groups}");
    }
    assert_eq!(groups.matches("(supervisor ").count(), 4, "{groups}");
    // The two workers went to two different Supervisors.
    let with_worker: Vec<usize> = (0..3).filter(|&i| nodes[i].worker_pid().is_some()).collect();
    assert_eq!(with_worker.len(), 2, "{groups}");
    // The worker configurations reached the worker processes.
    for &i in &with_worker {
        let pid = nodes[i].worker_pid().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(String::from_utf8_lossy(&cmdline).contains("--spinBeforeParkMicros\u{0}20"));
        assert!(String::from_utf8_lossy(&environ).contains("RAMA_TEST_MARK=cluster-test"));
    }

    // 10,000 sentences: most through the remote client (four threads with
    // Ack appends), some through `rama depotAppend`.
    let manager = ClusterManager::open_with(Some(&conductor.dir.join("rama.yaml")), &[], Side::External).unwrap();
    let total = 10_000u64;
    let by_cli = 40u64;
    let crossed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let depot = manager.depot("WordCountModule", "*sentences").unwrap();
            let (placement, crossed) = (&placement, &crossed);
            s.spawn(move || {
                let worker_of =
                    |task: u32| placement.worker_of_thread[placement.thread_of_task[task as usize] as usize];
                for i in (by_cli + t..total).step_by(4) {
                    let text = sentence(i);
                    let r = depot.append(&Value::from(text.as_str()), AckLevel::Ack).unwrap();
                    // Words counted on the other worker than the one that
                    // took the sentence.
                    let n = text
                        .split(' ')
                        .filter(|w| worker_of(task_for_key(&Value::from(*w), 8)) != worker_of(r.task))
                        .count();
                    crossed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert!(crossed.into_inner() > 10_000, "few words crossed workers");
    for i in 0..by_cli {
        let out = conductor.rama(&[
            "depotAppend",
            "WordCountModule",
            "*sentences",
            &format!("\"{}\"", sentence(i)),
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    // The worker configuration's engine limit reached the workers: a
    // record above --recordBytesMax 65536 is refused by size, as a limit.
    let big = Value::from("x".repeat(100 << 10));
    let refused = manager
        .depot("WordCountModule", "*sentences")
        .unwrap()
        .append(&big, AckLevel::Ack)
        .unwrap_err();
    assert_eq!(refused.code(), engine::ErrorCode::Limit, "{refused}");
    assert!(refused.to_string().contains("record_bytes_max = 65536"), "{refused}");
    let mut expected = BTreeMap::new();
    for i in 0..total {
        for w in sentence(i).split(' ') {
            *expected.entry(w.to_string()).or_insert(0i64) += 1;
        }
    }
    check_counts(&manager, &expected);
    let the = expected["the"];
    let select = || conductor.rama(&["pstateSelect", "WordCountModule", "$$wordCounts", "[\"the\"]"]);
    assert_eq!(String::from_utf8_lossy(&select().stdout), format!("[{the}]\n"));

    // kill -9 one worker: its Supervisor starts it again; data intact.
    // Clients made before follow it (they find the workers again).
    let old_depot = manager.depot("WordCountModule", "*sentences").unwrap();
    let old_counts = manager.pstate("WordCountModule", "$$wordCounts").unwrap();
    let which = with_worker[0];
    let node = &nodes[which];
    let pid = node.worker_pid().expect("a worker pid file");
    // Under load: a client keeps appending (Ack) one new word at a time and
    // selecting through its task threads' connections while the worker
    // dies and comes back. An append may fail meanwhile (the caller is
    // told), a select may fail, but a select never answers wrong, and every
    // acknowledged append is counted (at least once: a stream topology
    // processes again what it had processed past its last durable
    // progress when its worker died).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let acked_count = std::sync::atomic::AtomicUsize::new(0);
    let (acked, failed) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let depot = manager.depot("WordCountModule", "*sentences").unwrap();
            let counts = manager.pstate("WordCountModule", "$$wordCounts").unwrap();
            let (mut acked, mut failed) = (Vec::new(), 0u64);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let word = format!("survivor{i}");
                i += 1;
                match depot.append(&Value::from(word.as_str()), AckLevel::Ack) {
                    Ok(_) => {
                        acked.push(word);
                        acked_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(_) => failed += 1,
                }
                if let Ok(v) = counts.select_one(&[Nav::key("the")]) {
                    assert_eq!(v, Value::Int(the), "a select during the restart answered wrong");
                }
            }
            (acked, failed)
        });
        eventually("appends under load before the kill", || {
            acked_count.load(std::sync::atomic::Ordering::SeqCst) >= 20
        });
        // SAFETY: kills a process this test's cluster started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        eventually("the worker to be restarted", || {
            node.worker_pid().is_some_and(|p| p != pid && alive(p))
                && String::from_utf8_lossy(&select().stdout) == format!("[{the}]\n")
        });
        // The load's appends succeed again after the restart.
        let before = acked_count.load(std::sync::atomic::Ordering::SeqCst);
        eventually("appends under load after the restart", || {
            acked_count.load(std::sync::atomic::Ordering::SeqCst) >= before + 50
        });
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        load.join().unwrap()
    });
    eprintln!("under the kill: {} appends acknowledged, {failed} failed", acked.len());
    let counts = manager.pstate("WordCountModule", "$$wordCounts").unwrap();
    for word in &acked {
        match counts.select_one(&[Nav::key(word.as_str())]).unwrap() {
            Value::Int(n) if n >= 1 => {}
            other => panic!("acknowledged {word} is counted {other:?}"),
        }
    }
    // Every word's count through the client made before the kill (its
    // connection to the killed worker ended; it reconnects).
    for (w, c) in &expected {
        assert_eq!(
            old_counts.select_one(&[Nav::key(w.as_str())]).unwrap(),
            Value::Int(*c),
            "{w}"
        );
    }
    check_counts(&manager, &expected);
    // Both workers take new sentences again (one of them restarted),
    // through the old client and a new one.
    let depot = manager.depot("WordCountModule", "*sentences").unwrap();
    for d in [&old_depot, &depot, &old_depot, &depot] {
        d.append(&Value::from("phoenix"), AckLevel::Ack).unwrap();
    }
    assert_eq!(old_counts.select_one(&[Nav::key("phoenix")]).unwrap(), Value::Int(4));

    // kill -9 its Supervisor: the worker keeps serving; a restarted
    // Supervisor adopts it instead of starting another.
    let worker = node.worker_pid().unwrap();
    let (mut sup, _) = sups[which].take().unwrap();
    sup.0.kill().unwrap();
    sup.0.wait().unwrap();
    assert_eq!(String::from_utf8_lossy(&select().stdout), format!("[{the}]\n"));
    assert!(alive(worker));
    let restarted = node.daemon("supervisor", "adopted worker");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(node.worker_pid(), Some(worker), "a second worker was started");
    assert!(alive(worker));
    assert_eq!(String::from_utf8_lossy(&select().stdout), format!("[{the}]\n"));
    sups[which] = Some(restarted);

    // rama bench against the running module; a module that is not
    // deployed is named.
    let out = conductor.rama(&[
        "bench",
        "--workload",
        "wordcount",
        "--seconds",
        "1",
        "--clients",
        "2",
        "--inFlight",
        "16",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("WordCount on the cluster of"), "{}", text(&out));
    // The cost of an operation, from the two worker processes' CPU time.
    assert_eq!(text(&out).matches("resident (peak").count(), 2, "{}", text(&out));
    assert!(text(&out).contains("µs of CPU per operation"), "{}", text(&out));
    // The same through the Conductor's admin API alone, from a directory
    // without rama.yaml (a client that does not reach ZooKeeper).
    let bare = root.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    // It holds the cluster secret, as every client must.
    std::fs::copy(root.path().join("cluster.secret"), bare.join("cluster.secret")).unwrap();
    let via = format!("127.0.0.1:{cport}");
    let out = common::rama_in(
        &bare,
        &[
            "bench",
            "--conductor",
            &via,
            "--mix",
            "sentence:3,topWords:1",
            "--seconds",
            "1",
            "--clients",
            "1",
            "--inFlight",
            "8",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("on the cluster of the Conductor at {via}")),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("  topWords (weight 1): "), "{}", text(&out));
    let out = conductor.rama(&["bench", "--workload", "append", "--seconds", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no module named KvModule is running"),
        "{}",
        text(&out)
    );

    // destroy: the workers, their assignments and their data are gone.
    let workers: Vec<u32> = with_worker.iter().map(|&i| nodes[i].worker_pid().unwrap()).collect();
    let out = conductor.rama(&["destroy", "WordCountModule"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("destroyed"), "{}", text(&out));
    for w in workers {
        eventually("the workers to stop", || !alive(w));
    }
    let out = conductor.rama(&["moduleStatus", "WordCountModule"]);
    assert_eq!(out.status.code(), Some(1));
    let out = conductor.rama(&["taskGroupsStatus", "WordCountModule"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for n in &nodes {
        eventually("the workers' data to be removed", || {
            std::fs::read_dir(n.dir.join("data/supervisor/data"))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
        });
    }
    let out = conductor.rama(&["pstateSelect", "WordCountModule", "$$wordCounts", "[\"the\"]"]);
    assert!(
        text(&out).contains("no module named WordCountModule is running"),
        "{}",
        text(&out)
    );
}
