//! The Conductor's admin API: requests are [`AdminRequest`]s, rkyv types
//! of the message vocabulary (like `engine::wire`'s), read in place and
//! checked (string lengths, ranges) before the Conductor acts on any;
//! answers are `Value` maps (documents the CLI prints):
//!
//! ```text
//! UploadStart {size}                 -> {upload}
//! UploadChunk {upload, offset, data} -> {}
//! UploadFinish {upload}              -> {artifact: sha256 hex}
//! Download {artifact, offset}        -> {data, size}      (4 MiB per call)
//! DeployCheck (artifact "")          -> {}  (every check that needs no artifact; before the upload)
//! Deploy {module, artifact, tasks, threads, workers, replicationFactor, configOverrides} -> {state}
//! Status {module}                    -> {state, down: [{worker, error}]}  (state nil: no such module)
//! TaskGroups {module, instance?}     -> {groups: [{taskGroup, tasks, worker, address, supervisor, down}]}
//! Workers {module, append}           -> {workers: [{worker, address, tasks, threads, workers}]}
//! Destroy {module}                   -> {state}
//! errors: {error: message}
//! ```

use std::collections::BTreeMap;

use crate::{Connection, FRAME_BYTES_MAX, PROTOCOL_VERSION};
use engine::value::{archived, Value};

/// Bytes moved per upload or download call.
pub const CHUNK_BYTES: usize = 4 << 20;

/// A connection to the Conductor.
#[derive(Debug)]
pub struct Admin {
    conn: Connection,
}

impl Admin {
    pub fn connect(addr: &str, secret: &crate::auth::Secret) -> Result<Admin, String> {
        Connection::connect(addr, PROTOCOL_VERSION, FRAME_BYTES_MAX, secret)
            .map(|conn| Admin { conn })
            .map_err(|e| format!("cannot reach the Conductor at {addr} (conductor.host, conductor.port): {e}"))
    }

    /// Sends `request`; the response map, or its error message.
    pub fn call_request(&self, request: &AdminRequest) -> Result<BTreeMap<Value, Value>, String> {
        let bytes = self.conn.call(&request.encode()).map_err(|e| e.to_string())?;
        let Value::Map(m) = archived::from_bytes(&bytes).map_err(|e| e.to_string())? else {
            return Err("the Conductor sent a response that is not a map".into());
        };
        if let Some(e) = m.get(&Value::from("error")) {
            return Err(e.as_str().unwrap_or("unknown error").to_string());
        }
        Ok(m)
    }
}

/// A string field of a map.
pub fn text<'m>(m: &'m BTreeMap<Value, Value>, name: &str) -> Result<&'m str, String> {
    m.get(&Value::from(name))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("field {name} must be a string"))
}

/// An integer field of a map.
pub fn int(m: &BTreeMap<Value, Value>, name: &str) -> Result<i64, String> {
    m.get(&Value::from(name))
        .and_then(Value::as_int)
        .ok_or_else(|| format!("field {name} must be an integer"))
}

/// A bytes field of a map.
pub fn bytes<'m>(m: &'m BTreeMap<Value, Value>, name: &str) -> Result<&'m [u8], String> {
    match m.get(&Value::from(name)) {
        Some(Value::Bytes(b)) => Ok(b),
        _ => Err(format!("field {name} must be bytes")),
    }
}

/// A deploy's arguments (`deploy` and `deployCheck`).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DeployArgs {
    pub module: String,
    /// The artifact's sha256 (empty for `deployCheck`).
    pub artifact: String,
    pub tasks: u32,
    pub threads: u32,
    pub workers: u32,
    pub replication_factor: u32,
    /// Worker configurations as JSON text.
    pub config_overrides: Option<String>,
}

/// One admin request, decoded and checked: every field present with its
/// type and range, nothing else trusted. The Conductor acts only on these.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AdminRequest {
    UploadStart {
        size: u64,
    },
    UploadChunk {
        upload: i64,
        offset: u64,
        data: Vec<u8>,
    },
    UploadFinish {
        upload: i64,
    },
    Download {
        artifact: String,
        offset: u64,
    },
    DeployCheck(DeployArgs),
    Deploy(DeployArgs),
    Status {
        module: String,
    },
    /// The task groups of `instance` (the read target when `None`).
    TaskGroups {
        module: String,
        instance: Option<u32>,
    },
    /// The workers serving reads, or appends with `append`.
    Workers {
        module: String,
        append: bool,
    },
    Destroy {
        module: String,
    },
}

/// The longest string field accepted (module names, artifact ids,
/// configurations are far shorter).
const TEXT_BYTES_MAX: usize = 64 << 10;

impl AdminRequest {
    /// Decodes an admin request from the bytes of a frame and checks it
    /// (nesting and sizes bounded by the archive's checks, strings by
    /// [`TEXT_BYTES_MAX`]).
    pub fn decode(frame: &[u8]) -> Result<AdminRequest, String> {
        let r = archived::decode_as::<AdminRequest>(frame).map_err(|e| format!("the request does not decode: {e}"))?;
        let text = |name: &str, s: &str| -> Result<(), String> {
            if s.len() > TEXT_BYTES_MAX {
                return Err(format!("field {name} is {} bytes, above {TEXT_BYTES_MAX}", s.len()));
            }
            Ok(())
        };
        match &r {
            AdminRequest::Download { artifact, .. } => text("artifact", artifact)?,
            AdminRequest::DeployCheck(d) | AdminRequest::Deploy(d) => {
                text("module", &d.module)?;
                text("artifact", &d.artifact)?;
                text("configOverrides", d.config_overrides.as_deref().unwrap_or_default())?;
            }
            AdminRequest::Status { module }
            | AdminRequest::TaskGroups { module, .. }
            | AdminRequest::Workers { module, .. }
            | AdminRequest::Destroy { module } => text("module", module)?,
            AdminRequest::UploadStart { .. } | AdminRequest::UploadChunk { .. } | AdminRequest::UploadFinish { .. } => {
            }
        }
        Ok(r)
    }

    /// The request as the client sends it.
    pub fn encode(&self) -> Vec<u8> {
        archived::encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_named() {
        let d = DeployArgs {
            module: "WordCountModule".into(),
            artifact: "ab".repeat(32),
            tasks: 8,
            threads: 2,
            workers: 1,
            replication_factor: 1,
            config_overrides: Some("{}".into()),
        };
        for r in [
            AdminRequest::UploadStart { size: 30 << 20 },
            AdminRequest::UploadChunk {
                upload: 3,
                offset: 4 << 20,
                data: vec![1, 2, 3],
            },
            AdminRequest::Deploy(d.clone()),
            AdminRequest::DeployCheck(DeployArgs {
                config_overrides: None,
                ..d
            }),
            AdminRequest::Destroy { module: "M".into() },
            AdminRequest::TaskGroups {
                module: "M".into(),
                instance: Some(3),
            },
            AdminRequest::TaskGroups {
                module: "M".into(),
                instance: None,
            },
            AdminRequest::Workers {
                module: "M".into(),
                append: true,
            },
        ] {
            assert_eq!(AdminRequest::decode(&r.encode()).unwrap(), r);
        }
        let e = AdminRequest::decode(
            &AdminRequest::Status {
                module: "m".repeat(TEXT_BYTES_MAX + 1),
            }
            .encode(),
        )
        .unwrap_err();
        assert!(e.contains("field module is"), "{e}");
        // A request of the old form (a Value map) is refused, named.
        let old_form = Value::map([("op", Value::from("uploadStart")), ("size", Value::Int(5))]);
        let e = AdminRequest::decode(&archived::to_bytes(&old_form)).unwrap_err();
        assert!(e.contains("does not decode"), "{e}");
        assert!(AdminRequest::decode(&archived::deep_list_archive(100_000)).is_err());
        assert!(AdminRequest::decode(b"\x00\x01garbage").is_err());
    }
}
