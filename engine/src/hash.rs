//! The engine's one 64-bit hash of byte strings.
//!
//! Used for bloom filters and for placing keys on tasks. Task placement
//! makes its output part of the stored format (a key's task decides where
//! its data lives), so it must never change: the golden values in the tests
//! pin it.

/// 64-bit hash: FxHash-style mixing over 8-byte words, finished with the
/// murmur3 64-bit mix. Fast on short keys and well spread.
pub fn hash64(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = (h.rotate_left(5) ^ u64::from_le_bytes(c.try_into().expect("8 bytes"))).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(buf)).wrapping_mul(K);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_values_never_change() {
        // Changing these moves every hash-partitioned key to another task.
        let got: Vec<u64> = [&b""[..], b"a", b"hello world", b"0123456789abcdef0"]
            .iter()
            .map(|b| hash64(b))
            .collect();
        assert_eq!(got, GOLDEN, "hash64 changed: {got:#x?}");
    }

    const GOLDEN: [u64; 4] = [0x0, 0x3bb1_0b8f_660c_301d, 0x5a9b_2e25_9665_ec0e, 0x4c95_e115_dfc0_f94f];
}
