//! Stream topologies: a consumer per (topology, source depot, task) reads
//! durable records from its committed offset, runs stage 0 over them,
//! retries failed records alone, commits the offset, and answers `Ack`
//! appenders.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::dataflow::run_batch;
use super::messages::{AppendResult, Flow};
use super::thread::{offset_key, read_offset, storage_unavailable, TaskThread};
use crate::error::{Error, Result};
use crate::lsm::WriteBatch;
use crate::value::{archived, Value};

/// A stream topology's consumer of one depot partition: processes records
/// in batches from its committed offset, retries failed records one by
/// one, answers `Ack` appends, then commits the offset. Storage that
/// cannot take writes for a while (a full disk) pauses it; it resumes from
/// its committed offset (at least once) when storage heals. Damaged data
/// stops it, with the reason in the log.
pub(super) async fn consume(th: Rc<TaskThread>, topology: usize, depot: usize, task: u32) {
    th.rt.wait_processing(|| th.stopping.get()).await;
    let mut pauses = 0u32;
    loop {
        match consume_inner(&th, topology, depot, task).await {
            Ok(()) => return,
            Err(_) if th.stopping.get() => return,
            Err(e) if storage_unavailable(&e) => {
                unavailable_pause(&th, topology, task, &e.to_string(), &mut pauses).await
            }
            Err(e) => {
                tracing::error!(
                    "stream topology {} of module {} stopped on task {task}: {e}",
                    th.rt.def.topologies[topology].name,
                    th.rt.def.name
                );
                return;
            }
        }
    }
}

pub(super) async fn consume_inner(th: &Rc<TaskThread>, topology: usize, depot: usize, task: u32) -> Result<()> {
    let rt = th.rt.clone();
    let name = &rt.def.topologies[topology].name;
    let log = th.log(depot, task)?;
    let appended = th.appended(depot, task)?;
    let key = offset_key(task, name, rt.depot_ids[depot]);
    let mut offset = read_offset(&th.store, &key, name)?.unwrap_or(0);
    offset = offset.max(log.start_offset());
    let mut pauses = 0u32;
    loop {
        // Wait for a record past the committed offset.
        appended
            .waiters
            .wait(|| (th.draining.get() || appended.enqueued_end.get() > offset).then_some(()))
            .await;
        // Draining: no client append is taken or in flight any more, so
        // once what was appended is processed (every `Ack` waiter has its
        // answer), stop.
        if th.draining.get() && appended.enqueued_end.get() <= offset {
            return Ok(());
        }
        if log.end_offset() <= offset {
            log.wait_durable(offset + 1).await?;
        }
        let records = log.read(offset, u64::MAX, rt.config.stream_batch_bytes).await?;
        let Some(end) = records.last().map(|r| r.offset + 1) else {
            continue;
        };
        let mut outcome: BTreeMap<u64, std::result::Result<Option<Value>, String>> = BTreeMap::new();
        let mut items = Vec::with_capacity(records.len());
        for r in records {
            match archived::from_bytes(&r.payload) {
                Ok(v) => items.push((r.offset, v)),
                Err(e) => {
                    outcome.insert(r.offset, Err(format!("record does not decode: {e}")));
                }
            }
        }
        let mut c = run_batch(th, Flow::Stream(topology), 0, task, Some(depot), items.clone()).await;
        if let Some(why) = c.unavailable.take() {
            // Part of the batch did not reach its worker: run it all again
            // from the same offset (at least once) after a pause, or leave
            // it for after the restart when stopping.
            if th.stopping.get() {
                return Ok(());
            }
            unavailable_pause(th, topology, task, &why, &mut pauses).await;
            continue;
        }
        pauses = 0;
        if let Some(why) = c.fatal.take() {
            for (o, _) in &items {
                c.failed.entry(*o).or_insert_with(|| why.clone());
            }
        }
        // Individual retries of the records that failed.
        for (o, v) in &items {
            let Some(mut why) = c.failed.remove(o) else {
                continue;
            };
            let mut ok = false;
            let mut tries = 0;
            while tries < rt.config.stream_retries {
                let r = run_batch(th, Flow::Stream(topology), 0, task, Some(depot), vec![(*o, v.clone())]).await;
                if let Some(why) = r.unavailable {
                    // Not the record's fault: wait, and do not count it.
                    if th.stopping.get() {
                        return Ok(());
                    }
                    unavailable_pause(th, topology, task, &why, &mut pauses).await;
                    continue;
                }
                tries += 1;
                match r.fatal.or_else(|| r.failed.into_values().next()) {
                    None => {
                        c.ack_returns.extend(r.ack_returns);
                        ok = true;
                        break;
                    }
                    Some(w) => why = w,
                }
            }
            if !ok {
                outcome.insert(*o, Err(why));
            }
        }
        for (o, v) in c.ack_returns {
            if !matches!(outcome.get(&o), Some(Err(_))) {
                outcome.insert(o, Ok(Some(v)));
            }
        }
        resolve_acks(th, topology, depot, task, offset..end, &outcome);
        offset = end;
        // The offset need not be durable before the next batch (a crash
        // only means reprocessing), so its durability is waited for off the
        // critical path; the WAL keeps successive offsets in order, and a
        // failed write poisons the store, which stops the next enqueue.
        let mut batch = WriteBatch::new();
        batch.put(&key, offset.to_le_bytes());
        let queued = th.store.enqueue(batch).await?;
        let waiter = th.clone();
        glommio::spawn_local(async move {
            let _ = waiter.store.wait_written(queued).await;
        })
        .detach();
    }
}

/// Waits before running a batch again that could not reach another
/// worker or its storage: 50 ms doubling up to 2 s; says so in the log now
/// and then.
pub(super) async fn unavailable_pause(th: &TaskThread, topology: usize, task: u32, why: &str, pauses: &mut u32) {
    if pauses.is_power_of_two() && *pauses >= 8 {
        tracing::warn!(
            "stream topology {} of module {} on task {task}: waiting to run again ({} tries): {why}",
            th.rt.def.topologies[topology].name,
            th.rt.def.name,
            pauses
        );
    }
    *pauses = pauses.saturating_add(1);
    let ms = 50u64 << (*pauses).min(6);
    glommio::timer::sleep(std::time::Duration::from_millis(ms.min(2000))).await;
}

pub(super) fn resolve_acks(
    th: &TaskThread,
    topology: usize,
    depot: usize,
    task: u32,
    range: std::ops::Range<u64>,
    outcome: &BTreeMap<u64, std::result::Result<Option<Value>, String>>,
) {
    let mut acks = th.acks.borrow_mut();
    let Some(waiting) = acks.get_mut(&(depot, task)) else {
        return;
    };
    let name = &th.rt.def.topologies[topology].name;
    let offsets: Vec<u64> = waiting.range(range).map(|(o, _)| *o).collect();
    for o in offsets {
        let w = waiting.get_mut(&o).expect("listed");
        match outcome.get(&o) {
            Some(Err(why)) => {
                w.error.get_or_insert_with(|| {
                    format!(
                        "record {o} of depot {} failed in stream topology {name} after {} retries: {why}",
                        th.rt.def.depots[depot].name, th.rt.config.stream_retries
                    )
                });
            }
            Some(Ok(Some(v))) => {
                w.ack_returns.insert(name.clone(), v.clone());
            }
            _ => {}
        }
        w.remaining -= 1;
        if w.remaining == 0 {
            let w = waiting.remove(&o).expect("listed");
            let _ = w.reply.send(match w.error {
                Some(why) => Err(Error::Topology(why)),
                None => Ok(AppendResult {
                    task: w.task,
                    offset: Some(o),
                    ack_returns: w.ack_returns,
                }),
            });
        }
    }
}
