//! Runs a [`Replica`] on a task thread over its store: the part of
//! replication that performs.
//!
//! The task group's log is the store's WAL. The driver feeds the core its
//! inputs (messages from peers, the metastore node as read or watched,
//! ticks, how far the WAL is durable, written compare-and-sets) and
//! carries out its actions in order:
//!
//! - the leader's own writes (PState batches, depot appends) pass the
//!   store's append gate, which asks the core at the moment a record
//!   takes its WAL offset: a replica that does not lead, or a stalled
//!   group, refuses it before anything is written, and the record gets
//!   the leader's epoch;
//! - `SendEntries` waits until the entries are durable here, reads them
//!   from the WAL and sends them (followers only ever hold what the leader
//!   holds durably);
//! - `Write` goes to [`Store::enqueue_replicated`] at the leader's offsets
//!   and epochs, `Truncate` to [`Store::truncate`];
//! - `Apply` moves the store's apply limit: entries become visible,
//!   acknowledged and consumed only then;
//! - `Cas` is retried while its outcome is unknown;
//! - `SteppedDown` ends the wait of the writes not yet applied with an
//!   unknown outcome ([`Store::abandon_unapplied`]).
//!
//! Peers and the metastore are behind two small seams (a send function
//! and [`GroupMetastore`]), so the same driver runs over the worker's
//! peer links and ZooKeeper, and in-process in tests.
//!
//! Not here yet: far-horizon catch-up (snapshots of the task group's
//! files). A leader asked for entries it trimmed reports
//! [`Event::SnapshotNeeded`] and sends nothing.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{Action, Entry, Epoch, EpochHistory, GroupState, Input, Message, Offset, Recovered, Replica, ReplicaId};
use crate::error::{Error, Result};
use crate::lsm::Store;
use crate::sync::Waiters;

/// What a compare-and-set of the group's metastore node came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written: the state with its new version.
    Written(GroupState),
    /// Not written: the node has a newer version (a watch brings it).
    Failed,
    /// Unknown (the connection dropped): the driver asks again.
    Unknown,
}

/// The group's metastore node, as the driver writes it.
pub trait GroupMetastore {
    fn cas(&self, expected_version: u64, state: GroupState) -> Pin<Box<dyn Future<Output = CasOutcome> + '_>>;
}

/// What the driver tells the task thread that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This replica leads `epoch` (it serves once [`Driver::serving`]).
    BecameLeader { epoch: Epoch },
    /// It stopped leading: writes not yet applied have an unknown outcome.
    SteppedDown { epoch: Epoch },
    /// A follower needs the task group's files (far-horizon catch-up,
    /// not built yet); it gets nothing.
    SnapshotNeeded { to: ReplicaId },
    /// The replica stopped on a broken rule; its session must end.
    Fatal { reason: String },
}

/// What a replica says of itself: for elections (its registration) and
/// for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub member: super::Member,
    pub leader: bool,
    pub serving: bool,
    /// Its data was lost and the metastore does not say so yet: never
    /// elected meanwhile.
    pub lost_data: bool,
    pub epoch: Epoch,
    pub last_epoch: Epoch,
    pub log_end: Offset,
    pub applied: Offset,
    /// Why appends are refused while it leads (below min-ISR), if they are.
    pub stalled: Option<String>,
}

impl ReplicaStatus {
    /// As a candidate of an election.
    pub fn candidate(&self) -> super::Candidate {
        super::Candidate {
            member: self.member,
            lost_data: self.lost_data,
            last_epoch: self.last_epoch,
            log_end: self.log_end,
        }
    }
}

/// Where a replica of a task group lives: its peers, its metastore node
/// and its registration. One per replica; its incarnations come and go
/// (a task thread restarts its replica after a failure or a step-down).
pub trait ReplicaHost: Send + Sync {
    /// Starts a new incarnation (strictly greater than any before):
    /// registers it as live, and from now on delivers the group's
    /// metastore node (read now, then watched) and peers' messages to
    /// `inbox`. `lost_data`: its directory was found empty; the host
    /// says whether the group had data before (then the replica lost it).
    fn begin(&self, inbox: flume::Sender<Input>, fresh: bool) -> Result<(super::Incarnation, bool)>;
    /// What the replica says of itself now (elections read it).
    fn report(&self, status: ReplicaStatus);
    /// Hands a message to replica `to` (it may be dropped: the protocol
    /// resends).
    fn send(&self, to: ReplicaId, message: Message);
    /// The group's metastore node as the driver writes it (made on the
    /// replica's thread).
    fn metastore(&self) -> Box<dyn GroupMetastore>;
    /// Ends the incarnation: it is no longer live.
    fn end(&self);
}

/// Driver settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverSettings {
    /// How often the core is told the time.
    pub tick: Duration,
    /// At most this many bytes of entries in one answer to a fetch.
    pub fetch_bytes_max: usize,
    /// Inputs queued for the driver; beyond it, peers' messages and ticks
    /// are dropped (the protocol resends), never the driver's own results.
    pub inbox_max: usize,
}

impl Default for DriverSettings {
    fn default() -> DriverSettings {
        DriverSettings {
            tick: Duration::from_millis(20),
            fetch_bytes_max: 1 << 20,
            inbox_max: 4096,
        }
    }
}

/// What a store holds, as the core's [`Recovered`]: the WAL's range and
/// the epochs of its records (read through once), and the applied end.
/// `lost_data` is the caller's to say (a replica whose data is gone).
pub async fn recover(store: &Store, lost_data: bool) -> Result<Recovered> {
    let wal = store.wal();
    let (start, end) = (wal.start_offset(), wal.end_offset());
    let mut history = EpochHistory::default();
    let mut next = start;
    while next < end {
        let records = wal.read(next, end, 4 << 20).await?;
        let Some(last) = records.last() else { break };
        next = last.offset + 1;
        for record in &records {
            history.note(record.epoch, record.offset);
        }
    }
    Ok(Recovered {
        log_start: start,
        log_end: end,
        history,
        applied: store.applied_end().min(end),
        lost_data,
    })
}

/// Runs one replica. Cheap to clone; clones share it.
#[derive(Clone)]
pub struct Driver {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("core", &self.inner.core)
            .finish_non_exhaustive()
    }
}

struct Inner {
    core: RefCell<Replica>,
    store: Store,
    send: Box<dyn Fn(ReplicaId, Message)>,
    meta: Box<dyn GroupMetastore>,
    events: Box<dyn Fn(Event)>,
    settings: DriverSettings,
    inbox: flume::Sender<Input>,
    inbox_rx: flume::Receiver<Input>,
    started: Instant,
    /// The WAL end last told to the core as durable.
    reported: Cell<Offset>,
    /// The WAL end the core wrote or appended up to.
    wanted: Cell<Offset>,
    wake: Waiters,
    stopped: Cell<bool>,
    /// A tick for the gate's appends is queued and not yet taken.
    poked: Cell<bool>,
    /// The WAL's writer generation the core's log was built on: a failed
    /// write loses queued entries and a later record takes their offsets,
    /// so a change means the replica must start over.
    generation: u64,
}

impl Driver {
    /// A driver for `core` over `store`. `send` hands a message to the
    /// peer link of a replica (it may drop it: the protocol resends);
    /// inputs from outside (peers' messages, metastore reads and watches,
    /// session changes) go to [`Driver::inbox`].
    pub fn new(
        store: Store,
        core: Replica,
        send: Box<dyn Fn(ReplicaId, Message)>,
        meta: Box<dyn GroupMetastore>,
        events: Box<dyn Fn(Event)>,
        settings: DriverSettings,
    ) -> Driver {
        let (inbox, inbox_rx) = flume::bounded(settings.inbox_max);
        store.set_apply_limit(core.applied());
        let generation = store.generation();
        let durable = core.durable_end();
        let driver = Driver {
            inner: Rc::new(Inner {
                core: RefCell::new(core),
                store,
                send,
                meta,
                events,
                settings,
                inbox,
                inbox_rx,
                started: Instant::now(),
                reported: Cell::new(durable),
                wanted: Cell::new(durable),
                wake: Waiters::default(),
                stopped: Cell::new(false),
                poked: Cell::new(false),
                generation,
            }),
        };
        let gate = Rc::downgrade(&driver.inner);
        driver.inner.store.set_append_gate(Rc::new(move |placed| {
            let inner = gate
                .upgrade()
                .ok_or_else(|| Error::Unavailable("the task group's replica has stopped".into()))?;
            inner.gate(placed)
        }));
        driver
    }

    /// Where peers' messages, metastore states and session changes go.
    pub fn inbox(&self) -> flume::Sender<Input> {
        self.inner.inbox.clone()
    }

    pub fn member(&self) -> super::Member {
        self.inner.core.borrow().member()
    }

    pub fn status(&self) -> ReplicaStatus {
        let core = self.inner.core.borrow();
        ReplicaStatus {
            member: core.member(),
            leader: core.is_leader(),
            serving: core.serving(),
            lost_data: core.lost_data(),
            epoch: core.epoch(),
            last_epoch: core.history().last_epoch(),
            log_end: core.durable_end(),
            applied: core.applied(),
            stalled: core.stalled().map(|r| r.to_string()),
        }
    }

    /// The lowest offset a follower still needs (see
    /// [`Replica::retain_from`]).
    pub fn retain_from(&self) -> Option<Offset> {
        self.inner.core.borrow().retain_from()
    }

    /// The group's node as this replica last read it.
    pub fn group(&self) -> Option<GroupState> {
        self.inner.core.borrow().group().cloned()
    }

    pub fn is_leader(&self) -> bool {
        self.inner.core.borrow().is_leader()
    }

    /// Leads and has applied everything it held when it took over: it may
    /// serve reads and run processing.
    pub fn serving(&self) -> bool {
        self.inner.core.borrow().serving()
    }

    pub fn applied(&self) -> Offset {
        self.inner.core.borrow().applied()
    }

    pub fn epoch(&self) -> Epoch {
        self.inner.core.borrow().epoch()
    }

    /// What the replica's registration says for elections: the epoch of
    /// its last entry and its durable log end.
    pub fn log_state(&self) -> (Epoch, Offset) {
        let core = self.inner.core.borrow();
        (core.history().last_epoch(), core.durable_end())
    }

    /// Runs until [`Driver::stop`] or a failure the replica cannot go on
    /// from (a write of the log failed, or a broken rule): the owner then
    /// reopens the task thread.
    pub async fn run(&self) -> Result<()> {
        let inner = &self.inner;
        let ticker = glommio::spawn_local({
            let inner = Rc::downgrade(inner);
            let every = inner.upgrade().map_or(Duration::from_millis(20), |i| i.settings.tick);
            async move {
                loop {
                    glommio::timer::sleep(every).await;
                    let Some(inner) = inner.upgrade() else { return };
                    if inner.stopped.get() {
                        return;
                    }
                    let _ = inner.inbox.try_send(Input::Tick { now: inner.now() });
                }
            }
        })
        .detach();
        let watcher = glommio::spawn_local(watch_durable(Rc::downgrade(inner))).detach();
        let result = self.serve().await;
        inner.stopped.set(true);
        inner.wake.wake_all();
        ticker.cancel();
        watcher.cancel();
        result
    }

    /// Stops [`Driver::run`] after the input it is on.
    pub fn stop(&self) {
        self.inner.stopped.set(true);
        self.inner.wake.wake_all();
        let _ = self.inner.inbox.try_send(Input::Tick { now: self.inner.now() });
    }

    async fn serve(&self) -> Result<()> {
        let inner = &self.inner;
        while !inner.stopped.get() {
            let Ok(input) = inner.inbox_rx.recv_async().await else {
                return Ok(());
            };
            inner.check_generation()?;
            inner.poked.set(false);
            let durable = inner.store.wal().end_offset();
            let mut actions = Vec::new();
            if durable > inner.reported.get() {
                inner.reported.set(durable);
                actions.extend(inner.core.borrow_mut().step(Input::Durable { end: durable }));
            }
            actions.extend(inner.core.borrow_mut().step(input));
            for action in actions {
                inner.perform(action).await?;
            }
        }
        Ok(())
    }
}

impl Inner {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Fails once the WAL lost queued entries (a failed write): the core
    /// counted them, and a leader that went on in its epoch could give
    /// two entries one (epoch, offset). The owner restarts the replica (a
    /// new incarnation, elected again if it should be).
    fn check_generation(&self) -> Result<()> {
        self.check_generation_is(self.store.generation())
    }

    fn check_generation_is(&self, generation: u64) -> Result<()> {
        if generation != self.generation {
            self.stopped.set(true);
            return Err(Error::Unavailable(
                "the task group log lost queued writes in a failed write; its replica restarts".into(),
            ));
        }
        Ok(())
    }

    /// The append gate: the core places the record (or refuses it). Runs
    /// inside the WAL's placement step: it must not touch the WAL.
    fn gate(&self, placed: crate::log::Placed) -> Result<u32> {
        self.check_generation_is(placed.generation)?;
        let offset = placed.offset;
        let mut core = self.core.borrow_mut();
        let (epoch, at) = core
            .append()
            .map_err(|refused| Error::Unavailable(refused.to_string()))?;
        if at != offset {
            return Err(Error::Unavailable(format!(
                "the replica's log is out of step with its WAL (entry {at}, WAL offset {offset}); the task group \
                 restarts its replica"
            )));
        }
        self.wanted.set(self.wanted.get().max(at + 1));
        // Fetches parked at the log end are answered by the next input.
        if !self.poked.replace(true) {
            let _ = self.inbox.try_send(Input::Tick { now: self.now() });
        }
        self.wake.wake_all();
        Ok(epoch)
    }

    async fn perform(self: &Rc<Self>, action: Action) -> Result<()> {
        match action {
            Action::Send { to, message } => (self.send)(to, message),
            Action::SendEntries {
                to,
                epoch,
                fetch_id,
                from,
                upto,
                applied,
            } => {
                let inner = self.clone();
                glommio::spawn_local(async move {
                    let wal = inner.store.wal();
                    if wal.wait_durable(upto).await.is_err() {
                        // Not durable here: not sent (the follower asks again).
                        return;
                    }
                    let Ok(records) = wal.read(from, upto, inner.settings.fetch_bytes_max).await else {
                        return;
                    };
                    let entries = records
                        .into_iter()
                        .map(|r| Entry {
                            epoch: r.epoch,
                            offset: r.offset,
                            data: r.payload,
                        })
                        .collect();
                    (inner.send)(
                        to,
                        Message::Entries {
                            epoch,
                            fetch_id,
                            from,
                            entries,
                            applied,
                        },
                    );
                })
                .detach();
            }
            Action::SendSnapshot { to, .. } => (self.events)(Event::SnapshotNeeded { to }),
            Action::Write { entries } => {
                let Some(last) = entries.last() else { return Ok(()) };
                let end = last.offset + 1;
                for run in entries.chunk_by(|a, b| a.epoch == b.epoch) {
                    let records: Vec<&[u8]> = run.iter().map(|e| e.data.as_slice()).collect();
                    // Durability is watched, not waited for here: the
                    // next fetch goes once it is (the core holds it back).
                    let _queued = self
                        .store
                        .enqueue_replicated(run[0].epoch, run[0].offset, &records)
                        .await?;
                }
                self.wanted.set(self.wanted.get().max(end));
                self.wake.wake_all();
            }
            Action::Truncate { to } => {
                self.store.truncate(to).await?;
                self.reported.set(self.reported.get().min(to));
                self.wanted.set(self.wanted.get().min(to));
            }
            Action::Install { .. } => {
                // Only a leader's Snapshot asks for it, and no leader sends
                // one yet (see the module's note): nothing to install.
                (self.events)(Event::SnapshotNeeded {
                    to: self.core.borrow().id(),
                });
            }
            Action::Apply { upto } => self.store.set_apply_limit(upto),
            Action::Cas {
                expected_version,
                state,
            } => {
                let inner = self.clone();
                glommio::spawn_local(async move {
                    loop {
                        match inner.meta.cas(expected_version, state.clone()).await {
                            CasOutcome::Written(written) => {
                                let _ = inner.inbox.send_async(Input::CasWritten(written)).await;
                                return;
                            }
                            CasOutcome::Failed => return,
                            CasOutcome::Unknown => {
                                if inner.stopped.get() {
                                    return;
                                }
                                glommio::timer::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
                .detach();
            }
            Action::BecameLeader { epoch } => (self.events)(Event::BecameLeader { epoch }),
            Action::SteppedDown { epoch } => {
                self.store.abandon_unapplied();
                (self.events)(Event::SteppedDown { epoch });
            }
            Action::Fatal { reason } => {
                (self.events)(Event::Fatal { reason: reason.clone() });
                return Err(Error::Unavailable(format!(
                    "the task group's replica stopped: {reason}"
                )));
            }
        }
        Ok(())
    }
}

/// Tells the driver when the WAL's durable end passes what it last
/// reported (after a follower's writes or a leader's appends).
async fn watch_durable(inner: std::rc::Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        if strong.stopped.get() {
            return;
        }
        let wal = strong.store.wal().clone();
        let (wanted, have) = (strong.wanted.get(), wal.end_offset());
        if have > strong.reported.get() {
            let _ = strong.inbox.try_send(Input::Tick { now: strong.now() });
        }
        if have >= wanted {
            let wake = Rc::clone(&strong);
            drop(strong);
            wake.wake
                .wait(|| (wake.stopped.get() || wake.wanted.get() > wake.store.wal().end_offset()).then_some(()))
                .await;
        } else {
            drop(strong);
            if wal.wait_durable(wanted).await.is_err() {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
