//! Polling one partition. Fetches ask for raw batches (the broker sends
//! stored bytes unchanged) and are decoded here, zero-copy.

use std::sync::Arc;

use bytes::Bytes;
use runnel_proto::v1 as pb;
use runnel_storage::RecordBatch;
use tokio::task::JoinHandle;

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
#[derive(Debug)]
pub struct PartitionConsumer {
    client: Client,
    topic: Arc<str>,
    partition: i32,
    /// Next offset to read.
    position: i64,
    /// Bytes per fetch.
    pub max_bytes: u32,
    /// Long-poll wait per fetch (ms).
    pub max_wait_ms: u32,
    /// High watermark seen in the last fetch.
    high_watermark: i64,
    /// The next fetch and the offset it asks for, sent as soon as the
    /// previous answer (with records) arrived, so the broker reads and
    /// sends while the caller decodes and handles the last one.
    prefetch: Option<(i64, JoinHandle<Result<pb::FetchResponse, ClientError>>)>,
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
        let lookup = |spec, ts| client.list_offsets(topic, partition, spec, ts);
        let offsets = match from {
            StartFrom::Earliest => lookup(pb::OffsetSpec::Earliest, 0).await?,
            StartFrom::Latest | StartFrom::Offset(_) => lookup(pb::OffsetSpec::Latest, 0).await?,
            StartFrom::Timestamp(ts) => lookup(pb::OffsetSpec::Timestamp, ts).await?,
        };
        let position = match from {
            StartFrom::Offset(o) => o,
            _ => offsets.offset,
        };
        Ok(Self {
            client,
            topic: topic.into(),
            partition,
            position,
            max_bytes: 1024 * 1024,
            max_wait_ms: 500,
            high_watermark: offsets.high_watermark,
            prefetch: None,
        })
    }

    /// The next offset to read.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// Moves the read position.
    pub fn seek(&mut self, offset: i64) {
        self.position = offset;
        if let Some((_, fetch)) = self.prefetch.take() {
            fetch.abort();
        }
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
        };
        async move { client.fetch(request).await }
    }

    /// Fetches the next records (possibly none after the long-poll wait).
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>, ClientError> {
        let resp = match self.prefetch.take() {
            Some((offset, fetch)) if offset == self.position => fetch
                .await
                .map_err(|e| ClientError::Transport(format!("fetch task failed: {e}")))??,
            stale => {
                // None yet, or the caller moved the position (seek).
                if let Some((_, fetch)) = stale {
                    fetch.abort();
                }
                self.fetch_at(self.position).await?
            }
        };
        if !resp.batches.is_empty() {
            let next = self.position.max(resp.next_offset);
            self.prefetch = Some((next, tokio::spawn(self.fetch_at(next))));
        }
        self.high_watermark = resp.high_watermark;
        let mut out = Vec::new();
        let batches = RecordBatch::parse_all(resp.batches)
            .map_err(|e| ClientError::Transport(format!("corrupt fetch response: {e}")))?;
        for batch in batches {
            let records = batch
                .records()
                .map_err(|e| ClientError::Transport(format!("corrupt fetch response: {e}")))?;
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
        self.position = self.position.max(resp.next_offset);
        Ok(out)
    }
}
