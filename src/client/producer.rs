//! A batching producer. Records are grouped per partition into one
//! encoded batch until it reaches `batch_bytes_max` or has waited
//! `linger`; each partition then has one stream to its leader on which up
//! to `in_flight_max` batches are pipelined. The broker appends a stream's
//! batches in order, so a partition's records keep the order of `send`.
//!
//! Retries: a batch that fails with a retriable error (leader moved,
//! timeout, too few replicas, connection lost) is sent again, with
//! every batch after it, in order, on a fresh stream to the current leader
//! after a backoff, until `delivery_timeout` has passed since its
//! partition's sender took it. Idempotence (on by default with acks=all) makes that safe:
//! the producer takes a producer id from the cluster and stamps each batch
//! with its per-partition sequence, so the leader answers a batch it
//! already has with the original offsets instead of appending it twice,
//! and refuses a gap instead of reordering. At most
//! [`IDEMPOTENT_IN_FLIGHT_MAX`] batches are then in flight per partition,
//! the number the leader remembers. When a batch fails for good, its
//! partition's sequence is broken; the producer takes a new producer id
//! for later batches. Without idempotence retries may duplicate records.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use runnel_proto::v1 as pb;
use runnel_storage::BatchBuilder;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tracing::debug;

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
    /// since its partition's sender took it (Kafka's delivery.timeout.ms);
    /// zero disables retries.
    pub delivery_timeout: Duration,
    /// First wait before a retry; doubles up to one second.
    pub retry_backoff: Duration,
}

/// Batches in flight per partition with idempotence: the number of
/// batches a leader remembers per producer.
pub const IDEMPOTENT_IN_FLIGHT_MAX: usize = 5;

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
}

/// Where a record was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset, or -1 with acks=none.
    pub offset: i64,
}

type Ack = oneshot::Sender<Result<RecordMetadata, ClientError>>;

/// Upper bound on a record's encoding overhead (varints, attributes).
const RECORD_OVERHEAD_BYTES: usize = 32;

/// Resolves when the record's batch is acknowledged.
#[derive(Debug)]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Result<RecordMetadata, ClientError>>,
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ClientError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

enum Command {
    Send {
        topic: String,
        record: ProducerRecord,
        ack: Ack,
    },
    Flush(oneshot::Sender<()>),
}

/// The batching producer. Cloning is not needed: `send` takes `&self`.
#[derive(Debug)]
pub struct Producer {
    tx: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

impl Producer {
    pub(crate) fn start(client: Client, config: ProducerConfig) -> Producer {
        let (tx, rx) = mpsc::channel(8192);
        let task = tokio::spawn(Accumulator::new(client, config).run(rx));
        Producer { tx, task }
    }

    /// Queues a record; the returned future resolves once it is stored.
    /// Waits when the producer's queue is full (backpressure).
    pub async fn send(
        &self,
        topic: &str,
        record: ProducerRecord,
    ) -> Result<DeliveryFuture, ClientError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Command::Send {
                topic: topic.to_string(),
                record,
                ack,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(DeliveryFuture { rx })
    }

    /// Sends every queued record now and waits for all answers.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Flushes and stops.
    pub async fn close(self) -> Result<(), ClientError> {
        self.flush().await?;
        drop(self.tx);
        self.task
            .await
            .map_err(|e| ClientError::Transport(format!("producer task failed: {e}")))
    }
}

/// A batch being filled.
struct Pending {
    builder: BatchBuilder,
    acks: Vec<Ack>,
    deadline: Instant,
}

/// The idempotent producer's identity and per-partition sequences.
#[derive(Default)]
struct Idempotence {
    /// (producer id, epoch), once obtained.
    id: Option<(i64, i16)>,
    /// Next sequence per partition for the current id.
    sequences: HashMap<(String, i32), i32>,
    /// Set by a partition sender when a batch failed for good: the next
    /// batch takes a new producer id.
    broken: Arc<AtomicBool>,
}

struct Accumulator {
    client: Client,
    config: ProducerConfig,
    /// Present when idempotence is in effect.
    idempotence: Option<Idempotence>,
    pending: HashMap<(String, i32), Pending>,
    sticky: HashMap<String, i32>,
    senders: HashMap<(String, i32), mpsc::Sender<SenderMsg>>,
    next_sticky: u32,
}

impl Accumulator {
    fn new(client: Client, mut config: ProducerConfig) -> Self {
        let idempotent = config.idempotence && config.acks == pb::Acks::All;
        if idempotent {
            config.in_flight_max = config.in_flight_max.clamp(1, IDEMPOTENT_IN_FLIGHT_MAX);
        }
        Self {
            client,
            config,
            idempotence: idempotent.then(Idempotence::default),
            pending: HashMap::new(),
            sticky: HashMap::new(),
            senders: HashMap::new(),
            next_sticky: 0,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        // One linger timer, re-armed only when the earliest deadline
        // changes (a fresh timer per record cost more than the record).
        let linger = tokio::time::sleep_until(Instant::now());
        tokio::pin!(linger);
        let mut armed: Option<Instant> = None;
        loop {
            let deadline = self.pending.values().map(|p| p.deadline).min();
            if deadline != armed {
                if let Some(d) = deadline {
                    linger.as_mut().reset(d);
                }
                armed = deadline;
            }
            let command = tokio::select! {
                c = rx.recv() => c,
                _ = &mut linger, if armed.is_some() => {
                    armed = None;
                    self.send_expired().await;
                    continue;
                }
            };
            let mut command = command;
            // Take what is already queued without going through the
            // select (and its timer) once per record; bounded, so the
            // linger timer is still looked at under a steady stream.
            let mut burst = 0;
            loop {
                match command {
                    Some(Command::Send { topic, record, ack }) => {
                        self.add(topic, record, ack).await
                    }
                    Some(Command::Flush(done)) => {
                        self.flush().await;
                        let _ = done.send(());
                    }
                    None => {
                        self.flush().await;
                        return;
                    }
                }
                burst += 1;
                if burst == RECV_BURST_MAX {
                    break;
                }
                command = match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
            }
        }
    }

    async fn partition_for(
        &mut self,
        topic: &str,
        record: &ProducerRecord,
    ) -> Result<i32, ClientError> {
        if let Some(p) = record.partition {
            return Ok(p);
        }
        let count = self.client.partition_count(topic).await?;
        if count == 0 {
            return Err(ClientError::Invalid(format!(
                "topic '{topic}' has no partitions"
            )));
        }
        Ok(match &record.key {
            Some(key) => partition_for_key(key, count),
            None if self.sticky.contains_key(topic) => self.sticky[topic] % count,
            None => {
                let next = &mut self.next_sticky;
                *self.sticky.entry(topic.to_string()).or_insert_with(|| {
                    *next = next.wrapping_add(1);
                    (*next % count as u32) as i32
                }) % count
            }
        })
    }

    async fn add(&mut self, topic: String, record: ProducerRecord, ack: Ack) {
        let partition = match self.partition_for(&topic, &record).await {
            Ok(p) => p,
            Err(e) => {
                let _ = ack.send(Err(e));
                return;
            }
        };
        let key = (topic, partition);
        let now = now_ms();
        // A batch never grows past batch_bytes_max by more than one
        // record's worth: a full batch leaves before the record joins.
        let record_bytes = record.key.as_ref().map_or(0, |k| k.len())
            + record.value.as_ref().map_or(0, |v| v.len())
            + record
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()))
                .sum::<usize>()
            + RECORD_OVERHEAD_BYTES;
        // The common case: the partition's batch is open and has room.
        // One lookup, no key clone.
        if let Some(pending) = self.pending.get_mut(&key) {
            if pending.builder.size_bytes() + record_bytes <= self.config.batch_bytes_max {
                push_record(&mut pending.builder, &record, now);
                pending.acks.push(ack);
                if pending.builder.size_bytes() >= self.config.batch_bytes_max {
                    self.dispatch(key).await;
                }
                return;
            }
        }
        if self.pending.get(&key).is_some_and(|p| {
            !p.builder.is_empty()
                && p.builder.size_bytes() + record_bytes > self.config.batch_bytes_max
        }) {
            self.dispatch(key.clone()).await;
        }
        let linger = self.config.linger;
        let capacity = self.config.batch_bytes_max + record_bytes;
        let pending = self.pending.entry(key.clone()).or_insert_with(|| Pending {
            // Sized for a full batch: filling it never reallocates.
            builder: BatchBuilder::with_capacity(capacity),
            acks: Vec::new(),
            deadline: Instant::now() + linger,
        });
        push_record(&mut pending.builder, &record, now);
        pending.acks.push(ack);
        if pending.builder.size_bytes() >= self.config.batch_bytes_max {
            self.dispatch(key).await;
        }
    }

    async fn send_expired(&mut self) {
        let now = Instant::now();
        let due: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.dispatch(key).await;
        }
    }

    async fn flush(&mut self) {
        let keys: Vec<_> = self.pending.keys().cloned().collect();
        for key in keys {
            self.dispatch(key).await;
        }
        let mut waits = Vec::new();
        for sender in self.senders.values() {
            let (tx, rx) = oneshot::channel();
            if sender.send(SenderMsg::Barrier(tx)).await.is_ok() {
                waits.push(rx);
            }
        }
        for w in waits {
            let _ = w.await;
        }
    }

    async fn dispatch(&mut self, key: (String, i32)) {
        let Some(pending) = self.pending.remove(&key) else {
            return;
        };
        // Keyless records move to another partition once a batch is full.
        if let Some(sticky) = self.sticky.get_mut(&key.0) {
            if *sticky == key.1 {
                let count = self.client.partition_count(&key.0).await.unwrap_or(1);
                *sticky = (key.1 + 1) % count.max(1);
            }
        }
        let mut builder = pending.builder;
        let mut broken = None;
        if let Some(idem) = &mut self.idempotence {
            if idem.id.is_none() || idem.broken.swap(false, Ordering::AcqRel) {
                idem.sequences.clear();
                idem.id = None;
                match self
                    .client
                    .init_producer_id(self.config.delivery_timeout.max(Duration::from_secs(1)))
                    .await
                {
                    Ok(id) => {
                        debug!(producer_id = id.0, epoch = id.1, "idempotent producer id");
                        idem.id = Some(id);
                    }
                    Err(e) => {
                        fail(pending.acks, &e);
                        return;
                    }
                }
            }
            let (producer_id, epoch) = idem.id.expect("set above");
            let seq = idem.sequences.entry(key.clone()).or_insert(0);
            builder = builder.producer(producer_id, epoch, *seq);
            *seq = runnel_storage::producer_state::add_sequence(*seq, builder.len() as i32);
            broken = Some(idem.broken.clone());
        }
        let request = pb::ProduceRequest {
            topic: key.0.clone(),
            partition: Some(key.1),
            batch: builder.build().freeze(),
            acks: self.config.acks as i32,
            timeout_ms: self.config.timeout_ms,
            ..Default::default()
        };
        let msg = SenderMsg::Batch(request, pending.acks);
        let sender = self.senders.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(
                PartitionSender {
                    client: self.client.clone(),
                    topic: key.0.clone(),
                    partition: key.1,
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
        if let Err(mpsc::error::SendError(SenderMsg::Batch(_, acks))) = sender.send(msg).await {
            for ack in acks {
                let _ = ack.send(Err(ClientError::Closed));
            }
        }
    }
}

/// Records taken from the queue in one go before the linger timer is
/// looked at again.
const RECV_BURST_MAX: usize = 256;

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
    Batch(pb::ProduceRequest, Vec<Ack>),
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
    acks: Vec<Ack>,
    /// When the sender took it, for the delivery timeout.
    queued_at: Instant,
    /// Send on the current stream, for the request timeout; `None` when
    /// not (yet, or any more) sent on it.
    sent_at: Option<Instant>,
}

type Responses = tonic::Streaming<pb::ProduceResponse>;
type ProduceStream = (mpsc::Sender<pb::ProduceRequest>, Responses);

/// One partition's pipelined stream to its leader, with retries.
struct PartitionSender {
    client: Client,
    topic: String,
    partition: i32,
    in_flight_max: usize,
    request_timeout: Duration,
    delivery_timeout: Duration,
    retry_backoff: Duration,
    /// The idempotent producer's "sequence broken" flag.
    broken: Option<Arc<AtomicBool>>,
}

impl PartitionSender {
    async fn run(self, mut rx: mpsc::Receiver<SenderMsg>) {
        let mut stream: Option<ProduceStream> = None;
        let mut queue: VecDeque<Entry> = VecDeque::new();
        // The first `sent` batches of `queue` are in flight on `stream`.
        let mut sent = 0usize;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = self.retry_backoff;
        let mut open = true;
        loop {
            release_barriers(&mut queue);
            if retry_at.is_none() {
                if let Err(e) = self.send_unsent(&mut stream, &mut queue, &mut sent).await {
                    retry_at =
                        self.retriable_failure(e, &mut stream, &mut queue, &mut sent, &mut backoff);
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
                    Some(SenderMsg::Batch(request, acks)) => queue.push_back(Entry::Batch(Queued {
                        request,
                        acks,
                        queued_at: Instant::now(),
                        sent_at: None,
                    })),
                },
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => retry_at = None,
                _ = sleep_until_opt(oldest_sent(&queue).map(|t| t + self.request_timeout)), if sent > 0 => {
                    let e = ClientError::Broker {
                        code: pb::ErrorCode::RequestTimedOut,
                        message: format!(
                            "no answer from the leader of {}-{} within {:?}",
                            self.topic, self.partition, self.request_timeout
                        ),
                        leader: None,
                    };
                    retry_at = self.retriable_failure(e, &mut stream, &mut queue, &mut sent, &mut backoff);
                }
                response = next_response(&mut stream), if sent > 0 => {
                    let result = match response {
                        Some(Ok(r)) if r.error_code == 0 => Ok(r),
                        Some(Ok(r)) => Err(ClientError::Broker {
                            code: pb::ErrorCode::try_from(r.error_code).unwrap_or(pb::ErrorCode::Unknown),
                            message: r.error_message,
                            leader: None,
                        }),
                        Some(Err(status)) => {
                            stream = None;
                            Err(ClientError::from(status))
                        }
                        None => {
                            stream = None;
                            Err(ClientError::Transport("produce stream ended".into()))
                        }
                    };
                    match result {
                        Ok(r) => {
                            backoff = self.retry_backoff;
                            let q = pop_front_batch(&mut queue);
                            sent -= 1;
                            complete(q.acks, &self.topic, self.partition, &r);
                        }
                        Err(e) if e.is_retriable() || stream.is_none() => {
                            retry_at = self.retriable_failure(e, &mut stream, &mut queue, &mut sent, &mut backoff);
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
    ) -> Result<(), ClientError> {
        for entry in queue.iter_mut() {
            let Entry::Batch(q) = entry else { continue };
            if q.sent_at.is_some() {
                continue;
            }
            if *sent >= self.in_flight_max {
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
            let (tx, _) = stream.as_ref().expect("opened above");
            if tx.send(q.request.clone()).await.is_err() {
                *stream = None;
                return Err(ClientError::Transport("produce stream closed".into()));
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
    fn retriable_failure(
        &self,
        e: ClientError,
        stream: &mut Option<ProduceStream>,
        queue: &mut VecDeque<Entry>,
        sent: &mut usize,
        backoff: &mut Duration,
    ) -> Option<Instant> {
        let was_sent = std::mem::take(sent);
        *stream = None;
        self.client.invalidate(&self.topic);
        for entry in queue.iter_mut() {
            if let Entry::Batch(q) = entry {
                q.sent_at = None;
            }
        }
        let now = Instant::now();
        let front_expired = queue.iter().find_map(|e| match e {
            Entry::Batch(q) => Some(now.duration_since(q.queued_at) >= self.delivery_timeout),
            Entry::Barrier(_) => None,
        });
        if self.delivery_timeout.is_zero() {
            // No retries: the batch fails, and so does every batch that
            // was on the broken stream with it.
            for _ in 0..was_sent.max(1) {
                if queue.iter().any(|e| matches!(e, Entry::Batch(_))) {
                    let q = pop_front_batch(queue);
                    self.fail_for_good(q, &e);
                }
            }
        } else if front_expired == Some(true) {
            let q = pop_front_batch(queue);
            self.fail_for_good(q, &e);
        }
        debug!(topic = %self.topic, partition = self.partition, error = %e, backoff_ms = backoff.as_millis() as u64, "produce failed; retrying");
        let at = now + *backoff;
        *backoff = (*backoff * 2).min(Duration::from_secs(1));
        Some(at)
    }

    fn fail_for_good(&self, q: Queued, e: &ClientError) {
        if let Some(broken) = &self.broken {
            broken.store(true, Ordering::Release);
        }
        fail(q.acks, e);
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
    stream: &mut Option<(mpsc::Sender<pb::ProduceRequest>, Responses)>,
) -> Option<Result<pb::ProduceResponse, tonic::Status>> {
    match stream {
        Some((_, responses)) => responses.next().await,
        None => None,
    }
}

async fn open_stream(
    client: &Client,
    topic: &str,
    partition: i32,
    depth: usize,
) -> Result<(mpsc::Sender<pb::ProduceRequest>, Responses), ClientError> {
    let mut c = client.producer_client(topic, partition).await?;
    let (tx, rx) = mpsc::channel(depth);
    let responses = c
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, responses))
}

fn complete(acks: Vec<Ack>, topic: &str, partition: i32, r: &pb::ProduceResponse) {
    for (i, ack) in acks.into_iter().enumerate() {
        let offset = if r.base_offset < 0 {
            -1
        } else {
            r.base_offset + i as i64
        };
        let _ = ack.send(Ok(RecordMetadata {
            topic: topic.to_string(),
            partition,
            offset,
        }));
    }
}

fn fail(acks: Vec<Ack>, e: &ClientError) {
    for ack in acks {
        let _ = ack.send(Err(e.clone()));
    }
}
