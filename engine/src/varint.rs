//! LEB128 unsigned varints, as used in log frames and table blocks.

/// Bytes `v` takes encoded.
pub(crate) fn len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

pub(crate) fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint of at most 10 bytes at `*pos`, advancing it; `None` if it
/// is cut short or does not fit in a u64.
pub(crate) fn get(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        if shift == 63 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_refuses_overlong() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            super::put(&mut out, v);
            assert_eq!(out.len(), super::len(v));
            let mut pos = 0;
            assert_eq!(super::get(&out, &mut pos), Some(v));
            assert_eq!(pos, out.len());
        }
        let mut pos = 0;
        assert_eq!(super::get(&[0xff; 11], &mut pos), None);
        let mut pos = 0;
        assert_eq!(super::get(&[0x80], &mut pos), None);
    }
}
