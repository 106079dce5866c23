//! The calls that carry record batches, framed by
//! [`runnel_proto::wire`] instead of tonic's codec, on both ends.
//!
//! - [`RawStream`] wraps a tonic-generated service and serves one of its
//!   bidirectional-streaming methods itself: requests are decoded from the
//!   received DATA frames without copying their batches, and answers are
//!   sent in chunks that share the batches' memory. Every other method of
//!   the service goes through tonic as before.
//! - [`call_stream`] opens such a call from a client; [`RawStream::unary`]
//!   and [`call_unary`] do the same for a unary call (`Consumer/Fetch`).
//!
//! The bytes on the wire are ordinary gRPC, so other clients and servers
//! interoperate with these paths (`benches/RESULTS.md`, rows 22, 24, 25).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prost::Message;
use runnel_proto::wire::{DecodeCheck, DecodeStream, EncodeBody};
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;
use tower::{Service, ServiceExt};

/// Longest wait of a request for room in the receive budget
/// ([`RawStream::with_budget`]); it is then refused as BROKER_NOT_AVAILABLE.
pub const BUDGET_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(3);

/// The stream of requests a [`RawStream`] handler receives.
pub type Requests<M> = DecodeStream<Body, M>;

/// The stream of answers a handler returns.
pub type Answers<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

type Handler<Req, Resp> =
    dyn Fn(tonic::Request<Requests<Req>>) -> Result<Answers<Resp>, Status> + Send + Sync;

/// A tonic service with one streaming method served by `handler`.
pub struct RawStream<S, Req, Resp> {
    inner: S,
    path: &'static str,
    message_max: usize,
    handler: Arc<Handler<Req, Resp>>,
    check: Option<DecodeCheck>,
    budget: Option<Arc<tokio::sync::Semaphore>>,
}

impl<S: Clone, Req, Resp> Clone for RawStream<S, Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            path: self.path,
            message_max: self.message_max,
            handler: self.handler.clone(),
            check: self.check,
            budget: self.budget.clone(),
        }
    }
}

impl<S, Req, Resp> RawStream<S, Req, Resp> {
    /// Serves `path` (`/package.Service/Method`) with `handler`, refusing
    /// request messages over `message_max` bytes; everything else goes to
    /// `inner`.
    pub fn new(
        inner: S,
        path: &'static str,
        message_max: usize,
        handler: impl Fn(tonic::Request<Requests<Req>>) -> Result<Answers<Resp>, Status>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Self {
            inner,
            path,
            message_max,
            handler: Arc::new(handler),
            check: None,
            budget: None,
        }
    }

    /// Receives request messages under `budget`
    /// ([`DecodeStream::with_budget`]): the bytes of large messages not
    /// received whole yet, over every call sharing it.
    pub fn with_budget(mut self, budget: Arc<tokio::sync::Semaphore>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Runs `check` on every request message before decoding it.
    pub fn with_check(mut self, check: DecodeCheck) -> Self {
        self.check = Some(check);
        self
    }
}

impl<S, Req, Resp> RawStream<S, Req, Resp>
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
{
    /// Serves the unary method `path` with `handler`: gRPC frames a unary
    /// call as a stream of one message each way. The handler gets the
    /// call's metadata and extensions as tonic would pass them.
    pub fn unary<F, Fut>(inner: S, path: &'static str, message_max: usize, handler: F) -> Self
    where
        F: Fn(tonic::Request<Req>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    {
        Self::new(inner, path, message_max, move |request| {
            let (metadata, extensions, mut messages) = request.into_parts();
            let handler = handler.clone();
            // The caller's deadline, as tonic's own unary calls keep it:
            // the answer's headers go out at once here, so a client's
            // timeout no longer covered a call held by a quota or waiting
            // for its replicas.
            let deadline = grpc_timeout(&metadata);
            let answer = async move {
                let call = async move {
                    let message = match tokio_stream::StreamExt::next(&mut messages).await {
                        Some(m) => m.map_err(undecodable_status)?,
                        None => {
                            return Err(Status::invalid_argument("the call carried no request"))
                        }
                    };
                    handler(tonic::Request::from_parts(metadata, extensions, message)).await
                };
                match deadline {
                    Some(d) => tokio::time::timeout(d, call).await.unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "no answer within the call's deadline of {d:?}"
                        )))
                    }),
                    None => call.await,
                }
            };
            Ok(Box::pin(futures_util::stream::once(answer)) as Answers<Resp>)
        })
    }
}

/// The error code and message for a request message that could not be
/// decoded ([`runnel_proto::wire::Decoder`]'s statuses): too large for
/// `broker.grpc_message_bytes_max` (RECORD_TOO_LARGE: no topic setting
/// could admit it), compressed framing (UNSUPPORTED), refused by the
/// call's check (INVALID_REQUEST), no room among the requests being
/// received for long (BROKER_NOT_AVAILABLE, retriable), or bytes that are
/// not a request (CORRUPT_MESSAGE).
pub fn undecodable(status: &Status) -> (runnel_proto::v1::ErrorCode, String) {
    use runnel_proto::v1::ErrorCode;
    match status.code() {
        tonic::Code::OutOfRange => (
            ErrorCode::RecordTooLarge,
            format!(
                "request refused: {} (broker.grpc_message_bytes_max)",
                status.message()
            ),
        ),
        tonic::Code::Unimplemented => (
            ErrorCode::Unsupported,
            format!("request refused: {}", status.message()),
        ),
        tonic::Code::InvalidArgument => (
            ErrorCode::InvalidRequest,
            format!("request refused: {}", status.message()),
        ),
        // Nothing was read of it, nor appended: retriable.
        tonic::Code::ResourceExhausted => (
            ErrorCode::BrokerNotAvailable,
            format!("request refused: {}", status.message()),
        ),
        _ => (
            ErrorCode::CorruptMessage,
            format!("request refused: {}", status.message()),
        ),
    }
}

/// [`undecodable`] as a status with Runnel's trailers (a unary call's
/// answer): the decoder's own statuses carried no `runnel-error-code`,
/// and OUT_OF_RANGE is what clients take for OFFSET_OUT_OF_RANGE.
fn undecodable_status(status: Status) -> Status {
    if status.code() == tonic::Code::Cancelled {
        // The client went away mid-request: nobody reads the answer.
        return status;
    }
    let (code, message) = undecodable(&status);
    crate::error::status(code, message, None)
}

/// The `grpc-timeout` of a call (gRPC over HTTP/2: at most 8 digits and
/// a unit, H M S m u n), if it has a valid one.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S: NamedService, Req, Resp> NamedService for RawStream<S, Req, Resp> {
    const NAME: &'static str = S::NAME;
}

impl<S, Req, Resp> Service<http::Request<Body>> for RawStream<S, Req, Resp>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
    Req: Message + Default + 'static,
    Resp: Message + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != self.path {
            return Box::pin(self.inner.call(req));
        }
        let compressed = req
            .headers()
            .get("grpc-encoding")
            .is_some_and(|v| v.as_bytes() != b"identity");
        let answer = if compressed {
            Err(crate::error::status(
                runnel_proto::v1::ErrorCode::Unsupported,
                "compressed requests (grpc-encoding) are not accepted on this call",
                None,
            ))
        } else {
            let (max, check, budget) = (self.message_max, self.check, self.budget.clone());
            (self.handler)(tonic::Request::from_http(req.map(|body| {
                let mut decode = DecodeStream::new(body, max);
                if let Some(check) = check {
                    decode = decode.with_check(check);
                }
                if let Some(budget) = budget {
                    decode = decode.with_budget(budget, BUDGET_WAIT_MAX);
                }
                decode
            })))
        };
        let response = match answer {
            Ok(answers) => http::Response::builder()
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .body(Body::new(EncodeBody::server(answers)))
                .unwrap_or_else(|e| Status::internal(e.to_string()).into_http()),
            Err(status) => status.into_http(),
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

/// Opens the streaming call `path` on `channel`: `requests` are sent as
/// they come, and the answers are decoded without copying their batches.
/// A call refused at once (a status in the response headers) is an `Err`;
/// one that fails later ends its stream with the status.
pub async fn call_stream<C, B, Req, Resp>(
    channel: &mut C,
    path: &'static str,
    requests: impl Stream<Item = Req> + Send + Unpin + 'static,
    message_max: usize,
) -> Result<DecodeStream<B, Resp>, Status>
where
    C: Service<http::Request<Body>, Response = http::Response<B>>,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Req: Message + 'static,
{
    let body = EncodeBody::client(tokio_stream::StreamExt::map(requests, Ok::<_, Status>));
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Body::new(body))
        .map_err(|e| Status::internal(format!("building a request for {path}: {e}")))?;
    let response = channel
        .ready()
        .await
        .map_err(|e| Status::from_error(e.into()))?
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    if response.status() != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "{path} answered HTTP {}",
            response.status()
        )));
    }
    Ok(DecodeStream::new(response.into_body(), message_max))
}

/// A unary call through [`call_stream`]: one request, one answer.
pub async fn call_unary<C, B, Req, Resp>(
    channel: &mut C,
    path: &'static str,
    request: Req,
    message_max: usize,
) -> Result<Resp, Status>
where
    C: Service<http::Request<Body>, Response = http::Response<B>>,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
    Req: Message + Send + 'static,
    Resp: Message + Default,
{
    let mut answers =
        call_stream::<C, B, Req, Resp>(channel, path, tokio_stream::once(request), message_max)
            .await?;
    match tokio_stream::StreamExt::next(&mut answers).await {
        Some(answer) => answer,
        None => Err(Status::internal(format!("{path} ended without an answer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_as_the_protocol_writes_them() {
        use std::time::Duration;
        let at = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(at("500m"), Some(Duration::from_millis(500)));
        assert_eq!(at("2S"), Some(Duration::from_secs(2)));
        assert_eq!(at("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(at("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "5", "5x", "123456789m", "-5m"] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use runnel_proto::v1 as pb;
    use tokio_stream::StreamExt;

    const PATH: &str = "/runnel.v1.Producer/ProduceStream";

    /// Answers every request with its correlation id; a broken request
    /// stream ends the answers with its status.
    fn echo() -> RawStream<NotFound, pb::ProduceRequest, pb::ProduceResponse> {
        RawStream::new(NotFound, PATH, 1 << 16, |request| {
            let answers = request.into_inner().map(|r| {
                r.map(|r: pb::ProduceRequest| pb::ProduceResponse {
                    correlation_id: r.correlation_id,
                    topic: r.topic,
                    base_offset: r.batch.len() as i64,
                    ..Default::default()
                })
            });
            Ok(Box::pin(answers) as Answers<pb::ProduceResponse>)
        })
    }

    /// The wrapped tonic service: answers everything with 404.
    #[derive(Clone)]
    struct NotFound;

    impl Service<http::Request<Body>> for NotFound {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let mut r = http::Response::new(Body::default());
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            std::future::ready(Ok(r))
        }
    }

    fn request(id: u64, batch: usize) -> pb::ProduceRequest {
        pb::ProduceRequest {
            topic: "t".into(),
            correlation_id: id,
            batch: Bytes::from(vec![7u8; batch]),
            ..Default::default()
        }
    }

    fn grpc(msg: &pb::ProduceRequest) -> Vec<u8> {
        runnel_proto::wire::encode(msg).unwrap().concat()
    }

    /// Sends `frames` (an `Err` breaks the body) and returns the answers'
    /// correlation ids and the call's final status.
    async fn exchange(frames: Vec<Result<Vec<u8>, &'static str>>) -> (Vec<u64>, tonic::Status) {
        let body =
            http_body_util::StreamBody::new(tokio_stream::iter(frames.into_iter().map(|f| {
                f.map(|d| http_body::Frame::data(Bytes::from(d)))
                    .map_err(Status::cancelled)
            })));
        let req = http::Request::builder()
            .uri(PATH)
            .body(Body::new(body))
            .unwrap();
        let response = echo().call(req).await.unwrap();
        let body = response.into_body().collect().await.unwrap();
        let status = Status::from_header_map(body.trailers().unwrap()).unwrap();
        let mut decoder = runnel_proto::wire::Decoder::new(1 << 20);
        decoder.push(body.to_bytes());
        let mut ids = Vec::new();
        while let Some(a) = decoder.next_message::<pb::ProduceResponse>().unwrap() {
            ids.push(a.correlation_id);
        }
        (ids, status)
    }

    #[tokio::test]
    async fn requests_split_anywhere_are_answered_in_order() {
        let wire: Vec<u8> = [request(1, 5000), request(2, 10), request(3, 9000)]
            .iter()
            .flat_map(grpc)
            .collect();
        let frames = wire.chunks(777).map(|c| Ok(c.to_vec())).collect();
        let (ids, status) = exchange(frames).await;
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
    }

    #[tokio::test]
    async fn an_oversized_request_ends_the_call_after_the_earlier_answers() {
        let frames = vec![Ok(grpc(&request(1, 10))), Ok(grpc(&request(2, 1 << 17)))];
        let (ids, status) = exchange(frames).await;
        assert_eq!(ids, [1]);
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    }

    #[tokio::test]
    async fn a_client_gone_mid_message_gets_no_answer_for_it() {
        let second = grpc(&request(2, 6000));
        let frames = vec![
            Ok(grpc(&request(1, 10))),
            Ok(second[..3000].to_vec()),
            Err("connection reset"),
        ];
        let (ids, status) = exchange(frames).await;
        assert_eq!(ids, [1]);
        assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");

        // A body that just ends inside a message.
        let frames = vec![Ok(grpc(&request(1, 10))), Ok(second[..3000].to_vec())];
        let (ids, status) = exchange(frames).await;
        assert_eq!(ids, [1]);
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }

    #[tokio::test]
    async fn other_paths_and_compressed_calls_are_not_served_raw() {
        let req = http::Request::builder()
            .uri("/runnel.v1.Producer/Produce")
            .body(Body::default())
            .unwrap();
        let response = echo().call(req).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::NOT_FOUND);

        let req = http::Request::builder()
            .uri(PATH)
            .header("grpc-encoding", "gzip")
            .body(Body::default())
            .unwrap();
        let response = echo().call(req).await.unwrap();
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    }

    #[tokio::test]
    async fn call_stream_round_trips_through_a_raw_server() {
        let mut server = echo();
        let requests = tokio_stream::iter(vec![request(1, 10), request(2, 50_000)]);
        let mut answers =
            call_stream::<_, _, _, pb::ProduceResponse>(&mut server, PATH, requests, 1 << 20)
                .await
                .unwrap();
        let mut got = Vec::new();
        while let Some(a) = answers.next().await {
            let a = a.unwrap();
            got.push((a.correlation_id, a.base_offset));
        }
        assert_eq!(got, [(1, 10), (2, 50_000)]);

        // A server answering 404 (no such service) is an error at once.
        let e = call_stream::<_, _, _, pb::ProduceResponse>(
            &mut NotFound,
            PATH,
            tokio_stream::iter(vec![request(1, 1)]),
            1 << 20,
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.code(), tonic::Code::Unknown, "{e:?}");
    }

    #[tokio::test]
    async fn unary_calls_get_one_answer_and_the_callers_metadata() {
        let mut server = RawStream::unary(
            NotFound,
            PATH,
            1 << 16,
            |req: tonic::Request<pb::ProduceRequest>| {
                let user = req
                    .metadata()
                    .get("x-user")
                    .map(|v| v.to_str().unwrap().to_string());
                let r = req.into_inner();
                async move {
                    if r.correlation_id == 0 {
                        return Err(Status::invalid_argument("no id"));
                    }
                    Ok(pb::ProduceResponse {
                        correlation_id: r.correlation_id,
                        topic: user.unwrap_or_default(),
                        ..Default::default()
                    })
                }
            },
        );
        // The metadata a client interceptor adds reaches the handler.
        let mut with_user = tower::service_fn(|mut req: http::Request<Body>| {
            req.headers_mut()
                .insert("x-user", http::HeaderValue::from_static("ann"));
            let mut server = server.clone();
            async move { server.call(req).await }
        });
        let a: pb::ProduceResponse = call_unary(&mut with_user, PATH, request(9, 5000), 1 << 20)
            .await
            .unwrap();
        assert_eq!((a.correlation_id, a.topic.as_str()), (9, "ann"));
        let e =
            call_unary::<_, _, _, pb::ProduceResponse>(&mut server, PATH, request(0, 1), 1 << 20)
                .await
                .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
}
