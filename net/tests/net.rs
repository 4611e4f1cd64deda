//! The framed transport: pipelining, errors, version and frame limits,
//! write batching, authentication and the server's bounds.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use net::auth::Secret;
use net::{Connection, NetError, Server, ServerLimits, FRAME_BYTES_MAX, PROTOCOL_VERSION};

/// The secret the tests' servers and clients share.
fn secret() -> &'static Secret {
    static S: OnceLock<Secret> = OnceLock::new();
    S.get_or_init(Secret::generate)
}

fn connect(addr: std::net::SocketAddr, frame_max: usize) -> net::Result<Connection> {
    Connection::connect(addr, PROTOCOL_VERSION, frame_max, secret())
}

fn echo_server(frame_max: usize) -> Server {
    echo_server_with(ServerLimits {
        frame_bytes_max: frame_max,
        ..Default::default()
    })
}

fn echo_server_with(limits: ServerLimits) -> Server {
    Server::bind(
        "127.0.0.1:0",
        PROTOCOL_VERSION,
        secret(),
        limits,
        Arc::new(|req: Vec<u8>| {
            if let Some(ms) = req.strip_prefix(b"sleep ") {
                let ms: u64 = String::from_utf8_lossy(ms).parse().unwrap();
                std::thread::sleep(Duration::from_millis(ms));
            }
            if req.starts_with(b"fail") {
                return Err(format!("refused {}", String::from_utf8_lossy(&req)));
            }
            if req.starts_with(b"big") {
                return Ok(vec![7u8; 2 << 20]);
            }
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&req);
            Ok(answer)
        }),
    )
    .unwrap()
}

#[test]
fn pipelined_requests_from_many_threads_get_their_own_answers() {
    let server = echo_server(FRAME_BYTES_MAX);
    let conn = Arc::new(connect(server.local_addr(), FRAME_BYTES_MAX).unwrap());
    std::thread::scope(|s| {
        for t in 0..4 {
            let conn = conn.clone();
            s.spawn(move || {
                // Many in flight at once, then all answers checked. Two
                // rounds of 250 per thread: all four threads together stay
                // under the connection's bound of requests in flight (a
                // caller holding that many unawaited answers waits forever).
                for round in 0..2 {
                    let pending: Vec<_> = (0..250)
                        .map(|i| {
                            let msg = format!("{t}-{round}-{i}");
                            (msg.clone(), conn.send(msg.as_bytes()).unwrap())
                        })
                        .collect();
                    for (msg, p) in pending {
                        assert_eq!(p.wait().unwrap(), format!("echo:{msg}").into_bytes());
                    }
                }
            });
        }
    });
    // Small frames were written several per write.
    let frames = conn.stats.frames_written.load(Ordering::Relaxed);
    let writes = conn.stats.writes.load(Ordering::Relaxed);
    assert_eq!(frames, 2000);
    assert!(writes < frames, "{writes} writes for {frames} frames: no batching");
}

#[test]
fn handler_errors_come_back_as_errors() {
    let server = echo_server(FRAME_BYTES_MAX);
    let conn = connect(server.local_addr(), FRAME_BYTES_MAX).unwrap();
    match conn.call(b"fail now") {
        Err(NetError::Remote(msg)) => assert_eq!(msg, "refused fail now"),
        other => panic!("{other:?}"),
    }
    assert_eq!(conn.call(b"x").unwrap(), b"echo:x");
}

#[test]
fn version_mismatch_and_foreign_servers_are_refused() {
    let server = echo_server(FRAME_BYTES_MAX);
    match Connection::connect(server.local_addr(), PROTOCOL_VERSION + 1, FRAME_BYTES_MAX, secret()) {
        Err(NetError::Version { ours, theirs, .. }) => {
            assert_eq!((ours, theirs), (PROTOCOL_VERSION + 1, PROTOCOL_VERSION));
        }
        other => panic!("{other:?}"),
    }
    // Something that is not rama (answers HTTP).
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = foreign.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = foreign.accept().unwrap();
        let mut buf = [0u8; 8];
        let _ = s.read_exact(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let err = connect(addr, FRAME_BYTES_MAX).unwrap_err();
    assert!(matches!(err, NetError::NotRama { .. }), "{err}");
    t.join().unwrap();
}

#[test]
fn frames_above_the_cap_close_the_connection() {
    // An answer above the client's cap.
    let server = echo_server(FRAME_BYTES_MAX);
    let conn = connect(server.local_addr(), 1 << 20).unwrap();
    let err = conn.call(b"big").unwrap_err().to_string();
    assert!(err.contains("above the limit of 1048576 bytes"), "{err}");
    assert!(
        conn.call(b"x").is_err(),
        "the connection stayed usable after a bad frame"
    );
    // A request above the server's cap.
    let small = echo_server(1 << 10);
    let conn = connect(small.local_addr(), FRAME_BYTES_MAX).unwrap();
    assert_eq!(conn.call(b"fits").unwrap(), b"echo:fits");
    assert!(conn.call(&vec![1u8; 4 << 10]).is_err());
}

/// Polls `f` until it holds, for at most 30 s (a loaded machine is slow;
/// nothing here asserts a speed).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server whose handler counts the requests it was given.
fn counting_server() -> (Server, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let server = Server::bind(
        "127.0.0.1:0",
        PROTOCOL_VERSION,
        secret(),
        ServerLimits::default(),
        Arc::new(move |_req: Vec<u8>| {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(b"ok".to_vec())
        }),
    )
    .unwrap();
    (server, calls)
}

/// A raw hello: magic, version, role, zero, a client nonce.
fn hello() -> Vec<u8> {
    let mut h = b"RAMA".to_vec();
    h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&[9u8; 16]);
    h
}

/// A request frame (id 1) carrying `payload`.
fn request_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = ((payload.len() + 9) as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&1u64.to_le_bytes());
    f.push(0);
    f.extend_from_slice(payload);
    f
}

#[test]
fn without_the_secret_nothing_is_served() {
    let (server, calls) = counting_server();
    // A client with another secret: refused, and it learns so.
    let err = Connection::connect(
        server.local_addr(),
        PROTOCOL_VERSION,
        FRAME_BYTES_MAX,
        &Secret::generate(),
    )
    .unwrap_err();
    assert!(matches!(err, NetError::Unauthenticated { .. }), "{err}");
    assert!(err.to_string().contains("cluster secret"), "{err}");
    // A raw client that skips its proof and sends a request at once: the
    // request bytes are taken for a (wrong) proof, the server refuses and
    // closes, and the handler never runs.
    let mut raw = std::net::TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(&hello()).unwrap();
    let mut reply = [0u8; 8 + 16 + 32];
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], b"RAMA");
    let _ = raw.write_all(&request_frame(b"let me in"));
    let _ = raw.write_all(&request_frame(b"and again"));
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    assert!(
        rest.len() <= 1 && rest.first().is_none_or(|&b| b == 2),
        "refusal, then closed: {rest:?}"
    );
    // A client that holds the secret is served.
    assert_eq!(
        connect(server.local_addr(), FRAME_BYTES_MAX)
            .unwrap()
            .call(b"x")
            .unwrap(),
        b"ok"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the authenticated request reached the handler"
    );
}

#[test]
fn a_client_refuses_a_server_without_the_secret() {
    // Regression: a rewritten worker registration could send clients to
    // any listener; a client now sends nothing before the server proves
    // it holds the secret.
    let impostor = Server::bind(
        "127.0.0.1:0",
        PROTOCOL_VERSION,
        &Secret::generate(),
        ServerLimits::default(),
        Arc::new(|_req: Vec<u8>| Ok(Vec::new())),
    )
    .unwrap();
    let err = connect(impostor.local_addr(), FRAME_BYTES_MAX).unwrap_err();
    assert!(
        matches!(err, NetError::Unauthenticated { why, .. } if why.contains("could not prove")),
        "{err}"
    );
}

#[test]
fn connections_above_the_cap_are_refused_and_the_server_goes_on() {
    // Regression: connections had no cap (500 idle ones took the
    // Conductor to 3,004 threads).
    let server = echo_server_with(ServerLimits {
        connections_max: 8,
        ..Default::default()
    });
    let mut open: Vec<Connection> = (0..8)
        .map(|_| connect(server.local_addr(), FRAME_BYTES_MAX).unwrap())
        .collect();
    for _ in 0..200 {
        match connect(server.local_addr(), FRAME_BYTES_MAX) {
            Err(NetError::Busy { .. }) => {}
            // The refusal raced the connection's reset: still refused.
            Err(NetError::Io { .. }) => {}
            other => panic!("a connection above the cap was taken: {other:?}"),
        }
    }
    for c in &open {
        assert_eq!(c.call(b"still").unwrap(), b"echo:still");
    }
    // A closed connection makes room.
    open.pop();
    eventually("room for a new connection", || {
        connect(server.local_addr(), FRAME_BYTES_MAX).is_ok()
    });
}

#[test]
fn idle_connections_are_closed_but_not_while_an_answer_is_owed() {
    let server = echo_server_with(ServerLimits {
        idle_timeout: Duration::from_millis(500),
        ..Default::default()
    });
    // A request that takes longer than the idle timeout is answered.
    let busy = connect(server.local_addr(), FRAME_BYTES_MAX).unwrap();
    assert_eq!(busy.call(b"sleep 1500").unwrap(), b"echo:sleep 1500");
    // A connection that sends nothing is closed.
    let idle = connect(server.local_addr(), FRAME_BYTES_MAX).unwrap();
    eventually("the idle connection to be closed", || idle.is_closed());
    // A handshake that never comes is given up on.
    let quiet = echo_server_with(ServerLimits {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let mut raw = std::net::TcpStream::connect(quiet.local_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    assert_eq!(raw.read_to_end(&mut buf).unwrap_or(0), 0, "closed without a word");
}

#[test]
fn a_handshake_sent_a_byte_at_a_time_is_cut_off_at_its_deadline() {
    // Regression (review): the handshake timeout applied to each read, so
    // a peer without the secret sending a byte every few seconds held a
    // connection slot for minutes.
    let server = echo_server_with(ServerLimits {
        handshake_timeout: Duration::from_millis(600),
        ..Default::default()
    });
    let mut raw = std::net::TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let started = Instant::now();
    let hello = hello();
    let mut closed = false;
    for b in &hello {
        if raw.write_all(std::slice::from_ref(b)).is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 8];
        if matches!(raw.read(&mut buf), Ok(0)) {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed, "the server waited {:?} for a 24-byte hello", started.elapsed());
}
