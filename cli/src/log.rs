//! Daemon logs: each line goes to `<local.dir>/logs/<role>-<id>.log`
//! (rotated to `.1` past 10 MiB, one old file kept) and to stdout when
//! someone reads it (a closed stdout is no failure).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const ROTATE_BYTES: u64 = 10 << 20;

#[derive(Debug)]
pub struct Log {
    path: PathBuf,
    file: Mutex<File>,
}

impl Log {
    pub fn open(logs: &Path, name: &str) -> Result<Log, String> {
        std::fs::create_dir_all(logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
        let path = logs.join(format!("{name}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        Ok(Log {
            path,
            file: Mutex::new(file),
        })
    }

    pub fn line(&self, text: &str) {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if file.metadata().is_ok_and(|m| m.len() > ROTATE_BYTES) {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
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
