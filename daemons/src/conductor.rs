//! `rama conductor`: the admin API, the artifact store and the module
//! lifecycle.
//!
//! Metadata: `control::layout` (module instances, their specs, states,
//! targets, registrations and failures; assignments).
//! A launch makes instance 0 of the module (a random incarnation, spec,
//! state, read and append targets) and its assignments; the instance and
//! the module become `running` when every worker of the instance
//! registered, and the launch is rolled back (assignments and metadata
//! removed) if that does not happen within the launch timeout.
//! Artifacts are stored under `<local.dir>/conductor/artifacts/<sha256>`;
//! the name is the content's hash, never a name from the client, and an
//! upload above `conductor.artifact.max.bytes` (default 1 GiB) is refused.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::config::{Config, Side};
use control::layout::{
    self, valid_module_name, Assignment, InstanceSpec, InstanceState, Layout, LayoutError, ModuleState,
};
use control::metastore::{MetaError, Metastore, NodeKind, ZkMetastore};
use engine::runtime::placement::{Parallelism, Placement};
use engine::value::{archived, Value};
use net::manager::connect_metastore;
use serde_json::Value as Json;

use net::admin::{self, int, text, AdminRequest, DeployArgs, CHUNK_BYTES};

const LAUNCH_TIMEOUT: Duration = Duration::from_secs(180);
/// Uploads in progress at once; a further one is refused until one ends.
const UPLOADS_MAX: usize = 4;
/// An upload that received no chunk for this long is dropped.
const UPLOAD_IDLE: Duration = Duration::from_secs(120);
/// A stored artifact no module uses is removed once it is this old (an
/// upload's deploy comes right after it).
const ARTIFACT_UNUSED_KEEP: Duration = Duration::from_secs(600);
/// How long an artifact's `describe` may run, and how much it may print.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
const DESCRIBE_BYTES_MAX: u64 = 4 << 20;

struct Upload {
    file: File,
    path: PathBuf,
    size: u64,
    written: u64,
    /// When the last chunk came.
    touched: Instant,
}

/// A deploy's shape, checked.
struct Shape {
    tasks: u32,
    threads: u32,
    workers: u32,
    rf: u32,
    overrides: control::worker_config::WorkerConfig,
    /// (Supervisor, ports free on it).
    slots: Vec<(String, u64)>,
}

struct Conductor {
    meta: ZkMetastore,
    artifacts: PathBuf,
    uploads_dir: PathBuf,
    uploads: Mutex<HashMap<i64, Upload>>,
    next_upload: AtomicU64,
    max_bytes: u64,
    /// Upper bounds of a module's parallelism (module.tasks.max,
    /// module.threads.max).
    tasks_max: u32,
    threads_max: u32,
    /// When each launching module started launching.
    launching: Mutex<HashMap<String, Instant>>,
    /// Artifacts of deploys under way (before their spec names them), with
    /// how many: never collected meanwhile.
    deploying: Mutex<HashMap<String, usize>>,
}

fn layout_err(e: LayoutError) -> String {
    e.to_string()
}

/// Whether `r` changes anything, and what it is, for the log.
fn summary(r: &AdminRequest) -> (bool, String) {
    let shape = |d: &DeployArgs| {
        let artifact = if d.artifact.is_empty() {
            String::new()
        } else {
            format!(", artifact {}", d.artifact)
        };
        format!(
            "module {} ({} tasks, {} threads, {} workers, replication {}{artifact})",
            d.module, d.tasks, d.threads, d.workers, d.replication_factor
        )
    };
    match r {
        AdminRequest::UploadStart { size } => (true, format!("upload of {size} bytes")),
        AdminRequest::UploadChunk { upload, offset, data } => {
            (false, format!("upload {upload}: {} bytes at {offset}", data.len()))
        }
        AdminRequest::UploadFinish { upload } => (true, format!("upload {upload} finished")),
        AdminRequest::Download { artifact, offset } => (false, format!("download of {artifact} at {offset}")),
        AdminRequest::DeployCheck(d) => (true, format!("deploy check of {}", shape(d))),
        AdminRequest::Deploy(d) => (true, format!("deploy of {}", shape(d))),
        AdminRequest::Status { module } => (false, format!("status of {module}")),
        AdminRequest::TaskGroups { module, instance } => (false, format!("task groups of {module} {instance:?}")),
        AdminRequest::Workers { module, append } => (false, format!("workers of {module} (append: {append})")),
        AdminRequest::Destroy { module } => (true, format!("destroy of {module}")),
    }
}

/// The min-ISR of an instance: `replication.min.isr` among its worker
/// options, else the replication factor less one (at least 1).
fn min_isr_of(spec: &InstanceSpec) -> u32 {
    let opts = control::worker_config::WorkerConfig::from_json(&spec.config).unwrap_or_default();
    let mut config = engine::cluster::ModuleConfig::default();
    config.replication.factor = spec.replication_factor.max(1);
    for pair in opts.opts.chunks(2) {
        if let [flag, value] = pair {
            let _ = config.set_option(flag, value);
        }
    }
    config.replication.min_isr()
}

fn offset(o: u64) -> Value {
    Value::Int(i64::try_from(o).unwrap_or(i64::MAX))
}

/// `taskGroupsStatus` of one replicated task group: its epoch, leader,
/// ISR and OSR from its node, and per replica where it runs (process,
/// address, Supervisor), whether it is up (its registration), its log
/// end, applied offset and lag behind the leader's log end.
fn replication_status(
    l: &Layout<'_>,
    spec: &InstanceSpec,
    thread: u32,
    address_of: &HashMap<u32, String>,
    down: &HashMap<u32, String>,
) -> Result<Value, String> {
    let (module, n) = (spec.module.as_str(), spec.instance);
    let Some((node, _)) = l.group(module, n, thread).map_err(layout_err)? else {
        return Ok(Value::map([
            ("taskGroup", Value::from(thread)),
            ("down", Value::from("it has no replication node")),
        ]));
    };
    let live = l.live_replicas(module, n, thread).map_err(layout_err)?;
    let leader_end = node
        .leader
        .and_then(|m| {
            live.iter()
                .find(|r| r.replica == m.replica && r.incarnation == m.incarnation)
        })
        .map(|r| r.log_end);
    let replicas = node
        .replicas
        .iter()
        .enumerate()
        .map(|(r, place)| {
            let r = r as u32;
            let reg = live.iter().find(|x| x.replica == r);
            let state = if node
                .leader
                .is_some_and(|m| m.replica == r && reg.is_some_and(|x| x.incarnation == m.incarnation))
            {
                "leader"
            } else if reg.is_none() {
                "down"
            } else if node.isr.contains(&r) {
                "in sync"
            } else {
                "out of sync"
            };
            Value::map([
                ("replica", Value::from(r)),
                ("process", Value::from(place.worker)),
                ("supervisor", Value::from(place.supervisor.as_str())),
                (
                    "address",
                    address_of.get(&place.worker).cloned().map_or(Value::Nil, Value::from),
                ),
                ("state", Value::from(state)),
                ("down", down.get(&place.worker).cloned().map_or(Value::Nil, Value::from)),
                ("logEnd", reg.map_or(Value::Nil, |x| offset(x.log_end))),
                ("applied", reg.map_or(Value::Nil, |x| offset(x.applied))),
                (
                    "lag",
                    match (leader_end, reg) {
                        (Some(end), Some(x)) => offset(end.saturating_sub(x.log_end)),
                        _ => Value::Nil,
                    },
                ),
            ])
        })
        .collect();
    Ok(Value::map([
        ("taskGroup", Value::from(thread)),
        ("epoch", Value::from(node.epoch)),
        ("leader", node.leader.map_or(Value::Nil, |m| Value::from(m.replica))),
        ("isr", Value::List(node.isr.iter().map(|&r| Value::from(r)).collect())),
        ("osr", Value::List(node.osr.iter().map(|&r| Value::from(r)).collect())),
        ("minIsr", Value::from(min_isr_of(spec))),
        ("replicas", Value::List(replicas)),
    ]))
}

/// The Supervisor of each of the `workers * rf` processes of a replicated
/// instance (process `r * workers + w` is replica `r` of worker `w`):
/// every worker's replicas on different Supervisors, each process on the
/// Supervisor with the most free ports left among those its worker does
/// not use yet. `None` when the free ports cannot.
fn plan(slots: &[(String, u64)], workers: u32, rf: u32) -> Option<Vec<String>> {
    let mut free: Vec<(String, u64)> = slots.to_vec();
    let mut places = vec![String::new(); (workers * rf) as usize];
    for w in 0..workers {
        let mut used: Vec<usize> = Vec::new();
        for r in 0..rf {
            let (i, _) = free
                .iter()
                .enumerate()
                .filter(|(i, (_, n))| *n > 0 && !used.contains(i))
                .max_by_key(|(i, (_, n))| (*n, std::cmp::Reverse(*i)))?;
            free[i].1 -= 1;
            used.push(i);
            places[(r * workers + w) as usize] = free[i].0.clone();
        }
    }
    Some(places)
}

/// Workers of `module` already assigned to Supervisor `s`.
fn load_of(l: &Layout, s: &str, module: &str) -> u64 {
    l.assignment_names(s).map_or(0, |c| {
        c.iter()
            .filter(|a| layout::parse_assignment_name(a).is_some_and(|(m, _, _)| m == module))
            .count()
    }) as u64
}

impl Conductor {
    fn layout(&self) -> Layout<'_> {
        Layout::new(&self.meta)
    }

    fn state(&self, module: &str) -> Result<Option<ModuleState>, String> {
        self.layout().module_state(module).map_err(layout_err)
    }

    fn handle(&self, request: &[u8]) -> Vec<u8> {
        let answer = match AdminRequest::decode(request) {
            Ok(r) => {
                // Every operation is logged: those that change something
                // at info, reads at debug; a refusal says why.
                let (changes, what) = summary(&r);
                let result = self.dispatch(r);
                match (&result, changes) {
                    (Ok(_), true) => tracing::info!("{what}: done"),
                    (Err(e), true) => tracing::warn!("{what}: refused: {e}"),
                    (Ok(_), false) => tracing::debug!("{what}"),
                    (Err(e), false) => tracing::debug!("{what}: {e}"),
                }
                result
            }
            Err(e) => {
                tracing::warn!("a request that does not decode: {e}");
                Err(e)
            }
        }
        .unwrap_or_else(|e| Value::map([("error", Value::from(e))]));
        archived::to_bytes(&answer)
    }

    fn dispatch(&self, request: AdminRequest) -> Result<Value, String> {
        match request {
            AdminRequest::UploadStart { size } => {
                if size > self.max_bytes {
                    return Err(format!(
                        "the artifact is {size} bytes, above conductor.artifact.max.bytes = {}",
                        self.max_bytes
                    ));
                }
                self.expire_uploads();
                let mut uploads = self.uploads.lock().expect("uploads");
                if uploads.len() >= UPLOADS_MAX {
                    return Err(format!(
                        "{UPLOADS_MAX} uploads are in progress already; try again when one ends (an upload that \
                         sends nothing for {} s is dropped)",
                        UPLOAD_IDLE.as_secs()
                    ));
                }
                let id = self.next_upload.fetch_add(1, Ordering::SeqCst) as i64;
                let path = self.uploads_dir.join(format!("upload-{id}.part"));
                let file = File::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
                uploads.insert(
                    id,
                    Upload {
                        file,
                        path,
                        size,
                        written: 0,
                        touched: Instant::now(),
                    },
                );
                Ok(Value::map([("upload", Value::Int(id))]))
            }
            AdminRequest::UploadChunk {
                upload: id,
                offset,
                data,
            } => {
                let mut uploads = self.uploads.lock().expect("uploads");
                let u = uploads.get_mut(&id).ok_or_else(|| format!("no upload {id}"))?;
                if offset != u.written || u.written + data.len() as u64 > u.size {
                    return Err(format!(
                        "chunk at {offset} of {} bytes does not continue upload {id} ({} of {} bytes written)",
                        data.len(),
                        u.written,
                        u.size
                    ));
                }
                u.file
                    .write_all(&data)
                    .map_err(|e| format!("writing the upload: {e}"))?;
                u.written += data.len() as u64;
                u.touched = Instant::now();
                Ok(Value::map::<&str, Value>([]))
            }
            AdminRequest::UploadFinish { upload: id } => {
                let u = self
                    .uploads
                    .lock()
                    .expect("uploads")
                    .remove(&id)
                    .ok_or_else(|| format!("no upload {id}"))?;
                if u.written != u.size {
                    let _ = std::fs::remove_file(&u.path);
                    return Err(format!("upload {id} has {} of {} bytes", u.written, u.size));
                }
                u.file.sync_all().map_err(|e| e.to_string())?;
                let hash = crate::supervisor::sha256_file(&u.path)?;
                let dest = self.artifacts.join(&hash);
                std::fs::rename(&u.path, &dest).map_err(|e| format!("storing the artifact: {e}"))?;
                set_executable(&dest)?;
                Ok(Value::map([("artifact", Value::from(hash))]))
            }
            AdminRequest::Download { artifact, offset } => {
                let path = self.artifact_path(&artifact)?;
                let mut f = File::open(&path).map_err(|e| format!("artifact: {e}"))?;
                let size = f.metadata().map_err(|e| e.to_string())?.len();
                f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
                let mut data = vec![0u8; CHUNK_BYTES.min(size.saturating_sub(offset) as usize)];
                f.read_exact(&mut data).map_err(|e| e.to_string())?;
                Ok(Value::map([
                    ("data", Value::Bytes(data)),
                    ("size", Value::Int(size as i64)),
                ]))
            }
            AdminRequest::DeployCheck(d) => {
                self.check_shape(&d)?;
                Ok(Value::map::<&str, Value>([]))
            }
            AdminRequest::Deploy(d) => {
                *self
                    .deploying
                    .lock()
                    .expect("deploying")
                    .entry(d.artifact.clone())
                    .or_insert(0) += 1;
                let deployed = self.deploy(&d);
                {
                    let mut pins = self.deploying.lock().expect("deploying");
                    if let Some(n) = pins.get_mut(&d.artifact) {
                        *n -= 1;
                        if *n == 0 {
                            pins.remove(&d.artifact);
                        }
                    }
                }
                if deployed.is_err() {
                    // A refused deploy leaves no artifact behind unless
                    // another module runs it (or another deploy is about to).
                    self.remove_artifact_if_unused(&d.artifact);
                }
                deployed
            }
            AdminRequest::Status { module } => self.status(&module),
            AdminRequest::TaskGroups { module, instance } => self.task_groups(&module, instance),
            AdminRequest::Workers { module, append } => {
                let module = module.as_str();
                if !valid_module_name(module) {
                    return Err(format!("{module:?} is not a module name"));
                }
                let target = if append {
                    net::manager::Target::Append
                } else {
                    net::manager::Target::Read
                };
                let workers =
                    net::manager::registered_workers(&self.meta, module, target).map_err(|e| e.to_string())?;
                Ok(Value::map([(
                    "workers",
                    Value::List(workers.iter().map(net::manager::worker_to_value).collect()),
                )]))
            }
            AdminRequest::Destroy { module } => {
                let module = module.as_str();
                if self.state(module)?.is_none() {
                    return Err(format!("no module named {module} is deployed"));
                }
                self.retire(module)?;
                tracing::info!("destroying module {module}");
                Ok(Value::map([("state", Value::from("destroying"))]))
            }
        }
    }

    /// The stored artifact named `hash` (64 hex digits, nothing else).
    fn artifact_path(&self, hash: &str) -> Result<PathBuf, String> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash:?} is not an artifact id"));
        }
        let p = self.artifacts.join(hash);
        if !p.is_file() {
            return Err(format!("no artifact {hash}"));
        }
        Ok(p)
    }

    /// Everything about a deploy that can be checked without its
    /// artifact: the CLI asks for this (`deployCheck`) before it uploads,
    /// and `deploy` checks it again.
    fn check_shape(&self, d: &DeployArgs) -> Result<Shape, String> {
        let module = d.module.as_str();
        let (tasks, threads, workers, rf) = (d.tasks, d.threads, d.workers, d.replication_factor);
        if !valid_module_name(module) {
            return Err(format!("{module:?} is not a module name"));
        }
        // Bounds first: a worker's fixed memory grows with its tasks (see
        // module.tasks.max in rama.yaml).
        if tasks > self.tasks_max {
            return Err(format!(
                "--tasks {tasks} is above module.tasks.max = {}; raise it in the Conductor's rama.yaml if the \
                 workers have the memory",
                self.tasks_max
            ));
        }
        if threads > self.threads_max {
            return Err(format!(
                "--threads {threads} is above module.threads.max = {}; raise it in the Conductor's rama.yaml",
                self.threads_max
            ));
        }
        Parallelism::new(tasks, threads, workers).map_err(|e| e.to_string())?;
        let overrides = match d.config_overrides.as_deref() {
            Some(text) => {
                let j: Json = serde_json::from_str(text).map_err(|e| format!("configOverrides: {e}"))?;
                control::worker_config::WorkerConfig::from_json(&j)?
            }
            None => control::worker_config::WorkerConfig::default(),
        };
        // The engine's limits among the worker options, checked by the
        // engine's own rules now rather than at the worker's start.
        let mut engine_config = engine::cluster::ModuleConfig::default();
        for pair in overrides.opts.chunks(2) {
            if let [flag, value] = pair {
                if engine::cluster::config::OPTIONS.iter().any(|(o, _)| o == flag) {
                    engine_config
                        .set_option(flag, value)
                        .map_err(|e| format!("worker.child.opts: {e}"))?;
                }
            }
        }
        engine_config
            .validate()
            .map_err(|e| format!("worker.child.opts: {e}"))?;
        if !(1..=9).contains(&rf) {
            return Err(format!("--replicationFactor {rf}: a task group has 1 to 9 replicas"));
        }
        if self.state(module)?.is_some() {
            return Err(format!("module {module} is already deployed"));
        }
        let l = self.layout();
        let supervisors = l.supervisors().map_err(layout_err)?;
        if supervisors.is_empty() {
            return Err("not enough Supervisors: none is running; start one with `rama supervisor`".into());
        }
        // Each worker takes a port from its Supervisor's range: see that
        // the free ports are enough before claiming anything.
        let mut slots = Vec::new();
        for s in &supervisors {
            let Ok(Some(info)) = l.supervisor(s) else {
                continue;
            };
            let range = u64::from(info.port_last.saturating_sub(info.port_first)) + 1;
            let used = l.assignment_names(s).map_or(0, |c| c.len()) as u64;
            slots.push((s.clone(), range.saturating_sub(used)));
        }
        let free: u64 = slots.iter().map(|(_, n)| n).sum();
        let processes = u64::from(workers) * u64::from(rf);
        if free < processes {
            return Err(format!(
                "not enough Supervisor ports: {workers} workers with replication factor {rf} need {processes} \
                 ports, {free} are free on {} Supervisors (supervisor.port.range); start more Supervisors or \
                 widen their ranges",
                slots.len()
            ));
        }
        // Two replicas of a task group never share a node: each worker's
        // RF processes go to RF different Supervisors.
        let able = slots.iter().filter(|(_, n)| *n > 0).count() as u32;
        if rf > able {
            return Err(format!(
                "--replicationFactor {rf} needs {rf} Supervisors with free ports (the replicas of a task group \
                 run on different nodes); {able} can take workers now"
            ));
        }
        if rf > 1 && plan(&slots, workers, rf).is_none() {
            return Err(format!(
                "the Supervisors' free ports cannot place {workers} workers with {rf} replicas each on \
                 different Supervisors; start more Supervisors or widen their port ranges"
            ));
        }
        Ok(Shape {
            tasks,
            threads,
            workers,
            rf,
            overrides,
            slots,
        })
    }

    fn deploy(&self, d: &DeployArgs) -> Result<Value, String> {
        let (module, artifact) = (d.module.as_str(), d.artifact.as_str());
        let Shape {
            tasks,
            threads,
            workers,
            rf,
            overrides,
            slots,
        } = self.check_shape(d)?;
        let path = self.artifact_path(artifact)?;
        // The artifact must be a module artifact, contain the module, and
        // be built with this engine.
        let stdout = describe(&path)?;
        let described: Json = serde_json::from_slice(&stdout).map_err(|_| {
            "the jar is not a module artifact (its describe command printed no module list)".to_string()
        })?;
        let modules = described.as_array().cloned().unwrap_or_default();
        let found = modules.iter().find(|d| d["name"] == module).ok_or_else(|| {
            format!(
                "the artifact has no module {module} (it has: {})",
                modules
                    .iter()
                    .filter_map(|d| d["name"].as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let version = found["engine_version"].as_str().unwrap_or("?");
        if version != engine::VERSION {
            return Err(format!(
                "the artifact was built with engine {version}; this cluster runs engine {}",
                engine::VERSION
            ));
        }
        // The module's first instance. Its incarnation fences: its workers
        // serve only while their assignments name it, and clients take
        // only its workers.
        let incarnation: String = net::auth::nonce().iter().map(|b| format!("{b:02x}")).collect();
        let spec = InstanceSpec {
            module: module.to_string(),
            instance: 0,
            incarnation,
            artifact: artifact.to_string(),
            tasks,
            threads,
            workers,
            replication_factor: rf,
            config: overrides.to_json(),
        };
        let l = self.layout();
        // Claims the module name; a second deploy of it fails here.
        match l.launch(&spec) {
            Ok(()) => {}
            Err(LayoutError::Meta(MetaError::NodeExists(_))) => {
                return Err(format!("module {module} is already deployed"))
            }
            Err(e) => return Err(layout_err(e)),
        }
        let launched = (|| -> Result<(), String> {
            if rf > 1 {
                return self.place_replicated(&spec, &slots);
            }
            // The dev scheduler: each worker to the Supervisor with the
            // fewest assignments.
            for w in 0..workers {
                let mut load = Vec::new();
                for (s, free) in &slots {
                    let n = l.assignment_names(s).map_or(0, |c| c.len());
                    let taken = load_of(&l, s, module);
                    if taken < *free {
                        load.push((n, s.clone()));
                    }
                }
                load.sort();
                let target = &load.first().ok_or("not enough Supervisor ports")?.1;
                l.assign(target, &Assignment::of(&spec, w)).map_err(layout_err)?;
            }
            Ok(())
        })();
        if let Err(e) = launched {
            let _ = l.unassign(module, None);
            let _ = l.forget_module(module);
            return Err(e);
        }
        tracing::info!(
            "launching module {module} instance 0 ({tasks} tasks, {threads} threads, {workers} workers, \
             artifact {artifact})"
        );
        self.launching
            .lock()
            .expect("launching")
            .insert(module.to_string(), Instant::now());
        Ok(Value::map([("state", Value::from("launching"))]))
    }

    /// Places the `workers * rf` processes of a replicated instance (each
    /// worker's replicas on different Supervisors), makes each task
    /// group's node (where its replicas run; no leader yet: the election
    /// pass names one once they register), then assigns the processes.
    fn place_replicated(&self, spec: &InstanceSpec, slots: &[(String, u64)]) -> Result<(), String> {
        let (workers, rf) = (spec.workers, spec.replication_factor);
        let places = plan(slots, workers, rf).ok_or("not enough Supervisors to place the replicas apart")?;
        let l = self.layout();
        let placement = Placement::new(Parallelism::new(spec.tasks, spec.threads, workers).map_err(|e| e.to_string())?);
        for thread in 0..spec.threads {
            let w = placement.worker_of_thread[thread as usize];
            let replicas = (0..rf)
                .map(|r| {
                    let process = r * workers + w;
                    layout::ReplicaPlace {
                        supervisor: places[process as usize].clone(),
                        worker: process,
                    }
                })
                .collect();
            l.create_group(&spec.module, spec.instance, thread, &layout::GroupNode::new(replicas))
                .map_err(layout_err)?;
        }
        for (process, supervisor) in places.iter().enumerate() {
            l.assign(supervisor, &Assignment::of(spec, process as u32))
                .map_err(layout_err)?;
        }
        Ok(())
    }

    /// One election pass over the task groups of every replicated module
    /// instance: a group whose leader's registration is gone gets a new
    /// leader (or none, fenced, until an in-sync replica returns).
    fn elect(&self) -> Result<(), String> {
        let l = self.layout();
        for module in l.modules().map_err(layout_err)? {
            for n in l.instances(&module).map_err(layout_err)? {
                for group in l.groups(&module, n).map_err(layout_err)? {
                    let id = crate::replication::GroupId {
                        module: module.clone(),
                        instance: n,
                        group,
                    };
                    if let Some(next) = crate::replication::elect_group(&l, &id).map_err(layout_err)? {
                        match next.leader {
                            Some(m) => tracing::info!(
                                "module {module} instance {n} task group {group}: replica {} leads epoch {} \
                                 (in sync: {:?}, out of sync: {:?})",
                                m.id,
                                next.epoch,
                                next.isr,
                                next.osr
                            ),
                            None => tracing::warn!(
                                "module {module} instance {n} task group {group}: no in-sync replica is up; \
                                 no leader in epoch {} until one returns (in sync: {:?})",
                                next.epoch,
                                next.isr
                            ),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `moduleStatus`: the module's state, its instances (state, whether
    /// each is the read or the append target, workers registered of how
    /// many), and the workers that are down and why.
    fn status(&self, module: &str) -> Result<Value, String> {
        let l = self.layout();
        let Some(state) = self.state(module)? else {
            return Ok(Value::map([("state", Value::Nil)]));
        };
        let targets = l.targets(module).map_err(layout_err)?;
        let mut instances = Vec::new();
        let mut down = Vec::new();
        for n in l.instances(module).map_err(layout_err)? {
            let Some(spec) = l.instance_spec(module, n).map_err(layout_err)? else {
                continue;
            };
            let st = l.instance_state(module, n).map_err(layout_err)?;
            let registered = l
                .registrations(module, n, Some(&spec.incarnation))
                .map_err(layout_err)?
                .len();
            // Replicated task groups that take no appends now.
            let mut stalled = Vec::new();
            if spec.replication_factor > 1 {
                let min_isr = min_isr_of(&spec);
                for tg in l.groups(module, n).map_err(layout_err)? {
                    let Some((node, _)) = l.group(module, n, tg).map_err(layout_err)? else {
                        continue;
                    };
                    if node.leader.is_none() {
                        stalled.push(Value::from(format!(
                            "task group {tg} has no leader (epoch {}; in sync: {:?}): it waits for an in-sync \
                             replica to return",
                            node.epoch, node.isr
                        )));
                    } else if (node.isr.len() as u32) < min_isr {
                        stalled.push(Value::from(format!(
                            "task group {tg} is stalled below min-ISR: in sync {:?}, {} of the {min_isr} needed; \
                             appends fail until a replica catches up",
                            node.isr,
                            node.isr.len()
                        )));
                    }
                }
            }
            instances.push(Value::map([
                ("replicationFactor", Value::from(spec.replication_factor)),
                ("stalled", Value::List(stalled)),
                ("instance", Value::from(n)),
                ("state", st.map_or(Value::Nil, |s| Value::from(s.name()))),
                ("read", Value::Bool(targets.is_some_and(|t| t.read == n))),
                ("append", Value::Bool(targets.is_some_and(|t| t.append == n))),
                ("registered", Value::from(registered as u32)),
                // Worker processes: with replication, one per replica of
                // each worker.
                ("workers", Value::from(spec.workers * spec.replication_factor.max(1))),
                ("tasks", Value::from(spec.tasks)),
                ("threads", Value::from(spec.threads)),
            ]));
            for (w, why) in net::manager::failures(&self.meta, module, n).map_err(|e| e.to_string())? {
                down.push(Value::map([
                    ("instance", Value::from(n)),
                    ("worker", Value::from(w)),
                    ("error", Value::from(why)),
                ]));
            }
        }
        Ok(Value::map([
            ("state", Value::from(state.name())),
            ("instances", Value::List(instances)),
            ("down", Value::List(down)),
        ]))
    }

    /// Marks the module destroying and its instances retiring, and takes
    /// their assignments away (the Supervisors stop the workers).
    fn retire(&self, module: &str) -> Result<(), String> {
        let l = self.layout();
        l.set_module_state(module, ModuleState::Destroying)
            .map_err(layout_err)?;
        for n in l.instances(module).map_err(layout_err)? {
            l.set_instance_state(module, n, InstanceState::Retiring)
                .map_err(layout_err)?;
        }
        l.unassign(module, None).map_err(layout_err)
    }

    /// Every task group (the tasks of one task thread) of `module`, with
    /// its worker, the worker's address and its Supervisor.
    fn task_groups(&self, module: &str, instance: Option<u32>) -> Result<Value, String> {
        let l = self.layout();
        let targets = l
            .targets(module)
            .map_err(layout_err)?
            .ok_or_else(|| format!("no module named {module} is deployed"))?;
        let n = instance.unwrap_or(targets.read);
        let spec = l.instance_spec(module, n).map_err(layout_err)?.ok_or_else(|| {
            format!(
                "module {module} has no instance {n} (instances: {})",
                l.instances(module)
                    .unwrap_or_default()
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let placement = engine::runtime::placement::Placement::new(
            Parallelism::new(spec.tasks, spec.threads, spec.workers).map_err(|e| e.to_string())?,
        );
        // Which Supervisor holds each worker's assignment.
        let mut supervisor_of = HashMap::new();
        for (s, a) in l.assignments_of(module, Some(n)).map_err(layout_err)? {
            if let Some((_, _, w)) = layout::parse_assignment_name(&a) {
                supervisor_of.insert(w, s);
            }
        }
        let down: HashMap<u32, String> = net::manager::failures(&self.meta, module, n)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        let address_of: HashMap<u32, String> = l
            .registrations(module, n, Some(&spec.incarnation))
            .map_err(layout_err)?
            .into_iter()
            .map(|r| (r.worker, r.address))
            .collect();
        let mut groups = Vec::new();
        for thread in 0..placement.parallelism.threads {
            let worker = placement.worker_of_thread[thread as usize];
            let address = address_of.get(&worker).cloned();
            if spec.replication_factor > 1 {
                let mut g = replication_status(&l, &spec, thread, &address_of, &down)?;
                if let Value::Map(m) = &mut g {
                    m.insert(
                        Value::from("tasks"),
                        Value::List(placement.tasks_of_thread(thread).into_iter().map(Value::from).collect()),
                    );
                    m.insert(Value::from("worker"), Value::from(worker));
                }
                groups.push(g);
                continue;
            }
            groups.push(Value::map([
                ("down", down.get(&worker).cloned().map_or(Value::Nil, Value::from)),
                ("taskGroup", Value::from(thread)),
                (
                    "tasks",
                    Value::List(placement.tasks_of_thread(thread).into_iter().map(Value::from).collect()),
                ),
                ("worker", Value::from(worker)),
                ("address", address.map_or(Value::Nil, Value::from)),
                (
                    "supervisor",
                    supervisor_of.get(&worker).cloned().map_or(Value::Nil, Value::from),
                ),
            ]));
        }
        Ok(Value::map([
            ("instance", Value::from(n)),
            ("groups", Value::List(groups)),
        ]))
    }

    /// Drops uploads that received nothing for [`UPLOAD_IDLE`].
    fn expire_uploads(&self) {
        self.uploads.lock().expect("uploads").retain(|_, u| {
            let keep = u.touched.elapsed() < UPLOAD_IDLE;
            if !keep {
                let _ = std::fs::remove_file(&u.path);
            }
            keep
        });
    }

    /// The artifacts the modules' specs name.
    fn artifacts_in_use(&self) -> Result<std::collections::BTreeSet<String>, String> {
        let l = self.layout();
        let mut used: std::collections::BTreeSet<String> =
            self.deploying.lock().expect("deploying").keys().cloned().collect();
        for module in l.modules().map_err(layout_err)? {
            for n in l.instances(&module).map_err(layout_err)? {
                if let Some(spec) = l.instance_spec(&module, n).map_err(layout_err)? {
                    used.insert(spec.artifact);
                }
            }
        }
        Ok(used)
    }

    fn remove_artifact_if_unused(&self, hash: &str) {
        let Ok(path) = self.artifact_path(hash) else { return };
        if self.artifacts_in_use().is_ok_and(|used| !used.contains(hash)) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Removes stored artifacts no module uses, once they are older than
    /// [`ARTIFACT_UNUSED_KEEP`] (those of destroyed modules, and uploads
    /// never deployed).
    fn collect_artifacts(&self) -> Result<(), String> {
        let used = self.artifacts_in_use()?;
        let entries = std::fs::read_dir(&self.artifacts).map_err(|e| e.to_string())?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > ARTIFACT_UNUSED_KEEP);
            if old && !used.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Moves modules along: an instance becomes `running` once every
    /// worker of its incarnation registered, and the module with its read
    /// target (a launch that does not get there within the timeout is
    /// rolled back); a destroyed module's metadata goes once no worker of
    /// any of its instances is registered.
    fn progress(&self) -> Result<(), String> {
        let l = self.layout();
        for module in l.modules().map_err(layout_err)? {
            let Some(st) = self.state(&module)? else {
                continue;
            };
            let mut registered_total = 0;
            let mut target_running = false;
            let targets = l.targets(&module).map_err(layout_err)?;
            for n in l.instances(&module).map_err(layout_err)? {
                let Some(spec) = l.instance_spec(&module, n).map_err(layout_err)? else {
                    continue;
                };
                // Every registration counts for destroy (a stale worker
                // still holds files); only the incarnation's for running.
                let all = l.registrations(&module, n, None).map_err(layout_err)?;
                registered_total += all.len();
                let registered = all
                    .iter()
                    .filter(|r| r.incarnation.as_deref() == Some(spec.incarnation.as_str()))
                    .count();
                let ist = l.instance_state(&module, n).map_err(layout_err)?;
                let processes = (spec.workers * spec.replication_factor.max(1)) as usize;
                if ist == Some(InstanceState::Launching) && registered >= processes {
                    l.set_instance_state(&module, n, InstanceState::Running)
                        .map_err(layout_err)?;
                    tracing::info!("module {module} instance {n} is running (every worker registered)");
                }
                let running = ist == Some(InstanceState::Running) || registered >= processes;
                if targets.is_some_and(|t| t.read == n) && running {
                    target_running = true;
                }
            }
            match st {
                ModuleState::Launching if target_running => {
                    l.set_module_state(&module, ModuleState::Running).map_err(layout_err)?;
                    tracing::info!("module {module} is running");
                    self.launching.lock().expect("launching").remove(&module);
                }
                ModuleState::Launching => {
                    let started = *self
                        .launching
                        .lock()
                        .expect("launching")
                        .entry(module.clone())
                        .or_insert_with(Instant::now);
                    if started.elapsed() > LAUNCH_TIMEOUT {
                        tracing::warn!("{module} did not start within {LAUNCH_TIMEOUT:?}; rolling back");
                        self.retire(&module)?;
                    }
                }
                ModuleState::Destroying if registered_total == 0 => {
                    let artifacts: Vec<String> = l
                        .instances(&module)
                        .map_err(layout_err)?
                        .into_iter()
                        .filter_map(|n| l.instance_spec(&module, n).ok().flatten())
                        .map(|s| s.artifact)
                        .collect();
                    l.forget_module(&module).map_err(layout_err)?;
                    tracing::info!("module {module} is destroyed (no worker of it remains)");
                    self.launching.lock().expect("launching").remove(&module);
                    for a in artifacts {
                        self.remove_artifact_if_unused(&a);
                    }
                }
                _ => {}
            }
        }
        self.expire_uploads();
        self.collect_artifacts()
    }
}

/// Runs the artifact's `describe` and returns what it printed, within
/// [`DESCRIBE_TIMEOUT`] and [`DESCRIBE_BYTES_MAX`] (an artifact that hangs
/// or floods is killed and refused).
fn describe(path: &Path) -> Result<Vec<u8>, String> {
    let mut child = control::process::command(path)
        .arg("describe")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("the jar is not a runnable module artifact: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.take(DESCRIBE_BYTES_MAX + 1).read_to_end(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() < DESCRIBE_TIMEOUT => std::thread::sleep(Duration::from_millis(20)),
            _ => break None,
        }
    };
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        return Err(format!(
            "the jar's describe command did not finish within {} s; it is not a module artifact",
            DESCRIBE_TIMEOUT.as_secs()
        ));
    }
    let out = reader.join().unwrap_or_default();
    if out.len() as u64 > DESCRIBE_BYTES_MAX {
        return Err("the jar's describe command printed more than 4 MiB; it is not a module artifact".into());
    }
    Ok(out)
}

fn set_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

/// Runs the Conductor until `stop` is set.
pub fn run(config: &Config, stop: &AtomicBool) -> Result<(), String> {
    let local = config.local_dir().map_err(|e| e.to_string())?.join("conductor");
    let artifacts = local.join("artifacts");
    let uploads_dir = local.join("uploads");
    for d in [&artifacts, &uploads_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    // Partial uploads of an earlier run are useless.
    if let Ok(entries) = std::fs::read_dir(&uploads_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let max_bytes = config
        .count("conductor.artifact.max.bytes")
        .map_err(|e| e.to_string())?;
    let secret = net::manager::load_secret(config).map_err(|e| e.to_string())?;
    let logging = control::logging::Logging::beside(config).map_err(|e| e.to_string())?;
    control::logging::install(&logging, "conductor", "conductor")?;
    let meta = connect_metastore(config, Side::Internal).map_err(|e| e.to_string())?;
    // The cluster's identity: made by the first Conductor on this
    // metastore, so Supervisors can tell a fresh or wiped one from theirs.
    let fresh: String = net::auth::nonce().iter().map(|b| format!("{b:02x}")).collect();
    let identity = Layout::new(&meta)
        .cluster_identity_or_create(&fresh)
        .map_err(|e| format!("reading or making the cluster identity ({}): {e}", layout::CLUSTER))?;
    let host = match config.get("conductor.host") {
        Some(_) => config
            .hosts("conductor.host", Side::Internal)
            .map_err(|e| e.to_string())?
            .remove(0),
        None => "127.0.0.1".into(),
    };
    let port = config.port("conductor.port").map_err(|e| e.to_string())?;
    let conductor = Arc::new(Conductor {
        meta,
        artifacts,
        uploads_dir,
        uploads: Mutex::new(HashMap::new()),
        next_upload: AtomicU64::new(1),
        max_bytes,
        tasks_max: config.count("module.tasks.max").map_err(|e| e.to_string())? as u32,
        threads_max: config.count("module.threads.max").map_err(|e| e.to_string())? as u32,
        launching: Mutex::new(HashMap::new()),
        deploying: Mutex::new(HashMap::new()),
    });
    let server = {
        let c = conductor.clone();
        let limits = net::ServerLimits {
            connections_max: config.count("conductor.connections.max").map_err(|e| e.to_string())? as usize,
            idle_timeout: config.idle_timeout().map_err(|e| e.to_string())?,
            ..Default::default()
        };
        net::Server::bind(
            (host.as_str(), port),
            net::PROTOCOL_VERSION,
            &secret,
            limits,
            Arc::new(move |req: Vec<u8>| Ok(c.handle(&req))),
        )
        .map_err(|e| format!("the admin API cannot listen on {host}:{port} (conductor.port): {e}"))?
    };
    let address = server.local_addr().to_string();
    tracing::info!("admin API on {address} (cluster {})", identity.id);
    while !stop.load(Ordering::SeqCst) {
        // Liveness: the /conductor node, made again after a session loss.
        if conductor.meta.get(layout::CONDUCTOR).ok().flatten().is_none() {
            let _ = conductor
                .meta
                .create(layout::CONDUCTOR, address.as_bytes(), NodeKind::Ephemeral);
        }
        if let Err(e) = conductor.progress() {
            tracing::warn!("{e}");
        }
        // Elections more often than the rest: a task group without a
        // leader takes no appends.
        for _ in 0..3 {
            if let Err(e) = conductor.elect() {
                tracing::warn!("election pass: {e}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(server);
    tracing::info!("stopped");
    Ok(())
}

/// The Conductor's admin address, from the metastore (where it
/// registered) or from `rama.yaml`.
pub fn address(config: &Config, side: Side) -> Result<String, String> {
    let host = config
        .hosts("conductor.host", side)
        .map_err(|e| e.to_string())?
        .remove(0);
    let port = config.port("conductor.port").map_err(|e| e.to_string())?;
    Ok(format!("{host}:{port}"))
}

/// Uploads the artifact at `jar`; returns its id.
pub fn upload(admin: &admin::Admin, jar: &Path) -> Result<String, String> {
    let mut f = OpenOptions::new()
        .read(true)
        .open(jar)
        .map_err(|e| format!("--jar {}: {e}", jar.display()))?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err(format!("--jar {} is not a file", jar.display()));
    }
    let up = admin.call_request(&admin::AdminRequest::UploadStart { size })?;
    let id = int(&up, "upload")?;
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        admin.call_request(&admin::AdminRequest::UploadChunk {
            upload: id,
            offset,
            data: buf[..n].to_vec(),
        })?;
        offset += n as u64;
    }
    let done = admin.call_request(&admin::AdminRequest::UploadFinish { upload: id })?;
    Ok(text(&done, "artifact")?.to_string())
}

#[cfg(test)]
mod tests {
    /// The worker options control accepts for the engine are exactly the
    /// engine's (control cannot depend on the engine, so this ties them).
    #[test]
    fn worker_options_agree_with_the_engine() {
        let engine: Vec<&str> = engine::cluster::config::OPTIONS.iter().map(|(f, _)| *f).collect();
        let control: Vec<&str> = control::worker_config::WORKER_OPTIONS
            .iter()
            .map(|(f, _)| *f)
            .filter(|f| !matches!(*f, "--pin" | "--spinBeforeParkMicros"))
            .collect();
        assert_eq!(engine, control);
    }
}
