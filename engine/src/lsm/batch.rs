//! Write batches: the unit of atomicity, and the payload of one WAL record.
//!
//! ```text
//! batch = count:u32 op*
//! op    = kind:u8 (1 put, 2 delete) key_len:u32 key [value_len:u32 value]
//! ```
//! (integers little-endian). A batch is kept in this encoded form from the
//! first `put` on: no allocation per operation, and the bytes go to the WAL
//! as they are. A batch is one WAL record, so the record's CRC makes it
//! all-or-nothing after a crash.

use crate::error::{Error, Result};

const PUT: u8 = 1;
const DELETE: u8 = 2;

/// Writes applied together: all are visible at once, and after a crash
/// either all or none are present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    /// The encoded batch; bytes 0..4 hold the count.
    rep: Vec<u8>,
    count: u32,
    key_bytes_max: usize,
    value_bytes_max: usize,
}

impl Default for WriteBatch {
    fn default() -> Self {
        WriteBatch {
            rep: vec![0; 4],
            count: 0,
            key_bytes_max: 0,
            value_bytes_max: 0,
        }
    }
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> &mut Self {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.rep.reserve(9 + key.len() + value.len());
        self.rep.push(PUT);
        self.push_bytes(key);
        self.push_bytes(value);
        self.key_bytes_max = self.key_bytes_max.max(key.len());
        self.value_bytes_max = self.value_bytes_max.max(value.len());
        self.bump();
        self
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: impl AsRef<[u8]>) -> &mut Self {
        let key = key.as_ref();
        self.rep.push(DELETE);
        self.push_bytes(key);
        self.key_bytes_max = self.key_bytes_max.max(key.len());
        self.bump();
        self
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        // Lengths above u32::MAX never get this far in practice; the limits
        // (key_bytes_max, value_bytes_max, batch_bytes_max) refuse them
        // before a batch is written.
        self.rep.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.rep.extend_from_slice(bytes);
    }

    fn bump(&mut self) {
        self.count += 1;
        self.rep[..4].copy_from_slice(&self.count.to_le_bytes());
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size in bytes.
    pub fn encoded_bytes(&self) -> usize {
        self.rep.len()
    }

    /// The longest key and value in the batch.
    pub(crate) fn largest(&self) -> (usize, usize) {
        (self.key_bytes_max, self.value_bytes_max)
    }

    /// The encoded batch, as written to the WAL.
    pub(crate) fn encoded(&self) -> &[u8] {
        &self.rep
    }

    /// The operations in order: `(key, Some(value))` or `(key, None)`.
    pub fn ops(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        let mut r = Reader {
            bytes: &self.rep,
            pos: 4,
        };
        (0..self.count).map(move |_| r.op().expect("a batch built by put/delete is well formed"))
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
        let mut batch = WriteBatch {
            rep: bytes.to_vec(),
            count,
            key_bytes_max: 0,
            value_bytes_max: 0,
        };
        for _ in 0..count {
            let (key, value) = r.op().map_err(bad)?;
            batch.key_bytes_max = batch.key_bytes_max.max(key.len());
            batch.value_bytes_max = batch.value_bytes_max.max(value.map_or(0, <[u8]>::len));
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

    fn op(&mut self) -> std::result::Result<(&'a [u8], Option<&'a [u8]>), &'static str> {
        let kind = self.take(1).ok_or("truncated op")?[0];
        let klen = self.u32().ok_or("truncated key length")? as usize;
        let key = self.take(klen).ok_or("truncated key")?;
        match kind {
            PUT => {
                let vlen = self.u32().ok_or("truncated value length")? as usize;
                let value = self.take(vlen).ok_or("truncated value")?;
                Ok((key, Some(value)))
            }
            DELETE => Ok((key, None)),
            _ => Err("unknown op kind"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut b = WriteBatch::new();
        b.put(b"a", b"1").delete(b"b").put(b"", b"");
        assert_eq!(b.len(), 3);
        let ops: Vec<_> = b.ops().collect();
        assert_eq!(
            ops,
            vec![
                (&b"a"[..], Some(&b"1"[..])),
                (&b"b"[..], None),
                (&b""[..], Some(&b""[..]))
            ]
        );
        assert_eq!(WriteBatch::decode(b.encoded()).unwrap(), b);
        let enc = b.encoded();
        for cut in 0..enc.len() {
            assert!(WriteBatch::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
    }
}
