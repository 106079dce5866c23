//! The follower side: one task per leader broker pulls every partition
//! this broker follows from that leader over one `ReplicaFetch` stream,
//! appends the stored batches unchanged, and adopts the leader's high
//! watermark. Before fetching in a new leader epoch it asks the leader for
//! the end of its own latest epoch and truncates divergent history.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use runnel_proto::v1::internal as ipb;
use runnel_proto::v1::internal::replication_client::ReplicationClient;
use runnel_proto::v1::ErrorCode;
use runnel_replication::{divergence_step, Throttle};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use runnel_storage::StorageError;

use crate::broker::{now_ms, Broker};
use crate::partition::Partition;

/// Pause after a failed round, so a dead leader is not hammered.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// How long a partition whose append, reset or divergence check failed
/// sits out of its fetcher's rounds.
const PARTITION_RETRY: Duration = Duration::from_secs(1);

/// Divergence checks a fetch round makes at most; partitions beyond wait
/// for later rounds, while the checked ones are fetched.
const DIVERGENCE_CHECKS_PER_ROUND: usize = 64;

/// Divergence checks under way at once.
const DIVERGENCE_CHECKS_CONCURRENT: usize = 8;
/// Pause before setting up a leader's connection again (TLS files that
/// could not be read).
const SETUP_RETRY: Duration = Duration::from_secs(5);
/// How much longer than its long-poll wait a fetch round may take.
const ROUND_TIMEOUT_SLACK: Duration = Duration::from_secs(5);

/// One followed partition.
#[derive(Clone, Debug)]
pub struct Assignment {
    /// The partition replica.
    pub partition: Arc<Partition>,
    /// The leader epoch to fetch in.
    pub leader_epoch: i32,
    /// This replica is in the ISR: its fetches are never throttled (as
    /// Kafka throttles only the replicas being moved or caught up), or
    /// produce traffic above the replication byte rate would drop every
    /// follower out of the ISR.
    pub in_sync: bool,
}

/// What a partition was checked for divergence as: its leader epoch and
/// topic id.
#[derive(Debug, PartialEq, Eq)]
struct Checked(i32, String);

impl Checked {
    fn of(a: &Assignment) -> Self {
        Self(a.leader_epoch, a.partition.topic_id.clone())
    }
}

/// Followed partitions by (topic, partition).
pub type Assignments = BTreeMap<(String, i32), Assignment>;

struct Fetcher {
    address: String,
    assignments: watch::Sender<Assignments>,
    cancel: CancellationToken,
}

/// Starts, updates and stops the fetcher tasks.
pub struct FetcherManager {
    broker: Weak<Broker>,
    fetchers: Mutex<HashMap<i32, Fetcher>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for FetcherManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetcherManager").finish_non_exhaustive()
    }
}

impl FetcherManager {
    /// A manager whose tasks stop with `shutdown`.
    pub fn new(broker: Weak<Broker>, shutdown: CancellationToken) -> Self {
        Self {
            broker,
            fetchers: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Sets what each leader is fetched for: `by_leader` maps a leader
    /// broker id to its address and the partitions followed from it.
    pub fn assign(&self, by_leader: HashMap<i32, (String, Assignments)>) {
        let mut fetchers = self.fetchers.lock().unwrap_or_else(|e| e.into_inner());
        fetchers.retain(|leader, f| {
            // A task that ended (it cannot, but a panic would) is started
            // again.
            let keep = !f.assignments.is_closed()
                && by_leader
                    .get(leader)
                    .is_some_and(|(addr, _)| *addr == f.address);
            if !keep {
                f.cancel.cancel();
            }
            keep
        });
        for (leader, (address, assignments)) in by_leader {
            match fetchers.get(&leader) {
                Some(f) => {
                    f.assignments.send_if_modified(|cur| {
                        let changed = !same_assignments(cur, &assignments);
                        if changed {
                            *cur = assignments.clone();
                        }
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(assignments);
                    let cancel = self.shutdown.child_token();
                    tokio::spawn(run_fetcher(
                        self.broker.clone(),
                        leader,
                        address.clone(),
                        rx,
                        cancel.clone(),
                    ));
                    fetchers.insert(
                        leader,
                        Fetcher {
                            address,
                            assignments: tx,
                            cancel,
                        },
                    );
                }
            }
        }
    }
}

/// Why a round was cut short when what is followed changed.
const ASSIGNMENT_CHANGED: &str = "assignment changed";

/// The same partitions, in the same epochs, whatever their in-sync flags.
fn same_partitions(a: &Assignments, b: &Assignments) -> bool {
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((ka, va), (kb, vb))| {
            ka == kb
                && va.leader_epoch == vb.leader_epoch
                && Arc::ptr_eq(&va.partition, &vb.partition)
        })
}

fn same_assignments(a: &Assignments, b: &Assignments) -> bool {
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((ka, va), (kb, vb))| {
            ka == kb
                && va.leader_epoch == vb.leader_epoch
                && va.in_sync == vb.in_sync
                && Arc::ptr_eq(&va.partition, &vb.partition)
        })
}

type Stream = (
    mpsc::Sender<ipb::ReplicaFetchRequest>,
    runnel_proto::wire::DecodeStream<tonic::body::Body, ipb::ReplicaFetchResponse>,
);

async fn run_fetcher(
    broker: Weak<Broker>,
    leader: i32,
    address: String,
    mut assignments: watch::Receiver<Assignments>,
    cancel: CancellationToken,
) {
    info!(leader, %address, "replica fetcher started");
    // A fetcher that gave up here would leave its partitions unreplicated
    // while the manager thinks it runs: it tries again until cancelled.
    let channel = loop {
        let Some(b) = broker.upgrade() else { return };
        match leader_channel(&b, &address) {
            Ok(channel) => break channel,
            Err(e) => {
                warn!(leader, %address, error = %e, "cannot set up the connection to the leader; trying again");
                drop(b);
                tokio::select! {
                    _ = tokio::time::sleep(SETUP_RETRY) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    };
    let mut client = ReplicationClient::new(channel.clone())
        .max_decoding_message_size(crate::client::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(crate::client::MESSAGE_BYTES_MAX);
    let mut stream: Option<Stream> = None;
    // Partitions already checked for divergence in their current epoch
    // (and topic id: a topic created again starts at epoch 0 again).
    let mut truncated: HashMap<(String, i32), Checked> = HashMap::new();
    // Partitions sitting out after a failure of their own, until when.
    let mut resting: HashMap<(String, i32), tokio::time::Instant> = HashMap::new();
    // Where the next round's list of partitions starts.
    let mut rotation = 0usize;
    let mut throttle: Option<Throttle> = None;
    // Until when the replicas out of the ISR wait for the byte rate.
    let mut throttled_until: Option<tokio::time::Instant> = None;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let Some(broker) = broker.upgrade() else {
            break;
        };
        let current = assignments.borrow_and_update().clone();
        if current.is_empty() {
            drop(broker);
            tokio::select! {
                r = assignments.changed() => if r.is_err() { break },
                _ = cancel.cancelled() => break,
            }
            continue;
        }
        let settings = broker.replica_settings();
        let throttle =
            throttle.get_or_insert_with(|| Throttle::new(settings.bytes_per_sec_max, now_ms()));
        let throttled = throttled_until.filter(|t| *t > tokio::time::Instant::now());
        if let Some(until) = throttled {
            if current.values().all(|a| !a.in_sync) {
                // Nothing to fetch until the rate allows.
                drop(broker);
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    r = assignments.changed() => if r.is_err() { break },
                    _ = cancel.cancelled() => break,
                }
                continue;
            }
        }
        // A leader that stops answering (paused, partitioned) must not
        // hold this task: rounds end on a deadline, on cancellation, and
        // when the assignment changes (e.g. a new leader elsewhere).
        let deadline =
            Duration::from_millis(u64::from(settings.fetch_wait_max_ms)) + ROUND_TIMEOUT_SLACK;
        let round = fetch_round(
            &broker,
            &mut client,
            &channel,
            &mut stream,
            &current,
            &mut truncated,
            &mut resting,
            &mut rotation,
            settings,
            throttled.is_some(),
        );
        // Only a change of what is followed (a partition added, dropped or
        // in a new epoch) cuts the round short. A follower's in-sync flag
        // alone is read at the next round: a restarted follower rejoining
        // the ISRs of hundreds of partitions, one commit at a time, had
        // every round cancelled (its answer thrown away, the stream
        // dropped, a backoff) while the flags flipped.
        let moved = async {
            loop {
                if assignments.changed().await.is_err() {
                    return;
                }
                if !same_partitions(&current, &assignments.borrow()) {
                    return;
                }
            }
        };
        let result = tokio::select! {
            r = tokio::time::timeout(deadline, round) => {
                r.unwrap_or_else(|_| Err("leader did not answer in time".into()))
            }
            () = moved => Err(ASSIGNMENT_CHANGED.into()),
            _ = cancel.cancelled() => break,
        };
        drop(broker);
        let pause = match result {
            Ok(throttled_bytes) => {
                let wait = throttle.record(throttled_bytes, now_ms());
                if !wait.is_zero() {
                    throttled_until = Some(tokio::time::Instant::now() + wait);
                }
                Duration::ZERO
            }
            Err(e) => {
                debug!(leader, error = %e, "replica fetch round failed");
                // The round's answer may still come on the stream, where
                // it would be taken for the next round's.
                stream = None;
                if e == ASSIGNMENT_CHANGED {
                    // Nothing failed: the new round starts at once.
                    Duration::ZERO
                } else {
                    RETRY_BACKOFF
                }
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = cancel.cancelled() => break,
            }
        }
    }
    info!(leader, "replica fetcher stopped");
}

/// The channel to a leader's internal listener. TLS files are read at
/// each fetcher start, so a rotated client certificate is used from the
/// next (re)connection on.
fn leader_channel(broker: &Broker, address: &str) -> Result<Channel, String> {
    let tls = crate::security::internal_client_tls(broker.config())
        .map_err(|e| format!("cannot load internal TLS files: {e}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .and_then(|e| {
            let e = crate::server::tune_endpoint(e.connect_timeout(Duration::from_secs(2)));
            match tls {
                Some(tls) => e.tls_config(tls),
                None => Ok(e),
            }
        })
        .map_err(|e| format!("bad leader address: {e}"))?;
    Ok(endpoint.connect_lazy())
}

/// Settings of the follower side.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaSettings {
    /// This broker's id.
    pub replica_id: i32,
    /// Bytes per fetch.
    pub fetch_bytes_max: u32,
    /// Long-poll wait per fetch (ms).
    pub fetch_wait_max_ms: u32,
    /// Replication byte-rate limit; 0 = none.
    pub bytes_per_sec_max: u64,
}

/// Truncates where needed, sends one fetch, applies the answer. Returns the
/// bytes appended to replicas out of the ISR (the ones the byte rate
/// counts). With `throttled`, those are left out of the fetch.
#[allow(clippy::too_many_arguments)]
async fn fetch_round(
    broker: &Broker,
    client: &mut ReplicationClient<Channel>,
    channel: &Channel,
    stream: &mut Option<Stream>,
    assigned: &Assignments,
    truncated: &mut HashMap<(String, i32), Checked>,
    resting: &mut HashMap<(String, i32), tokio::time::Instant>,
    rotation: &mut usize,
    settings: ReplicaSettings,
    throttled: bool,
) -> Result<u64, String> {
    truncated.retain(|k, _| assigned.contains_key(k));
    let now = tokio::time::Instant::now();
    resting.retain(|k, until| *until > now && assigned.contains_key(k));
    // Partitions left out of this round: out of the ISR while the byte
    // rate holds them back, resting after a failure of their own (the
    // leader answers at once while any partition has data, so retrying
    // them each round would spin), or their divergence check failed. The
    // others are fetched all the same.
    let mut skipped: HashSet<&(String, i32)> = assigned
        .iter()
        .filter(|(k, a)| (throttled && !a.in_sync) || resting.contains_key(*k))
        .map(|(k, _)| k)
        .collect();
    let rest = |resting: &mut HashMap<(String, i32), tokio::time::Instant>, key: (String, i32)| {
        resting.insert(key, tokio::time::Instant::now() + PARTITION_RETRY);
    };
    // Divergence checks (one call each, and a truncation that fsyncs):
    // up to DIVERGENCE_CHECKS_PER_ROUND per round, several at once. The
    // partitions not checked yet wait for a later round; the others are
    // fetched meanwhile. Checked one after another before any fetch, a
    // thousand partitions gained from a dead leader held up the
    // partitions already followed for tens of seconds (their ISRs shrank,
    // their acks=all producers waited), and one failed call failed the
    // round for all.
    let unchecked: Vec<&(String, i32)> = assigned
        .iter()
        .filter(|(k, a)| !skipped.contains(k) && truncated.get(*k) != Some(&Checked::of(a)))
        .map(|(k, _)| k)
        .collect();
    for key in unchecked.iter().skip(DIVERGENCE_CHECKS_PER_ROUND) {
        skipped.insert(key);
    }
    let mut queue = unchecked.into_iter().take(DIVERGENCE_CHECKS_PER_ROUND);
    let mut checks = futures_util::stream::FuturesUnordered::new();
    for key in queue.by_ref().take(DIVERGENCE_CHECKS_CONCURRENT) {
        checks.push(check_divergence(client.clone(), key, &assigned[key]));
    }
    let mut call_failed = None;
    while let Some((key, checked)) = futures_util::StreamExt::next(&mut checks).await {
        if let Some(next) = queue.next() {
            checks.push(check_divergence(client.clone(), next, &assigned[next]));
        }
        let (topic, index) = key;
        match checked {
            Ok(()) => {
                truncated.insert(key.clone(), Checked::of(&assigned[key]));
            }
            // The leader could not be asked: tried again next round.
            Err(DivergenceError::Call(e)) => {
                skipped.insert(key);
                call_failed = Some(e);
            }
            Err(DivergenceError::Partition(e)) => {
                warn!(%topic, partition = index, error = %e, "divergence check failed; fetching the others");
                skipped.insert(key);
                rest(resting, key.clone());
            }
        }
    }
    drop(checks);
    if skipped.len() == assigned.len() {
        return Err(
            call_failed.unwrap_or_else(|| "no partition could be checked for divergence".into())
        );
    }
    if stream.is_none() {
        let (tx, rx) = mpsc::channel(1);
        // Framed by `crate::rpc`: the leader's batches are decoded as
        // slices of the received frames, not copied into tonic's buffer.
        let responses = crate::rpc::call_stream(
            &mut channel.clone(),
            super::service::REPLICA_FETCH_PATH,
            tokio_stream::wrappers::ReceiverStream::new(rx),
            crate::client::MESSAGE_BYTES_MAX,
        )
        .await
        .map_err(|s| s.to_string())?;
        *stream = Some((tx, responses));
    }
    let (tx, responses) = stream.as_mut().expect("opened above");
    let mut partitions: Vec<ipb::ReplicaFetchPartition> = assigned
        .iter()
        .filter(|(key, _)| !skipped.contains(key))
        .map(|((topic, index), a)| ipb::ReplicaFetchPartition {
            topic: topic.clone(),
            partition: *index,
            fetch_offset: a.partition.log.log_end_offset(),
            current_leader_epoch: a.leader_epoch,
            log_start_offset: a.partition.log.log_start_offset(),
            topic_id: a.partition.topic_id.clone(),
        })
        .collect();
    // The leader fills its byte budget in the order asked: each round
    // starts one partition further, so one partition with a backlog of a
    // whole budget (a replica catching up) does not starve the ones after
    // it (in-sync followers falling out of the ISR), as Kafka rotates.
    if !partitions.is_empty() {
        let len = partitions.len();
        partitions.rotate_left(*rotation % len);
        *rotation = rotation.wrapping_add(1);
    }
    let request = ipb::ReplicaFetchRequest {
        replica_id: settings.replica_id,
        broker_epoch: 0,
        partitions,
        max_bytes: settings.fetch_bytes_max,
        max_wait_ms: settings.fetch_wait_max_ms,
    };
    tx.send(request)
        .await
        .map_err(|_| "fetch stream closed".to_string())?;
    let response = responses
        .next()
        .await
        .ok_or_else(|| "fetch stream ended".to_string())?
        .map_err(|s| s.to_string())?;
    if broker.failpoint("pause-replica-fetch") {
        // Test hook: behave as if the answer never arrived.
        return Err("replica fetch paused by failpoint".into());
    }
    let mut appended = 0u64;
    let mut throttled_bytes = 0u64;
    let mut refresh = false;
    // Partitions the leader answered without refusing.
    let mut served = 0usize;
    for data in response.partitions {
        let Some(a) = assigned.get(&(data.topic.clone(), data.partition)) else {
            continue;
        };
        if data.error_code == ErrorCode::OffsetOutOfRange as i32
            && a.partition.log.log_end_offset() < data.log_start_offset
        {
            // Everything this replica has is older than the leader's log
            // start (retention ran while it was away, or it is a new
            // replica): copy the partition from the leader's start.
            info!(topic = %data.topic, partition = data.partition, from = a.partition.log.log_end_offset(), to = data.log_start_offset, "log ends below the leader's log start: starting over there");
            let log = a.partition.log.clone();
            let start = data.log_start_offset;
            let epoch = a.leader_epoch;
            let reset = tokio::task::spawn_blocking(move || log.reset_following(epoch, start))
                .await
                .map_err(|e| e.to_string())?;
            if let Err(e) = reset {
                warn!(topic = %data.topic, partition = data.partition, error = %e, "cannot start the log over");
                rest(resting, (data.topic.clone(), data.partition));
            }
            continue;
        }
        if data.error_code == ErrorCode::OffsetOutOfRange as i32 {
            // This log ends past the leader's: check for divergence again
            // (the leader's epoch ends say where to cut) instead of
            // asking for the same offset for the rest of the epoch.
            info!(topic = %data.topic, partition = data.partition, log_end_offset = a.partition.log.log_end_offset(), "fetch offset past the leader's log: checking for divergence again");
            truncated.remove(&(data.topic.clone(), data.partition));
            refresh = true;
            continue;
        }
        if data.error_code != 0 {
            // This partition sits out a moment, not the round: the leader
            // answers at once when any partition is refused, so one it
            // keeps refusing (a log it cannot open or read) made every
            // round fail and back off, holding up the others' records by
            // up to the backoff each (Kafka backs off the partition,
            // replica.fetch.backoff.ms).
            debug!(topic = %data.topic, partition = data.partition, code = data.error_code, "leader refused fetch");
            resting.insert(
                (data.topic.clone(), data.partition),
                tokio::time::Instant::now() + RETRY_BACKOFF,
            );
            refresh = true;
            continue;
        }
        served += 1;
        let log = &a.partition.log;
        if !data.batches.is_empty() {
            let epoch = a.leader_epoch;
            let mut appended_now = append(a, epoch, &data.batches).await?;
            if let Err(StorageError::NonContiguous { base_offset, .. }) = appended_now {
                if log.log_start_offset() == log.log_end_offset()
                    && base_offset < log.log_end_offset()
                {
                    // An empty log started at the leader's log start,
                    // which lies inside this batch (DeleteRecords between
                    // two records of a batch): the leader serves the whole
                    // batch. The log starts over at the batch, and its
                    // start moves up to the leader's below, once the high
                    // watermark allows.
                    info!(topic = %data.topic, partition = data.partition, from = base_offset, "the leader's log starts inside its first batch: starting over at the batch");
                    let log2 = log.clone();
                    let reset = tokio::task::spawn_blocking(move || {
                        log2.reset_following(epoch, base_offset)
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    appended_now = match reset {
                        Ok(()) => append(a, epoch, &data.batches).await?,
                        Err(e) => Err(e),
                    };
                }
            }
            if let Err(e) = appended_now {
                // This partition only: the others' data is applied.
                warn!(topic = %data.topic, partition = data.partition, error = %e, "cannot append what the leader sent");
                rest(resting, (data.topic.clone(), data.partition));
                continue;
            }
            appended += data.batches.len() as u64;
            if !a.in_sync {
                throttled_bytes += data.batches.len() as u64;
            }
            broker.metrics().replicated(data.batches.len());
        }
        a.partition.follower_high_watermark(
            a.leader_epoch,
            data.high_watermark.min(log.log_end_offset()),
        );
        // The leader's log starts later (DeleteRecords, or its retention):
        // so does this replica's, up to its own high watermark. Its next
        // fetch reports the new start, which the leader's low watermark
        // (and a DeleteRecords waiting on it) counts.
        let to = data.log_start_offset.min(log.high_watermark());
        if to > log.log_start_offset() {
            let log = log.clone();
            let deleted = tokio::task::spawn_blocking(move || log.delete_records_before(to))
                .await
                .map_err(|e| e.to_string())?;
            if let Err(e) = deleted {
                warn!(topic = %data.topic, partition = data.partition, error = %e, "cannot move the log start");
                rest(resting, (data.topic.clone(), data.partition));
            }
        }
    }
    if refresh && appended == 0 && served == 0 {
        // Leadership moved or our metadata is stale: wait a little for the
        // metadata to catch up instead of spinning.
        return Err("leader refused every partition".into());
    }
    Ok(throttled_bytes)
}

/// Appends what the leader of `epoch` sent for `a`'s partition.
async fn append(
    a: &Assignment,
    epoch: i32,
    batches: &bytes::Bytes,
) -> Result<Result<runnel_storage::AppendInfo, StorageError>, String> {
    let log = a.partition.log.clone();
    let batches = batches.clone();
    a.partition
        .run_append(move || log.append_following(epoch, batches))
        .await
        .ok_or_else(|| "append task lost".to_string())
}

/// Why a divergence check failed.
enum DivergenceError {
    /// The leader could not be asked (connection, timeout): every
    /// partition's check would fail alike.
    Call(String),
    /// This partition's: the leader refused it, or the local log failed.
    Partition(String),
}

/// Asks the leader where our latest epoch ends and cuts what it never had.
/// [`truncate_divergent`] for the partition `key`, with its own client.
async fn check_divergence<'a>(
    mut client: ReplicationClient<Channel>,
    key: &'a (String, i32),
    a: &'a Assignment,
) -> (&'a (String, i32), Result<(), DivergenceError>) {
    let checked = truncate_divergent(&mut client, &key.0, key.1, a).await;
    (key, checked)
}

async fn truncate_divergent(
    client: &mut ReplicationClient<Channel>,
    topic: &str,
    index: i32,
    a: &Assignment,
) -> Result<(), DivergenceError> {
    use DivergenceError::{Call, Partition};
    let log = &a.partition.log;
    // Each round cuts the log or ends the loop; an epoch cache holds
    // fewer entries than this in practice.
    const ROUNDS_MAX: usize = 64;
    for _ in 0..ROUNDS_MAX {
        let Some((latest_epoch, _)) = log.latest_epoch() else {
            debug!(%topic, partition = index, "no leader epochs yet: nothing to truncate");
            return Ok(()); // nothing written in any epoch: nothing can diverge
        };
        let answer = client
            .offset_for_leader_epoch(ipb::OffsetForLeaderEpochRequest {
                topic: topic.to_string(),
                partition: index,
                leader_epoch: latest_epoch,
                current_leader_epoch: a.leader_epoch,
                topic_id: a.partition.topic_id.clone(),
            })
            .await
            .map_err(|s| Call(s.to_string()))?
            .into_inner();
        if answer.error_code != 0 {
            return Err(Partition(format!(
                "leader refused OffsetForLeaderEpoch ({})",
                answer.error_code
            )));
        }
        let leo = log.log_end_offset();
        debug!(%topic, partition = index, latest_epoch, answer_epoch = answer.leader_epoch, answer_end = answer.end_offset, leo, "divergence check");
        let own = runnel_replication::follower_end_of(
            log.end_offset_for_epoch(answer.leader_epoch.max(0)),
            log.earliest_epoch().map(|(_, start)| start),
            answer.leader_epoch,
        );
        let (to, again) = divergence_step(leo, own, (answer.leader_epoch, answer.end_offset));
        if let Some(to) = to {
            info!(%topic, partition = index, from = leo, to, leader_epoch = a.leader_epoch, "truncating divergent log");
            let log = log.clone();
            let epoch = a.leader_epoch;
            tokio::task::spawn_blocking(move || log.truncate_following(epoch, to))
                .await
                .map_err(|e| Call(e.to_string()))?
                .map_err(|e| Partition(e.to_string()))?;
            a.partition
                .follower_high_watermark(epoch, a.partition.log.high_watermark());
        }
        if !again {
            return Ok(());
        }
    }
    Err(Partition(format!(
        "divergence check did not settle in {ROUNDS_MAX} rounds"
    )))
}
