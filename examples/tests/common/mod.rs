//! Helpers shared by the example-module tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

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
