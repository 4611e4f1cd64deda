//! Fuzzes the log segment decoder (`engine::log::format`): `decode_header`,
//! `decode_frame` and `scan` on arbitrary bytes, and on well-formed segments
//! damaged in ways a CRC32 always detects.
//!
//! Input layout: byte 0 picks the mode and parameter variants, bytes 1..24
//! are parameters, the rest is data. The whole u64 offset range is fuzzed,
//! and mode bit 6 puts the base offset within 1024 of `u64::MAX`, so the
//! frame at offset `u64::MAX` (after which `scan` stops with
//! `Corrupt("frame offset overflows u64")`) is reached often.
//! - raw mode: the data is fed as is, as a whole segment file and as a
//!   segment body, and every structural invariant of the results is checked;
//! - structured mode: the data is cut into records, encoded as a segment,
//!   optionally damaged (one flipped bit, one burst of up to 4 bytes, or a
//!   torn end), and the decoder must then return exactly the intact prefix
//!   of the records: never a changed record, never fewer than the frames the
//!   damage left untouched.
//!
//! Run: `fuzz/smoke.sh` (see there for the exact `cargo fuzz` command).
//! Regression inputs live in `fuzz/regressions/`; replay one with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run segment_decoder regressions/<file>`
//! (`scan_offset_overflow.bin`: a header-less body with base `u64::MAX` and
//! one valid frame, which used to overflow in `scan`).

#![no_main]

use engine::log::format::{
    decode_frame, decode_header, encode_frame, encode_header, scan, Frame, FrameError, Scan, ScanStop,
    FRAME_HEAD_BYTES, HEADER_BYTES,
};
use libfuzzer_sys::fuzz_target;

const PARAM_BYTES: usize = 24;

/// How `scan` stops after accepting the frame at offset `u64::MAX`: the
/// offset after it does not exist, so `end_offset` stays `u64::MAX` while
/// `end_position` is past that frame.
const OFFSET_OVERFLOW: FrameError = FrameError::Corrupt("frame offset overflows u64");

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// CRC32 (IEEE), bitwise: an oracle independent of the crc32fast crate
/// the engine uses.
fn crc32_of(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 1 + PARAM_BYTES {
        // Still exercise the entry points on short inputs.
        check_header(data);
        check_frame(data, 0, u32::MAX);
        check_scan(data, 0, 1 << 20, 1);
        return;
    }
    let mode = data[0];
    let params = &data[1..1 + PARAM_BYTES];
    let rest = &data[1 + PARAM_BYTES..];
    if mode & 1 == 0 {
        raw(mode, params, rest);
    } else {
        structured(mode, params, rest);
    }
});

fn pick_base(mode: u8, raw: u64) -> u64 {
    if mode & 0x40 != 0 {
        return u64::MAX - (raw & 0x3ff);
    }
    match (mode >> 1) & 3 {
        0 => 0,
        1 => raw & 0xff,
        2 => raw & 0xffff_ffff,
        _ => raw,
    }
}

fn pick_payload_max(mode: u8, raw: u32) -> u32 {
    if mode & 8 == 0 {
        raw % 4096
    } else {
        raw
    }
}

fn pick_interval(raw: u32) -> usize {
    (raw % (1 << 20)) as usize + 1
}

/// Arbitrary bytes: only structural invariants can be checked.
fn raw(mode: u8, params: &[u8], rest: &[u8]) {
    let base = pick_base(mode, u64_at(params, 0));
    let payload_max = pick_payload_max(mode, u32_at(params, 8));
    let interval = pick_interval(u32_at(params, 12));
    // As a whole segment file, the way `Log::open` reads one.
    if let Some(b) = check_header(rest) {
        check_scan(&rest[HEADER_BYTES..], b, payload_max, interval);
    }
    // As a segment body, with a given base offset.
    check_scan(rest, base, payload_max, interval);
    // Single frames at a few starting points.
    check_frame(rest, base, payload_max);
    let step = (u32_at(params, 16) as usize % 64) + 1;
    for start in (0..rest.len()).step_by(step).take(64) {
        check_frame(&rest[start..], base.wrapping_add(start as u64 % 7), payload_max);
    }
}

/// Independent model of a valid header: the magic, version 1, zero reserved
/// bytes 12..16 and 28..32, and the CRC32 of bytes 0..24 at 24..28.
fn header_is_valid(h: &[u8]) -> bool {
    h.len() >= HEADER_BYTES
        && &h[0..8] == b"RAMALOG1"
        && u32_at(h, 8) == 1
        && u32_at(h, 12) == 0
        && u32_at(h, 28) == 0
        && u32_at(h, 24) == crc32_of(&h[..24])
}

/// `decode_header`: it accepts exactly the headers `encode_header` writes
/// (all 32 bytes, reserved ones included), and refuses everything else.
fn check_header(bytes: &[u8]) -> Option<u64> {
    let valid = header_is_valid(bytes);
    match decode_header(bytes) {
        Ok(base) => {
            assert!(
                bytes.len() >= HEADER_BYTES,
                "decode_header accepted {} bytes",
                bytes.len()
            );
            assert!(valid, "decode_header accepted an invalid header: {:02x?}", &bytes[..HEADER_BYTES]);
            let again = encode_header(base);
            assert_eq!(&again[..], &bytes[..HEADER_BYTES], "accepted header re-encodes identically (base {base})");
            Some(base)
        }
        Err(FrameError::Truncated { needed }) => {
            assert!(
                bytes.len() < HEADER_BYTES,
                "Truncated although {} header bytes are there",
                bytes.len()
            );
            assert_eq!(needed, HEADER_BYTES, "a header needs HEADER_BYTES");
            None
        }
        Err(FrameError::Corrupt(why)) => {
            assert!(bytes.len() >= HEADER_BYTES, "Corrupt reported for a short header");
            assert!(!valid, "a valid header was refused ({why}): {:02x?}", &bytes[..HEADER_BYTES]);
            None
        }
    }
}

/// `decode_frame`: every outcome is consistent with the bytes given.
fn check_frame(bytes: &[u8], expected: u64, payload_max: u32) -> Option<Frame<'_>> {
    match decode_frame(bytes, expected, payload_max) {
        Ok(None) => {
            assert!(
                bytes.len() >= FRAME_HEAD_BYTES && bytes[..FRAME_HEAD_BYTES].iter().all(|&b| b == 0),
                "end of log reported without a zero frame head"
            );
            None
        }
        Ok(Some(frame)) => {
            assert!(
                frame.bytes() <= bytes.len(),
                "frame of {} bytes from {} input bytes",
                frame.bytes(),
                bytes.len()
            );
            assert_eq!(frame.bytes(), FRAME_HEAD_BYTES + frame.payload.len(), "frame size");
            assert!(
                frame.payload.len() as u64 <= u64::from(payload_max),
                "payload above payload_max"
            );
            assert_eq!(frame.offset, expected, "frame offset differs from the expected one");
            assert_eq!(
                frame.payload,
                &bytes[FRAME_HEAD_BYTES..frame.bytes()],
                "payload is the input's bytes"
            );
            assert!(
                bytes[..FRAME_HEAD_BYTES].iter().any(|&b| b != 0),
                "a zero frame head was decoded as a frame"
            );
            // The frame re-encodes to exactly the input's bytes.
            let mut again = Vec::new();
            encode_frame(frame.offset, frame.payload, &mut again);
            assert_eq!(
                again.as_slice(),
                &bytes[..frame.bytes()],
                "an accepted frame re-encodes identically"
            );
            Some(frame)
        }
        Err(FrameError::Truncated { needed }) => {
            assert!(
                needed > bytes.len(),
                "Truncated (needs {needed}) although {} bytes are there",
                bytes.len()
            );
            assert!(needed >= FRAME_HEAD_BYTES, "a frame needs at least its head");
            if bytes.len() >= FRAME_HEAD_BYTES {
                assert!(
                    u32_at(bytes, 0) <= payload_max,
                    "Truncated instead of Corrupt for a length above payload_max"
                );
            }
            None
        }
        Err(FrameError::Corrupt(_)) => {
            assert!(
                bytes.len() >= FRAME_HEAD_BYTES,
                "Corrupt reported for a short frame head"
            );
            None
        }
    }
}

/// Number of frames `scan` accepted: `end_offset - base`, plus the frame at
/// `u64::MAX` when it stopped on the offset overflow.
fn accepted(s: &Scan, base: u64) -> u64 {
    s.end_offset - base + u64::from(s.stop == ScanStop::Bad(OFFSET_OVERFLOW))
}

/// A remainder `scan` must treat as the clean end: shorter than a frame
/// head and all zeros (the empty remainder included).
fn short_zero_tail(rest: &[u8]) -> bool {
    rest.len() < FRAME_HEAD_BYTES && rest.iter().all(|&b| b == 0)
}

/// `scan`: the result agrees with walking the frames one by one.
fn check_scan(body: &[u8], base: u64, payload_max: u32, interval: usize) -> Scan {
    let s = scan(body, base, payload_max, interval);
    assert!(
        s.end_position <= body.len(),
        "end_position {} past the body ({})",
        s.end_position,
        body.len()
    );
    assert!(s.end_offset >= base, "end_offset below the base offset");
    let overflowed = s.stop == ScanStop::Bad(OFFSET_OVERFLOW);
    if overflowed {
        assert_eq!(
            s.end_offset,
            u64::MAX,
            "offset overflow reported before the frame at u64::MAX"
        );
    }
    let n = accepted(&s, base);
    // Walk the frames the same way and compare.
    let mut pos = 0usize;
    let mut positions = Vec::new();
    for k in 0..n {
        let offset = base + k;
        let frame = check_frame(&body[pos..], offset, payload_max)
            .unwrap_or_else(|| panic!("scan accepted offset {offset} at {pos}, but decode_frame does not"));
        positions.push((offset, pos));
        pos += frame.bytes();
    }
    assert_eq!(
        pos, s.end_position,
        "end_position is the end of the last accepted frame"
    );
    if overflowed {
        assert!(n >= 1 && base + (n - 1) == u64::MAX, "overflow stop without a frame at u64::MAX");
    } else {
        let rest = &body[pos..];
        match s.stop {
            ScanStop::Clean => assert!(
                short_zero_tail(rest) || matches!(decode_frame(rest, s.end_offset, payload_max), Ok(None)),
                "a clean stop is at a zero frame head or a short all-zero remainder"
            ),
            ScanStop::Bad(e) => {
                assert!(
                    !short_zero_tail(rest),
                    "Bad({e:?}) at a short all-zero remainder of {} bytes, which is a clean end",
                    rest.len()
                );
                assert_eq!(
                    decode_frame(rest, s.end_offset, payload_max).err(),
                    Some(e),
                    "the reported stop is what decode_frame says at end_position"
                );
            }
        }
    }
    // The index: positions strictly increasing, inside the accepted frames,
    // on frame boundaries, at least `interval` apart, starting at the first.
    if let Some(&first) = s.index.first() {
        assert_eq!(first, (base, 0), "the first frame is indexed");
    } else {
        assert_eq!(n, 0, "frames accepted but none indexed");
    }
    for w in s.index.windows(2) {
        assert!(w[0].1 < w[1].1, "index positions must increase: {:?}", w);
        assert!(w[0].0 < w[1].0, "index offsets must increase: {:?}", w);
        assert!(
            w[1].1 - w[0].1 >= interval,
            "index entries closer than the interval: {:?}",
            w
        );
    }
    for &(o, p) in &s.index {
        assert!(
            p < s.end_position,
            "index position {p} not below end_position {}",
            s.end_position
        );
        assert!(
            positions.binary_search(&(o, p)).is_ok(),
            "index entry ({o}, {p}) is not a frame boundary"
        );
    }
    s
}

/// A well-formed segment built from the data, then damaged in one way a
/// CRC32 always detects (or not at all).
fn structured(mode: u8, params: &[u8], rest: &[u8]) {
    // Records: a length byte (scaled by a parameter), then that many bytes.
    let scale = usize::from(params[20] % 8) + 1;
    let mut records: Vec<&[u8]> = Vec::new();
    let mut i = 0;
    while i < rest.len() && records.len() < 512 {
        let len = (usize::from(rest[i]) * scale).min(rest.len() - i - 1);
        records.push(&rest[i + 1..i + 1 + len]);
        i += 1 + len;
    }
    let n = records.len() as u64;
    // The last record may sit at offset u64::MAX itself.
    let base = pick_base(mode, u64_at(params, 0)).min(u64::MAX - n.saturating_sub(1));
    let last_at_max = n > 0 && base + (n - 1) == u64::MAX;
    let longest = records.iter().map(|r| r.len()).max().unwrap_or(0) as u32;
    let payload_max = longest.saturating_add(u32_at(params, 8) % 64);
    let interval = pick_interval(u32_at(params, 12));

    let mut file = encode_header(base).to_vec();
    let mut frames = Vec::new(); // (file position, frame bytes)
    for (k, r) in records.iter().enumerate() {
        let at = file.len();
        encode_frame(base + k as u64, r, &mut file);
        frames.push((at, file.len() - at));
    }
    let data_end = file.len();
    file.resize(data_end + usize::from(params[21] % 64), 0);
    let pristine = file.clone();

    // The pristine segment decodes to exactly its records.
    assert_eq!(decode_header(&file), Ok(base), "pristine header");
    let s = check_scan(&file[HEADER_BYTES..], base, payload_max, interval);
    assert_eq!(accepted(&s, base), n, "pristine segment: every record is found");
    assert_eq!(
        s.end_offset,
        if last_at_max { u64::MAX } else { base + n },
        "pristine segment: end offset"
    );
    assert_eq!(
        s.end_position + HEADER_BYTES,
        data_end,
        "pristine segment: end position"
    );
    // Any zero fill, even one shorter than a frame head, is a clean end.
    assert_eq!(
        s.stop,
        if last_at_max {
            ScanStop::Bad(OFFSET_OVERFLOW)
        } else {
            ScanStop::Clean
        },
        "pristine segment: how the scan stops (zero fill of {} bytes)",
        file.len() - data_end
    );

    // One damage.
    let pos = u32_at(params, 16) as usize % file.len();
    let burst = [params[22], params[23], params[20] | 1, params[21]];
    match (mode >> 4) & 3 {
        0 => return,
        1 => file[pos] ^= 1 << (params[22] % 8),
        2 => {
            // 1 to 4 bytes, the first of them certainly changed.
            let len = usize::from(params[23] % 4) + 1;
            for (j, x) in burst.iter().take(len).enumerate() {
                if let Some(b) = file.get_mut(pos + j) {
                    *b ^= if j == 0 { x | 1 } else { *x };
                }
            }
        }
        _ => file.truncate(pos),
    }

    // The header: damage anywhere in its 32 bytes (the reserved ones
    // included) is always refused.
    let header_damaged = file.len() < HEADER_BYTES || file[..HEADER_BYTES] != pristine[..HEADER_BYTES];
    match decode_header(&file) {
        Ok(b) => {
            assert!(!header_damaged, "a damaged header was accepted (base {b})");
            assert_eq!(b, base, "header base offset");
        }
        Err(_) => assert!(header_damaged, "an intact header was refused"),
    }
    if file.len() < HEADER_BYTES {
        return;
    }
    // The body: exactly the frames before the first damaged one are served,
    // and they are the original records.
    let intact = frames
        .iter()
        .position(|&(p, l)| file.get(p..p + l) != Some(&pristine[p..p + l]))
        .unwrap_or(frames.len());
    let s = check_scan(&file[HEADER_BYTES..], base, payload_max, interval);
    assert_eq!(
        accepted(&s, base),
        intact as u64,
        "damage at byte {pos}: the scan must stop exactly at the first damaged frame"
    );
    let mut at = HEADER_BYTES;
    for (k, r) in records.iter().take(intact).enumerate() {
        let f = decode_frame(&file[at..], base + k as u64, payload_max)
            .expect("accepted above")
            .expect("a frame");
        assert_eq!(f.payload, *r, "record {k} served with different content");
        at += f.bytes();
    }
}
