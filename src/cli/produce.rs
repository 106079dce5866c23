//! `runnel produce TOPIC`: one record per input line.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures_util::FutureExt;
use runnel::client::{Client, ClientError, DeliveryFuture, ProducerConfig, ProducerRecord};
use runnel_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to produce to.
    topic: String,
    /// Durability wanted before a record counts as sent.
    #[arg(long, value_enum, default_value_t = AcksArg::All)]
    acks: AcksArg,
    /// Split each line at the first SEP into key and value.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Send every record to this partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Read lines from this file instead of stdin.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Batch size in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    batch_bytes: usize,
    /// Longest wait for a batch to fill, in ms.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AcksArg {
    All,
    Leader,
    None,
}

pub async fn run(client: &Client, args: ProduceArgs, output: super::Output) -> anyhow::Result<()> {
    // Fail fast on an unknown topic or partition, before reading input.
    let topic = client.describe_topic(&args.topic).await?;
    if let Some(p) = args.partition {
        if p < 0 || p as usize >= topic.partitions.len() {
            bail!(
                "topic '{}' has no partition {p} (it has {})",
                args.topic,
                topic.partitions.len()
            );
        }
    }
    // A batch larger than the topic takes would fail whole.
    let mut batch_bytes = args.batch_bytes;
    if let Some(max) = topic
        .configs
        .get("max.message.bytes")
        .and_then(|v| v.parse::<usize>().ok())
    {
        if batch_bytes > max {
            eprintln!(
                "--batch-bytes {batch_bytes} is more than topic '{}' takes (max.message.bytes {max}): batches of at most {max} bytes",
                args.topic
            );
            batch_bytes = max;
        }
    }
    if args.key_separator.as_deref() == Some("") {
        bail!("--key-separator must not be empty");
    }
    let producer = client.producer(ProducerConfig {
        acks: match args.acks {
            AcksArg::All => pb::Acks::All,
            AcksArg::Leader => pb::Acks::Leader,
            AcksArg::None => pb::Acks::None,
        },
        batch_bytes_max: batch_bytes,
        linger: Duration::from_millis(args.linger_ms),
        ..ProducerConfig::default()
    });
    let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &args.file {
        Some(path) => Box::new(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    // Lines are bytes: a record's value need not be text.
    let mut input = BufReader::new(input);
    // Answers still awaited, oldest first, with their line numbers. Those
    // answered are counted as they come, so the queue holds about what
    // is in flight (the producer's buffer bounds it), not every line of
    // an endless input; and a refused record (topic deleted, ACL
    // revoked, too few replicas) stops the input at once, not at its end
    // (`tail -f log | runnel produce`: there is no end).
    let mut pending: VecDeque<(u64, DeliveryFuture)> = VecDeque::new();
    let mut produced = 0u64;
    let mut failed: Option<(u64, ClientError)> = None;
    let mut stopped = None;
    let mut line = Vec::new();
    let mut line_no = 0u64;
    // Lines without the separator go out without a key.
    let mut keyless = 0u64;
    let settle = |pending: &mut VecDeque<(u64, DeliveryFuture)>,
                  produced: &mut u64,
                  failed: &mut Option<(u64, ClientError)>| {
        while let Some((no, front)) = pending.front_mut() {
            let Some(outcome) = (&mut *front).now_or_never() else {
                break;
            };
            match outcome {
                Ok(_) => *produced += 1,
                Err(e) => {
                    failed.get_or_insert((*no, e));
                }
            }
            pending.pop_front();
        }
    };
    'lines: loop {
        line.clear();
        // The next line, or meanwhile the oldest answer: a record refused
        // while the input is quiet (`tail -f` of an idle log) stops the
        // command then, not when the next line comes, which may be never.
        // (`read_until` keeps what it read of a line it was interrupted
        // in, and goes on from there.)
        let read = loop {
            let oldest = pending.front_mut().map(|(_, f)| f);
            let answered = async move {
                match oldest {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = input.read_until(b'\n', &mut line) => break read,
                outcome = answered => {
                    let (no, _) = pending.pop_front().expect("an answer was awaited");
                    match outcome {
                        Ok(_) => produced += 1,
                        Err(e) => {
                            failed.get_or_insert((no, e));
                            break 'lines;
                        }
                    }
                }
            }
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                stopped = Some(anyhow::Error::from(e).context("reading input"));
                break;
            }
        }
        line_no += 1;
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        let (key, value) = split_key(&line, args.key_separator.as_deref());
        if args.key_separator.is_some() && key.is_none() {
            keyless += 1;
        }
        let record = ProducerRecord {
            key,
            value: Some(value),
            partition: args.partition,
            ..ProducerRecord::default()
        };
        match producer.send(&args.topic, record).await {
            Ok(ack) => pending.push_back((line_no, ack)),
            Err(e) => {
                stopped = Some(anyhow::Error::from(e).context(format!("line {line_no}")));
                break;
            }
        }
        settle(&mut pending, &mut produced, &mut failed);
        if failed.is_some() {
            break;
        }
    }
    // Whatever happened to the input, what was sent is seen through and
    // counted.
    producer.close().await?;
    for (no, ack) in pending {
        match ack.await {
            Ok(_) => produced += 1,
            Err(e) => {
                failed.get_or_insert((no, e));
            }
        }
    }
    if let Some((no, e)) = failed {
        bail!("line {no} was not produced: {e}; stopped after {produced} of the {line_no} lines read were produced");
    }
    if let Some(e) = stopped {
        return Err(e.context(format!(
            "stopped after {produced} of the {line_no} lines read were produced"
        )));
    }
    let total = produced;
    if keyless > 0 {
        eprintln!(
            "{keyless} lines had no key separator and were sent without a key (to any partition)"
        );
    }
    match output {
        // The count on stdout, for scripts; stdout carries nothing else.
        super::Output::Json => super::done(
            output,
            serde_json::json!({ "topic": args.topic, "produced": total, "keyless": keyless }),
            "",
        ),
        super::Output::Table => eprintln!("produced {total} records to {}", args.topic),
    }
    Ok(())
}

/// A line as (key, value): split at the first `sep` when given and
/// present, else all value.
fn split_key(line: &[u8], sep: Option<&str>) -> (Option<Bytes>, Bytes) {
    if let Some(sep) = sep.map(str::as_bytes).filter(|s| !s.is_empty()) {
        if let Some(at) = line.windows(sep.len()).position(|w| w == sep) {
            return (
                Some(Bytes::copy_from_slice(&line[..at])),
                Bytes::copy_from_slice(&line[at + sep.len()..]),
            );
        }
    }
    (None, Bytes::copy_from_slice(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_at_the_first_separator_and_may_be_any_bytes() {
        assert_eq!(
            split_key(b"k=v=w", Some("=")),
            (Some(Bytes::from_static(b"k")), Bytes::from_static(b"v=w"))
        );
        assert_eq!(
            split_key(b"no-sep", Some("=")),
            (None, Bytes::from_static(b"no-sep"))
        );
        assert_eq!(
            split_key(b"\xff\xfe::\x00", Some("::")),
            (
                Some(Bytes::from_static(b"\xff\xfe")),
                Bytes::from_static(b"\x00")
            )
        );
        assert_eq!(split_key(b"a", None), (None, Bytes::from_static(b"a")));
    }
}
