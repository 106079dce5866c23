//! The controller crate's one error enum.

use std::path::PathBuf;

/// Why a metadata command was refused or could not be stored. Every
/// variant but `Persist` is the caller's fault and changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// An ISR change from a leader whose view is out of date, or an ISR
    /// that breaks the rules.
    #[error("ISR change for {topic}-{partition} refused: {reason}")]
    InvalidIsrChange {
        topic: String,
        partition: i32,
        reason: String,
    },
    /// CreateTopic for a name that exists.
    #[error("topic '{name}' already exists")]
    TopicAlreadyExists { name: String },
    /// The named topic does not exist.
    #[error("unknown topic '{name}'")]
    UnknownTopic { name: String },
    /// The topic name breaks the naming rules.
    #[error("invalid topic name '{name}': {reason}")]
    InvalidTopicName { name: String, reason: &'static str },
    /// Partition count below 1, above the limit, or not growing.
    #[error("invalid partition count {count}: {reason}")]
    InvalidPartitions { count: i32, reason: String },
    /// Replication factor below 1 or above the live broker count.
    #[error("invalid replication factor {factor}: {reason}")]
    InvalidReplicationFactor { factor: i32, reason: String },
    /// A topic config key is unknown or its value is bad.
    #[error("invalid config {key}={value}: {reason}")]
    InvalidConfig {
        key: String,
        value: String,
        reason: String,
    },
    /// The broker id is not registered.
    #[error("unknown broker {id}")]
    UnknownBroker { id: i32 },
    /// A reassignment that names unknown brokers or partitions.
    #[error("invalid reassignment of {topic}-{partition}: {reason}")]
    InvalidReassignment {
        topic: String,
        partition: i32,
        reason: String,
    },
    /// A command with an argument out of range.
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    /// Writing the metadata to disk failed; the change did not happen.
    #[error("could not persist metadata to {path}: {source}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The stored metadata could not be read back.
    #[error("corrupt metadata file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The data directory belongs to another cluster.
    #[error("data directory belongs to cluster '{found}', not '{expected}'")]
    ClusterIdMismatch { expected: String, found: String },
    /// No answer from a controller leader before the deadline. Retryable,
    /// but the command may or may not have been applied: a proposal that
    /// reached a leader can commit after its answer was lost, so a retry
    /// of a create or delete may then be refused as already done.
    #[error("no active controller after {waited_ms} ms (last known leader: {leader_hint:?})")]
    NotController {
        leader_hint: Option<i32>,
        waited_ms: u64,
    },
    /// The Raft quorum could not be started or stopped (bad config, sled,
    /// or a fatal Raft error).
    #[error("raft controller: {reason}")]
    Raft { reason: String },
    /// A user, ACL or quota command with bad input, or naming a user or
    /// ACL that does not exist.
    #[error("{reason}")]
    InvalidSecurity { reason: String },
}
