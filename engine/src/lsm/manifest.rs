//! The manifest: which tables are live and how much of the WAL they hold.
//!
//! ```text
//! MANIFEST = magic "RAMAMAN1" version:u32 next_table_id:u64
//!            wal_checkpoint:u64 table_count:u32 table_id:u64* crc32:u32
//! ```
//! Tables are listed newest first. Replaced atomically: written to
//! `MANIFEST.tmp`, synced, renamed over `MANIFEST`, directory synced.

use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"RAMAMAN1";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub next_table_id: u64,
    /// Every WAL record below this offset is in the tables.
    pub wal_checkpoint: u64,
    /// Live tables, newest first.
    pub tables: Vec<u64>,
}

impl Manifest {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.next_table_id.to_le_bytes());
        out.extend_from_slice(&self.wal_checkpoint.to_le_bytes());
        out.extend_from_slice(&(self.tables.len() as u32).to_le_bytes());
        for id in &self.tables {
            out.extend_from_slice(&id.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Manifest> {
        let bad = |reason: &str| Error::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            position: 0,
            reason: reason.to_string(),
        };
        if bytes.len() < 36 || &bytes[..8] != MAGIC {
            return Err(bad("not a manifest"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("manifest checksum mismatch"));
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) != VERSION {
            return Err(bad("unsupported manifest version"));
        }
        let count = u32::from_le_bytes(body[28..32].try_into().expect("4 bytes")) as usize;
        if body.len() != 32 + 8 * count {
            return Err(bad("manifest length does not match its table count"));
        }
        Ok(Manifest {
            next_table_id: u64_at(12),
            wal_checkpoint: u64_at(20),
            tables: (0..count).map(|i| u64_at(32 + 8 * i)).collect(),
        })
    }

    /// Reads the manifest in `dir`, or `None` for a new store.
    pub fn load(dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.join("MANIFEST");
        match std::fs::read(&path) {
            Ok(bytes) => Manifest::decode(&bytes, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read manifest", &path, e)),
        }
    }

    /// Atomically replaces the manifest in `dir`. Small and rare, so plain
    /// blocking I/O is used.
    /// Writes the manifest beside the old one and renames it into place.
    /// An error of [`failed_before_rename`] left the old one in force.
    pub fn store(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        let tmp = dir.join("MANIFEST.tmp");
        let path = dir.join("MANIFEST");
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("create manifest", &tmp, e))?;
        f.write_all(&self.encode())
            .map_err(|e| Error::io("write manifest", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("sync manifest", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename manifest", &path, e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("sync store directory", dir, e))
    }
}

/// Whether a [`Manifest::store`] error happened before the rename (the old
/// manifest is then still the one on disk).
pub fn failed_before_rename(e: &Error) -> bool {
    matches!(
        e,
        Error::Io {
            op: "create manifest" | "write manifest" | "sync manifest",
            ..
        }
    )
}
