//! Fuzzes the log segment decoder (`engine::log::format`, format version 3:
//! one frame per group of records): `decode_header`, `decode_frame` and
//! `scan` on arbitrary bytes, and on well-formed segments damaged in ways a
//! CRC32 always detects.
//!
//! Input layout: byte 0 picks the mode and parameter variants, bytes 1..33
//! are parameters, the rest is data.
//!
//! ```text
//! mode bit 0     raw (0) or structured (1)
//! mode bits 1-2  base offset: 0, 8 bits, 32 bits or 64 bits of params[0..8]
//! mode bit 6     base offset within 1024 of u64::MAX instead (overflow edge)
//! mode bit 3     limits: small (below 4096 / 64 of slack) or the full u32 range
//! mode bits 4-5  structured: damage (none, bit flip, burst of 1..4 bytes,
//!                torn end); raw: bit 4 re-seals the frames (fixes their
//!                CRCs, and with bit 5 their base offsets) so the checks
//!                behind the checksum are reached
//! mode bit 7     index interval over the whole usize range
//! params[0..8]   base offset     params[8..12]  body_bytes_max
//! params[12..16] record_bytes_max params[16..24] index interval
//! params[24..28] damage position / frame start step
//! params[28..32] record length scale, zero fill, burst bytes, group size
//! ```
//!
//! - raw mode: the data is fed as is, as a whole segment file and as a
//!   segment body, and every result is compared with an independent model
//!   of the format (its own frame walker, LEB128 reader and bitwise CRC32);
//! - structured mode: the data is cut into records and groups, encoded with
//!   `FrameBuilder` as a segment (the frame whose offsets would pass
//!   `u64::MAX`, if any, is the last one), optionally damaged once, and the
//!   scan must then return exactly the untouched frames before the damage,
//!   with their original records.
//!
//! Run: `fuzz/smoke.sh` (see there for the exact `cargo fuzz` command).
//! Regression inputs live in `fuzz/regressions/`; replay one with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run segment_decoder regressions/<file>`:
//! - `scan_offset_overflow.bin`: a format-1 input (a frame at `u64::MAX`
//!   that used to overflow in `scan`); now just arbitrary bytes;
//! - `scan_offset_overflow_v2.bin`: raw body at base `u64::MAX - 2`: a frame
//!   of 2 records ending exactly at `u64::MAX` (accepted), then a frame of 1
//!   record at `u64::MAX` (refused: `frame offsets overflow u64`).

#![no_main]

use engine::log::format::{
    decode_frame, decode_header, encode_header, frame_bytes, record_bytes, scan, Frame, FrameBuilder, FrameError,
    Limits, Scan, ScanStop, FRAME_HEAD_BYTES, HEADER_BYTES,
};
use libfuzzer_sys::fuzz_target;

const PARAM_BYTES: usize = 32;

const OFFSET_OVERFLOW: FrameError = FrameError::Corrupt("frame offsets overflow u64");

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// CRC32 (IEEE, reflected polynomial 0xEDB88320), from a table computed
/// bit by bit: an oracle independent of the crc32fast crate the engine uses.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn crc32_of(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for part in parts {
        for &b in *part {
            crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

// ---------------------------------------------------------------------------
// Independent model of the format.

/// Why the model refuses a frame; every condition that fails is collected,
/// and the engine's `Corrupt` reason must name one of them (the order in
/// which the engine checks them is not part of the format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    LengthAboveLimit,
    Checksum,
    OutOfSequence,
    NoRecord,
    Reserved,
    OffsetOverflow,
    /// A record length that is not a LEB128 u64 within the body.
    BadRecordLength,
    /// A record longer than `record_bytes_max` or running past the body.
    RecordPastEnd,
    /// The records do not fill the body exactly.
    BodyMismatch,
}

/// The engine's reason strings, mapped to the model's conditions.
fn why_of(reason: &str) -> Why {
    match reason {
        "frame length above its limit" => Why::LengthAboveLimit,
        "frame checksum mismatch" => Why::Checksum,
        "frame offset out of sequence" => Why::OutOfSequence,
        "frame holds no record" => Why::NoRecord,
        "reserved frame head bytes are not zero" => Why::Reserved,
        "frame offsets overflow u64" => Why::OffsetOverflow,
        "bad record length in frame" => Why::BadRecordLength,
        "record runs past its frame or limit" => Why::RecordPastEnd,
        "frame body does not match its records" => Why::BodyMismatch,
        other => panic!("decode_frame gave an unknown reason {other:?}"),
    }
}

#[derive(Debug)]
enum Model {
    End,
    Frame {
        base: u64,
        count: u32,
        body_len: usize,
        /// (start within the body, length) of each payload.
        records: Vec<(usize, usize)>,
        /// Every record length is in its shortest encoding.
        canonical: bool,
    },
    Truncated(usize),
    Corrupt(Vec<Why>),
}

/// LEB128 reader, written from the format's definition: at most 10 bytes,
/// value within u64. Returns (value, bytes used).
fn model_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v: u128 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u128::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u64::try_from(v).ok().map(|v| (v, i + 1));
        }
    }
    None
}

fn shortest_varint(v: u64) -> usize {
    (1..=10).find(|&n| n == 10 || v < 1u64 << (7 * n)).expect("some length")
}

fn model_frame(bytes: &[u8], expected: u64, limits: Limits) -> Model {
    if bytes.len() < 24 {
        return Model::Truncated(24);
    }
    let head = &bytes[..24];
    if head.iter().all(|&b| b == 0) {
        return Model::End;
    }
    let body_len = u32_at(head, 0);
    if body_len > limits.body_bytes_max {
        return Model::Corrupt(vec![Why::LengthAboveLimit]);
    }
    let total = 24 + body_len as usize;
    if bytes.len() < total {
        return Model::Truncated(total);
    }
    let body = &bytes[24..total];
    let base = u64_at(head, 8);
    let count = u32_at(head, 16);
    let mut why = Vec::new();
    if crc32_of(&[&head[8..24], body]) != u32_at(head, 4) {
        why.push(Why::Checksum);
    }
    if base != expected {
        why.push(Why::OutOfSequence);
    }
    if count == 0 {
        why.push(Why::NoRecord);
    }
    if u32_at(head, 20) != 0 {
        why.push(Why::Reserved);
    }
    if u128::from(base) + u128::from(count) > u128::from(u64::MAX) {
        why.push(Why::OffsetOverflow);
    }
    let mut records = Vec::new();
    let mut canonical = true;
    let mut pos = 0usize;
    let mut records_ok = true;
    for _ in 0..count {
        let Some((len, used)) = model_varint(&body[pos..]) else {
            why.push(Why::BadRecordLength);
            records_ok = false;
            break;
        };
        canonical &= used == shortest_varint(len);
        pos += used;
        if len > u64::from(limits.record_bytes_max) || len > (body.len() - pos) as u64 {
            why.push(Why::RecordPastEnd);
            records_ok = false;
            break;
        }
        records.push((pos, len as usize));
        pos += len as usize;
    }
    if records_ok && pos != body.len() {
        why.push(Why::BodyMismatch);
    }
    if why.is_empty() {
        Model::Frame {
            base,
            count,
            body_len: body.len(),
            records,
            canonical,
        }
    } else {
        Model::Corrupt(why)
    }
}

#[derive(Debug)]
enum ModelStop {
    Clean,
    Truncated(usize),
    Corrupt(Vec<Why>),
}

struct ModelScan {
    /// (base offset, position, count) of each accepted frame.
    frames: Vec<(u64, usize, u32)>,
    end_offset: u64,
    end_position: usize,
    stop: ModelStop,
}

/// The frame walker: frames one after another from the base offset, until
/// the zero fill (a zero head, or fewer than 24 zero bytes) or a bad frame.
fn model_scan(body: &[u8], base: u64, limits: Limits) -> ModelScan {
    let mut frames = Vec::new();
    let mut pos = 0;
    let mut offset = base;
    let stop = loop {
        let rest = &body[pos..];
        if rest.len() < 24 && rest.iter().all(|&b| b == 0) {
            break ModelStop::Clean;
        }
        match model_frame(rest, offset, limits) {
            Model::End => break ModelStop::Clean,
            Model::Frame { count, body_len, .. } => {
                frames.push((offset, pos, count));
                pos += 24 + body_len;
                offset += u64::from(count);
            }
            Model::Truncated(n) => break ModelStop::Truncated(n),
            Model::Corrupt(why) => break ModelStop::Corrupt(why),
        }
    };
    ModelScan {
        frames,
        end_offset: offset,
        end_position: pos,
        stop,
    }
}

fn model_header(h: &[u8]) -> Option<u64> {
    let ok = h.len() >= 32
        && &h[0..8] == b"RAMALOG1"
        && u32_at(h, 8) == 2
        && u32_at(h, 12) == 0
        && u32_at(h, 28) == 0
        && u32_at(h, 24) == crc32_of(&[&h[..24]]);
    ok.then(|| u64_at(h, 16))
}

// ---------------------------------------------------------------------------
// Checks of the engine against the model.

fuzz_target!(|data: &[u8]| {
    if data.len() < 1 + PARAM_BYTES {
        // Still exercise the entry points on short inputs.
        let limits = Limits {
            body_bytes_max: u32::MAX,
            record_bytes_max: u32::MAX,
        };
        check_header(data);
        check_frame(data, 0, limits);
        check_scan(data, 0, limits, 1);
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

fn pick_interval(mode: u8, raw: u64) -> usize {
    if mode & 0x80 != 0 {
        raw as usize
    } else {
        (raw % 4096) as usize
    }
}

/// Arbitrary bytes: the engine must agree with the model.
fn raw(mode: u8, params: &[u8], rest: &[u8]) {
    let base = pick_base(mode, u64_at(params, 0));
    let (body_max, record_max) = (u32_at(params, 8), u32_at(params, 12));
    let limits = if mode & 8 == 0 {
        Limits {
            body_bytes_max: body_max % 4096,
            record_bytes_max: record_max % 4096,
        }
    } else {
        Limits {
            body_bytes_max: body_max,
            record_bytes_max: record_max,
        }
    };
    let interval = pick_interval(mode, u64_at(params, 16));
    let mut owned;
    let mut rest = rest;
    if mode & 0x10 != 0 {
        owned = rest.to_vec();
        reseal(&mut owned, base, mode & 0x20 != 0);
        rest = &owned;
    }
    // As a whole segment file, the way `Log::open` reads one.
    if let Some(b) = check_header(rest) {
        check_scan(&rest[HEADER_BYTES..], b, limits, interval);
    }
    // As a segment body, with a given base offset.
    check_scan(rest, base, limits, interval);
    // Single frames at a few starting points, expecting either a base near
    // the given one or the base offset the frame claims.
    let step = (u32_at(params, 24) as usize % 64) + 1;
    for (k, start) in (0..rest.len()).step_by(step).take(64).enumerate() {
        let bytes = &rest[start..];
        let expected = if k % 2 == 1 && bytes.len() >= 16 {
            u64_at(bytes, 8)
        } else {
            base.wrapping_add(start as u64 % 7)
        };
        check_frame(bytes, expected, limits);
    }
}

/// Walks the bytes as frames by their length fields and writes the CRC32
/// each one needs (and, with `offsets`, the base offset that follows from
/// the previous frame's count), so that random bodies reach the checks
/// behind the checksum.
fn reseal(bytes: &mut [u8], base: u64, offsets: bool) {
    let mut pos = 0;
    let mut offset = base;
    while bytes.len() - pos >= 24 {
        let total = 24 + u32_at(bytes, pos) as usize;
        if bytes.len() - pos < total {
            break;
        }
        let f = &mut bytes[pos..pos + total];
        if offsets {
            f[8..16].copy_from_slice(&offset.to_le_bytes());
        }
        let crc = crc32_of(&[&f[8..]]);
        f[4..8].copy_from_slice(&crc.to_le_bytes());
        offset = offset.wrapping_add(u64::from(u32_at(f, 16)));
        pos += total;
    }
}

/// `decode_header`: it accepts exactly the headers `encode_header` writes
/// (all 32 bytes, reserved ones included), and refuses everything else.
fn check_header(bytes: &[u8]) -> Option<u64> {
    let model = model_header(bytes);
    match decode_header(bytes) {
        Ok(base) => {
            assert_eq!(model, Some(base), "decode_header accepted {:02x?}", &bytes[..HEADER_BYTES]);
            let again = encode_header(base);
            assert_eq!(&again[..], &bytes[..HEADER_BYTES], "accepted header re-encodes identically");
            Some(base)
        }
        Err(FrameError::Truncated { needed }) => {
            assert!(bytes.len() < HEADER_BYTES, "Truncated although {} header bytes are there", bytes.len());
            assert_eq!(needed, HEADER_BYTES, "a header needs HEADER_BYTES");
            None
        }
        Err(FrameError::Corrupt(why)) => {
            assert!(bytes.len() >= HEADER_BYTES, "Corrupt reported for a short header");
            assert_eq!(model, None, "a valid header was refused ({why}): {:02x?}", &bytes[..HEADER_BYTES]);
            None
        }
    }
}

/// `decode_frame` agrees with the model; an accepted frame's records are the
/// model's, and they re-encode to the same bytes when their lengths were in
/// the shortest encoding.
fn check_frame(bytes: &[u8], expected: u64, limits: Limits) -> Option<Frame<'_>> {
    let model = model_frame(bytes, expected, limits);
    let got = decode_frame(bytes, expected, limits.body_bytes_max, limits.record_bytes_max);
    match (got, &model) {
        (Ok(None), Model::End) => None,
        (
            Ok(Some(frame)),
            Model::Frame {
                base,
                count,
                body_len,
                records,
                canonical,
            },
        ) => {
            assert_eq!((frame.base_offset, frame.count), (*base, *count), "frame base offset and count");
            assert_eq!(frame.base_offset, expected, "an accepted frame is at the expected offset");
            assert_eq!(frame.body, &bytes[24..24 + body_len], "frame body");
            assert_eq!(frame.bytes(), 24 + body_len, "frame size");
            assert_eq!(frame.end_offset(), base + u64::from(*count), "frame end offset");
            let got: Vec<(u64, &[u8])> = frame.records().collect();
            let want: Vec<(u64, &[u8])> = records
                .iter()
                .enumerate()
                .map(|(i, &(s, l))| (base + i as u64, &frame.body[s..s + l]))
                .collect();
            assert_eq!(got, want, "records of an accepted frame");
            for &(_, p) in &got {
                assert!(p.len() as u64 <= u64::from(limits.record_bytes_max), "record above its limit");
            }
            let mut again = FrameBuilder::new(frame.base_offset, 0);
            for &(_, p) in &got {
                again.push(p);
            }
            assert_eq!(again.count(), frame.count, "rebuilt frame count");
            assert_eq!(again.end_offset(), frame.end_offset(), "rebuilt frame end offset");
            assert_eq!(again.len(), frame_bytes(got.iter().map(|r| r.1.len())), "frame_bytes");
            let again = again.finish();
            assert_eq!(
                again.as_slice() == &bytes[..frame.bytes()],
                *canonical,
                "an accepted frame re-encodes identically exactly when its record lengths are shortest"
            );
            Some(frame)
        }
        (Err(FrameError::Truncated { needed }), Model::Truncated(n)) => {
            assert_eq!(needed, *n, "bytes a truncated frame needs");
            assert!(needed > bytes.len(), "Truncated although the bytes are there");
            None
        }
        (Err(FrameError::Corrupt(reason)), Model::Corrupt(why)) => {
            assert!(
                why.contains(&why_of(reason)),
                "decode_frame says {reason:?}, but the frame fails only {why:?}: head {:02x?}",
                &bytes[..24]
            );
            None
        }
        (got, model) => panic!(
            "decode_frame (expected offset {expected}, {limits:?}) gave {got:?}, the model {model:?}; first bytes {:02x?}",
            &bytes[..bytes.len().min(48)]
        ),
    }
}

/// `scan` agrees with the model's frame walker, and its index is sparse
/// and complete: entries on frame boundaries, at least `interval` bytes
/// apart, the first frame always, and no frame `interval` bytes or more
/// past the entry before it.
fn check_scan(body: &[u8], base: u64, limits: Limits, interval: usize) -> Scan {
    let s = scan(body, base, limits, interval);
    let m = model_scan(body, base, limits);
    assert_eq!(
        (s.end_offset, s.end_position),
        (m.end_offset, m.end_position),
        "scan end (base {base}, {limits:?}, {} frames in the model)",
        m.frames.len()
    );
    match (s.stop, &m.stop) {
        (ScanStop::Clean, ModelStop::Clean) => {}
        (ScanStop::Bad(FrameError::Truncated { needed }), ModelStop::Truncated(n)) => {
            assert_eq!(needed, *n, "scan stop: bytes needed")
        }
        (ScanStop::Bad(FrameError::Corrupt(reason)), ModelStop::Corrupt(why)) => assert!(
            why.contains(&why_of(reason)),
            "scan stops with {reason:?} but the frame fails only {why:?}"
        ),
        (stop, model) => panic!("scan stop {stop:?}, the model's {model:?}"),
    }
    // Every accepted frame decodes alone the same way.
    for &(offset, pos, count) in &m.frames {
        let f = check_frame(&body[pos..], offset, limits).expect("the model accepted it");
        assert_eq!(f.count, count);
    }
    // The index.
    match s.index.first() {
        Some(&first) => assert_eq!(first, (base, 0), "the first frame is indexed"),
        None => assert!(m.frames.is_empty(), "frames accepted but none indexed"),
    }
    for w in s.index.windows(2) {
        assert!(w[1].1 - w[0].1 >= interval.max(1), "index entries too close: {w:?} (interval {interval})");
    }
    let mut entries = s.index.iter().peekable();
    let mut last: Option<usize> = None;
    for &(offset, pos, _) in &m.frames {
        if entries.peek().is_some_and(|&&(_, p)| p == pos) {
            let &(o, _) = entries.next().expect("peeked");
            assert_eq!(o, offset, "index entry at position {pos} has the wrong offset");
            last = Some(pos);
        } else {
            let l = last.expect("the first frame is indexed");
            assert!(
                pos - l < interval,
                "frame at {pos} is {} bytes past index entry {l}, interval {interval}",
                pos - l
            );
        }
    }
    assert_eq!(entries.next(), None, "index entry not at an accepted frame (index {:?})", s.index);
    s
}

// ---------------------------------------------------------------------------
// Structured mode.

/// Records and groups cut from the data: a length byte (low 7 bits, times a
/// scale; bit 7 ends the group), then that many bytes.
fn groups_of<'a>(params: &[u8], rest: &'a [u8]) -> Vec<Vec<&'a [u8]>> {
    let scale = 1usize << (params[28] % 7); // 1..64: lengths up to 8128
    let group_max = usize::from(params[31] % 32) + 1;
    let mut groups: Vec<Vec<&[u8]>> = Vec::new();
    let mut group = Vec::new();
    let mut i = 0;
    let mut records = 0;
    while i < rest.len() && records < 1024 {
        let b = rest[i];
        let len = (usize::from(b & 0x7f) * scale).min(rest.len() - i - 1);
        group.push(&rest[i + 1..i + 1 + len]);
        records += 1;
        i += 1 + len;
        if b & 0x80 != 0 || group.len() == group_max {
            groups.push(std::mem::take(&mut group));
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

/// A well-formed segment built from the data, then damaged in one way a
/// CRC32 always detects (or not at all).
fn structured(mode: u8, params: &[u8], rest: &[u8]) {
    let groups = groups_of(params, rest);
    let base = pick_base(mode, u64_at(params, 0));
    let interval = pick_interval(mode, u64_at(params, 16));

    // The segment: one frame per group. A group whose offsets would pass
    // u64::MAX is written (as a writer that does not check would) and is
    // the last frame: it must be refused.
    let mut file = encode_header(base).to_vec();
    let mut frames = Vec::new(); // (file position, bytes, base offset, records)
    let mut offset = Some(base);
    let mut overflow_frame = None;
    for g in &groups {
        let Some(o) = offset else { break };
        let lens = g.iter().map(|r| r.len());
        let mut f = FrameBuilder::new(o, lens.clone().map(record_bytes).sum());
        for r in g {
            f.push(r);
        }
        assert_eq!(f.count() as usize, g.len(), "FrameBuilder::count");
        assert_eq!(f.len(), frame_bytes(lens), "FrameBuilder::len is frame_bytes");
        assert!(!f.is_empty());
        offset = o.checked_add(g.len() as u64);
        if let Some(end) = offset {
            assert_eq!(f.end_offset(), end, "FrameBuilder::end_offset");
        } else {
            overflow_frame = Some(frames.len());
        }
        let bytes = f.finish();
        frames.push((file.len(), bytes.len(), o, g));
        file.extend_from_slice(&bytes);
    }
    let good = overflow_frame.unwrap_or(frames.len());
    let data_end = file.len();
    file.resize(data_end + usize::from(params[29] % 64), 0);
    let pristine = file.clone();

    let longest_body = frames.iter().map(|f| f.1 - FRAME_HEAD_BYTES).max().unwrap_or(0) as u32;
    let longest_record = groups.iter().flatten().map(|r| r.len()).max().unwrap_or(0) as u32;
    let limits = if mode & 8 == 0 {
        Limits {
            body_bytes_max: longest_body + u32_at(params, 8) % 64,
            record_bytes_max: longest_record + u32_at(params, 12) % 64,
        }
    } else {
        Limits {
            body_bytes_max: longest_body.max(u32_at(params, 8)),
            record_bytes_max: longest_record.max(u32_at(params, 12)),
        }
    };

    // The pristine segment decodes to exactly its records.
    assert_eq!(decode_header(&file), Ok(base), "pristine header");
    let s = check_scan(&file[HEADER_BYTES..], base, limits, interval);
    let end_of_good = frames.get(good).map_or(data_end, |f| f.0);
    assert_eq!(s.end_position + HEADER_BYTES, end_of_good, "pristine segment: end position");
    assert_eq!(
        s.end_offset,
        frames.get(good).map_or(offset.unwrap_or(0), |f| f.2),
        "pristine segment: end offset"
    );
    // Any zero fill, even one shorter than a frame head, is a clean end.
    let stop = if overflow_frame.is_some() {
        ScanStop::Bad(OFFSET_OVERFLOW)
    } else {
        ScanStop::Clean
    };
    assert_eq!(s.stop, stop, "pristine segment: how the scan stops (zero fill {})", file.len() - data_end);
    check_records(&file, &frames[..good], limits);

    // One damage.
    let mut pos = u32_at(params, 24) as usize % file.len();
    match (mode >> 4) & 3 {
        0 => return,
        1 => file[pos] ^= 1 << (params[30] % 8),
        2 => {
            // 1 to 4 bytes, the first of them certainly changed. CRC32
            // detects every burst of up to 32 bits within the bytes it
            // covers (a frame's bytes 8.., the header's 0..28 with its CRC
            // last), but not one that joins a frame's CRC field (4..8) with
            // the bytes after it, which come first in the checksummed
            // message: such a burst starts at byte 8 instead. The length
            // field (0..4) is checked by the records, which must fill the
            // body exactly.
            let len = usize::from(params[31] % 4) + 1;
            for f in &frames {
                let covered = f.0 + 8;
                if pos < covered && pos + len > covered {
                    pos = covered;
                }
            }
            let burst = [params[30] | 1, params[31], params[28], params[29]];
            for (j, x) in burst.iter().take(len).enumerate() {
                if let Some(b) = file.get_mut(pos + j) {
                    *b ^= x;
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
        .position(|&(p, l, _, _)| file.get(p..p + l) != Some(&pristine[p..p + l]))
        .unwrap_or(frames.len())
        .min(good);
    let s = check_scan(&file[HEADER_BYTES..], base, limits, interval);
    let want_end = if intact == 0 { base } else { frames[intact - 1].2 + frames[intact - 1].3.len() as u64 };
    assert_eq!(
        (s.end_offset, s.end_position + HEADER_BYTES),
        (want_end, frames.get(intact).map_or(data_end, |f| f.0)),
        "damage at byte {pos}: the scan must stop exactly at the first damaged frame ({intact} of {} intact)",
        frames.len()
    );
    check_records(&file, &frames[..intact], limits);
}

/// The frames decode, in the file, to their original records.
fn check_records(file: &[u8], frames: &[(usize, usize, u64, &Vec<&[u8]>)], limits: Limits) {
    for &(at, _, o, g) in frames {
        let f = decode_frame(&file[at..], o, limits.body_bytes_max, limits.record_bytes_max)
            .expect("an intact frame decodes")
            .expect("an intact frame is a frame");
        let got: Vec<(u64, &[u8])> = f.records().collect();
        let want: Vec<(u64, &[u8])> = g.iter().enumerate().map(|(i, r)| (o + i as u64, *r)).collect();
        assert_eq!(got, want, "frame at {at}: records served with different content");
    }
}
