//! The logging configuration: `logging.yaml` beside `rama.yaml` (shipped
//! in the release; a missing file means the defaults).
//!
//! ```yaml
//! log.dir: logs                # relative to the directory of this file
//! log.rotate.bytes: 10485760   # a log past this size is rotated
//! log.rotate.keep: 3           # rotated files kept: NAME.log.1 (newest) .. NAME.log.3
//! log.level: info              # error, warn, info, debug or trace
//! ```
//! Every daemon and worker writes `<log.dir>/<role>[-<id>].log` and rotates
//! it itself. Daemons log through `tracing` ([`install`]): each line is
//! `<UTC time, RFC 3339 with milliseconds> <LEVEL> <role>: <message>
//! [field=value ...]`, written to the file and echoed to stdout.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// The most detailed level written.
    pub level: tracing::Level,
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
            level: tracing::Level::INFO,
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
                "log.level" => {
                    logging.level = match v.as_str() {
                        Some("error") => tracing::Level::ERROR,
                        Some("warn") => tracing::Level::WARN,
                        Some("info") => tracing::Level::INFO,
                        Some("debug") => tracing::Level::DEBUG,
                        Some("trace") => tracing::Level::TRACE,
                        _ => return Err(invalid(key, "must be error, warn, info, debug or trace")),
                    };
                }
                _ => {
                    return Err(invalid(
                        &format!("{k:?}"),
                        "unknown key (known: log.dir, log.rotate.bytes, log.rotate.keep, log.level)",
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

/// A daemon's log file: lines appended (rotated past `log.rotate.bytes`)
/// and echoed to stdout when someone reads it (a closed stdout is no
/// failure).
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
    rotate_bytes: u64,
    keep: u32,
}

impl LogFile {
    /// Opens `<log.dir>/<name>.log` for appending.
    pub fn open(logging: &Logging, name: &str) -> std::result::Result<LogFile, String> {
        std::fs::create_dir_all(&logging.dir).map_err(|e| format!("creating {}: {e}", logging.dir.display()))?;
        let path = logging.file(name);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        Ok(LogFile {
            path,
            file: Mutex::new(file),
            rotate_bytes: logging.rotate_bytes,
            keep: logging.keep,
        })
    }

    /// Writes one line (a newline is added) to the file and stdout.
    pub fn line(&self, text: &str) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if rotate_if_large(&self.path, self.rotate_bytes, self.keep) {
            if let Ok(f) = OpenOptions::new().create(true).append(true).open(&self.path) {
                *file = f;
            }
        }
        let _ = writeln!(file, "{text}");
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// The calendar date (year, month, day) of `days` since 1970-01-01, UTC,
/// proleptic Gregorian (Howard Hinnant's `civil_from_days`).
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `t` as RFC 3339 UTC with milliseconds: `2026-12-02T01:48:20.123Z`.
pub fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (year, month, day) = civil_date((secs / 86_400) as i64);
    let rest = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        d.subsec_millis()
    )
}

/// The `tracing` subscriber of a daemon: events at or above its level as
/// lines of its [`LogFile`]. Spans are not recorded (the daemons do not
/// use them).
struct Logger {
    role: String,
    level: tracing::Level,
    /// `None`: stdout only (a worker, whose stdout is its log file).
    out: Option<LogFile>,
}

/// Whether `target` (a module path) is this project's code.
fn ours(target: &str) -> bool {
    let root = target.split("::").next().unwrap_or(target);
    matches!(
        root,
        "rama" | "daemons" | "control" | "net" | "engine" | "rama_bench" | "rama_examples"
    )
}

/// Collects an event's message and fields.
struct Fields(String, String);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            self.1.push_str(&format!(" {}={value:?}", field.name()));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        } else {
            self.1.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl tracing::Subscriber for Logger {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        // Libraries' own events (the ZooKeeper client's reconnects, say)
        // only when asked for with debug or trace.
        *metadata.level() <= self.level && (ours(metadata.target()) || self.level >= tracing::Level::DEBUG)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::from_level(self.level))
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new(), String::new());
        event.record(&mut fields);
        let level = event.metadata().level();
        let line = format!(
            "{} {level:<5} {}: {}{}",
            utc_timestamp(SystemTime::now()),
            self.role,
            fields.0,
            fields.1
        );
        match &self.out {
            Some(file) => file.line(&line),
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// Makes this process log through `tracing` to `<log.dir>/<file>.log`
/// (and stdout) as `role`, at `logging.level`. Once per process.
pub fn install(logging: &Logging, file: &str, role: &str) -> std::result::Result<(), String> {
    let logger = Logger {
        role: role.to_string(),
        level: logging.level,
        out: Some(LogFile::open(logging, file)?),
    };
    tracing::subscriber::set_global_default(logger).map_err(|e| format!("logging is set up already: {e}"))
}

/// Makes this process log through `tracing` to stdout alone, as `role`
/// (a worker: its Supervisor points its stdout at its log file). Does
/// nothing when logging is set up already.
pub fn install_stdout(role: &str, level: tracing::Level) {
    let logger = Logger {
        role: role.to_string(),
        level,
        out: None,
    };
    let _ = tracing::subscriber::set_global_default(logger);
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
            ("log.level: loud\n", "must be error, warn"),
            ("log.colour: red\n", "unknown key"),
            ("- a\n", "top level"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = Logging::load(&file).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |secs: u64, ms: u64| {
            utc_timestamp(UNIX_EPOCH + std::time::Duration::from_secs(secs) + std::time::Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_796_174_900, 123), "2026-12-02T01:28:20.123Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
        // Every crate of the project counts as ours (a module moved to
        // another crate once went silent).
        for crate_root in ["rama", "daemons", "control", "net", "engine", "rama_bench"] {
            assert!(ours(&format!("{crate_root}::x")), "{crate_root}");
        }
        assert!(!ours("zookeeper_client::session"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "log.level: warn\n").unwrap();
        assert_eq!(
            Logging::load(&dir.path().join(FILE)).unwrap().level,
            tracing::Level::WARN
        );
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
