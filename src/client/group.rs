//! Consumer groups in the client: [`GroupConsumer`] joins a group through
//! its coordinator, consumes the partitions assigned to it, heartbeats in
//! the background, commits (on an interval or on demand) and leaves on
//! [`GroupConsumer::close`]. The admin calls of the `ConsumerGroups`
//! service (list, describe, reset, delete) are methods of [`Client`].
//!
//! Two rebalance protocols ([`GroupConfig::protocol`]):
//! - cooperative (the default): when the coordinator asks for a rejoin,
//!   the consumer rejoins in the background and keeps reading its
//!   partitions meanwhile. The answer may take some partitions away: the
//!   consumer commits them (with auto-commit), stops them, tells the
//!   [`RebalanceListener`], and rejoins at once; the follow-up round gives
//!   them to their new owners. Partitions it keeps are never interrupted.
//! - eager: the consumer commits (with auto-commit), stops reading every
//!   partition, and rejoins; the reply carries its partitions for the new
//!   generation. Partitions it keeps resume from its in-memory position.
//!
//! New partitions start from the committed offset, or from `offset_reset`
//! when none is committed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Channel;
use futures_util::future::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use runnel_proto::v1 as pb;
use runnel_proto::v1::consumer_groups_client::ConsumerGroupsClient;
use tokio::task::JoinHandle;

use super::{Client, ClientError, ConsumedRecord, PartitionConsumer, StartFrom, REQUEST_TIMEOUT};

/// Heartbeats `req` every `interval_ms` until the coordinator answers
/// something other than "carry on", which it leaves in `signal`.
fn heartbeats(
    client: Client,
    signal: Arc<AtomicU8>,
    req: pb::HeartbeatRequest,
    interval_ms: u32,
    watch: PollWatch,
) -> JoinHandle<()> {
    let every = Duration::from_millis(u64::from(interval_ms.max(20)));
    tokio::spawn(async move {
        // Told to rejoin: the member says so once and heartbeats on until
        // its next poll rejoins (which stops this task), as Kafka's
        // heartbeat thread does. Stopping here left a member busy with
        // its last records to expire within its session, however long the
        // rebalance would have waited for it.
        let mut asked = false;
        loop {
            tokio::time::sleep(every).await;
            if watch.clock.overdue(watch.max) {
                // The application stopped polling: its partitions go to
                // members that read. A dynamic member leaves at once; a
                // static one stops heartbeating and its session runs out
                // (KIP-345: a restart within it keeps the assignment).
                tracing::warn!(group = %req.group, member_id = %req.member_id, max_poll_interval_ms = watch.max.as_millis() as u64, "no poll within max_poll_interval; leaving the group");
                let dynamic = req.group_instance_id.is_empty();
                if dynamic {
                    let request = pb::LeaveGroupRequest {
                        group: req.group.clone(),
                        member_id: req.member_id.clone(),
                        group_instance_id: String::new(),
                    };
                    // Best effort: a member that did not leave expires.
                    let _ = leave(&client, request).await;
                }
                // Either way the next poll rejoins in the foreground,
                // dropping the partitions first: by then they may well be
                // another member's. (A static member used to rejoin in the
                // background, cooperatively, and read on meanwhile.) A
                // static member rejoining under its instance id gets its
                // assignment back if its session has not run out.
                set_signal(&signal, SIGNAL_REJOIN_AS_NEW);
                return;
            }
            let r = client
                .group_call(
                    &req.group,
                    req.clone(),
                    every.max(Duration::from_secs(2)),
                    |mut g, r| async move { g.heartbeat(r).await },
                )
                .await;
            match r {
                Ok(r) if r.rejoin => {
                    if !asked {
                        set_signal(&signal, SIGNAL_REJOIN);
                        asked = true;
                    }
                }
                Ok(_) => {}
                Err(e) if e.code() == pb::ErrorCode::FencedInstanceId => {
                    set_signal(&signal, SIGNAL_FENCED);
                    return;
                }
                Err(e) if e.code() == pb::ErrorCode::UnknownMember => {
                    set_signal(&signal, SIGNAL_REJOIN_AS_NEW);
                    return;
                }
                Err(e) if e.code() == pb::ErrorCode::IllegalGeneration => {
                    set_signal(&signal, SIGNAL_REJOIN);
                    return;
                }
                // Refused for good (the group's READ revoked, a request
                // the coordinator rejects): retried quietly, the member
                // expired while it went on reading partitions given to
                // others. The next poll rejoins, dropping them first, and
                // that join reports the refusal.
                Err(e)
                    if matches!(
                        e.code(),
                        pb::ErrorCode::AuthorizationFailed
                            | pb::ErrorCode::AuthenticationFailed
                            | pb::ErrorCode::InvalidRequest
                    ) =>
                {
                    tracing::warn!(group = %req.group, error = %e, "heartbeat refused; rejoining");
                    set_signal(&signal, SIGNAL_REJOIN_AS_NEW);
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "heartbeat failed; retrying"),
            }
        }
    })
}

/// Whether a partition's fetch failure goes to the application: the
/// rest (a leader moving, a topic being deleted and the rebalance that
/// follows) are retried quietly.
fn fetch_failure_is_fatal(e: &ClientError) -> bool {
    matches!(
        e.code(),
        pb::ErrorCode::AuthorizationFailed
            | pb::ErrorCode::AuthenticationFailed
            | pb::ErrorCode::CorruptMessage
            | pb::ErrorCode::InvalidRequest
            | pb::ErrorCode::Unsupported
    )
}

/// Whether a failed join is part of a rebalance still under way, which
/// Kafka's consumer retries inside its poll (the rebalance outlasted the
/// join's wait, or the member expired while it waited): the next poll
/// joins again, and this one returns no records rather than an error.
/// An unreachable coordinator is still an error (after the group calls'
/// own retries): swallowed, a client pointed at a dead cluster would
/// wait silently for good.
fn join_failure_is_passing(e: &ClientError) -> bool {
    matches!(
        e.code(),
        pb::ErrorCode::RebalanceInProgress | pb::ErrorCode::UnknownMember
    )
}

/// How often a poll tries again to start assigned partitions that could
/// not be started (their leaders unavailable past the retries).
const UNSTARTED_RETRY: Duration = Duration::from_secs(1);

/// How long a partition stays unstarted before a poll reports why (and
/// again each time this long passes): the rest of the assignment is read
/// meanwhile, but the application learns of it.
const UNSTARTED_REPORT: Duration = Duration::from_secs(30);

/// How long group calls retry a missing or moving coordinator.
const COORDINATOR_RETRY: Duration = Duration::from_secs(30);

/// Where to start a partition with no committed offset, or whose
/// position fell off the log (Kafka's `auto.offset.reset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetReset {
    /// The log start.
    Earliest,
    /// The high watermark.
    Latest,
    /// Nowhere: `poll` fails with OFFSET_OUT_OF_RANGE, naming the
    /// partition, until the application [`GroupConsumer::seek`]s it (the
    /// rest of the assignment is read meanwhile).
    None,
}

/// An assigned partition not being read: its start failed (no leader),
/// or it has no position under [`OffsetReset::None`].
#[derive(Clone, Copy, Debug)]
struct Unstarted {
    /// Where it starts; None: nowhere until the application seeks it.
    from: Option<StartFrom>,
    /// The group's committed offset when it was assigned (-1: none).
    committed: i64,
    /// Told to the listener as Assigned already (it was read, then lost
    /// its position): not told again when it starts, and told Revoked
    /// when it goes.
    announced: bool,
}

/// A change of the partitions a member owns, told to its
/// [`RebalanceListener`] inside [`GroupConsumer::poll`]: `Revoked` before
/// the member rejoins (it no longer reads them), `Assigned` after the
/// coordinator's answer (before they are first read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// Partitions the member stopped reading.
    Revoked(Vec<(String, i32)>),
    /// Partitions the member starts reading.
    Assigned(Vec<(String, i32)>),
}

/// Called on every [`RebalanceEvent`] (keep it short: it runs in `poll`).
pub type RebalanceListener = Arc<dyn Fn(&RebalanceEvent) + Send + Sync>;

/// A group member's settings.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// Group id.
    pub group: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Assignment strategy (every member must agree).
    pub strategy: pb::AssignmentStrategy,
    /// Rebalance protocol (every member must agree): cooperative keeps
    /// the partitions that do not move consuming through a rebalance.
    pub protocol: pb::RebalanceProtocol,
    /// The coordinator removes the member after this long without a
    /// heartbeat (ms).
    pub session_timeout_ms: u32,
    /// How long a rebalance waits for members to rejoin (ms); members
    /// keep heartbeating meanwhile, so one busy with its last records has
    /// this long to poll again. At most `max_poll_interval` (300 s by
    /// default, as Kafka sends it).
    pub rebalance_timeout_ms: u32,
    /// Commit positions this often inside `poll`; None: only on `commit`.
    pub auto_commit_interval: Option<Duration>,
    /// Where partitions without a committed offset start.
    pub offset_reset: OffsetReset,
    /// Client id shown by describe.
    pub client_id: String,
    /// Static membership id, or empty.
    pub group_instance_id: String,
    /// Long-poll wait per fetch (ms).
    pub max_wait_ms: u32,
    /// Most bytes one fetch of one partition asks for (Kafka's
    /// max.partition.fetch.bytes); at least one batch comes back anyway.
    pub max_bytes: u32,
    /// The longest the application may go between polls (Kafka's
    /// max.poll.interval.ms): past it the member leaves the group, so
    /// that a stuck application does not hold its partitions while
    /// heartbeats keep it alive, and the next poll joins again.
    pub max_poll_interval: Duration,
    /// Most records one `poll` returns (Kafka's `max.poll.records`, 500 by
    /// default; at least 1). The rest stay with the member, decoded, for
    /// the next polls, and commits cover only what polls returned: an
    /// application that handles each poll's records before the next poll
    /// bounds its time between polls by this many records, not by
    /// `max_bytes` of every owned partition.
    pub max_poll_records: usize,
}

impl GroupConfig {
    /// Defaults for `group` subscribing to `topics`.
    pub fn new(group: &str, topics: &[&str]) -> Self {
        Self {
            group: group.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            strategy: pb::AssignmentStrategy::CooperativeSticky,
            protocol: pb::RebalanceProtocol::Cooperative,
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 300_000,
            auto_commit_interval: Some(Duration::from_secs(1)),
            offset_reset: OffsetReset::Earliest,
            client_id: "runnel-rust".to_string(),
            group_instance_id: String::new(),
            max_wait_ms: 200,
            max_bytes: 1024 * 1024,
            max_poll_interval: Duration::from_secs(300),
            max_poll_records: 500,
        }
    }
}

/// When the application last polled, for the heartbeats to see.
#[derive(Debug)]
struct PollClock {
    origin: Instant,
    /// Ms since `origin` when the last poll returned.
    returned_ms: AtomicU64,
    /// A poll is running (it may wait for a rebalance for long).
    polling: AtomicBool,
}

impl PollClock {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            returned_ms: AtomicU64::new(0),
            polling: AtomicBool::new(false),
        })
    }

    /// Marks a poll as running until the guard is dropped.
    fn enter(self: &Arc<Self>) -> PollGuard {
        self.polling.store(true, Ordering::Release);
        PollGuard(self.clone())
    }

    /// Whether no poll ran for longer than `max`.
    fn overdue(&self, max: Duration) -> bool {
        let returned = Duration::from_millis(self.returned_ms.load(Ordering::Acquire));
        !self.polling.load(Ordering::Acquire)
            && self.origin.elapsed().saturating_sub(returned) > max
    }
}

struct PollGuard(Arc<PollClock>);

impl Drop for PollGuard {
    fn drop(&mut self) {
        let c = &self.0;
        c.returned_ms
            .store(c.origin.elapsed().as_millis() as u64, Ordering::Release);
        c.polling.store(false, Ordering::Release);
    }
}

/// What the heartbeats watch besides the coordinator's answers.
#[derive(Clone, Debug)]
struct PollWatch {
    clock: Arc<PollClock>,
    max: Duration,
}

/// Retriable while the coordinator is being found, created or moved.
fn retriable(e: &ClientError) -> bool {
    match e {
        ClientError::Transport(_) | ClientError::Connect { .. } => true,
        ClientError::Broker { code, .. } => matches!(
            code,
            pb::ErrorCode::NotCoordinator
                | pb::ErrorCode::NotLeader
                | pb::ErrorCode::NotEnoughReplicas
                | pb::ErrorCode::BrokerNotAvailable
                | pb::ErrorCode::NotController
        ),
        _ => false,
    }
}

impl Client {
    /// Names the coordinator of `group` (creating `__consumer_offsets` on
    /// first use).
    pub async fn find_coordinator(
        &self,
        group: &str,
    ) -> Result<pb::FindCoordinatorResponse, ClientError> {
        let mut c = ConsumerGroupsClient::new(self.bootstrap_channel())
            .max_decoding_message_size(super::MESSAGE_BYTES_MAX);
        let mut req = tonic::Request::new(pb::FindCoordinatorRequest {
            group: group.to_string(),
        });
        req.set_timeout(REQUEST_TIMEOUT);
        match c.find_coordinator(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => {
                let e = ClientError::from(status);
                if !matches!(e, ClientError::Broker { .. }) {
                    // Moves to another live broker for the next try.
                    let _ = self.metadata(&[]).await;
                }
                Err(e)
            }
        }
    }

    /// Runs a call on the coordinator of `group`, finding it again while it
    /// is missing or moving (for up to 30 s).
    async fn group_call<R, T, F, Fut>(
        &self,
        group: &str,
        req: R,
        timeout: Duration,
        call: F,
    ) -> Result<T, ClientError>
    where
        R: Clone,
        F: Fn(ConsumerGroupsClient<Channel>, tonic::Request<R>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.group_call_as(group, req, timeout, true, call).await
    }

    /// [`Client::group_call`]; a call that is not `idempotent` is not sent
    /// again after a transport error, which may have come after the
    /// coordinator applied it (a lost answer).
    async fn group_call_as<R, T, F, Fut>(
        &self,
        group: &str,
        req: R,
        timeout: Duration,
        idempotent: bool,
        call: F,
    ) -> Result<T, ClientError>
    where
        R: Clone,
        F: Fn(ConsumerGroupsClient<Channel>, tonic::Request<R>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // Counted from the first failure, not from the call: a join may
        // rightly wait for minutes before its coordinator moves, and then
        // it found no time left to find the new one.
        let mut failing_since: Option<Instant> = None;
        loop {
            let attempt = async {
                let cached = self
                    .inner
                    .coordinators
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(group)
                    .cloned();
                let address = match cached {
                    Some(a) => a,
                    None => {
                        let a = self.find_coordinator(group).await?.address;
                        self.inner
                            .coordinators
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(group.to_string(), a.clone());
                        a
                    }
                };
                let channel = self.channel(&address)?;
                let mut request = tonic::Request::new(req.clone());
                request.set_timeout(timeout);
                call(
                    ConsumerGroupsClient::new(channel)
                        .max_decoding_message_size(super::MESSAGE_BYTES_MAX),
                    request,
                )
                .await
                .map(|r| r.into_inner())
                .map_err(ClientError::from)
            };
            match attempt.await {
                Ok(v) => return Ok(v),
                Err(e)
                    if retriable(&e)
                        && (idempotent || !matches!(e, ClientError::Transport(_)))
                        && failing_since.get_or_insert_with(Instant::now).elapsed()
                            < COORDINATOR_RETRY =>
                {
                    self.forget_coordinator(group);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    if retriable(&e) {
                        self.forget_coordinator(group);
                    }
                    return Err(e);
                }
            }
        }
    }

    fn forget_coordinator(&self, group: &str) {
        self.inner
            .coordinators
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(group);
    }

    /// Every group of the cluster.
    pub async fn list_groups(&self) -> Result<Vec<pb::GroupSummary>, ClientError> {
        let mut c = ConsumerGroupsClient::new(self.bootstrap_channel())
            .max_decoding_message_size(super::MESSAGE_BYTES_MAX);
        let mut req = tonic::Request::new(pb::ListGroupsRequest { local_only: false });
        req.set_timeout(REQUEST_TIMEOUT);
        Ok(c.list_groups(req).await?.into_inner().groups)
    }

    /// Members, assignment, committed offsets and lag of `group`.
    pub async fn describe_group(&self, group: &str) -> Result<pb::GroupDescription, ClientError> {
        let req = pb::DescribeGroupRequest {
            group: group.to_string(),
        };
        self.group_call(group, req, REQUEST_TIMEOUT, |mut c, r| async move {
            c.describe_group(r).await
        })
        .await
    }

    /// Moves a group's committed offsets (refused while it has members).
    pub async fn reset_offsets(
        &self,
        req: pb::ResetOffsetsRequest,
    ) -> Result<Vec<pb::PartitionOffset>, ClientError> {
        let group = req.group.clone();
        // A shift is relative to the committed offsets: sent again after
        // an answer lost once it was applied, it moved them twice.
        let idempotent =
            req.dry_run || !matches!(req.to, Some(pb::reset_offsets_request::To::ShiftBy(_)));
        let r = self
            .group_call_as(
                &group,
                req,
                REQUEST_TIMEOUT,
                idempotent,
                |mut c, r| async move { c.reset_offsets(r).await },
            )
            .await?;
        Ok(r.offsets)
    }

    /// Deletes an empty group and its committed offsets.
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let req = pb::DeleteGroupRequest {
            group: group.to_string(),
        };
        self.group_call(group, req, REQUEST_TIMEOUT, |mut c, r| async move {
            c.delete_group(r).await
        })
        .await?;
        Ok(())
    }

    /// Commits offsets for `group` as `member_id` in `generation_id`
    /// (empty member id: a standalone commit, only while the group is empty).
    pub async fn commit_offsets(
        &self,
        group: &str,
        member_id: &str,
        generation_id: i32,
        offsets: Vec<pb::PartitionOffset>,
    ) -> Result<(), ClientError> {
        self.commit_offsets_as(group, member_id, "", generation_id, offsets)
            .await
    }

    /// [`Client::commit_offsets`] by a member with a static instance id.
    pub(crate) async fn commit_offsets_as(
        &self,
        group: &str,
        member_id: &str,
        group_instance_id: &str,
        generation_id: i32,
        offsets: Vec<pb::PartitionOffset>,
    ) -> Result<(), ClientError> {
        let req = pb::CommitOffsetsRequest {
            group: group.to_string(),
            member_id: member_id.to_string(),
            generation_id,
            offsets,
            group_instance_id: group_instance_id.to_string(),
        };
        self.group_call(group, req, REQUEST_TIMEOUT, |mut c, r| async move {
            c.commit_offsets(r).await
        })
        .await?;
        Ok(())
    }

    /// Committed offsets of `group` (all when `partitions` is empty; -1
    /// where none).
    pub async fn fetch_offsets(
        &self,
        group: &str,
        partitions: &[(String, i32)],
    ) -> Result<Vec<pb::PartitionOffset>, ClientError> {
        let req = pb::FetchOffsetsRequest {
            group: group.to_string(),
            partitions: partitions
                .iter()
                .map(|(t, p)| pb::TopicPartition {
                    topic: t.clone(),
                    partition: *p,
                })
                .collect(),
        };
        let r = self
            .group_call(group, req, REQUEST_TIMEOUT, |mut c, r| async move {
                c.fetch_offsets(r).await
            })
            .await?;
        Ok(r.offsets)
    }

    /// A group member; it joins on the first [`GroupConsumer::poll`].
    pub fn group_consumer(&self, config: GroupConfig) -> Result<GroupConsumer, ClientError> {
        if config.group.is_empty() || config.topics.is_empty() {
            return Err(ClientError::Invalid(
                "a group consumer needs a group id and at least one topic".into(),
            ));
        }
        if config.max_poll_records == 0 {
            return Err(ClientError::Invalid(
                "max_poll_records must be at least 1".into(),
            ));
        }
        Ok(GroupConsumer {
            client: self.clone(),
            config,
            member_id: String::new(),
            generation: -1,
            consumers: BTreeMap::new(),
            out_of_range: Vec::new(),
            pending_error: None,
            unstarted: BTreeMap::new(),
            unstarted_retry_at: Instant::now(),
            unstarted_report_at: Instant::now(),
            committed: BTreeMap::new(),
            signal: Arc::new(AtomicU8::new(SIGNAL_REJOIN)),
            heartbeat: None,
            pending: None,
            pending_done: Arc::new(tokio::sync::Notify::new()),
            listener: None,
            last_commit: Instant::now(),
            polled: PollClock::new(),
            poll_cursor: 0,
        })
    }
}

/// Heartbeat task → consumer signals.
const SIGNAL_OK: u8 = 0;
const SIGNAL_REJOIN: u8 = 1;
const SIGNAL_REJOIN_AS_NEW: u8 = 2;
/// A newer member with this member's static instance id replaced it: it
/// stops for good (sticky: no later signal replaces it).
const SIGNAL_FENCED: u8 = 3;
/// A poll is taking up a join's answer (starting partitions): left
/// behind by a poll dropped meanwhile, the next poll rejoins; heartbeats,
/// which run meanwhile, replace it with what they learn, which the end of
/// the take-up keeps.
const SIGNAL_STARTING: u8 = 4;

/// Marks a join's answer as being taken up, unless heartbeats already
/// found the member forgotten or fenced (then the answer is stale: false).
fn start_taking_up(signal: &AtomicU8) -> bool {
    signal
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            matches!(now, SIGNAL_OK | SIGNAL_REJOIN | SIGNAL_STARTING).then_some(SIGNAL_STARTING)
        })
        .is_ok()
}

/// Ends the take-up: OK, or REJOIN when the answer asked for another
/// round; what heartbeats signalled meanwhile stays.
fn end_taking_up(signal: &AtomicU8, rejoin: bool) {
    let _ = signal.compare_exchange(
        SIGNAL_STARTING,
        if rejoin { SIGNAL_REJOIN } else { SIGNAL_OK },
        Ordering::AcqRel,
        Ordering::Acquire,
    );
}

fn set_signal(signal: &AtomicU8, value: u8) {
    let _ = signal.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
        (now != SIGNAL_FENCED).then_some(value)
    });
}

/// A background (cooperative) rejoin.
/// A background rejoin: its answer, and the heartbeats started for the
/// generation it joined, which keep the member alive until a poll takes
/// the answer up (the application may spend longer than the session
/// timeout on the records it already has).
type PendingJoin = JoinHandle<(
    Result<pb::JoinGroupResponse, ClientError>,
    Option<Heartbeats>,
)>;

/// A heartbeat task, stopped when dropped.
#[derive(Debug)]
struct Heartbeats(JoinHandle<()>);

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Listener(RebalanceListener);

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RebalanceListener")
    }
}

/// A member of a consumer group.
#[derive(Debug)]
pub struct GroupConsumer {
    client: Client,
    config: GroupConfig,
    member_id: String,
    generation: i32,
    /// Readers of the assigned partitions.
    consumers: BTreeMap<(String, i32), PartitionConsumer>,
    /// Owned partitions whose position fell off the log in the last poll
    /// (false), or whose topic id the broker did not know (true: the
    /// topic was created again, or this client's cached id was stale);
    /// the next poll starts them over.
    out_of_range: Vec<((String, i32), bool)>,
    /// A fetch refused for good that came with another partition's
    /// records: the next poll returns it. Dropped, it was never reported
    /// while other partitions had traffic, and its partition stalled
    /// unseen.
    pending_error: Option<ClientError>,
    /// Assigned partitions that could not be started yet, with where they
    /// start and their committed offset (-1: none): later polls try them
    /// again, while the rest of the assignment is read. One such
    /// partition used to fail every start, and the member read nothing.
    unstarted: BTreeMap<(String, i32), Unstarted>,
    /// When a poll next reports why a partition is still unstarted.
    unstarted_report_at: Instant,
    /// When a poll next tries `unstarted`.
    unstarted_retry_at: Instant,
    /// Last committed (or fetched) offset per assigned partition.
    committed: BTreeMap<(String, i32), i64>,
    /// Set by the heartbeat task: rejoin needed.
    signal: Arc<AtomicU8>,
    heartbeat: Option<JoinHandle<()>>,
    /// When the application last polled (see `max_poll_interval`).
    polled: Arc<PollClock>,
    /// Which partition's records come first when a poll has more than
    /// `max_poll_records` (moves on each time).
    poll_cursor: usize,
    /// Cooperative: the rejoin under way while partitions are still read.
    pending: Option<PendingJoin>,
    /// Notified when `pending` finishes: a poll waiting for records stops
    /// waiting, so the answer is taken up at once.
    pending_done: Arc<tokio::sync::Notify>,
    listener: Option<Listener>,
    last_commit: Instant,
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        // Without close(): no leave, no commit; the session expires.
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if let Some(h) = self.pending.take() {
            h.abort();
        }
    }
}

impl GroupConsumer {
    /// Member id (empty before the first join).
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// Current generation (-1 before the first join).
    pub fn generation(&self) -> i32 {
        self.generation
    }

    /// Calls `listener` whenever partitions are revoked or assigned.
    pub fn set_rebalance_listener(&mut self, listener: RebalanceListener) {
        self.listener = Some(Listener(listener));
    }

    /// Whether a rejoin is under way (cooperative: the owned partitions
    /// are still being read meanwhile).
    pub fn rebalancing(&self) -> bool {
        self.pending.is_some() || self.signal.load(Ordering::Acquire) != SIGNAL_OK
    }

    /// Whether a cooperative rejoin runs in the background (started by a
    /// poll; a later poll takes its answer up).
    pub fn rejoining_in_background(&self) -> bool {
        self.pending.is_some()
    }

    fn tell(&self, event: RebalanceEvent) {
        if let Some(Listener(l)) = &self.listener {
            l(&event);
        }
    }

    fn cooperative(&self) -> bool {
        self.config.protocol == pb::RebalanceProtocol::Cooperative
    }

    /// A newer member with this one's static instance id took its place:
    /// it stops reading (its partitions are the new member's now) and
    /// every later poll fails with FENCED_INSTANCE_ID; it does not rejoin,
    /// which would fence the newer one in turn.
    fn fenced(&mut self) -> ClientError {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if let Some(h) = self.pending.take() {
            h.abort();
        }
        let lost: Vec<(String, i32)> = std::mem::take(&mut self.consumers)
            .into_keys()
            .chain(
                std::mem::take(&mut self.unstarted)
                    .into_iter()
                    .filter(|(_, u)| u.announced)
                    .map(|(tp, _)| tp),
            )
            .collect();
        self.committed.clear();
        if !lost.is_empty() {
            self.tell(RebalanceEvent::Revoked(lost));
        }
        ClientError::Broker {
            code: pb::ErrorCode::FencedInstanceId,
            message: format!(
                "member '{}' of group '{}' was replaced by a newer member with instance id '{}'",
                self.member_id, self.config.group, self.config.group_instance_id
            ),
            leader: None,
        }
    }

    /// Partitions owned now.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.consumers.keys().cloned().collect()
    }

    /// Assigned partitions with no position under [`OffsetReset::None`]
    /// (none committed, or it fell off the log): not read until
    /// [`GroupConsumer::seek`] gives them one.
    pub fn unpositioned(&self) -> Vec<(String, i32)> {
        self.unstarted
            .iter()
            .filter(|(_, u)| u.from.is_none())
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    /// Next offset to read of an owned partition.
    pub fn position(&self, topic: &str, partition: i32) -> Option<i64> {
        self.consumers
            .get(&(topic.to_string(), partition))
            .map(PartitionConsumer::position)
    }

    /// Moves the read position of an owned partition.
    pub fn seek(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), ClientError> {
        let tp = (topic.to_string(), partition);
        if let Some(u) = self.unstarted.get_mut(&tp) {
            // Assigned, not started yet (no position under
            // `OffsetReset::None`, or its leader away): it starts there.
            u.from = Some(StartFrom::Offset(offset));
            self.unstarted_retry_at = Instant::now();
            return Ok(());
        }
        let c = self.consumers.get_mut(&tp).ok_or_else(|| {
            ClientError::Invalid(format!(
                "{topic}-{partition} is not assigned to this member"
            ))
        })?;
        c.seek(offset);
        // A reset pending from an earlier out-of-range fetch would undo
        // the seek.
        self.out_of_range
            .retain(|(tp, _)| tp.0 != topic || tp.1 != partition);
        Ok(())
    }

    /// Whether every owned partition was read up to the high watermark of
    /// its last fetch (and a rebalance is not pending).
    pub fn caught_up(&self) -> bool {
        self.generation >= 0
            && !self.rebalancing()
            && self.unstarted.is_empty()
            && self.out_of_range.is_empty()
            && self
                .consumers
                .values()
                .all(|c| c.position() >= c.high_watermark())
    }

    /// How long a join may wait for the rebalance to complete.
    fn join_wait(&self) -> Duration {
        let c = &self.config;
        Duration::from_millis(
            u64::from(self.rebalance_timeout_ms()) + u64::from(c.session_timeout_ms),
        ) + REQUEST_TIMEOUT
    }

    /// The rebalance timeout sent: at most `max_poll_interval`, past
    /// which a member that has not polled leaves anyway (so lowering
    /// `max_poll_interval` lowers the default rebalance timeout with it).
    fn rebalance_timeout_ms(&self) -> u32 {
        let c = &self.config;
        let poll_ms = u32::try_from(c.max_poll_interval.as_millis()).unwrap_or(u32::MAX);
        c.rebalance_timeout_ms.min(poll_ms.max(100))
    }

    fn join_request(&self) -> pb::JoinGroupRequest {
        let c = &self.config;
        pb::JoinGroupRequest {
            group: c.group.clone(),
            member_id: self.member_id.clone(),
            group_instance_id: c.group_instance_id.clone(),
            topics: c.topics.clone(),
            session_timeout_ms: c.session_timeout_ms,
            rebalance_timeout_ms: self.rebalance_timeout_ms(),
            strategy: c.strategy as i32,
            client_id: c.client_id.clone(),
            protocol: c.protocol as i32,
            // A first join that this poll's caller drops leaves nothing
            // in the group (see `join`).
            member_id_first: true,
            // Unstarted ones too: still this member's (a seek given them
            // must not be lost to another member's assignment).
            owned_partitions: if self.cooperative() {
                self.consumers
                    .keys()
                    .chain(self.unstarted.keys())
                    .map(|(topic, partition)| pb::TopicPartition {
                        topic: topic.clone(),
                        partition: *partition,
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Takes up a finished background rejoin, and starts one when the
    /// coordinator asked for it; joins in the foreground first (eager, the
    /// first join, or after the member was forgotten).
    async fn rebalance(&mut self) -> Result<(), ClientError> {
        // A poll dropped while it took up an answer: rejoin.
        let _ = self.signal.compare_exchange(
            SIGNAL_STARTING,
            SIGNAL_REJOIN,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if self.pending.as_ref().is_some_and(JoinHandle::is_finished) {
            let pending = self.pending.take().expect("checked above");
            // The bridging heartbeats stop here: what they learned (a new
            // rebalance, say) the member's own heartbeats learn again.
            match pending.await.map(|(answer, _bridge)| answer) {
                Ok(Ok(resp)) => self.take_cooperative_answer(resp).await?,
                Ok(Err(e)) if e.code() == pb::ErrorCode::FencedInstanceId => {
                    set_signal(&self.signal, SIGNAL_FENCED);
                }
                Ok(Err(e)) if e.code() == pb::ErrorCode::UnknownMember => {
                    set_signal(&self.signal, SIGNAL_REJOIN_AS_NEW);
                }
                Ok(Err(e)) => {
                    set_signal(&self.signal, SIGNAL_REJOIN);
                    if !join_failure_is_passing(&e) {
                        return Err(e);
                    }
                    tracing::debug!(group = %self.config.group, error = %e, "background join did not complete; rejoining");
                }
                Err(_) => set_signal(&self.signal, SIGNAL_REJOIN),
            }
        }
        let signal = self.signal.load(Ordering::Acquire);
        if signal == SIGNAL_FENCED {
            return Err(self.fenced());
        }
        if self.generation < 0
            || signal == SIGNAL_REJOIN_AS_NEW
            || (signal == SIGNAL_REJOIN && !self.cooperative())
        {
            if let Some(h) = self.pending.take() {
                h.abort();
            }
            // A rejoin this answer asks for starts with the next poll.
            return match self.join().await {
                Err(e) if join_failure_is_passing(&e) => {
                    // The next poll joins again (as a new member, if this
                    // one was forgotten meanwhile); the application is not
                    // told of a rebalance that did not finish in time.
                    if e.code() == pb::ErrorCode::UnknownMember {
                        set_signal(&self.signal, SIGNAL_REJOIN_AS_NEW);
                    }
                    tracing::debug!(group = %self.config.group, error = %e, "join did not complete; the next poll tries again");
                    Ok(())
                }
                other => other,
            };
        }
        // A cooperative member asked to rejoin (also right after an answer
        // that says so) starts at once and reads on meanwhile.
        if signal == SIGNAL_REJOIN && self.pending.is_none() {
            if let Some(h) = self.heartbeat.take() {
                h.abort();
            }
            let client = self.client.clone();
            let req = self.join_request();
            let wait = self.join_wait();
            let signal = self.signal.clone();
            let watch = self.poll_watch();
            // A fresh one per join: an earlier join's notice, never
            // waited for, would end the next wait at once.
            self.pending_done = Arc::new(tokio::sync::Notify::new());
            let done = self.pending_done.clone();
            self.pending = Some(tokio::spawn(async move {
                let group = req.group.clone();
                let instance = req.group_instance_id.clone();
                let answer = client
                    .group_call(&group, req, wait, |mut g, r| async move {
                        g.join_group(r).await
                    })
                    .await;
                // Heartbeats whatever the answer asks: one that asks for
                // another round (partitions given up) is taken up only by
                // the next poll, and the application may be busy until
                // then for longer than the session.
                let bridge = match &answer {
                    Ok(r) if !r.member_id_required => Some(Heartbeats(heartbeats(
                        client,
                        signal,
                        pb::HeartbeatRequest {
                            group,
                            member_id: r.member_id.clone(),
                            generation_id: r.generation_id,
                            group_instance_id: instance,
                        },
                        r.heartbeat_interval_ms,
                        watch,
                    ))),
                    _ => None,
                };
                done.notify_one();
                (answer, bridge)
            }));
        }
        Ok(())
    }

    /// Cooperative: applies the answer to a background rejoin. Partitions
    /// taken away are committed (with auto-commit) and stopped, and the
    /// member rejoins at once so the follow-up round can hand them over;
    /// partitions kept are untouched; new ones start.
    async fn take_cooperative_answer(
        &mut self,
        resp: pb::JoinGroupResponse,
    ) -> Result<(), ClientError> {
        if resp.member_id_required {
            // Only a first join asks for an id, and background rejoins
            // are not first; should one be answered so, the next poll
            // joins in the foreground with the id.
            self.member_id = resp.member_id;
            self.generation = -1;
            return Ok(());
        }
        self.member_id = resp.member_id.clone();
        self.generation = resp.generation_id;
        let assigned: BTreeSet<(String, i32)> = resp
            .assignment
            .iter()
            .map(|tp| (tp.topic.clone(), tp.partition))
            .collect();
        let revoked: BTreeSet<(String, i32)> = self
            .consumers
            .keys()
            .filter(|tp| !assigned.contains(*tp))
            .cloned()
            .collect();
        // Until the end, a poll dropped at an await below (a `select!`, a
        // timeout) leaves the member to rejoin on the next poll, which
        // finishes the job: partitions taken away are stopped before the
        // first await, so a rejoin never claims them stopped while they
        // are still read, and what is not started yet comes back in the
        // next answer.
        if !start_taking_up(&self.signal) {
            // The bridging heartbeats found the member forgotten (or
            // fenced) before this poll: the answer is stale.
            return Ok(());
        }
        // Heartbeats first, for the new generation: committing what is
        // taken away may wait for the replicas (up to its retries), and
        // starting partitions may take a while (retried while their
        // leaders move), both longer than the session; the bridging
        // heartbeats stopped when this answer was taken. Heartbeats even
        // when another round is asked for: the next poll starts it, and
        // the application may be busy until then.
        self.spawn_heartbeat(resp.heartbeat_interval_ms);
        if !revoked.is_empty() {
            let positions = if self.config.auto_commit_interval.is_some() {
                self.uncommitted(Some(&revoked))
            } else {
                Vec::new()
            };
            self.consumers.retain(|tp, _| !revoked.contains(tp));
            self.committed.retain(|tp, _| !revoked.contains(tp));
            self.tell(RebalanceEvent::Revoked(revoked.iter().cloned().collect()));
            // Best effort: what is not committed is read again by the
            // next owner.
            if let Err(e) = self.commit_now(positions).await {
                tracing::debug!(error = %e, "commit of revoked partitions failed");
            }
        }
        let gone: Vec<(String, i32)> = self
            .unstarted
            .iter()
            .filter(|(tp, u)| u.announced && !assigned.contains(*tp))
            .map(|(tp, _)| tp.clone())
            .collect();
        self.unstarted.retain(|tp, _| assigned.contains(tp));
        if !gone.is_empty() {
            self.tell(RebalanceEvent::Revoked(gone));
        }
        let rejoin = resp.rejoin || !revoked.is_empty();
        // Still unstarted ones stay with `start_unstarted` (and keep a
        // seek the application gave them).
        let added: Vec<(String, i32)> = assigned
            .iter()
            .filter(|tp| !self.consumers.contains_key(*tp) && !self.unstarted.contains_key(*tp))
            .cloned()
            .collect();
        // Rejoining takes them up again.
        self.start_partitions(&added).await?;
        end_taking_up(&self.signal, rejoin);
        Ok(())
    }

    /// Starts reading `partitions` from their committed offsets (or the
    /// reset point) and tells the listener.
    async fn start_partitions(&mut self, partitions: &[(String, i32)]) -> Result<(), ClientError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let committed = self
            .client
            .fetch_offsets(&self.config.group, partitions)
            .await?;
        let mut started = Vec::new();
        let mut failed = Vec::new();
        // One deadline for them all: retried one after another, each
        // leaderless partition held the poll (and the member's next
        // rejoin) for a request timeout of its own.
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        for o in committed {
            let tp = (o.topic.clone(), o.partition);
            let from = if o.offset >= 0 {
                Some(StartFrom::Offset(o.offset))
            } else {
                self.reset_point()
            };
            let Some(at) = from else {
                // OffsetReset::None: waits for a seek; polls say so.
                failed.push((tp, None, o.offset));
                continue;
            };
            match self.start_partition(&tp, at, deadline).await {
                Ok(pc) => started.push((tp, o.offset, pc)),
                Err(e) => {
                    tracing::warn!(group = %self.config.group, topic = %tp.0, partition = tp.1, error = %e, "could not start an assigned partition; later polls try again");
                    failed.push((tp, from, o.offset));
                }
            }
        }
        // All at once, after the last await: a poll dropped above starts
        // none of them (the rejoin it leaves behind does), so every owned
        // partition was announced to the listener.
        if self.unstarted.is_empty() && !failed.is_empty() {
            self.unstarted_report_at = Instant::now() + UNSTARTED_REPORT;
        }
        for (tp, from, committed) in failed {
            let u = Unstarted {
                from,
                committed,
                announced: false,
            };
            self.unstarted.insert(tp, u);
        }
        self.unstarted_retry_at = Instant::now() + UNSTARTED_RETRY;
        self.take_up_started(started);
        Ok(())
    }

    /// Reads `started` partitions from now on and tells the listener.
    fn take_up_started(&mut self, started: Vec<((String, i32), i64, PartitionConsumer)>) {
        let mut names = Vec::new();
        for (tp, offset, mut pc) in started {
            pc.max_wait_ms = self.config.max_wait_ms;
            pc.max_bytes = self.config.max_bytes;
            pc.max_records = self.config.max_poll_records;
            if offset >= 0 {
                self.committed.insert(tp.clone(), offset);
            }
            // Started afresh: a reset pending from before is not its.
            self.out_of_range.retain(|(x, _)| x != &tp);
            let announced = self.unstarted.remove(&tp).is_some_and(|u| u.announced);
            self.consumers.insert(tp.clone(), pc);
            if !announced {
                names.push(tp);
            }
        }
        if !names.is_empty() {
            self.tell(RebalanceEvent::Assigned(names));
        }
    }

    /// Tries once more to start the assigned partitions that could not be
    /// started, at most every [`UNSTARTED_RETRY`]. A failure that retrying
    /// cannot cure (no authorization, say) is returned.
    async fn start_unstarted(&mut self) -> Result<(), ClientError> {
        // Not while a background rejoin is under way: its request listed
        // what the member owned without these, and a partition started now
        // could be handed to another member by that round.
        if self.unstarted.is_empty()
            || self.pending.is_some()
            || Instant::now() < self.unstarted_retry_at
        {
            return Ok(());
        }
        self.unstarted_retry_at = Instant::now() + UNSTARTED_RETRY;
        let due: Vec<_> = self
            .unstarted
            .iter()
            .map(|(tp, u)| (tp.clone(), u.from, u.committed))
            .collect();
        let mut started = Vec::new();
        let mut failure = None;
        let mut unpositioned = None;
        for (tp, from, offset) in due {
            let Some(from) = from else {
                unpositioned.get_or_insert(tp);
                continue;
            };
            self.client.invalidate(&tp.0);
            match self.client.partition_consumer(&tp.0, tp.1, from).await {
                Ok(pc) => started.push((tp, offset, pc)),
                Err(e) => {
                    tracing::debug!(topic = %tp.0, partition = tp.1, error = %e, "starting a partition failed again");
                    if failure.is_none() || fetch_failure_is_fatal(&e) {
                        failure = Some(e);
                    }
                }
            }
        }
        // After the last await, as in `start_partitions`.
        self.take_up_started(started);
        if let Some(tp) = unpositioned {
            return Err(self.no_position(&tp, "none committed, or it fell off the log"));
        }
        let Some(e) = failure else {
            return Ok(());
        };
        // Reported at once when retrying cannot cure it (no
        // authorization, say), else once it has lasted a while.
        let due = Instant::now() >= self.unstarted_report_at;
        if fetch_failure_is_fatal(&e) || due {
            self.unstarted_report_at = Instant::now() + UNSTARTED_REPORT;
            return Err(e);
        }
        Ok(())
    }

    /// A consumer of one owned partition. Retriable failures (its leader
    /// moving or restarting during the rebalance) are tried again with
    /// backoff for up to a request timeout, as Kafka's consumer retries
    /// its offset lookups, rather than failing the poll and with it every
    /// partition of the assignment.
    async fn start_partition(
        &mut self,
        (topic, partition): &(String, i32),
        from: StartFrom,
        deadline: Instant,
    ) -> Result<PartitionConsumer, ClientError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self
                .client
                .partition_consumer(topic, *partition, from)
                .await
            {
                Ok(pc) => return Ok(pc),
                Err(e) if e.is_retriable() && Instant::now() + backoff < deadline => {
                    tracing::debug!(%topic, partition, error = %e, "starting a partition failed; retrying");
                    self.client.invalidate(topic);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Joins (or rejoins) the group in the foreground and takes up the new
    /// assignment; nothing is read meanwhile.
    async fn join(&mut self) -> Result<(), ClientError> {
        if self.generation >= 0 && self.config.auto_commit_interval.is_some() {
            // Best effort: a fenced commit is re-read by the next owner.
            let _ = self.commit().await;
        }
        if self.signal.load(Ordering::Acquire) == SIGNAL_FENCED {
            return Err(self.fenced());
        }
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if self.signal.load(Ordering::Acquire) == SIGNAL_REJOIN_AS_NEW {
            self.member_id.clear();
        }
        let old = std::mem::take(&mut self.consumers);
        // Kept (see below) only if the member stays the same one.
        let old_unstarted = std::mem::take(&mut self.unstarted);
        let told: Vec<(String, i32)> = old
            .keys()
            .cloned()
            .chain(
                old_unstarted
                    .iter()
                    .filter(|(_, u)| u.announced)
                    .map(|(tp, _)| tp.clone()),
            )
            .collect();
        if !told.is_empty() {
            self.tell(RebalanceEvent::Revoked(told));
        }
        let old_generation = self.generation;
        let old_member = self.member_id.clone();
        let wait = self.join_wait();
        let mut req = self.join_request();
        let (client, group) = (self.client.clone(), self.config.group.clone());
        let join = |req: pb::JoinGroupRequest| {
            client.group_call(&group, req, wait, |mut g, r| async move {
                g.join_group(r).await
            })
        };
        // At most: forgotten (UNKNOWN_MEMBER), then given an id, then in.
        let mut tries = 0;
        let resp = loop {
            tries += 1;
            match join(req.clone()).await {
                Err(e) if e.code() == pb::ErrorCode::UnknownMember && tries < 3 => {
                    req.member_id.clear();
                }
                Err(e) if e.code() == pb::ErrorCode::FencedInstanceId => {
                    set_signal(&self.signal, SIGNAL_FENCED);
                    return Err(self.fenced());
                }
                Ok(r) if r.member_id_required && tries < 3 => {
                    // Kept even if this poll is dropped now: the next
                    // join uses it, and the group gains no second member.
                    self.member_id = r.member_id.clone();
                    req.member_id = r.member_id;
                    // Nor if this join fails (REBALANCE_IN_PROGRESS): the
                    // next poll joined as new again, leaving the member
                    // this id made behind, with partitions nobody read
                    // until its session ran out.
                    let _ = self.signal.compare_exchange(
                        SIGNAL_REJOIN_AS_NEW,
                        SIGNAL_REJOIN,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                other => break other?,
            }
        };
        if resp.member_id_required {
            // Given an id on the last try (forgotten, then given a new
            // one): not a member yet. The next poll joins with it.
            self.member_id = resp.member_id;
            self.generation = -1;
            set_signal(&self.signal, SIGNAL_REJOIN);
            return Ok(());
        }
        self.member_id = resp.member_id.clone();
        self.generation = resp.generation_id;
        // Until the partitions are started: a poll dropped meanwhile
        // leaves the member to rejoin on the next one. (The answer is
        // fresh and no heartbeats run: whatever was signalled before the
        // join, such as REJOIN_AS_NEW, is done with.)
        set_signal(&self.signal, SIGNAL_STARTING);
        let assigned: Vec<(String, i32)> = resp
            .assignment
            .iter()
            .map(|tp| (tp.topic.clone(), tp.partition))
            .collect();
        // Kept partitions continue where they were, if no generation was
        // missed in between.
        let continuous = old_member == self.member_id && old_generation + 1 == self.generation;
        let mut kept = BTreeMap::new();
        if continuous {
            for (tp, c) in old {
                if assigned.contains(&tp) {
                    kept.insert(tp, c);
                }
            }
            // Unstarted ones too, with where they were to start (a seek).
            // (Told Revoked above: Assigned again when they start.)
            self.unstarted = old_unstarted
                .into_iter()
                .filter(|(tp, _)| assigned.contains(tp))
                .map(|(tp, u)| {
                    let u = Unstarted {
                        announced: false,
                        ..u
                    };
                    (tp, u)
                })
                .collect();
        }
        let fresh: Vec<(String, i32)> = assigned
            .iter()
            .filter(|tp| !kept.contains_key(*tp) && !self.unstarted.contains_key(*tp))
            .cloned()
            .collect();
        self.committed.retain(|tp, _| assigned.contains(tp));
        if !kept.is_empty() {
            self.tell(RebalanceEvent::Assigned(kept.keys().cloned().collect()));
        }
        self.consumers = kept;
        // Heartbeats first: starting partitions may take a while (retried
        // while their leaders move), longer than the session.
        // Heartbeats even when another round is asked for: the next poll
        // starts it, and the application may be busy until then.
        self.spawn_heartbeat(resp.heartbeat_interval_ms);
        self.start_partitions(&fresh).await?;
        end_taking_up(&self.signal, resp.rejoin);
        Ok(())
    }

    fn reset_point(&self) -> Option<StartFrom> {
        match self.config.offset_reset {
            OffsetReset::Earliest => Some(StartFrom::Earliest),
            OffsetReset::Latest => Some(StartFrom::Latest),
            OffsetReset::None => None,
        }
    }

    /// The error `OffsetReset::None` answers a partition with no position.
    fn no_position(&self, (topic, partition): &(String, i32), why: &str) -> ClientError {
        ClientError::Broker {
            code: pb::ErrorCode::OffsetOutOfRange,
            message: format!(
                "{topic}-{partition} has no position for group '{}' ({why}) and offset_reset is None: seek it",
                self.config.group
            ),
            leader: None,
        }
    }

    fn spawn_heartbeat(&mut self, interval_ms: u32) {
        let req = pb::HeartbeatRequest {
            group: self.config.group.clone(),
            member_id: self.member_id.clone(),
            generation_id: self.generation,
            group_instance_id: self.config.group_instance_id.clone(),
        };
        self.heartbeat = Some(heartbeats(
            self.client.clone(),
            self.signal.clone(),
            req,
            interval_ms,
            self.poll_watch(),
        ));
    }

    fn poll_watch(&self) -> PollWatch {
        PollWatch {
            clock: self.polled.clone(),
            max: self.config.max_poll_interval,
        }
    }

    /// Reads the next records of the owned partitions (possibly none after
    /// the long-poll wait). Joins first when needed, and commits when the
    /// auto-commit interval has passed.
    ///
    /// A fetch refused for good (READ revoked, a corrupt batch) fails the
    /// poll, or the next one when other partitions had records for this
    /// one; failures that pass (a leader moving) are retried quietly.
    ///
    /// Cancel-safe once the member has joined: a poll dropped while it
    /// waits for records (in a `select!` or a timeout) keeps every owned
    /// partition, its position and its fetch in flight for the next poll,
    /// and no record is lost. A poll dropped during a join leaves the
    /// member to rejoin on the next poll, as after a revocation.
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>, ClientError> {
        let _polling = self.polled.enter();
        self.rebalance().await?;
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        if let Some(every) = self.config.auto_commit_interval {
            if self.last_commit.elapsed() >= every {
                if let Err(e) = self.commit().await {
                    tracing::warn!(group = %self.config.group, error = %e, "auto-commit failed");
                }
            }
        }
        self.start_unstarted().await?;
        let wait_ms = self.config.max_wait_ms;
        // While a background rejoin is under way, a poll waiting for
        // records stops when its answer arrives, so the next poll takes
        // it up at once. (Fetches used to wait only 10 ms meanwhile: a
        // member with many partitions sent thousands of fetches a second
        // for as long as the rebalance lasted.)
        let rejoining = self.pending.is_some();
        let joined = self.pending_done.clone();
        let join_done = async move {
            if rejoining {
                joined.notified().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(join_done);
        if self.consumers.is_empty() {
            // Nothing to read: wait, unless a rejoin is due (the next poll
            // starts it).
            if self.signal.load(Ordering::Acquire) == SIGNAL_OK || rejoining {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(u64::from(wait_ms))) => {}
                    () = &mut join_done => {}
                }
            }
            return Ok(Vec::new());
        }
        // Every owned partition is polled at once, and the poll returns
        // as soon as one of them has records: the others' polls are
        // dropped (their fetches stay in flight for the next poll), so an
        // idle partition's long-poll wait never holds up a busy one. The
        // polls borrow the consumers, which never leave `self`: a caller
        // that drops this poll (a `select!`, a timeout) loses nothing,
        // because `PartitionConsumer::poll` is cancel-safe and records in
        // hand are returned without another await. A panic in one
        // surfaces here instead of dropping its partition.
        let mut unpositioned = None;
        // Partitions whose committed offset could not be asked: tried
        // again by the next poll.
        let mut ask_again = Vec::new();
        for (tp, topic_changed) in std::mem::take(&mut self.out_of_range) {
            if !self.consumers.contains_key(&tp) {
                continue; // revoked meanwhile
            }
            // The topic may have been created again (a new id): looked up
            // afresh.
            self.client.invalidate(&tp.0);
            // An unknown topic id may only mean this client's id was stale
            // (the topic was created again before it started reading): the
            // group's committed offset, which the coordinator serves only
            // for the topic as it is now, is where to go on. Reset per
            // policy only without one (the topic is new to the group).
            let committed = if topic_changed {
                let asked = self
                    .client
                    .fetch_offsets(&self.config.group, std::slice::from_ref(&tp))
                    .await;
                match asked {
                    Ok(o) => o.first().map(|o| o.offset).filter(|o| *o >= 0),
                    // Not known is not "none": reset, the partition's next
                    // commit would write the reset point over the group's
                    // offset for the topic.
                    Err(e) => {
                        tracing::debug!(error = %e, topic = %tp.0, partition = tp.1, "could not ask the committed offset; trying again");
                        ask_again.push((tp, true));
                        continue;
                    }
                }
            } else {
                None
            };
            let Some(from) = committed
                .map(StartFrom::Offset)
                .or_else(|| self.reset_point())
            else {
                // OffsetReset::None: not read (nor committed) until the
                // application seeks it; the seek starts a fresh consumer
                // (fresh metadata, if the topic id changed).
                self.consumers.remove(&tp);
                // Its last commit belonged to the lost position.
                self.committed.remove(&tp);
                let u = Unstarted {
                    from: None,
                    committed: -1,
                    announced: true,
                };
                self.unstarted.insert(tp.clone(), u);
                self.unstarted_retry_at = Instant::now() + UNSTARTED_RETRY;
                unpositioned.get_or_insert(tp);
                continue;
            };
            match self.client.partition_consumer(&tp.0, tp.1, from).await {
                Ok(mut pc) => {
                    pc.max_wait_ms = self.config.max_wait_ms;
                    pc.max_bytes = self.config.max_bytes;
                    pc.max_records = self.config.max_poll_records;
                    if let Some(offset) = committed {
                        tracing::info!(group = %self.config.group, topic = %tp.0, partition = tp.1, offset, "topic id changed; going on from the group's committed offset");
                        self.committed.insert(tp.clone(), offset);
                        self.consumers.insert(tp, pc);
                        continue;
                    }
                    // Records were skipped (or will be read again): said
                    // where an operator sees it.
                    tracing::warn!(
                        group = %self.config.group,
                        topic = %tp.0,
                        partition = tp.1,
                        position = self.consumers.get(&tp).map_or(-1, PartitionConsumer::position),
                        reset_to = pc.position(),
                        offset_reset = ?self.config.offset_reset,
                        "position out of range; starting over per offset_reset"
                    );
                    // What was committed belonged to the old position (or
                    // topic): the new one is committed even if equal.
                    self.committed.remove(&tp);
                    self.consumers.insert(tp, pc);
                }
                // Kept as it is: it fails the same way next time.
                Err(e) => {
                    tracing::debug!(error = %e, topic = %tp.0, partition = tp.1, "could not start over")
                }
            }
        }
        self.out_of_range = ask_again;
        if let Some(tp) = unpositioned {
            return Err(self.no_position(&tp, "its position is out of range"));
        }
        let mut out = Vec::new();
        let mut failed = None;
        let mut fatal = None;
        let mut out_of_range = Vec::new();
        {
            // Polled from a partition one further each time (the order
            // decides who is taken first when several are ready), and no
            // more are taken once a poll's worth is in hand: gathered from
            // every ready partition and cut, most records went back to
            // their partitions on every poll (consume --group at half
            // speed).
            let mut owned: Vec<_> = self.consumers.iter_mut().collect();
            if !owned.is_empty() {
                let turn = self.poll_cursor % owned.len();
                owned.rotate_left(turn);
            }
            self.poll_cursor = self.poll_cursor.wrapping_add(1);
            let mut polls: FuturesUnordered<_> = owned
                .into_iter()
                .map(|(tp, c)| {
                    c.max_wait_ms = wait_ms;
                    async move { (tp, c.poll().await) }
                })
                .collect();
            let max_records = self.config.max_poll_records;
            let mut taken = 0usize;
            let mut take = |tp: &(String, i32), r: Result<Vec<ConsumedRecord>, ClientError>| match r
            {
                Ok(records) => {
                    taken += records.len();
                    out.extend(records);
                    taken
                }
                // The position fell off the log, or the topic was deleted
                // and created again: start over per policy.
                Err(e)
                    if matches!(
                        e.code(),
                        pb::ErrorCode::OffsetOutOfRange | pb::ErrorCode::UnknownTopicId
                    ) =>
                {
                    out_of_range.push((tp.clone(), e.code() == pb::ErrorCode::UnknownTopicId));
                    taken
                }
                Err(e) if fetch_failure_is_fatal(&e) => {
                    fatal = Some(e);
                    taken
                }
                Err(e) => {
                    failed = Some(e);
                    taken
                }
            };
            loop {
                let next = tokio::select! {
                    next = polls.next() => next,
                    () = &mut join_done => None,
                };
                let Some((tp, r)) = next else { break };
                let got = matches!(&r, Ok(records) if !records.is_empty());
                let mut so_far = take(tp, r);
                if got {
                    // Whatever else is ready now, without waiting, up to
                    // a poll's worth.
                    while so_far < max_records {
                        let Some(Some((tp, r))) = polls.next().now_or_never() else {
                            break;
                        };
                        so_far = take(tp, r);
                    }
                    break;
                }
            }
        }
        // Past max_poll_records (the last partition taken brought more):
        // the rest go back to their partitions, unseen, for the next polls.
        if out.len() > self.config.max_poll_records {
            let mut back = out.split_off(self.config.max_poll_records);
            while let Some(first) = back.first() {
                let (topic, partition) = (first.topic.clone(), first.partition);
                let rest = back
                    .iter()
                    .position(|r| r.partition != partition || r.topic != topic)
                    .unwrap_or(back.len());
                let tail = back.split_off(rest);
                let tp = (topic.to_string(), partition);
                if let Some(c) = self.consumers.get_mut(&tp) {
                    c.unread(back);
                }
                back = tail;
            }
        }
        // Started over by the next poll: no await here with records in hand.
        for entry in out_of_range {
            if !self.out_of_range.contains(&entry) {
                self.out_of_range.push(entry);
            }
        }
        if !out.is_empty() {
            self.pending_error = fatal.take();
        }
        if out.is_empty() {
            if let Some(e) = fatal {
                // Retrying does not help until someone acts (READ
                // revoked, a corrupt batch): the application is told, as
                // Kafka's poll throws, instead of seeing empty polls.
                return Err(e);
            }
            if let Some(e) = failed {
                // Leadership moving: back off a little, routes refresh.
                tracing::debug!(error = %e, "fetch failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(out)
    }

    /// Commits the position of every owned partition that moved.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        self.commit_partitions(None).await
    }

    /// Commits the moved positions of `only` (or every owned partition).
    async fn commit_partitions(
        &mut self,
        only: Option<&BTreeSet<(String, i32)>>,
    ) -> Result<(), ClientError> {
        self.last_commit = Instant::now();
        if self.generation < 0 {
            return Ok(());
        }
        let offsets = self.uncommitted(only);
        self.commit_now(offsets).await
    }

    /// The positions of the owned partitions (of `only`, when given) that
    /// differ from what was last committed.
    fn uncommitted(&self, only: Option<&BTreeSet<(String, i32)>>) -> Vec<pb::PartitionOffset> {
        self.consumers
            .iter()
            .filter(|(tp, _)| only.is_none_or(|o| o.contains(*tp)))
            .filter(|(tp, c)| self.committed.get(*tp) != Some(&c.position()))
            .map(|((t, p), c)| pb::PartitionOffset {
                // A topic created again since this consumer started: the
                // coordinator refuses the old topic's position.
                topic_id: c.topic_id().to_string(),
                topic: t.clone(),
                partition: *p,
                offset: c.position(),
                metadata: String::new(),
            })
            .collect()
    }

    /// One CommitOffsets call as this member and generation (`&mut`: a
    /// shared borrow held across the await would need the consumer to be
    /// `Sync`, which its streams are not).
    async fn send_commit(&mut self, offsets: Vec<pb::PartitionOffset>) -> Result<(), ClientError> {
        self.client
            .commit_offsets_as(
                &self.config.group,
                &self.member_id,
                &self.config.group_instance_id,
                self.generation,
                offsets,
            )
            .await
    }

    /// Commits `offsets` as this member and generation, and records them
    /// for the partitions it still owns (a revoked partition's last
    /// position is committed after it was dropped).
    async fn commit_now(&mut self, offsets: Vec<pb::PartitionOffset>) -> Result<(), ClientError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut offsets = offsets;
        let mut r = self.send_commit(offsets.clone()).await;
        // The coordinator refuses a whole commit naming a topic deleted
        // (or created again) meanwhile: one such topic failed every
        // commit of the others until a rebalance took it away (their
        // positions read again after a crash, and a revocation's commit
        // lost). The rest are committed again without it.
        if r.as_ref().is_err_and(|e| {
            matches!(
                e.code(),
                pb::ErrorCode::UnknownTopic
                    | pb::ErrorCode::UnknownTopicId
                    | pb::ErrorCode::UnknownPartition
            )
        }) {
            // One lookup per topic, all within the request timeout.
            let topics: BTreeSet<String> = offsets.iter().map(|o| o.topic.clone()).collect();
            let client = self.client.clone();
            let looked_up = tokio::time::timeout(
                REQUEST_TIMEOUT,
                futures_util::future::join_all(topics.into_iter().map(|t| {
                    let client = client.clone();
                    async move {
                        client.invalidate(&t);
                        let found = client.topic(&t).await;
                        (t, found)
                    }
                })),
            )
            .await
            .unwrap_or_default();
            // Gone: known to be (refused as unknown, or another topic of
            // the name now). A lookup that failed otherwise, or did not
            // finish, keeps its offsets.
            let current: BTreeMap<String, Option<pb::TopicDescription>> = looked_up
                .into_iter()
                .filter_map(|(t, found)| match found {
                    Ok(d) => Some((t, Some(d))),
                    Err(e) if e.code() == pb::ErrorCode::UnknownTopic => Some((t, None)),
                    Err(_) => None,
                })
                .collect();
            let mut kept = Vec::with_capacity(offsets.len());
            for o in std::mem::take(&mut offsets) {
                let live = match current.get(&o.topic) {
                    None => true,
                    Some(None) => false,
                    Some(Some(t)) => {
                        (o.topic_id.is_empty() || t.topic_id == o.topic_id)
                            && (o.partition as usize) < t.partitions.len()
                    }
                };
                if live {
                    kept.push(o);
                } else {
                    // Not sent again at every commit until a rebalance
                    // takes it away: its position stays where it is.
                    self.committed.insert((o.topic, o.partition), o.offset);
                }
            }
            if !kept.is_empty() {
                tracing::debug!(group = %self.config.group, "commit refused for a topic gone; committing the others");
                offsets = kept;
                r = self.send_commit(offsets.clone()).await;
            }
        }
        match r {
            Ok(()) => {
                for o in offsets {
                    let tp = (o.topic, o.partition);
                    if self.consumers.contains_key(&tp) {
                        self.committed.insert(tp, o.offset);
                    }
                }
                Ok(())
            }
            Err(e) => {
                match e.code() {
                    pb::ErrorCode::FencedInstanceId => set_signal(&self.signal, SIGNAL_FENCED),
                    pb::ErrorCode::UnknownMember => set_signal(&self.signal, SIGNAL_REJOIN_AS_NEW),
                    pb::ErrorCode::IllegalGeneration | pb::ErrorCode::RebalanceInProgress => {
                        set_signal(&self.signal, SIGNAL_REJOIN)
                    }
                    _ => {}
                }
                Err(e)
            }
        }
    }

    /// Commits (with auto-commit on) and leaves the group. A static
    /// member (`group_instance_id` set) does not leave, as in Kafka
    /// (KIP-345): an instance restarted within its session timeout takes
    /// its partitions back without a rebalance, and one that does not
    /// come back is removed when its session runs out.
    pub async fn close(mut self) -> Result<(), ClientError> {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if let Some(h) = self.pending.take() {
            h.abort();
        }
        if self.member_id.is_empty() {
            return Ok(());
        }
        // A member given its id whose join was dropped before its answer
        // may be in the group: it leaves too (it has nothing to commit).
        let committed = if self.config.auto_commit_interval.is_some() && self.generation >= 0 {
            self.commit().await
        } else {
            Ok(())
        };
        if self.signal.load(Ordering::Acquire) == SIGNAL_FENCED {
            // Replaced: nothing of the group is this member's any more.
            return Ok(());
        }
        if !self.config.group_instance_id.is_empty() {
            return committed;
        }
        let left = leave(
            &self.client,
            pb::LeaveGroupRequest {
                group: self.config.group.clone(),
                member_id: self.member_id.clone(),
                group_instance_id: self.config.group_instance_id.clone(),
            },
        )
        .await;
        committed?;
        left
    }
}

/// Leaves the group; a member the group no longer knows has left already.
async fn leave(client: &Client, req: pb::LeaveGroupRequest) -> Result<(), ClientError> {
    let group = req.group.clone();
    match client
        .group_call(&group, req, REQUEST_TIMEOUT, |mut g, r| async move {
            g.leave_group(r).await
        })
        .await
    {
        Err(e) if e.code() != pb::ErrorCode::UnknownMember => Err(e),
        _ => Ok(()),
    }
}
