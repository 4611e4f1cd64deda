//! Remote clients: the depot, PState and query clients of a module served
//! by a worker, over one pipelined connection. Their methods match the
//! in-process clients' (`append`, `read`, `select`, `select_one`,
//! `select_on`, `invoke`).
//!
//! A client made from one [`RemoteCluster`] sends everything to that
//! worker (which forwards what belongs to another worker). Clients from
//! [`crate::manager::ClusterManager`] know every worker of the module and
//! the placement: a select goes straight to the worker owning its task;
//! appends and queries are spread over the workers round-robin (the worker
//! taking an append routes it by the depot's partitioner, which is module
//! code the client does not have).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use engine::runtime::partition::task_for_key;
use engine::runtime::placement::Placement;

use engine::cluster::{AckLevel, AppendResult};
use engine::pstate::Nav;
use engine::value::{archived, Value};
use engine::{Error, Result};

use crate::transport::{Connection, FRAME_BYTES_MAX, PROTOCOL_VERSION};
use crate::wire;

/// A connection to a worker.
#[derive(Debug, Clone)]
pub struct RemoteCluster {
    conn: Arc<Connection>,
}

fn net_error(e: crate::NetError) -> Error {
    Error::Closed(e.to_string())
}

impl RemoteCluster {
    /// Connects to the worker at `addr` (`host:port`).
    pub fn connect(addr: &str) -> Result<RemoteCluster> {
        let conn = Connection::connect(addr, PROTOCOL_VERSION, FRAME_BYTES_MAX).map_err(net_error)?;
        Ok(RemoteCluster { conn: Arc::new(conn) })
    }

    fn call(&self, request: &Value) -> Result<std::collections::BTreeMap<Value, Value>> {
        let bytes = self.conn.call(&archived::to_bytes(request)).map_err(net_error)?;
        wire::response(&bytes)
    }

    /// Sends `request` now (waiting only while the connection has its
    /// bound of requests in flight); the future resolves to the response.
    fn call_future(
        &self,
        request: &Value,
    ) -> Result<impl std::future::Future<Output = Result<std::collections::BTreeMap<Value, Value>>> + Send + 'static>
    {
        let (tx, rx) = flume::bounded(1);
        self.conn
            .send_with(
                &archived::to_bytes(request),
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
        Targets::new(vec![self.clone()], None)
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

/// The workers a client talks to, and where each task lives.
#[derive(Debug, Clone)]
pub(crate) struct Targets {
    /// By worker index.
    workers: Arc<Vec<RemoteCluster>>,
    placement: Option<Arc<Placement>>,
    next: Arc<AtomicUsize>,
}

impl Targets {
    pub(crate) fn new(workers: Vec<RemoteCluster>, placement: Option<Placement>) -> Targets {
        Targets {
            workers: Arc::new(workers),
            placement: placement.map(Arc::new),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Any worker, round-robin.
    fn any(&self) -> &RemoteCluster {
        &self.workers[self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len()]
    }

    /// The worker owning `task` (any worker when the placement is unknown
    /// or the task does not exist: it answers with the error).
    fn of_task(&self, task: u32) -> &RemoteCluster {
        match &self.placement {
            Some(p) if (task as usize) < p.thread_of_task.len() => {
                let worker = p.worker_of_thread[p.thread_of_task[task as usize] as usize] as usize;
                self.workers.get(worker).unwrap_or(&self.workers[0])
            }
            _ => &self.workers[0],
        }
    }

    fn tasks(&self) -> Option<u32> {
        self.placement.as_ref().map(|p| p.parallelism.tasks)
    }

    fn call(&self, request: &Value) -> Result<std::collections::BTreeMap<Value, Value>> {
        self.any().call(request)
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

    pub fn append(&self, record: &Value, ack: AckLevel) -> Result<AppendResult> {
        let m = self
            .cluster
            .call(&wire::append_request(&self.module, &self.depot, record, ack))?;
        wire::append_result(&m)
    }

    /// Sends the append now; the future resolves when `ack` is met. Many
    /// may be in flight on one connection.
    pub fn append_future(
        &self,
        record: &Value,
        ack: AckLevel,
    ) -> Result<impl std::future::Future<Output = Result<AppendResult>> + Send + 'static> {
        let pending = self
            .cluster
            .any()
            .call_future(&wire::append_request(&self.module, &self.depot, record, ack))?;
        Ok(async move { wire::append_result(&pending.await?) })
    }

    pub fn read(&self, task: u32, start: u64, end: u64, bytes_max: usize) -> Result<Vec<(u64, Value)>> {
        let m = self.cluster.of_task(task).call(&Value::map([
            ("op", Value::from("read")),
            ("module", Value::from(self.module.as_str())),
            ("depot", Value::from(self.depot.as_str())),
            ("task", Value::from(task)),
            ("start", Value::Int(i64::try_from(start).unwrap_or(i64::MAX))),
            ("end", Value::Int(i64::try_from(end).unwrap_or(i64::MAX))),
            ("bytesMax", Value::Int(i64::try_from(bytes_max).unwrap_or(i64::MAX))),
        ]))?;
        let Some(Value::List(records)) = m.get(&Value::from("records")) else {
            return Err(Error::Closed("a read response has no records".into()));
        };
        records
            .iter()
            .map(|r| match r {
                Value::List(p) if p.len() == 2 => Ok((p[0].as_int().unwrap_or(0) as u64, p[1].clone())),
                _ => Err(Error::Closed(
                    "a record in a read response is not [offset, record]".into(),
                )),
            })
            .collect()
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
        smol::block_on(self.request_future(path, task)?)
    }

    fn request_future(
        &self,
        path: &[Nav],
        task: Option<u32>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<Value>>> + Send + 'static> {
        let mut req = vec![
            ("op", Value::from("select")),
            ("module", Value::from(self.module.as_str())),
            ("pstate", Value::from(self.pstate.as_str())),
            ("path", wire::path_to_value(path)),
        ];
        if let Some(t) = task {
            req.push(("task", Value::from(t)));
        }
        let owner = match (task, path.first(), self.cluster.tasks()) {
            (Some(t), _, _) => Some(t),
            (None, Some(Nav::Key(k)), Some(tasks)) => Some(task_for_key(k, tasks)),
            _ => None,
        };
        let target = match owner {
            Some(t) => self.cluster.of_task(t),
            None => self.cluster.any(),
        };
        let pending = target.call_future(&Value::map(req))?;
        Ok(async move {
            match pending.await?.remove(&Value::from("values")) {
                Some(Value::List(v)) => Ok(v),
                _ => Err(Error::Closed("a select response has no values".into())),
            }
        })
    }

    /// `select` sent now; the future resolves to the values. Many may be
    /// in flight on one connection.
    pub fn select_future(
        &self,
        path: &[Nav],
    ) -> Result<impl std::future::Future<Output = Result<Vec<Value>>> + Send + 'static> {
        self.request_future(path, None)
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
        smol::block_on(self.invoke_future(args)?)
    }

    /// `invoke` sent now; the future resolves to the result. Many may be in
    /// flight on one connection.
    pub fn invoke_future(
        &self,
        args: &Value,
    ) -> Result<impl std::future::Future<Output = Result<Value>> + Send + 'static> {
        let pending = self.cluster.any().call_future(&Value::map([
            ("op", Value::from("invoke")),
            ("module", Value::from(self.module.as_str())),
            ("query", Value::from(self.query.as_str())),
            ("args", args.clone()),
        ]))?;
        Ok(async move {
            pending
                .await?
                .remove(&Value::from("result"))
                .ok_or_else(|| Error::Closed("an invoke response has no result".into()))
        })
    }
}
