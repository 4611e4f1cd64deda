//! An in-process cluster: a module's tasks on task threads in this process,
//! with clients that route each request to the task that owns it.
//!
//! Each task thread is a glommio executor that owns its tasks' storage: one
//! LSM store for the thread (every key starts with its task id) and one log
//! per depot partition, under `<dir>/<module>/`. Clients talk to a thread
//! through its bounded request channel; a full channel makes the client
//! wait. Requests are served concurrently on the thread, so concurrent
//! appends share group commits.
//!
//! This is the first part of issue 3: depots (append with ack levels, read
//! a partition range) and PState reads. Topologies come next; until a
//! module has stream topologies, [`AckLevel::Ack`] means what
//! [`AckLevel::AppendAck`] means (durable, and processed by all of the
//! module's zero stream topologies).

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::executor::ExecutorConfig;
use crate::log::{Log, LogConfig};
use crate::lsm::{LsmConfig, Store};
use crate::module::{ModuleDef, Partitioner};
use crate::pstate::{Nav, PState};
use crate::runtime::partition::task_for_key;
use crate::runtime::placement::{Parallelism, Placement};
use crate::value::{archived, Value};

/// How long an append waits before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckLevel {
    /// Durable and processed by the module's stream topologies (default).
    #[default]
    Ack,
    /// Durable.
    AppendAck,
    /// Queued; nothing is waited for.
    None,
}

/// Requests in flight per task thread before clients wait.
const REQUESTS_MAX: usize = 1024;

type Reply<T> = flume::Sender<Result<T>>;

enum Request {
    Append {
        depot: usize,
        task: u32,
        record: Vec<u8>,
        reply: Option<Reply<u64>>,
    },
    Read {
        depot: usize,
        task: u32,
        start: u64,
        end: u64,
        bytes_max: usize,
        reply: Reply<Vec<(u64, Vec<u8>)>>,
    },
    Select {
        pstate: usize,
        task: u32,
        path: Vec<Nav>,
        reply: Reply<Vec<Value>>,
    },
    /// Stop serving (clients may still hold handles; their later requests
    /// fail with `Error::Closed`).
    Shutdown,
}

/// One launched module.
#[derive(Debug)]
struct ModuleRuntime {
    def: ModuleDef,
    placement: Placement,
    threads: Vec<flume::Sender<Request>>,
}

/// Modules running on task threads of this process.
#[derive(Debug)]
pub struct InProcessCluster {
    dir: PathBuf,
    modules: Vec<(Arc<ModuleRuntime>, Vec<TaskThread>)>,
}

/// A task thread; it returns its storage's closing result.
type TaskThread = std::thread::JoinHandle<Result<()>>;

impl InProcessCluster {
    /// A cluster keeping its data under `dir` (created if missing). A
    /// relaunch over the same directory finds the modules' data again.
    pub fn new(dir: impl AsRef<Path>) -> InProcessCluster {
        InProcessCluster {
            dir: dir.as_ref().to_path_buf(),
            modules: Vec::new(),
        }
    }

    /// Starts `def` with `tasks` tasks on `threads` task threads.
    pub fn launch(&mut self, def: ModuleDef, tasks: u32, threads: u32) -> Result<()> {
        let parallelism = Parallelism::new(tasks, threads, 1).map_err(|e| Error::Schema(e.to_string()))?;
        if self.modules.iter().any(|(m, _)| m.def.name == def.name) {
            return Err(Error::Schema(format!("module {} is already running", def.name)));
        }
        let placement = Placement::new(parallelism);
        let module_dir = self.dir.join(&def.name);
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        // Each thread reports once its storage is open, so a launch either
        // returns with every task ready or with the first error.
        let (ready_tx, ready_rx) = flume::bounded::<Result<()>>(threads as usize);
        for thread in 0..threads {
            let (tx, rx) = flume::bounded(REQUESTS_MAX);
            senders.push(tx);
            let (def, tasks, dir, ready) = (
                def.clone(),
                placement.tasks_of_thread(thread),
                module_dir.clone(),
                ready_tx.clone(),
            );
            let executor = ExecutorConfig {
                name: format!("{}-task-thread-{thread}", def.name),
                // Several modules' threads share the process's locked memory.
                io_memory_bytes: 512 << 10,
                ..ExecutorConfig::default()
            };
            handles.push(std::thread::spawn(move || {
                executor.block_on(serve(def, thread, tasks, dir, rx, ready))?
            }));
        }
        drop(ready_tx);
        let mut first_error = None;
        for _ in 0..threads {
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
        let runtime = Arc::new(ModuleRuntime {
            def,
            placement,
            threads: senders,
        });
        if let Some(e) = first_error {
            // Nothing is left running after a failed launch.
            let _ = stop(runtime, handles);
            return Err(e);
        }
        self.modules.push((runtime, handles));
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
        Ok(DepotClient {
            rt,
            depot: index,
            next: Arc::new(AtomicU32::new(0)),
        })
    }

    /// A client of PState `pstate` of module `module`.
    pub fn pstate(&self, module: &str, pstate: &str) -> Result<PStateClient> {
        let rt = self.module(module)?.clone();
        let (index, _) = rt.def.pstate(pstate)?;
        Ok(PStateClient { rt, pstate: index })
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

/// Stops a module's task threads and waits for them; the first error a
/// thread reports (closing its storage, or a panic) is returned.
fn stop(rt: Arc<ModuleRuntime>, handles: Vec<TaskThread>) -> Result<()> {
    for thread in &rt.threads {
        // A thread that already exited has nothing to stop.
        let _ = thread.send(Request::Shutdown);
    }
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
    first.map_or(Ok(()), Err)
}

impl ModuleRuntime {
    fn send(&self, task: u32, request: Request) -> Result<()> {
        let thread = self.placement.thread_of_task[task as usize] as usize;
        self.threads[thread]
            .send(request)
            .map_err(|_| Error::Closed(format!("task thread {thread} of module {}", self.def.name)))
    }

    fn closed(&self) -> Error {
        Error::Closed(format!("module {}", self.def.name))
    }
}

/// Appends to and reads one depot. Cheap to clone; usable from any thread.
/// Calls block the calling thread: do not call them from a task thread.
#[derive(Debug, Clone)]
pub struct DepotClient {
    rt: Arc<ModuleRuntime>,
    depot: usize,
    /// Round-robin position for random depots.
    next: Arc<AtomicU32>,
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
            Partitioner::Random => Ok(self.next.fetch_add(1, Ordering::Relaxed) % tasks),
            Partitioner::Disallow => Err(Error::Schema(format!(
                "depot {} of module {} does not take client appends (its partitioner is disallow); \
                 only the module's topologies append to it",
                def.name, self.rt.def.name
            ))),
        }
    }

    /// Appends `record`; returns its task and offset once `ack` is met
    /// (offset `None` for [`AckLevel::None`]).
    pub fn append(&self, record: &Value, ack: AckLevel) -> Result<(u32, Option<u64>)> {
        let task = self.task_for(record)?;
        let bytes = archived::to_bytes(record);
        if ack == AckLevel::None {
            self.rt.send(
                task,
                Request::Append {
                    depot: self.depot,
                    task,
                    record: bytes,
                    reply: None,
                },
            )?;
            return Ok((task, None));
        }
        let (tx, rx) = flume::bounded(1);
        self.rt.send(
            task,
            Request::Append {
                depot: self.depot,
                task,
                record: bytes,
                reply: Some(tx),
            },
        )?;
        let offset = rx.recv().map_err(|_| self.rt.closed())??;
        Ok((task, Some(offset)))
    }

    /// Reads records of partition `task` with offsets in `[start, end)`, up
    /// to about `bytes_max` bytes (at least one record when any is there).
    pub fn read(&self, task: u32, start: u64, end: u64, bytes_max: usize) -> Result<Vec<(u64, Value)>> {
        let tasks = self.rt.placement.parallelism.tasks;
        let def = &self.rt.def.depots[self.depot];
        if task >= tasks || (def.global && task != 0) {
            return Err(Error::Schema(format!(
                "depot {} has no partition {task} (partitions: {})",
                def.name,
                if def.global { 1 } else { tasks }
            )));
        }
        let (tx, rx) = flume::bounded(1);
        self.rt.send(
            task,
            Request::Read {
                depot: self.depot,
                task,
                start,
                end,
                bytes_max,
                reply: tx,
            },
        )?;
        let records = rx.recv().map_err(|_| self.rt.closed())??;
        records
            .into_iter()
            .map(|(o, bytes)| {
                archived::from_bytes(&bytes)
                    .map(|v| (o, v))
                    .map_err(|e| Error::Schema(format!("depot record at offset {o} does not decode: {e}")))
            })
            .collect()
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
    /// Every value `path` reaches; routed by the path's first key.
    pub fn select(&self, path: &[Nav]) -> Result<Vec<Value>> {
        let Some(Nav::Key(first)) = path.first() else {
            return Err(Error::Schema(format!(
                "select on {} is routed by the path's first key; it must start with a key, got {path:?}",
                self.rt.def.pstates[self.pstate].name
            )));
        };
        let task = task_for_key(first, self.rt.placement.parallelism.tasks);
        self.select_on(task, path)
    }

    /// The single value `path` reaches (nil when none).
    pub fn select_one(&self, path: &[Nav]) -> Result<Value> {
        let mut values = self.select(path)?;
        match values.len() {
            0 => Ok(Value::Nil),
            1 => Ok(values.pop().expect("one value")),
            n => Err(Error::Schema(format!("select_one reached {n} values with {path:?}"))),
        }
    }

    /// `select` on the partition of one task, for paths not starting with
    /// a key (ranges and `all` over that task's keys).
    pub fn select_on(&self, task: u32, path: &[Nav]) -> Result<Vec<Value>> {
        if task >= self.rt.placement.parallelism.tasks {
            return Err(Error::Schema(format!("task {task} does not exist")));
        }
        let (tx, rx) = flume::bounded(1);
        self.rt.send(
            task,
            Request::Select {
                pstate: self.pstate,
                task,
                path: path.to_vec(),
                reply: tx,
            },
        )?;
        rx.recv().map_err(|_| self.rt.closed())?
    }
}

/// The storage of one task thread.
struct ThreadStorage {
    store: Store,
    /// `logs[depot][i]` is the partition of the i-th task of this thread
    /// (`None`: a global depot's partition lives on task 0 only).
    logs: Vec<Vec<Option<Log>>>,
    tasks: Vec<u32>,
    pstates: Vec<Vec<PState>>,
}

impl ThreadStorage {
    fn log(&self, depot: usize, task: u32) -> Result<&Log> {
        let i = self.tasks.iter().position(|&t| t == task).ok_or_else(|| {
            Error::Schema(format!(
                "task {task} is not on this task thread; the client routed it wrongly"
            ))
        })?;
        self.logs[depot][i]
            .as_ref()
            .ok_or_else(|| Error::Schema(format!("global depot has no partition on task {task}")))
    }

    fn pstate(&self, pstate: usize, task: u32) -> Result<&PState> {
        let i = self
            .tasks
            .iter()
            .position(|&t| t == task)
            .ok_or_else(|| Error::Schema(format!("task {task} is not on this task thread")))?;
        Ok(&self.pstates[pstate][i])
    }
}

async fn open_storage(def: &ModuleDef, thread: u32, tasks: &[u32], dir: &Path) -> Result<ThreadStorage> {
    let (store, _) = Store::open(dir.join(format!("thread-{thread}")), LsmConfig::default()).await?;
    let mut logs = Vec::new();
    for depot in &def.depots {
        let mut per_task = Vec::new();
        for &task in tasks {
            if depot.global && task != 0 {
                per_task.push(None);
                continue;
            }
            let name = depot.name.trim_start_matches('*');
            let (log, _) = Log::open(
                dir.join(format!("task-{task}")).join(format!("depot-{name}")),
                LogConfig::default(),
            )
            .await?;
            per_task.push(Some(log));
        }
        logs.push(per_task);
    }
    let mut pstates = Vec::new();
    for (id, p) in def.pstates.iter().enumerate() {
        let per_task = tasks
            .iter()
            .map(|&t| PState::new(p.name.clone(), t, id as u16, p.schema.clone()))
            .collect::<Result<Vec<_>>>()?;
        pstates.push(per_task);
    }
    Ok(ThreadStorage {
        store,
        logs,
        tasks: tasks.to_vec(),
        pstates,
    })
}

/// A task thread: opens its storage, then serves requests until every
/// client handle is gone, then closes its storage.
async fn serve(
    def: ModuleDef,
    thread: u32,
    tasks: Vec<u32>,
    dir: PathBuf,
    requests: flume::Receiver<Request>,
    ready: flume::Sender<Result<()>>,
) -> Result<()> {
    let storage = match open_storage(&def, thread, &tasks, &dir).await {
        Ok(s) => Rc::new(s),
        Err(e) => {
            let _ = ready.send(Err(Error::Executor(format!("task thread {thread}: {e}"))));
            return Ok(());
        }
    };
    let _ = ready.send(Ok(()));
    while let Ok(request) = requests.recv_async().await {
        if matches!(request, Request::Shutdown) {
            break;
        }
        let storage = storage.clone();
        glommio::spawn_local(async move { handle(&storage, request).await }).detach();
    }
    // Let requests still being served finish before closing.
    for depot in &storage.logs {
        for log in depot.iter().flatten() {
            log.close().await?;
        }
    }
    storage.store.close().await
}

async fn handle(storage: &ThreadStorage, request: Request) {
    match request {
        Request::Append {
            depot,
            task,
            record,
            reply,
        } => {
            let result = match storage.log(depot, task) {
                Ok(log) => log.append(&record).await,
                Err(e) => Err(e),
            };
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        }
        Request::Read {
            depot,
            task,
            start,
            end,
            bytes_max,
            reply,
        } => {
            let result = match storage.log(depot, task) {
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
            let result = storage
                .pstate(pstate, task)
                .and_then(|p| p.select(&storage.store, &path));
            let _ = reply.send(result);
        }
        Request::Shutdown => unreachable!("the serve loop stops at Shutdown"),
    }
}
