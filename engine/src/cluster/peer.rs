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
//! Messages are [`PeerMessage`]s of the vocabulary (`crate::wire`),
//! archived once by the bridge and read in place by the receiver; answers
//! are [`wire::Answer`]s. Ids in a message are checked against the module
//! before they index anything.
//! A transport failure is [`Error::Unavailable`]: a stream batch that got
//! one runs again later, a microbatch attempt is retried.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::messages::{Completion, Control, Flow, Reply, Request, StageMsg};
use super::thread::ThreadInbox;
use super::{AckLevel, ModuleRuntime};
use crate::error::{Error, Result};
use crate::pstate::Nav;
use crate::value::archived;
use crate::wire::{self, ArchivedControlOp, ArchivedPeerMessage, ControlOp, Payload, PeerMessage, WireError};

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
/// Lane of replication messages between the replicas of task groups
/// (above every stage lane: a module has far fewer stage levels).
pub const LANE_REPLICATION: u32 = 250;

/// How this process takes part in a module spread over workers.
#[derive(Clone)]
pub struct WorkerPart {
    pub workers: u32,
    /// This worker's index (`0..workers`).
    pub worker: u32,
    /// Reaches the other processes of the module: worker `w` itself when
    /// the module is not replicated, else process `r * workers + w` for
    /// replica `r` of worker `w`'s task groups.
    pub peers: Arc<dyn Peers>,
    /// With a replication factor above 1: which replica of worker
    /// `worker`'s task groups this process runs, and where their leaders are.
    pub replication: Option<ReplicaPart>,
}

/// Where a process of a replicated module finds the leaders of the
/// module's task groups.
pub trait Leaders: Send + Sync + 'static {
    /// The process (peer index) of the leader of task thread `thread`'s
    /// group as last known; `None` when it has none now.
    fn leader(&self, thread: u32) -> Option<u32>;
    /// The last answer was wrong (not the leader, or unreachable): look
    /// again before the next.
    fn stale(&self, thread: u32);
}

impl std::fmt::Debug for ReplicaPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaPart")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// A process's part of a replicated module: one replica of each task
/// group of its worker.
#[derive(Clone)]
pub struct ReplicaPart {
    /// This process runs replica `replica` (`0..factor`).
    pub replica: u32,
    /// The host of this process's replica of task thread `thread`'s group
    /// (its metastore node, registration and peers).
    pub hosts: Arc<dyn Fn(u32) -> Result<Arc<dyn crate::replication::driver::ReplicaHost>> + Send + Sync>,
    pub leaders: Arc<dyn Leaders>,
}

impl std::fmt::Debug for WorkerPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPart")
            .field("workers", &self.workers)
            .field("worker", &self.worker)
            .field("replica", &self.replication.as_ref().map(|r| r.replica))
            .finish_non_exhaustive()
    }
}

fn bad(why: impl std::fmt::Display) -> Error {
    Error::Topology(format!("a message between workers is malformed: {why}"))
}

/// An id from the network naming one of `len` objects (depots, PStates,
/// topologies, queries): out of range is refused here, never used to
/// index.
fn index(id: u32, len: usize, what: &str) -> Result<usize> {
    let i = id as usize;
    if i < len {
        Ok(i)
    } else {
        Err(bad(format!("{what} {id} does not exist")))
    }
}

/// The payload of another worker's answer (its error as this worker sees
/// it; a transport failure is `Unavailable`).
fn peer_payload(answer: Result<Vec<u8>>) -> Result<Payload> {
    wire::decode_answer(&answer?)
        .map_err(bad)?
        .map_err(WireError::into_peer_error)
}

fn unexpected<T>(p: &Payload) -> Result<T> {
    Err(bad(format!(
        "the answer carries {:?}, not what was asked",
        std::mem::discriminant(p)
    )))
}

fn reply_with<T: Send + 'static>(reply: Reply<T>, from: impl FnOnce(Payload) -> Result<T> + Send + 'static) -> Done {
    Box::new(move |answer| {
        let _ = reply.send(peer_payload(answer).and_then(from));
    })
}

fn unit(p: Payload) -> Result<()> {
    match p {
        Payload::Done => Ok(()),
        p => unexpected(&p),
    }
}

fn id32(i: usize) -> u32 {
    u32::try_from(i).expect("object and thread numbers fit in 32 bits")
}

fn encode_request(request: Request) -> Option<(Vec<u8>, Done)> {
    Some(match request {
        Request::Append {
            depot,
            task,
            record,
            ack,
            reply,
        } => {
            let msg = PeerMessage::Append {
                depot: id32(depot),
                task,
                record,
                ack,
                wants_reply: reply.is_some(),
            };
            let done: Done = match reply {
                Some(reply) => reply_with(reply, |p| match p {
                    Payload::Appended(r) => Ok(r),
                    p => unexpected(&p),
                }),
                None => Box::new(|_| {}),
            };
            (archived::encode(&msg), done)
        }
        Request::Read {
            depot,
            task,
            start,
            end,
            bytes_max,
            reply,
        } => (
            archived::encode(&PeerMessage::Read {
                depot: id32(depot),
                task,
                start,
                end,
                bytes_max: bytes_max as u64,
            }),
            reply_with(reply, |p| match p {
                Payload::Records(r) => Ok(r),
                p => unexpected(&p),
            }),
        ),
        Request::Select {
            pstate,
            task,
            path,
            reply,
        } => (
            archived::encode(&PeerMessage::Select {
                pstate: id32(pstate),
                task,
                path: wire::wire_path(&path),
            }),
            reply_with(reply, |p| match p {
                Payload::Selected(s) => Ok(s),
                p => unexpected(&p),
            }),
        ),
        Request::Invoke {
            query,
            task,
            args,
            reply,
        } => (
            archived::encode(&PeerMessage::Invoke {
                query: id32(query),
                task,
                args,
            }),
            reply_with(reply, |p| match p {
                Payload::Value(v) => Ok(v),
                p => unexpected(&p),
            }),
        ),
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
        // Only local threads adopt connections (`InProcessCluster::adopt`).
        Request::Adopt(_) | Request::Shutdown => return None,
    })
}

/// How many depots and tasks the module has: the bounds of ids in
/// another worker's answers.
#[derive(Clone, Copy)]
pub(crate) struct Bounds {
    pub depots: usize,
    pub tasks: u32,
}

fn encode_control(control: Control, thread: u32, bounds: Bounds) -> (Vec<u8>, Done) {
    let (op, done) = match control {
        Control::Ends { topology, reply } => (
            ControlOp::Ends {
                topology: id32(topology),
            },
            reply_with(reply, move |p| match p {
                // Ids from the network index the coordinator's tables:
                // checked here.
                Payload::Ends(ends) => ends
                    .into_iter()
                    .map(|(d, t, e)| {
                        if (d as usize) < bounds.depots && t < bounds.tasks {
                            Ok((d as usize, t, e))
                        } else {
                            Err(bad(format!(
                                "the end offsets name depot {d}, task {t}, which do not exist"
                            )))
                        }
                    })
                    .collect(),
                p => unexpected(&p),
            }),
        ),
        Control::Process {
            topology,
            id,
            attempt,
            ranges,
            reply,
        } => (
            ControlOp::Process {
                topology: id32(topology),
                id,
                attempt,
                ranges: ranges.into_iter().map(|(d, t, s, e)| (id32(d), t, s, e)).collect(),
            },
            reply_with(reply, unit),
        ),
        Control::Prepare {
            topology,
            id,
            attempt,
            reply,
        } => (
            ControlOp::Prepare {
                topology: id32(topology),
                id,
                attempt,
            },
            reply_with(reply, unit),
        ),
        Control::Abort { topology, id, reply } => (
            ControlOp::Abort {
                topology: id32(topology),
                id,
            },
            reply_with(reply, unit),
        ),
        Control::Commit { topology, id, reply } => (
            ControlOp::Commit {
                topology: id32(topology),
                id,
            },
            reply_with(reply, unit),
        ),
        Control::Recover {
            topology,
            decided,
            reply,
        } => (
            ControlOp::Recover {
                topology: id32(topology),
                decided,
            },
            reply_with(reply, unit),
        ),
        Control::GateClose { lease_ms, reply } => (ControlOp::GateClose { lease_ms }, reply_with(reply, unit)),
        Control::GateOpen { reply } => (ControlOp::GateOpen, reply_with(reply, unit)),
    };
    (archived::encode(&PeerMessage::Control { thread, op }), done)
}

fn encode_stage(m: StageMsg) -> (Vec<u8>, Done) {
    let msg = PeerMessage::Stage {
        flow: m.flow,
        stage: id32(m.stage),
        task: m.task,
        items: m.items,
    };
    let reply = m.reply;
    let done: Done = Box::new(move |answer| {
        let completion = match peer_payload(answer) {
            Ok(Payload::Completion(c)) => c,
            Ok(p) => Completion {
                fatal: unexpected::<()>(&p).err().map(|e| e.to_string()),
                ..Completion::default()
            },
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
    (archived::encode(&msg), done)
}

/// Carries one lane of a remote thread's links to its worker until `stop`;
/// while `paused` says so it takes nothing (the local replica serves the
/// lane's channel itself).
fn bridge_lane<M: Send + 'static>(
    rx: flume::Receiver<M>,
    name: String,
    stop: Arc<AtomicBool>,
    paused: Option<Arc<AtomicBool>>,
    forward: impl Fn(M) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || loop {
        if paused.as_ref().is_some_and(|p| p.load(Ordering::Acquire)) {
            if stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => forward(m),
            Err(flume::RecvTimeoutError::Timeout) if !stop.load(Ordering::Acquire) => {}
            Err(_) => return,
        }
    })
}

/// Where a bridge sends a thread's messages: to its worker, or (a
/// replicated module) to the process of its group's leader, found again
/// and sent again while that process answers "not the leader" (nothing
/// was taken there) or the group has no leader, for up to
/// [`ROUTE_PATIENCE`].
#[derive(Clone)]
pub(crate) enum Route {
    Worker(u32),
    Leader(Arc<Router>),
}

/// How long a message to a replicated task group waits for its group to
/// have a leader that takes it (an election after a lost leader takes
/// about the metastore's session timeout).
pub const ROUTE_PATIENCE: Duration = Duration::from_secs(15);

/// Routes messages to the leaders of a replicated module's task groups.
pub(crate) struct Router {
    module: String,
    peers: Arc<dyn Peers>,
    leaders: Arc<dyn Leaders>,
    retries: flume::Sender<Retry>,
}

struct Retry {
    at: std::time::Instant,
    deadline: std::time::Instant,
    thread: u32,
    lane: u32,
    bytes: Vec<u8>,
    done: Done,
}

/// Messages waiting to be sent again, at most this many (beyond it they
/// are answered as unavailable).
const RETRIES_MAX: usize = 4096;

impl Router {
    /// A router with its retry thread (which ends once the router is gone).
    pub(crate) fn start(module: &str, peers: Arc<dyn Peers>, leaders: Arc<dyn Leaders>) -> Result<Arc<Router>> {
        let (retries, due) = flume::bounded::<Retry>(RETRIES_MAX);
        let router = Arc::new(Router {
            module: module.to_string(),
            peers,
            leaders,
            retries,
        });
        let weak = Arc::downgrade(&router);
        std::thread::Builder::new()
            .name(format!("{module}-route-retry"))
            .spawn(move || {
                // In order of arrival; each waits only for its own time, so
                // a later one waits at most as long as the one before it.
                while let Ok(r) = due.recv() {
                    let wait = r.at.saturating_duration_since(std::time::Instant::now());
                    std::thread::sleep(wait);
                    match weak.upgrade() {
                        Some(router) => router.send(r.thread, r.lane, r.bytes, r.done, r.deadline),
                        None => (r.done)(Err(Error::Closed("the module stopped on this worker".into()))),
                    }
                }
            })
            .map_err(|e| Error::Executor(format!("starting the route retry thread: {e}")))?;
        Ok(router)
    }

    fn later(&self, thread: u32, lane: u32, bytes: Vec<u8>, done: Done, deadline: std::time::Instant, why: Error) {
        let now = std::time::Instant::now();
        if now >= deadline {
            return done(Err(why));
        }
        let retry = Retry {
            at: now + Duration::from_millis(50),
            deadline,
            thread,
            lane,
            bytes,
            done,
        };
        if let Err(flume::TrySendError::Full(r) | flume::TrySendError::Disconnected(r)) = self.retries.try_send(retry) {
            (r.done)(Err(why));
        }
    }

    fn send(self: &Arc<Self>, thread: u32, lane: u32, bytes: Vec<u8>, done: Done, deadline: std::time::Instant) {
        let Some(process) = self.leaders.leader(thread) else {
            self.leaders.stale(thread);
            let why = Error::Unavailable(format!(
                "task group {thread} of module {} has no leader now (an election is due)",
                self.module
            ));
            return self.later(thread, lane, bytes, done, deadline, why);
        };
        let again = bytes.clone();
        let router = self.clone();
        self.peers.send(
            process,
            lane,
            bytes,
            Box::new(move |answer| match answer {
                Ok(b) if is_not_leader(&b) => {
                    router.leaders.stale(thread);
                    let why = peer_payload(Ok(b)).err().unwrap_or_else(|| {
                        Error::NotLeader(format!("process {process} does not lead task group {thread}"))
                    });
                    router.later(thread, lane, again, done, deadline, why);
                }
                Ok(b) => done(Ok(b)),
                Err(e) => {
                    router.leaders.stale(thread);
                    done(Err(e))
                }
            }),
        );
    }
}

/// Whether an answer says "not the leader".
fn is_not_leader(answer: &[u8]) -> bool {
    matches!(wire::decode_answer(answer), Ok(Err(e)) if e.code() == crate::error::ErrorCode::NotLeader)
}

impl Route {
    fn send(&self, peers: &Arc<dyn Peers>, thread: u32, lane: u32, bytes: Vec<u8>, done: Done) {
        match self {
            Route::Worker(w) => peers.send(*w, lane, bytes, done),
            Route::Leader(router) => router.send(thread, lane, bytes, done, std::time::Instant::now() + ROUTE_PATIENCE),
        }
    }
}

/// Starts the bridges of task thread `thread`: to its worker, or to its
/// group's leader. `paused`: while set, the bridges take nothing (this
/// process's replica of the thread serves its channels).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bridge(
    inbox: ThreadInbox,
    module: &str,
    bounds: Bounds,
    thread: u32,
    route: Route,
    paused: Option<Arc<AtomicBool>>,
    peers: &Arc<dyn Peers>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let spawn_err = |e: std::io::Error| Error::Executor(format!("starting a bridge thread: {e}"));
    let mut handles = Vec::new();
    let name = |lane: u32| format!("{module}-bridge-t{thread}-l{lane}");
    for (lane, rx) in [(LANE_CLIENT, inbox.client), (LANE_INTERNAL, inbox.internal)] {
        let (peers, route) = (peers.clone(), route.clone());
        handles.push(
            bridge_lane(rx, name(lane), stop.clone(), paused.clone(), move |r| {
                if let Some((bytes, done)) = encode_request(r) {
                    route.send(&peers, thread, lane, bytes, done);
                }
            })
            .map_err(spawn_err)?,
        );
    }
    {
        let (peers, route) = (peers.clone(), route.clone());
        handles.push(
            bridge_lane(
                inbox.control,
                name(LANE_CONTROL),
                stop.clone(),
                paused.clone(),
                move |c| {
                    let (bytes, done) = encode_control(c, thread, bounds);
                    route.send(&peers, thread, LANE_CONTROL, bytes, done);
                },
            )
            .map_err(spawn_err)?,
        );
    }
    for (level, rx) in inbox.stages.into_iter().enumerate() {
        let (peers, route) = (peers.clone(), route.clone());
        let lane = LANE_STAGES + level as u32;
        handles.push(
            bridge_lane(rx, name(lane), stop.clone(), paused.clone(), move |m| {
                let (bytes, done) = encode_stage(m);
                route.send(&peers, thread, lane, bytes, done);
            })
            .map_err(spawn_err)?,
        );
    }
    Ok(handles)
}

/// Sends replication messages of a process's replicas to the processes
/// of other replicas, from a thread of its own (a replica's driver never
/// waits for the network; a full queue drops the message, which the
/// protocol sends again).
#[derive(Clone)]
pub struct ReplicaSender {
    queue: flume::Sender<(u32, Vec<u8>)>,
}

impl std::fmt::Debug for ReplicaSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSender").finish_non_exhaustive()
    }
}

/// Replication messages queued for sending in a process, at most.
const REPLICA_QUEUE_MAX: usize = 4096;

impl ReplicaSender {
    /// Starts the sending thread (it ends when the last sender is dropped).
    pub fn start(module: &str, peers: Arc<dyn Peers>) -> Result<ReplicaSender> {
        let (queue, rx) = flume::bounded::<(u32, Vec<u8>)>(REPLICA_QUEUE_MAX);
        std::thread::Builder::new()
            .name(format!("{module}-replica-send"))
            .spawn(move || {
                while let Ok((process, bytes)) = rx.recv() {
                    peers.send(process, LANE_REPLICATION, bytes, Box::new(|_| {}));
                }
            })
            .map_err(|e| Error::Executor(format!("starting the replica sender: {e}")))?;
        Ok(ReplicaSender { queue })
    }

    /// Queues `message` from replica `from` to replica `to` of task thread
    /// `thread`'s group, which runs in process `process`.
    pub fn send(&self, process: u32, thread: u32, from: u32, to: u32, message: crate::replication::Message) {
        let bytes = archived::encode(&PeerMessage::Replica {
            thread,
            from,
            to,
            message,
        });
        let _ = self.queue.try_send((process, bytes));
    }
}

/// The message a worker sends to see that another worker serves the
/// module (on lane 0).
pub fn ping() -> Vec<u8> {
    archived::encode(&PeerMessage::Ping)
}

/// Whether `answer` is a successful answer.
pub fn answer_ok(answer: Vec<u8>) -> Result<()> {
    peer_payload(Ok(answer)).map(|_| ())
}

/// The answer saying the module does not run here.
pub fn unavailable_answer(why: &str) -> Vec<u8> {
    wire::encode_answer(Err(Error::Unavailable(why.to_string())))
}

/// A future answering one message from another worker.
pub type Answer = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

fn ready(r: Result<Payload>) -> Answer {
    let bytes = wire::encode_answer(r);
    Box::pin(async move { bytes })
}

/// Serves a message another worker sent on `lane` to module `rt`.
pub(crate) fn serve(rt: &Arc<ModuleRuntime>, lane: u32, message: &[u8]) -> Answer {
    match decode_serve(rt, lane, message) {
        Ok(answer) => answer,
        Err(e) => ready(Err(e)),
    }
}

/// Sends `request` to local thread `thread` on `lane`, and answers with
/// what its reply carries.
fn forward<T: Send + 'static>(
    rt: &Arc<ModuleRuntime>,
    thread: usize,
    lane: u32,
    make: impl FnOnce(Reply<T>) -> Request,
    into: impl FnOnce(T) -> Payload + Send + 'static,
) -> Answer {
    let (tx, rx) = flume::bounded(1);
    let request = make(tx.into());
    let rt = rt.clone();
    Box::pin(async move {
        wire::encode_answer(match rt.send_to_async(thread, lane, request).await {
            Err(e) => Err(e),
            Ok(()) => rt.answer(rx).await.map(into),
        })
    })
}

fn owned<T>(a: &T::Archived) -> Result<T>
where
    T: rkyv::Archive,
    T::Archived: rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rkyv::rancor::Error>>,
{
    archived::to_owned::<T>(a).map_err(bad)
}

fn decode_serve(rt: &Arc<ModuleRuntime>, lane: u32, message: &[u8]) -> Result<Answer> {
    let msg = archived::access_as::<ArchivedPeerMessage>(message).map_err(bad)?;
    let local_thread_of = |task: u32| -> Result<usize> {
        let thread = rt
            .placement
            .thread_of_task
            .get(task as usize)
            .copied()
            .ok_or_else(|| bad(format!("task {task} does not exist")))? as usize;
        if !rt.is_local(thread) {
            return Err(Error::Unavailable(format!(
                "task {task} is not on this worker of module {}; the sender's placement is stale",
                rt.def.name
            )));
        }
        rt.takes(thread)?;
        Ok(thread)
    };
    let def = &rt.def;
    match (lane, msg) {
        (LANE_CLIENT, ArchivedPeerMessage::Ping) => Ok(ready(Ok(Payload::Done))),
        (
            LANE_CLIENT | LANE_INTERNAL,
            ArchivedPeerMessage::Append {
                depot,
                task,
                record,
                ack,
                wants_reply,
            },
        ) => {
            let (depot, task) = (index(depot.to_native(), def.depots.len(), "depot")?, task.to_native());
            let thread = local_thread_of(task)?;
            let ack = owned::<AckLevel>(ack)?;
            let record = record.as_slice().to_vec();
            if !*wants_reply {
                let request = Request::Append {
                    depot,
                    task,
                    record,
                    ack,
                    reply: None,
                };
                let rt = rt.clone();
                return Ok(Box::pin(async move {
                    wire::encode_answer(rt.send_to_async(thread, lane, request).await.map(|()| Payload::Done))
                }));
            }
            Ok(forward(
                rt,
                thread,
                lane,
                |reply| Request::Append {
                    depot,
                    task,
                    record,
                    ack,
                    reply: Some(reply),
                },
                Payload::Appended,
            ))
        }
        (
            LANE_CLIENT,
            ArchivedPeerMessage::Read {
                depot,
                task,
                start,
                end,
                bytes_max,
            },
        ) => {
            let depot = index(depot.to_native(), def.depots.len(), "depot")?;
            let task = task.to_native();
            let (start, end) = (start.to_native(), end.to_native());
            let bytes_max = usize::try_from(bytes_max.to_native()).unwrap_or(usize::MAX);
            Ok(forward(
                rt,
                local_thread_of(task)?,
                lane,
                |reply| Request::Read {
                    depot,
                    task,
                    start,
                    end,
                    bytes_max,
                    reply,
                },
                Payload::Records,
            ))
        }
        (LANE_CLIENT, ArchivedPeerMessage::Select { pstate, task, path }) => {
            let pstate = index(pstate.to_native(), def.pstates.len(), "PState")?;
            let task = task.to_native();
            let path = owned::<Vec<Nav>>(path)?;
            Ok(forward(
                rt,
                local_thread_of(task)?,
                lane,
                |reply| Request::Select {
                    pstate,
                    task,
                    path,
                    reply,
                },
                Payload::Selected,
            ))
        }
        (LANE_CLIENT, ArchivedPeerMessage::Invoke { query, task, args }) => {
            let query = index(query.to_native(), def.queries.len(), "query")?;
            let task = task.to_native();
            let args = args.as_slice().to_vec();
            Ok(forward(
                rt,
                local_thread_of(task)?,
                lane,
                |reply| Request::Invoke {
                    query,
                    task,
                    args,
                    reply,
                },
                Payload::Value,
            ))
        }
        (LANE_CONTROL, ArchivedPeerMessage::Control { thread, op }) => {
            let thread = thread.to_native() as usize;
            if thread >= rt.links.len() || !rt.is_local(thread) {
                return Err(Error::Unavailable(format!(
                    "task thread {thread} is not on this worker of module {}",
                    def.name
                )));
            }
            rt.takes(thread)?;
            let topology = |t: &rkyv::Archived<u32>| index(t.to_native(), def.topologies.len(), "topology");
            let control = |make: Box<dyn FnOnce(Reply<()>) -> Control>| -> Answer {
                let (tx, rx) = flume::bounded::<Result<()>>(1);
                let control = make(tx.into());
                let rt = rt.clone();
                Box::pin(async move {
                    wire::encode_answer(match rt.links[thread].control.send_async(control).await {
                        Err(_) => Err(rt.closed()),
                        Ok(()) => rt.answer(rx).await.map(|()| Payload::Done),
                    })
                })
            };
            Ok(match op {
                ArchivedControlOp::Ends { topology: t } => {
                    let topology = topology(t)?;
                    let (tx, rx) = flume::bounded(1);
                    let control = Control::Ends {
                        topology,
                        reply: tx.into(),
                    };
                    let rt = rt.clone();
                    Box::pin(async move {
                        wire::encode_answer(match rt.links[thread].control.send_async(control).await {
                            Err(_) => Err(rt.closed()),
                            Ok(()) => rt
                                .answer(rx)
                                .await
                                .map(|ends| Payload::Ends(ends.into_iter().map(|(d, t, e)| (id32(d), t, e)).collect())),
                        })
                    })
                }
                ArchivedControlOp::Process {
                    topology: t,
                    id,
                    attempt,
                    ranges,
                } => {
                    let (topology, id, attempt) = (topology(t)?, id.to_native(), attempt.to_native());
                    let ranges = ranges
                        .iter()
                        .map(|r| {
                            Ok((
                                index(r.0.to_native(), def.depots.len(), "depot")?,
                                r.1.to_native(),
                                r.2.to_native(),
                                r.3.to_native(),
                            ))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    control(Box::new(move |reply| Control::Process {
                        topology,
                        id,
                        attempt,
                        ranges,
                        reply,
                    }))
                }
                ArchivedControlOp::Prepare {
                    topology: t,
                    id,
                    attempt,
                } => {
                    let (topology, id, attempt) = (topology(t)?, id.to_native(), attempt.to_native());
                    control(Box::new(move |reply| Control::Prepare {
                        topology,
                        id,
                        attempt,
                        reply,
                    }))
                }
                ArchivedControlOp::Abort { topology: t, id } => {
                    let (topology, id) = (topology(t)?, id.to_native());
                    control(Box::new(move |reply| Control::Abort { topology, id, reply }))
                }
                ArchivedControlOp::Commit { topology: t, id } => {
                    let (topology, id) = (topology(t)?, id.to_native());
                    control(Box::new(move |reply| Control::Commit { topology, id, reply }))
                }
                ArchivedControlOp::Recover { topology: t, decided } => {
                    let (topology, decided) = (topology(t)?, decided.to_native());
                    control(Box::new(move |reply| Control::Recover {
                        topology,
                        decided,
                        reply,
                    }))
                }
                ArchivedControlOp::GateClose { lease_ms } => {
                    // Bounded: a lease from the network holds reads back
                    // for at most a minute (the coordinator asks for 10 s).
                    let lease_ms = Some(lease_ms.to_native())
                        .filter(|&ms| ms <= 60_000)
                        .ok_or_else(|| bad("a read-gate lease is 0 to 60,000 ms"))?;
                    control(Box::new(move |reply| Control::GateClose { lease_ms, reply }))
                }
                ArchivedControlOp::GateOpen => control(Box::new(|reply| Control::GateOpen { reply })),
            })
        }
        (
            lane,
            ArchivedPeerMessage::Stage {
                flow,
                stage,
                task,
                items,
            },
        ) if lane >= LANE_STAGES => {
            let flow = match owned::<Flow>(flow)? {
                Flow::Stream(t) => Flow::Stream(index(id32(t), def.topologies.len(), "topology")?),
                Flow::Microbatch { topology, id, attempt } => Flow::Microbatch {
                    topology: index(id32(topology), def.topologies.len(), "topology")?,
                    id,
                    attempt,
                },
                Flow::Query(q) => Flow::Query(index(id32(q), def.queries.len(), "query")?),
            };
            let (stage, task) = (stage.to_native() as usize, task.to_native());
            let thread = local_thread_of(task)?;
            if stage == 0 || stage > rt.links[thread].stages.len() || (lane - LANE_STAGES) as usize != stage - 1 {
                return Err(bad(format!("stage {stage} on lane {lane}")));
            }
            let (tx, rx) = flume::bounded(1);
            let msg = StageMsg {
                flow,
                stage,
                task,
                items: items.as_slice().to_vec(),
                reply: tx,
            };
            let rt = rt.clone();
            Ok(Box::pin(async move {
                if rt.links[thread].stages[stage - 1].send_async(msg).await.is_err() {
                    return wire::encode_answer(Err(rt.closed()));
                }
                let stopped = rt.stopped.wait();
                let completion = futures_lite::future::or(async move { rx.recv_async().await.ok() }, async move {
                    stopped.await;
                    None
                })
                .await;
                wire::encode_answer(completion.map(Payload::Completion).ok_or_else(|| rt.closed()))
            }))
        }
        (
            LANE_REPLICATION,
            ArchivedPeerMessage::Replica {
                thread,
                from,
                to,
                message,
            },
        ) => {
            let thread = thread.to_native() as usize;
            let (from, to) = (from.to_native(), to.to_native());
            let Some(replicas) = &rt.replica else {
                return Err(bad("the module is not replicated here"));
            };
            if thread >= rt.links.len() || !rt.is_local(thread) || to != replicas.replica {
                return Err(Error::Unavailable(format!(
                    "replica {to} of task thread {thread} of module {} is not in this process",
                    def.name
                )));
            }
            if from >= replicas.factor || from == to {
                return Err(bad(format!("a replication message from replica {from}")));
            }
            let message = owned::<crate::replication::Message>(message)?;
            // Taken or dropped at once (a full or missing inbox drops it:
            // the protocol sends again); the answer only says it arrived.
            replicas.deliver(thread, crate::replication::Input::Message { from, message });
            Ok(ready(Ok(Payload::Done)))
        }
        (lane, _) => Err(bad(format!("a message of this kind does not travel on lane {lane}"))),
    }
}
