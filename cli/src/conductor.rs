//! `rama conductor`: the admin API, the artifact store and the module
//! lifecycle.
//!
//! Metadata (under `zookeeper.root`):
//! ```text
//! /conductor                      ephemeral: admin address
//! /supervisors/<id>               ephemeral, by Supervisors: {host, portFirst, portLast}
//! /modules/<m>/spec               {module, artifact, tasks, threads, workers, replicationFactor}
//! /modules/<m>/state              launching | running | destroying
//! /modules/<m>/workers/<i>        ephemeral, by workers (net::manager)
//! /assignments/<supervisor>/<m>.<i>  {module, artifact, tasks, threads, worker}
//! ```
//! A launch writes spec, state and assignments; it becomes `running` when
//! every worker registered, and is rolled back (assignments, metadata and
//! state removed) if that does not happen within the launch timeout.
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
use control::metastore::{MetaError, Metastore, NodeKind, ZkMetastore};
use engine::runtime::placement::Parallelism;
use engine::value::{archived, Value};
use net::manager::{connect_metastore, workers_path};
use serde_json::{json, Value as Json};

use crate::admin::{self, int, text, AdminRequest, DeployArgs, CHUNK_BYTES};

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

fn meta_err(e: MetaError) -> String {
    e.to_string()
}

/// Workers of `module` already assigned to Supervisor `s`.
fn load_of(meta: &ZkMetastore, s: &str, module: &str) -> u64 {
    meta.children(&format!("/assignments/{s}")).map_or(0, |c| {
        c.iter()
            .filter(|a| a.rsplit_once('.').is_some_and(|(m, _)| m == module))
            .count()
    }) as u64
}

fn read_json(meta: &ZkMetastore, path: &str) -> Result<Option<Json>, String> {
    match meta.get(path).map_err(meta_err)? {
        Some((d, _)) => serde_json::from_slice(&d)
            .map(Some)
            .map_err(|e| format!("{path} holds bad JSON: {e}")),
        None => Ok(None),
    }
}

fn state(meta: &ZkMetastore, module: &str) -> Result<Option<String>, String> {
    Ok(meta
        .get(&format!("/modules/{module}/state"))
        .map_err(meta_err)?
        .map(|(d, _)| String::from_utf8_lossy(&d).into_owned()))
}

fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl Conductor {
    fn handle(&self, request: &[u8]) -> Vec<u8> {
        let answer = AdminRequest::decode(request)
            .and_then(|r| self.dispatch(r))
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
            AdminRequest::Status { module } => {
                let module = module.as_str();
                let down = net::manager::failures(&self.meta, module).map_err(|e| e.to_string())?;
                Ok(Value::map([
                    ("state", state(&self.meta, module)?.map_or(Value::Nil, Value::from)),
                    (
                        "down",
                        Value::List(
                            down.into_iter()
                                .map(|(w, why)| Value::map([("worker", Value::from(w)), ("error", Value::from(why))]))
                                .collect(),
                        ),
                    ),
                ]))
            }
            AdminRequest::TaskGroups { module } => self.task_groups(&module),
            AdminRequest::Workers { module } => {
                let module = module.as_str();
                if !valid_module_name(module) {
                    return Err(format!("{module:?} is not a module name"));
                }
                let workers = net::manager::registered_workers(&self.meta, module).map_err(|e| e.to_string())?;
                Ok(Value::map([(
                    "workers",
                    Value::List(workers.iter().map(net::manager::WorkerInfo::to_value).collect()),
                )]))
            }
            AdminRequest::Destroy { module } => {
                let module = module.as_str();
                if state(&self.meta, module)?.is_none() {
                    return Err(format!("no module named {module} is deployed"));
                }
                self.meta
                    .set(&format!("/modules/{module}/state"), b"destroying", None)
                    .map_err(meta_err)?;
                self.remove_assignments(module)?;
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
        if rf != 1 {
            return Err(format!(
                "--replicationFactor {rf}: replication is not implemented yet; only 1 is accepted"
            ));
        }
        if state(&self.meta, module)?.is_some() {
            return Err(format!("module {module} is already deployed"));
        }
        let supervisors = self.meta.children("/supervisors").or_else(|e| match e {
            MetaError::NoNode(_) => Ok(Vec::new()),
            e => Err(meta_err(e)),
        })?;
        if supervisors.is_empty() {
            return Err("not enough Supervisors: none is running; start one with `rama supervisor`".into());
        }
        // Each worker takes a port from its Supervisor's range: see that
        // the free ports are enough before claiming anything.
        let mut slots = Vec::new();
        for s in &supervisors {
            let Some(info) = read_json(&self.meta, &format!("/supervisors/{s}"))? else {
                continue;
            };
            let range = info["portLast"].as_u64().unwrap_or(0) + 1 - info["portFirst"].as_u64().unwrap_or(0);
            let used = self.meta.children(&format!("/assignments/{s}")).map_or(0, |c| c.len()) as u64;
            slots.push((s.clone(), range.saturating_sub(used)));
        }
        let free: u64 = slots.iter().map(|(_, n)| n).sum();
        if free < u64::from(workers) {
            return Err(format!(
                "not enough Supervisor ports: {workers} workers need {workers} ports, {free} are free on {} \
                 Supervisors (supervisor.port.range); start more Supervisors or widen their ranges",
                slots.len()
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
        // Claim the module name; a second deploy of it fails here.
        self.meta.create_all("/modules").map_err(meta_err)?;
        match self
            .meta
            .create(&format!("/modules/{module}"), b"", NodeKind::Persistent)
        {
            Ok(()) => {}
            Err(MetaError::NodeExists(_)) => return Err(format!("module {module} is already deployed")),
            Err(e) => return Err(meta_err(e)),
        }
        // The module instance this deploy makes: its workers serve only
        // while their assignments name it, and clients take only its
        // workers.
        let instance: String = net::auth::nonce().iter().map(|b| format!("{b:02x}")).collect();
        let spec = json!({"module": module, "artifact": artifact, "tasks": tasks, "threads": threads,
                          "workers": workers, "replicationFactor": rf, "instance": instance,
                          "config": overrides.to_json()});
        let launched = (|| -> Result<(), String> {
            self.meta
                .create(
                    &format!("/modules/{module}/spec"),
                    spec.to_string().as_bytes(),
                    NodeKind::Persistent,
                )
                .map_err(meta_err)?;
            self.meta
                .create(&format!("/modules/{module}/state"), b"launching", NodeKind::Persistent)
                .map_err(meta_err)?;
            // The dev scheduler: each worker to the Supervisor with the
            // fewest assignments.
            for w in 0..workers {
                let mut load = Vec::new();
                for (s, free) in &slots {
                    let n = self.meta.children(&format!("/assignments/{s}")).map_or(0, |c| c.len());
                    let taken = load_of(&self.meta, s, module);
                    if taken < *free {
                        load.push((n, s.clone()));
                    }
                }
                load.sort();
                let target = &load.first().ok_or("not enough Supervisor ports")?.1;
                self.meta
                    .create_all(&format!("/assignments/{target}"))
                    .map_err(meta_err)?;
                let assignment = json!({"module": module, "artifact": artifact, "tasks": tasks,
                                        "threads": threads, "workers": workers, "worker": w,
                                        "instance": instance, "config": overrides.to_json()});
                self.meta
                    .create(
                        &format!("/assignments/{target}/{module}.{w}"),
                        assignment.to_string().as_bytes(),
                        NodeKind::Persistent,
                    )
                    .map_err(meta_err)?;
            }
            Ok(())
        })();
        if let Err(e) = launched {
            let _ = self.remove_assignments(module);
            let _ = self.meta.delete_all(&format!("/modules/{module}"));
            return Err(e);
        }
        self.launching
            .lock()
            .expect("launching")
            .insert(module.to_string(), Instant::now());
        Ok(Value::map([("state", Value::from("launching"))]))
    }

    /// Every task group (the tasks of one task thread) of `module`, with
    /// its worker, the worker's address and its Supervisor.
    fn task_groups(&self, module: &str) -> Result<Value, String> {
        let spec = read_json(&self.meta, &format!("/modules/{module}/spec"))?
            .ok_or_else(|| format!("no module named {module} is deployed"))?;
        let num = |k: &str| spec[k].as_u64().unwrap_or(0) as u32;
        let placement = engine::runtime::placement::Placement::new(
            Parallelism::new(num("tasks"), num("threads"), num("workers")).map_err(|e| e.to_string())?,
        );
        // Which Supervisor holds each worker's assignment.
        let mut supervisor_of = HashMap::new();
        for s in self.meta.children("/assignments").unwrap_or_default() {
            for a in self.meta.children(&format!("/assignments/{s}")).unwrap_or_default() {
                if let Some((m, w)) = a.rsplit_once('.') {
                    if m == module {
                        supervisor_of.insert(w.to_string(), s.clone());
                    }
                }
            }
        }
        let down: HashMap<u32, String> = net::manager::failures(&self.meta, module)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        let mut groups = Vec::new();
        for thread in 0..placement.parallelism.threads {
            let worker = placement.worker_of_thread[thread as usize];
            let address = read_json(&self.meta, &format!("{}/{worker}", workers_path(module)))?
                .and_then(|j| j["address"].as_str().map(str::to_string));
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
                    supervisor_of
                        .get(&worker.to_string())
                        .cloned()
                        .map_or(Value::Nil, Value::from),
                ),
            ]));
        }
        Ok(Value::map([("groups", Value::List(groups))]))
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
        let modules = match self.meta.children("/modules") {
            Ok(m) => m,
            Err(MetaError::NoNode(_)) => Vec::new(),
            Err(e) => return Err(meta_err(e)),
        };
        let mut used: std::collections::BTreeSet<String> =
            self.deploying.lock().expect("deploying").keys().cloned().collect();
        for module in modules {
            if let Some(spec) = read_json(&self.meta, &format!("/modules/{module}/spec"))? {
                if let Some(a) = spec["artifact"].as_str() {
                    used.insert(a.to_string());
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

    fn remove_assignments(&self, module: &str) -> Result<(), String> {
        let supervisors = match self.meta.children("/assignments") {
            Ok(s) => s,
            Err(MetaError::NoNode(_)) => return Ok(()),
            Err(e) => return Err(meta_err(e)),
        };
        for s in supervisors {
            for a in self.meta.children(&format!("/assignments/{s}")).map_err(meta_err)? {
                if a.rsplit_once('.').is_some_and(|(m, _)| m == module) {
                    match self.meta.delete(&format!("/assignments/{s}/{a}"), None) {
                        Ok(()) | Err(MetaError::NoNode(_)) => {}
                        Err(e) => return Err(meta_err(e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves modules along: launching -> running once every worker
    /// registered (or rolled back after the timeout); destroying -> gone
    /// once no worker is registered.
    fn progress(&self) -> Result<(), String> {
        let modules = match self.meta.children("/modules") {
            Ok(m) => m,
            Err(MetaError::NoNode(_)) => return Ok(()),
            Err(e) => return Err(meta_err(e)),
        };
        for module in modules {
            let Some(st) = state(&self.meta, &module)? else {
                continue;
            };
            let registered = self.meta.children(&workers_path(&module)).map_or(0, |w| w.len());
            match st.as_str() {
                "launching" => {
                    let spec = read_json(&self.meta, &format!("/modules/{module}/spec"))?;
                    let want = spec.as_ref().and_then(|s| s["workers"].as_u64()).unwrap_or(1) as usize;
                    if registered >= want {
                        self.meta
                            .set(&format!("/modules/{module}/state"), b"running", None)
                            .map_err(meta_err)?;
                        self.launching.lock().expect("launching").remove(&module);
                    } else {
                        let started = *self
                            .launching
                            .lock()
                            .expect("launching")
                            .entry(module.clone())
                            .or_insert_with(Instant::now);
                        if started.elapsed() > LAUNCH_TIMEOUT {
                            eprintln!("conductor: {module} did not start within {LAUNCH_TIMEOUT:?}; rolling back");
                            self.meta
                                .set(&format!("/modules/{module}/state"), b"destroying", None)
                                .map_err(meta_err)?;
                            self.remove_assignments(&module)?;
                        }
                    }
                }
                "destroying" if registered == 0 => {
                    let artifact = read_json(&self.meta, &format!("/modules/{module}/spec"))?
                        .and_then(|s| s["artifact"].as_str().map(str::to_string));
                    self.meta.delete_all(&format!("/modules/{module}")).map_err(meta_err)?;
                    self.launching.lock().expect("launching").remove(&module);
                    if let Some(a) = artifact {
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
    let mut child = std::process::Command::new(path)
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
    let max_bytes = match config.get("conductor.artifact.max.bytes") {
        Some(v) => v
            .as_u64()
            .ok_or("conductor.artifact.max.bytes must be a number of bytes")?,
        None => 1 << 30,
    };
    let secret = net::manager::load_secret(config).map_err(|e| e.to_string())?;
    let meta = connect_metastore(config, Side::Internal).map_err(|e| e.to_string())?;
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
    let logging = control::logging::Logging::beside(config).map_err(|e| e.to_string())?;
    let log = crate::log::Log::open(&logging, "conductor")?;
    log.line(&format!("conductor: admin API on {address}"));
    while !stop.load(Ordering::SeqCst) {
        // Liveness: the /conductor node, made again after a session loss.
        if conductor.meta.get("/conductor").ok().flatten().is_none() {
            let _ = conductor
                .meta
                .create("/conductor", address.as_bytes(), NodeKind::Ephemeral);
        }
        if let Err(e) = conductor.progress() {
            log.line(&format!("conductor: {e}"));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(server);
    log.line("conductor: stopped");
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
    let up = admin.call(&admin::request("uploadStart", [("size", Value::Int(size as i64))]))?;
    let id = int(&up, "upload")?;
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        admin.call(&admin::request(
            "uploadChunk",
            [
                ("upload", Value::Int(id)),
                ("offset", Value::Int(offset as i64)),
                ("data", Value::Bytes(buf[..n].to_vec())),
            ],
        ))?;
        offset += n as u64;
    }
    let done = admin.call(&admin::request("uploadFinish", [("upload", Value::Int(id))]))?;
    Ok(text(&done, "artifact")?.to_string())
}
