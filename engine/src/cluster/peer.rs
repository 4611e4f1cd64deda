//! A module spread over several workers: what crosses between them.
//!
//! Each task thread of a module has the same links ([`ThreadLinks`]) on
//! every worker. On the worker that runs the thread they lead into it; on
//! the others they lead into *bridges*: one OS thread per lane of a remote
//! task thread that encodes each message and hands it to [`Peers`] (the
//! transport, implemented by `net`), whose answer goes back on the
//! message's reply channel. The receiving worker decodes the message with
//! [`serve`] and puts it on the same channel a local sender would have.
//!
//! Lanes keep the in-process deadlock freedom: a lane carries one kind of
//! work (client requests, topology appends, microbatch control, stage
//! level `s`), has its own connection, and only blocks on the channel of
//! that kind on the other side, so a full lane never holds up another.
//!
//! ```text
//! message:  archived Value list; first the kind, then its fields
//!   lane 0/1  [append, depot, task, record bytes, ack 0|1|2, wantsReply]
//!             [read, depot, task, start, end, bytesMax]
//!             [select, pstate, task, path]  [invoke, query, task, args bytes]
//!   lane 2    [ends|process|prepare|abort|commit|recover|gateClose|gateOpen, thread, ...]
//!   lane 3+   [stage, flowKind, a, b, c, stage, task, items bytes]
//! answer:   [ok, value] | [err, kind, message]
//! ```
//! A transport failure is [`Error::Unavailable`]: a stream batch that got
//! one runs again later, a microbatch attempt is retried.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::messages::{AppendResult, Completion, Control, Flow, Reply, Request, StageMsg};
use super::thread::ThreadInbox;
use super::{AckLevel, ModuleRuntime};
use crate::error::{Error, Result};
use crate::module::ModuleDef;
use crate::pstate::path::{path_from_value, path_to_value};
use crate::value::{archived, Value};

/// Called once with a message's answer (or why there is none).
pub type Done = Box<dyn FnOnce(Result<Vec<u8>>) + Send>;

/// How a worker reaches the other workers of its module.
pub trait Peers: Send + Sync + 'static {
    /// Sends `message` on lane `lane` to worker `worker`; `done` is called
    /// once with the answer, or with [`Error::Unavailable`] when the worker
    /// cannot be reached or the connection breaks before the answer. May
    /// block while the lane has its bound of messages in flight.
    fn send(&self, worker: u32, lane: u32, message: Vec<u8>, done: Done);
}

pub const LANE_CLIENT: u32 = 0;
pub const LANE_INTERNAL: u32 = 1;
pub const LANE_CONTROL: u32 = 2;
/// Lane of stage level `s` (stage `s >= 1`) is `LANE_STAGES + s - 1`.
pub const LANE_STAGES: u32 = 3;

/// How this process takes part in a module spread over workers.
#[derive(Clone)]
pub struct WorkerPart {
    pub workers: u32,
    /// This worker's index (`0..workers`).
    pub worker: u32,
    pub peers: Arc<dyn Peers>,
}

impl std::fmt::Debug for WorkerPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPart")
            .field("workers", &self.workers)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

fn bad(why: impl std::fmt::Display) -> Error {
    Error::Topology(format!("a message between workers is malformed: {why}"))
}

fn int(v: Option<&Value>) -> Result<i64> {
    v.and_then(Value::as_int)
        .ok_or_else(|| bad("an integer field is missing"))
}

/// An index field that must name one of `len` objects (depots, PStates,
/// topologies, queries): a negative or out-of-range number from the
/// network is refused here, never used to index.
fn index(v: Option<&Value>, len: usize, what: &str) -> Result<usize> {
    let i = int(v)?;
    usize::try_from(i)
        .ok()
        .filter(|&i| i < len)
        .ok_or_else(|| bad(format!("{what} {i} does not exist")))
}

fn bytes(v: Option<&Value>) -> Result<Vec<u8>> {
    match v {
        Some(Value::Bytes(b)) => Ok(b.clone()),
        _ => Err(bad("a bytes field is missing")),
    }
}

fn ack_code(ack: AckLevel) -> i64 {
    match ack {
        AckLevel::Ack => 0,
        AckLevel::AppendAck => 1,
        AckLevel::None => 2,
    }
}

fn ack_from(code: i64) -> Result<AckLevel> {
    match code {
        0 => Ok(AckLevel::Ack),
        1 => Ok(AckLevel::AppendAck),
        2 => Ok(AckLevel::None),
        _ => Err(bad(format!("ack level {code}"))),
    }
}

fn encode_answer(r: Result<Value>) -> Vec<u8> {
    archived::to_bytes(&match r {
        Ok(v) => Value::list([Value::from("ok"), v]),
        Err(e) => {
            let kind = match &e {
                Error::Schema(_) => "schema",
                Error::Topology(_) => "topology",
                Error::Closed(_) => "closed",
                Error::Unavailable(_) => "unavailable",
                Error::LimitExceeded { .. } => "limit",
                _ => "other",
            };
            let mut parts = vec![Value::from("err"), Value::from(kind), Value::from(e.to_string())];
            if let Error::LimitExceeded { size, max, .. } = e {
                parts.extend([Value::Int(size as i64), Value::Int(max as i64)]);
            }
            Value::List(parts)
        }
    })
}

fn decode_answer(r: Result<Vec<u8>>) -> Result<Value> {
    let Value::List(parts) = archived::from_bytes(&r?).map_err(bad)? else {
        return Err(bad("the answer is not a list"));
    };
    let mut it = parts.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(Value::Str(ok)), Some(v), None) if ok == "ok" => Ok(v),
        (Some(Value::Str(err)), Some(Value::Str(kind)), Some(Value::Str(why))) if err == "err" => {
            Err(match kind.as_str() {
                "schema" => Error::Schema(why),
                "closed" | "unavailable" => Error::Unavailable(why),
                "limit" => Error::LimitExceeded {
                    what: "a batch on another worker",
                    limit: "its storage limit",
                    size: it.next().and_then(|v| v.as_int()).unwrap_or(0) as u64,
                    max: it.next().and_then(|v| v.as_int()).unwrap_or(0) as u64,
                },
                _ => Error::Topology(why),
            })
        }
        _ => Err(bad("the answer has an unknown form")),
    }
}

fn flow_value(flow: Flow) -> [Value; 4] {
    let (k, a, b, c) = match flow {
        Flow::Stream(t) => (0, t as i64, 0, 0),
        Flow::Microbatch { topology, id, attempt } => (1, topology as i64, id as i64, i64::from(attempt)),
        Flow::Query(q) => (2, q as i64, 0, 0),
    };
    [k, a, b, c].map(Value::Int)
}

fn flow_from(f: &[Value], def: &ModuleDef) -> Result<Flow> {
    let n = |i: usize| int(f.get(i));
    let topology = || index(f.get(1), def.topologies.len(), "topology");
    Ok(match n(0)? {
        0 => Flow::Stream(topology()?),
        1 => Flow::Microbatch {
            topology: topology()?,
            id: n(2)? as u64,
            attempt: n(3)? as u32,
        },
        2 => Flow::Query(index(f.get(1), def.queries.len(), "query")?),
        k => return Err(bad(format!("flow kind {k}"))),
    })
}

fn append_result_value(r: AppendResult) -> Value {
    Value::list([
        Value::Int(i64::from(r.task)),
        r.offset.map_or(Value::Nil, |o| Value::Int(o as i64)),
        Value::Map(r.ack_returns.into_iter().map(|(k, v)| (Value::Str(k), v)).collect()),
    ])
}

fn append_result_from(v: Value) -> Result<AppendResult> {
    let Value::List(p) = v else {
        return Err(bad("an append result is not a list"));
    };
    let ack_returns = match p.get(2) {
        Some(Value::Map(m)) => m
            .iter()
            .map(|(k, v)| Ok((k.as_str().ok_or_else(|| bad("topology name"))?.to_string(), v.clone())))
            .collect::<Result<BTreeMap<_, _>>>()?,
        _ => return Err(bad("ack returns")),
    };
    Ok(AppendResult {
        task: int(p.first())? as u32,
        offset: p.get(1).and_then(Value::as_int).map(|o| o as u64),
        ack_returns,
    })
}

fn completion_value(c: Completion) -> Value {
    let pairs = |v: Vec<(u64, Value)>| {
        Value::List(
            v.into_iter()
                .map(|(o, v)| Value::list([Value::Int(o as i64), v]))
                .collect(),
        )
    };
    let opt = |s: Option<String>| s.map_or(Value::Nil, Value::Str);
    Value::list([
        pairs(c.failed.into_iter().map(|(o, w)| (o, Value::Str(w))).collect()),
        pairs(c.ack_returns),
        Value::List(c.results),
        opt(c.fatal),
        opt(c.unavailable),
    ])
}

fn completion_from(v: Value) -> Result<Completion> {
    let Value::List(p) = v else {
        return Err(bad("a completion is not a list"));
    };
    let pairs = |v: Option<&Value>| -> Result<Vec<(u64, Value)>> {
        let Some(Value::List(items)) = v else {
            return Err(bad("completion pairs"));
        };
        items
            .iter()
            .map(|it| match it {
                Value::List(ov) if ov.len() == 2 => Ok((int(ov.first())? as u64, ov[1].clone())),
                _ => Err(bad("completion pair")),
            })
            .collect()
    };
    let opt = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    Ok(Completion {
        failed: pairs(p.first())?
            .into_iter()
            .map(|(o, w)| (o, w.as_str().unwrap_or_default().to_string()))
            .collect(),
        ack_returns: pairs(p.get(1))?,
        results: match p.get(2) {
            Some(Value::List(r)) => r.clone(),
            _ => return Err(bad("completion results")),
        },
        fatal: opt(p.get(3)),
        unavailable: opt(p.get(4)),
    })
}

fn reply_with<T: Send + 'static>(reply: Reply<T>, from: impl FnOnce(Value) -> Result<T> + Send + 'static) -> Done {
    Box::new(move |answer| {
        let _ = reply.send(decode_answer(answer).and_then(from));
    })
}

fn unit(_: Value) -> Result<()> {
    Ok(())
}

fn encode_request(request: Request) -> Option<(Vec<u8>, Done)> {
    let i = |n: i64| Value::Int(n);
    Some(match request {
        Request::Append {
            depot,
            task,
            record,
            ack,
            reply,
        } => {
            let wants = reply.is_some();
            let msg = Value::list([
                Value::from("append"),
                i(depot as i64),
                i(i64::from(task)),
                Value::Bytes(record),
                i(ack_code(ack)),
                Value::Bool(wants),
            ]);
            let done: Done = match reply {
                Some(reply) => reply_with(reply, append_result_from),
                None => Box::new(|_| {}),
            };
            (archived::to_bytes(&msg), done)
        }
        Request::Read {
            depot,
            task,
            start,
            end,
            bytes_max,
            reply,
        } => {
            let msg = Value::list([
                Value::from("read"),
                i(depot as i64),
                i(i64::from(task)),
                i(start as i64),
                i(end as i64),
                i(bytes_max as i64),
            ]);
            let done = reply_with(reply, |v| {
                let Value::List(records) = v else {
                    return Err(bad("records"));
                };
                records
                    .into_iter()
                    .map(|r| match r {
                        Value::List(p) if p.len() == 2 => Ok((int(p.first())? as u64, bytes(p.get(1))?)),
                        _ => Err(bad("record")),
                    })
                    .collect()
            });
            (archived::to_bytes(&msg), done)
        }
        Request::Select {
            pstate,
            task,
            path,
            reply,
        } => {
            let msg = Value::list([
                Value::from("select"),
                i(pstate as i64),
                i(i64::from(task)),
                path_to_value(&path),
            ]);
            let done = reply_with(reply, |v| match v {
                Value::List(values) => Ok(values),
                _ => Err(bad("selected values")),
            });
            (archived::to_bytes(&msg), done)
        }
        Request::Invoke {
            query,
            task,
            args,
            reply,
        } => {
            let msg = Value::list([
                Value::from("invoke"),
                i(query as i64),
                i(i64::from(task)),
                Value::Bytes(args),
            ]);
            (archived::to_bytes(&msg), reply_with(reply, Ok))
        }
        Request::Subscribe { reply, .. } => {
            let _ = reply.send(Err(Error::Schema(
                "a proxy is served by the worker that owns its task; subscribe through that worker".into(),
            )));
            return None;
        }
        Request::Quiesce { reply } => {
            // Only local threads are quiesced; a remote one has nothing to do.
            let _ = reply.send(Ok(()));
            return None;
        }
        Request::Shutdown => return None,
    })
}

fn ranges_value(ranges: &[(usize, u32, u64, u64)]) -> Value {
    Value::List(
        ranges
            .iter()
            .flat_map(|&(d, t, s, e)| [d as i64, i64::from(t), s as i64, e as i64].map(Value::Int))
            .collect(),
    )
}

fn encode_control(control: Control, thread: u32) -> (Vec<u8>, Done) {
    let i = |n: i64| Value::Int(n);
    let th = i(i64::from(thread));
    let (msg, done): (Value, Done) = match control {
        Control::Ends { topology, reply } => (
            Value::list([Value::from("ends"), th, i(topology as i64)]),
            reply_with(reply, |v| {
                let Value::List(flat) = v else {
                    return Err(bad("ends"));
                };
                flat.chunks_exact(3)
                    .map(|c| Ok((int(c.first())? as usize, int(c.get(1))? as u32, int(c.get(2))? as u64)))
                    .collect()
            }),
        ),
        Control::Process {
            topology,
            id,
            attempt,
            ranges,
            reply,
        } => (
            Value::list([
                Value::from("process"),
                th,
                i(topology as i64),
                i(id as i64),
                i(i64::from(attempt)),
                ranges_value(&ranges),
            ]),
            reply_with(reply, unit),
        ),
        Control::Prepare {
            topology,
            id,
            attempt,
            reply,
        } => (
            Value::list([
                Value::from("prepare"),
                th,
                i(topology as i64),
                i(id as i64),
                i(i64::from(attempt)),
            ]),
            reply_with(reply, unit),
        ),
        Control::Abort { topology, id, reply } => (
            Value::list([Value::from("abort"), th, i(topology as i64), i(id as i64)]),
            reply_with(reply, unit),
        ),
        Control::Commit { topology, id, reply } => (
            Value::list([Value::from("commit"), th, i(topology as i64), i(id as i64)]),
            reply_with(reply, unit),
        ),
        Control::Recover {
            topology,
            decided,
            reply,
        } => (
            Value::list([Value::from("recover"), th, i(topology as i64), i(decided as i64)]),
            reply_with(reply, unit),
        ),
        Control::GateClose { lease_ms, reply } => (
            Value::list([Value::from("gateClose"), th, i(lease_ms as i64)]),
            reply_with(reply, unit),
        ),
        Control::GateOpen { reply } => (Value::list([Value::from("gateOpen"), th]), reply_with(reply, unit)),
    };
    (archived::to_bytes(&msg), done)
}

fn encode_stage(m: StageMsg) -> (Vec<u8>, Done) {
    let mut parts = vec![Value::from("stage")];
    parts.extend(flow_value(m.flow));
    parts.extend([
        Value::Int(m.stage as i64),
        Value::Int(i64::from(m.task)),
        Value::Bytes(m.items),
    ]);
    let reply = m.reply;
    let done: Done = Box::new(move |answer| {
        let completion = match decode_answer(answer).and_then(completion_from) {
            Ok(c) => c,
            Err(e @ Error::Unavailable(_)) => Completion {
                unavailable: Some(e.to_string()),
                ..Completion::default()
            },
            Err(e) => Completion {
                fatal: Some(e.to_string()),
                ..Completion::default()
            },
        };
        let _ = reply.send(completion);
    });
    (archived::to_bytes(&Value::List(parts)), done)
}

/// Carries one lane of a remote thread's links to its worker until `stop`.
fn bridge_lane<M: Send + 'static>(
    rx: flume::Receiver<M>,
    name: String,
    stop: Arc<AtomicBool>,
    forward: impl Fn(M) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => forward(m),
            Err(flume::RecvTimeoutError::Timeout) if !stop.load(Ordering::Acquire) => {}
            Err(_) => return,
        }
    })
}

/// Starts the bridges of remote task thread `thread` (on worker `worker`).
pub(crate) fn bridge(
    inbox: ThreadInbox,
    module: &str,
    thread: u32,
    worker: u32,
    peers: &Arc<dyn Peers>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let spawn_err = |e: std::io::Error| Error::Executor(format!("starting a bridge thread: {e}"));
    let mut handles = Vec::new();
    let name = |lane: u32| format!("{module}-bridge-t{thread}-l{lane}");
    for (lane, rx) in [(LANE_CLIENT, inbox.client), (LANE_INTERNAL, inbox.internal)] {
        let peers = peers.clone();
        handles.push(
            bridge_lane(rx, name(lane), stop.clone(), move |r| {
                if let Some((bytes, done)) = encode_request(r) {
                    peers.send(worker, lane, bytes, done);
                }
            })
            .map_err(spawn_err)?,
        );
    }
    {
        let peers = peers.clone();
        handles.push(
            bridge_lane(inbox.control, name(LANE_CONTROL), stop.clone(), move |c| {
                let (bytes, done) = encode_control(c, thread);
                peers.send(worker, LANE_CONTROL, bytes, done);
            })
            .map_err(spawn_err)?,
        );
    }
    for (level, rx) in inbox.stages.into_iter().enumerate() {
        let peers = peers.clone();
        let lane = LANE_STAGES + level as u32;
        handles.push(
            bridge_lane(rx, name(lane), stop.clone(), move |m| {
                let (bytes, done) = encode_stage(m);
                peers.send(worker, lane, bytes, done);
            })
            .map_err(spawn_err)?,
        );
    }
    Ok(handles)
}

/// The message a worker sends to see that another worker serves the
/// module (on lane 0).
pub fn ping() -> Vec<u8> {
    archived::to_bytes(&Value::list([Value::from("ping")]))
}

/// Whether `answer` is a successful answer.
pub fn answer_ok(answer: Vec<u8>) -> Result<()> {
    decode_answer(Ok(answer)).map(|_| ())
}

/// The answer saying the module does not run here.
pub fn unavailable_answer(why: &str) -> Vec<u8> {
    encode_answer(Err(Error::Unavailable(why.to_string())))
}

/// A future answering one message from another worker.
pub type Answer = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

fn ready(r: Result<Value>) -> Answer {
    let bytes = encode_answer(r);
    Box::pin(async move { bytes })
}

/// Serves a message another worker sent on `lane` to module `rt`.
pub(crate) fn serve(rt: &Arc<ModuleRuntime>, lane: u32, message: &[u8]) -> Answer {
    match decode_serve(rt, lane, message) {
        Ok(answer) => answer,
        Err(e) => ready(Err(e)),
    }
}

fn decode_serve(rt: &Arc<ModuleRuntime>, lane: u32, message: &[u8]) -> Result<Answer> {
    let Value::List(p) = archived::from_bytes(message).map_err(bad)? else {
        return Err(bad("not a list"));
    };
    let kind = p.first().and_then(Value::as_str).unwrap_or_default().to_string();
    let n = |i: usize| int(p.get(i));
    let local_thread_of = |task: i64| -> Result<usize> {
        let thread = rt
            .placement
            .thread_of_task
            .get(usize::try_from(task).map_err(|_| bad("task"))?)
            .copied()
            .ok_or_else(|| bad(format!("task {task} does not exist")))? as usize;
        if !rt.is_local(thread) {
            return Err(Error::Unavailable(format!(
                "task {task} is not on this worker of module {}; the sender's placement is stale",
                rt.def.name
            )));
        }
        Ok(thread)
    };
    let rt2 = rt.clone();
    match (lane, kind.as_str()) {
        (LANE_CLIENT, "ping") => Ok(ready(Ok(Value::Nil))),
        (LANE_CLIENT | LANE_INTERNAL, "append") => {
            let (depot, task) = (index(p.get(1), rt.def.depots.len(), "depot")?, n(2)?);
            let thread = local_thread_of(task)?;
            let ack = ack_from(n(4)?)?;
            let wants = matches!(p.get(5), Some(Value::Bool(true)));
            let (tx, rx) = flume::bounded(1);
            let request = Request::Append {
                depot,
                task: task as u32,
                record: bytes(p.get(3))?,
                ack,
                reply: wants.then(|| tx.into()),
            };
            Ok(Box::pin(async move {
                let sent = rt2.send_to_async(thread, lane, request).await;
                encode_answer(match sent {
                    Err(e) => Err(e),
                    Ok(()) if !wants => Ok(Value::Nil),
                    Ok(()) => rt2.answer(rx).await.map(append_result_value),
                })
            }))
        }
        (LANE_CLIENT, "read") => {
            let task = n(2)?;
            let thread = local_thread_of(task)?;
            let (tx, rx) = flume::bounded(1);
            let request = Request::Read {
                depot: index(p.get(1), rt.def.depots.len(), "depot")?,
                task: task as u32,
                start: n(3)? as u64,
                end: n(4)? as u64,
                bytes_max: n(5)? as usize,
                reply: tx.into(),
            };
            Ok(Box::pin(async move {
                encode_answer(match rt2.send_to_async(thread, lane, request).await {
                    Err(e) => Err(e),
                    Ok(()) => rt2.answer(rx).await.map(|records| {
                        Value::List(
                            records
                                .into_iter()
                                .map(|(o, b)| Value::list([Value::Int(o as i64), Value::Bytes(b)]))
                                .collect(),
                        )
                    }),
                })
            }))
        }
        (LANE_CLIENT, "select") => {
            let task = n(2)?;
            let thread = local_thread_of(task)?;
            let (tx, rx) = flume::bounded(1);
            let request = Request::Select {
                pstate: index(p.get(1), rt.def.pstates.len(), "PState")?,
                task: task as u32,
                path: path_from_value(p.get(3).ok_or_else(|| bad("path"))?)?,
                reply: tx.into(),
            };
            Ok(Box::pin(async move {
                encode_answer(match rt2.send_to_async(thread, lane, request).await {
                    Err(e) => Err(e),
                    Ok(()) => rt2.answer(rx).await.map(Value::List),
                })
            }))
        }
        (LANE_CLIENT, "invoke") => {
            let task = n(2)?;
            let thread = local_thread_of(task)?;
            let (tx, rx) = flume::bounded(1);
            let request = Request::Invoke {
                query: index(p.get(1), rt.def.queries.len(), "query")?,
                task: task as u32,
                args: bytes(p.get(3))?,
                reply: tx.into(),
            };
            Ok(Box::pin(async move {
                encode_answer(match rt2.send_to_async(thread, lane, request).await {
                    Err(e) => Err(e),
                    Ok(()) => rt2.answer(rx).await,
                })
            }))
        }
        (LANE_CONTROL, _) => {
            let thread = n(1)? as usize;
            if thread >= rt.links.len() || !rt.is_local(thread) {
                return Err(Error::Unavailable(format!(
                    "task thread {thread} is not on this worker of module {}",
                    rt.def.name
                )));
            }
            let topology = match kind.as_str() {
                "gateClose" | "gateOpen" => 0,
                _ => index(p.get(2), rt.def.topologies.len(), "topology")?,
            };
            let a = n(3).unwrap_or(0) as u64;
            macro_rules! unit_control {
                ($make:expr) => {{
                    let (tx, rx) = flume::bounded::<Result<()>>(1);
                    #[allow(clippy::redundant_closure_call)]
                    let control = ($make)(tx.into());
                    Ok(Box::pin(async move {
                        encode_answer(match rt2.links[thread].control.send_async(control).await {
                            Err(_) => Err(rt2.closed()),
                            Ok(()) => rt2.answer(rx).await.map(|()| Value::Nil),
                        })
                    }))
                }};
            }
            match kind.as_str() {
                "ends" => {
                    let (tx, rx) = flume::bounded(1);
                    let control = Control::Ends {
                        topology,
                        reply: tx.into(),
                    };
                    Ok(Box::pin(async move {
                        encode_answer(match rt2.links[thread].control.send_async(control).await {
                            Err(_) => Err(rt2.closed()),
                            Ok(()) => rt2.answer(rx).await.map(|ends| {
                                Value::List(
                                    ends.into_iter()
                                        .flat_map(|(d, t, e)| [d as i64, i64::from(t), e as i64].map(Value::Int))
                                        .collect(),
                                )
                            }),
                        })
                    }))
                }
                "process" => {
                    let attempt = n(4)? as u32;
                    let Some(Value::List(flat)) = p.get(5) else {
                        return Err(bad("ranges"));
                    };
                    let ranges = flat
                        .chunks_exact(4)
                        .map(|c| {
                            Ok((
                                index(c.first(), rt.def.depots.len(), "depot")?,
                                int(c.get(1))? as u32,
                                int(c.get(2))? as u64,
                                int(c.get(3))? as u64,
                            ))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    unit_control!(|reply| Control::Process {
                        topology,
                        id: a,
                        attempt,
                        ranges,
                        reply
                    })
                }
                "prepare" => {
                    let attempt = n(4)? as u32;
                    unit_control!(|reply| Control::Prepare {
                        topology,
                        id: a,
                        attempt,
                        reply
                    })
                }
                "abort" => unit_control!(|reply| Control::Abort { topology, id: a, reply }),
                "commit" => unit_control!(|reply| Control::Commit { topology, id: a, reply }),
                "recover" => unit_control!(|reply| Control::Recover {
                    topology,
                    decided: a,
                    reply
                }),
                "gateClose" => {
                    // Bounded: a lease from the network holds reads back
                    // for at most a minute (the coordinator asks for 10 s).
                    let lease_ms = u64::try_from(n(2)?)
                        .ok()
                        .filter(|&ms| ms <= 60_000)
                        .ok_or_else(|| bad("a read-gate lease is 0 to 60,000 ms"))?;
                    unit_control!(|reply| Control::GateClose { lease_ms, reply })
                }
                "gateOpen" => unit_control!(|reply| Control::GateOpen { reply }),
                other => Err(bad(format!("control kind {other:?}"))),
            }
        }
        (lane, "stage") if lane >= LANE_STAGES => {
            let flow = flow_from(p.get(1..5).ok_or_else(|| bad("a stage message is too short"))?, &rt.def)?;
            let stage = n(5)? as usize;
            let task = n(6)?;
            let thread = local_thread_of(task)?;
            let items = bytes(p.get(7))?;
            if stage == 0 || stage > rt.links[thread].stages.len() || (lane - LANE_STAGES) as usize != stage - 1 {
                return Err(bad(format!("stage {stage} on lane {lane}")));
            }
            let (tx, rx) = flume::bounded(1);
            let msg = StageMsg {
                flow,
                stage,
                task: task as u32,
                items,
                reply: tx,
            };
            Ok(Box::pin(async move {
                if rt2.links[thread].stages[stage - 1].send_async(msg).await.is_err() {
                    return encode_answer(Err(rt2.closed()));
                }
                let stopped = rt2.stopped.1.clone();
                let completion = futures_lite::future::or(async move { rx.recv_async().await.ok() }, async move {
                    let _ = stopped.recv_async().await;
                    None
                })
                .await;
                encode_answer(completion.map(completion_value).ok_or_else(|| rt2.closed()))
            }))
        }
        (lane, kind) => Err(bad(format!("{kind:?} on lane {lane}"))),
    }
}
