//! The benchmarks of the engine (storage next to raw hardware loops and
//! other engines; WordCount end to end, in-process and through the
//! network; point selects next to Redis), the `BENCHMARKS.md` report of
//! their results (binary `rama-bench`, script `bench/run`), and the load
//! harness behind `rama bench` ([`harness`]).

pub mod baseline;
pub mod depot;
pub mod failover;
pub mod harness;
pub mod keys;
pub mod lsm;
pub mod machine;
pub mod procstat;
pub mod raw;
pub mod redis;
pub mod remote;
pub mod replication;
pub mod report;
pub mod results;
pub mod tcp;
pub mod wordcount;
