//! Polling one partition. By default each poll is a fetch, with the next
//! one sent as soon as an answer arrives; with `streaming` on, a
//! subscription streams the partition (the broker reads the next chunk
//! while the last one travels and is decoded here). Either way the broker
//! sends raw batches (its stored bytes unchanged), decoded here zero-copy.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use runnel_proto::v1 as pb;
use runnel_storage::RecordBatch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use super::{Client, ClientError};

/// Where a consumer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    /// The log start offset.
    Earliest,
    /// The high watermark: only records produced from now on.
    Latest,
    /// An explicit offset.
    Offset(i64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// A record read back, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// Topic (shared by every record of the consumer).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Timestamp in ms.
    pub timestamp_ms: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// Reads one partition in order.
pub struct PartitionConsumer {
    client: Client,
    topic: Arc<str>,
    /// The id of the topic this consumer started on: every read names it,
    /// so a topic deleted and created again under the same name is
    /// refused (UNKNOWN_TOPIC_ID), not read at the old one's offsets.
    topic_id: String,
    partition: i32,
    /// Next offset to read.
    position: i64,
    /// Bytes per fetch.
    pub max_bytes: u32,
    /// Long-poll wait per fetch (ms).
    pub max_wait_ms: u32,
    /// Most records one poll returns (Kafka's `max.poll.records`; at
    /// least one). The rest of an answer is kept, decoded, for the next
    /// polls, and the position moves only past the records returned, so a
    /// commit never covers records the application has not seen.
    pub max_records: usize,
    /// Records of an answer decoded but not returned yet (past
    /// `max_records`), in order: the next polls return them first.
    held: VecDeque<ConsumedRecord>,
    /// Where the position goes once `held` is all returned (past the
    /// answer they came in).
    held_next: i64,
    /// High watermark seen in the last fetch.
    high_watermark: i64,
    /// The fetch in flight (a task) and the offset it asks for: the next
    /// one is sent as soon as the previous answer (with records) arrived,
    /// so the broker reads and sends while the caller decodes and handles
    /// the last one; a poll dropped while waiting leaves it here.
    prefetch: Option<(i64, JoinHandle<Result<pb::FetchResponse, ClientError>>)>,
    /// An answer in hand for the position it was fetched at, kept across
    /// the poll's last await: a poll dropped there (a group consumer's
    /// poll drops its partitions' polls as soon as one has records)
    /// returns it next time instead of fetching it again.
    answered: Option<(i64, pb::FetchResponse)>,
    /// Stream the partition with `Subscribe` instead of polling it with
    /// fetches (off by default). Faster for a reader that keeps polling
    /// (no round trip per chunk), but an open subscription that is not
    /// polled holds up to an HTTP/2 stream window of unread data, and
    /// together they can exhaust the connection's window: then every other
    /// call on the client's connection to that broker (offset lookups,
    /// commits, produce answers) waits until they are polled. Turn it on
    /// only where every subscribed consumer is polled (or dropped) without
    /// waiting on another call first; `perf consume` and `consume` do.
    pub streaming: bool,
    /// The subscription (opening or open) and the offset its next answer
    /// starts at.
    subscription: Option<(i64, Stream)>,
}

/// A subscription being opened, or open.
enum Stream {
    /// Opened by a task of its own, so that a poll dropped while it waits
    /// (the group consumer drops the idle partitions' polls once one has
    /// records) does not lose the open and start over next time.
    Opening(JoinHandle<Result<Subscription, ClientError>>),
    Open(Subscription),
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Stream::Opening(open) = self {
            open.abort();
        }
    }
}

/// A subscription's answers, decoded as they arrive.
pub(crate) type Subscription = runnel_proto::wire::DecodeStream<
    tonic::service::interceptor::ResponseBody<tonic::body::Body>,
    pb::FetchResponse,
>;

impl std::fmt::Debug for PartitionConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionConsumer")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("position", &self.position)
            .field("high_watermark", &self.high_watermark)
            .field("streaming", &self.streaming)
            .field("fetching", &self.prefetch.is_some())
            .field("subscribed", &self.subscription.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for PartitionConsumer {
    fn drop(&mut self) {
        if let Some((_, fetch)) = self.prefetch.take() {
            fetch.abort();
        }
    }
}

impl PartitionConsumer {
    pub(crate) async fn new(
        client: Client,
        topic: &str,
        partition: i32,
        from: StartFrom,
    ) -> Result<Self, ClientError> {
        let topic_id = client.topic(topic).await?.topic_id;
        let lookup = |spec, ts| client.list_offsets(topic, partition, spec, ts);
        let offsets = match from {
            StartFrom::Earliest => lookup(pb::OffsetSpec::Earliest, 0).await?,
            StartFrom::Latest => lookup(pb::OffsetSpec::Latest, 0).await?,
            // Only the high watermark is wanted, which every answer
            // carries: the latest offset waits for a new leader's to
            // settle (and then may be refused), a consumer resuming from
            // a committed offset need not.
            StartFrom::Offset(_) => lookup(pb::OffsetSpec::Earliest, 0).await?,
            StartFrom::Timestamp(ts) => lookup(pb::OffsetSpec::Timestamp, ts).await?,
        };
        let position = match from {
            StartFrom::Offset(o) => o,
            _ => offsets.offset,
        };
        Ok(Self {
            client,
            topic: topic.into(),
            topic_id,
            partition,
            position,
            max_bytes: 1024 * 1024,
            max_wait_ms: 500,
            max_records: usize::MAX,
            held: VecDeque::new(),
            held_next: position,
            high_watermark: offsets.high_watermark,
            prefetch: None,
            answered: None,
            streaming: false,
            subscription: None,
        })
    }

    /// The partition this consumer reads.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The next offset to read.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// Moves the read position.
    pub fn seek(&mut self, offset: i64) {
        self.position = offset;
        self.held.clear();
        if let Some((_, fetch)) = self.prefetch.take() {
            fetch.abort();
        }
        self.answered = None;
        self.subscription = None;
    }

    /// The id of the topic this consumer reads (as it was when the
    /// consumer started).
    pub fn topic_id(&self) -> &str {
        &self.topic_id
    }

    /// The high watermark as of the last call.
    pub fn high_watermark(&self) -> i64 {
        self.high_watermark
    }

    fn fetch_at(
        &self,
        offset: i64,
    ) -> impl std::future::Future<Output = Result<pb::FetchResponse, ClientError>> + Send + 'static
    {
        let client = self.client.clone();
        let request = pb::FetchRequest {
            topic: self.topic.to_string(),
            partition: self.partition,
            offset,
            max_bytes: self.max_bytes,
            max_wait_ms: self.max_wait_ms,
            raw: true,
            topic_id: self.topic_id.clone(),
        };
        async move { client.fetch(request).await }
    }

    /// The next answer of the subscription, opened at the position if
    /// none is open or the caller moved the position; an empty answer
    /// when nothing arrives within the long-poll wait.
    async fn next_streamed(&mut self) -> Result<pb::FetchResponse, ClientError> {
        if !matches!(&self.subscription, Some((next, _)) if *next == self.position) {
            let client = self.client.clone();
            let request = pb::SubscribeRequest {
                topic: self.topic.to_string(),
                partition: self.partition,
                offset: self.position,
                max_bytes: self.max_bytes,
                raw: true,
                topic_id: self.topic_id.clone(),
            };
            let open = tokio::spawn(async move { client.subscribe(request).await });
            self.subscription = Some((self.position, Stream::Opening(open)));
        }
        let Some((_, state)) = &mut self.subscription else {
            unreachable!("set above");
        };
        if let Stream::Opening(open) = state {
            let opened = open
                .await
                .map_err(|e| ClientError::Transport(format!("subscribe task failed: {e}")))
                .and_then(|r| r);
            match opened {
                Ok(stream) => *state = Stream::Open(stream),
                Err(e) => {
                    self.subscription = None;
                    return Err(e);
                }
            }
        }
        let Stream::Open(stream) = state else {
            unreachable!("opened above");
        };
        let wait = std::time::Duration::from_millis(u64::from(self.max_wait_ms));
        let answer = match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => {
                return Ok(pb::FetchResponse {
                    high_watermark: self.high_watermark,
                    next_offset: self.position,
                    ..Default::default()
                })
            }
            Ok(Some(Ok(answer))) => Ok(answer),
            Ok(Some(Err(status))) => Err(ClientError::from(status)),
            Ok(None) => Err(ClientError::Transport(format!(
                "the subscription to {}/{} ended",
                self.topic, self.partition
            ))),
        };
        if answer.is_err() {
            // Leadership may have moved: route afresh next time.
            self.client.invalidate(&self.topic);
        }
        match &answer {
            Ok(a) => {
                if let Some((next, _)) = &mut self.subscription {
                    *next = self.position.max(a.next_offset);
                }
            }
            Err(_) => self.subscription = None,
        }
        answer
    }

    /// Fetches the next records (possibly none after the long-poll wait).
    ///
    /// Cancel-safe: dropped before it returns, no record is lost (the
    /// position moves only when records are returned), and the fetch or
    /// subscription open in flight is kept for the next poll.
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>, ClientError> {
        if !self.held.is_empty() {
            return Ok(self.take_held());
        }
        // Whichever way the caller last chose, the other one's read-ahead
        // is dropped.
        if self.streaming {
            if let Some((_, fetch)) = self.prefetch.take() {
                fetch.abort();
            }
            let resp = self.next_streamed().await?;
            return self.decode(resp);
        }
        self.subscription = None;
        if let Some((at, resp)) = self.answered.take() {
            if at == self.position {
                return self.decode(resp);
            }
        }
        // Every fetch runs as a task of its own, kept until it answers: a
        // poll dropped while it waits leaves the fetch in flight for the
        // next poll instead of sending another (an idle partition's long
        // poll is not repeated on every poll of the group consumer), and
        // the task reads its answer off the connection even when nobody
        // polls, so an unpolled consumer never holds the connection's
        // flow-control window.
        if !matches!(&self.prefetch, Some((offset, _)) if *offset == self.position) {
            // None yet, or the caller moved the position (seek).
            if let Some((_, stale)) = self.prefetch.take() {
                stale.abort();
            }
            let fetch = tokio::spawn(self.fetch_at(self.position));
            self.prefetch = Some((self.position, fetch));
        }
        let Some((_, fetch)) = &mut self.prefetch else {
            unreachable!("set above");
        };
        let answered = fetch.await;
        self.prefetch = None;
        let resp =
            answered.map_err(|e| ClientError::Transport(format!("fetch task failed: {e}")))??;
        if !resp.batches.is_empty() {
            let next = self.position.max(resp.next_offset);
            self.prefetch = Some((next, tokio::spawn(self.fetch_at(next))));
            // Let the prefetch (and the connection tasks it wakes) put its
            // request on the socket before this task decodes: on a
            // current-thread runtime it would otherwise only be sent once
            // the decode is done and the caller polls again, and the broker
            // would sit idle while the client decodes (benches/RESULTS.md,
            // session 10).
            self.answered = Some((self.position, resp));
            tokio::task::yield_now().await;
            let (_, resp) = self.answered.take().expect("kept across the yield");
            return self.decode(resp);
        }
        self.decode(resp)
    }

    /// The records of an answer at or after the position, which moves past
    /// them.
    fn decode(&mut self, resp: pb::FetchResponse) -> Result<Vec<ConsumedRecord>, ClientError> {
        self.high_watermark = resp.high_watermark;
        let mut out = Vec::new();
        // Not retriable: the same bytes would come back on every fetch.
        let corrupt = |e: runnel_storage::StorageError| ClientError::Broker {
            code: pb::ErrorCode::CorruptMessage,
            message: format!(
                "corrupt fetch response for {}-{} at {}: {e}",
                self.topic, self.partition, self.position
            ),
            leader: None,
        };
        let batches = RecordBatch::parse_all(resp.batches).map_err(corrupt)?;
        for batch in batches {
            let records = batch.records().map_err(corrupt)?;
            for r in records {
                if r.offset < self.position {
                    continue;
                }
                out.push(ConsumedRecord {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset: r.offset,
                    timestamp_ms: r.timestamp_ms,
                    key: r.key,
                    value: r.value,
                    headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                });
            }
        }
        // Past every record decoded too, whatever the answer says: an
        // answer whose records ran past its next_offset made every later
        // fetch return them again.
        let past_decoded = out.last().map_or(self.position, |r| r.offset + 1);
        let next = self.position.max(resp.next_offset).max(past_decoded);
        let max = self.max_records.max(1);
        if out.len() <= max {
            self.position = next;
            return Ok(out);
        }
        self.held = out.split_off(max).into();
        self.held_next = next;
        self.position = out.last().map_or(self.position, |r| r.offset + 1);
        Ok(out)
    }

    /// Up to `max_records` of the held records; the position moves past
    /// them (past the answer they came in once none is left).
    fn take_held(&mut self) -> Vec<ConsumedRecord> {
        let n = self.max_records.max(1).min(self.held.len());
        let out: Vec<_> = self.held.drain(..n).collect();
        self.position = if self.held.is_empty() {
            self.held_next
        } else {
            out.last().map_or(self.position, |r| r.offset + 1)
        };
        out
    }

    /// Gives back the last records a poll returned, unseen by the
    /// application: the next polls return them again, and the position
    /// moves back to the first. `records` must be the tail of what was
    /// returned, in order (the group consumer keeps a poll within its
    /// `max_poll_records`).
    pub(crate) fn unread(&mut self, records: Vec<ConsumedRecord>) {
        let Some(first) = records.first() else {
            return;
        };
        if self.held.is_empty() {
            self.held_next = self.position;
        }
        self.position = first.offset;
        for r in records.into_iter().rev() {
            self.held.push_front(r);
        }
    }
}
