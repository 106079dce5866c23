//! Topic configuration keys: the Kafka names users know, their defaults,
//! and the checks a value must pass. Values are kept as strings in the
//! metadata (as Kafka does) and parsed by whoever uses them.

use std::collections::BTreeMap;

use crate::MetadataError;

/// A known topic config key and its default.
#[derive(Clone, Copy, Debug)]
pub struct ConfigKey {
    /// Kafka-style name, e.g. `retention.ms`.
    pub name: &'static str,
    /// Default when neither the topic nor the broker overrides it.
    pub default: &'static str,
    /// What the key does, for `--help` and docs.
    pub doc: &'static str,
    kind: Kind,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// An integer in [min, max].
    Int { min: i64, max: i64 },
    /// One of the listed words.
    Choice(&'static [&'static str]),
}

/// Largest `max.message.bytes`: half of the 64 MiB gRPC message clients
/// and followers decode, so that an answer holding one batch that large
/// and others up to the fetch budget still decodes.
pub const MESSAGE_BYTES_MAX: i64 = 32 * 1024 * 1024;

/// Every topic config Runnel understands.
pub const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "retention.ms",
        default: "604800000",
        doc: "Delete segments whose newest record is older than this (ms); -1 keeps forever",
        kind: Kind::Int {
            min: -1,
            max: i64::MAX,
        },
    },
    ConfigKey {
        name: "retention.bytes",
        default: "-1",
        doc: "Delete oldest segments while the partition is larger than this; -1 for no limit",
        kind: Kind::Int {
            min: -1,
            max: i64::MAX,
        },
    },
    ConfigKey {
        name: "segment.bytes",
        default: "1073741824",
        doc: "Roll to a new segment file at this size",
        kind: Kind::Int {
            min: 1024,
            max: i32::MAX as i64,
        },
    },
    ConfigKey {
        name: "segment.ms",
        default: "604800000",
        doc: "Roll to a new segment file when the active one is this old (ms)",
        kind: Kind::Int {
            min: 1,
            max: i64::MAX,
        },
    },
    ConfigKey {
        name: "max.message.bytes",
        default: "1048588",
        doc: "Largest record batch accepted, in bytes; at most 32 MiB, half the largest gRPC message a client or follower decodes",
        // Capped at MESSAGE_BYTES_MAX for new values ([`validate_new`]),
        // not here: entries an older version accepted are still in the
        // Raft log, and a replay must apply them as they were.
        kind: Kind::Int {
            min: 64,
            max: i32::MAX as i64,
        },
    },
    ConfigKey {
        name: "min.insync.replicas",
        default: "1",
        doc: "acks=all needs at least this many in-sync replicas",
        kind: Kind::Int {
            min: 1,
            max: i32::MAX as i64,
        },
    },
    ConfigKey {
        name: "cleanup.policy",
        default: "delete",
        doc: "What happens to old segments: delete (compaction is not supported yet)",
        kind: Kind::Choice(&["delete"]),
    },
    ConfigKey {
        name: "message.timestamp.type",
        default: "CreateTime",
        doc: "Keep the producer's timestamp (CreateTime) or stamp the append time (LogAppendTime)",
        kind: Kind::Choice(&["CreateTime", "LogAppendTime"]),
    },
    ConfigKey {
        name: "flush.messages",
        default: "-1",
        doc: "fsync after this many messages; 1 means before every ack; -1 leaves it to flush.ms",
        kind: Kind::Int {
            min: -1,
            max: i64::MAX,
        },
    },
    ConfigKey {
        name: "flush.ms",
        default: "-1",
        doc: "fsync at least this often (ms); -1 (the default, as in Kafka) leaves it to the OS and relies on replication",
        kind: Kind::Int {
            min: -1,
            max: i64::MAX,
        },
    },
    ConfigKey {
        name: "producer.id.expiration.ms",
        default: "86400000",
        doc: "Forget an idempotent producer's sequence state once this replica has not seen it append for this long (ms, by the broker's clock)",
        kind: Kind::Int {
            min: 1,
            max: i64::MAX,
        },
    },
    ConfigKey {
        name: "index.interval.bytes",
        default: "4096",
        doc: "Bytes of log between two sparse offset-index entries",
        kind: Kind::Int {
            min: 0,
            max: i32::MAX as i64,
        },
    },
    ConfigKey {
        name: "preallocate",
        default: "true",
        doc: "Reserve disk blocks ahead of the active segment's appends (fallocate, file length unchanged), and the whole next segment in the background once the active one is half full: cheaper buffered writes, no allocation on the append path after the first segment",
        kind: Kind::Choice(&["true", "false"]),
    },
    ConfigKey {
        name: "unclean.leader.election.enable",
        default: "false",
        doc: "Allow an out-of-sync replica to become leader when the ISR is empty (may lose data)",
        kind: Kind::Choice(&["true", "false"]),
    },
];

/// Looks a key up.
pub fn key(name: &str) -> Option<&'static ConfigKey> {
    KEYS.iter().find(|k| k.name == name)
}

/// Checks one key and value.
pub fn validate(name: &str, value: &str) -> Result<(), MetadataError> {
    let invalid = |reason: String| MetadataError::InvalidConfig {
        key: name.to_string(),
        value: value.to_string(),
        reason,
    };
    let Some(key) = key(name) else {
        return Err(invalid("unknown config key".to_string()));
    };
    match key.kind {
        Kind::Int { min, max } => {
            let parsed: i64 = value
                .trim()
                .parse()
                .map_err(|_| invalid("not an integer".to_string()))?;
            if parsed < min || parsed > max {
                return Err(invalid(format!("must be between {min} and {max}")));
            }
        }
        Kind::Choice(words) => {
            if !words.contains(&value) {
                return Err(invalid(format!("must be one of {}", words.join(", "))));
            }
        }
    }
    Ok(())
}

/// Checks every entry of a map.
pub fn validate_all(configs: &BTreeMap<String, String>) -> Result<(), MetadataError> {
    configs.iter().try_for_each(|(k, v)| validate(k, v))
}

/// [`validate`] plus the limits of values set from now on, which the
/// metadata state machine does not apply (it replays what older versions
/// accepted): `max.message.bytes` at most [`MESSAGE_BYTES_MAX`].
pub fn validate_new(name: &str, value: &str) -> Result<(), MetadataError> {
    validate(name, value)?;
    if name == "max.message.bytes"
        && value
            .trim()
            .parse::<i64>()
            .is_ok_and(|v| v > MESSAGE_BYTES_MAX)
    {
        return Err(MetadataError::InvalidConfig {
            key: name.to_string(),
            value: value.to_string(),
            reason: format!(
                "must be between 64 and {MESSAGE_BYTES_MAX}: half the largest gRPC message a client or follower decodes"
            ),
        });
    }
    Ok(())
}

/// The built-in defaults, as a map.
pub fn builtin_defaults() -> BTreeMap<String, String> {
    KEYS.iter()
        .map(|k| (k.name.to_string(), k.default.to_string()))
        .collect()
}

/// Effective configs: `defaults` overlaid with the topic's `overrides`.
pub fn effective(
    defaults: &BTreeMap<String, String>,
    overrides: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = defaults.clone();
    out.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_their_own_validation() {
        for (k, v) in builtin_defaults() {
            validate(&k, &v).unwrap();
        }
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let err = validate("retention.msx", "1").unwrap_err().to_string();
        assert!(err.contains("unknown config key"), "{err}");
        let err = validate("retention.ms", "soon").unwrap_err().to_string();
        assert!(err.contains("not an integer"), "{err}");
        let err = validate_new("max.message.bytes", "33554433")
            .unwrap_err()
            .to_string();
        assert!(err.contains("between 64 and 33554432"), "{err}");
        validate_new("max.message.bytes", "33554432").unwrap();
        // What an older version stored still applies.
        validate("max.message.bytes", "60000000").unwrap();
        let err = validate("segment.bytes", "10").unwrap_err().to_string();
        assert!(err.contains("between 1024"), "{err}");
        let err = validate("message.timestamp.type", "Now")
            .unwrap_err()
            .to_string();
        assert!(err.contains("CreateTime"), "{err}");
        validate("message.timestamp.type", "LogAppendTime").unwrap();
    }

    #[test]
    fn overrides_win() {
        let mut o = BTreeMap::new();
        o.insert("retention.ms".to_string(), "5".to_string());
        let e = effective(&builtin_defaults(), &o);
        assert_eq!(e["retention.ms"], "5");
        assert_eq!(e["segment.bytes"], "1073741824");
    }
}
