//! What crosses between clients and task threads, and between task
//! threads. Every channel carrying these is bounded.
//!
//! Stage batches carry their items rkyv-encoded (one archived list of
//! `origin, value` pairs), the form they will have on the wire in `net/`.

use std::collections::BTreeMap;

use super::proxy::ProxyEvent;
use super::AckLevel;
use crate::error::{Error, Result};
use crate::pstate::Nav;
use crate::sync::CallOnce;
use crate::value::{archived, Value};
use crate::wire::Selected;

/// Where the answer to a request goes: a channel the requester waits on,
/// or a callback run where the answer is made (on the task thread; a server
/// uses it to queue its response frame without another thread's hop). Only
/// the first answer counts.
pub(crate) enum Reply<T> {
    Channel(flume::Sender<Result<T>>),
    Callback(CallOnce<Result<T>>),
}

impl<T> Reply<T> {
    pub fn callback(f: impl FnOnce(Result<T>) + Send + 'static) -> Reply<T> {
        Reply::Callback(CallOnce::new(f))
    }

    /// Delivers the answer; `Err` when nobody takes it any more.
    pub fn send(&self, answer: Result<T>) -> std::result::Result<(), ()> {
        match self {
            Reply::Channel(tx) => tx.send(answer).map_err(|_| ()),
            Reply::Callback(f) => f.call(answer).then_some(()).ok_or(()),
        }
    }
}

impl<T> Clone for Reply<T> {
    fn clone(&self) -> Self {
        match self {
            Reply::Channel(tx) => Reply::Channel(tx.clone()),
            Reply::Callback(f) => Reply::Callback(f.clone()),
        }
    }
}

impl<T> From<flume::Sender<Result<T>>> for Reply<T> {
    fn from(tx: flume::Sender<Result<T>>) -> Self {
        Reply::Channel(tx)
    }
}

/// What an acknowledged append returns.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AppendResult {
    /// The task (depot partition) that took the record.
    pub task: u32,
    /// The record's offset in its partition (`None` for [`AckLevel::None`]).
    pub offset: Option<u64>,
    /// With [`AckLevel::Ack`]: the values the module's stream topologies
    /// returned for this record with `ack_return`, by topology name.
    #[rkyv(with = rkyv::with::AsVec)]
    pub ack_returns: BTreeMap<String, Value>,
}

/// Requests from clients (and, on the internal channel, depot appends from
/// topologies).
pub(crate) enum Request {
    Append {
        depot: usize,
        task: u32,
        record: Vec<u8>,
        ack: AckLevel,
        reply: Option<Reply<AppendResult>>,
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
        reply: Reply<Selected>,
    },
    Invoke {
        query: usize,
        task: u32,
        args: Vec<u8>,
        reply: Reply<Value>,
    },
    Subscribe {
        pstate: usize,
        task: u32,
        path: Vec<Nav>,
        events: flume::Sender<ProxyEvent>,
        reply: Reply<()>,
    },
    /// Stop starting stream batches and microbatches; answers once the
    /// running ones finished (other threads still serve stage batches).
    Quiesce { reply: Reply<()> },
    /// Serve this client connection on the thread (see `connection.rs`).
    Adopt(Box<super::connection::Adopted>),
    /// Stop serving (clients may still hold handles; their later requests
    /// fail with `Error::Closed`).
    Shutdown,
}

/// Which computation a stage batch belongs to (topology and query
/// numbers are positions in the module, checked on arrival).
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Flow {
    Stream(usize),
    Microbatch { topology: usize, id: u64, attempt: u32 },
    Query(usize),
}

/// A batch of items for one stage on one task.
pub(crate) struct StageMsg {
    pub flow: Flow,
    pub stage: usize,
    pub task: u32,
    /// Archived `[origin, value, origin, value, ...]`.
    pub items: Vec<u8>,
    pub reply: flume::Sender<Completion>,
}

/// How a stage batch and everything downstream of it ended.
#[derive(Debug, Default, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Completion {
    /// Stream: origins that failed, with why.
    pub failed: BTreeMap<u64, String>,
    /// Stream: (origin, value) from `ack_return`.
    pub ack_returns: Vec<(u64, Value)>,
    /// Query: values emitted to the origin.
    pub results: Vec<Value>,
    /// Microbatch and query: the first failure (the whole attempt fails).
    pub fatal: Option<String>,
    /// Some of the work could not reach the worker it belongs on. Nothing
    /// about the records is known: a stream consumer runs the batch again
    /// later (at least once), a microbatch attempt is retried.
    pub unavailable: Option<String>,
}

impl Completion {
    pub(crate) fn merge(&mut self, other: Completion) {
        for (o, why) in other.failed {
            self.failed.entry(o).or_insert(why);
        }
        self.ack_returns.extend(other.ack_returns);
        self.results.extend(other.results);
        if self.fatal.is_none() {
            self.fatal = other.fatal;
        }
        if self.unavailable.is_none() {
            self.unavailable = other.unavailable;
        }
    }

    /// The first problem that ends a microbatch or query attempt.
    pub(crate) fn attempt_failure(&mut self) -> Option<String> {
        self.fatal.take().or_else(|| self.unavailable.take())
    }
}

/// From a microbatch coordinator to the task threads.
pub(crate) enum Control {
    /// Durable end offsets of the topology's source partitions on this
    /// thread: (depot, task, end).
    Ends {
        topology: usize,
        reply: Reply<Vec<(usize, u32, u64)>>,
    },
    /// Compute microbatch `id` over `ranges` (depot, task, start, end) and
    /// make its effects durable as pending.
    Process {
        topology: usize,
        id: u64,
        attempt: u32,
        ranges: Vec<(usize, u32, u64, u64)>,
        reply: Reply<()>,
    },
    /// Store this thread's changes of microbatch `id` (attempt `attempt`)
    /// durably as pending.
    Prepare {
        topology: usize,
        id: u64,
        attempt: u32,
        reply: Reply<()>,
    },
    /// Forget the pending effects of microbatch `id`.
    Abort { topology: usize, id: u64, reply: Reply<()> },
    /// Apply the pending effects of microbatch `id`.
    Commit { topology: usize, id: u64, reply: Reply<()> },
    /// Hold client reads off on this thread's worker (a microbatch commits
    /// on several workers); opens by itself after `lease_ms`.
    GateClose { lease_ms: u64, reply: Reply<()> },
    /// Let client reads on this thread's worker run again.
    GateOpen { reply: Reply<()> },
    /// After a restart: apply pending effects of `decided` where missing,
    /// drop pending effects of later microbatches.
    Recover {
        topology: usize,
        decided: u64,
        reply: Reply<()>,
    },
}

/// A stage batch's items as they travel: an archived list of
/// `(origin, value)`, the same bytes in process and between workers.
pub(crate) fn encode_items(items: &Vec<(u64, Value)>) -> Vec<u8> {
    archived::encode(items)
}

/// The items of a stage batch; each value nests at most
/// [`crate::value::DEPTH_MAX`] levels, as every value a PState stores
/// (a message's archive check alone leaves a few levels more).
pub(crate) fn decode_items(bytes: &[u8]) -> Result<Vec<(u64, Value)>> {
    let bad = |reason: String| Error::Corrupt {
        path: "<stage message>".into(),
        offset: 0,
        position: 0,
        reason,
    };
    let items = archived::decode_as::<Vec<(u64, Value)>>(bytes).map_err(|e| bad(e.to_string()))?;
    if let Some((origin, _)) = items.iter().find(|(_, v)| depth(v) > crate::value::DEPTH_MAX) {
        return Err(bad(format!(
            "the value of origin {origin} nests deeper than {} levels",
            crate::value::DEPTH_MAX
        )));
    }
    Ok(items)
}

/// Levels of lists, maps and sets in `v` (bounded by the archive check
/// that made it, so this recursion is too).
fn depth(v: &Value) -> usize {
    match v {
        Value::List(l) => 1 + l.iter().map(depth).max().unwrap_or(0),
        Value::Map(m) => 1 + m.iter().map(|(k, v)| depth(k).max(depth(v))).max().unwrap_or(0),
        Value::Set(s) => 1 + s.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_items_round_trip_and_deep_values_are_refused() {
        let nested = |d: usize| (0..d).fold(Value::Int(1), |v, _| Value::List(vec![v]));
        let items = vec![(3, Value::from("a")), (4, nested(crate::value::DEPTH_MAX))];
        assert_eq!(decode_items(&encode_items(&items)).unwrap(), items);
        // Deeper than a stored value may be, yet within a message's
        // archive bound: refused by the items' own check.
        let deep = vec![(7, nested(crate::value::DEPTH_MAX + 2))];
        let e = decode_items(&encode_items(&deep)).unwrap_err().to_string();
        assert!(e.contains("origin 7 nests deeper"), "{e}");
        assert!(decode_items(b"garbage").is_err());
    }
}
