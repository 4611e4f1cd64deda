//! The network's physical limit on this machine: TCP round trips over
//! loopback between two plain blocking sockets, no framing, no protocol.
//! One connection with one message in flight gives the round trip every
//! request/response pays; several connections with pipelines (as
//! `redis-benchmark -P`) give the most messages the kernel's loopback path
//! moves with the cores there are.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::results::{ensure, new_histogram, record, BenchResult, Latency};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpLoopback {
    pub message_bytes: usize,
    /// One connection, one message in flight: round trips per second.
    pub sequential_per_sec: f64,
    /// Their latency.
    pub round_trip: Latency,
    pub connections: usize,
    /// Messages sent together per connection before their echoes are read.
    pub pipeline: usize,
    /// Echoed messages per second over `connections` x `pipeline`.
    pub pipelined_per_sec: f64,
}

/// Echoes every `message_bytes` message on `stream` until it closes.
fn echo(mut stream: TcpStream, message_bytes: usize, pipeline: usize) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; message_bytes * pipeline];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Sends `pipeline` messages, reads their echoes, until `until`; returns
/// the messages echoed and, with `hist`, records each batch's round trip.
fn drive(
    addr: std::net::SocketAddr,
    message_bytes: usize,
    pipeline: usize,
    until: Instant,
    mut hist: Option<&mut hdrhistogram::Histogram<u64>>,
) -> std::io::Result<u64> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let out: Vec<u8> = (0..message_bytes * pipeline).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; out.len()];
    let mut echoed = 0u64;
    while Instant::now() < until {
        let sent = Instant::now();
        stream.write_all(&out)?;
        stream.read_exact(&mut back)?;
        if let Some(h) = hist.as_deref_mut() {
            record(h, sent.elapsed());
        }
        if back != out {
            return Err(std::io::Error::other("the echo differs from what was sent"));
        }
        echoed += pipeline as u64;
    }
    Ok(echoed)
}

/// Measures for `duration` each: one connection with one message in flight,
/// then `connections` connections with `pipeline` messages in flight each.
pub fn loopback(
    message_bytes: usize,
    connections: usize,
    pipeline: usize,
    duration: Duration,
) -> BenchResult<TcpLoopback> {
    ensure(message_bytes > 0 && connections > 0 && pipeline > 0, || {
        "message size, connections and pipeline must be at least 1".into()
    })?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // Set when the clients are done; a connection made then wakes the
    // acceptor if it still waits (a client failed before connecting).
    let done = AtomicBool::new(false);
    std::thread::scope(|s| -> BenchResult<TcpLoopback> {
        let done = &done;
        let server = s.spawn(move || -> std::io::Result<()> {
            std::thread::scope(|inner| {
                let mut echoes = Vec::new();
                while echoes.len() < 1 + connections {
                    let (stream, _) = listener.accept()?;
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    echoes.push(inner.spawn(move || echo(stream, message_bytes, pipeline)));
                }
                for e in echoes {
                    e.join()
                        .map_err(|_| std::io::Error::other("an echo thread panicked"))??;
                }
                Ok(())
            })
        });
        let measured = (|| -> BenchResult<TcpLoopback> {
            let mut hist = new_histogram();
            let started = Instant::now();
            let sequential = drive(addr, message_bytes, 1, started + duration, Some(&mut hist))?;
            let sequential_per_sec = sequential as f64 / started.elapsed().as_secs_f64();
            let started = Instant::now();
            let until = started + duration;
            let clients: Vec<_> = (0..connections)
                .map(|_| s.spawn(move || drive(addr, message_bytes, pipeline, until, None)))
                .collect();
            let mut echoed = 0;
            for c in clients {
                echoed += c.join().map_err(|_| "a TCP client panicked")??;
            }
            Ok(TcpLoopback {
                message_bytes,
                sequential_per_sec,
                round_trip: Latency::from_histogram(&hist),
                connections,
                pipeline,
                pipelined_per_sec: echoed as f64 / started.elapsed().as_secs_f64(),
            })
        })();
        done.store(true, Ordering::SeqCst);
        // Wakes the acceptor if a client never connected; refused or
        // unneeded otherwise.
        let _ = TcpStream::connect(addr);
        let served = server.join().map_err(|_| "the echo server panicked")?;
        let r = measured?;
        served?;
        Ok(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_and_counts() {
        let r = loopback(64, 2, 4, Duration::from_millis(100)).unwrap();
        assert!(r.sequential_per_sec > 0.0 && r.pipelined_per_sec > 0.0, "{r:?}");
        assert!(r.round_trip.samples > 0 && r.round_trip.p50_us > 0.0, "{r:?}");
    }
}
