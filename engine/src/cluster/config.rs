//! A module's engine configuration: the limits and queue sizes its task
//! threads run with. Defaults are what the engine was measured with;
//! workers take overrides from their worker configuration
//! (`worker.child.opts`, see [`ModuleConfig::set_option`]).

use crate::error::{Error, Result};
use crate::log::LogConfig;
use crate::lsm::LsmConfig;

/// Limits and queue sizes of one module's task threads.
#[derive(Debug, Clone)]
pub struct ModuleConfig {
    /// Messages each of a task thread's channels holds (client requests,
    /// internal appends, microbatch control, each stage level).
    pub channel_capacity: usize,
    /// Client requests a task thread works on at once.
    pub client_inflight: u64,
    /// Stage batches per stage level a task thread works on at once.
    pub stage_inflight: u64,
    /// Topology appends a task thread works on at once.
    pub internal_inflight: u64,
    /// Microbatch control messages a task thread works on at once.
    pub control_inflight: u64,
    /// Bytes of depot records a stream consumer reads per batch.
    pub stream_batch_bytes: usize,
    /// Times a stream consumer retries a failed record alone before it
    /// reports the failure.
    pub stream_retries: u32,
    /// Records per depot partition in one microbatch at most.
    pub microbatch_records_max: u64,
    /// Events a proxy's channel holds before it is told to re-select.
    pub proxy_events_max: usize,
    /// How often a task thread syncs its depot partitions and lets its
    /// task group log be trimmed below them (see `replog.rs`).
    pub checkpoint_interval: std::time::Duration,
    /// Bytes of depot appends the task group log may hold past the PState
    /// tables before a checkpoint flushes the memtable (bounds the log and
    /// the replay when a task thread opens).
    pub replog_entry_bytes_max: u64,
    /// Depot partitions' logs (record size limit, pending bytes, segments).
    /// They are materializations of the task group log, never synced per
    /// append (`sync` is turned off when they are opened).
    pub log: LogConfig,
    /// PState stores (key, value and batch limits, memtable size, WAL).
    pub lsm: LsmConfig,
    /// Replicas of every task group (see [`ReplicationConfig`]).
    pub replication: ReplicationConfig,
}

/// How a module's task groups are replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Replicas of every task group (`--replicationFactor`), 1 to 9; 1
    /// runs the task group alone, without the replication protocol.
    pub factor: u32,
    /// `replication.min.isr`: entries are applied only while at least this
    /// many replicas are in sync. `None`: factor - 1; clamped to 1..=factor.
    pub min_isr: Option<u32>,
    /// `replication.max.time.lag.millis`: an in-sync follower that has not
    /// caught up with the leader's log for this long leaves the ISR (if
    /// the ISR stays at min-ISR or above). 10 s by default: long enough
    /// for a loaded machine's fsync stalls and garbage-free pauses, short
    /// enough that a dead follower stalls appends for 10 s at most.
    pub max_lag: std::time::Duration,
    /// A fetch unanswered for this long is sent again.
    pub fetch_timeout: std::time::Duration,
    /// Entries of the task group log a leader keeps below its applied
    /// offset for followers that lag or are down; one that falls further
    /// behind needs the task group's files (far-horizon catch-up).
    pub retained_entries: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            factor: 1,
            min_isr: None,
            max_lag: std::time::Duration::from_secs(10),
            fetch_timeout: std::time::Duration::from_secs(1),
            retained_entries: 1_000_000,
        }
    }
}

impl ReplicationConfig {
    /// The min-ISR in effect: as set, or factor - 1, within 1..=factor.
    pub fn min_isr(&self) -> u32 {
        self.min_isr
            .unwrap_or(self.factor.saturating_sub(1))
            .clamp(1, self.factor.max(1))
    }

    /// The replication core's settings.
    pub fn settings(&self) -> crate::replication::Settings {
        crate::replication::Settings {
            min_isr: self.min_isr() as usize,
            max_lag_ms: self.max_lag.as_millis() as u64,
            fetch_timeout_ms: self.fetch_timeout.as_millis() as u64,
            ..crate::replication::Settings::default()
        }
    }
}

impl Default for ModuleConfig {
    fn default() -> Self {
        ModuleConfig {
            channel_capacity: 1024,
            client_inflight: 1024,
            stage_inflight: 256,
            internal_inflight: 256,
            control_inflight: 64,
            stream_batch_bytes: 256 << 10,
            stream_retries: 3,
            microbatch_records_max: 1000,
            proxy_events_max: 1024,
            checkpoint_interval: std::time::Duration::from_secs(1),
            replog_entry_bytes_max: 256 << 20,
            log: LogConfig::default(),
            lsm: LsmConfig::default(),
            replication: ReplicationConfig::default(),
        }
    }
}

/// The options a worker configuration may set: (flag, what it sets).
pub const OPTIONS: &[(&str, &str)] = &[
    ("--channelCapacity", "messages per task-thread channel (16..=65536)"),
    (
        "--clientInflight",
        "client requests a task thread works on at once (1..=65536)",
    ),
    (
        "--stageInflight",
        "stage batches per level a task thread works on at once (1..=65536)",
    ),
    (
        "--streamBatchBytes",
        "bytes a stream consumer reads per batch (4096..=67108864)",
    ),
    ("--streamRetries", "retries of a failed stream record (0..=100)"),
    (
        "--microbatchMaxRecords",
        "records per depot partition per microbatch (1..=1000000)",
    ),
    ("--recordBytesMax", "largest depot record in bytes (1024..=67108864)"),
];

fn bounded(flag: &str, value: &str, least: u64, most: u64) -> Result<u64> {
    value
        .parse::<u64>()
        .ok()
        .filter(|v| (least..=most).contains(v))
        .ok_or_else(|| {
            Error::Schema(format!(
                "worker option {flag} {value}: takes a whole number from {least} to {most}"
            ))
        })
}

impl ModuleConfig {
    /// Sets the option `flag` (one of [`OPTIONS`]) to `value`, checked.
    pub fn set_option(&mut self, flag: &str, value: &str) -> Result<()> {
        match flag {
            "--channelCapacity" => self.channel_capacity = bounded(flag, value, 16, 65536)? as usize,
            "--clientInflight" => self.client_inflight = bounded(flag, value, 1, 65536)?,
            "--stageInflight" => self.stage_inflight = bounded(flag, value, 1, 65536)?,
            "--streamBatchBytes" => self.stream_batch_bytes = bounded(flag, value, 4096, 64 << 20)? as usize,
            "--streamRetries" => self.stream_retries = bounded(flag, value, 0, 100)? as u32,
            "--microbatchMaxRecords" => self.microbatch_records_max = bounded(flag, value, 1, 1_000_000)?,
            "--recordBytesMax" => {
                let max = bounded(flag, value, 1024, 64 << 20)? as u32;
                self.log.record_bytes_max = max;
                // The log must hold a frame of one such record.
                self.log.pending_bytes_max = self.log.pending_bytes_max.max(2 * max as usize);
                self.log.segment_bytes_max = self.log.segment_bytes_max.max(2 * u64::from(max));
            }
            _ => {
                return Err(Error::Schema(format!(
                    "unknown worker option {flag} (known: {})",
                    OPTIONS.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Checks the whole configuration (the logs' and stores' own rules
    /// included).
    pub fn validate(&self) -> Result<()> {
        if self.channel_capacity < 16 || self.client_inflight == 0 || self.stage_inflight == 0 {
            return Err(Error::Config {
                key: "ModuleConfig",
                value: format!(
                    "channel_capacity {} client_inflight {} stage_inflight {}",
                    self.channel_capacity, self.client_inflight, self.stage_inflight
                ),
                reason: "channels hold at least 16 messages and at least one request is served at a time",
            });
        }
        let r = &self.replication;
        if !(1..=9).contains(&r.factor) {
            return Err(Error::Config {
                key: "replicationFactor",
                value: r.factor.to_string(),
                reason: "a task group has 1 to 9 replicas",
            });
        }
        if r.min_isr.is_some_and(|m| m == 0 || m > r.factor) {
            return Err(Error::Config {
                key: "replication.min.isr",
                value: format!("{:?} (replication factor {})", r.min_isr, r.factor),
                reason: "min-ISR is from 1 to the replication factor",
            });
        }
        if r.max_lag < std::time::Duration::from_millis(100) || r.fetch_timeout < std::time::Duration::from_millis(10) {
            return Err(Error::Config {
                key: "replication.max.time.lag.millis",
                value: format!("{:?} (fetch timeout {:?})", r.max_lag, r.fetch_timeout),
                reason: "the lag bound is at least 100 ms and the fetch timeout at least 10 ms",
            });
        }
        self.log.validate()?;
        self.lsm.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_applied() {
        let mut c = ModuleConfig::default();
        c.validate().unwrap();
        c.set_option("--streamBatchBytes", "65536").unwrap();
        c.set_option("--microbatchMaxRecords", "50").unwrap();
        c.set_option("--recordBytesMax", "4194304").unwrap();
        assert_eq!(c.stream_batch_bytes, 65536);
        assert_eq!(c.microbatch_records_max, 50);
        assert_eq!(c.log.record_bytes_max, 4 << 20);
        c.validate().unwrap();
        for (flag, value, why) in [
            ("--channelCapacity", "1", "from 16 to 65536"),
            ("--streamRetries", "x", "whole number"),
            ("--noSuch", "1", "unknown worker option --noSuch"),
        ] {
            let e = c.set_option(flag, value).unwrap_err().to_string();
            assert!(e.contains(why), "{flag}: {e}");
        }
    }
}
