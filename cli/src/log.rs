//! Daemon logs: each line goes to `<log.dir>/<role>[-<id>].log` (see
//! `control::logging`: rotated past `log.rotate.bytes`, `log.rotate.keep`
//! old files kept) and to stdout when someone reads it (a closed stdout is
//! no failure).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use control::logging::{rotate_if_large, Logging};

#[derive(Debug)]
pub struct Log {
    path: PathBuf,
    file: Mutex<File>,
    rotate_bytes: u64,
    keep: u32,
}

impl Log {
    pub fn open(logging: &Logging, name: &str) -> Result<Log, String> {
        let logs: &Path = &logging.dir;
        std::fs::create_dir_all(logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
        let path = logging.file(name);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        Ok(Log {
            path,
            file: Mutex::new(file),
            rotate_bytes: logging.rotate_bytes,
            keep: logging.keep,
        })
    }

    pub fn line(&self, text: &str) {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if rotate_if_large(&self.path, self.rotate_bytes, self.keep) {
            if let Ok(f) = OpenOptions::new().create(true).append(true).open(&self.path) {
                *file = f;
            }
        }
        let _ = writeln!(file, "{secs} {text}");
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}
