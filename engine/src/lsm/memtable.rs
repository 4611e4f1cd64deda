//! The memtable: sorted in-memory writes, their bytes in an arena.
//!
//! Keys and values are copied into large arena chunks, and the sorted map
//! holds (pointer, length) handles into them. An insert allocates nothing
//! per entry, and dropping a memtable frees a few chunks instead of
//! millions of small allocations. Chunks never move or shrink while the
//! memtable lives, which is what keeps the handles valid.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;

use super::merge::Source;

const CHUNK_BYTES: usize = 1 << 20;

/// Compares byte strings 8 bytes at a time: the same order as `[u8]::cmp`,
/// without a `memcmp` call for short keys.
#[inline]
pub(crate) fn compare(a: &[u8], b: &[u8]) -> Ordering {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_be_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let y = u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != y {
            return x.cmp(&y);
        }
        i += 8;
    }
    a[i..].cmp(&b[i..])
}

/// A handle to bytes in the arena (or, for lookups, in the caller's slice).
/// The first 8 bytes are kept inline (big-endian, zero-padded), so most
/// comparisons of distinct keys never touch the arena: a cache miss saved
/// per step of a map search.
#[derive(Clone, Copy, Debug)]
struct Handle {
    prefix: u64,
    ptr: *const u8,
    len: usize,
}

impl Handle {
    fn of(bytes: &[u8]) -> Handle {
        let mut head = [0u8; 8];
        let n = bytes.len().min(8);
        head[..n].copy_from_slice(&bytes[..n]);
        Handle {
            prefix: u64::from_be_bytes(head),
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// # Safety
    /// The bytes must still be alive: arena chunks live as long as the
    /// memtable, and lookup handles as long as the caller's slice.
    unsafe fn bytes<'a>(self) -> &'a [u8] {
        // SAFETY: per the function's contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl PartialEq for Handle {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Handle {}
impl PartialOrd for Handle {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Handle {
    fn cmp(&self, other: &Self) -> Ordering {
        // Zero padding keeps prefix order consistent with byte order: a
        // shorter key padded with zeros never sorts after a longer key with
        // the same leading bytes, and ties fall through to the full compare.
        match self.prefix.cmp(&other.prefix) {
            Ordering::Equal => {}
            unequal => return unequal,
        }
        // SAFETY: handles in the map point into the arena, which outlives
        // the map; lookup handles are built from live slices for one call.
        unsafe { compare(self.bytes(), other.bytes()) }
    }
}

/// Sorted writes not yet in a table. Not `Send` (raw handles), like the
/// rest of a task thread's storage.
#[derive(Debug, Default)]
pub(crate) struct Memtable {
    // Declared before the arena so it is dropped first (handles die before
    // the bytes they point to; neither is read during drop anyway).
    map: BTreeMap<Handle, Option<Handle>>,
    arena: Vec<Vec<u8>>,
    /// Bytes used, including a per-entry estimate of the map's overhead.
    pub(crate) bytes: usize,
    /// WAL offset after the last batch applied here.
    pub(crate) wal_end: u64,
}

impl Memtable {
    fn copy_in(&mut self, bytes: &[u8]) -> Handle {
        let fits = self
            .arena
            .last()
            .is_some_and(|chunk| chunk.capacity() - chunk.len() >= bytes.len());
        if !fits {
            self.arena.push(Vec::with_capacity(CHUNK_BYTES.max(bytes.len())));
        }
        let chunk = self.arena.last_mut().expect("a chunk with room exists");
        let start = chunk.len();
        // Never reallocates: the capacity check above guarantees room, so
        // earlier handles into this chunk stay valid.
        chunk.extend_from_slice(bytes);
        Handle::of(&chunk[start..])
    }

    pub(crate) fn insert(&mut self, key: &[u8], value: Option<&[u8]>) {
        self.bytes += key.len() + value.map_or(0, <[u8]>::len) + 40;
        let k = self.copy_in(key);
        let v = value.map(|v| self.copy_in(v));
        self.map.insert(k, v);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `None`: no entry; `Some(None)`: a tombstone.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        // SAFETY: value handles point into the arena, alive as long as self.
        self.map.get(&Handle::of(key)).map(|v| v.map(|h| unsafe { h.bytes() }))
    }

    /// Every entry in key order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        // SAFETY: handles point into the arena, alive as long as self.
        self.map
            .iter()
            .map(|(k, v)| unsafe { (k.bytes(), v.map(|h| h.bytes())) })
    }

    /// Entries within bounds as a merge source.
    pub(crate) fn source<'a>(&'a self, lower: Bound<&'a [u8]>, upper: Bound<&'a [u8]>, reverse: bool) -> Source<'a> {
        let range = self
            .map
            .range((lower.map(Handle::of), upper.map(Handle::of)))
            // SAFETY: handles point into the arena, alive as long as self.
            .map(|(k, v)| Ok(unsafe { (k.bytes(), v.map(|h| h.bytes())) }));
        if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_agrees_with_slice_order() {
        let keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![1; 7],
            vec![1; 8],
            vec![1; 9],
            vec![1, 1, 1, 1, 1, 1, 1, 1, 0],
            vec![255; 16],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17],
        ];
        for a in &keys {
            for b in &keys {
                assert_eq!(compare(a, b), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn order_matches_byte_order_for_keys_of_any_length() {
        // Guards the inline prefix: zero padding must never reorder a key
        // and its extensions.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut m = Memtable::default();
        let mut model = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            let len = (next() % 12) as usize;
            let key: Vec<u8> = (0..len).map(|_| [0u8, 1, 255][(next() % 3) as usize]).collect();
            m.insert(&key, Some(b"v"));
            model.insert(key);
        }
        let got: Vec<Vec<u8>> = m.iter().map(|(k, _)| k.to_vec()).collect();
        assert_eq!(got, model.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn inserts_overwrite_and_ranges() {
        let mut m = Memtable::default();
        for i in 0..5000u32 {
            m.insert(&i.to_be_bytes(), Some(&(i * 2).to_le_bytes()));
        }
        m.insert(&7u32.to_be_bytes(), None);
        m.insert(&8u32.to_be_bytes(), Some(b"eight"));
        assert_eq!(m.get(&7u32.to_be_bytes()), Some(None));
        assert_eq!(m.get(&8u32.to_be_bytes()), Some(Some(&b"eight"[..])));
        assert_eq!(m.get(&9u32.to_be_bytes()), Some(Some(&18u32.to_le_bytes()[..])));
        assert_eq!(m.get(&9999u32.to_be_bytes()), None);
        let lo = 10u32.to_be_bytes();
        let hi = 13u32.to_be_bytes();
        let got: Vec<_> = m
            .source(Bound::Included(&lo), Bound::Excluded(&hi), true)
            .map(|r| r.unwrap().0.to_vec())
            .collect();
        assert_eq!(
            got,
            vec![
                12u32.to_be_bytes().to_vec(),
                11u32.to_be_bytes().to_vec(),
                10u32.to_be_bytes().to_vec()
            ]
        );
        assert_eq!(m.iter().count(), 5000);
    }
}
