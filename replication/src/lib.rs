//! Runnel's replication rules: how far the high watermark may advance and
//! whether a produce with acks=all may proceed.
//!
//! Where it sits on the data path: between the partition leader's append
//! (storage) and the answer to the producer. The broker's replica fetchers
//! and its `Replication` gRPC service (in `src/replica/`) do the I/O; the
//! decisions are made here, as pure state machines:
//! - [`leader`]: follower progress, high watermark, ISR shrink and expand.
//! - [`throttle`]: the replication byte-rate limit.
//!
//! ```
//! use runnel_replication::high_watermark;
//! // Leader at 10, followers at 7 and 9: records below 7 are on every ISR member.
//! assert_eq!(high_watermark(&[10, 7, 9]), Some(7));
//! ```

pub mod leader;
pub mod throttle;

pub use leader::{Command, FollowerProgress, LeaderState};
pub use throttle::Throttle;

/// The high watermark of an ISR whose members have these log end offsets:
/// the smallest of them (every ISR member holds every record below it).
/// `None` for an empty ISR.
pub fn high_watermark(isr_log_end_offsets: &[i64]) -> Option<i64> {
    isr_log_end_offsets.iter().copied().min()
}

/// Whether acks=all may append: the ISR must have at least
/// `min_insync_replicas` members.
pub fn enough_replicas(isr_size: usize, min_insync_replicas: i32) -> bool {
    isr_size as i64 >= i64::from(min_insync_replicas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_watermark_is_the_isr_minimum() {
        // (ISR log end offsets, expected high watermark)
        let table: &[(&[i64], Option<i64>)] = &[
            (&[], None),
            (&[5], Some(5)),
            (&[5, 5, 5], Some(5)),
            (&[9, 3, 7], Some(3)),
            (&[0, 100], Some(0)),
        ];
        for (leos, want) in table {
            assert_eq!(high_watermark(leos), *want, "{leos:?}");
        }
    }

    #[test]
    fn min_isr_gate() {
        assert!(enough_replicas(1, 1));
        assert!(!enough_replicas(1, 2));
        assert!(enough_replicas(3, 2));
    }
}

/// Where a follower must truncate after asking the leader for the end of
/// its latest epoch (KIP-101, with KIP-279's fix for epochs the leader
/// never had): `leader_answer` is the leader's (largest epoch ≤ the
/// follower's latest, that epoch's end offset); `follower_end_of` is the
/// follower's own end offset for that same epoch. Returns the offset to
/// truncate to, or `None` when the follower's log is a prefix of the
/// leader's.
pub fn truncation_offset(
    follower_log_end_offset: i64,
    follower_end_of: Option<(i32, i64)>,
    leader_answer: (i32, i64),
) -> Option<i64> {
    let (leader_epoch, leader_end) = leader_answer;
    let mut target = leader_end.min(follower_log_end_offset);
    // The follower's own end of its largest epoch ≤ the leader's: every
    // later follower record was written in an epoch > `leader_epoch` that
    // the leader never had at those offsets.
    if let Some((epoch, end)) = follower_end_of {
        debug_assert!(epoch <= leader_epoch || leader_epoch < 0);
        target = target.min(end);
    }
    (target < follower_log_end_offset).then_some(target.max(0))
}

/// The follower's end of the epoch the leader answered: its own end of
/// its largest epoch ≤ `answered_epoch` (`own`), or, when it has no
/// epoch that early, the start of its first epoch: every record from
/// there on was written in an epoch later than any the leader had at
/// those offsets. Taken as "nothing to cut" instead, the follower kept
/// records of its own epochs where the leader holds others (after an
/// unclean election, or epoch caches trimmed by different log starts).
pub fn follower_end_of(
    own: Option<(i32, i64)>,
    first_epoch_start: Option<i64>,
    answered_epoch: i32,
) -> Option<(i32, i64)> {
    if answered_epoch < 0 {
        return None;
    }
    own.or_else(|| first_epoch_start.map(|start| (answered_epoch, start)))
}

/// One round of the divergence check: where to truncate
/// ([`truncation_offset`]) and whether to ask the leader again. Again when
/// the leader answered an epoch the follower does not have: the follower
/// has cut to its own end of the largest epoch below it, but the leader
/// may have started a later epoch inside that range, so the leader is
/// asked about the follower's latest epoch once more (KIP-279's loop),
/// until the answered epoch is one the follower has.
pub fn divergence_step(
    follower_log_end_offset: i64,
    follower_end_of: Option<(i32, i64)>,
    leader_answer: (i32, i64),
) -> (Option<i64>, bool) {
    let to = truncation_offset(follower_log_end_offset, follower_end_of, leader_answer);
    let again = to.is_some()
        && leader_answer.0 >= 0
        && follower_end_of.is_some_and(|(epoch, _)| epoch != leader_answer.0);
    (to, again)
}

#[cfg(test)]
mod truncation_tests {
    use super::{divergence_step, follower_end_of, truncation_offset};

    /// (epoch, start offset) entries and a log end, as a log's epoch
    /// cache holds them.
    struct History {
        epochs: Vec<(i32, i64)>,
        log_end_offset: i64,
    }

    impl History {
        /// (largest epoch ≤ `epoch`, start of the next epoch or the end).
        fn end_of(&self, epoch: i32) -> Option<(i32, i64)> {
            let i = self.epochs.iter().rposition(|(e, _)| *e <= epoch)?;
            let end = self
                .epochs
                .get(i + 1)
                .map_or(self.log_end_offset, |(_, s)| *s);
            Some((self.epochs[i].0, end))
        }

        fn truncate(&mut self, to: i64) {
            self.log_end_offset = to;
            self.epochs.retain(|(_, start)| *start < to);
        }
    }

    /// The follower's loop against a leader, as the fetcher runs it.
    fn resolve(follower: &mut History, leader: &History) -> i64 {
        while let Some(&(latest, _)) = follower.epochs.last() {
            let answer = leader.end_of(latest).unwrap_or((-1, -1));
            let own = follower_end_of(
                follower.end_of(answer.0),
                follower.epochs.first().map(|(_, start)| *start),
                answer.0,
            );
            let (to, again) = divergence_step(follower.log_end_offset, own, answer);
            if let Some(to) = to {
                follower.truncate(to);
            }
            if !again {
                break;
            }
        }
        follower.log_end_offset
    }

    /// The follower wrote offset 1 in epoch 1 and offsets 2 – 4 in epoch
    /// 4; the leader started epoch 2 at offset 1 and epoch 3 at 4. Asked
    /// about epoch 4, the leader answers epoch 3, which the follower
    /// lacks: its own end of epoch 1 is 2. But the leader's epoch 1 ended
    /// at 1, so offset 1 diverges too; only a second round finds that.
    #[test]
    fn an_epoch_the_follower_lacks_takes_a_second_round() {
        let leader = History {
            epochs: vec![(1, 0), (2, 1), (3, 4)],
            log_end_offset: 6,
        };
        let mut follower = History {
            epochs: vec![(1, 0), (4, 2)],
            log_end_offset: 5,
        };
        assert_eq!(resolve(&mut follower, &leader), 1);
        assert_eq!(follower.epochs, vec![(1, 0)]);
        // One round alone stopped at 2.
        assert_eq!(
            divergence_step(5, follower_end(&[(1, 0), (4, 2)], 5, 3), (3, 6)),
            (Some(2), true)
        );
    }

    /// The follower has no epoch at or below the one the leader answers
    /// (its epochs start at 5; the leader's epoch 3 ran to offset 4): it
    /// cuts from the start of its first epoch, not at the leader's end of
    /// epoch 3, which kept offsets 0 – 3 of its epoch 5 where the leader
    /// holds epoch-3 records.
    #[test]
    fn a_follower_without_an_epoch_that_early_cuts_from_its_first() {
        let leader = History {
            epochs: vec![(3, 0), (6, 4)],
            log_end_offset: 8,
        };
        let mut follower = History {
            epochs: vec![(5, 0)],
            log_end_offset: 10,
        };
        assert_eq!(resolve(&mut follower, &leader), 0);
    }

    fn follower_end(epochs: &[(i32, i64)], log_end_offset: i64, epoch: i32) -> Option<(i32, i64)> {
        History {
            epochs: epochs.to_vec(),
            log_end_offset,
        }
        .end_of(epoch)
    }

    /// The KIP-101 case ends in one round: the follower has the epoch
    /// the leader answers.
    #[test]
    fn a_shared_epoch_ends_the_check_in_one_round() {
        let leader = History {
            epochs: vec![(1, 0), (2, 3)],
            log_end_offset: 8,
        };
        let mut follower = History {
            epochs: vec![(1, 0)],
            log_end_offset: 5,
        };
        assert_eq!(divergence_step(5, Some((1, 5)), (1, 3)), (Some(3), false));
        assert_eq!(resolve(&mut follower, &leader), 3);
    }

    /// (follower LEO, follower end of the answered epoch, leader answer, truncate to)
    type Case = (i64, Option<(i32, i64)>, (i32, i64), Option<i64>);

    #[test]
    fn table() {
        let cases: &[Case] = &[
            // Same history, follower behind: nothing to cut.
            (5, Some((1, 5)), (1, 9), None),
            // KIP-101: the follower has an uncommitted tail of epoch 1 that
            // the new leader (epoch 2 from offset 3) never had.
            (5, Some((1, 5)), (1, 3), Some(3)),
            // KIP-279: the follower wrote in epoch 2 that the leader never
            // had; the leader answers epoch 1 ending at 4, and the
            // follower's epoch 1 ended at 3.
            (6, Some((1, 3)), (1, 4), Some(3)),
            // The follower never had the leader's epoch 3: its epoch 1
            // (largest ≤ 3) ended at 2; what follows is from its epoch 4.
            (7, Some((1, 2)), (3, 6), Some(2)),
            // Equal logs.
            (4, Some((2, 4)), (2, 4), None),
            // Empty follower.
            (0, None, (0, 0), None),
        ];
        for (leo, own, answer, want) in cases {
            assert_eq!(
                truncation_offset(*leo, *own, *answer),
                *want,
                "{leo} {own:?} {answer:?}"
            );
        }
    }
}
