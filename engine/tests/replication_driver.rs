//! The replication driver over real stores: three replicas of one task
//! group on three task threads, linked by channels, with an in-memory
//! metastore (versioned compare-and-set, watches) and the Conductor's
//! election run by the test. Writes through the leader are acknowledged
//! only once the ISR holds them; a leader cut off from its followers
//! acknowledges nothing; after it is killed another is elected and takes
//! writes; restarted, the old leader cuts its unreplicated tail and
//! catches up; all logs agree on the applied prefix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::executor::ExecutorConfig;
use engine::lsm::{LsmConfig, Store, WriteBatch};
use engine::replication::driver::{recover, CasOutcome, Driver, DriverSettings, GroupMetastore};
use engine::replication::{elect, Candidate, GroupState, Input, Member, Replica, Settings};

type Inboxes = Arc<Mutex<Vec<Option<flume::Sender<Input>>>>>;

/// The metastore node and its watchers (every replica's driver inbox).
struct Meta {
    state: Mutex<GroupState>,
    watchers: Inboxes,
}

impl Meta {
    fn cas(&self, expected: u64, mut state: GroupState) -> CasOutcome {
        let mut current = self.state.lock().unwrap();
        if current.version != expected {
            return CasOutcome::Failed;
        }
        state.version = expected + 1;
        *current = state.clone();
        for tx in self.watchers.lock().unwrap().iter().flatten() {
            let _ = tx.try_send(Input::Group(state.clone()));
        }
        CasOutcome::Written(state)
    }

    fn get(&self) -> GroupState {
        self.state.lock().unwrap().clone()
    }
}

struct MetaClient(Arc<Meta>);

impl GroupMetastore for MetaClient {
    fn cas(
        &self,
        expected_version: u64,
        state: GroupState,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = CasOutcome> + '_>> {
        let outcome = self.0.cas(expected_version, state);
        Box::pin(async move { outcome })
    }
}

#[derive(Debug, Clone, Copy)]
struct Status {
    member: Member,
    leader: bool,
    serving: bool,
    last_epoch: u32,
    log_end: u64,
    applied: u64,
}

enum Cmd {
    Write(String, flume::Sender<Result<(), String>>),
    Get(String, flume::Sender<Option<Vec<u8>>>),
    Status(flume::Sender<Status>),
    Wal(flume::Sender<Vec<(u64, u32, Vec<u8>)>>),
    /// Dies (no clean close: what is durable stays, nothing else).
    Kill,
}

struct Node {
    cmds: flume::Sender<Cmd>,
    thread: std::thread::JoinHandle<()>,
}

fn config() -> LsmConfig {
    LsmConfig::default()
}

fn start(id: u32, incarnation: u64, dir: std::path::PathBuf, meta: Arc<Meta>, cut: Arc<AtomicBool>) -> Node {
    let (cmds, rx) = flume::bounded::<Cmd>(1024);
    let inboxes = meta.watchers.clone();
    let thread = std::thread::spawn(move || {
        ExecutorConfig::default()
            .block_on(async move {
                let (store, _) = Store::open_limited(&dir, config(), 0).await.unwrap();
                let recovered = recover(&store, false).await.unwrap();
                let settings = Settings {
                    min_isr: 2,
                    max_lag_ms: 2_000,
                    fetch_timeout_ms: 300,
                    max_fetch_entries: 256,
                };
                let core = Replica::new(id, incarnation, settings, recovered);
                let peers = inboxes.clone();
                let send_cut = cut.clone();
                let send = Box::new(move |to: u32, message| {
                    if send_cut.load(Ordering::SeqCst) {
                        return;
                    }
                    let tx = peers.lock().unwrap().get(to as usize).cloned().flatten();
                    if let Some(tx) = tx {
                        let _ = tx.try_send(Input::Message { from: id, message });
                    }
                });
                let driver = Driver::new(
                    store.clone(),
                    core,
                    send,
                    Box::new(MetaClient(meta.clone())),
                    Box::new(|_| {}),
                    DriverSettings::default(),
                );
                let inbox = driver.inbox();
                inboxes.lock().unwrap()[id as usize] = Some(inbox.clone());
                let _ = inbox.try_send(Input::Group(meta.get()));
                let running = glommio::spawn_local({
                    let driver = driver.clone();
                    async move { driver.run().await }
                })
                .detach();
                while let Ok(cmd) = rx.recv_async().await {
                    match cmd {
                        Cmd::Write(key, reply) => {
                            let store = store.clone();
                            glommio::spawn_local(async move {
                                let mut batch = WriteBatch::new();
                                batch.put(key.as_bytes(), format!("value of {key}").as_bytes());
                                let _ = reply.send(store.write(batch).await.map_err(|e| e.to_string()));
                            })
                            .detach();
                        }
                        Cmd::Get(key, reply) => {
                            let _ = reply.send(store.get(key.as_bytes()).unwrap());
                        }
                        Cmd::Status(reply) => {
                            let (last_epoch, log_end) = driver.log_state();
                            let _ = reply.send(Status {
                                member: Member { id, incarnation },
                                leader: driver.is_leader(),
                                serving: driver.serving(),
                                last_epoch,
                                log_end,
                                applied: driver.applied(),
                            });
                        }
                        Cmd::Wal(reply) => {
                            let end = store.wal().end_offset();
                            let records = store.wal().read(0, end, usize::MAX).await.unwrap();
                            let _ = reply.send(records.into_iter().map(|r| (r.offset, r.epoch, r.payload)).collect());
                        }
                        Cmd::Kill => break,
                    }
                }
                inboxes.lock().unwrap()[id as usize] = None;
                driver.stop();
                running.cancel();
            })
            .unwrap();
    });
    Node { cmds, thread }
}

fn ask<T>(node: &Node, cmd: impl FnOnce(flume::Sender<T>) -> Cmd) -> T {
    let (tx, rx) = flume::bounded(1);
    node.cmds.send(cmd(tx)).unwrap();
    rx.recv_timeout(Duration::from_secs(60)).expect("the replica answers")
}

/// Waits (bounded, generously: CI machines are loaded) for `done`.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Conductor: elects among the live replicas when the leader is gone.
fn conduct(meta: &Meta, live: &[&Node]) {
    let candidates: Vec<Candidate> = live
        .iter()
        .map(|n| {
            let s = ask(n, Cmd::Status);
            Candidate {
                member: s.member,
                lost_data: false,
                last_epoch: s.last_epoch,
                log_end: s.log_end,
            }
        })
        .collect();
    let current = meta.get();
    if let Some(next) = elect(&current, &candidates) {
        let written = meta.cas(current.version, next);
        assert!(matches!(written, CasOutcome::Written(_)), "{written:?}");
    }
}

fn leader_of(nodes: &[Option<Node>]) -> Option<usize> {
    nodes.iter().enumerate().find_map(|(i, n)| {
        let s = ask(n.as_ref()?, Cmd::Status);
        (s.leader && s.serving).then_some(i)
    })
}

fn write(node: &Node, key: String) -> flume::Receiver<Result<(), String>> {
    let (tx, rx) = flume::bounded(1);
    node.cmds.send(Cmd::Write(key, tx)).unwrap();
    rx
}

#[test]
fn writes_survive_a_failover_and_a_diverged_leader_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Arc::new(Meta {
        state: Mutex::new(GroupState::new(0..3)),
        watchers: Arc::new(Mutex::new(vec![None, None, None])),
    });
    let cuts: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let mut nodes: Vec<Option<Node>> = (0..3u32)
        .map(|id| {
            Some(start(
                id,
                1 + id as u64,
                dir.path().join(format!("r{id}")),
                meta.clone(),
                cuts[id as usize].clone(),
            ))
        })
        .collect();
    conduct(&meta, &nodes.iter().flatten().collect::<Vec<_>>());
    let mut leader = None;
    eventually("a serving leader", || {
        leader = leader_of(&nodes);
        leader.is_some()
    });
    let first = leader.unwrap();

    // Acknowledged writes are on every ISR member.
    let acks: Vec<_> = (0..200)
        .map(|i| write(nodes[first].as_ref().unwrap(), format!("a{i:03}")))
        .collect();
    for (i, ack) in acks.into_iter().enumerate() {
        let result = ack.recv_timeout(Duration::from_secs(60)).expect("an answer");
        assert_eq!(result, Ok(()), "write a{i:03}");
    }
    for node in nodes.iter().flatten() {
        eventually("the followers to apply what was acknowledged", || {
            ask(node, |tx| Cmd::Get("a199".into(), tx)).is_some()
        });
        assert_eq!(
            ask(node, |tx| Cmd::Get("a000".into(), tx)),
            Some(b"value of a000".to_vec())
        );
    }

    // Cut off, the leader acknowledges nothing (min-ISR 2 needs a follower).
    cuts[first].store(true, Ordering::SeqCst);
    let stranded: Vec<_> = (0..20)
        .map(|i| write(nodes[first].as_ref().unwrap(), format!("s{i:03}")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for ack in &stranded {
        assert!(ack.try_recv().is_err(), "a write of a cut-off leader was acknowledged");
    }
    let old_end = ask(nodes[first].as_ref().unwrap(), Cmd::Status).log_end;
    let node = nodes[first].take().unwrap();
    node.cmds.send(Cmd::Kill).unwrap();
    node.thread.join().unwrap();
    for ack in stranded {
        // Killed with them pending: no answer, or an error; never a success.
        if let Ok(result) = ack.try_recv() {
            assert!(result.is_err(), "{result:?}");
        }
    }

    // Another replica is elected and takes writes.
    conduct(&meta, &nodes.iter().flatten().collect::<Vec<_>>());
    let mut second = None;
    eventually("a new serving leader", || {
        second = leader_of(&nodes);
        second.is_some()
    });
    let second = second.unwrap();
    assert_ne!(second, first);
    let state = meta.get();
    assert!(state.epoch >= 2 && state.osr.contains(&(first as u32)), "{state:?}");
    let acks: Vec<_> = (0..100)
        .map(|i| write(nodes[second].as_ref().unwrap(), format!("b{i:03}")))
        .collect();
    for ack in acks {
        assert_eq!(ack.recv_timeout(Duration::from_secs(60)).expect("an answer"), Ok(()));
    }

    // The old leader returns (a new incarnation): it cuts the tail nobody
    // else has, catches up, and rejoins the ISR.
    cuts[first].store(false, Ordering::SeqCst);
    nodes[first] = Some(start(
        first as u32,
        10,
        dir.path().join(format!("r{first}")),
        meta.clone(),
        cuts[first].clone(),
    ));
    eventually("the old leader back in the ISR", || meta.get().isr.len() == 3);
    let back = nodes[first].as_ref().unwrap();
    eventually("the old leader to apply the new leader's writes", || {
        ask(back, |tx| Cmd::Get("b099".into(), tx)).is_some()
    });
    assert_eq!(
        ask(back, |tx| Cmd::Get("s000".into(), tx)),
        None,
        "never acknowledged, cut"
    );
    assert_eq!(
        ask(back, |tx| Cmd::Get("a150".into(), tx)),
        Some(b"value of a150".to_vec())
    );
    let status = ask(back, Cmd::Status);
    println!(
        "old leader {first}: log end {old_end} before it was killed, {status:?} after it rejoined; group {:?}",
        meta.get()
    );
    assert!(
        status.log_end < old_end + 100,
        "the stranded tail was cut: {status:?}, was {old_end}"
    );

    // Every log agrees on the applied prefix, entry for entry and epoch.
    let applied = nodes
        .iter()
        .flatten()
        .map(|n| ask(n, Cmd::Status).applied)
        .min()
        .unwrap();
    assert!(applied >= 300, "{applied}");
    let wals: Vec<_> = nodes.iter().flatten().map(|n| ask(n, Cmd::Wal)).collect();
    for wal in &wals[1..] {
        assert_eq!(wal[..applied as usize], wals[0][..applied as usize]);
    }
    for node in nodes.into_iter().flatten() {
        node.cmds.send(Cmd::Kill).unwrap();
        node.thread.join().unwrap();
    }
}
