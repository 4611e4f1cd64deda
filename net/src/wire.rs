//! The module API on the wire: requests and responses are `Value` maps,
//! sent as rkyv archives in transport frames.
//!
//! ```text
//! {op: "append", module, depot, record, ack: "ack"|"appendAck"|"none"}
//!     -> {task, offset (int or nil), ackReturns: {topology: value}}
//! {op: "read", module, depot, task, start, end, bytesMax} -> {records: [[offset, record], ...]}
//! {op: "select", module, pstate, path, task (optional)}   -> {values: [...]}
//! {op: "invoke", module, query, args}                     -> {result: value}
//! errors: {error: message, kind: name, code: the stable `ErrorCode` number}
//! ```
//! A path is a list of steps: `[key, v]`, `[range, lower, upper, reverse,
//! limit]` (a bound is `[in|ex, v]` or `[un]`; limit -1 for none), `[all]`,
//! `[mapVals]`, `[size]`, `[nilToValue, v]`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use engine::cluster::{AckLevel, AppendResult, InProcessCluster};
pub use engine::pstate::path::{path_from_value, path_to_value};
use engine::value::{archived, Value};
use engine::{Error, ErrorCode, Result};

fn bad(why: impl std::fmt::Display) -> Error {
    Error::Schema(why.to_string())
}

fn ack_name(ack: AckLevel) -> &'static str {
    match ack {
        AckLevel::Ack => "ack",
        AckLevel::AppendAck => "appendAck",
        AckLevel::None => "none",
    }
}

fn field<'v>(m: &'v BTreeMap<Value, Value>, name: &str) -> Result<&'v Value> {
    m.get(&Value::from(name))
        .ok_or_else(|| bad(format!("the request has no field {name:?}")))
}

fn str_field<'v>(m: &'v BTreeMap<Value, Value>, name: &str) -> Result<&'v str> {
    field(m, name)?
        .as_str()
        .ok_or_else(|| bad(format!("field {name:?} must be a string")))
}

fn int_field(m: &BTreeMap<Value, Value>, name: &str) -> Result<i64> {
    field(m, name)?
        .as_int()
        .ok_or_else(|| bad(format!("field {name:?} must be an integer")))
}

fn u64_field(m: &BTreeMap<Value, Value>, name: &str) -> Result<u64> {
    u64::try_from(int_field(m, name)?).map_err(|_| bad(format!("field {name:?} must not be negative")))
}

/// Requests as values (what a remote client sends).
pub fn append_request(module: &str, depot: &str, record: &Value, ack: AckLevel) -> Value {
    Value::map([
        ("op", Value::from("append")),
        ("module", Value::from(module)),
        ("depot", Value::from(depot)),
        ("record", record.clone()),
        ("ack", Value::from(ack_name(ack))),
    ])
}

fn error_answer(e: &Error) -> Value {
    // A worker that could not reach another is, to the client, a closed
    // path: it finds the workers again and resends reads.
    let code = match e.code() {
        ErrorCode::Unavailable => ErrorCode::Closed,
        code => code,
    };
    Value::map([
        ("error", Value::from(e.to_string())),
        ("kind", Value::from(code.name())),
        ("code", Value::Int(i64::from(code as u16))),
    ])
}

/// Serves one request against the modules of `cluster` (blocking).
pub fn handle(cluster: &InProcessCluster, request: &[u8]) -> Vec<u8> {
    smol::block_on(handle_future(cluster, request))
}

/// A future serving one request; it never blocks the thread it runs on.
pub fn handle_future(cluster: &InProcessCluster, request: &[u8]) -> impl Future<Output = Vec<u8>> + Send + 'static {
    let started = archived::from_bytes(request)
        .map_err(|e| bad(format!("the request is not a valid archive: {e}")))
        .and_then(|req| dispatch(cluster, &req));
    async move {
        let answer = match started {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        archived::to_bytes(&answer.unwrap_or_else(|e| error_answer(&e)))
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Value>> + Send>>;

fn ack_from_name(name: &str) -> Result<AckLevel> {
    match name {
        "ack" => Ok(AckLevel::Ack),
        "appendAck" => Ok(AckLevel::AppendAck),
        "none" => Ok(AckLevel::None),
        other => Err(bad(format!("ack level {other:?} is not one of ack, appendAck, none"))),
    }
}

fn append_answer(r: AppendResult) -> Value {
    Value::map([
        ("task", Value::Int(i64::from(r.task))),
        ("offset", r.offset.map_or(Value::Nil, |o| Value::Int(o as i64))),
        (
            "ackReturns",
            Value::Map(r.ack_returns.into_iter().map(|(k, v)| (Value::from(k), v)).collect()),
        ),
    ])
}

fn select_task(m: &BTreeMap<Value, Value>) -> Result<Option<u32>> {
    match m.get(&Value::from("task")) {
        Some(Value::Int(t)) => Ok(Some(u32::try_from(*t).map_err(|_| bad("task out of range"))?)),
        _ => Ok(None),
    }
}

fn encoded(answer: Result<Value>) -> Vec<u8> {
    archived::to_bytes(&answer.unwrap_or_else(|e| error_answer(&e)))
}

/// Starts a request whose answer a task thread gives to the `Respond`.
type Start<'a> = Box<dyn FnOnce(crate::transport::Respond) -> Result<()> + 'a>;

/// Serves one request, answering through `respond`: appends and selects
/// answer from the task thread that serves them (no other thread in
/// between); the rest returns a future for the server's executor.
pub fn handle_then(
    cluster: &InProcessCluster,
    request: &[u8],
    respond: crate::transport::Respond,
) -> Option<crate::transport::Later> {
    let req = match archived::from_bytes(request) {
        Ok(r) => r,
        Err(e) => {
            respond(Ok(encoded(Err(bad(format!(
                "the request is not a valid archive: {e}"
            ))))));
            return None;
        }
    };
    let direct = (|| -> Result<Option<Start<'_>>> {
        let m = req.as_map().ok_or_else(|| bad("a request is a map"))?;
        let module = str_field(m, "module")?;
        Ok(match str_field(m, "op")? {
            "append" => {
                let ack = ack_from_name(str_field(m, "ack")?)?;
                let depot = cluster.depot(module, str_field(m, "depot")?)?;
                let record = field(m, "record")?;
                Some(Box::new(move |respond: crate::transport::Respond| {
                    depot.append_then(record, ack, move |r| respond(Ok(encoded(r.map(append_answer)))))
                }))
            }
            "select" => {
                let client = cluster.pstate(module, str_field(m, "pstate")?)?;
                let path = path_from_value(field(m, "path")?)?;
                let task = select_task(m)?;
                Some(Box::new(move |respond: crate::transport::Respond| {
                    client.select_then(task, path, move |r| {
                        respond(Ok(encoded(
                            r.map(|values| Value::map([("values", Value::List(values))])),
                        )))
                    })
                }))
            }
            _ => None,
        })
    })();
    match direct {
        Ok(Some(start)) => {
            // The callback answers; an error before anything was sent
            // answers here (the callback was dropped unused).
            let once = engine::sync::CallOnce::new(respond);
            let relay = once.clone();
            if let Err(e) = start(Box::new(move |answer| {
                relay.call(answer);
            })) {
                once.call(Ok(encoded(Err(e))));
            }
            None
        }
        Ok(None) => {
            let answer = handle_future(cluster, request);
            Some(Box::pin(async move { respond(Ok(answer.await)) }))
        }
        Err(e) => {
            respond(Ok(encoded(Err(e))));
            None
        }
    }
}

fn dispatch(cluster: &InProcessCluster, req: &Value) -> Result<Answer> {
    let m = req.as_map().ok_or_else(|| bad("a request is a map"))?;
    let module = str_field(m, "module")?;
    match str_field(m, "op")? {
        "append" => {
            let ack = ack_from_name(str_field(m, "ack")?)?;
            let pending = cluster
                .depot(module, str_field(m, "depot")?)?
                .append_future(field(m, "record")?, ack)?;
            Ok(Box::pin(async move { Ok(append_answer(pending.await?)) }))
        }
        "read" => {
            let task = u32::try_from(u64_field(m, "task")?).map_err(|_| bad("task out of range"))?;
            let pending = cluster.depot(module, str_field(m, "depot")?)?.read_future(
                task,
                u64_field(m, "start")?,
                u64_field(m, "end")?,
                usize::try_from(u64_field(m, "bytesMax")?).unwrap_or(usize::MAX),
            );
            Ok(Box::pin(async move {
                let records = pending.await?;
                Ok(Value::map([(
                    "records",
                    Value::List(
                        records
                            .into_iter()
                            .map(|(o, r)| Value::list([Value::Int(o as i64), r]))
                            .collect(),
                    ),
                )]))
            }))
        }
        "select" => {
            let client = cluster.pstate(module, str_field(m, "pstate")?)?;
            let path = path_from_value(field(m, "path")?)?;
            let pending = client.select_future(select_task(m)?, path);
            Ok(Box::pin(async move {
                Ok(Value::map([("values", Value::List(pending.await?))]))
            }))
        }
        "invoke" => {
            let pending = cluster
                .query(module, str_field(m, "query")?)?
                .invoke_future(m.get(&Value::from("args")).unwrap_or(&Value::Nil));
            Ok(Box::pin(async move { Ok(Value::map([("result", pending.await?)])) }))
        }
        "tasks" => {
            let local = cluster.local_tasks(module)?;
            Ok(Box::pin(async move {
                Ok(Value::map([(
                    "tasks",
                    Value::List(local.into_iter().map(|t| Value::Int(i64::from(t))).collect()),
                )]))
            }))
        }
        other => Err(bad(format!(
            "unknown op {other:?} (ops: append, read, select, invoke, tasks)"
        ))),
    }
}

/// A response value as a result (what a remote client receives).
pub fn response(bytes: &[u8]) -> Result<BTreeMap<Value, Value>> {
    let v = archived::from_bytes(bytes).map_err(|e| Error::Closed(format!("a response does not decode: {e}")))?;
    let Value::Map(m) = v else {
        return Err(Error::Closed("a response is not a map".into()));
    };
    if let Some(msg) = m.get(&Value::from("error")) {
        let msg = msg.as_str().unwrap_or("unknown error").to_string();
        let code = match (
            m.get(&Value::from("code")),
            m.get(&Value::from("kind")).and_then(Value::as_str),
        ) {
            (Some(Value::Int(n)), _) => ErrorCode::from_u16(u16::try_from(*n).unwrap_or(0)),
            (_, Some(kind)) => ErrorCode::from_name(kind),
            _ => ErrorCode::Other,
        };
        return Err(Error::from_code(code, msg));
    }
    Ok(m)
}

/// The append result in a response.
pub fn append_result(m: &BTreeMap<Value, Value>) -> Result<AppendResult> {
    let task = u32::try_from(int_field(m, "task")?).map_err(|_| bad("task out of range"))?;
    let offset = match field(m, "offset")? {
        Value::Int(o) => Some(*o as u64),
        _ => None,
    };
    let ack_returns = match m.get(&Value::from("ackReturns")) {
        Some(Value::Map(r)) => r
            .iter()
            .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v.clone()))
            .collect(),
        _ => BTreeMap::new(),
    };
    Ok(AppendResult {
        task,
        offset,
        ack_returns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::pstate::Nav;
    use std::ops::Bound;

    #[test]
    fn paths_round_trip() {
        let path = vec![
            Nav::key("alice"),
            Nav::NilToValue(Value::Int(0)),
            Nav::range(Bound::Included(Value::Int(1)), Bound::Excluded(Value::Int(9))),
            Nav::last(5),
            Nav::All,
            Nav::MapVals,
            Nav::Size,
        ];
        assert_eq!(path_from_value(&path_to_value(&path)).unwrap(), path);
        assert!(path_from_value(&Value::list([Value::list([Value::from("jump")])])).is_err());
    }
}
