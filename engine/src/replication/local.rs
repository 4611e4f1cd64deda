//! Replicas of one task group in one process, each on a task thread of its
//! own over a real store: an in-memory metastore node (versioned
//! compare-and-set, watches), channels for the replicas' messages, and the
//! Conductor's election done on request. For tests and benchmarks of the
//! driver; a cluster runs the same driver over its peer links and
//! ZooKeeper.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::driver::{recover, CasOutcome, Driver, DriverSettings, GroupMetastore, ReplicaHost, ReplicaStatus};
use super::{elect, Candidate, GroupState, Input, Message, Replica, ReplicaId, Settings};
use crate::error::{Error, Result};
use crate::executor::ExecutorConfig;
use crate::lsm::{LsmConfig, Store};

/// The group's metastore node and the replicas' inboxes.
#[derive(Debug)]
pub struct LocalGroup {
    state: Mutex<GroupState>,
    inboxes: Mutex<Vec<Option<flume::Sender<Input>>>>,
    cut: Vec<AtomicBool>,
    /// What each live replica last reported (for elections).
    statuses: Mutex<Vec<Option<ReplicaStatus>>>,
    /// The last incarnation of each replica.
    incarnations: Mutex<Vec<u64>>,
    /// Where the node and the incarnations are kept across restarts of
    /// the process (none: in memory only).
    file: Option<PathBuf>,
}

/// What a durable [`LocalGroup`] keeps in its file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    state: GroupState,
    incarnations: Vec<u64>,
}

impl LocalGroup {
    /// A group of `rf` replicas, no leader yet.
    pub fn new(rf: u32) -> Arc<LocalGroup> {
        LocalGroup::with(rf, GroupState::new(0..rf), vec![0; rf as usize], None)
    }

    fn with(rf: u32, state: GroupState, incarnations: Vec<u64>, file: Option<PathBuf>) -> Arc<LocalGroup> {
        Arc::new(LocalGroup {
            state: Mutex::new(state),
            inboxes: Mutex::new(vec![None; rf as usize]),
            cut: (0..rf).map(|_| AtomicBool::new(false)).collect(),
            statuses: Mutex::new(vec![None; rf as usize]),
            incarnations: Mutex::new(incarnations),
            file,
        })
    }

    /// A group of `rf` replicas whose metastore node and incarnations are
    /// kept in `file` (fsynced on every change), as ZooKeeper keeps them
    /// for a cluster: a process restarted over the same directory goes on
    /// from the epoch and ISR it left, never reusing an epoch or an
    /// incarnation. A missing file is a new group.
    pub fn durable(rf: u32, file: PathBuf) -> Result<Arc<LocalGroup>> {
        let kept = match std::fs::read(&file) {
            Ok(bytes) => {
                let corrupt = |reason: String| Error::Corrupt {
                    path: file.clone(),
                    offset: 0,
                    position: 0,
                    reason,
                };
                let kept: Kept =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("task group state: {e}")))?;
                let members = kept.state.replicas().count();
                if members != rf as usize || kept.incarnations.len() != rf as usize {
                    return Err(Error::Schema(format!(
                        "task group state {} has {members} replicas, the module's replication factor is {rf} \
                         (changing it is not supported)",
                        file.display()
                    )));
                }
                Some(kept)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("read", &file, e)),
        };
        let (state, incarnations) = match kept {
            Some(k) => (k.state, k.incarnations),
            None => (GroupState::new(0..rf), vec![0; rf as usize]),
        };
        Ok(LocalGroup::with(rf, state, incarnations, Some(file)))
    }

    /// Writes the node and incarnations to the group's file, if it has one.
    fn keep(&self, state: &GroupState, incarnations: &[u64]) -> Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let kept = Kept {
            state: state.clone(),
            incarnations: incarnations.to_vec(),
        };
        let bytes = serde_json::to_vec(&kept).expect("a task group state serializes");
        crate::fsutil::write_durably(file, &bytes)
    }

    /// The seat of replica `id`: its host when it runs on a task thread
    /// of an in-process cluster.
    pub fn seat(self: &Arc<Self>, id: ReplicaId) -> Arc<dyn ReplicaHost> {
        Arc::new(LocalSeat {
            group: self.clone(),
            id,
        })
    }

    /// What the live replicas last reported, by id.
    pub fn statuses(&self) -> Vec<Option<ReplicaStatus>> {
        self.statuses.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The Conductor over the replicas' reports: elects among the live
    /// ones when the named leader is not live.
    pub fn elect_reported(&self) -> Option<GroupState> {
        let candidates: Vec<Candidate> = self
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .map(ReplicaStatus::candidate)
            .collect();
        self.elect_among(&candidates)
    }

    pub fn state(&self) -> GroupState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Compare-and-set of the node; every replica's driver is told the new
    /// state (a watch).
    pub fn cas(&self, expected: u64, mut state: GroupState) -> CasOutcome {
        let mut current = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if current.version != expected {
            return CasOutcome::Failed;
        }
        state.version = expected + 1;
        let incarnations = self.incarnations.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(e) = self.keep(&state, &incarnations) {
            // Not durable, not written: the writer asks again.
            tracing::warn!("task group state not written: {e}");
            return CasOutcome::Unknown;
        }
        *current = state.clone();
        for tx in self.inboxes.lock().unwrap_or_else(|p| p.into_inner()).iter().flatten() {
            let _ = tx.try_send(Input::Group(state.clone()));
        }
        CasOutcome::Written(state)
    }

    /// Cuts replica `id`'s outgoing messages (it still hears the others
    /// and the metastore), or heals the cut.
    pub fn cut(&self, id: ReplicaId, cut: bool) {
        self.cut[id as usize].store(cut, Ordering::SeqCst);
    }

    /// The Conductor: elects among `live` when the named leader is not one
    /// of them. Returns the new state if it changed.
    pub fn elect(&self, live: &[&LocalReplica]) -> Option<GroupState> {
        let candidates: Vec<Candidate> = live.iter().map(|r| r.status().candidate()).collect();
        self.elect_among(&candidates)
    }

    fn elect_among(&self, candidates: &[Candidate]) -> Option<GroupState> {
        let current = self.state();
        let next = elect(&current, candidates)?;
        match self.cas(current.version, next) {
            CasOutcome::Written(state) => Some(state),
            _ => None,
        }
    }

    fn attach(&self, id: ReplicaId, inbox: flume::Sender<Input>) {
        self.inboxes.lock().unwrap_or_else(|p| p.into_inner())[id as usize] = Some(inbox.clone());
        let _ = inbox.try_send(Input::Group(self.state()));
    }

    fn detach(&self, id: ReplicaId) {
        self.inboxes.lock().unwrap_or_else(|p| p.into_inner())[id as usize] = None;
    }

    fn send(&self, from: ReplicaId, to: ReplicaId, message: Message) {
        if self.cut[from as usize].load(Ordering::SeqCst) {
            return;
        }
        let tx = self
            .inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(to as usize)
            .cloned()
            .flatten();
        if let Some(tx) = tx {
            let _ = tx.try_send(Input::Message { from, message });
        }
    }
}

/// A replica's place in a [`LocalGroup`].
struct LocalSeat {
    group: Arc<LocalGroup>,
    id: ReplicaId,
}

impl ReplicaHost for LocalSeat {
    fn begin(&self, inbox: flume::Sender<Input>, fresh: bool) -> Result<(u64, bool)> {
        let incarnation = {
            let state = self.group.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut i = self.group.incarnations.lock().unwrap_or_else(|p| p.into_inner());
            let mut next = i.clone();
            next[self.id as usize] += 1;
            self.group.keep(&state, &next)?;
            *i = next;
            i[self.id as usize]
        };
        // An empty directory of a group that already had a leader: the
        // data it held is gone.
        let lost = fresh && self.group.state().epoch > 0;
        self.group.attach(self.id, inbox);
        Ok((incarnation, lost))
    }

    fn report(&self, status: ReplicaStatus) {
        self.group.statuses.lock().unwrap_or_else(|p| p.into_inner())[self.id as usize] = Some(status);
        self.group.elect_reported();
    }

    fn send(&self, to: ReplicaId, message: Message) {
        self.group.send(self.id, to, message);
    }

    fn metastore(&self) -> Box<dyn GroupMetastore> {
        Box::new(Client(self.group.clone()))
    }

    fn end(&self) {
        self.group.detach(self.id);
        self.group.statuses.lock().unwrap_or_else(|p| p.into_inner())[self.id as usize] = None;
        self.group.elect_reported();
    }
}

struct Client(Arc<LocalGroup>);

impl GroupMetastore for Client {
    fn cas(&self, expected_version: u64, state: GroupState) -> Pin<Box<dyn Future<Output = CasOutcome> + '_>> {
        let outcome = self.0.cas(expected_version, state);
        Box::pin(async move { outcome })
    }
}

/// What a replica says of itself.
pub type LocalStatus = ReplicaStatus;

type Job = Box<dyn FnOnce(Store, Driver) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// One replica on a task thread of its own.
pub struct LocalReplica {
    id: ReplicaId,
    /// Why the driver stopped by itself, if it did.
    failure: Arc<Mutex<Option<String>>>,
    jobs: Option<flume::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for LocalReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalReplica")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl LocalReplica {
    /// Starts replica `id` of `group` in incarnation `incarnation` over
    /// the store in `dir` (opened applying nothing past its tables: the
    /// core learns the applied offset from the leader).
    pub fn start(
        group: Arc<LocalGroup>,
        id: ReplicaId,
        incarnation: u64,
        dir: PathBuf,
        lsm: LsmConfig,
        settings: Settings,
    ) -> Result<LocalReplica> {
        let (jobs, rx) = flume::bounded::<Job>(1024);
        let (ready_tx, ready) = flume::bounded::<Result<()>>(1);
        let failure = Arc::new(Mutex::new(None));
        let failed_with = failure.clone();
        let thread = std::thread::Builder::new()
            .name(format!("replica-{id}"))
            .spawn(move || {
                let failed = ready_tx.clone();
                let ran = ExecutorConfig::default().block_on(async move {
                    let opened = async {
                        let (store, _) = Store::open_limited(&dir, lsm, 0).await?;
                        let recovered = recover(&store, false).await?;
                        Ok::<_, Error>((store, recovered))
                    }
                    .await;
                    let (store, recovered) = match opened {
                        Ok(v) => v,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let core = Replica::new(id, incarnation, settings, recovered);
                    let sender = group.clone();
                    let driver = Driver::new(
                        store.clone(),
                        core,
                        Box::new(move |to, message| sender.send(id, to, message)),
                        Box::new(Client(group.clone())),
                        Box::new(|_| {}),
                        DriverSettings::default(),
                    );
                    group.attach(id, driver.inbox());
                    let running = glommio::spawn_local({
                        let driver = driver.clone();
                        let group = group.clone();
                        async move {
                            if let Err(e) = driver.run().await {
                                // Stopped by itself: no longer a member anyone hears.
                                group.detach(id);
                                *failed_with.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                            }
                        }
                    })
                    .detach();
                    let _ = ready_tx.send(Ok(()));
                    while let Ok(job) = rx.recv_async().await {
                        glommio::spawn_local(job(store.clone(), driver.clone())).detach();
                    }
                    // Killed: no clean close (what is durable stays).
                    group.detach(id);
                    driver.stop();
                    running.cancel();
                });
                if let Err(e) = ran {
                    let _ = failed.send(Err(e));
                }
            })
            .map_err(|e| Error::Executor(format!("cannot start replica {id}'s thread: {e}")))?;
        ready
            .recv()
            .map_err(|_| Error::Executor(format!("replica {id}'s thread ended while starting")))??;
        Ok(LocalReplica {
            id,
            failure,
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// Why the replica's driver stopped by itself (its log failed a write,
    /// or a rule would break), if it did: it must be started again.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` on the replica's thread with its store and driver; returns
    /// its answer.
    pub fn on<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Store, Driver) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (tx, rx) = flume::bounded(1);
        let job: Job = Box::new(move |store, driver| {
            Box::pin(async move {
                let _ = tx.send(f(store, driver).await);
            })
        });
        self.jobs
            .as_ref()
            .expect("running")
            .send(job)
            .expect("the replica's thread takes jobs");
        rx.recv().expect("the replica answers")
    }

    pub fn status(&self) -> LocalStatus {
        self.on(|_, driver| async move { driver.status() })
    }

    /// Ends the replica as a kill would: what is durable stays, nothing is
    /// closed cleanly.
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for LocalReplica {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
