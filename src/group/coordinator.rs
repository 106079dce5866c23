//! The group coordinator runtime: the I/O around [`super::state::Group`].
//!
//! Where it sits: beside the produce path. A group's coordinator is the
//! leader of partition `murmur2(group) % 16` of the internal topic
//! `__consumer_offsets` (created on first use). Commits are appended to
//! that partition with acks=all (key `offset\0group\0topic\0partition`,
//! value `offset\0metadata`, a null value deletes), so they survive the
//! loss of any one broker; a broker that becomes leader of such a
//! partition replays it to rebuild the offsets before serving (requests
//! meanwhile answer NOT_COORDINATOR, which clients retry). Membership is
//! persisted the same way ([`super::record`]): whenever a group's
//! generation changes its metadata record is appended, and a join is
//! answered only once the record of its generation is stored; a new
//! coordinator rebuilds members, generation and assignments from the last
//! record, so members carry on (heartbeats and commits with their
//! generation are accepted) without a rebalance. All writes to one offsets
//! partition go through its [`Appender`], which turns concurrent commits
//! into one append.
//!
//! One background task follows leadership of the offsets partitions and
//! ticks every group (session expiry, rebalance deadlines, topics that
//! grew) every 100 ms.
//!
//! `__consumer_offsets` gets 16 partitions, replication factor
//! min(3, live brokers), min.insync.replicas min(2, rf), 100 MiB segments
//! and retention.ms -1: storage has no log cleaner, so the coordinator
//! compacts its partitions itself ([`super::compact`]) once they hold
//! `offsets_compaction_records` records, and a new coordinator replays
//! what is left.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use runnel_proto::v1 as pb;
use runnel_proto::v1::consumer_groups_client::ConsumerGroupsClient;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::appender::{AppendError, Appender};
use super::compact::{compact, due, for_each_record};
use super::record::{group_key, group_value, parse_group_key, parse_group_value};
use super::state::{Group, GroupError, GroupState, JoinArgs};
use crate::broker::{now_ms, Broker};
use crate::error::BrokerError;
use crate::partitioner::partition_for_key;

/// The internal topic holding committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Its partition count when created.
pub const OFFSETS_PARTITIONS: i32 = 16;
/// Default session timeout when the request says 0 (ms).
pub const SESSION_TIMEOUT_DEFAULT_MS: u32 = 10_000;
/// Bounds on session and rebalance timeouts (ms).
const TIMEOUT_MIN_MS: u32 = 100;
const TIMEOUT_MAX_MS: u32 = 300_000;
/// Longest group id.
const GROUP_ID_MAX: usize = 249;
/// How often groups are ticked.
const TICK: Duration = Duration::from_millis(100);
/// The first and the longest wait before a failed replay of an offsets
/// partition is tried again (doubling in between).
const REPLAY_RETRY_MIN: Duration = Duration::from_secs(1);
const REPLAY_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long an applied offset tombstone is remembered, against writes
/// stored before it whose apply runs late (microseconds, in practice).
const TOMBSTONE_MEMORY_MS: i64 = 60_000;

/// Longest metadata string of a committed offset (Kafka's
/// `offset.metadata.max.bytes`).
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;

/// `max.message.bytes` of `__consumer_offsets`: a group record names every
/// member's assignment, which passes the 1 MiB default with a few hundred
/// members of a large topic.
pub const OFFSETS_MESSAGE_BYTES_MAX: &str = "16777216";

/// `segment.bytes` of `__consumer_offsets`: compaction deletes only
/// whole segments below its copy, so the default gigabyte would rarely
/// give any space back.
pub const OFFSETS_SEGMENT_BYTES: &str = "104857600";

/// How long a group record that failed to store waits before the next try.
const PERSIST_RETRY: Duration = Duration::from_millis(200);

/// Why a coordinator call failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(
        "this broker is not (yet) the coordinator of group '{group}'; find the coordinator again"
    )]
    NotCoordinator { group: String },
    #[error("unknown group '{group}'")]
    UnknownGroup { group: String },
    #[error("group '{group}' is rebalancing; rejoin")]
    RebalanceInProgress { group: String },
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("storing to {OFFSETS_TOPIC} failed: {0}")]
    Append(#[from] AppendError),
    #[error("{OFFSETS_TOPIC} needs {want} live brokers for its replicas (offsets_topic_replication_factor), and {live} are live; try again once they are")]
    OffsetsTopicUnavailable { live: i32, want: i32 },
    /// The group's record (its members, their topics and assignments) is
    /// larger than the offsets topic takes: fewer members or topics.
    #[error("group '{group}' is too large to store with this member (fewer members, or fewer or shorter topic names): {reason}")]
    GroupTooLarge { group: String, reason: String },
}

impl CoordinatorError {
    /// The wire error code.
    pub fn code(&self) -> pb::ErrorCode {
        match self {
            // Retriable, as Kafka's COORDINATOR_NOT_AVAILABLE.
            CoordinatorError::NotCoordinator { .. }
            | CoordinatorError::OffsetsTopicUnavailable { .. } => pb::ErrorCode::NotCoordinator,
            CoordinatorError::UnknownGroup { .. } => pb::ErrorCode::UnknownGroup,
            CoordinatorError::RebalanceInProgress { .. } => pb::ErrorCode::RebalanceInProgress,
            CoordinatorError::Group(GroupError::UnknownMember { .. }) => {
                pb::ErrorCode::UnknownMember
            }
            CoordinatorError::Group(GroupError::IllegalGeneration { .. }) => {
                pb::ErrorCode::IllegalGeneration
            }
            CoordinatorError::Group(GroupError::NotEmpty { .. }) => pb::ErrorCode::GroupNotEmpty,
            CoordinatorError::Group(GroupError::FencedInstance { .. }) => {
                pb::ErrorCode::FencedInstanceId
            }
            // Fenced like a stale generation: the member must rejoin.
            CoordinatorError::Group(GroupError::NotOwner { .. }) => {
                pb::ErrorCode::IllegalGeneration
            }
            CoordinatorError::Broker(e) => e.code(),
            CoordinatorError::Append(e) => e.code,
            CoordinatorError::GroupTooLarge { .. } => pb::ErrorCode::RecordTooLarge,
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> tonic::Status {
        match e {
            CoordinatorError::Broker(b) => b.into(),
            other => crate::error::status(other.code(), other.to_string(), None),
        }
    }
}

type Result<T> = std::result::Result<T, CoordinatorError>;

/// One offset record to append: topic, partition, and the value, or None
/// for a tombstone.
type OffsetWrite = (String, i32, Option<OffsetValue>);

/// A committed offset as its record holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OffsetValue {
    offset: i64,
    metadata: String,
    /// The id of the topic it was committed for (KIP-516's topic ids);
    /// empty in records written before offsets carried it. An offset of
    /// another id belongs to a topic since deleted (and perhaps created
    /// again under the name): it is not served, whether or not its
    /// tombstone was written (the coordinator may have been down when the
    /// topic went, or the write failed).
    topic_id: String,
}

/// Whether `c`, committed for `topic`, is for the topic of that name now.
fn is_current(meta: &runnel_controller::ClusterMetadata, topic: &str, c: &Committed) -> bool {
    c.topic_id.is_empty()
        || meta
            .topics
            .get(topic)
            .is_some_and(|t| t.topic_id == c.topic_id)
}

/// `s` as compared between members: UNSPECIFIED is cooperative sticky
/// (the default), so a member asking for either joins a group of the
/// other.
fn same_strategy(s: pb::AssignmentStrategy) -> pb::AssignmentStrategy {
    match s {
        pb::AssignmentStrategy::Unspecified => pb::AssignmentStrategy::CooperativeSticky,
        other => other,
    }
}

fn invalid(reason: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Broker(BrokerError::InvalidRequest {
        reason: reason.into(),
    })
}

/// How long the metrics endpoint may spend on group lag per scrape.
const STATS_TIME_MAX: Duration = Duration::from_secs(5);
/// Groups described at once for a scrape.
const STATS_CONCURRENCY: usize = 8;

/// A committed offset.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Committed {
    offset: i64,
    metadata: String,
    /// See [`OffsetValue::topic_id`].
    topic_id: String,
    /// Where the commit record sits in `__consumer_offsets` (newest wins).
    log_offset: i64,
    /// When it was committed (ms; replayed: its record's timestamp).
    committed_ms: i64,
}

/// A loaded group: membership plus committed offsets.
struct Entry {
    group: Group,
    offsets: BTreeMap<(String, i32), Committed>,
    /// Generation whose metadata record was last queued for writing.
    queued: i32,
    /// Generation whose metadata record is stored (joins answer then).
    persisted: i32,
    /// Bumped when a rebalance completes or the group goes away; waiting
    /// joins look again.
    changed: watch::Sender<u64>,
    /// Member ids handed to joins that asked for one first, not yet used
    /// to join, with when they lapse (ms). Not persisted: a member whose
    /// coordinator moved is told UNKNOWN_MEMBER and starts over.
    ids_handed_out: HashMap<String, i64>,
    /// Offsets deleted lately: the tombstone's log offset, and when it was
    /// applied (ms). A commit stored before it but applied after it (their
    /// tasks ran the other way round) must not bring the offset back.
    tombstoned: HashMap<(String, i32), (i64, i64)>,
    /// Bumped by a membership change that keeps the generation (a static
    /// member replaced under a new member id): its record is written as a
    /// new generation's is, and the join waits for it. `version_queued`
    /// and `version_stored` follow it as `queued` and `persisted` follow
    /// the generation.
    version: u64,
    version_queued: u64,
    version_stored: u64,
    /// Which entry of this name this is (unique in the process): a record
    /// write finishing after its group was deleted must not mark the
    /// records of a new group of the same name as stored (its
    /// generations start over, and its joins were answered before their
    /// records were stored).
    incarnation: u64,
    /// The (generation, version) whose record the offsets topic refused
    /// as too large, and why. Not tried again: the joins of that
    /// membership are refused, and sessions expire as if it were stored,
    /// so the group shrinks until its record fits. Retried forever, its
    /// joins waited until their deadline, round after round, and no
    /// member ever expired.
    unstorable: Option<(i32, u64, String)>,
    /// Since when the group has had no member (ms), as this coordinator
    /// saw it (a new coordinator counts from its first tick): its offsets
    /// expire `offsets_retention_ms` after that or after their commit,
    /// whichever is later.
    empty_since: Option<i64>,
    /// Tombstones for its expired offsets are being written.
    expiring: bool,
    /// After a failed expiry, when the next may run.
    expire_not_before: Option<tokio::time::Instant>,
    /// Writes queued for it and not applied yet: its offsets do not
    /// expire meanwhile (a commit in flight would be deleted by the
    /// tombstones written after it).
    pending_writes: usize,
}

/// The next [`Entry::incarnation`].
static INCARNATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Entry {
    fn new(id: &str) -> Self {
        Self {
            incarnation: INCARNATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            group: Group::new(id),
            offsets: BTreeMap::new(),
            queued: 0,
            persisted: 0,
            changed: watch::channel(0).0,
            ids_handed_out: HashMap::new(),
            tombstoned: HashMap::new(),
            unstorable: None,
            version: 0,
            version_queued: 0,
            version_stored: 0,
            empty_since: None,
            expiring: false,
            expire_not_before: None,
            pending_writes: 0,
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn exists(&self) -> bool {
        !self.group.members.is_empty() || !self.offsets.is_empty()
    }

    /// Nothing to keep: see [`GroupCoordinator::tick`].
    fn is_idle(&self) -> bool {
        !self.exists()
            && self.ids_handed_out.is_empty()
            // Tombstones are remembered until they lapse: forgotten with
            // the entry, a commit older than a delete that applied after
            // it made a fresh entry with that offset.
            && self.tombstoned.is_empty()
            && self.changed.receiver_count() == 0
            && self.queued == self.persisted
            && self.version_queued == self.version_stored
            && self.pending_writes == 0
            && !self.expiring
    }

    /// Whether the record of the current membership is stored.
    fn stored(&self) -> bool {
        self.persisted >= self.group.generation && self.version_stored >= self.version
    }

    /// Why the record of the current membership cannot be stored, if the
    /// offsets topic refused it as too large.
    fn unstorable(&self) -> Option<&str> {
        self.unstorable
            .as_ref()
            .filter(|(generation, version, _)| {
                *generation == self.group.generation && *version == self.version
            })
            .map(|(_, _, why)| why.as_str())
    }
}

#[derive(Default)]
struct Inner {
    /// Offsets partitions this broker leads and has replayed: index → epoch.
    loaded: HashMap<i32, i32>,
    /// Replays under way: (index, epoch).
    loading: BTreeSet<(i32, i32)>,
    /// Replays that failed: (index, epoch) → when to try again, and the
    /// wait after the next failure. Without, a partition that could not
    /// be read (a corrupt batch) was read again from its start every
    /// tick, with a warning each time.
    failed: HashMap<(i32, i32), (tokio::time::Instant, Duration)>,
    /// Groups of the loaded partitions.
    groups: HashMap<String, Entry>,
    /// The writer of every loaded partition.
    appenders: HashMap<i32, Appender>,
    /// Compaction of each offsets partition ([`super::compact`]).
    compactions: HashMap<i32, Compaction>,
    /// When groups are next looked at for expired offsets.
    next_expiry_scan: Option<tokio::time::Instant>,
}

/// An offsets partition's compaction.
#[derive(Debug, Default)]
struct Compaction {
    /// Whether one runs.
    running: bool,
    /// Records the last one kept: the next waits for twice as many.
    live: u64,
    /// When one may run again after a failure.
    not_before: Option<tokio::time::Instant>,
}

/// How often groups are looked at for expired offsets.
const EXPIRY_SCAN: Duration = Duration::from_secs(5);
/// Most offsets of one group expired in one write.
const EXPIRE_BATCH_MAX: usize = 1_000;
/// How long a group whose expiry failed waits before the next.
const EXPIRE_RETRY: Duration = Duration::from_secs(30);

/// How long a failed compaction waits before the next try.
const COMPACTION_RETRY: Duration = Duration::from_secs(30);

/// Every topic's partition count, and the metadata it was computed from.
type CountsOf = (
    Arc<runnel_controller::metadata::ClusterMetadata>,
    Arc<BTreeMap<String, i32>>,
);

/// The coordinator of every group whose offsets partition this broker leads.
pub struct GroupCoordinator {
    broker: Arc<Broker>,
    inner: Mutex<Inner>,
    /// Serialises the creation of the offsets topic on this broker.
    create: tokio::sync::Mutex<()>,
    /// [`GroupCoordinator::partition_counts`] of the metadata it was
    /// computed from.
    counts: std::sync::Mutex<Option<CountsOf>>,
    /// Where the next metrics scrape starts describing groups.
    stats_cursor: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for GroupCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCoordinator").finish_non_exhaustive()
    }
}

/// The offsets partition of `group`.
pub fn partition_for_group(group: &str, partitions: i32) -> i32 {
    partition_for_key(group.as_bytes(), partitions)
}

fn record_key(group: &str, topic: &str, partition: i32) -> Bytes {
    Bytes::from(format!("offset\0{group}\0{topic}\0{partition}"))
}

pub(super) fn parse_key(key: &[u8]) -> Option<(String, String, i32)> {
    let s = std::str::from_utf8(key).ok()?;
    let mut it = s.split('\0');
    if it.next()? != "offset" {
        return None;
    }
    let (g, t, p) = (it.next()?, it.next()?, it.next()?.parse().ok()?);
    Some((g.to_string(), t.to_string(), p))
}

/// `{offset}\0{metadata}`, or with a topic id
/// `v1\0{topic id}\0{offset}\0{metadata}` (an offset starts with a digit
/// or '-', so the two never mix up).
fn record_value(v: &OffsetValue) -> Bytes {
    if v.topic_id.is_empty() {
        Bytes::from(format!("{}\0{}", v.offset, v.metadata))
    } else {
        Bytes::from(format!("v1\0{}\0{}\0{}", v.topic_id, v.offset, v.metadata))
    }
}

fn parse_value(v: &[u8]) -> Option<OffsetValue> {
    let s = std::str::from_utf8(v).ok()?;
    let (topic_id, rest) = match s.strip_prefix("v1\0") {
        Some(rest) => {
            let (id, rest) = rest.split_once('\0')?;
            (id.to_string(), rest)
        }
        None => (String::new(), s),
    };
    let (o, m) = rest.split_once('\0')?;
    Some(OffsetValue {
        offset: o.parse().ok()?,
        metadata: m.to_string(),
        topic_id,
    })
}

fn validate_group_id(group: &str) -> Result<()> {
    if group.is_empty() || group.len() > GROUP_ID_MAX || group.contains('\0') {
        return Err(invalid(format!(
            "group id must be 1 to {GROUP_ID_MAX} characters without NUL, got '{group}'"
        )));
    }
    Ok(())
}

/// Longest client id, instance id or member id a join may carry.
const MEMBER_ID_FIELD_MAX: usize = 255;

/// Most topics one member may subscribe to.
const MEMBER_TOPICS_MAX: usize = 1_000;

/// Most partitions one member may list as owned.
const MEMBER_OWNED_MAX: usize = 100_000;

/// Bounds what a join puts in the group record: every member's ids and
/// subscription are stored in it, and a record larger than the offsets
/// topic takes could never be stored (every join of the group then
/// waited, and the record was rebuilt and retried forever). A client id
/// of megabytes of control characters, escaped six-fold in the record,
/// did that alone.
fn validate_member_fields(req: &pb::JoinGroupRequest) -> Result<()> {
    // A member id is built from the client id and two numbers: room for
    // those beyond a client id of the longest length.
    const MEMBER_ID_MAX: usize = MEMBER_ID_FIELD_MAX + 48;
    for (name, value, max) in [
        ("client_id", &req.client_id, MEMBER_ID_FIELD_MAX),
        (
            "group_instance_id",
            &req.group_instance_id,
            MEMBER_ID_FIELD_MAX,
        ),
        ("member_id", &req.member_id, MEMBER_ID_MAX),
    ] {
        if value.len() > max || value.chars().any(char::is_control) {
            return Err(invalid(format!(
                "{name} must be at most {max} bytes without control characters"
            )));
        }
    }
    if req.topics.len() > MEMBER_TOPICS_MAX {
        return Err(invalid(format!(
            "a member may subscribe to at most {MEMBER_TOPICS_MAX} topics, not {}",
            req.topics.len()
        )));
    }
    if let Some(bad) = req
        .topics
        .iter()
        .chain(req.owned_partitions.iter().map(|tp| &tp.topic))
        .find(|t| runnel_controller::metadata::validate_topic_name(t).is_err())
    {
        let shown: String = bad.chars().take(64).collect();
        return Err(invalid(format!("'{shown}' is not a valid topic name")));
    }
    if req.owned_partitions.len() > MEMBER_OWNED_MAX {
        return Err(invalid(format!(
            "a member may list at most {MEMBER_OWNED_MAX} owned partitions, not {}",
            req.owned_partitions.len()
        )));
    }
    Ok(())
}

impl GroupCoordinator {
    /// Creates the coordinator and starts its background task (it ends
    /// when the coordinator is dropped).
    pub fn start(broker: Arc<Broker>) -> Arc<Self> {
        let me = Arc::new(Self {
            broker,
            inner: Mutex::new(Inner::default()),
            create: tokio::sync::Mutex::new(()),
            counts: std::sync::Mutex::new(None),
            stats_cursor: std::sync::atomic::AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&me);
        let rx = me.broker.metadata().watch();
        tokio::spawn(run(weak, rx));
        me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Partition counts of every topic.
    /// Every topic's partition count, computed again only when the
    /// metadata changed (every tick asks).
    fn partition_counts(&self) -> Arc<BTreeMap<String, i32>> {
        let meta = self.broker.metadata().current();
        let mut cached = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((of, counts)) = &*cached {
            if Arc::ptr_eq(of, &meta) {
                return counts.clone();
            }
        }
        let counts: Arc<BTreeMap<String, i32>> = Arc::new(
            meta.topics
                .values()
                .map(|t| (t.name.clone(), t.partitions.len() as i32))
                .collect(),
        );
        *cached = Some((meta, counts.clone()));
        counts
    }

    /// Takes up and drops offsets partitions as leadership moves.
    fn sync_leadership(self: &Arc<Self>) {
        let meta = self.broker.metadata().current();
        let me = self.broker.node_id();
        let led: HashMap<i32, i32> = meta
            .topics
            .get(OFFSETS_TOPIC)
            .map(|t| {
                t.partitions
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.leader == me)
                    .map(|(i, p)| (i as i32, p.leader_epoch))
                    .collect()
            })
            .unwrap_or_default();
        let count = meta
            .topics
            .get(OFFSETS_TOPIC)
            .map_or(OFFSETS_PARTITIONS, |t| t.partitions.len() as i32);
        let mut to_load = Vec::new();
        {
            let mut inner = self.lock();
            let gone: Vec<i32> = inner
                .loaded
                .iter()
                .filter(|(i, e)| led.get(i) != Some(e))
                .map(|(i, _)| *i)
                .collect();
            for i in gone {
                info!(partition = i, "no longer coordinator for offsets partition");
                inner.loaded.remove(&i);
                inner.appenders.remove(&i);
                let ids: Vec<String> = inner
                    .groups
                    .keys()
                    .filter(|g| partition_for_group(g, count) == i)
                    .cloned()
                    .collect();
                for id in ids {
                    if let Some(e) = inner.groups.remove(&id) {
                        e.notify();
                    }
                    self.broker.metrics().forget_group(&id);
                }
            }
            inner
                .failed
                .retain(|(i, epoch), _| led.get(i) == Some(epoch));
            let now = tokio::time::Instant::now();
            for (&i, &epoch) in &led {
                if inner.loaded.get(&i) == Some(&epoch)
                    || inner.loading.contains(&(i, epoch))
                    || inner
                        .failed
                        .get(&(i, epoch))
                        .is_some_and(|(again, _)| *again > now)
                {
                    continue;
                }
                let ready = self
                    .broker
                    .hosted_partition(OFFSETS_TOPIC, i)
                    .is_some_and(|p| p.leader_epoch() == Some(epoch));
                if ready {
                    inner.loading.insert((i, epoch));
                    to_load.push((i, epoch));
                }
            }
        }
        for (i, epoch) in to_load {
            let me = self.clone();
            tokio::spawn(async move { me.load(i, epoch, count).await });
        }
    }

    /// Replays offsets partition `index` into the groups map.
    async fn load(self: Arc<Self>, index: i32, epoch: i32, count: i32) {
        let started = std::time::Instant::now();
        let Some(partition) = self.broker.hosted_partition(OFFSETS_TOPIC, index) else {
            self.lock().loading.remove(&(index, epoch));
            return;
        };
        let log = partition.log.clone();
        let replay = tokio::task::spawn_blocking(move || {
            let mut offsets: HashMap<String, BTreeMap<(String, i32), Committed>> = HashMap::new();
            // The last metadata record of each group (None: deleted).
            let mut metas: HashMap<String, Option<bytes::Bytes>> = HashMap::new();
            let mut records = 0u64;
            for_each_record(&log, log.log_start_offset(), log.log_end_offset(), |r| {
                if let Some(g) = r.key.as_deref().and_then(parse_group_key) {
                    records += 1;
                    // A copy: the value is a slice of the read buffer (a
                    // megabyte, from the active segment), which a slice
                    // kept alive until the replay ended, one per group.
                    metas.insert(g, r.value.as_deref().map(bytes::Bytes::copy_from_slice));
                    return;
                }
                let Some((g, t, p)) = r.key.as_deref().and_then(parse_key) else {
                    return;
                };
                records += 1;
                let map = offsets.entry(g).or_default();
                match r.value.as_deref().and_then(parse_value) {
                    Some(v) => {
                        map.insert(
                            (t, p),
                            Committed {
                                offset: v.offset,
                                metadata: v.metadata,
                                topic_id: v.topic_id,
                                log_offset: r.offset,
                                committed_ms: r.timestamp_ms,
                            },
                        );
                    }
                    None => {
                        map.remove(&(t, p));
                    }
                }
            })?;
            Ok::<_, runnel_storage::StorageError>((offsets, metas, records))
        })
        .await;
        let mut inner = self.lock();
        inner.loading.remove(&(index, epoch));
        let (mut offsets, metas, records) = match replay {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let wait = inner
                    .failed
                    .get(&(index, epoch))
                    .map_or(REPLAY_RETRY_MIN, |(_, wait)| *wait);
                warn!(partition = index, error = %e, retry_in = ?wait, "replaying offsets partition failed");
                inner.failed.insert(
                    (index, epoch),
                    (
                        tokio::time::Instant::now() + wait,
                        (wait * 2).min(REPLAY_RETRY_MAX),
                    ),
                );
                return;
            }
            Err(_) => return,
        };
        inner.failed.remove(&(index, epoch));
        let meta = self.broker.metadata().current();
        let still = meta
            .topics
            .get(OFFSETS_TOPIC)
            .and_then(|t| t.partitions.get(index as usize))
            .is_some_and(|p| p.leader == self.broker.node_id() && p.leader_epoch == epoch);
        if !still {
            return;
        }
        let now = now_ms();
        let mut ids: BTreeSet<String> = offsets.keys().cloned().collect();
        ids.extend(metas.keys().cloned());
        let mut groups = 0;
        // Groups whose record (parsed: one of another version's format is
        // left alone) says they are empty, and which have no offsets:
        // forgotten, as a tick forgets them, with their record deleted
        // (one stored just before a failover, or by an older version,
        // was otherwise kept by every compaction for good).
        let mut orphans = Vec::new();
        for g in ids {
            if partition_for_group(&g, count) != index {
                continue;
            }
            let mut e = Entry::new(&g);
            e.offsets = offsets.remove(&g).unwrap_or_default();
            // Offsets of topics gone (or recreated) since: not loaded.
            e.offsets.retain(|(t, _), c| is_current(&meta, t, c));
            let mut parsed = false;
            if let Some(group) = metas
                .get(&g)
                .and_then(Option::as_deref)
                .and_then(|v| parse_group_value(&g, v, now))
            {
                parsed = true;
                e.queued = group.generation;
                e.persisted = group.generation;
                e.group = group;
            }
            if !e.exists() {
                if parsed {
                    orphans.push(pb::Record {
                        key: Some(group_key(&g)),
                        value: None,
                        ..Default::default()
                    });
                }
                continue;
            }
            groups += 1;
            if let Some(old) = inner.groups.insert(g, e) {
                old.notify();
            }
        }
        inner.loaded.insert(index, epoch);
        let appender = Appender::start(self.broker.clone(), index);
        if !orphans.is_empty() {
            // Nobody waits: one not deleted now is deleted by the next
            // coordinator's replay.
            drop(appender.submit(orphans));
        }
        inner.appenders.insert(index, appender);
        info!(
            partition = index,
            leader_epoch = epoch,
            groups,
            records,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "coordinator for offsets partition"
        );
    }

    /// Counts a completed rebalance of `group` and its duration.
    fn rebalanced(&self, group: &Group, now: i64) {
        let took = (now - group.rebalance_started_ms).max(0) as u64;
        self.broker
            .metrics()
            .rebalanced(&group.id, Duration::from_millis(took));
    }

    /// Lag, members and generation of every group this node coordinates,
    /// for the metrics endpoint (partitions led elsewhere are asked of
    /// their leaders, as `describe` does).
    pub async fn stats(&self) -> Vec<crate::metrics::snapshot::GroupStats> {
        let mut ids: Vec<String> = self
            .list_groups(true)
            .await
            .groups
            .into_iter()
            .map(|g| g.group)
            .collect();
        // Each scrape starts where the last one ran out of time: from the
        // top every time, the same groups were left out of every scrape.
        let total = ids.len();
        if total > 0 {
            let from = self.stats_cursor.load(std::sync::atomic::Ordering::Relaxed) % total;
            ids.rotate_left(from);
        }
        // A scrape must answer in time: groups not described by then are
        // left out of this one.
        // Described a few at once: one after another, the groups last in
        // the list were left out of every scrape of a large cluster.
        let deadline = tokio::time::Instant::now() + STATS_TIME_MAX;
        let mut out = Vec::with_capacity(ids.len());
        // Boxed up front: a closure in the stream's type defeats the
        // Send proof of the endpoint's handler.
        type Describe<'a> = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<pb::GroupDescription>> + Send + 'a>,
        >;
        let asks: Vec<Describe<'_>> = ids
            .iter()
            .map(|id| Box::pin(self.describe(id)) as Describe<'_>)
            .collect();
        let mut described = futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(asks),
            STATS_CONCURRENCY,
        );
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let d = match tokio::time::timeout(left, futures_util::StreamExt::next(&mut described))
                .await
            {
                Ok(Some(Ok(d))) => d,
                Ok(Some(Err(_))) => continue,
                Ok(None) => break,
                Err(_) => {
                    let done = out.len();
                    self.stats_cursor
                        .fetch_add(done.max(1), std::sync::atomic::Ordering::Relaxed);
                    warn!(
                        described = done,
                        left_out = total - done,
                        "group lag for the metrics ran out of time; the next scrape goes on from there"
                    );
                    break;
                }
            };
            out.push(crate::metrics::snapshot::GroupStats {
                group: d.group,
                members: d.members.len(),
                generation: d.generation_id,
                total_lag: d.total_lag,
                partitions: d
                    .lags
                    .into_iter()
                    .map(|l| crate::metrics::snapshot::GroupPartitionLag {
                        topic: l.topic,
                        partition: l.partition,
                        committed_offset: l.committed_offset,
                        log_end_offset: l.log_end_offset,
                        lag: l.lag,
                    })
                    .collect(),
            });
        }
        out
    }

    /// Queues `group`'s metadata record when its generation moved since the
    /// last one queued; once stored, waiting joins are told. Called under
    /// the lock right after the change, so records go out in generation
    /// order. A record that cannot be stored (the offsets partition short
    /// of in-sync replicas, say) is tried again, with the generation
    /// current by then, until it is stored or the group or this
    /// coordinator goes; meanwhile the joins of that generation wait.
    fn persist(self: &Arc<Self>, inner: &mut Inner, group: &str) {
        let count = self.offsets_partition_count();
        let index = partition_for_group(group, count);
        let Inner {
            groups, appenders, ..
        } = inner;
        let (Some(e), Some(appender)) = (groups.get_mut(group), appenders.get(&index)) else {
            return;
        };
        let generation = e.group.generation;
        let version = e.version;
        if e.queued == generation && e.version_queued == version {
            return;
        }
        e.queued = generation;
        e.version_queued = version;
        let record = pb::Record {
            key: Some(group_key(group)),
            value: Some(group_value(&e.group)),
            ..Default::default()
        };
        let stored = appender.submit(vec![record]);
        let (me, group) = (Arc::downgrade(self), group.to_string());
        let incarnation = e.incarnation;
        tokio::spawn(async move {
            // Err((why, whether it can never be stored)).
            let outcome = match stored.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err((e.to_string(), e.code == pb::ErrorCode::RecordTooLarge)),
                Err(_) => Err(("the writer stopped".to_string(), false)),
            };
            match &outcome {
                Ok(()) => {}
                // Never fits, however often it is tried: its joins are
                // told (see `Entry::unstorable`).
                Err((error, true)) => {
                    warn!(%group, generation, %error, "the group record is too large to store; its joins are refused");
                }
                // Not stored: the joins of this generation stay waiting
                // (until their deadline: REBALANCE_IN_PROGRESS, and the
                // clients join again). Answering them would let a
                // failover bring back an older generation whose members
                // it accepts again, and their commits with it.
                Err((error, false)) => {
                    warn!(%group, generation, %error, "storing the group record failed; retrying");
                    tokio::time::sleep(PERSIST_RETRY).await;
                }
            }
            let Some(me) = me.upgrade() else { return };
            let mut inner = me.lock();
            let Some(e) = inner
                .groups
                .get_mut(&group)
                .filter(|e| e.incarnation == incarnation)
            else {
                return;
            };
            match outcome {
                Ok(()) => {
                    e.persisted = e.persisted.max(generation);
                    e.version_stored = e.version_stored.max(version);
                    e.unstorable = None;
                    if e.stored() {
                        e.group.touch_members(now_ms());
                    }
                    e.notify();
                }
                Err((error, true)) => {
                    e.unstorable = Some((generation, version, error));
                    e.notify();
                }
                Err((_, false)) => {
                    if e.queued == generation {
                        e.queued = e.persisted;
                    }
                    if e.version_queued == version {
                        e.version_queued = e.version_stored;
                    }
                    me.persist(&mut inner, &group);
                }
            }
        });
    }

    fn offsets_partition_count(&self) -> i32 {
        self.broker
            .metadata()
            .current()
            .topics
            .get(OFFSETS_TOPIC)
            .map_or(OFFSETS_PARTITIONS, |t| t.partitions.len() as i32)
    }

    /// Session expiry, rebalance deadlines and grown topics for every group.
    fn tick(self: &Arc<Self>) {
        let counts = self.partition_counts();
        let now = now_ms();
        let mut inner = self.lock();
        let mut moved = Vec::new();
        for e in inner.groups.values_mut() {
            e.ids_handed_out.retain(|_, lapses| *lapses > now);
            e.tombstoned
                .retain(|_, (_, applied)| now - *applied < TOMBSTONE_MEMORY_MS);
            let before = e.group.generation;
            // Members whose join waits for the group record to be stored
            // (an acks=all append held up by a stalled follower, say) get
            // no answer and so cannot heartbeat: their sessions count
            // from when it is stored, not from the rebalance. Else a
            // store slower than the session expired the whole group.
            let gone = if e.stored() || e.unstorable().is_some() {
                e.group.expire(now)
            } else {
                Vec::new()
            };
            if !gone.is_empty() {
                info!(group = %e.group.id, members = ?gone, "session expired");
            }
            e.group.check_partition_counts(now, &counts);
            let completed = e.group.try_complete(now, &counts);
            if completed {
                self.rebalanced(&e.group, now);
                info!(group = %e.group.id, generation = e.group.generation, members = e.group.members.len(), "rebalance complete");
            }
            if completed || !gone.is_empty() {
                e.notify();
            }
            if e.group.generation != before {
                moved.push(e.group.id.clone());
            }
        }
        for g in moved {
            self.persist(&mut inner, &g);
        }
        self.start_compactions(&mut inner);
        self.start_expiries(&mut inner, now);
        // A group with nothing left (no member, no offset, no id handed
        // out, no join waiting, its last record stored) is forgotten, as
        // Kafka's groups go Dead: entries made by any group id a client
        // named (a join that failed, a first join never followed up)
        // otherwise stayed for good. Its next use starts it afresh.
        let idle: Vec<String> = inner
            .groups
            .iter()
            .filter(|(_, e)| e.is_idle())
            .map(|(id, _)| id.clone())
            .collect();
        let count = self.offsets_partition_count();
        for id in idle {
            let e = inner.groups.remove(&id).expect("listed above");
            self.broker.metrics().forget_group(&id);
            // Its last record (no member, no offset) is deleted too:
            // compaction kept it, one per group id ever used, for every
            // replay to read. Queued now, it lands before the record of
            // any group of that name made later.
            if e.persisted > 0 || e.version_stored > 0 {
                if let Some(appender) = inner.appenders.get(&partition_for_group(&id, count)) {
                    // Nobody waits for it: a failed write leaves the
                    // record, as before.
                    drop(appender.submit(vec![pb::Record {
                        key: Some(group_key(&id)),
                        value: None,
                        ..Default::default()
                    }]));
                }
            }
        }
    }

    /// Starts writing tombstones for the offsets of each group without
    /// members that are older than `offsets_retention_ms` (counted from
    /// their commit or from when the group emptied, whichever is later),
    /// as Kafka expires offsets (KIP-211): without, a group used once kept
    /// its offsets, and its entry, for good. A group whose offsets all
    /// expire has its record deleted too, and is forgotten.
    fn start_expiries(self: &Arc<Self>, inner: &mut Inner, now: i64) {
        let retention = self.broker.config().broker.offsets_retention_ms;
        if retention == 0 {
            return;
        }
        // Every few seconds, not every tick: the scan walks every offset
        // of every group without members, under the lock heartbeats and
        // commits need, for a retention counted in days.
        // Monotonic: a wall clock stepped back would stop the scans for
        // as long as the step.
        let at = tokio::time::Instant::now();
        if inner.next_expiry_scan.is_some_and(|next| at < next) {
            return;
        }
        inner.next_expiry_scan = Some(at + EXPIRY_SCAN);
        let retention = i64::try_from(retention).unwrap_or(i64::MAX);
        let mut due = Vec::new();
        for e in inner.groups.values_mut() {
            if !e.group.members.is_empty() {
                e.empty_since = None;
                continue;
            }
            let since = *e.empty_since.get_or_insert(now);
            if e.expiring || e.pending_writes > 0 || e.expire_not_before.is_some_and(|t| at < t) {
                continue;
            }
            // At most a batch's worth at a time: one write of them all
            // could pass the offsets topic's max.message.bytes, refused
            // on every try.
            let stale: Vec<((String, i32), i64)> = e
                .offsets
                .iter()
                .filter(|(_, c)| now.saturating_sub(c.committed_ms.max(since)) > retention)
                .map(|(k, c)| (k.clone(), c.log_offset))
                .take(EXPIRE_BATCH_MAX)
                .collect();
            if stale.is_empty() {
                continue;
            }
            e.expiring = true;
            let all = stale.len() == e.offsets.len();
            due.push((e.group.id.clone(), stale, all));
        }
        for (group, stale, all) in due {
            let me = self.clone();
            tokio::spawn(async move { me.expire(group, stale, all).await });
        }
    }

    /// Writes tombstones for `stale` offsets of `group` (each with the
    /// log offset it was judged by), and for its record when `all` its
    /// offsets go, unless it gained a member, a write or a newer commit of
    /// one of them meanwhile.
    async fn expire(self: Arc<Self>, group: String, stale: Vec<((String, i32), i64)>, all: bool) {
        let index = {
            let inner = self.lock();
            self.coordinator_partition(&inner, &group)
        };
        let result = match index {
            Err(e) => Err(e),
            Ok(index) => {
                let tombstones = stale
                    .iter()
                    .map(|((t, p), _)| (t.clone(), *p, None))
                    .collect();
                let forget = all.then(|| pb::Record {
                    key: Some(group_key(&group)),
                    value: None,
                    ..Default::default()
                });
                let name = group.clone();
                let unchanged = move |inner: &Inner| -> Result<()> {
                    let untouched = inner.groups.get(&name).is_some_and(|e| {
                        e.group.members.is_empty()
                            && e.pending_writes == 0
                            && stale.iter().all(|(k, at)| {
                                e.offsets.get(k).is_some_and(|c| c.log_offset == *at)
                            })
                    });
                    if untouched {
                        Ok(())
                    } else {
                        Err(CoordinatorError::RebalanceInProgress {
                            group: name.clone(),
                        })
                    }
                };
                self.append_offsets_checked(
                    &group,
                    index,
                    tombstones,
                    forget.into_iter().collect(),
                    unchanged,
                )
                .await
            }
        };
        let mut inner = self.lock();
        if let Some(e) = inner.groups.get_mut(&group) {
            e.expiring = false;
            if result.is_err() {
                e.expire_not_before = Some(tokio::time::Instant::now() + EXPIRE_RETRY);
            }
            if result.is_ok() && !e.exists() {
                e.notify();
                self.broker.metrics().forget_group(&group);
            }
        }
        match result {
            Ok(()) => info!(%group, all, "expired committed offsets"),
            Err(e) => debug!(%group, error = %e, "offsets not expired this time"),
        }
    }

    /// Starts a compaction of each loaded offsets partition that holds
    /// more records than `offsets_compaction_records` and twice what its
    /// last compaction kept, unless one runs or failed lately.
    fn start_compactions(self: &Arc<Self>, inner: &mut Inner) {
        let min = self.broker.config().broker.offsets_compaction_records;
        if min == 0 {
            return;
        }
        let now = tokio::time::Instant::now();
        let Inner {
            appenders,
            compactions,
            loaded,
            ..
        } = inner;
        for (&index, appender) in appenders.iter() {
            let Some(&epoch) = loaded.get(&index) else {
                continue;
            };
            let c = compactions.entry(index).or_default();
            if c.running || c.not_before.is_some_and(|t| t > now) {
                continue;
            }
            let Some(p) = self.broker.hosted_partition(OFFSETS_TOPIC, index) else {
                continue;
            };
            let records = p.log.log_end_offset() - p.log.log_start_offset();
            if !due(records, c.live, min) {
                continue;
            }
            c.running = true;
            let (me, appender) = (self.clone(), appender.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let current = || {
                    let inner = me.lock();
                    inner.loaded.get(&index) == Some(&epoch)
                        && inner
                            .appenders
                            .get(&index)
                            .is_some_and(|a| a.same_as(&appender))
                };
                let result = compact(&appender, current).await;
                let mut inner = me.lock();
                let c = inner.compactions.entry(index).or_default();
                c.running = false;
                match result {
                    Ok(done) => {
                        c.live = done.live;
                        c.not_before = None;
                        info!(
                            partition = index,
                            records,
                            kept = done.live,
                            log_start_offset = done.log_start,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "offsets partition compacted"
                        );
                    }
                    Err(e) => {
                        if let Some(copied) = e.copied {
                            c.live = copied;
                        }
                        c.not_before = Some(tokio::time::Instant::now() + COMPACTION_RETRY);
                        warn!(partition = index, error = %e.error, copied = ?e.copied, retry_in = ?COMPACTION_RETRY, "compacting offsets partition failed");
                    }
                }
            });
        }
    }

    /// The offsets partition of `group` if this broker coordinates it now.
    /// `group`'s entry, created if missing, once this node is checked to
    /// coordinate it.
    fn served_entry<'a>(&self, inner: &'a mut Inner, group: &str) -> Result<&'a mut Entry> {
        self.coordinator_partition(inner, group)?;
        Ok(inner
            .groups
            .entry(group.to_string())
            .or_insert_with(|| Entry::new(group)))
    }

    fn coordinator_partition(&self, inner: &Inner, group: &str) -> Result<i32> {
        let meta = self.broker.metadata().current();
        let not = || CoordinatorError::NotCoordinator {
            group: group.to_string(),
        };
        let topic = meta.topics.get(OFFSETS_TOPIC).ok_or_else(not)?;
        let index = partition_for_group(group, topic.partitions.len() as i32);
        let p = &topic.partitions[index as usize];
        if p.leader != self.broker.node_id() || inner.loaded.get(&index) != Some(&p.leader_epoch) {
            return Err(not());
        }
        Ok(index)
    }

    /// Creates `__consumer_offsets` if missing.
    async fn ensure_offsets_topic(&self) -> Result<()> {
        if self
            .broker
            .metadata()
            .current()
            .topics
            .contains_key(OFFSETS_TOPIC)
        {
            return Ok(());
        }
        let _guard = self.create.lock().await;
        let meta = self.broker.metadata().current();
        if meta.topics.contains_key(OFFSETS_TOPIC) {
            return Ok(());
        }
        let live = meta
            .brokers
            .values()
            .filter(|b| !b.fenced && b.roles.iter().any(|r| r == "broker"))
            .count()
            .max(1) as i32;
        // As Kafka's offsets.topic.replication.factor (3): the topic is
        // created with three replicas, or one per voter on a smaller
        // cluster, once that many brokers are live. Taking whoever had
        // registered at the first FindCoordinator gave a cluster still
        // starting one copy of every commit for good.
        let configured = self.broker.config().broker.offsets_topic_replication_factor;
        let voters = self.broker.config().voters().map_or(1, |v| v.len()).max(1);
        let want = match configured {
            0 => (voters as i32).min(3),
            n => n,
        };
        if live < want {
            return Err(CoordinatorError::OffsetsTopicUnavailable { live, want });
        }
        let rf = match configured {
            0 => live.min(3),
            n => n,
        };
        let req = pb::CreateTopicRequest {
            name: OFFSETS_TOPIC.to_string(),
            partitions: OFFSETS_PARTITIONS,
            replication_factor: rf,
            // Kept forever: time retention would drop the last commit of
            // a partition that stopped moving. The coordinator compacts
            // it instead (`super::compact`), which frees whole segments:
            // 100 MiB ones, as Kafka's `offsets.topic.segment.bytes`.
            configs: [
                (
                    "segment.bytes".to_string(),
                    OFFSETS_SEGMENT_BYTES.to_string(),
                ),
                ("min.insync.replicas".to_string(), rf.min(2).to_string()),
                ("retention.ms".to_string(), "-1".to_string()),
                ("retention.bytes".to_string(), "-1".to_string()),
                (
                    "max.message.bytes".to_string(),
                    OFFSETS_MESSAGE_BYTES_MAX.to_string(),
                ),
            ]
            .into_iter()
            .collect(),
            validate_only: false,
        };
        match self.broker.create_topic(req).await {
            Ok(_) => {
                info!(replication_factor = rf, "created {OFFSETS_TOPIC}");
                Ok(())
            }
            Err(BrokerError::Metadata(runnel_controller::MetadataError::TopicAlreadyExists {
                ..
            })) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// FindCoordinator.
    pub async fn find_coordinator(&self, group: &str) -> Result<pb::FindCoordinatorResponse> {
        validate_group_id(group)?;
        self.ensure_offsets_topic().await?;
        let meta = self.broker.metadata().current();
        let not = || CoordinatorError::NotCoordinator {
            group: group.to_string(),
        };
        let topic = meta.topics.get(OFFSETS_TOPIC).ok_or_else(not)?;
        let index = partition_for_group(group, topic.partitions.len() as i32);
        let leader = topic.partitions[index as usize].leader;
        let address = meta
            .brokers
            .get(&leader)
            .map(|b| b.address.clone())
            .ok_or_else(not)?;
        Ok(pb::FindCoordinatorResponse {
            broker_id: leader,
            address,
        })
    }

    /// JoinGroup: waits until the rebalance completes.
    pub async fn join(
        self: &Arc<Self>,
        req: pb::JoinGroupRequest,
    ) -> Result<pb::JoinGroupResponse> {
        validate_group_id(&req.group)?;
        if req.topics.is_empty() || req.topics.iter().any(String::is_empty) {
            return Err(invalid("a member must subscribe to at least one topic"));
        }
        validate_member_fields(&req)?;
        let session = match req.session_timeout_ms {
            0 => SESSION_TIMEOUT_DEFAULT_MS,
            t => t,
        };
        let rebalance = match req.rebalance_timeout_ms {
            0 => session,
            t => t,
        };
        for (name, v) in [
            ("session_timeout_ms", session),
            ("rebalance_timeout_ms", rebalance),
        ] {
            if !(TIMEOUT_MIN_MS..=TIMEOUT_MAX_MS).contains(&v) {
                return Err(invalid(format!(
                    "{name} must be within {TIMEOUT_MIN_MS}..={TIMEOUT_MAX_MS}, got {v}"
                )));
            }
        }
        let strategy = pb::AssignmentStrategy::try_from(req.strategy)
            .map_err(|_| invalid(format!("unknown assignment strategy {}", req.strategy)))?;
        let protocol = pb::RebalanceProtocol::try_from(req.protocol)
            .map_err(|_| invalid(format!("unknown rebalance protocol {}", req.protocol)))?;
        if req.member_id.is_empty() && req.group_instance_id.is_empty() && req.member_id_first {
            // KIP-394: the id first; the member joins with it next. A
            // first join that is dropped leaves only this, which lapses.
            let mut inner = self.lock();
            let entry = self.served_entry(&mut inner, &req.group)?;
            let now = now_ms();
            entry.ids_handed_out.retain(|_, lapses| *lapses > now);
            let member_id = entry.group.new_member_id(&req.client_id, now);
            entry
                .ids_handed_out
                .insert(member_id.clone(), now + i64::from(session));
            debug!(group = %req.group, %member_id, "member id handed out");
            return Ok(pb::JoinGroupResponse {
                member_id,
                generation_id: -1,
                rejoin: true,
                member_id_required: true,
                ..Default::default()
            });
        }
        let mut args = JoinArgs {
            member_id: req.member_id.clone(),
            instance_id: req.group_instance_id.clone(),
            client_id: req.client_id.clone(),
            topics: req.topics.iter().cloned().collect(),
            session_timeout_ms: i64::from(session),
            rebalance_timeout_ms: i64::from(rebalance),
            strategy,
            protocol,
            owned: req
                .owned_partitions
                .iter()
                .map(|tp| (tp.topic.clone(), tp.partition))
                .collect(),
            preassigned: false,
        };
        let counts = self.partition_counts();
        let (member_id, joined_at, mut rx) = {
            let mut inner = self.lock();
            let entry = self.served_entry(&mut inner, &req.group)?;
            if entry.group.state != GroupState::Empty
                && !entry.group.members.is_empty()
                && same_strategy(entry.group.strategy) != same_strategy(strategy)
            {
                return Err(invalid(format!(
                    "group '{}' uses {:?}; every member must ask for the same strategy",
                    req.group, entry.group.strategy
                )));
            }
            if entry.group.state != GroupState::Empty
                && !entry.group.members.is_empty()
                && entry.group.protocol != protocol
            {
                return Err(invalid(format!(
                    "group '{}' uses the {:?} rebalance protocol; every member must ask for the same one",
                    req.group, entry.group.protocol
                )));
            }
            let joined_at = entry.group.generation;
            let now = now_ms();
            if !args.member_id.is_empty() {
                args.preassigned = entry
                    .ids_handed_out
                    .remove(&args.member_id)
                    .is_some_and(|lapses| lapses > now);
            }
            // A static member taking its instance's place under a new
            // member id, in a group that stays in its generation: the
            // record must name the new id before the join is answered, or
            // a failover brings back the old one (and its zombie).
            let replacing = args.member_id.is_empty()
                && !args.instance_id.is_empty()
                && entry
                    .group
                    .members
                    .values()
                    .any(|m| m.instance_id == args.instance_id);
            let member_id = entry.group.join(args, now)?;
            // Its offsets' retention counts again from when it next
            // empties (a member that joins and leaves between two looks
            // would otherwise go unseen).
            entry.empty_since = None;
            if replacing && entry.group.generation == joined_at {
                entry.version += 1;
            }
            if entry.group.try_complete(now, &counts) {
                self.rebalanced(&entry.group, now);
                entry.notify();
            } else if replacing {
                // The replaced incarnation's join, if one waits, is told.
                entry.notify();
            }
            let rx = entry.changed.subscribe();
            self.persist(&mut inner, &req.group);
            (member_id, joined_at, rx)
        };
        debug!(group = %req.group, %member_id, "join");
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(rebalance) + u64::from(session));
        loop {
            {
                let inner = self.lock();
                self.coordinator_partition(&inner, &req.group)?;
                let entry = inner.groups.get(&req.group).ok_or_else(|| {
                    CoordinatorError::Group(GroupError::UnknownMember {
                        group: req.group.clone(),
                        member_id: member_id.clone(),
                    })
                })?;
                let stored = entry.stored();
                if let Some(why) = entry.unstorable() {
                    if entry.group.members.contains_key(&member_id) {
                        return Err(CoordinatorError::GroupTooLarge {
                            group: req.group.clone(),
                            reason: why.to_string(),
                        });
                    }
                }
                if let Some(m) = entry
                    .group
                    .join_result(&member_id, joined_at)
                    .filter(|_| stored)
                {
                    return Ok(pb::JoinGroupResponse {
                        member_id: member_id.clone(),
                        generation_id: entry.group.generation,
                        assignment: m
                            .assignment
                            .iter()
                            .map(|(t, p)| pb::TopicPartition {
                                topic: t.clone(),
                                partition: *p,
                            })
                            .collect(),
                        // Frequent enough that members learn of a rebalance quickly.
                        heartbeat_interval_ms: (session / 5).clamp(50, 1_000),
                        rejoin: entry.group.state == GroupState::PreparingRebalance,
                        member_id_required: false,
                    });
                }
                if !entry.group.members.contains_key(&member_id) {
                    // Replaced by a newer incarnation of its instance: fenced,
                    // so that it does not join again as that instance and
                    // take it back (the two then took it from each other
                    // round after round).
                    entry
                        .group
                        .check_instance(&member_id, &req.group_instance_id)?;
                    return Err(GroupError::UnknownMember {
                        group: req.group.clone(),
                        member_id,
                    }
                    .into());
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() {
                    return Err(CoordinatorError::NotCoordinator { group: req.group.clone() });
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(CoordinatorError::RebalanceInProgress { group: req.group.clone() });
                }
            }
        }
    }

    /// Heartbeat.
    pub fn heartbeat(&self, req: &pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse> {
        let mut inner = self.lock();
        self.coordinator_partition(&inner, &req.group)?;
        let entry = inner.groups.get_mut(&req.group).ok_or_else(|| {
            CoordinatorError::Group(GroupError::UnknownMember {
                group: req.group.clone(),
                member_id: req.member_id.clone(),
            })
        })?;
        entry
            .group
            .check_instance(&req.member_id, &req.group_instance_id)?;
        let rejoin = entry
            .group
            .heartbeat(&req.member_id, req.generation_id, now_ms())?;
        Ok(pb::HeartbeatResponse { rejoin })
    }

    /// LeaveGroup.
    pub fn leave(self: &Arc<Self>, req: &pb::LeaveGroupRequest) -> Result<()> {
        let counts = self.partition_counts();
        let mut inner = self.lock();
        self.coordinator_partition(&inner, &req.group)?;
        let entry = inner.groups.get_mut(&req.group).ok_or_else(|| {
            CoordinatorError::Group(GroupError::UnknownMember {
                group: req.group.clone(),
                member_id: req.member_id.clone(),
            })
        })?;
        let now = now_ms();
        entry
            .group
            .check_instance(&req.member_id, &req.group_instance_id)?;
        entry.group.leave(&req.member_id, now)?;
        if entry.group.try_complete(now, &counts) {
            self.rebalanced(&entry.group, now);
        }
        entry.notify();
        self.persist(&mut inner, &req.group);
        info!(group = %req.group, member_id = %req.member_id, "member left");
        Ok(())
    }

    /// Appends `offsets` (and `extra` records) once `check` passed, under
    /// the lock that the records are queued under: nothing `check` looked at
    /// (a member's generation) changes before they are.
    async fn append_offsets_checked(
        self: &Arc<Self>,
        group: &str,
        index: i32,
        offsets: Vec<OffsetWrite>,
        extra: Vec<pb::Record>,
        check: impl FnOnce(&Inner) -> Result<()>,
    ) -> Result<()> {
        self.append_prepared(group, index, move |inner| {
            check(inner)?;
            Ok((offsets, extra))
        })
        .await
        .map(drop)
    }

    /// Appends the offsets and other records `prepare` decides on under
    /// the lock they are queued under, then applies the offsets once they
    /// are stored. Returns how many offsets were written.
    async fn append_prepared(
        self: &Arc<Self>,
        group: &str,
        index: i32,
        prepare: impl FnOnce(&Inner) -> Result<(Vec<OffsetWrite>, Vec<pb::Record>)>,
    ) -> Result<usize> {
        let (appender, queued, offsets) = {
            let mut inner = self.lock();
            self.coordinator_partition(&inner, group)?;
            let (offsets, extra) = prepare(&inner)?;
            if offsets.is_empty() && extra.is_empty() {
                return Ok(0);
            }
            let mut records: Vec<pb::Record> = offsets
                .iter()
                .map(|(t, p, v)| pb::Record {
                    key: Some(record_key(group, t, *p)),
                    value: v.as_ref().map(record_value),
                    ..Default::default()
                })
                .collect();
            records.extend(extra);
            let appender = inner.appenders.get(&index).cloned().ok_or_else(|| {
                CoordinatorError::NotCoordinator {
                    group: group.to_string(),
                }
            })?;
            let queued = appender.queue(records);
            if let Some(e) = inner.groups.get_mut(group) {
                e.pending_writes += 1;
            }
            (appender, queued, offsets)
        };
        let written = offsets.len();
        // Stored and applied in a task of its own: a caller dropped while
        // it waits for the replicas (a client gone, its deadline) would
        // leave the write in the log but not in what FetchOffsets serves.
        let me = self.clone();
        let group = group.to_string();
        tokio::spawn(async move {
            let applied = match appender.finish(queued).await {
                Ok(base_offset) => me.apply_offsets(&group, base_offset, offsets),
                Err(e) => Err(e.into()),
            };
            if let Some(e) = me.lock().groups.get_mut(&group) {
                e.pending_writes = e.pending_writes.saturating_sub(1);
            }
            applied
        })
        .await
        .map_err(|_| CoordinatorError::NotCoordinator {
            group: String::new(),
        })??;
        Ok(written)
    }

    /// Applies offsets stored from log offset `base_offset` on.
    fn apply_offsets(
        &self,
        group: &str,
        base_offset: i64,
        offsets: Vec<OffsetWrite>,
    ) -> Result<()> {
        let mut inner = self.lock();
        let entry = self.served_entry(&mut inner, group)?;
        let now = now_ms();
        for (i, (t, p, v)) in offsets.into_iter().enumerate() {
            let log_offset = base_offset + i as i64;
            let key = (t, p);
            // Writes are applied as their tasks run, not in log order: a
            // write older than what is applied (a value, or a tombstone,
            // remembered for a while) changes nothing.
            if entry
                .offsets
                .get(&key)
                .is_some_and(|c| c.log_offset > log_offset)
                || entry
                    .tombstoned
                    .get(&key)
                    .is_some_and(|(at, _)| *at > log_offset)
            {
                continue;
            }
            if v.is_none() {
                entry.tombstoned.insert(key.clone(), (log_offset, now));
            }
            match v {
                Some(v) => {
                    entry.offsets.insert(
                        key,
                        Committed {
                            offset: v.offset,
                            metadata: v.metadata,
                            topic_id: v.topic_id,
                            log_offset,
                            committed_ms: now,
                        },
                    );
                }
                None => {
                    entry.offsets.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// CommitOffsets.
    pub async fn commit(self: &Arc<Self>, req: pb::CommitOffsetsRequest) -> Result<()> {
        validate_group_id(&req.group)?;
        for o in &req.offsets {
            if o.offset < 0 || o.partition < 0 || o.topic.is_empty() {
                return Err(invalid(format!(
                    "bad offset {} for {}-{}",
                    o.offset, o.topic, o.partition
                )));
            }
            // Kafka's offset.metadata.max.bytes: commits share batches of
            // __consumer_offsets, so one huge commit would fail the others.
            if o.metadata.len() > OFFSET_METADATA_BYTES_MAX {
                return Err(invalid(format!(
                    "offset metadata of {} bytes for {}-{} is more than {OFFSET_METADATA_BYTES_MAX}",
                    o.metadata.len(),
                    o.topic,
                    o.partition
                )));
            }
        }
        // Offsets of a topic that does not exist (any more) are refused,
        // as Kafka refuses them: a commit arriving after the topic was
        // deleted (an auto-commit, a revocation's) would otherwise bring
        // back the offsets its deletion removed.
        let meta = self.broker.metadata().current();
        for o in &req.offsets {
            let Some(topic) = meta.topics.get(&o.topic) else {
                return Err(BrokerError::UnknownTopic {
                    topic: o.topic.clone(),
                }
                .into());
            };
            // Nor an offset read from an earlier topic of the name: stored
            // as the new topic's, it would skip its first records.
            if !o.topic_id.is_empty() && o.topic_id != topic.topic_id {
                return Err(BrokerError::UnknownTopicId {
                    topic: o.topic.clone(),
                    asked: o.topic_id.clone(),
                    current: topic.topic_id.clone(),
                }
                .into());
            }
            // Nor for a partition it does not have: offsets that would
            // stay in the group's state (and its memory) for good.
            if o.partition as usize >= topic.partitions.len() {
                return Err(BrokerError::UnknownPartition {
                    topic: o.topic.clone(),
                    partition: o.partition,
                    partitions: topic.partitions.len() as i32,
                }
                .into());
            }
        }
        let index = {
            let inner = self.lock();
            self.coordinator_partition(&inner, &req.group)?
        };
        let partitions: Vec<(String, i32)> = req
            .offsets
            .iter()
            .map(|o| (o.topic.clone(), o.partition))
            .collect();
        let (group, member_id, instance_id, generation) = (
            req.group.clone(),
            req.member_id.clone(),
            req.group_instance_id.clone(),
            req.generation_id,
        );
        // Checked under the lock the commit is queued under: a rebalance
        // completing in between (a tick expiring the member) must not let
        // a removed member's commit through.
        let check = move |inner: &Inner| -> Result<()> {
            match inner.groups.get(&group) {
                Some(e) => {
                    e.group.check_instance(&member_id, &instance_id)?;
                    e.group
                        .validate_commit_partitions(&member_id, generation, &partitions)?;
                    Ok(())
                }
                None if member_id.is_empty() => Ok(()),
                None => Err(GroupError::UnknownMember {
                    group: group.clone(),
                    member_id: member_id.clone(),
                }
                .into()),
            }
        };
        let offsets = req
            .offsets
            .into_iter()
            .map(|o| {
                let topic_id = meta
                    .topics
                    .get(&o.topic)
                    .map(|t| t.topic_id.clone())
                    .unwrap_or_default();
                let value = OffsetValue {
                    offset: o.offset,
                    metadata: o.metadata,
                    topic_id,
                };
                (o.topic, o.partition, Some(value))
            })
            .collect();
        self.append_offsets_checked(&req.group, index, offsets, Vec::new(), check)
            .await
    }

    /// FetchOffsets.
    pub fn fetch_offsets(&self, req: &pb::FetchOffsetsRequest) -> Result<pb::FetchOffsetsResponse> {
        validate_group_id(&req.group)?;
        let inner = self.lock();
        self.coordinator_partition(&inner, &req.group)?;
        let meta = self.broker.metadata().current();
        let committed = inner.groups.get(&req.group).map(|e| &e.offsets);
        let offsets = if req.partitions.is_empty() {
            committed
                .into_iter()
                .flatten()
                .filter(|((t, _), c)| is_current(&meta, t, c))
                .map(|((t, p), c)| pb::PartitionOffset {
                    topic_id: String::new(),
                    topic: t.clone(),
                    partition: *p,
                    offset: c.offset,
                    metadata: c.metadata.clone(),
                })
                .collect()
        } else {
            req.partitions
                .iter()
                .map(|tp| {
                    let c = committed
                        .and_then(|m| m.get(&(tp.topic.clone(), tp.partition)))
                        .filter(|c| is_current(&meta, &tp.topic, c));
                    pb::PartitionOffset {
                        topic_id: String::new(),
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        offset: c.map_or(-1, |c| c.offset),
                        metadata: c.map(|c| c.metadata.clone()).unwrap_or_default(),
                    }
                })
                .collect()
        };
        Ok(pb::FetchOffsetsResponse { offsets })
    }

    /// ListGroups: this broker's groups, plus (unless `local_only`) every
    /// other live broker's.
    pub async fn list_groups(&self, local_only: bool) -> pb::ListGroupsResponse {
        let mut groups: BTreeMap<String, pb::GroupSummary> = {
            let inner = self.lock();
            inner
                .groups
                .values()
                .filter(|e| e.exists())
                .map(|e| {
                    (
                        e.group.id.clone(),
                        pb::GroupSummary {
                            group: e.group.id.clone(),
                            state: e.group.state.name().to_string(),
                            members: e.group.members.len() as i32,
                        },
                    )
                })
                .collect()
        };
        if !local_only {
            let meta = self.broker.metadata().current();
            for b in meta
                .brokers
                .values()
                .filter(|b| b.id != self.broker.node_id() && !b.fenced)
            {
                let addr = b.address.clone();
                let broker = self.broker.clone();
                let ask = async move {
                    let mut c = ConsumerGroupsClient::new(broker.peer_channel(&addr)?);
                    c.list_groups(pb::ListGroupsRequest { local_only: true })
                        .await
                        .map_err(|s| crate::security::peer_call_failed(&addr, "ListGroups", &s))
                        .ok()
                        .map(|r| r.into_inner())
                };
                if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(2), ask).await {
                    for g in r.groups {
                        groups.entry(g.group.clone()).or_insert(g);
                    }
                }
            }
        }
        pb::ListGroupsResponse {
            groups: groups.into_values().collect(),
        }
    }

    /// Log start and high watermark of a partition, from its leader.
    async fn log_range(
        &self,
        topic: &str,
        partition: i32,
        spec: pb::OffsetSpec,
        ts: i64,
    ) -> std::result::Result<pb::ListOffsetsResponse, BrokerError> {
        let req = pb::ListOffsetsRequest {
            topic: topic.to_string(),
            partition,
            spec: spec as i32,
            timestamp_ms: ts,
        };
        match self.broker.list_offsets(req.clone()).await {
            Err(BrokerError::NotLeader {
                leader,
                topic,
                partition,
            }) if !leader.is_empty() => {
                let ask = async {
                    let mut c = runnel_proto::v1::consumer_client::ConsumerClient::new(
                        self.broker.peer_channel(&leader)?,
                    );
                    c.list_offsets(req)
                        .await
                        .map_err(|s| crate::security::peer_call_failed(&leader, "ListOffsets", &s))
                        .ok()
                        .map(|r| r.into_inner())
                };
                tokio::time::timeout(Duration::from_secs(3), ask)
                    .await
                    .ok()
                    .flatten()
                    .ok_or(BrokerError::PartitionOffline { topic, partition })
            }
            other => other,
        }
    }

    /// DescribeGroup.
    pub async fn describe(&self, group: &str) -> Result<pb::GroupDescription> {
        validate_group_id(group)?;
        let (mut d, committed, owners) = {
            let inner = self.lock();
            self.coordinator_partition(&inner, group)?;
            let e = inner
                .groups
                .get(group)
                .filter(|e| e.exists())
                .ok_or_else(|| CoordinatorError::UnknownGroup {
                    group: group.to_string(),
                })?;
            let mut owners: BTreeMap<(String, i32), String> = BTreeMap::new();
            let members = e
                .group
                .members
                .values()
                .map(|m| {
                    for tp in &m.assignment {
                        owners.insert(tp.clone(), m.member_id.clone());
                    }
                    pb::GroupMember {
                        member_id: m.member_id.clone(),
                        group_instance_id: m.instance_id.clone(),
                        client_id: m.client_id.clone(),
                        assignment: m
                            .assignment
                            .iter()
                            .map(|(t, p)| pb::TopicPartition {
                                topic: t.clone(),
                                partition: *p,
                            })
                            .collect(),
                    }
                })
                .collect();
            let meta = self.broker.metadata().current();
            let committed: BTreeMap<(String, i32), i64> = e
                .offsets
                .iter()
                .filter(|((t, _), c)| is_current(&meta, t, c))
                .map(|(k, c)| (k.clone(), c.offset))
                .collect();
            (
                pb::GroupDescription {
                    group: group.to_string(),
                    state: e.group.state.name().to_string(),
                    generation_id: e.group.generation,
                    strategy: e.group.strategy as i32,
                    members,
                    lags: Vec::new(),
                    total_lag: 0,
                    coordinator: self.broker.node_id(),
                    protocol: e.group.protocol as i32,
                },
                committed,
                owners,
            )
        };
        let keys: BTreeSet<(String, i32)> =
            committed.keys().chain(owners.keys()).cloned().collect();
        // Every partition's range asked at once (one after another, a
        // group of many partitions led elsewhere took a round trip, or a
        // silent leader's 3 s, per partition). Asked as the earliest
        // offset: the answer carries the range all the same, and only
        // the latest waits for a new leader's high watermark.
        let ranges = futures_util::future::join_all(
            keys.iter()
                .map(|(t, p)| self.log_range(t, *p, pb::OffsetSpec::Earliest, 0)),
        )
        .await;
        let mut unknown_lag = false;
        for ((t, p), range) in keys.into_iter().zip(ranges) {
            let c = committed.get(&(t.clone(), p)).copied().unwrap_or(-1);
            let (start, end) = match range {
                Ok(r) => (r.log_start_offset, r.high_watermark),
                Err(_) => (-1, -1),
            };
            let lag = if end < 0 {
                // Unknown: the leader did not answer. Reported as -1
                // rather than 0, so a dashboard does not show a lagging
                // group as caught up while a broker is down.
                unknown_lag = true;
                -1
            } else if c >= 0 {
                (end - c).max(0)
            } else {
                (end - start.max(0)).max(0)
            };
            d.total_lag += lag.max(0);
            d.lags.push(pb::PartitionLag {
                member_id: owners.get(&(t.clone(), p)).cloned().unwrap_or_default(),
                topic: t,
                partition: p,
                committed_offset: c,
                log_end_offset: end,
                lag,
            });
        }
        if unknown_lag {
            d.total_lag = -1;
        }
        Ok(d)
    }

    /// ResetOffsets: refused while the group has members.
    pub async fn reset(
        self: &Arc<Self>,
        req: pb::ResetOffsetsRequest,
    ) -> Result<pb::ResetOffsetsResponse> {
        use pb::reset_offsets_request::To;
        validate_group_id(&req.group)?;
        let to = req.to.ok_or_else(|| {
            invalid("say where to move the offsets (to_earliest, to_latest, ...)")
        })?;
        let meta = self.broker.metadata().current();
        let topic = meta
            .topics
            .get(&req.topic)
            .ok_or_else(|| BrokerError::UnknownTopic {
                topic: req.topic.clone(),
            })?;
        let count = topic.partitions.len() as i32;
        let (index, committed) = {
            let inner = self.lock();
            let index = self.coordinator_partition(&inner, &req.group)?;
            let e = inner.groups.get(&req.group);
            if let Some(e) = e {
                if !e.group.members.is_empty() {
                    return Err(GroupError::NotEmpty {
                        group: req.group.clone(),
                        members: e.group.members.len(),
                    }
                    .into());
                }
            }
            let committed: BTreeMap<i32, i64> = e
                .map(|e| {
                    e.offsets
                        .iter()
                        .filter(|((t, _), c)| *t == req.topic && is_current(&meta, t, c))
                        .map(|((_, p), c)| (*p, c.offset))
                        .collect()
                })
                .unwrap_or_default();
            (index, committed)
        };
        let mut offsets = Vec::new();
        for p in 0..count {
            // A target clamped by the high watermark asks the latest
            // offset, which waits for a new leader's high watermark to
            // catch up (the earliest answer's could be behind, and clamp
            // an offset already acknowledged); a reset to the earliest
            // needs only the log start.
            let spec = match to {
                To::ToTimestampMs(_) => pb::OffsetSpec::Timestamp,
                To::ToEarliest(_) => pb::OffsetSpec::Earliest,
                _ => pb::OffsetSpec::Latest,
            };
            let ts = if let To::ToTimestampMs(ts) = to {
                ts
            } else {
                0
            };
            let r = self.log_range(&req.topic, p, spec, ts).await?;
            let (start, end) = (r.log_start_offset, r.high_watermark);
            let target = match to {
                To::ToEarliest(_) => start,
                To::ToLatest(_) => end,
                To::ToOffset(o) => o,
                To::ToTimestampMs(_) => r.offset,
                To::ShiftBy(n) => committed
                    .get(&p)
                    .copied()
                    .unwrap_or(start)
                    .saturating_add(n),
            };
            offsets.push(pb::PartitionOffset {
                topic_id: String::new(),
                topic: req.topic.clone(),
                partition: p,
                offset: target.clamp(start, end.max(start)),
                metadata: String::new(),
            });
        }
        if !req.dry_run {
            {
                // Members may have joined while we looked offsets up.
                let inner = self.lock();
                if let Some(e) = inner.groups.get(&req.group) {
                    e.group.validate_commit("", 0)?;
                }
            }
            let v = offsets
                .iter()
                .map(|o| {
                    let value = OffsetValue {
                        offset: o.offset,
                        metadata: String::new(),
                        topic_id: topic.topic_id.clone(),
                    };
                    (o.topic.clone(), o.partition, Some(value))
                })
                .collect();
            // Still without members when the offsets are queued.
            let name = req.group.clone();
            let still_empty = move |inner: &Inner| -> Result<()> {
                match inner.groups.get(&name) {
                    Some(e) if !e.group.members.is_empty() => Err(GroupError::NotEmpty {
                        group: name.clone(),
                        members: e.group.members.len(),
                    }
                    .into()),
                    _ => Ok(()),
                }
            };
            self.append_offsets_checked(&req.group, index, v, Vec::new(), still_empty)
                .await?;
            info!(group = %req.group, topic = %req.topic, "offsets reset");
        }
        Ok(pb::ResetOffsetsResponse { offsets })
    }

    /// DeleteGroup: tombstones every committed offset.
    /// Removes the committed offsets of deleted topics from the groups
    /// this node coordinates, as Kafka's coordinator does: a topic
    /// created again under the name would otherwise be read from the old
    /// topic's offsets, skipping its first records. Best effort: a group
    /// whose write fails keeps them.
    async fn forget_offsets_of(self: &Arc<Self>, topics: &[String]) {
        let work: Vec<(String, i32)> = {
            let inner = self.lock();
            inner
                .groups
                .iter()
                .filter(|(_, e)| e.offsets.keys().any(|(t, _)| topics.contains(t)))
                .filter_map(|(group, _)| {
                    let index = self.coordinator_partition(&inner, group).ok()?;
                    Some((group.clone(), index))
                })
                .collect()
        };
        for (group, index) in work {
            // Chosen under the lock they are queued under, and only those
            // of another topic id (or none): a commit made meanwhile for
            // the topic created again is not erased.
            let stale = |inner: &Inner| -> Result<(Vec<OffsetWrite>, Vec<pb::Record>)> {
                let meta = self.broker.metadata().current();
                let gone = inner
                    .groups
                    .get(&group)
                    .into_iter()
                    .flat_map(|e| &e.offsets)
                    .filter(|((t, _), c)| {
                        topics.contains(t)
                            && (c.topic_id.is_empty()
                                || meta.topics.get(t).is_none_or(|x| x.topic_id != c.topic_id))
                    })
                    .map(|((t, p), _)| (t.clone(), *p, None))
                    .collect();
                Ok((gone, Vec::new()))
            };
            match self.append_prepared(&group, index, stale).await {
                Ok(0) => {}
                Ok(n) => info!(%group, partitions = n, "offsets of deleted topics removed"),
                Err(e) => warn!(%group, error = %e, "could not remove offsets of deleted topics"),
            }
        }
    }

    pub async fn delete(self: &Arc<Self>, group: &str) -> Result<()> {
        validate_group_id(group)?;
        let (index, keys) = {
            let inner = self.lock();
            let index = self.coordinator_partition(&inner, group)?;
            let e = inner
                .groups
                .get(group)
                .filter(|e| e.exists())
                .ok_or_else(|| CoordinatorError::UnknownGroup {
                    group: group.to_string(),
                })?;
            e.group.validate_commit("", 0)?;
            (index, e.offsets.keys().cloned().collect::<Vec<_>>())
        };
        let tombstones = keys.into_iter().map(|(t, p)| (t, p, None)).collect();
        let forget = pb::Record {
            key: Some(group_key(group)),
            value: None,
            ..Default::default()
        };
        // Still empty when the tombstones are queued: a member joining in
        // between would see its group deleted behind it.
        let name = group.to_string();
        let still_empty = move |inner: &Inner| -> Result<()> {
            match inner.groups.get(&name) {
                Some(e) => Ok(e.group.validate_commit("", 0)?),
                None => Ok(()),
            }
        };
        self.append_offsets_checked(group, index, tombstones, vec![forget], still_empty)
            .await?;
        let inner = self.lock();
        if let Some(e) = inner.groups.get(group) {
            if !e.exists() {
                // The entry itself goes at a tick once its tombstones
                // lapse (see `Entry::is_idle`).
                e.notify();
                self.broker.metrics().forget_group(group);
            }
        }
        info!(%group, "group deleted");
        Ok(())
    }
}

/// Follows leadership of the offsets partitions and ticks the groups.
async fn run(
    weak: Weak<GroupCoordinator>,
    mut rx: watch::Receiver<Arc<runnel_controller::ClusterMetadata>>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Topics this node has seen in the metadata, with their ids: one that
    // leaves it, or comes back with another id (deleted and created again
    // between two looks), was deleted. One never seen may only be unknown
    // here yet.
    let mut seen: HashMap<String, String> = HashMap::new();
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(c) = weak.upgrade() else { return };
        c.sync_leadership();
        c.tick();
        let now: HashMap<String, String> = rx
            .borrow()
            .topics
            .iter()
            .map(|(name, t)| (name.clone(), t.topic_id.clone()))
            .collect();
        let deleted: Vec<String> = seen
            .iter()
            .filter(|(name, id)| now.get(*name) != Some(*id))
            .map(|(name, _)| name.clone())
            .collect();
        seen = now;
        if !deleted.is_empty() {
            // Not awaited here: the ticks go on while it is written.
            tokio::spawn(async move { c.forget_offsets_of(&deleted).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_strategy_is_cooperative_sticky() {
        use pb::AssignmentStrategy as S;
        assert_eq!(
            same_strategy(S::Unspecified),
            same_strategy(S::CooperativeSticky)
        );
        assert_ne!(same_strategy(S::Unspecified), same_strategy(S::Range));
    }

    #[test]
    fn record_codec_round_trips() {
        let k = record_key("g/1", "t", 7);
        assert_eq!(parse_key(&k), Some(("g/1".into(), "t".into(), 7)));
        let old = OffsetValue {
            offset: 42,
            metadata: "meta\0data".into(),
            topic_id: String::new(),
        };
        assert_eq!(parse_value(&record_value(&old)), Some(old.clone()));
        // Records written before topic ids read as they were.
        assert_eq!(parse_value(b"42\0meta\0data"), Some(old));
        let with_id = OffsetValue {
            offset: -1,
            metadata: "v1\0x".into(),
            topic_id: "abc".into(),
        };
        assert_eq!(parse_value(&record_value(&with_id)), Some(with_id));
        assert_eq!(parse_key(b"other"), None);
    }

    #[test]
    fn group_ids_are_checked() {
        assert!(validate_group_id("").is_err());
        assert!(validate_group_id("a\0b").is_err());
        assert!(validate_group_id(&"x".repeat(250)).is_err());
        assert!(validate_group_id("orders-v2").is_ok());
    }

    /// A group with nothing left but remembered tombstones (just
    /// deleted) stays until they lapse: forgotten at once, a commit
    /// stored before the delete and applied after it made the group
    /// again, with that offset.
    #[test]
    fn a_deleted_group_is_kept_while_its_tombstones_are_remembered() {
        let mut e = Entry::new("g");
        assert!(e.is_idle());
        e.tombstoned.insert(("t".into(), 0), (10, 1_000));
        assert!(!e.is_idle());
        e.tombstoned.clear();
        assert!(e.is_idle());
    }

    #[test]
    fn groups_spread_over_partitions() {
        let used: BTreeSet<i32> = (0..100)
            .map(|i| partition_for_group(&format!("g{i}"), OFFSETS_PARTITIONS))
            .collect();
        assert!(used.len() > 10);
    }
}
