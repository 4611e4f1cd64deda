//! The message vocabulary: every message a client sends a worker, a worker
//! sends another, and every answer, as rkyv types defined once here (the
//! Conductor's admin requests, `net::admin`, are built the same way).
//!
//! A sender archives a message once ([`archived::encode`]); the receiver
//! validates the frame and reads it in place ([`archived::access_as`]),
//! turning into owned data only what it keeps (a record's bytes, a path).
//! Records and query arguments travel as the archived `Value` bytes the
//! client made: a worker checks them and hands them to the log as they are,
//! never decoding and encoding them again. Numbers naming a module's
//! objects (depot, PState, topology, query ids) come from the network and
//! are checked against the module before use.
//!
//! ```text
//! client -> worker   ClientRequest   (objects by name)
//! worker -> worker   PeerMessage     (objects by id, on the lane of its kind)
//! answers            Answer = Result<Payload, WireError>
//! ```
//! Errors carry the stable [`ErrorCode`] number, so a client of another
//! release still tells the kinds apart.

use crate::cluster::AckLevel;
use crate::error::{Error, ErrorCode};
use crate::pstate::Nav;
use crate::value::{archived, Value};

pub use crate::cluster::{AppendResult, Completion, Flow};

/// A request of a client, naming the module and its objects.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ClientRequest {
    /// `record` is the archived `Value` (see [`archived::to_bytes`]).
    Append {
        module: String,
        depot: String,
        record: Vec<u8>,
        ack: AckLevel,
    },
    Read {
        module: String,
        depot: String,
        task: u32,
        start: u64,
        end: u64,
        bytes_max: u64,
    },
    /// On the task the path's first key routes to, or on `task`.
    Select {
        module: String,
        pstate: String,
        path: Vec<Nav>,
        task: Option<u32>,
    },
    /// `args` is the archived `Value`.
    Invoke {
        module: String,
        query: String,
        args: Vec<u8>,
    },
    /// The tasks the worker serves.
    Tasks { module: String },
}

/// `path` as it may travel: archives hold `usize` in 32 bits, so a range
/// limit above `u32::MAX` (more elements than any scan returns) is sent as
/// `u32::MAX` instead of being cut to its low bits.
pub fn wire_path(path: &[Nav]) -> Vec<Nav> {
    path.iter()
        .map(|n| match n {
            Nav::Range {
                lower,
                upper,
                reverse,
                limit,
            } => Nav::Range {
                lower: lower.clone(),
                upper: upper.clone(),
                reverse: *reverse,
                limit: limit.map(|l| l.min(u32::MAX as usize)),
            },
            other => other.clone(),
        })
        .collect()
}

/// A message between the workers of one module, naming objects by id.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PeerMessage {
    /// Is the module served here?
    Ping,
    Append {
        depot: u32,
        task: u32,
        record: Vec<u8>,
        ack: AckLevel,
        /// Whether the sender waits for the answer.
        wants_reply: bool,
    },
    Read {
        depot: u32,
        task: u32,
        start: u64,
        end: u64,
        bytes_max: u64,
    },
    Select {
        pstate: u32,
        task: u32,
        path: Vec<Nav>,
    },
    Invoke {
        query: u32,
        task: u32,
        args: Vec<u8>,
    },
    /// Microbatch control for task thread `thread`.
    Control {
        thread: u32,
        op: ControlOp,
    },
    /// A batch for stage `stage` (1-based) on `task`: `items` as the
    /// sending stage archived them.
    Stage {
        flow: Flow,
        stage: u32,
        task: u32,
        items: Vec<u8>,
    },
    /// A replication message for replica `to` of task thread `thread`'s
    /// group, from replica `from` (one way: the answer only says it was
    /// taken; the protocol resends what is lost).
    Replica {
        thread: u32,
        from: u32,
        to: u32,
        message: crate::replication::Message,
    },
}

/// What a microbatch coordinator asks a task thread.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ControlOp {
    /// Durable end offsets of the topology's source partitions.
    Ends {
        topology: u32,
    },
    /// Compute microbatch `id` over `ranges` (depot, task, start, end).
    Process {
        topology: u32,
        id: u64,
        attempt: u32,
        ranges: Vec<(u32, u32, u64, u64)>,
    },
    Prepare {
        topology: u32,
        id: u64,
        attempt: u32,
    },
    Abort {
        topology: u32,
        id: u64,
    },
    Commit {
        topology: u32,
        id: u64,
    },
    Recover {
        topology: u32,
        decided: u64,
    },
    /// Hold client reads off for at most `lease_ms`.
    GateClose {
        lease_ms: u64,
    },
    GateOpen,
}

/// What a request's answer carries.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Payload {
    /// Done, nothing to return.
    Done,
    Appended(AppendResult),
    /// (offset, archived record) as the partition holds them.
    Records(Vec<(u64, Vec<u8>)>),
    Selected(Selected),
    /// A query's result.
    Value(Value),
    Tasks(Vec<u32>),
    /// (depot, task, durable end) of a topology's sources.
    Ends(Vec<(u32, u32, u64)>),
    Completion(Completion),
}

/// What a select reached.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Selected {
    Values(Vec<Value>),
    /// One value, as the PState stores it (an archived `Value`): answered
    /// without decoding it on the worker.
    Stored(Vec<u8>),
}

impl Selected {
    /// The values (a stored one decoded and checked).
    pub fn into_values(self) -> crate::Result<Vec<Value>> {
        match self {
            Selected::Values(v) => Ok(v),
            Selected::Stored(bytes) => Ok(vec![archived::from_bytes(&bytes).map_err(|e| Error::Corrupt {
                path: "<selected value>".into(),
                offset: 0,
                position: 0,
                reason: e.to_string(),
            })?]),
        }
    }
}

/// An error as it crosses the network.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireError {
    /// An [`ErrorCode`] number.
    pub code: u16,
    pub message: String,
    /// For [`ErrorCode::Limit`]: the size that was too large, and the limit.
    pub size: u64,
    pub max: u64,
}

impl WireError {
    pub fn new(e: &Error) -> WireError {
        let (size, max) = match e {
            Error::LimitExceeded { size, max, .. } => (*size, *max),
            _ => (0, 0),
        };
        WireError {
            code: e.code() as u16,
            message: e.to_string(),
            size,
            max,
        }
    }

    pub fn code(&self) -> ErrorCode {
        ErrorCode::from_u16(self.code)
    }

    /// The error a client sees.
    pub fn into_error(self) -> Error {
        Error::from_code(self.code(), self.message)
    }

    /// The error a worker sees from another: that worker being away or
    /// closing is `Unavailable` (the work runs again or is retried), a
    /// limit keeps its sizes (a microbatch plans smaller ranges on it).
    pub fn into_peer_error(self) -> Error {
        match self.code() {
            ErrorCode::Closed | ErrorCode::Unavailable => Error::Unavailable(self.message),
            ErrorCode::Limit => Error::LimitExceeded {
                what: "a batch on another worker",
                limit: "its storage limit",
                size: self.size,
                max: self.max,
            },
            code => Error::from_code(code, self.message),
        }
    }
}

/// An answer: what the request produced, or why not.
pub type Answer = Result<Payload, WireError>;

/// The bytes of an answer.
pub fn encode_answer(answer: crate::Result<Payload>) -> Vec<u8> {
    archived::encode(&answer.map_err(|e| WireError::new(&e)))
}

/// An append's module, depot, archived record and ack level.
pub type AppendParts<'a> = (&'a str, &'a str, &'a [u8], AckLevel);

/// What an append request names. `None` for another request; `Err` when
/// the ack level does not read back.
pub fn append_parts(req: &ArchivedClientRequest) -> Option<Result<AppendParts<'_>, archived::ArchiveError>> {
    let ArchivedClientRequest::Append {
        module,
        depot,
        record,
        ack,
    } = req
    else {
        return None;
    };
    Some(archived::to_owned::<AckLevel>(ack).map(|ack| (module.as_str(), depot.as_str(), record.as_slice(), ack)))
}

/// A select's module, PState, task (if given) and path.
pub type SelectParts<'a> = (&'a str, &'a str, Option<u32>, Vec<Nav>);

/// What a select request names: module, PState, the task if given, and
/// the path (owned). `None` for another request; `Err` when the path does
/// not read back.
pub fn select_parts(req: &ArchivedClientRequest) -> Option<Result<SelectParts<'_>, archived::ArchiveError>> {
    let ArchivedClientRequest::Select {
        module,
        pstate,
        path,
        task,
    } = req
    else {
        return None;
    };
    Some(archived::to_owned::<Vec<Nav>>(path).map(|path| {
        (
            module.as_str(),
            pstate.as_str(),
            task.as_ref().map(|t| t.to_native()),
            path,
        )
    }))
}

/// The bytes of an answer to a client. A worker that could not reach
/// another is, to the client, a closed path: it finds the workers again
/// and resends reads.
pub fn encode_client_answer(answer: crate::Result<Payload>) -> Vec<u8> {
    encode_answer(answer.map_err(|e| match e {
        Error::Unavailable(why) => Error::Closed(why),
        e => e,
    }))
}

/// Decodes an answer's bytes (an error when they are not a valid answer).
pub fn decode_answer(bytes: &[u8]) -> Result<Answer, archived::ArchiveError> {
    archived::decode_as::<Answer>(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ops::Bound;

    fn round_trip<T>(m: &T)
    where
        T: PartialEq + std::fmt::Debug + rkyv::Archive + for<'a> rkyv::Serialize<archived::Serializer<'a>>,
        T::Archived: rkyv::Portable
            + for<'a> rkyv::bytecheck::CheckBytes<rkyv::rancor::Strategy<archived::Validator<'a>, rkyv::rancor::Error>>
            + rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rkyv::rancor::Error>>,
    {
        let bytes = archived::encode(m);
        assert_eq!(&archived::decode_as::<T>(&bytes).unwrap(), m);
        // Readable at any alignment (frames start anywhere in a buffer).
        let mut shifted = vec![0u8; 3];
        shifted.extend_from_slice(&bytes);
        assert_eq!(&archived::decode_as::<T>(&shifted[3..]).unwrap(), m);
        // Every truncation is refused, never read.
        for cut in 0..bytes.len() {
            let _ = archived::decode_as::<T>(&bytes[..cut]);
        }
    }

    #[test]
    fn every_message_round_trips() {
        let record = archived::to_bytes(&Value::map([("k", 1)]));
        let path = vec![
            Nav::key("alice"),
            Nav::range(Bound::Included(Value::Int(1)), Bound::Unbounded),
            Nav::last(3),
            Nav::NilToValue(Value::Int(0)),
            Nav::All,
            Nav::MapVals,
            Nav::Size,
        ];
        for r in [
            ClientRequest::Append {
                module: "M".into(),
                depot: "*d".into(),
                record: record.clone(),
                ack: AckLevel::AppendAck,
            },
            ClientRequest::Read {
                module: "M".into(),
                depot: "*d".into(),
                task: 3,
                start: 1,
                end: u64::MAX,
                bytes_max: 1 << 20,
            },
            ClientRequest::Select {
                module: "M".into(),
                pstate: "$$p".into(),
                path: path.clone(),
                task: Some(2),
            },
            ClientRequest::Invoke {
                module: "M".into(),
                query: "q".into(),
                args: record.clone(),
            },
            ClientRequest::Tasks { module: "M".into() },
        ] {
            round_trip(&r);
        }
        for m in [
            PeerMessage::Ping,
            PeerMessage::Append {
                depot: 1,
                task: 7,
                record: record.clone(),
                ack: AckLevel::None,
                wants_reply: false,
            },
            PeerMessage::Select {
                pstate: 0,
                task: 1,
                path,
            },
            PeerMessage::Control {
                thread: 1,
                op: ControlOp::Process {
                    topology: 0,
                    id: 9,
                    attempt: 2,
                    ranges: vec![(0, 1, 5, 10)],
                },
            },
            PeerMessage::Control {
                thread: 0,
                op: ControlOp::GateClose { lease_ms: 10_000 },
            },
            PeerMessage::Stage {
                flow: Flow::Microbatch {
                    topology: 1,
                    id: 4,
                    attempt: 0,
                },
                stage: 2,
                task: 3,
                items: vec![1, 2, 3],
            },
        ] {
            round_trip(&m);
        }
        let mut failed = BTreeMap::new();
        failed.insert(3u64, "why".to_string());
        for a in [
            Ok(Payload::Done),
            Ok(Payload::Appended(AppendResult {
                task: 1,
                offset: Some(5),
                ack_returns: [("t".to_string(), Value::Int(1))].into_iter().collect(),
            })),
            Ok(Payload::Records(vec![(0, record.clone())])),
            Ok(Payload::Selected(Selected::Stored(record))),
            Ok(Payload::Selected(Selected::Values(vec![Value::Nil]))),
            Ok(Payload::Completion(Completion {
                failed,
                ack_returns: vec![(1, Value::Int(2))],
                results: vec![Value::from("r")],
                fatal: None,
                unavailable: Some("away".into()),
            })),
            Err(WireError::new(&Error::LimitExceeded {
                what: "record",
                limit: "record_bytes_max",
                size: 10,
                max: 5,
            })),
        ] {
            round_trip::<Answer>(&a);
        }
    }

    #[test]
    fn errors_keep_their_kind_across_the_wire() {
        let limit = WireError::new(&Error::LimitExceeded {
            what: "batch",
            limit: "x",
            size: 10,
            max: 5,
        });
        assert!(matches!(
            limit.clone().into_peer_error(),
            Error::LimitExceeded { size: 10, max: 5, .. }
        ));
        assert_eq!(limit.into_error().code(), ErrorCode::Limit);
        let closed = WireError::new(&Error::Closed("gone".into()));
        assert!(matches!(closed.clone().into_peer_error(), Error::Unavailable(_)));
        assert!(matches!(closed.into_error(), Error::Closed(m) if m.contains("gone")));
    }

    #[test]
    fn hostile_messages_are_refused() {
        assert!(archived::access_as::<ArchivedClientRequest>(b"\x00\x01garbage").is_err());
        assert!(archived::access_as::<ArchivedPeerMessage>(&[]).is_err());
        // A value nested past the limit inside a message.
        let deep = (0..crate::value::DEPTH_MAX + 20).fold(Value::Nil, |v, _| Value::List(vec![v]));
        let bytes = archived::encode(&PeerMessage::Select {
            pstate: 0,
            task: 0,
            path: vec![Nav::Key(deep)],
        });
        let e = archived::access_as::<ArchivedPeerMessage>(&bytes)
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("nest deeper"), "{e}");
    }
}

/// Transport frames: `[len: u32 LE][id: u64 LE][kind: u8][payload]`, where
/// `len` counts the id, kind and payload. Requests and their answers share
/// an id; answers may come in any order.
pub mod frame {
    /// Bytes before the payload.
    pub const HEAD_BYTES: usize = 4 + 8 + 1;
    /// A request.
    pub const KIND_REQUEST: u8 = 0;
    /// An answer.
    pub const KIND_RESPONSE: u8 = 1;
    /// The server could not answer (the payload says why, as UTF-8).
    pub const KIND_ERROR: u8 = 2;

    /// One frame of `payload`.
    pub fn make(id: u64, kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(HEAD_BYTES + payload.len());
        f.extend_from_slice(&((9 + payload.len()) as u32).to_le_bytes());
        f.extend_from_slice(&id.to_le_bytes());
        f.push(kind);
        f.extend_from_slice(payload);
        f
    }

    /// The length field of a frame: the bytes after it (id, kind, payload),
    /// or `None` when it is outside `9..=max`.
    pub fn body_len(head: [u8; 4], max: usize) -> Option<usize> {
        let len = u32::from_le_bytes(head) as usize;
        (9..=max).contains(&len).then_some(len)
    }

    /// The id and kind at the start of a frame's body.
    pub fn id_kind(body: &[u8]) -> (u64, u8) {
        (
            u64::from_le_bytes(body[..8].try_into().expect("a body of at least 9 bytes")),
            body[8],
        )
    }
}
