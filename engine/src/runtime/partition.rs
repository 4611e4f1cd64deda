//! Choosing the task a record or key belongs to.
//!
//! A key's task is `hash64(key::encode(key)) mod tasks` (tasks are a power
//! of two, so the modulo is a mask). Hashing the order-preserving encoding
//! makes the choice depend only on the value, never on how a client built
//! it, and [`crate::hash::hash64`] is pinned by golden tests, because a
//! key's task decides where its data lives.

use crate::hash::hash64;
use crate::value::{key, Value};

/// The task that owns `k` among `tasks` tasks (a power of two).
pub fn task_for_key(k: &Value, tasks: u32) -> u32 {
    debug_assert!(tasks.is_power_of_two(), "tasks are a power of two");
    (hash64(&key::encode(k)) & u64::from(tasks - 1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_evenly_and_stably() {
        let tasks = 16;
        let mut counts = vec![0u32; tasks as usize];
        for i in 0..16_000i64 {
            let t = task_for_key(&Value::Str(format!("user-{i}")), tasks);
            counts[t as usize] += 1;
        }
        // 1000 expected per task; a fair hash stays well within +-15%.
        for (t, &c) in counts.iter().enumerate() {
            assert!((850..=1150).contains(&c), "task {t} got {c} of 16000 keys: {counts:?}");
        }
        // The same value always lands on the same task, however it was built.
        let a = Value::map([("k", 1)]);
        let b = Value::Map([(Value::from("k"), Value::Int(1))].into_iter().collect());
        assert_eq!(task_for_key(&a, 64), task_for_key(&b, 64));
        assert_eq!(task_for_key(&Value::Int(7), 1), 0);
    }

    #[test]
    fn golden_placements_never_change() {
        // A change here moves stored data to other tasks.
        let got: Vec<u32> = ["alice", "bob", "carol", "dave"]
            .iter()
            .map(|s| task_for_key(&Value::from(*s), 64))
            .collect();
        assert_eq!(got, GOLDEN, "placements changed: {got:?}");
    }

    const GOLDEN: [u32; 4] = [38, 41, 25, 53];
}
