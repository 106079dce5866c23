//! A batching producer. Records are grouped per partition into one
//! encoded batch until it reaches `batch_bytes_max` or has waited
//! `linger`; each partition then has one stream to its leader on which up
//! to `in_flight_max` batches are pipelined. The broker appends a stream's
//! batches in order, so a partition's records keep the order of `send`.
//!
//! `send` encodes the record straight into its partition's open batch
//! under one lock, in the caller's task; all records of a batch share one
//! answer (`DeliveryFuture` points at it with the record's index), so a
//! record costs no channel message, task hop or allocation of its own.
//! Unanswered records are bounded by `buffer_bytes_max`.
//!
//! Retries: a batch that fails with a retriable error (leader moved,
//! timeout, too few replicas, connection lost) is sent again, with
//! every batch after it, in order, on a fresh stream to the current leader
//! after a backoff, until `delivery_timeout` has passed since its first
//! record was added (then it fails, with every later batch out of time
//! too). Idempotence (on by default with acks=all) makes that safe:
//! the producer takes a producer id from the cluster and stamps each batch
//! with its per-partition sequence, so the leader answers a batch it
//! already has with the original offsets instead of appending it twice,
//! and refuses a gap instead of reordering. At most
//! [`IDEMPOTENT_IN_FLIGHT_MAX`] batches are then in flight per partition,
//! the number the leader remembers. A batch the leader refuses before
//! storing any of it (too large, corrupt, not allowed) fails alone: it
//! gives its sequence back, and the batches after it are renumbered and
//! sent again. When a batch fails for good otherwise (out of time: it may
//! have been stored), its partition's sequence is broken; the producer
//! takes a new producer id for later batches. A partition that answers UNKNOWN_PRODUCER_ID keeps
//! nothing of this producer's (deleted and created again, or its state
//! expired): its sender restarts the sequence at 0 for the queued batches
//! and retries them (Kafka's KIP-360) instead of failing them. Without
//! idempotence retries may duplicate records.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use runnel_proto::v1 as pb;
use runnel_storage::BatchBuilder;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tracing::{debug, warn};

use super::{Client, ClientError};
use crate::broker::now_ms;
use crate::partitioner::partition_for_key;

/// Producer settings.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Durability wanted for each batch.
    pub acks: pb::Acks,
    /// A batch is sent once its encoded size reaches this.
    pub batch_bytes_max: usize,
    /// A non-full batch is sent after waiting this long.
    pub linger: Duration,
    /// Batches sent but not yet answered, per partition.
    pub in_flight_max: usize,
    /// Broker-side wait for replicas (ms); 0 uses the broker default.
    pub timeout_ms: u32,
    /// A batch not answered within this time counts as failed (retriable)
    /// and its partition's stream is reopened.
    pub request_timeout: Duration,
    /// Idempotent producing (effective with acks=all): no duplicates and
    /// no reordering on retries. On by default, as in Kafka.
    pub idempotence: bool,
    /// Retriable failures are retried until a batch has waited this long
    /// since its first record was sent (Kafka's delivery.timeout.ms); a
    /// batch still unsent by then fails without being sent. Zero
    /// disables retries.
    pub delivery_timeout: Duration,
    /// First wait before a retry; doubles up to one second.
    pub retry_backoff: Duration,
    /// Record bytes (estimated encoded size) buffered but not yet
    /// acknowledged; `send` waits while the buffer is full (Kafka's
    /// buffer.memory). Not counted: the room each partition's open batch
    /// reserves (`batch_bytes_max`), so a producer writing to P partitions
    /// at once may hold P × `batch_bytes_max` more.
    pub buffer_bytes_max: usize,
}

/// Batches in flight per partition with idempotence: the number of
/// batches a leader remembers per producer.
pub const IDEMPOTENT_IN_FLIGHT_MAX: usize = runnel_storage::producer_state::BATCHES_RETAINED;

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            acks: pb::Acks::All,
            batch_bytes_max: 64 * 1024,
            linger: Duration::from_millis(5),
            in_flight_max: 16,
            timeout_ms: 0,
            request_timeout: Duration::from_secs(35),
            idempotence: true,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            buffer_bytes_max: 32 * 1024 * 1024,
        }
    }
}

/// A record to send.
#[derive(Clone, Debug, Default)]
pub struct ProducerRecord {
    /// Partitioning key.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Timestamp in ms; the send time when absent.
    pub timestamp_ms: Option<i64>,
    /// Explicit partition; otherwise murmur2(key), or a sticky partition.
    pub partition: Option<i32>,
}

impl ProducerRecord {
    /// A record with only a value.
    pub fn value(value: impl Into<Bytes>) -> Self {
        Self {
            value: Some(value.into()),
            ..Self::default()
        }
    }

    /// A record with a key and a value.
    pub fn keyed(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: Some(key.into()),
            value: Some(value.into()),
            ..Self::default()
        }
    }

    /// Upper bound on the record's encoded size.
    fn size_estimate(&self) -> usize {
        self.key.as_ref().map_or(0, |k| k.len())
            + self.value.as_ref().map_or(0, |v| v.len())
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()) + 10)
                .sum::<usize>()
            + RECORD_OVERHEAD_BYTES
    }
}

/// Where a record was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset, or -1 with acks=none.
    pub offset: i64,
}

/// Upper bound on a record's encoding overhead (varints, attributes).
const RECORD_OVERHEAD_BYTES: usize = 32;

/// `from`, or the next partition after it (wrapping) that has a leader;
/// `from` itself when none has.
fn first_online(from: i32, count: i32, offline: &[i32]) -> i32 {
    (0..count)
        .map(|i| (from + i) % count)
        .find(|p| !offline.contains(p))
        .unwrap_or(from)
}

/// How long a topic's partition count is trusted before it is read again
/// from the client's metadata cache (which the senders invalidate when a
/// leader moves).
const TOPIC_REFRESH: Duration = Duration::from_secs(1);

/// The answer for one batch, shared by the futures of all its records:
/// one allocation per batch instead of a channel per record.
///
/// The answer is written once and then read without a lock: a record's
/// future and its `acked_at` cost an atomic load each, not a lock and an
/// unlock (on a flat-out 1 KiB produce the client thread is the busiest
/// on the machine; benches/RESULTS.md, session 9). Only futures that find
/// no answer yet take the wakers' lock.
#[derive(Debug)]
struct BatchOutcome {
    /// Where the batch goes: kept here once rather than in every record's
    /// future (cloning an `Arc<str>` per record is an atomic increment,
    /// and dropping it another).
    topic: Arc<str>,
    partition: i32,
    /// The batch's base offset (-1 with acks=none), or why it failed, and
    /// when that was known.
    answer: OnceLock<(Result<i64, ClientError>, std::time::Instant)>,
    wakers: Mutex<Vec<Waker>>,
}

impl BatchOutcome {
    fn new(topic: Arc<str>, partition: i32) -> Self {
        Self {
            topic,
            partition,
            answer: OnceLock::new(),
            wakers: Mutex::new(Vec::new()),
        }
    }

    fn lock_wakers(&self) -> MutexGuard<'_, Vec<Waker>> {
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, result: Result<i64, ClientError>) {
        if self
            .answer
            .set((result, std::time::Instant::now()))
            .is_err()
        {
            return; // answered already
        }
        // A future that found no answer registered its waker under this
        // lock before it let go, so taking them after the answer is
        // written misses none.
        let wakers = std::mem::take(&mut *self.lock_wakers());
        for w in wakers {
            w.wake();
        }
    }
}

/// Resolves when the record's batch is acknowledged.
#[derive(Debug)]
pub struct DeliveryFuture {
    outcome: Arc<BatchOutcome>,
    /// The record's position in its batch.
    index: u32,
    /// When `send` was called.
    sent_at: std::time::Instant,
}

impl DeliveryFuture {
    fn failed(topic: &str, partition: i32, e: ClientError) -> Self {
        let outcome = Arc::new(BatchOutcome::new(topic.into(), partition));
        outcome.set(Err(e));
        DeliveryFuture {
            outcome,
            index: 0,
            sent_at: std::time::Instant::now(),
        }
    }

    /// When `send` was called for the record: the clock reading its
    /// timestamp was taken from, before any wait for buffer space.
    pub fn sent_at(&self) -> std::time::Instant {
        self.sent_at
    }

    /// When the record's batch was answered (or failed), once it has been.
    pub fn acked_at(&self) -> Option<std::time::Instant> {
        self.outcome.answer.get().map(|(_, at)| *at)
    }
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ClientError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = match self.outcome.answer.get() {
            Some((answer, _)) => answer,
            None => {
                let mut wakers = self.outcome.lock_wakers();
                // Checked again under the lock `set` takes after writing
                // the answer (see there).
                match self.outcome.answer.get() {
                    Some((answer, _)) => answer,
                    None => {
                        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                            wakers.push(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                }
            }
        };
        Poll::Ready(match answer {
            Ok(base) => Ok(RecordMetadata {
                topic: self.outcome.topic.clone(),
                partition: self.outcome.partition,
                offset: if *base < 0 {
                    -1
                } else {
                    base + i64::from(self.index)
                },
            }),
            Err(e) => Err(e.clone()),
        })
    }
}

/// A batch on its way: answers its records' futures exactly once (with
/// `Closed` if it is dropped unanswered) and returns its bytes to the
/// producer's buffer.
struct BatchDone {
    outcome: Arc<BatchOutcome>,
    permits: u32,
    buffer: Arc<Semaphore>,
    /// When its first record was added: the delivery timeout counts from
    /// here (Kafka's delivery.timeout.ms bounds the time from `send` to
    /// the answer), whether the batch waited in a partition's queue or
    /// was retried.
    created_at: Instant,
}

impl BatchDone {
    fn finish(self, result: Result<i64, ClientError>) {
        self.outcome.set(result);
    }
}

impl Drop for BatchDone {
    fn drop(&mut self) {
        self.outcome.set(Err(ClientError::Closed));
        self.buffer.add_permits(self.permits as usize);
    }
}

/// The batching producer. Cloning is not needed: `send` takes `&self`.
///
/// `send` appends the record to its partition's open batch under one
/// lock; a full batch goes straight to that partition's sender task, and
/// a linger task sends the batches whose linger time is up.
#[derive(Debug)]
pub struct Producer {
    shared: Arc<Shared>,
    linger_task: JoinHandle<()>,
}

struct Shared {
    client: Client,
    config: ProducerConfig,
    /// Present when idempotence is in effect.
    idempotence: Option<Idempotence>,
    state: Mutex<State>,
    /// Wakes the linger task when a batch opens while none is pending.
    linger_wake: Notify,
    /// Permits = record bytes that may still be buffered.
    buffer: Arc<Semaphore>,
    /// A `send` handed a full batch to its sender: the next `send` yields
    /// first (see [`Producer::send`]).
    yield_due: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The idempotent producer's identity.
struct Idempotence {
    /// Broken by a partition sender when a batch failed for good: the
    /// next batch takes a new producer id.
    broken: Arc<Sequence>,
    /// One producer id request at a time.
    init: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Looked up for every record: FxHash, not SipHash (the keys are the
    /// caller's own topic names, not hostile input).
    topics: FxHashMap<String, TopicState>,
    /// (producer id, epoch), once obtained (idempotence only).
    producer_id: Option<(i64, i16)>,
    /// Some batch has a linger deadline (the linger task is armed).
    lingering: bool,
    next_sticky: u32,
    clock: WallClock,
}

/// Record timestamps (ms since the epoch) from the monotonic clock
/// reading `send` takes anyway: one clock read per record instead of two
/// (a clock read cost about a tenth of the producer's time with 100-byte
/// records). The wall clock is read again every [`WallClock::REBASE`], so
/// a step of the system clock shows within that.
#[derive(Default)]
struct WallClock {
    /// Wall-clock ms at a monotonic reading, and until when that pair is
    /// used; `None` before the first record.
    base: Option<(std::time::Instant, i64, std::time::Instant)>,
}

impl WallClock {
    const REBASE: Duration = Duration::from_secs(1);

    /// Wall-clock ms at `at`, a recent monotonic reading (it may be older
    /// than the base: `send` reads the clock before it waits for buffer
    /// space or metadata, and before other tasks' calls that took the
    /// lock first). One `Instant` difference per call: each costs about
    /// forty instructions, and this runs once per record.
    fn ms(&mut self, at: std::time::Instant) -> i64 {
        let (base, ms) = match self.base {
            Some((base, ms, until)) if at < until => (base, ms),
            // Both read now, so the pair is one moment.
            _ => {
                let base = std::time::Instant::now();
                let ms = now_ms();
                self.base = Some((base, ms, base + Self::REBASE));
                (base, ms)
            }
        };
        match at.checked_duration_since(base) {
            Some(after) => ms + after.as_millis() as i64,
            None => ms - (base - at).as_millis() as i64,
        }
    }
}

struct TopicState {
    name: Arc<str>,
    count: i32,
    /// Until when the partition count, read at its last refresh, is
    /// trusted (compared with each record's clock reading: cheaper than
    /// taking their difference).
    fresh_until: std::time::Instant,
    /// Where keyless records go until that partition's batch fills.
    sticky: Option<i32>,
    /// Partitions without a leader at the last refresh: keyless records
    /// skip them (as Kafka's sticky partitioner picks among available
    /// partitions), rather than wait there for the delivery timeout.
    offline: Vec<i32>,
    partitions: FxHashMap<i32, PartitionState>,
}

#[derive(Default)]
struct PartitionState {
    pending: Option<Pending>,
    sender: Option<mpsc::UnboundedSender<SenderMsg>>,
    /// Next sequence and the producer id it counts for.
    sequence: i32,
    sequence_of: Option<(i64, i16)>,
}

/// A batch being filled.
struct Pending {
    builder: BatchBuilder,
    outcome: Arc<BatchOutcome>,
    permits: u32,
    created_at: Instant,
    deadline: Instant,
}

impl Producer {
    pub(crate) fn start(client: Client, mut config: ProducerConfig) -> Producer {
        let idempotent = config.idempotence && config.acks == pb::Acks::All;
        if idempotent {
            config.in_flight_max = config.in_flight_max.clamp(1, IDEMPOTENT_IN_FLIGHT_MAX);
        }
        let permits_max = Semaphore::MAX_PERMITS.min(u32::MAX as usize);
        config.batch_bytes_max = config.batch_bytes_max.clamp(1, permits_max);
        config.buffer_bytes_max = config
            .buffer_bytes_max
            .clamp(config.batch_bytes_max, permits_max);
        // Duration::MAX for "no limit" is capped, as the client's other
        // waits are: added to an Instant, it panicked in `send` (linger)
        // or in the partition's sender task (the others), whose partition
        // then failed every later batch as closed.
        for wait in [
            &mut config.linger,
            &mut config.request_timeout,
            &mut config.delivery_timeout,
            &mut config.retry_backoff,
        ] {
            *wait = (*wait).min(super::LONGEST_WAIT);
        }
        let shared = Arc::new(Shared {
            client,
            buffer: Arc::new(Semaphore::new(config.buffer_bytes_max)),
            idempotence: idempotent.then(|| Idempotence {
                broken: Arc::new(Sequence::default()),
                init: tokio::sync::Mutex::new(()),
            }),
            config,
            state: Mutex::new(State::default()),
            linger_wake: Notify::new(),
            yield_due: std::sync::atomic::AtomicBool::new(false),
        });
        let linger_task = tokio::spawn(linger(shared.clone()));
        Producer {
            shared,
            linger_task,
        }
    }

    /// Queues a record; the returned future resolves once it is stored.
    /// Waits while the producer's buffer is full (backpressure).
    pub async fn send(
        &self,
        topic: &str,
        record: ProducerRecord,
    ) -> Result<DeliveryFuture, ClientError> {
        let sh = &self.shared;
        // Let the partition's sender start the batch the last call handed
        // it: on a single-threaded runtime it runs only when this task
        // yields, and a caller sending in a tight loop would otherwise
        // fill the whole buffer first while the broker idles
        // (benches/RESULTS.md, row 26). Here, before anything is queued:
        // a call dropped at this yield sent nothing. (The yield came after
        // the record was queued, and a call dropped there, by a select! or
        // a timeout, sent a record whose DeliveryFuture its caller never
        // got: sent again, it was stored twice.)
        if sh.yield_due.swap(false, Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
        let sent_at = std::time::Instant::now();
        let permits = record.size_estimate().clamp(1, sh.config.buffer_bytes_max) as u32;
        // The permits are held (and given back if this call is dropped
        // while it waits, for a producer id or metadata, as a caller's
        // timeout or select! does) until the record's batch takes them.
        // Forgotten at once, every cancelled send leaked its bytes for
        // good, and once enough had, every send blocked.
        let mut held = Some(match sh.buffer.try_acquire_many(permits) {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => sh
                .buffer
                .acquire_many(permits)
                .await
                .map_err(|_| ClientError::Closed)?,
            Err(TryAcquireError::Closed) => return Err(ClientError::Closed),
        });
        let refused = |e: ClientError| {
            Ok(DeliveryFuture::failed(
                topic,
                record.partition.unwrap_or(-1),
                e,
            ))
        };
        // An explicit partition past the count known: the count is read
        // again from the cluster once (the topic may have grown) before
        // the record is refused.
        let mut recounted = false;
        loop {
            // Decided under the lock; anything that awaits happens after
            // it is released (the guard must not live across an await).
            let (id_missing, added, past_count) = {
                let mut st = sh.lock();
                let id_missing = !sh.id_usable(&st);
                let mut added = None;
                // One lookup per record: whether the count is fresh (a
                // refresh after `sent_at`, while this call waited for it,
                // counts), and whether an explicit partition is past it.
                let (fresh, past_count) = match st.topics.get(topic) {
                    Some(t) => {
                        let past = record.partition.is_some_and(|p| p >= t.count);
                        (sent_at < t.fresh_until && (recounted || !past), past)
                    }
                    None => (false, false),
                };
                if !id_missing && fresh {
                    let now = st.clock.ms(sent_at);
                    added = Some(sh.add(&mut st, topic, &record, permits, (sent_at, now)));
                    // The record's batch holds them now.
                    if let Some(p) = held.take() {
                        p.forget();
                    }
                }
                (id_missing, added, past_count)
            };
            if let Some((future, dispatched)) = added {
                if dispatched {
                    sh.yield_due.store(true, Ordering::Relaxed);
                }
                return Ok(future);
            }
            if id_missing {
                if let Err(e) = sh.ensure_producer_id().await {
                    return refused(e);
                }
                continue;
            }
            if past_count && !recounted {
                recounted = true;
                sh.client.invalidate(topic);
            }
            match sh.client.partition_layout(topic).await {
                Ok((0, _)) => {
                    return refused(ClientError::Invalid(format!(
                        "topic '{topic}' has no partitions"
                    )))
                }
                Ok((count, offline)) => {
                    let mut st = sh.lock();
                    let t = st
                        .topics
                        .entry(topic.to_string())
                        .or_insert_with(|| TopicState {
                            name: topic.into(),
                            count,
                            fresh_until: std::time::Instant::now() + TOPIC_REFRESH,
                            sticky: None,
                            offline: Vec::new(),
                            partitions: FxHashMap::default(),
                        });
                    t.count = count;
                    t.offline = offline;
                    t.fresh_until = std::time::Instant::now() + TOPIC_REFRESH;
                }
                Err(e) => return refused(e),
            }
        }
    }

    /// Sends every queued record now and waits for all answers.
    pub async fn flush(&self) -> Result<(), ClientError> {
        // Open batches are stamped as they leave: with a usable producer
        // id if one can be had (if not, they fail or go as the linger
        // task would send them).
        if self.shared.needs_id_for_pending() {
            if let Err(e) = self.shared.ensure_producer_id().await {
                debug!(error = %e, "no producer id for the batches flushed");
            }
        }
        let waits = {
            let mut st = self.shared.lock();
            self.shared.dispatch_all(&mut st, |_| true);
            let mut waits = Vec::new();
            for t in st.topics.values() {
                for p in t.partitions.values() {
                    if let Some(sender) = &p.sender {
                        let (tx, rx) = oneshot::channel();
                        if sender.send(SenderMsg::Barrier(tx)).is_ok() {
                            waits.push(rx);
                        }
                    }
                }
            }
            waits
        };
        for w in waits {
            let _ = w.await;
        }
        Ok(())
    }

    /// Flushes and stops.
    pub async fn close(self) -> Result<(), ClientError> {
        self.flush().await
    }
}

/// Longest wait of a partition sender for the metadata that tells a
/// lagging leader from a topic that is gone.
const LISTED_CHECK_WAIT: Duration = Duration::from_secs(2);

impl Drop for Producer {
    /// Sends what is still queued (the senders finish their queues and
    /// stop) and stops the linger task.
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        self.shared.dispatch_all(&mut st, |_| true);
        for t in st.topics.values_mut() {
            for p in t.partitions.values_mut() {
                p.sender = None;
            }
        }
        drop(st);
        self.linger_task.abort();
    }
}

/// Sends batches whose linger time is up; sleeps until the earliest
/// deadline, or until woken because a batch opened while none was
/// pending (`notify_one` keeps a permit when nobody waits yet, so a
/// wake-up sent after the state was read is not lost).
async fn linger(sh: Arc<Shared>) {
    loop {
        // A producer id is only asked for when there is a batch to stamp
        // (an idle producer makes no request); `send` normally has taken
        // one already, so the scan runs only when it is missing.
        if sh.needs_id_for_pending() {
            if let Err(e) = sh.ensure_producer_id().await {
                debug!(error = %e, "no producer id for lingering batches yet");
            }
        }
        let next = {
            let mut st = sh.lock();
            let now = Instant::now();
            sh.dispatch_all(&mut st, |p| p.deadline <= now);
            let next = st
                .topics
                .values()
                .flat_map(|t| t.partitions.values())
                .filter_map(|p| p.pending.as_ref().map(|p| p.deadline))
                .min();
            st.lingering = next.is_some();
            next
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = sh.linger_wake.notified() => {}
                }
            }
            None => sh.linger_wake.notified().await,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an open batch waits for a usable producer id.
    fn needs_id_for_pending(&self) -> bool {
        let st = self.lock();
        !self.id_usable(&st)
            && st
                .topics
                .values()
                .any(|t| t.partitions.values().any(|p| p.pending.is_some()))
    }

    /// Whether batches can be stamped now: idempotence is off, or there
    /// is a producer id whose sequence is not broken.
    fn id_usable(&self, st: &State) -> bool {
        self.idempotence
            .as_ref()
            .is_none_or(|idem| st.producer_id.is_some() && !idem.broken.is_broken())
    }

    /// Takes a producer id when idempotence is on and there is none, or
    /// the sequence was broken by a batch that failed for good.
    async fn ensure_producer_id(&self) -> Result<(), ClientError> {
        let Some(idem) = &self.idempotence else {
            return Ok(());
        };
        if self.id_usable(&self.lock()) {
            return Ok(());
        }
        let _one = idem.init.lock().await;
        if self.id_usable(&self.lock()) {
            return Ok(());
        }
        let id = self
            .client
            .init_producer_id(self.config.delivery_timeout.max(Duration::from_secs(1)))
            .await?;
        debug!(producer_id = id.0, epoch = id.1, "idempotent producer id");
        // Both under the state lock, the id first: a `send` between the
        // two would otherwise stamp its batch with the broken id.
        let mut st = self.lock();
        st.producer_id = Some(id);
        idem.broken.start(id.0);
        Ok(())
    }

    /// Appends one record to its partition's open batch (the state lock
    /// is held; the topic is known and fresh). Also says whether a full
    /// batch was handed to its sender.
    fn add(
        &self,
        st: &mut State,
        topic: &str,
        record: &ProducerRecord,
        permits: u32,
        (sent_at, now_ms): (std::time::Instant, i64),
    ) -> (DeliveryFuture, bool) {
        let State {
            topics,
            producer_id,
            lingering,
            next_sticky,
            clock: _,
        } = st;
        let t = topics.get_mut(topic).expect("caller checked");
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p < 0 || p >= t.count => {
                self.buffer.add_permits(permits as usize);
                let failed = DeliveryFuture::failed(
                    topic,
                    p,
                    ClientError::Invalid(format!(
                        "partition {p} does not exist: topic '{topic}' has {} partitions",
                        t.count
                    )),
                );
                return (failed, false);
            }
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, t.count),
            (None, None) => {
                let chosen = *t.sticky.get_or_insert_with(|| {
                    *next_sticky = next_sticky.wrapping_add(1);
                    (*next_sticky % t.count as u32) as i32
                }) % t.count;
                let online = first_online(chosen, t.count, &t.offline);
                t.sticky = Some(online);
                online
            }
        };
        let max = self.config.batch_bytes_max;
        let record_bytes = permits as usize;
        let p = t.partitions.entry(partition).or_default();
        // A batch never grows past batch_bytes_max by more than one
        // record's worth: a full batch leaves before the record joins.
        let mut dispatched = false;
        if p.pending
            .as_ref()
            .is_some_and(|b| !b.builder.is_empty() && b.builder.size_bytes() + record_bytes > max)
        {
            dispatched = true;
            self.dispatch(
                t.name.clone(),
                t.count,
                &mut t.sticky,
                partition,
                p,
                *producer_id,
            );
        }
        let pending = p.pending.get_or_insert_with(|| {
            if !*lingering {
                *lingering = true;
                self.linger_wake.notify_one();
            }
            let created_at = Instant::now();
            Pending {
                // Sized for a full batch: filling it never reallocates.
                builder: BatchBuilder::with_capacity(max + record_bytes),
                outcome: Arc::new(BatchOutcome::new(t.name.clone(), partition)),
                permits: 0,
                created_at,
                deadline: created_at + self.config.linger,
            }
        });
        let index = pending.builder.len() as u32;
        push_record(&mut pending.builder, record, now_ms);
        pending.permits += permits;
        let future = DeliveryFuture {
            outcome: pending.outcome.clone(),
            index,
            sent_at,
        };
        if pending.builder.size_bytes() >= max {
            dispatched = true;
            self.dispatch(
                t.name.clone(),
                t.count,
                &mut t.sticky,
                partition,
                p,
                *producer_id,
            );
        }
        (future, dispatched)
    }

    /// Sends every open batch that `due` selects.
    fn dispatch_all(&self, st: &mut State, due: impl Fn(&Pending) -> bool) {
        let producer_id = st.producer_id;
        for t in st.topics.values_mut() {
            for (&partition, p) in t.partitions.iter_mut() {
                if p.pending.as_ref().is_some_and(&due) {
                    self.dispatch(
                        t.name.clone(),
                        t.count,
                        &mut t.sticky,
                        partition,
                        p,
                        producer_id,
                    );
                }
            }
        }
    }

    /// Closes the partition's open batch and hands it to the partition's
    /// sender task (started on first use). Called under the state lock,
    /// so batches reach a sender in the order they were filled.
    fn dispatch(
        &self,
        topic: Arc<str>,
        count: i32,
        sticky: &mut Option<i32>,
        partition: i32,
        p: &mut PartitionState,
        producer_id: Option<(i64, i16)>,
    ) {
        let Some(pending) = p.pending.take() else {
            return;
        };
        // Keyless records move to another partition once a batch is sent.
        if *sticky == Some(partition) {
            *sticky = Some((partition + 1) % count.max(1));
        }
        let done = BatchDone {
            outcome: pending.outcome,
            permits: pending.permits,
            buffer: self.buffer.clone(),
            created_at: pending.created_at,
        };
        let mut builder = pending.builder;
        let mut broken = None;
        if let Some(idem) = &self.idempotence {
            let Some(id) = producer_id else {
                done.finish(Err(ClientError::Broker {
                    code: pb::ErrorCode::UnknownProducerId,
                    message: "no producer id could be obtained".into(),
                    leader: None,
                }));
                return;
            };
            if p.sequence_of != Some(id) {
                p.sequence_of = Some(id);
                p.sequence = 0;
            }
            builder = builder.producer(id.0, id.1, p.sequence);
            p.sequence =
                runnel_storage::producer_state::add_sequence(p.sequence, builder.len() as i32);
            broken = Some(idem.broken.clone());
        }
        let request = pb::ProduceRequest {
            topic: topic.to_string(),
            partition: Some(partition),
            batch: seal(builder),
            acks: self.config.acks as i32,
            timeout_ms: self.config.timeout_ms,
            ..Default::default()
        };
        let sender = p.sender.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(
                PartitionSender {
                    client: self.client.clone(),
                    topic: topic.to_string(),
                    partition,
                    in_flight_max: self.config.in_flight_max.max(1),
                    request_timeout: self.config.request_timeout,
                    delivery_timeout: self.config.delivery_timeout,
                    retry_backoff: self.config.retry_backoff,
                    broken,
                }
                .run(rx),
            );
            tx
        });
        // A send error drops the batch, which answers it with `Closed`.
        let _ = sender.send(SenderMsg::Batch(request, done));
    }
}

/// The batch's bytes, in an allocation of their own size when the
/// builder reserved far more (a batch sent by linger before it filled):
/// the buffer counts records, not the `batch_bytes_max` each open batch
/// reserves, and thousands of small batches queued during an outage
/// would otherwise each hold a full batch's memory.
fn seal(builder: BatchBuilder) -> Bytes {
    let buf = builder.build();
    if buf.capacity() > 2 * buf.len() + SEAL_SLACK_BYTES {
        Bytes::copy_from_slice(&buf)
    } else {
        buf.freeze()
    }
}

/// Unused capacity a sealed batch may keep without being copied.
const SEAL_SLACK_BYTES: usize = 4096;

/// Appends `record` to a batch; `now` is its timestamp unless it has one.
fn push_record(builder: &mut BatchBuilder, record: &ProducerRecord, now: i64) {
    let headers: Vec<(&str, Option<&[u8]>)> = record
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    builder.push(
        record.timestamp_ms.unwrap_or(now),
        record.key.as_deref(),
        record.value.as_deref(),
        &headers,
    );
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

enum SenderMsg {
    Batch(pb::ProduceRequest, BatchDone),
    /// Answered once every earlier batch is answered.
    Barrier(oneshot::Sender<()>),
}

/// A batch waiting for its answer, or a flush barrier.
enum Entry {
    Batch(Queued),
    Barrier(oneshot::Sender<()>),
}

struct Queued {
    request: pb::ProduceRequest,
    done: BatchDone,
    /// Send on the current stream, for the request timeout; `None` when
    /// not (yet, or any more) sent on it.
    sent_at: Option<Instant>,
    /// A copy was on a stream given up before its answer came: it may
    /// have been stored.
    maybe_stored: bool,
}

type Responses = runnel_proto::wire::DecodeStream<
    tonic::service::interceptor::ResponseBody<tonic::body::Body>,
    pb::ProduceResponse,
>;
/// An open produce stream to the partition's leader.
struct ProduceStream {
    requests: mpsc::Sender<pb::ProduceRequest>,
    responses: Responses,
    /// Answers still owed for batches that were sent again after a
    /// refused batch (see [`PartitionSender::skip_refused`]): the next
    /// this many answers are for the copies sent before, and are dropped.
    stale: usize,
    /// When the copies sent before count as unanswered (request timeout).
    stale_deadline: Option<Instant>,
    /// The (producer id, epoch) of the batches sent on it: a batch of
    /// another producer id waits until every earlier one is answered.
    producer: Option<(i64, i16)>,
    /// No more requests can be sent on it; its answers are still read.
    send_closed: bool,
}

/// One partition's pipelined stream to its leader, with retries.
struct PartitionSender {
    client: Client,
    topic: String,
    partition: i32,
    in_flight_max: usize,
    request_timeout: Duration,
    delivery_timeout: Duration,
    retry_backoff: Duration,
    /// The idempotent producer's sequence (None without idempotence).
    broken: Option<Arc<Sequence>>,
}

impl PartitionSender {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<SenderMsg>) {
        let mut stream: Option<ProduceStream> = None;
        // Set once the partition has forgotten this producer, or refused
        // one of its batches without storing it.
        let mut restart: Option<SequenceRestart> = None;
        let mut queue: VecDeque<Entry> = VecDeque::new();
        // The first `sent` batches of `queue` are in flight on `stream`.
        let mut sent = 0usize;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = self.retry_backoff;
        let mut open = true;
        loop {
            release_barriers(&mut queue);
            if retry_at.is_none() {
                if let Err(e) = self
                    .send_unsent(&mut stream, &mut queue, &mut sent, restart.as_ref())
                    .await
                {
                    if call_refused(&e) {
                        restart = self.refused_call(e, &mut stream, &mut queue, &mut sent, restart);
                        continue;
                    }
                    retry_at = self.retriable_failure(
                        e,
                        &mut stream,
                        &mut queue,
                        &mut sent,
                        &mut backoff,
                        &mut restart,
                        Ended::Unknown,
                    );
                    continue;
                }
            }
            let batches = queue
                .iter()
                .filter(|e| matches!(e, Entry::Batch(_)))
                .count();
            if !open && batches == 0 {
                release_barriers(&mut queue);
                break;
            }
            tokio::select! {
                msg = rx.recv(), if open && batches < self.in_flight_max => match msg {
                    None => open = false,
                    Some(SenderMsg::Barrier(done)) => {
                        if queue.is_empty() {
                            let _ = done.send(());
                        } else {
                            queue.push_back(Entry::Barrier(done));
                        }
                    }
                    Some(SenderMsg::Batch(request, done)) => {
                        let q = Queued {
                            request,
                            done,
                            sent_at: None,
                            maybe_stored: false,
                        };
                        let first = !queue.iter().any(|e| matches!(e, Entry::Batch(_)));
                        if first && self.expired(&q, Instant::now()) {
                            // Out of time before it was ever sent (it
                            // waited behind a partition that kept
                            // failing): it fails now, not one retry
                            // cycle at a time. Never sent, it was not
                            // stored: with idempotence its sequence is
                            // given back, so the batches after it are
                            // not refused as out of order. (One with
                            // batches ahead of it waits for them: it
                            // fails with them, or goes if they do.)
                            let e = self.expired_error();
                            if self.broken.is_some() {
                                restart = self.skip_refused(&q, restart, &mut stream, &mut queue, &mut sent);
                                q.done.finish(Err(e));
                            } else {
                                self.fail_for_good(q, &e);
                            }
                        } else {
                            queue.push_back(Entry::Batch(q));
                        }
                    }
                },
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => retry_at = None,
                _ = sleep_until_opt(self.answer_deadline(&queue, &stream)), if sent > 0 || stale_answers(&stream) > 0 => {
                    let e = ClientError::Broker {
                        code: pb::ErrorCode::RequestTimedOut,
                        message: format!(
                            "no answer from the leader of {}-{} within {:?}",
                            self.topic, self.partition, self.request_timeout
                        ),
                        leader: None,
                    };
                    retry_at = self.retriable_failure(e, &mut stream, &mut queue, &mut sent, &mut backoff, &mut restart, Ended::Unknown);
                }
                response = next_response(&mut stream), if sent > 0 || stale_answers(&stream) > 0 => {
                    if let (Some(s), Some(Ok(r))) = (stream.as_mut(), &response) {
                        if s.stale > 0 {
                            s.stale -= 1;
                            if r.error_code == 0 {
                                // Cannot happen: the partition expected the
                                // refused batch's sequence, which this
                                // copy does not carry.
                                warn!(topic = %self.topic, partition = self.partition, offset = r.base_offset, "a batch sent before a refused one's sequence was given back was stored");
                            }
                            continue;
                        }
                    }
                    // How the stream ended, if it did.
                    let mut ended = None;
                    let result = match response {
                        Some(Ok(r)) if r.error_code == 0 => Ok(r),
                        Some(Ok(r)) => Err(ClientError::Broker {
                            code: pb::ErrorCode::try_from(r.error_code).unwrap_or(pb::ErrorCode::Unknown),
                            message: r.error_message,
                            leader: None,
                        }),
                        Some(Err(status)) => {
                            ended = Some(Ended::Unknown);
                            Err(ClientError::from(status))
                        }
                        None => {
                            // The leader answers every request it read
                            // before it ends a stream: the unanswered
                            // ones were not read.
                            ended = Some(Ended::Unread);
                            Err(ClientError::Transport("produce stream ended".into()))
                        }
                    };
                    // A leader that does not know the topic or partition yet
                    // (it has not applied a creation or a partition added a
                    // moment ago, which the broker that answered the
                    // metadata had): retried while the cluster's metadata
                    // still lists it, as a Kafka producer retries
                    // UNKNOWN_TOPIC_OR_PARTITION; failed at once for a
                    // topic that is gone.
                    let lagging = match &result {
                        Err(e) if matches!(
                            e.code(),
                            pb::ErrorCode::UnknownTopic | pb::ErrorCode::UnknownPartition
                        ) => {
                            // Bounded: no answers are read meanwhile. Cut
                            // short, it counts as listed (no broker answered:
                            // an outage, retried as one).
                            self.client.invalidate(&self.topic);
                            tokio::time::timeout(LISTED_CHECK_WAIT, self.client.topic(&self.topic))
                                .await
                                .map_or(true, |t| {
                                    t.is_ok_and(|t| t.partitions.iter().any(|p| p.partition == self.partition))
                                })
                        }
                        _ => false,
                    };
                    match result {
                        Ok(r) => {
                            backoff = self.retry_backoff;
                            let q = pop_front_batch(&mut queue);
                            sent -= 1;
                            q.done.finish(Ok(r.base_offset));
                        }
                        Err(e) if lagging => {
                            let ended = ended.unwrap_or_else(|| self.answered_ended(&e, &queue));
                            retry_at = self.retriable_failure(e, &mut stream, &mut queue, &mut sent, &mut backoff, &mut restart, ended);
                        }
                        Err(e) if ended.is_some() && call_refused(&e) => {
                            restart = self.refused_call(e, &mut stream, &mut queue, &mut sent, restart);
                        }
                        Err(e) if e.is_retriable() || ended.is_some() => {
                            let ended = ended.unwrap_or_else(|| self.answered_ended(&e, &queue));
                            retry_at = self.retriable_failure(e, &mut stream, &mut queue, &mut sent, &mut backoff, &mut restart, ended);
                        }
                        Err(e) if self.broken.is_some()
                            && refused_before_append(e.code())
                            && never_maybe_stored(&queue) =>
                        {
                            let q = pop_front_batch(&mut queue);
                            sent -= 1;
                            restart = self.skip_refused(&q, restart, &mut stream, &mut queue, &mut sent);
                            q.done.finish(Err(e));
                        }
                        Err(e) if e.code() == pb::ErrorCode::UnknownProducerId
                            && self.broken.is_some() =>
                        {
                            match self.restart_sequence(&queue, restart.as_ref()) {
                                Some(r) => {
                                    restart = Some(r);
                                    retry_at = self.retriable_failure(e, &mut stream, &mut queue, &mut sent, &mut backoff, &mut restart, Ended::Unknown);
                                }
                                None => {
                                    let q = pop_front_batch(&mut queue);
                                    sent -= 1;
                                    self.fail_for_good(q, &e);
                                }
                            }
                        }
                        Err(e) => {
                            // Not worth retrying (bad batch, fenced, out of
                            // order): this batch fails and the sequence is
                            // broken for the ones after it.
                            let q = pop_front_batch(&mut queue);
                            sent -= 1;
                            self.fail_for_good(q, &e);
                        }
                    }
                }
            }
        }
        debug!(topic = %self.topic, partition = self.partition, "partition sender stopped");
    }

    /// Sends the queued batches not yet on the current stream, in order,
    /// opening the stream first if needed.
    async fn send_unsent(
        &self,
        stream: &mut Option<ProduceStream>,
        queue: &mut VecDeque<Entry>,
        sent: &mut usize,
        restart: Option<&SequenceRestart>,
    ) -> Result<(), ClientError> {
        if stream
            .as_ref()
            .is_some_and(|s| s.send_closed && *sent == 0 && s.stale == 0)
        {
            // Everything it read is answered: a new stream for the rest.
            *stream = None;
        }
        for entry in queue.iter_mut() {
            let Entry::Batch(q) = entry else { continue };
            if q.sent_at.is_some() {
                continue;
            }
            if *sent >= self.in_flight_max {
                break;
            }
            if stream.as_ref().is_some_and(|s| s.send_closed) {
                break;
            }
            if stream.is_none() {
                *stream = Some(
                    open_stream(
                        &self.client,
                        &self.topic,
                        self.partition,
                        self.in_flight_max,
                    )
                    .await?,
                );
            }
            let s = stream.as_mut().expect("opened above");
            if *sent + s.stale >= self.in_flight_max {
                break;
            }
            // A new producer id (taken after a batch failed for good)
            // starts its sequence at 0, which the partition accepts at
            // once: sent while batches of the old one may still be
            // refused and sent again, it would be stored before them.
            // As in Kafka, it waits until the old one's are answered.
            let producer = runnel_storage::batch::producer_fields(&q.request.batch)
                .map(|(id, epoch, _)| (id, epoch));
            if (*sent > 0 || s.stale > 0) && s.producer != producer {
                break;
            }
            s.producer = producer;
            let request = match restart {
                Some(r) => r.apply(&q.request),
                None => q.request.clone(),
            };
            if s.requests.send(request).await.is_err() {
                // The request side is closed (the leader stopped reading,
                // or the connection broke): the answers to what was sent
                // are read first, and how the stream ends tells whether
                // the unanswered requests were read.
                s.send_closed = true;
                if *sent == 0 && s.stale == 0 {
                    *stream = None;
                    return Err(ClientError::Transport("produce stream closed".into()));
                }
                break;
            }
            q.sent_at = Some(Instant::now());
            *sent += 1;
        }
        Ok(())
    }

    /// A retriable failure of the oldest batch: drops the stream, fails
    /// the oldest batch if it is out of time (or retries are off), and
    /// schedules every other queued batch to be sent again, in order, on a
    /// fresh stream after a backoff. Returns when to retry.
    #[allow(clippy::too_many_arguments)]
    fn retriable_failure(
        &self,
        e: ClientError,
        stream: &mut Option<ProduceStream>,
        queue: &mut VecDeque<Entry>,
        sent: &mut usize,
        backoff: &mut Duration,
        restart: &mut Option<SequenceRestart>,
        ended: Ended,
    ) -> Option<Instant> {
        if ended == Ended::Unknown && stale_answers(stream) > 0 {
            // Given up before every stale copy (`skip_refused`) was
            // answered: the leader may still append copies it had read,
            // after renumbered ones sent on a new stream (whose
            // sequences they would then match). Nothing of the
            // renumbered producer goes out again.
            self.abandon_renumbered(queue, restart.take());
        }
        let was_sent = std::mem::take(sent);
        *stream = None;
        // Only errors that may mean the routing changed: too few replicas
        // says nothing of who leads (a timeout may: a leader cut off from
        // the controller times out while another leads), and every
        // partition's sender asking the cluster again each retry was a
        // storm of metadata requests while an ISR was short.
        if !matches!(
            e.code(),
            pb::ErrorCode::NotEnoughReplicas | pb::ErrorCode::NotEnoughReplicasAfterAppend
        ) {
            self.client.invalidate(&self.topic);
        }
        for entry in queue.iter_mut() {
            if let Entry::Batch(q) = entry {
                if q.sent_at.take().is_some() && ended == Ended::Unknown {
                    q.maybe_stored = true;
                }
            }
        }
        let now = Instant::now();
        if self.delivery_timeout.is_zero() {
            // No retries: the batch fails, and so does every batch that
            // was on the broken stream with it.
            for _ in 0..was_sent.max(1) {
                if queue.iter().any(|e| matches!(e, Entry::Batch(_))) {
                    let q = pop_front_batch(queue);
                    self.fail_for_good(q, &e);
                }
            }
        } else {
            // Every batch out of time fails, not only the oldest: they
            // are the oldest ones, in order.
            while queue.iter().find_map(|entry| match entry {
                Entry::Batch(q) => Some(self.expired(q, now)),
                Entry::Barrier(_) => None,
            }) == Some(true)
            {
                let q = pop_front_batch(queue);
                if self.broken.is_some() && !q.maybe_stored {
                    // Never reached the broker (its stream could not be
                    // opened): not stored, so its sequence is given back,
                    // as for one that expires before it is sent. Breaking
                    // the producer id failed the younger batches behind
                    // it, still in time, as out of order.
                    *restart = self.skip_refused(&q, restart.take(), stream, queue, sent);
                    q.done.finish(Err(e.clone()));
                } else {
                    self.fail_for_good(q, &e);
                }
            }
        }
        debug!(topic = %self.topic, partition = self.partition, error = %e, backoff_ms = backoff.as_millis() as u64, "produce failed; retrying");
        let at = now + *backoff;
        *backoff = (*backoff * 2).min(Duration::from_secs(1));
        Some(at)
    }

    /// How to take the batches in flight when the oldest one's answer is
    /// the retriable refusal `e` (the stream goes on). A refusal made
    /// before anything was written (too few replicas, an unknown topic or
    /// partition) of a batch no copy of which may be stored: with
    /// idempotence nothing sent after it was stored either (its sequence
    /// follows a missing one), as if the stream had ended unread. Taken
    /// as maybe stored, such a batch out of time broke the sequence, and
    /// the younger ones, still in time, failed as out of order.
    fn answered_ended(&self, e: &ClientError, queue: &VecDeque<Entry>) -> Ended {
        if self.broken.is_some() && retried_before_append(e.code()) && never_maybe_stored(queue) {
            Ended::Unread
        } else {
            Ended::Unknown
        }
    }

    /// The oldest batch was refused with UNKNOWN_PRODUCER_ID: the
    /// partition keeps no state for this producer (the topic was deleted
    /// and created again, or the state expired), so nothing of this
    /// producer's is in it and a sequence starting at 0 is accepted, as in
    /// Kafka's KIP-360. Returns the restart that renumbers the queued
    /// batches from the oldest one on, and breaks the sequence so that
    /// later batches take a new producer id. `None` if the oldest batch
    /// was already sent from 0: then the refusal is not about a
    /// forgotten sequence.
    fn restart_sequence(
        &self,
        queue: &VecDeque<Entry>,
        current: Option<&SequenceRestart>,
    ) -> Option<SequenceRestart> {
        let front = queue.iter().find_map(|e| match e {
            Entry::Batch(q) => Some(q),
            Entry::Barrier(_) => None,
        })?;
        let (producer_id, epoch, first_seq) =
            runnel_storage::batch::producer_fields(&front.request.batch)?;
        let (sent_seq, sent_epoch) = match current {
            Some(r) if r.covers(producer_id, epoch) => (r.renumber(first_seq), r.sent_epoch),
            _ => (first_seq, epoch),
        };
        // A copy sent before may have been stored (its answer was lost):
        // renumbered from 0, the batch would be written a second time.
        if producer_id <= 0 || sent_seq == 0 || front.maybe_stored || sent_epoch == i16::MAX {
            return None;
        }
        if let Some(broken) = &self.broken {
            broken.break_for(producer_id);
        }
        warn!(
            topic = %self.topic,
            partition = self.partition,
            producer_id,
            sequence = sent_seq,
            "the partition does not know this producer (deleted and created again?); its sequence restarts at 0"
        );
        Some(SequenceRestart {
            producer_id,
            epoch,
            from: first_seq,
            // Under the next epoch, as KIP-360 bumps it: a replica that
            // still holds this producer's old batches (its expiry runs
            // later, or a restart brought them back) takes sequence 0 of
            // a new epoch as a fresh start. Under the same epoch it
            // answered a renumbered batch as the duplicate of an old one
            // of the same range, and the new records were never stored.
            // After the epoch of a restart before this one, if any.
            sent_epoch: sent_epoch + 1,
        })
    }

    /// The oldest batch `refused` was refused before the partition
    /// stored anything of it (too large, corrupt, not allowed): the
    /// partition still expects that batch's sequence. Returns the
    /// renumbering that gives the sequence back, so the batches after it
    /// go as if it had never been stamped and the producer id stays
    /// usable (Kafka adjusts the sequences of in-flight batches after
    /// such a failure). Batches already sent after it carry sequences
    /// past the gap, which the partition refuses (OUT_OF_ORDER_SEQUENCE):
    /// they go again, renumbered, on the same stream, behind those
    /// refusals, whose answers are dropped; the stream keeps them in
    /// order, so no copy stamped before can be stored after its
    /// renumbered one.
    fn skip_refused(
        &self,
        refused: &Queued,
        current: Option<SequenceRestart>,
        stream: &mut Option<ProduceStream>,
        queue: &mut VecDeque<Entry>,
        sent: &mut usize,
    ) -> Option<SequenceRestart> {
        let Some((producer_id, epoch, _)) =
            runnel_storage::batch::producer_fields(&refused.request.batch)
        else {
            return current;
        };
        let records = runnel_storage::batch::sequence_count(&refused.request.batch)
            .unwrap_or(0)
            .max(0);
        let (from, sent_epoch) = match current {
            Some(r) if r.covers(producer_id, epoch) => (r.from, r.sent_epoch),
            _ => (0, epoch),
        };
        let shifted = SequenceRestart {
            producer_id,
            epoch,
            from: runnel_storage::producer_state::add_sequence(from, records),
            sent_epoch,
        };
        match stream.as_mut() {
            Some(s) if *sent > 0 => {
                if s.stale == 0 {
                    s.stale_deadline = oldest_sent(queue).map(|t| t + self.request_timeout);
                }
                s.stale += std::mem::take(sent);
            }
            _ => *sent = 0,
        }
        for entry in queue.iter_mut() {
            if let Entry::Batch(q) = entry {
                q.sent_at = None;
            }
        }
        debug!(topic = %self.topic, partition = self.partition, producer_id, records, "a refused batch's sequence is given back");
        Some(shifted)
    }

    /// Fails every queued batch of the producer `shift` renumbered (the
    /// stream broke while some of their earlier copies were unanswered),
    /// and breaks the sequence so that later batches take a new producer
    /// id. Batches of that producer still to come are sent as stamped,
    /// and the partition refuses them (their sequences are past the
    /// refused batch's).
    fn abandon_renumbered(&self, queue: &mut VecDeque<Entry>, shift: Option<SequenceRestart>) {
        let Some(shift) = shift else { return };
        if let Some(broken) = &self.broken {
            broken.break_for(shift.producer_id);
        }
        let e = ClientError::Transport(format!(
            "the connection to the leader of {}-{} broke while batches after a refused one were sent again; this batch may or may not have been stored",
            self.topic, self.partition
        ));
        let mut kept = VecDeque::with_capacity(queue.len());
        for entry in queue.drain(..) {
            match entry {
                Entry::Batch(q)
                    if runnel_storage::batch::producer_fields(&q.request.batch)
                        .is_some_and(|(id, epoch, _)| shift.covers(id, epoch)) =>
                {
                    q.done.finish(Err(e.clone()));
                }
                other => kept.push_back(other),
            }
        }
        *queue = kept;
        warn!(topic = %self.topic, partition = self.partition, producer_id = shift.producer_id, "stream lost while renumbering; the batches concerned fail");
    }

    /// When the oldest unanswered request on the stream times out.
    fn answer_deadline(
        &self,
        queue: &VecDeque<Entry>,
        stream: &Option<ProduceStream>,
    ) -> Option<Instant> {
        let stale = stream
            .as_ref()
            .filter(|s| s.stale > 0)
            .and_then(|s| s.stale_deadline);
        let sent = oldest_sent(queue).map(|t| t + self.request_timeout);
        stale.into_iter().chain(sent).min()
    }

    /// The stream's call was refused as a whole (see [`call_refused`]):
    /// nothing on it was read. The oldest batch fails with that error,
    /// as Kafka's producer fails a batch on an authentication or
    /// authorization error instead of retrying it until its delivery
    /// timeout; the later ones are sent again on a new call, which is
    /// refused too unless the credentials or ACLs changed meanwhile. With
    /// idempotence, the refused batch's sequence is given back when no
    /// copy of it may have been stored (as for a batch refused before the
    /// append), so the later ones are not refused as out of order once a
    /// call is accepted again. Returns the renumbering in force.
    fn refused_call(
        &self,
        e: ClientError,
        stream: &mut Option<ProduceStream>,
        queue: &mut VecDeque<Entry>,
        sent: &mut usize,
        restart: Option<SequenceRestart>,
    ) -> Option<SequenceRestart> {
        debug!(topic = %self.topic, partition = self.partition, error = %e, "produce call refused");
        *stream = None;
        *sent = 0;
        for entry in queue.iter_mut() {
            if let Entry::Batch(q) = entry {
                q.sent_at = None;
            }
        }
        if !queue.iter().any(|e| matches!(e, Entry::Batch(_))) {
            return restart;
        }
        if self.broken.is_some() && never_maybe_stored(queue) {
            let q = pop_front_batch(queue);
            let restart = self.skip_refused(&q, restart, stream, queue, sent);
            q.done.finish(Err(e));
            return restart;
        }
        let q = pop_front_batch(queue);
        self.fail_for_good(q, &e);
        restart
    }

    /// Whether `q` has been waiting for its answer longer than the
    /// delivery timeout allows (never when retries are off).
    fn expired(&self, q: &Queued, now: Instant) -> bool {
        !self.delivery_timeout.is_zero()
            && now.duration_since(q.done.created_at) >= self.delivery_timeout
    }

    fn expired_error(&self) -> ClientError {
        ClientError::Broker {
            code: pb::ErrorCode::RequestTimedOut,
            message: format!(
                "delivery timeout ({:?}) expired before the batch to {}-{} could be sent",
                self.delivery_timeout, self.topic, self.partition
            ),
            leader: None,
        }
    }

    fn fail_for_good(&self, q: Queued, e: &ClientError) {
        if let Some(broken) = &self.broken {
            match runnel_storage::batch::producer_fields(&q.request.batch) {
                Some((producer_id, ..)) => broken.break_for(producer_id),
                None => broken.break_for(broken.current()),
            }
        }
        q.done.finish(Err(e.clone()));
    }
}

/// The idempotent producer's id in use, and whether its sequence is
/// broken (a batch failed for good: later batches take a new id).
#[derive(Debug, Default)]
struct Sequence {
    broken: AtomicBool,
    producer_id: AtomicI64,
}

impl Sequence {
    /// A new producer id is in use, its sequence whole.
    fn start(&self, producer_id: i64) {
        self.producer_id.store(producer_id, Ordering::Release);
        self.broken.store(false, Ordering::Release);
    }

    fn current(&self) -> i64 {
        self.producer_id.load(Ordering::Acquire)
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Breaks the sequence of `producer_id` (a failed batch's) if it is
    /// the id in use. The batches of an earlier id that fail after it
    /// was replaced (the ones in flight behind the batch that broke it)
    /// say nothing of the new one: each took yet another id, and every
    /// partition started over, once per failed batch.
    fn break_for(&self, producer_id: i64) {
        if producer_id == self.current() {
            self.broken.store(true, Ordering::Release);
        }
    }
}

/// Renumbers one producer id's batches on one partition: the batch that
/// was stamped `from` is sent as 0, the ones after it follow on, under
/// `sent_epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SequenceRestart {
    producer_id: i64,
    /// The epoch the batches were stamped with.
    epoch: i16,
    from: i32,
    /// The epoch they are sent with: the next one after a restart (the
    /// partition forgot the producer), the same one when a refused
    /// batch's sequence is given back.
    sent_epoch: i16,
}

impl SequenceRestart {
    fn covers(&self, producer_id: i64, epoch: i16) -> bool {
        (producer_id, epoch) == (self.producer_id, self.epoch)
    }

    /// The sequence `seq` (as stamped) is sent as.
    fn renumber(&self, seq: i32) -> i32 {
        (i64::from(seq) - i64::from(self.from)).rem_euclid(i64::from(i32::MAX) + 1) as i32
    }

    /// The request as it is sent: renumbered (a copy, CRC recomputed) if
    /// its batch is this producer's, else unchanged.
    fn apply(&self, request: &pb::ProduceRequest) -> pb::ProduceRequest {
        let mut out = request.clone();
        if let Some((id, epoch, seq)) = runnel_storage::batch::producer_fields(&request.batch) {
            if self.covers(id, epoch) {
                let mut batch = bytes::BytesMut::from(&request.batch[..]);
                runnel_storage::batch::set_producer_epoch_and_sequence(
                    &mut batch,
                    self.sent_epoch,
                    self.renumber(seq),
                );
                out.batch = batch.freeze();
            }
        }
        out
    }
}

/// Answers the flush barriers at the front of the queue.
fn release_barriers(queue: &mut VecDeque<Entry>) {
    while let Some(Entry::Barrier(_)) = queue.front() {
        if let Some(Entry::Barrier(done)) = queue.pop_front() {
            let _ = done.send(());
        }
    }
}

/// Removes the oldest batch (answering barriers before it).
fn pop_front_batch(queue: &mut VecDeque<Entry>) -> Queued {
    release_barriers(queue);
    match queue.pop_front() {
        Some(Entry::Batch(q)) => q,
        _ => unreachable!("a batch is queued"),
    }
}

fn oldest_sent(queue: &VecDeque<Entry>) -> Option<Instant> {
    queue.iter().find_map(|e| match e {
        Entry::Batch(q) => q.sent_at,
        Entry::Barrier(_) => None,
    })
}

async fn next_response(
    stream: &mut Option<ProduceStream>,
) -> Option<Result<pb::ProduceResponse, tonic::Status>> {
    match stream {
        Some(s) => s.responses.next().await,
        None => None,
    }
}

/// Whether no copy of the oldest batch may have been stored: a batch
/// refused before the append on a later try may have been stored by an
/// earlier one whose answer was lost, and then its sequence cannot be
/// given back.
fn never_maybe_stored(queue: &VecDeque<Entry>) -> bool {
    queue.iter().find_map(|e| match e {
        Entry::Batch(q) => Some(!q.maybe_stored),
        Entry::Barrier(_) => None,
    }) == Some(true)
}

/// How a stream with batches in flight was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The leader ended it: it had answered every request it read, so
    /// the unanswered ones were not read.
    Unread,
    /// Broken, timed out or dropped: the unanswered requests may have
    /// been appended, and may still be.
    Unknown,
}

fn stale_answers(stream: &Option<ProduceStream>) -> usize {
    stream.as_ref().map_or(0, |s| s.stale)
}

/// Whether a produce call (or the metadata lookup before it) was refused
/// as a whole: the credentials were not accepted, or the caller may not
/// see the topic. Such a call read no request, and trying again does not
/// help until an administrator acts.
fn call_refused(e: &ClientError) -> bool {
    matches!(
        e.code(),
        pb::ErrorCode::AuthenticationFailed | pb::ErrorCode::AuthorizationFailed
    )
}

/// Refusals the partition makes before it looks at the batch's sequence
/// or stores anything: the sequence it expects is still the refused
/// batch's.
fn refused_before_append(code: pb::ErrorCode) -> bool {
    matches!(
        code,
        pb::ErrorCode::RecordTooLarge
            | pb::ErrorCode::CorruptMessage
            | pb::ErrorCode::InvalidRequest
            | pb::ErrorCode::AuthorizationFailed
            | pb::ErrorCode::Unsupported
    )
}

/// Whether a retriable per-batch refusal is made before the append: too
/// few in-sync replicas, or a topic or partition the leader does not know.
/// (NOT_LEADER is also answered by a leader that lost its leadership
/// after the append.)
fn retried_before_append(code: pb::ErrorCode) -> bool {
    matches!(
        code,
        pb::ErrorCode::NotEnoughReplicas
            | pb::ErrorCode::UnknownTopic
            | pb::ErrorCode::UnknownPartition
    )
}

async fn open_stream(
    client: &Client,
    topic: &str,
    partition: i32,
    depth: usize,
) -> Result<ProduceStream, ClientError> {
    let mut channel = client.leader(topic, partition).await?;
    let (tx, rx) = mpsc::channel(depth);
    // Framed by `crate::rpc`: each batch is sent from this producer's own
    // buffer, where tonic's codec would first copy it into its own
    // (benches/RESULTS.md, row 22).
    let responses = crate::rpc::call_stream(
        &mut channel,
        crate::service::PRODUCE_STREAM_PATH,
        tokio_stream::wrappers::ReceiverStream::new(rx),
        super::MESSAGE_BYTES_MAX,
    )
    .await?;
    Ok(ProduceStream {
        requests: tx,
        responses,
        stale: 0,
        stale_deadline: None,
        producer: None,
        send_closed: false,
    })
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::time::{Duration, Instant};

    use super::{BatchOutcome, ClientError, DeliveryFuture, Sequence, SequenceRestart, WallClock};
    use crate::broker::now_ms;
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counter(std::sync::atomic::AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A batch of an earlier producer id failing breaks nothing: only the
    /// id in use is replaced.
    #[test]
    fn only_a_failure_under_the_id_in_use_breaks_the_sequence() {
        let seq = Sequence::default();
        seq.start(7);
        seq.break_for(6);
        assert!(!seq.is_broken());
        seq.break_for(7);
        assert!(seq.is_broken());
        seq.start(8);
        assert!(!seq.is_broken());
        seq.break_for(7);
        assert!(!seq.is_broken(), "a batch in flight under 7 failed late");
    }

    #[test]
    fn batch_outcome_wakes_waiting_records_once_and_answers_the_rest_at_once() {
        let outcome = Arc::new(BatchOutcome::new("t".into(), 3));
        let future = |index| DeliveryFuture {
            outcome: outcome.clone(),
            index,
            sent_at: Instant::now(),
        };
        let (mut early, mut late) = (future(0), future(2));
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut early).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut early).poll(&mut cx).is_pending());
        assert_eq!(early.acked_at(), None);
        let before = Instant::now();
        outcome.set(Ok(40));
        // A second answer (the batch dropped after it was answered) changes nothing.
        outcome.set(Err(ClientError::Closed));
        assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(early.acked_at().is_some_and(|at| at >= before));
        for (f, offset) in [(&mut early, 40), (&mut late, 42)] {
            match Pin::new(f).poll(&mut cx) {
                Poll::Ready(Ok(m)) => {
                    assert_eq!((&*m.topic, m.partition, m.offset), ("t", 3, offset))
                }
                other => panic!("expected offset {offset}, got {other:?}"),
            }
        }
    }

    #[test]
    fn wall_clock_derives_ms_from_the_monotonic_reading_and_rebases() {
        let mut clock = WallClock::default();
        let t0 = Instant::now();
        let (lo, ms0, hi) = (now_ms(), clock.ms(t0), now_ms());
        assert!(
            lo - 1 <= ms0 && ms0 <= hi,
            "first reading is the wall clock"
        );
        let (base, base_ms, until) = clock.base.expect("based");
        assert_eq!(until, base + WallClock::REBASE);
        // Within REBASE of the base: derived, no wall-clock read.
        assert_eq!(clock.ms(base + Duration::from_millis(250)), base_ms + 250);
        assert_eq!(
            clock.ms(base + Duration::from_micros(999_999)),
            base_ms + 999
        );
        assert_eq!(clock.base, Some((base, base_ms, until)));
        // A reading older than the base (taken before a wait, or by a
        // `send` that took the lock later) is counted back from it.
        if let Some(earlier) = base.checked_sub(Duration::from_millis(40)) {
            assert_eq!(clock.ms(earlier), base_ms - 40);
        }
        // At REBASE past the base the wall clock is read again, with a
        // new base; the reading still maps to its own moment.
        let later = base + WallClock::REBASE;
        let ms1 = clock.ms(later);
        let (rebased, _, _) = clock.base.expect("based");
        assert!(rebased > base, "rebased");
        assert!(
            (base_ms + 998..=base_ms + 1002).contains(&ms1),
            "{ms1} is about {base_ms} + 1000"
        );
        assert!((ms0 - 1..=ms0 + 1).contains(&clock.ms(t0)));
    }

    /// A batch sent before it filled does not keep the full batch's
    /// allocation its builder reserved; a full one is not copied.
    #[test]
    fn a_sealed_batch_holds_only_its_own_bytes() {
        use runnel_storage::BatchBuilder;
        let mut small = BatchBuilder::with_capacity(64 * 1024);
        small.push(1, None, Some(b"v"), &[]);
        let sealed = super::seal(small);
        let len = sealed.len();
        let back = sealed.try_into_mut().expect("one owner");
        assert!(
            back.capacity() < len + 1024,
            "{} for {len}",
            back.capacity()
        );
        let mut full = BatchBuilder::with_capacity(8 * 1024);
        full.push(1, None, Some(&[7u8; 7000][..]), &[]);
        let sealed = super::seal(full);
        assert!(sealed.len() > 7000);
        // Not copied: the builder's own buffer, its capacity with it (a
        // copy's capacity is its length).
        let back = sealed.try_into_mut().expect("one owner");
        assert!(back.capacity() >= 8 * 1024, "{}", back.capacity());
    }

    #[test]
    fn a_sequence_restart_renumbers_only_its_producers_batches() {
        use runnel_proto::v1 as pb;
        use runnel_storage::batch::{producer_fields, validate_batch};
        use runnel_storage::BatchBuilder;
        let batch = |id: i64, epoch: i16, seq: i32| {
            let mut b = BatchBuilder::new().producer(id, epoch, seq);
            b.push(1, None, Some(b"v"), &[]);
            pb::ProduceRequest {
                batch: b.build().freeze(),
                ..Default::default()
            }
        };
        let r = SequenceRestart {
            producer_id: 9,
            epoch: 1,
            from: 500,
            sent_epoch: 1,
        };
        let sent = r.apply(&batch(9, 1, 507));
        assert_eq!(producer_fields(&sent.batch), Some((9, 1, 7)));
        assert_eq!(validate_batch(&sent.batch).unwrap(), 1, "CRC recomputed");
        // A restart goes under the next epoch.
        let restart = SequenceRestart { sent_epoch: 2, ..r };
        let sent = restart.apply(&batch(9, 1, 507));
        assert_eq!(producer_fields(&sent.batch), Some((9, 2, 7)));
        assert_eq!(validate_batch(&sent.batch).unwrap(), 1, "CRC recomputed");
        // Another id or epoch goes as it was stamped.
        let other = batch(10, 1, 507);
        assert_eq!(r.apply(&other), other);
        let older = batch(9, 0, 507);
        assert_eq!(r.apply(&older), older);
        // Sequences wrap at i32::MAX, as the broker's do.
        let wrapped = SequenceRestart {
            producer_id: 9,
            epoch: 1,
            from: i32::MAX - 1,
            sent_epoch: 1,
        };
        assert_eq!(wrapped.renumber(i32::MAX), 1);
        assert_eq!(wrapped.renumber(0), 2);
    }
}
