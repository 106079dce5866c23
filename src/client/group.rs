//! Consumer groups in the client: [`GroupConsumer`] joins a group through
//! its coordinator, consumes the partitions assigned to it, heartbeats in
//! the background, commits (on an interval or on demand) and leaves on
//! [`GroupConsumer::close`]. The admin calls of the `ConsumerGroups`
//! service (list, describe, reset, delete) are methods of [`Client`].
//!
//! Rebalances are eager for consumption and sticky for assignment: when
//! the coordinator asks for a rejoin, the consumer commits (with
//! auto-commit), stops reading every partition, and rejoins; the reply
//! carries its partitions for the new generation. Partitions it keeps
//! resume from its in-memory position; new ones from the committed offset,
//! or from `offset_reset` when none is committed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Channel;
use runnel_proto::v1 as pb;
use runnel_proto::v1::consumer_groups_client::ConsumerGroupsClient;
use tokio::task::JoinHandle;

use super::{Client, ClientError, ConsumedRecord, PartitionConsumer, StartFrom, REQUEST_TIMEOUT};

/// How long group calls retry a missing or moving coordinator.
const COORDINATOR_RETRY: Duration = Duration::from_secs(30);

/// Where to start a partition with no committed offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetReset {
    /// The log start.
    Earliest,
    /// The high watermark.
    Latest,
}

/// A group member's settings.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// Group id.
    pub group: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Assignment strategy (every member must agree).
    pub strategy: pb::AssignmentStrategy,
    /// The coordinator removes the member after this long without a
    /// heartbeat (ms).
    pub session_timeout_ms: u32,
    /// How long a rebalance waits for members to rejoin (ms).
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
}

impl GroupConfig {
    /// Defaults for `group` subscribing to `topics`.
    pub fn new(group: &str, topics: &[&str]) -> Self {
        Self {
            group: group.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            strategy: pb::AssignmentStrategy::CooperativeSticky,
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 10_000,
            auto_commit_interval: Some(Duration::from_secs(1)),
            offset_reset: OffsetReset::Earliest,
            client_id: "runnel-rust".to_string(),
            group_instance_id: String::new(),
            max_wait_ms: 200,
        }
    }
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
        let mut c = ConsumerGroupsClient::new(self.bootstrap_channel());
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
        let deadline = Instant::now() + COORDINATOR_RETRY;
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
                call(ConsumerGroupsClient::new(channel), request)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(ClientError::from)
            };
            match attempt.await {
                Ok(v) => return Ok(v),
                Err(e) if retriable(&e) && Instant::now() < deadline => {
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
        let mut c = ConsumerGroupsClient::new(self.bootstrap_channel());
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
        let r = self
            .group_call(&group, req, REQUEST_TIMEOUT, |mut c, r| async move {
                c.reset_offsets(r).await
            })
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
        let req = pb::CommitOffsetsRequest {
            group: group.to_string(),
            member_id: member_id.to_string(),
            generation_id,
            offsets,
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
        Ok(GroupConsumer {
            client: self.clone(),
            config,
            member_id: String::new(),
            generation: -1,
            consumers: BTreeMap::new(),
            committed: BTreeMap::new(),
            signal: Arc::new(AtomicU8::new(SIGNAL_REJOIN)),
            heartbeat: None,
            last_commit: Instant::now(),
        })
    }
}

/// Heartbeat task → consumer signals.
const SIGNAL_OK: u8 = 0;
const SIGNAL_REJOIN: u8 = 1;
const SIGNAL_REJOIN_AS_NEW: u8 = 2;

/// A member of a consumer group.
#[derive(Debug)]
pub struct GroupConsumer {
    client: Client,
    config: GroupConfig,
    member_id: String,
    generation: i32,
    /// Readers of the assigned partitions.
    consumers: BTreeMap<(String, i32), PartitionConsumer>,
    /// Last committed (or fetched) offset per assigned partition.
    committed: BTreeMap<(String, i32), i64>,
    /// Set by the heartbeat task: rejoin needed.
    signal: Arc<AtomicU8>,
    heartbeat: Option<JoinHandle<()>>,
    last_commit: Instant,
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        // Without close(): no leave, no commit; the session expires.
        if let Some(h) = self.heartbeat.take() {
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

    /// Partitions owned now.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.consumers.keys().cloned().collect()
    }

    /// Next offset to read of an owned partition.
    pub fn position(&self, topic: &str, partition: i32) -> Option<i64> {
        self.consumers
            .get(&(topic.to_string(), partition))
            .map(PartitionConsumer::position)
    }

    /// Moves the read position of an owned partition.
    pub fn seek(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), ClientError> {
        let c = self
            .consumers
            .get_mut(&(topic.to_string(), partition))
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "{topic}-{partition} is not assigned to this member"
                ))
            })?;
        c.seek(offset);
        Ok(())
    }

    /// Whether every owned partition was read up to the high watermark of
    /// its last fetch (and a rebalance is not pending).
    pub fn caught_up(&self) -> bool {
        self.generation >= 0
            && self.signal.load(Ordering::Acquire) == SIGNAL_OK
            && self
                .consumers
                .values()
                .all(|c| c.position() >= c.high_watermark())
    }

    /// Joins (or rejoins) the group and takes up the new assignment.
    async fn join(&mut self) -> Result<(), ClientError> {
        if self.generation >= 0 && self.config.auto_commit_interval.is_some() {
            // Best effort: a fenced commit is re-read by the next owner.
            let _ = self.commit().await;
        }
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if self.signal.load(Ordering::Acquire) == SIGNAL_REJOIN_AS_NEW {
            self.member_id.clear();
        }
        // Eager: nothing is read while the group rebalances.
        let old = std::mem::take(&mut self.consumers);
        let old_generation = self.generation;
        let old_member = self.member_id.clone();
        let c = &self.config;
        let wait = Duration::from_millis(
            u64::from(c.rebalance_timeout_ms) + u64::from(c.session_timeout_ms),
        ) + REQUEST_TIMEOUT;
        let mut req = pb::JoinGroupRequest {
            group: c.group.clone(),
            member_id: self.member_id.clone(),
            group_instance_id: c.group_instance_id.clone(),
            topics: c.topics.clone(),
            session_timeout_ms: c.session_timeout_ms,
            rebalance_timeout_ms: c.rebalance_timeout_ms,
            strategy: c.strategy as i32,
            client_id: c.client_id.clone(),
        };
        let join = |req: pb::JoinGroupRequest| {
            self.client
                .group_call(&self.config.group, req, wait, |mut g, r| async move {
                    g.join_group(r).await
                })
        };
        let resp = match join(req.clone()).await {
            Err(e) if e.code() == pb::ErrorCode::UnknownMember => {
                req.member_id.clear();
                join(req).await?
            }
            other => other?,
        };
        self.member_id = resp.member_id.clone();
        self.generation = resp.generation_id;
        self.signal.store(SIGNAL_OK, Ordering::Release);
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
        }
        let fresh: Vec<(String, i32)> = assigned
            .iter()
            .filter(|tp| !kept.contains_key(*tp))
            .cloned()
            .collect();
        let committed = if fresh.is_empty() {
            Vec::new()
        } else {
            self.client
                .fetch_offsets(&self.config.group, &fresh)
                .await?
        };
        self.committed.retain(|tp, _| assigned.contains(tp));
        for o in committed {
            let tp = (o.topic.clone(), o.partition);
            let from = if o.offset >= 0 {
                self.committed.insert(tp.clone(), o.offset);
                StartFrom::Offset(o.offset)
            } else {
                self.reset_point()
            };
            let mut pc = self.client.partition_consumer(&tp.0, tp.1, from).await?;
            pc.max_wait_ms = self.config.max_wait_ms;
            kept.insert(tp, pc);
        }
        self.consumers = kept;
        self.spawn_heartbeat(resp.heartbeat_interval_ms);
        Ok(())
    }

    fn reset_point(&self) -> StartFrom {
        match self.config.offset_reset {
            OffsetReset::Earliest => StartFrom::Earliest,
            OffsetReset::Latest => StartFrom::Latest,
        }
    }

    fn spawn_heartbeat(&mut self, interval_ms: u32) {
        let client = self.client.clone();
        let signal = self.signal.clone();
        let req = pb::HeartbeatRequest {
            group: self.config.group.clone(),
            member_id: self.member_id.clone(),
            generation_id: self.generation,
        };
        let every = Duration::from_millis(u64::from(interval_ms.max(20)));
        self.heartbeat = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
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
                        signal.store(SIGNAL_REJOIN, Ordering::Release);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) if e.code() == pb::ErrorCode::UnknownMember => {
                        signal.store(SIGNAL_REJOIN_AS_NEW, Ordering::Release);
                        return;
                    }
                    Err(e) if e.code() == pb::ErrorCode::IllegalGeneration => {
                        signal.store(SIGNAL_REJOIN, Ordering::Release);
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "heartbeat failed; retrying"),
                }
            }
        }));
    }

    /// Reads the next records of the owned partitions (possibly none after
    /// the long-poll wait). Joins first when needed, and commits when the
    /// auto-commit interval has passed.
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>, ClientError> {
        if self.signal.load(Ordering::Acquire) != SIGNAL_OK || self.generation < 0 {
            self.join().await?;
        }
        if let Some(every) = self.config.auto_commit_interval {
            if self.last_commit.elapsed() >= every {
                if let Err(e) = self.commit().await {
                    tracing::debug!(error = %e, "auto-commit failed");
                }
            }
        }
        if self.consumers.is_empty() {
            tokio::time::sleep(Duration::from_millis(u64::from(self.config.max_wait_ms))).await;
            return Ok(Vec::new());
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (tp, mut c) in std::mem::take(&mut self.consumers) {
            tasks.spawn(async move {
                let r = c.poll().await;
                (tp, c, r)
            });
        }
        let mut out = Vec::new();
        let mut failed = None;
        while let Some(joined) = tasks.join_next().await {
            let Ok((tp, c, r)) = joined else { continue };
            match r {
                Ok(records) => out.extend(records),
                Err(e) if e.code() == pb::ErrorCode::OffsetOutOfRange => {
                    // The position fell off the log: start over per policy.
                    let from = self.reset_point();
                    if let Ok(mut pc) = self.client.partition_consumer(&tp.0, tp.1, from).await {
                        pc.max_wait_ms = self.config.max_wait_ms;
                        self.consumers.insert(tp, pc);
                        continue;
                    }
                }
                Err(e) => failed = Some(e),
            }
            self.consumers.insert(tp, c);
        }
        if out.is_empty() {
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
        self.last_commit = Instant::now();
        if self.generation < 0 {
            return Ok(());
        }
        let offsets: Vec<pb::PartitionOffset> = self
            .consumers
            .iter()
            .filter(|(tp, c)| self.committed.get(*tp) != Some(&c.position()))
            .map(|((t, p), c)| pb::PartitionOffset {
                topic: t.clone(),
                partition: *p,
                offset: c.position(),
                metadata: String::new(),
            })
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        let r = self
            .client
            .commit_offsets(
                &self.config.group,
                &self.member_id,
                self.generation,
                offsets.clone(),
            )
            .await;
        match r {
            Ok(()) => {
                for o in offsets {
                    self.committed.insert((o.topic, o.partition), o.offset);
                }
                Ok(())
            }
            Err(e) => {
                match e.code() {
                    pb::ErrorCode::UnknownMember => {
                        self.signal.store(SIGNAL_REJOIN_AS_NEW, Ordering::Release)
                    }
                    pb::ErrorCode::IllegalGeneration | pb::ErrorCode::RebalanceInProgress => {
                        self.signal.store(SIGNAL_REJOIN, Ordering::Release)
                    }
                    _ => {}
                }
                Err(e)
            }
        }
    }

    /// Commits (with auto-commit on) and leaves the group.
    pub async fn close(mut self) -> Result<(), ClientError> {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if self.generation < 0 {
            return Ok(());
        }
        let committed = if self.config.auto_commit_interval.is_some() {
            self.commit().await
        } else {
            Ok(())
        };
        let req = pb::LeaveGroupRequest {
            group: self.config.group.clone(),
            member_id: self.member_id.clone(),
        };
        let left = self
            .client
            .group_call(
                &self.config.group,
                req,
                REQUEST_TIMEOUT,
                |mut g, r| async move { g.leave_group(r).await },
            )
            .await;
        committed?;
        match left {
            Err(e) if e.code() != pb::ErrorCode::UnknownMember => Err(e),
            _ => Ok(()),
        }
    }
}
