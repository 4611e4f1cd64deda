//! `rama-bench`: benchmarks of the engine (storage, next to raw hardware
//! loops and other engines; WordCount end to end), and the BENCHMARKS.md
//! report of their results.

use rama_bench::{depot, lsm, machine, remote, report, wordcount};

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};

use rama_bench::machine::Machine;
use rama_bench::results::{ensure, BenchResult, Results};

#[derive(Debug, Parser)]
#[command(name = "rama-bench", about = "Benchmarks of the rama engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs every benchmark (storage, then WordCount end to end) and writes
    /// the results as JSON.
    #[command(alias = "storage")]
    Run(StorageArgs),
    /// Runs only the WordCount end-to-end benchmark and prints its JSON.
    Wordcount {
        #[arg(long)]
        quick: bool,
        /// Directory for benchmark data (default target/rama-bench-data).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Runs only the network benchmarks (a real cluster through `rama dev`,
    /// remote clients, redis-benchmark) and prints their JSON.
    Remote {
        #[arg(long)]
        quick: bool,
        /// Directory for benchmark data (default target/rama-bench-data).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Runs only the replicated-writes benchmark (in one process: the
    /// store alone, then RF 1 and RF 3 through the replication driver) and
    /// prints its JSON.
    Replication {
        #[arg(long)]
        quick: bool,
        /// Directory for benchmark data (default target/rama-bench-data).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Runs only the replication benchmark through a real cluster
    /// (WordCount with RF 1 and RF 3, then failovers) and prints its JSON.
    Failover {
        #[arg(long)]
        quick: bool,
        /// Directory for benchmark data (default target/rama-bench-data).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Prints the markdown report (BENCHMARKS.md) of a results file.
    Report {
        /// A results file written by `rama-bench run`.
        results: PathBuf,
    },
}

#[derive(Debug, Args)]
struct StorageArgs {
    /// Tiny counts: checks the harness and the sanity of results in seconds.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "results.json")]
    out: PathBuf,
    /// Directory for benchmark data, on the disk to measure (not tmpfs).
    /// Default: target/rama-bench-data under the current directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Records per `append_batch` in the batched-append benchmark.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=50_000))]
    batch: u64,
}

/// How much every benchmark does, in quick or full mode.
fn plan(quick: bool, batch: usize) -> (depot::Plan, lsm::Workload) {
    let depot = depot::Plan {
        batched_records: if quick { 50_000 } else { 2_000_000 },
        batch_records: batch,
        single_appends: if quick { 500 } else { 20_000 },
        rounds: if quick { 5 } else { 100 },
        concurrent_tasks: 64,
        appends_per_task: if quick { 100 } else { 3_125 },
    };
    let keys = if quick { 20_000 } else { 1_000_000 };
    let lsm = lsm::Workload {
        keys,
        key_bytes: 16,
        value_bytes: 100,
        batch: 1000,
        reads: keys,
        scans: if quick { 1_000 } else { 10_000 },
        scan_len: 100,
        repeats: if quick { 1 } else { 3 },
    };
    (depot, lsm)
}

/// The WordCount benchmark's size in quick or full mode.
fn wordcount_plan(quick: bool) -> wordcount::Plan {
    wordcount::Plan {
        tasks: 8,
        threads: 2,
        sentences: if quick { 4_000 } else { 400_000 },
        words_per_sentence: 10,
        vocabulary: 10_000,
        clients: std::env::var("WC_CLIENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4),
        window: std::env::var("WC_WINDOW")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024),
        latency_seconds: if quick { 1.0 } else { 10.0 },
    }
}

fn failover_only(quick: bool, dir: Option<&Path>) -> BenchResult<()> {
    let parent = dir.map_or_else(|| PathBuf::from("target/rama-bench-data"), Path::to_path_buf);
    let data = parent.join(format!("failover-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let outcome = rama_bench::failover::run(&wordcount_plan(quick), &data, quick);
    let _ = std::fs::remove_dir_all(&data);
    println!("{}", serde_json::to_string_pretty(&outcome?)?);
    Ok(())
}

fn remote_only(quick: bool, dir: Option<&Path>) -> BenchResult<()> {
    let parent = dir.map_or_else(|| PathBuf::from("target/rama-bench-data"), Path::to_path_buf);
    let data = parent.join(format!("remote-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let outcome = remote::run(&wordcount_plan(quick), &data, quick);
    let _ = std::fs::remove_dir_all(&data);
    println!("{}", serde_json::to_string_pretty(&outcome?)?);
    Ok(())
}

fn wordcount_only(quick: bool, dir: Option<&Path>) -> BenchResult<()> {
    let parent = dir.map_or_else(|| PathBuf::from("target/rama-bench-data"), Path::to_path_buf);
    let data = parent.join(format!("wordcount-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let outcome = wordcount::run(&wordcount_plan(quick), &data);
    let _ = std::fs::remove_dir_all(&data);
    println!("{}", serde_json::to_string_pretty(&outcome?)?);
    Ok(())
}

/// Writers and writes per writer of the replicated-writes benchmark.
fn replication_plan(quick: bool) -> (usize, u64) {
    let writers = std::env::var("RAMA_BENCH_REPLICATION_WRITERS")
        .ok()
        .and_then(|w| w.parse().ok());
    if quick {
        (writers.unwrap_or(8), 200)
    } else {
        (writers.unwrap_or(64), 2_000)
    }
}

fn replication_only(quick: bool, dir: Option<&Path>) -> BenchResult<()> {
    let parent = dir.map_or_else(|| PathBuf::from("target/rama-bench-data"), Path::to_path_buf);
    let data = parent.join(format!("replication-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    machine::check_real_disk(&data)?;
    let (writers, per_writer) = replication_plan(quick);
    let outcome = rama_bench::replication::run(&data, writers, per_writer);
    let _ = std::fs::remove_dir_all(&data);
    let result = outcome?;
    eprintln!(
        "plain {}; rf1 {}; rf3 {} ({:.2}x of plain)",
        report::brief(&result.plain.throughput),
        report::brief(&result.rf1.throughput),
        report::brief(&result.rf3.throughput),
        result.ratio()
    );
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// The command line this run was started with; `bench/run` passes its own.
fn invocation() -> String {
    std::env::var("RAMA_BENCH_INVOCATION").unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "))
}

fn storage(args: &StorageArgs) -> BenchResult<()> {
    let started = Instant::now();
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let parent = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/rama-bench-data"));
    let data = parent.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&data).map_err(|e| format!("creating {}: {e}", data.display()))?;
    let data = data.canonicalize()?;
    let outcome = run_all(args, &data, started, started_unix);
    // The data directory is ours alone (named by pid); remove it either way.
    let removed = std::fs::remove_dir_all(&data);
    let results = outcome?;
    removed.map_err(|e| format!("removing {}: {e}", data.display()))?;

    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(&args.out, json + "\n").map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    eprintln!("\nresults written to {}", args.out.display());
    for t in report::targets(&results) {
        eprintln!("  {}", t.line());
    }
    Ok(())
}

fn run_all(args: &StorageArgs, data: &Path, started: Instant, started_unix: u64) -> BenchResult<Results> {
    machine::check_real_disk(data)?;
    let (depot_plan, workload) = plan(args.quick, usize::try_from(args.batch)?);
    let mut machine = Machine::probe(data);
    eprintln!(
        "rama-bench run ({} mode), data in {}",
        if args.quick { "quick" } else { "full" },
        data.display()
    );

    eprintln!("1. batched appends");
    let depot_batched = depot::batched(&depot_plan, data)?;
    eprintln!(
        "  ours {}; raw growing {:.1} MB/s",
        report::brief(&depot_batched.ours),
        depot_batched.raw_growing.mb_per_sec
    );
    eprintln!("2. single appends");
    let depot_single = depot::single(&depot_plan, data)?;
    eprintln!(
        "  ours p99 {:.0} µs; raw growing p99 {:.0} µs",
        depot_single.ours.latency.p99_us, depot_single.raw_growing.latency.p99_us
    );
    eprintln!("3. {} concurrent appenders", depot_plan.concurrent_tasks);
    let depot_concurrent = depot::concurrent(&depot_plan, data)?;
    eprintln!("  ours {}", report::brief(&depot_concurrent.ours.throughput));
    eprintln!("4. LSM key-value stores");
    let lsm = lsm::run(&workload, data)?;
    ensure(lsm.engines.len() == lsm::ENGINES.len(), || {
        "an LSM engine did not report".into()
    })?;
    eprintln!("5. WordCount end to end, in-process");
    let wordcount = wordcount::run(&wordcount_plan(args.quick), data)?;
    eprintln!("6-7. Through the network: a real cluster (rama dev), remote clients, redis-benchmark");
    let remote = remote::run(&wordcount_plan(args.quick), data, args.quick)?;
    eprintln!("8. WordCount on Redis (HINCRBY per word), appendfsync always and everysec");
    let plan = wordcount_plan(args.quick);
    let sentences = wordcount::sample_sentences(&plan, plan.sentences);
    let mut redis_wordcount = Vec::new();
    for policy in ["always", "everysec"] {
        let r = rama_bench::redis::wordcount(&data.join("redis-wc"), policy, &sentences, plan.clients, 256)?;
        eprintln!("  appendfsync {policy}: {:.0} increments/s", r.increments_per_sec);
        redis_wordcount.push(r);
    }
    eprintln!("9. Loopback TCP round trips (the network's physical limit)");
    let tcp = rama_bench::tcp::loopback(
        64,
        4,
        rama_bench::remote::PIPELINE,
        Duration::from_secs_f64(if args.quick { 0.2 } else { 3.0 }),
    )?;
    eprintln!(
        "  one in flight {:.0}/s; 4 x {} pipelined {:.0}/s",
        tcp.sequential_per_sec,
        rama_bench::remote::PIPELINE,
        tcp.pipelined_per_sec
    );
    eprintln!("10. rama bench: the example workloads in-process, and a capacity sweep");
    let harness = rama_bench::harness::record_runs(data, args.quick)?;
    eprintln!("11. Replicated store writes in one process: the store alone, RF 1 and RF 3 through the driver");
    let (writers, per_writer) = replication_plan(args.quick);
    let replication = rama_bench::replication::run(data, writers, per_writer)?;
    eprintln!("  rf3 {:.2}x of the store alone", replication.ratio());
    eprintln!("12. Replication through a real cluster: WordCount RF 1 and RF 3 (rama dev), failovers");
    let replicated_cluster = rama_bench::failover::run(&wordcount_plan(args.quick), data, args.quick)?;
    eprintln!(
        "  rf3 {:.2}x of rf1; failover p50 {:.2} s, max {:.2} s",
        replicated_cluster.ratio(),
        replicated_cluster.failovers.p50_seconds,
        replicated_cluster.failovers.max_seconds
    );
    machine.load_end = machine::load_average();

    Ok(Results {
        mode: if args.quick { "quick" } else { "full" }.into(),
        invocation: invocation(),
        started_unix,
        seconds: started.elapsed().as_secs_f64(),
        machine,
        depot_batched,
        depot_single,
        depot_concurrent,
        lsm,
        wordcount: Some(wordcount),
        remote: Some(remote),
        redis_wordcount,
        tcp: Some(tcp),
        harness: Some(harness),
        replication: Some(replication),
        replicated_cluster: Some(replicated_cluster),
    })
}

fn report(path: &Path) -> BenchResult<()> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let results: Results = serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
    print!("{}", report::markdown(&results));
    // Records that need more than one run of this harness (another
    // revision's build, say), each made by the command it names: kept here
    // so a new run of bench/run does not lose them.
    let records = Path::new(env!("CARGO_MANIFEST_DIR")).join("records");
    let mut files: Vec<_> = std::fs::read_dir(&records)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("reading {}: {e}", f.display()))?;
        println!("\n{}", text.trim_end());
        println!(
            "\n(Kept from `bench/{}`, not measured by this run.)",
            f.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")))
                .unwrap_or(&f)
                .display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Run(args) => storage(args),
        Command::Wordcount { quick, dir } => wordcount_only(*quick, dir.as_deref()),
        Command::Remote { quick, dir } => remote_only(*quick, dir.as_deref()),
        Command::Replication { quick, dir } => replication_only(*quick, dir.as_deref()),
        Command::Failover { quick, dir } => failover_only(*quick, dir.as_deref()),
        Command::Report { results } => report(results),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rama-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
