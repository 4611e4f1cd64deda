//! The logging configuration: `logging.yaml` beside `rama.yaml` (shipped
//! in the release; a missing file means the defaults).
//!
//! ```yaml
//! log.dir: logs                # relative to the directory of this file
//! log.rotate.bytes: 10485760   # a log past this size is rotated
//! log.rotate.keep: 3           # rotated files kept: NAME.log.1 (newest) .. NAME.log.3
//! ```
//! Every daemon and worker writes `<log.dir>/<role>[-<id>].log` and rotates
//! it itself.

use std::path::{Path, PathBuf};

use serde_yaml::Value as Yaml;

use crate::config::{Config, ConfigError, Result};

/// The file name of the logging configuration.
pub const FILE: &str = "logging.yaml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logging {
    /// Where log files go.
    pub dir: PathBuf,
    pub rotate_bytes: u64,
    pub keep: u32,
}

impl Logging {
    /// The logging configuration beside `config`'s file.
    pub fn beside(config: &Config) -> Result<Logging> {
        let base = config
            .path()
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Self::load(&base.join(FILE))
    }

    /// Reads `path` (defaults for what it does not set, or when it does not
    /// exist).
    pub fn load(path: &Path) -> Result<Logging> {
        let base = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let mut logging = Logging {
            dir: base.join("logs"),
            rotate_bytes: 10 << 20,
            keep: 3,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(logging),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let syntax = |reason: String| ConfigError::Syntax {
            path: path.to_path_buf(),
            reason,
        };
        let doc: Yaml = if text.trim().is_empty() {
            Yaml::Mapping(Default::default())
        } else {
            crate::yaml::parse(&text).map_err(syntax)?
        };
        let Yaml::Mapping(map) = doc else {
            return Err(syntax("the top level must be a map of keys to values".into()));
        };
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        for (k, v) in map {
            let key = k.as_str().unwrap_or_default();
            match key {
                "log.dir" => {
                    let d = v.as_str().ok_or_else(|| invalid(key, "must be a path (a string)"))?;
                    logging.dir = base.join(d);
                }
                "log.rotate.bytes" => {
                    logging.rotate_bytes = v
                        .as_u64()
                        .filter(|&n| n >= 4096)
                        .ok_or_else(|| invalid(key, "must be a number of bytes, at least 4096"))?;
                }
                "log.rotate.keep" => {
                    logging.keep = v
                        .as_u64()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| invalid(key, "must be a number from 1 to 100"))?
                        as u32;
                }
                _ => {
                    return Err(invalid(
                        &format!("{k:?}"),
                        "unknown key (known: log.dir, log.rotate.bytes, log.rotate.keep)",
                    ))
                }
            }
        }
        Ok(logging)
    }

    /// The log file of `name`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
}

/// Rotates `path` if it is larger than `bytes`: `path` becomes `path.1`,
/// `path.1` becomes `path.2`, ..., keeping `keep` old files. Returns
/// whether it rotated (the caller then opens `path` anew).
pub fn rotate_if_large(path: &Path, bytes: u64, keep: u32) -> bool {
    if !std::fs::metadata(path).is_ok_and(|m| m.len() > bytes) {
        return false;
    }
    let numbered = |n: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    };
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    std::fs::rename(path, numbered(1)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_keys_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FILE);
        let d = Logging::load(&file).unwrap();
        assert_eq!(d.dir, dir.path().join("logs"));
        assert_eq!((d.rotate_bytes, d.keep), (10 << 20, 3));
        std::fs::write(&file, "log.dir: out/logs\nlog.rotate.bytes: 5000\nlog.rotate.keep: 2\n").unwrap();
        let l = Logging::load(&file).unwrap();
        assert_eq!(l.dir, dir.path().join("out/logs"));
        assert_eq!((l.rotate_bytes, l.keep), (5000, 2));
        for (text, why) in [
            ("log.rotate.bytes: 10\n", "at least 4096"),
            ("log.rotate.keep: 0\n", "from 1 to 100"),
            ("log.level: debug\n", "unknown key"),
            ("- a\n", "top level"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = Logging::load(&file).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        for round in 0..5 {
            std::fs::write(&log, vec![b'a' + round; 10]).unwrap();
            assert!(rotate_if_large(&log, 5, 2));
        }
        assert!(!log.exists());
        assert_eq!(std::fs::read(dir.path().join("x.log.1")).unwrap(), vec![b'e'; 10]);
        assert_eq!(std::fs::read(dir.path().join("x.log.2")).unwrap(), vec![b'd'; 10]);
        assert!(!dir.path().join("x.log.3").exists());
        std::fs::write(&log, b"abc").unwrap();
        assert!(!rotate_if_large(&log, 5, 2));
    }
}
