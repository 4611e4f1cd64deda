//! Stage batches: running a topology's or query's stage over a batch of
//! items on a task (one read-your-writes transaction), sending what it
//! emits to the tasks it names, and gathering their completions (failed
//! origins, ack-return values, query results) back up the tree.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::messages::{encode_items, Completion, Flow, Request, StageMsg};

use super::thread::{storage_unavailable, TaskThread};
use super::{AckLevel, FaultPoint};
use crate::error::{Error, Result};
use crate::lsm::WriteBatch;
use crate::module::topology::{Mode, Outputs, StageCtx, To};
use crate::pstate::{Overlay, Tx};
use crate::runtime::partition::task_for_key;
use crate::value::{archived, Value};

/// Runs stage `stage` of `flow` on `task` over `items`, then everything
/// downstream of it; returns how it all ended.
pub(crate) async fn run_batch(
    th: &Rc<TaskThread>,
    flow: Flow,
    stage: usize,
    task: u32,
    source: Option<usize>,
    items: Vec<(u64, Value)>,
) -> Completion {
    let rt = th.rt.clone();
    let def = &rt.def;
    let (stages, mode) = match flow {
        Flow::Stream(t) => (&def.topologies[t].stages, Mode::Stream),
        Flow::Microbatch { topology, id, attempt } => {
            (&def.topologies[topology].stages, Mode::Microbatch { id, attempt })
        }
        Flow::Query(q) => (&def.queries[q].stages, Mode::Query),
    };
    let fatal = |why: String| Completion {
        fatal: Some(why),
        ..Completion::default()
    };
    let Some(f) = stages.get(stage) else {
        return fatal(format!("stage {stage} does not exist"));
    };
    let last = stage + 1 == stages.len();
    let pstates = match th.pstates_of(task) {
        Ok(p) => p,
        Err(e) => return fatal(e.to_string()),
    };
    let source_name = source.map(|d| def.depots[d].name.as_str());
    let mut done = Completion::default();
    let apply = match (mode, th.index(task)) {
        (Mode::Stream, Ok(i)) => Some(th.apply[i].clone()),
        _ => None,
    };
    let applying = match &apply {
        Some(sem) => match sem.acquire_permit(1).await {
            Ok(p) => Some(p),
            Err(e) => return fatal(format!("task {task} is stopping: {e}")),
        },
        None => None,
    };
    // The store's writer generation the batch reads under: if a queued
    // write it reads through fails meanwhile, its own writes must not be
    // stored (they were computed from state that was lost).
    let generation = th.store.generation();
    // Run the stage locally. A stream batch leaves out records that fail
    // (their writes are dropped by running the batch again without them).
    let (out, writes) = loop {
        let overlay = match flow {
            Flow::Microbatch { topology, id, attempt } => match th.pending.borrow_mut().remove(&(topology, task)) {
                Some((pending_id, pending_attempt, o)) if (pending_id, pending_attempt) == (id, attempt) => o,
                _ => Overlay::new(),
            },
            _ => Overlay::new(),
        };
        let mut tx = match (mode, th.index(task)) {
            // Stream batches read through the writes earlier batches of
            // this task queued but the store does not show yet.
            (Mode::Stream, Ok(i)) => Tx::over_queued(&th.store, &th.queued[i]),
            _ => Tx::with_overlay(&th.store, overlay),
        };
        let mut out = Outputs::default();
        let mut failed_now = None;
        for (origin, value) in &items {
            if done.failed.contains_key(origin) {
                continue;
            }
            let emits_before = out.emits.len();
            let mut ctx = StageCtx {
                def,
                task,
                tasks: rt.placement.parallelism.tasks,
                pstates,
                tx: &mut tx,
                mode,
                source: source_name,
                origin: *origin,
                out: &mut out,
            };
            let injected = rt.fault.as_ref().is_some_and(|hook| {
                hook(&FaultPoint {
                    topology: flow_topology_name(def, flow),
                    task,
                    stage,
                    microbatch: ctx.microbatch(),
                    origin: *origin,
                    value,
                })
            });
            let mut result = if injected {
                Err(Error::Topology("fault injected by the test hook".into()))
            } else {
                f(&mut ctx, value.clone())
            };
            if result.is_ok() {
                if let Some((_, to, _)) = out.emits[emits_before..]
                    .iter()
                    .find(|(_, to, _)| (last && *to != To::Origin) || (*to == To::Origin && mode != Mode::Query))
                {
                    result = Err(Error::Topology(if *to == To::Origin {
                        "only query stages may emit to To::Origin".to_string()
                    } else {
                        format!("stage {stage} is the last stage; it cannot emit to {to:?}")
                    }));
                }
            }
            if let Err(e) = result {
                let why = format!("{} stage {stage} on task {task}: {e}", flow_name(def, flow));
                if mode == Mode::Stream {
                    failed_now = Some((*origin, why));
                    break;
                }
                if let Flow::Microbatch { topology, id, attempt } = flow {
                    th.pending
                        .borrow_mut()
                        .insert((topology, task), (id, attempt, tx.into_overlay()));
                }
                return fatal(why);
            }
        }
        match failed_now {
            Some((origin, why)) => {
                done.failed.insert(origin, why);
            }
            None => break (out, tx.into_overlay()),
        }
    };
    match flow {
        Flow::Stream(_) => {
            // The permit is released here in every case: downstream stages
            // may run on this same task and need it.
            if writes.is_empty() {
                drop(applying);
            } else if let Err(e) = commit_stream(th, task, writes, applying, generation).await {
                if storage_unavailable(&e) {
                    // Not the records' fault (a full disk, say): nothing was
                    // applied; the batch runs again once storage heals,
                    // never counted as a record failure.
                    done.unavailable
                        .get_or_insert_with(|| format!("writing PState changes: {e}"));
                } else {
                    for (o, _) in &items {
                        done.failed
                            .entry(*o)
                            .or_insert_with(|| format!("writing PState changes: {e}"));
                    }
                }
                return done;
            }
        }
        Flow::Microbatch { topology, id, attempt } => {
            th.pending.borrow_mut().insert((topology, task), (id, attempt, writes));
        }
        Flow::Query(_) => {}
    }
    done.ack_returns.extend(out.ack_returns);
    // Depot appends made by the stage.
    let mut appends = Vec::new();
    for (origin, d, record) in out.appends {
        appends.push((origin, topology_append(th, d, task, &record)));
    }
    // Emits, one batch per destination task.
    let tasks = rt.placement.parallelism.tasks;
    let mut by_task: BTreeMap<u32, Vec<(u64, Value)>> = BTreeMap::new();
    for (origin, to, value) in out.emits {
        match to {
            To::Origin => done.results.push(value),
            To::Local => by_task.entry(task).or_default().push((origin, value)),
            To::Global => by_task.entry(0).or_default().push((origin, value)),
            To::Hash(k) => by_task
                .entry(task_for_key(&k, tasks))
                .or_default()
                .push((origin, value)),
            To::Shuffle => by_task
                .entry(th.next_shuffle() % tasks)
                .or_default()
                .push((origin, value)),
            To::All => {
                for t in 0..tasks {
                    by_task.entry(t).or_default().push((origin, value.clone()));
                }
            }
        }
    }
    let mut replies = Vec::new();
    let mut local = Vec::new();
    for (to_task, batch) in by_task {
        let thread = rt.placement.thread_of_task[to_task as usize] as usize;
        if thread == th.thread as usize {
            // Same thread: no encoding, no channel. Bounded all the same:
            // this batch waits for it, and stages are finitely deep.
            let th = th.clone();
            let next: std::pin::Pin<Box<dyn std::future::Future<Output = Completion>>> =
                Box::pin(async move { run_batch(&th, flow, stage + 1, to_task, None, batch).await });
            local.push(glommio::spawn_local(next));
            continue;
        }
        let (tx, rx) = flume::bounded(1);
        let msg = StageMsg {
            flow,
            stage: stage + 1,
            task: to_task,
            items: encode_items(&batch),
            reply: tx,
        };
        let origins: Vec<u64> = batch.iter().map(|(o, _)| *o).collect();
        match rt.links[thread].stages[stage].send_async(msg).await {
            Ok(()) => replies.push((rx, origins)),
            Err(_) => fail_all(&mut done, &origins, mode, "the module is stopping"),
        }
    }
    for (origin, pending) in appends {
        match pending.await {
            Ok(()) => {}
            Err(e) if matches!(e, Error::Unavailable(_)) || storage_unavailable(&e) => {
                done.unavailable.get_or_insert_with(|| format!("depot append: {e}"));
            }
            Err(e) => fail_all(&mut done, &[origin], mode, &format!("depot append: {e}")),
        }
    }
    for task in local {
        done.merge(task.await);
    }
    for (rx, origins) in replies {
        match rx.recv_async().await {
            Ok(c) => done.merge(c),
            Err(_) => fail_all(&mut done, &origins, mode, "the module is stopping"),
        }
    }
    done
}

/// Commits a stream batch's writes. The batch takes its place in the WAL
/// while `applying` (the task's apply permit) is held, then the permit is
/// released and the next batch of the task runs while this one becomes
/// durable: it reads these writes from the task's queued layers.
pub(super) async fn commit_stream(
    th: &TaskThread,
    task: u32,
    writes: Overlay,
    applying: Option<glommio::sync::Permit<'_>>,
    generation: u64,
) -> Result<()> {
    let mut batch = WriteBatch::new();
    for (k, v) in &writes {
        match v {
            Some(v) => batch.put(k, v),
            None => batch.delete(k),
        };
    }
    let touched = TaskThread::touched(&batch);
    let queued = th.store.enqueue_under(batch, generation).await?;
    let i = th.index(task)?;
    let seq = th.queued_seq.get();
    th.queued_seq.set(seq + 1);
    let keys: Vec<Vec<u8>> = writes.keys().cloned().collect();
    {
        let mut q = th.queued[i].borrow_mut();
        for (k, v) in writes {
            q.insert(k, (seq, v));
        }
    }
    drop(applying);
    let written = th.store.wait_written(queued).await;
    {
        // Visible in the store now, unless a later batch wrote the key again.
        let mut q = th.queued[i].borrow_mut();
        for k in keys {
            if q.get(&k).is_some_and(|(s, _)| *s == seq) {
                q.remove(&k);
            }
        }
    }
    written?;
    th.notify(&touched);
    Ok(())
}

pub(super) fn fail_all(done: &mut Completion, origins: &[u64], mode: Mode, why: &str) {
    if mode == Mode::Stream {
        for o in origins {
            done.failed.entry(*o).or_insert_with(|| why.to_string());
        }
    } else if done.fatal.is_none() {
        done.fatal = Some(why.to_string());
    }
}

pub(super) fn flow_topology_name(def: &crate::module::ModuleDef, flow: Flow) -> &str {
    match flow {
        Flow::Stream(t) | Flow::Microbatch { topology: t, .. } => &def.topologies[t].name,
        Flow::Query(q) => &def.queries[q].name,
    }
}

pub(super) fn flow_name(def: &crate::module::ModuleDef, flow: Flow) -> String {
    match flow {
        Flow::Stream(t) => format!("stream topology {}", def.topologies[t].name),
        Flow::Microbatch { topology, id, attempt } => format!(
            "microbatch topology {} (microbatch {id}, attempt {attempt})",
            def.topologies[topology].name
        ),
        Flow::Query(q) => format!("query {}", def.queries[q].name),
    }
}

/// Starts a depot append from a topology running on `task`; the future
/// resolves once it is durable.
pub(super) fn topology_append(
    th: &Rc<TaskThread>,
    depot: usize,
    task: u32,
    record: &Value,
) -> impl std::future::Future<Output = Result<()>> {
    let rt = th.rt.clone();
    let d = &rt.def.depots[depot];
    let tasks = rt.placement.parallelism.tasks;
    let target = d.fixed_task(record, tasks).unwrap_or(task);
    let bytes = archived::to_bytes(record);
    async move {
        let (tx, rx) = flume::bounded(1);
        let thread = rt.placement.thread_of_task[target as usize] as usize;
        rt.links[thread]
            .internal
            .send_async(Request::Append {
                depot,
                task: target,
                record: bytes,
                ack: AckLevel::AppendAck,
                reply: Some(tx.into()),
            })
            .await
            .map_err(|_| rt.closed())?;
        rx.recv_async().await.map_err(|_| rt.closed())?.map(|_| ())
    }
}
