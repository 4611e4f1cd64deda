//! The PState store of a task thread: a log-structured merge tree.
//!
//! Writes go as [`WriteBatch`]es: each batch is one record of the
//! write-ahead log (a [`Log`]). A batch is applied to the memtable only
//! once durable, in WAL order, in one synchronous step: readers on the
//! thread see all of a batch or none of it, and after a crash recovery
//! replays whole batches only.
//!
//! The WAL can carry other entries too ([`Store::enqueue_entry`]): on a
//! task thread it is the task group's one log (the replog), holding the
//! depot appends of all its partitions between the PState batches, so
//! the whole thread makes one group commit per flush. Every WAL record
//! starts with a kind byte ([`KIND_BATCH`] for a batch); the store replays
//! batches and leaves other kinds to their owner, runs each entry's
//! `on_applied` in WAL order once it is durable, and never trims the WAL
//! past the owner's floor ([`Store::set_trim_floor`]).
//!
//! A full memtable is frozen and written to an immutable sorted table in
//! the background; the manifest then records the table and the WAL offset
//! it covers, and WAL segments below that are deleted. Size-tiered
//! compaction merges the newest tables when there are too many; it runs on
//! the task thread as an ordinary task whose I/O awaits let other work run
//! between slices. Reads (`get`, `scan`) are synchronous: memtables plus
//! memory-mapped tables, no I/O wait on the hot path.

mod batch;
mod bloom;
mod manifest;
mod memtable;
mod merge;
pub mod table;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::rc::Rc;

pub use self::batch::WriteBatch;
use self::manifest::Manifest;
use self::memtable::Memtable;
use self::merge::{Merge, Source};
use self::table::{Table, TableOptions, TableWriter};
use crate::error::{Error, Result};
use crate::log::{Log, LogConfig};
use crate::sync::{OffsetWaiters, Waiters};

/// The kind byte of a WAL record holding a [`WriteBatch`]; other kinds
/// belong to the WAL's owner.
pub const KIND_BATCH: u8 = 0;

/// An entry queued in the WAL and not yet applied.
/// What the owner does with an applied entry of another kind that came
/// without an action: its WAL offset and bytes (kind byte first).
pub type EntryHook = Box<dyn Fn(u64, &[u8])>;

/// Asked before a write of the store's own takes its WAL offset: gets
/// the placement (offset, writer generation), answers the epoch to write
/// it in or refuses it. It must not use the store.
pub type AppendGate = Rc<dyn Fn(crate::log::Placed) -> Result<u32>>;

struct HookSlot(EntryHook);

#[derive(Clone)]
struct GateSlot(AppendGate);

impl std::fmt::Debug for GateSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppendGate")
    }
}

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntryHook")
    }
}

enum Unapplied {
    Batch(WriteBatch),
    /// Another kind's entry: runs once durable, in WAL order.
    Entry(Box<dyn FnOnce()>),
    /// Another kind's entry that came without its own action (written by
    /// replication, or found past the apply limit at open): the store's
    /// entry hook gets it once it is applied.
    Raw(Vec<u8>),
}

impl std::fmt::Debug for Unapplied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unapplied::Batch(b) => write!(f, "Batch({} bytes)", b.encoded_bytes()),
            Unapplied::Entry(_) => f.write_str("Entry"),
            Unapplied::Raw(bytes) => write!(f, "Raw({} bytes)", bytes.len()),
        }
    }
}

/// Configuration of a store. Every size has a bound.
#[derive(Debug, Clone)]
pub struct LsmConfig {
    /// A memtable is frozen and flushed past this size. Default 64 MiB.
    pub memtable_bytes_max: usize,
    /// Largest key. Default 16 KiB.
    pub key_bytes_max: usize,
    /// Largest value. Default 1 MiB.
    pub value_bytes_max: usize,
    /// Largest encoded batch. Default 4 MiB.
    pub batch_bytes_max: usize,
    /// Compaction starts at this many tables. Default 4.
    pub compaction_trigger: usize,
    pub table: TableOptions,
    /// WAL settings; `record_bytes_max` is raised to `batch_bytes_max`.
    pub wal: LogConfig,
}

impl Default for LsmConfig {
    fn default() -> Self {
        LsmConfig {
            memtable_bytes_max: 64 << 20,
            key_bytes_max: 16 << 10,
            value_bytes_max: 1 << 20,
            batch_bytes_max: 4 << 20,
            compaction_trigger: 4,
            table: TableOptions::default(),
            wal: LogConfig {
                segment_bytes_max: 32 << 20,
                ..LogConfig::default()
            },
        }
    }
}

impl LsmConfig {
    fn wal_config(&self) -> LogConfig {
        let mut wal = self.wal.clone();
        wal.record_bytes_max = wal.record_bytes_max.max(self.batch_bytes_max as u32);
        let frame = self.batch_bytes_max + 64;
        wal.pending_bytes_max = wal.pending_bytes_max.max(frame);
        wal.segment_bytes_max = wal.segment_bytes_max.max(frame as u64 + 64);
        wal
    }

    pub fn validate(&self) -> Result<()> {
        if self.compaction_trigger < 2 {
            return Err(Error::Config {
                key: "compaction_trigger",
                value: self.compaction_trigger.to_string(),
                reason: "must be at least 2",
            });
        }
        if self.key_bytes_max + self.value_bytes_max + 16 > self.batch_bytes_max {
            return Err(Error::Config {
                key: "batch_bytes_max",
                value: self.batch_bytes_max.to_string(),
                reason: "must hold one key of key_bytes_max and one value of value_bytes_max",
            });
        }
        self.wal_config().validate()
    }
}

/// A batch queued by [`Store::enqueue`], not yet known durable.
#[derive(Debug)]
#[must_use = "a queued write is acknowledged only after wait_written"]
pub struct QueuedWrite {
    queued: Option<crate::log::Enqueued>,
    /// The store's abandon count when it was queued.
    abandoned: u64,
}

/// What [`Store::open`] found.
#[derive(Debug, Clone, Default)]
pub struct StoreRecovery {
    pub wal: crate::log::Recovery,
    /// WAL batches replayed into the memtable.
    pub replayed_batches: u64,
    /// Table files not in the manifest (an interrupted flush or compaction)
    /// that were removed.
    pub removed_tables: Vec<PathBuf>,
}

/// Counters of a store, for tests and telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub tables: usize,
    pub flushes: u64,
    pub compactions: u64,
    pub memtable_bytes: usize,
    /// Flushes and compactions that failed, left nothing behind and were
    /// tried again (a full device).
    pub retries: u64,
}

/// A PState store on one task thread. Cheap to clone; not `Send`.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Rc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: LsmConfig,
    wal: Log,
    mem: RefCell<Memtable>,
    /// The frozen memtable being written to a table.
    imm: RefCell<Option<Rc<Memtable>>>,
    /// Live tables, newest first.
    tables: RefCell<Vec<Rc<Table>>>,
    manifest: RefCell<Manifest>,
    /// Entries in the WAL, in offset order, not yet applied.
    unapplied: RefCell<VecDeque<(u64, Unapplied)>>,
    /// Entries at or past this offset are not applied even once durable
    /// (replication: an entry is applied once the task group's in-sync
    /// replicas hold it); `u64::MAX` applies everything durable.
    apply_limit: Cell<u64>,
    /// Gets other kinds' entries that came without an action of their own
    /// ([`Store::set_entry_hook`]).
    entry_hook: RefCell<Option<HookSlot>>,
    /// Asked before every batch or entry of this store's own takes its WAL
    /// offset ([`Store::set_append_gate`]).
    append_gate: RefCell<Option<GateSlot>>,
    /// Bumped by [`Store::abandon_unapplied`]: writes queued before it
    /// have an unknown outcome.
    abandoned: Cell<u64>,
    /// Woken when entries are applied.
    applied: OffsetWaiters,
    /// The WAL is never trimmed at or past this offset (its owner's
    /// entries below it are kept elsewhere); `u64::MAX` for a store that
    /// owns its WAL alone.
    trim_floor: Cell<u64>,
    /// Bytes of other kinds' entries queued since the memtable was last
    /// frozen: what the WAL holds beyond the tables besides batches.
    entry_bytes: Cell<u64>,
    /// The WAL's writer generation `unapplied` was queued under.
    wal_generation: Cell<u64>,
    compacting: Cell<bool>,
    /// Woken when a flush or compaction finishes.
    background: Waiters,
    /// A failed flush or compaction that could not be retried poisons the
    /// store.
    failed: RefCell<Option<String>>,
    /// Why the last retried flush or compaction failed, and the pause
    /// before the next try.
    last_retry: RefCell<Option<String>>,
    retry_backoff: Cell<std::time::Duration>,
    /// `close` started: background work is not retried any more.
    closing: Cell<bool>,
    /// A retry was given up because the store is closing.
    gave_up: Cell<bool>,
    stats: Cell<StoreStats>,
}

/// How a flush or compaction stopped short.
enum Interrupted {
    /// It left nothing behind (its new table was removed, the manifest is
    /// as it was): run `Again` after a pause (a full device may have room
    /// by then).
    Retry(Error, Again),
    /// The store's files may not match its memory any more: poison.
    Fatal(Error),
}

/// What a retry runs.
#[derive(Clone, Copy)]
enum Again {
    Flush,
    Compact,
}

const RETRY_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const RETRY_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// A new table that could not be written: removed, and the work retried.
fn discard(path: &Path, e: Error, again: Again) -> Interrupted {
    let _ = std::fs::remove_file(path);
    Interrupted::Retry(e, again)
}

/// A manifest store that failed: before its rename nothing changed on
/// disk (retry, the new table removed); after it, the manifest on disk may
/// name the new table while memory does not (poison).
fn stored_or_not(path: &Path, e: Error, again: Again) -> Interrupted {
    if manifest::failed_before_rename(&e) {
        discard(path, e, again)
    } else {
        Interrupted::Fatal(e)
    }
}

/// Flushes and compactions offer to yield the task thread this often, so a
/// long merge runs in slices between foreground appends and reads.
const YIELD_EVERY_ENTRIES: usize = 256;

fn apply(mem: &mut Memtable, batch: &WriteBatch) {
    for (key, value) in batch.ops() {
        mem.insert(key, value);
    }
}

/// The batch of a WAL record, or `None` for another kind's entry.
fn wal_batch<'a>(record: &'a [u8], dir: &Path, offset: u64) -> Result<Option<&'a [u8]>> {
    match record.split_first() {
        Some((&KIND_BATCH, batch)) => Ok(Some(batch)),
        Some(_) => Ok(None),
        None => Err(Error::Corrupt {
            path: dir.to_path_buf(),
            offset,
            position: 0,
            reason: "an empty WAL record (every record starts with its kind)".into(),
        }),
    }
}

fn table_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:08}.sst"))
}

/// `BTreeMap::range` panics on an inverted or empty-exclusive range, so
/// such bounds are checked first.
pub(crate) fn bounds_empty(lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> bool {
    match (lower, upper) {
        (Bound::Included(l), Bound::Included(u)) => l > u,
        (Bound::Included(l), Bound::Excluded(u))
        | (Bound::Excluded(l), Bound::Included(u))
        | (Bound::Excluded(l), Bound::Excluded(u)) => l >= u,
        _ => false,
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`, replaying its WAL.
    pub async fn open(dir: impl AsRef<Path>, config: LsmConfig) -> Result<(Store, StoreRecovery)> {
        Store::open_limited(dir, config, u64::MAX).await
    }

    /// Opens the store applying only the WAL's batches below `apply_limit`
    /// (a replica's last recorded applied offset: what lies past it may
    /// yet be cut by truncation, so it is not visible). Entries past it are
    /// queued unapplied as though just written, other kinds' for the entry
    /// hook ([`Store::set_entry_hook`]); the limit stays set
    /// ([`Store::set_apply_limit`] moves it). A limit below what the
    /// tables hold is raised to their checkpoint: they hold only applied
    /// batches.
    pub async fn open_limited(
        dir: impl AsRef<Path>,
        config: LsmConfig,
        apply_limit: u64,
    ) -> Result<(Store, StoreRecovery)> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create store directory", &dir, e))?;
        let manifest = Manifest::load(&dir)?.unwrap_or_default();
        let mut recovery = StoreRecovery::default();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io("list store directory", &dir, e))? {
            let path = entry.map_err(|e| Error::io("list store directory", &dir, e))?.path();
            let id = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".sst"))
                .and_then(|n| n.parse::<u64>().ok());
            let leftover = match id {
                Some(id) => !manifest.tables.contains(&id),
                None => path.file_name().is_some_and(|n| n == "MANIFEST.tmp"),
            };
            if leftover {
                std::fs::remove_file(&path).map_err(|e| Error::io("remove leftover table", &path, e))?;
                recovery.removed_tables.push(path);
            }
        }
        let tables = manifest
            .tables
            .iter()
            .map(|&id| Table::open(id, &table_path(&dir, id)).map(Rc::new))
            .collect::<Result<Vec<_>>>()?;
        let (wal, wal_recovery) = Log::open(dir.join("wal"), config.wal_config()).await?;
        recovery.wal = wal_recovery;
        if wal.start_offset() > manifest.wal_checkpoint {
            return Err(Error::Corrupt {
                path: dir.join("wal"),
                offset: manifest.wal_checkpoint,
                position: 0,
                reason: format!(
                    "the WAL starts at {} but the tables only hold batches below {}",
                    wal.start_offset(),
                    manifest.wal_checkpoint
                ),
            });
        }
        if wal.end_offset() < manifest.wal_checkpoint {
            // Batches below the checkpoint are in tables, but new batches
            // would get offsets below it and be skipped by the next replay.
            return Err(Error::Corrupt {
                path: dir.join("wal"),
                offset: wal.end_offset(),
                position: 0,
                reason: format!(
                    "the WAL ends at {} but the tables already hold batches below {}; the WAL lost its tail",
                    wal.end_offset(),
                    manifest.wal_checkpoint
                ),
            });
        }
        let mut mem = Memtable::default();
        let mut next = manifest.wal_checkpoint;
        let end = wal.end_offset();
        let apply_limit = apply_limit.max(manifest.wal_checkpoint);
        let mut unapplied = VecDeque::new();
        while next < end {
            for record in wal.read(next, end, 4 << 20).await? {
                let batch = wal_batch(&record.payload, wal.dir(), record.offset)?;
                if record.offset >= apply_limit {
                    unapplied.push_back((
                        record.offset,
                        match batch {
                            Some(batch) => Unapplied::Batch(WriteBatch::decode(batch)?),
                            None => Unapplied::Raw(record.payload),
                        },
                    ));
                } else if let Some(batch) = batch {
                    apply(&mut mem, &WriteBatch::decode(batch)?);
                    recovery.replayed_batches += 1;
                }
                next = record.offset + 1;
            }
        }
        mem.wal_end = end.min(apply_limit);
        let stats = StoreStats {
            tables: tables.len(),
            ..StoreStats::default()
        };
        let store = Store {
            inner: Rc::new(Inner {
                dir,
                config,
                wal,
                mem: RefCell::new(mem),
                imm: RefCell::new(None),
                tables: RefCell::new(tables),
                manifest: RefCell::new(manifest),
                unapplied: RefCell::new(unapplied),
                apply_limit: Cell::new(apply_limit),
                entry_hook: RefCell::new(None),
                append_gate: RefCell::new(None),
                abandoned: Cell::new(0),
                applied: OffsetWaiters::default(),
                trim_floor: Cell::new(u64::MAX),
                entry_bytes: Cell::new(0),
                wal_generation: Cell::new(0),
                compacting: Cell::new(false),
                background: Waiters::default(),
                failed: RefCell::new(None),
                last_retry: RefCell::new(None),
                retry_backoff: Cell::new(RETRY_BACKOFF_MIN),
                closing: Cell::new(false),
                gave_up: Cell::new(false),
                stats: Cell::new(stats),
            }),
        };
        Ok((store, recovery))
    }

    /// The WAL (the replication log of this store).
    pub fn wal(&self) -> &Log {
        &self.inner.wal
    }

    pub fn stats(&self) -> StoreStats {
        let mut s = self.inner.stats.get();
        s.tables = self.inner.tables.borrow().len();
        s.memtable_bytes = self.inner.mem.borrow().bytes;
        s
    }

    /// The store takes no more writes; writers waiting to be applied learn it.
    fn poison(&self, cause: String) {
        *self.inner.failed.borrow_mut() = Some(cause);
        self.inner.applied.wake_all();
    }

    fn check_failed(&self) -> Result<()> {
        match &*self.inner.failed.borrow() {
            Some(cause) => Err(Error::Poisoned {
                what: format!("store {}", self.inner.dir.display()),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Checks a batch against the limits without applying it.
    pub fn check_batch(&self, batch: &WriteBatch) -> Result<()> {
        let c = &self.inner.config;
        let (key, value) = batch.largest();
        Error::check_limit("key", "key_bytes_max", key, c.key_bytes_max)?;
        Error::check_limit("value", "value_bytes_max", value, c.value_bytes_max)?;
        Error::check_limit("batch", "batch_bytes_max", batch.encoded_bytes(), c.batch_bytes_max)
    }

    /// Writes a batch atomically; returns once it is durable and visible.
    pub async fn write(&self, batch: WriteBatch) -> Result<()> {
        let queued = self.enqueue(batch).await?;
        self.wait_written(queued).await
    }

    /// The first half of [`Store::write`]: gives the batch its place in the
    /// WAL (batches become visible in the order they were queued) and
    /// returns without waiting for durability. Callers that read their own
    /// queued writes before they are visible keep them themselves.
    pub async fn enqueue(&self, batch: WriteBatch) -> Result<QueuedWrite> {
        self.enqueue_inner(batch, None).await
    }

    /// [`Store::enqueue`] for a batch computed from what the store showed
    /// under writer generation `generation` ([`Store::generation`]),
    /// including writes queued then: refused if the WAL lost a write since
    /// (the batch may build on it).
    pub async fn enqueue_under(&self, batch: WriteBatch, generation: u64) -> Result<QueuedWrite> {
        self.enqueue_inner(batch, Some(generation)).await
    }

    /// The WAL's writer generation: it changes when a failed write loses
    /// queued batches.
    pub fn generation(&self) -> u64 {
        self.inner.wal.generation()
    }

    async fn enqueue_inner(&self, batch: WriteBatch, generation: Option<u64>) -> Result<QueuedWrite> {
        self.check_batch(&batch)?;
        self.check_failed()?;
        if batch.is_empty() {
            return Ok(QueuedWrite {
                queued: None,
                abandoned: 0,
            });
        }
        self.make_room().await?;
        if generation.is_some_and(|g| g != self.inner.wal.generation()) {
            return Err(Error::Poisoned {
                what: format!("store {}", self.inner.dir.display()),
                cause: "a write this batch was computed on failed; it is computed again".into(),
            });
        }
        self.drop_lost();
        let encoded = batch.encoded();
        let gate = self.inner.append_gate.borrow().clone();
        let queued = self
            .inner
            .wal
            .enqueue_gated(1 + encoded.len(), gate.as_ref().map(|g| &*g.0 as _), |b, _| {
                b[0] = KIND_BATCH;
                b[1..].copy_from_slice(encoded);
            })
            .await?;
        self.inner
            .unapplied
            .borrow_mut()
            .push_back((queued.range.start, Unapplied::Batch(batch)));
        Ok(QueuedWrite {
            queued: Some(queued),
            abandoned: self.inner.abandoned.get(),
        })
    }

    /// Queues an entry of another kind (`kind` is not [`KIND_BATCH`]) of
    /// `len` bytes, which `fill` writes in place once the entry has its
    /// place in the WAL (`fill` must not use the store). `on_applied` runs
    /// once the entry is durable,
    /// after every entry before it and before any after it (it must not
    /// use the store either); it never runs if the write fails.
    /// [`Store::wait_written`] waits for both.
    pub async fn enqueue_entry(
        &self,
        kind: u8,
        len: usize,
        fill: impl FnOnce(&mut [u8], crate::log::Placed),
        on_applied: Box<dyn FnOnce()>,
    ) -> Result<QueuedWrite> {
        assert_ne!(kind, KIND_BATCH, "batches are queued with Store::enqueue");
        self.check_failed()?;
        // Everything durable is applied first, and lost entries forgotten,
        // so `fill` sees the owner's state as of every entry before it.
        self.apply_durable();
        let gate = self.inner.append_gate.borrow().clone();
        let queued = self
            .inner
            .wal
            .enqueue_gated(1 + len, gate.as_ref().map(|g| &*g.0 as _), |b, placed| {
                b[0] = kind;
                fill(&mut b[1..], placed);
            })
            .await?;
        self.inner
            .entry_bytes
            .set(self.inner.entry_bytes.get() + 1 + len as u64);
        self.inner
            .unapplied
            .borrow_mut()
            .push_back((queued.range.start, Unapplied::Entry(on_applied)));
        Ok(QueuedWrite {
            queued: Some(queued),
            abandoned: self.inner.abandoned.get(),
        })
    }

    /// Offset after the last applied WAL entry: every entry below it is
    /// durable and applied.
    pub fn applied_end(&self) -> u64 {
        self.inner.mem.borrow().wal_end
    }

    /// Bytes of other kinds' entries the WAL took since the memtable was
    /// last frozen (an owner bounds the WAL by flushing past a limit).
    pub fn entry_bytes(&self) -> u64 {
        self.inner.entry_bytes.get()
    }

    /// Lets the WAL be trimmed below `floor` (its owner keeps its entries
    /// below it elsewhere, durably) and trims what the tables cover too.
    pub fn set_trim_floor(&self, floor: u64) -> Result<u64> {
        self.inner.trim_floor.set(floor);
        self.trim_wal()
    }

    fn trim_wal(&self) -> Result<u64> {
        let checkpoint = self.inner.manifest.borrow().wal_checkpoint;
        self.inner.wal.trim_before(checkpoint.min(self.inner.trim_floor.get()))
    }

    /// With nothing in memory (no batch since the last flush), moves the
    /// checkpoint up to the applied end, so a WAL of other entries only can
    /// be trimmed without writing a table.
    pub fn checkpoint_if_idle(&self) -> Result<()> {
        self.check_failed()?;
        let end = self.applied_end();
        let idle = self.inner.mem.borrow().is_empty()
            && self.inner.imm.borrow().is_none()
            && !self.inner.compacting.get()
            && self.inner.unapplied.borrow().is_empty();
        if !idle || end <= self.inner.manifest.borrow().wal_checkpoint {
            return Ok(());
        }
        let mut next = self.inner.manifest.borrow().clone();
        next.wal_checkpoint = end;
        next.store(&self.inner.dir)?;
        *self.inner.manifest.borrow_mut() = next;
        self.trim_wal()?;
        Ok(())
    }

    /// Forgets queued batches whose WAL write failed (the WAL was poisoned
    /// and healed since: later batches take their offsets).
    fn drop_lost(&self) {
        let generation = self.inner.wal.generation();
        if self.inner.wal_generation.get() != generation {
            let durable = self.inner.wal.end_offset();
            self.inner
                .unapplied
                .borrow_mut()
                .retain(|(offset, _)| *offset < durable);
            self.inner.wal_generation.set(generation);
        }
    }

    /// The second half of [`Store::write`]: returns once the queued batch
    /// is durable and visible (applied: below the apply limit too).
    pub async fn wait_written(&self, queued: QueuedWrite) -> Result<()> {
        let abandoned = queued.abandoned;
        if let Some(queued) = queued.queued {
            self.inner.wal.wait_enqueued(&queued).await?;
            self.apply_durable();
            let offset = queued.range.start;
            if self.applied_end() <= offset {
                self.inner
                    .applied
                    .wait(offset, || {
                        (self.applied_end() > offset
                            || self.inner.failed.borrow().is_some()
                            || self.inner.abandoned.get() != abandoned)
                            .then_some(())
                    })
                    .await;
                self.check_failed()?;
                if self.applied_end() <= offset {
                    return Err(Error::Unavailable(format!(
                        "store {}: the write at offset {offset} was not applied before this replica stopped                          leading its task group; its outcome is unknown (the new leader may still apply it)",
                        self.inner.dir.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Asks `gate` before every batch or entry of the store's own
    /// ([`Store::enqueue`], [`Store::enqueue_entry`]) takes its WAL offset,
    /// at that very moment: it answers the epoch to write it in, or
    /// refuses it and nothing is queued. Replication's "only the leader
    /// writes" check; [`Store::enqueue_replicated`] is not gated.
    pub fn set_append_gate(&self, gate: AppendGate) {
        *self.inner.append_gate.borrow_mut() = Some(GateSlot(gate));
    }

    /// Ends the wait of every write queued so far and not yet applied with
    /// an error saying its outcome is unknown (the replica stopped
    /// leading: a new leader may apply the entry or cut it). The entries
    /// stay in the WAL and are applied if the limit reaches them.
    pub fn abandon_unapplied(&self) {
        self.inner.abandoned.set(self.inner.abandoned.get() + 1);
        self.inner.applied.wake_all();
    }

    /// Entries at or past `limit` stay unapplied once durable (not
    /// visible, their `on_applied` not run) until the limit moves past
    /// them; `u64::MAX` (the default) applies everything durable.
    /// Replication sets it to the offset the task group's in-sync replicas
    /// hold. Entries already applied stay applied.
    pub fn set_apply_limit(&self, limit: u64) {
        self.inner.apply_limit.set(limit);
        self.apply_durable();
    }

    pub fn apply_limit(&self) -> u64 {
        self.inner.apply_limit.get()
    }

    /// Sets what becomes of applied entries of other kinds that came
    /// without an action ([`Store::enqueue_replicated`], or past the apply
    /// limit at open); like an entry's own action it must not use the
    /// store. Without a hook they are only kept in the WAL.
    pub fn set_entry_hook(&self, hook: EntryHook) {
        *self.inner.entry_hook.borrow_mut() = Some(HookSlot(hook));
    }

    /// Writes entries a leader sent (replication) at the offsets and in the
    /// epoch it gave them: `record` is the entry's bytes as the leader's
    /// WAL holds them (its kind byte first). The first entry must go at
    /// the WAL's next offset and the rest follow it; a batch that does not
    /// decode or an empty entry is refused before anything is written.
    /// They are applied, like any entry, once durable and below the apply
    /// limit: batches into the memtable, other kinds through the entry
    /// hook.
    pub async fn enqueue_replicated(&self, epoch: u32, first: u64, records: &[&[u8]]) -> Result<QueuedWrite> {
        self.check_failed()?;
        let next = self.inner.wal.next_offset();
        if first != next {
            return Err(Error::OffsetOutOfRange {
                requested: first,
                start: next,
                end: next,
            });
        }
        let mut decoded = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let offset = first + i as u64;
            decoded.push(match wal_batch(record, self.inner.wal.dir(), offset)? {
                Some(batch) => {
                    let batch = WriteBatch::decode(batch)?;
                    self.check_batch(&batch)?;
                    Unapplied::Batch(batch)
                }
                None => Unapplied::Raw(record.to_vec()),
            });
        }
        if decoded.iter().any(|u| matches!(u, Unapplied::Batch(_))) {
            self.make_room().await?;
        }
        self.drop_lost();
        if self.inner.wal.next_offset() != first {
            return Err(Error::Closed(format!(
                "store {}: another write took offset {first} while replicated entries waited for room",
                self.inner.dir.display()
            )));
        }
        self.inner.wal.set_epoch(epoch);
        let queued = self.inner.wal.enqueue_batch(records.iter().copied()).await?;
        let mut unapplied = self.inner.unapplied.borrow_mut();
        for (i, entry) in decoded.into_iter().enumerate() {
            if let Unapplied::Raw(bytes) = &entry {
                self.inner
                    .entry_bytes
                    .set(self.inner.entry_bytes.get() + bytes.len() as u64);
            }
            unapplied.push_back((queued.range.start + i as u64, entry));
        }
        Ok(QueuedWrite {
            queued: Some(queued),
            abandoned: self.inner.abandoned.get(),
        })
    }

    /// Cuts the WAL at `to` (a follower's tail that diverges from its
    /// leader's): entries at and past it are removed durably and
    /// forgotten unapplied. Refused below the applied end: an applied
    /// entry is never taken back.
    pub async fn truncate(&self, to: u64) -> Result<()> {
        self.check_failed()?;
        self.apply_durable();
        let applied = self.applied_end();
        if to < applied {
            return Err(Error::OffsetOutOfRange {
                requested: to,
                start: applied,
                end: self.inner.wal.end_offset(),
            });
        }
        self.inner.wal.truncate(to).await?;
        self.inner.unapplied.borrow_mut().retain(|(offset, _)| *offset < to);
        Ok(())
    }

    /// Applies every durable batch below the apply limit, in WAL order.
    fn apply_durable(&self) {
        self.drop_lost();
        let durable = self.inner.wal.end_offset().min(self.inner.apply_limit.get());
        let mut unapplied = self.inner.unapplied.borrow_mut();
        let mut mem = self.inner.mem.borrow_mut();
        let before = mem.wal_end;
        while unapplied.front().is_some_and(|(offset, _)| *offset < durable) {
            let (offset, entry) = unapplied.pop_front().expect("front exists");
            match entry {
                Unapplied::Batch(batch) => apply(&mut mem, &batch),
                Unapplied::Entry(on_applied) => on_applied(),
                Unapplied::Raw(bytes) => {
                    if let Some(HookSlot(hook)) = self.inner.entry_hook.borrow().as_ref() {
                        hook(offset, &bytes);
                    }
                }
            }
            mem.wal_end = offset + 1;
        }
        let full = mem.bytes >= self.inner.config.memtable_bytes_max;
        let moved = mem.wal_end != before;
        drop(mem);
        drop(unapplied);
        if moved {
            self.inner.applied.wake_through(self.applied_end());
        }
        if full && self.inner.imm.borrow().is_none() {
            self.start_flush();
        }
    }

    /// Waits while the memtable is full and the previous one is still being
    /// flushed (back-pressure instead of unbounded memory).
    async fn make_room(&self) -> Result<()> {
        self.inner
            .background
            .wait(|| {
                let full = self.inner.mem.borrow().bytes >= self.inner.config.memtable_bytes_max;
                let flushing = self.inner.imm.borrow().is_some();
                (self.inner.failed.borrow().is_some() || !(full && flushing)).then_some(())
            })
            .await;
        self.check_failed()?;
        if self.inner.mem.borrow().bytes >= self.inner.config.memtable_bytes_max {
            self.start_flush();
        }
        Ok(())
    }

    /// Freezes the memtable and writes it to a table in the background.
    fn start_flush(&self) {
        if self.inner.failed.borrow().is_some()
            || self.inner.imm.borrow().is_some()
            || self.inner.mem.borrow().is_empty()
        {
            return;
        }
        let frozen = std::mem::take(&mut *self.inner.mem.borrow_mut());
        self.inner.mem.borrow_mut().wal_end = frozen.wal_end;
        self.inner.entry_bytes.set(0);
        *self.inner.imm.borrow_mut() = Some(Rc::new(frozen));
        self.spawn_background(Again::Flush);
    }

    /// Allocates the next table id and starts writing that table.
    async fn new_table(&self) -> Result<(u64, PathBuf, TableWriter)> {
        let id = {
            let mut m = self.inner.manifest.borrow_mut();
            m.next_table_id += 1;
            m.next_table_id
        };
        let path = table_path(&self.inner.dir, id);
        let writer = TableWriter::create(&path, self.inner.config.table.clone()).await?;
        Ok((id, path, writer))
    }

    /// Runs a flush or compaction as a task of this thread. A failure that
    /// left nothing behind (its new table removed, the manifest as it was:
    /// a full device) is tried again with backoff, `again` deciding what
    /// to run; any other failure poisons the store (nothing more is
    /// acknowledged).
    fn spawn_background(&self, work: Again) {
        let store = self.clone();
        glommio::spawn_local(async move {
            let result = match work {
                Again::Flush => store.flush_frozen().await,
                Again::Compact => store.compact_tables().await,
            };
            match result {
                Ok(()) => store.inner.retry_backoff.set(RETRY_BACKOFF_MIN),
                Err(Interrupted::Fatal(e)) => store.poison(e.to_string()),
                Err(Interrupted::Retry(e, again)) => {
                    let backoff = store.inner.retry_backoff.get();
                    store.inner.retry_backoff.set((backoff * 2).min(RETRY_BACKOFF_MAX));
                    *store.inner.last_retry.borrow_mut() = Some(e.to_string());
                    let mut stats = store.inner.stats.get();
                    stats.retries += 1;
                    store.inner.stats.set(stats);
                    // Callers waiting for this flush learn it failed.
                    store.inner.background.wake_all();
                    glommio::timer::sleep(backoff).await;
                    // A closing store stops trying: the frozen memtable's
                    // batches are durable in the WAL and replayed at open.
                    if store.inner.closing.get() {
                        store.inner.gave_up.set(true);
                    } else {
                        store.spawn_background(again);
                    }
                }
            }
            store.inner.background.wake_all();
        })
        .detach();
    }

    async fn flush_frozen(&self) -> Result<(), Interrupted> {
        let frozen = self.inner.imm.borrow().clone().expect("a frozen memtable exists");
        let (id, path, mut writer) = self
            .new_table()
            .await
            .map_err(|e| Interrupted::Retry(e, Again::Flush))?;
        let written = async {
            for (i, (key, value)) in frozen.iter().enumerate() {
                writer.add(key, value).await?;
                if i % YIELD_EVERY_ENTRIES == 0 {
                    glommio::yield_if_needed().await;
                }
            }
            writer.finish().await?;
            Table::open(id, &path)
        }
        .await;
        let table = Rc::new(written.map_err(|e| discard(&path, e, Again::Flush))?);
        {
            // The new manifest is stored before memory changes, so a
            // failed store leaves nothing behind that a later store (of a
            // compaction) could persist.
            let mut next = self.inner.manifest.borrow().clone();
            next.tables.insert(0, id);
            next.wal_checkpoint = frozen.wal_end;
            self.check_failed().map_err(Interrupted::Fatal)?;
            next.store(&self.inner.dir)
                .map_err(|e| stored_or_not(&path, e, Again::Flush))?;
            *self.inner.manifest.borrow_mut() = next;
        }
        self.inner.tables.borrow_mut().insert(0, table);
        *self.inner.imm.borrow_mut() = None;
        let mut stats = self.inner.stats.get();
        stats.flushes += 1;
        self.inner.stats.set(stats);
        self.trim_wal().map_err(Interrupted::Fatal)?;
        if self.inner.tables.borrow().len() >= self.inner.config.compaction_trigger && !self.inner.compacting.get() {
            self.spawn_background(Again::Compact);
        }
        Ok(())
    }

    /// Flushes the memtable to a table and waits for it (and for any flush
    /// already running).
    ///
    /// A flush that fails and is retried in the background (a full device)
    /// fails this call with the reason; the retries go on.
    pub async fn flush(&self) -> Result<()> {
        let retries = self.inner.stats.get().retries;
        let retried = || self.inner.stats.get().retries != retries;
        self.inner
            .background
            .wait(|| (self.flush_idle() || retried()).then_some(()))
            .await;
        self.check_retried(retried())?;
        self.check_failed()?;
        self.apply_durable();
        self.start_flush();
        self.inner
            .background
            .wait(|| (self.flush_idle() || retried()).then_some(()))
            .await;
        self.check_retried(retried())?;
        self.check_failed()
    }

    fn check_retried(&self, retried: bool) -> Result<()> {
        if retried {
            return Err(Error::Poisoned {
                what: format!("store {}", self.inner.dir.display()),
                cause: self.inner.last_retry.borrow().clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    fn flush_idle(&self) -> bool {
        self.inner.imm.borrow().is_none() || self.inner.failed.borrow().is_some() || self.inner.gave_up.get()
    }

    async fn wait_flush_idle(&self) {
        self.inner.background.wait(|| self.flush_idle().then_some(())).await;
    }

    /// Compacts until fewer than `compaction_trigger` tables remain, or
    /// merges everything into one table with `full`.
    pub async fn compact(&self, full: bool) -> Result<()> {
        self.inner
            .background
            .wait(|| (!self.inner.compacting.get()).then_some(()))
            .await;
        let result = if full {
            self.inner.compacting.set(true);
            let r = self.compact_run(usize::MAX).await;
            self.inner.compacting.set(false);
            r
        } else {
            self.compact_tables().await
        };
        self.inner.background.wake_all();
        // Called directly: the caller sees the failure (nothing is retried
        // behind its back, and only a failure that may have left the files
        // and memory apart poisons the store).
        result.map_err(|i| match i {
            Interrupted::Retry(e, _) => e,
            Interrupted::Fatal(e) => {
                self.poison(e.to_string());
                e
            }
        })
    }

    async fn compact_tables(&self) -> Result<(), Interrupted> {
        if self.inner.compacting.replace(true) {
            return Ok(());
        }
        let result = async {
            while self.inner.tables.borrow().len() >= self.inner.config.compaction_trigger {
                // Size-tiered: merge the newest tables while the next older
                // one is no bigger than twice what is merged so far.
                let run = {
                    let tables = self.inner.tables.borrow();
                    let mut k = 2;
                    let mut merged: u64 = tables[..2].iter().map(|t| t.size_bytes()).sum();
                    while k < tables.len() && tables[k].size_bytes() <= 2 * merged {
                        merged += tables[k].size_bytes();
                        k += 1;
                    }
                    k
                };
                self.compact_run(run).await?;
            }
            Ok(())
        }
        .await;
        self.inner.compacting.set(false);
        result
    }

    /// Merges the newest `count` tables into one.
    async fn compact_run(&self, count: usize) -> Result<(), Interrupted> {
        let run: Vec<Rc<Table>> = {
            let tables = self.inner.tables.borrow();
            tables[..count.min(tables.len())].to_vec()
        };
        if run.len() < 2 {
            return Ok(());
        }
        let includes_oldest = {
            let tables = self.inner.tables.borrow();
            run.last().map(|t| t.id) == tables.last().map(|t| t.id)
        };
        let (id, path, mut writer) = self
            .new_table()
            .await
            .map_err(|e| Interrupted::Retry(e, Again::Compact))?;
        let written = async {
            let sources: Vec<Source<'_>> = run
                .iter()
                .map(|t| Box::new(t.range(Bound::Unbounded, Bound::Unbounded, false)) as Source<'_>)
                .collect();
            for (i, entry) in Merge::new(sources, false).enumerate() {
                // A table that does not read back is damage: no retry.
                let (key, value) = entry.map_err(|e| (e, false))?;
                if i % YIELD_EVERY_ENTRIES == 0 {
                    glommio::yield_if_needed().await;
                }
                // A tombstone can go once no older table can hold the key.
                if value.is_none() && includes_oldest {
                    continue;
                }
                writer.add(key, value).await.map_err(|e| (e, true))?;
            }
            writer.finish().await.map_err(|e| (e, true))?;
            Table::open(id, &path).map_err(|e| (e, true))
        }
        .await;
        let table = Rc::new(written.map_err(|(e, retry)| {
            let _ = std::fs::remove_file(&path);
            if retry {
                Interrupted::Retry(e, Again::Compact)
            } else {
                Interrupted::Fatal(e)
            }
        })?);
        let ids: Vec<u64> = run.iter().map(|t| t.id).collect();
        {
            // Flushes may have added newer tables meanwhile; the run is
            // still contiguous, so it is replaced in place.
            let mut tables = self.inner.tables.borrow().clone();
            let at = tables
                .iter()
                .position(|t| t.id == ids[0])
                .expect("compacted tables are live");
            tables.splice(at..at + ids.len(), [table]);
            let mut next = self.inner.manifest.borrow().clone();
            next.tables = tables.iter().map(|t| t.id).collect();
            // Stored before memory changes; nothing is persisted after a
            // failure elsewhere poisoned the store.
            self.check_failed().map_err(Interrupted::Fatal)?;
            next.store(&self.inner.dir)
                .map_err(|e| stored_or_not(&path, e, Again::Compact))?;
            *self.inner.manifest.borrow_mut() = next;
            *self.inner.tables.borrow_mut() = tables;
        }
        for t in &run {
            std::fs::remove_file(t.path())
                .map_err(|e| Interrupted::Fatal(Error::io("remove compacted table", t.path(), e)))?;
        }
        let mut stats = self.inner.stats.get();
        stats.compactions += 1;
        self.inner.stats.set(stats);
        Ok(())
    }

    /// Returns the value of `key`, if any.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.apply_durable();
        if let Some(v) = self.inner.mem.borrow().get(key) {
            return Ok(v.map(<[u8]>::to_vec));
        }
        if let Some(imm) = &*self.inner.imm.borrow() {
            if let Some(v) = imm.get(key) {
                return Ok(v.map(<[u8]>::to_vec));
            }
        }
        for table in self.inner.tables.borrow().iter() {
            if let Some(v) = table.get(key)? {
                return Ok(v.map(<[u8]>::to_vec));
            }
        }
        Ok(None)
    }

    /// Returns up to `limit` live entries within bounds, ascending or
    /// descending.
    pub fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.apply_durable();
        let mut out = Vec::new();
        if bounds_empty(lower, upper) || limit == 0 {
            return Ok(out);
        }
        let mem = self.inner.mem.borrow();
        let imm = self.inner.imm.borrow().clone();
        let tables = self.inner.tables.borrow().clone();
        let mut sources = vec![mem.source(lower, upper, reverse)];
        if let Some(imm) = &imm {
            sources.push(imm.source(lower, upper, reverse));
        }
        for t in &tables {
            sources.push(Box::new(t.range(lower, upper, reverse)));
        }
        for entry in Merge::new(sources, reverse) {
            if let (key, Some(value)) = entry? {
                out.push((key.to_vec(), value.to_vec()));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Waits for background work and closes the WAL.
    pub async fn close(&self) -> Result<()> {
        self.inner.closing.set(true);
        self.wait_flush_idle().await;
        self.inner
            .background
            .wait(|| (!self.inner.compacting.get() || self.inner.gave_up.get()).then_some(()))
            .await;
        self.check_failed()?;
        self.inner.wal.close().await
    }
}
