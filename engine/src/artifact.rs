//! The `main` of a module artifact: an executable built from a module
//! crate with [`crate::module_main!`].
//!
//! ```text
//! ARTIFACT describe                 JSON descriptions of the modules
//! ARTIFACT version                  the engine version it was built with
//! ARTIFACT run --module NAME --dir DIR [--tasks N] [--threads N]
//!     runs the module on an in-process cluster and serves requests, one
//!     JSON object per line on stdin, one answer per line on stdout:
//!     {"op":"append","depot":"*d","record":R,"ack":"ack"|"appendAck"|"none"}
//!     {"op":"select","pstate":"$$p","path":[...]}
//!     {"op":"invoke","query":"q","args":A}
//!     {"op":"waitMicrobatch","topology":"t","timeoutSecs":N}
//!     answers are {"ok": ...} or {"error": "..."}; end of input stops it.
//! ```
//! Paths in JSON: a step is a key (any JSON value), or one of
//! `{"key": v}`, `{"all": {}}`, `{"mapVals": {}}`, `{"size": {}}`,
//! `{"nilToValue": v}`, `{"range": {"from": v, "to": v, "toInclusive":
//! bool, "reverse": bool, "limit": n}}` (bounds optional; `from` inclusive).

use std::io::{BufRead, Write};
use std::ops::Bound;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value as Json};

use crate::cluster::{AckLevel, InProcessCluster};
use crate::error::{Error, Result};
use crate::module::ModuleDef;
use crate::pstate::Nav;
use crate::value::Value;

/// Turns a crate's `main` into a module artifact for the listed module
/// types (each implementing [`crate::module::Module`]).
#[macro_export]
macro_rules! module_main {
    ($($module:ty),+ $(,)?) => {
        fn main() -> ::std::process::ExitCode {
            $crate::artifact::main(&[$(
                <$module as $crate::module::Module>::define as fn() -> $crate::Result<$crate::module::ModuleDef>
            ),+])
        }
    };
}

const USAGE: &str = "usage: ARTIFACT describe | version | run --module NAME --dir DIR [--tasks N] [--threads N]";

/// The artifact's entry point; exit codes 0 ok, 1 failure, 2 usage.
pub fn main(modules: &[fn() -> Result<ModuleDef>]) -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run_command(modules, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(why)) => {
            eprintln!("{why}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Error(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Error(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

fn run_command(modules: &[fn() -> Result<ModuleDef>], args: &[String]) -> std::result::Result<(), Failure> {
    let defs = modules.iter().map(|m| m()).collect::<Result<Vec<_>>>()?;
    match args.first().map(String::as_str) {
        Some("describe") => {
            let all: Vec<_> = defs.iter().map(ModuleDef::describe).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&all).expect("descriptions serialize")
            );
            Ok(())
        }
        Some("version") => {
            println!("{}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("run") => {
            let mut module = None;
            let mut dir = None;
            let (mut tasks, mut threads) = (8u32, 2u32);
            let mut it = args[1..].iter();
            while let Some(flag) = it.next() {
                let value = it
                    .next()
                    .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))?;
                let number = || {
                    value
                        .parse::<u32>()
                        .map_err(|_| Failure::Usage(format!("{flag} takes a number, got {value:?}")))
                };
                match flag.as_str() {
                    "--module" => module = Some(value.clone()),
                    "--dir" => dir = Some(value.clone()),
                    "--tasks" => tasks = number()?,
                    "--threads" => threads = number()?,
                    _ => return Err(Failure::Usage(format!("unknown flag {flag}"))),
                }
            }
            let module = module.ok_or_else(|| Failure::Usage("run needs --module".into()))?;
            let dir = dir.ok_or_else(|| Failure::Usage("run needs --dir".into()))?;
            let def = defs.into_iter().find(|d| d.name == module).ok_or_else(|| {
                Failure::Error(Error::Schema(format!(
                    "this artifact has no module {module} (it has: {})",
                    modules
                        .iter()
                        .filter_map(|m| m().ok().map(|d| d.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            })?;
            serve(def, &dir, tasks, threads)?;
            Ok(())
        }
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(Failure::Usage(format!("unknown command {other}"))),
        None => Err(Failure::Usage("no command given".into())),
    }
}

fn serve(def: ModuleDef, dir: &str, tasks: u32, threads: u32) -> Result<()> {
    let name = def.name.clone();
    let mut cluster = InProcessCluster::new(dir);
    cluster.launch(def, tasks, threads)?;
    eprintln!("module {name} running with {tasks} tasks on {threads} threads; data in {dir}");
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    // Depot clients are kept, so appends to a random depot spread over tasks.
    let mut depots = std::collections::HashMap::new();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| Error::io("read", "<stdin>", e))?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = match request(&cluster, &mut depots, &name, &line) {
            Ok(v) => json!({ "ok": v }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        writeln!(stdout, "{answer}").map_err(|e| Error::io("write", "<stdout>", e))?;
        stdout.flush().map_err(|e| Error::io("flush", "<stdout>", e))?;
    }
    cluster.shutdown()
}

fn bad(why: impl std::fmt::Display) -> Error {
    Error::Schema(why.to_string())
}

fn string<'j>(req: &'j Json, name: &str) -> Result<&'j str> {
    req.get(name)
        .and_then(Json::as_str)
        .ok_or_else(|| bad(format!("the request needs a string field {name:?}")))
}

/// A value from JSON (objects become maps with string keys).
pub fn value_from_json(j: &Json) -> Result<Value> {
    serde_json::from_value(j.clone()).map_err(|e| bad(format!("not a value: {e}")))
}

/// A value as JSON (maps with non-string keys become lists of pairs).
pub fn value_to_json(v: &Value) -> Json {
    serde_json::to_value(v).unwrap_or_else(|_| Json::String(format!("{v:?}")))
}

/// An ack level by its CLI name.
pub fn ack_level(name: &str) -> Result<AckLevel> {
    match name {
        "ack" => Ok(AckLevel::Ack),
        "appendAck" => Ok(AckLevel::AppendAck),
        "none" => Ok(AckLevel::None),
        other => Err(bad(format!("ack level {other:?} is not one of ack, appendAck, none"))),
    }
}

/// A path from its JSON form (see the module docs).
pub fn path_from_json(j: &Json) -> Result<Vec<Nav>> {
    let steps = j
        .as_array()
        .ok_or_else(|| bad(format!("a path is a JSON array of steps, got {j}")))?;
    steps.iter().map(nav_from_json).collect()
}

fn nav_from_json(step: &Json) -> Result<Nav> {
    let Some(obj) = step.as_object().filter(|o| o.len() == 1) else {
        return Ok(Nav::Key(value_from_json(step)?));
    };
    let (kind, arg) = obj.iter().next().expect("one entry");
    Ok(match kind.as_str() {
        "key" => Nav::Key(value_from_json(arg)?),
        "all" => Nav::All,
        "mapVals" => Nav::MapVals,
        "size" => Nav::Size,
        "nilToValue" => Nav::NilToValue(value_from_json(arg)?),
        "range" => {
            let lower = match arg.get("from") {
                Some(v) => Bound::Included(value_from_json(v)?),
                None => Bound::Unbounded,
            };
            let inclusive = arg.get("toInclusive").and_then(Json::as_bool).unwrap_or(false);
            let upper = match arg.get("to") {
                Some(v) if inclusive => Bound::Included(value_from_json(v)?),
                Some(v) => Bound::Excluded(value_from_json(v)?),
                None => Bound::Unbounded,
            };
            Nav::Range {
                lower,
                upper,
                reverse: arg.get("reverse").and_then(Json::as_bool).unwrap_or(false),
                limit: arg.get("limit").and_then(Json::as_u64).map(|n| n as usize),
            }
        }
        // A one-entry object that is not a step is a map key.
        _ => Nav::Key(value_from_json(step)?),
    })
}

fn request(
    cluster: &InProcessCluster,
    depots: &mut std::collections::HashMap<String, crate::cluster::DepotClient>,
    module: &str,
    line: &str,
) -> Result<Json> {
    let req: Json =
        serde_json::from_str(line).map_err(|e| bad(format!("a request is one JSON object per line: {e}")))?;
    match string(&req, "op")? {
        "append" => {
            let record = value_from_json(req.get("record").ok_or_else(|| bad("append needs \"record\""))?)?;
            let ack = ack_level(req.get("ack").and_then(Json::as_str).unwrap_or("ack"))?;
            let name = string(&req, "depot")?;
            if !depots.contains_key(name) {
                depots.insert(name.to_string(), cluster.depot(module, name)?);
            }
            let r = depots[name].append(&record, ack)?;
            let returns: serde_json::Map<String, Json> = r
                .ack_returns
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect();
            Ok(json!({ "task": r.task, "offset": r.offset, "ackReturns": returns }))
        }
        "select" => {
            let path = path_from_json(req.get("path").ok_or_else(|| bad("select needs \"path\""))?)?;
            let values = cluster.pstate(module, string(&req, "pstate")?)?.select(&path)?;
            Ok(Json::Array(values.iter().map(value_to_json).collect()))
        }
        "invoke" => {
            let args = value_from_json(req.get("args").unwrap_or(&Json::Null))?;
            Ok(value_to_json(
                &cluster.query(module, string(&req, "query")?)?.invoke(&args)?,
            ))
        }
        "waitMicrobatch" => {
            let secs = req.get("timeoutSecs").and_then(Json::as_u64).unwrap_or(60);
            cluster.wait_microbatch(module, string(&req, "topology")?, Duration::from_secs(secs))?;
            Ok(Json::Null)
        }
        other => Err(bad(format!(
            "unknown op {other:?} (ops: append, select, invoke, waitMicrobatch)"
        ))),
    }
}
