//! Replication through a real cluster (issue 13): WordCount with `Ack`
//! appends on `rama dev` with replication factor 1 and then 3 (three
//! Supervisors on 127.0.0.1-3, one replica of each task group on each),
//! the same plan as section 6, side by side in one run; then failovers:
//! under a steady load of `Ack` appends, the process leading task group 0
//! is killed with SIGKILL (its Supervisor starts it again) and the time
//! from the kill to the first acknowledged append sent after it to a task
//! of that group is measured, repeatedly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use control::config::Side;
use control::layout::Layout;
use engine::cluster::AckLevel;
use engine::runtime::placement::{Parallelism, Placement};
use engine::value::Value;
use net::manager::ClusterManager;
use serde::{Deserialize, Serialize};

use crate::remote::start_cluster;
use crate::results::{ensure, BenchResult};
use crate::wordcount::{self, WordCount};

const MODULE: &str = "WordCountModule";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failovers {
    /// How the load ran and what was killed.
    pub setup: String,
    /// Seconds from each kill to the first acknowledged append to the
    /// killed leader's task group.
    pub seconds: Vec<f64>,
    pub p50_seconds: f64,
    pub max_seconds: f64,
    /// Appends that failed while leaders were replaced (their outcome is
    /// unknown to the client; none is retried).
    pub failed_appends: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicatedCluster {
    pub setup: String,
    pub rf1: WordCount,
    pub rf3: WordCount,
    pub failovers: Failovers,
}

impl ReplicatedCluster {
    /// RF 3 word increments/s over RF 1's (target at least 0.6).
    pub fn ratio(&self) -> f64 {
        self.rf3.max.ops_per_sec / self.rf1.max.ops_per_sec
    }
}

/// The pid of worker process `process` of the module, from the pid files
/// of the dev cluster's Supervisors (`cluster/data/supervisor-N/...`).
fn process_pid(data: &Path, process: u32) -> Option<u32> {
    let file = format!("{MODULE}.0.{process}.pid");
    std::fs::read_dir(data).ok()?.flatten().find_map(|node| {
        let path = node.path().join("supervisor").join("workers").join(&file);
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    })
}

/// Task group 0's node: (leader process, epoch, ISR size), if it has a leader.
fn group(meta: &dyn control::metastore::Metastore, tg: u32) -> Option<(Option<u32>, u32, usize)> {
    let (node, _) = Layout::new(meta).group(MODULE, 0, tg).ok()??;
    let leader = node
        .leader
        .and_then(|l| node.replicas.get(l.replica as usize))
        .map(|p| p.worker);
    Some((leader, node.epoch, node.isr.len()))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> BenchResult<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        ensure(Instant::now() < deadline, || format!("timed out waiting for {what}"))?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn failovers(config: &Path, plan: &wordcount::Plan, kills: usize) -> BenchResult<Failovers> {
    let cluster_data: PathBuf = config.parent().ok_or("rama.yaml has no directory")?.join("data");
    let meta = net::manager::connect_metastore(&net::manager::load_config(Some(config), &[])?, Side::Internal)?;
    let placement = Placement::new(Parallelism::new(plan.tasks, plan.threads, 1)?);
    let manager = ClusterManager::open_with(Some(config), &[], Side::External)?;
    let threads = plan.threads;
    let groups_in_sync = |meta: &dyn control::metastore::Metastore| {
        (0..threads).all(|tg| group(meta, tg).is_some_and(|g| g.0.is_some() && g.2 == 3))
    };
    wait_for(
        "every task group led with three replicas in sync",
        Duration::from_secs(120),
        || groups_in_sync(&meta),
    )?;
    // Acknowledged appends to task group 0: when each was sent and answered.
    let acked: Mutex<Vec<(Instant, Instant)>> = Mutex::new(Vec::new());
    let failed = std::sync::atomic::AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut seconds = Vec::new();
    std::thread::scope(|s| -> BenchResult<()> {
        for c in 0..2u64 {
            let depot = manager.depot(MODULE, "*sentences")?;
            let (acked, failed, stop, placement) = (&acked, &failed, &stop, &placement);
            s.spawn(move || {
                let mut i = c;
                while !stop.load(Ordering::SeqCst) {
                    i += 2;
                    let sent = Instant::now();
                    match depot.append(&Value::from(format!("failover{i} load")), AckLevel::Ack) {
                        Ok(r) if placement.thread_of_task[r.task as usize] == 0 => acked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((sent, Instant::now())),
                        Ok(_) => {}
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            });
        }
        let outcome = (|| -> BenchResult<()> {
            for k in 0..kills {
                std::thread::sleep(Duration::from_secs(1));
                let (leader, epoch, _) = group(&meta, 0).ok_or("task group 0 has no node")?;
                let process = leader.ok_or("task group 0 has no leader")?;
                let pid = process_pid(&cluster_data, process).ok_or("no pid file of the leader's process")?;
                let killed = Instant::now();
                // SAFETY: kills a worker of the dev cluster this benchmark started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                wait_for("a new leader of task group 0", Duration::from_secs(60), || {
                    group(&meta, 0).is_some_and(|g| g.0.is_some() && g.1 > epoch)
                })?;
                wait_for(
                    "an acknowledged append to task group 0",
                    Duration::from_secs(60),
                    || {
                        acked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .iter()
                            .any(|(sent, _)| *sent >= killed)
                    },
                )?;
                let first = acked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .filter(|(sent, _)| *sent >= killed)
                    .map(|(_, done)| *done)
                    .min()
                    .expect("waited for one");
                let took = first.duration_since(killed).as_secs_f64();
                eprintln!("  kill {}: first acknowledged append after {took:.3} s", k + 1);
                seconds.push(took);
                wait_for("the killed replica back in sync", Duration::from_secs(120), || {
                    groups_in_sync(&meta)
                })?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        outcome
    })?;
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Failovers {
        setup: format!(
            "two client threads, each one `Ack` append at a time; {kills} times: SIGKILL to the process leading \
             task group 0 (its Supervisor starts it again at once), measured from the kill to the answer of the \
             first acknowledged append sent after it to a task of that group; before the next kill, all three \
             replicas of every group in sync again; replication.session.timeout.millis 2000 (default)"
        ),
        p50_seconds: sorted[sorted.len() / 2],
        max_seconds: *sorted.last().expect("at least one kill"),
        seconds,
        failed_appends: failed.into_inner(),
    })
}

pub fn run(plan: &wordcount::Plan, data: &Path, quick: bool) -> BenchResult<ReplicatedCluster> {
    let mut runs = Vec::new();
    let mut failovers_result = None;
    for rf in ["1", "3"] {
        let dir = data.join(format!("replicated-rf{rf}"));
        let outcome = (|| -> BenchResult<()> {
            let (cluster, config) = start_cluster(&dir, plan, &["--replicationFactor", rf])?;
            let manager = ClusterManager::open_with(Some(&config), &[], Side::External)?;
            let target = wordcount::Target::of(&manager)?;
            eprintln!("  WordCount with replication factor {rf}");
            runs.push(wordcount::measure(plan, &target)?);
            drop(target);
            drop(manager);
            if rf == "3" {
                eprintln!("  failovers under load");
                failovers_result = Some(failovers(&config, plan, if quick { 1 } else { 7 })?);
            }
            drop(cluster);
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        outcome?;
    }
    let rf3 = runs.pop().expect("two runs");
    let rf1 = runs.pop().expect("two runs");
    Ok(ReplicatedCluster {
        setup: format!(
            "`rama dev --replicationFactor N`: ZooKeeper and a Conductor on 127.0.0.1, N Supervisors on 127.0.0.1-N, \
             WordCountModule on one worker ({} tasks, {} task threads per process), so N worker processes, one \
             replica of each task group in each (RF 3: min-ISR 2, an append is acknowledged once all three hold \
             it while they keep up); clients in the benchmark process, all on this machine's 2 cores and one disk",
            plan.tasks, plan.threads
        ),
        rf1,
        rf3,
        failovers: failovers_result.ok_or("the RF 3 run measured no failover")?,
    })
}
