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
