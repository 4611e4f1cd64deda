//! Helpers shared by the example-module tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use net::auth::Secret;

/// A small deterministic generator (xorshift64*), seeded per test.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed: `RAMA_TEST_SEED` or a fixed default, printed so a failure can
/// be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("RAMA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED);
    eprintln!("RAMA_TEST_SEED={seed}");
    seed
}

/// Polls `f` until it returns true; panics with `what` after `limit`.
pub fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub const WORDS: &[&str] = &[
    "the", "cat", "dog", "and", "a", "river", "stone", "light", "of", "runs", "over", "under", "quick", "brown", "fox",
    "jumps", "lazy", "night", "day", "sea", "Sky", "tree", "leaf", "wind",
];

/// A sentence of 3 to 12 words from [`WORDS`], with punctuation.
pub fn sentence(rng: &mut Rng) -> String {
    let n = 3 + rng.below(10);
    let words: Vec<&str> = (0..n).map(|_| WORDS[rng.below(WORDS.len() as u64) as usize]).collect();
    format!("{}.", words.join(if rng.below(2) == 0 { " " } else { ", " }))
}

/// A secret file for a worker started by a test, and the secret.
pub fn secret_in(dir: &Path) -> (std::path::PathBuf, Secret) {
    let path = dir.join("cluster.secret");
    let secret = match Secret::load(&path) {
        Ok(s) => s,
        Err(_) => Secret::create(&path, false).unwrap(),
    };
    (path, secret)
}

/// A worker process a test started: killed (SIGKILL, by its pid) when
/// dropped unless [`stop_worker`] stopped it, so a failing test leaves no
/// worker behind.
pub struct Worker(Option<Child>);

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn start_worker(dir: &Path, module: &str) -> (Worker, String) {
    start_worker_with(dir, dir, module, ["8", "2"])
}

/// A worker of `module` on `tasks`/`threads` with its data in `data` and
/// the cluster secret in `dir`; returns it and its address.
pub fn start_worker_with(dir: &Path, data: &Path, module: &str, [tasks, threads]: [&str; 2]) -> (Worker, String) {
    let (secret, _) = secret_in(dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rama-examples"))
        .args([
            "worker",
            "--module",
            module,
            "--tasks",
            tasks,
            "--threads",
            threads,
            "--secretFile",
        ])
        .arg(secret)
        .arg("--dir")
        .arg(data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("worker listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    (Worker(Some(child)), addr)
}

pub fn stop_worker(mut worker: Worker) {
    let mut child = worker.0.take().expect("a running worker");
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "worker exited with {status}");
}
