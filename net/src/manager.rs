//! `ClusterManager`: remote clients found through the metastore, or
//! through the Conductor's admin API (`workers` op) for clients that reach
//! only the Conductor.
//!
//! A worker serving a module registers itself as an ephemeral node
//! `/modules/<module>/instances/<n>/workers/<id>`
//! (`control::layout::WorkerRegistration`; `<id>` is the worker's index).
//! Clients take the workers of the module's read target instance for
//! selects and queries and of its append target for appends
//! (`/modules/<m>/targets`); a module registered without a Conductor (no
//! targets) is instance 0.
//! The manager reads `rama.yaml` (a given path, else the working
//! directory), applies overrides, connects to ZooKeeper (external host
//! names by default, internal ones with `open_internal`), and hands out the
//! remote clients of a module's worker.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::config::{Config, Side};
use control::layout::{self, Layout, LayoutError, WorkerFailure, WorkerRegistration};
use control::metastore::{MetaError, Metastore, NodeKind, ZkMetastore};
use engine::value::Value;
use engine::{Error, Result};

use crate::auth::Secret;
use crate::remote::{RemoteCluster, RemoteDepot, RemotePState, RemoteQuery, Resolved, Targets};
use engine::runtime::placement::{Parallelism, Placement};

fn meta_error(e: MetaError) -> Error {
    Error::Unavailable(e.to_string())
}

fn layout_error(e: LayoutError) -> Error {
    match e {
        LayoutError::Meta(e) => meta_error(e),
        bad @ LayoutError::Bad { .. } => Error::Closed(bad.to_string()),
    }
}

/// Which instance of a module a client needs: reads (selects, queries)
/// go to the read target, appends to the append target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Read,
    Append,
}

/// Connects to the metastore `config` names.
pub fn connect_metastore(config: &Config, side: Side) -> Result<ZkMetastore> {
    connect_metastore_with(config, side, std::time::Duration::from_secs(10))
}

fn connect_metastore_with(config: &Config, side: Side, session: std::time::Duration) -> Result<ZkMetastore> {
    let hosts = config
        .hosts("zookeeper.servers", side)
        .map_err(|e| Error::Schema(e.to_string()))?;
    let port = config
        .port("zookeeper.port")
        .map_err(|e| Error::Schema(e.to_string()))?;
    let root = config
        .string("zookeeper.root")
        .map_err(|e| Error::Schema(e.to_string()))?;
    let wait = config.connect_timeout().map_err(|e| Error::Schema(e.to_string()))?;
    let credentials = metastore_credentials(&load_secret(config)?);
    ZkMetastore::connect_with_session(&hosts, port, &root, &credentials, wait, session).map_err(meta_error)
}

/// A metastore session for the replicas of a worker's task groups: its
/// timeout is `replication.session.timeout.millis` (a replica that loses
/// it stops leading after two thirds of it, and a dead leader's session
/// expires after it: the larger part of a failover).
pub fn connect_replication_metastore(config: &Config) -> Result<ZkMetastore> {
    let session = config
        .count("replication.session.timeout.millis")
        .map_err(|e| Error::Schema(e.to_string()))?;
    connect_metastore_with(config, Side::Internal, std::time::Duration::from_millis(session))
}

/// The cluster's metastore credentials: user `rama`, a password derived
/// from the cluster secret (so the secret file is the one thing to copy
/// to every node).
pub fn metastore_credentials(secret: &Secret) -> control::metastore::Credentials {
    control::metastore::Credentials {
        user: "rama".into(),
        password: secret.derive("zookeeper-digest"),
    }
}

/// The cluster secret of `config` (`cluster.secret.file`).
pub fn load_secret(config: &Config) -> Result<Secret> {
    let path = config.secret_file().map_err(|e| Error::Schema(e.to_string()))?;
    Secret::load(&path).map_err(|e| Error::Schema(e.to_string()))
}

/// Loads `rama.yaml` from `path` (else `$RAMA_CONFIG`, else the working
/// directory, as the CLI does) with `overrides` applied.
pub fn load_config(path: Option<&Path>, overrides: &[(&str, &str)]) -> Result<Config> {
    let (path, required) = Config::locate(path);
    let mut config = Config::load(&path, required).map_err(|e| Error::Schema(e.to_string()))?;
    for (k, v) in overrides {
        config.set(k, v).map_err(|e| Error::Schema(e.to_string()))?;
    }
    Ok(config)
}

/// A registered worker of a module: its registration as it is stored
/// (`control::layout::WorkerRegistration`).
pub type WorkerInfo = WorkerRegistration;

/// A worker as the Conductor's `workers` op sends it.
pub fn worker_to_value(w: &WorkerInfo) -> Value {
    Value::map([
        ("worker", Value::Int(i64::from(w.worker))),
        ("instance", Value::Int(i64::from(w.instance))),
        ("incarnation", w.incarnation.as_deref().map_or(Value::Nil, Value::from)),
        ("address", Value::from(w.address.as_str())),
        ("tasks", Value::Int(i64::from(w.tasks))),
        ("threads", Value::Int(i64::from(w.threads))),
        ("workers", Value::Int(i64::from(w.workers))),
        ("replicationFactor", Value::Int(i64::from(w.replication_factor))),
        (
            "depots",
            Value::List(
                w.depots
                    .iter()
                    .map(|d| {
                        Value::map([
                            ("name", Value::from(d.name.as_str())),
                            ("global", Value::Bool(d.global)),
                            ("keyField", d.key_field.as_deref().map_or(Value::Nil, Value::from)),
                        ])
                    })
                    .collect(),
            ),
        ),
    ])
}

fn route_from_value(v: &Value) -> Option<control::layout::DepotRoute> {
    let m = v.as_map()?;
    let get = |k: &str| m.get(&Value::from(k));
    Some(control::layout::DepotRoute {
        name: get("name")?.as_str()?.to_string(),
        global: matches!(get("global"), Some(Value::Bool(true))),
        key_field: get("keyField").and_then(Value::as_str).map(str::to_string),
    })
}

fn worker_from_value(v: &Value) -> Option<WorkerInfo> {
    let Value::Map(m) = v else { return None };
    let int = |k: &str| {
        m.get(&Value::from(k))
            .and_then(Value::as_int)
            .and_then(|i| u32::try_from(i).ok())
    };
    Some(WorkerInfo {
        worker: int("worker")?,
        address: m.get(&Value::from("address"))?.as_str()?.to_string(),
        tasks: int("tasks")?,
        threads: int("threads")?,
        workers: int("workers")?,
        instance: int("instance").unwrap_or(0),
        replication_factor: int("replicationFactor").unwrap_or(1),
        incarnation: m
            .get(&Value::from("incarnation"))
            .and_then(Value::as_str)
            .map(str::to_string),
        engine_version: engine::VERSION.to_string(),
        depots: match m.get(&Value::from("depots")) {
            Some(Value::List(l)) => l.iter().filter_map(route_from_value).collect(),
            _ => Vec::new(),
        },
    })
}

/// The instance of `module` that serves `target` and its incarnation
/// (`(0, None)`: no Conductor deployed it, as for a worker registered by
/// hand: instance 0, any incarnation).
pub fn target_instance(meta: &dyn Metastore, module: &str, target: Target) -> Result<(u32, Option<String>)> {
    let spec = Layout::new(meta)
        .target_spec(module, target == Target::Append)
        .map_err(layout_error)?;
    Ok(spec.map_or((0, None), |s| (s.instance, Some(s.incarnation))))
}

/// The workers of `module` that serve `target`, registered in the
/// metastore, by index. Fencing: a worker of another incarnation (left
/// over from an earlier deploy or another cluster) is never a target.
pub fn registered_workers(meta: &dyn Metastore, module: &str, target: Target) -> Result<Vec<WorkerInfo>> {
    let (n, incarnation) = target_instance(meta, module, target)?;
    Layout::new(meta)
        .registrations(module, n, incarnation.as_deref())
        .map_err(layout_error)
}

/// Where a manager finds the workers.
enum Directory {
    Metastore(Box<ZkMetastore>),
    /// The Conductor's admin address.
    Conductor(String),
}

/// Hands out remote clients of the modules running on a cluster.
pub struct ClusterManager {
    inner: Arc<Inner>,
}

/// What a manager's clients share (they find workers again through it).
struct Inner {
    directory: Directory,
    /// By (worker address, task thread).
    connections: Mutex<HashMap<(String, u32), RemoteCluster>>,
    secret: Secret,
    /// The last complete set of workers seen per module and target: a
    /// registration that lapses for a moment (a ZooKeeper restart, a
    /// session expiry, a worker re-registering) is filled in from it, so a
    /// running module never looks absent.
    last: Mutex<HashMap<(String, Target), Vec<WorkerInfo>>>,
}

/// How long a client without an earlier view of a deployed module waits
/// for its registrations to be complete.
const REGISTRATION_WAIT: Duration = Duration::from_secs(5);

/// Whether `workers` are workers 0..n of one module instance.
fn complete(workers: &[WorkerInfo]) -> bool {
    workers.first().is_some_and(|first| {
        workers.len() == (first.workers.max(1) * first.replication_factor.max(1)) as usize
            && workers
                .iter()
                .enumerate()
                .all(|(i, w)| w.worker == i as u32 && w.incarnation == first.incarnation)
    })
}

impl std::fmt::Debug for ClusterManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ClusterManager");
        match &self.inner.directory {
            Directory::Metastore(meta) => d.field("meta", meta),
            Directory::Conductor(addr) => d.field("conductor", addr),
        };
        d.finish_non_exhaustive()
    }
}

impl ClusterManager {
    /// From `./rama.yaml`, for clients outside the cluster.
    pub fn open() -> Result<ClusterManager> {
        Self::open_with(None, &[], Side::External)
    }

    /// From `./rama.yaml`, for clients inside the cluster.
    pub fn open_internal() -> Result<ClusterManager> {
        Self::open_with(None, &[], Side::Internal)
    }

    /// From `config` (else `./rama.yaml`) with `overrides` taking
    /// precedence.
    pub fn open_with(config: Option<&Path>, overrides: &[(&str, &str)], side: Side) -> Result<ClusterManager> {
        let config = load_config(config, overrides)?;
        let secret = load_secret(&config)?;
        Ok(ClusterManager::with(
            Directory::Metastore(Box::new(connect_metastore(&config, side)?)),
            secret,
        ))
    }

    /// Through the Conductor at `addr` (`host:port`): for clients that
    /// reach the Conductor and the workers but not ZooKeeper. Checks that
    /// the Conductor answers.
    pub fn via_conductor(addr: &str, secret: &Secret) -> Result<ClusterManager> {
        crate::admin::Admin::connect(addr, secret).map_err(Error::Unavailable)?;
        Ok(ClusterManager::with(
            Directory::Conductor(addr.to_string()),
            secret.clone(),
        ))
    }

    fn with(directory: Directory, secret: Secret) -> ClusterManager {
        ClusterManager {
            inner: Arc::new(Inner {
                directory,
                connections: Mutex::new(HashMap::new()),
                secret,
                last: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The workers of `module` that serve reads.
    pub fn workers(&self, module: &str) -> Result<Vec<WorkerInfo>> {
        self.inner.workers(module, Target::Read)
    }

    /// The number of tasks of `module` (of its read target instance).
    pub fn tasks(&self, module: &str) -> Result<u32> {
        Ok(self.inner.resolve(module, Target::Read)?.1.tasks)
    }

    /// Connections to every worker of `module` that serves `target`, its
    /// placement, and how its clients find them again after a connection
    /// ends (perhaps in another instance, once the target moved).
    fn targets(&self, module: &str, target: Target) -> Result<Targets> {
        let (resolved, _) = self.inner.resolve(module, target)?;
        let (inner, module) = (self.inner.clone(), module.to_string());
        let again: crate::remote::Resolve = Arc::new(move || inner.resolve(&module, target).map(|(r, _)| r));
        Ok(Targets::new(resolved, Some(again)))
    }

    /// A client of depot `depot` of `module`: appends go to the append
    /// target instance, reads of the depot too. It follows the module's
    /// workers: when a worker's connection ends (it restarted), the next
    /// request finds the workers again.
    pub fn depot(&self, module: &str, depot: &str) -> Result<RemoteDepot> {
        Ok(RemoteDepot::new(self.targets(module, Target::Append)?, module, depot))
    }

    /// A client of PState `pstate` of `module`, served by the read target
    /// instance.
    pub fn pstate(&self, module: &str, pstate: &str) -> Result<RemotePState> {
        Ok(RemotePState::new(self.targets(module, Target::Read)?, module, pstate))
    }

    pub fn query(&self, module: &str, query: &str) -> Result<RemoteQuery> {
        Ok(RemoteQuery::new(self.targets(module, Target::Read)?, module, query))
    }
}

/// The remote clients through the trait family the in-process cluster
/// implements too (`engine::cluster::ClusterClient`).
impl engine::cluster::ClusterClient for ClusterManager {
    fn depot(&self, module: &str, depot: &str) -> Result<Box<dyn engine::cluster::Depot>> {
        Ok(Box::new(ClusterManager::depot(self, module, depot)?))
    }

    fn pstate(&self, module: &str, pstate: &str) -> Result<Box<dyn engine::cluster::PStateRead>> {
        Ok(Box::new(ClusterManager::pstate(self, module, pstate)?))
    }

    fn query(&self, module: &str, query: &str) -> Result<Box<dyn engine::cluster::Query>> {
        Ok(Box::new(ClusterManager::query(self, module, query)?))
    }
}

impl Inner {
    /// The incarnation serving `target` of the module, as far as the
    /// directory can tell.
    fn current_incarnation(&self, module: &str, target: Target) -> Option<String> {
        match &self.directory {
            Directory::Metastore(meta) => target_instance(meta.as_ref(), module, target).ok().and_then(|(_, i)| i),
            Directory::Conductor(_) => None,
        }
    }

    /// Whether `module` is still deployed (it has targets), as far as the
    /// directory can tell.
    fn deployed(&self, module: &str) -> bool {
        match &self.directory {
            Directory::Metastore(meta) => Layout::new(meta.as_ref()).targets(module).is_ok_and(|t| t.is_some()),
            Directory::Conductor(_) => false,
        }
    }

    fn workers(&self, module: &str, target: Target) -> Result<Vec<WorkerInfo>> {
        match &self.directory {
            Directory::Metastore(meta) => registered_workers(meta.as_ref(), module, target),
            Directory::Conductor(addr) => {
                let admin = crate::admin::Admin::connect(addr, &self.secret).map_err(Error::Unavailable)?;
                let answer = admin
                    .call_request(&crate::admin::AdminRequest::Workers {
                        module: module.to_string(),
                        append: matches!(target, Target::Append),
                    })
                    .map_err(|e| Error::Closed(format!("the Conductor at {addr}: {e}")))?;
                let Some(Value::List(list)) = answer.get(&Value::from("workers")) else {
                    return Err(Error::Closed(format!(
                        "the Conductor at {addr} answered `workers` without a list"
                    )));
                };
                list.iter()
                    .map(|w| {
                        worker_from_value(w).ok_or_else(|| {
                            Error::Closed(format!("the Conductor at {addr} sent a bad worker entry {w}"))
                        })
                    })
                    .collect()
            }
        }
    }

    /// Connects to every worker of `module` (reusing open connections):
    /// them, the placement, and the first worker's registration.
    /// The open connection to `address` served by its task thread
    /// `thread` (shared by the manager's clients), made when there is none.
    fn connection(&self, address: &str, thread: u32) -> Result<RemoteCluster> {
        let key = (address.to_string(), thread);
        let open = {
            let conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            conns.get(&key).filter(|c| !c.is_closed()).cloned()
        };
        if let Some(c) = open {
            return Ok(c);
        }
        // Connected without the lock: an unreachable worker does not hold
        // up the manager's other clients.
        let c = RemoteCluster::connect_to_thread(address, thread, &self.secret)?;
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        Ok(match conns.get(&key) {
            // Another caller connected meanwhile: share theirs.
            Some(theirs) if !theirs.is_closed() => theirs.clone(),
            _ => {
                conns.insert(key, c.clone());
                c
            }
        })
    }

    fn resolve(&self, module: &str, target: Target) -> Result<(Resolved, WorkerInfo)> {
        let key = (module.to_string(), target);
        // A deployed module whose registrations are incomplete (a worker
        // re-registering after a ZooKeeper restart or its own restart) is
        // waited for a little before it is reported, so a running module
        // does not look absent to a client without an earlier view of it.
        let deadline = std::time::Instant::now() + REGISTRATION_WAIT;
        let mut found = self.workers(module, target);
        while !found.as_ref().is_ok_and(|w| complete(w))
            && std::time::Instant::now() < deadline
            && !self.last.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&key)
            && self.deployed(module)
        {
            std::thread::sleep(Duration::from_millis(100));
            found = self.workers(module, target);
        }
        let workers = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match (found, last.get(&key)) {
                (Ok(w), _) if complete(&w) => {
                    last.insert(key.clone(), w.clone());
                    w
                }
                // Some registrations are missing: the last known ones of
                // the same instance stand in for them until replaced.
                // Only into registrations of the same instance as the
                // module's current one (after a destroy and a redeploy the
                // old workers' addresses and shape are no guide).
                (Ok(w), Some(prev))
                    if !w.is_empty()
                        && w.iter().all(|x| x.incarnation == prev[0].incarnation)
                        && prev[0].incarnation.is_some()
                        && self.current_incarnation(module, target) == prev[0].incarnation =>
                {
                    let mut merged = prev.clone();
                    for x in w {
                        if let Some(slot) = merged.get_mut(x.worker as usize) {
                            *slot = x;
                        }
                    }
                    merged
                }
                // Nothing registered: a lapse (same instance, still
                // deployed) or a new instance that has not registered yet.
                (Ok(w), Some(prev))
                    if w.is_empty()
                        && prev[0].incarnation.is_some()
                        && self.current_incarnation(module, target) == prev[0].incarnation =>
                {
                    prev.clone()
                }
                (Ok(w), _) => w,
                // The directory is unreachable for a moment.
                (Err(Error::Unavailable(_)), Some(prev)) => prev.clone(),
                (Err(e), _) => return Err(e),
            }
        };
        let first = workers.first().cloned().ok_or_else(|| {
            Error::Schema(format!(
                "no module named {module} is running (no worker of it is registered)"
            ))
        })?;
        let want = first.workers.max(1);
        let rf = first.replication_factor.max(1);
        let processes = want * rf;
        // Unreplicated, every worker is needed; replicated, one process
        // of each worker will do (each forwards to its task groups'
        // leaders), while the others restart.
        let usable = if rf == 1 {
            workers.len() == processes as usize && workers.iter().enumerate().all(|(i, w)| w.worker == i as u32)
        } else {
            workers.iter().all(|w| w.worker < processes)
                && (0..want).all(|l| workers.iter().any(|w| w.worker % want == l))
        };
        if !usable {
            return Err(Error::Closed(format!(
                "module {module} has {} of its {processes} worker processes registered (it is launching, or a \
                 worker is restarting); try again",
                workers.len()
            )));
        }
        let placement = Parallelism::new(first.tasks, first.threads, want)
            .map(Placement::new)
            .map_err(|e| Error::Closed(format!("module {module} registered a bad shape: {e}")))?;
        // One connection per task thread, served by that thread.
        let mut threads: Vec<Option<RemoteCluster>> = vec![None; placement.parallelism.threads as usize];
        let mut clusters = Vec::new();
        for logical in 0..want {
            // With replication, any process of the worker serves its
            // threads: the first one that answers (the others' replicas
            // may be down).
            let candidates: Vec<&WorkerInfo> = workers.iter().filter(|w| w.worker % want == logical).collect();
            let mine = placement.threads_of_worker(logical);
            let mut last_error = None;
            let mut connected = None;
            for w in &candidates {
                let tried = (|| -> Result<Vec<RemoteCluster>> {
                    match mine.is_empty() {
                        true => Ok(vec![self.connection(&w.address, 0)?]),
                        false => mine.iter().map(|&t| self.connection(&w.address, t)).collect(),
                    }
                })();
                match tried {
                    Ok(c) => {
                        connected = Some(c);
                        break;
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            let conns = match (connected, last_error) {
                (Some(c), _) => c,
                (None, Some(e)) => return Err(e),
                (None, None) => {
                    return Err(Error::Closed(format!(
                        "module {module}: worker {logical} has no process"
                    )))
                }
            };
            clusters.push(conns[0].clone());
            for (&t, c) in mine.iter().zip(conns) {
                threads[t as usize] = Some(c);
            }
        }
        let threads = threads
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Closed(format!("module {module}: a task thread has no worker")))?;
        Ok((
            Resolved {
                workers: clusters,
                threads,
                placement: Some(placement),
                depots: first.depots.clone(),
            },
            first,
        ))
    }
}

/// Records that worker `worker` of instance `instance` of `module` (of
/// `incarnation`) cannot start, and why.
pub fn report_failure(
    meta: &dyn Metastore,
    module: &str,
    (instance, incarnation): (u32, Option<&str>),
    worker: u32,
    why: &str,
) -> Result<()> {
    let failure = WorkerFailure {
        worker,
        incarnation: incarnation.map(str::to_string),
        error: why.to_string(),
    };
    Layout::new(meta)
        .report_failure(module, instance, &failure)
        .map_err(layout_error)
}

/// Clears worker `worker`'s failure report, once it started.
pub fn clear_failure(meta: &dyn Metastore, module: &str, instance: u32, worker: u32) -> Result<()> {
    Layout::new(meta)
        .clear_failure(module, instance, worker)
        .map_err(layout_error)
}

/// The failure reports of instance `instance` of `module` (of its
/// current incarnation): (worker, why).
pub fn failures(meta: &dyn Metastore, module: &str, instance: u32) -> Result<Vec<(u32, String)>> {
    let l = Layout::new(meta);
    let incarnation = l
        .instance_spec(module, instance)
        .map_err(layout_error)?
        .map(|s| s.incarnation);
    Ok(l.failures(module, instance, incarnation.as_deref())
        .map_err(layout_error)?
        .into_iter()
        .map(|f| (f.worker, f.error))
        .collect())
}

/// What a worker started by a Supervisor belongs to: its assignment node
/// and its module instance. It serves only while that assignment exists
/// and names that instance.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The assignment's node (`/assignments/<supervisor>/<m>.<n>.<w>`).
    pub assignment: String,
    /// The incarnation it was started for.
    pub incarnation: String,
}

impl Fence {
    /// `Ok(None)` while the assignment holds, `Ok(Some(why))` once it is
    /// gone or names another incarnation; `Err` when the metastore cannot
    /// tell (then nothing is decided).
    fn check(&self, meta: &dyn Metastore) -> std::result::Result<Option<String>, MetaError> {
        let theirs = match Layout::new(meta).read::<layout::Assignment>(&self.assignment) {
            Ok(None) => return Ok(Some(format!("its assignment {} is gone", self.assignment))),
            Ok(Some((a, _))) => Some(a.incarnation),
            Err(LayoutError::Meta(e)) => return Err(e),
            // Contents this release cannot read are not its assignment.
            Err(LayoutError::Bad { .. }) => None,
        };
        Ok((theirs.as_deref() != Some(self.incarnation.as_str())).then(|| {
            format!(
                "its assignment {} now belongs to incarnation {} (this worker is of incarnation {})",
                self.assignment,
                theirs.as_deref().unwrap_or("?"),
                self.incarnation
            )
        }))
    }
}

/// Keeps a worker's registration: creates its ephemeral node and creates
/// it again whenever it is gone (a new session after an expiry, a
/// ZooKeeper that lost it). It never deletes or overwrites a node another
/// session owns (that worker's own fence retires it). With a [`Fence`],
/// it registers only while the assignment holds, and once the assignment
/// is gone [`Registration::fenced`] says why: the worker must stop. Stops
/// when dropped.
pub struct Registration {
    stop: Arc<std::sync::atomic::AtomicBool>,
    fenced: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registration")
    }
}

impl Registration {
    /// Registers worker `id` of `module`; with `fence`, refuses (an error)
    /// when the assignment does not hold now.
    pub fn start(
        meta: ZkMetastore,
        module: &str,
        id: u32,
        info: &WorkerInfo,
        fence: Option<Fence>,
    ) -> Result<Registration> {
        if let Some(f) = &fence {
            if let Some(why) = f.check(&meta).map_err(meta_error)? {
                return Err(Error::Closed(format!(
                    "worker {id} of module {module} does not start: {why}; a worker serves only its current assignment"
                )));
            }
        }
        // A fenced worker registers only under its instance as the
        // Conductor made it (creating the parents would bring a forgotten
        // module's name back as an empty claim); one started by hand makes
        // the path itself.
        if fence.is_some() {
            match meta.create(&layout::workers(module, info.instance), b"", NodeKind::Persistent) {
                Ok(()) | Err(MetaError::NodeExists(_)) => {}
                Err(e) => return Err(meta_error(e)),
            }
        } else {
            meta.create_all(&layout::workers(module, info.instance))
                .map_err(meta_error)?;
        }
        let path = layout::worker(module, info.instance, id);
        let own = path.clone();
        let data = serde_json::to_vec(&WorkerRegistration {
            worker: id,
            engine_version: engine::VERSION.to_string(),
            ..info.clone()
        })
        .expect("a registration serializes");
        let ensure = move |meta: &ZkMetastore| -> std::result::Result<(), MetaError> {
            match meta.get(&path)? {
                Some((d, _)) if d == data => Ok(()),
                Some(_) => {
                    // Ours from an earlier address: replace it. Another
                    // session's: leave it (regression: two workers with one
                    // id deleted each other's node every round, and clients
                    // reached the stale one); its owner's fence retires it.
                    if meta.owner(&path)? == Some(meta.session_id()) {
                        meta.set(&path, &data, None).map(|_| ())
                    } else {
                        Ok(())
                    }
                }
                None => match meta.create(&path, &data, NodeKind::Ephemeral) {
                    Ok(()) | Err(MetaError::NodeExists(_)) => Ok(()),
                    Err(e) => Err(e),
                },
            }
        };
        ensure(&meta).map_err(meta_error)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fenced = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, fenced) = (stop.clone(), fenced.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(500));
                    // Errors (ZooKeeper away) are retried on the next round;
                    // only a definite answer fences.
                    if let Some(f) = &fence {
                        match f.check(&meta) {
                            Ok(Some(why)) => {
                                // Our own registration goes now, not at exit.
                                if meta.owner(&own).ok().flatten() == Some(meta.session_id()) {
                                    let _ = meta.delete(&own, None);
                                }
                                *fenced.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                                break;
                            }
                            Ok(None) => {}
                            Err(_) => continue,
                        }
                    }
                    let _ = ensure(&meta);
                }
                drop(meta);
            })
        };
        Ok(Registration {
            stop,
            fenced,
            thread: Some(thread),
        })
    }

    /// Why the worker must stop serving (its assignment is gone), once
    /// that is known.
    pub fn fenced(&self) -> Option<String> {
        self.fenced.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::layout::{Assignment, InstanceSpec, Targets};
    use control::metastore::MemMetastore;

    fn spec(n: u32, incarnation: &str) -> InstanceSpec {
        InstanceSpec {
            module: "M".into(),
            instance: n,
            incarnation: incarnation.into(),
            artifact: "a".repeat(64),
            tasks: 4,
            threads: 2,
            workers: 2,
            replication_factor: 1,
            config: serde_json::Value::Null,
        }
    }

    fn register(meta: &MemMetastore, n: u32, w: u32, incarnation: &str) {
        let r = WorkerRegistration {
            worker: w,
            address: format!("127.0.0.1:{}", 3000 + n * 10 + w),
            tasks: 4,
            threads: 2,
            workers: 2,
            replication_factor: 1,
            instance: n,
            incarnation: Some(incarnation.into()),
            engine_version: engine::VERSION.into(),
            depots: Vec::new(),
        };
        meta.create_all(&layout::workers("M", n)).unwrap();
        Layout::new(meta)
            .create(&layout::worker("M", n, w), &r, NodeKind::Ephemeral)
            .unwrap();
    }

    fn addresses(meta: &MemMetastore, target: Target) -> Vec<String> {
        registered_workers(meta, "M", target)
            .unwrap()
            .into_iter()
            .map(|w| w.address)
            .collect()
    }

    #[test]
    fn clients_follow_the_targets_across_an_instance_change() {
        let meta = MemMetastore::new();
        let l = Layout::new(&meta);
        l.launch(&spec(0, "a")).unwrap();
        register(&meta, 0, 0, "a");
        register(&meta, 0, 1, "a");
        assert_eq!(addresses(&meta, Target::Read), ["127.0.0.1:3000", "127.0.0.1:3001"]);
        // Instance 1 comes up beside it; appends move to it first.
        l.add_instance(&spec(1, "b")).unwrap();
        register(&meta, 1, 0, "b");
        register(&meta, 1, 1, "b");
        let (_, v) = l.targets_versioned("M").unwrap().unwrap();
        let v = l.set_targets("M", Targets { read: 0, append: 1 }, v).unwrap();
        assert_eq!(addresses(&meta, Target::Append), ["127.0.0.1:3010", "127.0.0.1:3011"]);
        assert_eq!(addresses(&meta, Target::Read), ["127.0.0.1:3000", "127.0.0.1:3001"]);
        l.set_targets("M", Targets { read: 1, append: 1 }, v).unwrap();
        assert_eq!(addresses(&meta, Target::Read), ["127.0.0.1:3010", "127.0.0.1:3011"]);
        // A worker of another incarnation registered under instance 1 (a
        // stale deploy with the same numbers) is never a target.
        meta.delete(&layout::worker("M", 1, 1), None).unwrap();
        register(&meta, 1, 1, "stale");
        assert_eq!(addresses(&meta, Target::Read), ["127.0.0.1:3010"]);
        // Nothing deployed: instance 0 of anything registered.
        let bare = MemMetastore::new();
        register(&bare, 0, 0, "whatever");
        assert_eq!(addresses(&bare, Target::Read), ["127.0.0.1:3000"]);
    }

    #[test]
    fn a_fence_holds_while_its_assignment_names_its_incarnation() {
        let meta = MemMetastore::new();
        let l = Layout::new(&meta);
        let mut a = Assignment {
            module: "M".into(),
            instance: 0,
            incarnation: "a".into(),
            artifact: "x".into(),
            tasks: 1,
            threads: 1,
            workers: 1,
            worker: 0,
            config: serde_json::Value::Null,
            replication_factor: 1,
        };
        l.assign("s1", &a).unwrap();
        let fence = Fence {
            assignment: layout::assignment("s1", "M.0.0"),
            incarnation: "a".into(),
        };
        assert_eq!(fence.check(&meta).unwrap(), None);
        a.incarnation = "b".into();
        l.set(&fence.assignment, &a, None).unwrap();
        let why = fence.check(&meta).unwrap().unwrap();
        assert!(why.contains("incarnation b") && why.contains("incarnation a"), "{why}");
        meta.delete(&fence.assignment, None).unwrap();
        assert!(fence.check(&meta).unwrap().unwrap().contains("is gone"));
        // Contents this release cannot read are not its assignment either.
        meta.create(&fence.assignment, b"{", NodeKind::Persistent).unwrap();
        assert!(fence.check(&meta).unwrap().is_some());
    }
}
