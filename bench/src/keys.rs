//! The key and value generator of the LSM workload, shared by every engine
//! run in-process: `rama-bench` itself and `fjall-baseline` (which includes
//! this file with `#[path]`, being a separate crate).
//!
//! Keys are 16 pseudo-random bytes derived from the key's index, so reads
//! can regenerate existing keys without keeping them in memory. Values
//! compress to about half their size, as db_bench's do.

/// SplitMix64: a small, fast, well-mixed generator.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sequential pseudo-random numbers.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The 16-byte key of index `i`.
pub fn key(seed: u64, i: u64) -> [u8; 16] {
    let a = mix(seed ^ mix(i));
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&mix(a).to_be_bytes());
    k
}

/// Fills `value` so that it compresses to about half its size, like
/// db_bench's values: random bytes, then a copy of them.
pub fn fill_value(rng: &mut Rng, value: &mut [u8]) {
    let half = value.len() / 2;
    for chunk in value[..half].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
    }
    value.copy_within(..half, half);
    if value.len() % 2 == 1 {
        value[value.len() - 1] = value[0];
    }
}
