//! The Rust client: connects to any broker of a cluster, learns the
//! partition leaders from its metadata, and routes requests to them.
//!
//! - [`Client`]: connections, metadata, admin calls, fetch and offsets.
//! - [`producer`]: [`Producer`], batching records per partition with a
//!   linger, pipelining batches over one stream per partition.
//! - [`consumer`]: [`PartitionConsumer`], polling one partition.
//! - `security`: users, ACLs and quotas ([`Client::upsert_user`], ...).
//! - [`ClientOptions`]: TLS and credentials.
//! - [`group`]: [`GroupConsumer`], a consumer-group member, and the group
//!   admin calls.
//!
//! ```no_run
//! # async fn demo() -> Result<(), runnel::client::ClientError> {
//! use runnel::client::{Client, ProducerConfig, ProducerRecord};
//! let client = Client::connect("127.0.0.1:9092").await?;
//! client.create_topic("events", 3, 1, Default::default()).await?;
//! let producer = client.producer(ProducerConfig::default());
//! let ack = producer.send("events", ProducerRecord::value("hello")).await?;
//! println!("stored at {:?}", ack.await?);
//! producer.close().await?;
//! # Ok(()) }
//! ```

mod consumer;
mod group;
mod options;
mod producer;
mod security;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_proto::v1 as pb;
use runnel_proto::v1::admin_client::AdminClient;
use runnel_proto::v1::consumer_client::ConsumerClient;
use runnel_proto::v1::producer_client::ProducerClient;
use tonic::transport::Endpoint;

pub use consumer::{ConsumedRecord, PartitionConsumer, StartFrom};
pub use group::{GroupConfig, GroupConsumer, OffsetReset, RebalanceEvent, RebalanceListener};
pub(crate) use options::Channel;
pub use options::{ClientOptions, ClientTls, Credentials};
pub use producer::{DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata};

use crate::error::error_code_of;

/// Deadline of a unary request beyond any long-poll wait it asks for.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a topic's cached metadata is trusted without an error that
/// invalidates it (Kafka's metadata.max.age.ms, shorter): partitions
/// added to a topic reach producers within this time.
pub const METADATA_MAX_AGE: Duration = Duration::from_secs(60);

/// Largest message the client sends or accepts.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The longest wait a caller's timeout is taken as (a larger one, up to
/// `Duration::MAX` for "no limit", would overflow the instants and sums
/// made of it).
const LONGEST_WAIT: Duration = Duration::from_secs(24 * 3600);

/// How long an admin call may take: longer than the broker's own bound
/// on a metadata change (`submit_timeout_ms`, 10 s by default, plus taking
/// up the partitions it creates), so that a slow success is not reported
/// as a failure.
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a topic unknown to the broker asked is looked for on the
/// others ([`Client::topic`]).
const ELSEWHERE_WAIT: Duration = Duration::from_secs(1);

/// Why a client call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No broker of the bootstrap list answered.
    #[error("cannot connect to any of {bootstrap}: {reason}")]
    Connect { bootstrap: String, reason: String },
    /// The broker refused the request; `code` says why.
    #[error("{message} ({code:?})")]
    Broker {
        code: pb::ErrorCode,
        message: String,
        /// Leader address, on NOT_LEADER.
        leader: Option<String>,
    },
    /// A transport failure (connection lost, ...).
    #[error("transport error: {0}")]
    Transport(String),
    /// Bad input from the caller.
    #[error("{0}")]
    Invalid(String),
    /// The producer was closed.
    #[error("producer is closed")]
    Closed,
}

impl ClientError {
    /// Whether trying again later (with fresh metadata) may succeed:
    /// transport failures, leadership moves, timeouts, too few replicas.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Connect { .. } => true,
            ClientError::Broker { code, .. } => matches!(
                code,
                pb::ErrorCode::NotLeader
                    | pb::ErrorCode::RequestTimedOut
                    | pb::ErrorCode::NotEnoughReplicas
                    | pb::ErrorCode::NotEnoughReplicasAfterAppend
                    | pb::ErrorCode::NotController
                    | pb::ErrorCode::NotCoordinator
                    | pb::ErrorCode::BrokerNotAvailable
                    | pb::ErrorCode::OffsetNotAvailable
            ),
            ClientError::Invalid(_) | ClientError::Closed => false,
        }
    }

    /// The broker's error code, or UNKNOWN for client-side failures.
    pub fn code(&self) -> pb::ErrorCode {
        match self {
            ClientError::Broker { code, .. } => *code,
            _ => pb::ErrorCode::Unknown,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let code = error_code_of(&status);
        // Without a Runnel error code the status is not the broker's
        // answer but the connection's: also INTERNAL, which is what tonic
        // makes of an HTTP/2 stream reset or GOAWAY (taken as the broker's
        // refusal, a metadata lookup stopped instead of asking the next
        // broker, and a producer id was not retried).
        let answered = status
            .metadata()
            .get(crate::error::ERROR_CODE_HEADER)
            .is_some();
        if code == pb::ErrorCode::Unknown && (status.code() != tonic::Code::Internal || !answered) {
            return ClientError::Transport(format!("{}: {}", status.code(), status.message()));
        }
        let leader = status
            .metadata()
            .get(crate::error::LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        ClientError::Broker {
            code,
            message: status.message().to_string(),
            leader,
        }
    }
}

/// A connection to a Runnel cluster. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The broker admin and metadata calls go to; replaced by another
    /// known broker when it stops answering.
    bootstrap: Mutex<(String, Channel)>,
    /// The bootstrap list as given.
    seeds: Vec<String>,
    /// Channels by broker address.
    channels: Mutex<HashMap<String, Channel>>,
    /// Last metadata seen, by topic, with when it was read: entries older
    /// than [`METADATA_MAX_AGE`] are read again.
    topics: Mutex<HashMap<String, (pb::TopicDescription, std::time::Instant)>>,
    /// One refresh of a topic at a time: the tasks that find it stale
    /// together wait for the first one's answer instead of each asking
    /// (a leader's loss sent one Metadata call per partition of the topic,
    /// every 100 ms, each answer describing all of them).
    /// The last refresh's outcome, with when it started: the answer of
    /// those that asked before it started (not a queue of refreshes one
    /// after another during an outage), not of those that asked later.
    refreshing: Mutex<HashMap<String, RefreshTurn>>,
    /// A background failover (after a security call's transport failure)
    /// is under way.
    failing_over: std::sync::atomic::AtomicBool,
    /// Broker addresses by id.
    brokers: Mutex<HashMap<i32, String>>,
    /// Coordinator address by group (see `group`), dropped on errors.
    coordinators: Mutex<HashMap<String, String>>,
    /// TLS and credentials for every connection.
    options: ClientOptions,
}

/// See `Inner::refreshing`.
type RefreshTurn = Arc<
    tokio::sync::Mutex<
        Option<(
            std::time::Instant,
            Result<pb::TopicDescription, ClientError>,
        )>,
    >,
>;

/// One Metadata call to the broker behind `channel`.
async fn ask_metadata(
    channel: &Channel,
    request: &pb::MetadataRequest,
) -> Result<pb::MetadataResponse, ClientError> {
    let mut call = tonic::Request::new(request.clone());
    call.set_timeout(REQUEST_TIMEOUT);
    Ok(AdminClient::new(channel.clone())
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .metadata(call)
        .await?
        .into_inner())
}

fn endpoint(addr: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = if addr.contains("://") {
        // With TLS configured, an http:// address would make tonic skip
        // it, and credentials would go out in the clear.
        if options.tls.is_some() && !addr.starts_with("https://") {
            return Err(ClientError::Invalid(format!(
                "broker address '{addr}' is not https:// but TLS is configured"
            )));
        }
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let e = Endpoint::from_shared(uri)
        .map(|e| crate::server::tune_endpoint(e.connect_timeout(Duration::from_secs(5))))
        .map_err(|e| ClientError::Invalid(format!("bad broker address '{addr}': {e}")))?;
    match &options.tls {
        Some(tls) => e
            .tls_config(tls.to_tonic()?)
            .map_err(|e| ClientError::Invalid(format!("TLS for '{addr}': {e}"))),
        None => Ok(e),
    }
}

impl Client {
    /// Connects to the first reachable broker of a comma-separated
    /// `HOST:PORT` list.
    pub async fn connect(bootstrap: &str) -> Result<Client, ClientError> {
        Self::connect_with(bootstrap, ClientOptions::default()).await
    }

    /// Like [`Client::connect`], with TLS and credentials.
    pub async fn connect_with(
        bootstrap: &str,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        if options.tls.is_none() && options.credentials.is_set() {
            return Err(ClientError::Invalid(
                "credentials are only sent over TLS: configure a CA (--tls-ca)".into(),
            ));
        }
        let mut last = String::from("empty bootstrap list");
        let seeds: Vec<String> = bootstrap
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        for addr in &seeds {
            match endpoint(addr, &options)?.connect().await {
                Ok(channel) => {
                    let channel = options.wrap(channel);
                    let mut channels = HashMap::new();
                    channels.insert(addr.to_string(), channel.clone());
                    return Ok(Client {
                        inner: Arc::new(Inner {
                            bootstrap: Mutex::new((addr.clone(), channel)),
                            seeds: seeds.clone(),
                            channels: Mutex::new(channels),
                            topics: Mutex::new(HashMap::new()),
                            refreshing: Mutex::new(HashMap::new()),
                            failing_over: std::sync::atomic::AtomicBool::new(false),
                            brokers: Mutex::new(HashMap::new()),
                            coordinators: Mutex::new(HashMap::new()),
                            options: options.clone(),
                        }),
                    });
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(ClientError::Connect {
            bootstrap: bootstrap.to_string(),
            reason: last,
        })
    }

    fn bootstrap_channel(&self) -> Channel {
        let b = self
            .inner
            .bootstrap
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        b.1.clone()
    }

    /// Answers (metadata of every topic, a topic of many partitions) may
    /// pass tonic's default 4 MiB: refused, they counted as a transport
    /// failure on every broker in turn.
    fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.bootstrap_channel()).max_decoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// Runs an admin call on the current broker, within
    /// [`ADMIN_CALL_TIMEOUT`] (none: a broker that kept the connection
    /// but never answered held the call for good). On a transport failure the
    /// client moves to another live broker; `idempotent` calls are then
    /// retried there once.
    async fn admin_call<R, T, F, Fut>(
        &self,
        idempotent: bool,
        req: R,
        call: F,
    ) -> Result<T, ClientError>
    where
        R: Clone,
        F: Fn(AdminClient<Channel>, tonic::Request<R>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let timed = |req: R| {
            let mut r = tonic::Request::new(req);
            r.set_timeout(ADMIN_CALL_TIMEOUT);
            r
        };
        match call(self.admin(), timed(req.clone())).await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => {
                let e = ClientError::from(status);
                if matches!(e, ClientError::Broker { .. }) {
                    return Err(e);
                }
                // Fails over to another broker; its own error is not ours.
                let _ = self.metadata(&[]).await;
                if !idempotent {
                    return Err(e);
                }
                Ok(call(self.admin(), timed(req)).await?.into_inner())
            }
        }
    }

    /// Every broker address worth trying for metadata: the current one,
    /// then the bootstrap list, then brokers learned from metadata.
    fn candidates(&self) -> Vec<String> {
        let mut out = vec![self
            .inner
            .bootstrap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()];
        out.extend(self.inner.seeds.iter().cloned());
        let brokers = self.inner.brokers.lock().unwrap_or_else(|e| e.into_inner());
        out.extend(brokers.values().cloned());
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| seen.insert(a.clone()));
        out
    }

    /// A channel to the broker at `addr` (created lazily, then reused).
    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = self
            .inner
            .options
            .wrap(endpoint(addr, &self.inner.options)?.connect_lazy());
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Refreshes and returns routing metadata for `topics` (all if empty).
    pub async fn metadata(&self, topics: &[String]) -> Result<pb::MetadataResponse, ClientError> {
        let request = pb::MetadataRequest {
            topics: topics.to_vec(),
        };
        let mut last = None;
        let mut resp = None;
        // A broker that stopped answering is replaced by the next one that
        // does, so routing survives the loss of the bootstrap broker.
        for addr in self.candidates() {
            let channel = self.channel(&addr)?;
            match ask_metadata(&channel, &request).await {
                Ok(r) => {
                    *self
                        .inner
                        .bootstrap
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = (addr, channel);
                    resp = Some(r);
                    break;
                }
                Err(e) => {
                    // A refusal is the cluster's answer; a broker that is
                    // starting or stopping is not: the next one is asked.
                    if matches!(e, ClientError::Broker { .. }) && !e.is_retriable() {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        let Some(resp) = resp else {
            return Err(last.unwrap_or_else(|| ClientError::Transport("no broker to ask".into())));
        };
        self.remember(&resp);
        Ok(resp)
    }

    /// Caches the brokers and topics of a metadata answer.
    fn remember(&self, resp: &pb::MetadataResponse) {
        let mut brokers = self.inner.brokers.lock().unwrap_or_else(|e| e.into_inner());
        for b in &resp.brokers {
            brokers.insert(b.id, b.address.clone());
        }
        let mut cache = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        for t in &resp.topics {
            let mut t = t.clone();
            // A broker whose metadata lags (failover to it, or one cut
            // off from the quorum) must not roll a partition's leader
            // back: of the same topic, the newer leader epoch is kept.
            if let Some((old, _)) = cache
                .get(&t.name)
                .filter(|(old, _)| old.topic_id == t.topic_id)
            {
                // Nor shrink its partition count (partitions are never
                // removed): keys would hash over the old count.
                if old.partitions.len() > t.partitions.len() {
                    t.partitions
                        .extend_from_slice(&old.partitions[t.partitions.len()..]);
                }
                // Partitions are listed by index (as the extension above
                // takes them).
                for p in &mut t.partitions {
                    if let Some(known) = old
                        .partitions
                        .get(p.partition as usize)
                        .filter(|o| o.partition == p.partition && o.leader_epoch > p.leader_epoch)
                    {
                        *p = known.clone();
                    }
                }
            }
            cache.insert(t.name.clone(), (t, now));
        }
    }

    /// A topic's description from the cache, fetching it when missing.
    pub async fn topic(&self, name: &str) -> Result<pb::TopicDescription, ClientError> {
        if let Some(t) = self.cached_topic(name) {
            return Ok(t);
        }
        let asked = std::time::Instant::now();
        let turn = self
            .inner
            .refreshing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let found = async {
            let mut last = turn.lock().await;
            if let Some(t) = self.cached_topic(name) {
                return Ok(t);
            }
            // A refresh that started after this task asked answers for
            // it too, whatever came of it (an error, an aged copy).
            if let Some((started, outcome)) = last.as_ref() {
                if *started >= asked {
                    return outcome.clone();
                }
            }
            let started = std::time::Instant::now();
            let found = self.refresh_topic(name).await;
            *last = Some((started, found.clone()));
            found
        }
        .await;
        // The last one out forgets the turn (topic names asked once do
        // not stay).
        let mut refreshing = self
            .inner
            .refreshing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&turn) <= 2 {
            refreshing.remove(name);
        }
        found
    }

    /// [`Client::topic`]'s refresh, on its turn.
    async fn refresh_topic(&self, name: &str) -> Result<pb::TopicDescription, ClientError> {
        let unknown = match self.metadata(&[name.to_string()]).await {
            Ok(_) => None,
            // A broker names a topic it does not know with this refusal
            // (it never answers leaving it out): the others are asked
            // below.
            Err(e) if e.code() == pb::ErrorCode::UnknownTopic => Some(e),
            Err(e) => {
                // Aged metadata still routes while no broker answers (a
                // rolling restart); refusals are not papered over.
                match self.aged_topic(name).filter(|_| e.is_retriable()) {
                    Some(t) => {
                        tracing::debug!(topic = name, error = %e, "metadata refresh failed; using the aged copy");
                        return Ok(t);
                    }
                    None => return Err(e),
                }
            }
        };
        if let Some(t) = self.cached_topic(name) {
            return Ok(t);
        }
        // The broker asked may not have applied a topic created a moment
        // ago through another one (its copy of the metadata lags by a
        // few ms): the others are asked before the topic counts as
        // unknown, as a Kafka producer waits for metadata naming it.
        // (Only an answer leaving the topic out reached this before, and
        // brokers never give one: a topic just created elsewhere failed
        // at once.)
        let request = pb::MetadataRequest {
            topics: vec![name.to_string()],
        };
        // All at once, within a short bound, the first to know it wins:
        // one after another, a dead broker still listed cost its connect
        // timeout, a stalled one the request timeout, each.
        // The first candidate is the broker that just answered.
        let others: Vec<String> = self.candidates().into_iter().skip(1).collect();
        let mut asks: futures_util::stream::FuturesUnordered<_> = others
            .iter()
            .filter_map(|addr| self.channel(addr).ok())
            .map(|channel| {
                let request = request.clone();
                async move { ask_metadata(&channel, &request).await }
            })
            .collect();
        let mut denied = false;
        let found = tokio::time::timeout(ELSEWHERE_WAIT, async {
            while let Some(answer) = futures_util::StreamExt::next(&mut asks).await {
                match answer {
                    Ok(resp) => {
                        if let Some(t) = resp.topics.iter().find(|t| t.name == name).cloned() {
                            self.remember(&resp);
                            return Some(t);
                        }
                        denied = true;
                    }
                    Err(e) if e.code() == pb::ErrorCode::UnknownTopic => denied = true,
                    Err(_) => {}
                }
            }
            None
        })
        .await;
        if let Ok(Some(t)) = found {
            return Ok(t);
        }
        let unknown = unknown.unwrap_or_else(|| ClientError::Broker {
            code: pb::ErrorCode::UnknownTopic,
            message: format!("unknown topic '{name}'"),
            leader: None,
        });
        // Unknown if no other broker is known, or another one said so
        // too. Otherwise the one broker that answered may only lag, and
        // none of the others could say: not "unknown", which a producer
        // takes as the topic gone.
        if others.is_empty() || denied {
            return Err(unknown);
        }
        match self.aged_topic(name) {
            Some(t) => Ok(t),
            None => Err(ClientError::Transport(format!(
                "topic '{name}' is unknown to one broker and no other answered in time"
            ))),
        }
    }

    /// A topic's partition count, from the cache when it holds the topic:
    /// the producer asks once per record, so this does not clone the
    /// whole description.
    pub async fn partition_count(&self, name: &str) -> Result<i32, ClientError> {
        let cached = {
            let cache = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .get(name)
                .filter(|(_, at)| at.elapsed() < METADATA_MAX_AGE)
                .map(|(t, _)| t.partitions.len() as i32)
        };
        match cached {
            Some(n) => Ok(n),
            None => Ok(self.topic(name).await?.partitions.len() as i32),
        }
    }

    /// A topic's partition count and the partitions without a leader, from
    /// the cache when it holds the topic (as [`Client::partition_count`]).
    pub(crate) async fn partition_layout(
        &self,
        name: &str,
    ) -> Result<(i32, Vec<i32>), ClientError> {
        let layout = |t: &pb::TopicDescription| {
            let offline = t
                .partitions
                .iter()
                .filter(|p| p.leader < 0)
                .map(|p| p.partition)
                .collect();
            (t.partitions.len() as i32, offline)
        };
        let cached = {
            let cache = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .get(name)
                .filter(|(_, at)| at.elapsed() < METADATA_MAX_AGE)
                .map(|(t, _)| layout(t))
        };
        match cached {
            Some(l) => Ok(l),
            None => Ok(layout(&self.topic(name).await?)),
        }
    }

    /// A cached description however old (also one invalidated).
    fn aged_topic(&self, name: &str) -> Option<pb::TopicDescription> {
        let cache = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(name).map(|(t, _)| t.clone())
    }

    fn cached_topic(&self, name: &str) -> Option<pb::TopicDescription> {
        let cache = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(name)
            .filter(|(_, at)| at.elapsed() < METADATA_MAX_AGE)
            .map(|(t, _)| t.clone())
    }

    /// Marks cached metadata of `topic` stale (after NOT_LEADER and the
    /// like): the next lookup asks the cluster. The stale copy is kept as
    /// the aged one to fall back on while no broker answers: removed, a
    /// producer's sends were refused at once during an outage (its
    /// retrying senders invalidate the topic) instead of waiting up to
    /// their delivery timeout.
    pub fn invalidate(&self, topic: &str) {
        let mut cache = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
        let stale = std::time::Instant::now()
            .checked_sub(METADATA_MAX_AGE + std::time::Duration::from_secs(1));
        match (cache.get_mut(topic), stale) {
            (Some((_, at)), Some(stale)) => *at = stale,
            _ => {
                cache.remove(topic);
            }
        }
    }

    /// Forgets cached metadata of `topic` altogether (it was deleted or
    /// created anew): no aged copy to fall back on.
    pub fn forget(&self, topic: &str) {
        let mut cache = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
        cache.remove(topic);
    }

    /// The channel to the leader of `topic`-`partition`.
    pub(crate) async fn leader(&self, topic: &str, partition: i32) -> Result<Channel, ClientError> {
        let mut t = self.topic(topic).await?;
        if !t.partitions.iter().any(|p| p.partition == partition) {
            // Cached before the topic grew (a group can be handed a new
            // partition before this client heard of it): read it again. A
            // refresh that fails is the error (retriable while no broker
            // answers), not UNKNOWN_PARTITION from the aged copy.
            self.invalidate(topic);
            self.metadata(&[topic.to_string()]).await?;
            t = self.topic(topic).await?;
        }
        let p = t
            .partitions
            .iter()
            .find(|p| p.partition == partition)
            .ok_or_else(|| ClientError::Broker {
                code: pb::ErrorCode::UnknownPartition,
                message: format!("topic '{topic}' has no partition {partition}"),
                leader: None,
            })?;
        let addr = {
            let brokers = self.inner.brokers.lock().unwrap_or_else(|e| e.into_inner());
            brokers.get(&p.leader).cloned()
        };
        match addr {
            Some(addr) => self.channel(&addr),
            None => Ok(self.bootstrap_channel()),
        }
    }

    /// A consumer client for `topic`-`partition`'s leader.
    pub(crate) async fn consumer_client(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<ConsumerClient<Channel>, ClientError> {
        Ok(ConsumerClient::new(self.leader(topic, partition).await?)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }

    /// Creates a topic. A `partitions` or `replication_factor` of -1
    /// takes the broker's default (`num_partitions`,
    /// `default_replication_factor`).
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        configs: BTreeMap<String, String>,
    ) -> Result<pb::TopicDescription, ClientError> {
        // Not retried (a lost answer's topic exists), but a broker that
        // went away is replaced for the next call, and the call is bounded.
        let resp = self
            .admin_call(
                false,
                pb::CreateTopicRequest {
                    name: name.to_string(),
                    partitions,
                    replication_factor,
                    configs: configs.into_iter().collect(),
                    validate_only: false,
                },
                |mut a, r| async move { a.create_topic(r).await },
            )
            .await?;
        // A copy cached of an earlier topic of this name (deleted by
        // another client) would route with the old topic's id: forgotten,
        // not kept as an aged copy.
        self.forget(name);
        resp.topic
            .ok_or_else(|| ClientError::Transport("create_topic answered no topic".into()))
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        self.admin_call(
            false,
            pb::DeleteTopicRequest {
                name: name.to_string(),
            },
            |mut a, r| async move { a.delete_topic(r).await },
        )
        .await?;
        self.forget(name);
        Ok(())
    }

    /// Lists topics.
    pub async fn list_topics(
        &self,
        include_internal: bool,
    ) -> Result<Vec<pb::TopicSummary>, ClientError> {
        Ok(self
            .admin_call(
                true,
                pb::ListTopicsRequest { include_internal },
                |mut a, r| async move { a.list_topics(r).await },
            )
            .await?
            .topics)
    }

    /// Describes a topic (fresh, not cached).
    pub async fn describe_topic(&self, name: &str) -> Result<pb::TopicDescription, ClientError> {
        self.admin_call(
            true,
            pb::DescribeTopicRequest {
                name: name.to_string(),
            },
            |mut a, r| async move { a.describe_topic(r).await },
        )
        .await
    }

    /// Grows a topic to `total_partitions`.
    pub async fn add_partitions(
        &self,
        name: &str,
        total_partitions: i32,
    ) -> Result<pb::TopicDescription, ClientError> {
        self.invalidate(name);
        self.admin_call(
            false,
            pb::AddPartitionsRequest {
                name: name.to_string(),
                total_partitions,
            },
            |mut a, r| async move { a.add_partitions(r).await },
        )
        .await
    }

    /// Sets and removes config overrides.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
    ) -> Result<pb::TopicDescription, ClientError> {
        self.alter_topic_config_checked(name, set, delete, false)
            .await
    }

    /// [`Client::alter_topic_config`], or with `validate_only` only its
    /// checks: the answer is the topic as it would be.
    pub async fn alter_topic_config_checked(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
        validate_only: bool,
    ) -> Result<pb::TopicDescription, ClientError> {
        self.admin_call(
            false,
            pb::AlterTopicConfigRequest {
                name: name.to_string(),
                set: set.into_iter().collect(),
                delete,
                validate_only,
            },
            |mut a, r| async move { a.alter_topic_config(r).await },
        )
        .await
    }

    /// Preferred (or unclean) leader election for `partitions` of `topic`
    /// (all when empty); returns the partitions whose leader moved.
    pub async fn elect_leaders(
        &self,
        topic: &str,
        partitions: Vec<i32>,
        unclean: bool,
    ) -> Result<Vec<i32>, ClientError> {
        let req = pb::ElectLeadersRequest {
            topic: topic.to_string(),
            partitions,
            r#type: if unclean {
                pb::ElectionType::Unclean
            } else {
                pb::ElectionType::Preferred
            } as i32,
        };
        let resp = self
            .admin_call(
                false,
                req,
                |mut a, r| async move { a.elect_leaders(r).await },
            )
            .await?;
        self.invalidate(topic);
        Ok(resp.changed)
    }

    /// Starts moving `topic`'s partitions to new replica lists (partition
    /// → replicas; an empty list cancels that partition's reassignment).
    pub async fn reassign_partitions(
        &self,
        topic: &str,
        assignments: Vec<(i32, Vec<i32>)>,
    ) -> Result<pb::TopicDescription, ClientError> {
        let req = pb::ReassignPartitionsRequest {
            topic: topic.to_string(),
            reassignments: assignments
                .into_iter()
                .map(|(partition, replicas)| pb::PartitionReassignment {
                    partition,
                    replicas,
                })
                .collect(),
        };
        let resp = self
            .admin_call(true, req, |mut a, r| async move {
                a.reassign_partitions(r).await
            })
            .await?;
        self.invalidate(topic);
        Ok(resp)
    }

    /// Describes the cluster.
    pub async fn describe_cluster(&self) -> Result<pb::ClusterDescription, ClientError> {
        self.admin_call(true, pb::DescribeClusterRequest {}, |mut a, r| async move {
            a.describe_cluster(r).await
        })
        .await
    }

    /// Looks an offset up.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: i32,
        spec: pb::OffsetSpec,
        timestamp_ms: i64,
    ) -> Result<pb::ListOffsetsResponse, ClientError> {
        // A new leader answers OFFSET_NOT_AVAILABLE until its high
        // watermark has caught up (after waiting 2 s itself): asked once
        // more before the caller hears (callers that loop over partitions
        // retry on their own; more tries stacked 8 s per partition).
        let mut tries = 0;
        loop {
            let mut c = self.consumer_client(topic, partition).await?;
            let answer = c
                .list_offsets(pb::ListOffsetsRequest {
                    topic: topic.to_string(),
                    partition,
                    spec: spec as i32,
                    timestamp_ms,
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|status| {
                    self.invalidate(topic);
                    ClientError::from(status)
                });
            match answer {
                Err(e) if e.code() == pb::ErrorCode::OffsetNotAvailable && tries < 1 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                answer => return answer,
            }
        }
    }

    /// Deletes `topic`-`partition`'s records below `offset` (-1: below
    /// the high watermark), on the partition's leader, and waits up to
    /// `timeout` until every in-sync replica has followed (zero: the
    /// broker's request timeout). Returns the low watermark and the
    /// offset used.
    pub async fn delete_records(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        timeout: Duration,
    ) -> Result<pb::DeleteRecordsResponse, ClientError> {
        let mut admin = AdminClient::new(self.leader(topic, partition).await?)
            .max_decoding_message_size(MESSAGE_BYTES_MAX);
        let mut request = tonic::Request::new(pb::DeleteRecordsRequest {
            topic: topic.to_string(),
            partition,
            offset,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        });
        // The broker answers within its timeout (30 s by default for 0).
        // Capped: a caller's Duration::MAX ("no limit") overflowed the
        // sums below, a panic.
        let wait = if timeout.is_zero() {
            Duration::from_secs(30)
        } else {
            timeout.min(LONGEST_WAIT)
        };
        request.set_timeout(wait + REQUEST_TIMEOUT);
        admin
            .delete_records(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| {
                self.invalidate(topic);
                ClientError::from(status)
            })
    }

    /// One fetch call.
    pub async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchResponse, ClientError> {
        let topic = req.topic.clone();
        let mut channel = self.leader(&topic, req.partition).await?;
        let wait = Duration::from_millis(u64::from(req.max_wait_ms));
        // Framed by `crate::rpc`: the answer's batches are decoded as
        // slices of the received frames, not joined into tonic's buffer.
        let call = crate::rpc::call_unary(
            &mut channel,
            crate::service::FETCH_PATH,
            req,
            MESSAGE_BYTES_MAX,
        );
        let answer = match tokio::time::timeout(wait + REQUEST_TIMEOUT, call).await {
            Ok(answer) => answer,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no fetch answer from {topic}'s leader within {:?}",
                wait + REQUEST_TIMEOUT
            ))),
        };
        answer.map_err(|status| {
            // Leadership may have moved: route afresh next time.
            self.invalidate(&topic);
            ClientError::from(status)
        })
    }

    /// Opens a subscription to one partition's leader: it sends record
    /// chunks from `req.offset` on, reading the next while the last is on
    /// its way, until the stream is dropped or fails.
    pub(crate) async fn subscribe(
        &self,
        req: pb::SubscribeRequest,
    ) -> Result<consumer::Subscription, ClientError> {
        let topic = req.topic.clone();
        let mut channel = self.leader(&topic, req.partition).await?;
        // Framed by `crate::rpc`, like `fetch`.
        let call = crate::rpc::call_stream(
            &mut channel,
            crate::service::SUBSCRIBE_PATH,
            tokio_stream::once(req),
            MESSAGE_BYTES_MAX,
        );
        let opened = match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(opened) => opened,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no subscribe answer from {topic}'s leader within {REQUEST_TIMEOUT:?}"
            ))),
        };
        opened.map_err(|status| {
            self.invalidate(&topic);
            ClientError::from(status)
        })
    }

    /// A fresh idempotent-producer id and epoch from the cluster. Retried
    /// with backoff (and broker failover) while the error is retriable,
    /// up to `timeout`.
    pub async fn init_producer_id(&self, timeout: Duration) -> Result<(i64, i16), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout.min(LONGEST_WAIT);
        let mut backoff = Duration::from_millis(50);
        let timed_out = || ClientError::Broker {
            code: pb::ErrorCode::RequestTimedOut,
            message: format!("no producer id within {timeout:?}"),
            leader: None,
        };
        loop {
            let mut c = ProducerClient::new(self.bootstrap_channel());
            // Each try within the deadline too: it was only looked at
            // after a failure, and a try or a refresh could outlast it
            // by tens of seconds.
            let attempt = c.init_producer_id(pb::InitProducerIdRequest {});
            let result = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(r) => r.map(|r| r.into_inner()).map_err(ClientError::from),
                Err(_) => return Err(timed_out()),
            };
            match result {
                Ok(r) => return Ok((r.producer_id, r.producer_epoch as i16)),
                Err(e) if e.is_retriable() && tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!(error = %e, "InitProducerId failed; retrying");
                    // Another broker may answer: refresh the broker list.
                    let _ = tokio::time::timeout_at(deadline, self.metadata(&[])).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts a batching producer.
    pub fn producer(&self, config: ProducerConfig) -> Producer {
        Producer::start(self.clone(), config)
    }

    /// A consumer of one partition, starting at `from`.
    pub async fn partition_consumer(
        &self,
        topic: &str,
        partition: i32,
        from: StartFrom,
    ) -> Result<PartitionConsumer, ClientError> {
        PartitionConsumer::new(self.clone(), topic, partition, from).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_tls_a_plain_http_address_is_refused() {
        let options = ClientOptions {
            tls: Some(ClientTls {
                ca_file: None,
                cert_file: None,
                key_file: None,
            }),
            ..ClientOptions::default()
        };
        let err = endpoint("http://127.0.0.1:9092", &options).unwrap_err();
        assert!(err.to_string().contains("not https"), "{err}");
        // Past the scheme, TLS without a CA is refused by name.
        for addr in ["https://127.0.0.1:9092", "127.0.0.1:9092"] {
            let err = endpoint(addr, &options).unwrap_err();
            assert!(err.to_string().contains("--tls-ca"), "{addr}: {err}");
        }
        endpoint("http://127.0.0.1:9092", &ClientOptions::default()).unwrap();
    }
}
