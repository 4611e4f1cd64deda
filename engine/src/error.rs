//! The engine's error type.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the storage engine. Messages say what to do next where there is
/// something to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error during {op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A write or sync failed earlier; nothing written since can be proven
    /// durable, so nothing more is acknowledged.
    #[error(
        "{what} took no writes after an I/O failure ({cause}); nothing since was acknowledged; it tries again by \
         itself (free disk space if the device is full)"
    )]
    Poisoned { what: String, cause: String },

    /// Stored bytes failed verification where they must be intact.
    #[error("corrupt data in {path} at offset {offset} (byte {position}): {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        position: u64,
        reason: String,
    },

    /// A configured size limit was exceeded; nothing was applied.
    #[error("{what} is {size} bytes, above the limit {limit} = {max}")]
    LimitExceeded {
        what: &'static str,
        limit: &'static str,
        size: u64,
        max: u64,
    },

    #[error("offset {requested} is outside the log [{start}, {end})")]
    OffsetOutOfRange { requested: u64, start: u64, end: u64 },

    /// A configuration value is invalid.
    #[error("invalid configuration {key} = {value}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: &'static str,
    },

    /// Something the request needed has stopped or closed; the message is
    /// a whole sentence saying what (composed where it is known).
    #[error("{0}")]
    Closed(String),

    /// A path or value does not fit the PState's schema.
    #[error("{0}")]
    Schema(String),

    /// A topology's or query's code failed (or a record was not processed
    /// after its retries); the message says where and why.
    #[error("{0}")]
    Topology(String),

    /// Another worker of the module could not be reached (or went away
    /// while it had the request); nothing is known to have been applied
    /// there, and the work is retried or reported.
    #[error("{0}")]
    Unavailable(String),

    /// The glommio executor could not be started.
    #[error("cannot start the task thread executor: {0}")]
    Executor(String),
}

impl Error {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source: source.into(),
        }
    }

    /// Checks `size <= max` for the limit named `limit`.
    pub fn check_limit(what: &'static str, limit: &'static str, size: usize, max: usize) -> Result<()> {
        if size > max {
            return Err(Error::LimitExceeded {
                what,
                limit,
                size: size as u64,
                max: max as u64,
            });
        }
        Ok(())
    }
}

/// Converts a glommio error into an `io::Error` (glommio keeps the path and
/// operation in its message).
pub(crate) fn gio<T>(e: glommio::GlommioError<T>) -> io::Error {
    io::Error::from(e)
}
