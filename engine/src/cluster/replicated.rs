//! Replicated task groups: each task thread of a module with a
//! replication factor above 1 runs as `RF` replicas, each on an OS thread
//! of its own over its own copy of the task group's storage, one of them
//! leading (see [`crate::replication`] for the protocol).
//!
//! A replica runs in *incarnations*. Each opens the storage as a follower
//! (the task group log applied only as far as the tables hold; the rest
//! waits for the leader's applied offset), registers with its host (a new
//! incarnation number) and runs the replication driver. Entries applied
//! on a follower reach the store through its apply limit, and depot
//! appends among them are written into their partitions from the log
//! (the materializer, skipping what a partition holds). Once the replica
//! leads and has applied everything it held at takeover (the driver's
//! *serving*), and every applied append is in its partition, the task
//! thread is assembled over the same storage and serves the thread's
//! channels: client requests, stage batches, stream consumers and the
//! microbatch coordinator. The replicas of a thread share its channels'
//! receiving ends, and only the serving leader takes from them, so
//! requests reach the leader wherever they were sent from.
//!
//! When the replica stops leading (or its driver fails), the incarnation
//! ends: serving stops (appends not yet applied answer "outcome unknown",
//! records waiting for processing are told the new leader processes
//! them), the host is told the replica is gone (another is elected), the
//! storage is closed, the incarnation's executor is dropped with every
//! task still on it, and a new incarnation opens the storage again from
//! disk. Starting over from disk is what keeps a replica's in-memory
//! state (partition offsets, waiters, queued writes) from ever disagreeing
//! with a log that a new leader may cut.
//!
//! Trimming: a replica lets its log be trimmed below what its partitions
//! hold; a leader also keeps what its followers still need, up to
//! [`ReplicationConfig::retained_entries`](super::config::ReplicationConfig::retained_entries)
//! below its applied offset, and tells its core where the log now starts
//! (a follower further behind needs a snapshot, not built yet).

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::launched::task_group_dir;
use super::serve::{quiesce, serve_until, Ended};
use super::thread::{assemble, open_storage, Storage, TaskThread, ThreadInbox};
use super::ModuleRuntime;
use crate::error::{Error, Result};
use crate::executor::ExecutorConfig;
use crate::replication::driver::{recover, Driver, DriverSettings, Event, ReplicaHost};
use crate::replication::{Input, Replica, ReplicaId};
use crate::sync::Waiters;

/// What a replica's owner tells it.
pub(crate) enum Command {
    /// Stop the stream consumers and microbatch coordinators after their
    /// batch (the module is stopping); answered at once by a follower.
    Quiesce { reply: flume::Sender<()> },
    /// Stop serving, close the storage cleanly, end.
    Shutdown,
    /// End at once, as a kill would (what is durable stays).
    Kill,
}

/// How an incarnation ended.
enum Next {
    /// Start a new incarnation.
    Restart,
    /// The replica ends with this result.
    Exit(Result<()>),
}

/// One replica of task thread `thread`, as its owner starts it.
pub(crate) struct ReplicaStart {
    pub rt: Arc<ModuleRuntime>,
    pub thread: u32,
    pub id: ReplicaId,
    /// The module directory of this replica (its task group's directory
    /// is inside).
    pub dir: PathBuf,
    pub inbox: ThreadInbox,
    pub host: Arc<dyn ReplicaHost>,
    pub executor: ExecutorConfig,
}

/// Runs the replica on the calling OS thread until [`Command::Shutdown`]
/// or [`Command::Kill`] (or its owner drops the command channel). `ready`
/// gets the first incarnation's opening result.
pub(crate) fn run(
    start: ReplicaStart,
    commands: flume::Receiver<Command>,
    ready: flume::Sender<Result<()>>,
) -> Result<()> {
    let mut ready = Some(ready);
    let mut failures = 0u32;
    loop {
        let next = start.executor.block_on(incarnation(&start, &commands, ready.take()))?;
        match next {
            Next::Exit(result) => return result,
            Next::Restart => {
                failures = failures.saturating_add(1);
                // A replica that keeps failing (a broken disk) retries
                // less and less often, up to once a second.
                std::thread::sleep(Duration::from_millis(u64::from(failures.min(20)) * 50));
                if !commands.is_empty() || commands.is_disconnected() {
                    match commands.try_recv() {
                        Ok(Command::Quiesce { reply }) => {
                            let _ = reply.send(());
                        }
                        Ok(Command::Shutdown | Command::Kill) | Err(flume::TryRecvError::Disconnected) => {
                            return Ok(());
                        }
                        Err(flume::TryRecvError::Empty) => {}
                    }
                }
            }
        }
    }
}

/// Where appends applied on a follower stand on their way into the
/// partitions.
struct Materializer {
    /// Every depot append of the log below this is in its partition.
    done: Cell<u64>,
    wake: Waiters,
    stopped: Cell<bool>,
    failed: std::cell::RefCell<Option<String>>,
}

async fn incarnation(
    start: &ReplicaStart,
    commands: &flume::Receiver<Command>,
    ready: Option<flume::Sender<Result<()>>>,
) -> Next {
    let ReplicaStart {
        rt, thread, id, dir, ..
    } = start;
    let (rt, thread, id) = (rt.clone(), *thread, *id);
    let host = start.host.clone();
    let tg = task_group_dir(dir, thread);
    let fresh = !tg.join("pstates").exists();
    // The host's inbox forwards to the driver's, made once the host gave
    // the incarnation.
    let (forward, forwarded) = flume::bounded(DriverSettings::default().inbox_max);
    // In a worker process, peers' messages for this replica arrive through
    // the module's runtime.
    let mailbox = rt
        .replica
        .as_ref()
        .map(|p| (&p.mailboxes[thread as usize], forward.clone()));
    let opened = async {
        let storage = open_storage(&rt, thread, dir, 0).await?;
        let (incarnation, lost) = host.begin(forward, fresh)?;
        Ok::<_, Error>((storage, incarnation, lost))
    }
    .await;
    if let (Ok(_), Some((slot, inbox))) = (&opened, mailbox) {
        *slot.lock().expect("mailbox") = Some(inbox);
    }
    let serving_flag = rt.replica.as_ref().map(|p| p.serving[thread as usize].clone());
    let (storage, incarnation, lost) = match opened {
        Ok(v) => v,
        Err(e) => {
            if let Some(ready) = ready {
                let _ = ready.send(Err(e));
                return Next::Exit(Ok(()));
            }
            tracing::warn!(
                "replica {id} of task group {thread} of module {}: cannot open its storage: {e}",
                rt.def.name
            );
            return Next::Restart;
        }
    };
    let store = storage.store.clone();
    let recovered = match recover(&store, lost).await {
        Ok(r) => r,
        Err(e) => {
            host.end();
            if let Some(ready) = ready {
                let _ = ready.send(Err(e));
                return Next::Exit(Ok(()));
            }
            return Next::Restart;
        }
    };
    let core = Replica::new(id, incarnation, rt.config.replication.settings(), recovered);
    let events: Rc<std::cell::RefCell<Vec<Event>>> = Rc::default();
    let woken = Rc::new(Waiters::default());
    let driver = {
        let sender = host.clone();
        let (events, woken) = (events.clone(), woken.clone());
        Driver::new(
            store.clone(),
            core,
            Box::new(move |to, message| sender.send(to, message)),
            host.metastore(),
            Box::new(move |event| {
                events.borrow_mut().push(event);
                woken.wake_all();
            }),
            DriverSettings::default(),
        )
    };
    {
        let to = driver.inbox();
        glommio::spawn_local(async move {
            while let Ok(input) = forwarded.recv_async().await {
                if to.send_async(input).await.is_err() {
                    return;
                }
            }
        })
        .detach();
    }
    host.report(driver.status());
    let materializer = Rc::new(Materializer {
        done: Cell::new(store.applied_end()),
        wake: Waiters::default(),
        stopped: Cell::new(false),
        failed: std::cell::RefCell::default(),
    });
    {
        let m = Rc::downgrade(&materializer);
        store.set_entry_hook(Box::new(move |_, _| {
            if let Some(m) = m.upgrade() {
                m.wake.wake_all();
            }
        }));
    }
    glommio::spawn_local(materialize(rt.clone(), storage.clone(), materializer.clone())).detach();
    let driver_result: Rc<std::cell::RefCell<Option<Result<()>>>> = Rc::default();
    {
        let (driver, result, woken) = (driver.clone(), driver_result.clone(), woken.clone());
        glommio::spawn_local(async move {
            let r = driver.run().await;
            *result.borrow_mut() = Some(r);
            woken.wake_all();
        })
        .detach();
    }
    let serving: Rc<Cell<bool>> = Rc::default();
    glommio::spawn_local(checkpoints(
        rt.clone(),
        storage.clone(),
        driver.clone(),
        materializer.clone(),
        serving.clone(),
    ))
    .detach();
    if let Some(ready) = ready {
        let _ = ready.send(Ok(()));
    }
    let mut leading: Option<Leading> = None;
    let mut last_report = std::time::Instant::now();
    let next = loop {
        if last_report.elapsed() >= Duration::from_millis(50) {
            host.report(driver.status());
            last_report = std::time::Instant::now();
        }
        if let Some(Event::Fatal { reason }) = events.borrow().iter().find(|e| matches!(e, Event::Fatal { .. })) {
            break Next::Exit(Err(Error::Unavailable(format!(
                "replica {id} of task group {thread} of module {} stopped: {reason}",
                rt.def.name
            ))));
        }
        for event in events.borrow_mut().drain(..) {
            if let Event::SnapshotNeeded { to } = event {
                tracing::warn!(
                    "task group {thread} of module {}: replica {to} is behind the log this leader keeps and \
                     needs the task group's files, which are not shipped yet; it stays out of sync",
                    rt.def.name
                );
            }
        }
        if let Some(result) = driver_result.borrow_mut().take() {
            if let Err(e) = &result {
                tracing::warn!(
                    "replica {id} of task group {thread} of module {}: {e}; it starts again",
                    rt.def.name
                );
            }
            break Next::Restart;
        }
        if let Some(why) = materializer.failed.borrow().clone() {
            tracing::warn!(
                "replica {id} of task group {thread} of module {}: writing applied appends into their \
                 partitions failed: {why}; it starts again",
                rt.def.name
            );
            break Next::Restart;
        }
        if leading.is_none() && store.applied_end() > materializer.done.get() {
            // Applied batches do not call the entry hook: the
            // materializer looks again on every turn.
            materializer.wake.wake_all();
        }
        match &leading {
            None if driver.serving() && materializer.done.get() >= store.applied_end() => {
                materializer.stopped.set(true);
                match assemble(rt.clone(), thread, &storage) {
                    Ok(th) => {
                        serving.set(true);
                        leading = Some(Leading::start(th, start.inbox.clone(), serving_flag.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(
                            "replica {id} of task group {thread} of module {}: cannot serve: {e}",
                            rt.def.name
                        );
                        break Next::Restart;
                    }
                }
            }
            Some(_) if !driver.serving() => break Next::Restart,
            _ => {}
        }
        let command = futures_lite::future::or(async { commands.recv_async().await.ok().map(Some) }, async {
            futures_lite::future::or(woken.next_wake(), glommio::timer::sleep(Duration::from_millis(10))).await;
            Some(None)
        })
        .await;
        match command {
            Some(None) => {}
            Some(Some(Command::Quiesce { reply })) => {
                if let Some(l) = &leading {
                    quiesce(&l.th).await;
                }
                let _ = reply.send(());
            }
            Some(Some(Command::Shutdown)) | None => break Next::Exit(Ok(())),
            Some(Some(Command::Kill)) => {
                // Nothing is closed cleanly; the task thread only stops
                // (its tasks would otherwise outlive the executor).
                if let Some(p) = &rt.replica {
                    *p.mailboxes[thread as usize].lock().expect("mailbox") = None;
                }
                host.end();
                driver.stop();
                if let Some(l) = leading {
                    l.stop().await;
                }
                return Next::Exit(Ok(()));
            }
        }
    };
    // Another replica may lead from here on.
    if let Some(p) = &rt.replica {
        *p.mailboxes[thread as usize].lock().expect("mailbox") = None;
    }
    host.end();
    if let Some(l) = leading {
        l.stop().await;
    }
    driver.stop();
    materializer.stopped.set(true);
    materializer.wake.wake_all();
    let closed = storage.close().await;
    match next {
        Next::Exit(Ok(())) => Next::Exit(closed),
        other => other,
    }
}

/// The task thread served by a leading replica.
struct Leading {
    th: Rc<TaskThread>,
    stop: Rc<Waiters>,
    stopped: Rc<Cell<bool>>,
    serving: glommio::task::JoinHandle<()>,
    /// In a worker process: set while it serves (peers' messages for the
    /// thread are taken only then).
    flag: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Leading {
    fn start(th: Rc<TaskThread>, inbox: ThreadInbox, flag: Option<Arc<std::sync::atomic::AtomicBool>>) -> Leading {
        if let Some(f) = &flag {
            f.store(true, std::sync::atomic::Ordering::Release);
        }
        let stop = Rc::new(Waiters::default());
        let stopped = Rc::new(Cell::new(false));
        let serving = {
            let (th, stop, stopped) = (th.clone(), stop.clone(), stopped.clone());
            glommio::spawn_local(async move {
                let until = {
                    let stopped = stopped.clone();
                    async move { stop.wait(|| stopped.get().then_some(())).await }
                };
                serve_until(th, inbox, until, Ended::SteppedDown).await;
            })
            .detach()
        };
        Leading {
            th,
            stop,
            stopped,
            serving,
            flag,
        }
    }

    async fn stop(self) {
        if let Some(f) = &self.flag {
            f.store(false, std::sync::atomic::Ordering::Release);
        }
        self.stopped.set(true);
        self.stop.wake_all();
        let _ = self.serving.await;
    }
}

/// Writes the depot appends applied since it last ran into their
/// partitions, until stopped (once the replica serves, its own appends go
/// there as they are applied).
async fn materialize(rt: Arc<ModuleRuntime>, storage: Storage, m: Rc<Materializer>) {
    loop {
        let applied = storage.store.applied_end();
        let from = m.done.get();
        if m.stopped.get() {
            return;
        }
        if applied > from {
            match super::replog::materialize(
                &rt,
                &storage.store,
                &storage.tasks,
                &storage.logs,
                &storage.dir,
                from,
                applied,
            )
            .await
            {
                Ok(_) => m.done.set(applied),
                Err(e) => {
                    *m.failed.borrow_mut() = Some(e.to_string());
                    return;
                }
            }
            continue;
        }
        m.wake
            .wait(|| (m.stopped.get() || storage.store.applied_end() > m.done.get()).then_some(()))
            .await;
    }
}

/// Checkpoints of a replica (see the module's note on trimming), every
/// `checkpoint_interval`.
async fn checkpoints(
    rt: Arc<ModuleRuntime>,
    storage: Storage,
    driver: Driver,
    m: Rc<Materializer>,
    serving: Rc<Cell<bool>>,
) {
    let mut failures = 0u32;
    let mut told_start = storage.store.wal().start_offset();
    loop {
        glommio::timer::sleep(rt.config.checkpoint_interval).await;
        let applied = storage.store.applied_end();
        // Applied appends are in their partitions: as they are applied
        // while serving, as far as the materializer got before.
        let mut floor = if serving.get() {
            applied
        } else {
            m.done.get().min(applied)
        };
        let keep = applied.saturating_sub(rt.config.replication.retained_entries);
        if let Some(needed) = driver.retain_from() {
            floor = floor.min(needed.max(keep));
        }
        let done = super::replog::checkpoint_below(
            rt.config.replog_entry_bytes_max,
            &storage.store,
            &storage.logs,
            &storage.trim_floor,
            floor,
        )
        .await;
        match done {
            Ok(()) => {
                failures = 0;
                let start = storage.store.wal().start_offset();
                if start > told_start {
                    told_start = start;
                    let _ = driver.inbox().try_send(Input::Trimmed { start });
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures.is_power_of_two() {
                    tracing::warn!(
                        "task group {} of module {}: checkpoint failed ({failures} in a row): {e}",
                        storage.dir.display(),
                        rt.def.name
                    );
                }
            }
        }
    }
}
