use engine::module::{fail, stage, Module, ModuleBuilder, ModuleDef};
use engine::pstate::{Nav, Op, PStateSchema, ValueSchema};
use engine::value::Kind;
use engine::Result;

use crate::{by_field, field};

/// A key-value store fed through a depot: the module of the benchmark
/// harness's generic workload. Records `{key: string, value: bytes}` go to
/// `*records` (partitioned by key); stream topology `store` sets
/// `$$kv[key] = value` on the key's task.
#[derive(Debug)]
pub struct KvModule;

impl Module for KvModule {
    fn define() -> Result<ModuleDef> {
        ModuleBuilder::new("KvModule")
            .depot("*records", by_field("key"))
            .pstate(
                "$$kv",
                PStateSchema::new(ValueSchema::Scalar(Kind::Str), ValueSchema::Scalar(Kind::Bytes)),
            )
            .stream(
                "store",
                ["*records"],
                vec![stage(|ctx, record| {
                    let key = field(&record, "key")?.clone();
                    if key.as_str().is_none() {
                        return Err(fail(format!("a record's key must be a string, got {key:?}")));
                    }
                    let value = field(&record, "value")?.clone();
                    ctx.transform("$$kv", &[Nav::Key(key)], Op::Set(value))
                })],
            )
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::cluster::{AckLevel, InProcessCluster};
    use engine::value::Value;

    #[test]
    fn stores_the_last_value_of_each_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = InProcessCluster::new(dir.path());
        cluster.launch_module::<KvModule>(4, 2).unwrap();
        let depot = cluster.depot("KvModule", "*records").unwrap();
        for (k, v) in [("a", 1u8), ("b", 2), ("a", 3)] {
            let r = Value::map([("key", Value::from(k)), ("value", Value::Bytes(vec![v; 8]))]);
            depot.append(&r, AckLevel::Ack).unwrap();
        }
        let kv = cluster.pstate("KvModule", "$$kv").unwrap();
        assert_eq!(kv.select_one(&[Nav::key("a")]).unwrap(), Value::Bytes(vec![3; 8]));
        assert_eq!(kv.select_one(&[Nav::key("b")]).unwrap(), Value::Bytes(vec![2; 8]));
        let bad = Value::map([("key", Value::Int(1)), ("value", Value::Bytes(vec![]))]);
        assert!(depot.append(&bad, AckLevel::Ack).is_err());
        cluster.shutdown().unwrap();
    }
}
