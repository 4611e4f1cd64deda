//! Cutting a log's tail: [`Log::truncate`] removes the records at and
//! past an offset, durably, for a follower whose tail diverges from its
//! leader's (replication, truncation by epoch).
//!
//! A frame holds several records, so a cut inside a frame rewrites the
//! frame's first records as a new, shorter frame at the same place. Done in
//! place that would lose those records if the process died between
//! overwriting the frame and writing the shorter one, and they may be
//! records this log already reported as held. So the cut is written first
//! as a *redo record* (`TRUNCATE`, written to a temporary file, synced and
//! renamed): the segment to cut, the file position, the bytes of the
//! shorter frame, the new end offset, and a CRC-32 over all of it. Then
//! later segments are deleted, the shorter frame written, the rest of the
//! segment zeroed, synced, and the redo record removed. [`Log::open`]
//! carries out a redo record it finds before anything else, so a cut
//! interrupted at any point completes at the next open, and one whose redo
//! record never became whole never started.

use std::path::Path;
use std::rc::Rc;

use super::format::{self, FrameBuilder, HEADER_BYTES};
use super::{open_rw, read_exact, segment_path, sync_dir, write_all, zero_fill, Log, LogConfig, Shared};
use crate::error::{gio, Error, Result};

/// The redo record of a cut in progress.
pub(super) const REDO: &str = "TRUNCATE";
const REDO_TMP: &str = "TRUNCATE.tmp";
const MAGIC: &[u8; 8] = b"RTRUNC01";

/// Where a test stops a cut, as a crash would.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutStop {
    /// Carry the cut out completely.
    Never,
    /// Once the redo record is durable, before the segments change.
    AfterRedo,
    /// Once later segments are deleted and the shorter frame is written,
    /// before the rest of the segment is zeroed and the redo record
    /// removed.
    AfterFrame,
}

/// One cut: the log ends at `to`; segment `base` keeps its bytes below
/// `position`, then `frame` (the records of the cut frame below `to`, or
/// nothing when `to` starts a frame).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cut {
    to: u64,
    base: u64,
    position: u64,
    frame: Vec<u8>,
}

impl Cut {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 28 + self.frame.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.to.to_le_bytes());
        out.extend_from_slice(&self.base.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
        out.extend_from_slice(&(self.frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.frame);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> std::result::Result<Cut, &'static str> {
        if bytes.len() < 8 + 28 + 4 || &bytes[..8] != MAGIC {
            return Err("not a truncation redo record");
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("truncation redo record fails its checksum");
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(body[32..36].try_into().expect("4 bytes")) as usize;
        if body.len() != 36 + len {
            return Err("truncation redo record has the wrong length");
        }
        Ok(Cut {
            to: u64_at(8),
            base: u64_at(16),
            position: u64_at(24),
            frame: body[36..].to_vec(),
        })
    }
}

impl Log {
    /// Removes every record at and past `to`, durably, and makes `to` the
    /// next offset. Waits for records already queued to be written first;
    /// appends meanwhile are refused. `to` at or past the end changes
    /// nothing; below the start offset (trimmed records) is refused.
    pub async fn truncate(&self, to: u64) -> Result<()> {
        self.truncate_stopping(to, CutStop::Never).await
    }

    /// [`Log::truncate`] that stops where a crash would (tests).
    #[doc(hidden)]
    pub async fn truncate_stopping(&self, to: u64, stop: CutStop) -> Result<()> {
        let queued = self.shared.state.borrow().next_offset;
        self.wait_durable(queued).await?;
        {
            let mut s = self.shared.state.borrow_mut();
            self.check_usable(&s)?;
            if to >= s.durable_end {
                return Ok(());
            }
            if to < s.start_offset {
                return Err(Error::OffsetOutOfRange {
                    requested: to,
                    start: s.start_offset,
                    end: s.durable_end,
                });
            }
            s.truncating = true;
        }
        let result = self.cut(to, stop).await;
        self.shared.state.borrow_mut().truncating = false;
        self.shared.space.wake_all();
        result
    }

    async fn cut(&self, to: u64, stop: CutStop) -> Result<()> {
        let shared = &self.shared;
        let cut = plan(self, to).await?;
        let dir = &shared.dir;
        let tmp = dir.join(REDO_TMP);
        std::fs::write(&tmp, cut.encode())
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .map_err(|e| Error::io("write truncation redo record", &tmp, e))?;
        std::fs::rename(&tmp, dir.join(REDO)).map_err(|e| Error::io("write truncation redo record", &tmp, e))?;
        sync_dir(dir)?;
        if stop == CutStop::AfterRedo {
            return Ok(());
        }
        // The files change under the reader's cached handles: drop them.
        shared.state.borrow_mut().open_segments.clear();
        let (file, fill_to) = carry_out(dir, &shared.config, &cut, stop).await?;
        if stop == CutStop::AfterFrame {
            return Ok(());
        }
        adopt(shared, &cut, file, fill_to).await
    }
}

/// Finds where `to` falls: the frame holding it in its segment.
async fn plan(log: &Log, to: u64) -> Result<Cut> {
    let shared = &log.shared;
    let (base, path, file) = {
        let s = shared.state.borrow();
        let (&base, seg) = s.segments.range(..=to).next_back().expect("to is at or past the start");
        let tail = base == s.reserve_base_of_tail();
        (base, seg.path.clone(), tail.then(|| s.tail_file.clone()))
    };
    let file = match file {
        Some(f) => f,
        None => Rc::new(
            glommio::io::BufferedFile::open(&path)
                .await
                .map_err(|e| Error::io("open segment", &path, gio(e)))?,
        ),
    };
    log.ensure_index(base, &path, &file).await?;
    let (mut at, mut position, data_end) = {
        let s = shared.state.borrow();
        let seg = &s.segments[&base];
        let index = seg.index.as_ref().expect("indexed");
        let i = index.partition_point(|&(o, _)| o <= to);
        let (at, position) = if i == 0 {
            (base, HEADER_BYTES as u64)
        } else {
            index[i - 1]
        };
        (at, position, seg.data_end.expect("known once indexed"))
    };
    let limits = shared.config.limits();
    let buf = read_exact(&file, &path, position, (data_end - position) as usize).await?;
    let mut pos = 0usize;
    loop {
        if at == to {
            return Ok(Cut {
                to,
                base,
                position,
                frame: Vec::new(),
            });
        }
        let frame = match format::decode_frame(&buf[pos..], at, limits.body_bytes_max, limits.record_bytes_max) {
            Ok(Some(frame)) => frame,
            other => return Err(super::corrupt(&path, at, position, other.err())),
        };
        if frame.end_offset() > to {
            let mut shorter = FrameBuilder::new(at, frame.bytes(), frame.epoch);
            for (offset, payload) in frame.records() {
                if offset < to {
                    shorter.push(payload);
                }
            }
            return Ok(Cut {
                to,
                base,
                position,
                frame: shorter.finish(),
            });
        }
        pos += frame.bytes();
        position += frame.bytes() as u64;
        at = frame.end_offset();
    }
}

/// Deletes the segments after the cut one, writes the shorter frame and
/// zeroes the rest of the segment, then removes the redo record. Returns
/// the segment's file and how far it is pre-written. Idempotent: a redo
/// found at open runs it again.
async fn carry_out(
    dir: &Path,
    config: &LogConfig,
    cut: &Cut,
    stop: CutStop,
) -> Result<(glommio::io::BufferedFile, u64)> {
    let mut later = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list log directory", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list log directory", dir, e))?;
        if let Some(base) = entry.file_name().to_str().and_then(super::parse_segment_name) {
            if base > cut.base {
                later.push(base);
            }
        }
    }
    // Newest first: a crash midway leaves a log that ends earlier, never
    // one with a hole.
    later.sort_unstable_by(|a, b| b.cmp(a));
    for base in later {
        let path = segment_path(dir, base);
        std::fs::remove_file(&path).map_err(|e| Error::io("remove truncated segment", &path, e))?;
    }
    sync_dir(dir)?;
    let path = segment_path(dir, cut.base);
    let file = open_rw(&path, false, config.sync).await?;
    if !cut.frame.is_empty() {
        write_all(&file, &path, cut.frame.clone(), cut.position).await?;
    }
    if stop == CutStop::AfterFrame {
        file.fdatasync()
            .await
            .map_err(|e| Error::io("sync segment", &path, gio(e)))?;
        return Ok((file, 0));
    }
    let end = cut.position + cut.frame.len() as u64;
    file.truncate(end)
        .await
        .map_err(|e| Error::io("truncate segment", &path, gio(e)))?;
    let fill_to = (end + config.prewrite_bytes).min(config.segment_bytes_max.max(end));
    zero_fill(&file, &path, end, fill_to).await?;
    file.fdatasync()
        .await
        .map_err(|e| Error::io("sync segment", &path, gio(e)))?;
    let redo = dir.join(REDO);
    std::fs::remove_file(&redo).map_err(|e| Error::io("remove truncation redo record", &redo, e))?;
    sync_dir(dir)?;
    Ok((file, fill_to))
}

/// The in-memory state after a cut: the cut segment is the tail, ending
/// at `to`.
async fn adopt(shared: &Rc<Shared>, cut: &Cut, file: glommio::io::BufferedFile, fill_to: u64) -> Result<()> {
    let path = segment_path(&shared.dir, cut.base);
    let end = cut.position + cut.frame.len() as u64;
    let bytes = read_exact(&file, &path, 0, end as usize).await?;
    let scan = format::scan(
        &bytes[HEADER_BYTES..],
        cut.base,
        shared.config.limits(),
        shared.config.index_interval_bytes,
    );
    if scan.end_offset != cut.to || (HEADER_BYTES + scan.end_position) as u64 != end {
        return Err(Error::Corrupt {
            path,
            offset: scan.end_offset,
            position: (HEADER_BYTES + scan.end_position) as u64,
            reason: format!("after cutting the log at {} the segment reads differently", cut.to),
        });
    }
    let interval = shared.config.index_interval_bytes;
    let mut s = shared.state.borrow_mut();
    s.segments.retain(|&base, _| base <= cut.base);
    let seg = s.segments.get_mut(&cut.base).expect("the cut segment is listed");
    seg.end_offset = cut.to;
    seg.data_end = Some(end);
    seg.index = Some(
        scan.index
            .iter()
            .map(|&(o, p)| (o, (HEADER_BYTES + p) as u64))
            .collect(),
    );
    s.next_index_position = scan
        .index
        .last()
        .map_or(0, |&(_, p)| (HEADER_BYTES + p + interval) as u64);
    s.tail_file = Rc::new(file);
    s.prewritten_to = fill_to;
    s.next_offset = cut.to;
    s.durable_end = cut.to;
    s.synced_end = s.synced_end.min(cut.to);
    s.reserve_base = cut.base;
    s.reserve_position = end;
    Ok(())
}

/// Completes a cut a crash interrupted (at open, before the segments are
/// read). A leftover temporary record never became the redo record: the
/// cut never started.
pub(super) async fn redo_at_open(dir: &Path, config: &LogConfig) -> Result<Option<u64>> {
    let tmp = dir.join(REDO_TMP);
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(|e| Error::io("remove truncation redo record", &tmp, e))?;
    }
    let redo = dir.join(REDO);
    let bytes = match std::fs::read(&redo) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read truncation redo record", &redo, e)),
    };
    let cut = Cut::decode(&bytes).map_err(|why| Error::Corrupt {
        path: redo.clone(),
        offset: 0,
        position: 0,
        reason: format!("{why}; it was written whole before the cut began, so this is damage"),
    })?;
    if !segment_path(dir, cut.base).exists() {
        return Err(Error::Corrupt {
            path: redo,
            offset: cut.to,
            position: cut.position,
            reason: format!("the segment {} the interrupted cut names is missing", cut.base),
        });
    }
    carry_out(dir, config, &cut, CutStop::Never).await?;
    Ok(Some(cut.to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redo_record_reads_back_and_refuses_damage() {
        let cut = Cut {
            to: 17,
            base: 12,
            position: 4096,
            frame: vec![1, 2, 3, 4, 5],
        };
        let bytes = cut.encode();
        assert_eq!(Cut::decode(&bytes), Ok(cut));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Cut::decode(&bad).is_err(), "byte {i} flipped");
        }
        assert!(Cut::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
