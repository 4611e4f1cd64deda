//! The framed transport: pipelining, errors, version and frame limits,
//! and write batching.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use net::{Connection, NetError, Server, FRAME_BYTES_MAX, PROTOCOL_VERSION};

fn echo_server(frame_max: usize) -> Server {
    Server::bind(
        "127.0.0.1:0",
        PROTOCOL_VERSION,
        frame_max,
        Arc::new(|req: Vec<u8>| {
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
    let conn = Arc::new(Connection::connect(server.local_addr(), PROTOCOL_VERSION, FRAME_BYTES_MAX).unwrap());
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
    let conn = Connection::connect(server.local_addr(), PROTOCOL_VERSION, FRAME_BYTES_MAX).unwrap();
    match conn.call(b"fail now") {
        Err(NetError::Remote(msg)) => assert_eq!(msg, "refused fail now"),
        other => panic!("{other:?}"),
    }
    assert_eq!(conn.call(b"x").unwrap(), b"echo:x");
}

#[test]
fn version_mismatch_and_foreign_servers_are_refused() {
    let server = echo_server(FRAME_BYTES_MAX);
    match Connection::connect(server.local_addr(), PROTOCOL_VERSION + 1, FRAME_BYTES_MAX) {
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
    let err = Connection::connect(addr, PROTOCOL_VERSION, FRAME_BYTES_MAX).unwrap_err();
    assert!(matches!(err, NetError::NotRama { .. }), "{err}");
    t.join().unwrap();
}

#[test]
fn frames_above_the_cap_close_the_connection() {
    // An answer above the client's cap.
    let server = echo_server(FRAME_BYTES_MAX);
    let conn = Connection::connect(server.local_addr(), PROTOCOL_VERSION, 1 << 20).unwrap();
    let err = conn.call(b"big").unwrap_err().to_string();
    assert!(err.contains("above the limit of 1048576 bytes"), "{err}");
    assert!(
        conn.call(b"x").is_err(),
        "the connection stayed usable after a bad frame"
    );
    // A request above the server's cap.
    let small = echo_server(1 << 10);
    let conn = Connection::connect(small.local_addr(), PROTOCOL_VERSION, FRAME_BYTES_MAX).unwrap();
    assert_eq!(conn.call(b"fits").unwrap(), b"echo:fits");
    assert!(conn.call(&vec![1u8; 4 << 10]).is_err());
}
