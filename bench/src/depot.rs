//! Depot log benchmarks: batched appends, durable single appends and many
//! concurrent appenders. The first two run side by side with the raw
//! `pwrite` + `fdatasync` loop: interleaved in rounds, each round doing a
//! slice of our appends and then the same slice of every raw loop, so that
//! drift in the machine's load hits all of them alike.

use std::path::Path;
use std::time::{Duration, Instant};

use engine::executor::ExecutorConfig;
use engine::log::{format, Log, LogConfig};
use hdrhistogram::Histogram;

use crate::raw::{Layout, RawFile};
use crate::results::{
    ensure, new_histogram, record, BenchResult, DepotBatched, DepotConcurrent, DepotSingle, Latency, LatencyRun,
    Throughput,
};

/// Payload size of every record.
pub const RECORD_BYTES: usize = 100;
/// Write size of the raw loop next to single appends (one page).
const RAW_SINGLE_WRITE_BYTES: usize = 4096;

/// How much each depot benchmark does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Records appended in benchmark 1.
    pub batched_records: u64,
    /// Records per `append_batch`.
    pub batch_records: usize,
    /// Appends of benchmark 2.
    pub single_appends: u64,
    /// Rounds benchmarks 1 and 2 are interleaved in.
    pub rounds: u64,
    /// Appender tasks of benchmark 3.
    pub concurrent_tasks: usize,
    /// Appends per task in benchmark 3.
    pub appends_per_task: u64,
}

/// Operations timed one by one, summed over rounds.
#[derive(Debug)]
struct Tally {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ops: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            latency: new_histogram(),
        }
    }

    fn add(&mut self, ops: u64, bytes: u64, took: Duration) {
        self.ops += ops;
        self.bytes += bytes;
        self.elapsed += took;
        record(&mut self.latency, took);
    }

    fn throughput(&self) -> Throughput {
        Throughput::new(self.ops, self.bytes, self.elapsed)
    }

    fn latency_run(&self) -> LatencyRun {
        LatencyRun {
            throughput: self.throughput(),
            latency: Latency::from_histogram(&self.latency),
        }
    }
}

/// A new record payload: a tag in the first 8 bytes (see [`set_tag`]),
/// then a fixed pattern.
fn new_record() -> Vec<u8> {
    (0..RECORD_BYTES).map(|i| i as u8).collect()
}

fn set_tag(tag: u64, record: &mut [u8]) {
    record[..8].copy_from_slice(&tag.to_le_bytes());
}

/// The tag of a record read back, after checking the rest of it.
fn tag_of(payload: &[u8]) -> BenchResult<u64> {
    ensure(
        payload.len() == RECORD_BYTES && payload[8..].iter().enumerate().all(|(i, &b)| b == (i + 8) as u8),
        || {
            format!(
                "record payload of {} bytes does not match what was written",
                payload.len()
            )
        },
    )?;
    Ok(u64::from_le_bytes(payload[..8].try_into().expect("8 bytes")))
}

/// Runs `make`'s future on a fresh task thread.
fn on_task_thread<T, F, G>(name: &str, make: G) -> BenchResult<T>
where
    G: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = BenchResult<T>> + 'static,
    T: Send + 'static,
{
    let config = ExecutorConfig {
        name: format!("bench-{name}"),
        ..ExecutorConfig::default()
    };
    config.run_on_thread(make)?
}

/// Reopens the log in `dir` (recovery included) and checks that record
/// `offset` carries tag `expected(offset)`; returns the records read.
async fn read_back(dir: &Path, expected: impl Fn(u64) -> u64) -> BenchResult<u64> {
    let (log, recovery) = Log::open(dir, LogConfig::default()).await?;
    ensure(recovery.truncated_bytes == 0, || {
        format!("reopen truncated: {recovery:?}")
    })?;
    let end = log.end_offset();
    let mut next = 0u64;
    while next < end {
        let records = log.read(next, end, 4 << 20).await?;
        ensure(!records.is_empty(), || {
            format!("read at offset {next} returned nothing")
        })?;
        for r in records {
            ensure(r.offset == next, || {
                format!("read offset {} where {next} was due", r.offset)
            })?;
            let tag = tag_of(&r.payload)?;
            ensure(tag == expected(next), || {
                format!("record {next} has tag {tag}, expected {}", expected(next))
            })?;
            next += 1;
        }
    }
    log.close().await?;
    Ok(next)
}

/// Ends a side-by-side run: closes our log, removes the raw loops' files,
/// reopens the log to verify every record (record `i` tagged `i`) and
/// removes it; returns the records read back.
async fn finish(log: Log, log_dir: &Path, raw: [RawFile; 2]) -> BenchResult<u64> {
    log.close().await?;
    drop(log);
    for file in raw {
        file.remove()?;
    }
    let read = read_back(log_dir, |offset| offset).await?;
    std::fs::remove_dir_all(log_dir)?;
    Ok(read)
}

fn raw_file(dir: &Path, name: &str, layout: Layout, size: u64, write_bytes: usize) -> BenchResult<RawFile> {
    let path = dir.join(name);
    RawFile::create(path.clone(), layout, size, write_bytes)
        .map_err(|e| format!("creating raw file {}: {e}", path.display()).into())
}

fn raw_write(file: &mut RawFile, len: usize) -> BenchResult<Duration> {
    file.write_synced(len)
        .map_err(|e| format!("raw pwrite + fdatasync: {e}").into())
}

/// Benchmark 1: `Log::append_batch` of `batch_records` records at a time,
/// next to raw writes of the same sizes.
pub fn batched(plan: &Plan, dir: &Path) -> BenchResult<DepotBatched> {
    let plan = plan.clone();
    let dir = dir.to_path_buf();
    let records = plan.batched_records;
    let batch = plan.batch_records;
    let result = on_task_thread("batched", move || async move {
        let log_dir = dir.join("depot-batched");
        let (log, _) = Log::open(&log_dir, LogConfig::default()).await?;
        let total_bytes = records * RECORD_BYTES as u64;
        let batch_bytes = batch * RECORD_BYTES;
        let mut growing = raw_file(&dir, "raw-batched-growing", Layout::Growing, total_bytes, batch_bytes)?;
        let mut prewritten = raw_file(
            &dir,
            "raw-batched-prewritten",
            Layout::Prewritten,
            total_bytes,
            batch_bytes,
        )?;
        let (mut ours, mut raw_g, mut raw_p) = (Tally::new(), Tally::new(), Tally::new());
        let batches = records.div_ceil(batch as u64);
        let per_round = batches.div_ceil(plan.rounds);
        let mut buf: Vec<u8> = (0..batch).flat_map(|_| new_record()).collect();
        let mut next = 0u64;
        while next < records {
            // Record counts of this round's batches.
            let round: Vec<usize> = (0..per_round)
                .map(|i| (records.saturating_sub(next + i * batch as u64)).min(batch as u64) as usize)
                .filter(|&n| n > 0)
                .collect();
            for &n in &round {
                let bytes = &mut buf[..n * RECORD_BYTES];
                for (i, rec) in bytes.chunks_mut(RECORD_BYTES).enumerate() {
                    set_tag(next + i as u64, rec);
                }
                let start = Instant::now();
                let range = log.append_batch(bytes.chunks(RECORD_BYTES)).await?;
                ours.add(n as u64, (n * RECORD_BYTES) as u64, start.elapsed());
                ensure(range == (next..next + n as u64), || {
                    format!("batch got offsets {range:?}")
                })?;
                next += n as u64;
            }
            for (file, tally) in [(&mut growing, &mut raw_g), (&mut prewritten, &mut raw_p)] {
                for &n in &round {
                    let took = raw_write(file, n * RECORD_BYTES)?;
                    tally.add(1, (n * RECORD_BYTES) as u64, took);
                }
            }
        }
        let read = finish(log, &log_dir, [growing, prewritten]).await?;
        Ok(DepotBatched {
            record_bytes: RECORD_BYTES,
            batch_records: batch,
            rounds: plan.rounds,
            ours: ours.throughput(),
            // Each awaited `append_batch` is one group commit: one frame.
            ours_frame_bytes: records / batch as u64
                * format::frame_bytes(std::iter::repeat_n(RECORD_BYTES, batch)) as u64,
            ours_read_back: read,
            raw_growing: raw_g.throughput(),
            raw_prewritten: raw_p.throughput(),
        })
    })?;
    result.ours.check("batched appends", records)?;
    ensure(result.ours_read_back == records, || {
        format!("read back {} of {records} batched records", result.ours_read_back)
    })?;
    let writes = records.div_ceil(batch as u64);
    result.raw_growing.check("raw batched loop (growing)", writes)?;
    result.raw_prewritten.check("raw batched loop (pre-written)", writes)?;
    Ok(result)
}

/// Benchmark 2: `Log::append` of one record at a time, one in flight, next
/// to raw 4 KiB writes.
pub fn single(plan: &Plan, dir: &Path) -> BenchResult<DepotSingle> {
    let plan = plan.clone();
    let dir = dir.to_path_buf();
    let appends = plan.single_appends;
    let result = on_task_thread("single", move || async move {
        let log_dir = dir.join("depot-single");
        let (log, _) = Log::open(&log_dir, LogConfig::default()).await?;
        let size = appends * RAW_SINGLE_WRITE_BYTES as u64;
        let w = RAW_SINGLE_WRITE_BYTES;
        let mut growing = raw_file(&dir, "raw-single-growing", Layout::Growing, size, w)?;
        let mut prewritten = raw_file(&dir, "raw-single-prewritten", Layout::Prewritten, size, w)?;
        let (mut ours, mut raw_g, mut raw_p) = (Tally::new(), Tally::new(), Tally::new());
        let per_round = appends.div_ceil(plan.rounds);
        let mut rec = new_record();
        let mut next = 0u64;
        while next < appends {
            let n = per_round.min(appends - next);
            for i in next..next + n {
                set_tag(i, &mut rec);
                let start = Instant::now();
                let offset = log.append(&rec).await?;
                ours.add(1, RECORD_BYTES as u64, start.elapsed());
                ensure(offset == i, || format!("append {i} got offset {offset}"))?;
            }
            for (file, tally) in [(&mut growing, &mut raw_g), (&mut prewritten, &mut raw_p)] {
                for _ in 0..n {
                    tally.add(1, w as u64, raw_write(file, w)?);
                }
            }
            next += n;
        }
        let read = finish(log, &log_dir, [growing, prewritten]).await?;
        Ok(DepotSingle {
            record_bytes: RECORD_BYTES,
            raw_write_bytes: RAW_SINGLE_WRITE_BYTES,
            rounds: plan.rounds,
            ours: ours.latency_run(),
            ours_read_back: read,
            raw_growing: raw_g.latency_run(),
            raw_prewritten: raw_p.latency_run(),
        })
    })?;
    result.ours.throughput.check("single appends", appends)?;
    ensure(result.ours.latency.samples == appends, || {
        "latency samples differ from appends".into()
    })?;
    ensure(result.ours_read_back == appends, || {
        format!("read back {} of {appends} single appends", result.ours_read_back)
    })?;
    result
        .raw_growing
        .throughput
        .check("raw single loop (growing)", appends)?;
    result
        .raw_prewritten
        .throughput
        .check("raw single loop (pre-written)", appends)?;
    Ok(result)
}

/// Benchmark 3: `concurrent_tasks` tasks on one task thread, each looping
/// `Log::append`; every acknowledged append is counted.
pub fn concurrent(plan: &Plan, dir: &Path) -> BenchResult<DepotConcurrent> {
    let tasks = plan.concurrent_tasks;
    let per_task = plan.appends_per_task;
    let total = tasks as u64 * per_task;
    let log_dir = dir.join("depot-concurrent");
    let result = on_task_thread("concurrent", move || async move {
        let (log, _) = Log::open(&log_dir, LogConfig::default()).await?;
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks as u64)
            .map(|task| {
                let log = log.clone();
                glommio::spawn_local(async move {
                    let mut rec = new_record();
                    let mut latency = new_histogram();
                    let mut offsets = Vec::with_capacity(per_task as usize);
                    for seq in 0..per_task {
                        set_tag(task << 32 | seq, &mut rec);
                        let t = Instant::now();
                        offsets.push(log.append(&rec).await?);
                        record(&mut latency, t.elapsed());
                    }
                    Ok::<_, engine::Error>((offsets, latency))
                })
            })
            .collect();
        // tags[offset] = the tag appended at that offset.
        let mut tags = vec![u64::MAX; total as usize];
        let mut latency = new_histogram();
        for (task, handle) in handles.into_iter().enumerate() {
            let (offsets, h) = handle.await?;
            latency.add(&h).map_err(|e| format!("merging histograms: {e}"))?;
            for (seq, offset) in offsets.into_iter().enumerate() {
                let slot = tags
                    .get_mut(offset as usize)
                    .ok_or_else(|| format!("offset {offset} beyond the {total} appends"))?;
                ensure(*slot == u64::MAX, || format!("offset {offset} acknowledged twice"))?;
                *slot = (task as u64) << 32 | seq as u64;
            }
        }
        let elapsed = start.elapsed();
        log.close().await?;
        drop(log);
        let read = read_back(&log_dir, |offset| tags[offset as usize]).await?;
        std::fs::remove_dir_all(&log_dir)?;
        Ok(DepotConcurrent {
            record_bytes: RECORD_BYTES,
            tasks,
            ours: LatencyRun {
                throughput: Throughput::new(total, total * RECORD_BYTES as u64, elapsed),
                latency: Latency::from_histogram(&latency),
            },
            ours_read_back: read,
        })
    })?;
    result.ours.throughput.check("concurrent appends", total)?;
    ensure(result.ours_read_back == total, || {
        format!("read back {} of {total} concurrent appends", result.ours_read_back)
    })?;
    Ok(result)
}
