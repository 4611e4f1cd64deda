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

    /// The replica asked does not lead its task group (it is a follower,
    /// or stepped down): nothing was taken, so the request may be sent
    /// again to the leader.
    #[error("{0}")]
    NotLeader(String),

    /// The glommio executor could not be started.
    #[error("cannot start the task thread executor: {0}")]
    Executor(String),

    /// An error another process reported, with its stable code (kinds
    /// that carry more than a message locally, like `LimitExceeded`,
    /// arrive as this).
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
}

/// Stable codes of the error kinds, as they cross the network: the
/// numbers never change meaning (new kinds take new numbers), so clients of
/// other releases can tell a refused request from a lost connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// A kind this release does not know.
    Other = 0,
    Io = 1,
    Poisoned = 2,
    Corrupt = 3,
    /// A size or count limit was exceeded; nothing was applied.
    Limit = 4,
    OffsetOutOfRange = 5,
    Config = 6,
    Closed = 7,
    Schema = 8,
    Topology = 9,
    Unavailable = 10,
    Executor = 11,
    NotLeader = 12,
}

impl ErrorCode {
    const ALL: [ErrorCode; 13] = [
        ErrorCode::Other,
        ErrorCode::Io,
        ErrorCode::Poisoned,
        ErrorCode::Corrupt,
        ErrorCode::Limit,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::Config,
        ErrorCode::Closed,
        ErrorCode::Schema,
        ErrorCode::Topology,
        ErrorCode::Unavailable,
        ErrorCode::Executor,
        ErrorCode::NotLeader,
    ];

    /// The code numbered `n` (unknown numbers are `Other`).
    pub fn from_u16(n: u16) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| *c as u16 == n)
            .unwrap_or(ErrorCode::Other)
    }

    /// The lowercase name shown to users (`"limit"`, `"schema"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Other => "other",
            ErrorCode::Io => "io",
            ErrorCode::Poisoned => "poisoned",
            ErrorCode::Corrupt => "corrupt",
            ErrorCode::Limit => "limit",
            ErrorCode::OffsetOutOfRange => "offset",
            ErrorCode::Config => "config",
            ErrorCode::Closed => "closed",
            ErrorCode::Schema => "schema",
            ErrorCode::Topology => "topology",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Executor => "executor",
            ErrorCode::NotLeader => "not-leader",
        }
    }

    /// The code named `name` (see [`ErrorCode::name`]).
    pub fn from_name(name: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .unwrap_or(ErrorCode::Other)
    }
}

impl Error {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source: source.into(),
        }
    }

    /// The stable code of this error's kind.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Io { .. } => ErrorCode::Io,
            Error::Poisoned { .. } => ErrorCode::Poisoned,
            Error::Corrupt { .. } => ErrorCode::Corrupt,
            Error::LimitExceeded { .. } => ErrorCode::Limit,
            Error::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            Error::Config { .. } => ErrorCode::Config,
            Error::Closed(_) => ErrorCode::Closed,
            Error::Schema(_) => ErrorCode::Schema,
            Error::Topology(_) => ErrorCode::Topology,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Executor(_) => ErrorCode::Executor,
            Error::NotLeader(_) => ErrorCode::NotLeader,
            Error::Remote { code, .. } => *code,
        }
    }

    /// The error another process reported with `code` and `message`: the
    /// kinds that are only a message come back as themselves, the others
    /// as [`Error::Remote`] with their code.
    pub fn from_code(code: ErrorCode, message: String) -> Error {
        match code {
            ErrorCode::Closed => Error::Closed(message),
            ErrorCode::Schema => Error::Schema(message),
            ErrorCode::Topology => Error::Topology(message),
            ErrorCode::Unavailable => Error::Unavailable(message),
            ErrorCode::NotLeader => Error::NotLeader(message),
            code => Error::Remote { code, message },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_round_trip() {
        // The numbers are part of the wire format: they must never move.
        assert_eq!(ErrorCode::Limit as u16, 4);
        assert_eq!(ErrorCode::Schema as u16, 8);
        assert_eq!(ErrorCode::Executor as u16, 11);
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c as u16), c);
            assert_eq!(ErrorCode::from_name(c.name()), c);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other);
        let limit = Error::check_limit("record", "record_bytes_max", 10, 5).unwrap_err();
        let back = Error::from_code(limit.code(), limit.to_string());
        assert_eq!(back.code(), ErrorCode::Limit);
        assert_eq!(back.to_string(), limit.to_string());
        assert!(matches!(
            Error::from_code(ErrorCode::Closed, "x".into()),
            Error::Closed(_)
        ));
    }
}
