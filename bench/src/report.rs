//! BENCHMARKS.md, generated from a results file: machine, command, one
//! table per benchmark, and whether each target is met.

use std::fmt::Write;

use crate::lsm::{EngineRun, OpRate};
use crate::results::{LatencyRun, Results, Throughput};

/// How a target compares a measured value with its goal.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// A ratio that must be at least the goal.
    RatioAtLeast(f64),
    /// A ratio that must be at most the goal.
    RatioAtMost(f64),
    /// A rate (per second) that must be at least the goal.
    RateAtLeast(f64),
    /// A latency in microseconds that must be at most the goal.
    MicrosAtMost(f64),
    /// A percentage that must be at most the goal.
    PercentAtMost(f64),
}

/// One target of the storage benchmarks.
#[derive(Debug, Clone)]
pub struct Target {
    name: &'static str,
    measured: f64,
    goal: Goal,
}

impl Target {
    fn met(&self) -> bool {
        match self.goal {
            Goal::RatioAtLeast(g) | Goal::RateAtLeast(g) => self.measured >= g,
            Goal::RatioAtMost(g) | Goal::MicrosAtMost(g) | Goal::PercentAtMost(g) => self.measured <= g,
        }
    }

    fn measured_text(&self) -> String {
        match self.goal {
            Goal::RatioAtLeast(_) | Goal::RatioAtMost(_) => ratio(self.measured),
            Goal::RateAtLeast(_) => format!("{}/s", int(self.measured)),
            Goal::MicrosAtMost(_) => micros(self.measured),
            Goal::PercentAtMost(_) => format!("{:.2}%", self.measured),
        }
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::RatioAtLeast(g) => format!(">= {g}x"),
            Goal::RatioAtMost(g) => format!("<= {g}x"),
            Goal::RateAtLeast(g) => format!(">= {}/s", int(g)),
            Goal::MicrosAtMost(g) => format!("<= {}", micros(g)),
            Goal::PercentAtMost(g) => format!("<= {g}%"),
        }
    }

    /// `met`, or `missed (0.62x of 0.8x)`.
    pub fn status(&self) -> String {
        if self.met() {
            return "met".into();
        }
        match self.goal {
            Goal::RatioAtLeast(g) => format!("missed ({} of {g}x)", ratio(self.measured)),
            Goal::RatioAtMost(g) => format!("missed ({} of at most {g}x)", ratio(self.measured)),
            Goal::RateAtLeast(g) => format!(
                "missed ({}/s of {}/s, {})",
                int(self.measured),
                int(g),
                ratio(self.measured / g)
            ),
            Goal::MicrosAtMost(g) => format!("missed ({} of at most {})", micros(self.measured), micros(g)),
            Goal::PercentAtMost(g) => format!("missed ({:.2}% of at most {g}%)", self.measured),
        }
    }

    /// One line for a terminal.
    pub fn line(&self) -> String {
        format!(
            "{}: {} (goal {}): {}",
            self.name,
            self.measured_text(),
            self.goal_text(),
            self.status()
        )
    }
}

/// The targets, measured.
pub fn targets(r: &Results) -> Vec<Target> {
    let b = &r.depot_batched;
    let s = &r.depot_single;
    vec![
        Target {
            name: "batched appends: bandwidth vs raw loop (growing file)",
            measured: b.ours.mb_per_sec / b.raw_growing.mb_per_sec,
            goal: Goal::RatioAtLeast(0.8),
        },
        Target {
            name: "batched appends: records/s",
            measured: b.ours.ops_per_sec,
            goal: Goal::RateAtLeast(1_000_000.0),
        },
        Target {
            name: "single appends: p99 vs raw loop p99 (growing file)",
            measured: s.ours.latency.p99_us / s.raw_growing.latency.p99_us,
            goal: Goal::RatioAtMost(1.3),
        },
        Target {
            name: "64 appenders: appends/s vs single appends/s",
            measured: concurrency_gain(r),
            goal: Goal::RatioAtLeast(10.0),
        },
    ]
    .into_iter()
    .chain(lsm_targets(r))
    .chain(r.wordcount.iter().map(|w| Target {
        name: "WordCount in-process (tasks 8, threads 2): word increments/s with Ack",
        measured: w.max.ops_per_sec,
        goal: Goal::RateAtLeast(800_000.0),
    }))
    .chain(r.wordcount.iter().map(|w| Target {
        name: "WordCount in-process: Ack p50 at half the maximum sentence rate",
        measured: w.latency.p50_us,
        goal: Goal::MicrosAtMost(2_000.0),
    }))
    .chain(r.replication.iter().map(|x| Target {
        name: "replicated writes in one process: RF 3 writes/s vs the store alone",
        measured: x.ratio(),
        goal: Goal::RatioAtLeast(0.6),
    }))
    .chain(r.replicated_cluster.iter().map(|x| Target {
        name: "WordCount through a cluster: RF 3 word increments/s vs RF 1",
        measured: x.ratio(),
        goal: Goal::RatioAtLeast(0.6),
    }))
    .chain(r.replicated_cluster.iter().map(|x| Target {
        name: "failover: kill -9 of a leader to the first acknowledged append to its task group, max",
        measured: x.failovers.max_seconds * 1e6,
        goal: Goal::MicrosAtMost(3_000_000.0),
    }))
    .chain(r.harness.iter().map(|h| Target {
        name: "appends (`rama bench --sweep`): highest rate with p99 within 10 ms over the closed-loop maximum",
        measured: h.sweep.max_sustainable_per_sec / h.sweep.closed_loop_max_per_sec.max(1.0),
        goal: Goal::RatioAtLeast(0.5),
    }))
    .chain(remote_targets(r))
    .collect()
}

/// The network's overhead on WordCount, and point selects against Redis.
fn remote_targets(r: &Results) -> Vec<Target> {
    let Some(remote) = &r.remote else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(w) = &r.wordcount {
        out.push(Target {
            name: "WordCount through the remote client: in-process increments/s over remote (overhead)",
            measured: w.max.ops_per_sec / remote.wordcount.max.ops_per_sec,
            goal: Goal::RatioAtMost(1.25),
        });
    }
    out.push(Target {
        name: "PState point selects (16 in flight per connection) vs redis-benchmark GET -P 16",
        measured: remote.selects.ours.ops_per_sec / remote.selects.redis.ops_per_sec,
        goal: Goal::RatioAtLeast(1.0),
    });
    for i in &remote.idle {
        let name = match i.module.as_str() {
            "WordCountModule" => "Idle WordCount worker process: CPU, % of one core",
            "BankTransferModule" => "Idle BankTransfer worker process: CPU, % of one core",
            _ => continue,
        };
        out.push(Target {
            name,
            measured: i.core_share * 100.0,
            goal: Goal::PercentAtMost(1.0),
        });
    }
    out
}

/// Ours over each other engine, for fillrandom and readrandom (target 1.5x).
fn lsm_targets(r: &Results) -> Vec<Target> {
    const NAMES: [(&str, &str, &str); 2] = [
        ("fjall", "LSM fillrandom vs fjall", "LSM readrandom vs fjall"),
        (
            "rocksdb",
            "LSM fillrandom vs RocksDB db_bench",
            "LSM readrandom vs RocksDB db_bench",
        ),
    ];
    let engines = &r.lsm.engines;
    let Some(ours) = engines.iter().find(|e| e.engine == "ours") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (engine, fill, read) in NAMES {
        if let Some(other) = engines.iter().find(|e| e.engine == engine) {
            out.push(Target {
                name: fill,
                measured: ours.fill.ops_per_sec / other.fill.ops_per_sec,
                goal: Goal::RatioAtLeast(1.5),
            });
            out.push(Target {
                name: read,
                measured: ours.read.ops_per_sec / other.read.ops_per_sec,
                goal: Goal::RatioAtLeast(1.5),
            });
        }
    }
    out
}

fn concurrency_gain(r: &Results) -> f64 {
    r.depot_concurrent.ours.throughput.ops_per_sec / r.depot_single.ours.throughput.ops_per_sec
}

/// `1234567.8` as `1,234,568`.
fn int(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

fn ratio(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.1}x")
    } else {
        format!("{x:.2}x")
    }
}

fn micros(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn mb(x: f64) -> String {
    format!("{x:.1}")
}

fn batched_section(out: &mut String, r: &Results) {
    let b = &r.depot_batched;
    let batch_bytes = b.batch_records * b.record_bytes;
    let _ = writeln!(
        out,
        "## 1. Depot appends, batched\n\n\
         {} records of {} bytes appended by one task thread with `Log::append_batch`, {} records per batch \
         (each batch durable before the next is sent). Raw loop: plain libc sequential `pwrite` of {} bytes + \
         `fdatasync`, the same total bytes, on a growing file and on a file zero-filled and synced beforehand. \
         The three run interleaved in {} rounds (a slice of each per round); times are summed over the \
         appends (or writes) themselves. MB/s counts payload bytes (10^6 bytes).\n",
        int(b.ours.ops as f64),
        b.record_bytes,
        int(b.batch_records as f64),
        int(batch_bytes as f64),
        b.rounds,
    );
    let _ = writeln!(
        out,
        "| run | writes | records/s | MB/s | seconds | ours / this (MB/s) |\n|---|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        out,
        "| ours: `Log::append_batch` | {} batches | {} | {} | {:.2} | |",
        int(b.ours.ops.div_ceil(b.batch_records as u64) as f64),
        int(b.ours.ops_per_sec),
        mb(b.ours.mb_per_sec),
        b.ours.seconds,
    );
    for (name, raw) in [
        ("raw pwrite + fdatasync, growing file", &b.raw_growing),
        ("raw pwrite + fdatasync, pre-written file", &b.raw_prewritten),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {:.2} | {} |",
            int(raw.ops as f64),
            int(raw.bytes as f64 / b.record_bytes as f64 / raw.seconds),
            mb(raw.mb_per_sec),
            raw.seconds,
            ratio(b.ours.mb_per_sec / raw.mb_per_sec)
        );
    }
    // Bytes our log actually wrote per second (frames: 16-byte head + payload),
    // against the same raw loop: the overhead of the log itself, without the
    // cost of the frame format.
    let frame_mb_per_sec = b.ours_frame_bytes as f64 / 1e6 / b.ours.seconds;
    let _ = writeln!(
        out,
        "\nRecords/s of a raw loop: its bytes/s divided by {} bytes. Our log frames the {} MB of payload as \
         {} MB (+{:.0}%): a 24-byte head (length, CRC32, base offset, count) per group-commit frame and a \
         length varint per record. Counting the bytes written, ours \
         moved {} MB/s of frames, {} of the growing-file raw loop; the payload ratio above is what the target \
         uses. All {} records were read back and verified after reopening the log.\n",
        b.record_bytes,
        mb(b.ours.bytes as f64 / 1e6),
        mb(b.ours_frame_bytes as f64 / 1e6),
        (b.ours_frame_bytes as f64 / b.ours.bytes as f64 - 1.0) * 100.0,
        mb(frame_mb_per_sec),
        ratio(frame_mb_per_sec / b.raw_growing.mb_per_sec),
        int(b.ours_read_back as f64),
    );
}

fn latency_row(out: &mut String, name: &str, run: &LatencyRun, extra: &str) {
    let l = &run.latency;
    let _ = writeln!(
        out,
        "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
        int(run.throughput.ops_per_sec),
        micros(l.mean_us),
        micros(l.p50_us),
        micros(l.p90_us),
        micros(l.p99_us),
        micros(l.p999_us),
        micros(l.max_us),
        extra
    );
}

fn single_section(out: &mut String, r: &Results) {
    let s = &r.depot_single;
    let _ = writeln!(
        out,
        "## 2. Durable single appends, one in flight\n\n\
         {} `Log::append` calls of a {}-byte record, each awaited before the next. Raw loop: plain libc \
         sequential `pwrite` of {} bytes + `fdatasync`, as many times, on a growing and on a pre-written \
         file. The three run interleaved in {} rounds. Latency per operation from an HDR histogram; ops/s \
         from the summed latencies.\n",
        int(s.ours.throughput.ops as f64),
        s.record_bytes,
        s.raw_write_bytes,
        s.rounds
    );
    let _ = writeln!(
        out,
        "| run | ops/s | mean | p50 | p90 | p99 | p99.9 | max | ours p99 / this p99 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    latency_row(out, "ours: `Log::append`", &s.ours, "");
    for (file, raw) in [("growing", &s.raw_growing), ("pre-written", &s.raw_prewritten)] {
        let name = format!("raw {}-byte pwrite + fdatasync, {file} file", s.raw_write_bytes);
        latency_row(out, &name, raw, &ratio(s.ours.latency.p99_us / raw.latency.p99_us));
    }
    let _ = writeln!(
        out,
        "\nAll {} records were read back and verified after reopening the log.\n",
        int(s.ours_read_back as f64)
    );
}

fn concurrent_section(out: &mut String, r: &Results) {
    let c = &r.depot_concurrent;
    let _ = writeln!(
        out,
        "## 3. {} appenders in flight\n\n\
         {} glommio tasks (`glommio::spawn_local`) on one task thread, each looping `Log::append` of a \
         {}-byte record; {} appends in all. Rate = acknowledged (durable) appends over the whole run.\n",
        c.tasks,
        c.tasks,
        c.record_bytes,
        int(c.ours.throughput.ops as f64)
    );
    let _ = writeln!(
        out,
        "| run | appends/s | mean | p50 | p90 | p99 | p99.9 | max | vs single appends/s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    latency_row(
        out,
        &format!("ours: {} tasks looping `Log::append`", c.tasks),
        &c.ours,
        &ratio(concurrency_gain(r)),
    );
    latency_row(
        out,
        "ours: `Log::append`, one in flight (from 2)",
        &r.depot_single.ours,
        "1.00x",
    );
    let _ = writeln!(
        out,
        "\nEvery acknowledged offset was distinct; all {} records were read back after reopening and each \
         held the record its appender sent.\n",
        int(c.ours_read_back as f64)
    );
}

fn wordcount_section(out: &mut String, r: &Results) {
    let Some(w) = &r.wordcount else {
        return;
    };
    let _ = writeln!(
        out,
        "## 5. WordCount end to end, in-process\n\n\
         `WordCountModule` from `rama-examples` on an `InProcessCluster` with {} tasks on {} task threads. \
         Each sentence has {} words from a vocabulary of {}; it is appended with `AckLevel::Ack`, so an \
         append returns once the sentence is durable in its depot partition and every word increment is \
         durable in `$$wordCounts` on the word's task. {} client threads keep {} async appends in flight \
         each (closed loop). Then an open loop offers half that sentence rate; latency counts from each \
         append's intended send time. Afterwards every word's count ({} words) equals a reference count.\n",
        w.tasks,
        w.threads,
        w.words_per_sentence,
        int(w.vocabulary as f64),
        w.clients,
        w.window,
        int(w.checked_words as f64)
    );
    let _ = writeln!(
        out,
        "| run | word increments/s | sentences/s |\n|---|---:|---:|\n\
         | closed loop (maximum) | {} | {} |\n",
        int(w.max.ops_per_sec),
        int(w.max_sentences_per_sec)
    );
    let _ = writeln!(
        out,
        "| open loop | offered sentences/s | achieved | mean | p50 | p90 | p99 | p99.9 | max |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | Ack latency at 50% of maximum | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        int(w.offered_sentences_per_sec),
        int(w.achieved_sentences_per_sec),
        micros(w.latency.mean_us),
        micros(w.latency.p50_us),
        micros(w.latency.p90_us),
        micros(w.latency.p99_us),
        micros(w.latency.p999_us),
        micros(w.latency.max_us)
    );
    let _ = writeln!(
        out,
        "The maximum varies between runs on this machine (a shared virtual disk and 2 cores that the \
         client threads share with the task threads). An `Ack` needs two group commits of the task \
         group log in series (the sentence's append, then the word increments its processing wrote), \
         and the open loop at half the maximum costs about twice the CPU per sentence of the closed \
         loop (smaller batches), so it keeps both cores busy.\n"
    );
}

fn remote_section(out: &mut String, r: &Results) {
    let Some(remote) = &r.remote else {
        return;
    };
    let w = &remote.wordcount;
    let _ = writeln!(
        out,
        "## 6. WordCount through the remote client\n\n\
         {}. The same plan as section 5: {} words per sentence, vocabulary {}, `Ack` appends, {} client \
         threads with {} appends in flight each through one `ClusterManager` (one connection per task thread of the worker), \
         then an open loop at half the maximum. Every count ({} words) equals the reference afterwards.\n",
        remote.setup,
        w.words_per_sentence,
        int(w.vocabulary as f64),
        w.clients,
        w.window,
        int(w.checked_words as f64)
    );
    let in_process = r.wordcount.as_ref();
    let _ = writeln!(
        out,
        "| run | word increments/s | sentences/s | Ack p50 at 50% | Ack p99 at 50% |\n|---|---:|---:|---:|---:|"
    );
    if let Some(p) = in_process {
        let _ = writeln!(
            out,
            "| in-process (section 5) | {} | {} | {} | {} |",
            int(p.max.ops_per_sec),
            int(p.max_sentences_per_sec),
            micros(p.latency.p50_us),
            micros(p.latency.p99_us)
        );
    }
    let _ = writeln!(
        out,
        "| remote client | {} | {} | {} | {} |\n",
        int(w.max.ops_per_sec),
        int(w.max_sentences_per_sec),
        micros(w.latency.p50_us),
        micros(w.latency.p99_us)
    );
    if let Some(p) = in_process {
        let _ = writeln!(
            out,
            "Overhead of the network path: in-process over remote = {} (target at most 1.25x). Per append \
             the remote path adds archiving the request, a write and a read on each side of the socket, and \
             on the client its writer and reader threads; the worker serves each connection on a task thread \
             (one connection per task thread; WordCount's depot is random, so an append sent on any connection \
             is taken by a task of the thread serving it, with no other thread in between); the \
             worker shares the 2 cores with the client, ZooKeeper and the daemons.\n",
            ratio(p.max.ops_per_sec / w.max.ops_per_sec)
        );
    }
    let s = &remote.selects;
    let _ = writeln!(
        out,
        "## 7. PState point selects vs Redis GET\n\n\
         {} clients (each a `ClusterManager` with one connection per task thread of the worker, served by \
         that thread), each sending {} `select`s of one word's count at a time and taking their answers \
         before the next {} (as `redis-benchmark -P` pipelines; keys spread over {} words, each select sent \
         on the connection of its key's task). Beside it, in the same run: `redis-benchmark -t get -P {} -c {} -r {}` \
         against {} ({}).\n\n\
         | engine | point reads/s | ratio |\n|---|---:|---:|\n\
         | ours (remote `select`) | {} | {} |\n\
         | Redis GET | {} | 1.00x |",
        s.connections,
        s.in_flight_per_connection,
        s.in_flight_per_connection,
        int(s.keys as f64),
        s.in_flight_per_connection,
        s.connections,
        s.keys,
        s.redis_version,
        s.redis_setup,
        int(s.ours.ops_per_sec),
        ratio(s.ours.ops_per_sec / s.redis.ops_per_sec),
        int(s.redis.ops_per_sec)
    );
    if let Some(t) = &r.tcp {
        let _ = writeln!(
            out,
            "| loopback TCP echo, {} x {} pipelined {}-byte messages (physical limit, section 9) | {} | {} |",
            t.connections,
            t.pipeline,
            t.message_bytes,
            int(t.pipelined_per_sec),
            ratio(t.pipelined_per_sec / s.redis.ops_per_sec)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Why the gap: each connection is served by the task thread owning its keys (a select of a local \
         task is read inline, no other thread or task in between), but a pipeline still costs a wake-up \
         on each side: the worker's thread parks between pipelines (glommio arms its io_uring poll, \
         submits, sleeps and is woken by the completion) and the client's caller, writer and reader \
         threads hand each pipeline over with futexes, while Redis answers on one event-loop thread with \
         one read and one write and its client is one thread too. Steps measured in the session that \
         moved serving onto the task threads: from five threads to one on the server (about the same: the executor \
         loop's timer re-arming and a membarrier per park dominated), glommio keeping pending preemption \
         timers (io_uring_enter calls per select from 0.8 to 0.3), a fence pair instead of \
         `sys_membarrier` at park (the IPIs cost about half of a parking worker's CPU under this \
         hypervisor), and inline selects (+48%). Spinning before park made it worse on 2 cores.\n"
    );
    if !remote.idle.is_empty() {
        let _ = writeln!(
            out,
            "### Idle workers\n\n\
             The CPU time (user and system, from `/proc/<pid>/stat`) of a worker process of the same cluster \
             while nothing is sent to it: a share of one core (target: below 1%).\n\n\
             | module | how it ran | measured over | CPU, % of a core |\n|---|---|---:|---:|"
        );
        for i in &remote.idle {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} s | {:.2}% |",
                i.module,
                i.setup,
                i.seconds,
                i.core_share * 100.0
            );
        }
        let _ = writeln!(out);
    }
}

fn redis_wordcount_section(out: &mut String, r: &Results) {
    if r.redis_wordcount.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## 8. WordCount on Redis, side by side\n\n\
         The same sentences as sections 5 and 6, counted the Redis way: the client splits each sentence and \
         sends `HINCRBY wordCounts <word> 1` per word, {} connections each sending pipelines of {} sentences \
         and waiting for their replies. Redis ({}) runs on loopback, started and stopped by the harness, with \
         its append-only file; with `appendfsync always` a reply is sent after the write is fsynced (the same \
         promise as our `Ack`), with `everysec` up to a second of acknowledged writes can be lost. Counts of a \
         sample of words are checked against the reference.\n\n\
         | engine | durability | word increments/s | ours in-process over it | ours remote over it |\n\
         |---|---|---:|---:|---:|",
        r.redis_wordcount[0].clients, r.redis_wordcount[0].pipeline_sentences, r.redis_wordcount[0].version
    );
    let ours = r.wordcount.as_ref().map(|w| w.max.ops_per_sec);
    let remote = r.remote.as_ref().map(|w| w.wordcount.max.ops_per_sec);
    if let Some(o) = ours {
        let _ = writeln!(out, "| ours, in-process | durable before Ack | {} | | |", int(o));
    }
    if let Some(o) = remote {
        let _ = writeln!(out, "| ours, remote client | durable before Ack | {} | | |", int(o));
    }
    for w in &r.redis_wordcount {
        let vs = |x: Option<f64>| x.map_or_else(String::new, |x| ratio(x / w.increments_per_sec));
        let _ = writeln!(
            out,
            "| Redis | {} | {} | {} | {} |",
            w.setup,
            int(w.increments_per_sec),
            vs(ours),
            vs(remote)
        );
    }
    let _ = writeln!(out);
}

fn engine_cell(rate: &OpRate, first: &OpRate, is_first: bool) -> String {
    if is_first {
        int(rate.ops_per_sec)
    } else {
        format!(
            "{} (ours {})",
            int(rate.ops_per_sec),
            ratio(first.ops_per_sec / rate.ops_per_sec)
        )
    }
}

fn lsm_section(out: &mut String, r: &Results) {
    let w = &r.lsm.workload;
    let engines = &r.lsm.engines;
    let _ = writeln!(
        out,
        "## 4. LSM key-value stores\n\n\
         fillrandom: {} random {}-byte keys with {}-byte values, in batches of {} keys, each batch synced \
         (fdatasync) before the next. readrandom: {} point gets of random keys. Range scans: {} scans of {} \
         entries from a random key. Each engine runs {} time(s), round-robin, and each phase shows its median \
         run. Each engine is a column; in parentheses, how many times that engine's rate ours is.\n",
        int(w.keys as f64),
        w.key_bytes,
        w.value_bytes,
        int(w.batch as f64),
        int(w.reads as f64),
        int(w.scans as f64),
        w.scan_len,
        w.repeats.max(1)
    );
    let Some(first) = engines.first() else {
        let _ = writeln!(out, "No engine ran.\n");
        return;
    };
    let header: Vec<String> = engines
        .iter()
        .map(|e| match &e.version {
            Some(v) => format!("{} {v}", e.engine),
            None => e.engine.clone(),
        })
        .collect();
    let _ = writeln!(out, "| phase | {} |", header.join(" | "));
    let _ = writeln!(out, "|---|{}", "---:|".repeat(engines.len()));
    type Phase = fn(&EngineRun) -> &OpRate;
    let phases: [(&str, Phase); 3] = [
        ("fillrandom, keys/s", |e| &e.fill),
        ("readrandom, gets/s", |e| &e.read),
        ("range scans, scans/s", |e| &e.scan),
    ];
    for (name, phase) in phases {
        let cells: Vec<String> = engines
            .iter()
            .enumerate()
            .map(|(i, e)| engine_cell(phase(e), phase(first), i == 0))
            .collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    let found: Vec<String> = engines
        .iter()
        .map(|e| match e.read.found {
            Some(f) => format!(
                "{} of {} ({:.0}%)",
                int(f as f64),
                int(e.read.ops as f64),
                100.0 * f as f64 / e.read.ops as f64
            ),
            None => "not reported".into(),
        })
        .collect();
    let _ = writeln!(out, "| readrandom gets that found a key | {} |", found.join(" | "));
    let entries: Vec<String> = engines
        .iter()
        .map(|e| match e.scan.entries {
            Some(n) => format!("{:.1}", n as f64 / e.scan.ops as f64),
            None => "not reported".into(),
        })
        .collect();
    let _ = writeln!(out, "| entries per scan | {} |\n", entries.join(" | "));
    for e in engines {
        let _ = writeln!(out, "**{}**:", e.engine);
        for note in &e.notes {
            let _ = writeln!(out, "- {note}");
        }
        if !e.commands.is_empty() {
            let _ = writeln!(out, "\n```\n{}\n```", e.commands.join("\n"));
        }
        let _ = writeln!(out);
    }
}

/// Unix time as `2025-01-31 12:00 UTC` (proleptic Gregorian calendar).
fn utc(unix: u64) -> String {
    let (hour, minute) = (unix % 86_400 / 3600, unix % 3600 / 60);
    let (year, month, day) = control::logging::civil_date((unix / 86_400) as i64);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02} UTC")
}

fn bytes_gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

fn machine_section(out: &mut String, r: &Results) {
    let m = &r.machine;
    let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
    let disk = format!(
        "{}, {}, rotational flag {}, model {}",
        or_unknown(&m.device),
        or_unknown(&m.disk_size),
        m.disk_rotational.map_or("unknown", |r| if r { "1" } else { "0" }),
        m.disk_model.clone().unwrap_or_else(|| "not reported".into()),
    );
    let _ = writeln!(
        out,
        "## Machine\n\n| | |\n|---|---|\n\
         | cores (`nproc`) | {} |\n| CPU | {} |\n| memory | {} |\n| kernel (`uname -r`) | {} |\n\
         | disk (`lsblk`) | {} |\n| file system (`df`) | {} |\n| data directory | `{}` |\n\
         | load average (1, 5, 15 min) at start / end | {} / {} |\n\
         | I/O pressure before the run (`/proc/pressure/io`, some, %) | {} |\n",
        m.cores.map_or("unknown".into(), |c| c.to_string()),
        or_unknown(&m.cpu_model),
        m.memory_bytes.map_or("unknown".into(), bytes_gib),
        or_unknown(&m.kernel),
        disk,
        or_unknown(&m.filesystem),
        m.data_dir,
        or_unknown(&m.load_start),
        or_unknown(&m.load_end),
        or_unknown(&m.io_pressure_start),
    );
}

/// The whole BENCHMARKS.md.
pub fn markdown(r: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmarks\n\n\
         Generated by `bench/run` from the results of `rama-bench run`; do not edit by hand. \
         Every number below was measured in the run described here.\n"
    );
    if r.mode == "quick" {
        let _ = writeln!(
            out,
            "> **Quick mode**: counts are tiny; this run checks the harness, its numbers mean little.\n"
        );
    }
    let _ = writeln!(
        out,
        "- command: `{}`\n- mode: {}\n- started: {}; the whole run took {:.0} s\n",
        r.invocation,
        r.mode,
        utc(r.started_unix),
        r.seconds
    );
    machine_section(&mut out, r);
    let _ = writeln!(
        out,
        "## Targets\n\n| target | measured | goal | status |\n|---|---:|---:|---|"
    );
    for t in targets(r) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            t.name,
            t.measured_text(),
            t.goal_text(),
            t.status()
        );
    }
    let _ = writeln!(out);
    batched_section(&mut out, r);
    single_section(&mut out, r);
    concurrent_section(&mut out, r);
    lsm_section(&mut out, r);
    wordcount_section(&mut out, r);
    remote_section(&mut out, r);
    redis_wordcount_section(&mut out, r);
    tcp_section(&mut out, r);
    harness_section(&mut out, r);
    replication_section(&mut out, r);
    replicated_cluster_section(&mut out, r);
    out
}

fn replicated_cluster_section(out: &mut String, r: &Results) {
    let Some(x) = &r.replicated_cluster else {
        return;
    };
    let _ = writeln!(
        out,
        "## 12. Replication through a cluster: WordCount with RF 3 against RF 1, failover\n\n\
         {}. The plan of section 6 (`Ack` appends, {} client threads with {} in flight each, then an open loop at \
         half the maximum), every count checked against the reference. `rama-bench failover` runs it alone.\n\n\
         | run | word increments/s | sentences/s | Ack p50 at 50% | Ack p99 at 50% | vs RF 1 |\n\
         |---|---:|---:|---:|---:|---:|",
        x.setup, x.rf1.clients, x.rf1.window
    );
    for (name, w) in [("RF 1", &x.rf1), ("RF 3, min-ISR 2", &x.rf3)] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} |",
            int(w.max.ops_per_sec),
            int(w.max_sentences_per_sec),
            micros(w.latency.p50_us),
            micros(w.latency.p99_us),
            ratio(w.max.ops_per_sec / x.rf1.max.ops_per_sec)
        );
    }
    let f = &x.failovers;
    let _ = writeln!(
        out,
        "\nFailover: {}. Over {} kills: p50 {:.2} s, max {:.2} s (each: {}); {} appends failed meanwhile \
         (reported to the client, not retried).\n",
        f.setup,
        f.seconds.len(),
        f.p50_seconds,
        f.max_seconds,
        f.seconds
            .iter()
            .map(|s| format!("{s:.2} s"))
            .collect::<Vec<_>>()
            .join(", "),
        f.failed_appends
    );
}

fn replication_section(out: &mut String, r: &Results) {
    let Some(x) = &r.replication else {
        return;
    };
    let _ = writeln!(
        out,
        "## 11. Replicated store writes, in one process\n\n\
         The replication driver over real stores on this disk (`engine::replication::local`: each replica on \
         a task thread of its own, messages over in-process channels, no network): {} tasks on the leader's \
         thread each write one {}-byte batch at a time and wait until it is applied ({} writes in all). RF 3 \
         has min-ISR 2: a write is acknowledged once every ISR member (all three, while they keep up) holds \
         it durably. The store alone is what a task group with RF 1 writes to today. The cluster benchmark of issue 13 (appends end \
         to end, RF 3 against RF 1) is not built yet; this isolates the protocol's cost from the network's. \
         `rama-bench replication` runs it alone.\n",
        x.writers,
        x.value_bytes,
        int(x.writes as f64)
    );
    let _ = writeln!(
        out,
        "| run | writes/s | mean | p50 | p90 | p99 | p99.9 | max | vs the store alone |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let plain = x.plain.throughput.ops_per_sec;
    latency_row(out, "the store alone (`Store::write`)", &x.plain, "1.00x");
    latency_row(
        out,
        "RF 1 through the driver",
        &x.rf1,
        &ratio(x.rf1.throughput.ops_per_sec / plain),
    );
    latency_row(
        out,
        "RF 3, min-ISR 2",
        &x.rf3,
        &ratio(x.rf3.throughput.ops_per_sec / plain),
    );
    let _ = writeln!(out);
}

fn tcp_section(out: &mut String, r: &Results) {
    let Some(t) = &r.tcp else {
        return;
    };
    let _ = writeln!(
        out,
        "## 9. Loopback TCP round trips (the physical limit)\n\n\
         Two plain blocking sockets on 127.0.0.1 (`TCP_NODELAY`), {}-byte messages echoed back, no framing and \
         no protocol: what any request/response over loopback pays on this machine at least. \
         `rama bench --baseline tcp` runs the same loop.\n\n\
         | shape | messages/s | p50 | p99 |\n|---|---:|---:|---:|\n\
         | one connection, one in flight | {} | {} | {} |\n\
         | {} connections x {} pipelined | {} | | |\n",
        t.message_bytes,
        int(t.sequential_per_sec),
        micros(t.round_trip.p50_us),
        micros(t.round_trip.p99_us),
        t.connections,
        t.pipeline,
        int(t.pipelined_per_sec)
    );
}

/// The `p50 | p99 | p99.9 | max` cells of a table row.
fn tail_cells(l: &crate::results::Latency) -> String {
    format!(
        "{} | {} | {} | {}",
        micros(l.p50_us),
        micros(l.p99_us),
        micros(l.p999_us),
        micros(l.max_us)
    )
}

fn harness_section(out: &mut String, r: &Results) {
    let Some(h) = &r.harness else {
        return;
    };
    let _ = writeln!(
        out,
        "## 10. `rama bench`: the example workloads, and a capacity sweep\n\n\
         Each row is one `rama bench` run (closed loop; the command is in the first column), in-process: the \
         module's task threads and the client threads share this process and its cores, so CPU per \
         operation includes the clients. Latency counts from the send to the answer (`Ack` for appends: \
         processed by the module's topologies). Mixed runs list each operation below the total. Resident \
         memory is the whole benchmark process's at the end of the run (the runs share the process).\n\n\
         | `rama bench` | ops/s | p50 | p99 | p99.9 | max | CPU per op | resident |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for recorded in &h.runs {
        let run = &recorded.report;
        let resident: u64 = run.processes.iter().map(|p| p.rss_bytes).sum();
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {:.0} MB |",
            recorded.command,
            int(run.ops_per_sec),
            tail_cells(&run.latency),
            run.cpu_us_per_op.map_or_else(String::new, micros),
            resident as f64 / 1e6
        );
        if run.operations.len() > 1 {
            for o in &run.operations {
                let _ = writeln!(
                    out,
                    "| &nbsp;&nbsp;{} (weight {}) | {} | {} | | |",
                    o.op.name(),
                    o.weight,
                    int(o.ops_per_sec),
                    tail_cells(&o.latency)
                );
            }
        }
    }
    let s = &h.sweep;
    let _ = writeln!(
        out,
        "\nCapacity sweep (`{} --sweep --p99Ms {}`): the closed-loop maximum ({} ops/s), then open-loop steps \
         of 10% of it, latency counted from each intended send time, until p99 passed {} ms; then two \
         bisections between the last step within the bound and the first past it.\n\n\
         | offered ops/s | achieved ops/s | p50 | p99 | errors |\n|---:|---:|---:|---:|---:|",
        h.sweep_command,
        s.p99_bound_ms,
        int(s.closed_loop_max_per_sec),
        s.p99_bound_ms
    );
    for step in &s.steps {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            int(step.offered_per_sec.unwrap_or(0.0)),
            int(step.ops_per_sec),
            micros(step.latency.p50_us),
            micros(step.latency.p99_us),
            step.errors
        );
    }
    let _ = writeln!(
        out,
        "\nHighest offered rate within the bound: **{} ops/s** = {} per task thread ({} threads), {} per node \
         ({} node). The estimate `--targetRate {}` prints from it:\n\n> {}\n",
        int(s.max_sustainable_per_sec),
        int(s.per_thread_per_sec),
        s.threads,
        int(s.per_node_per_sec),
        s.nodes,
        h.estimate_rate,
        h.estimate.replace('\n', "\n> ")
    );
    let raw = &r.depot_single.raw_prewritten.latency;
    let _ = writeln!(
        out,
        "Why the sweep misses: an `Ack` append is two group commits in series (its own in the task group \
         log, then the stream topology's PState batch) plus a buffered partition write, each an io_uring \
         write taken by a kernel worker; at low rates this is about 1-2 ms at p50. The p99 of an open loop \
         counts every request caught behind a stall of the disk: the raw `pwrite` + `fdatasync` loop of \
         section 2 in this run reached {} at its maximum (p99.9 {}), and one such stall during a 3-second \
         step delays rate x stall requests, more than 1% of the step even at the lowest rate. The \
         closed-loop latencies in the table above do not show it because a stalled client sends \
         nothing meanwhile.\n",
        micros(raw.max_us),
        micros(raw.p999_us)
    );
}

/// Throughput in a line, for progress output.
pub fn brief(t: &Throughput) -> String {
    format!("{} ops/s, {} MB/s", int(t.ops_per_sec), mb(t.mb_per_sec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers_and_statuses() {
        assert_eq!(int(1_234_567.6), "1,234,568");
        assert_eq!(int(999.0), "999");
        assert_eq!(ratio(0.623), "0.62x");
        let t = Target {
            name: "t",
            measured: 0.623,
            goal: Goal::RatioAtLeast(0.8),
        };
        assert_eq!(t.status(), "missed (0.62x of 0.8x)");
        let t = Target {
            name: "t",
            measured: 1.1,
            goal: Goal::RatioAtMost(1.3),
        };
        assert_eq!(t.status(), "met");
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_825_600), "2000-02-29 12:00 UTC");
        assert_eq!(utc(1_767_225_600), "2026-01-01 00:00 UTC");
    }
}
