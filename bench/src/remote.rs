//! Through the network: a real cluster (`rama dev`: ZooKeeper, one
//! Conductor, one Supervisor, a worker process serving WordCountModule)
//! driven by remote clients from this process.
//!
//! 1. WordCount with `Ack` appends through `ClusterManager` clients (the
//!    same plan as the in-process run, so the two compare directly).
//! 2. PState point selects: connections each keeping 16 selects in flight,
//!    beside `redis-benchmark -t get -P 16` with as many connections
//!    against a Redis started here (both on loopback, same machine).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use control::config::Side;
use engine::pstate::Nav;
use engine::value::Value;
use net::manager::ClusterManager;
use serde::{Deserialize, Serialize};

use crate::results::{ensure, BenchResult, Throughput};
use crate::wordcount::{self, WordCount};

/// Selects in flight per connection, as `redis-benchmark -P 16`.
pub const PIPELINE: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointSelects {
    pub connections: usize,
    pub in_flight_per_connection: usize,
    pub keys: usize,
    pub ours: Throughput,
    pub redis: Throughput,
    /// `redis-server --version`.
    pub redis_version: String,
    pub redis_setup: String,
}

/// The CPU an idle worker process uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleWorker {
    pub module: String,
    /// How it ran (shape, and what it did before).
    pub setup: String,
    /// Over how long its CPU time was measured.
    pub seconds: f64,
    /// Its CPU time (user and system) over that time: a share of one core.
    pub core_share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Remote {
    /// How the cluster ran.
    pub setup: String,
    pub wordcount: WordCount,
    pub selects: PointSelects,
    #[serde(default)]
    pub idle: Vec<IdleWorker>,
}

/// The process id of the (first) worker of `module`, from the pid files
/// the Supervisor keeps under the cluster's `local.dir`, `cluster_dir`.
fn worker_pid(cluster_dir: &Path, module: &str) -> Option<u32> {
    let workers = cluster_dir.join("supervisor").join("workers");
    std::fs::read_dir(workers).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let assignment = name.strip_suffix(".pid")?;
        if !assignment.starts_with(&format!("{module}.")) {
            return None;
        }
        std::fs::read_to_string(e.path()).ok()?.trim().parse().ok()
    })
}

/// User plus system CPU seconds process `pid` has used.
fn cpu_seconds(pid: u32) -> BenchResult<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) in parentheses:
    // utime and stime are the 12th and 13th of them.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("an unreadable /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> BenchResult<f64> { Ok(fields.get(i).ok_or("a short /proc stat")?.parse::<f64>()?) };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// The worker of `module` left alone for `settle`, then its CPU use over
/// `window`.
fn idle_worker(
    cluster_dir: &Path,
    module: &str,
    setup: String,
    (settle, window): (Duration, Duration),
) -> BenchResult<IdleWorker> {
    let pid = worker_pid(cluster_dir, module).ok_or_else(|| format!("no worker pid file of {module}"))?;
    std::thread::sleep(settle);
    let before = cpu_seconds(pid)?;
    let started = Instant::now();
    std::thread::sleep(window);
    let used = cpu_seconds(pid)? - before;
    let seconds = started.elapsed().as_secs_f64();
    Ok(IdleWorker {
        module: module.into(),
        setup,
        seconds,
        core_share: used / seconds,
    })
}

/// Launches BankTransferModule on the dev cluster through `rama deploy`
/// and waits until its worker serves.
fn launch_bank(config: &Path) -> BenchResult<()> {
    let out = Command::new(beside_me("rama")?)
        .env("RAMA_CONFIG", config)
        .args(["deploy", "--action", "launch", "--jar"])
        .arg(beside_me("rama-examples")?)
        .args([
            "--module",
            "BankTransferModule",
            "--tasks",
            "4",
            "--threads",
            "2",
            "--workers",
            "1",
        ])
        .output()?;
    ensure(out.status.success(), || {
        format!(
            "rama deploy of BankTransferModule failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let manager = ClusterManager::open_with(Some(config), &[], Side::External)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match manager.tasks("BankTransferModule") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(format!("BankTransferModule did not start: {e}").into()),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A child process stopped by its process id when dropped: `signal`, then
/// SIGKILL after a grace period.
pub(crate) struct Stopped {
    child: Child,
    signal: i32,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        control::process::stop_child(&mut self.child, self.signal, Duration::from_secs(60));
    }
}

pub(crate) fn beside_me(name: &str) -> BenchResult<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    ensure(path.is_file(), || {
        format!(
            "{} is missing; build it with `cargo build --release -p rama-cli -p rama-examples` (bench/run does)",
            path.display()
        )
    })?;
    Ok(path)
}

/// `rama dev` under `dir` with WordCountModule on `tasks`/`threads` (and
/// `extra` arguments of `rama dev`); returns once it is running, with the
/// path of its rama.yaml.
pub(crate) fn start_cluster(dir: &Path, plan: &wordcount::Plan, extra: &[&str]) -> BenchResult<(Stopped, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let dir = &dir.canonicalize()?;
    let mut command = Command::new(beside_me("rama")?);
    command
        .current_dir(dir)
        .env_remove("RAMA_CONFIG")
        .args(["dev", "--dir"])
        .arg(dir.join("cluster"))
        .arg("--jar")
        .arg(beside_me("rama-examples")?)
        .args([
            "--tasks",
            &plan.tasks.to_string(),
            "--threads",
            &plan.threads.to_string(),
        ])
        .args(extra)
        .args(
            std::env::var("RAMA_BENCH_OVERRIDES")
                .map(|p| vec!["--configOverrides".to_string(), p])
                .unwrap_or_default(),
        )
        .stdout(Stdio::piped());
    // SAFETY: the pre-exec hook only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            // If the benchmark dies, the dev cluster is told to stop (it
            // destroys the module and stops its daemons).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let out = child.stdout.take().expect("piped");
    let guard = Stopped {
        child,
        signal: libc::SIGINT,
    };
    let mut lines = BufReader::new(out).lines();
    let mut said = Vec::new();
    loop {
        match lines.next() {
            Some(line) => {
                let line = line?;
                let ready = line.contains("Ctrl-C stops everything");
                said.push(line);
                if ready {
                    break;
                }
            }
            None => return Err(format!("rama dev stopped before the cluster ran:\n{}", said.join("\n")).into()),
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((guard, dir.join("cluster").join("rama.yaml")))
}

type SelectFuture = std::pin::Pin<Box<dyn std::future::Future<Output = engine::Result<Vec<Value>>> + Send>>;

fn key(i: u64, keys: usize) -> u64 {
    // A fixed scramble: every connection walks the keys in its own order.
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys as u64
}

/// `ops` point selects of words from `connections` clients, each a
/// `ClusterManager` of its own (one connection per task thread, a select
/// sent on the connection of its key's task), in pipelines of
/// [`PIPELINE`] (sent together, then their answers taken, as
/// `redis-benchmark -P` does).
fn point_selects(config: &Path, connections: usize, ops: u64, keys: usize) -> BenchResult<Throughput> {
    let per = ops / connections as u64;
    let started = Instant::now();
    std::thread::scope(|s| -> BenchResult<()> {
        let handles: Vec<_> = (0..connections)
            .map(|c| {
                s.spawn(move || -> Result<(), String> {
                    let manager =
                        ClusterManager::open_with(Some(config), &[], Side::External).map_err(|e| e.to_string())?;
                    let counts = manager
                        .pstate("WordCountModule", "$$wordCounts")
                        .map_err(|e| e.to_string())?;
                    // As redis-benchmark -P 16: send 16, take their 16 answers,
                    // send the next 16.
                    let mut batch: Vec<SelectFuture> = Vec::with_capacity(PIPELINE);
                    let mut i = 0;
                    while i < per {
                        for _ in 0..PIPELINE.min((per - i) as usize) {
                            let word = format!("w{:05}", key(i + c as u64 * per, keys));
                            batch.push(Box::pin(
                                counts
                                    .select_future(&[Nav::key(word.as_str())])
                                    .map_err(|e| e.to_string())?,
                            ));
                            i += 1;
                        }
                        for f in batch.drain(..) {
                            let values: Vec<Value> = futures_lite::future::block_on(f).map_err(|e| e.to_string())?;
                            if values.len() > 1 {
                                return Err(format!("a point select returned {values:?}"));
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a select client panicked")??;
        }
        Ok(())
    })?;
    Ok(Throughput::new(per * connections as u64, 0, started.elapsed()))
}

/// `redis-benchmark` GETs against a Redis started (and stopped) here:
/// their rate, Redis's version and its setup.
pub fn redis_gets(dir: &Path, connections: usize, ops: u64, keys: usize) -> BenchResult<(Throughput, String, String)> {
    let server = crate::redis::RedisServer::start(&dir.join("redis"), None)?;
    let port = server.port;
    let bench = |args: &[&str]| -> BenchResult<String> {
        let out = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--csv"])
            .args(args)
            .output()?;
        ensure(out.status.success(), || {
            format!("redis-benchmark failed: {}", String::from_utf8_lossy(&out.stderr))
        })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (c, r) = (connections.to_string(), keys.to_string());
    // The same keys exist, as in the PState.
    bench(&[
        "-t",
        "set",
        "-P",
        "16",
        "-c",
        &c,
        "-r",
        &r,
        "-n",
        &(keys * 4).to_string(),
    ])?;
    let started = Instant::now();
    let csv = bench(&["-t", "get", "-P", "16", "-c", &c, "-r", &r, "-n", &ops.to_string()])?;
    let elapsed = started.elapsed();
    let (version, setup) = (server.version.clone(), server.setup.clone());
    drop(server);
    // "GET","123456.78",... : requests per second as redis-benchmark measured.
    let rps: f64 = csv
        .lines()
        .find(|l| l.starts_with("\"GET\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .ok_or_else(|| format!("no GET line in redis-benchmark's output: {csv}"))?;
    let mut t = Throughput::new(ops, 0, elapsed);
    t.ops_per_sec = rps;
    t.seconds = ops as f64 / rps;
    Ok((t, version, setup))
}

pub fn run(plan: &wordcount::Plan, data: &Path, quick: bool) -> BenchResult<Remote> {
    let dir = data.join("remote");
    let outcome = (|| -> BenchResult<Remote> {
        let (cluster, config) = start_cluster(&dir, plan, &[])?;
        let manager = ClusterManager::open_with(Some(&config), &[], Side::External)?;
        let target = wordcount::Target::of(&manager)?;
        eprintln!("  WordCount through the remote client");
        let wordcount = wordcount::measure(plan, &target)?;
        let connections = 4;
        let ops = if quick { 8_000 } else { 2_000_000 };
        eprintln!("  point selects, {connections} connections x {PIPELINE} in flight");
        let ours = point_selects(&config, connections, ops, plan.vocabulary)?;
        drop(manager);
        let timing = if quick {
            (Duration::from_secs(1), Duration::from_secs(2))
        } else {
            (Duration::from_secs(5), Duration::from_secs(20))
        };
        let cluster_dir = &config.parent().ok_or("rama.yaml has no directory")?.join("data");
        eprintln!("  idle workers: WordCountModule after the load, then BankTransferModule launched");
        let mut idle = vec![idle_worker(
            cluster_dir,
            "WordCountModule",
            format!(
                "{} tasks on {} threads, after the loads above ({} s left alone first)",
                plan.tasks,
                plan.threads,
                timing.0.as_secs()
            ),
            timing,
        )?];
        launch_bank(&config)?;
        idle.push(idle_worker(
            cluster_dir,
            "BankTransferModule",
            format!(
                "4 tasks on 2 threads, launched with `rama deploy` and given no records (its microbatch \
                 coordinator runs; {} s left alone first)",
                timing.0.as_secs()
            ),
            timing,
        )?);
        for i in &idle {
            eprintln!("  idle {}: {:.2}% of a core", i.module, i.core_share * 100.0);
        }
        drop(cluster);
        eprintln!("  redis-benchmark -t get -P {PIPELINE} -c {connections}");
        let (redis, redis_version, redis_setup) = redis_gets(&dir, connections, ops, plan.vocabulary)?;
        eprintln!(
            "  selects: ours {:.0}/s, redis GET {:.0}/s",
            ours.ops_per_sec, redis.ops_per_sec
        );
        Ok(Remote {
            setup: format!(
                "`rama dev`: ZooKeeper, one Conductor and one Supervisor on loopback; WordCountModule on one worker \
                 process ({} tasks, {} task threads); clients in the benchmark process",
                plan.tasks, plan.threads
            ),
            wordcount,
            selects: PointSelects {
                connections,
                in_flight_per_connection: PIPELINE,
                keys: plan.vocabulary,
                ours,
                redis,
                redis_version,
                redis_setup: format!("redis-server on loopback, {redis_setup}: a GET never touches the disk"),
            },
            idle,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}
