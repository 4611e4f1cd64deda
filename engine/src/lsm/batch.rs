//! Write batches: the unit of atomicity, and the payload of one WAL record.
//!
//! ```text
//! batch = count:u32 op*
//! op    = kind:u8 (1 put, 2 delete) key_len:u32 key [value_len:u32 value]
//! ```
//! (integers little-endian). A batch is one WAL record, so the record's CRC
//! makes it all-or-nothing after a crash.

use crate::error::{Error, Result};

const PUT: u8 = 1;
const DELETE: u8 = 2;

/// Writes applied together: all are visible at once, and after a crash
/// either all or none are present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub(crate) ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub(crate) bytes: usize,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        let (key, value) = (key.into(), value.into());
        self.bytes += 9 + key.len() + value.len();
        self.ops.push((key, Some(value)));
        self
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        let key = key.into();
        self.bytes += 5 + key.len();
        self.ops.push((key, None));
        self
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Encoded size in bytes.
    pub fn encoded_bytes(&self) -> usize {
        4 + self.bytes
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_bytes());
        out.extend_from_slice(&(self.ops.len() as u32).to_le_bytes());
        for (key, value) in &self.ops {
            out.push(if value.is_some() { PUT } else { DELETE });
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            if let Some(value) = value {
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(value);
            }
        }
        out
    }

    /// Decodes a batch; any malformation is an error (the WAL's CRC already
    /// passed, so this means a bug or a foreign file).
    pub(crate) fn decode(bytes: &[u8]) -> Result<WriteBatch> {
        let bad = |why: &str| Error::Corrupt {
            path: "<wal batch>".into(),
            offset: 0,
            position: 0,
            reason: why.to_string(),
        };
        let mut r = Reader { bytes, pos: 0 };
        let count = r.u32().ok_or_else(|| bad("truncated batch count"))?;
        let mut batch = WriteBatch::new();
        for _ in 0..count {
            let kind = r.take(1).ok_or_else(|| bad("truncated op"))?[0];
            let klen = r.u32().ok_or_else(|| bad("truncated key length"))? as usize;
            let key = r.take(klen).ok_or_else(|| bad("truncated key"))?.to_vec();
            match kind {
                PUT => {
                    let vlen = r.u32().ok_or_else(|| bad("truncated value length"))? as usize;
                    let value = r.take(vlen).ok_or_else(|| bad("truncated value"))?.to_vec();
                    batch.put(key, value);
                }
                DELETE => {
                    batch.delete(key);
                }
                _ => return Err(bad("unknown op kind")),
            }
        }
        if r.pos != bytes.len() {
            return Err(bad("trailing bytes after batch"));
        }
        Ok(batch)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut b = WriteBatch::new();
        b.put(b"a".to_vec(), b"1".to_vec())
            .delete(b"b".to_vec())
            .put(Vec::new(), Vec::new());
        assert_eq!(b.encode().len(), b.encoded_bytes());
        assert_eq!(WriteBatch::decode(&b.encode()).unwrap(), b);
        let enc = b.encode();
        for cut in 0..enc.len() {
            assert!(WriteBatch::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
    }
}
