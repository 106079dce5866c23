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
//! Eager protocol: a member rejoins during PreparingRebalance only after
//! it stopped consuming what it owned, so no partition has two owners in
//! one generation. Commits are accepted only from a current member with
//! the current generation (also during PreparingRebalance, so members can
//! commit before rejoining).
//!
//! Cooperative protocol (KIP-429 style): members keep consuming while they
//! rejoin. Completing a rebalance computes the target assignment, but a
//! partition still owned by another member is not handed over: its owner
//! loses it in this generation (`revoked`) and a follow-up rebalance starts
//! at once (Stable → PreparingRebalance within the completion). The old
//! owner stops the partition, commits it and rejoins; only the follow-up
//! round, which needs that rejoin, gives the partition to its new owner.
//! So no partition has two owners at any moment, and a member whose
//! partitions do not move never stops. Commits are accepted from a member
//! with the current or the previous generation (it may not have read the
//! answer to its rejoin yet), and only for partitions it owns or has just
//! had revoked (until it rejoins).

use std::collections::{BTreeMap, BTreeSet};

use runnel_proto::v1::{AssignmentStrategy, RebalanceProtocol};

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
    #[error("member '{member_id}' of group '{group}' was replaced by a newer member with instance id '{instance_id}'")]
    FencedInstance {
        group: String,
        instance_id: String,
        member_id: String,
    },
    #[error("group '{group}' has {members} active members")]
    NotEmpty { group: String, members: usize },
    #[error("member '{member_id}' of group '{group}' does not own {topic}-{partition} (it moved in a rebalance)")]
    NotOwner {
        group: String,
        member_id: String,
        topic: String,
        partition: i32,
    },
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
    /// Cooperative: partitions taken away by the last completed rebalance;
    /// the member may still commit them until it rejoins.
    pub revoked: Vec<TopicPartition>,
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
    /// Rebalance protocol wanted.
    pub protocol: RebalanceProtocol,
    /// Cooperative: partitions the member still reads as it joins.
    pub owned: Vec<TopicPartition>,
    /// `member_id` was handed out by the coordinator to a join that asked
    /// for an id first: a new member joins under it.
    pub preassigned: bool,
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
    /// Rebalance protocol of the current generation.
    pub protocol: RebalanceProtocol,
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
            protocol: RebalanceProtocol::Eager,
            members: BTreeMap::new(),
            rebalance_deadline_ms: 0,
            rebalance_started_ms: 0,
            assigned_counts: BTreeMap::new(),
            next_member: 0,
        }
    }

    /// A fresh member id: `client_id-N-now`.
    pub fn new_member_id(&mut self, client_id: &str, now_ms: i64) -> String {
        self.next_member += 1;
        format!(
            "{}-{}-{}",
            if client_id.is_empty() {
                "member"
            } else {
                client_id
            },
            self.next_member,
            now_ms
        )
    }

    /// The member id counter (persisted with the group).
    pub fn next_member(&self) -> u64 {
        self.next_member
    }

    /// Restores the member id counter of a persisted group.
    pub fn set_next_member(&mut self, n: u64) {
        self.next_member = n;
    }

    /// Sets the state of a group rebuilt from its record; a rebalance
    /// starts over from `now_ms` (every member must rejoin).
    pub fn restore_state(&mut self, state: GroupState, now_ms: i64) {
        if state == GroupState::PreparingRebalance {
            self.state = GroupState::Stable;
            self.start_rebalance(now_ms);
        } else {
            self.state = state;
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

    /// Refuses a call from `member_id` made as static instance
    /// `instance_id` when the instance is now another member: a newer
    /// incarnation replaced it (KIP-345), and the old one must stop
    /// rather than rejoin and take the instance back.
    pub fn check_instance(&self, member_id: &str, instance_id: &str) -> Result<(), GroupError> {
        if instance_id.is_empty() {
            return Ok(());
        }
        match self.members.values().find(|m| m.instance_id == instance_id) {
            Some(m) if m.member_id != member_id => Err(GroupError::FencedInstance {
                group: self.id.clone(),
                instance_id: instance_id.to_string(),
                member_id: member_id.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// A member joins or rejoins; returns its member id. The member gets
    /// its assignment once [`Group::try_complete`] finishes the rebalance
    /// (at once when the join changes nothing in a stable group).
    ///
    /// Static membership: a join with no member id for a known instance
    /// id takes that member's place under a new member id, with its
    /// assignment and generation (no rebalance if its topics are the
    /// same); the old member id is gone, and calls made with it as that
    /// instance are fenced ([`Group::check_instance`]).
    pub fn join(&mut self, args: JoinArgs, now_ms: i64) -> Result<String, GroupError> {
        let mut member_id = args.member_id.clone();
        let mut replaced = None;
        if member_id.is_empty() {
            if !args.instance_id.is_empty() {
                replaced = self
                    .members
                    .values()
                    .find(|m| m.instance_id == args.instance_id)
                    .map(|m| m.member_id.clone());
            }
        } else {
            self.check_instance(&member_id, &args.instance_id)?;
        }
        if member_id.is_empty() {
            member_id = self.new_member_id(&args.client_id, now_ms);
        } else if !self.members.contains_key(&member_id) && !args.preassigned {
            return Err(self.unknown(&member_id));
        }
        let existing = match &replaced {
            Some(old) => self.members.remove(old),
            None => self.members.get(&member_id).cloned(),
        };
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
            // A rejoin says the revoked partitions were stopped, unless
            // it still lists them: it was sent before the member learned
            // they were taken (a join retried after the coordinator
            // moved), and they stay held.
            revoked: existing
                .as_ref()
                .map(|m| {
                    m.revoked
                        .iter()
                        .filter(|tp| args.owned.contains(tp))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        };
        self.members.insert(member_id.clone(), member);
        if self.members.len() == 1 || self.state == GroupState::Empty {
            self.strategy = args.strategy;
            self.protocol = args.protocol;
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

    /// The answer to a join registered while the group was at generation
    /// `joined_at`: the member once a later generation completed (or, for
    /// a join that changed nothing, once the group is stable).
    pub fn join_result(&self, member_id: &str, joined_at: i32) -> Option<&Member> {
        self.members.get(member_id).filter(|m| {
            m.generation == self.generation
                && (self.generation > joined_at || self.state == GroupState::Stable)
        })
    }

    /// Whether the group hands partitions over incrementally.
    pub fn cooperative(&self) -> bool {
        self.protocol == RebalanceProtocol::Cooperative
            && self.strategy != AssignmentStrategy::Broadcast
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
                instance_id: m.instance_id.clone(),
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
        let mut assignment = assign(self.strategy, &subs, partitions);
        let generation = self.generation;
        let mut revoked_any = false;
        let cooperative = self.cooperative();
        if cooperative {
            // Partitions still owned (or revoked but not yet released) by
            // someone else wait for a follow-up round; their owners lose
            // them now.
            let owners: BTreeMap<TopicPartition, String> = self
                .members
                .values()
                .flat_map(|m| {
                    m.assignment
                        .iter()
                        .chain(&m.revoked)
                        .map(|tp| (tp.clone(), m.member_id.clone()))
                })
                .collect();
            for (id, target) in assignment.iter_mut() {
                target.retain(|tp| owners.get(tp).is_none_or(|o| o == id));
            }
            for m in self.members.values_mut() {
                let target = assignment.get(&m.member_id);
                let held: BTreeSet<&TopicPartition> =
                    m.assignment.iter().chain(&m.revoked).collect();
                m.revoked = held
                    .into_iter()
                    .filter(|tp| !target.is_some_and(|t| t.contains(tp)))
                    .cloned()
                    .collect();
                revoked_any |= !m.revoked.is_empty();
            }
        }
        for m in self.members.values_mut() {
            m.assignment = assignment.remove(&m.member_id).unwrap_or_default();
            m.generation = generation;
            m.last_seen_ms = now_ms;
            if !cooperative {
                m.revoked.clear();
            }
        }
        self.state = GroupState::Stable;
        if revoked_any {
            // The follow-up round hands the revoked partitions over once
            // their old owners rejoined.
            self.start_rebalance(now_ms);
        }
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

    /// Restarts every member's session (their joins are answered now).
    pub fn touch_members(&mut self, now_ms: i64) {
        for m in self.members.values_mut() {
            m.last_seen_ms = m.last_seen_ms.max(now_ms);
        }
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
        // Looked up by subscribed topic: a scan of every topic in the
        // cluster, for every stable group at every tick, held the
        // coordinator's lock for most of the tick with thousands of both.
        let now: BTreeMap<String, i32> = self
            .subscribed_topics()
            .into_iter()
            .filter_map(|t| partitions.get(&t).map(|n| (t, *n)))
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
        // A cooperative member keeps consuming (and committing) while its
        // rejoin is answered, so it may not know the newest generation yet.
        let previous_ok = self.cooperative() && generation == self.generation - 1;
        if generation != self.generation && !previous_ok {
            return Err(GroupError::IllegalGeneration {
                group: self.id.clone(),
                generation,
                current: self.generation,
            });
        }
        Ok(())
    }

    /// [`Group::validate_commit`], and in a cooperative group also that the
    /// member owns every partition committed (or just had it revoked).
    pub fn validate_commit_partitions(
        &self,
        member_id: &str,
        generation: i32,
        partitions: &[TopicPartition],
    ) -> Result<(), GroupError> {
        self.validate_commit(member_id, generation)?;
        if member_id.is_empty() || !self.cooperative() {
            return Ok(());
        }
        let Some(m) = self.members.get(member_id) else {
            return Err(self.unknown(member_id));
        };
        for tp in partitions {
            if !m.assignment.contains(tp) && !m.revoked.contains(tp) {
                return Err(GroupError::NotOwner {
                    group: self.id.clone(),
                    member_id: member_id.to_string(),
                    topic: tp.0.clone(),
                    partition: tp.1,
                });
            }
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
            protocol: RebalanceProtocol::Eager,
            owned: Vec::new(),
            preassigned: false,
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
    fn a_restarted_static_member_takes_the_assignment_and_fences_the_old_one() {
        let mut g = Group::new("g");
        let a = g.join(args("", "pod-1"), 0).unwrap();
        let b = g.join(args("", "pod-2"), 0).unwrap();
        g.try_complete(0, &counts());
        let owned_by_a = g.members[&a].assignment.clone();
        // pod-1 restarts: a new member id, the same partitions, no
        // rebalance.
        let again = g.join(args("", "pod-1"), 50).unwrap();
        assert_ne!(a, again);
        assert_eq!(g.state, GroupState::Stable);
        assert_eq!(g.generation, 1);
        assert_eq!(g.assignment_ready(&again).unwrap().assignment, owned_by_a);
        assert!(!g.members.contains_key(&a));
        // The old incarnation is fenced, whatever it tries.
        let fenced = |r: Result<(), GroupError>| {
            assert!(matches!(r, Err(GroupError::FencedInstance { .. })), "{r:?}")
        };
        fenced(g.check_instance(&a, "pod-1"));
        fenced(g.join(args(&a, "pod-1"), 60).map(drop));
        assert_eq!(g.members.len(), 2, "the fenced join changed nothing");
        // The new one and other members are not.
        g.check_instance(&again, "pod-1").unwrap();
        g.check_instance(&b, "pod-2").unwrap();
        g.check_instance(&b, "").unwrap();
        assert_eq!(g.heartbeat(&again, 1, 70), Ok(false));
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

    fn coop(member_id: &str) -> JoinArgs {
        JoinArgs {
            strategy: AssignmentStrategy::CooperativeSticky,
            protocol: RebalanceProtocol::Cooperative,
            ..args(member_id, "")
        }
    }

    fn owned(g: &Group, id: &str) -> BTreeSet<TopicPartition> {
        g.members[id].assignment.iter().cloned().collect()
    }

    #[test]
    fn cooperative_join_revokes_in_one_round_and_assigns_in_the_next() {
        let mut g = Group::new("g");
        let a = g.join(coop(""), 0).unwrap();
        let b = g.join(coop(""), 0).unwrap();
        assert!(g.try_complete(0, &counts()));
        assert_eq!(g.generation, 1);
        let (a1, b1) = (owned(&g, &a), owned(&g, &b));
        assert_eq!((a1.len(), b1.len()), (3, 3));

        // c joins; a and b rejoin (they keep consuming meanwhile).
        let c = g.join(coop(""), 10).unwrap();
        assert_eq!(g.heartbeat(&a, 1, 11), Ok(true));
        g.join(coop(&a), 12).unwrap();
        assert!(g.join_result(&a, 1).is_none(), "b has not rejoined");
        g.join(coop(&b), 13).unwrap();
        assert!(g.try_complete(13, &counts()));
        // Round 1: a and b lose one partition each; c gets nothing yet,
        // and a follow-up round is already pending.
        assert_eq!(g.generation, 2);
        assert_eq!(g.state, GroupState::PreparingRebalance);
        owned_disjoint(&g);
        let (a2, b2) = (owned(&g, &a), owned(&g, &b));
        assert!(a2.is_subset(&a1) && b2.is_subset(&b1));
        assert_eq!((a2.len(), b2.len()), (2, 2));
        assert!(g.join_result(&c, 1).unwrap().assignment.is_empty());
        assert!(g.join_result(&a, 1).is_some());
        assert!(g.join_result(&a, 2).is_none(), "the follow-up is pending");
        let lost_a = g.members[&a].revoked.clone();
        assert_eq!(lost_a.len(), 1);
        // a may still commit what it lost (with either generation), c may
        // not commit it, and generation 0 is stale.
        assert_eq!(g.validate_commit_partitions(&a, 1, &lost_a), Ok(()));
        assert_eq!(g.validate_commit_partitions(&a, 2, &lost_a), Ok(()));
        assert!(matches!(
            g.validate_commit_partitions(&c, 2, &lost_a),
            Err(GroupError::NotOwner { .. })
        ));
        assert!(matches!(
            g.validate_commit_partitions(&a, 0, &lost_a),
            Err(GroupError::IllegalGeneration { .. })
        ));

        // Round 2: everyone rejoins; the revoked partitions go to c.
        for (id, t) in [(&c, 20), (&a, 21)] {
            g.join(coop(id), t).unwrap();
        }
        assert!(!g.try_complete(21, &counts()));
        assert!(
            matches!(
                g.validate_commit_partitions(&a, 2, &lost_a),
                Err(GroupError::NotOwner { .. })
            ),
            "a rejoined: it stopped what it lost"
        );
        g.join(coop(&b), 22).unwrap();
        assert!(g.try_complete(22, &counts()));
        assert_eq!(g.generation, 3);
        assert_eq!(g.state, GroupState::Stable);
        owned_disjoint(&g);
        assert_eq!(owned(&g, &a), a2, "a kept its partitions");
        assert_eq!(owned(&g, &b), b2);
        assert_eq!(owned(&g, &c).len(), 2);
        assert!(owned(&g, &c).contains(&lost_a[0]));
        assert!(g.join_result(&c, 2).is_some());
    }

    #[test]
    fn a_join_still_listing_a_revoked_partition_does_not_release_it() {
        let mut g = Group::new("g");
        let a = g.join(coop(""), 0).unwrap();
        let b = g.join(coop(""), 0).unwrap();
        assert!(g.try_complete(0, &counts()));
        let a1: Vec<TopicPartition> = owned(&g, &a).into_iter().collect();
        let c = g.join(coop(""), 10).unwrap();
        let owning = |id: &str, owned: Vec<TopicPartition>| JoinArgs { owned, ..coop(id) };
        g.join(owning(&a, a1.clone()), 11).unwrap();
        g.join(coop(&b), 12).unwrap();
        assert!(g.try_complete(12, &counts()));
        let lost_a = g.members[&a].revoked.clone();
        assert_eq!(lost_a.len(), 1);
        // The coordinator moves before a hears of it: a's join, retried,
        // still lists the partition it lost. The follow-up round must not
        // hand it over, and starts another round.
        g.join(owning(&a, a1.clone()), 20).unwrap();
        g.join(coop(&b), 21).unwrap();
        g.join(coop(&c), 22).unwrap();
        assert!(g.try_complete(22, &counts()));
        assert!(
            !owned(&g, &c).contains(&lost_a[0]),
            "handed over while a reads it"
        );
        assert_eq!(g.members[&a].revoked, lost_a);
        assert_eq!(g.state, GroupState::PreparingRebalance);
        owned_disjoint(&g);
        // a stops it and rejoins without it: now c gets it.
        let kept: Vec<TopicPartition> = owned(&g, &a).into_iter().collect();
        g.join(owning(&a, kept), 30).unwrap();
        g.join(coop(&b), 31).unwrap();
        g.join(coop(&c), 32).unwrap();
        assert!(g.try_complete(32, &counts()));
        assert_eq!(g.state, GroupState::Stable);
        assert!(owned(&g, &c).contains(&lost_a[0]));
        assert!(g.members[&a].revoked.is_empty());
    }

    #[test]
    fn cooperative_leave_hands_partitions_over_in_one_round() {
        let mut g = Group::new("g");
        let a = g.join(coop(""), 0).unwrap();
        let b = g.join(coop(""), 0).unwrap();
        g.try_complete(0, &counts());
        let a1 = owned(&g, &a);
        g.leave(&b, 5).unwrap();
        g.join(coop(&a), 6).unwrap();
        assert!(g.try_complete(6, &counts()));
        assert_eq!(g.state, GroupState::Stable, "nothing had to be revoked");
        assert_eq!(owned(&g, &a).len(), 6);
        assert!(a1.is_subset(&owned(&g, &a)));
        assert!(g.members[&a].revoked.is_empty());
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
