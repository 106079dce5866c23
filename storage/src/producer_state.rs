//! Per-partition idempotent-producer state: for each producer id, its
//! epoch and the sequence ranges and offsets of its last
//! [`BATCHES_RETAINED`] batches (Kafka's `ProducerStateManager`).
//!
//! Where it sits on the data path: `Log::append_as_leader` asks
//! [`ProducerStates::check`] under the writer lock before assigning
//! offsets — a retried batch already in the log is answered with its
//! original offsets and not written again, a sequence gap or a stale epoch
//! is refused — and records every appended batch with
//! [`ProducerStates::record`]. Followers record the batches they copy, so a
//! new leader already knows every producer. The state is a function of the
//! log: on open and after truncation it is rebuilt from the newest snapshot
//! at or below the log end plus a scan of the batch headers after it.
//!
//! Snapshot file `<offset, 20 digits>.snapshot` = the state covering every
//! batch below `offset`, written when a segment rolls and on clean close:
//! `magic "RPS1"`, `crc32c u32` (over the rest), `count u32`, then per
//! producer `producer_id i64, epoch i16, last_timestamp_ms i64, batches u8`
//! and per batch `first_seq i32, last_seq i32, first_offset i64,
//! last_offset i64`, all big-endian. A file that fails its CRC or framing
//! is ignored (the state is then rebuilt from further back).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use crate::index_file::io_err;
use crate::{checkpoint, Result, StorageError};

/// Batches remembered per producer: a client keeps at most this many in
/// flight per partition, so any retry it sends is among them. Kafka keeps
/// five; with 64 KiB batches five in flight capped a partition's acks=all
/// throughput at five batches per replication round trip (three nodes:
/// 292 MB/s with five in flight, 360 - 406 with sixteen; RESULTS, session
/// 10). Snapshots written with five (or any count up to this) still load.
pub const BATCHES_RETAINED: usize = 16;

/// Producer ids one partition keeps state for, unless they are all
/// recent. Each id that writes once stays until
/// `producer.id.expiration.ms` (a day) without it: a client that makes a
/// producer per request (or a hostile one with Write) grew the state,
/// every roll's snapshot of it (copied and written under the writer lock)
/// and every tick's expiry scan without bound (Kafka's KIP-936). Past it,
/// up to an eighth of the least recently seen are forgotten, among those
/// idle for [`EVICTABLE_IDLE_MS`] only: a producer that may still retry a
/// batch keeps its state (forgotten, its retry of a first batch was
/// stored again, and a flood of made-up ids could wipe every producer's
/// protection). A forgotten producer's next batch gets
/// UNKNOWN_PRODUCER_ID, which a client recovers from (KIP-360).
pub const PRODUCERS_MAX: usize = 20_000;

/// How long a producer must have been idle before the cap may forget it:
/// past any client's delivery timeout (2 minutes by default), so no retry
/// of its can still come.
pub const EVICTABLE_IDLE_MS: i64 = 10 * 60 * 1000;

const SNAPSHOT_MAGIC: &[u8; 4] = b"RPS1";
const SNAPSHOT_SUFFIX: &str = ".snapshot";
/// Snapshots kept besides those at segment bases; older ones are deleted
/// when a new one is written.
const SNAPSHOTS_RETAINED: usize = 2;

/// Sequence numbers and offsets of one appended batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchMeta {
    pub first_seq: i32,
    pub last_seq: i32,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// One producer's state in one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Oldest first, at most [`BATCHES_RETAINED`].
    pub batches: VecDeque<BatchMeta>,
    /// When this replica last appended one of its batches, by this
    /// broker's clock (on a rebuild from the log: when the log was
    /// opened); drives expiration. Not the batch's own timestamp, which
    /// the client chooses: a backfill of old records would expire its
    /// producer within a tick, and a retry would then be stored twice.
    pub last_timestamp_ms: i64,
}

/// The producer fields of a batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerBatch {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_seq: i32,
    /// Offset delta of the last record: the batch covers
    /// `first_seq ..= first_seq + last_offset_delta` (wrapping at i32::MAX).
    pub last_offset_delta: i32,
    pub max_timestamp_ms: i64,
}

impl ProducerBatch {
    pub fn last_seq(&self) -> i32 {
        add_sequence(self.first_seq, self.last_offset_delta)
    }
}

/// What the leader should do with a producer's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Not seen before and in sequence: append it.
    Append,
    /// Already in the log at these offsets: answer with them, append nothing.
    Duplicate(BatchMeta),
}

/// `seq + delta`, wrapping from i32::MAX to 0 as Kafka's sequences do
/// (producers use it for the next batch's base sequence too).
pub fn add_sequence(seq: i32, delta: i32) -> i32 {
    ((i64::from(seq) + i64::from(delta)) % (i64::from(i32::MAX) + 1)) as i32
}

/// Every producer's state in one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerEntry>,
    /// The size at which the cap next looks for producers to forget (an
    /// eighth of the cap past the last look, which may find none idle
    /// enough): each look scans every producer.
    next_eviction_at: usize,
}

impl ProducerStates {
    /// Decides whether the leader appends `batch`. Batches without a
    /// producer id (`<= 0`: ids start at 1) always append.
    pub fn check(&self, batch: &ProducerBatch) -> Result<SequenceCheck> {
        if batch.producer_id <= 0 {
            return Ok(SequenceCheck::Append);
        }
        if batch.first_seq < 0 || batch.epoch < 0 {
            return Err(StorageError::OutOfOrderSequence {
                producer_id: batch.producer_id,
                expected: 0,
                got: batch.first_seq,
            });
        }
        let Some(entry) = self.producers.get(&batch.producer_id) else {
            // A producer's first batch in this partition starts at 0; any
            // other sequence means its state was lost (expired, or written
            // by a producer id this partition never saw).
            return if batch.first_seq == 0 {
                Ok(SequenceCheck::Append)
            } else {
                Err(StorageError::UnknownProducerId {
                    producer_id: batch.producer_id,
                    sequence: batch.first_seq,
                })
            };
        };
        if batch.epoch < entry.epoch {
            return Err(StorageError::ProducerFenced {
                producer_id: batch.producer_id,
                epoch: batch.epoch,
                current_epoch: entry.epoch,
            });
        }
        if batch.epoch > entry.epoch {
            // A bumped epoch starts its sequences over.
            return if batch.first_seq == 0 {
                Ok(SequenceCheck::Append)
            } else {
                Err(StorageError::OutOfOrderSequence {
                    producer_id: batch.producer_id,
                    expected: 0,
                    got: batch.first_seq,
                })
            };
        }
        let last_seq = batch.last_seq();
        if let Some(dup) = entry
            .batches
            .iter()
            .rev()
            .find(|b| b.first_seq == batch.first_seq && b.last_seq == last_seq)
        {
            return Ok(SequenceCheck::Duplicate(*dup));
        }
        let expected = entry
            .batches
            .back()
            .map_or(0, |b| add_sequence(b.last_seq, 1));
        if batch.first_seq == expected {
            Ok(SequenceCheck::Append)
        } else {
            Err(StorageError::OutOfOrderSequence {
                producer_id: batch.producer_id,
                expected,
                got: batch.first_seq,
            })
        }
    }

    /// Records an appended batch at `first_offset..=last_offset`, without
    /// checks (leaders check first; followers and rebuilds trust the log),
    /// seen at `now_ms` by this broker's clock.
    pub fn record(
        &mut self,
        batch: &ProducerBatch,
        first_offset: i64,
        last_offset: i64,
        now_ms: i64,
    ) {
        if batch.producer_id <= 0 {
            return;
        }
        if self.producers.len() >= PRODUCERS_MAX.max(self.next_eviction_at)
            && !self.producers.contains_key(&batch.producer_id)
        {
            self.evict_least_recent(PRODUCERS_MAX / 8, now_ms - EVICTABLE_IDLE_MS);
            self.next_eviction_at = self.producers.len() + PRODUCERS_MAX / 8;
        }
        let entry = self
            .producers
            .entry(batch.producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch: batch.epoch,
                batches: VecDeque::new(),
                last_timestamp_ms: now_ms,
            });
        // A new epoch, or the same one starting its sequence over (a
        // producer whose state the leader had lost renumbers from 0): the
        // window of older batches no longer applies. Kept, a renumbered
        // batch matching an old one's range would be answered as its
        // duplicate by this replica once it leads, and never stored.
        let restarts = entry
            .batches
            .back()
            .is_some_and(|b| batch.first_seq != add_sequence(b.last_seq, 1));
        if batch.epoch != entry.epoch || restarts {
            entry.epoch = batch.epoch;
            entry.batches.clear();
        }
        if entry.batches.len() == BATCHES_RETAINED {
            entry.batches.pop_front();
        }
        entry.batches.push_back(BatchMeta {
            first_seq: batch.first_seq,
            last_seq: batch.last_seq(),
            first_offset,
            last_offset,
        });
        entry.last_timestamp_ms = entry.last_timestamp_ms.max(now_ms);
    }

    /// Forgets up to `n` producers whose last batch this replica saw
    /// longest ago, before `idle_before` (ties, as in a rebuild where all
    /// were seen at the open, by id).
    fn evict_least_recent(&mut self, n: usize, idle_before: i64) {
        let mut seen: Vec<(i64, i64)> = self
            .producers
            .iter()
            .filter(|(_, e)| e.last_timestamp_ms < idle_before)
            .map(|(id, e)| (e.last_timestamp_ms, *id))
            .collect();
        if n > 0 && !seen.is_empty() && seen.len() <= n {
            let idle: std::collections::HashSet<i64> = seen.iter().map(|(_, id)| *id).collect();
            self.producers.retain(|id, _| !idle.contains(id));
            return;
        }
        if n == 0 || seen.len() <= n {
            return;
        }
        let (_, cut, _) = seen.select_nth_unstable(n - 1);
        let cut = *cut;
        self.producers
            .retain(|id, e| (e.last_timestamp_ms, *id) > cut);
    }

    /// Forgets producers whose last batch is `expiration_ms` older than
    /// `now_ms` (producer.id.expiration.ms). Returns how many.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64) -> usize {
        let before = self.producers.len();
        self.producers
            .retain(|_, e| now_ms.saturating_sub(e.last_timestamp_ms) < expiration_ms);
        before - self.producers.len()
    }

    /// Takes back from `previous` the producers this state lacks, with
    /// their retained batches below `below`. A rebuild after a truncation
    /// scans from `below` (a snapshot, or the log start), so it cannot see
    /// producers whose batches were all deleted below the log start
    /// (DeleteRecords, retention), yet the truncation did not touch them:
    /// forgetting them would answer their next batch UNKNOWN_PRODUCER_ID.
    /// A producer missing from the rebuild had no batch between `below`
    /// and the new log end, so its batches below `below` are all it has
    /// left (those above were truncated): it is kept with them, also
    /// when its newest batch was among the truncated ones.
    pub fn keep_older(&mut self, previous: &ProducerStates, below: i64) {
        for (id, entry) in &previous.producers {
            if self.producers.contains_key(id) {
                continue;
            }
            let mut kept = entry.clone();
            kept.batches.retain(|b| b.last_offset < below);
            if !kept.batches.is_empty() {
                self.producers.insert(*id, kept);
            }
        }
    }

    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Encodes the snapshot body (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut ids: Vec<_> = self.producers.keys().copied().collect();
        ids.sort_unstable();
        let mut body = Vec::with_capacity(4 + ids.len() * 64);
        body.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let e = &self.producers[&id];
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(&e.epoch.to_be_bytes());
            body.extend_from_slice(&e.last_timestamp_ms.to_be_bytes());
            body.push(e.batches.len() as u8);
            for b in &e.batches {
                body.extend_from_slice(&b.first_seq.to_be_bytes());
                body.extend_from_slice(&b.last_seq.to_be_bytes());
                body.extend_from_slice(&b.first_offset.to_be_bytes());
                body.extend_from_slice(&b.last_offset.to_be_bytes());
            }
        }
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&crate::crc::crc32c(&body).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a snapshot; `None` when its magic, CRC or framing is wrong.
    pub fn decode(bytes: &[u8]) -> Option<ProducerStates> {
        let (head, body) = bytes.split_at_checked(8)?;
        if &head[..4] != SNAPSHOT_MAGIC
            || u32::from_be_bytes(head[4..8].try_into().ok()?) != crate::crc::crc32c(body)
        {
            return None;
        }
        let mut r = Reader(body);
        let count = r.u32()?;
        let mut producers = HashMap::new();
        for _ in 0..count {
            let id = r.i64()?;
            let epoch = r.i16()?;
            let last_timestamp_ms = r.i64()?;
            let n = r.u8()? as usize;
            if n > BATCHES_RETAINED {
                return None;
            }
            let mut batches = VecDeque::with_capacity(n);
            for _ in 0..n {
                batches.push_back(BatchMeta {
                    first_seq: r.i32()?,
                    last_seq: r.i32()?,
                    first_offset: r.i64()?,
                    last_offset: r.i64()?,
                });
            }
            producers.insert(
                id,
                ProducerEntry {
                    epoch,
                    batches,
                    last_timestamp_ms,
                },
            );
        }
        r.0.is_empty().then_some(ProducerStates {
            producers,
            next_eviction_at: 0,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_at_checked(N)?;
        self.0 = rest;
        head.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn i16(&mut self) -> Option<i16> {
        self.take().map(i16::from_be_bytes)
    }
    fn i32(&mut self) -> Option<i32> {
        self.take().map(i32::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_be_bytes)
    }
}

fn snapshot_path(dir: &Path, offset: i64) -> PathBuf {
    dir.join(format!("{offset:020}{SNAPSHOT_SUFFIX}"))
}

/// Offsets of the snapshot files in `dir`, ascending.
pub(crate) fn snapshot_offsets(dir: &Path) -> Result<Vec<i64>> {
    let mut offsets = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SNAPSHOT_SUFFIX)) else {
            continue;
        };
        if stem.len() == 20 {
            if let Ok(offset) = stem.parse::<i64>() {
                offsets.push(offset);
            }
        }
    }
    offsets.sort_unstable();
    Ok(offsets)
}

/// Writes the snapshot for `offset` (atomically), deletes the ones it
/// supersedes (see [`write_snapshot_unsynced`]), and makes it durable.
pub(crate) fn write_snapshot(
    dir: &Path,
    offset: i64,
    states: &ProducerStates,
    bases: &[i64],
) -> Result<()> {
    crate::segment::remove_files(&write_snapshot_unsynced(dir, offset, states, bases)?)?;
    sync_snapshots(dir, offset.saturating_sub(1), offset)?;
    checkpoint::sync_dir(dir)
}

/// [`write_snapshot`] without the fsyncs, for a segment roll on the
/// append path: the log's background flush of rolled segments makes it
/// durable ([`sync_snapshots`]) before the recovery point passes it. A
/// crash before that can leave it torn or empty; [`load_latest`] then
/// skips it (its CRC fails) and rebuilds from the one before.
///
/// Returns the snapshots it supersedes without deleting them: an unlink
/// may wait for the device (a discard), so the roll leaves them to be
/// deleted off the append path. Kept, as Kafka keeps them: the one at
/// each segment base in `bases` (the log's segments, ascending), so that
/// a truncation scans at most from the base of the segment it cuts into,
/// and the newest [`SNAPSHOTS_RETAINED`]. Superseded: the rest, and any
/// below the first segment (its segments deleted). With only the newest
/// two kept, a truncation more than a segment deep (a former leader's
/// unreplicated tail) rebuilt the state from the log start, reading the
/// whole partition under the writer lock.
pub(crate) fn write_snapshot_unsynced(
    dir: &Path,
    offset: i64,
    states: &ProducerStates,
    bases: &[i64],
) -> Result<Vec<PathBuf>> {
    let path = snapshot_path(dir, offset);
    let tmp = path.with_extension("snapshot.tmp");
    std::fs::write(&tmp, states.encode()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    let offsets = snapshot_offsets(dir)?;
    let newest = offsets.len().saturating_sub(SNAPSHOTS_RETAINED);
    let first_base = bases.first().copied().unwrap_or(i64::MIN);
    Ok(offsets
        .iter()
        .enumerate()
        .filter(|&(i, &o)| o < first_base || (i < newest && bases.binary_search(&o).is_err()))
        .map(|(_, &old)| snapshot_path(dir, old))
        .collect())
}

/// fsyncs the snapshots with offsets in `after + 1 ..= upto` (not the
/// directory).
pub(crate) fn sync_snapshots(dir: &Path, after: i64, upto: i64) -> Result<()> {
    if after >= upto {
        return Ok(()); // nothing appended since: no directory listing
    }
    sync_listed(dir, &snapshot_offsets(dir)?, after, upto)
}

/// [`sync_snapshots`] over a listing taken earlier. A roll may have written
/// a newer snapshot and deleted the oldest since (the flush runs without
/// the writer lock): a listed snapshot that is gone was superseded, not
/// lost, and is skipped.
fn sync_listed(dir: &Path, offsets: &[i64], after: i64, upto: i64) -> Result<()> {
    for &offset in offsets {
        if offset > after && offset <= upto {
            let path = snapshot_path(dir, offset);
            match std::fs::File::open(&path).and_then(|f| f.sync_all()) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other.map_err(io_err(&path))?,
            }
        }
    }
    Ok(())
}

/// Deletes snapshots above `offset` (they describe truncated history).
pub(crate) fn delete_snapshots_above(dir: &Path, offset: i64) -> Result<()> {
    for old in snapshot_offsets(dir)? {
        if old > offset {
            let p = snapshot_path(dir, old);
            std::fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// The newest readable snapshot with offset in `min..=max`.
pub(crate) fn load_latest(dir: &Path, min: i64, max: i64) -> Result<Option<(i64, ProducerStates)>> {
    for offset in snapshot_offsets(dir)?.into_iter().rev() {
        if offset > max || offset < min {
            continue;
        }
        let path = snapshot_path(dir, offset);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        match ProducerStates::decode(&bytes) {
            Some(states) => return Ok(Some((offset, states))),
            None => tracing::warn!(path = %path.display(), "ignoring unreadable producer snapshot"),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(pid: i64, epoch: i16, seq: i32, n: i32) -> ProducerBatch {
        ProducerBatch {
            producer_id: pid,
            epoch,
            first_seq: seq,
            last_offset_delta: n - 1,
            max_timestamp_ms: 1_000,
        }
    }

    #[test]
    fn in_sequence_appends_and_retries_are_duplicates() {
        let mut s = ProducerStates::default();
        let b0 = batch(7, 0, 0, 3);
        assert_eq!(s.check(&b0).unwrap(), SequenceCheck::Append);
        s.record(&b0, 10, 12, 1_000);
        let b1 = batch(7, 0, 3, 2);
        assert_eq!(s.check(&b1).unwrap(), SequenceCheck::Append);
        s.record(&b1, 13, 14, 1_000);
        assert_eq!(
            s.check(&b0).unwrap(),
            SequenceCheck::Duplicate(BatchMeta {
                first_seq: 0,
                last_seq: 2,
                first_offset: 10,
                last_offset: 12
            })
        );
        assert!(matches!(
            s.check(&batch(7, 0, 6, 1)),
            Err(StorageError::OutOfOrderSequence {
                expected: 5,
                got: 6,
                ..
            })
        ));
    }

    /// A rebuild from offset 850 after a truncation to 900: the producer
    /// had batches at 840 (below the rebuild) and 950 (truncated), none
    /// in between. It keeps its batch at 840; it used to be dropped
    /// because its newest batch was not below 850.
    #[test]
    fn keep_older_keeps_the_batches_below_the_rebuild_of_a_truncated_producer() {
        let mut previous = ProducerStates::default();
        previous.record(&batch(1, 0, 0, 1), 840, 840, 1_000);
        previous.record(&batch(1, 0, 1, 1), 950, 950, 1_000);
        previous.record(&batch(2, 0, 0, 1), 860, 860, 1_000);
        previous.record(&batch(3, 0, 0, 1), 960, 960, 1_000);
        // The rebuild of 850..900 saw producer 2 only.
        let mut rebuilt = ProducerStates::default();
        rebuilt.record(&batch(2, 0, 0, 1), 860, 860, 1_000);
        rebuilt.keep_older(&previous, 850);
        let kept = rebuilt.get(1).expect("producer 1 kept");
        assert_eq!(kept.batches.len(), 1);
        assert_eq!(kept.batches[0].last_offset, 840);
        // Its next batch follows the kept one; the truncated one may be
        // sent again.
        assert_eq!(
            rebuilt.check(&batch(1, 0, 1, 1)).unwrap(),
            SequenceCheck::Append
        );
        assert_eq!(rebuilt.get(2), previous.get(2));
        // Producer 3 had nothing left.
        assert!(rebuilt.get(3).is_none());
    }

    /// A producer renumbering from 0 after another replica forgot it: this
    /// replica, which still holds its old batches, would take a batch of
    /// the same epoch and range as a duplicate of an old one (and store
    /// nothing); under the next epoch it is a fresh start, as the client
    /// now sends it.
    #[test]
    fn a_sequence_restarted_under_the_next_epoch_is_not_a_duplicate() {
        let mut s = ProducerStates::default();
        for i in 0..3 {
            s.record(
                &batch(7, 0, i, 1),
                10 + i64::from(i),
                10 + i64::from(i),
                1_000,
            );
        }
        assert!(matches!(
            s.check(&batch(7, 0, 0, 1)).unwrap(),
            SequenceCheck::Duplicate(_)
        ));
        assert_eq!(s.check(&batch(7, 1, 0, 1)).unwrap(), SequenceCheck::Append);
    }

    #[test]
    fn only_the_last_batches_retained_are_remembered() {
        let mut s = ProducerStates::default();
        let n = BATCHES_RETAINED as i32;
        for i in 0..=n {
            let b = batch(1, 0, i, 1);
            assert_eq!(s.check(&b).unwrap(), SequenceCheck::Append);
            s.record(&b, i64::from(i), i64::from(i), 1_000);
        }
        assert_eq!(s.get(1).unwrap().batches.len(), BATCHES_RETAINED);
        // Batch 0 fell out of the window: a retry of it is out of order.
        assert!(s.check(&batch(1, 0, 0, 1)).is_err());
        // Every batch still in the window is recognised.
        for i in 1..=n {
            assert_eq!(
                s.check(&batch(1, 0, i, 1)).unwrap(),
                SequenceCheck::Duplicate(BatchMeta {
                    first_seq: i,
                    last_seq: i,
                    first_offset: i64::from(i),
                    last_offset: i64::from(i)
                })
            );
        }
    }

    #[test]
    fn epochs_fence_and_restart_sequences() {
        let mut s = ProducerStates::default();
        s.record(&batch(1, 3, 0, 1), 0, 0, 1_000);
        assert!(matches!(
            s.check(&batch(1, 2, 1, 1)),
            Err(StorageError::ProducerFenced {
                epoch: 2,
                current_epoch: 3,
                ..
            })
        ));
        assert!(s.check(&batch(1, 4, 5, 1)).is_err());
        assert_eq!(s.check(&batch(1, 4, 0, 1)).unwrap(), SequenceCheck::Append);
    }

    #[test]
    fn unknown_producer_must_start_at_zero() {
        let s = ProducerStates::default();
        assert!(matches!(
            s.check(&batch(9, 0, 4, 1)),
            Err(StorageError::UnknownProducerId {
                producer_id: 9,
                sequence: 4
            })
        ));
        assert_eq!(s.check(&batch(9, 0, 0, 1)).unwrap(), SequenceCheck::Append);
        assert_eq!(
            s.check(&batch(-1, -1, -1, 1)).unwrap(),
            SequenceCheck::Append
        );
    }

    #[test]
    fn a_sequence_starting_over_in_the_same_epoch_forgets_the_old_window() {
        // A follower copies batches 0..=4 and 5..=9, then the producer,
        // told by a leader that lost its state that it is unknown,
        // renumbers from 0 in the same epoch: 0..=4 again, then 5..=9
        // that this replica never received.
        let mut s = ProducerStates::default();
        s.record(&batch(1, 0, 0, 5), 0, 4, 1_000);
        s.record(&batch(1, 0, 5, 5), 5, 9, 1_000);
        s.record(&batch(1, 0, 0, 5), 10, 14, 1_000);
        // Leading now, it must take the new 5..=9 as the next batch, not
        // answer it as a duplicate of the old one at 5..=9.
        assert_eq!(s.check(&batch(1, 0, 5, 5)).unwrap(), SequenceCheck::Append);
        assert_eq!(
            s.check(&batch(1, 0, 0, 5)).unwrap(),
            SequenceCheck::Duplicate(BatchMeta {
                first_seq: 0,
                last_seq: 4,
                first_offset: 10,
                last_offset: 14
            })
        );
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let mut s = ProducerStates::default();
        s.record(&batch(1, 0, i32::MAX - 1, 2), 0, 1, 1_000);
        assert_eq!(s.get(1).unwrap().batches[0].last_seq, i32::MAX);
        assert_eq!(s.check(&batch(1, 0, 0, 1)).unwrap(), SequenceCheck::Append);
    }

    #[test]
    fn expiry_drops_idle_producers() {
        let mut s = ProducerStates::default();
        s.record(&batch(1, 0, 0, 1), 0, 0, 1_000);
        // Timed by when this broker saw the batch, not by the batch's
        // own (client-chosen) timestamp.
        let mut old = batch(2, 0, 0, 1);
        old.max_timestamp_ms = -50_000;
        s.record(&old, 1, 1, 5_000);
        assert_eq!(s.expire(6_000, 2_000), 1);
        assert!(s.get(1).is_none() && s.get(2).is_some());
    }

    /// Past PRODUCERS_MAX ids, up to an eighth of the least recently seen
    /// are forgotten, among those idle long enough that no retry of
    /// theirs can still come; while every producer is recent, none is.
    #[test]
    fn producer_ids_past_the_cap_forget_the_least_recent_idle_ones() {
        let mut s = ProducerStates::default();
        for id in 1..=PRODUCERS_MAX as i64 {
            s.record(&batch(id, 0, 0, 1), id, id, id);
        }
        assert_eq!(s.len(), PRODUCERS_MAX);
        let newest = PRODUCERS_MAX as i64 + 1;
        let later = EVICTABLE_IDLE_MS + PRODUCERS_MAX as i64;
        s.record(&batch(newest, 0, 0, 1), newest, newest, later);
        assert_eq!(s.len(), PRODUCERS_MAX - PRODUCERS_MAX / 8 + 1);
        assert!(s.get(1).is_none(), "the least recent kept");
        assert!(s.get(newest).is_some() && s.get(newest - 1).is_some());
        // A known producer's batch forgets nothing.
        let len = s.len();
        s.record(&batch(newest, 0, 1, 1), newest + 1, newest + 1, later);
        assert_eq!(s.len(), len);

        // All recent (seen within the idle time, or all at once by a
        // rebuild at open): none is forgotten, and the next look waits
        // for another eighth of the cap.
        let mut s = ProducerStates::default();
        for id in 1..=PRODUCERS_MAX as i64 + 10 {
            s.record(&batch(id, 0, 0, 1), id, id, 7);
        }
        assert_eq!(s.len(), PRODUCERS_MAX + 10);
        assert!(s.get(1).is_some());
    }

    #[test]
    fn snapshots_round_trip_and_reject_corruption() {
        let mut s = ProducerStates::default();
        for pid in 1..5 {
            for i in 0..7 {
                s.record(
                    &batch(pid, 1, i * 2, 2),
                    i64::from(i) * 2,
                    i64::from(i) * 2 + 1,
                    1_000,
                );
            }
        }
        let bytes = s.encode();
        assert_eq!(ProducerStates::decode(&bytes), Some(s.clone()));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert_eq!(ProducerStates::decode(&bad), None, "flipped byte {i}");
        }
        assert_eq!(ProducerStates::decode(&bytes[..bytes.len() - 1]), None);

        let dir = tempfile::tempdir().unwrap();
        for offset in [10, 20, 30] {
            write_snapshot(dir.path(), offset, &s, &[]).unwrap();
        }
        assert_eq!(snapshot_offsets(dir.path()).unwrap(), vec![20, 30]);
        // A roll's snapshot that a crash left empty (written, not yet
        // fsynced) is skipped for the one before it.
        std::fs::write(snapshot_path(dir.path(), 30), b"").unwrap();
        assert_eq!(load_latest(dir.path(), 0, 100).unwrap().unwrap().0, 20);
        assert_eq!(load_latest(dir.path(), 0, 25).unwrap().unwrap().0, 20);
        delete_snapshots_above(dir.path(), 25).unwrap();
        assert_eq!(snapshot_offsets(dir.path()).unwrap(), vec![20]);
        assert!(load_latest(dir.path(), 21, 100).unwrap().is_none());
    }

    #[test]
    fn a_flush_skips_a_snapshot_a_roll_deleted_after_the_listing() {
        // The background flush lists snapshots without the writer lock; a
        // roll may then write a newer one and delete the oldest. Seen in a
        // retention test as "periodic storage task failed ... .snapshot:
        // No such file or directory".
        let dir = tempfile::tempdir().unwrap();
        let s = ProducerStates::default();
        for offset in [10, 20] {
            write_snapshot(dir.path(), offset, &s, &[]).unwrap();
        }
        let listed = snapshot_offsets(dir.path()).unwrap();
        let superseded = write_snapshot_unsynced(dir.path(), 30, &s, &[]).unwrap();
        assert_eq!(superseded, vec![snapshot_path(dir.path(), 10)]);
        std::fs::remove_file(&superseded[0]).unwrap();
        assert_eq!(snapshot_offsets(dir.path()).unwrap(), vec![20, 30]);
        sync_listed(dir.path(), &listed, 0, 30).unwrap();
    }

    /// One snapshot per segment base is kept (a truncation rebuilds from
    /// the base of the segment it cuts into), plus the newest two; those
    /// below the first segment (deleted by retention) go.
    #[test]
    fn snapshots_at_segment_bases_are_kept_until_their_segment_goes() {
        let dir = tempfile::tempdir().unwrap();
        let s = ProducerStates::default();
        let bases = [0, 100, 200, 300];
        for offset in [0, 100, 150, 200, 250, 300] {
            write_snapshot(dir.path(), offset, &s, &bases).unwrap();
        }
        // 150 and 250 are at no base; 250 and 300 are the newest two.
        assert_eq!(
            snapshot_offsets(dir.path()).unwrap(),
            vec![0, 100, 200, 250, 300]
        );
        // Retention deleted the first two segments.
        write_snapshot(dir.path(), 320, &s, &[200, 300]).unwrap();
        assert_eq!(snapshot_offsets(dir.path()).unwrap(), vec![200, 300, 320]);
    }
}
