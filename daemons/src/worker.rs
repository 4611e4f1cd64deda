//! The `main` of a module artifact, and the worker process host: an
//! executable built from a module crate with [`crate::module_main!`].
//!
//! ```text
//! ARTIFACT describe                 JSON descriptions of the modules
//! ARTIFACT version                  the engine version it was built with
//! ARTIFACT worker --module NAME --dir DIR [--tasks N] [--threads N] [--host H] [--port P]
//!                [--register RAMA_YAML [--id N] [--workers W]]
//!                [--log FILE [--logRotateBytes N] [--logKeep K]] [--secretFile F]
//!                [--pin auto|on|off] [--spinBeforeParkMicros N]
//!     runs the module on this process's task threads and serves the wire
//!     protocol (see `net::wire`) on H:P (default 127.0.0.1, any free
//!     port); prints `worker listening on H:P`; with --register, keeps an
//!     ephemeral registration in the metastore that rama.yaml names (see
//!     `net::manager`); with --workers W > 1 it is worker N of W: it
//!     runs the task threads the placement gives it, reaches the others
//!     through their registrations (see `net::peers`), and starts its
//!     topologies once every other worker answers; with --log (the file its
//!     stdout and stderr go to) it rotates that file past N bytes keeping K
//!     old ones; SIGINT/SIGTERM stop it gracefully. It serves only clients
//!     and peers that prove they hold the cluster secret (the file
//!     --secretFile names, else `cluster.secret.file` of the --register
//!     configuration; without either it refuses to start).
//! ARTIFACT run --module NAME --dir DIR [--tasks N] [--threads N]
//!     runs the module on an in-process cluster and serves requests, one
//!     JSON object per line on stdin, one answer per line on stdout:
//!     {"op":"append","depot":"*d","record":R,"ack":"ack"|"appendAck"|"none"}
//!     {"op":"select","pstate":"$$p","path":[...]}
//!     {"op":"invoke","query":"q","args":A}
//!     {"op":"waitMicrobatch","topology":"t","timeoutSecs":N}
//!     answers are {"ok": ...} or {"error": "..."}; end of input stops it.
//! ```
//! Paths, values and ack levels in JSON are as `net::json` reads them.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value as Json};

use engine::cluster::InProcessCluster;
use engine::module::ModuleDef;
use engine::{Error, Result};

use net::auth::Secret;
use net::json::{ack_level, bad, path_from_json, value_from_json, value_to_json};

/// Turns a crate's `main` into a module artifact for the listed module
/// types (each implementing [`engine::module::Module`]).
#[macro_export]
macro_rules! module_main {
    ($($module:ty),+ $(,)?) => {
        fn main() -> ::std::process::ExitCode {
            $crate::worker::main(&[$(
                <$module as $crate::engine::module::Module>::define
                    as fn() -> $crate::engine::Result<$crate::engine::module::ModuleDef>
            ),+])
        }
    };
}

/// How clients route appends to the depots of `def` (published in the
/// worker's registration).
fn depot_routes(def: &ModuleDef) -> Vec<control::layout::DepotRoute> {
    def.describe()
        .depots
        .into_iter()
        .map(|d| control::layout::DepotRoute {
            name: d.name,
            global: d.global,
            key_field: d.key_field,
        })
        .collect()
}

const USAGE: &str = "usage: ARTIFACT describe | version | run --module NAME --dir DIR [--tasks N] [--threads N] \
                     | worker --module NAME --dir DIR [--tasks N] [--threads N] [--host H] [--port P] \
                     [--register RAMA_YAML --id I --workers W] [--secretFile F] \
                     [--instance N] [--incarnation T --assignment PATH] \
                     [--pin auto|on|off] [--spinBeforeParkMicros N] [engine limits: --channelCapacity N \
                     --clientInflight N --stageInflight N --streamBatchBytes N --streamRetries N \
                     --microbatchMaxRecords N --recordBytesMax N]\n\
                     A worker serves only clients that prove they hold the cluster secret: the file \
                     --secretFile names, else cluster.secret.file of the --register configuration.";

/// The artifact's entry point; exit codes 0 ok, 1 failure, 2 usage.
pub fn main(modules: &[fn() -> Result<ModuleDef>]) -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run_command(modules, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(why)) => {
            eprintln!("{why}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Error(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Error(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

fn run_command(modules: &[fn() -> Result<ModuleDef>], args: &[String]) -> std::result::Result<(), Failure> {
    let defs = modules.iter().map(|m| m()).collect::<Result<Vec<_>>>()?;
    match args.first().map(String::as_str) {
        Some("describe") => {
            let all: Vec<_> = defs.iter().map(ModuleDef::describe).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&all).expect("descriptions serialize")
            );
            Ok(())
        }
        Some("version") => {
            println!("{}", engine::VERSION);
            Ok(())
        }
        Some(cmd @ ("run" | "worker")) => {
            let mut module = None;
            let mut dir = None;
            let (mut tasks, mut threads) = (8u32, 2u32);
            let mut host = "127.0.0.1".to_string();
            let mut port = 0u16;
            let mut register = None;
            let mut id = 0u32;
            let mut workers = 1u32;
            let mut log = None;
            let mut secret_file = None;
            let mut instance = 0;
            let mut incarnation = None;
            let mut assignment = None;
            let (mut log_bytes, mut log_keep) = (10u64 << 20, 3u32);
            let mut threading = engine::cluster::ThreadOptions::default();
            let mut engine_config = engine::cluster::ModuleConfig::default();
            let mut it = args[1..].iter();
            while let Some(flag) = it.next() {
                let value = it
                    .next()
                    .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))?;
                let number = || {
                    value
                        .parse::<u32>()
                        .map_err(|_| Failure::Usage(format!("{flag} takes a number, got {value:?}")))
                };
                match flag.as_str() {
                    "--module" => module = Some(value.clone()),
                    "--dir" => dir = Some(value.clone()),
                    "--tasks" => tasks = number()?,
                    "--threads" => threads = number()?,
                    "--host" if cmd == "worker" => host = value.clone(),
                    "--register" if cmd == "worker" => register = Some(std::path::PathBuf::from(value)),
                    "--id" if cmd == "worker" => id = number()?,
                    "--workers" if cmd == "worker" => workers = number()?,
                    "--replicationFactor" if cmd == "worker" => {
                        engine_config.replication.factor = number()?;
                    }
                    "--log" if cmd == "worker" => log = Some(std::path::PathBuf::from(value)),
                    "--secretFile" if cmd == "worker" => secret_file = Some(std::path::PathBuf::from(value)),
                    "--instance" if cmd == "worker" => instance = number()?,
                    "--incarnation" if cmd == "worker" => incarnation = Some(value.clone()),
                    "--assignment" if cmd == "worker" => assignment = Some(value.clone()),
                    "--logRotateBytes" if cmd == "worker" => {
                        log_bytes = value
                            .parse()
                            .map_err(|_| Failure::Usage(format!("--logRotateBytes takes a number, got {value:?}")))?
                    }
                    "--logKeep" if cmd == "worker" => log_keep = number()?,
                    "--pin" => {
                        threading.pin = match value.as_str() {
                            "auto" => None,
                            "on" => Some(true),
                            "off" => Some(false),
                            _ => return Err(Failure::Usage(format!("--pin takes auto, on or off, got {value:?}"))),
                        }
                    }
                    "--spinBeforeParkMicros" => {
                        threading.spin_before_park = Some(Duration::from_micros(u64::from(number()?)))
                    }
                    "--port" if cmd == "worker" => {
                        port = u16::try_from(number()?)
                            .map_err(|_| Failure::Usage(format!("--port takes a port number, got {value}")))?
                    }
                    f if engine::cluster::config::OPTIONS.iter().any(|(o, _)| *o == f) => engine_config
                        .set_option(f, value)
                        .map_err(|e| Failure::Usage(e.to_string()))?,
                    _ => return Err(Failure::Usage(format!("unknown flag {flag} for {cmd}"))),
                }
            }
            let module = module.ok_or_else(|| Failure::Usage(format!("{cmd} needs --module")))?;
            let dir = dir.ok_or_else(|| Failure::Usage(format!("{cmd} needs --dir")))?;
            let names: Vec<String> = defs.iter().map(|d| d.name.clone()).collect();
            let def = defs.into_iter().find(|d| d.name == module).ok_or_else(|| {
                Failure::Error(Error::Schema(format!(
                    "this artifact has no module {module} (it has: {})",
                    names.join(", ")
                )))
            })?;
            if cmd == "worker" {
                if let Some(path) = log {
                    rotate_own_log(path, log_bytes, log_keep.max(1));
                }
                if incarnation.is_some() != assignment.is_some() {
                    return Err(Failure::Usage("--incarnation and --assignment go together".into()));
                }
                if (workers > 1 || engine_config.replication.factor > 1) && register.is_none() {
                    return Err(Failure::Usage(
                        "--workers or --replicationFactor above 1 needs --register (workers find each other \
                         through the metastore)"
                            .into(),
                    ));
                }
                engine_config.validate()?;
                worker(
                    def,
                    &dir,
                    Shape {
                        tasks,
                        threads,
                        workers,
                        threading,
                        engine_config,
                    },
                    (&host, port),
                    Membership {
                        register: register.as_deref().map(|c| (c, id)),
                        secret_file: secret_file.as_deref(),
                        instance,
                        fence: incarnation
                            .zip(assignment)
                            .map(|(incarnation, assignment)| net::manager::Fence {
                                assignment,
                                incarnation,
                            }),
                    },
                )?;
            } else {
                serve(def, &dir, (tasks, threads), threading, engine_config)?;
            }
            Ok(())
        }
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(Failure::Usage(format!("unknown command {other}"))),
        None => Err(Failure::Usage("no command given".into())),
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Serves the wire protocol for `cluster` and the messages of the other
/// workers of `module` on `addr`. Client connections are served by the
/// module's task threads (the one each client asks for, when it is here);
/// peer lanes by the server's threads.
pub fn serve_worker(
    cluster: std::sync::Arc<InProcessCluster>,
    module: &str,
    addr: impl std::net::ToSocketAddrs,
    secret: &Secret,
    limits: net::transport::ServerLimits,
) -> Result<net::Server> {
    let module = module.to_string();
    let adopter: net::transport::Adopter = {
        let (weak, module) = (std::sync::Arc::downgrade(&cluster), module.clone());
        std::sync::Arc::new(move |offered: net::transport::Handoff| {
            let Some(cluster) = weak.upgrade() else {
                return Some(offered);
            };
            let net::transport::Handoff {
                stream,
                thread,
                limits,
                guard,
            } = offered;
            let conn = engine::cluster::connection::Adopted {
                stream,
                handler: net::wire::task_thread_handler(std::sync::Arc::downgrade(&cluster)),
                limits: engine::cluster::connection::ConnectionLimits {
                    frame_bytes_max: limits.frame_bytes_max,
                    in_flight_max: net::transport::IN_FLIGHT_MAX,
                    idle_timeout: limits.idle_timeout,
                },
                guard: Box::new(guard),
            };
            match cluster.adopt(&module, thread, conn) {
                Ok(()) => None,
                // Not running here: the server answers (with the error).
                Err(back) => {
                    let guard = *back.guard.downcast::<net::transport::OpenGuard>().ok()?;
                    Some(net::transport::Handoff {
                        stream: back.stream,
                        thread,
                        limits,
                        guard,
                    })
                }
            }
        })
    };
    net::Server::bind_adopting(
        addr,
        (net::PROTOCOL_VERSION, secret),
        limits,
        2,
        std::sync::Arc::new(move |role: u8, request: Vec<u8>, respond: net::transport::Respond| {
            let answer: engine::cluster::peer::Answer = match net::peers::lane_of_role(role) {
                None => Box::pin(net::wire::handle_future(&cluster, &request)),
                Some(lane) => cluster.serve_peer(&module, lane, &request),
            };
            Some(Box::pin(async move { respond(Ok(answer.await)) }) as net::transport::Later)
        }),
        Some(adopter),
    )
    .map_err(|e| Error::Closed(e.to_string()))
}

/// Rotates the log file this process's stdout and stderr go to (its
/// Supervisor opened it): past `bytes` it is renamed and a new one takes
/// over both descriptors.
fn rotate_own_log(path: std::path::PathBuf, bytes: u64, keep: u32) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if !control::logging::rotate_if_large(&path, bytes, keep) {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new().create(true).append(true).open(&path) else {
            continue;
        };
        let _ = std::io::stdout().flush();
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors of this process; the
        // new file stays open through them after `file` is dropped.
        unsafe {
            libc::dup2(file.as_raw_fd(), 1);
            libc::dup2(file.as_raw_fd(), 2);
        }
    });
}

/// A module's parallelism.
struct Shape {
    tasks: u32,
    threads: u32,
    workers: u32,
    threading: engine::cluster::ThreadOptions,
    engine_config: engine::cluster::ModuleConfig,
}

fn stopping() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// How a worker belongs to its cluster.
struct Membership<'a> {
    /// The rama.yaml to register through, and the worker's index.
    register: Option<(&'a std::path::Path, u32)>,
    /// The cluster secret's file (else the configuration's).
    secret_file: Option<&'a std::path::Path>,
    /// The module instance it serves (0 unless a Supervisor says).
    instance: u32,
    /// The assignment and incarnation it serves (from its Supervisor).
    fence: Option<net::manager::Fence>,
}

/// Runs `def` (this process's part of it) and serves the wire protocol,
/// and the other workers' messages, until SIGINT or SIGTERM.
fn worker(def: ModuleDef, dir: &str, shape: Shape, (host, port): (&str, u16), membership: Membership) -> Result<()> {
    let Membership {
        register,
        secret_file,
        instance,
        fence,
    } = membership;
    let incarnation = fence.as_ref().map(|f| f.incarnation.clone());
    let Shape {
        tasks,
        threads,
        workers,
        threading,
        engine_config,
    } = shape;
    // SAFETY: installs an async-signal-safe handler (it only stores to an
    // atomic).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let name = def.name.clone();
    net::transport::raise_open_file_limit();
    let mut cluster = InProcessCluster::new(dir);
    cluster.set_thread_options(threading);
    let rf = engine_config.replication.factor.max(1);
    cluster.set_module_config(engine_config);
    let config = register
        .map(|(path, _)| net::manager::load_config(Some(path), &[]))
        .transpose()?;
    // Log lines (with times and levels) go to stdout, which the Supervisor
    // points at the worker's log file.
    let level = config
        .as_ref()
        .and_then(|c| control::logging::Logging::beside(c).ok())
        .map_or(tracing::Level::INFO, |l| l.level);
    control::logging::install_stdout(&format!("worker {} of {name}", register.map_or(0, |(_, id)| id)), level);
    // Fail closed: no secret, no worker.
    let secret = match (secret_file, &config) {
        (Some(path), _) => Secret::load(path).map_err(|e| Error::Schema(e.to_string()))?,
        (None, Some(config)) => net::manager::load_secret(config)?,
        (None, None) => {
            return Err(Error::Schema(
                "a worker needs the cluster secret: pass --secretFile, or --register with a rama.yaml whose \
                 cluster.secret.file names it"
                    .into(),
            ))
        }
    };
    let limits = match &config {
        Some(config) => net::transport::ServerLimits {
            connections_max: config
                .count("worker.connections.max")
                .map_err(|e| Error::Schema(e.to_string()))? as usize,
            idle_timeout: config.idle_timeout().map_err(|e| Error::Schema(e.to_string()))?,
            ..Default::default()
        },
        None => net::transport::ServerLimits::default(),
    };
    let connect =
        |config: &control::config::Config| net::manager::connect_metastore(config, control::config::Side::Internal);
    let processes = workers * rf;
    let peers = match (&config, processes) {
        (Some(config), p) if p > 1 => Some(std::sync::Arc::new(net::peers::NetPeers::new(
            &name,
            connect(config)?,
            secret.clone(),
            instance,
            incarnation.clone(),
        ))),
        _ => None,
    };
    let me = register.map_or(0, |(_, id)| id);
    if me >= processes {
        return Err(Error::Schema(format!(
            "worker {me} does not exist: the module has {processes} worker processes ({workers} workers, \
             replication factor {rf})"
        )));
    }
    let routes = depot_routes(&def);
    let launched = match (&peers, &config) {
        (Some(p), Some(config)) => {
            let replication = if rf > 1 {
                Some(replica_part(
                    config,
                    &name,
                    instance,
                    threads,
                    (me / workers, p.clone()),
                )?)
            } else {
                None
            };
            cluster.launch_worker(
                def,
                tasks,
                threads,
                engine::cluster::peer::WorkerPart {
                    workers,
                    worker: me % workers,
                    peers: p.clone(),
                    replication,
                },
            )
        }
        _ => cluster.launch(def, tasks, threads),
    };
    // Storage that does not open (damaged data, say) keeps this worker's
    // task groups down: the reason goes to the metastore, where
    // `moduleStatus` and `taskGroupsStatus` show it, and stays until a
    // start succeeds.
    if let Err(e) = launched {
        if let Some(config) = &config {
            let reported = connect(config).and_then(|meta| {
                net::manager::report_failure(&meta, &name, (instance, incarnation.as_deref()), me, &e.to_string())
            });
            if let Err(r) = reported {
                tracing::error!("worker {me} of module {name}: cannot record why it does not start: {r}");
            }
        }
        return Err(e);
    }
    let cluster = std::sync::Arc::new(cluster);
    let server = serve_worker(cluster.clone(), &name, (host, port), &secret, limits)?;
    let registration = match (register, &config) {
        (Some((_, id)), Some(config)) => {
            // Started: an earlier failure report no longer holds.
            let _ = connect(config).and_then(|meta| net::manager::clear_failure(&meta, &name, instance, id));
            let info = net::manager::WorkerInfo {
                worker: id,
                address: server.local_addr().to_string(),
                tasks,
                threads,
                workers,
                instance,
                replication_factor: rf,
                incarnation: incarnation.clone(),
                engine_version: engine::VERSION.to_string(),
                depots: routes,
            };
            Some(net::manager::Registration::start(
                connect(config)?,
                &name,
                id,
                &info,
                fence.clone(),
            )?)
        }
        _ => None,
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "worker listening on {} (module {name}, worker {me} of {workers}, {tasks} tasks on {threads} threads, \
         data in {dir})",
        server.local_addr()
    );
    let _ = stdout.flush();
    if let Some(p) = &peers {
        // Topologies start once every other worker serves the module, so a
        // fresh launch does not begin with batches that cannot be sent.
        for w in (0..processes).filter(|&w| w != me) {
            if p.wait_for(w, stopping).is_err() {
                break;
            }
        }
        if !stopping() {
            cluster.start_processing(&name)?;
            let _ = writeln!(
                stdout,
                "worker {me} of module {name}: every worker answers; topologies started"
            );
            let _ = stdout.flush();
        }
    }
    while !stopping() {
        if let Some(why) = registration.as_ref().and_then(net::manager::Registration::fenced) {
            let _ = writeln!(
                stdout,
                "worker {me} of module {name}: {why}; stopping (a worker serves only its current assignment)"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(registration);
    drop(server);
    // Connections still open hold the cluster; wait briefly for them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut cluster = cluster;
    loop {
        match std::sync::Arc::try_unwrap(cluster) {
            Ok(c) => return c.shutdown(),
            Err(c) if std::time::Instant::now() < deadline => {
                cluster = c;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => {
                return Err(Error::Closed(
                    "clients kept their connections open; stopped without a clean shutdown".into(),
                ))
            }
        }
    }
}

/// This process's part of a replicated module: replica `replica` of its
/// worker's task groups, linked to their group nodes through a metastore
/// session of its own (shared by its replicas), and the leaders of every
/// task group, read from their nodes.
fn replica_part(
    config: &control::config::Config,
    module: &str,
    instance: u32,
    threads: u32,
    (replica, peers): (u32, std::sync::Arc<net::peers::NetPeers>),
) -> Result<engine::cluster::peer::ReplicaPart> {
    use std::sync::Arc;
    let meta = net::manager::connect_replication_metastore(config)?;
    let session_timeout = meta.session_timeout();
    let meta: Arc<dyn control::metastore::Metastore> = Arc::new(meta);
    let peers: Arc<dyn engine::cluster::peer::Peers> = peers;
    let sender = engine::cluster::peer::ReplicaSender::start(module, peers)?;
    let leaders = Arc::new(crate::replication::GroupLeaders::new(
        meta.clone(),
        module,
        instance,
        threads,
    ));
    let module = module.to_string();
    Ok(engine::cluster::peer::ReplicaPart {
        replica,
        hosts: Arc::new(move |thread| {
            let host = crate::replication::WorkerReplica::new(
                meta.clone(),
                crate::replication::GroupId {
                    module: module.clone(),
                    instance,
                    group: thread,
                },
                replica,
                session_timeout,
                sender.clone(),
            )?;
            Ok(Arc::new(host) as Arc<dyn engine::replication::driver::ReplicaHost>)
        }),
        leaders,
    })
}

fn serve(
    def: ModuleDef,
    dir: &str,
    (tasks, threads): (u32, u32),
    threading: engine::cluster::ThreadOptions,
    engine_config: engine::cluster::ModuleConfig,
) -> Result<()> {
    let name = def.name.clone();
    let mut cluster = InProcessCluster::new(dir);
    cluster.set_thread_options(threading);
    cluster.set_module_config(engine_config);
    cluster.launch(def, tasks, threads)?;
    eprintln!("module {name} running with {tasks} tasks on {threads} threads; data in {dir}");
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    // Depot clients are kept, so appends to a random depot spread over tasks.
    let mut depots = std::collections::HashMap::new();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| Error::io("read", "<stdin>", e))?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = match request(&cluster, &mut depots, &name, &line) {
            Ok(v) => json!({ "ok": v }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        writeln!(stdout, "{answer}").map_err(|e| Error::io("write", "<stdout>", e))?;
        stdout.flush().map_err(|e| Error::io("flush", "<stdout>", e))?;
    }
    cluster.shutdown()
}

fn string<'j>(req: &'j Json, name: &str) -> Result<&'j str> {
    req.get(name)
        .and_then(Json::as_str)
        .ok_or_else(|| bad(format!("the request needs a string field {name:?}")))
}

fn request(
    cluster: &InProcessCluster,
    depots: &mut std::collections::HashMap<String, engine::cluster::DepotClient>,
    module: &str,
    line: &str,
) -> Result<Json> {
    let req: Json =
        serde_json::from_str(line).map_err(|e| bad(format!("a request is one JSON object per line: {e}")))?;
    match string(&req, "op")? {
        "append" => {
            let record = value_from_json(req.get("record").ok_or_else(|| bad("append needs \"record\""))?)?;
            let ack = ack_level(req.get("ack").and_then(Json::as_str).unwrap_or("ack"))?;
            let name = string(&req, "depot")?;
            if !depots.contains_key(name) {
                depots.insert(name.to_string(), cluster.depot(module, name)?);
            }
            let r = depots[name].append(&record, ack)?;
            let returns: serde_json::Map<String, Json> = r
                .ack_returns
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect();
            Ok(json!({ "task": r.task, "offset": r.offset, "ackReturns": returns }))
        }
        "select" => {
            let path = path_from_json(req.get("path").ok_or_else(|| bad("select needs \"path\""))?)?;
            let values = cluster.pstate(module, string(&req, "pstate")?)?.select(&path)?;
            Ok(Json::Array(values.iter().map(value_to_json).collect()))
        }
        "invoke" => {
            let args = value_from_json(req.get("args").unwrap_or(&Json::Null))?;
            Ok(value_to_json(
                &cluster.query(module, string(&req, "query")?)?.invoke(&args)?,
            ))
        }
        "waitMicrobatch" => {
            let secs = req.get("timeoutSecs").and_then(Json::as_u64).unwrap_or(60);
            cluster.wait_microbatch(module, string(&req, "topology")?, Duration::from_secs(secs))?;
            Ok(Json::Null)
        }
        other => Err(bad(format!(
            "unknown op {other:?} (ops: append, select, invoke, waitMicrobatch)"
        ))),
    }
}
