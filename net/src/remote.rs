//! Remote clients: the depot, PState and query clients of a module served
//! by a worker, over one pipelined connection. Their methods match the
//! in-process clients' (`append`, `read`, `select`, `select_one`,
//! `select_on`, `invoke`).
//!
//! Routing to the worker that owns a task comes with the Conductor's
//! assignments (issue 4); today a remote cluster is one worker serving all
//! tasks of its module.

use std::sync::Arc;

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

    pub fn depot(&self, module: &str, depot: &str) -> RemoteDepot {
        RemoteDepot {
            cluster: self.clone(),
            module: module.into(),
            depot: depot.into(),
        }
    }

    pub fn pstate(&self, module: &str, pstate: &str) -> RemotePState {
        RemotePState {
            cluster: self.clone(),
            module: module.into(),
            pstate: pstate.into(),
        }
    }

    pub fn query(&self, module: &str, query: &str) -> RemoteQuery {
        RemoteQuery {
            cluster: self.clone(),
            module: module.into(),
            query: query.into(),
        }
    }
}

/// A depot of a remote module.
#[derive(Debug, Clone)]
pub struct RemoteDepot {
    cluster: RemoteCluster,
    module: String,
    depot: String,
}

impl RemoteDepot {
    pub fn append(&self, record: &Value, ack: AckLevel) -> Result<AppendResult> {
        let m = self
            .cluster
            .call(&wire::append_request(&self.module, &self.depot, record, ack))?;
        wire::append_result(&m)
    }

    pub fn read(&self, task: u32, start: u64, end: u64, bytes_max: usize) -> Result<Vec<(u64, Value)>> {
        let m = self.cluster.call(&Value::map([
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
    cluster: RemoteCluster,
    module: String,
    pstate: String,
}

impl RemotePState {
    fn request(&self, path: &[Nav], task: Option<u32>) -> Result<Vec<Value>> {
        let mut req = vec![
            ("op", Value::from("select")),
            ("module", Value::from(self.module.as_str())),
            ("pstate", Value::from(self.pstate.as_str())),
            ("path", wire::path_to_value(path)),
        ];
        if let Some(t) = task {
            req.push(("task", Value::from(t)));
        }
        let m = self.cluster.call(&Value::map(req))?;
        match m.get(&Value::from("values")) {
            Some(Value::List(v)) => Ok(v.clone()),
            _ => Err(Error::Closed("a select response has no values".into())),
        }
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
    cluster: RemoteCluster,
    module: String,
    query: String,
}

impl RemoteQuery {
    pub fn invoke(&self, args: &Value) -> Result<Value> {
        let m = self.cluster.call(&Value::map([
            ("op", Value::from("invoke")),
            ("module", Value::from(self.module.as_str())),
            ("query", Value::from(self.query.as_str())),
            ("args", args.clone()),
        ]))?;
        m.get(&Value::from("result"))
            .cloned()
            .ok_or_else(|| Error::Closed("an invoke response has no result".into()))
    }
}
