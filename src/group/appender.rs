//! The one writer of an offsets partition this broker coordinates: offset
//! commits and group metadata records queue here, and every batch of
//! queued writes becomes one append to `__consumer_offsets` with acks=all
//! (group commit).
//!
//! No task of its own: a writer queues its records, then (in a task no
//! client can drop) takes the append lock; whoever holds it takes
//! everything queued (its own records, or nothing when an earlier holder
//! already took them), appends it, releases the lock and waits for the
//! replicas outside it. So appends go out in queue order, commits that
//! arrive while an append is under way ride in the next one, any number
//! of appended batches wait for their replicas at once, and a writer
//! whose client goes away strands nothing.
//!
//! Where it sits: between the coordinator ([`super::coordinator`]) and the
//! produce path ([`crate::broker::Broker::produce_append`] /
//! [`crate::broker::Broker::produce_complete`]). The coordinator drops the
//! appender when leadership moves; queued writers then fail with
//! NOT_COORDINATOR.

use std::sync::{Arc, Mutex};

use runnel_proto::v1 as pb;
use tokio::sync::oneshot;

use super::coordinator::OFFSETS_TOPIC;
use crate::broker::Broker;

/// Most records in one append.
pub(super) const BATCH_RECORDS_MAX: usize = 4096;
/// Most bytes in one append (records counted with [`RECORD_OVERHEAD`]),
/// and at most the offsets topic's `max.message.bytes` less
/// [`BATCH_OVERHEAD`]: writes that would pass it wait for the next
/// append, and one larger on its own goes alone, failing alone.
const BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Upper bound on a record's encoding beyond its key and value.
const RECORD_OVERHEAD: usize = 32;
/// Upper bound on a batch header.
const BATCH_OVERHEAD: usize = 128;

/// The failpoint failing every append while it is set (tests only, with
/// `[broker] failpoints = true`).
pub const FAIL_APPENDS_FAILPOINT: &str = "fail-offsets-appends";

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

/// Records queued by [`Appender::queue`], not yet appended.
#[derive(Debug)]
pub struct Queued(oneshot::Receiver<Result<i64, AppendError>>);

/// Queued records and who waits for their first offset.
struct Write {
    records: Vec<pb::Record>,
    done: oneshot::Sender<Result<i64, AppendError>>,
}

/// The writer of one offsets partition.
#[derive(Clone)]
pub struct Appender {
    broker: Arc<Broker>,
    index: i32,
    queue: Arc<Mutex<Vec<Write>>>,
    /// Held while a batch is taken from the queue and appended.
    append: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

fn gone() -> AppendError {
    AppendError {
        code: pb::ErrorCode::NotCoordinator,
        reason: "this broker stopped coordinating the offsets partition".to_string(),
    }
}

impl Appender {
    /// The writer of offsets partition `index`.
    pub fn start(broker: Arc<Broker>, index: i32) -> Self {
        Self {
            broker,
            index,
            queue: Arc::new(Mutex::new(Vec::new())),
            append: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn enqueue(&self, records: Vec<pb::Record>) -> oneshot::Receiver<Result<i64, AppendError>> {
        let (done, rx) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Write { records, done });
        rx
    }

    /// Queues `records` now (synchronously: under whatever lock the caller
    /// holds, so nothing it checked can change before they are queued);
    /// [`Appender::finish`] appends them and waits.
    pub fn queue(&self, records: Vec<pb::Record>) -> Queued {
        Queued(self.enqueue(records))
    }

    /// Appends what [`Appender::queue`] queued (with whatever else is
    /// queued) and returns the log offset of its first record once every
    /// in-sync replica has it. Run it to the end, in a task no client can
    /// drop (the coordinator runs one per write): dropped while it held
    /// the append lock, it would fail the other writes of its batch, and
    /// dropped before, leave its write queued until another came.
    pub async fn finish(&self, Queued(rx): Queued) -> Result<i64, AppendError> {
        self.take_and_flush().await;
        rx.await.map_err(|_| gone())?
    }

    /// Queues `records` without waiting; the receiver gets the offset of
    /// the first once they are stored. Writes queued one after the other
    /// are appended in that order.
    pub fn submit(&self, records: Vec<pb::Record>) -> oneshot::Receiver<Result<i64, AppendError>> {
        let rx = self.enqueue(records);
        self.spawn_taker();
        rx
    }

    /// A task that does [`Appender::take_and_flush`].
    fn spawn_taker(&self) {
        let me = self.clone();
        tokio::spawn(async move { me.take_and_flush().await });
    }

    /// Takes the append lock and appends what is queued (nothing when an
    /// earlier holder took it all).
    async fn take_and_flush(&self) {
        let guard = self.append.clone().lock_owned().await;
        let batch = self.take();
        if !batch.is_empty() {
            flush(self.broker.clone(), self.index, batch, guard).await;
        }
    }

    /// The queued writes, up to [`BATCH_RECORDS_MAX`] records and
    /// [`Appender::batch_bytes_max`] bytes (at least one write), in order.
    fn take(&self) -> Vec<Write> {
        let cap = self.batch_bytes_max();
        take_from(
            &mut self.queue.lock().unwrap_or_else(|e| e.into_inner()),
            cap,
        )
    }

    /// The most bytes of records (counted by [`record_bytes`]) in one
    /// append: [`BATCH_BYTES_MAX`], or less when the topic's
    /// `max.message.bytes` is (a topic created before it carried its own
    /// 16 MiB limit keeps the default 1 MiB).
    pub(super) fn batch_bytes_max(&self) -> usize {
        self.broker
            .max_message_bytes(OFFSETS_TOPIC)
            .map_or(BATCH_BYTES_MAX, |max| {
                max.saturating_sub(BATCH_OVERHEAD).min(BATCH_BYTES_MAX)
            })
    }

    /// Holds every write back until the guard is dropped (compaction:
    /// [`super::compact`]). Writes queued meanwhile are appended after.
    pub(super) async fn exclusive(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.append.clone().lock_owned().await
    }

    /// Whether `other` is this appender (a clone of it), not a later one
    /// of the same partition.
    pub(super) fn same_as(&self, other: &Appender) -> bool {
        Arc::ptr_eq(&self.append, &other.append)
    }

    /// The broker it appends through.
    pub(super) fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The offsets partition it writes.
    pub(super) fn index(&self) -> i32 {
        self.index
    }
}

/// [`Appender::take`] on the queue `q`.
fn take_from(q: &mut Vec<Write>, bytes_max: usize) -> Vec<Write> {
    let (mut count, mut bytes) = (0, 0);
    let mut n = 0;
    while n < q.len() {
        let size = write_bytes(&q[n]);
        if n > 0 && (count + q[n].records.len() > BATCH_RECORDS_MAX || bytes + size > bytes_max) {
            break;
        }
        count += q[n].records.len();
        bytes += size;
        n += 1;
    }
    q.drain(..n).collect()
}

/// A write's key and value bytes.
fn write_bytes(w: &Write) -> usize {
    w.records.iter().map(record_bytes).sum()
}

/// A record's key and value bytes, plus [`RECORD_OVERHEAD`].
pub(super) fn record_bytes(r: &pb::Record) -> usize {
    r.key.as_ref().map_or(0, |k| k.len())
        + r.value.as_ref().map_or(0, |v| v.len())
        + RECORD_OVERHEAD
}

/// Appends `batch` as one request while holding the append lock, then
/// waits for the replicas without it and answers every write with the
/// offset of its first record.
async fn flush(
    broker: Arc<Broker>,
    index: i32,
    batch: Vec<Write>,
    guard: tokio::sync::OwnedMutexGuard<()>,
) {
    let mut records = Vec::new();
    let mut writes = Vec::with_capacity(batch.len());
    for w in batch {
        let before = records.len();
        records.extend(w.records);
        writes.push((w.done, before));
    }
    let req = pb::ProduceRequest {
        topic: OFFSETS_TOPIC.to_string(),
        partition: Some(index),
        records,
        acks: pb::Acks::All as i32,
        ..Default::default()
    };
    // Tests: every append of the offsets topic fails while this
    // failpoint's file exists (a store that cannot complete).
    let appended = if broker.failpoint(FAIL_APPENDS_FAILPOINT) {
        Err(crate::error::BrokerError::InvalidRequest {
            reason: format!("failpoint {FAIL_APPENDS_FAILPOINT}"),
        })
    } else {
        broker.produce_append(req).await
    };
    drop(guard);
    let result = match appended {
        Ok(a) => broker.produce_complete(a).await.map(|r| r.base_offset),
        Err(e) => Err(e),
    }
    .map_err(|e| AppendError {
        code: e.code(),
        reason: e.to_string(),
    });
    for (done, before) in writes {
        let _ = done.send(result.clone().map(|base| base + before as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(records: usize, bytes: usize) -> Write {
        let record = pb::Record {
            value: Some(vec![0u8; bytes / records].into()),
            ..Default::default()
        };
        Write {
            records: vec![record; records],
            done: oneshot::channel().0,
        }
    }

    /// A batch stays under the byte cap (the offsets topic refuses a
    /// larger one, failing every write in it); a write larger than the
    /// cap goes alone.
    #[test]
    fn batches_are_capped_by_records_and_bytes() {
        let mut q = vec![write(1, 600_000), write(1, 600_000), write(2, 10)];
        assert_eq!(take_from(&mut q, BATCH_BYTES_MAX).len(), 1);
        assert_eq!(take_from(&mut q, BATCH_BYTES_MAX).len(), 2);
        assert!(q.is_empty());
        let mut q = vec![write(1, 3_000_000), write(1, 10)];
        assert_eq!(take_from(&mut q, BATCH_BYTES_MAX).len(), 1, "alone");
        let mut q = vec![write(4000, 4000), write(100, 100), write(1, 1)];
        assert_eq!(
            take_from(&mut q, BATCH_BYTES_MAX).len(),
            1,
            "records capped"
        );
        assert_eq!(take_from(&mut q, BATCH_BYTES_MAX).len(), 2);
        // Record overhead counts: 1,000 empty records are 32,000 bytes.
        let mut q = vec![write(1000, 0), write(1000, 0)];
        assert_eq!(take_from(&mut q, 50_000).len(), 1);
    }
}
