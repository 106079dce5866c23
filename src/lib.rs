//! The `runnel` broker and its client library.
//!
//! Where it sits on the data path: at the top. Clients reach the gRPC
//! services in [`service`]; they call the [`broker::Broker`], which routes
//! each (topic, partition) to the partition's log in `runnel-storage` and
//! keeps hosted partitions in step with the metadata in
//! `runnel-controller`. The [`client`] module is the Rust client the CLI is
//! built on.
//!
//! Layout
//! - [`config`]: the server's TOML configuration and its validation.
//! - [`server`]: starts the listener and serves every service.
//! - [`broker`]: the request logic (produce, fetch, admin).
//! - [`partition`]: a hosted partition and topic-config → storage mapping.
//! - [`partitioner`]: Kafka-compatible murmur2 key hashing.
//! - [`service`]: tonic adapters.
//! - [`rpc`]: the calls that carry record batches (produce stream,
//!   replica fetch, consumer fetch), framed without tonic's codec copies.
//! - [`replica`]: replication I/O: the leader's `Replication` service and
//!   the follower fetchers.
//! - [`group`]: consumer groups: assignors, group state machine and the
//!   coordinator.
//! - [`metrics`]: Prometheus metrics (event counters on the request path,
//!   state gauges computed at scrape time) and the HTTP endpoint serving
//!   them with `/health` and `/ready`.
//! - [`security`]: TLS, authentication, ACL checks and quotas.
//! - [`error`]: [`error::BrokerError`] and the one mapping to gRPC status.
//! - [`client`]: producer (batching, linger), consumer and admin clients.

pub mod broker;
pub mod client;
pub mod config;
pub mod error;
pub mod group;
pub mod metrics;
pub mod partition;
pub mod partitioner;
pub mod replica;
pub mod rpc;
pub mod security;
pub mod server;
pub mod service;
