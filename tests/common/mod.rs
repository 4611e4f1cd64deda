//! Helpers shared by the CLI tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Stops the child (by its process id) when dropped, however the test
/// ends: SIGTERM first, so `rama devZookeeper` stops its ZooKeeper too,
/// then SIGKILL after 15 s.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signals our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The module artifact built beside `rama` (a workspace test build builds
/// every binary; alone, this builds it).
pub fn examples_artifact() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_rama")).with_file_name("rama-examples");
    if !exe.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "rama-examples"])
            .status()
            .unwrap();
        assert!(status.success(), "building rama-examples failed");
    }
    exe
}

/// Runs `rama ARGS` in `dir` (no RAMA_CONFIG: the rama.yaml there, if any).
pub fn rama_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(dir)
        .env_remove("RAMA_CONFIG")
        .args(args)
        .output()
        .unwrap()
}

/// What a command printed, stdout then stderr.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes a cluster secret to `dir/cluster.secret` (the default of
/// cluster.secret.file beside a rama.yaml in `dir`) with `rama secret
/// create`, as an operator would.
pub fn make_secret(dir: &Path) {
    let out = rama_in(dir, &["secret", "create"]);
    assert!(
        out.status.success(),
        "rama secret create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills, when dropped, every worker process the Supervisors under `root`
/// recorded (Supervisors leave workers running by design; a failed test
/// must not leave them behind).
pub struct KillWorkers(pub PathBuf);

impl Drop for KillWorkers {
    fn drop(&mut self) {
        // Every node directory under the root that ran a Supervisor.
        for node in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let dir = node.path().join("data/supervisor/workers");
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

/// A node of a test cluster: a directory with its rama.yaml and the
/// cluster secret.
pub struct Node {
    pub dir: PathBuf,
}

impl Node {
    pub fn new(root: &Path, name: &str, zk: u16, conductor: u16, extra: &str) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // Every node holds the cluster's one secret.
        let secret = root.join("cluster.secret");
        if !secret.exists() {
            net::auth::Secret::create(&secret, false).unwrap();
        }
        std::fs::copy(&secret, dir.join("cluster.secret")).unwrap();
        // Tests stay on loopback: supervisor.host defaults to the
        // machine's host name, which may name another address.
        let host = if extra.contains("supervisor.host") {
            ""
        } else {
            "supervisor.host: \"127.0.0.1\"\n"
        };
        std::fs::write(
            dir.join("rama.yaml"),
            format!(
                "zookeeper.servers: [\"127.0.0.1\"]\nzookeeper.port: {zk}\nconductor.host: \"127.0.0.1\"\n\
                 conductor.port: {conductor}\nlocal.dir: data\n{host}{extra}"
            ),
        )
        .unwrap();
        Node { dir }
    }

    pub fn rama(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_rama"))
            .current_dir(&self.dir)
            .env_remove("RAMA_CONFIG")
            .args(args)
            .output()
            .unwrap()
    }

    /// Starts a daemon and waits for its first line of output.
    pub fn daemon(&self, cmd: &str, expect: &str) -> (Daemon, BufReader<std::process::ChildStdout>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rama"))
            .current_dir(&self.dir)
            .env_remove("RAMA_CONFIG")
            .arg(cmd)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        // Owned before anything can fail, so a failed start stops it too.
        let daemon = Daemon(child);
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains(expect), "{cmd}: {line:?}");
        (daemon, out)
    }

    pub fn worker_pid(&self) -> Option<u32> {
        let dir = self.dir.join("data/supervisor/workers");
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".pid")
                .then(|| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                .flatten()
        })
    }
}

pub fn alive(pid: u32) -> bool {
    // SAFETY: kill(pid, 0) only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Prints, when dropped while the test panics, the last lines of every
/// log file under `root` (the daemons' and workers' logs), so a failure
/// in CI says what the processes saw.
pub struct DumpLogsOnFailure(pub PathBuf);

impl Drop for DumpLogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "log") {
                    out.push(p);
                }
            }
        }
        let mut logs = Vec::new();
        walk(&self.0, &mut logs);
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("==== {} (last 60 of {} lines)", log.display(), lines.len());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}
