//! `rama.yaml`: the configuration every daemon, CLI command and client
//! reads.
//!
//! Keys are flat, with dots (`zookeeper.port: 2000`). Every key is checked
//! when the file is loaded, with errors naming the key; a key this release
//! does not know is refused, naming the closest known one (a misspelt
//! `conductor.prot` must not leave the port at its default unnoticed).
//! `conductor.host` takes a host or a map with `internal` and `external`
//! entries; `zookeeper.servers` a host, a list of hosts, a list of such
//! maps, or a map of two lists: daemons inside the cluster use the
//! internal names, clients outside it the external ones.
//! `local.dir` is relative to the directory of `rama.yaml`.
//! [`Config::effective`] is what `rama confValue` prints: the value the
//! daemons use, defaults that depend on the machine included.

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
    ("conductor.artifact.max.bytes", "1073741824"),
    ("cluster.ui.port", "8888"),
    ("conductor.child.opts", "\"--memoryLimitMb 1024\""),
    ("supervisor.child.opts", "\"--memoryLimitMb 512\""),
    ("replication.session.timeout.millis", "2000"),
];

/// Known keys without a fixed default: the cluster's hosts (required
/// where they are needed) and `supervisor.host`, whose default is the
/// machine's host name ([`Config::effective`]).
const KEYS_WITHOUT_DEFAULT: &[&str] = &["zookeeper.servers", "conductor.host", "supervisor.host"];

/// Bounds of the numeric keys: (key, least, most).
const RANGES: &[(&str, u64, u64)] = &[
    ("conductor.connections.max", 1, 65536),
    ("worker.connections.max", 1, 65536),
    ("net.idle.timeout.secs", 1, 86400),
    ("module.tasks.max", 1, 1 << 20),
    ("module.threads.max", 1, 1 << 16),
    ("conductor.artifact.max.bytes", 1 << 20, 1 << 40),
    ("replication.session.timeout.millis", 1000, 60000),
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

    /// Where the configuration is: `explicit` (a `--config` or a path
    /// given to a client), else `$RAMA_CONFIG` (when set and not empty),
    /// else `./rama.yaml`; and whether it must exist (only the last may be
    /// missing: then every key has its default).
    pub fn locate(explicit: Option<&Path>) -> (PathBuf, bool) {
        let from_env = std::env::var_os("RAMA_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        match explicit.map(Path::to_path_buf).or(from_env) {
            Some(p) => (p, true),
            None => (PathBuf::from("rama.yaml"), false),
        }
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

    /// Every key this release reads from `rama.yaml`.
    pub fn known_keys() -> impl Iterator<Item = &'static str> {
        DEFAULTS
            .iter()
            .map(|(k, _)| *k)
            .chain(KEYS_WITHOUT_DEFAULT.iter().copied())
    }

    fn validate(&self) -> Result<()> {
        for key in self.values.keys() {
            if !Config::known_keys().any(|k| k == key) {
                let reason = match closest_key(key) {
                    Some(near) => format!("unknown key; did you mean {near}?"),
                    None => format!(
                        "unknown key (known keys: {})",
                        Config::known_keys().collect::<Vec<_>>().join(", ")
                    ),
                };
                return Err(self.invalid(key, reason));
            }
        }
        for key in ["zookeeper.port", "conductor.port", "cluster.ui.port"] {
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
            self.hosts("zookeeper.servers", Side::External)?;
        }
        for key in ["conductor.child.opts", "supervisor.child.opts"] {
            self.daemon_options(key)?;
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

    /// The hosts of `key` for `side`: a host or a list of hosts, a map
    /// with `internal` and `external` entries (each a host or a list), or
    /// a list whose entries are such maps (the shape of the seed's
    /// `zookeeper.servers`).
    pub fn hosts(&self, key: &str, side: Side) -> Result<Vec<String>> {
        let value = self.require(key)?;
        let mut list = Vec::new();
        match &value {
            Yaml::Sequence(items) => {
                for item in items {
                    self.push_hosts(key, side, item, &mut list)?;
                }
            }
            v => self.push_hosts(key, side, v, &mut list)?,
        }
        if list.is_empty()
            || list
                .iter()
                .any(|h| h.trim().is_empty() || h.contains(char::is_whitespace))
        {
            return Err(self.invalid(key, "hosts must be non-empty names without spaces"));
        }
        Ok(list)
    }

    /// Adds the hosts of one entry of `key` (a host, or an
    /// internal/external map) to `out`.
    fn push_hosts(&self, key: &str, side: Side, entry: &Yaml, out: &mut Vec<String>) -> Result<()> {
        let chosen = match entry {
            Yaml::Mapping(m) => {
                let want = match side {
                    Side::Internal => "internal",
                    Side::External => "external",
                };
                for k in m.keys() {
                    if !matches!(k.as_str(), Some("internal" | "external")) {
                        return Err(self.invalid(key, format!("unknown entry {}; use internal and external", flow(k))));
                    }
                }
                m.get(want)
                    .ok_or_else(|| self.invalid(key, format!("{} has no {want} entry", flow(entry))))?
            }
            v => v,
        };
        match chosen {
            Yaml::String(s) => out.push(s.clone()),
            // A map of two lists: `internal: [a, b]`.
            Yaml::Sequence(items) if matches!(entry, Yaml::Mapping(_)) => {
                for i in items {
                    match i {
                        Yaml::String(s) => out.push(s.clone()),
                        other => return Err(self.invalid(key, format!("host {} is not a string", flow(other)))),
                    }
                }
            }
            other => {
                return Err(self.invalid(
                    key,
                    format!(
                        "host {} is not a string (entries are host names or {{internal: HOST, external: HOST}} maps)",
                        flow(other)
                    ),
                ))
            }
        }
        Ok(())
    }

    /// The value of `key` as the daemons use it, printed by `rama
    /// confValue`: set or default, and `supervisor.host` defaults to this
    /// machine's host name.
    pub fn effective(&self, key: &str) -> Result<String> {
        if key == "supervisor.host" {
            return self.supervisor_host();
        }
        if !Config::known_keys().any(|k| k == key) {
            let hint = closest_key(key)
                .map(|k| format!("; did you mean {k}?"))
                .unwrap_or_default();
            return Err(self.invalid(key, format!("unknown key{hint}")));
        }
        match key {
            "local.dir" => Ok(self.local_dir()?.display().to_string()),
            "cluster.secret.file" => Ok(self.secret_file()?.display().to_string()),
            _ => self.display(key),
        }
    }

    /// The host a Supervisor on this machine reports (`supervisor.host`,
    /// default the machine's host name).
    pub fn supervisor_host(&self) -> Result<String> {
        if self.values.contains_key("supervisor.host") {
            return Ok(self.hosts("supervisor.host", Side::Internal)?.remove(0));
        }
        host_name().map_err(|e| self.invalid("supervisor.host", format!("not set, and the host name is unknown: {e}")))
    }

    /// The options of a daemon (`conductor.child.opts`,
    /// `supervisor.child.opts`), checked.
    pub fn daemon_options(&self, key: &str) -> Result<DaemonOptions> {
        let text = match self.require(key)? {
            Yaml::String(s) => s,
            other => return Err(self.invalid(key, format!("must be a string of options, got {}", flow(&other)))),
        };
        DaemonOptions::parse(&text).map_err(|e| self.invalid(key, e))
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

/// Options of the Conductor and Supervisor processes: the seed's
/// `conductor.child.opts` and `supervisor.child.opts` are JVM options; ours
/// are the daemon's own, applied by the daemon when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonOptions {
    /// `--memoryLimitMb N`: the daemon's data segment limit (RLIMIT_DATA:
    /// its heap and other private writable memory), like the seed's
    /// `-Xmx`. Programs the daemon starts (workers, `describe`) do not
    /// inherit it.
    pub memory_limit_mb: Option<u64>,
}

impl DaemonOptions {
    /// Parses `--memoryLimitMb N` (N from 64 to 1048576) and nothing else.
    pub fn parse(text: &str) -> std::result::Result<DaemonOptions, String> {
        let mut options = DaemonOptions { memory_limit_mb: None };
        let mut words = text.split_whitespace();
        while let Some(flag) = words.next() {
            match flag {
                "--memoryLimitMb" => {
                    let v = words.next().ok_or("--memoryLimitMb needs a number of MiB")?;
                    let mb: u64 = v
                        .parse()
                        .ok()
                        .filter(|m| (64..=1 << 20).contains(m))
                        .ok_or_else(|| format!("--memoryLimitMb {v}: takes a number of MiB from 64 to 1048576"))?;
                    options.memory_limit_mb = Some(mb);
                }
                other => return Err(format!("unknown option {other} (known: --memoryLimitMb N)")),
            }
        }
        Ok(options)
    }
}

/// The known key closest to `key` by edit distance, when it is close
/// enough to be a likely misspelling (at most a third of its length).
pub fn closest_key(key: &str) -> Option<&'static str> {
    Config::known_keys()
        .map(|k| (edit_distance(key, k), k))
        .min()
        .filter(|(d, _)| *d <= key.len().max(3) / 3 + 1)
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// This machine's host name.
pub fn host_name() -> std::result::Result<String, String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    if name.is_empty() {
        return Err("the host name is empty".into());
    }
    Ok(name)
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
        let c = parse("zookeeper.servers: [\"a\", \"b\"]\nconductor.port: 2001\n").unwrap();
        assert_eq!(c.port("zookeeper.port").unwrap(), 2000);
        assert_eq!(c.port("conductor.port").unwrap(), 2001);
        assert_eq!(c.port_range().unwrap(), (3000, 4000));
        assert_eq!(c.display("zookeeper.root").unwrap(), "rama");
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
    fn seed_shapes_of_zookeeper_servers() {
        let c = parse(
            "zookeeper.servers:\n  - internal: \"9.10.11.12\"\n    external: \"13.14.15.16\"\n  - internal: \"17.18.19.20\"\n    external: \"21.22.23.24\"\n",
        )
        .unwrap();
        assert_eq!(
            c.hosts("zookeeper.servers", Side::Internal).unwrap(),
            ["9.10.11.12", "17.18.19.20"]
        );
        assert_eq!(
            c.hosts("zookeeper.servers", Side::External).unwrap(),
            ["13.14.15.16", "21.22.23.24"]
        );
        let c = parse("zookeeper.servers:\n  internal: [a, b]\n  external: [c]\n").unwrap();
        assert_eq!(c.hosts("zookeeper.servers", Side::Internal).unwrap(), ["a", "b"]);
        assert_eq!(c.hosts("zookeeper.servers", Side::External).unwrap(), ["c"]);
        let err = parse("zookeeper.servers:\n  - internal: a\n").unwrap_err().to_string();
        assert!(err.contains("no external entry"), "{err}");
        let err = parse("zookeeper.servers: [[a]]").unwrap_err().to_string();
        assert!(err.contains("is not a string"), "{err}");
    }

    #[test]
    fn unknown_keys_name_the_closest() {
        let err = parse("conductr.port: 1").unwrap_err().to_string();
        assert!(
            err.contains("conductr.port") && err.contains("did you mean conductor.port?"),
            "{err}"
        );
        let err = parse("conductor.prot: 1").unwrap_err().to_string();
        assert!(err.contains("did you mean conductor.port?"), "{err}");
        let err = parse("something.else.entirely: 1").unwrap_err().to_string();
        assert!(err.contains("unknown key (known keys: zookeeper.port"), "{err}");
        let mut c = parse("").unwrap();
        assert!(c
            .set("zookeeper.prot", "1")
            .unwrap_err()
            .to_string()
            .contains("zookeeper.port"));
    }

    #[test]
    fn effective_values_are_what_daemons_use() {
        let c = parse("").unwrap();
        assert_eq!(c.effective("cluster.ui.port").unwrap(), "8888");
        assert_eq!(c.effective("supervisor.host").unwrap(), host_name().unwrap());
        assert_eq!(c.effective("local.dir").unwrap(), "/etc/rama/local-rama-data");
        assert_eq!(c.effective("conductor.child.opts").unwrap(), "--memoryLimitMb 1024");
        assert_eq!(
            c.daemon_options("supervisor.child.opts").unwrap().memory_limit_mb,
            Some(512)
        );
        let c = parse("supervisor.host: \"10.1.2.3\"\nconductor.child.opts: \"\"").unwrap();
        assert_eq!(c.effective("supervisor.host").unwrap(), "10.1.2.3");
        assert_eq!(c.daemon_options("conductor.child.opts").unwrap().memory_limit_mb, None);
        let err = parse("conductor.child.opts: \"-Xmx1g\"").unwrap_err().to_string();
        assert!(
            err.contains("conductor.child.opts") && err.contains("unknown option -Xmx1g"),
            "{err}"
        );
        let err = parse("supervisor.child.opts: \"--memoryLimitMb 1\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("from 64"), "{err}");
        assert!(c
            .effective("cluster.ui.prot")
            .unwrap_err()
            .to_string()
            .contains("cluster.ui.port"));
    }

    #[test]
    fn the_cli_and_clients_find_the_same_file() {
        // No other test of this crate reads RAMA_CONFIG.
        std::env::remove_var("RAMA_CONFIG");
        assert_eq!(Config::locate(None), (PathBuf::from("rama.yaml"), false));
        std::env::set_var("RAMA_CONFIG", "/etc/rama/cluster.yaml");
        assert_eq!(Config::locate(None), (PathBuf::from("/etc/rama/cluster.yaml"), true));
        assert_eq!(
            Config::locate(Some(Path::new("given.yaml"))),
            (PathBuf::from("given.yaml"), true),
            "an explicit path wins"
        );
        std::env::set_var("RAMA_CONFIG", "");
        assert_eq!(
            Config::locate(None),
            (PathBuf::from("rama.yaml"), false),
            "empty is unset"
        );
        std::env::remove_var("RAMA_CONFIG");
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
