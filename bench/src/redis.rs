//! Redis as a baseline: a `redis-server` started and stopped (by its
//! process id) by the harness on loopback, a minimal pipelining RESP
//! client, and WordCount done the Redis way (sentences split by the
//! client, `HINCRBY` per word).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::results::{ensure, BenchResult};

/// A running `redis-server`; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub version: String,
    /// How it was started, for the report.
    pub setup: String,
    dir: PathBuf,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        control::process::stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(30));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The version line of `redis-server`, or a clear error naming the package.
pub fn installed() -> BenchResult<String> {
    for tool in ["redis-server", "redis-benchmark"] {
        ensure(
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            || format!("{tool} is not installed; install Debian's redis-server package (scripts/install-deps does)"),
        )?;
    }
    Ok(
        String::from_utf8_lossy(&Command::new("redis-server").arg("--version").output()?.stdout)
            .trim()
            .to_string(),
    )
}

impl RedisServer {
    /// Starts Redis under `dir` on a free loopback port. `appendfsync`:
    /// `None` for no persistence, else `always` or `everysec` with the
    /// append-only file on.
    pub fn start(dir: &Path, appendfsync: Option<&str>) -> BenchResult<RedisServer> {
        let version = installed()?;
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null());
        let setup = match appendfsync {
            None => {
                command.args(["--appendonly", "no"]);
                "no persistence (--save \"\" --appendonly no)".to_string()
            }
            Some(policy) => {
                command.args(["--appendonly", "yes", "--appendfsync", policy]);
                format!("append-only file, appendfsync {policy}")
            }
        };
        let server = RedisServer {
            child: command.spawn()?,
            port,
            version,
            setup,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready(port) {
            ensure(Instant::now() < deadline, || {
                "redis-server did not answer PING within 10 s".to_string()
            })?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    pub fn connect(&self) -> BenchResult<Resp> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_nodelay(true)?;
        Ok(Resp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            out: Vec::new(),
            queued: 0,
        })
    }
}

fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A reply of Redis (only the kinds these benchmarks see).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A pipelining RESP connection: `queue` commands, then `flush` and read
/// their replies in order.
#[derive(Debug)]
pub struct Resp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    out: Vec<u8>,
    queued: usize,
}

impl Resp {
    pub fn queue(&mut self, args: &[&[u8]]) {
        self.out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.queued += 1;
    }

    /// Sends the queued commands and returns their replies.
    pub fn flush(&mut self) -> BenchResult<Vec<Reply>> {
        self.writer.write_all(&self.out)?;
        self.out.clear();
        let n = std::mem::take(&mut self.queued);
        (0..n).map(|_| self.reply()).collect()
    }

    fn line(&mut self) -> BenchResult<String> {
        let mut line = String::new();
        ensure(self.reader.read_line(&mut line)? > 0, || {
            "Redis closed the connection".to_string()
        })?;
        Ok(line.trim_end_matches("\r\n").to_string())
    }

    fn reply(&mut self) -> BenchResult<Reply> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => return Err(format!("Redis answered an error: {rest}").into()),
            ":" => Reply::Int(rest.parse()?),
            "$" => {
                let len: i64 = rest.parse()?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0u8; len as usize + 2];
                    self.reader.read_exact(&mut buf)?;
                    buf.truncate(len as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            "*" => {
                let n: i64 = rest.parse()?;
                Reply::Array((0..n.max(0)).map(|_| self.reply()).collect::<BenchResult<_>>()?)
            }
            _ => return Err(format!("an unknown Redis reply: {line:?}").into()),
        })
    }
}

/// WordCount on Redis with one durability setting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisWordCount {
    pub setup: String,
    pub version: String,
    pub clients: usize,
    /// Sentences per pipeline (each sentence is one HINCRBY per word).
    pub pipeline_sentences: usize,
    pub sentences: u64,
    pub increments_per_sec: f64,
    pub seconds: f64,
}

/// Counts the words of `sentences` in a hash with `HINCRBY`, `clients`
/// connections each sending pipelines of `pipeline` sentences; checks the
/// counts of a sample of words against the reference afterwards.
pub fn wordcount(
    dir: &Path,
    appendfsync: &str,
    sentences: &[String],
    clients: usize,
    pipeline: usize,
) -> BenchResult<RedisWordCount> {
    let server = RedisServer::start(dir, Some(appendfsync))?;
    let per = sentences.len() / clients;
    let started = Instant::now();
    std::thread::scope(|s| -> BenchResult<()> {
        let handles: Vec<_> = sentences
            .chunks(per.max(1))
            .take(clients)
            .map(|chunk| {
                let server = &server;
                s.spawn(move || -> Result<(), String> {
                    let mut c = server.connect().map_err(|e| e.to_string())?;
                    for batch in chunk.chunks(pipeline) {
                        for sentence in batch {
                            for w in sentence.split(' ') {
                                c.queue(&[b"HINCRBY", b"wordCounts", w.as_bytes(), b"1"]);
                            }
                        }
                        c.flush().map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a Redis client panicked")??;
        }
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let counted = &sentences[..per * clients];
    let mut reference = std::collections::BTreeMap::new();
    let mut increments = 0u64;
    for s in counted {
        for w in s.split(' ') {
            *reference.entry(w).or_insert(0i64) += 1;
            increments += 1;
        }
    }
    let mut c = server.connect()?;
    for (w, n) in reference.iter().take(100) {
        c.queue(&[b"HGET", b"wordCounts", w.as_bytes()]);
        let got = c.flush()?;
        ensure(got == vec![Reply::Bulk(Some(n.to_string().into_bytes()))], || {
            format!("Redis counted {w} as {got:?}, expected {n}")
        })?;
    }
    Ok(RedisWordCount {
        setup: server.setup.clone(),
        version: server.version.clone(),
        clients,
        pipeline_sentences: pipeline,
        sentences: counted.len() as u64,
        increments_per_sec: increments as f64 / seconds,
        seconds,
    })
}
