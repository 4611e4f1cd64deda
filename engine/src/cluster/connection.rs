//! Client connections served by a task thread. A worker's server checks a
//! new client (the handshake, on the server's own thread), then hands the
//! socket to one task thread of the module ([`InProcessCluster::adopt`]):
//! the client's choice when it named one of this worker's threads (a
//! client that knows the placement opens one connection per thread and
//! sends each request on its task's), otherwise the next one round-robin.
//! From then on that thread reads the requests, starts each one (a task of
//! its own is served right there, another thread's through the thread
//! links) and writes the answers, several per write: a request whose task
//! lives on the connection's thread crosses no other thread in the worker.
//! A select of its own task is read inline; an acknowledged append of its
//! own task (a random depot's appends take one of the thread's tasks)
//! goes to the log without the client channel.
//!
//! Bounds: a frame above [`ConnectionLimits::frame_bytes_max`] ends the
//! connection; at most [`ConnectionLimits::in_flight_max`] requests are
//! unanswered, then the socket is not read until an answer is written; a
//! connection owed nothing that sends nothing for the idle timeout ends,
//! as does one that takes no answers for as long.
//!
//! [`InProcessCluster::adopt`]: super::InProcessCluster::adopt

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;

use std::sync::atomic::Ordering;

use super::clients::PStateClient;
use super::gate::GateTicket;
use super::messages::{AppendResult, Reply, Request};
use super::serve::handle_request;
use super::thread::TaskThread;
use super::AckLevel;
use crate::module::Partitioner;
use crate::value::archived;
use crate::wire::frame::{self, KIND_ERROR, KIND_REQUEST, KIND_RESPONSE};
use crate::wire::{ArchivedClientRequest, Payload};

/// Called once with the answer to a request: the answer's bytes, or why
/// there is none (sent to the client as an error frame).
pub type Respond = Box<dyn FnOnce(std::result::Result<Vec<u8>, String>) + Send>;

/// Work a handler leaves for later: run on the connection's thread.
pub type Later = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves one request: called on the connection's task thread with the
/// request's payload; it must not block. It either arranges for the
/// `Respond` to be called (returning `None`), or returns a future that
/// does.
pub type Handler = Arc<dyn Fn(Vec<u8>, Respond) -> Option<Later> + Send + Sync>;

/// The bounds of one adopted connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub frame_bytes_max: usize,
    pub in_flight_max: usize,
    pub idle_timeout: Duration,
}

/// A client connection handed to a task thread, after its handshake.
pub struct Adopted {
    pub stream: std::net::TcpStream,
    pub handler: Handler,
    pub limits: ConnectionLimits,
    /// Held until the connection ends (a server counts its open
    /// connections by it).
    pub guard: Box<dyn std::any::Any + Send>,
}

impl std::fmt::Debug for Adopted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adopted")
            .field("stream", &self.stream)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Bytes of answers one write takes at most.
const WRITE_BATCH_BYTES: usize = 1 << 20;
/// The read buffer (a larger frame grows it for as long as it is read).
const READ_BUFFER_BYTES: usize = 64 << 10;

type Socket = Rc<RefCell<TcpStream>>;

/// What the idle check of a connection looks at.
#[derive(Default)]
struct Activity {
    /// When the client last sent something, or an answer was written.
    last: Cell<Option<Instant>>,
    /// Since when the writer waits for the client to take an answer.
    writing_since: Cell<Option<Instant>>,
}

impl Activity {
    fn touch(&self) {
        self.last.set(Some(Instant::now()));
    }
}

async fn read_some(socket: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    // The borrow lasts one poll: the reader and the writer of a connection
    // poll the socket in turn, never at once (one thread).
    poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_read(cx, buf)).await
}

async fn write_all(socket: &Socket, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Ends both directions of the connection now (pending reads and writes
/// return).
fn shut(socket: &Socket) {
    // SAFETY: shutdown(2) on a descriptor this connection owns.
    unsafe {
        libc::shutdown(socket.borrow().as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// Serves `conn` until the client closes it, breaks a bound, or the
/// server shuts it.
pub(crate) async fn serve(th: Rc<TaskThread>, conn: Adopted) {
    let Adopted {
        stream,
        handler,
        limits,
        guard,
    } = conn;
    let _ = stream.set_nonblocking(true);
    // SAFETY: the descriptor is moved out of `stream`; `socket` owns it
    // from here on and closes it.
    let socket = unsafe { TcpStream::from_raw_fd(stream.into_raw_fd()) };
    // No socket timeouts: glommio arms and cancels an io_uring timer
    // around every read and write that waits, which cost more than the
    // request. A check every few seconds looks at the activity instead.
    let socket: Socket = Rc::new(RefCell::new(socket));
    let in_flight_max = limits.in_flight_max.max(1);
    let (answers_tx, answers_rx) = flume::bounded::<Vec<u8>>(in_flight_max);
    let room = Rc::new(Semaphore::new(in_flight_max as u64));
    let activity = Rc::new(Activity::default());
    activity.touch();
    let writer = glommio::spawn_local(write_answers(
        socket.clone(),
        answers_rx,
        room.clone(),
        activity.clone(),
    ));
    let idle = glommio::spawn_local(idle_check(
        socket.clone(),
        activity.clone(),
        room.clone(),
        (limits.idle_timeout, in_flight_max as u64),
    ))
    .detach();
    read_requests(&th, &socket, (&handler, &limits), answers_tx, (&room, &activity)).await;
    // No more requests: the answers still owed are written (the writer
    // ends once the last of them is, or the client stops taking them).
    writer.await;
    idle.cancel();
    drop(guard);
}

/// Ends the connection once the client sent nothing for `idle` while
/// nothing was owed to it, or took no answer for `idle`.
async fn idle_check(
    socket: Socket,
    activity: Rc<Activity>,
    room: Rc<Semaphore>,
    (idle, in_flight_max): (Duration, u64),
) {
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    loop {
        glommio::timer::sleep(tick).await;
        let quiet = activity.last.get().is_some_and(|at| at.elapsed() >= idle);
        let owed = room.available() < in_flight_max;
        let stuck = activity.writing_since.get().is_some_and(|at| at.elapsed() >= idle);
        if (quiet && !owed) || stuck {
            room.close();
            shut(&socket);
            return;
        }
    }
}

async fn read_requests(
    th: &Rc<TaskThread>,
    socket: &Socket,
    (handler, limits): (&Handler, &ConnectionLimits),
    answers: flume::Sender<Vec<u8>>,
    (room, activity): (&Rc<Semaphore>, &Activity),
) {
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let (mut start, mut end) = (0, 0);
    loop {
        // Every whole frame read so far.
        while end - start >= 4 {
            let head: [u8; 4] = buf[start..start + 4].try_into().expect("4 bytes");
            let Some(len) = frame::body_len(head, limits.frame_bytes_max) else {
                tracing::debug!(
                    len = u32::from_le_bytes(head),
                    "a client frame is out of bounds; connection closed"
                );
                return;
            };
            if end - start < 4 + len {
                if 4 + len > buf.len() - start {
                    // Room for the whole frame at the start of the buffer.
                    buf.copy_within(start..end, 0);
                    (start, end) = (0, end - start);
                    if 4 + len > buf.len() {
                        buf.resize(4 + len, 0);
                    }
                }
                break;
            }
            let body = &buf[start + 4..start + 4 + len];
            let (id, kind) = frame::id_kind(body);
            if kind != KIND_REQUEST {
                return;
            }
            // A unit of room per request unanswered; the writer gives it
            // back once the answer is written.
            if room.acquire(1).await.is_err() {
                return;
            }
            // Requests of this thread's own tasks are served right here.
            match archived::access_as::<ArchivedClientRequest>(&body[9..]) {
                Ok(req @ ArchivedClientRequest::Select { .. }) => {
                    if let Some(answer) = select_here(th, req) {
                        start += 4 + len;
                        let _ = answers.try_send(frame::make(id, KIND_RESPONSE, &answer));
                        continue;
                    }
                }
                Ok(req @ ArchivedClientRequest::Append { .. }) => {
                    if let Some((depot, task, record, ack)) = append_here(th, req) {
                        start += 4 + len;
                        let answers = answers.clone();
                        let reply = Some(Reply::callback(move |r: crate::Result<AppendResult>| {
                            let answer = crate::wire::encode_client_answer(r.map(Payload::Appended));
                            let _ = answers.try_send(frame::make(id, KIND_RESPONSE, &answer));
                        }));
                        let request = Request::Append {
                            depot,
                            task,
                            record,
                            ack,
                            reply,
                        };
                        let th = th.clone();
                        glommio::spawn_local(async move { handle_request(&th, request).await }).detach();
                        continue;
                    }
                }
                _ => {}
            }
            let payload = body[9..].to_vec();
            start += 4 + len;
            let answers = answers.clone();
            let respond: Respond = Box::new(move |answer| {
                let f = match answer {
                    Ok(bytes) => frame::make(id, KIND_RESPONSE, &bytes),
                    Err(why) => frame::make(id, KIND_ERROR, why.as_bytes()),
                };
                // Never full: the queue holds `in_flight_max` answers and
                // at most that many are owed.
                let _ = answers.try_send(f);
            });
            if let Some(later) = handler(payload, respond) {
                glommio::spawn_local(later).detach();
            }
        }
        if start == end {
            (start, end) = (0, 0);
            if buf.len() > READ_BUFFER_BYTES {
                buf = vec![0u8; READ_BUFFER_BYTES];
            }
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        match read_some(socket, &mut buf[end..]).await {
            Ok(0) => return,
            Ok(n) => {
                end += n;
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

async fn write_answers(socket: Socket, answers: flume::Receiver<Vec<u8>>, room: Rc<Semaphore>, activity: Rc<Activity>) {
    let mut out = Vec::with_capacity(READ_BUFFER_BYTES);
    while let Ok(first) = answers.recv_async().await {
        out.clear();
        out.extend_from_slice(&first);
        let mut frames = 1;
        // Answers to requests that arrived together are made one after
        // another on this thread: let them be made, so they share a write.
        let mut yielded = false;
        while out.len() < WRITE_BATCH_BYTES {
            match answers.try_recv() {
                Ok(f) => {
                    out.extend_from_slice(&f);
                    frames += 1;
                }
                Err(_) if !yielded => {
                    yielded = true;
                    futures_lite::future::yield_now().await;
                }
                Err(_) => break,
            }
        }
        activity.writing_since.set(Some(Instant::now()));
        let written = write_all(&socket, &out).await;
        activity.writing_since.set(None);
        activity.touch();
        if written.is_err() {
            // The client takes no answers: the connection ends, and the
            // reader stops waiting for room.
            room.close();
            shut(&socket);
            return;
        }
        room.signal(frames);
    }
}

/// The answer to `request` when it is a select of a task of this thread
/// that can be read now (the read gate open): read right here, with no
/// other task or channel in between. `None`: the handler serves it.
fn select_here(th: &TaskThread, req: &ArchivedClientRequest) -> Option<Vec<u8>> {
    let (module, pstate, task, path) = crate::wire::select_parts(req)?.ok()?;
    if module != th.rt.def.name {
        return None;
    }
    let (index, _) = th.rt.def.pstate(pstate).ok()?;
    let client = PStateClient {
        rt: th.rt.clone(),
        pstate: index,
    };
    let task = client.target(task, &path).ok()?;
    if th.rt.placement.thread_of_task[task as usize] != th.thread {
        return None;
    }
    // Held while reading, as a read through the channels holds it.
    let _ticket = GateTicket::try_enter(&th.rt).ok()?;
    let selected = th
        .pstates_of(task)
        .and_then(|p| p[index].select_stored(&th.store, &path));
    Some(crate::wire::encode_client_answer(selected.map(Payload::Selected)))
}

/// The depot, task, record and ack level of `req` when it is an append
/// that a task of this thread takes and that is to be acknowledged (the
/// connection's bound on requests in flight then bounds it): taken right
/// here, without the client channel. `None`: the handler serves it (an
/// append of another thread's task, one without acknowledgement, or one
/// with bad input, whose error the handler reports).
fn append_here(th: &TaskThread, req: &ArchivedClientRequest) -> Option<(usize, u32, Vec<u8>, AckLevel)> {
    let (module, depot, record, ack) = crate::wire::append_parts(req)?.ok()?;
    let rt = &th.rt;
    if module != rt.def.name || th.stopping.get() || th.tasks.is_empty() {
        return None;
    }
    if ack == AckLevel::None || record.len() > rt.config.log.record_bytes_max as usize {
        return None;
    }
    let (index, def) = rt.def.depot(depot).ok()?;
    let task = match def.fixed_task_archived(record, rt.placement.parallelism.tasks).ok()? {
        Some(task) => task,
        // Any task: one of this thread's.
        None if matches!(def.partitioner, Partitioner::Random) => {
            th.tasks[rt.next_origin.fetch_add(1, Ordering::Relaxed) as usize % th.tasks.len()]
        }
        None => return None,
    };
    (rt.placement.thread_of_task[task as usize] == th.thread).then(|| (index, task, record.to_vec(), ack))
}
