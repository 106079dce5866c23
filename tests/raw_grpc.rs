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
    let status = health
        .check(HealthCheckRequest {
            service: "runnel.v1.Producer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, 1, "SERVING");

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
