//! Order-preserving key encoding.
//!
//! `encode(a) < encode(b)` (bytewise) exactly when `a < b` (value order), and
//! every encoding is self-delimiting, so encodings concatenate into composite
//! keys that still sort correctly (a PState key is `prefix ++ encode(key)`).
//!
//! Layout (one tag byte, then the body):
//!
//! | kind  | tag  | body                                                    |
//! |-------|------|---------------------------------------------------------|
//! | nil   | 0x01 | -                                                       |
//! | false | 0x02 | -                                                       |
//! | true  | 0x03 | -                                                       |
//! | int   | 0x10 | 8 bytes big-endian of `i ^ i64::MIN` (sign bit flipped)  |
//! | float | 0x20 | 8 bytes big-endian, bits flipped to sort as `total_cmp`  |
//! | str   | 0x30 | bytes with `00` escaped as `00 ff`, then `00 00`         |
//! | bytes | 0x40 | as str                                                  |
//! | list  | 0x50 | each element encoded, then `00`                         |
//! | map   | 0x60 | key, value, key, value ... (sorted by key), then `00`   |
//! | set   | 0x70 | each element encoded (sorted), then `00`                |
//!
//! Every tag is at least `0x01`, so the `00` terminator of a list sorts
//! before any further element: a prefix sorts first, as in `Vec`'s order.

use std::collections::{BTreeMap, BTreeSet};

use super::Value;

const TAG_NIL: u8 = 0x01;
const TAG_FALSE: u8 = 0x02;
const TAG_TRUE: u8 = 0x03;
const TAG_INT: u8 = 0x10;
const TAG_FLOAT: u8 = 0x20;
const TAG_STR: u8 = 0x30;
const TAG_BYTES: u8 = 0x40;
const TAG_LIST: u8 = 0x50;
const TAG_MAP: u8 = 0x60;
const TAG_SET: u8 = 0x70;
const END: u8 = 0x00;
const ESCAPE: u8 = 0xff;

/// Nesting deeper than this is refused when decoding, so a hostile key
/// cannot overflow the stack.
pub use super::DEPTH_MAX;

/// A key that does not decode: corrupt storage or a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key encoding at byte {position}: {reason}")]
pub struct DecodeError {
    pub position: usize,
    pub reason: &'static str,
}

/// Returns the order-preserving encoding of `value`.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    encode_into(value, &mut out);
    out
}

/// Appends the order-preserving encoding of `value` to `out`.
pub fn encode_into(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Nil => out.push(TAG_NIL),
        Value::Bool(false) => out.push(TAG_FALSE),
        Value::Bool(true) => out.push(TAG_TRUE),
        Value::Int(i) => {
            out.push(TAG_INT);
            out.extend_from_slice(&((*i as u64) ^ (1 << 63)).to_be_bytes());
        }
        Value::Float(f) => {
            out.push(TAG_FLOAT);
            out.extend_from_slice(&float_bits(*f).to_be_bytes());
        }
        Value::Str(s) => {
            out.push(TAG_STR);
            escape_into(s.as_bytes(), out);
        }
        Value::Bytes(b) => {
            out.push(TAG_BYTES);
            escape_into(b, out);
        }
        Value::List(items) => {
            out.push(TAG_LIST);
            items.iter().for_each(|item| encode_into(item, out));
            out.push(END);
        }
        Value::Map(map) => {
            out.push(TAG_MAP);
            for (k, v) in map {
                encode_into(k, out);
                encode_into(v, out);
            }
            out.push(END);
        }
        Value::Set(set) => {
            out.push(TAG_SET);
            set.iter().for_each(|item| encode_into(item, out));
            out.push(END);
        }
    }
}

/// Maps float bits so unsigned order equals `f64::total_cmp` order.
fn float_bits(f: f64) -> u64 {
    let bits = f.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits ^ (1 << 63)
    }
}

fn float_from_bits(mapped: u64) -> f64 {
    let bits = if mapped >> 63 == 1 { mapped ^ (1 << 63) } else { !mapped };
    f64::from_bits(bits)
}

fn escape_into(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        out.push(b);
        if b == END {
            out.push(ESCAPE);
        }
    }
    out.push(END);
    out.push(END);
}

/// Decodes one whole key; trailing bytes are an error.
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut decoder = Decoder { bytes, pos: 0 };
    let value = decoder.value(0)?;
    if decoder.pos != bytes.len() {
        return Err(decoder.error("trailing bytes after the value"));
    }
    Ok(value)
}

/// Decodes the first value of `bytes`, returning it and the number of bytes
/// it took. Used to split composite keys.
pub fn decode_prefix(bytes: &[u8]) -> Result<(Value, usize), DecodeError> {
    let mut decoder = Decoder { bytes, pos: 0 };
    let value = decoder.value(0)?;
    Ok((value, decoder.pos))
}

/// The smallest byte string greater than every key that starts with
/// `prefix`, or `None` if there is none (all bytes `ff`). Used as an
/// exclusive upper bound for prefix scans.
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut out = prefix.to_vec();
    while let Some(last) = out.pop() {
        if last != 0xff {
            out.push(last + 1);
            return Some(out);
        }
    }
    None
}

struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Decoder<'_> {
    fn error(&self, reason: &'static str) -> DecodeError {
        DecodeError {
            position: self.pos,
            reason,
        }
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or_else(|| self.error("unexpected end of key"))?;
        self.pos += 1;
        Ok(b)
    }

    fn peek(&self) -> Result<u8, DecodeError> {
        self.bytes
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.error("unexpected end of key"))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let end = self.pos + 8;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or_else(|| self.error("truncated number"))?;
        self.pos = end;
        Ok(u64::from_be_bytes(slice.try_into().expect("slice is 8 bytes long")))
    }

    fn escaped(&mut self) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        loop {
            let b = self.byte()?;
            if b != END {
                out.push(b);
                continue;
            }
            match self.byte()? {
                END => return Ok(out),
                ESCAPE => out.push(END),
                _ => return Err(self.error("invalid escape in string")),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > DEPTH_MAX {
            return Err(self.error("nesting deeper than DEPTH_MAX"));
        }
        let tag = self.byte()?;
        Ok(match tag {
            TAG_NIL => Value::Nil,
            TAG_FALSE => Value::Bool(false),
            TAG_TRUE => Value::Bool(true),
            TAG_INT => Value::Int((self.u64()? ^ (1 << 63)) as i64),
            TAG_FLOAT => Value::Float(float_from_bits(self.u64()?)),
            TAG_STR => {
                let bytes = self.escaped()?;
                Value::Str(String::from_utf8(bytes).map_err(|_| self.error("string is not UTF-8"))?)
            }
            TAG_BYTES => Value::Bytes(self.escaped()?),
            TAG_LIST => {
                let mut items = Vec::new();
                while self.peek()? != END {
                    items.push(self.value(depth + 1)?);
                }
                self.pos += 1;
                Value::List(items)
            }
            TAG_MAP => {
                let mut map = BTreeMap::new();
                let mut last: Option<Value> = None;
                while self.peek()? != END {
                    let k = self.value(depth + 1)?;
                    let v = self.value(depth + 1)?;
                    if last.as_ref().is_some_and(|last| *last >= k) {
                        return Err(self.error("map keys not strictly increasing"));
                    }
                    last = Some(k.clone());
                    map.insert(k, v);
                }
                self.pos += 1;
                Value::Map(map)
            }
            TAG_SET => {
                let mut set = BTreeSet::new();
                while self.peek()? != END {
                    let item = self.value(depth + 1)?;
                    if set.last().is_some_and(|last| *last >= item) {
                        return Err(self.error("set elements not strictly increasing"));
                    }
                    set.insert(item);
                }
                self.pos += 1;
                Value::Set(set)
            }
            _ => {
                return Err(DecodeError {
                    position: self.pos - 1,
                    reason: "unknown tag",
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::strategy;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn round_trips(v in strategy::value()) {
            let bytes = encode(&v);
            prop_assert_eq!(decode(&bytes).unwrap(), v);
        }

        #[test]
        fn byte_order_is_value_order(a in strategy::value(), b in strategy::value()) {
            prop_assert_eq!(encode(&a).cmp(&encode(&b)), a.cmp(&b));
        }

        #[test]
        fn composite_keys_keep_order(a in strategy::value(), b in strategy::value(),
                                     c in strategy::value(), d in strategy::value()) {
            // A composite key is a concatenation; it must sort like the tuple.
            let mut ab = encode(&a);
            encode_into(&b, &mut ab);
            let mut cd = encode(&c);
            encode_into(&d, &mut cd);
            prop_assert_eq!(ab.cmp(&cd), (&a, &b).cmp(&(&c, &d)));
            let (first, used) = decode_prefix(&ab).unwrap();
            prop_assert_eq!(first, a);
            prop_assert_eq!(decode(&ab[used..]).unwrap(), b);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn floats_sort_like_total_cmp() {
        let xs = [f64::NEG_INFINITY, -1.5, -0.0, 0.0, 1e-300, 2.0, f64::INFINITY, f64::NAN];
        for w in xs.windows(2) {
            assert!(encode(&Value::Float(w[0])) < encode(&Value::Float(w[1])), "{w:?}");
        }
    }

    #[test]
    fn prefix_successor_bounds_a_prefix() {
        assert_eq!(prefix_successor(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut bytes = vec![TAG_LIST; DEPTH_MAX + 2];
        bytes.extend(std::iter::repeat_n(END, DEPTH_MAX + 2));
        assert!(decode(&bytes).is_err());
    }
}
