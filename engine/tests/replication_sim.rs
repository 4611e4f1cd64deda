//! Deterministic simulation of task-group replication (`engine::replication`).
//!
//! Replicas run the real decision core; everything around it is simulated
//! and driven by one seeded random generator: a network that drops,
//! duplicates, delays and reorders messages and can cut a node off; disks
//! whose writes become durable later and lose an unsynced tail (a random
//! part of it: torn) in a crash; a metastore with versioned
//! compare-and-set (answers lost after the write, so drivers retry),
//! watches, sessions that expire and cuts from the metastore alone (the
//! driver gives up its lease); the Conductor's elections and graceful
//! hand-offs; processes that crash, restart, pause (SIGSTOP) and lose their
//! data directory; clients appending throughout. Invariants are checked as
//! the run goes:
//!
//! - no two replicas lead one epoch;
//! - applied prefixes agree entry for entry on every replica, and every
//!   acknowledged append is in it at its offset;
//! - every ISR member (whose data was not wiped) holds the applied prefix
//!   durably, so nothing acknowledged is lost while min-ISR replicas live;
//! - no replica is asked to truncate below its applied offset;
//! - after the faults heal, appends are acknowledged again in bounded time.
//!
//! `RAMA_SIM_SEEDS=N` runs N seeds (default 150), `RAMA_SIM_SEED=S` replays
//! one seed and prints its trace (with `RAMA_SIM_DEBUG=1`, also every
//! input and action of every replica).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use engine::replication::{
    elect, hand_off, Action, Candidate, Entry, EpochHistory, GroupState, Input, Member, Message, Recovered, Replica,
    Settings,
};

mod common;
use common::Rng;

/// The simulation's draws on the shared generator: inclusive ranges and
/// chances in thousandths.
trait Draw {
    fn within(&mut self, lo: u64, hi: u64) -> u64;
    fn chance(&mut self, per_mille: u64) -> bool;
}

impl Draw for Rng {
    fn within(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Debug)]
enum Event {
    Deliver {
        to: u32,
        from: u32,
        message: Message,
    },
    Durable {
        node: u32,
        gen: u64,
        end: u64,
    },
    Installed {
        node: u32,
        gen: u64,
        upto: u64,
    },
    Watch {
        node: u32,
    },
    Cas {
        node: u32,
        session: u64,
        expected: u64,
        state: GroupState,
    },
}

struct Node {
    id: u32,
    core: Option<Replica>,
    /// Every entry written (durable or not); below `durable` they survive a
    /// crash.
    log: Vec<Entry>,
    durable: usize,
    applied: u64,
    incarnation: u64,
    gen: u64,
    paused_until: u64,
    /// Cut off from everyone (peers and metastore) until then.
    cut_until: u64,
    /// Cut off from the metastore only (peers still reach it) until then.
    meta_cut_until: u64,
    last_heartbeat: u64,
    /// Its driver gave up the lease (no metastore contact for two thirds
    /// of the session timeout): it closes the session when it can.
    lease_lost: bool,
    /// In the ISR with nothing lost at some time after the faults healed.
    back_in_sync: bool,
    /// Client appends waiting to be applied (leader): offset -> data.
    pending: BTreeMap<u64, Vec<u8>>,
    /// The data directory was wiped (and not yet caught up: see `lost`).
    lost_data: bool,
}

impl Node {
    /// Holds less than it once did: wiped, not yet whole again.
    fn lost(&self) -> bool {
        match &self.core {
            Some(core) => core.lost_data(),
            None => self.lost_data,
        }
    }

    fn running(&self, now: u64) -> bool {
        self.core.is_some() && self.paused_until <= now
    }

    fn reaches_metastore(&self, now: u64) -> bool {
        self.cut_until <= now && self.meta_cut_until <= now
    }
}

const SESSION_TIMEOUT: u64 = 200;
/// A driver stops leading after this long without metastore contact,
/// before the metastore can expire its session.
const LEASE: u64 = SESSION_TIMEOUT * 2 / 3;
const FAULTS_UNTIL: u64 = 8_000;
const HEAL_GRACE: u64 = 4_000;
const END: u64 = FAULTS_UNTIL + HEAL_GRACE + 3_000;
/// No appends for this long before the end.
const QUIET: u64 = 1_500;

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    slots: Vec<Option<Event>>,
    nodes: Vec<Node>,
    settings: Settings,
    meta: GroupState,
    /// The live session of each replica (its incarnation), as the metastore sees it.
    sessions: Vec<Option<u64>>,
    next_incarnation: u64,
    leaders: BTreeMap<u32, Member>,
    committed: Vec<Entry>,
    stats: Stats,
    /// Time of the first append acknowledged after the faults healed.
    healed_ack: Option<u64>,
    next_payload: u64,
    trace: VecDeque<String>,
    verbose: bool,
}

type Check = Result<(), String>;

/// What happened in a run, to show the faults and recoveries were exercised.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    acked: usize,
    epochs: usize,
    truncations: usize,
    snapshots: usize,
    isr_changes: usize,
    wipes: usize,
    refused: usize,
    hand_offs: usize,
    lost_cas_replies: usize,
    leases_lost: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.acked += o.acked;
        self.epochs += o.epochs;
        self.truncations += o.truncations;
        self.snapshots += o.snapshots;
        self.isr_changes += o.isr_changes;
        self.wipes += o.wipes;
        self.refused += o.refused;
        self.hand_offs += o.hand_offs;
        self.lost_cas_replies += o.lost_cas_replies;
        self.leases_lost += o.leases_lost;
    }
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let mut rng = Rng::new(seed);
        let rf = [1u32, 2, 3, 3, 3][rng.below(5) as usize];
        let min_isr = if rf == 1 {
            1
        } else {
            rng.within(1, (rf - 1) as u64) as usize
        };
        let settings = Settings {
            min_isr,
            max_lag_ms: rng.within(150, 600),
            fetch_timeout_ms: 100,
            // At least as many as the clients append in a round trip, or a
            // follower behind never catches up.
            max_fetch_entries: rng.within(16, 64),
        };
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            slots: Vec::new(),
            nodes: Vec::new(),
            settings,
            meta: GroupState::new(0..rf),
            sessions: vec![None; rf as usize],
            next_incarnation: 1,
            leaders: BTreeMap::new(),
            committed: Vec::new(),
            stats: Stats::default(),
            healed_ack: None,
            next_payload: 0,
            trace: VecDeque::new(),
            verbose,
        };
        for id in 0..rf {
            let incarnation = sim.incarnation();
            sim.nodes.push(Node {
                id,
                core: Some(Replica::new(id, incarnation, settings, Recovered::default())),
                log: Vec::new(),
                durable: 0,
                applied: 0,
                incarnation,
                gen: 0,
                paused_until: 0,
                cut_until: 0,
                meta_cut_until: 0,
                last_heartbeat: 0,
                lease_lost: false,
                back_in_sync: false,
                pending: BTreeMap::new(),
                lost_data: false,
            });
            sim.sessions[id as usize] = Some(incarnation);
        }
        sim.note(format!("rf {rf}, {settings:?}"));
        sim
    }

    fn incarnation(&mut self) -> u64 {
        self.next_incarnation += 1;
        self.next_incarnation
    }

    fn note(&mut self, line: String) {
        if self.verbose {
            println!("{:>6} {line}", self.now);
        }
        self.trace.push_back(format!("{:>6} {line}", self.now));
        if self.trace.len() > 400 {
            self.trace.pop_front();
        }
    }

    fn schedule(&mut self, after: u64, event: Event) {
        self.seq += 1;
        self.slots.push(Some(event));
        self.events
            .push(Reverse((self.now + after, self.seq, self.slots.len() - 1)));
    }

    fn healed(&self) -> bool {
        self.now >= FAULTS_UNTIL
    }

    fn run(&mut self) -> Check {
        while self.now < END {
            self.now += 1;
            if self.now == FAULTS_UNTIL {
                self.heal();
            }
            while let Some(Reverse((at, _, slot))) = self.events.peek().copied() {
                if at > self.now {
                    break;
                }
                self.events.pop();
                let event = self.slots[slot].take().expect("an event runs once");
                self.event(event)?;
            }
            self.sessions_and_elections()?;
            for id in 0..self.nodes.len() as u32 {
                if self.nodes[id as usize].running(self.now) {
                    let now = self.now;
                    self.input(id, Input::Tick { now })?;
                }
            }
            self.client()?;
            if !self.healed() {
                self.fault()?;
            }
            self.check_isr()?;
        }
        if self.healed_ack.is_none() {
            return Err(format!(
                "no append was acknowledged in the {} ms after the faults healed (group {:?})\n{}",
                END - FAULTS_UNTIL - HEAL_GRACE,
                self.meta,
                self.nodes
                    .iter()
                    .map(|n| format!("{:?}", n.core))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        self.check_end()
    }

    /// After the faults healed, every replica came back: in the ISR with its
    /// loss (if any) settled at some point (the network still drops
    /// messages, so a follower may be out again at the very end), and,
    /// after a quiet end without appends, applied all of it.
    fn check_end(&self) -> Check {
        for node in &self.nodes {
            let core = node
                .core
                .as_ref()
                .ok_or(format!("replica {} is down at the end", node.id))?;
            if !node.back_in_sync {
                return Err(format!(
                    "replica {} is not back in sync {} ms after the faults healed: group {:?}, {core:?}",
                    node.id,
                    END - FAULTS_UNTIL,
                    self.meta
                ));
            }
            if core.applied() != self.committed.len() as u64 {
                return Err(format!(
                    "replica {} applied {} of the {} applied entries at the end",
                    node.id,
                    core.applied(),
                    self.committed.len()
                ));
            }
        }
        Ok(())
    }

    /// Runs one replica input and carries out its actions. Its driver first
    /// checks the lease: without metastore contact for `LEASE` it tells the
    /// replica its session is as good as gone.
    fn input(&mut self, id: u32, input: Input) -> Check {
        let now = self.now;
        let node = &mut self.nodes[id as usize];
        let Some(core) = node.core.as_mut() else {
            return Ok(());
        };
        let mut actions = Vec::new();
        if !node.lease_lost && now.saturating_sub(node.last_heartbeat) > LEASE {
            node.lease_lost = true;
            self.stats.leases_lost += 1;
            actions.extend(core.step(Input::SessionLost));
        }
        if self.verbose && std::env::var("RAMA_SIM_DEBUG").is_ok() && !matches!(input, Input::Tick { .. }) {
            println!("{now:>6} DEBUG {id} <- {input:?}");
        }
        actions.extend(core.step(input));
        if self.verbose && std::env::var("RAMA_SIM_DEBUG").is_ok() && !actions.is_empty() {
            println!("{now:>6} DEBUG {id} -> {actions:?}");
        }
        self.actions(id, actions)
    }

    fn actions(&mut self, id: u32, actions: Vec<Action>) -> Check {
        for action in actions {
            self.action(id, action)?;
        }
        Ok(())
    }

    fn send(&mut self, from: u32, to: u32, message: Message) {
        let cut = |n: &Node, now| n.cut_until > now;
        if cut(&self.nodes[from as usize], self.now) || cut(&self.nodes[to as usize], self.now) {
            return;
        }
        if self.rng.chance(20) {
            return;
        }
        if self.rng.chance(10) {
            let delay = self.rng.within(1, 15);
            self.schedule(
                delay,
                Event::Deliver {
                    to,
                    from,
                    message: message.clone(),
                },
            );
        }
        let delay = self.rng.within(1, 15);
        self.schedule(delay, Event::Deliver { to, from, message });
    }

    fn action(&mut self, id: u32, action: Action) -> Check {
        let i = id as usize;
        match action {
            Action::Send { to, message } => self.send(id, to, message),
            Action::SendEntries {
                to,
                epoch,
                fetch_id,
                from,
                upto,
                applied,
            } => {
                let node = &self.nodes[i];
                let start = node.core.as_ref().map_or(0, |c| c.log_start());
                if from < start || upto as usize > node.log.len() || from > upto {
                    return Err(format!(
                        "replica {id} asked to send [{from}, {upto}) of a log [{start}, {})",
                        node.log.len()
                    ));
                }
                let entries = node.log[from as usize..upto as usize].to_vec();
                self.send(
                    id,
                    to,
                    Message::Entries {
                        epoch,
                        fetch_id,
                        from,
                        entries,
                        applied,
                    },
                );
            }
            Action::SendSnapshot { to, epoch, fetch_id } => {
                let node = &self.nodes[i];
                let upto = node.applied;
                let prefix = &node.log[..upto as usize];
                let history = EpochHistory::of_entries(prefix).starts().to_vec();
                let data = encode(prefix);
                self.note(format!("{id} snapshot to {to} upto {upto}"));
                self.stats.snapshots += 1;
                self.send(
                    id,
                    to,
                    Message::Snapshot {
                        epoch,
                        fetch_id,
                        upto,
                        history,
                        data,
                    },
                );
            }
            Action::Write { entries } => {
                let node = &mut self.nodes[i];
                if entries.first().map(|e| e.offset) != Some(node.log.len() as u64) {
                    return Err(format!(
                        "replica {id} writes entries from {:?} at log end {}",
                        entries.first(),
                        node.log.len()
                    ));
                }
                node.log.extend(entries);
                let (gen, end) = (node.gen, node.log.len() as u64);
                let delay = self.rng.within(1, 8);
                self.schedule(delay, Event::Durable { node: id, gen, end });
            }
            Action::Truncate { to } => {
                let node = &mut self.nodes[i];
                if to < node.applied {
                    return Err(format!(
                        "replica {id} truncates to {to} below its applied {}",
                        node.applied
                    ));
                }
                node.log.truncate(to as usize);
                node.durable = to as usize;
                node.gen += 1;
                self.note(format!("{id} truncated to {to}"));
                self.stats.truncations += 1;
            }
            Action::Install { upto, history, data } => {
                let entries = decode(&data);
                if entries.len() as u64 != upto || EpochHistory::of_entries(&entries).starts() != history.as_slice() {
                    return Err(format!("replica {id} got a snapshot that is not what it says ({upto})"));
                }
                let node = &mut self.nodes[i];
                node.log = entries;
                node.durable = upto as usize;
                node.applied = upto;
                node.gen += 1;
                let gen = node.gen;
                self.verify_applied(id, 0, upto)?;
                let delay = self.rng.within(1, 20);
                self.schedule(delay, Event::Installed { node: id, gen, upto });
            }
            Action::Apply { upto } => {
                let from = self.nodes[i].applied;
                if upto > self.nodes[i].durable as u64 {
                    return Err(format!(
                        "replica {id} applies up to {upto} past its durable {}",
                        self.nodes[i].durable
                    ));
                }
                self.verify_applied(id, from, upto)?;
                self.nodes[i].applied = upto;
                let done: Vec<u64> = self.nodes[i].pending.range(..upto).map(|(o, _)| *o).collect();
                for offset in done {
                    let data = self.nodes[i].pending.remove(&offset).expect("listed");
                    if self.committed[offset as usize].data != data {
                        return Err(format!(
                            "append acknowledged at {offset} by {id} is not the applied entry there"
                        ));
                    }
                    self.stats.acked += 1;
                    if self.healed() && self.now >= FAULTS_UNTIL + HEAL_GRACE && self.healed_ack.is_none() {
                        self.healed_ack = Some(self.now);
                    }
                }
            }
            Action::Cas {
                expected_version,
                state,
            } => {
                let session = self.nodes[i].incarnation;
                let delay = self.rng.within(1, 10);
                self.schedule(
                    delay,
                    Event::Cas {
                        node: id,
                        session,
                        expected: expected_version,
                        state,
                    },
                );
            }
            Action::BecameLeader { epoch } => {
                let member = self.nodes[i].core.as_ref().expect("running").member();
                self.note(format!("{id} leads epoch {epoch} as {member:?}"));
                self.stats.epochs += 1;
                if let Some(other) = self.leaders.insert(epoch, member) {
                    if other != member {
                        return Err(format!("two leaders of epoch {epoch}: {other:?} and {member:?}"));
                    }
                }
            }
            Action::SteppedDown { epoch } => {
                self.note(format!("{id} stepped down from epoch {epoch}"));
                self.nodes[i].pending.clear();
            }
            Action::Fatal { reason } => return Err(format!("replica {id} stopped: {reason}")),
        }
        Ok(())
    }

    /// Entries `[from, upto)` of a replica become applied: they must agree
    /// with what any replica applied there before.
    fn verify_applied(&mut self, id: u32, from: u64, upto: u64) -> Check {
        for offset in from..upto {
            let entry = &self.nodes[id as usize].log[offset as usize];
            match self.committed.get(offset as usize) {
                Some(committed) if committed != entry => {
                    return Err(format!(
                        "replica {id} applies {entry:?} at {offset} where {committed:?} was applied"
                    ));
                }
                Some(_) => {}
                None => {
                    if offset as usize != self.committed.len() {
                        return Err(format!(
                            "replica {id} applies {offset} past the applied end {}",
                            self.committed.len()
                        ));
                    }
                    self.committed.push(entry.clone());
                }
            }
        }
        Ok(())
    }

    fn event(&mut self, event: Event) -> Check {
        let node_of = |e: &Event| match e {
            Event::Deliver { to, .. } => *to,
            Event::Durable { node, .. }
            | Event::Installed { node, .. }
            | Event::Watch { node }
            | Event::Cas { node, .. } => *node,
        };
        let id = node_of(&event);
        let node = &self.nodes[id as usize];
        if node.core.is_none() {
            return Ok(());
        }
        if node.paused_until > self.now && !matches!(event, Event::Cas { .. }) {
            // A stopped process reads nothing; it all waits for it.
            let after = node.paused_until - self.now;
            self.schedule(after, event);
            return Ok(());
        }
        match event {
            Event::Deliver { to, from, message } => {
                if self.nodes[to as usize].cut_until > self.now {
                    return Ok(());
                }
                self.input(to, Input::Message { from, message })
            }
            Event::Durable { node, gen, end } => {
                let n = &mut self.nodes[node as usize];
                if n.gen != gen {
                    return Ok(());
                }
                let end = end.min(n.log.len() as u64);
                n.durable = n.durable.max(end as usize);
                self.input(node, Input::Durable { end })
            }
            Event::Installed { node, gen, upto } => {
                if self.nodes[node as usize].gen != gen {
                    return Ok(());
                }
                self.input(node, Input::Installed { upto })
            }
            Event::Watch { node } => {
                if !self.nodes[node as usize].reaches_metastore(self.now) {
                    return Ok(());
                }
                let state = self.meta.clone();
                self.input(node, Input::Group(state))
            }
            Event::Cas {
                node,
                session,
                expected,
                mut state,
            } => {
                if self.nodes[node as usize].incarnation != session || self.sessions[node as usize] != Some(session) {
                    return Ok(());
                }
                let retry = |sim: &mut Sim, state: GroupState| {
                    // Unknown outcome: the driver sends it again, unchanged.
                    let after = sim.rng.within(5, 40);
                    sim.schedule(
                        after,
                        Event::Cas {
                            node,
                            session,
                            expected,
                            state,
                        },
                    );
                };
                if !self.nodes[node as usize].reaches_metastore(self.now) {
                    // The request may not even have been sent.
                    retry(self, state);
                    return Ok(());
                }
                if self.meta.version == expected {
                    state.version = expected + 1;
                    self.note(format!("{node} changed the group to {state:?}"));
                    self.stats.isr_changes += 1;
                    self.set_meta(state.clone());
                    if self.rng.chance(150) {
                        // Written, but the answer was lost with the connection.
                        self.stats.lost_cas_replies += 1;
                        state.version = expected;
                        retry(self, state);
                        return Ok(());
                    }
                    self.input(node, Input::CasWritten(state))
                } else {
                    // Failed for certain: the node has a newer version.
                    self.schedule(1, Event::Watch { node });
                    Ok(())
                }
            }
        }
    }

    fn set_meta(&mut self, state: GroupState) {
        self.meta = state;
        for id in 0..self.nodes.len() as u32 {
            let delay = self.rng.within(1, 10);
            self.schedule(delay, Event::Watch { node: id });
        }
    }

    /// Heartbeats, session expiry and the Conductor's elections.
    fn sessions_and_elections(&mut self) -> Check {
        for id in 0..self.nodes.len() {
            let node = &mut self.nodes[id];
            if node.running(self.now) && node.reaches_metastore(self.now) {
                node.last_heartbeat = self.now;
                if node.lease_lost {
                    // It gave up the lease: it closes the session.
                    node.lease_lost = false;
                    self.sessions[id] = None;
                }
                if self.sessions[id].is_none() {
                    // The session had expired: this process learns it now
                    // and opens a new one (a new incarnation).
                    let incarnation = self.next_incarnation + 1;
                    self.next_incarnation = incarnation;
                    node.incarnation = incarnation;
                    self.sessions[id] = Some(incarnation);
                    self.note(format!("{id} new session {incarnation}"));
                    self.input(id as u32, Input::SessionLost)?;
                    self.input(id as u32, Input::NewSession { incarnation })?;
                    self.schedule(1, Event::Watch { node: id as u32 });
                }
            } else if self.sessions[id].is_some() && self.now - node.last_heartbeat > SESSION_TIMEOUT {
                self.sessions[id] = None;
                self.note(format!("{id} session expired"));
            }
        }
        if self.now % 10 != 0 {
            return Ok(());
        }
        let live: Vec<Candidate> = self
            .nodes
            .iter()
            .filter(|n| self.sessions[n.id as usize] == Some(n.incarnation))
            .filter_map(|n| {
                let core = n.core.as_ref()?;
                Some(Candidate {
                    member: core.member(),
                    lost_data: core.lost_data(),
                    last_epoch: core.history().last_epoch(),
                    log_end: core.durable_end(),
                })
            })
            .collect();
        if let Some(mut next) = elect(&self.meta, &live) {
            next.version = self.meta.version + 1;
            self.note(format!("conductor: {next:?}"));
            self.set_meta(next);
        } else if !self.healed() && !live.is_empty() && self.rng.chance(10) {
            // Leadership balancing: a graceful move to another replica.
            let to = live[self.rng.below(live.len() as u64) as usize];
            if let Some(mut next) = hand_off(&self.meta, &to) {
                next.version = self.meta.version + 1;
                self.note(format!("conductor hands off: {next:?}"));
                self.stats.hand_offs += 1;
                self.set_meta(next);
            }
        }
        if self.now % 100 == 0 {
            // Watches can be lost with a connection: everyone reads again.
            for id in 0..self.nodes.len() as u32 {
                self.schedule(1, Event::Watch { node: id });
            }
        }
        Ok(())
    }

    fn client(&mut self) -> Check {
        // Quiet at the end: every replica must then apply everything,
        // with no later append to carry the leader's applied offset.
        if self.now >= END - QUIET || !self.rng.chance(400) {
            return Ok(());
        }
        let id = self.rng.below(self.nodes.len() as u64) as u32;
        if !self.nodes[id as usize].running(self.now) {
            return Ok(());
        }
        let core = self.nodes[id as usize].core.as_mut().expect("running");
        let Ok((epoch, offset)) = core.append() else {
            self.stats.refused += 1;
            return Ok(());
        };
        self.next_payload += 1;
        let data = format!("{}:{}", self.seed, self.next_payload).into_bytes();
        let node = &mut self.nodes[id as usize];
        if offset != node.log.len() as u64 {
            return Err(format!(
                "leader {id} appends at {offset} with a log of {}",
                node.log.len()
            ));
        }
        node.log.push(Entry {
            epoch,
            offset,
            data: data.clone(),
        });
        node.pending.insert(offset, data);
        let (gen, end) = (node.gen, node.log.len() as u64);
        let actions = node.core.as_mut().expect("running").take_actions();
        let delay = self.rng.within(1, 8);
        self.schedule(delay, Event::Durable { node: id, gen, end });
        self.actions(id, actions)
    }

    fn fault(&mut self) -> Check {
        if !self.rng.chance(4) {
            return Ok(());
        }
        let id = self.rng.below(self.nodes.len() as u64) as usize;
        match self.rng.below(6) {
            0 | 1 => {
                if self.nodes[id].core.is_some() {
                    self.crash(id, false);
                    let after = self.rng.within(20, 1_500);
                    self.restart_later(id, after);
                }
            }
            2 => {
                if self.nodes[id].running(self.now) {
                    let pause = self.rng.within(20, 3 * SESSION_TIMEOUT);
                    self.nodes[id].paused_until = self.now + pause;
                    self.note(format!("{id} paused for {pause} ms"));
                }
            }
            3 => {
                let cut = self.rng.within(20, 1_500);
                if self.rng.chance(500) {
                    self.nodes[id].meta_cut_until = self.now + cut;
                    self.note(format!("{id} cut off from the metastore for {cut} ms"));
                } else {
                    self.nodes[id].cut_until = self.now + cut;
                    self.note(format!("{id} cut off for {cut} ms"));
                }
            }
            4 => {
                // Wipe only while enough intact ISR members remain without it.
                let id32 = id as u32;
                let others = self
                    .meta
                    .isr
                    .iter()
                    .filter(|m| **m != id32 && !self.nodes[**m as usize].lost())
                    .count();
                if self.nodes[id].core.is_some() && others >= self.settings.min_isr && self.nodes.len() > 1 {
                    self.crash(id, true);
                    let after = self.rng.within(20, 1_500);
                    self.restart_later(id, after);
                }
            }
            _ => {
                let node = &self.nodes[id];
                let bounds = node.core.as_ref().map(|core| (core.log_start(), core.applied()));
                if let Some((start, applied)) = bounds.filter(|(s, a)| node.running(self.now) && a > s) {
                    let start = self.rng.within(start, applied);
                    self.input(id as u32, Input::Trimmed { start })?;
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self, id: usize, wipe: bool) {
        let keep = {
            let node = &self.nodes[id];
            let torn = self.rng.below((node.log.len() - node.durable) as u64 + 1) as usize;
            node.durable + torn
        };
        let node = &mut self.nodes[id];
        node.lost_data = node.core.as_ref().is_some_and(|c| c.lost_data());
        node.core = None;
        node.gen += 1;
        node.pending.clear();
        node.paused_until = 0;
        if wipe {
            self.stats.wipes += 1;
            node.log.clear();
            node.applied = 0;
            node.lost_data = true;
        } else {
            node.log.truncate(keep);
        }
        node.durable = node.log.len();
        self.note(format!("{id} crashed{}", if wipe { " and lost its data" } else { "" }));
    }

    fn restart_later(&mut self, id: usize, after: u64) {
        // Restarts are polled in `heal` and here through a pause marker:
        // the node is down until `paused_until`, then restarted.
        self.nodes[id].paused_until = self.now + after;
    }

    fn restart(&mut self, id: usize) {
        let incarnation = self.incarnation();
        let node = &mut self.nodes[id];
        let history = EpochHistory::of_entries(&node.log);
        let recovered = Recovered {
            log_start: node.applied.min(node.log.len() as u64),
            log_end: node.log.len() as u64,
            history,
            applied: node.applied,
            lost_data: node.lost_data,
        };
        node.core = Some(Replica::new(node.id, incarnation, self.settings, recovered));
        node.incarnation = incarnation;
        node.paused_until = 0;
        node.last_heartbeat = self.now;
        node.lease_lost = false;
        self.sessions[id] = Some(incarnation);
        self.note(format!("{id} restarted as {incarnation}"));
        self.schedule(1, Event::Watch { node: id as u32 });
    }

    fn heal(&mut self) {
        self.note("heal".to_string());
        for id in 0..self.nodes.len() {
            self.nodes[id].cut_until = 0;
            self.nodes[id].meta_cut_until = 0;
            if self.nodes[id].core.is_some() {
                self.nodes[id].paused_until = 0;
            }
        }
    }

    /// Every ISR member with its data holds the applied prefix durably.
    fn check_isr(&mut self) -> Check {
        for id in 0..self.nodes.len() {
            if self.nodes[id].core.is_none() && self.nodes[id].paused_until <= self.now {
                self.restart(id);
            }
        }
        for &m in &self.meta.isr {
            let now = self.now;
            let node = &mut self.nodes[m as usize];
            if node.lost() {
                continue;
            }
            node.back_in_sync |= now >= FAULTS_UNTIL && node.core.is_some();
            let n = self.committed.len();
            if node.durable < n || node.log[..n] != self.committed[..] {
                return Err(format!(
                    "ISR member {m} does not hold the applied prefix of {n} entries (durable {})",
                    node.durable
                ));
            }
        }
        Ok(())
    }
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        out.extend_from_slice(&entry.epoch.to_le_bytes());
        out.extend_from_slice(&entry.offset.to_le_bytes());
        out.extend_from_slice(&(entry.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&entry.data);
    }
    out
}

fn decode(mut bytes: &[u8]) -> Vec<Entry> {
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let epoch = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        let offset = u64::from_le_bytes(bytes[4..12].try_into().unwrap());
        let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        entries.push(Entry {
            epoch,
            offset,
            data: bytes[16..16 + len].to_vec(),
        });
        bytes = &bytes[16 + len..];
    }
    entries
}

fn run_seed(seed: u64, verbose: bool) -> Result<Stats, String> {
    let mut sim = Sim::new(seed, verbose);
    match sim.run() {
        Ok(()) => Ok(sim.stats),
        Err(failure) => {
            let trace: Vec<String> = sim.trace.iter().rev().take(60).rev().cloned().collect();
            Err(format!("{failure}\n  last events:\n    {}", trace.join("\n    ")))
        }
    }
}

#[test]
fn replication_keeps_its_invariants_under_faults() {
    if let Ok(seed) = std::env::var("RAMA_SIM_SEED") {
        let seed: u64 = seed.parse().expect("RAMA_SIM_SEED is a number");
        match run_seed(seed, true) {
            Ok(stats) => println!("seed {seed}: {stats:?}"),
            Err(failure) => panic!("seed {seed}: {failure}"),
        }
        return;
    }
    let var = |name: &str| std::env::var(name).ok().map(|s| s.parse::<u64>().expect("a number"));
    let seeds = var("RAMA_SIM_SEEDS").unwrap_or(150);
    let first = var("RAMA_SIM_FIRST").unwrap_or(0);
    let mut failures = Vec::new();
    let mut total = Stats::default();
    for seed in first..first + seeds {
        match run_seed(seed, false) {
            Ok(stats) => total += stats,
            Err(failure) => failures.push(format!(
                "seed {seed} (replay: RAMA_SIM_SEED={seed} cargo test -p rama-engine --test replication_sim): {failure}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    println!("{seeds} seeds from {first}: {total:?}");
    // The faults happened and were recovered from, not only survived.
    let n = seeds as usize;
    assert!(
        total.acked > n * 100,
        "too few appends acknowledged to mean anything: {total:?}"
    );
    assert!(total.epochs > n * 2, "too few failovers: {total:?}");
    for (what, count) in [
        ("truncations", total.truncations),
        ("snapshots", total.snapshots),
        ("ISR changes", total.isr_changes),
        ("wipes", total.wipes),
        ("refused appends", total.refused),
        ("hand-offs", total.hand_offs),
        ("lost compare-and-set answers", total.lost_cas_replies),
        ("leases given up", total.leases_lost),
    ] {
        assert!(
            seeds < 20 || count > n / 10,
            "too few {what} for the runs to mean anything: {total:?}"
        );
    }
}
