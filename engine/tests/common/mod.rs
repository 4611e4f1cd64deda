//! Helpers shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

/// xorshift64*, seeded through splitmix64 so any seed (even 0) works:
/// small, deterministic, and no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The seed in `var` if set, else one from the clock; printed either way so
/// a failure can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    let seed = match std::env::var(var) {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("{var} must be a u64, got {s:?}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64,
    };
    eprintln!("{var}={seed}");
    seed
}

/// A small tmpfs mounted for one test (a full device on demand), unmounted
/// when dropped. Needs root, as CI has.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot mount a tmpfs at {} (this test needs root, as CI has)",
            dir.path().display()
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the executor's io_uring may still hold the files for a
        // moment; the mount goes once they are closed.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A store with small memtables, tables and WAL segments, so flushes,
/// compactions and segment rolls happen within a few hundred writes.
pub fn small_store_config() -> engine::lsm::LsmConfig {
    engine::lsm::LsmConfig {
        memtable_bytes_max: 16 << 10,
        key_bytes_max: 256,
        value_bytes_max: 4096,
        batch_bytes_max: 48 << 10,
        compaction_trigger: 3,
        table: engine::lsm::table::TableOptions {
            block_bytes: 512,
            bloom_bits_per_key: 10,
            write_buffer_bytes: 8 << 10,
        },
        wal: engine::log::LogConfig {
            segment_bytes_max: 64 << 10,
            record_bytes_max: 48 << 10,
            pending_bytes_max: 256 << 10,
            write_bytes_max: 32 << 10,
            prewrite_bytes: 16 << 10,
            prewrite_skip_bytes: 8 << 10,
            index_interval_bytes: 4 << 10,
            entries_max: None,
            sync: true,
        },
    }
}

/// Calls `attempt` every 50 ms until it succeeds (storage that heals by
/// itself once a full device has room again), for at most a minute.
pub async fn until_healed<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    mut attempt: impl FnMut() -> F,
) -> T {
    let started = std::time::Instant::now();
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(60),
                    "never healed: {e}"
                );
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A word-count module named `name`: depot `*words` (hashed by the
/// word), stream topology `count` adding one to `$$counts[word]`.
pub fn word_count(name: &str) -> engine::module::ModuleDef {
    use engine::module::{stage, ModuleBuilder, Partitioner};
    use engine::pstate::{Nav, Op, PStateSchema, ValueSchema};
    use engine::value::{Kind, Value};
    ModuleBuilder::new(name)
        .depot("*words", Partitioner::hash_by(|r| r.clone()))
        .pstate(
            "$$counts",
            PStateSchema::new(ValueSchema::Scalar(Kind::Str), ValueSchema::Scalar(Kind::Int)),
        )
        .stream(
            "count",
            ["*words"],
            vec![stage(|ctx, word| {
                ctx.transform(
                    "$$counts",
                    &[Nav::Key(word)],
                    Op::update(|n| Value::Int(n.as_int().unwrap_or(0) + 1)),
                )
            })],
        )
        .build()
        .unwrap()
}
