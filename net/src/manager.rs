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
    ZkMetastore::connect(&hosts, port, &root, wait).map_err(meta_error)
}

/// Loads `rama.yaml` from `path` (else the working directory) with
/// `overrides` applied.
pub fn load_config(path: Option<&Path>, overrides: &[(&str, &str)]) -> Result<Config> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
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
}

impl WorkerInfo {
    /// As the Conductor's `workers` op sends it.
    pub fn to_value(&self) -> Value {
        Value::map([
            ("worker", Value::Int(i64::from(self.worker))),
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
        })
    }
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
        });
    }
    out.sort_by_key(|w| w.worker);
    Ok(out)
}

/// Where a manager finds the workers.
enum Directory {
    Metastore(ZkMetastore),
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
        Ok(ClusterManager::with(Directory::Metastore(connect_metastore(
            &config, side,
        )?)))
    }

    /// Through the Conductor at `addr` (`host:port`): for clients that
    /// reach the Conductor and the workers but not ZooKeeper. Checks that
    /// the Conductor answers.
    pub fn via_conductor(addr: &str) -> Result<ClusterManager> {
        crate::admin::Admin::connect(addr).map_err(Error::Unavailable)?;
        Ok(ClusterManager::with(Directory::Conductor(addr.to_string())))
    }

    fn with(directory: Directory) -> ClusterManager {
        ClusterManager {
            inner: Arc::new(Inner {
                directory,
                connections: Mutex::new(HashMap::new()),
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
    fn workers(&self, module: &str) -> Result<Vec<WorkerInfo>> {
        match &self.directory {
            Directory::Metastore(meta) => registered_workers(meta, module),
            Directory::Conductor(addr) => {
                let admin = crate::admin::Admin::connect(addr).map_err(Error::Unavailable)?;
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
        let workers = self.workers(module)?;
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
                    let c = RemoteCluster::connect(&w.address)?;
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

/// Keeps a worker's registration: creates its ephemeral node and creates
/// it again whenever it is gone (a new session after an expiry, a
/// ZooKeeper that lost it). Stops when dropped.
pub struct Registration {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registration")
    }
}

impl Registration {
    pub fn start(meta: ZkMetastore, module: &str, id: u32, info: &WorkerInfo) -> Result<Registration> {
        let dir = workers_path(module);
        meta.create_all(&dir).map_err(meta_error)?;
        let path = format!("{dir}/{id}");
        let data = json!({
            "address": info.address,
            "tasks": info.tasks,
            "threads": info.threads,
            "workers": info.workers,
            "engineVersion": engine::VERSION,
        })
        .to_string()
        .into_bytes();
        let ensure = move |meta: &ZkMetastore| -> std::result::Result<(), MetaError> {
            match meta.get(&path)? {
                Some((d, _)) if d == data => Ok(()),
                Some(_) => {
                    // Another worker's (or a stale) registration under our id.
                    meta.delete(&path, None)?;
                    meta.create(&path, &data, NodeKind::Ephemeral)
                }
                None => match meta.create(&path, &data, NodeKind::Ephemeral) {
                    Ok(()) | Err(MetaError::NodeExists(_)) => Ok(()),
                    Err(e) => Err(e),
                },
            }
        };
        ensure(&meta).map_err(meta_error)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(500));
                    // Errors (ZooKeeper away) are retried on the next round.
                    let _ = ensure(&meta);
                }
                drop(meta);
            })
        };
        Ok(Registration {
            stop,
            thread: Some(thread),
        })
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
