//! Framed TCP between clients and workers (and between workers).
//!
//! ```text
//! handshake, client -> server:  "RAMA" version:u16 LE role:u8 thread:u8
//!                               client_nonce:16
//!                               (thread: 0, or 1 + the task thread a
//!                               client connection asks to be served by)
//! handshake, server -> client:  "RAMA" version:u16 LE status:u8 0
//!                               status 0 go on, 1 version mismatch,
//!                               3 connection limit reached (then closed)
//!            and, on status 0:  server_nonce:16 server_proof:32
//! handshake, client -> server:  client_proof:32
//! handshake, server -> client:  verdict:u8 (0 accepted, 2 refused: closed)
//! frame:                        len:u32 LE, then len bytes:
//!                               id:u64 LE kind:u8 payload
//!                               kind 0 request, 1 response, 2 error (UTF-8)
//! ```
//! The proofs are HMAC-SHA256 tags with the cluster secret
//! ([`crate::auth`]): `server_proof` over (client_nonce, server_nonce,
//! role), `client_proof` over (server_nonce, client_nonce, role), each
//! with its own label. The client checks the server's proof before it
//! sends its own or any request; the server reads no request before the
//! client's proof checks out. Both fail closed: a wrong or missing proof
//! ends the connection.
//!
//! Every frame length is checked against the receiver's cap before anything
//! is allocated; a frame above it closes the connection with an error.
//! A server bounds its connections ([`ServerLimits`]): at most
//! `connections_max` open (more are refused in the handshake), a handshake
//! must finish within `handshake_timeout`, and a connection with no request
//! in flight that sends nothing for `idle_timeout` is closed.
//! Requests are pipelined: many may be in flight on one connection (up to
//! a bound), answered in any order, matched by id. A server may hand a
//! client connection, once it is authenticated, to someone else to serve
//! ([`Adopter`]: a worker gives it to a task thread, which speaks the same
//! frames). Otherwise each side writes from
//! one writer thread that takes every frame already queued (up to
//! [`BATCH_BYTES`]) into one `write`, so small messages share syscalls and
//! packets. Payloads are opaque bytes; callers put rkyv archives in them.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::auth::{Secret, Side as AuthSide, NONCE_BYTES, PROOF_BYTES};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
const MAGIC: &[u8; 4] = b"RAMA";
/// Default cap on a frame's length.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// Bytes the writer gathers into one write.
pub const BATCH_BYTES: usize = 1 << 20;
/// Requests in flight per connection (client side) and frames queued for
/// writing; senders wait when they are used up.
pub const IN_FLIGHT_MAX: usize = 4096;

/// Raises this process's open-file limit to its hard limit: every
/// connection a server takes costs a few descriptors, and a cap on
/// connections is only real below the limit. Daemons and workers call it
/// once at start.
pub fn raise_open_file_limit() {
    // SAFETY: reads and sets this process's own resource limit.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// The handshake role of clients.
pub const ROLE_CLIENT: u8 = 0;

use engine::wire::frame::{self as framing, KIND_ERROR, KIND_REQUEST, KIND_RESPONSE};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what} {addr}: {source}")]
    Io {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} is not a rama endpoint (bad handshake)")]
    NotRama { addr: String },
    /// One side could not prove it holds the cluster secret.
    #[error(
        "{addr} {why}: the two sides do not hold the same cluster secret (cluster.secret.file in rama.yaml); \
         copy the cluster's secret file to this node"
    )]
    Unauthenticated { addr: String, why: &'static str },
    #[error("{addr} refused the connection: it has reached its limit of open connections; try again later")]
    Busy { addr: String },
    #[error("protocol version mismatch with {addr}: this side speaks {ours}, the other {theirs}")]
    Version { addr: String, ours: u16, theirs: u16 },
    #[error("frame of {len} bytes from {addr} is above the limit of {max} bytes; connection closed")]
    FrameTooLarge { addr: String, len: usize, max: usize },
    #[error("the connection to {addr} closed")]
    Closed { addr: String },
    /// The server's handler refused the request.
    #[error("{0}")]
    Remote(String),
}

pub type Result<T> = std::result::Result<T, NetError>;

/// Counters of one side of a connection.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_written: AtomicU64,
    pub writes: AtomicU64,
}

/// Writes queued frames, several per write.
fn writer(stream: TcpStream, rx: flume::Receiver<Vec<u8>>, stats: Arc<Stats>) {
    let mut out = BufWriter::with_capacity(BATCH_BYTES + 64, stream);
    while let Ok(first) = rx.recv() {
        let mut bytes = first.len();
        let mut frames = 1;
        if out.write_all(&first).is_err() {
            return;
        }
        // Frames of requests that arrived together are usually made a few
        // microseconds apart: give their makers one chance to run before
        // the write, so they share it (one send instead of one each).
        let mut yielded = false;
        while bytes < BATCH_BYTES {
            let Ok(next) = rx.try_recv() else {
                if yielded {
                    break;
                }
                yielded = true;
                std::thread::yield_now();
                continue;
            };
            bytes += next.len();
            frames += 1;
            if out.write_all(&next).is_err() {
                return;
            }
        }
        if out.flush().is_err() {
            return;
        }
        stats.frames_written.fetch_add(frames, Ordering::Relaxed);
        stats.writes.fetch_add(1, Ordering::Relaxed);
    }
    let _ = out.get_ref().shutdown(Shutdown::Write);
}

/// Waits for the next frame's first byte on a server connection whose read
/// timeout is the idle timeout: `false` once the peer sent nothing for
/// that long while `busy()` said no request of it was in flight (the
/// connection is then closed), or when the stream ended or failed.
fn await_frame(input: &mut BufReader<TcpStream>, idle: Duration, busy: &dyn Fn() -> bool) -> bool {
    use std::io::BufRead;
    let mut quiet_since = Instant::now();
    loop {
        match input.fill_buf() {
            Ok([]) => return false,
            Ok(_) => return true,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if busy() {
                    // Answers are still owed: the peer waits for them.
                    quiet_since = Instant::now();
                } else if quiet_since.elapsed() >= idle {
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// A server connection's reader inside a frame: its socket's read timeout
/// is a short tick, and a read that times out is tried again until the
/// peer has made no progress for `stall_max`.
struct Patient<'a> {
    input: &'a mut BufReader<TcpStream>,
    stall_max: Duration,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let started = Instant::now();
        loop {
            match self.input.read(buf) {
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                        && started.elapsed() < self.stall_max => {}
                other => return other,
            }
        }
    }
}

/// Reads one frame: (id, kind, payload); `None` at a clean end of stream.
fn read_frame(input: &mut impl Read, max: usize, addr: &str) -> Result<Option<(u64, u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(source) => {
            return Err(NetError::Io {
                what: "reading from",
                addr: addr.into(),
                source,
            })
        }
    }
    let Some(len) = framing::body_len(len, max) else {
        return Err(NetError::FrameTooLarge {
            addr: addr.into(),
            len: u32::from_le_bytes(len) as usize,
            max,
        });
    };
    let mut body = vec![0u8; len];
    input.read_exact(&mut body).map_err(|source| NetError::Io {
        what: "reading from",
        addr: addr.into(),
        source,
    })?;
    let (id, kind) = framing::id_kind(&body);
    body.drain(..9);
    Ok(Some((id, kind, body)))
}

fn handshake_bytes(version: u16, byte: u8) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&version.to_le_bytes());
    h[6] = byte;
    h
}

/// Bytes of the client's hello: magic, version, role, zero, nonce.
const HELLO_BYTES: usize = 8 + NONCE_BYTES;
/// Handshake statuses.
const STATUS_GO_ON: u8 = 0;
const STATUS_VERSION: u8 = 1;
const STATUS_REFUSED: u8 = 2;
const STATUS_BUSY: u8 = 3;
/// How long either side waits for the other's part of the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's side of the handshake (see the module doc).
fn client_handshake(
    stream: &mut TcpStream,
    (version, role, thread): (u16, u8, u8),
    secret: &Secret,
    addr: &str,
) -> Result<()> {
    let io = |what: &'static str| {
        let addr = addr.to_string();
        move |source| NetError::Io { what, addr, source }
    };
    let ours = crate::auth::nonce();
    let mut hello = [0u8; HELLO_BYTES];
    hello[..8].copy_from_slice(&handshake_bytes(version, role));
    hello[7] = thread;
    hello[8..].copy_from_slice(&ours);
    stream.write_all(&hello).map_err(io("writing to"))?;
    let mut reply = [0u8; 8];
    stream
        .read_exact(&mut reply)
        .map_err(io("reading the handshake from"))?;
    if &reply[..4] != MAGIC {
        return Err(NetError::NotRama { addr: addr.into() });
    }
    let theirs = u16::from_le_bytes([reply[4], reply[5]]);
    match reply[6] {
        STATUS_GO_ON => {}
        STATUS_BUSY => return Err(NetError::Busy { addr: addr.into() }),
        _ => {
            return Err(NetError::Version {
                addr: addr.into(),
                ours: version,
                theirs,
            })
        }
    }
    let mut challenge = [0u8; NONCE_BYTES + PROOF_BYTES];
    stream
        .read_exact(&mut challenge)
        .map_err(io("reading the handshake from"))?;
    let (nonce, proof) = challenge.split_at(NONCE_BYTES);
    let server_nonce: [u8; NONCE_BYTES] = nonce.try_into().expect("nonce bytes");
    if !secret.verify(AuthSide::Server, &ours, &server_nonce, role, proof) {
        return Err(NetError::Unauthenticated {
            addr: addr.into(),
            why: "could not prove it holds the cluster secret",
        });
    }
    stream
        .write_all(&secret.proof(AuthSide::Client, &server_nonce, &ours, role))
        .map_err(io("writing to"))?;
    let mut verdict = [0u8; 1];
    match stream.read_exact(&mut verdict) {
        Ok(()) if verdict[0] == STATUS_GO_ON => Ok(()),
        // A refusal, or the connection closed in its place.
        _ => Err(NetError::Unauthenticated {
            addr: addr.into(),
            why: "refused this side's proof",
        }),
    }
}

/// Reads from a stream within one deadline for all reads together (a
/// per-read timeout would let a peer sending a byte now and then hold a
/// handshake open for ever).
struct Deadline<'a> {
    stream: &'a TcpStream,
    at: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&*self.stream).read(buf)
    }
}

/// The server's side of the handshake, all of it within `timeout`:
/// returns the client's role and thread byte once it proved it holds the
/// secret, or `None` (the connection is then closed).
fn server_handshake(stream: &TcpStream, version: u16, secret: &Secret, timeout: Duration) -> Option<(u8, u8)> {
    let mut input = Deadline {
        stream,
        at: Instant::now() + timeout,
    };
    let mut stream = stream;
    let mut hello = [0u8; HELLO_BYTES];
    if input.read_exact(&mut hello).is_err() || &hello[..4] != MAGIC {
        return None;
    }
    let theirs = u16::from_le_bytes([hello[4], hello[5]]);
    let (role, thread) = (hello[6], hello[7]);
    if theirs != version {
        let _ = stream.write_all(&handshake_bytes(version, STATUS_VERSION));
        return None;
    }
    let client_nonce: [u8; NONCE_BYTES] = hello[8..].try_into().expect("nonce bytes");
    let ours = crate::auth::nonce();
    let mut reply = [0u8; 8 + NONCE_BYTES + PROOF_BYTES];
    reply[..8].copy_from_slice(&handshake_bytes(version, STATUS_GO_ON));
    reply[8..8 + NONCE_BYTES].copy_from_slice(&ours);
    reply[8 + NONCE_BYTES..].copy_from_slice(&secret.proof(AuthSide::Server, &client_nonce, &ours, role));
    stream.write_all(&reply).ok()?;
    let mut proof = [0u8; PROOF_BYTES];
    input.read_exact(&mut proof).ok()?;
    if !secret.verify(AuthSide::Client, &ours, &client_nonce, role, &proof) {
        let _ = stream.write_all(&[STATUS_REFUSED]);
        return None;
    }
    stream.write_all(&[STATUS_GO_ON]).ok()?;
    Some((role, thread))
}

/// Refuses a connection over the server's limit, with a status the client
/// can name. Never blocks: the hello is read only if it has arrived.
fn refuse_busy(stream: &TcpStream, version: u16) {
    let _ = stream.set_nonblocking(true);
    let mut hello = [0u8; HELLO_BYTES];
    let _ = (&*stream).read(&mut hello);
    let _ = (&*stream).write(&handshake_bytes(version, STATUS_BUSY));
    let _ = stream.shutdown(Shutdown::Both);
}

/// Called once with the answer to a request (or why there is none).
pub type OnAnswer = Box<dyn FnOnce(Result<Vec<u8>>) + Send>;

type Pending = Arc<Mutex<HashMap<u64, OnAnswer>>>;

/// A client connection: pipelined requests to one server.
pub struct Connection {
    addr: String,
    next_id: AtomicU64,
    frames: flume::Sender<Vec<u8>>,
    pending: Pending,
    /// Tokens for requests in flight.
    slots: (flume::Sender<()>, flume::Receiver<()>),
    closed: Arc<AtomicBool>,
    stream: TcpStream,
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects and shakes hands (protocol version `version`, normally
    /// [`PROTOCOL_VERSION`]); `frame_max` caps the frames it accepts.
    /// Both sides prove they hold `secret` before anything else is sent.
    pub fn connect(addr: impl ToSocketAddrs, version: u16, frame_max: usize, secret: &Secret) -> Result<Connection> {
        Self::connect_as(addr, version, frame_max, ROLE_CLIENT, secret)
    }

    /// `connect` asking to be served by task thread `thread` (a worker
    /// serves a client connection on one of its task threads: a request
    /// for a task of that thread is answered without crossing another;
    /// a thread the worker does not run is ignored).
    pub fn connect_to_thread(
        addr: impl ToSocketAddrs,
        version: u16,
        frame_max: usize,
        thread: u32,
        secret: &Secret,
    ) -> Result<Connection> {
        // Threads past the byte's range are not named (any thread serves).
        let byte = u8::try_from(thread + 1).unwrap_or(0);
        Self::open(addr, (version, ROLE_CLIENT, byte), frame_max, secret)
    }

    /// `connect` announcing `role` in the handshake (the server hands it
    /// to its handler: clients are 0, other roles are the server's to
    /// define).
    pub fn connect_as(
        addr: impl ToSocketAddrs,
        version: u16,
        frame_max: usize,
        role: u8,
        secret: &Secret,
    ) -> Result<Connection> {
        Self::open(addr, (version, role, 0), frame_max, secret)
    }

    fn open(
        addr: impl ToSocketAddrs,
        (version, role, thread): (u16, u8, u8),
        frame_max: usize,
        secret: &Secret,
    ) -> Result<Connection> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| NetError::Io {
                what: "resolving",
                addr: "address".into(),
                source,
            })?
            .collect();
        let shown = addrs.first().map_or_else(|| "?".to_string(), ToString::to_string);
        let io = |what: &'static str| {
            let addr = shown.clone();
            move |source| NetError::Io { what, addr, source }
        };
        let mut stream = TcpStream::connect_timeout(
            addrs.first().ok_or_else(|| NetError::Closed { addr: shown.clone() })?,
            Duration::from_secs(5),
        )
        .map_err(io("connecting to"))?;
        stream.set_nodelay(true).map_err(io("configuring"))?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io("configuring"))?;
        client_handshake(&mut stream, (version, role, thread), secret, &shown)?;
        stream.set_read_timeout(None).map_err(io("configuring"))?;
        let (frames_tx, frames_rx) = flume::bounded(IN_FLIGHT_MAX);
        let stats = Arc::new(Stats::default());
        {
            let (stream, stats) = (stream.try_clone().map_err(io("cloning"))?, stats.clone());
            std::thread::spawn(move || writer(stream, frames_rx, stats));
        }
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let slots = flume::bounded(IN_FLIGHT_MAX);
        for _ in 0..IN_FLIGHT_MAX {
            slots.0.send(()).expect("room for every slot");
        }
        {
            let mut input = BufReader::new(stream.try_clone().map_err(io("cloning"))?);
            let (pending, closed, addr) = (pending.clone(), closed.clone(), shown.clone());
            let free = slots.0.clone();
            std::thread::spawn(move || {
                let end = loop {
                    match read_frame(&mut input, frame_max, &addr) {
                        Ok(Some((id, kind, payload))) => {
                            let Some(on_answer) = pending.lock().expect("pending").remove(&id) else {
                                continue;
                            };
                            let _ = free.send(());
                            on_answer(match kind {
                                KIND_RESPONSE => Ok(payload),
                                _ => Err(NetError::Remote(String::from_utf8_lossy(&payload).into_owned())),
                            });
                        }
                        Ok(None) => break NetError::Closed { addr: addr.clone() },
                        Err(e) => break e,
                    }
                };
                closed.store(true, Ordering::SeqCst);
                let why = end.to_string();
                let drained: Vec<OnAnswer> = pending.lock().expect("pending").drain().map(|(_, a)| a).collect();
                for on_answer in drained {
                    on_answer(Err(NetError::Remote(why.clone())));
                    // A sender waiting for a free slot wakes, sees the
                    // connection closed and fails instead of waiting on.
                    let _ = free.send(());
                }
            });
        }
        Ok(Connection {
            addr: shown,
            next_id: AtomicU64::new(1),
            frames: frames_tx,
            pending,
            slots,
            closed,
            stream,
            stats,
        })
    }

    /// Sends a request; the receiver gets the answer. Waits while
    /// [`IN_FLIGHT_MAX`] requests are unanswered.
    pub fn send(&self, payload: &[u8]) -> Result<PendingReply<'_>> {
        let (tx, rx) = flume::bounded(1);
        self.send_with(
            payload,
            Box::new(move |answer| {
                let _ = tx.send(answer);
            }),
        )?;
        Ok(PendingReply { conn: self, rx })
    }

    /// Sends a request; `on_answer` is called with its answer (on the
    /// connection's reader thread: it must not block), or with an error
    /// when the connection ends first. Waits while [`IN_FLIGHT_MAX`]
    /// requests are unanswered. An error returned here means `on_answer`
    /// is dropped uncalled.
    pub fn send_with(&self, payload: &[u8], on_answer: OnAnswer) -> Result<()> {
        let closed = || NetError::Closed {
            addr: self.addr.clone(),
        };
        if self.closed.load(Ordering::SeqCst) {
            return Err(closed());
        }
        self.slots.1.recv().map_err(|_| closed())?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().expect("pending").insert(id, on_answer);
        if self.frames.send(framing::make(id, KIND_REQUEST, payload)).is_err() {
            self.pending.lock().expect("pending").remove(&id);
            let _ = self.slots.0.send(());
            return Err(closed());
        }
        // The reader may have drained `pending` just before the insert.
        if self.closed.load(Ordering::SeqCst) {
            if let Some(on_answer) = self.pending.lock().expect("pending").remove(&id) {
                on_answer(Err(closed()));
            }
        }
        Ok(())
    }

    /// Whether the connection has ended (its reader saw the end or an
    /// error).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Sends a request and waits for its answer.
    pub fn call(&self, payload: &[u8]) -> Result<Vec<u8>> {
        self.send(payload)?.wait()
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// An answer not yet received.
#[derive(Debug)]
pub struct PendingReply<'c> {
    conn: &'c Connection,
    rx: flume::Receiver<Result<Vec<u8>>>,
}

impl PendingReply<'_> {
    pub fn wait(self) -> Result<Vec<u8>> {
        self.rx.recv().unwrap_or_else(|_| {
            Err(NetError::Closed {
                addr: self.conn.addr.clone(),
            })
        })
    }
}

/// Answers one request: `Ok(payload)` or `Err(message)`.
pub type Handler = Arc<dyn Fn(Vec<u8>) -> std::result::Result<Vec<u8>, String> + Send + Sync>;

/// Sends the answer to one request (from any thread; it never blocks);
/// work a handler leaves to the server's executor.
pub use engine::cluster::connection::{Later, Respond};

/// A client connection after its handshake, offered to an [`Adopter`].
#[derive(Debug)]
pub struct Handoff {
    pub stream: TcpStream,
    /// The task thread the client asked for, if any.
    pub thread: Option<u32>,
    pub limits: ServerLimits,
    /// Held until the connection ends: it counts against the server's
    /// `connections_max`, and the server shuts it when dropped.
    pub guard: OpenGuard,
}

/// Takes a client connection to serve it elsewhere, or gives it back
/// (the server then serves it with its handler).
pub type Adopter = Arc<dyn Fn(Handoff) -> Option<Handoff> + Send + Sync>;

/// A connection's place among a server's open connections, given up when
/// dropped.
#[derive(Debug)]
pub struct OpenGuard {
    open: Arc<Mutex<HashMap<u64, TcpStream>>>,
    n: u64,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.open.lock().expect("open connections").remove(&self.n);
    }
}

/// Answers requests without a thread per request in flight: called on the
/// connection's reader thread with the handshake's role byte, the payload
/// and where the answer goes (it must not block for long). It either
/// arranges for `Respond` to be called (returning `None`), or returns a
/// future that the server's executor runs and that calls it. Up to
/// [`IN_FLIGHT_MAX`] requests of a connection are in flight; then the
/// connection is not read.
pub type AsyncHandler = Arc<dyn Fn(u8, Vec<u8>, Respond) -> Option<Later> + Send + Sync>;

/// The handler and the executor its futures run on, and who may take
/// client connections.
#[derive(Clone)]
struct Serve(AsyncHandler, Arc<smol::Executor<'static>>, Option<Adopter>);

/// The bounds of one server. Every field has a default sized for a worker.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Largest frame accepted; a larger one closes the connection.
    /// Default [`FRAME_BYTES_MAX`].
    pub frame_bytes_max: usize,
    /// Open connections at most; further ones are refused in the
    /// handshake with a status the client reports. Default 1024.
    pub connections_max: usize,
    /// A connection with no request in flight that sends nothing for this
    /// long is closed (clients reconnect when they next send). Default
    /// 10 minutes.
    pub idle_timeout: Duration,
    /// The handshake must finish within this. Default [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// Handshakes in progress at most (connections not yet authenticated);
    /// more are refused like connections over the cap. Default 64.
    pub handshakes_max: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            frame_bytes_max: FRAME_BYTES_MAX,
            connections_max: 1024,
            idle_timeout: Duration::from_secs(600),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshakes_max: 64,
        }
    }
}

/// What every connection of a server shares.
#[derive(Clone)]
struct Listening {
    version: u16,
    secret: Secret,
    limits: ServerLimits,
}

/// A listening server; when dropped it stops accepting and ends its open
/// connections (answers still running are dropped).
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    /// Open connections, ended when the server is dropped.
    open: Arc<Mutex<HashMap<u64, TcpStream>>>,
    /// The async executor's threads and what stops them.
    executor: Option<(flume::Sender<()>, Vec<JoinHandle<()>>)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `addr` (port 0: any free port) and serves every
    /// connection that speaks `version` and proves it holds `secret` with
    /// `handler`, within `limits`.
    pub fn bind(
        addr: impl ToSocketAddrs,
        version: u16,
        secret: &Secret,
        limits: ServerLimits,
        handler: Handler,
    ) -> Result<Server> {
        // A blocking handler runs on the shared pool of blocking threads
        // (bounded), never on the connection's reader.
        let handler: AsyncHandler = Arc::new(move |_role, request, respond: Respond| {
            let handler = handler.clone();
            Some(Box::pin(async move { respond(smol::unblock(move || handler(request)).await) }) as Later)
        });
        Self::bind_async(addr, version, secret, limits, 1, handler)
    }

    /// Like `bind`, answering with `handler`'s futures on `threads` executor
    /// threads.
    pub fn bind_async(
        addr: impl ToSocketAddrs,
        version: u16,
        secret: &Secret,
        limits: ServerLimits,
        threads: usize,
        handler: AsyncHandler,
    ) -> Result<Server> {
        Self::bind_adopting(addr, (version, secret), limits, threads, handler, None)
    }

    /// Like `bind_async`; every authenticated client connection (role
    /// [`ROLE_CLIENT`]) is offered to `adopter` first.
    pub fn bind_adopting(
        addr: impl ToSocketAddrs,
        (version, secret): (u16, &Secret),
        limits: ServerLimits,
        threads: usize,
        handler: AsyncHandler,
        adopter: Option<Adopter>,
    ) -> Result<Server> {
        let listening = Listening {
            version,
            secret: secret.clone(),
            limits,
        };
        let executor = Arc::new(smol::Executor::new());
        let (stop_tx, stop_rx) = flume::bounded::<()>(1);
        let runners = (0..threads.max(1))
            .map(|i| {
                let (ex, stop) = (executor.clone(), stop_rx.clone());
                std::thread::Builder::new()
                    .name(format!("net-executor-{i}"))
                    .spawn(move || smol::block_on(ex.run(async move { while stop.recv_async().await.is_ok() {} })))
                    .map_err(|source| NetError::Io {
                        what: "starting an executor thread for",
                        addr: "the server".into(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::listen(
            addr,
            listening,
            Serve(handler, executor, adopter),
            Some((stop_tx, runners)),
        )
    }

    fn listen(
        addr: impl ToSocketAddrs,
        listening: Listening,
        handler: Serve,
        executor: Option<(flume::Sender<()>, Vec<JoinHandle<()>>)>,
    ) -> Result<Server> {
        let listener = TcpListener::bind(addr).map_err(|source| NetError::Io {
            what: "listening on",
            addr: "address".into(),
            source,
        })?;
        let local = listener.local_addr().map_err(|source| NetError::Io {
            what: "listening on",
            addr: "address".into(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let handshaking = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let accept = {
            let (stop, open, handshaking) = (stop.clone(), open.clone(), handshaking.clone());
            std::thread::spawn(move || {
                for (n, stream) in listener.incoming().enumerate() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else {
                        // Out of file descriptors, say: wait rather than spin.
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    {
                        let mut open = open.lock().expect("open connections");
                        // Unauthenticated handshakes have a small cap of
                        // their own, so peers without the secret cannot take
                        // the slots of those with it.
                        if open.len() >= listening.limits.connections_max
                            || handshaking.load(Ordering::SeqCst) >= listening.limits.handshakes_max
                        {
                            drop(open);
                            refuse_busy(&stream, listening.version);
                            continue;
                        }
                        match stream.try_clone() {
                            Ok(s) => open.insert(n as u64, s),
                            Err(_) => continue,
                        };
                    }
                    handshaking.fetch_add(1, Ordering::SeqCst);
                    let (handler, open, stop, listening, hs) = (
                        handler.clone(),
                        open.clone(),
                        stop.clone(),
                        listening.clone(),
                        handshaking.clone(),
                    );
                    let guard = OpenGuard {
                        open: open.clone(),
                        n: n as u64,
                    };
                    let spawned = std::thread::Builder::new()
                        .name("net-connection".into())
                        .spawn(move || serve_connection(stream, &listening, handler, (&stop, &hs), guard));
                    // Out of threads: this connection is dropped, the
                    // server goes on.
                    if spawned.is_err() {
                        handshaking.fetch_sub(1, Ordering::SeqCst);
                        if let Some(s) = open.lock().expect("open connections").remove(&(n as u64)) {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                    }
                }
            })
        };
        Ok(Server {
            addr: local,
            stop,
            accept: Some(accept),
            open,
            executor,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for (_, s) in self.open.lock().expect("open connections").drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some((stop, runners)) = self.executor.take() {
            drop(stop);
            for r in runners {
                let _ = r.join();
            }
        }
    }
}

fn serve_connection(
    stream: TcpStream,
    listening: &Listening,
    handler: Serve,
    (stop, handshaking): (&AtomicBool, &std::sync::atomic::AtomicUsize),
    guard: OpenGuard,
) {
    let addr = stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
    let limits = &listening.limits;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(limits.handshake_timeout));
    let _ = stream.set_write_timeout(Some(limits.handshake_timeout));
    let shaken = server_handshake(&stream, listening.version, &listening.secret, limits.handshake_timeout);
    handshaking.fetch_sub(1, Ordering::SeqCst);
    let Some((role, thread)) = shaken else {
        let _ = stream.shutdown(Shutdown::Both);
        return;
    };
    let Serve(h, executor, adopter) = handler;
    let (stream, guard) = match adopter {
        Some(adopt) if role == ROLE_CLIENT => {
            let offered = Handoff {
                stream,
                thread: thread.checked_sub(1).map(u32::from),
                limits: limits.clone(),
                guard,
            };
            match adopt(offered) {
                None => return,
                Some(back) => (back.stream, back.guard),
            }
        }
        _ => (stream, guard),
    };
    // From here on the read timeout is the idle check's tick; writes have
    // no timeout (the writer blocks only on a full socket, and the
    // connection's end unblocks it).
    let _ = stream.set_read_timeout(Some(limits.idle_timeout.min(Duration::from_secs(5))));
    // A peer that takes no answers for the idle timeout ends its
    // connection: the writer's write fails and it stops.
    let _ = stream.set_write_timeout(Some(limits.idle_timeout));
    let Ok(out) = stream.try_clone() else { return };
    let (frames_tx, frames_rx) = flume::bounded(IN_FLIGHT_MAX);
    let stats = Arc::new(Stats::default());
    let writer_thread = std::thread::spawn(move || writer(out, frames_rx, stats));
    serve_async(stream, role, limits, &addr, (&h, &executor), frames_tx, stop);
    drop(guard);
    // Not joined: the writer ends when the answers still pending are given
    // or dropped, and some of them may wait in the executor, which this
    // thread holds; waiting here would keep both (and the handler's state)
    // alive forever once the server's executor threads have stopped.
    drop(writer_thread);
}

/// Reads requests and runs their answers on `executor`.
fn serve_async(
    stream: TcpStream,
    role: u8,
    limits: &ServerLimits,
    addr: &str,
    (handler, executor): (&AsyncHandler, &Arc<smol::Executor<'static>>),
    frames_tx: flume::Sender<Vec<u8>>,
    stop: &AtomicBool,
) {
    let (tokens_tx, tokens_rx) = flume::bounded::<()>(IN_FLIGHT_MAX);
    for _ in 0..IN_FLIGHT_MAX {
        tokens_tx.send(()).expect("room for every token");
    }
    // One handle to shut the connection with, shared by every answer (a
    // clone per request cost a dup and a close each).
    let Ok(shut) = stream.try_clone().map(Arc::new) else {
        return;
    };
    let mut input = BufReader::new(stream);
    // Every token back in the pool: no answer is owed.
    let busy = || tokens_rx.len() < IN_FLIGHT_MAX;
    loop {
        if !await_frame(&mut input, limits.idle_timeout, &busy) {
            break;
        }
        let mut patient = Patient {
            input: &mut input,
            stall_max: limits.idle_timeout,
        };
        let Ok(Some((id, KIND_REQUEST, payload))) = read_frame(&mut patient, limits.frame_bytes_max, addr) else {
            break;
        };
        // Waits for a free slot; gives up once the server stops (answers
        // in its stopped executor would never free one).
        let slot = loop {
            match tokens_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => break true,
                Err(flume::RecvTimeoutError::Timeout) if !stop.load(Ordering::SeqCst) => {}
                Err(_) => break false,
            }
        };
        if !slot {
            break;
        }
        let (frames, tokens, peer) = (frames_tx.clone(), tokens_tx.clone(), shut.clone());
        // At most IN_FLIGHT_MAX answers are pending (tokens), and the frame
        // queue holds that many: this send never waits.
        let respond: Respond = Box::new(move |answer| {
            let f = match answer {
                Ok(answer) => framing::make(id, KIND_RESPONSE, &answer),
                Err(why) => framing::make(id, KIND_ERROR, why.as_bytes()),
            };
            // Never waits (it may run on a task thread): a peer that lets
            // IN_FLIGHT_MAX answers pile up unread loses its connection.
            if frames.try_send(f).is_err() {
                let _ = peer.shutdown(Shutdown::Both);
            }
            let _ = tokens.send(());
        });
        if let Some(later) = handler(role, payload, respond) {
            executor.spawn(later).detach();
        }
    }
    // Answers still running hold frame senders; the writer ends when they
    // are done.
    drop(frames_tx);
    let _ = input.get_ref().shutdown(Shutdown::Read);
}
