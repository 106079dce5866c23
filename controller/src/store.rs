//! The interface between the broker and whatever holds the metadata (the
//! Raft quorum, [`crate::RaftMetadataStore`]), so the broker can be tested
//! and reasoned about without Raft.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use crate::metadata::Applied;
use crate::{ClusterMetadata, MetadataCommand, MetadataError};

/// A boxed future, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The metadata quorum as one node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuorumStatus {
    /// Raft term.
    pub term: u64,
    /// Voting members.
    pub voters: Vec<i32>,
    /// Non-voting members (broker-only nodes).
    pub learners: Vec<i32>,
    /// Index of the last entry in this node's log.
    pub last_log_index: u64,
    /// Index of the last entry applied to this node's state machine.
    pub applied_index: u64,
    /// On the active controller: the highest index a majority of voters
    /// holds (committed). `None` elsewhere: followers only learn it
    /// through what they apply.
    pub committed_index: Option<u64>,
    /// On the active controller: each other member's lag in entries
    /// (`None` when the member has not acknowledged anything yet).
    pub lag: std::collections::BTreeMap<i32, Option<u64>>,
    /// On the active controller: milliseconds since a majority of voters
    /// last acknowledged it (`None` elsewhere, or before the first
    /// acknowledgement). A leader cut off from the other voters stays
    /// leader in its own eyes; this is how it can tell.
    pub millis_since_quorum_ack: Option<u64>,
}

/// Orders metadata commands, applies them, makes them durable, and
/// publishes every new state.
pub trait MetadataStore: Send + Sync + 'static {
    /// The latest applied state.
    fn current(&self) -> Arc<ClusterMetadata>;
    /// A receiver that sees each new state.
    fn watch(&self) -> watch::Receiver<Arc<ClusterMetadata>>;
    /// Applies `cmd` once it is durable; refused commands change nothing.
    /// `NotController` leaves its fate open (see that error).
    fn submit(&self, cmd: MetadataCommand) -> BoxFuture<'_, Result<Applied, MetadataError>>;
    /// Broker id of the active controller, or -1 when there is none.
    fn controller_id(&self) -> i32;
    /// The quorum's membership and progress, as this node sees it.
    fn quorum(&self) -> QuorumStatus {
        QuorumStatus::default()
    }
}

/// A random 128-bit id as 32 hex digits (cluster and topic ids).
pub fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(32);
    for salt in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}
