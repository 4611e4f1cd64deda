//! The storage engine of a task thread.
//!
//! Owns: the value model ([`value`]), depot partition logs ([`log`]), the
//! PState LSM ([`lsm`]), PState schemas and paths ([`pstate`]), and the
//! task-thread runtime of a worker: placement of tasks on threads and
//! workers, and bounded channels between task threads ([`runtime`]).
//! Depends on no other workspace crate; `net`, `control` and `cli` depend on it.
//! Everything here runs on one glommio executor (a task thread) and is
//! deliberately `!Send`: storage is never shared between threads.

pub mod cluster;
pub mod error;
pub mod executor;
pub mod hash;
pub mod log;
pub mod lsm;
pub mod module;
pub mod pstate;
pub mod runtime;
mod sync;
pub mod value;
mod varint;

pub use error::{Error, Result};
