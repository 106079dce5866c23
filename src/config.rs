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
    #[error("environment variables {names} (RUNNEL_KEY or RUNNEL_SECTION__KEY override config keys): {message}")]
    Env { names: String, message: String },
}

/// The whole server configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// This node's id, unique in the cluster (node.id).
    pub node_id: i32,
    /// Address the client gRPC listener binds, HOST:PORT (port 0 picks one).
    pub listen: SocketAddr,
    /// Address other brokers and clients should use, HOST:PORT; defaults
    /// to `listen`, and is required when that is every interface (0.0.0.0).
    pub advertised_address: Option<String>,
    /// Where partition logs and metadata live.
    pub data_dir: PathBuf,
    /// Rack label, for replica placement.
    pub rack: String,
    /// Roles: "broker" (every node), plus "controller" on the voters.
    pub roles: Vec<String>,
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus text),
    /// `/health` and `/ready`, HOST:PORT (port 0 picks one); none when
    /// absent.
    pub metrics_listen: Option<SocketAddr>,
    /// Request handling limits.
    pub broker: BrokerSection,
    /// The metadata quorum.
    pub controller: ControllerSection,
    /// Broker-wide defaults for topic configs (Kafka key names).
    pub topic_defaults: BTreeMap<String, toml::Value>,
    /// Separate listener for broker-to-broker traffic (replication, Raft,
    /// broker heartbeats), HOST:PORT; absent = everything on `listen`.
    pub internal_listen: Option<SocketAddr>,
    /// Address other brokers use for the internal listener; defaults to
    /// `internal_listen`.
    pub internal_advertised_address: Option<String>,
    /// TLS on the client listener (and, without an internal listener, on
    /// broker-to-broker calls); absent = plaintext.
    pub tls: Option<TlsSection>,
    /// TLS on the internal listener and the brokers' outgoing internal
    /// calls (mutual: every peer presents a certificate from `ca_file`).
    pub internal_tls: Option<InternalTlsSection>,
    /// Authentication, authorisation and quotas.
    pub security: SecuritySection,
    /// Threads running the broker's async work (request handling, appends,
    /// replication). 0: one per core, or `TOKIO_WORKER_THREADS`. Set it
    /// lower when the broker shares its cores with other busy processes,
    /// as in a local benchmark whose client runs on the same machine: a
    /// worker per core then mostly adds cross-thread wake-ups
    /// (`benches/RESULTS.md`, session 5).
    pub worker_threads: usize,
}

/// `[tls]`: the client listener's TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain of this broker, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA bundle: verifies client certificates (mTLS) and, without an
    /// internal listener, the other brokers' certificates.
    pub ca_file: Option<PathBuf>,
    /// "none", "optional" or "required": whether clients are asked for a
    /// certificate, whose subject CN becomes their principal.
    #[serde(default)]
    pub client_auth: crate::security::tls::ClientAuth,
}

/// `[internal_tls]`: the internal listener's TLS (always mutual).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalTlsSection {
    /// PEM certificate chain of this broker (also its client certificate
    /// for outgoing internal calls).
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA bundle; peers must present certificates it issued.
    pub ca_file: PathBuf,
}

/// `[security]`: who may do what, and how fast.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySection {
    /// Require every client to authenticate (user name and password, or a
    /// verified client certificate); needs `[tls]`.
    pub authentication: bool,
    /// Enforce ACLs: what no ACL allows is refused with PERMISSION_DENIED.
    pub authorization: bool,
    /// Principals allowed everything, ACLs or not.
    pub super_users: Vec<String>,
    /// Certificate CNs of the brokers: when set, internal services accept
    /// only these (and they are allowed everything).
    pub broker_principals: Vec<String>,
    /// Failed logins of one (peer address, user) before further attempts
    /// are refused for the rest of the window.
    pub auth_failures_max: u32,
    /// The window failed logins are counted in (ms).
    pub auth_failure_window_ms: u64,
}

impl Default for SecuritySection {
    fn default() -> Self {
        Self {
            authentication: false,
            authorization: false,
            super_users: Vec::new(),
            broker_principals: Vec::new(),
            auth_failures_max: 5,
            auth_failure_window_ms: 60_000,
        }
    }
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
    /// How often write-back of every partition's new appends is started
    /// (ms); 0 leaves it to the kernel's flusher.
    pub writeback_interval_ms: u64,
    /// Largest gRPC message accepted (bytes).
    pub grpc_message_bytes_max: usize,
    /// Bytes of produce requests over 64 KiB being received at once, over
    /// every connection (Kafka's `queued.max.request.bytes`); at least
    /// `grpc_message_bytes_max`. Absent: 256 MiB, or
    /// `grpc_message_bytes_max` when larger ([`BrokerSection::queued_request_bytes`]).
    pub queued_request_bytes_max: Option<usize>,
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
    /// Partitions of a topic created without a count (Kafka's
    /// `num.partitions`).
    pub num_partitions: i32,
    /// Replicas per partition of a topic created without a replication
    /// factor (Kafka's `default.replication.factor`).
    pub default_replication_factor: i32,
    /// Replicas of `__consumer_offsets` (Kafka's
    /// `offsets.topic.replication.factor`); groups wait until that many
    /// brokers are live to create it. 0: three, or one per voter on a
    /// smaller quorum (set it on clusters with broker-only nodes).
    pub offsets_topic_replication_factor: i32,
    /// Records an offsets partition may hold before its coordinator
    /// compacts it (copies each key's newest record to the log end and
    /// deletes the rest), and at least twice what its last compaction
    /// kept; 0 never compacts.
    pub offsets_compaction_records: u64,
    /// How long the committed offsets of a group without members are kept
    /// (ms), counted from their commit or from when the group emptied,
    /// whichever is later (Kafka's `offsets.retention.minutes`, 7 days);
    /// 0 keeps them for good.
    pub offsets_retention_ms: u64,
    /// Fault injection for tests: when true, a file named after a
    /// failpoint in `DATA_DIR/failpoints/` switches it on
    /// (`pause-replica-fetch`: followers drop what they fetch).
    pub failpoints: bool,
}

impl BrokerSection {
    /// The receive budget: `queued_request_bytes_max`, or by default
    /// 256 MiB, or `grpc_message_bytes_max` when larger (a config that
    /// raised it past 256 MiB before the budget existed still starts).
    pub fn queued_request_bytes(&self) -> usize {
        self.queued_request_bytes_max
            .unwrap_or_else(|| (256 * 1024 * 1024).max(self.grpc_message_bytes_max))
    }
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            request_timeout_ms: 30_000,
            fetch_wait_max_ms: 30_000,
            maintenance_interval_ms: 1_000,
            writeback_interval_ms: 100,
            grpc_message_bytes_max: 64 * 1024 * 1024,
            queued_request_bytes_max: None,
            shutdown_grace_ms: 5_000,
            replica_lag_time_max_ms: 30_000,
            replica_fetch_bytes_max: 8 * 1024 * 1024,
            replica_fetch_wait_max_ms: 500,
            replication_bytes_per_sec_max: 0,
            num_partitions: 1,
            default_replication_factor: 1,
            offsets_topic_replication_factor: 0,
            offsets_compaction_records: 100_000,
            offsets_retention_ms: 7 * 24 * 60 * 60 * 1000,
            failpoints: false,
        }
    }
}

/// Shortest long-poll cap a broker accepts (ms).
const FETCH_WAIT_MIN_MS: u64 = 10;

/// Longest `controller.cluster_id`.
const CLUSTER_ID_MAX: usize = 64;

/// `[controller]`: the Raft metadata quorum.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSection {
    /// The quorum's voters as `ID@HOST:PORT` (Kafka's
    /// `controller.quorum.voters`); Raft uses the client port. Empty means
    /// this node alone.
    pub voters: Vec<String>,
    /// Cluster id to format a new cluster with; random when absent.
    pub cluster_id: Option<String>,
    /// Raft election timeout range (ms).
    pub election_timeout_min_ms: u64,
    /// Upper end of the election timeout range (ms).
    pub election_timeout_max_ms: u64,
    /// Raft leader heartbeat interval (ms).
    pub heartbeat_interval_ms: u64,
    /// A broker silent for this long is fenced (ms).
    pub broker_session_timeout_ms: u64,
    /// How often a broker heartbeats to the active controller (ms).
    pub broker_heartbeat_interval_ms: u64,
    /// Longest wait for a metadata change to commit (ms).
    pub submit_timeout_ms: u64,
}

impl Default for ControllerSection {
    fn default() -> Self {
        Self {
            voters: Vec::new(),
            cluster_id: None,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            heartbeat_interval_ms: 200,
            broker_session_timeout_ms: 9_000,
            broker_heartbeat_interval_ms: 1_000,
            submit_timeout_ms: 10_000,
        }
    }
}

/// `RUNNEL_…` environment variables that are never config keys: those
/// the CLI itself reads, and those of docker-compose.yml and the
/// benchmark scripts, which the README has users export.
const NOT_CONFIG_ENV: &[&str] = &[
    "RUNNEL_BOOTSTRAP",
    "RUNNEL_CONFIG",
    "RUNNEL_LOG_FORMAT",
    "RUNNEL_TLS_CA",
    "RUNNEL_TLS_CERT",
    "RUNNEL_TLS_KEY",
    "RUNNEL_USER",
    "RUNNEL_PASSWORD",
    "RUNNEL_PASSWORD_FILE",
    "RUNNEL_HOST_IP",
    "RUNNEL_SUBNET",
    "RUNNEL_IMAGE",
    "RUNNEL_BUILD_TARGET",
    "RUNNEL_RUST_IMAGE",
    "RUNNEL_RUNTIME_IMAGE",
    "RUNNEL_COMPOSE_PROFILE",
    "RUNNEL_COMPOSE_NO_BUILD",
    "RUNNEL_COMPOSE_CACHE",
    "RUNNEL_BENCH_LOG_BYTES",
    "RUNNEL_BENCH_DIR",
    "RUNNEL_BIN",
    "RUNNEL_BINARY",
];

/// `RUNNEL_…` variables that others set in a container's environment
/// for a service or link named `runnel` or `runnel-<x>`: Kubernetes
/// service variables (`RUNNEL_SERVICE_HOST`, `RUNNEL_PORT_9092_TCP_ADDR`,
/// `RUNNEL_METRICS_SERVICE_PORT`, …) and Docker link variables
/// (`RUNNEL_NAME`, `RUNNEL_ENV_…`, `RUNNEL_2_PORT`). No config key is
/// named like them (a section's keys have `__` in their names); taken as
/// overrides, each was an unknown key that stopped the server.
fn is_service_env(name: &str) -> bool {
    if matches!(name, "RUNNEL_PORT" | "RUNNEL_NAME")
        || ["RUNNEL_SERVICE_", "RUNNEL_PORT_", "RUNNEL_ENV_"]
            .iter()
            .any(|p| name.starts_with(p))
    {
        return true;
    }
    // `RUNNEL_<X>_…` for a service or link `runnel-<x>`.
    let Some(rest) = name.strip_prefix("RUNNEL_") else {
        return false;
    };
    if rest.contains("__") {
        return false;
    }
    let port_spec = rest.split("_PORT_").skip(1).any(|tail| {
        let mut parts = tail.splitn(3, '_');
        let digits = parts.next().unwrap_or_default();
        let protocol = parts.next().unwrap_or_default();
        !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && matches!(protocol, "TCP" | "UDP" | "SCTP")
    });
    port_spec
        || rest.ends_with("_SERVICE_HOST")
        || rest.contains("_SERVICE_PORT")
        || rest.ends_with("_PORT")
        || rest.ends_with("_NAME")
        || rest.contains("_ENV_")
}

/// Whether the environment variable `name` overrides a config key.
pub fn is_config_env(name: &str) -> bool {
    name.starts_with("RUNNEL_") && !NOT_CONFIG_ENV.contains(&name) && !is_service_env(name)
}

/// This process's config overrides from its environment (see
/// [`ServerConfig::load`]). A variable that is not Unicode is refused
/// if it would be one, and skipped otherwise.
pub fn env_overrides() -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| is_config_env(n)) else {
            continue;
        };
        let value = value.into_string().map_err(|_| ConfigError::Invalid {
            key: name.to_string(),
            reason: "the environment variable's value is not valid Unicode".into(),
        })?;
        out.push((name.to_string(), value));
    }
    Ok(out)
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
            metrics_listen: None,
            broker: BrokerSection::default(),
            controller: ControllerSection::default(),
            topic_defaults: BTreeMap::new(),
            internal_listen: None,
            internal_advertised_address: None,
            tls: None,
            internal_tls: None,
            security: SecuritySection::default(),
            worker_threads: 0,
        }
    }
}

/// More runtime worker threads than this is a typo, not a machine.
const WORKER_THREADS_MAX: usize = 1024;

impl ServerConfig {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::load(Some(path), std::iter::empty())
    }

    /// Reads the file (if any), applies `RUNNEL_…` overrides from `env`,
    /// and validates. `RUNNEL_NODE_ID` sets `node_id`;
    /// `RUNNEL_BROKER__REQUEST_TIMEOUT_MS` sets `[broker] request_timeout_ms`.
    /// Values are read as TOML values (`3`, `true`, `["a"]`), else as
    /// strings.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, shown) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.to_path_buf(),
            ),
            None => (String::new(), PathBuf::from("<defaults>")),
        };
        let parse_err = |message: String| ConfigError::Parse {
            path: shown.clone(),
            message,
        };
        let file: toml::Table = toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        let mut table = file.clone();
        let applied = apply_env(&mut table, env)?;
        let config: ServerConfig = table.try_into().map_err(|e: toml::de::Error| {
            // Blame the environment when the file alone is fine: the
            // variables that fail on their own, or all of them together.
            if applied.is_empty() || file.clone().try_into::<ServerConfig>().is_err() {
                return parse_err(e.to_string());
            }
            let culprits: Vec<(String, toml::de::Error)> = applied
                .iter()
                .filter_map(|(name, raw)| {
                    let mut alone = file.clone();
                    apply_env(&mut alone, [(name.clone(), raw.clone())]).ok()?;
                    let err = alone.try_into::<ServerConfig>().err()?;
                    Some((name.clone(), err))
                })
                .collect();
            let (names, e) = match culprits.into_iter().next() {
                Some((name, e)) => (name, e),
                None => (
                    applied
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    e,
                ),
            };
            ConfigError::Env {
                names,
                // The message names the key; a value read as a number or
                // boolean where text is expected needs TOML quotes.
                message: format!(
                    "{} (for a text value that looks like a number, quote it: NAME='\"value\"')",
                    e.to_string().trim_end()
                ),
            }
        })?;
        config.validate()?;
        Ok(config)
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

    /// The quorum's voters, id → address; this node alone when none are
    /// configured.
    pub fn voters(&self) -> Result<BTreeMap<i32, String>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "controller.voters".into(),
            reason,
        };
        if self.controller.voters.is_empty() {
            return Ok(BTreeMap::from([(self.node_id, self.internal_advertised())]));
        }
        let mut out = BTreeMap::new();
        for v in &self.controller.voters {
            let (id, addr) = v
                .split_once('@')
                .ok_or_else(|| invalid(format!("'{v}' is not ID@HOST:PORT")))?;
            let id: i32 = id
                .trim()
                .parse()
                .ok()
                .filter(|id| *id >= 0)
                .ok_or_else(|| invalid(format!("'{v}': '{id}' is not a node id")))?;
            // Checked here, not when Raft first dials it: a bad address
            // otherwise showed only as "no active controller" minutes in.
            if let Some(problem) = host_port_problem(addr.trim()) {
                return Err(invalid(format!("'{v}': {problem}")));
            }
            if out.insert(id, addr.trim().to_string()).is_some() {
                return Err(invalid(format!("node id {id} is listed twice")));
            }
        }
        Ok(out)
    }

    /// Whether this node votes in the metadata quorum.
    pub fn is_voter(&self) -> bool {
        self.roles.iter().any(|r| r == "controller")
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
        if self.worker_threads > WORKER_THREADS_MAX {
            return Err(invalid(
                "worker_threads",
                format!(
                    "{} is more than {WORKER_THREADS_MAX} (0 means one per core)",
                    self.worker_threads
                ),
            ));
        }
        if let Some(id) = &self.controller.cluster_id {
            // The recorded id is read back trimmed, and an empty one is
            // refused by the quorum only after the start's whole wait.
            if id.is_empty()
                || id.len() > CLUSTER_ID_MAX
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(invalid(
                    "controller.cluster_id",
                    format!(
                        "'{id}' is not a cluster id (1 to {CLUSTER_ID_MAX} of A-Z a-z 0-9 . _ -)"
                    ),
                ));
            }
        }
        for role in &self.roles {
            if role != "broker" && role != "controller" {
                return Err(invalid(
                    "roles",
                    format!("unknown role '{role}' (broker, controller)"),
                ));
            }
        }
        if !self.roles.iter().any(|r| r == "broker") {
            return Err(invalid(
                "roles",
                "every node is a broker (controller-only nodes are not supported): list \"broker\", and \"controller\" on voters"
                    .to_string(),
            ));
        }
        check_advertised(
            "advertised_address",
            self.advertised_address.as_deref(),
            "listen",
            Some(self.listen),
        )?;
        check_advertised(
            "internal_advertised_address",
            self.internal_advertised_address.as_deref(),
            "internal_listen",
            self.internal_listen,
        )?;
        if let Some(m) = self.metrics_listen {
            if m == self.listen && m.port() != 0 {
                return Err(invalid(
                    "metrics_listen",
                    format!("{m} is also `listen`; the metrics endpoint needs its own port"),
                ));
            }
        }
        let voters = self.voters()?;
        if self.is_voter() && !voters.contains_key(&self.node_id) {
            return Err(invalid(
                "controller.voters",
                format!(
                    "this node ({}) has the controller role but is not a voter",
                    self.node_id
                ),
            ));
        }
        if !self.is_voter() && voters.contains_key(&self.node_id) {
            return Err(invalid(
                "roles",
                format!(
                    "node {} is a voter but lacks the controller role",
                    self.node_id
                ),
            ));
        }
        let c = &self.controller;
        if c.election_timeout_min_ms == 0 || c.election_timeout_min_ms >= c.election_timeout_max_ms
        {
            return Err(invalid(
                "controller.election_timeout_min_ms",
                format!(
                    "must be positive and below election_timeout_max_ms ({} >= {})",
                    c.election_timeout_min_ms, c.election_timeout_max_ms
                ),
            ));
        }
        if c.heartbeat_interval_ms == 0 || c.heartbeat_interval_ms >= c.election_timeout_min_ms {
            return Err(invalid(
                "controller.heartbeat_interval_ms",
                format!(
                    "must be positive and below election_timeout_min_ms ({} >= {})",
                    c.heartbeat_interval_ms, c.election_timeout_min_ms
                ),
            ));
        }
        if c.broker_heartbeat_interval_ms == 0
            || c.broker_heartbeat_interval_ms >= c.broker_session_timeout_ms
        {
            return Err(invalid(
                "controller.broker_heartbeat_interval_ms",
                format!(
                    "must be positive and below broker_session_timeout_ms ({} >= {})",
                    c.broker_heartbeat_interval_ms, c.broker_session_timeout_ms
                ),
            ));
        }
        let replica_max = crate::client::MESSAGE_BYTES_MAX / 2;
        if self.broker.replica_fetch_bytes_max as usize > replica_max {
            return Err(invalid(
                "broker.replica_fetch_bytes_max",
                format!(
                    "{} is more than {replica_max}: a follower could not decode the answer",
                    self.broker.replica_fetch_bytes_max
                ),
            ));
        }
        if self.broker.grpc_message_bytes_max < 1024 {
            return Err(invalid(
                "broker.grpc_message_bytes_max",
                "must be at least 1024".into(),
            ));
        }
        // A request of the largest size must fit, or it would wait for
        // good.
        if self.broker.queued_request_bytes() < self.broker.grpc_message_bytes_max {
            return Err(invalid(
                "broker.queued_request_bytes_max",
                format!(
                    "{} is less than broker.grpc_message_bytes_max ({}): a request of that size could never be received",
                    self.broker.queued_request_bytes(), self.broker.grpc_message_bytes_max
                ),
            ));
        }
        // What a semaphore holds at most.
        if self.broker.queued_request_bytes() > usize::MAX >> 3 {
            return Err(invalid(
                "broker.queued_request_bytes_max",
                format!("must be at most {}", usize::MAX >> 3),
            ));
        }
        for (key, value) in [
            ("broker.num_partitions", self.broker.num_partitions),
            (
                "broker.default_replication_factor",
                self.broker.default_replication_factor,
            ),
        ] {
            if value < 1 {
                return Err(invalid(key, format!("{value} is below 1")));
            }
        }
        let b = &self.broker;
        for (key, value) in [
            ("broker.request_timeout_ms", b.request_timeout_ms),
            ("broker.replica_lag_time_max_ms", b.replica_lag_time_max_ms),
            ("controller.submit_timeout_ms", c.submit_timeout_ms),
            (
                "security.auth_failure_window_ms",
                self.security.auth_failure_window_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive".into()));
            }
        }
        // Long polls that do not wait: every idle follower (or consumer)
        // asked again at once, in a loop at the network's round trip.
        for (key, value) in [
            ("broker.fetch_wait_max_ms", b.fetch_wait_max_ms),
            (
                "broker.replica_fetch_wait_max_ms",
                u64::from(b.replica_fetch_wait_max_ms),
            ),
        ] {
            if value < FETCH_WAIT_MIN_MS {
                return Err(invalid(
                    key,
                    format!(
                        "{value} is below {FETCH_WAIT_MIN_MS} ms: idle fetches would be answered at once, in a loop"
                    ),
                ));
            }
        }
        if b.num_partitions > runnel_controller::metadata::PARTITIONS_MAX {
            return Err(invalid(
                "broker.num_partitions",
                format!(
                    "{} is above the most a topic may have ({})",
                    b.num_partitions,
                    runnel_controller::metadata::PARTITIONS_MAX
                ),
            ));
        }
        // A follower parked in an idle long poll must not look lagging
        // (Kafka refuses the same combination).
        if u64::from(b.replica_fetch_wait_max_ms) >= b.replica_lag_time_max_ms {
            return Err(invalid(
                "broker.replica_fetch_wait_max_ms",
                format!(
                    "must be below replica_lag_time_max_ms ({} >= {}): followers waiting on an idle leader would leave the ISR",
                    b.replica_fetch_wait_max_ms, b.replica_lag_time_max_ms
                ),
            ));
        }
        if self.broker.offsets_topic_replication_factor < 0 {
            return Err(invalid(
                "broker.offsets_topic_replication_factor",
                format!(
                    "{} is negative (0 picks three, or one per voter)",
                    self.broker.offsets_topic_replication_factor
                ),
            ));
        }
        self.validate_security()?;
        let defaults = self.topic_defaults_strings()?;
        for (key, value) in &defaults {
            topic_config::validate_new(key, value)
                .map_err(|e| invalid(&format!("topic_defaults.\"{key}\""), e.to_string()))?;
        }
        if defaults.contains_key("unclean.leader.election.enable") {
            // The controller decides elections from each topic's own
            // configs (its state machine must not read a broker's file);
            // a broker-wide default showed in describe and was never used.
            return Err(invalid(
                "topic_defaults.\"unclean.leader.election.enable\"",
                "cannot be a broker default: set it per topic (runnel topic create/alter --config unclean.leader.election.enable=true)".to_string(),
            ));
        }
        if let Some(min_isr) = defaults.get("min.insync.replicas") {
            let rf = self.broker.default_replication_factor;
            if min_isr.parse::<i64>().is_ok_and(|m| m > i64::from(rf)) {
                return Err(invalid(
                    "topic_defaults.\"min.insync.replicas\"",
                    format!(
                        "{min_isr} is more than broker.default_replication_factor ({rf}): every acks=all produce to a topic created with the default would be refused"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Topic defaults as strings (TOML integers and booleans are allowed).
    fn topic_defaults_strings(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        self.topic_defaults
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    // As Kafka parses numbers: surrounding blanks do not
                    // count (and must not reach the brokers' parsers).
                    toml::Value::String(s) => s.trim().to_string(),
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

    /// Rules of the listener and security sections.
    fn validate_security(&self) -> Result<(), ConfigError> {
        use crate::security::tls::ClientAuth;
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        if let Some(tls) = &self.tls {
            if tls.client_auth != ClientAuth::None && tls.ca_file.is_none() {
                return Err(invalid(
                    "tls.client_auth",
                    "client certificates need tls.ca_file to verify them",
                ));
            }
        }
        if self.internal_tls.is_some() && self.internal_listen.is_none() {
            return Err(invalid(
                "internal_tls",
                "needs internal_listen (without it, [tls] covers internal traffic)",
            ));
        }
        if self.security.authentication && self.tls.is_none() {
            return Err(invalid(
                "security.authentication",
                "credentials travel only over TLS: configure [tls]",
            ));
        }
        let secured = self.security.authentication || self.security.authorization;
        if secured && self.internal_listen.is_none() && self.security.broker_principals.is_empty() {
            // The internal services (Raft, replication, broker lifecycle)
            // then share the client listener, and nothing told a broker's
            // call from a client's: any client could write cluster
            // metadata (users, ACLs) through Raft or read any partition
            // as a replica.
            return Err(invalid(
                "security.broker_principals",
                "with authentication or authorization on, the internal services share the client listener: list the brokers' certificate names here (brokers present their [tls] certificates to each other), or give them their own internal_listen",
            ));
        }
        // Peers to call: other voters, or (on a broker-only node) the
        // voters themselves.
        let several_voters = self.voters().is_ok_and(|v| v.len() > 1) || !self.is_voter();
        let certs_asked = self
            .tls
            .as_ref()
            .is_some_and(|t| t.client_auth != ClientAuth::None);
        if secured && self.internal_listen.is_none() && several_voters && !certs_asked {
            // Brokers are told apart by the certificates they present to
            // each other on the shared listener; a listener that asks for
            // none saw every broker as anonymous, refused its Raft and
            // replication calls, and the cluster never formed.
            return Err(invalid(
                "tls.client_auth",
                "with authentication or authorization on, brokers present their certificates to each other on the client listener: set tls.client_auth to \"optional\" or \"required\" (with tls.ca_file), or give them an internal_listen",
            ));
        }
        if secured && self.internal_listen.is_some() && self.security.broker_principals.is_empty() {
            // The internal listener's mutual TLS then takes any
            // certificate its CA signed as a broker's: with the clients'
            // CA (the example config's), any client with a certificate
            // could write cluster metadata through Raft.
            return Err(invalid(
                "security.broker_principals",
                "with authentication or authorization on, list the brokers' certificate names: the internal listener otherwise takes any certificate its CA signed (a client's too) as a broker's",
            ));
        }
        if secured && self.internal_listen.is_some() && self.internal_tls.is_none() {
            // A plaintext internal listener takes every caller as a
            // broker: anyone reaching the port could write cluster
            // metadata (users, ACLs) through Raft or read any partition.
            return Err(invalid(
                "internal_tls",
                "with authentication or authorization on, the internal listener needs mutual TLS: configure [internal_tls] (or drop internal_listen and list broker_principals)",
            ));
        }
        if self.security.auth_failures_max == 0 {
            return Err(invalid("security.auth_failures_max", "must be at least 1"));
        }
        Ok(())
    }

    /// The address other brokers use for internal RPCs to this one.
    pub fn internal_advertised(&self) -> String {
        match (&self.internal_advertised_address, self.internal_listen) {
            (Some(a), _) => a.clone(),
            (None, Some(l)) => l.to_string(),
            (None, None) => self.advertised(),
        }
    }

    /// The address clients should use to reach this broker.
    pub fn advertised(&self) -> String {
        self.advertised_address
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// An advertised address is what others dial: HOST:PORT, with a host
/// that is not the every-interface address. Without one, the listener's
/// address is advertised, so it must not be every interface either
/// (as Kafka refuses to advertise 0.0.0.0).
fn check_advertised(
    key: &str,
    advertised: Option<&str>,
    listen_key: &str,
    listen: Option<SocketAddr>,
) -> Result<(), ConfigError> {
    let Some(a) = advertised else {
        return match listen {
            Some(l) if l.ip().is_unspecified() => Err(ConfigError::Invalid {
                key: key.to_string(),
                reason: format!(
                    "`{listen_key}` is {l}, every interface, which others cannot dial: set the address they should use, HOST:PORT"
                ),
            }),
            _ => Ok(()),
        };
    };
    let bad = |reason: String| ConfigError::Invalid {
        key: key.to_string(),
        reason,
    };
    host_port_problem(a).map_or(Ok(()), |problem| Err(bad(problem)))
}

/// What is wrong with `a` as an address others dial (HOST:PORT, a port
/// from 1, not every interface), if anything.
fn host_port_problem(a: &str) -> Option<String> {
    let Some((host, port)) = a.rsplit_once(':') else {
        return Some(format!("'{a}' is not HOST:PORT"));
    };
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Some(format!("'{a}' is not HOST:PORT"));
    }
    // Dialled as http(s)://HOST:PORT: a scheme, a path or an IPv6
    // address without brackets made an address no one could dial, found
    // only when the quorum never formed.
    if host.contains('/') || host.contains('@') || (host.contains(':') && !bracketed) {
        return Some(format!(
            "'{a}' is not HOST:PORT (no scheme or path; an IPv6 address goes in brackets: [::1]:9092)"
        ));
    }
    if host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Some(format!(
            "'{a}' names every interface, which others cannot dial"
        ));
    }
    None
}

/// Applies `RUNNEL_…` environment overrides to a parsed TOML table;
/// returns the names of those applied.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut applied = Vec::new();
    for (name, raw) in env {
        if !is_config_env(&name) {
            continue;
        }
        let rest = &name["RUNNEL_".len()..];
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) || path.len() > 2 {
            return Err(ConfigError::Invalid {
                key: name.clone(),
                reason: "expected RUNNEL_KEY or RUNNEL_SECTION__KEY".into(),
            });
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let mut target = &mut *table;
        for section in &path[..path.len() - 1] {
            let entry = target
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            target = entry.as_table_mut().ok_or_else(|| ConfigError::Invalid {
                key: name.clone(),
                reason: format!("`{section}` is not a section"),
            })?;
        }
        target.insert(path[path.len() - 1].clone(), value);
        applied.push((name, raw));
    }
    Ok(applied)
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

    /// A config that raised grpc_message_bytes_max past 256 MiB before the
    /// receive budget existed still loads: the budget grows with it.
    #[test]
    fn the_receive_budget_follows_a_larger_message_limit() {
        let c = ServerConfig::from_toml("[broker]\ngrpc_message_bytes_max = 300000000\n").unwrap();
        assert_eq!(c.broker.queued_request_bytes(), 300_000_000);
        let c = ServerConfig::from_toml("").unwrap();
        assert_eq!(c.broker.queued_request_bytes(), 256 * 1024 * 1024);
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
        let err = ServerConfig::from_toml("worker_threads = 100000\n").unwrap_err();
        assert!(err.to_string().contains("worker_threads"), "{err}");
        let err = ServerConfig::from_toml("worker_threads = -1\n").unwrap_err();
        assert!(err.to_string().contains("worker_threads"), "{err}");
        let err =
            ServerConfig::from_toml("[broker]\nreplica_fetch_bytes_max = 100000000\n").unwrap_err();
        assert!(
            err.to_string().contains("broker.replica_fetch_bytes_max"),
            "{err}"
        );
        let err = ServerConfig::from_toml("[broker]\nnum_partitions = 0\n").unwrap_err();
        assert!(err.to_string().contains("broker.num_partitions"), "{err}");
        for (text, key) in [
            (
                "[broker]\nrequest_timeout_ms = 0\n",
                "broker.request_timeout_ms",
            ),
            (
                "[broker]\nreplica_lag_time_max_ms = 0\n",
                "broker.replica_lag_time_max_ms",
            ),
            (
                "[broker]\nreplica_lag_time_max_ms = 10000\nreplica_fetch_wait_max_ms = 15000\n",
                "broker.replica_fetch_wait_max_ms",
            ),
            (
                "[controller]\nsubmit_timeout_ms = 0\n",
                "controller.submit_timeout_ms",
            ),
            (
                "[broker]\ngrpc_message_bytes_max = 2000000\nqueued_request_bytes_max = 1000000\n",
                "broker.queued_request_bytes_max",
            ),
            (
                "[broker]\nfetch_wait_max_ms = 0\n",
                "broker.fetch_wait_max_ms",
            ),
            (
                "[broker]\nreplica_fetch_wait_max_ms = 0\n",
                "broker.replica_fetch_wait_max_ms",
            ),
            (
                "[broker]\nnum_partitions = 20000\n",
                "broker.num_partitions",
            ),
            (
                "[security]\nauth_failure_window_ms = 0\n",
                "security.auth_failure_window_ms",
            ),
            (
                "[controller]\nvoters = [\"1@http://h:9092\"]\n",
                "controller.voters",
            ),
            ("advertised_address = \"::1:9092\"\n", "advertised_address"),
            (
                "[topic_defaults]\n\"min.insync.replicas\" = 2\n",
                "topic_defaults.\"min.insync.replicas\"",
            ),
            (
                "[topic_defaults]\n\"unclean.leader.election.enable\" = true\n",
                "topic_defaults.\"unclean.leader.election.enable\"",
            ),
        ] {
            let err = ServerConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let err = ServerConfig::from_toml(
            "internal_listen = \"127.0.0.1:9192\"\n[security]\nauthorization = true\nbroker_principals = [\"b\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("internal_tls"), "{err}");
        // Several brokers on a shared listener that asks for no
        // certificates could never tell each other apart.
        let err = ServerConfig::from_toml(
            "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\n[security]\nauthentication = true\nbroker_principals = [\"b\"]\n[controller]\nvoters = [\"1@h:1\", \"2@h:2\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("tls.client_auth"), "{err}");
        // So could a broker-only node and its one controller.
        let err = ServerConfig::from_toml(
            "roles = [\"broker\"]\n[tls]\ncert_file = \"a\"\nkey_file = \"b\"\n[security]\nauthentication = true\nbroker_principals = [\"b\"]\n[controller]\nvoters = [\"2@h:2\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("tls.client_auth"), "{err}");
        // With its own listener too, the brokers' names are required: its
        // mutual TLS takes any certificate of its CA, a client's too.
        let err = ServerConfig::from_toml(
            "internal_listen = \"127.0.0.1:9192\"\n[internal_tls]\ncert_file = \"a\"\nkey_file = \"b\"\nca_file = \"c\"\n[security]\nauthorization = true\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("broker_principals"), "{err}");
        ServerConfig::from_toml(
            "[broker]\ndefault_replication_factor = 3\n[topic_defaults]\n\"min.insync.replicas\" = 2\n",
        )
        .unwrap();
        let err =
            ServerConfig::from_toml("[broker]\ndefault_replication_factor = -1\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("broker.default_replication_factor"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "node_id = 1\n[broker]\nrequest_timeout_ms = 5\n").unwrap();
        let env = [
            ("RUNNEL_NODE_ID", "2"),
            ("RUNNEL_BROKER__REQUEST_TIMEOUT_MS", "7"),
            ("RUNNEL_CONTROLLER__VOTERS", r#"["2@h:1"]"#),
            ("RUNNEL_DATA_DIR", "/tmp/x"),
            ("RUNNEL_WORKER_THREADS", "1"),
            ("RUNNEL_BOOTSTRAP", "ignored"),
            // A Kubernetes service named runnel, a Docker link.
            ("RUNNEL_SERVICE_HOST", "10.0.0.1"),
            ("RUNNEL_SERVICE_PORT_GRPC", "9092"),
            ("RUNNEL_PORT", "tcp://10.0.0.1:9092"),
            ("RUNNEL_PORT_9092_TCP_ADDR", "10.0.0.1"),
            ("RUNNEL_NAME", "/app/runnel"),
            // Services named runnel-metrics and runnel-client, a link
            // runnel_2.
            ("RUNNEL_METRICS_SERVICE_HOST", "10.0.0.2"),
            ("RUNNEL_METRICS_SERVICE_PORT", "9644"),
            ("RUNNEL_METRICS_SERVICE_PORT_HTTP", "9644"),
            ("RUNNEL_METRICS_PORT", "tcp://10.0.0.2:9644"),
            ("RUNNEL_METRICS_PORT_9644_TCP", "tcp://10.0.0.2:9644"),
            ("RUNNEL_CLIENT_PORT_9092_TCP_ADDR", "10.0.0.3"),
            ("RUNNEL_CLIENT_PORT_9092_UDP_PROTO", "udp"),
            ("RUNNEL_2_NAME", "/app/runnel_2"),
            ("RUNNEL_2_ENV_FOO", "bar"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = ServerConfig::load(Some(&path), env).unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.broker.request_timeout_ms, 7);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.worker_threads, 1);
        assert_eq!(
            c.voters().unwrap(),
            BTreeMap::from([(2, "h:1".to_string())])
        );
        // Every top-level key stays an override.
        for key in [
            "NODE_ID",
            "LISTEN",
            "ADVERTISED_ADDRESS",
            "DATA_DIR",
            "RACK",
            "ROLES",
            "METRICS_LISTEN",
            "INTERNAL_LISTEN",
            "INTERNAL_ADVERTISED_ADDRESS",
            "WORKER_THREADS",
            "BROKER__REPLICA_FETCH_WAIT_MAX_MS",
            "TOPIC_DEFAULTS__SEGMENT_NAME",
        ] {
            assert!(is_config_env(&format!("RUNNEL_{key}")), "{key}");
        }
        let err = ServerConfig::load(None, [("RUNNEL_NODE_IDX".to_string(), "1".to_string())])
            .unwrap_err();
        assert!(err.to_string().contains("node_idx"), "{err}");
    }

    #[test]
    fn a_bad_environment_override_is_blamed_not_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "node_id = 1\n").unwrap();
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let err = ServerConfig::load(Some(&path), env(&[("RUNNEL_NODE_IDX", "2")])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("RUNNEL_NODE_IDX") && text.contains("node_idx"),
            "{text}"
        );
        assert!(!text.contains("n.toml"), "{text}");
        // A value of the wrong type: the message names the variable alone
        // and its key.
        let err = ServerConfig::load(
            Some(&path),
            env(&[
                ("RUNNEL_NODE_ID", "1"),
                ("RUNNEL_CONTROLLER__CLUSTER_ID", "20240101"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("RUNNEL_CONTROLLER__CLUSTER_ID")
                && !err.contains("RUNNEL_NODE_ID")
                && err.contains("cluster_id"),
            "{err}"
        );
        let c = ServerConfig::load(
            Some(&path),
            env(&[("RUNNEL_CONTROLLER__CLUSTER_ID", "\"20240101\"")]),
        )
        .unwrap();
        assert_eq!(c.controller.cluster_id.as_deref(), Some("20240101"));
        // The compose file's and the benchmarks' variables are not keys.
        let c = ServerConfig::load(
            Some(&path),
            env(&[
                ("RUNNEL_HOST_IP", "169.254.10.1"),
                ("RUNNEL_SUBNET", "169.254.10.0/24"),
                ("RUNNEL_IMAGE", "runnel:dev"),
            ]),
        )
        .unwrap();
        assert_eq!(c.node_id, 1);
        // A broken file is still blamed on the file.
        std::fs::write(&path, "node_idd = 1\n").unwrap();
        let err = ServerConfig::load(Some(&path), env(&[("RUNNEL_NODE_ID", "2")])).unwrap_err();
        assert!(err.to_string().contains("n.toml"), "{err}");
    }

    #[test]
    fn advertised_addresses_are_dialable() {
        let err = ServerConfig::from_toml("listen = \"0.0.0.0:9092\"\n").unwrap_err();
        assert!(err.to_string().contains("advertised_address"), "{err}");
        let c = ServerConfig::from_toml(
            "listen = \"0.0.0.0:9092\"\nadvertised_address = \"broker-1:9092\"\n",
        )
        .unwrap();
        assert_eq!(c.advertised(), "broker-1:9092");
        for bad in [
            "broker-1",
            ":9092",
            "broker-1:x",
            "broker-1:0",
            "0.0.0.0:9092",
            "[::]:9092",
        ] {
            let err =
                ServerConfig::from_toml(&format!("advertised_address = \"{bad}\"\n")).unwrap_err();
            assert!(
                err.to_string().contains("advertised_address"),
                "{bad}: {err}"
            );
        }
        ServerConfig::from_toml("advertised_address = \"[::1]:9092\"\n").unwrap();
        let err = ServerConfig::from_toml("internal_listen = \"[::]:9192\"\n").unwrap_err();
        assert!(
            err.to_string().contains("internal_advertised_address"),
            "{err}"
        );
    }

    #[test]
    fn metrics_listen_is_optional_and_needs_its_own_port() {
        assert_eq!(ServerConfig::from_toml("").unwrap().metrics_listen, None);
        let c = ServerConfig::from_toml("metrics_listen = \"127.0.0.1:9644\"\n").unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9644".parse().unwrap()));
        let err = ServerConfig::from_toml(
            "listen = \"127.0.0.1:9092\"\nmetrics_listen = \"127.0.0.1:9092\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("metrics_listen"), "{err}");
    }

    #[test]
    fn voters_are_checked() {
        let err = ServerConfig::from_toml("[controller]\nvoters = [\"x@h:1\"]\n").unwrap_err();
        assert!(err.to_string().contains("not a node id"), "{err}");
        let err = ServerConfig::from_toml("[controller]\nvoters = [\"2@h:1\"]\n").unwrap_err();
        assert!(err.to_string().contains("not a voter"), "{err}");
        let err =
            ServerConfig::from_toml("[controller]\nvoters = [\"1@h:1\", \"1@h:2\"]\n").unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        for bad in [
            "1@h:",
            "1@h:abc",
            "1@:9092",
            "1@h:0",
            "1@0.0.0.0:9092",
            "-1@h:1",
        ] {
            let err = ServerConfig::from_toml(&format!("[controller]\nvoters = [\"{bad}\"]\n"))
                .unwrap_err();
            assert!(
                err.to_string().contains("controller.voters"),
                "{bad}: {err}"
            );
        }
        for bad in ["", "prod ", "a b", &"x".repeat(65)] {
            let err = ServerConfig::from_toml(&format!("[controller]\ncluster_id = \"{bad}\"\n"))
                .unwrap_err();
            assert!(err.to_string().contains("cluster_id"), "{bad:?}: {err}");
        }
        let ok = ServerConfig::from_toml("[controller]\ncluster_id = \"prod-eu_1.a\"\n").unwrap();
        assert_eq!(ok.controller.cluster_id.as_deref(), Some("prod-eu_1.a"));
        let ok =
            ServerConfig::from_toml("roles = [\"broker\"]\n[controller]\nvoters = [\"2@h:1\"]\n")
                .unwrap();
        assert!(!ok.is_voter());
        let err = ServerConfig::from_toml("roles = [\"controller\"]\n").unwrap_err();
        assert!(err.to_string().contains("controller-only"), "{err}");
        // No voters: this node alone.
        let single = ServerConfig::from_toml("node_id = 4\n").unwrap();
        assert_eq!(
            single.voters().unwrap(),
            BTreeMap::from([(4, "127.0.0.1:9092".to_string())])
        );
    }

    #[test]
    fn topic_defaults_overlay_builtins() {
        let c = ServerConfig::from_toml("[topic_defaults]\n\"retention.ms\" = 5\n").unwrap();
        let d = c.topic_defaults();
        assert_eq!(d["retention.ms"], "5");
        let c = ServerConfig::from_toml("[topic_defaults]\n\"retention.ms\" = \" 7 \"\n").unwrap();
        assert_eq!(c.topic_defaults()["retention.ms"], "7");
        assert_eq!(d["cleanup.policy"], "delete");
    }
}
