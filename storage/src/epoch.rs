//! The leader-epoch cache: (leader epoch → first offset of that epoch),
//! persisted in `leader-epoch-checkpoint`. Replication uses it to find
//! where a follower's log diverges from the leader's
//! (`Log::end_offset_for_epoch`).

use std::path::{Path, PathBuf};

use crate::checkpoint;
use crate::Result;

#[derive(Debug)]
pub(crate) struct EpochCache {
    dir: PathBuf,
    /// (epoch, start offset), both strictly increasing.
    entries: Vec<(i32, i64)>,
}

impl EpochCache {
    /// Loads the checkpoint; a missing or unparsable file gives an empty
    /// cache, and out-of-order entries are dropped.
    pub(crate) fn load(dir: &Path) -> Result<EpochCache> {
        let mut entries: Vec<(i32, i64)> = Vec::new();
        if let Some(lines) = checkpoint::read(dir, checkpoint::LEADER_EPOCH)? {
            for line in lines.iter().skip(1) {
                let mut parts = line.split_whitespace();
                let (Some(Ok(epoch)), Some(Ok(start))) = (
                    parts.next().map(str::parse::<i32>),
                    parts.next().map(str::parse::<i64>),
                ) else {
                    break;
                };
                if entries
                    .last()
                    .is_some_and(|&(e, s)| epoch <= e || start < s)
                {
                    break;
                }
                entries.push((epoch, start));
            }
        }
        Ok(EpochCache {
            dir: dir.to_path_buf(),
            entries,
        })
    }

    pub(crate) fn persist(&self) -> Result<()> {
        let mut lines = vec![self.entries.len().to_string()];
        lines.extend(self.entries.iter().map(|(e, s)| format!("{e} {s}")));
        checkpoint::write(&self.dir, checkpoint::LEADER_EPOCH, &lines)
    }

    pub(crate) fn earliest(&self) -> Option<(i32, i64)> {
        self.entries.first().copied()
    }
    pub(crate) fn latest(&self) -> Option<(i32, i64)> {
        self.entries.last().copied()
    }

    /// Records that `epoch` starts at `start_offset` if it is newer than
    /// the latest epoch. Returns whether the cache changed.
    pub(crate) fn assign(&mut self, epoch: i32, start_offset: i64) -> Result<bool> {
        if epoch < 0 || self.latest().is_some_and(|(e, _)| epoch <= e) {
            return Ok(false);
        }
        let before = self.entries.clone();
        // A newer epoch starting before an older one's start supersedes it.
        while self.entries.last().is_some_and(|&(_, s)| s >= start_offset) {
            self.entries.pop();
        }
        self.entries.push((epoch, start_offset));
        if let Err(e) = self.persist() {
            // As it was: kept in memory only, the epoch counted as known
            // and was never saved by the appends after (a restart then
            // took its records for the epoch before's).
            self.entries = before;
            return Err(e);
        }
        Ok(true)
    }

    /// (largest epoch <= `epoch`, start of the next epoch or `log_end_offset`).
    pub(crate) fn end_offset_for(&self, epoch: i32, log_end_offset: i64) -> Option<(i32, i64)> {
        let i = self
            .entries
            .partition_point(|&(e, _)| e <= epoch)
            .checked_sub(1)?;
        let end = self.entries.get(i + 1).map_or(log_end_offset, |&(_, s)| s);
        Some((self.entries[i].0, end))
    }

    /// Drops epochs that start at or after `end_offset` (log truncation).
    pub(crate) fn truncate_from_end(&mut self, end_offset: i64) -> Result<()> {
        let before = self.entries.len();
        self.entries.retain(|&(_, s)| s < end_offset);
        if self.entries.len() != before {
            self.persist()?;
        }
        Ok(())
    }

    /// Moves the start of the epoch covering `start_offset` up to it and
    /// drops older epochs (log start offset advanced).
    pub(crate) fn truncate_from_start(&mut self, start_offset: i64) -> Result<()> {
        if self.truncate_from_start_unpersisted(start_offset) {
            self.persist()?;
        }
        Ok(())
    }

    /// [`Self::truncate_from_start`] in memory only; returns whether the
    /// cache changed (and so needs `persist`). Losing it in a crash is
    /// harmless: opening a log truncates its cache to the log start again.
    pub(crate) fn truncate_from_start_unpersisted(&mut self, start_offset: i64) -> bool {
        let covering = self.entries.partition_point(|&(_, s)| s <= start_offset);
        if covering == 0 || (covering == 1 && self.entries[0].1 == start_offset) {
            return false;
        }
        self.entries.drain(..covering - 1);
        self.entries[0].1 = start_offset;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An epoch whose checkpoint could not be written is not kept in
    /// memory either: the next append of it tries again.
    #[test]
    fn an_epoch_that_failed_to_save_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EpochCache::load(dir.path()).unwrap();
        assert!(c.assign(1, 0).unwrap());
        assert!(c.assign(2, 5).unwrap());
        // The temporary file's name taken: the save fails, as on a full
        // disk.
        let tmp = dir.path().join(format!("{}.tmp", checkpoint::LEADER_EPOCH));
        std::fs::create_dir(&tmp).unwrap();
        assert!(c.assign(3, 5).is_err());
        assert_eq!(c.latest(), Some((2, 5)), "the superseded epoch is back");
        std::fs::remove_dir(&tmp).unwrap();
        assert!(c.assign(3, 5).unwrap(), "tried again");
        let c = EpochCache::load(dir.path()).unwrap();
        assert_eq!(c.latest(), Some((3, 5)));
    }

    #[test]
    fn assign_lookup_truncate_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = EpochCache::load(dir.path()).unwrap();
        assert_eq!(c.end_offset_for(0, 10), None);
        assert!(c.assign(1, 0).unwrap());
        assert!(!c.assign(1, 5).unwrap());
        assert!(c.assign(3, 10).unwrap());
        assert!(c.assign(4, 20).unwrap());
        assert_eq!(c.end_offset_for(0, 30), None);
        assert_eq!(c.end_offset_for(1, 30), Some((1, 10)));
        assert_eq!(c.end_offset_for(2, 30), Some((1, 10)));
        assert_eq!(c.end_offset_for(4, 30), Some((4, 30)));
        assert_eq!(c.end_offset_for(9, 30), Some((4, 30)));
        c.truncate_from_end(20).unwrap();
        assert_eq!(c.latest(), Some((3, 10)));
        c.truncate_from_start(12).unwrap();
        let c = EpochCache::load(dir.path()).unwrap();
        assert_eq!(c.entries, vec![(3, 12)]);
    }
}
