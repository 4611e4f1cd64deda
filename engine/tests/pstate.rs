//! PStates: schemas, paths, subindexing, atomic transactions, reopen.
//! The subindexed layout is checked against the in-memory semantics of the
//! same paths on a plain value (the model).

use std::ops::Bound;

use engine::executor::ExecutorConfig;
use engine::lsm::{LsmConfig, Store};
use engine::pstate::{Nav, Op, PState, PStateSchema, Tx, ValueSchema};
use engine::value::{Kind, Value};
use engine::Error;

mod common;
use common::Rng;

fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    ExecutorConfig::default().block_on(fut).expect("executor starts")
}

fn small_store() -> LsmConfig {
    LsmConfig {
        memtable_bytes_max: 16 << 10,
        ..LsmConfig::default()
    }
}

fn word_counts() -> PState {
    PState::new(
        "$$wordCounts",
        3,
        0,
        PStateSchema::new(ValueSchema::Scalar(Kind::Str), ValueSchema::Scalar(Kind::Int)),
    )
    .unwrap()
}

fn timelines() -> PState {
    PState::new(
        "$$timelines",
        3,
        1,
        PStateSchema::new(
            ValueSchema::Scalar(Kind::Str),
            ValueSchema::subindexed_map(ValueSchema::Scalar(Kind::Int), ValueSchema::Scalar(Kind::Str)),
        ),
    )
    .unwrap()
}

fn incr() -> Op {
    Op::update(|v| Value::Int(v.as_int().unwrap_or(0) + 1))
}

#[test]
fn counts_with_nil_to_value_and_update() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (store, _) = Store::open(dir.path(), small_store()).await.unwrap();
        let p = word_counts();
        let mut tx = Tx::new(&store);
        for w in ["a", "b", "a", "c", "a"] {
            p.transform(&mut tx, &[Nav::key(w), Nav::NilToValue(Value::Int(0))], incr())
                .unwrap();
        }
        // Read-your-writes inside the transaction, nothing visible outside yet.
        assert_eq!(p.select_one(&tx, &[Nav::key("a")]).unwrap(), Value::Int(3));
        assert_eq!(p.select_one(&store, &[Nav::key("a")]).unwrap(), Value::Nil);
        tx.commit().await.unwrap();
        assert_eq!(p.select_one(&store, &[Nav::key("a")]).unwrap(), Value::Int(3));
        assert_eq!(
            p.select(&store, &[Nav::All]).unwrap(),
            vec![
                Value::list(["a".into(), Value::Int(3)]),
                Value::list(["b".into(), Value::Int(1)]),
                Value::list(["c".into(), Value::Int(1)])
            ]
        );
        let mut tx = Tx::new(&store);
        p.transform(&mut tx, &[Nav::key("b")], Op::Remove).unwrap();
        tx.commit().await.unwrap();
        assert_eq!(p.select_one(&store, &[Nav::Size]).unwrap(), Value::Int(2));
        store.close().await.unwrap();
    });
    run(async {
        let (store, _) = Store::open(dir.path(), small_store()).await.unwrap();
        let p = word_counts();
        assert_eq!(p.select_one(&store, &[Nav::key("a")]).unwrap(), Value::Int(3));
        assert_eq!(p.select_one(&store, &[Nav::key("b")]).unwrap(), Value::Nil);
    });
}

#[test]
fn subindexed_timeline_ranges_and_size() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (store, _) = Store::open(dir.path(), small_store()).await.unwrap();
        let p = timelines();
        let mut tx = Tx::new(&store);
        for id in 0..100i64 {
            let user = if id % 2 == 0 { "alice" } else { "bob" };
            p.transform(
                &mut tx,
                &[Nav::key(user), Nav::key(id)],
                Op::Set(format!("post {id}").into()),
            )
            .unwrap();
        }
        tx.commit().await.unwrap();
        store.flush().await.unwrap();
        assert_eq!(
            p.select_one(&store, &[Nav::key("alice"), Nav::Size]).unwrap(),
            Value::Int(50)
        );
        assert_eq!(
            p.select_one(&store, &[Nav::key("carol"), Nav::Size]).unwrap(),
            Value::Int(0)
        );
        // The newest three posts of bob.
        let newest = p.select_one(&store, &[Nav::key("bob"), Nav::last(3)]).unwrap();
        assert_eq!(newest, Value::map([(99, "post 99"), (97, "post 97"), (95, "post 95")]));
        // An inclusive/exclusive range.
        let mid = p
            .select_one(
                &store,
                &[
                    Nav::key("alice"),
                    Nav::range(Bound::Included(Value::Int(10)), Bound::Excluded(Value::Int(16))),
                ],
            )
            .unwrap();
        assert_eq!(mid, Value::map([(10, "post 10"), (12, "post 12"), (14, "post 14")]));
        // Remove a range; the size follows without a scan.
        let mut tx = Tx::new(&store);
        p.transform(
            &mut tx,
            &[
                Nav::key("alice"),
                Nav::range(Bound::Unbounded, Bound::Excluded(Value::Int(20))),
            ],
            Op::Remove,
        )
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            p.select_one(&store, &[Nav::key("alice"), Nav::Size]).unwrap(),
            Value::Int(40)
        );
        assert_eq!(
            p.select_one(&store, &[Nav::key("alice"), Nav::key(4)]).unwrap(),
            Value::Nil
        );
    });
}

#[test]
fn bad_paths_and_values_are_typed_errors_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (store, _) = Store::open(dir.path(), small_store()).await.unwrap();
        let p = word_counts();
        let mut tx = Tx::new(&store);
        let err = p
            .transform(&mut tx, &[Nav::key(5)], Op::Set(Value::Int(1)))
            .unwrap_err();
        assert!(
            matches!(err, Error::Schema(ref m) if m.contains("int") && m.contains("string")),
            "{err}"
        );
        let err = p
            .transform(&mut tx, &[Nav::key("a")], Op::Set("not a number".into()))
            .unwrap_err();
        assert!(
            matches!(err, Error::Schema(ref m) if m.contains("$$wordCounts")),
            "{err}"
        );
        let err = p.select(&store, &[Nav::key("a"), Nav::key("b")]).unwrap_err();
        assert!(
            matches!(err, Error::Schema(ref m) if m.contains("cannot navigate")),
            "{err}"
        );
        let err = p.transform(&mut tx, &[Nav::All], Op::Remove).unwrap_err();
        assert!(
            matches!(err, Error::Schema(ref m) if m.contains("must start with a key")),
            "{err}"
        );
        assert!(tx.is_empty(), "failed transforms write nothing");
        let nested = PState::new(
            "$$bad",
            0,
            2,
            PStateSchema::new(
                ValueSchema::Any,
                ValueSchema::map(ValueSchema::Any, ValueSchema::subindexed_set(ValueSchema::Any)),
            ),
        );
        assert!(matches!(nested, Err(Error::Schema(ref m)) if m.contains("subindexed")));
        // An oversized value is refused at commit, and nothing is applied.
        let mut tx = Tx::new(&store);
        let any = PState::new("$$any", 0, 3, PStateSchema::new(ValueSchema::Any, ValueSchema::Any)).unwrap();
        any.transform(&mut tx, &[Nav::key("small")], Op::Set(1.into())).unwrap();
        any.transform(&mut tx, &[Nav::key("big")], Op::Set(Value::Bytes(vec![0; 2 << 20])))
            .unwrap();
        let err = tx.commit().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::LimitExceeded {
                    limit: "value_bytes_max",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(any.select_one(&store, &[Nav::key("small")]).unwrap(), Value::Nil);
    });
}

fn random_bound(rng: &mut Rng) -> Bound<Value> {
    match rng.below(3) {
        0 => Bound::Unbounded,
        1 => Bound::Included(Value::Int(rng.below(30) as i64)),
        _ => Bound::Excluded(Value::Int(rng.below(30) as i64)),
    }
}

fn random_sub_nav(rng: &mut Rng) -> Nav {
    match rng.below(6) {
        0..=2 => Nav::key(rng.below(30) as i64),
        3 => Nav::Range {
            lower: random_bound(rng),
            upper: random_bound(rng),
            reverse: rng.below(2) == 0,
            limit: if rng.below(2) == 0 {
                Some(1 + rng.below(5) as usize)
            } else {
                None
            },
        },
        4 => Nav::MapVals,
        _ => Nav::NilToValue(Value::map([(0, 0)])),
    }
}

/// Subindexed and whole-value PStates give the same answers as the
/// in-memory path semantics, across flushes and a reopen.
#[test]
fn subindexed_layout_matches_in_memory_semantics() {
    let seed = std::env::var("PSTATE_MODEL_SEED")
        .ok()
        .map(|s| s.parse().expect("PSTATE_MODEL_SEED is a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("PSTATE_MODEL_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (store, _) = Store::open(dir.path(), small_store()).await.unwrap();
        let value_schema = |sub: bool| ValueSchema::Map {
            key: Box::new(ValueSchema::Scalar(Kind::Int)),
            value: Box::new(ValueSchema::Scalar(Kind::Int)),
            subindexed: sub,
        };
        let sub = PState::new("$$sub", 1, 0, PStateSchema::new(ValueSchema::Any, value_schema(true))).unwrap();
        let whole = PState::new(
            "$$whole",
            1,
            1,
            PStateSchema::new(ValueSchema::Any, value_schema(false)),
        )
        .unwrap();
        let mut rng = Rng::new(seed);
        for step in 0..1500 {
            let top = Nav::key(rng.below(4) as i64);
            let mut path = vec![top];
            for _ in 0..rng.below(2) + 1 {
                path.push(random_sub_nav(&mut rng));
            }
            if rng.below(3) > 0 {
                // A write: the value at the end of the path is an int or a map.
                let at_int = path.iter().skip(1).any(|n| matches!(n, Nav::Key(_) | Nav::MapVals));
                let op = match rng.below(3) {
                    0 => Op::Remove,
                    1 if at_int => Op::Set(Value::Int(rng.below(1000) as i64)),
                    1 => Op::Set(Value::map([(rng.below(30) as i64, rng.below(9) as i64)])),
                    _ if at_int => Op::update(|v| Value::Int(v.as_int().unwrap_or(0) * 2 + 1)),
                    _ => Op::Remove,
                };
                let mut tx_a = Tx::new(&store);
                let a = sub.transform(&mut tx_a, &path, op.clone());
                let b = whole.transform(&mut tx_a, &path, op);
                assert_eq!(a.is_ok(), b.is_ok(), "step {step}: {path:?}: {a:?} vs {b:?}");
                if a.is_ok() {
                    tx_a.commit().await.unwrap();
                }
            } else {
                let a = sub.select(&store, &path);
                let b = whole.select(&store, &path);
                match (a, b) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "step {step}: select {path:?}"),
                    (a, b) => assert_eq!(a.is_ok(), b.is_ok(), "step {step}: {path:?}: {a:?} vs {b:?}"),
                }
                let size_path = [path[0].clone(), Nav::Size];
                assert_eq!(
                    sub.select(&store, &size_path).unwrap(),
                    whole.select(&store, &size_path).unwrap(),
                    "step {step}: size of {:?}",
                    path[0]
                );
            }
            if step % 500 == 499 {
                store.flush().await.unwrap();
            }
        }
        let all_sub = sub.select(&store, &[Nav::All]).unwrap();
        assert_eq!(all_sub, whole.select(&store, &[Nav::All]).unwrap());
        store.close().await.unwrap();
        let (store, _) = Store::open(dir.path(), small_store()).await.unwrap();
        assert_eq!(sub.select(&store, &[Nav::All]).unwrap(), all_sub);
    });
}

/// Regression: writing under a missing key always created a map, so adding
/// an element to an absent whole-value set failed the schema check, while a
/// subindexed set accepted the same write.
#[test]
fn writes_under_missing_values_create_the_schema_s_container() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (store, _) = Store::open(dir.path(), small_store()).await.unwrap();
        let set_of_ints = |sub: bool| ValueSchema::Set {
            element: Box::new(ValueSchema::Scalar(Kind::Int)),
            subindexed: sub,
        };
        let whole = PState::new("$$whole", 2, 0, PStateSchema::new(ValueSchema::Any, set_of_ints(false))).unwrap();
        let sub = PState::new("$$sub", 2, 1, PStateSchema::new(ValueSchema::Any, set_of_ints(true))).unwrap();
        let nested = PState::new(
            "$$nested",
            2,
            2,
            PStateSchema::new(ValueSchema::Any, ValueSchema::map(ValueSchema::Any, set_of_ints(false))),
        )
        .unwrap();
        let mut tx = Tx::new(&store);
        for p in [&whole, &sub] {
            p.transform(&mut tx, &[Nav::key("k"), Nav::key(5)], Op::Set(Value::Int(5)))
                .unwrap();
        }
        nested
            .transform(
                &mut tx,
                &[Nav::key("k"), Nav::key("inner"), Nav::key(7)],
                Op::Set(Value::Int(7)),
            )
            .unwrap();
        tx.commit().await.unwrap();
        for p in [&whole, &sub] {
            assert_eq!(
                p.select_one(&store, &[Nav::key("k")]).unwrap(),
                Value::set([5]),
                "{}",
                p.name()
            );
        }
        assert_eq!(
            nested.select_one(&store, &[Nav::key("k")]).unwrap(),
            Value::map([("inner", Value::set([7]))])
        );
    });
}
