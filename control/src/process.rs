//! Stopping child processes by their process id.

use std::process::Child;
use std::time::{Duration, Instant};

/// Sends `signal` to `child`, waits up to `grace` for it to exit, then
/// kills it (SIGKILL) and reaps it. Nothing happens to a child that has
/// already exited.
pub fn stop_child(child: &mut Child, signal: libc::c_int, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on the pid of our own child, which we have not
    // reaped yet (so the pid cannot have been reused).
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The data-segment limit (RLIMIT_DATA) this process had before
/// [`limit_memory`] lowered it, restored in the programs it starts.
static INHERITED_DATA_LIMIT: std::sync::Mutex<Option<libc::rlimit>> = std::sync::Mutex::new(None);

/// Lowers this process's data-segment limit (heap and other private
/// writable memory) to `mb` MiB: `--memoryLimitMb` of
/// `conductor.child.opts` / `supervisor.child.opts`. Programs started
/// through [`command`] get the limit this process had before.
pub fn limit_memory(mb: u64) -> Result<(), String> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid pointers to rlimit structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_DATA, &mut old) != 0 {
            return Err(format!(
                "cannot read the memory limit: {}",
                std::io::Error::last_os_error()
            ));
        }
        let bytes = mb.saturating_mul(1 << 20);
        let new = libc::rlimit {
            rlim_cur: bytes.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_DATA, &new) != 0 {
            return Err(format!(
                "cannot set the memory limit to {mb} MiB: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let mut inherited = INHERITED_DATA_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    inherited.get_or_insert(old);
    Ok(())
}

/// A command for a program this process starts: it runs with the memory
/// limit this process had before [`limit_memory`], not the daemon's own.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    let inherited = *INHERITED_DATA_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(limit) = inherited {
        // SAFETY: the closure runs between fork and exec and only calls
        // setrlimit, which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                libc::setrlimit(libc::RLIMIT_DATA, &limit);
                Ok(())
            });
        }
    }
    command
}
