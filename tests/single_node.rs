//! End to end on one real `runnel server` process: the CLI and the client
//! library produce 10,000 records each, both read them back with content,
//! order and offsets checked, and everything is read again after the
//! server is killed and restarted.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{cli, cli_ok, ServerProcess};
use runnel::client::{Client, ProducerConfig, ProducerRecord, StartFrom};
use runnel::partitioner::partition_for_key;

const RECORDS: usize = 10_000;
const PARTITIONS: i32 = 3;
const KEYS: usize = 50;

/// Sends one record per value to `topic` (partitioned as the producer
/// chooses) and returns their delivery futures, in send order.
async fn send_values(
    producer: &runnel::client::Producer,
    topic: &str,
    values: impl IntoIterator<Item = String>,
) -> Vec<runnel::client::DeliveryFuture> {
    let mut acks = Vec::new();
    for value in values {
        acks.push(
            producer
                .send(topic, ProducerRecord::value(value))
                .await
                .unwrap(),
        );
    }
    acks
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    partition: i32,
    offset: i64,
    key: Option<String>,
    value: String,
}

/// Reads every record of `topic` with the CLI, as JSON lines.
fn consume_cli(addr: &str, topic: &str) -> Vec<Seen> {
    let out = cli_ok(
        addr,
        &["--output", "json", "consume", topic, "--from", "earliest"],
        None,
    );
    out.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            Seen {
                partition: v["partition"].as_i64().unwrap() as i32,
                offset: v["offset"].as_i64().unwrap(),
                key: v["key"].as_str().map(str::to_string),
                value: v["value"].as_str().unwrap().to_string(),
            }
        })
        .collect()
}

/// Reads every record of `topic` with the client library, streaming each
/// partition (`Subscribe`) or polling it with fetches.
async fn consume_lib(client: &Client, topic: &str, streaming: bool) -> Vec<Seen> {
    let mut all = Vec::new();
    for partition in 0..PARTITIONS {
        let mut c = client
            .partition_consumer(topic, partition, StartFrom::Earliest)
            .await
            .unwrap();
        c.streaming = streaming;
        // Small chunks: many answers per partition.
        c.max_bytes = 16 * 1024;
        let end = c.high_watermark();
        while c.position() < end {
            for r in c.poll().await.unwrap() {
                all.push(Seen {
                    partition,
                    offset: r.offset,
                    key: r.key.map(|k| String::from_utf8(k.to_vec()).unwrap()),
                    value: String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
                });
            }
        }
    }
    all
}

/// Checks that `seen` holds exactly `sent` (value i with key i % KEYS, in
/// send order per key), each partition's offsets run 0, 1, 2, ... and each
/// key sits on its murmur2 partition.
fn check(seen: &[Seen], prefix: &str) {
    assert_eq!(seen.len(), RECORDS, "{prefix}: record count");
    let mut by_partition: BTreeMap<i32, Vec<&Seen>> = BTreeMap::new();
    for s in seen {
        by_partition.entry(s.partition).or_default().push(s);
    }
    for (p, records) in &by_partition {
        let offsets: Vec<i64> = records.iter().map(|s| s.offset).collect();
        let expected: Vec<i64> = (0..records.len() as i64).collect();
        assert_eq!(offsets, expected, "{prefix}: partition {p} offsets");
    }
    let mut next_per_key: BTreeMap<String, usize> = BTreeMap::new();
    let mut values = std::collections::BTreeSet::new();
    for p in by_partition.values() {
        for s in p {
            let key = s.key.clone().expect("every record has a key");
            assert_eq!(
                s.partition,
                partition_for_key(key.as_bytes(), PARTITIONS),
                "{prefix}: key {key} on the wrong partition"
            );
            let i: usize = s
                .value
                .strip_prefix(&format!("{prefix}-"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected value {}", s.value));
            assert_eq!(key, format!("k{}", i % KEYS), "{prefix}: key/value pairing");
            // Per key, values arrive in send order.
            let next = next_per_key.entry(key).or_insert(0);
            assert!(i >= *next, "{prefix}: value {i} out of order");
            *next = i + 1;
            values.insert(i);
        }
    }
    assert_eq!(values.len(), RECORDS, "{prefix}: duplicates or gaps");
}

/// A fresh single node with a one-partition topic `name`. Bind the result
/// as `let (_dir, client, _server)`: locals drop in reverse order, so the
/// server stops before its directory is removed.
async fn with_topic(name: &str) -> (tempfile::TempDir, Client, ServerProcess) {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic(name, 1, 1, BTreeMap::new())
        .await
        .unwrap();
    (dir, client, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_library_round_trip_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let addr = server.addr.clone();

    let out = cli_ok(
        &addr,
        &[
            "topic",
            "create",
            "cli-topic",
            "--partitions",
            "3",
            "--replication-factor",
            "1",
        ],
        None,
    );
    assert!(out.contains("created topic cli-topic"), "{out}");
    cli_ok(
        &addr,
        &["topic", "create", "lib-topic", "--partitions", "3"],
        None,
    );

    // 10,000 keyed records through the CLI.
    let input: String = (0..RECORDS)
        .map(|i| format!("k{}:cli-{i}\n", i % KEYS))
        .collect();
    cli_ok(
        &addr,
        &["produce", "cli-topic", "--key-separator", ":"],
        Some(input.as_bytes()),
    );

    // 10,000 keyed records through the library.
    let client = Client::connect(&addr).await.unwrap();
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..RECORDS {
        let record = ProducerRecord::keyed(format!("k{}", i % KEYS), format!("lib-{i}"));
        acks.push(producer.send("lib-topic", record).await.unwrap());
    }
    producer.close().await.unwrap();
    let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for ack in acks {
        let m = ack.await.unwrap();
        per_partition.entry(m.partition).or_default().push(m.offset);
    }
    for (p, offsets) in &per_partition {
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, &expected, "acked offsets of partition {p}");
    }

    for topic in ["cli-topic", "lib-topic"] {
        let prefix = topic.trim_end_matches("-topic");
        let via_cli = consume_cli(&addr, topic);
        check(&via_cli, prefix);
        let via_lib = consume_lib(&client, topic, true).await;
        check(&via_lib, prefix);
        assert_eq!(
            consume_lib(&client, topic, false).await,
            via_lib,
            "streamed and fetched reads disagree on {topic}"
        );
        let mut a = via_cli.clone();
        let mut b = via_lib.clone();
        a.sort_by_key(|s| (s.partition, s.offset));
        b.sort_by_key(|s| (s.partition, s.offset));
        assert_eq!(a, b, "CLI and library disagree on {topic}");
    }
    let mut before: Vec<Seen> = consume_cli(&addr, "lib-topic");
    // Partitions interleave in arrival order; compare in log order.
    before.sort_by_key(|s| (s.partition, s.offset));

    // A crash (SIGKILL), then a restart on the same data directory.
    drop(client);
    server.kill();
    let server = ServerProcess::start(dir.path(), &[]);
    let addr = server.addr.clone();
    let mut after = consume_cli(&addr, "lib-topic");
    after.sort_by_key(|s| (s.partition, s.offset));
    assert_eq!(before, after, "records changed across the restart");
    check(&consume_cli(&addr, "cli-topic"), "cli");

    // New records continue the offsets.
    let client = Client::connect(&addr).await.unwrap();
    let producer = client.producer(ProducerConfig::default());
    let ack = producer
        .send(
            "lib-topic",
            ProducerRecord {
                partition: Some(0),
                ..ProducerRecord::value("after")
            },
        )
        .await
        .unwrap();
    producer.close().await.unwrap();
    let m = ack.await.unwrap();
    assert_eq!(m.offset, per_partition[&0].len() as i64);

    // A graceful stop exits cleanly.
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_from_offset_time_and_max_records() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let addr = server.addr.clone();
    cli_ok(&addr, &["topic", "create", "t", "--partitions", "1"], None);
    cli_ok(&addr, &["topic", "create", "b", "--partitions", "1"], None);
    let input: String = (0..100).map(|i| format!("v{i}\n")).collect();
    cli_ok(&addr, &["produce", "t"], Some(input.as_bytes()));

    let out = cli_ok(&addr, &["consume", "t", "--from", "90"], None);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        (90..100).map(|i| format!("v{i}")).collect::<Vec<_>>()
    );

    let out = cli_ok(&addr, &["consume", "t", "--max-records", "3"], None);
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["v0", "v1", "v2"]);

    // With --output json, produce reports on stdout; consume gives bytes
    // that are not UTF-8 whole, in base64, beside the lossy string.
    let produced = cli_ok(
        &addr,
        &["--output", "json", "produce", "b"],
        Some(b"\xff\xfe\n"),
    );
    let v: serde_json::Value = serde_json::from_str(produced.trim()).unwrap();
    assert_eq!(v["produced"], 1, "{produced}");
    let out = cli_ok(
        &addr,
        &["--output", "json", "consume", "b", "--from", "earliest"],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["value_base64"], "//4=", "{out}");
    assert!(v.get("key_base64").is_none(), "{out}");

    // An offset past the end reads nothing, and says so.
    let past = cli(&addr, &["consume", "t", "--from", "150"], None);
    assert!(past.status.success());
    assert!(past.stdout.is_empty());
    let said = String::from_utf8_lossy(&past.stderr);
    assert!(
        said.contains("past the end") && said.contains("high watermark 100"),
        "{said}"
    );

    // Every record was stamped before now, so a time in the future yields
    // nothing and a time in the past yields everything.
    let out = cli_ok(
        &addr,
        &["consume", "t", "--from", "2999-01-01T00:00:00Z"],
        None,
    );
    assert_eq!(out, "");
    let out = cli_ok(
        &addr,
        &["consume", "t", "--from", "2000-01-01T00:00:00Z"],
        None,
    );
    assert_eq!(out.lines().count(), 100);

    let out = cli_ok(&addr, &["consume", "t", "--from", "latest"], None);
    assert_eq!(out, "");

    // describe shows the offsets.
    let out = cli_ok(&addr, &["--output", "json", "topic", "describe", "t"], None);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["partitions"][0]["high_watermark"], 100);
    assert_eq!(v["partitions"][0]["log_end_offset"], 100);
    assert_eq!(v["partitions"][0]["leader"], 1);

    let out = cli_ok(&addr, &["cluster", "describe"], None);
    assert!(out.contains(&addr), "{out}");
    let out = cli_ok(&addr, &["--output", "json", "cluster", "describe"], None);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["controller_id"], 1);
    assert_eq!(v["quorum"]["voters"], serde_json::json!([1]));
    assert!(v["quorum"]["applied_index"].as_u64().unwrap() >= 3, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_batches_never_exceed_the_broker_limit() {
    // A batch target equal to max.message.bytes must not produce batches
    // the broker refuses: a full batch leaves before the next record joins.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic(
            "big",
            1,
            1,
            BTreeMap::from([("max.message.bytes".to_string(), "65536".to_string())]),
        )
        .await
        .unwrap();
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 65_536,
        linger: std::time::Duration::from_millis(50),
        ..ProducerConfig::default()
    });
    let acks = send_values(
        &producer,
        "big",
        (0..500).map(|i| format!("{i:04}{}", "x".repeat(1020))),
    )
    .await;
    producer.close().await.unwrap();
    for (i, ack) in acks.into_iter().enumerate() {
        assert_eq!(ack.await.unwrap().offset, i as i64);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn producer_acknowledges_every_record_of_a_long_burst() {
    // Thousands of sends in a row on one thread without a cooperative
    // yield: full batches pile up for the partition's sender while the
    // caller keeps sending, and none may be dropped or reordered.
    let (_dir, client, _server) = with_topic("burst").await;
    client.partition_count("burst").await.unwrap();
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 4096,
        ..ProducerConfig::default()
    });
    let acks = tokio::task::unconstrained(async {
        let mut acks = Vec::new();
        for i in 0..3000 {
            let record = ProducerRecord::value(format!("{i:05}"));
            acks.push(producer.send("burst", record).await.unwrap());
        }
        acks
    })
    .await;
    producer.close().await.unwrap();
    for (i, ack) in acks.into_iter().enumerate() {
        assert_eq!(ack.await.unwrap().offset, i as i64);
    }
    let mut c = client
        .partition_consumer("burst", 0, StartFrom::Earliest)
        .await
        .unwrap();
    let mut values = Vec::new();
    while c.position() < c.high_watermark() {
        for r in c.poll().await.unwrap() {
            values.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
        }
    }
    let expected: Vec<String> = (0..3000).map(|i| format!("{i:05}")).collect();
    assert_eq!(values, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_send_waits_while_its_buffer_is_full() {
    // Three 1 KiB records fill a 4 KiB buffer without filling a batch; the
    // fourth send must wait until the batch is answered and its bytes are
    // returned to the buffer (here: by a flush), then go through.
    use futures_util::FutureExt;
    let (_dir, client, _server) = with_topic("buffer").await;
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 4096,
        buffer_bytes_max: 4096,
        linger: std::time::Duration::from_secs(3600),
        ..ProducerConfig::default()
    });
    let record = || ProducerRecord::value(vec![b'b'; 1000]);
    let mut acks = Vec::new();
    for _ in 0..3 {
        acks.push(producer.send("buffer", record()).await.unwrap());
    }
    let mut fourth = Box::pin(producer.send("buffer", record()));
    assert!(
        (&mut fourth).now_or_never().is_none(),
        "a send past the buffer must wait"
    );
    let (flushed, fourth) = tokio::join!(producer.flush(), fourth);
    flushed.unwrap();
    acks.push(fourth.unwrap());
    producer.close().await.unwrap();
    for (i, ack) in acks.into_iter().enumerate() {
        assert_eq!(ack.await.unwrap().offset, i as i64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_seek_discards_what_was_read_ahead() {
    // After a poll the consumer already has the next answer on its way (a
    // prefetched fetch, or the subscription's next chunk); a seek must make
    // the next poll start at the new position instead.
    let (_dir, client, _server) = with_topic("seek").await;
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 1024,
        ..ProducerConfig::default()
    });
    let acks = send_values(&producer, "seek", (0..300).map(|i| format!("{i:04}"))).await;
    producer.close().await.unwrap();
    for ack in acks {
        ack.await.unwrap();
    }
    for streaming in [true, false] {
        let mut c = client
            .partition_consumer("seek", 0, StartFrom::Earliest)
            .await
            .unwrap();
        c.streaming = streaming;
        c.max_bytes = 1024;
        let first = c.poll().await.unwrap();
        assert_eq!(first[0].offset, 0);
        let after = first.last().unwrap().offset + 1;
        assert!(after < 300, "one small fetch must not hold everything");
        let next = c.poll().await.unwrap();
        assert_eq!(
            next[0].offset, after,
            "the answer read ahead continues in order (streaming {streaming})"
        );
        for target in [0i64, 150, 7] {
            c.seek(target);
            let records = c.poll().await.unwrap();
            assert_eq!(records[0].offset, target, "streaming {streaming}");
            assert_eq!(
                records[0].value.as_deref(),
                Some(format!("{target:04}").as_bytes())
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_dropped_while_its_subscription_opens_keeps_the_open() {
    // The group consumer drops the polls of its other partitions once one
    // has records; an open cut short each time would never finish while a
    // busy partition keeps answering at once.
    let (_dir, client, _server) = with_topic("drop").await;
    let producer = client.producer(ProducerConfig::default());
    let acks = send_values(&producer, "drop", (0..10).map(|i| format!("{i}"))).await;
    producer.close().await.unwrap();
    for ack in acks {
        ack.await.unwrap();
    }
    for (streaming, in_flight) in [(true, "subscribed: true"), (false, "fetching: true")] {
        let mut c = client
            .partition_consumer("drop", 0, StartFrom::Earliest)
            .await
            .unwrap();
        c.streaming = streaming;
        assert!(!format!("{c:?}").contains(in_flight), "{c:?}");
        // Polled exactly once (the open or fetch starts: it needs a round
        // trip), then dropped.
        let pending = {
            let mut poll = std::pin::pin!(c.poll());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::future::Future::poll(poll.as_mut(), &mut cx).is_pending()
        };
        assert!(pending, "the call cannot have finished in one poll");
        assert!(format!("{c:?}").contains(in_flight), "{c:?}");
        let records = c.poll().await.unwrap();
        assert_eq!(records.first().map(|r| r.offset), Some(0));
        assert_eq!(c.position(), 10);
    }
}

/// A broker with topic `wide`: `partitions` partitions holding
/// `per_partition` records of 1,000 bytes each.
async fn wide_topic(
    partitions: i32,
    per_partition: i32,
) -> (tempfile::TempDir, ServerProcess, Client) {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("wide", partitions, 1, BTreeMap::new())
        .await
        .unwrap();
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..partitions * per_partition {
        let mut r = ProducerRecord::value(vec![b'x'; 1000]);
        r.partition = Some(i % partitions);
        acks.push(producer.send("wide", r).await.unwrap());
    }
    producer.close().await.unwrap();
    for ack in acks {
        ack.await.unwrap();
    }
    (dir, server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_not_polled_do_not_block_other_calls() {
    // Twelve partitions of 4 MiB, each consumer polled once and then left
    // alone: their read-ahead must not hold the connection's 32 MiB
    // flow-control window, or every other call to the broker waits.
    // (Subscriptions, streaming on, do hold it: their readers must keep
    // polling, as `consume` and `perf consume` do.)
    let (_dir, _server, client) = wide_topic(12, 4_000).await;
    let mut idle = Vec::new();
    for partition in 0..12 {
        let mut c = client
            .partition_consumer("wide", partition, StartFrom::Earliest)
            .await
            .unwrap();
        assert!(!c.poll().await.unwrap().is_empty());
        idle.push(c);
    }
    for partition in 0..12 {
        let lookup = client.partition_consumer("wide", partition, StartFrom::Latest);
        let c = tokio::time::timeout(std::time::Duration::from_secs(20), lookup)
            .await
            .expect("an offset lookup waited behind unread answers")
            .unwrap();
        assert_eq!(c.high_watermark(), 4_000);
    }
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_holds_up_only_its_own_connection() {
    // A client whose streaming consumers stop reading leaves their chunks
    // in the broker, waiting for a flow-control window that does not
    // open. Forty of them used to take the whole broker-wide subscription
    // budget (64 MiB), and every other client's subscriptions waited; one
    // connection now holds at most a quarter of it.
    let (_dir, server, stalled) = wide_topic(40, 3_000).await;
    // Every consumer is created first: once the connection's 32 MiB
    // window is full, no other call on it is answered. Then each
    // subscription is opened by one poll, driven by hand and dropped (a
    // poll is cancel-safe: the open goes on), and never read again, so
    // its chunks end up waiting in the broker.
    let mut idle = Vec::new();
    for partition in 0..40 {
        let mut c = stalled
            .partition_consumer("wide", partition, StartFrom::Earliest)
            .await
            .unwrap();
        c.streaming = true;
        idle.push(c);
    }
    for c in &mut idle {
        let _ = futures_util::FutureExt::now_or_never(c.poll());
    }
    // Another client, on its own connection, reads a whole partition.
    let other = Client::connect(&server.addr).await.unwrap();
    let mut c = other
        .partition_consumer("wide", 39, StartFrom::Earliest)
        .await
        .unwrap();
    c.streaming = true;
    // (A starved subscription still answers empty polls: the bound is on
    // the whole read.)
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while c.position() < 3_000 {
            c.poll().await.unwrap();
        }
    })
    .await
    .expect("a subscription waited for another connection's stalled ones");
    assert_eq!(c.position(), 3_000);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_subscription_waits_and_then_delivers_new_records() {
    // A streaming consumer at the end of the log gets an empty poll after
    // its wait, keeps its subscription open (the broker re-polls the log
    // every second), and receives what is produced later, in order.
    let (_dir, client, _server) = with_topic("tail").await;
    let producer = client.producer(ProducerConfig::default());
    let first = send_values(&producer, "tail", ["a".to_string()]).await;
    producer.flush().await.unwrap();
    for ack in first {
        ack.await.unwrap();
    }
    let mut c = client
        .partition_consumer("tail", 0, StartFrom::Earliest)
        .await
        .unwrap();
    c.streaming = true;
    c.max_wait_ms = 50;
    let got = c.poll().await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(c.position(), 1);
    // Longer than the broker's one-second re-poll of an idle subscription.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1_500);
    let mut empty = 0;
    while std::time::Instant::now() < deadline {
        let polled = std::time::Instant::now();
        assert!(c.poll().await.unwrap().is_empty(), "nothing was produced");
        // A lower bound only: a busy machine makes the wait longer.
        assert!(
            polled.elapsed() >= std::time::Duration::from_millis(25),
            "an empty poll returned after {:?}, not waiting max_wait_ms",
            polled.elapsed()
        );
        empty += 1;
    }
    assert!(empty >= 2, "{empty} empty polls");
    assert!(format!("{c:?}").contains("subscribed: true"), "{c:?}");
    let later = send_values(&producer, "tail", (0..50).map(|i| format!("later {i}"))).await;
    producer.flush().await.unwrap();
    for ack in later {
        ack.await.unwrap();
    }
    let mut values = Vec::new();
    while values.len() < 50 {
        for r in c.poll().await.unwrap() {
            assert_eq!(r.offset, 1 + values.len() as i64);
            values.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
        }
    }
    assert_eq!(values[49], "later 49");
    assert_eq!(c.high_watermark(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_producer_still_sends_what_it_holds() {
    // Records still in an open batch when the producer is dropped (no
    // flush, no close, a linger far away) are sent, and their futures
    // resolve with their offsets.
    let (_dir, client, _server) = with_topic("drop").await;
    let producer = client.producer(ProducerConfig {
        linger: std::time::Duration::from_secs(3600),
        ..ProducerConfig::default()
    });
    let acks = send_values(&producer, "drop", (0..10).map(|i| i.to_string())).await;
    drop(producer);
    for (i, ack) in acks.into_iter().enumerate() {
        assert_eq!(ack.await.unwrap().offset, i as i64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_a_timestamp_get_the_wall_clock_at_send() {
    // The producer stamps records from the monotonic reading `send` takes
    // (see `WallClock`): each stamp must still fall between wall-clock
    // readings taken around its `send`, and `sent_at` must be that call's.
    let (_dir, client, _server) = with_topic("stamped").await;
    let producer = client.producer(ProducerConfig::default());
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let mut bounds = Vec::new();
    for i in 0..200 {
        let before = (wall(), std::time::Instant::now());
        let ack = producer
            .send("stamped", ProducerRecord::value(i.to_string()))
            .await
            .unwrap();
        let after = (std::time::Instant::now(), wall());
        assert!(before.1 <= ack.sent_at() && ack.sent_at() <= after.0);
        bounds.push((before.0, after.1, ack));
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    producer.flush().await.unwrap();
    let mut c = client
        .partition_consumer("stamped", 0, StartFrom::Earliest)
        .await
        .unwrap();
    let mut stamps = Vec::new();
    while stamps.len() < bounds.len() {
        stamps.extend(c.poll().await.unwrap().into_iter().map(|r| r.timestamp_ms));
    }
    for ((before, after, ack), ts) in bounds.into_iter().zip(stamps) {
        // The derived stamp truncates two durations to ms: one ms early
        // at most.
        assert!(
            before - 1 <= ts && ts <= after,
            "record {} stamped {ts}, sent between {before} and {after}",
            ack.await.unwrap().offset
        );
    }
}

#[test]
fn perf_tools_report_what_they_moved() {
    // perf produce / consume count exactly what went through, and
    // `perf consume --group` honours and advances the group's offsets.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--output", "json", "perf"];
        all.extend_from_slice(args);
        serde_json::from_str(&cli_ok(&server.addr, &all, None)).unwrap()
    };
    let produced = json(&[
        "produce",
        "--topic",
        "pf",
        "--records",
        "2000",
        "--record-size",
        "100",
        "--acks",
        "leader",
    ]);
    assert_eq!(produced["records"], 2000);
    assert_eq!(produced["bytes"], 200_000);
    assert!(
        produced["latency"]["p99_ms"].as_f64().unwrap() > 0.0,
        "{produced}"
    );
    let consumed = json(&["consume", "--topic", "pf", "--records", "2000"]);
    assert_eq!(consumed["records"], 2000);
    assert_eq!(consumed["bytes"], 200_000);
    // A figure for another shape than asked for is refused: "pf" has one
    // partition. Options perf consume does not use are refused too.
    let err = common::cli_err(
        &server.addr,
        &[
            "perf",
            "produce",
            "--topic",
            "pf",
            "--records",
            "10",
            "--partitions",
            "8",
        ],
        None,
    );
    assert!(err.contains("exists with 1 partitions"), "{err}");
    let err = common::cli_err(
        &server.addr,
        &["perf", "consume", "--topic", "pf", "--record-size", "10"],
        None,
    );
    assert!(err.contains("--record-size"), "{err}");
    let err = common::cli_err(&server.addr, &["perf", "produce", "--acks", "some"], None);
    assert!(err.contains("invalid value 'some'"), "{err}");
    // Up to 5,000 records as a group member, stopping once caught up.
    let group_consume = |topic: &str, group: &str| {
        json(&[
            "consume",
            "--topic",
            topic,
            "--records",
            "5000",
            "--group",
            group,
        ])
    };
    let first = group_consume("pf", "pg");
    assert_eq!(first["records"], 2000, "stops once caught up: {first}");
    let again = group_consume("pf", "pg");
    assert_eq!(
        again["records"], 0,
        "the group committed its offsets: {again}"
    );
    // perf e2e receives every record it produced; its timeline accounts
    // for each of them once, and no window's largest latency exceeds the
    // run's.
    // 2,000 records of 100 B to topic "pe", with `extra` options.
    let e2e_run = |extra: &[&str]| {
        let mut args = vec![
            "e2e",
            "--topic",
            "pe",
            "--records",
            "2000",
            "--record-size",
            "100",
        ];
        args.extend_from_slice(extra);
        json(&args)
    };
    // Records the timeline counts, over all its windows.
    let timelined = |report: &serde_json::Value| -> u64 {
        let windows = report["timeline"].as_array().expect("timeline");
        windows.iter().map(|w| w["records"].as_u64().unwrap()).sum()
    };
    let e2e = e2e_run(&["--timeline-ms", "5"]);
    assert_eq!(e2e["records"], 2000, "{e2e}");
    let windows = e2e["timeline"].as_array().expect("timeline");
    assert_eq!(timelined(&e2e), 2000, "{e2e}");
    let max_ms = e2e["latency"]["max_ms"].as_f64().unwrap();
    for w in windows {
        // The histogram rounds to microseconds and three significant
        // digits; the windows keep nanoseconds.
        assert!(
            w["max_ms"].as_f64().unwrap() <= max_ms * 1.01 + 0.001,
            "{e2e}"
        );
    }
    // The same with long-poll fetches instead of a subscription.
    let fetched = e2e_run(&["--fetch"]);
    assert_eq!(fetched["records"], 2000, "{fetched}");
    // A warm-up is sent and received but left out of the report: the
    // topic holds it, the timeline counts it.
    let warmed = json(&[
        "produce",
        "--topic",
        "pw",
        "--records",
        "2000",
        "--warm-up-records",
        "500",
        "--record-size",
        "100",
        "--timeline-ms",
        "5",
    ]);
    assert_eq!(warmed["records"], 2000, "{warmed}");
    assert_eq!(timelined(&warmed), 2500, "{warmed}");
    // perf produce's windows carry acknowledgement latencies only.
    for w in warmed["timeline"].as_array().unwrap() {
        assert!(w.get("max_ms").is_none(), "{warmed}");
        assert!(w["ack_max_ms"].as_f64().unwrap() >= 0.0, "{warmed}");
    }
    assert!(
        warmed["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["ack_max_ms"].as_f64().unwrap() > 0.0),
        "{warmed}"
    );
    let stored = group_consume("pw", "pw");
    assert_eq!(stored["records"], 2500, "{stored}");
    let e2e = e2e_run(&["--warm-up-records", "700", "--timeline-ms", "5"]);
    assert_eq!(e2e["records"], 2000, "{e2e}");
    assert_eq!(timelined(&e2e), 2700, "{e2e}");
    // At a rate the loop cannot keep (it runs behind from the start), the
    // measured records are stamped with when they were due, before the
    // warm-up ended by the clock: every one of them is still measured.
    let late = e2e_run(&["--warm-up-records", "700", "--rate", "1000000"]);
    assert_eq!(late["records"], 2000, "{late}");
}

/// Deleting a topic removes its data (the directory is renamed at once
/// and removed in the background) and a topic created again under the
/// same name starts empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_leaves_no_data_and_starts_empty_when_created_again() {
    let (dir, client, server) = with_topic("gone").await;
    // Small batches: many in flight at once.
    let producer = client.producer(ProducerConfig {
        batch_bytes_max: 1024,
        ..ProducerConfig::default()
    });
    for ack in send_values(&producer, "gone", (0..500).map(|i| format!("old-{i}"))).await {
        ack.await.unwrap();
    }
    assert!(dir.path().join("gone-0").is_dir());
    cli_ok(&server.addr, &["topic", "delete", "gone"], None);
    let listed = cli_ok(&server.addr, &["topic", "list"], None);
    assert!(!listed.lines().any(|l| l.trim() == "gone"), "{listed}");
    // Nothing of it left once the background removal is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("gone-"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still there: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    cli_ok(
        &server.addr,
        &["topic", "create", "gone", "--partitions", "1"],
        None,
    );
    let c = client
        .partition_consumer("gone", 0, StartFrom::Earliest)
        .await
        .unwrap();
    assert_eq!(c.high_watermark(), 0, "the new topic holds nothing");
    // The same idempotent producer goes on: its sequence numbers continue
    // from the deleted partition, which the new one has never seen
    // (UNKNOWN_PRODUCER_ID), so it restarts them at 0 (Kafka's KIP-360)
    // instead of failing the records. Several batches, so that some are
    // in flight behind the refused one.
    let new: Vec<String> = (0..3000).map(|i| format!("new-{i}")).collect();
    for (i, ack) in send_values(&producer, "gone", new.clone())
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(ack.await.unwrap().offset, i as i64);
    }
    // And a producer that never wrote to it.
    let other = client.producer(ProducerConfig::default());
    for ack in send_values(&other, "gone", ["last".to_string()]).await {
        assert_eq!(ack.await.unwrap().offset, 3000);
    }
    let seen: Vec<String> = consume_cli(&server.addr, "gone")
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(seen.len(), 3001);
    assert_eq!(&seen[..3000], &new[..], "each once, in order");
    assert_eq!(seen[3000], "last");
}

/// A subscription to a broker that stops answering without closing its
/// connection (a frozen process; a host gone from the network) fails
/// once the connection's keepalive PINGs go unanswered, instead of
/// waiting for records forever; and one to a thawed broker reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_a_frozen_broker_fails_instead_of_waiting_forever() {
    let (_dir, client, server) = with_topic("quiet").await;
    let mut c = client
        .partition_consumer("quiet", 0, StartFrom::Earliest)
        .await
        .unwrap();
    c.streaming = true;
    c.max_wait_ms = 200;
    // Open: an empty poll answered on the live stream.
    assert!(c.poll().await.unwrap().is_empty());
    server.signal("STOP");
    let failed = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            match c.poll().await {
                Ok(records) => assert!(records.is_empty()),
                Err(e) => break e,
            }
        }
    })
    .await;
    server.signal("CONT");
    let err = failed.expect("still waiting on the frozen broker after 60 s");
    assert!(err.is_retriable(), "{err}");
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("quiet", ProducerRecord::value("after the thaw"))
        .await
        .unwrap()
        .await
        .unwrap();
    let records = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let records = c.poll().await.unwrap_or_default();
            if !records.is_empty() {
                break records;
            }
        }
    })
    .await
    .expect("nothing read after the thaw");
    assert_eq!(records[0].value.as_deref(), Some(&b"after the thaw"[..]));
}

/// `consume --group` into a pipe its reader closes (`| head -1`): the
/// command stops normally, and commits none of the records that may not
/// have reached the reader, so the group's next member reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_consume_into_a_closed_pipe_commits_only_what_was_written() {
    use std::io::BufRead;
    let (_dir, client, server) = with_topic("wide-records").await;
    // 20 kB records: a pipe (64 KiB) holds three of them.
    const SIZE: usize = 20_000;
    let producer = client.producer(ProducerConfig::default());
    let values = (0..200).map(|i| format!("{i:05}{}", "x".repeat(SIZE - 5)));
    for ack in send_values(&producer, "wide-records", values).await {
        ack.await.unwrap();
    }
    let child = std::process::Command::new(common::runnel_bin())
        .args(["--bootstrap", &server.addr, "consume", "wide-records"])
        .args(["--group", "piped", "--from", "earliest"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = common::Reaped::new(child);
    let mut reader = std::io::BufReader::new(child.child().stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("00000"), "{}", &line[..10]);
    drop(reader);
    let out = child.wait_output(common::CLI_WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let committed = client
        .fetch_offsets("piped", &[("wide-records".to_string(), 0)])
        .await
        .unwrap();
    let offset = committed.first().map_or(-1, |o| o.offset);
    // One line read, at most 64 KiB more in the pipe: 5 records at most
    // reached the pipe; the fetch that failed held about 50.
    assert!(offset <= 5, "committed {offset}");
}

/// `runnel produce` takes lines of any bytes (keys split at the
/// separator), and fits its batches to the topic's max.message.bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_produce_takes_any_bytes_and_fits_batches_to_the_topic() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let client = Client::connect(&server.addr).await.unwrap();
    let configs = [("max.message.bytes".to_string(), "4096".to_string())];
    client
        .create_topic("raw", 1, 1, configs.into_iter().collect())
        .await
        .unwrap();
    let value = |i: usize| {
        let mut v = vec![0xff, 0xfe, 0x80 + (i % 100) as u8];
        v.extend(b"x".repeat(100));
        v
    };
    let mut input = Vec::new();
    for i in 0..200 {
        input.extend_from_slice(format!("k{i}\t").as_bytes());
        input.extend(value(i));
        input.push(b'\n');
    }
    let out = common::cli(
        &server.addr,
        &[
            "produce",
            "raw",
            "--key-separator",
            "\t",
            "--batch-bytes",
            "1000000",
        ],
        Some(&input),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("max.message.bytes 4096"), "{stderr}");
    assert!(stderr.contains("produced 200 records"), "{stderr}");
    let mut c = client
        .partition_consumer("raw", 0, StartFrom::Earliest)
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 200 {
        got.extend(c.poll().await.unwrap());
    }
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()));
        assert_eq!(r.value.as_deref(), Some(&value(i)[..]), "record {i}");
    }
}

/// `runnel consume --from earliest` whose position falls off the log
/// while it reads (deleted records, retention) reads on from the new log
/// start, as Kafka's auto.offset.reset does, instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_consume_reads_on_when_its_position_leaves_the_log() {
    use std::io::BufRead;
    let (_dir, client, server) = with_topic("shrinking").await;
    // 40 MB: more than the command's buffers (a pipe, 16 fetched chunks
    // of at most 1 MiB) hold, so it is still reading when records go.
    const RECORDS: usize = 40_000;
    let producer = client.producer(ProducerConfig::default());
    let values = (0..RECORDS).map(|i| format!("{i:06}{}", "v".repeat(994)));
    for ack in send_values(&producer, "shrinking", values).await {
        ack.await.unwrap();
    }
    let child = std::process::Command::new(common::runnel_bin())
        .args(["--bootstrap", &server.addr, "consume", "shrinking"])
        .args(["--from", "earliest"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = common::Reaped::new(child);
    let mut lines = std::io::BufReader::new(child.child().stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("000000"), "{}", &first[..6]);
    // Everything below the end goes while the command has read at most
    // its buffers' worth.
    client
        .delete_records("shrinking", 0, -1, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let out = child.wait_output(common::CLI_WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("no longer in the log; reading on from {RECORDS}")),
        "{stderr}"
    );
    // What was printed is in order, without gaps, and stops short.
    let read = 1 + rest.len();
    assert!(read < RECORDS, "read {read}");
    for (i, line) in rest.iter().enumerate() {
        assert_eq!(&line[..6], format!("{:06}", i + 1), "line {}", i + 1);
    }
}

/// A consumer of a topic that is deleted and created again under the same
/// name is told (UNKNOWN_TOPIC_ID) instead of reading the new topic's
/// records at the old one's offsets; a consumer started afresh reads the
/// new topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_of_a_recreated_topic_is_told_not_fed_the_new_one() {
    let (_dir, client, server) = with_topic("again").await;
    let producer = client.producer(ProducerConfig {
        idempotence: false,
        ..ProducerConfig::default()
    });
    let old = (0..5).map(|i| format!("old-{i}"));
    for ack in send_values(&producer, "again", old).await {
        ack.await.unwrap();
    }
    let mut c = client
        .partition_consumer("again", 0, StartFrom::Earliest)
        .await
        .unwrap();
    let mut read = 0;
    while read < 5 {
        read += c.poll().await.unwrap().len();
    }
    // Without the read-ahead the last poll started: a fetch waiting while
    // the topic is deleted is told UNKNOWN_TOPIC, which is true then; this
    // test is about the fetches after the topic is back.
    c.seek(c.position());
    client.delete_topic("again").await.unwrap();
    common::eventually(
        "the topic recreated",
        std::time::Duration::from_secs(60),
        || async {
            client
                .create_topic("again", 1, 1, Default::default())
                .await
                .ok()
        },
    )
    .await;
    let admin = Client::connect(&server.addr).await.unwrap();
    let producer = admin.producer(ProducerConfig {
        idempotence: false,
        ..ProducerConfig::default()
    });
    let new = (0..10).map(|i| format!("new-{i}"));
    for ack in send_values(&producer, "again", new).await {
        ack.await.unwrap();
    }
    let err = loop {
        match c.poll().await {
            Ok(records) => assert!(
                records.is_empty(),
                "read the new topic at old offsets: {records:?}"
            ),
            Err(e) if e.is_retriable() => {}
            Err(e) => break e,
        }
    };
    assert_eq!(
        err.code(),
        runnel_proto::v1::ErrorCode::UnknownTopicId,
        "{err}"
    );
    let mut fresh = admin
        .partition_consumer("again", 0, StartFrom::Earliest)
        .await
        .unwrap();
    let mut values = Vec::new();
    while values.len() < 10 {
        for r in fresh.poll().await.unwrap() {
            values.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
        }
    }
    assert_eq!(values[0], "new-0");
}

/// `topic create` without `--partitions` or `--replication-factor` takes the
/// broker's `num_partitions` and `default_replication_factor`, as Kafka's
/// `num.partitions` and `default.replication.factor`.
#[test]
fn topic_create_takes_the_broker_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_toml(
        dir.path(),
        "[broker]\nnum_partitions = 4\ndefault_replication_factor = 2\n",
    );
    let addr = server.addr.as_str();
    // Two replicas on a one-broker cluster: the default was used.
    let err = common::cli_err(addr, &["topic", "create", "two"], None);
    assert!(
        err.contains("invalid replication factor 2: only 1 live brokers"),
        "{err}"
    );
    let out = cli_ok(
        addr,
        &[
            "--output",
            "json",
            "topic",
            "create",
            "four",
            "--replication-factor",
            "1",
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        v["partitions"].as_array().expect("partitions").len(),
        4,
        "{out}"
    );
    assert_eq!(v["replication_factor"], 1, "{out}");
    // Explicit values win over the defaults.
    let out = cli_ok(
        addr,
        &[
            "--output",
            "json",
            "topic",
            "create",
            "one",
            "--partitions",
            "1",
            "--replication-factor",
            "1",
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        v["partitions"].as_array().expect("partitions").len(),
        1,
        "{out}"
    );
}

/// A partition whose log cannot be opened (here a file stands where its
/// directory goes) is left out; the admin change that created it is
/// still answered as done, and every other partition is hosted and led.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_opened_leaves_the_other_partitions_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    std::fs::write(dir.path().join("blocked-0"), b"not a directory").unwrap();
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("blocked", 1, 1, BTreeMap::new())
        .await
        .expect("created, though this broker cannot open its log");
    client
        .create_topic("fine", 8, 1, BTreeMap::new())
        .await
        .unwrap();
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for p in 0..8 {
        let record = ProducerRecord {
            partition: Some(p),
            ..ProducerRecord::value(format!("v{p}"))
        };
        acks.push(producer.send("fine", record).await.unwrap());
    }
    for (p, ack) in acks.into_iter().enumerate() {
        let m = ack.await.unwrap_or_else(|e| panic!("partition {p}: {e}"));
        assert_eq!((m.partition, m.offset), (p as i32, 0));
    }
    producer.close().await.unwrap();
}

/// A record for a partition past the topic's count is refused at once
/// (it waited out the delivery timeout, two minutes); the count is read
/// again first, so a partition another client just added is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_past_the_count_is_refused_at_once_unless_the_topic_grew() {
    let (_dir, client, server) = with_topic("grow").await;
    let producer = client.producer(ProducerConfig::default());
    let to = |partition: i32| ProducerRecord {
        partition: Some(partition),
        ..ProducerRecord::value("v")
    };
    producer.send("grow", to(0)).await.unwrap().await.unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        producer.send("grow", to(3)).await.unwrap(),
    )
    .await
    .expect("answered at once")
    .unwrap_err();
    assert!(
        matches!(&refused, runnel::client::ClientError::Invalid(m) if m.contains("has 1 partitions")),
        "{refused}"
    );
    let admin = Client::connect(&server.addr).await.unwrap();
    admin.add_partitions("grow", 4).await.unwrap();
    let m = producer.send("grow", to(3)).await.unwrap().await.unwrap();
    assert_eq!((m.partition, m.offset), (3, 0));
    producer.close().await.unwrap();
}

/// With the broker gone, every batch out of time fails together once the
/// delivery timeout has passed since its `send`; before, the batches
/// queued behind the first failed one per retry cycle (about a second
/// each), so a hundred took minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_out_of_time_fail_together_when_the_broker_is_gone() {
    let (_dir, client, server) = with_topic("gone").await;
    let producer = client.producer(ProducerConfig {
        // Every record is a batch of its own.
        batch_bytes_max: 64,
        delivery_timeout: Duration::from_secs(3),
        ..ProducerConfig::default()
    });
    producer
        .send("gone", ProducerRecord::value("first"))
        .await
        .unwrap()
        .await
        .unwrap();
    server.kill();
    let mut acks = Vec::new();
    for i in 0..100 {
        let value = format!("{i:0>200}");
        acks.push(
            producer
                .send("gone", ProducerRecord::value(value))
                .await
                .unwrap(),
        );
    }
    let outcomes = tokio::time::timeout(Duration::from_secs(40), async {
        let mut outcomes = Vec::new();
        for ack in acks {
            outcomes.push(ack.await);
        }
        outcomes
    })
    .await
    .expect("every batch answered within the delivery timeout and a retry cycle or two");
    assert!(outcomes.iter().all(|o| o.is_err()), "{outcomes:?}");
    tokio::time::timeout(Duration::from_secs(10), producer.flush())
        .await
        .expect("nothing left to wait for")
        .unwrap();
}

/// `__consumer_offsets` is kept forever whatever `[topic_defaults]`
/// says: a broker-wide `retention.bytes` deleted its oldest segments, and
/// with them the last commits of quiet groups.
#[test]
fn the_offsets_topic_ignores_broker_wide_retention() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_toml(
        dir.path(),
        "[topic_defaults]\n\"retention.bytes\" = 100000\n\"retention.ms\" = 60000\n",
    );
    let addr = server.addr.as_str();
    cli_ok(addr, &["topic", "create", "t", "--partitions", "1"], None);
    cli_ok(addr, &["produce", "t"], Some(b"a\nb\n"));
    cli_ok(
        addr,
        &["consume", "t", "--group", "g", "--max-records", "2"],
        None,
    );
    let out = cli_ok(
        addr,
        &[
            "--output",
            "json",
            "topic",
            "describe",
            "__consumer_offsets",
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["configs"]["retention.bytes"], "-1", "{out}");
    assert_eq!(v["configs"]["retention.ms"], "-1", "{out}");
    // Other topics keep the defaults.
    let out = cli_ok(addr, &["--output", "json", "topic", "describe", "t"], None);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["configs"]["retention.bytes"], "100000", "{out}");
}

/// `offsets_topic_replication_factor` is waited for: with fewer brokers
/// live, groups are told to try again, and the offsets topic is not
/// created with fewer copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_wait_for_the_offsets_topic_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_toml(
        dir.path(),
        "[broker]\noffsets_topic_replication_factor = 2\n",
    );
    let mut groups = runnel_proto::v1::consumer_groups_client::ConsumerGroupsClient::connect(
        format!("http://{}", server.addr),
    )
    .await
    .unwrap();
    let err = groups
        .find_coordinator(runnel_proto::v1::FindCoordinatorRequest { group: "g".into() })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("needs 2 live brokers") && err.message().contains("and 1 are live"),
        "{err:?}"
    );
    let client = Client::connect(&server.addr).await.unwrap();
    let topics = client.list_topics(true).await.unwrap();
    assert!(
        topics.iter().all(|t| t.name != "__consumer_offsets"),
        "{topics:?}"
    );
}

/// A `send` dropped while it waits (here for a topic's metadata, as a
/// caller's timeout or `select!` drops it) gives its buffer bytes back:
/// they were forgotten, and once a buffer's worth of sends had been
/// cancelled, every later send blocked for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_send_gives_its_buffer_back() {
    let (_dir, _client, server) = with_topic("cancelled").await;
    // A client of its own: no topic cached, so a send asks the cluster.
    let client = Client::connect(&server.addr).await.unwrap();
    let producer = client.producer(ProducerConfig {
        buffer_bytes_max: 4096,
        batch_bytes_max: 4096,
        idempotence: false,
        ..ProducerConfig::default()
    });
    let value = vec![b'v'; 1000];
    let mut cancelled = 0;
    for i in 0..20 {
        // Polled once: the bytes are taken, then it waits for metadata.
        let topic = format!("unseen-{i}");
        let polled = futures_util::FutureExt::now_or_never(
            producer.send(&topic, ProducerRecord::value(value.clone())),
        );
        cancelled += usize::from(polled.is_none());
    }
    assert!(cancelled > 4, "only {cancelled} sends were cancelled");
    let sent = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        producer
            .send("cancelled", ProducerRecord::value(value.clone()))
            .await
            .unwrap()
            .await
    })
    .await
    .expect("a send blocked on bytes that cancelled sends kept");
    sent.unwrap();
    producer.close().await.unwrap();
}

/// SIGHUP (the terminal or session running the node went away) stops the
/// node as SIGTERM does, cleanly: its default action killed it, without
/// a controlled shutdown or a clean close of its logs.
#[test]
fn sighup_stops_the_node_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    cli_ok(
        &server.addr,
        &["topic", "create", "hup", "--partitions", "1"],
        None,
    );
    cli_ok(&server.addr, &["produce", "hup"], Some(b"one\n"));
    let status = server.stop_with("HUP");
    assert!(status.success(), "{status:?}");
    // Closed cleanly: the next open trusts the log without a scan.
    assert!(dir.path().join("hup-0").join(".clean-shutdown").exists());
}
