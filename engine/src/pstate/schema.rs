//! PState schemas: what a PState holds, checked on every write.

use std::fmt;

use crate::error::{Error, Result};
use crate::value::{Kind, Value};

/// The schema of a value inside a PState. Its JSON form (serde) is what a
/// module's description shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueSchema {
    /// Any value, stored whole.
    Any,
    /// A scalar of one kind (`Nil` is always accepted as "absent").
    Scalar(Kind),
    /// A map. `subindexed` stores each entry separately (only allowed for
    /// the top-level value of a PState).
    Map {
        key: Box<ValueSchema>,
        value: Box<ValueSchema>,
        subindexed: bool,
    },
    /// A set; `subindexed` as for maps.
    Set {
        element: Box<ValueSchema>,
        subindexed: bool,
    },
    /// A list, stored whole.
    List { element: Box<ValueSchema> },
}

impl ValueSchema {
    pub fn map(key: ValueSchema, value: ValueSchema) -> Self {
        ValueSchema::Map {
            key: Box::new(key),
            value: Box::new(value),
            subindexed: false,
        }
    }

    pub fn subindexed_map(key: ValueSchema, value: ValueSchema) -> Self {
        ValueSchema::Map {
            key: Box::new(key),
            value: Box::new(value),
            subindexed: true,
        }
    }

    pub fn set(element: ValueSchema) -> Self {
        ValueSchema::Set {
            element: Box::new(element),
            subindexed: false,
        }
    }

    pub fn subindexed_set(element: ValueSchema) -> Self {
        ValueSchema::Set {
            element: Box::new(element),
            subindexed: true,
        }
    }

    pub fn list(element: ValueSchema) -> Self {
        ValueSchema::List {
            element: Box::new(element),
        }
    }

    pub(crate) fn is_subindexed(&self) -> bool {
        matches!(
            self,
            ValueSchema::Map { subindexed: true, .. } | ValueSchema::Set { subindexed: true, .. }
        )
    }

    fn check_no_subindex(&self, within: &str) -> Result<()> {
        match self {
            ValueSchema::Any | ValueSchema::Scalar(_) => Ok(()),
            ValueSchema::Map { key, value, subindexed } => {
                if *subindexed {
                    return Err(Error::Schema(format!(
                        "a subindexed map may only be the top-level value of a PState, not nested in {within}"
                    )));
                }
                key.check_no_subindex(within)?;
                value.check_no_subindex(within)
            }
            ValueSchema::Set { element, subindexed } => {
                if *subindexed {
                    return Err(Error::Schema(format!(
                        "a subindexed set may only be the top-level value of a PState, not nested in {within}"
                    )));
                }
                element.check_no_subindex(within)
            }
            ValueSchema::List { element } => element.check_no_subindex(within),
        }
    }

    /// Checks `value` against this schema; `at` names the place for errors.
    pub fn check(&self, value: &Value, at: &dyn fmt::Display) -> Result<()> {
        let mismatch = || {
            Err(Error::Schema(format!(
                "value at {at} is a {}, but the schema wants {self}",
                value.kind()
            )))
        };
        match (self, value) {
            (ValueSchema::Any, _) | (_, Value::Nil) => Ok(()),
            (ValueSchema::Scalar(kind), v) => {
                if v.kind() == *kind {
                    Ok(())
                } else {
                    mismatch()
                }
            }
            (ValueSchema::Map { key, value: vs, .. }, Value::Map(m)) => {
                for (k, v) in m {
                    key.check(k, &format_args!("{at} key {k}"))?;
                    vs.check(v, &format_args!("{at}[{k}]"))?;
                }
                Ok(())
            }
            (ValueSchema::Set { element, .. }, Value::Set(s)) => s
                .iter()
                .try_for_each(|e| element.check(e, &format_args!("{at} element {e}"))),
            (ValueSchema::List { element }, Value::List(l)) => l
                .iter()
                .enumerate()
                .try_for_each(|(i, e)| element.check(e, &format_args!("{at}[{i}]"))),
            _ => mismatch(),
        }
    }
}

impl fmt::Display for ValueSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueSchema::Any => f.write_str("any"),
            ValueSchema::Scalar(k) => write!(f, "{k}"),
            ValueSchema::Map { key, value, subindexed } => {
                write!(f, "{}map<{key}, {value}>", if *subindexed { "subindexed " } else { "" })
            }
            ValueSchema::Set { element, subindexed } => {
                write!(f, "{}set<{element}>", if *subindexed { "subindexed " } else { "" })
            }
            ValueSchema::List { element } => write!(f, "list<{element}>"),
        }
    }
}

/// A PState is a map from top-level keys to values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PStateSchema {
    pub key: ValueSchema,
    pub value: ValueSchema,
}

impl PStateSchema {
    pub fn new(key: ValueSchema, value: ValueSchema) -> Self {
        PStateSchema { key, value }
    }

    /// Checks the schema itself: subindexing only at the top-level value.
    pub fn validate(&self, name: &str) -> Result<()> {
        let within = format!("PState {name}");
        self.key.check_no_subindex(&within)?;
        match &self.value {
            ValueSchema::Map { key, value, .. } => {
                key.check_no_subindex(&within)?;
                value.check_no_subindex(&within)
            }
            ValueSchema::Set { element, .. } => element.check_no_subindex(&within),
            other => other.check_no_subindex(&within),
        }
    }
}
