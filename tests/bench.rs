//! `rama bench`: a closed loop and an open loop on an in-process cluster,
//! the JSON result, and the runs it refuses.

mod common;

use common::{rama_in as rama, text};

#[test]
fn bench_measures_and_refuses_what_it_cannot_measure() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("result.json");
    let out = rama(
        dir.path(),
        &[
            "bench",
            "--inProcess",
            "--workload",
            "append",
            "--seconds",
            "1",
            "--clients",
            "2",
            "--inFlight",
            "32",
            "--keys",
            "1000",
            "--skew",
            "zipfian",
            "--recordBytes",
            "64",
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("latency: p50"), "{}", text(&out));
    assert!(text(&out).contains("µs of CPU per operation"), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert_eq!(r["workload"], "append");
    assert_eq!(r["mode"], "closed");
    assert_eq!(r["errors"], 0);
    assert!(r["ops"].as_u64().unwrap() > 0);
    assert!(r["processes"][0]["rssBytes"].as_u64().unwrap() > 0, "{r}");
    assert!(r["cpuUsPerOp"].as_f64().unwrap() > 0.0, "{r}");
    let p = |k: &str| r["latency"][k].as_f64().unwrap();
    assert!(
        p("p50_us") > 0.0 && p("p50_us") <= p("p99_us") && p("p99_us") <= p("max_us"),
        "{r}"
    );

    // Open loop at a rate it can send: about that many operations.
    let out = rama(
        dir.path(),
        &[
            "bench",
            "--inProcess",
            "--workload",
            "select",
            "--keys",
            "200",
            "--seconds",
            "1",
            "--rate",
            "200",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("open loop at 200 ops/s): 200 ops"),
        "{}",
        text(&out)
    );

    // The example modules' workloads, each loading what it needs first.
    for workload in ["bank", "timeline", "query", "range"] {
        let out = rama(
            dir.path(),
            &[
                "bench",
                "--inProcess",
                "--workload",
                workload,
                "--keys",
                "100",
                "--fanout",
                "3",
                "--seconds",
                "0.5",
                "--clients",
                "2",
                "--inFlight",
                "8",
            ],
        );
        assert!(out.status.success(), "{workload}: {}", text(&out));
        assert!(text(&out).contains(", 0 errors"), "{workload}: {}", text(&out));
    }

    // A mix of posts and timeline range reads: percentiles per operation.
    let mix_file = dir.path().join("mix.json");
    let out = rama(
        dir.path(),
        &[
            "bench",
            "--inProcess",
            "--mix",
            "post:1,range:3",
            "--keys",
            "100",
            "--fanout",
            "3",
            "--rangeLimit",
            "5",
            "--seconds",
            "0.5",
            "--clients",
            "2",
            "--inFlight",
            "8",
            "--out",
            mix_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("  range (weight 3): "), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&mix_file).unwrap()).unwrap();
    assert_eq!(r["workload"], "timeline", "{r}");
    let ops = r["operations"].as_array().unwrap();
    assert_eq!(ops.len(), 2, "{r}");
    assert_eq!(
        (ops[0]["op"].as_str(), ops[1]["op"].as_str()),
        (Some("post"), Some("range"))
    );
    let count = |i: usize| ops[i]["ops"].as_u64().unwrap();
    assert!(count(0) > 0 && count(1) > count(0), "{r}");
    assert_eq!(count(0) + count(1), r["ops"].as_u64().unwrap(), "{r}");
    assert!(ops[1]["latency"]["p99_us"].as_f64().unwrap() > 0.0, "{r}");

    // Without the cluster secret nothing is tried, and the fix is named.
    let out = rama(dir.path(), &["bench", "--conductor", "127.0.0.1:1", "--seconds", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("rama secret create"), "{}", text(&out));
    // A Conductor that does not answer is named.
    common::make_secret(dir.path());
    let out = rama(dir.path(), &["bench", "--conductor", "127.0.0.1:1", "--seconds", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cannot reach the Conductor at 127.0.0.1:1"),
        "{}",
        text(&out)
    );

    // Ctrl-C ends a run early: the cluster stops, its data is removed,
    // nothing is reported.
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_rama"))
        .current_dir(dir.path())
        .env_remove("RAMA_CONFIG")
        .args([
            "bench",
            "--inProcess",
            "--workload",
            "append",
            "--seconds",
            "120",
            "--dir",
        ])
        .arg(data.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::read_dir(data.path()).unwrap().count() == 0 {
        assert!(started.elapsed().as_secs() < 60, "the run made no data directory");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("interrupted"), "{}", text(&out));
    assert!(started.elapsed().as_secs() < 100, "the run did not stop early");
    assert_eq!(
        std::fs::read_dir(data.path()).unwrap().count(),
        0,
        "the run's data was left behind"
    );

    // Capacity planning: a sweep up to the latency bound, and an estimate.
    let sweep_file = dir.path().join("sweep.json");
    let out = rama(
        dir.path(),
        &[
            "bench",
            "--inProcess",
            "--workload",
            "append",
            "--seconds",
            "0.5",
            "--keys",
            "1000",
            "--sweep",
            "--p99Ms",
            "2000",
            "--targetRate",
            "1000000",
            "--out",
            sweep_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("ops/s per task thread (2 threads)"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("assumptions: throughput scales linearly"),
        "{}",
        text(&out)
    );
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sweep_file).unwrap()).unwrap();
    assert!(s["maxSustainablePerSec"].as_f64().unwrap() > 0.0, "{s}");
    assert!(!s["steps"].as_array().unwrap().is_empty(), "{s}");
    // A bound nothing meets: 10% of the maximum, then three halvings
    // below it, and no estimate.
    let out = rama(
        dir.path(),
        &[
            "bench",
            "--inProcess",
            "--workload",
            "append",
            "--seconds",
            "0.3",
            "--keys",
            "100",
            "--sweep",
            "--p99Ms",
            "0.001",
            "--targetRate",
            "1000",
            "--out",
            sweep_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to scale from"), "{}", text(&out));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sweep_file).unwrap()).unwrap();
    assert_eq!(s["maxSustainablePerSec"].as_f64(), Some(0.0), "{s}");
    let offered: Vec<f64> = s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["offeredPerSec"].as_f64().unwrap())
        .collect();
    assert_eq!(offered.len(), 4, "{s}");
    assert!(
        offered.windows(2).all(|w| w[0] < w[1]),
        "steps sorted by rate: {offered:?}"
    );
    let out = rama(dir.path(), &["bench", "--inProcess", "--targetRate", "5"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--targetRate needs --sweep"), "{}", text(&out));

    // A rate the harness cannot send is an error, not a number.
    let out = rama(
        dir.path(),
        &[
            "bench",
            "--inProcess",
            "--workload",
            "append",
            "--seconds",
            "1",
            "--rate",
            "50000000",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("could not send"), "{}", text(&out));

    // Baselines through the harness: the loopback limit, and a tool that
    // is not installed is named with its package.
    let tcp_file = dir.path().join("tcp.json");
    let out = rama(
        dir.path(),
        &[
            "bench",
            "--baseline",
            "tcp",
            "--seconds",
            "0.3",
            "--clients",
            "2",
            "--out",
            tcp_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tcp_file).unwrap()).unwrap();
    assert!(t["sequentialPerSec"].as_f64().unwrap() > 0.0, "{t}");
    assert!(t["pipelinedPerSec"].as_f64().unwrap() > 0.0, "{t}");
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (baseline, package) in [("rocksdb", "rocksdb-tools"), ("redis", "redis-server")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rama"))
            .current_dir(dir.path())
            .env_remove("RAMA_CONFIG")
            .env("PATH", "/nonexistent")
            .args(["bench", "--baseline", baseline, "--keys", "1000", "--dir"])
            .arg(data.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{baseline}: {}", text(&out));
        assert!(text(&out).contains(package), "{baseline}: {}", text(&out));
    }
    assert_eq!(
        std::fs::read_dir(data.path()).unwrap().count(),
        0,
        "baseline data left behind"
    );

    for (args, why) in [
        (vec!["--workload", "nope"], "unknown workload"),
        (vec!["--clients", "0"], "--clients 0"),
        (vec!["--skew", "pareto"], "unknown key skew"),
        (vec!["--seconds", "0"], "--seconds"),
        (vec!["--mix", "put:1,range:1"], "a run drives one module"),
        (vec!["--mix", "scan:1"], "unknown operation \"scan\""),
        (vec!["--mix", "get:0"], "weight of get"),
        (
            vec!["--workload", "wordcount", "--mix", "get"],
            "workload WordCount drives WordCountModule",
        ),
        (vec!["--workload", "range", "--rangeLimit", "0"], "--rangeLimit 0"),
        (vec!["--conductor", "127.0.0.1:1"], "cannot be used with"),
    ] {
        let out = rama(dir.path(), &[&["bench", "--inProcess"][..], &args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(why), "{args:?}: {}", text(&out));
    }
}
