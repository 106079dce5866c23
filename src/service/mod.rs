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
