//! `rama supervisor`: runs the worker processes the Conductor assigns to
//! this machine.
//!
//! - Its id is kept in `<local.dir>/supervisor/id` across restarts; it
//!   registers `/supervisors/<id>` (ephemeral) with its host and port range,
//!   again after any session loss.
//! - It polls `/assignments/<id>`: each assignment not running gets a worker
//!   process (the artifact fetched from the Conductor into
//!   `<local.dir>/supervisor/artifacts/`, a free port from
//!   `supervisor.port.range`, data in
//!   `<local.dir>/supervisor/data/<module>/<instance>-<incarnation>` (shared by the
//!   instance's workers on this machine: each owns its task groups'
//!   directories in it), its log in `<log.dir>/worker-<a>.log`, which the
//!   worker rotates); a worker that exits is started again; a worker whose
//!   assignment is gone is stopped (SIGTERM), and an instance's data is
//!   removed once no assignment of it is left here.
//! - Worker process ids are kept in `<local.dir>/supervisor/workers/<a>.pid`.
//!   Stopping or killing the Supervisor leaves its workers running; a
//!   restarted Supervisor adopts the ones still alive instead of starting
//!   them twice.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use control::config::{Config, Side};
use control::layout::{self, Assignment, Layout, SupervisorInfo};
use control::metastore::{Metastore, NodeKind, ZkMetastore};
use net::manager::connect_metastore;

use net::admin::{self, bytes, int, Admin};

/// A worker process: our child, or one adopted from an earlier run.
enum Proc {
    Child(Child),
    Adopted(u32),
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted(p) => *p,
        }
    }

    /// The exit code of a child that ended (an adopted worker's is not
    /// known).
    fn exit_code(&mut self) -> Option<i32> {
        match self {
            // Reaped by `alive` already: try_wait gives the kept status.
            Proc::Child(c) => c.try_wait().ok().flatten().and_then(|s| s.code()),
            Proc::Adopted(_) => None,
        }
    }

    fn alive(&mut self) -> bool {
        match self {
            Proc::Child(c) => matches!(c.try_wait(), Ok(None)),
            // SAFETY: kill(pid, 0) only checks that the process exists.
            Proc::Adopted(p) => unsafe { libc::kill(*p as i32, 0) == 0 },
        }
    }

    fn stop(&mut self) {
        let pid = self.pid() as i32;
        // SAFETY: signals a worker process this Supervisor started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..200 {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if let Proc::Child(c) = self {
            let _ = c.wait();
        }
    }
}

fn supervisor_id(dir: &Path) -> Result<String, String> {
    let path = dir.join("id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(id);
        }
        return Err(format!(
            "{} does not hold a supervisor id; remove it to get a new one",
            path.display()
        ));
    }
    let mut raw = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, format!("{id}\n")).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(id)
}

/// The file beside a Supervisor's data naming the cluster it belongs to.
const CLUSTER_FILE: &str = "cluster";

/// Makes sure this Supervisor's data belongs to the cluster of the
/// metastore it reached before it acts on any of it: a Supervisor pointed
/// at a fresh, wiped or other cluster's ZooKeeper would otherwise find no
/// assignments there, stop its workers and delete their data. The first
/// start records the cluster (waiting for a Conductor to make its
/// identity); later starts refuse a metastore with another identity or
/// with none, naming both and what to do.
fn check_cluster(dir: &Path, layout: &Layout<'_>, config: &Config, stop: &AtomicBool) -> Result<(), String> {
    let path = dir.join(CLUSTER_FILE);
    let servers = config
        .hosts("zookeeper.servers", Side::Internal)
        .map(|h| h.join(","))
        .unwrap_or_default();
    let mine = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let mut waited = false;
    loop {
        let theirs = layout
            .cluster_identity()
            .map_err(|e| format!("reading {}: {e}", layout::CLUSTER))?;
        match (mine.as_deref(), theirs) {
            (Some(mine), Some(theirs)) if theirs.id == mine => return Ok(()),
            (Some(mine), Some(theirs)) => {
                return Err(format!(
                    "this Supervisor's data ({}) belongs to cluster {mine}, but the ZooKeeper it reached                      (zookeeper.servers {servers}) holds cluster {}: it was started against another                      cluster's ZooKeeper; point zookeeper.servers at its own cluster, or move {} away to                      join this one with no data",
                    dir.display(),
                    theirs.id,
                    dir.display()
                ))
            }
            (Some(mine), None) => {
                return Err(format!(
                    "this Supervisor's data ({}) belongs to cluster {mine}, but the ZooKeeper it reached                      (zookeeper.servers {servers}) holds no cluster: it is a fresh or wiped ZooKeeper,                      where none of the modules this data belongs to exist; nothing was stopped or                      removed. Point zookeeper.servers at the cluster's ZooKeeper, or move {} away to                      start over",
                    dir.display(),
                    dir.display()
                ))
            }
            (None, Some(theirs)) => {
                let tmp = dir.join(format!("{CLUSTER_FILE}.tmp"));
                std::fs::write(&tmp, format!("{}
", theirs.id))
                    .and_then(|()| File::open(&tmp)?.sync_all())
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .and_then(|()| File::open(dir)?.sync_all())
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                return Ok(());
            }
            (None, None) => {
                if stop.load(Ordering::SeqCst) {
                    return Err("stopped before a Conductor made the cluster identity".into());
                }
                if !waited {
                    tracing::info!("waiting for a Conductor to make the cluster identity ({})", layout::CLUSTER);
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Whether process `pid` runs the worker of assignment node `path`.
fn is_worker(pid: u32, path: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<String> = c
                .split(|b| *b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            args.iter().any(|s| s == "worker") && args.windows(2).any(|w| w[0] == "--assignment" && w[1] == path)
        })
        .unwrap_or(false)
}

struct Supervisor {
    config: Config,
    meta: ZkMetastore,
    id: String,
    dir: PathBuf,
    logs: control::logging::Logging,
    host: String,
    ports: (u16, u16),
    workers: HashMap<String, Proc>,
    secret: net::auth::Secret,
    /// Workers that exited or failed to start: the next start waits.
    restarts: HashMap<String, Restart>,
    /// When each running worker was started by this Supervisor.
    started: HashMap<String, std::time::Instant>,
    /// The incarnation each assignment names, once read.
    incarnations: HashMap<String, String>,
}

/// A worker that keeps exiting is started again less and less often (1 s
/// doubling to a minute), so a worker that cannot open its data is not a
/// crash loop; one that ran for a while starts again at once.
struct Restart {
    tries: u32,
    not_before: std::time::Instant,
}

const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A worker that ran this long before exiting is restarted without delay.
const RESTART_HEALTHY_RUN: Duration = Duration::from_secs(60);

impl Supervisor {
    fn layout(&self) -> Layout<'_> {
        Layout::new(&self.meta)
    }

    fn register(&self) {
        let path = layout::supervisor(&self.id);
        if self.meta.get(&path).ok().flatten().is_some() {
            return;
        }
        let info = SupervisorInfo {
            host: self.host.clone(),
            port_first: self.ports.0,
            port_last: self.ports.1,
        };
        let _ = self.meta.create_all(layout::SUPERVISORS);
        let _ = self.layout().create(&path, &info, NodeKind::Ephemeral);
    }

    /// Where the workers of instance `n` (of `incarnation`) of module `m`
    /// keep their data: `data/<m>/<n>-<incarnation>`. The incarnation is
    /// in the name so a later deploy of the same name (again instance 0)
    /// never opens a destroyed module's files.
    fn data_dir(&self, m: &str, n: u32, incarnation: &str) -> PathBuf {
        self.dir.join("data").join(m).join(format!("{n}-{incarnation}"))
    }

    fn artifact(&self, hash: &str) -> Result<PathBuf, String> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("assignment names a bad artifact id {hash:?}"));
        }
        let path = self.dir.join("artifacts").join(hash);
        if path.is_file() {
            // Checked at every start, not only after the download: what is
            // run is exactly what the Conductor validated.
            let got = sha256_file(&path)?;
            if got == hash {
                return Ok(path);
            }
            let _ = std::fs::remove_file(&path);
            return Err(format!(
                "the stored artifact {} does not match its sha256 (it hashes to {got}); removed it, it is \
                 downloaded again at the next try",
                path.display()
            ));
        }
        let addr = match self.layout().conductor().map_err(|e| e.to_string())? {
            Some(addr) => addr,
            None => crate::conductor::address(&self.config, Side::Internal)?,
        };
        let admin = Admin::connect(&addr, &self.secret)?;
        let part = path.with_extension("part");
        let mut f = File::create(&part).map_err(|e| format!("creating {}: {e}", part.display()))?;
        let mut offset = 0i64;
        loop {
            let r = admin.call_request(&admin::AdminRequest::Download {
                artifact: hash.to_string(),
                offset: offset as u64,
            })?;
            let data = bytes(&r, "data")?;
            f.write_all(data).map_err(|e| e.to_string())?;
            offset += data.len() as i64;
            if offset >= int(&r, "size")? || data.is_empty() {
                break;
            }
        }
        f.sync_all().map_err(|e| e.to_string())?;
        drop(f);
        let got = sha256_file(&part)?;
        if got != hash {
            let _ = std::fs::remove_file(&part);
            return Err(format!(
                "the artifact downloaded from the Conductor at {addr} does not match the assignment's sha256 \
                 {hash} (it hashes to {got}); it was removed and is not run"
            ));
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        std::fs::rename(&part, &path).map_err(|e| e.to_string())?;
        Ok(path)
    }

    fn free_port(&self) -> Result<u16, String> {
        (self.ports.0..=self.ports.1)
            .find(|p| TcpListener::bind((self.host.as_str(), *p)).is_ok())
            .ok_or_else(|| {
                format!(
                    "no free port in supervisor.port.range {}-{} on {}",
                    self.ports.0, self.ports.1, self.host
                )
            })
    }

    fn start(&mut self, a: &str, spec: &Assignment) -> Result<(), String> {
        let artifact = self.artifact(&spec.artifact)?;
        let port = self.free_port()?;
        let data = self.data_dir(&spec.module, spec.instance, &spec.incarnation);
        std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.file(&format!("worker-{a}")))
            .map_err(|e| e.to_string())?;
        let config = control::worker_config::WorkerConfig::from_json(&spec.config)?;
        let child = control::process::command(&artifact)
            .arg("worker")
            .args(["--module", &spec.module])
            .args(["--tasks", &spec.tasks.to_string()])
            .args(["--threads", &spec.threads.to_string()])
            .args(["--host", &self.host])
            .args(["--port", &port.to_string()])
            .arg("--register")
            .arg(self.config.path())
            .args(["--id", &spec.worker.to_string()])
            .args(["--workers", &spec.workers.to_string()])
            .args(["--instance", &spec.instance.to_string()])
            .args(if spec.replication_factor > 1 {
                vec!["--replicationFactor".to_string(), spec.replication_factor.to_string()]
            } else {
                Vec::new()
            })
            // Its fence: it serves only while this assignment names this
            // incarnation.
            .args(["--incarnation", &spec.incarnation])
            .args(["--assignment", &layout::assignment(&self.id, a)])
            .arg("--dir")
            .arg(&data)
            .arg("--log")
            .arg(self.logs.file(&format!("worker-{a}")))
            .args(["--logRotateBytes", &self.logs.rotate_bytes.to_string()])
            .args(["--logKeep", &self.logs.keep.to_string()])
            .args(&config.opts)
            .envs(&config.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", artifact.display()))?;
        std::fs::write(
            self.dir.join("workers").join(format!("{a}.pid")),
            child.id().to_string(),
        )
        .map_err(|e| e.to_string())?;
        tracing::info!("started worker {a} (pid {}) on port {port}", child.id());
        self.workers.insert(a.to_string(), Proc::Child(child));
        Ok(())
    }

    /// Schedules the next start of worker `a` after a failure and returns
    /// the wait; a `healthy` run (long enough) starts over at no wait.
    fn back_off(&mut self, a: &str, healthy: bool) -> Duration {
        let r = self.restarts.entry(a.to_string()).or_insert(Restart {
            tries: 0,
            not_before: std::time::Instant::now(),
        });
        if healthy {
            r.tries = 0;
        }
        let wait = if r.tries == 0 {
            Duration::ZERO
        } else {
            (Duration::from_secs(1) * 2u32.saturating_pow(r.tries - 1)).min(RESTART_BACKOFF_MAX)
        };
        r.tries = r.tries.saturating_add(1);
        r.not_before = std::time::Instant::now() + wait;
        wait
    }

    /// Removes the data of module instances (incarnations) no assignment
    /// here names any more. When an assignment cannot be read, nothing is
    /// removed this round.
    fn remove_unassigned_data(&mut self, assigned: &[String]) {
        let mut keep = std::collections::HashSet::new();
        for a in assigned {
            let incarnation = match self.incarnations.get(a) {
                Some(i) => i.clone(),
                None => match self.layout().assignment(&self.id, a) {
                    Ok(Some(spec)) => {
                        self.incarnations.insert(a.clone(), spec.incarnation.clone());
                        spec.incarnation
                    }
                    // Gone since the listing: it keeps nothing.
                    Ok(None) => continue,
                    Err(_) => return,
                },
            };
            if let Some((m, n, _)) = layout::parse_assignment_name(a) {
                keep.insert((m.to_string(), format!("{n}-{incarnation}")));
            }
        }
        self.incarnations.retain(|a, _| assigned.contains(a));
        let Ok(modules) = std::fs::read_dir(self.dir.join("data")) else {
            return;
        };
        for m in modules.flatten() {
            let module = m.file_name().to_string_lossy().into_owned();
            let Ok(instances) = std::fs::read_dir(m.path()) else {
                continue;
            };
            for i in instances.flatten() {
                let name = i.file_name().to_string_lossy().into_owned();
                if !keep.contains(&(module.clone(), name.clone())) {
                    match std::fs::remove_dir_all(i.path()) {
                        Ok(()) => {
                            tracing::info!(
                                "removed the data of module {module} instance {name} (no longer assigned here)"
                            )
                        }
                        Err(e) => tracing::warn!("cannot remove {}: {e}", i.path().display()),
                    }
                }
            }
            let _ = std::fs::remove_dir(m.path());
        }
    }

    fn adopt(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("workers")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(a) = name.strip_suffix(".pid") else { continue };
            let pid = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if let Some(pid) = pid.filter(|p| is_worker(*p, &layout::assignment(&self.id, a))) {
                tracing::info!("adopted worker {a} (pid {pid})");
                self.workers.insert(a.to_string(), Proc::Adopted(pid));
            }
        }
    }

    fn round(&mut self) -> Result<(), String> {
        self.register();
        let assigned = self.layout().assignment_names(&self.id).map_err(|e| e.to_string())?;
        for a in &assigned {
            let running = self.workers.get_mut(a).is_some_and(Proc::alive);
            if running {
                continue;
            }
            if let Some(mut p) = self.workers.remove(a) {
                let healthy = self
                    .started
                    .remove(a)
                    .is_some_and(|t| t.elapsed() >= RESTART_HEALTHY_RUN);
                let wait = self.back_off(a, healthy);
                tracing::warn!(
                    "worker {a} (pid {}) exited{}; starting it again in {:.0} s (see logs/worker-{a}.log)",
                    p.pid(),
                    p.exit_code().map_or(String::new(), |c| format!(" with code {c}")),
                    wait.as_secs_f64()
                );
            }
            if self
                .restarts
                .get(a)
                .is_some_and(|r| std::time::Instant::now() < r.not_before)
            {
                continue;
            }
            let spec = match self.layout().assignment(&self.id, a) {
                Ok(Some(spec)) => {
                    self.incarnations.insert(a.clone(), spec.incarnation.clone());
                    spec
                }
                Ok(None) => continue,
                Err(e) => {
                    let wait = self.back_off(a, false);
                    tracing::warn!(
                        "cannot read assignment {a}: {e}; trying again in {:.0} s",
                        wait.as_secs_f64()
                    );
                    continue;
                }
            };
            match self.start(a, &spec) {
                Ok(()) => {
                    self.started.insert(a.clone(), std::time::Instant::now());
                }
                Err(e) => {
                    let wait = self.back_off(a, false);
                    tracing::warn!(
                        "cannot start worker {a}: {e}; trying again in {:.0} s",
                        wait.as_secs_f64()
                    );
                }
            }
        }
        // A later assignment of the same name starts with no backoff.
        self.restarts.retain(|a, _| assigned.contains(a));
        self.started.retain(|a, _| assigned.contains(a));
        let gone: Vec<String> = self.workers.keys().filter(|a| !assigned.contains(a)).cloned().collect();
        for a in gone {
            let mut p = self.workers.remove(&a).expect("listed");
            p.stop();
            let _ = std::fs::remove_file(self.dir.join("workers").join(format!("{a}.pid")));
            tracing::info!("stopped worker {a}");
        }
        self.remove_unassigned_data(&assigned);
        Ok(())
    }
}

/// Runs the Supervisor until `stop` is set; its workers keep running.
pub fn run(config: &Config, stop: &AtomicBool) -> Result<(), String> {
    let local = config.local_dir().map_err(|e| e.to_string())?;
    let dir = local.join("supervisor");
    let logging = control::logging::Logging::beside(config).map_err(|e| e.to_string())?;
    let logs = logging.dir.clone();
    for d in [dir.join("artifacts"), dir.join("workers"), logs.clone()] {
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let id = supervisor_id(&dir)?;
    let host = config.supervisor_host().map_err(|e| e.to_string())?;
    let ports = config.port_range().map_err(|e| e.to_string())?;
    control::logging::install(&logging, &format!("supervisor-{id}"), &format!("supervisor {id}"))?;
    let meta = connect_metastore(config, Side::Internal).map_err(|e| e.to_string())?;
    if let Err(e) = check_cluster(&dir, &Layout::new(&meta), config, stop) {
        tracing::error!("{e}");
        return Err(e);
    }
    let secret = net::manager::load_secret(config).map_err(|e| e.to_string())?;
    let mut s = Supervisor {
        config: config.clone(),
        meta,
        id,
        dir,
        logs: logging,
        host,
        ports,
        workers: HashMap::new(),
        secret,
        restarts: HashMap::new(),
        started: HashMap::new(),
        incarnations: HashMap::new(),
    };
    s.adopt();
    s.register();
    let cluster = std::fs::read_to_string(s.dir.join(CLUSTER_FILE)).unwrap_or_default();
    tracing::info!(
        "on {} (ports {}-{}), cluster {}",
        s.host,
        s.ports.0,
        s.ports.1,
        cluster.trim()
    );
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = s.round() {
            tracing::warn!("{e}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    tracing::info!("stopped (its workers keep running)");
    Ok(())
}

/// The sha256 of the file at `path`, in hexadecimal: an artifact's name
/// in the Conductor's store and what Supervisors check before running it.
pub fn sha256_file(path: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
