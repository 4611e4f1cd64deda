//! The metastore: where the Conductor, Supervisors and workers keep cluster
//! metadata and liveness. A trait, so the control logic does not depend on
//! ZooKeeper; [`ZkMetastore`] is the ZooKeeper backend.
//!
//! Paths are absolute within the cluster's root (`zookeeper.root`): `/`
//! is the root node. Ephemeral nodes live as long as the session that made
//! them; after a session expiry the metastore connects again with a new
//! session (its [`Metastore::session_epoch`] changes) and the owner must
//! create its ephemeral nodes again and re-read state before acting.
//! The API is blocking: daemons call it from their own threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zookeeper_client as zk;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("metastore: {0} does not exist")]
    NoNode(String),
    #[error("metastore: {0} already exists")]
    NodeExists(String),
    #[error("metastore: {0} changed since it was read (version mismatch)")]
    BadVersion(String),
    #[error("metastore: {0} has children")]
    NotEmpty(String),
    /// The session (and its ephemeral nodes) is gone; a new session was
    /// opened. Re-register, re-read, then retry.
    #[error("metastore: the session expired; ephemeral nodes are gone (reconnected with a new session)")]
    SessionExpired,
    #[error("metastore unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, MetaError>;

/// How long a node lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Persistent,
    /// Removed when the creating session ends (liveness).
    Ephemeral,
}

/// A one-shot notification that a watched node or its children changed.
pub struct Watch(WatchKind);

enum WatchKind {
    Zk(zk::OneshotWatcher),
    Memory(std::sync::mpsc::Receiver<()>),
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

impl Watch {
    /// Waits up to `timeout` for the change; true when it happened (a
    /// session event that ends the watch counts as a change: re-read).
    pub fn wait(self, timeout: Duration) -> bool {
        match self.0 {
            WatchKind::Zk(w) => smol::block_on(smol::future::or(
                async {
                    w.changed().await;
                    true
                },
                async {
                    smol::Timer::after(timeout).await;
                    false
                },
            )),
            // A dropped sender (the store went away) counts as a change.
            WatchKind::Memory(rx) => !matches!(
                rx.recv_timeout(timeout),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            ),
        }
    }
}

/// A node's data and version, as read.
pub type NodeData = (Vec<u8>, i32);

/// Cluster metadata storage.
pub trait Metastore: Send + Sync {
    /// Creates `path` with `data`; its parent must exist.
    fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<()>;
    /// Creates `path` and missing ancestors, empty and persistent; fine if
    /// it exists.
    fn create_all(&self, path: &str) -> Result<()>;
    /// Data and version of `path` (`None`: it does not exist).
    fn get(&self, path: &str) -> Result<Option<(Vec<u8>, i32)>>;
    /// Replaces the data of `path` if its version is `version` (any when
    /// `None`); returns the new version.
    fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<i32>;
    /// Deletes `path` (no children) if its version is `version`.
    fn delete(&self, path: &str, version: Option<i32>) -> Result<()>;
    /// Deletes `path` and everything under it; fine if it does not exist.
    fn delete_all(&self, path: &str) -> Result<()>;
    /// Names of the children of `path`, sorted.
    fn children(&self, path: &str) -> Result<Vec<String>>;
    /// Children of `path`, and a watch that fires when they change.
    fn watch_children(&self, path: &str) -> Result<(Vec<String>, Watch)>;
    /// Data and version of `path` (`None`: it does not exist), and a watch
    /// that fires when it is created, changed or deleted.
    fn watch_data(&self, path: &str) -> Result<(Option<NodeData>, Watch)>;
    /// Changes each time the metastore had to open a new session.
    fn session_epoch(&self) -> u64;
    /// The session that owns ephemeral node `path` (`None`: it does not
    /// exist; `Some(0)`: it is persistent).
    fn owner(&self, path: &str) -> Result<Option<i64>>;
    /// This metastore's current session (the owner of the ephemeral nodes
    /// it creates from now on).
    fn session_id(&self) -> i64;
}

/// Credentials of the cluster in the metastore: every node is created
/// readable and writable by these alone (ZooKeeper digest ACLs).
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The ZooKeeper backend.
pub struct ZkMetastore {
    /// `host:port,...`
    servers: String,
    root: String,
    credentials: Credentials,
    session_timeout: Duration,
    client: Mutex<zk::Client>,
    epoch: AtomicU64,
}

impl std::fmt::Debug for ZkMetastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkMetastore")
            .field("servers", &self.servers)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn map_err(path: &str, e: zk::Error) -> MetaError {
    match e {
        zk::Error::NoNode => MetaError::NoNode(path.to_string()),
        zk::Error::NodeExists => MetaError::NodeExists(path.to_string()),
        zk::Error::BadVersion => MetaError::BadVersion(path.to_string()),
        zk::Error::NotEmpty => MetaError::NotEmpty(path.to_string()),
        zk::Error::SessionExpired => MetaError::SessionExpired,
        other => MetaError::Unavailable(format!("{path}: {other}")),
    }
}

/// Nodes are readable and writable by sessions with the cluster's
/// credentials alone: the creator's digest identity.
fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::creator_all())
}

impl ZkMetastore {
    /// The session timeout it asks ZooKeeper for.
    pub fn session_timeout(&self) -> Duration {
        self.session_timeout
    }

    /// Connects to `hosts` on `port` under `root` (created if missing, with
    /// an ACL that lets only `credentials` in), authenticated with
    /// `credentials`, retrying with backoff for up to `wait`; then a clear
    /// error.
    pub fn connect(
        hosts: &[String],
        port: u16,
        root: &str,
        credentials: &Credentials,
        wait: Duration,
    ) -> Result<ZkMetastore> {
        Self::connect_with_session(hosts, port, root, credentials, wait, Duration::from_secs(10))
    }

    /// [`ZkMetastore::connect`] asking for sessions of `session_timeout`
    /// (ZooKeeper keeps it within 2 to 20 of its `tickTime`s).
    pub fn connect_with_session(
        hosts: &[String],
        port: u16,
        root: &str,
        credentials: &Credentials,
        wait: Duration,
        session_timeout: Duration,
    ) -> Result<ZkMetastore> {
        let servers = hosts
            .iter()
            .map(|h| format!("{h}:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let root = format!("/{}", root.trim_matches('/'));
        let client = Self::open(&servers, &root, credentials, session_timeout, wait)?;
        Ok(ZkMetastore {
            servers,
            root,
            credentials: credentials.clone(),
            session_timeout,
            client: Mutex::new(client),
            epoch: AtomicU64::new(0),
        })
    }

    async fn attempt(
        servers: &str,
        root: &str,
        credentials: &Credentials,
        session_timeout: Duration,
    ) -> std::result::Result<zk::Client, zk::Error> {
        let auth = format!("{}:{}", credentials.user, credentials.password);
        let client = zk::Client::connector()
            .with_session_timeout(session_timeout)
            .with_connection_timeout(Duration::from_secs(2))
            .with_auth("digest", auth.as_bytes())
            .connect(servers)
            .await?;
        if root != "/" {
            match client.mkdir(root, &persistent()).await {
                Ok(()) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(e),
            }
            // The root must be the cluster's alone: one made by another
            // cluster (other credentials) or open to anyone is refused.
            match client.get_acl(root).await {
                Ok((acl, _)) if acl.iter().all(|a| a.scheme() == "digest") => {}
                Ok(_) => return Err(zk::Error::NoAuth),
                Err(e) => return Err(e),
            }
        }
        Ok(client)
    }

    fn open(
        servers: &str,
        root: &str,
        credentials: &Credentials,
        session_timeout: Duration,
        wait: Duration,
    ) -> Result<zk::Client> {
        let deadline = Instant::now() + wait;
        let mut backoff = Duration::from_millis(100);
        loop {
            // One attempt never runs past the deadline (the client's own
            // connect may keep trying for a whole session timeout).
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let attempt = smol::block_on(smol::future::or(
                async { Some(Self::attempt(servers, root, credentials, session_timeout).await) },
                async {
                    smol::Timer::after(remaining).await;
                    None
                },
            ));
            let attempt = match attempt {
                Some(Err(zk::Error::NoAuth)) => {
                    return Err(MetaError::Unavailable(format!(
                        "ZooKeeper at {servers} refuses this cluster's credentials for {root}: another cluster \
                         (another cluster secret) owns zookeeper.root, or the node is open to anyone; use another \
                         zookeeper.root or the cluster's secret file"
                    )))
                }
                Some(a) => a.map_err(|e| e.to_string()),
                None => Err(format!("no session within {:.1} s", remaining.as_secs_f64())),
            };
            match attempt {
                Ok(client) => {
                    return if root == "/" {
                        Ok(client)
                    } else {
                        client
                            .chroot(root.to_string())
                            .map_err(|_| MetaError::Unavailable(format!("invalid zookeeper.root {root}")))
                    }
                }
                Err(e) if Instant::now() + backoff < deadline => {
                    let _ = e;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(MetaError::Unavailable(format!(
                    "ZooKeeper unreachable at {servers} (zookeeper.servers, zookeeper.port) after {} s of retries: {e}",
                    wait.as_secs_f64()
                )))
                }
            }
        }
    }

    fn client(&self) -> MutexGuard<'_, zk::Client> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on the client; after a session expiry opens a new session
    /// (and reports the expiry, so the caller re-registers).
    fn run<T>(&self, path: &str, op: impl FnOnce(zk::Client) -> std::result::Result<T, zk::Error>) -> Result<T> {
        let client = self.client().clone();
        match op(client) {
            Ok(v) => Ok(v),
            Err(zk::Error::SessionExpired) => {
                let fresh = Self::open(
                    &self.servers,
                    &self.root,
                    &self.credentials,
                    self.session_timeout,
                    self.session_timeout,
                )?;
                *self.client() = fresh;
                self.epoch.fetch_add(1, Ordering::SeqCst);
                Err(MetaError::SessionExpired)
            }
            Err(e) => Err(map_err(path, e)),
        }
    }
}

impl Metastore for ZkMetastore {
    fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<()> {
        let mode = match kind {
            NodeKind::Persistent => zk::CreateMode::Persistent,
            NodeKind::Ephemeral => zk::CreateMode::Ephemeral,
        };
        self.run(path, |c| {
            smol::block_on(c.create(path, data, &mode.with_acls(zk::Acls::creator_all()))).map(|_| ())
        })
    }

    fn create_all(&self, path: &str) -> Result<()> {
        self.run(path, |c| match smol::block_on(c.mkdir(path, &persistent())) {
            Ok(()) | Err(zk::Error::NodeExists) => Ok(()),
            Err(e) => Err(e),
        })
    }

    fn get(&self, path: &str) -> Result<Option<(Vec<u8>, i32)>> {
        self.run(path, |c| match smol::block_on(c.get_data(path)) {
            Ok((data, stat)) => Ok(Some((data, stat.version))),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<i32> {
        self.run(path, |c| {
            smol::block_on(c.set_data(path, data, version)).map(|s| s.version)
        })
    }

    fn delete(&self, path: &str, version: Option<i32>) -> Result<()> {
        self.run(path, |c| smol::block_on(c.delete(path, version)))
    }

    fn delete_all(&self, path: &str) -> Result<()> {
        let children = match self.children(path) {
            Ok(c) => c,
            Err(MetaError::NoNode(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        for child in children {
            let p = if path == "/" {
                format!("/{child}")
            } else {
                format!("{path}/{child}")
            };
            self.delete_all(&p)?;
        }
        match self.delete(path, None) {
            Ok(()) | Err(MetaError::NoNode(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        self.run(path, |c| {
            smol::block_on(c.list_children(path)).map(|mut v| {
                v.sort();
                v
            })
        })
    }

    fn watch_children(&self, path: &str) -> Result<(Vec<String>, Watch)> {
        self.run(path, |c| {
            smol::block_on(c.list_and_watch_children(path)).map(|(mut v, w)| {
                v.sort();
                (v, Watch(WatchKind::Zk(w)))
            })
        })
    }

    fn watch_data(&self, path: &str) -> Result<(Option<NodeData>, Watch)> {
        self.run(path, |c| match smol::block_on(c.get_and_watch_data(path)) {
            Ok((data, stat, w)) => Ok((Some((data, stat.version)), Watch(WatchKind::Zk(w)))),
            // Gone: watch for its creation instead.
            Err(zk::Error::NoNode) => {
                smol::block_on(c.check_and_watch_stat(path)).map(|(_, w)| (None, Watch(WatchKind::Zk(w))))
            }
            Err(e) => Err(e),
        })
    }

    fn session_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn owner(&self, path: &str) -> Result<Option<i64>> {
        self.run(path, |c| match smol::block_on(c.check_stat(path)) {
            Ok(stat) => Ok(stat.map(|s| s.ephemeral_owner)),
            Err(e) => Err(e),
        })
    }

    fn session_id(&self) -> i64 {
        self.client().session_id().0
    }
}

/// An in-memory metastore with ZooKeeper's semantics (versions, ephemeral
/// nodes owned by sessions, child watches), for unit tests and
/// simulations of the control logic. [`MemMetastore::session`] gives
/// another client of the same store with its own session;
/// [`MemMetastore::expire_session`] ends a session as a ZooKeeper expiry
/// would (its ephemeral nodes go).
#[derive(Clone)]
pub struct MemMetastore {
    store: std::sync::Arc<Mutex<MemStore>>,
    session: std::sync::Arc<AtomicU64>,
    epoch: std::sync::Arc<AtomicU64>,
}

struct MemNode {
    data: Vec<u8>,
    version: i32,
    /// 0: persistent; else the owning session.
    owner: i64,
}

struct MemStore {
    nodes: std::collections::BTreeMap<String, MemNode>,
    next_session: u64,
    watches: std::collections::HashMap<String, Vec<std::sync::mpsc::Sender<()>>>,
    data_watches: std::collections::HashMap<String, Vec<std::sync::mpsc::Sender<()>>>,
}

impl std::fmt::Debug for MemMetastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemMetastore")
            .field("session", &self.session.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Default for MemMetastore {
    fn default() -> Self {
        MemMetastore::new()
    }
}

fn parent_of(path: &str) -> Option<&str> {
    match path.rfind('/') {
        Some(0) if path.len() > 1 => Some("/"),
        Some(0) | None => None,
        Some(i) => Some(&path[..i]),
    }
}

fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || (path.len() > 1 && path.ends_with('/')) || path.contains("//") {
        return Err(MetaError::Unavailable(format!("{path}: not an absolute node path")));
    }
    Ok(())
}

impl MemStore {
    fn children(&self, path: &str) -> Vec<String> {
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| k.len() > prefix.len() && !k[prefix.len()..].contains('/'))
            .map(|(k, _)| k[prefix.len()..].to_string())
            .collect()
    }

    /// Fires the data watches of `path`.
    fn data_changed(&mut self, path: &str) {
        for tx in self.data_watches.remove(path).unwrap_or_default() {
            let _ = tx.send(());
        }
    }

    /// Fires the data watches of `path` (created or deleted) and the child
    /// watches of its parent.
    fn changed(&mut self, path: &str) {
        self.data_changed(path);
        if let Some(parent) = parent_of(path) {
            for tx in self.watches.remove(parent).unwrap_or_default() {
                let _ = tx.send(());
            }
        }
    }
}

impl MemMetastore {
    /// An empty store (only the root `/`) and a first session.
    pub fn new() -> MemMetastore {
        let mut nodes = std::collections::BTreeMap::new();
        nodes.insert(
            "/".to_string(),
            MemNode {
                data: Vec::new(),
                version: 0,
                owner: 0,
            },
        );
        MemMetastore {
            store: std::sync::Arc::new(Mutex::new(MemStore {
                nodes,
                next_session: 2,
                watches: Default::default(),
                data_watches: Default::default(),
            })),
            session: std::sync::Arc::new(AtomicU64::new(1)),
            epoch: std::sync::Arc::new(AtomicU64::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Another client of the same store, with a session of its own.
    pub fn session(&self) -> MemMetastore {
        let id = {
            let mut s = self.lock();
            s.next_session += 1;
            s.next_session - 1
        };
        MemMetastore {
            store: self.store.clone(),
            session: std::sync::Arc::new(AtomicU64::new(id)),
            epoch: std::sync::Arc::new(AtomicU64::new(0)),
        }
    }

    /// Ends this client's session as an expiry would: its ephemeral nodes
    /// are removed, and it goes on with a new session (the epoch changes).
    pub fn expire_session(&self) {
        let old = self.session.load(Ordering::SeqCst) as i64;
        let mut s = self.lock();
        let gone: Vec<String> = s
            .nodes
            .iter()
            .filter(|(_, n)| n.owner == old)
            .map(|(k, _)| k.clone())
            .collect();
        for p in gone {
            s.nodes.remove(&p);
            s.changed(&p);
        }
        s.next_session += 1;
        self.session.store(s.next_session - 1, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

impl Metastore for MemMetastore {
    fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<()> {
        check_path(path)?;
        let mut s = self.lock();
        if s.nodes.contains_key(path) {
            return Err(MetaError::NodeExists(path.to_string()));
        }
        let parent = parent_of(path).ok_or_else(|| MetaError::NodeExists(path.to_string()))?;
        match s.nodes.get(parent) {
            None => return Err(MetaError::NoNode(path.to_string())),
            Some(p) if p.owner != 0 => {
                return Err(MetaError::Unavailable(format!(
                    "{path}: ephemeral nodes cannot have children"
                )))
            }
            Some(_) => {}
        }
        let owner = match kind {
            NodeKind::Persistent => 0,
            NodeKind::Ephemeral => self.session_id(),
        };
        s.nodes.insert(
            path.to_string(),
            MemNode {
                data: data.to_vec(),
                version: 0,
                owner,
            },
        );
        s.changed(path);
        Ok(())
    }

    fn create_all(&self, path: &str) -> Result<()> {
        check_path(path)?;
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            match self.create(&at, b"", NodeKind::Persistent) {
                Ok(()) | Err(MetaError::NodeExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn get(&self, path: &str) -> Result<Option<(Vec<u8>, i32)>> {
        check_path(path)?;
        Ok(self.lock().nodes.get(path).map(|n| (n.data.clone(), n.version)))
    }

    fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<i32> {
        check_path(path)?;
        let mut s = self.lock();
        let n = s
            .nodes
            .get_mut(path)
            .ok_or_else(|| MetaError::NoNode(path.to_string()))?;
        if version.is_some_and(|v| v != n.version) {
            return Err(MetaError::BadVersion(path.to_string()));
        }
        n.data = data.to_vec();
        n.version += 1;
        let version = n.version;
        s.data_changed(path);
        Ok(version)
    }

    fn delete(&self, path: &str, version: Option<i32>) -> Result<()> {
        check_path(path)?;
        let mut s = self.lock();
        let n = s.nodes.get(path).ok_or_else(|| MetaError::NoNode(path.to_string()))?;
        if version.is_some_and(|v| v != n.version) {
            return Err(MetaError::BadVersion(path.to_string()));
        }
        if !s.children(path).is_empty() {
            return Err(MetaError::NotEmpty(path.to_string()));
        }
        s.nodes.remove(path);
        s.changed(path);
        Ok(())
    }

    fn delete_all(&self, path: &str) -> Result<()> {
        check_path(path)?;
        let mut s = self.lock();
        let prefix = format!("{path}/");
        let gone: Vec<String> = s
            .nodes
            .keys()
            .filter(|k| *k == path || k.starts_with(&prefix))
            .cloned()
            .collect();
        for p in gone {
            s.nodes.remove(&p);
            s.changed(&p);
        }
        Ok(())
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        check_path(path)?;
        let s = self.lock();
        if !s.nodes.contains_key(path) {
            return Err(MetaError::NoNode(path.to_string()));
        }
        Ok(s.children(path))
    }

    fn watch_children(&self, path: &str) -> Result<(Vec<String>, Watch)> {
        let children = self.children(path)?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.lock().watches.entry(path.to_string()).or_default().push(tx);
        Ok((children, Watch(WatchKind::Memory(rx))))
    }

    fn watch_data(&self, path: &str) -> Result<(Option<NodeData>, Watch)> {
        check_path(path)?;
        let mut s = self.lock();
        let data = s.nodes.get(path).map(|n| (n.data.clone(), n.version));
        let (tx, rx) = std::sync::mpsc::channel();
        s.data_watches.entry(path.to_string()).or_default().push(tx);
        Ok((data, Watch(WatchKind::Memory(rx))))
    }

    fn session_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn owner(&self, path: &str) -> Result<Option<i64>> {
        check_path(path)?;
        Ok(self.lock().nodes.get(path).map(|n| n.owner))
    }

    fn session_id(&self) -> i64 {
        self.session.load(Ordering::SeqCst) as i64
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn behaves_like_zookeeper() {
        let m = MemMetastore::new();
        assert!(matches!(
            m.create("/a/b", b"", NodeKind::Persistent),
            Err(MetaError::NoNode(_))
        ));
        m.create_all("/a/b").unwrap();
        m.create_all("/a/b").unwrap();
        m.create("/a/b/c", b"1", NodeKind::Persistent).unwrap();
        assert!(matches!(
            m.create("/a/b/c", b"", NodeKind::Persistent),
            Err(MetaError::NodeExists(_))
        ));
        assert_eq!(m.get("/a/b/c").unwrap(), Some((b"1".to_vec(), 0)));
        assert_eq!(m.set("/a/b/c", b"2", Some(0)).unwrap(), 1);
        assert!(matches!(m.set("/a/b/c", b"3", Some(0)), Err(MetaError::BadVersion(_))));
        assert!(matches!(m.delete("/a/b", None), Err(MetaError::NotEmpty(_))));
        assert_eq!(m.children("/a").unwrap(), ["b"]);
        assert_eq!(m.children("/").unwrap(), ["a"]);
        assert!(matches!(m.children("/x"), Err(MetaError::NoNode(_))));
        // Watches fire on a child change; ephemeral nodes have owners.
        let (kids, watch) = m.watch_children("/a/b").unwrap();
        assert_eq!(kids, ["c"]);
        let other = m.session();
        other.create("/a/b/e", b"", NodeKind::Ephemeral).unwrap();
        assert!(watch.wait(Duration::from_secs(5)));
        assert_eq!(m.owner("/a/b/e").unwrap(), Some(other.session_id()));
        assert_eq!(m.owner("/a/b/c").unwrap(), Some(0));
        assert_ne!(other.session_id(), m.session_id());
        let epoch = other.session_epoch();
        other.expire_session();
        assert_ne!(other.session_epoch(), epoch);
        assert_eq!(m.children("/a/b").unwrap(), ["c"]);
        let (_, quiet) = m.watch_children("/a/b").unwrap();
        assert!(!quiet.wait(Duration::from_millis(20)));
        m.delete_all("/a").unwrap();
        assert_eq!(m.children("/").unwrap(), Vec::<String>::new());
    }
}
