//! Replication across three real `runnel server` processes on loopback:
//! leader kills under acks=all, the divergent-tail (KIP-101) scenario, ISR
//! shrink and expand around a paused follower, and min.insync.replicas.
//!
//! `REPLICATION_KILL_ITERATIONS` sets how many leader kills t01 performs
//! (default 2 here; the long run uses 20).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, log_bytes, Cluster};
use runnel::client::{Client, ClientError, ProducerConfig, ProducerRecord, StartFrom};
use runnel_proto::v1 as pb;
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(60);

/// Fast failure detection for tests.
const CONTROLLER: &str = "broker_session_timeout_ms = 2000\nbroker_heartbeat_interval_ms = 200\n";

fn producer(client: &Client, acks: pb::Acks) -> runnel::client::Producer {
    client.producer(ProducerConfig {
        acks,
        linger: Duration::from_millis(1),
        timeout_ms: 5_000,
        request_timeout: Duration::from_secs(8),
        ..ProducerConfig::default()
    })
}

async fn describe(client: &Client, topic: &str) -> Option<pb::TopicDescription> {
    client.describe_topic(topic).await.ok()
}

/// Waits until partition 0 has a leader other than `not` and an ISR of
/// `isr_len`, and returns its description.
async fn await_partition(
    client: &Client,
    topic: &str,
    not: i32,
    isr_len: usize,
) -> pb::PartitionDescription {
    eventually(
        &format!("{topic}-0 led by a node other than {not} with ISR of {isr_len}"),
        WAIT,
        || async {
            let d = describe(client, topic).await?;
            let p = d.partitions.into_iter().next()?;
            (p.leader > 0 && p.leader != not && p.isr.len() == isr_len).then_some(p)
        },
    )
    .await
}

/// The base offset of the first segment file in a partition directory.
fn first_segment_base(partition_dir: &std::path::Path) -> i64 {
    std::fs::read_dir(partition_dir)
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .min()
        .expect("a segment file")
}

/// Reads every record value of partition 0 (up to the high watermark).
async fn read_all(client: &Client, topic: &str) -> Vec<(i64, String)> {
    // A new leader's high watermark lags its log end until its followers
    // fetch again: wait until everything in the leader's log is committed.
    let committed = eventually("the high watermark to reach the log end", WAIT, || async {
        let p = describe(client, topic)
            .await?
            .partitions
            .into_iter()
            .next()?;
        (p.high_watermark >= 0 && p.high_watermark == p.log_end_offset).then_some(p.high_watermark)
    })
    .await;
    eventually("a full read of the partition", WAIT, || async {
        let mut c = client
            .partition_consumer(topic, 0, StartFrom::Earliest)
            .await
            .ok()?;
        let end = c.high_watermark();
        if end < committed {
            return None;
        }
        let mut out = Vec::new();
        while c.position() < end {
            for r in c.poll().await.ok()? {
                out.push((r.offset, String::from_utf8(r.value?.to_vec()).ok()?));
            }
        }
        Some(out)
    })
    .await
}

/// Waits until all three replicas hold byte-identical logs.
async fn await_identical_replicas(cluster: &Cluster, topic: &str) -> Vec<u8> {
    let dirs: Vec<_> = (1..=3)
        .map(|id| cluster.data_dir(id).join(format!("{topic}-0")))
        .collect();
    eventually("byte-identical replicas", WAIT, || {
        let dirs = dirs.clone();
        async move {
            let logs: Vec<Vec<u8>> = dirs.iter().map(|d| log_bytes(d)).collect();
            (logs.iter().all(|l| *l == logs[0]) && !logs[0].is_empty()).then(|| logs[0].clone())
        }
    })
    .await
}

/// Record values stored in concatenated segment bytes.
fn values_in(log: &[u8]) -> Vec<String> {
    runnel_storage::RecordBatch::parse_all(bytes::Bytes::copy_from_slice(log))
        .unwrap()
        .iter()
        .flat_map(|b| b.records().unwrap())
        .map(|r| String::from_utf8(r.value.unwrap().to_vec()).unwrap())
        .collect()
}

fn expected_values(a: &[String], b: &[String]) -> Vec<String> {
    a.iter().chain(b.iter()).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_acks_all_survives_leader_kills() {
    let iterations: usize = std::env::var("REPLICATION_KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 10000",
        CONTROLLER,
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let configs = BTreeMap::from([("min.insync.replicas".to_string(), "2".to_string())]);
    client.create_topic("t", 1, 3, configs).await.unwrap();
    await_partition(&client, "t", -1, 3).await;

    // The producer sends one record at a time with acks=all and remembers
    // which were acknowledged. It retries idempotently (the default), so
    // nothing may appear twice even when a batch is resent.
    let acked = Arc::new(Mutex::new(Vec::<usize>::new()));
    let failed = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = {
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        let client = Client::connect(&cluster.bootstrap()).await.unwrap();
        tokio::spawn(async move {
            let producer = producer(&client, pb::Acks::All);
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let ack = producer
                    .send("t", ProducerRecord::value(format!("v{i}")))
                    .await
                    .unwrap();
                match ack.await {
                    Ok(_) => acked.lock().await.push(i),
                    Err(e) => {
                        failed.lock().await.push((i, e.to_string()));
                        // Back off while leadership moves.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                i += 1;
            }
            producer.close().await.unwrap();
        })
    };

    for round in 0..iterations {
        let before = acked.lock().await.len();
        eventually("progress before the kill", WAIT, || {
            let acked = acked.clone();
            async move { (acked.lock().await.len() >= before + 50).then_some(()) }
        })
        .await;
        let leader = describe(&client, "t").await.unwrap().partitions[0].leader;
        cluster.kill(leader);
        // A new leader takes over and acknowledged writes continue.
        await_partition(&client, "t", leader, 2).await;
        let after_kill = acked.lock().await.len();
        eventually("acks from the new leader", WAIT, || {
            let acked = acked.clone();
            async move { (acked.lock().await.len() >= after_kill + 50).then_some(()) }
        })
        .await;
        cluster.restart(leader);
        // The restarted broker catches up and rejoins the ISR.
        eventually(&format!("round {round}: ISR back to 3"), WAIT, || async {
            let d = describe(&client, "t").await?;
            (d.partitions[0].isr.len() == 3).then_some(())
        })
        .await;
    }
    stop.cancel();
    task.await.unwrap();

    let acked = acked.lock().await.clone();
    let failed = failed.lock().await.clone();
    assert!(
        acked.len() >= 100 * iterations,
        "too few acks: {}",
        acked.len()
    );
    let stored = read_all(&client, "t").await;
    // Offsets are contiguous.
    for (i, (offset, _)) in stored.iter().enumerate() {
        assert_eq!(*offset, i as i64, "offsets must be contiguous");
    }
    let values: Vec<usize> = stored
        .iter()
        .map(|(_, v)| v.trim_start_matches('v').parse().unwrap())
        .collect();
    // Nothing twice, in send order.
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "duplicates or reordering: {values:?}"
    );
    // Every acknowledged record is there.
    let present: std::collections::BTreeSet<usize> = values.iter().copied().collect();
    let lost: Vec<usize> = acked
        .iter()
        .filter(|i| !present.contains(i))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged records lost: {lost:?} (failed sends: {failed:?})"
    );
    // Replicas end byte-identical.
    await_identical_replicas(&cluster, "t").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_divergent_tail_is_truncated_after_leader_change() {
    let base = tempfile::tempdir().unwrap();
    // Followers never leave the ISR by lag here: only fencing moves things.
    let cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 600000\nfailpoints = true",
        CONTROLLER,
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("d", 1, 3, BTreeMap::new())
        .await
        .unwrap();
    let p = await_partition(&client, "d", -1, 3).await;
    let old_leader = p.leader;
    let followers: Vec<i32> = p
        .replicas
        .iter()
        .copied()
        .filter(|r| *r != old_leader)
        .collect();

    let send = |client: Client, acks: pb::Acks, values: Vec<String>| async move {
        let producer = producer(&client, acks);
        let mut acks_out = Vec::new();
        for v in values {
            acks_out.push(producer.send("d", ProducerRecord::value(v)).await.unwrap());
        }
        producer.close().await.unwrap();
        let mut results = Vec::new();
        for a in acks_out {
            results.push(a.await);
        }
        results
    };
    let committed: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    for r in send(client.clone(), pb::Acks::All, committed.clone()).await {
        r.unwrap();
    }

    // Followers drop whatever they fetch from now on (a failpoint checked
    // after each answer arrives), so the old leader takes writes only it
    // has: an uncommitted tail in epoch 0.
    let pause = |id: i32, on: bool| {
        let dir = cluster.data_dir(id).join("failpoints");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pause-replica-fetch");
        if on {
            std::fs::write(file, b"").unwrap();
        } else {
            std::fs::remove_file(file).unwrap();
        }
    };
    for f in &followers {
        pause(*f, true);
    }
    let leader_only = Client::connect(&cluster.node(old_leader).addr)
        .await
        .unwrap();
    let divergent: Vec<String> = (0..5).map(|i| format!("divergent-{i}")).collect();
    for r in send(leader_only, pb::Acks::Leader, divergent.clone()).await {
        r.unwrap();
    }
    let old_dir = cluster.data_dir(old_leader).join("d-0");
    let with_tail = log_bytes(&old_dir);

    // The old leader pauses, the followers resume and elect a new leader,
    // which takes new committed writes at the same offsets.
    cluster.node(old_leader).signal("STOP");
    for f in &followers {
        pause(*f, false);
    }
    let follower_client = Client::connect(
        &followers
            .iter()
            .map(|f| cluster.node(*f).addr.clone())
            .collect::<Vec<_>>()
            .join(","),
    )
    .await
    .unwrap();
    let p = await_partition(&follower_client, "d", old_leader, 2).await;
    assert!(p.leader_epoch > 0);
    // Neither follower ever stored the divergent records.
    for f in &followers {
        let values = values_in(&log_bytes(&cluster.data_dir(*f).join("d-0")));
        assert_eq!(
            values, committed,
            "follower {f} must not have the divergent tail"
        );
    }
    let after: Vec<String> = (0..3).map(|i| format!("n{i}")).collect();
    for r in send(follower_client.clone(), pb::Acks::All, after.clone()).await {
        r.unwrap();
    }

    // The old leader comes back, truncates its divergent tail and copies
    // the new leader's history.
    cluster.node(old_leader).signal("CONT");
    let identical = await_identical_replicas(&cluster, "d").await;
    assert_eq!(
        values_in(&with_tail)[10..],
        [
            "divergent-0",
            "divergent-1",
            "divergent-2",
            "divergent-3",
            "divergent-4"
        ]
    );
    assert_eq!(values_in(&identical), expected_values(&committed, &after));
    let stored: Vec<String> = read_all(&follower_client, "d")
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let expected: Vec<String> = committed.iter().chain(after.iter()).cloned().collect();
    assert_eq!(
        stored, expected,
        "the divergent records must be gone everywhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_isr_shrinks_for_a_paused_follower_and_min_isr_refuses() {
    let base = tempfile::tempdir().unwrap();
    // Lag detection is faster than fencing: the ISR shrinks by lag alone.
    // Not much faster: a healthy follower held up on a busy machine must
    // not leave the ISR first.
    let cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 5000",
        "broker_session_timeout_ms = 30000\nbroker_heartbeat_interval_ms = 500\n",
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let strict = BTreeMap::from([("min.insync.replicas".to_string(), "3".to_string())]);
    client.create_topic("s", 1, 3, strict).await.unwrap();
    let p = await_partition(&client, "s", -1, 3).await;
    let one = |client: Client, v: &str| {
        let v = v.to_string();
        async move {
            // No retries: the test wants to see each refusal.
            let producer = client.producer(ProducerConfig {
                acks: pb::Acks::All,
                linger: Duration::from_millis(1),
                timeout_ms: 5_000,
                delivery_timeout: Duration::ZERO,
                ..ProducerConfig::default()
            });
            let ack = producer.send("s", ProducerRecord::value(v)).await.unwrap();
            producer.close().await.unwrap();
            ack.await
        }
    };
    one(client.clone(), "a").await.unwrap();

    // The quorum: three voters; the active controller sees the others' lag.
    let controller = client.describe_cluster().await.unwrap().controller_id;
    let at_controller = Client::connect(&cluster.node(controller).addr)
        .await
        .unwrap();
    let q = at_controller
        .describe_cluster()
        .await
        .unwrap()
        .quorum
        .unwrap();
    assert_eq!(q.voters, vec![1, 2, 3]);
    assert_eq!(q.lag.len(), 2, "{q:?}");
    let paused = *p.replicas.iter().find(|r| **r != p.leader).unwrap();
    cluster.node(paused).signal("STOP");
    // The leader drops the silent follower from the ISR...
    let shrunk = eventually("the ISR to shrink", WAIT, || async {
        let d = describe(&client, "s").await?;
        (d.partitions[0].isr.len() == 2).then(|| d.partitions[0].isr.clone())
    })
    .await;
    assert!(!shrunk.contains(&paused));
    // ...and acks=all is refused before anything is appended.
    let hw_before = describe(&client, "s").await.unwrap().partitions[0].log_end_offset;
    let err = one(client.clone(), "b").await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Broker {
                code: pb::ErrorCode::NotEnoughReplicas,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        describe(&client, "s").await.unwrap().partitions[0].log_end_offset,
        hw_before
    );

    // The follower resumes, catches up and rejoins; acks=all works again.
    cluster.node(paused).signal("CONT");
    eventually("the ISR to expand", WAIT, || async {
        let d = describe(&client, "s").await?;
        (d.partitions[0].isr.len() == 3).then_some(())
    })
    .await;
    one(client.clone(), "c").await.unwrap();
    let stored: Vec<String> = read_all(&client, "s")
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(stored, vec!["a", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_replica_behind_the_leaders_log_start_copies_from_there() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 10000",
        CONTROLLER,
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let configs = BTreeMap::from([
        ("segment.bytes".to_string(), "1024".to_string()),
        ("retention.bytes".to_string(), "4096".to_string()),
    ]);
    client.create_topic("ret", 1, 3, configs).await.unwrap();
    let p = await_partition(&client, "ret", -1, 3).await;
    let away = *p.replicas.iter().find(|r| **r != p.leader).unwrap();
    cluster.kill(away);
    await_partition(&client, "ret", away, 2).await;

    // While it is away, retention deletes the leader's oldest segments
    // (small batches, so that there are many segments to delete).
    let producer = client.producer(ProducerConfig {
        acks: pb::Acks::All,
        batch_bytes_max: 1024,
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..400 {
        acks.push(
            producer
                .send("ret", ProducerRecord::value(format!("{i:0>100}")))
                .await
                .unwrap(),
        );
    }
    producer.close().await.unwrap();
    for a in acks {
        a.await.unwrap();
    }
    let start = eventually("retention to advance the log start", WAIT, || async {
        let p = describe(&client, "ret")
            .await?
            .partitions
            .into_iter()
            .next()?;
        (p.log_start_offset > 0).then_some(p.log_start_offset)
    })
    .await;

    // Back, it cannot fetch from offset 0: it starts over at the leader's
    // log start, catches up and rejoins the ISR.
    cluster.restart(away);
    eventually("the returning replica to rejoin the ISR", WAIT, || async {
        let d = describe(&client, "ret").await?;
        (d.partitions[0].isr.len() == 3).then_some(())
    })
    .await;
    let first_segment = first_segment_base(&cluster.data_dir(away).join("ret-0"));
    assert!(
        first_segment >= start,
        "replica kept offsets below the leader's start {start}: {first_segment}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_follower_catching_up_is_throttled_and_produce_keeps_going() {
    const RATE: u64 = 1_000_000;
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        3,
        base.path(),
        &format!(
            "replication_bytes_per_sec_max = {RATE}\nreplica_fetch_bytes_max = 131072\n\
             replica_lag_time_max_ms = 2000"
        ),
        CONTROLLER,
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("th", 1, 3, BTreeMap::new())
        .await
        .unwrap();
    let p = await_partition(&client, "th", -1, 3).await;
    let away = *p.replicas.iter().find(|r| **r != p.leader).unwrap();
    cluster.kill(away);
    await_partition(&client, "th", away, 2).await;

    // A backlog of about 4 MB builds up while the follower is away.
    let producer = client.producer(ProducerConfig {
        acks: pb::Acks::Leader,
        ..ProducerConfig::default()
    });
    let value = "x".repeat(1000);
    let mut acks = Vec::new();
    for _ in 0..4000 {
        acks.push(
            producer
                .send("th", ProducerRecord::value(value.clone()))
                .await
                .unwrap(),
        );
    }
    producer.close().await.unwrap();
    for a in acks {
        a.await.unwrap();
    }
    let backlog = log_bytes(&cluster.data_dir(p.leader).join("th-0")).len() as u64;
    assert!(backlog > 4_000_000, "{backlog}");

    // It returns and copies the backlog no faster than the configured rate
    // (a bucket of one second's bytes may pass at once), while acks=all
    // producing goes on being answered promptly.
    let producer = producer_acks_all(&client);
    // Warm up (producer id, metadata) before anything is timed.
    producer
        .send("th", ProducerRecord::value("warm-up"))
        .await
        .unwrap()
        .await
        .unwrap();
    cluster.restart(away);
    let started = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let caught_up = loop {
        let sent = std::time::Instant::now();
        producer
            .send("th", ProducerRecord::value("live"))
            .await
            .unwrap()
            .await
            .unwrap();
        slowest = slowest.max(sent.elapsed());
        let d = describe(&client, "th").await;
        if d.is_some_and(|d| d.partitions[0].isr.len() == 3) {
            break started.elapsed();
        }
        assert!(started.elapsed() < WAIT, "the follower never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    producer.close().await.unwrap();
    let floor = Duration::from_secs_f64((backlog - RATE) as f64 / RATE as f64 * 0.8);
    assert!(
        caught_up >= floor,
        "caught up {backlog} bytes in {caught_up:?}: faster than {RATE} B/s allows ({floor:?})"
    );
    // Starved, acks=all would wait for the whole catch-up (the in-sync
    // follower's fetches held behind the throttled backlog). A bound of
    // three quarters of it, and at least 2 s, leaves room for a busy
    // machine's stalls.
    assert!(
        slowest < (caught_up * 3 / 4).max(Duration::from_secs(2)),
        "produce starved during catch-up: {slowest:?} of {caught_up:?}"
    );
    eprintln!(
        "caught up {backlog} bytes in {caught_up:?} ({:.0} B/s, limit {RATE}); slowest acks=all produce {slowest:?}",
        backlog as f64 / caught_up.as_secs_f64()
    );
}

/// The replication byte rate holds back replicas catching up only: with
/// produce traffic above it, in-sync followers keep up and stay in the
/// ISR (throttled too, they fell behind, left the ISR, and acks=all
/// with min.insync.replicas=3 was refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05b_in_sync_followers_are_not_throttled() {
    const RATE: u64 = 100_000;
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(
        3,
        base.path(),
        // A follower falls out after 10 s behind: the 15 s the rate would
        // hold it back, not a scheduling stall of a busy machine.
        &format!("replication_bytes_per_sec_max = {RATE}\nreplica_lag_time_max_ms = 10000"),
        CONTROLLER,
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let configs = [("min.insync.replicas".to_string(), "3".to_string())].into();
    client.create_topic("hot", 1, 3, configs).await.unwrap();
    await_partition(&client, "hot", -1, 3).await;
    // 1.5 MB: fifteen seconds of the rate.
    let producer = client.producer(ProducerConfig {
        acks: pb::Acks::All,
        timeout_ms: 20_000,
        delivery_timeout: Duration::ZERO,
        ..ProducerConfig::default()
    });
    let value = "h".repeat(1000);
    let mut acks = Vec::new();
    for _ in 0..1500 {
        acks.push(
            producer
                .send("hot", ProducerRecord::value(value.clone()))
                .await
                .unwrap(),
        );
    }
    producer.close().await.unwrap();
    for (i, a) in acks.into_iter().enumerate() {
        a.await
            .unwrap_or_else(|e| panic!("record {i} refused: {e}"));
    }
    let d = describe(&client, "hot").await.unwrap();
    assert_eq!(d.partitions[0].isr.len(), 3, "{d:?}");
}

fn producer_acks_all(client: &Client) -> runnel::client::Producer {
    client.producer(ProducerConfig {
        acks: pb::Acks::All,
        linger: Duration::from_millis(1),
        timeout_ms: 5_000,
        ..ProducerConfig::default()
    })
}

/// A consumer caught up with a leader asks a new leader for the next
/// offset; the new leader's high watermark may still be behind it (it
/// learns it one fetch round after the old one). Here the high watermark
/// is held behind the log end by a paused ISR follower. A fetch between
/// the two waits for the high watermark, as at the end of the log: it
/// was refused as out of range, and the group consumer then reset to the
/// earliest offset and read the partition again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t06_a_fetch_between_the_high_watermark_and_the_log_end_is_not_out_of_range() {
    let base = tempfile::tempdir().unwrap();
    // Neither lag nor fencing removes the paused follower meanwhile.
    let cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 60000",
        "broker_session_timeout_ms = 60000\nbroker_heartbeat_interval_ms = 500\n",
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("h", 1, 3, BTreeMap::new())
        .await
        .unwrap();
    let p = await_partition(&client, "h", -1, 3).await;
    let send = |acks: pb::Acks, v: &'static str| {
        let producer = producer(&client, acks);
        async move {
            let ack = producer.send("h", ProducerRecord::value(v)).await.unwrap();
            producer.close().await.unwrap();
            ack.await.unwrap()
        }
    };
    send(pb::Acks::All, "a").await;
    let paused = *p.replicas.iter().find(|r| **r != p.leader).unwrap();
    cluster.node(paused).signal("STOP");
    send(pb::Acks::Leader, "b").await;
    let d = describe(&client, "h").await.unwrap().partitions[0].clone();
    assert_eq!((d.high_watermark, d.log_end_offset), (1, 2));

    let url = format!("http://{}", cluster.node(p.leader).addr);
    let mut consumer = runnel_proto::v1::consumer_client::ConsumerClient::connect(url)
        .await
        .unwrap();
    let fetch = |offset| pb::FetchRequest {
        topic: "h".into(),
        partition: 0,
        offset,
        max_wait_ms: 100,
        ..Default::default()
    };
    let between = consumer.fetch(fetch(2)).await.unwrap().into_inner();
    assert!(between.records.is_empty() && between.batches.is_empty());
    assert_eq!(between.high_watermark, 1);
    assert_eq!(between.next_offset, 2);
    // Past the log end it is out of range.
    let past = consumer.fetch(fetch(3)).await.unwrap_err();
    assert!(past.message().contains("out of range"), "{past:?}");

    // Once the follower is back, the record below the log end is readable.
    cluster.node(paused).signal("CONT");
    let got = eventually("the record to become readable", WAIT, || async {
        let mut consumer = consumer.clone();
        let r = consumer.fetch(fetch(1)).await.ok()?.into_inner();
        (!r.records.is_empty()).then_some(r.records)
    })
    .await;
    assert_eq!(got[0].value.as_deref(), Some(&b"b"[..]));
}

/// The first record offset a fetch at `offset` of `topic`-0 returns, or
/// its error code.
async fn first_offset_at(client: &Client, topic: &str, offset: i64) -> Result<i64, pb::ErrorCode> {
    client
        .fetch(pb::FetchRequest {
            topic: topic.into(),
            partition: 0,
            offset,
            max_wait_ms: 100,
            ..Default::default()
        })
        .await
        .map(|r| r.records.first().map_or(-1, |r| r.offset))
        .map_err(|e| e.code())
}

/// DeleteRecords answers once every in-sync replica's log starts at the
/// offset: after the leader dies, the new one serves nothing below it.
/// It refuses offsets above the high watermark; the CLI deletes below
/// the high watermark with `--before end`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t07_deleted_records_are_gone_from_every_in_sync_replica() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(3, base.path(), "", CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let configs = BTreeMap::from([("segment.bytes".to_string(), "1024".to_string())]);
    client.create_topic("del", 1, 3, configs).await.unwrap();
    let p = await_partition(&client, "del", -1, 3).await;
    // Small batches, so that segments hold a few records each.
    let producer = client.producer(ProducerConfig {
        acks: pb::Acks::All,
        batch_bytes_max: 256,
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..100 {
        let record = ProducerRecord {
            value: Some(format!("v{i:03}").repeat(10).into()),
            partition: Some(0),
            ..ProducerRecord::default()
        };
        acks.push(producer.send("del", record).await.unwrap());
    }
    producer.close().await.unwrap();
    for a in acks {
        a.await.unwrap();
    }

    let above = client
        .delete_records("del", 0, 101, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(above.code(), pb::ErrorCode::OffsetOutOfRange, "{above}");
    assert!(above.to_string().contains("high watermark"), "{above}");
    let deleted = client
        .delete_records("del", 0, 40, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(deleted.offset, 40);
    assert!(deleted.low_watermark >= 40, "{deleted:?}");
    assert_eq!(
        first_offset_at(&client, "del", 39).await,
        Err(pb::ErrorCode::OffsetOutOfRange)
    );
    assert_eq!(first_offset_at(&client, "del", 40).await, Ok(40));
    // Every replica removed whole segments below 40 from disk.
    for id in 1..=3 {
        let first_segment = first_segment_base(&cluster.data_dir(id).join("del-0"));
        assert!(
            (1..=40).contains(&first_segment),
            "node {id}: first segment {first_segment}"
        );
    }

    // The leader dies; the new one had moved its log start too.
    cluster.kill(p.leader);
    await_partition(&client, "del", p.leader, 2).await;
    let earliest = eventually("the new leader's earliest offset", WAIT, || async {
        client
            .list_offsets("del", 0, pb::OffsetSpec::Earliest, 0)
            .await
            .ok()
            .map(|r| r.offset)
    })
    .await;
    assert_eq!(earliest, 40);
    eventually(
        "a fetch below the log start on the new leader refused as out of range",
        WAIT,
        || async {
            match first_offset_at(&client, "del", 10).await {
                Err(pb::ErrorCode::OffsetOutOfRange) => Some(()),
                _ => None,
            }
        },
    )
    .await;

    // The CLI: everything below the high watermark, on the two left.
    let out = common::cli_ok(
        &cluster.bootstrap(),
        &[
            "topic",
            "delete-records",
            "del",
            "--before",
            "end",
            "--all-partitions",
        ],
        None,
    );
    assert!(out.contains("100"), "{out}");
    let earliest = client
        .list_offsets("del", 0, pb::OffsetSpec::Earliest, 0)
        .await
        .unwrap()
        .offset;
    assert_eq!(earliest, 100);
}

/// A broker restarting after a crash serves its port before it has
/// registered, with the metadata it had on disk: that metadata may still
/// name it leader in an epoch the quorum has moved past. It takes up no
/// role from it, so a produce is refused as retriable, not appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08_a_starting_broker_takes_no_leadership_and_stops_cleanly() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(3, base.path(), "", CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("s", 1, 3, BTreeMap::new())
        .await
        .unwrap();
    let leader = await_partition(&client, "s", 0, 3).await.leader;
    // Two more metadata entries: each node's commit index is flushed with
    // the next append, so "s" is in the metadata each replays.
    for name in ["later-1", "later-2"] {
        client
            .create_topic(name, 1, 1, BTreeMap::new())
            .await
            .unwrap();
    }
    for id in 1..=3 {
        cluster.kill(id);
    }
    // Alone, it cannot form a quorum: it stays "starting".
    let starting = cluster.spawn(leader);
    let url = format!("http://{}", cluster.addrs[(leader - 1) as usize]);
    let mut producer = eventually("the restarted leader's port", WAIT, || async {
        pb::producer_client::ProducerClient::connect(url.clone())
            .await
            .ok()
    })
    .await;
    let status = producer
        .produce(pb::ProduceRequest {
            topic: "s".into(),
            partition: Some(0),
            records: vec![pb::Record {
                value: Some(b"stale".to_vec().into()),
                ..Default::default()
            }],
            acks: pb::Acks::Leader as i32,
            ..Default::default()
        })
        .await
        .expect_err("a starting broker must not append as leader");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        common::error_code(&status),
        "BROKER_NOT_AVAILABLE",
        "{status:?}"
    );
    // Stopped while still starting, it exits even with a stream open
    // (it waited on such streams for good before), and closes its logs.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ProduceRequest>(1);
    let mut answers = producer
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let status = tokio::task::spawn_blocking(move || starting.terminate(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "a broker stopped while starting must exit (with an error): {status:?}"
    );
    let end = answers.message().await;
    assert!(end.is_err() || matches!(end, Ok(None)), "{end:?}");
    drop(tx);
    let dir = cluster.data_dir(leader).join("s-0");
    assert!(
        dir.join(".clean-shutdown").exists(),
        "the log was not closed cleanly: {:?}",
        std::fs::read_dir(&dir).unwrap().collect::<Vec<_>>()
    );
}

/// Keyless records skip a partition that has no leader (as Kafka's sticky
/// partitioner picks among available partitions): they used to be sent
/// there in turn and wait out the delivery timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t09_keyless_records_skip_a_partition_without_a_leader() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(3, base.path(), "", CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("k", 3, 1, BTreeMap::new())
        .await
        .unwrap();
    let d = eventually("every partition led", WAIT, || async {
        let d = describe(&client, "k").await?;
        d.partitions.iter().all(|p| p.leader > 0).then_some(d)
    })
    .await;
    let down = d.partitions[2].leader;
    cluster.kill(down);
    eventually(
        "the dead broker's partitions without a leader",
        WAIT,
        || async {
            let d = describe(&client, "k").await?;
            d.partitions
                .iter()
                .filter(|p| p.replicas == [down])
                .all(|p| p.leader < 0)
                .then_some(())
        },
    )
    .await;
    let survivor = (1..=3).find(|id| *id != down).unwrap();
    let fresh = Client::connect(&cluster.addrs[(survivor - 1) as usize])
        .await
        .unwrap();
    let producer = fresh.producer(ProducerConfig {
        acks: pb::Acks::Leader,
        linger: Duration::from_millis(1),
        batch_bytes_max: 256,
        delivery_timeout: Duration::from_secs(10),
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..300 {
        acks.push(
            producer
                .send("k", ProducerRecord::value(format!("v{i}")))
                .await
                .unwrap(),
        );
    }
    for a in acks {
        let r = a.await.expect("a keyless record failed");
        assert!(
            !d.partitions
                .iter()
                .any(|p| p.partition == r.partition && p.replicas == [down]),
            "sent to a partition without a leader: {r:?}"
        );
    }
    producer.close().await.unwrap();
}

/// DescribeTopic asks the leaders of the partitions it does not lead for
/// their offsets: one connection per leader, all at once, 2 s in all.
/// A stalled leader (stopped, not yet fenced) used to cost 2 s per
/// partition it led, asked one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_describing_a_topic_waits_once_for_a_stalled_leader() {
    let base = tempfile::tempdir().unwrap();
    // Fencing slow: the stopped broker stays leader while described.
    let cluster = Cluster::start(
        3,
        base.path(),
        "",
        "broker_session_timeout_ms = 60000\nbroker_heartbeat_interval_ms = 500\n",
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("wide", 30, 1, BTreeMap::new())
        .await
        .unwrap();
    let d = eventually("every partition led", WAIT, || async {
        let d = describe(&client, "wide").await?;
        d.partitions.iter().all(|p| p.leader > 0).then_some(d)
    })
    .await;
    let asked = 1;
    let stalled = 2;
    let led_by_stalled = d.partitions.iter().filter(|p| p.leader == stalled).count();
    assert!(led_by_stalled >= 3, "{led_by_stalled} partitions on node 2");
    let at_asked = Client::connect(&cluster.node(asked).addr).await.unwrap();
    // Every leader answers first (node 1's channels to the others made),
    // so that only the stalled one can be slow below.
    eventually("every partition's offsets through node 1", WAIT, || async {
        let d = at_asked.describe_topic("wide").await.ok()?;
        d.partitions
            .iter()
            .all(|p| p.log_end_offset >= 0)
            .then_some(())
    })
    .await;
    cluster.node(stalled).signal("STOP");
    let started = std::time::Instant::now();
    let live = at_asked.describe_topic("wide").await;
    let took = started.elapsed();
    cluster.node(stalled).signal("CONT");
    let live = live.unwrap();
    for p in &live.partitions {
        if p.leader == stalled {
            assert_eq!(p.log_end_offset, -1, "{p:?}");
        } else {
            assert!(p.log_end_offset >= 0, "{p:?}");
        }
    }
    // Waited for the stalled leader once (2 s), not once per partition
    // (2 s each), nor a few at a time.
    assert!(
        took < Duration::from_secs(6),
        "{took:?} for {led_by_stalled} partitions of a stalled leader"
    );
}

/// A keyless produce that names no partition goes to a partition the
/// broker it reached leads: on three brokers, two requests in three were
/// refused as NOT_LEADER, and a retry at the named leader picked yet
/// another partition there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_a_keyless_produce_without_a_partition_goes_to_one_the_broker_leads() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(3, base.path(), "", CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("rr", 6, 1, Default::default())
        .await
        .unwrap();
    let led: std::collections::BTreeSet<i32> = eventually("every partition led", WAIT, || async {
        let d = describe(&client, "rr").await?;
        d.partitions.iter().all(|p| p.leader > 0).then(|| {
            d.partitions
                .iter()
                .filter(|p| p.leader == 1)
                .map(|p| p.partition)
                .collect()
        })
    })
    .await;
    assert!(!led.is_empty() && led.len() < 6, "{led:?}");
    let mut producer = runnel_proto::v1::producer_client::ProducerClient::connect(format!(
        "http://{}",
        cluster.node(1).addr
    ))
    .await
    .unwrap();
    // Each partition node 1 leads takes writes there.
    for &p in &led {
        eventually("the partition taking writes", WAIT, || {
            let mut producer = producer.clone();
            async move {
                let req = pb::ProduceRequest {
                    topic: "rr".into(),
                    partition: Some(p),
                    records: vec![pb::Record::default()],
                    acks: pb::Acks::Leader as i32,
                    ..Default::default()
                };
                producer.produce(req).await.ok()
            }
        })
        .await;
    }
    let mut used = std::collections::BTreeSet::new();
    for i in 0..12 {
        let resp = producer
            .produce(pb::ProduceRequest {
                topic: "rr".into(),
                records: vec![pb::Record {
                    value: Some(format!("v{i}").into()),
                    ..Default::default()
                }],
                acks: pb::Acks::Leader as i32,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("request {i}: {s:?}"))
            .into_inner();
        used.insert(resp.partition);
    }
    assert_eq!(used, led);
}

/// A new leader's high watermark lags the old one's until its followers
/// fetch from it: ListOffsets (latest) there answers OFFSET_NOT_AVAILABLE
/// (retriable) meanwhile, never an offset below one already acknowledged
/// (KIP-207). Here the follower that would move it is paused; the new
/// leader answered its stale high watermark, 1, below the acknowledged 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12_a_new_leaders_latest_offset_never_goes_back() {
    let base = tempfile::tempdir().unwrap();
    // Followers learn the high watermark of an acknowledged record only
    // from their next fetch's long poll (30 s): the new leader's lags.
    // Neither lag nor fencing removes the paused follower meanwhile.
    let mut cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 60000\nreplica_fetch_wait_max_ms = 30000",
        "broker_session_timeout_ms = 60000\nbroker_heartbeat_interval_ms = 500\n",
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("s", 1, 3, BTreeMap::new())
        .await
        .unwrap();
    let p = await_partition(&client, "s", -1, 3).await;
    let producer = producer(&client, pb::Acks::All);
    for v in ["a", "b"] {
        let ack = producer.send("s", ProducerRecord::value(v)).await.unwrap();
        ack.await.unwrap();
    }
    producer.close().await.unwrap();
    // The ISR member after the leader takes over; the other is paused.
    let next = *p.isr.iter().find(|r| **r != p.leader).unwrap();
    let paused = *p
        .isr
        .iter()
        .find(|r| **r != p.leader && **r != next)
        .unwrap();
    cluster.node(paused).signal("STOP");
    cluster.stop(p.leader);
    let first = eventually("an answer from the new leader", WAIT, || async {
        match client.list_offsets("s", 0, pb::OffsetSpec::Latest, 0).await {
            Ok(r) => Some(Ok(r.offset)),
            Err(e) if e.code() == pb::ErrorCode::OffsetNotAvailable => Some(Err(e)),
            Err(_) => None,
        }
    })
    .await;
    assert!(!matches!(first, Ok(o) if o < 2), "{first:?}");
    if let Err(e) = &first {
        assert!(e.is_retriable(), "{e:?}");
    }
    // Meanwhile, a reader resuming from an offset it knows (a group's
    // committed one) does not wait for the latest offset: it starts, and
    // reads what is committed.
    let mut resumed = tokio::time::timeout(
        Duration::from_secs(1),
        client.partition_consumer("s", 0, runnel::client::StartFrom::Offset(0)),
    )
    .await
    .expect("a consumer from an offset waited for the latest offset")
    .unwrap();
    assert_eq!(resumed.position(), 0);
    let polled = resumed.poll().await.unwrap();
    assert!(polled.iter().all(|r| r.offset < 2), "{polled:?}");
    cluster.node(paused).signal("CONT");
    eventually(
        "the latest offset once the follower fetched",
        WAIT,
        || async {
            let r = client.list_offsets("s", 0, pb::OffsetSpec::Latest, 0).await;
            (r.ok()?.offset == 2).then_some(())
        },
    )
    .await;
}
