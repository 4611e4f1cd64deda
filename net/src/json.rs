//! JSON forms of values, paths and ack levels, as the command line and
//! the artifact's `run` protocol write them.
//!
//! Paths in JSON: a step is a key (any JSON value but an object), or one
//! of `{"key": v}`, `{"all": {}}`, `{"mapVals": {}}`, `{"size": {}}`,
//! `{"nilToValue": v}`, `{"range": {"from": v, "to": v, "toInclusive":
//! bool, "reverse": bool, "limit": n}}` (bounds optional; `from`
//! inclusive). Any other object is refused, naming the steps.

use std::ops::Bound;

use serde_json::Value as Json;

use engine::cluster::AckLevel;
use engine::pstate::Nav;
use engine::value::Value;
use engine::{Error, Result};

/// A schema error saying `why` (bad input from JSON).
pub fn bad(why: impl std::fmt::Display) -> Error {
    Error::Schema(why.to_string())
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

/// The steps a path may hold besides plain keys.
const PATH_STEPS: &str = "key, all, mapVals, size, nilToValue, range";

fn nav_from_json(step: &Json) -> Result<Nav> {
    let Some(obj) = step.as_object() else {
        return Ok(Nav::Key(value_from_json(step)?));
    };
    // An object is a step; a map used as a key is written {"key": {...}}.
    let mut entries = obj.iter();
    let (Some((kind, arg)), None) = (entries.next(), entries.next()) else {
        return Err(bad(format!(
            "path step {step} is not a step: a step is an object with one entry ({PATH_STEPS}); \
             write a map key as {{\"key\": {step}}}"
        )));
    };
    let no_argument = |name: &str| -> Result<()> {
        match arg {
            Json::Object(o) if o.is_empty() => Ok(()),
            Json::Null => Ok(()),
            other => Err(bad(format!(
                "path step {name} takes no argument (write {{\"{name}\":{{}}}}), got {other}"
            ))),
        }
    };
    Ok(match kind.as_str() {
        "key" => Nav::Key(value_from_json(arg)?),
        "all" => {
            no_argument("all")?;
            Nav::All
        }
        "mapVals" => {
            no_argument("mapVals")?;
            Nav::MapVals
        }
        "size" => {
            no_argument("size")?;
            Nav::Size
        }
        "nilToValue" => Nav::NilToValue(value_from_json(arg)?),
        "range" => {
            let fields = arg.as_object().ok_or_else(|| {
                bad(format!(
                    "path step range takes an object of from, to, toInclusive, reverse, limit; got {arg}"
                ))
            })?;
            for (name, v) in fields {
                let fits = match name.as_str() {
                    "from" | "to" => true,
                    "toInclusive" | "reverse" => v.is_boolean(),
                    "limit" => v.as_u64().is_some(),
                    _ => {
                        return Err(bad(format!(
                            "path step range: unknown field {name:?} (known: from, to, toInclusive, reverse, limit)"
                        )))
                    }
                };
                if !fits {
                    let what = if name == "limit" {
                        "a whole number"
                    } else {
                        "true or false"
                    };
                    return Err(bad(format!("path step range: {name} must be {what}, got {v}")));
                }
            }
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
        other => {
            return Err(bad(format!(
                "unknown path step {other:?} (steps: {PATH_STEPS}); write a map key as {{\"key\": {step}}}"
            )))
        }
    })
}
