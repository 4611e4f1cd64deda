//! `rama.yaml`: the configuration every daemon, CLI command and client
//! reads.
//!
//! Keys are flat, with dots (`zookeeper.port: 2000`). Known keys are checked
//! when the file is loaded, with errors naming the key; other keys (worker
//! options and the like) are kept as they are and printed by `confValue`.
//! `conductor.host` and `zookeeper.servers` take either a value or a map
//! with `internal` and `external` entries: daemons inside the cluster use
//! the internal one, clients outside it the external one.
//! `local.dir` is relative to the directory of `rama.yaml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml::Value as Yaml;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{path}: {key}: {reason}")]
    Invalid { path: PathBuf, key: String, reason: String },
    #[error("{key} is not set in {path} and has no default")]
    Missing { path: PathBuf, key: String },
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// Which side of the cluster the caller is on (for hosts with internal and
/// external names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Daemons and clients inside the cluster's network.
    Internal,
    /// Clients outside it (the default for clients).
    External,
}

/// Defaults of the known keys, as YAML text.
const DEFAULTS: &[(&str, &str)] = &[
    ("zookeeper.port", "2000"),
    ("zookeeper.root", "rama"),
    ("zookeeper.connect.timeout.secs", "15"),
    ("conductor.port", "1973"),
    ("supervisor.port.range", "[3000, 4000]"),
    ("local.dir", "local-rama-data"),
    ("cluster.secret.file", "cluster.secret"),
    ("conductor.connections.max", "256"),
    ("worker.connections.max", "1024"),
    ("net.idle.timeout.secs", "600"),
    ("module.tasks.max", "4096"),
    ("module.threads.max", "512"),
];

/// Bounds of the numeric keys: (key, least, most).
const RANGES: &[(&str, u64, u64)] = &[
    ("conductor.connections.max", 1, 65536),
    ("worker.connections.max", 1, 65536),
    ("net.idle.timeout.secs", 1, 86400),
    ("module.tasks.max", 1, 1 << 20),
    ("module.threads.max", 1, 1 << 16),
];

/// The loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (or where it would be: every key may be
    /// unset, and defaults apply).
    path: PathBuf,
    values: BTreeMap<String, Yaml>,
}

impl Config {
    /// Reads `path`; a missing file is an empty configuration (defaults
    /// only) when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Config::parse(path, &text)
    }

    /// Parses `text` as the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config> {
        let doc: Yaml = if text.trim().is_empty() {
            Yaml::Mapping(Default::default())
        } else {
            crate::yaml::parse(text).map_err(|reason| ConfigError::Syntax {
                path: path.to_path_buf(),
                reason,
            })?
        };
        let Yaml::Mapping(map) = doc else {
            return Err(ConfigError::Syntax {
                path: path.to_path_buf(),
                reason: "the top level must be a map of keys to values".into(),
            });
        };
        let mut values = BTreeMap::new();
        for (k, v) in map {
            let Yaml::String(k) = k else {
                return Err(ConfigError::Syntax {
                    path: path.to_path_buf(),
                    reason: format!("key {k:?} is not a string"),
                });
            };
            values.insert(k, v);
        }
        let config = Config {
            path: path.to_path_buf(),
            values,
        };
        config.validate()?;
        Ok(config)
    }

    /// Sets `key` to `value` (overrides take precedence over the file).
    /// A bad value is refused and leaves the configuration as it was.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let v: Yaml = crate::yaml::parse(value).map_err(|e| self.invalid(key, format!("not YAML: {e}")))?;
        let mut next = self.clone();
        next.values.insert(key.to_string(), v);
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// How long a daemon or client keeps trying to reach ZooKeeper at
    /// start (with backoff) before it gives up with an error.
    pub fn connect_timeout(&self) -> Result<std::time::Duration> {
        let key = "zookeeper.connect.timeout.secs";
        match self.get(key) {
            Some(Yaml::Number(n)) if n.as_u64().is_some_and(|s| (1..=3600).contains(&s)) => {
                Ok(std::time::Duration::from_secs(n.as_u64().expect("checked")))
            }
            Some(_) => Err(self.invalid(key, "must be a number of seconds from 1 to 3600")),
            None => Ok(std::time::Duration::from_secs(15)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn validate(&self) -> Result<()> {
        for key in ["zookeeper.port", "conductor.port"] {
            self.port(key)?;
        }
        if self.values.contains_key("supervisor.port.range") {
            self.port_range()?;
        }
        self.connect_timeout()?;
        for key in ["zookeeper.root", "local.dir", "cluster.secret.file"] {
            if self.values.contains_key(key) {
                self.string(key)?;
            }
        }
        for (key, _, _) in RANGES {
            self.count(key)?;
        }
        for key in ["conductor.host", "supervisor.host"] {
            if self.values.contains_key(key) {
                self.hosts(key, Side::Internal)?;
            }
        }
        if self.values.contains_key("zookeeper.servers") {
            self.hosts("zookeeper.servers", Side::Internal)?;
        }
        Ok(())
    }

    /// The value of `key` (set or default).
    pub fn get(&self, key: &str) -> Option<Yaml> {
        self.values.get(key).cloned().or_else(|| {
            DEFAULTS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| serde_yaml::from_str(v).expect("defaults are valid YAML"))
        })
    }

    fn require(&self, key: &str) -> Result<Yaml> {
        self.get(key).ok_or_else(|| ConfigError::Missing {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    /// `key` printed for `rama confValue`: scalars as they are, others as
    /// YAML flow text.
    pub fn display(&self, key: &str) -> Result<String> {
        Ok(flow(&self.require(key)?))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        match self.require(key)? {
            Yaml::String(s) if !s.is_empty() => Ok(s),
            other => Err(self.invalid(key, format!("must be a non-empty string, got {other:?}"))),
        }
    }

    pub fn port(&self, key: &str) -> Result<u16> {
        match self.require(key)? {
            Yaml::Number(n) => n
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| self.invalid(key, format!("must be a port number 1..=65535, got {n}"))),
            other => Err(self.invalid(key, format!("must be a port number, got {other:?}"))),
        }
    }

    /// `supervisor.port.range`: `[first, last]`, inclusive.
    pub fn port_range(&self) -> Result<(u16, u16)> {
        let key = "supervisor.port.range";
        let bad = |why: String| self.invalid(key, why);
        let Yaml::Sequence(items) = self.require(key)? else {
            return Err(bad("must be a pair of port numbers, like [3000, 4000]".into()));
        };
        let ports: Vec<u16> = items
            .iter()
            .map(|v| v.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("must be a pair of port numbers 1..=65535".into()))?;
        match ports[..] {
            [first, last] if first <= last => Ok((first, last)),
            [first, last] => Err(bad(format!("the first port {first} is above the last {last}"))),
            _ => Err(bad(format!(
                "must be a pair of port numbers, got {} numbers",
                ports.len()
            ))),
        }
    }

    /// The hosts of `key` for `side`: a host or a list of hosts, or a map
    /// with `internal` and `external` entries.
    pub fn hosts(&self, key: &str, side: Side) -> Result<Vec<String>> {
        let value = self.require(key)?;
        let chosen = match &value {
            Yaml::Mapping(m) => {
                let want = match side {
                    Side::Internal => "internal",
                    Side::External => "external",
                };
                for k in m.keys() {
                    if !matches!(k.as_str(), Some("internal" | "external")) {
                        return Err(self.invalid(key, format!("unknown entry {k:?}; use internal and external")));
                    }
                }
                m.get(want)
                    .cloned()
                    .ok_or_else(|| self.invalid(key, format!("has no {want} entry")))?
            }
            v => v.clone(),
        };
        let list = match chosen {
            Yaml::String(s) => vec![s],
            Yaml::Sequence(items) => items
                .into_iter()
                .map(|i| match i {
                    Yaml::String(s) => Ok(s),
                    other => Err(self.invalid(key, format!("host {other:?} is not a string"))),
                })
                .collect::<Result<_>>()?,
            other => return Err(self.invalid(key, format!("must be a host or a list of hosts, got {other:?}"))),
        };
        if list.is_empty()
            || list
                .iter()
                .any(|h| h.trim().is_empty() || h.contains(char::is_whitespace))
        {
            return Err(self.invalid(key, "hosts must be non-empty names without spaces"));
        }
        Ok(list)
    }

    /// A numeric key of [`RANGES`], checked against its bounds.
    pub fn count(&self, key: &str) -> Result<u64> {
        let &(_, least, most) = RANGES
            .iter()
            .find(|(k, _, _)| *k == key)
            .unwrap_or_else(|| panic!("{key} must be listed in RANGES"));
        match self.require(key)? {
            Yaml::Number(n) if n.as_u64().is_some_and(|v| (least..=most).contains(&v)) => {
                Ok(n.as_u64().expect("checked"))
            }
            other => Err(self.invalid(
                key,
                format!("must be a whole number from {least} to {most}, got {}", flow(&other)),
            )),
        }
    }

    /// `net.idle.timeout.secs` as a duration.
    pub fn idle_timeout(&self) -> Result<std::time::Duration> {
        Ok(std::time::Duration::from_secs(self.count("net.idle.timeout.secs")?))
    }

    /// `cluster.secret.file`, relative to the directory of `rama.yaml`.
    pub fn secret_file(&self) -> Result<PathBuf> {
        Ok(self.relative(PathBuf::from(self.string("cluster.secret.file")?)))
    }

    fn relative(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// `local.dir`, relative to the directory of `rama.yaml`.
    pub fn local_dir(&self) -> Result<PathBuf> {
        Ok(self.relative(PathBuf::from(self.string("local.dir")?)))
    }
}

/// A value on one line: scalars as they are, `[a, b]`, `{k: v}`.
fn flow(v: &Yaml) -> String {
    match v {
        Yaml::Null => "null".into(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        Yaml::String(s) => s.clone(),
        Yaml::Sequence(items) => format!("[{}]", items.iter().map(flow).collect::<Vec<_>>().join(", ")),
        Yaml::Mapping(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", flow(k), flow(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Yaml::Tagged(t) => flow(&t.value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("/etc/rama/rama.yaml"), text)
    }

    #[test]
    fn defaults_and_values() {
        let c = parse("zookeeper.servers: [\"a\", \"b\"]\nconductor.port: 2001\nworker.child.opts: \"-x\"\n").unwrap();
        assert_eq!(c.port("zookeeper.port").unwrap(), 2000);
        assert_eq!(c.port("conductor.port").unwrap(), 2001);
        assert_eq!(c.port_range().unwrap(), (3000, 4000));
        assert_eq!(c.display("zookeeper.root").unwrap(), "rama");
        assert_eq!(c.display("worker.child.opts").unwrap(), "-x");
        assert_eq!(c.display("supervisor.port.range").unwrap(), "[3000, 4000]");
        assert_eq!(c.local_dir().unwrap(), PathBuf::from("/etc/rama/local-rama-data"));
        assert_eq!(c.hosts("zookeeper.servers", Side::External).unwrap(), ["a", "b"]);
        let err = c.display("conductor.host").unwrap_err().to_string();
        assert!(err.contains("conductor.host is not set"), "{err}");
    }

    #[test]
    fn internal_and_external_hosts() {
        let c = parse("conductor.host:\n  internal: \"10.0.0.1\"\n  external: \"rama.example\"\n").unwrap();
        assert_eq!(c.hosts("conductor.host", Side::Internal).unwrap(), ["10.0.0.1"]);
        assert_eq!(c.hosts("conductor.host", Side::External).unwrap(), ["rama.example"]);
        let err = parse("conductor.host:\n  inside: x\n").unwrap_err().to_string();
        assert!(err.contains("unknown entry"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("zookeeper.port: 70000", "zookeeper.port"),
            ("conductor.port: \"x\"", "conductor.port"),
            ("supervisor.port.range: [4000, 3000]", "supervisor.port.range"),
            ("supervisor.port.range: [1]", "supervisor.port.range"),
            ("local.dir: 5", "local.dir"),
            ("zookeeper.servers: []", "zookeeper.servers"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        assert!(parse("- a\n- b").unwrap_err().to_string().contains("map"));
        assert!(parse("a: [").unwrap_err().to_string().contains("not valid YAML"));
    }

    #[test]
    fn overrides_take_precedence_and_are_checked() {
        let mut c = parse("zookeeper.port: 2000").unwrap();
        c.set("zookeeper.port", "2181").unwrap();
        assert_eq!(c.port("zookeeper.port").unwrap(), 2181);
        assert!(c.set("zookeeper.port", "0").is_err());
        assert_eq!(c.port("zookeeper.port").unwrap(), 2181);
    }
}
