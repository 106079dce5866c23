//! One consumer group's membership as a pure state machine: joins,
//! heartbeats, leaves, session expiry, generations and fencing. The
//! coordinator runtime ([`super::coordinator`]) feeds it events with the
//! current time and does the I/O; nothing here blocks or reads clocks.
//!
//! Legal transitions:
//! - Empty → PreparingRebalance (a member joins)
//! - Stable → PreparingRebalance (a member joins, leaves, expires, or a
//!   subscribed topic grows)
//! - PreparingRebalance → Stable (every member rejoined, or the rebalance
//!   timeout passed and the missing ones were removed; the generation is
//!   bumped and partitions assigned)
//! - PreparingRebalance → Empty (nobody is left)
//!
//! A member rejoins during PreparingRebalance only after it stopped
//! consuming what it owned, so no partition has two owners in one
//! generation. Commits are accepted only from a current member with the
//! current generation (also during PreparingRebalance, so members can
//! commit before rejoining).

use std::collections::{BTreeMap, BTreeSet};

use runnel_proto::v1::AssignmentStrategy;

use super::assignor::{assign, Subscription, TopicPartition};

/// Why a group call was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("member '{member_id}' is not (or no longer) in group '{group}'")]
    UnknownMember { group: String, member_id: String },
    #[error("generation {generation} of group '{group}' is stale; the current one is {current}")]
    IllegalGeneration {
        group: String,
        generation: i32,
        current: i32,
    },
    #[error("group '{group}' has {members} active members")]
    NotEmpty { group: String, members: usize },
}

/// Where the group is in its rebalance cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    /// No members (offsets may exist).
    Empty,
    /// Waiting for members to rejoin.
    PreparingRebalance,
    /// Every member has its assignment for the current generation.
    Stable,
}

impl GroupState {
    /// The name shown by list and describe.
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// One member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Member id, assigned by the coordinator.
    pub member_id: String,
    /// Static instance id, or empty.
    pub instance_id: String,
    /// Client id, for describe.
    pub client_id: String,
    /// Subscribed topics.
    pub topics: BTreeSet<String>,
    /// Missing heartbeats this long removes the member (ms).
    pub session_timeout_ms: i64,
    /// How long a rebalance waits for this member (ms).
    pub rebalance_timeout_ms: i64,
    /// Last sign of life (ms).
    pub last_seen_ms: i64,
    /// Partitions owned in `generation`.
    pub assignment: Vec<TopicPartition>,
    /// The generation its assignment belongs to (0: none yet).
    pub generation: i32,
    /// Rejoined for the pending rebalance.
    pub rejoined: bool,
}

/// A join request, already validated.
#[derive(Clone, Debug)]
pub struct JoinArgs {
    /// Member id; empty on first join.
    pub member_id: String,
    /// Static instance id, or empty.
    pub instance_id: String,
    /// Client id.
    pub client_id: String,
    /// Subscribed topics.
    pub topics: BTreeSet<String>,
    /// Session timeout (ms).
    pub session_timeout_ms: i64,
    /// Rebalance timeout (ms).
    pub rebalance_timeout_ms: i64,
    /// Strategy wanted.
    pub strategy: AssignmentStrategy,
}

/// One group.
#[derive(Clone, Debug)]
pub struct Group {
    /// Group id.
    pub id: String,
    /// Current state.
    pub state: GroupState,
    /// Current generation (0 before the first rebalance).
    pub generation: i32,
    /// Strategy of the current generation.
    pub strategy: AssignmentStrategy,
    /// Members by id.
    pub members: BTreeMap<String, Member>,
    /// When a pending rebalance gives up on missing members (ms).
    pub rebalance_deadline_ms: i64,
    /// When the pending (or last) rebalance started (ms), for its duration.
    pub rebalance_started_ms: i64,
    /// Partition counts the current assignment was computed from.
    pub assigned_counts: BTreeMap<String, i32>,
    /// Counter for member ids.
    next_member: u64,
}

impl Group {
    /// A new empty group.
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            state: GroupState::Empty,
            generation: 0,
            strategy: AssignmentStrategy::Unspecified,
            members: BTreeMap::new(),
            rebalance_deadline_ms: 0,
            rebalance_started_ms: 0,
            assigned_counts: BTreeMap::new(),
            next_member: 0,
        }
    }

    fn unknown(&self, member_id: &str) -> GroupError {
        GroupError::UnknownMember {
            group: self.id.clone(),
            member_id: member_id.to_string(),
        }
    }

    /// Subscribed topics of every member.
    pub fn subscribed_topics(&self) -> BTreeSet<String> {
        self.members
            .values()
            .flat_map(|m| m.topics.iter().cloned())
            .collect()
    }

    fn start_rebalance(&mut self, now_ms: i64) {
        if self.state != GroupState::PreparingRebalance {
            self.state = GroupState::PreparingRebalance;
            let wait = self
                .members
                .values()
                .map(|m| m.rebalance_timeout_ms)
                .max()
                .unwrap_or(0);
            self.rebalance_deadline_ms = now_ms + wait;
            self.rebalance_started_ms = now_ms;
            for m in self.members.values_mut() {
                m.rejoined = false;
            }
        }
    }

    /// A member joins or rejoins; returns its member id. The member gets
    /// its assignment once [`Group::try_complete`] finishes the rebalance
    /// (at once when the join changes nothing in a stable group).
    pub fn join(&mut self, args: JoinArgs, now_ms: i64) -> Result<String, GroupError> {
        let mut member_id = args.member_id.clone();
        if member_id.is_empty() && !args.instance_id.is_empty() {
            // Static membership: the instance keeps its member id.
            if let Some(m) = self
                .members
                .values()
                .find(|m| m.instance_id == args.instance_id)
            {
                member_id = m.member_id.clone();
            }
        }
        if member_id.is_empty() {
            self.next_member += 1;
            member_id = format!(
                "{}-{}-{}",
                if args.client_id.is_empty() {
                    "member"
                } else {
                    &args.client_id
                },
                self.next_member,
                now_ms
            );
        } else if !self.members.contains_key(&member_id) {
            return Err(self.unknown(&member_id));
        }
        let existing = self.members.get(&member_id).cloned();
        let unchanged = existing.as_ref().is_some_and(|m| {
            m.topics == args.topics && m.generation == self.generation && self.generation > 0
        });
        let member = Member {
            member_id: member_id.clone(),
            instance_id: args.instance_id,
            client_id: args.client_id,
            topics: args.topics,
            session_timeout_ms: args.session_timeout_ms,
            rebalance_timeout_ms: args.rebalance_timeout_ms,
            last_seen_ms: now_ms,
            assignment: existing
                .as_ref()
                .map(|m| m.assignment.clone())
                .unwrap_or_default(),
            generation: existing.as_ref().map_or(0, |m| m.generation),
            rejoined: true,
        };
        self.members.insert(member_id.clone(), member);
        if self.members.len() == 1 || self.state == GroupState::Empty {
            self.strategy = args.strategy;
        }
        if self.state == GroupState::Stable && unchanged {
            // A retried join: the current assignment stands.
            return Ok(member_id);
        }
        if self.state != GroupState::PreparingRebalance {
            self.start_rebalance(now_ms);
            if let Some(m) = self.members.get_mut(&member_id) {
                m.rejoined = true;
            }
        }
        Ok(member_id)
    }

    /// Whether `member_id` has its assignment for the current generation
    /// (a waiting join can answer).
    pub fn assignment_ready(&self, member_id: &str) -> Option<&Member> {
        self.members
            .get(member_id)
            .filter(|m| self.state == GroupState::Stable && m.generation == self.generation)
    }

    /// Finishes a pending rebalance when every member rejoined or the
    /// deadline passed: removes the missing, bumps the generation and
    /// assigns. Returns true when it completed.
    pub fn try_complete(&mut self, now_ms: i64, partitions: &BTreeMap<String, i32>) -> bool {
        if self.state != GroupState::PreparingRebalance {
            return false;
        }
        let all_in = self.members.values().all(|m| m.rejoined);
        if !all_in && now_ms < self.rebalance_deadline_ms {
            return false;
        }
        self.members.retain(|_, m| m.rejoined);
        self.generation += 1;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.assigned_counts.clear();
            return true;
        }
        let subs: Vec<Subscription> = self
            .members
            .values()
            .map(|m| Subscription {
                member_id: m.member_id.clone(),
                topics: m.topics.clone(),
                owned: m.assignment.clone(),
            })
            .collect();
        let topics = self.subscribed_topics();
        self.assigned_counts = partitions
            .iter()
            .filter(|(t, _)| topics.contains(*t))
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        let assignment = assign(self.strategy, &subs, partitions);
        let generation = self.generation;
        for m in self.members.values_mut() {
            m.assignment = assignment.get(&m.member_id).cloned().unwrap_or_default();
            m.generation = generation;
            m.last_seen_ms = now_ms;
        }
        self.state = GroupState::Stable;
        true
    }

    /// A heartbeat: Ok(true) asks the member to rejoin.
    pub fn heartbeat(
        &mut self,
        member_id: &str,
        generation: i32,
        now_ms: i64,
    ) -> Result<bool, GroupError> {
        let current = self.generation;
        let state = self.state;
        let Some(m) = self.members.get_mut(member_id) else {
            return Err(self.unknown(member_id));
        };
        m.last_seen_ms = now_ms;
        if state == GroupState::PreparingRebalance {
            return Ok(true);
        }
        if generation != current {
            return Err(GroupError::IllegalGeneration {
                group: self.id.clone(),
                generation,
                current,
            });
        }
        Ok(false)
    }

    /// A member leaves at once.
    pub fn leave(&mut self, member_id: &str, now_ms: i64) -> Result<(), GroupError> {
        if self.members.remove(member_id).is_none() {
            return Err(self.unknown(member_id));
        }
        self.after_removal(now_ms);
        Ok(())
    }

    fn after_removal(&mut self, now_ms: i64) {
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.generation += 1;
            self.assigned_counts.clear();
        } else {
            self.start_rebalance(now_ms);
        }
    }

    /// Removes members whose session expired; returns their ids. Members
    /// that rejoined a pending rebalance are waiting on us, not expiring.
    pub fn expire(&mut self, now_ms: i64) -> Vec<String> {
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                !(self.state == GroupState::PreparingRebalance && m.rejoined)
                    && now_ms - m.last_seen_ms > m.session_timeout_ms
            })
            .map(|m| m.member_id.clone())
            .collect();
        for id in &gone {
            self.members.remove(id);
        }
        if !gone.is_empty() {
            self.after_removal(now_ms);
        }
        gone
    }

    /// Starts a rebalance when a subscribed topic's partition count changed.
    pub fn check_partition_counts(
        &mut self,
        now_ms: i64,
        partitions: &BTreeMap<String, i32>,
    ) -> bool {
        if self.state != GroupState::Stable {
            return false;
        }
        let topics = self.subscribed_topics();
        let now: BTreeMap<String, i32> = partitions
            .iter()
            .filter(|(t, _)| topics.contains(*t))
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        if now != self.assigned_counts {
            self.start_rebalance(now_ms);
            return true;
        }
        false
    }

    /// Whether a commit from `member_id` in `generation` is accepted. An
    /// empty member id is a standalone commit, allowed only while empty.
    pub fn validate_commit(&self, member_id: &str, generation: i32) -> Result<(), GroupError> {
        if member_id.is_empty() {
            if self.members.is_empty() {
                return Ok(());
            }
            return Err(GroupError::NotEmpty {
                group: self.id.clone(),
                members: self.members.len(),
            });
        }
        if !self.members.contains_key(member_id) {
            return Err(self.unknown(member_id));
        }
        if generation != self.generation {
            return Err(GroupError::IllegalGeneration {
                group: self.id.clone(),
                generation,
                current: self.generation,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(member_id: &str, instance: &str) -> JoinArgs {
        JoinArgs {
            member_id: member_id.into(),
            instance_id: instance.into(),
            client_id: "c".into(),
            topics: ["t".to_string()].into_iter().collect(),
            session_timeout_ms: 1000,
            rebalance_timeout_ms: 500,
            strategy: AssignmentStrategy::Range,
        }
    }

    fn counts() -> BTreeMap<String, i32> {
        [("t".to_string(), 6)].into_iter().collect()
    }

    fn owned_disjoint(g: &Group) {
        let mut seen = BTreeSet::new();
        for m in g.members.values().filter(|m| m.generation == g.generation) {
            for tp in &m.assignment {
                assert!(seen.insert(tp.clone()), "{tp:?} owned twice: {g:?}");
            }
        }
    }

    #[test]
    fn first_join_completes_at_once_with_everything() {
        let mut g = Group::new("g");
        let a = g.join(args("", ""), 0).unwrap();
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert!(g.try_complete(0, &counts()));
        assert_eq!(g.state, GroupState::Stable);
        assert_eq!(g.generation, 1);
        assert_eq!(g.assignment_ready(&a).unwrap().assignment.len(), 6);
    }

    #[test]
    fn a_second_member_waits_for_the_first_to_rejoin() {
        let mut g = Group::new("g");
        let a = g.join(args("", ""), 0).unwrap();
        g.try_complete(0, &counts());
        let b = g.join(args("", ""), 10).unwrap();
        assert!(!g.try_complete(10, &counts()), "a has not rejoined");
        assert!(g.assignment_ready(&b).is_none());
        assert_eq!(g.heartbeat(&a, 1, 20), Ok(true), "a is told to rejoin");
        // a may still commit with generation 1 before rejoining.
        assert_eq!(g.validate_commit(&a, 1), Ok(()));
        g.join(args(&a, ""), 30).unwrap();
        assert!(g.try_complete(30, &counts()));
        assert_eq!(g.generation, 2);
        assert_eq!(g.assignment_ready(&a).unwrap().assignment.len(), 3);
        assert_eq!(g.assignment_ready(&b).unwrap().assignment.len(), 3);
        owned_disjoint(&g);
        assert!(matches!(
            g.validate_commit(&a, 1),
            Err(GroupError::IllegalGeneration {
                generation: 1,
                current: 2,
                ..
            })
        ));
    }

    #[test]
    fn members_missing_the_rebalance_deadline_are_removed() {
        let mut g = Group::new("g");
        let a = g.join(args("", ""), 0).unwrap();
        g.try_complete(0, &counts());
        let b = g.join(args("", ""), 100).unwrap();
        assert!(!g.try_complete(599, &counts()));
        assert!(g.try_complete(600, &counts()));
        assert!(!g.members.contains_key(&a));
        assert_eq!(g.assignment_ready(&b).unwrap().assignment.len(), 6);
        assert!(matches!(
            g.heartbeat(&a, 1, 700),
            Err(GroupError::UnknownMember { .. })
        ));
    }

    #[test]
    fn session_expiry_removes_and_rebalances() {
        let mut g = Group::new("g");
        let a = g.join(args("", ""), 0).unwrap();
        let b = g.join(args("", ""), 0).unwrap();
        g.try_complete(0, &counts());
        assert_eq!(g.heartbeat(&a, 1, 900), Ok(false));
        assert_eq!(g.expire(1001), vec![b.clone()]);
        assert_eq!(g.state, GroupState::PreparingRebalance);
        g.join(args(&a, ""), 1002).unwrap();
        assert!(g.try_complete(1002, &counts()));
        assert_eq!(g.assignment_ready(&a).unwrap().assignment.len(), 6);
    }

    #[test]
    fn leaving_last_member_empties_the_group() {
        let mut g = Group::new("g");
        let a = g.join(args("", ""), 0).unwrap();
        g.try_complete(0, &counts());
        g.leave(&a, 5).unwrap();
        assert_eq!(g.state, GroupState::Empty);
        assert_eq!(g.validate_commit("", 0), Ok(()));
        assert!(g.leave(&a, 6).is_err());
    }

    #[test]
    fn standalone_commits_are_refused_while_members_exist() {
        let mut g = Group::new("g");
        g.join(args("", ""), 0).unwrap();
        assert!(matches!(
            g.validate_commit("", 0),
            Err(GroupError::NotEmpty { members: 1, .. })
        ));
        assert!(matches!(
            g.validate_commit("nobody", 1),
            Err(GroupError::UnknownMember { .. })
        ));
    }

    #[test]
    fn static_member_keeps_its_id_and_assignment_without_rebalance() {
        let mut g = Group::new("g");
        let a = g.join(args("", "pod-1"), 0).unwrap();
        g.try_complete(0, &counts());
        let again = g.join(args("", "pod-1"), 50).unwrap();
        assert_eq!(a, again);
        assert_eq!(g.state, GroupState::Stable);
        assert_eq!(g.generation, 1);
        assert!(g.assignment_ready(&a).is_some());
    }

    #[test]
    fn a_retried_join_in_a_stable_group_changes_nothing() {
        let mut g = Group::new("g");
        let a = g.join(args("", ""), 0).unwrap();
        g.try_complete(0, &counts());
        g.join(args(&a, ""), 10).unwrap();
        assert_eq!(g.state, GroupState::Stable);
        assert!(g.join(args("ghost", ""), 10).is_err());
    }

    #[test]
    fn growing_a_topic_triggers_a_rebalance() {
        let mut g = Group::new("g");
        g.join(args("", ""), 0).unwrap();
        g.try_complete(0, &counts());
        assert!(!g.check_partition_counts(1, &counts()));
        let more = [("t".to_string(), 8)].into_iter().collect();
        assert!(g.check_partition_counts(1, &more));
        assert_eq!(g.state, GroupState::PreparingRebalance);
    }
}
