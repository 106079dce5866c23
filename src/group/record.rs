//! Group metadata records in `__consumer_offsets`, next to the offset
//! commits (as Kafka stores them): key `group\0<group>`, value the group's
//! membership as JSON (generation, state, strategy, protocol, members with
//! their subscriptions, timeouts and assignments); a null value (tombstone)
//! deletes the group. The coordinator writes one whenever a group's
//! generation changes; a new coordinator replays the last one of each group
//! so members keep their ids, generation and partitions across a failover.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use runnel_proto::v1::{AssignmentStrategy, RebalanceProtocol};
use serde::{Deserialize, Serialize};

use super::assignor::TopicPartition;
use super::state::{Group, GroupState, Member};

/// The key of `group`'s metadata record.
pub fn group_key(group: &str) -> Bytes {
    Bytes::from(format!("group\0{group}"))
}

/// The group id of a metadata record key.
pub fn parse_group_key(key: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(key).ok()?;
    s.strip_prefix("group\0").map(str::to_string)
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct MemberRecord {
    member_id: String,
    instance_id: String,
    client_id: String,
    topics: BTreeSet<String>,
    session_timeout_ms: i64,
    rebalance_timeout_ms: i64,
    assignment: Vec<TopicPartition>,
    generation: i32,
    revoked: Vec<TopicPartition>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct GroupRecord {
    generation: i32,
    /// "Empty", "PreparingRebalance" or "Stable".
    state: String,
    strategy: i32,
    protocol: i32,
    members: Vec<MemberRecord>,
    assigned_counts: BTreeMap<String, i32>,
    next_member: u64,
}

/// The metadata record value of `g`.
pub fn group_value(g: &Group) -> Bytes {
    let r = GroupRecord {
        generation: g.generation,
        state: g.state.name().to_string(),
        strategy: g.strategy as i32,
        protocol: g.protocol as i32,
        members: g
            .members
            .values()
            .map(|m| MemberRecord {
                member_id: m.member_id.clone(),
                instance_id: m.instance_id.clone(),
                client_id: m.client_id.clone(),
                topics: m.topics.clone(),
                session_timeout_ms: m.session_timeout_ms,
                rebalance_timeout_ms: m.rebalance_timeout_ms,
                assignment: m.assignment.clone(),
                generation: m.generation,
                revoked: m.revoked.clone(),
            })
            .collect(),
        assigned_counts: g.assigned_counts.clone(),
        next_member: g.next_member(),
    };
    Bytes::from(serde_json::to_vec(&r).expect("group records serialize"))
}

/// Rebuilds group `id` from its metadata record at `now_ms`: members get a
/// whole session timeout from now to find the new coordinator; a group
/// stored in a (cooperative follow-up) rebalance rebalances again.
pub fn parse_group_value(id: &str, value: &[u8], now_ms: i64) -> Option<Group> {
    let r: GroupRecord = serde_json::from_slice(value).ok()?;
    let mut g = Group::new(id);
    g.generation = r.generation;
    g.strategy = AssignmentStrategy::try_from(r.strategy).ok()?;
    g.protocol = RebalanceProtocol::try_from(r.protocol).ok()?;
    g.assigned_counts = r.assigned_counts;
    g.set_next_member(r.next_member);
    for m in r.members {
        g.members.insert(
            m.member_id.clone(),
            Member {
                member_id: m.member_id,
                instance_id: m.instance_id,
                client_id: m.client_id,
                topics: m.topics,
                session_timeout_ms: m.session_timeout_ms,
                rebalance_timeout_ms: m.rebalance_timeout_ms,
                last_seen_ms: now_ms,
                assignment: m.assignment,
                generation: m.generation,
                rejoined: false,
                revoked: m.revoked,
            },
        );
    }
    g.restore_state(
        match (r.state.as_str(), g.members.is_empty()) {
            (_, true) => GroupState::Empty,
            ("PreparingRebalance", false) => GroupState::PreparingRebalance,
            _ => GroupState::Stable,
        },
        now_ms,
    );
    Some(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::state::JoinArgs;

    #[test]
    fn a_group_round_trips_through_its_record() {
        let mut g = Group::new("g");
        let id = g
            .join(
                JoinArgs {
                    member_id: String::new(),
                    instance_id: "pod-1".into(),
                    client_id: "c".into(),
                    topics: ["t".to_string()].into_iter().collect(),
                    session_timeout_ms: 3000,
                    rebalance_timeout_ms: 4000,
                    strategy: AssignmentStrategy::CooperativeSticky,
                    protocol: RebalanceProtocol::Cooperative,
                    owned: Vec::new(),
                    preassigned: false,
                },
                10,
            )
            .unwrap();
        let counts = [("t".to_string(), 4)].into_iter().collect();
        assert!(g.try_complete(10, &counts));
        let v = group_value(&g);
        let back = parse_group_value("g", &v, 99).unwrap();
        assert_eq!(back.generation, 1);
        assert_eq!(back.state, GroupState::Stable);
        assert_eq!(back.protocol, RebalanceProtocol::Cooperative);
        let m = &back.members[&id];
        assert_eq!((m.instance_id.as_str(), m.last_seen_ms), ("pod-1", 99));
        assert_eq!(m.assignment, g.members[&id].assignment);
        assert_eq!(back.next_member(), g.next_member());
        assert_eq!(parse_group_key(&group_key("a\0b")), Some("a\0b".into()));
        assert_eq!(parse_group_key(b"offset\0g\0t\x000"), None);
        assert!(parse_group_value("g", b"not json", 0).is_none());
    }
}
