//! `runnel cluster health`: a one-screen summary of the cluster (brokers
//! up and fenced, the active controller, offline, under-replicated and
//! under-min-ISR partitions, the largest group lags) that exits non-zero
//! when the cluster is unhealthy; `--node` only asks the bootstrap node's
//! gRPC health service (the container health check).

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use runnel::client::{Client, ClientOptions};
use runnel_proto::v1 as pb;

use super::Output;

/// Partitions and groups listed by name at most.
const LISTED_MAX: usize = 10;

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Only check that the --bootstrap node serves (gRPC health), not the
    /// whole cluster: for container health checks, where one node's
    /// verdict should not depend on the others.
    #[arg(long)]
    node: bool,
}

/// What makes the cluster unhealthy, found from its metadata.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub brokers_up: Vec<i32>,
    pub brokers_fenced: Vec<i32>,
    pub controller_id: i32,
    pub partitions: usize,
    /// `topic-partition` names.
    pub offline: Vec<String>,
    pub under_replicated: Vec<String>,
    pub under_min_isr: Vec<String>,
}

impl Verdict {
    /// Reads the brokers, controller and every partition (internal topics
    /// included) from one metadata answer.
    pub fn of(meta: &pb::MetadataResponse) -> Verdict {
        let mut v = Verdict {
            controller_id: meta.controller_id,
            ..Verdict::default()
        };
        for b in &meta.brokers {
            if b.fenced {
                v.brokers_fenced.push(b.id);
            } else {
                v.brokers_up.push(b.id);
            }
        }
        for t in &meta.topics {
            let min_isr: usize = t
                .configs
                .get("min.insync.replicas")
                .and_then(|m| m.parse().ok())
                .unwrap_or(1);
            for p in &t.partitions {
                v.partitions += 1;
                let name = format!("{}-{}", t.name, p.partition);
                if p.leader < 0 {
                    v.offline.push(name.clone());
                }
                if p.isr.len() < p.replicas.len() {
                    v.under_replicated.push(name.clone());
                }
                if p.isr.len() < min_isr {
                    v.under_min_isr.push(name);
                }
            }
        }
        v
    }

    /// Why the cluster is unhealthy; empty when it is healthy.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.controller_id < 0 {
            out.push("no active controller".to_string());
        }
        if !self.brokers_fenced.is_empty() {
            out.push(format!("{} broker(s) fenced", self.brokers_fenced.len()));
        }
        for (what, list) in [
            ("offline", &self.offline),
            ("under-replicated", &self.under_replicated),
            ("under min.insync.replicas", &self.under_min_isr),
        ] {
            if !list.is_empty() {
                out.push(format!("{} partition(s) {what}", list.len()));
            }
        }
        out
    }
}

/// A group and its total lag.
struct GroupLag {
    group: String,
    state: String,
    total_lag: i64,
}

pub async fn run(
    bootstrap: &str,
    options: ClientOptions,
    args: HealthArgs,
    output: Output,
) -> anyhow::Result<()> {
    if args.node {
        return node_health(bootstrap, &options, output).await;
    }
    let client = Client::connect_with(bootstrap, options)
        .await
        .with_context(|| format!("cannot reach the cluster at {bootstrap}"))?;
    let meta = client.metadata(&[]).await.context("metadata")?;
    let quorum = client.describe_cluster().await.ok().and_then(|c| c.quorum);
    let verdict = Verdict::of(&meta);
    let lags = group_lags(&client).await;
    let problems = verdict.problems();

    if output == Output::Json {
        let groups: Vec<_> = lags
            .iter()
            .flatten()
            .map(|g| serde_json::json!({"group": g.group, "state": g.state, "total_lag": g.total_lag}))
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "healthy": problems.is_empty(),
                "problems": problems,
                "cluster_id": meta.cluster_id,
                "controller_id": verdict.controller_id,
                "raft_term": quorum.as_ref().map(|q| q.term),
                "brokers_up": verdict.brokers_up,
                "brokers_fenced": verdict.brokers_fenced,
                "partitions": verdict.partitions,
                "offline": verdict.offline,
                "under_replicated": verdict.under_replicated,
                "under_min_isr": verdict.under_min_isr,
                "groups": groups,
                "groups_error": lags.as_ref().err(),
            })
        );
    } else {
        print_summary(&meta, quorum.as_ref(), &verdict, &lags, &problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("cluster unhealthy: {}", problems.join("; "))
    }
}

fn ids(v: &[i32]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn listed(v: &[String]) -> String {
    let mut s = v
        .iter()
        .take(LISTED_MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if v.len() > LISTED_MAX {
        s.push_str(&format!(", ... ({} more)", v.len() - LISTED_MAX));
    }
    s
}

fn print_summary(
    meta: &pb::MetadataResponse,
    quorum: Option<&pb::QuorumDescription>,
    v: &Verdict,
    lags: &Result<Vec<GroupLag>, String>,
    problems: &[String],
) {
    outln!("cluster:     {}", meta.cluster_id);
    match (v.controller_id, quorum) {
        (id, _) if id < 0 => outln!("controller:  none"),
        (id, Some(q)) => outln!(
            "controller:  node {id} (term {}, applied index {})",
            q.term,
            q.applied_index
        ),
        (id, None) => outln!("controller:  node {id}"),
    }
    outln!(
        "brokers:     {} up [{}], {} fenced [{}]",
        v.brokers_up.len(),
        ids(&v.brokers_up),
        v.brokers_fenced.len(),
        ids(&v.brokers_fenced)
    );
    outln!(
        "partitions:  {} total, {} offline, {} under-replicated, {} under min ISR",
        v.partitions,
        v.offline.len(),
        v.under_replicated.len(),
        v.under_min_isr.len()
    );
    for (what, list) in [
        ("offline", &v.offline),
        ("under-replicated", &v.under_replicated),
        ("under min ISR", &v.under_min_isr),
    ] {
        if !list.is_empty() {
            outln!("  {what}: {}", listed(list));
        }
    }
    match lags {
        Err(e) => outln!("group lag:   unavailable ({e})"),
        Ok(lags) if lags.is_empty() => outln!("group lag:   no groups"),
        Ok(lags) => {
            outln!("group lag (unknown, then largest first):");
            for g in lags.iter().take(LISTED_MAX) {
                let lag = if g.total_lag < 0 {
                    "-".to_string()
                } else {
                    g.total_lag.to_string()
                };
                outln!("  {:<30} {:>12}  {}", g.group, lag, g.state);
            }
        }
    }
    if problems.is_empty() {
        outln!("status:      healthy");
    } else {
        outln!("status:      UNHEALTHY: {}", problems.join("; "));
    }
}

/// Every group's total lag: unknown first (-1: a partition's leader did
/// not answer, or the group's coordinator did not within a few seconds:
/// the groups to look at), then largest first. Groups are described
/// together under one deadline (one after another, a few seconds each,
/// the check took minutes exactly when coordinators were down, and left
/// those groups out). `Err` when the groups cannot be listed (say, no
/// Describe on the cluster).
async fn group_lags(client: &Client) -> Result<Vec<GroupLag>, String> {
    let groups = client.list_groups().await.map_err(|e| e.to_string())?;
    let described =
        tokio::time::timeout(
            GROUP_DESCRIBE_WAIT,
            futures_util::future::join_all(groups.iter().map(|g| {
                tokio::time::timeout(GROUP_DESCRIBE_WAIT, client.describe_group(&g.group))
            })),
        )
        .await
        .unwrap_or_default();
    let mut out: Vec<GroupLag> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| match described.get(i) {
            Some(Ok(Ok(d))) => GroupLag {
                group: d.group.clone(),
                state: d.state.clone(),
                total_lag: d.total_lag,
            },
            Some(Ok(Err(e))) => GroupLag {
                group: g.group.clone(),
                state: format!("unknown ({e})"),
                total_lag: -1,
            },
            _ => GroupLag {
                group: g.group.clone(),
                state: "unknown (its coordinator did not answer)".into(),
                total_lag: -1,
            },
        })
        .collect();
    let rank = |lag: i64| if lag < 0 { i64::MAX } else { lag };
    out.sort_by(|a, b| {
        rank(b.total_lag)
            .cmp(&rank(a.total_lag))
            .then(a.group.cmp(&b.group))
    });
    Ok(out)
}

/// How long `cluster health` waits for the groups' descriptions.
const GROUP_DESCRIBE_WAIT: Duration = Duration::from_secs(5);

/// The bootstrap node's gRPC health.
async fn node_health(
    bootstrap: &str,
    options: &ClientOptions,
    output: Output,
) -> anyhow::Result<()> {
    use tonic_health::pb::health_client::HealthClient;
    let addr = bootstrap.split(',').next().unwrap_or_default().trim();
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .with_context(|| format!("bad address '{addr}'"))?
        .connect_timeout(Duration::from_secs(3))
        // The check itself too: a node that takes the connection but
        // never answers (a stuck runtime, a stopped process) is unhealthy,
        // not a wait without end for whoever runs the check.
        .timeout(Duration::from_secs(3));
    if let Some(tls) = &options.tls {
        endpoint = endpoint.tls_config(tls.to_tonic()?)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach {addr}"))?;
    let status = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .with_context(|| format!("health check of {addr} failed"))?
        .into_inner()
        .status;
    if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
        super::done(
            output,
            serde_json::json!({"address": addr, "serving": true}),
            format_args!("{addr}: serving"),
        );
        Ok(())
    } else {
        bail!("{addr}: not serving")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(i: i32, leader: i32, replicas: &[i32], isr: &[i32]) -> pb::PartitionDescription {
        pb::PartitionDescription {
            partition: i,
            leader,
            replicas: replicas.to_vec(),
            isr: isr.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn verdict_names_each_problem() {
        let mut meta = pb::MetadataResponse {
            controller_id: 1,
            brokers: vec![
                pb::BrokerDescription {
                    id: 1,
                    ..Default::default()
                },
                pb::BrokerDescription {
                    id: 2,
                    ..Default::default()
                },
            ],
            topics: vec![pb::TopicDescription {
                name: "t".into(),
                partitions: vec![partition(0, 1, &[1, 2], &[1, 2])],
                configs: [("min.insync.replicas".to_string(), "2".to_string())].into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(Verdict::of(&meta).problems().is_empty());

        meta.brokers[1].fenced = true;
        meta.topics[0].partitions =
            vec![partition(0, 1, &[1, 2], &[1]), partition(1, -1, &[2], &[2])];
        let v = Verdict::of(&meta);
        assert_eq!(v.brokers_fenced, [2]);
        assert_eq!(v.under_replicated, ["t-0"]);
        assert_eq!(v.under_min_isr, ["t-0", "t-1"]);
        assert_eq!(v.offline, ["t-1"]);
        assert_eq!(v.problems().len(), 4);

        meta.controller_id = -1;
        assert!(Verdict::of(&meta)
            .problems()
            .contains(&"no active controller".to_string()));
    }
}
