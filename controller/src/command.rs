//! Metadata commands: every change to [`crate::ClusterMetadata`] is one of
//! these, so a log of them (a file today, the Raft log later) replays to
//! the same state on every node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A change to the cluster metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// Fixes the cluster id of a freshly bootstrapped quorum. The first
    /// leader submits it; once set, the same id is a no-op and another id
    /// is refused, so every node ends with the first one applied.
    InitCluster { cluster_id: String },
    /// A broker starts (or restarts) and announces its address.
    ///
    /// `incarnation`: a random id per process start. The same incarnation
    /// registering again while registered and not fenced is a retried
    /// submit (its first copy committed, its answer lost): a no-op that
    /// answers the epoch it got, not a restart that fences the broker.
    RegisterBroker {
        id: i32,
        address: String,
        rack: String,
        roles: Vec<String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        incarnation: String,
    },
    /// A broker missed its heartbeats (or shuts down): it leaves every
    /// ISR and leads nothing. With `epoch`, only that registration is
    /// fenced: a broker that registered again since (a new broker epoch)
    /// is left alone, so a verdict reached before its new registration
    /// cannot fence the new incarnation.
    ///
    /// `controlled`: the broker asked itself (controlled shutdown, as in
    /// a rolling restart). It is alive and coming back with its log, so
    /// its leaderships move only to in-sync replicas: never to an
    /// out-of-sync one under `unclean.leader.election.enable`, which
    /// would make it truncate records it had acknowledged when it
    /// returns. A partition it alone holds in sync stays without a leader
    /// until it registers again.
    FenceBroker {
        id: i32,
        #[serde(default)]
        epoch: Option<i64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        controlled: bool,
    },
    /// Creates a topic; replicas are assigned by the state machine,
    /// deterministically, over the unfenced brokers.
    CreateTopic {
        name: String,
        topic_id: String,
        partitions: i32,
        replication_factor: i32,
        configs: BTreeMap<String, String>,
    },
    /// Deletes a topic; with `topic_id`, only that incarnation of the
    /// name. A submit retried after its first copy committed (a
    /// forwarded command whose answer was lost) must not delete a topic
    /// created again under the name in between.
    DeleteTopic {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic_id: Option<String>,
    },
    /// Grows a topic to `total_partitions`. With `current_factor`, each
    /// new partition gets as many replicas as the topic's partitions have
    /// now ([`TopicInfo::current_replication_factor`], which follows
    /// reassignments); without (commands written before the field), as
    /// many as the topic was created with, as they were applied then.
    ///
    /// [`TopicInfo::current_replication_factor`]: crate::metadata::TopicInfo::current_replication_factor
    AddPartitions {
        name: String,
        total_partitions: i32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        current_factor: bool,
    },
    /// A partition leader changes the ISR (shrink a lagging follower, add
    /// one that caught up). Refused unless the leader and both epochs are
    /// current, so a deposed leader's late proposal changes nothing.
    ///
    /// With `topic_id`, only for that incarnation of the topic: a late
    /// proposal for a deleted topic does not change the ISR of one
    /// created again under its name (placement is deterministic, and both
    /// epochs start at 0 again).
    AlterPartitionIsr {
        topic: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        topic_id: String,
        partition: i32,
        leader_id: i32,
        leader_epoch: i32,
        partition_epoch: i32,
        isr: Vec<i32>,
    },
    /// Preferred (or, with `unclean`, any-live-replica) leader election for
    /// `partitions` of `topic` (all when empty).
    ElectLeaders {
        topic: String,
        partitions: Vec<i32>,
        unclean: bool,
    },
    /// Sets and removes topic config overrides.
    AlterTopicConfig {
        name: String,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
        /// `min.insync.replicas` is checked against the topic's current
        /// replication factor (see `AddPartitions`); without (commands
        /// written before the field), against the factor it was created
        /// with.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        current_factor: bool,
    },
    /// Hands `count` fresh idempotent-producer ids to broker `broker_id`,
    /// which gives them out to producers (InitProducerId). Ids come from a
    /// counter in the replicated state, so none is ever handed out twice,
    /// whichever controller applies the command.
    AllocateProducerIds { broker_id: i32, count: i32 },
    /// Moves partitions of `topic` to new replica lists (partition →
    /// replicas, preferred leader first; an empty list cancels an ongoing
    /// reassignment). New replicas join first and copy the log; once all
    /// are in the ISR the old ones leave (see `PartitionInfo`).
    ReassignPartitions {
        topic: String,
        assignments: BTreeMap<i32, Vec<i32>>,
    },
    /// `RegisterBroker` for a broker with a separate internal listener:
    /// other brokers reach it for replication and Raft at
    /// `internal_address`.
    RegisterBrokerListeners {
        id: i32,
        address: String,
        internal_address: String,
        rack: String,
        roles: Vec<String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        incarnation: String,
    },
    /// Creates a user or replaces its password hash.
    UpsertUser {
        name: String,
        credential: crate::security::UserCredential,
    },
    /// Deletes a user.
    DeleteUser { name: String },
    /// Adds an ACL (a no-op when it exists).
    CreateAcl { acl: crate::security::Acl },
    /// Removes an ACL.
    DeleteAcl { acl: crate::security::Acl },
    /// Sets a principal's byte-rate quotas (or the default's, under
    /// `security::DEFAULT_QUOTA_KEY`); both limits `None` removes it.
    SetQuota {
        principal: String,
        quota: crate::security::Quota,
    },
}
