//! The broker's configuration: a TOML file (see `config/README.md`),
//! overridden by command-line flags. Unknown keys and bad values are
//! refused at start with the key's name and the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use runnel_controller::topic_config;
use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

/// The whole server configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// This node's id, unique in the cluster (node.id).
    pub node_id: i32,
    /// Address the client gRPC listener binds, HOST:PORT (port 0 picks one).
    pub listen: SocketAddr,
    /// Address other brokers and clients should use; defaults to `listen`.
    pub advertised_address: Option<String>,
    /// Where partition logs and metadata live.
    pub data_dir: PathBuf,
    /// Rack label, for replica placement.
    pub rack: String,
    /// Roles: "broker" and/or "controller".
    pub roles: Vec<String>,
    /// Request handling limits.
    pub broker: BrokerSection,
    /// Broker-wide defaults for topic configs (Kafka key names).
    pub topic_defaults: BTreeMap<String, toml::Value>,
}

/// `[broker]`: request handling.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    /// Longest wait for acks=all before answering REQUEST_TIMED_OUT (ms).
    pub request_timeout_ms: u64,
    /// Upper bound on a fetch's long-poll wait (ms).
    pub fetch_wait_max_ms: u64,
    /// How often retention, segment age roll and interval flush run (ms).
    pub maintenance_interval_ms: u64,
    /// Largest gRPC message accepted (bytes).
    pub grpc_message_bytes_max: usize,
    /// Grace period for draining requests at shutdown (ms).
    pub shutdown_grace_ms: u64,
    /// A follower not caught up for this long leaves the ISR (ms).
    pub replica_lag_time_max_ms: u64,
    /// Bytes a follower asks for per fetch.
    pub replica_fetch_bytes_max: u32,
    /// Long-poll wait of a follower fetch (ms).
    pub replica_fetch_wait_max_ms: u32,
    /// Replication byte-rate limit per fetcher; 0 = unlimited.
    pub replication_bytes_per_sec_max: u64,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            request_timeout_ms: 30_000,
            fetch_wait_max_ms: 30_000,
            maintenance_interval_ms: 1_000,
            grpc_message_bytes_max: 64 * 1024 * 1024,
            shutdown_grace_ms: 5_000,
            replica_lag_time_max_ms: 30_000,
            replica_fetch_bytes_max: 8 * 1024 * 1024,
            replica_fetch_wait_max_ms: 500,
            replication_bytes_per_sec_max: 0,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            listen: "127.0.0.1:9092".parse().expect("valid"),
            advertised_address: None,
            data_dir: PathBuf::from("data/node-1"),
            rack: String::new(),
            roles: vec!["broker".into(), "controller".into()],
            broker: BrokerSection::default(),
            topic_defaults: BTreeMap::new(),
        }
    }
}

impl ServerConfig {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: ServerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks rules that span fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            key: key.to_string(),
            reason,
        };
        if self.node_id < 0 {
            return Err(invalid("node_id", format!("{} is negative", self.node_id)));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        for role in &self.roles {
            if role != "broker" && role != "controller" {
                return Err(invalid(
                    "roles",
                    format!("unknown role '{role}' (broker, controller)"),
                ));
            }
        }
        if self.broker.grpc_message_bytes_max < 1024 {
            return Err(invalid(
                "broker.grpc_message_bytes_max",
                "must be at least 1024".into(),
            ));
        }
        for (key, value) in self.topic_defaults_strings()? {
            topic_config::validate(&key, &value)
                .map_err(|e| invalid(&format!("topic_defaults.\"{key}\""), e.to_string()))?;
        }
        Ok(())
    }

    /// Topic defaults as strings (TOML integers and booleans are allowed).
    fn topic_defaults_strings(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        self.topic_defaults
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    other => {
                        return Err(ConfigError::Invalid {
                            key: format!("topic_defaults.\"{k}\""),
                            reason: format!(
                                "expected a string or integer, got {}",
                                other.type_str()
                            ),
                        })
                    }
                };
                Ok((k.clone(), s))
            })
            .collect()
    }

    /// Effective topic defaults: built-ins overlaid with `topic_defaults`.
    pub fn topic_defaults(&self) -> BTreeMap<String, String> {
        let overrides = self.topic_defaults_strings().unwrap_or_default();
        topic_config::effective(&topic_config::builtin_defaults(), &overrides)
    }

    /// The address clients should use to reach this broker.
    pub fn advertised(&self) -> String {
        self.advertised_address
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/single.toml");
        let config = ServerConfig::from_file(&path).unwrap();
        assert_eq!(config.node_id, 1);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = ServerConfig::from_toml("node_id = 1\nlisten_port = 3\n").unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
        let err = ServerConfig::from_toml("[broker]\nrequest_timeout = 3\n").unwrap_err();
        assert!(err.to_string().contains("request_timeout"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_reason() {
        let err = ServerConfig::from_toml("node_id = \"one\"\n").unwrap_err();
        assert!(err.to_string().contains("node_id"), "{err}");
        let err = ServerConfig::from_toml("listen = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = ServerConfig::from_toml("[topic_defaults]\n\"segment.bytes\" = 3\n").unwrap_err();
        assert!(err.to_string().contains("segment.bytes"), "{err}");
        let err = ServerConfig::from_toml("roles = [\"boss\"]\n").unwrap_err();
        assert!(err.to_string().contains("boss"), "{err}");
    }

    #[test]
    fn topic_defaults_overlay_builtins() {
        let c = ServerConfig::from_toml("[topic_defaults]\n\"retention.ms\" = 5\n").unwrap();
        let d = c.topic_defaults();
        assert_eq!(d["retention.ms"], "5");
        assert_eq!(d["cleanup.policy"], "delete");
    }
}
