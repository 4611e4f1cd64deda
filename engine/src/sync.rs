//! Single-thread wait lists for futures on one glommio executor.

use std::cell::RefCell;
use std::future::Future;
use std::task::{Poll, Waker};

/// Futures waiting for a condition owned by the same thread. Whoever changes
/// the condition calls [`Waiters::wake_all`]; each waiter re-checks it.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    wakers: RefCell<Vec<Waker>>,
}

impl Waiters {
    /// Waits until `ready` returns `Some`, re-checking after every wake.
    pub(crate) fn wait<'a, T>(&'a self, mut ready: impl FnMut() -> Option<T> + 'a) -> impl Future<Output = T> + 'a {
        std::future::poll_fn(move |cx| match ready() {
            Some(v) => Poll::Ready(v),
            None => {
                let mut wakers = self.wakers.borrow_mut();
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
    }

    pub(crate) fn wake_all(&self) {
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        wakers.into_iter().for_each(Waker::wake);
    }
}
