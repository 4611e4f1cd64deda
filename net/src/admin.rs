//! The Conductor's admin API: requests and responses are `Value` maps sent
//! as rkyv archives over the framed transport (like the wire protocol of
//! workers).
//!
//! ```text
//! {op: uploadStart, size}                 -> {upload}
//! {op: uploadChunk, upload, offset, data} -> {}
//! {op: uploadFinish, upload}              -> {artifact: sha256 hex}
//! {op: download, artifact, offset}        -> {data, size}      (4 MiB per call)
//! {op: deployCheck, module, artifact: "", tasks, threads, workers, replicationFactor, configOverrides}
//!                                         -> {}  (every check that needs no artifact; before the upload)
//! {op: deploy, module, artifact, tasks, threads, workers, replicationFactor, configOverrides} -> {state}
//! {op: status, module}                    -> {state, down: [{worker, error}]}  (state nil: no such module)
//! {op: taskGroups, module}                -> {groups: [{taskGroup, tasks, worker, address, supervisor, down}]}
//! {op: workers, module}                   -> {workers: [{worker, address, tasks, threads, workers}]}
//! {op: destroy, module}                   -> {state}
//! errors: {error: message}
//! ```
//! The Conductor decodes every request into an [`AdminRequest`] (fields
//! checked for presence, type and range) before it acts on any.

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
    pub fn call(&self, request: &Value) -> Result<BTreeMap<Value, Value>, String> {
        self.call_bytes(&archived::to_bytes(request))
    }

    /// Sends a typed request (encoded as the Conductor decodes it).
    pub fn call_request(&self, request: &AdminRequest) -> Result<BTreeMap<Value, Value>, String> {
        self.call_bytes(&request.encode())
    }

    fn call_bytes(&self, request: &[u8]) -> Result<BTreeMap<Value, Value>, String> {
        let bytes = self.conn.call(request).map_err(|e| e.to_string())?;
        let Value::Map(m) = archived::from_bytes(&bytes).map_err(|e| e.to_string())? else {
            return Err("the Conductor sent a response that is not a map".into());
        };
        if let Some(e) = m.get(&Value::from("error")) {
            return Err(e.as_str().unwrap_or("unknown error").to_string());
        }
        Ok(m)
    }
}

/// Builds a request map.
pub fn request<const N: usize>(op: &str, fields: [(&str, Value); N]) -> Value {
    let mut m: BTreeMap<Value, Value> = fields.into_iter().map(|(k, v)| (Value::from(k), v)).collect();
    m.insert(Value::from("op"), Value::from(op));
    Value::Map(m)
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Decodes an admin request from the bytes of a frame (an archived
    /// `Value` map; nesting and sizes bounded by the archive's checks).
    pub fn decode(frame: &[u8]) -> Result<AdminRequest, String> {
        let v = archived::from_bytes(frame).map_err(|e| format!("the request does not decode: {e}"))?;
        let Value::Map(m) = v else {
            return Err("a request is a map".into());
        };
        let string = |name: &str| -> Result<String, String> {
            let s = text(&m, name)?;
            if s.len() > TEXT_BYTES_MAX {
                return Err(format!("field {name} is {} bytes, above {TEXT_BYTES_MAX}", s.len()));
            }
            Ok(s.to_string())
        };
        let unsigned = |name: &str| -> Result<u64, String> {
            u64::try_from(int(&m, name)?).map_err(|_| format!("field {name} must not be negative"))
        };
        let count = |name: &str| -> Result<u32, String> {
            u32::try_from(int(&m, name)?).map_err(|_| format!("--{name} must be a positive number below 2^32"))
        };
        let deploy = || -> Result<DeployArgs, String> {
            Ok(DeployArgs {
                module: string("module")?,
                artifact: string("artifact")?,
                tasks: count("tasks")?,
                threads: count("threads")?,
                workers: count("workers")?,
                replication_factor: count("replicationFactor")?,
                config_overrides: match m.get(&Value::from("configOverrides")) {
                    None | Some(Value::Nil) => None,
                    Some(_) => Some(string("configOverrides")?),
                },
            })
        };
        Ok(match text(&m, "op")? {
            "uploadStart" => AdminRequest::UploadStart {
                size: unsigned("size")?,
            },
            "uploadChunk" => AdminRequest::UploadChunk {
                upload: int(&m, "upload")?,
                offset: unsigned("offset")?,
                data: bytes(&m, "data")?.to_vec(),
            },
            "uploadFinish" => AdminRequest::UploadFinish {
                upload: int(&m, "upload")?,
            },
            "download" => AdminRequest::Download {
                artifact: string("artifact")?,
                offset: unsigned("offset")?,
            },
            "deployCheck" => AdminRequest::DeployCheck(deploy()?),
            "deploy" => AdminRequest::Deploy(deploy()?),
            "status" => AdminRequest::Status {
                module: string("module")?,
            },
            "taskGroups" => AdminRequest::TaskGroups {
                module: string("module")?,
                instance: match m.get(&Value::from("instance")) {
                    None | Some(Value::Nil) => None,
                    Some(_) => Some(count("instance")?),
                },
            },
            "workers" => AdminRequest::Workers {
                module: string("module")?,
                append: match m.get(&Value::from("target")).map(Value::as_str) {
                    None | Some(Some("read")) => false,
                    Some(Some("append")) => true,
                    Some(other) => return Err(format!("field target must be read or append, got {other:?}")),
                },
            },
            "destroy" => AdminRequest::Destroy {
                module: string("module")?,
            },
            other => return Err(format!("unknown admin op {other:?}")),
        })
    }

    /// The request as the client sends it.
    pub fn encode(&self) -> Vec<u8> {
        let module = |op: &str, module: &str| request(op, [("module", Value::from(module))]);
        let deploy = |op: &str, d: &DeployArgs| {
            let mut fields = vec![
                ("module", Value::from(d.module.as_str())),
                ("artifact", Value::from(d.artifact.as_str())),
                ("tasks", Value::from(d.tasks)),
                ("threads", Value::from(d.threads)),
                ("workers", Value::from(d.workers)),
                ("replicationFactor", Value::from(d.replication_factor)),
            ];
            if let Some(c) = &d.config_overrides {
                fields.push(("configOverrides", Value::from(c.as_str())));
            }
            let mut m: BTreeMap<Value, Value> = fields.into_iter().map(|(k, v)| (Value::from(k), v)).collect();
            m.insert(Value::from("op"), Value::from(op));
            Value::Map(m)
        };
        let v = match self {
            AdminRequest::UploadStart { size } => request("uploadStart", [("size", Value::Int(*size as i64))]),
            AdminRequest::UploadChunk { upload, offset, data } => request(
                "uploadChunk",
                [
                    ("upload", Value::Int(*upload)),
                    ("offset", Value::Int(*offset as i64)),
                    ("data", Value::Bytes(data.clone())),
                ],
            ),
            AdminRequest::UploadFinish { upload } => request("uploadFinish", [("upload", Value::Int(*upload))]),
            AdminRequest::Download { artifact, offset } => request(
                "download",
                [
                    ("artifact", Value::from(artifact.as_str())),
                    ("offset", Value::Int(*offset as i64)),
                ],
            ),
            AdminRequest::DeployCheck(d) => deploy("deployCheck", d),
            AdminRequest::Deploy(d) => deploy("deploy", d),
            AdminRequest::Status { module: m } => module("status", m),
            AdminRequest::TaskGroups { module: m, instance } => match instance {
                Some(n) => request(
                    "taskGroups",
                    [("module", Value::from(m.as_str())), ("instance", Value::from(*n))],
                ),
                None => module("taskGroups", m),
            },
            AdminRequest::Workers { module: m, append } => request(
                "workers",
                [
                    ("module", Value::from(m.as_str())),
                    ("target", Value::from(if *append { "append" } else { "read" })),
                ],
            ),
            AdminRequest::Destroy { module: m } => module("destroy", m),
        };
        archived::to_bytes(&v)
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
        let e = AdminRequest::decode(&archived::to_bytes(&request(
            "deploy",
            [("module", Value::from("M")), ("tasks", Value::Int(-1))],
        )))
        .unwrap_err();
        assert!(e.contains("artifact") || e.contains("tasks"), "{e}");
        let e =
            AdminRequest::decode(&archived::to_bytes(&request("uploadStart", [("size", Value::Int(-5))]))).unwrap_err();
        assert!(e.contains("size must not be negative"), "{e}");
        assert!(AdminRequest::decode(&archived::deep_list_archive(100_000)).is_err());
        assert!(AdminRequest::decode(b"\x00\x01garbage").is_err());
    }
}
