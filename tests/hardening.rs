//! The cluster tried as an attacker and as a careless operator would
//! (issue 11), on real processes on loopback: hostile frames, idle
//! connections, clients without the cluster secret, absurd parallelism and
//! a stale worker from an earlier cluster. Each part names the bug it
//! guards against.

use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{alive, eventually, examples_artifact, free_port, text, Daemon, KillWorkers, Node};
use control::config::Side;
use engine::pstate::Nav;
use engine::value::{archived, Value};
use net::admin::AdminRequest;
use net::auth::Secret;
use net::manager::ClusterManager;
use net::{Connection, NetError, FRAME_BYTES_MAX, PROTOCOL_VERSION};

/// The tests here each run a whole cluster; one at a time keeps a 2-core
/// machine from running three clusters, 300 idle connections and a
/// ZooKeeper replacement at once.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the threads of process `pid` wait in (for a test that failed
/// waiting for it).
fn waits_of(pid: u32) -> String {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|t| {
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            format!("{} {} {wchan}", t.file_name().to_string_lossy(), comm.trim())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

fn artifacts(node: &Node) -> usize {
    std::fs::read_dir(node.dir.join("data/conductor/artifacts")).map_or(0, |d| d.count())
}

fn deploy(node: &Node, shape: [&str; 3]) -> std::process::Output {
    let jar = examples_artifact();
    node.rama(&[
        "deploy",
        "--action",
        "launch",
        "--jar",
        jar.to_str().unwrap(),
        "--module",
        "WordCountModule",
        "--tasks",
        shape[0],
        "--threads",
        shape[1],
        "--workers",
        shape[2],
    ])
}

/// An answer that is an error map (the daemon refused the request and
/// lives on).
/// An error answer of a worker (the vocabulary's `Answer`) or of the
/// Conductor (a map with `error`).
fn is_error_answer(bytes: &[u8]) -> bool {
    matches!(engine::wire::decode_answer(bytes), Ok(Err(_)))
        || matches!(archived::from_bytes(bytes), Ok(Value::Map(m)) if m.contains_key(&Value::from("error")))
}

#[test]
fn hostile_input_is_refused_and_the_cluster_goes_on() {
    let _one = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let _kill_workers = KillWorkers(root.path().to_path_buf());
    let (zk, cport) = (free_port(), free_port());
    let first = free_port().max(20000) / 2 + 20000;
    let conductor = Node::new(root.path(), "conductor", zk, cport, "conductor.connections.max: 40\n");
    let sup = Node::new(
        root.path(),
        "s1",
        zk,
        cport,
        &format!("supervisor.port.range: [{first}, {}]\n", first + 20),
    );
    let _zk = conductor.daemon("devZookeeper", "ZooKeeper running");
    let (conductor_daemon, _out) = conductor.daemon("conductor", "admin API on");
    let _sup = sup.daemon("supervisor", "supervisor ");

    // Regression: `--tasks 2147483648` was accepted (its worker grew to
    // 20 GB), and every refused deploy uploaded the artifact first.
    let out = deploy(&conductor, ["2147483648", "1", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("module.tasks.max"), "{}", text(&out));
    assert!(
        !text(&out).contains("uploading"),
        "checked before the upload: {}",
        text(&out)
    );
    let out = deploy(&conductor, ["4", "1000", "1"]);
    assert!(text(&out).contains("module.threads.max"), "{}", text(&out));
    assert_eq!(artifacts(&conductor), 0, "a refused deploy stored an artifact");

    // Regression: unfinished uploads had no count cap and never expired.
    let secret = Secret::load(&conductor.dir.join("cluster.secret")).unwrap();
    let conductor_addr = format!("127.0.0.1:{cport}");
    {
        let admin = Connection::connect(conductor_addr.as_str(), PROTOCOL_VERSION, FRAME_BYTES_MAX, &secret).unwrap();
        let start = || admin.call(&AdminRequest::UploadStart { size: 10 }.encode()).unwrap();
        let answers: Vec<Vec<u8>> = (0..5).map(|_| start()).collect();
        assert!(
            answers[..4].iter().all(|a| !is_error_answer(a)),
            "four uploads may run at once"
        );
        let refused = archived::from_bytes(&answers[4]).unwrap();
        assert!(
            format!("{refused:?}").contains("uploads are in progress already"),
            "the fifth is refused: {refused:?}"
        );
    }
    let out = deploy(&conductor, ["4", "2", "1"]);
    assert!(
        text(&out).contains("uploads are in progress already"),
        "a deploy meanwhile is refused, saying why: {}",
        text(&out)
    );
    // Unfinished uploads are dropped after two minutes without a chunk;
    // restarting the Conductor drops them at once (it keeps none).
    drop(conductor_daemon);
    let (conductor_daemon, _out) = conductor.daemon("conductor", "admin API on");
    let out = deploy(&conductor, ["4", "2", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let manager = ClusterManager::open_with(Some(&conductor.dir.join("rama.yaml")), &[], Side::External).unwrap();
    let depot = manager.depot("WordCountModule", "*sentences").unwrap();
    depot
        .append(&Value::from("the cat"), engine::cluster::AckLevel::Ack)
        .unwrap();
    let worker = manager.workers("WordCountModule").unwrap().remove(0);
    let worker_pid = sup.worker_pid().unwrap();

    // Regression: one request of a list nested 200,000 deep aborted a
    // worker (stack overflow), 50,000 deep the Conductor. Sent here by an
    // authenticated client: the secret is no excuse for a crash.
    let deep = archived::deep_list_archive(200_000);
    let to_worker = Connection::connect(worker.address.as_str(), PROTOCOL_VERSION, FRAME_BYTES_MAX, &secret).unwrap();
    assert!(
        is_error_answer(&to_worker.call(&deep).unwrap()),
        "the worker answers with an error"
    );
    let admin = Connection::connect(conductor_addr.as_str(), PROTOCOL_VERSION, FRAME_BYTES_MAX, &secret).unwrap();
    assert!(is_error_answer(
        &admin.call(&archived::deep_list_archive(50_000)).unwrap()
    ));
    // Peer lanes: a deep message, a message cut short, and ids out of
    // range (an index from the network once indexed the module's objects
    // unchecked).
    for lane in [0u32, 3] {
        let peer = Connection::connect_as(
            worker.address.as_str(),
            PROTOCOL_VERSION,
            FRAME_BYTES_MAX,
            net::peers::peer_role(lane),
            &secret,
        )
        .unwrap();
        use engine::wire::{Flow, PeerMessage};
        let stage = archived::encode(&PeerMessage::Stage {
            flow: Flow::Stream(4_000_000),
            stage: 1,
            task: 0,
            items: vec![],
        });
        let short = stage[..stage.len() / 2].to_vec();
        let bad_index = archived::encode(&PeerMessage::Append {
            depot: u32::MAX,
            task: 0,
            record: archived::to_bytes(&Value::Nil),
            ack: engine::cluster::AckLevel::Ack,
            wants_reply: true,
        });
        for message in [&deep, &short, &bad_index, &stage] {
            let answer = peer.call(message).expect("the worker answers");
            assert!(is_error_answer(&answer), "lane {lane}: refused with an error answer");
        }
    }
    drop((to_worker, admin));
    assert!(alive(worker_pid), "the worker survived the hostile frames");
    assert!(
        String::from_utf8_lossy(&conductor.rama(&["moduleStatus", "WordCountModule"]).stdout)
            .starts_with("[:running]\ninstance 0: running, 1 of 1 workers registered"),
        "the Conductor survived the hostile frames"
    );

    // Regression: no connection cap and no handshake timeout (500 idle
    // connections took the Conductor to 3,004 threads).
    let pid = conductor_daemon.0.id();
    let before = threads_of(pid);
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&conductor_addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = threads_of(pid);
    assert!(
        during <= before + 2 * 40 + 8,
        "{during} Conductor threads with 300 idle connections against a cap of 40 ({before} before)"
    );
    let out = conductor.rama(&["moduleStatus", "WordCountModule"]);
    assert!(
        out.status.success() || text(&out).contains("limit of open connections"),
        "a refusal names the cap: {}",
        text(&out)
    );
    drop(idle);
    // Once they are gone (or timed out in the handshake) the CLI is served.
    eventually("the Conductor to serve the CLI again", || {
        conductor.rama(&["moduleStatus", "WordCountModule"]).status.success()
    });

    // Without the cluster secret (another one, or none) every listener
    // refuses, and nothing is run or stored.
    let intruder = root.path().join("intruder");
    std::fs::create_dir_all(&intruder).unwrap();
    std::fs::copy(conductor.dir.join("rama.yaml"), intruder.join("rama.yaml")).unwrap();
    Secret::create(&intruder.join("cluster.secret"), false).unwrap();
    let out = common::rama_in(
        &intruder,
        &[
            "deploy",
            "--action",
            "launch",
            "--jar",
            examples_artifact().to_str().unwrap(),
            "--module",
            "Other",
            "--tasks",
            "2",
            "--threads",
            "1",
            "--workers",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("cluster secret"), "{}", text(&out));
    assert_eq!(artifacts(&conductor), 1, "only the module's own artifact is stored");
    // ZooKeeper refuses the wrong credentials, naming why.
    let out = common::rama_in(&intruder, &["depotAppend", "WordCountModule", "*sentences", "\"x\""]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("refuses this cluster's credentials"),
        "{}",
        text(&out)
    );
    // The worker's client port and a peer lane refuse a wrong secret.
    let wrong = Secret::generate();
    for role in [0u8, net::peers::peer_role(0)] {
        match Connection::connect_as(worker.address.as_str(), PROTOCOL_VERSION, FRAME_BYTES_MAX, role, &wrong) {
            Err(NetError::Unauthenticated { .. }) => {}
            other => panic!("role {role}: a wrong secret was not refused: {other:?}"),
        }
    }
    let counts = manager.pstate("WordCountModule", "$$wordCounts").unwrap();
    assert_eq!(counts.select_one(&[Nav::key("cat")]).unwrap(), Value::Int(1));
    drop((depot, counts, manager));
    let out = conductor.rama(&["destroy", "WordCountModule"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Regression: a worker left running from an earlier cluster (its
/// Supervisor stopped) re-registered under the same module name when a new
/// ZooKeeper came up at the same address and root; the two registrations
/// of one worker id deleted each other every 500 ms and clients reached
/// the stale worker (word counts came out wrong). A worker now serves only
/// while its assignment names its module instance.
/// The daemons of a one-node cluster: ZooKeeper, the Conductor, the
/// Supervisor (with its stdout, kept open).
struct OneNode([(Daemon, std::io::BufReader<std::process::ChildStdout>); 3]);

/// ZooKeeper, a Conductor and a Supervisor on node `name`, WordCountModule
/// deployed (tasks 4, threads 2, one worker).
fn one_node_with_wordcount(root: &std::path::Path, name: &str, zk: u16, cport: u16, extra: &str) -> (Node, OneNode) {
    let node = Node::new(root, name, zk, cport, extra);
    let zk_daemon = node.daemon("devZookeeper", "ZooKeeper running");
    let conductor = node.daemon("conductor", "admin API on");
    let sup = node.daemon("supervisor", "supervisor ");
    let out = deploy(&node, ["4", "2", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    (node, OneNode([zk_daemon, conductor, sup]))
}

/// The Supervisor dies (its worker goes on, by design), the Conductor and
/// ZooKeeper stop, and ZooKeeper's data is wiped.
fn lose_the_cluster(node: &Node, cluster: OneNode) {
    let OneNode([zk_daemon, conductor, (mut sup, _out)]) = cluster;
    sup.0.kill().unwrap();
    sup.0.wait().unwrap();
    // Reaped: its Drop must not signal a pid that may be reused.
    std::mem::forget(sup);
    drop(conductor);
    drop(zk_daemon);
    std::fs::remove_dir_all(node.dir.join("data/zookeeper")).unwrap();
}

#[test]
fn a_stale_worker_does_not_join_a_new_cluster() {
    let _one = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let _kill_workers = KillWorkers(root.path().to_path_buf());
    let (zk, cport) = (free_port(), free_port());
    let first = free_port().max(20000) / 2 + 20000;
    let ports = |at: u16| format!("supervisor.port.range: [{at}, {}]\n", at + 20);
    let (old, cluster) = one_node_with_wordcount(root.path(), "old", zk, cport, &ports(first));
    let stale = old.worker_pid().unwrap();
    let manager = ClusterManager::open_with(Some(&old.dir.join("rama.yaml")), &[], Side::External).unwrap();
    let depot = manager.depot("WordCountModule", "*sentences").unwrap();
    for _ in 0..5 {
        depot
            .append(&Value::from("stale stale"), engine::cluster::AckLevel::Ack)
            .unwrap();
    }
    drop((depot, manager));
    // The Supervisor dies (its worker goes on, by design); the cluster's
    // ZooKeeper and Conductor are replaced by fresh ones on the same
    // address and root, with the same secret.
    lose_the_cluster(&old, cluster);
    assert!(alive(stale), "the worker outlives its Supervisor");
    let new = Node::new(root.path(), "new", zk, cport, &ports(first + 100));
    let _zk = new.daemon("devZookeeper", "ZooKeeper running");
    let _conductor = new.daemon("conductor", "admin API on");
    let _sup = new.daemon("supervisor", "supervisor ");
    let out = deploy(&new, ["4", "2", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    // The stale worker finds its assignment gone and stops itself.
    eventually("the stale worker to stop", || !alive(stale));
    let manager = ClusterManager::open_with(Some(&new.dir.join("rama.yaml")), &[], Side::External).unwrap();
    let depot = manager.depot("WordCountModule", "*sentences").unwrap();
    let counts = manager.pstate("WordCountModule", "$$wordCounts").unwrap();
    for _ in 0..50 {
        depot
            .append(&Value::from("fresh"), engine::cluster::AckLevel::Ack)
            .unwrap();
    }
    assert_eq!(counts.select_one(&[Nav::key("fresh")]).unwrap(), Value::Int(50));
    assert_eq!(counts.select_one(&[Nav::key("stale")]).unwrap(), Value::Nil);
    // Every CLI call finds the module (no registration flapping).
    for _ in 0..20 {
        let out = new.rama(&["pstateSelect", "WordCountModule", "$$wordCounts", "[\"fresh\"]"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "[50]\n", "{}", text(&out));
    }
    drop((depot, counts, manager));
    let _ = new.rama(&["destroy", "WordCountModule"]);
}

/// Regression: a Supervisor restarted against a fresh ZooKeeper (wiped, or
/// another cluster's) found no assignments there, stopped its workers and
/// deleted their data. Now it refuses to start, naming both clusters, and
/// nothing of its data or workers is touched.
#[test]
fn a_supervisor_keeps_its_data_when_it_meets_another_clusters_zookeeper() {
    let _one = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let _kill_workers = KillWorkers(root.path().to_path_buf());
    let (zk, cport) = (free_port(), free_port());
    let first = free_port().max(20000) / 2 + 20000;
    let ports = format!("supervisor.port.range: [{first}, {}]\n", first + 20);
    let (node, cluster) = one_node_with_wordcount(root.path(), "node", zk, cport, &ports);
    let worker = node.worker_pid().unwrap();
    let data = node.dir.join("data/supervisor/data/WordCountModule");
    assert!(data.is_dir());
    lose_the_cluster(&node, cluster);
    // A fresh ZooKeeper and Conductor at the same address: a new cluster.
    let _zk = node.daemon("devZookeeper", "ZooKeeper running");
    let _conductor = node.daemon("conductor", "admin API on");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(&node.dir)
        .env_remove("RAMA_CONFIG")
        .arg("supervisor")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    eventually("the Supervisor to refuse the other cluster", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.unwrap().success(), "{err}");
    assert!(
        err.contains("belongs to cluster") && err.contains("holds cluster"),
        "{err}"
    );
    assert!(data.is_dir(), "the data is kept");
    assert!(alive(worker), "its worker is left alone");
}

/// Regression: 16 bytes flipped in the middle of a depot's active segment
/// were taken for a torn tail at restart: 19,135 acknowledged records
/// were zeroed without a word, and the stream consumer's offset then
/// pointed past the log's end. Now the worker refuses to open the damaged
/// log, nothing is changed on disk, and the task group stays down with
/// the reason in `moduleStatus` and `taskGroupsStatus`.
#[test]
fn damaged_data_keeps_its_task_group_down_and_says_why() {
    let _one = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let _kill_workers = KillWorkers(root.path().to_path_buf());
    let (zk, cport) = (free_port(), free_port());
    let first = free_port().max(20000) / 2 + 20000;
    let node = Node::new(
        root.path(),
        "n1",
        zk,
        cport,
        &format!("supervisor.port.range: [{first}, {}]\n", first + 20),
    );
    let _zk = node.daemon("devZookeeper", "ZooKeeper running");
    let _conductor = node.daemon("conductor", "admin API on");
    let sup = node.daemon("supervisor", "supervisor ");
    let out = deploy(&node, ["2", "1", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let manager = ClusterManager::open_with(Some(&node.dir.join("rama.yaml")), &[], Side::External).unwrap();
    let depot = manager.depot("WordCountModule", "*sentences").unwrap();
    for i in 0..400 {
        depot
            .append(&Value::from(format!("word{i} the")), engine::cluster::AckLevel::Ack)
            .unwrap();
    }
    drop((depot, manager));
    // Stop the Supervisor (the worker stays), then the worker, cleanly.
    drop(sup);
    let pid = node.worker_pid().unwrap();
    // SAFETY: signals the worker this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    eventually("the worker to stop", || !alive(pid));
    // Damage the middle of the active segment of the partition with data.
    // data/<module>/<instance>-<incarnation>: the only instance there.
    let instances = node.dir.join("data/supervisor/data/WordCountModule");
    let instance = std::fs::read_dir(&instances)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("0-"))
        .expect("instance 0's data directory");
    let parts = instance.join("WordCountModule");
    let segment = (0..2)
        // One task thread: task group 0 holds both partitions of the
        // depot (stable id 0).
        .map(|t| parts.join(format!("tg-0/depot-0/task-{t}/00000000000000000000.log")))
        .max_by_key(|p| {
            let b = std::fs::read(p).unwrap();
            b.iter().rposition(|&x| x != 0).unwrap_or(0)
        })
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let data_end = bytes.iter().rposition(|&x| x != 0).unwrap();
    assert!(data_end > 4096, "the partition holds many frames ({data_end} bytes)");
    for b in &mut bytes[data_end / 2..data_end / 2 + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&segment, &bytes).unwrap();
    // The Supervisor starts the worker again; it refuses to open the log.
    let _sup = node.daemon("supervisor", "supervisor ");
    let started = std::time::Instant::now();
    loop {
        let out = text(&node.rama(&["moduleStatus", "WordCountModule"]));
        if out.contains("worker 0 of instance 0 is down: corrupt data in") {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let logs: String = std::fs::read_dir(node.dir.join("logs"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| {
                    format!(
                        "== {}\n{}",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    )
                })
                .collect();
            let worker = node
                .worker_pid()
                .map(|p| format!("worker {p}: {}", waits_of(p)))
                .unwrap_or_default();
            panic!("moduleStatus never named the damage: {out}\n{worker}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = text(&node.rama(&["moduleStatus", "WordCountModule"]));
    assert!(
        status.contains(segment.to_str().unwrap()),
        "the file is named: {status}"
    );
    let groups = text(&node.rama(&["taskGroupsStatus", "WordCountModule"]));
    assert!(groups.contains("down: corrupt data in"), "{groups}");
    // Started again (with backoff), it refuses again; the file is as it was.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "the damaged segment was changed"
    );
    let out = node.rama(&["destroy", "WordCountModule"]);
    assert!(out.status.success(), "{}", text(&out));
}
