//! The `rama` binary: configuration values, usage errors, and a real
//! development ZooKeeper (Debian's package, which `.ci/run` installs).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{examples_artifact, free_port, make_secret, rama_in as rama, Daemon};

#[test]
fn conf_value_prints_set_and_default_values() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rama.yaml"),
        "conductor.host:\n  internal: \"10.0.0.1\"\n  external: \"rama.example\"\nzookeeper.port: 2181\n",
    )
    .unwrap();
    let out = rama(dir.path(), &["confValue", "zookeeper.port"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2181\n");
    let out = rama(dir.path(), &["confValue", "conductor.port"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1973\n");
    let out = rama(dir.path(), &["confValue", "supervisor.port.range"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[3000, 4000]\n");
    let out = rama(dir.path(), &["confValue", "conductor.host"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{internal: 10.0.0.1, external: rama.example}\n"
    );
    let out = rama(dir.path(), &["confValue", "nope.key"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.key: unknown key"));
    // What the daemons use: defaults that depend on the machine included.
    let out = rama(dir.path(), &["confValue", "supervisor.host"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        control::config::host_name().unwrap()
    );
    let out = rama(dir.path(), &["confValue", "cluster.ui.port"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "8888\n");
    let out = rama(dir.path(), &["confValue", "local.dir"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        dir.path().join("local-rama-data").display().to_string()
    );
    // A misspelt key is refused, naming the key it resembles.
    std::fs::write(dir.path().join("rama.yaml"), "conductor.prot: 1\n").unwrap();
    let out = rama(dir.path(), &["confValue", "conductor.port"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("conductor.prot: unknown key; did you mean conductor.port?"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The seed's shape of zookeeper.servers.
    std::fs::write(
        dir.path().join("rama.yaml"),
        "zookeeper.servers:\n  - internal: \"9.10.11.12\"\n    external: \"13.14.15.16\"\n",
    )
    .unwrap();
    let out = rama(dir.path(), &["confValue", "zookeeper.servers"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Usage errors exit 2; --help works everywhere.
    assert_eq!(rama(dir.path(), &["bogus"]).status.code(), Some(2));
    assert_eq!(rama(dir.path(), &["confValue"]).status.code(), Some(2));
    assert_eq!(rama(dir.path(), &["confValue", "--help"]).status.code(), Some(0));
    // A bad file names the key.
    std::fs::write(dir.path().join("rama.yaml"), "zookeeper.port: 99999\n").unwrap();
    let out = rama(dir.path(), &["confValue", "zookeeper.port"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("zookeeper.port: must be a port number"));
    // An explicit config that does not exist is an error.
    let out = rama(dir.path(), &["--config", "missing.yaml", "confValue", "zookeeper.port"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));
}

#[test]
fn dev_zookeeper_serves_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("rama.yaml"),
        format!("zookeeper.servers: [\"127.0.0.1\"]\nzookeeper.port: {port}\nlocal.dir: data\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(dir.path())
        .env_remove("RAMA_CONFIG")
        .arg("devZookeeper")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    assert!(
        line.starts_with(&format!("ZooKeeper running on 127.0.0.1:{port}")),
        "{line}"
    );
    let pid: i32 = line
        .split("(pid ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(control::devzk::ruok("127.0.0.1", port));
    assert!(dir.path().join("data/zookeeper/zoo.cfg").is_file());
    assert!(dir.path().join("logs/zookeeper.log").is_file());

    // A second one on the same port is refused with a clear message.
    let out = rama(dir.path(), &["devZookeeper"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in use"));

    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ZooKeeper stopped\n");
    let deadline = Instant::now() + Duration::from_secs(15);
    // SAFETY: kill(pid, 0) only checks whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(Instant::now() < deadline, "ZooKeeper (pid {pid}) still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!control::devzk::ruok("127.0.0.1", port));
}

#[test]
fn dev_zookeeper_names_the_package_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(dir.path())
        .env_remove("RAMA_CONFIG")
        .env("RAMA_ZOOKEEPER_JAR", "/nonexistent/zookeeper.jar")
        .arg("devZookeeper")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install zookeeper"), "{err}");
}

#[test]
fn data_commands_reach_a_registered_worker() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("rama.yaml");
    std::fs::write(
        &config,
        format!("zookeeper.servers: [\"127.0.0.1\"]\nzookeeper.port: {port}\nlocal.dir: data\n"),
    )
    .unwrap();
    make_secret(dir.path());
    let zk = Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(dir.path())
        .env_remove("RAMA_CONFIG")
        .arg("devZookeeper")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut zk = Daemon(zk);
    let mut zk_out = BufReader::new(zk.0.stdout.take().unwrap());
    let mut line = String::new();
    zk_out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ZooKeeper running"), "{line}");

    // Nothing registered yet.
    let out = rama(dir.path(), &["queryInvoke", "WordCountModule", "topWords", "3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no module named WordCountModule is running"));

    let worker = Command::new(examples_artifact())
        .args([
            "worker",
            "--module",
            "WordCountModule",
            "--tasks",
            "4",
            "--threads",
            "2",
            "--register",
        ])
        .arg(&config)
        .arg("--dir")
        .arg(dir.path().join("worker"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut worker = Daemon(worker);
    let mut worker_out = BufReader::new(worker.0.stdout.take().unwrap());
    line.clear();
    worker_out.read_line(&mut line).unwrap();
    assert!(line.starts_with("worker listening on"), "{line}");

    for s in ["\"the cat and the dog\"", "\"the end\""] {
        let out = rama(dir.path(), &["depotAppend", "WordCountModule", "*sentences", s]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"offset\":"));
    }
    let out = rama(
        dir.path(),
        &["pstateSelect", "WordCountModule", "$$wordCounts", "[\"the\"]"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[3]\n");
    let out = rama(
        dir.path(),
        &[
            "pstateSelect",
            "WordCountModule",
            "$$wordCounts",
            "[{\"mapVals\":{}}]",
            "--key",
            "\"cat\"",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = rama(dir.path(), &["queryInvoke", "WordCountModule", "topWords", "1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[[\"the\",3]]\n");
    let out = rama(
        dir.path(),
        &[
            "depotAppend",
            "WordCountModule",
            "*sentences",
            "\"x\"",
            "--ackLevel",
            "appendAck",
        ],
    );
    assert!(out.status.success());

    // A record from standard input or a file (large records do not fit
    // on a command line).
    let mut child = Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(dir.path())
        .env_remove("RAMA_CONFIG")
        .args(["depotAppend", "WordCountModule", "*sentences", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"\"zebra from stdin\"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = dir.path().join("record.json");
    std::fs::write(&file, "\"zebra from a file\"").unwrap();
    let out = rama(
        dir.path(),
        &[
            "depotAppend",
            "WordCountModule",
            "*sentences",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = rama(
        dir.path(),
        &["pstateSelect", "WordCountModule", "$$wordCounts", "[\"zebra\"]"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[2]\n");
    // A record above the depot's limit is refused by size, from a file.
    std::fs::write(&file, format!("\"{}\"", "y".repeat(3 << 20))).unwrap();
    let out = rama(
        dir.path(),
        &[
            "depotAppend",
            "WordCountModule",
            "*sentences",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("above the limit record_bytes_max"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A reverse range with a limit prints its entries in the order read.
    let key = "\"the\"";
    let out = rama(
        dir.path(),
        &[
            "pstateSelect",
            "WordCountModule",
            "$$wordCounts",
            "[{\"range\":{\"reverse\":true,\"limit\":2}}]",
            "--key",
            key,
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pairs = shown[0].as_array().expect("a list of [key, value] pairs");
    assert_eq!(pairs.len(), 2, "{shown}");
    assert!(pairs[0][0].as_str() > pairs[1][0].as_str(), "descending: {shown}");
    // A path that names no task needs --key, and the CLI says so.
    let out = rama(
        dir.path(),
        &["pstateSelect", "WordCountModule", "$$wordCounts", "[{\"all\":{}}]"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--key") && !err.contains("select_on"), "{err}");
    // An object that is not a step is refused, not taken as a key.
    let out = rama(
        dir.path(),
        &["pstateSelect", "WordCountModule", "$$wordCounts", "[{\"bogus\":1}]"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown path step \"bogus\""));

    // Bad input: usage errors exit 2, refusals exit 1, each with its reason.
    let out = rama(
        dir.path(),
        &["depotAppend", "WordCountModule", "*sentences", "{not json"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
    let out = rama(dir.path(), &["depotAppend", "WordCountModule", "*nope", "\"x\""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no depot *nope"));
    let out = rama(dir.path(), &["depotAppend", "WordCountModule", "*sentences", "7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a sentence must be a string"));
    let out = rama(
        dir.path(),
        &[
            "depotAppend",
            "WordCountModule",
            "*sentences",
            "\"x\"",
            "--ackLevel",
            "maybe",
        ],
    );
    assert_eq!(out.status.code(), Some(2));

    // A stopped worker deregisters.
    // SAFETY: signals our own child.
    unsafe { libc::kill(worker.0.id() as i32, libc::SIGTERM) };
    assert!(worker.0.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = rama(dir.path(), &["queryInvoke", "WordCountModule", "topWords", "1"]);
        if String::from_utf8_lossy(&out.stderr).contains("no module named WordCountModule is running") {
            break;
        }
        assert!(Instant::now() < deadline, "the worker's registration outlived it");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn zookeeper_unreachable_at_start_is_retried_then_named() {
    let dir = tempfile::tempdir().unwrap();
    let zk = free_port();
    std::fs::write(
        dir.path().join("rama.yaml"),
        format!("zookeeper.servers: [\"127.0.0.1\"]\nzookeeper.port: {zk}\nzookeeper.connect.timeout.secs: 2\nlocal.dir: data\n"),
    )
    .unwrap();
    make_secret(dir.path());
    for args in [
        &["conductor"][..],
        &["supervisor"],
        &["depotAppend", "M", "*d", "1"],
        &["pstateSelect", "M", "$$p", "[1]"],
    ] {
        let started = Instant::now();
        let out = rama(dir.path(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!("ZooKeeper unreachable at 127.0.0.1:{zk}")) && err.contains("after 2 s of retries"),
            "{args:?}: {err}"
        );
        // It kept trying (with backoff) for the configured time first.
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "{args:?} gave up at once"
        );
    }
    // A bad timeout is refused when the configuration is read.
    std::fs::write(dir.path().join("rama.yaml"), "zookeeper.connect.timeout.secs: 0\n").unwrap();
    let out = rama(dir.path(), &["confValue", "zookeeper.port"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("zookeeper.connect.timeout.secs"));
}
