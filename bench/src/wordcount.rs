//! WordCount end to end on an in-process cluster: sentences appended with
//! `Ack` (durable and counted before the append returns).
//!
//! 1. Maximum rate, closed loop: client threads each keep a window of
//!    async appends in flight; word increments per second.
//! 2. Latency at half that rate, open loop: sends are scheduled at fixed
//!    intervals and latency counts from the intended send time, so a stall
//!    shows up in the percentiles instead of slowing the sender.
//!
//! Afterwards the counts of every word are checked against a reference.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use engine::cluster::{AckLevel, AppendResult, ClusterClient, Depot, InProcessCluster, PStateRead};
use engine::module::Module;
use engine::pstate::Nav;
use engine::value::Value;
use rama_examples::{words, WordCountModule};
use serde::{Deserialize, Serialize};

use crate::results::{ensure, new_histogram, record, BenchResult, Latency, Throughput};

#[derive(Debug, Clone)]
pub struct Plan {
    pub tasks: u32,
    pub threads: u32,
    pub sentences: usize,
    pub words_per_sentence: usize,
    pub vocabulary: usize,
    pub clients: usize,
    /// Appends in flight per client in the closed loop.
    pub window: usize,
    /// Length of the open-loop latency run.
    pub latency_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WordCount {
    pub tasks: u32,
    pub threads: u32,
    pub words_per_sentence: usize,
    pub vocabulary: usize,
    pub clients: usize,
    pub window: usize,
    /// Closed loop: `ops` are word increments.
    pub max: Throughput,
    pub max_sentences_per_sec: f64,
    /// Open loop at half the maximum sentence rate.
    pub offered_sentences_per_sec: f64,
    pub achieved_sentences_per_sec: f64,
    pub latency: Latency,
    /// Words whose counts were checked against the reference.
    pub checked_words: usize,
}

/// A deterministic sentence generator (xorshift).
struct Sentences {
    state: u64,
    vocabulary: Vec<String>,
    words: usize,
}

impl Sentences {
    fn new(vocabulary: usize, words: usize) -> Sentences {
        Sentences {
            state: 0x9E37_79B9_7F4A_7C15,
            vocabulary: (0..vocabulary).map(|i| format!("w{i:05}")).collect(),
            words,
        }
    }

    fn next(&mut self) -> String {
        let mut s = String::with_capacity(self.words * 7);
        for i in 0..self.words {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            if i > 0 {
                s.push(' ');
            }
            s.push_str(&self.vocabulary[(self.state % self.vocabulary.len() as u64) as usize]);
        }
        s
    }
}

/// Where the sentences go and the counts come from: any cluster's
/// clients, in-process or remote (the engine's client trait family).
pub struct Target {
    pub depot: Box<dyn Depot>,
    pub counts: Box<dyn PStateRead>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("wordcount::Target")
    }
}

impl Target {
    /// The clients of WordCountModule on `cluster`.
    pub fn of(cluster: &dyn ClusterClient) -> engine::Result<Target> {
        Ok(Target {
            depot: cluster.depot("WordCountModule", "*sentences")?,
            counts: cluster.pstate("WordCountModule", "$$wordCounts")?,
        })
    }

    /// Sends one `Ack` append; the future resolves when it is acknowledged.
    fn append(&self, sentence: &Value) -> engine::Result<PendingAppend> {
        self.depot.append_future(sentence, AckLevel::Ack)
    }

    /// The count of `word`.
    fn count(&self, word: &str) -> engine::Result<Value> {
        self.counts.select_one(&[Nav::key(word)])
    }
}

/// The first `n` sentences every WordCount run uses (the same for the
/// baselines).
pub fn sample_sentences(plan: &Plan, n: usize) -> Vec<String> {
    let mut gen = Sentences::new(plan.vocabulary, plan.words_per_sentence);
    (0..n).map(|_| gen.next()).collect()
}

pub fn run(plan: &Plan, data: &Path) -> BenchResult<WordCount> {
    let dir = data.join("wordcount");
    let mut cluster = InProcessCluster::new(&dir);
    cluster.launch(WordCountModule::define()?, plan.tasks, plan.threads)?;
    let outcome = (|| {
        let target = Target::of(&cluster)?;
        measure(plan, &target)
    })();
    let stopped = cluster.shutdown();
    let result = outcome?;
    stopped?;
    std::fs::remove_dir_all(&dir)?;
    Ok(result)
}

/// Runs the closed and open loops against `target` and checks the counts.
pub fn measure(plan: &Plan, target: &Target) -> BenchResult<WordCount> {
    let mut gen = Sentences::new(plan.vocabulary, plan.words_per_sentence);
    let sentences: Vec<Value> = (0..plan.sentences).map(|_| Value::from(gen.next())).collect();
    let mut reference: BTreeMap<String, i64> = BTreeMap::new();

    // 1. Closed loop.
    let per_client = plan.sentences / plan.clients;
    let started = Instant::now();
    let acked = std::thread::scope(|s| -> BenchResult<u64> {
        let handles: Vec<_> = sentences
            .chunks(per_client)
            .take(plan.clients)
            .map(|chunk| {
                s.spawn(move || -> Result<u64, String> {
                    let mut window: VecDeque<PendingAppend> = VecDeque::with_capacity(plan.window);
                    let mut acked = 0;
                    for sentence in chunk {
                        if window.len() == plan.window {
                            let f = window.pop_front().expect("full window");
                            futures_lite::future::block_on(f).map_err(|e| e.to_string())?;
                            acked += 1;
                        }
                        window.push_back(target.append(sentence).map_err(|e| e.to_string())?);
                    }
                    for f in window {
                        futures_lite::future::block_on(f).map_err(|e| e.to_string())?;
                        acked += 1;
                    }
                    Ok(acked)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| "a client thread panicked")??;
        }
        Ok(total)
    })?;
    let elapsed = started.elapsed();
    let sent = (per_client * plan.clients) as u64;
    ensure(acked == sent, || format!("{acked} of {sent} appends acknowledged"))?;
    for s in &sentences[..per_client * plan.clients] {
        for w in words(s.as_str().expect("string")) {
            *reference.entry(w).or_insert(0) += 1;
        }
    }
    let increments = sent * plan.words_per_sentence as u64;
    let max = Throughput::new(increments, 0, elapsed);
    let max_sentences = sent as f64 / elapsed.as_secs_f64();
    eprintln!(
        "  max: {:.0} word increments/s ({max_sentences:.0} sentences/s, {} clients x {} in flight)",
        max.ops_per_sec, plan.clients, plan.window
    );

    // 2. Open loop at half the rate.
    let offered = max_sentences / 2.0;
    let count = ((offered * plan.latency_seconds) as usize).max(10);
    let interval = Duration::from_secs_f64(1.0 / offered);
    let open: Vec<Value> = (0..count).map(|_| Value::from(gen.next())).collect();
    let (tx, rx) = flume::bounded::<(Instant, PendingAppend)>(1 << 16);
    let started = Instant::now();
    let (hist, late) = std::thread::scope(|s| -> BenchResult<_> {
        // Completions are awaited in send order by a few collectors; one
        // slow ack can only make later ones look slower, never faster.
        let collectors: Vec<_> = (0..4)
            .map(|_| {
                let rx = rx.clone();
                s.spawn(move || -> Result<_, String> {
                    let mut hist = new_histogram();
                    for (intended, f) in rx {
                        futures_lite::future::block_on(f).map_err(|e| e.to_string())?;
                        record(&mut hist, intended.elapsed());
                    }
                    Ok(hist)
                })
            })
            .collect();
        drop(rx);
        let mut late = 0u64;
        for (i, sentence) in open.iter().enumerate() {
            let intended = started + interval.mul_f64(i as f64);
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            } else if now - intended > Duration::from_millis(100) {
                late += 1;
            }
            let f: PendingAppend = target.append(sentence)?;
            tx.send((intended, f)).map_err(|_| "collectors stopped")?;
        }
        drop(tx);
        let mut hist = new_histogram();
        for c in collectors {
            hist.add(c.join().map_err(|_| "a collector panicked")??)?;
        }
        Ok((hist, late))
    })?;
    let achieved = count as f64 / started.elapsed().as_secs_f64();
    ensure(late < count as u64 / 10, || {
        format!("the sender fell behind the offered rate on {late} of {count} sends; the rate is not real")
    })?;
    let latency = Latency::from_histogram(&hist);
    eprintln!(
        "  at {offered:.0} sentences/s: p50 {:.0} µs, p99 {:.0} µs",
        latency.p50_us, latency.p99_us
    );
    for s in &open {
        for w in words(s.as_str().expect("string")) {
            *reference.entry(w).or_insert(0) += 1;
        }
    }

    // Every count equals the reference.
    for (w, c) in &reference {
        let got = target.count(w)?;
        ensure(got == Value::Int(*c), || format!("count of {w}: {got:?}, expected {c}"))?;
    }
    Ok(WordCount {
        tasks: plan.tasks,
        threads: plan.threads,
        words_per_sentence: plan.words_per_sentence,
        vocabulary: plan.vocabulary,
        clients: plan.clients,
        window: plan.window,
        max,
        max_sentences_per_sec: max_sentences,
        offered_sentences_per_sec: offered,
        achieved_sentences_per_sec: achieved,
        latency,
        checked_words: reference.len(),
    })
}

pub type PendingAppend = engine::cluster::Answer<AppendResult>;
