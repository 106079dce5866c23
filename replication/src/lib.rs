//! Runnel's replication rules: how far the high watermark may advance and
//! whether a produce with acks=all may proceed.
//!
//! Where it sits on the data path: between the partition leader's append
//! (storage) and the answer to the producer. Today the broker runs every
//! partition with a single-replica ISR, so the high watermark is the
//! leader's log end; the follower fetchers, ISR shrink/expand and leader
//! epochs arrive with the replication issue and build on these functions.
//!
//! ```
//! use runnel_replication::high_watermark;
//! // Leader at 10, followers at 7 and 9: records below 7 are on every ISR member.
//! assert_eq!(high_watermark(&[10, 7, 9]), Some(7));
//! ```

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
