//! Example modules: what a module author writes.
//!
//! - [`WordCountModule`]: a stream topology splitting sentences into words
//!   and counting them where each word lives; query `topWords`.
//! - [`BankTransferModule`]: a microbatch topology moving funds between
//!   accounts exactly once, rejecting overdrafts; query `totalFunds`.
//! - [`TimelineModule`]: stream topologies fanning posts out to every
//!   follower's timeline (a subindexed sorted map).
//! - [`KvModule`]: records set keys of a key-value PState; the generic
//!   workload of the benchmark harness.

mod bank;
mod kv;
mod timeline;
mod wordcount;

pub use bank::BankTransferModule;
pub use kv::KvModule;
pub use timeline::TimelineModule;
pub use wordcount::{words, WordCountModule};

use engine::module::{fail, Partitioner};
use engine::value::Value;
use engine::Result;

/// The field `name` of a map record.
pub(crate) fn field<'v>(record: &'v Value, name: &str) -> Result<&'v Value> {
    record
        .as_map()
        .and_then(|m| m.get(&Value::from(name)))
        .ok_or_else(|| fail(format!("record {record:?} has no field {name:?}")))
}

/// The integer field `name` of a map record.
pub(crate) fn int_field(record: &Value, name: &str) -> Result<i64> {
    field(record, name)?
        .as_int()
        .ok_or_else(|| fail(format!("field {name:?} of {record:?} is not an integer")))
}

/// Partitions a depot of map records by the value of field `name`.
/// (Declarative: remote clients route each append to its task's thread.)
pub(crate) fn by_field(name: &'static str) -> Partitioner {
    Partitioner::hash_by_field(name)
}
