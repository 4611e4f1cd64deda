//! One task thread of a module: its channels ([`links`]) and its state
//! (`TaskThread`: the task group's storage, opened from its directory,
//! its tasks' PStates, depot partitions and waiters). What runs on it is
//! elsewhere: the loops serving the channels in `serve.rs`, stage
//! batches in `dataflow.rs`, stream consumers in `stream.rs`, microbatches
//! in `microbatch.rs`.
//!
//! A thread has one bounded channel per kind of work: client requests,
//! topology depot appends (internal), microbatch control, and one per stage
//! level (stage `s >= 1` of any topology or query). Work on level `s` only
//! ever waits for work on levels above `s` (and for appends, which wait for
//! nothing but the disk), and every loop has its own bound on work in
//! flight, so bounded queues cannot deadlock: the highest level always
//! drains.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use glommio::sync::Semaphore;

use super::messages::{AppendResult, Control, Reply, Request, StageMsg};
use super::proxy::{as_one, Subscription};
use super::ModuleRuntime;
use crate::error::{Error, Result};
use crate::log::{Log, Placed};
use crate::lsm::{Store, WriteBatch};
use crate::module::TopologyKind;
use crate::pstate::{Overlay, PState, Queued};
use crate::sync::Waiters;
use crate::value::Value;

/// Channels into one task thread.
#[derive(Debug)]
pub(crate) struct ThreadLinks {
    pub client: flume::Sender<Request>,
    pub internal: flume::Sender<Request>,
    pub control: flume::Sender<Control>,
    /// `stages[s - 1]` carries batches for stage `s`.
    pub stages: Vec<flume::Sender<StageMsg>>,
}

/// The receiving ends, moved into the thread (the replicas of a
/// replicated thread share them; only the serving leader takes).
#[derive(Clone)]
pub(crate) struct ThreadInbox {
    pub client: flume::Receiver<Request>,
    pub internal: flume::Receiver<Request>,
    pub control: flume::Receiver<Control>,
    pub stages: Vec<flume::Receiver<StageMsg>>,
}

pub(crate) fn links(capacity: usize, levels: usize) -> (ThreadLinks, ThreadInbox) {
    let (client, client_rx) = flume::bounded(capacity);
    let (internal, internal_rx) = flume::bounded(capacity);
    let (control, control_rx) = flume::bounded(capacity);
    let (stages, stages_rx) = (0..levels).map(|_| flume::bounded(capacity)).unzip();
    (
        ThreadLinks {
            client,
            internal,
            control,
            stages,
        },
        ThreadInbox {
            client: client_rx,
            internal: internal_rx,
            control: control_rx,
            stages: stages_rx,
        },
    )
}

/// Microbatch writes of one task not yet committed: (id, attempt, writes).
pub(crate) type PendingWrites = (u64, u32, Overlay);

/// An `Ack` append waiting for the stream topologies reading its depot.
pub(super) struct AckWaiter {
    pub(super) remaining: usize,
    pub(super) ack_returns: BTreeMap<String, Value>,
    pub(super) error: Option<String>,
    pub(super) task: u32,
    pub(super) reply: Reply<AppendResult>,
    /// The log's writer generation of the append: after a failed write
    /// heals, a new record may take the offset of a lost one.
    pub(super) generation: u64,
}

/// Appends to one depot partition: those in the task group log on their
/// way to the partition, and what stream consumers wait for.
#[derive(Default)]
pub(super) struct Appended {
    /// Offset after the last record written to the partition's log
    /// (readable once that write completes).
    pub(super) enqueued_end: Cell<u64>,
    pub(super) waiters: Waiters,
    /// Appends placed in the task group log and not yet in the partition:
    /// (log offset, partition offset), in log order.
    inflight: RefCell<VecDeque<(u64, u64)>>,
    /// The task group log's writer generation `inflight` was placed under.
    generation: Cell<u64>,
    /// Why the partition takes no appends until its thread restarts (its
    /// log failed a write, so it no longer follows the task group log; a
    /// restart writes the missing records into it again).
    pub(super) broken: RefCell<Option<String>>,
}

impl Appended {
    /// The partition offset of an append placed in the task group log at
    /// `placed`: after the appends before it, those lost with a failed
    /// write of the log forgotten.
    pub(super) fn assign(&self, log: &Log, placed: Placed) -> u64 {
        let mut inflight = self.inflight.borrow_mut();
        if self.generation.get() != placed.generation {
            inflight.retain(|&(at, _)| at < placed.durable_end);
            self.generation.set(placed.generation);
        }
        let offset = inflight.back().map_or_else(|| log.next_offset(), |&(_, o)| o + 1);
        inflight.push_back((placed.offset, offset));
        offset
    }

    /// Writes an append that is durable in the task group log into the
    /// partition (in log order: entries are applied in order).
    pub(super) fn apply(&self, log: &Log, at: u64, offset: u64, record: &[u8]) {
        {
            let mut inflight = self.inflight.borrow_mut();
            if inflight.front().is_some_and(|&(a, _)| a == at) {
                inflight.pop_front();
            }
        }
        if self.broken.borrow().is_some() {
            return;
        }
        match log.push_now(record) {
            Ok(o) if o == offset => {
                self.enqueued_end.set(o + 1);
                self.waiters.wake_all();
            }
            Ok(o) => {
                *self.broken.borrow_mut() = Some(format!(
                    "its log placed record {offset} of the task group log at offset {o}"
                ))
            }
            Err(e) => *self.broken.borrow_mut() = Some(e.to_string()),
        }
    }
}

/// A task thread's state. Lives on the thread; reached through `Rc`.
pub(crate) struct TaskThread {
    pub rt: Arc<ModuleRuntime>,
    pub thread: u32,
    pub store: Store,
    pub tasks: Vec<u32>,
    /// The replog (the store's WAL) may be trimmed below this: every
    /// append below it is synced in its partition.
    pub(super) trim_floor: Rc<Cell<u64>>,
    /// `logs[depot][i]`: the partition of `tasks[i]` (`None`: a global
    /// depot's partition lives on task 0 only).
    pub(super) logs: Vec<Vec<Option<Log>>>,
    pub(super) appended: Vec<Vec<Appended>>,
    /// `pstates[i][pstate]`: the partitions of `tasks[i]`.
    pub(super) pstates: Vec<Vec<PState>>,
    /// `apply[i]`: held by the stream batch of `tasks[i]` between its first
    /// read and its commit, so batches on one task never interleave their
    /// read-modify-writes (no lost updates).
    pub(super) apply: Vec<Rc<Semaphore>>,
    /// `queued[i]`: stream writes of `tasks[i]` queued in the WAL but not
    /// yet visible in the store.
    pub(super) queued: Vec<RefCell<Queued>>,
    pub(super) queued_seq: Cell<u64>,
    pub(super) acks: RefCell<HashMap<(usize, u32), BTreeMap<u64, AckWaiter>>>,
    /// Microbatch writes not yet committed: (topology, task) -> (id,
    /// attempt, writes). Work of an older attempt arriving late (from a
    /// worker that lost its connection) never mixes into a newer one.
    pub pending: RefCell<HashMap<(usize, u32), PendingWrites>>,
    /// Microbatch topology -> the (id, attempt) this thread was told to
    /// process. Kept in memory only: a restarted thread has none, so the
    /// attempt it lost the work of cannot be prepared.
    pub begun: RefCell<HashMap<usize, (u64, u32)>>,
    pub(super) subscriptions: RefCell<Vec<Subscription>>,
    pub stopping: Cell<bool>,
    pub stop_waiters: Waiters,
    /// Appends being handled (between their request and their answer).
    pub(super) appends: Cell<usize>,
    pub(super) appends_done: Waiters,
    /// Set once stopping and no append is in flight: stream consumers drain
    /// what is appended and stop.
    pub(super) draining: Cell<bool>,
    pub(super) shuffle: Cell<u32>,
    /// Stream consumers and microbatch coordinators.
    pub(super) workers: RefCell<Vec<glommio::Task<()>>>,
}

/// Task threads whose state is alive in this process (a thread's state is
/// freed when its thread stops; see [`super::live_task_threads`]).
pub(crate) static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for TaskThread {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl TaskThread {
    pub(super) fn index(&self, task: u32) -> Result<usize> {
        self.tasks.iter().position(|&t| t == task).ok_or_else(|| {
            Error::Schema(format!(
                "task {task} is not on task thread {}; the request was routed wrongly",
                self.thread
            ))
        })
    }

    pub fn log(&self, depot: usize, task: u32) -> Result<&Log> {
        let i = self.index(task)?;
        self.logs[depot][i].as_ref().ok_or_else(|| {
            Error::Schema(format!(
                "global depot {} has no partition on task {task}",
                self.rt.def.depots[depot].name
            ))
        })
    }

    pub fn pstates_of(&self, task: u32) -> Result<&[PState]> {
        Ok(&self.pstates[self.index(task)?])
    }

    pub(super) fn appended(&self, depot: usize, task: u32) -> Result<&Appended> {
        Ok(&self.appended[depot][self.index(task)?])
    }

    /// Writes `batch` (durable and visible on return), then pushes changes
    /// to the proxies of partitions it touched.
    pub async fn write(&self, batch: WriteBatch) -> Result<()> {
        let touched = Self::touched(&batch);
        self.store.write(batch).await?;
        self.notify(&touched);
        Ok(())
    }

    /// The (task, PState id) partitions `batch` writes to.
    pub(super) fn touched(batch: &WriteBatch) -> Vec<(u32, u16)> {
        let mut touched = Vec::new();
        for (key, _) in batch.ops() {
            if key.len() >= 6 {
                let part = (
                    u32::from_be_bytes(key[0..4].try_into().expect("4 bytes")),
                    u16::from_be_bytes(key[4..6].try_into().expect("2 bytes")),
                );
                if !touched.contains(&part) {
                    touched.push(part);
                }
            }
        }
        touched
    }

    /// Pushes changes to the proxies of the `touched` partitions.
    pub(super) fn notify(&self, touched: &[(u32, u16)]) {
        let mut subs = self.subscriptions.borrow_mut();
        subs.retain_mut(|s| {
            if !touched.contains(&(s.task, s.pstate as u16)) {
                return true;
            }
            let now = match self
                .pstates_of(s.task)
                .and_then(|p| p[s.pstate].select(&self.store, &s.path))
            {
                Ok(v) => as_one(v),
                // The path was checked when subscribing; a read error drops
                // the subscription (the proxy sees its channel close).
                Err(_) => return false,
            };
            s.update(now)
        });
    }

    pub(super) fn next_shuffle(&self) -> u32 {
        let n = self.shuffle.get();
        self.shuffle.set(n.wrapping_add(1));
        n
    }
}

/// The directory of depot partition `task` of the depot with stable id
/// `depot` inside a task group's directory.
pub(super) fn partition_dir(tg: &Path, depot: u16, task: u32) -> std::path::PathBuf {
    tg.join(format!("depot-{depot}")).join(format!("task-{task}"))
}

/// A task group's storage: its store (whose WAL is the task group log)
/// and its depot partitions, as opened from its directory. Clones share
/// them.
#[derive(Clone)]
pub(crate) struct Storage {
    pub store: Store,
    /// `logs[depot][i]`: the partition of the group's task `i` (see
    /// [`TaskThread::logs`]).
    pub(super) logs: Vec<Vec<Option<Log>>>,
    /// The replog may be trimmed below this (see [`TaskThread::trim_floor`]).
    pub(super) trim_floor: Rc<Cell<u64>>,
    pub(super) tasks: Vec<u32>,
    pub(super) dir: std::path::PathBuf,
}

impl Storage {
    /// Closes the partitions, then the store.
    pub(super) async fn close(&self) -> Result<()> {
        for depot in &self.logs {
            for log in depot.iter().flatten() {
                log.close().await?;
            }
        }
        self.store.close().await
    }
}

/// Opens the thread's storage in its task group's directory under the
/// module's directory `dir`, applying the task group log below
/// `apply_limit` (`u64::MAX`: all of it; a replica opens with 0, which
/// applies what the tables hold and leaves the rest to its leader's word),
/// and writes the depot appends applied into their partitions.
pub(crate) async fn open_storage(rt: &ModuleRuntime, thread: u32, dir: &Path, apply_limit: u64) -> Result<Storage> {
    let tasks = rt.placement.tasks_of_thread(thread);
    let def = &rt.def;
    let tg = super::launched::task_group_dir(dir, thread);
    // The store's WAL is the task group log: it takes every depot record
    // too, whatever the store's own limits.
    let mut lsm = rt.config.lsm.clone();
    let entry_max = rt.config.log.record_bytes_max as usize + 1 + super::replog::APPEND_HEAD_BYTES;
    lsm.wal.record_bytes_max = lsm.wal.record_bytes_max.max(entry_max as u32);
    lsm.wal.pending_bytes_max = lsm.wal.pending_bytes_max.max(2 * entry_max + 64);
    lsm.wal.segment_bytes_max = lsm.wal.segment_bytes_max.max(2 * entry_max as u64 + 64);
    let (store, _) = Store::open_limited(tg.join("pstates"), lsm, apply_limit).await?;
    let partition_config = crate::log::LogConfig {
        sync: false,
        prewrite_bytes: 0,
        ..rt.config.log.clone()
    };
    let mut logs = Vec::new();
    for (d, depot) in def.depots.iter().enumerate() {
        let mut per_task = Vec::new();
        for &task in &tasks {
            if depot.global && task != 0 {
                per_task.push(None);
                continue;
            }
            let (log, _) = Log::open(partition_dir(&tg, rt.depot_ids[d], task), partition_config.clone()).await?;
            per_task.push(Some(log));
        }
        logs.push(per_task);
    }
    super::replog::replay(rt, &store, &tasks, &logs, &tg).await?;
    let trim_floor = Rc::new(Cell::new(store.wal().end_offset().min(store.applied_end())));
    Ok(Storage {
        store,
        logs,
        trim_floor,
        tasks,
        dir: tg,
    })
}

/// Opens the thread's storage in its task group's directory under the
/// module's directory `dir`.
pub(crate) async fn open(rt: Arc<ModuleRuntime>, thread: u32, dir: &Path) -> Result<Rc<TaskThread>> {
    let storage = open_storage(&rt, thread, dir, u64::MAX).await?;
    assemble(rt, thread, &storage)
}

/// The task thread over `storage`, every entry of whose log below its
/// applied end is in its partitions.
pub(crate) fn assemble(rt: Arc<ModuleRuntime>, thread: u32, storage: &Storage) -> Result<Rc<TaskThread>> {
    let Storage {
        store,
        logs,
        trim_floor,
        tasks,
        dir: tg,
    } = storage.clone();
    let def = &rt.def;
    let mut appended = Vec::new();
    for per_task in &logs {
        appended.push(
            per_task
                .iter()
                .map(|l| {
                    let a = Appended::default();
                    a.enqueued_end.set(l.as_ref().map_or(0, Log::end_offset));
                    a.generation.set(store.generation());
                    a
                })
                .collect(),
        );
    }
    check_stream_offsets(&rt, &store, &tasks, &logs, &tg)?;
    let mut pstates = Vec::new();
    for &t in &tasks {
        let per_task = def
            .pstates
            .iter()
            .enumerate()
            .map(|(i, p)| PState::new(p.name.clone(), t, rt.pstate_ids[i], p.schema.clone()))
            .collect::<Result<Vec<_>>>()?;
        pstates.push(per_task);
    }
    let apply = tasks.iter().map(|_| Rc::new(Semaphore::new(1))).collect();
    LIVE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Rc::new(TaskThread {
        apply,
        queued: tasks.iter().map(|_| RefCell::new(Queued::new())).collect(),
        queued_seq: Cell::new(0),
        rt,
        thread,
        store,
        tasks,
        trim_floor,
        logs,
        appended,
        pstates,
        acks: RefCell::new(HashMap::new()),
        pending: RefCell::new(HashMap::new()),
        begun: RefCell::new(HashMap::new()),
        subscriptions: RefCell::new(Vec::new()),
        stopping: Cell::new(false),
        stop_waiters: Waiters::default(),
        appends: Cell::new(0),
        appends_done: Waiters::default(),
        draining: Cell::new(false),
        shuffle: Cell::new(0),
        workers: RefCell::new(Vec::new()),
    }))
}

/// Refuses to start a thread whose stream consumers committed offsets past
/// the end of their depot partitions: the records they acknowledged are
/// missing from the log, and new appends would get offsets the consumer
/// never reads.
pub(super) fn check_stream_offsets(
    rt: &ModuleRuntime,
    store: &Store,
    tasks: &[u32],
    logs: &[Vec<Option<Log>>],
    dir: &Path,
) -> Result<()> {
    for topology in rt.def.topologies.iter().filter(|t| t.kind == TopologyKind::Stream) {
        for &d in &topology.sources {
            for (i, &task) in tasks.iter().enumerate() {
                let Some(log) = &logs[d][i] else { continue };
                let key = offset_key(task, &topology.name, rt.depot_ids[d]);
                let Some(committed) = read_offset(store, &key, &topology.name)? else {
                    continue;
                };
                if committed > log.end_offset() {
                    return Err(Error::Corrupt {
                        path: partition_dir(dir, rt.depot_ids[d], task),
                        offset: log.end_offset(),
                        position: 0,
                        reason: format!(
                            "stream topology {} processed partition {task} of depot {} up to offset {committed}, \
                             past the log's end {}: records are missing from the log; restore the depot's files \
                             from a replica or a backup",
                            topology.name,
                            rt.def.depots[d].name,
                            log.end_offset()
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// A stream consumer's committed offset, if it committed one.
pub(super) fn read_offset(store: &Store, key: &[u8], topology: &str) -> Result<Option<u64>> {
    match store.get(key)? {
        Some(b) => Ok(Some(u64::from_le_bytes(b.as_slice().try_into().map_err(|_| {
            Error::Corrupt {
                path: store.wal().dir().to_path_buf(),
                offset: 0,
                position: 0,
                reason: format!("stream offset of {topology} is {} bytes, not 8", b.len()),
            }
        })?))),
        None => Ok(None),
    }
}

/// The key under which a stream consumer keeps its committed offset
/// (`depot`: the depot's stable id).
pub(super) fn offset_key(task: u32, topology: &str, depot: u16) -> Vec<u8> {
    let mut k = super::meta_key(task, b'o', topology);
    k.extend_from_slice(&depot.to_be_bytes());
    k
}

/// Whether `e` is storage that cannot take writes for now (a failed write
/// poisoned a log that heals itself, an I/O error such as a full device):
/// work that met it is run again later, never counted as failed.
pub(super) fn storage_unavailable(e: &Error) -> bool {
    matches!(e, Error::Poisoned { .. } | Error::Io { .. })
}
