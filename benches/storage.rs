//! Storage engine benchmarks (criterion): append throughput (no fsync and
//! fsync per batch), sequential read throughput from page cache, timestamp
//! lookup latency on a large log, and recovery time of that log.
//!
//! Each group first prints this machine's own baseline measured in the
//! same run (plain `std::fs` writes of the same bytes, or plain reads of
//! the same files) and the ratio of a quick log measurement to it.
//!
//! Environment:
//! - `RUNNEL_BENCH_LOG_BYTES`: size of the large log for the lookup and
//!   recovery groups (default 1 GiB).
//! - `RUNNEL_BENCH_DIR`: where to put the bench logs (default the system
//!   temp dir).
//!
//! Run: `cargo bench --bench storage -- --warm-up-time 1 --measurement-time 3`

use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use runnel_storage::{BatchBuilder, FlushPolicy, Log, LogConfig};

const MIB: u64 = 1 << 20;

fn bench_root() -> PathBuf {
    std::env::var_os("RUNNEL_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
}

fn large_log_bytes() -> u64 {
    std::env::var("RUNNEL_BENCH_LOG_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("runnel-bench-")
        .tempdir_in(bench_root())
        .expect("bench dir")
}

/// A batch of `record_bytes`-sized values filling about `batch_bytes`.
///
/// Frozen, so that each append below takes it by reference count, as the
/// broker hands over the `Bytes` it received. (A `BytesMut` clone is a
/// fresh allocation and a copy of the batch, which the broker never makes
/// and which the plain writes it is compared with do not pay.)
fn make_batch(record_bytes: usize, batch_bytes: usize, timestamp_ms: i64) -> Bytes {
    let value = vec![b'x'; record_bytes];
    let mut b = BatchBuilder::new();
    while b.size_bytes() + record_bytes + 16 <= batch_bytes {
        b.push(timestamp_ms, None, Some(&value), &[]);
    }
    b.build().freeze()
}

fn config(flush: FlushPolicy) -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * MIB,
        retention_ms_max: None,
        message_bytes_max: 1 << 30,
        flush,
        ..LogConfig::default()
    }
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64()
}

/// Plain sequential writes of `batch` `count` times (fsync each if asked).
fn plain_write(dir: &Path, batch: &[u8], count: usize, fsync: bool) -> f64 {
    let path = dir.join("plain-write");
    let mut f = File::create(&path).unwrap();
    let start = Instant::now();
    for _ in 0..count {
        f.write_all(batch).unwrap();
        if fsync {
            f.sync_data().unwrap();
        }
    }
    let elapsed = start.elapsed();
    drop(f);
    std::fs::remove_file(path).unwrap();
    mib_per_s((batch.len() * count) as u64, elapsed)
}

/// The same bytes through `Log::append_as_leader`, with the segment's
/// blocks reserved ahead (the default) or not.
fn log_write(
    dir: &Path,
    batch: &Bytes,
    count: usize,
    flush: FlushPolicy,
    preallocate: bool,
) -> f64 {
    let config = LogConfig {
        preallocate,
        ..config(flush)
    };
    let log = Log::open(dir.join("quick-0"), config).unwrap();
    let start = Instant::now();
    for _ in 0..count {
        log.append_as_leader(batch.clone(), 0).unwrap();
    }
    let elapsed = start.elapsed();
    drop(log);
    std::fs::remove_dir_all(dir.join("quick-0")).unwrap();
    mib_per_s((batch.len() * count) as u64, elapsed)
}

/// The CRC check and record walk every appended batch gets.
fn validation_only(batch: &Bytes, count: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..count {
        black_box(runnel_storage::batch::validate_batch(black_box(batch)).unwrap());
    }
    mib_per_s((batch.len() * count) as u64, start.elapsed())
}

/// Appends `iters` batches, timing only the appends; old segments are
/// deleted between appends so the disk footprint stays bounded.
fn timed_appends(log: &Log, batch: &Bytes, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let b = batch.clone();
        let start = Instant::now();
        black_box(log.append_as_leader(b, 0).unwrap());
        total += start.elapsed();
        if log.size_bytes() > 256 * MIB {
            log.set_high_watermark(log.log_end_offset());
            log.delete_records_before(log.log_end_offset()).unwrap();
        }
    }
    total
}

fn append(c: &mut Criterion) {
    let dir = tempdir();
    for fsync in [false, true] {
        let flush = if fsync {
            FlushPolicy::EveryBatch
        } else {
            FlushPolicy::Interval {
                messages: None,
                ms: None,
            }
        };
        let name = if fsync { "append_fsync" } else { "append" };
        let mut group = c.benchmark_group(name);
        if fsync {
            group.sample_size(10);
        }
        for record_bytes in [100usize, 1024] {
            for batch_bytes in [16 * 1024usize, 256 * 1024] {
                let batch = make_batch(record_bytes, batch_bytes, 0);
                let count = if fsync {
                    50
                } else {
                    (256 * MIB as usize) / batch.len()
                };
                // Plain writes first and last, the log's second and
                // fourth, and the faster of each pair: on a VM the first
                // writer into pages it has not touched lately pays more,
                // so whichever runs first would look slower, and two
                // passes of the same writes differ by up to a third here.
                // Both sides get the same two tries, at mirrored places.
                let plain_before = plain_write(dir.path(), &batch, count, fsync);
                let log_first = log_write(dir.path(), &batch, count, flush, true);
                let unreserved = log_write(dir.path(), &batch, count, flush, false);
                let log_second = log_write(dir.path(), &batch, count, flush, true);
                let plain_after = plain_write(dir.path(), &batch, count, fsync);
                let plain = plain_before.max(plain_after);
                let through_log = log_first.max(log_second);
                let check = validation_only(&batch, count);
                // Appending = validating + writing; this is the ratio a
                // log writing like std::fs would reach if everything else
                // were free.
                let bound = 1.0 / (1.0 + plain / check);
                println!(
                    "{name}/{record_bytes}B/{batch_bytes}: plain std::fs write {plain:.0} MiB/s (before {plain_before:.0}, after {plain_after:.0}), log {through_log:.0} MiB/s (first {log_first:.0}, second {log_second:.0}), ratio {:.2} (without preallocation {unreserved:.0} MiB/s, ratio {:.2}; validation alone {check:.0} MiB/s, ratio bound {bound:.2})",
                    through_log / plain,
                    unreserved / plain
                );
                let log = Log::open(
                    dir.path()
                        .join(format!("{name}-{record_bytes}-{batch_bytes}-0")),
                    config(flush),
                )
                .unwrap();
                group.throughput(Throughput::Bytes(batch.len() as u64));
                group.bench_function(
                    format!("{record_bytes}B_records/{}KiB_batch", batch_bytes / 1024),
                    |b| b.iter_custom(|iters| timed_appends(&log, &batch, iters)),
                );
            }
        }
        group.finish();
    }
}

/// Builds a log of about `bytes` bytes of 16 KiB batches of 1 KiB records
/// with increasing timestamps (one ms per record), then closes it.
fn build_log(dir: &Path, bytes: u64) -> (PathBuf, i64, f64) {
    let path = dir.join("large-0");
    let log = Log::open(
        &path,
        config(FlushPolicy::Interval {
            messages: None,
            ms: None,
        }),
    )
    .unwrap();
    let start = Instant::now();
    let mut ts = 0;
    while log.size_bytes() < bytes {
        let batch = make_batch(1024, 16 * 1024, 0);
        let n = {
            let parsed = runnel_storage::RecordBatch::parse(batch.clone()).unwrap();
            parsed.record_count() as i64
        };
        let mut b = BatchBuilder::new();
        for i in 0..n {
            b.push(ts + i, None, Some(&[b'y'; 1024]), &[]);
        }
        log.append_as_leader(b.build(), 0).unwrap();
        ts += n;
    }
    let rate = mib_per_s(log.size_bytes(), start.elapsed());
    log.close().unwrap();
    (path, ts, rate)
}

fn read(c: &mut Criterion) {
    let dir = tempdir();
    let bytes = large_log_bytes().min(256 * MIB);
    let (path, _, build_rate) = build_log(dir.path(), bytes);
    let batch = make_batch(1024, 16 * 1024, 0);
    let plain_w = plain_write(
        dir.path(),
        &batch,
        (bytes / batch.len() as u64) as usize,
        false,
    );
    // Plain sequential read of the same segment files, 1 MiB at a time.
    let start = Instant::now();
    let mut total = 0u64;
    let mut buf = vec![0u8; MIB as usize];
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    for p in &files {
        let mut f = File::open(p).unwrap();
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    let plain_r = mib_per_s(total, start.elapsed());
    let log = Log::open(
        &path,
        config(FlushPolicy::Interval {
            messages: None,
            ms: None,
        }),
    )
    .unwrap();
    let end = log.log_end_offset();
    let start = Instant::now();
    let (mut offset, mut read_bytes) = (0, 0u64);
    while offset < end {
        let r = log.read(offset, MIB as usize, i64::MAX).unwrap();
        read_bytes += r.batches.len() as u64;
        offset = last_offset(&r.batches) + 1;
    }
    let log_r = mib_per_s(read_bytes, start.elapsed());
    println!(
        "read: plain std::fs write {plain_w:.0} MiB/s (log build, batch encoding included, {build_rate:.0} MiB/s); plain std::fs read {plain_r:.0} MiB/s, log read {log_r:.0} MiB/s, ratio {:.2}",
        log_r / plain_r
    );
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Bytes(MIB));
    let mut offset = 0;
    group.bench_function("sequential_1MiB_from_page_cache", |b| {
        b.iter(|| {
            if offset >= end {
                offset = 0;
            }
            let r = log.read(offset, MIB as usize, i64::MAX).unwrap();
            offset = last_offset(&r.batches) + 1;
            black_box(r)
        })
    });
    group.finish();
}

/// Last offset of the last batch in concatenated batches (header walk).
fn last_offset(batches: &bytes::Bytes) -> i64 {
    let mut position = 0;
    let mut last = -1;
    while position < batches.len() {
        let b = &batches[position..];
        let base = i64::from_be_bytes(b[0..8].try_into().unwrap());
        let len = 12 + i32::from_be_bytes(b[8..12].try_into().unwrap()) as usize;
        let delta = i32::from_be_bytes(b[23..27].try_into().unwrap());
        last = base + i64::from(delta);
        position += len;
    }
    last
}

fn lookup_and_recovery(c: &mut Criterion) {
    let dir = tempdir();
    let bytes = large_log_bytes();
    let batch = make_batch(1024, 16 * 1024, 0);
    let plain = plain_write(
        dir.path(),
        &batch,
        (bytes / batch.len() as u64) as usize,
        false,
    );
    let (path, ts_end, build_rate) = build_log(dir.path(), bytes);
    println!(
        "lookup/recovery: {} MiB log; plain std::fs write {plain:.0} MiB/s, log build (batch encoding included) {build_rate:.0} MiB/s, ratio {:.2}",
        bytes / MIB,
        build_rate / plain
    );
    let cfg = config(FlushPolicy::Interval {
        messages: None,
        ms: None,
    });
    {
        let log = Log::open(&path, cfg.clone()).unwrap();
        let mut group = c.benchmark_group("timestamp_lookup");
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        group.bench_function(format!("{}MiB_log", bytes / MIB), |b| {
            b.iter(|| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let ts = (x % ts_end as u64) as i64;
                black_box(log.offset_for_timestamp(ts).unwrap().unwrap())
            })
        });
        group.finish();
        log.close().unwrap();
    }
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    let total: u64 = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    for (name, remove_recovery_point) in [
        ("unclean_active_segment_scan", false),
        ("full_scan_no_recovery_point", true),
    ] {
        if remove_recovery_point {
            group.throughput(Throughput::Bytes(total));
        }
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let _ = std::fs::remove_file(path.join(".clean-shutdown"));
                    if remove_recovery_point {
                        let _ = std::fs::remove_file(path.join("recovery-point"));
                    }
                },
                |()| {
                    let log = Log::open(&path, cfg.clone()).unwrap();
                    log.close_unclean();
                    black_box(log.log_end_offset())
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// CRC32C of one 16 KiB and one 256 KiB batch: the `crc32c` crate
/// against `runnel_storage::crc` (the carry-less multiply fold where the
/// CPU has AVX-512 VPCLMULQDQ), printed as GB/s and their ratio.
fn crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for len in [16 * 1024usize, 256 * 1024] {
        let data = make_batch(1024, len, 0);
        let rate = |f: &dyn Fn(&[u8]) -> u32| {
            let rounds = (1 << 30) / data.len();
            let start = Instant::now();
            for _ in 0..rounds {
                black_box(f(black_box(&data)));
            }
            (rounds * data.len()) as f64 / 1e9 / start.elapsed().as_secs_f64()
        };
        let crate_rate = rate(&crc32c::crc32c);
        let ours = rate(&runnel_storage::crc::crc32c);
        println!(
            "crc32c/{len}: crc32c crate {crate_rate:.1} GB/s, runnel_storage::crc {ours:.1} GB/s, ratio {:.2}",
            ours / crate_rate
        );
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_function(format!("{}KiB", len / 1024), |b| {
            b.iter(|| runnel_storage::crc::crc32c(black_box(&data)))
        });
    }
    group.finish();
}

criterion_group!(benches, append, read, lookup_and_recovery, crc);
criterion_main!(benches);
