//! The Raft state machine: [`ClusterMetadata`] plus the last applied log id
//! and membership, saved to sled tree `state_machine` after every applied
//! batch (key `state`), with the latest snapshot under key `snapshot`.
//! A snapshot's data is the JSON of [`ClusterMetadata`].
//!
//! Every applied state is published on a `watch` channel, on voters and
//! learners alike.

// openraft's `StorageError` is large, and its traits return it unboxed.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::cluster_id::ClusterIdGuard;
use super::type_config::{CommandResponse, Entry, NodeId, StorageError, TypeConfig};
use crate::ClusterMetadata;

const STATE: &str = "state";
const SNAPSHOT: &str = "snapshot";
/// Applied entries between two saves of the whole state. The Raft log is
/// the durable record: after a restart openraft re-applies the committed
/// entries after the saved `last_applied`, so saving less often only
/// costs replay time. Logs are purged only up to a snapshot, and the
/// state is saved whenever a snapshot is taken, so the entries after the
/// saved state are always still in the log.
const SAVE_EVERY: u64 = 256;

/// What the state machine persists.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoredState {
    /// The last log entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The membership as of `last_applied`.
    pub last_membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// The metadata.
    pub metadata: ClusterMetadata,
}

/// A snapshot as stored in sled.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    /// JSON of [`ClusterMetadata`].
    data: Vec<u8>,
}

/// The state machine handed to openraft.
#[derive(Debug)]
pub struct MetadataStateMachine {
    tree: sled::Tree,
    state: StoredState,
    tx: watch::Sender<Arc<ClusterMetadata>>,
    cluster_id: Arc<ClusterIdGuard>,
    /// Entries applied since the state was last saved.
    unsaved: u64,
}

impl MetadataStateMachine {
    /// Loads the saved state from `db` and publishes it on `tx`.
    pub fn open(
        db: &sled::Db,
        tx: watch::Sender<Arc<ClusterMetadata>>,
        cluster_id: Arc<ClusterIdGuard>,
    ) -> Result<Self, String> {
        let tree = db.open_tree("state_machine").map_err(|e| e.to_string())?;
        let state: StoredState = match tree.get(STATE).map_err(|e| e.to_string())? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string())?,
            None => StoredState::default(),
        };
        let sm = Self {
            tree,
            state,
            tx,
            cluster_id,
            unsaved: 0,
        };
        sm.publish();
        Ok(sm)
    }

    fn publish(&self) {
        self.cluster_id.observe(&self.state.metadata.cluster_id);
        self.tx.send_replace(Arc::new(self.state.metadata.clone()));
    }

    fn save(&mut self) -> Result<(), StorageError> {
        self.unsaved = 0;
        let bytes =
            serde_json::to_vec(&self.state).map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.tree
            .insert(STATE, bytes)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(())
    }
}

/// Builds a snapshot from a copy of the state taken when openraft asked.
#[derive(Debug)]
pub struct SnapshotBuilder {
    tree: sled::Tree,
    state: StoredState,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = serde_json::to_vec(&self.state.metadata)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let snapshot_id = match &self.state.last_applied {
            Some(id) => format!(
                "{}-{}-{}",
                id.leader_id.term, id.index, self.state.metadata.applied
            ),
            None => format!("0-0-{}", self.state.metadata.applied),
        };
        let meta = SnapshotMeta {
            last_log_id: self.state.last_applied,
            last_membership: self.state.last_membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let bytes = serde_json::to_vec(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.tree
            .insert(SNAPSHOT, bytes)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MetadataStateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::BasicNode>,
        ),
        StorageError,
    > {
        Ok((self.state.last_applied, self.state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for entry in entries {
            self.unsaved += 1;
            self.state.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(crate::metadata::Applied::Done),
                EntryPayload::Membership(m) => {
                    self.state.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(crate::metadata::Applied::Done)
                }
                EntryPayload::Normal(cmd) => {
                    tracing::debug!(index = entry.log_id.index, ?cmd, "apply");
                    self.state.metadata.apply(cmd).map_err(Into::into)
                }
            };
            out.push(CommandResponse {
                result,
                applied: self.state.metadata.applied,
            });
        }
        if self.unsaved >= SAVE_EVERY {
            self.save()?;
        }
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The logs up to the snapshot may be purged once it is built: the
        // saved state must not be older than it.
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "saving the state machine before a snapshot failed");
        }
        SnapshotBuilder {
            tree: self.tree.clone(),
            state: self.state.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let metadata: ClusterMetadata = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.state = StoredState {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            metadata,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let bytes = serde_json::to_vec(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.tree
            .insert(SNAPSHOT, bytes)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.save()?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(bytes) = self
            .tree
            .get(SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot =
            serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
