//! How a worker reaches the other workers of its module: one connection
//! per (worker, lane), opened on first use to the address the worker
//! registered in the metastore, opened again (address looked up again)
//! after it breaks. A message that cannot be sent, or whose connection
//! breaks before its answer, is answered with `Error::Unavailable`; the
//! engine decides what to run again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::layout::{self, Layout, WorkerRegistration};
use control::metastore::{Metastore, ZkMetastore};
use engine::cluster::peer::{Done, Peers};
use engine::{Error, Result};

use crate::auth::Secret;
use crate::transport::{Connection, FRAME_BYTES_MAX, PROTOCOL_VERSION};

/// The handshake role of a peer connection carrying `lane`.
pub fn peer_role(lane: u32) -> u8 {
    1 + lane as u8
}

/// The lane a peer connection's handshake role names (`None`: a client).
pub fn lane_of_role(role: u8) -> Option<u32> {
    role.checked_sub(1).map(u32::from)
}

/// The address worker `worker` of instance `instance` of `module`
/// registered; with `incarnation`, only a registration of that
/// incarnation counts (a stale worker of another deploy is never a peer).
pub fn worker_address(
    meta: &dyn Metastore,
    module: &str,
    (instance, incarnation): (u32, Option<&str>),
    worker: u32,
) -> Result<String> {
    let path = layout::worker(module, instance, worker);
    let r = Layout::new(meta)
        .read::<WorkerRegistration>(&path)
        .map_err(|e| Error::Unavailable(format!("looking up worker {worker} of {module}: {e}")))?
        .map(|(r, _)| r)
        .ok_or_else(|| Error::Unavailable(format!("worker {worker} of module {module} is not registered")))?;
    if let Some(ours) = incarnation {
        if r.incarnation.as_deref() != Some(ours) {
            return Err(Error::Unavailable(format!(
                "worker {worker} of module {module} is registered by another incarnation ({}) than this one ({ours})",
                r.incarnation.as_deref().unwrap_or("none")
            )));
        }
    }
    Ok(r.address)
}

/// Finds the address of a worker by its index.
pub type Resolve = Box<dyn Fn(u32) -> Result<String> + Send + Sync>;

/// The transport between the workers of one module.
pub struct NetPeers {
    module: String,
    resolve: Resolve,
    conns: Mutex<HashMap<(u32, u32), Arc<Connection>>>,
    secret: Secret,
}

impl std::fmt::Debug for NetPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetPeers")
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl NetPeers {
    /// Peers found through their registrations in `meta` (of instance
    /// `instance`, and of `incarnation` when given).
    pub fn new(
        module: &str,
        meta: ZkMetastore,
        secret: Secret,
        instance: u32,
        incarnation: Option<String>,
    ) -> NetPeers {
        let (meta, name) = (Mutex::new(meta), module.to_string());
        Self::with_resolver(
            module,
            Box::new(move |worker| {
                let meta = meta.lock().expect("metastore");
                worker_address(&*meta, &name, (instance, incarnation.as_deref()), worker)
            }),
            secret,
        )
    }

    /// Peers found by `resolve` (tests wire workers up without a
    /// metastore).
    pub fn with_resolver(module: &str, resolve: Resolve, secret: Secret) -> NetPeers {
        NetPeers {
            module: module.to_string(),
            resolve,
            conns: Mutex::new(HashMap::new()),
            secret,
        }
    }

    fn connection(&self, worker: u32, lane: u32) -> Result<Arc<Connection>> {
        if let Some(c) = self.conns.lock().expect("peer connections").get(&(worker, lane)) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let address = (self.resolve)(worker)?;
        let conn = Connection::connect_as(
            address.as_str(),
            PROTOCOL_VERSION,
            FRAME_BYTES_MAX,
            peer_role(lane),
            &self.secret,
        )
        .map_err(|e| Error::Unavailable(format!("worker {worker} of module {}: {e}", self.module)))?;
        let conn = Arc::new(conn);
        let mut conns = self.conns.lock().expect("peer connections");
        match conns.get(&(worker, lane)) {
            // Another sender connected meanwhile: use that one (replacing
            // it would close it under the answers it waits for).
            Some(c) if !c.is_closed() => Ok(c.clone()),
            _ => {
                conns.insert((worker, lane), conn.clone());
                Ok(conn)
            }
        }
    }

    /// Waits until worker `worker` answers on every lane's connection
    /// type (it serves the module), or `give_up` says to stop; says what
    /// it waits for every few seconds.
    pub fn wait_for(&self, worker: u32, give_up: impl Fn() -> bool) -> Result<()> {
        let started = std::time::Instant::now();
        let mut said = 0;
        loop {
            let reached = self.connection(worker, 0).and_then(|c| {
                let answer = c
                    .call(&engine::cluster::peer::ping())
                    .map_err(|e| Error::Unavailable(e.to_string()))?;
                engine::cluster::peer::answer_ok(answer)
            });
            match reached {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if give_up() {
                        return Err(e);
                    }
                    let waited = started.elapsed().as_secs();
                    if waited >= said + 5 {
                        said = waited;
                        tracing::info!(
                            "waiting for worker {worker} of module {} ({waited} s): {e}",
                            self.module
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

impl Peers for NetPeers {
    fn send(&self, worker: u32, lane: u32, message: Vec<u8>, done: Done) {
        let conn = match self.connection(worker, lane) {
            Ok(c) => c,
            Err(e) => return done(Err(e)),
        };
        // `done` is called exactly once: by the answer, or here when the
        // connection refuses the message.
        let done = engine::sync::CallOnce::new(done);
        let on_answer = {
            let (done, module) = (done.clone(), self.module.clone());
            Box::new(move |answer: crate::Result<Vec<u8>>| {
                done.call(answer.map_err(|e| Error::Unavailable(format!("worker {worker} of module {module}: {e}"))));
            })
        };
        if let Err(e) = conn.send_with(&message, on_answer) {
            done.call(Err(Error::Unavailable(format!(
                "worker {worker} of module {}: {e}",
                self.module
            ))));
        }
    }
}
