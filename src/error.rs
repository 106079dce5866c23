//! The broker's typed errors and their one mapping to gRPC statuses.
//!
//! Every status carries a human message plus the `runnel-error-code`
//! trailer (the [`ErrorCode`] name) and, for NOT_LEADER, `runnel-leader`
//! with the leader's address. Details of internal failures are logged, not
//! sent.

use runnel_controller::MetadataError;
use runnel_proto::v1::ErrorCode;
use runnel_storage::StorageError;
use tonic::{Code, Status};

/// Trailer naming the machine-readable error code.
pub const ERROR_CODE_HEADER: &str = "runnel-error-code";
/// Trailer naming the partition leader's address on NOT_LEADER.
pub const LEADER_HEADER: &str = "runnel-leader";

/// Why a broker request failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("unknown topic '{topic}'")]
    UnknownTopic { topic: String },
    #[error("topic '{topic}' has no partition {partition} (it has {partitions})")]
    UnknownPartition {
        topic: String,
        partition: i32,
        partitions: i32,
    },
    #[error("this broker does not lead {topic}-{partition}{}", leader_hint(.leader))]
    NotLeader {
        topic: String,
        partition: i32,
        leader: String,
    },
    #[error("{topic}-{partition} is offline: no leader")]
    PartitionOffline { topic: String, partition: i32 },
    #[error("not enough in-sync replicas for {topic}-{partition}: {isr} in sync, min.insync.replicas is {min_isr}")]
    NotEnoughReplicas {
        topic: String,
        partition: i32,
        isr: usize,
        min_isr: i32,
    },
    #[error("{topic}-{partition} was appended but only {isr} replicas are in sync, below min.insync.replicas {min_isr}; it may not survive a leader failure")]
    NotEnoughReplicasAfterAppend {
        topic: String,
        partition: i32,
        isr: usize,
        min_isr: i32,
    },
    #[error("{topic}-{partition}: offset {offset} was appended but not replicated to every in-sync replica within {timeout_ms} ms; it may or may not survive a leader failure")]
    ReplicationTimeout {
        topic: String,
        partition: i32,
        offset: i64,
        timeout_ms: u64,
    },
    #[error("{topic}-{partition}: records below {offset} are deleted on the leader, but not yet on every in-sync replica after {timeout_ms} ms (low watermark {low_watermark}); followers delete them when they next fetch")]
    DeleteRecordsTimeout {
        topic: String,
        partition: i32,
        offset: i64,
        low_watermark: i64,
        timeout_ms: u64,
    },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[error(
        "producer id {producer_id} was never allocated by this cluster (InitProducerId first)"
    )]
    UnknownProducerId { producer_id: i64 },
    #[error("topic '{topic}' was deleted and created again (id {current}, not {asked}): look it up again")]
    UnknownTopicId {
        topic: String,
        asked: String,
        current: String,
    },
    #[error("topic '{topic}' is internal to the cluster: clients may not {operation} it")]
    InternalTopic {
        topic: String,
        operation: &'static str,
    },
    #[error("broker is shutting down")]
    ShuttingDown,
    /// The broker stopped (shutting down, or the append's task was lost)
    /// after the append may have been made: NOT_LEADER, which clients
    /// retry as a request whose fate is unknown, not BROKER_NOT_AVAILABLE,
    /// which says nothing was written.
    #[error("{topic}-{partition}: the broker is shutting down and stopped waiting for this append; the records may or may not be stored")]
    StoppedAfterAppend { topic: String, partition: i32 },
    #[error("broker is starting: it takes up its partitions once it has registered")]
    Starting,
    #[error("this broker leads {topic}-{partition} but has not taken it up yet (its log is being opened); try again")]
    TakingUp { topic: String, partition: i32 },
    #[error("producer id {producer_id} is not in this broker's metadata yet (allocated by another broker moments ago?); try again")]
    ProducerIdNotApplied { producer_id: i64 },
    #[error("{reason}")]
    NotAuthorized { reason: String },
    #[error("{topic}-{partition} has a new leader whose high watermark has not caught up with its log yet; try again")]
    OffsetNotAvailable { topic: String, partition: i32 },
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl BrokerError {
    /// The machine-readable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::UnknownTopic { .. } => ErrorCode::UnknownTopic,
            BrokerError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
            BrokerError::NotLeader { .. }
            | BrokerError::PartitionOffline { .. }
            | BrokerError::StoppedAfterAppend { .. } => ErrorCode::NotLeader,
            BrokerError::NotEnoughReplicas { .. } => ErrorCode::NotEnoughReplicas,
            BrokerError::NotEnoughReplicasAfterAppend { .. } => {
                ErrorCode::NotEnoughReplicasAfterAppend
            }
            BrokerError::ReplicationTimeout { .. } | BrokerError::DeleteRecordsTimeout { .. } => {
                ErrorCode::RequestTimedOut
            }
            BrokerError::InvalidRequest { .. } => ErrorCode::InvalidRequest,
            BrokerError::UnknownProducerId { .. } => ErrorCode::UnknownProducerId,
            BrokerError::InternalTopic { .. } => ErrorCode::InvalidTopic,
            BrokerError::UnknownTopicId { .. } => ErrorCode::UnknownTopicId,
            BrokerError::ShuttingDown
            | BrokerError::Starting
            | BrokerError::TakingUp { .. }
            | BrokerError::ProducerIdNotApplied { .. } => ErrorCode::BrokerNotAvailable,
            BrokerError::NotAuthorized { .. } => ErrorCode::AuthorizationFailed,
            BrokerError::OffsetNotAvailable { .. } => ErrorCode::OffsetNotAvailable,
            BrokerError::Metadata(e) => match e {
                MetadataError::TopicAlreadyExists { .. } => ErrorCode::TopicAlreadyExists,
                MetadataError::UnknownTopic { .. } => ErrorCode::UnknownTopic,
                MetadataError::InvalidTopicName { .. } => ErrorCode::InvalidTopic,
                MetadataError::InvalidPartitions { .. } => ErrorCode::InvalidPartitions,
                MetadataError::InvalidReplicationFactor { .. } => {
                    ErrorCode::InvalidReplicationFactor
                }
                MetadataError::InvalidConfig { .. } => ErrorCode::InvalidConfig,
                MetadataError::UnknownBroker { .. }
                | MetadataError::InvalidRequest { .. }
                | MetadataError::InvalidReassignment { .. } => ErrorCode::InvalidRequest,
                MetadataError::NotController { .. } => ErrorCode::NotController,
                MetadataError::InvalidSecurity { .. } => ErrorCode::InvalidRequest,
                // Internal failures: the detail is logged, not sent.
                _ => ErrorCode::Unknown,
            },
            BrokerError::Storage(e) => match e {
                StorageError::RecordTooLarge { .. } => ErrorCode::RecordTooLarge,
                StorageError::OffsetOutOfRange { .. } | StorageError::AboveHighWatermark { .. } => {
                    ErrorCode::OffsetOutOfRange
                }
                StorageError::CorruptBatch { .. } | StorageError::EmptyBatch => {
                    ErrorCode::CorruptMessage
                }
                // Maybe stored (written, then its fsync failed; the log
                // is closed and leadership moves): retriable, and a retry
                // of an idempotent producer is deduplicated where it
                // lands, as STORAGE_ERROR, final, told the application
                // the batch failed.
                StorageError::Closed { .. }
                | StorageError::FencedLeaderEpoch { .. }
                | StorageError::FailedAfterWrite(_) => ErrorCode::NotLeader,
                StorageError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
                StorageError::ProducerFenced { .. } => ErrorCode::ProducerFenced,
                StorageError::UnknownProducerId { .. } => ErrorCode::UnknownProducerId,
                _ => ErrorCode::StorageError,
            },
        }
    }

    /// Whether the detail is safe and useful to show to clients.
    fn is_internal(&self) -> bool {
        matches!(self.code(), ErrorCode::Unknown | ErrorCode::StorageError)
            || matches!(
                self,
                BrokerError::Storage(StorageError::FailedAfterWrite(_))
            )
    }
}

fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::None => Code::Ok,
        ErrorCode::UnknownTopic
        | ErrorCode::UnknownPartition
        | ErrorCode::UnknownGroup
        | ErrorCode::UnknownTopicId => Code::NotFound,
        ErrorCode::TopicAlreadyExists => Code::AlreadyExists,
        ErrorCode::NotLeader
        | ErrorCode::NotCoordinator
        | ErrorCode::NotController
        | ErrorCode::BrokerNotAvailable
        | ErrorCode::OffsetNotAvailable
        | ErrorCode::NotEnoughReplicas
        | ErrorCode::NotEnoughReplicasAfterAppend => Code::Unavailable,
        ErrorCode::OffsetOutOfRange => Code::OutOfRange,
        ErrorCode::RecordTooLarge
        | ErrorCode::InvalidTopic
        | ErrorCode::InvalidPartitions
        | ErrorCode::InvalidReplicationFactor
        | ErrorCode::InvalidConfig
        | ErrorCode::InvalidRequest
        | ErrorCode::CorruptMessage
        | ErrorCode::OutOfOrderSequence => Code::InvalidArgument,
        ErrorCode::RequestTimedOut => Code::DeadlineExceeded,
        ErrorCode::UnknownMember
        | ErrorCode::IllegalGeneration
        | ErrorCode::RebalanceInProgress
        | ErrorCode::GroupNotEmpty
        | ErrorCode::ProducerFenced
        | ErrorCode::FencedInstanceId
        | ErrorCode::UnknownProducerId => Code::FailedPrecondition,
        ErrorCode::AuthenticationFailed => Code::Unauthenticated,
        ErrorCode::AuthorizationFailed => Code::PermissionDenied,
        ErrorCode::Unsupported => Code::Unimplemented,
        ErrorCode::Unknown | ErrorCode::StorageError => Code::Internal,
    }
}

/// Builds a status with Runnel's trailers.
pub fn status(code: ErrorCode, message: impl Into<String>, leader: Option<&str>) -> Status {
    let mut status = Status::new(grpc_code(code), message);
    let md = status.metadata_mut();
    if let Ok(v) = code.as_str_name().parse() {
        md.insert(ERROR_CODE_HEADER, v);
    }
    // Only a known address: an empty one parses, and a client would
    // dial it.
    if let Some(Ok(v)) = leader.filter(|l| !l.is_empty()).map(str::parse) {
        md.insert(LEADER_HEADER, v);
    }
    status
}

/// `; the leader is ADDR`, or nothing when it is not known.
fn leader_hint(leader: &str) -> String {
    if leader.is_empty() {
        String::new()
    } else {
        format!("; the leader is {leader}")
    }
}

impl BrokerError {
    /// The message a client is shown: an internal failure's detail (file
    /// paths, I/O errors) is logged here and left out.
    pub fn client_message(&self) -> String {
        let code = self.code();
        if self.is_internal() {
            tracing::error!(error = %self, ?code, "request failed");
            return format!("internal broker error ({})", code.as_str_name());
        }
        self.to_string()
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let code = e.code();
        if e.is_internal() {
            return status(code, e.client_message(), None);
        }
        let leader = match &e {
            BrokerError::NotLeader { leader, .. } => Some(leader.as_str()),
            _ => None,
        };
        status(code, e.to_string(), leader)
    }
}

/// Reads Runnel's error code from a status (for clients).
pub fn error_code_of(status: &Status) -> ErrorCode {
    status
        .metadata()
        .get(ERROR_CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::from_str_name)
        .unwrap_or(ErrorCode::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NOT_LEADER whose leader is not known names none: no empty
    /// `runnel-leader` trailer for a client to dial, no dangling "the
    /// leader is" in the message.
    #[test]
    fn an_unknown_leader_is_not_named() {
        let unknown = Status::from(BrokerError::NotLeader {
            topic: "t".into(),
            partition: 0,
            leader: String::new(),
        });
        assert!(unknown.metadata().get(LEADER_HEADER).is_none());
        assert_eq!(unknown.message(), "this broker does not lead t-0");
        assert_eq!(error_code_of(&unknown), ErrorCode::NotLeader);
        let known = Status::from(BrokerError::NotLeader {
            topic: "t".into(),
            partition: 0,
            leader: "h:1".into(),
        });
        assert_eq!(known.metadata().get(LEADER_HEADER).unwrap(), "h:1");
        assert!(known.message().ends_with("; the leader is h:1"));
    }

    /// Stopping after an append is not BROKER_NOT_AVAILABLE (nothing
    /// written); too few replicas after an append is not a deadline.
    #[test]
    fn answers_after_an_append_say_the_fate_is_open() {
        let stopped = BrokerError::StoppedAfterAppend {
            topic: "t".into(),
            partition: 0,
        };
        assert_eq!(stopped.code(), ErrorCode::NotLeader);
        assert!(stopped.to_string().contains("may or may not"));
        assert_eq!(
            grpc_code(ErrorCode::NotEnoughReplicasAfterAppend),
            Code::Unavailable
        );
    }

    /// An internal failure's detail stays in the broker's log, on every
    /// path that answers a client.
    #[test]
    fn internal_details_are_not_shown() {
        let e = BrokerError::Storage(StorageError::Io {
            path: "/data/t-0/0.log".into(),
            source: std::io::Error::other("No space left on device"),
        });
        let message = e.client_message();
        assert!(!message.contains("/data"), "{message}");
        assert_eq!(message, "internal broker error (STORAGE_ERROR)");
    }

    /// A batch written whose fsync then failed may be stored: answered
    /// retriable (NOT_LEADER, as a leader that stopped after its append),
    /// not STORAGE_ERROR, which the client takes as final; its detail
    /// stays in the broker's log too.
    #[test]
    fn a_failure_after_the_write_is_retriable_and_maybe_stored() {
        let e = BrokerError::Storage(StorageError::FailedAfterWrite(Box::new(StorageError::Io {
            path: "/data/t-0/0.log".into(),
            source: std::io::Error::other("Input/output error"),
        })));
        assert_eq!(e.code(), ErrorCode::NotLeader);
        assert!(!e.client_message().contains("/data"));
    }
}
