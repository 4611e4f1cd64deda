//! One replica of a task group: follower or leader, as the metastore says.

use std::collections::BTreeMap;

use super::{Action, Entry, Epoch, EpochHistory, GroupState, Incarnation, Input, Member, Message, Offset, ReplicaId};

/// Replication settings of a module (dynamic options later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `replication.min.isr`: entries are applied only while the ISR has at
    /// least this many members (clamped to 1..=RF by the caller).
    pub min_isr: usize,
    /// `replication.max.time.lag.millis`: an ISR follower that has not
    /// caught up with the leader's log end for this long leaves the ISR
    /// (if the ISR stays at `min_isr` or above; otherwise the group stalls).
    pub max_lag_ms: u64,
    /// A fetch unanswered for this long is sent again.
    pub fetch_timeout_ms: u64,
    /// At most this many entries in one answer to a fetch.
    pub max_fetch_entries: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            min_isr: 1,
            max_lag_ms: 10_000,
            fetch_timeout_ms: 1_000,
            max_fetch_entries: 4096,
        }
    }
}

/// What a replica's storage holds when it starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// First entry still in the local log (entries below were trimmed or
    /// came in a snapshot).
    pub log_start: Offset,
    /// End of the durable log (everything below is durable; an unsynced
    /// tail lost in a crash is not part of it).
    pub log_end: Offset,
    pub history: EpochHistory,
    /// The applied offset last recorded (at most `log_end`).
    pub applied: Offset,
    /// The local data was lost since the replica last held entries (a
    /// wiped directory of a replica the group already had).
    pub lost_data: bool,
}

/// Why an append was refused. Nothing of it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// This replica does not lead; `leader` is the one the metastore names.
    NotLeader { leader: Option<ReplicaId>, epoch: Epoch },
    /// The ISR is below `min_isr`, or a lagging member cannot leave it
    /// without going below: nothing could be acknowledged.
    Stalled {
        epoch: Epoch,
        isr: Vec<ReplicaId>,
        min_isr: usize,
    },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NotLeader {
                leader: Some(leader),
                epoch,
            } => {
                write!(f, "not the leader: replica {leader} leads epoch {epoch}")
            }
            Refused::NotLeader { leader: None, epoch } => write!(f, "no replica leads (epoch {epoch})"),
            Refused::Stalled { epoch, isr, min_isr } => write!(
                f,
                "stalled below min-ISR: ISR {isr:?} (epoch {epoch}) has {} in sync of the {min_isr} needed",
                isr.len()
            ),
        }
    }
}

#[derive(Debug)]
enum Role {
    /// No leader known (or the session is gone): waits for the metastore.
    Idle,
    Follower(Following),
    Leader(Leading),
}

#[derive(Debug)]
struct Following {
    leader: Member,
    /// The fetch in flight: its id and when it was sent.
    fetch: Option<(u64, u64)>,
    /// The leader's applied offset, as last heard.
    leader_applied: Offset,
}

#[derive(Debug)]
struct Leading {
    epoch: Epoch,
    /// Where this epoch's entries start; the leader serves reads once
    /// everything below is applied.
    epoch_start: Offset,
    followers: BTreeMap<ReplicaId, Progress>,
    /// An ISR change written by compare-and-set, not yet confirmed.
    proposed: Option<GroupState>,
}

#[derive(Debug, Default)]
struct Progress {
    /// How far the follower holds this leader's log (durably, validated in
    /// this epoch); `None` until its first fetch.
    held: Option<Offset>,
    /// Last time its fetch reached the log end (of then or of its previous
    /// fetch).
    caught_up_at: u64,
    prev_fetch_end: Offset,
    prev_fetch_at: u64,
    /// A fetch from the log end waiting for new entries: (id, from).
    parked: Option<(u64, Offset)>,
    /// The incarnation and fetch id of the newest fetch taken.
    incarnation: Incarnation,
    fetch_id: u64,
    /// The metastore version that fetch saw.
    seen_version: u64,
}

/// The replication state machine of one replica. Feed it [`Input`]s with
/// [`Replica::step`], take appends as leader with [`Replica::append`], and
/// carry out the [`Action`]s it returns in order.
#[derive(Debug)]
pub struct Replica {
    id: ReplicaId,
    incarnation: Incarnation,
    settings: Settings,
    now: u64,
    /// Highest epoch heard of.
    epoch: Epoch,
    group: Option<GroupState>,
    role: Role,
    history: EpochHistory,
    log_start: Offset,
    /// End of the local log, written or queued.
    log_end: Offset,
    durable_end: Offset,
    applied: Offset,
    /// The local data was lost and this replica has not yet written itself
    /// into the OSR (see [`Replica::lost_data`]).
    lost_data: bool,
    /// The version its compare-and-set into the OSR expects, while one is
    /// out.
    lost_cas: Option<u64>,
    /// A snapshot being installed, as of an offset with the epochs below
    /// it: no fetch, no leadership until it is in place (whatever the role
    /// meanwhile: the driver is replacing the files).
    installing: Option<(Offset, Vec<(Epoch, Offset)>)>,
    session: bool,
    next_fetch_id: u64,
    fatal: bool,
    out: Vec<Action>,
}

impl Replica {
    pub fn new(id: ReplicaId, incarnation: Incarnation, settings: Settings, recovered: Recovered) -> Replica {
        assert!(recovered.applied <= recovered.log_end && recovered.log_start <= recovered.log_end);
        Replica {
            id,
            incarnation,
            settings,
            now: 0,
            epoch: 0,
            group: None,
            role: Role::Idle,
            history: recovered.history,
            log_start: recovered.log_start,
            log_end: recovered.log_end,
            durable_end: recovered.log_end,
            applied: recovered.applied,
            lost_data: recovered.lost_data,
            lost_cas: None,
            installing: None,
            session: true,
            next_fetch_id: 0,
            fatal: false,
            out: Vec::new(),
        }
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }
    pub fn member(&self) -> Member {
        Member {
            id: self.id,
            incarnation: self.incarnation,
        }
    }
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn applied(&self) -> Offset {
        self.applied
    }
    pub fn log_end(&self) -> Offset {
        self.log_end
    }
    pub fn durable_end(&self) -> Offset {
        self.durable_end
    }
    pub fn log_start(&self) -> Offset {
        self.log_start
    }
    pub fn history(&self) -> &EpochHistory {
        &self.history
    }
    /// The local data was lost (a wiped directory) and the metastore does
    /// not yet say so: the replica's registration must say it (it is never
    /// elected meanwhile) until its own compare-and-set has written it
    /// into the OSR.
    pub fn lost_data(&self) -> bool {
        self.lost_data
    }
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }
    /// The leader serves reads and runs processing only once every entry
    /// it held when it took over is applied.
    pub fn serving(&self) -> bool {
        matches!(&self.role, Role::Leader(l) if self.applied >= l.epoch_start)
    }
    /// The leader the metastore names, if any.
    pub fn leader(&self) -> Option<ReplicaId> {
        self.group.as_ref().and_then(|g| g.leader).map(|m| m.id)
    }
    /// The lowest offset a follower heard from in this epoch still needs
    /// from the local log (at most the applied offset); `None` when this
    /// replica does not lead or heard from no follower. The owner keeps
    /// its log from there when it trims (within its own bound).
    pub fn retain_from(&self) -> Option<Offset> {
        let Role::Leader(leading) = &self.role else { return None };
        leading
            .followers
            .values()
            .filter_map(|p| p.held)
            .min()
            .map(|held| held.min(self.applied))
    }

    /// The ISR and OSR as this replica last read them, and whether it
    /// could not take appends now (below min-ISR).
    pub fn group(&self) -> Option<&GroupState> {
        self.group.as_ref()
    }

    /// Why appends would be refused now, if they would.
    pub fn stalled(&self) -> Option<Refused> {
        let Role::Leader(leading) = &self.role else { return None };
        let group = self.group.as_ref()?;
        let below = group.isr.len() < self.settings.min_isr;
        let stuck = group.isr.iter().any(|id| {
            *id != self.id
                && leading.followers.get(id).is_some_and(|p| self.lagging(p))
                && group.isr.len() <= self.settings.min_isr
        });
        (below || stuck).then(|| Refused::Stalled {
            epoch: self.epoch,
            isr: group.isr.clone(),
            min_isr: self.settings.min_isr,
        })
    }

    /// Takes one append as leader: its (epoch, offset). The driver writes
    /// the entry at that offset, then calls [`Replica::take_actions`]
    /// (followers waiting for entries are answered).
    pub fn append(&mut self) -> Result<(Epoch, Offset), Refused> {
        if !self.is_leader() || self.fatal {
            return Err(Refused::NotLeader {
                leader: self.leader(),
                epoch: self.epoch,
            });
        }
        if let Some(stall) = self.stalled() {
            return Err(stall);
        }
        let offset = self.log_end;
        self.log_end += 1;
        self.history.note(self.epoch, offset);
        self.answer_parked();
        Ok((self.epoch, offset))
    }

    /// The actions queued by [`Replica::append`].
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    pub fn step(&mut self, input: Input) -> Vec<Action> {
        if !self.fatal {
            match input {
                Input::Tick { now } => self.tick(now),
                Input::Group(state) => self.on_group(state),
                Input::CasWritten(state) => {
                    if self.lost_data && state.osr.contains(&self.id) {
                        // The metastore now keeps it out of the ISR.
                        self.lost_data = false;
                        self.lost_cas = None;
                    }
                    self.on_group(state);
                }
                Input::SessionLost => {
                    self.session = false;
                    self.become_idle();
                    // The next state read decides again, even an unchanged one.
                    self.group = None;
                }
                Input::NewSession { incarnation } => {
                    assert!(incarnation > self.incarnation, "a new session is a new incarnation");
                    self.incarnation = incarnation;
                    self.session = true;
                }
                Input::Message { from, message } => self.on_message(from, message),
                Input::Durable { end } => self.on_durable(end),
                Input::Installed { upto } => self.on_installed(upto),
                Input::Trimmed { start } => {
                    assert!(start <= self.applied, "trimmed past the applied offset");
                    self.log_start = self.log_start.max(start);
                }
            }
        }
        self.take_actions()
    }

    fn tick(&mut self, now: u64) {
        self.now = self.now.max(now);
        match &self.role {
            Role::Follower(following) => {
                let timed_out = following
                    .fetch
                    .is_some_and(|(_, sent)| self.now.saturating_sub(sent) >= self.settings.fetch_timeout_ms);
                if timed_out || following.fetch.is_none() {
                    self.fetch();
                }
            }
            Role::Leader(_) => self.check_isr(),
            Role::Idle => {}
        }
    }

    fn on_group(&mut self, state: GroupState) {
        if state.epoch < self.epoch || self.group.as_ref().is_some_and(|g| g.version >= state.version) {
            return;
        }
        self.epoch = state.epoch;
        if self.lost_data
            && self.session
            && self.lost_cas != Some(state.version)
            && state.replicas().any(|r| r == self.id)
        {
            // Out of the ISR by its own hand, even below min-ISR, and with
            // a write that proves the state it read was the newest.
            self.lost_cas = Some(state.version);
            self.out.push(Action::Cas {
                expected_version: state.version,
                state: state.moved(self.id, false),
            });
        }
        let me = self.member();
        let leading_now = matches!(&self.role, Role::Leader(l) if l.epoch == state.epoch) && state.leader == Some(me);
        self.group = Some(state.clone());
        if leading_now {
            if let Role::Leader(leading) = &mut self.role {
                leading.proposed = None;
            }
            self.advance_applied();
            self.check_isr();
            return;
        }
        match state.leader {
            Some(leader) if leader == me && self.session && !self.lost_data && self.installing.is_none() => {
                self.become_leader()
            }
            Some(leader) if leader.id != self.id => {
                let same = matches!(&self.role, Role::Follower(f) if f.leader == leader);
                if !same {
                    self.step_down();
                    self.role = Role::Follower(Following {
                        leader,
                        fetch: None,
                        leader_applied: self.applied,
                    });
                    self.fetch();
                }
            }
            _ => self.become_idle(),
        }
    }

    fn become_idle(&mut self) {
        self.step_down();
        self.role = Role::Idle;
    }

    fn step_down(&mut self) {
        if let Role::Leader(leading) = &self.role {
            let epoch = leading.epoch;
            self.role = Role::Idle;
            self.out.push(Action::SteppedDown { epoch });
        }
    }

    fn become_leader(&mut self) {
        let group = self.group.clone().expect("a group state names the leader");
        let followers = group
            .replicas()
            .filter(|id| *id != self.id)
            .map(|id| {
                (
                    id,
                    Progress {
                        caught_up_at: self.now,
                        prev_fetch_at: self.now,
                        ..Progress::default()
                    },
                )
            })
            .collect();
        self.role = Role::Leader(Leading {
            epoch: self.epoch,
            epoch_start: self.log_end,
            followers,
            proposed: None,
        });
        self.out.push(Action::BecameLeader { epoch: self.epoch });
        self.advance_applied();
    }

    fn on_message(&mut self, from: ReplicaId, message: Message) {
        let epoch = message.epoch();
        if epoch < self.epoch {
            if !matches!(message, Message::Fenced { .. }) {
                self.out.push(Action::Send {
                    to: from,
                    message: Message::Fenced { epoch: self.epoch },
                });
            }
            return;
        }
        if epoch > self.epoch {
            // Someone knows a newer epoch: stop leading; the metastore
            // will say who leads it.
            self.epoch = epoch;
            if self.is_leader() {
                self.become_idle();
            } else if let Role::Follower(following) = &mut self.role {
                following.fetch = None;
            }
            if !matches!(message, Message::Fetch { .. } | Message::Fenced { .. }) {
                return;
            }
        }
        match message {
            Message::Fetch {
                incarnation,
                fetch_id,
                from: offset,
                last_epoch,
                seen_version,
                applied,
                ..
            } => self.on_fetch(from, (incarnation, fetch_id, seen_version), offset, last_epoch, applied),
            Message::Entries {
                fetch_id,
                from: offset,
                entries,
                applied,
                ..
            } => {
                if self.answer_to(from, fetch_id) {
                    self.on_entries(offset, entries, applied);
                }
            }
            Message::Diverging {
                fetch_id,
                at_epoch,
                end,
                ..
            } => {
                if self.answer_to(from, fetch_id) {
                    self.on_diverging(at_epoch, end);
                }
            }
            Message::Snapshot {
                fetch_id,
                upto,
                history,
                data,
                ..
            } => {
                if self.answer_to(from, fetch_id) {
                    self.installing = Some((upto, history.clone()));
                    self.out.push(Action::Install { upto, history, data });
                }
            }
            Message::Fenced { .. } => {}
        }
    }

    /// Whether a leader's message answers the fetch in flight (a late or
    /// duplicated answer is dropped); clears the fetch if it does.
    fn answer_to(&mut self, from: ReplicaId, fetch_id: u64) -> bool {
        match &mut self.role {
            Role::Follower(following)
                if following.leader.id == from && following.fetch.is_some_and(|(id, _)| id == fetch_id) =>
            {
                following.fetch = None;
                true
            }
            _ => false,
        }
    }

    fn fetch(&mut self) {
        let Role::Follower(following) = &mut self.role else {
            return;
        };
        if self.installing.is_some() || self.durable_end < self.log_end || !self.session {
            return;
        }
        self.next_fetch_id += 1;
        following.fetch = Some((self.next_fetch_id, self.now));
        let from = self.log_end;
        let last_epoch = if from == 0 { 0 } else { self.history.epoch_of(from - 1) };
        let seen_version = self.group.as_ref().map_or(0, |g| g.version);
        self.out.push(Action::Send {
            to: following.leader.id,
            message: Message::Fetch {
                epoch: self.epoch,
                incarnation: self.incarnation,
                fetch_id: self.next_fetch_id,
                from,
                last_epoch,
                seen_version,
                applied: self.applied,
            },
        });
    }

    fn on_entries(&mut self, from: Offset, entries: Vec<Entry>, leader_applied: Offset) {
        if from != self.log_end {
            self.fetch();
            return;
        }
        if let Role::Follower(following) = &mut self.role {
            following.leader_applied = following.leader_applied.max(leader_applied);
        }
        let mut next = self.log_end;
        for entry in &entries {
            if entry.offset != next || entry.epoch > self.epoch || entry.epoch < self.history.last_epoch() {
                self.fatal(format!(
                    "the leader sent entry {} of epoch {} after offset {next} of epoch {} (epoch {} now)",
                    entry.offset,
                    entry.epoch,
                    self.history.last_epoch(),
                    self.epoch
                ));
                return;
            }
            self.history.note(entry.epoch, entry.offset);
            next += 1;
        }
        self.advance_applied();
        if entries.is_empty() {
            self.fetch();
        } else {
            self.log_end = next;
            self.out.push(Action::Write { entries });
        }
    }

    fn on_diverging(&mut self, at_epoch: Epoch, leader_end: Offset) {
        let (_, own_end) = self.history.end_for(at_epoch, self.log_end);
        let to = leader_end.min(own_end);
        if to < self.applied {
            self.fatal(format!(
                "the leader's log diverges from this one at offset {to}, below the applied offset {}",
                self.applied
            ));
            return;
        }
        if to < self.log_end {
            self.log_end = to;
            self.durable_end = to;
            self.history.truncate(to);
            self.out.push(Action::Truncate { to });
        }
        self.fetch();
    }

    /// The files are replaced, whatever the role is now: the log is the
    /// snapshot's.
    fn on_installed(&mut self, upto: Offset) {
        let Some((want, mut history)) = self.installing.take_if(|(want, _)| *want == upto) else {
            return;
        };
        history.retain(|(_, start)| *start < want);
        self.history = EpochHistory::from_starts(history);
        self.log_start = want;
        self.log_end = want;
        self.durable_end = want;
        self.applied = self.applied.max(want);
        if let Role::Follower(following) = &mut self.role {
            following.leader_applied = following.leader_applied.max(want);
        }
        self.fetch();
    }

    fn on_durable(&mut self, end: Offset) {
        self.durable_end = self.durable_end.max(end.min(self.log_end));
        self.advance_applied();
        if matches!(self.role, Role::Follower(ref f) if f.fetch.is_none()) {
            self.fetch();
        }
    }

    fn on_fetch(
        &mut self,
        from: ReplicaId,
        (incarnation, fetch_id, seen_version): (Incarnation, u64, u64),
        offset: Offset,
        last_epoch: Epoch,
        follower_applied: Offset,
    ) {
        let Role::Leader(leading) = &mut self.role else { return };
        let Some(progress) = leading.followers.get_mut(&from) else {
            return;
        };
        if (incarnation, fetch_id) <= (progress.incarnation, progress.fetch_id) {
            return;
        }
        if incarnation != progress.incarnation {
            // A new process: what the old one held says nothing now.
            progress.held = None;
            progress.incarnation = incarnation;
        }
        progress.fetch_id = fetch_id;
        progress.seen_version = seen_version;
        progress.parked = None;
        let epoch = self.epoch;
        if offset > 0 {
            let (at_epoch, end) = self.history.end_for(last_epoch, self.log_end);
            if at_epoch != last_epoch || end < offset {
                self.out.push(Action::Send {
                    to: from,
                    message: Message::Diverging {
                        epoch,
                        fetch_id,
                        at_epoch,
                        end,
                    },
                });
                return;
            }
        }
        if offset < self.log_start {
            self.out.push(Action::SendSnapshot {
                to: from,
                epoch,
                fetch_id,
            });
            return;
        }
        // The follower's log matches this one below `offset`, durably.
        progress.held = Some(offset);
        if offset >= self.log_end {
            progress.caught_up_at = self.now;
        } else if offset >= progress.prev_fetch_end {
            progress.caught_up_at = progress.caught_up_at.max(progress.prev_fetch_at);
        }
        progress.prev_fetch_end = self.log_end;
        progress.prev_fetch_at = self.now;
        if offset < self.log_end || follower_applied < self.applied.min(offset) {
            let answer = self.entries_from(from, fetch_id, offset);
            self.out.push(answer);
        } else {
            progress.parked = Some((fetch_id, offset));
        }
        self.advance_applied();
        self.check_isr();
    }

    /// Answers the fetches waiting at the log end (new entries or a new
    /// applied offset).
    fn answer_parked(&mut self) {
        let Role::Leader(leading) = &mut self.role else { return };
        let parked: Vec<_> = leading
            .followers
            .iter_mut()
            .filter_map(|(id, progress)| progress.parked.take().map(|(fetch_id, from)| (*id, fetch_id, from)))
            .collect();
        for (to, fetch_id, from) in parked {
            let answer = self.entries_from(to, fetch_id, from);
            self.out.push(answer);
        }
    }

    /// A leader's answer to a fetch from `from`: the entries after it (at
    /// most `max_fetch_entries`, possibly none) and its applied offset.
    fn entries_from(&self, to: ReplicaId, fetch_id: u64, from: Offset) -> Action {
        Action::SendEntries {
            to,
            epoch: self.epoch,
            fetch_id,
            from,
            upto: self.log_end.min(from + self.settings.max_fetch_entries),
            applied: self.applied,
        }
    }

    /// Moves the applied offset: a leader's to what every member of the
    /// (larger of the current and proposed) ISR holds, a follower's to
    /// what the leader applied and it holds.
    fn advance_applied(&mut self) {
        let target = match &self.role {
            Role::Leader(leading) => {
                let Some(group) = &self.group else { return };
                let mut members = group.isr.clone();
                if let Some(p) = &leading.proposed {
                    members.extend(p.isr.iter().filter(|id| !group.isr.contains(id)));
                }
                // A joining OSR member holds back what is applied until it
                // holds all of it (one round trip), or it would never
                // catch up with a leader that applies as it appends.
                let joining: Vec<ReplicaId> = group
                    .osr
                    .iter()
                    .filter(|id| {
                        !members.contains(id)
                            && leading
                                .followers
                                .get(id)
                                .is_some_and(|p| self.joining(group, leading, p))
                    })
                    .copied()
                    .collect();
                members.extend(joining);
                if group.isr.len() < self.settings.min_isr || !members.contains(&self.id) {
                    return;
                }
                let mut target = self.durable_end;
                for id in members.iter().filter(|id| **id != self.id) {
                    match leading.followers.get(id).and_then(|p| p.held) {
                        Some(held) => target = target.min(held),
                        None => return,
                    }
                }
                target
            }
            Role::Follower(following) => following.leader_applied.min(self.durable_end),
            Role::Idle => return,
        };
        if target > self.applied {
            self.applied = target;
            self.out.push(Action::Apply { upto: target });
            if self.is_leader() {
                self.answer_parked();
            }
        }
    }

    fn lagging(&self, progress: &Progress) -> bool {
        progress.held.is_none_or(|h| h < self.log_end)
            && self.now.saturating_sub(progress.caught_up_at) > self.settings.max_lag_ms
    }

    /// An OSR member that keeps up, fetching now, with what it holds
    /// vouched for in the current metastore version: it joins the ISR once
    /// it holds everything applied.
    fn joining(&self, group: &GroupState, leading: &Leading, progress: &Progress) -> bool {
        progress.held.is_some_and(|h| h >= leading.epoch_start)
            && progress.seen_version >= group.version
            && !self.lagging(progress)
            && self.now.saturating_sub(progress.prev_fetch_at) <= self.settings.fetch_timeout_ms
    }

    /// Proposes one ISR change when one is due: a lagging member out (only
    /// while the ISR stays at `min_isr` or above), a joining OSR member in
    /// once it holds everything applied.
    fn check_isr(&mut self) {
        let Role::Leader(leading) = &self.role else { return };
        let Some(group) = &self.group else { return };
        if leading.proposed.is_some() {
            return;
        }
        let mut change = None;
        for id in &group.isr {
            let Some(progress) = leading.followers.get(id) else {
                continue;
            };
            if self.lagging(progress) && group.isr.len() > self.settings.min_isr {
                change = Some(group.moved(*id, false));
                break;
            }
        }
        if change.is_none() {
            for id in &group.osr {
                let Some(progress) = leading.followers.get(id) else {
                    continue;
                };
                if self.joining(group, leading, progress) && progress.held.is_some_and(|h| h >= self.applied) {
                    change = Some(group.moved(*id, true));
                    break;
                }
            }
        }
        if let Some(state) = change {
            let expected_version = group.version;
            if let Role::Leader(leading) = &mut self.role {
                leading.proposed = Some(state.clone());
            }
            self.out.push(Action::Cas {
                expected_version,
                state,
            });
        }
    }

    fn fatal(&mut self, reason: String) {
        self.fatal = true;
        self.step_down();
        self.role = Role::Idle;
        self.out.push(Action::Fatal { reason });
    }
}
