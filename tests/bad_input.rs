//! Bad input gets a clear error and changes nothing: each refusal is
//! checked for its gRPC code, Runnel error code and message, and the
//! cluster is checked to be unchanged afterwards.

mod common;

use common::{cli, cli_err, cli_ok, error_code, runnel_bin, ServerProcess};
use runnel_proto::v1 as pb;
use runnel_proto::v1::admin_client::AdminClient;
use runnel_proto::v1::consumer_client::ConsumerClient;
use runnel_proto::v1::producer_client::ProducerClient;
use tonic::Code;

fn expect(
    result: Result<impl std::fmt::Debug, tonic::Status>,
    code: Code,
    runnel: &str,
    text: &str,
) {
    let status = result.expect_err("request should be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_code(&status), runnel, "{status:?}");
    assert!(
        status.message().contains(text),
        "message {:?} lacks {text:?}",
        status.message()
    );
}

fn create(
    name: &str,
    partitions: i32,
    rf: i32,
    configs: &[(&str, &str)],
) -> pb::CreateTopicRequest {
    pb::CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: rf,
        configs: configs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        validate_only: false,
    }
}

fn value(v: &[u8]) -> pb::Record {
    pb::Record {
        value: Some(v.to_vec().into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let url = format!("http://{}", server.addr);
    let mut admin = AdminClient::connect(url.clone()).await.unwrap();
    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    let mut consumer = ConsumerClient::connect(url.clone()).await.unwrap();

    admin
        .create_topic(create("small", 1, 1, &[("max.message.bytes", "1024")]))
        .await
        .unwrap();
    producer
        .produce(pb::ProduceRequest {
            topic: "small".into(),
            records: vec![value(b"ok")],
            ..Default::default()
        })
        .await
        .unwrap();

    // Topic creation.
    let long = "x".repeat(250);
    for name in ["bad name", "a/b", ".", "..", "", long.as_str(), "ü"] {
        expect(
            admin.create_topic(create(name, 1, 1, &[])).await,
            Code::InvalidArgument,
            "INVALID_TOPIC",
            "invalid topic name",
        );
    }
    // 0 and -1 take the broker's defaults (tests/single_node.rs).
    for partitions in [-2, i32::MIN] {
        expect(
            admin.create_topic(create("t", partitions, 1, &[])).await,
            Code::InvalidArgument,
            "INVALID_PARTITIONS",
            "at least 1",
        );
    }
    expect(
        admin.create_topic(create("t", 1, 2, &[])).await,
        Code::InvalidArgument,
        "INVALID_REPLICATION_FACTOR",
        "only 1 live brokers",
    );
    expect(
        admin.create_topic(create("t", 1, -2, &[])).await,
        Code::InvalidArgument,
        "INVALID_REPLICATION_FACTOR",
        "at least 1",
    );
    expect(
        admin
            .create_topic(create("t", 1, 1, &[("retention.msec", "1")]))
            .await,
        Code::InvalidArgument,
        "INVALID_CONFIG",
        "retention.msec",
    );
    expect(
        admin
            .create_topic(create("t", 1, 1, &[("retention.ms", "soon")]))
            .await,
        Code::InvalidArgument,
        "INVALID_CONFIG",
        "not an integer",
    );
    expect(
        admin.create_topic(create("small", 1, 1, &[])).await,
        Code::AlreadyExists,
        "TOPIC_ALREADY_EXISTS",
        "already exists",
    );

    // Produce.
    let produce =
        |topic: &str, partition: Option<i32>, records: Vec<pb::Record>| pb::ProduceRequest {
            topic: topic.into(),
            partition,
            records,
            ..Default::default()
        };
    expect(
        producer
            .produce(produce("nope", None, vec![value(b"x")]))
            .await,
        Code::NotFound,
        "UNKNOWN_TOPIC",
        "unknown topic 'nope'",
    );
    expect(
        producer
            .produce(produce("small", Some(3), vec![value(b"x")]))
            .await,
        Code::NotFound,
        "UNKNOWN_PARTITION",
        "no partition 3",
    );
    expect(
        producer
            .produce(produce("small", Some(-1), vec![value(b"x")]))
            .await,
        Code::NotFound,
        "UNKNOWN_PARTITION",
        "no partition -1",
    );
    expect(
        producer
            .produce(produce("small", None, vec![value(&[7u8; 2000])]))
            .await,
        Code::InvalidArgument,
        "RECORD_TOO_LARGE",
        "max.message.bytes",
    );
    expect(
        producer.produce(produce("small", None, vec![])).await,
        Code::InvalidArgument,
        "INVALID_REQUEST",
        "no records",
    );
    // Producer fields out of range are refused as such, not narrowed
    // (an epoch of 65,536 was taken as 0).
    for (epoch, sequence, text) in [
        (65_536, 0, "producer_epoch 65536"),
        (-1, 0, "producer_epoch -1"),
        (0, -5, "base_sequence -5"),
    ] {
        let mut req = produce("small", Some(0), vec![value(b"x")]);
        req.producer_id = 1;
        req.producer_epoch = epoch;
        req.base_sequence = sequence;
        expect(
            producer.produce(req).await,
            Code::InvalidArgument,
            "INVALID_REQUEST",
            text,
        );
    }
    let mut corrupt = pb::ProduceRequest {
        topic: "small".into(),
        batch: vec![0u8; 80].into(),
        ..Default::default()
    };
    expect(
        producer.produce(corrupt.clone()).await,
        Code::InvalidArgument,
        "CORRUPT_MESSAGE",
        "corrupt",
    );
    corrupt.batch = b"short".to_vec().into();
    expect(
        producer.produce(corrupt).await,
        Code::InvalidArgument,
        "CORRUPT_MESSAGE",
        "corrupt",
    );

    // ListOffsets with a spec this broker does not know (a newer
    // client's) is refused, not answered as the latest offset.
    expect(
        consumer
            .list_offsets(pb::ListOffsetsRequest {
                topic: "small".into(),
                partition: 0,
                spec: 99,
                timestamp_ms: 0,
            })
            .await,
        Code::InvalidArgument,
        "INVALID_REQUEST",
        "unknown offset spec 99",
    );

    // Fetch.
    let fetch = |offset: i64| pb::FetchRequest {
        topic: "small".into(),
        partition: 0,
        offset,
        ..Default::default()
    };
    expect(
        consumer.fetch(fetch(-1)).await,
        Code::OutOfRange,
        "OFFSET_OUT_OF_RANGE",
        "offset -1 out of range",
    );
    expect(
        consumer.fetch(fetch(2)).await,
        Code::OutOfRange,
        "OFFSET_OUT_OF_RANGE",
        "offset 2 out of range",
    );
    expect(
        consumer
            .fetch(pb::FetchRequest {
                topic: "nope".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "UNKNOWN_TOPIC",
        "nope",
    );

    // Nothing changed: one topic, one record.
    let topics = admin
        .list_topics(pb::ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(
        topics.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        vec!["small"]
    );
    let d = admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "small".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.partitions[0].log_end_offset, 1);
    let got = consumer.fetch(fetch(0)).await.unwrap().into_inner();
    assert_eq!(got.records.len(), 1);
    assert_eq!(got.records[0].value.as_deref(), Some(&b"ok"[..]));

    // The CLI turns the same refusals into messages and a non-zero exit.
    let addr = server.addr.as_str();
    let err = cli_err(addr, &["topic", "create", "bad name"], None);
    assert!(err.contains("invalid topic name"), "{err}");
    let err = cli_err(addr, &["topic", "create", "t", "--partitions", "0"], None);
    assert!(err.contains("invalid value '0' for '--partitions"), "{err}");
    // `perf` too: 0 used to mean the broker's default, another shape
    // than asked for.
    for args in [
        &["perf", "produce", "--topic", "p", "--partitions", "0"][..],
        &[
            "perf",
            "produce",
            "--topic",
            "p",
            "--replication-factor",
            "0",
        ],
        &["perf", "metadata", "--partitions", "0"],
    ] {
        let err = cli_err(addr, args, None);
        assert!(err.contains("invalid value '0'"), "{args:?}: {err}");
    }
    let err = cli_err(addr, &["produce", "nope"], Some(b"x\n"));
    assert!(err.contains("unknown topic 'nope'"), "{err}");
    let err = cli_err(addr, &["consume", "small", "--from", "whenever"], None);
    assert!(err.contains("ISO-8601"), "{err}");
    let err = cli_err(addr, &["topic", "create", "t", "--config", "novalue"], None);
    assert!(err.contains("KEY=VALUE"), "{err}");
    let big = format!("{}\n", "y".repeat(2000));
    let err = cli_err(addr, &["produce", "small"], Some(big.as_bytes()));
    assert!(err.contains("max.message.bytes"), "{err}");
    // The same with the input left open (`tail -f`): the refusal stops
    // the command when it comes, not when the next line does.
    {
        use std::io::Write;
        let mut produce = common::Reaped::new(
            std::process::Command::new(runnel_bin())
                .args(["--bootstrap", addr, "produce", "small"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut stdin = produce.child().stdin.take().unwrap();
        stdin.write_all(big.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let out = produce.wait_output(std::time::Duration::from_secs(30));
        drop(stdin);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("max.message.bytes"), "{err}");
    }
    // Destructive commands say what they touch: delete-records names its
    // partitions or says all of them.
    let err = cli_err(
        addr,
        &["topic", "delete-records", "small", "--before", "end"],
        None,
    );
    assert!(err.contains("--all-partitions"), "{err}");
    // A partition that cannot delete as far does not hide what the others
    // did (deletions cannot be undone): every partition gets its row, and
    // the command fails naming the one that did not.
    admin.create_topic(create("two", 2, 1, &[])).await.unwrap();
    producer
        .produce(produce(
            "two",
            Some(0),
            vec![value(b"a"), value(b"b"), value(b"c")],
        ))
        .await
        .unwrap();
    let out = cli(
        addr,
        &[
            "topic",
            "delete-records",
            "two",
            "--before",
            "2",
            "--all-partitions",
        ],
        None,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    let row0 = stdout
        .lines()
        .find(|l| l.starts_with('0'))
        .unwrap_or_default();
    assert_eq!(
        row0.split_whitespace().take(3).collect::<Vec<_>>(),
        ["0", "2", "2"],
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with('1')), "{stdout}");
    assert!(stderr.contains("partition(s) 1"), "{stderr}");
    // A bad config in an alter that also adds partitions changes nothing.
    let err = cli_err(
        addr,
        &[
            "topic",
            "alter",
            "small",
            "--partitions",
            "3",
            "--config",
            "retention.msec=1",
        ],
        None,
    );
    assert!(err.contains("retention.msec"), "{err}");
    let d = admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "small".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.partitions.len(), 1, "partitions added by a refused alter");
    let out = cli_ok(addr, &["topic", "list"], None);
    assert_eq!(out.lines().count(), 3, "{out}");
    // An offset names a position in one partition.
    cli_ok(
        addr,
        &["topic", "create", "three", "--partitions", "3"],
        None,
    );
    let err = cli_err(addr, &["consume", "three", "--from", "5"], None);
    assert!(err.contains("add --partition"), "{err}");
    cli_ok(
        addr,
        &["consume", "three", "--from", "0", "--partition", "1"],
        None,
    );
}

/// Topic configs are checked as the brokers will read them: a broker's
/// default `min.insync.replicas` above a new topic's replication factor,
/// a padded value, a batch limit no client could decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_configs_are_checked_as_the_brokers_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_toml(
        dir.path(),
        "[broker]\ndefault_replication_factor = 2\n[topic_defaults]\n\"min.insync.replicas\" = 2\n",
    );
    let url = format!("http://{}", server.addr);
    let mut admin = AdminClient::connect(url).await.unwrap();
    expect(
        admin.create_topic(create("one", 1, 1, &[])).await,
        Code::InvalidArgument,
        "INVALID_CONFIG",
        "broker default exceeds the replication factor 1",
    );
    admin
        .create_topic(create("one", 1, 1, &[("min.insync.replicas", "1")]))
        .await
        .unwrap();
    let alter = |set: &[(&str, &str)], delete: &[&str]| pb::AlterTopicConfigRequest {
        name: "one".into(),
        set: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        delete: delete.iter().map(|k| k.to_string()).collect(),
        validate_only: false,
    };
    expect(
        admin
            .alter_topic_config(alter(&[], &["min.insync.replicas"]))
            .await,
        Code::InvalidArgument,
        "INVALID_CONFIG",
        "broker default exceeds the replication factor 1",
    );
    expect(
        admin
            .create_topic(create(
                "big",
                1,
                1,
                &[
                    ("min.insync.replicas", "1"),
                    ("max.message.bytes", "60000000"),
                ],
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_CONFIG",
        "max.message.bytes",
    );
    // Blanks around a value are not stored: the log reads the value the
    // topic shows.
    let d = admin
        .alter_topic_config(alter(&[("retention.ms", " 3600000 ")], &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        d.configs.get("retention.ms").map(String::as_str),
        Some("3600000")
    );
    let d = admin
        .describe_topic(pb::DescribeTopicRequest { name: "one".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        d.configs.get("min.insync.replicas").map(String::as_str),
        Some("1"),
        "a refused alter changed the topic"
    );
    let topics = admin
        .list_topics(pb::ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(topics.len(), 1, "{topics:?}");
}

#[test]
fn malformed_config_files_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("node_id = 1\nlisten_port = 9\n", "listen_port"),
        ("node_id = \"one\"\n", "node_id"),
        ("[topic_defaults]\n\"segment.bytes\" = 5\n", "segment.bytes"),
        ("this is not toml", "malformed config file"),
        // Read before the runtime starts (it sizes the runtime).
        ("worker_threads = 5000\n", "worker_threads"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        // Bounded, in its own directory, without the caller's RUNNEL_…
        // variables: a config accepted by mistake starts a server, which
        // would otherwise hold the run for good.
        let mut command = std::process::Command::new(runnel_bin());
        command
            .args(["server", "--config"])
            .arg(&path)
            .current_dir(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("RUNNEL_")) {
            command.env_remove(key);
        }
        let out = common::Reaped::new(command.spawn().unwrap())
            .wait_output(std::time::Duration::from_secs(30));
        assert!(!out.status.success(), "config {text:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
    }
    // A missing file is named too.
    let out = cli(
        "127.0.0.1:1",
        &["server", "--config", "/nonexistent/runnel.toml"],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/runnel.toml"));
}

/// A fetch asking for more than fits in one gRPC message (here the
/// default 1 MiB against a 64 KiB broker limit, or u32::MAX) is answered
/// with less, from where it asked, and the rest follows. It used to be
/// answered whole, whatever its size: a client whose limit is the
/// broker's could not read the answer, and one request could make the
/// broker read up to a whole segment into memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_larger_than_a_grpc_message_is_cut_to_fit() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start_with_toml(dir.path(), "[broker]\ngrpc_message_bytes_max = 65536\n");
    let url = format!("http://{}", server.addr);
    let mut admin = AdminClient::connect(url.clone()).await.unwrap();
    admin.create_topic(create("big", 1, 1, &[])).await.unwrap();
    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    for i in 0..10 {
        let records = (0..10)
            .map(|j| value(format!("{i}-{j}-{}", "x".repeat(2000)).as_bytes()))
            .collect();
        producer
            .produce(pb::ProduceRequest {
                topic: "big".into(),
                records,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut consumer = ConsumerClient::connect(url).await.unwrap();
    for raw in [false, true] {
        for max_bytes in [0, u32::MAX] {
            let mut offset = 0;
            let mut answers = 0;
            while offset < 100 {
                let r = consumer
                    .fetch(pb::FetchRequest {
                        topic: "big".into(),
                        partition: 0,
                        offset,
                        max_bytes,
                        raw,
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| {
                        panic!("raw {raw}, max_bytes {max_bytes}, offset {offset}: {e}")
                    })
                    .into_inner();
                assert!(r.next_offset > offset, "no progress at {offset}");
                let size = prost::Message::encoded_len(&r);
                assert!(size <= 65536, "an answer of {size} bytes");
                if !raw {
                    assert_eq!(r.records[0].offset, offset);
                }
                offset = r.next_offset;
                answers += 1;
            }
            assert!(
                answers > 1,
                "200 KB came in one answer under a 64 KiB limit"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_may_not_delete_grow_or_write_the_offsets_topic() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let url = format!("http://{}", server.addr);
    let mut admin = AdminClient::connect(url.clone()).await.unwrap();
    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    let client = runnel::client::Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("t", 1, 1, Default::default())
        .await
        .unwrap();
    let committed = vec![pb::PartitionOffset {
        topic_id: String::new(),
        topic: "t".into(),
        partition: 0,
        offset: 0,
        metadata: "kept".into(),
    }];
    client
        .commit_offsets("g", "", 0, committed.clone())
        .await
        .unwrap();
    // Commits that would grow the group's state for nothing, or fill the
    // offsets topic's batches, are refused with the reason.
    let refused = |partition: i32, metadata: String| {
        let client = &client;
        async move {
            let offset = pb::PartitionOffset {
                topic_id: String::new(),
                topic: "t".into(),
                partition,
                offset: 0,
                metadata,
            };
            client
                .commit_offsets("g", "", 0, vec![offset])
                .await
                .unwrap_err()
                .to_string()
        }
    };
    let e = refused(0, "m".repeat(5000)).await;
    assert!(e.contains("offset metadata of 5000 bytes"), "{e}");
    let e = refused(7, String::new()).await;
    assert!(e.contains("t-7") || e.contains("partition 7"), "{e}");
    let offsets = "__consumer_offsets";
    let described = client.describe_topic(offsets).await.unwrap();
    assert_eq!(
        described
            .configs
            .get("max.message.bytes")
            .map(String::as_str),
        Some("16777216"),
        "a group record of many members' assignments fits"
    );
    let partitions = client
        .describe_topic(offsets)
        .await
        .unwrap()
        .partitions
        .len();
    assert!(partitions > 1, "{partitions}");

    fn internal(r: Result<impl std::fmt::Debug, tonic::Status>) {
        expect(
            r,
            Code::InvalidArgument,
            "INVALID_TOPIC",
            "internal to the cluster",
        )
    }
    internal(
        admin
            .delete_topic(pb::DeleteTopicRequest {
                name: offsets.into(),
            })
            .await,
    );
    internal(
        admin
            .delete_records(pb::DeleteRecordsRequest {
                topic: offsets.into(),
                partition: 0,
                offset: -1,
                timeout_ms: 1_000,
            })
            .await,
    );
    internal(
        admin
            .add_partitions(pb::AddPartitionsRequest {
                name: offsets.into(),
                total_partitions: partitions as i32 + 1,
            })
            .await,
    );
    internal(admin.create_topic(create(offsets, 1, 1, &[])).await);
    // What the offsets topic's safety rests on, set or deleted.
    type Change<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let refused_changes: [Change; 5] = [
        (&[("retention.ms", "60000")], &[]),
        (&[], &["retention.ms"]),
        (&[], &["max.message.bytes"]),
        (&[], &["min.insync.replicas"]),
        (&[("unclean.leader.election.enable", "true")], &[]),
    ];
    for (set, delete) in refused_changes {
        internal(
            admin
                .alter_topic_config(pb::AlterTopicConfigRequest {
                    name: offsets.into(),
                    set: set
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    delete: delete.iter().map(|k| k.to_string()).collect(),
                    ..Default::default()
                })
                .await,
        );
    }
    internal(
        producer
            .produce(pb::ProduceRequest {
                topic: offsets.into(),
                partition: Some(0),
                records: vec![value(b"garbage")],
                ..Default::default()
            })
            .await,
    );
    // The streaming path answers in band.
    let p = client.producer(runnel::client::ProducerConfig {
        idempotence: false,
        ..Default::default()
    });
    let mut record = runnel::client::ProducerRecord::value("garbage");
    record.partition = Some(0);
    let err = p
        .send(offsets, record)
        .await
        .unwrap()
        .await
        .expect_err("written to the offsets topic");
    assert_eq!(err.code(), pb::ErrorCode::InvalidTopic, "{err}");
    let addr = server.addr.as_str();
    let err = cli_err(addr, &["topic", "delete", offsets], None);
    assert!(err.contains("internal to the cluster"), "{err}");
    let err = cli_err(
        addr,
        &[
            "topic",
            "delete-records",
            offsets,
            "--before",
            "end",
            "--all-partitions",
        ],
        None,
    );
    assert!(err.contains("internal to the cluster"), "{err}");

    // Nothing changed: the topic, its size and the group's offsets.
    let d = client.describe_topic(offsets).await.unwrap();
    assert_eq!(d.partitions.len(), partitions);
    let got = client
        .fetch_offsets("g", &[("t".to_string(), 0)])
        .await
        .unwrap();
    assert_eq!(got, committed);
}

/// Records decoded for a structured fetch take more room than their
/// batch: the answer stops where its records reach `max_bytes` (a client
/// that sets it to its receive limit could not read the answer, on every
/// try), and the next fetch goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_fetch_answer_stays_within_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let url = format!("http://{}", server.addr);
    let mut admin = AdminClient::connect(url.clone()).await.unwrap();
    admin
        .create_topic(create("small", 1, 1, &[]))
        .await
        .unwrap();
    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    // One batch of 1,000 ten-byte records.
    let records = (0..1000)
        .map(|i| value(format!("r{i:09}").as_bytes()))
        .collect();
    producer
        .produce(pb::ProduceRequest {
            topic: "small".into(),
            records,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut consumer = ConsumerClient::connect(url).await.unwrap();
    let mut offset = 0;
    let mut answers = 0;
    while offset < 1000 {
        let r = consumer
            .fetch(pb::FetchRequest {
                topic: "small".into(),
                partition: 0,
                offset,
                max_bytes: 4096,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let size = prost::Message::encoded_len(&r);
        assert!(size <= 4096, "an answer of {size} bytes");
        for (i, rec) in r.records.iter().enumerate() {
            assert_eq!(rec.offset, offset + i as i64);
        }
        assert_eq!(r.next_offset, offset + r.records.len() as i64);
        offset = r.next_offset;
        answers += 1;
    }
    assert!(answers > 1, "a 30 KB batch decoded into one 4 KiB answer");

    // Raw answers too: batches filling `max_bytes` exactly, plus the
    // answer's own fields, went over it (refused by a client that set it
    // to its receive limit, on every try).
    admin.create_topic(create("raw", 1, 1, &[])).await.unwrap();
    for i in 0..40 {
        producer
            .produce(pb::ProduceRequest {
                topic: "raw".into(),
                records: vec![value(format!("r{i:09}").as_bytes())],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let raw_fetch = |max_bytes| pb::FetchRequest {
        topic: "raw".into(),
        partition: 0,
        offset: 0,
        max_bytes,
        raw: true,
        ..Default::default()
    };
    let one = consumer
        .fetch(raw_fetch(1))
        .await
        .unwrap()
        .into_inner()
        .batches
        .len() as u32;
    let max_bytes = one * 30;
    let r = consumer
        .fetch(raw_fetch(max_bytes))
        .await
        .unwrap()
        .into_inner();
    let size = prost::Message::encoded_len(&r);
    assert!(!r.batches.is_empty());
    assert!(
        size <= max_bytes as usize,
        "a raw answer of {size} bytes > {max_bytes}"
    );
}

/// `runnel produce` reading an input with no end (`tail -f … |`) stops
/// with a clear error, naming the line, as soon as a record is refused:
/// here its topic is deleted midway. It used to take refused records as
/// sent and report them only at the end of input, which never came,
/// while keeping an answer for every line read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stops_at_the_first_refused_record_of_an_endless_input() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    cli_ok(&server.addr, &["topic", "create", "doomed"], None);
    let mut child = common::Reaped::new(
        Command::new(runnel_bin())
            .args([
                "--bootstrap",
                &server.addr,
                "produce",
                "doomed",
                "--acks",
                "leader",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdin = child.child().stdin.take().unwrap();
    // Lines keep coming until the command stops reading (broken pipe);
    // the input is never closed.
    let writer = std::thread::spawn(move || {
        for n in 0u64.. {
            if writeln!(stdin, "line {n}")
                .and_then(|_| stdin.flush())
                .is_err()
            {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        unreachable!()
    });
    // Records are being produced once one can be read.
    let first = cli_ok(
        &server.addr,
        &[
            "consume",
            "doomed",
            "--from",
            "earliest",
            "--max-records",
            "1",
            "--follow",
        ],
        None,
    );
    assert!(first.contains("line "), "{first}");
    cli_ok(&server.addr, &["topic", "delete", "doomed"], None);
    let out =
        tokio::task::spawn_blocking(move || child.wait_output(std::time::Duration::from_secs(60)))
            .await
            .expect("runnel produce stops once its topic is deleted");
    let written = writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("was not produced"), "{stderr}");
    assert!(stderr.contains("line "), "{stderr}");
    assert!(written > 0);
}

/// A command whose reader has gone (`runnel topic list | head -0`) ends
/// quietly with exit code 0, as other Unix tools do; it used to panic
/// ("failed printing to stdout: Broken pipe") with exit code 101.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    cli_ok(&server.addr, &["topic", "create", "listed"], None);
    let mut child = common::Reaped::new(
        Command::new(runnel_bin())
            .args(["--bootstrap", &server.addr, "topic", "list"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The reader goes before the command has anything to print.
    drop(child.child().stdout.take());
    let out = child.wait_output(common::CLI_WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Commands that only report what they did answer in JSON too when
/// asked (`--output json`): topic delete printed nothing, health --node
/// plain text.
#[test]
fn commands_that_report_an_action_answer_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    cli_ok(&server.addr, &["topic", "create", "gone"], None);
    for (args, key) in [
        (
            &["--output", "json", "topic", "delete", "gone"][..],
            "deleted_topic",
        ),
        (
            &["--output", "json", "cluster", "health", "--node"][..],
            "serving",
        ),
    ] {
        let out = cli_ok(&server.addr, args, None);
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
        assert!(v.get(key).is_some(), "{args:?}: {out}");
    }
}

/// A produce request of empty records decodes to about fifty times its
/// size: one made of many is refused before it is decoded, on both
/// produce calls (a 64 MiB one took gigabytes of memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_request_of_empty_records_is_refused_undecoded() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    cli_ok(&server.addr, &["topic", "create", "hollow"], None);
    let mut producer = ProducerClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let hollow = pb::ProduceRequest {
        topic: "hollow".into(),
        partition: Some(0),
        records: vec![pb::Record::default(); 1_000_000],
        ..Default::default()
    };
    expect(
        producer.produce(hollow.clone()).await,
        Code::InvalidArgument,
        "INVALID_REQUEST",
        "far more memory decoded",
    );
    let mut answers = producer
        .produce_stream(tokio_stream::iter(vec![hollow]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an in-band answer");
    assert_eq!(
        answer.error_code,
        pb::ErrorCode::InvalidRequest as i32,
        "{answer:?}"
    );
    assert!(
        answer.error_message.contains("far more memory"),
        "{answer:?}"
    );
    // Records that carry something pass.
    let full = pb::ProduceRequest {
        topic: "hollow".into(),
        partition: Some(0),
        records: vec![value(b"sixteen bytes!!!"); 30_000],
        ..Default::default()
    };
    let r = producer.produce(full).await.unwrap().into_inner();
    assert_eq!((r.base_offset, r.last_offset), (0, 29_999));
}

/// `cluster health --node` against a node that takes the connection but
/// never answers fails within its own bound (it waited for good).
#[test]
fn a_node_health_check_of_a_silent_node_fails_in_time() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Accepts and holds every connection, answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let started = std::time::Instant::now();
    let out = cli(&addr, &["cluster", "health", "--node"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&addr), "{stderr}");
    // Its own bound is 3 s; without one it waited until the test's
    // CLI_WAIT killed it.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "failed only after {:?}: {stderr}",
        started.elapsed()
    );
}

/// A partition that cannot be taken up at start (here a file stands
/// where its directory goes) is logged and left for the next metadata
/// change; the node serves the others. It used to stop the node at every
/// start.
#[test]
fn a_partition_that_cannot_be_opened_does_not_stop_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    cli_ok(&server.addr, &["topic", "create", "blocked"], None);
    cli_ok(&server.addr, &["topic", "create", "broken"], None);
    cli_ok(&server.addr, &["topic", "create", "fine"], None);
    cli_ok(&server.addr, &["produce", "broken"], Some(b"lost\n"));
    cli_ok(&server.addr, &["produce", "fine"], Some(b"kept\n"));
    assert!(server.stop().success());
    let partition = dir.path().join("blocked-0");
    assert!(partition.is_dir(), "{partition:?}");
    std::fs::remove_dir_all(&partition).unwrap();
    std::fs::write(&partition, b"not a directory").unwrap();
    // A log that fails to open: its segment is a directory now.
    let segment = dir.path().join("broken-0").join("00000000000000000000.log");
    std::fs::remove_file(&segment).unwrap();
    std::fs::create_dir(&segment).unwrap();

    let server = ServerProcess::start(dir.path(), &[]);
    let out = cli_ok(
        &server.addr,
        &[
            "consume",
            "fine",
            "--from",
            "earliest",
            "--max-records",
            "1",
        ],
        None,
    );
    assert_eq!(out.trim(), "kept");
    cli_ok(&server.addr, &["topic", "create", "after"], None);
    cli_ok(&server.addr, &["produce", "after"], Some(b"new\n"));
    // Left as they were: nothing was deleted or replaced.
    assert_eq!(std::fs::read(&partition).unwrap(), b"not a directory");
    assert!(segment.is_dir());
}

/// A caller's "no limit" (`Duration::MAX`) is a long wait, not a panic
/// (the client added it to an instant and to another duration).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_calls_take_duration_max_as_a_long_wait() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let client = runnel::client::Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("forever", 1, 1, Default::default())
        .await
        .unwrap();
    let (id, _) = client
        .init_producer_id(std::time::Duration::MAX)
        .await
        .unwrap();
    assert!(id > 0);
    let deleted = client
        .delete_records("forever", 0, -1, std::time::Duration::MAX)
        .await
        .unwrap();
    assert_eq!(deleted.low_watermark, 0);
}

/// TLS without a CA to trust is refused up front: with no roots, every
/// handshake failed as an unknown issuer, reported as a retriable
/// transport error and retried.
#[test]
fn tls_without_a_ca_is_refused_by_name() {
    let err = cli_err(
        "127.0.0.1:9",
        &[
            "--tls-cert",
            "client.pem",
            "--tls-key",
            "client.key",
            "topic",
            "list",
        ],
        None,
    );
    assert!(err.contains("--tls-ca"), "{err}");
}

/// A unary produce the broker cannot decode names its cause in the
/// `runnel-error-code` trailer like every other refusal: one over
/// `grpc_message_bytes_max` is RECORD_TOO_LARGE (it was a bare
/// OUT_OF_RANGE, which clients take for OFFSET_OUT_OF_RANGE), and a
/// compressed call is UNSUPPORTED (a bare UNIMPLEMENTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_unary_produce_names_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start_with_toml(dir.path(), "[broker]\ngrpc_message_bytes_max = 65536\n");
    let url = format!("http://{}", server.addr);
    let mut admin = AdminClient::connect(url.clone()).await.unwrap();
    admin.create_topic(create("t", 1, 1, &[])).await.unwrap();
    let request = |bytes: usize| pb::ProduceRequest {
        topic: "t".into(),
        partition: Some(0),
        records: vec![value(&vec![b'x'; bytes])],
        ..Default::default()
    };
    let mut producer = ProducerClient::connect(url.clone())
        .await
        .unwrap()
        .max_encoding_message_size(1 << 20);
    let e = producer.produce(request(100_000)).await.unwrap_err();
    assert_eq!(error_code(&e), "RECORD_TOO_LARGE", "{e:?}");
    assert!(e.message().contains("grpc_message_bytes_max"), "{e:?}");
    // The header alone: the broker refuses the call before reading it.
    let mut call = tonic::Request::new(request(10));
    call.metadata_mut()
        .insert("grpc-encoding", "gzip".parse().unwrap());
    let e = producer.produce(call).await.unwrap_err();
    assert_eq!(error_code(&e), "UNSUPPORTED", "{e:?}");
}
