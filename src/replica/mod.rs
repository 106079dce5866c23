//! Replication's I/O: the leader side (`Replication` gRPC service, in
//! [`service`]) and the follower side (one fetcher task per leader
//! broker, in [`fetcher`]). The decisions — high watermark, ISR changes,
//! where to truncate — are made by the pure state machines of the
//! `runnel-replication` crate.

pub mod fetcher;
pub mod service;

pub use fetcher::FetcherManager;
pub use service::ReplicationService;
