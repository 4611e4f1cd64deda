//! Replication of a task group's log (the replog) to replicas on other
//! nodes: the decision core, written without I/O.
//!
//! The design (BRIEF.md, issue 13) is ISR-style log shipping. Each task
//! group has `RF` replicas; the metastore keeps one [`GroupState`] per task
//! group (leader, epoch, ISR, OSR), changed only by compare-and-set. The
//! leader takes appends, followers *pull* entries with [`Message::Fetch`],
//! store them durably and report, with their next fetch, how far they hold
//! the leader's log. An entry is **applied** (visible, acknowledged,
//! consumed) once every member of the ISR holds it durably and the ISR has
//! at least `min_isr` members.
//!
//! This module decides; it performs nothing. A [`Replica`] takes
//! [`Input`]s (messages, timer ticks, metastore changes, completed writes)
//! and answers with [`Action`]s (messages to send, entries to write, a
//! truncation, an offset to apply up to, a compare-and-set to try). The
//! same code runs in the deterministic simulation (`engine/tests/
//! replication_sim.rs`: simulated network, disks, crashes and metastore,
//! many seeds) and, driven by a task thread, in a worker. [`elect`] is the
//! Conductor's part: who leads after a leader's session is gone.
//!
//! Rules the core keeps (each one answers a known way to lose data):
//! - Every message carries the sender's epoch; a replica answers a lower
//!   one with [`Message::Fenced`] and a leader that sees a higher one steps
//!   down, so an old leader that wakes up (SIGSTOP, partition) cannot have
//!   anything applied: applying needs every ISR member's fetch in its epoch.
//! - A replica acts as leader only for a [`GroupState`] naming its
//!   *incarnation* (its metastore session): after a restart or a lost
//!   session it never resumes an epoch it led before (its unsynced tail
//!   may be gone while followers hold it).
//! - Only ISR members with intact data are elected ([`elect`]); never an
//!   OSR replica.
//! - Followers truncate by epoch (Kafka KIP-101/KIP-279): a fetch names
//!   the epoch of the follower's last entry; the leader answers
//!   [`Message::Diverging`] with the end of that epoch in its own log, the
//!   follower truncates to the smaller of both ends and fetches again,
//!   as often as needed; never to its applied offset alone. A truncation
//!   below the applied offset is refused ([`Action::Fatal`]).
//! - While an ISR change is being written the leader counts the larger of
//!   the old and new ISR (an added member must hold what is applied from
//!   then on; a removed one still counts until the metastore says so).
//! - A replica whose data was lost (wiped directory) says so in its
//!   registration (never elected meanwhile) and moves itself to the OSR
//!   by its own compare-and-set, even below `min_isr`; the fact then lives
//!   in the metastore (it survives another crash of the replica), and only
//!   a leader's move back into the ISR, after the replica caught up in
//!   that leader's epoch, ends it. A follower's progress counts only from
//!   fetches of its current incarnation.
//! - A compare-and-set whose outcome is unknown (the connection dropped)
//!   is retried by the driver until it succeeds or fails for certain; a
//!   leader keeps counting the union of the old and proposed ISR until it
//!   sees a newer state, whatever the answer was.
//! - Incarnations strictly increase per replica across restarts (in a
//!   worker: the creation zxid of its registration node), so no fetch or
//!   leadership of an earlier process can pass for a later one.

mod controller;
pub mod driver;
pub mod local;
mod replica;

pub use controller::{elect, hand_off, Candidate};
pub use replica::{Recovered, Refused, Replica, Settings};

/// Offset of an entry in a task group's log.
pub type Offset = u64;
/// A leader epoch; epoch 0 is "no leader yet". Every new leader gets a
/// higher one.
pub type Epoch = u32;
/// A replica of a task group (its place in the group's replica list).
pub type ReplicaId = u32;
/// One metastore session of a replica's worker: a restart or a lost
/// session gives a new one.
pub type Incarnation = u64;

/// A replica in one incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: ReplicaId,
    pub incarnation: Incarnation,
}

/// The metastore node of one task group.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupState {
    /// The metastore's version of the node (the compare-and-set token).
    pub version: u64,
    pub epoch: Epoch,
    pub leader: Option<Member>,
    /// In-sync replicas: each holds every applied entry.
    pub isr: Vec<ReplicaId>,
    /// Out-of-sync replicas: catching up, never elected.
    pub osr: Vec<ReplicaId>,
}

impl GroupState {
    /// The state of a new task group: no leader yet, every replica in sync
    /// (all are empty).
    pub fn new(replicas: impl IntoIterator<Item = ReplicaId>) -> GroupState {
        GroupState {
            version: 0,
            epoch: 0,
            leader: None,
            isr: replicas.into_iter().collect(),
            osr: Vec::new(),
        }
    }

    pub fn replicas(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.isr.iter().chain(self.osr.iter()).copied()
    }

    pub fn in_isr(&self, id: ReplicaId) -> bool {
        self.isr.contains(&id)
    }

    /// This state with `id` moved from the OSR to the ISR or back.
    fn moved(&self, id: ReplicaId, to_isr: bool) -> GroupState {
        let mut next = self.clone();
        next.isr.retain(|r| *r != id);
        next.osr.retain(|r| *r != id);
        if to_isr {
            next.isr.push(id);
            next.isr.sort_unstable();
        } else {
            next.osr.push(id);
            next.osr.sort_unstable();
        }
        next
    }
}

/// One entry of a task group's log. `data` is opaque here (in a worker:
/// the replog frame's bytes).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Entry {
    pub epoch: Epoch,
    pub offset: Offset,
    pub data: Vec<u8>,
}

/// Messages between the replicas of one task group (between workers:
/// archived with rkyv inside `wire::PeerMessage::Replica`).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Message {
    /// Follower to leader: "send me entries from `from`; the entry before
    /// it is of `last_epoch`". Sent only when everything below `from` is
    /// durable, so it also reports what the follower holds.
    Fetch {
        epoch: Epoch,
        /// The follower's incarnation: fetches of an earlier process (late
        /// or duplicated on the way) are ignored, and a new one starts the
        /// follower's progress afresh.
        incarnation: Incarnation,
        /// Increasing per incarnation: an older fetch arriving late is ignored.
        fetch_id: u64,
        from: Offset,
        last_epoch: Epoch,
        /// The version of the group's metastore node the follower last
        /// read. A leader moves it into the ISR only on a fetch that saw
        /// the version its compare-and-set expects: a replica that lost
        /// its data since has written a newer version itself, so nothing
        /// its earlier process held can vouch for it.
        seen_version: u64,
        /// The follower's applied offset: a fetch at the leader's log end
        /// waits there for new entries only when the follower already
        /// applied all it could (else the answer carrying the leader's
        /// applied offset, once lost, would never come again).
        applied: Offset,
    },
    /// Leader to follower: entries from `from` (possibly none), and the
    /// leader's applied offset.
    Entries {
        epoch: Epoch,
        fetch_id: u64,
        from: Offset,
        entries: Vec<Entry>,
        applied: Offset,
    },
    /// Leader to follower: your last entry's epoch ends at `end` in my log
    /// (`at_epoch` is the largest epoch I have at or below it).
    Diverging {
        epoch: Epoch,
        fetch_id: u64,
        at_epoch: Epoch,
        end: Offset,
    },
    /// Leader to follower: the task group's files as of `upto` (far-horizon
    /// catch-up), with the epochs of the log below it.
    Snapshot {
        epoch: Epoch,
        fetch_id: u64,
        upto: Offset,
        history: Vec<(Epoch, Offset)>,
        data: Vec<u8>,
    },
    /// Your epoch is older than mine.
    Fenced { epoch: Epoch },
}

impl Message {
    pub fn epoch(&self) -> Epoch {
        match self {
            Message::Fetch { epoch, .. }
            | Message::Entries { epoch, .. }
            | Message::Diverging { epoch, .. }
            | Message::Snapshot { epoch, .. }
            | Message::Fenced { epoch } => *epoch,
        }
    }
}

/// What a replica is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Time passed (milliseconds on the driver's monotonic clock).
    Tick {
        now: u64,
    },
    /// The metastore node of the task group, as read or watched.
    Group(GroupState),
    /// A compare-and-set this replica asked for was written: the state as
    /// written, with its new version. (One that failed needs no input: it
    /// failed because the node has a newer version, which arrives as
    /// [`Input::Group`]; one with an unknown outcome the driver retries
    /// until it knows.)
    CasWritten(GroupState),
    /// The metastore session ended, or the driver lost touch with the
    /// metastore for two thirds of the session timeout (its lease: the
    /// session may expire and another leader be elected by the time it
    /// knows): stop acting as leader. A driver that gave up its lease
    /// closes the session; a new session is a new incarnation.
    SessionLost,
    /// A new metastore session.
    NewSession {
        incarnation: Incarnation,
    },
    Message {
        from: ReplicaId,
        message: Message,
    },
    /// Everything below `end` is durable in the local log.
    Durable {
        end: Offset,
    },
    /// A snapshot from [`Action::Install`] is in place and durable.
    Installed {
        upto: Offset,
    },
    /// The driver trimmed the local log below `start` (at most the applied
    /// offset).
    Trimmed {
        start: Offset,
    },
}

/// What a replica asks its driver to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        to: ReplicaId,
        message: Message,
    },
    /// Read entries `[from, upto)` from the local log and send them as
    /// [`Message::Entries`] with these fields.
    SendEntries {
        to: ReplicaId,
        epoch: Epoch,
        fetch_id: u64,
        from: Offset,
        upto: Offset,
        applied: Offset,
    },
    /// Send the task group's files as of the local applied offset as
    /// [`Message::Snapshot`] (with the epochs of the log below it).
    SendSnapshot {
        to: ReplicaId,
        epoch: Epoch,
        fetch_id: u64,
    },
    /// Write these entries after the local log's end (they follow it).
    Write {
        entries: Vec<Entry>,
    },
    /// Remove the local log's entries at and past `to`, durably, before
    /// anything else is written.
    Truncate {
        to: Offset,
    },
    /// Replace the task group's files with this snapshot as of `upto`;
    /// answer with [`Input::Installed`].
    Install {
        upto: Offset,
        history: Vec<(Epoch, Offset)>,
        data: Vec<u8>,
    },
    /// Entries below `upto` are applied: make them visible, answer their
    /// appenders, let topologies consume them.
    Apply {
        upto: Offset,
    },
    /// Try to change the metastore node from `expected_version` to `state`;
    /// on success answer with [`Input::CasWritten`]. An unknown outcome
    /// (connection loss) is retried with the same expected version until
    /// it succeeds or fails.
    Cas {
        expected_version: u64,
        state: GroupState,
    },
    /// This replica now leads `epoch`.
    BecameLeader {
        epoch: Epoch,
    },
    /// This replica stopped leading `epoch`: appends not yet applied have
    /// an unknown outcome.
    SteppedDown {
        epoch: Epoch,
    },
    /// A rule would be broken (a truncation below the applied offset): the
    /// replica stops; its data needs an operator. The driver ends the
    /// replica's metastore session (so another replica is elected) and
    /// does not start it again by itself.
    Fatal {
        reason: String,
    },
}

/// The epochs of a log: `(epoch, first offset)` in increasing order of
/// both. Kept for the whole log, also below its trimmed start (a
/// snapshot carries it), so any offset's epoch is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochHistory {
    starts: Vec<(Epoch, Offset)>,
}

impl EpochHistory {
    pub fn from_starts(starts: Vec<(Epoch, Offset)>) -> EpochHistory {
        debug_assert!(starts.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        EpochHistory { starts }
    }

    /// The history of a log holding these entries' epochs, in offset order.
    pub fn of_entries<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> EpochHistory {
        let mut history = EpochHistory::default();
        for entry in entries {
            history.note(entry.epoch, entry.offset);
        }
        history
    }

    pub fn starts(&self) -> &[(Epoch, Offset)] {
        &self.starts
    }

    /// Records that `offset` holds an entry of `epoch` (a new epoch starts
    /// there when it is newer than the last one).
    pub fn note(&mut self, epoch: Epoch, offset: Offset) {
        match self.starts.last() {
            Some(&(last, _)) if last >= epoch => {}
            _ => self.starts.push((epoch, offset)),
        }
    }

    /// The epoch of the entry at `offset` (0 if before every epoch).
    pub fn epoch_of(&self, offset: Offset) -> Epoch {
        self.starts
            .iter()
            .rev()
            .find(|(_, start)| *start <= offset)
            .map_or(0, |(epoch, _)| *epoch)
    }

    /// The largest epoch at or below `epoch` in this log and the offset
    /// where it ends (the next epoch's start, or `log_end`). `(0, 0)`
    /// when the log has no epoch that old.
    pub fn end_for(&self, epoch: Epoch, log_end: Offset) -> (Epoch, Offset) {
        let Some(i) = self.starts.iter().rposition(|(e, _)| *e <= epoch) else {
            return (0, 0);
        };
        let end = self.starts.get(i + 1).map_or(log_end, |(_, start)| *start);
        (self.starts[i].0, end.min(log_end))
    }

    /// Forgets epochs that start at or after `to` (a truncation).
    pub fn truncate(&mut self, to: Offset) {
        self.starts.retain(|(_, start)| *start < to);
    }

    pub fn last_epoch(&self) -> Epoch {
        self.starts.last().map_or(0, |(epoch, _)| *epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_ends_where_the_next_one_starts_or_at_the_log_end() {
        let history = EpochHistory::from_starts(vec![(1, 0), (3, 10), (4, 15)]);
        assert_eq!(history.epoch_of(0), 1);
        assert_eq!(history.epoch_of(9), 1);
        assert_eq!(history.epoch_of(10), 3);
        assert_eq!(history.epoch_of(20), 4);
        assert_eq!(history.end_for(1, 20), (1, 10));
        assert_eq!(
            history.end_for(2, 20),
            (1, 10),
            "epoch 2 is not here: the one before it"
        );
        assert_eq!(history.end_for(3, 20), (3, 15));
        assert_eq!(history.end_for(4, 20), (4, 20));
        assert_eq!(history.end_for(9, 20), (4, 20));
        assert_eq!(history.end_for(0, 20), (0, 0));
        let mut cut = history.clone();
        cut.truncate(15);
        assert_eq!(cut.starts(), &[(1, 0), (3, 10)]);
        cut.truncate(3);
        assert_eq!(cut.starts(), &[(1, 0)]);
    }

    #[test]
    fn a_history_is_rebuilt_from_entries() {
        let entry = |epoch, offset| Entry {
            epoch,
            offset,
            data: Vec::new(),
        };
        let entries = [entry(1, 0), entry(1, 1), entry(2, 2), entry(5, 3), entry(5, 4)];
        assert_eq!(EpochHistory::of_entries(&entries).starts(), &[(1, 0), (2, 2), (5, 3)]);
    }
}
