//! One task thread of a module: its storage, the loops serving its
//! channels, and the running of stage batches.
//!
//! A thread has one bounded channel per kind of work: client requests,
//! topology depot appends (internal), microbatch control, and one per stage
//! level (stage `s >= 1` of any topology or query). Work on level `s` only
//! ever waits for work on levels above `s` (and for appends, which wait for
//! nothing but the disk), and every loop has its own bound on work in
//! flight, so bounded queues cannot deadlock: the highest level always
//! drains.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use glommio::sync::Semaphore;

use super::messages::{decode_items, encode_items, AppendResult, Completion, Control, Flow, Reply, Request, StageMsg};
use super::proxy::{as_one, ProxyEvent, Subscription};
use super::{microbatch, AckLevel, FaultPoint, ModuleRuntime};
use crate::error::{Error, Result};
use crate::log::Log;
use crate::lsm::{Store, WriteBatch};
use crate::module::topology::{Mode, Outputs, StageCtx, To};
use crate::module::{Partitioner, TopologyKind};
use crate::pstate::{Overlay, PState, Queued, Tx};
use crate::runtime::partition::task_for_key;
use crate::sync::Waiters;
use crate::value::{archived, Value};

/// Channels into one task thread.
#[derive(Debug)]
pub(crate) struct ThreadLinks {
    pub client: flume::Sender<Request>,
    pub internal: flume::Sender<Request>,
    pub control: flume::Sender<Control>,
    /// `stages[s - 1]` carries batches for stage `s`.
    pub stages: Vec<flume::Sender<StageMsg>>,
}

/// The receiving ends, moved into the thread.
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
struct AckWaiter {
    remaining: usize,
    ack_returns: BTreeMap<String, Value>,
    error: Option<String>,
    task: u32,
    reply: Reply<AppendResult>,
    /// The log's writer generation of the append: after a failed write
    /// heals, a new record may take the offset of a lost one.
    generation: u64,
}

/// Appends to one depot partition, for the stream consumers reading it.
#[derive(Default)]
struct Appended {
    /// Offset after the last record queued.
    enqueued_end: Cell<u64>,
    waiters: Waiters,
}

/// A task thread's state. Lives on the thread; reached through `Rc`.
pub(crate) struct TaskThread {
    pub rt: Arc<ModuleRuntime>,
    pub thread: u32,
    pub store: Store,
    pub tasks: Vec<u32>,
    /// `logs[depot][i]`: the partition of `tasks[i]` (`None`: a global
    /// depot's partition lives on task 0 only).
    logs: Vec<Vec<Option<Log>>>,
    appended: Vec<Vec<Appended>>,
    /// `pstates[i][pstate]`: the partitions of `tasks[i]`.
    pstates: Vec<Vec<PState>>,
    /// `apply[i]`: held by the stream batch of `tasks[i]` between its first
    /// read and its commit, so batches on one task never interleave their
    /// read-modify-writes (no lost updates).
    apply: Vec<Rc<Semaphore>>,
    /// `queued[i]`: stream writes of `tasks[i]` queued in the WAL but not
    /// yet visible in the store.
    queued: Vec<RefCell<Queued>>,
    queued_seq: Cell<u64>,
    acks: RefCell<HashMap<(usize, u32), BTreeMap<u64, AckWaiter>>>,
    /// Microbatch writes not yet committed: (topology, task) -> (id,
    /// attempt, writes). Work of an older attempt arriving late (from a
    /// worker that lost its connection) never mixes into a newer one.
    pub pending: RefCell<HashMap<(usize, u32), PendingWrites>>,
    /// Microbatch topology -> the (id, attempt) this thread was told to
    /// process. Kept in memory only: a restarted thread has none, so the
    /// attempt it lost the work of cannot be prepared.
    pub begun: RefCell<HashMap<usize, (u64, u32)>>,
    subscriptions: RefCell<Vec<Subscription>>,
    pub stopping: Cell<bool>,
    pub stop_waiters: Waiters,
    /// Appends being handled (between their request and their answer).
    appends: Cell<usize>,
    appends_done: Waiters,
    /// Set once stopping and no append is in flight: stream consumers drain
    /// what is appended and stop.
    draining: Cell<bool>,
    shuffle: Cell<u32>,
    /// Stream consumers and microbatch coordinators.
    workers: RefCell<Vec<glommio::Task<()>>>,
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
    fn index(&self, task: u32) -> Result<usize> {
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

    fn appended(&self, depot: usize, task: u32) -> Result<&Appended> {
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
    fn touched(batch: &WriteBatch) -> Vec<(u32, u16)> {
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
    fn notify(&self, touched: &[(u32, u16)]) {
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

    fn next_shuffle(&self) -> u32 {
        let n = self.shuffle.get();
        self.shuffle.set(n.wrapping_add(1));
        n
    }
}

/// The directory of depot partition `task` of the depot with stable id
/// `depot` inside a task group's directory.
fn partition_dir(tg: &Path, depot: u16, task: u32) -> std::path::PathBuf {
    tg.join(format!("depot-{depot}")).join(format!("task-{task}"))
}

/// Opens the thread's storage in its task group's directory under the
/// module's directory `dir`.
pub(crate) async fn open(rt: Arc<ModuleRuntime>, thread: u32, dir: &Path) -> Result<Rc<TaskThread>> {
    let tasks = rt.placement.tasks_of_thread(thread);
    let def = &rt.def;
    let tg = super::task_group_dir(dir, thread);
    let (store, _) = Store::open(tg.join("pstates"), rt.config.lsm.clone()).await?;
    let mut logs = Vec::new();
    let mut appended = Vec::new();
    for (d, depot) in def.depots.iter().enumerate() {
        let mut per_task = Vec::new();
        for &task in &tasks {
            if depot.global && task != 0 {
                per_task.push(None);
                continue;
            }
            let (log, _) = Log::open(partition_dir(&tg, rt.depot_ids[d], task), rt.config.log.clone()).await?;
            per_task.push(Some(log));
        }
        appended.push(
            per_task
                .iter()
                .map(|l| {
                    let a = Appended::default();
                    a.enqueued_end.set(l.as_ref().map_or(0, Log::end_offset));
                    a
                })
                .collect(),
        );
        logs.push(per_task);
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
fn check_stream_offsets(
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
fn read_offset(store: &Store, key: &[u8], topology: &str) -> Result<Option<u64>> {
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

/// Runs a thread until `Shutdown`: serves its channels, runs its stream
/// consumers (and the microbatch coordinators if it owns task 0), then
/// closes its storage.
pub(crate) async fn run(th: Rc<TaskThread>, inbox: ThreadInbox) -> Result<()> {
    let ThreadInbox {
        client,
        internal,
        control,
        stages,
    } = inbox;
    let mut loops = Vec::new();
    {
        let th = th.clone();
        loops.push(serve_loop(internal, th.rt.config.internal_inflight, move |r| {
            let th = th.clone();
            async move { handle_request(&th, r).await }
        }));
    }
    {
        let th = th.clone();
        loops.push(serve_loop(control, th.rt.config.control_inflight, move |c| {
            let th = th.clone();
            async move { microbatch::handle_control(&th, c).await }
        }));
    }
    for rx in stages {
        let th = th.clone();
        loops.push(serve_loop(rx, th.rt.config.stage_inflight, move |m: StageMsg| {
            let th = th.clone();
            async move {
                let completion = match decode_items(&m.items) {
                    Ok(items) => run_batch(&th, m.flow, m.stage, m.task, None, items).await,
                    Err(e) => Completion {
                        fatal: Some(e.to_string()),
                        ..Completion::default()
                    },
                };
                let _ = m.reply.send(completion);
            }
        }));
    }
    // Stream consumers: one per (stream topology, source depot, task).
    let mut workers = Vec::new();
    for (t, topology) in th.rt.def.topologies.iter().enumerate() {
        match topology.kind {
            TopologyKind::Stream => {
                for &d in &topology.sources {
                    for &task in &th.tasks {
                        if th.rt.def.depots[d].global && task != 0 {
                            continue;
                        }
                        let th = th.clone();
                        workers.push(glommio::spawn_local(async move { consume(th, t, d, task).await }));
                    }
                }
            }
            TopologyKind::Microbatch => {
                if th.tasks.contains(&0) {
                    let th = th.clone();
                    workers.push(glommio::spawn_local(async move { microbatch::coordinate(th, t).await }));
                }
            }
        }
    }
    th.workers.borrow_mut().extend(workers);
    // Client requests until shutdown.
    let permits = Rc::new(Semaphore::new(th.rt.config.client_inflight));
    while let Ok(request) = client.recv_async().await {
        if matches!(request, Request::Shutdown) {
            break;
        }
        if th.stopping.get() {
            // Stopping: consumers are draining what was appended before;
            // a new append is refused before it is written, so no caller
            // gets an error for a record that is durable.
            if let Request::Append { reply: Some(reply), .. } = request {
                let _ = reply.send(Err(Error::Closed(format!(
                    "module {} is stopping; the append was not taken",
                    th.rt.def.name
                ))));
                continue;
            }
        }
        let Ok(permit) = permits.acquire_static_permit(1).await else {
            break;
        };
        let th = th.clone();
        glommio::spawn_local(async move {
            handle_request(&th, request).await;
            drop(permit);
        })
        .detach();
    }
    quiesce(&th).await;
    // Waiters left (their record was taken while its consumer had already
    // stopped, e.g. a topology append) get an answer rather than none.
    for (_, waiting) in th.acks.borrow_mut().drain() {
        for (offset, w) in waiting {
            let _ = w.reply.send(Err(Error::Closed(format!(
                "module {} stopped before record {offset} was processed; it is durable and is processed \
                 after a restart",
                th.rt.def.name
            ))));
        }
    }
    let closed = async {
        for depot in &th.logs {
            for log in depot.iter().flatten() {
                log.close().await?;
            }
        }
        th.store.close().await
    }
    .await;
    // The serve loops hold `th`, and `th.rt` holds senders of their own
    // channels, so they never end by themselves: cancel them, or this
    // thread's state (memtables, caches, logs) would outlive the cluster.
    for l in loops {
        l.cancel();
        let _ = l.await;
    }
    // Requests that arrived after the last one taken are dropped (their
    // callers get `Closed`), and later sends fail at once.
    drop(client.drain());
    drop(client);
    closed
}

/// Stops the stream consumers and microbatch coordinators after the batch
/// each is running.
async fn quiesce(th: &TaskThread) {
    th.stopping.set(true);
    // New client appends are refused from here; the ones already being
    // handled finish first, so their records (and `Ack` waiters) are known
    // before consumers decide they have drained everything.
    th.appends_done.wait(|| (th.appends.get() == 0).then_some(())).await;
    th.draining.set(true);
    th.stop_waiters.wake_all();
    for d in &th.appended {
        for a in d {
            a.waiters.wake_all();
        }
    }
    let workers = std::mem::take(&mut *th.workers.borrow_mut());
    for w in workers {
        w.await;
    }
}

/// Serves `rx` with at most `inflight` handlers running at once.
fn serve_loop<M: 'static, F, Fut>(rx: flume::Receiver<M>, inflight: u64, handler: F) -> glommio::task::JoinHandle<()>
where
    F: Fn(M) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    glommio::spawn_local(async move {
        let permits = Rc::new(Semaphore::new(inflight));
        while let Ok(m) = rx.recv_async().await {
            let Ok(permit) = permits.acquire_static_permit(1).await else {
                return;
            };
            let fut = handler(m);
            glommio::spawn_local(async move {
                fut.await;
                drop(permit);
            })
            .detach();
        }
    })
    .detach()
}

async fn handle_request(th: &Rc<TaskThread>, request: Request) {
    match request {
        Request::Append {
            depot,
            task,
            record,
            ack,
            reply,
        } => {
            th.appends.set(th.appends.get() + 1);
            append(th, depot, task, record, ack, reply).await;
            th.appends.set(th.appends.get() - 1);
            th.appends_done.wake_all();
        }
        Request::Read {
            depot,
            task,
            start,
            end,
            bytes_max,
            reply,
        } => {
            let result = match th.log(depot, task) {
                Ok(log) => log
                    .read(start, end, bytes_max)
                    .await
                    .map(|records| records.into_iter().map(|r| (r.offset, r.payload)).collect()),
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Request::Select {
            pstate,
            task,
            path,
            reply,
        } => {
            let result = th.pstates_of(task).and_then(|p| p[pstate].select(&th.store, &path));
            let _ = reply.send(result);
        }
        Request::Invoke {
            query,
            task,
            args,
            reply,
        } => {
            let _ = reply.send(invoke(th, query, task, &args).await);
        }
        Request::Subscribe {
            pstate,
            task,
            path,
            events,
            reply,
        } => {
            let result = th.pstates_of(task).and_then(|p| p[pstate].select(&th.store, &path));
            let _ = reply.send(result.map(|initial| {
                let initial = as_one(initial);
                // A new channel has room for the first event.
                let _ = events.try_send(ProxyEvent::Initial(initial.clone()));
                th.subscriptions.borrow_mut().push(Subscription {
                    pstate,
                    task,
                    path,
                    last: initial,
                    events,
                    stale: false,
                });
            }));
        }
        Request::Quiesce { reply } => {
            quiesce(th).await;
            let _ = reply.send(Ok(()));
        }
        Request::Shutdown => {}
    }
}

async fn append(
    th: &Rc<TaskThread>,
    depot: usize,
    task: u32,
    record: Vec<u8>,
    ack: AckLevel,
    reply: Option<Reply<AppendResult>>,
) {
    let send = |r: Result<AppendResult>| {
        if let Some(reply) = &reply {
            let _ = reply.send(r);
        }
    };
    let (log, appended) = match th.log(depot, task).and_then(|l| Ok((l, th.appended(depot, task)?))) {
        Ok(x) => x,
        Err(e) => return send(Err(e)),
    };
    let queued = match log.enqueue_batch(std::iter::once(record.as_slice())).await {
        Ok(q) => q,
        Err(e) => return send(Err(e)),
    };
    let offset = queued.range.start;
    let generation = log.generation();
    let consumers = th.rt.stream_consumers[depot];
    let waits_for_processing = ack == AckLevel::Ack && consumers > 0 && reply.is_some();
    if waits_for_processing {
        // Registered before the record is durable, so before any consumer
        // can read it.
        th.acks.borrow_mut().entry((depot, task)).or_default().insert(
            offset,
            AckWaiter {
                remaining: consumers,
                ack_returns: BTreeMap::new(),
                error: None,
                task,
                reply: reply.clone().expect("checked"),
                generation,
            },
        );
    }
    appended
        .enqueued_end
        .set(appended.enqueued_end.get().max(queued.range.end));
    appended.waiters.wake_all();
    if let Err(e) = log.wait_enqueued(&queued).await {
        if waits_for_processing {
            if let Some(m) = th.acks.borrow_mut().get_mut(&(depot, task)) {
                // Only this append's waiter: a later append may hold the
                // offset by now.
                if m.get(&offset).is_some_and(|w| w.generation == generation) {
                    m.remove(&offset);
                }
            }
        }
        return send(Err(e));
    }
    if !waits_for_processing {
        send(Ok(AppendResult {
            task,
            offset: (ack != AckLevel::None).then_some(offset),
            ack_returns: BTreeMap::new(),
        }));
    }
}

async fn invoke(th: &Rc<TaskThread>, query: usize, task: u32, args: &[u8]) -> Result<Value> {
    let def = &th.rt.def.queries[query];
    let args = archived::from_bytes(args).map_err(|e| Error::Schema(format!("query arguments: {e}")))?;
    let mut completion = run_batch(th, Flow::Query(query), 0, task, None, vec![(0, args.clone())]).await;
    if let Some(why) = completion.attempt_failure() {
        return Err(Error::Topology(format!("query {} failed: {why}", def.name)));
    }
    (def.aggregate)(&args, completion.results)
        .map_err(|e| Error::Topology(format!("query {} failed in its aggregator: {e}", def.name)))
}

/// Runs stage `stage` of `flow` on `task` over `items`, then everything
/// downstream of it; returns how it all ended.
pub(crate) async fn run_batch(
    th: &Rc<TaskThread>,
    flow: Flow,
    stage: usize,
    task: u32,
    source: Option<usize>,
    items: Vec<(u64, Value)>,
) -> Completion {
    let rt = th.rt.clone();
    let def = &rt.def;
    let (stages, mode) = match flow {
        Flow::Stream(t) => (&def.topologies[t].stages, Mode::Stream),
        Flow::Microbatch { topology, id, attempt } => {
            (&def.topologies[topology].stages, Mode::Microbatch { id, attempt })
        }
        Flow::Query(q) => (&def.queries[q].stages, Mode::Query),
    };
    let fatal = |why: String| Completion {
        fatal: Some(why),
        ..Completion::default()
    };
    let Some(f) = stages.get(stage) else {
        return fatal(format!("stage {stage} does not exist"));
    };
    let last = stage + 1 == stages.len();
    let pstates = match th.pstates_of(task) {
        Ok(p) => p,
        Err(e) => return fatal(e.to_string()),
    };
    let source_name = source.map(|d| def.depots[d].name.as_str());
    let mut done = Completion::default();
    let apply = match (mode, th.index(task)) {
        (Mode::Stream, Ok(i)) => Some(th.apply[i].clone()),
        _ => None,
    };
    let applying = match &apply {
        Some(sem) => match sem.acquire_permit(1).await {
            Ok(p) => Some(p),
            Err(e) => return fatal(format!("task {task} is stopping: {e}")),
        },
        None => None,
    };
    // The store's writer generation the batch reads under: if a queued
    // write it reads through fails meanwhile, its own writes must not be
    // stored (they were computed from state that was lost).
    let generation = th.store.generation();
    // Run the stage locally. A stream batch leaves out records that fail
    // (their writes are dropped by running the batch again without them).
    let (out, writes) = loop {
        let overlay = match flow {
            Flow::Microbatch { topology, id, attempt } => match th.pending.borrow_mut().remove(&(topology, task)) {
                Some((pending_id, pending_attempt, o)) if (pending_id, pending_attempt) == (id, attempt) => o,
                _ => Overlay::new(),
            },
            _ => Overlay::new(),
        };
        let mut tx = match (mode, th.index(task)) {
            // Stream batches read through the writes earlier batches of
            // this task queued but the store does not show yet.
            (Mode::Stream, Ok(i)) => Tx::over_queued(&th.store, &th.queued[i]),
            _ => Tx::with_overlay(&th.store, overlay),
        };
        let mut out = Outputs::default();
        let mut failed_now = None;
        for (origin, value) in &items {
            if done.failed.contains_key(origin) {
                continue;
            }
            let emits_before = out.emits.len();
            let mut ctx = StageCtx {
                def,
                task,
                tasks: rt.placement.parallelism.tasks,
                pstates,
                tx: &mut tx,
                mode,
                source: source_name,
                origin: *origin,
                out: &mut out,
            };
            let injected = rt.fault.as_ref().is_some_and(|hook| {
                hook(&FaultPoint {
                    topology: flow_topology_name(def, flow),
                    task,
                    stage,
                    microbatch: ctx.microbatch(),
                    origin: *origin,
                    value,
                })
            });
            let mut result = if injected {
                Err(Error::Topology("fault injected by the test hook".into()))
            } else {
                f(&mut ctx, value.clone())
            };
            if result.is_ok() {
                if let Some((_, to, _)) = out.emits[emits_before..]
                    .iter()
                    .find(|(_, to, _)| (last && *to != To::Origin) || (*to == To::Origin && mode != Mode::Query))
                {
                    result = Err(Error::Topology(if *to == To::Origin {
                        "only query stages may emit to To::Origin".to_string()
                    } else {
                        format!("stage {stage} is the last stage; it cannot emit to {to:?}")
                    }));
                }
            }
            if let Err(e) = result {
                let why = format!("{} stage {stage} on task {task}: {e}", flow_name(def, flow));
                if mode == Mode::Stream {
                    failed_now = Some((*origin, why));
                    break;
                }
                if let Flow::Microbatch { topology, id, attempt } = flow {
                    th.pending
                        .borrow_mut()
                        .insert((topology, task), (id, attempt, tx.into_overlay()));
                }
                return fatal(why);
            }
        }
        match failed_now {
            Some((origin, why)) => {
                done.failed.insert(origin, why);
            }
            None => break (out, tx.into_overlay()),
        }
    };
    match flow {
        Flow::Stream(_) => {
            // The permit is released here in every case: downstream stages
            // may run on this same task and need it.
            if writes.is_empty() {
                drop(applying);
            } else if let Err(e) = commit_stream(th, task, writes, applying, generation).await {
                if storage_unavailable(&e) {
                    // Not the records' fault (a full disk, say): nothing was
                    // applied; the batch runs again once storage heals,
                    // never counted as a record failure.
                    done.unavailable
                        .get_or_insert_with(|| format!("writing PState changes: {e}"));
                } else {
                    for (o, _) in &items {
                        done.failed
                            .entry(*o)
                            .or_insert_with(|| format!("writing PState changes: {e}"));
                    }
                }
                return done;
            }
        }
        Flow::Microbatch { topology, id, attempt } => {
            th.pending.borrow_mut().insert((topology, task), (id, attempt, writes));
        }
        Flow::Query(_) => {}
    }
    done.ack_returns.extend(out.ack_returns);
    // Depot appends made by the stage.
    let mut appends = Vec::new();
    for (origin, d, record) in out.appends {
        appends.push((origin, topology_append(th, d, task, &record)));
    }
    // Emits, one batch per destination task.
    let tasks = rt.placement.parallelism.tasks;
    let mut by_task: BTreeMap<u32, Vec<(u64, Value)>> = BTreeMap::new();
    for (origin, to, value) in out.emits {
        match to {
            To::Origin => done.results.push(value),
            To::Local => by_task.entry(task).or_default().push((origin, value)),
            To::Global => by_task.entry(0).or_default().push((origin, value)),
            To::Hash(k) => by_task
                .entry(task_for_key(&k, tasks))
                .or_default()
                .push((origin, value)),
            To::Shuffle => by_task
                .entry(th.next_shuffle() % tasks)
                .or_default()
                .push((origin, value)),
            To::All => {
                for t in 0..tasks {
                    by_task.entry(t).or_default().push((origin, value.clone()));
                }
            }
        }
    }
    let mut replies = Vec::new();
    let mut local = Vec::new();
    for (to_task, batch) in by_task {
        let thread = rt.placement.thread_of_task[to_task as usize] as usize;
        if thread == th.thread as usize {
            // Same thread: no encoding, no channel. Bounded all the same:
            // this batch waits for it, and stages are finitely deep.
            let th = th.clone();
            let next: std::pin::Pin<Box<dyn std::future::Future<Output = Completion>>> =
                Box::pin(async move { run_batch(&th, flow, stage + 1, to_task, None, batch).await });
            local.push(glommio::spawn_local(next));
            continue;
        }
        let (tx, rx) = flume::bounded(1);
        let msg = StageMsg {
            flow,
            stage: stage + 1,
            task: to_task,
            items: encode_items(&batch),
            reply: tx,
        };
        let origins: Vec<u64> = batch.iter().map(|(o, _)| *o).collect();
        match rt.links[thread].stages[stage].send_async(msg).await {
            Ok(()) => replies.push((rx, origins)),
            Err(_) => fail_all(&mut done, &origins, mode, "the module is stopping"),
        }
    }
    for (origin, pending) in appends {
        match pending.await {
            Ok(()) => {}
            Err(e) if matches!(e, Error::Unavailable(_)) || storage_unavailable(&e) => {
                done.unavailable.get_or_insert_with(|| format!("depot append: {e}"));
            }
            Err(e) => fail_all(&mut done, &[origin], mode, &format!("depot append: {e}")),
        }
    }
    for task in local {
        done.merge(task.await);
    }
    for (rx, origins) in replies {
        match rx.recv_async().await {
            Ok(c) => done.merge(c),
            Err(_) => fail_all(&mut done, &origins, mode, "the module is stopping"),
        }
    }
    done
}

/// Commits a stream batch's writes. The batch takes its place in the WAL
/// while `applying` (the task's apply permit) is held, then the permit is
/// released and the next batch of the task runs while this one becomes
/// durable: it reads these writes from the task's queued layers.
async fn commit_stream(
    th: &TaskThread,
    task: u32,
    writes: Overlay,
    applying: Option<glommio::sync::Permit<'_>>,
    generation: u64,
) -> Result<()> {
    let mut batch = WriteBatch::new();
    for (k, v) in &writes {
        match v {
            Some(v) => batch.put(k, v),
            None => batch.delete(k),
        };
    }
    let touched = TaskThread::touched(&batch);
    let queued = th.store.enqueue_under(batch, generation).await?;
    let i = th.index(task)?;
    let seq = th.queued_seq.get();
    th.queued_seq.set(seq + 1);
    let keys: Vec<Vec<u8>> = writes.keys().cloned().collect();
    {
        let mut q = th.queued[i].borrow_mut();
        for (k, v) in writes {
            q.insert(k, (seq, v));
        }
    }
    drop(applying);
    let written = th.store.wait_written(queued).await;
    {
        // Visible in the store now, unless a later batch wrote the key again.
        let mut q = th.queued[i].borrow_mut();
        for k in keys {
            if q.get(&k).is_some_and(|(s, _)| *s == seq) {
                q.remove(&k);
            }
        }
    }
    written?;
    th.notify(&touched);
    Ok(())
}

fn fail_all(done: &mut Completion, origins: &[u64], mode: Mode, why: &str) {
    if mode == Mode::Stream {
        for o in origins {
            done.failed.entry(*o).or_insert_with(|| why.to_string());
        }
    } else if done.fatal.is_none() {
        done.fatal = Some(why.to_string());
    }
}

fn flow_topology_name(def: &crate::module::ModuleDef, flow: Flow) -> &str {
    match flow {
        Flow::Stream(t) | Flow::Microbatch { topology: t, .. } => &def.topologies[t].name,
        Flow::Query(q) => &def.queries[q].name,
    }
}

fn flow_name(def: &crate::module::ModuleDef, flow: Flow) -> String {
    match flow {
        Flow::Stream(t) => format!("stream topology {}", def.topologies[t].name),
        Flow::Microbatch { topology, id, attempt } => format!(
            "microbatch topology {} (microbatch {id}, attempt {attempt})",
            def.topologies[topology].name
        ),
        Flow::Query(q) => format!("query {}", def.queries[q].name),
    }
}

/// Starts a depot append from a topology running on `task`; the future
/// resolves once it is durable.
fn topology_append(
    th: &Rc<TaskThread>,
    depot: usize,
    task: u32,
    record: &Value,
) -> impl std::future::Future<Output = Result<()>> {
    let rt = th.rt.clone();
    let d = &rt.def.depots[depot];
    let tasks = rt.placement.parallelism.tasks;
    let target = if d.global {
        0
    } else {
        match &d.partitioner {
            Partitioner::HashBy(key) => task_for_key(&key(record), tasks),
            Partitioner::Random | Partitioner::Disallow => task,
        }
    };
    let bytes = archived::to_bytes(record);
    async move {
        let (tx, rx) = flume::bounded(1);
        let thread = rt.placement.thread_of_task[target as usize] as usize;
        rt.links[thread]
            .internal
            .send_async(Request::Append {
                depot,
                task: target,
                record: bytes,
                ack: AckLevel::AppendAck,
                reply: Some(tx.into()),
            })
            .await
            .map_err(|_| rt.closed())?;
        rx.recv_async().await.map_err(|_| rt.closed())?.map(|_| ())
    }
}

/// The key under which a stream consumer keeps its committed offset
/// (`depot`: the depot's stable id).
fn offset_key(task: u32, topology: &str, depot: u16) -> Vec<u8> {
    let mut k = super::meta_key(task, b'o', topology);
    k.extend_from_slice(&depot.to_be_bytes());
    k
}

/// Whether `e` is storage that cannot take writes for now (a failed write
/// poisoned a log that heals itself, an I/O error such as a full device):
/// work that met it is run again later, never counted as failed.
fn storage_unavailable(e: &Error) -> bool {
    matches!(e, Error::Poisoned { .. } | Error::Io { .. })
}

/// A stream topology's consumer of one depot partition: processes records
/// in batches from its committed offset, retries failed records one by
/// one, answers `Ack` appends, then commits the offset. Storage that
/// cannot take writes for a while (a full disk) pauses it; it resumes from
/// its committed offset (at least once) when storage heals. Damaged data
/// stops it, with the reason in the log.
async fn consume(th: Rc<TaskThread>, topology: usize, depot: usize, task: u32) {
    th.rt.wait_processing(|| th.stopping.get()).await;
    let mut pauses = 0u32;
    loop {
        match consume_inner(&th, topology, depot, task).await {
            Ok(()) => return,
            Err(_) if th.stopping.get() => return,
            Err(e) if storage_unavailable(&e) => {
                unavailable_pause(&th, topology, task, &e.to_string(), &mut pauses).await
            }
            Err(e) => {
                tracing::error!(
                    "stream topology {} of module {} stopped on task {task}: {e}",
                    th.rt.def.topologies[topology].name,
                    th.rt.def.name
                );
                return;
            }
        }
    }
}

async fn consume_inner(th: &Rc<TaskThread>, topology: usize, depot: usize, task: u32) -> Result<()> {
    let rt = th.rt.clone();
    let name = &rt.def.topologies[topology].name;
    let log = th.log(depot, task)?;
    let appended = th.appended(depot, task)?;
    let key = offset_key(task, name, rt.depot_ids[depot]);
    let mut offset = read_offset(&th.store, &key, name)?.unwrap_or(0);
    offset = offset.max(log.start_offset());
    let mut pauses = 0u32;
    loop {
        // Wait for a record past the committed offset.
        appended
            .waiters
            .wait(|| (th.draining.get() || appended.enqueued_end.get() > offset).then_some(()))
            .await;
        // Draining: no client append is taken or in flight any more, so
        // once what was appended is processed (every `Ack` waiter has its
        // answer), stop.
        if th.draining.get() && appended.enqueued_end.get() <= offset {
            return Ok(());
        }
        if log.end_offset() <= offset {
            log.wait_durable(offset + 1).await?;
        }
        let records = log.read(offset, u64::MAX, rt.config.stream_batch_bytes).await?;
        let Some(end) = records.last().map(|r| r.offset + 1) else {
            continue;
        };
        let mut outcome: BTreeMap<u64, std::result::Result<Option<Value>, String>> = BTreeMap::new();
        let mut items = Vec::with_capacity(records.len());
        for r in records {
            match archived::from_bytes(&r.payload) {
                Ok(v) => items.push((r.offset, v)),
                Err(e) => {
                    outcome.insert(r.offset, Err(format!("record does not decode: {e}")));
                }
            }
        }
        let mut c = run_batch(th, Flow::Stream(topology), 0, task, Some(depot), items.clone()).await;
        if let Some(why) = c.unavailable.take() {
            // Part of the batch did not reach its worker: run it all again
            // from the same offset (at least once) after a pause, or leave
            // it for after the restart when stopping.
            if th.stopping.get() {
                return Ok(());
            }
            unavailable_pause(th, topology, task, &why, &mut pauses).await;
            continue;
        }
        pauses = 0;
        if let Some(why) = c.fatal.take() {
            for (o, _) in &items {
                c.failed.entry(*o).or_insert_with(|| why.clone());
            }
        }
        // Individual retries of the records that failed.
        for (o, v) in &items {
            let Some(mut why) = c.failed.remove(o) else {
                continue;
            };
            let mut ok = false;
            let mut tries = 0;
            while tries < rt.config.stream_retries {
                let r = run_batch(th, Flow::Stream(topology), 0, task, Some(depot), vec![(*o, v.clone())]).await;
                if let Some(why) = r.unavailable {
                    // Not the record's fault: wait, and do not count it.
                    if th.stopping.get() {
                        return Ok(());
                    }
                    unavailable_pause(th, topology, task, &why, &mut pauses).await;
                    continue;
                }
                tries += 1;
                match r.fatal.or_else(|| r.failed.into_values().next()) {
                    None => {
                        c.ack_returns.extend(r.ack_returns);
                        ok = true;
                        break;
                    }
                    Some(w) => why = w,
                }
            }
            if !ok {
                outcome.insert(*o, Err(why));
            }
        }
        for (o, v) in c.ack_returns {
            if !matches!(outcome.get(&o), Some(Err(_))) {
                outcome.insert(o, Ok(Some(v)));
            }
        }
        resolve_acks(th, topology, depot, task, offset..end, &outcome);
        offset = end;
        // The offset need not be durable before the next batch (a crash
        // only means reprocessing), so its durability is waited for off the
        // critical path; the WAL keeps successive offsets in order, and a
        // failed write poisons the store, which stops the next enqueue.
        let mut batch = WriteBatch::new();
        batch.put(&key, offset.to_le_bytes());
        let queued = th.store.enqueue(batch).await?;
        let waiter = th.clone();
        glommio::spawn_local(async move {
            let _ = waiter.store.wait_written(queued).await;
        })
        .detach();
    }
}

/// Waits before running a batch again that could not reach another
/// worker or its storage: 50 ms doubling up to 2 s; says so in the log now
/// and then.
async fn unavailable_pause(th: &TaskThread, topology: usize, task: u32, why: &str, pauses: &mut u32) {
    if pauses.is_power_of_two() && *pauses >= 8 {
        tracing::warn!(
            "stream topology {} of module {} on task {task}: waiting to run again ({} tries): {why}",
            th.rt.def.topologies[topology].name,
            th.rt.def.name,
            pauses
        );
    }
    *pauses = pauses.saturating_add(1);
    let ms = 50u64 << (*pauses).min(6);
    glommio::timer::sleep(std::time::Duration::from_millis(ms.min(2000))).await;
}

fn resolve_acks(
    th: &TaskThread,
    topology: usize,
    depot: usize,
    task: u32,
    range: std::ops::Range<u64>,
    outcome: &BTreeMap<u64, std::result::Result<Option<Value>, String>>,
) {
    let mut acks = th.acks.borrow_mut();
    let Some(waiting) = acks.get_mut(&(depot, task)) else {
        return;
    };
    let name = &th.rt.def.topologies[topology].name;
    let offsets: Vec<u64> = waiting.range(range).map(|(o, _)| *o).collect();
    for o in offsets {
        let w = waiting.get_mut(&o).expect("listed");
        match outcome.get(&o) {
            Some(Err(why)) => {
                w.error.get_or_insert_with(|| {
                    format!(
                        "record {o} of depot {} failed in stream topology {name} after {} retries: {why}",
                        th.rt.def.depots[depot].name, th.rt.config.stream_retries
                    )
                });
            }
            Some(Ok(Some(v))) => {
                w.ack_returns.insert(name.clone(), v.clone());
            }
            _ => {}
        }
        w.remaining -= 1;
        if w.remaining == 0 {
            let w = waiting.remove(&o).expect("listed");
            let _ = w.reply.send(match w.error {
                Some(why) => Err(Error::Topology(why)),
                None => Ok(AppendResult {
                    task: w.task,
                    offset: Some(o),
                    ack_returns: w.ack_returns,
                }),
            });
        }
    }
}
