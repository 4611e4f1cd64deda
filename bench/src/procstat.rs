//! CPU time and memory of processes, from `/proc`, so a run can report
//! what each operation cost, not only how fast it went.

use serde::{Deserialize, Serialize};

/// CPU time (user + system) of `pid` in seconds, and its resident memory
/// now and at its peak, in bytes.
pub fn sample(pid: u32) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    Some((ticks as f64 / hz, kib("VmRSS:"), kib("VmHWM:")))
}

/// The process listening on TCP `port` on this machine (through the
/// socket's inode in `/proc/net/tcp*` and the processes' descriptors).
pub fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let port_hex = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if listening && port_hex == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// What one process used during a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessUse {
    pub pid: u32,
    /// What it is: `this process (in-process cluster)`, `worker 0 at ...`.
    pub role: String,
    pub cpu_seconds: f64,
    /// CPU seconds per second of the run (1.0 = one core busy).
    pub cores: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

/// Samples processes at the start of a run and reports their use at its
/// end.
#[derive(Debug)]
pub struct Watch {
    start: Vec<(u32, String, f64)>,
    started: std::time::Instant,
}

impl Watch {
    pub fn start(processes: Vec<(u32, String)>) -> Watch {
        Watch {
            start: processes
                .into_iter()
                .filter_map(|(pid, role)| sample(pid).map(|(cpu, _, _)| (pid, role, cpu)))
                .collect(),
            started: std::time::Instant::now(),
        }
    }

    pub fn finish(self) -> Vec<ProcessUse> {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        self.start
            .into_iter()
            .filter_map(|(pid, role, cpu0)| {
                let (cpu, rss, peak) = sample(pid)?;
                Some(ProcessUse {
                    pid,
                    role,
                    cpu_seconds: cpu - cpu0,
                    cores: (cpu - cpu0) / seconds,
                    rss_bytes: rss,
                    peak_rss_bytes: peak,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process_and_finds_a_listener() {
        let (cpu, rss, peak) = sample(std::process::id()).unwrap();
        assert!(cpu >= 0.0 && rss > 0 && peak >= rss);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
        let watch = Watch::start(vec![(std::process::id(), "me".into())]);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let used = watch.finish();
        assert_eq!(used.len(), 1);
        assert!(used[0].cpu_seconds >= 0.0);
    }
}
