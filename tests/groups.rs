//! Consumer groups against real `runnel server` processes: members split
//! a topic and rebalance when one joins or dies (eager, and cooperative
//! with the unmoved partitions read on through the rebalance), committed
//! offsets and the membership survive the coordinator's death, the group
//! CLI (describe, reset-offsets, delete, consume --group) and its refusals.
//!
//! `cargo test --test groups -- --ignored --nocapture` also prints the
//! rebalance time of 3 members on 30 partitions and the commit rate
//! through one coordinator.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cli, cli_err, cli_ok, error_code, eventually, Cluster};
use runnel::client::{
    Client, GroupConfig, GroupConsumer, ProducerConfig, ProducerRecord, RebalanceEvent,
};
use runnel_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
/// Fast failure detection for tests.
const CONTROLLER: &str = "broker_session_timeout_ms = 2000\nbroker_heartbeat_interval_ms = 200\n";

type Tp = (String, i32);

/// What a running member has done, as seen from outside.
#[derive(Default, Debug)]
struct Seen {
    member_id: String,
    generation: i32,
    assignment: Vec<Tp>,
    /// Every (generation, assignment) it held, in order.
    history: Vec<(i32, Vec<Tp>)>,
    /// Every record: (generation, topic, partition, offset, value).
    records: Vec<(i32, String, i32, i64, String)>,
}

/// Who owns which partition at every moment, from the members' rebalance
/// listeners: a member's `Revoked` runs before it rejoins and `Assigned`
/// after the coordinator's answer, so two owners of one partition at once
/// show up as an `Assigned` of a partition still held by another member.
#[derive(Default, Debug)]
struct Ownership {
    owners: BTreeMap<Tp, String>,
    violations: Vec<String>,
    /// Every event in order: (member label, event).
    events: Vec<(String, RebalanceEvent)>,
}

impl Ownership {
    fn listen(this: &Arc<Mutex<Ownership>>, label: &str, consumer: &mut GroupConsumer) {
        let (this, label) = (this.clone(), label.to_string());
        consumer.set_rebalance_listener(Arc::new(move |e: &RebalanceEvent| {
            let mut o = this.lock().unwrap();
            match e {
                RebalanceEvent::Assigned(tps) => {
                    for tp in tps {
                        if let Some(other) = o.owners.insert(tp.clone(), label.clone()) {
                            if other != label {
                                o.violations.push(format!(
                                    "{tp:?} assigned to {label} while {other} owns it"
                                ));
                            }
                        }
                    }
                }
                RebalanceEvent::Revoked(tps) => {
                    for tp in tps {
                        if o.owners.get(tp) == Some(&label) {
                            o.owners.remove(tp);
                        } else {
                            o.violations
                                .push(format!("{label} revoked {tp:?} it did not own"));
                        }
                    }
                }
            }
            o.events.push((label.clone(), e.clone()));
        }));
    }

    /// Partitions `label` was told it lost, in events from `since` on.
    fn revoked(&self, label: &str, since: usize) -> Vec<Tp> {
        self.events[since..]
            .iter()
            .filter(|(l, _)| l == label)
            .flat_map(|(_, e)| match e {
                RebalanceEvent::Revoked(tps) => tps.clone(),
                RebalanceEvent::Assigned(_) => Vec::new(),
            })
            .collect()
    }
}

/// A group member polling in its own task.
struct Member {
    seen: Arc<Mutex<Seen>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<GroupConsumer>,
}

impl Member {
    fn spawn(client: &Client, config: GroupConfig) -> Member {
        let consumer = client.group_consumer(config).unwrap();
        Self::run(consumer, None, None)
    }

    /// A consumer whose partition ownership is tracked in `ownership`.
    fn watched(
        client: &Client,
        config: GroupConfig,
        label: &str,
        ownership: &Arc<Mutex<Ownership>>,
    ) -> GroupConsumer {
        let mut consumer = client.group_consumer(config).unwrap();
        Ownership::listen(ownership, label, &mut consumer);
        consumer
    }

    /// A member whose partition ownership is tracked in `ownership`.
    fn spawn_watched(
        client: &Client,
        config: GroupConfig,
        label: &str,
        ownership: &Arc<Mutex<Ownership>>,
        gate: Option<watch::Receiver<bool>>,
    ) -> Member {
        Self::run(Self::watched(client, config, label, ownership), gate, None)
    }

    /// A watched member that gives its polls 1, 2, 4 … 2^(`cut_ms` − 1)
    /// ms in turn and drops each when its time is up, as a caller's
    /// `select!` or timeout would, joins included.
    fn spawn_impatient(
        client: &Client,
        config: GroupConfig,
        label: &str,
        ownership: &Arc<Mutex<Ownership>>,
        cut_ms: u64,
    ) -> Member {
        let consumer = Self::watched(client, config, label, ownership);
        Self::run(consumer, None, Some(cut_ms))
    }

    /// Polls until stopped; with a `gate`, every poll after the first
    /// waits until the gate is open; with `cut_ms`, polls are dropped
    /// after 1 – 2^(`cut_ms` − 1) ms.
    fn run(
        mut consumer: GroupConsumer,
        mut gate: Option<watch::Receiver<bool>>,
        cut_ms: Option<u64>,
    ) -> Member {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, mut stopped) = watch::channel(false);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut first = true;
            let mut polls: u64 = 0;
            while !*stopped.borrow() {
                if let Some(g) = gate.as_mut().filter(|_| !first) {
                    tokio::select! {
                        _ = g.wait_for(|open| *open) => {}
                        _ = stopped.changed() => break,
                    }
                }
                first = false;
                polls += 1;
                // 1, 2, 4 … 2^(cut_ms − 1) ms in turn: short cuts land
                // inside joins and their answers, long ones let them end.
                let cut = cut_ms.map_or(Duration::MAX, |n| Duration::from_millis(1 << (polls % n)));
                let polled = tokio::select! {
                    r = tokio::time::timeout(cut, consumer.poll()) => r,
                    _ = stopped.changed() => break,
                };
                let Ok(Ok(records)) = polled else { continue };
                let mut s = s.lock().unwrap();
                let gen = consumer.generation();
                let assignment = consumer.assignment();
                if s.history.last().map(|(g, a)| (*g, a)) != Some((gen, &assignment)) {
                    s.history.push((gen, assignment.clone()));
                }
                s.member_id = consumer.member_id().to_string();
                s.generation = gen;
                s.assignment = assignment;
                for r in records {
                    let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                        .into_owned();
                    s.records
                        .push((gen, r.topic.to_string(), r.partition, r.offset, v));
                }
            }
            consumer
        });
        Member { seen, stop, task }
    }

    fn snapshot(&self) -> (String, i32, Vec<Tp>) {
        let s = self.seen.lock().unwrap();
        (s.member_id.clone(), s.generation, s.assignment.clone())
    }

    /// Stops polling, commits and leaves.
    async fn close(self) {
        let _ = self.stop.send(true);
        let consumer = self.task.await.unwrap();
        consumer.close().await.unwrap();
    }

    /// Dies without committing or leaving (heartbeats stop).
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn config(group: &str, topic: &str) -> GroupConfig {
    let mut c = GroupConfig::new(group, &[topic]);
    c.session_timeout_ms = 3_000;
    c.rebalance_timeout_ms = 5_000;
    c.auto_commit_interval = Some(Duration::from_millis(200));
    c
}

/// One broker and a client, with topic `t` of 6 partitions.
async fn one_node_with_topic_t(base: &std::path::Path) -> (Cluster, Client) {
    let cluster = Cluster::start(1, base, "", "");
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("t", 6, 1, Default::default())
        .await
        .unwrap();
    (cluster, client)
}

/// [`one_node_with_topic_t`] with its group coordinator up, and a raw
/// gRPC groups client to it.
async fn one_node_raw_groups(
    base: &std::path::Path,
) -> (
    Cluster,
    pb::consumer_groups_client::ConsumerGroupsClient<tonic::transport::Channel>,
) {
    let (cluster, client) = one_node_with_topic_t(base).await;
    // The offsets topic (and so a coordinator) exists once asked for.
    eventually("a coordinator", WAIT, || async {
        client.find_coordinator("g").await.ok()
    })
    .await;
    let groups = pb::consumer_groups_client::ConsumerGroupsClient::connect(format!(
        "http://{}",
        cluster.addrs[0]
    ))
    .await
    .unwrap();
    (cluster, groups)
}

async fn produce(client: &Client, topic: &str, from: usize, to: usize) {
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        // Idempotence off: these tests are about groups, not producer ids
        // (a just-started cluster could answer UNKNOWN_PRODUCER_ID).
        idempotence: false,
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in from..to {
        let r = ProducerRecord::keyed(format!("k{i}"), format!("v{i}"));
        acks.push(producer.send(topic, r).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    producer.close().await.unwrap();
}

/// Waits until the members share one generation and their assignments
/// cover `partitions` partitions exactly once; returns the sizes.
async fn await_balanced(members: &[&Member], partitions: i32, what: &str) -> (i32, Vec<usize>) {
    eventually(what, WAIT, || async {
        let snaps: Vec<_> = members.iter().map(|m| m.snapshot()).collect();
        let gen = snaps[0].1;
        if gen < 1 || snaps.iter().any(|s| s.1 != gen) {
            return None;
        }
        let all: Vec<Tp> = snaps.iter().flat_map(|s| s.2.clone()).collect();
        let set: BTreeSet<Tp> = all.iter().cloned().collect();
        (all.len() == partitions as usize && set.len() == all.len())
            .then(|| (gen, snaps.iter().map(|s| s.2.len()).collect()))
    })
    .await
}

/// No partition is owned by two members in one generation, and no
/// partition's records were read by two members in one generation.
fn assert_single_owner(members: &[&Member]) {
    let mut owners: BTreeMap<(i32, Tp), String> = BTreeMap::new();
    let mut readers: BTreeMap<(i32, Tp), String> = BTreeMap::new();
    for m in members {
        let s = m.seen.lock().unwrap();
        for (gen, assignment) in &s.history {
            for tp in assignment {
                if let Some(other) = owners.insert((*gen, tp.clone()), s.member_id.clone()) {
                    assert_eq!(other, s.member_id, "{tp:?} owned twice in generation {gen}");
                }
            }
        }
        for (gen, t, p, _, _) in &s.records {
            if let Some(other) = readers.insert((*gen, (t.clone(), *p)), s.member_id.clone()) {
                assert_eq!(other, s.member_id, "{t}-{p} read twice in generation {gen}");
            }
        }
    }
}

fn values(members: &[&Member]) -> BTreeSet<String> {
    members
        .iter()
        .flat_map(|m| {
            m.seen
                .lock()
                .unwrap()
                .records
                .iter()
                .map(|r| r.4.clone())
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn await_all_values(members: &[&Member], n: usize) {
    await_values(members, 0, n).await
}

async fn await_values(members: &[&Member], from: usize, to: usize) {
    let want: BTreeSet<String> = (from..to).map(|i| format!("v{i}")).collect();
    eventually("every record consumed", WAIT, || async {
        let got = values(members);
        want.is_subset(&got).then_some(())
    })
    .await;
}

/// Committed offsets equal the high watermarks of every partition.
async fn await_committed_at_end(client: &Client, group: &str, topic: &str, partitions: i32) {
    eventually("committed offsets at the log end", WAIT, || async {
        let d = client.describe_group(group).await.ok()?;
        let done = d.lags.len() == partitions as usize
            && d.lags
                .iter()
                .all(|l| l.topic == topic && l.committed_offset == l.log_end_offset);
        (done && d.total_lag == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_members_split_a_topic_and_rebalance_when_one_joins() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    produce(&client, "t", 0, 300).await;

    // The eager protocol (t06 covers the cooperative one).
    let mut eager = config("g", "t");
    eager.protocol = pb::RebalanceProtocol::Eager;
    let own = Arc::new(Mutex::new(Ownership::default()));
    let a = Member::spawn_watched(&client, eager.clone(), "A", &own, None);
    let b = Member::spawn_watched(&client, eager.clone(), "B", &own, None);
    let (_, sizes) = await_balanced(&[&a, &b], 6, "two members splitting 6 partitions").await;
    assert_eq!(sizes, vec![3, 3]);

    let started = Instant::now();
    let c = Member::spawn_watched(&client, eager, "C", &own, None);
    let (gen, sizes) =
        await_balanced(&[&a, &b, &c], 6, "three members splitting 6 partitions").await;
    eprintln!(
        "third member joined: generation {gen} after {:?}",
        started.elapsed()
    );
    assert_eq!(sizes, vec![2, 2, 2]);
    produce(&client, "t", 300, 600).await;
    await_all_values(&[&a, &b, &c], 600).await;
    await_committed_at_end(&client, "g", "t", 6).await;

    let d = client.describe_group("g").await.unwrap();
    assert_eq!(d.state, "Stable");
    assert_eq!(d.members.len(), 3);
    assert_eq!(d.protocol, pb::RebalanceProtocol::Eager as i32);
    assert_single_owner(&[&a, &b, &c]);
    {
        let o = own.lock().unwrap();
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        // Eager: A gave up everything it owned before rejoining.
        assert!(o.revoked("A", 0).len() >= 3, "{:?}", o.events);
    }
    for m in [a, b, c] {
        m.close().await;
    }
    let d = client.describe_group("g").await.unwrap();
    assert_eq!(
        (d.state.as_str(), d.members.len(), d.total_lag),
        ("Empty", 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_a_dead_members_partitions_move_after_the_session_timeout() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    produce(&client, "t", 0, 200).await;
    let a = Member::spawn(&client, config("g", "t"));
    let b = Member::spawn(&client, config("g", "t"));
    await_balanced(&[&a, &b], 6, "two members splitting 6 partitions").await;
    await_all_values(&[&a, &b], 200).await;
    await_committed_at_end(&client, "g", "t", 6).await;

    let (_, generation_before, _) = a.snapshot();
    let killed = Instant::now();
    b.crash().await;
    let d = client.describe_group("g").await.unwrap();
    assert_eq!(
        d.members.len(),
        2,
        "the dead member is still there until its session expires"
    );
    eventually("the survivor owning every partition", WAIT, || async {
        let (_, _, assignment) = a.snapshot();
        (assignment.len() == 6).then_some(())
    })
    .await;
    let moved = killed.elapsed();
    eprintln!("partitions moved {moved:?} after the kill (session timeout 3 s)");
    // The session counts from the dead member's last heartbeat, up to a
    // heartbeat interval (3 s / 5) before the kill.
    assert!(
        moved >= Duration::from_millis(3_000 - 600 - 100),
        "moved before the session expired: {moved:?}"
    );
    produce(&client, "t", 200, 300).await;
    await_values(&[&a], 200, 300).await;
    // Everything was committed before the crash: the survivor reads none
    // of it again in the new generation, and skips nothing after it.
    let again: Vec<String> = a
        .seen
        .lock()
        .unwrap()
        .records
        .iter()
        .filter(|r| r.0 > generation_before)
        .map(|r| r.4.clone())
        .filter(|v| v[1..].parse::<usize>().unwrap() < 200)
        .collect();
    assert!(again.is_empty(), "committed records read again: {again:?}");
    await_committed_at_end(&client, "g", "t", 6).await;
    assert_single_owner(&[&a]);
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_committed_offsets_survive_the_coordinators_death() {
    let base = tempfile::tempdir().unwrap();
    let (mut cluster, client) = three_brokers(base.path(), "replica_lag_time_max_ms = 10000").await;
    client
        .create_topic("t", 4, 3, Default::default())
        .await
        .unwrap();
    let offsets: Vec<pb::PartitionOffset> = (0..4)
        .map(|p| pb::PartitionOffset {
            topic_id: String::new(),
            topic: "t".into(),
            partition: p,
            offset: 10 * i64::from(p) + 1,
            metadata: format!("m{p}"),
        })
        .collect();
    client
        .commit_offsets("g", "", 0, offsets.clone())
        .await
        .unwrap();
    // A second commit of partition 0 replaces the first.
    let mut latest = offsets.clone();
    latest[0].offset = 5;
    client
        .commit_offsets("g", "", 0, vec![latest[0].clone()])
        .await
        .unwrap();
    let t = client.describe_topic("__consumer_offsets").await.unwrap();
    assert_eq!(t.replication_factor, 3);
    assert_eq!(
        t.configs
            .iter()
            .find(|c| c.0 == "min.insync.replicas")
            .map(|c| c.1.as_str()),
        Some("2")
    );
    assert_eq!(
        t.configs.get("retention.ms").map(String::as_str),
        Some("-1")
    );

    let old = client.find_coordinator("g").await.unwrap().broker_id;
    cluster.kill(old);
    let survivor = cluster.addrs[(old % 3) as usize].clone();
    let client = Client::connect(&survivor).await.unwrap();
    let (new, got) = eventually("a new coordinator serving the offsets", WAIT, || async {
        let c = client.find_coordinator("g").await.ok()?;
        if c.broker_id == old {
            return None;
        }
        let got = client.fetch_offsets("g", &[]).await.ok()?;
        Some((c.broker_id, got))
    })
    .await;
    assert_ne!(new, old);
    assert_eq!(got, latest);
    // The new coordinator takes new members and commits.
    let m = Member::spawn(&client, config("g", "t"));
    eventually("a member on the new coordinator", WAIT, || async {
        (m.snapshot().2.len() == 4).then_some(())
    })
    .await;
    m.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_cli_describe_reset_delete_and_refusals() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(1, base.path(), "", "");
    let addr = cluster.bootstrap();
    let addr = addr.as_str();
    cli_ok(addr, &["topic", "create", "t", "--partitions", "1"], None);
    let input: String = (0..10).map(|i| format!("r{i}\n")).collect();
    cli_ok(addr, &["produce", "t"], Some(input.as_bytes()));

    let err = cli_err(addr, &["group", "describe", "nobody"], None);
    assert!(err.contains("unknown group 'nobody'"), "{err}");
    let err = cli_err(addr, &["group", "delete", "nobody"], None);
    assert!(err.contains("unknown group"), "{err}");
    let err = cli_err(
        addr,
        &["consume", "t", "--group", "g", "--partition", "0"],
        None,
    );
    assert!(
        err.contains("--partition cannot be combined with --group"),
        "{err}"
    );

    let out = cli_ok(
        addr,
        &["consume", "t", "--group", "g", "--max-records", "4"],
        None,
    );
    assert_eq!(out, "r0\nr1\nr2\nr3\n");
    let out = cli_ok(addr, &["--output", "json", "group", "describe", "g"], None);
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["lags"][0]["committed_offset"], 4);
    assert_eq!(d["lags"][0]["log_end_offset"], 10);
    assert_eq!(d["total_lag"], 6);
    let listed = cli_ok(addr, &["group", "list"], None);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("g ") && l.contains("Empty")),
        "{listed}"
    );

    // Dry run (the default) shows, commits nothing.
    let reset = |args: &[&str]| -> serde_json::Value {
        let mut all = vec![
            "--output",
            "json",
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
        ];
        all.extend_from_slice(args);
        serde_json::from_str(&cli_ok(addr, &all, None)).unwrap()
    };
    let committed = || -> i64 {
        let out = cli_ok(addr, &["--output", "json", "group", "describe", "g"], None);
        let d: serde_json::Value = serde_json::from_str(&out).unwrap();
        d["lags"][0]["committed_offset"].as_i64().unwrap()
    };
    assert_eq!(
        reset(&["--to-earliest", "--dry-run"])["offsets"][0]["offset"],
        0
    );
    assert_eq!(committed(), 4);
    let shown = reset(&["--to-earliest"]);
    assert_eq!(shown["dry_run"], true);
    assert_eq!(shown["offsets"][0]["offset"], 0);
    assert_eq!(committed(), 4);
    assert_eq!(
        reset(&["--to-offset", "7", "--execute"])["offsets"][0]["offset"],
        7
    );
    assert_eq!(committed(), 7);
    assert_eq!(
        reset(&["--shift-by", "-2", "--execute"])["offsets"][0]["offset"],
        5
    );
    assert_eq!(
        reset(&["--to-offset", "99", "--execute"])["offsets"][0]["offset"],
        10,
        "clamped"
    );
    assert_eq!(
        reset(&["--to-datetime", "2000-01-01T00:00:00Z", "--execute"])["offsets"][0]["offset"],
        0
    );
    assert_eq!(
        reset(&["--to-latest", "--execute"])["offsets"][0]["offset"],
        10
    );
    assert_eq!(
        reset(&["--to-earliest", "--execute"])["offsets"][0]["offset"],
        0
    );
    assert_eq!(committed(), 0);
    let table = cli_ok(addr, &["group", "describe", "g"], None);
    assert!(table.contains("total lag:    10"), "{table}");

    // Refused while the group has an active member.
    let client = Client::connect(addr).await.unwrap();
    let a = Member::spawn(&client, config("g", "t"));
    eventually("a member owning t-0", WAIT, || async {
        (a.snapshot().2.len() == 1).then_some(())
    })
    .await;
    let err = cli_err(
        addr,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-latest",
            "--execute",
        ],
        None,
    );
    assert!(
        err.contains("active members") && err.contains("GroupNotEmpty"),
        "{err}"
    );
    let err = cli_err(addr, &["group", "delete", "g"], None);
    assert!(err.contains("active members"), "{err}");
    let err = cli_err(
        addr,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "nope",
            "--to-latest",
        ],
        None,
    );
    assert!(err.contains("unknown topic"), "{err}");

    // A commit from a stale generation or an unknown member is fenced.
    let (member, gen, _) = a.snapshot();
    let b = Member::spawn(&client, config("g", "t"));
    await_balanced(&[&a, &b], 1, "a second member").await;
    let one = vec![pb::PartitionOffset {
        topic_id: String::new(),
        topic: "t".into(),
        partition: 0,
        offset: 3,
        metadata: String::new(),
    }];
    // (A cooperative member may still commit with the generation before
    // the current one, its rejoin may be unanswered; not with an older one,
    // nor a partition it does not own.)
    let e = client
        .commit_offsets("g", &member, gen - 1, one.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), pb::ErrorCode::IllegalGeneration, "{e}");
    let (member_b, gen_b, owned_b) = b.snapshot();
    assert!(owned_b.is_empty());
    let e = client
        .commit_offsets("g", &member_b, gen_b, one.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), pb::ErrorCode::IllegalGeneration, "{e}");
    assert!(e.to_string().contains("does not own t-0"), "{e}");
    let e = client
        .commit_offsets("g", "ghost", gen + 1, one.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), pb::ErrorCode::UnknownMember, "{e}");
    let e = client.commit_offsets("g", "", 0, one).await.unwrap_err();
    assert_eq!(e.code(), pb::ErrorCode::GroupNotEmpty, "{e}");
    let e = client.describe_group("").await.unwrap_err();
    assert_eq!(e.code(), pb::ErrorCode::InvalidRequest, "{e}");
    a.close().await;
    b.close().await;

    let out = cli_ok(addr, &["group", "delete", "g"], None);
    assert!(out.contains("deleted group g"));
    assert!(!cli_ok(addr, &["group", "list"], None).contains("\ng "));
    let err = cli_err(addr, &["group", "describe", "g"], None);
    assert!(err.contains("unknown group"), "{err}");
    // After deletion the group starts over from --from.
    let out = cli(
        addr,
        &["consume", "t", "--group", "g", "--from", "latest"],
        None,
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_static_members_come_back_without_a_rebalance_and_broadcast_gives_all() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(1, base.path(), "", "");
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("t", 4, 1, Default::default())
        .await
        .unwrap();
    let mut stat = config("s", "t");
    stat.group_instance_id = "pod-1".into();
    // Each instance must come back within the last one's session: long
    // enough for a loaded machine.
    stat.session_timeout_ms = 30_000;
    let a = Member::spawn(&client, stat.clone());
    let (member, gen, assignment) = eventually("a static member", WAIT, || async {
        let s = a.snapshot();
        (s.2.len() == 4).then_some(s)
    })
    .await;
    a.crash().await;
    // The restarted instance gets the partitions back in the same
    // generation, before its old session expires, under a new member id.
    let b = Member::spawn(&client, stat.clone());
    let (again, gen_again, assignment_again) =
        eventually("the static member back", WAIT, || async {
            let s = b.snapshot();
            (s.1 >= 1).then_some(s)
        })
        .await;
    assert_eq!((gen_again, assignment_again), (gen, assignment.clone()));
    assert_ne!(again, member);
    // A graceful restart too: a static member does not leave on close,
    // so its next instance comes back without a rebalance.
    b.close().await;
    let c = Member::spawn(&client, stat.clone());
    let (_, gen_after_close, assignment_after_close) =
        eventually("the static member back after a close", WAIT, || async {
            let s = c.snapshot();
            (s.1 >= 1).then_some(s)
        })
        .await;
    assert_eq!((gen_after_close, assignment_after_close), (gen, assignment));
    c.close().await;

    // An instance still running when its replacement joins is fenced: its
    // polls fail with FENCED_INSTANCE_ID and it reads nothing more, while
    // the replacement keeps the partitions.
    let mut pod = config("f", "t");
    pod.group_instance_id = "pod-2".into();
    let all_four = |c: &GroupConsumer| c.assignment().len() == 4;
    let deadline = Instant::now() + WAIT;
    let mut old = client.group_consumer(pod.clone()).unwrap();
    while !all_four(&old) {
        assert!(
            Instant::now() < deadline,
            "the first pod-2 was never assigned"
        );
        old.poll().await.unwrap();
    }
    let mut new = client.group_consumer(pod).unwrap();
    while !all_four(&new) {
        assert!(
            Instant::now() < deadline,
            "the second pod-2 was never assigned"
        );
        new.poll().await.unwrap();
    }
    assert_eq!(new.generation(), old.generation(), "no rebalance");
    let fenced = loop {
        assert!(Instant::now() < deadline, "the old pod-2 was never fenced");
        if let Err(e) = old.poll().await {
            break e;
        }
    };
    assert_eq!(fenced.code(), pb::ErrorCode::FencedInstanceId, "{fenced}");
    assert!(old.assignment().is_empty());
    let again = old.poll().await.unwrap_err();
    assert_eq!(again.code(), pb::ErrorCode::FencedInstanceId, "{again}");
    new.poll().await.unwrap();
    assert!(all_four(&new));
    let d = client.describe_group("f").await.unwrap();
    let ids: Vec<&str> = d.members.iter().map(|m| m.member_id.as_str()).collect();
    assert_eq!(ids, [new.member_id()]);
    old.close().await.unwrap();
    new.close().await.unwrap();

    let mut all = config("b", "t");
    all.strategy = pb::AssignmentStrategy::Broadcast;
    let x = Member::spawn(&client, all.clone());
    let y = Member::spawn(&client, all);
    eventually(
        "both broadcast members owning every partition",
        WAIT,
        || async {
            let (sx, sy) = (x.snapshot(), y.snapshot());
            (sx.1 == sy.1 && sx.2.len() == 4 && sy.2.len() == 4).then_some(())
        },
    )
    .await;
    // Another strategy in the same group is refused.
    let mut range = config("b", "t");
    range.strategy = pb::AssignmentStrategy::Range;
    let mut z = client.group_consumer(range).unwrap();
    let e = z.poll().await.unwrap_err();
    assert_eq!(e.code(), pb::ErrorCode::InvalidRequest, "{e}");
    x.close().await;
    y.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08_an_idle_partition_does_not_hold_up_a_busy_ones_records() {
    // The member owns two partitions and only one has records: each poll
    // must hand them over without waiting out the idle partition's
    // long-poll wait (a minute here).
    let base = tempfile::tempdir().unwrap();
    let (_cluster, _client, mut consumer) = patient_member(base.path(), "busy", "g8", 2_000).await;
    let mut offsets = Vec::new();
    while offsets.len() < 2_000 {
        let records = tokio::time::timeout(Duration::from_secs(30), consumer.poll())
            .await
            .expect("a poll waited for the idle partition")
            .unwrap();
        offsets.extend(records.iter().map(|r| (r.partition, r.offset)));
    }
    let expected: Vec<(i32, i64)> = (0..2_000).map(|o| (0, o)).collect();
    assert_eq!(offsets, expected);
    consumer.close().await.unwrap();
}

/// One broker, a two-partition `topic` with `records` in partition 0, and
/// a member of `group` whose polls may wait a minute for records.
async fn patient_member(
    base: &std::path::Path,
    topic: &str,
    group: &str,
    records: usize,
) -> (Cluster, Client, GroupConsumer) {
    let cluster = Cluster::start(1, base, "", "");
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic(topic, 2, 1, Default::default())
        .await
        .unwrap();
    produce_to(&client, topic, 0, records).await;
    let mut c = config(group, topic);
    c.max_wait_ms = 60_000;
    let consumer = client.group_consumer(c).unwrap();
    (cluster, client, consumer)
}

/// Sends `count` records to one partition and waits for their acks.
async fn produce_to(client: &Client, topic: &str, partition: i32, count: usize) {
    let producer = client.producer(ProducerConfig {
        idempotence: false,
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..count {
        let mut r = ProducerRecord::value(format!("v{i}"));
        r.partition = Some(partition);
        acks.push(producer.send(topic, r).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t09_a_dropped_poll_loses_no_partition_and_no_record() {
    // A caller that drops a poll (a timeout, a `select!`) used to drop
    // the partitions' consumers with it: the poll had moved them into
    // tasks, and the member then read nothing until its next rebalance.
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client, mut consumer) = patient_member(base.path(), "dropped", "g9", 100).await;
    let mut offsets = BTreeSet::new();
    while offsets.len() < 100 {
        let records = tokio::time::timeout(Duration::from_secs(30), consumer.poll())
            .await
            .expect("a poll with records waiting took 30 s")
            .unwrap();
        for r in records {
            assert!(offsets.insert((r.partition, r.offset)), "{r:?} twice");
        }
    }
    assert_eq!(consumer.assignment().len(), 2);
    // Nothing to read: this poll waits (a minute) and is dropped.
    let dropped = tokio::time::timeout(Duration::from_millis(300), consumer.poll()).await;
    assert!(dropped.is_err(), "the poll had nothing to return");
    assert_eq!(
        consumer.assignment().len(),
        2,
        "the dropped poll took partitions"
    );
    assert_eq!(consumer.position("dropped", 0), Some(100));

    produce_to(&client, "dropped", 1, 50).await;
    produce_to(&client, "dropped", 0, 50).await;
    while offsets.len() < 200 {
        let records = tokio::time::timeout(Duration::from_secs(30), consumer.poll())
            .await
            .expect("no records after the dropped poll")
            .unwrap();
        for r in records {
            assert!(offsets.insert((r.partition, r.offset)), "{r:?} twice");
        }
    }
    let expected: BTreeSet<(i32, i64)> = (0..150)
        .map(|o| (0, o))
        .chain((0..50).map(|o| (1, o)))
        .collect();
    assert_eq!(offsets, expected);
    consumer.close().await.unwrap();
}

/// Highest offset `member` read of each partition.
fn read_up_to(member: &Member) -> BTreeMap<Tp, i64> {
    let mut out = BTreeMap::new();
    for (_, t, p, o, _) in &member.seen.lock().unwrap().records {
        let e = out.entry((t.clone(), *p)).or_insert(*o);
        *e = (*e).max(*o);
    }
    out
}

/// Produces `v0, v1, ...` round-robin over `partitions` until stopped;
/// returns how many.
fn produce_until_stopped(
    client: &Client,
    topic: &str,
    partitions: i32,
) -> (watch::Sender<bool>, JoinHandle<usize>) {
    let (stop, stopped) = watch::channel(false);
    let (client, topic) = (client.clone(), topic.to_string());
    let task = tokio::spawn(async move {
        let producer = client.producer(ProducerConfig {
            linger: Duration::from_millis(1),
            // Idempotence off: these tests are about groups, not producer ids
            // (a just-started cluster could answer UNKNOWN_PRODUCER_ID).
            idempotence: false,
            ..ProducerConfig::default()
        });
        let mut i = 0usize;
        while !*stopped.borrow() {
            let mut acks = Vec::new();
            for _ in 0..partitions {
                let mut r = ProducerRecord::value(format!("v{i}"));
                r.partition = Some(i as i32 % partitions);
                acks.push(producer.send(&topic, r).await.unwrap());
                i += 1;
            }
            for a in acks {
                a.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        producer.close().await.unwrap();
        i
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t06_cooperative_rebalance_keeps_unmoved_partitions_consuming() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    let (stop_producing, producing) = produce_until_stopped(&client, "t", 6);
    let own = Arc::new(Mutex::new(Ownership::default()));
    let mut cfg = config("g", "t");
    cfg.protocol = pb::RebalanceProtocol::Cooperative;
    let a = Member::spawn_watched(&client, cfg.clone(), "A", &own, None);
    let b = Member::spawn_watched(&client, cfg.clone(), "B", &own, None);
    let (gen1, sizes) = await_balanced(&[&a, &b], 6, "two members splitting 6 partitions").await;
    assert_eq!(sizes, vec![3, 3]);
    let (a1, b1) = (a.snapshot().2, b.snapshot().2);

    // C answers the first round, then holds the follow-up round open (its
    // gate is closed) so we can watch A and B inside it.
    let before_c = own.lock().unwrap().events.len();
    let (gate, gate_rx) = watch::channel(false);
    let mut slow = cfg.clone();
    slow.session_timeout_ms = 15_000;
    slow.rebalance_timeout_ms = 15_000;
    let c = Member::spawn_watched(&client, slow, "C", &own, Some(gate_rx));
    let (gen2, a2, b2) = eventually("A and B each giving one partition up", WAIT, || async {
        let (sa, sb, sc) = (a.snapshot(), b.snapshot(), c.snapshot());
        (sc.1 > gen1 && sa.1 == sc.1 && sb.1 == sc.1 && sa.2.len() == 2 && sb.2.len() == 2)
            .then_some((sc.1, sa.2, sb.2))
    })
    .await;
    assert!(c.snapshot().2.is_empty(), "C gets nothing still owned");
    assert!(a2.iter().all(|tp| a1.contains(tp)) && b2.iter().all(|tp| b1.contains(tp)));
    let d = client.describe_group("g").await.unwrap();
    assert_eq!(
        (d.state.as_str(), d.generation_id, d.protocol),
        (
            "PreparingRebalance",
            gen2,
            pb::RebalanceProtocol::Cooperative as i32
        )
    );

    // Inside the follow-up round A and B keep reading what they kept.
    let (mark_a, mark_b) = (read_up_to(&a), read_up_to(&b));
    eventually("A and B reading on during the rebalance", WAIT, || async {
        let (now_a, now_b) = (read_up_to(&a), read_up_to(&b));
        let moved = |kept: &[Tp], mark: &BTreeMap<Tp, i64>, now: &BTreeMap<Tp, i64>| {
            kept.iter()
                .all(|tp| now.get(tp).copied().unwrap_or(-1) > mark.get(tp).copied().unwrap_or(-1))
        };
        (moved(&a2, &mark_a, &now_a) && moved(&b2, &mark_b, &now_b)).then_some(())
    })
    .await;
    let d = client.describe_group("g").await.unwrap();
    assert_eq!(
        (d.state.as_str(), d.generation_id),
        ("PreparingRebalance", gen2),
        "the round was still open while A and B read on"
    );

    // C rejoins: the follow-up round gives it the two revoked partitions.
    gate.send(true).unwrap();
    let (gen3, sizes) = await_balanced(&[&a, &b, &c], 6, "three members splitting 6").await;
    assert!(gen3 > gen2);
    assert_eq!(sizes, vec![2, 2, 2]);
    assert_eq!(a.snapshot().2, a2, "A kept its partitions");
    assert_eq!(b.snapshot().2, b2, "B kept its partitions");

    stop_producing.send(true).unwrap();
    let n = producing.await.unwrap();
    await_all_values(&[&a, &b, &c], n).await;
    await_committed_at_end(&client, "g", "t", 6).await;
    {
        let o = own.lock().unwrap();
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        // The only partitions A and B ever gave up are the ones C got.
        let (ra, rb) = (o.revoked("A", before_c), o.revoked("B", before_c));
        let lost: BTreeSet<Tp> = ra.iter().chain(rb.iter()).cloned().collect();
        assert_eq!((ra.len(), rb.len()), (1, 1), "{:?}", o.events);
        assert_eq!(lost, c.snapshot().2.into_iter().collect());
        assert!(o.revoked("C", 0).is_empty());
    }
    for m in [a, b, c] {
        m.close().await;
    }
    assert!(own.lock().unwrap().violations.is_empty());
}

/// Waits until every partition of `topic` takes a write (a topic just
/// created may not be known to its leaders yet); writes one `probe`
/// record per partition.
/// A three-broker cluster (fast fencing) and a client, once every broker
/// is registered and unfenced.
async fn three_brokers(base: &std::path::Path, broker_toml: &str) -> (Cluster, Client) {
    let cluster = Cluster::start(3, base, broker_toml, CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    eventually("three live brokers", WAIT, || async {
        let c = client.describe_cluster().await.ok()?;
        (c.brokers.iter().filter(|b| !b.fenced).count() == 3).then_some(())
    })
    .await;
    (cluster, client)
}

async fn await_writable(client: &Client, topic: &str, partitions: i32) {
    let producer = client.producer(ProducerConfig {
        idempotence: false,
        ..ProducerConfig::default()
    });
    for p in 0..partitions {
        eventually("the topic taking writes", WAIT, || async {
            let mut r = ProducerRecord::value("probe");
            r.partition = Some(p);
            producer.send(topic, r).await.ok()?.await.ok()
        })
        .await;
    }
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t07_membership_survives_the_coordinators_death() {
    let base = tempfile::tempdir().unwrap();
    let (mut cluster, client) = three_brokers(base.path(), "replica_lag_time_max_ms = 10000").await;
    client
        .create_topic("t", 6, 3, Default::default())
        .await
        .unwrap();
    await_writable(&client, "t", 6).await;
    produce(&client, "t", 0, 200).await;
    let own = Arc::new(Mutex::new(Ownership::default()));
    let a = Member::spawn_watched(&client, config("g", "t"), "A", &own, None);
    let b = Member::spawn_watched(&client, config("g", "t"), "B", &own, None);
    let (generation, _) = await_balanced(&[&a, &b], 6, "two members").await;
    await_all_values(&[&a, &b], 200).await;
    await_committed_at_end(&client, "g", "t", 6).await;
    let before = client.describe_group("g").await.unwrap();
    assert_eq!(before.state, "Stable");
    let members = |d: &pb::GroupDescription| -> Vec<(String, Vec<pb::TopicPartition>)> {
        d.members
            .iter()
            .map(|m| (m.member_id.clone(), m.assignment.clone()))
            .collect()
    };
    let events_before = own.lock().unwrap().events.len();

    let old = before.coordinator;
    cluster.kill(old);
    let survivor = cluster.addrs[(old % 3) as usize].clone();
    let admin = Client::connect(&survivor).await.unwrap();
    let after = eventually("a new coordinator describing the group", WAIT, || async {
        let d = admin.describe_group("g").await.ok()?;
        (d.coordinator != old).then_some(d)
    })
    .await;
    // The new coordinator rebuilt the membership from the stored record.
    assert_eq!(
        (after.state.as_str(), after.generation_id, members(&after)),
        ("Stable", before.generation_id, members(&before))
    );

    // The members carry on: no rejoin, no partition moved, nothing
    // skipped, and their commits land on the new coordinator.
    produce(&admin, "t", 200, 300).await;
    await_values(&[&a, &b], 200, 300).await;
    await_committed_at_end(&admin, "g", "t", 6).await;
    assert_eq!((a.snapshot().1, b.snapshot().1), (generation, generation));
    let d = admin.describe_group("g").await.unwrap();
    assert_eq!(
        (d.generation_id, members(&d)),
        (before.generation_id, members(&before))
    );
    {
        let o = own.lock().unwrap();
        assert_eq!(o.events.len(), events_before, "{:?}", o.events);
    }
    a.close().await;
    b.close().await;
    let d = admin.describe_group("g").await.unwrap();
    assert_eq!((d.state.as_str(), d.members.len()), ("Empty", 0));
}

/// Figures: rebalance time for 3 members on 30 partitions, and commits per
/// second through one coordinator (three brokers, acks=all, one committer
/// in a loop, then 8, 32 and 128 concurrent standalone committers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn perf_rebalance_and_commit_rate() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = three_brokers(base.path(), "").await;
    client
        .create_topic("t", 30, 3, Default::default())
        .await
        .unwrap();
    let a = Member::spawn(&client, config("g", "t"));
    let b = Member::spawn(&client, config("g", "t"));
    await_balanced(&[&a, &b], 30, "two members").await;
    let started = Instant::now();
    let c = Member::spawn(&client, config("g", "t"));
    await_balanced(&[&a, &b, &c], 30, "three members").await;
    eprintln!(
        "rebalance, third member joining 2 members on 30 partitions: {:?}",
        started.elapsed()
    );
    for m in [a, b, c] {
        m.close().await;
    }

    let offsets = |i: i64| -> Vec<pb::PartitionOffset> {
        vec![pb::PartitionOffset {
            topic_id: String::new(),
            topic: "t".into(),
            partition: 0,
            offset: i,
            metadata: String::new(),
        }]
    };
    let n = 500;
    let started = Instant::now();
    for i in 0..n {
        client
            .commit_offsets("perf", "", 0, offsets(i))
            .await
            .unwrap();
    }
    let e = started.elapsed();
    eprintln!(
        "sequential commits: {n} in {e:?} = {:.0}/s",
        n as f64 / e.as_secs_f64()
    );
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let client = client.clone();
        tasks.spawn(async move {
            for i in 0..n / 8 {
                client
                    .commit_offsets("perf", "", 0, offsets(w * 1000 + i))
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let e = started.elapsed();
    eprintln!(
        "8 concurrent committers: {} in {e:?} = {:.0}/s",
        n / 8 * 8,
        (n / 8 * 8) as f64 / e.as_secs_f64()
    );
    // Many committers at once (members of many groups on one coordinator
    // commit concurrently), each with its own partition.
    for (committers, each) in [(32i64, 100i64), (128, 50)] {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..committers {
            let client = client.clone();
            tasks.spawn(async move {
                for i in 0..each {
                    let o = pb::PartitionOffset {
                        topic_id: String::new(),
                        topic: "t".into(),
                        partition: (w % 30) as i32,
                        offset: w * 1000 + i,
                        metadata: String::new(),
                    };
                    client.commit_offsets("perf", "", 0, vec![o]).await.unwrap();
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let e = started.elapsed();
        let total = committers * each;
        eprintln!(
            "{committers} concurrent committers: {total} in {e:?} = {:.0}/s",
            total as f64 / e.as_secs_f64()
        );
    }
}

/// A join is answered only once its generation's record is stored: here
/// a failpoint fails every append to the offsets topic, so every store
/// fails. The join is refused (it was answered, generation and all,
/// although a failover would have restored an older generation). Once the
/// failpoint is lifted, the coordinator's retry stores the record and a
/// join succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_a_join_waits_until_its_generation_is_stored() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(1, base.path(), "failpoints = true", "");
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("t", 1, 1, Default::default())
        .await
        .unwrap();
    // The offsets topic exists once a group has used it.
    client.commit_offsets("warm", "", 0, vec![]).await.unwrap();
    let failpoints = cluster.data_dir(1).join("failpoints");
    std::fs::create_dir_all(&failpoints).unwrap();
    let failpoint = failpoints.join(runnel::group::appender::FAIL_APPENDS_FAILPOINT);
    std::fs::write(&failpoint, b"").unwrap();
    let url = format!("http://{}", cluster.addrs[0]);
    let mut groups = pb::consumer_groups_client::ConsumerGroupsClient::connect(url)
        .await
        .unwrap();
    let join = pb::JoinGroupRequest {
        group: "g".into(),
        topics: vec!["t".into()],
        session_timeout_ms: 1_000,
        rebalance_timeout_ms: 1_000,
        ..Default::default()
    };
    // Refused, not answered, at its deadline. The member, never answered
    // and so never heartbeating, is not expired meanwhile: its session
    // counts from when the record is stored (before, it was expired
    // after its 1 s session, and the join refused as UNKNOWN_MEMBER).
    let refused = groups.join_group(join.clone()).await.unwrap_err();
    assert_eq!(error_code(&refused), "REBALANCE_IN_PROGRESS", "{refused:?}");
    // The Rust client's poll, as Kafka's, takes a join that cannot
    // complete as a rebalance still under way: no records and no error;
    // a later poll joins again.
    let mut cfg = GroupConfig::new("g-client", &["t"]);
    cfg.session_timeout_ms = 10_000;
    cfg.rebalance_timeout_ms = 1_000;
    let mut member = client.group_consumer(cfg).unwrap();
    let polled = member.poll().await;
    assert!(polled.as_ref().is_ok_and(Vec::is_empty), "{polled:?}");
    assert!(member.assignment().is_empty());
    std::fs::remove_file(&failpoint).unwrap();
    let joined = eventually(
        "a join answered once the record is stored",
        WAIT,
        || async {
            let mut groups = groups.clone();
            groups.join_group(join.clone()).await.ok()
        },
    )
    .await
    .into_inner();
    assert!(joined.generation_id >= 1);
    assert_eq!(joined.assignment.len(), 1);
    let deadline = Instant::now() + WAIT;
    while member.assignment().len() != 1 {
        assert!(Instant::now() < deadline, "the client never joined");
        member.poll().await.unwrap();
    }
    member.close().await.unwrap();
}

/// Members whose polls are cut short after a few milliseconds, as a
/// `select!` or a timeout in the caller would, joins and rebalances
/// included: partitions still move between members without two owners
/// at once, and every record is read and committed. A poll dropped while
/// it took up a rebalance answer left the member without a heartbeat and
/// with partitions not started (until its session ran out and they moved
/// while it still read the others), or read revoked partitions on while
/// rejoining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12_polls_cut_short_hand_partitions_over_cleanly() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    let (stop_producing, producing) = produce_until_stopped(&client, "t", 6);
    for protocol in [
        pb::RebalanceProtocol::Cooperative,
        pb::RebalanceProtocol::Eager,
    ] {
        let own = Arc::new(Mutex::new(Ownership::default()));
        let group = format!("g-{}", protocol as i32);
        let mut cfg = config(&group, "t");
        cfg.protocol = protocol;
        let label = |l: &str| format!("{group}-{l}");
        let a = Member::spawn_impatient(&client, cfg.clone(), &label("A"), &own, 12);
        let b = Member::spawn_impatient(&client, cfg.clone(), &label("B"), &own, 11);
        await_balanced(&[&a, &b], 6, "two impatient members splitting 6").await;
        let c = Member::spawn_impatient(&client, cfg.clone(), &label("C"), &own, 13);
        let (_, sizes) = await_balanced(&[&a, &b, &c], 6, "three impatient members").await;
        assert_eq!(sizes, vec![2, 2, 2]);
        c.close().await;
        // A member that left owns nothing (closing tells no listener).
        own.lock().unwrap().owners.retain(|_, l| *l != label("C"));
        let (_, sizes) = await_balanced(&[&a, &b], 6, "two again").await;
        assert_eq!(sizes, vec![3, 3]);
        for m in [a, b] {
            m.close().await;
        }
        let o = own.lock().unwrap();
        assert!(o.violations.is_empty(), "{protocol:?}: {:?}", o.violations);
    }
    stop_producing.send(true).unwrap();
    producing.await.unwrap();
}

/// Partitions added to a subscribed topic are assigned and read, even by
/// a member whose client cached the topic with fewer partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_a_member_reads_partitions_added_to_its_topic() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(1, base.path(), "", "");
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("grow", 1, 1, Default::default())
        .await
        .unwrap();
    let m = Member::run(
        client.group_consumer(config("g-grow", "grow")).unwrap(),
        None,
        None,
    );
    produce(&client, "grow", 0, 20).await;
    await_all_values(&[&m], 20).await;
    // Another client grows the topic: the member's client still has it
    // cached with one partition.
    let admin = Client::connect(&cluster.bootstrap()).await.unwrap();
    admin.add_partitions("grow", 3).await.unwrap();
    await_balanced(&[&m], 3, "the new partitions assigned").await;
    produce(&admin, "grow", 20, 80).await;
    let d = admin.describe_topic("grow").await.unwrap();
    assert!(
        d.partitions.iter().all(|p| p.log_end_offset > 0),
        "the keys did not reach every partition: {d:?}"
    );
    await_values(&[&m], 20, 80).await;
    m.close().await;
}

/// A cooperative member whose background rejoin was answered keeps
/// heartbeating until a poll takes the answer up: an application busy
/// with the records it has, for longer than the session timeout, is not
/// expired from a group that is otherwise stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_a_cooperative_member_busy_after_its_rejoin_was_answered_stays() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    let mut cfg = config("g-busy", "t");
    cfg.protocol = pb::RebalanceProtocol::Cooperative;
    let session = Duration::from_millis(u64::from(cfg.session_timeout_ms));
    let mut a = client.group_consumer(cfg.clone()).unwrap();
    let b = Member::spawn(&client, cfg.clone());
    let deadline = std::time::Instant::now() + WAIT;
    while !(a.assignment().len() == 3 && b.snapshot().2.len() == 3) {
        assert!(std::time::Instant::now() < deadline, "never balanced");
        a.poll().await.unwrap();
    }
    // B leaves: A is asked to rejoin and takes all six, without giving
    // any up, so the answer does not ask for another round.
    b.close().await;
    // Polled until a poll has started the rejoin in the background, and
    // not after: its answer arrives while the application is busy.
    while !a.rejoining_in_background() {
        assert!(std::time::Instant::now() < deadline, "no rejoin started");
        a.poll().await.unwrap();
    }
    let member = a.member_id().to_string();
    // A is busy with what it has, for three session timeouts, while its
    // rejoin is answered in the background.
    tokio::time::sleep(3 * session).await;
    let d = client.describe_group("g-busy").await.unwrap();
    let members: Vec<&str> = d.members.iter().map(|m| m.member_id.as_str()).collect();
    assert_eq!(members, [member.as_str()], "expired while busy: {d:?}");
    a.poll().await.unwrap();
    assert_eq!(a.assignment().len(), 6);
    assert_eq!(a.member_id(), member);
    a.close().await.unwrap();
}

/// A first join asks for its member id before joining (KIP-394): one
/// abandoned after that (a poll dropped by a timeout, a retried call)
/// leaves no member in the group to be handed partitions nobody reads;
/// the id handed out joins as a new member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13_an_abandoned_first_join_leaves_no_member_behind() {
    let base = tempfile::tempdir().unwrap();
    let (cluster, client) = one_node_with_topic_t(base.path()).await;
    let url = format!("http://{}", cluster.addrs[0]);
    let mut groups = pb::consumer_groups_client::ConsumerGroupsClient::connect(url)
        .await
        .unwrap();
    let join = pb::JoinGroupRequest {
        group: "g-first".into(),
        topics: vec!["t".into()],
        session_timeout_ms: 10_000,
        rebalance_timeout_ms: 10_000,
        client_id: "raw".into(),
        member_id_first: true,
        ..Default::default()
    };
    // (Once the coordinator is up: the offsets topic is created on first
    // use.)
    let first = eventually("a member id handed out", WAIT, || async {
        let mut groups = groups.clone();
        let find = pb::FindCoordinatorRequest {
            group: "g-first".into(),
        };
        groups.find_coordinator(find).await.ok()?;
        groups.join_group(join.clone()).await.ok()
    })
    .await
    .into_inner();
    assert!(first.member_id_required, "{first:?}");
    assert!(!first.member_id.is_empty(), "{first:?}");
    assert_eq!(first.generation_id, -1);
    assert!(first.assignment.is_empty());

    // Abandoned: a member joining now is alone, in the first generation.
    let mut m = client.group_consumer(config("g-first", "t")).unwrap();
    while m.generation() < 1 {
        m.poll().await.unwrap();
    }
    assert_eq!(m.generation(), 1);
    assert_eq!(m.assignment().len(), 6);
    let d = client.describe_group("g-first").await.unwrap();
    assert_eq!(d.members.len(), 1, "{d:?}");
    m.close().await.unwrap();

    // The id handed out joins the group, now empty, as a new member.
    let joined = groups
        .join_group(pb::JoinGroupRequest {
            member_id: first.member_id.clone(),
            ..join
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.member_id, first.member_id);
    assert!(!joined.member_id_required);
    assert_eq!(joined.assignment.len(), 6);
}

/// A member whose application stops polling for longer than
/// max_poll_interval leaves the group although its heartbeats could go
/// on: its partitions move to a member that reads. Its next poll joins
/// again, as a new member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t14_a_member_that_stops_polling_leaves_after_max_poll_interval() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    let mut cfg = config("g-stuck", "t");
    cfg.max_poll_interval = Duration::from_secs(2);
    let mut stuck = client.group_consumer(cfg.clone()).unwrap();
    let reader = Member::spawn(&client, cfg.clone());
    let deadline = std::time::Instant::now() + WAIT;
    while !(stuck.assignment().len() == 3 && reader.snapshot().2.len() == 3) {
        assert!(std::time::Instant::now() < deadline, "never balanced");
        stuck.poll().await.unwrap();
    }
    let before = stuck.member_id().to_string();
    // The application is stuck: no poll. Its heartbeats alone would keep
    // its three partitions unread for as long as it stays stuck.
    eventually("the reader holding all six", WAIT, || async {
        (reader.snapshot().2.len() == 6).then_some(())
    })
    .await;
    // Unstuck, it joins again as a new member and takes a share.
    let deadline = std::time::Instant::now() + WAIT;
    while !(stuck.assignment().len() == 3 && reader.snapshot().2.len() == 3) {
        assert!(
            std::time::Instant::now() < deadline,
            "never rebalanced back"
        );
        stuck.poll().await.unwrap();
    }
    assert_ne!(stuck.member_id(), before);
    stuck.close().await.unwrap();
    reader.close().await;
}

/// A member whose second join (with the id it was given) is dropped by
/// its caller, and which is then closed, leaves the group: the join had
/// made it a member, which would otherwise be handed partitions nobody
/// reads until its session ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_a_member_closed_after_a_dropped_join_leaves() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    let cfg = config("g-dropped", "t");
    let reader = Member::spawn(&client, cfg.clone());
    eventually("the reader holding all six", WAIT, || async {
        (reader.snapshot().2.len() == 6).then_some(())
    })
    .await;
    // The second join waits for the reader to rejoin (a heartbeat, some
    // hundreds of ms): a 100 ms poll is dropped inside it.
    let mut dropped = None;
    for _ in 0..20 {
        let mut m = client.group_consumer(cfg.clone()).unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(100), m.poll()).await;
        if !m.member_id().is_empty() && m.generation() < 0 {
            dropped = Some(m);
            break;
        }
        m.close().await.unwrap();
    }
    let m = dropped.expect("no poll was dropped inside the second join");
    let id = m.member_id().to_string();
    m.close().await.unwrap();
    let d = client.describe_group("g-dropped").await.unwrap();
    assert!(
        d.members.iter().all(|x| x.member_id != id),
        "the closed member is still in the group: {d:?}"
    );
    reader.close().await;
}

/// A deleted topic's committed offsets go with it: a topic created again
/// under the name is read by the group from its reset point, not from the
/// old topic's offsets (which would skip the new one's first records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16_a_recreated_topic_is_not_read_from_the_old_offsets() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    client
        .create_topic("doomed", 1, 1, Default::default())
        .await
        .unwrap();
    produce(&client, "doomed", 0, 10).await;
    let at = |offset| {
        vec![pb::PartitionOffset {
            topic_id: String::new(),
            topic: "doomed".into(),
            partition: 0,
            offset,
            metadata: String::new(),
        }]
    };
    client
        .commit_offsets("g-doomed", "", 0, at(8))
        .await
        .unwrap();
    client.delete_topic("doomed").await.unwrap();
    let tp = [("doomed".to_string(), 0)];
    eventually("the deleted topic's offsets removed", WAIT, || async {
        let got = client.fetch_offsets("g-doomed", &tp).await.ok()?;
        got.iter().all(|o| o.offset < 0).then_some(())
    })
    .await;
    // A late commit (an auto-commit, a revocation's) cannot bring them back.
    let late = client
        .commit_offsets("g-doomed", "", 0, at(9))
        .await
        .unwrap_err();
    assert_eq!(late.code(), pb::ErrorCode::UnknownTopic, "{late}");
    eventually("the topic created again", WAIT, || async {
        client
            .create_topic("doomed", 1, 1, Default::default())
            .await
            .ok()
    })
    .await;
    produce(&client, "doomed", 100, 110).await;
    let m = Member::spawn(&client, config("g-doomed", "doomed"));
    await_values(&[&m], 100, 110).await;
    m.close().await;
}

/// A member whose client cached a topic before it was deleted and created
/// again (its fetches name the old id: UNKNOWN_TOPIC_ID) goes on from the
/// group's committed offset for the topic as it is now; it used to take
/// that answer as "the topic is new" and start over per offset_reset,
/// reading records the group had already consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_a_stale_topic_id_resumes_from_the_committed_offset() {
    let base = tempfile::tempdir().unwrap();
    let (cluster, client) = one_node_with_topic_t(base.path()).await;
    client
        .create_topic("again", 1, 1, Default::default())
        .await
        .unwrap();
    // This client caches the first "again" (for a minute).
    let stale = Client::connect(&cluster.bootstrap()).await.unwrap();
    stale.topic("again").await.unwrap();
    client.delete_topic("again").await.unwrap();
    eventually("the topic created again", WAIT, || async {
        client
            .create_topic("again", 1, 1, Default::default())
            .await
            .ok()
    })
    .await;
    produce(&client, "again", 0, 10).await;
    let at5 = vec![pb::PartitionOffset {
        topic_id: String::new(),
        topic: "again".into(),
        partition: 0,
        offset: 5,
        metadata: String::new(),
    }];
    client.commit_offsets("g-again", "", 0, at5).await.unwrap();
    let mut member = stale.group_consumer(config("g-again", "again")).unwrap();
    let deadline = Instant::now() + WAIT;
    let first = loop {
        assert!(Instant::now() < deadline, "nothing read");
        if let Some(r) = member.poll().await.unwrap().first() {
            break r.offset;
        }
    };
    assert_eq!(first, 5, "read from {first}, not the committed offset");
    member.close().await.unwrap();
    // A commit naming another topic id than the topic's (a position read
    // from the topic before it was created again) is refused, not stored
    // as the new topic's.
    let old_position = vec![pb::PartitionOffset {
        topic_id: "an-earlier-topic".into(),
        topic: "again".into(),
        partition: 0,
        offset: 9,
        metadata: String::new(),
    }];
    let refused = client
        .commit_offsets("g-again", "", 0, old_position)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), pb::ErrorCode::UnknownTopicId, "{refused}");
    let kept = client
        .fetch_offsets("g-again", &[("again".to_string(), 0)])
        .await
        .unwrap();
    assert_ne!(kept[0].offset, 9, "{kept:?}");
}

/// Offsets carry the id of the topic they were committed for: a topic
/// deleted and created again while the group's coordinator was down (no
/// coordinator wrote the old offsets' tombstones) is not read from them
/// by the coordinator that takes over (it served the old offset 5, which
/// would skip the new topic's first records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_offsets_of_a_topic_recreated_while_the_coordinator_was_down_are_not_served() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(3, base.path(), "", CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("t", 1, 1, Default::default())
        .await
        .unwrap();
    let five = vec![pb::PartitionOffset {
        topic_id: String::new(),
        topic: "t".into(),
        partition: 0,
        offset: 5,
        metadata: String::new(),
    }];
    client.commit_offsets("g", "", 0, five).await.unwrap();
    let tp = [("t".to_string(), 0)];
    assert_eq!(client.fetch_offsets("g", &tp).await.unwrap()[0].offset, 5);
    let coordinator = client.find_coordinator("g").await.unwrap().broker_id;
    cluster.kill(coordinator);
    // Another node than the one killed.
    let survivor = cluster.addrs[(coordinator % 3) as usize].clone();
    let client = Client::connect(&survivor).await.unwrap();
    eventually("t deleted and created again", WAIT, || async {
        if client.describe_topic("t").await.is_ok() {
            client.delete_topic("t").await.ok()?;
        }
        client
            .create_topic("t", 1, 1, Default::default())
            .await
            .ok()
    })
    .await;
    let served = eventually("a coordinator that answers", WAIT, || async {
        client.fetch_offsets("g", &tp).await.ok()
    })
    .await;
    assert_eq!(served[0].offset, -1, "{served:?}");
}

/// A static member that takes its instance's place under a new member id
/// (a restart) without a rebalance is stored before its join is answered:
/// after a failover the new coordinator knows the new member id (it
/// brought back the old one, fencing the live instance and accepting its
/// zombie).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t18_a_replaced_static_member_survives_a_coordinator_failover() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(3, base.path(), "", CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("t", 2, 3, Default::default())
        .await
        .unwrap();
    let coordinator = eventually("a coordinator", WAIT, || async {
        client.find_coordinator("g").await.ok()
    })
    .await;
    let mut groups = pb::consumer_groups_client::ConsumerGroupsClient::connect(format!(
        "http://{}",
        coordinator.address
    ))
    .await
    .unwrap();
    let join = pb::JoinGroupRequest {
        group: "g".into(),
        group_instance_id: "i1".into(),
        topics: vec!["t".into()],
        session_timeout_ms: 30_000,
        rebalance_timeout_ms: 5_000,
        ..Default::default()
    };
    // The coordinator found may still be loading the group's partition
    // (NOT_COORDINATOR until it has): asked again, as clients do.
    let first = eventually("the coordinator taking joins", WAIT, || {
        let (mut groups, join) = (groups.clone(), join.clone());
        async move {
            match groups.join_group(join).await {
                Ok(r) => Some(r.into_inner()),
                Err(s) if s.code() == tonic::Code::Unavailable => None,
                Err(s) => panic!("join refused: {s:?}"),
            }
        }
    })
    .await;
    // The instance restarts: same instance id, no member id.
    let second = groups.join_group(join).await.unwrap().into_inner();
    assert_ne!(first.member_id, second.member_id);
    assert_eq!(first.generation_id, second.generation_id, "no rebalance");

    cluster.kill(coordinator.broker_id);
    let survivor = cluster.addrs[(coordinator.broker_id % 3) as usize].clone();
    let client = Client::connect(&survivor).await.unwrap();
    let beat = |member_id: String| {
        let client = &client;
        async move {
            let c = client.find_coordinator("g").await.ok()?;
            let mut groups = pb::consumer_groups_client::ConsumerGroupsClient::connect(format!(
                "http://{}",
                c.address
            ))
            .await
            .ok()?;
            let r = groups
                .heartbeat(pb::HeartbeatRequest {
                    group: "g".into(),
                    member_id,
                    generation_id: second.generation_id,
                    group_instance_id: "i1".into(),
                })
                .await;
            match r {
                Ok(_) => Some(Ok(())),
                Err(s) => {
                    let code = error_code(&s);
                    // Still moving: ask again.
                    (code != "NOT_COORDINATOR" && !code.is_empty()).then_some(Err(code))
                }
            }
        }
    };
    let answer = eventually("the new coordinator", WAIT, || {
        beat(second.member_id.clone())
    })
    .await;
    assert_eq!(answer, Ok(()), "the replacing member is known");
    let zombie = eventually("the new coordinator", WAIT, || {
        beat(first.member_id.clone())
    })
    .await;
    assert_eq!(zombie, Err("FENCED_INSTANCE_ID".to_string()));
}

/// A member busy with its last records when a rebalance starts keeps
/// heartbeating through it: it is not expired after its session timeout
/// but waited for, up to the rebalance timeout, and rejoins under its own
/// id when it polls again (it used to stop heartbeating at the first
/// "rejoin" answer and be dropped from the group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t19_a_member_busy_through_a_rebalance_is_waited_for() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    let mut cfg = config("g-busy", "t");
    cfg.session_timeout_ms = 2_000;
    cfg.rebalance_timeout_ms = 30_000;
    let mut busy = client.group_consumer(cfg.clone()).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while busy.assignment().len() != 6 {
        assert!(std::time::Instant::now() < deadline, "never assigned");
        busy.poll().await.unwrap();
    }
    let id = busy.member_id().to_string();
    let generation = busy.generation();
    let other = Member::spawn(&client, cfg.clone());
    eventually(
        "the second member's join opening a rebalance",
        WAIT,
        || async {
            let d = client.describe_group("g-busy").await.ok()?;
            (d.state == "PreparingRebalance").then_some(())
        },
    )
    .await;
    // The application works on what it has for three session timeouts.
    tokio::time::sleep(Duration::from_millis(3 * u64::from(cfg.session_timeout_ms))).await;
    let d = client.describe_group("g-busy").await.unwrap();
    assert!(
        d.members.iter().any(|m| m.member_id == id),
        "the busy member was expired: {d:?}"
    );
    let deadline = std::time::Instant::now() + WAIT;
    while !(busy.generation() > generation && busy.assignment().len() == 3) {
        assert!(std::time::Instant::now() < deadline, "never rebalanced");
        busy.poll().await.unwrap();
    }
    assert_eq!(busy.member_id(), id, "rejoined as a new member");
    eventually("the other member holding the other three", WAIT, || async {
        (other.snapshot().2.len() == 3).then_some(())
    })
    .await;
    busy.close().await.unwrap();
    other.close().await;
}

/// A member assigned a partition that has no leader reads the rest of its
/// assignment meanwhile, and takes the partition up once it is back (one
/// such partition used to fail every start: the member read nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_a_partition_without_a_leader_does_not_stop_the_others() {
    let base = tempfile::tempdir().unwrap();
    let (mut cluster, client) = three_brokers(base.path(), "").await;
    client
        .create_topic("u", 3, 1, Default::default())
        .await
        .unwrap();
    // One "probe" record in each partition.
    await_writable(&client, "u", 3).await;
    // The offsets topic is created while all three brokers are live.
    let mut warm = client.group_consumer(config("g-warm", "u")).unwrap();
    let deadline = Instant::now() + WAIT;
    while warm.assignment().len() != 3 {
        assert!(Instant::now() < deadline, "the first group never formed");
        warm.poll().await.unwrap();
    }
    warm.close().await.unwrap();
    let offline = client.describe_topic("u").await.unwrap().partitions[2].leader;
    cluster.kill(offline);
    let d = client.describe_topic("u").await.unwrap();
    let on_it: BTreeSet<i32> = d
        .partitions
        .iter()
        .filter(|p| p.replicas == [offline])
        .map(|p| p.partition)
        .collect();
    eventually("its partitions without a leader", WAIT, || async {
        let d = client.describe_topic("u").await.ok()?;
        d.partitions
            .iter()
            .filter(|p| on_it.contains(&p.partition))
            .all(|p| p.leader < 0)
            .then_some(())
    })
    .await;
    let mut member = client.group_consumer(config("g-offline", "u")).unwrap();
    // A poll reports a partition still unstarted every 30 s, as a
    // retriable error; the others are read meanwhile.
    async fn poll_into(member: &mut GroupConsumer, read: &mut BTreeSet<i32>) {
        match member.poll().await {
            Ok(records) => read.extend(records.iter().map(|r| r.partition)),
            Err(e) => assert!(e.is_retriable(), "{e}"),
        }
    }
    let mut read = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while read.len() + on_it.len() < 3 {
        assert!(Instant::now() < deadline, "read only {read:?}");
        poll_into(&mut member, &mut read).await;
    }
    assert!(read.is_disjoint(&on_it), "{read:?} {on_it:?}");
    assert!(!member.caught_up(), "a partition is not read yet");
    cluster.restart(offline);
    let deadline = Instant::now() + WAIT;
    while read.len() < 3 {
        assert!(Instant::now() < deadline, "read only {read:?}");
        poll_into(&mut member, &mut read).await;
    }
    assert_eq!(member.assignment().len(), 3);
    member.close().await.unwrap();
}

/// `OffsetReset::None` (Kafka's auto.offset.reset=none): a partition with
/// no committed offset is not started anywhere; polls fail naming it until
/// the application seeks it, and reading then starts there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_offset_reset_none_waits_for_a_seek() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    client
        .create_topic("n", 1, 1, Default::default())
        .await
        .unwrap();
    produce(&client, "n", 0, 10).await;
    let mut cfg = config("g-none", "n");
    cfg.offset_reset = runnel::client::OffsetReset::None;
    let mut member = client.group_consumer(cfg).unwrap();
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        assert!(Instant::now() < deadline, "never refused");
        match member.poll().await {
            Ok(records) => assert!(records.is_empty(), "read without a position"),
            Err(e) => break e,
        }
    };
    assert_eq!(refused.code(), pb::ErrorCode::OffsetOutOfRange, "{refused}");
    assert!(refused.to_string().contains("n-0"), "{refused}");
    assert_eq!(member.unpositioned(), [("n".to_string(), 0)]);
    assert!(!member.caught_up());
    member.seek("n", 0, 3).unwrap();
    let first = loop {
        assert!(Instant::now() < deadline, "nothing read after the seek");
        if let Some(r) = member.poll().await.unwrap().first() {
            break r.offset;
        }
    };
    assert_eq!(first, 3);
    member.close().await.unwrap();
}

/// A static member replaced while its join still waits is fenced
/// (FENCED_INSTANCE_ID). It used to get UNKNOWN_MEMBER (or wait
/// for the rebalance), and a client clears its member id on that and
/// joins again as the same instance: the two incarnations took the
/// instance from each other round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23_a_static_member_replaced_mid_join_is_fenced() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, groups) = one_node_raw_groups(base.path()).await;
    let join = pb::JoinGroupRequest {
        group: "g".into(),
        topics: vec!["t".into()],
        session_timeout_ms: 30_000,
        rebalance_timeout_ms: 5_000,
        ..Default::default()
    };
    // A dynamic member, stable; it will not rejoin, so the next
    // rebalance waits for it.
    let a = eventually("a first join", WAIT, || {
        let (mut groups, join) = (groups.clone(), join.clone());
        async move { groups.join_group(join).await.ok() }
    })
    .await
    .into_inner();
    let pod = pb::JoinGroupRequest {
        group_instance_id: "pod-1".into(),
        ..join.clone()
    };
    let old = tokio::spawn({
        let (mut groups, pod) = (groups.clone(), pod.clone());
        async move { groups.join_group(pod).await }
    });
    // The old incarnation's join is under way once A is asked to rejoin.
    eventually("a rebalance under way", WAIT, || {
        let mut groups = groups.clone();
        let member_id = a.member_id.clone();
        let generation_id = a.generation_id;
        async move {
            let r = groups
                .heartbeat(pb::HeartbeatRequest {
                    group: "g".into(),
                    member_id,
                    generation_id,
                    group_instance_id: String::new(),
                })
                .await;
            match r {
                Ok(r) => r.into_inner().rejoin.then_some(()),
                Err(s) if error_code(&s) == "REBALANCE_IN_PROGRESS" => Some(()),
                Err(_) => None,
            }
        }
    })
    .await;
    let new = tokio::spawn({
        let (mut groups, pod) = (groups.clone(), pod.clone());
        async move { groups.join_group(pod).await }
    });
    let refused = old.await.unwrap().unwrap_err();
    assert_eq!(error_code(&refused), "FENCED_INSTANCE_ID", "{refused:?}");
    new.abort();
}

/// A join whose fields would bloat the group record is refused at once
/// with INVALID_REQUEST naming the field: a record larger than the
/// offsets topic takes was never stored, and every join of the group
/// waited while it was retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t24_a_join_with_oversized_fields_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, mut groups) = one_node_raw_groups(base.path()).await;
    let join = pb::JoinGroupRequest {
        group: "g".into(),
        topics: vec!["t".into()],
        ..Default::default()
    };
    for (bad, field) in [
        (
            pb::JoinGroupRequest {
                client_id: "c".repeat(300),
                ..join.clone()
            },
            "client_id",
        ),
        (
            pb::JoinGroupRequest {
                client_id: "c\u{1}".into(),
                ..join.clone()
            },
            "client_id",
        ),
        (
            pb::JoinGroupRequest {
                group_instance_id: "i".repeat(300),
                ..join.clone()
            },
            "group_instance_id",
        ),
        (
            pb::JoinGroupRequest {
                topics: vec!["t".into(), "no such name!".into()],
                ..join.clone()
            },
            "no such name!",
        ),
    ] {
        let refused = groups.join_group(bad).await.unwrap_err();
        assert_eq!(error_code(&refused), "INVALID_REQUEST", "{refused:?}");
        assert!(refused.message().contains(field), "{refused:?}");
    }
    // A sound join still gets in.
    let joined = eventually("a join", WAIT, || {
        let (mut groups, join) = (groups.clone(), join.clone());
        async move { groups.join_group(join).await.ok() }
    })
    .await;
    assert!(!joined.into_inner().member_id.is_empty());
}

/// `runnel consume --group --follow` stopped by Ctrl-C (SIGINT) commits
/// what it printed, leaves, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t25_the_cli_group_consumer_commits_what_it_printed_on_ctrl_c() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let base = tempfile::tempdir().unwrap();
    let (cluster, client) = one_node_with_topic_t(base.path()).await;
    produce(&client, "t", 0, 10).await;
    let mut child = common::Reaped::new(
        Command::new(common::runnel_bin())
            .args(["--bootstrap", &cluster.addrs[0]])
            .args(["consume", "t", "--group", "cli", "--follow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.child().stdout.take().unwrap();
    // Bounded: a consumer printing fewer lines fails the test (and is
    // killed, which ends the read) instead of hanging it.
    let printed = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            (0..10).map(|_| lines.next().unwrap().unwrap()).count()
        }),
    )
    .await
    .expect("ten records printed")
    .unwrap();
    assert_eq!(printed, 10);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = tokio::task::spawn_blocking(move || child.wait_output(WAIT))
        .await
        .expect("the consumer stopped on Ctrl-C");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    let committed: i64 = client
        .fetch_offsets("cli", &[])
        .await
        .unwrap()
        .iter()
        .map(|o| o.offset)
        .sum();
    assert_eq!(committed, 10, "{stderr}");
}

/// `runnel_fetch_requests_total` of topic `t` on the node whose metrics
/// endpoint is `addr`.
fn fetch_requests_of_t(addr: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with("runnel_fetch_requests_total{") && l.contains("topic=\"t\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// While a cooperative member's background rejoin waits (here for a
/// member that stopped polling, up to its rebalance timeout), its polls
/// long-poll as usual and stop when the answer comes. They used to fetch
/// with a 10 ms wait: some hundred fetches a second per partition for as
/// long as the rebalance lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t26_a_background_rejoin_does_not_spin_fetches() {
    let base = tempfile::tempdir().unwrap();
    let (cluster, client) = one_node_with_topic_t(base.path()).await;
    let metrics = cluster.metrics_addr(1);
    let mut cfg = config("spin", "t");
    cfg.rebalance_timeout_ms = 8_000;
    cfg.session_timeout_ms = 10_000;
    let mut a = client.group_consumer(cfg.clone()).unwrap();
    let deadline = Instant::now() + WAIT;
    while a.assignment().is_empty() {
        assert!(Instant::now() < deadline, "a never assigned");
        a.poll().await.unwrap();
    }
    // C joins, takes its share, and stops polling (its heartbeats go on).
    let mut c = client.group_consumer(cfg.clone()).unwrap();
    while c.assignment().is_empty() || a.rebalancing() {
        assert!(Instant::now() < deadline, "c never assigned");
        tokio::select! {
            r = c.poll() => { r.unwrap(); }
            r = a.poll() => { r.unwrap(); }
        }
    }
    // B joins: the rebalance waits for C up to its rebalance timeout,
    // and A's rejoin waits in the background meanwhile.
    let b_client = client.clone();
    let b_cfg = cfg.clone();
    let b = tokio::spawn(async move {
        let mut b = b_client.group_consumer(b_cfg).unwrap();
        loop {
            b.poll().await.unwrap();
        }
    });
    while !a.rejoining_in_background() {
        assert!(
            Instant::now() < deadline,
            "a never rejoined in the background"
        );
        a.poll().await.unwrap();
    }
    let before = fetch_requests_of_t(&metrics);
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(2) && a.rejoining_in_background() {
        a.poll().await.unwrap();
    }
    let fetches = fetch_requests_of_t(&metrics) - before;
    let spent = window.elapsed();
    b.abort();
    drop(c);
    // Idle partitions long-polled (500 ms by default): a few fetches each;
    // a 10 ms wait made it hundreds.
    assert!(
        fetches < 100.0,
        "{fetches} fetches in {spent:?} of background rejoin, {} partitions",
        a.assignment().len()
    );
    assert!(
        spent >= Duration::from_millis(500),
        "the rejoin ended early: {spent:?}"
    );
}

/// A static member whose application stops polling stops heartbeating
/// (KIP-345: its session runs out, and a restart within it would keep
/// the assignment); its partitions move to a member that reads. Its next
/// poll drops them before anything else: it used to rejoin in the
/// background and read on the partitions now the reader's, two owners
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t27_a_static_member_back_from_a_stall_reads_nothing_it_lost() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    let mut cfg = config("g-static-stuck", "t");
    cfg.max_poll_interval = Duration::from_secs(2);
    let mut stuck_cfg = cfg.clone();
    stuck_cfg.group_instance_id = "stuck-1".into();
    let mut stuck = client.group_consumer(stuck_cfg).unwrap();
    let reader = Member::spawn(&client, cfg);
    let deadline = std::time::Instant::now() + WAIT;
    while !(stuck.assignment().len() == 3 && reader.snapshot().2.len() == 3) {
        assert!(std::time::Instant::now() < deadline, "never balanced");
        stuck.poll().await.unwrap();
    }
    // Stuck past max_poll_interval, then past its session: the reader
    // takes all six.
    eventually("the reader holding all six", WAIT, || async {
        (reader.snapshot().2.len() == 6).then_some(())
    })
    .await;
    stuck.poll().await.unwrap();
    let mine: BTreeSet<(String, i32)> = stuck.assignment().into_iter().collect();
    let theirs: BTreeSet<(String, i32)> = reader.snapshot().2.into_iter().collect();
    assert!(
        mine.is_disjoint(&theirs),
        "both own {:?}",
        mine.intersection(&theirs).collect::<Vec<_>>()
    );
    stuck.close().await.unwrap();
    reader.close().await;
}

/// A member reading two topics commits the one left when the other is
/// deleted: the coordinator refuses a whole commit naming a deleted
/// topic, and every commit failed until a rebalance took its partitions
/// away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t28_a_deleted_topic_does_not_fail_the_commits_of_the_others() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    client
        .create_topic("doomed", 1, 1, Default::default())
        .await
        .unwrap();
    for p in 0..6 {
        produce_to(&client, "t", p, 5).await;
    }
    produce_to(&client, "doomed", 0, 5).await;
    let mut cfg = GroupConfig::new("g-two", &["t", "doomed"]);
    cfg.auto_commit_interval = None;
    let mut member = client.group_consumer(cfg).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut read = 0;
    while read < 35 {
        assert!(Instant::now() < deadline, "read {read} of 35");
        read += member.poll().await.unwrap().len();
    }
    client.delete_topic("doomed").await.unwrap();
    for p in 0..6 {
        produce_to(&client, "t", p, 5).await;
    }
    while read < 65 {
        assert!(Instant::now() < deadline, "read {read} of 65");
        read += member.poll().await.unwrap().len();
    }
    member.commit().await.unwrap();
    let committed: i64 = client
        .fetch_offsets("g-two", &[])
        .await
        .unwrap()
        .iter()
        .filter(|o| o.topic == "t")
        .map(|o| o.offset)
        .sum();
    assert_eq!(committed, 60);
}

/// A group whose record (its members and their topics) is larger than
/// the offsets topic takes: its joins are refused with RECORD_TOO_LARGE,
/// and its members' sessions expire as usual. The record used to be
/// retried forever: every join waited until its deadline, round after
/// round, and no member ever expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t29_a_group_too_large_to_store_refuses_its_joins() {
    const MEMBERS: usize = 69;
    let base = tempfile::tempdir().unwrap();
    let (cluster, groups) = one_node_raw_groups(base.path()).await;
    // 1,000 topics of 249 characters (the most a member may name; they
    // need not exist): about 250 kB per member, so that 69 members make
    // a record over the offsets topic's 16 MiB.
    let topics: Vec<String> = (0..1000).map(|i| format!("{i:0>249}")).collect();
    let join = pb::JoinGroupRequest {
        group: "huge".into(),
        topics,
        session_timeout_ms: 6_000,
        rebalance_timeout_ms: 2_000,
        client_id: "raw".into(),
        ..Default::default()
    };
    // A small member first, once the group's coordinator has loaded its
    // partition: it forms a generation alone. The big ones, all at once,
    // form the next once it has not rejoined within its rebalance
    // timeout.
    eventually("a first member", WAIT, || {
        let (mut groups, join) = (groups.clone(), join.clone());
        async move {
            let small = pb::JoinGroupRequest {
                topics: vec!["t".into()],
                ..join
            };
            groups.join_group(small).await.ok()
        }
    })
    .await;
    let joins: Vec<_> = (0..MEMBERS)
        .map(|_| {
            let (groups, join) = (groups.clone(), join.clone());
            tokio::spawn(async move {
                groups
                    .max_decoding_message_size(64 << 20)
                    .join_group(join)
                    .await
            })
        })
        .collect();
    let mut refused = Vec::new();
    for j in joins {
        if let Err(status) = j.await.unwrap() {
            refused.push(status);
        }
    }
    assert!(!refused.is_empty(), "every join was answered");
    for status in &refused {
        assert_eq!(error_code(status), "RECORD_TOO_LARGE", "{status:?}");
        assert!(status.message().contains("too large"), "{status:?}");
    }
    // Nobody heartbeats: the members expire, and the group empties.
    let client = runnel::client::Client::connect(&cluster.addrs[0])
        .await
        .unwrap();
    eventually("the members expired", WAIT, || async {
        // Empty, it is forgotten: an unknown group.
        let gone = match client.describe_group("huge").await {
            Ok(d) => d.members.is_empty(),
            Err(e) => e.code() == pb::ErrorCode::UnknownGroup,
        };
        gone.then_some(())
    })
    .await;
}

/// An offsets partition is compacted once it holds more records than
/// `offsets_compaction_records`: its log start moves up, and a new
/// coordinator replaying what is left serves the newest commits, the
/// membership of a group with a member, and nothing of a deleted group.
/// Before compaction, the partition kept every commit ever made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_an_offsets_partition_is_compacted_and_replays_the_same() {
    use runnel::group::coordinator::partition_for_group;
    let base = tempfile::tempdir().unwrap();
    let (mut cluster, client) = three_brokers(
        base.path(),
        "replica_lag_time_max_ms = 10000\noffsets_compaction_records = 40",
    )
    .await;
    client
        .create_topic("t", 4, 3, Default::default())
        .await
        .unwrap();
    // Three groups on one offsets partition: "g" commits standalone, "m"
    // has a member, "d" is deleted.
    let index = partition_for_group("g", 16);
    let same = |prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|g| partition_for_group(g, 16) == index)
            .unwrap()
    };
    let (m, d) = (same("m"), same("d"));
    let member = Member::spawn(&client, config(&m, "t"));
    eventually("the member assigned every partition", WAIT, || async {
        (member.snapshot().2.len() == 4).then_some(())
    })
    .await;
    let commit = |group: String, partition: i32, offset: i64| {
        let client = &client;
        async move {
            let o = pb::PartitionOffset {
                topic: "t".into(),
                partition,
                offset,
                metadata: format!("at {offset}"),
                ..Default::default()
            };
            eventually("a commit", WAIT, || async {
                client
                    .commit_offsets(&group, "", 0, vec![o.clone()])
                    .await
                    .ok()
            })
            .await;
        }
    };
    for i in 0..10 {
        commit(d.clone(), i % 4, i.into()).await;
    }
    client.delete_group(&d).await.unwrap();
    for i in 0..200 {
        commit("g".into(), i % 4, i.into()).await;
    }
    let start = eventually("the offsets partition compacted", WAIT, || async {
        let r = client
            .list_offsets("__consumer_offsets", index, pb::OffsetSpec::Earliest, 0)
            .await
            .ok()?;
        (r.offset > 0).then_some(r.offset)
    })
    .await;
    // The end is past the start by less than a compaction's threshold,
    // plus what was committed while it ran.
    let end = client
        .list_offsets("__consumer_offsets", index, pb::OffsetSpec::Latest, 0)
        .await
        .unwrap()
        .offset;
    assert!(end - start < 200, "start {start}, end {end}");
    // A commit after it is kept too.
    commit("g".into(), 0, 1000).await;
    let expected = |o: i64| pb::PartitionOffset {
        topic: "t".into(),
        partition: (o % 4) as i32,
        offset: o,
        metadata: format!("at {o}"),
        ..Default::default()
    };
    let want = vec![expected(1000), expected(197), expected(198), expected(199)];
    let before = client.describe_group(&m).await.unwrap();
    assert_eq!((before.state.as_str(), before.members.len()), ("Stable", 1));

    let old = client.find_coordinator("g").await.unwrap().broker_id;
    cluster.kill(old);
    let survivor = cluster.addrs[(old % 3) as usize].clone();
    let client = Client::connect(&survivor).await.unwrap();
    let got = eventually("a new coordinator serving the offsets", WAIT, || async {
        let c = client.find_coordinator("g").await.ok()?;
        if c.broker_id == old {
            return None;
        }
        client.fetch_offsets("g", &[]).await.ok()
    })
    .await;
    let strip = |v: Vec<pb::PartitionOffset>| -> Vec<(i32, i64, String)> {
        let mut v: Vec<_> = v
            .into_iter()
            .map(|o| (o.partition, o.offset, o.metadata))
            .collect();
        v.sort();
        v
    };
    assert_eq!(strip(got), strip(want));
    assert!(client.fetch_offsets(&d, &[]).await.unwrap().is_empty());
    let after = client.describe_group(&m).await.unwrap();
    assert_eq!(
        (after.state, after.generation_id, after.members.len()),
        (before.state, before.generation_id, 1)
    );
    member.close().await;
}

/// The committed offsets of a group without members expire
/// `offsets_retention_ms` after their commit (or after the group emptied),
/// as in Kafka: the group is forgotten, and stays so after a restart (its
/// tombstones are stored). A group with a member keeps its offsets, and
/// so does a group committed to lately. Before, a group used once kept
/// its offsets for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_offsets_of_a_group_without_members_expire() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(1, base.path(), "offsets_retention_ms = 3000", "");
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("t", 2, 1, Default::default())
        .await
        .unwrap();
    let offset = |partition: i32, offset: i64| pb::PartitionOffset {
        topic: "t".into(),
        partition,
        offset,
        ..Default::default()
    };
    eventually("a commit", WAIT, || async {
        client
            .commit_offsets("old", "", 0, vec![offset(0, 5), offset(1, 6)])
            .await
            .ok()
    })
    .await;
    let old_committed = std::time::Instant::now();
    // "live" commits now, then gains a member that commits nothing: its
    // offsets grow as old as the old group's, and stay.
    client
        .commit_offsets("live", "", 0, vec![offset(0, 7)])
        .await
        .unwrap();
    let mut quiet = config("live", "t");
    quiet.auto_commit_interval = None;
    let member = Member::spawn(&client, quiet);
    eventually("the member assigned", WAIT, || async {
        (member.snapshot().2.len() == 2).then_some(())
    })
    .await;
    client
        .commit_offsets("fresh", "", 0, vec![offset(0, 1)])
        .await
        .unwrap();
    eventually("the old group's offsets expired", WAIT, || async {
        client
            .fetch_offsets("old", &[])
            .await
            .ok()?
            .is_empty()
            .then_some(())
    })
    .await;
    // Not before their retention (less the commit's answer's way back).
    assert!(
        old_committed.elapsed() >= Duration::from_millis(2_500),
        "expired {:?} after the commit",
        old_committed.elapsed()
    );
    // A group without members committed to each second keeps its offset
    // past its first commit's retention (for longer than a scan's 5 s
    // after it): each commit counts anew. Looked at before each commit,
    // so that one deleted in between is seen.
    client
        .commit_offsets("fresh", "", 0, vec![offset(0, 10)])
        .await
        .unwrap();
    for i in 0..9 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let kept = client.fetch_offsets("fresh", &[]).await.unwrap();
        assert_eq!(
            kept.iter().map(|o| o.offset).collect::<Vec<_>>(),
            vec![10 + i],
            "second {i}"
        );
        client
            .commit_offsets("fresh", "", 0, vec![offset(0, 11 + i)])
            .await
            .unwrap();
    }
    let gone = client.describe_group("old").await.map(|d| d.members.len());
    assert!(
        matches!(&gone, Err(e) if e.code() == pb::ErrorCode::UnknownGroup),
        "{gone:?}"
    );
    // The group with a member keeps its offset, committed longer ago
    // than the retention.
    let d = client.describe_group("live").await.unwrap();
    assert_eq!(d.members.len(), 1);
    let live = client.fetch_offsets("live", &[]).await.unwrap();
    assert_eq!(live.iter().map(|o| o.offset).collect::<Vec<_>>(), vec![7]);
    member.close().await;

    // Stored: a restart does not bring the old group's offsets back.
    cluster.kill(1);
    cluster.restart(1);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let old = eventually("the coordinator back", WAIT, || async {
        client.fetch_offsets("old", &[]).await.ok()
    })
    .await;
    assert!(old.is_empty(), "{old:?}");
}

/// A group forgotten once it has nothing left (its members gone, no
/// offset committed) has its record deleted from the offsets topic too:
/// compaction kept one such record per group id ever used, for every
/// replay to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t32_a_forgotten_groups_record_is_deleted() {
    use runnel::group::coordinator::partition_for_group;
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    let mut cfg = config("brief", "t");
    cfg.auto_commit_interval = None;
    let member = Member::spawn(&client, cfg);
    eventually("the member assigned", WAIT, || async {
        (member.snapshot().2.len() == 6).then_some(())
    })
    .await;
    member.close().await;
    let index = partition_for_group("brief", 16);
    // The last record of the group's key, once it is a tombstone.
    let key = b"group\0brief".to_vec();
    eventually("the group's record deleted", WAIT, || async {
        let end = client
            .list_offsets("__consumer_offsets", index, pb::OffsetSpec::Latest, 0)
            .await
            .ok()?
            .offset;
        let mut offset = 0;
        let mut last = None;
        while offset < end {
            let r = client
                .fetch(pb::FetchRequest {
                    topic: "__consumer_offsets".into(),
                    partition: index,
                    offset,
                    max_bytes: 1 << 20,
                    ..Default::default()
                })
                .await
                .ok()?;
            for rec in &r.records {
                if rec.key.as_deref() == Some(&key[..]) {
                    last = Some(rec.value.is_none());
                }
            }
            offset = r.next_offset.max(offset + 1);
        }
        (last == Some(true)).then_some(())
    })
    .await;
}

/// A poll returns at most `max_poll_records` records (Kafka's
/// `max.poll.records`), and a commit covers only the records polls
/// returned: the rest of the partitions' answers wait, decoded, for the
/// next polls. A partition consumer's `max_records` does the same for
/// one partition, and a seek drops what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t33_a_poll_returns_at_most_max_poll_records() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    const N: usize = 3_000;
    produce(&client, "t", 0, N).await;
    let mut cfg = config("g-max-poll", "t");
    cfg.auto_commit_interval = None;
    cfg.max_poll_records = 200;
    let mut member = client.group_consumer(cfg).unwrap();
    let tps: Vec<Tp> = (0..6).map(|p| ("t".to_string(), p)).collect();
    let mut seen = BTreeSet::new();
    let mut returned = 0;
    let mut committed_once = false;
    let deadline = Instant::now() + WAIT;
    while seen.len() < N {
        assert!(Instant::now() < deadline, "only {} of {N} read", seen.len());
        let records = member.poll().await.unwrap();
        assert!(records.len() <= 200, "a poll returned {}", records.len());
        returned += records.len();
        for r in records {
            let value = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
            assert!(seen.insert(value), "read twice");
        }
        if returned > 0 && !committed_once {
            // Each partition's answer held all of its ~500 records: the
            // commit covers the 200 or fewer returned, not those.
            member.commit().await.unwrap();
            let offsets = client.fetch_offsets("g-max-poll", &tps).await.unwrap();
            let total: i64 = offsets.iter().map(|o| o.offset.max(0)).sum();
            assert_eq!(total, returned as i64, "committed past what polls returned");
            committed_once = true;
        }
    }
    assert_eq!(returned, N);
    member.commit().await.unwrap();
    await_committed_at_end(&client, "g-max-poll", "t", 6).await;
    member.close().await.unwrap();

    let refused = client.group_consumer(GroupConfig {
        max_poll_records: 0,
        ..config("g-zero", "t")
    });
    assert!(refused.is_err(), "max_poll_records 0 was accepted");

    let mut pc = client
        .partition_consumer("t", 0, runnel::client::StartFrom::Earliest)
        .await
        .unwrap();
    pc.max_records = 100;
    let first = pc.poll().await.unwrap();
    assert_eq!(first.len(), 100);
    assert_eq!(pc.position(), first[99].offset + 1);
    let second = pc.poll().await.unwrap();
    assert_eq!(second.first().map(|r| r.offset), Some(100));
    pc.seek(7);
    let again = pc.poll().await.unwrap();
    assert_eq!(again.first().map(|r| r.offset), Some(7));
}

/// With more records than `max_poll_records` ready, the partitions take
/// turns at the front of a poll: with every partition's records in hand
/// (ready at once on every poll), the first partition in order came
/// first every time, and the others' records went back every time until
/// its backlog was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t34_a_backlog_does_not_starve_the_other_partitions() {
    let base = tempfile::tempdir().unwrap();
    let (_cluster, client) = one_node_with_topic_t(base.path()).await;
    // A backlog far longer to read than the others' first fetches take
    // to arrive (about a millisecond), so that they are in hand while it
    // lasts.
    produce_to(&client, "t", 0, 30_000).await;
    for p in 1..6 {
        produce_to(&client, "t", p, 1_000).await;
    }
    let mut cfg = config("g-turns", "t");
    cfg.auto_commit_interval = None;
    cfg.max_poll_records = 100;
    let mut member = client.group_consumer(cfg).unwrap();
    let (mut backlog, mut others) = (0, 0);
    let deadline = Instant::now() + WAIT;
    while others < 5_000 {
        assert!(
            Instant::now() < deadline,
            "{others} of the others' records read"
        );
        for r in member.poll().await.unwrap() {
            if r.partition == 0 {
                backlog += 1;
            } else {
                others += 1;
            }
        }
    }
    // Taking turns, the others were read long before the backlog was.
    assert!(
        backlog <= 20_000,
        "{backlog} of the backlog read before the others' 5,000"
    );
    member.close().await.unwrap();
}
