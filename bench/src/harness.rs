//! The load harness behind `rama bench`: drives a module on an in-process
//! cluster or on a running cluster (`rama.yaml`) and reports throughput and
//! latency percentiles.
//!
//! Workloads: `wordcount` (sentences appended to WordCountModule),
//! `append` (the generic one: records of a chosen size to KvModule, keys
//! uniform or zipfian), `select` (point selects of KvModule keys, after
//! loading them), `bank` (BankTransferModule transfers between funded
//! accounts), `timeline` (TimelineModule posts fanned out to followers),
//! `query` (WordCountModule `topWords` invocations over loaded counts),
//! `range` (TimelineModule range selects: the newest posts of a timeline,
//! after loading follows and posts). `--mix` sends a weighted mix of one
//! module's operations (e.g. posts and timeline reads) and reports each
//! operation's percentiles. Closed loop (`clients` x `in_flight`, for the maximum) or
//! open loop (`rate`: sends scheduled at fixed intervals, latency counted
//! from each intended send time so a stall cannot hide; a rate the harness
//! cannot send is an error, never a number).

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use control::config::Side;
use engine::cluster::{AckLevel, ClusterClient, Depot, InProcessCluster, PStateRead, Query};
use engine::module::Module;
use engine::pstate::Nav;
use engine::value::Value;
use hdrhistogram::Histogram;
use net::manager::ClusterManager;
use serde::{Deserialize, Serialize};

use crate::results::{ensure, new_histogram, record, BenchResult, Latency};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Workload {
    WordCount,
    Append,
    Select,
    Bank,
    Timeline,
    Query,
    Range,
}

/// Every workload: its `--workload` name and the operation it runs when
/// no mix is given.
const WORKLOADS: [(&str, Workload, Op); 7] = [
    ("wordcount", Workload::WordCount, Op::Sentence),
    ("append", Workload::Append, Op::Put),
    ("select", Workload::Select, Op::Get),
    ("bank", Workload::Bank, Op::Transfer),
    ("timeline", Workload::Timeline, Op::Post),
    ("query", Workload::Query, Op::TopWords),
    ("range", Workload::Range, Op::Range),
];

impl Workload {
    pub fn parse(s: &str) -> Result<Workload, String> {
        WORKLOADS
            .iter()
            .find(|(name, _, _)| *name == s)
            .map(|&(_, w, _)| w)
            .ok_or_else(|| {
                let names: Vec<&str> = WORKLOADS.iter().map(|(name, _, _)| *name).collect();
                format!("unknown workload {s:?} (workloads: {})", names.join(", "))
            })
    }

    fn entry(self) -> &'static (&'static str, Workload, Op) {
        WORKLOADS
            .iter()
            .find(|(_, w, _)| *w == self)
            .expect("every workload is in WORKLOADS")
    }

    /// The name `--workload` takes.
    pub fn name(self) -> &'static str {
        self.entry().0
    }

    /// The operation the workload runs when no mix is given.
    pub fn op(self) -> Op {
        self.entry().2
    }

    /// The workload whose default operation is `op`.
    pub fn of(op: Op) -> Workload {
        WORKLOADS
            .iter()
            .find(|(_, _, o)| *o == op)
            .expect("every operation has a workload")
            .1
    }

    fn module(self) -> &'static str {
        self.op().module()
    }

    fn define(self) -> engine::Result<engine::module::ModuleDef> {
        match self.module() {
            "WordCountModule" => rama_examples::WordCountModule::define(),
            "KvModule" => rama_examples::KvModule::define(),
            "BankTransferModule" => rama_examples::BankTransferModule::define(),
            _ => rama_examples::TimelineModule::define(),
        }
    }
}

/// One kind of operation a run sends; a run sends a weighted mix of the
/// operations of one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Op {
    /// A sentence of ten words appended to WordCountModule's `*sentences`.
    Sentence,
    /// WordCountModule's `topWords` query (the ten most counted words).
    TopWords,
    /// A record of `--recordBytes` appended to KvModule's `*records`.
    Put,
    /// A point select of one KvModule key (the keys are loaded first).
    Get,
    /// A BankTransferModule transfer between two funded accounts.
    Transfer,
    /// A TimelineModule post, fanned out to the author's followers.
    Post,
    /// A range select: the newest `--rangeLimit` posts of one user's
    /// timeline (follows and posts are loaded first).
    Range,
}

pub const OPS: [Op; 7] = [
    Op::Sentence,
    Op::TopWords,
    Op::Put,
    Op::Get,
    Op::Transfer,
    Op::Post,
    Op::Range,
];

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Sentence => "sentence",
            Op::TopWords => "topWords",
            Op::Put => "put",
            Op::Get => "get",
            Op::Transfer => "transfer",
            Op::Post => "post",
            Op::Range => "range",
        }
    }

    pub fn module(self) -> &'static str {
        match self {
            Op::Sentence | Op::TopWords => "WordCountModule",
            Op::Put | Op::Get => "KvModule",
            Op::Transfer => "BankTransferModule",
            Op::Post | Op::Range => "TimelineModule",
        }
    }

    /// What is loaded before measuring, in order: (name, depot, records,
    /// record `k`). Operations needing the same load share it by name.
    fn setup(self, keys: u64, fanout: u64, record_bytes: usize) -> Vec<(&'static str, &'static str, u64, Loader)> {
        let follows = move || -> (&'static str, &'static str, u64, Loader) {
            (
                "follows",
                "*follows",
                keys * fanout,
                Box::new(move |k| {
                    Value::map([
                        ("follower", Value::from(format!("u{}", k.wrapping_mul(7919) % keys))),
                        ("followee", Value::from(format!("u{}", k / fanout.max(1)))),
                    ])
                }),
            )
        };
        match self {
            Op::Get => vec![(
                "records",
                "*records",
                keys,
                Box::new(move |k| {
                    Value::map([
                        ("key", Value::from(format!("k{k}"))),
                        ("value", Value::Bytes(vec![7; record_bytes])),
                    ])
                }),
            )],
            Op::Transfer => vec![(
                "deposits",
                "*deposits",
                keys,
                Box::new(|k| {
                    Value::map([
                        ("account", Value::from(format!("a{k}"))),
                        ("amount", Value::Int(1 << 40)),
                    ])
                }),
            )],
            Op::Post => vec![follows()],
            // Four posts per user: each timeline holds about 4 x fanout.
            Op::Range => vec![
                follows(),
                (
                    "posts",
                    "*posts",
                    keys * 4,
                    Box::new(move |k| {
                        Value::map([
                            ("author", Value::from(format!("u{}", k % keys))),
                            ("id", Value::Int(k as i64)),
                            ("text", Value::from("x".repeat(record_bytes.min(1000)))),
                        ])
                    }),
                ),
            ],
            Op::TopWords => vec![(
                "sentences",
                "*sentences",
                keys.min(10_000),
                Box::new(|k| Value::from(format!("w{} w{} w{}", k % 97, k % 89, k % 83))),
            )],
            Op::Sentence | Op::Put => Vec::new(),
        }
    }
}

/// Parses a mix: `op:weight,...` (e.g. `post:20,range:80`); the operations
/// must belong to one module.
pub fn parse_mix(s: &str) -> Result<Vec<(Op, u32)>, String> {
    let names = || OPS.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ");
    let mut mix: Vec<(Op, u32)> = Vec::new();
    for part in s.split(',') {
        let (name, weight) = part.split_once(':').unwrap_or((part, "1"));
        let op = OPS
            .into_iter()
            .find(|o| o.name() == name.trim())
            .ok_or_else(|| format!("--mix: unknown operation {name:?} (operations: {})", names()))?;
        let weight: u32 = weight
            .trim()
            .parse()
            .ok()
            .filter(|w| (1..=1000).contains(w))
            .ok_or_else(|| {
                format!("--mix: the weight of {name} must be a whole number from 1 to 1000, not {weight:?}")
            })?;
        if mix.iter().any(|(o, _)| *o == op) {
            return Err(format!("--mix names {name} twice"));
        }
        if let Some((first, _)) = mix.first() {
            if first.module() != op.module() {
                return Err(format!(
                    "--mix: {} is an operation of {} and {name} of {}; a run drives one module",
                    first.name(),
                    first.module(),
                    op.module()
                ));
            }
        }
        mix.push((op, weight));
    }
    Ok(mix)
}

/// The error of a run ended by [`Options::stop`].
pub const INTERRUPTED: &str =
    "interrupted: the run stopped early and nothing is reported (an in-process cluster's data is removed)";

/// Makes setup record `k`.
type Loader = Box<dyn Fn(u64) -> Value + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Skew {
    Uniform,
    /// Zipfian with this exponent (0.99 is the usual "hot keys" setting).
    Zipfian(f64),
}

impl Skew {
    pub fn parse(s: &str) -> Result<Skew, String> {
        match s {
            "uniform" => Ok(Skew::Uniform),
            "zipfian" => Ok(Skew::Zipfian(0.99)),
            _ => Err(format!("unknown key skew {s:?} (uniform or zipfian)")),
        }
    }
}

/// A running cluster, and how to find its workers.
#[derive(Debug, Clone)]
pub enum Cluster {
    /// Through the ZooKeeper servers of this `rama.yaml`.
    Config(PathBuf),
    /// Through the Conductor at this `host:port` (its admin API).
    Conductor(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub workload: Workload,
    /// Operations and their weights; empty: the workload's own operation.
    pub mix: Vec<(Op, u32)>,
    /// The cluster to drive; `None`: an in-process cluster of
    /// `tasks`/`threads` in a new directory under `dir`.
    pub cluster: Option<Cluster>,
    /// Where an in-process cluster keeps its data (removed afterwards).
    pub dir: PathBuf,
    pub tasks: u32,
    pub threads: u32,
    pub clients: usize,
    pub in_flight: usize,
    /// Open loop at this many operations per second; `None`: closed loop.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub record_bytes: usize,
    pub keys: u64,
    pub skew: Skew,
    pub ack: AckLevel,
    /// Timeline: followers of each user.
    pub fanout: u64,
    /// Range selects: posts read per timeline.
    pub range_limit: usize,
    /// A progress line on stderr every second (when it is a terminal).
    pub progress: bool,
    /// Set (by a signal handler) to end the run early: it stops sending,
    /// cleans up and reports nothing.
    pub stop: Option<&'static AtomicBool>,
}

impl Options {
    fn interrupted(&self) -> bool {
        self.stop.is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// The operations sent and their weights.
    pub fn ops(&self) -> Vec<(Op, u32)> {
        if self.mix.is_empty() {
            vec![(self.workload.op(), 1)]
        } else {
            self.mix.clone()
        }
    }

    /// Refuses settings that cannot make a meaningful run.
    pub fn check(&self) -> Result<(), String> {
        for (op, _) in &self.mix {
            if op.module() != self.workload.module() {
                return Err(format!(
                    "--mix: {} is an operation of {}; workload {:?} drives {}",
                    op.name(),
                    op.module(),
                    self.workload,
                    self.workload.module()
                ));
            }
        }
        let timeline = self.ops().iter().any(|(o, _)| matches!(o, Op::Post | Op::Range));
        if !(1..=1000).contains(&self.range_limit) {
            return Err(format!("--rangeLimit {}: from 1 to 1000", self.range_limit));
        }
        if self.clients == 0 || self.clients > 1024 {
            return Err(format!("--clients {}: from 1 to 1024", self.clients));
        }
        if self.in_flight == 0 || self.in_flight > 4096 {
            return Err(format!("--inFlight {}: from 1 to 4096", self.in_flight));
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(24 * 3600) {
            return Err("--seconds: more than 0, at most a day".into());
        }
        if self.keys == 0 || (matches!(self.skew, Skew::Zipfian(_)) && self.keys > 10_000_000) {
            return Err(format!(
                "--keys {}: at least 1 (at most 10,000,000 with zipfian)",
                self.keys
            ));
        }
        if timeline && !(1..=1000).contains(&self.fanout) {
            return Err(format!("--fanout {}: from 1 to 1000", self.fanout));
        }
        if timeline && self.keys.saturating_mul(self.fanout) > 10_000_000 {
            return Err(format!(
                "--keys {} x --fanout {}: the follows loaded first would be more than 10,000,000",
                self.keys, self.fanout
            ));
        }
        if self.ops().iter().any(|(o, _)| *o == Op::Range)
            && self.keys.saturating_mul(4).saturating_mul(self.fanout) > 40_000_000
        {
            return Err(format!(
                "--keys {} x 4 posts x --fanout {}: the timeline entries loaded first would be more than 40,000,000",
                self.keys, self.fanout
            ));
        }
        if self.record_bytes > 1 << 20 {
            return Err(format!("--recordBytes {}: at most 1 MiB", self.record_bytes));
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!("--rate {r}: a positive number of operations per second"));
            }
        }
        Ok(())
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub workload: Workload,
    pub module: String,
    /// `in-process (tasks 8, threads 2)` or the cluster's rama.yaml.
    pub target: String,
    /// `closed` or `open`.
    pub mode: String,
    pub clients: usize,
    pub in_flight: usize,
    pub offered_per_sec: Option<f64>,
    pub record_bytes: usize,
    pub keys: u64,
    pub skew: Skew,
    pub ack: String,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub ops_per_sec: f64,
    /// Every operation together.
    pub latency: Latency,
    /// Each operation of the mix on its own.
    pub operations: Vec<OpReport>,
    /// CPU and memory of the processes serving the module during the run.
    pub processes: Vec<crate::procstat::ProcessUse>,
    /// Their CPU time per operation, in microseconds (`None` when they run
    /// on other machines).
    pub cpu_us_per_op: Option<f64>,
    /// Why `processes` is empty, when it is.
    pub processes_note: Option<String>,
}

/// What one operation of a mix measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpReport {
    pub op: Op,
    pub weight: u32,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub latency: Latency,
}

/// An operation under way; its answer (nil for appends).
type Pending = Pin<Box<dyn Future<Output = engine::Result<Value>> + Send>>;

/// Starts operations of a workload.
trait Target: Sync {
    fn start(&self, op: &Value) -> engine::Result<Pending>;
}

struct Appends(Box<dyn Depot>, AckLevel);

impl Target for Appends {
    fn start(&self, record: &Value) -> engine::Result<Pending> {
        let f = self.0.append_future(record, self.1)?;
        Ok(Box::pin(async move { f.await.map(|_| Value::Nil) }))
    }
}

/// Selects of `[key(k)] + path` (the path after the key).
struct Selects(Box<dyn PStateRead>, Vec<Nav>);

impl Target for Selects {
    fn start(&self, key: &Value) -> engine::Result<Pending> {
        let mut path = Vec::with_capacity(1 + self.1.len());
        path.push(Nav::Key(key.clone()));
        path.extend(self.1.iter().cloned());
        let f = self.0.select_future(&path)?;
        Ok(Box::pin(async move { f.await.map(Value::List) }))
    }
}

struct Invokes(Box<dyn Query>);

impl Target for Invokes {
    fn start(&self, args: &Value) -> engine::Result<Pending> {
        self.0.invoke_future(args)
    }
}

/// Keys (and sentences) for operation `i` of one client.
struct Generator {
    state: u64,
    keys: u64,
    /// Zipfian: cumulative probabilities of ranks 0..keys.
    cdf: Option<std::sync::Arc<Vec<f64>>>,
    value: Vec<u8>,
    /// Operations made so far (ids of transfers and posts).
    made: u64,
    /// Ids are `id_base + made`, distinct per client.
    id_base: u64,
}

impl Generator {
    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn key(&mut self) -> u64 {
        let x = self.next_u64();
        match &self.cdf {
            None => x % self.keys,
            Some(cdf) => {
                let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                cdf.partition_point(|&p| p < u).min(cdf.len() - 1) as u64
            }
        }
    }

    /// Picks an operation of `ops` by weight (`total`: their sum).
    fn pick(&mut self, ops: &[(Op, u32)], total: u64) -> usize {
        if ops.len() == 1 {
            return 0;
        }
        let mut x = self.next_u64() % total;
        for (i, (_, w)) in ops.iter().enumerate() {
            if x < u64::from(*w) {
                return i;
            }
            x -= u64::from(*w);
        }
        ops.len() - 1
    }

    fn op(&mut self, op: Op) -> Value {
        self.made += 1;
        let id = (self.id_base + self.made) as i64;
        match op {
            Op::Transfer => Value::map([
                ("id", Value::Int(id)),
                ("from", Value::from(format!("a{}", self.key()))),
                ("to", Value::from(format!("a{}", self.key()))),
                ("amount", Value::Int(1)),
            ]),
            Op::Post => Value::map([
                ("author", Value::from(format!("u{}", self.key()))),
                ("id", Value::Int(id)),
                ("text", Value::from("x".repeat(self.value.len()))),
            ]),
            Op::TopWords => Value::Int(10),
            Op::Sentence => {
                let words: Vec<String> = (0..10).map(|_| format!("w{}", self.key())).collect();
                Value::from(words.join(" "))
            }
            Op::Put => Value::map([
                ("key", Value::from(format!("k{}", self.key()))),
                ("value", Value::Bytes(self.value.clone())),
            ]),
            Op::Get => Value::from(format!("k{}", self.key())),
            Op::Range => Value::from(format!("u{}", self.key())),
        }
    }
}

fn zipf_cdf(keys: u64, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(keys as usize);
    let mut sum = 0.0;
    for k in 1..=keys {
        sum += 1.0 / (k as f64).powf(s);
        cdf.push(sum);
    }
    for p in &mut cdf {
        *p /= sum;
    }
    cdf
}

/// Counters the progress line shows.
struct Live {
    done: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Per operation of the mix: (done, errors).
    per_op: Vec<(AtomicU64, AtomicU64)>,
}

impl Live {
    fn new(ops: usize) -> Live {
        Live {
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            per_op: (0..ops).map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect(),
        }
    }

    fn finished(&self, op: usize, r: engine::Result<Value>) {
        self.done.fetch_add(1, Ordering::Relaxed);
        self.per_op[op].0.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.per_op[op].1.fetch_add(1, Ordering::Relaxed);
            self.first_error
                .lock()
                .expect("first error")
                .get_or_insert(e.to_string());
        }
    }
}

fn progress(live: &Live, stop: &AtomicBool, started: Instant) {
    let mut last = (0u64, started);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if last.1.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let done = live.done.load(Ordering::Relaxed);
        let rate = (done - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (done, Instant::now());
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r  {:>4.0} s  {done:>10} ops  {rate:>10.0} ops/s  {} errors   ",
            started.elapsed().as_secs_f64(),
            live.errors.load(Ordering::Relaxed)
        );
        let _ = err.flush();
    }
    let _ = writeln!(std::io::stderr());
}

/// One latency histogram per operation of the mix.
type Histograms = Vec<Histogram<u64>>;

fn histograms(n: usize) -> Histograms {
    (0..n).map(|_| new_histogram()).collect()
}

fn add_all(into: &mut Histograms, from: Histograms) -> BenchResult<()> {
    for (a, b) in into.iter_mut().zip(from) {
        a.add(b)?;
    }
    Ok(())
}

/// The operations of a run: their targets and weights.
struct Mix<'c> {
    ops: Vec<(Op, u32)>,
    total: u64,
    targets: Vec<Box<dyn Target + 'c>>,
}

fn closed_loop(o: &Options, mix: &Mix<'_>, gens: Vec<Generator>, live: &Live) -> BenchResult<Histograms> {
    let deadline = Instant::now() + o.duration;
    std::thread::scope(|s| {
        let handles: Vec<_> = gens
            .into_iter()
            .map(|mut gen| {
                s.spawn(move || -> Result<Histograms, String> {
                    let mut hists = histograms(mix.ops.len());
                    let mut window: std::collections::VecDeque<(Instant, usize, Pending)> =
                        std::collections::VecDeque::with_capacity(o.in_flight);
                    while Instant::now() < deadline && !o.interrupted() {
                        if window.len() == o.in_flight {
                            let (sent, i, f) = window.pop_front().expect("full");
                            live.finished(i, futures_lite::future::block_on(f));
                            record(&mut hists[i], sent.elapsed());
                        }
                        let i = gen.pick(&mix.ops, mix.total);
                        let op = gen.op(mix.ops[i].0);
                        let sent = Instant::now();
                        let f = mix.targets[i].start(&op).map_err(|e| e.to_string())?;
                        window.push_back((sent, i, f));
                    }
                    for (sent, i, f) in window {
                        live.finished(i, futures_lite::future::block_on(f));
                        record(&mut hists[i], sent.elapsed());
                    }
                    Ok(hists)
                })
            })
            .collect();
        let mut all = histograms(mix.ops.len());
        for h in handles {
            add_all(&mut all, h.join().map_err(|_| "a client thread panicked")??)?;
        }
        Ok(all)
    })
}

fn open_loop(o: &Options, rate: f64, mix: &Mix<'_>, mut gen: Generator, live: &Live) -> BenchResult<Histograms> {
    let count = ((rate * o.duration.as_secs_f64()) as u64).max(1);
    let interval = Duration::from_secs_f64(1.0 / rate);
    // Bounded: when answers lag this far behind, the sender waits, falls
    // behind its schedule and the run says so.
    let (tx, rx) = flume::bounded::<(Instant, usize, Pending)>(o.clients * o.in_flight);
    std::thread::scope(|s| {
        let collectors: Vec<_> = (0..o.clients.clamp(1, 8))
            .map(|_| {
                let rx = rx.clone();
                s.spawn(move || {
                    let mut hists = histograms(mix.ops.len());
                    for (intended, i, f) in rx {
                        live.finished(i, futures_lite::future::block_on(f));
                        record(&mut hists[i], intended.elapsed());
                    }
                    hists
                })
            })
            .collect();
        drop(rx);
        let started = Instant::now();
        // Late sends tolerated: 1% of the run (at least 100, for short
        // runs on a busy machine).
        let late_max = (count / 100).max(100);
        let mut late = 0u64;
        let mut sent = 0u64;
        for n in 0..count {
            if o.interrupted() {
                break;
            }
            let intended = started + interval.mul_f64(n as f64);
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            } else if now - intended > Duration::from_millis(10) {
                late += 1;
                if late > late_max {
                    // Far behind already: the rest would only measure the
                    // harness's own queue.
                    break;
                }
            }
            let i = gen.pick(&mix.ops, mix.total);
            let op = gen.op(mix.ops[i].0);
            let f = mix.targets[i].start(&op)?;
            if tx.send((intended, i, f)).is_err() {
                break;
            }
            sent += 1;
        }
        drop(tx);
        let mut all = histograms(mix.ops.len());
        for c in collectors {
            add_all(&mut all, c.join().map_err(|_| "a collector panicked")?)?;
        }
        ensure(late <= late_max, || {
            format!(
                "the harness could not send {rate:.0} ops/s: {late} of {sent} sends were more than 10 ms behind \
                 schedule (the cluster is slower than that, or this machine cannot generate it); no rate is \
                 reported. Lower --rate, or use the closed loop for the maximum"
            )
        })?;
        Ok(all)
    })
}

fn generators(o: &Options) -> Vec<Generator> {
    let cdf = match o.skew {
        Skew::Uniform => None,
        Skew::Zipfian(s) => Some(std::sync::Arc::new(zipf_cdf(o.keys, s))),
    };
    (0..o.clients.max(1))
        .map(|c| Generator {
            state: 0x9E37_79B9_7F4A_7C15 ^ ((c as u64 + 1) << 32),
            keys: o.keys,
            cdf: cdf.clone(),
            value: (0..o.record_bytes).map(|i| i as u8).collect(),
            made: 0,
            id_base: (c as u64 + 1) << 40,
        })
        .collect()
}

/// Loads what the workload reads or needs (keys, accounts, follows),
/// closed loop, `Ack`.
fn load(o: &Options, target: &dyn Target, count: u64, make: &Loader) -> BenchResult<()> {
    let live = Live::new(1);
    let per = count.div_ceil(4);
    std::thread::scope(|s| -> BenchResult<()> {
        let handles: Vec<_> = (0..4u64)
            .map(|c| {
                let live = &live;
                s.spawn(move || -> Result<(), String> {
                    let mut window = std::collections::VecDeque::new();
                    for k in (c * per)..((c + 1) * per).min(count) {
                        if o.interrupted() {
                            break;
                        }
                        if window.len() == 256 {
                            let f: Pending = window.pop_front().expect("full");
                            live.finished(0, futures_lite::future::block_on(f));
                        }
                        window.push_back(target.start(&make(k)).map_err(|e| e.to_string())?);
                    }
                    for f in window {
                        live.finished(0, futures_lite::future::block_on(f));
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a loader panicked")??;
        }
        Ok(())
    })?;
    let errors = live.errors.load(Ordering::Relaxed);
    ensure(errors == 0, || {
        format!(
            "loading failed {errors} times: {}",
            live.first_error
                .lock()
                .expect("first error")
                .clone()
                .unwrap_or_default()
        )
    })
}

/// What one measured run returns: latencies per operation, the counters,
/// seconds.
type Measured = (Histograms, Live, f64);

fn measure(o: &Options, mix: &Mix<'_>) -> BenchResult<Measured> {
    let live = Live::new(mix.ops.len());
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let show = o.progress && std::io::stderr().is_terminal();
    let hist = std::thread::scope(|s| {
        if show {
            s.spawn(|| progress(&live, &stop, started));
        }
        let hist = match o.rate {
            None => closed_loop(o, mix, generators(o), &live),
            Some(rate) => open_loop(o, rate, mix, generators(o).remove(0), &live),
        };
        stop.store(true, Ordering::Relaxed);
        hist
    })?;
    Ok((hist, live, started.elapsed().as_secs_f64()))
}

/// Where a run goes: the target, the processes serving it, and its shape.
struct Setup {
    processes: Vec<(u32, String)>,
    name: String,
    /// Task threads serving the module, and the machines they run on.
    threads: u32,
    nodes: usize,
}

/// Makes the targets of a workload from a cluster's clients, in-process
/// or remote (one trait family: `engine::cluster::ClusterClient`).
fn appends(c: &dyn ClusterClient, module: &str, depot: &str, ack: AckLevel) -> BenchResult<Box<dyn Target>> {
    Ok(Box::new(Appends(c.depot(module, depot)?, ack)))
}

fn selects(c: &dyn ClusterClient, module: &str, pstate: &str, then: Vec<Nav>) -> BenchResult<Box<dyn Target>> {
    Ok(Box::new(Selects(c.pstate(module, pstate)?, then)))
}

fn invokes(c: &dyn ClusterClient, module: &str, query: &str) -> BenchResult<Box<dyn Target>> {
    Ok(Box::new(Invokes(c.query(module, query)?)))
}

/// Loads what the mix's operations need (each load once) and makes their
/// targets.
fn prepare<'c>(o: &Options, clients: &'c dyn ClusterClient) -> BenchResult<Mix<'c>> {
    let module = o.workload.module();
    let ops = o.ops();
    let mut loaded: Vec<&str> = Vec::new();
    for (op, _) in &ops {
        for (name, depot, count, make) in op.setup(o.keys, o.fanout, o.record_bytes) {
            if !loaded.contains(&name) {
                load(
                    o,
                    appends(clients, module, depot, AckLevel::Ack)?.as_ref(),
                    count,
                    &make,
                )?;
                ensure(!o.interrupted(), || INTERRUPTED.to_string())?;
                loaded.push(name);
            }
        }
    }
    let targets = ops
        .iter()
        .map(|(op, _)| match op {
            Op::Sentence => appends(clients, module, "*sentences", o.ack),
            Op::Put => appends(clients, module, "*records", o.ack),
            Op::Transfer => appends(clients, module, "*transfers", o.ack),
            Op::Post => appends(clients, module, "*posts", o.ack),
            Op::Get => selects(clients, module, "$$kv", Vec::new()),
            Op::Range => selects(clients, module, "$$timelines", vec![Nav::last(o.range_limit)]),
            Op::TopWords => invokes(clients, module, "topWords"),
        })
        .collect::<BenchResult<Vec<_>>>()?;
    // The loaded data must be visible before reads of it are measured.
    for ((op, _), target) in ops.iter().zip(&targets) {
        let probe = match op {
            Op::Get => Value::from("k0"),
            Op::Range => Value::from("u0"),
            Op::TopWords => Value::Int(10),
            _ => continue,
        };
        let answer = futures_lite::future::block_on(target.start(&probe)?)?;
        ensure(!empty(&answer), || {
            format!(
                "{}: the data loaded first is not visible ({probe} read {answer})",
                op.name()
            )
        })?;
    }
    Ok(Mix {
        total: ops.iter().map(|(_, w)| u64::from(*w)).sum(),
        ops,
        targets,
    })
}

/// Nil, or only empty containers.
fn empty(v: &Value) -> bool {
    match v {
        Value::Nil => true,
        Value::List(l) => l.iter().all(empty),
        Value::Map(m) => m.is_empty(),
        Value::Set(s) => s.is_empty(),
        _ => false,
    }
}

/// Sets up the workload's target (an in-process cluster, or clients of the
/// cluster of rama.yaml), loads what it needs, and runs `f` on it.
fn with_target<R>(o: &Options, f: impl FnOnce(&Mix<'_>, &Setup) -> BenchResult<R>) -> BenchResult<R> {
    o.check()?;
    let module = o.workload.module();
    match &o.cluster {
        None => {
            let dir = o.dir.join(format!("rama-bench-{}", std::process::id()));
            let mut cluster = InProcessCluster::new(&dir);
            let launched = o
                .workload
                .define()
                .and_then(|def| cluster.launch(def, o.tasks, o.threads));
            if let Err(e) = launched {
                let _ = cluster.shutdown();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
            let setup = Setup {
                processes: vec![(
                    std::process::id(),
                    "this process (the cluster and the clients)".to_string(),
                )],
                name: format!("in-process (tasks {}, threads {})", o.tasks, o.threads),
                threads: o.threads,
                nodes: 1,
            };
            let result = prepare(o, &cluster).and_then(|mix| f(&mix, &setup));
            let stopped = cluster.shutdown();
            let _ = std::fs::remove_dir_all(&dir);
            stopped?;
            result
        }
        Some(cluster) => {
            let (manager, name) = match cluster {
                Cluster::Config(config) => (
                    ClusterManager::open_with(Some(config), &[], Side::External)?,
                    format!("the cluster of {}", config.display()),
                ),
                Cluster::Conductor(addr) => (
                    // The secret of the local configuration
                    // (cluster.secret.file of ./rama.yaml or $RAMA_CONFIG).
                    ClusterManager::via_conductor(
                        addr,
                        &net::manager::load_secret(&net::manager::load_config(None, &[])?)?,
                    )?,
                    format!("the cluster of the Conductor at {addr}"),
                ),
            };
            let registered = manager.workers(module)?;
            // The workers' processes, when they run on this machine.
            let processes: Vec<(u32, String)> = registered
                .iter()
                .filter_map(|w| {
                    let port = w.address.rsplit(':').next()?.parse().ok()?;
                    let pid = crate::procstat::listener_pid(port)?;
                    Some((pid, format!("worker {} at {}", w.worker, w.address)))
                })
                .collect();
            let mut hosts: Vec<&str> = registered
                .iter()
                .filter_map(|w| w.address.rsplit_once(':').map(|(h, _)| h))
                .collect();
            hosts.sort_unstable();
            hosts.dedup();
            let setup = Setup {
                processes,
                name,
                threads: registered.first().map_or(1, |w| w.threads),
                nodes: hosts.len().max(1),
            };
            let mix = prepare(o, &manager)?;
            f(&mix, &setup)
        }
    }
}

/// One measured run on a set-up target.
fn report(o: &Options, mix: &Mix<'_>, setup: &Setup) -> BenchResult<Report> {
    let watch = crate::procstat::Watch::start(setup.processes.clone());
    let (hists, live, seconds) = measure(o, mix)?;
    ensure(!o.interrupted(), || INTERRUPTED.to_string())?;
    let ops = live.done.load(Ordering::Relaxed);
    let errors = live.errors.load(Ordering::Relaxed);
    let first_error = live.first_error.lock().expect("first error").clone();
    let mut hist = new_histogram();
    for h in &hists {
        hist.add(h)?;
    }
    let operations = mix
        .ops
        .iter()
        .zip(&hists)
        .zip(&live.per_op)
        .map(|(((op, weight), h), (done, errs))| OpReport {
            op: *op,
            weight: *weight,
            ops: done.load(Ordering::Relaxed),
            errors: errs.load(Ordering::Relaxed),
            ops_per_sec: done.load(Ordering::Relaxed) as f64 / seconds,
            latency: Latency::from_histogram(h),
        })
        .collect();
    let processes = watch.finish();
    let cpu: f64 = processes.iter().map(|p| p.cpu_seconds).sum();
    let processes_note = processes
        .is_empty()
        .then(|| "the module's workers do not run on this machine; their CPU and memory are not measured".to_string());
    Ok(Report {
        workload: o.workload,
        module: o.workload.module().to_string(),
        target: setup.name.clone(),
        mode: if o.rate.is_some() { "open" } else { "closed" }.into(),
        clients: o.clients,
        in_flight: o.in_flight,
        offered_per_sec: o.rate,
        record_bytes: o.record_bytes,
        keys: o.keys,
        skew: o.skew,
        ack: format!("{:?}", o.ack),
        ops,
        errors,
        first_error,
        seconds,
        ops_per_sec: ops as f64 / seconds,
        latency: Latency::from_histogram(&hist),
        operations,
        cpu_us_per_op: (!processes.is_empty() && ops > 0).then(|| cpu / ops as f64 * 1e6),
        processes,
        processes_note,
    })
}

/// Runs the workload and reports what it measured.
pub fn run(o: &Options) -> BenchResult<Report> {
    with_target(o, |mix, setup| report(o, mix, setup))
}

/// A capacity sweep: the offered load raised step by step until p99
/// passes the bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sweep {
    pub p99_bound_ms: f64,
    /// The closed-loop maximum the sweep started from.
    pub closed_loop_max_per_sec: f64,
    pub steps: Vec<Report>,
    /// The highest offered rate whose p99 stayed within the bound, with no
    /// errors (0 when even the first step passed it).
    pub max_sustainable_per_sec: f64,
    pub threads: u32,
    pub nodes: usize,
    pub per_thread_per_sec: f64,
    pub per_node_per_sec: f64,
}

/// Measures the closed-loop maximum, then offers 10%, 20%, ... of it (open
/// loop, `o.duration` per step) until a step's p99 passes `p99_bound`, it
/// has errors, or the harness cannot send the rate; below 10% when even
/// that step passed the bound; then bisects twice between the last rate
/// within the bound and the first past it.
pub fn sweep(o: &Options, p99_bound: Duration) -> BenchResult<Sweep> {
    with_target(o, |mix, setup| {
        let closed = Options {
            rate: None,
            progress: false,
            ..o.clone()
        };
        let max = report(&closed, mix, setup)?.ops_per_sec;
        ensure(max > 0.0, || "the closed loop completed no operation".to_string())?;
        let bound_us = p99_bound.as_secs_f64() * 1e6;
        let mut steps = Vec::new();
        // One open-loop step: `Some(within the bound)`, `None` when the
        // harness cannot send the rate.
        let step = |rate: f64, steps: &mut Vec<Report>| -> BenchResult<Option<bool>> {
            ensure(!o.interrupted(), || INTERRUPTED.to_string())?;
            let open = Options {
                rate: Some(rate),
                ..o.clone()
            };
            let step = match report(&open, mix, setup) {
                Ok(r) => r,
                Err(e) if e.to_string().contains("could not send") => return Ok(None),
                Err(e) => return Err(e),
            };
            let ok = step.errors == 0 && step.latency.p99_us <= bound_us;
            if o.progress {
                let _ = writeln!(
                    std::io::stderr(),
                    "  offered {rate:.0}/s: p99 {:.3} ms, {} errors{}",
                    step.latency.p99_us / 1000.0,
                    step.errors,
                    if ok { "" } else { " (past the bound)" }
                );
            }
            steps.push(step);
            Ok(Some(ok))
        };
        // Steps of 10% of the maximum until one passes the bound...
        let (mut sustained, mut failed) = (0.0, None);
        for tenth in 1..=12u32 {
            let rate = max * f64::from(tenth) / 10.0;
            match step(rate, &mut steps)? {
                Some(true) => sustained = rate,
                Some(false) => {
                    failed = Some(rate);
                    break;
                }
                None => break,
            }
        }
        // ...below 10% when even that passed it (halving, three times)...
        if sustained == 0.0 {
            let mut rate = max / 10.0;
            for _ in 0..3 {
                rate /= 2.0;
                if step(rate, &mut steps)? == Some(true) {
                    sustained = rate;
                    break;
                }
                failed = Some(rate);
            }
        }
        // ...then two bisections between the last rate within the bound
        // and the first past it, for a closer figure.
        if let Some(mut hi) = failed.filter(|_| sustained > 0.0) {
            for _ in 0..2 {
                let mid = (sustained + hi) / 2.0;
                match step(mid, &mut steps)? {
                    Some(true) => sustained = mid,
                    _ => hi = mid,
                }
            }
        }
        steps.sort_by(|a, b| {
            a.offered_per_sec
                .unwrap_or(0.0)
                .total_cmp(&b.offered_per_sec.unwrap_or(0.0))
        });
        ensure(!o.interrupted(), || INTERRUPTED.to_string())?;
        Ok(Sweep {
            p99_bound_ms: p99_bound.as_secs_f64() * 1000.0,
            closed_loop_max_per_sec: max,
            steps,
            max_sustainable_per_sec: sustained,
            threads: setup.threads,
            nodes: setup.nodes,
            per_thread_per_sec: sustained / f64::from(setup.threads.max(1)),
            per_node_per_sec: sustained / setup.nodes.max(1) as f64,
        })
    })
}

/// What a target rate needs, from a sweep, with the assumptions it rests on.
pub fn estimate(s: &Sweep, target_per_sec: f64, threads_per_node: u32) -> String {
    if s.per_thread_per_sec <= 0.0 {
        return "no step stayed within the latency bound, so there is nothing to scale from".into();
    }
    let threads = (target_per_sec / s.per_thread_per_sec).ceil().max(1.0) as u64;
    let nodes = threads.div_ceil(u64::from(threads_per_node.max(1)));
    format!(
        "for {target_per_sec:.0} ops/s with p99 within {:.1} ms: {threads} task threads, on {nodes} nodes of \
         {threads_per_node} task threads each (one worker per node), tasks a power of two of at least {}.\n\
         assumptions: throughput scales linearly with task threads (measured {:.0} ops/s per thread at the \
         bound); nodes like this machine; the workload as measured (record size, keys, skew, ack level); \
         keys spread evenly over tasks; replication not counted (it does not exist yet).",
        s.p99_bound_ms,
        threads.next_power_of_two(),
        s.per_thread_per_sec
    )
}

/// The report as a few lines for a terminal.
pub fn summary(r: &Report) -> String {
    format!(
        "{:?} on {} ({} loop{}): {} ops in {:.1} s = {:.0} ops/s, {} errors\n\
         latency: {}{}",
        r.workload,
        r.target,
        r.mode,
        r.offered_per_sec
            .map(|x| format!(" at {x:.0} ops/s"))
            .unwrap_or_default(),
        r.ops,
        r.seconds,
        r.ops_per_sec,
        r.errors,
        r.latency.line(),
        r.first_error
            .as_ref()
            .map(|e| format!("\nfirst error: {e}"))
            .unwrap_or_default()
    ) + &per_op(r)
        + &cost(r)
}

/// One line per operation, when the run mixed several.
fn per_op(r: &Report) -> String {
    if r.operations.len() < 2 {
        return String::new();
    }
    r.operations
        .iter()
        .map(|o| {
            format!(
                "\n  {} (weight {}): {:.0} ops/s, {} errors; {}",
                o.op.name(),
                o.weight,
                o.ops_per_sec,
                o.errors,
                o.latency.line()
            )
        })
        .collect()
}

fn cost(r: &Report) -> String {
    let mut out = String::new();
    for p in &r.processes {
        out += &format!(
            "\n{} (pid {}): {:.2} cores, {:.1} MB resident (peak {:.1} MB)",
            p.role,
            p.pid,
            p.cores,
            p.rss_bytes as f64 / 1e6,
            p.peak_rss_bytes as f64 / 1e6
        );
    }
    match (r.cpu_us_per_op, &r.processes_note) {
        (Some(us), _) => out += &format!("\ncost: {us:.1} µs of CPU per operation"),
        (None, Some(note)) => out += &format!("\n{note}"),
        _ => {}
    }
    out
}

/// The harness's part of the BENCHMARKS.md record: every workload and a
/// mix, in-process, then a capacity sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub runs: Vec<RecordedRun>,
    pub sweep: Sweep,
    /// The sweep's `rama bench` flags.
    pub sweep_command: String,
    /// The estimate printed for `estimate_rate` from the sweep.
    pub estimate_rate: f64,
    pub estimate: String,
}

/// One run of the record and the `rama bench` flags that make it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRun {
    pub command: String,
    pub report: Report,
}

/// Runs the record's workloads in-process under `dir`: `seconds` each.
pub fn record_runs(dir: &std::path::Path, quick: bool) -> BenchResult<Record> {
    let seconds = if quick { 0.3 } else { 5.0 };
    let base = Options {
        workload: Workload::WordCount,
        mix: Vec::new(),
        cluster: None,
        dir: dir.to_path_buf(),
        tasks: 8,
        threads: 2,
        clients: 4,
        in_flight: 256,
        rate: None,
        duration: Duration::from_secs_f64(seconds),
        record_bytes: 100,
        keys: if quick { 1_000 } else { 100_000 },
        skew: Skew::Uniform,
        ack: AckLevel::Ack,
        fanout: 10,
        range_limit: 20,
        progress: false,
        stop: None,
    };
    let social = if quick { 200 } else { 10_000 };
    let plans = [
        Options { ..base.clone() },
        Options {
            workload: Workload::Append,
            skew: Skew::Zipfian(0.99),
            ..base.clone()
        },
        Options {
            workload: Workload::Select,
            ..base.clone()
        },
        Options {
            workload: Workload::Bank,
            keys: social,
            ..base.clone()
        },
        Options {
            workload: Workload::Timeline,
            keys: social,
            ..base.clone()
        },
        Options {
            workload: Workload::Range,
            keys: social,
            ..base.clone()
        },
        Options {
            workload: Workload::Timeline,
            mix: vec![(Op::Post, 20), (Op::Range, 80)],
            keys: social,
            ..base.clone()
        },
        Options {
            workload: Workload::Query,
            clients: 2,
            in_flight: 16,
            ..base.clone()
        },
    ];
    let mut runs = Vec::new();
    for o in &plans {
        eprintln!("  rama bench: {}", describe(o));
        let r = run(o)?;
        ensure(r.errors == 0 && r.ops > 0, || {
            format!(
                "{}: {} errors in {} operations: {:?}",
                describe(o),
                r.errors,
                r.ops,
                r.first_error
            )
        })?;
        runs.push(RecordedRun {
            command: format!("rama bench {}", describe(o)),
            report: r,
        });
    }
    let sweep_options = Options {
        workload: Workload::Append,
        duration: Duration::from_secs_f64(if quick { 0.3 } else { 3.0 }),
        ..base
    };
    eprintln!("  rama bench --sweep: {}", describe(&sweep_options));
    let s = sweep(&sweep_options, Duration::from_millis(10))?;
    let estimate_rate = 1_000_000.0;
    Ok(Record {
        estimate: estimate(&s, estimate_rate, s.threads.max(1)),
        runs,
        sweep: s,
        sweep_command: format!("rama bench {}", describe(&sweep_options)),
        estimate_rate,
    })
}

/// The `rama bench` flags of a run, as typed.
pub fn describe(o: &Options) -> String {
    let mut out = String::from("--inProcess");
    if o.mix.is_empty() {
        out += &format!(" --workload {}", o.workload.name());
    } else {
        let mix: Vec<String> = o.mix.iter().map(|(op, w)| format!("{}:{w}", op.name())).collect();
        out += &format!(" --mix {}", mix.join(","));
    }
    out += &format!(
        " --keys {} --clients {} --inFlight {} --seconds {}",
        o.keys,
        o.clients,
        o.in_flight,
        o.duration.as_secs_f64()
    );
    if matches!(o.skew, Skew::Zipfian(_)) {
        out += " --skew zipfian";
    }
    if o.ops().iter().any(|(op, _)| matches!(op, Op::Post | Op::Range)) {
        out += &format!(" --fanout {}", o.fanout);
    }
    out
}
