//! The storage engine of a task thread.
//!
//! Owns: the value model ([`value`]), depot partition logs ([`log`]), the
//! PState LSM ([`lsm`]) and PState schemas and paths ([`pstate`]).
//! Depends on no other workspace crate; `net`, `control` and `cli` depend on it.
//! Everything here runs on one glommio executor (a task thread) and is
//! deliberately `!Send`: storage is never shared between threads.

pub mod error;
pub mod executor;
pub mod log;
pub mod lsm;
pub mod pstate;
mod sync;
pub mod value;

pub use error::{Error, Result};
