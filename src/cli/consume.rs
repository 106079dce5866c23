//! `runnel consume TOPIC`: prints records, one per line.

use std::io::Write;

use anyhow::{bail, Context};
use clap::Args;
use runnel::client::{Client, ConsumedRecord, GroupConfig, OffsetReset, StartFrom};
use runnel_proto::v1 as pb;
use tokio::sync::mpsc;

use super::Output;

/// How long a partition may keep failing with retriable errors.
const RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Pause between retries.
const RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Where to start: earliest, latest, an offset, or an ISO-8601 time
    /// (2026-11-24T10:00:00Z, 2026-11-24T11:00:00+01:00; UTC without a
    /// zone).
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Read only this partition (default: all).
    #[arg(long)]
    partition: Option<i32>,
    /// Stop after this many records.
    #[arg(long)]
    max_records: Option<u64>,
    /// Consume as a member of this consumer group: the group assigns the
    /// partitions, --from (earliest or latest) applies only where nothing
    /// is committed, and printed records are committed as it goes.
    #[arg(long)]
    group: Option<String>,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    follow: bool,
}

fn parse_from(s: &str) -> anyhow::Result<StartFrom> {
    match s {
        "earliest" => return Ok(StartFrom::Earliest),
        "latest" => return Ok(StartFrom::Latest),
        _ => {}
    }
    if let Ok(offset) = s.parse::<i64>() {
        if offset < 0 {
            bail!("--from offset must not be negative, got {offset}");
        }
        return Ok(StartFrom::Offset(offset));
    }
    let ms = super::parse_time_ms(s).with_context(|| {
        format!("--from expects earliest, latest, an offset or an ISO-8601 time, got '{s}'")
    })?;
    Ok(StartFrom::Timestamp(ms))
}

pub async fn run(client: &Client, args: ConsumeArgs, output: Output) -> anyhow::Result<()> {
    if let Some(group) = args.group.clone() {
        return run_group(client, args, &group, output).await;
    }
    let from = parse_from(&args.from)?;
    let topic = client.topic(&args.topic).await?;
    let partitions: Vec<i32> = match args.partition {
        Some(p) if p < 0 || p as usize >= topic.partitions.len() => {
            bail!(
                "topic '{}' has no partition {p} (it has {})",
                args.topic,
                topic.partitions.len()
            )
        }
        Some(p) => vec![p],
        // An offset is a position in one partition (Kafka's console
        // consumer also wants one named): applied to each, a partition
        // shorter than it failed the whole command at once with --follow,
        // and was skipped without a word without.
        None if matches!(from, StartFrom::Offset(_)) && topic.partitions.len() > 1 => bail!(
            "--from {} is an offset in one partition, and topic '{}' has {}: add --partition (or use earliest, latest or a time)",
            args.from,
            args.topic,
            topic.partitions.len()
        ),
        None => topic.partitions.iter().map(|p| p.partition).collect(),
    };
    let limit = args.max_records.unwrap_or(u64::MAX);
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<Vec<ConsumedRecord>>>(16);
    // Every consumer first, then the readers: a reader streams its
    // partition (`streaming`), and one stopped on a full channel while
    // this task still looked up offsets could hold the connection's
    // flow-control window that the lookups need.
    let mut consumers = Vec::new();
    for partition in partitions {
        let mut consumer = client
            .partition_consumer(&args.topic, partition, from)
            .await?;
        consumer.streaming = true;
        if let StartFrom::Offset(o) = from {
            if !args.follow && o > consumer.high_watermark() {
                // Nothing to read without waiting: said, rather than an
                // empty run that looks like an empty partition.
                eprintln!(
                    "warning: offset {o} is past the end of {}-{partition} (high watermark {}): nothing to read; --follow waits for it",
                    args.topic,
                    consumer.high_watermark()
                );
            }
        }
        consumers.push(consumer);
    }
    // Where a reader whose position left the log (retention or deleted
    // records overtook it) starts again, as Kafka's auto.offset.reset:
    // the log start for earliest or a time, the end for latest; an exact
    // offset asked for is an error.
    let reset = match from {
        StartFrom::Earliest | StartFrom::Timestamp(_) => Some(StartFrom::Earliest),
        StartFrom::Latest => Some(StartFrom::Latest),
        StartFrom::Offset(_) => None,
    };
    for mut consumer in consumers {
        let tx = tx.clone();
        let follow = args.follow;
        let client = client.clone();
        let topic = args.topic.clone();
        tokio::spawn(async move {
            // Without --follow, stop at the high watermark seen at start.
            let mut end = consumer.high_watermark();
            // Leadership moves and broker restarts are ridden out: retriable
            // errors are retried for up to RETRY_WINDOW.
            let mut failing_since: Option<std::time::Instant> = None;
            loop {
                if !follow && consumer.position() >= end {
                    return;
                }
                let batch = match consumer.poll().await {
                    Ok(records) => {
                        failing_since = None;
                        Ok(records)
                    }
                    Err(e) if e.is_retriable() => {
                        let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() < RETRY_WINDOW {
                            tokio::time::sleep(RETRY_BACKOFF).await;
                            continue;
                        }
                        Err(anyhow::Error::from(e))
                    }
                    // The position left the log, or the topic was deleted
                    // and created again: a fresh consumer starts over at
                    // the reset point (up to the new topic's own end).
                    Err(e)
                        if reset.is_some()
                            && matches!(
                                e.code(),
                                pb::ErrorCode::OffsetOutOfRange | pb::ErrorCode::UnknownTopicId
                            ) =>
                    {
                        let recreated = e.code() == pb::ErrorCode::UnknownTopicId;
                        let partition = consumer.partition();
                        client.invalidate(&topic);
                        let from = reset.expect("checked");
                        match client.partition_consumer(&topic, partition, from).await {
                            Ok(mut fresh) => {
                                let why = if recreated {
                                    "the topic was deleted and created again".to_string()
                                } else {
                                    format!(
                                        "offset {} is no longer in the log",
                                        consumer.position()
                                    )
                                };
                                eprintln!(
                                    "{topic}-{partition}: {why}; reading on from {}",
                                    fresh.position()
                                );
                                fresh.streaming = true;
                                if recreated {
                                    end = fresh.high_watermark();
                                }
                                consumer = fresh;
                                continue;
                            }
                            Err(e) => Err(anyhow::Error::from(e)),
                        }
                    }
                    Err(e) => Err(anyhow::Error::from(e)),
                };
                let failed = batch.is_err();
                if tx.send(batch).await.is_err() || failed {
                    return;
                }
            }
        });
    }
    drop(tx);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    while printed < limit {
        let Some(batch) = rx.recv().await else { break };
        for record in batch? {
            if printed >= limit {
                break;
            }
            if reader_gone(write_record(&mut out, &record, output))? {
                return Ok(());
            }
            printed += 1;
        }
        if reader_gone(out.flush())? {
            return Ok(());
        }
    }
    reader_gone(out.flush())?;
    Ok(())
}

/// Whether a write failed because the reader closed the pipe (`| head`),
/// which ends the command normally, as it does other Unix tools.
fn reader_gone(written: std::io::Result<()>) -> std::io::Result<bool> {
    match written {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(true),
        Err(e) => Err(e),
    }
}

/// `consume --group G`: a group member that prints what it is assigned,
/// committing printed records every second and when it stops (end of the
/// assigned partitions without --follow, --max-records, Ctrl-C or SIGTERM).
async fn run_group(
    client: &Client,
    args: ConsumeArgs,
    group: &str,
    output: Output,
) -> anyhow::Result<()> {
    if args.partition.is_some() {
        bail!("--partition cannot be combined with --group: the group assigns partitions");
    }
    let reset = match args.from.as_str() {
        "earliest" => OffsetReset::Earliest,
        "latest" => OffsetReset::Latest,
        other => bail!(
            "with --group, --from says where partitions without a committed offset start: earliest or latest, got '{other}' (use `runnel group reset-offsets` to move a group)"
        ),
    };
    client.topic(&args.topic).await?;
    let mut config = GroupConfig::new(group, &[args.topic.as_str()]);
    config.offset_reset = reset;
    config.client_id = "runnel-cli".into();
    let mut consumer = client.group_consumer(config)?;
    let limit = args.max_records.unwrap_or(u64::MAX);
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // One listener each, for the whole run: a signal that arrives while
    // records are being printed waits here for the next poll (a listener
    // made anew per poll missed it, and with tokio's handler installed
    // the default action no longer ended the process).
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut stopped_by_signal = false;
    let result: anyhow::Result<()> = async {
        while printed < limit {
            let records = tokio::select! {
                r = consumer.poll() => r?,
                _ = int.recv() => { stopped_by_signal = true; break },
                _ = term.recv() => { stopped_by_signal = true; break },
            };
            if records.is_empty() {
                if !args.follow && consumer.caught_up() {
                    break;
                }
                continue;
            }
            let mut rewind: std::collections::BTreeMap<(std::sync::Arc<str>, i32), i64> =
                Default::default();
            let mut rewind_to = |record: &ConsumedRecord| {
                let key = (record.topic.clone(), record.partition);
                let at = rewind.entry(key).or_insert(record.offset);
                *at = (*at).min(record.offset);
            };
            let mut written = Ok(());
            for record in &records {
                if printed >= limit {
                    rewind_to(record);
                    continue;
                }
                written = write_record(&mut out, record, output);
                if written.is_err() {
                    break;
                }
                printed += 1;
            }
            if written.is_ok() {
                written = out.flush();
            }
            if written.is_err() {
                // Which of this batch's records reached the reader is not
                // known (the buffer may have been partly written): none
                // of them counts as printed.
                records.iter().for_each(&mut rewind_to);
            }
            // Unprinted records stay uncommitted for the next member.
            for ((topic, partition), offset) in rewind {
                consumer.seek(&topic, partition, offset)?;
            }
            if reader_gone(written)? {
                break;
            }
        }
        Ok(())
    }
    .await;
    // The buffer is empty unless a write failed; then its records were
    // rewound above and are not committed.
    let _ = out.flush();
    drop(out);
    if stopped_by_signal {
        eprintln!("committing and leaving the group (Ctrl-C again to stop at once)");
    }
    // Committing can wait for a coordinator that is away (each try up to
    // its request timeout): a second signal stops at once, and the group
    // resumes from its last commit.
    let closed = tokio::select! {
        c = consumer.close() => c,
        _ = int.recv() => {
            result?;
            bail!("stopped before committing: the group resumes from its last commit");
        }
        _ = term.recv() => {
            result?;
            bail!("stopped before committing: the group resumes from its last commit");
        }
    };
    result?;
    closed.context("committing and leaving the group")?;
    Ok(())
}

fn lossy(b: &Option<bytes::Bytes>) -> serde_json::Value {
    match b {
        Some(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
        None => serde_json::Value::Null,
    }
}

fn write_record(out: &mut impl Write, r: &ConsumedRecord, output: Output) -> std::io::Result<()> {
    match output {
        Output::Table => {
            out.write_all(r.value.as_deref().unwrap_or_default())?;
            out.write_all(b"\n")
        }
        Output::Json => {
            let headers: serde_json::Map<String, serde_json::Value> = r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), lossy(v)))
                .collect();
            let mut line = serde_json::json!({
                "topic": r.topic, "partition": r.partition, "offset": r.offset,
                "timestamp_ms": r.timestamp_ms, "key": lossy(&r.key), "value": lossy(&r.value),
                "headers": headers,
            });
            // Bytes that are not UTF-8 (the lossy strings above replace
            // them with U+FFFD) come whole in base64 beside them.
            for (name, field) in [("key_base64", &r.key), ("value_base64", &r.value)] {
                if let Some(b) = field.as_ref().filter(|b| std::str::from_utf8(b).is_err()) {
                    use base64::Engine as _;
                    line[name] = base64::engine::general_purpose::STANDARD.encode(b).into();
                }
            }
            writeln!(out, "{line}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_accepts_the_documented_spellings() {
        assert_eq!(parse_from("earliest").unwrap(), StartFrom::Earliest);
        assert_eq!(parse_from("latest").unwrap(), StartFrom::Latest);
        assert_eq!(parse_from("42").unwrap(), StartFrom::Offset(42));
        assert_eq!(
            parse_from("2026-01-01T00:00:00Z").unwrap(),
            StartFrom::Timestamp(1_767_225_600_000)
        );
        assert!(parse_from("-1").is_err());
        assert!(parse_from("yesterday").is_err());
    }
}
