//! `runnel group ...`: list, describe, reset-offsets, delete.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use runnel::client::Client;
use runnel_proto::v1 as pb;

use super::{print_table, Output};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List every consumer group.
    List,
    /// Members, assignment, committed offsets, log end offsets and lag.
    Describe { group: String },
    /// Move a group's committed offsets (refused while it has members);
    /// shows the new offsets, and commits them with --execute.
    ResetOffsets(ResetArgs),
    /// Delete an empty group and its committed offsets.
    Delete { group: String },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("to").required(true).args(
    ["to_earliest", "to_latest", "to_offset", "to_datetime", "shift_by"]
)))]
pub struct ResetArgs {
    /// Group id.
    group: String,
    /// Topic whose partitions move.
    #[arg(long)]
    topic: String,
    /// To the log start.
    #[arg(long)]
    to_earliest: bool,
    /// To the high watermark.
    #[arg(long)]
    to_latest: bool,
    /// To this offset (clamped to the log).
    #[arg(long, value_name = "N")]
    to_offset: Option<i64>,
    /// To the first record at or after this ISO-8601 time (with Z or an
    /// offset such as +01:00; UTC without a zone).
    #[arg(long, value_name = "ISO")]
    to_datetime: Option<String>,
    /// By N from the committed offset (negative moves back).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    shift_by: Option<i64>,
    /// Show the new offsets without committing them (the default).
    #[arg(long, conflicts_with = "execute")]
    dry_run: bool,
    /// Commit the new offsets; without it the command only shows them,
    /// as Kafka's kafka-consumer-groups does.
    #[arg(long)]
    execute: bool,
}

fn target(args: &ResetArgs) -> anyhow::Result<pb::reset_offsets_request::To> {
    use pb::reset_offsets_request::To;
    Ok(if args.to_earliest {
        To::ToEarliest(true)
    } else if args.to_latest {
        To::ToLatest(true)
    } else if let Some(o) = args.to_offset {
        if o < 0 {
            bail!("--to-offset must not be negative, got {o}");
        }
        To::ToOffset(o)
    } else if let Some(t) = &args.to_datetime {
        let ms = super::parse_time_ms(t)
            .with_context(|| format!("--to-datetime expects an ISO-8601 time, got '{t}'"))?;
        To::ToTimestampMs(ms)
    } else if let Some(n) = args.shift_by {
        To::ShiftBy(n)
    } else {
        bail!("say where to move: --to-earliest, --to-latest, --to-offset, --to-datetime or --shift-by")
    })
}

fn tp_list(v: &[pb::TopicPartition]) -> String {
    v.iter()
        .map(|tp| format!("{}-{}", tp.topic, tp.partition))
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn run(client: &Client, cmd: GroupCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::List => {
            let groups = client.list_groups().await?;
            if output == Output::Json {
                let v: Vec<_> = groups
                    .iter()
                    .map(|g| serde_json::json!({"group": g.group, "state": g.state, "members": g.members}))
                    .collect();
                outln!("{}", serde_json::Value::Array(v));
                return Ok(());
            }
            let mut rows = vec![vec!["GROUP".to_string(), "STATE".into(), "MEMBERS".into()]];
            for g in groups {
                rows.push(vec![g.group, g.state, g.members.to_string()]);
            }
            print_table(&rows);
        }
        GroupCommand::Describe { group } => {
            let d = client.describe_group(&group).await?;
            let strategy = pb::AssignmentStrategy::try_from(d.strategy)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("ASSIGNMENT_STRATEGY_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            let protocol = pb::RebalanceProtocol::try_from(d.protocol)
                .map(|p| {
                    p.as_str_name()
                        .trim_start_matches("REBALANCE_PROTOCOL_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            if output == Output::Json {
                let members: Vec<_> = d
                    .members
                    .iter()
                    .map(|m| serde_json::json!({
                        "member_id": m.member_id, "group_instance_id": m.group_instance_id,
                        "client_id": m.client_id,
                        "assignment": m.assignment.iter().map(|tp| serde_json::json!({"topic": tp.topic, "partition": tp.partition})).collect::<Vec<_>>(),
                    }))
                    .collect();
                let lags: Vec<_> = d
                    .lags
                    .iter()
                    .map(|l| serde_json::json!({
                        "topic": l.topic, "partition": l.partition, "committed_offset": l.committed_offset,
                        "log_end_offset": l.log_end_offset, "lag": l.lag, "member_id": l.member_id,
                    }))
                    .collect();
                outln!(
                    "{}",
                    serde_json::json!({
                        "group": d.group, "state": d.state, "generation_id": d.generation_id,
                        "strategy": strategy, "protocol": protocol, "coordinator": d.coordinator, "members": members,
                        "lags": lags, "total_lag": d.total_lag,
                    })
                );
                return Ok(());
            }
            outln!("group:        {}", d.group);
            outln!("state:        {}", d.state);
            outln!("generation:   {}", d.generation_id);
            outln!("strategy:     {strategy}");
            outln!("protocol:     {protocol}");
            outln!("coordinator:  {}", d.coordinator);
            outln!("members:      {}", d.members.len());
            if !d.members.is_empty() {
                let mut rows = vec![vec![
                    "MEMBER".to_string(),
                    "INSTANCE".into(),
                    "CLIENT".into(),
                    "ASSIGNMENT".into(),
                ]];
                for m in &d.members {
                    rows.push(vec![
                        m.member_id.clone(),
                        m.group_instance_id.clone(),
                        m.client_id.clone(),
                        tp_list(&m.assignment),
                    ]);
                }
                print_table(&rows);
            }
            outln!();
            let mut rows = vec![vec![
                "TOPIC".to_string(),
                "PARTITION".into(),
                "COMMITTED".into(),
                "LOG-END".into(),
                "LAG".into(),
                "MEMBER".into(),
            ]];
            let show = |o: i64| {
                if o < 0 {
                    "-".to_string()
                } else {
                    o.to_string()
                }
            };
            for l in &d.lags {
                rows.push(vec![
                    l.topic.clone(),
                    l.partition.to_string(),
                    show(l.committed_offset),
                    show(l.log_end_offset),
                    show(l.lag),
                    l.member_id.clone(),
                ]);
            }
            print_table(&rows);
            outln!("total lag:    {}", show(d.total_lag));
        }
        GroupCommand::ResetOffsets(args) => {
            let to = target(&args)?;
            let dry_run = !args.execute;
            let offsets = client
                .reset_offsets(pb::ResetOffsetsRequest {
                    group: args.group.clone(),
                    topic: args.topic.clone(),
                    to: Some(to),
                    dry_run,
                })
                .await?;
            if output == Output::Json {
                let v: Vec<_> = offsets
                    .iter()
                    .map(|o| serde_json::json!({"topic": o.topic, "partition": o.partition, "offset": o.offset}))
                    .collect();
                outln!("{}", serde_json::json!({"dry_run": dry_run, "offsets": v}));
                return Ok(());
            }
            let mut rows = vec![vec![
                "TOPIC".to_string(),
                "PARTITION".into(),
                "NEW-OFFSET".into(),
            ]];
            for o in offsets {
                rows.push(vec![o.topic, o.partition.to_string(), o.offset.to_string()]);
            }
            print_table(&rows);
            if dry_run {
                outln!("(dry run: nothing committed; add --execute to commit)");
            }
        }
        GroupCommand::Delete { group } => {
            client.delete_group(&group).await?;
            if output == Output::Json {
                outln!("{}", serde_json::json!({"deleted": group}));
            } else {
                outln!("deleted group {group}");
            }
        }
    }
    Ok(())
}
