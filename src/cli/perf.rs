//! `runnel perf ...`: throughput and latency of a running cluster, and the
//! machine's own baselines (plain disk write, loopback TCP) to compare
//! against in the same run.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use runnel::client::{Client, ClientError, GroupConfig, ProducerConfig, ProducerRecord, StartFrom};
use runnel_proto::v1 as pb;
use serde::Serialize;
use tokio::sync::mpsc;

use super::Output;

#[derive(Debug, Subcommand)]
pub enum PerfCommand {
    /// Produce N records as fast as possible (or at --rate) and report
    /// throughput and acknowledgement latency.
    Produce(ProduceArgs),
    /// Read N records from the earliest offset and report throughput.
    Consume(ConsumeArgs),
    /// Produce and consume at once; report end-to-end latency.
    E2e(E2eArgs),
    /// Measure this machine's plain sequential disk write and single-stream
    /// loopback TCP speed, the baselines for the figures above.
    Baseline(BaselineArgs),
    /// Controller throughput: create one topic with many partitions, then
    /// submit many small metadata commands concurrently.
    Metadata(super::perf_metadata::MetadataArgs),
}

#[derive(Debug, Args, Clone)]
pub struct Workload {
    /// Topic (created if missing).
    #[arg(long, default_value = "perf")]
    topic: String,
    /// Number of records.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// Partitions of the topic: created with this many (1 when not
    /// given); an existing topic with another count is refused.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    partitions: Option<i32>,
    /// Replication factor of the topic, likewise (1 when not given).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    replication_factor: Option<i32>,
}

/// What `perf consume` reads.
#[derive(Debug, Args, Clone)]
pub struct Target {
    /// Topic to read.
    #[arg(long, default_value = "perf")]
    topic: String,
    /// Number of records.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
}

#[derive(Debug, Args, Clone)]
pub struct ProduceArgs {
    #[command(flatten)]
    workload: Workload,
    /// Durability each record waits for.
    #[arg(long, value_enum, default_value_t = AcksArg::Leader)]
    acks: AcksArg,
    /// Batch size in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    batch_bytes: usize,
    /// Linger in ms.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Target records per second; 0 is flat out. With a rate, a record
    /// sent more than a millisecond (the timer's tick) after it was due
    /// has its latency (and its e2e stamp) run from then, not from when
    /// the producer took it: a record held back while the producer's
    /// buffer was full is charged for the wait (no coordinated
    /// omission), the loop's own timer jitter is not.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Batches in flight per partition (at most 16 with idempotence).
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Turn the idempotent producer off (it is on by default with
    /// acks=all, and caps in-flight batches at 16 per partition).
    #[arg(long)]
    no_idempotence: bool,
    /// Records sent first, at the same rate, and left out of the report's
    /// counts, rates and percentiles, as the OpenMessaging Benchmark's
    /// warm-up phase: a fresh client's first few hundred milliseconds
    /// measure its own start (a new connection and stream, a new
    /// partition) rather than the steady state (benches/RESULTS.md,
    /// session 13). `--timeline-ms` windows do count them, so that the
    /// start they hide can be seen.
    #[arg(long, default_value_t = 0)]
    warm_up_records: u64,
    /// Also report, for every window of this many ms of send time, how
    /// many records were sent in it and the largest acknowledgement
    /// latency among them (`perf e2e`: and the largest end-to-end
    /// latency), so that a tail shows where in the run it comes from.
    /// Warm-up records included: its windows add up to records plus
    /// `--warm-up-records`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    timeline_ms: Option<u64>,
}

#[derive(Debug, Args, Clone)]
pub struct E2eArgs {
    #[command(flatten)]
    produce: ProduceArgs,
    /// Read with long-poll fetches, one in flight per partition (how the
    /// group consumer reads), instead of a subscription that the broker
    /// pushes records down as they are appended (how `runnel consume` and
    /// `perf consume` read).
    #[arg(long)]
    fetch: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ConsumeArgs {
    #[command(flatten)]
    target: Target,
    /// Bytes per fetch (the consumer's default, Kafka's
    /// max.partition.fetch.bytes: 1 MiB). Larger answers fall out of the
    /// CPU caches between their copies and read slower.
    #[arg(long, default_value_t = 1024 * 1024)]
    fetch_bytes: u32,
    /// Read as a member of this consumer group (partitions assigned by the
    /// group, committed offsets honoured and advanced) instead of reading
    /// every partition from the start.
    #[arg(long)]
    group: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct BaselineArgs {
    /// Directory for the disk test file (removed afterwards).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Bytes to write and to send.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
struct Latency {
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    test: &'static str,
    records: u64,
    bytes: u64,
    seconds: f64,
    records_per_sec: f64,
    mb_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<Latency>,
    /// `--timeline-ms`: one entry per window of send time.
    #[serde(skip_serializing_if = "Option::is_none")]
    timeline: Option<Vec<Window>>,
}

/// Records sent in one window of a `perf produce` or `perf e2e` run.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Window {
    /// Start of the window, ms after the run's start.
    start_ms: u64,
    /// Records sent in it (`perf e2e`: and received).
    records: u64,
    /// `perf e2e`: largest end-to-end latency of those records.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ms: Option<f64>,
    /// Largest produce latency (send to acknowledgement) of those
    /// records: where it is as large as `max_ms`, the records waited
    /// before the broker appended them, not on their way to a consumer.
    ack_max_ms: f64,
}

/// Per-window record counts and largest latencies, by production time.
#[derive(Debug)]
struct Timeline {
    window_ns: u64,
    /// (records, largest latency in ns) per window.
    windows: Vec<(u64, u64)>,
}

impl Timeline {
    fn new(window_ms: u64) -> Self {
        Timeline {
            window_ns: window_ms.saturating_mul(1_000_000),
            windows: Vec::new(),
        }
    }

    /// A record produced `produced_ns` after the run's origin and
    /// received `latency_ns` later.
    fn record(&mut self, produced_ns: u64, latency_ns: u64) {
        let i = (produced_ns / self.window_ns) as usize;
        if self.windows.len() <= i {
            self.windows.resize(i + 1, (0, 0));
        }
        let w = &mut self.windows[i];
        w.0 += 1;
        w.1 = w.1.max(latency_ns);
    }

    /// (window, records, largest latency in ns) from the first window
    /// with a record on.
    fn since_first_record(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let first = self.windows.iter().position(|w| w.0 > 0).unwrap_or(0);
        self.windows[first..]
            .iter()
            .enumerate()
            .map(move |(i, &(records, max_ns))| (first + i, records, max_ns))
    }

    fn start_ms(&self, window: usize) -> u64 {
        window as u64 * (self.window_ns / 1_000_000)
    }

    /// The windows from the first one with a record on, with the
    /// largest produce latencies from `acks` (a timeline of the same
    /// window length, keyed by the same production times).
    fn windows(&self, acks: &Timeline) -> Vec<Window> {
        self.since_first_record()
            .map(|(i, records, max_ns)| Window {
                start_ms: self.start_ms(i),
                records,
                max_ms: Some(max_ns as f64 / 1e6),
                ack_max_ms: acks.windows.get(i).map_or(0, |w| w.1) as f64 / 1e6,
            })
            .collect()
    }

    /// The windows from the first one with a record on, for a timeline of
    /// acknowledgement latencies alone (`perf produce`).
    fn ack_windows(&self) -> Vec<Window> {
        self.since_first_record()
            .map(|(i, records, max_ns)| Window {
                start_ms: self.start_ms(i),
                records,
                max_ms: None,
                ack_max_ms: max_ns as f64 / 1e6,
            })
            .collect()
    }
}

impl Report {
    fn new(
        test: &'static str,
        records: u64,
        bytes: u64,
        elapsed: Duration,
        latency: Option<Latency>,
    ) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Report {
            test,
            records,
            bytes,
            seconds,
            records_per_sec: records as f64 / seconds,
            mb_per_sec: bytes as f64 / seconds / 1e6,
            latency,
            timeline: None,
        }
    }

    fn print(&self, output: Output) {
        if output == Output::Json {
            outln!("{}", serde_json::to_string(self).expect("serialisable"));
            return;
        }
        outln!(
            "{}: {} records, {:.1} MB in {:.2} s: {:.0} records/s, {:.1} MB/s",
            self.test,
            self.records,
            self.bytes as f64 / 1e6,
            self.seconds,
            self.records_per_sec,
            self.mb_per_sec
        );
        if let Some(l) = &self.latency {
            outln!(
                "  latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                l.p50_ms,
                l.p95_ms,
                l.p99_ms,
                l.p999_ms,
                l.max_ms
            );
        }
        if let Some(timeline) = &self.timeline {
            outln!("  produced at ms   records   largest latency ms   largest ack ms");
            for w in timeline {
                let e2e = w
                    .max_ms
                    .map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}"));
                outln!(
                    "  {:>14} {:>9} {:>20} {:>16.2}",
                    w.start_ms,
                    w.records,
                    e2e,
                    w.ack_max_ms
                );
            }
        }
    }
}

pub async fn run(
    bootstrap: &str,
    options: runnel::client::ClientOptions,
    cmd: PerfCommand,
    output: Output,
) -> anyhow::Result<()> {
    if let PerfCommand::Baseline(args) = cmd {
        return baseline(args, output).await;
    }
    let client = Client::connect_with(bootstrap, options)
        .await
        .with_context(|| format!("cannot reach the cluster at {bootstrap}"))?;
    match cmd {
        PerfCommand::Produce(args) => {
            ensure_topic(&client, &args.workload).await?;
            let (mut report, acks) = produce(&client, &args, output, None).await?;
            report.timeline = acks.map(|t| t.ack_windows());
            report.print(output);
        }
        PerfCommand::Consume(args) => {
            let report = consume(&client, &args, output).await?;
            report.print(output);
        }
        PerfCommand::E2e(args) => {
            ensure_topic(&client, &args.produce.workload).await?;
            let report = e2e(&client, &args, output).await?;
            report.print(output);
        }
        PerfCommand::Metadata(args) => super::perf_metadata::run(&client, args, output).await?,
        PerfCommand::Baseline(_) => unreachable!("handled above"),
    }
    Ok(())
}

/// Creates the workload's topic, or checks that the existing one has the
/// shape asked for: a figure measured on another partition count or
/// replication factor than the command line says would mislead.
async fn ensure_topic(client: &Client, w: &Workload) -> anyhow::Result<()> {
    match client
        .create_topic(
            &w.topic,
            w.partitions.unwrap_or(1),
            w.replication_factor.unwrap_or(1),
            Default::default(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == pb::ErrorCode::TopicAlreadyExists => {
            let t = client.describe_topic(&w.topic).await?;
            let has = (t.partitions.len() as i32, t.replication_factor);
            let partitions = w.partitions.unwrap_or(has.0);
            let rf = w.replication_factor.unwrap_or(has.1);
            if (partitions, rf) != has {
                bail!(
                    "topic '{}' exists with {} partitions and replication factor {}, not {partitions} and {rf}: pick another --topic or delete it",
                    w.topic, has.0, has.1
                );
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn progress(total: u64, output: Output, what: &str) -> ProgressBar {
    if output == Output::Json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AcksArg {
    All,
    Leader,
    None,
}

impl From<AcksArg> for pb::Acks {
    fn from(a: AcksArg) -> Self {
        match a {
            AcksArg::All => pb::Acks::All,
            AcksArg::Leader => pb::Acks::Leader,
            AcksArg::None => pb::Acks::None,
        }
    }
}

/// What `perf e2e` asks of its producer: each value starts with the
/// nanoseconds since `origin`, and `measured_from_ns` is set (before the
/// first measured record is stamped) to where the warm-up ends, in the
/// same nanoseconds.
struct Stamp {
    origin: Instant,
    measured_from_ns: Arc<AtomicU64>,
    /// This run's tag, in bytes 8..16 of each value: the consumers count
    /// only records that carry it. Records of another producer on the
    /// topic (`perf produce`'s payload read as a timestamp is 0x7878…)
    /// counted as measured, ended the run early, and with a timeline
    /// made it grow to 10^11 windows.
    run_id: u64,
}

/// Bytes of an e2e value taken by its stamp: the send time (ns since the
/// run's origin) and the run's tag, little-endian.
const STAMP_BYTES: usize = 16;

/// A tag for one run: not shared with a run started in another process
/// or at another time.
fn new_run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

/// The send time a value was stamped with in run `run_id`, if it was.
fn stamped_at(value: &[u8], run_id: u64) -> Option<u64> {
    let tag = value.get(8..STAMP_BYTES)?;
    (u64::from_le_bytes(tag.try_into().ok()?) == run_id)
        .then(|| u64::from_le_bytes(value[..8].try_into().expect("8 bytes")))
}

/// How late after it was due a record of a `--rate` run may be sent and
/// still be timed from its send: the loop sleeps until each due time,
/// and tokio's timer rounds that up to its next millisecond tick. Timed
/// from the due time alone, every record carried up to a tick of the
/// loop's own lateness (e2e p50 1 ms to 2 ms in the A/B run of session 22).
const DUE_SLACK: Duration = Duration::from_millis(1);

/// Produces the workload, after `--warm-up-records` that the report
/// leaves out. With `stamp`, each value starts with the nanoseconds since
/// its origin (for end-to-end latency). With `--timeline-ms`, returns the
/// acknowledgement latencies by send time (since the stamp's origin, or
/// else the start of this call) too.
async fn produce(
    client: &Client,
    args: &ProduceArgs,
    output: Output,
    stamp: Option<Stamp>,
) -> anyhow::Result<(Report, Option<Timeline>)> {
    let w = &args.workload;
    if stamp.is_some() && w.record_size < STAMP_BYTES {
        bail!("--record-size must be at least {STAMP_BYTES} for e2e");
    }
    let producer = client.producer(ProducerConfig {
        acks: args.acks.into(),
        batch_bytes_max: args.batch_bytes,
        linger: Duration::from_millis(args.linger_ms),
        in_flight_max: args.in_flight,
        timeout_ms: 0,
        idempotence: !args.no_idempotence,
        ..ProducerConfig::default()
    });
    let payload = Bytes::from(vec![b'x'; w.record_size]);
    let bar = progress(w.records, output, "produce");
    // Acks travel to the collector in chunks: a channel message per record
    // cost the one client thread about 4 % of its time.
    let (tx, mut rx) = mpsc::channel::<Vec<(runnel::client::DeliveryFuture, Option<Instant>)>>(256);
    // Records are awaited in send order; each latency runs from the call
    // to `send` (`sent_at`), or with a rate from when the record was due,
    // to the moment its batch was answered (`acked_at`), so a record
    // whose batch was answered while the collector waited on an earlier
    // one is not charged for the wait. From `sent_at` alone, the records
    // due while `send` waited for room in a full buffer went out late in
    // a burst and looked fast: a stall of a second hid most of its
    // delay from the percentiles.
    let (origin, measured_from_ns, run_id) = match stamp {
        Some(s) => (Some(s.origin), Some(s.measured_from_ns), s.run_id),
        None => (None, None, 0),
    };
    let timeline_origin = origin.unwrap_or_else(Instant::now);
    let mut timeline = args.timeline_ms.map(Timeline::new);
    let warm_up = args.warm_up_records;
    let collector = tokio::spawn(async move {
        let mut hist =
            Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        let mut error: Option<ClientError> = None;
        // Acknowledgements arrive in send order: the first `warm_up` are
        // the warm-up's.
        let mut index = 0u64;
        while let Some(chunk) = rx.recv().await {
            for (mut fut, due) in chunk {
                index += 1;
                match (&mut fut).await {
                    Ok(_) => {
                        let acked = fut.acked_at().unwrap_or_else(Instant::now);
                        let from =
                            due.map_or(fut.sent_at(), |d| (d + DUE_SLACK).min(fut.sent_at()));
                        let took = acked.saturating_duration_since(from);
                        if index > warm_up {
                            let _ = hist.record(took.as_micros().max(1) as u64);
                        }
                        if let Some(t) = &mut timeline {
                            let sent = from.saturating_duration_since(timeline_origin);
                            t.record(sent.as_nanos() as u64, took.as_nanos() as u64);
                        }
                    }
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
        }
        (hist, error, timeline)
    });
    const ACK_CHUNK: usize = 256;
    let mut chunk = Vec::with_capacity(ACK_CHUNK);
    let total = warm_up.saturating_add(w.records);
    let start = Instant::now();
    // Where the measured records start (the report's clock).
    let mut measured_start = start;
    for i in 0..total {
        let due =
            (args.rate > 0).then(|| start + Duration::from_secs_f64(i as f64 / args.rate as f64));
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
        // Stamped with when it was due, for the same reason. Stamps never
        // decrease (both sides of the min grow).
        let stamp = origin.map(|origin| {
            due.map_or_else(
                || origin.elapsed(),
                |d| {
                    origin
                        .elapsed()
                        .min((d + DUE_SLACK).saturating_duration_since(origin))
                },
            )
        });
        if i == warm_up && warm_up > 0 {
            measured_start = Instant::now();
            // The first measured record's own stamp splits the records:
            // the time now is later than it when this loop runs behind,
            // and measured records stamped before it were left out.
            if let (Some(stamp), Some(from)) = (stamp, &measured_from_ns) {
                from.store(stamp.as_nanos() as u64, Ordering::Release);
            }
        }
        let value = match stamp {
            Some(stamp) => {
                let mut v = BytesMut::from(&payload[..]);
                v[..8].copy_from_slice(&(stamp.as_nanos() as u64).to_le_bytes());
                v[8..STAMP_BYTES].copy_from_slice(&run_id.to_le_bytes());
                v.freeze()
            }
            None => payload.clone(),
        };
        let ack = producer
            .send(
                &w.topic,
                ProducerRecord {
                    value: Some(value),
                    ..Default::default()
                },
            )
            .await?;
        chunk.push((ack, due));
        if chunk.len() == ACK_CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(ACK_CHUNK));
            tx.send(full).await.context("collector stopped")?;
        }
        if i % 4096 == 0 {
            bar.set_position(i.saturating_sub(warm_up));
        }
    }
    if !chunk.is_empty() {
        tx.send(chunk).await.context("collector stopped")?;
    }
    producer.close().await?;
    drop(tx);
    let (hist, error, timeline) = collector.await.context("collector panicked")?;
    let elapsed = measured_start.elapsed();
    bar.finish_and_clear();
    if let Some(e) = error {
        bail!("some records were not acknowledged: {e}");
    }
    // The report counts what the collector saw acknowledged, not what the
    // loop meant to send.
    let acknowledged = hist.len();
    if acknowledged != w.records {
        bail!("{acknowledged} of {} records were acknowledged", w.records);
    }
    let report = Report::new(
        "produce",
        acknowledged,
        acknowledged * w.record_size as u64,
        elapsed,
        Some(Latency::of(&hist)),
    );
    Ok((report, timeline))
}

async fn consume(client: &Client, args: &ConsumeArgs, output: Output) -> anyhow::Result<Report> {
    if let Some(group) = &args.group {
        return consume_group(client, args, group, output).await;
    }
    let w = &args.target;
    let topic = client.topic(&w.topic).await?;
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<(u64, u64)>>(64);
    let mut available = 0u64;
    // Every consumer first, then the readers: a reader streams its
    // partition (`streaming`), and one stopped on a full channel while
    // this task still looked up offsets could hold the connection's
    // flow-control window that the lookups need.
    let mut consumers = Vec::new();
    for p in &topic.partitions {
        let mut c = client
            .partition_consumer(&w.topic, p.partition, StartFrom::Earliest)
            .await?;
        c.max_bytes = args.fetch_bytes;
        c.streaming = true;
        available += (c.high_watermark() - c.position()).max(0) as u64;
        consumers.push(c);
    }
    for mut c in consumers {
        let tx = tx.clone();
        tokio::spawn(async move {
            let end = c.high_watermark();
            while c.position() < end {
                let batch = c.poll().await;
                let msg = batch
                    .map(|records| {
                        let bytes = records
                            .iter()
                            .map(|r| r.value.as_ref().map_or(0, |v| v.len()) as u64)
                            .sum();
                        (records.len() as u64, bytes)
                    })
                    .map_err(anyhow::Error::from);
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
    }
    drop(tx);
    let target = w.records.min(available);
    let bar = progress(target, output, "consume");
    let start = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    while records < target {
        let Some(msg) = rx.recv().await else { break };
        let (n, b) = msg?;
        records += n;
        bytes += b;
        bar.set_position(records);
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    warn_short(records, w.records);
    Ok(Report::new("consume", records, bytes, elapsed, None))
}

/// Says so when the topic held fewer records than `--records` asked for:
/// the figures are then for fewer records than the run was meant to read.
fn warn_short(read: u64, asked: u64) {
    if read < asked {
        eprintln!("warning: read {read} of the {asked} records asked for: the topic holds no more");
    }
}

/// Reads up to `--records` records as a member of `group` (stopping early
/// once the group's partitions are caught up), committing as it goes.
async fn consume_group(
    client: &Client,
    args: &ConsumeArgs,
    group: &str,
    output: Output,
) -> anyhow::Result<Report> {
    let w = &args.target;
    client.topic(&w.topic).await?;
    let mut config = GroupConfig::new(group, &[w.topic.as_str()]);
    config.client_id = "runnel-perf".into();
    config.max_bytes = args.fetch_bytes;
    // Every record of every answer in hand per poll, as before
    // max_poll_records: the figure is the brokers' and the fetch path's,
    // not the cost of 500-record polls (about a sixth lower here).
    config.max_poll_records = usize::MAX;
    let mut consumer = client.group_consumer(config)?;
    let bar = progress(w.records, output, "consume");
    let (mut records, mut bytes) = (0u64, 0u64);
    // From the poll that brought the first records (joining the group is
    // not reading) to the last records: the empty poll that finds the
    // group caught up (a whole long poll) is not reading either.
    let (mut start, mut end) = (None, None);
    let (mut first_began, mut later_polls) = (None, false);
    while records < w.records {
        // A poll before the member has partitions joins the group first:
        // timed from its end, not its start.
        let joined = !consumer.assignment().is_empty();
        let began = Instant::now();
        let batch = consumer.poll().await?;
        if batch.is_empty() {
            if consumer.caught_up() {
                break;
            }
            continue;
        }
        // (From the end of a poll that joined, its own records are
        // counted in no time: with one poll alone, the whole poll is
        // timed instead.)
        if start.is_none() {
            start = Some(if joined { began } else { Instant::now() });
            first_began = Some(began);
        } else {
            later_polls = true;
        }
        end = Some(Instant::now());
        records += batch.len() as u64;
        bytes += batch
            .iter()
            .map(|r| r.value.as_ref().map_or(0, |v| v.len()) as u64)
            .sum::<u64>();
        bar.set_position(records);
    }
    let elapsed = match (start, first_began, end) {
        (Some(s), _, Some(e)) if later_polls => e.duration_since(s),
        (_, Some(b), Some(e)) => e.duration_since(b),
        _ => Duration::ZERO,
    };
    bar.finish_and_clear();
    warn_short(records, w.records);
    consumer
        .close()
        .await
        .context("committing and leaving the group")?;
    Ok(Report::new("consume", records, bytes, elapsed, None))
}

async fn e2e(client: &Client, e2e_args: &E2eArgs, output: Output) -> anyhow::Result<Report> {
    let args = &e2e_args.produce;
    let w = &args.workload;
    let origin = Instant::now();
    let run_id = new_run_id();
    let topic = client.topic(&w.topic).await?;
    // (produced at, latency), in ns, per received record.
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<Vec<(u64, u64)>>>(64);
    for p in &topic.partitions {
        let mut c = client
            .partition_consumer(&w.topic, p.partition, StartFrom::Latest)
            .await?;
        c.max_wait_ms = 100;
        c.streaming = !e2e_args.fetch;
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let msg = c.poll().await.map_err(anyhow::Error::from).map(|records| {
                    let now = origin.elapsed().as_nanos() as u64;
                    records
                        .iter()
                        .filter_map(|r| r.value.as_ref())
                        .filter_map(|v| stamped_at(v, run_id))
                        .filter(|produced| *produced <= now)
                        .map(|produced| (produced, now - produced))
                        .collect()
                });
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
    }
    drop(tx);
    let total = args.warm_up_records.saturating_add(w.records);
    // Records stamped before this are the warm-up's (unknown, so all of
    // them, until the producer reaches the first measured record).
    let measured_from_ns = Arc::new(AtomicU64::new(if args.warm_up_records > 0 {
        u64::MAX
    } else {
        0
    }));
    let measured_from = measured_from_ns.clone();
    let mut timeline = args.timeline_ms.map(Timeline::new);
    let collect = tokio::spawn(async move {
        let mut hist =
            Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        let (mut seen, mut measured) = (0u64, 0u64);
        while seen < total {
            match rx.recv().await {
                Some(Ok(received)) => {
                    for (produced, ns) in received {
                        if produced >= measured_from.load(Ordering::Acquire) {
                            let _ = hist.record((ns / 1000).max(1));
                            measured += 1;
                        }
                        if let Some(t) = &mut timeline {
                            t.record(produced, ns);
                        }
                        seen += 1;
                    }
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok((hist, measured, timeline))
    });
    let stamp = Stamp {
        origin,
        measured_from_ns,
        run_id,
    };
    let (produced, ack_timeline) = produce(client, args, output, Some(stamp)).await?;
    let (hist, seen, timeline) = tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .context("consumers did not receive every record within 60 s")?
        .context("collector panicked")??;
    if seen != w.records {
        eprintln!(
            "warning: {seen} records measured, not the {} asked for (the warm-up's boundary fell among them)",
            w.records
        );
    }
    let mut report = Report::new(
        "e2e",
        seen,
        seen * w.record_size as u64,
        Duration::from_secs_f64(produced.seconds),
        Some(Latency::of(&hist)),
    );
    report.timeline = timeline.zip(ack_timeline).map(|(t, acks)| t.windows(&acks));
    Ok(report)
}

/// Plain sequential write and loopback TCP copy of `bytes`.
async fn baseline(args: BaselineArgs, output: Output) -> anyhow::Result<()> {
    let bytes = args.bytes;
    let dir = args.dir.clone();
    let (disk, fsync) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Report, Report)> {
        let path = dir.join(format!(".runnel-baseline-{}", std::process::id()));
        /// Removes the scratch file however the measurement ends (a
        /// failed write, ENOSPC most likely, left up to `--bytes` behind).
        struct Scratch<'a>(&'a std::path::Path);
        impl Drop for Scratch<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(self.0);
            }
        }
        let _scratch = Scratch(&path);
        let chunk = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        {
            let mut f = std::fs::File::create(&path)
                .with_context(|| format!("create {}", path.display()))?;
            let mut written = 0u64;
            while written < bytes {
                let n = chunk.len().min((bytes - written) as usize);
                f.write_all(&chunk[..n])
                    .with_context(|| format!("write {}", path.display()))?;
                written += n as u64;
            }
        }
        let disk = Report::new(
            "disk-write",
            bytes / chunk.len() as u64,
            bytes,
            start.elapsed(),
            None,
        );
        std::fs::remove_file(&path)?;
        // fdatasync'd 64 KiB writes, on a smaller volume.
        let sync_bytes = (bytes / 16).max(1 << 20);
        let start = Instant::now();
        {
            let mut f = std::fs::File::create(&path)
                .with_context(|| format!("create {}", path.display()))?;
            let mut written = 0u64;
            while written < sync_bytes {
                f.write_all(&chunk[..64 * 1024])
                    .and_then(|()| f.sync_data())
                    .with_context(|| format!("write {}", path.display()))?;
                written += 64 * 1024;
            }
        }
        let fsync = Report::new(
            "disk-fdatasync-64k",
            sync_bytes / (64 * 1024),
            sync_bytes,
            start.elapsed(),
            None,
        );
        std::fs::remove_file(&path)?;
        Ok((disk, fsync))
    })
    .await??;
    let tcp = tokio::task::spawn_blocking(move || -> anyhow::Result<Report> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let reader = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                total += n as u64;
            }
        });
        let chunk = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        {
            let mut s = std::net::TcpStream::connect(addr)?;
            let mut sent = 0u64;
            while sent < bytes {
                let n = chunk.len().min((bytes - sent) as usize);
                s.write_all(&chunk[..n])?;
                sent += n as u64;
            }
        }
        let received = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        Ok(Report::new(
            "loopback-tcp",
            received / chunk.len() as u64,
            received,
            start.elapsed(),
            None,
        ))
    })
    .await??;
    for r in [disk, fsync, tcp] {
        r.print(output);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{new_run_id, stamped_at, Timeline, Window};

    #[test]
    fn only_values_stamped_in_this_run_are_measured() {
        let run = new_run_id();
        let mut v = vec![b'x'; 100];
        assert_eq!(stamped_at(&v, run), None, "perf produce's payload");
        v[..8].copy_from_slice(&42u64.to_le_bytes());
        v[8..16].copy_from_slice(&run.to_le_bytes());
        assert_eq!(stamped_at(&v, run), Some(42));
        assert_eq!(stamped_at(&v, run ^ 1), None, "another run");
        assert_eq!(stamped_at(&v[..12], run), None);
    }

    #[test]
    fn timeline_keeps_count_and_largest_latency_per_window_from_the_first_record() {
        let ms = 1_000_000;
        let mut t = Timeline::new(10);
        let mut acks = Timeline::new(10);
        // Nothing in the first three windows (before the first record).
        t.record(35 * ms, 2 * ms);
        t.record(39 * ms, 7 * ms);
        t.record(31 * ms, 3 * ms);
        t.record(62 * ms, ms / 2);
        acks.record(35 * ms, ms);
        acks.record(39 * ms, 4 * ms);
        // An acknowledgement for a window with no record received yet
        // does not start the timeline early.
        acks.record(12 * ms, 9 * ms);
        let window = |start_ms, records, max_ms, ack_max_ms| Window {
            start_ms,
            records,
            max_ms: Some(max_ms),
            ack_max_ms,
        };
        assert_eq!(
            t.windows(&acks),
            vec![
                window(30, 3, 7.0, 4.0),
                window(40, 0, 0.0, 0.0),
                window(50, 0, 0.0, 0.0),
                window(60, 1, 0.5, 0.0),
            ]
        );
        assert_eq!(Timeline::new(10).windows(&acks), vec![]);
        // Acknowledgements alone (perf produce) start at their own first
        // record and carry no end-to-end latency.
        let ack = |start_ms, records, ack_max_ms| Window {
            start_ms,
            records,
            max_ms: None,
            ack_max_ms,
        };
        assert_eq!(
            acks.ack_windows(),
            vec![ack(10, 1, 9.0), ack(20, 0, 0.0), ack(30, 2, 4.0)]
        );
        assert_eq!(Timeline::new(10).ack_windows(), vec![]);
    }
}
