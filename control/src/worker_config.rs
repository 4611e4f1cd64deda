//! Worker configurations: set per module at deploy with `rama deploy
//! --configOverrides FILE` (YAML), kept in the module's spec, applied by
//! the Supervisors to every worker process of the module.
//!
//! ```yaml
//! # Options of the worker process: its task-thread tuning flags.
//! worker.child.opts: "--pin off --spinBeforeParkMicros 50"
//! # Environment variables of the worker process.
//! worker.child.env:
//!   MALLOC_ARENA_MAX: "2"
//! ```
//! Unknown keys, and options the worker does not have, are refused at
//! deploy, before anything is launched.

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};
use serde_yaml::Value as Yaml;

/// The worker options `worker.child.opts` may set, with what they take.
/// The engine's limits (from `--channelCapacity` on) are the options of
/// `engine::cluster::ModuleConfig`; their ranges are checked there, by the
/// Conductor at deploy and by the worker at start.
pub const WORKER_OPTIONS: &[(&str, &str)] = &[
    ("--pin", "auto, on or off: pin task threads to CPUs"),
    (
        "--spinBeforeParkMicros",
        "a number of microseconds an idle task thread spins before it sleeps",
    ),
    ("--channelCapacity", "a number of messages per task-thread channel"),
    (
        "--clientInflight",
        "a number of client requests a task thread works on at once",
    ),
    (
        "--stageInflight",
        "a number of stage batches per level a task thread works on at once",
    ),
    (
        "--streamBatchBytes",
        "a number of bytes a stream consumer reads per batch",
    ),
    ("--streamRetries", "a number of retries of a failed stream record"),
    (
        "--microbatchMaxRecords",
        "a number of records per depot partition per microbatch",
    ),
    ("--recordBytesMax", "a number of bytes: the largest depot record"),
];

/// A module's worker configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Extra options of the worker process, in order.
    pub opts: Vec<String>,
    pub env: BTreeMap<String, String>,
}

fn check_opts(text: &str) -> Result<Vec<String>, String> {
    let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    let mut it = words.chunks(2);
    for pair in &mut it {
        let flag = pair[0].as_str();
        if !WORKER_OPTIONS.iter().any(|(f, _)| *f == flag) {
            return Err(format!(
                "worker.child.opts: unknown worker option {flag} (known: {})",
                WORKER_OPTIONS.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ")
            ));
        }
        let Some(value) = pair.get(1) else {
            return Err(format!("worker.child.opts: {flag} needs a value"));
        };
        match flag {
            "--pin" if ["auto", "on", "off"].contains(&value.as_str()) => {}
            "--spinBeforeParkMicros" if value.parse::<u32>().is_ok_and(|n| n <= 1_000_000) => {}
            "--pin" | "--spinBeforeParkMicros" => {
                let what = WORKER_OPTIONS.iter().find(|(f, _)| *f == flag).map_or("", |(_, w)| w);
                return Err(format!("worker.child.opts: {flag} {value}: takes {what}"));
            }
            // The engine's options: a whole number here, its range at the
            // engine.
            _ if value.parse::<u64>().is_ok() => {}
            _ => {
                let what = WORKER_OPTIONS.iter().find(|(f, _)| *f == flag).map_or("", |(_, w)| w);
                return Err(format!("worker.child.opts: {flag} {value}: takes {what}"));
            }
        }
    }
    Ok(words)
}

impl WorkerConfig {
    /// Parses an overrides file's text.
    pub fn parse_yaml(text: &str) -> Result<WorkerConfig, String> {
        let doc: Yaml = if text.trim().is_empty() {
            Yaml::Mapping(Default::default())
        } else {
            crate::yaml::parse(text).map_err(|e| format!("not valid YAML: {e}"))?
        };
        let Yaml::Mapping(map) = doc else {
            return Err("the top level must be a map of worker configurations".into());
        };
        let mut config = WorkerConfig::default();
        for (k, v) in map {
            match k.as_str().unwrap_or_default() {
                "worker.child.opts" => {
                    let text = v.as_str().ok_or("worker.child.opts must be a string of options")?;
                    config.opts = check_opts(text)?;
                }
                "worker.child.env" => {
                    let Yaml::Mapping(vars) = v else {
                        return Err("worker.child.env must be a map of variable names to values".into());
                    };
                    for (name, value) in vars {
                        let name = name
                            .as_str()
                            .ok_or("worker.child.env: a variable name must be a string")?;
                        if name.is_empty() || name.contains('=') || name.contains('\0') {
                            return Err(format!("worker.child.env: {name:?} is not a variable name"));
                        }
                        let value = match value {
                            Yaml::String(s) => s,
                            Yaml::Number(n) => n.to_string(),
                            Yaml::Bool(b) => b.to_string(),
                            _ => return Err(format!("worker.child.env: {name} must be a string")),
                        };
                        config.env.insert(name.to_string(), value);
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown worker configuration {k:?} (known: worker.child.opts, worker.child.env)"
                    ))
                }
            }
        }
        Ok(config)
    }

    pub fn to_json(&self) -> Json {
        json!({"opts": self.opts, "env": self.env})
    }

    /// From its JSON form (as stored in a module's spec); checked again.
    pub fn from_json(j: &Json) -> Result<WorkerConfig, String> {
        if j.is_null() {
            return Ok(WorkerConfig::default());
        }
        let opts = j["opts"]
            .as_array()
            .map(|a| a.iter().filter_map(Json::as_str).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let env = j["env"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(WorkerConfig {
            opts: check_opts(&opts)?,
            env,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_round_trips() {
        let c = WorkerConfig::parse_yaml(
            "worker.child.opts: \"--pin off --spinBeforeParkMicros 50\"\nworker.child.env:\n  A: \"1\"\n  B: 2\n",
        )
        .unwrap();
        assert_eq!(c.opts, ["--pin", "off", "--spinBeforeParkMicros", "50"]);
        assert_eq!(c.env["B"], "2");
        assert_eq!(WorkerConfig::from_json(&c.to_json()).unwrap(), c);
        assert_eq!(WorkerConfig::parse_yaml("").unwrap(), WorkerConfig::default());
        for (text, why) in [
            ("worker.child.opts: \"-Xmx8g\"", "unknown worker option -Xmx8g"),
            ("worker.child.opts: \"--pin sometimes\"", "auto, on or off"),
            ("worker.child.opts: \"--pin\"", "needs a value"),
            ("worker.child.env: [1]", "map of variable names"),
            ("custom.serializations: []", "unknown worker configuration"),
            ("[1, 2]", "top level"),
        ] {
            let e = WorkerConfig::parse_yaml(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
