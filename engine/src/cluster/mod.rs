//! An in-process cluster: a module's tasks on task threads in this process,
//! running its stream, microbatch and query topologies, with clients that
//! route each request to the task that owns it.
//!
//! Each task thread is a glommio executor that owns its tasks' storage: one
//! LSM store for the thread (every key starts with its task id) and one log
//! per depot partition, under `<dir>/<module>/`. Clients and other threads
//! reach a thread only through its bounded channels (see [`thread`] for why
//! they cannot deadlock); a full channel makes the sender wait.
//!
//! - Stream topologies: per task and source depot partition, a consumer
//!   processes records in batches from its committed offset; each stage
//!   batch's PState writes commit as one atomic batch; failed records are
//!   retried one by one (`stream_retries` of [`ModuleConfig`], 3 by default), then reported
//!   to `Ack` appenders as errors. At-least-once.
//! - Microbatch topologies: see [`microbatch`]. Exactly-once, atomic across
//!   tasks.
//! - Queries: stage 0 runs on a task picked round-robin (the origin); the
//!   values stages emit to the origin are aggregated there.
//!
//! A module can also be spread over several worker processes
//! ([`InProcessCluster::launch_worker`]): each runs the task threads the
//! placement gives it, and reaches the others through bridges (see
//! [`peer`]).

pub mod catalog;
pub mod config;
pub use config::ModuleConfig;
mod messages;
mod microbatch;
pub mod peer;
mod proxy;
mod thread;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use self::messages::AppendResult;
use self::messages::{Control, Request};
use self::peer::{WorkerPart, LANE_CLIENT};
pub use self::proxy::{apply_diff, Diff, Proxy, ProxyEvent};

/// How many task threads' states (stores, logs, memtables) are alive in
/// this process: 0 once every cluster it ran has shut down. For leak tests.
pub fn live_task_threads() -> usize {
    thread::LIVE.load(std::sync::atomic::Ordering::Relaxed)
}
use self::thread::ThreadLinks;
use crate::error::{Error, Result};
use crate::executor::ExecutorConfig;
use crate::module::{Module, ModuleDef, Partitioner, TopologyKind};
use crate::pstate::Nav;
use crate::runtime::partition::task_for_key;
use crate::runtime::placement::{Parallelism, Placement};
use crate::value::{archived, Value};

/// How long an append waits before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckLevel {
    /// Durable and processed by the module's stream topologies that read the
    /// depot (default); returns their ack-return values.
    #[default]
    Ack,
    /// Durable.
    AppendAck,
    /// Queued; nothing is waited for.
    None,
}

/// The key of a runtime record (offsets, microbatch state) of `task`. PState
/// id `0xFFFF` is reserved for them, so they never collide with PState data.
pub(crate) fn meta_key(task: u32, kind: u8, topology: &str) -> Vec<u8> {
    let mut k = task.to_be_bytes().to_vec();
    k.extend_from_slice(&[0xFF, 0xFF, kind]);
    // Names are checked to be short when the module is built.
    k.push(topology.len() as u8);
    k.extend_from_slice(topology.as_bytes());
    k
}

/// Holds client reads off while a microbatch commits on every task, so no
/// read sees part of a microbatch.
#[derive(Debug, Default)]
struct Gate {
    /// (reads in progress, commits in progress)
    state: Mutex<(usize, usize)>,
    changed: Condvar,
    /// Async readers waiting for the gate to open.
    waiting: Mutex<Vec<flume::Sender<()>>>,
}

struct GateGuard<'a>(Option<&'a Gate>);

/// A read let through the gate of a module, held by an answer callback
/// until the read is done (it may be dropped on another thread).
/// Holds the gate only (not the runtime): a request stuck in a stopped
/// thread's channel must not keep the runtime, and so that channel, alive.
struct GateTicket(Arc<Gate>);

impl GateTicket {
    /// Blocks the calling thread while a commit is applied; `None` when
    /// the module's reads are not gated.
    fn enter(rt: &Arc<ModuleRuntime>) -> Option<GateTicket> {
        rt.gated.then(|| {
            std::mem::forget(rt.gate.enter());
            GateTicket(rt.gate.clone())
        })
    }
}

impl GateTicket {
    /// Enters without waiting: `Ok(None)` when reads are not gated, `Err`
    /// while a commit holds the gate closed.
    fn try_enter(rt: &Arc<ModuleRuntime>) -> std::result::Result<Option<GateTicket>, ()> {
        if !rt.gated {
            return Ok(None);
        }
        let mut s = rt.gate.state.lock().expect("gate");
        if s.1 > 0 {
            return Err(());
        }
        s.0 += 1;
        Ok(Some(GateTicket(rt.gate.clone())))
    }
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        self.0.state.lock().expect("gate").0 -= 1;
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            g.state.lock().expect("gate").0 -= 1;
        }
    }
}

impl Gate {
    /// Blocks the calling client thread while a commit is applied.
    fn enter(&self) -> GateGuard<'_> {
        let mut s = self.state.lock().expect("gate");
        while s.1 > 0 {
            s = self.changed.wait(s).expect("gate");
        }
        s.0 += 1;
        GateGuard(Some(self))
    }

    /// Stops new reads and waits (on a task thread) for running ones.
    async fn close(&self) {
        self.state.lock().expect("gate").1 += 1;
        while self.state.lock().expect("gate").0 > 0 {
            glommio::timer::sleep(Duration::from_micros(50)).await;
        }
    }

    /// Like `enter`, without blocking the calling thread (for readers on
    /// an async executor that also carries the commit's messages).
    async fn enter_async(&self) -> GateGuard<'_> {
        loop {
            let rx = {
                let mut s = self.state.lock().expect("gate");
                if s.1 == 0 {
                    s.0 += 1;
                    return GateGuard(Some(self));
                }
                let (tx, rx) = flume::bounded(1);
                self.waiting.lock().expect("gate waiters").push(tx);
                rx
            };
            let _ = rx.recv_async().await;
        }
    }

    fn open(&self) {
        self.state.lock().expect("gate").1 -= 1;
        self.changed.notify_all();
        for w in self.waiting.lock().expect("gate waiters").drain(..) {
            let _ = w.try_send(());
        }
    }
}

/// How far a microbatch topology got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MicrobatchProgress {
    /// The last microbatch applied (0: none yet).
    pub id: u64,
    /// Per (depot index, task): the offset every record below is applied.
    pub ends: BTreeMap<(usize, u32), u64>,
    /// Attempts that failed and were retried, since launch.
    pub failed_attempts: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct MicrobatchShared {
    paused: AtomicBool,
    progress: Mutex<MicrobatchProgress>,
    changed: Condvar,
}

impl MicrobatchShared {
    fn publish(&self, id: u64, ends: &BTreeMap<(usize, u32), u64>) {
        let mut p = self.progress.lock().expect("progress");
        p.id = id;
        p.ends = ends.clone();
        self.changed.notify_all();
    }

    fn note_failure(&self, why: &str) {
        let mut p = self.progress.lock().expect("progress");
        p.failed_attempts += 1;
        p.last_error = Some(why.to_string());
        self.changed.notify_all();
    }
}

/// Where a test hook may inject a failure: before a stage runs one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultPoint<'a> {
    /// The topology or query.
    pub topology: &'a str,
    pub task: u32,
    pub stage: usize,
    /// (microbatch id, attempt) in microbatch topologies.
    pub microbatch: Option<(u64, u32)>,
    /// The depot offset (stream) or item origin.
    pub origin: u64,
    /// The item the stage is about to run on.
    pub value: &'a Value,
}

/// A test hook: returning true fails the stage for that item, as if its
/// code had returned an error.
pub type FaultHook = Arc<dyn Fn(&FaultPoint<'_>) -> bool + Send + Sync>;

/// One launched module, shared by its clients and task threads.
/// The directory of task group (task thread) `thread` of a module: its
/// catalog, its PState store (`pstates/`) and its depot partitions
/// (`depot-<id>/task-<t>/`) live there together, so the task group's
/// files can be moved or taken over as one.
pub(crate) fn task_group_dir(module_dir: &Path, thread: u32) -> PathBuf {
    module_dir.join(format!("tg-{thread}"))
}

/// Opens (or starts) the catalog of `def` in the directories of the task
/// groups this process runs: the stable ids of its depots and PStates, by
/// position. Data in the layout of an earlier release (per-thread stores
/// `thread-N`, partitions by depot name) is refused rather than ignored.
fn open_catalog(def: &ModuleDef, module_dir: &Path, local_threads: &[u32]) -> Result<(Vec<u16>, Vec<u16>)> {
    for &t in local_threads {
        let old = module_dir.join(format!("thread-{t}"));
        if old.exists() {
            return Err(Error::Corrupt {
                path: old,
                offset: 0,
                position: 0,
                reason: "data in the layout of an earlier release (before task-group directories and the \
                         catalog); this release does not read it: move it away to start empty"
                    .into(),
            });
        }
    }
    let dirs: Vec<PathBuf> = local_threads.iter().map(|&t| task_group_dir(module_dir, t)).collect();
    let depots: Vec<&str> = def.depots.iter().map(|d| d.name.as_str()).collect();
    let pstates: Vec<&str> = def.pstates.iter().map(|p| p.name.as_str()).collect();
    let c = catalog::open(&def.name, &dirs, &depots, &pstates)?;
    Ok((
        depots.iter().map(|d| c.depots[*d]).collect(),
        pstates.iter().map(|p| c.pstates[*p]).collect(),
    ))
}

pub(crate) struct ModuleRuntime {
    def: ModuleDef,
    placement: Placement,
    links: Vec<ThreadLinks>,
    gate: Arc<Gate>,
    /// Reads are gated only when the module has microbatch topologies.
    gated: bool,
    /// Per topology (microbatch ones only).
    microbatches: Vec<Option<MicrobatchShared>>,
    /// Per depot: how many stream topologies read it.
    stream_consumers: Vec<usize>,
    /// Round-robin origin of queries.
    next_origin: AtomicU32,
    fault: Option<FaultHook>,
    /// The stop signal: the sender is dropped once every task thread of
    /// the module has stopped.
    stopped: (Mutex<Option<flume::Sender<()>>>, flume::Receiver<()>),
    /// This process's worker index (0 when the module is all here).
    worker: u32,
    /// Tasks whose threads run in this process.
    local_tasks: Vec<u32>,
    /// Stream consumers and microbatch coordinators wait for this (a
    /// worker sets it once the other workers can be reached).
    processing: AtomicBool,
    /// Bridges to the threads on other workers, and their stop flag.
    bridges: Mutex<Vec<std::thread::JoinHandle<()>>>,
    bridges_stop: Arc<AtomicBool>,
    /// The read gate closed for another worker's commit: its number, so a
    /// lease that ends after the matching open does nothing.
    peer_gate: Mutex<Option<u64>>,
    peer_gate_seq: AtomicU64,
    /// Stable ids of the depots and PStates, by their position in `def`
    /// (from the catalog): what stored data names them by.
    depot_ids: Vec<u16>,
    pstate_ids: Vec<u16>,
    /// Limits and queue sizes of the module's task threads.
    config: ModuleConfig,
}

impl std::fmt::Debug for ModuleRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleRuntime")
            .field("module", &self.def.name)
            .field("placement", &self.placement)
            .finish_non_exhaustive()
    }
}

impl ModuleRuntime {
    /// The position in the definition of the depot with stable id `id`
    /// (`None`: the module no longer has it).
    fn depot_of_id(&self, id: u16) -> Option<usize> {
        self.depot_ids.iter().position(|&d| d == id)
    }

    fn is_local(&self, thread: usize) -> bool {
        self.placement.worker_of_thread[thread] == self.worker
    }

    /// One task thread of every other worker: where a commit closes the
    /// other workers' read gates.
    fn remote_gate_threads(&self) -> Vec<usize> {
        (0..self.placement.parallelism.workers)
            .filter(|&w| w != self.worker)
            .filter_map(|w| self.placement.threads_of_worker(w).first().map(|&t| t as usize))
            .collect()
    }

    /// Closes this worker's read gate for a commit coordinated elsewhere;
    /// it opens by itself after `lease` unless opened first.
    async fn close_gate_for_peer(self: &Arc<Self>, lease: Duration) {
        self.gate.close().await;
        let seq = self.peer_gate_seq.fetch_add(1, Ordering::Relaxed);
        if let Some(_earlier) = self.peer_gate.lock().expect("peer gate").replace(seq) {
            // A close whose open never came (its coordinator restarted):
            // this close takes its place.
            self.gate.open();
        }
        let rt = self.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(lease).await;
            let mut g = rt.peer_gate.lock().expect("peer gate");
            if *g == Some(seq) {
                *g = None;
                drop(g);
                rt.gate.open();
            }
        })
        .detach();
    }

    fn open_gate_for_peer(&self) {
        if self.peer_gate.lock().expect("peer gate").take().is_some() {
            self.gate.open();
        }
    }

    /// Waits (on a task thread) until the module may start processing.
    async fn wait_processing(&self, stopping: impl Fn() -> bool) {
        while !self.processing.load(Ordering::Acquire) && !stopping() {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Puts `request` on the client (`lane` 0) or internal link of
    /// `thread`, waiting without blocking while it is full.
    async fn send_to_async(&self, thread: usize, lane: u32, request: Request) -> Result<()> {
        let link = &self.links[thread];
        let channel = if lane == LANE_CLIENT {
            &link.client
        } else {
            &link.internal
        };
        channel.send_async(request).await.map_err(|_| self.closed())
    }

    async fn call_async<T: Send + 'static>(
        &self,
        task: u32,
        request: impl FnOnce(messages::Reply<T>) -> Request,
    ) -> Result<T> {
        let (tx, rx) = flume::bounded(1);
        let thread = self.placement.thread_of_task[task as usize] as usize;
        self.send_to_async(thread, LANE_CLIENT, request(tx.into())).await?;
        self.answer(rx).await
    }

    /// A client read (select, query) sent now if that needs no wait (the
    /// read gate open, room in the task thread's channel), so a caller can
    /// keep many in flight before it polls any; otherwise sent when the
    /// future is first polled. The gate ticket belongs to the request, not
    /// to the future: it is released when the task thread answers (or the
    /// request is dropped), however late the caller polls, so an answered
    /// read never holds a microbatch commit back.
    fn read_soon<T: Send + 'static>(
        self: &Arc<Self>,
        task: u32,
        request: impl FnOnce(messages::Reply<T>) -> Request,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        let (tx, rx) = flume::bounded(1);
        let thread = self.placement.thread_of_task[task as usize] as usize;
        let ticket: Arc<Mutex<Option<GateTicket>>> = Arc::default();
        let held = ticket.clone();
        let reply = messages::Reply::callback(move |answer| {
            drop(held.lock().unwrap_or_else(|p| p.into_inner()).take());
            let _ = tx.send(answer);
        });
        let mut request = Some(request(reply));
        if let Ok(entered) = GateTicket::try_enter(self) {
            *ticket.lock().unwrap_or_else(|p| p.into_inner()) = entered;
            match self.links[thread].client.try_send(request.take().expect("request")) {
                Ok(()) => {}
                // Full, or the thread is gone (the await below says so):
                // leave the gate and send when polled.
                Err(flume::TrySendError::Full(r) | flume::TrySendError::Disconnected(r)) => {
                    request = Some(r);
                    drop(ticket.lock().unwrap_or_else(|p| p.into_inner()).take());
                }
            }
        }
        // Sent: the request alone owns the ticket (released by its answer,
        // or when it is dropped unanswered), not this future.
        let ticket = request.is_some().then_some(ticket);
        let rt = self.clone();
        async move {
            if let (Some(request), Some(ticket)) = (request, ticket) {
                let guard = rt.read_guard_async().await;
                if guard.0.is_some() {
                    // The request holds the read from here on.
                    std::mem::forget(guard);
                    *ticket.lock().unwrap_or_else(|p| p.into_inner()) = Some(GateTicket(rt.gate.clone()));
                }
                drop(ticket);
                rt.send_to_async(thread, LANE_CLIENT, request).await?;
            }
            rt.answer(rx).await
        }
    }

    async fn read_guard_async(&self) -> GateGuard<'_> {
        if self.gated {
            self.gate.enter_async().await
        } else {
            GateGuard(None)
        }
    }

    fn send(&self, task: u32, request: Request) -> Result<()> {
        let thread = self.placement.thread_of_task[task as usize] as usize;
        self.links[thread]
            .client
            .send(request)
            .map_err(|_| Error::Closed(format!("task thread {thread} of module {} has stopped", self.def.name)))
    }

    fn closed(&self) -> Error {
        Error::Closed(format!("module {} has stopped on this worker", self.def.name))
    }

    fn microbatch(&self, topology: usize) -> &MicrobatchShared {
        self.microbatches[topology].as_ref().expect("a microbatch topology")
    }

    fn read_guard(&self) -> GateGuard<'_> {
        if self.gated {
            self.gate.enter()
        } else {
            GateGuard(None)
        }
    }

    /// Sends `request` to the owner of `task` and waits for its answer.
    fn call<T: Send + 'static>(&self, task: u32, request: impl FnOnce(messages::Reply<T>) -> Request) -> Result<T> {
        let (tx, rx) = flume::bounded(1);
        self.send(task, request(tx.into()))?;
        futures_lite::future::block_on(self.answer(rx))
    }

    /// The answer to a request, or `Closed` once the module stopped (a
    /// request that reached a channel just as its thread stopped reading
    /// is never answered, and its reply sender stays in the channel).
    fn answer<T>(&self, rx: flume::Receiver<Result<T>>) -> impl Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
    {
        let stopped = self.stopped.1.clone();
        let (closed, closed2) = (self.closed(), self.closed());
        futures_lite::future::or(async move { rx.recv_async().await.map_err(|_| closed)? }, async move {
            // Completes only when the stop signal's sender is dropped.
            let _ = stopped.recv_async().await;
            Err(closed2)
        })
    }
}

/// What hands out clients: the in-process cluster here, the remote cluster
/// manager later. Clients have the same API either way.
pub trait ClusterClient {
    fn depot(&self, module: &str, depot: &str) -> Result<DepotClient>;
    fn pstate(&self, module: &str, pstate: &str) -> Result<PStateClient>;
    fn query(&self, module: &str, query: &str) -> Result<QueryClient>;
}

/// A task thread; it returns its storage's closing result.
type TaskThreadHandle = std::thread::JoinHandle<Result<()>>;

/// How task threads run.
#[derive(Debug, Clone, Default)]
pub struct ThreadOptions {
    /// Pin task thread `i` to CPU `i % cpus`. `None` (default): pin only
    /// when a module's threads do not outnumber the CPUs.
    pub pin: Option<bool>,
    /// Spin this long before parking an idle task thread: a wake-up across
    /// cores costs about 20 µs here, spinning cuts a round trip to a few µs
    /// at the cost of CPU. Default: park at once.
    pub spin_before_park: Option<Duration>,
}

/// Modules running on task threads of this process.
pub struct InProcessCluster {
    dir: PathBuf,
    threads: ThreadOptions,
    config: ModuleConfig,
    modules: Vec<(Arc<ModuleRuntime>, Vec<TaskThreadHandle>)>,
    fault: Option<FaultHook>,
}

impl std::fmt::Debug for InProcessCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessCluster")
            .field("dir", &self.dir)
            .field(
                "modules",
                &self.modules.iter().map(|(m, _)| &m.def.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl InProcessCluster {
    /// A cluster keeping its data under `dir` (created if missing). A
    /// relaunch over the same directory finds the modules' data again.
    pub fn new(dir: impl AsRef<Path>) -> InProcessCluster {
        InProcessCluster {
            dir: dir.as_ref().to_path_buf(),
            threads: ThreadOptions::default(),
            config: ModuleConfig::default(),
            modules: Vec::new(),
            fault: None,
        }
    }

    /// How task threads of modules launched from now on run.
    pub fn set_thread_options(&mut self, options: ThreadOptions) {
        self.threads = options;
    }

    /// Modules launched from now on run with `config` (checked at
    /// launch).
    pub fn set_module_config(&mut self, config: ModuleConfig) {
        self.config = config;
    }

    /// Tests: modules launched from now on consult `hook` before each stage
    /// runs an item, and fail the item where it returns true.
    pub fn set_fault_hook(&mut self, hook: impl Fn(&FaultPoint<'_>) -> bool + Send + Sync + 'static) {
        self.fault = Some(Arc::new(hook));
    }

    /// Starts module type `M` with `tasks` tasks on `threads` task threads.
    pub fn launch_module<M: Module>(&mut self, tasks: u32, threads: u32) -> Result<()> {
        self.launch(M::define()?, tasks, threads)
    }

    /// Starts `def` with `tasks` tasks on `threads` task threads.
    pub fn launch(&mut self, def: ModuleDef, tasks: u32, threads: u32) -> Result<()> {
        self.launch_part(def, tasks, threads, None)?;
        let rt = self.module_of_last();
        rt.processing.store(true, Ordering::Release);
        Ok(())
    }

    fn module_of_last(&self) -> &Arc<ModuleRuntime> {
        &self.modules.last().expect("just launched").0
    }

    /// Starts this process's part of `def` spread over `part.workers`
    /// workers: the task threads the placement gives worker `part.worker`,
    /// and bridges to the others' threads through `part.peers`. Its stream
    /// consumers and microbatch coordinators wait for
    /// [`start_processing`](Self::start_processing).
    pub fn launch_worker(&mut self, def: ModuleDef, tasks: u32, threads: u32, part: WorkerPart) -> Result<()> {
        self.launch_part(def, tasks, threads, Some(part))
    }

    /// Lets the module's stream consumers and microbatch coordinators on
    /// this worker start (once every other worker can be reached).
    pub fn start_processing(&self, module: &str) -> Result<()> {
        self.module(module)?.processing.store(true, Ordering::Release);
        Ok(())
    }

    /// Answers a message another worker of `module` sent on `lane`.
    pub fn serve_peer(&self, module: &str, lane: u32, message: &[u8]) -> peer::Answer {
        match self.module(module) {
            Ok(rt) => peer::serve(rt, lane, message),
            Err(_) => {
                let bytes = peer::unavailable_answer(&format!("module {module} is not running on this worker"));
                Box::pin(async move { bytes })
            }
        }
    }

    /// The tasks of `module` whose threads run in this process.
    pub fn local_tasks(&self, module: &str) -> Result<Vec<u32>> {
        Ok(self.module(module)?.local_tasks.clone())
    }

    fn launch_part(&mut self, def: ModuleDef, tasks: u32, threads: u32, part: Option<WorkerPart>) -> Result<()> {
        let workers = part.as_ref().map_or(1, |p| p.workers);
        let worker = part.as_ref().map_or(0, |p| p.worker);
        let parallelism = Parallelism::new(tasks, threads, workers).map_err(|e| Error::Schema(e.to_string()))?;
        if worker >= workers {
            return Err(Error::Schema(format!(
                "worker {worker} does not exist (workers: {workers})"
            )));
        }
        if self.modules.iter().any(|(m, _)| m.def.name == def.name) {
            return Err(Error::Schema(format!("module {} is already running", def.name)));
        }
        let placement = Placement::new(parallelism);
        let local_threads = placement.threads_of_worker(worker);
        let local_tasks = (0..tasks)
            .filter(|&t| placement.worker_of_thread[placement.thread_of_task[t as usize] as usize] == worker)
            .collect();
        let module_dir = self.dir.join(&def.name);
        let (depot_ids, pstate_ids) = open_catalog(&def, &module_dir, &local_threads)?;
        let levels = def
            .topologies
            .iter()
            .map(|t| t.stages.len())
            .chain(def.queries.iter().map(|q| q.stages.len()))
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        let config = self.config.clone();
        config.validate()?;
        let (links, inboxes): (Vec<_>, Vec<_>) = (0..threads)
            .map(|_| thread::links(config.channel_capacity, levels))
            .unzip();
        let stream_consumers = (0..def.depots.len())
            .map(|d| {
                def.topologies
                    .iter()
                    .filter(|t| t.kind == TopologyKind::Stream && t.sources.contains(&d))
                    .count()
            })
            .collect();
        let microbatches = def
            .topologies
            .iter()
            .map(|t| (t.kind == TopologyKind::Microbatch).then(MicrobatchShared::default))
            .collect::<Vec<_>>();
        let rt = Arc::new(ModuleRuntime {
            gated: microbatches.iter().any(Option::is_some),
            def,
            placement,
            links,
            gate: Arc::default(),
            microbatches,
            stream_consumers,
            next_origin: AtomicU32::new(0),
            fault: self.fault.clone(),
            stopped: {
                let (tx, rx) = flume::bounded(1);
                (Mutex::new(Some(tx)), rx)
            },
            worker,
            local_tasks,
            processing: AtomicBool::new(false),
            bridges: Mutex::new(Vec::new()),
            bridges_stop: Arc::new(AtomicBool::new(false)),
            peer_gate: Mutex::new(None),
            peer_gate_seq: AtomicU64::new(0),
            depot_ids,
            pstate_ids,
            config,
        });
        let mut handles = Vec::new();
        let local_count = local_threads.len();
        // Each thread reports once its storage is open, so a launch either
        // returns with every task ready or with the first error.
        let (ready_tx, ready_rx) = flume::bounded::<Result<()>>(local_count.max(1));
        let mut bridge_error = None;
        for (thread, inbox) in (0..threads).zip(inboxes) {
            if !local_threads.contains(&thread) {
                let part = part.as_ref().expect("remote threads only with a worker part");
                let w = rt.placement.worker_of_thread[thread as usize];
                match peer::bridge(inbox, &rt.def.name, thread, w, &part.peers, &rt.bridges_stop) {
                    Ok(h) => rt.bridges.lock().expect("bridges").extend(h),
                    Err(e) => {
                        bridge_error.get_or_insert(e);
                    }
                }
                continue;
            }
            let (rt, dir, ready) = (rt.clone(), module_dir.clone(), ready_tx.clone());
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let pin = self.threads.pin.unwrap_or(local_count <= cpus);
            let executor = ExecutorConfig {
                name: format!("{}-task-thread-{thread}", rt.def.name),
                // Several modules' threads share the process's locked memory.
                io_memory_bytes: 512 << 10,
                pin_to_cpu: pin.then_some(thread as usize % cpus),
                spin_before_park: self.threads.spin_before_park,
                ..ExecutorConfig::default()
            };
            handles.push(std::thread::spawn(move || {
                executor.block_on(async move {
                    let th = match thread::open(rt, thread, &dir).await {
                        Ok(th) => th,
                        Err(e) => {
                            // The storage error as it is (it names the file):
                            // the executor itself started.
                            let _ = ready.send(Err(e));
                            return Ok(());
                        }
                    };
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    thread::run(th, inbox).await
                })?
            }));
        }
        drop(ready_tx);
        let mut first_error = bridge_error;
        for _ in 0..local_count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(Error::Executor("a task thread exited while starting".into()));
                }
            }
        }
        if let Some(e) = first_error {
            // Nothing is left running after a failed launch.
            let _ = stop(rt, handles);
            return Err(e);
        }
        self.modules.push((rt, handles));
        Ok(())
    }

    fn module(&self, name: &str) -> Result<&Arc<ModuleRuntime>> {
        self.modules
            .iter()
            .map(|(m, _)| m)
            .find(|m| m.def.name == name)
            .ok_or_else(|| Error::Schema(format!("no module named {name} is running")))
    }

    /// A client of depot `depot` of module `module`.
    pub fn depot(&self, module: &str, depot: &str) -> Result<DepotClient> {
        let rt = self.module(module)?.clone();
        let (index, _) = rt.def.depot(depot)?;
        Ok(DepotClient { rt, depot: index })
    }

    /// A client of PState `pstate` of module `module`.
    pub fn pstate(&self, module: &str, pstate: &str) -> Result<PStateClient> {
        let rt = self.module(module)?.clone();
        let (index, _) = rt.def.pstate(pstate)?;
        Ok(PStateClient { rt, pstate: index })
    }

    /// A client of query topology `query` of module `module`.
    pub fn query(&self, module: &str, query: &str) -> Result<QueryClient> {
        let rt = self.module(module)?.clone();
        let (index, _) = rt.def.query(query)?;
        Ok(QueryClient { rt, query: index })
    }

    fn microbatch(&self, module: &str, topology: &str) -> Result<(Arc<ModuleRuntime>, usize)> {
        let rt = self.module(module)?.clone();
        let (index, t) = rt.def.topology(topology)?;
        if t.kind != TopologyKind::Microbatch {
            return Err(Error::Schema(format!(
                "topology {topology} of module {module} is a stream topology, not a microbatch topology"
            )));
        }
        Ok((rt, index))
    }

    /// Stops starting new microbatches of `topology` (the one running
    /// finishes).
    pub fn pause_microbatch(&self, module: &str, topology: &str) -> Result<()> {
        let (rt, t) = self.microbatch(module, topology)?;
        rt.microbatch(t).paused.store(true, Ordering::Release);
        Ok(())
    }

    pub fn resume_microbatch(&self, module: &str, topology: &str) -> Result<()> {
        let (rt, t) = self.microbatch(module, topology)?;
        rt.microbatch(t).paused.store(false, Ordering::Release);
        Ok(())
    }

    /// How far microbatch topology `topology` got.
    pub fn microbatch_progress(&self, module: &str, topology: &str) -> Result<MicrobatchProgress> {
        let (rt, t) = self.microbatch(module, topology)?;
        let progress = rt.microbatch(t).progress.lock().expect("progress").clone();
        Ok(progress)
    }

    /// Waits until every record appended to the topology's depots before
    /// this call is applied by a microbatch; an error after `timeout`.
    pub fn wait_microbatch(&self, module: &str, topology: &str, timeout: Duration) -> Result<()> {
        let (rt, t) = self.microbatch(module, topology)?;
        let mut target = Vec::new();
        for thread in 0..rt.links.len() {
            let (tx, rx) = flume::bounded(1);
            rt.links[thread]
                .control
                .send(Control::Ends {
                    topology: t,
                    reply: tx.into(),
                })
                .map_err(|_| rt.closed())?;
            target.extend(futures_lite::future::block_on(rt.answer(rx))?);
        }
        let shared = rt.microbatch(t);
        let deadline = Instant::now() + timeout;
        let mut p = shared.progress.lock().expect("progress");
        loop {
            if target
                .iter()
                .all(|&(d, task, end)| end == 0 || p.ends.get(&(d, task)).is_some_and(|&e| e >= end))
            {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Topology(format!(
                    "microbatch topology {topology} did not catch up within {timeout:?} (at microbatch {}, \
                     {} failed attempts, last error: {})",
                    p.id,
                    p.failed_attempts,
                    p.last_error.as_deref().unwrap_or("none")
                )));
            }
            p = shared.changed.wait_timeout(p, deadline - now).expect("progress").0;
        }
    }

    /// Stops module `module` and deletes its data.
    pub fn destroy(&mut self, module: &str) -> Result<()> {
        let i = self
            .modules
            .iter()
            .position(|(m, _)| m.def.name == module)
            .ok_or_else(|| Error::Schema(format!("no module named {module} is running")))?;
        let (rt, handles) = self.modules.remove(i);
        stop(rt, handles)?;
        let dir = self.dir.join(module);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove_dir_all", dir, e)),
        }
    }

    /// Stops every module and waits for its task threads; data stays on
    /// disk for a later launch over the same directory.
    pub fn shutdown(self) -> Result<()> {
        let mut first = None;
        for (rt, handles) in self.modules {
            if let Err(e) = stop(rt, handles) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl ClusterClient for InProcessCluster {
    fn depot(&self, module: &str, depot: &str) -> Result<DepotClient> {
        InProcessCluster::depot(self, module, depot)
    }

    fn pstate(&self, module: &str, pstate: &str) -> Result<PStateClient> {
        InProcessCluster::pstate(self, module, pstate)
    }

    fn query(&self, module: &str, query: &str) -> Result<QueryClient> {
        InProcessCluster::query(self, module, query)
    }
}

/// Stops a module's task threads and waits for them; the first error a
/// thread reports (closing its storage, or a panic) is returned.
fn stop(rt: Arc<ModuleRuntime>, handles: Vec<TaskThreadHandle>) -> Result<()> {
    // First let every thread finish the stream batches and microbatch it is
    // running (they need the other threads), so nothing is half done.
    let local: Vec<&ThreadLinks> = (0..rt.links.len())
        .filter(|&t| rt.is_local(t))
        .map(|t| &rt.links[t])
        .collect();
    let mut quiesced = Vec::new();
    for link in &local {
        let (tx, rx) = flume::bounded(1);
        if link.client.send(Request::Quiesce { reply: tx.into() }).is_ok() {
            quiesced.push(rx);
        }
    }
    for rx in quiesced {
        let _ = rx.recv();
    }
    for link in &local {
        // A thread that already exited has nothing to stop.
        let _ = link.client.send(Request::Shutdown);
    }
    drop(local);
    let stop_signal = rt.stopped.0.lock().expect("stop signal").take();
    rt.bridges_stop.store(true, Ordering::Release);
    let bridges = std::mem::take(&mut *rt.bridges.lock().expect("bridges"));
    drop(rt);
    let mut first = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first.get_or_insert(e);
            }
            Err(_) => {
                first.get_or_insert(Error::Executor("a task thread panicked".into()));
            }
        }
    }
    // Every thread is gone: requests still waiting for an answer get Closed.
    drop(stop_signal);
    for b in bridges {
        let _ = b.join();
    }
    first.map_or(Ok(()), Err)
}

/// Appends to and reads one depot. Cheap to clone; usable from any thread.
/// Blocking calls block the calling thread: do not call them from a task
/// thread.
#[derive(Debug, Clone)]
pub struct DepotClient {
    rt: Arc<ModuleRuntime>,
    depot: usize,
}

impl DepotClient {
    /// The task that takes `record`.
    fn task_for(&self, record: &Value) -> Result<u32> {
        let def = &self.rt.def.depots[self.depot];
        let tasks = self.rt.placement.parallelism.tasks;
        if def.global {
            return Ok(0);
        }
        match &def.partitioner {
            Partitioner::HashBy(key) => Ok(task_for_key(&key(record), tasks)),
            // Round-robin over this process's tasks (all of them unless the
            // module is spread over workers), shared by every client.
            Partitioner::Random => {
                let local = &self.rt.local_tasks;
                Ok(local[self.rt.next_origin.fetch_add(1, Ordering::Relaxed) as usize % local.len()])
            }
            Partitioner::Disallow => Err(Error::Schema(format!(
                "depot {} of module {} does not take client appends (its partitioner is disallow); \
                 only the module's topologies append to it",
                def.name, self.rt.def.name
            ))),
        }
    }

    /// Appends `record` and waits until `ack` is met.
    pub fn append(&self, record: &Value, ack: AckLevel) -> Result<AppendResult> {
        futures_lite::future::block_on(self.append_async(record, ack)?)
    }

    /// The task that takes `record` and its archive, checked against the
    /// record size limit: bad input fails before anything is sent.
    fn encode(&self, record: &Value) -> Result<(u32, Vec<u8>)> {
        let task = self.task_for(record)?;
        let bytes = archived::to_bytes(record);
        Error::check_limit(
            "record",
            "record_bytes_max",
            bytes.len(),
            self.rt.config.log.record_bytes_max as usize,
        )?;
        Ok((task, bytes))
    }

    fn request(
        &self,
        task: u32,
        record: Vec<u8>,
        ack: AckLevel,
        reply: Option<messages::Reply<AppendResult>>,
    ) -> Request {
        Request::Append {
            depot: self.depot,
            task,
            record,
            ack,
            reply: if ack == AckLevel::None { None } else { reply },
        }
    }

    /// What an append with [`AckLevel::None`] returns once it is sent.
    fn unacknowledged(task: u32) -> AppendResult {
        AppendResult {
            task,
            offset: None,
            ack_returns: BTreeMap::new(),
        }
    }

    /// Sends `record` now; the returned future resolves when `ack` is met
    /// (on any executor, or with `futures_lite::future::block_on`). Bad
    /// input fails here, before anything is sent. Waits while the task
    /// thread's request channel is full.
    pub fn append_async(
        &self,
        record: &Value,
        ack: AckLevel,
    ) -> Result<impl Future<Output = Result<AppendResult>> + Send + 'static> {
        let (task, bytes) = self.encode(record)?;
        let (tx, rx) = flume::bounded(1);
        self.rt.send(task, self.request(task, bytes, ack, Some(tx.into())))?;
        let answer = self.rt.answer(rx);
        Ok(async move {
            if ack == AckLevel::None {
                return Ok(Self::unacknowledged(task));
            }
            answer.await
        })
    }

    /// Sends the append now; `done` gets the answer where it is made (on a
    /// task thread, so `done` must be quick and must not block). Waits
    /// while the task thread's request channel is full. For servers that
    /// queue their response frame from the callback.
    pub fn append_then(
        &self,
        record: &Value,
        ack: AckLevel,
        done: impl FnOnce(Result<AppendResult>) + Send + 'static,
    ) -> Result<()> {
        let (task, bytes) = self.encode(record)?;
        if ack == AckLevel::None {
            self.rt.send(task, self.request(task, bytes, ack, None))?;
            done(Ok(Self::unacknowledged(task)));
            return Ok(());
        }
        let reply = messages::Reply::callback(done);
        self.rt.send(task, self.request(task, bytes, ack, Some(reply)))
    }

    /// Like [`append_async`](Self::append_async), but all the waiting
    /// (for room in a full channel too) happens in the returned future: it
    /// never blocks the calling thread. For servers running many requests
    /// on a few threads.
    pub fn append_future(
        &self,
        record: &Value,
        ack: AckLevel,
    ) -> Result<impl Future<Output = Result<AppendResult>> + Send + 'static> {
        let (task, bytes) = self.encode(record)?;
        let (tx, rx) = flume::bounded(1);
        let request = self.request(task, bytes, ack, Some(tx.into()));
        let rt = self.rt.clone();
        Ok(async move {
            let thread = rt.placement.thread_of_task[task as usize] as usize;
            rt.send_to_async(thread, LANE_CLIENT, request).await?;
            if ack == AckLevel::None {
                return Ok(Self::unacknowledged(task));
            }
            rt.answer(rx).await
        })
    }

    fn check_partition(&self, task: u32) -> Result<()> {
        let tasks = self.rt.placement.parallelism.tasks;
        let def = &self.rt.def.depots[self.depot];
        if task >= tasks || (def.global && task != 0) {
            return Err(Error::Schema(format!(
                "depot {} has no partition {task} (partitions: {})",
                def.name,
                if def.global { 1 } else { tasks }
            )));
        }
        Ok(())
    }

    fn decode_records(records: Vec<(u64, Vec<u8>)>) -> Result<Vec<(u64, Value)>> {
        records
            .into_iter()
            .map(|(o, bytes)| {
                archived::from_bytes(&bytes)
                    .map(|v| (o, v))
                    .map_err(|e| Error::Schema(format!("depot record at offset {o} does not decode: {e}")))
            })
            .collect()
    }

    /// Reads records of partition `task` with offsets in `[start, end)`, up
    /// to about `bytes_max` bytes (at least one record when any is there).
    pub fn read(&self, task: u32, start: u64, end: u64, bytes_max: usize) -> Result<Vec<(u64, Value)>> {
        self.check_partition(task)?;
        let records = self.rt.call(task, |reply| Request::Read {
            depot: self.depot,
            task,
            start,
            end,
            bytes_max,
            reply,
        })?;
        Self::decode_records(records)
    }

    /// `read` that never blocks the calling thread.
    pub fn read_future(
        &self,
        task: u32,
        start: u64,
        end: u64,
        bytes_max: usize,
    ) -> impl Future<Output = Result<Vec<(u64, Value)>>> + Send + 'static {
        let checked = self.check_partition(task);
        let (rt, depot) = (self.rt.clone(), self.depot);
        async move {
            checked?;
            let records = rt
                .call_async(task, |reply| Request::Read {
                    depot,
                    task,
                    start,
                    end,
                    bytes_max,
                    reply,
                })
                .await?;
            Self::decode_records(records)
        }
    }
}

/// Reads one PState. Cheap to clone; usable from any thread. Calls block
/// the calling thread: do not call them from a task thread.
#[derive(Debug, Clone)]
pub struct PStateClient {
    rt: Arc<ModuleRuntime>,
    pstate: usize,
}

impl PStateClient {
    fn name(&self) -> &str {
        &self.rt.def.pstates[self.pstate].name
    }

    /// The task owning the path's first key.
    fn route(&self, path: &[Nav]) -> Result<u32> {
        let Some(Nav::Key(first)) = path.first() else {
            return Err(Error::Schema(format!(
                "a path on {} is routed by its first key; it must start with a key, got {path:?} \
                 (use select_on for a range over one task)",
                self.name()
            )));
        };
        Ok(task_for_key(first, self.rt.placement.parallelism.tasks))
    }

    /// `task` when given (checked), else the owner of the path's first key.
    fn target(&self, task: Option<u32>, path: &[Nav]) -> Result<u32> {
        match task {
            Some(t) => self.check_task(t).map(|()| t),
            None => self.route(path),
        }
    }

    fn check_task(&self, task: u32) -> Result<()> {
        let tasks = self.rt.placement.parallelism.tasks;
        if task >= tasks {
            return Err(Error::Schema(format!(
                "task {task} does not exist (module {} has {tasks} tasks)",
                self.rt.def.name
            )));
        }
        Ok(())
    }

    /// Every value `path` reaches; routed by the path's first key.
    pub fn select(&self, path: &[Nav]) -> Result<Vec<Value>> {
        self.select_on(self.route(path)?, path)
    }

    /// The single value `path` reaches (nil when none).
    pub fn select_one(&self, path: &[Nav]) -> Result<Value> {
        crate::pstate::one_value(self.select(path)?, self.name(), path)
    }

    /// `select` on the partition of one task, for paths not starting with
    /// a key (ranges and `all` over that task's keys).
    pub fn select_on(&self, task: u32, path: &[Nav]) -> Result<Vec<Value>> {
        self.check_task(task)?;
        let _read = self.rt.read_guard();
        self.rt.call(task, |reply| Request::Select {
            pstate: self.pstate,
            task,
            path: path.to_vec(),
            reply,
        })
    }

    /// `select` (with `task`: `select_on`) whose values go to `done` where
    /// they are read (on a task thread: `done` must be quick and must not
    /// block). Waits while the task thread's channel is full, or while a
    /// microbatch commits.
    pub fn select_then(
        &self,
        task: Option<u32>,
        path: Vec<Nav>,
        done: impl FnOnce(Result<Vec<Value>>) + Send + 'static,
    ) -> Result<()> {
        let task = self.target(task, &path)?;
        let ticket = GateTicket::enter(&self.rt);
        self.rt.send(
            task,
            Request::Select {
                pstate: self.pstate,
                task,
                path,
                reply: messages::Reply::callback(move |values| {
                    drop(ticket);
                    done(values)
                }),
            },
        )
    }

    /// `select` (with `task`: `select_on`) that never blocks the calling
    /// thread.
    pub fn select_future(
        &self,
        task: Option<u32>,
        path: Vec<Nav>,
    ) -> impl Future<Output = Result<Vec<Value>>> + Send + 'static {
        let pstate = self.pstate;
        let pending = self.target(task, &path).map(move |task| {
            self.rt.read_soon(task, move |reply| Request::Select {
                pstate,
                task,
                path,
                reply,
            })
        });
        async move { pending?.await }
    }

    /// A live view of what `path` reaches (routed by its first key): the
    /// value now, then every change.
    pub fn proxy(&self, path: &[Nav]) -> Result<Proxy> {
        let task = self.route(path)?;
        let (events_tx, events_rx) = flume::bounded(self.rt.config.proxy_events_max);
        self.rt.call(task, |reply| Request::Subscribe {
            pstate: self.pstate,
            task,
            path: path.to_vec(),
            events: events_tx,
            reply,
        })?;
        let (client, path) = (self.clone(), path.to_vec());
        let reselect = Box::new(move || client.select_on(task, &path).map(proxy::as_one));
        Proxy::start(events_rx, self.name(), reselect)
    }
}

/// Invokes one query topology. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct QueryClient {
    rt: Arc<ModuleRuntime>,
    query: usize,
}

impl QueryClient {
    /// The next origin task: round-robin over this process's tasks.
    fn origin(&self) -> u32 {
        let local = &self.rt.local_tasks;
        local[self.rt.next_origin.fetch_add(1, Ordering::Relaxed) as usize % local.len()]
    }

    /// `invoke` that never blocks the calling thread.
    pub fn invoke_future(&self, args: &Value) -> impl Future<Output = Result<Value>> + Send + 'static {
        let (query, task, args) = (self.query, self.origin(), archived::to_bytes(args));
        self.rt.read_soon(task, move |reply| Request::Invoke {
            query,
            task,
            args,
            reply,
        })
    }

    /// Runs the query with `args` and returns its result.
    pub fn invoke(&self, args: &Value) -> Result<Value> {
        let task = self.origin();
        let _read = self.rt.read_guard();
        self.rt.call(task, |reply| Request::Invoke {
            query: self.query,
            task,
            args: archived::to_bytes(args),
            reply,
        })
    }
}
