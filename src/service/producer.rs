//! `runnel.v1.Producer`.

use std::pin::Pin;
use std::sync::Arc;

use runnel_proto::v1 as pb;
use runnel_proto::v1::producer_server::{Producer, ProducerServer};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::broker::Broker;
use crate::rpc::RawStream;
use crate::security::{self, Direction};
use runnel_controller::security::{Operation, ResourceType};

/// Serves produce requests.
#[derive(Debug, Clone)]
pub struct ProducerService {
    broker: Arc<Broker>,
}

impl ProducerService {
    /// Wraps a broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::ProduceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Producer for ProducerService {
    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceResponse>, Status> {
        let topic = request.get_ref().topic.clone();
        super::counted(
            &self.broker,
            "produce",
            super::refuse_internal(&topic, "write")
                .map_err(Status::from)
                .and_then(|()| {
                    security::check(
                        &self.broker,
                        &request,
                        ResourceType::Topic,
                        &topic,
                        Operation::Write,
                    )
                }),
        )?;
        let principal = security::principal_of(&request);
        let req = request.into_inner();
        // Quota exceeded: the request waits before it is appended (it
        // does not fail). Waiting before, not after, keeps concurrent
        // calls to the rate too: each one's delay counts the bytes of
        // those before it, so their appends are spread out. A request
        // dropped while it waits is not charged.
        security::charge(
            &self.broker,
            &principal,
            Direction::Produce,
            prost::Message::encoded_len(&req) as u64,
        )
        .hold()
        .await;
        let response = self.broker.produce(req).await?;
        if self.broker.take_failpoint(DROP_RESPONSE_FAILPOINT) {
            return Err(Status::unavailable(
                "failpoint: response dropped after append",
            ));
        }
        Ok(Response::new(response))
    }

    async fn init_producer_id(
        &self,
        request: Request<pb::InitProducerIdRequest>,
    ) -> Result<Response<pb::InitProducerIdResponse>, Status> {
        // As Kafka: cluster Write (its IdempotentWrite), or Write on some
        // topic. Without a check, any principal could allocate ids in a
        // loop, and every thousandth call grows the metadata log.
        let principal = security::principal_of(&request);
        if let Some(s) = self.broker.security() {
            if !s.allowed(&principal, ResourceType::Cluster, "", Operation::Write)
                && !s.allowed_on_any(&principal, ResourceType::Topic, Operation::Write)
            {
                return Err(security::permission_denied(format!(
                    "principal '{}' may not write the cluster or any topic, so may not get a producer id",
                    principal.name()
                )));
            }
        }
        Ok(Response::new(self.broker.init_producer_id().await?))
    }

    type ProduceStreamStream = ResponseStream;

    async fn produce_stream(
        &self,
        request: Request<Streaming<pb::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let principal = security::principal_of(&request);
        let login = security::login_of(&request);
        Ok(Response::new(produce_stream(
            self.broker.clone(),
            principal,
            login,
            request.into_inner(),
        )))
    }
}

/// The `Producer` service: `ProduceStream` framed by [`crate::rpc`] (its
/// batches skip tonic's codec copies), the other methods by tonic.
pub fn producer_server(broker: Arc<Broker>, message_max: usize) -> ProducerRawServer {
    let service = ProducerService::new(broker.clone());
    // Shared by both produce calls of every connection.
    let budget = Arc::new(tokio::sync::Semaphore::new(
        broker.config().broker.queued_request_bytes(),
    ));
    let tonic = ProducerServer::new(service.clone())
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);
    // The unary call too, for the check before decoding (tonic's codec
    // decodes first).
    let produce = RawStream::unary(tonic, PRODUCE_PATH, message_max, move |request| {
        let service = service.clone();
        async move {
            Producer::produce(&service, request)
                .await
                .map(Response::into_inner)
        }
    })
    .with_check(produce_request_bound)
    .with_budget(budget.clone());
    RawStream::new(produce, PRODUCE_STREAM_PATH, message_max, move |request| {
        let principal = security::principal_of(&request);
        let login = security::login_of(&request);
        Ok(produce_stream(
            broker.clone(),
            principal,
            login,
            request.into_inner(),
        ))
    })
    .with_check(produce_request_bound)
    .with_budget(budget)
}

/// The producer service as served: both produce calls framed by
/// [`crate::rpc`], every other method by tonic.
pub type ProducerRawServer = RawStream<
    RawStream<ProducerServer<ProducerService>, pb::ProduceRequest, pb::ProduceResponse>,
    pb::ProduceRequest,
    pb::ProduceResponse,
>;

/// The unary produce call's HTTP/2 path.
pub const PRODUCE_PATH: &str = "/runnel.v1.Producer/Produce";

/// Memory a decoded record or header takes at most, beyond its bytes
/// (`pb::Record` is 104 bytes, `pb::Header` 56).
const ENTRY_DECODED_BYTES: usize = 112;
/// What a request's entries may take decoded: eight times the request,
/// and 64 MiB whatever its size.
const DECODED_PER_WIRE_BYTE: usize = 8;
const DECODED_FREE_BYTES: usize = 64 << 20;

/// Refuses a produce request whose `records` (and their headers) would
/// take far more memory decoded than on the wire: an empty record is two
/// bytes there and over a hundred decoded, so a 64 MiB request of them
/// decoded to gigabytes before anything looked at it. Allowed: entries
/// taking, decoded, up to eight times the request or 64 MiB, whichever is
/// more (a request of half a million one-byte records passes). A request
/// this walk cannot follow is left to the decoder, which says why.
pub(crate) fn produce_request_bound(mut buf: &mut dyn bytes::Buf) -> Result<(), Status> {
    use bytes::Buf;
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    const RECORDS: u32 = 3; // ProduceRequest.records
    const HEADERS: u32 = 3; // Record.headers
    let allowed =
        (buf.remaining() * DECODED_PER_WIRE_BYTE).max(DECODED_FREE_BYTES) / ENTRY_DECODED_BYTES;
    let mut entries = 0usize;
    let mut walk = || -> Result<bool, prost::DecodeError> {
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            if tag != RECORDS || wire_type != WireType::LengthDelimited {
                skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
                continue;
            }
            let len = decode_varint(&mut buf)? as usize;
            if len > buf.remaining() {
                return Ok(true);
            }
            entries += 1;
            let mut record = Buf::take(&mut buf, len);
            while record.has_remaining() {
                let (tag, wire_type) = decode_key(&mut record)?;
                if tag == HEADERS {
                    entries += 1;
                }
                skip_field(wire_type, tag, &mut record, DecodeContext::default())?;
            }
            if entries > allowed {
                return Ok(false);
            }
        }
        Ok(true)
    };
    match walk() {
        Ok(false) => Err(crate::error::BrokerError::InvalidRequest {
            reason: format!(
                "a produce request of {entries} records and headers or more in so few bytes \
                 would take far more memory decoded than sent (at most {allowed} here): send \
                 fewer per request, or an encoded batch"
            ),
        }
        .into()),
        Ok(true) | Err(_) => Ok(()),
    }
}

/// The streaming produce call's HTTP/2 path, served by [`produce_stream`]
/// through [`crate::rpc::RawStream`].
pub const PRODUCE_STREAM_PATH: &str = "/runnel.v1.Producer/ProduceStream";

/// A stream of produce requests as [`produce_stream`] reads it.
pub trait ProduceRequests:
    Stream<Item = Result<pb::ProduceRequest, Status>> + Send + Unpin + 'static
{
    /// Whether a request is being received under a share of the broker's
    /// receive budget ([`runnel_proto::wire::DecodeStream::holds_budget`]).
    fn holds_budget(&self) -> bool {
        false
    }
}

impl ProduceRequests for Streaming<pb::ProduceRequest> {}

impl ProduceRequests for crate::rpc::Requests<pb::ProduceRequest> {
    fn holds_budget(&self) -> bool {
        runnel_proto::wire::DecodeStream::holds_budget(self)
    }
}

/// Answers a stream of produce requests from `principal`.
pub fn produce_stream<S: ProduceRequests>(
    broker: Arc<Broker>,
    principal: security::Principal,
    login: Option<security::Login>,
    mut input: S,
) -> ResponseStream {
    // Requests are appended in arrival order, one at a time, so a
    // partition's batches keep the order the client sent them in; the
    // waits for replicas (acks=all) overlap, and answers leave in
    // request order.
    let output = async_stream(move |tx| async move {
        use futures_util::stream::FuturesOrdered;
        let mut waiting = FuturesOrdered::new();
        let mut open = true;
        let mut stopping = false;
        // Why the stream ends once the answers owed are sent, if not at
        // the client's end of input.
        let mut end_with: Option<Status> = None;
        // While the principal's quota clock (which its other streams move
        // too) is too far ahead, no request is read: answers are held at
        // most ten seconds each, so streams reading on moved a multiple of
        // the quota together. Answers owed still go out meanwhile.
        let mut admit_at: Option<tokio::time::Instant> = None;
        loop {
            // Between messages only: a message being received holds a
            // share of the broker's receive budget until it is whole, and
            // waiting out the quota then held it from every principal.
            if open && admit_at.is_none() && !input.holds_budget() {
                admit_at = security::admission_at(&broker, &principal, Direction::Produce);
            }
            tokio::select! {
                () = tokio::time::sleep_until(admit_at.unwrap_or_else(tokio::time::Instant::now)), if admit_at.is_some() => {
                    admit_at = None;
                    continue;
                }
                // The broker stops: no more requests are read; those read
                // are answered, then the stream ends with UNAVAILABLE (the
                // client sends the rest to the partitions' new leaders).
                () = broker.stopping(), if open => {
                    open = false;
                    stopping = true;
                }
                next = input.next(), if open && admit_at.is_none() && waiting.len() < STREAM_IN_FLIGHT_MAX => {
                    let req = match next {
                        Some(Ok(req)) => req,
                        Some(Err(status)) => {
                            // A stream the client broke (a reset, a crash,
                            // a call dropped) is no refusal.
                            if status.code() != tonic::Code::Cancelled {
                                broker
                                    .metrics()
                                    .request_error("produce", crate::rpc::undecodable(&status).0);
                            }
                            // The request cannot be read (too large for
                            // gRPC, or not a message), and nothing after it
                            // can: it is answered in its place, after the
                            // answers owed for earlier requests, and the
                            // stream ends once those are sent. A client
                            // then knows which batch was refused, and
                            // sends the later ones again.
                            waiting.push_back(Box::pin(std::future::ready(undecodable_response(&status)))
                                as Pin<Box<dyn std::future::Future<Output = pb::ProduceResponse> + Send>>);
                            open = false;
                            continue;
                        }
                        None => {
                            open = false;
                            continue;
                        }
                    };
                    // Checked for every request, as the ACLs are: a user
                    // removed, or whose password changed, is not served
                    // on by a stream it opened before.
                    if let Err(status) = security::check_login(&broker, login.as_ref()) {
                        open = false;
                        end_with = Some(status);
                        continue;
                    }
                    let correlation_id = req.correlation_id;
                    let (topic, partition) = (req.topic.clone(), req.partition.unwrap_or(-1));
                    let allowed = broker.security().is_none_or(|s| {
                        s.allowed(&principal, ResourceType::Topic, &topic, Operation::Write)
                    });
                    let delay = security::throttle(
                        &broker,
                        &principal,
                        Direction::Produce,
                        prost::Message::encoded_len(&req) as u64,
                    );
                    let answer_at = security::answer_deadline(delay);
                    let appended = if let Err(e) = super::refuse_internal(&topic, "write") {
                        broker.metrics().request_error("produce", e.code());
                        Err(e)
                    } else if allowed {
                        broker.produce_append(req).await
                    } else {
                        let e = crate::error::BrokerError::NotAuthorized {
                            reason: format!(
                                "principal '{}' may not Write topic '{topic}'",
                                principal.name()
                            ),
                        };
                        broker.metrics().request_error("produce", e.code());
                        Err(e)
                    };
                    let broker = broker.clone();
                    waiting.push_back(Box::pin(async move {
                        let result = match appended {
                            Ok(a) => broker.produce_complete(a).await,
                            Err(e) => Err(e),
                        };
                        let response = result.unwrap_or_else(|e| failed_response(correlation_id, topic, partition, e));
                        // Quota exceeded: the answer waits, it does not fail.
                        security::hold_until(answer_at).await;
                        response
                    }));
                }
                Some(response) = waiting.next(), if !waiting.is_empty() => {
                    if response.error_code == 0 && broker.take_failpoint(DROP_RESPONSE_FAILPOINT) {
                        // As if the connection broke after the append.
                        let _ = tx.send(Err(Status::unavailable("failpoint: response dropped after append"))).await;
                        return;
                    }
                    if tx.send(Ok(response)).await.is_err() {
                        return; // client went away
                    }
                }
                else => {
                    if stopping {
                        end_with.get_or_insert_with(|| Status::unavailable("the broker is shutting down"));
                    }
                    if let Some(status) = end_with {
                        let _ = tx.send(Err(status)).await;
                    }
                    return;
                }
            }
        }
    });
    output
}

/// One-shot failpoint (file `DATA_DIR/failpoints/produce-drop-response`,
/// with `broker.failpoints = true`): the next successful produce is
/// appended but its answer is replaced by a broken call, as a lost
/// connection would.
const DROP_RESPONSE_FAILPOINT: &str = "produce-drop-response";

/// Batches of one stream appended but not yet answered.
const STREAM_IN_FLIGHT_MAX: usize = 64;

/// The in-stream answer for a failed request.
fn failed_response(
    correlation_id: u64,
    topic: String,
    partition: i32,
    e: crate::error::BrokerError,
) -> pb::ProduceResponse {
    pb::ProduceResponse {
        correlation_id,
        topic,
        partition,
        base_offset: -1,
        last_offset: -1,
        log_append_time_ms: -1,
        log_start_offset: -1,
        error_code: e.code() as i32,
        // As a unary call's status says it: the detail of an internal
        // failure is logged, not sent (a stream sent it, and logged none).
        error_message: e.client_message(),
    }
}

/// The in-stream answer for a request the stream could not decode
/// ([`crate::rpc::undecodable`]).
fn undecodable_response(status: &Status) -> pb::ProduceResponse {
    let (code, message) = crate::rpc::undecodable(status);
    pb::ProduceResponse {
        partition: -1,
        base_offset: -1,
        last_offset: -1,
        log_append_time_ms: -1,
        log_start_offset: -1,
        error_code: code as i32,
        error_message: message,
        ..Default::default()
    }
}

/// Runs `body` as a task feeding a channel of 16 items (how far it may
/// run ahead of the stream's reader), returned as a stream.
pub(crate) fn async_stream<T, F, Fut>(body: F) -> Pin<Box<dyn Stream<Item = T> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// [`async_stream`] with a channel of `capacity` items, whose task is stopped as soon as the stream is
/// dropped (the client gone, its stream reset), wherever it waits: a
/// subscription waiting out a quota's delay, for records, or for room in
/// the read budgets otherwise learnt that its client had gone only at its
/// next send, holding its place in the budgets' queues (and hours, behind
/// a quota clock far ahead). For bodies that are safe to stop at any
/// await.
pub(crate) fn abortable_stream<T, F, Fut>(
    capacity: usize,
    body: F,
) -> Pin<Box<dyn Stream<Item = T> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    /// The receiving end, aborting the task when dropped.
    struct TaskStream<T> {
        rx: tokio_stream::wrappers::ReceiverStream<T>,
        task: tokio::task::JoinHandle<()>,
    }
    impl<T> Stream for TaskStream<T> {
        type Item = T;
        fn poll_next(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            Pin::new(&mut self.rx).poll_next(cx)
        }
    }
    impl<T> Drop for TaskStream<T> {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    let task = tokio::spawn(body(tx));
    Box::pin(TaskStream {
        rx: tokio_stream::wrappers::ReceiverStream::new(rx),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(req: &pb::ProduceRequest) -> Result<(), Status> {
        let bytes = prost::Message::encode_to_vec(req);
        produce_request_bound(&mut &bytes[..])
    }

    /// A stream's answer to an internal failure hides its detail, as a
    /// unary call's status does (it sent file paths and I/O errors).
    #[test]
    fn a_streams_failed_answer_hides_internal_details() {
        let e = crate::error::BrokerError::Storage(runnel_storage::StorageError::Io {
            path: "/data/t-0/0.log".into(),
            source: std::io::Error::other("No space left on device"),
        });
        let r = failed_response(1, "t".into(), 0, e);
        assert_eq!(r.error_code, pb::ErrorCode::StorageError as i32);
        assert!(!r.error_message.contains("/data"), "{}", r.error_message);
    }

    #[test]
    fn empty_records_or_headers_in_bulk_are_refused_before_decoding() {
        let records = |n: usize, record: pb::Record| pb::ProduceRequest {
            topic: "t".into(),
            records: vec![record; n],
            ..Default::default()
        };
        let filled = pb::Record {
            value: Some(vec![7u8; 20].into()),
            ..Default::default()
        };
        // Half a million one-byte records: about 10 MB decoded.
        let tiny = pb::Record {
            value: Some(vec![7u8; 1].into()),
            ..Default::default()
        };
        assert!(bound(&records(500_000, tiny)).is_ok());
        assert!(bound(&records(500_000, pb::Record::default())).is_ok());
        assert!(bound(&records(1_000_000, filled)).is_ok());
        let refused = bound(&records(1_000_000, pb::Record::default())).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        // Headers count too: one record of many empty ones.
        let headed = pb::Record {
            headers: vec![pb::Header::default(); 1_000_000],
            ..Default::default()
        };
        assert!(bound(&records(1, headed)).is_err());
        // Bytes that are no request are the decoder's to refuse.
        assert!(produce_request_bound(&mut &[0xffu8, 0xff, 0xff][..]).is_ok());
    }
}
