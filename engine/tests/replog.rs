//! The task group log (replog): one ordered, durable log per task thread
//! holding depot appends and PState batches; depot partitions are unsynced
//! materializations written again from it after a crash.
//!
//! The kill test re-executes this test binary as an appending child (with
//! `RAMA_REPLOG_CHILD=<dir>` set), kills it with SIGKILL, then damages
//! every partition's tail as a power loss could (unsynced pages lost, a
//! hole with intact frames after it) before it reopens the cluster and
//! checks that every acknowledged append is in its partition at its
//! offset, once. Rerun with `RAMA_REPLOG_SEED=<seed>`.

mod common;
use common::Rng;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use engine::cluster::config::ModuleConfig;
use engine::cluster::{AckLevel, InProcessCluster};
use engine::log::{Log, LogConfig};
use engine::module::ModuleDef;
use engine::pstate::Nav;
use engine::value::Value;

const TASKS: u32 = 4;
const THREADS: u32 = 2;
const CHILD_ENV: &str = "RAMA_REPLOG_CHILD";

fn module() -> ModuleDef {
    common::word_count("Replog")
}

/// Small segments and frequent checkpoints, so trimming happens in a test.
fn small_config() -> ModuleConfig {
    let mut c = ModuleConfig {
        checkpoint_interval: Duration::from_millis(20),
        replog_entry_bytes_max: 4 << 10,
        ..ModuleConfig::default()
    };
    c.log.record_bytes_max = 1024;
    c.log.segment_bytes_max = 16 << 10;
    c.log.pending_bytes_max = 64 << 10;
    c.lsm.key_bytes_max = 256;
    c.lsm.value_bytes_max = 1024;
    c.lsm.batch_bytes_max = 4 << 10;
    c.lsm.wal.segment_bytes_max = 16 << 10;
    c.lsm.wal.record_bytes_max = 4 << 10;
    c.lsm.wal.pending_bytes_max = 64 << 10;
    c
}

fn word(i: u64) -> String {
    format!("w{}-{}", i % 37, i)
}

fn read_all(cluster: &InProcessCluster, task: u32) -> Vec<(u64, Value)> {
    let client = cluster.depot("Replog", "*words").unwrap();
    let mut out = Vec::new();
    loop {
        let next = out.last().map_or(0, |(o, _): &(u64, Value)| o + 1);
        let got = client.read(task, next, u64::MAX, 64 << 10).unwrap();
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

fn partition_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for tg in 0..THREADS {
        let depot = dir.join(format!("Replog/tg-{tg}/depot-0"));
        for e in std::fs::read_dir(&depot).unwrap() {
            out.push(e.unwrap().path());
        }
    }
    out.sort();
    out
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    out.sort();
    out
}

/// Per task of task group `tg`: the lowest partition offset the task
/// group log still holds an append for. Below it the partition is synced
/// (the log is trimmed only below synced records); from it on, a power
/// loss may have taken its pages.
fn unsynced_from(dir: &Path, tg: u32) -> BTreeMap<u32, u64> {
    run(async {
        let wal = dir.join(format!("Replog/tg-{tg}/pstates/wal"));
        let (log, _) = Log::open(&wal, LogConfig::default()).await.unwrap();
        let mut first = BTreeMap::new();
        for r in log.read(log.start_offset(), u64::MAX, usize::MAX).await.unwrap() {
            if r.payload[0] == 1 {
                let task = u32::from_le_bytes(r.payload[3..7].try_into().unwrap());
                let offset = u64::from_le_bytes(r.payload[7..15].try_into().unwrap());
                first.entry(task).or_insert(offset);
            }
        }
        log.close().await.unwrap();
        first
    })
}

/// What a power loss can do to an unsynced partition: its tail segment
/// loses pages from the first frame not known synced on (`from`: the
/// lowest offset the task group log still holds for it), as a hole with
/// intact frames possibly after it or as a cut end; and nothing says it
/// was closed cleanly.
fn lose_unsynced_pages(partition: &Path, from: Option<u64>, rng: &mut Rng) {
    let _ = std::fs::remove_file(partition.join("CLOSED_CLEANLY"));
    let (Some(from), Some(tail)) = (from, segments(partition).pop()) else {
        return;
    };
    let mut bytes = std::fs::read(&tail).unwrap();
    // Frames: 24-byte head (body length u32, CRC, base offset u64, count,
    // epoch) after the 32-byte segment header.
    let mut pos = 32;
    let start = loop {
        if pos + 24 > bytes.len() {
            return;
        }
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let base = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().unwrap());
        if len == 0 {
            return;
        }
        if base >= from {
            break pos;
        }
        pos += 24 + len;
    };
    let at = rng.range(start as u64, bytes.len() as u64) as usize;
    match rng.below(3) {
        0 => bytes.truncate(at),
        _ => {
            let to = (at + rng.range(1, 600) as usize).min(bytes.len());
            bytes[at..to].fill(0);
        }
    }
    std::fs::write(&tail, bytes).unwrap();
}

/// Damages the unsynced tails of the partitions of every task group
/// (each with probability `p` in 1/4s).
fn lose_unsynced_everywhere(dir: &Path, quarters: u64, rng: &mut Rng) {
    for tg in 0..THREADS {
        let first = unsynced_from(dir, tg);
        for p in partition_dirs(dir) {
            if !p.starts_with(dir.join(format!("Replog/tg-{tg}"))) || rng.below(4) >= quarters {
                continue;
            }
            let task: u32 = p.file_name().unwrap().to_str().unwrap()["task-".len()..]
                .parse()
                .unwrap();
            lose_unsynced_pages(&p, first.get(&task).copied(), rng);
        }
    }
}

#[test]
fn appends_and_batches_share_one_log_and_lost_partition_pages_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch(module(), TASKS, THREADS).unwrap();
    let words = cluster.depot("Replog", "*words").unwrap();
    let mut acked = Vec::new();
    for i in 0..400 {
        let w = word(i);
        let r = words.append(&Value::from(w.as_str()), AckLevel::Ack).unwrap();
        acked.push((r.task, r.offset.unwrap(), w));
    }
    let before: Vec<_> = (0..TASKS).map(|t| read_all(&cluster, t)).collect();
    cluster.shutdown().unwrap();

    // The task group log holds both kinds of entry, in one sequence.
    for tg in 0..THREADS {
        run(async {
            let wal = dir.path().join(format!("Replog/tg-{tg}/pstates/wal"));
            let (log, _) = Log::open(&wal, LogConfig::default()).await.unwrap();
            let records = log.read(log.start_offset(), u64::MAX, usize::MAX).await.unwrap();
            let kinds: std::collections::BTreeSet<u8> = records.iter().map(|r| r.payload[0]).collect();
            assert_eq!(
                kinds,
                [0u8, 1].into(),
                "PState batches (0) and depot appends (1) in one log"
            );
            assert!(records.iter().all(|r| r.epoch == 0), "no leader epoch yet");
            log.close().await.unwrap();
        });
    }

    // Lose pages of every partition as an unsynced write could.
    lose_unsynced_everywhere(dir.path(), 4, &mut Rng::new(7));
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch(module(), TASKS, THREADS).unwrap();
    let after: Vec<_> = (0..TASKS).map(|t| read_all(&cluster, t)).collect();
    assert_eq!(after, before, "every partition written again from the task group log");
    for (task, offset, w) in &acked {
        assert_eq!(after[*task as usize][*offset as usize].1, Value::from(w.as_str()));
    }
    // Nothing was processed twice: the counts are the appends'.
    let counts = cluster.pstate("Replog", "$$counts").unwrap();
    for (_, _, w) in acked.iter().take(20) {
        assert_eq!(
            counts.select_one(&[Nav::key(w.as_str())]).unwrap(),
            Value::Int(1),
            "{w}"
        );
    }
    cluster.shutdown().unwrap();
}

#[test]
fn checkpoints_trim_the_task_group_log_and_a_missing_partition_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.set_module_config(small_config());
    cluster.launch(module(), TASKS, THREADS).unwrap();
    let words = cluster.depot("Replog", "*words").unwrap();
    let wal_start = |tg: u32| {
        segments(&dir.path().join(format!("Replog/tg-{tg}/pstates/wal")))
            .first()
            .and_then(|p| p.file_stem()?.to_str()?.parse::<u64>().ok())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while (0..THREADS).any(|tg| wal_start(tg) == 0) {
        assert!(
            Instant::now() < deadline,
            "checkpoints never trimmed the task group log"
        );
        for _ in 0..50 {
            words
                .append(&Value::from(word(i).as_str()), AckLevel::AppendAck)
                .unwrap();
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let before: Vec<_> = (0..TASKS).map(|t| read_all(&cluster, t)).collect();
    assert_eq!(before.iter().map(Vec::len).sum::<usize>() as u64, i);
    cluster.shutdown().unwrap();

    // Trimmed below the partitions' synced records: they reopen whole.
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.set_module_config(small_config());
    cluster.launch(module(), TASKS, THREADS).unwrap();
    let after: Vec<_> = (0..TASKS).map(|t| read_all(&cluster, t)).collect();
    assert_eq!(after, before);
    cluster.shutdown().unwrap();

    // A partition whose files are gone cannot be rebuilt from a trimmed
    // log: the start is refused, naming it, rather than serving a partition
    // with records missing.
    let gone = partition_dirs(dir.path()).remove(0);
    std::fs::remove_dir_all(&gone).unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.set_module_config(small_config());
    let err = cluster.launch(module(), TASKS, THREADS).unwrap_err().to_string();
    assert!(
        err.contains(&gone.display().to_string()) && err.contains("missing"),
        "{err}"
    );
}

fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    engine::executor::ExecutorConfig::default()
        .block_on(fut)
        .expect("executor starts")
}

/// The child: appends forever, one `@@ack task offset word` line per
/// acknowledged append (AppendAck and Ack alternate), until killed.
fn child(dir: &Path, cycle: u64) -> ! {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        eprintln!("replog child: not killed in time; exiting");
        std::process::exit(3);
    });
    let mut cluster = InProcessCluster::new(dir);
    cluster.set_module_config(small_config());
    if let Err(e) = cluster.launch(module(), TASKS, THREADS) {
        println!("@@failed {e}");
        std::process::exit(5);
    }
    let words = cluster.depot("Replog", "*words").unwrap();
    let handles: Vec<_> = (0..3u64)
        .map(|c| {
            let words = words.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                loop {
                    let w = format!("c{cycle}-{c}-{i}");
                    let ack = if i % 2 == 0 { AckLevel::AppendAck } else { AckLevel::Ack };
                    let r = words.append(&Value::from(w.as_str()), ack).unwrap();
                    println!("@@ack {} {} {w} end", r.task, r.offset.unwrap());
                    i += 1;
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    std::process::exit(4)
}

#[test]
fn acknowledged_appends_survive_sigkill_and_lost_partition_pages() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        let cycle = std::env::var("RAMA_REPLOG_CYCLE").unwrap().parse().unwrap();
        child(Path::new(&dir), cycle);
    }
    let seed = std::env::var("RAMA_REPLOG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64);
    eprintln!("replog kill test seed {seed} (rerun with RAMA_REPLOG_SEED={seed})");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<(u32, u64), String> = BTreeMap::new();
    for cycle in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "acknowledged_appends_survive_sigkill_and_lost_partition_pages",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("RAMA_REPLOG_CYCLE", cycle.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("@@ack ") {
                    let _ = tx.send(rest.to_string());
                } else if let Some(why) = line.strip_prefix("@@failed ") {
                    panic!("cycle {cycle}: the child could not start the module: {why}");
                }
            }
        });
        // Killed a while after its first acknowledgement.
        let first = rx
            .recv_timeout(Duration::from_secs(90))
            .expect("the child acknowledged an append");
        std::thread::sleep(Duration::from_millis(rng.range(50, 600)));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        for line in std::iter::once(first).chain(rx.try_iter()) {
            // A line cut by the kill has no end marker: not counted.
            let f: Vec<&str> = line.split(' ').collect();
            if let [task, offset, w, "end"] = f[..] {
                acked.insert((task.parse().unwrap(), offset.parse().unwrap()), w.to_string());
            }
        }
        lose_unsynced_everywhere(dir.path(), 2, &mut rng);
        let mut cluster = InProcessCluster::new(dir.path());
        cluster.set_module_config(small_config());
        cluster.launch(module(), TASKS, THREADS).unwrap();
        let partitions: Vec<_> = (0..TASKS).map(|t| read_all(&cluster, t)).collect();
        for ((task, offset), w) in &acked {
            let got = partitions[*task as usize].iter().find(|(o, _)| o == offset);
            assert_eq!(
                got.map(|(_, v)| v.clone()),
                Some(Value::from(w.as_str())),
                "cycle {cycle}, seed {seed}: acknowledged append {w} at {task}/{offset}"
            );
        }
        // Offsets are dense and every record is there once.
        for (t, p) in partitions.iter().enumerate() {
            for (i, (o, _)) in p.iter().enumerate() {
                assert_eq!(*o, p[0].0 + i as u64, "partition {t} has a gap (seed {seed})");
            }
            let mut seen = std::collections::BTreeSet::new();
            assert!(
                p.iter().all(|(_, v)| seen.insert(v.clone())),
                "partition {t} holds a record twice (seed {seed})"
            );
        }
        cluster.shutdown().unwrap();
    }
    assert!(!acked.is_empty());
}
