//! The dynamic, ordered value model shared by depots, PStates and the wire.
//!
//! A [`Value`] is nil, a bool, an `i64`, an `f64`, a string, bytes, a list, a
//! sorted map or a sorted set. Values are totally ordered (see [`Value::cmp`]),
//! which is what lets PStates keep sorted maps and answer range reads.
//!
//! Three encodings live below this module:
//! - [`key`]: an order-preserving byte encoding; comparing encoded bytes gives
//!   the same answer as comparing the values. Used for every stored key.
//! - [`archived`]: the rkyv archived form, read in place without copying. Used
//!   for stored PState values and (later) wire messages.
//! - [`serde`]: conversion to and from user Rust types.

pub mod archived;
pub mod key;
pub mod serde;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use self::serde::{from_value, to_value};

/// The deepest nesting of lists, maps and sets that any decoder accepts:
/// stored keys, archives (storage and the network) and, through the same
/// figure in `control`, JSON and YAML input. Checked before recursing, so
/// hostile input cannot overflow a stack.
pub const DEPTH_MAX: usize = 128;

/// A dynamic value.
///
/// Order: values of different kinds order by kind, in declaration order
/// (`Nil < Bool < Int < Float < Str < Bytes < List < Map < Set`); values of
/// one kind order naturally. Floats order by [`f64::total_cmp`], so `NaN` is a
/// value like any other and `-0.0 < 0.0`; equality agrees with that order.
#[derive(Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(serialize_bounds(
    __S: rkyv::ser::Writer + rkyv::ser::Allocator,
    __S::Error: rkyv::rancor::Source,
))]
#[rkyv(deserialize_bounds(__D::Error: rkyv::rancor::Source))]
#[rkyv(bytecheck(bounds(__C: rkyv::validation::ArchiveContext)))]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(#[rkyv(omit_bounds)] Vec<Value>),
    Map(
        #[rkyv(omit_bounds)]
        #[rkyv(with = rkyv::with::AsVec)]
        BTreeMap<Value, Value>,
    ),
    Set(
        #[rkyv(omit_bounds)]
        #[rkyv(with = rkyv::with::AsVec)]
        BTreeSet<Value>,
    ),
}

/// The kind of a value, in value order. Used in error messages and schemas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ::serde::Serialize, ::serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Nil,
    Bool,
    Int,
    Float,
    #[serde(rename = "string")]
    Str,
    Bytes,
    List,
    Map,
    Set,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Kind::Nil => "nil",
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Str => "string",
            Kind::Bytes => "bytes",
            Kind::List => "list",
            Kind::Map => "map",
            Kind::Set => "set",
        };
        f.write_str(name)
    }
}

impl Value {
    /// Returns the kind of this value.
    pub fn kind(&self) -> Kind {
        match self {
            Value::Nil => Kind::Nil,
            Value::Bool(_) => Kind::Bool,
            Value::Int(_) => Kind::Int,
            Value::Float(_) => Kind::Float,
            Value::Str(_) => Kind::Str,
            Value::Bytes(_) => Kind::Bytes,
            Value::List(_) => Kind::List,
            Value::Map(_) => Kind::Map,
            Value::Set(_) => Kind::Set,
        }
    }

    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&BTreeMap<Value, Value>> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// Builds a map from key/value pairs (later duplicates win).
    pub fn map<K: Into<Value>, V: Into<Value>>(pairs: impl IntoIterator<Item = (K, V)>) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    /// Builds a set from elements.
    pub fn set<T: Into<Value>>(items: impl IntoIterator<Item = T>) -> Value {
        Value::Set(items.into_iter().map(Into::into).collect())
    }

    /// Builds a list from elements.
    pub fn list<T: Into<Value>>(items: impl IntoIterator<Item = T>) -> Value {
        Value::List(items.into_iter().map(Into::into).collect())
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Nil, Value::Nil) => Ordering::Equal,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Str(a), Value::Str(b)) => a.cmp(b),
            (Value::Bytes(a), Value::Bytes(b)) => a.cmp(b),
            (Value::List(a), Value::List(b)) => a.cmp(b),
            (Value::Map(a), Value::Map(b)) => a.cmp(b),
            (Value::Set(a), Value::Set(b)) => a.cmp(b),
            (a, b) => a.kind().cmp(&b.kind()),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Nil => f.write_str("nil"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => {
                f.write_str("#bytes[")?;
                for byte in b {
                    write!(f, "{byte:02x}")?;
                }
                f.write_str("]")
            }
            Value::List(l) => f.debug_list().entries(l).finish(),
            Value::Map(m) => f.debug_map().entries(m).finish(),
            Value::Set(s) => {
                f.write_str("#")?;
                f.debug_set().entries(s).finish()
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}
impl From<()> for Value {
    fn from((): ()) -> Self {
        Value::Nil
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Nil, Into::into)
    }
}

#[cfg(test)]
pub(crate) mod strategy {
    //! proptest strategies for values, shared by the encodings' tests.
    use super::Value;
    use proptest::prelude::*;

    pub fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            prop_oneof![
                any::<f64>(),
                Just(0.0),
                Just(-0.0),
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY)
            ]
            .prop_map(Value::Float),
            ".{0,6}".prop_map(Value::Str),
            // Bytes with many zeros exercise the escape in the key encoding.
            proptest::collection::vec(prop_oneof![Just(0u8), Just(0xff), any::<u8>()], 0..6).prop_map(Value::Bytes),
        ]
    }

    pub fn value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
                proptest::collection::btree_map(inner.clone(), inner.clone(), 0..4).prop_map(Value::Map),
                proptest::collection::btree_set(inner, 0..4).prop_map(Value::Set),
            ]
        })
    }
}
