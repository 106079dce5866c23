//! Every partition log of one broker under one data directory, in
//! `DATA_DIR/<topic>-<partition>/`.
//!
//! Topic names match `[a-zA-Z0-9._-]+`; the partition is the number after
//! the *last* `-`. Other files and directories in the data directory (a
//! `meta` dir, lock files) are ignored.
//!
//! Deleting a partition renames its directory to
//! `<topic>-<partition>.<unique>.deleted` and removes it on a background
//! thread (Kafka renames to `-delete` and deletes later too): removing a
//! partition's files can take hundreds of milliseconds (a reserved 1 GiB
//! spare segment, discards on a file system mounted with `discard`), and
//! the broker deletes from its async runtime, whose every request would
//! wait. A `.deleted` directory found at open is removed the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};

use crate::checkpoint;
use crate::index_file::io_err;
use crate::{Log, LogConfig, Result, StorageError};

/// Opens, creates and deletes partition logs.
#[derive(Debug)]
pub struct LogManager {
    data_dir: PathBuf,
    default_config: LogConfig,
    logs: RwLock<BTreeMap<(String, i32), Arc<Log>>>,
}

/// The file in a partition's directory naming the topic it belongs to
/// (by id).
pub const TOPIC_ID_FILE: &str = "partition.metadata";

/// The topic id a partition directory names, if any.
fn topic_id_of(dir: &Path) -> Result<Option<String>> {
    Ok(checkpoint::read(dir, TOPIC_ID_FILE)?.and_then(|lines| lines.into_iter().next()))
}

/// Suffix of a partition directory that is being deleted.
pub const DELETED_SUFFIX: &str = ".deleted";

/// A directory to remove, and the closed log that lived in it.
type Doomed = (PathBuf, Option<Arc<Log>>);

/// Directories being deleted in the background, and how many are left.
struct Deleter {
    jobs: Option<Mutex<Sender<Doomed>>>,
    pending: Mutex<usize>,
    done: Condvar,
}

fn deleter() -> &'static Deleter {
    static DELETER: OnceLock<Deleter> = OnceLock::new();
    DELETER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Doomed>();
        let jobs = std::thread::Builder::new()
            .name("runnel-delete".into())
            .spawn(move || {
                for (dir, log) in rx {
                    #[cfg(test)]
                    let paused = tests::DELETER_PAUSE.lock();
                    remove_now(&dir, log);
                    #[cfg(test)]
                    drop(paused);
                    let d = deleter();
                    *d.pending.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                    d.done.notify_all();
                }
            })
            .map_err(
                |error| tracing::warn!(%error, "no thread to delete partitions: deleting inline"),
            )
            .ok()
            .map(|_| Mutex::new(tx));
        Deleter {
            jobs,
            pending: Mutex::new(0),
            done: Condvar::new(),
        }
    })
}

/// Removes a renamed partition directory; `log`, the partition's closed
/// log, first waits out a spare reservation under way in it.
fn remove_now(dir: &Path, log: Option<Arc<Log>>) {
    if let Some(log) = log {
        log.wait_out_spare();
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::debug!(dir = %dir.display(), "deleted partition directory"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "could not delete partition directory");
        }
    }
}

/// Queues `dir` for removal on the deleting thread (inline without one).
fn remove_later(dir: PathBuf, log: Option<Arc<Log>>) {
    let d = deleter();
    let Some(jobs) = &d.jobs else {
        return remove_now(&dir, log);
    };
    *d.pending.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let sent = jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((dir, log));
    if let Err(mpsc::SendError((dir, log))) = sent {
        *d.pending.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        remove_now(&dir, log);
    }
}

/// Blocks until every partition directory queued for deletion so far
/// (by any `LogManager` of this process) is gone.
pub fn wait_for_deletions() {
    let d = deleter();
    let mut pending = d.pending.lock().unwrap_or_else(|e| e.into_inner());
    while *pending > 0 {
        pending = d.done.wait(pending).unwrap_or_else(|e| e.into_inner());
    }
}

/// Longest file name the usual file systems take (ext4, xfs, btrfs).
const FILE_NAME_MAX: usize = 255;

/// A fresh name to rename a deleted partition's directory to, which
/// [`parse_partition_dir`] never takes for a partition. The topic part is
/// cut to fit [`FILE_NAME_MAX`] (as Kafka cuts it): a topic name of 249
/// characters leaves no room for the suffix, and a rename failing with
/// "file name too long" left the partition undeletable.
fn deleted_name(topic: &str, partition: i32) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tail = format!("-{partition}.{nanos:x}{n:x}{DELETED_SUFFIX}");
    // Topic names are ASCII: any byte index is a char boundary.
    let keep = topic.len().min(FILE_NAME_MAX.saturating_sub(tail.len()));
    format!("{}{tail}", &topic[..keep])
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
            let name = entry.file_name();
            if is_dir && name.to_str().is_some_and(|n| n.ends_with(DELETED_SUFFIX)) {
                // A deletion the last run did not finish.
                remove_later(entry.path(), None);
                continue;
            }
            let Some((topic, partition)) = name.to_str().and_then(parse_partition_dir) else {
                continue;
            };
            if !is_dir {
                continue;
            }
            // One log that cannot be opened (an unreadable file, a
            // corrupt closed segment) is left out, not the whole node
            // stopped: it stays as it is on disk, and taking the partition
            // up opens it again, reporting the error there.
            match Log::open(entry.path(), default_config.clone()) {
                Ok(log) => {
                    logs.insert((topic, partition), Arc::new(log));
                }
                Err(error) => {
                    tracing::error!(dir = %entry.path().display(), %error, "cannot open the partition's log; left out");
                }
            }
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
    /// The log of `topic`'s `partition` for the topic whose id is
    /// `topic_id`. The partition's directory names the topic it holds
    /// ([`TOPIC_ID_FILE`], Kafka's `partition.metadata`, KIP-516): a
    /// directory of an earlier topic of the same name (deleted and created
    /// again while this broker was away, or between two metadata changes
    /// it saw) is deleted and an empty log created, so that the new topic
    /// never serves the old one's records. A directory that names no topic
    /// (made before ids were kept, or a crash right after creating it) is
    /// taken as this topic's and marked. An empty `topic_id` is not
    /// checked.
    pub fn get_or_create_for(
        &self,
        topic: &str,
        partition: i32,
        topic_id: &str,
        config: LogConfig,
    ) -> Result<Arc<Log>> {
        if topic_id.is_empty() {
            return self.get_or_create(topic, partition, config);
        }
        if self.get(topic, partition).is_none() {
            // A directory on disk but out of the map (it failed to open at
            // startup, or its deletion's rename failed) that names another
            // topic is set aside unopened: opened first, one that failed
            // at startup failed again here, and the new topic was never
            // hosted on this broker.
            let dir = self.partition_dir(topic, partition);
            if topic_id_of(&dir)?.is_some_and(|old| old != topic_id) {
                let logs = self.logs.write().expect("logs lock");
                if !logs.contains_key(&(topic.to_string(), partition)) {
                    tracing::warn!(topic, partition, topic_id, "the partition's directory (not open) holds an earlier topic of this name: deleting it");
                    let doomed = self.data_dir.join(deleted_name(topic, partition));
                    std::fs::rename(&dir, &doomed).map_err(io_err(&dir))?;
                    drop(logs);
                    remove_later(doomed, None);
                }
            }
        }
        // Open or not: a directory left on disk but out of the map (its
        // deletion's rename failed) is checked as an open log is.
        let mut log = self.get_or_create(topic, partition, config.clone())?;
        match topic_id_of(log.dir())? {
            Some(id) if id == topic_id => return Ok(log),
            Some(old) => {
                tracing::warn!(topic, partition, old_topic_id = %old, topic_id, "the partition's directory holds an earlier topic of this name: deleting it");
                self.delete(topic, partition)?;
                log = self.get_or_create(topic, partition, config)?;
            }
            None => {} // adopted: marked below
        }
        checkpoint::write(log.dir(), TOPIC_ID_FILE, &[topic_id.to_string()])?;
        Ok(log)
    }

    /// Closes the partition's log (appends and reads fail from now on;
    /// nothing is flushed) and renames its directory out of the way; a
    /// background thread removes it ([`wait_for_deletions`] waits for
    /// that). The same partition can be created again at once.
    pub fn delete(&self, topic: &str, partition: i32) -> Result<()> {
        // The rename happens under the logs lock, as `get_or_create`'s
        // open does: a log created again for the partition in between
        // would otherwise open the old directory and be renamed away with
        // it, appending into files about to be removed.
        let mut logs = self.logs.write().expect("logs lock");
        if let Some(log) = logs.remove(&(topic.to_string(), partition)) {
            log.close_for_delete();
            let dir = log.dir().to_path_buf();
            let doomed = self.data_dir.join(deleted_name(topic, partition));
            std::fs::rename(&dir, &doomed).map_err(io_err(&dir))?;
            drop(logs);
            remove_later(doomed, Some(log));
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
        wait_for_deletions();
        assert_eq!(names(dir.path()), ["cluster-id", "meta"]);
    }

    /// A topic deleted and created again under the same name while this
    /// broker was away: its directory still holds the old topic's records,
    /// which the new topic must not serve.
    #[test]
    fn a_directory_of_an_earlier_topic_of_the_same_name_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig::default;
        let m = LogManager::open(dir.path(), config()).unwrap();
        let old = m.get_or_create_for("t", 0, "id-a", config()).unwrap();
        let mut b = BatchBuilder::new();
        b.push(1, None, Some(b"old"), &[]);
        old.append_as_leader(b.build(), 0).unwrap();
        // The same topic: the same log.
        let again = m.get_or_create_for("t", 0, "id-a", config()).unwrap();
        assert!(Arc::ptr_eq(&old, &again));
        m.close().unwrap();
        drop((m, old, again));
        // Reopened: the log is back from disk, and a new topic of the
        // same name gets an empty one.
        let m = LogManager::open(dir.path(), config()).unwrap();
        assert_eq!(m.get("t", 0).unwrap().log_end_offset(), 1);
        let new = m.get_or_create_for("t", 0, "id-b", config()).unwrap();
        assert_eq!(new.log_end_offset(), 0);
        assert_eq!(topic_id_of(new.dir()).unwrap().as_deref(), Some("id-b"));
        let mut b = BatchBuilder::new();
        b.push(1, None, Some(b"new"), &[]);
        new.append_as_leader(b.build(), 0).unwrap();
        m.close().unwrap();
        drop((m, new));
        let m = LogManager::open(dir.path(), config()).unwrap();
        let new = m.get_or_create_for("t", 0, "id-b", config()).unwrap();
        assert_eq!(new.log_end_offset(), 1);
        // A directory naming no topic (made before ids were kept) is
        // taken as the caller's and marked.
        let legacy = m.get_or_create("u", 0, config()).unwrap();
        assert_eq!(topic_id_of(legacy.dir()).unwrap(), None);
        let adopted = m.get_or_create_for("u", 0, "id-c", config()).unwrap();
        assert!(Arc::ptr_eq(&legacy, &adopted));
        assert_eq!(topic_id_of(adopted.dir()).unwrap().as_deref(), Some("id-c"));
        m.close().unwrap();
        wait_for_deletions();
    }

    /// A directory of an earlier topic that failed to open at startup
    /// (left out of the map) is set aside unopened for a new topic of the
    /// same name: opened first, it failed again, and the new topic's
    /// partition was never hosted here.
    #[test]
    fn an_unopenable_directory_of_an_earlier_topic_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig::default;
        let old = dir.path().join("t-0");
        std::fs::create_dir_all(old.join("00000000000000000000.log")).unwrap();
        checkpoint::write(&old, TOPIC_ID_FILE, &["id-a".to_string()]).unwrap();
        let m = LogManager::open(dir.path(), config()).unwrap();
        assert!(m.get("t", 0).is_none(), "opened");
        assert!(m.get_or_create_for("t", 0, "id-a", config()).is_err());
        let new = m.get_or_create_for("t", 0, "id-b", config()).unwrap();
        assert_eq!(new.log_end_offset(), 0);
        assert_eq!(topic_id_of(new.dir()).unwrap().as_deref(), Some("id-b"));
        m.close().unwrap();
        wait_for_deletions();
    }

    /// Holds the deleting thread before its next directory (tests only).
    pub(super) static DELETER_PAUSE: Mutex<()> = Mutex::new(());

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn append_one(log: &Log) -> Result<crate::AppendInfo> {
        let mut b = BatchBuilder::new();
        b.push(1, None, Some(b"v"), &[]);
        log.append_as_leader(b.build(), 0)
    }

    /// The files go on the deleting thread, after `delete` has returned;
    /// meanwhile the old log refuses appends and the same partition is
    /// created afresh.
    #[test]
    fn a_deleted_partition_is_removed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let m = LogManager::open(dir.path(), LogConfig::default()).unwrap();
        let old = m.get_or_create("t", 0, LogConfig::default()).unwrap();
        append_one(&old).unwrap();
        append_one(&old).unwrap();
        let paused = DELETER_PAUSE.lock().unwrap();
        m.delete("t", 0).unwrap();
        let left = names(dir.path());
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(
            left[0].starts_with("t-0.") && left[0].ends_with(DELETED_SUFFIX),
            "renamed, not yet removed: {left:?}"
        );
        assert_eq!(parse_partition_dir(&left[0]), None);
        assert!(matches!(append_one(&old), Err(StorageError::Closed { .. })));
        let new = m.get_or_create("t", 0, LogConfig::default()).unwrap();
        assert_eq!(new.log_end_offset(), 0, "a new partition starts empty");
        append_one(&new).unwrap();
        drop(paused);
        wait_for_deletions();
        assert_eq!(names(dir.path()), ["t-0"]);
        assert_eq!(new.log_end_offset(), 1);
        m.close().unwrap();
    }

    /// A topic name as long as names go still leaves room for the
    /// deleted directory's suffix: the rename used to fail with "file name
    /// too long", leaving the partition on disk for good.
    #[test]
    fn a_partition_of_the_longest_topic_name_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let m = LogManager::open(dir.path(), LogConfig::default()).unwrap();
        let topic = "t".repeat(249);
        let log = m
            .get_or_create_for(&topic, 0, "id-a", LogConfig::default())
            .unwrap();
        append_one(&log).unwrap();
        m.delete(&topic, 0).unwrap();
        assert!(!dir.path().join(format!("{topic}-0")).exists());
        let name = deleted_name(&topic, i32::MAX);
        assert!(name.len() <= FILE_NAME_MAX, "{}", name.len());
        assert!(name.ends_with(DELETED_SUFFIX));
        let new = m
            .get_or_create_for(&topic, 0, "id-b", LogConfig::default())
            .unwrap();
        assert_eq!(new.log_end_offset(), 0);
        m.close().unwrap();
        wait_for_deletions();
    }

    /// A deletion cut short by a crash is finished by the next open, and
    /// the directory is never taken for a partition.
    #[test]
    fn open_finishes_an_interrupted_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let doomed = dir.path().join(deleted_name("t", 3));
        std::fs::create_dir(&doomed).unwrap();
        std::fs::write(doomed.join("00000000000000000000.log"), b"old bytes").unwrap();
        let m = LogManager::open(dir.path(), LogConfig::default()).unwrap();
        assert!(m.all().is_empty());
        wait_for_deletions();
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }
}
