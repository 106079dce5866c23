//! Partition assignment strategies: pure functions from the members'
//! subscriptions (and what they owned) to who owns which partition in the
//! next generation. The coordinator runs them server-side at the end of a
//! rebalance (there is no SyncGroup).
//!
//! Every strategy but broadcast gives each partition of a subscribed topic
//! to exactly one member that subscribes to it.

use std::collections::{BTreeMap, BTreeSet};

use runnel_proto::v1::AssignmentStrategy;

/// A (topic, partition) pair.
pub type TopicPartition = (String, i32);

/// What one member asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// Member id.
    pub member_id: String,
    /// Static instance id, or empty.
    pub instance_id: String,
    /// Subscribed topics.
    pub topics: BTreeSet<String>,
    /// Partitions it owned in the previous generation (sticky uses them).
    pub owned: Vec<TopicPartition>,
}

impl Subscription {
    /// Where the member stands in the order range and round-robin deal
    /// in, as Kafka orders them: static members first, by instance id
    /// (a restarted instance comes back under a new member id and must
    /// get the same partitions), then the others by member id.
    fn order_key(&self) -> (bool, &str) {
        if self.instance_id.is_empty() {
            (true, &self.member_id)
        } else {
            (false, &self.instance_id)
        }
    }
}

/// Assignment per member id (every member appears, possibly empty).
pub type Assignment = BTreeMap<String, Vec<TopicPartition>>;

/// Runs `strategy`; `partitions` gives each existing topic's partition count
/// (subscribed topics missing from it are skipped).
pub fn assign(
    strategy: AssignmentStrategy,
    members: &[Subscription],
    partitions: &BTreeMap<String, i32>,
) -> Assignment {
    let mut out: Assignment = members
        .iter()
        .map(|m| (m.member_id.clone(), Vec::new()))
        .collect();
    match strategy {
        AssignmentStrategy::Range => range(members, partitions, &mut out),
        AssignmentStrategy::RoundRobin => round_robin(members, partitions, &mut out),
        AssignmentStrategy::Broadcast => broadcast(members, partitions, &mut out),
        AssignmentStrategy::CooperativeSticky | AssignmentStrategy::Unspecified => {
            sticky(members, partitions, &mut out)
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// Every partition of the subscribed, existing topics, sorted.
fn all_partitions(
    members: &[Subscription],
    partitions: &BTreeMap<String, i32>,
) -> Vec<TopicPartition> {
    let topics: BTreeSet<&String> = members.iter().flat_map(|m| m.topics.iter()).collect();
    topics
        .into_iter()
        .filter_map(|t| partitions.get(t).map(|n| (t, *n)))
        .flat_map(|(t, n)| (0..n).map(move |p| (t.clone(), p)))
        .collect()
}

fn subscribers<'a>(members: &'a [Subscription], topic: &str) -> Vec<&'a Subscription> {
    let mut v: Vec<&Subscription> = members
        .iter()
        .filter(|m| m.topics.contains(topic))
        .collect();
    v.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    v
}

/// Per topic, contiguous ranges; the first `count % members` get one more.
fn range(members: &[Subscription], partitions: &BTreeMap<String, i32>, out: &mut Assignment) {
    let topics: BTreeSet<&String> = members.iter().flat_map(|m| m.topics.iter()).collect();
    for topic in topics {
        let Some(&count) = partitions.get(topic) else {
            continue;
        };
        let subs = subscribers(members, topic);
        let n = subs.len() as i32;
        if n == 0 {
            continue;
        }
        let (base, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, m) in subs.iter().enumerate() {
            let take = base + i32::from((i as i32) < extra);
            let v = out.entry(m.member_id.clone()).or_default();
            v.extend((next..next + take).map(|p| (topic.clone(), p)));
            next += take;
        }
    }
}

/// Partitions dealt out in turn to the next member subscribing to the topic.
fn round_robin(members: &[Subscription], partitions: &BTreeMap<String, i32>, out: &mut Assignment) {
    let mut sorted: Vec<&Subscription> = members.iter().collect();
    sorted.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    if sorted.is_empty() {
        return;
    }
    let mut cursor = 0usize;
    for tp in all_partitions(members, partitions) {
        for step in 0..sorted.len() {
            let m = sorted[(cursor + step) % sorted.len()];
            if m.topics.contains(&tp.0) {
                out.entry(m.member_id.clone()).or_default().push(tp.clone());
                cursor = (cursor + step + 1) % sorted.len();
                break;
            }
        }
    }
}

fn broadcast(members: &[Subscription], partitions: &BTreeMap<String, i32>, out: &mut Assignment) {
    for m in members {
        let v = out.entry(m.member_id.clone()).or_default();
        for t in &m.topics {
            if let Some(&n) = partitions.get(t) {
                v.extend((0..n).map(|p| (t.clone(), p)));
            }
        }
    }
}

/// Keeps previous owners up to a balanced quota, hands the rest to the
/// least-loaded subscriber, then evens out what mixed subscriptions left
/// uneven ([`balance`]).
fn sticky(members: &[Subscription], partitions: &BTreeMap<String, i32>, out: &mut Assignment) {
    let all = all_partitions(members, partitions);
    if members.is_empty() {
        return;
    }
    let total = all.len();
    let n = members.len();
    let (floor, mut ceil_slots) = (total / n, total % n);
    let existing: BTreeSet<&TopicPartition> = all.iter().collect();
    let mut taken: BTreeSet<TopicPartition> = BTreeSet::new();
    let mut sorted: Vec<&Subscription> = members.iter().collect();
    sorted.sort_by(|a, b| a.member_id.cmp(&b.member_id));
    for m in &sorted {
        let mut owned: Vec<&TopicPartition> = m
            .owned
            .iter()
            .filter(|tp| existing.contains(tp) && m.topics.contains(&tp.0) && !taken.contains(*tp))
            .collect();
        owned.sort();
        owned.dedup();
        let quota = if owned.len() > floor && ceil_slots > 0 {
            ceil_slots -= 1;
            floor + 1
        } else {
            floor
        };
        let v = out.entry(m.member_id.clone()).or_default();
        for tp in owned.into_iter().take(quota) {
            taken.insert(tp.clone());
            v.push(tp.clone());
        }
    }
    for tp in all {
        if taken.contains(&tp) {
            continue;
        }
        let target = sorted
            .iter()
            .filter(|m| m.topics.contains(&tp.0))
            // Borrowed keys: a clone of the member id per (partition,
            // member) pair was ten million allocations for a thousand
            // members and ten thousand partitions.
            .min_by(|a, b| {
                let load = |m: &&&Subscription| out.get(&m.member_id).map_or(0, Vec::len);
                (load(a), &a.member_id).cmp(&(load(b), &b.member_id))
            });
        if let Some(m) = target {
            out.entry(m.member_id.clone()).or_default().push(tp);
        }
    }
    balance(&sorted, out);
}

/// Evens out loads the quota above could not: it assumed every member can
/// take every partition, so with mixed subscriptions a member could keep a
/// full quota of partitions another member wanted while the partitions
/// only it subscribes to piled up on it too (and stickiness kept it so
/// from one generation to the next). Moves a partition from the most
/// loaded member to the least loaded one that subscribes to it while they
/// differ by more than one, preferring a partition the receiver owned
/// before. Each move lowers the sum of squared loads, so this ends; with
/// uniform subscriptions the quota already balanced and nothing moves.
fn balance(members: &[&Subscription], out: &mut Assignment) {
    let load = |out: &Assignment, m: &Subscription| out.get(&m.member_id).map_or(0, Vec::len);
    loop {
        let mut order: Vec<&Subscription> = members.to_vec();
        order.sort_by(|a, b| (load(out, a), &a.member_id).cmp(&(load(out, b), &b.member_id)));
        let mut chosen = None;
        'search: for over in order.iter().rev() {
            let over_load = load(out, over);
            for under in &order {
                if load(out, under) + 1 >= over_load {
                    break;
                }
                let theirs = &out[&over.member_id];
                let movable = |tp: &&TopicPartition| under.topics.contains(&tp.0);
                let pick = theirs
                    .iter()
                    .filter(movable)
                    .find(|tp| under.owned.contains(tp))
                    .or_else(|| theirs.iter().filter(movable).max());
                if let Some(tp) = pick {
                    chosen = Some((over.member_id.clone(), under.member_id.clone(), tp.clone()));
                    break 'search;
                }
            }
        }
        let Some((from, to, tp)) = chosen else {
            return;
        };
        out.entry(from).or_default().retain(|x| x != &tp);
        out.entry(to).or_default().push(tp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: &str, topics: &[&str], owned: &[(&str, i32)]) -> Subscription {
        Subscription {
            member_id: id.into(),
            instance_id: String::new(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            owned: owned.iter().map(|(t, p)| (t.to_string(), *p)).collect(),
        }
    }

    fn tps(v: &[(&str, i32)]) -> Vec<TopicPartition> {
        v.iter().map(|(t, p)| (t.to_string(), *p)).collect()
    }

    fn counts(n: i32) -> BTreeMap<String, i32> {
        [("t".to_string(), n)].into_iter().collect()
    }

    /// No partition twice, every partition once.
    fn assert_exact_cover(a: &Assignment, n: i32) {
        let mut all: Vec<TopicPartition> = a.values().flatten().cloned().collect();
        all.sort();
        assert_eq!(
            all,
            (0..n).map(|p| ("t".to_string(), p)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn range_gives_contiguous_blocks_extra_to_the_first() {
        let m = [sub("a", &["t"], &[]), sub("b", &["t"], &[])];
        let a = assign(AssignmentStrategy::Range, &m, &counts(5));
        assert_eq!(a["a"], tps(&[("t", 0), ("t", 1), ("t", 2)]));
        assert_eq!(a["b"], tps(&[("t", 3), ("t", 4)]));
    }

    #[test]
    fn round_robin_deals_in_turn() {
        let m = [
            sub("b", &["t"], &[]),
            sub("a", &["t"], &[]),
            sub("c", &["t"], &[]),
        ];
        let a = assign(AssignmentStrategy::RoundRobin, &m, &counts(6));
        assert_eq!(a["a"], tps(&[("t", 0), ("t", 3)]));
        assert_eq!(a["b"], tps(&[("t", 1), ("t", 4)]));
        assert_eq!(a["c"], tps(&[("t", 2), ("t", 5)]));
    }

    #[test]
    fn round_robin_skips_members_not_subscribed() {
        let m = [sub("a", &["t"], &[]), sub("b", &["u"], &[])];
        let c: BTreeMap<String, i32> = [("t".into(), 2), ("u".into(), 1)].into_iter().collect();
        let a = assign(AssignmentStrategy::RoundRobin, &m, &c);
        assert_eq!(a["a"], tps(&[("t", 0), ("t", 1)]));
        assert_eq!(a["b"], tps(&[("u", 0)]));
    }

    #[test]
    fn sticky_keeps_owners_and_moves_only_the_surplus() {
        let m = [
            sub("a", &["t"], &[("t", 0), ("t", 1), ("t", 2)]),
            sub("b", &["t"], &[("t", 3), ("t", 4), ("t", 5)]),
            sub("c", &["t"], &[]),
        ];
        let a = assign(AssignmentStrategy::CooperativeSticky, &m, &counts(6));
        assert_exact_cover(&a, 6);
        assert_eq!(a["a"], tps(&[("t", 0), ("t", 1)]));
        assert_eq!(a["b"], tps(&[("t", 3), ("t", 4)]));
        assert_eq!(a["c"], tps(&[("t", 2), ("t", 5)]));
    }

    #[test]
    fn sticky_balances_uneven_counts() {
        let m = [
            sub("a", &["t"], &[("t", 0), ("t", 1), ("t", 2), ("t", 3)]),
            sub("b", &["t"], &[("t", 4), ("t", 5), ("t", 6)]),
            sub("c", &["t"], &[]),
        ];
        let a = assign(AssignmentStrategy::Unspecified, &m, &counts(7));
        assert_exact_cover(&a, 7);
        let mut sizes: Vec<usize> = a.values().map(Vec::len).collect();
        sizes.sort();
        assert_eq!(sizes, vec![2, 2, 3]);
    }

    #[test]
    fn sticky_ignores_partitions_claimed_twice_or_gone() {
        let m = [
            sub("a", &["t"], &[("t", 0), ("t", 9)]),
            sub("b", &["t"], &[("t", 0)]),
        ];
        let a = assign(AssignmentStrategy::CooperativeSticky, &m, &counts(2));
        assert_exact_cover(&a, 2);
        assert_eq!(a["a"], tps(&[("t", 0)]));
    }

    #[test]
    fn sticky_balances_mixed_subscriptions_and_keeps_them_balanced() {
        let two = |n: i32| -> BTreeMap<String, i32> {
            [("t".to_string(), n), ("u".to_string(), n)]
                .into_iter()
                .collect()
        };
        // b owned everything; a, subscribed to t only, joins. The quota
        // alone let b keep t0..t3 and take u0..u3 as well: a got nothing,
        // generation after generation.
        let all: Vec<(&str, i32)> = (0..4).flat_map(|p| [("t", p), ("u", p)]).collect();
        let m = [sub("a", &["t"], &[]), sub("b", &["t", "u"], &all)];
        let a = assign(AssignmentStrategy::CooperativeSticky, &m, &two(4));
        assert_eq!(a["a"], tps(&[("t", 0), ("t", 1), ("t", 2), ("t", 3)]));
        assert_eq!(a["b"], tps(&[("u", 0), ("u", 1), ("u", 2), ("u", 3)]));
        // The next generation keeps it.
        let owned = |id: &str| -> Vec<(&str, i32)> {
            a[id].iter().map(|(t, p)| (t.as_str(), *p)).collect()
        };
        let m2 = [
            sub("a", &["t"], &owned("a")),
            sub("b", &["t", "u"], &owned("b")),
        ];
        assert_eq!(
            assign(AssignmentStrategy::CooperativeSticky, &m2, &two(4)),
            a
        );
        // From nothing, too.
        let fresh = [sub("a", &["t"], &[]), sub("b", &["t", "u"], &[])];
        let a = assign(AssignmentStrategy::CooperativeSticky, &fresh, &two(4));
        assert_eq!((a["a"].len(), a["b"].len()), (4, 4), "{a:?}");
        // Mixed shapes: every partition once, and no member could take a
        // partition from one holding two more than it.
        for n in 1..9 {
            let m = [
                sub("a", &["t"], &[]),
                sub("b", &["t", "u"], &[]),
                sub("c", &["u"], &[("u", 0)]),
            ];
            let a = assign(AssignmentStrategy::CooperativeSticky, &m, &two(n));
            let mut all: Vec<_> = a.values().flatten().cloned().collect();
            all.sort();
            assert_eq!(all.len(), 2 * n as usize);
            all.dedup();
            assert_eq!(all.len(), 2 * n as usize, "{a:?}");
            for over in &m {
                for under in &m {
                    let gap = a[&over.member_id].len() as i64 - a[&under.member_id].len() as i64;
                    let movable = a[&over.member_id]
                        .iter()
                        .any(|tp| under.topics.contains(&tp.0));
                    assert!(gap <= 1 || !movable, "n={n}: {a:?}");
                }
            }
        }
    }

    #[test]
    fn range_and_round_robin_follow_instance_ids_across_restarts() {
        let stat = |member: &str, instance: &str| Subscription {
            instance_id: instance.into(),
            ..sub(member, &["t"], &[])
        };
        // Instance "b" restarts and comes back under an id that sorts
        // after "a"'s, where its old one sorted before: it keeps its
        // partitions.
        let before = [stat("c-9-1", "a"), stat("c-10-1", "b")];
        let after = [stat("c-9-1", "a"), stat("c-99-2", "b")];
        for s in [AssignmentStrategy::Range, AssignmentStrategy::RoundRobin] {
            let (x, y) = (
                assign(s, &before, &counts(4)),
                assign(s, &after, &counts(4)),
            );
            assert_eq!(x["c-10-1"], y["c-99-2"], "{s:?}");
            assert_eq!(x["c-9-1"], y["c-9-1"], "{s:?}");
        }
    }

    #[test]
    fn broadcast_gives_everyone_everything() {
        let m = [sub("a", &["t"], &[]), sub("b", &["t"], &[])];
        let a = assign(AssignmentStrategy::Broadcast, &m, &counts(2));
        assert_eq!(a["a"], tps(&[("t", 0), ("t", 1)]));
        assert_eq!(a["b"], tps(&[("t", 0), ("t", 1)]));
    }

    #[test]
    fn every_strategy_covers_exactly_once_for_many_shapes() {
        for n in 0..12 {
            for members in 1..5 {
                let m: Vec<Subscription> = (0..members)
                    .map(|i| sub(&format!("m{i}"), &["t"], &[("t", i)]))
                    .collect();
                for s in [
                    AssignmentStrategy::Range,
                    AssignmentStrategy::RoundRobin,
                    AssignmentStrategy::CooperativeSticky,
                ] {
                    let a = assign(s, &m, &counts(n));
                    assert_exact_cover(&a, n);
                    let max = a.values().map(Vec::len).max().unwrap();
                    let min = a.values().map(Vec::len).min().unwrap();
                    assert!(max - min <= 1, "{s:?} n={n} members={members}: {a:?}");
                }
            }
        }
    }

    #[test]
    fn unknown_topics_are_skipped() {
        let m = [sub("a", &["missing"], &[])];
        let a = assign(AssignmentStrategy::Range, &m, &counts(3));
        assert!(a["a"].is_empty());
    }
}
