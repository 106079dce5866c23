//! gRPC services: thin adapters from tonic to [`crate::broker::Broker`].
//! Errors become statuses here, once (see [`crate::error`]).

mod admin;
mod consumer;
mod groups;
mod producer;

pub use admin::AdminService;
pub use consumer::ConsumerService;
pub use groups::GroupsService;
pub use producer::ProducerService;

pub(crate) use producer::async_stream;
