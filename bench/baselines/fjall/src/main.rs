//! `fjall-baseline`: the fillrandom / readrandom / range-scan workload of
//! `rama-bench run` run against fjall, printed as one JSON line.
//!
//! Keys and values come from `bench/src/keys.rs`, shared with the other
//! in-process engines. Every write batch is committed with
//! `PersistMode::SyncData` (fdatasync'd).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use serde_json::json;

const USAGE: &str = "usage: fjall-baseline --dir DIR --keys N [--value-bytes 100] [--batch 1000] \
                     [--reads N] [--scans 10000] [--scan-len 100] [--seed S]";

/// The workload, from the command line.
#[derive(Debug)]
struct Args {
    dir: PathBuf,
    keys: u64,
    value_bytes: usize,
    batch: u64,
    reads: u64,
    scans: u64,
    scan_len: usize,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut dir = None;
    let mut keys = None;
    let mut value_bytes = 100;
    let mut batch = 1000;
    let mut reads = None;
    let mut scans = 10_000;
    let mut scan_len = 100;
    let mut seed = 0x5eed;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}\n{USAGE}"))
        };
        match flag.as_str() {
            "--dir" => dir = Some(PathBuf::from(&value)),
            "--keys" => keys = Some(num()?),
            "--value-bytes" => value_bytes = num()? as usize,
            "--batch" => batch = num()?,
            "--reads" => reads = Some(num()?),
            "--scans" => scans = num()?,
            "--scan-len" => scan_len = num()? as usize,
            "--seed" => seed = num()?,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    let dir = dir.ok_or_else(|| format!("--dir is required\n{USAGE}"))?;
    let keys = keys.ok_or_else(|| format!("--keys is required\n{USAGE}"))?;
    if keys == 0 || batch == 0 || scan_len == 0 {
        return Err(format!("--keys, --batch and --scan-len must be positive\n{USAGE}"));
    }
    Ok(Args {
        dir,
        keys,
        value_bytes,
        batch,
        reads: reads.unwrap_or(keys),
        scans,
        scan_len,
        seed,
    })
}

#[path = "../../../src/keys.rs"]
mod keys;

use keys::{fill_value, key, Rng};

fn rate(ops: u64, seconds: f64) -> f64 {
    ops as f64 / seconds
}

fn run(args: &Args) -> fjall::Result<serde_json::Value> {
    let db = Database::builder(&args.dir).open()?;
    let tree = db.keyspace("bench", KeyspaceCreateOptions::default)?;
    let mut rng = Rng(args.seed);

    let mut value = vec![0u8; args.value_bytes];
    let start = Instant::now();
    let mut i = 0;
    while i < args.keys {
        let n = args.batch.min(args.keys - i);
        let mut batch = db.batch().durability(Some(PersistMode::SyncData));
        for j in i..i + n {
            fill_value(&mut rng, &mut value);
            batch.insert(&tree, key(args.seed, j).to_vec(), value.clone());
        }
        batch.commit()?;
        i += n;
    }
    let fill_seconds = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut found = 0u64;
    for _ in 0..args.reads {
        let k = key(args.seed, rng.below(args.keys));
        if let Some(v) = tree.get(k)? {
            found += 1;
            assert_eq!(v.len(), args.value_bytes, "value read back has the written size");
        }
    }
    let read_seconds = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut entries = 0u64;
    for _ in 0..args.scans {
        let from = key(args.seed, rng.below(args.keys)).to_vec();
        for kv in tree.range(from..).take(args.scan_len) {
            kv.into_inner()?;
            entries += 1;
        }
    }
    let scan_seconds = start.elapsed().as_secs_f64();

    Ok(json!({
        "engine": "fjall",
        "keys": args.keys,
        "value_bytes": args.value_bytes,
        "batch": args.batch,
        "fill": { "ops": args.keys, "seconds": fill_seconds, "ops_per_sec": rate(args.keys, fill_seconds) },
        "read": {
            "ops": args.reads, "found": found, "seconds": read_seconds,
            "ops_per_sec": rate(args.reads, read_seconds),
        },
        "scan": {
            "ops": args.scans, "scan_len": args.scan_len, "entries": entries, "seconds": scan_seconds,
            "ops_per_sec": rate(args.scans, scan_seconds),
        },
    }))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(result) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fjall-baseline: {e}");
            ExitCode::FAILURE
        }
    }
}
