//! What a module author declares: a module's depots, PStates, stream and
//! microbatch topologies and query topologies.
//!
//! Names carry sigils: depots `*name`, PStates `$$name`. A definition is
//! checked once, when it is built into a [`ModuleDef`]; the runtime then
//! trusts it.

pub mod topology;

use std::fmt;
use std::sync::Arc;

pub use self::topology::{fail, stage, AggregateFn, QueryDef, StageCtx, StageFn, To, TopologyDef, TopologyKind};
use crate::error::{Error, Result};
use crate::pstate::PStateSchema;
use crate::runtime::partition::task_for_key;
use crate::value::{archived, Value};

/// A module as a Rust type: what `InProcessCluster::launch_module` and the
/// module artifact's `main` (see [`crate::module_main`]) take.
pub trait Module {
    /// The module's definition; its name is the module's name.
    fn define() -> Result<ModuleDef>;
}

/// Extracts the partitioning key from a depot record.
pub type KeyFn = Arc<dyn Fn(&Value) -> Value + Send + Sync>;

/// How a depot picks the partition (task) of a record a client appends.
#[derive(Clone)]
pub enum Partitioner {
    /// The task of the key `key_fn` takes from the record (module code:
    /// only the module's workers can run it).
    HashBy(KeyFn),
    /// The task of the value of this field of a map record (`nil` when the
    /// record is not a map or lacks the field). Declarative: remote clients
    /// run it too, and send each append straight to its task's thread.
    HashByField(String),
    /// Any task: clients spread their appends round-robin.
    Random,
    /// Clients may not append; only the module's topologies do.
    Disallow,
}

impl Partitioner {
    /// Hash by the key that `f` extracts from each record.
    pub fn hash_by(f: impl Fn(&Value) -> Value + Send + Sync + 'static) -> Partitioner {
        Partitioner::HashBy(Arc::new(f))
    }

    /// Hash by the value of field `name` of each (map) record.
    pub fn hash_by_field(name: impl Into<String>) -> Partitioner {
        Partitioner::HashByField(name.into())
    }

    /// The partitioning key of `record`, for the hashing partitioners.
    pub fn key(&self, record: &Value) -> Option<Value> {
        match self {
            Partitioner::HashBy(key) => Some(key(record)),
            Partitioner::HashByField(name) => Some(field_key(record, name)),
            Partitioner::Random | Partitioner::Disallow => None,
        }
    }
}

/// The value of field `name` of a map record; `nil` for any other record
/// (what [`Partitioner::HashByField`] hashes).
pub fn field_key(record: &Value, name: &str) -> Value {
    record
        .as_map()
        .and_then(|m| m.get(&Value::from(name)))
        .cloned()
        .unwrap_or(Value::Nil)
}

/// [`field_key`] read from an archived record in place (only the key is
/// decoded).
pub fn archived_field_key(record: &crate::value::ArchivedValue, name: &str) -> Value {
    use crate::value::ArchivedValue;
    let ArchivedValue::Map(entries) = record else {
        return Value::Nil;
    };
    entries
        .iter()
        .find(|e| matches!(&e.key, ArchivedValue::Str(s) if s.as_str() == name))
        .and_then(|e| rkyv::deserialize::<Value, rkyv::rancor::Error>(&e.value).ok())
        .unwrap_or(Value::Nil)
}

impl fmt::Debug for Partitioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Partitioner::HashBy(_) => "hash-by-key",
            Partitioner::HashByField(_) => "hash-by-field",
            Partitioner::Random => "random",
            Partitioner::Disallow => "disallow",
        })
    }
}

/// A depot of a module.
#[derive(Debug, Clone)]
pub struct DepotDef {
    pub name: String,
    pub partitioner: Partitioner,
    /// A global depot has one partition, on task 0.
    pub global: bool,
}

impl DepotDef {
    /// The task the depot puts `record` on when it decides: task 0 of a
    /// global depot, the key's task of a hashing one; `None` for a random
    /// or disallow depot (the appender picks, or may not append).
    pub fn fixed_task(&self, record: &Value, tasks: u32) -> Option<u32> {
        if self.global {
            return Some(0);
        }
        self.partitioner.key(record).map(|k| task_for_key(&k, tasks))
    }

    /// [`Self::fixed_task`] of the archived record `bytes`, validated here:
    /// a field's key is read in place, module code gets the decoded record.
    pub fn fixed_task_archived(
        &self,
        bytes: &[u8],
        tasks: u32,
    ) -> std::result::Result<Option<u32>, archived::ArchiveError> {
        let value = archived::access(bytes)?;
        Ok(match &self.partitioner {
            _ if self.global => Some(0),
            Partitioner::HashByField(field) => Some(task_for_key(&archived_field_key(value, field), tasks)),
            Partitioner::HashBy(_) => self.fixed_task(&archived::from_bytes(bytes)?, tasks),
            Partitioner::Random | Partitioner::Disallow => None,
        })
    }
}

/// A PState of a module.
#[derive(Debug, Clone)]
pub struct PStateDef {
    pub name: String,
    pub schema: PStateSchema,
}

/// A checked module definition.
#[derive(Debug, Clone)]
pub struct ModuleDef {
    pub name: String,
    pub depots: Vec<DepotDef>,
    pub pstates: Vec<PStateDef>,
    pub topologies: Vec<TopologyDef>,
    pub queries: Vec<QueryDef>,
}

/// Declares a module; [`ModuleBuilder::build`] checks it.
#[derive(Debug, Clone)]
pub struct ModuleBuilder {
    def: ModuleDef,
    /// Source depot names of each topology, resolved by `build`.
    sources: Vec<Vec<String>>,
}

impl ModuleBuilder {
    pub fn new(name: impl Into<String>) -> ModuleBuilder {
        ModuleBuilder {
            def: ModuleDef {
                name: name.into(),
                depots: Vec::new(),
                pstates: Vec::new(),
                topologies: Vec::new(),
                queries: Vec::new(),
            },
            sources: Vec::new(),
        }
    }

    /// Declares a depot partitioned over all tasks.
    #[must_use]
    pub fn depot(mut self, name: impl Into<String>, partitioner: Partitioner) -> Self {
        self.def.depots.push(DepotDef {
            name: name.into(),
            partitioner,
            global: false,
        });
        self
    }

    /// Declares a global depot: one partition, on task 0.
    #[must_use]
    pub fn global_depot(mut self, name: impl Into<String>) -> Self {
        self.def.depots.push(DepotDef {
            name: name.into(),
            partitioner: Partitioner::Random,
            global: true,
        });
        self
    }

    /// Declares a PState.
    #[must_use]
    pub fn pstate(mut self, name: impl Into<String>, schema: PStateSchema) -> Self {
        self.def.pstates.push(PStateDef {
            name: name.into(),
            schema,
        });
        self
    }

    /// Declares a stream topology: `stages[0]` gets each record of the
    /// `sources` depots as it arrives; at-least-once.
    #[must_use]
    pub fn stream<S: Into<String>>(
        self,
        name: impl Into<String>,
        sources: impl IntoIterator<Item = S>,
        stages: Vec<StageFn>,
    ) -> Self {
        self.topology(name.into(), TopologyKind::Stream, sources, stages)
    }

    /// Declares a microbatch topology: `stages[0]` gets the records of each
    /// microbatch's depot ranges; exactly-once, atomic across tasks.
    #[must_use]
    pub fn microbatch<S: Into<String>>(
        self,
        name: impl Into<String>,
        sources: impl IntoIterator<Item = S>,
        stages: Vec<StageFn>,
    ) -> Self {
        self.topology(name.into(), TopologyKind::Microbatch, sources, stages)
    }

    fn topology<S: Into<String>>(
        mut self,
        name: String,
        kind: TopologyKind,
        sources: impl IntoIterator<Item = S>,
        stages: Vec<StageFn>,
    ) -> Self {
        self.sources.push(sources.into_iter().map(Into::into).collect());
        self.def.topologies.push(TopologyDef {
            name,
            kind,
            sources: Vec::new(),
            stages,
        });
        self
    }

    /// Declares a query topology: `stages[0]` gets the arguments; values the
    /// stages emit to `To::Origin` are combined by `aggregate`.
    #[must_use]
    pub fn query(
        mut self,
        name: impl Into<String>,
        stages: Vec<StageFn>,
        aggregate: impl Fn(&Value, Vec<Value>) -> Result<Value> + Send + Sync + 'static,
    ) -> Self {
        self.def.queries.push(QueryDef {
            name: name.into(),
            stages,
            aggregate: Arc::new(aggregate),
        });
        self
    }

    /// Checks names and schemas and returns the definition.
    pub fn build(self) -> Result<ModuleDef> {
        let mut def = self.def;
        let bad = |what: String| Err(Error::Schema(format!("module {}: {what}", def.name)));
        if def.name.is_empty() || def.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad(format!("module name {:?} must be non-empty without spaces", def.name));
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &def.depots {
            if !valid_name(&d.name, "*") {
                return bad(format!("depot name {:?} must start with * followed by a name", d.name));
            }
            if !seen.insert(d.name.clone()) {
                return bad(format!("depot {} is declared twice", d.name));
            }
        }
        for p in &def.pstates {
            if !valid_name(&p.name, "$$") {
                return bad(format!(
                    "PState name {:?} must start with $$ followed by a name",
                    p.name
                ));
            }
            if !seen.insert(p.name.clone()) {
                return bad(format!("PState {} is declared twice", p.name));
            }
            p.schema.validate(&p.name)?;
        }
        // PState id 0xFFFF keys the runtime's own records (offsets,
        // microbatch state).
        if def.pstates.len() >= usize::from(u16::MAX) {
            return bad(format!("{} PStates, more than {}", def.pstates.len(), u16::MAX - 1));
        }
        let mut names = std::collections::BTreeSet::new();
        for (t, sources) in def.topologies.iter().zip(&self.sources) {
            if !valid_name(&t.name, "") || t.name.len() > 200 || !names.insert(t.name.clone()) {
                return bad(format!(
                    "topology name {:?} is empty, longer than 200 bytes, invalid or declared twice",
                    t.name
                ));
            }
            if t.stages.is_empty() {
                return bad(format!("topology {} has no stages", t.name));
            }
            if sources.is_empty() {
                return bad(format!("topology {} reads no depot", t.name));
            }
        }
        for q in &def.queries {
            if !valid_name(&q.name, "") || !names.insert(q.name.clone()) {
                return bad(format!("query name {:?} is empty, invalid or declared twice", q.name));
            }
            if q.stages.is_empty() {
                return bad(format!("query {} has no stages", q.name));
            }
        }
        let mut resolved = Vec::new();
        for (t, sources) in def.topologies.iter().zip(&self.sources) {
            let mut indexes = Vec::new();
            for s in sources {
                match def.depot(s) {
                    Ok((i, _)) if !indexes.contains(&i) => indexes.push(i),
                    Ok(_) => return bad(format!("topology {} reads depot {s} twice", t.name)),
                    Err(_) => return bad(format!("topology {} reads depot {s}, which is not declared", t.name)),
                }
            }
            resolved.push(indexes);
        }
        for (t, indexes) in def.topologies.iter_mut().zip(resolved) {
            t.sources = indexes;
        }
        Ok(def)
    }
}

fn valid_name(name: &str, sigil: &str) -> bool {
    name.strip_prefix(sigil).is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
    })
}

/// What a module declares, in a form for JSON (`rama` describes modules
/// with it, and the Conductor validates deploys against it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleDescription {
    pub name: String,
    pub engine_version: String,
    pub depots: Vec<DepotDescription>,
    pub pstates: Vec<PStateDescription>,
    #[serde(default)]
    pub topologies: Vec<TopologyDescription>,
    #[serde(default)]
    pub queries: Vec<QueryDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopologyDescription {
    pub name: String,
    pub kind: TopologyKind,
    pub sources: Vec<String>,
    pub stages: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueryDescription {
    pub name: String,
    pub stages: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DepotDescription {
    pub name: String,
    /// `hash-by-key`, `hash-by-field`, `random` or `disallow`.
    pub partitioner: String,
    pub global: bool,
    /// The field a `hash-by-field` depot hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PStateDescription {
    pub name: String,
    pub schema: PStateSchema,
}

impl ModuleDef {
    /// The module's description, with the engine version it was built with.
    pub fn describe(&self) -> ModuleDescription {
        ModuleDescription {
            name: self.name.clone(),
            engine_version: env!("CARGO_PKG_VERSION").to_string(),
            depots: self
                .depots
                .iter()
                .map(|d| DepotDescription {
                    name: d.name.clone(),
                    partitioner: format!("{:?}", d.partitioner),
                    global: d.global,
                    key_field: match &d.partitioner {
                        Partitioner::HashByField(f) => Some(f.clone()),
                        _ => None,
                    },
                })
                .collect(),
            pstates: self
                .pstates
                .iter()
                .map(|p| PStateDescription {
                    name: p.name.clone(),
                    schema: p.schema.clone(),
                })
                .collect(),
            topologies: self
                .topologies
                .iter()
                .map(|t| TopologyDescription {
                    name: t.name.clone(),
                    kind: t.kind,
                    sources: t.sources.iter().map(|&d| self.depots[d].name.clone()).collect(),
                    stages: t.stages.len(),
                })
                .collect(),
            queries: self
                .queries
                .iter()
                .map(|q| QueryDescription {
                    name: q.name.clone(),
                    stages: q.stages.len(),
                })
                .collect(),
        }
    }

    pub fn query(&self, name: &str) -> Result<(usize, &QueryDef)> {
        self.queries
            .iter()
            .enumerate()
            .find(|(_, q)| q.name == name)
            .ok_or_else(|| Error::Schema(format!("module {} has no query {name}", self.name)))
    }

    pub fn topology(&self, name: &str) -> Result<(usize, &TopologyDef)> {
        self.topologies
            .iter()
            .enumerate()
            .find(|(_, t)| t.name == name)
            .ok_or_else(|| Error::Schema(format!("module {} has no topology {name}", self.name)))
    }

    pub fn depot(&self, name: &str) -> Result<(usize, &DepotDef)> {
        self.depots
            .iter()
            .enumerate()
            .find(|(_, d)| d.name == name)
            .ok_or_else(|| Error::Schema(format!("module {} has no depot {name}", self.name)))
    }

    pub fn pstate(&self, name: &str) -> Result<(usize, &PStateDef)> {
        self.pstates
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == name)
            .ok_or_else(|| Error::Schema(format!("module {} has no PState {name}", self.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pstate::ValueSchema;
    use crate::value::Kind;

    fn counts() -> PStateSchema {
        PStateSchema::new(ValueSchema::Scalar(Kind::Str), ValueSchema::Scalar(Kind::Int))
    }

    #[test]
    fn describes_itself_as_json() {
        let def = ModuleBuilder::new("WordCountModule")
            .depot("*sentences", Partitioner::Random)
            .global_depot("*config")
            .pstate("$$wordCounts", counts())
            .build()
            .unwrap();
        let json = serde_json::to_value(def.describe()).unwrap();
        assert_eq!(json["name"], "WordCountModule");
        assert_eq!(json["depots"][0]["partitioner"], "random");
        assert_eq!(json["depots"][1]["global"], true);
        assert_eq!(
            json["pstates"][0]["schema"]["key"],
            serde_json::json!({"scalar": "string"})
        );
        let back: ModuleDescription = serde_json::from_value(json).unwrap();
        assert_eq!(back, def.describe());
    }

    #[test]
    fn names_are_checked() {
        let ok = ModuleBuilder::new("WordCountModule")
            .depot("*sentences", Partitioner::Random)
            .pstate("$$wordCounts", counts())
            .build()
            .unwrap();
        assert_eq!(ok.depot("*sentences").unwrap().0, 0);
        assert!(ok
            .depot("*nope")
            .unwrap_err()
            .to_string()
            .contains("has no depot *nope"));
        let err = |b: ModuleBuilder| b.build().unwrap_err().to_string();
        assert!(err(ModuleBuilder::new("M").depot("sentences", Partitioner::Random)).contains("must start with *"));
        assert!(err(ModuleBuilder::new("M").pstate("$counts", counts())).contains("must start with $$"));
        assert!(err(ModuleBuilder::new("M")
            .depot("*a", Partitioner::Random)
            .depot("*a", Partitioner::Disallow))
        .contains("declared twice"));
        assert!(err(ModuleBuilder::new("bad name")).contains("without spaces"));
    }
}
