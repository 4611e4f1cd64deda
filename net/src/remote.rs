//! Remote clients: the depot, PState and query clients of a module served
//! by a worker, over pipelined connections. Their methods match the
//! in-process clients' (`append`, `read`, `select`, `select_one`,
//! `select_on`, `invoke`).
//!
//! A client made from one [`RemoteCluster`] sends everything to that
//! worker (which forwards what belongs to another worker). Clients from
//! [`crate::manager::ClusterManager`] know every worker of the module and
//! the placement, and keep one connection per task thread (served by that
//! thread): a select goes straight to the connection of its task's thread;
//! an append goes to its task's thread too when the depot's partitioner
//! can run here (a global depot, or one hashing a field of its records:
//! the workers' registrations say which); other appends and queries are
//! spread over the connections round-robin (the thread taking an append
//! routes it by the depot's partitioner, module code the client does not
//! have). When a worker's connection has
//! ended (the worker restarted, perhaps at another address), a
//! manager-made client finds the module's workers again and reconnects
//! before it sends (and sends again when the send itself finds the
//! connection ended); a blocking `select`, `read` or `invoke` whose
//! connection ended before the answer is sent once more. An append already
//! sent is never sent again (it may have been taken), nor is a request
//! whose future is pending (the caller decides).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use engine::runtime::partition::task_for_key;
use engine::runtime::placement::Placement;

use engine::cluster::{AckLevel, AppendResult};
use engine::pstate::Nav;
use engine::value::{archived, Value};
use engine::{Error, Result};

use crate::transport::{Connection, FRAME_BYTES_MAX, PROTOCOL_VERSION};
use crate::wire::{self, ClientRequest};
use engine::wire::Payload;

/// A connection to a worker.
#[derive(Debug, Clone)]
pub struct RemoteCluster {
    conn: Arc<Connection>,
}

fn net_error(e: crate::NetError) -> Error {
    Error::Closed(e.to_string())
}

impl RemoteCluster {
    /// Connects to the worker at `addr` (`host:port`); both sides prove
    /// they hold the cluster's `secret`.
    pub fn connect(addr: &str, secret: &crate::auth::Secret) -> Result<RemoteCluster> {
        let conn = Connection::connect(addr, PROTOCOL_VERSION, FRAME_BYTES_MAX, secret).map_err(net_error)?;
        Ok(RemoteCluster { conn: Arc::new(conn) })
    }

    /// `connect`, served by the worker's task thread `thread` (global
    /// thread number; see `Connection::connect_to_thread`).
    pub fn connect_to_thread(addr: &str, thread: u32, secret: &crate::auth::Secret) -> Result<RemoteCluster> {
        let conn = Connection::connect_to_thread(addr, PROTOCOL_VERSION, FRAME_BYTES_MAX, thread, secret)
            .map_err(net_error)?;
        Ok(RemoteCluster { conn: Arc::new(conn) })
    }

    fn call(&self, request: &[u8]) -> Result<Payload> {
        let bytes = self.conn.call(request).map_err(net_error)?;
        wire::response(&bytes)
    }

    /// Sends `request` now (waiting only while the connection has its
    /// bound of requests in flight); the future resolves to the response.
    fn call_future(
        &self,
        request: &[u8],
    ) -> Result<impl std::future::Future<Output = Result<Payload>> + Send + 'static> {
        let (tx, rx) = flume::bounded(1);
        self.conn
            .send_with(
                request,
                Box::new(move |answer| {
                    let _ = tx.send(answer);
                }),
            )
            .map_err(net_error)?;
        Ok(async move {
            let bytes = rx
                .recv_async()
                .await
                .map_err(|_| Error::Closed("the connection ended before the answer".into()))?
                .map_err(net_error)?;
            wire::response(&bytes)
        })
    }

    fn single(&self) -> Targets {
        Targets::new(
            Resolved {
                workers: vec![self.clone()],
                threads: Vec::new(),
                placement: None,
                depots: Vec::new(),
            },
            None,
        )
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    pub fn depot(&self, module: &str, depot: &str) -> RemoteDepot {
        RemoteDepot::new(self.single(), module, depot)
    }

    pub fn pstate(&self, module: &str, pstate: &str) -> RemotePState {
        RemotePState::new(self.single(), module, pstate)
    }

    pub fn query(&self, module: &str, query: &str) -> RemoteQuery {
        RemoteQuery::new(self.single(), module, query)
    }
}

/// The workers of a module and where each task lives, as found at one
/// time.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// By worker index.
    pub(crate) workers: Vec<RemoteCluster>,
    /// By global task thread: the connection that thread serves (empty
    /// for a client of one connection).
    pub(crate) threads: Vec<RemoteCluster>,
    pub(crate) placement: Option<Placement>,
    /// How appends to each depot are routed (empty: every append goes to
    /// any worker, which routes it).
    pub(crate) depots: Vec<control::layout::DepotRoute>,
}

/// Finds a module's workers again (and connects to them).
pub(crate) type Resolve = Arc<dyn Fn() -> Result<Resolved> + Send + Sync>;

/// The workers a client talks to, and where each task lives.
#[derive(Clone)]
pub(crate) struct Targets {
    current: Arc<RwLock<Arc<Resolved>>>,
    /// `None`: a client of one connection, never renewed.
    resolve: Option<Resolve>,
    /// Held while renewing, so concurrent callers renew once; the last
    /// failed renewal, which callers within [`RENEW_BACKOFF`] of it take as
    /// their answer instead of trying again.
    renewing: Arc<Mutex<Option<(std::time::Instant, String)>>>,
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Targets")
            .field("current", &self.snapshot())
            .finish_non_exhaustive()
    }
}

/// How long a failed renewal is the answer before the workers are looked
/// up again (so callers queued behind an unreachable worker do not each
/// wait for their own connect timeout).
const RENEW_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

/// Which worker a request goes to.
#[derive(Clone, Copy)]
enum To {
    /// Any worker, round-robin.
    Any,
    /// The worker owning this task.
    Task(u32),
}

/// Where a new client starts its round-robin: differs between processes
/// and clients (from the clock and the process id), so many short-lived
/// CLI processes do not all send to worker 0.
fn round_robin_start() -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64 ^ d.as_secs());
    let mixed = engine::hash::hash64(&[nanos.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat());
    mixed as usize
}

impl Targets {
    pub(crate) fn new(resolved: Resolved, resolve: Option<Resolve>) -> Targets {
        Targets {
            current: Arc::new(RwLock::new(Arc::new(resolved))),
            resolve,
            renewing: Arc::new(Mutex::new(None)),
            next: Arc::new(AtomicUsize::new(round_robin_start())),
        }
    }

    fn snapshot(&self) -> Arc<Resolved> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn choose(&self, r: &Resolved, to: To) -> RemoteCluster {
        match (to, &r.placement) {
            // Straight to the thread serving the task, where the worker
            // knows it.
            (To::Task(task), Some(p)) if (task as usize) < p.thread_of_task.len() => {
                let thread = p.thread_of_task[task as usize] as usize;
                if let Some(c) = r.threads.get(thread) {
                    return c.clone();
                }
                let worker = p.worker_of_thread[thread] as usize;
                r.workers.get(worker).unwrap_or(&r.workers[0]).clone()
            }
            // Unknown placement or no such task: the worker answers with
            // the error.
            (To::Task(_), _) => r.workers[0].clone(),
            // Spread over every task thread's connection (the thread taking
            // an append sends it on to its task's).
            (To::Any, _) if !r.threads.is_empty() => {
                r.threads[self.next.fetch_add(1, Ordering::Relaxed) % r.threads.len()].clone()
            }
            (To::Any, _) => r.workers[self.next.fetch_add(1, Ordering::Relaxed) % r.workers.len()].clone(),
        }
    }

    /// The worker for `to`; when its connection has ended, the module's
    /// workers are found again first (a request for any worker goes to
    /// another open one when they cannot be found again now).
    fn pick(&self, to: To) -> Result<RemoteCluster> {
        let seen = self.snapshot();
        let chosen = self.choose(&seen, to);
        if !chosen.is_closed() || self.resolve.is_none() {
            return Ok(chosen);
        }
        match self.renew(&seen) {
            Ok(()) => Ok(self.choose(&self.snapshot(), to)),
            Err(e) => match to {
                To::Any => seen.workers.iter().find(|w| !w.is_closed()).cloned().ok_or(e),
                To::Task(_) => Err(e),
            },
        }
    }

    /// Finds the workers again, unless another caller already did since
    /// `seen`.
    fn renew(&self, seen: &Arc<Resolved>) -> Result<()> {
        let Some(resolve) = &self.resolve else {
            return Ok(());
        };
        let mut last_failure = self.renewing.lock().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&self.snapshot(), seen) {
            return Ok(());
        }
        if let Some((at, why)) = &*last_failure {
            if at.elapsed() < RENEW_BACKOFF {
                return Err(Error::Closed(why.clone()));
            }
        }
        match resolve() {
            Ok(fresh) => {
                *last_failure = None;
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
                Ok(())
            }
            Err(e) => {
                *last_failure = Some((std::time::Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Whether a request that failed with `e` on `used` may be sent
    /// again: that connection ended and the workers can be found again.
    fn may_resend(&self, e: &Error, used: &RemoteCluster) -> bool {
        matches!(e, Error::Closed(_)) && self.resolve.is_some() && used.is_closed()
    }

    fn tasks(&self) -> Option<u32> {
        self.snapshot().placement.as_ref().map(|p| p.parallelism.tasks)
    }

    /// Where an append of `record` to `depot` goes: straight to its task's
    /// thread when the depot's partitioner runs here (a global depot, or
    /// one hashing a field), else to any task thread (which routes it).
    fn append_to(&self, depot: &str, record: &Value) -> To {
        let r = self.snapshot();
        let (Some(p), Some(route)) = (&r.placement, r.depots.iter().find(|d| d.name == depot)) else {
            return To::Any;
        };
        match (&route.key_field, route.global) {
            (_, true) => To::Task(0),
            (Some(field), false) => To::Task(task_for_key(
                &engine::module::field_key(record, field),
                p.parallelism.tasks,
            )),
            (None, false) => To::Any,
        }
    }

    /// Sends `request` to `to`, and once more after a reconnect when
    /// `idempotent` and its connection ended.
    fn call(&self, to: To, request: &[u8], idempotent: bool) -> Result<Payload> {
        let used = self.pick(to)?;
        match used.call(request) {
            Err(e) if idempotent && self.may_resend(&e, &used) => self.pick(to)?.call(request),
            r => r,
        }
    }

    /// Waits for the read `start` sends; starts it once more when the
    /// connection it used ended before the answer.
    fn wait_read<T, F: std::future::Future<Output = Result<T>>>(
        &self,
        start: impl Fn() -> Result<(RemoteCluster, F)>,
    ) -> Result<T> {
        let (used, pending) = start()?;
        match smol::block_on(pending) {
            Err(e) if self.may_resend(&e, &used) => smol::block_on(start()?.1),
            r => r,
        }
    }

    /// Sends `request` to `to` now, once more on another connection when
    /// the send fails because the picked one just ended (nothing was sent);
    /// the connection used and the pending answer.
    fn send(
        &self,
        to: To,
        request: &[u8],
    ) -> Result<(
        RemoteCluster,
        impl std::future::Future<Output = Result<Payload>> + Send + 'static,
    )> {
        let used = self.pick(to)?;
        match used.call_future(request) {
            Ok(pending) => Ok((used, pending)),
            Err(e) if self.may_resend(&e, &used) => {
                let again = self.pick(to)?;
                let pending = again.call_future(request)?;
                Ok((again, pending))
            }
            Err(e) => Err(e),
        }
    }
}

/// A depot of a remote module.
#[derive(Debug, Clone)]
pub struct RemoteDepot {
    cluster: Targets,
    module: String,
    depot: String,
}

impl RemoteDepot {
    pub(crate) fn new(cluster: Targets, module: &str, depot: &str) -> RemoteDepot {
        RemoteDepot {
            cluster,
            module: module.into(),
            depot: depot.into(),
        }
    }

    /// The request appending `record`: the record is archived here, once;
    /// the worker stores these bytes.
    fn append_request(&self, record: &Value, ack: AckLevel) -> Vec<u8> {
        archived::encode(&ClientRequest::Append {
            module: self.module.clone(),
            depot: self.depot.clone(),
            record: archived::to_bytes(record),
            ack,
        })
    }

    pub fn append(&self, record: &Value, ack: AckLevel) -> Result<AppendResult> {
        let to = self.cluster.append_to(&self.depot, record);
        wire::append_result(self.cluster.call(to, &self.append_request(record, ack), false)?)
    }

    /// Sends the append now; the future resolves when `ack` is met. Many
    /// may be in flight on one connection.
    pub fn append_future(
        &self,
        record: &Value,
        ack: AckLevel,
    ) -> Result<impl std::future::Future<Output = Result<AppendResult>> + Send + 'static> {
        let to = self.cluster.append_to(&self.depot, record);
        let (_, pending) = self.cluster.send(to, &self.append_request(record, ack))?;
        Ok(async move { wire::append_result(pending.await?) })
    }

    pub fn read(&self, task: u32, start: u64, end: u64, bytes_max: usize) -> Result<Vec<(u64, Value)>> {
        let request = archived::encode(&ClientRequest::Read {
            module: self.module.clone(),
            depot: self.depot.clone(),
            task,
            start,
            end,
            bytes_max: bytes_max as u64,
        });
        wire::records(self.cluster.call(To::Task(task), &request, true)?)
    }
}

/// A PState of a remote module.
#[derive(Debug, Clone)]
pub struct RemotePState {
    cluster: Targets,
    module: String,
    pstate: String,
}

impl RemotePState {
    pub(crate) fn new(cluster: Targets, module: &str, pstate: &str) -> RemotePState {
        RemotePState {
            cluster,
            module: module.into(),
            pstate: pstate.into(),
        }
    }

    fn request(&self, path: &[Nav], task: Option<u32>) -> Result<Vec<Value>> {
        self.cluster.wait_read(|| self.request_future(path, task))
    }

    fn request_future(
        &self,
        path: &[Nav],
        task: Option<u32>,
    ) -> Result<(
        RemoteCluster,
        impl std::future::Future<Output = Result<Vec<Value>>> + Send + 'static,
    )> {
        let request = archived::encode(&ClientRequest::Select {
            module: self.module.clone(),
            pstate: self.pstate.clone(),
            path: engine::wire::wire_path(path),
            task,
        });
        let owner = match (task, path.first(), self.cluster.tasks()) {
            (Some(t), _, _) => Some(t),
            (None, Some(Nav::Key(k)), Some(tasks)) => Some(task_for_key(k, tasks)),
            _ => None,
        };
        let (used, pending) = self.cluster.send(owner.map_or(To::Any, To::Task), &request)?;
        Ok((used, async move { wire::selected(pending.await?) }))
    }

    /// `select` sent now; the future resolves to the values. Many may be
    /// in flight on one connection.
    pub fn select_future(
        &self,
        path: &[Nav],
    ) -> Result<impl std::future::Future<Output = Result<Vec<Value>>> + Send + 'static> {
        Ok(self.request_future(path, None)?.1)
    }

    pub fn select(&self, path: &[Nav]) -> Result<Vec<Value>> {
        self.request(path, None)
    }

    pub fn select_one(&self, path: &[Nav]) -> Result<Value> {
        engine::pstate::one_value(self.select(path)?, &self.pstate, path)
    }

    pub fn select_on(&self, task: u32, path: &[Nav]) -> Result<Vec<Value>> {
        self.request(path, Some(task))
    }
}

/// A query topology of a remote module.
#[derive(Debug, Clone)]
pub struct RemoteQuery {
    cluster: Targets,
    module: String,
    query: String,
}

impl RemoteQuery {
    pub(crate) fn new(cluster: Targets, module: &str, query: &str) -> RemoteQuery {
        RemoteQuery {
            cluster,
            module: module.into(),
            query: query.into(),
        }
    }

    pub fn invoke(&self, args: &Value) -> Result<Value> {
        self.cluster.wait_read(|| self.start(args))
    }

    /// `invoke` sent now; the future resolves to the result. Many may be in
    /// flight on one connection.
    pub fn invoke_future(
        &self,
        args: &Value,
    ) -> Result<impl std::future::Future<Output = Result<Value>> + Send + 'static> {
        Ok(self.start(args)?.1)
    }

    /// Sends the invoke: the connection used and the pending result.
    fn start(
        &self,
        args: &Value,
    ) -> Result<(
        RemoteCluster,
        impl std::future::Future<Output = Result<Value>> + Send + 'static,
    )> {
        let request = archived::encode(&ClientRequest::Invoke {
            module: self.module.clone(),
            query: self.query.clone(),
            args: archived::to_bytes(args),
        });
        let (used, pending) = self.cluster.send(To::Any, &request)?;
        Ok((used, async move { wire::value(pending.await?) }))
    }
}

impl engine::cluster::Depot for RemoteDepot {
    fn append(&self, record: &Value, ack: AckLevel) -> Result<AppendResult> {
        RemoteDepot::append(self, record, ack)
    }

    fn append_future(&self, record: &Value, ack: AckLevel) -> Result<engine::cluster::Answer<AppendResult>> {
        Ok(Box::pin(RemoteDepot::append_future(self, record, ack)?))
    }

    fn read(&self, task: u32, start: u64, end: u64, bytes_max: usize) -> Result<Vec<(u64, Value)>> {
        RemoteDepot::read(self, task, start, end, bytes_max)
    }
}

impl engine::cluster::PStateRead for RemotePState {
    fn select(&self, path: &[Nav]) -> Result<Vec<Value>> {
        RemotePState::select(self, path)
    }

    fn select_one(&self, path: &[Nav]) -> Result<Value> {
        RemotePState::select_one(self, path)
    }

    fn select_on(&self, task: u32, path: &[Nav]) -> Result<Vec<Value>> {
        RemotePState::select_on(self, task, path)
    }

    fn select_future(&self, path: &[Nav]) -> Result<engine::cluster::Answer<Vec<Value>>> {
        Ok(Box::pin(RemotePState::select_future(self, path)?))
    }
}

impl engine::cluster::Query for RemoteQuery {
    fn invoke(&self, args: &Value) -> Result<Value> {
        RemoteQuery::invoke(self, args)
    }

    fn invoke_future(&self, args: &Value) -> Result<engine::cluster::Answer<Value>> {
        Ok(Box::pin(RemoteQuery::invoke_future(self, args)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::layout::DepotRoute;
    use engine::runtime::placement::Parallelism;

    fn targets(depots: Vec<DepotRoute>) -> Targets {
        Targets::new(
            Resolved {
                workers: Vec::new(),
                threads: Vec::new(),
                placement: Some(Placement::new(Parallelism::new(8, 4, 2).unwrap())),
                depots,
            },
            None,
        )
    }

    fn route(name: &str, global: bool, key_field: Option<&str>) -> DepotRoute {
        DepotRoute {
            name: name.into(),
            global,
            key_field: key_field.map(str::to_string),
        }
    }

    #[test]
    fn appends_go_to_their_task_when_the_partitioner_runs_client_side() {
        let t = targets(vec![
            route("*byKey", false, Some("key")),
            route("*global", true, None),
            route("*random", false, None),
        ]);
        for i in 0..50 {
            let key = Value::from(format!("k{i}").as_str());
            let record = Value::map([("key", key.clone()), ("other", Value::Int(i))]);
            // The task the worker's partitioner picks.
            let want = task_for_key(&engine::module::field_key(&record, "key"), 8);
            assert_eq!(want, task_for_key(&key, 8));
            assert!(matches!(t.append_to("*byKey", &record), To::Task(task) if task == want));
            assert!(matches!(t.append_to("*global", &record), To::Task(0)));
            assert!(matches!(t.append_to("*random", &record), To::Any));
        }
        // A record without the field hashes nil, as the worker does.
        let nil = task_for_key(&Value::Nil, 8);
        assert!(matches!(t.append_to("*byKey", &Value::from("plain")), To::Task(task) if task == nil));
        // Unknown depot or routes: any thread (the worker answers).
        assert!(matches!(t.append_to("*other", &Value::Nil), To::Any));
        assert!(matches!(targets(Vec::new()).append_to("*byKey", &Value::Nil), To::Any));
    }
}
