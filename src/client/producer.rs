//! A batching producer. Records are grouped per partition into one
//! encoded batch until it reaches `batch_bytes_max` or has waited
//! `linger`; each partition then has one stream to its leader on which up
//! to `in_flight_max` batches are pipelined. The broker appends a stream's
//! batches in order, so a partition's records keep the order of `send`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
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
    /// A batch not answered within this time fails with a timeout and its
    /// partition's stream is reopened (the records' fate is unknown).
    pub request_timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            acks: pb::Acks::All,
            batch_bytes_max: 64 * 1024,
            linger: Duration::from_millis(5),
            in_flight_max: 16,
            timeout_ms: 0,
            request_timeout: Duration::from_secs(35),
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

struct Accumulator {
    client: Client,
    config: ProducerConfig,
    pending: HashMap<(String, i32), Pending>,
    sticky: HashMap<String, i32>,
    senders: HashMap<(String, i32), mpsc::Sender<SenderMsg>>,
    next_sticky: u32,
}

impl Accumulator {
    fn new(client: Client, config: ProducerConfig) -> Self {
        Self {
            client,
            config,
            pending: HashMap::new(),
            sticky: HashMap::new(),
            senders: HashMap::new(),
            next_sticky: 0,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let deadline = self.pending.values().map(|p| p.deadline).min();
            let command = tokio::select! {
                c = rx.recv() => c,
                _ = sleep_until_opt(deadline) => {
                    self.send_expired().await;
                    continue;
                }
            };
            match command {
                Some(Command::Send { topic, record, ack }) => self.add(topic, record, ack).await,
                Some(Command::Flush(done)) => {
                    self.flush().await;
                    let _ = done.send(());
                }
                None => {
                    self.flush().await;
                    return;
                }
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
        if self.pending.get(&key).is_some_and(|p| {
            !p.builder.is_empty()
                && p.builder.size_bytes() + record_bytes > self.config.batch_bytes_max
        }) {
            self.dispatch(key.clone()).await;
        }
        let linger = self.config.linger;
        let pending = self.pending.entry(key.clone()).or_insert_with(|| Pending {
            builder: BatchBuilder::new(),
            acks: Vec::new(),
            deadline: Instant::now() + linger,
        });
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        pending.builder.push(
            record.timestamp_ms.unwrap_or_else(now_ms),
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
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
        let request = pb::ProduceRequest {
            topic: key.0.clone(),
            partition: Some(key.1),
            batch: pending.builder.build().freeze(),
            acks: self.config.acks as i32,
            timeout_ms: self.config.timeout_ms,
            ..Default::default()
        };
        let msg = SenderMsg::Batch(request, pending.acks);
        let sender = self.senders.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(partition_sender(
                self.client.clone(),
                key.0.clone(),
                key.1,
                self.config.in_flight_max.max(1),
                self.config.request_timeout,
                rx,
            ));
            tx
        });
        if let Err(mpsc::error::SendError(SenderMsg::Batch(_, acks))) = sender.send(msg).await {
            for ack in acks {
                let _ = ack.send(Err(ClientError::Closed));
            }
        }
    }
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

enum InFlight {
    Batch(Vec<Ack>, Instant),
    Barrier(oneshot::Sender<()>),
}

type Responses = tonic::Streaming<pb::ProduceResponse>;

/// One partition's pipelined stream to its leader.
async fn partition_sender(
    client: Client,
    topic: String,
    partition: i32,
    in_flight_max: usize,
    request_timeout: Duration,
    mut rx: mpsc::Receiver<SenderMsg>,
) {
    let mut stream: Option<(mpsc::Sender<pb::ProduceRequest>, Responses)> = None;
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut batches_in_flight = 0usize;
    loop {
        let can_send = batches_in_flight < in_flight_max;
        tokio::select! {
            msg = rx.recv(), if can_send => {
                let Some(msg) = msg else { break };
                match msg {
                    SenderMsg::Barrier(done) => {
                        if in_flight.is_empty() {
                            let _ = done.send(());
                        } else {
                            in_flight.push_back(InFlight::Barrier(done));
                        }
                    }
                    SenderMsg::Batch(request, acks) => {
                        if stream.is_none() {
                            match open_stream(&client, &topic, partition, in_flight_max).await {
                                Ok(s) => stream = Some(s),
                                Err(e) => {
                                    client.invalidate(&topic);
                                    fail(acks, &e);
                                    continue;
                                }
                            }
                        }
                        let (req_tx, _) = stream.as_ref().expect("opened above");
                        if req_tx.send(request).await.is_err() {
                            fail(acks, &ClientError::Transport("produce stream closed".into()));
                            stream = None;
                            continue;
                        }
                        in_flight.push_back(InFlight::Batch(acks, Instant::now()));
                        batches_in_flight += 1;
                    }
                }
            }
            _ = sleep_until_opt(oldest_deadline(&in_flight, request_timeout)), if batches_in_flight > 0 => {
                // The leader stopped answering: fail everything in flight
                // and start over with fresh metadata.
                stream = None;
                client.invalidate(&topic);
                let e = ClientError::Broker {
                    code: pb::ErrorCode::RequestTimedOut,
                    message: format!("no answer from the leader of {topic}-{partition} within {request_timeout:?}"),
                    leader: None,
                };
                for entry in in_flight.drain(..) {
                    match entry {
                        InFlight::Batch(acks, _) => fail(acks, &e),
                        InFlight::Barrier(done) => { let _ = done.send(()); }
                    }
                }
                batches_in_flight = 0;
            }
            response = next_response(&mut stream), if batches_in_flight > 0 => {
                let result = match response {
                    Some(Ok(r)) if r.error_code == 0 => Ok(r),
                    Some(Ok(r)) => {
                        let code = pb::ErrorCode::try_from(r.error_code).unwrap_or(pb::ErrorCode::Unknown);
                        if code == pb::ErrorCode::NotLeader { client.invalidate(&topic); }
                        Err(ClientError::Broker { code, message: r.error_message, leader: None })
                    }
                    Some(Err(status)) => {
                        stream = None;
                        client.invalidate(&topic);
                        Err(ClientError::from(status))
                    }
                    None => {
                        stream = None;
                        client.invalidate(&topic);
                        Err(ClientError::Transport("produce stream ended".into()))
                    }
                };
                let broken = stream.is_none();
                // Complete the oldest batch (or, on a broken stream, all).
                while let Some(front) = in_flight.pop_front() {
                    match front {
                        InFlight::Barrier(done) => { let _ = done.send(()); }
                        InFlight::Batch(acks, _) => {
                            batches_in_flight -= 1;
                            match &result {
                                Ok(r) => complete(acks, &topic, partition, r),
                                Err(e) => fail(acks, e),
                            }
                            if !broken { break; }
                        }
                    }
                }
                while let Some(InFlight::Barrier(_)) = in_flight.front() {
                    if let Some(InFlight::Barrier(done)) = in_flight.pop_front() { let _ = done.send(()); }
                }
            }
        }
    }
    debug!(%topic, partition, "partition sender stopped");
}

fn oldest_deadline(in_flight: &VecDeque<InFlight>, timeout: Duration) -> Option<Instant> {
    in_flight.iter().find_map(|e| match e {
        InFlight::Batch(_, sent) => Some(*sent + timeout),
        InFlight::Barrier(_) => None,
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
