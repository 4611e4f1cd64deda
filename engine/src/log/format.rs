//! On-disk format of a log segment. Pure functions: no I/O, so the decoder
//! can be fuzzed and unit-tested byte by byte.
//!
//! ```text
//! segment file = header frame* zero-fill
//!
//! header (32 bytes)
//!   0..8   magic  "RAMALOG1"
//!   8..12  format version (u32 LE) = 3
//!  12..16  reserved, must be zero
//!  16..24  base offset (u64 LE): offset of the first record
//!  24..28  CRC32 of bytes 0..24 (u32 LE)
//!  28..32  reserved, must be zero
//!
//! frame: the records of one group write (24-byte head + body)
//!   0..4   body length in bytes (u32 LE)
//!   4..8   CRC32 of bytes 8..24 and the body (u32 LE)
//!   8..16  base offset (u64 LE): offset of the frame's first record
//!  16..20  record count (u32 LE), at least 1
//!  20..24  epoch (u32 LE): the leader epoch the records were written in
//!          (replication, issue 13: every record of a frame has one epoch)
//!  24..    body: per record, its length (LEB128 varint) then its bytes
//! ```
//!
//! A frame holds every record of one group commit, so the framing costs 24
//! bytes per group plus one or two bytes per record, instead of a head per
//! record; and a frame is written, checked and lost as a whole.
//!
//! Invariants:
//! - frames are contiguous from byte 32; each frame's base offset is the
//!   previous frame's base offset plus its count (the first: the segment's
//!   base offset);
//! - after the last frame come zeros (segments are pre-written with zeros
//!   or end at the file's end), which is how the end is recognised: a real
//!   frame head is never all zeros, since its count is at least 1. A
//!   segment filled to within a head of its size ends in fewer than 24
//!   zero bytes, which is a clean end too;
//! - anything else after the last good frame is a torn or corrupt tail.

use crate::varint;

pub const MAGIC: &[u8; 8] = b"RAMALOG1";
/// Version 3 gave the frame head's last four bytes to the epoch (version
/// 2 kept them zero); version 2 segments are refused, not misread.
pub const VERSION: u32 = 3;
pub const HEADER_BYTES: usize = 32;
pub const FRAME_HEAD_BYTES: usize = 24;

/// Returns the 32-byte segment header for a segment starting at `base_offset`.
pub fn encode_header(base_offset: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&base_offset.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a header or frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the frame needs: more must be read (or, at the end of
    /// the file, the tail is torn).
    Truncated { needed: usize },
    /// The bytes are not a valid frame.
    Corrupt(&'static str),
}

/// Decodes a segment header and returns its base offset.
pub fn decode_header(bytes: &[u8]) -> Result<u64, FrameError> {
    let h = bytes
        .get(..HEADER_BYTES)
        .ok_or(FrameError::Truncated { needed: HEADER_BYTES })?;
    if &h[0..8] != MAGIC {
        return Err(FrameError::Corrupt("bad segment magic"));
    }
    if u32_at(h, 8) != VERSION {
        return Err(FrameError::Corrupt(
            "unsupported segment format version (this release reads version 3; version 2 is from before the \
             task group log)",
        ));
    }
    if u32_at(h, 24) != crc32fast::hash(&h[0..24]) {
        return Err(FrameError::Corrupt("segment header checksum mismatch"));
    }
    if u32_at(h, 12) != 0 || u32_at(h, 28) != 0 {
        return Err(FrameError::Corrupt("reserved segment header bytes are not zero"));
    }
    Ok(u64_at(h, 16))
}

/// Bytes a record of `payload_len` bytes takes in a frame body.
pub fn record_bytes(payload_len: usize) -> usize {
    varint::len(payload_len as u64) + payload_len
}

/// Bytes of a frame holding records of these lengths.
pub fn frame_bytes(payload_lens: impl IntoIterator<Item = usize>) -> usize {
    FRAME_HEAD_BYTES + payload_lens.into_iter().map(record_bytes).sum::<usize>()
}

/// Builds one frame in place: the head is reserved first and filled in by
/// [`FrameBuilder::finish`], once the records are known.
#[derive(Debug)]
pub struct FrameBuilder {
    bytes: Vec<u8>,
    base_offset: u64,
    count: u32,
    epoch: u32,
}

impl FrameBuilder {
    /// A frame whose first record will get `base_offset`, written in
    /// `epoch`; `capacity` is a hint for the body.
    pub fn new(base_offset: u64, capacity: usize, epoch: u32) -> FrameBuilder {
        let mut bytes = Vec::with_capacity(FRAME_HEAD_BYTES + capacity);
        bytes.resize(FRAME_HEAD_BYTES, 0);
        FrameBuilder {
            bytes,
            base_offset,
            count: 0,
            epoch,
        }
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn push(&mut self, payload: &[u8]) {
        self.push_with(payload.len(), |b| b.copy_from_slice(payload));
    }

    /// Adds a record of `len` bytes that `fill` writes in place.
    pub fn push_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) {
        varint::put(&mut self.bytes, len as u64);
        let start = self.bytes.len();
        self.bytes.resize(start + len, 0);
        fill(&mut self.bytes[start..]);
        self.count += 1;
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes of the finished frame.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Offset after the frame's last record.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }

    /// Fills in the head and returns the frame's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.count > 0, "a frame holds at least one record");
        let body = (self.bytes.len() - FRAME_HEAD_BYTES) as u32;
        self.bytes[0..4].copy_from_slice(&body.to_le_bytes());
        self.bytes[8..16].copy_from_slice(&self.base_offset.to_le_bytes());
        self.bytes[16..20].copy_from_slice(&self.count.to_le_bytes());
        self.bytes[20..24].copy_from_slice(&self.epoch.to_le_bytes());
        let crc = crc32fast::hash(&self.bytes[8..]);
        self.bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        self.bytes
    }
}

/// One decoded frame; its records were checked to fill the body exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub base_offset: u64,
    pub count: u32,
    pub epoch: u32,
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Bytes the frame takes, head included.
    pub fn bytes(&self) -> usize {
        FRAME_HEAD_BYTES + self.body.len()
    }

    /// Offset after the last record. Overflow is refused by `decode_frame`.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }

    /// The records with their offsets.
    pub fn records(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        let body = self.body;
        let base = self.base_offset;
        let mut pos = 0;
        (0..u64::from(self.count)).map(move |i| {
            let len = varint::get(body, &mut pos).expect("frame records were checked when decoded") as usize;
            let payload = &body[pos..pos + len];
            pos += len;
            (base + i, payload)
        })
    }
}

/// Decodes the frame at the start of `bytes`.
///
/// Returns `Ok(None)` at the end of the log (a zero head), `Ok(Some)` for a
/// frame whose checksum verifies, whose base offset is `expected_offset`
/// and whose records fill its body exactly. `body_bytes_max` bounds the
/// length field so garbage cannot ask for gigabytes; `record_bytes_max`
/// bounds each record.
pub fn decode_frame(
    bytes: &[u8],
    expected_offset: u64,
    body_bytes_max: u32,
    record_bytes_max: u32,
) -> Result<Option<Frame<'_>>, FrameError> {
    let head = bytes.get(..FRAME_HEAD_BYTES).ok_or(FrameError::Truncated {
        needed: FRAME_HEAD_BYTES,
    })?;
    if head.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let len = u32_at(head, 0);
    if len > body_bytes_max {
        return Err(FrameError::Corrupt("frame length above its limit"));
    }
    let total = FRAME_HEAD_BYTES + len as usize;
    let body = bytes
        .get(FRAME_HEAD_BYTES..total)
        .ok_or(FrameError::Truncated { needed: total })?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[8..24]);
    hasher.update(body);
    if hasher.finalize() != u32_at(head, 4) {
        return Err(FrameError::Corrupt("frame checksum mismatch"));
    }
    let base_offset = u64_at(head, 8);
    if base_offset != expected_offset {
        return Err(FrameError::Corrupt("frame offset out of sequence"));
    }
    let count = u32_at(head, 16);
    if count == 0 {
        return Err(FrameError::Corrupt("frame holds no record"));
    }
    let epoch = u32_at(head, 20);
    if base_offset.checked_add(u64::from(count)).is_none() {
        return Err(FrameError::Corrupt("frame offsets overflow u64"));
    }
    let mut pos = 0;
    for _ in 0..count {
        let record = varint::get(body, &mut pos).ok_or(FrameError::Corrupt("bad record length in frame"))?;
        if record > u64::from(record_bytes_max) || pos as u64 + record > body.len() as u64 {
            return Err(FrameError::Corrupt("record runs past its frame or limit"));
        }
        pos += record as usize;
    }
    if pos != body.len() {
        return Err(FrameError::Corrupt("frame body does not match its records"));
    }
    Ok(Some(Frame {
        base_offset,
        count,
        epoch,
        body,
    }))
}

/// The result of scanning a buffer of frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Offset after the last good frame's records.
    pub end_offset: u64,
    /// Byte position (within the scanned buffer) after the last good frame.
    pub end_position: usize,
    /// How the scan stopped.
    pub stop: ScanStop,
    /// `(base offset, position)` of good frames, about one per
    /// `index_interval_bytes` (always the first frame).
    pub index: Vec<(u64, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// Reached the zero fill or the end of the buffer.
    Clean,
    /// Stopped at bytes that are not a frame (torn or corrupt).
    Bad(FrameError),
}

/// Limits a scan checks frames against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub body_bytes_max: u32,
    pub record_bytes_max: u32,
}

/// Scans the frames of a whole segment body (the bytes after the header).
pub fn scan(body: &[u8], base_offset: u64, limits: Limits, index_interval_bytes: usize) -> Scan {
    let mut pos = 0;
    let mut offset = base_offset;
    let mut index = Vec::new();
    let mut next_index_pos = 0;
    let stop = loop {
        let rest = &body[pos..];
        // A segment filled to within a frame head of its size ends in fewer
        // than FRAME_HEAD_BYTES zero bytes: that is a clean end too.
        if rest.len() < FRAME_HEAD_BYTES && rest.iter().all(|&b| b == 0) {
            break ScanStop::Clean;
        }
        match decode_frame(rest, offset, limits.body_bytes_max, limits.record_bytes_max) {
            Ok(None) => break ScanStop::Clean,
            Ok(Some(frame)) => {
                if pos >= next_index_pos {
                    index.push((offset, pos));
                    next_index_pos = pos + index_interval_bytes;
                }
                pos += frame.bytes();
                offset = frame.end_offset();
            }
            Err(e) => break ScanStop::Bad(e),
        }
    };
    Scan {
        end_offset: offset,
        end_position: pos,
        stop,
        index,
    }
}

/// Looks for an intact frame starting anywhere in `body[from..]` whose
/// records come after `after_offset`, and returns its position and base
/// offset.
///
/// Recovery asks this after a scan stopped at a bad frame: only the last
/// group write can be torn (one write is in flight at a time, and nothing
/// is acknowledged before its write completes), and nothing intact is ever
/// written after it. An intact frame past a bad one therefore proves the
/// bad bytes are damage to acknowledged records, not a torn tail. Cheap
/// checks (length within the buffer, a plausible count and offset, zero
/// reserved bytes) come before the checksum, so zero fill and garbage are
/// passed over quickly.
pub fn find_intact_frame(body: &[u8], from: usize, after_offset: u64, limits: Limits) -> Option<(usize, u64)> {
    let last = body.len().checked_sub(FRAME_HEAD_BYTES)?;
    for pos in from..=last {
        let head = &body[pos..pos + FRAME_HEAD_BYTES];
        let len = u32_at(head, 0);
        if len == 0 || len > limits.body_bytes_max || u32_at(head, 20) != 0 {
            continue;
        }
        let count = u32_at(head, 16);
        if count == 0 || count > len {
            continue;
        }
        let base = u64_at(head, 8);
        // Every record takes at least one byte, so offsets cannot advance
        // faster than positions.
        if base < after_offset || base - after_offset > (pos - from + 1) as u64 {
            continue;
        }
        let end = pos + FRAME_HEAD_BYTES + len as usize;
        if end > body.len() {
            continue;
        }
        if let Ok(Some(_)) = decode_frame(&body[pos..end], base, limits.body_bytes_max, limits.record_bytes_max) {
            return Some((pos, base));
        }
    }
    None
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        body_bytes_max: 1 << 20,
        record_bytes_max: 1024,
    };

    /// One frame per slice of payloads.
    fn frames(base: u64, groups: &[&[&[u8]]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut offset = base;
        for group in groups {
            let mut f = FrameBuilder::new(offset, 64, 0);
            for p in *group {
                f.push(p);
            }
            offset = offset.wrapping_add(u64::from(f.count()));
            out.extend_from_slice(&f.finish());
        }
        out
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let mut h = encode_header(42);
        assert_eq!(decode_header(&h), Ok(42));
        h[17] ^= 1;
        assert_eq!(
            decode_header(&h),
            Err(FrameError::Corrupt("segment header checksum mismatch"))
        );
    }

    #[test]
    fn frames_hold_groups_of_records() {
        let body = frames(10, &[&[b"a", b"", b"ccc"], &[b"dd"]]);
        assert_eq!(body.len(), frame_bytes([1, 0, 3]) + frame_bytes([2]));
        let f = decode_frame(&body, 10, LIMITS.body_bytes_max, LIMITS.record_bytes_max)
            .unwrap()
            .unwrap();
        assert_eq!((f.base_offset, f.count), (10, 3));
        let recs: Vec<_> = f.records().collect();
        assert_eq!(recs, vec![(10, &b"a"[..]), (11, &b""[..]), (12, &b"ccc"[..])]);
    }

    #[test]
    fn scan_stops_cleanly_at_zero_fill() {
        let mut body = frames(10, &[&[b"a", b"bb"], &[b"ccc"]]);
        let good = body.len();
        body.extend_from_slice(&[0u8; 64]);
        let s = scan(&body, 10, LIMITS, 1);
        assert_eq!((s.end_offset, s.end_position, s.stop), (13, good, ScanStop::Clean));
        assert_eq!(s.index, vec![(10, 0), (12, frame_bytes([1, 2]))]);
        // A short zero remainder is a clean end as well.
        let s = scan(&body[..good + 5], 10, LIMITS, 1);
        assert_eq!((s.end_offset, s.stop), (13, ScanStop::Clean));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        // Guards against a checksum that misses the length, offset or count.
        let body = frames(0, &[&[b"hello", b"big"], &[b"world"]]);
        let first = frame_bytes([5, 3]);
        for bit in 0..body.len() * 8 {
            let mut damaged = body.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let s = scan(&damaged, 0, LIMITS, 1024);
            let expect_end = if bit / 8 < first { 0 } else { 2 };
            assert_eq!(s.end_offset, expect_end, "flipped bit {bit}");
            assert!(matches!(s.stop, ScanStop::Bad(_)), "flipped bit {bit} went unnoticed");
        }
    }

    #[test]
    fn torn_tail_is_reported_with_the_good_prefix() {
        let body = frames(0, &[&[b"hello"], &[b"world", b"!"]]);
        let first = frame_bytes([5]);
        for cut in 1..body.len() {
            let s = scan(&body[..cut], 0, LIMITS, 1024);
            let expected = if cut >= first { (1, first) } else { (0, 0) };
            assert_eq!((s.end_offset, s.end_position), expected, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_length_is_corrupt_not_an_allocation() {
        let mut body = vec![0xff, 0xff, 0xff, 0x7f];
        body.extend_from_slice(&[1u8; 20]);
        assert_eq!(
            decode_frame(&body, 0, 1024, 1024),
            Err(FrameError::Corrupt("frame length above its limit"))
        );
    }

    #[test]
    fn offsets_near_the_end_of_u64_are_refused_not_wrapped() {
        let body = frames(u64::MAX - 1, &[&[b"a", b"b"]]);
        assert_eq!(
            decode_frame(&body, u64::MAX - 1, 1024, 1024),
            Err(FrameError::Corrupt("frame offsets overflow u64"))
        );
        let body = frames(u64::MAX - 1, &[&[b"a"]]);
        assert!(decode_frame(&body, u64::MAX - 1, 1024, 1024).unwrap().is_some());
    }
}
