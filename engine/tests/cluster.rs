//! The in-process cluster: depots partitioned over tasks on task threads,
//! client routing, ack levels, reads, restarts and bad input.

use std::collections::BTreeMap;

use engine::cluster::{AckLevel, InProcessCluster};
use engine::module::{ModuleBuilder, ModuleDef, Partitioner};
use engine::pstate::{Nav, PStateSchema, ValueSchema};
use engine::runtime::partition::task_for_key;
use engine::value::{Kind, Value};

fn module() -> ModuleDef {
    ModuleBuilder::new("EventsModule")
        .depot(
            "*events",
            Partitioner::hash_by(|r| {
                r.as_map()
                    .and_then(|m| m.get(&Value::from("user")))
                    .cloned()
                    .unwrap_or(Value::Nil)
            }),
        )
        .depot("*sentences", Partitioner::Random)
        .global_depot("*config")
        .depot("*internal", Partitioner::Disallow)
        .pstate(
            "$$counts",
            PStateSchema::new(ValueSchema::Scalar(Kind::Str), ValueSchema::Scalar(Kind::Int)),
        )
        .build()
        .unwrap()
}

fn event(user: &str, n: i64) -> Value {
    Value::map([("user", Value::from(user)), ("n", Value::Int(n))])
}

/// Reads a whole partition.
fn read_all(cluster: &InProcessCluster, depot: &str, task: u32) -> Vec<(u64, Value)> {
    let client = cluster.depot("EventsModule", depot).unwrap();
    let mut out = Vec::new();
    loop {
        let next = out.last().map_or(0, |(o, _): &(u64, Value)| o + 1);
        let got = client.read(task, next, u64::MAX, 64 << 10).unwrap();
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

fn depots_route_and_persist(tasks: u32, threads: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch(module(), tasks, threads).unwrap();
    let events = cluster.depot("EventsModule", "*events").unwrap();
    // Four client threads append concurrently.
    let users = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"];
    let handles: Vec<_> = (0..4)
        .map(|c| {
            let events = events.clone();
            std::thread::spawn(move || {
                (0..100)
                    .map(|i| {
                        let user = users[(c * 100 + i) % users.len()];
                        let record = event(user, (c * 1000 + i) as i64);
                        let r = events.append(&record, AckLevel::AppendAck).unwrap();
                        (r.task, r.offset.expect("AppendAck returns the offset"), record)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let acked: Vec<(u32, u64, Value)> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    for (task, _, record) in &acked {
        let user = record.as_map().unwrap()[&Value::from("user")].clone();
        assert_eq!(
            *task,
            task_for_key(&user, tasks),
            "hash partitioning by the record's key"
        );
    }
    let mut by_task: BTreeMap<u32, Vec<(u64, Value)>> = BTreeMap::new();
    for t in 0..tasks {
        by_task.insert(t, read_all(&cluster, "*events", t));
    }
    for (task, offset, record) in &acked {
        let partition = &by_task[task];
        assert_eq!(
            &partition[*offset as usize],
            &(*offset, record.clone()),
            "acknowledged record is readable"
        );
    }
    assert_eq!(by_task.values().map(Vec::len).sum::<usize>(), 400);

    // Random depots spread round-robin; global depots have one partition.
    let sentences = cluster.depot("EventsModule", "*sentences").unwrap();
    for i in 0..tasks * 3 {
        sentences.append(&Value::from(format!("s{i}")), AckLevel::Ack).unwrap();
    }
    for t in 0..tasks {
        assert_eq!(read_all(&cluster, "*sentences", t).len(), 3, "task {t} takes its share");
    }
    let config = cluster.depot("EventsModule", "*config").unwrap();
    assert_eq!(config.append(&Value::from("v1"), AckLevel::AppendAck).unwrap().task, 0);
    if tasks > 1 {
        let err = config.read(1, 0, 10, 100).unwrap_err().to_string();
        assert!(err.contains("no partition 1"), "{err}");
    }

    // Fire-and-forget appends become visible without an ack.
    let r = events.append(&event("zed", 1), AckLevel::None).unwrap();
    let task = r.task;
    assert_eq!(r.offset, None);
    let before = by_task[&task].len();
    let mut seen = 0;
    for _ in 0..200 {
        seen = read_all(&cluster, "*events", task).len();
        if seen > before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(seen, before + 1, "the unacknowledged append landed");

    // A restart over the same directory finds everything again.
    cluster.shutdown().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch(module(), tasks, threads).unwrap();
    for t in 0..tasks {
        let mut expected = by_task[&t].clone();
        if t == task {
            expected.push((before as u64, event("zed", 1)));
        }
        assert_eq!(
            read_all(&cluster, "*events", t),
            expected,
            "partition {t} after restart"
        );
    }
    // PState reads route by the first key; nothing wrote $$counts yet.
    let counts = cluster.pstate("EventsModule", "$$counts").unwrap();
    assert_eq!(counts.select_one(&[Nav::key("alice")]).unwrap(), Value::Nil);
    cluster.shutdown().unwrap();
}

#[test]
fn depots_route_and_persist_8_tasks_4_threads() {
    depots_route_and_persist(8, 4);
}

#[test]
fn depots_route_and_persist_1_task_1_thread() {
    depots_route_and_persist(1, 1);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    let err = cluster.launch(module(), 6, 2).unwrap_err().to_string();
    assert!(err.contains("power of two"), "{err}");
    let err = cluster.launch(module(), 4, 8).unwrap_err().to_string();
    assert!(err.contains("threads"), "{err}");
    cluster.launch(module(), 4, 2).unwrap();
    let err = cluster.launch(module(), 4, 2).unwrap_err().to_string();
    assert!(err.contains("already running"), "{err}");
    let err = cluster.depot("Nope", "*events").unwrap_err().to_string();
    assert!(err.contains("no module named Nope"), "{err}");
    let err = cluster.depot("EventsModule", "*nope").unwrap_err().to_string();
    assert!(err.contains("has no depot *nope"), "{err}");
    let err = cluster.pstate("EventsModule", "$$nope").unwrap_err().to_string();
    assert!(err.contains("has no PState $$nope"), "{err}");
    let internal = cluster.depot("EventsModule", "*internal").unwrap();
    let err = internal
        .append(&Value::from("x"), AckLevel::Ack)
        .unwrap_err()
        .to_string();
    assert!(err.contains("disallow"), "{err}");
    let events = cluster.depot("EventsModule", "*events").unwrap();
    let huge = Value::map([("user", Value::from("a")), ("blob", Value::Bytes(vec![0; 2 << 20]))]);
    let err = events.append(&huge, AckLevel::AppendAck).unwrap_err().to_string();
    assert!(err.contains("record_bytes_max"), "{err}");
    assert!(
        read_all_tasks_empty(&cluster, 4),
        "nothing was appended by the refused calls"
    );
    let counts = cluster.pstate("EventsModule", "$$counts").unwrap();
    let err = counts.select(&[Nav::All]).unwrap_err().to_string();
    assert!(err.contains("must start with a key"), "{err}");
    let err = counts.select(&[Nav::key(5)]).unwrap_err().to_string();
    assert!(err.contains("string"), "{err}");
    cluster.shutdown().unwrap();
}

fn read_all_tasks_empty(cluster: &InProcessCluster, tasks: u32) -> bool {
    (0..tasks).all(|t| read_all(cluster, "*events", t).is_empty())
}

/// Version `v` of a module whose later versions add a depot and a PState
/// *before* the first ones: stored data must stay with its objects
/// (catalog ids, never positions).
fn evolving(v: u32) -> ModuleDef {
    use engine::module::stage;
    use engine::pstate::Op;
    let schema = || PStateSchema::new(ValueSchema::Scalar(Kind::Str), ValueSchema::Scalar(Kind::Int));
    let mut b = ModuleBuilder::new("Evolving");
    if v >= 2 {
        b = b.depot("*added", Partitioner::Random).pstate("$$added", schema());
    }
    b = b
        .depot("*words", Partitioner::hash_by(|r| r.clone()))
        .pstate("$$counts", schema());
    b.stream(
        "count",
        ["*words"],
        vec![stage(|ctx, word| {
            ctx.transform(
                "$$counts",
                &[Nav::Key(word)],
                Op::update(|n| Value::Int(n.as_int().unwrap_or(0) + 1)),
            )
        })],
    )
    .build()
    .unwrap()
}

#[test]
fn stored_data_follows_catalog_ids_across_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch(evolving(1), 4, 2).unwrap();
    let words = cluster.depot("Evolving", "*words").unwrap();
    for w in ["a", "b", "a"] {
        words.append(&Value::from(w), AckLevel::Ack).unwrap();
    }
    cluster.shutdown().unwrap();
    // Each task group's directory has its catalog.
    for tg in 0..2 {
        let catalog = std::fs::read_to_string(dir.path().join(format!("Evolving/tg-{tg}/CATALOG"))).unwrap();
        assert!(
            catalog.contains("depot 0 *words\n") && catalog.contains("pstate 0 $$counts\n"),
            "{catalog}"
        );
    }

    // The next definition puts a new depot and PState first.
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch(evolving(2), 4, 2).unwrap();
    let counts = cluster.pstate("Evolving", "$$counts").unwrap();
    assert_eq!(counts.select_one(&[Nav::key("a")]).unwrap(), Value::Int(2));
    assert_eq!(counts.select_one(&[Nav::key("b")]).unwrap(), Value::Int(1));
    let added = cluster.pstate("Evolving", "$$added").unwrap();
    assert_eq!(
        added.select_one(&[Nav::key("a")]).unwrap(),
        Value::Nil,
        "a new PState starts empty"
    );
    // The stream consumer resumed from its offsets (nothing counted twice),
    // and the old partitions are read by the depot's own id.
    let words = cluster.depot("Evolving", "*words").unwrap();
    words.append(&Value::from("b"), AckLevel::Ack).unwrap();
    assert_eq!(counts.select_one(&[Nav::key("b")]).unwrap(), Value::Int(2));
    assert_eq!(counts.select_one(&[Nav::key("a")]).unwrap(), Value::Int(2));
    let total: usize = (0..4).map(|t| words.read(t, 0, u64::MAX, 1 << 20).unwrap().len()).sum();
    assert_eq!(total, 4);
    cluster.shutdown().unwrap();
    let catalog = std::fs::read_to_string(dir.path().join("Evolving/tg-0/CATALOG")).unwrap();
    assert!(
        catalog.contains("depot 1 *added\n") && catalog.contains("pstate 1 $$added\n"),
        "{catalog}"
    );

    // A damaged catalog refuses the start and names the file.
    let path = dir.path().join("Evolving/tg-1/CATALOG");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("depot 1", "depot 9")).unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    let err = cluster.launch(evolving(2), 4, 2).unwrap_err().to_string();
    assert!(err.contains("tg-1/CATALOG") && err.contains("checksum"), "{err}");

    // Data in the layout of an earlier release is refused, not ignored.
    let old = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(old.path().join("Evolving/thread-0")).unwrap();
    let mut cluster = InProcessCluster::new(old.path());
    let err = cluster.launch(evolving(1), 4, 2).unwrap_err().to_string();
    assert!(err.contains("thread-0") && err.contains("earlier release"), "{err}");
}
