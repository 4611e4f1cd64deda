//! The cluster's metadata in the metastore: every path and every node's
//! contents, typed. Nothing else formats a metadata path or parses a
//! node; the Conductor, the Supervisors, the workers and the clients all
//! go through [`Layout`].
//!
//! ```text
//! /conductor                                   ephemeral: the admin address (text)
//! /supervisors/<id>                            ephemeral: SupervisorInfo
//! /modules/<m>                                 ModuleRecord (the name's claim; next instance id)
//! /modules/<m>/state                           ModuleState (text)
//! /modules/<m>/targets                         Targets: the instances reads and appends go to
//! /modules/<m>/instances/<n>/spec              InstanceSpec
//! /modules/<m>/instances/<n>/state             InstanceState (text)
//! /modules/<m>/instances/<n>/workers/<w>       ephemeral, by workers: WorkerRegistration
//! /modules/<m>/instances/<n>/failures/<w>      by a worker that could not start: WorkerFailure
//! /modules/<m>/instances/<n>/groups/<tg>       GroupNode: task group tg's replicas and leadership,
//!                                              changed only by compare-and-set (replication)
//! /assignments/<supervisor>/<m>.<n>.<w>        Assignment
//! ```
//!
//! A module *instance* is one deploy of a module's code and shape: a
//! launch makes instance 0, and each later update or scaling the next
//! number. Instance numbers name instances to operators (`rama
//! taskGroupsStatus <module> <instance>`); the *incarnation*, a random
//! token made with each instance, fences: a worker serves only while its
//! assignment names its incarnation, so a stale worker of an earlier
//! deploy or another cluster (with the same numbers) retires instead of
//! joining. Clients read from the read target and append to the append
//! target; a launch points both at its instance, and an update moves them.
//! Node contents are JSON (readable with ZooKeeper's own tools).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::metastore::{MetaError, Metastore, NodeKind};

pub const CONDUCTOR: &str = "/conductor";
/// The cluster's identity ([`ClusterIdentity`]), made by the first
/// Conductor; a Supervisor keeps a copy beside its data and acts on that
/// data only in the cluster it belongs to.
pub const CLUSTER: &str = "/cluster";
pub const SUPERVISORS: &str = "/supervisors";
pub const MODULES: &str = "/modules";
pub const ASSIGNMENTS: &str = "/assignments";

/// Errors reading or writing metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A node holds something this release cannot read.
    #[error("metadata {path} is not readable: {reason}")]
    Bad { path: String, reason: String },
}

pub type Result<T> = std::result::Result<T, LayoutError>;

/// `/supervisors/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupervisorInfo {
    pub host: String,
    pub port_first: u16,
    pub port_last: u16,
}

/// `/modules/<m>`: the claim of a module name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleRecord {
    /// The number the next instance of the module takes.
    pub next_instance: u32,
}

/// A module's lifecycle state (`/modules/<m>/state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleState {
    Launching,
    Running,
    Destroying,
}

impl ModuleState {
    pub fn name(self) -> &'static str {
        match self {
            ModuleState::Launching => "launching",
            ModuleState::Running => "running",
            ModuleState::Destroying => "destroying",
        }
    }

    fn parse(text: &str) -> Option<ModuleState> {
        [ModuleState::Launching, ModuleState::Running, ModuleState::Destroying]
            .into_iter()
            .find(|s| s.name() == text)
    }
}

/// An instance's state (`/modules/<m>/instances/<n>/state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Assigned; not every worker registered yet.
    Launching,
    /// Every worker registered once.
    Running,
    /// Being removed (destroy, or replaced by a later instance).
    Retiring,
}

impl InstanceState {
    pub fn name(self) -> &'static str {
        match self {
            InstanceState::Launching => "launching",
            InstanceState::Running => "running",
            InstanceState::Retiring => "retiring",
        }
    }

    fn parse(text: &str) -> Option<InstanceState> {
        [
            InstanceState::Launching,
            InstanceState::Running,
            InstanceState::Retiring,
        ]
        .into_iter()
        .find(|s| s.name() == text)
    }
}

/// `/modules/<m>/targets`: which instance serves reads (selects, queries)
/// and which takes appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    pub read: u32,
    pub append: u32,
}

/// `/modules/<m>/instances/<n>/spec`: what the instance runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    pub module: String,
    pub instance: u32,
    pub incarnation: String,
    /// sha256 of the module artifact.
    pub artifact: String,
    pub tasks: u32,
    pub threads: u32,
    pub workers: u32,
    pub replication_factor: u32,
    /// The worker configuration (`control::worker_config::WorkerConfig`
    /// as JSON).
    #[serde(default)]
    pub config: Json,
}

/// `/assignments/<supervisor>/<m>.<n>.<w>`: one worker of an instance for
/// a Supervisor to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub module: String,
    pub instance: u32,
    pub incarnation: String,
    pub artifact: String,
    pub tasks: u32,
    pub threads: u32,
    pub workers: u32,
    pub worker: u32,
    #[serde(default)]
    pub config: Json,
    /// Replicas of each task group: worker processes `r * workers + w`
    /// run replica `r` of worker `w`'s task groups (`worker` is the
    /// process index).
    #[serde(default = "one")]
    pub replication_factor: u32,
}

fn one() -> u32 {
    1
}

impl Assignment {
    /// Worker `worker` of the instance `spec` describes.
    pub fn of(spec: &InstanceSpec, worker: u32) -> Assignment {
        Assignment {
            module: spec.module.clone(),
            instance: spec.instance,
            incarnation: spec.incarnation.clone(),
            artifact: spec.artifact.clone(),
            tasks: spec.tasks,
            threads: spec.threads,
            workers: spec.workers,
            worker,
            config: spec.config.clone(),
            replication_factor: spec.replication_factor,
        }
    }

    /// Its node's name under the Supervisor's assignments.
    pub fn name(&self) -> String {
        assignment_name(&self.module, self.instance, self.worker)
    }
}

/// `/modules/<m>/instances/<n>/workers/<w>`: a worker that serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerRegistration {
    pub worker: u32,
    /// `host:port` of its client and peer port.
    pub address: String,
    pub tasks: u32,
    pub threads: u32,
    /// Workers of the module (with replication: processes per replica).
    pub workers: u32,
    pub instance: u32,
    /// Replicas of each task group; `worker` is the process index
    /// (`replica * workers + logical worker`).
    #[serde(default = "one")]
    pub replication_factor: u32,
    /// The incarnation it was started for (none: started without a
    /// Supervisor, outside any deploy).
    #[serde(default)]
    pub incarnation: Option<String>,
    #[serde(default)]
    pub engine_version: String,
    /// How clients route appends to the module's depots.
    #[serde(default)]
    pub depots: Vec<DepotRoute>,
}

/// How a client picks the task of an append to one depot without running
/// the module's code: a global depot's is task 0; a depot hashing a field
/// of map records has `key_field`; any other depot's appends go to any
/// task thread, which routes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepotRoute {
    pub name: String,
    #[serde(default)]
    pub global: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
}

/// `/modules/<m>/instances/<n>/failures/<w>`: why a worker cannot start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerFailure {
    pub worker: u32,
    #[serde(default)]
    pub incarnation: Option<String>,
    pub error: String,
}

/// `/modules/<m>/instances/<n>/groups/<tg>`: where the replicas of one task
/// group are and who leads it. The leadership part is
/// `engine::replication::GroupState` (the node's version is its
/// compare-and-set token); the engine's decision core says how it may
/// change, [`Layout::set_group`] changes it only from the version read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupNode {
    /// Replica `r` of the task group is `replicas[r]`.
    pub replicas: Vec<ReplicaPlace>,
    pub epoch: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<GroupLeader>,
    pub isr: Vec<u32>,
    #[serde(default)]
    pub osr: Vec<u32>,
}

/// The replica that leads, in one incarnation of its worker (a metastore
/// session): another incarnation of the same replica does not lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupLeader {
    pub replica: u32,
    pub incarnation: u64,
}

/// Where one replica of a task group runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlace {
    pub supervisor: String,
    pub worker: u32,
}

/// `.../groups/<tg>/live/<r>`, ephemeral: replica `r` is up in one
/// incarnation, with what an election needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRegistration {
    pub replica: u32,
    /// From [`Layout::next_incarnation`]: strictly increasing per replica.
    pub incarnation: u64,
    /// Its data was lost and it has not yet written itself into the OSR:
    /// never elected meanwhile.
    pub lost_data: bool,
    /// The epoch of its last entry and its durable log end (the longest
    /// intact log is elected).
    pub last_epoch: u32,
    pub log_end: u64,
    /// Its applied offset (for status: a follower's lag is the leader's
    /// log end minus its own); updated about every second.
    #[serde(default)]
    pub applied: u64,
}

impl GroupNode {
    /// A new task group: no leader yet, every replica in sync (all empty).
    pub fn new(replicas: Vec<ReplicaPlace>) -> GroupNode {
        let isr = (0..replicas.len() as u32).collect();
        GroupNode {
            replicas,
            epoch: 0,
            leader: None,
            isr,
            osr: Vec::new(),
        }
    }
}

pub fn groups(m: &str, n: u32) -> String {
    format!("{}/groups", instance(m, n))
}

pub fn group(m: &str, n: u32, tg: u32) -> String {
    format!("{}/groups/{tg}", instance(m, n))
}

pub fn group_live(m: &str, n: u32, tg: u32) -> String {
    format!("{}/live", group(m, n, tg))
}

pub fn group_incarnation(m: &str, n: u32, tg: u32, r: u32) -> String {
    format!("{}/incarnations/{r}", group(m, n, tg))
}

pub fn supervisor(id: &str) -> String {
    format!("{SUPERVISORS}/{id}")
}

pub fn module(m: &str) -> String {
    format!("{MODULES}/{m}")
}

pub fn module_state(m: &str) -> String {
    format!("{MODULES}/{m}/state")
}

pub fn targets(m: &str) -> String {
    format!("{MODULES}/{m}/targets")
}

pub fn instances(m: &str) -> String {
    format!("{MODULES}/{m}/instances")
}

pub fn instance(m: &str, n: u32) -> String {
    format!("{MODULES}/{m}/instances/{n}")
}

pub fn instance_spec(m: &str, n: u32) -> String {
    format!("{}/spec", instance(m, n))
}

pub fn instance_state(m: &str, n: u32) -> String {
    format!("{}/state", instance(m, n))
}

pub fn workers(m: &str, n: u32) -> String {
    format!("{}/workers", instance(m, n))
}

pub fn worker(m: &str, n: u32, w: u32) -> String {
    format!("{}/workers/{w}", instance(m, n))
}

pub fn failures(m: &str, n: u32) -> String {
    format!("{}/failures", instance(m, n))
}

pub fn failure(m: &str, n: u32, w: u32) -> String {
    format!("{}/failures/{w}", instance(m, n))
}

pub fn assignments(supervisor: &str) -> String {
    format!("{ASSIGNMENTS}/{supervisor}")
}

pub fn assignment(supervisor: &str, name: &str) -> String {
    format!("{ASSIGNMENTS}/{supervisor}/{name}")
}

/// The name of worker `w` of instance `n` of module `m` among a
/// Supervisor's assignments: `<m>.<n>.<w>`.
pub fn assignment_name(m: &str, n: u32, w: u32) -> String {
    format!("{m}.{n}.{w}")
}

/// `(module, instance, worker)` of an assignment name (module names may
/// hold dots; the last two fields are numbers).
pub fn parse_assignment_name(name: &str) -> Option<(&str, u32, u32)> {
    let (rest, w) = name.rsplit_once('.')?;
    let (m, n) = rest.rsplit_once('.')?;
    if m.is_empty() {
        return None;
    }
    Some((m, n.parse().ok()?, w.parse().ok()?))
}

/// Whether `name` may name a module: letters, digits, `_`, `-`, `.`.
pub fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// `/cluster`: who this metastore's cluster is. A Supervisor whose data
/// belongs to another cluster (or that meets a metastore without one: a
/// fresh or wiped ZooKeeper) must not take the absence of its module
/// instances there as their end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub id: String,
}

/// Typed reads and writes of the metadata over any [`Metastore`].
pub struct Layout<'a> {
    meta: &'a dyn Metastore,
}

impl std::fmt::Debug for Layout<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Layout")
    }
}

/// `Ok(vec![])` for a parent that does not exist.
fn or_empty(r: std::result::Result<Vec<String>, MetaError>) -> Result<Vec<String>> {
    match r {
        Ok(c) => Ok(c),
        Err(MetaError::NoNode(_)) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

impl<'a> Layout<'a> {
    pub fn new(meta: &'a dyn Metastore) -> Layout<'a> {
        Layout { meta }
    }

    pub fn meta(&self) -> &'a dyn Metastore {
        self.meta
    }

    /// The JSON node at `path` with its version.
    pub fn read<T: DeserializeOwned>(&self, path: &str) -> Result<Option<(T, i32)>> {
        match self.meta.get(path)? {
            Some((data, version)) => {
                serde_json::from_slice(&data)
                    .map(|v| Some((v, version)))
                    .map_err(|e| LayoutError::Bad {
                        path: path.to_string(),
                        reason: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    fn value<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        Ok(self.read(path)?.map(|(v, _)| v))
    }

    fn bytes<T: Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).expect("metadata serializes")
    }

    /// Creates `path` holding `value`.
    pub fn create<T: Serialize>(&self, path: &str, value: &T, kind: NodeKind) -> Result<()> {
        Ok(self.meta.create(path, &Self::bytes(value), kind)?)
    }

    /// Replaces `path` with `value` if it is at `version`.
    pub fn set<T: Serialize>(&self, path: &str, value: &T, version: Option<i32>) -> Result<i32> {
        Ok(self.meta.set(path, &Self::bytes(value), version)?)
    }

    fn text(&self, path: &str) -> Result<Option<String>> {
        Ok(self
            .meta
            .get(path)?
            .map(|(d, _)| String::from_utf8_lossy(&d).into_owned()))
    }

    /// The cluster's identity, if a Conductor made one.
    pub fn cluster_identity(&self) -> Result<Option<ClusterIdentity>> {
        self.value(CLUSTER)
    }

    /// The cluster's identity, made from `fresh` if there is none yet
    /// (only the first of racing creators wins; all return the winner's).
    pub fn cluster_identity_or_create(&self, fresh: &str) -> Result<ClusterIdentity> {
        if let Some(id) = self.cluster_identity()? {
            return Ok(id);
        }
        let made = ClusterIdentity { id: fresh.to_string() };
        match self.create(CLUSTER, &made, NodeKind::Persistent) {
            Ok(()) => Ok(made),
            Err(LayoutError::Meta(MetaError::NodeExists(_))) => {
                self.cluster_identity()?.ok_or_else(|| LayoutError::Bad {
                    path: CLUSTER.into(),
                    reason: "created by another and then removed".into(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The Conductor's admin address, when one runs.
    pub fn conductor(&self) -> Result<Option<String>> {
        self.text(CONDUCTOR)
    }

    /// Ids of the Supervisors that run.
    pub fn supervisors(&self) -> Result<Vec<String>> {
        or_empty(self.meta.children(SUPERVISORS))
    }

    pub fn supervisor(&self, id: &str) -> Result<Option<SupervisorInfo>> {
        self.value(&supervisor(id))
    }

    /// Names of the deployed modules.
    pub fn modules(&self) -> Result<Vec<String>> {
        or_empty(self.meta.children(MODULES))
    }

    pub fn module_record(&self, m: &str) -> Result<Option<(ModuleRecord, i32)>> {
        self.read(&module(m))
    }

    /// A state node (text) at `path`, parsed by `parse`.
    fn state<T>(&self, path: String, parse: fn(&str) -> Option<T>, what: &str) -> Result<Option<T>> {
        match self.text(&path)? {
            Some(t) => parse(&t).map(Some).ok_or(LayoutError::Bad {
                path,
                reason: format!("unknown {what} state {t:?}"),
            }),
            None => Ok(None),
        }
    }

    pub fn module_state(&self, m: &str) -> Result<Option<ModuleState>> {
        self.state(module_state(m), ModuleState::parse, "module")
    }

    pub fn set_module_state(&self, m: &str, state: ModuleState) -> Result<()> {
        self.meta.set(&module_state(m), state.name().as_bytes(), None)?;
        Ok(())
    }

    pub fn targets(&self, m: &str) -> Result<Option<Targets>> {
        self.value(&targets(m))
    }

    /// Instance numbers of module `m`, ascending.
    pub fn instances(&self, m: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = or_empty(self.meta.children(&instances(m)))?
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    pub fn instance_spec(&self, m: &str, n: u32) -> Result<Option<InstanceSpec>> {
        self.value(&instance_spec(m, n))
    }

    pub fn instance_state(&self, m: &str, n: u32) -> Result<Option<InstanceState>> {
        self.state(instance_state(m, n), InstanceState::parse, "instance")
    }

    pub fn set_instance_state(&self, m: &str, n: u32, state: InstanceState) -> Result<()> {
        self.meta.set(&instance_state(m, n), state.name().as_bytes(), None)?;
        Ok(())
    }

    /// The spec of the instance that serves reads (`append`: takes
    /// appends) of module `m`.
    pub fn target_spec(&self, m: &str, append: bool) -> Result<Option<InstanceSpec>> {
        let Some(t) = self.targets(m)? else { return Ok(None) };
        self.instance_spec(m, if append { t.append } else { t.read })
    }

    /// The task groups of instance `n` of `m` that have a group node.
    pub fn groups(&self, m: &str, n: u32) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = or_empty(self.meta.children(&groups(m, n)))?
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Task group `tg`'s node and its version (the compare-and-set token).
    pub fn group(&self, m: &str, n: u32, tg: u32) -> Result<Option<(GroupNode, i32)>> {
        self.read(&group(m, n, tg))
    }

    /// Creates task group `tg`'s node (fails if it exists).
    pub fn create_group(&self, m: &str, n: u32, tg: u32, node: &GroupNode) -> Result<()> {
        self.meta.create_all(&groups(m, n))?;
        self.create(&group(m, n, tg), node, NodeKind::Persistent)
    }

    /// Replaces task group `tg`'s node if it is still at `version`; a node
    /// changed since it was read is left as it is
    /// (`MetaError::BadVersion`). Returns the new version.
    pub fn set_group(&self, m: &str, n: u32, tg: u32, node: &GroupNode, version: i32) -> Result<i32> {
        self.set(&group(m, n, tg), node, Some(version))
    }

    /// The next incarnation of replica `r` of task group `tg`: a counter
    /// in the metastore raised by compare-and-set, so incarnations
    /// strictly increase across restarts, whoever restarts the replica.
    pub fn next_incarnation(&self, m: &str, n: u32, tg: u32, r: u32) -> Result<u64> {
        let path = group_incarnation(m, n, tg, r);
        loop {
            match self.read::<u64>(&path)? {
                None => {
                    self.meta.create_all(&format!("{}/incarnations", group(m, n, tg)))?;
                    match self.create(&path, &1u64, NodeKind::Persistent) {
                        Ok(()) => return Ok(1),
                        Err(LayoutError::Meta(MetaError::NodeExists(_))) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Some((last, version)) => match self.set(&path, &(last + 1), Some(version)) {
                    Ok(_) => return Ok(last + 1),
                    Err(LayoutError::Meta(MetaError::BadVersion(_))) => continue,
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// Registers a live replica (ephemeral: it goes with the session). A
    /// node of an earlier incarnation of the same replica whose session
    /// has not expired yet is removed first: that process is gone.
    pub fn register_replica(&self, m: &str, n: u32, tg: u32, registration: &ReplicaRegistration) -> Result<()> {
        let dir = group_live(m, n, tg);
        self.meta.create_all(&dir)?;
        let path = format!("{dir}/{}", registration.replica);
        loop {
            match self.create(&path, registration, NodeKind::Ephemeral) {
                Err(LayoutError::Meta(MetaError::NodeExists(_))) => match self.read::<ReplicaRegistration>(&path)? {
                    Some((old, version)) if old.incarnation < registration.incarnation => {
                        match self.meta.delete(&path, Some(version)) {
                            Ok(()) | Err(MetaError::NoNode(_)) | Err(MetaError::BadVersion(_)) => continue,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Some(_) => {
                        return Err(LayoutError::Meta(MetaError::NodeExists(format!(
                            "{path} (an incarnation as new as {} is registered)",
                            registration.incarnation
                        ))))
                    }
                    None => continue,
                },
                other => return other,
            }
        }
    }

    /// Removes replica `r`'s registration if it is still incarnation
    /// `incarnation`'s (the replica stopped; a later one's stays).
    pub fn unregister_replica(&self, m: &str, n: u32, tg: u32, r: u32, incarnation: u64) -> Result<()> {
        let path = format!("{}/{r}", group_live(m, n, tg));
        match self.read::<ReplicaRegistration>(&path)? {
            Some((old, version)) if old.incarnation == incarnation => match self.meta.delete(&path, Some(version)) {
                Ok(()) | Err(MetaError::NoNode(_)) | Err(MetaError::BadVersion(_)) => Ok(()),
                Err(e) => Err(e.into()),
            },
            _ => Ok(()),
        }
    }

    /// Updates this replica's registration (its own ephemeral node).
    pub fn update_replica(&self, m: &str, n: u32, tg: u32, registration: &ReplicaRegistration) -> Result<()> {
        let path = format!("{}/{}", group_live(m, n, tg), registration.replica);
        self.set(&path, registration, None).map(|_| ())
    }

    /// The replicas of task group `tg` that are up, by replica.
    pub fn live_replicas(&self, m: &str, n: u32, tg: u32) -> Result<Vec<ReplicaRegistration>> {
        let dir = group_live(m, n, tg);
        let mut out = Vec::new();
        for child in or_empty(self.meta.children(&dir))? {
            if let Some(r) = self.value::<ReplicaRegistration>(&format!("{dir}/{child}"))? {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.replica);
        Ok(out)
    }

    /// Every worker registered for instance `n` of `m`, by index; only
    /// those of `incarnation` when given (fencing).
    pub fn registrations(&self, m: &str, n: u32, incarnation: Option<&str>) -> Result<Vec<WorkerRegistration>> {
        let dir = workers(m, n);
        let mut out = Vec::new();
        for id in or_empty(self.meta.children(&dir))? {
            if let Some(r) = self.value::<WorkerRegistration>(&format!("{dir}/{id}"))? {
                if incarnation.is_none() || r.incarnation.as_deref() == incarnation {
                    out.push(r);
                }
            }
        }
        out.sort_by_key(|r| r.worker);
        Ok(out)
    }

    /// Records why worker `w` of instance `n` of `m` cannot start.
    pub fn report_failure(&self, m: &str, n: u32, failure: &WorkerFailure) -> Result<()> {
        // Under an instance that exists only: a report of a module already
        // forgotten must not bring its name back as an empty claim.
        if self.meta.get(&instance(m, n))?.is_none() {
            return Err(MetaError::NoNode(instance(m, n)).into());
        }
        match self.meta.create(&failures(m, n), b"", NodeKind::Persistent) {
            Ok(()) | Err(MetaError::NodeExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let path = self::failure(m, n, failure.worker);
        match self.create(&path, failure, NodeKind::Persistent) {
            Err(LayoutError::Meta(MetaError::NodeExists(_))) => self.set(&path, failure, None).map(|_| ()),
            other => other,
        }
    }

    /// Clears worker `w`'s failure report, once it started.
    pub fn clear_failure(&self, m: &str, n: u32, w: u32) -> Result<()> {
        match self.meta.delete(&failure(m, n, w), None) {
            Ok(()) | Err(MetaError::NoNode(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The failure reports of instance `n` of `m` (of `incarnation` when
    /// given), by worker.
    pub fn failures(&self, m: &str, n: u32, incarnation: Option<&str>) -> Result<Vec<WorkerFailure>> {
        let dir = failures(m, n);
        let mut out = Vec::new();
        for id in or_empty(self.meta.children(&dir))? {
            // A report this release cannot read is skipped, not fatal:
            // status must still answer.
            if let Ok(Some(f)) = self.value::<WorkerFailure>(&format!("{dir}/{id}")) {
                if incarnation.is_none() || f.incarnation.as_deref() == incarnation {
                    out.push(f);
                }
            }
        }
        out.sort_by_key(|f| f.worker);
        Ok(out)
    }

    /// Assignment names of Supervisor `s`.
    pub fn assignment_names(&self, s: &str) -> Result<Vec<String>> {
        or_empty(self.meta.children(&assignments(s)))
    }

    pub fn assignment(&self, s: &str, name: &str) -> Result<Option<Assignment>> {
        self.value(&assignment(s, name))
    }

    /// Ids of the Supervisors with an assignments node.
    pub fn assigned_supervisors(&self) -> Result<Vec<String>> {
        or_empty(self.meta.children(ASSIGNMENTS))
    }

    /// Every assignment of module `m` (every instance when `n` is
    /// `None`): (Supervisor, assignment name).
    pub fn assignments_of(&self, m: &str, n: Option<u32>) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for s in self.assigned_supervisors()? {
            for a in self.assignment_names(&s)? {
                if let Some((am, an, _)) = parse_assignment_name(&a) {
                    if am == m && n.is_none_or(|n| n == an) {
                        out.push((s.clone(), a));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Creates assignment `a` for Supervisor `s`.
    pub fn assign(&self, s: &str, a: &Assignment) -> Result<()> {
        self.meta.create_all(&assignments(s))?;
        self.create(&assignment(s, &a.name()), a, NodeKind::Persistent)
    }

    /// Removes every assignment of module `m` (of instance `n` only, when
    /// given).
    pub fn unassign(&self, m: &str, n: Option<u32>) -> Result<()> {
        for (s, a) in self.assignments_of(m, n)? {
            match self.meta.delete(&assignment(&s, &a), None) {
                Ok(()) | Err(MetaError::NoNode(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Claims module name `m` and writes its first instance: the module
    /// record, state `launching`, the instance's spec and state, and the
    /// targets (both at the instance). Fails with `NodeExists` when the
    /// name is taken; writes nothing else then.
    pub fn launch(&self, spec: &InstanceSpec) -> Result<()> {
        let m = spec.module.as_str();
        self.meta.create_all(MODULES)?;
        let record = ModuleRecord {
            next_instance: spec.instance + 1,
        };
        self.create(&module(m), &record, NodeKind::Persistent)?;
        let written = (|| -> Result<()> {
            self.meta.create(
                &module_state(m),
                ModuleState::Launching.name().as_bytes(),
                NodeKind::Persistent,
            )?;
            self.write_instance(spec)?;
            let t = Targets {
                read: spec.instance,
                append: spec.instance,
            };
            self.create(&targets(m), &t, NodeKind::Persistent)
        })();
        if written.is_err() {
            let _ = self.meta.delete_all(&module(m));
        }
        written
    }

    /// Adds instance `spec.instance` to an existing module (an update or
    /// a scaling makes one): its spec and state `launching`, and the
    /// module record's next number moved past it. The targets stay where
    /// they are until [`Layout::set_targets`] moves them.
    pub fn add_instance(&self, spec: &InstanceSpec) -> Result<()> {
        let m = spec.module.as_str();
        let (record, version) = self.module_record(m)?.ok_or_else(|| MetaError::NoNode(module(m)))?;
        if spec.instance < record.next_instance {
            return Err(LayoutError::Bad {
                path: module(m),
                reason: format!(
                    "instance {} is taken (the next instance is {})",
                    spec.instance, record.next_instance
                ),
            });
        }
        // The record first, conditionally: two Conductors cannot both add
        // the same instance.
        let next = ModuleRecord {
            next_instance: spec.instance + 1,
        };
        self.set(&module(m), &next, Some(version))?;
        self.write_instance(spec)
    }

    /// The nodes of a new instance: its own, its spec, its state
    /// `launching` (the module's nodes exist already).
    fn write_instance(&self, spec: &InstanceSpec) -> Result<()> {
        let (m, n) = (spec.module.as_str(), spec.instance);
        self.meta.create_all(&instances(m))?;
        self.meta.create(&instance(m, n), b"", NodeKind::Persistent)?;
        self.create(&instance_spec(m, n), spec, NodeKind::Persistent)?;
        self.meta.create(
            &instance_state(m, n),
            InstanceState::Launching.name().as_bytes(),
            NodeKind::Persistent,
        )?;
        Ok(())
    }

    /// Points reads and appends of `m` at the instances of `targets`, if
    /// the targets are still at `version` (compare-and-set); both must
    /// exist.
    pub fn set_targets(&self, m: &str, targets: Targets, version: i32) -> Result<i32> {
        for n in [targets.read, targets.append] {
            if self.instance_spec(m, n)?.is_none() {
                return Err(LayoutError::Bad {
                    path: instance_spec(m, n),
                    reason: format!("module {m} has no instance {n} to target"),
                });
            }
        }
        self.set(&self::targets(m), &targets, Some(version))
    }

    /// The targets of `m` with their version (for [`Layout::set_targets`]).
    pub fn targets_versioned(&self, m: &str) -> Result<Option<(Targets, i32)>> {
        self.read(&targets(m))
    }

    /// Removes module `m`'s metadata (after its workers are gone).
    pub fn forget_module(&self, m: &str) -> Result<()> {
        Ok(self.meta.delete_all(&module(m))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metastore::MemMetastore;

    fn spec(m: &str, n: u32) -> InstanceSpec {
        InstanceSpec {
            module: m.into(),
            instance: n,
            incarnation: format!("inc{n}"),
            artifact: "a".repeat(64),
            tasks: 4,
            threads: 2,
            workers: 2,
            replication_factor: 1,
            config: Json::Null,
        }
    }

    #[test]
    fn a_group_node_changes_only_from_the_version_read() {
        let meta = MemMetastore::new();
        let layout = Layout::new(&meta);
        let place = |s: &str, w| ReplicaPlace {
            supervisor: s.into(),
            worker: w,
        };
        let node = GroupNode::new(vec![place("s1", 0), place("s2", 1), place("s3", 2)]);
        assert_eq!(node.isr, vec![0, 1, 2]);
        layout.create_group("M", 0, 3, &node).unwrap();
        assert!(layout.create_group("M", 0, 3, &node).is_err(), "a second create fails");
        assert_eq!(layout.groups("M", 0).unwrap(), vec![3]);
        let (read, version) = layout.group("M", 0, 3).unwrap().unwrap();
        assert_eq!(read, node);
        let mut led = read.clone();
        led.epoch = 1;
        led.leader = Some(GroupLeader {
            replica: 1,
            incarnation: 9,
        });
        let next = layout.set_group("M", 0, 3, &led, version).unwrap();
        // A writer that read before that change is refused and changes nothing.
        let mut stale = read;
        stale.isr = vec![0];
        stale.osr = vec![1, 2];
        assert_eq!(
            layout.set_group("M", 0, 3, &stale, version),
            Err(LayoutError::Meta(MetaError::BadVersion(group("M", 0, 3))))
        );
        assert_eq!(layout.group("M", 0, 3).unwrap(), Some((led, next)));
        assert_eq!(layout.groups("M", 1).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn assignment_names_round_trip() {
        assert_eq!(assignment_name("Word.Count", 3, 7), "Word.Count.3.7");
        assert_eq!(parse_assignment_name("Word.Count.3.7"), Some(("Word.Count", 3, 7)));
        assert_eq!(parse_assignment_name("WordCount.x.1"), None);
        assert_eq!(parse_assignment_name("WordCount.1"), None);
        assert_eq!(parse_assignment_name(".1.2"), None);
    }

    #[test]
    fn launch_writes_one_instance_and_targets() {
        let meta = MemMetastore::new();
        let l = Layout::new(&meta);
        l.launch(&spec("M", 0)).unwrap();
        assert_eq!(l.module_state("M").unwrap(), Some(ModuleState::Launching));
        assert_eq!(l.instances("M").unwrap(), [0]);
        assert_eq!(l.instance_state("M", 0).unwrap(), Some(InstanceState::Launching));
        assert_eq!(l.targets("M").unwrap(), Some(Targets { read: 0, append: 0 }));
        assert_eq!(l.target_spec("M", true).unwrap().unwrap().incarnation, "inc0");
        assert_eq!(l.module_record("M").unwrap().unwrap().0.next_instance, 1);
        // The name is claimed: a second launch fails and changes nothing.
        let err = l.launch(&spec("M", 0)).unwrap_err();
        assert!(matches!(err, LayoutError::Meta(MetaError::NodeExists(_))), "{err}");
        assert_eq!(l.instances("M").unwrap(), [0]);
        l.forget_module("M").unwrap();
        assert!(l.modules().unwrap().is_empty());
    }

    #[test]
    fn a_later_instance_takes_the_targets_by_compare_and_set() {
        let meta = MemMetastore::new();
        let l = Layout::new(&meta);
        l.launch(&spec("M", 0)).unwrap();
        // Instance 0 is taken; 1 is next.
        assert!(l
            .add_instance(&spec("M", 0))
            .unwrap_err()
            .to_string()
            .contains("is taken"));
        l.add_instance(&spec("M", 1)).unwrap();
        assert_eq!(l.instances("M").unwrap(), [0, 1]);
        assert_eq!(l.module_record("M").unwrap().unwrap().0.next_instance, 2);
        let (t, v) = l.targets_versioned("M").unwrap().unwrap();
        assert_eq!(t, Targets { read: 0, append: 0 });
        // Appends move first, then reads.
        let v = l.set_targets("M", Targets { read: 0, append: 1 }, v).unwrap();
        assert_eq!(l.target_spec("M", true).unwrap().unwrap().instance, 1);
        assert_eq!(l.target_spec("M", false).unwrap().unwrap().instance, 0);
        // A stale version loses; a missing instance is refused.
        let stale = l.set_targets("M", Targets { read: 1, append: 1 }, v - 1).unwrap_err();
        assert!(matches!(stale, LayoutError::Meta(MetaError::BadVersion(_))), "{stale}");
        let missing = l.set_targets("M", Targets { read: 5, append: 1 }, v).unwrap_err();
        assert!(missing.to_string().contains("no instance 5"), "{missing}");
        l.set_targets("M", Targets { read: 1, append: 1 }, v).unwrap();
        assert_eq!(l.target_spec("M", false).unwrap().unwrap().incarnation, "inc1");
    }

    #[test]
    fn the_first_cluster_identity_wins() {
        let meta = MemMetastore::new();
        let l = Layout::new(&meta);
        assert_eq!(l.cluster_identity().unwrap(), None);
        let first = l.cluster_identity_or_create("aa").unwrap();
        assert_eq!(first.id, "aa");
        // A later Conductor (a restart, a second one racing) keeps it.
        assert_eq!(l.cluster_identity_or_create("bb").unwrap().id, "aa");
        assert_eq!(l.cluster_identity().unwrap(), Some(first));
    }

    #[test]
    fn registrations_and_failures_are_fenced_by_incarnation() {
        let meta = MemMetastore::new();
        let l = Layout::new(&meta);
        l.launch(&spec("M", 0)).unwrap();
        meta.create_all(&workers("M", 0)).unwrap();
        for (w, inc) in [(1, "inc0"), (0, "stale")] {
            let r = WorkerRegistration {
                worker: w,
                address: format!("127.0.0.1:{}", 3000 + w),
                tasks: 4,
                threads: 2,
                workers: 2,
                instance: 0,
                replication_factor: 1,
                incarnation: Some(inc.into()),
                engine_version: "x".into(),
                depots: Vec::new(),
            };
            l.create(&worker("M", 0, w), &r, NodeKind::Ephemeral).unwrap();
        }
        assert_eq!(l.registrations("M", 0, None).unwrap().len(), 2);
        let mine = l.registrations("M", 0, Some("inc0")).unwrap();
        assert_eq!(mine.iter().map(|r| r.worker).collect::<Vec<_>>(), [1]);
        let f = WorkerFailure {
            worker: 1,
            incarnation: Some("inc0".into()),
            error: "disk".into(),
        };
        l.report_failure("M", 0, &f).unwrap();
        l.report_failure("M", 0, &f).unwrap();
        assert_eq!(l.failures("M", 0, Some("inc0")).unwrap(), std::slice::from_ref(&f));
        assert!(l.failures("M", 0, Some("other")).unwrap().is_empty());
        // A report for a module already forgotten brings nothing back.
        let late = Layout::new(&meta);
        assert!(late.report_failure("Gone", 0, &f).is_err());
        assert!(late.modules().unwrap().iter().all(|m| m != "Gone"));
        l.clear_failure("M", 0, 1).unwrap();
        l.clear_failure("M", 0, 1).unwrap();
        assert!(l.failures("M", 0, None).unwrap().is_empty());
        // A session that ends takes its registrations with it.
        meta.expire_session();
        assert!(l.registrations("M", 0, None).unwrap().is_empty());
    }

    #[test]
    fn assignments_by_module_and_instance() {
        let meta = MemMetastore::new();
        let l = Layout::new(&meta);
        let a = |m: &str, n: u32, w: u32| Assignment {
            module: m.into(),
            instance: n,
            incarnation: "i".into(),
            artifact: "a".into(),
            tasks: 1,
            threads: 1,
            workers: 2,
            worker: w,
            config: Json::Null,
            replication_factor: 1,
        };
        l.assign("s1", &a("M", 0, 0)).unwrap();
        l.assign("s2", &a("M", 0, 1)).unwrap();
        l.assign("s2", &a("M", 1, 0)).unwrap();
        l.assign("s2", &a("M.x", 0, 0)).unwrap();
        assert_eq!(l.assignments_of("M", None).unwrap().len(), 3);
        assert_eq!(
            l.assignments_of("M", Some(1)).unwrap(),
            [("s2".to_string(), "M.1.0".to_string())]
        );
        assert_eq!(l.assignment("s2", "M.x.0.0").unwrap().unwrap().module, "M.x");
        l.unassign("M", Some(0)).unwrap();
        assert_eq!(l.assignments_of("M", None).unwrap().len(), 1);
        assert_eq!(l.assignments_of("M.x", None).unwrap().len(), 1);
        // Bad contents are named with their path.
        meta.set(&assignment("s2", "M.1.0"), b"{", None).unwrap();
        let err = l.assignment("s2", "M.1.0").unwrap_err().to_string();
        assert!(err.contains("/assignments/s2/M.1.0"), "{err}");
    }
}
