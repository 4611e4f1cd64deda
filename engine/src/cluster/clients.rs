//! The clients of a module in this process: depots (append, read),
//! PStates (select, proxy), queries; and [`ClusterClient`], which hands
//! them out.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::launched::ModuleRuntime;
use super::messages::{self, AppendResult, Request};
use super::peer::LANE_CLIENT;
use super::{proxy, AckLevel, Proxy};
use crate::error::{Error, Result};
use crate::module::Partitioner;
use crate::pstate::Nav;
use crate::runtime::partition::task_for_key;
use crate::value::{archived, Value};

/// An answer still to come, from a client of either kind.
pub type Answer<T> = std::pin::Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>;

/// A depot's client: the same calls in this process and over the network
/// (`net::remote::RemoteDepot`), so code (the benchmark harness, tools)
/// works with either.
pub trait Depot: Send + Sync {
    /// Appends `record` and waits until `ack` is met.
    fn append(&self, record: &Value, ack: AckLevel) -> Result<AppendResult>;
    /// Sends `record` now (bad input fails here); the answer resolves when
    /// `ack` is met, without blocking the calling thread.
    fn append_future(&self, record: &Value, ack: AckLevel) -> Result<Answer<AppendResult>>;
    /// Records of partition `task` from offset `start` (below `end`), up
    /// to about `bytes_max` bytes.
    fn read(&self, task: u32, start: u64, end: u64, bytes_max: usize) -> Result<Vec<(u64, Value)>>;
}

/// A PState's client, in this process or over the network.
pub trait PStateRead: Send + Sync {
    /// Every value `path` reaches; routed by the path's first key.
    fn select(&self, path: &[Nav]) -> Result<Vec<Value>>;
    /// The single value `path` reaches (nil when none).
    fn select_one(&self, path: &[Nav]) -> Result<Value>;
    /// `select` on task `task` (for paths that do not start with a key).
    fn select_on(&self, task: u32, path: &[Nav]) -> Result<Vec<Value>>;
    /// `select` sent now; the answer never blocks the calling thread.
    fn select_future(&self, path: &[Nav]) -> Result<Answer<Vec<Value>>>;
}

/// A query topology's client, in this process or over the network.
pub trait Query: Send + Sync {
    fn invoke(&self, args: &Value) -> Result<Value>;
    /// `invoke` sent now; the answer never blocks the calling thread.
    fn invoke_future(&self, args: &Value) -> Result<Answer<Value>>;
}

/// What hands out clients: the in-process cluster, or a remote cluster
/// manager (`net::manager::ClusterManager`). Clients have the same calls
/// either way.
pub trait ClusterClient {
    fn depot(&self, module: &str, depot: &str) -> Result<Box<dyn Depot>>;
    fn pstate(&self, module: &str, pstate: &str) -> Result<Box<dyn PStateRead>>;
    fn query(&self, module: &str, query: &str) -> Result<Box<dyn Query>>;
}

impl Depot for DepotClient {
    fn append(&self, record: &Value, ack: AckLevel) -> Result<AppendResult> {
        DepotClient::append(self, record, ack)
    }

    fn append_future(&self, record: &Value, ack: AckLevel) -> Result<Answer<AppendResult>> {
        Ok(Box::pin(DepotClient::append_future(self, record, ack)?))
    }

    fn read(&self, task: u32, start: u64, end: u64, bytes_max: usize) -> Result<Vec<(u64, Value)>> {
        DepotClient::read(self, task, start, end, bytes_max)
    }
}

impl PStateRead for PStateClient {
    fn select(&self, path: &[Nav]) -> Result<Vec<Value>> {
        PStateClient::select(self, path)
    }

    fn select_one(&self, path: &[Nav]) -> Result<Value> {
        PStateClient::select_one(self, path)
    }

    fn select_on(&self, task: u32, path: &[Nav]) -> Result<Vec<Value>> {
        PStateClient::select_on(self, task, path)
    }

    fn select_future(&self, path: &[Nav]) -> Result<Answer<Vec<Value>>> {
        Ok(Box::pin(PStateClient::select_future(self, None, path.to_vec())))
    }
}

impl Query for QueryClient {
    fn invoke(&self, args: &Value) -> Result<Value> {
        QueryClient::invoke(self, args)
    }

    fn invoke_future(&self, args: &Value) -> Result<Answer<Value>> {
        Ok(Box::pin(QueryClient::invoke_future(self, args)))
    }
}

/// Appends to and reads one depot. Cheap to clone; usable from any thread.
/// Blocking calls block the calling thread: do not call them from a task
/// thread.
#[derive(Debug, Clone)]
pub struct DepotClient {
    pub(super) rt: Arc<ModuleRuntime>,
    pub(super) depot: usize,
}

impl DepotClient {
    /// The task that takes `record`.
    pub(super) fn task_for(&self, record: &Value) -> Result<u32> {
        let def = &self.rt.def.depots[self.depot];
        match def.fixed_task(record, self.rt.placement.parallelism.tasks) {
            Some(task) => Ok(task),
            None if matches!(def.partitioner, Partitioner::Disallow) => Err(Error::Schema(format!(
                "depot {} of module {} does not take client appends (its partitioner is disallow); \
                 only the module's topologies append to it",
                def.name, self.rt.def.name
            ))),
            // Round-robin over this process's tasks (all of them unless the
            // module is spread over workers), shared by every client.
            None => {
                let local = &self.rt.local_tasks;
                Ok(local[self.rt.next_origin.fetch_add(1, Ordering::Relaxed) as usize % local.len()])
            }
        }
    }

    /// Appends `record` and waits until `ack` is met.
    pub fn append(&self, record: &Value, ack: AckLevel) -> Result<AppendResult> {
        futures_lite::future::block_on(self.append_async(record, ack)?)
    }

    /// The task that takes `record` and its archive, checked against the
    /// record size limit: bad input fails before anything is sent.
    pub(super) fn encode(&self, record: &Value) -> Result<(u32, Vec<u8>)> {
        let task = self.task_for(record)?;
        let bytes = archived::to_bytes(record);
        self.check_record_size(bytes.len())?;
        Ok((task, bytes))
    }

    fn check_record_size(&self, bytes: usize) -> Result<()> {
        Error::check_limit(
            "record",
            "record_bytes_max",
            bytes,
            self.rt.config.log.record_bytes_max as usize,
        )
    }

    /// The task that takes the archived record `bytes`, checked: a valid
    /// archive within the record size limit (what a remote client sent;
    /// the bytes go on to the log as they are).
    pub(super) fn task_for_archived(&self, bytes: &[u8]) -> Result<u32> {
        self.check_record_size(bytes.len())?;
        let bad = |e: archived::ArchiveError| Error::Schema(format!("the record is not a valid archived value: {e}"));
        let def = &self.rt.def.depots[self.depot];
        match def
            .fixed_task_archived(bytes, self.rt.placement.parallelism.tasks)
            .map_err(bad)?
        {
            Some(task) => Ok(task),
            None => self.task_for(&Value::Nil),
        }
    }

    pub(super) fn request(
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
    pub(super) fn unacknowledged(task: u32) -> AppendResult {
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
        Ok(self.send_future(task, bytes, ack))
    }

    /// [`append_future`](Self::append_future) of a record already
    /// archived (checked here; stored as it is).
    pub fn append_archived_future(
        &self,
        record: Vec<u8>,
        ack: AckLevel,
    ) -> Result<impl Future<Output = Result<AppendResult>> + Send + 'static> {
        let task = self.task_for_archived(&record)?;
        Ok(self.send_future(task, record, ack))
    }

    fn send_future(
        &self,
        task: u32,
        bytes: Vec<u8>,
        ack: AckLevel,
    ) -> impl Future<Output = Result<AppendResult>> + Send + 'static {
        let (tx, rx) = flume::bounded(1);
        let request = self.request(task, bytes, ack, Some(tx.into()));
        let rt = self.rt.clone();
        let thread = rt.placement.thread_of_task[task as usize] as usize;
        // Sent now when the task thread's channel has room, so a caller
        // keeps many appends in flight before it polls any (a future that
        // sent only when polled kept one in flight per client thread);
        // otherwise sent when first polled.
        let unsent = match rt.links[thread].client.try_send(request) {
            Ok(()) => None,
            Err(flume::TrySendError::Full(r) | flume::TrySendError::Disconnected(r)) => Some(r),
        };
        async move {
            if let Some(request) = unsent {
                rt.send_to_async(thread, LANE_CLIENT, request).await?;
            }
            if ack == AckLevel::None {
                return Ok(Self::unacknowledged(task));
            }
            rt.answer(rx).await
        }
    }

    pub(super) fn check_partition(&self, task: u32) -> Result<()> {
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

    pub(super) fn decode_records(records: Vec<(u64, Vec<u8>)>) -> Result<Vec<(u64, Value)>> {
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
        let pending = self.read_archived_future(task, start, end, bytes_max);
        async move { Self::decode_records(pending.await?) }
    }

    /// [`read_future`](Self::read_future) giving each record as the
    /// partition stores it (an archived value, checked by its frame's
    /// checksum): a server sends them on without decoding them.
    pub fn read_archived_future(
        &self,
        task: u32,
        start: u64,
        end: u64,
        bytes_max: usize,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<u8>)>>> + Send + 'static {
        let checked = self.check_partition(task);
        let (rt, depot) = (self.rt.clone(), self.depot);
        async move {
            checked?;
            rt.call_async(task, |reply| Request::Read {
                depot,
                task,
                start,
                end,
                bytes_max,
                reply,
            })
            .await
        }
    }
}

/// Reads one PState. Cheap to clone; usable from any thread. Calls block
/// the calling thread: do not call them from a task thread.
#[derive(Debug, Clone)]
pub struct PStateClient {
    pub(super) rt: Arc<ModuleRuntime>,
    pub(super) pstate: usize,
}

impl PStateClient {
    pub(super) fn name(&self) -> &str {
        &self.rt.def.pstates[self.pstate].name
    }

    /// The task owning the path's first key.
    pub(super) fn route(&self, path: &[Nav]) -> Result<u32> {
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
    pub(super) fn target(&self, task: Option<u32>, path: &[Nav]) -> Result<u32> {
        match task {
            Some(t) => self.check_task(t).map(|()| t),
            None => self.route(path),
        }
    }

    pub(super) fn check_task(&self, task: u32) -> Result<()> {
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
        self.rt
            .call(task, |reply| Request::Select {
                pstate: self.pstate,
                task,
                path: path.to_vec(),
                reply,
            })?
            .into_values()
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
        async move { pending?.await?.into_values() }
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
    pub(super) rt: Arc<ModuleRuntime>,
    pub(super) query: usize,
}

impl QueryClient {
    /// The next origin task: round-robin over this process's tasks.
    pub(super) fn origin(&self) -> u32 {
        let local = &self.rt.local_tasks;
        local[self.rt.next_origin.fetch_add(1, Ordering::Relaxed) as usize % local.len()]
    }

    /// `invoke` that never blocks the calling thread.
    pub fn invoke_future(&self, args: &Value) -> impl Future<Output = Result<Value>> + Send + 'static {
        self.invoke_archived_future(archived::to_bytes(args))
    }

    /// `invoke_future` with arguments already archived (checked on the
    /// task thread, where they are read).
    pub fn invoke_archived_future(&self, args: Vec<u8>) -> impl Future<Output = Result<Value>> + Send + 'static {
        let (query, task) = (self.query, self.origin());
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
