//! Observability: Prometheus metrics, and the HTTP endpoint that serves
//! them with `/health` and `/ready` (see `metrics_listen` in
//! config/README.md).
//!
//! Where it sits on the data path: beside it. Two kinds of metrics, kept
//! apart on purpose:
//!
//! - **Events** ([`Metrics`]): counters and histograms bumped on the
//!   request path (bytes and records in and out, requests, errors by code,
//!   produce latencies, rebalances). Cheap atomic updates, owned by the
//!   broker and the group coordinator.
//! - **State** ([`snapshot`]): gauges read at scrape time from what the
//!   node already knows (partition offsets and sizes, ISR, cluster counts,
//!   follower lag, group lag, controller, process). Nothing on the write
//!   path keeps them up to date; a scrape computes them.
//!
//! Layout
//! - this file: [`Metrics`], the event metrics and their registry.
//! - [`snapshot`]: the scrape-time state and its collector.
//! - [`process`]: resident memory, open files, threads, tokio tasks.
//! - [`http`]: the axum endpoint (`/metrics`, `/health`, `/ready`).

pub mod http;
pub mod process;
pub mod snapshot;

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use runnel_proto::v1::ErrorCode;

/// Every metric name starts with this.
pub const PREFIX: &str = "runnel";

/// Labels of per-topic counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    /// Topic name.
    pub topic: String,
}

/// Labels of request error counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `produce` or `fetch`.
    pub request: String,
    /// The `runnel-error-code` name (NOT_LEADER, ...).
    pub code: String,
}

/// Labels of per-group counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// Consumer group id.
    pub group: String,
}

/// Latency buckets: 50 µs to about 26 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// Rebalance duration buckets: 10 ms to about 10 min, doubling.
fn rebalance_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

/// The event metrics of one node: bumped on the request path.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    produce_requests: Family<TopicLabels, Counter>,
    fetch_requests: Family<TopicLabels, Counter>,
    request_errors: Family<ErrorLabels, Counter>,
    bytes_in: Family<TopicLabels, Counter>,
    records_in: Family<TopicLabels, Counter>,
    bytes_out: Family<TopicLabels, Counter>,
    records_out: Family<TopicLabels, Counter>,
    produce_queue: Histogram,
    produce_append: Histogram,
    produce_replica_wait: Histogram,
    replication_bytes_in: Counter,
    rebalances: Family<GroupLabels, Counter>,
    rebalance_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, registered under the `runnel_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = Self {
            registry: Registry::default(),
            produce_requests: Family::default(),
            fetch_requests: Family::default(),
            request_errors: Family::default(),
            bytes_in: Family::default(),
            records_in: Family::default(),
            bytes_out: Family::default(),
            records_out: Family::default(),
            produce_queue: latency_histogram(),
            produce_append: latency_histogram(),
            produce_replica_wait: latency_histogram(),
            replication_bytes_in: Counter::default(),
            rebalances: Family::default(),
            rebalance_duration: rebalance_histogram(),
        };
        registry.register(
            "produce_requests",
            "Produce requests (batches) received, by topic",
            m.produce_requests.clone(),
        );
        registry.register(
            "fetch_requests",
            "Client fetch requests served, by topic",
            m.fetch_requests.clone(),
        );
        registry.register(
            "request_errors",
            "Failed produce and fetch requests, by request and error code",
            m.request_errors.clone(),
        );
        registry.register_with_unit(
            "topic_in",
            "Record batch bytes appended as leader, by topic",
            Unit::Bytes,
            m.bytes_in.clone(),
        );
        registry.register(
            "topic_records_in",
            "Records appended as leader, by topic",
            m.records_in.clone(),
        );
        registry.register_with_unit(
            "topic_out",
            "Record batch bytes sent to consumers, by topic",
            Unit::Bytes,
            m.bytes_out.clone(),
        );
        registry.register(
            "topic_records_out",
            "Records sent to consumers, by topic (whole batches)",
            m.records_out.clone(),
        );
        registry.register_with_unit(
            "produce_queue",
            "Time a produce waited for a blocking thread before its append started",
            Unit::Seconds,
            m.produce_queue.clone(),
        );
        registry.register_with_unit(
            "produce_local_append",
            "Time of the local log append (write, index, fsync per flush policy)",
            Unit::Seconds,
            m.produce_append.clone(),
        );
        registry.register_with_unit(
            "produce_replica_wait",
            "Time an acks=all produce waited for the high watermark to pass it",
            Unit::Seconds,
            m.produce_replica_wait.clone(),
        );
        registry.register_with_unit(
            "replication_fetched",
            "Record batch bytes this node fetched as a follower",
            Unit::Bytes,
            m.replication_bytes_in.clone(),
        );
        registry.register(
            "group_rebalances",
            "Completed consumer-group rebalances coordinated by this node",
            m.rebalances.clone(),
        );
        registry.register_with_unit(
            "group_rebalance_duration",
            "From the start of a rebalance to its completion",
            Unit::Seconds,
            m.rebalance_duration.clone(),
        );
        Self { registry, ..m }
    }

    /// The registry holding the event metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A produce request for `topic` arrived.
    pub fn produce_request(&self, topic: &str) {
        self.produce_requests
            .get_or_create(&topic_labels(topic))
            .inc();
    }

    /// A produce appended `bytes` and `records` as leader.
    pub fn appended(&self, topic: &str, bytes: usize, records: i32) {
        let labels = topic_labels(topic);
        self.bytes_in.get_or_create(&labels).inc_by(bytes as u64);
        self.records_in
            .get_or_create(&labels)
            .inc_by(records.max(0) as u64);
    }

    /// A client fetch was answered with `bytes` of `records`.
    pub fn fetched(&self, topic: &str, bytes: usize, records: u64) {
        let labels = topic_labels(topic);
        self.fetch_requests.get_or_create(&labels).inc();
        self.bytes_out.get_or_create(&labels).inc_by(bytes as u64);
        self.records_out.get_or_create(&labels).inc_by(records);
    }

    /// A produce or fetch failed with `code`.
    pub fn request_error(&self, request: &str, code: ErrorCode) {
        self.request_errors
            .get_or_create(&ErrorLabels {
                request: request.to_string(),
                code: code.as_str_name().to_string(),
            })
            .inc();
    }

    /// Produce latencies: waiting for a blocking thread, then appending.
    pub fn produce_latency(&self, queue: Duration, append: Duration) {
        self.produce_queue.observe(queue.as_secs_f64());
        self.produce_append.observe(append.as_secs_f64());
    }

    /// An acks=all produce waited this long for its replicas.
    pub fn replica_wait(&self, waited: Duration) {
        self.produce_replica_wait.observe(waited.as_secs_f64());
    }

    /// A follower fetch brought `bytes`.
    pub fn replicated(&self, bytes: usize) {
        self.replication_bytes_in.inc_by(bytes as u64);
    }

    /// Drops the per-topic series of a deleted topic.
    pub fn forget_topic(&self, topic: &str) {
        let labels = topic_labels(topic);
        for family in [
            &self.produce_requests,
            &self.fetch_requests,
            &self.bytes_in,
            &self.records_in,
            &self.bytes_out,
            &self.records_out,
        ] {
            family.remove(&labels);
        }
    }

    /// Drops the series of a group this node no longer coordinates (it
    /// was deleted, or its offsets partition moved): group ids are the
    /// clients' to choose, and would otherwise pile up.
    pub fn forget_group(&self, group: &str) {
        self.rebalances.remove(&GroupLabels {
            group: group.to_string(),
        });
    }

    /// A rebalance of `group` completed after `took`.
    pub fn rebalanced(&self, group: &str, took: Duration) {
        self.rebalances
            .get_or_create(&GroupLabels {
                group: group.to_string(),
            })
            .inc();
        self.rebalance_duration.observe(took.as_secs_f64());
    }
}

fn topic_labels(topic: &str) -> TopicLabels {
    TopicLabels {
        topic: topic.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exposed_in_prometheus_text() {
        let m = Metrics::new();
        m.produce_request("t");
        m.appended("t", 100, 3);
        m.request_error("produce", ErrorCode::NotLeader);
        m.produce_latency(Duration::from_micros(10), Duration::from_millis(1));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, m.registry()).unwrap();
        assert!(
            text.contains("runnel_produce_requests_total{topic=\"t\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("runnel_topic_in_bytes_total{topic=\"t\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("runnel_request_errors_total{request=\"produce\",code=\"NOT_LEADER\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("runnel_produce_local_append_seconds_count 1"),
            "{text}"
        );
    }
}
