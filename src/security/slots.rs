//! Bounded places per peer address: how many of some costly thing
//! (a password verification, a TLS handshake) one address may have in
//! progress, and all addresses together, so that a flood from one
//! address cannot take every place from the others. Per address, not
//! per IPv6 /64 as failed password checks count: a cloud subnet is one
//! /64 shared by every instance in it, which would then share these few
//! places.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Places in use, by peer address.
#[derive(Debug)]
pub struct PeerSlots {
    used: Arc<Mutex<HashMap<Option<IpAddr>, usize>>>,
    per_peer_max: usize,
    total_max: usize,
}

/// A place taken; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    used: Arc<Mutex<HashMap<Option<IpAddr>, usize>>>,
    peer: Option<IpAddr>,
}

impl PeerSlots {
    /// At most `per_peer_max` places per address, `total_max` in all.
    pub fn new(per_peer_max: usize, total_max: usize) -> Self {
        Self {
            used: Arc::default(),
            per_peer_max,
            total_max,
        }
    }

    /// A place for `peer`, or `None` when it, or everyone, has no more.
    pub fn try_take(&self, peer: Option<IpAddr>) -> Option<Slot> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = used.values().sum();
        let mine = used.get(&peer).copied().unwrap_or(0);
        if total >= self.total_max || mine >= self.per_peer_max {
            return None;
        }
        *used.entry(peer).or_insert(0) += 1;
        Some(Slot {
            used: self.used.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = used.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                used.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_per_peer_and_in_all() {
        let slots = PeerSlots::new(2, 3);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        let held: Vec<Slot> = (0..2).map(|_| slots.try_take(a).unwrap()).collect();
        assert!(slots.try_take(a).is_none(), "per peer");
        let other = slots.try_take(b).unwrap();
        assert!(slots.try_take(b).is_none(), "in all");
        drop(other);
        drop(held);
        assert!(slots.try_take(a).is_some(), "given back");
        assert!(slots.used.lock().unwrap().values().all(|n| *n <= 1));
    }
}
