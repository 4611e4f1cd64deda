//! `rama devZookeeper`: one Apache ZooKeeper server from Debian's
//! `zookeeper` package, for development and tests.
//!
//! It listens on the first internal `zookeeper.servers` host (127.0.0.1
//! when unset) and `zookeeper.port`, keeps its data under
//! `<local.dir>/zookeeper` and its log in `<local.dir>/logs/zookeeper.log`.
//! The admin HTTP server is off and only the `ruok` and `srvr` four-letter
//! commands are on (`ruok` is how readiness is checked).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError, Side};

/// Where Debian's package puts the server jar; `RAMA_ZOOKEEPER_JAR`
/// overrides it.
pub const DEBIAN_JAR: &str = "/usr/share/java/zookeeper.jar";

#[derive(Debug, thiserror::Error)]
pub enum DevZkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "ZooKeeper is not installed ({jar} is missing); install Debian's package: \
         apt-get install zookeeper (scripts/install-deps does it)"
    )]
    NotInstalled { jar: PathBuf },
    #[error("cannot run java ({0}); ZooKeeper needs a Java runtime: apt-get install default-jre-headless")]
    NoJava(std::io::Error),
    #[error("{host}:{port} is already in use (zookeeper.port); stop what uses it or choose another port")]
    PortInUse { host: String, port: u16 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ZooKeeper exited ({status}) before it was ready; see {log}")]
    Exited { status: String, log: PathBuf },
    #[error("ZooKeeper did not answer ruok within {0:?}; see {1}")]
    NotReady(Duration, PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevZkError {
    let what = what.into();
    move |source| DevZkError::Io { what, source }
}

/// A running ZooKeeper server; stopped (by its process id) when dropped.
#[derive(Debug)]
pub struct DevZookeeper {
    child: Child,
    pub host: String,
    pub port: u16,
    pub log: PathBuf,
}

/// Asks the server at `host:port` whether it is running (`ruok`).
pub fn ruok(host: &str, port: u16) -> bool {
    let Ok(mut addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    let Some(addr) = addrs.next() else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"ruok").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer == "imok"
}

fn zoo_cfg(data: &Path, host: &str, port: u16) -> String {
    format!(
        "# Written by rama devZookeeper.\n\
         tickTime=500\n\
         initLimit=40\n\
         syncLimit=20\n\
         maxSessionTimeout=60000\n\
         dataDir={}\n\
         clientPort={port}\n\
         clientPortAddress={host}\n\
         maxClientCnxns=0\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=ruok,srvr\n\
         autopurge.purgeInterval=1\n",
        data.display()
    )
}

impl DevZookeeper {
    /// Starts ZooKeeper as `config` says and waits until it answers.
    pub fn start(config: &Config) -> Result<DevZookeeper, DevZkError> {
        let jar = std::env::var_os("RAMA_ZOOKEEPER_JAR").map_or_else(|| PathBuf::from(DEBIAN_JAR), PathBuf::from);
        if !jar.is_file() {
            return Err(DevZkError::NotInstalled { jar });
        }
        let host = match config.get("zookeeper.servers") {
            Some(_) => config.hosts("zookeeper.servers", Side::Internal)?.remove(0),
            None => "127.0.0.1".to_string(),
        };
        let port = config.port("zookeeper.port")?;
        if TcpListener::bind((host.as_str(), port)).is_err() {
            return Err(DevZkError::PortInUse { host, port });
        }
        let local = config.local_dir()?;
        let data = local.join("zookeeper");
        let logs = crate::logging::Logging::beside(config)?.dir;
        std::fs::create_dir_all(&data).map_err(io(format!("creating {}", data.display())))?;
        std::fs::create_dir_all(&logs).map_err(io(format!("creating {}", logs.display())))?;
        let data = data
            .canonicalize()
            .map_err(io(format!("resolving {}", data.display())))?;
        let cfg = data.join("zoo.cfg");
        std::fs::write(&cfg, zoo_cfg(&data, &host, port)).map_err(io(format!("writing {}", cfg.display())))?;
        let log = logs.join("zookeeper.log");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(io("duplicating the log file"))?;
        let mut classpath = jar.display().to_string();
        if Path::new("/etc/zookeeper/conf").is_dir() {
            classpath = format!("/etc/zookeeper/conf:{classpath}");
        }
        let mut command = Command::new("java");
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                // If whoever started ZooKeeper dies without stopping it, it
                // stops too: never an orphaned server.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .arg("-cp")
            .arg(classpath)
            .arg(format!("-Dzookeeper.log.dir={}", logs.display()))
            .arg("-Dzookeeper.root.logger=INFO,CONSOLE")
            .arg("-Xmx256m")
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(DevZkError::NoJava)?;
        let mut zk = DevZookeeper { child, host, port, log };
        zk.wait_ready(Duration::from_secs(60))?;
        Ok(zk)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), DevZkError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io("waiting for ZooKeeper"))? {
                return Err(DevZkError::Exited {
                    status: status.to_string(),
                    log: self.log.clone(),
                });
            }
            if ruok(&self.host, self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(DevZkError::NotReady(limit, self.log.clone()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's exit status if it has stopped.
    pub fn exited(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten().map(|s| s.to_string())
    }

    /// Stops the server: SIGTERM to its process id, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        crate::process::stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
    }
}

impl Drop for DevZookeeper {
    fn drop(&mut self) {
        self.stop();
    }
}
