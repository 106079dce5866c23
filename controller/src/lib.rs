//! Runnel's cluster metadata: what brokers, topics and partitions exist,
//! who leads each partition, and in which epoch.
//!
//! Where it sits on the data path: at the bottom of the control plane. The
//! broker's admin service turns requests into [`MetadataCommand`]s and
//! submits them to a [`MetadataStore`]; the store orders them, applies them
//! to the [`ClusterMetadata`] state machine and publishes each new state to
//! the broker, which opens or closes partition logs to match. Record bytes
//! never pass through here.
//!
//! Layout
//! - [`metadata`]: the state (brokers, topics, partitions) and `apply`.
//! - [`command`]: the typed commands, the only way state changes.
//! - [`topic_config`]: topic config keys, defaults and validation.
//! - [`security`]: users, ACLs (and their matcher) and quotas.
//! - [`store`]: the [`MetadataStore`] interface every store implements.
//! - [`raft`]: [`RaftMetadataStore`], the openraft quorum (sled log and
//!   state machine, tonic transport, broker heartbeats and fencing)
//!   behind the `MetadataStore` trait.
//! - `error`: [`MetadataError`].
//!
//! ```
//! use runnel_controller::{ClusterMetadata, MetadataCommand};
//! let mut state = ClusterMetadata::new("cluster-a");
//! state.apply(MetadataCommand::RegisterBroker {
//!     id: 1, address: "127.0.0.1:9092".into(), rack: String::new(),
//!     roles: vec!["broker".into()], incarnation: String::new(),
//! }).unwrap();
//! state.apply(MetadataCommand::CreateTopic {
//!     name: "events".into(), topic_id: "t-1".into(), partitions: 3,
//!     replication_factor: 1, configs: Default::default(),
//! }).unwrap();
//! assert_eq!(state.topics["events"].partitions.len(), 3);
//! assert_eq!(state.topics["events"].partitions[0].leader, 1);
//! ```

pub mod command;
pub mod error;
pub mod metadata;
pub mod raft;
pub mod security;
pub mod store;
pub mod topic_config;

pub use command::MetadataCommand;
pub use error::MetadataError;
pub use metadata::{BrokerInfo, ClusterMetadata, PartitionInfo, TopicInfo};
pub use raft::{RaftConfig, RaftMetadataStore};
pub use store::{MetadataStore, QuorumStatus};
