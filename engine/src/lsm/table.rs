//! Immutable sorted tables ("SSTs"), written once with glommio and read
//! through a memory map.
//!
//! ```text
//! table  = data_block* index bloom footer
//! block  = entry* crc32(entries):u32
//! entry  = key_len:varint tag:varint key value      tag 0 = tombstone,
//!                                                    tag n = value of n-1 bytes
//! index  = (last_key_len:varint last_key block_offset:u64 block_len:u32)*
//! bloom  = see bloom.rs
//! footer (48 bytes) = index_offset:u64 index_len:u32 bloom_offset:u64
//!          bloom_len:u32 entries:u64 index_crc:u32 bloom_crc:u32 magic "RAMASST1"
//! ```
//! Invariants: keys strictly increase through the table; every block's
//! last key is in the index; `block_len` includes the block's CRC. The
//! index and bloom CRCs are checked at open, a block's CRC on every read.

use std::ops::{Bound, Range};
use std::path::{Path, PathBuf};

use glommio::io::{BufferedFile, OpenOptions};

use super::bloom::{self, BloomBuilder};
use super::memtable::compare;
use crate::error::{gio, Error, Result};
use crate::varint;

const MAGIC: &[u8; 8] = b"RAMASST1";
const FOOTER_BYTES: usize = 48;

/// Options for writing tables.
#[derive(Debug, Clone)]
pub struct TableOptions {
    /// Target size of a data block. Default 4 KiB.
    pub block_bytes: usize,
    /// Bloom filter bits per key. Default 10.
    pub bloom_bits_per_key: usize,
    /// Bytes buffered before a write is issued. Default 1 MiB.
    pub write_buffer_bytes: usize,
}

impl Default for TableOptions {
    fn default() -> Self {
        TableOptions {
            block_bytes: 4096,
            bloom_bits_per_key: 10,
            write_buffer_bytes: 1 << 20,
        }
    }
}

/// Streams sorted entries into a new table file.
pub struct TableWriter {
    path: PathBuf,
    file: BufferedFile,
    options: TableOptions,
    /// Bytes not yet written to the file.
    buffer: Vec<u8>,
    /// File position of `buffer[0]`.
    buffer_position: u64,
    block_start: u64,
    block_entries: usize,
    last_key: Vec<u8>,
    index: Vec<u8>,
    bloom: BloomBuilder,
    entries: u64,
}

impl std::fmt::Debug for TableWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableWriter")
            .field("path", &self.path)
            .field("entries", &self.entries)
            .finish()
    }
}

impl TableWriter {
    pub async fn create(path: &Path, options: TableOptions) -> Result<TableWriter> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .buffered_open(path)
            .await
            .map_err(|e| Error::io("create table", path, gio(e)))?;
        Ok(TableWriter {
            path: path.to_path_buf(),
            file,
            buffer: Vec::with_capacity(options.write_buffer_bytes + options.block_bytes),
            bloom: BloomBuilder::new(options.bloom_bits_per_key),
            options,
            buffer_position: 0,
            block_start: 0,
            block_entries: 0,
            last_key: Vec::new(),
            index: Vec::new(),
            entries: 0,
        })
    }

    fn position(&self) -> u64 {
        self.buffer_position + self.buffer.len() as u64
    }

    /// Adds an entry; keys must strictly increase. `None` is a tombstone.
    pub async fn add(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        debug_assert!(
            self.entries == 0 || key > self.last_key.as_slice(),
            "table keys must increase"
        );
        varint::put(&mut self.buffer, key.len() as u64);
        varint::put(&mut self.buffer, value.map_or(0, |v| v.len() as u64 + 1));
        self.buffer.extend_from_slice(key);
        if let Some(v) = value {
            self.buffer.extend_from_slice(v);
        }
        self.bloom.add(key);
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.entries += 1;
        self.block_entries += 1;
        if self.position() - self.block_start >= self.options.block_bytes as u64 {
            self.finish_block();
            if self.buffer.len() >= self.options.write_buffer_bytes {
                self.write_buffer().await?;
            }
        }
        Ok(())
    }

    fn finish_block(&mut self) {
        if self.block_entries == 0 {
            return;
        }
        let start = (self.block_start - self.buffer_position) as usize;
        let crc = crc32fast::hash(&self.buffer[start..]);
        self.buffer.extend_from_slice(&crc.to_le_bytes());
        let len = self.position() - self.block_start;
        varint::put(&mut self.index, self.last_key.len() as u64);
        self.index.extend_from_slice(&self.last_key);
        self.index.extend_from_slice(&self.block_start.to_le_bytes());
        self.index.extend_from_slice(&(len as u32).to_le_bytes());
        self.block_start = self.position();
        self.block_entries = 0;
    }

    async fn write_buffer(&mut self) -> Result<()> {
        // Blocks are complete at this point, so the buffer empties fully.
        let buf = std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(self.options.write_buffer_bytes + self.options.block_bytes),
        );
        let len = buf.len();
        let written = self
            .file
            .write_at(buf, self.buffer_position)
            .await
            .map_err(|e| Error::io("write table", &self.path, gio(e)))?;
        if written < len {
            return Err(Error::io(
                "write table",
                &self.path,
                std::io::Error::new(std::io::ErrorKind::WriteZero, "short write; the device may be full"),
            ));
        }
        self.buffer_position += len as u64;
        Ok(())
    }

    /// Writes the index, filter and footer and syncs the file. Returns the
    /// number of entries and the file size.
    pub async fn finish(mut self) -> Result<(u64, u64)> {
        self.finish_block();
        let index_offset = self.position();
        let index = std::mem::take(&mut self.index);
        self.buffer.extend_from_slice(&index);
        let bloom_offset = self.position();
        let filter = self.bloom.finish();
        self.buffer.extend_from_slice(&filter);
        let mut footer = Vec::with_capacity(FOOTER_BYTES);
        footer.extend_from_slice(&index_offset.to_le_bytes());
        footer.extend_from_slice(&(index.len() as u32).to_le_bytes());
        footer.extend_from_slice(&bloom_offset.to_le_bytes());
        footer.extend_from_slice(&(filter.len() as u32).to_le_bytes());
        footer.extend_from_slice(&self.entries.to_le_bytes());
        footer.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
        footer.extend_from_slice(&crc32fast::hash(&filter).to_le_bytes());
        footer.extend_from_slice(MAGIC);
        debug_assert_eq!(footer.len(), FOOTER_BYTES);
        self.buffer.extend_from_slice(&footer);
        let size = self.position();
        self.write_buffer().await?;
        self.file
            .fdatasync()
            .await
            .map_err(|e| Error::io("sync table", &self.path, gio(e)))?;
        self.file
            .close()
            .await
            .map_err(|e| Error::io("close table", &self.path, gio(e)))?;
        Ok((self.entries, size))
    }
}

struct IndexEntry {
    last_key: Range<usize>,
    offset: usize,
    len: usize,
}

/// An open table, read through a memory map.
pub struct Table {
    pub(crate) id: u64,
    path: PathBuf,
    map: memmap2::Mmap,
    index: Vec<IndexEntry>,
    bloom: Range<usize>,
    entries: u64,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("path", &self.path)
            .field("entries", &self.entries)
            .finish()
    }
}

/// A decoded entry: key and value ranges within the map (`None` = tombstone).
type EntryRanges = (Range<usize>, Option<Range<usize>>);

impl Table {
    /// Opens and verifies the footer, index and filter of a table.
    pub fn open(id: u64, path: &Path) -> Result<Table> {
        let file = std::fs::File::open(path).map_err(|e| Error::io("open table", path, e))?;
        // SAFETY: table files are immutable once written and synced; nothing
        // in this process writes or truncates them while they are mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io("map table", path, e))?;
        let corrupt = |position: usize, reason: &str| Error::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            position: position as u64,
            reason: reason.to_string(),
        };
        let n = map.len();
        if n < FOOTER_BYTES || &map[n - 8..] != MAGIC {
            return Err(corrupt(n, "missing table footer"));
        }
        let f = &map[n - FOOTER_BYTES..];
        let u64_at = |at: usize| u64::from_le_bytes(f[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(f[at..at + 4].try_into().expect("4 bytes"));
        let (index_offset, index_len) = (u64_at(0) as usize, u32_at(8) as usize);
        let (bloom_offset, bloom_len) = (u64_at(12) as usize, u32_at(20) as usize);
        let entries = u64_at(24);
        let body = n - FOOTER_BYTES;
        if index_offset.checked_add(index_len).is_none_or(|e| e > body)
            || bloom_offset.checked_add(bloom_len).is_none_or(|e| e > body)
        {
            return Err(corrupt(n - FOOTER_BYTES, "footer points outside the table"));
        }
        let index_bytes = &map[index_offset..index_offset + index_len];
        if crc32fast::hash(index_bytes) != u32_at(32) {
            return Err(corrupt(index_offset, "index checksum mismatch"));
        }
        if crc32fast::hash(&map[bloom_offset..bloom_offset + bloom_len]) != u32_at(36) {
            return Err(corrupt(bloom_offset, "filter checksum mismatch"));
        }
        let mut index = Vec::new();
        let mut pos = 0;
        while pos < index_len {
            let klen =
                varint::get(index_bytes, &mut pos).ok_or_else(|| corrupt(index_offset + pos, "bad index"))? as usize;
            let key_start = index_offset + pos;
            pos += klen;
            let rest = index_bytes
                .get(pos..pos + 12)
                .ok_or_else(|| corrupt(index_offset + pos, "bad index"))?;
            let offset = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
            let len = u32::from_le_bytes(rest[8..].try_into().expect("4 bytes")) as usize;
            if len < 4 || offset + len > index_offset {
                return Err(corrupt(index_offset + pos, "index entry points outside the data"));
            }
            pos += 12;
            index.push(IndexEntry {
                last_key: key_start..key_start + klen,
                offset,
                len,
            });
        }
        Ok(Table {
            id,
            path: path.to_path_buf(),
            map,
            index,
            bloom: bloom_offset..bloom_offset + bloom_len,
            entries,
        })
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    fn block_corrupt(&self, offset: usize, reason: &str) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            offset: 0,
            position: offset as u64,
            reason: reason.to_string(),
        }
    }

    /// The entries of the block at `offset`, after checking its CRC.
    fn verified_block(&self, offset: usize, len: usize) -> Result<&[u8]> {
        let data = &self.map[offset..offset + len - 4];
        let crc = u32::from_le_bytes(self.map[offset + len - 4..offset + len].try_into().expect("4 bytes"));
        if crc32fast::hash(data) != crc {
            return Err(self.block_corrupt(offset, "block checksum mismatch"));
        }
        Ok(data)
    }

    /// Verifies block `block` and decodes its entries.
    fn block(&self, block: usize) -> Result<Vec<EntryRanges>> {
        let IndexEntry { offset, len, .. } = self.index[block];
        let data = self.verified_block(offset, len)?;
        let corrupt = |reason: &str| self.block_corrupt(offset, reason);
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let klen = varint::get(data, &mut pos).ok_or_else(|| corrupt("bad entry"))? as usize;
            let tag = varint::get(data, &mut pos).ok_or_else(|| corrupt("bad entry"))? as usize;
            let key = offset + pos..offset + pos + klen;
            pos += klen;
            let value = if tag == 0 {
                None
            } else {
                let v = offset + pos..offset + pos + tag - 1;
                pos += tag - 1;
                Some(v)
            };
            if pos > data.len() {
                return Err(corrupt("entry runs past its block"));
            }
            out.push((key, value));
        }
        Ok(out)
    }

    /// Looks `key` up: `None` if the table has no entry, `Some(None)` for a
    /// tombstone.
    pub fn get(&self, key: &[u8]) -> Result<Option<Option<&[u8]>>> {
        if !bloom::may_contain(&self.map[self.bloom.clone()], key) {
            return Ok(None);
        }
        let block = self
            .index
            .partition_point(|e| compare(&self.map[e.last_key.clone()], key).is_lt());
        if block == self.index.len() {
            return Ok(None);
        }
        let IndexEntry { offset, len, .. } = self.index[block];
        let data = self.verified_block(offset, len)?;
        // Scan the block in place: no allocation on the point-read path.
        let mut pos = 0;
        while pos < data.len() {
            let (klen, tag) = match (varint::get(data, &mut pos), varint::get(data, &mut pos)) {
                (Some(k), Some(t)) => (k as usize, t as usize),
                _ => return Err(self.block_corrupt(offset, "bad entry")),
            };
            let vlen = tag.saturating_sub(1);
            let end = pos + klen + vlen;
            if end > data.len() {
                return Err(self.block_corrupt(offset, "entry runs past its block"));
            }
            match compare(&data[pos..pos + klen], key) {
                std::cmp::Ordering::Less => pos = end,
                std::cmp::Ordering::Equal => {
                    return Ok(Some((tag != 0).then(|| &data[pos + klen..end])));
                }
                std::cmp::Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Iterates entries within bounds, ascending or descending.
    pub fn range<'a>(&'a self, lower: Bound<&'a [u8]>, upper: Bound<&'a [u8]>, reverse: bool) -> TableRange<'a> {
        let block = if reverse {
            let b = match upper {
                Bound::Unbounded => self.index.len(),
                Bound::Included(k) | Bound::Excluded(k) => self
                    .index
                    .partition_point(|e| compare(&self.map[e.last_key.clone()], k).is_lt()),
            };
            b.min(self.index.len().saturating_sub(1))
        } else {
            match lower {
                Bound::Unbounded => 0,
                Bound::Included(k) | Bound::Excluded(k) => self
                    .index
                    .partition_point(|e| compare(&self.map[e.last_key.clone()], k).is_lt()),
            }
        };
        TableRange {
            table: self,
            lower,
            upper,
            reverse,
            block: if self.index.is_empty() { None } else { Some(block) },
            entries: Vec::new(),
            done: false,
        }
    }
}

/// An iterator over a key range of one table.
#[allow(
    missing_debug_implementations,
    reason = "holds borrowed map ranges; nothing useful to print"
)]
pub struct TableRange<'a> {
    table: &'a Table,
    lower: Bound<&'a [u8]>,
    upper: Bound<&'a [u8]>,
    reverse: bool,
    /// Next block to load.
    block: Option<usize>,
    /// Entries of the loaded block still to yield, in yield order reversed.
    entries: Vec<EntryRanges>,
    done: bool,
}

impl<'a> Iterator for TableRange<'a> {
    type Item = Result<(&'a [u8], Option<&'a [u8]>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let map: &'a [u8] = &self.table.map;
        loop {
            if self.done {
                return None;
            }
            let Some((k, v)) = self.entries.pop() else {
                let block = self.block?;
                if block >= self.table.index.len() {
                    self.block = None;
                    return None;
                }
                match self.table.block(block) {
                    Ok(mut entries) => {
                        if !self.reverse {
                            entries.reverse();
                        }
                        self.entries = entries;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                self.block = if self.reverse {
                    block.checked_sub(1)
                } else {
                    Some(block + 1)
                };
                continue;
            };
            let key = &map[k];
            let below = match self.lower {
                Bound::Unbounded => false,
                Bound::Included(l) => key < l,
                Bound::Excluded(l) => key <= l,
            };
            let above = match self.upper {
                Bound::Unbounded => false,
                Bound::Included(u) => key > u,
                Bound::Excluded(u) => key >= u,
            };
            if (self.reverse && below) || (!self.reverse && above) {
                self.done = true;
                return None;
            }
            if below || above {
                continue;
            }
            return Some(Ok((key, v.map(|v| &map[v]))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::ExecutorConfig;

    #[test]
    fn writes_reads_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.sst");
        let options = TableOptions {
            block_bytes: 64,
            ..TableOptions::default()
        };
        ExecutorConfig::default()
            .block_on(async {
                let mut w = TableWriter::create(&path, options).await.unwrap();
                for i in 0..500u32 {
                    let k = (i * 2).to_be_bytes();
                    if i % 7 == 0 {
                        w.add(&k, None).await.unwrap();
                    } else {
                        w.add(&k, Some(&i.to_le_bytes())).await.unwrap();
                    }
                }
                w.finish().await.unwrap();
            })
            .unwrap();
        let t = Table::open(1, &path).unwrap();
        assert_eq!(t.entries(), 500);
        assert!(t.index.len() > 10);
        assert_eq!(t.get(&4u32.to_be_bytes()).unwrap(), Some(Some(&2u32.to_le_bytes()[..])));
        assert_eq!(t.get(&0u32.to_be_bytes()).unwrap(), Some(None));
        assert_eq!(t.get(&5u32.to_be_bytes()).unwrap(), None);
        assert_eq!(t.get(&5000u32.to_be_bytes()).unwrap(), None);
        let lo = 100u32.to_be_bytes();
        let hi = 201u32.to_be_bytes();
        let fwd: Vec<_> = t
            .range(Bound::Excluded(&lo), Bound::Included(&hi), false)
            .map(|r| u32::from_be_bytes(r.unwrap().0.try_into().unwrap()))
            .collect();
        assert_eq!(fwd, (102..=200).step_by(2).collect::<Vec<_>>());
        let mut rev: Vec<_> = t
            .range(Bound::Excluded(&lo), Bound::Included(&hi), true)
            .map(|r| u32::from_be_bytes(r.unwrap().0.try_into().unwrap()))
            .collect();
        rev.reverse();
        assert_eq!(rev, fwd);
        assert_eq!(t.range(Bound::Unbounded, Bound::Unbounded, true).count(), 500);
        // Flip a bit in the first block: reads there fail, never return garbage.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let t = Table::open(1, &path).unwrap();
        assert!(matches!(t.get(&2u32.to_be_bytes()), Err(Error::Corrupt { .. })));
    }
}
