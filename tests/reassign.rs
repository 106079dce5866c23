//! `runnel partition reassign` on a three-node cluster: a partition moves
//! off its leader onto a fresh broker while an idempotent acks=all
//! producer keeps writing; the new replica copies the log from the start,
//! leadership moves, the old replica deletes its copy, and no
//! acknowledged record is lost or duplicated. Bad reassignments are
//! refused with clear errors and change nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{await_len, cli_err, cli_ok, eventually, log_bytes, Cluster};
use runnel::client::{Client, ProducerConfig, ProducerRecord, StartFrom};
use runnel_proto::v1 as pb;
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(60);

async fn partition(client: &Client, topic: &str) -> Option<pb::PartitionDescription> {
    client
        .describe_topic(topic)
        .await
        .ok()?
        .partitions
        .into_iter()
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moves_to_new_replicas_under_load() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 3000",
        "broker_session_timeout_ms = 3000\nbroker_heartbeat_interval_ms = 200\n",
    );
    let addr = cluster.addrs[0].clone();
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("m", 1, 2, Default::default())
        .await
        .unwrap();
    let before = eventually("both replicas in sync", WAIT, || async {
        let p = partition(&client, "m").await?;
        (p.isr.len() == 2 && p.leader > 0).then_some(p)
    })
    .await;
    let old: Vec<i32> = before.replicas.clone();
    let fresh = (1..=3).find(|id| !old.contains(id)).unwrap();
    let stays = *old.iter().find(|r| **r != before.leader).unwrap();

    // Bad input is refused and changes nothing.
    let err = cli_err(
        &addr,
        &["partition", "reassign", "--topic", "m", "--assign", "0=9"],
        None,
    );
    assert!(err.contains("broker 9 is not registered"), "{err}");
    let err = cli_err(
        &addr,
        &["partition", "reassign", "--topic", "m", "--assign", "3=1"],
        None,
    );
    assert!(err.contains("no such partition"), "{err}");
    let err = cli_err(
        &addr,
        &["partition", "reassign", "--topic", "m", "--assign", "0=1,1"],
        None,
    );
    assert!(err.contains("repeat"), "{err}");
    let err = cli_err(
        &addr,
        &[
            "partition",
            "reassign",
            "--topic",
            "nope",
            "--assign",
            "0=1",
        ],
        None,
    );
    assert!(err.contains("nope"), "{err}");
    assert_eq!(partition(&client, "m").await.unwrap().replicas, old);

    // A producer writes throughout.
    let acked = Arc::new(Mutex::new(Vec::<usize>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let client = Client::connect(&cluster.bootstrap()).await.unwrap();
        tokio::spawn(async move {
            let producer = client.producer(ProducerConfig {
                linger: Duration::from_millis(2),
                batch_bytes_max: 4096,
                timeout_ms: 5_000,
                ..ProducerConfig::default()
            });
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let mut acks = Vec::new();
                for _ in 0..100 {
                    let record = ProducerRecord::value(format!("{i:08}"));
                    acks.push((i, producer.send("m", record).await.unwrap()));
                    i += 1;
                }
                for (i, ack) in acks {
                    ack.await.expect("idempotent retries hide the move");
                    acked.lock().await.push(i);
                }
            }
            producer.close().await.unwrap();
        })
    };
    await_len(&acked, 2_000).await;

    // Move the partition off its leader onto the fresh broker, which
    // becomes the preferred leader.
    let target = format!("0={fresh},{stays}");
    let out = cli_ok(
        &addr,
        &["partition", "reassign", "--topic", "m", "--assign", &target],
        None,
    );
    assert!(out.contains("reassignment submitted"), "{out}");
    let done = eventually("the reassignment to complete", WAIT, || async {
        let p = partition(&client, "m").await?;
        (p.replicas == vec![fresh, stays]
            && p.adding_replicas.is_empty()
            && p.removing_replicas.is_empty()
            && p.isr.len() == 2)
            .then_some(p)
    })
    .await;
    assert!(done.leader == fresh || done.leader == stays, "{done:?}");
    // The old leader's copy is deleted.
    let old_dir = cluster.data_dir(before.leader).join("m-0");
    eventually("the removed replica to delete its log", WAIT, || async {
        (!old_dir.exists()).then_some(())
    })
    .await;
    let after_move = acked.lock().await.len();
    await_len(&acked, after_move + 1_000).await;
    stop.cancel();
    task.await.unwrap();

    // The new replica holds the same bytes as the one that stayed,
    // including everything written before it existed.
    let fresh_dir = cluster.data_dir(fresh).join("m-0");
    let stays_dir = cluster.data_dir(stays).join("m-0");
    eventually("byte-identical replicas", WAIT, || async {
        let (a, b) = (log_bytes(&fresh_dir), log_bytes(&stays_dir));
        (a == b && !a.is_empty()).then_some(())
    })
    .await;

    // Every acknowledged record exactly once, in order.
    let acked = acked.lock().await.clone();
    let values: Vec<usize> = eventually("a full read", WAIT, || async {
        let mut c = client
            .partition_consumer("m", 0, StartFrom::Earliest)
            .await
            .ok()?;
        let end = c.high_watermark();
        if end < acked.len() as i64 {
            return None;
        }
        let mut out = Vec::new();
        while c.position() < end {
            for r in c.poll().await.ok()? {
                out.push(std::str::from_utf8(&r.value?).ok()?.parse().ok()?);
            }
        }
        Some(out)
    })
    .await;
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "duplicates or reordering"
    );
    let present: std::collections::HashSet<usize> = values.iter().copied().collect();
    assert!(
        acked.iter().all(|i| present.contains(i)),
        "acked records lost"
    );
}

/// A replica added after DeleteRecords cut the log between two records
/// of one batch starts at the leader's log start, inside that batch; the
/// leader serves the whole batch. The new replica starts over at the
/// batch and joins the ISR (it refused the batch as non-contiguous, for
/// good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_of_a_log_starting_inside_a_batch_catches_up() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(3, base.path(), "", "");
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    client
        .create_topic("mid", 1, 1, Default::default())
        .await
        .unwrap();
    let before = eventually("a leader", WAIT, || async {
        let p = partition(&client, "mid").await?;
        (p.leader > 0).then_some(p)
    })
    .await;
    // Ten records in one batch: offsets 0..=9.
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_secs(60),
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..10 {
        acks.push(
            producer
                .send("mid", ProducerRecord::value(format!("v{i}")))
                .await
                .unwrap(),
        );
    }
    producer.flush().await.unwrap();
    for a in acks {
        a.await.unwrap();
    }
    client
        .delete_records("mid", 0, 5, Duration::ZERO)
        .await
        .unwrap();
    let fresh = (1..=3).find(|id| *id != before.leader).unwrap();
    client
        .reassign_partitions("mid", vec![(0, vec![before.leader, fresh])])
        .await
        .unwrap();
    eventually("the new replica in the ISR", WAIT, || async {
        let p = partition(&client, "mid").await?;
        (p.isr.contains(&fresh) && p.replicas.len() == 2).then_some(())
    })
    .await;
    let consumer = client
        .partition_consumer("mid", 0, StartFrom::Earliest)
        .await
        .unwrap();
    assert_eq!(consumer.position(), 5);
}
