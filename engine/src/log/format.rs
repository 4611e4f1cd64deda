//! On-disk format of a log segment. Pure functions: no I/O, so the decoder
//! can be fuzzed and unit-tested byte by byte.
//!
//! ```text
//! segment file = header frame* zero-fill
//!
//! header (32 bytes)
//!   0..8   magic  "RAMALOG1"
//!   8..12  format version (u32 LE) = 1
//!  12..16  reserved, must be zero
//!  16..24  base offset (u64 LE): offset of the first record
//!  24..28  CRC32 of bytes 0..24 (u32 LE)
//!  28..32  reserved, must be zero
//!
//! frame (16-byte head + payload)
//!   0..4   payload length (u32 LE)
//!   4..8   CRC32 of bytes 0..4, 8..16 and the payload (u32 LE)
//!   8..16  offset (u64 LE): base offset + index of the record in the log
//!  16..    payload
//! ```
//!
//! Invariants:
//! - frames are contiguous from byte 32 and their offsets consecutive from
//!   the base offset;
//! - the byte after the last frame starts 16 zero bytes (segments are
//!   pre-written with zeros), which is how the end is recognised: a real
//!   frame head is never all zeros, because its CRC covers the length and
//!   offset and the CRC32 of those 12 bytes is never 0 for a zero length;
//! - anything else after the last good frame is a torn or corrupt tail.

pub const MAGIC: &[u8; 8] = b"RAMALOG1";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;
pub const FRAME_HEAD_BYTES: usize = 16;

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
        return Err(FrameError::Corrupt("unsupported segment format version"));
    }
    if u32_at(h, 24) != crc32fast::hash(&h[0..24]) {
        return Err(FrameError::Corrupt("segment header checksum mismatch"));
    }
    if u32_at(h, 12) != 0 || u32_at(h, 28) != 0 {
        return Err(FrameError::Corrupt("reserved segment header bytes are not zero"));
    }
    Ok(u64_at(h, 16))
}

/// Appends one frame for `payload` at `offset` to `out`.
pub fn encode_frame(offset: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("record size is checked against record_bytes_max");
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&offset.to_le_bytes());
    hasher.update(payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Size of the frame of a `payload_len`-byte record.
pub fn frame_bytes(payload_len: usize) -> usize {
    FRAME_HEAD_BYTES + payload_len
}

/// One decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub offset: u64,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    pub fn bytes(&self) -> usize {
        frame_bytes(self.payload.len())
    }
}

/// Decodes the frame at the start of `bytes`.
///
/// Returns `Ok(None)` at the end of the log (a zero head), `Ok(Some)` for a
/// frame whose checksum verifies and whose offset is `expected_offset`.
/// `payload_max` bounds the length field so garbage cannot ask for gigabytes.
pub fn decode_frame(bytes: &[u8], expected_offset: u64, payload_max: u32) -> Result<Option<Frame<'_>>, FrameError> {
    let head = bytes.get(..FRAME_HEAD_BYTES).ok_or(FrameError::Truncated {
        needed: FRAME_HEAD_BYTES,
    })?;
    if head.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    // An empty payload is a valid record: its head still holds a non-zero
    // CRC, so it is never mistaken for the zero fill.
    let len = u32_at(head, 0);
    if len > payload_max {
        return Err(FrameError::Corrupt("frame length above record_bytes_max"));
    }
    let total = FRAME_HEAD_BYTES + len as usize;
    let payload = bytes
        .get(FRAME_HEAD_BYTES..total)
        .ok_or(FrameError::Truncated { needed: total })?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[0..4]);
    hasher.update(&head[8..16]);
    hasher.update(payload);
    if hasher.finalize() != u32_at(head, 4) {
        return Err(FrameError::Corrupt("frame checksum mismatch"));
    }
    let offset = u64_at(head, 8);
    if offset != expected_offset {
        return Err(FrameError::Corrupt("frame offset out of sequence"));
    }
    Ok(Some(Frame { offset, payload }))
}

/// The result of scanning a buffer of frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Offset after the last good frame.
    pub end_offset: u64,
    /// Byte position (within the scanned buffer) after the last good frame.
    pub end_position: usize,
    /// How the scan stopped.
    pub stop: ScanStop,
    /// `(offset, position)` of good frames, one per `index_interval_bytes`.
    pub index: Vec<(u64, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// Reached the zero fill or the exact end of the buffer.
    Clean,
    /// Stopped at bytes that are not a frame (torn or corrupt).
    Bad(FrameError),
}

/// Scans the frames of a whole segment body (the bytes after the header).
pub fn scan(body: &[u8], base_offset: u64, payload_max: u32, index_interval_bytes: usize) -> Scan {
    let mut pos = 0;
    let mut offset = base_offset;
    let mut index = Vec::new();
    let mut next_index_pos = 0;
    let stop = loop {
        let rest = &body[pos..];
        // A segment filled to within a frame head of its size ends in fewer
        // than 16 zero bytes: that is a clean end too.
        if rest.len() < FRAME_HEAD_BYTES && rest.iter().all(|&b| b == 0) {
            break ScanStop::Clean;
        }
        match decode_frame(&body[pos..], offset, payload_max) {
            Ok(None) => break ScanStop::Clean,
            Ok(Some(frame)) => {
                if pos >= next_index_pos {
                    index.push((offset, pos));
                    next_index_pos = pos + index_interval_bytes;
                }
                pos += frame.bytes();
                match offset.checked_add(1) {
                    Some(next) => offset = next,
                    None => break ScanStop::Bad(FrameError::Corrupt("frame offset overflows u64")),
                }
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

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(base: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            encode_frame(base + i as u64, p, &mut out);
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
    fn scan_stops_cleanly_at_zero_fill() {
        let mut body = frames(10, &[b"a", b"bb", b"ccc"]);
        let good = body.len();
        body.extend_from_slice(&[0u8; 64]);
        let s = scan(&body, 10, 1024, 1);
        assert_eq!((s.end_offset, s.end_position, s.stop), (13, good, ScanStop::Clean));
        assert_eq!(s.index.len(), 3);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        // Guards against a checksum that misses the length or offset fields.
        let body = frames(0, &[b"hello", b"world"]);
        for bit in 0..body.len() * 8 {
            let mut damaged = body.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let s = scan(&damaged, 0, 1024, 1024);
            assert!(
                s.end_offset < 2 || s.stop != ScanStop::Clean,
                "flipped bit {bit} went unnoticed"
            );
            assert!(s.end_position <= body.len());
        }
    }

    #[test]
    fn torn_tail_is_reported_with_the_good_prefix() {
        let body = frames(0, &[b"hello", b"world"]);
        for cut in 0..body.len() {
            let s = scan(&body[..cut], 0, 1024, 1024);
            let first = frame_bytes(5);
            let expected = if cut >= first { (1, first) } else { (0, 0) };
            assert_eq!((s.end_offset, s.end_position), expected, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_length_is_corrupt_not_an_allocation() {
        let mut body = vec![0xff, 0xff, 0xff, 0x7f];
        body.extend_from_slice(&[1u8; 12]);
        assert_eq!(
            decode_frame(&body, 0, 1024),
            Err(FrameError::Corrupt("frame length above record_bytes_max"))
        );
    }
}
