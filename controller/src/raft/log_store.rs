//! The Raft log, vote and commit index in sled.
//!
//! Tree `raft_log`: key = log index (u64, big endian, so sled's order is
//! log order), value = the JSON entry. Tree `raft_meta`: `vote`,
//! `committed` and `last_purged`, JSON. Appends and votes are flushed
//! before openraft is told they are durable.

// openraft's `StorageError` is large, and its traits return it unboxed.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::time::Duration;

use tokio::sync::watch;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogId, LogState, RaftLogId, RaftLogReader, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::type_config::{Entry, NodeId, StorageError, TypeConfig};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
/// Longest a purge waits for the state machine to save what it removes.
const PURGE_WAIT: Duration = Duration::from_secs(60);

/// The sled-backed log store; cheap to clone (sled handles are shared).
#[derive(Clone, Debug)]
pub struct SledLogStore {
    db: sled::Db,
    logs: sled::Tree,
    meta: sled::Tree,
    /// See [`SledLogStore::limit_purges`].
    purge_limit: Option<watch::Receiver<u64>>,
}

impl SledLogStore {
    /// Opens (or creates) the log trees in `db`.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            logs: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
            purge_limit: None,
        })
    }

    /// A purge waits until `saved` (one past the last entry the state
    /// machine's durably saved state covers) passes its purge point.
    /// openraft purges up to a snapshot it is installing while the state
    /// machine is still saving it (on another task); recorded first, a
    /// crash in between left a saved state older than the purged log,
    /// which a restart cannot re-apply. Holding part of the purge back
    /// instead left a hole in the log after the entries appended next.
    /// The state machine never waits on the log store, so this wait ends
    /// when the install is saved.
    pub fn limit_purges(&mut self, saved: watch::Receiver<u64>) {
        self.purge_limit = Some(saved);
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let bytes = self.meta.get(key).map_err(|e| StorageIOError::read(&e))?;
        bytes
            .map(|b| serde_json::from_slice(&b).map_err(|e| StorageIOError::read(&e).into()))
            .transpose()
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush_async().await.map(|_| ())
    }
}

fn decode(bytes: &[u8]) -> Result<Entry, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageIOError::read_logs(&e).into())
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.logs.range(start.to_be_bytes()..) {
            let (key, value) = kv.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = u64::from_be_bytes(key.as_ref().try_into().expect("8-byte log key"));
            if !range.contains(&index) {
                break;
            }
            out.push(decode(&value)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(LAST_PURGED)?;
        let last = self
            .logs
            .last()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        // Entries a crash left below the purge point (it is recorded
        // before they are removed) do not count.
        let last_log_id = match last {
            Some((_, value)) => Some(*decode(&value)?.get_log_id()).max(last_purged_log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        // Not flushed: a lost commit index is learned again from the leader.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&entry.get_log_id().index.to_be_bytes(), bytes);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let flushed = self.flush().await.map_err(std::io::Error::other);
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // Removes `log_id.index` and everything after it.
        let mut batch = sled::Batch::default();
        for kv in self.logs.range(log_id.index.to_be_bytes()..) {
            let (key, _) = kv.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(key);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        if let Some(saved) = &self.purge_limit {
            let mut saved = saved.clone();
            let wanted = log_id.index + 1;
            let waited = tokio::time::timeout(PURGE_WAIT, saved.wait_for(|s| *s >= wanted)).await;
            if !matches!(waited, Ok(Ok(_))) {
                return Err(StorageIOError::write_logs(openraft::AnyError::error(format!(
                    "the state machine did not save its state up to {log_id} within {PURGE_WAIT:?}; not purging"
                )))
                .into());
            }
        }
        // Record the purge point first: a crash in between leaves extra
        // entries, never a hole. It never moves back.
        if self
            .get_meta::<LogId<NodeId>>(LAST_PURGED)?
            .is_none_or(|purged| purged < log_id)
        {
            self.put_meta(LAST_PURGED, &log_id)?;
            self.flush()
                .await
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        let mut batch = sled::Batch::default();
        for kv in self.logs.range(..=log_id.index.to_be_bytes()) {
            let (key, _) = kv.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(key);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::testing::{StoreBuilder, Suite};
    use tokio::sync::watch;

    use super::*;
    use crate::raft::cluster_id::ClusterIdGuard;
    use crate::raft::state_machine::MetadataStateMachine;
    use crate::ClusterMetadata;

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, SledLogStore, MetadataStateMachine, tempfile::TempDir>
        for SledBuilder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, SledLogStore, MetadataStateMachine), StorageError> {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = sled::Config::new()
                .path(dir.path().join("raft"))
                .open()
                .map_err(|e| StorageIOError::write(&e))?;
            let log = SledLogStore::open(&db).map_err(|e| StorageIOError::write(&e))?;
            let guard = Arc::new(ClusterIdGuard::open(dir.path(), None).expect("guard"));
            let (tx, _) = watch::channel(Arc::new(ClusterMetadata::default()));
            let sm = MetadataStateMachine::open(&db, tx, guard)
                .map_err(|e| StorageIOError::write(openraft::AnyError::error(e)))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn sled_store_passes_the_openraft_storage_suite() {
        Suite::test_all(SledBuilder).unwrap();
    }

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(openraft::CommittedLeaderId::new(1, 1), index)
    }

    fn indexes(store: &SledLogStore) -> Vec<u64> {
        store
            .logs
            .iter()
            .map(|kv| u64::from_be_bytes(kv.unwrap().0.as_ref().try_into().unwrap()))
            .collect()
    }

    /// openraft purges up to a snapshot it is installing while the state
    /// machine may not have saved it yet: the purge waits until the saved
    /// state covers it, and records nothing before.
    #[tokio::test]
    async fn a_purge_waits_for_the_saved_state_to_cover_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut store = SledLogStore::open(&db).unwrap();
        let (saved, rx) = watch::channel(0u64);
        store.limit_purges(rx);
        for i in 1..=10 {
            let entry = Entry {
                log_id: log_id(i),
                payload: openraft::EntryPayload::Blank,
            };
            store
                .logs
                .insert(i.to_be_bytes(), serde_json::to_vec(&entry).unwrap())
                .unwrap();
        }
        let mut purging = store.clone();
        let purge = purging.purge(log_id(5));
        tokio::pin!(purge);
        // Saved up to 3: polled once, it waits, having done nothing.
        saved.send_replace(4);
        tokio::select! {
            biased;
            r = &mut purge => panic!("purged before the state was saved: {r:?}"),
            () = std::future::ready(()) => {}
        }
        assert_eq!(indexes(&store), (1..=10).collect::<Vec<_>>());
        assert_eq!(
            store.get_log_state().await.unwrap().last_purged_log_id,
            None
        );
        // Saved up to 5: done.
        saved.send_replace(6);
        purge.await.unwrap();
        assert_eq!(indexes(&store), (6..=10).collect::<Vec<_>>());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(5)));
        assert_eq!(state.last_log_id, Some(log_id(10)));
        // A purge point recorded past the entries left (a crash before
        // they were removed) is the log's end.
        store.put_meta(LAST_PURGED, &log_id(12)).unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(12)));
    }
}
