//! In-process clusters of `RaftMetadataStore`s on 127.0.0.1, each serving its
//! Raft and BrokerLifecycle services over real tonic: election, forwarding,
//! failover, restart from sled, fencing, learners and cluster-id checks.
//!
//! Where it sits on the data path: the controller at the bottom of the
//! control plane; no broker or record bytes involved.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runnel_controller::raft::spawn_heartbeat;
use runnel_controller::{
    ClusterMetadata, MetadataCommand, MetadataError, MetadataStore, RaftConfig, RaftMetadataStore,
};
use runnel_proto::v1::internal::broker_lifecycle_client::BrokerLifecycleClient;
use runnel_proto::v1::internal::AlterPartitionRequest;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

/// Generous bound for anything a healthy cluster does in well under a
/// second; only a failing test waits this long.
const WAIT: Duration = Duration::from_secs(15);

struct Node {
    id: i32,
    addr: String,
    dir: PathBuf,
    store: Arc<RaftMetadataStore>,
    stop: CancellationToken,
    server: JoinHandle<()>,
}

fn config(id: i32, addr: &str, voters: &BTreeMap<i32, String>, dir: &Path) -> RaftConfig {
    RaftConfig {
        node_id: id,
        raft_addr: addr.to_string(),
        voters: voters.clone(),
        is_voter: voters.contains_key(&id),
        dir: dir.to_path_buf(),
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        heartbeat_interval_ms: 50,
        broker_session_timeout_ms: 1000,
        broker_heartbeat_interval_ms: 100,
        cluster_id: None,
        snapshot_logs_since_last: 5000,
        submit_timeout_ms: 10_000,
        rack: String::new(),
        ..RaftConfig::default()
    }
}

async fn serve(listener: TcpListener, config: RaftConfig) -> Node {
    let id = config.node_id;
    let addr = config.raft_addr.clone();
    let dir = config.dir.clone();
    let store = RaftMetadataStore::start(config).await.unwrap();
    let stop = CancellationToken::new();
    let router = Server::builder()
        .add_service(store.raft_service())
        .add_service(store.lifecycle_service());
    let signal = stop.clone().cancelled_owned();
    let server = tokio::spawn(async move {
        let _ = router
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), signal)
            .await;
    });
    Node {
        id,
        addr,
        dir,
        store,
        stop,
        server,
    }
}

impl Node {
    /// Stops the store and its server; returns what a restart needs.
    async fn kill(self) -> (i32, String, PathBuf) {
        self.store.shutdown().await;
        self.stop.cancel();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
            let _ = server.await;
        }
        (self.id, self.addr, self.dir)
    }
}

/// Starts voters `1..=n` (plus `learners`, broker-only) in `root`.
async fn cluster(root: &Path, n: i32, learners: &[i32]) -> (BTreeMap<i32, String>, Vec<Node>) {
    cluster_with(root, n, learners, |_| {}).await
}

/// [`cluster`] with each node's config changed by `tweak`.
async fn cluster_with(
    root: &Path,
    n: i32,
    learners: &[i32],
    tweak: impl Fn(&mut RaftConfig),
) -> (BTreeMap<i32, String>, Vec<Node>) {
    let mut listeners = Vec::new();
    for id in (1..=n).chain(learners.iter().copied()) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listeners.push((id, l.local_addr().unwrap().to_string(), l));
    }
    let voters: BTreeMap<i32, String> = listeners
        .iter()
        .filter(|(id, _, _)| *id <= n)
        .map(|(id, addr, _)| (*id, addr.clone()))
        .collect();
    let mut nodes = Vec::new();
    for (id, addr, l) in listeners {
        let dir = root.join(format!("node-{id}"));
        let mut c = config(id, &addr, &voters, &dir);
        tweak(&mut c);
        nodes.push(serve(l, c).await);
    }
    (voters, nodes)
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits until `store`'s published state satisfies `pred`.
async fn wait_state(
    store: &RaftMetadataStore,
    what: &str,
    pred: impl Fn(&ClusterMetadata) -> bool,
) -> Arc<ClusterMetadata> {
    let mut rx = store.watch();
    within(what, async {
        rx.wait_for(|s| pred(s)).await.unwrap().clone()
    })
    .await
}

/// Waits until every node names the same live leader; returns it.
async fn wait_leader(nodes: &[&Node]) -> i32 {
    within("a leader all nodes agree on", async {
        loop {
            let ids: Vec<i32> = nodes.iter().map(|n| n.store.controller_id()).collect();
            if ids[0] != -1
                && ids.iter().all(|id| *id == ids[0])
                && nodes.iter().any(|n| n.id == ids[0])
            {
                return ids[0];
            }
            // Metrics change on every election; wait on them, not a timer.
            let mut rx = nodes[0].store.raft().metrics();
            let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
        }
    })
    .await
}

/// Waits until all nodes have applied the same state as `reference`.
async fn wait_converged(nodes: &[&Node]) -> Arc<ClusterMetadata> {
    let applied = nodes
        .iter()
        .map(|n| n.store.current().applied)
        .max()
        .unwrap();
    let first = wait_state(&nodes[0].store, "convergence", |s| s.applied >= applied).await;
    for n in &nodes[1..] {
        let s = wait_state(&n.store, "convergence", |s| s.applied >= first.applied).await;
        assert_eq!(*s, *first, "node {} diverged", n.id);
    }
    first
}

fn register(id: i32, addr: &str) -> MetadataCommand {
    MetadataCommand::RegisterBroker {
        id,
        address: addr.to_string(),
        rack: String::new(),
        roles: vec!["broker".into()],
        incarnation: String::new(),
    }
}

fn create(name: &str, partitions: i32, rf: i32) -> MetadataCommand {
    MetadataCommand::CreateTopic {
        name: name.into(),
        topic_id: format!("id-{name}"),
        partitions,
        replication_factor: rf,
        configs: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_leader_elected_and_follower_submits_are_forwarded() {
    let root = tempfile::tempdir().unwrap();
    let (_, nodes) = cluster(root.path(), 3, &[]).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = wait_leader(&all).await;
    let cluster_id = nodes[0].store.wait_for_cluster_id(WAIT).await.unwrap();
    assert_eq!(cluster_id.len(), 32);

    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    for n in &nodes {
        follower
            .store
            .submit(register(n.id, &n.addr))
            .await
            .unwrap();
    }
    follower.store.submit(create("events", 3, 2)).await.unwrap();
    // Read your writes: the submitting follower already shows the topic.
    assert_eq!(
        follower.store.current().topics["events"].partitions.len(),
        3
    );
    let err = follower
        .store
        .submit(MetadataCommand::DeleteTopic {
            name: "nope".into(),
            topic_id: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::UnknownTopic { ref name } if name == "nope"),
        "{err}"
    );
    let err = follower
        .store
        .submit(create("bad name", 1, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::InvalidTopicName { .. }),
        "{err}"
    );

    let state = wait_converged(&all).await;
    assert_eq!(state.cluster_id, cluster_id);
    assert_eq!(state.brokers.len(), 3);
    assert_eq!(state.topics["events"].partitions[1].replicas, vec![2, 3]);
    for n in &nodes {
        let recorded = std::fs::read_to_string(n.dir.join("cluster_id")).unwrap();
        assert_eq!(recorded, cluster_id);
    }
    for n in nodes {
        n.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_failover_then_restart_catches_up_from_sled() {
    let root = tempfile::tempdir().unwrap();
    // No broker heartbeats here: sessions long enough that no fencing
    // changes the state while it is compared.
    let long_sessions = |c: &mut RaftConfig| c.broker_session_timeout_ms = 600_000;
    let (voters, mut nodes) = cluster_with(root.path(), 3, &[], long_sessions).await;
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let cluster_id = nodes[0].store.wait_for_cluster_id(WAIT).await.unwrap();
    for id in 1..=3 {
        nodes[0]
            .store
            .submit(register(id, &voters[&id]))
            .await
            .unwrap();
    }
    nodes[0].store.submit(create("before", 1, 3)).await.unwrap();

    let pos = nodes.iter().position(|n| n.id == leader).unwrap();
    let (old_id, old_addr, old_dir) = nodes.remove(pos).kill().await;
    let survivors: Vec<&Node> = nodes.iter().collect();
    let new_leader = wait_leader(&survivors).await;
    assert_ne!(new_leader, old_id);
    // Two of three still commit, submitted from either survivor.
    for (i, n) in nodes.iter().enumerate() {
        n.store
            .submit(create(&format!("after-{i}"), 1, 2))
            .await
            .unwrap();
    }
    let expected = wait_converged(&survivors).await;
    assert_eq!(expected.topics.len(), 3);

    let listener = TcpListener::bind(&old_addr).await.unwrap();
    let mut c = config(old_id, &old_addr, &voters, &old_dir);
    long_sessions(&mut c);
    let restarted = serve(listener, c).await;
    let state = wait_state(&restarted.store, "the restarted node to catch up", |s| {
        s.applied >= expected.applied
    })
    .await;
    assert_eq!(*state, *expected);
    assert_eq!(state.cluster_id, cluster_id);
    nodes.push(restarted);
    let all: Vec<&Node> = nodes.iter().collect();
    wait_leader(&all).await;
    nodes[2]
        .store
        .submit(create("rejoined", 1, 3))
        .await
        .unwrap();
    wait_converged(&all).await;
    for n in nodes {
        n.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_late_learner_gets_a_snapshot_of_the_purged_log() {
    let root = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    for id in 1..=4 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listeners.push((id, l.local_addr().unwrap().to_string(), l));
    }
    let voters: BTreeMap<i32, String> = listeners
        .iter()
        .filter(|(id, _, _)| *id <= 3)
        .map(|(id, a, _)| (*id, a.clone()))
        .collect();
    let (_, learner_addr, learner_listener) = listeners.pop().unwrap();
    let small_snapshots = |id: i32, addr: &str| {
        let mut c = config(id, addr, &voters, &root.path().join(format!("n{id}")));
        c.snapshot_logs_since_last = 4;
        c
    };
    let mut nodes = Vec::new();
    for (id, addr, l) in listeners {
        nodes.push(serve(l, small_snapshots(id, &addr)).await);
    }
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let cluster_id = nodes[0].store.wait_for_cluster_id(WAIT).await.unwrap();
    // Filler commands (InitCluster with the same id is a counted no-op).
    for _ in 0..12 {
        let cmd = MetadataCommand::InitCluster {
            cluster_id: cluster_id.clone(),
        };
        nodes[0].store.submit(cmd).await.unwrap();
    }
    let expected = wait_converged(&nodes.iter().collect::<Vec<_>>()).await;
    let leader = nodes.iter().find(|n| n.id == leader).unwrap();
    let mut metrics = leader.store.raft().metrics();
    within(
        "the leader to purge its log",
        metrics.wait_for(|m| m.purged.is_some()),
    )
    .await
    .unwrap();

    // Node 4 starts with an empty log that the leader can no longer send
    // entry by entry: it must install a snapshot.
    let learner = serve(learner_listener, small_snapshots(4, &learner_addr)).await;
    let cancel = CancellationToken::new();
    spawn_heartbeat(
        learner.store.clone(),
        4,
        learner_addr,
        Duration::from_millis(100),
        cancel.clone(),
    );
    let state = wait_state(&learner.store, "the learner to catch up", |s| {
        s.applied > expected.applied && s.brokers.contains_key(&4)
    })
    .await;
    assert_eq!(state.cluster_id, cluster_id);
    // Raft metrics trail the published state a little: wait on them.
    let mut metrics = learner.store.raft().metrics();
    let installed = within(
        "the learner's snapshot metrics",
        metrics.wait_for(|m| m.snapshot.is_some()),
    )
    .await
    .unwrap()
    .snapshot;
    assert!(installed.unwrap().index >= 4, "{installed:?}");
    nodes.push(learner);
    wait_converged(&nodes.iter().collect::<Vec<_>>()).await;
    cancel.cancel();
    for n in nodes {
        n.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_silent_broker_is_fenced_and_reregistering_unfences() {
    let root = tempfile::tempdir().unwrap();
    let (_, nodes) = cluster(root.path(), 3, &[]).await;
    let all: Vec<&Node> = nodes.iter().collect();
    wait_leader(&all).await;
    let interval = Duration::from_millis(100);
    let mut beats = Vec::new();
    for n in &nodes {
        let cancel = CancellationToken::new();
        spawn_heartbeat(
            n.store.clone(),
            n.id,
            n.addr.clone(),
            interval,
            cancel.clone(),
        );
        beats.push(cancel);
    }
    wait_state(&nodes[0].store, "three live brokers", |s| {
        s.live_brokers() == [1, 2, 3]
    })
    .await;
    nodes[0].store.submit(create("f", 3, 3)).await.unwrap();
    let before = nodes[0].store.current();
    let epoch3 = before.brokers[&3].epoch;
    assert_eq!(before.topics["f"].partitions[2].leader, 3);

    // Broker 3 goes silent; its Raft node stays up.
    beats[2].cancel();
    for n in &nodes {
        // Other nodes may not have applied everything yet: look up.
        let s = wait_state(&n.store, "broker 3 fenced", |s| {
            s.brokers.get(&3).is_some_and(|b| b.fenced)
        })
        .await;
        let p2 = &s.topics["f"].partitions[2];
        assert_ne!(p2.leader, 3);
        assert_eq!(p2.leader_epoch, 1);
        assert!(!p2.isr.contains(&3), "{p2:?}");
        assert!(
            !s.brokers[&1].fenced && !s.brokers[&2].fenced,
            "live brokers fenced"
        );
    }

    // It comes back: registering again unfences it with a new epoch.
    let cancel = CancellationToken::new();
    spawn_heartbeat(
        nodes[2].store.clone(),
        3,
        nodes[2].addr.clone(),
        interval,
        cancel.clone(),
    );
    for n in &nodes {
        let s = wait_state(&n.store, "broker 3 unfenced", |s| {
            s.brokers.get(&3).is_some_and(|b| !b.fenced)
        })
        .await;
        assert!(s.brokers[&3].epoch > epoch3);
    }

    // The partition's leader takes broker 3 back into the ISR through
    // AlterPartition (any node forwards to the controller); stale broker
    // or partition epochs are refused and change nothing.
    let now = nodes[0].store.current();
    let p2 = now.topics["f"].partitions[2].clone();
    let leader_epoch_broker = now.brokers[&p2.leader].epoch;
    let mut client = BrokerLifecycleClient::connect(format!("http://{}", nodes[2].addr))
        .await
        .unwrap();
    let request = |broker_epoch: i64, partition_epoch: i32| AlterPartitionRequest {
        broker_id: p2.leader,
        broker_epoch,
        topic: "f".into(),
        partition: 2,
        leader_epoch: p2.leader_epoch,
        partition_epoch,
        new_isr: vec![1, 2, 3],
        topic_id: String::new(),
    };
    let stale_broker = client
        .alter_partition(request(leader_epoch_broker - 1, p2.partition_epoch))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(stale_broker.error_code, 0);
    assert!(
        stale_broker.error_message.contains("stale"),
        "{stale_broker:?}"
    );
    let stale_partition = client
        .alter_partition(request(leader_epoch_broker, p2.partition_epoch - 1))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(stale_partition.error_code, 0);
    assert!(
        stale_partition.error_message.contains("partition epoch"),
        "{stale_partition:?}"
    );
    assert_eq!(stale_partition.isr, p2.isr);
    let applied = client
        .alter_partition(request(leader_epoch_broker, p2.partition_epoch))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.error_code, 0, "{applied:?}");
    assert_eq!(applied.isr, vec![1, 2, 3]);
    assert_eq!(applied.partition_epoch, p2.partition_epoch + 1);
    cancel.cancel();
    for b in beats {
        b.cancel();
    }
    for n in nodes {
        n.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_broker_only_node_joins_as_learner() {
    let root = tempfile::tempdir().unwrap();
    let (_, nodes) = cluster(root.path(), 3, &[4]).await;
    let voters: Vec<&Node> = nodes.iter().filter(|n| n.id <= 3).collect();
    wait_leader(&voters).await;
    let learner = nodes.iter().find(|n| n.id == 4).unwrap();
    let cancel = CancellationToken::new();
    spawn_heartbeat(
        learner.store.clone(),
        4,
        learner.addr.clone(),
        Duration::from_millis(100),
        cancel.clone(),
    );
    let state = wait_state(&learner.store, "the learner to receive the log", |s| {
        s.brokers.contains_key(&4) && !s.cluster_id.is_empty()
    })
    .await;
    assert_eq!(state.brokers[&4].roles, vec!["broker".to_string()]);
    let members = voters[0]
        .store
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .clone();
    assert!(members.membership().learner_ids().any(|id| id == 4));
    assert!(!members.membership().voter_ids().any(|id| id == 4));
    // A learner's submit is forwarded too.
    learner
        .store
        .submit(create("from-learner", 1, 1))
        .await
        .unwrap();
    wait_converged(&nodes.iter().collect::<Vec<_>>()).await;
    assert_eq!(
        learner.store.controller_id(),
        voters[0].store.controller_id()
    );
    cancel.cancel();
    for n in nodes {
        n.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t06_data_dir_of_another_cluster_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let (voters, nodes) = cluster(root.path(), 1, &[]).await;
    let cluster_id = nodes[0].store.wait_for_cluster_id(WAIT).await.unwrap();
    let (id, addr, dir) = nodes.into_iter().next().unwrap().kill().await;

    let mut c = config(id, &addr, &voters, &dir);
    c.cluster_id = Some("another-cluster".into());
    let err = RaftMetadataStore::start(c).await.unwrap_err();
    assert!(
        matches!(&err, MetadataError::ClusterIdMismatch { expected, found }
            if expected == "another-cluster" && *found == cluster_id),
        "{err}"
    );
    // The right id (or none) still opens it, with its state.
    let mut c = config(id, &addr, &voters, &dir);
    c.cluster_id = Some(cluster_id.clone());
    let node = serve(TcpListener::bind(&addr).await.unwrap(), c).await;
    assert_eq!(node.store.current().cluster_id, cluster_id);
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t07_submit_without_quorum_times_out_with_not_controller() {
    let root = tempfile::tempdir().unwrap();
    // Voter 2 never starts: node 1 alone cannot elect itself.
    let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let voters = BTreeMap::from([
        (1, l1.local_addr().unwrap().to_string()),
        (2, l2.local_addr().unwrap().to_string()),
    ]);
    drop(l2);
    let mut c = config(1, &voters[&1], &voters, &root.path().join("n1"));
    c.submit_timeout_ms = 700;
    let node = serve(l1, c).await;
    let err = node.store.submit(register(1, "x")).await.unwrap_err();
    assert!(matches!(err, MetadataError::NotController { .. }), "{err}");
    assert_eq!(node.store.controller_id(), -1);
    node.kill().await;
}

/// A dead controller's own broker is fenced one session after the
/// successor last heard from it (its last AppendEntries), not a full
/// session after the successor took over, which is what it was when every
/// clock restarted at the takeover (so at least `election_timeout_min +
/// session` after the death).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08_dead_controller_is_fenced_one_session_after_its_last_contact() {
    const SESSION: Duration = Duration::from_millis(3000);
    let root = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    for id in 1..=3 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listeners.push((id, l.local_addr().unwrap().to_string(), l));
    }
    let voters: BTreeMap<i32, String> = listeners
        .iter()
        .map(|(id, a, _)| (*id, a.clone()))
        .collect();
    let mut nodes = Vec::new();
    for (id, addr, l) in listeners {
        let mut c = config(id, &addr, &voters, &root.path().join(format!("n{id}")));
        // Elections (>= 2.5 s after the last heartbeat) close to a session,
        // so the two behaviours are far apart.
        c.election_timeout_min_ms = 2500;
        c.election_timeout_max_ms = 3000;
        c.broker_session_timeout_ms = SESSION.as_millis() as u64;
        c.broker_heartbeat_interval_ms = 50;
        nodes.push(serve(l, c).await);
    }
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    for n in &nodes {
        spawn_heartbeat(
            n.store.clone(),
            n.id,
            n.addr.clone(),
            Duration::from_millis(50),
            CancellationToken::new(),
        );
    }
    wait_state(&nodes[0].store, "three live brokers", |s| {
        s.live_brokers() == [1, 2, 3]
    })
    .await;
    nodes[0].store.submit(create("c", 6, 3)).await.unwrap();
    let led: Vec<usize> = nodes[0].store.current().topics["c"]
        .partitions
        .iter()
        .enumerate()
        .filter(|(_, p)| p.leader == leader)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(led.len(), 2, "round-robin leaders");

    let pos = nodes.iter().position(|n| n.id == leader).unwrap();
    let killing = std::time::Instant::now();
    nodes.remove(pos).kill().await;
    let survivors: Vec<&Node> = nodes.iter().collect();
    let successor = wait_leader(&survivors).await;
    let took_over = std::time::Instant::now();
    // `nodes[0]` may be another node than before the kill, one that has
    // not applied everything yet: look entries up, never index.
    let moved = |s: &ClusterMetadata| {
        s.brokers.get(&leader).is_some_and(|b| b.fenced)
            && s.topics.get("c").is_some_and(|t| {
                led.iter()
                    .all(|i| ![leader, -1].contains(&t.partitions[*i].leader))
            })
    };
    let state = wait_state(&nodes[0].store, "the dead controller fenced", moved).await;
    let (since_killing, since_takeover) = (killing.elapsed(), took_over.elapsed());
    // Which node fenced it: another election after `successor` would
    // explain a late fence.
    let fencer = nodes[0].store.controller_id();
    for p in &state.topics["c"].partitions {
        assert!(!p.isr.contains(&leader), "{p:?}");
    }
    assert_eq!(state.live_brokers().len(), 2, "{:?}", state.brokers);
    // Not before a session has passed since its last contact (a Raft
    // heartbeat before the kill; a second of slack for a slow machine)...
    assert!(
        since_killing + Duration::from_secs(1) >= SESSION,
        "fenced {since_killing:?} after the kill began, well under the session"
    );
    // ...and not a whole session after the successor took over: by then
    // most of the session (>= 2.45 s of 3 s) had already passed.
    assert!(
        since_takeover + Duration::from_secs(1) < SESSION,
        "fenced {since_takeover:?} after node {successor} took over (controller \
         {fencer} by then): the old controller's session restarted at the election"
    );
    for n in nodes {
        n.kill().await;
    }
}

/// `RegisterBroker` records the registering broker's own listeners: its
/// internal address from the request, never the serving node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t09_register_broker_records_the_brokers_own_internal_address() {
    let root = tempfile::tempdir().unwrap();
    let (_, nodes) = cluster_with(root.path(), 1, &[], |c| {
        c.internal_address = Some("127.0.0.1:1".into());
    })
    .await;
    let node = &nodes[0];
    wait_leader(&[node]).await;
    node.store.wait_for_cluster_id(WAIT).await.unwrap();
    let mut client = BrokerLifecycleClient::connect(format!("http://{}", node.addr))
        .await
        .unwrap();
    for (id, internal) in [(8, ""), (9, "127.0.0.1:9093")] {
        let epoch = client
            .register_broker(runnel_proto::v1::internal::RegisterBrokerRequest {
                broker_id: id,
                address: format!("127.0.0.1:{}", 9000 + id),
                internal_address: internal.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .broker_epoch;
        assert!(epoch > 0);
    }
    let state = node.store.current();
    assert_eq!(state.internal_address(8), Some("127.0.0.1:9008"));
    assert_eq!(state.internal_address(9), Some("127.0.0.1:9093"));
}

/// A broker-only node that comes back at another address gets the log
/// there: the leader updates its learner's address from the
/// registration (it kept sending to the old one, so the node's metadata
/// never advanced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_a_learner_that_moved_gets_the_log_at_its_new_address() {
    let root = tempfile::tempdir().unwrap();
    let (voter_addrs, mut nodes) = cluster(root.path(), 3, &[4]).await;
    let voters: Vec<&Node> = nodes.iter().filter(|n| n.id <= 3).collect();
    wait_leader(&voters).await;
    let i = nodes.iter().position(|n| n.id == 4).unwrap();
    let learner = nodes.remove(i);
    let cancel = CancellationToken::new();
    spawn_heartbeat(
        learner.store.clone(),
        4,
        learner.addr.clone(),
        Duration::from_millis(100),
        cancel.clone(),
    );
    wait_state(&learner.store, "the learner to receive the log", |s| {
        s.brokers.contains_key(&4)
    })
    .await;
    cancel.cancel();
    let (_, old_addr, dir) = learner.kill().await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let new_addr = listener.local_addr().unwrap().to_string();
    assert_ne!(new_addr, old_addr);
    let moved = serve(listener, config(4, &new_addr, &voter_addrs, &dir)).await;
    let cancel = CancellationToken::new();
    spawn_heartbeat(
        moved.store.clone(),
        4,
        new_addr.clone(),
        Duration::from_millis(100),
        cancel.clone(),
    );
    nodes[0]
        .store
        .submit(create("after-move", 1, 1))
        .await
        .unwrap();
    wait_state(&moved.store, "the moved learner to receive the log", |s| {
        s.topics.contains_key("after-move") && s.brokers[&4].address == new_addr
    })
    .await;
    cancel.cancel();
    moved.kill().await;
    for n in nodes {
        n.kill().await;
    }
}

/// A heartbeat naming a broker epoch newer than the controller has applied
/// (a registration committed through the previous controller, not yet
/// applied by this one) is answered UNAVAILABLE, to be retried; answered
/// "fenced", it made the broker register again, fencing itself and moving
/// its leaderships for nothing. A registration answers the epoch it got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_a_heartbeat_from_ahead_of_the_controller_is_retried_not_fenced() {
    let root = tempfile::tempdir().unwrap();
    let (_, nodes) = cluster(root.path(), 3, &[]).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = wait_leader(&all).await;
    let store = &nodes.iter().find(|n| n.id == leader).unwrap().store;
    let epoch = store
        .register_broker(1, &nodes[0].addr, None, "", "")
        .await
        .unwrap();
    assert_eq!(store.current().brokers[&1].epoch, epoch);
    let current = store.heartbeat(1, epoch).await.unwrap();
    assert!(!current.fenced);
    let ahead = store.heartbeat(1, epoch + 1).await.unwrap_err();
    assert_eq!(ahead.code(), tonic::Code::Unavailable, "{ahead:?}");
    let behind = store.heartbeat(1, epoch - 1).await.unwrap();
    assert!(behind.fenced, "an older registration is fenced");
    for n in nodes {
        n.kill().await;
    }
}

/// Every voter moves to another port (as when a deployment gives Raft its
/// own `internal_listen`), each node's configuration listing the new
/// addresses: the quorum forms again there and takes commands. Voters are
/// dialled at the configured addresses; at the ones stored in the
/// membership when the cluster first formed, each dialled the old ports
/// for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12_voters_that_all_moved_form_the_quorum_at_their_new_addresses() {
    let root = tempfile::tempdir().unwrap();
    let (_, nodes) = cluster(root.path(), 3, &[]).await;
    wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let first = nodes[0].addr.clone();
    nodes[0].store.submit(register(1, &first)).await.unwrap();
    let mut stopped = Vec::new();
    for n in nodes {
        stopped.push(n.kill().await);
    }
    let mut listeners = Vec::new();
    for (id, _, dir) in stopped {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listeners.push((id, l.local_addr().unwrap().to_string(), dir, l));
    }
    let voters: BTreeMap<i32, String> = listeners
        .iter()
        .map(|(id, addr, _, _)| (*id, addr.clone()))
        .collect();
    let mut nodes = Vec::new();
    for (id, addr, dir, l) in listeners {
        nodes.push(serve(l, config(id, &addr, &voters, &dir)).await);
    }
    let all: Vec<&Node> = nodes.iter().collect();
    wait_leader(&all).await;
    within(
        "a command after the move",
        nodes[1].store.submit(register(2, &voters[&2])),
    )
    .await
    .unwrap();
    let state = wait_converged(&all).await;
    assert!(state.brokers.contains_key(&1) && state.brokers.contains_key(&2));
    for n in nodes {
        n.kill().await;
    }
}
