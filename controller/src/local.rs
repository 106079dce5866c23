//! A single-node metadata store: the state machine persisted to one JSON
//! file (`DATA_DIR/meta/metadata.json`), replaced atomically (write to a
//! temporary file, fsync, rename, fsync the directory) after every command.
//! Used by single-node clusters until the Raft quorum store exists.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::metadata::Applied;
use crate::store::{random_id, BoxFuture};
use crate::{ClusterMetadata, MetadataCommand, MetadataError, MetadataStore};

/// File name of the persisted state inside the meta directory.
const STATE_FILE: &str = "metadata.json";

/// The single-node store.
#[derive(Debug)]
pub struct LocalMetadataStore {
    /// `DATA_DIR/meta`.
    dir: PathBuf,
    /// This node's id; it is the controller.
    node_id: i32,
    /// Serialises writers; never held across an await.
    state: Mutex<ClusterMetadata>,
    tx: watch::Sender<Arc<ClusterMetadata>>,
}

impl LocalMetadataStore {
    /// Opens the store in `dir`, formatting it with a new cluster id if it
    /// is empty.
    pub fn open(dir: impl Into<PathBuf>, node_id: i32) -> Result<Self, MetadataError> {
        let dir = dir.into();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MetadataError::Persist { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let file = dir.join(STATE_FILE);
        let state = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| MetadataError::Corrupt {
                path: file.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = ClusterMetadata::new(random_id());
                persist(&dir, &state)?;
                state
            }
            Err(e) => return Err(io(&file)(e)),
        };
        let (tx, _) = watch::channel(Arc::new(state.clone()));
        Ok(Self {
            dir,
            node_id,
            state: Mutex::new(state),
            tx,
        })
    }

    fn submit_sync(&self, cmd: MetadataCommand) -> Result<Applied, MetadataError> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = guard.clone();
        let applied = next.apply(cmd)?;
        persist(&self.dir, &next)?;
        *guard = next.clone();
        self.tx.send_replace(Arc::new(next));
        Ok(applied)
    }
}

fn persist(dir: &Path, state: &ClusterMetadata) -> Result<(), MetadataError> {
    let file = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MetadataError::Persist { path, source }
    };
    let bytes = serde_json::to_vec_pretty(state).expect("metadata serialises");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(err(&tmp))?;
        f.write_all(&bytes).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
    }
    std::fs::rename(&tmp, &file).map_err(err(&file))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir))?;
    Ok(())
}

impl MetadataStore for LocalMetadataStore {
    fn current(&self) -> Arc<ClusterMetadata> {
        self.tx.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Arc<ClusterMetadata>> {
        self.tx.subscribe()
    }

    fn submit(&self, cmd: MetadataCommand) -> BoxFuture<'_, Result<Applied, MetadataError>> {
        // The write is a few KiB with two fsyncs: run it off the runtime.
        Box::pin(async move { tokio::task::block_in_place(|| self.submit_sync(cmd)) })
    }

    fn controller_id(&self) -> i32 {
        self.node_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(id: i32) -> MetadataCommand {
        MetadataCommand::RegisterBroker {
            id,
            address: "127.0.0.1:9092".into(),
            rack: String::new(),
            roles: vec!["broker".into()],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn state_survives_reopen_and_refusals_are_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalMetadataStore::open(dir.path(), 1).unwrap();
        let cluster_id = store.current().cluster_id.clone();
        let rx = store.watch();
        store.submit(register(1)).await.unwrap();
        assert!(rx.has_changed().unwrap());
        store
            .submit(MetadataCommand::CreateTopic {
                name: "t".into(),
                topic_id: "x".into(),
                partitions: 2,
                replication_factor: 1,
                configs: Default::default(),
            })
            .await
            .unwrap();
        let err = store
            .submit(MetadataCommand::DeleteTopic {
                name: "nope".into(),
            })
            .await
            .unwrap_err();
        assert!(matches!(err, MetadataError::UnknownTopic { .. }));
        let before = store.current();
        drop(store);

        let store = LocalMetadataStore::open(dir.path(), 1).unwrap();
        assert_eq!(store.current().cluster_id, cluster_id);
        assert_eq!(*store.current(), *before);
        assert_eq!(store.current().topics["t"].partitions.len(), 2);
    }

    #[test]
    fn corrupt_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = LocalMetadataStore::open(dir.path(), 1).unwrap_err();
        assert!(err.to_string().contains("metadata.json"), "{err}");
    }
}
