//! Crash tests with real processes, and damaged-segment recovery.
//!
//! The crash tests re-execute this test binary as a writer child (the test
//! itself, with `RAMA_CRASH_CHILD=<dir>` set). The child writes to a log or
//! store in `<dir>` and prints one `@@ack ...` line on stdout (a pipe read by
//! the parent) after every acknowledged write. The parent kills it with
//! SIGKILL at a random moment, reopens the log or store itself, and checks
//! that everything acknowledged is there and intact, that nothing is half
//! applied, and that it can write again. Several kill cycles run over the
//! same directory, so recovery of an already recovered directory is
//! exercised too.
//!
//! A SIGKILL leaves the page cache intact: these tests find logic errors in
//! recovery (torn frames, half-written segments and tables, interrupted
//! flushes and compactions), not missing `fsync`s.
//!
//! Every test prints its seed; rerun one with `RAMA_CRASH_SEED=<seed>`
//! (kill timing still varies between runs, the payloads and delays do not).

mod common;
use common::Rng;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use engine::executor::ExecutorConfig;
use engine::log::format::{self, HEADER_BYTES};
use engine::log::{Log, LogConfig, Record};
use engine::lsm::{LsmConfig, Store, WriteBatch};
use engine::Error;

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

const CHILD_ENV: &str = "RAMA_CRASH_CHILD";
const CYCLE_ENV: &str = "RAMA_CRASH_CYCLE";
const SEED_ENV: &str = "RAMA_CRASH_SEED";
/// Marks the child's acknowledgement lines; libtest's own output may share
/// a line with the first of them, so the parent looks for this marker.
const ACK: &str = "@@ack ";
const KILL_CYCLES: u32 = 10;
/// A child that outlives this is stuck (or its parent died): it exits.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

/// FNV-1a, 64 bits: the content hash in ack lines.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn mix(parts: &[u64]) -> u64 {
    let mut bytes = Vec::with_capacity(parts.len() * 8);
    for p in parts {
        bytes.extend_from_slice(&p.to_le_bytes());
    }
    fnv(&bytes)
}

/// The test's seed: `RAMA_CRASH_SEED` or the clock. Printed either way.
fn seed(test: &str) -> u64 {
    eprint!("{test}: ");
    common::seed_from_env(SEED_ENV)
}

fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    ExecutorConfig::default().block_on(fut).expect("executor starts")
}

/// Writes one line to fd 1 with a single `write(2)`: below `PIPE_BUF` it
/// reaches the pipe whole or not at all, and nothing buffers it in-process.
fn emit(line: &str) {
    let mut buf = line.as_bytes();
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid, initialised byte slice for the call.
        let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // The parent closed the pipe: nobody is listening any more.
            std::process::exit(4);
        }
        buf = &buf[n as usize..];
    }
}

/// In the child: exits if the parent never kills it (a stuck child must not
/// outlive the test run).
fn start_child_deadline() {
    std::thread::spawn(|| {
        std::thread::sleep(CHILD_DEADLINE);
        eprintln!("crash child: not killed within {CHILD_DEADLINE:?}; exiting");
        std::process::exit(3);
    });
}

fn child_env() -> Option<(PathBuf, u32, u64)> {
    let dir = std::env::var_os(CHILD_ENV)?;
    let cycle = std::env::var(CYCLE_ENV)
        .expect("child gets a cycle")
        .parse()
        .expect("cycle is a number");
    let seed = std::env::var(SEED_ENV)
        .expect("child gets a seed")
        .parse()
        .expect("seed is a number");
    Some((PathBuf::from(dir), cycle, seed))
}

/// When and how a cycle's child is killed.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// This long after its first acknowledgement.
    AfterFirstAck(Duration),
    /// This long after it was started, acknowledged or not: may hit the
    /// recovery in `open` itself.
    AfterStart(Duration),
}

impl Kill {
    fn pick(rng: &mut Rng) -> Kill {
        if rng.below(4) == 0 {
            Kill::AfterStart(Duration::from_millis(rng.range(0, 40)))
        } else {
            Kill::AfterFirstAck(Duration::from_millis(rng.range(20, 400)))
        }
    }
}

/// Runs one kill cycle: starts the child for `test` on `dir`, kills it with
/// SIGKILL as `kill` says and returns every complete acknowledgement line it
/// printed (without the marker).
fn kill_cycle(test: &str, dir: &Path, cycle: u32, seed: u64, kill: Kill) -> Vec<String> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let exe = std::env::current_exe().expect("current test binary");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(CYCLE_ENV, cycle.to_string())
        .env(SEED_ENV, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec. The child then dies with the thread that spawned it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child: Child = cmd.spawn().expect("spawn the crash child");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line cut short by the kill has no newline: dropped.
                Ok(_) if line.ends_with('\n') => {
                    if let Some(at) = line.find(ACK) {
                        if tx.send(line[at + ACK.len()..].trim_end().to_string()).is_err() {
                            break;
                        }
                    }
                }
                Ok(_) => {}
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut acks = Vec::new();
    match kill {
        Kill::AfterFirstAck(delay) => {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(first) => acks.push(first),
                Err(_) => child_failed(
                    &mut child,
                    err_reader,
                    format!("{test} cycle {cycle} (seed {seed}): the child acknowledged nothing within 30 s"),
                ),
            }
            std::thread::sleep(delay);
        }
        Kill::AfterStart(delay) => std::thread::sleep(delay),
    }
    if let Ok(Some(status)) = child.try_wait() {
        child_failed(
            &mut child,
            err_reader,
            format!("{test} cycle {cycle} (seed {seed}): the child exited on its own ({status}) before the kill"),
        );
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    reader.join().expect("stdout reader");
    acks.extend(rx.try_iter());
    let err = err_reader.join().unwrap_or_default();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{test} cycle {cycle} (seed {seed}): the child must die by SIGKILL, got {status}; stderr:\n{}",
        tail(&err, 8000)
    );
    acks
}

fn child_failed(child: &mut Child, err_reader: std::thread::JoinHandle<String>, what: String) -> ! {
    let _ = child.kill();
    let status = child.wait();
    let err = err_reader.join().unwrap_or_default();
    panic!("{what}; child status {status:?}; child stderr:\n{}", tail(&err, 8000));
}

fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

fn parse_fields<const N: usize>(line: &str, ctx: &str) -> [u64; N] {
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().unwrap_or_else(|_| panic!("{ctx}: bad ack line {line:?}")))
        .collect();
    v.try_into()
        .unwrap_or_else(|_| panic!("{ctx}: ack line {line:?} must have {N} fields"))
}

// ---------------------------------------------------------------------------
// The log under SIGKILL
// ---------------------------------------------------------------------------

const APPENDERS: u32 = 12;
/// Appender id of the records the parent appends after each reopen.
const PARENT_APPENDER: u32 = 1000;
const PAYLOAD_MAGIC: u32 = 0x5241_4D41;
/// magic u32, cycle u32, appender u32, seq u64, len u32.
const PAYLOAD_HEAD: usize = 24;
const TINY: u8 = 0xA5;

fn crash_log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 << 10,
        record_bytes_max: 8 << 10,
        pending_bytes_max: 96 << 10,
        write_bytes_max: 16 << 10,
        prewrite_bytes: 16 << 10,
        // Group writes above and below this size both occur, so both the
        // zero-filled and the growing tail are crashed into.
        prewrite_skip_bytes: 8 << 10,
        index_interval_bytes: 1 << 10,
        entries_max: None,
        sync: true,
    }
}

/// A self-describing payload of `len >= PAYLOAD_HEAD` bytes: its identity,
/// its own length, then bytes derived from all of that, so any record can be
/// verified without knowing whether it was acknowledged.
fn log_payload(seed: u64, cycle: u32, appender: u32, seq: u64, len: usize) -> Vec<u8> {
    assert!(len >= PAYLOAD_HEAD);
    let mut p = vec![0u8; len];
    p[0..4].copy_from_slice(&PAYLOAD_MAGIC.to_le_bytes());
    p[4..8].copy_from_slice(&cycle.to_le_bytes());
    p[8..12].copy_from_slice(&appender.to_le_bytes());
    p[12..20].copy_from_slice(&seq.to_le_bytes());
    p[20..24].copy_from_slice(&(len as u32).to_le_bytes());
    Rng::new(mix(&[seed, u64::from(cycle), u64::from(appender), seq, len as u64])).fill(&mut p[PAYLOAD_HEAD..]);
    p
}

/// Records shorter than the head carry no identity: they are all `TINY`.
fn tiny_payload(len: usize) -> Vec<u8> {
    vec![TINY; len]
}

/// `(cycle, appender, seq)` of an intact identified payload, `None` for an
/// intact tiny one, an error for anything else.
fn check_log_payload(seed: u64, p: &[u8]) -> Result<Option<(u32, u32, u64)>, String> {
    if p.len() < PAYLOAD_HEAD {
        return if p.iter().all(|&b| b == TINY) {
            Ok(None)
        } else {
            Err(format!("tiny record of {} bytes is not all 0x{TINY:x}: {p:?}", p.len()))
        };
    }
    let u32_at = |at: usize| u32::from_le_bytes(p[at..at + 4].try_into().expect("4 bytes"));
    if u32_at(0) != PAYLOAD_MAGIC {
        return Err("bad payload magic".into());
    }
    let (cycle, appender) = (u32_at(4), u32_at(8));
    let seq = u64::from_le_bytes(p[12..20].try_into().expect("8 bytes"));
    if u32_at(20) as usize != p.len() {
        return Err(format!("payload says {} bytes but has {}", u32_at(20), p.len()));
    }
    if p != log_payload(seed, cycle, appender, seq, p.len()).as_slice() {
        return Err(format!(
            "payload of cycle {cycle} appender {appender} seq {seq} differs from what was written"
        ));
    }
    Ok(Some((cycle, appender, seq)))
}

fn random_len(rng: &mut Rng) -> usize {
    match rng.below(20) {
        0 => rng.below(PAYLOAD_HEAD as u64) as usize, // tiny, including empty
        1 => rng.range(2000, 8 << 10) as usize,       // large, up to record_bytes_max
        _ => rng.range(PAYLOAD_HEAD as u64, 400) as usize,
    }
}

/// One appender of the child: appends forever, single records and batches,
/// and acknowledges each durable record on stdout.
async fn log_appender(log: Log, seed: u64, cycle: u32, appender: u32) {
    let mut rng = Rng::new(mix(&[seed, u64::from(cycle), u64::from(appender), 1]));
    let mut seq = 0u64;
    loop {
        let n = if rng.below(10) < 3 { rng.range(2, 7) } else { 1 };
        let mut payloads = Vec::new();
        for _ in 0..n {
            let len = random_len(&mut rng);
            if len < PAYLOAD_HEAD {
                payloads.push(tiny_payload(len));
            } else {
                payloads.push(log_payload(seed, cycle, appender, seq, len));
                seq += 1;
            }
        }
        let range = if n == 1 {
            let off = log.append(&payloads[0]).await.expect("child: append");
            off..off + 1
        } else {
            log.append_batch(payloads.iter().map(Vec::as_slice))
                .await
                .expect("child: append_batch")
        };
        assert_eq!(range.end - range.start, n, "child: batch range length");
        let mut lines = String::new();
        for (off, p) in range.zip(&payloads) {
            lines.push_str(&format!("{ACK}{off} {} {}\n", p.len(), fnv(p)));
        }
        emit(&lines);
    }
}

fn log_child(dir: &Path, cycle: u32, seed: u64) {
    start_child_deadline();
    run(async move {
        let (log, _) = Log::open(dir, crash_log_config()).await.expect("child: open log");
        // Make sure the first line of the pipe is ours alone.
        emit("\n");
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|a| glommio::spawn_local(log_appender(log.clone(), seed, cycle, a)))
            .collect();
        for t in tasks {
            t.await;
        }
    });
    unreachable!("the appenders never stop");
}

/// What the parent knows about the log between cycles.
#[derive(Default)]
struct LogModel {
    /// `(len, hash)` of every record by offset, as seen by the last
    /// verification plus the parent's own appends: all must stay.
    known: Vec<(usize, u64)>,
    /// Acknowledged records: offset -> (len, hash, cycle acked in).
    acked: BTreeMap<u64, (usize, u64, u32)>,
}

async fn read_all(log: &Log) -> Result<Vec<Record>, Error> {
    let mut out = Vec::new();
    let mut next = log.start_offset();
    let end = log.end_offset();
    while next < end {
        // A modest byte cap so reads span segments and index entries in
        // many different ways.
        let got = log.read(next, end, 64 << 10).await?;
        assert!(!got.is_empty(), "read({next}, {end}) returned nothing inside the log");
        next = got.last().expect("non-empty").offset + 1;
        out.extend(got);
    }
    Ok(out)
}

/// Reopens the log after cycle `cycle` and checks it against the model and
/// the acks of the cycle; then appends a few records itself and closes.
fn verify_log(dir: &Path, seed: u64, cycle: u32, acks: &[String], model: &mut LogModel) {
    let ctx = format!("log cycle {cycle} (seed {seed})");
    for line in acks {
        let [off, len, hash] = parse_fields::<3>(line, &ctx);
        assert!(
            off >= model.known.len() as u64,
            "{ctx}: offset {off} acknowledged again although the log already held it before this cycle \
             (the log reused an offset)"
        );
        let prev = model.acked.insert(off, (len as usize, hash, cycle));
        assert!(prev.is_none(), "{ctx}: offset {off} acknowledged twice");
    }
    run(async {
        let (log, recovery) = Log::open(dir, crash_log_config())
            .await
            .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
        assert_eq!(log.start_offset(), 0, "{ctx}: nothing is trimmed without entries_max");
        let records = read_all(&log)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: read after reopen: {e}"));
        assert_eq!(
            records.len() as u64,
            log.end_offset(),
            "{ctx}: every offset below the end is served"
        );
        let mut next_seq: HashMap<(u32, u32), u64> = HashMap::new();
        let mut last_cycle = 0u32;
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "{ctx}: offsets must be consecutive from 0");
            let id = check_log_payload(seed, &r.payload)
                .unwrap_or_else(|e| panic!("{ctx}: record {} is damaged: {e}", r.offset));
            if let Some((c, a, s)) = id {
                assert!(
                    c >= last_cycle,
                    "{ctx}: record {} of cycle {c} after a record of cycle {last_cycle}",
                    r.offset
                );
                last_cycle = c;
                let want = next_seq.entry((c, a)).or_insert(0);
                assert_eq!(
                    s, *want,
                    "{ctx}: record {} is seq {s} of cycle {c} appender {a}, expected seq {want}: \
                     an appender's records must form a gap-free prefix",
                    r.offset
                );
                *want += 1;
            }
            if let Some(&(len, hash)) = model.known.get(i) {
                assert_eq!(
                    (r.payload.len(), fnv(&r.payload)),
                    (len, hash),
                    "{ctx}: record {} changed since the previous verification",
                    r.offset
                );
            }
        }
        assert!(
            records.len() >= model.known.len(),
            "{ctx}: the log lost records that an earlier reopen had served: end {} < {}",
            records.len(),
            model.known.len()
        );
        for (&off, &(len, hash, c)) in &model.acked {
            let r = records.get(off as usize).unwrap_or_else(|| {
                panic!(
                    "{ctx}: record {off} (acknowledged in cycle {c}) is missing; the log ends at {} \
                     (recovery: {recovery:?})",
                    records.len()
                )
            });
            assert_eq!(
                (r.payload.len(), fnv(&r.payload)),
                (len, hash),
                "{ctx}: acknowledged record {off} (cycle {c}) has the wrong length or content"
            );
        }
        let unacked = records.len() - model.known.len() - acks.len();
        println!(
            "{ctx}: {} acks, log end {}, {} durable but unacknowledged, recovery {:?}",
            acks.len(),
            records.len(),
            unacked,
            recovery
        );
        model.known = records.iter().map(|r| (r.payload.len(), fnv(&r.payload))).collect();

        // The reopened log accepts appends, single and batched.
        let end = log.end_offset();
        let p0 = log_payload(seed, cycle, PARENT_APPENDER, 0, 100 + cycle as usize);
        let p1 = log_payload(seed, cycle, PARENT_APPENDER, 1, 30);
        let p2 = tiny_payload(3);
        let p3 = log_payload(seed, cycle, PARENT_APPENDER, 2, 5000);
        assert_eq!(
            log.append(&p0)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: append after reopen: {e}")),
            end
        );
        let range = log
            .append_batch([p1.as_slice(), p2.as_slice(), p3.as_slice()])
            .await
            .unwrap_or_else(|e| panic!("{ctx}: append_batch after reopen: {e}"));
        assert_eq!(
            range,
            end + 1..end + 4,
            "{ctx}: appends after reopen continue at the end"
        );
        let back = log
            .read(end, end + 4, usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: read back: {e}"));
        let back: Vec<&[u8]> = back.iter().map(|r| r.payload.as_slice()).collect();
        assert_eq!(
            back,
            [&p0[..], &p1[..], &p2[..], &p3[..]],
            "{ctx}: appended records read back"
        );
        for (i, p) in [&p0, &p1, &p2, &p3].into_iter().enumerate() {
            model.acked.insert(end + i as u64, (p.len(), fnv(p), cycle));
            model.known.push((p.len(), fnv(p)));
        }
        log.close().await.unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
    });
}

#[test]
fn log_survives_sigkill() {
    if let Some((dir, cycle, seed)) = child_env() {
        return log_child(&dir, cycle, seed);
    }
    let started = Instant::now();
    let seed = seed("log_survives_sigkill");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut model = LogModel::default();
    for cycle in 0..KILL_CYCLES {
        let kill = Kill::pick(&mut rng);
        println!("log cycle {cycle}: kill {kill:?}");
        let acks = kill_cycle("log_survives_sigkill", dir.path(), cycle, seed, kill);
        verify_log(dir.path(), seed, cycle, &acks, &mut model);
    }
    // A last reopen of the cleanly closed log.
    verify_log(dir.path(), seed, KILL_CYCLES, &[], &mut model);
    let segments = std::fs::read_dir(dir.path()).expect("list").count();
    assert!(
        segments > 2,
        "seed {seed}: the run must have rolled segments, found {segments} files"
    );
    println!(
        "log_survives_sigkill: {} records, {} acknowledged, {segments} segments, {:?}",
        model.known.len(),
        model.acked.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// The LSM store under SIGKILL
// ---------------------------------------------------------------------------

const WRITERS: u32 = 6;

fn crash_store_config() -> LsmConfig {
    common::small_store_config()
}

fn batch_prefix(cycle: u32, writer: u32, batch: u64) -> String {
    format!("c{cycle:02}/w{writer:02}/{batch:07}")
}

fn last_key(cycle: u32, writer: u32) -> String {
    format!("last/c{cycle:02}/w{writer:02}")
}

fn item_value(seed: u64, cycle: u32, writer: u32, batch: u64, item: u64) -> Vec<u8> {
    let h = mix(&[seed, u64::from(cycle), u64::from(writer), batch, item]);
    let len = if h % 16 == 0 { 1000 + h % 3000 } else { h % 300 } as usize;
    let mut v = vec![0u8; len];
    Rng::new(h).fill(&mut v);
    v
}

/// The batch `batch` of a writer: items `<prefix>/<i>` for i < k, the marker
/// `<prefix>/count` = k, `<prefix>/tmp` which the writer's next batch
/// deletes, and the writer's `last` key overwritten with the batch number.
fn writer_batch(seed: u64, cycle: u32, writer: u32, batch: u64, k: u64) -> WriteBatch {
    let prefix = batch_prefix(cycle, writer, batch);
    let mut b = WriteBatch::new();
    for i in 0..k {
        b.put(format!("{prefix}/{i:02}"), item_value(seed, cycle, writer, batch, i));
    }
    b.put(format!("{prefix}/count"), k.to_string());
    b.put(format!("{prefix}/tmp"), b"t");
    if batch > 0 {
        b.delete(format!("{}/tmp", batch_prefix(cycle, writer, batch - 1)));
    }
    b.put(last_key(cycle, writer), batch.to_string());
    b
}

async fn store_writer(store: Store, seed: u64, cycle: u32, writer: u32) {
    let mut rng = Rng::new(mix(&[seed, u64::from(cycle), u64::from(writer), 2]));
    for batch in 0u64.. {
        let k = rng.range(1, 9);
        store
            .write(writer_batch(seed, cycle, writer, batch, k))
            .await
            .expect("child: store write");
        emit(&format!("{ACK}{writer} {batch}\n"));
    }
}

fn store_child(dir: &Path, cycle: u32, seed: u64) {
    start_child_deadline();
    run(async move {
        let (store, _) = Store::open(dir, crash_store_config()).await.expect("child: open store");
        emit("\n");
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| glommio::spawn_local(store_writer(store.clone(), seed, cycle, w)))
            .collect();
        for t in tasks {
            t.await;
        }
    });
    unreachable!("the writers never stop");
}

/// What the parent knows about the store between cycles.
#[derive(Default)]
struct StoreModel {
    /// Highest acknowledged batch per (cycle, writer).
    acked: BTreeMap<(u32, u32), u64>,
    /// Batches present per (cycle, writer) at the last verification: they
    /// must all stay, and no writer of a past cycle may gain any.
    present: BTreeMap<(u32, u32), u64>,
    /// The parent's own batches: cycle -> item count.
    parent_batches: BTreeMap<u32, u64>,
}

#[derive(Default)]
struct SeenBatch {
    items: BTreeMap<u64, Vec<u8>>,
    count: Option<Vec<u8>>,
    tmp: Option<Vec<u8>>,
}

fn parse_num<T: std::str::FromStr>(s: &str, prefix: char, key: &str, ctx: &str) -> T {
    s.strip_prefix(prefix)
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("{ctx}: unexpected key {key:?}"))
}

fn verify_store(dir: &Path, seed: u64, cycle: u32, acks: &[String], model: &mut StoreModel) {
    let ctx = format!("store cycle {cycle} (seed {seed})");
    for line in acks {
        let [writer, batch] = parse_fields::<2>(line, &ctx);
        let e = model.acked.entry((cycle, writer as u32)).or_insert(batch);
        *e = (*e).max(batch);
    }
    run(async {
        let (store, recovery) = Store::open(dir, crash_store_config())
            .await
            .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
        let all = store
            .scan(Bound::Unbounded, Bound::Unbounded, false, usize::MAX)
            .unwrap_or_else(|e| panic!("{ctx}: scan after reopen: {e}"));
        let mut batches: BTreeMap<(u32, u32), BTreeMap<u64, SeenBatch>> = BTreeMap::new();
        let mut lasts: BTreeMap<(u32, u32), Vec<u8>> = BTreeMap::new();
        let mut parent: BTreeMap<u32, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
        for w in all.windows(2) {
            assert!(w[0].0 < w[1].0, "{ctx}: scan must return strictly ascending keys");
        }
        for (key, value) in &all {
            let k = std::str::from_utf8(key).unwrap_or_else(|_| panic!("{ctx}: non-UTF-8 key {key:?}"));
            let parts: Vec<&str> = k.split('/').collect();
            match parts.as_slice() {
                ["last", c, w] => {
                    lasts.insert((parse_num(c, 'c', k, &ctx), parse_num(w, 'w', k, &ctx)), value.clone());
                }
                ["p", c, i] => {
                    let i: u64 = i.parse().unwrap_or_else(|_| panic!("{ctx}: unexpected key {k:?}"));
                    parent
                        .entry(parse_num(c, 'c', k, &ctx))
                        .or_default()
                        .insert(i, value.clone());
                }
                [c, w, b, what] => {
                    let id = (parse_num(c, 'c', k, &ctx), parse_num(w, 'w', k, &ctx));
                    let b: u64 = b.parse().unwrap_or_else(|_| panic!("{ctx}: unexpected key {k:?}"));
                    let seen = batches.entry(id).or_default().entry(b).or_default();
                    match *what {
                        "count" => seen.count = Some(value.clone()),
                        "tmp" => seen.tmp = Some(value.clone()),
                        i => {
                            let i: u64 = i.parse().unwrap_or_else(|_| panic!("{ctx}: unexpected key {k:?}"));
                            seen.items.insert(i, value.clone());
                        }
                    }
                }
                _ => panic!("{ctx}: unexpected key {k:?}"),
            }
        }
        for (&(c, w), acked) in &model.acked {
            let present = batches.get(&(c, w)).map_or(0, |b| b.len() as u64);
            assert!(
                present > *acked,
                "{ctx}: batch {acked} of cycle {c} writer {w} was acknowledged but only {present} batches \
                 of that writer are present (recovery: {recovery:?})"
            );
        }
        for (&(c, w), seen) in &batches {
            let id = format!("{ctx}: cycle {c} writer {w}");
            let n = seen.len() as u64;
            // First atomicity: every batch present is whole.
            for (&b, batch) in seen {
                let at = format!("{id} batch {b}");
                let count = batch.count.as_ref().unwrap_or_else(|| {
                    panic!(
                        "{at}: partially applied: items {:?} present without the count marker",
                        batch.items.keys().collect::<Vec<_>>()
                    )
                });
                let k: u64 = std::str::from_utf8(count)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("{at}: bad count value {count:?}"));
                assert_eq!(
                    batch.items.keys().copied().collect::<Vec<_>>(),
                    (0..k).collect::<Vec<_>>(),
                    "{at}: partially applied: the count marker says {k} items"
                );
                for (&i, v) in &batch.items {
                    assert!(
                        *v == item_value(seed, c, w, b, i),
                        "{at}: item {i} has the wrong value ({} bytes)",
                        v.len()
                    );
                }
                // Point lookups agree with the scan (memtable, bloom filters, tables).
                let got = store
                    .get(format!("{}/count", batch_prefix(c, w, b)).as_bytes())
                    .unwrap_or_else(|e| panic!("{at}: get: {e}"));
                assert_eq!(got.as_ref(), Some(count), "{at}: get(count) disagrees with scan");
            }
            assert_eq!(
                seen.keys().copied().collect::<Vec<_>>(),
                (0..n).collect::<Vec<_>>(),
                "{id}: the batches present must be a gap-free prefix (each waits for the previous ack)"
            );
            if let Some(&before) = model.present.get(&(c, w)) {
                if c < cycle {
                    assert_eq!(n, before, "{id}: batches present changed after that cycle ended");
                } else {
                    assert!(n >= before, "{id}: batches present went from {before} to {n}");
                }
            }
            // Then the deletes: each batch removed its predecessor's tmp key.
            for (&b, batch) in seen {
                let at = format!("{id} batch {b}");
                let newest = b + 1 == n;
                assert_eq!(
                    batch.tmp.is_some(),
                    newest,
                    "{at}: the tmp key must exist only for the newest batch ({} of {n}): the next batch's \
                     delete is {}",
                    b,
                    if newest { "missing" } else { "lost or not applied" }
                );
                if let Some(t) = &batch.tmp {
                    assert_eq!(t, b"t", "{at}: tmp value");
                }
            }
            assert_eq!(
                lasts.get(&(c, w)).map(Vec::as_slice),
                Some((n - 1).to_string().as_bytes()),
                "{id}: the writer's last key must name its newest batch {}",
                n - 1
            );
            model.present.insert((c, w), n);
        }
        for &(c, w) in lasts.keys() {
            assert!(
                batches.contains_key(&(c, w)),
                "{ctx}: last key of cycle {c} writer {w} present without any of its batches"
            );
        }
        for (&c, &k) in &model.parent_batches {
            let items = parent
                .get(&c)
                .unwrap_or_else(|| panic!("{ctx}: the parent's batch of cycle {c} is missing"));
            assert_eq!(
                items.len() as u64,
                k,
                "{ctx}: the parent's batch of cycle {c} is partial"
            );
            for (&i, v) in items {
                assert_eq!(
                    *v,
                    item_value(seed, c, PARENT_APPENDER, 0, i),
                    "{ctx}: parent item {c}/{i}"
                );
            }
        }
        assert_eq!(
            parent.len(),
            model.parent_batches.len(),
            "{ctx}: parent batches present that were never written"
        );
        println!(
            "{ctx}: {} acks, {} keys, {} writer batches present, {} replayed, {} tables, {} leftover tables removed",
            acks.len(),
            all.len(),
            batches.values().map(|b| b.len()).sum::<usize>(),
            recovery.replayed_batches,
            store.stats().tables,
            recovery.removed_tables.len()
        );

        // The reopened store accepts writes; vary the state left behind.
        if cycle < KILL_CYCLES {
            let mut b = WriteBatch::new();
            let k = 3 + u64::from(cycle % 3);
            for i in 0..k {
                b.put(
                    format!("p/c{cycle:02}/{i}"),
                    item_value(seed, cycle, PARENT_APPENDER, 0, i),
                );
            }
            store
                .write(b)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: write after reopen: {e}"));
            model.parent_batches.insert(cycle, k);
            match cycle % 3 {
                0 => store.flush().await.unwrap_or_else(|e| panic!("{ctx}: flush: {e}")),
                1 => store
                    .compact(true)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: full compaction: {e}")),
                _ => {}
            }
        }
        store.close().await.unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
    });
}

#[test]
fn store_batches_survive_sigkill() {
    if let Some((dir, cycle, seed)) = child_env() {
        return store_child(&dir, cycle, seed);
    }
    let started = Instant::now();
    let seed = seed("store_batches_survive_sigkill");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut model = StoreModel::default();
    for cycle in 0..KILL_CYCLES {
        let kill = Kill::pick(&mut rng);
        println!("store cycle {cycle}: kill {kill:?}");
        let acks = kill_cycle("store_batches_survive_sigkill", dir.path(), cycle, seed, kill);
        verify_store(dir.path(), seed, cycle, &acks, &mut model);
    }
    verify_store(dir.path(), seed, KILL_CYCLES, &[], &mut model);
    let tables = std::fs::read_dir(dir.path())
        .expect("list")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sst"))
        })
        .count();
    assert!(tables > 0, "seed {seed}: the run must have flushed tables");
    println!(
        "store_batches_survive_sigkill: {} batches acknowledged, {tables} tables, {:?}",
        model.acked.values().map(|b| b + 1).sum::<u64>(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Damaged segments
// ---------------------------------------------------------------------------

fn damage_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 << 10,
        record_bytes_max: 2000,
        pending_bytes_max: 64 << 10,
        write_bytes_max: 4 << 10,
        prewrite_bytes: 2 << 10,
        // Always zero-fill: the damage trials rely on that layout.
        prewrite_skip_bytes: u64::MAX,
        index_interval_bytes: 512,
        entries_max: None,
        sync: true,
    }
}

/// Segments of the pristine log: the last one (the tail) is started and
/// then given a few records.
const DAMAGE_SEGMENTS: usize = 5;
const DAMAGE_TAIL_RECORDS: u64 = 4;
/// Every header byte is checked (reserved ones must be zero), so no header
/// byte is harmless to flip; kept as a bound for the trials below.
const HEADER_RESERVED_TAIL: usize = 32;

fn damage_payload(seed: u64, i: u64) -> Vec<u8> {
    let len = Rng::new(mix(&[seed, i])).range(PAYLOAD_HEAD as u64, 700) as usize;
    log_payload(seed, 0, 0, i, len)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list log dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Frame layout of a segment file: base offset, the file position of each
/// frame with its length, and the position after the last frame.
struct Layout {
    base: u64,
    frames: Vec<(usize, usize)>,
}

fn layout(bytes: &[u8]) -> Layout {
    let base = format::decode_header(bytes).expect("pristine segment header");
    let body = &bytes[HEADER_BYTES..];
    // An index entry per frame gives every frame's position.
    let config = damage_config();
    let limits = format::Limits {
        body_bytes_max: config
            .write_bytes_max
            .max(format::record_bytes(config.record_bytes_max as usize)) as u32,
        record_bytes_max: config.record_bytes_max,
    };
    let scan = format::scan(body, base, limits, 1);
    // A segment filled to segment_bytes_max may end fewer than
    // FRAME_HEAD_BYTES zero bytes after its last frame: the scan then
    // reports a truncated head (see `full_tail_reopens_without_a_torn_frame`).
    let rest = &body[scan.end_position..];
    assert!(
        scan.stop == format::ScanStop::Clean || (rest.len() < format::FRAME_HEAD_BYTES && rest.iter().all(|&b| b == 0)),
        "pristine segment scans cleanly: {:?} with {} bytes left",
        scan.stop,
        rest.len()
    );
    let mut frames = Vec::new();
    for (i, &(off, pos)) in scan.index.iter().enumerate() {
        assert_eq!(off, base + i as u64);
        let end = scan.index.get(i + 1).map_or(scan.end_position, |&(_, p)| p);
        frames.push((HEADER_BYTES + pos, end - pos));
    }
    Layout { base, frames }
}

impl Layout {
    fn data_end(&self) -> usize {
        self.frames.last().map_or(HEADER_BYTES, |&(p, l)| p + l)
    }

    /// Index of the first frame not byte-for-byte intact in `damaged`.
    fn first_bad_frame(&self, pristine: &[u8], damaged: &[u8]) -> usize {
        self.frames
            .iter()
            .position(|&(p, l)| damaged.get(p..p + l) != Some(&pristine[p..p + l]))
            .unwrap_or(self.frames.len())
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for f in segment_files(from) {
        std::fs::copy(&f, to.join(f.file_name().expect("file name"))).expect("copy segment");
    }
}

/// Reads `[0, end)` record by record and checks every payload.
async fn check_prefix(log: &Log, seed: u64, end: u64, ctx: &str) {
    assert_eq!(log.end_offset(), end, "{ctx}: log end after recovery");
    let all = log
        .read(0, u64::MAX, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
    assert_eq!(all.len() as u64, end, "{ctx}: records served after recovery");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.offset, i as u64, "{ctx}: consecutive offsets");
        assert_eq!(
            r.payload,
            damage_payload(seed, r.offset),
            "{ctx}: record {} content",
            r.offset
        );
    }
    assert!(
        log.read(end, u64::MAX, usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: read at end: {e}"))
            .is_empty(),
        "{ctx}: nothing served at or after the end"
    );
}

#[test]
fn damaged_segments_are_truncated_or_reported() {
    let seed = seed("damaged_segments_are_truncated_or_reported");
    let mut rng = Rng::new(seed);
    let root = tempfile::tempdir().expect("temp dir");
    let pristine_dir = root.path().join("pristine");
    let records = run(async {
        let (log, _) = Log::open(&pristine_dir, damage_config())
            .await
            .expect("open pristine log");
        let mut i = 0;
        // Until the tail segment exists (a record's append returns once its
        // segment is created), then a few more: a new segment holds more
        // than DAMAGE_TAIL_RECORDS records of at most 700 bytes.
        while segment_files(&pristine_dir).len() < DAMAGE_SEGMENTS {
            assert_eq!(log.append(&damage_payload(seed, i)).await.expect("append"), i);
            i += 1;
        }
        for _ in 1..DAMAGE_TAIL_RECORDS {
            assert_eq!(log.append(&damage_payload(seed, i)).await.expect("append"), i);
            i += 1;
        }
        log.close().await.expect("close");
        i
    });
    let files = segment_files(&pristine_dir);
    assert_eq!(
        files.len(),
        DAMAGE_SEGMENTS,
        "seed {seed}: segments of the pristine log"
    );
    let images: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).expect("read segment")).collect();
    let layouts: Vec<Layout> = images.iter().map(|b| layout(b)).collect();
    let total: usize = layouts.iter().map(|l| l.frames.len()).sum();
    assert_eq!(total as u64, records, "seed {seed}: frames in the pristine segments");
    let tail_i = files.len() - 1;
    let tail = &layouts[tail_i];
    assert_eq!(
        tail.frames.len() as u64,
        DAMAGE_TAIL_RECORDS,
        "seed {seed}: records in the tail segment"
    );

    // --- The tail segment: a torn tail is cut off and the rest survives;
    // damage with intact records after it is refused. ---
    let mut refused = 0;
    for trial in 0..48u32 {
        let dir = root.path().join(format!("tail-{trial}"));
        copy_dir(&pristine_dir, &dir);
        let path = dir.join(files[tail_i].file_name().expect("name"));
        let pristine = &images[tail_i];
        let mut damaged = pristine.clone();
        let data_end = tail.data_end();
        let what = match trial % 4 {
            0 | 1 => {
                // One flipped bit among the frames (or just after them).
                let at = rng.range(HEADER_BYTES as u64, (data_end + 16).min(damaged.len()) as u64) as usize;
                let bit = rng.below(8);
                damaged[at] ^= 1 << bit;
                format!("bit {bit} flipped at byte {at}")
            }
            2 => {
                // A torn write: the file ends early.
                let at = rng.range(HEADER_BYTES as u64, data_end as u64) as usize;
                damaged.truncate(at);
                format!("file torn at byte {at}")
            }
            _ => {
                // A torn write that left garbage over the end of the data.
                let at = rng.range(HEADER_BYTES as u64, data_end as u64) as usize;
                let len = rng.range(1, 600) as usize;
                let end = (at + len).min(damaged.len());
                Rng::new(mix(&[seed, u64::from(trial)])).fill(&mut damaged[at..end]);
                format!("garbage over bytes {at}..{end}")
            }
        };
        std::fs::write(&path, &damaged).expect("write damaged segment");
        let first_bad = tail.first_bad_frame(pristine, &damaged);
        let expected_end = tail.base + first_bad as u64;
        // A file torn exactly at a frame boundary looks like a clean end.
        let clean_cut = damaged.len() < pristine.len() && tail.frames.iter().any(|&(p, _)| p == damaged.len());
        let ctx = format!("seed {seed}, tail trial {trial}: {what}");
        // Intact frames after the first bad one: acknowledged records
        // behind damage. Regression: recovery once took any bad frame for a
        // torn tail and zeroed everything after it, acknowledged records
        // included, without a word.
        let intact_after = tail
            .frames
            .iter()
            .skip(first_bad + 1)
            .any(|&(p, l)| damaged.get(p..p + l) == Some(&pristine[p..p + l]));
        if intact_after {
            run(async {
                match Log::open(&dir, damage_config()).await {
                    Err(Error::Corrupt { path: p, offset, .. }) => {
                        assert_eq!(p, path, "{ctx}: Corrupt names the segment");
                        assert_eq!(offset, expected_end, "{ctx}: Corrupt names the first bad frame");
                    }
                    Err(e) => panic!("{ctx}: expected Corrupt, got {e}"),
                    Ok((log, recovery)) => panic!(
                        "{ctx}: damage before intact records was taken for a torn tail: end {}, {recovery:?}",
                        log.end_offset()
                    ),
                }
            });
            assert_eq!(
                std::fs::read(&path).expect("segment kept"),
                damaged,
                "{ctx}: nothing is changed"
            );
            refused += 1;
            continue;
        }
        run(async {
            let (log, recovery) = Log::open(&dir, damage_config())
                .await
                .unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            check_prefix(&log, seed, expected_end, &ctx).await;
            if expected_end < tail.base + tail.frames.len() as u64 && !clean_cut {
                assert!(recovery.reason.is_some(), "{ctx}: a cut tail is reported: {recovery:?}");
            }
            // The recovered log takes appends at its end, and keeps them.
            for i in expected_end..expected_end + 5 {
                assert_eq!(
                    log.append(&damage_payload(seed, i))
                        .await
                        .unwrap_or_else(|e| panic!("{ctx}: append: {e}")),
                    i,
                    "{ctx}: appends continue at the recovered end"
                );
            }
            log.close().await.unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
        });
        run(async {
            let (log, recovery) = Log::open(&dir, damage_config())
                .await
                .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
            // Only the zero bytes after a tail filled to within a frame head
            // of segment_bytes_max may be reported (and rewritten) again:
            // see `full_tail_reopens_without_a_torn_frame`.
            assert!(
                recovery.truncated_bytes < format::FRAME_HEAD_BYTES as u64,
                "{ctx}: the second reopen finds a clean tail: {recovery:?}"
            );
            check_prefix(&log, seed, expected_end + 5, &ctx).await;
            log.close().await.unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
        });
    }

    assert!(
        refused > 0 && refused < 48,
        "seed {seed}: the trials hit both torn tails and damage before intact records ({refused} refused)"
    );

    // --- A closed segment: reads of it fail loudly, others still work. ---
    for trial in 0..16u32 {
        let dir = root.path().join(format!("closed-{trial}"));
        copy_dir(&pristine_dir, &dir);
        let seg = rng.below(tail_i as u64) as usize;
        let path = dir.join(files[seg].file_name().expect("name"));
        let l = &layouts[seg];
        let pristine = &images[seg];
        let mut damaged = pristine.clone();
        // Anywhere in the header or the frames.
        let at = rng.below(l.data_end() as u64) as usize;
        let bit = rng.below(8);
        damaged[at] ^= 1 << bit;
        std::fs::write(&path, &damaged).expect("write damaged segment");
        let ctx = format!(
            "seed {seed}, closed trial {trial}: segment {} bit {bit} flipped at byte {at}",
            path.display()
        );
        // No header byte is harmless: reserved bytes must be zero.
        let harmless = (HEADER_RESERVED_TAIL..HEADER_BYTES).contains(&at);
        let (bad_offset, bad_position) = if at < HEADER_BYTES {
            (l.base, 0)
        } else {
            let k = l.first_bad_frame(pristine, &damaged);
            (l.base + k as u64, l.frames[k].0 as u64)
        };
        let seg_end = l.base + l.frames.len() as u64;
        run(async {
            let (log, recovery) = Log::open(&dir, damage_config())
                .await
                .unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            assert_eq!(recovery.truncated_bytes, 0, "{ctx}: the tail is intact: {recovery:?}");
            assert_eq!(log.end_offset(), records, "{ctx}: log end");
            for o in 0..records {
                let got = log.read(o, o + 1, usize::MAX).await;
                if (l.base..seg_end).contains(&o) && !harmless {
                    match got {
                        Err(Error::Corrupt {
                            path: p,
                            offset,
                            position,
                            reason,
                        }) => {
                            assert_eq!(p, path, "{ctx}: Corrupt names the damaged segment (read {o})");
                            assert_eq!(
                                (offset, position),
                                (bad_offset, bad_position),
                                "{ctx}: Corrupt names the damaged frame (read {o}, reason {reason})"
                            );
                        }
                        other => panic!("{ctx}: read({o}) in the damaged segment must be Corrupt, got {other:?}"),
                    }
                } else {
                    let got = got.unwrap_or_else(|e| panic!("{ctx}: read({o}) outside the damaged segment: {e}"));
                    assert_eq!(got.len(), 1, "{ctx}: read({o}) returns one record");
                    assert_eq!(got[0].offset, o, "{ctx}: read({o}) offset");
                    assert_eq!(got[0].payload, damage_payload(seed, o), "{ctx}: read({o}) content");
                }
            }
            // A read spanning the damaged segment fails as a whole, rather
            // than skipping it.
            match log.read(0, records, usize::MAX).await {
                Err(Error::Corrupt { path: p, .. }) if !harmless => {
                    assert_eq!(p, path, "{ctx}: full read names the segment")
                }
                Ok(all) if harmless => assert_eq!(all.len() as u64, records, "{ctx}: full read"),
                other => panic!("{ctx}: unexpected full read result {:?}", other.map(|r| r.len())),
            }
            // The log still takes appends: the damage is in the past.
            assert_eq!(
                log.append(b"after damage")
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: append: {e}")),
                records,
                "{ctx}: append after a damaged closed segment"
            );
            log.close().await.unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
        });
    }

    // --- The tail segment's header: refused, never silently dropped. ---
    // Regression: a flipped header bit once made `Log::open` take the tail
    // for an interrupted creation and delete it with its acknowledged
    // records. A bad header in front of data is now `Error::Corrupt`.
    for trial in 0..4u32 {
        let dir = root.path().join(format!("tail-header-{trial}"));
        copy_dir(&pristine_dir, &dir);
        let path = dir.join(files[tail_i].file_name().expect("name"));
        let mut damaged = images[tail_i].clone();
        let at = rng.below(HEADER_RESERVED_TAIL as u64) as usize;
        let bit = rng.below(8);
        damaged[at] ^= 1 << bit;
        std::fs::write(&path, &damaged).expect("write damaged segment");
        let ctx = format!("seed {seed}, tail header trial {trial}: bit {bit} flipped at byte {at}");
        run(async {
            match Log::open(&dir, damage_config()).await {
                Err(Error::Corrupt { path: p, .. }) => assert_eq!(p, path, "{ctx}: Corrupt names the segment"),
                Err(e) => panic!("{ctx}: expected Corrupt, got {e}"),
                Ok((_, recovery)) => panic!("{ctx}: opened a log whose tail header is damaged: {recovery:?}"),
            }
        });
        assert_eq!(
            std::fs::read(&path).expect("segment kept"),
            damaged,
            "{ctx}: the segment is left as it was"
        );
    }
}

/// A cleanly closed log whose tail segment is filled to within a frame head
/// of `segment_bytes_max` must reopen without reporting a torn tail.
///
/// Regression: the zero fill stops at `segment_bytes_max`, so such a
/// segment ends 1..24 bytes after its last frame, and `format::scan` once
/// reported that short remainder as a torn frame.
#[test]
fn full_tail_reopens_without_a_torn_frame() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = LogConfig {
        segment_bytes_max: 8192,
        prewrite_bytes: 2048,
        record_bytes_max: 2000,
        ..LogConfig::default()
    };
    // Appended one by one, each record is a frame: 7 frames of
    // 24 + 2 + 1000 = 1026 bytes and one of 24 + 2 + 943 = 969 end at byte
    // 32 + 7182 + 969 = 8183, 9 bytes before the end of the segment.
    let sizes = [1000, 1000, 1000, 1000, 1000, 1000, 1000, 943];
    run(async {
        let (log, _) = Log::open(dir.path(), config.clone()).await.expect("open");
        for (i, &len) in sizes.iter().enumerate() {
            assert_eq!(log.append(&vec![i as u8; len]).await.expect("append"), i as u64);
        }
        log.close().await.expect("close");
    });
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1, "all records fit in one segment");
    let bytes = std::fs::read(&files[0]).expect("read segment");
    assert_eq!(bytes.len(), 8192, "the zero fill stops at segment_bytes_max");
    run(async {
        let (log, recovery) = Log::open(dir.path(), config.clone()).await.expect("reopen");
        assert_eq!(log.end_offset(), sizes.len() as u64, "every record survives");
        assert_eq!(
            recovery,
            engine::log::Recovery::default(),
            "a cleanly closed log must reopen without a torn-tail report"
        );
        log.close().await.expect("close");
    });
}
