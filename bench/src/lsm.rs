//! LSM key-value workloads run against every engine in [`ENGINES`], side by
//! side: fillrandom (batches, each synced), readrandom (point gets) and
//! range scans. Each engine is one column of the comparison; adding an
//! engine is one more [`Runner`] in [`ENGINES`].

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::results::{ensure, BenchResult};

/// The workload every engine runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    /// Keys written by fillrandom.
    pub keys: u64,
    pub key_bytes: usize,
    pub value_bytes: usize,
    /// Keys per write batch; every batch is synced before the next.
    pub batch: u64,
    /// Point gets of readrandom.
    pub reads: u64,
    /// Range scans, each from a random key.
    pub scans: u64,
    /// Entries read by each scan.
    pub scan_len: u64,
    /// Runs of each engine, round-robin; each phase reports the median.
    #[serde(default = "one")]
    pub repeats: u32,
}

fn one() -> u32 {
    1
}

/// One phase of one engine's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpRate {
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    /// Gets (or seeks) that found a key, where the engine reports it.
    #[serde(default)]
    pub found: Option<u64>,
    /// Entries scanned, where the engine reports it.
    #[serde(default)]
    pub entries: Option<u64>,
}

/// One engine's results: one column of the comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineRun {
    pub engine: String,
    pub version: Option<String>,
    /// The commands run, for engines run as subprocesses.
    pub commands: Vec<String>,
    pub fill: OpRate,
    pub read: OpRate,
    pub scan: OpRate,
    /// Facts about this engine's run worth knowing when reading its numbers.
    pub notes: Vec<String>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LsmComparison {
    pub workload: Workload,
    pub engines: Vec<EngineRun>,
}

/// Runs the workload on a fresh, empty directory.
pub type Runner = fn(&Workload, &Path) -> BenchResult<EngineRun>;

/// Every engine compared, in column order; ours comes first, and the report
/// shows how many times each other column ours is.
pub const ENGINES: &[(&str, Runner)] = &[("ours", ours), ("fjall", fjall), ("rocksdb", rocksdb)];

/// Seed of the generated keys and values; the same for every in-process engine.
const SEED: u64 = 0x5eed;

/// Our LSM (`engine::lsm::Store`) on one task thread, in this process.
fn ours(w: &Workload, dir: &Path) -> BenchResult<EngineRun> {
    use crate::keys::{fill_value, key, Rng};
    use engine::executor::ExecutorConfig;
    use engine::lsm::{LsmConfig, Store, WriteBatch};
    use std::ops::Bound;
    use std::time::Instant;

    ensure(w.key_bytes == 16, || {
        "the in-process workload writes 16-byte keys only".into()
    })?;
    let w = w.clone();
    let dir = dir.to_path_buf();
    let config = ExecutorConfig {
        name: "bench-lsm".into(),
        ..ExecutorConfig::default()
    };
    let (fill, read, scan, stats) = config.run_on_thread(move || async move {
        let (store, _) = Store::open(&dir, LsmConfig::default()).await?;
        let mut rng = Rng(SEED);
        let mut value = vec![0u8; w.value_bytes];
        let start = Instant::now();
        let mut i = 0;
        while i < w.keys {
            let n = w.batch.min(w.keys - i);
            let mut batch = WriteBatch::new();
            for j in i..i + n {
                fill_value(&mut rng, &mut value);
                batch.put(key(SEED, j), &value);
            }
            store.write(batch).await?;
            i += n;
        }
        let fill_seconds = start.elapsed().as_secs_f64();

        let start = Instant::now();
        let mut found = 0u64;
        for _ in 0..w.reads {
            let k = key(SEED, rng.below(w.keys));
            if let Some(v) = store.get(&k)? {
                found += 1;
                if v.len() != w.value_bytes {
                    return Err(engine::Error::Schema(format!("read back a {}-byte value", v.len())));
                }
            }
        }
        let read_seconds = start.elapsed().as_secs_f64();

        let start = Instant::now();
        let mut entries = 0u64;
        for _ in 0..w.scans {
            let from = key(SEED, rng.below(w.keys));
            entries += store
                .scan(Bound::Included(&from), Bound::Unbounded, false, w.scan_len as usize)?
                .len() as u64;
        }
        let scan_seconds = start.elapsed().as_secs_f64();
        let stats = store.stats();
        store.close().await?;
        let rate = |ops: u64, seconds: f64| OpRate {
            ops,
            seconds,
            ops_per_sec: ops as f64 / seconds,
            found: None,
            entries: None,
        };
        Ok::<_, engine::Error>((
            rate(w.keys, fill_seconds),
            OpRate {
                found: Some(found),
                ..rate(w.reads, read_seconds)
            },
            OpRate {
                entries: Some(entries),
                ..rate(w.scans, scan_seconds)
            },
            stats,
        ))
    })??;
    Ok(EngineRun {
        engine: "ours".into(),
        version: Some(format!("rama-engine {}", env!("CARGO_PKG_VERSION"))),
        commands: Vec::new(),
        fill,
        read,
        scan,
        notes: vec![
            "in-process on one glommio task thread; reads and scans follow the fill in the same process".into(),
            "every batch is one WAL record, fdatasync'd before the write returns".into(),
            format!(
                "after the run: {} tables, {} flushes, {} compactions, {} MiB in the memtable",
                stats.tables,
                stats.flushes,
                stats.compactions,
                stats.memtable_bytes >> 20
            ),
        ],
    })
}

/// Runs every engine in [`ENGINES`], each in its own directory under `dir`.
pub fn run(workload: &Workload, dir: &Path) -> BenchResult<LsmComparison> {
    run_engines(workload, dir, &ENGINES.iter().map(|(n, _)| *n).collect::<Vec<_>>())
}

/// Runs the engines of [`ENGINES`] named in `names` (in [`ENGINES`] order).
pub fn run_engines(workload: &Workload, dir: &Path, names: &[&str]) -> BenchResult<LsmComparison> {
    for n in names {
        ensure(ENGINES.iter().any(|(e, _)| e == n), || {
            format!("no LSM engine named {n}")
        })?;
    }
    let engines: Vec<&(&str, Runner)> = ENGINES.iter().filter(|(n, _)| names.contains(n)).collect();
    // Round-robin repeats, so that a slow spell of the (shared, virtual)
    // disk hits every engine alike; each phase then reports its median.
    let mut runs: Vec<Vec<EngineRun>> = vec![Vec::new(); engines.len()];
    for round in 0..workload.repeats.max(1) {
        for (i, (name, runner)) in engines.iter().enumerate() {
            let engine_dir = dir.join(format!("lsm-{name}"));
            eprintln!("  lsm: {name} (run {} of {})", round + 1, workload.repeats.max(1));
            let result = runner(workload, &engine_dir).map_err(|e| format!("lsm engine {name}: {e}"))?;
            check(workload, &result).map_err(|e| format!("lsm engine {name}: {e}"))?;
            if engine_dir.exists() {
                std::fs::remove_dir_all(&engine_dir).map_err(|e| format!("removing {}: {e}", engine_dir.display()))?;
            }
            runs[i].push(result);
        }
    }
    Ok(LsmComparison {
        workload: workload.clone(),
        engines: runs.into_iter().map(median_run).collect(),
    })
}

/// One engine's runs folded into one: each phase is the run with the
/// median rate of that phase; the notes list every run's rates.
fn median_run(mut runs: Vec<EngineRun>) -> EngineRun {
    fn median(runs: &[EngineRun], phase: fn(&EngineRun) -> &OpRate) -> OpRate {
        let mut rates: Vec<&OpRate> = runs.iter().map(phase).collect();
        rates.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
        rates[rates.len() / 2].clone()
    }
    let fill = median(&runs, |r| &r.fill);
    let read = median(&runs, |r| &r.read);
    let scan = median(&runs, |r| &r.scan);
    let list = |phase: fn(&EngineRun) -> &OpRate| {
        runs.iter()
            .map(|r| format!("{:.0}", phase(r).ops_per_sec))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let spread = (runs.len() > 1).then(|| {
        format!(
            "median of {} runs; fillrandom {} keys/s; readrandom {} gets/s; scans {} scans/s",
            runs.len(),
            list(|r| &r.fill),
            list(|r| &r.read),
            list(|r| &r.scan)
        )
    });
    let mut out = runs.swap_remove(0);
    out.fill = fill;
    out.read = read;
    out.scan = scan;
    out.notes.extend(spread);
    out
}

/// Sanity of one engine's results: every phase did what was asked.
fn check(w: &Workload, r: &EngineRun) -> BenchResult<()> {
    for (phase, rate, ops) in [
        ("fill", &r.fill, w.keys),
        ("read", &r.read, w.reads),
        ("scan", &r.scan, w.scans),
    ] {
        ensure(rate.ops == ops, || {
            format!("{phase}: {} operations, expected {ops}", rate.ops)
        })?;
        ensure(rate.ops_per_sec.is_finite() && rate.ops_per_sec > 0.0, || {
            format!("{phase}: rate {} is not a positive number", rate.ops_per_sec)
        })?;
    }
    let found = r
        .read
        .found
        .ok_or("read: the engine did not report how many gets found a key")?;
    ensure(found > 0 && found <= w.reads, || {
        format!("read: {found} of {} gets found a key", w.reads)
    })?;
    if let Some(entries) = r.scan.entries {
        ensure(entries > 0 && entries <= w.scans * w.scan_len, || {
            format!("scan: {entries} entries from {} scans of {}", w.scans, w.scan_len)
        })?;
    }
    Ok(())
}

/// Runs `cmd`, returning its standard output; a failure carries its stderr.
fn output_of(mut cmd: Command) -> BenchResult<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("running {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Shows a command as it could be typed.
fn command_line(program: &Path, args: &[String]) -> String {
    std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn fjall_crate_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("baselines/fjall")
}

/// Builds the fjall baseline (a no-op when up to date) and returns its path.
fn build_fjall_baseline() -> BenchResult<PathBuf> {
    let crate_dir = fjall_crate_dir();
    ensure(crate_dir.join("Cargo.toml").exists(), || {
        format!(
            "the fjall baseline is built from the source tree and {} is not there (run it from a checkout)",
            crate_dir.display()
        )
    })?;
    let target = crate_dir.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .map_err(|e| format!("running cargo to build the fjall baseline: {e} (is cargo on PATH?)"))?;
    ensure(status.success(), || {
        format!("building the fjall baseline failed ({status})")
    })?;
    Ok(target.join("release/fjall-baseline"))
}

/// The version of `package` pinned in the fjall baseline's Cargo.lock.
fn locked_version(package: &str) -> Option<String> {
    let lock = std::fs::read_to_string(fjall_crate_dir().join("Cargo.lock")).ok()?;
    let name_line = format!("name = \"{package}\"");
    let mut lines = lock.lines();
    lines.find(|l| *l == name_line)?;
    let version = lines.next()?.strip_prefix("version = \"")?.strip_suffix('"')?;
    Some(version.to_string())
}

/// fjall 3, through the `fjall-baseline` binary (bench/baselines/fjall).
fn fjall(w: &Workload, dir: &Path) -> BenchResult<EngineRun> {
    /// What `fjall-baseline` prints.
    #[derive(Deserialize)]
    struct Output {
        fill: OpRate,
        read: OpRate,
        scan: OpRate,
    }
    ensure(w.key_bytes == 16, || "fjall-baseline writes 16-byte keys only".into())?;
    let bin = build_fjall_baseline()?;
    let args: Vec<String> = [
        ("--dir", dir.display().to_string()),
        ("--keys", w.keys.to_string()),
        ("--value-bytes", w.value_bytes.to_string()),
        ("--batch", w.batch.to_string()),
        ("--reads", w.reads.to_string()),
        ("--scans", w.scans.to_string()),
        ("--scan-len", w.scan_len.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    let mut cmd = Command::new(&bin);
    cmd.args(&args);
    let stdout = output_of(cmd)?;
    let line = stdout.lines().last().ok_or("fjall-baseline printed nothing")?;
    let out: Output = serde_json::from_str(line).map_err(|e| format!("fjall-baseline output {line:?}: {e}"))?;
    Ok(EngineRun {
        engine: "fjall".into(),
        version: locked_version("fjall"),
        commands: vec![command_line(&bin, &args)],
        fill: out.fill,
        read: out.read,
        scan: out.scan,
        notes: vec![
            "in-process; reads and scans follow the fill in the same process".into(),
            "reads get keys that were written".into(),
        ],
    })
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The package version installed, per dpkg.
fn debian_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Parses db_bench's result line of `benchmark`, e.g.
/// `readrandom : 12.110 micros/op 80775 ops/sec 0.001 seconds 100 operations; 5.2 MB/s (58 of 100 found)`.
fn parse_db_bench(stdout: &str, benchmark: &str) -> BenchResult<OpRate> {
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(benchmark) && l.contains("ops/sec"))
        .ok_or_else(|| format!("no result line for {benchmark} in db_bench output:\n{stdout}"))?;
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let before = |unit: &str| -> BenchResult<&str> {
        let i = tokens
            .iter()
            .position(|t| *t == unit)
            .filter(|&i| i > 0)
            .ok_or_else(|| format!("no `{unit}` in db_bench line {line:?}"))?;
        Ok(tokens[i - 1])
    };
    let found = match line.split_once('(') {
        Some((_, rest)) if rest.contains(" found)") => {
            let n = rest.split_whitespace().next().unwrap_or_default();
            Some(n.parse().map_err(|e| format!("found count {n:?} in {line:?}: {e}"))?)
        }
        _ => None,
    };
    Ok(OpRate {
        ops: before("operations;")?.parse()?,
        seconds: before("seconds")?.parse()?,
        ops_per_sec: before("ops/sec")?.parse()?,
        found,
        entries: None,
    })
}

/// RocksDB through Debian's `db_bench` (package `rocksdb-tools`).
fn rocksdb(w: &Workload, dir: &Path) -> BenchResult<EngineRun> {
    let bin = find_on_path("db_bench").ok_or(
        "db_bench (RocksDB's benchmark tool) is not on PATH: install Debian's `rocksdb-tools` package \
         (apt-get install -y rocksdb-tools)",
    )?;
    let common = [
        format!("--db={}", dir.display()),
        format!("--num={}", w.keys),
        format!("--key_size={}", w.key_bytes),
        format!("--value_size={}", w.value_bytes),
        "--threads=1".into(),
    ];
    let mut commands = Vec::new();
    let mut assertions = false;
    let mut phase = |benchmark: &str, extra: &[String]| -> BenchResult<OpRate> {
        let mut args = vec![format!("--benchmarks={benchmark}")];
        args.extend(common.iter().cloned());
        args.extend(extra.iter().cloned());
        let mut cmd = Command::new(&bin);
        cmd.args(&args);
        commands.push(command_line(&bin, &args));
        let stdout = output_of(cmd)?;
        assertions |= stdout.contains("Assertions are enabled");
        parse_db_bench(&stdout, benchmark)
    };
    let fill = phase(
        "fillrandom",
        &[
            format!("--batch_size={}", w.batch),
            "--sync=1".into(),
            "--seed=1".into(),
        ],
    )?;
    let existing = "--use_existing_db=1".to_string();
    let read = phase(
        "readrandom",
        &[existing.clone(), format!("--reads={}", w.reads), "--seed=2".into()],
    )?;
    let scan = phase(
        "seekrandom",
        &[
            existing,
            format!("--reads={}", w.scans),
            format!("--seek_nexts={}", w.scan_len),
            "--seed=3".into(),
        ],
    )?;
    let mut notes = vec![
        "fillrandom draws keys with repetition from [0, keys), so only part of readrandom's keys exist".into(),
        "each phase is a separate process on the same database (--use_existing_db=1)".into(),
    ];
    if assertions {
        notes.push("db_bench warned: \"Assertions are enabled; benchmarks unnecessarily slow\"".into());
    }
    Ok(EngineRun {
        engine: "rocksdb".into(),
        version: debian_version("rocksdb-tools").map(|v| format!("{v} (Debian rocksdb-tools)")),
        commands,
        fill,
        read,
        scan,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_db_bench_lines() {
        let out = "DB path: [x]\nreadrandom   :      12.110 micros/op 80775 ops/sec 0.001 seconds 100 \
                   operations;    5.2 MB/s (58 of 100 found)\n";
        let r = parse_db_bench(out, "readrandom").unwrap();
        assert_eq!((r.ops, r.found), (100, Some(58)));
        assert_eq!(r.ops_per_sec, 80775.0);
        let out = "fillrandom   :       1.897 micros/op 526315 ops/sec 0.038 seconds 20000 operations;   58.2 MB/s\n";
        let r = parse_db_bench(out, "fillrandom").unwrap();
        assert_eq!((r.ops, r.found, r.seconds), (20000, None, 0.038));
        assert!(parse_db_bench(out, "readrandom").is_err());
    }
}
