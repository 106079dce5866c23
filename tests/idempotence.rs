//! Idempotent producing against real brokers: a response lost after the
//! append is retried and lands once; a leader kill during an idempotent
//! acks=all stream leaves every acknowledged record exactly once, in send
//! order; bad sequences, stale epochs and unknown producer ids are refused
//! with a clear error and nothing appended; producer state survives a
//! restart.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{await_len, eventually, Cluster, ServerProcess};
use runnel::client::{Client, ClientError, ProducerConfig, ProducerRecord};
use runnel::error::error_code_of;
use runnel_proto::v1 as pb;
use runnel_proto::v1::producer_client::ProducerClient;
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(60);

/// A single node with failpoints enabled.
fn failpoint_node(dir: &std::path::Path) -> ServerProcess {
    ServerProcess::start_with_toml(dir, "[broker]\nfailpoints = true\n")
}

/// Every (offset, value) of partition 0 below the high watermark, in log
/// order, once that is at least `at_least` (a new leader's high watermark
/// lags until its followers fetch again); retries while leadership
/// settles.
async fn read_partition(client: &Client, topic: &str, at_least: i64) -> Vec<(i64, String)> {
    let end = eventually("the high watermark", WAIT, || async {
        let end = client
            .list_offsets(topic, 0, pb::OffsetSpec::Latest, 0)
            .await
            .ok()?
            .offset;
        (end >= at_least).then_some(end)
    })
    .await;
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < end {
        let resp = eventually("a fetch", WAIT, || async {
            client
                .fetch(pb::FetchRequest {
                    topic: topic.into(),
                    partition: 0,
                    offset,
                    max_bytes: 1 << 20,
                    ..Default::default()
                })
                .await
                .ok()
        })
        .await;
        assert!(!resp.records.is_empty(), "no records at {offset} < {end}");
        for r in resp.records {
            offset = r.offset + 1;
            out.push((
                r.offset,
                String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
            ));
        }
    }
    out
}

/// Sends `values` through `producer` as fast as it takes them and waits
/// for every answer. Returns the offsets.
async fn send_all(
    producer: &runnel::client::Producer,
    topic: &str,
    values: &[String],
) -> Vec<Result<i64, ClientError>> {
    let mut acks = Vec::new();
    for v in values {
        let record = ProducerRecord {
            value: Some(v.clone().into()),
            partition: Some(0),
            ..ProducerRecord::default()
        };
        acks.push(producer.send(topic, record).await.unwrap());
    }
    let mut out = Vec::new();
    for ack in acks {
        out.push(ack.await.map(|m| m.offset));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_a_response_lost_after_the_append_is_retried_and_lands_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = failpoint_node(dir.path());
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("t", 1, 1, Default::default())
        .await
        .unwrap();
    let failpoints = server.data_dir.join("failpoints");
    std::fs::create_dir_all(&failpoints).unwrap();
    let drop_response = failpoints.join("produce-drop-response");

    let config = |idempotence| ProducerConfig {
        linger: Duration::from_millis(1),
        batch_bytes_max: 512,
        idempotence,
        ..ProducerConfig::default()
    };
    // Idempotent (the default): the batch whose answer was lost is resent
    // and answered with its original offsets; nothing is stored twice.
    let producer = client.producer(config(true));
    let values: Vec<String> = (0..200).map(|i| format!("a{i:04}")).collect();
    std::fs::write(&drop_response, b"").unwrap();
    let acks = send_all(&producer, "t", &values).await;
    producer.close().await.unwrap();
    assert!(!drop_response.exists(), "the failpoint never fired");
    let offsets: Vec<i64> = acks.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(offsets, (0..200).collect::<Vec<i64>>());
    let stored = read_partition(&client, "t", 200).await;
    let stored_values: Vec<&String> = stored.iter().map(|(_, v)| v).collect();
    assert_eq!(stored_values, values.iter().collect::<Vec<_>>());

    // The control: without idempotence the same fault stores the resent
    // batch a second time, so the check above can fail.
    let producer = client.producer(config(false));
    let values: Vec<String> = (0..200).map(|i| format!("b{i:04}")).collect();
    std::fs::write(&drop_response, b"").unwrap();
    let acks = send_all(&producer, "t", &values).await;
    producer.close().await.unwrap();
    assert!(!drop_response.exists(), "the failpoint never fired");
    assert!(acks.iter().all(|r| r.is_ok()), "{acks:?}");
    let stored = read_partition(&client, "t", 400).await;
    assert!(
        stored.len() > 400,
        "expected a duplicate without idempotence, stored {}",
        stored.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_leader_kill_during_an_idempotent_stream_loses_and_duplicates_nothing() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 2000",
        "broker_session_timeout_ms = 2000\nbroker_heartbeat_interval_ms = 200\n",
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let configs = [("min.insync.replicas".to_string(), "2".to_string())].into();
    client.create_topic("t", 1, 3, configs).await.unwrap();
    eventually("all replicas in sync", WAIT, || async {
        let d = client.describe_topic("t").await.ok()?;
        (d.partitions[0].isr.len() == 3).then_some(())
    })
    .await;

    // A pipelined acks=all stream (many batches in flight), records
    // numbered in send order.
    let acked = Arc::new(Mutex::new(Vec::<usize>::new()));
    let failed = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = {
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        let client = Client::connect(&cluster.bootstrap()).await.unwrap();
        tokio::spawn(async move {
            let producer = client.producer(ProducerConfig {
                linger: Duration::from_millis(2),
                batch_bytes_max: 2048,
                timeout_ms: 5_000,
                request_timeout: Duration::from_secs(8),
                ..ProducerConfig::default()
            });
            let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
            let collector = tokio::spawn(async move {
                while let Some((i, ack)) = rx.recv().await {
                    let ack: runnel::client::DeliveryFuture = ack;
                    match ack.await {
                        Ok(_) => acked.lock().await.push(i),
                        Err(e) => failed.lock().await.push((i, e.to_string())),
                    }
                }
            });
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let record = ProducerRecord {
                    value: Some(format!("{i:08}").into()),
                    partition: Some(0),
                    ..ProducerRecord::default()
                };
                let ack = producer.send("t", record).await.unwrap();
                tx.send((i, ack)).await.unwrap();
                i += 1;
                if i.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            drop(tx);
            producer.close().await.unwrap();
            collector.await.unwrap();
        })
    };

    await_len(&acked, 2_000).await;
    let leader = client.describe_topic("t").await.unwrap().partitions[0].leader;
    cluster.kill(leader);
    // Acks counted from here on come from the new leader.
    eventually("a new leader", WAIT, || async {
        let p = client.describe_topic("t").await.ok()?.partitions[0].clone();
        (p.leader != leader && p.leader > 0 && !p.isr.contains(&leader)).then_some(())
    })
    .await;
    let after_kill = acked.lock().await.len();
    await_len(&acked, after_kill + 2_000).await;
    cluster.restart(leader);
    eventually("ISR back to 3", WAIT, || async {
        let d = client.describe_topic("t").await.ok()?;
        (d.partitions[0].isr.len() == 3).then_some(())
    })
    .await;
    let after_restart = acked.lock().await.len();
    await_len(&acked, after_restart + 1_000).await;
    stop.cancel();
    task.await.unwrap();

    let acked = acked.lock().await.clone();
    let failed = failed.lock().await.clone();
    let stored: Vec<usize> = read_partition(&client, "t", acked.len() as i64)
        .await
        .into_iter()
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    // Exactly once, in send order: strictly increasing.
    if let Some(w) = stored.windows(2).find(|w| w[0] >= w[1]) {
        panic!("duplicate or reordered records: {} then {}", w[0], w[1]);
    }
    let present: std::collections::HashSet<usize> = stored.iter().copied().collect();
    let lost: Vec<usize> = acked
        .iter()
        .filter(|i| !present.contains(i))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged records lost: {} of {} (first {:?}); stored {} ({:?}..{:?})",
        lost.len(),
        acked.len(),
        lost.first(),
        stored.len(),
        stored.first(),
        stored.last()
    );
    // Retries hid the failover from the application.
    assert!(failed.is_empty(), "sends failed: {failed:?}");
    assert!(acked.len() >= 5_000, "{}", acked.len());
}

/// One raw produce of `n` records with the given producer fields.
async fn raw_produce(
    producer: &mut ProducerClient<tonic::transport::Channel>,
    partition: i32,
    (producer_id, epoch, seq): (i64, i32, i32),
    n: usize,
) -> Result<pb::ProduceResponse, tonic::Status> {
    producer
        .produce(pb::ProduceRequest {
            topic: "t".into(),
            partition: Some(partition),
            records: (0..n)
                .map(|i| pb::Record {
                    value: Some(format!("{seq}+{i}").into()),
                    ..Default::default()
                })
                .collect(),
            acks: pb::Acks::All as i32,
            producer_id,
            producer_epoch: epoch,
            base_sequence: seq,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_bad_sequences_epochs_and_ids_are_refused_and_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("t", 2, 1, Default::default())
        .await
        .unwrap();
    let mut producer = ProducerClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let first = producer
        .init_producer_id(pb::InitProducerIdRequest {})
        .await
        .unwrap()
        .into_inner();
    let second = producer
        .init_producer_id(pb::InitProducerIdRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(first.producer_id > 0 && first.producer_epoch == 0);
    assert_ne!(first.producer_id, second.producer_id);
    let pid = first.producer_id;
    let end = |client: Client| async move {
        client
            .list_offsets("t", 0, pb::OffsetSpec::Latest, 0)
            .await
            .unwrap()
            .offset
    };

    let ok = raw_produce(&mut producer, 0, (pid, 0, 0), 3).await.unwrap();
    assert_eq!((ok.base_offset, ok.last_offset), (0, 2));
    let refused = |status: tonic::Status, code: pb::ErrorCode| {
        assert_eq!(error_code_of(&status), code, "{status:?}");
        assert!(!status.message().is_empty());
    };
    // A gap in the sequence.
    let gap = raw_produce(&mut producer, 0, (pid, 0, 5), 1)
        .await
        .unwrap_err();
    refused(gap, pb::ErrorCode::OutOfOrderSequence);
    // No partition named: the broker would pick one, and a retry could
    // land on another.
    let unrouted = producer
        .produce(pb::ProduceRequest {
            topic: "t".into(),
            records: vec![pb::Record {
                value: Some("x".into()),
                ..Default::default()
            }],
            producer_id: pid,
            base_sequence: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(unrouted.message().contains("partition"), "{unrouted:?}");
    refused(unrouted, pb::ErrorCode::InvalidRequest);
    // A producer id the cluster never allocated.
    let unknown = raw_produce(&mut producer, 0, (pid + 1_000_000, 0, 0), 1)
        .await
        .unwrap_err();
    refused(unknown, pb::ErrorCode::UnknownProducerId);
    // A real id this partition has no state for, not starting at 0.
    let lost = raw_produce(&mut producer, 1, (second.producer_id, 0, 7), 1)
        .await
        .unwrap_err();
    refused(lost, pb::ErrorCode::UnknownProducerId);
    assert_eq!(
        end(client.clone()).await,
        3,
        "refused batches were appended"
    );

    // A newer epoch starts over at 0 and fences the old one.
    raw_produce(&mut producer, 0, (pid, 1, 0), 2).await.unwrap();
    let stale = raw_produce(&mut producer, 0, (pid, 0, 3), 1)
        .await
        .unwrap_err();
    refused(stale, pb::ErrorCode::ProducerFenced);
    assert_eq!(end(client.clone()).await, 5);

    // The state outlives a crash (rebuilt from the log): the last batch
    // resent after it is a duplicate, answered with its original offsets.
    server.kill();
    let server = ServerProcess::start(dir.path(), &[]);
    let client = Client::connect(&server.addr).await.unwrap();
    let mut producer = ProducerClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let retry = raw_produce(&mut producer, 0, (pid, 1, 0), 2).await.unwrap();
    assert_eq!((retry.base_offset, retry.last_offset), (3, 4));
    assert_eq!(end(client.clone()).await, 5);
    let next = raw_produce(&mut producer, 0, (pid, 1, 2), 1).await.unwrap();
    assert_eq!(next.base_offset, 5);
    // Ids handed out after the restart are new.
    let third = producer
        .init_producer_id(pb::InitProducerIdRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(third.producer_id > second.producer_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_a_batch_refused_before_the_append_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start_with_toml(dir.path(), "[broker]\ngrpc_message_bytes_max = 65536\n");
    let client = Client::connect(&server.addr).await.unwrap();
    let configs = [("max.message.bytes".to_string(), "1024".to_string())];
    client
        .create_topic("t", 1, 1, configs.into_iter().collect())
        .await
        .unwrap();
    // Every record is a batch of its own, sent as soon as it is taken, so
    // the batches after a refused one are already on their way with
    // sequences past it. Two refusals: one by the partition (over the
    // topic's max.message.bytes, the stream goes on), one by the stream
    // (over the broker's gRPC limit: the stream ends after answering it).
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 1,
        linger: Duration::ZERO,
        delivery_timeout: Duration::from_secs(20),
        ..ProducerConfig::default()
    });
    let too_large_for_topic = 10;
    let too_large_for_grpc = 30;
    let mut acks = Vec::new();
    for i in 0..50 {
        let value = match i {
            _ if i == too_large_for_topic => vec![b'x'; 2000],
            _ if i == too_large_for_grpc => vec![b'y'; 100_000],
            _ => format!("v{i:02}").into_bytes(),
        };
        let record = ProducerRecord {
            value: Some(value.into()),
            partition: Some(0),
            ..ProducerRecord::default()
        };
        acks.push(producer.send("t", record).await.unwrap());
    }
    let mut stored_offsets = Vec::new();
    for (i, ack) in acks.into_iter().enumerate() {
        match ack.await {
            Ok(m) => {
                assert!(
                    i != too_large_for_topic && i != too_large_for_grpc,
                    "record {i} stored"
                );
                stored_offsets.push(m.offset);
            }
            Err(e) => {
                assert!(
                    i == too_large_for_topic || i == too_large_for_grpc,
                    "record {i} failed: {e}"
                );
                assert_eq!(e.code(), pb::ErrorCode::RecordTooLarge, "record {i}: {e}");
                let setting = if i == too_large_for_topic {
                    "max.message.bytes"
                } else {
                    "broker.grpc_message_bytes_max"
                };
                assert!(e.to_string().contains(setting), "record {i}: {e}");
            }
        }
    }
    producer.close().await.unwrap();
    assert_eq!(stored_offsets, (0..48).collect::<Vec<i64>>());
    let stored = read_partition(&client, "t", 48).await;
    let expected: Vec<String> = (0..50)
        .filter(|&i| i != too_large_for_topic && i != too_large_for_grpc)
        .map(|i| format!("v{i:02}"))
        .collect();
    let stored_values: Vec<String> = stored.into_iter().map(|(_, v)| v).collect();
    assert_eq!(stored_values, expected);

    // The CLI reports the refusal and exits non-zero.
    let line = format!("{}\n", "z".repeat(100_000));
    let err = common::cli_err(&server.addr, &["produce", "t"], Some(line.as_bytes()));
    assert!(err.contains("grpc_message_bytes_max"), "{err}");
}

/// A batch whose answer was lost after it was stored, and whose resend is
/// then refused before the append (here: the topic's max.message.bytes
/// was lowered in between), may be stored: its sequence is not given
/// back. The batch after it is stored once, at its own offset (it used
/// to be renumbered into the stored batch's sequence, answered as its
/// duplicate with that batch's offset, and lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_resend_refused_before_the_append_keeps_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let server = failpoint_node(dir.path());
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("r", 1, 1, Default::default())
        .await
        .unwrap();
    let failpoints = server.data_dir.join("failpoints");
    std::fs::create_dir_all(&failpoints).unwrap();
    let drop_response = failpoints.join("produce-drop-response");
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 1,
        linger: Duration::ZERO,
        // Room to lower the limit before the resend: the alter returns
        // once this node's log has the new limit, in well under this.
        retry_backoff: Duration::from_secs(10),
        delivery_timeout: Duration::from_secs(30),
        ..ProducerConfig::default()
    });
    std::fs::write(&drop_response, b"").unwrap();
    let send = |v: Vec<u8>| ProducerRecord {
        value: Some(v.into()),
        partition: Some(0),
        ..ProducerRecord::default()
    };
    let big = producer.send("r", send(vec![b'b'; 600])).await.unwrap();
    let next = producer.send("r", send(b"next".to_vec())).await.unwrap();
    eventually("the failpoint to fire", WAIT, || async {
        (!drop_response.exists()).then_some(())
    })
    .await;
    let limit = [("max.message.bytes".to_string(), "300".to_string())];
    client
        .alter_topic_config("r", limit.into_iter().collect(), Vec::new())
        .await
        .unwrap();
    let big = big.await;
    let next = next.await.unwrap();
    producer.close().await.unwrap();
    // The big batch was stored at 0 (its answer lost), and its resend
    // refused; the next record is at 1.
    let e = big.expect_err("the resend was answered: the limit came too late to test anything");
    assert_eq!(e.code(), pb::ErrorCode::RecordTooLarge, "{e}");
    assert_eq!(next.offset, 1);
    let stored = read_partition(&client, "r", 2).await;
    let values: Vec<&str> = stored.iter().map(|(_, v)| &v[..v.len().min(4)]).collect();
    assert_eq!(values, ["bbbb", "next"]);
}

/// A batch refused with NOT_ENOUGH_REPLICAS (before anything is written)
/// until its delivery timeout passed fails alone: its sequence is given
/// back, and a younger batch still in time is stored once the ISR is back.
/// The refusals used to mark every sent batch as maybe stored, so the
/// expired one broke the sequence and the younger one failed with
/// OUT_OF_ORDER_SEQUENCE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t07_a_batch_expired_while_the_isr_was_short_fails_alone() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 2000",
        "broker_session_timeout_ms = 30000\nbroker_heartbeat_interval_ms = 500\n",
    );
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let configs = [("min.insync.replicas".to_string(), "3".to_string())].into();
    client.create_topic("t", 1, 3, configs).await.unwrap();
    let p = eventually("all replicas in sync", WAIT, || async {
        let d = client.describe_topic("t").await.ok()?;
        let p = d.partitions.into_iter().next()?;
        (p.leader > 0 && p.isr.len() == 3).then_some(p)
    })
    .await;
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 1,
        linger: Duration::ZERO,
        delivery_timeout: Duration::from_secs(8),
        ..ProducerConfig::default()
    });
    for ack in send_all(&producer, "t", &["a".to_string()]).await {
        ack.unwrap();
    }
    // A follower other than the active controller stops: the ISR shrinks
    // below min.insync.replicas.
    let controller = client.describe_cluster().await.unwrap().controller_id;
    let paused = *p
        .replicas
        .iter()
        .find(|r| **r != p.leader && **r != controller)
        .unwrap();
    cluster.node(paused).signal("STOP");
    eventually("the ISR to shrink", WAIT, || async {
        let d = client.describe_topic("t").await.ok()?;
        (d.partitions[0].isr.len() == 2).then_some(())
    })
    .await;
    let send = |v: &str| {
        producer.send(
            "t",
            ProducerRecord {
                value: Some(v.to_string().into()),
                partition: Some(0),
                ..ProducerRecord::default()
            },
        )
    };
    let old = send("old").await.unwrap();
    // Most of its delivery timeout later, a younger batch: it has as long
    // (6 s) for the follower to resume and rejoin the ISR once the old one
    // failed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let young = send("young").await.unwrap();
    let e = old.await.expect_err("stored with the ISR short");
    assert_eq!(e.code(), pb::ErrorCode::NotEnoughReplicas, "{e}");
    cluster.node(paused).signal("CONT");
    let young = young.await.expect("the younger batch, still in time");
    producer.close().await.unwrap();
    assert_eq!(young.offset, 1);
    let stored: Vec<String> = read_partition(&client, "t", 2)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(stored, ["a", "young"]);
}

/// A single node in `dir` with topic `t` of one partition, and a client.
async fn one_node_with_topic_t(dir: &std::path::Path) -> (ServerProcess, Client) {
    let server = ServerProcess::start(dir, &[]);
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("t", 1, 1, Default::default())
        .await
        .unwrap();
    (server, client)
}

/// Duration::MAX and usize::MAX in a producer's settings mean "no limit":
/// they are capped, and records are delivered. Linger and the request
/// timeout overflowed an Instant (a panic in `send`, or in the partition's
/// sender task), and a batch size past u32::MAX panicked at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_producer_settings_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = one_node_with_topic_t(dir.path()).await;
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        request_timeout: Duration::MAX,
        delivery_timeout: Duration::MAX,
        retry_backoff: Duration::MAX,
        buffer_bytes_max: usize::MAX,
        ..ProducerConfig::default()
    });
    let acks = send_all(&producer, "t", &["a".to_string(), "b".to_string()]).await;
    for ack in acks {
        ack.unwrap();
    }
    producer.close().await.unwrap();
    let lingering = client.producer(ProducerConfig {
        linger: Duration::MAX,
        batch_bytes_max: usize::MAX,
        ..ProducerConfig::default()
    });
    let ack = lingering
        .send("t", ProducerRecord::value("c"))
        .await
        .unwrap();
    // Sent by the flush, not by a linger that never ends.
    lingering.flush().await.unwrap();
    assert_eq!(ack.await.unwrap().offset, 2);
    lingering.close().await.unwrap();
}

/// A `send` dropped before it returned (by a select! or a timeout) sent
/// nothing, so sending the record again stores it once. It used to yield
/// after queuing the record when its batch was full, and a call dropped
/// there sent a record whose DeliveryFuture its caller never got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_dropped_before_it_returned_sent_nothing() {
    use futures_util::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = one_node_with_topic_t(dir.path()).await;
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 1,
        linger: Duration::ZERO,
        ..ProducerConfig::default()
    });
    let record = |v: &str| ProducerRecord {
        value: Some(v.to_string().into()),
        partition: Some(0),
        ..ProducerRecord::default()
    };
    // The topic known, a producer id taken, a full batch handed over.
    let warm = producer.send("t", record("warm")).await.unwrap();
    let mut dropped = 0;
    for i in 0..20 {
        // Polled once, and dropped if it did not return.
        match producer.send("t", record(&format!("r{i}"))).now_or_never() {
            Some(sent) => {
                sent.unwrap().await.unwrap();
            }
            None => dropped += 1,
        }
    }
    warm.await.unwrap();
    producer.flush().await.unwrap();
    producer.close().await.unwrap();
    assert!(dropped > 0, "every send returned at its first poll");
    let end = client
        .list_offsets("t", 0, pb::OffsetSpec::Latest, 0)
        .await
        .unwrap()
        .offset;
    assert_eq!(end, 1 + 20 - dropped, "{dropped} dropped");
}
