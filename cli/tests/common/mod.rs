//! Helpers shared by the CLI tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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
