//! Single-thread wait lists for futures on one glommio executor, and a
//! callback that several paths may race to call.

use std::cell::RefCell;
use std::future::Future;
use std::task::{Poll, Waker};

/// Futures waiting for a condition owned by the same thread. Whoever changes
/// the condition calls [`Waiters::wake_all`]; each waiter re-checks it.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    wakers: RefCell<Vec<Waker>>,
    /// Bumped by every [`Waiters::wake_all`]: a waiter registers once per
    /// round (O(1), however many wait), not once per poll.
    round: std::cell::Cell<u64>,
}

impl Waiters {
    /// Waits until `ready` returns `Some`, re-checking after every wake.
    pub(crate) fn wait<'a, T>(&'a self, mut ready: impl FnMut() -> Option<T> + 'a) -> impl Future<Output = T> + 'a {
        let mut registered: Option<(u64, Waker)> = None;
        std::future::poll_fn(move |cx| match ready() {
            Some(v) => Poll::Ready(v),
            None => {
                let round = self.round.get();
                let current = registered
                    .as_ref()
                    .is_some_and(|(r, w)| *r == round && w.will_wake(cx.waker()));
                if !current {
                    self.wakers.borrow_mut().push(cx.waker().clone());
                    registered = Some((round, cx.waker().clone()));
                }
                Poll::Pending
            }
        })
    }

    /// Waits for the next [`Waiters::wake_all`].
    pub(crate) fn next_wake(&self) -> impl Future<Output = ()> + '_ {
        let start = self.round.get();
        self.wait(move || (self.round.get() != start).then_some(()))
    }

    pub(crate) fn wake_all(&self) {
        self.round.set(self.round.get() + 1);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// Futures each waiting for a position (an offset) to pass its own: the
/// owner wakes only those it passed ([`OffsetWaiters::wake_through`]), so
/// a thousand writers waiting for the applied offset cost one wake each,
/// not a thousand per advance.
#[derive(Debug, Default)]
pub(crate) struct OffsetWaiters {
    wakers: RefCell<std::collections::BTreeMap<u64, Vec<Waker>>>,
}

impl OffsetWaiters {
    /// Waits until `ready` returns `Some`; re-checked when the position
    /// passes `offset` and on [`OffsetWaiters::wake_all`].
    pub(crate) fn wait<'a, T>(
        &'a self,
        offset: u64,
        mut ready: impl FnMut() -> Option<T> + 'a,
    ) -> impl Future<Output = T> + 'a {
        std::future::poll_fn(move |cx| match ready() {
            Some(v) => Poll::Ready(v),
            None => {
                let mut wakers = self.wakers.borrow_mut();
                let list = wakers.entry(offset).or_default();
                if !list.iter().any(|w| w.will_wake(cx.waker())) {
                    list.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
    }

    /// Wakes the waiters of offsets below `end`.
    pub(crate) fn wake_through(&self, end: u64) {
        let passed = {
            let mut wakers = self.wakers.borrow_mut();
            let rest = wakers.split_off(&end);
            std::mem::replace(&mut *wakers, rest)
        };
        passed.into_values().flatten().for_each(Waker::wake);
    }

    /// Wakes every waiter (a failure: each re-checks).
    pub(crate) fn wake_all(&self) {
        let all = std::mem::take(&mut *self.wakers.borrow_mut());
        all.into_values().flatten().for_each(Waker::wake);
    }
}

/// A callback shared by paths that race to answer (an answer, or a send
/// that failed and dropped its copy): the first call wins, later ones do
/// nothing. Cheap to clone; usable from any thread.
pub struct CallOnce<T>(std::sync::Arc<std::sync::Mutex<Option<Callback<T>>>>);

type Callback<T> = Box<dyn FnOnce(T) + Send>;

impl<T> CallOnce<T> {
    pub fn new(f: impl FnOnce(T) + Send + 'static) -> CallOnce<T> {
        CallOnce(std::sync::Arc::new(std::sync::Mutex::new(Some(Box::new(f)))))
    }

    /// Calls the callback with `value` unless it was called already;
    /// returns whether it was called now.
    pub fn call(&self, value: T) -> bool {
        let f = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        match f {
            Some(f) => {
                f(value);
                true
            }
            None => false,
        }
    }
}

impl<T> Clone for CallOnce<T> {
    fn clone(&self) -> Self {
        CallOnce(self.0.clone())
    }
}

impl<T> std::fmt::Debug for CallOnce<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallOnce")
    }
}
