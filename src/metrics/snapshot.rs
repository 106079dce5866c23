//! State gauges, computed at scrape time from what the node already holds
//! (its hosted partitions, the metadata, the quorum status, the group
//! coordinator, `/proc/self`) rather than updated on every write.
//!
//! [`Snapshot::take`] gathers the figures (asynchronously: group lag may
//! ask other brokers for their high watermarks); the snapshot is then a
//! [`Collector`] encoded next to the event metrics.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::process::ProcessStats;
use crate::broker::Broker;
use crate::group::GroupCoordinator;

/// One hosted partition replica.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: i32,
    /// Whether this node leads it.
    pub leader: bool,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
    pub high_watermark: i64,
    pub size_bytes: u64,
    /// ISR size as the metadata says.
    pub isr_size: usize,
    pub replicas: usize,
}

/// A follower's lag behind this leader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FollowerLag {
    pub topic: String,
    pub partition: i32,
    pub follower: i32,
    /// Leader log end offset minus the follower's (the whole log when
    /// the follower has not fetched under this leader yet).
    pub lag: i64,
}

/// Cluster-wide counts from this node's copy of the metadata (every node
/// reports the same figures once it has applied the same commands).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterStats {
    pub brokers_up: usize,
    pub brokers_fenced: usize,
    pub topics: usize,
    pub partitions: usize,
    /// ISR smaller than the replica set.
    pub under_replicated: usize,
    /// ISR smaller than min.insync.replicas (acks=all refused).
    pub under_min_isr: usize,
    /// No leader.
    pub offline: usize,
}

/// The metadata quorum as this node sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ControllerStats {
    pub term: u64,
    /// Broker id of the active controller, -1 when none.
    pub leader_id: i32,
    /// Whether this node is the active controller.
    pub active: bool,
    pub last_log_index: u64,
    /// Index known committed: on the active controller the quorum's
    /// matched index, elsewhere the applied index (which trails it).
    pub commit_index: u64,
    pub applied_index: u64,
    /// Metadata commands the state machine applied (all time).
    pub commands_applied: u64,
}

/// One partition of a group's lag.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupPartitionLag {
    pub topic: String,
    pub partition: i32,
    /// -1 when nothing is committed.
    pub committed_offset: i64,
    /// The partition's high watermark, -1 when its leader did not answer.
    pub log_end_offset: i64,
    /// -1 when unknown (with `log_end_offset`): no sample is exported.
    pub lag: i64,
}

/// A group this node coordinates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupStats {
    pub group: String,
    pub members: usize,
    pub generation: i32,
    pub partitions: Vec<GroupPartitionLag>,
    /// -1 when any partition's lag is unknown: no sample is exported.
    pub total_lag: i64,
}

/// Everything a scrape reports besides the event metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub node_id: i32,
    pub partitions: Vec<PartitionStats>,
    pub follower_lag: Vec<FollowerLag>,
    pub cluster: ClusterStats,
    pub controller: ControllerStats,
    pub groups: Vec<GroupStats>,
    pub process: ProcessStats,
}

impl Snapshot {
    /// Gathers the figures. `groups` is absent before the coordinator runs.
    pub async fn take(broker: &Broker, groups: Option<&Arc<GroupCoordinator>>) -> Snapshot {
        let me = broker.node_id();
        let meta = broker.metadata().current();
        let mut s = Snapshot {
            node_id: me,
            process: ProcessStats::read(),
            ..Snapshot::default()
        };
        let c = &mut s.cluster;
        c.brokers_fenced = meta.brokers.values().filter(|b| b.fenced).count();
        c.brokers_up = meta.brokers.len() - c.brokers_fenced;
        c.topics = meta.topics.len();
        for t in meta.topics.values() {
            let min_isr: usize = broker
                .effective_configs(t)
                .get("min.insync.replicas")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            for p in &t.partitions {
                c.partitions += 1;
                c.under_replicated += usize::from(p.isr.len() < p.replicas.len());
                c.under_min_isr += usize::from(p.isr.len() < min_isr);
                c.offline += usize::from(p.leader < 0);
            }
        }

        let mut hosted = broker.hosted_partitions();
        hosted.sort_by(|a, b| (&a.topic, a.index).cmp(&(&b.topic, b.index)));
        for p in hosted {
            let Some(info) = meta
                .topics
                .get(&p.topic)
                .and_then(|t| t.partitions.get(p.index as usize))
            else {
                continue;
            };
            let leader = p.leader_epoch().is_some();
            let leo = p.log.log_end_offset();
            if leader {
                for (follower, follower_leo) in p.follower_offsets(&info.replicas) {
                    s.follower_lag.push(FollowerLag {
                        topic: p.topic.clone(),
                        partition: p.index,
                        follower,
                        lag: (leo - follower_leo.max(0)).max(0),
                    });
                }
            }
            s.partitions.push(PartitionStats {
                topic: p.topic.clone(),
                partition: p.index,
                leader,
                log_start_offset: p.log.log_start_offset(),
                log_end_offset: leo,
                high_watermark: p.log.high_watermark(),
                size_bytes: p.log.size_bytes(),
                isr_size: info.isr.len(),
                replicas: info.replicas.len(),
            });
        }

        let q = broker.metadata().quorum();
        let leader_id = broker.metadata().controller_id();
        let active = leader_id == me;
        s.controller = ControllerStats {
            term: q.term,
            leader_id,
            active,
            last_log_index: q.last_log_index,
            commit_index: q.committed_index.unwrap_or(q.applied_index),
            applied_index: q.applied_index,
            commands_applied: meta.applied,
        };

        if let Some(coordinator) = groups {
            s.groups = coordinator.stats().await;
        }
        s
    }
}

/// Writes one gauge family: a descriptor, then one sample per label set.
fn gauge<'a, I, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: I,
) -> Result<(), std::fmt::Error>
where
    I: IntoIterator<Item = (Vec<(&'a str, String)>, V)>,
    V: Into<f64>,
{
    // The descriptor is written even without samples, so every metric
    // name is always listed (dashboards and alerts can rely on it).
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        let sample = family.encode_family(&labels)?;
        ConstGauge::new(value.into()).encode(sample)?;
    }
    Ok(())
}

fn one<V: Into<f64>>(v: V) -> Vec<(Vec<(&'static str, String)>, f64)> {
    vec![(Vec::new(), v.into())]
}

fn count(v: usize) -> f64 {
    v as f64
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let part = |p: &PartitionStats| {
            vec![
                ("topic", p.topic.clone()),
                ("partition", p.partition.to_string()),
            ]
        };
        let per_partition = |f: fn(&PartitionStats) -> f64| {
            self.partitions
                .iter()
                .map(move |p| (part(p), f(p)))
                .collect::<Vec<_>>()
        };
        gauge(
            &mut e,
            "partition_log_end_offset",
            "Log end offset of each hosted partition replica",
            None,
            per_partition(|p| p.log_end_offset as f64),
        )?;
        gauge(
            &mut e,
            "partition_high_watermark",
            "High watermark of each hosted partition replica",
            None,
            per_partition(|p| p.high_watermark as f64),
        )?;
        gauge(
            &mut e,
            "partition_log_start_offset",
            "Log start offset of each hosted partition replica",
            None,
            per_partition(|p| p.log_start_offset as f64),
        )?;
        gauge(
            &mut e,
            "partition_size",
            "Bytes of segment files of each hosted partition replica",
            Some(&Unit::Bytes),
            per_partition(|p| p.size_bytes as f64),
        )?;
        gauge(
            &mut e,
            "partition_isr_size",
            "In-sync replicas of each hosted partition, per the metadata",
            None,
            per_partition(|p| p.isr_size as f64),
        )?;
        gauge(
            &mut e,
            "partition_replicas",
            "Replicas of each hosted partition",
            None,
            per_partition(|p| p.replicas as f64),
        )?;
        gauge(
            &mut e,
            "partition_leader",
            "1 when this node leads the partition, else 0",
            None,
            per_partition(|p| f64::from(u8::from(p.leader))),
        )?;
        gauge(
            &mut e,
            "replication_follower_lag_records",
            "On the leader: its log end offset minus each follower's",
            None,
            self.follower_lag.iter().map(|l| {
                (
                    vec![
                        ("topic", l.topic.clone()),
                        ("partition", l.partition.to_string()),
                        ("follower", l.follower.to_string()),
                    ],
                    l.lag as f64,
                )
            }),
        )?;

        let c = &self.cluster;
        gauge(
            &mut e,
            "cluster_brokers",
            "Registered brokers by state (up, fenced), per this node's metadata",
            None,
            [
                (vec![("state", "up".to_string())], count(c.brokers_up)),
                (
                    vec![("state", "fenced".to_string())],
                    count(c.brokers_fenced),
                ),
            ],
        )?;
        gauge(
            &mut e,
            "cluster_topics",
            "Topics in the cluster",
            None,
            one(count(c.topics)),
        )?;
        gauge(
            &mut e,
            "cluster_partitions",
            "Partitions in the cluster",
            None,
            one(count(c.partitions)),
        )?;
        gauge(
            &mut e,
            "cluster_partitions_under_replicated",
            "Partitions whose ISR is smaller than their replica set",
            None,
            one(count(c.under_replicated)),
        )?;
        gauge(
            &mut e,
            "cluster_partitions_under_min_isr",
            "Partitions whose ISR is below min.insync.replicas (acks=all refused)",
            None,
            one(count(c.under_min_isr)),
        )?;
        gauge(
            &mut e,
            "cluster_partitions_offline",
            "Partitions without a leader",
            None,
            one(count(c.offline)),
        )?;

        let k = &self.controller;
        gauge(
            &mut e,
            "controller_raft_term",
            "Raft term of the metadata quorum",
            None,
            one(k.term as f64),
        )?;
        gauge(
            &mut e,
            "controller_leader_id",
            "Broker id of the active controller (-1: none known)",
            None,
            one(k.leader_id),
        )?;
        gauge(
            &mut e,
            "controller_active",
            "1 on the active controller, else 0",
            None,
            one(u8::from(k.active)),
        )?;
        gauge(
            &mut e,
            "controller_raft_last_log_index",
            "Index of the last entry in this node's Raft log",
            None,
            one(k.last_log_index as f64),
        )?;
        gauge(
            &mut e,
            "controller_raft_commit_index",
            "Committed Raft index (the applied index off the active controller)",
            None,
            one(k.commit_index as f64),
        )?;
        gauge(
            &mut e,
            "controller_raft_applied_index",
            "Raft index applied to this node's metadata state machine",
            None,
            one(k.applied_index as f64),
        )?;
        gauge(
            &mut e,
            "controller_fenced_brokers",
            "Fenced brokers, per this node's metadata",
            None,
            one(count(c.brokers_fenced)),
        )?;
        gauge(
            &mut e,
            "controller_metadata_commands_applied",
            "Metadata commands applied by the state machine since the cluster began",
            None,
            one(k.commands_applied as f64),
        )?;

        gauge(
            &mut e,
            "group_lag_records",
            "Consumer-group lag per partition: high watermark minus committed offset",
            None,
            self.groups.iter().flat_map(|g| {
                g.partitions.iter().filter(|p| p.lag >= 0).map(|p| {
                    (
                        vec![
                            ("group", g.group.clone()),
                            ("topic", p.topic.clone()),
                            ("partition", p.partition.to_string()),
                        ],
                        p.lag as f64,
                    )
                })
            }),
        )?;
        gauge(
            &mut e,
            "group_committed_offset",
            "Committed offset per group and partition (-1: none)",
            None,
            self.groups.iter().flat_map(|g| {
                g.partitions.iter().map(|p| {
                    (
                        vec![
                            ("group", g.group.clone()),
                            ("topic", p.topic.clone()),
                            ("partition", p.partition.to_string()),
                        ],
                        p.committed_offset as f64,
                    )
                })
            }),
        )?;
        gauge(
            &mut e,
            "group_total_lag_records",
            "Consumer-group lag summed over its partitions",
            None,
            self.groups
                .iter()
                .filter(|g| g.total_lag >= 0)
                .map(|g| (vec![("group", g.group.clone())], g.total_lag as f64)),
        )?;
        gauge(
            &mut e,
            "group_members",
            "Members of each group this node coordinates",
            None,
            self.groups
                .iter()
                .map(|g| (vec![("group", g.group.clone())], count(g.members))),
        )?;
        gauge(
            &mut e,
            "group_generation",
            "Generation of each group this node coordinates",
            None,
            self.groups
                .iter()
                .map(|g| (vec![("group", g.group.clone())], g.generation)),
        )?;

        let p = &self.process;
        gauge(
            &mut e,
            "process_resident_memory",
            "Resident set size",
            Some(&Unit::Bytes),
            one(p.resident_memory_bytes as f64),
        )?;
        gauge(
            &mut e,
            "process_virtual_memory",
            "Virtual memory size",
            Some(&Unit::Bytes),
            one(p.virtual_memory_bytes as f64),
        )?;
        gauge(
            &mut e,
            "process_open_fds",
            "Open file descriptors",
            None,
            one(p.open_fds as f64),
        )?;
        gauge(
            &mut e,
            "process_max_fds",
            "Limit on open file descriptors",
            None,
            one(p.max_fds as f64),
        )?;
        gauge(
            &mut e,
            "process_threads",
            "OS threads",
            None,
            one(p.threads as f64),
        )?;
        gauge(
            &mut e,
            "tokio_workers",
            "Tokio runtime worker threads",
            None,
            one(p.tokio_workers as f64),
        )?;
        gauge(
            &mut e,
            "tokio_alive_tasks",
            "Tokio tasks spawned and not finished",
            None,
            one(p.tokio_alive_tasks as f64),
        )?;
        gauge(
            &mut e,
            "tokio_global_queue_depth",
            "Tokio tasks waiting in the global queue",
            None,
            one(p.tokio_global_queue_depth as f64),
        )?;
        gauge(
            &mut e,
            "node_id",
            "This node's id (a constant, for joining by instance)",
            None,
            one(self.node_id),
        )?;
        Ok(())
    }
}

/// The whole exposition: event metrics, then this snapshot, in the
/// Prometheus text format (0.0.4).
pub fn encode(
    events: &prometheus_client::registry::Registry,
    snapshot: Snapshot,
) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, events)?;
    let mut state = prometheus_client::registry::Registry::with_prefix(super::PREFIX);
    state.register_collector(Box::new(snapshot));
    prometheus_client::encoding::prometheus_text::encode(&mut out, &state)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_gauges_are_encoded() {
        let s = Snapshot {
            node_id: 2,
            partitions: vec![PartitionStats {
                topic: "t".into(),
                partition: 0,
                leader: true,
                log_end_offset: 10,
                high_watermark: 9,
                isr_size: 2,
                replicas: 3,
                ..PartitionStats::default()
            }],
            cluster: ClusterStats {
                under_replicated: 1,
                ..ClusterStats::default()
            },
            groups: vec![GroupStats {
                group: "g".into(),
                partitions: vec![GroupPartitionLag {
                    topic: "t".into(),
                    partition: 0,
                    committed_offset: 4,
                    log_end_offset: 9,
                    lag: 5,
                }],
                total_lag: 5,
                ..GroupStats::default()
            }],
            ..Snapshot::default()
        };
        let text = encode(&prometheus_client::registry::Registry::default(), s).unwrap();
        for line in [
            "runnel_partition_log_end_offset{topic=\"t\",partition=\"0\"} 10",
            "runnel_partition_isr_size{topic=\"t\",partition=\"0\"} 2",
            "runnel_cluster_partitions_under_replicated 1",
            "runnel_group_lag_records{group=\"g\",topic=\"t\",partition=\"0\"} 5",
            "runnel_group_total_lag_records{group=\"g\"} 5",
            "# TYPE runnel_node_id gauge",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn unknown_group_lag_is_left_out_not_reported_as_zero() {
        let lag = |partition, log_end_offset, lag| GroupPartitionLag {
            topic: "t".into(),
            partition,
            committed_offset: 4,
            log_end_offset,
            lag,
        };
        let s = Snapshot {
            groups: vec![GroupStats {
                group: "g".into(),
                partitions: vec![lag(0, 9, 5), lag(1, -1, -1)],
                total_lag: -1,
                ..GroupStats::default()
            }],
            ..Snapshot::default()
        };
        let text = encode(&prometheus_client::registry::Registry::default(), s).unwrap();
        assert!(
            text.contains("runnel_group_lag_records{group=\"g\",topic=\"t\",partition=\"0\"} 5"),
            "{text}"
        );
        assert!(
            !text.contains("runnel_group_lag_records{group=\"g\",topic=\"t\",partition=\"1\"}"),
            "{text}"
        );
        assert!(!text.contains("runnel_group_total_lag_records{"), "{text}");
    }
}
