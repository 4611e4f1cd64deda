//! Paths: how PState reads and writes navigate into values.
//!
//! A path is a list of navigators applied from the top of the PState (a map
//! from top-level keys). `select` collects every value a path reaches;
//! `transform` changes them. Navigators:
//!
//! - [`Nav::Key`]: the value under a map key (nil if absent), a set element
//!   (itself if present, else nil) or a list index;
//! - [`Nav::Range`]: the sub-map or sub-set within sorted bounds, optionally
//!   from the top (`reverse`) and capped (`limit`);
//! - [`Nav::All`]: every element (map entries as `[key, value]` lists);
//! - [`Nav::MapVals`]: every value of a map;
//! - [`Nav::NilToValue`]: continue with a default when the value is nil;
//! - [`Nav::Size`]: the number of elements (read only).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Bound;
use std::rc::Rc;

use super::schema::ValueSchema;
use crate::error::{Error, Result};
use crate::value::Value;

/// One step of a path.
#[derive(Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Nav {
    Key(Value),
    Range {
        lower: Bound<Value>,
        upper: Bound<Value>,
        reverse: bool,
        limit: Option<usize>,
    },
    All,
    MapVals,
    NilToValue(Value),
    Size,
}

impl Nav {
    pub fn key(k: impl Into<Value>) -> Nav {
        Nav::Key(k.into())
    }

    /// A range with bounds, ascending, without a limit.
    pub fn range(lower: Bound<Value>, upper: Bound<Value>) -> Nav {
        Nav::Range {
            lower,
            upper,
            reverse: false,
            limit: None,
        }
    }

    /// The greatest `limit` elements in bounds (e.g. the newest entries).
    pub fn last(limit: usize) -> Nav {
        Nav::Range {
            lower: Bound::Unbounded,
            upper: Bound::Unbounded,
            reverse: true,
            limit: Some(limit),
        }
    }
}

impl fmt::Debug for Nav {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Nav::Key(k) => write!(f, "key({k})"),
            Nav::Range {
                lower,
                upper,
                reverse,
                limit,
            } => write!(f, "range({lower:?}, {upper:?}, reverse={reverse}, limit={limit:?})"),
            Nav::All => f.write_str("all"),
            Nav::MapVals => f.write_str("mapVals"),
            Nav::NilToValue(v) => write!(f, "nilToValue({v})"),
            Nav::Size => f.write_str("size"),
        }
    }
}

/// A path: navigators applied in order.
pub type Path = Vec<Nav>;

/// What a transform does at the end of its path.
#[derive(Clone)]
pub enum Op {
    /// Replace the value.
    Set(Value),
    /// Replace the value with a function of it (nil when absent).
    Update(Rc<dyn Fn(Value) -> Value>),
    /// Remove the value from its parent.
    Remove,
}

impl Op {
    pub fn update(f: impl Fn(Value) -> Value + 'static) -> Op {
        Op::Update(Rc::new(f))
    }

    /// Applies the op to a value that is present (or nil); `None` removes.
    pub(crate) fn apply(&self, current: Value) -> Option<Value> {
        match self {
            Op::Set(v) => Some(v.clone()),
            Op::Update(f) => Some(f(current)),
            Op::Remove => None,
        }
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Set(v) => write!(f, "set({v})"),
            Op::Update(_) => f.write_str("update(fn)"),
            Op::Remove => f.write_str("remove"),
        }
    }
}

fn path_error(navs: &[Nav], at: usize, why: impl fmt::Display) -> Error {
    Error::Schema(format!("path {:?} does not fit at step {}: {why}", navs, at + 1))
}

/// Checks a path against a schema and returns the schema at its end.
pub(crate) fn check_path<'s>(
    schema: &'s ValueSchema,
    navs: &[Nav],
    base: usize,
    full: &[Nav],
) -> Result<&'s ValueSchema> {
    static ANY: ValueSchema = ValueSchema::Any;
    let mut s = schema;
    for (i, nav) in navs.iter().enumerate() {
        let at = base + i;
        s = match (nav, s) {
            (_, ValueSchema::Any) => &ANY,
            (Nav::NilToValue(v), s) => {
                s.check(v, &format_args!("nilToValue at step {}", at + 1))?;
                s
            }
            (Nav::Key(k), ValueSchema::Map { key, value, .. }) => {
                key.check(k, &format_args!("key at step {}", at + 1))?;
                value
            }
            (Nav::Key(k), ValueSchema::Set { element, .. }) => {
                element.check(k, &format_args!("element at step {}", at + 1))?;
                element
            }
            (Nav::Key(Value::Int(_)), ValueSchema::List { element }) => element,
            (Nav::Range { .. }, s @ (ValueSchema::Map { .. } | ValueSchema::Set { .. })) => s,
            (Nav::All, ValueSchema::Map { .. }) => &ANY,
            (Nav::All, ValueSchema::Set { element, .. } | ValueSchema::List { element }) => element,
            (Nav::MapVals, ValueSchema::Map { value, .. }) => value,
            (Nav::Size, ValueSchema::Map { .. } | ValueSchema::Set { .. } | ValueSchema::List { .. }) => {
                static INT: ValueSchema = ValueSchema::Scalar(crate::value::Kind::Int);
                &INT
            }
            (nav, s) => return Err(path_error(full, at, format_args!("{nav:?} cannot navigate into {s}"))),
        };
    }
    Ok(s)
}

fn in_range(v: &Value, lower: &Bound<Value>, upper: &Bound<Value>) -> bool {
    (match lower {
        Bound::Unbounded => true,
        Bound::Included(l) => v >= l,
        Bound::Excluded(l) => v > l,
    }) && (match upper {
        Bound::Unbounded => true,
        Bound::Included(u) => v <= u,
        Bound::Excluded(u) => v < u,
    })
}

/// The keys of a sorted collection selected by a range navigator.
fn range_keys<'a>(
    keys: impl DoubleEndedIterator<Item = &'a Value>,
    lower: &Bound<Value>,
    upper: &Bound<Value>,
    reverse: bool,
    limit: Option<usize>,
) -> Vec<Value> {
    let limit = limit.unwrap_or(usize::MAX);
    let filtered = |k: &&Value| in_range(k, lower, upper);
    if reverse {
        keys.rev().filter(filtered).take(limit).cloned().collect()
    } else {
        keys.filter(filtered).take(limit).cloned().collect()
    }
}

/// Splits a map or set into what is outside the range and the range
/// itself, both of the collection's kind.
fn split_range(
    collection: Value,
    lower: &Bound<Value>,
    upper: &Bound<Value>,
    reverse: bool,
    limit: Option<usize>,
) -> (Value, Value) {
    match collection {
        Value::Map(mut m) => {
            let sub: BTreeMap<Value, Value> = range_keys(m.keys(), lower, upper, reverse, limit)
                .into_iter()
                .map(|k| {
                    let v = m.remove(&k).expect("key was just listed");
                    (k, v)
                })
                .collect();
            (Value::Map(m), Value::Map(sub))
        }
        Value::Set(mut s) => {
            let sub: BTreeSet<Value> = range_keys(s.iter(), lower, upper, reverse, limit)
                .into_iter()
                .inspect(|k| {
                    s.remove(k);
                })
                .collect();
            (Value::Set(s), Value::Set(sub))
        }
        other => (other, Value::Nil),
    }
}

/// Collects every value `navs` reaches from `value`.
pub(crate) fn select(value: Value, navs: &[Nav], full: &[Nav], base: usize, out: &mut Vec<Value>) -> Result<()> {
    let Some((nav, rest)) = navs.split_first() else {
        out.push(value);
        return Ok(());
    };
    let at = base;
    let next = base + 1;
    match (nav, value) {
        (Nav::NilToValue(d), Value::Nil) => select(d.clone(), rest, full, next, out),
        (Nav::NilToValue(_), v) => select(v, rest, full, next, out),
        (Nav::Key(_), Value::Nil) => select(Value::Nil, rest, full, next, out),
        (Nav::Key(k), Value::Map(mut m)) => select(m.remove(k).unwrap_or(Value::Nil), rest, full, next, out),
        (Nav::Key(k), Value::Set(s)) => {
            let v = if s.contains(k) { k.clone() } else { Value::Nil };
            select(v, rest, full, next, out)
        }
        (Nav::Key(Value::Int(i)), Value::List(mut l)) => {
            let v = usize::try_from(*i)
                .ok()
                .filter(|&i| i < l.len())
                .map_or(Value::Nil, |i| l.swap_remove(i));
            select(v, rest, full, next, out)
        }
        (Nav::Range { .. } | Nav::All | Nav::MapVals, Value::Nil) => Ok(()),
        (
            Nav::Range {
                lower,
                upper,
                reverse,
                limit,
            },
            collection @ (Value::Map(_) | Value::Set(_)),
        ) => {
            let (_, sub) = split_range(collection, lower, upper, *reverse, *limit);
            select(sub, rest, full, next, out)
        }
        (Nav::All, Value::Map(m)) => m
            .into_iter()
            .try_for_each(|(k, v)| select(Value::List(vec![k, v]), rest, full, next, out)),
        (Nav::All, Value::Set(s)) => s.into_iter().try_for_each(|e| select(e, rest, full, next, out)),
        (Nav::All, Value::List(l)) => l.into_iter().try_for_each(|e| select(e, rest, full, next, out)),
        (Nav::MapVals, Value::Map(m)) => m.into_values().try_for_each(|v| select(v, rest, full, next, out)),
        (Nav::Size, v) => {
            let n = match v {
                Value::Nil => 0,
                Value::Map(m) => m.len(),
                Value::Set(s) => s.len(),
                Value::List(l) => l.len(),
                other => return Err(path_error(full, at, format_args!("size of a {}", other.kind()))),
            };
            select(Value::Int(n as i64), rest, full, next, out)
        }
        (nav, v) => Err(path_error(
            full,
            at,
            format_args!("{nav:?} cannot navigate into a {}", v.kind()),
        )),
    }
}

/// Applies `op` at every place `navs` reaches in `value`. Returns the new
/// value, or `None` when the value itself is removed.
pub(crate) fn transform(
    value: Value,
    navs: &[Nav],
    op: &Op,
    full: &[Nav],
    base: usize,
    schema: &ValueSchema,
) -> Result<Option<Value>> {
    let Some((nav, rest)) = navs.split_first() else {
        return Ok(op.apply(value));
    };
    let at = base;
    let next = base + 1;
    let inner = child_schema(schema, nav);
    // Writing under a missing value creates the container the schema asks
    // for (a map where the schema says nothing).
    let value = match (nav, value) {
        (Nav::Key(_), Value::Nil) => empty_container(schema),
        (_, v) => v,
    };
    Ok(Some(match (nav, value) {
        (Nav::NilToValue(d), Value::Nil) => return transform(d.clone(), rest, op, full, next, inner),
        (Nav::NilToValue(_), v) => return transform(v, rest, op, full, next, inner),
        (Nav::Key(k), Value::Map(mut m)) => {
            let child = m.remove(k).unwrap_or(Value::Nil);
            if let Some(v) = transform(child, rest, op, full, next, inner)? {
                m.insert(k.clone(), v);
            }
            Value::Map(m)
        }
        (Nav::Key(k), Value::Set(mut s)) => {
            let child = if s.remove(k) { k.clone() } else { Value::Nil };
            match transform(child, rest, op, full, next, inner)? {
                Some(Value::Nil) | None => {}
                Some(v) => {
                    s.insert(v);
                }
            }
            Value::Set(s)
        }
        (Nav::Key(Value::Int(i)), Value::List(mut l)) => {
            let idx = usize::try_from(*i).ok().filter(|&i| i < l.len()).ok_or_else(|| {
                path_error(
                    full,
                    at,
                    format_args!("list index {i} out of bounds (length {})", l.len()),
                )
            })?;
            let child = std::mem::replace(&mut l[idx], Value::Nil);
            match transform(child, rest, op, full, next, inner)? {
                Some(v) => l[idx] = v,
                None => {
                    l.remove(idx);
                }
            }
            Value::List(l)
        }
        (Nav::Range { .. } | Nav::All | Nav::MapVals, Value::Nil) => Value::Nil,
        (
            Nav::Range {
                lower,
                upper,
                reverse,
                limit,
            },
            collection @ (Value::Map(_) | Value::Set(_)),
        ) => {
            // The range comes out as a sub-collection, is transformed as a
            // whole, and what comes back goes in again.
            let kind = collection.kind();
            let (rest_of, sub) = split_range(collection, lower, upper, *reverse, *limit);
            let new = transform(sub, rest, op, full, next, inner)?;
            match (rest_of, new) {
                (kept, None | Some(Value::Nil)) => kept,
                (Value::Map(mut m), Some(Value::Map(new))) => {
                    m.extend(new);
                    Value::Map(m)
                }
                (Value::Set(mut s), Some(Value::Set(new))) => {
                    s.extend(new);
                    Value::Set(s)
                }
                (_, Some(other)) => {
                    return Err(path_error(
                        full,
                        at,
                        format_args!("a range of a {kind} was replaced by a {}", other.kind()),
                    ))
                }
            }
        }
        (Nav::All, Value::Map(m)) => {
            let mut out = BTreeMap::new();
            for (k, v) in m {
                match transform(Value::List(vec![k, v]), rest, op, full, next, inner)? {
                    None => {}
                    Some(Value::List(pair)) if pair.len() == 2 => {
                        let mut pair = pair.into_iter();
                        let (k, v) = (pair.next().expect("2 items"), pair.next().expect("2 items"));
                        out.insert(k, v);
                    }
                    Some(other) => {
                        return Err(path_error(
                            full,
                            at,
                            format_args!("a map entry must stay a [key, value] list, got {other}"),
                        ))
                    }
                }
            }
            Value::Map(out)
        }
        (Nav::All, Value::Set(s)) => {
            let mut out = BTreeSet::new();
            for e in s {
                if let Some(v) = transform(e, rest, op, full, next, inner)? {
                    out.insert(v);
                }
            }
            Value::Set(out)
        }
        (Nav::All, Value::List(l)) => {
            let mut out = Vec::with_capacity(l.len());
            for e in l {
                if let Some(v) = transform(e, rest, op, full, next, inner)? {
                    out.push(v);
                }
            }
            Value::List(out)
        }
        (Nav::MapVals, Value::Map(m)) => {
            let mut out = BTreeMap::new();
            for (k, v) in m {
                if let Some(v) = transform(v, rest, op, full, next, inner)? {
                    out.insert(k, v);
                }
            }
            Value::Map(out)
        }
        (Nav::Size, _) => return Err(path_error(full, at, "size is read only")),
        (nav, v) => {
            return Err(path_error(
                full,
                at,
                format_args!("{nav:?} cannot navigate into a {}", v.kind()),
            ))
        }
    }))
}

/// The schema one navigation step below `schema`.
fn child_schema<'s>(schema: &'s ValueSchema, nav: &Nav) -> &'s ValueSchema {
    static ANY: ValueSchema = ValueSchema::Any;
    match (schema, nav) {
        (ValueSchema::Map { value, .. }, Nav::Key(_) | Nav::MapVals) => value,
        (ValueSchema::Set { element, .. } | ValueSchema::List { element }, Nav::Key(_) | Nav::All) => element,
        (s, Nav::Range { .. } | Nav::NilToValue(_)) => s,
        _ => &ANY,
    }
}

/// The empty value of a collection schema: a map unless it says set or list.
fn empty_container(schema: &ValueSchema) -> Value {
    match schema {
        ValueSchema::Set { .. } => Value::Set(BTreeSet::new()),
        ValueSchema::List { .. } => Value::List(Vec::new()),
        _ => Value::Map(BTreeMap::new()),
    }
}
