//! A partition this broker hosts: its log, its role (leader state or the
//! leader it follows), and the watch that wakes long-polling fetches and
//! acks=all producers when the high watermark moves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use runnel_controller::PartitionInfo;
use runnel_replication::{Command, LeaderState};
use tracing::info;

use runnel_storage::{FlushPolicy, Log, LogConfig, TimestampType};
use tokio::sync::watch;

/// This broker's role for a partition, as the metadata says.
#[derive(Debug)]
pub enum Role {
    /// Leads in this epoch; tracks followers.
    Leader(LeaderState),
    /// Follows `leader` in `leader_epoch`.
    Follower { leader: i32, leader_epoch: i32 },
    /// Hosts a replica but the partition has no leader.
    Offline,
}

/// One hosted partition replica.
#[derive(Debug)]
pub struct Partition {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub index: i32,
    /// The topic id this log belongs to (a re-created topic differs).
    pub topic_id: String,
    /// The partition's log.
    pub log: Arc<Log>,
    /// Publishes the high watermark; fetchers and acks=all wait on it.
    hw_tx: watch::Sender<i64>,
    /// Bumped when the low watermark may have moved (a follower reported
    /// another log start, or the ISR changed); DeleteRecords waits on it.
    low_watermark_tx: watch::Sender<u64>,
    /// Leader or follower state. Short critical sections only.
    role: Mutex<Role>,
    /// The log end offset when this replica last became leader: below it,
    /// the leader's high watermark still lags the previous leader's
    /// (followers have not fetched from it yet). Written and read under
    /// the role lock.
    epoch_start: std::sync::atomic::AtomicI64,
}

impl Partition {
    /// Wraps an open log.
    pub fn new(topic: String, index: i32, topic_id: String, log: Arc<Log>) -> Self {
        let (hw_tx, _) = watch::channel(log.high_watermark());
        Self {
            topic,
            index,
            topic_id,
            log,
            hw_tx,
            low_watermark_tx: watch::channel(0).0,
            role: Mutex::new(Role::Offline),
            epoch_start: std::sync::atomic::AtomicI64::new(0),
        }
    }

    fn role(&self) -> std::sync::MutexGuard<'_, Role> {
        self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the high watermark and wakes waiting fetches.
    pub fn advance_high_watermark(&self, offset: i64) {
        self.log.set_high_watermark(offset);
        let hw = self.log.high_watermark();
        self.hw_tx.send_if_modified(|cur| {
            let changed = *cur != hw;
            *cur = hw;
            changed
        });
    }

    /// Runs `append` (a write to this partition's log) where it belongs:
    /// on the calling task when it only copies into the page cache (tens
    /// of µs for a 64 KiB batch; the hop to the blocking pool and back
    /// cost two thread wake-ups per batch, about 30 % of the broker's CPU
    /// under load), on the blocking pool when it may fsync. `None` if the
    /// blocking task was lost (runtime shutting down).
    pub async fn run_append<T: Send + 'static>(
        &self,
        append: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        if self.log.append_may_sync() {
            tokio::task::spawn_blocking(append).await.ok()
        } else {
            Some(append())
        }
    }

    /// A follower's high watermark, learned from the leader of
    /// `leader_epoch`: ignored unless this replica still follows in that
    /// epoch (a round that outlived its epoch must not lower the high
    /// watermark of a replica that leads now).
    pub fn follower_high_watermark(&self, leader_epoch: i32, offset: i64) {
        let role = self.role();
        if matches!(&*role, Role::Follower { leader_epoch: e, .. } if *e == leader_epoch) {
            self.advance_high_watermark(offset);
        }
    }

    /// A receiver that sees every high-watermark change.
    pub fn watch_high_watermark(&self) -> watch::Receiver<i64> {
        self.hw_tx.subscribe()
    }

    /// Applies the metadata's view of this partition. Returns ISR
    /// proposals to send to the controller.
    pub fn update_role(&self, me: i32, info: &PartitionInfo, now_ms: i64) -> Vec<Command> {
        if info.leader == me {
            // A replication round of the epoch this replica followed in
            // may still be under way: it must not truncate or append to
            // the leader's log from here on. Raised before the role lock
            // is taken (it waits for the log's writer, which a follower
            // append may hold through an fsync); it only ever rises.
            self.log.fence_follower_writes(info.leader_epoch);
            // Nor may a produce request checked against an earlier epoch
            // append: leading in epoch E and then in E + 2 (the offline
            // epoch between them coalesced away), such a batch was
            // stamped E after records of E + 2, and answered NOT_LEADER
            // though committed (a retry then stored it twice).
            self.log.fence_leader_appends(info.leader_epoch);
        }
        let mut role = self.role();
        let leo = self.log.log_end_offset();
        if info.leader == me {
            if let Role::Leader(state) = &mut *role {
                if state.leader_epoch() == info.leader_epoch {
                    let before = state.isr();
                    let mut after = info.isr.clone();
                    after.sort_unstable();
                    if before != after {
                        info!(topic = %self.topic, partition = self.index, leader_epoch = info.leader_epoch, partition_epoch = info.partition_epoch, from = ?before, to = ?after, "ISR changed");
                        self.low_watermark_tx
                            .send_modify(|n| *n = n.wrapping_add(1));
                    }
                    state.set_replicas(&info.replicas, now_ms);
                    let cmds = state.on_isr_committed(&info.isr, info.partition_epoch, leo);
                    return self.run(cmds);
                }
            }
            info!(topic = %self.topic, partition = self.index, leader_epoch = info.leader_epoch, isr = ?info.isr, "became leader");
            let mut state = LeaderState::new(
                me,
                info.leader_epoch,
                info.partition_epoch,
                &info.replicas,
                &info.isr,
                self.log.high_watermark(),
                now_ms,
            );
            let cmds = state.on_append(leo);
            *role = Role::Leader(state);
            self.epoch_start
                .store(leo, std::sync::atomic::Ordering::Relaxed);
            return self.run(cmds);
        }
        let next = if info.leader < 0 {
            Role::Offline
        } else {
            Role::Follower {
                leader: info.leader,
                leader_epoch: info.leader_epoch,
            }
        };
        let changed = !matches!((&*role, &next),
            (Role::Follower { leader: a, leader_epoch: b }, Role::Follower { leader: c, leader_epoch: d }) if a == c && b == d)
            && !matches!((&*role, &next), (Role::Offline, Role::Offline));
        if changed {
            info!(topic = %self.topic, partition = self.index, leader = info.leader, leader_epoch = info.leader_epoch, "became follower");
            *role = next;
            drop(role);
            // Before the fetcher truncates to the new leader's log: no
            // produce request checked against the old metadata may
            // append after that.
            self.log.fence_leader_appends(info.leader_epoch);
            // Nor may a replication round of an earlier epoch, still under
            // way (an fsyncing append on the blocking pool outlives its
            // cancelled round), append after the new epoch's fetcher
            // checked where the logs diverge: it would keep the old
            // leader's unreplicated tail, which the new leader may hold
            // other records in.
            self.log
                .fence_follower_writes(info.leader_epoch.saturating_sub(1));
            // Wake producers waiting for replicas as leader, and
            // DeleteRecords waiting for the low watermark: they must
            // learn that leadership moved.
            self.hw_tx.send_modify(|_| {});
            self.low_watermark_tx
                .send_modify(|n| *n = n.wrapping_add(1));
        }
        Vec::new()
    }

    /// On the leader: whether its high watermark has reached where its
    /// leadership started (KIP-207). Until then it lags the previous
    /// leader's, which producers and readers may have seen: offsets from
    /// it would go backwards. `None` on a follower.
    pub fn high_watermark_settled(&self) -> Option<bool> {
        match &*self.role() {
            Role::Leader(_) => Some(
                self.log.high_watermark()
                    >= self.epoch_start.load(std::sync::atomic::Ordering::Relaxed),
            ),
            _ => None,
        }
    }

    /// The leader epoch when this broker leads the partition.
    pub fn leader_epoch(&self) -> Option<i32> {
        match &*self.role() {
            Role::Leader(s) => Some(s.leader_epoch()),
            _ => None,
        }
    }

    /// On the leader: each follower of `replicas` and its log end offset
    /// (-1 until it fetched under this leader). Empty on a follower.
    pub fn follower_offsets(&self, replicas: &[i32]) -> Vec<(i32, i64)> {
        match &*self.role() {
            Role::Leader(s) => replicas
                .iter()
                .filter_map(|id| s.follower(*id).map(|f| (*id, f.log_end_offset)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The committed ISR this leader works with.
    pub fn isr(&self) -> Option<Vec<i32>> {
        match &*self.role() {
            Role::Leader(s) => Some(s.isr()),
            _ => None,
        }
    }

    /// After a leader append: the high watermark may advance.
    pub fn on_append(&self) -> Vec<Command> {
        self.leader_event(|s, leo| s.on_append(leo))
    }

    /// A follower fetched from `fetch_offset`, its log starting at
    /// `log_start_offset`; `eligible` unless its broker is fenced (see
    /// [`LeaderState::on_fetch`]).
    pub fn on_follower_fetch(
        &self,
        follower: i32,
        leader_epoch: i32,
        fetch_offset: i64,
        log_start_offset: i64,
        now_ms: i64,
        eligible: bool,
    ) -> Vec<Command> {
        self.leader_event(|s, leo| {
            // Checked again under the role lock: a fetch checked against
            // epoch E before a move away and back (E + 2) must not count
            // for the new leadership, whose log may have been cut while
            // following.
            if s.leader_epoch() != leader_epoch {
                return Vec::new();
            }
            if s.on_follower_log_start(follower, log_start_offset) {
                self.low_watermark_tx
                    .send_modify(|n| *n = n.wrapping_add(1));
            }
            s.on_fetch(follower, fetch_offset, leo, now_ms, eligible)
        })
    }

    /// On the leader: the smallest log start offset among the in-sync
    /// replicas (-1 while a follower has not reported its own). `None` on
    /// a follower.
    pub fn low_watermark(&self) -> Option<i64> {
        match &*self.role() {
            Role::Leader(s) => Some(s.low_watermark(self.log.log_start_offset())),
            _ => None,
        }
    }

    /// A receiver woken when the low watermark may have moved.
    pub fn watch_low_watermark(&self) -> watch::Receiver<u64> {
        self.low_watermark_tx.subscribe()
    }

    /// Periodic ISR check.
    pub fn on_tick(&self, now_ms: i64, lag_time_max_ms: i64) -> Vec<Command> {
        self.leader_event(|s, _| s.on_tick(now_ms, lag_time_max_ms))
    }

    /// The controller refused this leader's proposal of `proposed` to
    /// partition epoch `proposed_epoch`; `committed` is the ISR the
    /// metadata holds now, in `partition_epoch`.
    pub fn isr_refused(&self, proposed: (&[i32], i32), committed: &[i32], partition_epoch: i32) {
        self.leader_event(|s, leo| s.on_isr_refused(proposed, committed, partition_epoch, leo));
    }

    /// The proposal of `proposed` to `proposed_epoch` got no answer (it
    /// may still commit): the next tick sends it again.
    pub fn isr_unknown(&self, proposed: &[i32], proposed_epoch: i32) {
        self.leader_event(|s, _| {
            s.on_isr_unknown(proposed, proposed_epoch);
            Vec::new()
        });
    }

    /// Feeds an event to the leader state (nothing on a follower) and
    /// runs the high-watermark commands before the role lock is released:
    /// two events decided one after the other (high watermark 10, then
    /// 20) must not store theirs the other way round, leaving the log's
    /// high watermark behind the state's, and acks=all producers of the
    /// records between waiting for an advance the state thinks is done.
    /// Returns the ISR proposals.
    fn leader_event(
        &self,
        event: impl FnOnce(&mut LeaderState, i64) -> Vec<Command>,
    ) -> Vec<Command> {
        let mut role = self.role();
        let leo = self.log.log_end_offset();
        let cmds = match &mut *role {
            Role::Leader(s) => event(s, leo),
            _ => Vec::new(),
        };
        self.run(cmds)
    }

    /// The leader state's high watermark and the log's, read under the
    /// role lock (tests: they must agree whenever the lock is free).
    #[cfg(test)]
    fn high_watermarks(&self) -> Option<(i64, i64)> {
        match &*self.role() {
            Role::Leader(s) => Some((s.high_watermark(), self.log.high_watermark())),
            _ => None,
        }
    }

    /// This broker no longer hosts the replica (its topic was deleted or
    /// recreated, or it moved away): no role, no more appends of any
    /// kind, and whoever waits on it as leader (acks=all, DeleteRecords)
    /// learns at once instead of at its timeout.
    pub fn retire(&self) {
        *self.role() = Role::Offline;
        self.log.fence_leader_appends(i32::MAX);
        self.log.fence_follower_writes(i32::MAX);
        self.hw_tx.send_modify(|_| {});
        self.low_watermark_tx
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Runs high-watermark commands here; returns the ISR proposals.
    fn run(&self, cmds: Vec<Command>) -> Vec<Command> {
        cmds.into_iter()
            .filter(|c| match c {
                Command::AdvanceHighWatermark(hw) => {
                    self.advance_high_watermark(*hw);
                    false
                }
                Command::ProposeIsr { .. } => true,
            })
            .collect()
    }
}

/// Maps effective topic configs (Kafka key names, validated by the
/// controller) to the storage engine's settings.
pub fn log_config(configs: &BTreeMap<String, String>) -> LogConfig {
    let int = |key: &str| configs.get(key).and_then(|v| v.parse::<i64>().ok());
    let positive = |key: &str| int(key).filter(|v| *v >= 0).map(|v| v as u64);
    let mut config = LogConfig::default();
    if let Some(v) = positive("segment.bytes") {
        config.segment_bytes_max = v;
    }
    config.segment_ms_max = positive("segment.ms");
    if let Some(v) = positive("index.interval.bytes") {
        config.index_interval_bytes = v.min(u32::MAX as u64) as u32;
    }
    config.retention_bytes_max = positive("retention.bytes");
    config.retention_ms_max = positive("retention.ms");
    if let Some(v) = positive("max.message.bytes") {
        config.message_bytes_max = v.min(u32::MAX as u64) as u32;
    }
    if let Some(v) = positive("producer.id.expiration.ms") {
        config.producer_id_expiration_ms = v;
    }
    config.preallocate = configs.get("preallocate").map(String::as_str) != Some("false");
    config.timestamp_type = match configs.get("message.timestamp.type").map(String::as_str) {
        Some("LogAppendTime") => TimestampType::LogAppendTime,
        _ => TimestampType::CreateTime,
    };
    let flush_messages = int("flush.messages").filter(|v| *v > 0);
    config.flush = if flush_messages == Some(1) {
        FlushPolicy::EveryBatch
    } else {
        FlushPolicy::Interval {
            messages: flush_messages.map(|v| v as u64),
            ms: positive("flush.ms"),
        }
    };
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A partition of topic "t" over a fresh log in `dir`.
    fn partition_in(dir: &tempfile::TempDir) -> (Arc<Log>, Partition) {
        let log = Arc::new(Log::open(dir.path().join("t-0"), LogConfig::default()).unwrap());
        (log.clone(), Partition::new("t".into(), 0, "id".into(), log))
    }

    /// `replicas`, all in sync, led by `leader` in `leader_epoch`.
    fn in_sync(replicas: &[i32], leader: i32, leader_epoch: i32) -> PartitionInfo {
        PartitionInfo {
            replicas: replicas.to_vec(),
            leader,
            leader_epoch,
            isr: replicas.to_vec(),
            partition_epoch: 0,
            target_replicas: vec![],
            adding: vec![],
            removing: vec![],
        }
    }

    /// A batch of one record at `base_offset`.
    fn one_record(base_offset: i64) -> bytes::Bytes {
        let mut b = runnel_storage::BatchBuilder::new();
        b.push(0, None, Some(b"v"), &[]);
        let mut bytes = b.build();
        runnel_storage::batch::set_base_offset(&mut bytes, base_offset);
        bytes.freeze()
    }

    /// A leader that becomes a follower fences its log: a produce request
    /// checked against the old metadata and appending late is refused.
    #[test]
    fn a_demoted_leader_refuses_appends_from_its_old_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (log, p) = partition_in(&dir);
        let mut info = in_sync(&[1, 2], 1, 3);
        p.update_role(1, &info, 0);
        log.append_as_leader(one_record(0), 3).unwrap();
        info.leader = 2;
        info.leader_epoch = 4;
        p.update_role(1, &info, 0);
        assert!(matches!(
            log.append_as_leader(one_record(0), 3),
            Err(runnel_storage::StorageError::FencedLeaderEpoch { .. })
        ));
        assert_eq!(log.log_end_offset(), 1);
    }

    /// A follower's fetch checked against an earlier leader epoch than the
    /// one now led (the leadership moved away and back in between) does
    /// not count toward the high watermark.
    #[test]
    fn a_fetch_of_an_earlier_leader_epoch_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (log, p) = partition_in(&dir);
        let info = in_sync(&[1, 2], 1, 5);
        p.update_role(1, &info, 0);
        log.append_as_leader(one_record(0), 5).unwrap();
        p.on_append();
        p.on_follower_fetch(2, 3, 1, 0, 0, true);
        assert_eq!(log.high_watermark(), 0);
        p.on_follower_fetch(2, 5, 1, 0, 0, true);
        assert_eq!(log.high_watermark(), 1);
    }

    /// A leader that leads again in a later epoch, with no metadata
    /// in between naming another role (the offline epoch between the two
    /// coalesced away), refuses appends from its earlier epoch: stamped
    /// with it after the later epoch's records, such a batch was
    /// answered NOT_LEADER though committed.
    #[test]
    fn a_leader_of_a_later_epoch_refuses_appends_from_its_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let (log, p) = partition_in(&dir);
        let mut info = in_sync(&[1, 2], 1, 3);
        p.update_role(1, &info, 0);
        log.append_as_leader(one_record(0), 3).unwrap();
        info.leader_epoch = 5;
        p.update_role(1, &info, 0);
        log.append_as_leader(one_record(0), 5).unwrap();
        let late = log.append_as_leader(one_record(0), 3);
        assert!(
            matches!(
                late,
                Err(runnel_storage::StorageError::FencedLeaderEpoch { .. })
            ),
            "{late:?}"
        );
        assert_eq!(log.log_end_offset(), 2);
    }

    /// A follower that moves to a new leader epoch refuses follower
    /// writes of the epoch it followed before: a round of that epoch still
    /// under way (an fsyncing append outlives its cancelled round) would
    /// otherwise land after the new epoch's fetcher checked divergence.
    #[test]
    fn a_follower_of_a_new_epoch_refuses_writes_of_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (log, p) = partition_in(&dir);
        let mut info = in_sync(&[1, 2, 3], 2, 4);
        p.update_role(1, &info, 0);
        log.append_following(4, one_record(0)).unwrap();
        info.leader = 3;
        info.leader_epoch = 5;
        p.update_role(1, &info, 0);
        let late = log.append_following(4, one_record(1));
        assert!(
            matches!(
                late,
                Err(runnel_storage::StorageError::FencedFollowerEpoch { .. })
            ),
            "{late:?}"
        );
        assert_eq!(log.log_end_offset(), 1);
    }

    /// A replica this broker stops hosting wakes its acks=all waiters
    /// (they see no leadership) and takes no more writes of any kind.
    #[test]
    fn a_retired_replica_wakes_its_waiters_and_takes_no_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (log, p) = partition_in(&dir);
        let info = in_sync(&[1, 2], 1, 3);
        p.update_role(1, &info, 0);
        let mut hw = p.watch_high_watermark();
        hw.mark_unchanged();
        p.retire();
        assert!(hw.has_changed().unwrap());
        assert_eq!(p.leader_epoch(), None);
        assert!(log.append_as_leader(one_record(0), 3).is_err());
        assert!(log.append_following(4, one_record(0)).is_err());
        assert_eq!(log.log_end_offset(), 0);
    }

    /// Two followers' fetches, each on its own thread, while a third
    /// thread appends: every thread checks that the log's high watermark
    /// is never below one it saw before, and the followers that the one
    /// stored equals the one the leader state decided whenever the role
    /// lock is free. Storing a decided high watermark after releasing the
    /// role lock let an older, smaller one land last.
    #[test]
    fn the_high_watermark_never_moves_backwards_under_concurrent_events() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::open(dir.path().join("t-0"), LogConfig::default()).unwrap());
        let p = Arc::new(Partition::new("t".into(), 0, "id".into(), log.clone()));
        let info = in_sync(&[1, 2, 3], 1, 0);
        assert!(p.update_role(1, &info, 0).is_empty());
        let done = AtomicBool::new(false);
        // What this thread saw last: the high watermark one thread reads
        // must never be below what it read before.
        let check = |seen: &mut i64| {
            let hw = log.high_watermark();
            assert!(hw >= *seen, "high watermark {hw} after {seen}");
            *seen = hw;
        };
        std::thread::scope(|scope| {
            for follower in [2, 3] {
                let (p, log, done) = (&p, &log, &done);
                scope.spawn(move || {
                    let mut seen = 0;
                    while !done.load(Ordering::Acquire) {
                        p.on_follower_fetch(follower, 0, log.log_end_offset(), 0, 0, true);
                        check(&mut seen);
                        let (decided, stored) = p.high_watermarks().unwrap();
                        assert_eq!(decided, stored, "decided and stored");
                    }
                });
            }
            // Stops the followers however this thread ends, a failed
            // check included, so that the scope can join them.
            struct Stop<'a>(&'a AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _stop = Stop(&done);
            let mut batch = runnel_storage::BatchBuilder::new();
            batch.push(0, None, Some(b"v"), &[]);
            let batch = batch.build().freeze();
            let mut seen = 0;
            for _ in 0..100_000 {
                log.append_as_leader(batch.clone(), 0).unwrap();
                p.on_append();
                check(&mut seen);
            }
        });
        assert!(log.high_watermark() > 0);
    }

    #[test]
    fn kafka_keys_map_to_storage_settings() {
        let mut c = runnel_controller::topic_config::builtin_defaults();
        c.insert("segment.bytes".into(), "2048".into());
        c.insert("retention.ms".into(), "-1".into());
        c.insert("message.timestamp.type".into(), "LogAppendTime".into());
        c.insert("flush.messages".into(), "1".into());
        let l = log_config(&c);
        assert_eq!(l.segment_bytes_max, 2048);
        assert_eq!(l.retention_ms_max, None);
        assert_eq!(l.retention_bytes_max, None);
        assert_eq!(l.timestamp_type, TimestampType::LogAppendTime);
        assert_eq!(l.flush, FlushPolicy::EveryBatch);
        assert_eq!(l.message_bytes_max, 1_048_588);
        assert!(l.preallocate);
        c.insert("preallocate".into(), "false".into());
        assert!(!log_config(&c).preallocate);
        c.insert("flush.messages".into(), "-1".into());
        // The default leaves flushing to the OS, as Kafka does.
        assert_eq!(
            log_config(&c).flush,
            FlushPolicy::Interval {
                messages: None,
                ms: None
            }
        );
        c.insert("flush.ms".into(), "1000".into());
        assert_eq!(
            log_config(&c).flush,
            FlushPolicy::Interval {
                messages: None,
                ms: Some(1000)
            }
        );
    }
}
