//! gRPC services: thin adapters from tonic to [`crate::broker::Broker`].
//! Errors become statuses here, once (see [`crate::error`]).

mod admin;
mod consumer;
mod groups;
mod producer;
mod security;

pub use admin::AdminService;
pub use consumer::{consumer_server, ConsumerService, FETCH_PATH, SUBSCRIBE_PATH};
pub use groups::GroupsService;
pub use producer::{producer_server, ProducerService, PRODUCE_STREAM_PATH};
pub use security::SecurityService;

pub(crate) use producer::async_stream;

use crate::error::BrokerError;

/// Counts a produce or fetch refused here, before the broker (no access,
/// the internal topic, a request that could not be read), in
/// `runnel_request_errors_total` as the broker counts its own refusals:
/// clients were refused while the counter stayed flat.
fn counted<T>(
    broker: &crate::broker::Broker,
    request: &str,
    result: Result<T, tonic::Status>,
) -> Result<T, tonic::Status> {
    if let Err(status) = &result {
        broker
            .metrics()
            .request_error(request, crate::error::error_code_of(status));
    }
    result
}

/// Refuses a client's `operation` on an internal topic, as Kafka does
/// with INVALID_TOPIC: the group coordinator alone creates and writes
/// `__consumer_offsets`, deleting it or its records loses every group's
/// committed offsets, and its partition count decides which partition
/// (and coordinator) each group has.
fn refuse_internal(topic: &str, operation: &'static str) -> Result<(), BrokerError> {
    if topic == crate::group::OFFSETS_TOPIC {
        return Err(BrokerError::InternalTopic {
            topic: topic.to_string(),
            operation,
        });
    }
    Ok(())
}
