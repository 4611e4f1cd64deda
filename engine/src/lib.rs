//! The storage and runtime of task threads.
//!
//! Owns: the value model ([`value`]), depot partition logs ([`log`]), the
//! PState LSM ([`lsm`]), PState schemas and paths ([`pstate`]), module
//! definitions and topologies ([`module`]), the task-thread runtime of a worker: placement
//! of tasks on threads and workers, and bounded channels between task
//! threads ([`runtime`]), and the in-process cluster ([`cluster`]).
//! Depends on no other workspace crate; `net`, `control` and `cli` depend on it.
//! Storage runs on one glommio executor (a task thread) and is deliberately
//! `!Send`: it is never shared between threads; other threads reach it only
//! through messages.

pub mod cluster;
pub mod error;
pub mod executor;
pub mod fsutil;
pub mod hash;
pub mod log;
pub mod lsm;
pub mod module;
pub mod pstate;
pub mod replication;
pub mod runtime;
pub mod sync;
pub mod value;
mod varint;
pub mod wire;

pub use error::{Error, ErrorCode, Result};

/// The engine version; module artifacts record the one they were built with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
