//! What machine and disk the numbers come from.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::results::{ensure, BenchResult};

/// The machine a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// `nproc`.
    pub cores: Option<u32>,
    pub cpu_model: Option<String>,
    pub memory_bytes: Option<u64>,
    /// `uname -r`.
    pub kernel: Option<String>,
    /// Where the benchmark data lived.
    pub data_dir: String,
    /// Device and file system of `data_dir`, per `df`.
    pub device: Option<String>,
    pub filesystem: Option<String>,
    /// Model, size and rotational flag of the device, per `lsblk`.
    pub disk_model: Option<String>,
    pub disk_size: Option<String>,
    pub disk_rotational: Option<bool>,
    /// 1, 5 and 15 minute load averages at the start and the end of the
    /// run: other work on the machine skews the numbers.
    pub load_start: Option<String>,
    pub load_end: Option<String>,
    /// Share of time some task waited on I/O just before the run
    /// (`/proc/pressure/io`, 10 s and 60 s averages): other disk users.
    pub io_pressure_start: Option<String>,
}

/// The `some` averages of /proc/pressure/io, as `avg10=.. avg60=..`.
fn io_pressure() -> Option<String> {
    let text = std::fs::read_to_string("/proc/pressure/io").ok()?;
    let some = text.lines().find(|l| l.starts_with("some "))?;
    Some(some.split_whitespace().skip(1).take(2).collect::<Vec<_>>().join(" "))
}

/// The three load averages of /proc/loadavg.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Standard output of a command that succeeded, trimmed.
fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn proc_field(file: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == key))
        .map(|(_, v)| v.trim().to_string())
}

impl Machine {
    /// Describes this machine, with `data_dir` as the benchmarks' disk.
    pub fn probe(data_dir: &Path) -> Machine {
        let dir = data_dir.display().to_string();
        let df = run("df", &["--output=source,fstype", &dir]);
        let (device, filesystem) = match df.as_deref().and_then(|t| t.lines().nth(1)) {
            Some(line) => {
                let mut f = line.split_whitespace();
                (f.next().map(str::to_string), f.next().map(str::to_string))
            }
            None => (None, None),
        };
        let lsblk = device
            .as_deref()
            .filter(|d| d.starts_with("/dev/"))
            .and_then(|d| run("lsblk", &["--nodeps", "--noheadings", "-o", "SIZE,ROTA,MODEL", d]));
        let mut disk = lsblk.as_deref().unwrap_or_default().split_whitespace();
        let disk_size = disk.next().map(str::to_string);
        let disk_rotational = disk.next().map(|r| r == "1");
        let model = disk.collect::<Vec<_>>().join(" ");
        Machine {
            cores: run("nproc", &[]).and_then(|n| n.parse().ok()),
            cpu_model: proc_field("/proc/cpuinfo", "model name"),
            memory_bytes: proc_field("/proc/meminfo", "MemTotal")
                .and_then(|v| v.strip_suffix(" kB")?.trim().parse::<u64>().ok())
                .map(|kb| kb * 1024),
            kernel: run("uname", &["-r"]),
            data_dir: dir,
            device,
            filesystem,
            disk_model: (!model.is_empty()).then_some(model),
            disk_size,
            disk_rotational,
            load_start: load_average(),
            load_end: None,
            io_pressure_start: io_pressure(),
        }
    }
}

/// Fails if `dir` is on a memory-backed file system: the benchmarks must
/// hit a real disk.
pub fn check_real_disk(dir: &Path) -> BenchResult<()> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: `statfs` is plain old data; the kernel fills it in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!("statfs {}: {}", dir.display(), std::io::Error::last_os_error()).into());
    }
    // `f_type`'s integer type differs between platforms.
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as i64;
    ensure(kind != TMPFS_MAGIC && kind != RAMFS_MAGIC, || {
        format!(
            "{} is on a memory-backed file system (tmpfs/ramfs); pass --dir on a real disk",
            dir.display()
        )
    })
}
