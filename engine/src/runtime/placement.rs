//! Where a module's tasks run: tasks over task threads, task threads over
//! worker processes.
//!
//! The rules (they follow the operator's expectations from the seed):
//! - tasks are a power of two, and `tasks >= threads >= workers >= 1`;
//! - tasks spread as evenly as possible over threads (task `t` runs on
//!   thread `t % threads`, so thread sizes differ by at most one);
//! - threads spread as evenly as possible over workers (thread counts per
//!   worker differ by at most one), and among those spreads the one that
//!   balances tasks per worker: the largest threads go, one at a time, to
//!   the least-loaded worker that still has room.
//!
//! For 64 tasks, 9 threads and 9 workers this gives eight workers with
//! seven tasks and one with eight.

use std::fmt;

/// Why a parallelism was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("tasks must be a power of two, got {tasks}")]
    TasksNotPowerOfTwo { tasks: u32 },
    #[error("threads must be at least 1 and at most tasks ({tasks}), got {threads}")]
    Threads { tasks: u32, threads: u32 },
    #[error("workers must be at least 1 and at most threads ({threads}), got {workers}")]
    Workers { threads: u32, workers: u32 },
}

/// A module's parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Parallelism {
    pub tasks: u32,
    pub threads: u32,
    pub workers: u32,
}

impl Parallelism {
    /// Checks the rules and returns the parallelism.
    pub fn new(tasks: u32, threads: u32, workers: u32) -> Result<Parallelism, PlacementError> {
        if !tasks.is_power_of_two() {
            return Err(PlacementError::TasksNotPowerOfTwo { tasks });
        }
        if threads == 0 || threads > tasks {
            return Err(PlacementError::Threads { tasks, threads });
        }
        if workers == 0 || workers > threads {
            return Err(PlacementError::Workers { threads, workers });
        }
        Ok(Parallelism {
            tasks,
            threads,
            workers,
        })
    }
}

impl fmt::Display for Parallelism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tasks on {} threads in {} workers",
            self.tasks, self.threads, self.workers
        )
    }
}

/// The computed placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub parallelism: Parallelism,
    /// The task thread of each task.
    pub thread_of_task: Vec<u32>,
    /// The worker of each task thread.
    pub worker_of_thread: Vec<u32>,
}

impl Placement {
    pub fn new(p: Parallelism) -> Placement {
        let thread_of_task: Vec<u32> = (0..p.tasks).map(|t| t % p.threads).collect();
        let mut tasks_of_thread = vec![0u32; p.threads as usize];
        for &th in &thread_of_task {
            tasks_of_thread[th as usize] += 1;
        }
        // Thread slots per worker differ by at most one.
        let base = p.threads / p.workers;
        let extra = p.threads % p.workers;
        let mut slots: Vec<u32> = (0..p.workers).map(|w| base + u32::from(w < extra)).collect();
        let mut load = vec![0u32; p.workers as usize];
        // Largest threads first, each to the least-loaded worker with a free
        // slot (ties to the lower worker index, for a stable result).
        let mut order: Vec<u32> = (0..p.threads).collect();
        order.sort_by_key(|&th| (std::cmp::Reverse(tasks_of_thread[th as usize]), th));
        let mut worker_of_thread = vec![0u32; p.threads as usize];
        for th in order {
            let w = (0..p.workers as usize)
                .filter(|&w| slots[w] > 0)
                .min_by_key(|&w| (load[w], w))
                .expect("total slots equal the number of threads");
            slots[w] -= 1;
            load[w] += tasks_of_thread[th as usize];
            worker_of_thread[th as usize] = w as u32;
        }
        Placement {
            parallelism: p,
            thread_of_task,
            worker_of_thread,
        }
    }

    /// Tasks of task thread `thread`, ascending.
    pub fn tasks_of_thread(&self, thread: u32) -> Vec<u32> {
        (0..self.parallelism.tasks)
            .filter(|&t| self.thread_of_task[t as usize] == thread)
            .collect()
    }

    /// Task threads of worker `worker`, ascending.
    pub fn threads_of_worker(&self, worker: u32) -> Vec<u32> {
        (0..self.parallelism.threads)
            .filter(|&th| self.worker_of_thread[th as usize] == worker)
            .collect()
    }

    /// Number of tasks on each worker.
    pub fn tasks_per_worker(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.parallelism.workers as usize];
        for &th in &self.thread_of_task {
            out[self.worker_of_thread[th as usize] as usize] += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_example_64_tasks_9_threads_9_workers() {
        let p = Placement::new(Parallelism::new(64, 9, 9).unwrap());
        let mut per_worker = p.tasks_per_worker();
        per_worker.sort_unstable();
        assert_eq!(per_worker, vec![7, 7, 7, 7, 7, 7, 7, 7, 8]);
    }

    #[test]
    fn uneven_threads_over_workers_balance_tasks() {
        // Threads of 3,3,3,3,2,2 tasks over 4 workers (2,2,1,1 slots): the
        // best achievable worst worker holds 5 tasks.
        let p = Placement::new(Parallelism::new(16, 6, 4).unwrap());
        assert_eq!(p.tasks_per_worker().iter().max(), Some(&5));
        assert_eq!(p.tasks_per_worker().iter().sum::<u32>(), 16);
        for w in 0..4 {
            let n = p.threads_of_worker(w).len();
            assert!((1..=2).contains(&n), "worker {w} has {n} threads");
        }
    }

    #[test]
    fn every_valid_parallelism_is_even() {
        for tasks in [1u32, 2, 4, 8, 16, 32, 64] {
            for threads in 1..=tasks.min(20) {
                for workers in 1..=threads {
                    let p = Placement::new(Parallelism::new(tasks, threads, workers).unwrap());
                    let sizes: Vec<usize> = (0..threads).map(|th| p.tasks_of_thread(th).len()).collect();
                    assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
                    let slots: Vec<usize> = (0..workers).map(|w| p.threads_of_worker(w).len()).collect();
                    assert!(slots.iter().max().unwrap() - slots.iter().min().unwrap() <= 1);
                    assert!(slots.iter().all(|&s| s >= 1));
                }
            }
        }
    }

    #[test]
    fn bad_parallelism_is_refused_with_the_rule() {
        assert_eq!(
            Parallelism::new(12, 4, 2),
            Err(PlacementError::TasksNotPowerOfTwo { tasks: 12 })
        );
        assert_eq!(
            Parallelism::new(8, 16, 2),
            Err(PlacementError::Threads { tasks: 8, threads: 16 })
        );
        assert_eq!(
            Parallelism::new(8, 4, 5),
            Err(PlacementError::Workers { threads: 4, workers: 5 })
        );
        assert_eq!(
            Parallelism::new(8, 0, 0),
            Err(PlacementError::Threads { tasks: 8, threads: 0 })
        );
        assert!(Parallelism::new(12, 4, 2)
            .unwrap_err()
            .to_string()
            .contains("power of two"));
    }
}
