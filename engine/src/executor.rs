//! Starting a task thread's glommio executor with settings that fit the
//! machine (io_uring registered memory counts against `RLIMIT_MEMLOCK`).

use std::future::Future;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::error::{Error, Result};

/// Settings of one task thread's executor.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Memory registered with io_uring for this thread. It counts against
    /// the locked-memory limit (`ulimit -l`), shared by all threads of the
    /// process. Default 1 MiB.
    pub io_memory_bytes: usize,
    /// io_uring submission queue depth. Default 128.
    pub ring_depth: usize,
    /// Spin this long before parking an idle thread; cuts wake-up latency
    /// at the cost of CPU. Default: park at once.
    pub spin_before_park: Option<Duration>,
    /// Pin the thread to this CPU. Default: not pinned.
    pub pin_to_cpu: Option<usize>,
    /// Thread name, shown in panics.
    pub name: String,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            io_memory_bytes: 1 << 20,
            ring_depth: 128,
            spin_before_park: None,
            pin_to_cpu: None,
            name: "rama-task".into(),
        }
    }
}

impl ExecutorConfig {
    fn builder(&self) -> LocalExecutorBuilder {
        let placement = match self.pin_to_cpu {
            Some(cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let mut b = LocalExecutorBuilder::new(placement)
            .name(&self.name)
            .io_memory(self.io_memory_bytes)
            .ring_depth(self.ring_depth);
        if let Some(spin) = self.spin_before_park {
            b = b.spin_before_park(spin);
        }
        b
    }

    /// Runs `fut` to completion on a new executor on the current thread.
    pub fn block_on<T>(&self, fut: impl Future<Output = T>) -> Result<T> {
        let executor = self.builder().make().map_err(|e| self.explain(e.to_string()))?;
        Ok(executor.run(fut))
    }

    /// Runs the future made by `make` on a new thread with its own executor
    /// and waits for its result.
    pub fn run_on_thread<T, F, G>(&self, make: G) -> Result<T>
    where
        G: FnOnce() -> F + Send + 'static,
        F: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let handle = self.builder().spawn(make).map_err(|e| self.explain(e.to_string()))?;
        handle
            .join()
            .map_err(|e| Error::Executor(format!("task thread failed: {e}")))
    }

    fn explain(&self, e: String) -> Error {
        Error::Executor(format!(
            "{e} (each task thread registers io_memory_bytes = {} with io_uring, which counts against \
             the locked-memory limit shown by `ulimit -l`; lower io_memory_bytes or raise the limit)",
            self.io_memory_bytes
        ))
    }
}
