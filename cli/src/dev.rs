//! `rama dev`: a whole cluster on this machine in one command.
//!
//! Starts ZooKeeper, a Conductor and a Supervisor (each a `rama` child
//! process, on loopback) under one local.dir (`--dir`, else a temporary
//! directory removed afterwards), deploys a module from an artifact
//! (default: `WordCountModule` from the `rama-examples` artifact beside
//! this executable), prints the admin address and the commands to try, and
//! on Ctrl-C destroys the module and stops everything it started, by
//! process id.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use control::config::Config;

/// A line to our stdout; a closed stdout (whoever started us went away) is
/// no reason to stop before everything is cleaned up.
macro_rules! say {
    () => {{
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

macro_rules! say_raw {
    ($($arg:tt)*) => {{
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// What `rama dev` runs.
#[derive(Debug)]
pub struct DevOptions {
    pub dir: Option<PathBuf>,
    pub jar: Option<PathBuf>,
    pub module: String,
    pub tasks: u32,
    pub threads: u32,
    pub workers: u32,
    /// Above 1: as many Supervisors (on 127.0.0.1, 127.0.0.2, ...), so
    /// the replicas of each task group run on different ones.
    pub replication_factor: u32,
    pub config_overrides: Option<PathBuf>,
}

/// A daemon child: stopped by process id (SIGTERM, then SIGKILL) when
/// dropped.
struct Daemon {
    name: &'static str,
    child: Child,
}

impl Daemon {
    fn stop(&mut self) {
        control::process::stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port(host: &str, wanted: u16) -> Result<u16, String> {
    if std::net::TcpListener::bind((host, wanted)).is_ok() {
        return Ok(wanted);
    }
    std::net::TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port on {host}: {e}"))
}

/// How long a daemon may take to say it is ready (ZooKeeper's JVM start
/// and a Conductor's connect with retries fit easily).
const READY_WAIT: Duration = Duration::from_secs(90);

/// Starts `rama <args>` with `config` and waits for its first line, which
/// must contain `ready`; later output is passed through, prefixed.
fn start(name: &'static str, config: &Path, args: &[&str], ready: &str) -> Result<Daemon, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the rama executable: {e}"))?;
    let mut command = Command::new(exe);
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: the pre-exec hook only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            // If `rama dev` dies without stopping it, the daemon stops too.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // Its own process group: Ctrl-C in the terminal reaches only
            // `rama dev`, which destroys the module before stopping it.
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| format!("starting {name}: {e}"))?;
    let out = child.stdout.take().expect("piped");
    let mut daemon = Daemon { name, child };
    // Its first line says it is ready; it gets a deadline (a daemon that
    // hangs before saying anything must not hang `rama dev`). Later lines
    // are passed through, prefixed.
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines().map_while(Result::ok);
        let _ = first_tx.send(lines.next());
        for line in lines {
            say!("[{name}] {line}");
        }
    });
    let first = match first_rx.recv_timeout(READY_WAIT) {
        Ok(Some(line)) if line.contains(ready) => line,
        Ok(Some(line)) => {
            daemon.stop();
            return Err(format!("{name} did not start (said {:?}); see its log", line.trim()));
        }
        Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            daemon.stop();
            return Err(format!("{name} did not start (it ended without a word); see its log"));
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            daemon.stop();
            return Err(format!(
                "{name} did not say it is ready within {} s; stopped it; see its log",
                READY_WAIT.as_secs()
            ));
        }
    };
    say!("[{name}] {}", first.trim_end());
    Ok(daemon)
}

fn rama(config: &Path, args: &[&str]) -> Result<std::process::Output, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new(exe)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .map_err(|e| e.to_string())
}

/// Shell-quotes `s` for the commands shown.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Kills, when dropped, the worker processes this dev cluster's
/// Supervisors recorded under their local.dirs (however `rama dev` ends).
struct WorkersGuard(Vec<PathBuf>);

impl Drop for WorkersGuard {
    fn drop(&mut self) {
        self.0.iter().for_each(|d| kill_workers(d));
    }
}

/// Kills the worker processes whose pid files are under `dir` (when the
/// destroy did not stop them).
fn kill_workers(dir: &Path) {
    let workers = dir.join("supervisor").join("workers");
    for e in std::fs::read_dir(workers).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "pid") {
            if let Some(pid) = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: signals a worker this dev cluster started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

pub fn run(base: &Config, options: &DevOptions, stop: &AtomicBool) -> Result<(), String> {
    let (dir, temporary) = match &options.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            (d.canonicalize().map_err(|e| e.to_string())?, false)
        }
        None => {
            let d = std::env::temp_dir().join(format!("rama-dev-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            (d, true)
        }
    };
    let jar = match &options.jar {
        Some(j) => j.clone(),
        None => {
            // Beside `rama` in a build tree, under modules/ in a release.
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let beside = exe.with_file_name("rama-examples");
            let released = exe.with_file_name("modules").join("rama-examples");
            if beside.is_file() {
                beside
            } else {
                released
            }
        }
    };
    if !jar.is_file() {
        return Err(format!(
            "the module artifact {} is missing; build it with `cargo build --release -p rama-examples` or pass --jar",
            jar.display()
        ));
    }
    let port = |key: &str| base.port(key).map_err(|e| e.to_string());
    let zk = free_port("127.0.0.1", port("zookeeper.port")?)?;
    let conductor_port = free_port("127.0.0.1", port("conductor.port")?)?;
    let (first, last) = base.port_range().map_err(|e| e.to_string())?;
    let config = dir.join("rama.yaml");
    let data = dir.join("data");
    std::fs::write(
        &config,
        format!(
            "# Written by `rama dev`: a one-machine cluster on loopback.\n\
             zookeeper.servers: [\"127.0.0.1\"]\nzookeeper.port: {zk}\n\
             conductor.host: \"127.0.0.1\"\nconductor.port: {conductor_port}\n\
             supervisor.host: \"127.0.0.1\"\nsupervisor.port.range: [{first}, {last}]\n\
             local.dir: {:?}\n",
            data.display().to_string()
        ),
    )
    .map_err(|e| format!("writing {}: {e}", config.display()))?;
    // The cluster secret (cluster.secret.file's default, beside rama.yaml):
    // made once, kept when --dir is used again.
    let secret = dir.join("cluster.secret");
    if !secret.exists() {
        net::auth::Secret::create(&secret, false).map_err(|e| e.to_string())?;
    }
    say!("rama dev: data and configuration in {}", dir.display());
    // One Supervisor, or one per replica: each its own node on a loopback
    // address of its own, with its own local.dir and a share of the ports.
    let rf = options.replication_factor.max(1);
    let mut supervisors = vec![(config.clone(), data.clone())];
    if rf > 1 {
        supervisors.clear();
        let span = (u32::from(last) - u32::from(first) + 1) / rf;
        for i in 1..=rf {
            let node = dir.join(format!("supervisor-{i}"));
            std::fs::create_dir_all(&node).map_err(|e| format!("creating {}: {e}", node.display()))?;
            let from = u32::from(first) + (i - 1) * span;
            let node_config = node.join("rama.yaml");
            let node_data = data.join(format!("supervisor-{i}"));
            std::fs::write(
                &node_config,
                format!(
                    "# Written by `rama dev`: Supervisor {i} of {rf}.\n\
                     zookeeper.servers: [\"127.0.0.1\"]\nzookeeper.port: {zk}\n\
                     conductor.host: \"127.0.0.1\"\nconductor.port: {conductor_port}\n\
                     supervisor.host: \"127.0.0.{i}\"\nsupervisor.port.range: [{from}, {}]\n\
                     local.dir: {:?}\ncluster.secret.file: {:?}\n",
                    from + span - 1,
                    node_data.display().to_string(),
                    secret.display().to_string()
                ),
            )
            .map_err(|e| format!("writing {}: {e}", node_config.display()))?;
            supervisors.push((node_config, node_data));
        }
    }
    let worker_dirs: Vec<PathBuf> = supervisors.iter().map(|(_, d)| d.clone()).collect();
    let _workers = WorkersGuard(worker_dirs.clone());
    let result = (|| -> Result<Vec<Daemon>, String> {
        let mut daemons = vec![start("zookeeper", &config, &["devZookeeper"], "ZooKeeper running")?];
        daemons.push(start("conductor", &config, &["conductor"], "admin API on")?);
        for (node_config, _) in &supervisors {
            daemons.push(start("supervisor", node_config, &["supervisor"], "supervisor ")?);
        }
        let shape = [options.tasks, options.threads, options.workers, rf].map(|n| n.to_string());
        let overrides = options
            .config_overrides
            .as_ref()
            .map(|p| {
                p.canonicalize()
                    .map_err(|e| format!("--configOverrides {}: {e}", p.display()))
            })
            .transpose()?
            .map(|p| p.display().to_string());
        let mut extra = Vec::new();
        if let Some(p) = &overrides {
            extra.extend(["--configOverrides", p.as_str()]);
        }
        let out = rama(
            &config,
            &[
                "deploy",
                "--action",
                "launch",
                "--jar",
                &jar.display().to_string(),
                "--module",
                &options.module,
                "--tasks",
                &shape[0],
                "--threads",
                &shape[1],
                "--workers",
                &shape[2],
                "--replicationFactor",
                &shape[3],
            ]
            .into_iter()
            .chain(extra)
            .collect::<Vec<_>>(),
        )?;
        say_raw!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            return Err(format!(
                "deploy failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(daemons)
    })();
    let mut daemons = match result {
        Ok(d) => d,
        Err(e) => {
            worker_dirs.iter().for_each(|d| kill_workers(d));
            if temporary {
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Err(e);
        }
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let r = format!("{} --config {}", exe.display(), config.display());
    let m = &options.module;
    say!();
    say!("rama dev: {m} is running. Admin API (Conductor) at 127.0.0.1:{conductor_port}; ZooKeeper at 127.0.0.1:{zk}.");
    if m == "WordCountModule" {
        say!("Try, from another shell:");
        say!(
            "  {r} depotAppend {m} {} {}",
            quote("*sentences"),
            quote("\"the quick brown fox\"")
        );
        say!(
            "  {r} pstateSelect {m} {} {}",
            quote("$$wordCounts"),
            quote("[\"fox\"]")
        );
        say!("  {r} queryInvoke {m} topWords 3");
    }
    say!("  {r} moduleStatus {m}");
    say!("  {r} taskGroupsStatus {m}");
    say!("Logs in {}. Ctrl-C stops everything.", dir.join("logs").display());
    let _ = std::io::stdout().flush();
    while !stop.load(Ordering::SeqCst) {
        if let Some(d) = daemons
            .iter_mut()
            .find_map(|d| (!matches!(d.child.try_wait(), Ok(None))).then_some(d.name))
        {
            say!("rama dev: {d} exited; stopping the rest");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    say!("rama dev: stopping");
    let out = rama(&config, &["destroy", m]);
    match &out {
        Ok(o) => say_raw!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => say!("rama dev: destroy: {e}"),
    }
    worker_dirs.iter().for_each(|d| kill_workers(d));
    // Supervisor, Conductor, then ZooKeeper.
    while let Some(mut d) = daemons.pop() {
        d.stop();
        say!("rama dev: {} stopped", d.name);
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    say!("rama dev: stopped");
    Ok(())
}
