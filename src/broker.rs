//! The broker core: routes client requests to the partitions this node
//! hosts, and keeps the set of hosted partitions in step with the cluster
//! metadata. The gRPC services in [`crate::service`] are thin wrappers.
//!
//! Produce path: pick the partition (explicit, murmur2 of the key, or
//! round-robin) → check leadership and min.insync.replicas → encode or
//! accept the batch → `Log::append_as_leader` on a blocking thread →
//! advance the high watermark (a single-replica ISR is the leader alone)
//! → answer. Fetch path: check the offset against [log start, high
//! watermark] → wait on the high-watermark watch when caught up → read
//! whole stored batches → send them raw or decoded.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use runnel_controller::metadata::Applied;
use runnel_controller::store::random_id;
use runnel_controller::{
    topic_config, ClusterMetadata, MetadataCommand, MetadataError, MetadataStore, TopicInfo,
};
use runnel_proto::v1 as pb;
use runnel_replication::Command as ReplicationCommand;
use runnel_storage::{BatchBuilder, LogManager, RecordBatch, StorageError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::config::ServerConfig;
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::partition::{log_config, Partition};
use crate::partitioner::partition_for_key;
use crate::replica::fetcher::{Assignment, Assignments, ReplicaSettings};
use crate::replica::FetcherManager;

/// Default fetch size when the request says 0.
pub(crate) const FETCH_BYTES_DEFAULT: usize = 1024 * 1024;
/// Room a structured fetch answer keeps for all but its records (topic,
/// partition, offsets, and the gRPC frame).
const ANSWER_ENVELOPE_BYTES: usize = 1024;
/// Producer ids a broker takes from the controller at a time.
const PRODUCER_ID_BLOCK: i32 = 1000;
/// Most peer channels kept ([`Broker::peer_channel`]).
const PEER_CHANNELS_MAX: usize = 256;
/// How long a peer channel is used before it is made afresh.
const PEER_CHANNEL_AGE_MAX: Duration = Duration::from_secs(300);
/// How long a leader waits for its metadata to show a producer id's
/// allocation before calling the id unknown.
const PRODUCER_ID_METADATA_WAIT: Duration = Duration::from_secs(2);

/// The most replicas a reassignment may list for one partition (each
/// must be a distinct broker; the state machine checks the rest).
const REPLICAS_LISTED_MAX: usize = 1_000;

/// This broker's block of producer ids.
#[derive(Debug, Default)]
struct ProducerIds {
    /// The next id to hand out.
    next: i64,
    /// One past the block's last id.
    end: i64,
    /// When the last allocation of a block failed.
    failed_at: Option<Instant>,
}

/// The longest ListOffsets waits for a new leader's high watermark to
/// reach where its leadership started before answering
/// OFFSET_NOT_AVAILABLE.
const SETTLE_WAIT: Duration = Duration::from_secs(2);

/// Whether this broker's metadata explains the controller's refusal of
/// an ISR proposal of `proposed` to partition epoch `proposed_epoch`:
/// the epoch moved on, or a broker the proposal adds is fenced. If not,
/// the metadata lags the controller's (its wait for the refusal to be
/// applied here is bounded), which refused a stale epoch, perhaps moved
/// on by this very proposal's first copy, committed after its answer
/// timed out. Such a refusal is taken as unanswered: the proposal stays
/// in flight until the metadata shows the new epoch. Taken as a refusal,
/// the leader went back to the ISR of the old epoch, without the
/// follower it added, and the high watermark could pass that follower's
/// log end while the controller counted it in sync.
fn refusal_explained(
    meta: &ClusterMetadata,
    info: &runnel_controller::metadata::PartitionInfo,
    proposed: &[i32],
    proposed_epoch: i32,
) -> bool {
    info.partition_epoch != proposed_epoch
        || proposed
            .iter()
            .any(|r| !info.isr.contains(r) && meta.brokers.get(r).is_none_or(|b| b.fenced))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// An appended batch whose producer may still wait for replicas.
#[derive(Debug)]
pub struct Appended {
    response: pb::ProduceResponse,
    wait: Option<ReplicaWait>,
}

/// What acks=all waits for.
#[derive(Debug)]
struct ReplicaWait {
    partition: Arc<Partition>,
    hw_rx: watch::Receiver<i64>,
    end: i64,
    min_isr: i32,
    leader_epoch: i32,
    timeout_ms: u64,
}

/// One broker node.
pub struct Broker {
    node_id: i32,
    config: ServerConfig,
    metadata: Arc<dyn MetadataStore>,
    logs: LogManager,
    /// Hosted partitions by (topic, index). Short critical sections only.
    partitions: RwLock<HashMap<(String, i32), Arc<Partition>>>,
    /// Broker-wide topic config defaults.
    topic_defaults: BTreeMap<String, String>,
    /// Round-robin cursor for keyless produce requests.
    round_robin: AtomicU32,
    /// Cancelled at shutdown; long polls end early.
    shutdown: CancellationToken,
    /// Follower-side fetcher tasks.
    fetchers: FetcherManager,
    /// Bumped after every append; replica fetches long-poll on it.
    appended: Arc<watch::Sender<u64>>,
    /// Producer ids this broker may still hand out: `next..end`, from a
    /// block the controller allocated. The lock also serialises refills.
    producer_ids: tokio::sync::Mutex<ProducerIds>,
    /// Event metrics (counters, latency histograms).
    metrics: Arc<Metrics>,
    /// The topics of the metadata last reconciled: a topic gone from it
    /// loses its metric series on every broker, hosting it or not.
    known_topics: Mutex<HashSet<String>>,
    /// Channels to other brokers' client ports, by address, for the
    /// calls a broker makes on a client's behalf (offsets of partitions
    /// led elsewhere, groups coordinated elsewhere). A tonic channel
    /// reconnects by itself; one connection per call cost a handshake
    /// (TLS included) each time, a scrape's worth of them per group.
    /// Each is made afresh after [`PEER_CHANNEL_AGE_MAX`], so that TLS
    /// files rotated since are used.
    peers: Mutex<HashMap<String, (Instant, tonic::transport::Channel)>>,
    /// Authentication, ACLs and quotas; unset = everything allowed.
    security: std::sync::OnceLock<Arc<crate::security::Security>>,
    /// Cancelled when a hosted log failed (see [`Broker::failed`]).
    failed: CancellationToken,
    /// Set by [`Broker::start`], once this broker registered and its
    /// metadata caught up with its registration. Until then the metadata
    /// replayed from disk may still name this broker leader in an epoch
    /// the quorum has moved past: nothing takes up a role from it.
    started: std::sync::atomic::AtomicBool,
    /// Held by [`Broker::reconcile`]: one runs at a time.
    reconciling: Mutex<()>,
    /// A reconcile asked for by [`Broker::request_reconcile`] has not
    /// started yet.
    reconcile_requested: std::sync::atomic::AtomicBool,
    /// This broker, for work handed to the blocking pool.
    me: std::sync::Weak<Broker>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl Broker {
    /// Opens the logs under the data directory. Call [`Broker::start`]
    /// once the metadata store has a leader and this broker registered.
    pub fn open(
        config: ServerConfig,
        logs: LogManager,
        metadata: Arc<dyn MetadataStore>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let topic_defaults = config.topic_defaults();
        Arc::new_cyclic(|weak| Self {
            node_id: config.node_id,
            metadata,
            logs,
            partitions: RwLock::new(HashMap::new()),
            topic_defaults,
            round_robin: AtomicU32::new(0),
            fetchers: FetcherManager::new(weak.clone(), shutdown.clone()),
            shutdown,
            appended: Arc::new(watch::channel(0).0),
            producer_ids: tokio::sync::Mutex::new(ProducerIds::default()),
            metrics: Arc::new(Metrics::new()),
            known_topics: Mutex::new(HashSet::new()),
            peers: Mutex::new(HashMap::new()),
            security: std::sync::OnceLock::new(),
            failed: CancellationToken::new(),
            started: std::sync::atomic::AtomicBool::new(false),
            reconciling: Mutex::new(()),
            reconcile_requested: std::sync::atomic::AtomicBool::new(false),
            me: weak.clone(),
            config,
        })
    }

    /// A channel to the broker at `addr` (its client port), kept for the
    /// next call and connected on first use, so that calls made at once
    /// share one connection attempt; `None` when the address or the TLS
    /// files are unusable.
    pub fn peer_channel(&self, addr: &str) -> Option<tonic::transport::Channel> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((made, c)) = peers.get(addr) {
            if made.elapsed() < PEER_CHANNEL_AGE_MAX {
                return Some(c.clone());
            }
        }
        let channel = crate::security::peer_channel(&self.config, addr)?;
        // Brokers that moved leave their old addresses: kept few.
        if peers.len() >= PEER_CHANNELS_MAX {
            peers.clear();
        }
        peers.insert(addr.to_string(), (Instant::now(), channel.clone()));
        Some(channel)
    }

    /// Opens (and recovers) every partition log in the data directory,
    /// for [`Broker::open`].
    pub fn open_logs(config: &ServerConfig) -> Result<LogManager, BrokerError> {
        let defaults = log_config(&config.topic_defaults());
        Ok(LogManager::open(&config.data_dir, defaults)?)
    }

    /// Takes up the partitions the metadata assigns to this broker and
    /// follows every later metadata change.
    ///
    /// A partition that cannot be taken up (a log that fails to open or
    /// to be deleted) is logged and tried again at the next metadata
    /// change, as it is while running: the others are served. Stopping
    /// the node here made one bad partition stop it at every start. But
    /// one this broker leads while other replicas are in sync stops the
    /// start: nobody would serve it (the followers fetch from this broker,
    /// and no leader shrinks the ISR), whereas a node that stops is fenced
    /// and its leaderships move; started again, it no longer leads it.
    pub fn start(self: &Arc<Self>) -> Result<(), BrokerError> {
        self.started.store(true, Ordering::Release);
        if let Err(e) = self.reconcile() {
            let meta = self.metadata.current();
            let stranded = meta.topics.iter().find_map(|(name, t)| {
                t.partitions.iter().enumerate().find_map(|(i, p)| {
                    (p.leader == self.node_id
                        && p.isr.iter().any(|r| *r != self.node_id)
                        && self.hosted(name, i as i32).is_none())
                    .then(|| format!("{name}-{i}"))
                })
            });
            if let Some(partition) = stranded {
                warn!(%partition, error = %e, "a partition this broker leads cannot be taken up; stopping so that another in-sync replica leads it");
                return Err(e);
            }
            warn!(error = %e, "taking up the partitions at start failed for some of them");
        }
        self.clone().spawn_metadata_watcher();
        Ok(())
    }

    /// Follows metadata changes made anywhere in the cluster.
    fn spawn_metadata_watcher(self: Arc<Self>) {
        let mut rx = self.metadata.watch();
        let shutdown = self.shutdown.clone();
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                let Some(broker) = weak.upgrade() else { return };
                if let Err(e) = broker.reconcile_off_workers().await {
                    warn!(error = %e, "applying metadata change failed");
                }
            }
        });
    }

    /// Resolves when the broker begins to stop: long-lived streams end
    /// then, so the listener's drain is not held open by them.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.shutdown.cancelled()
    }

    /// Whether the broker has begun to stop.
    pub fn is_stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// This node's event metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Every hosted partition replica, whatever its role.
    pub fn hosted_partitions(&self) -> Vec<Arc<Partition>> {
        let map = self.partitions.read().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }

    /// A hosted partition replica, whatever its role.
    pub fn hosted_partition(&self, topic: &str, index: i32) -> Option<Arc<Partition>> {
        self.hosted(topic, index)
    }

    /// A receiver bumped after every leader append on this broker (what
    /// a waiting replica fetch can read; a follower's appends are not:
    /// nothing fetches a partition from a follower).
    pub fn watch_appends(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Cap on long-poll waits (ms).
    pub fn fetch_wait_max_ms(&self) -> u64 {
        self.config.broker.fetch_wait_max_ms
    }

    /// Whether the test failpoint `name` is on (see `[broker] failpoints`).
    pub fn failpoint(&self, name: &str) -> bool {
        self.config.broker.failpoints && self.config.data_dir.join("failpoints").join(name).exists()
    }

    /// A one-shot failpoint: true once per creation of its file.
    pub fn take_failpoint(&self, name: &str) -> bool {
        self.config.broker.failpoints
            && std::fs::remove_file(self.config.data_dir.join("failpoints").join(name)).is_ok()
    }

    /// Refuses a producer id the cluster never allocated. The id may have
    /// been handed out by another broker whose allocation this broker's
    /// metadata has not applied yet, so it waits a moment for it first.
    /// Past that, only the active controller (whose copy holds every
    /// allocation it answered) calls the id unknown; elsewhere the copy
    /// may still be behind, and the refusal is retriable: UNKNOWN_PRODUCER_ID
    /// failed a valid producer's first batch for good.
    async fn await_producer_id(&self, producer_id: i64) -> Result<(), BrokerError> {
        let mut rx = self.metadata.watch();
        let wait = async {
            loop {
                if rx.borrow_and_update().next_producer_id > producer_id {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        match tokio::time::timeout(PRODUCER_ID_METADATA_WAIT, wait).await {
            Ok(true) => Ok(()),
            _ if self.metadata.controller_id() == self.node_id() => {
                Err(BrokerError::UnknownProducerId { producer_id })
            }
            _ => Err(BrokerError::ProducerIdNotApplied { producer_id }),
        }
    }

    /// A fresh producer id (epoch 0) for an idempotent producer, from this
    /// broker's block; a new block comes from the controller when it runs
    /// out. A block lost with a restart is simply never used.
    pub async fn init_producer_id(&self) -> Result<pb::InitProducerIdResponse, BrokerError> {
        let asked = Instant::now();
        let mut ids = self.producer_ids.lock().await;
        if ids.next >= ids.end {
            // Another caller's allocation failed while this one waited
            // for the lock: refused at once too. Each asked the controller
            // in turn, the k-th waiting k submit timeouts (10 s each)
            // during an outage.
            if ids.failed_at.is_some_and(|t| t >= asked) {
                return Err(BrokerError::Metadata(MetadataError::NotController {
                    leader_hint: None,
                    waited_ms: asked.elapsed().as_millis() as u64,
                }));
            }
            let applied = self
                .metadata
                .submit(MetadataCommand::AllocateProducerIds {
                    broker_id: self.node_id,
                    count: PRODUCER_ID_BLOCK,
                })
                .await;
            let applied = match applied {
                Ok(applied) => applied,
                Err(e) => {
                    ids.failed_at = Some(Instant::now());
                    return Err(e.into());
                }
            };
            let Applied::ProducerIds { first, count } = applied else {
                return Err(BrokerError::InvalidRequest {
                    reason: format!("unexpected controller answer {applied:?}"),
                });
            };
            info!(first, count, "allocated producer id block");
            ids.next = first;
            ids.end = first + i64::from(count);
        }
        let producer_id = ids.next;
        ids.next += 1;
        Ok(pb::InitProducerIdResponse {
            producer_id,
            producer_epoch: 0,
        })
    }

    /// Follower-side settings.
    pub fn replica_settings(&self) -> ReplicaSettings {
        let b = &self.config.broker;
        ReplicaSettings {
            replica_id: self.node_id,
            fetch_bytes_max: b.replica_fetch_bytes_max,
            fetch_wait_max_ms: b.replica_fetch_wait_max_ms,
            bytes_per_sec_max: b.replication_bytes_per_sec_max,
        }
    }

    /// Sends ISR proposals to the controller; a refusal resets the leader
    /// to the committed ISR, a success arrives through the metadata.
    pub fn propose_isr_changes(
        &self,
        partition: &Arc<Partition>,
        proposals: Vec<ReplicationCommand>,
    ) {
        for cmd in proposals {
            // Sent with the epochs of the ISR the leader changed, not the
            // ones current now: if the partition moved on meanwhile, the
            // controller refuses the proposal instead of applying a
            // change made to an older ISR.
            let ReplicationCommand::ProposeIsr {
                isr,
                leader_epoch,
                partition_epoch,
            } = cmd
            else {
                continue;
            };
            let command = MetadataCommand::AlterPartitionIsr {
                topic: partition.topic.clone(),
                topic_id: partition.topic_id.clone(),
                partition: partition.index,
                leader_id: self.node_id,
                leader_epoch,
                partition_epoch,
                isr: isr.clone(),
            };
            let store = self.metadata.clone();
            let partition = partition.clone();
            info!(topic = %partition.topic, partition = partition.index, leader_epoch, partition_epoch, to = ?isr, "proposing ISR change");
            tokio::spawn(async move {
                match store.submit(command).await {
                    Ok(_) => {}
                    Err(
                        e @ (MetadataError::InvalidIsrChange { .. }
                        | MetadataError::UnknownTopic { .. }),
                    ) => {
                        warn!(topic = %partition.topic, partition = partition.index, error = %e, "ISR change refused");
                        // The ISR committed now, not the one the proposal
                        // started from: metadata may have moved on meanwhile.
                        let meta = store.current();
                        if let Some(info) = meta
                            .topics
                            .get(&partition.topic)
                            .and_then(|t| t.partitions.get(partition.index as usize))
                        {
                            if refusal_explained(&meta, info, &isr, partition_epoch) {
                                partition.isr_refused(
                                    (&isr, partition_epoch),
                                    &info.isr,
                                    info.partition_epoch,
                                );
                            } else {
                                partition.isr_unknown(&isr, partition_epoch);
                            }
                        }
                    }
                    Err(e) => {
                        // Not refused: it may still commit (a timeout), or
                        // never reached the quorum. Sent again on the next
                        // tick unless the metadata settles it first.
                        warn!(topic = %partition.topic, partition = partition.index, error = %e, "ISR change not answered; proposing it again");
                        partition.isr_unknown(&isr, partition_epoch);
                    }
                }
            });
        }
    }

    /// Cancelled once a hosted partition's log has failed (it closed
    /// itself after an I/O error): the server then stops as on SIGTERM,
    /// with an error.
    pub fn failed(&self) -> &CancellationToken {
        &self.failed
    }

    /// This node's id.
    pub fn node_id(&self) -> i32 {
        self.node_id
    }

    /// The security checks, when the server installed them.
    pub fn security(&self) -> Option<&Arc<crate::security::Security>> {
        self.security.get()
    }

    /// Installs the security checks (once, at start).
    pub fn set_security(&self, security: Arc<crate::security::Security>) {
        let _ = self.security.set(security);
    }

    /// This node's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The metadata store.
    pub fn metadata(&self) -> &Arc<dyn MetadataStore> {
        &self.metadata
    }

    /// Effective configs of a topic. `__consumer_offsets` is kept
    /// forever whatever the broker-wide defaults say (it has no
    /// compaction yet: retention would drop groups' last commits), also
    /// when it was created before it carried that override itself.
    pub fn effective_configs(&self, topic: &TopicInfo) -> BTreeMap<String, String> {
        let mut configs = topic_config::effective(&self.topic_defaults, &topic.configs);
        if topic.name == crate::group::OFFSETS_TOPIC {
            for key in ["retention.ms", "retention.bytes"] {
                configs.insert(key.to_string(), "-1".to_string());
            }
        }
        configs
    }

    /// Opens logs for partitions this node now hosts, applies config
    /// changes, and deletes logs of partitions it no longer hosts. Does
    /// nothing before [`Broker::start`].
    pub fn reconcile(&self) -> Result<(), BrokerError> {
        if !self.started.load(Ordering::Acquire) {
            return Ok(());
        }
        // One at a time (the metadata watcher's and an admin call's): the
        // logs are opened outside the partitions' lock, below. Taken
        // before the metadata is read, so a reconcile that waited cannot
        // apply an older view after a newer one (deleting the logs of a
        // topic created in between).
        let _serial = self.reconciling.lock().unwrap_or_else(|e| e.into_inner());
        let meta = self.metadata.current();
        let mut wanted: HashMap<(String, i32), &TopicInfo> = HashMap::new();
        for topic in meta.topics.values() {
            for (i, p) in topic.partitions.iter().enumerate() {
                if p.replicas.contains(&self.node_id) {
                    wanted.insert((topic.name.clone(), i as i32), topic);
                }
            }
        }
        // One config per topic, not per partition: with many partitions
        // this loop runs on every metadata change.
        let mut configs: HashMap<String, runnel_storage::LogConfig> = HashMap::new();
        // A partition whose log cannot be opened (disk full, I/O error) is
        // left out, and the error reported once the others have taken up
        // their roles: one bad log must not stop this broker from giving
        // up leaderships, leading or following everywhere else.
        let mut first_error: Option<BrokerError> = None;
        let mut config_of = |topic: &TopicInfo| match configs.get(&topic.name) {
            Some(c) => c.clone(),
            None => {
                let c = log_config(&self.effective_configs(topic));
                configs.insert(topic.name.clone(), c.clone());
                c
            }
        };
        // Logs are created and opened (files written and fsynced) without
        // the partitions' lock, which every produce and fetch takes to
        // find its partition: held through a topic's creation, it stopped
        // them all.
        let missing: Vec<(&(String, i32), &TopicInfo)> = {
            let map = self.partitions.read().unwrap_or_else(|e| e.into_inner());
            wanted
                .iter()
                .filter(|(key, topic)| map.get(*key).is_none_or(|p| p.topic_id != topic.topic_id))
                .map(|(key, topic)| (key, *topic))
                .collect()
        };
        let mut opened = Vec::new();
        let mut unopened = Vec::new();
        for ((name, index), topic) in missing {
            let config = config_of(topic);
            match self
                .logs
                .get_or_create_for(name, *index, &topic.topic_id, config.clone())
            {
                Ok(log) => {
                    log.set_config(config);
                    info!(topic = %name, partition = index, log_end_offset = log.log_end_offset(), "hosting partition");
                    opened.push((
                        (name.clone(), *index),
                        Arc::new(Partition::new(
                            name.clone(),
                            *index,
                            topic.topic_id.clone(),
                            log,
                        )),
                    ));
                }
                Err(e) => {
                    warn!(topic = %name, partition = index, error = %e, "cannot open the partition's log; not hosting it");
                    unopened.push((name.clone(), *index));
                    first_error.get_or_insert(e.into());
                }
            }
        }
        // Replicas this broker stops hosting (a deleted or recreated
        // topic, a reassignment away): retired once the lock is released.
        let mut dropped: Vec<Arc<Partition>> = Vec::new();
        let hosted: Vec<Hosted<'_>> = {
            let mut map = self.partitions.write().unwrap_or_else(|e| e.into_inner());
            let fresh: HashSet<(String, i32)> = opened.iter().map(|(k, _)| k.clone()).collect();
            for (key, partition) in opened {
                dropped.extend(map.insert(key, partition));
            }
            for key in &unopened {
                // Not the log of an earlier topic of this name.
                dropped.extend(map.remove(key));
            }
            map.retain(|key, p| {
                let keep = wanted.contains_key(key);
                if !keep {
                    dropped.push(p.clone());
                }
                keep
            });
            wanted
                .iter()
                .filter_map(|(key, topic)| {
                    let p = map.get(key)?.clone();
                    Some((key, *topic, p, fresh.contains(key)))
                })
                .collect()
        };
        for partition in dropped {
            partition.retire();
        }
        let now = now_ms();
        let mut by_leader: HashMap<i32, (String, Assignments)> = HashMap::new();
        let mut proposals = Vec::new();
        for (key, topic, partition, fresh) in hosted {
            if !fresh {
                partition.log.set_config(config_of(topic));
            }
            let Some(info) = topic.partitions.get(key.1 as usize) else {
                continue;
            };
            let cmds = partition.update_role(self.node_id, info, now);
            if !cmds.is_empty() {
                proposals.push((partition.clone(), cmds));
            }
            if info.leader >= 0 && info.leader != self.node_id {
                if let Some(b) = meta.brokers.get(&info.leader) {
                    by_leader
                        .entry(info.leader)
                        .or_insert_with(|| {
                            // Its internal listener, when it runs one.
                            let addr = meta.internal_address(b.id).unwrap_or(&b.address);
                            (addr.to_string(), BTreeMap::new())
                        })
                        .1
                        .insert(
                            key.clone(),
                            Assignment {
                                partition: partition.clone(),
                                leader_epoch: info.leader_epoch,
                                in_sync: info.isr.contains(&self.node_id),
                            },
                        );
                }
            }
        }
        self.fetchers.assign(by_leader);
        for (partition, cmds) in proposals {
            self.propose_isr_changes(&partition, cmds);
        }
        for (topic, index, _) in self.logs.all() {
            if !wanted.contains_key(&(topic.clone(), index)) {
                info!(%topic, partition = index, "deleting partition no longer hosted");
                if let Err(e) = self.logs.delete(&topic, index) {
                    warn!(%topic, partition = index, error = %e, "cannot delete the partition's log");
                    first_error.get_or_insert(e.into());
                }
            }
        }
        let now: HashSet<String> = meta.topics.keys().cloned().collect();
        let mut known = self.known_topics.lock().unwrap_or_else(|e| e.into_inner());
        for gone in known.difference(&now) {
            self.metrics.forget_topic(gone);
        }
        *known = now;
        first_error.map_or(Ok(()), Err)
    }

    /// [`Broker::reconcile`] after an admin change this broker
    /// committed: the change is done whatever this broker's logs do, so
    /// an error here (a log that cannot be opened) is logged, not handed
    /// to the client as the change's failure; the metadata watcher tries
    /// again on the next change.
    async fn reconcile_after_change(&self) {
        if let Err(e) = self.reconcile_off_workers().await {
            warn!(error = %e, "applying the metadata change to this broker's logs failed");
        }
    }

    /// [`Broker::reconcile`] on the blocking pool: it creates, fsyncs and
    /// deletes files, and waits for log writers mid-fsync; on a runtime
    /// worker (two on this machine) it held up every request and the Raft
    /// heartbeats while a topic of many partitions was created.
    async fn reconcile_off_workers(&self) -> Result<(), BrokerError> {
        let Some(me) = self.me.upgrade() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || me.reconcile())
            .await
            .map_err(|_| BrokerError::ShuttingDown)?
    }

    fn hosted(&self, topic: &str, index: i32) -> Option<Arc<Partition>> {
        let map = self.partitions.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(topic.to_string(), index)).cloned()
    }

    /// Checks that this broker leads `topic`-`index` and returns it.
    fn leader_partition(
        &self,
        meta: &ClusterMetadata,
        topic: &str,
        index: i32,
    ) -> Result<Arc<Partition>, BrokerError> {
        let info = meta
            .topics
            .get(topic)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: topic.to_string(),
            })?;
        let pinfo = usize::try_from(index)
            .ok()
            .and_then(|i| info.partitions.get(i))
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: topic.to_string(),
                partition: index,
                partitions: info.partitions.len() as i32,
            })?;
        if pinfo.leader == -1 {
            return Err(BrokerError::PartitionOffline {
                topic: topic.to_string(),
                partition: index,
            });
        }
        if pinfo.leader != self.node_id {
            let leader = meta
                .brokers
                .get(&pinfo.leader)
                .map(|b| b.address.clone())
                .unwrap_or_default();
            return Err(BrokerError::NotLeader {
                topic: topic.to_string(),
                partition: index,
                leader,
            });
        }
        match self.hosted(topic, index) {
            // Only the replica that took up this very leadership: the
            // topic as it is now (not a deleted one of the same name whose
            // log reconcile has not dropped yet), in the metadata's leader
            // epoch (not a follower's, or an earlier leadership's, whose
            // appends an acks=all wait then refused as NOT_LEADER after
            // they were written: a retry wrote them again).
            Some(p)
                if p.topic_id == info.topic_id && p.leader_epoch() == Some(pinfo.leader_epoch) =>
            {
                Ok(p)
            }
            _ if !self.started.load(Ordering::Acquire) => Err(BrokerError::Starting),
            _ => {
                // Led here by the metadata, not taken up yet (the watcher's
                // reconcile is opening the logs or changing the role, or a
                // log failed to open).
                // Not reconciled inline: on a runtime worker that waited
                // for the reconcile under way, and two such requests
                // stopped every request and the Raft heartbeats. A
                // reconcile is asked for, and the client retries.
                self.request_reconcile();
                Err(BrokerError::TakingUp {
                    topic: topic.to_string(),
                    partition: index,
                })
            }
        }
    }

    /// Starts a reconcile on the blocking pool unless one asked for this
    /// way is still waiting to start (requests for a partition being taken
    /// up come in floods: one reconcile serves them all).
    fn request_reconcile(&self) {
        if self.reconcile_requested.swap(true, Ordering::AcqRel) {
            return;
        }
        let (Some(me), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current())
        else {
            self.reconcile_requested.store(false, Ordering::Release);
            return;
        };
        runtime.spawn_blocking(move || {
            me.reconcile_requested.store(false, Ordering::Release);
            if let Err(e) = me.reconcile() {
                warn!(error = %e, "taking up partitions failed");
            }
        });
    }

    /// Appends a batch and waits as `acks` asks; see the module docs.
    pub async fn produce(
        &self,
        req: pb::ProduceRequest,
    ) -> Result<pb::ProduceResponse, BrokerError> {
        let appended = self.produce_append(req).await?;
        self.produce_complete(appended).await
    }

    /// The second half of a produce: waits for the replicas when acks=all.
    /// Streams call it concurrently for many appended batches, so one
    /// batch's replication wait does not hold back the next append.
    pub async fn produce_complete(
        &self,
        appended: Appended,
    ) -> Result<pb::ProduceResponse, BrokerError> {
        if let Some(mut w) = appended.wait {
            let started = std::time::Instant::now();
            let waited = self
                .wait_for_replicas(
                    &w.partition,
                    &mut w.hw_rx,
                    w.end,
                    w.min_isr,
                    w.leader_epoch,
                    w.timeout_ms,
                )
                .await;
            self.metrics.replica_wait(started.elapsed());
            if let Err(e) = waited {
                self.metrics.request_error("produce", e.code());
                return Err(e);
            }
        }
        Ok(appended.response)
    }

    /// The first half of a produce: checks, appends, and returns what is
    /// left to wait for. Batches of one stream are appended in order.
    pub async fn produce_append(&self, req: pb::ProduceRequest) -> Result<Appended, BrokerError> {
        // Only topics that exist get a series: clients cannot grow the
        // label set with made-up names (their errors count by code).
        if self.metadata.current().topics.contains_key(&req.topic) {
            self.metrics.produce_request(&req.topic);
        }
        let appended = self.append(req).await;
        if let Err(e) = &appended {
            self.metrics.request_error("produce", e.code());
        }
        appended
    }

    // Per-request spans are debug level: at the default INFO filter they
    // are disabled at their call site, and the fmt layer does not format
    // their fields for every batch.
    #[instrument(level = "debug", skip_all, fields(topic = %req.topic, partition, offset))]
    async fn append(&self, req: pb::ProduceRequest) -> Result<Appended, BrokerError> {
        let meta = self.metadata.current();
        let topic = meta
            .topics
            .get(&req.topic)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: req.topic.clone(),
            })?;
        let count = topic.partitions.len() as i32;
        // Sequences are per partition: a retry the broker routed to
        // another partition (round-robin, or a key hashed over a grown
        // topic) would be appended a second time there.
        let idempotent = if req.batch.is_empty() {
            req.producer_id > 0
        } else {
            batch_producer_id(&req.batch) > 0
        };
        if idempotent && req.partition.is_none() {
            return Err(BrokerError::InvalidRequest {
                reason: "an idempotent produce (a producer id) must name its partition".into(),
            });
        }
        // The request's shape first: one that can never be stored is not
        // answered with a retriable routing error.
        let batch = encode_batch(&req)?;
        let index = match req.partition {
            Some(p) => p,
            None => {
                let key = match req.records.first() {
                    Some(r) => r.key.clone(),
                    None => runnel_storage::batch::first_record_key(&batch)?,
                };
                match key {
                    Some(key) => partition_for_key(&key, count),
                    None => self.round_robin_partition(topic),
                }
            }
        };
        tracing::Span::current().record("partition", index);
        let partition = self.leader_partition(&meta, &req.topic, index)?;
        let pinfo = &topic.partitions[index as usize];
        let acks = pb::Acks::try_from(req.acks).unwrap_or(pb::Acks::All);
        if matches!(acks, pb::Acks::All | pb::Acks::Unspecified) {
            let min_isr = self.min_insync_replicas(topic);
            if !runnel_replication::enough_replicas(pinfo.isr.len(), min_isr) {
                return Err(BrokerError::NotEnoughReplicas {
                    topic: req.topic.clone(),
                    partition: index,
                    isr: pinfo.isr.len(),
                    min_isr,
                });
            }
        }
        let producer_id = batch_producer_id(&batch);
        if producer_id > 0 && producer_id >= meta.next_producer_id {
            self.await_producer_id(producer_id).await?;
        }
        let leader_epoch = pinfo.leader_epoch;
        let min_isr = self.min_insync_replicas(topic);
        let append = {
            let partition = partition.clone();
            let appended = self.appended.clone();
            let metrics = self.metrics.clone();
            let queued = std::time::Instant::now();
            move || {
                let started = std::time::Instant::now();
                let bytes = batch.len();
                let info = partition.log.append_as_leader(batch, leader_epoch)?;
                metrics.produce_latency(started - queued, started.elapsed());
                if !info.duplicate {
                    // A retry answered with its first copy's offsets
                    // wrote nothing.
                    metrics.appended(&partition.topic, bytes, info.record_count);
                }
                partition.on_append();
                appended.send_modify(|n| *n = n.wrapping_add(1));
                Ok::<_, StorageError>(info)
            }
        };
        let mut response = pb::ProduceResponse {
            correlation_id: req.correlation_id,
            topic: req.topic.clone(),
            partition: index,
            base_offset: -1,
            last_offset: -1,
            log_append_time_ms: -1,
            log_start_offset: partition.log.log_start_offset(),
            ..Default::default()
        };
        let hw_rx = partition.watch_high_watermark();
        // acks=none too: appended before the next request of the stream is
        // read, so a stream's batches keep their order (each in a task of
        // its own, they raced for the log, and an idempotent stream's
        // sequence broke) and the stream's in-flight limit holds.
        let info = partition.run_append(append).await.ok_or_else(|| {
            BrokerError::StoppedAfterAppend {
                topic: req.topic.clone(),
                partition: index,
            }
        })??;
        if acks == pb::Acks::None {
            return Ok(Appended {
                response,
                wait: None,
            });
        }
        tracing::Span::current().record("offset", info.base_offset);
        debug!(
            base_offset = info.base_offset,
            records = info.record_count,
            duplicate = info.duplicate,
            "appended"
        );
        response.base_offset = info.base_offset;
        response.last_offset = info.last_offset;
        response.log_append_time_ms = info.log_append_time_ms;
        let wait = (acks != pb::Acks::Leader).then(|| ReplicaWait {
            partition,
            hw_rx,
            end: info.last_offset + 1,
            min_isr,
            leader_epoch,
            timeout_ms: match req.timeout_ms {
                0 => self.config.broker.request_timeout_ms,
                t => u64::from(t),
            },
        });
        Ok(Appended { response, wait })
    }

    /// The next partition of `topic` for a keyless produce that named
    /// none: round-robin over the partitions this broker leads, so that
    /// it is not refused as NOT_LEADER for the others' (over every
    /// partition, two requests in three failed on three brokers, and the
    /// retry at the leader named in the refusal picked yet another).
    /// Over every partition when it leads none (the refusal then names
    /// a leader).
    fn round_robin_partition(&self, topic: &TopicInfo) -> i32 {
        let turn = self.round_robin.fetch_add(1, Ordering::Relaxed) as usize;
        let me = self.node_id();
        let led = topic.partitions.iter().filter(|p| p.leader == me).count();
        if led == 0 {
            return (turn % topic.partitions.len()) as i32;
        }
        let nth = turn % led;
        topic
            .partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| p.leader == me)
            .nth(nth)
            .map_or(0, |(i, _)| i as i32)
    }

    /// One effective topic config value (the override, else the broker's
    /// default), without building the whole effective map.
    fn effective_config<'a>(&'a self, topic: &'a TopicInfo, key: &str) -> Option<&'a str> {
        topic
            .configs
            .get(key)
            .or_else(|| self.topic_defaults.get(key))
            .map(String::as_str)
    }

    /// The effective `max.message.bytes` of topic `name`, if it exists.
    pub fn max_message_bytes(&self, name: &str) -> Option<usize> {
        let meta = self.metadata.current();
        let topic = meta.topics.get(name)?;
        self.effective_config(topic, "max.message.bytes")?
            .parse()
            .ok()
    }

    fn min_insync_replicas(&self, topic: &TopicInfo) -> i32 {
        self.effective_config(topic, "min.insync.replicas")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    }

    /// acks=all: waits until the high watermark reaches `end` (every ISR
    /// member has the batch) and checks the ISR still has min.insync.replicas.
    async fn wait_for_replicas(
        &self,
        partition: &Partition,
        hw_rx: &mut watch::Receiver<i64>,
        end: i64,
        min_isr: i32,
        leader_epoch: i32,
        timeout_ms: u64,
    ) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        let stopped = || BrokerError::StoppedAfterAppend {
            topic: partition.topic.clone(),
            partition: partition.index,
        };
        loop {
            if partition.log.high_watermark() >= end {
                // Leading in another epoch now: this replica may have
                // followed meanwhile, cut the batch and copied another
                // leader's records past `end`. The high watermark then
                // says nothing of the batch, unless the log still holds
                // records up to `end` written in the batch's epoch.
                if partition.leader_epoch() != Some(leader_epoch) {
                    let kept = partition
                        .log
                        .end_offset_for_epoch(leader_epoch)
                        .is_some_and(|(epoch, epoch_end)| {
                            epoch == leader_epoch && epoch_end >= end
                        });
                    // Kept, below the high watermark another leader
                    // passed on: committed, whatever this replica's ISR
                    // (it has none as a follower; counted as 0, committed
                    // records were answered NOT_ENOUGH_REPLICAS_AFTER_APPEND
                    // and retried into duplicates).
                    return if kept {
                        Ok(())
                    } else {
                        Err(BrokerError::NotLeader {
                            topic: partition.topic.clone(),
                            partition: partition.index,
                            leader: String::new(),
                        })
                    };
                }
                let isr = partition.isr().map_or(0, |i| i.len());
                if !runnel_replication::enough_replicas(isr, min_isr) {
                    return Err(BrokerError::NotEnoughReplicasAfterAppend {
                        topic: partition.topic.clone(),
                        partition: partition.index,
                        isr,
                        min_isr,
                    });
                }
                return Ok(());
            }
            if partition.leader_epoch() != Some(leader_epoch) {
                // Leadership moved (controlled shutdown, fencing): the
                // batch's fate is decided by the new leader; retriable.
                return Err(BrokerError::NotLeader {
                    topic: partition.topic.clone(),
                    partition: partition.index,
                    leader: String::new(),
                });
            }
            tokio::select! {
                r = hw_rx.changed() => if r.is_err() { return Err(stopped()) },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(BrokerError::ReplicationTimeout {
                        topic: partition.topic.clone(),
                        partition: partition.index,
                        offset: end - 1,
                        timeout_ms,
                    });
                }
                _ = self.shutdown.cancelled() => return Err(stopped()),
            }
        }
    }

    /// Reads from a partition, long-polling up to `max_wait_ms`.
    pub async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchResponse, BrokerError> {
        let topic = req.topic.clone();
        let fetched = self.fetch_inner(req).await;
        match &fetched {
            Ok((_, bytes, records)) => self.metrics.fetched(&topic, *bytes, *records),
            Err(e) => self.metrics.request_error("fetch", e.code()),
        }
        fetched.map(|(r, _, _)| r)
    }

    /// Waits up to `wait` (capped by `fetch.wait.max.ms`) until records at
    /// `offset` of a partition this broker leads are readable (below the
    /// high watermark), without reading them. Returns at once when they
    /// already are, or when the offset is not readable at all (the fetch
    /// that follows reports why).
    ///
    /// Returns whether a fetch at `offset` now has something to say:
    /// records, or an error (not the leader, an offset out of range, the
    /// broker stopping). False only when the wait ran out with nothing
    /// new, and a read would answer nothing.
    pub async fn wait_readable(
        &self,
        topic: &str,
        topic_id: &str,
        partition: i32,
        offset: i64,
        wait: Duration,
    ) -> bool {
        let meta = self.metadata.current();
        let Ok(partition) = self.leader_partition(&meta, topic, partition) else {
            return true;
        };
        // Another topic of the name than the reader's: said at once too.
        if !topic_id.is_empty() && partition.topic_id != topic_id {
            return true;
        }
        // An offset outside the log is answered at once (the read that
        // follows says why). Waited for, records appended meanwhile could
        // bring the high watermark past an offset beyond the log end, and
        // the read then served from there, skipping those before it.
        let log = &partition.log;
        if offset < log.log_start_offset() || offset > log.log_end_offset() {
            return true;
        }
        // Not capped by `fetch_wait_max_ms` (a subscription's wait is
        // not a request's): with the cap at 0, idle subscriptions
        // polled without ever waiting.
        self.wait_past_for(&partition, offset, wait).await;
        let log = &partition.log;
        log.high_watermark() > offset
            || offset < log.log_start_offset()
            || offset > log.log_end_offset()
            || partition.leader_epoch().is_none()
            || self.is_stopping()
    }

    /// The long poll of a fetch: waits up to `wait` (capped by
    /// `fetch.wait.max.ms`) while the partition's high watermark is not
    /// past `offset`, i.e. nothing at `offset` is readable yet.
    async fn wait_past(&self, partition: &Partition, offset: i64, wait: Duration) {
        let wait = wait.min(Duration::from_millis(self.config.broker.fetch_wait_max_ms));
        self.wait_past_for(partition, offset, wait).await;
    }

    /// [`Broker::wait_past`] without the cap. Returns early when this
    /// broker stops leading the partition (the follow-up read answers
    /// from what is committed; the next fetch learns of the move).
    async fn wait_past_for(&self, partition: &Partition, offset: i64, wait: Duration) {
        let mut hw_rx = partition.watch_high_watermark();
        if partition.log.high_watermark() > offset || wait.is_zero() {
            return;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                changed = hw_rx.changed() => {
                    if changed.is_err() { return; }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.shutdown.cancelled() => return,
            }
            if partition.log.high_watermark() > offset || partition.leader_epoch().is_none() {
                return;
            }
        }
    }

    /// The most one fetch answer carries (Kafka's fetch.max.bytes): a
    /// fetch asking for more is cut to it, so that its answer fits in a
    /// gRPC message (records decoded for stock clients take a little more
    /// room than their batches) and one request cannot make the broker
    /// read a whole segment into memory. At least one batch is always
    /// answered.
    pub fn fetch_bytes_max(&self) -> usize {
        self.config.broker.grpc_message_bytes_max / 4 * 3
    }

    /// A fetch, and the stored bytes and records it sends.
    #[instrument(level = "debug", skip_all, fields(topic = %req.topic, partition = req.partition, offset = req.offset))]
    async fn fetch_inner(
        &self,
        req: pb::FetchRequest,
    ) -> Result<(pb::FetchResponse, usize, u64), BrokerError> {
        let meta = self.metadata.current();
        let partition = self.leader_partition(&meta, &req.topic, req.partition)?;
        if !req.topic_id.is_empty() && partition.topic_id != req.topic_id {
            // Rare, so the metadata is asked only now: the topic was
            // created again since the reader looked it up, or this broker
            // still hosts the old log of a topic the metadata names anew
            // (not reconciled yet: retry shortly).
            let current = meta.topics.get(&req.topic).map(|t| t.topic_id.clone());
            return Err(match current {
                Some(current) if current != req.topic_id => BrokerError::UnknownTopicId {
                    topic: req.topic.clone(),
                    asked: req.topic_id.clone(),
                    current,
                },
                _ => BrokerError::PartitionOffline {
                    topic: req.topic.clone(),
                    partition: req.partition,
                },
            });
        }
        let log = &partition.log;
        let max_bytes = match req.max_bytes {
            0 => FETCH_BYTES_DEFAULT,
            n => n as usize,
        }
        .min(self.fetch_bytes_max());
        let high_watermark = log.high_watermark();
        let out_of_range = |hw: i64| {
            BrokerError::Storage(StorageError::OffsetOutOfRange {
                offset: req.offset,
                log_start_offset: log.log_start_offset(),
                log_end_offset: hw,
            })
        };
        // Out of range only outside the log. An offset between the high
        // watermark and the log end is a consumer that is caught up with a
        // leader this broker has just replaced: a new leader learns the
        // high watermark one fetch round behind the old one. It waits for
        // the high watermark as at the end, as Kafka's fetch does;
        // refusing it sent the consumer back to its reset policy
        // (earliest, for the group consumer), to read the whole partition
        // again.
        if req.offset < log.log_start_offset() || req.offset > log.log_end_offset() {
            return Err(out_of_range(high_watermark));
        }
        let wait = Duration::from_millis(u64::from(req.max_wait_ms));
        self.wait_past(&partition, req.offset, wait).await;
        let high_watermark = log.high_watermark();
        // Raw batches are sent as they are read: room is left for the
        // answer's own fields, so that it fits a client that set
        // `max_bytes` to its receive limit (batches filling it exactly
        // were refused on every try). At least one batch is read anyway.
        let read_bytes = if req.raw {
            max_bytes.saturating_sub(ANSWER_ENVELOPE_BYTES).max(1)
        } else {
            max_bytes
        };
        let read = log.read(req.offset, read_bytes, high_watermark)?;
        let mut response = pb::FetchResponse {
            topic: req.topic.clone(),
            partition: req.partition,
            high_watermark,
            log_start_offset: read.log_start_offset,
            next_offset: req.offset,
            ..Default::default()
        };
        if read.batches.is_empty() {
            return Ok((response, 0, 0));
        }
        // `Log::read` CRC-checked every batch it returned; only split them.
        let batches = RecordBatch::split_checked(read.batches.clone())?;
        if let Some(last) = batches.last() {
            response.next_offset = last.last_offset() + 1;
        }
        // Counted as `topic_out_bytes_total`: what is sent. A structured
        // answer sends its records, not the batches read for them (a
        // batch larger than `max_bytes` was counted once per fetch
        // cutting into it).
        let (records, bytes) = if req.raw {
            let bytes = read.batches.len();
            response.batches = read.batches;
            let records = batches.iter().map(|b| b.record_count().max(0) as u64).sum();
            (records, bytes)
        } else {
            // Decoded records take more room than their batches (tags,
            // lengths, the offset and timestamp of each): the answer stops
            // where its records reach `max_bytes`, so that it fits what a
            // client that set `max_bytes` to its receive limit decodes (it
            // was refused the same oversized answer on every try). At
            // least one record is answered.
            // Records are decoded one at a time, those before the offset
            // skipped undecoded: a whole batch decoded into a list first
            // (32 MiB of near-empty records: millions) cost that much
            // memory and work for every fetch cutting into it.
            let room = max_bytes.saturating_sub(ANSWER_ENVELOPE_BYTES);
            let mut used = 0usize;
            for batch in &batches {
                let mut full = false;
                batch.for_each_record_from(req.offset, |record| {
                    let record = to_proto_record(record);
                    let len = prost::Message::encoded_len(&record);
                    let len = len + 1 + prost::length_delimiter_len(len);
                    if !response.records.is_empty() && used + len > room {
                        full = true;
                        return false;
                    }
                    used += len;
                    response.next_offset = record.offset + 1;
                    response.records.push(record);
                    true
                })?;
                if full {
                    break;
                }
            }
            (response.records.len() as u64, used)
        };
        Ok((response, bytes, records))
    }

    /// Offsets by spec.
    pub async fn list_offsets(
        &self,
        req: pb::ListOffsetsRequest,
    ) -> Result<pb::ListOffsetsResponse, BrokerError> {
        let meta = self.metadata.current();
        let partition = self.leader_partition(&meta, &req.topic, req.partition)?;
        let spec = pb::OffsetSpec::try_from(req.spec).map_err(|_| BrokerError::InvalidRequest {
            reason: format!("unknown offset spec {}", req.spec),
        })?;
        if spec != pb::OffsetSpec::Earliest {
            self.high_watermark_settled(&partition).await?;
        }
        let log = &partition.log;
        let (start, hw) = (log.log_start_offset(), log.high_watermark());
        let (offset, timestamp_ms) = match spec {
            pb::OffsetSpec::Earliest => (start, -1),
            pb::OffsetSpec::Latest | pb::OffsetSpec::Unspecified => (hw, -1),
            pb::OffsetSpec::Timestamp => match log.offset_for_timestamp(req.timestamp_ms)? {
                Some((offset, ts)) if offset < hw => (offset, ts),
                _ => (hw, -1),
            },
        };
        Ok(pb::ListOffsetsResponse {
            offset,
            timestamp_ms,
            log_start_offset: start,
            high_watermark: hw,
            log_end_offset: log.log_end_offset(),
        })
    }

    /// Waits until a leader's high watermark reached where its leadership
    /// started (its followers fetch from it within a round, usually), at
    /// most [`SETTLE_WAIT`]: then OFFSET_NOT_AVAILABLE, retriable.
    async fn high_watermark_settled(&self, partition: &Partition) -> Result<(), BrokerError> {
        let mut hw = partition.watch_high_watermark();
        let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
        loop {
            match partition.high_watermark_settled() {
                Some(true) => return Ok(()),
                None => {
                    return Err(BrokerError::NotLeader {
                        topic: partition.topic.clone(),
                        partition: partition.index,
                        leader: String::new(),
                    })
                }
                Some(false) => {}
            }
            let woke = tokio::time::timeout_at(deadline, hw.changed()).await;
            if !matches!(woke, Ok(Ok(()))) {
                return Err(BrokerError::OffsetNotAvailable {
                    topic: partition.topic.clone(),
                    partition: partition.index,
                });
            }
        }
    }

    /// Deletes the partition's records below an offset (DeleteRecords; at
    /// most the high watermark, which -1 stands for) and waits until every
    /// in-sync replica's log starts there.
    #[instrument(skip_all, fields(topic = %req.topic, partition = req.partition, offset = req.offset))]
    pub async fn delete_records(
        &self,
        req: pb::DeleteRecordsRequest,
    ) -> Result<pb::DeleteRecordsResponse, BrokerError> {
        let meta = self.metadata.current();
        let partition = self.leader_partition(&meta, &req.topic, req.partition)?;
        let offset = match req.offset {
            -1 => partition.log.high_watermark(),
            o if o < 0 => {
                return Err(BrokerError::InvalidRequest {
                    reason: format!("offset {o}: records are deleted below an offset >= 0, or -1 for the high watermark"),
                })
            }
            o => o,
        };
        let mut moved = partition.watch_low_watermark();
        let log = partition.log.clone();
        let start = tokio::task::spawn_blocking(move || log.delete_records_before(offset))
            .await
            .map_err(|_| BrokerError::ShuttingDown)??;
        info!(log_start_offset = start, "records deleted on the leader");
        // Followers learn the new log start from their next fetch answer:
        // wake the fetches waiting for data.
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
        let timeout_ms = match req.timeout_ms {
            0 => self.config.broker.request_timeout_ms,
            t => u64::from(t),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let Some(low_watermark) = partition.low_watermark() else {
                // Leadership moved while waiting.
                let meta = self.metadata.current();
                return Err(
                    match self.leader_partition(&meta, &req.topic, req.partition) {
                        Err(e) => e,
                        Ok(_) => BrokerError::PartitionOffline {
                            topic: req.topic,
                            partition: req.partition,
                        },
                    },
                );
            };
            if low_watermark >= offset {
                return Ok(pb::DeleteRecordsResponse {
                    low_watermark,
                    offset,
                });
            }
            match tokio::time::timeout_at(deadline, moved.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(BrokerError::ShuttingDown),
                Err(_) => {
                    return Err(BrokerError::DeleteRecordsTimeout {
                        topic: req.topic,
                        partition: req.partition,
                        offset,
                        low_watermark,
                        timeout_ms,
                    })
                }
            }
        }
    }

    /// Creates a topic (or only checks it, with validate_only).
    #[instrument(skip_all, fields(topic = %req.name))]
    pub async fn create_topic(
        &self,
        mut req: pb::CreateTopicRequest,
    ) -> Result<pb::TopicDescription, BrokerError> {
        // 0 (unset) or -1 (Kafka's CreateTopics, KIP-464): this broker's
        // defaults.
        if matches!(req.partitions, 0 | -1) {
            req.partitions = self.config.broker.num_partitions;
        }
        if matches!(req.replication_factor, 0 | -1) {
            req.replication_factor = self.config.broker.default_replication_factor;
        }
        let configs = new_configs(req.configs)?;
        self.check_min_insync_replicas(&configs, req.replication_factor)?;
        let cmd = MetadataCommand::CreateTopic {
            name: req.name.clone(),
            topic_id: random_id(),
            partitions: req.partitions,
            replication_factor: req.replication_factor,
            configs,
        };
        if req.validate_only {
            let mut preview = (*self.metadata.current()).clone();
            preview.apply(cmd)?;
            return self.describe_in(&preview, &req.name);
        }
        self.metadata.submit(cmd).await?;
        info!(
            partitions = req.partitions,
            replication_factor = req.replication_factor,
            "topic created"
        );
        self.reconcile_after_change().await;
        self.describe_topic(&req.name)
    }

    /// Deletes a topic and its data on this broker.
    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        // The topic as this broker knows it: a retried submit must not
        // delete another topic of the name created in between.
        let topic_id = self
            .metadata
            .current()
            .topics
            .get(name)
            .map(|t| t.topic_id.clone())
            .filter(|id| !id.is_empty());
        let applied = self
            .metadata
            .submit(MetadataCommand::DeleteTopic {
                name: name.to_string(),
                topic_id,
            })
            .await?;
        if let Applied::TopicDeleted { partitions, .. } = applied {
            info!(topic = name, partitions, "topic deleted");
        }
        self.reconcile_after_change().await;
        Ok(())
    }

    /// Grows a topic.
    pub async fn add_partitions(
        &self,
        name: &str,
        total_partitions: i32,
    ) -> Result<pb::TopicDescription, BrokerError> {
        self.metadata
            .submit(MetadataCommand::AddPartitions {
                name: name.to_string(),
                total_partitions,
                current_factor: true,
            })
            .await?;
        self.reconcile_after_change().await;
        self.describe_topic(name)
    }

    /// Preferred or unclean leader election; returns the partitions whose
    /// leader moved.
    pub async fn elect_leaders(
        &self,
        req: pb::ElectLeadersRequest,
    ) -> Result<pb::ElectLeadersResponse, BrokerError> {
        let unclean = pb::ElectionType::try_from(req.r#type) == Ok(pb::ElectionType::Unclean);
        // Checked here, before it becomes a Raft entry: the state machine
        // refuses a bad list only once it is in the log, and a few
        // requests of millions of repeated indexes (4 MB each) made Raft
        // batches no follower would decode.
        let partitions: BTreeSet<i32> = req.partitions.iter().copied().collect();
        if let Some(bad) = partitions
            .iter()
            .find(|p| **p < 0 || **p >= runnel_controller::metadata::PARTITIONS_MAX)
        {
            return Err(BrokerError::InvalidRequest {
                reason: format!("no partition {bad}"),
            });
        }
        let applied = self
            .metadata
            .submit(MetadataCommand::ElectLeaders {
                topic: req.topic.clone(),
                partitions: partitions.into_iter().collect(),
                unclean,
            })
            .await?;
        let changed = match applied {
            Applied::Elected { changed } => changed,
            _ => Vec::new(),
        };
        info!(topic = %req.topic, ?changed, unclean, "leader election");
        self.reconcile_after_change().await;
        Ok(pb::ElectLeadersResponse {
            topic: Some(self.describe_topic(&req.topic)?),
            changed,
        })
    }

    /// Starts (or cancels) partition reassignments; see the RPC's docs.
    pub async fn reassign_partitions(
        &self,
        req: pb::ReassignPartitionsRequest,
    ) -> Result<pb::TopicDescription, BrokerError> {
        // Bounded before it becomes a Raft entry (see elect_leaders).
        if req.reassignments.len() > runnel_controller::metadata::PARTITIONS_MAX as usize {
            return Err(BrokerError::InvalidRequest {
                reason: format!(
                    "{} reassignments: a topic has at most {} partitions",
                    req.reassignments.len(),
                    runnel_controller::metadata::PARTITIONS_MAX
                ),
            });
        }
        if let Some(r) = req
            .reassignments
            .iter()
            .find(|r| r.replicas.len() > REPLICAS_LISTED_MAX)
        {
            return Err(BrokerError::InvalidRequest {
                reason: format!(
                    "partition {} lists {} replicas (at most {REPLICAS_LISTED_MAX})",
                    r.partition,
                    r.replicas.len()
                ),
            });
        }
        let mut assignments = BTreeMap::new();
        for r in req.reassignments {
            if assignments.insert(r.partition, r.replicas).is_some() {
                return Err(BrokerError::InvalidRequest {
                    reason: format!("partition {} is listed twice", r.partition),
                });
            }
        }
        if assignments.is_empty() {
            return Err(BrokerError::InvalidRequest {
                reason: "no partitions to reassign".into(),
            });
        }
        let applied = self
            .metadata
            .submit(MetadataCommand::ReassignPartitions {
                topic: req.topic.clone(),
                assignments: assignments.clone(),
            })
            .await?;
        info!(topic = %req.topic, ?assignments, ?applied, "partition reassignment");
        self.reconcile_after_change().await;
        self.describe_topic(&req.topic)
    }

    /// Sets and removes config overrides.
    pub async fn alter_topic_config(
        &self,
        req: pb::AlterTopicConfigRequest,
    ) -> Result<pb::TopicDescription, BrokerError> {
        let set = new_configs(req.set)?;
        // Only an alter that removes the topic's own value: a topic created
        // before this check (or under another broker's defaults) must stay
        // alterable otherwise.
        let removes_min_isr = req.delete.iter().any(|k| k == "min.insync.replicas");
        if let Some(topic) = self.metadata.current().topics.get(&req.name) {
            if removes_min_isr {
                let mut after = topic.configs.clone();
                for key in &req.delete {
                    after.remove(key);
                }
                after.extend(set.clone());
                self.check_min_insync_replicas(&after, topic.current_replication_factor())?;
            }
        }
        let cmd = MetadataCommand::AlterTopicConfig {
            name: req.name.clone(),
            set,
            delete: req.delete,
            current_factor: true,
        };
        if req.validate_only {
            let mut preview = (*self.metadata.current()).clone();
            preview.apply(cmd)?;
            return self.describe_in(&preview, &req.name);
        }
        self.metadata.submit(cmd).await?;
        self.reconcile_after_change().await;
        self.describe_topic(&req.name)
    }

    /// Refuses a topic whose `min.insync.replicas` would come from this
    /// broker's default and exceed its replication factor: every acks=all
    /// produce to it would be refused. (A value set on the topic itself is
    /// checked by the metadata state machine.)
    fn check_min_insync_replicas(
        &self,
        overrides: &BTreeMap<String, String>,
        replication_factor: i32,
    ) -> Result<(), BrokerError> {
        const KEY: &str = "min.insync.replicas";
        // A value of its own, or a replication factor the metadata refuses
        // anyway (with its own reason).
        if overrides.contains_key(KEY) || replication_factor < 1 {
            return Ok(());
        }
        let Some(value) = self.topic_defaults.get(KEY) else {
            return Ok(());
        };
        if value
            .parse::<i64>()
            .is_ok_and(|m| m > i64::from(replication_factor))
        {
            return Err(MetadataError::InvalidConfig {
                key: KEY.into(),
                value: value.clone(),
                reason: format!(
                    "the broker default exceeds the replication factor {replication_factor}: set {KEY} on the topic"
                ),
            }
            .into());
        }
        Ok(())
    }

    /// Describes one topic from the current metadata.
    pub fn describe_topic(&self, name: &str) -> Result<pb::TopicDescription, BrokerError> {
        self.describe_in(&self.metadata.current(), name)
    }

    /// Describes a topic with every partition's offsets, asking the
    /// leaders of partitions this broker does not lead: one connection
    /// per leader, every question at once, 2 s in all (-1 where a leader
    /// does not answer). One connection per partition, asked one after
    /// another, took 2 s per partition of a leader that did not answer
    /// (over half an hour for a thousand).
    pub async fn describe_topic_live(
        &self,
        name: &str,
    ) -> Result<pb::TopicDescription, BrokerError> {
        let meta = self.metadata.current();
        let mut d = self.describe_in(&meta, name)?;
        let mut by_leader: BTreeMap<i32, Vec<(usize, i32)>> = BTreeMap::new();
        for (i, p) in d.partitions.iter().enumerate() {
            if p.leader >= 0 && p.leader != self.node_id {
                by_leader
                    .entry(p.leader)
                    .or_default()
                    .push((i, p.partition));
            }
        }
        let asks = by_leader.into_iter().map(|(leader, partitions)| {
            let addr = meta.brokers.get(&leader).map(|b| b.address.clone());
            let ask = async move {
                let addr = addr?;
                let channel = self.peer_channel(&addr)?;
                let c = runnel_proto::v1::consumer_client::ConsumerClient::new(channel);
                let addr = &addr;
                let answers = partitions.into_iter().map(|(i, partition)| {
                    let mut c = c.clone();
                    async move {
                        let r = c
                            .list_offsets(pb::ListOffsetsRequest {
                                topic: name.to_string(),
                                partition,
                                // The range is in every answer; only the
                                // latest waits for a new leader's high
                                // watermark.
                                spec: pb::OffsetSpec::Earliest as i32,
                                timestamp_ms: 0,
                            })
                            .await
                            .map_err(|s| crate::security::peer_call_failed(addr, "ListOffsets", &s))
                            .ok()?;
                        Some((i, r.into_inner()))
                    }
                });
                Some(futures_util::future::join_all(answers).await)
            };
            // Each leader within the bound: a silent one costs only its
            // own partitions' offsets.
            async move {
                tokio::time::timeout(Duration::from_secs(2), ask)
                    .await
                    .ok()
                    .flatten()
            }
        });
        let answered = futures_util::future::join_all(asks).await;
        for (i, r) in answered.into_iter().flatten().flatten().flatten() {
            let p = &mut d.partitions[i];
            p.log_start_offset = r.log_start_offset;
            p.high_watermark = r.high_watermark;
            p.log_end_offset = r.log_end_offset;
        }
        Ok(d)
    }

    fn describe_in(
        &self,
        meta: &ClusterMetadata,
        name: &str,
    ) -> Result<pb::TopicDescription, BrokerError> {
        let topic = meta
            .topics
            .get(name)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: name.to_string(),
            })?;
        let partitions = topic
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                // Offsets come from the leader's log; a follower's copy
                // lags, so non-leaders report -1 (see describe_topic_live).
                let log = self
                    .hosted(name, i as i32)
                    .filter(|h| p.leader == self.node_id && h.leader_epoch().is_some())
                    .map(|h| h.log.clone());
                pb::PartitionDescription {
                    partition: i as i32,
                    leader: p.leader,
                    leader_epoch: p.leader_epoch,
                    replicas: p.replicas.clone(),
                    isr: p.isr.clone(),
                    log_start_offset: log.as_ref().map_or(-1, |l| l.log_start_offset()),
                    high_watermark: log.as_ref().map_or(-1, |l| l.high_watermark()),
                    log_end_offset: log.as_ref().map_or(-1, |l| l.log_end_offset()),
                    adding_replicas: p.adding.clone(),
                    removing_replicas: p.removing.clone(),
                }
            })
            .collect();
        Ok(pb::TopicDescription {
            name: topic.name.clone(),
            topic_id: topic.topic_id.clone(),
            partitions,
            configs: self.effective_configs(topic).into_iter().collect(),
            overridden_configs: topic.configs.keys().cloned().collect(),
            replication_factor: topic.current_replication_factor(),
        })
    }

    /// Topic names and sizes.
    pub fn list_topics(&self, include_internal: bool) -> pb::ListTopicsResponse {
        let meta = self.metadata.current();
        let topics = meta
            .topics
            .values()
            .filter(|t| include_internal || !t.name.starts_with("__"))
            .map(|t| pb::TopicSummary {
                name: t.name.clone(),
                partitions: t.partitions.len() as i32,
                replication_factor: t.current_replication_factor(),
                internal: t.name.starts_with("__"),
            })
            .collect();
        pb::ListTopicsResponse { topics }
    }

    /// Brokers and controller.
    pub fn describe_cluster(&self) -> pb::ClusterDescription {
        let meta = self.metadata.current();
        let q = self.metadata.quorum();
        pb::ClusterDescription {
            cluster_id: meta.cluster_id.clone(),
            controller_id: self.metadata.controller_id(),
            brokers: brokers_of(&meta),
            quorum: Some(pb::QuorumDescription {
                term: q.term,
                voters: q.voters,
                learners: q.learners,
                last_log_index: q.last_log_index,
                applied_index: q.applied_index,
                lag: q
                    .lag
                    .into_iter()
                    .map(|(id, lag)| (id, lag.map_or(-1, |l| l as i64)))
                    .collect(),
            }),
        }
    }

    /// Routing metadata.
    pub fn cluster_metadata(&self, topics: &[String]) -> Result<pb::MetadataResponse, BrokerError> {
        let meta = self.metadata.current();
        let names: Vec<String> = if topics.is_empty() {
            meta.topics.keys().cloned().collect()
        } else {
            topics.to_vec()
        };
        let topics = names
            .iter()
            .map(|n| self.describe_in(&meta, n))
            .collect::<Result<_, _>>()?;
        Ok(pb::MetadataResponse {
            brokers: brokers_of(&meta),
            topics,
            cluster_id: meta.cluster_id.clone(),
            controller_id: self.metadata.controller_id(),
        })
    }

    /// Controlled shutdown: asks the controller to move every leadership
    /// of this broker to another in-sync replica (and take it out of the
    /// ISRs), then waits until the metadata shows it leads nothing, so a
    /// rolling restart loses nothing. Skipped when no other broker is up.
    ///
    /// `epoch`: this process's registration, when it has one; the fence
    /// then cannot land on a later incarnation.
    pub async fn controlled_shutdown(
        &self,
        timeout: Duration,
        epoch: Option<i64>,
    ) -> Result<(), BrokerError> {
        let meta = self.metadata.current();
        let others = meta
            .brokers
            .values()
            .filter(|b| b.id != self.node_id && !b.fenced)
            .count();
        if others == 0 {
            return Ok(());
        }
        info!(
            node_id = self.node_id,
            broker_epoch = meta.brokers.get(&self.node_id).map_or(-1, |b| b.epoch),
            "controlled shutdown: fencing this broker and handing over leaderships"
        );
        self.metadata
            .submit(MetadataCommand::FenceBroker {
                id: self.node_id,
                epoch,
                // Leaderships go to in-sync replicas only: this broker
                // comes back with its log.
                controlled: true,
            })
            .await?;
        let me = self.node_id;
        let mut rx = self.metadata.watch();
        let leads_nothing = |m: &ClusterMetadata| {
            m.topics
                .values()
                .flat_map(|t| t.partitions.iter())
                .all(|p| p.leader != me || p.isr.len() <= 1)
        };
        let _ = tokio::time::timeout(timeout, rx.wait_for(|m| leads_nothing(m))).await;
        self.reconcile_off_workers().await
    }

    /// Starts write-back of every log's recent appends (blocking pool).
    /// Failures are advisory and only counted, so a failing disk does not
    /// log a warning per partition ten times a second.
    pub fn start_writeback(&self) -> Result<(), BrokerError> {
        let failed = self.logs.start_writeback();
        if failed > 0 {
            tracing::debug!(
                logs = failed,
                "write-back could not be started for some logs"
            );
        }
        Ok(())
    }

    /// Periodic storage work: retention, age roll, interval flush.
    pub fn tick(&self) -> Result<(), BrokerError> {
        let now = now_ms();
        // Every log was ticked; an error is reported after the ISR checks,
        // which one failing log must not hold up for every partition.
        let storage = self.logs.tick(now);
        let lag_max = self.config.broker.replica_lag_time_max_ms as i64;
        let hosted: Vec<Arc<Partition>> = {
            let map = self.partitions.read().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        for p in hosted {
            if p.log.has_failed() && !self.failed.is_cancelled() {
                // Its data may be gone from disk (a failed fsync) while
                // the broker still leads it. As Kafka halts a broker whose
                // only log directory went offline, the server stops, after
                // handing its leaderships over; a restart recovers the
                // log from disk.
                tracing::error!(topic = %p.topic, partition = p.index, "a hosted log failed; stopping this broker");
                self.failed.cancel();
            }
            let proposals = p.on_tick(now, lag_max);
            self.propose_isr_changes(&p, proposals);
        }
        storage?;
        Ok(())
    }

    /// Flushes and closes every log.
    pub fn close(&self) -> Result<(), BrokerError> {
        self.logs.close()?;
        Ok(())
    }
}

/// A partition [`Broker::reconcile`] hosts: its key, its topic, the
/// replica, and whether its log was just opened.
type Hosted<'m> = (&'m (String, i32), &'m TopicInfo, Arc<Partition>, bool);

/// Topic config values set by a request, as Kafka parses them (surrounding
/// blanks do not count, and are not stored for the brokers' parsers to
/// trip on), checked against the limits of new values
/// ([`topic_config::validate_new`]).
fn new_configs(
    configs: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, BrokerError> {
    configs
        .into_iter()
        .map(|(k, v)| {
            let v = v.trim().to_string();
            topic_config::validate_new(&k, &v)?;
            Ok((k, v))
        })
        .collect()
}

fn brokers_of(meta: &ClusterMetadata) -> Vec<pb::BrokerDescription> {
    meta.brokers
        .values()
        .map(|b| pb::BrokerDescription {
            id: b.id,
            address: b.address.clone(),
            rack: b.rack.clone(),
            fenced: b.fenced,
            roles: b.roles.clone(),
            epoch: b.epoch,
        })
        .collect()
}

/// Turns a produce request into one batch: the client's pre-encoded batch
/// (shared, never copied: the log rewrites only a copy of its header) or
/// the records encoded once.
fn encode_batch(req: &pb::ProduceRequest) -> Result<Bytes, BrokerError> {
    match (req.records.is_empty(), req.batch.is_empty()) {
        (false, false) => Err(BrokerError::InvalidRequest {
            reason: "set either records or batch, not both".into(),
        }),
        (true, true) => Err(BrokerError::InvalidRequest {
            reason: "no records to produce".into(),
        }),
        (true, false) => Ok(req.batch.clone()),
        (false, true) => {
            let now = now_ms();
            let mut builder = BatchBuilder::new();
            if req.producer_id > 0 {
                // Checked, not narrowed: an epoch of 65,536 was taken as
                // 0 (and 32,768 as negative, refused as a sequence gap).
                let epoch = i16::try_from(req.producer_epoch)
                    .ok()
                    .filter(|e| *e >= 0)
                    .ok_or_else(|| BrokerError::InvalidRequest {
                        reason: format!(
                            "producer_epoch {} is not within 0..={}",
                            req.producer_epoch,
                            i16::MAX
                        ),
                    })?;
                if req.base_sequence < 0 {
                    return Err(BrokerError::InvalidRequest {
                        reason: format!("base_sequence {} is negative", req.base_sequence),
                    });
                }
                builder = builder.producer(req.producer_id, epoch, req.base_sequence);
            }
            for r in &req.records {
                let headers: Vec<(&str, Option<&[u8]>)> = r
                    .headers
                    .iter()
                    .map(|h| (h.key.as_str(), h.value.as_deref()))
                    .collect();
                let ts = if r.timestamp_ms > 0 {
                    r.timestamp_ms
                } else {
                    now
                };
                builder.push(ts, r.key.as_deref(), r.value.as_deref(), &headers);
            }
            Ok(builder.build().freeze())
        }
    }
}

/// The producer id in an encoded batch's header (0 or less: none).
fn batch_producer_id(batch: &[u8]) -> i64 {
    use runnel_storage::batch::field::PRODUCER_ID;
    batch
        .get(PRODUCER_ID..PRODUCER_ID + 8)
        .map_or(-1, |b| i64::from_be_bytes(b.try_into().expect("8 bytes")))
}

/// A stored record as the public API shows it.
pub fn to_proto_record(r: runnel_storage::Record) -> pb::Record {
    pb::Record {
        key: r.key,
        value: r.value,
        headers: r
            .headers
            .into_iter()
            .map(|h| pb::Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        timestamp_ms: r.timestamp_ms,
        offset: r.offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_controller::metadata::{BrokerInfo, PartitionInfo};

    /// A refused ISR proposal is taken as refused only when this broker's
    /// metadata shows why; otherwise it waits for the metadata.
    #[test]
    fn an_isr_refusal_the_metadata_does_not_explain_is_not_taken() {
        let broker = |id: i32, fenced: bool| BrokerInfo {
            id,
            address: String::new(),
            rack: String::new(),
            roles: vec![],
            epoch: 1,
            fenced,
            incarnation: String::new(),
            controlled_shutdown: false,
        };
        let mut meta = ClusterMetadata::default();
        for id in 1..=3 {
            meta.brokers.insert(id, broker(id, false));
        }
        let info = PartitionInfo {
            replicas: vec![1, 2, 3],
            leader: 1,
            leader_epoch: 1,
            isr: vec![1, 2],
            partition_epoch: 4,
            target_replicas: vec![],
            adding: vec![],
            removing: vec![],
        };
        // Adding 3 to epoch 4, refused while the metadata still shows
        // epoch 4 and 3 unfenced: the controller is ahead (stale epoch).
        assert!(!refusal_explained(&meta, &info, &[1, 2, 3], 4));
        // The epoch moved on here too: explained.
        assert!(refusal_explained(&meta, &info, &[1, 2, 3], 3));
        // 3 is fenced: explained, whatever the epoch.
        meta.brokers.insert(3, broker(3, true));
        assert!(refusal_explained(&meta, &info, &[1, 2, 3], 4));
        // A shrink's refusal in the same epoch is not explained either.
        assert!(!refusal_explained(&meta, &info, &[1], 4));
    }
}
