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
