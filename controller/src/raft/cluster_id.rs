//! The cluster id a data directory belongs to, kept in `DIR/cluster_id`.
//!
//! A fresh directory learns the id from the first applied state (the
//! `InitCluster` command or a snapshot) and records it; from then on a node
//! that sees another id (its config says otherwise, or a peer belongs to
//! another cluster) refuses to serve.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::MetadataError;

/// File name inside the meta directory.
pub const CLUSTER_ID_FILE: &str = "cluster_id";

/// The recorded cluster id and any mismatch seen since start.
#[derive(Debug)]
pub struct ClusterIdGuard {
    path: PathBuf,
    /// The id this node belongs to: recorded, configured, or learned.
    expected: Mutex<Option<String>>,
    /// Set when the applied state names another cluster; fatal.
    mismatch: Mutex<Option<(String, String)>>,
}

impl ClusterIdGuard {
    /// Reads `dir/cluster_id`; refuses when it differs from `configured`.
    pub fn open(dir: &Path, configured: Option<&str>) -> Result<Self, MetadataError> {
        let path = dir.join(CLUSTER_ID_FILE);
        let recorded = match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(MetadataError::Persist { path, source }),
        };
        if let (Some(found), Some(expected)) = (&recorded, configured) {
            if found != expected {
                return Err(MetadataError::ClusterIdMismatch {
                    expected: expected.to_string(),
                    found: found.clone(),
                });
            }
        }
        let expected = recorded.or_else(|| configured.map(str::to_string));
        Ok(Self {
            path,
            expected: Mutex::new(expected),
            mismatch: Mutex::new(None),
        })
    }

    /// The id this node belongs to, or empty while it is not known.
    pub fn get(&self) -> String {
        lock(&self.expected).clone().unwrap_or_default()
    }

    /// Called with every applied state's cluster id: records a new one,
    /// flags a different one.
    pub fn observe(&self, cluster_id: &str) {
        if cluster_id.is_empty() {
            return;
        }
        let mut expected = lock(&self.expected);
        match expected.as_deref() {
            Some(e) if e == cluster_id => {
                if !self.path.exists() {
                    self.write(cluster_id);
                }
            }
            Some(e) => {
                tracing::error!(
                    expected = e,
                    found = cluster_id,
                    "metadata belongs to another cluster"
                );
                *lock(&self.mismatch) = Some((e.to_string(), cluster_id.to_string()));
            }
            None => {
                self.write(cluster_id);
                *expected = Some(cluster_id.to_string());
            }
        }
    }

    fn write(&self, cluster_id: &str) {
        let tmp = self.path.with_extension("tmp");
        let res = std::fs::write(&tmp, cluster_id)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(error) = res {
            tracing::error!(%error, path = %self.path.display(), "could not record the cluster id");
        }
    }

    /// The mismatch seen, as the error `submit` returns.
    pub fn check(&self) -> Result<(), MetadataError> {
        match lock(&self.mismatch).clone() {
            Some((expected, found)) => Err(MetadataError::ClusterIdMismatch { expected, found }),
            None => Ok(()),
        }
    }

    /// Whether a peer claiming `theirs` may talk to this node.
    pub fn accepts(&self, theirs: &str) -> bool {
        let mine = self.get();
        mine.is_empty() || theirs.is_empty() || mine == theirs
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_id_and_flags_another() {
        let dir = tempfile::tempdir().unwrap();
        let guard = ClusterIdGuard::open(dir.path(), None).unwrap();
        assert_eq!(guard.get(), "");
        guard.observe("a");
        guard.observe("a");
        guard.check().unwrap();
        guard.observe("b");
        assert!(matches!(
            guard.check(),
            Err(MetadataError::ClusterIdMismatch { .. })
        ));
        assert!(guard.accepts("a") && guard.accepts("") && !guard.accepts("b"));

        let reopened = ClusterIdGuard::open(dir.path(), Some("a")).unwrap();
        assert_eq!(reopened.get(), "a");
        let err = ClusterIdGuard::open(dir.path(), Some("c")).unwrap_err();
        assert!(
            matches!(&err, MetadataError::ClusterIdMismatch { expected, found } if expected == "c" && found == "a"),
            "{err}"
        );
    }
}
