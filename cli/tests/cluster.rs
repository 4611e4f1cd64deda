//! A cluster of real processes on loopback: ZooKeeper, a Conductor and two
//! Supervisors (127.0.0.2 and 127.0.0.3), each with its own local.dir.
//! Deploy, data commands, worker and Supervisor crashes, destroy, and bad
//! deploys through the CLI.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{examples_artifact, free_port, Daemon};

/// Kills, when dropped, every worker process the Supervisors under `root`
/// recorded (Supervisors leave workers running by design; a failed test
/// must not leave them behind).
struct KillWorkers(PathBuf);

impl Drop for KillWorkers {
    fn drop(&mut self) {
        for sup in ["s1", "s2"] {
            let dir = self.0.join(sup).join("data/supervisor/workers");
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if let Some(pid) = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                {
                    // SAFETY: signals a worker this test's cluster started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

struct Node {
    dir: PathBuf,
}

impl Node {
    fn new(root: &Path, name: &str, zk: u16, conductor: u16, extra: &str) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("rama.yaml"),
            format!(
                "zookeeper.servers: [\"127.0.0.1\"]\nzookeeper.port: {zk}\nconductor.host: \"127.0.0.1\"\n\
                 conductor.port: {conductor}\nlocal.dir: data\n{extra}"
            ),
        )
        .unwrap();
        Node { dir }
    }

    fn rama(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_rama"))
            .current_dir(&self.dir)
            .env_remove("RAMA_CONFIG")
            .args(args)
            .output()
            .unwrap()
    }

    /// Starts a daemon and waits for its first line of output.
    fn daemon(&self, cmd: &str, expect: &str) -> (Daemon, BufReader<std::process::ChildStdout>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rama"))
            .current_dir(&self.dir)
            .env_remove("RAMA_CONFIG")
            .arg(cmd)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains(expect), "{cmd}: {line:?}");
        (Daemon(child), out)
    }

    fn worker_pid(&self) -> Option<u32> {
        let dir = self.dir.join("data/supervisor/workers");
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".pid")
                .then(|| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                .flatten()
        })
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill(pid, 0) only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
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
    let s1 = Node::new(
        root.path(),
        "s1",
        zk,
        cport,
        &format!(
            "supervisor.host: \"127.0.0.2\"\n{}",
            ports(free_port().max(20000) / 2 + 20000)
        ),
    );
    let s2 = Node::new(
        root.path(),
        "s2",
        zk,
        cport,
        &format!(
            "supervisor.host: \"127.0.0.3\"\n{}",
            ports(free_port().max(20000) / 2 + 21000)
        ),
    );
    let _zk = zk_node.daemon("devZookeeper", "ZooKeeper running");
    let _conductor = conductor.daemon("conductor", "admin API on");
    let mut sups = [
        Some(s1.daemon("supervisor", "supervisor ")),
        Some(s2.daemon("supervisor", "supervisor ")),
    ];
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

    // Bad deploys: each refused with its reason, nothing left behind.
    for (args, why) in [
        (vec!["--tasks", "6", "--threads", "2", "--workers", "1"], "power of two"),
        (
            vec!["--tasks", "8", "--threads", "2", "--workers", "2"],
            "one worker process for now",
        ),
        (
            vec![
                "--tasks",
                "8",
                "--threads",
                "2",
                "--workers",
                "1",
                "--replicationFactor",
                "2",
            ],
            "replication is not implemented yet",
        ),
    ] {
        let out = deploy(&args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(why), "{why}: {}", text(&out));
    }
    let out = conductor.rama(&[
        "deploy",
        "--action",
        "launch",
        "--jar",
        "/nonexistent.jar",
        "--module",
        "M",
        "--tasks",
        "8",
        "--threads",
        "2",
        "--workers",
        "1",
    ]);
    assert!(text(&out).contains("no such file"), "{}", text(&out));
    let out = conductor.rama(&[
        "deploy",
        "--action",
        "launch",
        "--jar",
        jar,
        "--module",
        "Nope",
        "--tasks",
        "8",
        "--threads",
        "2",
        "--workers",
        "1",
    ]);
    assert!(text(&out).contains("has no module Nope"), "{}", text(&out));
    let not_artifact = root.path().join("not-an-artifact.sh");
    std::fs::write(&not_artifact, "#!/bin/sh\necho hello\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&not_artifact, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = conductor.rama(&[
        "deploy",
        "--action",
        "launch",
        "--jar",
        not_artifact.to_str().unwrap(),
        "--module",
        "M",
        "--tasks",
        "8",
        "--threads",
        "2",
        "--workers",
        "1",
    ]);
    assert!(text(&out).contains("not a module artifact"), "{}", text(&out));
    let out = conductor.rama(&["moduleStatus", "WordCountModule"]);
    assert!(text(&out).contains("no module named WordCountModule"), "{}", text(&out));

    // Deploy, with progress, until running.
    let out = deploy(&["--tasks", "8", "--threads", "2", "--workers", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("WordCountModule: [:running]"), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&conductor.rama(&["moduleStatus", "WordCountModule"]).stdout),
        "[:running]\n"
    );
    let out = deploy(&["--tasks", "8", "--threads", "2", "--workers", "1"]);
    assert!(text(&out).contains("already deployed"), "{}", text(&out));
    let out = conductor.rama(&["taskGroupsStatus", "WordCountModule"]);
    let groups = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        groups.contains("task group 0: tasks [0, 2, 4, 6] on worker 0 at 127.0.0."),
        "{groups}"
    );
    assert!(
        groups.contains("task group 1: tasks [1, 3, 5, 7] on worker 0 at 127.0.0."),
        "{groups}"
    );
    assert!(groups.contains("(supervisor "), "{groups}");

    let out = conductor.rama(&[
        "depotAppend",
        "WordCountModule",
        "*sentences",
        "\"the cat and the dog\"",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let select = || conductor.rama(&["pstateSelect", "WordCountModule", "$$wordCounts", "[\"the\"]"]);
    assert_eq!(String::from_utf8_lossy(&select().stdout), "[2]\n");

    // The worker went to the Supervisor with fewer assignments (either).
    let (which, node, other) = if s1.worker_pid().is_some() {
        (0, &s1, &s2)
    } else {
        (1, &s2, &s1)
    };
    assert!(other.worker_pid().is_none());
    let pid = node.worker_pid().expect("a worker pid file");

    // kill -9 the worker: its Supervisor starts it again; data intact.
    // SAFETY: kills a process this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    eventually("the worker to be restarted", || {
        node.worker_pid().is_some_and(|p| p != pid && alive(p)) && String::from_utf8_lossy(&select().stdout) == "[2]\n"
    });

    // kill -9 its Supervisor: the worker keeps serving; a restarted
    // Supervisor adopts it instead of starting another.
    let worker = node.worker_pid().unwrap();
    let (mut sup, _) = sups[which].take().unwrap();
    sup.0.kill().unwrap();
    sup.0.wait().unwrap();
    assert_eq!(String::from_utf8_lossy(&select().stdout), "[2]\n");
    assert!(alive(worker));
    let restarted = node.daemon("supervisor", "adopted worker");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(node.worker_pid(), Some(worker), "a second worker was started");
    assert!(alive(worker));
    assert_eq!(String::from_utf8_lossy(&select().stdout), "[2]\n");
    sups[which] = Some(restarted);

    // destroy: the worker, its assignment and its data are gone.
    let out = conductor.rama(&["destroy", "WordCountModule"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("destroyed"), "{}", text(&out));
    eventually("the worker to stop", || !alive(worker));
    let out = conductor.rama(&["moduleStatus", "WordCountModule"]);
    assert_eq!(out.status.code(), Some(1));
    eventually("the worker's data to be removed", || {
        std::fs::read_dir(node.dir.join("data/supervisor/workers"))
            .map(|d| d.count() == 0)
            .unwrap_or(true)
    });
    let out = conductor.rama(&["pstateSelect", "WordCountModule", "$$wordCounts", "[\"the\"]"]);
    assert!(
        text(&out).contains("no module named WordCountModule is running"),
        "{}",
        text(&out)
    );
}
