//! The module API on the wire: a client sends a [`ClientRequest`] of the
//! message vocabulary (`engine::wire`) in a transport frame, the worker
//! reads it in place and answers with a [`wire::Answer`].
//!
//! ```text
//! Append {module, depot, record, ack}       -> Appended {task, offset, ackReturns}
//! Read {module, depot, task, start, end, bytesMax} -> Records [(offset, record)]
//! Select {module, pstate, path, task?}      -> Selected (values, or one stored value as stored)
//! Invoke {module, query, args}              -> Value
//! Tasks {module}                            -> Tasks [task]
//! errors: WireError {code: the stable ErrorCode number, message, size, max}
//! ```
//! A record and query arguments are archived `Value`s the client made; the
//! worker checks them and passes the bytes on (a record reaches the log as
//! the client encoded it).

use std::future::Future;
use std::pin::Pin;

use engine::cluster::{AppendResult, InProcessCluster};
use engine::value::archived;
use engine::wire::{self as vocab, ArchivedClientRequest, Payload, Selected};
pub use engine::wire::{ClientRequest, WireError};
use engine::{Error, ErrorCode, Result};

fn bad(why: impl std::fmt::Display) -> Error {
    Error::Schema(why.to_string())
}

/// Serves one request against the modules of `cluster` (blocking).
pub fn handle(cluster: &InProcessCluster, request: &[u8]) -> Vec<u8> {
    smol::block_on(handle_future(cluster, request))
}

type Pending = Pin<Box<dyn Future<Output = Result<Payload>> + Send>>;

fn access(request: &[u8]) -> Result<&ArchivedClientRequest> {
    archived::access_as::<ArchivedClientRequest>(request)
        .map_err(|e| bad(format!("the request is not a valid ClientRequest: {e}")))
}

/// A future serving one request; it never blocks the thread it runs on.
pub fn handle_future(cluster: &InProcessCluster, request: &[u8]) -> impl Future<Output = Vec<u8>> + Send + 'static {
    let started = access(request).and_then(|req| dispatch(cluster, req));
    async move {
        vocab::encode_client_answer(match started {
            Ok(f) => f.await,
            Err(e) => Err(e),
        })
    }
}

/// The handler of a client connection served by a task thread: every
/// request is started at once (sent to its task's thread, which may be
/// this one) and answered by the future it leaves, which never blocks the
/// thread. Requests that arrive after `cluster` is gone are refused.
pub fn task_thread_handler(cluster: std::sync::Weak<InProcessCluster>) -> engine::cluster::connection::Handler {
    std::sync::Arc::new(move |request: Vec<u8>, respond: crate::transport::Respond| {
        let Some(cluster) = cluster.upgrade() else {
            respond(Ok(vocab::encode_client_answer(Err(Error::Closed(
                "the worker is stopping".into(),
            )))));
            return None;
        };
        let answer = handle_future(&cluster, &request);
        Some(Box::pin(async move { respond(Ok(answer.await)) }) as crate::transport::Later)
    })
}

/// The depot, record bytes and ack level of an append request.
fn append_parts(
    cluster: &InProcessCluster,
    req: &ArchivedClientRequest,
) -> Result<(engine::cluster::DepotClient, Vec<u8>, engine::cluster::AckLevel)> {
    let (module, depot, record, ack) = vocab::append_parts(req)
        .ok_or_else(|| bad("not an append"))?
        .map_err(bad)?;
    Ok((cluster.depot(module, depot)?, record.to_vec(), ack))
}

/// The PState, task (if given) and path of a select request.
fn select_parts(
    cluster: &InProcessCluster,
    req: &ArchivedClientRequest,
) -> Result<(engine::cluster::PStateClient, Option<u32>, Vec<engine::pstate::Nav>)> {
    let (module, pstate, task, path) = vocab::select_parts(req)
        .ok_or_else(|| bad("not a select"))?
        .map_err(bad)?;
    Ok((cluster.pstate(module, pstate)?, task, path))
}

fn dispatch(cluster: &InProcessCluster, req: &ArchivedClientRequest) -> Result<Pending> {
    Ok(match req {
        ArchivedClientRequest::Append { .. } => {
            let (depot, record, ack) = append_parts(cluster, req)?;
            let pending = depot.append_archived_future(record, ack)?;
            Box::pin(async move { pending.await.map(Payload::Appended) })
        }
        ArchivedClientRequest::Read {
            module,
            depot,
            task,
            start,
            end,
            bytes_max,
        } => {
            let pending = cluster.depot(module, depot)?.read_archived_future(
                task.to_native(),
                start.to_native(),
                end.to_native(),
                usize::try_from(bytes_max.to_native()).unwrap_or(usize::MAX),
            );
            Box::pin(async move { pending.await.map(Payload::Records) })
        }
        ArchivedClientRequest::Select { .. } => {
            let (client, task, path) = select_parts(cluster, req)?;
            let pending = client.select_future(task, path);
            Box::pin(async move { Ok(Payload::Selected(Selected::Values(pending.await?))) })
        }
        ArchivedClientRequest::Invoke { module, query, args } => {
            let pending = cluster
                .query(module, query)?
                .invoke_archived_future(args.as_slice().to_vec());
            Box::pin(async move { pending.await.map(Payload::Value) })
        }
        ArchivedClientRequest::Tasks { module } => {
            let local = cluster.local_tasks(module)?;
            Box::pin(async move { Ok(Payload::Tasks(local)) })
        }
    })
}

/// The payload of an answer a remote client received (its error as the
/// client sees it).
pub fn response(bytes: &[u8]) -> Result<Payload> {
    vocab::decode_answer(bytes)
        .map_err(|e| Error::Closed(format!("an answer does not decode: {e}")))?
        .map_err(WireError::into_error)
}

fn unexpected<T>(what: &str, p: &Payload) -> Result<T> {
    Err(Error::from_code(
        ErrorCode::Other,
        format!("the worker answered a {what} with {:?}", std::mem::discriminant(p)),
    ))
}

/// The append result in an answer.
pub fn append_result(p: Payload) -> Result<AppendResult> {
    match p {
        Payload::Appended(r) => Ok(r),
        p => unexpected("append", &p),
    }
}

/// The values in an answer to a select.
pub fn selected(p: Payload) -> Result<Vec<engine::value::Value>> {
    match p {
        Payload::Selected(s) => s.into_values(),
        p => unexpected("select", &p),
    }
}

/// The records in an answer to a read, decoded and checked.
pub fn records(p: Payload) -> Result<Vec<(u64, engine::value::Value)>> {
    match p {
        Payload::Records(r) => r
            .into_iter()
            .map(|(o, bytes)| {
                archived::from_bytes(&bytes)
                    .map(|v| (o, v))
                    .map_err(|e| Error::Closed(format!("record {o} in a read answer does not decode: {e}")))
            })
            .collect(),
        p => unexpected("read", &p),
    }
}

/// The result in an answer to an invoke.
pub fn value(p: Payload) -> Result<engine::value::Value> {
    match p {
        Payload::Value(v) => Ok(v),
        p => unexpected("invoke", &p),
    }
}
