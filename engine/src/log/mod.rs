//! A segmented, append-only, durable log: one per depot partition, and the
//! write-ahead log of every PState store.
//!
//! Records get consecutive offsets. [`Log::append`] returns only once the
//! record is durable: appends queue into a bounded buffer, one flusher task
//! writes everything queued in one durable write (group commit), then
//! acknowledges the whole group. While one write runs, the next group fills.
//! All I/O goes through glommio (io_uring). Segment files are opened with
//! `O_DSYNC`, so a write completes only once its data (and any metadata
//! needed to read it back) is durable: one io_uring operation per group
//! instead of a write and a separate `fdatasync`, which measured lower and
//! steadier latency for single appends.
//!
//! Segments are named by their base offset (`00000000000000000042.log`) and
//! pre-written with zeros ahead of the writer: a sync of a pre-written file
//! changes no metadata and is markedly cheaper than a sync of a growing one.
//! The zero fill also marks the end of the log (see [`mod@format`]).
//!
//! Recovery ([`Log::open`]) scans the last segment and keeps the good
//! frames. A bad frame with nothing intact after it is a torn tail (only the
//! last group write can be torn, and it was never acknowledged): it is
//! zeroed. A bad frame followed by an intact one is damage to acknowledged
//! records: the open fails with [`Error::Corrupt`] naming the segment and
//! offset, and nothing is changed. Closed segments are verified as they
//! are read: a bad frame there is [`Error::Corrupt`] too, never skipped.
//!
//! A failed write or sync poisons the log: every waiting and later append
//! fails, because nothing written after the failure can be proven durable.
//! The log then heals itself (a full device that has room again): with
//! backoff, the flusher cuts the tail segment back to its durable end,
//! writes a fresh zero fill through a newly opened file, and takes
//! appends again. Each poisoning starts a new writer *generation*: records
//! queued under an earlier one never count as durable, even once later
//! records take their offsets ([`Log::wait_enqueued`]).

pub mod format;
mod truncate;

pub use self::truncate::CutStop;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{BufferedFile, OpenOptions};

use self::format::{FrameBuilder, FrameError, Limits, ScanStop, FRAME_HEAD_BYTES, HEADER_BYTES};
use crate::error::{gio, Error, Result};
use crate::sync::Waiters;

/// Configuration of one log. Every size has a bound.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A segment is closed once the next record would take it past this
    /// size. Default 64 MiB.
    pub segment_bytes_max: u64,
    /// Largest record payload accepted. Default 1 MiB.
    pub record_bytes_max: u32,
    /// Bytes of appended records queued and not yet durable, beyond which
    /// appenders wait (back-pressure). Default 8 MiB.
    pub pending_bytes_max: usize,
    /// Largest single write issued by the flusher. Default 1 MiB.
    pub write_bytes_max: usize,
    /// Zeros written ahead of the writer. Default 4 MiB.
    pub prewrite_bytes: u64,
    /// A group write at least this large grows the file itself instead of
    /// extending the zero fill (filling would write its bytes twice, and a
    /// large write spreads the cost of the size change). Default 64 KiB.
    pub prewrite_skip_bytes: u64,
    /// One sparse index entry per this many bytes of a segment. Default 16 KiB.
    pub index_interval_bytes: usize,
    /// Keep at most this many records; older whole segments are deleted.
    /// Default: keep everything.
    pub entries_max: Option<u64>,
    /// Whether a record is durable before it is acknowledged (default).
    /// Without it the log is a materialization of another, durable log
    /// (a depot partition rebuilt from its task group's log): writes go to
    /// the page cache, [`Log::sync`] makes them durable on demand, a
    /// segment is synced when it is closed, and recovery cuts the tail
    /// segment at its first bad frame (unsynced pages reach the disk in any
    /// order), leaving the owner to write the rest again.
    pub sync: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 64 << 20,
            record_bytes_max: 1 << 20,
            pending_bytes_max: 8 << 20,
            write_bytes_max: 1 << 20,
            prewrite_bytes: 4 << 20,
            prewrite_skip_bytes: 64 << 10,
            index_interval_bytes: 16 << 10,
            entries_max: None,
            sync: true,
        }
    }
}

impl LogConfig {
    /// Checks the configuration, naming the first bad key.
    /// The limits frames are checked against when read: none beyond the
    /// file. The configured limits gate new appends only; a frame written
    /// under larger limits is intact data and stays readable (recovery must
    /// never cut it as if it were torn). Reads never allocate more than the
    /// segment's data, whatever a length field says.
    fn limits(&self) -> Limits {
        Limits {
            body_bytes_max: u32::MAX,
            record_bytes_max: u32::MAX,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let frame_max = format::frame_bytes([self.record_bytes_max as usize]) as u64;
        if self.segment_bytes_max < HEADER_BYTES as u64 + frame_max {
            return Err(Error::Config {
                key: "segment_bytes_max",
                value: self.segment_bytes_max.to_string(),
                reason: "must hold the header and one record of record_bytes_max",
            });
        }
        if (self.pending_bytes_max as u64) < frame_max {
            return Err(Error::Config {
                key: "pending_bytes_max",
                value: self.pending_bytes_max.to_string(),
                reason: "must hold one record of record_bytes_max",
            });
        }
        if self.write_bytes_max == 0 {
            return Err(Error::Config {
                key: "write_bytes_max",
                value: "0".into(),
                reason: "must be positive",
            });
        }
        if self.index_interval_bytes == 0 {
            return Err(Error::Config {
                key: "index_interval_bytes",
                value: "0".into(),
                reason: "must be positive",
            });
        }
        if self.entries_max == Some(0) {
            return Err(Error::Config {
                key: "entries_max",
                value: "0".into(),
                reason: "must be positive when set",
            });
        }
        Ok(())
    }
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    /// The epoch the record was written in (see [`Log::set_epoch`]).
    pub epoch: u32,
    pub payload: Vec<u8>,
}

/// What recovery found when the log was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes of a torn or corrupt tail that were zeroed.
    pub truncated_bytes: u64,
    /// Why the tail was cut, if it was.
    pub reason: Option<String>,
    /// A segment file whose creation never completed and was removed.
    pub removed_incomplete_segment: Option<PathBuf>,
    /// A cut of the tail ([`Log::truncate`]) a crash interrupted was
    /// completed: the log ends at this offset.
    pub completed_truncation: Option<u64>,
}

/// An append-only log on one task thread. Cheap to clone; all clones share
/// the same log. Not `Send`: a log belongs to one task thread.
#[derive(Debug, Clone)]
pub struct Log {
    shared: Rc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    config: LogConfig,
    state: RefCell<State>,
    /// Woken when `durable_end` advances or the log is poisoned or closed.
    durable: Waiters,
    /// Woken when pending bytes shrink.
    space: Waiters,
    /// Woken when there is something to flush, or on close.
    work: Waiters,
}

#[derive(Debug)]
struct State {
    /// Every segment by base offset; the last one is the tail.
    segments: BTreeMap<u64, Segment>,
    /// Closed segments kept open for reads, oldest first (at most
    /// `OPEN_SEGMENTS_MAX`).
    open_segments: VecDeque<(u64, Rc<BufferedFile>)>,
    /// The tail segment's file, open for writing.
    tail_file: Rc<BufferedFile>,
    /// File position up to which the tail is pre-written with zeros.
    prewritten_to: u64,
    /// Offset the next append gets.
    next_offset: u64,
    /// Segment base and file position the next record will be written to.
    reserve_base: u64,
    reserve_position: u64,
    /// The next frame starting at or past this position gets an index entry.
    next_index_position: u64,
    /// Encoded frames not yet written, in order.
    pending: VecDeque<Chunk>,
    pending_bytes: usize,
    /// Every offset below this is durable.
    durable_end: u64,
    /// Offset of the first record still kept.
    start_offset: u64,
    poisoned: Option<String>,
    /// Bumped at each poisoning: queued records of an older generation
    /// were lost with the failed write.
    generation: u64,
    /// Why the last poisoning happened (for records of old generations).
    last_failure: Option<String>,
    /// `close` started: no new appends.
    closing: bool,
    /// [`Log::truncate`] is cutting the tail: no new appends.
    truncating: bool,
    closed: bool,
    flusher_running: bool,
    /// The epoch new records are written in.
    epoch: u32,
    /// Unsynced logs: every offset below this is durable on disk (below
    /// `durable_end`, which counts written records).
    synced_end: u64,
}

/// One frame being filled, bound for a position in a segment.
#[derive(Debug)]
struct Chunk {
    segment_base: u64,
    /// The first frame of a segment that does not exist yet.
    new_segment: bool,
    position: u64,
    frame: FrameBuilder,
    /// Whether the sparse index gets an entry for this frame.
    indexed: bool,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    base: u64,
    /// Offset after the last record (for the tail: the durable end).
    end_offset: u64,
    /// File position after the last frame, once known.
    data_end: Option<u64>,
    /// Sparse `(offset, file position)` index, once built.
    index: Option<Vec<(u64, u64)>>,
}

/// Closed segments a log keeps open for reading.
const OPEN_SEGMENTS_MAX: usize = 8;

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The open flags of a segment: `O_DSYNC` for a synced log.
fn sync_flags(sync: bool) -> libc::c_int {
    if sync {
        libc::O_DSYNC
    } else {
        0
    }
}

async fn open_rw(path: &Path, create: bool, sync: bool) -> Result<BufferedFile> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(sync_flags(sync))
        .buffered_open(path)
        .await
        .map_err(|e| Error::io("open segment", path, gio(e)))
}

/// Writes all of `buf` at `position`. A short write (a full device) is an
/// error: the log is then poisoned rather than retried, since the buffer
/// was handed to the kernel and is not kept for a second attempt.
async fn write_all(file: &BufferedFile, path: &Path, buf: Vec<u8>, position: u64) -> Result<()> {
    let len = buf.len();
    let written = file
        .write_at(buf, position)
        .await
        .map_err(|e| Error::io("write segment", path, gio(e)))?;
    if written < len {
        return Err(Error::io(
            "write segment",
            path,
            std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write ({written} of {len} bytes at {position}); the device may be full"),
            ),
        ));
    }
    Ok(())
}

async fn read_exact(file: &BufferedFile, path: &Path, position: u64, len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let got = file
            .read_at(position + out.len() as u64, len - out.len())
            .await
            .map_err(|e| Error::io("read segment", path, gio(e)))?;
        if got.is_empty() {
            break;
        }
        out.extend_from_slice(&got);
    }
    Ok(out)
}

/// Makes `[from, to)` of a segment read as zeros ahead of the writer,
/// without putting zeros in the page cache: the range is allocated
/// (`fallocate`), or, where the file system cannot, written with zeros a
/// page at a time. Zeros written in one large write sit in large page-cache
/// folios, and every small synced record written into such a folio later
/// writes the whole folio back (2 MiB per 100-byte append, measured on
/// ext4 here).
async fn zero_fill(file: &BufferedFile, path: &Path, from: u64, to: u64) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    if file.pre_allocate(to, false).await.is_ok() {
        return Ok(());
    }
    let mut at = from;
    while at < to {
        let page_end = ((at / 4096) + 1) * 4096;
        let end = page_end.min(to);
        write_all(file, path, vec![0u8; (end - at) as usize], at).await?;
        at = end;
    }
    Ok(())
}

/// Drops a file's clean pages from the page cache (after recovery read it
/// whole, so the writer's pages start small again; see [`zero_fill`]).
fn drop_cached(file: &BufferedFile) {
    use std::os::fd::AsRawFd;
    // Advice only: failure changes nothing but speed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

/// Creates a segment: header plus pre-written zeros, synced, and the
/// directory synced, before any record may target it.
async fn create_segment(dir: &Path, base: u64, prewrite: u64, sync: bool) -> Result<(BufferedFile, u64)> {
    let path = segment_path(dir, base);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(sync_flags(sync))
        .buffered_open(&path)
        .await
        .map_err(|e| Error::io("create segment", &path, gio(e)))?;
    let size = HEADER_BYTES as u64 + prewrite;
    write_all(&file, &path, format::encode_header(base).to_vec(), 0).await?;
    zero_fill(&file, &path, HEADER_BYTES as u64, size).await?;
    file.fdatasync()
        .await
        .map_err(|e| Error::io("sync segment", &path, gio(e)))?;
    sync_dir(dir)?;
    Ok((file, size))
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering a torn tail.
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<(Log, Recovery)> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create log directory", &dir, e))?;
        let mut recovery = Recovery {
            completed_truncation: truncate::redo_at_open(&dir, &config).await?,
            ..Recovery::default()
        };
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io("list log directory", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("list log directory", &dir, e))?;
            if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        // Closed cleanly last time: no write was in flight, so nothing can
        // be torn. The marker goes before anything is written again.
        // It is removed only once the tail was accepted (below), so an open
        // that fails or is killed midway leaves it for the next one.
        let marker = dir.join(CLEAN_MARKER);
        let closed_cleanly = marker.exists();

        // The last segment's creation may have been cut short by a crash:
        // its header and zero fill are synced before any record targets it,
        // so a bad header over a body of zeros held no record and is
        // removed. A bad header in front of data is damage, not an
        // interrupted creation: refuse to open rather than drop records.
        while let Some(&last) = bases.last() {
            let path = segment_path(&dir, last);
            let bytes = std::fs::read(&path).map_err(|e| Error::io("read segment", &path, e))?;
            let header = format::decode_header(&bytes);
            if header == Ok(last) {
                break;
            }
            if bytes.iter().skip(HEADER_BYTES).any(|&b| b != 0) {
                let reason = match header {
                    Ok(_) => "header base offset differs from the file name".to_string(),
                    Err(FrameError::Corrupt(why)) => why.to_string(),
                    Err(FrameError::Truncated { .. }) => "header cut short".to_string(),
                };
                return Err(Error::Corrupt {
                    path,
                    offset: last,
                    position: 0,
                    reason: format!(
                        "{reason}, and the segment holds data; restore it or move it away to drop its records"
                    ),
                });
            }
            std::fs::remove_file(&path).map_err(|e| Error::io("remove incomplete segment", &path, e))?;
            sync_dir(&dir)?;
            recovery.removed_incomplete_segment = Some(path);
            bases.pop();
        }

        let mut segments = BTreeMap::new();
        for (i, &base) in bases.iter().enumerate() {
            let path = segment_path(&dir, base);
            let end_offset = bases.get(i + 1).copied().unwrap_or(base);
            segments.insert(
                base,
                Segment {
                    path,
                    base,
                    end_offset,
                    data_end: None,
                    index: None,
                },
            );
        }

        let mut next_index_position = 0;
        let (tail_file, prewritten_to, tail_base) = match bases.last() {
            None => {
                let (file, size) = create_segment(&dir, 0, config.prewrite_bytes, config.sync).await?;
                segments.insert(
                    0,
                    Segment {
                        path: segment_path(&dir, 0),
                        base: 0,
                        end_offset: 0,
                        data_end: Some(HEADER_BYTES as u64),
                        index: Some(Vec::new()),
                    },
                );
                (file, size, 0)
            }
            Some(&base) => {
                let path = segment_path(&dir, base);
                let file = open_rw(&path, false, config.sync).await?;
                let size = file
                    .file_size()
                    .await
                    .map_err(|e| Error::io("stat segment", &path, gio(e)))?;
                let bytes = read_exact(&file, &path, 0, size as usize).await?;
                let scan = format::scan(
                    &bytes[HEADER_BYTES..],
                    base,
                    config.limits(),
                    config.index_interval_bytes,
                );
                let data_end = (HEADER_BYTES + scan.end_position) as u64;
                if let ScanStop::Bad(e) = scan.stop {
                    // Only the last write can be torn: intact records after
                    // the bad frame mean it is damage to acknowledged data.
                    // Refuse to open and change nothing.
                    let body = &bytes[HEADER_BYTES..];
                    let why = match e {
                        FrameError::Truncated { .. } => "frame runs past the end of the file",
                        FrameError::Corrupt(why) => why,
                    };
                    if closed_cleanly {
                        // The marker stays: a retried open refuses again
                        // rather than cutting.
                        return Err(Error::Corrupt {
                            path,
                            offset: scan.end_offset,
                            position: data_end,
                            reason: format!(
                                "{why}, in a log that was closed cleanly (no write was in flight, so this is \
                                 damage, not a torn write); nothing was changed: restore the file from a replica \
                                 or a backup"
                            ),
                        });
                    }
                    // An unsynced log's pages reach the disk in any order: a
                    // hole with intact frames after it is a crash, and its
                    // owner writes the cut records again.
                    let intact = if config.sync {
                        format::find_intact_frame(body, scan.end_position, scan.end_offset, config.limits())
                    } else {
                        None
                    };
                    if let Some((pos, offset)) = intact {
                        return Err(Error::Corrupt {
                            path,
                            offset: scan.end_offset,
                            position: data_end,
                            reason: format!(
                                "{why}, and intact records follow it (offset {offset} at byte {}), so this is \
                                 damage, not a torn write; nothing was changed: restore the file from a replica \
                                 or a backup",
                                HEADER_BYTES + pos
                            ),
                        });
                    }
                    // Zero everything after the last good frame, so stale
                    // bytes there can never be read as frames later.
                    let garbage = size - data_end;
                    file.truncate(data_end)
                        .await
                        .map_err(|e| Error::io("truncate segment", &path, gio(e)))?;
                    zero_fill(&file, &path, data_end, size).await?;
                    file.fdatasync()
                        .await
                        .map_err(|e| Error::io("sync segment", &path, gio(e)))?;
                    recovery.truncated_bytes = garbage;
                    recovery.reason = Some(match e {
                        FrameError::Truncated { .. } => format!("torn frame at offset {}", scan.end_offset),
                        FrameError::Corrupt(why) => format!("{why} at offset {}", scan.end_offset),
                    });
                }
                let seg = segments.get_mut(&base).expect("tail segment is listed");
                seg.end_offset = scan.end_offset;
                seg.data_end = Some(data_end);
                next_index_position = scan
                    .index
                    .last()
                    .map_or(0, |&(_, p)| (HEADER_BYTES + p + config.index_interval_bytes) as u64);
                seg.index = Some(
                    scan.index
                        .into_iter()
                        .map(|(o, p)| (o, (HEADER_BYTES + p) as u64))
                        .collect(),
                );
                drop_cached(&file);
                (file, size, base)
            }
        };

        // The tail is accepted: from here on writes may come, and a crash
        // may tear one, so the log is no longer "closed cleanly".
        if closed_cleanly {
            std::fs::remove_file(&marker).map_err(|e| Error::io("remove clean-close marker", &marker, e))?;
            sync_dir(&dir)?;
        }
        let tail = &segments[&tail_base];
        let end = tail.end_offset;
        let reserve_position = tail.data_end.expect("tail data end is known");
        let start_offset = *segments.keys().next().expect("at least one segment");
        let state = State {
            segments,
            open_segments: VecDeque::new(),
            tail_file: Rc::new(tail_file),
            prewritten_to,
            next_offset: end,
            reserve_base: tail_base,
            reserve_position,
            next_index_position,
            pending: VecDeque::new(),
            pending_bytes: 0,
            durable_end: end,
            start_offset,
            poisoned: None,
            generation: 0,
            last_failure: None,
            closing: false,
            truncating: false,
            closed: false,
            flusher_running: true,
            epoch: 0,
            synced_end: end,
        };
        let log = Log {
            shared: Rc::new(Shared {
                dir,
                config,
                state: RefCell::new(state),
                durable: Waiters::default(),
                space: Waiters::default(),
                work: Waiters::default(),
            }),
        };
        glommio::spawn_local(flusher(log.shared.clone())).detach();
        Ok((log, recovery))
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Offset of the oldest record kept.
    pub fn start_offset(&self) -> u64 {
        self.shared.state.borrow().start_offset
    }

    /// Offset after the last durable record; reads see records below it.
    pub fn end_offset(&self) -> u64 {
        self.shared.state.borrow().durable_end
    }

    /// Appends one record and returns its offset once it is durable.
    pub async fn append(&self, payload: &[u8]) -> Result<u64> {
        let range = self.append_batch(std::iter::once(payload)).await?;
        Ok(range.start)
    }

    /// Appends records in order and returns their offsets once all of them
    /// are durable. Every record is checked against the limits before any is
    /// queued, so a refused batch appends nothing.
    pub async fn append_batch<'p>(&self, payloads: impl IntoIterator<Item = &'p [u8]> + Clone) -> Result<Range<u64>> {
        let queued = self.enqueue_batch(payloads).await?;
        self.wait_enqueued(&queued).await?;
        Ok(queued.range)
    }

    /// Queues records and returns their offsets without waiting for
    /// durability; [`Log::wait_enqueued`] waits for it. Waits only for room
    /// in the pending buffer.
    pub async fn enqueue_batch<'p>(&self, payloads: impl IntoIterator<Item = &'p [u8]> + Clone) -> Result<Enqueued> {
        let config = &self.shared.config;
        let mut total = 0usize;
        for p in payloads.clone() {
            Error::check_limit("record", "record_bytes_max", p.len(), config.record_bytes_max as usize)?;
            total += format::record_bytes(p.len());
        }
        self.wait_space(total).await?;
        let mut s = self.shared.state.borrow_mut();
        self.check_usable(&s)?;
        let start = s.next_offset;
        for p in payloads {
            s.reserve(config, p);
        }
        Ok(self.enqueued(s, start))
    }

    /// Queues one record of `len` bytes that `fill` writes in place once
    /// the record has its offset, so a record can name its own place in
    /// the log's order: nothing else is queued between the offset and the
    /// bytes. `fill` gets the buffer and a [`Placed`]; it must not use
    /// this log.
    pub async fn enqueue_with(&self, len: usize, fill: impl FnOnce(&mut [u8], Placed)) -> Result<Enqueued> {
        self.enqueue_gated(len, None, fill).await
    }

    /// [`Log::enqueue_with`] that asks `gate` first, at the moment the
    /// record would take its offset (nothing else runs in between): the
    /// gate gets the placement (offset, writer generation) and answers the
    /// epoch to write the record in, or refuses it (nothing is queued). It
    /// must not use this log. Replication's leader check.
    pub async fn enqueue_gated(
        &self,
        len: usize,
        gate: Option<&dyn Fn(Placed) -> Result<u32>>,
        fill: impl FnOnce(&mut [u8], Placed),
    ) -> Result<Enqueued> {
        let config = &self.shared.config;
        Error::check_limit("record", "record_bytes_max", len, config.record_bytes_max as usize)?;
        self.wait_space(format::record_bytes(len)).await?;
        let mut s = self.shared.state.borrow_mut();
        self.check_usable(&s)?;
        let start = s.next_offset;
        let placed = Placed {
            offset: start,
            generation: s.generation,
            durable_end: s.durable_end,
        };
        if let Some(gate) = gate {
            s.epoch = gate(placed)?;
        }
        s.reserve_with(config, len, |b| fill(b, placed));
        Ok(self.enqueued(s, start))
    }

    /// Queues one record at once, without waiting for room in the pending
    /// buffer: for a log whose writer bounds what it queues itself (a
    /// materialization fed from another log; see [`Log::wait_room`]).
    /// Returns its offset; [`Log::wait_durable`] waits for it.
    pub fn push_now(&self, payload: &[u8]) -> Result<u64> {
        let config = &self.shared.config;
        Error::check_limit(
            "record",
            "record_bytes_max",
            payload.len(),
            config.record_bytes_max as usize,
        )?;
        let mut s = self.shared.state.borrow_mut();
        self.check_usable(&s)?;
        let offset = s.next_offset;
        s.reserve(config, payload);
        drop(s);
        self.shared.work.wake_all();
        Ok(offset)
    }

    /// Waits until a record of `len` bytes fits in the pending buffer
    /// (the bound [`Log::push_now`] leaves to its caller).
    pub async fn wait_room(&self, len: usize) -> Result<()> {
        self.wait_space(format::record_bytes(len)).await?;
        self.check_usable(&self.shared.state.borrow())
    }

    /// Offset the next queued record gets.
    pub fn next_offset(&self) -> u64 {
        self.shared.state.borrow().next_offset
    }

    /// Waits for room for `records` bytes of records (plus one frame head)
    /// in the pending buffer.
    async fn wait_space(&self, records: usize) -> Result<()> {
        let config = &self.shared.config;
        // One head for the batch's frame (a segment roll may add one more;
        // the pending bound then overshoots by at most a head).
        let total = records + FRAME_HEAD_BYTES;
        Error::check_limit("batch", "pending_bytes_max", total, config.pending_bytes_max)?;
        self.shared
            .space
            .wait(|| {
                let s = self.shared.state.borrow();
                (s.poisoned.is_some() || s.closing || s.closed || s.pending_bytes + total <= config.pending_bytes_max)
                    .then_some(())
            })
            .await;
        Ok(())
    }

    /// The records reserved from `start` on, and the flusher woken.
    fn enqueued(&self, s: std::cell::RefMut<'_, State>, start: u64) -> Enqueued {
        let end = s.next_offset;
        let generation = s.generation;
        drop(s);
        self.shared.work.wake_all();
        Enqueued {
            range: start..end,
            generation,
        }
    }

    /// The epoch records queued from now on are written in.
    pub fn set_epoch(&self, epoch: u32) {
        self.shared.state.borrow_mut().epoch = epoch;
    }

    pub fn epoch(&self) -> u32 {
        self.shared.state.borrow().epoch
    }

    /// Makes every record queued so far durable and returns the offset
    /// below which all records are: for a synced log that is waiting for
    /// them; an unsynced one is synced to disk as well.
    pub async fn sync(&self) -> Result<u64> {
        let end = self.shared.state.borrow().next_offset;
        self.wait_durable(end).await?;
        if self.shared.config.sync {
            return Ok(end);
        }
        let file = self.shared.state.borrow().tail_file.clone();
        file.fdatasync()
            .await
            .map_err(|e| Error::io("sync segment", &self.shared.dir, gio(e)))?;
        let mut s = self.shared.state.borrow_mut();
        s.synced_end = s.synced_end.max(end);
        Ok(end)
    }

    /// Offset below which every record is on disk (for a synced log, the
    /// durable end).
    pub fn synced_end(&self) -> u64 {
        let s = self.shared.state.borrow();
        if self.shared.config.sync {
            s.durable_end
        } else {
            s.synced_end
        }
    }

    /// Waits until the records of `queued` are durable; fails if the write
    /// that carried them failed (they are then not in the log, whatever
    /// takes their offsets later).
    pub async fn wait_enqueued(&self, queued: &Enqueued) -> Result<()> {
        self.shared
            .durable
            .wait(|| self.durable_or_failed(queued.range.end, Some(queued.generation)))
            .await
    }

    /// `Some` once records below `end` (of writer `generation`, if given)
    /// are durable, or can never be.
    fn durable_or_failed(&self, end: u64, generation: Option<u64>) -> Option<Result<()>> {
        let s = self.shared.state.borrow();
        if generation.is_some_and(|g| g != s.generation) {
            Some(Err(self.poisoned(s.last_failure.clone().unwrap_or_default())))
        } else if s.durable_end >= end {
            Some(Ok(()))
        } else if let Some(cause) = &s.poisoned {
            Some(Err(self.poisoned(cause.clone())))
        } else if !s.flusher_running {
            // The flusher drains everything queued before it stops, so this
            // only happens for offsets never enqueued.
            Some(Err(Error::Closed(format!(
                "log {} is closed",
                self.shared.dir.display()
            ))))
        } else {
            None
        }
    }

    fn poisoned(&self, cause: String) -> Error {
        Error::Poisoned {
            what: format!("log {}", self.shared.dir.display()),
            cause,
        }
    }

    /// The writer generation: it changes each time a failed write poisons
    /// the log (see [`Log::wait_enqueued`]).
    pub fn generation(&self) -> u64 {
        self.shared.state.borrow().generation
    }

    /// Waits until the log holds durable records below `end` (whichever
    /// records those are: a reader's wait; an appender waits for its own
    /// records with [`Log::wait_enqueued`]).
    pub async fn wait_durable(&self, end: u64) -> Result<()> {
        self.shared.durable.wait(|| self.durable_or_failed(end, None)).await
    }

    /// The error for a read of `offset` after trimming removed it.
    fn trimmed(&self, offset: u64) -> Error {
        let s = self.shared.state.borrow();
        Error::OffsetOutOfRange {
            requested: offset,
            start: s.start_offset,
            end: s.durable_end,
        }
    }

    fn check_usable(&self, s: &State) -> Result<()> {
        if let Some(cause) = &s.poisoned {
            return Err(self.poisoned(cause.clone()));
        }
        if s.closing || s.closed {
            return Err(Error::Closed(format!("log {} is closed", self.shared.dir.display())));
        }
        if s.truncating {
            return Err(Error::Closed(format!(
                "log {} is cutting its tail; append once it is done",
                self.shared.dir.display()
            )));
        }
        Ok(())
    }

    /// Reads durable records with offsets in `[start, end)`, stopping once
    /// `bytes_max` payload bytes are collected (at least one record is
    /// returned when any is in range, however large). `end` is clamped to
    /// the durable end.
    pub async fn read(&self, start: u64, end: u64, bytes_max: usize) -> Result<Vec<Record>> {
        let (log_start, durable_end) = {
            let s = self.shared.state.borrow();
            (s.start_offset, s.durable_end)
        };
        if start < log_start || start > durable_end {
            return Err(Error::OffsetOutOfRange {
                requested: start,
                start: log_start,
                end: durable_end,
            });
        }
        let end = end.min(durable_end);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut offset = start;
        while offset < end && (out.is_empty() || bytes < bytes_max) {
            let before = out.len();
            self.read_segment(offset, end, bytes_max, &mut bytes, &mut out).await?;
            if out.len() == before {
                // Nothing more in range: never loop without progress.
                break;
            }
            offset = out.last().map_or(offset, |r| r.offset + 1);
        }
        Ok(out)
    }

    /// Reads from the segment holding `offset`.
    async fn read_segment(
        &self,
        offset: u64,
        end: u64,
        bytes_max: usize,
        bytes: &mut usize,
        out: &mut Vec<Record>,
    ) -> Result<()> {
        let config = &self.shared.config;
        let (base, path, file) = {
            let s = self.shared.state.borrow();
            let Some((&base, seg)) = s
                .segments
                .range(..=offset)
                .next_back()
                .filter(|_| offset >= s.start_offset)
            else {
                return Err(self.trimmed(offset));
            };
            let file = if base == s.reserve_base_of_tail() {
                Some(s.tail_file.clone())
            } else {
                s.open_segments.iter().find(|(b, _)| *b == base).map(|(_, f)| f.clone())
            };
            (base, seg.path.clone(), file)
        };
        let file = match file {
            Some(f) => f,
            None => {
                let f = match BufferedFile::open(&path).await {
                    Ok(f) => Rc::new(f),
                    // Trimmed between the lookup above and the open.
                    Err(_) if !self.shared.state.borrow().segments.contains_key(&base) => {
                        return Err(self.trimmed(offset));
                    }
                    Err(e) => return Err(Error::io("open segment", &path, gio(e))),
                };
                // Keep the most recently opened closed segments open, so
                // a consumer reading through a segment opens it once.
                let mut s = self.shared.state.borrow_mut();
                if !s.open_segments.iter().any(|(b, _)| *b == base) {
                    if s.open_segments.len() >= OPEN_SEGMENTS_MAX {
                        s.open_segments.pop_front();
                    }
                    s.open_segments.push_back((base, f.clone()));
                }
                f
            }
        };
        self.ensure_index(base, &path, &file).await?;
        let (mut position, mut at, data_end, seg_end) = {
            let s = self.shared.state.borrow();
            let Some(seg) = s.segments.get(&base) else {
                return Err(self.trimmed(offset));
            };
            let index = seg.index.as_ref().expect("index was just built");
            let i = index.partition_point(|&(o, _)| o <= offset);
            let (at, position) = if i == 0 {
                (base, HEADER_BYTES as u64)
            } else {
                index[i - 1]
            };
            (
                position,
                at,
                seg.data_end.expect("data end known once indexed"),
                seg.end_offset,
            )
        };
        let end = end.min(seg_end);
        let limits = config.limits();
        let window = bytes_max.saturating_add(FRAME_HEAD_BYTES).clamp(64 << 10, 4 << 20);
        while at < end && position < data_end {
            let len = (data_end - position).min(window as u64) as usize;
            let buf = read_exact(&file, &path, position, len).await?;
            let mut pos = 0usize;
            loop {
                if at >= end || (!out.is_empty() && *bytes >= bytes_max) {
                    return Ok(());
                }
                match format::decode_frame(&buf[pos..], at, limits.body_bytes_max, limits.record_bytes_max) {
                    Ok(Some(frame)) => {
                        if take_records(&frame, offset..end, bytes_max, bytes, out) {
                            return Ok(());
                        }
                        pos += frame.bytes();
                        at = frame.end_offset();
                    }
                    Err(FrameError::Truncated { needed }) if position + pos as u64 + (needed as u64) <= data_end => {
                        if pos == 0 {
                            // A frame larger than the window: read it whole.
                            let whole = read_exact(&file, &path, position, needed).await?;
                            match format::decode_frame(&whole, at, limits.body_bytes_max, limits.record_bytes_max) {
                                Ok(Some(frame)) => {
                                    if take_records(&frame, offset..end, bytes_max, bytes, out) {
                                        return Ok(());
                                    }
                                    pos = frame.bytes();
                                    at = frame.end_offset();
                                }
                                other => return Err(corrupt(&path, at, position, other.err())),
                            }
                        }
                        break;
                    }
                    Ok(None) | Err(_) => {
                        return Err(corrupt(
                            &path,
                            at,
                            position + pos as u64,
                            format::decode_frame(&buf[pos..], at, limits.body_bytes_max, limits.record_bytes_max).err(),
                        ));
                    }
                }
            }
            position += pos as u64;
        }
        Ok(())
    }

    /// Builds the sparse index of a closed segment by scanning it once,
    /// verifying every frame.
    async fn ensure_index(&self, base: u64, path: &Path, file: &BufferedFile) -> Result<()> {
        let expected_end = {
            let s = self.shared.state.borrow();
            match s.segments.get(&base) {
                Some(seg) if seg.index.is_none() => seg.end_offset,
                _ => return Ok(()),
            }
        };
        let config = &self.shared.config;
        let size = file
            .file_size()
            .await
            .map_err(|e| Error::io("stat segment", path, gio(e)))?;
        let bytes = read_exact(file, path, 0, size as usize).await?;
        match format::decode_header(&bytes) {
            Ok(b) if b == base => {}
            Ok(_) => {
                return Err(corrupt(
                    path,
                    base,
                    0,
                    Some(FrameError::Corrupt("header base offset differs from the file name")),
                ))
            }
            Err(e) => return Err(corrupt(path, base, 0, Some(e))),
        }
        let scan = format::scan(
            &bytes[HEADER_BYTES..],
            base,
            config.limits(),
            config.index_interval_bytes,
        );
        if scan.end_offset != expected_end {
            let why = match scan.stop {
                ScanStop::Bad(e) => Some(e),
                ScanStop::Clean => Some(FrameError::Corrupt(
                    "segment ends before the next segment's base offset",
                )),
            };
            return Err(corrupt(
                path,
                scan.end_offset,
                (HEADER_BYTES + scan.end_position) as u64,
                why,
            ));
        }
        let mut s = self.shared.state.borrow_mut();
        if let Some(seg) = s.segments.get_mut(&base) {
            seg.data_end = Some((HEADER_BYTES + scan.end_position) as u64);
            seg.index = Some(
                scan.index
                    .into_iter()
                    .map(|(o, p)| (o, (HEADER_BYTES + p) as u64))
                    .collect(),
            );
        }
        Ok(())
    }

    /// Deletes whole closed segments whose records are all below `offset`.
    /// Returns the new start offset.
    pub fn trim_before(&self, offset: u64) -> Result<u64> {
        trim_before(&self.shared, offset)
    }

    /// Stops the flusher after everything queued is written. Appends after
    /// this fail with [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        // Refuse new appends first: everything already queued is written
        // and acknowledged; nothing queued is ever failed and then written.
        let end = {
            let mut s = self.shared.state.borrow_mut();
            s.closing = true;
            s.next_offset
        };
        self.shared.space.wake_all();
        let mut result = self.wait_durable(end).await;
        if result.is_ok() && !self.shared.config.sync {
            result = self.sync().await.map(|_| ());
        }
        self.shared.state.borrow_mut().closed = true;
        self.shared.work.wake_all();
        self.shared
            .work
            .wait(|| (!self.shared.state.borrow().flusher_running).then_some(()))
            .await;
        // Closed with everything durable and no write in flight: say so on
        // disk, so the next open takes any bad frame for damage, even in
        // the last frame (which after a crash could be a torn write).
        if result.is_ok() && self.shared.state.borrow().poisoned.is_none() {
            let marker = self.shared.dir.join(CLEAN_MARKER);
            std::fs::File::create(&marker)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("mark clean close", &marker, e))?;
            sync_dir(&self.shared.dir)?;
        }
        result
    }
}

/// The file a log leaves in its directory when it was closed cleanly; the
/// next open removes it before anything is written.
const CLEAN_MARKER: &str = "CLOSED_CLEANLY";

/// Takes the records of `frame` within `range` into `out`, counting their
/// bytes; true once the read is complete (range or byte cap reached).
fn take_records(
    frame: &format::Frame<'_>,
    range: Range<u64>,
    bytes_max: usize,
    bytes: &mut usize,
    out: &mut Vec<Record>,
) -> bool {
    for (o, payload) in frame.records() {
        if o < range.start {
            continue;
        }
        if o >= range.end || (!out.is_empty() && *bytes >= bytes_max) {
            return true;
        }
        *bytes += payload.len();
        out.push(Record {
            offset: o,
            epoch: frame.epoch,
            payload: payload.to_vec(),
        });
    }
    false
}

fn corrupt(path: &Path, offset: u64, position: u64, e: Option<FrameError>) -> Error {
    let reason = match e {
        Some(FrameError::Corrupt(why)) => why.to_string(),
        Some(FrameError::Truncated { .. }) => "frame cut short inside a closed segment".to_string(),
        None => "end of data inside the expected range".to_string(),
    };
    Error::Corrupt {
        path: path.to_path_buf(),
        offset,
        position,
        reason,
    }
}

impl State {
    fn reserve_base_of_tail(&self) -> u64 {
        *self.segments.keys().next_back().expect("at least one segment")
    }

    /// Assigns the next offset to `payload` and adds it to the frame being
    /// filled, or to a new frame (in a new segment when this one is full).
    fn reserve(&mut self, config: &LogConfig, payload: &[u8]) {
        self.reserve_with(config, payload.len(), |b| b.copy_from_slice(payload));
    }

    /// [`State::reserve`] of a record of `len` bytes that `fill` writes.
    fn reserve_with(&mut self, config: &LogConfig, len: usize, fill: impl FnOnce(&mut [u8])) {
        let record = format::record_bytes(len) as u64;
        let offset = self.next_offset;
        let fits_last = self.pending.back().is_some_and(|c| {
            c.segment_base == self.reserve_base
                && c.frame.epoch() == self.epoch
                && (c.frame.len() as u64 + record - FRAME_HEAD_BYTES as u64) <= config.write_bytes_max as u64
                && self.reserve_position + record <= config.segment_bytes_max
        });
        if fits_last {
            self.pending_bytes += record as usize;
        } else {
            let frame = FRAME_HEAD_BYTES as u64 + record;
            let roll =
                self.reserve_position + frame > config.segment_bytes_max && self.reserve_position > HEADER_BYTES as u64;
            if roll {
                self.reserve_base = offset;
                self.reserve_position = HEADER_BYTES as u64;
                self.next_index_position = 0;
            }
            let indexed = self.reserve_position >= self.next_index_position;
            if indexed {
                self.next_index_position = self.reserve_position + config.index_interval_bytes as u64;
            }
            self.pending.push_back(Chunk {
                segment_base: self.reserve_base,
                new_segment: roll,
                position: self.reserve_position,
                frame: FrameBuilder::new(
                    offset,
                    (record as usize).max(config.write_bytes_max.min(128 << 10)),
                    self.epoch,
                ),
                indexed,
            });
            self.reserve_position += FRAME_HEAD_BYTES as u64;
            self.pending_bytes += frame as usize;
        }
        let chunk = self.pending.back_mut().expect("a chunk was just ensured");
        chunk.frame.push_with(len, fill);
        self.reserve_position += record;
        self.next_offset += 1;
    }
}

/// Where [`Log::enqueue_with`] placed a record: its offset, the writer
/// generation that is to write it, and the durable end at that moment
/// (records of an older generation below it were written; the others were
/// lost with the failed write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub offset: u64,
    pub generation: u64,
    pub durable_end: u64,
}

/// Records queued by [`Log::enqueue_batch`]: their offsets, and the writer
/// generation that is to write them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub range: Range<u64>,
    generation: u64,
}

/// Backoff between attempts to heal a poisoned log.
const HEAL_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const HEAL_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The background task that writes queued frames and syncs them, and heals
/// the log after a failed write.
async fn flusher(shared: Rc<Shared>) {
    let mut backoff = HEAL_BACKOFF_MIN;
    loop {
        let run = shared
            .work
            .wait(|| {
                let s = shared.state.borrow();
                if s.poisoned.is_some() || (s.closed && s.pending.is_empty()) {
                    Some(false)
                } else {
                    (!s.pending.is_empty()).then_some(true)
                }
            })
            .await;
        if !run {
            break;
        }
        match flush_once(&shared).await {
            Ok(()) => backoff = HEAL_BACKOFF_MIN,
            Err(e) => {
                {
                    let mut s = shared.state.borrow_mut();
                    s.poisoned = Some(e.to_string());
                    s.last_failure = Some(e.to_string());
                    s.generation += 1;
                }
                shared.durable.wake_all();
                shared.space.wake_all();
                // Heal once the cause is gone, unless the log is closing.
                loop {
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(HEAL_BACKOFF_MAX);
                    let closing = {
                        let s = shared.state.borrow();
                        s.closing || s.closed
                    };
                    if closing {
                        break;
                    }
                    if heal(&shared).await.is_ok() {
                        shared.space.wake_all();
                        break;
                    }
                }
                if shared.state.borrow().poisoned.is_some() {
                    break;
                }
            }
        }
    }
    shared.state.borrow_mut().flusher_running = false;
    shared.work.wake_all();
    shared.durable.wake_all();
}

/// Makes a poisoned log usable again: removes a segment whose creation
/// failed, cuts the tail segment back to its durable end (whatever the
/// failed write left after it goes, and its blocks are freed), writes a
/// fresh zero fill through a newly opened file (this fails while the
/// device is still full), and resets the writer to the durable end.
/// Everything queued was failed when the log was poisoned.
async fn heal(shared: &Rc<Shared>) -> Result<()> {
    let config = &shared.config;
    let (base, data_end, durable_end) = {
        let s = shared.state.borrow();
        let base = s.reserve_base_of_tail();
        let tail = &s.segments[&base];
        (
            base,
            tail.data_end.expect("the tail's data end is known"),
            s.durable_end,
        )
    };
    let dir = &shared.dir;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list log directory", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list log directory", dir, e))?;
        if entry
            .file_name()
            .to_str()
            .and_then(parse_segment_name)
            .is_some_and(|b| b > base)
        {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io("remove failed segment", entry.path(), e))?;
        }
    }
    let path = segment_path(dir, base);
    let file = open_rw(&path, false, config.sync).await?;
    file.truncate(data_end)
        .await
        .map_err(|e| Error::io("truncate segment", &path, gio(e)))?;
    let fill_to = (data_end + config.prewrite_bytes).min(config.segment_bytes_max.max(data_end));
    if fill_to > data_end {
        zero_fill(&file, &path, data_end, fill_to).await?;
    }
    file.fdatasync()
        .await
        .map_err(|e| Error::io("sync segment", &path, gio(e)))?;
    sync_dir(dir)?;
    let mut s = shared.state.borrow_mut();
    s.tail_file = Rc::new(file);
    s.prewritten_to = fill_to;
    s.pending.clear();
    s.pending_bytes = 0;
    s.next_offset = durable_end;
    s.reserve_base = base;
    s.reserve_position = data_end;
    let last_indexed = s.segments[&base].index.as_ref().and_then(|i| i.last().map(|&(_, p)| p));
    s.next_index_position = last_indexed.map_or(0, |p| p + config.index_interval_bytes as u64);
    s.open_segments.retain(|(b, _)| *b != base);
    s.poisoned = None;
    Ok(())
}

/// Writes all queued chunks of the first pending segment and syncs once.
async fn flush_once(shared: &Rc<Shared>) -> Result<()> {
    let config = &shared.config;
    let chunks: Vec<Chunk> = {
        let mut s = shared.state.borrow_mut();
        let base = s.pending.front().expect("flusher runs with pending work").segment_base;
        let mut taken = Vec::new();
        while s
            .pending
            .front()
            .is_some_and(|c| c.segment_base == base && (taken.is_empty() || !c.new_segment))
        {
            taken.push(s.pending.pop_front().expect("front exists"));
        }
        taken
    };
    let base = chunks[0].segment_base;
    if chunks[0].new_segment {
        if !config.sync {
            // An unsynced log's closed segments are durable: only its tail
            // can lose pages in a crash (recovery scans the tail alone).
            let (old, written) = {
                let s = shared.state.borrow();
                (s.tail_file.clone(), s.durable_end)
            };
            old.fdatasync()
                .await
                .map_err(|e| Error::io("sync segment", &shared.dir, gio(e)))?;
            let mut s = shared.state.borrow_mut();
            s.synced_end = s.synced_end.max(written);
        }
        let (file, size) = create_segment(&shared.dir, base, config.prewrite_bytes, config.sync).await?;
        let mut s = shared.state.borrow_mut();
        let old_tail = s.reserve_base_of_tail();
        let old = s.segments.get_mut(&old_tail).expect("tail segment exists");
        debug_assert_eq!(old.end_offset, base, "a new segment starts where the old one ended");
        s.segments.insert(
            base,
            Segment {
                path: segment_path(&shared.dir, base),
                base,
                end_offset: base,
                data_end: Some(HEADER_BYTES as u64),
                index: Some(Vec::new()),
            },
        );
        s.tail_file = Rc::new(file);
        s.prewritten_to = size;
    }
    let (file, path, prewritten_to) = {
        let s = shared.state.borrow();
        (s.tail_file.clone(), segment_path(&shared.dir, base), s.prewritten_to)
    };
    let last = chunks.last().expect("at least one chunk");
    let write_end = last.position + last.frame.len() as u64;
    if write_end > prewritten_to {
        let write_bytes = write_end - chunks[0].position;
        let fill_to = (write_end + config.prewrite_bytes).min(config.segment_bytes_max.max(write_end));
        if write_bytes < config.prewrite_skip_bytes && fill_to > write_end {
            // A small write: extend the zero fill well past it. This sync
            // pays for the size change once; the following small ones
            // overwrite written blocks and change no metadata.
            zero_fill(&file, &path, write_end, fill_to).await?;
            shared.state.borrow_mut().prewritten_to = fill_to;
        } else {
            // A large write grows the file itself: the metadata cost is
            // spread over many bytes, and filling ahead would write every
            // byte twice.
            shared.state.borrow_mut().prewritten_to = write_end;
        }
    }
    let mut written = 0usize;
    let mut index = Vec::new();
    let mut end_offset = 0;
    for chunk in chunks {
        written += chunk.frame.len();
        if chunk.indexed {
            index.push((
                chunk.frame.end_offset() - u64::from(chunk.frame.count()),
                chunk.position,
            ));
        }
        end_offset = chunk.frame.end_offset();
        // O_DSYNC: when this returns, the frame is durable (an unsynced
        // log: written, and durable at the next `sync` or segment roll).
        write_all(&file, &path, chunk.frame.finish(), chunk.position).await?;
    }
    {
        let mut s = shared.state.borrow_mut();
        let seg = s.segments.get_mut(&base).expect("flushed segment exists");
        seg.end_offset = end_offset;
        seg.data_end = Some(write_end);
        let seg_index = seg.index.get_or_insert_with(Vec::new);
        seg_index.extend(index);
        s.durable_end = end_offset;
        s.pending_bytes -= written;
    }
    shared.durable.wake_all();
    shared.space.wake_all();
    if let Some(max) = config.entries_max {
        let end = shared.state.borrow().durable_end;
        if end > max {
            trim_before(shared, end - max)?;
        }
    }
    Ok(())
}

fn trim_before(shared: &Shared, offset: u64) -> Result<u64> {
    let mut s = shared.state.borrow_mut();
    let tail = s.reserve_base_of_tail();
    let doomed: Vec<u64> = s
        .segments
        .values()
        .filter(|seg| seg.base != tail && seg.end_offset <= offset)
        .map(|seg| seg.base)
        .collect();
    if doomed.is_empty() {
        return Ok(s.start_offset);
    }
    s.open_segments.retain(|(b, _)| !doomed.contains(b));
    for base in doomed {
        let seg = s.segments.remove(&base).expect("listed above");
        std::fs::remove_file(&seg.path).map_err(|e| Error::io("remove trimmed segment", &seg.path, e))?;
    }
    s.start_offset = *s.segments.keys().next().expect("the tail is never trimmed");
    sync_dir(&shared.dir)?;
    Ok(s.start_offset)
}
