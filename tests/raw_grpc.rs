//! Drives a real server with plain gRPC: the generated stubs of the .proto
//! files and tonic, no Runnel client code, as any language's stock client
//! would. Also checks that server reflection and health checking answer,
//! so `grpcurl`-style tools work without the .proto files.

mod common;

use common::ServerProcess;
use runnel_proto::v1 as pb;
use runnel_proto::v1::admin_client::AdminClient;
use runnel_proto::v1::consumer_client::ConsumerClient;
use runnel_proto::v1::producer_client::ProducerClient;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

/// A broker in `dir` with one topic, created with a stock admin client;
/// returns the broker and its URL.
async fn server_with_topic(
    dir: &std::path::Path,
    topic: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) -> (ServerProcess, String) {
    let server = ServerProcess::start(dir, &[]);
    let url = format!("http://{}", server.addr);
    AdminClient::connect(url.clone())
        .await
        .unwrap()
        .create_topic(pb::CreateTopicRequest {
            name: topic.into(),
            partitions,
            replication_factor: 1,
            configs: configs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            validate_only: false,
        })
        .await
        .unwrap();
    (server, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_grpc_client_produces_and_consumes() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = server_with_topic(
        dir.path(),
        "raw",
        2,
        &[("message.timestamp.type", "LogAppendTime")],
    )
    .await;
    let mut admin = AdminClient::connect(url.clone()).await.unwrap();

    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    let records: Vec<pb::Record> = (0..5)
        .map(|i| pb::Record {
            key: Some(format!("k{i}").into()),
            value: Some(format!("v{i}").into()),
            headers: vec![pb::Header {
                key: "h".into(),
                value: Some(format!("x{i}").into()),
            }],
            timestamp_ms: 0,
            offset: 0,
        })
        .collect();
    let resp = producer
        .produce(pb::ProduceRequest {
            topic: "raw".into(),
            partition: Some(1),
            records: records.clone(),
            acks: pb::Acks::All as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (resp.partition, resp.base_offset, resp.last_offset),
        (1, 0, 4)
    );
    assert!(
        resp.log_append_time_ms > 0,
        "LogAppendTime topic stamps the append time"
    );

    // Streaming produce: answers in order, one per request.
    let requests = (0..3).map(|i| pb::ProduceRequest {
        topic: "raw".into(),
        partition: Some(1),
        records: vec![pb::Record {
            value: Some(format!("s{i}").into()),
            ..Default::default()
        }],
        acks: pb::Acks::Leader as i32,
        correlation_id: 100 + i,
        ..Default::default()
    });
    let mut answers = producer
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(a) = answers.next().await {
        let a = a.unwrap();
        seen.push((a.correlation_id, a.base_offset, a.error_code));
    }
    assert_eq!(seen, vec![(100, 5, 0), (101, 6, 0), (102, 7, 0)]);

    let mut consumer = ConsumerClient::connect(url.clone()).await.unwrap();
    let fetched = consumer
        .fetch(pb::FetchRequest {
            topic: "raw".into(),
            partition: 1,
            offset: 2,
            max_bytes: 0,
            max_wait_ms: 0,
            raw: false,
            topic_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<String> = fetched
        .records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(values, ["v2", "v3", "v4", "s0", "s1", "s2"]);
    let offsets: Vec<i64> = fetched.records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (2..8).collect::<Vec<_>>());
    assert_eq!(fetched.records[0].key.as_deref(), Some(&b"k2"[..]));
    assert_eq!(
        fetched.records[0].headers[0].value.as_deref(),
        Some(&b"x2"[..])
    );
    assert_eq!((fetched.high_watermark, fetched.next_offset), (8, 8));

    // Long poll: a fetch at the end waits and returns the new record.
    let mut waiter = consumer.clone();
    let poll = tokio::spawn(async move {
        waiter
            .fetch(pb::FetchRequest {
                topic: "raw".into(),
                partition: 1,
                offset: 8,
                max_wait_ms: 20_000,
                ..Default::default()
            })
            .await
    });
    producer
        .produce(pb::ProduceRequest {
            topic: "raw".into(),
            partition: Some(1),
            records: vec![pb::Record {
                value: Some("late".into()),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let late = poll.await.unwrap().unwrap().into_inner();
    assert_eq!(late.records.len(), 1);
    assert_eq!(late.records[0].offset, 8);

    // Subscribe streams from an offset.
    let mut sub = consumer
        .subscribe(pb::SubscribeRequest {
            topic: "raw".into(),
            partition: 1,
            offset: 6,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = sub.next().await.unwrap().unwrap();
    assert_eq!(first.records.first().map(|r| r.offset), Some(6));
    // A subscription the broker refuses ends with the reason as its status
    // (in the response, or as the stream's first item).
    let refused = match consumer
        .subscribe(pb::SubscribeRequest {
            topic: "raw".into(),
            partition: 9,
            ..Default::default()
        })
        .await
    {
        Err(status) => status,
        Ok(stream) => stream.into_inner().next().await.unwrap().unwrap_err(),
    };
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("partition"), "{refused:?}");

    let offsets = consumer
        .list_offsets(pb::ListOffsetsRequest {
            topic: "raw".into(),
            partition: 1,
            spec: pb::OffsetSpec::Earliest as i32,
            timestamp_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((offsets.offset, offsets.high_watermark), (0, 9));

    let meta = admin
        .metadata(pb::MetadataRequest { topics: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.brokers.len(), 1);
    assert_eq!(meta.topics[0].partitions.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_and_health_answer() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let url = format!("http://{}", server.addr);

    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    // Every client-facing service, for probes that name one.
    for service in [
        "",
        "runnel.v1.Producer",
        "runnel.v1.Consumer",
        "runnel.v1.Admin",
        "runnel.v1.ConsumerGroups",
        "runnel.v1.Security",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{service}: {e}"))
            .into_inner();
        assert_eq!(status.status, 1, "{service} SERVING");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "runnel.v1.Producer",
        "runnel.v1.Consumer",
        "runnel.v1.Admin",
        "runnel.v1.ConsumerGroups",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

/// A client that breaks its produce stream in the middle of a message: the
/// batches answered before stay, nothing of the broken one is appended, and
/// the partition takes the next produce at the next offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_stream_broken_mid_message_appends_nothing_of_it() {
    use http_body_util::StreamBody;
    use tower::ServiceExt;

    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = server_with_topic(dir.path(), "cut", 1, &[]).await;
    let request = |id: u64, value: String| pb::ProduceRequest {
        topic: "cut".into(),
        partition: Some(0),
        records: vec![pb::Record {
            value: Some(value.into()),
            ..Default::default()
        }],
        acks: pb::Acks::Leader as i32,
        correlation_id: id,
        ..Default::default()
    };
    let grpc = |m: &pb::ProduceRequest| runnel_proto::wire::encode(m).unwrap().concat();

    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (frames, rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let call = http::Request::builder()
        .method("POST")
        .uri("/runnel.v1.Producer/ProduceStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
        .unwrap();
    let first = grpc(&request(1, "kept".into()));
    frames
        .send(Ok(http_body::Frame::data(first.into())))
        .await
        .unwrap();
    let response = channel.oneshot(call).await.unwrap();
    let mut answers = runnel_proto::wire::DecodeStream::<_, pb::ProduceResponse>::new(
        response.into_body(),
        1 << 20,
    );
    let answer = answers.next().await.unwrap().unwrap();
    assert_eq!(
        (answer.correlation_id, answer.base_offset, answer.error_code),
        (1, 0, 0)
    );

    // Half of a 20 KB message, then the client goes away.
    let broken = grpc(&request(2, "x".repeat(20_000)));
    frames
        .send(Ok(http_body::Frame::data(broken[..10_000].to_vec().into())))
        .await
        .unwrap();
    frames
        .send(Err(tonic::Status::cancelled("client gone")))
        .await
        .unwrap();
    drop(frames);
    while let Some(a) = answers.next().await {
        assert!(a.is_err(), "no answer for a broken message: {a:?}");
    }

    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    let next = producer
        .produce(request(3, "after".into()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((next.base_offset, next.error_code), (1, 0));
    let mut consumer = ConsumerClient::connect(url).await.unwrap();
    let fetched = consumer
        .fetch(pb::FetchRequest {
            topic: "cut".into(),
            partition: 0,
            offset: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<Vec<u8>> = fetched
        .records
        .iter()
        .map(|r| r.value.clone().unwrap().to_vec())
        .collect();
    assert_eq!(values, [b"kept".to_vec(), b"after".to_vec()]);
}

/// acks=none on a stream, with idempotent sequence numbers: every batch is
/// appended in the order sent (each used to be appended in a task of its
/// own, so batches raced for the log and, out of sequence, were dropped
/// with only a log line), and the answers carry no offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_none_keeps_a_streams_order() {
    const BATCHES: i32 = 300;
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = server_with_topic(dir.path(), "none", 1, &[]).await;
    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    let id = producer
        .init_producer_id(pb::InitProducerIdRequest {})
        .await
        .unwrap()
        .into_inner();
    let requests = (0..BATCHES).map(move |i| pb::ProduceRequest {
        topic: "none".into(),
        partition: Some(0),
        records: vec![pb::Record {
            value: Some(format!("n{i}").into()),
            ..Default::default()
        }],
        acks: pb::Acks::None as i32,
        correlation_id: i as u64,
        producer_id: id.producer_id,
        producer_epoch: id.producer_epoch,
        base_sequence: i,
        ..Default::default()
    });
    let mut answers = producer
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    while let Some(a) = answers.next().await {
        let a = a.unwrap();
        assert_eq!((a.error_code, a.base_offset), (0, -1), "{a:?}");
        answered += 1;
    }
    assert_eq!(answered, BATCHES);
    let mut consumer = ConsumerClient::connect(url).await.unwrap();
    let mut values = Vec::new();
    while values.len() < BATCHES as usize {
        let fetched = consumer
            .fetch(pb::FetchRequest {
                topic: "none".into(),
                partition: 0,
                offset: values.len() as i64,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!fetched.records.is_empty(), "stopped at {}", values.len());
        values.extend(
            fetched
                .records
                .iter()
                .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()),
        );
    }
    let expected: Vec<String> = (0..BATCHES).map(|i| format!("n{i}")).collect();
    assert_eq!(values, expected);
}

/// The broker's anonymous resident memory, in bytes (the pages its heap
/// holds; the page cache of mapped segments is not counted).
fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/<pid>/status");
    kib * 1024
}

/// A proxy to `target` for one connection. Once `stall` is set, it
/// stops reading the server's side (as a client that stops reading its
/// socket) and holds back what the client sends until that contains
/// `release_after` copies of `marker`, then passes it on in one piece:
/// the server reads those requests together, before it can answer any.
/// Returns its URL.
async fn stalling_proxy(
    target: String,
    stall: Arc<AtomicBool>,
    marker: &'static [u8],
    release_after: usize,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(target).await.unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let upstream_stall = stall.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            let mut held = Vec::new();
            loop {
                let n = client_read.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                if upstream_stall.load(Ordering::SeqCst) {
                    held.extend_from_slice(&buf[..n]);
                    let copies = held.windows(marker.len()).filter(|w| *w == marker).count();
                    if copies < release_after {
                        continue;
                    }
                    if server_write.write_all(&held).await.is_err() {
                        return;
                    }
                    // Released: from now on, passed on as it comes.
                    break;
                }
                if server_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        });
        let mut buf = vec![0u8; 16 << 10];
        while !stall.load(Ordering::SeqCst) {
            let n = server_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 || client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
        // Holds both sockets open, reading nothing more.
        std::future::pending::<()>().await;
    });
    url
}

/// Unary fetches whose client stops reading its socket are read under
/// the same budgets as subscriptions: one connection holds at most its
/// share in the broker. Unbounded, 40 such fetches of 16 MiB from the
/// active segment (each read a heap copy) held 640 MiB, and another
/// connection was still served, so nothing else showed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_unary_fetches_hold_a_bounded_share_of_the_broker() {
    unread_fetches_hold_a_bounded_share(true).await;
}

/// The same for structured answers (`raw` off, what stock clients ask
/// for) of small records, which the encoding copies: the budget went back
/// once an answer was encoded, while the copy waited in the send queue,
/// and 40 stalled fetches held 640 MiB again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_structured_fetches_hold_a_bounded_share_of_the_broker() {
    unread_fetches_hold_a_bounded_share(false).await;
}

async fn unread_fetches_hold_a_bounded_share(raw: bool) {
    // 20 requests of 900 KiB: one large record each, or 900 of 1 KiB.
    const RECORDS: usize = 20;
    const STALLED: usize = 40;
    let per_request = if raw { 1 } else { 900 };
    let record_bytes = (900 << 10) / per_request;
    let dir = tempfile::tempdir().unwrap();
    // One segment, written without reservations: every read of it is a
    // positional read into a buffer of its own (a closed segment's would
    // be a slice of its map).
    let (server, url) = server_with_topic(dir.path(), "big", 1, &[("preallocate", "false")]).await;
    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    for i in 0..RECORDS {
        let answer = producer
            .produce(pb::ProduceRequest {
                topic: "big".into(),
                partition: Some(0),
                records: (0..per_request)
                    .map(|_| pb::Record {
                        value: Some(vec![i as u8; record_bytes].into()),
                        ..Default::default()
                    })
                    .collect(),
                acks: pb::Acks::Leader as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.error_code, 0, "{answer:?}");
    }
    let fetch = |max_bytes: u32| pb::FetchRequest {
        topic: "big".into(),
        partition: 0,
        offset: 0,
        max_bytes,
        raw,
        ..Default::default()
    };
    // Flow control does not hold the answers back: the client's windows
    // are as large as HTTP/2 allows. Its socket is what stops.
    let stall = Arc::new(AtomicBool::new(false));
    // Each request names the topic once: field 1, length 3, "big".
    let proxy = stalling_proxy(server.addr.clone(), stall.clone(), b"\x0a\x03big", STALLED).await;
    let channel = tonic::transport::Endpoint::from_shared(proxy)
        .unwrap()
        .initial_connection_window_size(i32::MAX as u32)
        .initial_stream_window_size(i32::MAX as u32)
        .connect()
        .await
        .unwrap();
    let stalled = ConsumerClient::new(channel).max_decoding_message_size(64 << 20);
    stalled.clone().fetch(fetch(1 << 10)).await.unwrap();
    let before = rss_anon(server.pid());
    stall.store(true, Ordering::SeqCst);
    let pending: Vec<_> = (0..STALLED)
        .map(|_| {
            let mut client = stalled.clone();
            let request = fetch(16 << 20);
            tokio::spawn(async move { client.fetch(request).await })
        })
        .collect();
    // Another connection is served meanwhile; by then the broker has
    // had time to read the stalled fetches, and two seconds more.
    let mut other = ConsumerClient::connect(url)
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let served = other.fetch(fetch(1 << 20)).await.unwrap().into_inner();
    assert!(!served.batches.is_empty() || !served.records.is_empty());
    let watched = std::time::Instant::now();
    let mut most = before;
    while watched.elapsed() < std::time::Duration::from_secs(2) {
        most = most.max(rss_anon(server.pid()));
        // A sampling interval, not a wait for something to happen.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // One connection's budget is 16 MiB; allow the rest for allocator
    // slack and the other fetch.
    assert!(
        most < before + (128 << 20),
        "{} MiB of answers held for one connection",
        (most - before) >> 20
    );
    for call in pending {
        call.abort();
    }
}

/// A fetch past the log end is refused at once with OFFSET_OUT_OF_RANGE,
/// even with a long poll asked for. Waited out first (as fetches did for
/// a while), records appended meanwhile brought the high watermark past
/// the offset, and the fetch answered from there: the records between
/// the old log end and the offset were skipped without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_past_the_log_end_is_refused_not_waited_out() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = server_with_topic(dir.path(), "ahead", 1, &[]).await;
    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    let produce = |i: usize| pb::ProduceRequest {
        topic: "ahead".into(),
        partition: Some(0),
        records: vec![pb::Record {
            value: Some(format!("r{i}").into()),
            ..Default::default()
        }],
        acks: pb::Acks::Leader as i32,
        ..Default::default()
    };
    producer.produce(produce(0)).await.unwrap();
    // Offset 3: two past the log end (1), with a long poll asked for and
    // nothing appended meanwhile: refused at once, not waited out. (A
    // fetch waiting there would be served from offset 3 by the next
    // appends, records 1 and 2 skipped.) Records produced while it was
    // in flight raced it: once they reached offset 3 first, waiting there
    // was right.
    let mut consumer = ConsumerClient::connect(url).await.unwrap();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        consumer.fetch(pb::FetchRequest {
            topic: "ahead".into(),
            partition: 0,
            offset: 3,
            max_wait_ms: 60_000,
            ..Default::default()
        }),
    )
    .await
    .expect("a fetch past the log end was waited out");
    match answer {
        Err(status) => assert_eq!(
            common::error_code(&status),
            "OFFSET_OUT_OF_RANGE",
            "{status:?}"
        ),
        Ok(r) => panic!("served past the log end: {:?}", r.into_inner()),
    }
    // The records after the old end are all served from it.
    for i in 1..6 {
        producer.produce(produce(i)).await.unwrap();
    }
    let r = consumer
        .fetch(pb::FetchRequest {
            topic: "ahead".into(),
            partition: 0,
            offset: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.records.first().map(|r| r.offset), Some(1));
}

/// A pre-encoded batch that names no partition goes where its first
/// record's key hashes to, as `records` do (it went round-robin); a
/// request with neither records nor batch is refused as INVALID_REQUEST
/// even when it names no partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_batch_without_a_partition_goes_where_its_key_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = server_with_topic(dir.path(), "keyed", 8, &[]).await;
    let mut producer = ProducerClient::connect(url).await.unwrap();
    for i in 0..8 {
        let key = format!("key-{i}");
        let mut builder = runnel_storage::BatchBuilder::new();
        builder.push(1, Some(key.as_bytes()), Some(b"v"), &[]);
        let resp = producer
            .produce(pb::ProduceRequest {
                topic: "keyed".into(),
                batch: builder.build().freeze(),
                acks: pb::Acks::Leader as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.partition,
            runnel::partitioner::partition_for_key(key.as_bytes(), 8),
            "{key}"
        );
    }
    let status = producer
        .produce(pb::ProduceRequest {
            topic: "keyed".into(),
            acks: pb::Acks::Leader as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(common::error_code(&status), "INVALID_REQUEST", "{status:?}");
}

/// A replica fetch and an OffsetForLeaderEpoch name the follower's topic
/// by id: a leader hosting another topic of the same name (deleted and
/// created again, one of the brokers behind; both at leader epoch 0)
/// refuses with UNKNOWN_TOPIC_ID instead of serving the other topic's
/// records or counting the follower's progress for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_calls_for_another_topic_of_the_same_name_are_refused() {
    use runnel_proto::v1::internal as ipb;
    use runnel_proto::v1::internal::replication_client::ReplicationClient;
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = server_with_topic(dir.path(), "twin", 1, &[]).await;
    let mut producer = ProducerClient::connect(url.clone()).await.unwrap();
    let answer = producer
        .produce(pb::ProduceRequest {
            topic: "twin".into(),
            partition: Some(0),
            records: vec![pb::Record {
                value: Some(b"x".to_vec().into()),
                ..Default::default()
            }],
            acks: pb::Acks::Leader as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.error_code, 0, "{answer:?}");
    let topic_id = AdminClient::connect(url.clone())
        .await
        .unwrap()
        .metadata(pb::MetadataRequest {
            topics: vec!["twin".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .topics[0]
        .topic_id
        .clone();
    assert!(!topic_id.is_empty());
    let mut replication = ReplicationClient::connect(url).await.unwrap();
    let fetch = |topic_id: &str| ipb::ReplicaFetchRequest {
        replica_id: 99,
        partitions: vec![ipb::ReplicaFetchPartition {
            topic: "twin".into(),
            partition: 0,
            fetch_offset: 0,
            current_leader_epoch: 0,
            topic_id: topic_id.into(),
            ..Default::default()
        }],
        max_bytes: 1 << 20,
        ..Default::default()
    };
    for (id, code, served) in [
        ("another-topics-id", pb::ErrorCode::UnknownTopicId, false),
        (topic_id.as_str(), pb::ErrorCode::None, true),
    ] {
        let answer = replication
            .replica_fetch(tokio_stream::iter([fetch(id)]))
            .await
            .unwrap()
            .into_inner()
            .next()
            .await
            .unwrap()
            .unwrap();
        let p = &answer.partitions[0];
        assert_eq!(p.error_code, code as i32, "{id}");
        assert_eq!(!p.batches.is_empty(), served, "{id}");
        let epochs = replication
            .offset_for_leader_epoch(ipb::OffsetForLeaderEpochRequest {
                topic: "twin".into(),
                partition: 0,
                leader_epoch: 0,
                current_leader_epoch: 0,
                topic_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(epochs.error_code, code as i32, "{id}");
    }
}
