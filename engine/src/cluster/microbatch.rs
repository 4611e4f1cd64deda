//! Microbatch topologies: exactly-once, atomic across tasks.
//!
//! A coordinator on the thread of task 0 runs microbatches one after the
//! other. For microbatch `n`:
//!
//! 1. **Plan.** It asks every thread for the durable ends of the source
//!    partitions, takes from each partition the records since the last
//!    decided microbatch (at most `microbatch_records_max` of the module's configuration), and stores the plan
//!    (`n`, ranges). A retry, even after a restart, uses the same ranges.
//! 2. **Process.** Every thread runs stage 0 over its ranges; stages write
//!    into per-(topology, task) overlays kept in memory, never the store.
//!    Any failure aborts the attempt everywhere (overlays dropped) and the
//!    attempt is retried from the same starting state.
//! 3. **Prepare.** Every task with changes stores them durably as pending
//!    (`p` keys) tagged with `n` (`q` key).
//! 4. **Decide.** The coordinator stores "decided `n`" with the new ends.
//!    This write is the commit point.
//! 5. **Commit.** With client reads held off (the module's read gate),
//!    every task applies its pending changes, deletes them and records
//!    "applied `n`" in one atomic batch.
//!
//! After a restart the coordinator first sends `Recover(decided)`: a task
//! whose pending changes belong to the decided microbatch and were not yet
//! applied applies them; pending changes of a later microbatch are dropped.
//! So effects are applied exactly once, and no reader sees part of one.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::dataflow::run_batch;
use super::messages::{Control, Flow, Reply};
use super::thread::TaskThread;
use super::{meta_key, ModuleRuntime};
use crate::error::{Error, Result};
use crate::lsm::WriteBatch;
use crate::module::TopologyKind;
use crate::value::{archived, Value};

/// Payload bytes read per log read while processing.
const READ_BYTES: usize = 1 << 20;
/// How long another worker holds its reads off for a commit at most (if
/// the coordinator goes away in between).
const GATE_LEASE: Duration = Duration::from_secs(10);

type Ranges = Vec<(usize, u32, u64, u64)>;
type Ends = BTreeMap<(usize, u32), u64>;

/// Runs the coordinator of microbatch topology `topology` until shutdown.
///
/// When a step fails in a way a retry of the attempt cannot fix (another
/// worker is away while a decided microbatch commits, a storage error), the
/// coordinator starts over as after a restart: it recovers every task to
/// the last decided microbatch and goes on from there.
pub(crate) async fn coordinate(th: Rc<TaskThread>, topology: usize) {
    th.rt.wait_processing(|| th.stopping.get()).await;
    let mut restarts = 0u32;
    loop {
        let Err(e) = coordinate_inner(&th, topology).await else {
            return;
        };
        if th.stopping.get() {
            return;
        }
        let rt = &th.rt;
        if restarts.is_power_of_two() {
            tracing::warn!(
                "microbatch topology {} of module {}: starting over from the last decided microbatch \
                 ({} times so far): {e}",
                rt.def.topologies[topology].name,
                rt.def.name,
                restarts + 1
            );
        }
        rt.microbatch(topology).note_failure(&e.to_string());
        restarts = restarts.saturating_add(1);
        glommio::timer::sleep(Duration::from_millis(100u64 << restarts.min(4))).await;
    }
}

/// Closes the read gate of every worker of the module (a commit spans
/// them), this one first.
async fn close_gates(rt: &ModuleRuntime) -> Result<()> {
    rt.gate.close().await;
    let others = rt.remote_gate_threads();
    let closed = broadcast_to(rt, &others, |reply| Control::GateClose {
        lease_ms: GATE_LEASE.as_millis() as u64,
        reply,
    })
    .await;
    if closed.is_err() {
        open_gates(rt).await;
    }
    closed.map(|_| ())
}

async fn open_gates(rt: &ModuleRuntime) {
    let others = rt.remote_gate_threads();
    // A worker that cannot be reached opens its gate when the lease ends.
    let _ = broadcast_to(rt, &others, |reply| Control::GateOpen { reply }).await;
    rt.gate.open();
}

fn corrupt(th: &TaskThread, what: &str) -> Error {
    Error::Corrupt {
        path: th.store.wal().dir().to_path_buf(),
        offset: 0,
        position: 0,
        reason: format!("microbatch state: {what}"),
    }
}

/// Stored ranges name depots by their stable ids (never by position).
fn ranges_value(rt: &ModuleRuntime, id: u64, ranges: &[(usize, u32, u64, u64)]) -> Value {
    let mut flat = vec![Value::Int(id as i64)];
    for &(d, t, s, e) in ranges {
        flat.extend([i64::from(rt.depot_ids[d]), t as i64, s as i64, e as i64].map(Value::Int));
    }
    Value::List(flat)
}

fn load_ranges(th: &TaskThread, key: &[u8]) -> Result<Option<(u64, Ranges)>> {
    let Some(bytes) = th.store.get(key)? else {
        return Ok(None);
    };
    let v = archived::from_bytes(&bytes).map_err(|e| corrupt(th, &e.to_string()))?;
    let Value::List(flat) = v else {
        return Err(corrupt(th, "not a list"));
    };
    let ints: Vec<i64> = flat
        .iter()
        .map(|v| v.as_int().ok_or_else(|| corrupt(th, "not an int")))
        .collect::<Result<_>>()?;
    let (id, rest) = ints.split_first().ok_or_else(|| corrupt(th, "empty"))?;
    let mut ranges = Vec::new();
    for c in rest.chunks_exact(4) {
        let id = u16::try_from(c[0]).map_err(|_| corrupt(th, &format!("depot id {} out of range", c[0])))?;
        // A depot the definition no longer has (removed by an update)
        // keeps its id; its ranges are simply not read any more.
        if let Some(depot) = th.rt.depot_of_id(id) {
            ranges.push((depot, c[1] as u32, c[2] as u64, c[3] as u64));
        }
    }
    Ok(Some((*id as u64, ranges)))
}

/// The longest pause between two asks of an idle microbatch coordinator
/// whose depots have partitions on other workers (and of a paused one):
/// the most a first record there waits after a quiet spell before its
/// microbatch is planned.
const IDLE_POLL_MAX: Duration = Duration::from_millis(100);

/// The same when every partition is on this process: its records wake the
/// coordinator themselves, so the poll is only a safety net.
const IDLE_POLL_ALL_LOCAL: Duration = Duration::from_secs(1);

async fn coordinate_inner(th: &Rc<TaskThread>, topology: usize) -> Result<()> {
    let rt = th.rt.clone();
    let name = &rt.def.topologies[topology].name;
    let shared = rt.microbatch(topology);
    let decided_key = meta_key(0, b'd', name);
    let plan_key = meta_key(0, b'n', name);
    let (mut decided, mut ends): (u64, Ends) = match load_ranges(th, &decided_key)? {
        Some((id, r)) => (id, r.into_iter().map(|(d, t, _, e)| ((d, t), e)).collect()),
        None => (0, Ends::new()),
    };
    // Recovery may apply a decided microbatch on some tasks: no read may
    // see that half done.
    close_gates(&rt).await?;
    let recovered = broadcast(&rt, |reply| Control::Recover {
        topology,
        decided,
        reply,
    })
    .await;
    open_gates(&rt).await;
    recovered?;
    shared.publish(decided, &ends);
    let mut plan = load_ranges(th, &plan_key)?
        .filter(|(id, _)| *id == decided + 1)
        .map(|(_, r)| r);
    let mut attempt = 0u32;
    // While no depot has new records, the coordinator asks less and less
    // often (1 ms doubling to the idle poll): each ask is a message to every
    // task thread, and asking every millisecond kept an idle worker busy.
    // A record written on this process wakes it at once; records on other
    // workers' partitions are found by the poll.
    let idle_max = if (0..rt.placement.parallelism.threads as usize).all(|t| rt.is_local(t)) {
        IDLE_POLL_ALL_LOCAL
    } else {
        IDLE_POLL_MAX
    };
    let mut idle = Duration::from_millis(1);
    loop {
        if th.stopping.get() {
            return Ok(());
        }
        if plan.is_none() && shared.paused.load(Ordering::Acquire) {
            glommio::timer::sleep(IDLE_POLL_MAX).await;
            continue;
        }
        let id = decided + 1;
        let ranges = match plan.take() {
            Some(r) => r,
            None => {
                let now = broadcast(&rt, |reply| Control::Ends { topology, reply }).await?;
                let ranges: Ranges = now
                    .into_iter()
                    .flatten()
                    .map(|(d, t, end)| {
                        let start = ends.get(&(d, t)).copied().unwrap_or(0);
                        (
                            d,
                            t,
                            start,
                            end.min(start + rt.config.microbatch_records_max).max(start),
                        )
                    })
                    .collect();
                if ranges.iter().all(|r| r.2 == r.3) {
                    // A signal left from records this ask already saw.
                    let _ = shared.appended.1.try_recv();
                    let signal = async {
                        let _ = shared.appended.1.recv_async().await;
                    };
                    let stop = th.stop_waiters.wait(|| th.stopping.get().then_some(()));
                    let pause = glommio::timer::sleep(idle);
                    futures_lite::future::or(futures_lite::future::or(signal, stop), async {
                        pause.await;
                    })
                    .await;
                    idle = (idle * 2).min(idle_max);
                    continue;
                }
                idle = Duration::from_millis(1);
                let mut batch = WriteBatch::new();
                batch.put(&plan_key, archived::to_bytes(&ranges_value(&rt, id, &ranges)));
                th.store.write(batch).await?;
                ranges
            }
        };
        let result = attempt_microbatch(&rt, topology, id, attempt, &ranges).await;
        if let Err(e) = result {
            let _ = broadcast(&rt, |reply| Control::Abort { topology, id, reply }).await;
            if th.stopping.get() {
                return Ok(());
            }
            shared.note_failure(&e.to_string());
            if matches!(e, Error::LimitExceeded { .. }) && ranges.iter().any(|r| r.3 - r.2 > 1) {
                // Too much for one atomic batch: plan smaller ranges.
                let smaller: Ranges = ranges
                    .iter()
                    .map(|&(d, t, s, e)| (d, t, s, s + (e - s).div_ceil(2)))
                    .collect();
                let mut batch = WriteBatch::new();
                batch.put(&plan_key, archived::to_bytes(&ranges_value(&rt, id, &smaller)));
                th.store.write(batch).await?;
                plan = Some(smaller);
                continue;
            }
            attempt += 1;
            glommio::timer::sleep(Duration::from_millis(u64::from(attempt.min(100)) * 10)).await;
            plan = Some(ranges);
            continue;
        }
        // The commit point.
        let mut next_ends = ends.clone();
        for &(d, t, _, e) in &ranges {
            next_ends.insert((d, t), e);
        }
        let all: Ranges = next_ends.iter().map(|(&(d, t), &e)| (d, t, e, e)).collect();
        let mut batch = WriteBatch::new();
        batch.put(&decided_key, archived::to_bytes(&ranges_value(&rt, id, &all)));
        batch.delete(&plan_key);
        th.store.write(batch).await?;
        // Apply everywhere while no client read runs.
        close_gates(&rt).await?;
        let applied = broadcast(&rt, |reply| Control::Commit { topology, id, reply }).await;
        open_gates(&rt).await;
        // A task that could not apply (its worker away) applies when the
        // coordinator starts over and recovers to this decided microbatch.
        applied?;
        decided = id;
        ends = next_ends;
        attempt = 0;
        shared.publish(decided, &ends);
    }
}

async fn attempt_microbatch(rt: &ModuleRuntime, topology: usize, id: u64, attempt: u32, ranges: &Ranges) -> Result<()> {
    // Every thread is told (even one without ranges: it may get stage
    // batches), so one that restarts during the attempt cannot prepare it.
    let mut replies = Vec::new();
    for thread in 0..rt.links.len() {
        let mine: Ranges = ranges
            .iter()
            .filter(|r| rt.placement.thread_of_task[r.1 as usize] as usize == thread)
            .copied()
            .collect();
        let (tx, rx) = flume::bounded(1);
        rt.links[thread]
            .control
            .send_async(Control::Process {
                topology,
                id,
                attempt,
                ranges: mine,
                reply: tx.into(),
            })
            .await
            .map_err(|_| rt.closed())?;
        replies.push(rx);
    }
    let mut first = None;
    for rx in replies {
        if let Err(e) = rx.recv_async().await.map_err(|_| rt.closed())? {
            first.get_or_insert(e);
        }
    }
    if let Some(e) = first {
        return Err(e);
    }
    broadcast(rt, |reply| Control::Prepare {
        topology,
        id,
        attempt,
        reply,
    })
    .await?;
    Ok(())
}

/// Sends a control message to every thread and collects the answers; the
/// first error wins.
async fn broadcast<T>(rt: &ModuleRuntime, make: impl Fn(Reply<T>) -> Control) -> Result<Vec<T>> {
    let all: Vec<usize> = (0..rt.links.len()).collect();
    broadcast_to(rt, &all, make).await
}

/// Sends a control message to `threads` and collects the answers.
async fn broadcast_to<T>(rt: &ModuleRuntime, threads: &[usize], make: impl Fn(Reply<T>) -> Control) -> Result<Vec<T>> {
    let mut replies = Vec::new();
    for &thread in threads {
        let (tx, rx) = flume::bounded(1);
        rt.links[thread]
            .control
            .send_async(make(tx.into()))
            .await
            .map_err(|_| rt.closed())?;
        replies.push(rx);
    }
    let mut out = Vec::new();
    let mut first = None;
    for rx in replies {
        match rx.recv_async().await.map_err(|_| rt.closed())? {
            Ok(v) => out.push(v),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(out), Err)
}

/// Serves one control message on a task thread.
pub(crate) async fn handle_control(th: &Rc<TaskThread>, control: Control) {
    match control {
        Control::Ends { topology, reply } => {
            let _ = reply.send(ends(th, topology));
        }
        Control::Process {
            topology,
            id,
            attempt,
            ranges,
            reply,
        } => {
            th.begun.borrow_mut().insert(topology, (id, attempt));
            let _ = reply.send(process(th, topology, id, attempt, ranges).await);
        }
        Control::Prepare {
            topology,
            id,
            attempt,
            reply,
        } => {
            let begun = th.begun.borrow().get(&topology).copied();
            let _ = reply.send(if begun == Some((id, attempt)) {
                prepare(th, topology, id, attempt).await
            } else {
                Err(Error::Unavailable(format!(
                    "task thread {} of module {} did not process attempt {attempt} of microbatch {id} \
                     (its worker restarted); the attempt is retried",
                    th.thread, th.rt.def.name
                )))
            });
        }
        Control::Abort { topology, id, reply } => {
            th.pending
                .borrow_mut()
                .retain(|&(t, _), (pending_id, _, _)| !(t == topology && *pending_id <= id));
            let _ = reply.send(Ok(()));
        }
        Control::GateClose { lease_ms, reply } => {
            th.rt.close_gate_for_peer(Duration::from_millis(lease_ms)).await;
            let _ = reply.send(Ok(()));
        }
        Control::GateOpen { reply } => {
            th.rt.open_gate_for_peer();
            let _ = reply.send(Ok(()));
        }
        Control::Commit { topology, id, reply } => {
            let _ = reply.send(commit(th, topology, id).await);
        }
        Control::Recover {
            topology,
            decided,
            reply,
        } => {
            let _ = reply.send(recover(th, topology, decided).await);
        }
    }
}

fn ends(th: &TaskThread, topology: usize) -> Result<Vec<(usize, u32, u64)>> {
    let def = &th.rt.def;
    let t = &def.topologies[topology];
    debug_assert_eq!(t.kind, TopologyKind::Microbatch);
    let mut out = Vec::new();
    for &d in &t.sources {
        for &task in &th.tasks {
            if def.depots[d].global && task != 0 {
                continue;
            }
            out.push((d, task, th.log(d, task)?.end_offset()));
        }
    }
    Ok(out)
}

async fn process(th: &Rc<TaskThread>, topology: usize, id: u64, attempt: u32, ranges: Ranges) -> Result<()> {
    let flow = Flow::Microbatch { topology, id, attempt };
    for (d, task, start, end) in ranges {
        let log = th.log(d, task)?;
        let mut next = start;
        while next < end {
            let records = log.read(next, end, READ_BYTES).await?;
            let Some(last) = records.last() else {
                return Err(Error::Topology(format!(
                    "depot {} partition {task} ends before offset {end} planned for microbatch {id}",
                    th.rt.def.depots[d].name
                )));
            };
            next = last.offset + 1;
            let items = records
                .into_iter()
                .map(|r| {
                    archived::from_bytes(&r.payload)
                        .map(|v| (r.offset, v))
                        .map_err(|e| Error::Topology(format!("depot record {} does not decode: {e}", r.offset)))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut c = run_batch(th, flow, 0, task, Some(d), items).await;
            if let Some(why) = c.fatal.take() {
                return Err(Error::Topology(why));
            }
            if let Some(why) = c.unavailable.take() {
                return Err(Error::Unavailable(why));
            }
        }
    }
    Ok(())
}

fn pending_prefix(task: u32, topology: &str) -> Vec<u8> {
    meta_key(task, b'p', topology)
}

/// Keys of stored pending changes of `task`.
fn stored_pending(th: &TaskThread, task: u32, topology: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let prefix = pending_prefix(task, topology);
    let mut upper = prefix.clone();
    upper.push(0xFF);
    upper.push(0xFF);
    let mut out = Vec::new();
    let mut lower = prefix.clone();
    loop {
        let got = th.store.scan(
            std::ops::Bound::Excluded(lower.as_slice()),
            std::ops::Bound::Unbounded,
            false,
            1024,
        )?;
        let mut more = got.len() == 1024;
        for (k, v) in got {
            if !k.starts_with(&prefix) {
                more = false;
                break;
            }
            lower = k.clone();
            out.push((k, v));
        }
        if !more {
            return Ok(out);
        }
    }
}

async fn prepare(th: &Rc<TaskThread>, topology: usize, id: u64, attempt: u32) -> Result<()> {
    let name = th.rt.def.topologies[topology].name.clone();
    for &task in &th.tasks {
        let writes = match th.pending.borrow().get(&(topology, task)) {
            Some((pending_id, pending_attempt, o)) if (*pending_id, *pending_attempt) == (id, attempt) => {
                Some(o.clone())
            }
            _ => None,
        };
        let q_key = meta_key(task, b'q', &name);
        let stale = stored_pending(th, task, &name)?;
        let Some(writes) = writes else {
            // No changes this attempt: drop what an aborted attempt of this
            // (or an earlier) id left, so a recovery cannot apply it.
            if !stale.is_empty() || th.store.get(&q_key)?.is_some() {
                let mut batch = WriteBatch::new();
                for (k, _) in stale {
                    batch.delete(k);
                }
                batch.delete(&q_key);
                th.write(batch).await?;
            }
            continue;
        };
        // The commit batch is larger than this one; it must fit too, or the
        // microbatch could be decided and then fail to apply.
        th.store.check_batch(&commit_batch(task, &name, id, &writes))?;
        let prefix = pending_prefix(task, &name);
        let mut batch = WriteBatch::new();
        for (k, _) in stale {
            batch.delete(k);
        }
        for (k, v) in &writes {
            let mut pk = prefix.clone();
            pk.extend_from_slice(k);
            match v {
                Some(v) => {
                    let mut tagged = Vec::with_capacity(v.len() + 1);
                    tagged.push(1);
                    tagged.extend_from_slice(v);
                    batch.put(pk, tagged)
                }
                None => batch.put(pk, [0u8]),
            };
        }
        batch.put(&q_key, id.to_le_bytes());
        th.write(batch).await?;
    }
    Ok(())
}

/// The batch that applies `writes` of microbatch `id` on `task`: the
/// changes, the deletion of their pending copies, and "applied `id`".
fn commit_batch(task: u32, name: &str, id: u64, writes: &crate::pstate::Overlay) -> WriteBatch {
    let prefix = pending_prefix(task, name);
    let mut batch = WriteBatch::new();
    for (k, v) in writes {
        let mut pk = prefix.clone();
        pk.extend_from_slice(k);
        batch.delete(pk);
        match v {
            Some(v) => batch.put(k, v),
            None => batch.delete(k),
        };
    }
    batch.delete(meta_key(task, b'q', name));
    batch.put(meta_key(task, b'a', name), id.to_le_bytes());
    batch
}

async fn commit(th: &Rc<TaskThread>, topology: usize, id: u64) -> Result<()> {
    let name = th.rt.def.topologies[topology].name.clone();
    // A thread that processed this microbatch has its changes in memory (a
    // task without any had none); one that restarted after preparing has
    // only what it stored.
    let restarted = th.begun.borrow().get(&topology).map(|&(b, _)| b) != Some(id);
    for &task in &th.tasks {
        let taken = th.pending.borrow_mut().remove(&(topology, task));
        let writes = match taken {
            Some((pending_id, _, o)) if pending_id == id => o,
            _ => {
                if restarted {
                    recover_task(th, task, &name, id).await?;
                }
                continue;
            }
        };
        th.write(commit_batch(task, &name, id, &writes)).await?;
    }
    Ok(())
}

fn read_u64(th: &TaskThread, key: &[u8]) -> Result<Option<u64>> {
    th.store
        .get(key)?
        .map(|b| {
            b.as_slice()
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| corrupt(th, "a counter is not 8 bytes"))
        })
        .transpose()
}

async fn recover(th: &Rc<TaskThread>, topology: usize, decided: u64) -> Result<()> {
    let name = th.rt.def.topologies[topology].name.clone();
    th.pending.borrow_mut().retain(|&(t, _), _| t != topology);
    for &task in &th.tasks {
        recover_task(th, task, &name, decided).await?;
    }
    Ok(())
}

/// Applies the stored pending changes of `task` if they belong to
/// microbatch `decided` and are not applied yet; drops any others.
async fn recover_task(th: &Rc<TaskThread>, task: u32, name: &str, decided: u64) -> Result<()> {
    let q_key = meta_key(task, b'q', name);
    let Some(pending_id) = read_u64(th, &q_key)? else {
        return Ok(());
    };
    let a_key = meta_key(task, b'a', name);
    let applied = read_u64(th, &a_key)?.unwrap_or(0);
    let prefix_len = pending_prefix(task, name).len();
    let apply = pending_id == decided && applied < pending_id;
    let mut batch = WriteBatch::new();
    for (pk, v) in stored_pending(th, task, name)? {
        if apply {
            let k = &pk[prefix_len..];
            match v.split_first() {
                Some((1, v)) => batch.put(k, v),
                Some((0, [])) => batch.delete(k),
                _ => return Err(corrupt(th, "a pending change has an unknown tag")),
            };
        }
        batch.delete(pk);
    }
    batch.delete(&q_key);
    if apply {
        batch.put(&a_key, pending_id.to_le_bytes());
    }
    th.write(batch).await
}
