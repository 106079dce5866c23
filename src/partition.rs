//! A partition this broker hosts: its log and the watch that wakes
//! long-polling fetches when the high watermark moves.

use std::collections::BTreeMap;
use std::sync::Arc;

use runnel_storage::{FlushPolicy, Log, LogConfig, TimestampType};
use tokio::sync::watch;

/// One hosted partition replica.
#[derive(Debug)]
pub struct Partition {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub index: i32,
    /// The topic id this log belongs to (a re-created topic differs).
    pub topic_id: String,
    /// The partition's log.
    pub log: Arc<Log>,
    /// Publishes the high watermark; fetchers wait on it.
    hw_tx: watch::Sender<i64>,
}

impl Partition {
    /// Wraps an open log.
    pub fn new(topic: String, index: i32, topic_id: String, log: Arc<Log>) -> Self {
        let (hw_tx, _) = watch::channel(log.high_watermark());
        Self {
            topic,
            index,
            topic_id,
            log,
            hw_tx,
        }
    }

    /// Sets the high watermark and wakes waiting fetches.
    pub fn advance_high_watermark(&self, offset: i64) {
        self.log.set_high_watermark(offset);
        let hw = self.log.high_watermark();
        self.hw_tx.send_if_modified(|cur| {
            let changed = *cur != hw;
            *cur = hw;
            changed
        });
    }

    /// A receiver that sees every high-watermark change.
    pub fn watch_high_watermark(&self) -> watch::Receiver<i64> {
        self.hw_tx.subscribe()
    }
}

/// Maps effective topic configs (Kafka key names, validated by the
/// controller) to the storage engine's settings.
pub fn log_config(configs: &BTreeMap<String, String>) -> LogConfig {
    let int = |key: &str| configs.get(key).and_then(|v| v.parse::<i64>().ok());
    let positive = |key: &str| int(key).filter(|v| *v >= 0).map(|v| v as u64);
    let mut config = LogConfig::default();
    if let Some(v) = positive("segment.bytes") {
        config.segment_bytes_max = v;
    }
    config.segment_ms_max = positive("segment.ms");
    if let Some(v) = positive("index.interval.bytes") {
        config.index_interval_bytes = v.min(u32::MAX as u64) as u32;
    }
    config.retention_bytes_max = positive("retention.bytes");
    config.retention_ms_max = positive("retention.ms");
    if let Some(v) = positive("max.message.bytes") {
        config.message_bytes_max = v.min(u32::MAX as u64) as u32;
    }
    config.timestamp_type = match configs.get("message.timestamp.type").map(String::as_str) {
        Some("LogAppendTime") => TimestampType::LogAppendTime,
        _ => TimestampType::CreateTime,
    };
    let flush_messages = int("flush.messages").filter(|v| *v > 0);
    config.flush = if flush_messages == Some(1) {
        FlushPolicy::EveryBatch
    } else {
        FlushPolicy::Interval {
            messages: flush_messages.map(|v| v as u64),
            ms: positive("flush.ms"),
        }
    };
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_keys_map_to_storage_settings() {
        let mut c = runnel_controller::topic_config::builtin_defaults();
        c.insert("segment.bytes".into(), "2048".into());
        c.insert("retention.ms".into(), "-1".into());
        c.insert("message.timestamp.type".into(), "LogAppendTime".into());
        c.insert("flush.messages".into(), "1".into());
        let l = log_config(&c);
        assert_eq!(l.segment_bytes_max, 2048);
        assert_eq!(l.retention_ms_max, None);
        assert_eq!(l.retention_bytes_max, None);
        assert_eq!(l.timestamp_type, TimestampType::LogAppendTime);
        assert_eq!(l.flush, FlushPolicy::EveryBatch);
        assert_eq!(l.message_bytes_max, 1_048_588);
        c.insert("flush.messages".into(), "-1".into());
        assert_eq!(
            log_config(&c).flush,
            FlushPolicy::Interval { messages: None, ms: Some(1000) }
        );
    }
}
