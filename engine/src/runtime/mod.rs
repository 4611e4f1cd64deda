//! The task-thread runtime of one worker process: task threads (glommio
//! executors) and the bounded channels between them.
//!
//! Each task thread owns its tasks outright (their storage included).
//! Tasks on other threads are reached only by messages: an [`Envelope`]
//! carries an rkyv-encoded payload from one task to another, over a full
//! mesh of bounded single-producer channels between the threads of the
//! worker (the same envelopes will cross TCP between workers, in `net/`).
//! Every queue is bounded: a full queue makes its producer wait, so a slow
//! task thread slows its producers instead of growing memory or dropping
//! messages.

pub mod partition;
pub mod placement;

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};

use glommio::channels::channel_mesh::{MeshBuilder, Senders};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use self::placement::Placement;
use crate::error::{Error, Result};
use crate::executor::ExecutorConfig;

/// A message from one task to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub from_task: u32,
    pub to_task: u32,
    /// rkyv-encoded message batch.
    pub payload: Vec<u8>,
}

/// Settings of a worker's task threads.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Executor settings shared by the task threads; `pin_to_cpu` is
    /// ignored and replaced by `pin_threads`.
    pub executor: ExecutorConfig,
    /// Pin task thread `i` to CPU `i % cpus`. Default off: pinning pays only
    /// when threads do not outnumber cores.
    pub pin_threads: bool,
    /// Capacity of each channel between two task threads, and of each
    /// thread's inbox, in envelopes. Default 1024.
    pub channel_capacity: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            executor: ExecutorConfig::default(),
            pin_threads: false,
            channel_capacity: 1024,
        }
    }
}

/// What a task thread's code sees of the runtime.
#[derive(Debug)]
pub struct ThreadContext {
    thread: u32,
    placement: Arc<Placement>,
    /// Mesh peer id of each task thread of this worker (`None`: another
    /// worker's thread).
    peer_of_thread: Arc<Vec<Option<usize>>>,
    senders: Senders<Envelope>,
    /// This thread's own way into its inbox; `None` once it finished sending.
    inbox_tx: RefCell<Option<Rc<LocalSender<Envelope>>>>,
    inbox: LocalReceiver<Envelope>,
}

impl ThreadContext {
    /// This task thread's number within the module.
    pub fn thread(&self) -> u32 {
        self.thread
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The tasks this thread owns.
    pub fn tasks(&self) -> Vec<u32> {
        self.placement.tasks_of_thread(self.thread)
    }

    /// Sends `envelope` to the thread owning its target task; waits while
    /// that thread's channel is full.
    pub async fn send(&self, envelope: Envelope) -> Result<()> {
        let tasks = self.placement.parallelism.tasks;
        let thread = *self
            .placement
            .thread_of_task
            .get(envelope.to_task as usize)
            .ok_or_else(|| Error::Schema(format!("task {} does not exist (tasks: {tasks})", envelope.to_task)))?;
        if thread == self.thread {
            let tx = self
                .inbox_tx
                .borrow()
                .clone()
                .ok_or_else(|| Error::Closed(format!("task thread {} finished sending", self.thread)))?;
            return tx
                .send(envelope)
                .await
                .map_err(|e| Error::Closed(format!("inbox of task thread {}: {e}", self.thread)));
        }
        let peer = self.peer_of_thread[thread as usize].ok_or_else(|| {
            Error::Schema(format!(
                "task {} runs on task thread {thread} of another worker; cross-worker messages go through net/",
                envelope.to_task
            ))
        })?;
        self.senders
            .send_to(peer, envelope)
            .await
            .map_err(|e| Error::Closed(format!("channel to task thread {thread}: {e}")))
    }

    /// The next envelope for one of this thread's tasks; `None` once every
    /// producer (every thread, this one included) has finished.
    pub async fn recv(&self) -> Option<Envelope> {
        self.inbox.recv().await
    }

    /// Stops sending: once every thread has called this, `recv` drains the
    /// inboxes and returns `None`.
    pub fn finish_sending(&self) {
        self.senders.close();
        self.inbox_tx.borrow_mut().take();
    }
}

/// Runs the task threads that `placement` gives worker `worker`, each
/// running `body` with its [`ThreadContext`], and returns their results in
/// thread order.
pub fn run_worker<T, F, G>(placement: Placement, worker: u32, config: &RuntimeConfig, body: G) -> Result<Vec<T>>
where
    G: Fn(ThreadContext) -> F + Send + Sync + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let threads = placement.threads_of_worker(worker);
    if threads.is_empty() {
        return Err(Error::Schema(format!(
            "worker {worker} has no task threads in {}",
            placement.parallelism
        )));
    }
    let placement = Arc::new(placement);
    let body = Arc::new(body);
    let mesh = MeshBuilder::<Envelope, _>::full(threads.len(), config.channel_capacity);
    // Mesh peer ids are handed out in join order; each thread records its
    // own, and waits for the others before any message is sent.
    let peers: Arc<Mutex<Vec<Option<usize>>>> =
        Arc::new(Mutex::new(vec![None; placement.parallelism.threads as usize]));
    let barrier = Arc::new(Barrier::new(threads.len()));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut handles = Vec::new();
    for (i, &thread) in threads.iter().enumerate() {
        let mut executor = config.executor.clone();
        executor.name = format!("task-thread-{thread}");
        executor.pin_to_cpu = config.pin_threads.then_some(i % cpus);
        let (mesh, peers, barrier, placement, body) = (
            mesh.clone(),
            peers.clone(),
            barrier.clone(),
            placement.clone(),
            body.clone(),
        );
        let capacity = config.channel_capacity;
        handles.push(std::thread::spawn(move || {
            executor.block_on(async move {
                let joined = mesh.join().await;
                if let Ok((senders, _)) = &joined {
                    peers.lock().expect("peer table lock")[thread as usize] = Some(senders.peer_id());
                }
                // Every thread reaches the barrier, failed or not, so none
                // waits forever for a thread that gave up.
                barrier.wait();
                let (senders, mut receivers) =
                    joined.map_err(|e| Error::Executor(format!("joining the task thread mesh failed: {e}")))?;
                let peer_of_thread = Arc::new(peers.lock().expect("peer table lock").clone());
                let (inbox_tx, inbox) = local_channel::new_bounded(capacity);
                let inbox_tx = Rc::new(inbox_tx);
                // One pump per peer moves its envelopes into the bounded
                // inbox; when the inbox is full the pump waits, and so, once
                // its channel fills, does the peer.
                for (_, stream) in receivers.streams() {
                    let tx = inbox_tx.clone();
                    glommio::spawn_local(async move {
                        while let Some(envelope) = stream.recv().await {
                            if tx.send(envelope).await.is_err() {
                                break;
                            }
                        }
                    })
                    .detach();
                }
                let ctx = ThreadContext {
                    thread,
                    placement,
                    peer_of_thread,
                    senders,
                    inbox_tx: RefCell::new(Some(inbox_tx)),
                    inbox,
                };
                Ok::<T, Error>(body(ctx).await)
            })
        }));
    }
    let mut out = Vec::new();
    for (handle, thread) in handles.into_iter().zip(threads) {
        let result = handle
            .join()
            .map_err(|_| Error::Executor(format!("task thread {thread} panicked")))?;
        out.push(result??);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::placement::{Parallelism, Placement};
    use super::*;

    /// Every task sends numbered messages to every task, while receiving;
    /// with tiny channels this only completes if back-pressure works (no
    /// loss, no unbounded growth, no deadlock), and per-pair order holds.
    #[test]
    fn all_to_all_with_tiny_channels() {
        let placement = Placement::new(Parallelism::new(8, 4, 1).unwrap());
        let config = RuntimeConfig {
            channel_capacity: 2,
            // Four threads in a test process that runs other tests at once:
            // keep the locked io_uring memory small.
            executor: ExecutorConfig {
                io_memory_bytes: 256 << 10,
                ..ExecutorConfig::default()
            },
            ..RuntimeConfig::default()
        };
        const PER_PAIR: u32 = 50;
        let results = run_worker(placement, 0, &config, |ctx| async move {
            let ctx = Rc::new(ctx);
            let receiver = {
                let ctx = ctx.clone();
                glommio::spawn_local(async move {
                    // next[(from, to)] = the sequence number expected next.
                    let mut next = std::collections::HashMap::new();
                    let mut count = 0u32;
                    while let Some(e) = ctx.recv().await {
                        assert!(ctx.tasks().contains(&e.to_task), "delivered to the owning thread");
                        let seq = u32::from_le_bytes(e.payload[..4].try_into().unwrap());
                        let expected = next.entry((e.from_task, e.to_task)).or_insert(0u32);
                        assert_eq!(seq, *expected, "per-pair order from {} to {}", e.from_task, e.to_task);
                        *expected += 1;
                        count += 1;
                    }
                    count
                })
            };
            for seq in 0..PER_PAIR {
                for from in ctx.tasks() {
                    for to in 0..8 {
                        ctx.send(Envelope {
                            from_task: from,
                            to_task: to,
                            payload: seq.to_le_bytes().to_vec(),
                        })
                        .await
                        .unwrap();
                    }
                }
            }
            ctx.finish_sending();
            let received = receiver.await;
            (ctx.tasks().len() as u32, received)
        })
        .unwrap();
        let sent: u32 = results.iter().map(|(tasks, _)| tasks * 8 * PER_PAIR).sum();
        let received: u32 = results.iter().map(|(_, r)| r).sum();
        assert_eq!(received, sent);
        for (tasks, r) in results {
            assert_eq!(r, tasks * 8 * PER_PAIR, "each task receives from every task");
        }
    }

    #[test]
    fn unknown_task_is_a_clear_error() {
        let placement = Placement::new(Parallelism::new(2, 1, 1).unwrap());
        let err = run_worker(placement, 0, &RuntimeConfig::default(), |ctx| async move {
            ctx.send(Envelope {
                from_task: 0,
                to_task: 9,
                payload: vec![],
            })
            .await
            .unwrap_err()
            .to_string()
        })
        .unwrap();
        assert!(err[0].contains("task 9 does not exist"), "{}", err[0]);
    }
}
