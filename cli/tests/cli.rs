//! The `rama` binary: configuration values, usage errors, and a real
//! development ZooKeeper (Debian's package, which `.ci/run` installs).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn rama(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(dir)
        .env_remove("RAMA_CONFIG")
        .args(args)
        .output()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.key is not set"));
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
    assert!(dir.path().join("data/logs/zookeeper.log").is_file());

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
