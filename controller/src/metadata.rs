//! The cluster metadata state machine. `apply` is pure and deterministic:
//! the same commands in the same order give the same state on every node.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::security::{Acl, Quota, UserCredential, DEFAULT_QUOTA_KEY};
use crate::{topic_config, MetadataCommand, MetadataError};

/// Most partitions one topic may have.
pub const PARTITIONS_MAX: i32 = 10_000;
/// Longest topic name (Kafka's rule).
pub const TOPIC_NAME_LEN_MAX: usize = 249;

/// A registered broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// node.id.
    pub id: i32,
    /// Client address, HOST:PORT.
    pub address: String,
    /// Rack, or empty.
    pub rack: String,
    /// "broker" and/or "controller".
    pub roles: Vec<String>,
    /// Bumped at every registration, so a restart is told from a retry.
    pub epoch: i64,
    /// A fenced broker is out of every ISR and leads nothing.
    pub fenced: bool,
    /// The registering process's random id (empty from older versions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub incarnation: String,
    /// Fenced by its own controlled shutdown, not yet registered again:
    /// it returns with its log, so partitions whose ISR it ends are not
    /// elected uncleanly meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub controlled_shutdown: bool,
}

/// One partition's replica placement and leadership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    /// Broker ids holding a replica; the first is the preferred leader.
    pub replicas: Vec<i32>,
    /// Current leader, or -1 when offline.
    pub leader: i32,
    /// Bumped at every leader change.
    pub leader_epoch: i32,
    /// In-sync replicas.
    pub isr: Vec<i32>,
    /// Bumped at every change of this partition's state.
    pub partition_epoch: i32,
    /// An ongoing reassignment: the replica list wanted once it completes
    /// (empty: none). Meanwhile `replicas` holds the old replicas plus
    /// `adding`; when every added replica is in the ISR, `replicas`
    /// becomes the target and `removing` replicas delete their copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_replicas: Vec<i32>,
    /// Replicas being added by the reassignment (copying the log).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adding: Vec<i32>,
    /// Replicas to drop when the reassignment completes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removing: Vec<i32>,
}

impl PartitionInfo {
    /// Who leads after an unclean election: the first replica that is
    /// live, in sync or not.
    fn unclean_pick(&self, live: &[i32]) -> Option<i32> {
        self.replicas.iter().copied().find(|r| live.contains(r))
    }

    /// Finishes a reassignment whose added replicas are all in sync:
    /// replicas become the target, the ISR keeps only target replicas,
    /// and a leader outside the target hands over (bumped leader epoch).
    /// Returns whether it completed.
    fn complete_reassignment(&mut self, fenced: impl Fn(i32) -> bool) -> bool {
        if self.target_replicas.is_empty() || !self.adding.iter().all(|r| self.isr.contains(r)) {
            return false;
        }
        let isr: Vec<i32> = self
            .isr
            .iter()
            .copied()
            .filter(|r| self.target_replicas.contains(r))
            .collect();
        let leader = if self.target_replicas.contains(&self.leader) {
            self.leader
        } else {
            match self
                .target_replicas
                .iter()
                .find(|r| isr.contains(r) && !fenced(**r))
            {
                Some(l) => *l,
                None => return false,
            }
        };
        if leader != self.leader {
            self.leader = leader;
            self.leader_epoch += 1;
        }
        self.replicas = std::mem::take(&mut self.target_replicas);
        self.isr = isr;
        self.adding.clear();
        self.removing.clear();
        self.partition_epoch += 1;
        true
    }
}

/// A topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Stable id; a re-created topic gets a new one.
    pub topic_id: String,
    /// Partitions, by index.
    pub partitions: Vec<PartitionInfo>,
    /// Replicas per partition.
    pub replication_factor: i32,
    /// Config overrides (only keys the user set).
    pub configs: BTreeMap<String, String>,
}

impl TopicInfo {
    /// Replicas per partition as they are now: partition 0's (its target
    /// while a reassignment moves it), as Kafka derives a topic's factor
    /// from its assignment. `replication_factor` is what the topic was
    /// created with; a reassignment changes the replica lists, not it.
    pub fn current_replication_factor(&self) -> i32 {
        self.partitions
            .first()
            .map_or(self.replication_factor, |p| {
                let replicas = if p.target_replicas.is_empty() {
                    &p.replicas
                } else {
                    &p.target_replicas
                };
                replicas.len() as i32
            })
    }

    /// Whether the topic's own configs allow unclean elections (only its
    /// own: the state machine never reads a broker's defaults).
    fn allows_unclean(&self) -> bool {
        self.configs
            .get("unclean.leader.election.enable")
            .is_some_and(|v| v == "true")
    }
}

/// The whole cluster metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMetadata {
    /// Fixed when the cluster was formatted.
    pub cluster_id: String,
    /// Registered brokers by id.
    pub brokers: BTreeMap<i32, BrokerInfo>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicInfo>,
    /// How many commands were applied; a version for watchers.
    pub applied: u64,
    /// Internal (broker-to-broker) addresses of brokers that run a
    /// separate internal listener; others use their client address.
    #[serde(default)]
    pub internal_addresses: BTreeMap<i32, String>,
    /// Users by name, with salted password hashes only.
    #[serde(default)]
    pub users: BTreeMap<String, UserCredential>,
    /// ACLs, kept sorted and without duplicates.
    #[serde(default)]
    pub acls: BTreeSet<Acl>,
    /// Byte-rate quotas by principal ([`DEFAULT_QUOTA_KEY`] for the
    /// default).
    #[serde(default)]
    pub quotas: BTreeMap<String, Quota>,
    /// The next idempotent-producer id to allocate; every id below it has
    /// been handed to some broker.
    #[serde(default)]
    pub next_producer_id: i64,
}

/// What an applied command changed, for the broker to act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Nothing to do beyond reading the new state.
    Done,
    /// A topic was deleted; brokers remove its partitions' data.
    TopicDeleted { topic_id: String, partitions: i32 },
    /// Leader elections moved these partitions' leaders.
    Elected { changed: Vec<i32> },
    /// Producer ids `first .. first + count` now belong to the submitter.
    ProducerIds { first: i64, count: i32 },
    /// These partitions' reassignments started, completed or were
    /// cancelled.
    Reassigned { changed: Vec<i32> },
    /// The broker registered with this epoch: the submitter learns it
    /// from the answer, whether or not its own copy of the metadata has
    /// caught up.
    Registered { epoch: i64 },
}

/// Largest producer-id block one AllocateProducerIds may take.
pub const PRODUCER_ID_BLOCK_MAX: i32 = 1_000_000;

/// Kafka's topic-name rules.
pub fn validate_topic_name(name: &str) -> Result<(), MetadataError> {
    let bad = |reason| {
        Err(MetadataError::InvalidTopicName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > TOPIC_NAME_LEN_MAX {
        return bad("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not allowed");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

impl ClusterMetadata {
    /// An empty cluster.
    pub fn new(cluster_id: impl Into<String>) -> Self {
        Self {
            cluster_id: cluster_id.into(),
            ..Self::default()
        }
    }

    /// Unfenced broker ids for replica placement: in id order, or, when
    /// brokers name more than one rack, interleaved rack by rack (Kafka's
    /// rack-aware order) so that consecutive replicas sit on different
    /// racks.
    pub fn placement_order(&self) -> Vec<i32> {
        let live: Vec<&BrokerInfo> = self.brokers.values().filter(|b| !b.fenced).collect();
        let mut racks: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
        for b in &live {
            racks.entry(b.rack.as_str()).or_default().push(b.id);
        }
        if racks.len() < 2 || racks.contains_key("") {
            return live.iter().map(|b| b.id).collect();
        }
        let mut out = Vec::with_capacity(live.len());
        let longest = racks.values().map(Vec::len).max().unwrap_or(0);
        for i in 0..longest {
            for ids in racks.values() {
                if let Some(id) = ids.get(i) {
                    out.push(*id);
                }
            }
        }
        out
    }

    /// Unfenced broker ids in id order.
    pub fn live_brokers(&self) -> Vec<i32> {
        self.brokers
            .values()
            .filter(|b| !b.fenced)
            .map(|b| b.id)
            .collect()
    }

    /// Checks a command against the current state without applying it.
    pub fn check(&self, cmd: &MetadataCommand) -> Result<(), MetadataError> {
        self.clone().apply(cmd.clone()).map(|_| ())
    }

    /// Applies one command. On error the state is unchanged.
    pub fn apply(&mut self, cmd: MetadataCommand) -> Result<Applied, MetadataError> {
        let applied = match cmd {
            MetadataCommand::InitCluster { cluster_id } => {
                if cluster_id.is_empty()
                    || (!self.cluster_id.is_empty() && self.cluster_id != cluster_id)
                {
                    return Err(MetadataError::ClusterIdMismatch {
                        expected: self.cluster_id.clone(),
                        found: cluster_id,
                    });
                }
                self.cluster_id = cluster_id;
                Applied::Done
            }
            MetadataCommand::RegisterBroker {
                id,
                address,
                rack,
                roles,
                incarnation,
            } => {
                // -1 means "no leader" in partition metadata, and node ids
                // are unsigned in the quorum: a broker id is never negative
                // (the server's config refuses one too; this guards the
                // RPC).
                if id < 0 {
                    return Err(MetadataError::InvalidRequest {
                        reason: format!("broker id {id} is negative"),
                    });
                }
                // A new incarnation of a broker whose session has not run
                // out (it restarted quickly): it may have lost what it had
                // not flushed (a power cut), so it must not go on leading
                // in the same leader epoch, appending at offsets its
                // followers already hold other records at. It is fenced
                // first, as a session expiry would have: its leaderships
                // move with new epochs, and it comes back as a follower
                // that truncates to its leaders (Kafka likewise keeps a
                // restarted broker fenced until it registers anew). No
                // unclean election: the broker is back, and leads again
                // (below) what it was the last in-sync replica of.
                let elects = !incarnation.is_empty();
                if let Some(b) = self.brokers.get(&id).filter(|b| {
                    !b.fenced && !incarnation.is_empty() && b.incarnation == incarnation
                }) {
                    // A retried submit of this very registration.
                    return Ok(Applied::Registered { epoch: b.epoch });
                }
                if self.brokers.get(&id).is_some_and(|b| !b.fenced) {
                    self.fence_broker(id, false)?;
                }
                self.internal_addresses.remove(&id);
                let epoch = self.brokers.get(&id).map_or(1, |b| b.epoch + 1);
                self.brokers.insert(
                    id,
                    BrokerInfo {
                        id,
                        address,
                        rack,
                        roles,
                        epoch,
                        fenced: false,
                        incarnation,
                        controlled_shutdown: false,
                    },
                );
                // A broker that comes back leads the partitions left
                // offline without a leader that it replicates. Every
                // partition it replicates moves to a new partition epoch:
                // an ISR change a leader proposed from what the broker's
                // previous incarnation had fetched (records it may have
                // lost since, unflushed) is refused as stale, as Kafka's
                // KIP-903 refuses ISR additions of an old broker epoch.
                for topic in self.topics.values_mut() {
                    for p in &mut topic.partitions {
                        if !p.replicas.contains(&id) {
                            continue;
                        }
                        if p.leader == -1 && p.isr.contains(&id) {
                            p.leader = id;
                            p.leader_epoch += 1;
                        }
                        p.partition_epoch += 1;
                    }
                }
                // Still offline, where the topic allows it: the broker
                // back out of sync leads (an unclean election, tried only
                // when the last in-sync leader was fenced, so partitions
                // stayed offline until that broker returned). Only for
                // registrations that name their process, which older
                // versions did not: entries they wrote replay as they
                // applied then, on every node, whatever its snapshot.
                if elects {
                    self.elect_offline_unclean();
                }
                Applied::Registered { epoch }
            }
            MetadataCommand::FenceBroker {
                id,
                epoch,
                controlled,
            } => {
                let current = self
                    .brokers
                    .get(&id)
                    .ok_or(MetadataError::UnknownBroker { id })?
                    .epoch;
                // A fence for an earlier registration is void.
                if epoch.is_none_or(|e| e == current) {
                    self.fence_broker(id, !controlled)?;
                    if let Some(b) = self.brokers.get_mut(&id) {
                        b.controlled_shutdown = controlled;
                    }
                }
                Applied::Done
            }
            MetadataCommand::CreateTopic {
                name,
                topic_id,
                partitions,
                replication_factor,
                configs,
            } => {
                validate_topic_name(&name)?;
                if let Some(existing) = self.topics.get(&name) {
                    // The same creation applied twice (its first answer
                    // was lost and the submitter sent it again): it
                    // succeeded. Every creation carries a fresh id, so a
                    // second call of a user's still finds the name taken.
                    if existing.topic_id == topic_id && !topic_id.is_empty() {
                        return Ok(Applied::Done);
                    }
                    return Err(MetadataError::TopicAlreadyExists { name });
                }
                check_partitions(partitions, 0)?;
                topic_config::validate_all(&configs)?;
                let live = self.placement_order();
                check_replication_factor(replication_factor, live.len())?;
                if let Some(min_isr) = configs.get("min.insync.replicas") {
                    let min_isr: i32 = min_isr.parse().unwrap_or(i32::MAX);
                    if min_isr > replication_factor {
                        return Err(MetadataError::InvalidConfig {
                            key: "min.insync.replicas".into(),
                            value: min_isr.to_string(),
                            reason: format!("exceeds the replication factor {replication_factor}"),
                        });
                    }
                }
                let parts = (0..partitions)
                    .map(|p| new_partition(&live, p, replication_factor))
                    .collect();
                self.topics.insert(
                    name.clone(),
                    TopicInfo {
                        name,
                        topic_id,
                        partitions: parts,
                        replication_factor,
                        configs,
                    },
                );
                Applied::Done
            }
            MetadataCommand::DeleteTopic { name, topic_id } => {
                if self
                    .topics
                    .get(&name)
                    .is_none_or(|t| topic_id.as_ref().is_some_and(|id| *id != t.topic_id))
                {
                    return Err(MetadataError::UnknownTopic { name });
                }
                let topic = self.topics.remove(&name).expect("checked above");
                Applied::TopicDeleted {
                    topic_id: topic.topic_id,
                    partitions: topic.partitions.len() as i32,
                }
            }
            MetadataCommand::AddPartitions {
                name,
                total_partitions,
                current_factor,
            } => {
                let live = self.placement_order();
                let topic = self
                    .topics
                    .get_mut(&name)
                    .ok_or(MetadataError::UnknownTopic { name })?;
                check_partitions(total_partitions, topic.partitions.len() as i32)?;
                let factor = if current_factor {
                    topic.current_replication_factor()
                } else {
                    topic.replication_factor
                };
                check_replication_factor(factor, live.len())?;
                for p in topic.partitions.len() as i32..total_partitions {
                    topic.partitions.push(new_partition(&live, p, factor));
                }
                Applied::Done
            }
            MetadataCommand::AlterPartitionIsr {
                topic,
                topic_id,
                partition,
                leader_id,
                leader_epoch,
                partition_epoch,
                isr,
            } => {
                let refuse = |reason: String| MetadataError::InvalidIsrChange {
                    topic: topic.clone(),
                    partition,
                    reason,
                };
                let info = self
                    .topics
                    .get(&topic)
                    .ok_or_else(|| MetadataError::UnknownTopic {
                        name: topic.clone(),
                    })?;
                if !topic_id.is_empty() && topic_id != info.topic_id {
                    return Err(refuse(format!(
                        "the proposal is for topic id {topic_id}, an earlier topic of this name (now {})",
                        info.topic_id
                    )));
                }
                let p = usize::try_from(partition)
                    .ok()
                    .and_then(|i| info.partitions.get(i))
                    .ok_or_else(|| refuse("no such partition".into()))?;
                if p.leader != leader_id || p.leader_epoch != leader_epoch {
                    return Err(refuse(format!(
                        "leader {leader_id} in epoch {leader_epoch} is not current (leader {} in epoch {})",
                        p.leader, p.leader_epoch
                    )));
                }
                if p.partition_epoch != partition_epoch {
                    return Err(refuse(format!(
                        "partition epoch {partition_epoch} is stale (now {})",
                        p.partition_epoch
                    )));
                }
                let mut new_isr = isr.clone();
                new_isr.sort_unstable();
                new_isr.dedup();
                if !new_isr.contains(&leader_id) {
                    return Err(refuse("the ISR must contain the leader".into()));
                }
                if let Some(r) = new_isr.iter().find(|r| !p.replicas.contains(r)) {
                    return Err(refuse(format!("broker {r} holds no replica")));
                }
                if let Some(r) = new_isr
                    .iter()
                    .find(|r| !p.isr.contains(r) && self.brokers.get(r).is_none_or(|b| b.fenced))
                {
                    return Err(refuse(format!("broker {r} is fenced")));
                }
                let p = &mut self
                    .topics
                    .get_mut(&topic)
                    .expect("checked above")
                    .partitions[partition as usize];
                p.isr = new_isr;
                p.partition_epoch += 1;
                let brokers = &self.brokers;
                p.complete_reassignment(|id| brokers.get(&id).is_none_or(|b| b.fenced));
                Applied::Done
            }
            MetadataCommand::ElectLeaders {
                topic,
                partitions,
                unclean,
            } => {
                let live = self.live_brokers();
                let info = self
                    .topics
                    .get_mut(&topic)
                    .ok_or(MetadataError::UnknownTopic {
                        name: topic.clone(),
                    })?;
                let count = info.partitions.len() as i32;
                if let Some(bad) = partitions.iter().find(|p| **p < 0 || **p >= count) {
                    return Err(MetadataError::InvalidPartitions {
                        count: *bad,
                        reason: format!("topic '{topic}' has {count} partitions"),
                    });
                }
                // A set: a request may list many partitions (or one many
                // times), and this runs on every node, in `apply`.
                let wanted: std::collections::BTreeSet<i32> = partitions.iter().copied().collect();
                let mut changed = Vec::new();
                for (i, p) in info.partitions.iter_mut().enumerate() {
                    if !wanted.is_empty() && !wanted.contains(&(i as i32)) {
                        continue;
                    }
                    let pick = if unclean {
                        (p.leader == -1).then(|| p.unclean_pick(&live)).flatten()
                    } else {
                        let preferred = p.replicas[0];
                        (p.leader != preferred
                            && p.isr.contains(&preferred)
                            && live.contains(&preferred))
                        .then_some(preferred)
                    };
                    if let Some(leader) = pick {
                        if unclean {
                            p.isr = vec![leader];
                        }
                        p.leader = leader;
                        p.leader_epoch += 1;
                        p.partition_epoch += 1;
                        changed.push(i as i32);
                    }
                }
                Applied::Elected { changed }
            }
            MetadataCommand::AlterTopicConfig {
                name,
                set,
                delete,
                current_factor,
            } => {
                let topic = self
                    .topics
                    .get_mut(&name)
                    .ok_or_else(|| MetadataError::UnknownTopic { name: name.clone() })?;
                topic_config::validate_all(&set)?;
                for key in &delete {
                    if topic_config::key(key).is_none() {
                        return Err(MetadataError::InvalidConfig {
                            key: key.clone(),
                            value: String::new(),
                            reason: "unknown config key".into(),
                        });
                    }
                }
                let mut configs = topic.configs.clone();
                for key in &delete {
                    configs.remove(key);
                }
                configs.extend(set);
                if let Some(min_isr) = configs.get("min.insync.replicas") {
                    let factor = if current_factor {
                        topic.current_replication_factor()
                    } else {
                        topic.replication_factor
                    };
                    if min_isr.parse::<i32>().unwrap_or(i32::MAX) > factor {
                        return Err(MetadataError::InvalidConfig {
                            key: "min.insync.replicas".into(),
                            value: min_isr.clone(),
                            reason: format!("exceeds the replication factor {factor}"),
                        });
                    }
                }
                topic.configs = configs;
                Applied::Done
            }
            MetadataCommand::ReassignPartitions { topic, assignments } => {
                let info = self
                    .topics
                    .get(&topic)
                    .ok_or_else(|| MetadataError::UnknownTopic {
                        name: topic.clone(),
                    })?;
                let bad = |partition: i32, reason: String| MetadataError::InvalidReassignment {
                    topic: topic.clone(),
                    partition,
                    reason,
                };
                for (&index, target) in &assignments {
                    if index < 0 || index as usize >= info.partitions.len() {
                        return Err(bad(index, "no such partition".into()));
                    }
                    let mut unique = target.clone();
                    unique.sort_unstable();
                    unique.dedup();
                    if unique.len() != target.len() {
                        return Err(bad(index, format!("replicas {target:?} repeat a broker")));
                    }
                    if let Some(r) = target.iter().find(|r| !self.brokers.contains_key(r)) {
                        return Err(bad(index, format!("broker {r} is not registered")));
                    }
                }
                let brokers = self.brokers.clone();
                let fenced = |id: i32| brokers.get(&id).is_none_or(|b| b.fenced);
                // Changed on a copy and stored only if every partition's
                // change is allowed: a refused command changes nothing.
                let mut partitions = info.partitions.clone();
                let mut changed = Vec::new();
                for (index, target) in assignments {
                    let p = &mut partitions[index as usize];
                    // Start from the replicas before any ongoing reassignment.
                    let original: Vec<i32> = p
                        .replicas
                        .iter()
                        .copied()
                        .filter(|r| !p.adding.contains(r))
                        .collect();
                    let cancel = target.is_empty();
                    if cancel && p.target_replicas.is_empty() {
                        continue;
                    }
                    if !cancel && target == original && p.target_replicas.is_empty() {
                        continue;
                    }
                    // The replicas the partition keeps now: the original
                    // ones, plus (unless cancelling) those the new target
                    // adds. A replica an earlier target added, in sync or
                    // even leading by now, goes unless the new target
                    // keeps it.
                    let adding: Vec<i32> = target
                        .iter()
                        .copied()
                        .filter(|r| !original.contains(r))
                        .collect();
                    let mut replicas = original.clone();
                    replicas.extend(adding.iter().copied());
                    let isr: Vec<i32> = p
                        .isr
                        .iter()
                        .copied()
                        .filter(|r| replicas.contains(r))
                        .collect();
                    let leader = if replicas.contains(&p.leader) {
                        p.leader
                    } else {
                        replicas
                            .iter()
                            .copied()
                            .find(|r| isr.contains(r) && !fenced(*r))
                            .unwrap_or(-1)
                    };
                    // Dropping every in-sync replica, or the leader with
                    // no in-sync replica to follow it, would take the
                    // partition offline with records only the dropped
                    // replicas hold: Kafka refuses such a change too (it
                    // would need an unclean election).
                    if (!p.isr.is_empty() && isr.is_empty()) || (p.leader >= 0 && leader < 0) {
                        return Err(bad(
                            index,
                            format!(
                                "{} would leave no in-sync replica to lead (in sync now: {:?}); \
                                 it would need an unclean election",
                                if cancel { "cancelling" } else { "this target" },
                                p.isr
                            ),
                        ));
                    }
                    if leader != p.leader {
                        p.leader = leader;
                        p.leader_epoch += 1;
                    }
                    p.isr = isr;
                    p.replicas = replicas;
                    p.partition_epoch += 1;
                    if cancel {
                        p.target_replicas.clear();
                        p.adding.clear();
                        p.removing.clear();
                    } else {
                        p.removing = original
                            .iter()
                            .copied()
                            .filter(|r| !target.contains(r))
                            .collect();
                        p.adding = adding;
                        p.target_replicas = target;
                        p.complete_reassignment(fenced);
                    }
                    changed.push(index);
                }
                self.topics
                    .get_mut(&topic)
                    .expect("checked above")
                    .partitions = partitions;
                Applied::Reassigned { changed }
            }
            MetadataCommand::AllocateProducerIds { broker_id, count } => {
                if !(1..=PRODUCER_ID_BLOCK_MAX).contains(&count) {
                    return Err(MetadataError::InvalidRequest {
                        reason: format!(
                            "producer id block of {count} (1..={PRODUCER_ID_BLOCK_MAX})"
                        ),
                    });
                }
                if !self.brokers.contains_key(&broker_id) {
                    return Err(MetadataError::UnknownBroker { id: broker_id });
                }
                // Id 0 is never handed out: producers send 0 for "none".
                let first = self.next_producer_id.max(1);
                self.next_producer_id = first + i64::from(count);
                Applied::ProducerIds { first, count }
            }
            cmd => return self.apply_security(cmd),
        };
        self.applied += 1;
        Ok(applied)
    }

    /// Fences broker `id`: it leaves every ISR it is not the last member
    /// of, and each partition it led gets the next ISR member as leader
    /// (or none, or, with `unclean` and the topic allowing it, an
    /// out-of-sync live replica), with a new leader epoch.
    fn fence_broker(&mut self, id: i32, unclean: bool) -> Result<(), MetadataError> {
        let broker = self
            .brokers
            .get_mut(&id)
            .ok_or(MetadataError::UnknownBroker { id })?;
        broker.fenced = true;
        let live = self.live_brokers();
        for topic in self.topics.values_mut() {
            let unclean = unclean && topic.allows_unclean();
            for p in &mut topic.partitions {
                if !p.replicas.contains(&id) {
                    continue;
                }
                if p.isr.len() > 1 {
                    p.isr.retain(|r| *r != id);
                }
                if p.leader == id {
                    p.leader = p.isr.iter().copied().find(|r| *r != id).unwrap_or(-1);
                    if p.leader == -1 && unclean {
                        // No in-sync replica left: the topic allows an
                        // out-of-sync one to lead (records may be lost).
                        if let Some(r) = p.unclean_pick(&live) {
                            p.leader = r;
                            p.isr = vec![r];
                        }
                    }
                    p.leader_epoch += 1;
                }
                p.partition_epoch += 1;
            }
        }
        Ok(())
    }

    /// Unclean elections for the partitions without a leader of the topics
    /// that allow them: the first live replica leads, alone in the ISR, in
    /// a new epoch.
    fn elect_offline_unclean(&mut self) {
        let live = self.live_brokers();
        // Brokers away for a controlled shutdown come back with their
        // logs: what they alone hold in sync waits for them.
        let returning: Vec<i32> = self
            .brokers
            .values()
            .filter(|b| b.controlled_shutdown)
            .map(|b| b.id)
            .collect();
        for topic in self.topics.values_mut() {
            if !topic.allows_unclean() {
                continue;
            }
            for p in &mut topic.partitions {
                if p.leader != -1 || p.isr.iter().any(|r| returning.contains(r)) {
                    continue;
                }
                if let Some(r) = p.unclean_pick(&live) {
                    p.leader = r;
                    p.isr = vec![r];
                    p.leader_epoch += 1;
                    p.partition_epoch += 1;
                }
            }
        }
    }

    /// The address other brokers use for internal RPCs to broker `id`:
    /// its internal listener when it has one, else its client address.
    pub fn internal_address(&self, id: i32) -> Option<&str> {
        self.internal_addresses
            .get(&id)
            .or_else(|| self.brokers.get(&id).map(|b| &b.address))
            .map(String::as_str)
    }

    /// Applies the listener and security commands (users, ACLs, quotas).
    fn apply_security(&mut self, cmd: MetadataCommand) -> Result<Applied, MetadataError> {
        let invalid = |reason: String| Err(MetadataError::InvalidSecurity { reason });
        match cmd {
            MetadataCommand::RegisterBrokerListeners {
                id,
                address,
                internal_address,
                rack,
                roles,
                incarnation,
            } => {
                let registered = self.apply(MetadataCommand::RegisterBroker {
                    id,
                    address,
                    rack,
                    roles,
                    incarnation,
                })?;
                if !internal_address.is_empty() {
                    self.internal_addresses.insert(id, internal_address);
                }
                // `apply` above counted the command already.
                return Ok(registered);
            }
            MetadataCommand::UpsertUser { name, credential } => {
                check_principal_name(&name)?;
                if credential.salt.len() < 8 || credential.hash.len() < 16 {
                    return invalid(format!("credential of '{name}' is too weak"));
                }
                self.users.insert(name, credential);
            }
            MetadataCommand::DeleteUser { name } => {
                if self.users.remove(&name).is_none() {
                    return invalid(format!("no user '{name}'"));
                }
            }
            MetadataCommand::CreateAcl { acl } => {
                if acl.principal != crate::security::ANY_PRINCIPAL {
                    check_principal_name(&acl.principal)?;
                }
                self.acls.insert(acl);
            }
            MetadataCommand::DeleteAcl { acl } => {
                if !self.acls.remove(&acl) {
                    return invalid(format!("no such ACL: {acl:?}"));
                }
            }
            MetadataCommand::SetQuota { principal, quota } => {
                if principal != DEFAULT_QUOTA_KEY {
                    check_principal_name(&principal)?;
                }
                if quota.produce_bytes_per_sec == Some(0) || quota.fetch_bytes_per_sec == Some(0) {
                    return invalid("a quota must be at least 1 byte/s".into());
                }
                if quota == Quota::default() {
                    self.quotas.remove(&principal);
                } else {
                    self.quotas.insert(principal, quota);
                }
            }
            other => unreachable!("apply handles {other:?}"),
        }
        self.applied += 1;
        Ok(Applied::Done)
    }
}

/// Principal (user) names: 1 to 255 printable characters, no spaces.
fn check_principal_name(name: &str) -> Result<(), MetadataError> {
    if name.is_empty()
        || name.len() > 255
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
        || name == crate::security::ANY_PRINCIPAL
        || name == DEFAULT_QUOTA_KEY
    {
        return Err(MetadataError::InvalidSecurity {
            reason: format!("invalid principal name {name:?}"),
        });
    }
    Ok(())
}

fn check_partitions(count: i32, current: i32) -> Result<(), MetadataError> {
    let reason = if count < 1 {
        "must be at least 1".to_string()
    } else if count > PARTITIONS_MAX {
        format!("must be at most {PARTITIONS_MAX}")
    } else if count <= current {
        format!("must exceed the current count {current}")
    } else {
        return Ok(());
    };
    Err(MetadataError::InvalidPartitions { count, reason })
}

fn check_replication_factor(factor: i32, live: usize) -> Result<(), MetadataError> {
    if factor < 1 {
        return Err(MetadataError::InvalidReplicationFactor {
            factor,
            reason: "must be at least 1".into(),
        });
    }
    if factor as usize > live {
        return Err(MetadataError::InvalidReplicationFactor {
            factor,
            reason: format!("only {live} live brokers"),
        });
    }
    Ok(())
}

/// Kafka-style placement: partition p's replicas start at broker p mod n
/// and continue round the ring, so leaders spread evenly.
fn new_partition(live: &[i32], index: i32, replication_factor: i32) -> PartitionInfo {
    let n = live.len();
    let replicas: Vec<i32> = (0..replication_factor as usize)
        .map(|i| live[(index as usize + i) % n])
        .collect();
    PartitionInfo {
        leader: replicas[0],
        leader_epoch: 0,
        isr: replicas.clone(),
        replicas,
        partition_epoch: 0,
        target_replicas: Vec::new(),
        adding: Vec::new(),
        removing: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn register(state: &mut ClusterMetadata, id: i32) {
        state
            .apply(MetadataCommand::RegisterBroker {
                id,
                address: format!("127.0.0.1:{}", 9000 + id),
                rack: String::new(),
                roles: vec!["broker".into()],
                // One process per call: each is a (re)start.
                incarnation: format!("test-{}", INCARNATIONS.fetch_add(1, Ordering::Relaxed)),
            })
            .unwrap();
    }

    static INCARNATIONS: AtomicU64 = AtomicU64::new(0);

    fn create(name: &str, partitions: i32, rf: i32) -> MetadataCommand {
        MetadataCommand::CreateTopic {
            name: name.into(),
            topic_id: format!("id-{name}"),
            partitions,
            replication_factor: rf,
            configs: BTreeMap::new(),
        }
    }

    fn three() -> ClusterMetadata {
        let mut s = ClusterMetadata::new("c");
        for id in 1..=3 {
            register(&mut s, id);
        }
        s
    }

    /// A creation submitted twice (its first answer lost, the submitter
    /// sent it again) succeeds the second time without a change; another
    /// creation of the name (another id) still finds it taken.
    #[test]
    fn a_retried_creation_succeeds() {
        let mut s = three();
        s.apply(create("t", 3, 3)).unwrap();
        let before = s.clone();
        assert_eq!(s.apply(create("t", 3, 3)).unwrap(), Applied::Done);
        assert_eq!(s, before);
        let other = MetadataCommand::CreateTopic {
            name: "t".into(),
            topic_id: "another".into(),
            partitions: 1,
            replication_factor: 1,
            configs: BTreeMap::new(),
        };
        assert!(matches!(
            s.apply(other),
            Err(MetadataError::TopicAlreadyExists { .. })
        ));
    }

    /// A registration submitted twice by one process (a retry after its
    /// first copy committed) changes nothing the second time: it was taken
    /// for a quick restart, fencing the live broker and moving its
    /// leaderships. Another process's registration still is a restart.
    #[test]
    fn a_retried_registration_is_not_a_restart() {
        let mut s = three();
        s.apply(create("t", 3, 3)).unwrap();
        let reg = |incarnation: &str| MetadataCommand::RegisterBroker {
            id: 1,
            address: "h:1".into(),
            rack: String::new(),
            roles: vec!["broker".into()],
            incarnation: incarnation.into(),
        };
        let first = s.apply(reg("p-1")).unwrap();
        let before = s.clone();
        assert_eq!(s.apply(reg("p-1")).unwrap(), first);
        assert_eq!(s, before, "a retried submit changed the metadata");
        let Applied::Registered { epoch } = first else {
            panic!("{first:?}")
        };
        assert_eq!(
            s.apply(reg("p-2")).unwrap(),
            Applied::Registered { epoch: epoch + 1 }
        );
    }

    /// A registration's answer carries the epoch it got (the registering
    /// node's copy of the metadata may lag behind, still showing the
    /// previous incarnation's), with or without an internal listener.
    #[test]
    fn a_registration_answers_its_epoch() {
        let mut s = three();
        let again = |id| MetadataCommand::RegisterBroker {
            id,
            address: "127.0.0.1:9001".into(),
            rack: String::new(),
            roles: vec!["broker".into()],
            incarnation: String::new(),
        };
        assert_eq!(s.apply(again(1)).unwrap(), Applied::Registered { epoch: 2 });
        assert_eq!(
            s.apply(MetadataCommand::RegisterBrokerListeners {
                id: 1,
                address: "127.0.0.1:9001".into(),
                internal_address: "127.0.0.1:9101".into(),
                rack: String::new(),
                roles: vec!["broker".into()],
                incarnation: String::new(),
            })
            .unwrap(),
            Applied::Registered { epoch: 3 }
        );
        assert_eq!(s.brokers[&1].epoch, 3);
        assert_eq!(s.apply(again(7)).unwrap(), Applied::Registered { epoch: 1 });
    }

    /// An ISR addition proposed before a broker registered again (from
    /// what its earlier incarnation fetched) is refused, even when that
    /// incarnation had been fenced already.
    #[test]
    fn an_isr_addition_from_before_a_registration_is_stale() {
        let mut s = three();
        s.apply(create("t", 1, 3)).unwrap();
        let p = s.topics["t"].partitions[0].clone();
        let follower = *p.replicas.iter().find(|r| **r != p.leader).unwrap();
        // The follower left the ISR, and was fenced.
        let others: Vec<i32> = p.isr.iter().copied().filter(|r| *r != follower).collect();
        s.apply(isr_of(&s, 0, others)).unwrap();
        s.apply(MetadataCommand::FenceBroker {
            id: follower,
            epoch: None,
            controlled: false,
        })
        .unwrap();
        // The leader proposes it back, from the old incarnation's fetches;
        // the broker registers again before that proposal is applied.
        let stale = isr_of(&s, 0, p.isr.clone());
        register(&mut s, follower);
        assert!(matches!(
            s.apply(stale),
            Err(MetadataError::InvalidIsrChange { .. })
        ));
    }

    /// A delete naming the topic's id deletes only that topic: a copy of
    /// it committed again (a retried submit) does not delete the topic
    /// created under the name since.
    #[test]
    fn a_delete_for_an_earlier_topic_of_the_name_deletes_nothing() {
        let mut s = three();
        s.apply(create("t", 1, 1)).unwrap();
        let delete = MetadataCommand::DeleteTopic {
            name: "t".into(),
            topic_id: Some("id-t".into()),
        };
        s.apply(delete.clone()).unwrap();
        s.apply(MetadataCommand::CreateTopic {
            name: "t".into(),
            topic_id: "id-t-again".into(),
            partitions: 2,
            replication_factor: 1,
            configs: BTreeMap::new(),
        })
        .unwrap();
        assert!(matches!(
            s.apply(delete),
            Err(MetadataError::UnknownTopic { .. })
        ));
        assert_eq!(s.topics["t"].topic_id, "id-t-again");
        // By name alone, as before.
        s.apply(MetadataCommand::DeleteTopic {
            name: "t".into(),
            topic_id: None,
        })
        .unwrap();
        assert!(s.topics.is_empty());
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        for good in ["a", "A-b_c.d", &"x".repeat(249)] {
            validate_topic_name(good).unwrap();
        }
        for bad in ["", ".", "..", "a b", "ü", "a/b", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn reassign(topic: &str, p: i32, replicas: Vec<i32>) -> MetadataCommand {
        MetadataCommand::ReassignPartitions {
            topic: topic.into(),
            assignments: [(p, replicas)].into(),
        }
    }

    fn isr_of(s: &ClusterMetadata, p: usize, isr: Vec<i32>) -> MetadataCommand {
        let info = &s.topics["t"].partitions[p];
        MetadataCommand::AlterPartitionIsr {
            topic: "t".into(),
            topic_id: String::new(),
            partition: p as i32,
            leader_id: info.leader,
            leader_epoch: info.leader_epoch,
            partition_epoch: info.partition_epoch,
            isr,
        }
    }

    #[test]
    fn reassignment_adds_first_and_drops_the_old_replicas_once_in_sync() {
        let mut s = three();
        register(&mut s, 4);
        s.apply(create("t", 1, 2)).unwrap(); // replicas [1, 2], leader 1
        s.apply(reassign("t", 0, vec![3, 4])).unwrap();
        let p = &s.topics["t"].partitions[0];
        assert_eq!(p.replicas, vec![1, 2, 3, 4]);
        assert_eq!(
            (p.adding.clone(), p.removing.clone()),
            (vec![3, 4], vec![1, 2])
        );
        assert_eq!((p.leader, p.isr.clone()), (1, vec![1, 2]));
        // One new replica in sync: not yet.
        s.apply(isr_of(&s, 0, vec![1, 2, 3])).unwrap();
        assert_eq!(s.topics["t"].partitions[0].replicas, vec![1, 2, 3, 4]);
        // Both: the target takes over, the leader moves with a new epoch.
        let epoch = s.topics["t"].partitions[0].leader_epoch;
        s.apply(isr_of(&s, 0, vec![1, 2, 3, 4])).unwrap();
        let p = &s.topics["t"].partitions[0];
        assert_eq!(p.replicas, vec![3, 4]);
        assert_eq!(p.isr, vec![3, 4]);
        assert_eq!((p.leader, p.leader_epoch), (3, epoch + 1));
        assert!(p.target_replicas.is_empty() && p.adding.is_empty() && p.removing.is_empty());
    }

    /// A topic grown from one replica to three by reassignment has a
    /// factor of three from then on: partitions added later get three
    /// replicas, `min.insync.replicas=2` is allowed, and describe says 3.
    /// Commands written before `current_factor` apply as they did.
    #[test]
    fn a_reassignment_changes_the_topic_s_replication_factor() {
        let mut s = three();
        s.apply(create("t", 1, 1)).unwrap();
        s.apply(reassign("t", 0, vec![1, 2, 3])).unwrap();
        assert_eq!(
            s.topics["t"].current_replication_factor(),
            3,
            "the target counts"
        );
        s.apply(isr_of(&s, 0, vec![1, 2, 3])).unwrap();
        assert_eq!(s.topics["t"].partitions[0].replicas, vec![1, 2, 3]);
        assert_eq!(s.topics["t"].current_replication_factor(), 3);
        let min_isr = |current_factor| MetadataCommand::AlterTopicConfig {
            name: "t".into(),
            set: [("min.insync.replicas".to_string(), "2".to_string())].into(),
            delete: vec![],
            current_factor,
        };
        let grow = |total_partitions, current_factor| MetadataCommand::AddPartitions {
            name: "t".into(),
            total_partitions,
            current_factor,
        };
        let mut old = s.clone();
        assert!(old.apply(min_isr(false)).is_err(), "as it applied before");
        old.apply(grow(2, false)).unwrap();
        assert_eq!(old.topics["t"].partitions[1].replicas.len(), 1);
        s.apply(min_isr(true)).unwrap();
        s.apply(grow(2, true)).unwrap();
        assert_eq!(s.topics["t"].partitions[1].replicas.len(), 3);
        // And back down: a factor of 2 refuses min.insync.replicas=3.
        s.apply(reassign("t", 0, vec![1, 2])).unwrap();
        s.apply(reassign("t", 1, vec![1, 2])).unwrap();
        assert_eq!(s.topics["t"].current_replication_factor(), 2);
        let err = s
            .apply(MetadataCommand::AlterTopicConfig {
                name: "t".into(),
                set: [("min.insync.replicas".to_string(), "3".to_string())].into(),
                delete: vec![],
                current_factor: true,
            })
            .unwrap_err();
        assert!(err.to_string().contains("replication factor 2"), "{err}");
    }

    #[test]
    fn reassignment_reorders_at_once_and_can_be_cancelled() {
        let mut s = three();
        s.apply(create("t", 1, 2)).unwrap();
        s.apply(reassign("t", 0, vec![2, 1])).unwrap();
        assert_eq!(s.topics["t"].partitions[0].replicas, vec![2, 1]);
        assert!(s.topics["t"].partitions[0].target_replicas.is_empty());
        s.apply(reassign("t", 0, vec![2, 3])).unwrap();
        assert_eq!(s.topics["t"].partitions[0].replicas, vec![2, 1, 3]);
        s.apply(reassign("t", 0, vec![])).unwrap();
        let p = &s.topics["t"].partitions[0];
        assert_eq!(
            (p.replicas.clone(), p.isr.clone()),
            (vec![2, 1], vec![1, 2])
        );
        assert!(p.adding.is_empty() && p.target_replicas.is_empty());
        // Bad input changes nothing.
        let before = s.clone();
        for bad in [
            reassign("t", 0, vec![2, 2]),
            reassign("t", 0, vec![9]),
            reassign("t", 5, vec![1]),
            reassign("nope", 0, vec![1]),
        ] {
            assert!(s.apply(bad).is_err());
        }
        assert_eq!(s, before);
    }

    /// A reassignment to [3, 4] under way when the original replicas fail:
    /// broker 3, which was being added, is the only replica in sync and
    /// leads. Cancelling, or a new target without it, would drop it with
    /// no in-sync replica left (and its broker would delete its copy):
    /// both are refused, and a target that keeps it is taken.
    #[test]
    fn a_reassignment_change_that_drops_every_in_sync_replica_is_refused() {
        let mut s = three();
        register(&mut s, 4);
        s.apply(create("t", 1, 2)).unwrap(); // replicas [1, 2], leader 1
        s.apply(reassign("t", 0, vec![3, 4])).unwrap();
        s.apply(isr_of(&s, 0, vec![1, 2, 3])).unwrap();
        s.apply(MetadataCommand::FenceBroker {
            id: 1,
            epoch: None,
            controlled: false,
        })
        .unwrap();
        s.apply(MetadataCommand::FenceBroker {
            id: 2,
            epoch: None,
            controlled: false,
        })
        .unwrap();
        let p = &s.topics["t"].partitions[0];
        assert_eq!((p.leader, p.isr.clone()), (3, vec![3]));
        let before = s.clone();
        for refused in [reassign("t", 0, vec![]), reassign("t", 0, vec![1, 2])] {
            let err = s.apply(refused).unwrap_err();
            assert!(err.to_string().contains("unclean election"), "{err}");
            assert_eq!(s, before);
        }
        // A target that keeps broker 3 keeps it leading; 3 being in sync,
        // the reassignment completes at once.
        s.apply(reassign("t", 0, vec![3, 1])).unwrap();
        let p = &s.topics["t"].partitions[0];
        assert_eq!(
            (p.leader, p.leader_epoch),
            (3, before.topics["t"].partitions[0].leader_epoch)
        );
        assert_eq!(p.isr, vec![3]);
        assert_eq!(p.replicas, vec![3, 1]);
        assert!(p.target_replicas.is_empty() && p.adding.is_empty());
    }

    /// A broker registering again while its session still runs (it
    /// restarted quickly, perhaps after losing unflushed records) is
    /// fenced first: what it led moves on with a new epoch, and what it
    /// alone held in sync it leads again in a new epoch.
    #[test]
    fn a_broker_that_registers_again_does_not_lead_on_in_the_same_epoch() {
        let mut s = three();
        s.apply(create("t", 1, 3)).unwrap(); // leader 1
        s.apply(create("solo", 3, 1)).unwrap(); // one partition on each broker
        let on_one = |s: &ClusterMetadata| {
            s.topics["solo"]
                .partitions
                .iter()
                .find(|p| p.replicas == vec![1])
                .cloned()
                .unwrap()
        };
        let solo_before = on_one(&s);
        assert_eq!(solo_before.leader, 1);
        let before = s.topics["t"].partitions[0].clone();
        assert_eq!(before.leader, 1);
        register(&mut s, 1);
        let p = &s.topics["t"].partitions[0];
        assert_eq!((p.leader, p.leader_epoch), (2, before.leader_epoch + 1));
        assert_eq!(p.isr, vec![2, 3]);
        let b = &s.brokers[&1];
        assert!(!b.fenced);
        let solo = on_one(&s);
        assert_eq!(
            (solo.leader, solo.leader_epoch, solo.isr),
            (1, solo_before.leader_epoch + 2, vec![1])
        );
        // A fenced broker registering is not fenced again.
        s.apply(MetadataCommand::FenceBroker {
            id: 3,
            epoch: None,
            controlled: false,
        })
        .unwrap();
        let epoch = s.topics["t"].partitions[0].leader_epoch;
        register(&mut s, 3);
        assert_eq!(s.topics["t"].partitions[0].leader_epoch, epoch);
    }

    #[test]
    fn a_negative_broker_id_is_refused() {
        let mut s = three();
        let before = s.clone();
        let err = s
            .apply(MetadataCommand::RegisterBroker {
                id: -1,
                address: "127.0.0.1:1".into(),
                rack: String::new(),
                roles: vec!["broker".into()],
                incarnation: String::new(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("negative"), "{err}");
        assert_eq!(s, before);
    }

    #[test]
    fn producer_id_blocks_never_overlap_and_survive_serialisation() {
        let mut s = three();
        let alloc = |broker_id, count| MetadataCommand::AllocateProducerIds { broker_id, count };
        let a = s.apply(alloc(1, 10)).unwrap();
        assert_eq!(
            a,
            Applied::ProducerIds {
                first: 1,
                count: 10
            }
        );
        // A restored snapshot (e.g. on a new controller) continues the count.
        let mut restored: ClusterMetadata =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        let b = restored.apply(alloc(2, 5)).unwrap();
        assert_eq!(
            b,
            Applied::ProducerIds {
                first: 11,
                count: 5
            }
        );
        let before = restored.clone();
        assert!(restored.apply(alloc(2, 0)).is_err());
        assert!(restored.apply(alloc(9, 1)).is_err());
        assert!(restored.apply(alloc(1, PRODUCER_ID_BLOCK_MAX + 1)).is_err());
        assert_eq!(restored, before);
    }

    #[test]
    fn placement_spreads_leaders_round_the_ring() {
        let mut s = three();
        s.apply(create("t", 4, 2)).unwrap();
        let parts = &s.topics["t"].partitions;
        let replicas: Vec<_> = parts.iter().map(|p| p.replicas.clone()).collect();
        assert_eq!(
            replicas,
            vec![vec![1, 2], vec![2, 3], vec![3, 1], vec![1, 2]]
        );
        assert!(parts
            .iter()
            .all(|p| p.leader == p.replicas[0] && p.isr == p.replicas));
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = three();
        s.apply(create("t", 1, 1)).unwrap();
        let before = s.clone();
        let cases = [
            // The name taken by another creation (another id).
            MetadataCommand::CreateTopic {
                name: "t".into(),
                topic_id: "another".into(),
                partitions: 1,
                replication_factor: 1,
                configs: BTreeMap::new(),
            },
            create("bad name", 1, 1),
            create("u", 0, 1),
            create("u", 1, 4),
            create("u", 1, 0),
            MetadataCommand::DeleteTopic {
                name: "nope".into(),
                topic_id: None,
            },
            MetadataCommand::AddPartitions {
                name: "t".into(),
                total_partitions: 1,
                current_factor: true,
            },
            MetadataCommand::AlterTopicConfig {
                name: "t".into(),
                set: [("retention.ms".to_string(), "x".to_string())].into(),
                delete: vec![],
                current_factor: true,
            },
            MetadataCommand::AlterTopicConfig {
                name: "t".into(),
                set: [("min.insync.replicas".to_string(), "2".to_string())].into(),
                delete: vec![],
                current_factor: true,
            },
        ];
        for cmd in cases {
            assert!(s.apply(cmd.clone()).is_err(), "{cmd:?} accepted");
            assert_eq!(s, before, "{cmd:?} changed state");
        }
    }

    #[test]
    fn fencing_moves_leadership_within_the_isr_and_bumps_epochs() {
        let mut s = three();
        s.apply(create("t", 3, 3)).unwrap();
        s.apply(MetadataCommand::FenceBroker {
            id: 1,
            epoch: None,
            controlled: false,
        })
        .unwrap();
        let p0 = &s.topics["t"].partitions[0];
        assert_eq!((p0.leader, p0.leader_epoch), (2, 1));
        assert_eq!(p0.isr, vec![2, 3]);
        let p1 = &s.topics["t"].partitions[1];
        assert_eq!((p1.leader, p1.leader_epoch), (2, 0));
        assert_eq!(p1.isr, vec![2, 3]);
    }

    #[test]
    fn a_fence_for_an_earlier_registration_is_void() {
        let mut s = three();
        s.apply(create("t", 3, 3)).unwrap();
        let first = s.brokers[&1].epoch;
        // The controller decides to fence registration `first`; before
        // its command lands, broker 1 restarts and registers again.
        register(&mut s, 1);
        let second = s.brokers[&1].epoch;
        assert!(second > first);
        let before = s.clone();
        s.apply(MetadataCommand::FenceBroker {
            id: 1,
            epoch: Some(first),
            controlled: false,
        })
        .unwrap();
        assert_eq!(
            (&s.brokers, &s.topics),
            (&before.brokers, &before.topics),
            "the new incarnation was fenced"
        );
        // The current registration's fence applies.
        s.apply(MetadataCommand::FenceBroker {
            id: 1,
            epoch: Some(second),
            controlled: false,
        })
        .unwrap();
        assert!(s.brokers[&1].fenced);
        assert!(s.topics["t"].partitions.iter().all(|p| p.leader != 1));
        // A command logged before the field existed fences whatever is
        // registered.
        let old: MetadataCommand = serde_json::from_str(r#"{"FenceBroker":{"id":2}}"#).unwrap();
        assert_eq!(
            old,
            MetadataCommand::FenceBroker {
                id: 2,
                epoch: None,
                controlled: false
            }
        );
        s.apply(old).unwrap();
        assert!(s.brokers[&2].fenced);
    }

    #[test]
    fn last_isr_member_fenced_leaves_partition_offline_until_it_returns() {
        let mut s = three();
        s.apply(create("t", 1, 1)).unwrap();
        s.apply(MetadataCommand::FenceBroker {
            id: 1,
            epoch: None,
            controlled: false,
        })
        .unwrap();
        let p = &s.topics["t"].partitions[0];
        assert_eq!((p.leader, p.leader_epoch, p.isr.clone()), (-1, 1, vec![1]));
        register(&mut s, 1);
        let p = &s.topics["t"].partitions[0];
        assert_eq!((p.leader, p.leader_epoch), (1, 2));
    }

    fn alter_isr(leader_epoch: i32, partition_epoch: i32, isr: Vec<i32>) -> MetadataCommand {
        MetadataCommand::AlterPartitionIsr {
            topic: "t".into(),
            topic_id: String::new(),
            partition: 0,
            leader_id: 1,
            leader_epoch,
            partition_epoch,
            isr,
        }
    }

    #[test]
    fn isr_changes_need_the_current_leader_and_epochs() {
        let mut s = three();
        s.apply(create("t", 1, 3)).unwrap();
        s.apply(alter_isr(0, 0, vec![3, 1])).unwrap();
        let p = &s.topics["t"].partitions[0];
        assert_eq!((p.isr.clone(), p.partition_epoch), (vec![1, 3], 1));
        let before = s.clone();
        for (cmd, why) in [
            (alter_isr(0, 0, vec![1]), "stale"),
            (alter_isr(1, 1, vec![1]), "not current"),
            (alter_isr(0, 1, vec![2, 3]), "contain the leader"),
            (alter_isr(0, 1, vec![1, 4]), "holds no replica"),
            (
                MetadataCommand::AlterPartitionIsr {
                    topic: "t".into(),
                    topic_id: "id-of-an-earlier-t".into(),
                    partition: 0,
                    leader_id: 1,
                    leader_epoch: 0,
                    partition_epoch: 1,
                    isr: vec![1],
                },
                "earlier topic",
            ),
        ] {
            let err = s.apply(cmd).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
            assert_eq!(s, before);
        }
        // A fenced broker cannot rejoin.
        s.apply(MetadataCommand::FenceBroker {
            id: 2,
            epoch: None,
            controlled: false,
        })
        .unwrap();
        let epoch = s.topics["t"].partitions[0].partition_epoch;
        let err = s
            .apply(alter_isr(0, epoch, vec![1, 2, 3]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("fenced"), "{err}");
        s.apply(alter_isr(0, epoch, vec![1])).unwrap();
        assert_eq!(s.topics["t"].partitions[0].isr, vec![1]);
    }

    #[test]
    fn replicas_spread_over_racks() {
        let mut s = ClusterMetadata::new("c");
        for (id, rack) in [(1, "a"), (2, "a"), (3, "b"), (4, "b")] {
            s.apply(MetadataCommand::RegisterBroker {
                id,
                address: format!("h:{id}"),
                rack: rack.into(),
                roles: vec![],
                incarnation: String::new(),
            })
            .unwrap();
        }
        assert_eq!(s.placement_order(), vec![1, 3, 2, 4]);
        s.apply(create("t", 4, 2)).unwrap();
        let rack = |id: i32| s.brokers[&id].rack.clone();
        for p in &s.topics["t"].partitions {
            assert_ne!(rack(p.replicas[0]), rack(p.replicas[1]), "{:?}", p.replicas);
        }
        // Leaders still spread over every broker.
        let mut leaders: Vec<i32> = s.topics["t"].partitions.iter().map(|p| p.leader).collect();
        leaders.sort();
        assert_eq!(leaders, vec![1, 2, 3, 4]);
    }

    /// Topic "t", one partition on brokers 1 (leading) and 2, with
    /// unclean elections allowed or not.
    fn two_copies_of_t(unclean: bool) -> MetadataCommand {
        MetadataCommand::CreateTopic {
            name: "t".into(),
            topic_id: "x".into(),
            partitions: 1,
            replication_factor: 2,
            configs: [(
                "unclean.leader.election.enable".to_string(),
                unclean.to_string(),
            )]
            .into(),
        }
    }

    /// Unclean election only when the topic allows it, and never for a
    /// controlled shutdown: that broker comes back with its log, and
    /// would truncate what it acknowledged to the unclean leader's.
    #[test]
    fn unclean_election_only_when_the_topic_allows_it() {
        for (allow, controlled, leader) in [(false, false, -1), (true, false, 2), (true, true, -1)]
        {
            let mut s = three();
            s.apply(two_copies_of_t(allow)).unwrap();
            // Follower 2 fell out of the ISR, then the leader died.
            s.apply(alter_isr(0, 0, vec![1])).unwrap();
            s.apply(MetadataCommand::FenceBroker {
                id: 1,
                epoch: None,
                controlled,
            })
            .unwrap();
            let p = &s.topics["t"].partitions[0];
            assert_eq!(p.leader, leader, "allow={allow} controlled={controlled}");
            assert_eq!(p.leader_epoch, 1);
            if controlled {
                // Another broker's registration, or a config change, does
                // not elect uncleanly while it is away either.
                assert_eq!(p.isr, vec![1]);
                register(&mut s, 3);
                s.apply(MetadataCommand::AlterTopicConfig {
                    name: "t".into(),
                    set: [("retention.ms".to_string(), "1000".to_string())].into(),
                    delete: vec![],
                    current_factor: true,
                })
                .unwrap();
                assert_eq!(s.topics["t"].partitions[0].leader, -1);
                // Back with its log, it leads again.
                register(&mut s, 1);
                assert_eq!(s.topics["t"].partitions[0].leader, 1);
            }
        }
    }

    /// Unclean election is not only tried when the last in-sync leader
    /// is fenced: a partition left offline elects when an out-of-sync
    /// replica registers again (also one allowed only since: at its next
    /// registration; an admin's unclean `ElectLeaders` need not wait).
    #[test]
    fn an_offline_partition_elects_uncleanly_once_it_can() {
        for allow_first in [true, false] {
            let mut s = three();
            s.apply(two_copies_of_t(allow_first)).unwrap();
            // Follower 2 fell behind and died, then leader 1 died: nothing
            // live to elect.
            s.apply(alter_isr(0, 0, vec![1])).unwrap();
            for id in [2, 1] {
                s.apply(MetadataCommand::FenceBroker {
                    id,
                    epoch: None,
                    controlled: false,
                })
                .unwrap();
            }
            assert_eq!(s.topics["t"].partitions[0].leader, -1);
            register(&mut s, 2);
            if !allow_first {
                assert_eq!(s.topics["t"].partitions[0].leader, -1, "not allowed yet");
                s.apply(MetadataCommand::AlterTopicConfig {
                    name: "t".into(),
                    set: [(
                        "unclean.leader.election.enable".to_string(),
                        "true".to_string(),
                    )]
                    .into(),
                    delete: vec![],
                    current_factor: true,
                })
                .unwrap();
                register(&mut s, 3);
            }
            let p = &s.topics["t"].partitions[0];
            assert_eq!(
                (p.leader, p.isr.clone()),
                (2, vec![2]),
                "allow_first={allow_first}"
            );
        }
    }

    #[test]
    fn preferred_election_returns_leadership_to_the_first_replica() {
        let mut s = three();
        s.apply(create("t", 3, 3)).unwrap();
        s.apply(MetadataCommand::FenceBroker {
            id: 1,
            epoch: None,
            controlled: false,
        })
        .unwrap();
        register(&mut s, 1);
        // Broker 1 is back but out of every ISR: nothing to do yet.
        let elect = |unclean| MetadataCommand::ElectLeaders {
            topic: "t".into(),
            partitions: vec![],
            unclean,
        };
        assert_eq!(
            s.apply(elect(false)).unwrap(),
            Applied::Elected { changed: vec![] }
        );
        let p0 = s.topics["t"].partitions[0].clone();
        s.apply(MetadataCommand::AlterPartitionIsr {
            topic: "t".into(),
            topic_id: String::new(),
            partition: 0,
            leader_id: p0.leader,
            leader_epoch: p0.leader_epoch,
            partition_epoch: p0.partition_epoch,
            isr: vec![1, 2, 3],
        })
        .unwrap();
        assert_eq!(
            s.apply(elect(false)).unwrap(),
            Applied::Elected { changed: vec![0] }
        );
        let p = &s.topics["t"].partitions[0];
        assert_eq!((p.leader, p.leader_epoch), (1, p0.leader_epoch + 1));
        // Unclean election only touches leaderless partitions.
        assert_eq!(
            s.apply(elect(true)).unwrap(),
            Applied::Elected { changed: vec![] }
        );
        let err = s
            .apply(MetadataCommand::ElectLeaders {
                topic: "t".into(),
                partitions: vec![7],
                unclean: false,
            })
            .unwrap_err();
        assert!(err.to_string().contains("3 partitions"), "{err}");
    }

    #[test]
    fn add_partitions_and_alter_config() {
        let mut s = three();
        s.apply(create("t", 1, 1)).unwrap();
        s.apply(MetadataCommand::AddPartitions {
            name: "t".into(),
            total_partitions: 3,
            current_factor: true,
        })
        .unwrap();
        assert_eq!(s.topics["t"].partitions.len(), 3);
        s.apply(MetadataCommand::AlterTopicConfig {
            name: "t".into(),
            set: [("retention.ms".to_string(), "1000".to_string())].into(),
            delete: vec![],
            current_factor: true,
        })
        .unwrap();
        assert_eq!(s.topics["t"].configs["retention.ms"], "1000");
        s.apply(MetadataCommand::AlterTopicConfig {
            name: "t".into(),
            set: BTreeMap::new(),
            delete: vec!["retention.ms".into()],
            current_factor: true,
        })
        .unwrap();
        assert!(s.topics["t"].configs.is_empty());
    }

    #[test]
    fn init_cluster_sets_the_id_once() {
        let mut s = ClusterMetadata::default();
        let init = |id: &str| MetadataCommand::InitCluster {
            cluster_id: id.into(),
        };
        assert!(s.apply(init("")).is_err());
        assert_eq!((s.cluster_id.as_str(), s.applied), ("", 0));
        s.apply(init("a")).unwrap();
        assert_eq!((s.cluster_id.as_str(), s.applied), ("a", 1));
        // The same id again (a second leader racing) is a no-op success.
        s.apply(init("a")).unwrap();
        assert_eq!((s.cluster_id.as_str(), s.applied), ("a", 2));
        let before = s.clone();
        let err = s.apply(init("b")).unwrap_err();
        assert!(
            matches!(&err, MetadataError::ClusterIdMismatch { expected, found } if expected == "a" && found == "b"),
            "{err}"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn replay_is_deterministic() {
        let cmds = vec![
            MetadataCommand::RegisterBroker {
                id: 2,
                address: "a".into(),
                rack: String::new(),
                roles: vec![],
                incarnation: String::new(),
            },
            MetadataCommand::RegisterBroker {
                id: 1,
                address: "b".into(),
                rack: String::new(),
                roles: vec![],
                incarnation: String::new(),
            },
            create("x", 5, 2),
            MetadataCommand::FenceBroker {
                id: 2,
                epoch: None,
                controlled: false,
            },
        ];
        let run = || {
            let mut s = ClusterMetadata::new("c");
            for c in cmds.clone() {
                s.apply(c).unwrap();
            }
            s
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn security_commands_apply_deterministically() {
        use crate::security::*;
        let cred = UserCredential {
            mechanism: "PBKDF2-HMAC-SHA256".into(),
            iterations: 4096,
            salt: vec![1; 16],
            hash: vec![2; 32],
        };
        let acl = Acl {
            principal: "alice".into(),
            resource_type: ResourceType::Topic,
            name: "t".into(),
            pattern: PatternType::Prefixed,
            operation: Operation::Write,
            permission: Permission::Allow,
        };
        let cmds = vec![
            MetadataCommand::UpsertUser {
                name: "alice".into(),
                credential: cred.clone(),
            },
            MetadataCommand::CreateAcl { acl: acl.clone() },
            MetadataCommand::CreateAcl { acl: acl.clone() },
            MetadataCommand::SetQuota {
                principal: "alice".into(),
                quota: Quota {
                    produce_bytes_per_sec: Some(1000),
                    fetch_bytes_per_sec: None,
                },
            },
            MetadataCommand::SetQuota {
                principal: DEFAULT_QUOTA_KEY.into(),
                quota: Quota {
                    produce_bytes_per_sec: None,
                    fetch_bytes_per_sec: Some(5),
                },
            },
            MetadataCommand::RegisterBrokerListeners {
                id: 1,
                address: "h:1".into(),
                internal_address: "h:2".into(),
                rack: String::new(),
                roles: vec![],
                incarnation: String::new(),
            },
        ];
        let run = || {
            let mut s = ClusterMetadata::new("c");
            for c in cmds.clone() {
                s.apply(c).unwrap();
            }
            s
        };
        let s = run();
        assert_eq!(s, run());
        assert_eq!(s.users["alice"], cred);
        assert_eq!(s.acls.len(), 1, "a duplicate ACL is stored once");
        assert_eq!(s.quotas["alice"].produce_bytes_per_sec, Some(1000));
        assert_eq!(s.quotas[DEFAULT_QUOTA_KEY].fetch_bytes_per_sec, Some(5));
        assert_eq!(s.internal_address(1), Some("h:2"));
        assert_eq!(s.applied, cmds.len() as u64);

        // A plain re-registration drops the internal address.
        let mut s2 = s.clone();
        register(&mut s2, 1);
        assert_eq!(s2.internal_address(1), Some("127.0.0.1:9001"));

        // Refused commands change nothing.
        let before = s.clone();
        let mut s = s;
        for bad in [
            MetadataCommand::DeleteUser { name: "bob".into() },
            MetadataCommand::DeleteAcl {
                acl: Acl {
                    operation: Operation::Read,
                    ..acl.clone()
                },
            },
            MetadataCommand::UpsertUser {
                name: "has space".into(),
                credential: cred.clone(),
            },
            MetadataCommand::UpsertUser {
                name: "eve".into(),
                credential: UserCredential {
                    salt: vec![],
                    ..cred.clone()
                },
            },
            MetadataCommand::SetQuota {
                principal: "alice".into(),
                quota: Quota {
                    produce_bytes_per_sec: Some(0),
                    fetch_bytes_per_sec: None,
                },
            },
        ] {
            assert!(s.apply(bad.clone()).is_err(), "{bad:?} accepted");
            assert_eq!(s, before, "{bad:?} changed state");
        }
        s.apply(MetadataCommand::DeleteAcl { acl }).unwrap();
        s.apply(MetadataCommand::DeleteUser {
            name: "alice".into(),
        })
        .unwrap();
        s.apply(MetadataCommand::SetQuota {
            principal: "alice".into(),
            quota: Quota::default(),
        })
        .unwrap();
        assert!(s.acls.is_empty() && s.users.is_empty() && !s.quotas.contains_key("alice"));
    }
}
