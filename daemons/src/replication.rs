//! Replication's control plane: the metastore side of a task group's
//! replicas (issue 13).
//!
//! - [`state_of`] / [`node_of`]: the group's metastore node
//!   (`layout::GroupNode`, with where each replica runs) as the decision
//!   core's `GroupState` (the node's version is the compare-and-set
//!   token) and back.
//! - [`elect_group`]: the Conductor's pass over one task group: when the
//!   leader's registration (replica and incarnation) is gone, the live,
//!   intact ISR member with the longest log leads a new epoch
//!   (`engine::replication::elect`), written by compare-and-set on the
//!   version read.
//! - [`GroupLink`]: a replica's link to its group on a worker: it
//!   registers the replica (ephemeral, with a new incarnation from the
//!   replica's counter), watches the group node and hands every state to
//!   the replica's driver, writes its compare-and-sets, and keeps the
//!   *lease*: without metastore contact for two thirds of the session
//!   timeout it tells the replica `SessionLost`, and once contact returns
//!   it registers again as a new incarnation (the old one can never lead
//!   again: the group names leaders by incarnation). All metastore calls
//!   block, so they run on the link's own thread; the task thread only
//!   awaits answers.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::layout::{self, GroupLeader, GroupNode, Layout, LayoutError, ReplicaPlace, ReplicaRegistration};
use control::metastore::{MetaError, Metastore};
use engine::cluster::peer::ReplicaSender;
use engine::replication::driver::{CasOutcome, GroupMetastore, ReplicaHost, ReplicaStatus};
use engine::replication::{elect, Candidate, GroupState, Input, Member};

/// Where a task group is: module, instance, task group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupId {
    pub module: String,
    pub instance: u32,
    pub group: u32,
}

/// The core's view of a group node at `version`.
pub fn state_of(node: &GroupNode, version: i32) -> GroupState {
    GroupState {
        version: version.max(0) as u64,
        epoch: node.epoch,
        leader: node.leader.map(|l| Member {
            id: l.replica,
            incarnation: l.incarnation,
        }),
        isr: node.isr.clone(),
        osr: node.osr.clone(),
    }
}

/// The group node for `state`, with the replicas' places.
pub fn node_of(replicas: &[ReplicaPlace], state: &GroupState) -> GroupNode {
    GroupNode {
        replicas: replicas.to_vec(),
        epoch: state.epoch,
        leader: state.leader.map(|m| GroupLeader {
            replica: m.id,
            incarnation: m.incarnation,
        }),
        isr: state.isr.clone(),
        osr: state.osr.clone(),
    }
}

fn candidate(r: &ReplicaRegistration) -> Candidate {
    Candidate {
        member: Member {
            id: r.replica,
            incarnation: r.incarnation,
        },
        lost_data: r.lost_data,
        last_epoch: r.last_epoch,
        log_end: r.log_end,
    }
}

/// One election pass over a task group: the new state if it changed
/// (`None`: the leader is live, or nothing can be done, or someone else
/// changed the node meanwhile: the next pass reads it again).
pub fn elect_group(layout: &Layout<'_>, id: &GroupId) -> layout::Result<Option<GroupState>> {
    let Some((node, version)) = layout.group(&id.module, id.instance, id.group)? else {
        return Ok(None);
    };
    let live: Vec<Candidate> = layout
        .live_replicas(&id.module, id.instance, id.group)?
        .iter()
        .filter(|r| (r.replica as usize) < node.replicas.len())
        .map(candidate)
        .collect();
    let state = state_of(&node, version);
    let Some(next) = elect(&state, &live) else {
        return Ok(None);
    };
    match layout.set_group(
        &id.module,
        id.instance,
        id.group,
        &node_of(&node.replicas, &next),
        version,
    ) {
        Ok(written) => Ok(Some(GroupState {
            version: written as u64,
            ..next
        })),
        Err(LayoutError::Meta(MetaError::BadVersion(_))) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A blocking metastore call, run on the link's thread.
type Job = Box<dyn FnOnce(&Layout<'_>) + Send>;

/// A replica's link to its group's metastore node (see the module doc).
pub struct GroupLink {
    jobs: flume::Sender<Job>,
    id: GroupId,
    replicas: Vec<ReplicaPlace>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for GroupLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLink")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What a replica says of itself in its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaReport {
    pub lost_data: bool,
    pub last_epoch: u32,
    pub log_end: u64,
    pub applied: u64,
}

/// How often a replica's registration is brought up to date (its log end
/// and applied offset, for elections and status) while it changes.
const REPORT_EVERY: Duration = Duration::from_secs(1);

impl GroupLink {
    /// Registers replica `replica` of group `id` (a new incarnation) and
    /// starts watching the group node for it: every state read goes to
    /// `inbox` as [`Input::Group`], a lost lease as [`Input::SessionLost`]
    /// then, once registered again, [`Input::NewSession`]. `report` is
    /// read at each registration. Returns the link and the first
    /// incarnation.
    pub fn start(
        meta: Arc<dyn Metastore>,
        id: GroupId,
        replica: u32,
        session_timeout: Duration,
        report: Arc<Mutex<ReplicaReport>>,
        inbox: flume::Sender<Input>,
    ) -> layout::Result<(GroupLink, u64)> {
        let layout = Layout::new(&*meta);
        let (node, _) = layout
            .group(&id.module, id.instance, id.group)?
            .ok_or_else(|| LayoutError::Bad {
                path: layout::group(&id.module, id.instance, id.group),
                reason: "the task group has no replication node".into(),
            })?;
        let incarnation = register(&layout, &id, replica, &report)?;
        let (jobs, job_rx) = flume::bounded::<Job>(1024);
        let stop = Arc::new(AtomicBool::new(false));
        let cannot = |e: std::io::Error| LayoutError::Bad {
            path: layout::group(&id.module, id.instance, id.group),
            reason: format!("cannot start the group's metastore thread: {e}"),
        };
        // Compare-and-sets on a thread of their own, so none waits for the
        // watch; it ends when the last sender (the driver's) goes.
        std::thread::Builder::new()
            .name(format!("group-cas-{}", id.group))
            .spawn({
                let meta = meta.clone();
                move || {
                    let layout = Layout::new(&*meta);
                    while let Ok(job) = job_rx.recv() {
                        job(&layout);
                    }
                }
            })
            .map_err(cannot)?;
        let thread = std::thread::Builder::new()
            .name(format!("group-watch-{}", id.group))
            .spawn({
                let (id, stop) = (id.clone(), stop.clone());
                move || watch(&*meta, &id, replica, session_timeout, &report, &inbox, &stop)
            })
            .map_err(cannot)?;
        Ok((
            GroupLink {
                jobs,
                id,
                replicas: node.replicas,
                stop,
                thread: Some(thread),
            },
            incarnation,
        ))
    }

    /// The replica's compare-and-sets, for its driver.
    pub fn metastore(&self) -> GroupCas {
        GroupCas {
            jobs: self.jobs.clone(),
            id: self.id.clone(),
            replicas: self.replicas.clone(),
        }
    }
}

impl Drop for GroupLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn registration(replica: u32, incarnation: u64, r: &ReplicaReport) -> ReplicaRegistration {
    ReplicaRegistration {
        replica,
        incarnation,
        lost_data: r.lost_data,
        last_epoch: r.last_epoch,
        log_end: r.log_end,
        applied: r.applied,
    }
}

fn register(layout: &Layout<'_>, id: &GroupId, replica: u32, report: &Mutex<ReplicaReport>) -> layout::Result<u64> {
    let incarnation = layout.next_incarnation(&id.module, id.instance, id.group, replica)?;
    let r = *report.lock().unwrap_or_else(|p| p.into_inner());
    layout.register_replica(
        &id.module,
        id.instance,
        id.group,
        &registration(replica, incarnation, &r),
    )?;
    Ok(incarnation)
}

/// The link's watch thread: watches the group node, keeps the lease and
/// registers again after losing it.
fn watch(
    meta: &dyn Metastore,
    id: &GroupId,
    replica: u32,
    session_timeout: Duration,
    report: &Mutex<ReplicaReport>,
    inbox: &flume::Sender<Input>,
    stop: &AtomicBool,
) {
    let layout = Layout::new(meta);
    let path = layout::group(&id.module, id.instance, id.group);
    let lease = session_timeout * 2 / 3;
    // Contact is proved this often while nothing changes.
    let check = (lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut last_contact = Instant::now();
    let mut lease_lost = false;
    let mut epoch = meta.session_epoch();
    let mut sent = None;
    // The incarnation registered now (the first one registered in
    // `start`), what its registration says, and when it was written.
    let mut current = layout
        .live_replicas(&id.module, id.instance, id.group)
        .ok()
        .and_then(|live| live.into_iter().find(|r| r.replica == replica));
    let mut reported_at = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if reported_at.elapsed() >= REPORT_EVERY {
            reported_at = Instant::now();
            let now = *report.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(reg) = current.as_mut() {
                let next = registration(replica, reg.incarnation, &now);
                if next != *reg && layout.update_replica(&id.module, id.instance, id.group, &next).is_ok() {
                    *reg = next;
                }
            }
        }
        if lease_lost || meta.session_epoch() != epoch {
            // A new session, or the lease given up: a new incarnation.
            match register(&layout, id, replica, report) {
                Ok(incarnation) => {
                    let now = *report.lock().unwrap_or_else(|p| p.into_inner());
                    current = Some(registration(replica, incarnation, &now));
                    epoch = meta.session_epoch();
                    if !lease_lost {
                        let _ = inbox.send(Input::SessionLost);
                    }
                    lease_lost = false;
                    last_contact = Instant::now();
                    let _ = inbox.send(Input::NewSession { incarnation });
                    sent = None;
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        // Each read proves contact and watches anew; a state goes to the
        // replica when its version is new to it.
        match meta.watch_data(&path) {
            Ok((data, w)) => {
                last_contact = Instant::now();
                if let Some((bytes, version)) = data {
                    if sent != Some(version) {
                        if let Ok(node) = serde_json::from_slice::<GroupNode>(&bytes) {
                            if inbox.try_send(Input::Group(state_of(&node, version))).is_ok() {
                                sent = Some(version);
                            }
                        }
                    }
                }
                w.wait(check);
            }
            Err(_) => {
                if !lease_lost && last_contact.elapsed() > lease {
                    lease_lost = true;
                    let _ = inbox.send(Input::SessionLost);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A replica's compare-and-sets of its group node, run on the link's
/// thread: the driver's [`GroupMetastore`].
#[derive(Debug, Clone)]
pub struct GroupCas {
    jobs: flume::Sender<Job>,
    id: GroupId,
    replicas: Vec<ReplicaPlace>,
}

impl GroupMetastore for GroupCas {
    fn cas(
        &self,
        expected_version: u64,
        state: GroupState,
    ) -> Pin<Box<dyn std::future::Future<Output = CasOutcome> + '_>> {
        let (tx, rx) = flume::bounded(1);
        let id = self.id.clone();
        let node = node_of(&self.replicas, &state);
        let job: Job = Box::new(move |layout| {
            let outcome = match i32::try_from(expected_version) {
                Err(_) => CasOutcome::Failed,
                Ok(version) => match layout.set_group(&id.module, id.instance, id.group, &node, version) {
                    Ok(written) => CasOutcome::Written(GroupState {
                        version: written as u64,
                        ..state
                    }),
                    Err(LayoutError::Meta(MetaError::BadVersion(_))) | Err(LayoutError::Meta(MetaError::NoNode(_))) => {
                        CasOutcome::Failed
                    }
                    Err(_) => CasOutcome::Unknown,
                },
            };
            let _ = tx.send(outcome);
        });
        let queued = self.jobs.try_send(job).is_ok();
        Box::pin(async move {
            if !queued {
                return CasOutcome::Unknown;
            }
            rx.recv_async().await.unwrap_or(CasOutcome::Unknown)
        })
    }
}

/// A worker's replica of one task group, as its driver sees it
/// ([`ReplicaHost`]): registration, group node and compare-and-sets
/// through a [`GroupLink`] per incarnation, messages to the other
/// replicas over the peer links.
pub struct WorkerReplica {
    meta: Arc<dyn Metastore>,
    id: GroupId,
    replica: u32,
    session_timeout: Duration,
    report: Arc<Mutex<ReplicaReport>>,
    status: Mutex<Option<ReplicaStatus>>,
    link: Mutex<Option<(GroupLink, u64)>>,
    /// The process of each replica of the group.
    places: Vec<u32>,
    sender: ReplicaSender,
}

impl std::fmt::Debug for WorkerReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerReplica")
            .field("id", &self.id)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: LayoutError) -> engine::Error {
    engine::Error::Unavailable(format!("the metastore: {e}"))
}

impl WorkerReplica {
    /// Replica `replica` of group `id`, whose node (made at deploy) says
    /// where every replica runs.
    pub fn new(
        meta: Arc<dyn Metastore>,
        id: GroupId,
        replica: u32,
        session_timeout: Duration,
        sender: ReplicaSender,
    ) -> engine::Result<WorkerReplica> {
        let (node, _) = Layout::new(&*meta)
            .group(&id.module, id.instance, id.group)
            .map_err(unavailable)?
            .ok_or_else(|| {
                engine::Error::Schema(format!(
                    "task group {} of module {} instance {} has no replication node (deploy makes it)",
                    id.group, id.module, id.instance
                ))
            })?;
        if replica as usize >= node.replicas.len() {
            return Err(engine::Error::Schema(format!(
                "task group {} of module {} has {} replicas, not a replica {replica}",
                id.group,
                id.module,
                node.replicas.len()
            )));
        }
        Ok(WorkerReplica {
            meta,
            id,
            replica,
            session_timeout,
            report: Arc::default(),
            status: Mutex::new(None),
            link: Mutex::new(None),
            places: node.replicas.iter().map(|p| p.worker).collect(),
            sender,
        })
    }

    /// What the replica last said of itself.
    pub fn status(&self) -> Option<ReplicaStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn end_link(&self) {
        let ended = self.link.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((link, incarnation)) = ended {
            drop(link);
            let _ = Layout::new(&*self.meta).unregister_replica(
                &self.id.module,
                self.id.instance,
                self.id.group,
                self.replica,
                incarnation,
            );
        }
    }
}

impl ReplicaHost for WorkerReplica {
    fn begin(&self, inbox: flume::Sender<Input>, fresh: bool) -> engine::Result<(u64, bool)> {
        self.end_link();
        // An empty directory of a replica that ran before (its
        // incarnation counter exists): it may have held entries it no
        // longer has.
        let ran_before = Layout::new(&*self.meta)
            .read::<u64>(&layout::group_incarnation(
                &self.id.module,
                self.id.instance,
                self.id.group,
                self.replica,
            ))
            .map_err(unavailable)?
            .is_some();
        let lost = fresh && ran_before;
        self.report.lock().unwrap_or_else(|p| p.into_inner()).lost_data = lost;
        let (link, incarnation) = GroupLink::start(
            self.meta.clone(),
            self.id.clone(),
            self.replica,
            self.session_timeout,
            self.report.clone(),
            inbox,
        )
        .map_err(unavailable)?;
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some((link, incarnation));
        Ok((incarnation, lost))
    }

    fn report(&self, status: ReplicaStatus) {
        {
            let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
            r.lost_data = status.lost_data;
            r.last_epoch = status.last_epoch;
            r.log_end = status.log_end;
            r.applied = status.applied;
        }
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    fn send(&self, to: u32, message: engine::replication::Message) {
        if let Some(&process) = self.places.get(to as usize) {
            self.sender.send(process, self.id.group, self.replica, to, message);
        }
    }

    fn metastore(&self) -> Box<dyn GroupMetastore> {
        match self.link.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some((link, _)) => Box::new(link.metastore()),
            None => Box::new(NoLink),
        }
    }

    fn end(&self) {
        self.end_link();
    }
}

/// The compare-and-sets of a replica without a link (never begun): the
/// outcome is unknown, so the driver asks again.
struct NoLink;

impl GroupMetastore for NoLink {
    fn cas(&self, _: u64, _: GroupState) -> Pin<Box<dyn std::future::Future<Output = CasOutcome> + '_>> {
        Box::pin(async { CasOutcome::Unknown })
    }
}

/// Where the leaders of a module instance's task groups run, read from
/// their group nodes (again when a sender says an answer was wrong).
pub struct GroupLeaders {
    meta: Arc<dyn Metastore>,
    module: String,
    instance: u32,
    known: Mutex<Vec<KnownLeader>>,
}

impl std::fmt::Debug for GroupLeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLeaders")
            .field("module", &self.module)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct KnownLeader {
    process: Option<u32>,
    read_at: Option<Instant>,
    stale: bool,
}

/// A stale leader is read again at most this often per task group.
const LEADER_REREAD: Duration = Duration::from_millis(25);
/// A known leader is read again this often.
const LEADER_MAX_AGE: Duration = Duration::from_millis(250);

impl GroupLeaders {
    pub fn new(meta: Arc<dyn Metastore>, module: &str, instance: u32, threads: u32) -> GroupLeaders {
        GroupLeaders {
            meta,
            module: module.to_string(),
            instance,
            known: Mutex::new(
                (0..threads)
                    .map(|_| KnownLeader {
                        process: None,
                        read_at: None,
                        stale: true,
                    })
                    .collect(),
            ),
        }
    }

    fn read(&self, thread: u32) -> Option<u32> {
        let (node, _) = Layout::new(&*self.meta)
            .group(&self.module, self.instance, thread)
            .ok()
            .flatten()?;
        let leader = node.leader?;
        node.replicas.get(leader.replica as usize).map(|p| p.worker)
    }
}

impl engine::cluster::peer::Leaders for GroupLeaders {
    fn leader(&self, thread: u32) -> Option<u32> {
        let known = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            *known.get(thread as usize)?
        };
        let age = known.read_at.map(|t| t.elapsed());
        // Read again when told it was wrong (at most every
        // LEADER_REREAD), and anyway every LEADER_MAX_AGE: a leader that
        // was paused answers nothing, so no one would tell.
        if age.is_some_and(|a| a < LEADER_REREAD || (!known.stale && a < LEADER_MAX_AGE)) {
            return known.process;
        }
        let process = self.read(thread);
        let mut all = self.known.lock().unwrap_or_else(|p| p.into_inner());
        all[thread as usize] = KnownLeader {
            process,
            read_at: Some(Instant::now()),
            stale: process.is_none(),
        };
        process
    }

    fn stale(&self, thread: u32) {
        if let Some(k) = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(thread as usize)
        {
            k.stale = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::metastore::MemMetastore;

    fn group() -> GroupId {
        GroupId {
            module: "m".into(),
            instance: 0,
            group: 3,
        }
    }

    fn create(meta: &MemMetastore) {
        let places = (0..3)
            .map(|w| ReplicaPlace {
                supervisor: format!("s{w}"),
                worker: w,
            })
            .collect();
        Layout::new(meta)
            .create_group("m", 0, 3, &GroupNode::new(places))
            .unwrap();
    }

    fn up(meta: &MemMetastore, replica: u32, log_end: u64) -> u64 {
        let report = Mutex::new(ReplicaReport {
            lost_data: false,
            last_epoch: 1,
            log_end,
            applied: 0,
        });
        register(&Layout::new(meta), &group(), replica, &report).unwrap()
    }

    #[test]
    fn the_conductor_elects_when_the_leaders_registration_goes() {
        let meta = MemMetastore::new();
        create(&meta);
        let layout = Layout::new(&meta);
        let sessions: Vec<MemMetastore> = (0..3).map(|_| meta.session()).collect();
        let incarnations: Vec<u64> = (0..3).map(|r| up(&sessions[r], r as u32, 10 + r as u64)).collect();
        let first = elect_group(&layout, &group()).unwrap().expect("a leader");
        assert_eq!(first.leader.map(|m| m.id), Some(2), "the longest log leads");
        assert_eq!(first.epoch, 1);
        assert_eq!(elect_group(&layout, &group()).unwrap(), None, "a live leader stays");

        sessions[2].expire_session();
        let second = elect_group(&layout, &group()).unwrap().expect("a new leader");
        assert_eq!(second.leader.map(|m| m.id), Some(1));
        assert_eq!(
            (second.epoch, second.osr.clone()),
            (2, vec![2]),
            "the old leader leaves the ISR"
        );
        let (node, version) = layout.group("m", 0, 3).unwrap().unwrap();
        assert_eq!(state_of(&node, version), second);
        assert_eq!(node.replicas.len(), 3, "the places are kept");

        // Back with a new incarnation: an OSR replica, not elected.
        let again = up(&sessions[2], 2, 99);
        assert!(again > incarnations[2], "incarnations only grow");
        assert_eq!(elect_group(&layout, &group()).unwrap(), None);
        // Every ISR member gone: no leader, a new epoch all the same.
        sessions[0].expire_session();
        sessions[1].expire_session();
        let none = elect_group(&layout, &group()).unwrap().expect("the leader is fenced");
        assert_eq!((none.leader, none.epoch), (None, 3));
    }

    #[test]
    fn a_link_hands_states_over_writes_by_compare_and_set_and_reregisters_after_expiry() {
        let meta = MemMetastore::new();
        create(&meta);
        let session = meta.session();
        let (inbox, inputs) = flume::bounded(64);
        let report = Arc::new(Mutex::new(ReplicaReport::default()));
        let (link, incarnation) = GroupLink::start(
            Arc::new(session.clone()),
            group(),
            1,
            Duration::from_millis(600),
            report,
            inbox,
        )
        .unwrap();
        let next_group = |inputs: &flume::Receiver<Input>| loop {
            match inputs.recv_timeout(Duration::from_secs(30)).expect("an input") {
                Input::Group(state) => return state,
                _ => continue,
            }
        };
        let state = next_group(&inputs);
        assert_eq!((state.version, state.leader), (0, None));
        let live = Layout::new(&meta).live_replicas("m", 0, 3).unwrap();
        assert_eq!((live.len(), live[0].incarnation), (1, incarnation));

        let cas = link.metastore();
        let mut next = state.clone();
        next.isr = vec![0, 1];
        next.osr = vec![2];
        let (written, stale) = engine::executor::ExecutorConfig::default()
            .block_on(async {
                let written = cas.cas(0, next.clone()).await;
                let stale = cas.cas(0, next.clone()).await;
                (written, stale)
            })
            .unwrap();
        assert_eq!(written, CasOutcome::Written(GroupState { version: 1, ..next }));
        assert_eq!(stale, CasOutcome::Failed, "from a version that is gone");
        assert_eq!(next_group(&inputs).version, 1, "the watch brings the new state");

        session.expire_session();
        let mut saw_lost = false;
        let renewed = loop {
            match inputs.recv_timeout(Duration::from_secs(30)).expect("an input") {
                Input::SessionLost => saw_lost = true,
                Input::NewSession { incarnation } => break incarnation,
                _ => {}
            }
        };
        assert!(saw_lost && renewed > incarnation, "{renewed} after {incarnation}");
        assert_eq!(
            next_group(&inputs).version,
            1,
            "the state again, for the new incarnation"
        );
        let live = Layout::new(&meta).live_replicas("m", 0, 3).unwrap();
        assert_eq!(live[0].incarnation, renewed);
        drop(link);
    }
}
