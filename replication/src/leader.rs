//! Leader-side bookkeeping of one partition, written as a pure state
//! machine: events in (a follower fetched, the leader appended, time
//! passed, the controller committed an ISR), commands out (advance the high
//! watermark, propose a new ISR). The broker runs the commands.

use std::collections::{BTreeMap, BTreeSet};

/// What the broker must do after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Set the partition's high watermark to this offset (it only grows).
    AdvanceHighWatermark(i64),
    /// Ask the controller to commit `isr` (sorted broker ids), a change
    /// of the ISR this leader knew in `leader_epoch` and `partition_epoch`:
    /// the controller refuses it if the partition changed since.
    ProposeIsr {
        isr: Vec<i32>,
        leader_epoch: i32,
        partition_epoch: i32,
    },
}

/// What the leader knows of one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerProgress {
    /// The follower's log end offset (its last fetch offset); -1 until it
    /// fetches under this leader.
    pub log_end_offset: i64,
    /// Last time (ms) the follower had everything the leader had.
    pub last_caught_up_ms: i64,
    /// The follower's log start offset as its last fetch reported it; -1
    /// until then.
    pub log_start_offset: i64,
    /// The leader's log end offset when this follower last fetched, and
    /// when that was: a fetch that reaches it shows the follower had, at
    /// the time of that earlier fetch, everything the leader had.
    last_fetch_leader_log_end_offset: i64,
    last_fetch_ms: i64,
}

impl FollowerProgress {
    /// A follower not heard from yet, given lag grace from `now_ms`.
    fn new(now_ms: i64) -> Self {
        FollowerProgress {
            log_end_offset: -1,
            last_caught_up_ms: now_ms,
            log_start_offset: -1,
            last_fetch_leader_log_end_offset: i64::MAX,
            last_fetch_ms: now_ms,
        }
    }

    /// Records a fetch from `fetch_offset` at `now_ms`, when the leader's
    /// log ended at `leader_log_end_offset`. Returns whether the follower
    /// is caught up: it has the leader's log end, now or as of its
    /// previous fetch. The second case is Kafka's rule too
    /// (`Replica.updateFetchState`): under steady produce the leader has
    /// appended again by the time the follower's next fetch arrives, so a
    /// follower that keeps up is rarely at the very end, and would
    /// otherwise leave the ISR after `replica.lag.time.max.ms` however
    /// closely it follows.
    fn fetched(&mut self, fetch_offset: i64, leader_log_end_offset: i64, now_ms: i64) -> bool {
        self.log_end_offset = fetch_offset;
        let caught_up = if fetch_offset >= leader_log_end_offset {
            self.last_caught_up_ms = self.last_caught_up_ms.max(now_ms);
            true
        } else if fetch_offset >= self.last_fetch_leader_log_end_offset {
            self.last_caught_up_ms = self.last_caught_up_ms.max(self.last_fetch_ms);
            true
        } else {
            false
        };
        self.last_fetch_leader_log_end_offset = leader_log_end_offset;
        self.last_fetch_ms = now_ms;
        caught_up
    }
}

/// One partition's leader state.
#[derive(Clone, Debug)]
pub struct LeaderState {
    leader_id: i32,
    leader_epoch: i32,
    /// The ISR as committed by the controller (includes the leader).
    isr: BTreeSet<i32>,
    followers: BTreeMap<i32, FollowerProgress>,
    high_watermark: i64,
    /// An ISR change sent to the controller and not yet committed.
    pending_isr: Option<PendingIsr>,
    /// The partition epoch of the committed ISR this state holds.
    partition_epoch: i32,
}

/// An ISR proposal in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PendingIsr {
    /// The ISR asked for (sorted).
    isr: Vec<i32>,
    /// The partition epoch it changes: the controller applies it only to
    /// that epoch, so once the metadata shows another, the proposal was
    /// either applied or will be refused.
    partition_epoch: i32,
    /// Its fate is unknown (the submit failed without a refusal: it may
    /// still commit): the next tick sends it again.
    resend: bool,
}

impl LeaderState {
    /// A leader starting at `high_watermark`; every follower gets a full
    /// `replica.lag.time.max.ms` of grace from `now_ms`.
    pub fn new(
        leader_id: i32,
        leader_epoch: i32,
        partition_epoch: i32,
        replicas: &[i32],
        isr: &[i32],
        high_watermark: i64,
        now_ms: i64,
    ) -> Self {
        let followers = replicas
            .iter()
            .filter(|r| **r != leader_id)
            .map(|r| (*r, FollowerProgress::new(now_ms)))
            .collect();
        Self {
            leader_id,
            leader_epoch,
            isr: isr.iter().copied().collect(),
            followers,
            high_watermark,
            pending_isr: None,
            partition_epoch,
        }
    }

    /// The leader epoch this state belongs to.
    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch
    }

    /// The committed ISR.
    pub fn isr(&self) -> Vec<i32> {
        self.isr.iter().copied().collect()
    }

    /// The high watermark as this state computed it.
    pub fn high_watermark(&self) -> i64 {
        self.high_watermark
    }

    /// A follower's progress.
    pub fn follower(&self, id: i32) -> Option<FollowerProgress> {
        self.followers.get(&id).copied()
    }

    /// Smallest log end offset over the ISR; an ISR follower that has not
    /// fetched yet holds the high watermark where it is. While a proposal
    /// is in flight the ISR counted is the larger of the two (Kafka's
    /// "maximal ISR"): a follower about to join holds the high watermark
    /// as a member would, so that once the controller commits it, it has
    /// every record below the high watermark; one about to leave holds it
    /// until the controller has removed it.
    fn isr_minimum(&self, leader_log_end_offset: i64) -> i64 {
        let joining = self.pending_isr.iter().flat_map(|p| &p.isr);
        self.isr
            .iter()
            .chain(joining)
            .filter(|id| **id != self.leader_id)
            .map(|id| match self.followers.get(id) {
                Some(f) if f.log_end_offset >= 0 => f.log_end_offset,
                _ => self.high_watermark,
            })
            .fold(leader_log_end_offset, i64::min)
    }

    fn maybe_advance(&mut self, leader_log_end_offset: i64, out: &mut Vec<Command>) {
        let candidate = self.isr_minimum(leader_log_end_offset);
        if candidate > self.high_watermark {
            self.high_watermark = candidate;
            out.push(Command::AdvanceHighWatermark(candidate));
        }
    }

    fn propose(&mut self, isr: BTreeSet<i32>, out: &mut Vec<Command>) {
        let isr: Vec<i32> = isr.into_iter().collect();
        self.pending_isr = Some(PendingIsr {
            isr: isr.clone(),
            partition_epoch: self.partition_epoch,
            resend: false,
        });
        out.push(Command::ProposeIsr {
            isr,
            leader_epoch: self.leader_epoch,
            partition_epoch: self.partition_epoch,
        });
    }

    /// The leader appended; its log now ends at `leader_log_end_offset`.
    pub fn on_append(&mut self, leader_log_end_offset: i64) -> Vec<Command> {
        let mut out = Vec::new();
        self.maybe_advance(leader_log_end_offset, &mut out);
        out
    }

    /// A follower fetched from `fetch_offset` (so it holds everything
    /// below). Returns the commands; an unknown follower is ignored.
    /// Without `eligible` (its broker is fenced, or shutting down), a
    /// caught-up follower outside the ISR is not proposed back into it,
    /// as KIP-841 has it: the controller refuses such a proposal, and
    /// each of its fetches proposed it again, a Raft entry every time.
    pub fn on_fetch(
        &mut self,
        follower: i32,
        fetch_offset: i64,
        leader_log_end_offset: i64,
        now_ms: i64,
        eligible: bool,
    ) -> Vec<Command> {
        let mut out = Vec::new();
        let Some(progress) = self.followers.get_mut(&follower) else {
            return out;
        };
        let caught_up = progress.fetched(fetch_offset, leader_log_end_offset, now_ms);
        self.maybe_advance(leader_log_end_offset, &mut out);
        // Rejoin: a follower outside the ISR that reached the log end (as
        // `fetched` counts it) and holds every record below the high
        // watermark, so that adding it never leaves a member without a
        // committed record.
        if caught_up
            && eligible
            && fetch_offset >= self.high_watermark
            && !self.isr.contains(&follower)
            && self.pending_isr.is_none()
        {
            let mut isr = self.isr.clone();
            isr.insert(follower);
            self.propose(isr, &mut out);
        }
        out
    }

    /// A follower's fetch reported its log start offset. Returns whether
    /// it moved (the low watermark may have).
    pub fn on_follower_log_start(&mut self, follower: i32, log_start_offset: i64) -> bool {
        match self.followers.get_mut(&follower) {
            Some(f) if f.log_start_offset != log_start_offset => {
                f.log_start_offset = log_start_offset;
                true
            }
            _ => false,
        }
    }

    /// The partition's low watermark (Kafka's): the smallest log start
    /// offset among the in-sync replicas, the leader's being
    /// `leader_log_start_offset`; -1 while an in-sync follower has not
    /// reported one. Records below it are gone from every replica that
    /// could lead.
    pub fn low_watermark(&self, leader_log_start_offset: i64) -> i64 {
        self.isr
            .iter()
            .filter(|id| **id != self.leader_id)
            .map(|id| self.followers.get(id).map_or(-1, |f| f.log_start_offset))
            .fold(leader_log_start_offset, i64::min)
    }

    /// Periodic check: ISR followers not caught up for longer than
    /// `lag_time_max_ms` are proposed for removal, and a proposal whose
    /// fate is unknown is sent again (as it was: the controller applies
    /// it at most once, to the partition epoch it names).
    pub fn on_tick(&mut self, now_ms: i64, lag_time_max_ms: i64) -> Vec<Command> {
        let mut out = Vec::new();
        if let Some(p) = &mut self.pending_isr {
            if std::mem::take(&mut p.resend) {
                out.push(Command::ProposeIsr {
                    isr: p.isr.clone(),
                    leader_epoch: self.leader_epoch,
                    partition_epoch: p.partition_epoch,
                });
            }
            return out;
        }
        let lagging: Vec<i32> = self
            .isr
            .iter()
            .filter(|id| **id != self.leader_id)
            .filter(|id| {
                self.followers
                    .get(id)
                    .is_some_and(|f| now_ms - f.last_caught_up_ms > lag_time_max_ms)
            })
            .copied()
            .collect();
        if !lagging.is_empty() {
            let isr = self
                .isr
                .iter()
                .copied()
                .filter(|id| !lagging.contains(id))
                .collect();
            self.propose(isr, &mut out);
        }
        out
    }

    /// The metadata lists `isr` as this partition's committed ISR, in
    /// `partition_epoch` (on every metadata change, whether or not it
    /// changed the ISR). A proposal in flight stays in flight while the
    /// partition epoch is the one it changes: an unrelated change must not
    /// let the leader propose again while the first proposal may still
    /// commit. Once the epoch moved on, the proposal was applied (perhaps
    /// with more: completing a reassignment trims the ISR in the same
    /// step) or will be refused, and the ISR committed is what counts.
    /// Shrinking may let the high watermark advance.
    pub fn on_isr_committed(
        &mut self,
        isr: &[i32],
        partition_epoch: i32,
        leader_log_end_offset: i64,
    ) -> Vec<Command> {
        self.partition_epoch = partition_epoch;
        let mut isr: Vec<i32> = isr.to_vec();
        isr.sort_unstable();
        isr.dedup();
        if self
            .pending_isr
            .as_ref()
            .is_some_and(|p| p.partition_epoch != partition_epoch || p.isr == isr)
        {
            self.pending_isr = None;
        }
        self.isr = isr.into_iter().collect();
        let mut out = Vec::new();
        self.maybe_advance(leader_log_end_offset, &mut out);
        out
    }

    /// The controller refused the proposal of `proposed` to partition
    /// epoch `proposed_epoch`; `isr` is the ISR committed now, in
    /// `partition_epoch`. If that proposal is the one in flight, the next
    /// event may propose again; a refusal of an earlier one changes
    /// nothing of a later one's.
    pub fn on_isr_refused(
        &mut self,
        (proposed, proposed_epoch): (&[i32], i32),
        isr: &[i32],
        partition_epoch: i32,
        leader_log_end_offset: i64,
    ) -> Vec<Command> {
        if self.is_pending(proposed, proposed_epoch) {
            self.pending_isr = None;
        }
        self.on_isr_committed(isr, partition_epoch, leader_log_end_offset)
    }

    /// The proposal of `proposed` to partition epoch `proposed_epoch` was
    /// neither committed nor refused as far as the leader knows (the
    /// controller could not be reached in time: it may still commit). If
    /// it is the one in flight, the next tick sends it again.
    pub fn on_isr_unknown(&mut self, proposed: &[i32], proposed_epoch: i32) {
        if self.is_pending(proposed, proposed_epoch) {
            if let Some(p) = &mut self.pending_isr {
                p.resend = true;
            }
        }
    }

    fn is_pending(&self, proposed: &[i32], proposed_epoch: i32) -> bool {
        self.pending_isr
            .as_ref()
            .is_some_and(|p| p.isr == proposed && p.partition_epoch == proposed_epoch)
    }

    /// The replica set changed under the same leader epoch (a
    /// reassignment added or dropped replicas): new followers are tracked
    /// from `now_ms` with a full lag grace, dropped ones forgotten.
    pub fn set_replicas(&mut self, replicas: &[i32], now_ms: i64) {
        self.followers.retain(|id, _| replicas.contains(id));
        for r in replicas.iter().filter(|r| **r != self.leader_id) {
            self.followers
                .entry(*r)
                .or_insert(FollowerProgress::new(now_ms));
        }
    }

    /// Whether an ISR proposal is in flight.
    pub fn has_pending_isr(&self) -> bool {
        self.pending_isr.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Command::*;

    #[test]
    fn the_low_watermark_is_the_smallest_in_sync_log_start() {
        let mut s = LeaderState::new(1, 0, 0, &[1, 2, 3], &[1, 2, 3], 0, 0);
        assert_eq!(s.low_watermark(40), -1, "followers not heard from");
        assert!(s.on_follower_log_start(2, 40));
        assert!(!s.on_follower_log_start(2, 40), "no change");
        assert_eq!(s.low_watermark(40), -1);
        assert!(s.on_follower_log_start(3, 30));
        assert_eq!(s.low_watermark(40), 30);
        assert_eq!(s.low_watermark(20), 20, "the leader's counts");
        // A follower outside the ISR does not hold it back.
        s.on_isr_committed(&[1, 2], 1, 0);
        assert_eq!(s.low_watermark(40), 40);
        assert!(!s.on_follower_log_start(9, 5), "not a replica");
    }

    /// The proposal of `isr` that `s` makes, with its epochs.
    fn proposal(s: &LeaderState, isr: Vec<i32>) -> Command {
        ProposeIsr {
            isr,
            leader_epoch: s.leader_epoch,
            partition_epoch: s.partition_epoch,
        }
    }

    /// A proposal carries the epochs of the ISR it changes, so that the
    /// controller refuses it once the partition has moved on (taking the
    /// epochs current when it is sent let a stale proposal through).
    #[test]
    fn a_proposal_carries_the_epochs_of_the_isr_it_changes() {
        let mut s = LeaderState::new(1, 7, 4, &[1, 2, 3], &[1, 2, 3], 0, 0);
        s.on_append(10);
        s.on_fetch(2, 10, 10, 1, true);
        let want = |partition_epoch| ProposeIsr {
            isr: vec![1, 2],
            leader_epoch: 7,
            partition_epoch,
        };
        assert_eq!(s.on_tick(30_001, 30_000), vec![want(4)]);
        // Refused: the metadata had moved on to partition epoch 6.
        s.on_isr_refused((&[1, 2], 4), &[1, 2, 3], 6, 10);
        s.on_fetch(2, 10, 10, 30_001, true);
        assert_eq!(s.on_tick(30_002, 30_000), vec![want(6)]);
    }

    fn three(now: i64) -> LeaderState {
        LeaderState::new(1, 5, 0, &[1, 2, 3], &[1, 2, 3], 0, now)
    }

    #[test]
    fn high_watermark_waits_for_every_isr_member() {
        let mut s = three(0);
        assert_eq!(s.on_append(10), vec![]);
        assert_eq!(s.on_fetch(2, 10, 10, 1, true), vec![]);
        assert_eq!(s.on_fetch(3, 4, 10, 1, true), vec![AdvanceHighWatermark(4)]);
        assert_eq!(
            s.on_fetch(3, 10, 10, 2, true),
            vec![AdvanceHighWatermark(10)]
        );
        // Never moves backwards.
        assert_eq!(s.on_fetch(3, 7, 10, 3, true), vec![]);
        assert_eq!(s.high_watermark(), 10);
    }

    #[test]
    fn a_single_replica_isr_commits_on_append() {
        let mut s = LeaderState::new(1, 0, 0, &[1], &[1], 0, 0);
        assert_eq!(s.on_append(3), vec![AdvanceHighWatermark(3)]);
    }

    #[test]
    fn lagging_follower_is_proposed_out_and_hw_advances_without_it() {
        let mut s = three(0);
        s.on_append(10);
        s.on_fetch(2, 10, 10, 100, true);
        s.on_fetch(3, 2, 10, 100, true);
        assert_eq!(s.high_watermark(), 2);
        // Follower 2 caught up at 100, follower 3 never since 0.
        assert_eq!(s.on_tick(20_000, 30_000), vec![]);
        assert_eq!(s.on_tick(30_001, 30_000), vec![proposal(&s, vec![1, 2])]);
        // Only one proposal at a time.
        assert_eq!(s.on_tick(40_000, 30_000), vec![]);
        assert_eq!(
            s.on_isr_committed(&[1, 2], 0, 10),
            vec![AdvanceHighWatermark(10)]
        );
    }

    #[test]
    fn a_replica_added_by_reassignment_joins_once_caught_up() {
        let mut s = LeaderState::new(1, 0, 0, &[1, 2], &[1, 2], 0, 0);
        s.on_append(10);
        // Unknown before the replica set changes.
        assert_eq!(s.on_fetch(3, 10, 10, 1, true), vec![]);
        s.set_replicas(&[1, 2, 3], 1);
        assert_eq!(s.follower(3).unwrap().log_end_offset, -1);
        assert_eq!(s.on_fetch(3, 4, 10, 2, true), vec![]);
        assert_eq!(
            s.on_fetch(3, 10, 10, 3, true),
            vec![proposal(&s, vec![1, 2, 3])]
        );
        s.on_isr_committed(&[1, 2, 3], 0, 10);
        // Dropped again: forgotten.
        s.set_replicas(&[1, 3], 4);
        assert!(s.follower(2).is_none());
    }

    /// A fenced follower's fetches keep its progress (and the high
    /// watermark) but never propose it into the ISR; once eligible again,
    /// its next fetch does.
    #[test]
    fn a_fenced_follower_is_not_proposed_into_the_isr() {
        let mut s = LeaderState::new(1, 0, 0, &[1, 2, 3], &[1, 2], 0, 0);
        s.on_append(10);
        s.on_fetch(2, 10, 10, 1, true);
        for now in 2..5 {
            assert_eq!(s.on_fetch(3, 10, 10, now, false), vec![]);
        }
        assert_eq!(s.follower(3).unwrap().log_end_offset, 10);
        assert_eq!(
            s.on_fetch(3, 10, 10, 6, true),
            vec![proposal(&s, vec![1, 2, 3])]
        );
    }

    #[test]
    fn follower_rejoins_once_it_reaches_the_log_end() {
        let mut s = LeaderState::new(1, 0, 0, &[1, 2], &[1], 0, 0);
        s.on_append(10);
        assert_eq!(s.on_fetch(2, 5, 10, 1, true), vec![]);
        assert_eq!(
            s.on_fetch(2, 10, 10, 2, true),
            vec![proposal(&s, vec![1, 2])]
        );
        assert!(s.has_pending_isr());
        assert_eq!(s.on_isr_committed(&[1, 2], 0, 10), vec![]);
        assert_eq!(s.isr(), vec![1, 2]);
    }

    #[test]
    fn unknown_follower_positions_hold_the_high_watermark() {
        // A new leader does not know where followers are: HW stays until
        // they fetch.
        let mut s = LeaderState::new(2, 1, 0, &[1, 2, 3], &[1, 2, 3], 7, 0);
        assert_eq!(s.on_append(12), vec![]);
        assert_eq!(s.on_fetch(1, 12, 12, 1, true), vec![]);
        assert_eq!(s.on_fetch(3, 9, 12, 1, true), vec![AdvanceHighWatermark(9)]);
    }

    #[test]
    fn a_follower_that_keeps_up_under_steady_appends_stays_in_the_isr() {
        // The leader appends between every two fetches, so the follower
        // is never at the very end; each fetch reaches the end the leader
        // had at the previous one.
        let mut s = three(0);
        let mut leo = 0;
        for t in 1..=100 {
            let fetch_offset = leo; // what the previous answer carried
            leo += 10;
            s.on_append(leo);
            s.on_fetch(2, fetch_offset, leo, t * 1_000, true);
            s.on_fetch(3, leo, leo, t * 1_000, true);
            assert_eq!(s.on_tick(t * 1_000, 30_000), vec![], "at {t} s");
        }
        // Caught up as of its previous fetch, one second before.
        assert_eq!(s.follower(2).unwrap().last_caught_up_ms, 99_000);
        // One that falls behind what the leader had is not.
        s.on_append(leo + 10);
        s.on_fetch(2, leo - 5, leo + 10, 101_000, true);
        assert_eq!(s.follower(2).unwrap().last_caught_up_ms, 99_000);
        assert_eq!(s.on_tick(129_001, 30_000), vec![proposal(&s, vec![1, 3])]);
    }

    #[test]
    fn a_follower_rejoins_only_with_every_committed_record() {
        let mut s = LeaderState::new(1, 0, 0, &[1, 2, 3], &[1, 2], 0, 0);
        s.on_append(20);
        s.on_fetch(2, 20, 20, 1, true);
        assert_eq!(s.high_watermark(), 20);
        // Follower 3 reaches where the leader ended at its previous fetch,
        // but not the high watermark: not yet.
        s.on_fetch(3, 0, 10, 2, true);
        assert_eq!(s.on_fetch(3, 10, 20, 3, true), vec![]);
        assert_eq!(
            s.on_fetch(3, 20, 30, 4, true),
            vec![proposal(&s, vec![1, 2, 3])]
        );
    }

    #[test]
    fn a_follower_about_to_join_holds_the_high_watermark() {
        let mut s = LeaderState::new(1, 0, 0, &[1, 2, 3], &[1, 2], 0, 0);
        s.on_append(10);
        s.on_fetch(2, 10, 10, 1, true);
        assert_eq!(
            s.on_fetch(3, 10, 10, 1, true),
            vec![proposal(&s, vec![1, 2, 3])]
        );
        // While the proposal is in flight, follower 3 counts: the high
        // watermark may not pass what it holds.
        s.on_append(30);
        assert_eq!(s.on_fetch(2, 30, 30, 2, true), vec![]);
        assert_eq!(s.high_watermark(), 10);
        assert_eq!(
            s.on_fetch(3, 25, 30, 2, true),
            vec![AdvanceHighWatermark(25)]
        );
        // Refused: back to the committed ISR, without follower 3.
        assert_eq!(
            s.on_isr_refused((&[1, 2, 3], 0), &[1, 2], 0, 30),
            vec![AdvanceHighWatermark(30)]
        );
        assert!(!s.has_pending_isr());
    }

    /// Completing a reassignment commits an ISR other than the one
    /// proposed (the expansion, trimmed to the target replicas) in the
    /// same step: the proposal is done all the same, and the high
    /// watermark moves on without the replica that left (it stayed
    /// frozen, the proposal pending for good).
    #[test]
    fn a_proposal_committed_in_another_shape_is_done() {
        let mut s = LeaderState::new(1, 0, 3, &[1, 2], &[1, 2], 0, 0);
        s.set_replicas(&[1, 2, 3], 1);
        s.on_append(10);
        s.on_fetch(2, 10, 10, 2, true);
        assert_eq!(
            s.on_fetch(3, 10, 10, 2, true),
            vec![proposal(&s, vec![1, 2, 3])]
        );
        // Applied as ISR [1, 3], replicas [1, 3], two epochs on.
        s.set_replicas(&[1, 3], 3);
        assert_eq!(s.on_isr_committed(&[1, 3], 5, 10), vec![]);
        assert!(!s.has_pending_isr());
        s.on_append(20);
        assert_eq!(
            s.on_fetch(3, 20, 20, 4, true),
            vec![AdvanceHighWatermark(20)]
        );
    }

    /// A proposal whose submit failed without an answer is sent again,
    /// to the same epoch; a refusal of an older proposal leaves a newer
    /// one in flight.
    #[test]
    fn an_unanswered_proposal_is_sent_again_and_old_refusals_are_ignored() {
        let mut s = three(0);
        s.on_append(10);
        s.on_fetch(2, 10, 10, 1, true);
        let first = s.on_tick(30_001, 30_000);
        assert_eq!(first, vec![proposal(&s, vec![1, 2])]);
        assert_eq!(s.on_tick(30_002, 30_000), vec![], "in flight");
        // Unknown fate for another proposal: nothing to send again.
        s.on_isr_unknown(&[1, 3], 0);
        assert_eq!(s.on_tick(30_003, 30_000), vec![]);
        s.on_isr_unknown(&[1, 2], 0);
        assert_eq!(s.on_tick(30_004, 30_000), first, "sent again, as it was");
        assert_eq!(s.on_tick(30_005, 30_000), vec![], "once");
        // A refusal of some earlier proposal: this one stays in flight.
        s.on_isr_refused((&[1, 2, 3], 0), &[1, 2, 3], 0, 10);
        assert!(s.has_pending_isr());
        s.on_isr_refused((&[1, 2], 0), &[1, 2, 3], 0, 10);
        assert!(!s.has_pending_isr());
    }

    #[test]
    fn a_proposal_stays_in_flight_across_unrelated_metadata() {
        let mut s = three(0);
        s.on_append(10);
        s.on_fetch(2, 10, 10, 1, true);
        assert_eq!(s.on_tick(30_001, 30_000), vec![proposal(&s, vec![1, 2])]);
        // Metadata changes elsewhere: the same committed ISR is applied
        // again. The proposal is still in flight, so none is sent again.
        assert_eq!(s.on_isr_committed(&[3, 1, 2], 0, 10), vec![]);
        assert!(s.has_pending_isr());
        assert_eq!(s.on_tick(40_000, 30_000), vec![]);
        // The commit arrives (in any order of ids).
        assert_eq!(
            s.on_isr_committed(&[2, 1], 0, 10),
            vec![AdvanceHighWatermark(10)]
        );
        assert!(!s.has_pending_isr());
        assert_eq!(s.isr(), vec![1, 2]);
    }

    #[test]
    fn followers_outside_the_isr_never_hold_the_high_watermark() {
        let mut s = LeaderState::new(1, 0, 0, &[1, 2], &[1], 0, 0);
        assert_eq!(s.on_append(5), vec![AdvanceHighWatermark(5)]);
        // Behind, so not proposed to join either.
        assert_eq!(s.on_fetch(2, 0, 5, 0, true), vec![]);
        assert_eq!(s.on_append(8), vec![AdvanceHighWatermark(8)]);
    }
}
