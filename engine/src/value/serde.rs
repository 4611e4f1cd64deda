//! Conversion between [`Value`] and user Rust types through serde.
//!
//! - [`to_value`] serializes any `T: Serialize` into a [`Value`].
//! - [`from_value`] deserializes any `T: DeserializeOwned` from a [`Value`];
//!   `Value` itself is the [`Deserializer`](::serde::Deserializer).
//! - `Value` implements [`Serialize`] and
//!   [`Deserialize`](::serde::Deserialize), so it can go through any serde
//!   format (JSON, ...).
//!
//! Mapping from the serde data model:
//!
//! | serde                               | `Value`                          |
//! |-------------------------------------|----------------------------------|
//! | bool                                | `Bool`                           |
//! | i8..i128, u8..u128                  | `Int` (error if outside `i64`)   |
//! | f32, f64                            | `Float`                          |
//! | char, str                           | `Str`                            |
//! | bytes                               | `Bytes`                          |
//! | unit, `None`, unit struct           | `Nil`                            |
//! | `Some(x)`, newtype struct           | `x`                              |
//! | seq, tuple, tuple struct            | `List`                           |
//! | map                                 | `Map`                            |
//! | struct                              | `Map` with `Str` field names     |
//! | unit variant                        | `Str(variant)`                   |
//! | newtype/tuple/struct variant        | `Map { Str(variant): inner }`    |
//!
//! A `Set` deserializes as a sequence; serializing a `Value` through serde
//! writes a `Set` as a sequence too, so it comes back as a `List`.

use std::collections::{btree_map, BTreeMap};
use std::fmt;

use ::serde::de::{self, DeserializeSeed, IntoDeserializer, Unexpected, Visitor};
use ::serde::ser::{self, Serialize};

use super::Value;

/// An error converting between a [`Value`] and a Rust type.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A message from serde or from a type's own (de)serialization code.
    #[error("{0}")]
    Message(String),
    /// An integer that does not fit in the `i64` of [`Value::Int`].
    #[error("integer {value} does not fit in a 64-bit signed integer")]
    IntegerOverflow {
        /// The integer, in decimal.
        value: String,
    },
}

impl ser::Error for ConvertError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ConvertError::Message(msg.to_string())
    }
}

impl de::Error for ConvertError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ConvertError::Message(msg.to_string())
    }
}

/// Serializes `v` into a [`Value`].
///
/// Fails with [`ConvertError::IntegerOverflow`] on an integer outside `i64`,
/// or with [`ConvertError::Message`] if `v`'s `Serialize` impl fails.
pub fn to_value<T: ::serde::Serialize + ?Sized>(v: &T) -> Result<Value, ConvertError> {
    v.serialize(ValueSerializer)
}

/// Deserializes a `T` from `v`, consuming it.
pub fn from_value<T: ::serde::de::DeserializeOwned>(v: Value) -> Result<T, ConvertError> {
    T::deserialize(v)
}

// ---------------------------------------------------------------------------
// Serializer: Rust -> Value
// ---------------------------------------------------------------------------

/// The serializer behind [`to_value`]; every method produces a [`Value`].
#[derive(Debug, Clone, Copy)]
struct ValueSerializer;

/// Converts an integer of any width into `Value::Int`, if it fits.
fn int<N>(n: N) -> Result<Value, ConvertError>
where
    N: Copy + fmt::Display,
    i64: TryFrom<N>,
{
    i64::try_from(n)
        .map(Value::Int)
        .map_err(|_| ConvertError::IntegerOverflow { value: n.to_string() })
}

/// The one-entry map `{Str(variant): inner}` used for non-unit variants.
fn variant_map(variant: &str, inner: Value) -> Value {
    Value::Map(BTreeMap::from([(Value::Str(variant.to_owned()), inner)]))
}

impl ::serde::Serializer for ValueSerializer {
    type Ok = Value;
    type Error = ConvertError;

    type SerializeSeq = ListSerializer;
    type SerializeTuple = ListSerializer;
    type SerializeTupleStruct = ListSerializer;
    type SerializeTupleVariant = TupleVariantSerializer;
    type SerializeMap = MapSerializer;
    type SerializeStruct = StructSerializer;
    type SerializeStructVariant = StructVariantSerializer;

    fn serialize_bool(self, v: bool) -> Result<Value, ConvertError> {
        Ok(Value::Bool(v))
    }

    fn serialize_i8(self, v: i8) -> Result<Value, ConvertError> {
        Ok(Value::Int(i64::from(v)))
    }

    fn serialize_i16(self, v: i16) -> Result<Value, ConvertError> {
        Ok(Value::Int(i64::from(v)))
    }

    fn serialize_i32(self, v: i32) -> Result<Value, ConvertError> {
        Ok(Value::Int(i64::from(v)))
    }

    fn serialize_i64(self, v: i64) -> Result<Value, ConvertError> {
        Ok(Value::Int(v))
    }

    fn serialize_i128(self, v: i128) -> Result<Value, ConvertError> {
        int(v)
    }

    fn serialize_u8(self, v: u8) -> Result<Value, ConvertError> {
        Ok(Value::Int(i64::from(v)))
    }

    fn serialize_u16(self, v: u16) -> Result<Value, ConvertError> {
        Ok(Value::Int(i64::from(v)))
    }

    fn serialize_u32(self, v: u32) -> Result<Value, ConvertError> {
        Ok(Value::Int(i64::from(v)))
    }

    fn serialize_u64(self, v: u64) -> Result<Value, ConvertError> {
        int(v)
    }

    fn serialize_u128(self, v: u128) -> Result<Value, ConvertError> {
        int(v)
    }

    fn serialize_f32(self, v: f32) -> Result<Value, ConvertError> {
        Ok(Value::Float(f64::from(v)))
    }

    fn serialize_f64(self, v: f64) -> Result<Value, ConvertError> {
        Ok(Value::Float(v))
    }

    fn serialize_char(self, v: char) -> Result<Value, ConvertError> {
        Ok(Value::Str(v.to_string()))
    }

    fn serialize_str(self, v: &str) -> Result<Value, ConvertError> {
        Ok(Value::Str(v.to_owned()))
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ConvertError> {
        Ok(Value::Bytes(v.to_vec()))
    }

    fn serialize_none(self) -> Result<Value, ConvertError> {
        Ok(Value::Nil)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ConvertError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<Value, ConvertError> {
        Ok(Value::Nil)
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, ConvertError> {
        Ok(Value::Nil)
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, ConvertError> {
        Ok(Value::Str(variant.to_owned()))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Value, ConvertError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, ConvertError> {
        Ok(variant_map(variant, value.serialize(self)?))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<ListSerializer, ConvertError> {
        Ok(ListSerializer {
            items: Vec::with_capacity(len.unwrap_or(0)),
        })
    }

    fn serialize_tuple(self, len: usize) -> Result<ListSerializer, ConvertError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<ListSerializer, ConvertError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<TupleVariantSerializer, ConvertError> {
        Ok(TupleVariantSerializer {
            variant,
            items: Vec::with_capacity(len),
        })
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<MapSerializer, ConvertError> {
        Ok(MapSerializer {
            map: BTreeMap::new(),
            next_key: None,
        })
    }

    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<StructSerializer, ConvertError> {
        Ok(StructSerializer { map: BTreeMap::new() })
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<StructVariantSerializer, ConvertError> {
        Ok(StructVariantSerializer {
            variant,
            map: BTreeMap::new(),
        })
    }
}

/// Collects a seq, tuple or tuple struct into a `List`.
#[derive(Debug)]
struct ListSerializer {
    items: Vec<Value>,
}

impl ser::SerializeSeq for ListSerializer {
    type Ok = Value;
    type Error = ConvertError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ConvertError> {
        self.items.push(to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, ConvertError> {
        Ok(Value::List(self.items))
    }
}

impl ser::SerializeTuple for ListSerializer {
    type Ok = Value;
    type Error = ConvertError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ConvertError> {
        ser::SerializeSeq::serialize_element(self, value)
    }

    fn end(self) -> Result<Value, ConvertError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for ListSerializer {
    type Ok = Value;
    type Error = ConvertError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ConvertError> {
        ser::SerializeSeq::serialize_element(self, value)
    }

    fn end(self) -> Result<Value, ConvertError> {
        ser::SerializeSeq::end(self)
    }
}

/// Collects a tuple variant into `{Str(variant): List}`.
#[derive(Debug)]
struct TupleVariantSerializer {
    variant: &'static str,
    items: Vec<Value>,
}

impl ser::SerializeTupleVariant for TupleVariantSerializer {
    type Ok = Value;
    type Error = ConvertError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ConvertError> {
        self.items.push(to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, ConvertError> {
        Ok(variant_map(self.variant, Value::List(self.items)))
    }
}

/// Collects a map into a `Map`; keys may be any value. Later duplicates win.
#[derive(Debug)]
struct MapSerializer {
    map: BTreeMap<Value, Value>,
    next_key: Option<Value>,
}

impl ser::SerializeMap for MapSerializer {
    type Ok = Value;
    type Error = ConvertError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ConvertError> {
        self.next_key = Some(to_value(key)?);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ConvertError> {
        let key = self
            .next_key
            .take()
            .ok_or_else(|| ConvertError::Message("map value serialized before its key".to_owned()))?;
        self.map.insert(key, to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, ConvertError> {
        Ok(Value::Map(self.map))
    }
}

/// Collects a struct into a `Map` keyed by `Str` field names.
#[derive(Debug)]
struct StructSerializer {
    map: BTreeMap<Value, Value>,
}

impl ser::SerializeStruct for StructSerializer {
    type Ok = Value;
    type Error = ConvertError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), ConvertError> {
        self.map.insert(Value::Str(key.to_owned()), to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, ConvertError> {
        Ok(Value::Map(self.map))
    }
}

/// Collects a struct variant into `{Str(variant): Map}`.
#[derive(Debug)]
struct StructVariantSerializer {
    variant: &'static str,
    map: BTreeMap<Value, Value>,
}

impl ser::SerializeStructVariant for StructVariantSerializer {
    type Ok = Value;
    type Error = ConvertError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), ConvertError> {
        self.map.insert(Value::Str(key.to_owned()), to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, ConvertError> {
        Ok(variant_map(self.variant, Value::Map(self.map)))
    }
}

// ---------------------------------------------------------------------------
// Deserializer: Value -> Rust
// ---------------------------------------------------------------------------

/// Describes `v` for serde's "invalid type" errors.
fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Nil => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Int(i) => Unexpected::Signed(*i),
        Value::Float(x) => Unexpected::Float(*x),
        Value::Str(s) => Unexpected::Str(s),
        Value::Bytes(b) => Unexpected::Bytes(b),
        Value::List(_) => Unexpected::Seq,
        Value::Map(_) => Unexpected::Map,
        Value::Set(_) => Unexpected::Other("set"),
    }
}

/// Runs `visitor` over the elements of a list or set; fails if the visitor
/// leaves elements unread.
fn visit_seq<'de, V, I>(items: I, visitor: V) -> Result<V::Value, ConvertError>
where
    V: Visitor<'de>,
    I: ExactSizeIterator<Item = Value>,
{
    let len = items.len();
    let mut access = SeqAccess { items };
    let out = visitor.visit_seq(&mut access)?;
    match access.items.len() {
        0 => Ok(out),
        left => Err(de::Error::invalid_length(len, &ExpectedLen(len - left))),
    }
}

/// Runs `visitor` over the entries of a map; fails if the visitor leaves
/// entries unread.
fn visit_map<'de, V: Visitor<'de>>(map: BTreeMap<Value, Value>, visitor: V) -> Result<V::Value, ConvertError> {
    let len = map.len();
    let mut access = MapAccess {
        entries: map.into_iter(),
        value: None,
    };
    let out = visitor.visit_map(&mut access)?;
    match access.entries.len() {
        0 => Ok(out),
        left => Err(de::Error::invalid_length(len, &ExpectedLen(len - left))),
    }
}

/// "Expected" text for a sequence or map with leftover elements.
struct ExpectedLen(usize);

impl de::Expected for ExpectedLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} elements", self.0)
    }
}

impl<'de> ::serde::Deserializer<'de> for Value {
    type Error = ConvertError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConvertError> {
        match self {
            Value::Nil => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Int(i) => visitor.visit_i64(i),
            Value::Float(x) => visitor.visit_f64(x),
            Value::Str(s) => visitor.visit_string(s),
            Value::Bytes(b) => visitor.visit_byte_buf(b),
            Value::List(l) => visit_seq(l.into_iter(), visitor),
            Value::Map(m) => visit_map(m, visitor),
            Value::Set(s) => visit_seq(s.into_iter(), visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConvertError> {
        match self {
            Value::Nil => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ConvertError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConvertError> {
        match self {
            Value::Str(s) => visitor.visit_enum(EnumAccess {
                variant: Value::Str(s),
                value: None,
            }),
            Value::Map(m) => {
                let len = m.len();
                let mut entries = m.into_iter();
                match (entries.next(), entries.next()) {
                    (Some((variant, value)), None) => visitor.visit_enum(EnumAccess {
                        variant,
                        value: Some(value),
                    }),
                    _ => Err(de::Error::invalid_length(len, &"a map with exactly one entry")),
                }
            }
            other => Err(de::Error::invalid_type(
                unexpected(&other),
                &"a string or a one-entry map (an enum variant)",
            )),
        }
    }

    ::serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

impl<'de> IntoDeserializer<'de, ConvertError> for Value {
    type Deserializer = Value;

    fn into_deserializer(self) -> Value {
        self
    }
}

/// Hands out the elements of a list or set one by one.
struct SeqAccess<I> {
    items: I,
}

impl<'de, I: ExactSizeIterator<Item = Value>> de::SeqAccess<'de> for SeqAccess<I> {
    type Error = ConvertError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, ConvertError> {
        self.items.next().map(|v| seed.deserialize(v)).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// Hands out the entries of a map one by one.
struct MapAccess {
    entries: btree_map::IntoIter<Value, Value>,
    /// The value of the entry whose key was just handed out.
    value: Option<Value>,
}

impl<'de> de::MapAccess<'de> for MapAccess {
    type Error = ConvertError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, ConvertError> {
        match self.entries.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(key).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ConvertError> {
        let value = self
            .value
            .take()
            .ok_or_else(|| ConvertError::Message("map value requested before its key".to_owned()))?;
        seed.deserialize(value)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// An enum: the variant name (a `Str`) and, unless it is a unit variant
/// written as a bare string, its content.
struct EnumAccess {
    variant: Value,
    value: Option<Value>,
}

impl<'de> de::EnumAccess<'de> for EnumAccess {
    type Error = ConvertError;
    type Variant = VariantAccess;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, VariantAccess), ConvertError> {
        let variant = seed.deserialize(self.variant)?;
        Ok((variant, VariantAccess { value: self.value }))
    }
}

/// The content of an enum variant.
struct VariantAccess {
    value: Option<Value>,
}

impl VariantAccess {
    /// The content of a non-unit variant, or an error naming what was expected.
    fn content(self, expected: &str) -> Result<Value, ConvertError> {
        self.value
            .ok_or_else(|| de::Error::invalid_type(Unexpected::UnitVariant, &expected))
    }
}

impl<'de> de::VariantAccess<'de> for VariantAccess {
    type Error = ConvertError;

    fn unit_variant(self) -> Result<(), ConvertError> {
        match self.value {
            None | Some(Value::Nil) => Ok(()),
            Some(other) => Err(de::Error::invalid_type(unexpected(&other), &"unit variant")),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, ConvertError> {
        seed.deserialize(self.content("newtype variant")?)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, ConvertError> {
        ::serde::Deserializer::deserialize_any(self.content("tuple variant")?, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConvertError> {
        ::serde::Deserializer::deserialize_any(self.content("struct variant")?, visitor)
    }
}

// ---------------------------------------------------------------------------
// Value through serde formats
// ---------------------------------------------------------------------------

impl ::serde::Serialize for Value {
    fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Nil => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::Float(x) => serializer.serialize_f64(*x),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Bytes(b) => serializer.serialize_bytes(b),
            Value::List(l) => serializer.collect_seq(l),
            Value::Map(m) => serializer.collect_map(m),
            Value::Set(s) => serializer.collect_seq(s),
        }
    }
}

impl<'de> ::serde::Deserialize<'de> for Value {
    fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

/// Builds a [`Value`] from whatever a format hands out.
struct ValueVisitor;

/// Upper bound on preallocation from an untrusted size hint.
const MAX_PREALLOC: usize = 4096;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom(format_args!("integer {v} does not fit in a 64-bit signed integer")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &"an integer that fits in i64"))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom(format_args!("integer {v} does not fit in a 64-bit signed integer")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_some<D: ::serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_newtype_struct<D: ::serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::List(items))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((k, v)) = map.next_entry()? {
            out.insert(k, v);
        }
        Ok(Value::Map(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::serde::{Deserialize, Serialize};
    use std::collections::BTreeSet;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Empty,
        Circle(f64),
        Pair(i32, i32),
        Rect { w: u16, h: u16 },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Meters(f32);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Marker;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct User {
        id: u64,
        name: String,
        initial: char,
        tags: Vec<String>,
        nickname: Option<String>,
        age: Option<u8>,
        scores: BTreeMap<String, i64>,
        by_id: BTreeMap<u32, String>,
        shapes: Vec<Shape>,
        raw: Vec<u8>,
        grid: Vec<Vec<i16>>,
        pair: (bool, Meters),
        marker: Marker,
        nothing: (),
    }

    fn user() -> User {
        User {
            id: 7,
            name: "ada".into(),
            initial: 'a',
            tags: vec!["x".into(), "y".into()],
            nickname: None,
            age: Some(36),
            scores: BTreeMap::from([("math".into(), 99), ("debt".into(), -5)]),
            by_id: BTreeMap::from([(1, "one".into()), (2, "two".into())]),
            shapes: vec![
                Shape::Empty,
                Shape::Circle(1.5),
                Shape::Pair(-1, 2),
                Shape::Rect { w: 3, h: 4 },
            ],
            raw: vec![0, 1, 255],
            grid: vec![vec![1, 2], vec![], vec![-3]],
            pair: (true, Meters(2.5)),
            marker: Marker,
            nothing: (),
        }
    }

    fn s(v: &str) -> Value {
        Value::Str(v.to_owned())
    }

    #[test]
    fn user_struct_round_trips() {
        let u = user();
        let v = to_value(&u).unwrap();
        let back: User = from_value(v).unwrap();
        assert_eq!(back, u);
    }

    #[test]
    fn user_struct_value_shape() {
        let v = to_value(&user()).unwrap();
        let m = v.as_map().unwrap();
        assert_eq!(m[&s("id")], Value::Int(7));
        assert_eq!(m[&s("name")], s("ada"));
        assert_eq!(m[&s("initial")], s("a"));
        assert_eq!(m[&s("nickname")], Value::Nil);
        assert_eq!(m[&s("age")], Value::Int(36));
        assert_eq!(m[&s("scores")], Value::map([("debt", -5i64), ("math", 99)]));
        assert_eq!(m[&s("by_id")], Value::map([(1i64, "one"), (2, "two")]));
        assert_eq!(
            m[&s("shapes")],
            Value::list([
                s("Empty"),
                Value::map([("Circle", 1.5)]),
                Value::map([("Pair", Value::list([-1i64, 2]))]),
                Value::map([("Rect", Value::map([("h", 4i64), ("w", 3)]))]),
            ])
        );
        // Without serde_bytes a Vec<u8> is a plain sequence.
        assert_eq!(m[&s("raw")], Value::list([0i64, 1, 255]));
        assert_eq!(m[&s("pair")], Value::list([Value::Bool(true), Value::Float(2.5)]));
        assert_eq!(m[&s("marker")], Value::Nil);
        assert_eq!(m[&s("nothing")], Value::Nil);
    }

    #[test]
    fn integer_overflow_is_reported() {
        assert!(matches!(
            to_value(&u64::MAX),
            Err(ConvertError::IntegerOverflow { ref value }) if value == "18446744073709551615"
        ));
        assert!(matches!(
            to_value(&u128::MAX),
            Err(ConvertError::IntegerOverflow { .. })
        ));
        assert!(matches!(
            to_value(&i128::MIN),
            Err(ConvertError::IntegerOverflow { .. })
        ));
        assert_eq!(to_value(&(i64::MAX as u64)).unwrap(), Value::Int(i64::MAX));
        assert_eq!(to_value(&-5i128).unwrap(), Value::Int(-5));
        let err = to_value(&vec![1u64, u64::MAX]).unwrap_err();
        assert!(err.to_string().contains("18446744073709551615"), "{err}");
    }

    #[test]
    fn narrowing_on_the_way_back_is_checked() {
        assert_eq!(from_value::<u8>(Value::Int(255)).unwrap(), 255);
        assert!(from_value::<u8>(Value::Int(256)).is_err());
        assert!(from_value::<u64>(Value::Int(-1)).is_err());
        assert_eq!(from_value::<u128>(Value::Int(5)).unwrap(), 5);
        assert_eq!(from_value::<f64>(Value::Int(3)).unwrap(), 3.0);
    }

    #[test]
    fn wrong_shapes_fail_cleanly() {
        assert!(from_value::<String>(Value::Int(1)).is_err());
        assert!(from_value::<(i64, i64)>(Value::list([1i64, 2, 3])).is_err());
        assert!(from_value::<Shape>(Value::map([("Circle", 1.0), ("Empty", 0.0)])).is_err());
        assert!(from_value::<Shape>(s("Nope")).is_err());
        assert!(from_value::<Shape>(s("Circle")).is_err());
        assert!(from_value::<Shape>(Value::Int(0)).is_err());
    }

    #[test]
    fn sets_bytes_and_options_deserialize() {
        let set: BTreeSet<i64> = from_value(Value::set([3i64, 1, 2])).unwrap();
        assert_eq!(set, BTreeSet::from([1, 2, 3]));
        let list: Vec<i64> = from_value(Value::set([2i64, 1])).unwrap();
        assert_eq!(list, vec![1, 2]);
        let bytes: Vec<u8> = from_value(Value::list([7i64, 8])).unwrap();
        assert_eq!(bytes, vec![7, 8]);
        let none: Option<i64> = from_value(Value::Nil).unwrap();
        assert_eq!(none, None);
        let some: Option<i64> = from_value(Value::Int(4)).unwrap();
        assert_eq!(some, Some(4));
        let unit: () = from_value(Value::Nil).unwrap();
        assert_eq!(unit, ());
    }

    #[test]
    fn tagged_and_untagged_enums() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type")]
        enum Tagged {
            A { x: i64 },
            B,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(untagged)]
        enum Either {
            Num(i64),
            Text(String),
        }
        for t in [Tagged::A { x: 1 }, Tagged::B] {
            let v = to_value(&t).unwrap();
            assert_eq!(from_value::<Tagged>(v).unwrap(), t);
        }
        assert_eq!(
            to_value(&Tagged::A { x: 1 }).unwrap(),
            Value::map([("type", s("A")), ("x", Value::Int(1))])
        );
        for e in [Either::Num(3), Either::Text("t".into())] {
            let v = to_value(&e).unwrap();
            assert_eq!(from_value::<Either>(v).unwrap(), e);
        }
    }

    /// A value using every kind except `Set` (serde has no set type).
    fn rich_value() -> Value {
        Value::map([
            (s("nil"), Value::Nil),
            (s("bool"), Value::Bool(false)),
            (s("int"), Value::Int(i64::MIN)),
            (s("float"), Value::Float(f64::NAN)),
            (s("bytes"), Value::Bytes(vec![0, 1, 2])),
            (Value::Int(9), Value::list([Value::Nil, Value::Float(-0.0)])),
        ])
    }

    #[test]
    fn value_through_to_value_and_from_value() {
        let v = rich_value();
        assert_eq!(to_value(&v).unwrap(), v);
        assert_eq!(from_value::<Value>(v.clone()).unwrap(), v);
        // A set goes out as a sequence and comes back as a list.
        let set = Value::set([1i64, 2]);
        assert_eq!(to_value(&set).unwrap(), Value::list([1i64, 2]));
        assert_eq!(from_value::<Value>(set).unwrap(), Value::list([1i64, 2]));
    }

    #[test]
    fn value_json_round_trip() {
        let v = Value::map([
            (s("nil"), Value::Nil),
            (s("yes"), Value::Bool(true)),
            (s("min"), Value::Int(i64::MIN)),
            (s("max"), Value::Int(i64::MAX)),
            (s("float"), Value::Float(1.5)),
            (s("whole"), Value::Float(2.0)),
            (s("text"), s("héllo \"q\"")),
            (
                s("list"),
                Value::list([Value::Int(1), s("two"), Value::list(Vec::<Value>::new())]),
            ),
            (s("nested"), Value::map([("a", Value::map([("b", Value::Nil)]))])),
        ]);
        let json = serde_json::to_string(&v).unwrap();
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v, "{json}");
    }

    #[test]
    fn json_integer_above_i64_is_rejected() {
        let err = serde_json::from_str::<Value>("18446744073709551615").unwrap_err();
        assert!(err.to_string().contains("i64"), "{err}");
        assert_eq!(
            serde_json::from_str::<Value>("9223372036854775807").unwrap(),
            Value::Int(i64::MAX)
        );
    }
}
