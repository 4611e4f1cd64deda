//! The Conductor's admin API: requests and responses are `Value` maps sent
//! as rkyv archives over the framed transport (like the wire protocol of
//! workers).
//!
//! ```text
//! {op: uploadStart, size}                 -> {upload}
//! {op: uploadChunk, upload, offset, data} -> {}
//! {op: uploadFinish, upload}              -> {artifact: sha256 hex}
//! {op: download, artifact, offset}        -> {data, size}      (4 MiB per call)
//! {op: deploy, module, artifact, tasks, threads, workers, replicationFactor} -> {state}
//! {op: status, module}                    -> {state}  (nil: no such module)
//! {op: taskGroups, module}                -> {groups: [{taskGroup, tasks, worker, address, supervisor}]}
//! {op: workers, module}                   -> {workers: [{worker, address, tasks, threads, workers}]}
//! {op: destroy, module}                   -> {state}
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
    pub fn call(&self, request: &Value) -> Result<BTreeMap<Value, Value>, String> {
        let bytes = self
            .conn
            .call(&archived::to_bytes(request))
            .map_err(|e| e.to_string())?;
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
