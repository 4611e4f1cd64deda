//! `ClusterManager`: remote clients found through the metastore.
//!
//! A worker serving a module registers itself as an ephemeral node
//! `/modules/<module>/workers/<id>` whose data is JSON:
//! `{"address": "host:port", "tasks": 8, "threads": 2, "engineVersion": "..."}`.
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
use engine::{Error, Result};
use serde_json::{json, Value as Json};

use crate::remote::{RemoteCluster, RemoteDepot, RemotePState, RemoteQuery};

/// Where a module's workers register.
pub fn workers_path(module: &str) -> String {
    format!("/modules/{module}/workers")
}

fn meta_error(e: MetaError) -> Error {
    Error::Closed(e.to_string())
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
    ZkMetastore::connect(&hosts, port, &root, Duration::from_secs(15)).map_err(meta_error)
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
    pub address: String,
    pub tasks: u32,
    pub threads: u32,
}

/// Hands out remote clients of the modules running on a cluster.
pub struct ClusterManager {
    meta: ZkMetastore,
    connections: Mutex<HashMap<String, RemoteCluster>>,
}

impl std::fmt::Debug for ClusterManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterManager")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
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
        Ok(ClusterManager {
            meta: connect_metastore(&config, side)?,
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// The workers of `module`.
    pub fn workers(&self, module: &str) -> Result<Vec<WorkerInfo>> {
        let path = workers_path(module);
        let ids = match self.meta.children(&path) {
            Ok(ids) => ids,
            Err(MetaError::NoNode(_)) => Vec::new(),
            Err(e) => return Err(meta_error(e)),
        };
        let mut out = Vec::new();
        for id in ids {
            let Some((data, _)) = self.meta.get(&format!("{path}/{id}")).map_err(meta_error)? else {
                continue;
            };
            let j: Json = serde_json::from_slice(&data)
                .map_err(|e| Error::Closed(format!("worker {id} of {module} registered bad data: {e}")))?;
            out.push(WorkerInfo {
                address: j["address"].as_str().unwrap_or_default().to_string(),
                tasks: j["tasks"].as_u64().unwrap_or(0) as u32,
                threads: j["threads"].as_u64().unwrap_or(0) as u32,
            });
        }
        Ok(out)
    }

    fn cluster(&self, module: &str) -> Result<(RemoteCluster, WorkerInfo)> {
        let worker = self.workers(module)?.into_iter().next().ok_or_else(|| {
            Error::Schema(format!(
                "no module named {module} is running (no worker of it is registered)"
            ))
        })?;
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conns.get(&worker.address) {
            return Ok((c.clone(), worker));
        }
        let c = RemoteCluster::connect(&worker.address)?;
        conns.insert(worker.address.clone(), c.clone());
        Ok((c, worker))
    }

    /// The number of tasks of `module`.
    pub fn tasks(&self, module: &str) -> Result<u32> {
        Ok(self.cluster(module)?.1.tasks)
    }

    pub fn depot(&self, module: &str, depot: &str) -> Result<RemoteDepot> {
        Ok(self.cluster(module)?.0.depot(module, depot))
    }

    pub fn pstate(&self, module: &str, pstate: &str) -> Result<RemotePState> {
        Ok(self.cluster(module)?.0.pstate(module, pstate))
    }

    pub fn query(&self, module: &str, query: &str) -> Result<RemoteQuery> {
        Ok(self.cluster(module)?.0.query(module, query))
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
