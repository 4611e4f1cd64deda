//! The task group's log (the replog): one ordered, durable log per task
//! thread, the one write stream of its task group.
//!
//! It is the PState store's WAL ([`Store::enqueue_entry`]): PState write
//! batches (stream results, stream progress, microbatch markers and
//! commits) and the depot appends of every partition on the thread are its
//! entries, so one group commit makes everything the thread wrote since
//! the last one durable. Each entry has an offset and, in its frame, the
//! epoch it was written in (the unit replication ships, issue 13).
//!
//! A depot append entry is
//!
//! ```text
//! kind 1 (u8) | depot id (u16 LE) | task (u32 LE) | partition offset (u64 LE) | record
//! ```
//!
//! The partition offset is given when the entry takes its place in the
//! log, so partition order is log order. Depot partitions are unsynced
//! logs: once an append entry is durable it is written to its partition
//! (to the page cache), and a reader or consumer sees it from then on. A
//! checkpoint (every [`ModuleConfig::checkpoint_interval`]) syncs the
//! partitions and lets the store trim the replog below what they hold;
//! opening a task thread writes the entries past that point into their
//! partitions again (those already there are skipped by offset), so a
//! crash loses nothing the replog acknowledged.
//!
//! [`ModuleConfig::checkpoint_interval`]: super::config::ModuleConfig::checkpoint_interval

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;

use super::thread::{partition_dir, TaskThread};
use super::ModuleRuntime;
use crate::error::{Error, Result};
use crate::log::Log;
use crate::lsm::Store;

/// The kind byte of a depot append entry.
pub(super) const KIND_APPEND: u8 = 1;

/// Bytes of an append entry before its record (after the kind byte).
pub(super) const APPEND_HEAD_BYTES: usize = 2 + 4 + 8;

/// A depot append entry, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AppendEntry<'a> {
    pub depot: u16,
    pub task: u32,
    pub offset: u64,
    pub record: &'a [u8],
}

impl AppendEntry<'_> {
    /// Writes the entry (after its kind byte) into `b`, which is
    /// `APPEND_HEAD_BYTES + record.len()` long.
    pub(super) fn encode(&self, b: &mut [u8]) {
        b[0..2].copy_from_slice(&self.depot.to_le_bytes());
        b[2..6].copy_from_slice(&self.task.to_le_bytes());
        b[6..14].copy_from_slice(&self.offset.to_le_bytes());
        b[14..].copy_from_slice(self.record);
    }

    /// Reads a replog record; `None` for another kind of entry.
    pub(super) fn decode(record: &[u8]) -> Option<std::result::Result<AppendEntry<'_>, &'static str>> {
        let (&kind, body) = record.split_first()?;
        if kind != KIND_APPEND {
            return None;
        }
        if body.len() < APPEND_HEAD_BYTES {
            return Some(Err("a depot append entry shorter than its head"));
        }
        Some(Ok(AppendEntry {
            depot: u16::from_le_bytes(body[0..2].try_into().expect("2 bytes")),
            task: u32::from_le_bytes(body[2..6].try_into().expect("4 bytes")),
            offset: u64::from_le_bytes(body[6..14].try_into().expect("8 bytes")),
            record: &body[14..],
        }))
    }
}

/// Writes the depot appends the replog holds past what the partitions
/// hold into them, up to the store's applied end (a replica opened with
/// an apply limit leaves what lies past it to [`materialize`], once
/// applied), syncs the partitions, and lets the store trim the replog
/// below that end. Returns the records written.
pub(super) async fn replay(
    rt: &ModuleRuntime,
    store: &Store,
    tasks: &[u32],
    logs: &[Vec<Option<Log>>],
    tg: &Path,
) -> Result<u64> {
    let wal = store.wal();
    let end = store.applied_end().min(wal.end_offset());
    let written = materialize(rt, store, tasks, logs, tg, wal.start_offset(), end).await?;
    for log in logs.iter().flatten().flatten() {
        log.sync().await?;
    }
    store.set_trim_floor(end)?;
    Ok(written)
}

/// Writes the depot appends of the replog's entries `[from, end)` into
/// their partitions; those a partition already holds (by partition
/// offset) are skipped. Returns the records written.
pub(super) async fn materialize(
    rt: &ModuleRuntime,
    store: &Store,
    tasks: &[u32],
    logs: &[Vec<Option<Log>>],
    tg: &Path,
    from: u64,
    end: u64,
) -> Result<u64> {
    let wal = store.wal();
    let mut next = from;
    let mut written = 0;
    while next < end {
        for r in wal.read(next, end, 4 << 20).await? {
            next = r.offset + 1;
            let entry = match AppendEntry::decode(&r.payload) {
                None => continue,
                Some(Ok(e)) => e,
                Some(Err(why)) => {
                    return Err(Error::Corrupt {
                        path: wal.dir().to_path_buf(),
                        offset: r.offset,
                        position: 0,
                        reason: why.into(),
                    })
                }
            };
            // A depot this module no longer has (a later instance dropped
            // it): its entries have nowhere to go.
            let Some(d) = rt.depot_of_id(entry.depot) else {
                continue;
            };
            let log = tasks
                .iter()
                .position(|&t| t == entry.task)
                .and_then(|i| logs[d][i].as_ref())
                .ok_or_else(|| Error::Corrupt {
                    path: wal.dir().to_path_buf(),
                    offset: r.offset,
                    position: 0,
                    reason: format!(
                        "the task group log holds an append to partition {} of depot {}, which is not in \
                         this task group",
                        entry.task, rt.def.depots[d].name
                    ),
                })?;
            let have = log.next_offset();
            if entry.offset < have {
                continue;
            }
            if entry.offset > have {
                return Err(Error::Corrupt {
                    path: partition_dir(tg, entry.depot, entry.task),
                    offset: have,
                    position: 0,
                    reason: format!(
                        "the partition ends at offset {have} but the task group log's next record for it is \
                         {}: records in between are missing; restore the partition's files from a replica \
                         or a backup",
                        entry.offset
                    ),
                });
            }
            log.wait_room(entry.record.len()).await?;
            log.push_now(entry.record)?;
            written += 1;
        }
    }
    Ok(written)
}

/// One checkpoint: syncs every partition (so the appends applied so far
/// are on disk in them), lets the replog be trimmed below them, moves the
/// store's checkpoint if it holds nothing in memory, and flushes the
/// memtable when the replog holds more than `replog_entry_bytes_max`
/// bytes of appends past the tables (bounding the replog and the replay
/// at the next open).
pub(super) async fn checkpoint(th: &TaskThread) -> Result<()> {
    checkpoint_below(
        th.rt.config.replog_entry_bytes_max,
        &th.store,
        &th.logs,
        &th.trim_floor,
        th.store.applied_end(),
    )
    .await
}

/// A checkpoint that lets the replog be trimmed below `floor` at most
/// (every append below it is in its partition).
pub(super) async fn checkpoint_below(
    entry_bytes_max: u64,
    store: &Store,
    logs: &[Vec<Option<Log>>],
    trim_floor: &Cell<u64>,
    floor: u64,
) -> Result<()> {
    if floor > trim_floor.get() {
        for log in logs.iter().flatten().flatten() {
            log.sync().await?;
        }
        store.set_trim_floor(floor)?;
        trim_floor.set(floor);
    }
    store.checkpoint_if_idle()?;
    if store.entry_bytes() > entry_bytes_max {
        store.flush().await?;
    }
    Ok(())
}

/// Runs checkpoints every `checkpoint_interval` until cancelled; a
/// failure is logged (now and then) and tried again at the next one.
pub(super) async fn checkpoints(th: Rc<TaskThread>) {
    let mut failures = 0u32;
    loop {
        glommio::timer::sleep(th.rt.config.checkpoint_interval).await;
        match checkpoint(&th).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures.is_power_of_two() {
                    tracing::warn!(
                        "task thread {} of module {}: checkpoint failed ({failures} in a row): {e}",
                        th.thread,
                        th.rt.def.name
                    );
                }
            }
        }
    }
}
