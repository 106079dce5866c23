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
use std::sync::{Arc, Mutex};

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
    /// One past the index of the last entry the durably saved state
    /// covers (0: none saved). The log store purges no entry at or after
    /// it: a restart re-applies from the saved state, so those entries
    /// must still be there ([`super::log_store::SledLogStore::limit_purges`]).
    saved: watch::Sender<u64>,
    /// The state as last saved and flushed (what a snapshot covers when a
    /// save fails: the tree may hold an unflushed newer one).
    durable: StoredState,
    /// Serialises snapshot writes: a snapshot built from an older state
    /// never replaces a newer one installed meanwhile.
    snapshot_lock: Arc<Mutex<()>>,
}

/// One past `log_id`'s index (0 for none).
fn covered(log_id: Option<&LogId<NodeId>>) -> u64 {
    log_id.map_or(0, |id| id.index + 1)
}

/// Writes `stored` as the current snapshot unless the one stored covers
/// more of the log.
fn store_snapshot(
    tree: &sled::Tree,
    lock: &Mutex<()>,
    stored: &StoredSnapshot,
) -> Result<(), StorageError> {
    let meta = &stored.meta;
    let write_err =
        |e: openraft::AnyError| StorageIOError::write_snapshot(Some(meta.signature()), e);
    let _one = lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bytes) = tree
        .get(SNAPSHOT)
        .map_err(|e| write_err(openraft::AnyError::new(&e)))?
    {
        if let Ok(current) = serde_json::from_slice::<StoredSnapshot>(&bytes) {
            if current.meta.last_log_id > meta.last_log_id {
                tracing::debug!(kept = ?current.meta.last_log_id, dropped = ?meta.last_log_id, "a newer snapshot is stored already");
                return Ok(());
            }
        }
    }
    let bytes = serde_json::to_vec(stored).map_err(|e| write_err(openraft::AnyError::new(&e)))?;
    tree.insert(SNAPSHOT, bytes)
        .map_err(|e| write_err(openraft::AnyError::new(&e)))?;
    Ok(())
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
        let saved = watch::Sender::new(covered(state.last_applied.as_ref()));
        let durable = state.clone();
        let sm = Self {
            tree,
            state,
            tx,
            cluster_id,
            unsaved: 0,
            saved,
            durable,
            snapshot_lock: Arc::new(Mutex::new(())),
        };
        sm.publish();
        Ok(sm)
    }

    fn publish(&self) {
        self.cluster_id.observe(&self.state.metadata.cluster_id);
        self.tx.send_replace(Arc::new(self.state.metadata.clone()));
    }

    /// How far the durably saved state reaches (see the field).
    pub fn saved(&self) -> watch::Receiver<u64> {
        self.saved.subscribe()
    }

    /// Saves the state and flushes it: only then may the log store purge
    /// the entries it covers.
    async fn save(&mut self) -> Result<(), StorageError> {
        self.unsaved = 0;
        let bytes =
            serde_json::to_vec(&self.state).map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.tree
            .insert(STATE, bytes)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        // Awaited, not blocking: sled's flush is an fsync of the whole
        // database, which under broker write load took a runtime worker
        // (serving gRPC calls) for hundreds of milliseconds.
        self.tree
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.durable = self.state.clone();
        self.saved
            .send_replace(covered(self.state.last_applied.as_ref()));
        Ok(())
    }
}

/// Builds a snapshot from a copy of the state taken when openraft asked.
#[derive(Debug)]
pub struct SnapshotBuilder {
    tree: sled::Tree,
    state: StoredState,
    snapshot_lock: Arc<Mutex<()>>,
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
        store_snapshot(&self.tree, &self.snapshot_lock, &stored)?;
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
            self.save().await?;
        }
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The logs up to the snapshot may be purged once it is built: the
        // saved state must not be older than it.
        let state = match self.save().await {
            Ok(()) => self.state.clone(),
            Err(e) => {
                // The snapshot covers what is saved, no more: openraft
                // purges up to the snapshot, and a purge past the saved
                // state waits for a save (then stops Raft after a minute).
                tracing::error!(error = %e, "saving the state machine before a snapshot failed; snapshotting the state saved before");
                self.durable.clone()
            }
        };
        SnapshotBuilder {
            tree: self.tree.clone(),
            state,
            snapshot_lock: self.snapshot_lock.clone(),
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
        // The state and the snapshot in one atomic batch: stored apart,
        // a crash between them left either the snapshot without the state
        // it covers (a restart took it as installed over an older state;
        // openraft ignores a resent snapshot that is not newer), or the
        // state without it, over an older snapshot than the log purged at
        // restart, which this node, leading later, sent again and again to
        // a follower needing the entries between the two.
        let write_err = |e: &dyn std::fmt::Display| {
            StorageIOError::write_snapshot(Some(meta.signature()), openraft::AnyError::error(e))
        };
        let state_bytes =
            serde_json::to_vec(&self.state).map_err(|e| StorageIOError::write_state_machine(&e))?;
        let snapshot_bytes = serde_json::to_vec(&stored).map_err(|e| write_err(&e))?;
        {
            let _one = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
            let newer_stored = self
                .tree
                .get(SNAPSHOT)
                .map_err(|e| write_err(&e))?
                .and_then(|b| serde_json::from_slice::<StoredSnapshot>(&b).ok())
                .is_some_and(|current| current.meta.last_log_id > meta.last_log_id);
            let mut batch = sled::Batch::default();
            batch.insert(STATE, state_bytes);
            if !newer_stored {
                batch.insert(SNAPSHOT, snapshot_bytes);
            }
            self.tree.apply_batch(batch).map_err(|e| write_err(&e))?;
        }
        self.tree.flush_async().await.map_err(|e| write_err(&e))?;
        self.unsaved = 0;
        self.durable = self.state.clone();
        self.saved
            .send_replace(covered(self.state.last_applied.as_ref()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(index: u64) -> StoredSnapshot {
        StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
                last_membership: StoredMembership::default(),
                snapshot_id: format!("s{index}"),
            },
            data: Vec::new(),
        }
    }

    /// A snapshot built from an older state (openraft builds in a task of
    /// its own) does not replace a newer one installed meanwhile.
    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("state_machine").unwrap();
        let lock = Mutex::new(());
        let stored = |tree: &sled::Tree| {
            let bytes = tree.get(SNAPSHOT).unwrap().unwrap();
            serde_json::from_slice::<StoredSnapshot>(&bytes)
                .unwrap()
                .meta
                .snapshot_id
        };
        store_snapshot(&tree, &lock, &snapshot(9000)).unwrap();
        store_snapshot(&tree, &lock, &snapshot(5000)).unwrap();
        assert_eq!(stored(&tree), "s9000");
        store_snapshot(&tree, &lock, &snapshot(9500)).unwrap();
        assert_eq!(stored(&tree), "s9500");
    }
}
