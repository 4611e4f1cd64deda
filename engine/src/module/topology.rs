//! Topologies and queries as a module author writes them: a list of stages,
//! each a Rust closure run on one task with a [`StageCtx`].
//!
//! A stage reads and writes the PStates of the task it runs on and *emits*
//! values to the next stage with a destination ([`To`]). Emitting is the
//! relocation: the rest of the computation continues on the task the
//! destination picks (this one, the task of a key, every task, ...). A
//! query's stages may also emit to [`To::Origin`]: those values come back
//! to the task the query started on, where the query's aggregator combines
//! them into the result.

use std::fmt;
use std::sync::Arc;

use super::ModuleDef;
use crate::error::{Error, Result};
use crate::pstate::{KvRead, Nav, Op, PState, Tx};
use crate::runtime::partition::task_for_key;
use crate::value::Value;

/// One stage of a topology or query.
pub type StageFn = Arc<dyn for<'a, 's> Fn(&mut StageCtx<'a, 's>, Value) -> Result<()> + Send + Sync>;

/// Combines the values a query's stages emitted to [`To::Origin`] (in no
/// particular order) into the query's result; gets the query's arguments.
pub type AggregateFn = Arc<dyn Fn(&Value, Vec<Value>) -> Result<Value> + Send + Sync>;

/// Wraps a closure as a stage (the signature makes closures infer the
/// right lifetimes).
pub fn stage<F>(f: F) -> StageFn
where
    F: for<'a, 's> Fn(&mut StageCtx<'a, 's>, Value) -> Result<()> + Send + Sync + 'static,
{
    Arc::new(f)
}

/// The error a stage returns to fail the record (stream: retried, then
/// reported to the appender; microbatch: the attempt is retried; query:
/// the invocation fails).
pub fn fail(why: impl fmt::Display) -> Error {
    Error::Topology(why.to_string())
}

/// Where the next stage runs.
#[derive(Debug, Clone, PartialEq)]
pub enum To {
    /// The task owning this key (the task a PState keyed by it lives on).
    Hash(Value),
    /// Every task.
    All,
    /// Task 0.
    Global,
    /// Any task, spreading the load.
    Shuffle,
    /// This task.
    Local,
    /// Queries only: back to the task the query started on, as a value for
    /// the query's aggregator.
    Origin,
}

/// Stream or microbatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyKind {
    /// Each depot record as it arrives; at-least-once.
    Stream,
    /// Depot ranges in rounds committed atomically across tasks;
    /// exactly-once.
    Microbatch,
}

/// A stream or microbatch topology: stages fed by depots.
#[derive(Clone)]
pub struct TopologyDef {
    pub name: String,
    pub kind: TopologyKind,
    /// Depot indexes (into `ModuleDef::depots`) feeding stage 0.
    pub sources: Vec<usize>,
    pub stages: Vec<StageFn>,
}

impl fmt::Debug for TopologyDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopologyDef")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("sources", &self.sources)
            .field("stages", &self.stages.len())
            .finish()
    }
}

/// A query topology: stage 0 gets the arguments on the task the query
/// starts on; values emitted to [`To::Origin`] are aggregated there.
#[derive(Clone)]
pub struct QueryDef {
    pub name: String,
    pub stages: Vec<StageFn>,
    pub aggregate: AggregateFn,
}

impl fmt::Debug for QueryDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryDef")
            .field("name", &self.name)
            .field("stages", &self.stages.len())
            .finish()
    }
}

/// What runs a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Stream,
    Microbatch { id: u64, attempt: u32 },
    Query,
}

/// What stages produced while running one batch.
#[derive(Debug, Default)]
pub(crate) struct Outputs {
    /// (origin, destination, value)
    pub emits: Vec<(u64, To, Value)>,
    /// (origin, depot index, record)
    pub appends: Vec<(u64, usize, Value)>,
    /// (origin, value)
    pub ack_returns: Vec<(u64, Value)>,
}

/// What a stage sees: the PStates of its task, and ways to emit.
pub struct StageCtx<'a, 's> {
    pub(crate) def: &'a ModuleDef,
    pub(crate) task: u32,
    pub(crate) tasks: u32,
    /// This task's partitions, by PState index.
    pub(crate) pstates: &'a [PState],
    pub(crate) tx: &'a mut Tx<'s>,
    pub(crate) mode: Mode,
    /// The depot a stage-0 record came from.
    pub(crate) source: Option<&'a str>,
    pub(crate) origin: u64,
    pub(crate) out: &'a mut Outputs,
}

impl fmt::Debug for StageCtx<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageCtx")
            .field("module", &self.def.name)
            .field("task", &self.task)
            .field("mode", &self.mode)
            .finish()
    }
}

impl StageCtx<'_, '_> {
    /// The task this stage runs on.
    pub fn task(&self) -> u32 {
        self.task
    }

    /// The module's number of tasks.
    pub fn tasks(&self) -> u32 {
        self.tasks
    }

    /// The depot the record came from (stage 0 of a topology only).
    pub fn source(&self) -> Option<&str> {
        self.source
    }

    /// In a microbatch topology: the microbatch id and the attempt number
    /// (0 for the first attempt).
    pub fn microbatch(&self) -> Option<(u64, u32)> {
        match self.mode {
            Mode::Microbatch { id, attempt } => Some((id, attempt)),
            _ => None,
        }
    }

    fn pstate(&self, name: &str) -> Result<&PState> {
        let (i, _) = self.def.pstate(name)?;
        Ok(&self.pstates[i])
    }

    /// Every value `path` reaches in this task's partition of `pstate`,
    /// including this batch's own writes.
    pub fn select(&self, pstate: &str, path: &[Nav]) -> Result<Vec<Value>> {
        self.pstate(pstate)?.select(&*self.tx as &dyn KvRead, path)
    }

    /// The one value `path` reaches (nil when none).
    pub fn select_one(&self, pstate: &str, path: &[Nav]) -> Result<Value> {
        self.pstate(pstate)?.select_one(&*self.tx as &dyn KvRead, path)
    }

    /// Applies `op` where `path` leads. The path's first key must belong to
    /// this task: partition by that key before writing.
    pub fn transform(&mut self, pstate: &str, path: &[Nav], op: Op) -> Result<()> {
        if self.mode == Mode::Query {
            return Err(fail(format!("queries cannot write PStates (transform of {pstate})")));
        }
        if let Some(Nav::Key(k)) = path.first() {
            let owner = task_for_key(k, self.tasks);
            if owner != self.task {
                return Err(fail(format!(
                    "a write to {pstate} key {k:?} runs on task {} but the key belongs to task {owner}; \
                     emit with To::Hash(key) before writing",
                    self.task
                )));
            }
        }
        let (i, _) = self.def.pstate(pstate)?;
        self.pstates[i].transform(self.tx, path, op)
    }

    /// Sends `value` to the next stage, on the task(s) `to` picks.
    pub fn emit(&mut self, to: To, value: Value) {
        self.out.emits.push((self.origin, to, value));
    }

    /// Stream topologies: appends `record` to a depot of this module
    /// (partitioned by the depot's partitioner; random and disallow depots
    /// take it on this task). The batch completes only once the append is
    /// durable.
    pub fn append(&mut self, depot: &str, record: Value) -> Result<()> {
        match self.mode {
            Mode::Query => return Err(fail(format!("queries cannot append to depots (append to {depot})"))),
            Mode::Microbatch { .. } => {
                return Err(fail(format!(
                    "microbatch topologies cannot append to depots yet (append to {depot}): the append \
                     would repeat when an attempt is retried"
                )))
            }
            Mode::Stream => {}
        }
        let (i, _) = self.def.depot(depot)?;
        self.out.appends.push((self.origin, i, record));
        Ok(())
    }

    /// Stream topologies: a value returned to the client that appended the
    /// record with `AckLevel::Ack`.
    pub fn ack_return(&mut self, value: Value) {
        self.out.ack_returns.push((self.origin, value));
    }
}
