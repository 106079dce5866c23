//! Observability against real `runnel server` processes: the metrics
//! endpoint (`/metrics` parsed with a Prometheus text-format parser,
//! `/health`, `/ready`) under load, consumer-group lag against offsets the
//! test commits itself, under-replicated partitions around a stopped
//! follower, and `runnel cluster health` exit codes.
//!
//! Where it sits on the data path: beside it — these tests drive the
//! produce/fetch path and read what the node reports about it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{cli, eventually, Cluster, ServerProcess};
use prometheus_parse::{Scrape, Value};
use runnel::client::{Client, GroupConfig, ProducerConfig, ProducerRecord, StartFrom};
use runnel_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);

/// Fast failure detection for the three-node test.
const CONTROLLER: &str = "broker_session_timeout_ms = 2000\nbroker_heartbeat_interval_ms = 200\n";

/// GET `path` from `addr` over HTTP/1.1; returns the status code and body.
async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("HTTP read timed out"))??;
    let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// Scrapes and parses a node's `/metrics`.
async fn scrape(addr: &str) -> Scrape {
    let (status, body) = http_get(addr, "/metrics").await.expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The value of the sample `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

/// Like [`value`], 0 when the sample is absent (a counter not bumped yet).
fn counter(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(s, name, labels).unwrap_or(0.0)
}

fn producer(client: &Client) -> runnel::client::Producer {
    client.producer(ProducerConfig {
        acks: pb::Acks::All,
        linger: Duration::from_millis(2),
        ..ProducerConfig::default()
    })
}

/// Produces `count` records to `topic`-`partition`.
async fn produce(client: &Client, topic: &str, partition: i32, count: usize) {
    let p = producer(client);
    let mut acks = Vec::with_capacity(count);
    for i in 0..count {
        let record = ProducerRecord {
            partition: Some(partition),
            ..ProducerRecord::value(format!("value-{i:06}"))
        };
        acks.push(p.send(topic, record).await.expect("queue record"));
    }
    for a in acks {
        a.await.expect("record stored");
    }
    p.close().await.expect("close producer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_metrics_under_load_and_group_lag() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = server
        .metrics_addr
        .clone()
        .expect("metrics address printed");

    let (status, body) = http_get(&metrics, "/health").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(&metrics, "/ready").await.unwrap();
    assert_eq!(status, 200, "ready once listening: {body}");
    let (status, _) = http_get(&metrics, "/nothing").await.unwrap();
    assert_eq!(status, 404);

    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("obs", 2, 1, Default::default())
        .await
        .unwrap();
    let before = scrape(&metrics).await;
    let t = [("topic", "obs")];
    assert_eq!(counter(&before, "runnel_topic_records_in_total", &t), 0.0);

    // Load: a producer runs while the test scrapes; counters only rise.
    let load = {
        let client = client.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                produce(&client, "obs", 0, 200).await;
            }
        })
    };
    let mut last = 0.0;
    let mut rises = 0;
    while !load.is_finished() {
        let s = scrape(&metrics).await;
        let now = counter(&s, "runnel_topic_records_in_total", &t);
        assert!(now >= last, "records in went down: {last} -> {now}");
        rises += usize::from(now > last);
        last = now;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.await.unwrap();
    assert!(rises >= 1, "no scrape saw the load");
    produce(&client, "obs", 1, 30).await;

    // Read some of it back.
    let mut consumer = client
        .partition_consumer("obs", 0, StartFrom::Earliest)
        .await
        .unwrap();
    let mut consumed = 0;
    while consumed < 500 {
        consumed += consumer.poll().await.unwrap().len();
    }
    // A produce the broker refuses, counted by its error code.
    let mut raw = pb::producer_client::ProducerClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let refused = raw
        .produce(pb::ProduceRequest {
            topic: "obs".into(),
            partition: Some(9),
            records: vec![pb::Record {
                value: Some(b"x".to_vec().into()),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    assert!(refused.is_err());
    // An idempotent retry answered with its first copy's offsets wrote
    // nothing, and is not counted again.
    let id = raw
        .init_producer_id(pb::InitProducerIdRequest {})
        .await
        .unwrap()
        .into_inner();
    let batch = pb::ProduceRequest {
        topic: "obs".into(),
        partition: Some(1),
        records: (0..3)
            .map(|i| pb::Record {
                value: Some(format!("idempotent-{i}").into_bytes().into()),
                ..Default::default()
            })
            .collect(),
        acks: pb::Acks::All as i32,
        producer_id: id.producer_id,
        producer_epoch: id.producer_epoch,
        base_sequence: 0,
        ..Default::default()
    };
    let first = raw.produce(batch.clone()).await.unwrap().into_inner();
    let again = raw.produce(batch).await.unwrap().into_inner();
    assert_eq!((first.base_offset, again.base_offset), (30, 30));
    // Refused before the broker (the internal topic) counts as an error
    // too.
    let refused = raw
        .produce(pb::ProduceRequest {
            topic: "__consumer_offsets".into(),
            records: vec![pb::Record::default()],
            ..Default::default()
        })
        .await;
    assert!(refused.is_err(), "{refused:?}");

    // A group the test controls: offsets committed directly.
    let commit = |partition: i32, offset: i64| pb::PartitionOffset {
        topic_id: String::new(),
        topic: "obs".into(),
        partition,
        offset,
        metadata: String::new(),
    };
    client
        .commit_offsets("lagging", "", 0, vec![commit(0, 1_234), commit(1, 10)])
        .await
        .unwrap();

    let s = scrape(&metrics).await;
    let p0 = [("topic", "obs"), ("partition", "0")];
    let p1 = [("topic", "obs"), ("partition", "1")];
    assert_eq!(counter(&s, "runnel_topic_records_in_total", &t), 2_033.0);
    assert!(counter(&s, "runnel_topic_in_bytes_total", &t) > 2_033.0 * 12.0);
    assert!(counter(&s, "runnel_produce_requests_total", &t) >= 1.0);
    assert!(counter(&s, "runnel_fetch_requests_total", &t) >= 1.0);
    assert!(counter(&s, "runnel_topic_records_out_total", &t) >= consumed as f64);
    assert!(counter(&s, "runnel_topic_out_bytes_total", &t) > 0.0);

    // Out bytes are what is sent: structured fetches cutting one large
    // batch into small answers count their records once, not the whole
    // batch once per answer (before: about 25 times here).
    client
        .create_topic("cut", 1, 1, Default::default())
        .await
        .unwrap();
    raw.produce(pb::ProduceRequest {
        topic: "cut".into(),
        partition: Some(0),
        records: (0..100)
            .map(|i| pb::Record {
                value: Some(format!("{i:0100}").into_bytes().into()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut fetcher =
        pb::consumer_client::ConsumerClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
    let (mut offset, mut sent) = (0, 0);
    while offset < 100 {
        let r = fetcher
            .fetch(pb::FetchRequest {
                topic: "cut".into(),
                partition: 0,
                offset,
                max_bytes: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.next_offset > offset);
        offset = r.next_offset;
        sent += prost::Message::encoded_len(&r);
    }
    let out = counter(
        &scrape(&metrics).await,
        "runnel_topic_out_bytes_total",
        &[("topic", "cut")],
    );
    assert!(
        out > 0.0 && out <= sent as f64,
        "{out} bytes counted out, {sent} sent"
    );
    assert_eq!(
        counter(
            &s,
            "runnel_request_errors_total",
            &[("request", "produce"), ("code", "UNKNOWN_PARTITION")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            &s,
            "runnel_request_errors_total",
            &[("request", "produce"), ("code", "INVALID_TOPIC")]
        ),
        1.0
    );
    for h in [
        "runnel_produce_queue_seconds",
        "runnel_produce_local_append_seconds",
        "runnel_produce_replica_wait_seconds",
    ] {
        let count = value(&s, &format!("{h}_count"), &[]).unwrap_or_else(|| panic!("{h}_count"));
        assert!(count >= 1.0, "{h}: {count}");
        assert!(
            value(&s, h, &[]).is_some_and(|c| c == count),
            "{h}: the +Inf bucket holds every observation"
        );
    }
    let leo0 = value(&s, "runnel_partition_log_end_offset", &p0).unwrap();
    let leo1 = value(&s, "runnel_partition_log_end_offset", &p1).unwrap();
    assert_eq!((leo0, leo1), (2_000.0, 33.0));
    assert_eq!(
        value(&s, "runnel_partition_high_watermark", &p0),
        Some(leo0)
    );
    assert_eq!(
        value(&s, "runnel_partition_log_start_offset", &p0),
        Some(0.0)
    );
    assert!(value(&s, "runnel_partition_size_bytes", &p0).unwrap() > 0.0);
    assert_eq!(value(&s, "runnel_partition_isr_size", &p0), Some(1.0));
    assert_eq!(value(&s, "runnel_partition_leader", &p0), Some(1.0));

    // Lag = log end offset - committed offset, per partition and in total.
    let g = |p: &'static str| [("group", "lagging"), ("topic", "obs"), ("partition", p)];
    assert_eq!(
        value(&s, "runnel_group_committed_offset", &g("0")),
        Some(1_234.0)
    );
    assert_eq!(
        value(&s, "runnel_group_lag_records", &g("0")),
        Some(leo0 - 1_234.0)
    );
    assert_eq!(
        value(&s, "runnel_group_lag_records", &g("1")),
        Some(leo1 - 10.0)
    );
    assert_eq!(
        value(
            &s,
            "runnel_group_total_lag_records",
            &[("group", "lagging")]
        ),
        Some(leo0 - 1_234.0 + leo1 - 10.0)
    );
    // Committing further shrinks the lag.
    client
        .commit_offsets("lagging", "", 0, vec![commit(0, 2_000)])
        .await
        .unwrap();
    let s = scrape(&metrics).await;
    assert_eq!(value(&s, "runnel_group_lag_records", &g("0")), Some(0.0));

    // A member joins: one completed rebalance, with its duration.
    let mut member = client
        .group_consumer(GroupConfig::new("members", &["obs"]))
        .unwrap();
    while member.generation() < 1 {
        member.poll().await.unwrap();
    }
    member.close().await.unwrap();
    let s = scrape(&metrics).await;
    let m = [("group", "members")];
    assert!(counter(&s, "runnel_group_rebalances_total", &m) >= 1.0);
    assert!(value(&s, "runnel_group_rebalance_duration_seconds_count", &[]).unwrap() >= 1.0);
    // A deleted group's series go with it (group ids are the clients'
    // to choose: they would pile up).
    client.delete_group("members").await.unwrap();
    let after = scrape(&metrics).await;
    assert_eq!(
        value(&after, "runnel_group_rebalances_total", &m),
        None,
        "a deleted group's series lingers"
    );

    // Cluster, controller and process gauges of a healthy single node.
    for (name, want) in [
        ("runnel_cluster_partitions_under_replicated", 0.0),
        ("runnel_cluster_partitions_offline", 0.0),
        ("runnel_controller_active", 1.0),
        ("runnel_controller_leader_id", 1.0),
        ("runnel_controller_fenced_brokers", 0.0),
        ("runnel_node_id", 1.0),
    ] {
        assert_eq!(value(&s, name, &[]), Some(want), "{name}");
    }
    assert_eq!(
        value(&s, "runnel_cluster_brokers", &[("state", "up")]),
        Some(1.0)
    );
    let applied = value(&s, "runnel_controller_raft_applied_index", &[]).unwrap();
    assert!(applied >= 1.0);
    assert!(value(&s, "runnel_controller_raft_commit_index", &[]).unwrap() >= applied);
    assert!(value(&s, "runnel_controller_metadata_commands_applied", &[]).unwrap() >= 3.0);
    assert!(value(&s, "runnel_controller_raft_term", &[]).unwrap() >= 1.0);
    assert!(value(&s, "runnel_process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(value(&s, "runnel_process_open_fds", &[]).unwrap() > 5.0);
    assert!(value(&s, "runnel_tokio_alive_tasks", &[]).unwrap() >= 1.0);

    // Every metric the Grafana dashboard queries is one the node exposes.
    let exposed: BTreeSet<&str> = s.docs.keys().map(String::as_str).collect();
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/runnel.json"),
    )
    .unwrap();
    let mut queried = BTreeSet::new();
    for (i, _) in dashboard.match_indices("runnel_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| exposed.contains(b)))
            .map_or(name.clone(), str::to_string);
        queried.insert(base);
    }
    let unknown: Vec<_> = queried
        .iter()
        .filter(|n| !exposed.contains(n.as_str()) && n.as_str() != "runnel_")
        .collect();
    assert!(queried.len() > 20, "{queried:?}");
    assert!(
        unknown.is_empty(),
        "dashboard queries unknown metrics: {unknown:?}"
    );
}

/// Sum of a gauge over the nodes that answer.
async fn cluster_value(cluster: &Cluster, ids: &[i32], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for id in ids {
        sum += value(&scrape(&cluster.metrics_addr(*id)).await, name, labels).unwrap_or(0.0);
    }
    sum
}

/// Whether any of the nodes `ids` exports group "watch"'s committed
/// offset of solo-`partition`, and whether any exports its lag there or
/// its total lag.
async fn watch_samples(cluster: &Cluster, ids: &[i32], partition: &str) -> (bool, bool) {
    let (mut committed, mut lag) = (false, false);
    for id in ids {
        let s = scrape(&cluster.metrics_addr(*id)).await;
        for x in &s.samples {
            if x.labels.get("group") != Some("watch") {
                continue;
            }
            let here = x.labels.get("partition") == Some(partition);
            committed |= here && x.metric == "runnel_group_committed_offset";
            lag |= x.metric == "runnel_group_total_lag_records"
                || (here && x.metric == "runnel_group_lag_records");
        }
    }
    (committed, lag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_under_replicated_partitions_and_cluster_health() {
    let base = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        3,
        base.path(),
        "replica_lag_time_max_ms = 10000\nreplica_fetch_wait_max_ms = 100",
        CONTROLLER,
    );
    let bootstrap = cluster.bootstrap();
    let client = Client::connect(&bootstrap).await.unwrap();
    client
        .create_topic("r", 3, 3, Default::default())
        .await
        .unwrap();
    for p in 0..3 {
        produce(&client, "r", p, 50).await;
    }
    // One unreplicated partition per broker, and a group with offsets in
    // each: its lag on node 3's partition becomes unknown once node 3 is
    // down, and is then left out rather than reported as 0.
    client
        .create_topic("solo", 3, 1, Default::default())
        .await
        .unwrap();
    let solo = client.describe_topic("solo").await.unwrap();
    let on_3 = solo
        .partitions
        .iter()
        .find(|p| p.replicas == [3])
        .expect("a partition of 'solo' on node 3")
        .partition
        .to_string();
    client
        .commit_offsets(
            "watch",
            "",
            0,
            (0..3)
                .map(|partition| pb::PartitionOffset {
                    topic_id: String::new(),
                    topic: "solo".into(),
                    partition,
                    offset: 0,
                    metadata: String::new(),
                })
                .collect(),
        )
        .await
        .unwrap();
    eventually("the group's lag on node 3's partition", WAIT, || async {
        (watch_samples(&cluster, &[1, 2, 3], &on_3).await == (true, true)).then_some(())
    })
    .await;
    let under = "runnel_cluster_partitions_under_replicated";
    let m1 = cluster.metrics_addr(1);
    eventually("a fully replicated cluster", WAIT, || async {
        let s = scrape(&m1).await;
        (value(&s, under, &[]) == Some(0.0)).then_some(())
    })
    .await;
    // Every leader reports both followers caught up.
    eventually("followers caught up", WAIT, || async {
        let mut lags = Vec::new();
        for id in 1..=3 {
            let s = scrape(&cluster.metrics_addr(id)).await;
            lags.extend(
                s.samples
                    .iter()
                    .filter(|x| {
                        x.metric == "runnel_replication_follower_lag_records"
                            && x.labels.get("topic") == Some("r")
                    })
                    .map(|x| match x.value {
                        Value::Gauge(v) => v,
                        _ => -1.0,
                    }),
            );
        }
        (lags.len() == 6 && lags.iter().all(|l| *l == 0.0)).then_some(())
    })
    .await;
    // One active controller, and every node agrees who it is.
    let mut leaders = BTreeSet::new();
    let mut active = 0.0;
    for id in 1..=3 {
        let s = scrape(&cluster.metrics_addr(id)).await;
        leaders.insert(value(&s, "runnel_controller_leader_id", &[]).unwrap() as i64);
        active += value(&s, "runnel_controller_active", &[]).unwrap();
    }
    assert_eq!(active, 1.0);
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    let out = cli(&bootstrap, &["cluster", "health"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 up [1,2,3], 0 fenced"), "{stdout}");
    assert!(stdout.contains("status:      healthy"), "{stdout}");

    // A follower stops: its partitions become under-replicated.
    assert!(cluster.stop(3).success());
    let survivors = format!("{},{}", cluster.addrs[0], cluster.addrs[1]);
    // The replicated partitions on node 3: those of 'r' and of the
    // group offsets topic the commit above created.
    let mut replicated_on_3 = 0;
    for topic in ["r", "__consumer_offsets"] {
        let t = client.describe_topic(topic).await.unwrap();
        replicated_on_3 += t
            .partitions
            .iter()
            .filter(|p| p.replicas.len() > 1 && p.replicas.contains(&3))
            .count();
    }
    assert!(replicated_on_3 > 3, "{replicated_on_3}");
    eventually("under-replicated partitions", WAIT, || async {
        let s = scrape(&m1).await;
        (value(&s, under, &[]) == Some(replicated_on_3 as f64)
            && value(&s, "runnel_cluster_brokers", &[("state", "fenced")]) == Some(1.0))
        .then_some(())
    })
    .await;
    let out = cli(&survivors, &["cluster", "health"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "healthy with a node down?\n{stdout}");
    assert!(stdout.contains("fenced [3]"), "{stdout}");
    assert!(
        stdout.contains(&format!("{replicated_on_3} under-replicated")),
        "{stdout}"
    );
    assert!(stderr.contains("under-replicated"), "{stderr}");
    // The per-node check still passes on a live node.
    let node = cli(&cluster.addrs[0], &["cluster", "health", "--node"], None);
    assert!(node.status.success());
    let json = cli(&survivors, &["--output", "json", "cluster", "health"], None);
    assert!(!json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON summary");
    assert_eq!(v["healthy"], false);
    assert_eq!(v["brokers_fenced"], serde_json::json!([3]));
    // The group (moved off node 3 if it was its coordinator) still
    // reports its committed offset there, but no lag: it is unknown.
    eventually("the group described without node 3", WAIT, || async {
        (watch_samples(&cluster, &[1, 2], &on_3).await == (true, false)).then_some(())
    })
    .await;
    let out = cli(&survivors, &["group", "describe", "watch"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("total lag:    -"), "{stdout}");
    // cluster health lists it first, its lag unknown.
    let out = cli(&survivors, &["cluster", "health"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout
        .lines()
        .skip_while(|l| !l.starts_with("group lag"))
        .nth(1)
        .unwrap_or_default();
    assert_eq!(
        first.split_whitespace().take(2).collect::<Vec<_>>(),
        ["watch", "-"],
        "{stdout}"
    );

    // It returns and catches up: the count falls back to zero.
    cluster.restart(3);
    let m3 = cluster.metrics_addr(3);
    let (status, body) = http_get(&m3, "/ready").await.unwrap();
    assert_eq!(status, 200, "{body}");
    eventually("no under-replicated partition", WAIT, || async {
        let total = cluster_value(&cluster, &[1, 2, 3], under, &[]).await;
        (total == 0.0).then_some(())
    })
    .await;
    eventually("cluster health passes again", WAIT, || async {
        cli(&bootstrap, &["cluster", "health"], None)
            .status
            .success()
            .then_some(())
    })
    .await;

    // A topic's series go with it on every node, also on one that never
    // hosted it: a produce sent to a node that does not lead the
    // partition counts there.
    client
        .create_topic("brief", 1, 1, Default::default())
        .await
        .unwrap();
    let leader = client.describe_topic("brief").await.unwrap().partitions[0].leader;
    let other = (1..=3).find(|id| *id != leader).unwrap();
    let raw = pb::producer_client::ProducerClient::connect(format!(
        "http://{}",
        cluster.addrs[other as usize - 1]
    ))
    .await
    .unwrap();
    // Sent until that node knows the topic (until then it answers
    // UNKNOWN_TOPIC and counts nothing): NOT_LEADER, counted once.
    eventually("a produce refused as misrouted", WAIT, || async {
        let mut raw = raw.clone();
        let misrouted = raw
            .produce(pb::ProduceRequest {
                topic: "brief".into(),
                partition: Some(0),
                records: vec![pb::Record {
                    value: Some(b"x".to_vec().into()),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await;
        let status = misrouted.expect_err("a node that does not lead stored it");
        (common::error_code(&status) == "NOT_LEADER").then_some(())
    })
    .await;
    let brief = [("topic", "brief")];
    let m_other = cluster.metrics_addr(other);
    let s = scrape(&m_other).await;
    assert_eq!(counter(&s, "runnel_produce_requests_total", &brief), 1.0);
    client.delete_topic("brief").await.unwrap();
    eventually("the deleted topic's series gone", WAIT, || async {
        let s = scrape(&m_other).await;
        value(&s, "runnel_produce_requests_total", &brief)
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_json_logs_carry_role_changes_with_epochs() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(common::runnel_bin())
        .args(["server", "--node-id", "1", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info,openraft=off")
        .env_remove("RUNNEL_LOG_FORMAT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    // Killed however the test ends.
    let _child = common::Reaped::new(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("runnel listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let (log_tx, log_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = log_tx.send(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server address");
    let client = Client::connect(&addr).await.unwrap();
    client
        .create_topic("logged", 1, 1, Default::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let found = |seen: &[serde_json::Value], message: &str, field: &str| {
        seen.iter().any(|l| {
            l["fields"]["message"] == message
                && l["fields"].get(field).is_some_and(|v| v.is_number())
        })
    };
    while !(found(&seen, "became leader", "leader_epoch")
        && found(
            &seen,
            "became the active controller: fresh broker grace period",
            "term",
        ))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log_rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("role changes not logged; saw {seen:#?}"));
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        seen.push(v);
    }
    let leader = seen
        .iter()
        .find(|l| l["fields"]["message"] == "became leader")
        .unwrap();
    assert_eq!(leader["fields"]["topic"], "logged");
    assert_eq!(leader["level"], "INFO");
}

/// The active controller's id, once there is one.
async fn active_controller(client: &Client) -> i32 {
    eventually("an active controller", WAIT, || async {
        let id = client.describe_cluster().await.ok()?.controller_id;
        (id > 0).then_some(id)
    })
    .await
}

/// Waits until `metrics`' `/ready` answers `status` (`what` names the
/// wait); returns the body.
async fn ready_answers(metrics: &str, status: u16, what: &str) -> String {
    eventually(what, WAIT, || async {
        let (got, body) = http_get(metrics, "/ready").await.ok()?;
        (got == status).then_some(body)
    })
    .await
}

/// Sends signal `name` to each node of `ids`.
fn signal_all(cluster: &Cluster, ids: &[i32], name: &str) {
    for id in ids {
        cluster.node(*id).signal(name);
    }
}

/// A broker-only node whose active controller is cut off from the other
/// voters turns not ready: that controller stays leader in its own eyes
/// (openraft has no check-quorum), and it answered the node's heartbeats
/// "not fenced" while the majority's new controller fenced it, so the
/// node stayed ready, serving stale leaderships, for the whole split. It
/// now refuses heartbeats once no majority has acknowledged it for a
/// session timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_a_broker_whose_controller_is_cut_off_is_not_ready() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(3, base.path(), "", CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let leader = active_controller(&client).await;
    let voters: Vec<String> = cluster
        .addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("\"{}@{a}\"", i + 1))
        .collect();
    let port = common::free_ports(1)[0];
    let dir = base.path().join("node-4");
    let config = base.path().join("node-4.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 4\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
             metrics_listen = \"127.0.0.1:0\"\nroles = [\"broker\"]\n\
             [controller]\nvoters = [{}]\nelection_timeout_min_ms = 300\n\
             election_timeout_max_ms = 600\nheartbeat_interval_ms = 50\n{CONTROLLER}\n",
            dir.display(),
            voters.join(", "),
        ),
    )
    .unwrap();
    let broker = ServerProcess::spawn(
        &[
            "server".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &dir,
    )
    .wait();
    let metrics = broker.metrics_addr.clone().expect("metrics");
    ready_answers(&metrics, 200, "the broker-only node ready").await;
    let epochs = |c: pb::ClusterDescription| -> BTreeSet<(i32, i64, bool)> {
        c.brokers
            .iter()
            .map(|b| (b.id, b.epoch, b.fenced))
            .collect()
    };
    let before = epochs(client.describe_cluster().await.unwrap());
    assert_eq!(before.len(), 4, "{before:?}");
    let others: Vec<i32> = (1..=3).filter(|id| *id != leader).collect();
    signal_all(&cluster, &others, "STOP");
    let body = ready_answers(&metrics, 503, "the broker-only node not ready").await;
    signal_all(&cluster, &others, "CONT");
    assert!(body.contains("heartbeats"), "{body}");
    ready_answers(&metrics, 200, "ready again with the quorum back").await;
    // Nobody was fenced for it (the cut-off controller hears from no
    // broker, and fences it queued would commit if the voters rejoined
    // under its term). A write committed now comes after any of those.
    let on_leader = Client::connect(&cluster.addrs[(leader - 1) as usize])
        .await
        .unwrap();
    eventually("a metadata write", WAIT, || async {
        on_leader
            .create_topic("after", 1, 1, Default::default())
            .await
            .ok()
    })
    .await;
    let after = epochs(on_leader.describe_cluster().await.unwrap());
    assert_eq!(after, before, "brokers fenced or registered again");
}

/// An active controller cut off from the other voters stays leader in
/// its own eyes, answers its own broker's heartbeats, and keeps a copy of
/// the metadata saying it is unfenced: /ready said 200 for good. It now
/// reports not ready once no majority has acknowledged it for a session
/// timeout, and ready again when the others come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_an_active_controller_cut_off_from_the_quorum_is_not_ready() {
    let base = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(3, base.path(), "", CONTROLLER);
    let client = Client::connect(&cluster.bootstrap()).await.unwrap();
    let leader = active_controller(&client).await;
    let metrics = cluster.metrics_addr(leader);
    ready_answers(&metrics, 200, "the controller ready").await;
    let others: Vec<i32> = (1..=3).filter(|id| *id != leader).collect();
    signal_all(&cluster, &others, "STOP");
    let body = ready_answers(&metrics, 503, "the cut-off controller not ready").await;
    signal_all(&cluster, &others, "CONT");
    assert!(
        ["no majority", "heartbeats", "no active controller"]
            .iter()
            .any(|why| body.contains(why)),
        "{body}"
    );
    ready_answers(&metrics, 200, "ready again with the quorum back").await;
}
