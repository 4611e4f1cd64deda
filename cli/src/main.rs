//! `rama`: the command line of a cluster.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage. The configuration is `rama.yaml`
//! from `--config`, else `RAMA_CONFIG`, else the working directory (a
//! missing file means all defaults).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod admin;
mod dev;

use daemons::{conductor, supervisor};

use clap::{Parser, Subcommand};
use control::config::{Config, Side};
use control::devzk::DevZookeeper;
use net::json::{ack_level as ack_level_named, path_from_json, value_from_json, value_to_json};
use net::manager::ClusterManager;

#[derive(Debug, Parser)]
#[command(name = "rama", version, about = "Operate a rama cluster")]
struct Cli {
    /// The configuration file (default: $RAMA_CONFIG, else ./rama.yaml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Use the internal host names of conductor.host and zookeeper.servers
    /// (for commands run inside the cluster's network).
    #[arg(long = "useInternalHostnames", global = true)]
    use_internal_hostnames: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum SecretCmd {
    /// Writes a new random secret to cluster.secret.file (mode 0600); copy
    /// that file to every node of the cluster and every client machine.
    Create {
        /// Replace an existing secret (every node then needs the new file).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Prints the value of a configuration key (set in rama.yaml, or its
    /// default).
    #[command(name = "confValue")]
    ConfValue {
        /// The key, e.g. zookeeper.port.
        key: String,
    },
    /// Runs a whole cluster on this machine: ZooKeeper, a Conductor and a
    /// Supervisor on loopback, deploys a module (WordCountModule from the
    /// rama-examples artifact by default), prints the commands to try it;
    /// Ctrl-C destroys the module and stops everything.
    Dev {
        /// Where the cluster keeps its configuration, data and logs
        /// (default: a temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The module artifact (default: rama-examples beside rama).
        #[arg(long)]
        jar: Option<PathBuf>,
        #[arg(long, default_value = "WordCountModule")]
        module: String,
        #[arg(long, default_value_t = 8)]
        tasks: u32,
        #[arg(long, default_value_t = 2)]
        threads: u32,
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Replicas of each task group; above 1 it starts as many
        /// Supervisors (127.0.0.1, 127.0.0.2, ...), each replica on its own.
        #[arg(long = "replicationFactor", default_value_t = 1)]
        replication_factor: u32,
        /// Worker configurations for the module (see deploy).
        #[arg(long = "configOverrides")]
        config_overrides: Option<PathBuf>,
    },
    /// Puts load on a module and reports throughput, latency percentiles
    /// per operation and CPU per operation: on the cluster of rama.yaml
    /// (the module deployed), through a Conductor (--conductor), or with
    /// --inProcess on a cluster in this process; --sweep for capacity
    /// planning, --baseline for the comparisons of the record. Ctrl-C stops
    /// a run early and cleans up.
    Bench {
        /// wordcount (WordCountModule), append (KvModule: records of
        /// --recordBytes to --keys keys), select (KvModule point selects),
        /// bank (BankTransferModule transfers among --keys accounts),
        /// timeline (TimelineModule posts by --keys users with --fanout
        /// followers each), query (WordCountModule topWords), range
        /// (TimelineModule: the newest --rangeLimit posts of a timeline).
        #[arg(long)]
        workload: Option<String>,
        /// A weighted mix of one module's operations, e.g. post:20,range:80
        /// (operations: sentence, topWords, put, get, transfer, post,
        /// range); percentiles are reported per operation.
        #[arg(long)]
        mix: Option<String>,
        /// Run the module in this process instead of on the cluster.
        #[arg(long = "inProcess")]
        in_process: bool,
        /// Find the cluster's workers through the Conductor at host:port
        /// (its admin API) instead of ZooKeeper from rama.yaml.
        #[arg(long, conflicts_with = "in_process")]
        conductor: Option<String>,
        #[arg(long, default_value_t = 8)]
        tasks: u32,
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// Client threads.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Requests in flight per client (closed loop).
        #[arg(long = "inFlight", default_value_t = 256)]
        in_flight: usize,
        /// Open loop at this many operations per second (latency from each
        /// intended send time); without it, a closed loop.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long = "recordBytes", default_value_t = 100)]
        record_bytes: usize,
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// uniform or zipfian.
        #[arg(long, default_value = "uniform")]
        skew: String,
        /// timeline: followers of each user.
        #[arg(long, default_value_t = 10)]
        fanout: u64,
        /// range: posts read per timeline.
        #[arg(long = "rangeLimit", default_value_t = 20)]
        range_limit: usize,
        /// ack, appendAck or none (appends).
        #[arg(long = "ackLevel", default_value = "ack")]
        ack_level: String,
        /// Also write the result as JSON to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Capacity planning: measure the closed-loop maximum, then offer
        /// 10%, 20%, ... of it (--seconds per step) until p99 passes
        /// --p99Ms (below 10% if that step passes it already), bisect twice
        /// between the last step within the bound and the first past it;
        /// report the highest sustainable rate per task thread and per
        /// node.
        #[arg(long)]
        sweep: bool,
        #[arg(long = "p99Ms", default_value_t = 10.0)]
        p99_ms: f64,
        /// With --sweep: estimate the task threads and nodes this rate
        /// needs.
        #[arg(long = "targetRate")]
        target_rate: Option<f64>,
        /// Run a baseline instead of a module: disk (write + fdatasync),
        /// tcp (loopback round trips), lsm (ours, fjall and RocksDB's
        /// db_bench), ours, fjall, rocksdb, or redis (GET and WordCount
        /// with appendfsync always and everysec). Sized by --seconds,
        /// --keys and --clients.
        #[arg(long, conflicts_with_all = ["workload", "mix", "sweep", "rate", "in_process", "conductor"])]
        baseline: Option<String>,
        /// Where --inProcess and --baseline runs keep their data (a new
        /// directory, removed afterwards; a real disk, not tmpfs).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Manages the cluster secret every process proves it holds
    /// (cluster.secret.file in rama.yaml).
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Runs a development ZooKeeper server (Debian's zookeeper package) on
    /// zookeeper.port with its data under local.dir, until interrupted.
    #[command(name = "devZookeeper")]
    DevZookeeper,
    /// Runs the Conductor: admin API on conductor.port, artifact store and
    /// module lifecycle; until interrupted.
    Conductor,
    /// Runs a Supervisor: starts the worker processes assigned to it;
    /// until interrupted (its workers keep running).
    Supervisor,
    /// Deploys a module: uploads the artifact, launches it and shows its
    /// progress until it is [:running].
    Deploy {
        /// Only `launch` exists so far.
        #[arg(long)]
        action: String,
        /// The module artifact (an executable built with module_main!).
        #[arg(long)]
        jar: PathBuf,
        #[arg(long)]
        module: String,
        #[arg(long)]
        tasks: u32,
        #[arg(long)]
        threads: u32,
        #[arg(long)]
        workers: u32,
        #[arg(long = "replicationFactor", default_value_t = 1)]
        replication_factor: u32,
        /// A YAML file of worker configurations for this module
        /// (worker.child.opts, worker.child.env).
        #[arg(long = "configOverrides")]
        config_overrides: Option<PathBuf>,
    },
    /// Prints a module's state, e.g. [:running].
    #[command(name = "moduleStatus")]
    ModuleStatus { module: String },
    /// Lists every task group (the tasks of one task thread) of a module
    /// instance with its worker, host and Supervisor.
    #[command(name = "taskGroupsStatus")]
    TaskGroupsStatus {
        module: String,
        /// The module instance (see moduleStatus); default: the one that
        /// serves reads.
        instance: Option<u32>,
    },
    /// Stops a module and removes its workers, assignments and data; shows
    /// progress until it is gone.
    Destroy { module: String },
    /// Appends a record (JSON) to a depot of a running module; prints the
    /// task, offset and ack-return values as JSON.
    #[command(name = "depotAppend")]
    DepotAppend {
        module: String,
        depot: String,
        /// The record, as JSON; `-` reads it from standard input (for
        /// records too large for a command line), or give --file.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        record: Option<String>,
        /// Reads the record (JSON) from this file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// ack (processed by stream topologies), appendAck (durable) or none.
        #[arg(long = "ackLevel", default_value = "ack")]
        ack_level: String,
    },
    /// Selects a path (JSON list of steps) from a PState; prints the values
    /// as a JSON list. The path is routed by its first key, or by --key.
    #[command(name = "pstateSelect")]
    PstateSelect {
        module: String,
        pstate: String,
        /// The path, as JSON: keys, or {"all":{}}, {"mapVals":{}},
        /// {"size":{}}, {"range":{"from":..,"to":..,"reverse":..,"limit":..}}.
        path: String,
        /// Route to the task owning this key (JSON), for paths that do not
        /// start with a key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Invokes a query topology with arguments (JSON); prints the result.
    #[command(name = "queryInvoke")]
    QueryInvoke {
        module: String,
        query: String,
        /// The arguments, as JSON.
        args: String,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // The first signal asks for a clean stop; a second one ends the
    // process at once (for a stop that hangs).
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

fn config(cli: &Cli) -> Result<Config, String> {
    let (path, required) = Config::locate(cli.config.as_deref());
    let path = if path.is_absolute() {
        path
    } else {
        std::env::current_dir().map_err(|e| e.to_string())?.join(path)
    };
    Config::load(&path, required).map_err(|e| e.to_string())
}

fn catch_signals() {
    // SAFETY: installs an async-signal-safe handler (it only stores to an
    // atomic).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Daemons create their data, logs and artifacts for their own user
/// only (directories 0700, files 0600); workers inherit it. They apply
/// their options (`conductor.child.opts`, `supervisor.child.opts`).
fn start_daemon(config: &Config, options_key: &str) -> Result<(), String> {
    // SAFETY: umask only sets the process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    net::transport::raise_open_file_limit();
    let options = config.daemon_options(options_key).map_err(|e| e.to_string())?;
    if let Some(mb) = options.memory_limit_mb {
        control::process::limit_memory(mb).map_err(|e| format!("{options_key}: {e}"))?;
    }
    Ok(())
}

fn admin(cli: &Cli, config: &Config) -> Result<admin::Admin, String> {
    let side = if cli.use_internal_hostnames {
        Side::Internal
    } else {
        Side::External
    };
    let secret = net::manager::load_secret(config).map_err(|e| e.to_string())?;
    admin::Admin::connect(&conductor::address(config, side)?, &secret)
}

fn module_state(admin: &admin::Admin, module: &str) -> Result<Option<String>, String> {
    let r = admin.call_request(&admin::AdminRequest::Status { module: module.into() })?;
    Ok(r.get(&engine::value::Value::from("state"))
        .and_then(engine::value::Value::as_str)
        .map(str::to_string))
}

fn deploy(cli: &Cli, config: &Config) -> Result<(), Failure> {
    let Cmd::Deploy {
        action,
        jar,
        module,
        tasks,
        threads,
        workers,
        replication_factor,
        config_overrides,
    } = &cli.command
    else {
        unreachable!("deploy")
    };
    let overrides = match config_overrides {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Failed(format!("--configOverrides {}: {e}", path.display())))?;
            control::worker_config::WorkerConfig::parse_yaml(&text)
                .map_err(|e| Failure::Failed(format!("--configOverrides {}: {e}", path.display())))?
        }
        None => control::worker_config::WorkerConfig::default(),
    };
    if action != "launch" {
        return Err(Failure::Usage(format!("--action {action}: only launch exists so far")));
    }
    if !jar.is_file() {
        return Err(Failure::Failed(format!("--jar {}: no such file", jar.display())));
    }
    let admin = admin(cli, config)?;
    let args = |artifact: String| admin::DeployArgs {
        module: module.clone(),
        artifact,
        tasks: *tasks,
        threads: *threads,
        workers: *workers,
        replication_factor: *replication_factor,
        config_overrides: Some(overrides.to_json().to_string()),
    };
    // Everything but the artifact is checked before the upload.
    admin.call_request(&admin::AdminRequest::DeployCheck(args(String::new())))?;
    println!("uploading {}", jar.display());
    let artifact = conductor::upload(&admin, jar)?;
    admin.call_request(&admin::AdminRequest::Deploy(args(artifact)))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut last = String::new();
    loop {
        let state = module_state(&admin, module)?;
        let shown = state
            .as_deref()
            .map_or_else(|| "[:rolled-back]".to_string(), admin::shown);
        if shown != last {
            println!("{module}: {shown}");
            last = shown;
        }
        match state.as_deref() {
            Some("running") => return Ok(()),
            Some("destroying") | None => {
                return Err(Failure::Failed(format!(
                    "{module} did not start and was rolled back; see the Supervisor's logs/worker-{module}.*.log"
                )))
            }
            _ => {}
        }
        if std::time::Instant::now() > deadline {
            return Err(Failure::Failed(format!("{module} is still {last} after 240 s")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn bench(cli: &Cli, config: &Config) -> Result<(), Failure> {
    use rama_bench::harness::{parse_mix, run, summary, Cluster, Options, Skew, Workload};
    let Cmd::Bench {
        workload,
        mix,
        in_process,
        conductor,
        tasks,
        threads,
        clients,
        in_flight,
        rate,
        seconds,
        record_bytes,
        keys,
        skew,
        fanout,
        range_limit,
        ack_level,
        out,
        sweep,
        p99_ms,
        target_rate,
        baseline,
        dir,
    } = &cli.command
    else {
        unreachable!("bench")
    };
    if !(p99_ms.is_finite() && *p99_ms > 0.0) {
        return Err(Failure::Usage(format!(
            "--p99Ms {p99_ms}: a positive number of milliseconds"
        )));
    }
    if target_rate.is_some() && !sweep {
        return Err(Failure::Usage(
            "--targetRate needs --sweep (the estimate scales a sweep's result)".into(),
        ));
    }
    if *sweep && rate.is_some() {
        return Err(Failure::Usage(
            "--sweep chooses the rates itself; leave out --rate".into(),
        ));
    }
    if !(seconds.is_finite() && *seconds > 0.0) {
        return Err(Failure::Usage(format!("--seconds {seconds}: a positive number")));
    }
    if let Some(name) = baseline {
        if !rama_bench::baseline::NAMES.contains(&name.as_str()) {
            return Err(Failure::Usage(format!(
                "unknown baseline {name:?} (baselines: {})",
                rama_bench::baseline::NAMES.join(", ")
            )));
        }
        let plan = rama_bench::baseline::Plan {
            dir: dir.clone(),
            duration: Duration::from_secs_f64(*seconds),
            keys: *keys,
            clients: *clients,
        };
        let outcome = rama_bench::baseline::run(name, &plan).map_err(|e| Failure::Failed(e.to_string()))?;
        println!("{}", outcome.summary);
        return write_result(out.as_deref(), &outcome.json);
    }
    let mix = match mix {
        Some(m) => parse_mix(m).map_err(Failure::Usage)?,
        None => Vec::new(),
    };
    let workload = match (workload, mix.first()) {
        (Some(w), _) => Workload::parse(w).map_err(Failure::Usage)?,
        (None, Some((op, _))) => Workload::of(*op),
        (None, None) => Workload::WordCount,
    };
    let options = Options {
        workload,
        mix,
        cluster: match (in_process, conductor) {
            (true, _) => None,
            (false, Some(addr)) => Some(Cluster::Conductor(addr.clone())),
            (false, None) => Some(Cluster::Config(config.path().to_path_buf())),
        },
        dir: dir.clone(),
        tasks: *tasks,
        threads: *threads,
        clients: *clients,
        in_flight: *in_flight,
        rate: *rate,
        duration: Duration::from_secs_f64(*seconds),
        record_bytes: *record_bytes,
        keys: *keys,
        skew: Skew::parse(skew).map_err(Failure::Usage)?,
        ack: ack_level_named(ack_level).map_err(|e| Failure::Usage(e.to_string()))?,
        fanout: *fanout,
        range_limit: *range_limit,
        progress: true,
        stop: Some(&STOP),
    };
    options.check().map_err(Failure::Usage)?;
    // Ctrl-C ends a run early and still cleans up (its cluster and data);
    // a second one ends it at once.
    catch_signals();
    let json: serde_json::Value = if *sweep {
        let s = rama_bench::harness::sweep(&options, Duration::from_secs_f64(p99_ms / 1000.0))
            .map_err(|e| Failure::Failed(e.to_string()))?;
        println!(
            "closed-loop maximum {:.0} ops/s; highest offered rate with p99 within {} ms: {:.0} ops/s\n\
             = {:.0} ops/s per task thread ({} threads), {:.0} ops/s per node ({} nodes in all)",
            s.closed_loop_max_per_sec,
            s.p99_bound_ms,
            s.max_sustainable_per_sec,
            s.per_thread_per_sec,
            s.threads,
            s.per_node_per_sec,
            s.nodes
        );
        if let Some(t) = target_rate {
            println!(
                "{}",
                rama_bench::harness::estimate(&s, *t, (s.threads / s.nodes.max(1) as u32).max(1))
            );
        }
        serde_json::to_value(&s)
    } else {
        let report = run(&options).map_err(|e| Failure::Failed(e.to_string()))?;
        println!("{}", summary(&report));
        serde_json::to_value(&report)
    }
    .map_err(|e| Failure::Failed(e.to_string()))?;
    write_result(out.as_deref(), &json)
}

/// Writes a bench result as JSON to `path`, when there is one.
fn write_result(path: Option<&std::path::Path>, json: &serde_json::Value) -> Result<(), Failure> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(json).map_err(|e| Failure::Failed(e.to_string()))?;
        std::fs::write(path, text + "\n").map_err(|e| Failure::Failed(format!("writing {}: {e}", path.display())))?;
        println!("result written to {}", path.display());
    }
    Ok(())
}

fn dev_zookeeper(config: &Config) -> Result<(), String> {
    catch_signals();
    let mut zk = DevZookeeper::start(config).map_err(|e| e.to_string())?;
    println!(
        "ZooKeeper running on {}:{} (pid {}); log {}; Ctrl-C stops it",
        zk.host,
        zk.port,
        zk.pid(),
        zk.log.display()
    );
    while !STOP.load(Ordering::SeqCst) {
        if let Some(status) = zk.exited() {
            return Err(format!("ZooKeeper exited ({status}); see {}", zk.log.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    zk.stop();
    // Whoever started us may have closed our stdout; that is no failure.
    let _ = writeln!(std::io::stdout(), "ZooKeeper stopped");
    Ok(())
}

/// A failed command: bad arguments (exit 2) or a failure (exit 1).
enum Failure {
    Usage(String),
    Failed(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Failed(e)
    }
}

/// The largest record text `depotAppend` reads (the record itself is
/// checked against the depot's record limit after parsing).
const RECORD_TEXT_MAX: u64 = 64 << 20;

/// The record text of `depotAppend`: the argument, standard input for
/// `-`, or the file of `--file`.
fn record_text(arg: Option<&str>, file: Option<&std::path::Path>) -> Result<String, Failure> {
    use std::io::Read;
    let (mut reader, what): (Box<dyn Read>, String) = match (arg, file) {
        (Some("-"), _) => (Box::new(std::io::stdin()), "standard input".into()),
        (Some(text), _) => return Ok(text.to_string()),
        (None, Some(path)) => (
            Box::new(std::fs::File::open(path).map_err(|e| Failure::Usage(format!("--file {}: {e}", path.display())))?),
            path.display().to_string(),
        ),
        (None, None) => return Err(Failure::Usage("give the record, - (standard input) or --file".into())),
    };
    let mut text = String::new();
    reader
        .by_ref()
        .take(RECORD_TEXT_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| Failure::Usage(format!("reading the record from {what}: {e}")))?;
    if text.len() as u64 > RECORD_TEXT_MAX {
        return Err(Failure::Usage(format!(
            "the record in {what} is longer than {} MiB of JSON",
            RECORD_TEXT_MAX >> 20
        )));
    }
    Ok(text)
}

fn json_arg(what: &str, text: &str) -> Result<serde_json::Value, Failure> {
    serde_json::from_str(text).map_err(|e| {
        // Long input is shown by its start only.
        let shown: String = text.chars().take(200).collect();
        let more = if shown.len() < text.len() { "..." } else { "" };
        Failure::Usage(format!("{what} is not valid JSON ({e}): {shown}{more}"))
    })
}

fn manager(cli: &Cli, config: &Config) -> Result<ClusterManager, Failure> {
    let side = if cli.use_internal_hostnames {
        Side::Internal
    } else {
        Side::External
    };
    ClusterManager::open_with(Some(config.path()), &[], side).map_err(|e| Failure::Failed(e.to_string()))
}

fn data_command(cli: &Cli, config: &Config) -> Result<(), Failure> {
    let failed = |e: engine::Error| Failure::Failed(e.to_string());
    let usage = |e: engine::Error| Failure::Usage(e.to_string());
    let answer = match &cli.command {
        Cmd::DepotAppend {
            module,
            depot,
            record,
            file,
            ack_level,
        } => {
            let text = record_text(record.as_deref(), file.as_deref())?;
            let record = value_from_json(&json_arg("the record", &text)?).map_err(usage)?;
            let ack = ack_level_named(ack_level).map_err(usage)?;
            let r = manager(cli, config)?.depot(module, depot).map_err(failed)?;
            let r = r.append(&record, ack).map_err(failed)?;
            let returns: serde_json::Map<String, serde_json::Value> = r
                .ack_returns
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect();
            serde_json::json!({ "task": r.task, "offset": r.offset, "ackReturns": returns })
        }
        Cmd::PstateSelect {
            module,
            pstate,
            path,
            key,
        } => {
            let path = path_from_json(&json_arg("the path", path)?).map_err(usage)?;
            let key = match key {
                Some(k) => Some(value_from_json(&json_arg("--key", k)?).map_err(usage)?),
                None if !matches!(path.first(), Some(engine::pstate::path::Nav::Key(_))) => {
                    return Err(Failure::Usage(
                        "the path does not start with a key, so it names no task to read; \
                         give --key KEY (JSON) to read the task that owns KEY"
                            .into(),
                    ))
                }
                None => None,
            };
            let reversed = matches!(
                path.last(),
                Some(engine::pstate::path::Nav::Range { reverse: true, .. })
            );
            let m = manager(cli, config)?;
            let client = m.pstate(module, pstate).map_err(failed)?;
            let values = match key {
                Some(k) => {
                    let task = engine::runtime::partition::task_for_key(&k, m.tasks(module).map_err(failed)?);
                    client.select_on(task, &path)
                }
                None => client.select(&path),
            }
            .map_err(failed)?;
            // A reverse range's submap printed as a JSON object would come
            // out in ascending key order: print its entries as [key, value]
            // pairs (a set's elements as a list) in the order read.
            let shown = |v: &engine::value::Value| match v {
                engine::value::Value::Map(m) if reversed => serde_json::Value::Array(
                    m.iter()
                        .rev()
                        .map(|(k, v)| serde_json::json!([value_to_json(k), value_to_json(v)]))
                        .collect(),
                ),
                engine::value::Value::Set(s) if reversed => {
                    serde_json::Value::Array(s.iter().rev().map(value_to_json).collect())
                }
                v => value_to_json(v),
            };
            serde_json::Value::Array(values.iter().map(shown).collect())
        }
        Cmd::QueryInvoke { module, query, args } => {
            let args = value_from_json(&json_arg("the arguments", args)?).map_err(usage)?;
            let q = manager(cli, config)?.query(module, query).map_err(failed)?;
            value_to_json(&q.invoke(&args).map_err(failed)?)
        }
        _ => unreachable!("not a data command"),
    };
    println!("{answer}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = config(&cli)
        .map_err(Failure::Failed)
        .and_then(|config| match &cli.command {
            Cmd::ConfValue { key } => Ok(config
                .effective(key)
                .map(|v| println!("{v}"))
                .map_err(|e| e.to_string())?),
            Cmd::DevZookeeper => Ok(dev_zookeeper(&config)?),
            Cmd::Secret(SecretCmd::Create { force }) => {
                let path = config.secret_file().map_err(|e| e.to_string())?;
                net::auth::Secret::create(&path, *force).map_err(|e| e.to_string())?;
                println!(
                    "wrote a new cluster secret to {} (mode 0600); copy it to every node",
                    path.display()
                );
                Ok(())
            }
            Cmd::Dev {
                dir,
                jar,
                module,
                tasks,
                threads,
                workers,
                replication_factor,
                config_overrides,
            } => {
                catch_signals();
                let options = dev::DevOptions {
                    config_overrides: config_overrides.clone(),
                    dir: dir.clone(),
                    jar: jar.clone(),
                    module: module.clone(),
                    tasks: *tasks,
                    threads: *threads,
                    workers: *workers,
                    replication_factor: *replication_factor,
                };
                Ok(dev::run(&config, &options, &STOP)?)
            }
            Cmd::Conductor => {
                start_daemon(&config, "conductor.child.opts")?;
                catch_signals();
                Ok(conductor::run(&config, &STOP)?)
            }
            Cmd::Supervisor => {
                start_daemon(&config, "supervisor.child.opts")?;
                catch_signals();
                Ok(supervisor::run(&config, &STOP)?)
            }
            Cmd::Deploy { .. } => deploy(&cli, &config),
            Cmd::ModuleStatus { module } => {
                use engine::value::Value;
                let r = admin(&cli, &config)?.call_request(&admin::AdminRequest::Status { module: module.clone() })?;
                let Some(state) = r.get(&Value::from("state")).and_then(Value::as_str) else {
                    return Err(Failure::Failed(format!("no module named {module} is deployed")));
                };
                println!("{}", admin::shown(state));
                let field = |v: &Value, k: &str| {
                    v.as_map()
                        .and_then(|m| m.get(&Value::from(k)))
                        .cloned()
                        .unwrap_or(Value::Nil)
                };
                // Its instances, with the targets reads and appends follow.
                if let Some(Value::List(instances)) = r.get(&Value::from("instances")) {
                    for i in instances {
                        let mut roles = Vec::new();
                        if field(i, "read") == Value::Bool(true) {
                            roles.push("read target");
                        }
                        if field(i, "append") == Value::Bool(true) {
                            roles.push("append target");
                        }
                        let rf = field(i, "replicationFactor").as_int().unwrap_or(1);
                        println!(
                            "instance {}: {}, {} of {} workers registered, {} tasks on {} threads{}{}",
                            field(i, "instance").as_int().unwrap_or(-1),
                            field(i, "state").as_str().unwrap_or("?"),
                            field(i, "registered").as_int().unwrap_or(0),
                            field(i, "workers").as_int().unwrap_or(0),
                            field(i, "tasks").as_int().unwrap_or(0),
                            field(i, "threads").as_int().unwrap_or(0),
                            if rf > 1 {
                                format!(", replication factor {rf}")
                            } else {
                                String::new()
                            },
                            if roles.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", roles.join(", "))
                            }
                        );
                        if let Value::List(stalled) = field(i, "stalled") {
                            for why in stalled.iter().filter_map(Value::as_str) {
                                println!("  {why}");
                            }
                        }
                    }
                }
                // Workers whose storage did not open keep their task
                // groups down; each says why.
                if let Some(Value::List(down)) = r.get(&Value::from("down")) {
                    for d in down {
                        println!(
                            "worker {} of instance {} is down: {}",
                            field(d, "worker").as_int().unwrap_or(-1),
                            field(d, "instance").as_int().unwrap_or(-1),
                            field(d, "error").as_str().unwrap_or("?")
                        );
                    }
                }
                Ok(())
            }
            Cmd::TaskGroupsStatus { module, instance } => {
                use engine::value::Value;
                let request = admin::AdminRequest::TaskGroups {
                    module: module.clone(),
                    instance: *instance,
                };
                let r = admin(&cli, &config)?.call_request(&request)?;
                let Some(Value::List(groups)) = r.get(&Value::from("groups")) else {
                    return Err(Failure::Failed("the Conductor sent no task groups".into()));
                };
                if let Some(n) = r.get(&Value::from("instance")).and_then(Value::as_int) {
                    println!("module {module} instance {n}:");
                }
                for g in groups {
                    let f = |k: &str| {
                        g.as_map()
                            .and_then(|m| m.get(&Value::from(k)))
                            .cloned()
                            .unwrap_or(Value::Nil)
                    };
                    let tasks = match f("tasks") {
                        Value::List(t) => t
                            .iter()
                            .map(|v| v.as_int().unwrap_or(0).to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        _ => String::new(),
                    };
                    if let Value::List(replicas) = f("replicas") {
                        let list = |v: Value| match v {
                            Value::List(l) => format!(
                                "[{}]",
                                l.iter()
                                    .map(|x| x.as_int().unwrap_or(0).to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                            _ => "[]".into(),
                        };
                        let leader = match f("leader").as_int() {
                            Some(r) => format!("leader replica {r}"),
                            None => "no leader".into(),
                        };
                        println!(
                            "task group {}: tasks [{tasks}] on worker {}, epoch {}, {leader}, in sync {}, out of sync \
                             {} (min-ISR {})",
                            f("taskGroup").as_int().unwrap_or(0),
                            f("worker").as_int().unwrap_or(0),
                            f("epoch").as_int().unwrap_or(0),
                            list(f("isr")),
                            list(f("osr")),
                            f("minIsr").as_int().unwrap_or(1),
                        );
                        for r in &replicas {
                            let rf = |k: &str| {
                                r.as_map()
                                    .and_then(|m| m.get(&Value::from(k)))
                                    .cloned()
                                    .unwrap_or(Value::Nil)
                            };
                            let at = match rf("address") {
                                Value::Str(a) => format!(" at {a}"),
                                _ => String::new(),
                            };
                            let progress = match (rf("logEnd").as_int(), rf("applied").as_int(), rf("lag").as_int()) {
                                (Some(e), Some(a), Some(l)) => format!(", log end {e}, applied {a}, lag {l}"),
                                (Some(e), Some(a), None) => format!(", log end {e}, applied {a}"),
                                _ => String::new(),
                            };
                            let down = match rf("down") {
                                Value::Str(why) => format!(" (down: {why})"),
                                _ => String::new(),
                            };
                            println!(
                                "  replica {}: {}, process {}{at} (supervisor {}){progress}{down}",
                                rf("replica").as_int().unwrap_or(0),
                                rf("state").as_str().unwrap_or("?"),
                                rf("process").as_int().unwrap_or(0),
                                rf("supervisor").as_str().unwrap_or("?"),
                            );
                        }
                        continue;
                    }
                    let at = match (f("address"), f("supervisor"), f("down")) {
                        (_, _, Value::Str(why)) => format!("down: {why}"),
                        (Value::Str(a), Value::Str(s), _) => format!("at {a} (supervisor {s})"),
                        (Value::Str(a), _, _) => format!("at {a}"),
                        _ => "not running".into(),
                    };
                    println!(
                        "task group {}: tasks [{tasks}] on worker {} {at}",
                        f("taskGroup").as_int().unwrap_or(0),
                        f("worker").as_int().unwrap_or(0)
                    );
                }
                Ok(())
            }
            Cmd::Destroy { module } => {
                let admin = admin(&cli, &config)?;
                admin.call_request(&admin::AdminRequest::Destroy { module: module.clone() })?;
                println!("{module}: {}", admin::shown("destroying"));
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while module_state(&admin, module)?.is_some() {
                    if std::time::Instant::now() > deadline {
                        return Err(Failure::Failed(format!(
                            "{module} is still being destroyed after 120 s"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                println!("{module}: destroyed");
                Ok(())
            }
            Cmd::DepotAppend { .. } | Cmd::PstateSelect { .. } | Cmd::QueryInvoke { .. } => data_command(&cli, &config),
            Cmd::Bench { .. } => bench(&cli, &config),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("rama: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("rama: {e}");
            ExitCode::FAILURE
        }
    }
}
