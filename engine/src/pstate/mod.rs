//! PStates on the task thread's store: schemas, paths and the key layout.
//!
//! Every stored key starts with the task id and the PState id, so one
//! task's data is a contiguous key range that can be exported or moved:
//!
//! ```text
//! P = task_id:u32 BE ++ pstate_id:u16 BE
//! P ++ 00 ++ key(k)            -> archived value            (stored whole)
//! P ++ 00 ++ key(k)            -> size:u64 LE               (subindexed: header)
//! P ++ 01 ++ key(k) ++ key(e)  -> archived value of e       (subindexed map entry)
//! P ++ 01 ++ key(k) ++ key(e)  -> empty                     (subindexed set element)
//! ```
//! `key(x)` is the order-preserving encoding, so entries of one subindexed
//! structure are contiguous and sorted, and range reads are key scans. The
//! header keeps the size, so `size` needs no scan.
//!
//! Writes go through a [`Tx`]: reads inside it see its own writes, and it
//! commits as one atomic [`WriteBatch`].

pub mod path;
pub mod schema;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

pub use self::path::{Nav, Op, Path};
pub use self::schema::{PStateSchema, ValueSchema};
use crate::error::{Error, Result};
use crate::lsm::{bounds_empty, Store, WriteBatch};
use crate::value::{archived, key, Value};

const WHOLE: u8 = 0x00;
const ELEMENT: u8 = 0x01;

/// Read access to a task thread's key space.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
}

impl KvRead for Store {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Store::get(self, key)
    }

    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Store::scan(self, lower, upper, reverse, limit)
    }
}

/// Uncommitted writes of a [`Tx`]: key -> new value (`None`: deleted).
pub type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Writes queued in the WAL but not yet visible in the store: key ->
/// (sequence number of the batch that wrote it last, value).
pub type Queued = BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>;

/// Writes of one processing batch: read-your-writes, committed atomically.
#[derive(Debug)]
pub struct Tx<'s> {
    store: &'s Store,
    /// Writes queued before this transaction and not yet visible in the
    /// store; reads see them.
    queued: Option<&'s RefCell<Queued>>,
    overlay: Overlay,
}

impl<'s> Tx<'s> {
    pub fn new(store: &'s Store) -> Self {
        Tx::with_overlay(store, Overlay::new())
    }

    /// Continues a transaction whose writes so far are `overlay` (a
    /// microbatch keeps its writes across many processing steps).
    pub fn with_overlay(store: &'s Store, overlay: Overlay) -> Self {
        Tx {
            store,
            queued: None,
            overlay,
        }
    }

    /// A transaction reading through `queued` (writes queued earlier that
    /// the store does not show yet). It must not be changed while the
    /// transaction reads.
    pub fn over_queued(store: &'s Store, queued: &'s RefCell<Queued>) -> Self {
        Tx {
            store,
            queued: Some(queued),
            overlay: Overlay::new(),
        }
    }

    /// The writes made so far.
    pub fn into_overlay(self) -> Overlay {
        self.overlay
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.overlay.insert(key, Some(value));
    }

    pub(crate) fn delete(&mut self, key: Vec<u8>) {
        self.overlay.insert(key, None);
    }

    pub fn is_empty(&self) -> bool {
        self.overlay.is_empty()
    }

    /// The batch of all writes made through this transaction.
    pub fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::new();
        for (k, v) in self.overlay {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            };
        }
        batch
    }

    /// Commits all writes atomically; returns once durable and visible.
    pub async fn commit(self) -> Result<()> {
        let store = self.store;
        let batch = self.into_batch();
        store.check_batch(&batch)?;
        store.write(batch).await
    }
}

impl KvRead for Tx<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        if let Some(q) = self.queued {
            if let Some((_, v)) = q.borrow().get(key) {
                return Ok(v.clone());
            }
        }
        self.store.get(key)
    }

    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if bounds_empty(lower, upper) {
            return Ok(Vec::new());
        }
        let queued = self.queued.map(RefCell::borrow);
        let queued_range = || queued.iter().flat_map(|q| q.range::<[u8], _>((lower, upper)));
        let overlay = self.overlay.range::<[u8], _>((lower, upper));
        // Each queued or overlay entry can hide at most one stored entry, so
        // this many extra stored entries are enough to fill `limit`.
        let extra = overlay.clone().count() + queued_range().count();
        let stored = self.store.scan(lower, upper, reverse, limit.saturating_add(extra))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
        let newer = queued_range().map(|(k, (_, v))| (k, v)).chain(overlay);
        for (k, v) in newer {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(if reverse {
            merged.into_iter().rev().take(limit).collect()
        } else {
            merged.into_iter().take(limit).collect()
        })
    }
}

/// The single value of a `select` (nil for none); an error naming PState
/// `pstate` and `path` if there are several. Every `select_one` uses it.
pub fn one_value(mut values: Vec<Value>, pstate: &str, path: &[Nav]) -> Result<Value> {
    match values.len() {
        0 => Ok(Value::Nil),
        1 => Ok(values.pop().expect("one value")),
        n => Err(Error::Schema(format!(
            "select_one on PState {pstate} with path {path:?} reached {n} values"
        ))),
    }
}

/// One partition of a PState on one task.
#[derive(Debug, Clone)]
pub struct PState {
    name: String,
    schema: PStateSchema,
    /// The schema of the PState as a whole: a map of top-level keys.
    top: ValueSchema,
    prefix: Vec<u8>,
}

fn corrupt(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        path: format!("<PState {name}>").into(),
        offset: 0,
        position: 0,
        reason: e.to_string(),
    }
}

impl PState {
    /// A PState partition of task `task_id`; `pstate_id` is the PState's
    /// number within its module.
    pub fn new(name: impl Into<String>, task_id: u32, pstate_id: u16, schema: PStateSchema) -> Result<PState> {
        let name = name.into();
        schema.validate(&name)?;
        let mut prefix = task_id.to_be_bytes().to_vec();
        prefix.extend_from_slice(&pstate_id.to_be_bytes());
        let top = ValueSchema::map(schema.key.clone(), schema.value.clone());
        Ok(PState {
            name,
            schema,
            top,
            prefix,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn schema(&self) -> &PStateSchema {
        &self.schema
    }

    fn subindexed(&self) -> bool {
        self.schema.value.is_subindexed()
    }

    /// The schema of one element's value in a subindexed structure.
    fn element_schema(&self) -> &ValueSchema {
        match &self.schema.value {
            ValueSchema::Map { value, .. } => value,
            ValueSchema::Set { element, .. } => element,
            other => other,
        }
    }

    fn is_set(&self) -> bool {
        matches!(self.schema.value, ValueSchema::Set { .. })
    }

    fn section(&self, section: u8) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(section);
        k
    }

    fn top_key(&self, k: &Value) -> Vec<u8> {
        let mut out = self.section(WHOLE);
        key::encode_into(k, &mut out);
        out
    }

    fn element_prefix(&self, k: &Value) -> Vec<u8> {
        let mut out = self.section(ELEMENT);
        key::encode_into(k, &mut out);
        out
    }

    fn decode_value(&self, bytes: &[u8]) -> Result<Value> {
        archived::from_bytes(bytes).map_err(|e| corrupt(&self.name, e))
    }

    fn decode_key(&self, bytes: &[u8]) -> Result<Value> {
        key::decode(bytes).map_err(|e| corrupt(&self.name, e))
    }

    fn decode_size(&self, bytes: &[u8]) -> Result<u64> {
        let b: [u8; 8] = bytes
            .try_into()
            .map_err(|_| corrupt(&self.name, "size header is not 8 bytes"))?;
        Ok(u64::from_le_bytes(b))
    }

    /// Key-space bounds for a range of encoded sub-keys under `prefix`.
    fn bounds(prefix: &[u8], lower: &Bound<Value>, upper: &Bound<Value>) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
        let with = |v: &Value| {
            let mut k = prefix.to_vec();
            key::encode_into(v, &mut k);
            k
        };
        let lo = match lower {
            Bound::Unbounded => Bound::Included(prefix.to_vec()),
            Bound::Included(v) => Bound::Included(with(v)),
            Bound::Excluded(v) => Bound::Excluded(with(v)),
        };
        let hi = match upper {
            Bound::Unbounded => key::prefix_successor(prefix).map_or(Bound::Unbounded, Bound::Excluded),
            Bound::Included(v) => Bound::Included(with(v)),
            Bound::Excluded(v) => Bound::Excluded(with(v)),
        };
        (lo, hi)
    }

    fn scan_under(
        r: &dyn KvRead,
        prefix: &[u8],
        lower: &Bound<Value>,
        upper: &Bound<Value>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (lo, hi) = Self::bounds(prefix, lower, upper);
        let as_ref = |b: &Bound<Vec<u8>>| match b {
            Bound::Included(k) => Bound::Included(k.clone()),
            Bound::Excluded(k) => Bound::Excluded(k.clone()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let (lo, hi) = (as_ref(&lo), as_ref(&hi));
        r.scan(
            lo.as_ref().map(Vec::as_slice),
            hi.as_ref().map(Vec::as_slice),
            reverse,
            limit,
        )
    }

    /// Loads elements of a subindexed structure as a map or set value.
    fn load_elements(&self, r: &dyn KvRead, k: &Value, nav: Option<&Nav>) -> Result<Value> {
        let prefix = self.element_prefix(k);
        let (lower, upper, reverse, limit) = match nav {
            Some(Nav::Range {
                lower,
                upper,
                reverse,
                limit,
            }) => (lower.clone(), upper.clone(), *reverse, limit.unwrap_or(usize::MAX)),
            _ => (Bound::Unbounded, Bound::Unbounded, false, usize::MAX),
        };
        let entries = Self::scan_under(r, &prefix, &lower, &upper, reverse, limit)?;
        if self.is_set() {
            let set = entries
                .iter()
                .map(|(ek, _)| self.decode_key(&ek[prefix.len()..]))
                .collect::<Result<BTreeSet<_>>>()?;
            Ok(Value::Set(set))
        } else {
            let map = entries
                .iter()
                .map(|(ek, v)| Ok((self.decode_key(&ek[prefix.len()..])?, self.decode_value(v)?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            Ok(Value::Map(map))
        }
    }

    /// The whole value under top-level key `k` (nil if absent).
    fn load(&self, r: &dyn KvRead, k: &Value) -> Result<Value> {
        let Some(stored) = r.get(&self.top_key(k))? else {
            return Ok(Value::Nil);
        };
        if self.subindexed() {
            self.load_elements(r, k, None)
        } else {
            self.decode_value(&stored)
        }
    }

    /// Every value `path` reaches, read at this instant.
    pub fn select(&self, r: &dyn KvRead, path: &[Nav]) -> Result<Vec<Value>> {
        path::check_path(&self.top, path, 0, path)?;
        let mut out = Vec::new();
        let Some((first, rest)) = path.split_first() else {
            return Err(Error::Schema(format!(
                "an empty path would select all of PState {}; use all() or a range",
                self.name
            )));
        };
        match first {
            Nav::Key(k) => self.select_key(r, k, rest, path, &mut out)?,
            Nav::NilToValue(_) => return self.select(r, rest),
            Nav::Range { .. } | Nav::All | Nav::MapVals | Nav::Size => {
                let (lower, upper, reverse, limit) = match first {
                    Nav::Range {
                        lower,
                        upper,
                        reverse,
                        limit,
                    } => (lower.clone(), upper.clone(), *reverse, limit.unwrap_or(usize::MAX)),
                    _ => (Bound::Unbounded, Bound::Unbounded, false, usize::MAX),
                };
                let prefix = self.section(WHOLE);
                let mut top = BTreeMap::new();
                for (tk, stored) in Self::scan_under(r, &prefix, &lower, &upper, reverse, limit)? {
                    let k = self.decode_key(&tk[prefix.len()..])?;
                    let v = if self.subindexed() {
                        self.load_elements(r, &k, None)?
                    } else {
                        self.decode_value(&stored)?
                    };
                    top.insert(k, v);
                }
                // The range was applied by the scan; continue in memory.
                let rest_from = if matches!(first, Nav::Range { .. }) { rest } else { path };
                let base = path.len() - rest_from.len();
                path::select(Value::Map(top), rest_from, path, base, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Like [`select`](Self::select), but a path reaching one stored value
    /// (a key, or a key and an element key of a subindexed map) answers
    /// with its stored archive as it is, checked but never decoded: a
    /// server sends those bytes on.
    pub fn select_stored(&self, r: &dyn KvRead, path: &[Nav]) -> Result<crate::wire::Selected> {
        use crate::wire::Selected;
        let stored = match path {
            [Nav::Key(k)] if !self.subindexed() => {
                path::check_path(&self.top, path, 0, path)?;
                r.get(&self.top_key(k))?
            }
            [Nav::Key(k), Nav::Key(e)] if self.subindexed() && !self.is_set() => {
                path::check_path(&self.top, path, 0, path)?;
                let mut ek = self.element_prefix(k);
                key::encode_into(e, &mut ek);
                r.get(&ek)?
            }
            _ => return self.select(r, path).map(Selected::Values),
        };
        match stored {
            None => Ok(Selected::Values(vec![Value::Nil])),
            Some(bytes) => {
                archived::access(&bytes).map_err(|e| corrupt(&self.name, e))?;
                Ok(Selected::Stored(bytes))
            }
        }
    }

    /// The single value `path` reaches; an error if it reaches several.
    pub fn select_one(&self, r: &dyn KvRead, path: &[Nav]) -> Result<Value> {
        one_value(self.select(r, path)?, &self.name, path)
    }

    fn select_key(&self, r: &dyn KvRead, k: &Value, rest: &[Nav], full: &[Nav], out: &mut Vec<Value>) -> Result<()> {
        let base = full.len() - rest.len();
        if !self.subindexed() {
            return path::select(self.load(r, k)?, rest, full, base, out);
        }
        let header = r.get(&self.top_key(k))?;
        match rest.first() {
            None | Some(Nav::All | Nav::MapVals) => path::select(self.load(r, k)?, rest, full, base, out),
            Some(Nav::NilToValue(d)) => match header {
                None => path::select(d.clone(), &rest[1..], full, base + 1, out),
                Some(_) => self.select_key(r, k, &rest[1..], full, out),
            },
            Some(Nav::Key(e)) => {
                let v = if header.is_none() {
                    Value::Nil
                } else {
                    let mut ek = self.element_prefix(k);
                    key::encode_into(e, &mut ek);
                    match r.get(&ek)? {
                        None => Value::Nil,
                        Some(_) if self.is_set() => e.clone(),
                        Some(bytes) => self.decode_value(&bytes)?,
                    }
                };
                path::select(v, &rest[1..], full, base + 1, out)
            }
            // A range of an absent structure reaches nothing, as in memory.
            Some(Nav::Range { .. }) if header.is_none() => Ok(()),
            Some(nav @ Nav::Range { .. }) => {
                let v = self.load_elements(r, k, Some(nav))?;
                path::select(v, &rest[1..], full, base + 1, out)
            }
            Some(Nav::Size) => {
                let size = header.map(|h| self.decode_size(&h)).transpose()?.unwrap_or(0);
                path::select(Value::Int(size as i64), &rest[1..], full, base + 1, out)
            }
        }
    }

    /// Applies `op` at every place `path` reaches, through `tx`. The path
    /// must start with a key (writes are routed by their first key).
    pub fn transform(&self, tx: &mut Tx<'_>, path: &[Nav], op: Op) -> Result<()> {
        path::check_path(&self.top, path, 0, path)?;
        let Some((Nav::Key(k), rest)) = path.split_first() else {
            return Err(Error::Schema(format!(
                "a transform of PState {} must start with a key navigator, got {path:?}",
                self.name
            )));
        };
        self.schema.key.check(k, &format_args!("PState {} key", self.name))?;
        if self.subindexed() {
            return self.transform_subindexed(tx, k, rest, path, &op);
        }
        let old = self.load(tx, k)?;
        match path::transform(old, rest, &op, path, 1, &self.schema.value)? {
            None | Some(Value::Nil) => tx.delete(self.top_key(k)),
            Some(v) => {
                self.schema
                    .value
                    .check(&v, &format_args!("PState {}[{k}]", self.name))?;
                tx.put(self.top_key(k), archived::to_bytes(&v));
            }
        }
        Ok(())
    }

    fn transform_subindexed(&self, tx: &mut Tx<'_>, k: &Value, rest: &[Nav], full: &[Nav], op: &Op) -> Result<()> {
        let base = full.len() - rest.len();
        let top_key = self.top_key(k);
        let header = tx.get(&top_key)?;
        let at = format!("PState {}[{k}]", self.name);
        match rest.first() {
            None => {
                let old = self.load(tx, k)?;
                let new = op.apply(old.clone());
                self.replace_elements(tx, k, &old, new.as_ref(), &at)
            }
            Some(Nav::NilToValue(d)) => match header {
                Some(_) => self.transform_subindexed(tx, k, &rest[1..], full, op),
                None => {
                    let new = path::transform(d.clone(), &rest[1..], op, full, base + 1, &self.schema.value)?;
                    self.replace_elements(tx, k, &Value::Nil, new.as_ref(), &at)
                }
            },
            Some(Nav::Key(e)) => {
                let mut ek = self.element_prefix(k);
                key::encode_into(e, &mut ek);
                let existing = tx.get(&ek)?;
                let old = match &existing {
                    None => Value::Nil,
                    Some(_) if self.is_set() => e.clone(),
                    Some(bytes) => self.decode_value(bytes)?,
                };
                let new = path::transform(old.clone(), &rest[1..], op, full, base + 1, self.element_schema())?;
                let mut old_map = BTreeMap::new();
                if existing.is_some() {
                    old_map.insert(e.clone(), old);
                }
                let mut new_map = BTreeMap::new();
                match new {
                    None => {}
                    Some(Value::Nil) if self.is_set() => {}
                    Some(v) if self.is_set() => {
                        new_map.insert(v.clone(), v);
                    }
                    Some(v) => {
                        new_map.insert(e.clone(), v);
                    }
                }
                let size = header.map(|h| self.decode_size(&h)).transpose()?.unwrap_or(0);
                self.apply_element_diff(tx, k, &old_map, &new_map, size, &at)
            }
            Some(nav @ (Nav::Range { .. } | Nav::All | Nav::MapVals)) => {
                if header.is_none() {
                    return Ok(());
                }
                let range = matches!(nav, Nav::Range { .. }).then_some(nav);
                let partial = self.load_elements(tx, k, range)?;
                let new = path::transform(partial.clone(), rest, op, full, base, &self.schema.value)?;
                let size = header.map(|h| self.decode_size(&h)).transpose()?.unwrap_or(0);
                let as_map = |v: &Value| -> BTreeMap<Value, Value> {
                    match v {
                        Value::Map(m) => m.clone(),
                        Value::Set(s) => s.iter().map(|e| (e.clone(), e.clone())).collect(),
                        _ => BTreeMap::new(),
                    }
                };
                let new = new.unwrap_or(Value::Nil);
                if !matches!(new, Value::Map(_) | Value::Set(_) | Value::Nil) {
                    return Err(Error::Schema(format!(
                        "{at} must stay a map or set, got a {}",
                        new.kind()
                    )));
                }
                self.apply_element_diff(tx, k, &as_map(&partial), &as_map(&new), size, &at)
            }
            Some(Nav::Size) => Err(Error::Schema(format!("{at}: size is read only"))),
        }
    }

    /// Replaces the whole subindexed structure under `k`.
    fn replace_elements(&self, tx: &mut Tx<'_>, k: &Value, old: &Value, new: Option<&Value>, at: &str) -> Result<()> {
        let prefix = self.element_prefix(k);
        let old_keys: Vec<Vec<u8>> = match old {
            Value::Nil => Vec::new(),
            _ => Self::scan_under(tx, &prefix, &Bound::Unbounded, &Bound::Unbounded, false, usize::MAX)?
                .into_iter()
                .map(|(ek, _)| ek)
                .collect(),
        };
        for ek in old_keys {
            tx.delete(ek);
        }
        match new {
            None | Some(Value::Nil) => {
                tx.delete(self.top_key(k));
                Ok(())
            }
            Some(v) => {
                self.schema.value.check(v, &at)?;
                let entries: Vec<(Value, Option<Value>)> = match v {
                    Value::Map(m) => m.iter().map(|(e, v)| (e.clone(), Some(v.clone()))).collect(),
                    Value::Set(s) => s.iter().map(|e| (e.clone(), None)).collect(),
                    other => {
                        return Err(Error::Schema(format!(
                            "{at} is subindexed and must be a map or set, got a {}",
                            other.kind()
                        )))
                    }
                };
                let size = entries.len() as u64;
                for (e, v) in entries {
                    let mut ek = prefix.clone();
                    key::encode_into(&e, &mut ek);
                    tx.put(ek, v.map_or_else(Vec::new, |v| archived::to_bytes(&v)));
                }
                tx.put(self.top_key(k), size.to_le_bytes().to_vec());
                Ok(())
            }
        }
    }

    /// Writes the difference between the old and new elements (set elements
    /// are mapped to themselves) and the new size.
    fn apply_element_diff(
        &self,
        tx: &mut Tx<'_>,
        k: &Value,
        old: &BTreeMap<Value, Value>,
        new: &BTreeMap<Value, Value>,
        size: u64,
        at: &str,
    ) -> Result<()> {
        let (elem_key_schema, elem_value_schema) = match &self.schema.value {
            ValueSchema::Map { key, value, .. } => (key.as_ref(), Some(value.as_ref())),
            ValueSchema::Set { element, .. } => (element.as_ref(), None),
            _ => unreachable!("subindexed schemas are maps or sets"),
        };
        let prefix = self.element_prefix(k);
        let mut size = size;
        for e in old.keys() {
            if !new.contains_key(e) {
                let mut ek = prefix.clone();
                key::encode_into(e, &mut ek);
                tx.delete(ek);
                size -= 1;
            }
        }
        for (e, v) in new {
            if old.get(e) == Some(v) {
                continue;
            }
            elem_key_schema.check(e, &format_args!("{at} element {e}"))?;
            let mut ek = prefix.clone();
            key::encode_into(e, &mut ek);
            let existed = old.contains_key(e) || tx.get(&ek)?.is_some();
            let bytes = match elem_value_schema {
                Some(schema) => {
                    schema.check(v, &format_args!("{at}[{e}]"))?;
                    archived::to_bytes(v)
                }
                None => Vec::new(),
            };
            tx.put(ek, bytes);
            if !existed {
                size += 1;
            }
        }
        tx.put(self.top_key(k), size.to_le_bytes().to_vec());
        Ok(())
    }
}
