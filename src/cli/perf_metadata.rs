//! `runnel perf metadata`: how fast the controller quorum takes metadata
//! changes — one topic with many partitions created in one request, and
//! small commands (topic config changes, one Raft entry each) per second
//! with many in flight.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use futures_util::stream::{self, StreamExt};
use runnel::client::Client;
use serde::Serialize;

use super::Output;

#[derive(Debug, Args, Clone)]
pub struct MetadataArgs {
    /// Partitions of the topic created in one request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i32).range(1..))]
    partitions: i32,
    /// Replication factor of that topic (at most the broker count).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    replication_factor: i32,
    /// Config-change commands to submit.
    #[arg(long, default_value_t = 5000)]
    commands: usize,
    /// Commands in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Debug, Serialize)]
struct MetadataReport {
    partitions: i32,
    create_seconds: f64,
    commands: usize,
    concurrency: usize,
    commands_seconds: f64,
    commands_per_second: f64,
}

pub async fn run(client: &Client, args: MetadataArgs, output: Output) -> anyhow::Result<()> {
    let topic = format!("perf-metadata-{}", std::process::id());
    let started = Instant::now();
    client
        .create_topic(
            &topic,
            args.partitions,
            args.replication_factor,
            BTreeMap::new(),
        )
        .await
        .with_context(|| format!("creating {topic} with {} partitions", args.partitions))?;
    let create = started.elapsed();

    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..args.commands)
        .map(|i| {
            let (client, topic) = (client.clone(), topic.clone());
            async move {
                let set = BTreeMap::from([(
                    "retention.ms".to_string(),
                    (3_600_000 + i as u64).to_string(),
                )]);
                client.alter_topic_config(&topic, set, Vec::new()).await
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let commands = started.elapsed();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let first_failure = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .map(|e| e.to_string());
    client
        .delete_topic(&topic)
        .await
        .with_context(|| format!("deleting {topic}"))?;
    if let Some(first) = first_failure {
        anyhow::bail!(
            "{failed} of {} config changes failed; the first: {first}",
            args.commands
        );
    }
    let report = MetadataReport {
        partitions: args.partitions,
        create_seconds: create.as_secs_f64(),
        commands: args.commands,
        concurrency: args.concurrency,
        commands_seconds: commands.as_secs_f64(),
        commands_per_second: args.commands as f64 / commands.as_secs_f64().max(1e-9),
    };
    match output {
        Output::Json => outln!("{}", serde_json::to_string(&report)?),
        Output::Table => {
            outln!(
                "create topic with {} partitions: {:.3} s",
                report.partitions,
                report.create_seconds
            );
            outln!(
                "metadata commands: {} in {:.2} s with {} in flight: {:.0} commands/s",
                report.commands,
                report.commands_seconds,
                report.concurrency,
                report.commands_per_second
            );
        }
    }
    Ok(())
}
