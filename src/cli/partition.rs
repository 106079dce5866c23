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
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "topic": topic, "changed": changed })
                ),
                Output::Table if changed.is_empty() => println!("no leader changed"),
                Output::Table => println!(
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
