//! `runnel.v1.internal.Replication`, the leader side: answers follower
//! fetches with stored batch bytes (unchanged) and records each follower's
//! progress, which advances the high watermark and grows or shrinks the ISR.

use std::sync::Arc;
use std::time::Duration;

use runnel_proto::v1::internal as ipb;
use runnel_proto::v1::internal::replication_server::{Replication, ReplicationServer};
use runnel_proto::v1::ErrorCode;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::broker::{now_ms, Broker};
use crate::rpc::RawStream;

/// Serves follower fetches.
#[derive(Debug, Clone)]
pub struct ReplicationService {
    broker: Arc<Broker>,
}

impl ReplicationService {
    /// Wraps a broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

type FetchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<ipb::ReplicaFetchResponse, Status>> + Send>,
>;

/// Answers one fetch request for many partitions.
async fn serve_fetch(broker: &Broker, req: ipb::ReplicaFetchRequest) -> ipb::ReplicaFetchResponse {
    // Capped by the lag time, not by the clients' fetch_wait_max_ms: a
    // low client cap made every idle follower ask again at once.
    let wait = Duration::from_millis(
        u64::from(req.max_wait_ms).min(broker.config().broker.replica_lag_time_max_ms),
    );
    let mut appended = broker.watch_appends();
    let first = answer(broker, &req, true);
    let has_data = first
        .partitions
        .iter()
        .any(|p| !p.batches.is_empty() || p.error_code != 0);
    if has_data || wait.is_zero() {
        return first;
    }
    // Long poll: wait for any append on this broker, then answer again.
    // The follower's position was recorded by the first answer; it is not
    // recorded again from a request that waited: the follower may have
    // restarted meanwhile (losing what it had not flushed) and its
    // partitions moved to a new partition epoch, in which an ISR addition
    // proposed from this stale position would be accepted (KIP-903).
    let _ = tokio::time::timeout(wait, appended.changed()).await;
    answer(broker, &req, false)
}

/// The answer to `req`; with `record`, the follower's fetch position is
/// recorded too (ISR expansion, high watermark).
fn answer(
    broker: &Broker,
    req: &ipb::ReplicaFetchRequest,
    record: bool,
) -> ipb::ReplicaFetchResponse {
    // At most half of what the follower decodes: a larger answer would
    // be refused on the follower's side, every round, for good. A read
    // returns at least one whole batch, which may pass the budget (up to
    // `max.message.bytes`, itself at most half): only the answer's first
    // batches may, as in Kafka, so an answer stays within the decode
    // limit. A partition left out comes first in a later round (the
    // follower rotates its list).
    let mut budget = match req.max_bytes {
        0 => 1024 * 1024,
        n => (n as usize).min(crate::client::MESSAGE_BYTES_MAX / 2),
    };
    let mut answered = 0usize;
    let now = now_ms();
    // A fenced follower (shutting down, or cut off from the controllers)
    // is not proposed back into an ISR however caught up it is.
    let eligible = record
        && broker
            .metadata()
            .current()
            .brokers
            .get(&req.replica_id)
            .is_some_and(|b| !b.fenced);
    let partitions = req
        .partitions
        .iter()
        .map(|p| {
            let mut out = ipb::ReplicaFetchPartitionData {
                topic: p.topic.clone(),
                partition: p.partition,
                ..Default::default()
            };
            let Some(partition) = broker.hosted_partition(&p.topic, p.partition) else {
                out.error_code = ErrorCode::UnknownPartition as i32;
                return out;
            };
            if !same_topic(&partition, &p.topic_id) {
                out.error_code = ErrorCode::UnknownTopicId as i32;
                return out;
            }
            if partition.leader_epoch() != Some(p.current_leader_epoch) {
                out.error_code = ErrorCode::NotLeader as i32;
                return out;
            }
            let log = &partition.log;
            out.high_watermark = log.high_watermark();
            out.log_start_offset = log.log_start_offset();
            out.log_end_offset = log.log_end_offset();
            if p.fetch_offset > out.log_end_offset || p.fetch_offset < 0 {
                // The follower holds offsets this leader never wrote: it
                // must truncate first (OffsetForLeaderEpoch). No progress.
                out.error_code = ErrorCode::OffsetOutOfRange as i32;
                return out;
            }
            if record {
                let proposals = partition.on_follower_fetch(
                    req.replica_id,
                    p.current_leader_epoch,
                    p.fetch_offset,
                    p.log_start_offset,
                    now,
                    eligible,
                );
                broker.propose_isr_changes(&partition, proposals);
            }
            out.high_watermark = log.high_watermark();
            out.log_start_offset = log.log_start_offset();
            out.log_end_offset = log.log_end_offset();
            if budget == 0 {
                return out;
            }
            match log.read(p.fetch_offset, budget, out.log_end_offset) {
                Ok(read) if answered > 0 && read.batches.len() > budget => {}
                Ok(read) => {
                    budget = budget.saturating_sub(read.batches.len());
                    answered += read.batches.len();
                    out.batches = read.batches;
                }
                Err(e) => {
                    debug!(topic = %p.topic, partition = p.partition, error = %e, "replica read failed");
                    out.error_code = crate::error::BrokerError::from(e).code() as i32;
                }
            }
            out
        })
        .collect();
    ipb::ReplicaFetchResponse { partitions }
}

/// Whether the hosted `partition` belongs to the topic a follower named
/// by id (either side without an id, from an older version: assumed).
/// Names alone do not tell a topic from one deleted and created again:
/// both start at leader epoch 0, on the same replicas.
fn same_topic(partition: &crate::partition::Partition, topic_id: &str) -> bool {
    topic_id.is_empty() || partition.topic_id.is_empty() || partition.topic_id == topic_id
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    type ReplicaFetchStream = FetchStream;

    async fn replica_fetch(
        &self,
        request: Request<Streaming<ipb::ReplicaFetchRequest>>,
    ) -> Result<Response<Self::ReplicaFetchStream>, Status> {
        Ok(Response::new(fetch_stream(
            self.broker.clone(),
            request.into_inner(),
        )))
    }

    async fn offset_for_leader_epoch(
        &self,
        request: Request<ipb::OffsetForLeaderEpochRequest>,
    ) -> Result<Response<ipb::OffsetForLeaderEpochResponse>, Status> {
        let req = request.into_inner();
        let mut out = ipb::OffsetForLeaderEpochResponse::default();
        match self.broker.hosted_partition(&req.topic, req.partition) {
            // Only the leadership the follower follows, as the fetch path:
            // a replica still leading in an earlier epoch (its metadata
            // behind the follower's) may yet lose the tail it would answer
            // from, and the follower checks only once per epoch.
            Some(p) if !same_topic(&p, &req.topic_id) => {
                out.error_code = ErrorCode::UnknownTopicId as i32;
            }
            Some(p) if p.leader_epoch() == Some(req.current_leader_epoch) => {
                let (epoch, end) = p
                    .log
                    .end_offset_for_epoch(req.leader_epoch)
                    .unwrap_or((-1, p.log.log_start_offset()));
                out.leader_epoch = epoch;
                out.end_offset = end;
            }
            _ => out.error_code = ErrorCode::NotLeader as i32,
        }
        Ok(Response::new(out))
    }
}

/// The replica fetch call's HTTP/2 path, served by [`fetch_stream`] through
/// [`crate::rpc::RawStream`].
pub const REPLICA_FETCH_PATH: &str = "/runnel.v1.internal.Replication/ReplicaFetch";

/// The `Replication` service: `ReplicaFetch` framed by [`crate::rpc`] (the
/// batches it sends skip tonic's codec copy), the other method by tonic.
pub fn replication_server(
    broker: Arc<Broker>,
    message_max: usize,
) -> RawStream<
    ReplicationServer<ReplicationService>,
    ipb::ReplicaFetchRequest,
    ipb::ReplicaFetchResponse,
> {
    let tonic = ReplicationServer::new(ReplicationService::new(broker.clone()))
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);
    RawStream::new(tonic, REPLICA_FETCH_PATH, message_max, move |request| {
        Ok(fetch_stream(broker.clone(), request.into_inner()))
    })
}

/// Answers a follower's stream of fetch requests, one at a time.
fn fetch_stream<S>(broker: Arc<Broker>, mut input: S) -> FetchStream
where
    S: tokio_stream::Stream<Item = Result<ipb::ReplicaFetchRequest, Status>>
        + Send
        + Unpin
        + 'static,
{
    crate::service::async_stream(move |tx| async move {
        loop {
            let next = tokio::select! {
                next = input.next() => next,
                () = broker.stopping() => {
                    let _ = tx.send(Err(Status::unavailable("the broker is shutting down"))).await;
                    return;
                }
            };
            let Some(next) = next else { return };
            let response = match next {
                Ok(req) => Ok(serve_fetch(&broker, req).await),
                Err(status) => Err(status),
            };
            let failed = response.is_err();
            if tx.send(response).await.is_err() || failed {
                return;
            }
        }
    })
}
