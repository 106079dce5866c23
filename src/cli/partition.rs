//! `runnel partition ...`: leadership of a topic's partitions.

use clap::{Subcommand, ValueEnum};
use runnel::client::Client;

use super::topic::{self, TopicCommand};
use super::Output;

#[derive(Debug, Subcommand)]
pub enum PartitionCommand {
    /// Leader, leader epoch, replicas, ISR and offsets of every partition.
    Describe {
        /// Topic.
        topic: String,
    },
    /// Move leadership back to preferred replicas (or, unclean, give
    /// leaderless partitions any live replica).
    ElectLeaders {
        /// Topic.
        #[arg(long)]
        topic: String,
        /// Only these partitions (repeatable; default all).
        #[arg(long = "partition")]
        partitions: Vec<i32>,
        /// Election type.
        #[arg(long = "type", value_enum, default_value_t = Election::Preferred)]
        election: Election,
    },
    /// Move partitions to new replicas: new ones copy the log and join the
    /// ISR, then the old ones leave. Follow progress with `describe`.
    Reassign {
        /// Topic.
        #[arg(long)]
        topic: String,
        /// PARTITION=BROKER,BROKER,... (preferred leader first); repeatable.
        #[arg(long = "assign", value_name = "P=R1,R2", value_parser = parse_assignment, required_unless_present = "cancel")]
        assignments: Vec<(i32, Vec<i32>)>,
        /// Cancel the ongoing reassignment of these partitions (repeatable).
        #[arg(long, value_name = "PARTITION")]
        cancel: Vec<i32>,
    },
}

/// Parses `P=R1,R2,...`.
fn parse_assignment(s: &str) -> Result<(i32, Vec<i32>), String> {
    let (p, replicas) = s
        .split_once('=')
        .ok_or_else(|| format!("expected PARTITION=BROKER,BROKER,..., got '{s}'"))?;
    let p = p
        .trim()
        .parse()
        .map_err(|_| format!("bad partition '{p}'"))?;
    let replicas = replicas
        .split(',')
        .map(|r| r.trim().parse().map_err(|_| format!("bad broker id '{r}'")))
        .collect::<Result<Vec<i32>, _>>()?;
    Ok((p, replicas))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Election {
    /// The first replica, when it is in sync.
    Preferred,
    /// Any live replica for partitions without a leader (may lose records).
    Unclean,
}

pub async fn run(client: &Client, cmd: PartitionCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        PartitionCommand::Reassign {
            topic,
            mut assignments,
            cancel,
        } => {
            assignments.extend(cancel.into_iter().map(|p| (p, Vec::new())));
            let t = client.reassign_partitions(&topic, assignments).await?;
            match output {
                Output::Json => outln!("{}", topic::topic_json(&t)),
                Output::Table => {
                    outln!("reassignment submitted for {topic}; progress:");
                    topic::print_topic(&t);
                }
            }
            Ok(())
        }
        PartitionCommand::Describe { topic } => {
            topic::run(client, TopicCommand::Describe { name: topic }, output).await
        }
        PartitionCommand::ElectLeaders {
            topic,
            partitions,
            election,
        } => {
            let changed = client
                .elect_leaders(&topic, partitions, election == Election::Unclean)
                .await?;
            match output {
                Output::Json => outln!(
                    "{}",
                    serde_json::json!({ "topic": topic, "changed": changed })
                ),
                Output::Table if changed.is_empty() => outln!("no leader changed"),
                Output::Table => outln!(
                    "new leaders for {topic} partitions {}",
                    changed
                        .iter()
                        .map(i32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
            Ok(())
        }
    }
}
