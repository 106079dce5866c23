//! `runnel topic ...`.

use anyhow::bail;
use clap::Subcommand;
use runnel::client::Client;
use runnel_proto::v1 as pb;

use super::{print_table, ConfigPairs, Output};

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name: [a-zA-Z0-9._-], at most 249 characters.
        name: String,
        /// Number of partitions [default: the broker's `num_partitions`].
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        partitions: Option<i32>,
        /// Replicas per partition [default: the broker's
        /// `default_replication_factor`].
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        replication_factor: Option<i32>,
        #[command(flatten)]
        config: ConfigPairs,
    },
    /// List topics.
    List {
        /// Include internal topics (names starting with "__").
        #[arg(long)]
        internal: bool,
    },
    /// Show a topic's partitions, replicas and configs.
    Describe { name: String },
    /// Delete a topic and its data.
    Delete { name: String },
    /// Change configs or grow the partition count.
    Alter {
        name: String,
        #[command(flatten)]
        config: ConfigPairs,
        /// Reset a config to the broker default (repeatable).
        #[arg(long = "delete-config", value_name = "KEY")]
        delete_config: Vec<String>,
        /// New total partition count.
        #[arg(long)]
        partitions: Option<i32>,
    },
    /// Delete the records below an offset (every in-sync replica's log
    /// then starts there); whole segments below it are removed from disk.
    /// Name the partitions, or say --all-partitions.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["partitions", "all_partitions"])))]
    DeleteRecords {
        name: String,
        /// Partition (repeatable).
        #[arg(long = "partition", value_name = "N")]
        partitions: Vec<i32>,
        /// Every partition of the topic.
        #[arg(long)]
        all_partitions: bool,
        /// Delete below this offset, or "end" for below the high
        /// watermark (every record consumers can read now).
        #[arg(long, value_name = "OFFSET|end", value_parser = parse_before)]
        before: i64,
    },
}

/// An offset, or "end" (-1: the high watermark).
fn parse_before(s: &str) -> Result<i64, String> {
    match s {
        "end" => Ok(-1),
        _ => match s.parse::<i64>() {
            Ok(o) if o >= 0 => Ok(o),
            _ => Err(format!("'{s}' is not an offset (>= 0) or \"end\"")),
        },
    }
}

pub async fn run(client: &Client, cmd: TopicCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            config,
        } => {
            let t = client
                .create_topic(
                    &name,
                    partitions.unwrap_or(-1),
                    replication_factor.unwrap_or(-1),
                    config.to_map()?,
                )
                .await?;
            match output {
                Output::Json => outln!("{}", topic_json(&t)),
                Output::Table => outln!(
                    "created topic {} with {} partitions, replication factor {}",
                    t.name,
                    t.partitions.len(),
                    t.replication_factor
                ),
            }
        }
        TopicCommand::List { internal } => {
            let topics = client.list_topics(internal).await?;
            match output {
                Output::Json => {
                    let list: Vec<_> = topics
                        .iter()
                        .map(|t| serde_json::json!({"name": t.name, "partitions": t.partitions, "replication_factor": t.replication_factor}))
                        .collect();
                    outln!("{}", serde_json::Value::Array(list));
                }
                Output::Table => {
                    let mut rows =
                        vec![vec!["TOPIC".to_string(), "PARTITIONS".into(), "RF".into()]];
                    for t in topics {
                        rows.push(vec![
                            t.name,
                            t.partitions.to_string(),
                            t.replication_factor.to_string(),
                        ]);
                    }
                    print_table(&rows);
                }
            }
        }
        TopicCommand::Describe { name } => {
            let t = client.describe_topic(&name).await?;
            match output {
                Output::Json => outln!("{}", topic_json(&t)),
                Output::Table => print_topic(&t),
            }
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            super::done(
                output,
                serde_json::json!({"deleted_topic": name}),
                format_args!("deleted topic {name}"),
            );
        }
        TopicCommand::DeleteRecords {
            name,
            partitions,
            all_partitions,
            before,
        } => {
            let partitions = if all_partitions {
                let t = client.describe_topic(&name).await?;
                t.partitions.iter().map(|p| p.partition).collect()
            } else {
                partitions
            };
            let mut rows = vec![vec![
                "PARTITION".to_string(),
                "DELETED BELOW".into(),
                "LOW WATERMARK".into(),
                "ERROR".into(),
            ]];
            let mut json = Vec::new();
            // Every partition is tried and reported: deletions done cannot
            // be undone, so one failing must not hide the others.
            let mut failed = Vec::new();
            for p in partitions {
                match client
                    .delete_records(&name, p, before, std::time::Duration::ZERO)
                    .await
                {
                    Ok(r) => {
                        json.push(serde_json::json!({"partition": p, "offset": r.offset, "low_watermark": r.low_watermark}));
                        rows.push(vec![
                            p.to_string(),
                            r.offset.to_string(),
                            r.low_watermark.to_string(),
                            String::new(),
                        ]);
                    }
                    Err(e) => {
                        json.push(serde_json::json!({"partition": p, "error": e.to_string()}));
                        rows.push(vec![p.to_string(), "-".into(), "-".into(), e.to_string()]);
                        failed.push((p, e));
                    }
                }
            }
            match output {
                Output::Json => outln!("{}", serde_json::Value::Array(json)),
                Output::Table => print_table(&rows),
            }
            if let Some((_, first)) = failed.first() {
                bail!(
                    "deleting records of {name} failed for partition(s) {} ({first}); any others are done (see above)",
                    failed
                        .iter()
                        .map(|(p, _)| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        TopicCommand::Alter {
            name,
            config,
            delete_config,
            partitions,
        } => {
            let set = config.to_map()?;
            if set.is_empty() && delete_config.is_empty() && partitions.is_none() {
                bail!("nothing to alter: give --config, --delete-config or --partitions");
            }
            let configs = !set.is_empty() || !delete_config.is_empty();
            if configs && partitions.is_some() {
                // Adding partitions cannot be undone (it moves keys to
                // other partitions): the configs are checked first, so a
                // typo in a key changes nothing.
                client
                    .alter_topic_config_checked(&name, set.clone(), delete_config.clone(), true)
                    .await?;
            }
            let mut t = None;
            if let Some(n) = partitions {
                t = Some(client.add_partitions(&name, n).await?);
            }
            if configs {
                let altered = client.alter_topic_config(&name, set, delete_config).await;
                t = Some(match (altered, partitions) {
                    (Ok(t), _) => t,
                    (Err(e), Some(n)) => {
                        return Err(anyhow::Error::new(e).context(format!(
                            "topic {name} now has {n} partitions, but its config change failed"
                        )))
                    }
                    (Err(e), None) => return Err(e.into()),
                });
            }
            let t = t.expect("one branch ran");
            match output {
                Output::Json => outln!("{}", topic_json(&t)),
                Output::Table => print_topic(&t),
            }
        }
    }
    Ok(())
}

pub(crate) fn topic_json(t: &pb::TopicDescription) -> serde_json::Value {
    let partitions: Vec<_> = t
        .partitions
        .iter()
        .map(|p| {
            serde_json::json!({
                "partition": p.partition, "leader": p.leader, "leader_epoch": p.leader_epoch,
                "replicas": p.replicas, "isr": p.isr, "log_start_offset": p.log_start_offset,
                "high_watermark": p.high_watermark, "log_end_offset": p.log_end_offset,
                "adding_replicas": p.adding_replicas, "removing_replicas": p.removing_replicas,
            })
        })
        .collect();
    let configs: std::collections::BTreeMap<_, _> = t.configs.iter().collect();
    serde_json::json!({
        "name": t.name, "topic_id": t.topic_id, "replication_factor": t.replication_factor,
        "partitions": partitions, "configs": configs, "overridden_configs": t.overridden_configs,
    })
}

pub(crate) fn print_topic(t: &pb::TopicDescription) {
    outln!("topic:               {}", t.name);
    outln!("id:                  {}", t.topic_id);
    outln!("replication factor:  {}", t.replication_factor);
    let mut rows = vec![vec![
        "PARTITION".to_string(),
        "LEADER".into(),
        "EPOCH".into(),
        "REPLICAS".into(),
        "ISR".into(),
        "START".into(),
        "HW".into(),
        "END".into(),
        "REASSIGNING".into(),
    ]];
    let join = |v: &[i32]| v.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
    for p in &t.partitions {
        rows.push(vec![
            p.partition.to_string(),
            p.leader.to_string(),
            p.leader_epoch.to_string(),
            join(&p.replicas),
            join(&p.isr),
            p.log_start_offset.to_string(),
            p.high_watermark.to_string(),
            p.log_end_offset.to_string(),
            if p.adding_replicas.is_empty() && p.removing_replicas.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "+{} -{}",
                    join(&p.adding_replicas),
                    join(&p.removing_replicas)
                )
            },
        ]);
    }
    print_table(&rows);
    if !t.overridden_configs.is_empty() {
        outln!("configs overridden:");
        let mut keys = t.overridden_configs.clone();
        keys.sort();
        for k in keys {
            outln!("  {k}={}", t.configs.get(&k).cloned().unwrap_or_default());
        }
    }
}
