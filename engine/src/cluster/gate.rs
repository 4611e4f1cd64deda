//! The read gate: holds client reads (selects, queries) off while a
//! microbatch commits on every task, so no read sees part of a
//! microbatch; with several workers, other workers' commits close it
//! through a lease.

use std::sync::{Arc, Condvar, Mutex};

use super::launched::ModuleRuntime;
use std::time::Duration;

/// Holds client reads off while a microbatch commits on every task, so no
/// read sees part of a microbatch.
#[derive(Debug, Default)]
pub(super) struct Gate {
    /// (reads in progress, commits in progress)
    pub(super) state: Mutex<(usize, usize)>,
    pub(super) changed: Condvar,
    /// Async readers waiting for the gate to open.
    pub(super) waiting: Mutex<Vec<flume::Sender<()>>>,
}

pub(super) struct GateGuard<'a>(pub(super) Option<&'a Gate>);

/// A read let through the gate of a module, held by an answer callback
/// until the read is done (it may be dropped on another thread).
/// Holds the gate only (not the runtime): a request stuck in a stopped
/// thread's channel must not keep the runtime, and so that channel, alive.
pub(super) struct GateTicket(pub(super) Arc<Gate>);

impl GateTicket {
    /// Enters without waiting: `Ok(None)` when reads are not gated, `Err`
    /// while a commit holds the gate closed.
    pub(super) fn try_enter(rt: &Arc<ModuleRuntime>) -> std::result::Result<Option<GateTicket>, ()> {
        if !rt.gated {
            return Ok(None);
        }
        let mut s = rt.gate.state.lock().expect("gate");
        if s.1 > 0 {
            return Err(());
        }
        s.0 += 1;
        Ok(Some(GateTicket(rt.gate.clone())))
    }
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        self.0.state.lock().expect("gate").0 -= 1;
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            g.state.lock().expect("gate").0 -= 1;
        }
    }
}

impl Gate {
    /// Blocks the calling client thread while a commit is applied.
    pub(super) fn enter(&self) -> GateGuard<'_> {
        let mut s = self.state.lock().expect("gate");
        while s.1 > 0 {
            s = self.changed.wait(s).expect("gate");
        }
        s.0 += 1;
        GateGuard(Some(self))
    }

    /// Stops new reads and waits (on a task thread) for running ones.
    pub(super) async fn close(&self) {
        self.state.lock().expect("gate").1 += 1;
        while self.state.lock().expect("gate").0 > 0 {
            glommio::timer::sleep(Duration::from_micros(50)).await;
        }
    }

    /// Like `enter`, without blocking the calling thread (for readers on
    /// an async executor that also carries the commit's messages).
    pub(super) async fn enter_async(&self) -> GateGuard<'_> {
        loop {
            let rx = {
                let mut s = self.state.lock().expect("gate");
                if s.1 == 0 {
                    s.0 += 1;
                    return GateGuard(Some(self));
                }
                let (tx, rx) = flume::bounded(1);
                self.waiting.lock().expect("gate waiters").push(tx);
                rx
            };
            let _ = rx.recv_async().await;
        }
    }

    pub(super) fn open(&self) {
        self.state.lock().expect("gate").1 -= 1;
        self.changed.notify_all();
        for w in self.waiting.lock().expect("gate waiters").drain(..) {
            let _ = w.try_send(());
        }
    }
}
