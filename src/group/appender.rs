//! The one writer of an offsets partition this broker coordinates: offset
//! commits and group metadata records queue here, and every batch of
//! queued writes becomes one append to `__consumer_offsets` with acks=all
//! (group commit). Appends go out in queue order; up to
//! [`IN_FLIGHT_MAX`] appended batches wait for their replicas at once, so
//! one batch's replication wait does not hold back the next append.
//!
//! Where it sits: between the coordinator ([`super::coordinator`]) and the
//! produce path ([`crate::broker::Broker::produce_append`] /
//! [`crate::broker::Broker::produce_complete`]). The task ends when the
//! coordinator drops the appender (leadership moved) or the broker stops.

use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use runnel_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use super::coordinator::OFFSETS_TOPIC;
use crate::broker::Broker;

/// Most records in one append.
const BATCH_RECORDS_MAX: usize = 4096;
/// Most appended batches waiting for replicas at once.
const IN_FLIGHT_MAX: usize = 8;
/// Most writes queued before callers wait (backpressure).
const QUEUE_MAX: usize = 16 * 1024;

/// Why an append failed: the broker's error code and message, shared by
/// every write of the batch.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{reason}")]
pub struct AppendError {
    /// Wire error code (NOT_LEADER, NOT_ENOUGH_REPLICAS, ...).
    pub code: pb::ErrorCode,
    /// The broker's message.
    pub reason: String,
}

/// Queued records and who waits for their first offset.
struct Write {
    records: Vec<pb::Record>,
    done: oneshot::Sender<Result<i64, AppendError>>,
}

/// Handle to the writer task of one offsets partition.
#[derive(Clone, Debug)]
pub struct Appender {
    tx: mpsc::Sender<Write>,
}

impl Appender {
    /// Starts the writer of offsets partition `index`.
    pub fn start(broker: Arc<Broker>, index: i32) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(run(broker, index, rx));
        Self { tx }
    }

    /// Appends `records` (in one batch with whatever else is queued) and
    /// returns the log offset of the first once every in-sync replica has
    /// them.
    pub async fn append(&self, records: Vec<pb::Record>) -> Result<i64, AppendError> {
        let gone = || AppendError {
            code: pb::ErrorCode::NotCoordinator,
            reason: "this broker stopped coordinating the offsets partition".to_string(),
        };
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Write { records, done })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

impl Appender {
    /// Queues `records` without waiting (None when the queue is full); the
    /// receiver gets the offset of the first once they are stored. Writes
    /// submitted one after the other are appended in that order.
    pub fn submit(
        &self,
        records: Vec<pb::Record>,
    ) -> Option<oneshot::Receiver<Result<i64, AppendError>>> {
        let (done, rx) = oneshot::channel();
        self.tx.try_send(Write { records, done }).ok()?;
        Some(rx)
    }
}

/// Replies to every write of a batch: each gets the offset of its first
/// record (`base` + the records before it).
fn reply(writes: Vec<(Write, usize)>, result: Result<i64, AppendError>) {
    for (w, before) in writes {
        let r = result.clone().map(|base| base + before as i64);
        let _ = w.done.send(r);
    }
}

async fn run(broker: Arc<Broker>, index: i32, mut rx: mpsc::Receiver<Write>) {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            first = rx.recv(), if open && in_flight.len() < IN_FLIGHT_MAX => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                // Everything queued meanwhile rides in the same append.
                let mut count = first.records.len();
                let mut writes = vec![(first, 0usize)];
                while count < BATCH_RECORDS_MAX {
                    let Ok(w) = rx.try_recv() else { break };
                    let n = w.records.len();
                    writes.push((w, count));
                    count += n;
                }
                let mut records = Vec::with_capacity(count);
                for (w, _) in &mut writes {
                    records.append(&mut w.records);
                }
                let req = pb::ProduceRequest {
                    topic: OFFSETS_TOPIC.to_string(),
                    partition: Some(index),
                    records,
                    acks: pb::Acks::All as i32,
                    ..Default::default()
                };
                match broker.produce_append(req).await {
                    Ok(appended) => {
                        let broker = broker.clone();
                        in_flight.push(async move {
                            let r = broker.produce_complete(appended).await;
                            (r, writes)
                        });
                    }
                    Err(e) => reply(writes, Err(AppendError { code: e.code(), reason: e.to_string() })),
                }
            }
            Some((r, writes)) = in_flight.next(), if !in_flight.is_empty() => {
                let r = r
                    .map(|resp| resp.base_offset)
                    .map_err(|e| AppendError { code: e.code(), reason: e.to_string() });
                reply(writes, r);
            }
        }
    }
}
