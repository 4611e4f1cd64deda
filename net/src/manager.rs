//! `ClusterManager`: remote clients found through the metastore, or
//! through the Conductor's admin API (`workers` op) for clients that reach
//! only the Conductor.
//!
//! A worker serving a module registers itself as an ephemeral node
//! `/modules/<module>/workers/<id>` whose data is JSON:
//! `{"address": "host:port", "tasks": 8, "threads": 2, "workers": 2,
//! "engineVersion": "..."}` (`<id>` is the worker's index).
//! The manager reads `rama.yaml` (a given path, else the working
//! directory), applies overrides, connects to ZooKeeper (external host
//! names by default, internal ones with `open_internal`), and hands out the
//! remote clients of a module's worker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::config::{Config, Side};
use control::metastore::{MetaError, Metastore, NodeKind, ZkMetastore};
use engine::value::Value;
use engine::{Error, Result};
use serde_json::{json, Value as Json};

use crate::auth::Secret;
use crate::remote::{RemoteCluster, RemoteDepot, RemotePState, RemoteQuery, Resolved, Targets};
use engine::runtime::placement::{Parallelism, Placement};

/// Where a module's workers register.
pub fn workers_path(module: &str) -> String {
    format!("/modules/{module}/workers")
}

fn meta_error(e: MetaError) -> Error {
    Error::Unavailable(e.to_string())
}

/// Connects to the metastore `config` names.
pub fn connect_metastore(config: &Config, side: Side) -> Result<ZkMetastore> {
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
    ZkMetastore::connect(&hosts, port, &root, &metastore_credentials(&load_secret(config)?), wait).map_err(meta_error)
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
    let from_env = std::env::var_os("RAMA_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let (path, required) = match path.map(Path::to_path_buf).or(from_env) {
        Some(p) => (p, true),
        None => (PathBuf::from("rama.yaml"), false),
    };
    let mut config = Config::load(&path, required).map_err(|e| Error::Schema(e.to_string()))?;
    for (k, v) in overrides {
        config.set(k, v).map_err(|e| Error::Schema(e.to_string()))?;
    }
    Ok(config)
}

/// A registered worker of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The worker's index among the module's workers.
    pub worker: u32,
    pub address: String,
    pub tasks: u32,
    pub threads: u32,
    pub workers: u32,
    /// The module instance the worker belongs to (its deploy), when it was
    /// started by a Supervisor.
    pub instance: Option<String>,
}

impl WorkerInfo {
    /// As the Conductor's `workers` op sends it.
    pub fn to_value(&self) -> Value {
        Value::map([
            ("worker", Value::Int(i64::from(self.worker))),
            ("instance", self.instance.as_deref().map_or(Value::Nil, Value::from)),
            ("address", Value::from(self.address.as_str())),
            ("tasks", Value::Int(i64::from(self.tasks))),
            ("threads", Value::Int(i64::from(self.threads))),
            ("workers", Value::Int(i64::from(self.workers))),
        ])
    }

    fn from_value(v: &Value) -> Option<WorkerInfo> {
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
            instance: m
                .get(&Value::from("instance"))
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

/// The instance of `module` its Conductor deployed (`None`: no spec, as
/// for a worker registered without a Conductor).
pub fn module_instance(meta: &ZkMetastore, module: &str) -> Result<Option<String>> {
    let Some((data, _)) = meta.get(&format!("/modules/{module}/spec")).map_err(meta_error)? else {
        return Ok(None);
    };
    let spec: Json = serde_json::from_slice(&data)
        .map_err(|e| Error::Closed(format!("the spec of module {module} does not parse: {e}")))?;
    Ok(spec["instance"].as_str().map(str::to_string))
}

/// The workers of `module` registered in the metastore, by index.
pub fn registered_workers(meta: &ZkMetastore, module: &str) -> Result<Vec<WorkerInfo>> {
    let path = workers_path(module);
    let ids = match meta.children(&path) {
        Ok(ids) => ids,
        Err(MetaError::NoNode(_)) => Vec::new(),
        Err(e) => return Err(meta_error(e)),
    };
    let mut out = Vec::new();
    for id in ids {
        let Some((data, _)) = meta.get(&format!("{path}/{id}")).map_err(meta_error)? else {
            continue;
        };
        let j: Json = serde_json::from_slice(&data)
            .map_err(|e| Error::Closed(format!("worker {id} of {module} registered bad data: {e}")))?;
        out.push(WorkerInfo {
            worker: id.parse().unwrap_or(u32::MAX),
            address: j["address"].as_str().unwrap_or_default().to_string(),
            tasks: j["tasks"].as_u64().unwrap_or(0) as u32,
            threads: j["threads"].as_u64().unwrap_or(0) as u32,
            workers: j["workers"].as_u64().unwrap_or(1) as u32,
            instance: j["instance"].as_str().map(str::to_string),
        });
    }
    // Fencing: a worker of another instance of the module (left over from
    // an earlier deploy or another cluster) is never a target.
    if let Some(current) = module_instance(meta, module)? {
        out.retain(|w| w.instance.as_deref() == Some(current.as_str()));
    }
    out.sort_by_key(|w| w.worker);
    Ok(out)
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
    connections: Mutex<HashMap<String, RemoteCluster>>,
    secret: Secret,
    /// The last complete set of workers seen per module: a registration
    /// that lapses for a moment (a ZooKeeper restart, a session expiry, a
    /// worker re-registering) is filled in from it, so a running module
    /// never looks absent.
    last: Mutex<HashMap<String, Vec<WorkerInfo>>>,
}

/// How long a client without an earlier view of a deployed module waits
/// for its registrations to be complete.
const REGISTRATION_WAIT: Duration = Duration::from_secs(5);

/// Whether `workers` are workers 0..n of one module instance.
fn complete(workers: &[WorkerInfo]) -> bool {
    workers.first().is_some_and(|first| {
        workers.len() == first.workers.max(1) as usize
            && workers
                .iter()
                .enumerate()
                .all(|(i, w)| w.worker == i as u32 && w.instance == first.instance)
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

    /// The workers of `module`.
    pub fn workers(&self, module: &str) -> Result<Vec<WorkerInfo>> {
        self.inner.workers(module)
    }

    /// The number of tasks of `module`.
    pub fn tasks(&self, module: &str) -> Result<u32> {
        Ok(self.inner.resolve(module)?.1.tasks)
    }

    /// Connections to every worker of `module`, its placement, and how its
    /// clients find them again after a connection ends.
    fn targets(&self, module: &str) -> Result<Targets> {
        let (resolved, _) = self.inner.resolve(module)?;
        let (inner, module) = (self.inner.clone(), module.to_string());
        let again: crate::remote::Resolve = Arc::new(move || inner.resolve(&module).map(|(r, _)| r));
        Ok(Targets::new(resolved.workers, resolved.placement, Some(again)))
    }

    /// A client of depot `depot` of `module`. It follows the module's
    /// workers: when a worker's connection ends (it restarted), the next
    /// request finds the workers again.
    pub fn depot(&self, module: &str, depot: &str) -> Result<RemoteDepot> {
        Ok(RemoteDepot::new(self.targets(module)?, module, depot))
    }

    pub fn pstate(&self, module: &str, pstate: &str) -> Result<RemotePState> {
        Ok(RemotePState::new(self.targets(module)?, module, pstate))
    }

    pub fn query(&self, module: &str, query: &str) -> Result<RemoteQuery> {
        Ok(RemoteQuery::new(self.targets(module)?, module, query))
    }
}

impl Inner {
    /// The module's current instance, as far as the directory can tell.
    fn current_instance(&self, module: &str) -> Option<String> {
        match &self.directory {
            Directory::Metastore(meta) => module_instance(meta, module).ok().flatten(),
            Directory::Conductor(_) => None,
        }
    }

    /// Whether `module` is still deployed (its spec exists), as far as the
    /// directory can tell.
    fn deployed(&self, module: &str) -> bool {
        match &self.directory {
            Directory::Metastore(meta) => meta.get(&format!("/modules/{module}/spec")).is_ok_and(|s| s.is_some()),
            Directory::Conductor(_) => false,
        }
    }

    fn workers(&self, module: &str) -> Result<Vec<WorkerInfo>> {
        match &self.directory {
            Directory::Metastore(meta) => registered_workers(meta, module),
            Directory::Conductor(addr) => {
                let admin = crate::admin::Admin::connect(addr, &self.secret).map_err(Error::Unavailable)?;
                let answer = admin
                    .call(&crate::admin::request("workers", [("module", Value::from(module))]))
                    .map_err(|e| Error::Closed(format!("the Conductor at {addr}: {e}")))?;
                let Some(Value::List(list)) = answer.get(&Value::from("workers")) else {
                    return Err(Error::Closed(format!(
                        "the Conductor at {addr} answered `workers` without a list"
                    )));
                };
                list.iter()
                    .map(|w| {
                        WorkerInfo::from_value(w).ok_or_else(|| {
                            Error::Closed(format!("the Conductor at {addr} sent a bad worker entry {w}"))
                        })
                    })
                    .collect()
            }
        }
    }

    /// Connects to every worker of `module` (reusing open connections):
    /// them, the placement, and the first worker's registration.
    fn resolve(&self, module: &str) -> Result<(Resolved, WorkerInfo)> {
        // A deployed module whose registrations are incomplete (a worker
        // re-registering after a ZooKeeper restart or its own restart) is
        // waited for a little before it is reported, so a running module
        // does not look absent to a client without an earlier view of it.
        let deadline = std::time::Instant::now() + REGISTRATION_WAIT;
        let mut found = self.workers(module);
        while !found.as_ref().is_ok_and(|w| complete(w))
            && std::time::Instant::now() < deadline
            && !self.last.lock().unwrap_or_else(|p| p.into_inner()).contains_key(module)
            && self.deployed(module)
        {
            std::thread::sleep(Duration::from_millis(100));
            found = self.workers(module);
        }
        let workers = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match (found, last.get(module)) {
                (Ok(w), _) if complete(&w) => {
                    last.insert(module.to_string(), w.clone());
                    w
                }
                // Some registrations are missing: the last known ones of
                // the same instance stand in for them until replaced.
                // Only into registrations of the same instance as the
                // module's current one (after a destroy and a redeploy the
                // old workers' addresses and shape are no guide).
                (Ok(w), Some(prev))
                    if !w.is_empty()
                        && w.iter().all(|x| x.instance == prev[0].instance)
                        && prev[0].instance.is_some()
                        && self.current_instance(module) == prev[0].instance =>
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
                        && prev[0].instance.is_some()
                        && self.current_instance(module) == prev[0].instance =>
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
        if workers.len() != want as usize || workers.iter().enumerate().any(|(i, w)| w.worker != i as u32) {
            return Err(Error::Closed(format!(
                "module {module} has {} of its {want} workers registered (it is launching, or a worker is \
                 restarting); try again",
                workers.len()
            )));
        }
        let placement = Parallelism::new(first.tasks, first.threads, want)
            .map(Placement::new)
            .map_err(|e| Error::Closed(format!("module {module} registered a bad shape: {e}")))?;
        let mut clusters = Vec::new();
        for w in &workers {
            let open = {
                let conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
                conns.get(&w.address).filter(|c| !c.is_closed()).cloned()
            };
            let c = match open {
                Some(c) => c,
                None => {
                    // Connected without the lock: an unreachable worker
                    // does not hold up the manager's other clients.
                    let c = RemoteCluster::connect(&w.address, &self.secret)?;
                    let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
                    match conns.get(&w.address) {
                        // Another caller connected meanwhile: share theirs.
                        Some(theirs) if !theirs.is_closed() => theirs.clone(),
                        _ => {
                            conns.insert(w.address.clone(), c.clone());
                            c
                        }
                    }
                }
            };
            clusters.push(c);
        }
        Ok((
            Resolved {
                workers: clusters,
                placement: Some(placement),
            },
            first,
        ))
    }
}

/// Where a worker that cannot start says why (persistent: it outlives the
/// worker, until a start of it succeeds).
pub fn failures_path(module: &str) -> String {
    format!("/modules/{module}/failures")
}

/// Records that worker `worker` of `module` (of `instance`) cannot start,
/// and why.
pub fn report_failure(meta: &ZkMetastore, module: &str, worker: u32, instance: Option<&str>, why: &str) -> Result<()> {
    let dir = failures_path(module);
    meta.create_all(&dir).map_err(meta_error)?;
    let path = format!("{dir}/{worker}");
    let data = json!({"worker": worker, "instance": instance, "error": why}).to_string();
    match meta.create(&path, data.as_bytes(), NodeKind::Persistent) {
        Err(MetaError::NodeExists(_)) => meta.set(&path, data.as_bytes(), None).map(|_| ()),
        other => other,
    }
    .map_err(meta_error)
}

/// Clears worker `worker`'s failure report, once it started.
pub fn clear_failure(meta: &ZkMetastore, module: &str, worker: u32) -> Result<()> {
    match meta.delete(&format!("{}/{worker}", failures_path(module)), None) {
        Ok(()) | Err(MetaError::NoNode(_)) => Ok(()),
        Err(e) => Err(meta_error(e)),
    }
}

/// The failure reports of `module`'s current instance: (worker, why).
pub fn failures(meta: &ZkMetastore, module: &str) -> Result<Vec<(u32, String)>> {
    let dir = failures_path(module);
    let ids = match meta.children(&dir) {
        Ok(ids) => ids,
        Err(MetaError::NoNode(_)) => return Ok(Vec::new()),
        Err(e) => return Err(meta_error(e)),
    };
    let current = module_instance(meta, module)?;
    let mut out = Vec::new();
    for id in ids {
        let Some((data, _)) = meta.get(&format!("{dir}/{id}")).map_err(meta_error)? else {
            continue;
        };
        let Ok(j) = serde_json::from_slice::<Json>(&data) else {
            continue;
        };
        if current.is_some() && j["instance"].as_str() != current.as_deref() {
            continue;
        }
        out.push((
            j["worker"].as_u64().unwrap_or(u64::from(u32::MAX)) as u32,
            j["error"].as_str().unwrap_or_default().to_string(),
        ));
    }
    out.sort();
    Ok(out)
}

/// What a worker started by a Supervisor belongs to: its assignment node
/// and its module instance. It serves only while that assignment exists
/// and names that instance.
#[derive(Debug, Clone)]
pub struct Fence {
    pub assignment: String,
    pub instance: String,
}

impl Fence {
    /// `Ok(None)` while the assignment holds, `Ok(Some(why))` once it is
    /// gone or names another instance; `Err` when the metastore cannot
    /// tell (then nothing is decided).
    fn check(&self, meta: &ZkMetastore) -> std::result::Result<Option<String>, MetaError> {
        let Some((data, _)) = meta.get(&self.assignment)? else {
            return Ok(Some(format!("its assignment {} is gone", self.assignment)));
        };
        let theirs = serde_json::from_slice::<Json>(&data)
            .ok()
            .and_then(|j| j["instance"].as_str().map(str::to_string));
        Ok((theirs.as_deref() != Some(self.instance.as_str())).then(|| {
            format!(
                "its assignment {} now belongs to instance {} (this worker is of instance {})",
                self.assignment,
                theirs.as_deref().unwrap_or("?"),
                self.instance
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
        let dir = workers_path(module);
        meta.create_all(&dir).map_err(meta_error)?;
        let path = format!("{dir}/{id}");
        let own = path.clone();
        let data = json!({
            "address": info.address,
            "tasks": info.tasks,
            "threads": info.threads,
            "workers": info.workers,
            "instance": info.instance,
            "engineVersion": engine::VERSION,
        })
        .to_string()
        .into_bytes();
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
