//! `runnel produce TOPIC`: one record per input line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use runnel::client::{Client, ProducerConfig, ProducerRecord};
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

pub async fn run(client: &Client, args: ProduceArgs) -> anyhow::Result<()> {
    // Fail fast on an unknown topic or partition, before reading input.
    let topic = client.topic(&args.topic).await?;
    if let Some(p) = args.partition {
        if p < 0 || p as usize >= topic.partitions.len() {
            bail!(
                "topic '{}' has no partition {p} (it has {})",
                args.topic,
                topic.partitions.len()
            );
        }
    }
    let producer = client.producer(ProducerConfig {
        acks: match args.acks {
            AcksArg::All => pb::Acks::All,
            AcksArg::Leader => pb::Acks::Leader,
            AcksArg::None => pb::Acks::None,
        },
        batch_bytes_max: args.batch_bytes,
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
    let mut lines = BufReader::new(input).lines();
    let mut acks = Vec::new();
    while let Some(line) = lines.next_line().await.context("reading input")? {
        let (key, value) = match &args.key_separator {
            Some(sep) => match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(Bytes::from(k.to_string())), v.to_string()),
                None => (None, line),
            },
            None => (None, line),
        };
        let record = ProducerRecord {
            key,
            value: Some(Bytes::from(value)),
            partition: args.partition,
            ..ProducerRecord::default()
        };
        acks.push(producer.send(&args.topic, record).await?);
    }
    producer.close().await?;
    let total = acks.len();
    let mut failed = 0usize;
    let mut first_error = None;
    for ack in acks {
        if let Err(e) = ack.await {
            failed += 1;
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        bail!("{failed} of {total} records were not produced: {e}");
    }
    eprintln!("produced {total} records to {}", args.topic);
    Ok(())
}
