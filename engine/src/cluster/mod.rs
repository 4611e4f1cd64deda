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
mod clients;
pub mod config;
pub mod connection;
mod dataflow;
mod gate;
mod launched;
pub use config::{ModuleConfig, ReplicationConfig};
mod messages;
mod microbatch;
pub mod peer;
mod proxy;
mod replicated;
mod replog;
mod serve;
mod stream;
mod thread;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use self::clients::{Answer, ClusterClient, Depot, DepotClient, PStateClient, PStateRead, Query, QueryClient};
pub(crate) use self::launched::ModuleRuntime;
use self::launched::{open_catalog, MicrobatchShared};
pub use self::launched::{FaultHook, FaultPoint, MicrobatchProgress};
pub use self::messages::{AppendResult, Completion, Flow};
use self::messages::{Control, Request};
use self::peer::WorkerPart;
pub use self::proxy::{apply_diff, Diff, Proxy, ProxyEvent};

/// How many task threads' states (stores, logs, memtables) are alive in
/// this process: 0 once every cluster it ran has shut down. For leak tests.
pub fn live_task_threads() -> usize {
    thread::LIVE.load(std::sync::atomic::Ordering::Relaxed)
}
use self::thread::ThreadLinks;
use crate::error::{Error, Result};
use crate::executor::ExecutorConfig;
use crate::module::{Module, ModuleDef, TopologyKind};
use crate::replication::driver::ReplicaStatus;
use crate::replication::local::LocalGroup;
use crate::replication::GroupState;
use crate::runtime::placement::{Parallelism, Placement};

/// How long an append waits before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
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
    modules: Vec<Launched>,
    fault: Option<FaultHook>,
}

/// A module running here: its runtime, its task threads (or, replicated,
/// its task groups' replicas).
struct Launched {
    rt: Arc<ModuleRuntime>,
    handles: Vec<TaskThreadHandle>,
    groups: Vec<ReplicatedGroup>,
}

/// The replicas of one task thread of a replicated module, in this
/// process: the group's metastore node and each replica's OS thread.
struct ReplicatedGroup {
    thread: u32,
    /// In one process: the group's metastore node (a worker's is in the
    /// cluster's metastore).
    group: Option<Arc<LocalGroup>>,
    inbox: thread::ThreadInbox,
    replicas: Vec<Option<RunningReplica>>,
}

struct RunningReplica {
    commands: flume::Sender<replicated::Command>,
    handle: TaskThreadHandle,
}

/// A replicated task group as its metastore node and its replicas' own
/// reports say (`None`: the replica is not running).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskGroupStatus {
    pub state: GroupState,
    pub replicas: Vec<Option<ReplicaStatus>>,
}

impl std::fmt::Debug for InProcessCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessCluster")
            .field("dir", &self.dir)
            .field(
                "modules",
                &self.modules.iter().map(|m| &m.rt.def.name).collect::<Vec<_>>(),
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
        &self.modules.last().expect("just launched").rt
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
        if self.modules.iter().any(|m| m.rt.def.name == def.name) {
            return Err(Error::Schema(format!("module {} is already running", def.name)));
        }
        let placement = Placement::new(parallelism);
        let local_threads = placement.threads_of_worker(worker);
        let local_tasks = (0..tasks)
            .filter(|&t| placement.worker_of_thread[placement.thread_of_task[t as usize] as usize] == worker)
            .collect();
        let module_dir = self.dir.join(&def.name);
        let rf = self.config.replication.factor;
        let replication = part.as_ref().and_then(|p| p.replication.clone());
        if part.is_some() && (rf > 1) != replication.is_some() {
            return Err(Error::Schema(format!(
                "module {}: a worker of a module with replication factor {rf} needs {} replica part",
                def.name,
                if rf > 1 { "a" } else { "no" }
            )));
        }
        // In one process every replica is here, each in a directory of
        // its own; a worker process runs one replica in the module's.
        let replica_dirs: Vec<PathBuf> = if rf > 1 && replication.is_none() {
            (0..rf).map(|r| replica_dir(&module_dir, r)).collect()
        } else {
            vec![module_dir.clone()]
        };
        let (depot_ids, pstate_ids) = open_catalog(&def, &replica_dirs[0], &local_threads)?;
        for dir in &replica_dirs[1..] {
            if open_catalog(&def, dir, &local_threads)? != (depot_ids.clone(), pstate_ids.clone()) {
                return Err(Error::Corrupt {
                    path: dir.clone(),
                    offset: 0,
                    position: 0,
                    reason: "the replicas' catalogs give the module's depots and PStates different ids".into(),
                });
            }
        }
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
        let microbatch_readers = (0..def.depots.len())
            .map(|d| {
                (0..def.topologies.len())
                    .filter(|&t| {
                        def.topologies[t].kind == TopologyKind::Microbatch && def.topologies[t].sources.contains(&d)
                    })
                    .collect()
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
            microbatch_readers,
            next_origin: AtomicU32::new(0),
            next_connection: AtomicU32::new(0),
            fault: self.fault.clone(),
            stopped: Arc::default(),
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
            replica: replication
                .as_ref()
                .map(|r| launched::ProcessReplicas::new(r.replica, rf, threads)),
        });
        let mut handles = Vec::new();
        let mut groups = Vec::new();
        let mut first_replica_error = None;
        let local_count = local_threads.len();
        // Each thread reports once its storage is open, so a launch either
        // returns with every task ready or with the first error.
        let (ready_tx, ready_rx) = flume::bounded::<Result<()>>(local_count.max(1));
        let unreplicated = if rf > 1 { 0 } else { local_count };
        let mut bridge_error = None;
        let router = match (&part, &replication) {
            (Some(part), Some(r)) => Some(peer::Router::start(
                &rt.def.name,
                part.peers.clone(),
                r.leaders.clone(),
            )?),
            _ => None,
        };
        for (thread, inbox) in (0..threads).zip(inboxes) {
            if let (Some(router), Some(part), Some(r)) = (&router, &part, &replication) {
                // Every thread's channels lead to its group's leader; a
                // local thread's only while this process's replica does
                // not serve it.
                let local = local_threads.contains(&thread);
                let paused = rt
                    .replica
                    .as_ref()
                    .filter(|_| local)
                    .map(|p| p.serving[thread as usize].clone());
                match peer::bridge(
                    inbox.clone(),
                    &rt.def.name,
                    peer::Bounds {
                        depots: rt.def.depots.len(),
                        tasks: rt.placement.parallelism.tasks,
                    },
                    thread,
                    peer::Route::Leader(router.clone()),
                    paused,
                    &part.peers,
                    &rt.bridges_stop,
                ) {
                    Ok(h) => rt.bridges.lock().expect("bridges").extend(h),
                    Err(e) => {
                        bridge_error.get_or_insert(e);
                    }
                }
                if !local {
                    continue;
                }
                let executor = self.executor(&rt.def.name, thread, local_count);
                let mut replicas: Vec<Option<RunningReplica>> = (0..rf).map(|_| None).collect();
                let started = (r.hosts)(thread)
                    .and_then(|host| start_replica(&rt, thread, r.replica, &module_dir, &inbox, host, &executor));
                match started {
                    Ok(running) => replicas[r.replica as usize] = Some(running),
                    Err(e) => {
                        first_replica_error.get_or_insert(e);
                    }
                }
                groups.push(ReplicatedGroup {
                    thread,
                    group: None,
                    inbox,
                    replicas,
                });
                continue;
            }
            if !local_threads.contains(&thread) {
                let part = part.as_ref().expect("remote threads only with a worker part");
                let w = rt.placement.worker_of_thread[thread as usize];
                match peer::bridge(
                    inbox,
                    &rt.def.name,
                    peer::Bounds {
                        depots: rt.def.depots.len(),
                        tasks: rt.placement.parallelism.tasks,
                    },
                    thread,
                    peer::Route::Worker(w),
                    None,
                    &part.peers,
                    &rt.bridges_stop,
                ) {
                    Ok(h) => rt.bridges.lock().expect("bridges").extend(h),
                    Err(e) => {
                        bridge_error.get_or_insert(e);
                    }
                }
                continue;
            }
            let executor = self.executor(&rt.def.name, thread, local_count * rf as usize);
            if rf > 1 {
                let group = match LocalGroup::durable(rf, module_dir.join(format!("group-{thread}.json"))) {
                    Ok(g) => g,
                    Err(e) => {
                        first_replica_error.get_or_insert(e);
                        continue;
                    }
                };
                let mut replicas = Vec::new();
                for r in 0..rf {
                    match start_replica(
                        &rt,
                        thread,
                        r,
                        &replica_dirs[r as usize],
                        &inbox,
                        group.seat(r),
                        &executor,
                    ) {
                        Ok(running) => replicas.push(Some(running)),
                        Err(e) => {
                            first_replica_error.get_or_insert(e);
                            replicas.push(None);
                        }
                    }
                }
                groups.push(ReplicatedGroup {
                    thread,
                    group: Some(group),
                    inbox,
                    replicas,
                });
                continue;
            }
            let (rt, dir, ready) = (rt.clone(), module_dir.clone(), ready_tx.clone());
            handles.push(std::thread::spawn(move || {
                executor.block_on(async move {
                    let th = match thread::open(rt, thread, &dir).await {
                        Ok(th) => th,
                        Err(e) => {
                            // The channels close before the error is told:
                            // stopping the launch then finds this thread
                            // gone, rather than queueing a request no one
                            // will answer (its senders live on in `rt`, so
                            // the request would wait there for ever).
                            drop(inbox);
                            // The storage error as it is (it names the file):
                            // the executor itself started.
                            let _ = ready.send(Err(e));
                            return Ok(());
                        }
                    };
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    serve::run(th, inbox).await
                })?
            }));
        }
        drop(ready_tx);
        let mut first_error = bridge_error.or(first_replica_error);
        for _ in 0..unreplicated {
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
            let _ = stop(rt, handles, groups);
            return Err(e);
        }
        self.modules.push(Launched { rt, handles, groups });
        Ok(())
    }

    /// The executor of task thread `thread` of `module`, one of `count`
    /// executors this process runs for it (pinned, unless told otherwise,
    /// only when they do not outnumber the CPUs).
    fn executor(&self, module: &str, thread: u32, count: usize) -> ExecutorConfig {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pin = self.threads.pin.unwrap_or(count <= cpus);
        ExecutorConfig {
            name: format!("{module}-task-thread-{thread}"),
            // Several modules' threads share the process's locked memory.
            io_memory_bytes: 512 << 10,
            pin_to_cpu: pin.then_some(thread as usize % cpus),
            spin_before_park: self.threads.spin_before_park,
            ..ExecutorConfig::default()
        }
    }

    fn module(&self, name: &str) -> Result<&Arc<ModuleRuntime>> {
        self.modules
            .iter()
            .map(|m| &m.rt)
            .find(|m| m.def.name == name)
            .ok_or_else(|| Error::Schema(format!("no module named {name} is running")))
    }

    fn group_mut(&mut self, module: &str, thread: u32) -> Result<(&Arc<ModuleRuntime>, &mut ReplicatedGroup)> {
        let launched = self
            .modules
            .iter_mut()
            .find(|m| m.rt.def.name == module)
            .ok_or_else(|| Error::Schema(format!("no module named {module} is running")))?;
        let group = launched.groups.iter_mut().find(|g| g.thread == thread).ok_or_else(|| {
            Error::Schema(format!(
                "module {module} has no replicated task group {thread} here (replication factor {}, {} task \
                     threads)",
                launched.rt.config.replication.factor,
                launched.rt.links.len()
            ))
        })?;
        Ok((&launched.rt, group))
    }

    /// Task group `thread` of replicated module `module`: its metastore
    /// node and its replicas' reports.
    pub fn task_group(&mut self, module: &str, thread: u32) -> Result<TaskGroupStatus> {
        let (_, g) = self.group_mut(module, thread)?;
        let group = g.group.as_ref().ok_or_else(|| {
            Error::Schema(format!(
                "task group {thread} of module {module} keeps its state in the cluster's metastore"
            ))
        })?;
        Ok(TaskGroupStatus {
            state: group.state(),
            replicas: group.statuses(),
        })
    }

    /// The directory of replica `replica` of `module` (its task groups'
    /// storage is inside, one `tg-N` per task thread).
    pub fn replica_dir(&self, module: &str, replica: u32) -> PathBuf {
        replica_dir(&self.dir.join(module), replica)
    }

    /// Ends replica `replica` of task group `thread` as a kill -9 of its
    /// node would: nothing is closed cleanly; another replica is elected
    /// if it led.
    pub fn kill_replica(&mut self, module: &str, thread: u32, replica: u32) -> Result<()> {
        let (_, g) = self.group_mut(module, thread)?;
        let running = g
            .replicas
            .get_mut(replica as usize)
            .and_then(Option::take)
            .ok_or_else(|| Error::Schema(format!("replica {replica} of task group {thread} is not running")))?;
        let _ = running.commands.send(replicated::Command::Kill);
        running
            .handle
            .join()
            .map_err(|_| Error::Executor(format!("replica {replica} of task group {thread} panicked")))?
    }

    /// Starts replica `replica` of task group `thread` again (after
    /// [`InProcessCluster::kill_replica`]): it rejoins as a follower and
    /// catches up.
    pub fn start_replica(&mut self, module: &str, thread: u32, replica: u32) -> Result<()> {
        let dir = self.replica_dir(module, replica);
        // Restarted alone: pinned only if asked to be.
        let executor = self.executor(module, thread, usize::MAX);
        let (rt, g) = self.group_mut(module, thread)?;
        match g.replicas.get(replica as usize) {
            Some(None) => {}
            Some(Some(_)) => {
                return Err(Error::Schema(format!(
                    "replica {replica} of task group {thread} is running already"
                )))
            }
            None => {
                return Err(Error::Schema(format!(
                    "task group {thread} has no replica {replica} (replication factor {})",
                    g.replicas.len()
                )))
            }
        }
        let group = g.group.as_ref().ok_or_else(|| {
            Error::Schema(format!(
                "task group {thread} of module {module} runs its replicas in worker processes"
            ))
        })?;
        let running = start_replica(rt, thread, replica, &dir, &g.inbox, group.seat(replica), &executor)?;
        g.replicas[replica as usize] = Some(running);
        Ok(())
    }

    /// Hands a client connection of `module` to one of its task threads
    /// in this process: global thread `thread` when it is one of them (the
    /// client chose the thread of the tasks it sends for), otherwise the
    /// next one round-robin. Gives the connection back when the module is
    /// not running here.
    pub fn adopt(
        &self,
        module: &str,
        thread: Option<u32>,
        conn: connection::Adopted,
    ) -> std::result::Result<(), Box<connection::Adopted>> {
        let Ok(rt) = self.module(module) else {
            return Err(Box::new(conn));
        };
        if rt.replica.is_some() {
            // Which replica serves a thread changes: the connection is
            // served by the server, which routes each request.
            return Err(Box::new(conn));
        }
        let local = rt.placement.threads_of_worker(rt.worker);
        if local.is_empty() {
            return Err(Box::new(conn));
        }
        let chosen = match thread {
            Some(t) if local.contains(&t) => t,
            _ => local[rt.next_connection.fetch_add(1, Ordering::Relaxed) as usize % local.len()],
        };
        match rt.links[chosen as usize].client.send(Request::Adopt(Box::new(conn))) {
            Ok(()) => Ok(()),
            Err(flume::SendError(Request::Adopt(conn))) => Err(conn),
            Err(_) => unreachable!("the request sent was an Adopt"),
        }
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
            .position(|m| m.rt.def.name == module)
            .ok_or_else(|| Error::Schema(format!("no module named {module} is running")))?;
        let Launched { rt, handles, groups } = self.modules.remove(i);
        stop(rt, handles, groups)?;
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
        for Launched { rt, handles, groups } in self.modules {
            if let Err(e) = stop(rt, handles, groups) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl ClusterClient for InProcessCluster {
    fn depot(&self, module: &str, depot: &str) -> Result<Box<dyn Depot>> {
        Ok(Box::new(InProcessCluster::depot(self, module, depot)?))
    }

    fn pstate(&self, module: &str, pstate: &str) -> Result<Box<dyn PStateRead>> {
        Ok(Box::new(InProcessCluster::pstate(self, module, pstate)?))
    }

    fn query(&self, module: &str, query: &str) -> Result<Box<dyn Query>> {
        Ok(Box::new(InProcessCluster::query(self, module, query)?))
    }
}

/// The directory of replica `r` of a replicated module in this process.
fn replica_dir(module_dir: &Path, r: u32) -> PathBuf {
    module_dir.join(format!("replica-{r}"))
}

/// Starts replica `r` of task thread `thread` on an OS thread of its
/// own; returns once its storage is open (or with the error opening it).
fn start_replica(
    rt: &Arc<ModuleRuntime>,
    thread: u32,
    r: u32,
    dir: &Path,
    inbox: &thread::ThreadInbox,
    host: Arc<dyn crate::replication::driver::ReplicaHost>,
    executor: &ExecutorConfig,
) -> Result<RunningReplica> {
    let (commands, commands_rx) = flume::bounded(16);
    let (ready, ready_rx) = flume::bounded(1);
    let start = replicated::ReplicaStart {
        rt: rt.clone(),
        thread,
        id: r,
        dir: dir.to_path_buf(),
        inbox: inbox.clone(),
        host,
        executor: ExecutorConfig {
            name: format!("{}-r{r}", executor.name),
            ..executor.clone()
        },
    };
    let handle = std::thread::Builder::new()
        .name(format!("{}-tg{thread}-r{r}", rt.def.name))
        .spawn(move || replicated::run(start, commands_rx, ready))
        .map_err(|e| Error::Executor(format!("cannot start replica {r} of task group {thread}: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(RunningReplica { commands, handle }),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let ended = handle.join();
            Err(match ended {
                Ok(Err(e)) => e,
                _ => Error::Executor(format!("replica {r} of task group {thread} ended while starting")),
            })
        }
    }
}

/// Stops a module's task threads (or its task groups' replicas) and waits
/// for them; the first error a thread reports (closing its storage, or a
/// panic) is returned.
fn stop(rt: Arc<ModuleRuntime>, handles: Vec<TaskThreadHandle>, groups: Vec<ReplicatedGroup>) -> Result<()> {
    if !groups.is_empty() {
        // No replica that takes over from here starts processing again.
        rt.processing.store(false, Ordering::Release);
        let running: Vec<RunningReplica> = groups.into_iter().flat_map(|g| g.replicas).flatten().collect();
        let quiesced: Vec<_> = running
            .iter()
            .filter_map(|r| {
                let (tx, rx) = flume::bounded(1);
                r.commands
                    .send(replicated::Command::Quiesce { reply: tx })
                    .ok()
                    .map(|()| rx)
            })
            .collect();
        for rx in quiesced {
            let _ = rx.recv();
        }
        for r in &running {
            let _ = r.commands.send(replicated::Command::Shutdown);
        }
        let mut handles = handles;
        handles.extend(running.into_iter().map(|r| r.handle));
        return stop_threads(rt, handles);
    }
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
    stop_threads(rt, handles)
}

/// Waits for the threads of a module told to stop, then ends the waits of
/// requests left unanswered and stops the bridges.
fn stop_threads(rt: Arc<ModuleRuntime>, handles: Vec<TaskThreadHandle>) -> Result<()> {
    let stop_signal = rt.stopped.clone();
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
    stop_signal.fire();
    for b in bridges {
        let _ = b.join();
    }
    first.map_or(Ok(()), Err)
}
