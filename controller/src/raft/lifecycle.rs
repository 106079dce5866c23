//! Broker lifecycle: registration, heartbeats and fencing.
//!
//! Every broker registers (a `RegisterBroker` command, through any node)
//! and then heartbeats to the active controller (the Raft leader). The
//! controller keeps the time of each broker's last heartbeat in memory and
//! submits `FenceBroker` for one silent longer than
//! `broker_session_timeout_ms`. A newly elected controller starts every
//! clock afresh (a full grace period), since it never saw the heartbeats
//! sent to its predecessors, except the predecessors' own: a controller
//! heartbeats locally, but every voter notes when it last received each
//! leader's `AppendEntries`, and the successor starts each of those
//! leaders' clocks there (see [`session_start`]). A controller that dies
//! is so fenced one session after it was last heard from, not an
//! election plus a session later, even when another leader came and went
//! in between. Registering again unfences.
//!
//! The same loop fixes the cluster id of a new quorum and adds registered
//! brokers that are not Raft members as learners, so broker-only nodes
//! receive the metadata log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use openraft::{BasicNode, ServerState};
use runnel_proto::v1::internal::broker_lifecycle_client::BrokerLifecycleClient;
use runnel_proto::v1::internal::broker_lifecycle_server::BrokerLifecycle;
use runnel_proto::v1::internal::{
    AlterPartitionRequest, AlterPartitionResponse, BrokerHeartbeatRequest, BrokerHeartbeatResponse,
    RegisterBrokerRequest, RegisterBrokerResponse,
};
use runnel_proto::v1::ErrorCode;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::network::LEADER_HEADER;
use super::type_config::NodeId;
use super::Attempt;
use super::{new_cluster_id, RaftMetadataStore};
use crate::{MetadataCommand, MetadataError, MetadataStore};

/// The active controller's view of broker liveness.
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<SessionState>,
}

#[derive(Debug, Default)]
struct SessionState {
    /// The Raft term these clocks were started in; `None` when not leader.
    term: Option<u64>,
    /// Broker id → (last heartbeat or registration, broker epoch then).
    last_seen: HashMap<i32, (Instant, i64)>,
    /// When the controller loop last ran (a step, or a tick while a step
    /// waits), to notice that this process was paused.
    last_alive: Option<Instant>,
    /// The loop noticed a pause since the last step that led.
    paused: bool,
    /// Since when this leader has heard from no majority of voters (for
    /// a session timeout or more); its brokers get a fresh grace period
    /// once one answers again.
    without_quorum: Option<Instant>,
    /// Raft leader → when its latest `AppendEntries` that this node
    /// accepted arrived, for every leader heard from since this node last
    /// became the active controller; taken when it becomes it again.
    leader_contacts: HashMap<NodeId, Instant>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The controller loop ran at `now`: notes a pause if it had not run
    /// for more than half a session.
    fn note_alive(&self, now: Instant, session: Duration) {
        let mut s = self.lock();
        if was_paused(s.last_alive, now, session) {
            s.paused = true;
        }
        s.last_alive = Some(now);
    }

    fn heard(&self, id: i32, epoch: i64, now: Instant) {
        self.lock().last_seen.insert(id, (now, epoch));
    }

    /// Notes that Raft leader `leader` was alive at `at` (it sent an
    /// `AppendEntries` this node accepted).
    pub(super) fn leader_contact(&self, leader: NodeId, at: Instant) {
        let mut s = self.lock();
        let latest = s.leader_contacts.entry(leader).or_insert(at);
        *latest = (*latest).max(at);
    }
}

/// Where a newly active controller starts a broker's session clock (the
/// broker is fenced once `session` has passed since), at `now`.
///
/// Every broker starts at `now` (a full grace period: their heartbeats
/// went to a predecessor), except a predecessor itself, whose latest
/// `AppendEntries` reached this node at `contact`: its clock starts
/// there, so a dead controller is fenced a session after it was last
/// heard from. It still gets at least `min_grace` from `now`, so that one
/// which is alive (it lost an election, or this node's contact is old
/// because this node lagged) has time to heartbeat here.
pub(crate) fn session_start(
    now: Instant,
    contact: Option<Instant>,
    session: Duration,
    min_grace: Duration,
) -> Instant {
    match contact {
        Some(contact) => {
            let keep = min_grace.min(session);
            let floor = now.checked_sub(session - keep).unwrap_or(contact);
            contact.max(floor).min(now)
        }
        None => now,
    }
}

/// Whether the controller loop running at `now` after `last_alive` means
/// this process itself was paused (see `controller_step`). The loop runs
/// at least every quarter session while the process runs, also while a
/// step waits for a commit, so a slow commit is not taken for a pause.
fn was_paused(last_alive: Option<Instant>, now: Instant, session: Duration) -> bool {
    last_alive.is_some_and(|t| now.duration_since(t) > session / 2)
}

/// The controller loop, one per node; acts only while the node leads.
pub(super) async fn run_controller(store: Weak<RaftMetadataStore>, cancel: CancellationToken) {
    let mut next_expiry: Option<Instant> = None;
    let Some(s) = store.upgrade() else { return };
    let mut metrics = s.raft.metrics();
    let mut state_rx = s.tx.subscribe();
    let period = Duration::from_millis(
        (s.config.broker_heartbeat_interval_ms)
            .min(s.config.broker_session_timeout_ms / 4)
            .max(10),
    );
    let session = Duration::from_millis(s.config.broker_session_timeout_ms);
    drop(s);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Wake when the next session expires, not up to a tick later.
        let expiry = async {
            match next_expiry {
                Some(at) => {
                    let at = at + Duration::from_millis(1);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = expiry => {}
            r = metrics.changed() => if r.is_err() { return },
            r = state_rx.changed() => if r.is_err() { return },
        }
        let Some(s) = store.upgrade() else { return };
        s.sessions.note_alive(Instant::now(), session);
        let step = s.controller_step();
        tokio::pin!(step);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                next = &mut step => {
                    next_expiry = next;
                    break;
                }
                // A step waiting for a commit (a fence, say) is not a
                // pause: keep noting that the loop runs.
                _ = tick.tick() => s.sessions.note_alive(Instant::now(), session),
            }
        }
    }
}

impl RaftMetadataStore {
    /// One round of the active controller's duties; a no-op elsewhere.
    /// Answers when the next broker session expires, if one will.
    async fn controller_step(&self) -> Option<Instant> {
        let me = self.config.node_id as NodeId;
        let (term, leading) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (
                m.current_term,
                m.current_leader == Some(me) && m.state == ServerState::Leader,
            )
        };
        if !leading {
            let mut s = self.sessions.lock();
            s.term = None;
            s.without_quorum = None;
            // A pause while following changes nothing: a new controller
            // starts its clocks afresh anyway.
            s.paused = false;
            return None;
        }
        let now = Instant::now();
        let session = Duration::from_millis(self.config.broker_session_timeout_ms);
        if !self.quorum_heard_within(session) {
            // Cut off from the other voters, this leader refuses
            // heartbeats (`heartbeat_local`), so it hears from no broker:
            // fenced now, every broker was fenced once the voters came
            // back (its queued entries commit if they rejoin under its
            // term). Nothing is fenced meanwhile, and every broker gets a
            // fresh grace period once a majority answers again, as after
            // a pause.
            self.sessions.lock().without_quorum.get_or_insert(now);
            return None;
        }
        let state = self.current();
        {
            let mut s = self.sessions.lock();
            if let Some(since) = s.without_quorum.take() {
                if now.duration_since(since) >= session {
                    tracing::warn!(
                        silent_ms = now.duration_since(since).as_millis() as u64,
                        "a majority of voters answers again: fresh broker grace period"
                    );
                }
                s.last_seen.clear();
            }
            // The loop not running for far longer than its interval means
            // this process was paused (SIGSTOP, a VM freeze): nobody could
            // reach it, so every broker gets a fresh grace period rather
            // than a fence.
            let paused = std::mem::take(&mut s.paused);
            if paused {
                tracing::warn!("controller was paused: fresh broker grace period");
                s.last_seen.clear();
            }
            if s.term != Some(term) {
                s.term = Some(term);
                s.last_seen.clear();
                // Consumed here: a later term of this node must not reuse
                // an old contact.
                let contacts = std::mem::take(&mut s.leader_contacts);
                let min_grace = Duration::from_millis(self.config.broker_heartbeat_interval_ms * 2);
                for b in state.brokers.values() {
                    let contact = NodeId::try_from(b.id)
                        .ok()
                        .and_then(|id| contacts.get(&id).copied());
                    let start = session_start(now, contact, session, min_grace);
                    s.last_seen.insert(b.id, (start, b.epoch));
                }
                let predecessor = contacts.into_iter().max_by_key(|(_, at)| *at);
                // The previous controller's session counts from its last
                // contact (`previous_silent_ms` ago).
                let (previous, silent_ms) = predecessor.map_or((-1, 0), |(id, at)| {
                    (id as i64, now.duration_since(at).as_millis() as u64)
                });
                tracing::info!(
                    term,
                    previous_controller = previous,
                    previous_silent_ms = silent_ms,
                    "became the active controller: fresh broker grace period"
                );
            }
        }
        if state.cluster_id.is_empty() {
            let cmd = MetadataCommand::InitCluster {
                cluster_id: new_cluster_id(&self.config),
            };
            match self.submit_cmd(cmd).await {
                Ok(_) => {
                    tracing::info!(cluster_id = %self.current().cluster_id, "cluster id fixed")
                }
                Err(error) => tracing::debug!(%error, "InitCluster"),
            }
            return None;
        }

        let mut next_expiry: Option<Instant> = None;
        let to_fence: Vec<i32> = {
            let mut s = self.sessions.lock();
            state
                .brokers
                .values()
                .filter_map(|b| {
                    let seen = s.last_seen.entry(b.id).or_insert((now, b.epoch));
                    if seen.1 != b.epoch {
                        // Registered again (maybe through another node).
                        *seen = (now, b.epoch);
                    }
                    let expired = now.duration_since(seen.0) > session;
                    if !b.fenced && !expired {
                        let at = seen.0 + session;
                        next_expiry = Some(next_expiry.map_or(at, |n| n.min(at)));
                    }
                    (!b.fenced && expired).then_some(b.id)
                })
                .collect()
        };
        for id in to_fence {
            let broker_epoch = state.brokers.get(&id).map_or(-1, |b| b.epoch);
            tracing::info!(
                broker = id,
                broker_epoch,
                term,
                "broker session expired: fencing"
            );
            // Only this node's own term may fence: a controller that was
            // paused and lost leadership must not have its stale verdict
            // forwarded to the new leader, so the write is local-only.
            let deadline = Instant::now() + self.config.submit_timeout();
            match self
                .write_local(
                    MetadataCommand::FenceBroker {
                        id,
                        epoch: Some(broker_epoch),
                        controlled: false,
                    },
                    deadline,
                )
                .await
            {
                Attempt::Done(resp) => {
                    if let Err(error) = resp.result {
                        tracing::warn!(broker = id, ?error, "could not fence");
                    }
                }
                _ => {
                    tracing::info!(broker = id, "lost leadership before fencing; not fencing");
                    return None;
                }
            }
        }

        let members = self.members();
        // The voter set is fixed when the cluster first forms (no voter
        // is added or removed since): a node added to the configured
        // voters only ever joins as a learner, and one taken out still
        // counts toward the majority. Said once, where an operator looks.
        let voting: std::collections::BTreeSet<i32> = members
            .iter()
            .filter(|(_, (_, votes))| *votes)
            .map(|(id, _)| *id as i32)
            .collect();
        let configured: std::collections::BTreeSet<i32> =
            self.config.voters.keys().copied().collect();
        if voting != configured
            && !self
                .voters_differ_said
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(?configured, quorum = ?voting, "the configured [controller] voters differ from the quorum's, which is fixed when the cluster first forms: added voters join as learners (no vote), removed ones still count toward the majority");
        }
        for b in state.brokers.values() {
            if b.fenced {
                continue;
            }
            let addr = state.internal_address(b.id).unwrap_or(&b.address);
            let node = BasicNode {
                addr: addr.to_string(),
            };
            match members.get(&(b.id as NodeId)) {
                None => {
                    tracing::info!(broker = b.id, %addr, "adding broker as raft learner");
                    if let Err(error) = self.raft.add_learner(b.id as NodeId, node, false).await {
                        tracing::debug!(broker = b.id, %error, "add_learner");
                    }
                }
                // A broker-only node that registered at another address
                // (restarted elsewhere): the log goes to the new one, or
                // its metadata never advances. Voters keep the addresses
                // of the voter list.
                Some((known, false)) if known != addr => {
                    tracing::info!(broker = b.id, from = %known, to = %addr, "raft learner moved");
                    let nodes = [(b.id as NodeId, node)].into();
                    if let Err(error) = self
                        .raft
                        .change_membership(openraft::ChangeMembers::SetNodes(nodes), false)
                        .await
                    {
                        tracing::debug!(broker = b.id, %error, "change_membership");
                    }
                }
                Some(_) => {}
            }
        }
        next_expiry
    }

    /// Registers broker `id` at `address` (and at `internal_address` for
    /// broker-to-broker traffic, when it has a listener of its own for
    /// that), through the leader, and answers its new broker epoch.
    pub async fn register_broker(
        &self,
        id: i32,
        address: &str,
        internal_address: Option<&str>,
        rack: &str,
        incarnation: &str,
    ) -> Result<i64, MetadataError> {
        let mut roles = vec!["broker".to_string()];
        if self.config.voters.contains_key(&id) {
            roles.push("controller".to_string());
        }
        let cmd = match internal_address {
            Some(internal) => MetadataCommand::RegisterBrokerListeners {
                id,
                address: address.to_string(),
                internal_address: internal.to_string(),
                rack: rack.to_string(),
                roles,
                incarnation: incarnation.to_string(),
            },
            None => MetadataCommand::RegisterBroker {
                id,
                address: address.to_string(),
                rack: rack.to_string(),
                roles,
                incarnation: incarnation.to_string(),
            },
        };
        // The epoch this registration got, from its own answer: this
        // node's copy of the metadata may still hold the previous
        // incarnation's (its wait for the copy to catch up is bounded),
        // whose heartbeats the controller would answer as fenced.
        let epoch = match self.submit_cmd(cmd).await? {
            crate::metadata::Applied::Registered { epoch } => epoch,
            other => {
                return Err(MetadataError::Raft {
                    reason: format!("registration answered {other:?}"),
                })
            }
        };
        if self.is_leader() {
            self.sessions.heard(id, epoch, Instant::now());
        }
        Ok(epoch)
    }

    /// Whether a majority of voters acknowledged this leader within
    /// `within` (always, with one voter). openraft has no check-quorum: a
    /// leader cut off from the others stays leader in its own eyes.
    fn quorum_heard_within(&self, within: Duration) -> bool {
        let quorum = self.quorum_status();
        quorum.voters.len() <= 1
            || quorum
                .millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) <= within.as_millis())
    }

    /// The active controller's answer to a heartbeat.
    fn heartbeat_local(
        &self,
        req: &BrokerHeartbeatRequest,
    ) -> Result<BrokerHeartbeatResponse, Status> {
        // A leader cut off from the other voters stays leader (openraft
        // has no check-quorum), and the majority elects another that
        // fences this node's brokers. Answering them "not fenced" kept
        // them ready and serving their stale leaderships for as long as
        // the split lasted; unanswered, they turn not ready a session
        // later.
        let session = Duration::from_millis(self.config.broker_session_timeout_ms);
        if !self.quorum_heard_within(session) {
            return Err(Status::unavailable(format!(
                "the controller has heard from no majority of voters for {} ms or more",
                session.as_millis()
            )));
        }
        let state = self.current();
        let fenced = match state.brokers.get(&req.broker_id) {
            // A registration newer than this controller's state: committed
            // (the broker learnt its epoch from the answer) but not applied
            // here yet, just after a change of controller. Not fenced: the
            // broker asks again (answering "fenced" made it register anew,
            // which fences it and moves its leaderships for nothing).
            Some(b) if b.epoch < req.broker_epoch => {
                return Err(Status::unavailable(format!(
                    "the controller has not applied broker {}'s registration (epoch {}) yet",
                    req.broker_id, req.broker_epoch
                )))
            }
            Some(b) => b.fenced || b.epoch != req.broker_epoch,
            None => true,
        };
        if !fenced {
            self.sessions
                .heard(req.broker_id, req.broker_epoch, Instant::now());
        }
        Ok(BrokerHeartbeatResponse {
            fenced,
            should_shut_down: req.want_shutdown,
        })
    }

    /// Sends one heartbeat to the active controller (locally when this node
    /// leads).
    pub async fn heartbeat(
        &self,
        broker_id: i32,
        broker_epoch: i64,
    ) -> Result<BrokerHeartbeatResponse, Status> {
        let req = BrokerHeartbeatRequest {
            broker_id,
            broker_epoch,
            metadata_offset: self
                .raft
                .metrics()
                .borrow()
                .last_applied
                .map_or(0, |l| l.index),
            want_shutdown: false,
        };
        if self.is_leader() {
            return self.heartbeat_local(&req);
        }
        let addr = match self.leader().1 {
            Some(addr) => addr,
            None => self
                .next_voter_addr()
                .ok_or_else(|| Status::unavailable("no active controller"))?,
        };
        let mut client = BrokerLifecycleClient::new(self.channels.get(&addr)?);
        let mut request = Request::new(req);
        request.set_timeout(Duration::from_millis(
            self.config.broker_heartbeat_interval_ms.max(100) * 2,
        ));
        Ok(client.broker_heartbeat(request).await?.into_inner())
    }
}

/// A broker's registration and heartbeat task (see [`spawn_heartbeat`]).
#[derive(Debug)]
pub struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    registered: tokio::sync::watch::Receiver<Option<i64>>,
    contact: HeartbeatContact,
}

/// When the controller last answered this broker's registration or
/// heartbeat (not fenced). A broker cut off from every controller never
/// learns that it was fenced: its metadata copy stays as it was, and only
/// the silence tells.
#[derive(Clone, Debug, Default)]
pub struct HeartbeatContact(Arc<std::sync::Mutex<Option<Instant>>>);

impl HeartbeatContact {
    fn answered(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Time since the last answer; `None` before the first.
    pub fn since_answer(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at.elapsed())
    }
}

impl Heartbeat {
    /// When the controller last answered (see [`HeartbeatContact`]).
    pub fn contact(&self) -> HeartbeatContact {
        self.contact.clone()
    }

    /// The broker epoch of this task's latest registration, once the
    /// controller has accepted one. The metadata shows the broker
    /// registered by this process only once its entry has this epoch (or
    /// a later one): an entry with an older epoch was left by a
    /// predecessor and replayed from the log.
    pub fn registered(&self) -> tokio::sync::watch::Receiver<Option<i64>> {
        self.registered.clone()
    }

    /// Stops heartbeating (the controller fences the broker once its
    /// session runs out).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Registers broker `broker_id`, then heartbeats every `interval` until
/// `cancel` (or the store's shutdown); registers again when the controller
/// reports it fenced.
pub fn spawn_heartbeat(
    store: Arc<RaftMetadataStore>,
    broker_id: i32,
    address: String,
    interval: Duration,
    cancel: CancellationToken,
) -> Heartbeat {
    let stop = store.cancel.clone();
    let (registered_tx, registered) = tokio::sync::watch::channel(None);
    let contact = HeartbeatContact::default();
    let heard = contact.clone();
    // This process's registrations, told from a restart's.
    let incarnation = crate::store::random_id();
    let task = tokio::spawn(async move {
        let stopped = || cancel.is_cancelled() || stop.is_cancelled();
        let pause = |d: Duration| {
            let (cancel, stop) = (cancel.clone(), stop.clone());
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => {}
                    _ = stop.cancelled() => {}
                }
            }
        };
        while !stopped() {
            let rack = store.config.rack.clone();
            let internal = store.config.internal_address.clone();
            let registered = store
                .register_broker(
                    broker_id,
                    &address,
                    internal.as_deref(),
                    &rack,
                    &incarnation,
                )
                .await;
            let epoch = match registered {
                Ok(epoch) => epoch,
                Err(error) => {
                    tracing::warn!(broker = broker_id, %error, "registration failed; retrying");
                    pause(interval).await;
                    continue;
                }
            };
            tracing::info!(broker = broker_id, epoch, "broker registered");
            heard.answered();
            registered_tx.send_replace(Some(epoch));
            loop {
                pause(interval).await;
                if stopped() {
                    return;
                }
                match store.heartbeat(broker_id, epoch).await {
                    Ok(resp) if resp.fenced => {
                        tracing::warn!(
                            broker = broker_id,
                            epoch,
                            "controller reports broker fenced; registering again"
                        );
                        break;
                    }
                    Ok(_) => heard.answered(),
                    Err(status) => tracing::debug!(broker = broker_id, %status, "heartbeat failed"),
                }
            }
        }
    });
    Heartbeat {
        task,
        registered,
        contact,
    }
}

/// The tonic server of `runnel.v1.internal.BrokerLifecycle`.
#[derive(Debug, Clone)]
pub struct LifecycleService {
    store: Arc<RaftMetadataStore>,
}

impl LifecycleService {
    /// A service for `store`.
    pub fn new(store: Arc<RaftMetadataStore>) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl BrokerLifecycle for LifecycleService {
    #[tracing::instrument(level = "debug", skip_all, fields(broker = request.get_ref().broker_id))]
    async fn register_broker(
        &self,
        request: Request<RegisterBrokerRequest>,
    ) -> Result<Response<RegisterBrokerResponse>, Status> {
        let req = request.into_inner();
        let mine = self.store.current().cluster_id.clone();
        if !req.cluster_id.is_empty() && !mine.is_empty() && req.cluster_id != mine {
            return Err(Status::failed_precondition(format!(
                "broker belongs to cluster '{}', this controller to '{mine}'",
                req.cluster_id
            )));
        }
        match self
            .store
            .register_broker(
                req.broker_id,
                &req.address,
                Some(req.internal_address.as_str()).filter(|a| !a.is_empty()),
                &req.rack,
                &req.incarnation_id,
            )
            .await
        {
            Ok(broker_epoch) => Ok(Response::new(RegisterBrokerResponse { broker_epoch })),
            Err(e @ MetadataError::NotController { .. }) => Err(Status::unavailable(e.to_string())),
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }

    #[tracing::instrument(level = "trace", skip_all, fields(broker = request.get_ref().broker_id))]
    async fn broker_heartbeat(
        &self,
        request: Request<BrokerHeartbeatRequest>,
    ) -> Result<Response<BrokerHeartbeatResponse>, Status> {
        if !self.store.is_leader() {
            let mut status = Status::unavailable("not the active controller");
            let leader = self.store.controller_id();
            if let Ok(v) = leader.to_string().parse() {
                status.metadata_mut().insert(LEADER_HEADER, v);
            }
            return Err(status);
        }
        self.store
            .heartbeat_local(request.get_ref())
            .map(Response::new)
    }

    /// Commits an ISR change as an `AlterPartitionIsr` command, after
    /// checking that the caller is the live incarnation of the broker it
    /// claims to be. Refusals come back in the answer with the ISR and
    /// partition epoch currently committed, so the leader can act on them.
    #[tracing::instrument(level = "debug", skip_all, fields(broker = request.get_ref().broker_id, topic = %request.get_ref().topic, partition = request.get_ref().partition))]
    async fn alter_partition(
        &self,
        request: Request<AlterPartitionRequest>,
    ) -> Result<Response<AlterPartitionResponse>, Status> {
        let req = request.into_inner();
        let committed = |error: Option<(ErrorCode, String)>| {
            let meta = self.store.current();
            let p = meta
                .topics
                .get(&req.topic)
                .and_then(|t| t.partitions.get(usize::try_from(req.partition).ok()?));
            let (code, message) = error.unwrap_or((ErrorCode::None, String::new()));
            Response::new(AlterPartitionResponse {
                error_code: code as i32,
                isr: p.map(|p| p.isr.clone()).unwrap_or_default(),
                partition_epoch: p.map_or(-1, |p| p.partition_epoch),
                error_message: message,
            })
        };
        let broker = self.store.current().brokers.get(&req.broker_id).cloned();
        match broker {
            Some(b) if b.epoch == req.broker_epoch && !b.fenced => {}
            Some(b) => {
                return Ok(committed(Some((
                    ErrorCode::InvalidRequest,
                    format!(
                        "broker {} epoch {} is stale or fenced (current epoch {}, fenced {})",
                        req.broker_id, req.broker_epoch, b.epoch, b.fenced
                    ),
                ))))
            }
            None => {
                return Ok(committed(Some((
                    ErrorCode::InvalidRequest,
                    format!("broker {} is not registered", req.broker_id),
                ))))
            }
        }
        let cmd = MetadataCommand::AlterPartitionIsr {
            topic: req.topic.clone(),
            topic_id: req.topic_id.clone(),
            partition: req.partition,
            leader_id: req.broker_id,
            leader_epoch: req.leader_epoch,
            partition_epoch: req.partition_epoch,
            isr: req.new_isr.clone(),
        };
        match self.store.submit(cmd).await {
            Ok(_) => Ok(committed(None)),
            Err(e @ MetadataError::NotController { .. }) => Err(Status::unavailable(e.to_string())),
            Err(e @ MetadataError::UnknownTopic { .. }) => {
                Ok(committed(Some((ErrorCode::UnknownTopic, e.to_string()))))
            }
            Err(e) => Ok(committed(Some((ErrorCode::InvalidRequest, e.to_string())))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: Duration = Duration::from_secs(9);
    const GRACE: Duration = Duration::from_secs(4);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn dead_controller_is_fenced_a_session_after_its_last_append() {
        // The bench's case: controller 1 killed at `kill`, its last
        // AppendEntries 0.25 s before; node 2 takes over 2 s after.
        let kill = Instant::now() + secs(100.0);
        let contact = kill - secs(0.25);
        let now = kill + secs(2.0);
        let start = session_start(now, Some(contact), SESSION, GRACE);
        assert_eq!(start, contact);
        assert_eq!(start + SESSION - kill, secs(8.75));
        // Before: every clock started at the takeover, 11 s after the kill.
        assert_eq!(now + SESSION - kill, secs(11.0));
    }

    #[test]
    fn brokers_never_heard_from_as_leader_get_a_full_session_from_the_takeover() {
        let now = Instant::now() + secs(100.0);
        // Not a leader this node heard from (other brokers, a fresh
        // quorum, or a contact already used by an earlier takeover).
        assert_eq!(session_start(now, None, SESSION, GRACE), now);
    }

    #[test]
    fn an_old_contact_still_leaves_the_minimum_grace() {
        let now = Instant::now() + secs(100.0);
        // Last heard from 30 s ago (this node lagged): fenced no sooner
        // than `GRACE` from now, so a live predecessor can heartbeat.
        let start = session_start(now, Some(now - secs(30.0)), SESSION, GRACE);
        assert_eq!(start + SESSION, now + GRACE);
        // 6 s ago would expire 3 s from now: the grace floor applies;
        // 4 s ago expires 5 s from now, after the floor: the contact wins.
        let start = session_start(now, Some(now - secs(6.0)), SESSION, GRACE);
        assert_eq!(start, now - secs(5.0));
        let start = session_start(now, Some(now - secs(4.0)), SESSION, GRACE);
        assert_eq!(start, now - secs(4.0));
        // A grace longer than the session is a full session.
        let start = session_start(now, Some(now - secs(4.0)), SESSION, secs(20.0));
        assert_eq!(start, now);
    }

    /// Controller 1 dies; node 2 leads briefly (its `AppendEntries`
    /// reach this node), then this node takes over. Controller 1's clock
    /// still starts at its own last contact: with only the latest leader
    /// remembered, it got a full session from the takeover.
    #[test]
    fn contacts_keep_each_leaders_latest() {
        let s = Sessions::default();
        let t = Instant::now();
        s.leader_contact(1, t + secs(1.0));
        s.leader_contact(1, t + secs(1.5));
        s.leader_contact(2, t + secs(3.0));
        // A late handler with an older arrival time changes nothing.
        s.leader_contact(1, t + secs(1.2));
        let contacts = s.lock().leader_contacts.clone();
        assert_eq!(
            contacts,
            HashMap::from([(1, t + secs(1.5)), (2, t + secs(3.0))])
        );
        let now = t + secs(4.0);
        assert_eq!(
            session_start(now, contacts.get(&1).copied(), SESSION, GRACE),
            t + secs(1.5)
        );
    }

    /// A step waiting two sessions for a commit, with the loop ticking
    /// every quarter session meanwhile, is not a pause; the loop not
    /// running for more than half a session is.
    #[test]
    fn a_slow_step_is_not_a_pause_but_a_silent_loop_is() {
        let s = Sessions::default();
        let t = Instant::now();
        for i in 0..=8 {
            s.note_alive(t + SESSION / 4 * i, SESSION);
        }
        assert!(!s.lock().paused);
        s.note_alive(t + SESSION * 2 + SESSION / 2 + secs(0.1), SESSION);
        assert!(s.lock().paused);
    }

    #[test]
    fn pauses_are_gaps_of_more_than_half_a_session() {
        let t = Instant::now();
        assert!(!was_paused(None, t, SESSION));
        assert!(!was_paused(Some(t), t + secs(4.5), SESSION));
        assert!(was_paused(Some(t), t + secs(4.6), SESSION));
    }
}
