//! Every partition log of one broker under one data directory, in
//! `DATA_DIR/<topic>-<partition>/`.
//!
//! Topic names match `[a-zA-Z0-9._-]+`; the partition is the number after
//! the *last* `-`. Other files and directories in the data directory (a
//! `meta` dir, lock files) are ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::index_file::io_err;
use crate::{Log, LogConfig, Result, StorageError};

/// Opens, creates and deletes partition logs.
#[derive(Debug)]
pub struct LogManager {
    data_dir: PathBuf,
    default_config: LogConfig,
    logs: RwLock<BTreeMap<(String, i32), Arc<Log>>>,
}

/// True for names matching `[a-zA-Z0-9._-]+`.
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Splits `<topic>-<partition>` at the last '-'.
pub fn parse_partition_dir(name: &str) -> Option<(String, i32)> {
    let (topic, partition) = name.rsplit_once('-')?;
    if !is_valid_topic_name(topic)
        || partition.is_empty()
        || !partition.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((topic.to_string(), partition.parse().ok()?))
}

impl LogManager {
    /// Opens every `<topic>-<partition>` directory under `data_dir` with
    /// `default_config` (callers fix configs later with `Log::set_config`).
    pub fn open(data_dir: impl Into<PathBuf>, default_config: LogConfig) -> Result<LogManager> {
        let data_dir = data_dir.into();
        std::fs::create_dir_all(&data_dir).map_err(io_err(&data_dir))?;
        let mut logs = BTreeMap::new();
        for entry in std::fs::read_dir(&data_dir).map_err(io_err(&data_dir))? {
            let entry = entry.map_err(io_err(&data_dir))?;
            let is_dir = entry.file_type().map_err(io_err(&entry.path()))?.is_dir();
            let Some((topic, partition)) = entry.file_name().to_str().and_then(parse_partition_dir)
            else {
                continue;
            };
            if !is_dir {
                continue;
            }
            let log = Log::open(entry.path(), default_config.clone())?;
            logs.insert((topic, partition), Arc::new(log));
        }
        Ok(LogManager {
            data_dir,
            default_config,
            logs: RwLock::new(logs),
        })
    }

    /// The config new logs get when opened from disk.
    pub fn default_config(&self) -> &LogConfig {
        &self.default_config
    }

    /// The directory of a partition's log.
    pub fn partition_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.data_dir.join(format!("{topic}-{partition}"))
    }

    pub fn get(&self, topic: &str, partition: i32) -> Option<Arc<Log>> {
        self.logs
            .read()
            .expect("logs lock")
            .get(&(topic.to_string(), partition))
            .cloned()
    }
    /// Returns the existing log or creates an empty one with `config`.
    pub fn get_or_create(
        &self,
        topic: &str,
        partition: i32,
        config: LogConfig,
    ) -> Result<Arc<Log>> {
        if let Some(log) = self.get(topic, partition) {
            return Ok(log);
        }
        if !is_valid_topic_name(topic) || partition < 0 {
            return Err(StorageError::InvalidPartition {
                topic: topic.to_string(),
                partition,
            });
        }
        let mut logs = self.logs.write().expect("logs lock");
        if let Some(log) = logs.get(&(topic.to_string(), partition)) {
            return Ok(log.clone());
        }
        let log = Arc::new(Log::open(self.partition_dir(topic, partition), config)?);
        logs.insert((topic.to_string(), partition), log.clone());
        Ok(log)
    }
    /// Closes and removes the partition's directory.
    pub fn delete(&self, topic: &str, partition: i32) -> Result<()> {
        let removed = self
            .logs
            .write()
            .expect("logs lock")
            .remove(&(topic.to_string(), partition));
        if let Some(log) = removed {
            match log.close() {
                Ok(()) | Err(StorageError::Closed { .. }) => {}
                Err(e) => return Err(e),
            }
            let dir = log.dir().to_path_buf();
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }
    /// Every open log, with its topic and partition.
    pub fn all(&self) -> Vec<(String, i32, Arc<Log>)> {
        self.logs
            .read()
            .expect("logs lock")
            .iter()
            .map(|((t, p), l)| (t.clone(), *p, l.clone()))
            .collect()
    }
    /// Runs `Log::tick` on every log.
    pub fn tick(&self, now_ms: i64) -> Result<()> {
        let mut first_error = None;
        for (topic, partition, log) in self.all() {
            if let Err(e) = log.tick(now_ms) {
                tracing::warn!(topic, partition, error = %e, "log tick failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
    /// Starts write-back of every log's recent appends
    /// ([`Log::start_writeback`]); runs several times a second, so it
    /// clones no names. Returns how many logs failed to start it. Write-back
    /// is advisory: a failure loses nothing (flushes report I/O errors), so
    /// each is only logged at debug level.
    pub fn start_writeback(&self) -> usize {
        let logs: Vec<Arc<Log>> = self
            .logs
            .read()
            .expect("logs lock")
            .values()
            .cloned()
            .collect();
        let mut failed = 0;
        for log in logs {
            if let Err(e) = log.start_writeback() {
                tracing::debug!(dir = %log.dir().display(), error = %e, "starting write-back failed");
                failed += 1;
            }
        }
        failed
    }

    /// Flushes and closes every log.
    pub fn close(&self) -> Result<()> {
        let mut first_error = None;
        for (_, _, log) in self.all() {
            match log.close() {
                Ok(()) | Err(StorageError::Closed { .. }) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BatchBuilder;

    #[test]
    fn parses_dir_names() {
        assert_eq!(parse_partition_dir("a-b-3"), Some(("a-b".into(), 3)));
        assert_eq!(
            parse_partition_dir("orders.v1_x-10"),
            Some(("orders.v1_x".into(), 10))
        );
        assert_eq!(parse_partition_dir("meta"), None);
        assert_eq!(parse_partition_dir("-3"), None);
        assert_eq!(parse_partition_dir("t-"), None);
        assert_eq!(parse_partition_dir("t-x"), None);
        assert_eq!(parse_partition_dir("bad name-1"), None);
    }

    #[test]
    fn open_create_reopen_delete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("meta")).unwrap();
        std::fs::write(dir.path().join("cluster-id"), b"x").unwrap();
        let m = LogManager::open(dir.path(), LogConfig::default()).unwrap();
        assert!(m.get("t", 0).is_none());
        let log = m.get_or_create("t-x", 2, LogConfig::default()).unwrap();
        let mut b = BatchBuilder::new();
        b.push(1, None, Some(b"v"), &[]);
        log.append_as_leader(b.build(), 0).unwrap();
        assert!(m
            .get_or_create("bad/name", 0, LogConfig::default())
            .is_err());
        m.close().unwrap();
        drop((m, log));
        let m = LogManager::open(dir.path(), LogConfig::default()).unwrap();
        let all = m.all();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].0.as_str(), all[0].1), ("t-x", 2));
        assert_eq!(all[0].2.log_end_offset(), 1);
        m.tick(0).unwrap();
        m.delete("t-x", 2).unwrap();
        assert!(m.get("t-x", 2).is_none());
        assert!(!dir.path().join("t-x-2").exists());
        assert!(dir.path().join("meta").exists());
    }
}
