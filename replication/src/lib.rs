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

#[cfg(test)]
mod truncation_tests {
    use super::truncation_offset;

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
