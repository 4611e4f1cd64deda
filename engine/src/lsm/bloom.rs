//! A split-free bloom filter with double hashing (Kirsch-Mitzenmacher).

/// Bits per key 10 gives about 1% false positives with 7 probes.
pub(crate) struct BloomBuilder {
    hashes: Vec<u64>,
    bits_per_key: usize,
}

impl BloomBuilder {
    pub(crate) fn new(bits_per_key: usize) -> Self {
        BloomBuilder {
            hashes: Vec::new(),
            bits_per_key,
        }
    }

    pub(crate) fn add(&mut self, key: &[u8]) {
        self.hashes.push(hash(key));
    }

    /// Encoded filter: `probes:u8` then the bit array.
    pub(crate) fn finish(&self) -> Vec<u8> {
        let bits = (self.hashes.len() * self.bits_per_key).max(64);
        let bytes = bits.div_ceil(8);
        let bits = bytes * 8;
        let probes = ((self.bits_per_key as f64) * 0.69).round().clamp(1.0, 30.0) as u8;
        let mut out = vec![0u8; 1 + bytes];
        out[0] = probes;
        for &h in &self.hashes {
            for bit in probe_bits(h, probes, bits) {
                out[1 + bit / 8] |= 1 << (bit % 8);
            }
        }
        out
    }
}

/// Returns false only if `key` was certainly not added.
pub(crate) fn may_contain(filter: &[u8], key: &[u8]) -> bool {
    let Some((&probes, bits)) = filter.split_first() else {
        return true;
    };
    if bits.is_empty() {
        return true;
    }
    probe_bits(hash(key), probes, bits.len() * 8).all(|bit| bits[bit / 8] & (1 << (bit % 8)) != 0)
}

fn probe_bits(h: u64, probes: u8, bits: usize) -> impl Iterator<Item = usize> {
    let h1 = h as u32 as u64;
    let h2 = (h >> 32) | 1;
    (0..u64::from(probes)).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % bits as u64) as usize)
}

pub(crate) use crate::hash::hash64 as hash;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut b = BloomBuilder::new(10);
        for i in 0..10_000u32 {
            b.add(&i.to_be_bytes());
        }
        let f = b.finish();
        assert!((0..10_000u32).all(|i| may_contain(&f, &i.to_be_bytes())));
        let fp = (10_000..110_000u32)
            .filter(|i| may_contain(&f, &i.to_be_bytes()))
            .count();
        assert!(fp < 2_000, "false positive rate too high: {fp} in 100000");
    }
}
