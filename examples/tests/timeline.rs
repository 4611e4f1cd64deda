//! TimelineModule end to end (fan-out to subindexed timelines, read with
//! range paths), a proxy on a whole subindexed map, and at-least-once
//! stream processing under injected failures.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use common::{seed, Rng};
use engine::cluster::{AckLevel, InProcessCluster};
use engine::module::{stage, ModuleBuilder, Partitioner, To};
use engine::pstate::{Nav, Op, PStateSchema, ValueSchema};
use engine::value::{Kind, Value};
use rama_examples::TimelineModule;

const M: &str = "TimelineModule";

fn follow(follower: &str, followee: &str) -> Value {
    Value::map([("follower", follower), ("followee", followee)])
}

fn post(author: &str, id: i64) -> Value {
    Value::map([
        ("author", Value::from(author)),
        ("id", Value::Int(id)),
        ("text", Value::from(format!("post {id} by {author}"))),
    ])
}

fn timelines_match_reference(tasks: u32, threads: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<TimelineModule>(tasks, threads).unwrap();
    let mut rng = Rng::new(seed());
    let users: Vec<String> = (0..20).map(|i| format!("user{i}")).collect();
    let mut followers: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let follows = cluster.depot(M, "*follows").unwrap();
    for _ in 0..80 {
        let (a, b) = (&users[rng.below(20) as usize], &users[rng.below(20) as usize]);
        follows.append(&follow(a, b), AckLevel::Ack).unwrap();
        followers.entry(b).or_default().insert(a);
    }
    let mut timelines: BTreeMap<&str, BTreeMap<i64, Value>> = BTreeMap::new();
    let posts = cluster.depot(M, "*posts").unwrap();
    for id in 0..300 {
        let author = &users[rng.below(20) as usize];
        let p = post(author, id);
        posts.append(&p, AckLevel::Ack).unwrap();
        for f in followers.get(author.as_str()).into_iter().flatten() {
            timelines.entry(f).or_default().insert(id, p.clone());
        }
    }
    let pstate = cluster.pstate(M, "$$timelines").unwrap();
    for u in &users {
        let want = timelines.get(u.as_str()).cloned().unwrap_or_default();
        // The newest five, by a reverse range with a limit (a submap, so
        // its values come in id order).
        let newest = pstate
            .select(&[Nav::key(u.as_str()), Nav::last(5), Nav::MapVals])
            .unwrap();
        let mut want_newest: Vec<Value> = want.values().rev().take(5).cloned().collect();
        want_newest.reverse();
        assert_eq!(newest, want_newest, "newest posts of {u}");
        assert_eq!(
            pstate.select_one(&[Nav::key(u.as_str()), Nav::Size]).unwrap(),
            Value::Int(want.len() as i64),
            "timeline size of {u}"
        );
    }
    cluster.shutdown().unwrap();
}

#[test]
fn timelines_match_reference_8_tasks_4_threads() {
    timelines_match_reference(8, 4);
}

#[test]
fn timelines_match_reference_1_task_1_thread() {
    timelines_match_reference(1, 1);
}

#[test]
fn proxy_of_a_subindexed_map_follows_every_post() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<TimelineModule>(4, 2).unwrap();
    let follows = cluster.depot(M, "*follows").unwrap();
    follows.append(&follow("reader", "alice"), AckLevel::Ack).unwrap();
    follows.append(&follow("reader", "bob"), AckLevel::Ack).unwrap();
    let timelines = cluster.pstate(M, "$$timelines").unwrap();
    let mut proxy = timelines.proxy(&[Nav::key("reader")]).unwrap();
    assert_eq!(proxy.current(), &Value::Nil);
    let posts = cluster.depot(M, "*posts").unwrap();
    for id in 0..60 {
        posts
            .append(&post(if id % 2 == 0 { "alice" } else { "bob" }, id), AckLevel::Ack)
            .unwrap();
        let events = proxy.poll().unwrap();
        assert!(!events.is_empty(), "post {id} sent no diff");
        assert_eq!(proxy.current(), &timelines.select_one(&[Nav::key("reader")]).unwrap());
    }
    cluster.shutdown().unwrap();
}

/// Every append acknowledged with `Ack` has its effect; appends whose
/// processing keeps failing report an error, and records that fail a few
/// times succeed on retry.
#[test]
fn at_least_once_with_failing_records() {
    let def = ModuleBuilder::new("Seen")
        .depot("*items", Partitioner::Random)
        .pstate(
            "$$seen",
            PStateSchema::new(ValueSchema::Scalar(Kind::Int), ValueSchema::Scalar(Kind::Int)),
        )
        .stream(
            "mark",
            ["*items"],
            vec![
                stage(|ctx, item| {
                    ctx.emit(To::Hash(item.clone()), item);
                    Ok(())
                }),
                stage(|ctx, item| {
                    ctx.transform("$$seen", &[Nav::Key(item.clone())], Op::Set(Value::Int(1)))?;
                    ctx.ack_return(item);
                    Ok(())
                }),
            ],
        )
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    // Items divisible by 7 always fail in stage 1; items divisible by 5
    // fail their first two tries there.
    let tries: Arc<Mutex<HashMap<i64, u32>>> = Arc::default();
    {
        let tries = tries.clone();
        cluster.set_fault_hook(move |p| {
            let Some(i) = p.value.as_int().filter(|_| p.stage == 1) else {
                return false;
            };
            if i % 7 == 0 {
                return true;
            }
            if i % 5 == 0 {
                let mut t = tries.lock().unwrap();
                let n = t.entry(i).or_insert(0);
                *n += 1;
                return *n <= 2;
            }
            false
        });
    }
    cluster.launch(def, 4, 2).unwrap();
    let items = cluster.depot("Seen", "*items").unwrap();
    let seen = cluster.pstate("Seen", "$$seen").unwrap();
    let mut ok = 0;
    let mut failed = 0;
    for i in 0..200i64 {
        match items.append(&Value::Int(i), AckLevel::Ack) {
            Ok(r) => {
                assert_ne!(i % 7, 0, "item {i} should have failed");
                assert_eq!(r.ack_returns.get("mark"), Some(&Value::Int(i)));
                assert_eq!(seen.select_one(&[Nav::key(i)]).unwrap(), Value::Int(1), "item {i}");
                ok += 1;
            }
            Err(e) => {
                assert_eq!(i % 7, 0, "item {i} failed: {e}");
                let msg = e.to_string();
                assert!(msg.contains("fault injected") && msg.contains("retries"), "{msg}");
                assert_eq!(seen.select_one(&[Nav::key(i)]).unwrap(), Value::Nil, "item {i}");
                failed += 1;
            }
        }
    }
    assert_eq!((ok, failed), (171, 29));
    cluster.shutdown().unwrap();
}
