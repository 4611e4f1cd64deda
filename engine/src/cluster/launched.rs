//! A launched module as its clients and task threads share it: the
//! definition and placement, the links into every task thread, the read
//! gate, microbatch progress, the catalog's ids and the module's
//! configuration.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::gate::{Gate, GateGuard, GateTicket};
use super::messages::{self, Request};
use super::peer::LANE_CLIENT;
use super::thread::ThreadLinks;
use super::{catalog, ModuleConfig};
use crate::error::{Error, Result};
use crate::module::ModuleDef;
use crate::runtime::placement::Placement;
use crate::value::Value;

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

#[derive(Debug)]
pub(super) struct MicrobatchShared {
    pub(super) paused: AtomicBool,
    pub(super) progress: Mutex<MicrobatchProgress>,
    pub(super) changed: Condvar,
    /// Told (at most one signal queued) when a task thread of this process
    /// writes a record to a depot partition the topology reads, so an idle
    /// coordinator wakes at once instead of polling.
    pub(super) appended: (flume::Sender<()>, flume::Receiver<()>),
}

impl Default for MicrobatchShared {
    fn default() -> Self {
        MicrobatchShared {
            paused: AtomicBool::default(),
            progress: Mutex::default(),
            changed: Condvar::default(),
            appended: flume::bounded(1),
        }
    }
}

impl MicrobatchShared {
    /// Wakes the coordinator if it waits for records.
    pub(super) fn signal_appended(&self) {
        let _ = self.appended.0.try_send(());
    }

    pub(super) fn publish(&self, id: u64, ends: &BTreeMap<(usize, u32), u64>) {
        let mut p = self.progress.lock().expect("progress");
        p.id = id;
        p.ends = ends.clone();
        self.changed.notify_all();
    }

    pub(super) fn note_failure(&self, why: &str) {
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
pub(super) fn open_catalog(def: &ModuleDef, module_dir: &Path, local_threads: &[u32]) -> Result<(Vec<u16>, Vec<u16>)> {
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

/// One launched module, shared by its clients and task threads.
pub(crate) struct ModuleRuntime {
    pub(super) def: ModuleDef,
    pub(super) placement: Placement,
    pub(super) links: Vec<ThreadLinks>,
    pub(super) gate: Arc<Gate>,
    /// Reads are gated only when the module has microbatch topologies.
    pub(super) gated: bool,
    /// Per topology (microbatch ones only).
    pub(super) microbatches: Vec<Option<MicrobatchShared>>,
    /// Per depot: how many stream topologies read it.
    pub(super) stream_consumers: Vec<usize>,
    /// Per depot: the microbatch topologies reading it.
    pub(super) microbatch_readers: Vec<Vec<usize>>,
    /// Round-robin origin of queries.
    pub(super) next_origin: AtomicU32,
    /// Round-robin thread of client connections that name none.
    pub(super) next_connection: AtomicU32,
    pub(super) fault: Option<FaultHook>,
    /// Fired once every task thread of the module has stopped.
    pub(super) stopped: Arc<StopSignal>,
    /// This process's worker index (0 when the module is all here).
    pub(super) worker: u32,
    /// Tasks whose threads run in this process.
    pub(super) local_tasks: Vec<u32>,
    /// Stream consumers and microbatch coordinators wait for this (a
    /// worker sets it once the other workers can be reached).
    pub(super) processing: AtomicBool,
    /// Bridges to the threads on other workers, and their stop flag.
    pub(super) bridges: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub(super) bridges_stop: Arc<AtomicBool>,
    /// The read gate closed for another worker's commit: its number, so a
    /// lease that ends after the matching open does nothing.
    pub(super) peer_gate: Mutex<Option<u64>>,
    pub(super) peer_gate_seq: AtomicU64,
    /// Stable ids of the depots and PStates, by their position in `def`
    /// (from the catalog): what stored data names them by.
    pub(super) depot_ids: Vec<u16>,
    pub(super) pstate_ids: Vec<u16>,
    /// Limits and queue sizes of the module's task threads.
    pub(super) config: ModuleConfig,
    /// A replicated module spread over processes: this process's replicas.
    pub(super) replica: Option<ProcessReplicas>,
}

/// The replicas a process of a replicated module runs: replica `replica`
/// of each task group of its worker.
pub(crate) struct ProcessReplicas {
    pub replica: u32,
    pub factor: u32,
    /// Per task thread: this process's replica serves it (leads and
    /// applied what it held). Peers' messages for the thread are taken
    /// only then; the bridges take the thread's channels otherwise.
    pub serving: Vec<Arc<AtomicBool>>,
    /// Per task thread: the inbox of the replica's current incarnation.
    pub mailboxes: Vec<Mutex<Option<flume::Sender<crate::replication::Input>>>>,
}

impl ProcessReplicas {
    pub(crate) fn new(replica: u32, factor: u32, threads: u32) -> ProcessReplicas {
        ProcessReplicas {
            replica,
            factor,
            serving: (0..threads).map(|_| Arc::default()).collect(),
            mailboxes: (0..threads).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Hands a peer's message to the replica of `thread` (dropped when it
    /// has no incarnation now or its inbox is full).
    pub(crate) fn deliver(&self, thread: usize, input: crate::replication::Input) {
        if let Some(inbox) = self.mailboxes[thread].lock().expect("mailbox").as_ref() {
            let _ = inbox.try_send(input);
        }
    }
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
    pub(super) fn depot_of_id(&self, id: u16) -> Option<usize> {
        self.depot_ids.iter().position(|&d| d == id)
    }

    pub(super) fn is_local(&self, thread: usize) -> bool {
        self.placement.worker_of_thread[thread] == self.worker
    }

    /// Whether a request for local thread `thread` is taken here: always,
    /// unless the module is replicated and this process's replica does
    /// not serve the thread now ([`Error::NotLeader`]: the sender finds
    /// the leader and sends it there).
    pub(super) fn takes(&self, thread: usize) -> Result<()> {
        match &self.replica {
            Some(r) if !r.serving[thread].load(Ordering::Acquire) => Err(Error::NotLeader(format!(
                "replica {} of task group {thread} of module {} does not lead it now",
                r.replica, self.def.name
            ))),
            _ => Ok(()),
        }
    }

    /// One task thread of every other worker: where a commit closes the
    /// other workers' read gates.
    pub(super) fn remote_gate_threads(&self) -> Vec<usize> {
        (0..self.placement.parallelism.workers)
            .filter(|&w| w != self.worker)
            .filter_map(|w| self.placement.threads_of_worker(w).first().map(|&t| t as usize))
            .collect()
    }

    /// Closes this worker's read gate for a commit coordinated elsewhere;
    /// it opens by itself after `lease` unless opened first.
    pub(super) async fn close_gate_for_peer(self: &Arc<Self>, lease: Duration) {
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

    pub(super) fn open_gate_for_peer(&self) {
        if self.peer_gate.lock().expect("peer gate").take().is_some() {
            self.gate.open();
        }
    }

    /// Waits (on a task thread) until the module may start processing.
    pub(super) async fn wait_processing(&self, stopping: impl Fn() -> bool) {
        while !self.processing.load(Ordering::Acquire) && !stopping() {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Puts `request` on the client (`lane` 0) or internal link of
    /// `thread`, waiting without blocking while it is full.
    pub(super) async fn send_to_async(&self, thread: usize, lane: u32, request: Request) -> Result<()> {
        let link = &self.links[thread];
        let channel = if lane == LANE_CLIENT {
            &link.client
        } else {
            &link.internal
        };
        channel.send_async(request).await.map_err(|_| self.closed())
    }

    pub(super) async fn call_async<T: Send + 'static>(
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
    pub(super) fn read_soon<T: Send + 'static>(
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

    pub(super) async fn read_guard_async(&self) -> GateGuard<'_> {
        if self.gated {
            self.gate.enter_async().await
        } else {
            GateGuard(None)
        }
    }

    pub(super) fn send(&self, task: u32, request: Request) -> Result<()> {
        let thread = self.placement.thread_of_task[task as usize] as usize;
        self.links[thread]
            .client
            .send(request)
            .map_err(|_| Error::Closed(format!("task thread {thread} of module {} has stopped", self.def.name)))
    }

    pub(super) fn closed(&self) -> Error {
        Error::Closed(format!("module {} has stopped on this worker", self.def.name))
    }

    pub(super) fn microbatch(&self, topology: usize) -> &MicrobatchShared {
        self.microbatches[topology].as_ref().expect("a microbatch topology")
    }

    pub(super) fn read_guard(&self) -> GateGuard<'_> {
        if self.gated {
            self.gate.enter()
        } else {
            GateGuard(None)
        }
    }

    /// Sends `request` to the owner of `task` and waits for its answer.
    pub(super) fn call<T: Send + 'static>(
        &self,
        task: u32,
        request: impl FnOnce(messages::Reply<T>) -> Request,
    ) -> Result<T> {
        let (tx, rx) = flume::bounded(1);
        self.send(task, request(tx.into()))?;
        futures_lite::future::block_on(self.answer(rx))
    }

    /// The answer to a request, or `Closed` once the module stopped (a
    /// request that reached a channel just as its thread stopped reading
    /// is never answered, and its reply sender stays in the channel).
    pub(super) fn answer<T>(&self, rx: flume::Receiver<Result<T>>) -> impl Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
    {
        let stopped = self.stopped.wait();
        let (closed, closed2) = (self.closed(), self.closed());
        futures_lite::future::or(async move { rx.recv_async().await.map_err(|_| closed)? }, async move {
            stopped.await;
            Err(closed2)
        })
    }
}

impl Drop for ModuleRuntime {
    fn drop(&mut self) {
        // Gone without a shutdown (a failed launch): nobody answers now.
        self.stopped.fire();
    }
}

/// Fired once every task thread of a module has stopped: requests still
/// waiting for an answer then get one (a request left in a stopped
/// thread's channel would otherwise wait for ever). Waiting costs O(1) to
/// start and to give up: every request in flight waits on it (a flume
/// channel's waiters were a list scanned on every drop, 17% of a busy
/// worker's CPU).
#[derive(Debug, Default)]
pub(crate) struct StopSignal {
    fired: std::sync::atomic::AtomicBool,
    event: event_listener::Event,
}

impl StopSignal {
    pub(super) fn fire(&self) {
        self.fired.store(true, std::sync::atomic::Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    /// Completes once the signal has fired.
    pub(super) fn wait(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let signal = self.clone();
        async move {
            loop {
                if signal.fired.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let listener = signal.event.listen();
                // Fired between the look and the listen: the listener would
                // miss it.
                if signal.fired.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                listener.await;
            }
        }
    }
}
