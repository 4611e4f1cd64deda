//! `rama dev`: one command brings up ZooKeeper, a Conductor, a Supervisor
//! and WordCountModule; the commands it prints work; SIGINT (Ctrl-C)
//! destroys the module and stops every process it started. The module
//! runs on two workers (both under the one Supervisor).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{examples_artifact, Daemon};

fn alive(pid: i32) -> bool {
    // SAFETY: kill(pid, 0) only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn dev_runs_a_cluster_and_stops_everything() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dev");
    let jar = examples_artifact();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(root.path())
        .env_remove("RAMA_CONFIG")
        .args([
            "dev",
            "--dir",
            dir.to_str().unwrap(),
            "--jar",
            jar.to_str().unwrap(),
            "--workers",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let dev = Daemon(child);
    let mut lines = out.lines();
    let mut seen = Vec::new();
    let mut append = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("depotAppend") {
            append = Some(line.trim().to_string());
        }
        if line.contains("Ctrl-C stops everything") {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("WordCountModule: [:running]")),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l.contains("Admin API (Conductor) at 127.0.0.1:")),
        "{seen:#?}"
    );
    // The printed command, run through a shell as a user would paste it.
    let append = append.expect("a depotAppend command is printed");
    let out = Command::new("sh").arg("-c").arg(&append).output().unwrap();
    assert!(
        out.status.success(),
        "{append}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = dir.join("rama.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_rama"))
        .arg("--config")
        .arg(&config)
        .args(["pstateSelect", "WordCountModule", "$$wordCounts", "[\"fox\"]"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[1]\n");
    // Every process it started: ZooKeeper's java, the daemons, the workers.
    let worker_pids: Vec<i32> = std::fs::read_dir(dir.join("data/supervisor/workers"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(worker_pids.len(), 2, "{worker_pids:?}");
    assert!(worker_pids.iter().all(|&p| alive(p)));
    let pid = dev.0.id() as i32;
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let mut rest = Vec::new();
    for line in lines {
        rest.push(line.unwrap());
    }
    assert!(
        rest.iter().any(|l| l.contains("WordCountModule: destroyed")),
        "{rest:#?}"
    );
    assert!(rest.iter().any(|l| l.contains("rama dev: stopped")), "{rest:#?}");
    let mut dev = dev;
    let status = dev.0.wait().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while worker_pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "a worker outlived rama dev");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing listens on the ports it used any more.
    let text = std::fs::read_to_string(&config).unwrap();
    for key in ["zookeeper.port", "conductor.port"] {
        let port: u16 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{key} {port} still open"
        );
    }
}
