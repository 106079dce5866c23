//! Metadata commands: every change to [`crate::ClusterMetadata`] is one of
//! these, so a log of them (a file today, the Raft log later) replays to
//! the same state on every node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A change to the cluster metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// A broker starts (or restarts) and announces its address.
    RegisterBroker {
        id: i32,
        address: String,
        rack: String,
        roles: Vec<String>,
    },
    /// A broker missed its heartbeats: it leaves every ISR and leads
    /// nothing.
    FenceBroker { id: i32 },
    /// Creates a topic; replicas are assigned by the state machine,
    /// deterministically, over the unfenced brokers.
    CreateTopic {
        name: String,
        topic_id: String,
        partitions: i32,
        replication_factor: i32,
        configs: BTreeMap<String, String>,
    },
    /// Deletes a topic.
    DeleteTopic { name: String },
    /// Grows a topic to `total_partitions`.
    AddPartitions { name: String, total_partitions: i32 },
    /// Sets and removes topic config overrides.
    AlterTopicConfig {
        name: String,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
    },
}
