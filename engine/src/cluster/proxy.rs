//! Reactive reads: a [`Proxy`] holds the value a path reaches and keeps it
//! current with diffs the owning task pushes after each write that changes
//! it.
//!
//! The task thread keeps, per subscription, the last value it sent. After a
//! committed write to the PState partition it re-reads the path and, when
//! the value changed, sends the difference. The event channel is bounded:
//! when only one slot is left, the task sends [`ProxyEvent::Stale`] there
//! and stops sending diffs; the proxy, on reading it, selects the whole
//! value afresh, and the task sends a [`ProxyEvent::Resync`] with the whole
//! value at the next change once there is room again. So a proxy that fell
//! behind is whole again as soon as it reads its events. A dropped proxy is
//! forgotten at the next write.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::pstate::Nav;
use crate::value::Value;

/// A change to a proxied value.
#[derive(Debug, Clone, PartialEq)]
pub enum Diff {
    /// The value was replaced.
    Replace(Value),
    /// Entries of a map were set or removed.
    Map {
        set: Vec<(Value, Value)>,
        removed: Vec<Value>,
    },
    /// Elements of a set were added or removed.
    Set { added: Vec<Value>, removed: Vec<Value> },
}

/// What a proxy receives.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyEvent {
    Initial(Value),
    Diff(Diff),
    /// Diffs were lost (the proxy fell behind); this is the whole value.
    Resync(Value),
    /// The proxy fell behind and diffs are being dropped; it selects the
    /// whole value when it reads this.
    Stale,
}

/// The difference that turns `old` into `new`.
pub(crate) fn diff(old: &Value, new: &Value) -> Diff {
    match (old, new) {
        (Value::Map(a), Value::Map(b)) => {
            let set = b
                .iter()
                .filter(|(k, v)| a.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let removed = a.keys().filter(|k| !b.contains_key(*k)).cloned().collect();
            Diff::Map { set, removed }
        }
        (Value::Set(a), Value::Set(b)) => Diff::Set {
            added: b.difference(a).cloned().collect(),
            removed: a.difference(b).cloned().collect(),
        },
        _ => Diff::Replace(new.clone()),
    }
}

/// Applies `diff` to `value`.
pub fn apply_diff(value: &mut Value, diff: &Diff) {
    match diff {
        Diff::Replace(v) => *value = v.clone(),
        Diff::Map { set, removed } => {
            if !matches!(value, Value::Map(_)) {
                *value = Value::Map(BTreeMap::new());
            }
            if let Value::Map(m) = value {
                for k in removed {
                    m.remove(k);
                }
                for (k, v) in set {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        Diff::Set { added, removed } => {
            if !matches!(value, Value::Set(_)) {
                *value = Value::Set(BTreeSet::new());
            }
            if let Value::Set(s) = value {
                for k in removed {
                    s.remove(k);
                }
                for k in added {
                    s.insert(k.clone());
                }
            }
        }
    }
}

/// The value of a path as one value: the one value it reaches, nil for
/// none, a list for several.
pub(crate) fn as_one(mut values: Vec<Value>) -> Value {
    match values.len() {
        0 => Value::Nil,
        1 => values.pop().expect("one value"),
        _ => Value::List(values),
    }
}

/// A subscription, kept by the task thread owning the partition.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub pstate: usize,
    pub task: u32,
    pub path: Vec<Nav>,
    pub last: Value,
    pub events: flume::Sender<ProxyEvent>,
    pub stale: bool,
}

impl Subscription {
    /// Sends what changed since the last event; false once the proxy is gone.
    ///
    /// The last free slot of the channel is kept for `Stale`: a diff or a
    /// resync is sent only when at least two slots are free, so `Stale`
    /// always fits when it is needed.
    pub fn update(&mut self, now: Value) -> bool {
        if self.events.is_disconnected() {
            return false;
        }
        let free = self
            .events
            .capacity()
            .unwrap_or(usize::MAX)
            .saturating_sub(self.events.len());
        if self.stale {
            if free >= 2 && self.events.try_send(ProxyEvent::Resync(now.clone())).is_ok() {
                self.stale = false;
                self.last = now;
            }
            return true;
        }
        if now == self.last {
            return true;
        }
        if free >= 2 {
            let _ = self.events.try_send(ProxyEvent::Diff(diff(&self.last, &now)));
        } else {
            // The proxy re-selects when it reads this; the next change
            // after it caught up is sent as a resync.
            let _ = self.events.try_send(ProxyEvent::Stale);
            self.stale = true;
        }
        self.last = now;
        true
    }
}

/// Selects the proxied value afresh.
pub(crate) type Reselect = Box<dyn Fn() -> Result<Value> + Send>;

/// A live view of the value a path reaches in a PState: starts with the
/// value at subscription time, then follows every change.
pub struct Proxy {
    events: flume::Receiver<ProxyEvent>,
    current: Value,
    reselect: Reselect,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Waits for the initial value.
    pub(crate) fn start(events: flume::Receiver<ProxyEvent>, what: &str, reselect: Reselect) -> Result<Proxy> {
        let mut proxy = Proxy {
            events,
            current: Value::Nil,
            reselect,
        };
        match proxy.events.recv() {
            Ok(ProxyEvent::Initial(v)) => proxy.current = v,
            Ok(other) => {
                return Err(Error::Schema(format!(
                    "proxy of {what}: expected the initial value, got {other:?}"
                )))
            }
            Err(_) => return Err(Error::Closed(format!("the proxy of {what} is closed"))),
        }
        Ok(proxy)
    }

    /// The value as of the last event applied.
    pub fn current(&self) -> &Value {
        &self.current
    }

    fn apply(&mut self, event: &ProxyEvent) -> Result<()> {
        match event {
            ProxyEvent::Initial(v) | ProxyEvent::Resync(v) => self.current = v.clone(),
            ProxyEvent::Diff(d) => apply_diff(&mut self.current, d),
            ProxyEvent::Stale => self.current = (self.reselect)()?,
        }
        Ok(())
    }

    /// Applies every event already received; returns them.
    pub fn poll(&mut self) -> Result<Vec<ProxyEvent>> {
        let events: Vec<_> = self.events.try_iter().collect();
        for e in &events {
            self.apply(e)?;
        }
        Ok(events)
    }

    /// Waits up to `timeout` for the next event, applies and returns it.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<ProxyEvent>> {
        match self.events.recv_timeout(timeout) {
            Ok(e) => {
                self.apply(&e)?;
                Ok(Some(e))
            }
            Err(flume::RecvTimeoutError::Timeout) => Ok(None),
            Err(flume::RecvTimeoutError::Disconnected) => {
                Err(Error::Closed("the proxy is closed: its module stopped".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_apply_back() {
        let cases = [
            (Value::map([("a", 1), ("b", 2)]), Value::map([("b", 3), ("c", 4)])),
            (Value::set([1, 2, 3]), Value::set([2, 5])),
            (Value::Int(1), Value::from("x")),
            (Value::Nil, Value::map([("a", 1)])),
        ];
        for (old, new) in cases {
            let mut v = old.clone();
            apply_diff(&mut v, &diff(&old, &new));
            assert_eq!(v, new, "from {old:?}");
        }
    }
}
