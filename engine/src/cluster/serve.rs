//! The loops of a task thread: each channel served with its own bound on
//! work in flight (client requests, topology appends, microbatch control,
//! stage levels), stream consumers and the microbatch coordinator started,
//! and quiescing at shutdown.

use std::collections::BTreeMap;
use std::rc::Rc;

use glommio::sync::Semaphore;

use super::dataflow::run_batch;
use super::messages::{decode_items, AppendResult, Completion, Flow, Reply, Request, StageMsg};
use super::proxy::{as_one, ProxyEvent, Subscription};
use super::replog::{AppendEntry, APPEND_HEAD_BYTES, KIND_APPEND};
use super::stream::consume;
use super::thread::{AckWaiter, TaskThread, ThreadInbox};
use super::{microbatch, AckLevel};
use crate::error::{Error, Result};
use crate::module::TopologyKind;
use crate::value::{archived, Value};

/// Runs a thread until `Shutdown`: serves its channels, runs its stream
/// consumers (and the microbatch coordinators if it owns task 0), then
/// closes its storage.
pub(crate) async fn run(th: Rc<TaskThread>, inbox: ThreadInbox) -> Result<()> {
    let client = inbox.client.clone();
    serve_until(th.clone(), inbox, std::future::pending(), Ended::Stopped).await;
    let closed = async {
        for depot in &th.logs {
            for log in depot.iter().flatten() {
                log.close().await?;
            }
        }
        th.store.close().await
    }
    .await;
    // Requests that arrived after the last one taken are dropped (their
    // callers get `Closed`), and later sends fail at once.
    drop(client.drain());
    drop(client);
    closed
}

/// Why [`serve_until`] ended: what records waiting for their processing
/// are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The module stopped (its checkpoints run here).
    Stopped,
    /// The task group's replica stopped leading (its owner runs the
    /// checkpoints).
    SteppedDown,
}

/// Serves a thread's channels until `Shutdown` comes or `stop` is ready,
/// then quiesces it: its stream consumers and microbatch coordinators
/// stop after the batch each is running, and the `Ack` appenders still
/// waiting are answered. The storage stays open.
pub(crate) async fn serve_until(
    th: Rc<TaskThread>,
    inbox: ThreadInbox,
    stop: impl std::future::Future<Output = ()>,
    ended: Ended,
) {
    let ThreadInbox {
        client,
        internal,
        control,
        stages,
    } = inbox;
    let mut loops = Vec::new();
    {
        let th = th.clone();
        loops.push(serve_loop(internal, th.rt.config.internal_inflight, move |r| {
            let th = th.clone();
            async move { handle_request(&th, r).await }
        }));
    }
    {
        let th = th.clone();
        loops.push(serve_loop(control, th.rt.config.control_inflight, move |c| {
            let th = th.clone();
            async move { microbatch::handle_control(&th, c).await }
        }));
    }
    for rx in stages {
        let th = th.clone();
        loops.push(serve_loop(rx, th.rt.config.stage_inflight, move |m: StageMsg| {
            let th = th.clone();
            async move {
                let completion = match decode_items(&m.items) {
                    Ok(items) => run_batch(&th, m.flow, m.stage, m.task, None, items).await,
                    Err(e) => Completion {
                        fatal: Some(e.to_string()),
                        ..Completion::default()
                    },
                };
                let _ = m.reply.send(completion);
            }
        }));
    }
    // Stream consumers: one per (stream topology, source depot, task).
    let mut workers = Vec::new();
    for (t, topology) in th.rt.def.topologies.iter().enumerate() {
        match topology.kind {
            TopologyKind::Stream => {
                for &d in &topology.sources {
                    for &task in &th.tasks {
                        if th.rt.def.depots[d].global && task != 0 {
                            continue;
                        }
                        let th = th.clone();
                        workers.push(glommio::spawn_local(async move { consume(th, t, d, task).await }));
                    }
                }
            }
            TopologyKind::Microbatch => {
                if th.tasks.contains(&0) {
                    let th = th.clone();
                    workers.push(glommio::spawn_local(async move { microbatch::coordinate(th, t).await }));
                }
            }
        }
    }
    th.workers.borrow_mut().extend(workers);
    let checkpoints =
        (ended == Ended::Stopped).then(|| glommio::spawn_local(super::replog::checkpoints(th.clone())).detach());
    // Client requests until shutdown.
    let permits = Rc::new(Semaphore::new(th.rt.config.client_inflight));
    let mut stop = std::pin::pin!(stop);
    loop {
        let next = futures_lite::future::or(async { client.recv_async().await.ok() }, async {
            (&mut stop).await;
            None
        })
        .await;
        let Some(request) = next else { break };
        if matches!(request, Request::Shutdown) {
            break;
        }
        if th.stopping.get() {
            // Stopping: consumers are draining what was appended before;
            // a new append is refused before it is written, so no caller
            // gets an error for a record that is durable.
            if let Request::Append { reply: Some(reply), .. } = request {
                let _ = reply.send(Err(Error::Closed(format!(
                    "module {} is stopping; the append was not taken",
                    th.rt.def.name
                ))));
                continue;
            }
        }
        let Ok(permit) = permits.acquire_static_permit(1).await else {
            break;
        };
        let th = th.clone();
        glommio::spawn_local(async move {
            handle_request(&th, request).await;
            drop(permit);
        })
        .detach();
    }
    quiesce(&th).await;
    // Waiters left (their record was taken while its consumer had already
    // stopped, e.g. a topology append) get an answer rather than none.
    for (_, waiting) in th.acks.borrow_mut().drain() {
        for (offset, w) in waiting {
            let why = match ended {
                Ended::Stopped => format!(
                    "module {} stopped before record {offset} was processed; it is durable and is processed \
                     after a restart",
                    th.rt.def.name
                ),
                Ended::SteppedDown => format!(
                    "the leader of task group {} of module {} stepped down before record {offset} was \
                     processed; it is durable and the new leader processes it",
                    th.thread, th.rt.def.name
                ),
            };
            let _ = w.reply.send(Err(Error::Closed(why)));
        }
    }
    if let Some(checkpoints) = checkpoints {
        checkpoints.cancel();
        let _ = checkpoints.await;
    }
    // The serve loops hold `th`, and `th.rt` holds senders of their own
    // channels, so they never end by themselves: cancel them, or this
    // thread's state (memtables, caches, logs) would outlive the cluster.
    for l in loops {
        l.cancel();
        let _ = l.await;
    }
}

/// Stops the stream consumers and microbatch coordinators after the batch
/// each is running.
pub(super) async fn quiesce(th: &TaskThread) {
    th.stopping.set(true);
    // New client appends are refused from here; the ones already being
    // handled finish first, so their records (and `Ack` waiters) are known
    // before consumers decide they have drained everything.
    th.appends_done.wait(|| (th.appends.get() == 0).then_some(())).await;
    th.draining.set(true);
    th.stop_waiters.wake_all();
    for d in &th.appended {
        for a in d {
            a.waiters.wake_all();
        }
    }
    let workers = std::mem::take(&mut *th.workers.borrow_mut());
    for w in workers {
        w.await;
    }
}

/// Serves `rx` with at most `inflight` handlers running at once.
pub(super) fn serve_loop<M: 'static, F, Fut>(
    rx: flume::Receiver<M>,
    inflight: u64,
    handler: F,
) -> glommio::task::JoinHandle<()>
where
    F: Fn(M) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    glommio::spawn_local(async move {
        let permits = Rc::new(Semaphore::new(inflight));
        while let Ok(m) = rx.recv_async().await {
            let Ok(permit) = permits.acquire_static_permit(1).await else {
                return;
            };
            let fut = handler(m);
            glommio::spawn_local(async move {
                fut.await;
                drop(permit);
            })
            .detach();
        }
    })
    .detach()
}

pub(super) async fn handle_request(th: &Rc<TaskThread>, request: Request) {
    match request {
        Request::Append {
            depot,
            task,
            record,
            ack,
            reply,
        } => {
            th.appends.set(th.appends.get() + 1);
            append(th, depot, task, record, ack, reply).await;
            th.appends.set(th.appends.get() - 1);
            th.appends_done.wake_all();
        }
        Request::Read {
            depot,
            task,
            start,
            end,
            bytes_max,
            reply,
        } => {
            let result = match th.log(depot, task) {
                Ok(log) => log
                    .read(start, end, bytes_max)
                    .await
                    .map(|records| records.into_iter().map(|r| (r.offset, r.payload)).collect()),
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Request::Select {
            pstate,
            task,
            path,
            reply,
        } => {
            let result = th
                .pstates_of(task)
                .and_then(|p| p[pstate].select_stored(&th.store, &path));
            let _ = reply.send(result);
        }
        Request::Invoke {
            query,
            task,
            args,
            reply,
        } => {
            let _ = reply.send(invoke(th, query, task, &args).await);
        }
        Request::Subscribe {
            pstate,
            task,
            path,
            events,
            reply,
        } => {
            let result = th.pstates_of(task).and_then(|p| p[pstate].select(&th.store, &path));
            let _ = reply.send(result.map(|initial| {
                let initial = as_one(initial);
                // A new channel has room for the first event.
                let _ = events.try_send(ProxyEvent::Initial(initial.clone()));
                th.subscriptions.borrow_mut().push(Subscription {
                    pstate,
                    task,
                    path,
                    last: initial,
                    events,
                    stale: false,
                });
            }));
        }
        Request::Quiesce { reply } => {
            quiesce(th).await;
            let _ = reply.send(Ok(()));
        }
        Request::Adopt(conn) => {
            glommio::spawn_local(super::connection::serve(th.clone(), *conn)).detach();
        }
        Request::Shutdown => {}
    }
}

pub(super) async fn append(
    th: &Rc<TaskThread>,
    depot: usize,
    task: u32,
    record: Vec<u8>,
    ack: AckLevel,
    reply: Option<Reply<AppendResult>>,
) {
    let send = |r: Result<AppendResult>| {
        if let Some(reply) = &reply {
            let _ = reply.send(r);
        }
    };
    let (log, appended) = match th.log(depot, task).and_then(|l| Ok((l, th.appended(depot, task)?))) {
        Ok(x) => x,
        Err(e) => return send(Err(e)),
    };
    let broken = || {
        appended.broken.borrow().as_ref().map(|why| Error::Poisoned {
            what: format!(
                "partition {task} of depot {} (it is written again from the task group log when its worker \
                 restarts)",
                th.rt.def.depots[depot].name
            ),
            cause: why.clone(),
        })
    };
    if let Some(e) = broken() {
        return send(Err(e));
    }
    // The record must fit the partition as well as the task group log, and
    // the partition's queue bounds what waits to be written to it.
    let limit = th.rt.config.log.record_bytes_max as usize;
    if let Err(e) = Error::check_limit("record", "record_bytes_max", record.len(), limit) {
        return send(Err(e));
    }
    if let Err(e) = log.wait_room(record.len()).await {
        return send(Err(e));
    }
    // The entry gets its partition offset when it takes its place in the
    // task group log, and is written to the partition once durable, in log
    // order.
    let record = Rc::new(record);
    let placed = Rc::new(std::cell::Cell::new((0u64, 0u64, 0u64)));
    let depot_id = th.rt.depot_ids[depot];
    let on_applied: Box<dyn FnOnce()> = {
        let th = Rc::downgrade(th);
        let (record, placed) = (record.clone(), placed.clone());
        Box::new(move || {
            let Some(th) = th.upgrade() else { return };
            if let (Ok(log), Ok(appended)) = (th.log(depot, task), th.appended(depot, task)) {
                let (at, offset, _) = placed.get();
                appended.apply(log, at, offset, &record);
            }
            for &t in &th.rt.microbatch_readers[depot] {
                th.rt.microbatch(t).signal_appended();
            }
        })
    };
    let fill = |b: &mut [u8], at: crate::log::Placed| {
        let offset = appended.assign(log, at);
        placed.set((at.offset, offset, at.generation));
        AppendEntry {
            depot: depot_id,
            task,
            offset,
            record: &record,
        }
        .encode(b);
    };
    let queued = match th
        .store
        .enqueue_entry(KIND_APPEND, APPEND_HEAD_BYTES + record.len(), fill, on_applied)
        .await
    {
        Ok(q) => q,
        Err(e) => return send(Err(e)),
    };
    let (_, offset, generation) = placed.get();
    let consumers = th.rt.stream_consumers[depot];
    let waits_for_processing = ack == AckLevel::Ack && consumers > 0 && reply.is_some();
    if waits_for_processing {
        // Registered before the record is durable, so before any consumer
        // can read it.
        th.acks.borrow_mut().entry((depot, task)).or_default().insert(
            offset,
            AckWaiter {
                remaining: consumers,
                ack_returns: BTreeMap::new(),
                error: None,
                task,
                reply: reply.clone().expect("checked"),
                generation,
            },
        );
    }
    let written = async {
        th.store.wait_written(queued).await?;
        if let Some(e) = broken() {
            return Err(e);
        }
        // Durable in the task group log; readable in the partition once
        // this write completes.
        log.wait_durable(offset + 1).await
    }
    .await;
    if let Err(e) = written {
        if waits_for_processing {
            if let Some(m) = th.acks.borrow_mut().get_mut(&(depot, task)) {
                // Only this append's waiter: a later append may hold the
                // offset by now.
                if m.get(&offset).is_some_and(|w| w.generation == generation) {
                    m.remove(&offset);
                }
            }
        }
        return send(Err(e));
    }
    if !waits_for_processing {
        send(Ok(AppendResult {
            task,
            offset: (ack != AckLevel::None).then_some(offset),
            ack_returns: BTreeMap::new(),
        }));
    }
}

pub(super) async fn invoke(th: &Rc<TaskThread>, query: usize, task: u32, args: &[u8]) -> Result<Value> {
    let def = &th.rt.def.queries[query];
    let args = archived::from_bytes(args).map_err(|e| Error::Schema(format!("query arguments: {e}")))?;
    let mut completion = run_batch(th, Flow::Query(query), 0, task, None, vec![(0, args.clone())]).await;
    if let Some(why) = completion.attempt_failure() {
        return Err(Error::Topology(format!("query {} failed: {why}", def.name)));
    }
    (def.aggregate)(&args, completion.results)
        .map_err(|e| Error::Topology(format!("query {} failed in its aggregator: {e}", def.name)))
}
