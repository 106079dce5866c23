//! A rolling restart of a three-node cluster (each node stopped with
//! SIGTERM, which hands its leaderships over first, then started again)
//! while an acks=all producer runs: nothing acknowledged is lost, and the
//! producer sees only retriable errors.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{cli_ok, eventually, Cluster};
use runnel::client::{Client, ClientError, ProducerConfig, ProducerRecord, StartFrom};
use runnel_proto::v1 as pb;
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_acks_all_loses_nothing() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 10000",
        "broker_session_timeout_ms = 3000\nbroker_heartbeat_interval_ms = 300\n",
    );
    let bootstrap = cluster.bootstrap();
    // Health, topic creation, produce and consume through the CLI.
    for addr in &cluster.addrs {
        cli_ok(addr, &["cluster", "health"], None);
    }
    cli_ok(
        &bootstrap,
        &[
            "topic",
            "create",
            "r",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
            "--config",
            "min.insync.replicas=2",
        ],
        None,
    );
    cli_ok(
        &bootstrap,
        &["produce", "r", "--acks", "all"],
        Some(b"hello\nworld\n"),
    );
    let out = cli_ok(&bootstrap, &["consume", "r"], None);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["hello", "world"]);

    let client = Client::connect(&bootstrap).await.unwrap();
    let acked = Arc::new(Mutex::new(Vec::<(i32, i64, String)>::new()));
    let errors = Arc::new(Mutex::new(Vec::<ClientError>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = {
        let (acked, errors, stop, client) =
            (acked.clone(), errors.clone(), stop.clone(), client.clone());
        tokio::spawn(async move {
            let producer = client.producer(ProducerConfig {
                acks: pb::Acks::All,
                linger: Duration::from_millis(1),
                timeout_ms: 5_000,
                request_timeout: Duration::from_secs(8),
                ..ProducerConfig::default()
            });
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let value = format!("m{i}");
                let ack = producer
                    .send(
                        "r",
                        ProducerRecord::keyed(format!("k{}", i % 7), value.clone()),
                    )
                    .await
                    .unwrap();
                match ack.await {
                    Ok(m) => acked.lock().await.push((m.partition, m.offset, value)),
                    Err(e) => {
                        errors.lock().await.push(e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                i += 1;
            }
            producer.close().await.unwrap();
        })
    };

    for id in 1..=3 {
        let before = acked.lock().await.len();
        eventually("progress before the restart", WAIT, || {
            let acked = acked.clone();
            async move { (acked.lock().await.len() >= before + 30).then_some(()) }
        })
        .await;
        let status = cluster.stop(id);
        assert!(status.success(), "node {id} did not stop cleanly: {status}");
        cluster.restart(id);
        eventually(&format!("node {id} back in every ISR"), WAIT, || async {
            let d = client.describe_topic("r").await.ok()?;
            d.partitions
                .iter()
                .all(|p| p.isr.len() == 3 && p.leader > 0)
                .then_some(())
        })
        .await;
    }
    let last = acked.lock().await.len();
    eventually("progress after the last restart", WAIT, || {
        let acked = acked.clone();
        async move { (acked.lock().await.len() >= last + 30).then_some(()) }
    })
    .await;
    stop.cancel();
    task.await.unwrap();

    // The restarts moved leaderships around; a preferred election brings
    // each back to its first replica (all are in sync again).
    let out = cli_ok(
        &bootstrap,
        &["partition", "elect-leaders", "--topic", "r"],
        None,
    );
    assert!(
        out.contains("new leaders") || out.contains("no leader changed"),
        "{out}"
    );
    // Seen by the broker that answers once it has applied the election
    // (its copy of the metadata may lag the controller's by a moment; CI
    // under load saw the old leaders).
    eventually(
        "every partition led by its preferred replica",
        WAIT,
        || async {
            let d = client.describe_topic("r").await.ok()?;
            d.partitions
                .iter()
                .all(|p| p.leader == p.replicas[0])
                .then_some(())
        },
    )
    .await;
    let out = cli_ok(&bootstrap, &["partition", "describe", "r"], None);
    assert!(out.contains("PARTITION"), "{out}");

    let errors = errors.lock().await.clone();
    let fatal: Vec<_> = errors.iter().filter(|e| !e.is_retriable()).collect();
    assert!(fatal.is_empty(), "non-retriable errors: {fatal:?}");
    // Every acknowledged record is where its acknowledgement said.
    let acked = acked.lock().await.clone();
    for partition in 0..3 {
        // The election just moved leaders: the first calls may be told
        // NOT_LEADER by a stale route; the client re-routes on retry. A new
        // leader's high watermark catches up with the old one's only once
        // its followers fetch again, so wait until it covers every ack.
        let last_acked = acked
            .iter()
            .filter(|(p, _, _)| *p == partition)
            .map(|(_, offset, _)| *offset)
            .max()
            .unwrap_or(-1);
        let mut c = eventually("a consumer on the new leader", WAIT, || async {
            let c = client
                .partition_consumer("r", partition, StartFrom::Earliest)
                .await
                .ok()?;
            (c.high_watermark() > last_acked).then_some(c)
        })
        .await;
        let end = c.high_watermark();
        let mut stored = std::collections::BTreeMap::new();
        let mut failures = 0;
        while c.position() < end {
            let records = match c.poll().await {
                Ok(records) => records,
                Err(e) if e.is_retriable() && failures < 20 => {
                    failures += 1;
                    continue;
                }
                Err(e) => panic!("reading {partition}: {e}"),
            };
            for r in records {
                stored.insert(
                    r.offset,
                    String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
                );
            }
        }
        for (p, offset, value) in acked.iter().filter(|(p, _, _)| *p == partition) {
            assert_eq!(
                stored.get(offset),
                Some(value),
                "acked record {value} lost from {p}@{offset}"
            );
        }
    }
}

/// A broker killed and started again within its session finds its old
/// registration, unfenced, in the metadata it replays. It must not report
/// ready on that entry: here the controller is stopped (SIGSTOP) while
/// the broker restarts, so registering again waits for a new controller,
/// and ready must wait with it. Once ready, the broker's own metadata
/// shows it with a newer broker epoch than before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_is_ready_only_once_registered_again() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        3,
        base.path(),
        "",
        "broker_session_timeout_ms = 30000\nbroker_heartbeat_interval_ms = 300\n",
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let controller = client.describe_cluster().await.unwrap().controller_id;
    let restarted = if controller == 1 { 2 } else { 1 };
    let epoch_of = |m: pb::MetadataResponse| {
        let b = m
            .brokers
            .iter()
            .find(|b| b.id == restarted)
            .unwrap_or_else(|| panic!("broker {restarted} in {m:?}"))
            .clone();
        (b.epoch, b.fenced)
    };
    let direct = Client::connect(&cluster.addrs[restarted as usize - 1])
        .await
        .unwrap();
    let (before, fenced) = epoch_of(direct.metadata(&[]).await.unwrap());
    assert!(!fenced);
    drop(direct);

    cluster.kill(restarted);
    cluster.node(controller).signal("STOP");
    cluster.restart(restarted);
    let direct = Client::connect(&cluster.addrs[restarted as usize - 1])
        .await
        .unwrap();
    let (after, fenced) = epoch_of(direct.metadata(&[]).await.unwrap());
    cluster.node(controller).signal("CONT");
    assert!(!fenced);
    assert!(
        after > before,
        "ready on the registration replayed from before the kill (epoch {before}, now {after})"
    );
}
