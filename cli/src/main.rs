//! `rama`: the command line of a cluster.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage. The configuration is `rama.yaml`
//! from `--config`, else `RAMA_CONFIG`, else the working directory (a
//! missing file means all defaults).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use control::config::Config;
use control::devzk::DevZookeeper;

#[derive(Debug, Parser)]
#[command(name = "rama", version, about = "Operate a rama cluster")]
struct Cli {
    /// The configuration file (default: $RAMA_CONFIG, else ./rama.yaml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Prints the value of a configuration key (set in rama.yaml, or its
    /// default).
    #[command(name = "confValue")]
    ConfValue {
        /// The key, e.g. zookeeper.port.
        key: String,
    },
    /// Runs a development ZooKeeper server (Debian's zookeeper package) on
    /// zookeeper.port with its data under local.dir, until interrupted.
    #[command(name = "devZookeeper")]
    DevZookeeper,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn config(cli: &Cli) -> Result<Config, String> {
    let (path, required) = match (&cli.config, std::env::var_os("RAMA_CONFIG")) {
        (Some(p), _) => (p.clone(), true),
        (None, Some(p)) => (PathBuf::from(p), true),
        (None, None) => (PathBuf::from("rama.yaml"), false),
    };
    let path = if path.is_absolute() {
        path
    } else {
        std::env::current_dir().map_err(|e| e.to_string())?.join(path)
    };
    Config::load(&path, required).map_err(|e| e.to_string())
}

fn dev_zookeeper(config: &Config) -> Result<(), String> {
    // SAFETY: installs an async-signal-safe handler (it only stores to an
    // atomic).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut zk = DevZookeeper::start(config).map_err(|e| e.to_string())?;
    println!(
        "ZooKeeper running on {}:{} (pid {}); log {}; Ctrl-C stops it",
        zk.host,
        zk.port,
        zk.pid(),
        zk.log.display()
    );
    while !STOP.load(Ordering::SeqCst) {
        if let Some(status) = zk.exited() {
            return Err(format!("ZooKeeper exited ({status}); see {}", zk.log.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    zk.stop();
    // Whoever started us may have closed our stdout; that is no failure.
    let _ = writeln!(std::io::stdout(), "ZooKeeper stopped");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = config(&cli).and_then(|config| match &cli.command {
        Cmd::ConfValue { key } => config.display(key).map(|v| println!("{v}")).map_err(|e| e.to_string()),
        Cmd::DevZookeeper => dev_zookeeper(&config),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rama: {e}");
            ExitCode::FAILURE
        }
    }
}
