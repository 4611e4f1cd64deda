//! WordCountModule end to end: counts equal a single-threaded reference,
//! topWords, proxies, restart, and bad input.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, seed, sentence, Rng};
use engine::cluster::{AckLevel, InProcessCluster, ProxyEvent};
use engine::pstate::Nav;
use engine::value::Value;
use engine::Error;
use rama_examples::{words, WordCountModule};

fn reference(sentences: &[String]) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for s in sentences {
        for w in words(s) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

fn top(counts: &BTreeMap<String, i64>, n: usize) -> Value {
    let mut all: Vec<_> = counts.iter().collect();
    all.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    Value::List(
        all.into_iter()
            .take(n)
            .map(|(w, c)| Value::list([Value::from(w.as_str()), Value::Int(*c)]))
            .collect(),
    )
}

fn check_counts(cluster: &InProcessCluster, expected: &BTreeMap<String, i64>) {
    let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
    for (w, c) in expected {
        assert_eq!(
            counts.select_one(&[Nav::key(w.as_str())]).unwrap(),
            Value::Int(*c),
            "count of {w:?}"
        );
    }
    assert_eq!(counts.select_one(&[Nav::key("absent")]).unwrap(), Value::Nil);
}

fn counts_match_reference(tasks: u32, threads: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(tasks, threads).unwrap();
    let mut rng = Rng::new(seed());
    let sentences: Vec<String> = (0..1200).map(|_| sentence(&mut rng)).collect();
    let depot = cluster.depot("WordCountModule", "*sentences").unwrap();
    // Three client threads: sync Ack appends, and async ones with many in
    // flight.
    std::thread::scope(|s| {
        for (c, chunk) in sentences.chunks(400).enumerate() {
            let depot = depot.clone();
            s.spawn(move || {
                if c == 2 {
                    let pending: Vec<_> = chunk
                        .iter()
                        .map(|t| depot.append_async(&Value::from(t.as_str()), AckLevel::Ack).unwrap())
                        .collect();
                    for p in pending {
                        futures_lite::future::block_on(p).unwrap();
                    }
                } else {
                    for t in chunk {
                        let r = depot.append(&Value::from(t.as_str()), AckLevel::Ack).unwrap();
                        assert!(r.offset.is_some());
                    }
                }
            });
        }
    });
    // Ack means processed: no waiting needed.
    let expected = reference(&sentences);
    check_counts(&cluster, &expected);
    // Many selects and queries started before any is awaited (more than a
    // task thread's request channel holds, so some are sent only when
    // polled), answered in any order of awaiting.
    let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
    let words: Vec<&String> = expected.keys().cycle().take(20_000).collect();
    let selects: Vec<_> = words
        .iter()
        .map(|w| counts.select_future(None, vec![Nav::key(w.as_str())]))
        .collect();
    let queries: Vec<_> = (0..64)
        .map(|_| {
            cluster
                .query("WordCountModule", "topWords")
                .unwrap()
                .invoke_future(&Value::Int(3))
        })
        .collect();
    for (w, f) in words.iter().zip(selects).rev() {
        assert_eq!(
            futures_lite::future::block_on(f).unwrap(),
            [Value::Int(expected[*w])],
            "{w}"
        );
    }
    for q in queries {
        assert_eq!(futures_lite::future::block_on(q).unwrap(), top(&expected, 3));
    }
    let top_words = cluster.query("WordCountModule", "topWords").unwrap();
    assert_eq!(top_words.invoke(&Value::Int(5)).unwrap(), top(&expected, 5));
    assert_eq!(top_words.invoke(&Value::Int(1000)).unwrap(), top(&expected, 1000));
    cluster.shutdown().unwrap();
}

#[test]
fn counts_match_reference_8_tasks_4_threads() {
    counts_match_reference(8, 4);
}

#[test]
fn counts_match_reference_1_task_1_thread() {
    counts_match_reference(1, 1);
}

#[test]
fn proxy_follows_every_update() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(8, 2).unwrap();
    let depot = cluster.depot("WordCountModule", "*sentences").unwrap();
    let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
    depot.append(&Value::from("the cat"), AckLevel::Ack).unwrap();
    let mut the = counts.proxy(&[Nav::key("the")]).unwrap();
    let mut dog = counts.proxy(&[Nav::key("dog")]).unwrap();
    assert_eq!(the.current(), &Value::Int(1));
    assert_eq!(dog.current(), &Value::Nil);
    let mut rng = Rng::new(seed());
    for _ in 0..100 {
        depot
            .append(&Value::from(common::sentence(&mut rng)), AckLevel::Ack)
            .unwrap();
        // The diffs of a processed record are sent before its ack.
        the.poll().unwrap();
        dog.poll().unwrap();
        assert_eq!(the.current(), &counts.select_one(&[Nav::key("the")]).unwrap());
        assert_eq!(dog.current(), &counts.select_one(&[Nav::key("dog")]).unwrap());
    }
    cluster.shutdown().unwrap();
}

/// A proxy that does not read its events for more updates than its channel
/// holds is whole again once it reads them.
#[test]
fn proxy_that_fell_behind_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(2, 1).unwrap();
    let depot = cluster.depot("WordCountModule", "*sentences").unwrap();
    let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
    let mut proxy = counts.proxy(&[Nav::key("the")]).unwrap();
    // One batch per sync append, so one diff each: more than the channel
    // holds (1024 events).
    for _ in 0..1100 {
        depot.append(&Value::from("the end"), AckLevel::Ack).unwrap();
    }
    let events = proxy.poll().unwrap();
    assert!(events.contains(&ProxyEvent::Stale), "{} events, no Stale", events.len());
    assert_eq!(proxy.current(), &Value::Int(1100));
    // Later changes arrive as a whole-value resync, then diffs again.
    depot.append(&Value::from("the"), AckLevel::Ack).unwrap();
    let events = proxy.poll().unwrap();
    assert_eq!(events, vec![ProxyEvent::Resync(Value::Int(1101))]);
    depot.append(&Value::from("the"), AckLevel::Ack).unwrap();
    proxy.poll().unwrap();
    assert_eq!(proxy.current(), &Value::Int(1102));
    cluster.shutdown().unwrap();
}

#[test]
fn restart_resumes_the_stream_without_losing_or_repeating() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(seed());
    let sentences: Vec<String> = (0..600).map(|_| sentence(&mut rng)).collect();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(4, 2).unwrap();
    let depot = cluster.depot("WordCountModule", "*sentences").unwrap();
    // Durable, not yet processed: a shutdown right after leaves work for
    // the next launch.
    for s in &sentences[..300] {
        depot.append(&Value::from(s.as_str()), AckLevel::AppendAck).unwrap();
    }
    cluster.shutdown().unwrap();

    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(4, 2).unwrap();
    let depot = cluster.depot("WordCountModule", "*sentences").unwrap();
    for s in &sentences[300..] {
        depot.append(&Value::from(s.as_str()), AckLevel::Ack).unwrap();
    }
    let expected = reference(&sentences);
    let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
    eventually(
        "the first 300 sentences to be processed",
        Duration::from_secs(60),
        || {
            expected
                .iter()
                .all(|(w, c)| counts.select_one(&[Nav::key(w.as_str())]).unwrap() == Value::Int(*c))
        },
    );
    check_counts(&cluster, &expected);
    // The depot kept every record.
    let total: usize = (0..4)
        .map(|t| depot.read(t, 0, u64::MAX, usize::MAX).unwrap().len())
        .sum();
    assert!(total >= 300, "depot records after restart: {total}");
    cluster.shutdown().unwrap();
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    let err = cluster.launch_module::<WordCountModule>(6, 2).unwrap_err().to_string();
    assert!(err.contains("power of two"), "{err}");
    let err = cluster.launch_module::<WordCountModule>(2, 4).unwrap_err().to_string();
    assert!(err.contains("thread"), "{err}");
    cluster.launch_module::<WordCountModule>(4, 2).unwrap();
    let err = cluster.launch_module::<WordCountModule>(4, 2).unwrap_err().to_string();
    assert!(err.contains("already running"), "{err}");
    for (got, want) in [
        (cluster.depot("Nope", "*sentences").unwrap_err(), "no module named Nope"),
        (
            cluster.depot("WordCountModule", "*nope").unwrap_err(),
            "has no depot *nope",
        ),
        (
            cluster.pstate("WordCountModule", "$$nope").unwrap_err(),
            "has no PState $$nope",
        ),
        (
            cluster.query("WordCountModule", "nope").unwrap_err(),
            "has no query nope",
        ),
    ] {
        assert!(got.to_string().contains(want), "{got} should say {want}");
    }
    let depot = cluster.depot("WordCountModule", "*sentences").unwrap();
    let huge = Value::from("x".repeat(2 << 20));
    assert!(matches!(
        depot.append(&huge, AckLevel::Ack).unwrap_err(),
        Error::LimitExceeded { .. }
    ));
    // A record the topology cannot process is durable but reported.
    let err = depot.append(&Value::Int(7), AckLevel::Ack).unwrap_err().to_string();
    assert!(err.contains("a sentence must be a string"), "{err}");
    let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
    let err = counts.select(&[Nav::key(5)]).unwrap_err().to_string();
    assert!(err.contains("string"), "{err}");
    let err = counts.select(&[Nav::All]).unwrap_err().to_string();
    assert!(err.contains("must start with a key"), "{err}");
    let err = cluster
        .query("WordCountModule", "topWords")
        .unwrap()
        .invoke(&Value::from("ten"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("topWords takes the number of words"), "{err}");
    // Nothing of the refused input was applied.
    assert_eq!(counts.select_one(&[Nav::key("x")]).unwrap(), Value::Nil);
    cluster.shutdown().unwrap();
}

#[test]
fn destroy_removes_the_module_and_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(2, 1).unwrap();
    let depot = cluster.depot("WordCountModule", "*sentences").unwrap();
    depot.append(&Value::from("one two"), AckLevel::Ack).unwrap();
    assert!(dir.path().join("WordCountModule").exists());
    cluster.destroy("WordCountModule").unwrap();
    assert!(!dir.path().join("WordCountModule").exists());
    // Old clients fail cleanly; a relaunch starts empty.
    assert!(depot.append(&Value::from("three"), AckLevel::Ack).is_err());
    cluster.launch_module::<WordCountModule>(2, 1).unwrap();
    let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
    assert_eq!(counts.select_one(&[Nav::key("one")]).unwrap(), Value::Nil);
    let err = cluster.destroy("Nope").unwrap_err().to_string();
    assert!(err.contains("no module named Nope"), "{err}");
    cluster.shutdown().unwrap();
}

/// Appends racing a shutdown: an append that succeeded was counted; one
/// that failed left nothing behind (it was refused before it was written),
/// so after a restart the counts are exactly the acknowledged words.
#[test]
fn appends_racing_shutdown_are_answered_truthfully() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(4, 2).unwrap();
    let depot = cluster.depot("WordCountModule", "*sentences").unwrap();
    let clients: Vec<_> = (0..3)
        .map(|c| {
            let depot = depot.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0.. {
                    let word = format!("w{c}x{i}");
                    match depot.append(&Value::from(word.as_str()), AckLevel::Ack) {
                        Ok(_) => acked.push(word),
                        Err(_) => return (acked, i),
                    }
                }
                unreachable!()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    cluster.shutdown().unwrap();
    let results: Vec<(Vec<String>, usize)> = clients.into_iter().map(|h| h.join().unwrap()).collect();

    let mut cluster = InProcessCluster::new(dir.path());
    cluster.launch_module::<WordCountModule>(4, 2).unwrap();
    let counts = cluster.pstate("WordCountModule", "$$wordCounts").unwrap();
    for (c, (acked, tried)) in results.iter().enumerate() {
        assert!(!acked.is_empty(), "client {c} appended nothing before the shutdown");
        for i in 0..=*tried {
            let word = format!("w{c}x{i}");
            let want = if acked.contains(&word) {
                Value::Int(1)
            } else {
                Value::Nil
            };
            assert_eq!(counts.select_one(&[Nav::key(word.as_str())]).unwrap(), want, "{word}");
        }
    }
    cluster.shutdown().unwrap();
}
