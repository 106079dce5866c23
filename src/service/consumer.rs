//! `runnel.v1.Consumer`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use futures_util::TryFutureExt;
use runnel_proto::v1 as pb;
use runnel_proto::v1::consumer_server::{Consumer, ConsumerServer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use super::producer::abortable_stream;
use crate::broker::Broker;
use crate::rpc::RawStream;
use crate::security::{self, Direction};
use runnel_controller::security::{Operation, ResourceType};

/// Serves fetches and offset lookups.
#[derive(Debug, Clone)]
pub struct ConsumerService {
    broker: Arc<Broker>,
    /// Bytes the raw subscriptions may hold read and not yet written to
    /// their sockets, together ([`SUBSCRIBE_BUFFER_BYTES`]).
    subscribed: Arc<Semaphore>,
    /// The same per client connection ([`SUBSCRIBE_CONNECTION_BYTES`]),
    /// by the client's address and port; an entry lives as long as a
    /// subscription of that connection.
    connections: Arc<Mutex<HashMap<SocketAddr, Weak<Semaphore>>>>,
}

impl ConsumerService {
    /// Wraps a broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self {
            broker,
            subscribed: Arc::new(Semaphore::new(SUBSCRIBE_BUFFER_BYTES)),
            connections: Arc::default(),
        }
    }

    /// The budgets a subscription from `peer` reads under: its
    /// connection's and the broker's. Without a known peer (a transport
    /// other than TCP) the subscription gets a share of its own.
    fn budgets(&self, peer: Option<SocketAddr>) -> Budgets {
        let fresh = || Arc::new(Semaphore::new(SUBSCRIBE_CONNECTION_BYTES));
        let connection = match peer {
            None => fresh(),
            Some(peer) => {
                let mut connections = self.connections.lock().expect("connections lock");
                match connections.get(&peer).and_then(Weak::upgrade) {
                    Some(budget) => budget,
                    None => {
                        // Connections whose subscriptions all ended go.
                        connections.retain(|_, budget| budget.strong_count() > 0);
                        let budget = fresh();
                        connections.insert(peer, Arc::downgrade(&budget));
                        budget
                    }
                }
            }
        };
        Budgets {
            connection,
            broker: self.subscribed.clone(),
        }
    }
}

/// Where a subscription takes room before it reads a chunk.
struct Budgets {
    connection: Arc<Semaphore>,
    broker: Arc<Semaphore>,
}

/// The unary fetch call's HTTP/2 path, served through
/// [`crate::rpc::RawStream::unary`].
pub const FETCH_PATH: &str = "/runnel.v1.Consumer/Fetch";

/// The server-streaming subscribe call's HTTP/2 path, served through
/// [`crate::rpc::RawStream::new`].
pub const SUBSCRIBE_PATH: &str = "/runnel.v1.Consumer/Subscribe";

/// The `Consumer` service as served: `Fetch` and `Subscribe` framed by
/// [`crate::rpc`], the other methods by tonic.
pub type ConsumerRawServer = RawStream<
    RawStream<ConsumerServer<ConsumerService>, pb::FetchRequest, pb::FetchResponse>,
    pb::SubscribeRequest,
    pb::FetchResponse,
>;

/// The `Consumer` service: `Fetch` and `Subscribe` framed by [`crate::rpc`]
/// (the batches they answer with skip tonic's codec copy), the other
/// methods by tonic.
pub fn consumer_server(broker: Arc<Broker>, message_max: usize) -> ConsumerRawServer {
    let service = ConsumerService::new(broker);
    let tonic = ConsumerServer::new(service.clone())
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);
    let fetch_service = service.clone();
    let fetch = RawStream::unary(tonic, FETCH_PATH, message_max, move |request| {
        let service = fetch_service.clone();
        async move {
            Consumer::fetch(&service, request)
                .await
                .map(Response::into_inner)
        }
    });
    RawStream::new(fetch, SUBSCRIBE_PATH, message_max, move |request| {
        let service = service.clone();
        let (metadata, extensions, mut messages) = request.into_parts();
        // The answers start once the one request has arrived; a refusal
        // (bad request, no access, unknown partition) is the stream's
        // only item, so it reaches the client as the call's status.
        let answers = async move {
            let request = match tokio_stream::StreamExt::next(&mut messages).await {
                Some(Ok(r)) => r,
                Some(Err(status)) => return failed(status),
                None => return failed(Status::invalid_argument("the call carried no request")),
            };
            service
                .subscription(Request::from_parts(metadata, extensions, request))
                .await
                .unwrap_or_else(failed)
        };
        Ok(Box::pin(futures_util::StreamExt::flatten(
            futures_util::stream::once(answers),
        )) as crate::rpc::Answers<pb::FetchResponse>)
    })
}

/// A subscription that ends at once with `status`.
fn failed(status: Status) -> SubscribeStream {
    Box::pin(tokio_stream::once(Err(status)))
}

type SubscribeStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FetchResponse, Status>> + Send>>;

/// What all subscriptions of a broker may hold in memory at once: chunks
/// read from the log and not yet written to their sockets (a chunk read
/// from the active segment is a heap copy; a stalled reader's sit in
/// HTTP/2 send buffers until its window opens). A subscription waits for
/// room before it reads. Without it, one consumer subscribed to 1,000
/// partitions with a backlog made the broker hold 1 GB (RESULTS, session
/// 10, row 37).
const SUBSCRIBE_BUFFER_BYTES: usize = 64 << 20;

/// What one client connection's subscriptions may hold of that, so that a
/// client that stops reading (its chunks wait in HTTP/2 send buffers for
/// a window that does not open) holds up only itself: four such clients,
/// not one, are needed to make every other subscription wait.
const SUBSCRIBE_CONNECTION_BYTES: usize = SUBSCRIBE_BUFFER_BYTES / 4;

/// A chunk is charged at least the topic's largest batch divided by
/// this (see [`read_chunk`]).
const CHUNK_UNDERCHARGE_MAX: u32 = 4;

/// A fetch's `max_bytes` (0: the fetch default) cut to `cap`.
fn fetch_bytes(max_bytes: u32, cap: usize) -> u32 {
    let want = match max_bytes {
        0 => crate::broker::FETCH_BYTES_DEFAULT,
        n => n as usize,
    };
    want.min(cap).clamp(1, u32::MAX as usize) as u32
}

/// Permits for one chunk of up to `max_bytes`, which the subscription has
/// already cut to [`SUBSCRIBE_CONNECTION_BYTES`] (a chunk is larger only
/// when its first batch is, up to `max.message.bytes`).
fn chunk_permits(max_bytes: u32) -> u32 {
    fetch_bytes(max_bytes, SUBSCRIBE_CONNECTION_BYTES)
}

/// Reads a subscription's next chunk (without waiting) once its
/// connection's budget, then the broker's, has room for it; the room goes
/// back when the chunk has been written.
async fn read_chunk(
    broker: &Broker,
    budgets: &Budgets,
    fetch: &pb::FetchRequest,
) -> Result<pb::FetchResponse, Status> {
    // A chunk holds at least one whole batch, whatever `max_bytes` asked
    // for: charged as if it were as large as the topic's batches may be.
    // Charged by `max_bytes` alone, subscriptions asking for one byte held
    // megabytes each on a budget that counted one.
    // (A quarter of it as a floor: a client asking for small chunks keeps
    // more than a few in flight per connection, and what it may hold
    // beyond its charge stays within four times.)
    let batch_max = broker
        .hosted_partition(&fetch.topic, fetch.partition)
        .map_or(0, |p| p.log.config().message_bytes_max)
        .div_ceil(CHUNK_UNDERCHARGE_MAX);
    let permits = chunk_permits(fetch.max_bytes.max(batch_max));
    let take = |budget: &Arc<Semaphore>| {
        budget
            .clone()
            .acquire_many_owned(permits)
            .map_err(|_| Status::unavailable("the broker is shutting down"))
    };
    let connection = take(&budgets.connection).await?;
    let whole = take(&budgets.broker).await?;
    let chunk = broker.fetch(fetch.clone()).await?;
    Ok(hold(chunk, [connection, whole]))
}

/// Ties `permits` to the answer's bytes: they go back to their budgets
/// when the last copy is dropped, once written to the socket. Raw answers
/// hold them on their batches; structured ones (stock clients, `raw` off)
/// on one record's key or value, a slice of the same read buffer as all
/// the others, which the answer drops together.
fn hold(mut r: pb::FetchResponse, permits: [OwnedSemaphorePermit; 2]) -> pb::FetchResponse {
    /// Bytes and the permits that go with them (held, never read:
    /// dropping them gives the bytes back to the budgets).
    struct Held(bytes::Bytes, #[expect(dead_code)] [OwnedSemaphorePermit; 2]);
    impl AsRef<[u8]> for Held {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    let holder = if !r.batches.is_empty() {
        Some(&mut r.batches)
    } else {
        r.records
            .iter_mut()
            .find_map(|rec| rec.value.as_mut().or(rec.key.as_mut()))
    };
    if let Some(bytes) = holder {
        *bytes = bytes::Bytes::from_owner(Held(std::mem::take(bytes), permits));
    }
    r
}

/// How long each Subscribe poll waits before re-checking the client.
const SUBSCRIBE_POLL: std::time::Duration = std::time::Duration::from_millis(1_000);

/// Chunks a subscription keeps read and ready beside the one being sent:
/// the next chunk is read from the log while the last is on its way, and
/// a slow client holds no more than that in the broker (A/B against two:
/// the same consume rate, `benches/RESULTS.md`, session 10).
const SUBSCRIBE_READY: usize = 1;

impl ConsumerService {
    /// READ on `topic`, a refusal counted as a failed fetch.
    #[allow(clippy::result_large_err)]
    fn check_read<T>(&self, request: &Request<T>, topic: &str) -> Result<(), Status> {
        super::counted(
            &self.broker,
            "fetch",
            security::check(
                &self.broker,
                request,
                ResourceType::Topic,
                topic,
                Operation::Read,
            ),
        )
    }

    /// Checks a subscribe request and starts its stream of answers.
    async fn subscription(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<SubscribeStream, Status> {
        let topic = request.get_ref().topic.clone();
        self.check_read(&request, &topic)?;
        let principal = security::principal_of(&request);
        let login = security::login_of(&request);
        let budgets = self.budgets(security::peer_addr(request.extensions()));
        let req = request.into_inner();
        let broker = self.broker.clone();
        // A chunk is no larger than the budget charges for it.
        let cap = security::fetch_bytes_cap(&broker, &principal).min(SUBSCRIBE_CONNECTION_BYTES);
        let mut fetch = pb::FetchRequest {
            topic: req.topic,
            partition: req.partition,
            offset: req.offset,
            max_bytes: fetch_bytes(req.max_bytes, cap),
            // The stream waits for records itself (`wait_readable`),
            // before it takes room in the budget.
            max_wait_ms: 0,
            raw: req.raw,
            topic_id: req.topic_id,
        };
        // The principal's quota holds for the first chunk too: read at
        // once, a client subscribing again and again (or to many
        // partitions at once) read a chunk each time, unthrottled.
        security::hold_until(security::admission_at(
            &broker,
            &principal,
            Direction::Fetch,
        ))
        .await;
        // Fail fast on a bad first request instead of opening the stream.
        let first = read_chunk(&broker, &budgets, &fetch).await?;
        Ok(abortable_stream(SUBSCRIBE_READY, move |tx| async move {
            let mut next = Some(first);
            // When the next chunk may be read (a quota's delay for the
            // last one): the wait happens before reading, holding no
            // room in the budgets, which a throttled subscriber's
            // chunks would otherwise keep from everyone else.
            let mut throttled_until = None;
            loop {
                // A free slot first: the next chunk is read once the last
                // one has been taken for sending, so a subscription holds
                // at most two (one being sent, one ready), however slow
                // its client. A client gone fails the reservation.
                let Ok(slot) = tx.reserve().await else {
                    return;
                };
                let response = match next.take() {
                    Some(r) => Ok(r),
                    None => {
                        security::hold_until(throttled_until.take()).await;
                        // And until the principal's clock, which its
                        // other subscriptions move too, lets it take in
                        // more: each alone waited at most ten seconds
                        // per chunk, so many of them read a multiple of
                        // the quota together.
                        security::hold_until(security::admission_at(
                            &broker,
                            &principal,
                            Direction::Fetch,
                        ))
                        .await;
                        // Wait for records without holding any of the
                        // budget: an idle subscription must not keep
                        // room from the ones with data.
                        let readable = broker
                            .wait_readable(
                                &fetch.topic,
                                &fetch.topic_id,
                                fetch.partition,
                                fetch.offset,
                                SUBSCRIBE_POLL,
                            )
                            .await;
                        // The wait ends at once while the broker stops:
                        // so does the subscription (the client resumes
                        // on the partition's new leader).
                        if broker.is_stopping() {
                            slot.send(Err(Status::unavailable("the broker is shutting down")));
                            return;
                        }
                        // Checked for every chunk, as a produce stream
                        // checks every batch: a READ revoked (or a
                        // deny added) ends the subscription.
                        // And the login: a user removed, or whose
                        // password changed, is not served on.
                        if let Err(status) = security::check_login(&broker, login.as_ref())
                            .and_then(|()| {
                                security::check_principal(
                                    &broker,
                                    &principal,
                                    ResourceType::Topic,
                                    &fetch.topic,
                                    Operation::Read,
                                )
                            })
                        {
                            slot.send(Err(status));
                            return;
                        }
                        // Nothing new: no read, so no room taken from
                        // the budgets for an empty answer (idle
                        // subscriptions queued for room every second,
                        // ahead of the ones with records).
                        if !readable {
                            continue;
                        }
                        read_chunk(&broker, &budgets, &fetch).await
                    }
                };
                match response {
                    Ok(r) => {
                        fetch.offset = r.next_offset;
                        // Charged now, waited for before the next read.
                        let delay = security::throttle(
                            &broker,
                            &principal,
                            Direction::Fetch,
                            prost::Message::encoded_len(&r) as u64,
                        );
                        throttled_until = security::answer_deadline(delay);
                        // An empty answer (the long poll ran out) gives
                        // its slot back.
                        if !(r.records.is_empty() && r.batches.is_empty()) {
                            slot.send(Ok(r));
                        }
                    }
                    Err(status) => {
                        slot.send(Err(status));
                        return;
                    }
                }
            }
        }))
    }
}

#[tonic::async_trait]
impl Consumer for ConsumerService {
    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let topic = request.get_ref().topic.clone();
        self.check_read(&request, &topic)?;
        let principal = security::principal_of(&request);
        let budgets = self.budgets(security::peer_addr(request.extensions()));
        let mut req = request.into_inner();
        // Read under the same budgets as a subscription's chunks: an
        // answer waiting for a client that does not read it stays in the
        // broker, and unbounded, one connection's fetches held as much as
        // it asked for (a fetch read from the active segment is a copy).
        req.max_bytes = fetch_bytes(
            req.max_bytes,
            security::fetch_bytes_cap(&self.broker, &principal).min(SUBSCRIBE_CONNECTION_BYTES),
        );
        // Quota: what the principal owes for its earlier answers is
        // waited out first, holding no room in the budgets; this answer
        // is then charged and sent at once (Kafka mutes a throttled
        // channel after its answer, likewise). Held after reading, a
        // throttled principal's answers kept their room for up to ten
        // seconds each, and four such connections held all of it.
        security::hold_until(security::owed_until(
            &self.broker,
            &principal,
            Direction::Fetch,
        ))
        .await;
        // Still further ahead than one answer's hold: the principal's
        // other fetches (many partitions, many connections) took the quota
        // meanwhile. Answered empty, to be asked again, as Kafka answers a
        // throttled fetch: each fetch waiting out its own hold and then
        // reading, N of them moved N times the quota.
        // Only for a partition led here, of the topic asked for: any
        // other fetch goes on to the refusal it gets anyway (a figure from
        // a follower's or another topic's log misled the client).
        let led = self
            .broker
            .hosted_partition(&req.topic, req.partition)
            .filter(|p| {
                p.leader_epoch().is_some()
                    && (req.topic_id.is_empty() || p.topic_id == req.topic_id)
            });
        if let Some(p) = led.filter(|_| {
            security::admission_at(&self.broker, &principal, Direction::Fetch).is_some()
        }) {
            return Ok(Response::new(pb::FetchResponse {
                topic: req.topic,
                partition: req.partition,
                high_watermark: p.log.high_watermark(),
                log_start_offset: p.log.log_start_offset(),
                next_offset: req.offset,
                ..Default::default()
            }));
        }
        // The long poll next, holding none of the budgets either: a
        // waiting fetch must not keep room from the ones with records.
        if req.max_wait_ms > 0 {
            let wait = std::time::Duration::from_millis(
                u64::from(req.max_wait_ms).min(self.broker.fetch_wait_max_ms()),
            );
            self.broker
                .wait_readable(&req.topic, &req.topic_id, req.partition, req.offset, wait)
                .await;
            req.max_wait_ms = 0;
        }
        let response = read_chunk(&self.broker, &budgets, &req).await?;
        security::throttle(
            &self.broker,
            &principal,
            Direction::Fetch,
            prost::Message::encoded_len(&response) as u64,
        );
        Ok(Response::new(response))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.subscription(request).await.map(Response::new)
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        let topic = request.get_ref().topic.clone();
        security::check(
            &self.broker,
            &request,
            ResourceType::Topic,
            &topic,
            Operation::Describe,
        )?;
        Ok(Response::new(
            self.broker.list_offsets(request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two budgets of 100 permits, and 10 taken from each.
    fn budgets() -> ([Arc<Semaphore>; 2], [OwnedSemaphorePermit; 2]) {
        let b = [Arc::new(Semaphore::new(100)), Arc::new(Semaphore::new(100))];
        let permits = [
            b[0].clone().try_acquire_many_owned(10).unwrap(),
            b[1].clone().try_acquire_many_owned(10).unwrap(),
        ];
        (b, permits)
    }

    fn available(b: &[Arc<Semaphore>; 2]) -> [usize; 2] {
        [b[0].available_permits(), b[1].available_permits()]
    }

    #[test]
    fn an_answer_holds_its_budget_until_dropped_raw_or_structured() {
        let read = bytes::Bytes::from(vec![7u8; 64]);
        let raw = pb::FetchResponse {
            batches: read.clone(),
            ..Default::default()
        };
        let structured = pb::FetchResponse {
            records: vec![
                pb::Record::default(),
                pb::Record {
                    key: Some(read.slice(0..4)),
                    value: Some(read.slice(4..64)),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        for answer in [raw, structured] {
            let (b, permits) = budgets();
            let held = hold(answer.clone(), permits);
            assert_eq!(held, answer, "same content");
            assert_eq!(available(&b), [90, 90], "held while the answer lives");
            drop(held);
            assert_eq!(available(&b), [100, 100], "given back when it is dropped");
        }
    }
}
