//! The openraft type config and the JSON wire types carried in
//! `runnel.v1.internal.RaftPayload`.
//!
//! Raft node ids are the broker ids (`node.id`, never negative) as `u64`;
//! a node's Raft address is its gRPC HOST:PORT (client API and Raft share
//! one listener).

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::metadata::{validate_topic_name, Applied};
use crate::{MetadataCommand, MetadataError};

/// Version of the JSON carried in `RaftPayload.data`; bumped on any
/// incompatible change.
pub const WIRE_VERSION: u32 = 1;

openraft::declare_raft_types!(
    /// Runnel's Raft types: the log carries [`MetadataCommand`]s, the state
    /// machine answers [`CommandResponse`]s.
    pub TypeConfig:
        D = MetadataCommand,
        R = CommandResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Raft node id.
pub type NodeId = u64;
/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// Errors of storage calls.
pub type StorageError = openraft::StorageError<NodeId>;

/// What the state machine answered to one command, on every node alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// The command's outcome; a refusal changed nothing.
    pub result: Result<Applied, Refusal>,
    /// `ClusterMetadata::applied` after this command, so a non-leader can
    /// wait until its own copy has caught up (read your writes).
    pub applied: u64,
}

/// A [`MetadataError`] that survives a trip through JSON: the state machine
/// runs on the leader, the caller may sit on another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    TopicAlreadyExists {
        name: String,
    },
    UnknownTopic {
        name: String,
    },
    InvalidTopicName {
        name: String,
        reason: String,
    },
    InvalidPartitions {
        count: i32,
        reason: String,
    },
    InvalidReplicationFactor {
        factor: i32,
        reason: String,
    },
    InvalidConfig {
        key: String,
        value: String,
        reason: String,
    },
    UnknownBroker {
        id: i32,
    },
    ClusterIdMismatch {
        expected: String,
        found: String,
    },
    /// Any other error, by its message.
    Other {
        message: String,
    },
    InvalidReassignment {
        topic: String,
        partition: i32,
        reason: String,
    },
    InvalidRequest {
        reason: String,
    },
    InvalidIsrChange {
        topic: String,
        partition: i32,
        reason: String,
    },
    InvalidSecurity {
        reason: String,
    },
}

impl From<MetadataError> for Refusal {
    fn from(e: MetadataError) -> Self {
        match e {
            MetadataError::TopicAlreadyExists { name } => Self::TopicAlreadyExists { name },
            MetadataError::UnknownTopic { name } => Self::UnknownTopic { name },
            MetadataError::InvalidTopicName { name, reason } => Self::InvalidTopicName {
                name,
                reason: reason.to_string(),
            },
            MetadataError::InvalidPartitions { count, reason } => {
                Self::InvalidPartitions { count, reason }
            }
            MetadataError::InvalidReplicationFactor { factor, reason } => {
                Self::InvalidReplicationFactor { factor, reason }
            }
            MetadataError::InvalidConfig { key, value, reason } => {
                Self::InvalidConfig { key, value, reason }
            }
            MetadataError::UnknownBroker { id } => Self::UnknownBroker { id },
            MetadataError::ClusterIdMismatch { expected, found } => {
                Self::ClusterIdMismatch { expected, found }
            }
            MetadataError::InvalidReassignment {
                topic,
                partition,
                reason,
            } => Self::InvalidReassignment {
                topic,
                partition,
                reason,
            },
            MetadataError::InvalidRequest { reason } => Self::InvalidRequest { reason },
            MetadataError::InvalidIsrChange {
                topic,
                partition,
                reason,
            } => Self::InvalidIsrChange {
                topic,
                partition,
                reason,
            },
            MetadataError::InvalidSecurity { reason } => Self::InvalidSecurity { reason },
            other => Self::Other {
                message: other.to_string(),
            },
        }
    }
}

impl From<Refusal> for MetadataError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::TopicAlreadyExists { name } => Self::TopicAlreadyExists { name },
            Refusal::UnknownTopic { name } => Self::UnknownTopic { name },
            // The reason is a `&'static str`: validation is pure, so run it
            // again here to get the same one.
            Refusal::InvalidTopicName { name, .. } => match validate_topic_name(&name) {
                Err(e) => e,
                Ok(()) => Self::InvalidTopicName {
                    name,
                    reason: "refused by the controller",
                },
            },
            Refusal::InvalidPartitions { count, reason } => {
                Self::InvalidPartitions { count, reason }
            }
            Refusal::InvalidReplicationFactor { factor, reason } => {
                Self::InvalidReplicationFactor { factor, reason }
            }
            Refusal::InvalidConfig { key, value, reason } => {
                Self::InvalidConfig { key, value, reason }
            }
            Refusal::UnknownBroker { id } => Self::UnknownBroker { id },
            Refusal::ClusterIdMismatch { expected, found } => {
                Self::ClusterIdMismatch { expected, found }
            }
            Refusal::Other { message } => Self::Raft { reason: message },
            Refusal::InvalidReassignment {
                topic,
                partition,
                reason,
            } => Self::InvalidReassignment {
                topic,
                partition,
                reason,
            },
            Refusal::InvalidRequest { reason } => Self::InvalidRequest { reason },
            Refusal::InvalidIsrChange {
                topic,
                partition,
                reason,
            } => Self::InvalidIsrChange {
                topic,
                partition,
                reason,
            },
            Refusal::InvalidSecurity { reason } => Self::InvalidSecurity { reason },
        }
    }
}

/// `Raft.ClientWrite` request: a command forwarded towards the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// The command.
    pub cmd: MetadataCommand,
    /// How many more times a non-leader may pass it on (a follower that
    /// knows the leader forwards once; a learner may not know it).
    pub hops: u8,
}

/// `Raft.ClientWrite` response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardResponse {
    /// Committed and applied by the leader.
    Applied(CommandResponse),
    /// The receiver could not reach the leader; retry, at the hint if any.
    NotLeader { leader_id: Option<NodeId> },
}

/// Every `RaftPayload` is one envelope: the sender's cluster id (empty
/// while the quorum is still bootstrapping) guards against nodes of two
/// clusters talking to each other.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// [`WIRE_VERSION`].
    pub version: u32,
    /// The sender's cluster id, or empty when it does not know it yet.
    pub cluster_id: String,
    /// The openraft request or response, or a [`ForwardRequest`].
    pub body: T,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_round_trip_through_json() {
        let errors = [
            MetadataError::TopicAlreadyExists { name: "t".into() },
            validate_topic_name("a b").unwrap_err(),
            MetadataError::InvalidPartitions {
                count: 0,
                reason: "must be at least 1".into(),
            },
            MetadataError::ClusterIdMismatch {
                expected: "a".into(),
                found: "b".into(),
            },
            MetadataError::InvalidReassignment {
                topic: "t".into(),
                partition: 1,
                reason: "broker 9 is not registered".into(),
            },
            MetadataError::InvalidRequest {
                reason: "producer id block of 0".into(),
            },
            MetadataError::InvalidIsrChange {
                topic: "t".into(),
                partition: 2,
                reason: "partition epoch 3 is stale (now 4)".into(),
            },
            MetadataError::InvalidSecurity {
                reason: "unknown user 'bob'".into(),
            },
        ];
        for e in errors {
            let text = e.to_string();
            let kind = std::mem::discriminant(&e);
            let wire = serde_json::to_vec(&Refusal::from(e)).unwrap();
            let back: MetadataError = serde_json::from_slice::<Refusal>(&wire).unwrap().into();
            assert_eq!(back.to_string(), text);
            // The same error on every node: a broker tells a refused ISR
            // change (or user change) from a failure to reach the quorum.
            assert_eq!(std::mem::discriminant(&back), kind, "{text}");
        }
    }
}
