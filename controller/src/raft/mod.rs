//! The Raft-replicated metadata store: an embedded openraft quorum whose log
//! carries [`MetadataCommand`]s and whose state machine is
//! [`ClusterMetadata`]. It implements [`MetadataStore`], so the broker uses
//! it through the [`crate::MetadataStore`] trait.
//!
//! Where it sits on the data path: below the broker's admin service and
//! above nothing but sled. Commands submitted on any node travel to the
//! leader (`Raft.ClientWrite`), are committed by a majority of voters, and
//! every node (voters and learners) applies them and publishes the new
//! state on its `watch` channel.
//!
//! Layout
//! - `type_config`: openraft types and the JSON wire types.
//! - `log_store`: the Raft log, vote and commit index in sled.
//! - `state_machine`: [`ClusterMetadata`] + applied log id, in sled.
//! - `network`: tonic client of `runnel.v1.internal.Raft`.
//! - `service`: the tonic server of `Raft` (incl. `ClientWrite`).
//! - `lifecycle`: broker registration, heartbeats and fencing.
//! - `cluster_id`: the cluster id a data directory belongs to.
//!
//! Start-up order on a node: bind the listener, [`RaftMetadataStore::start`]
//! (never waits for a leader), then serve [`RaftMetadataStore::raft_service`]
//! and [`RaftMetadataStore::lifecycle_service`] on it. The voter with the
//! smallest id initializes the quorum when its log is empty; the first
//! leader fixes the cluster id with [`MetadataCommand::InitCluster`].

mod cluster_id;
pub mod lifecycle;
mod log_store;
mod network;
mod service;
mod state_machine;
pub mod type_config;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{BasicNode, SnapshotPolicy};
use runnel_proto::v1::internal::broker_lifecycle_server::BrokerLifecycleServer;
use runnel_proto::v1::internal::raft_server::RaftServer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use cluster_id::CLUSTER_ID_FILE;
pub use lifecycle::{spawn_heartbeat, Heartbeat, HeartbeatContact, LifecycleService};
pub use log_store::SledLogStore;
pub use network::InternalTlsFiles;
pub use service::RaftService;
pub use state_machine::MetadataStateMachine;

use self::cluster_id::ClusterIdGuard;
use self::network::{Channels, Network, Rpc};
use self::type_config::{CommandResponse, ForwardRequest, ForwardResponse, NodeId, Raft};
use crate::metadata::Applied;
use crate::store::{random_id, BoxFuture};
use crate::{ClusterMetadata, MetadataCommand, MetadataError, MetadataStore};

/// How this node takes part in the metadata quorum.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// node.id; also the Raft node id and the broker id.
    pub node_id: i32,
    /// This node's advertised HOST:PORT for Raft RPCs (the client gRPC
    /// listener: one port serves both).
    pub raft_addr: String,
    /// The initial voters, id → HOST:PORT. Learners use them to find the
    /// leader.
    pub voters: BTreeMap<i32, String>,
    /// Whether this node is one of `voters` (controller role); otherwise it
    /// joins as a learner once it registers as a broker.
    pub is_voter: bool,
    /// The metadata directory, e.g. `DATA_DIR/meta` (sled lives in
    /// `raft/` below it, the cluster id in `cluster_id`).
    pub dir: PathBuf,
    /// Raft election timeout range.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Raft leader heartbeat.
    pub heartbeat_interval_ms: u64,
    /// A broker silent for this long is fenced by the active controller.
    pub broker_session_timeout_ms: u64,
    /// How often brokers heartbeat to the active controller.
    pub broker_heartbeat_interval_ms: u64,
    /// The cluster id the node must belong to; `None` accepts whatever the
    /// quorum formatted (a new random id at first bootstrap).
    pub cluster_id: Option<String>,
    /// Take a Raft snapshot (and purge the log) every this many entries.
    pub snapshot_logs_since_last: u64,
    /// How long `submit` keeps looking for a leader before
    /// [`MetadataError::NotController`].
    pub submit_timeout_ms: u64,
    /// This broker's rack, sent when it registers (rack-aware placement).
    pub rack: String,
    /// TLS (with this broker's client certificate) for every outgoing
    /// Raft and broker-lifecycle call; `None` = plaintext.
    pub internal_tls: Option<InternalTlsFiles>,
    /// This broker's internal listener address, registered so that other
    /// brokers replicate from it there; `None` = the client address.
    pub internal_address: Option<String>,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            raft_addr: "127.0.0.1:9092".into(),
            voters: BTreeMap::from([(1, "127.0.0.1:9092".to_string())]),
            is_voter: true,
            dir: PathBuf::from("meta"),
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            heartbeat_interval_ms: 250,
            broker_session_timeout_ms: 9000,
            broker_heartbeat_interval_ms: 2000,
            cluster_id: None,
            snapshot_logs_since_last: 5000,
            submit_timeout_ms: 10_000,
            rack: String::new(),
            internal_tls: None,
            internal_address: None,
        }
    }
}

impl RaftConfig {
    /// Checks rules that span fields.
    pub fn validate(&self) -> Result<(), MetadataError> {
        let bad = |reason: String| Err(MetadataError::Raft { reason });
        if self.node_id < 0 {
            return bad(format!("node id {} is negative", self.node_id));
        }
        if self.voters.is_empty() || self.voters.keys().any(|id| *id < 0) {
            return bad(format!(
                "voters {:?}: need at least one, no negative id",
                self.voters
            ));
        }
        if self.is_voter != self.voters.contains_key(&self.node_id) {
            return bad(format!(
                "node {} is_voter={} but voters are {:?}",
                self.node_id,
                self.is_voter,
                self.voters.keys().collect::<Vec<_>>()
            ));
        }
        if self.broker_heartbeat_interval_ms == 0
            || self.broker_heartbeat_interval_ms >= self.broker_session_timeout_ms
        {
            return bad(format!(
                "broker heartbeat interval {} ms must be above 0 and below the session timeout {} ms",
                self.broker_heartbeat_interval_ms, self.broker_session_timeout_ms
            ));
        }
        Ok(())
    }

    fn openraft_config(&self) -> Result<openraft::Config, MetadataError> {
        openraft::Config {
            cluster_name: "runnel".into(),
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            heartbeat_interval: self.heartbeat_interval_ms,
            install_snapshot_timeout: self.election_timeout_max_ms.max(200) * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        }
        .validate()
        .map_err(|e| MetadataError::Raft {
            reason: e.to_string(),
        })
    }

    fn submit_timeout(&self) -> Duration {
        Duration::from_millis(self.submit_timeout_ms)
    }
}

/// The Raft metadata store of one node. See the module docs.
pub struct RaftMetadataStore {
    config: RaftConfig,
    raft: Raft,
    tx: watch::Sender<Arc<ClusterMetadata>>,
    cluster_id: Arc<ClusterIdGuard>,
    channels: Arc<Channels>,
    sessions: lifecycle::Sessions,
    cancel: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
    /// Held so `shutdown` can flush and release sled's file lock.
    db: Mutex<Option<sled::Db>>,
    /// Round-robin over voters while no leader is known.
    next_voter: AtomicUsize,
    /// Whether this node, leading, has said that the configured voters
    /// differ from the quorum's (once per process).
    voters_differ_said: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RaftMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftMetadataStore")
            .field("node_id", &self.config.node_id)
            .field("raft_addr", &self.config.raft_addr)
            .field("controller_id", &self.controller_id())
            .finish_non_exhaustive()
    }
}

/// One attempt of a write.
pub(crate) enum Attempt {
    Done(CommandResponse),
    Retry(Option<NodeId>),
    Fatal(MetadataError),
}

impl RaftMetadataStore {
    /// Opens the sled store in `config.dir`, starts the Raft node and its
    /// background tasks, and returns at once: the quorum forms once the
    /// services are served.
    pub async fn start(config: RaftConfig) -> Result<Arc<Self>, MetadataError> {
        config.validate()?;
        let raft_config = Arc::new(config.openraft_config()?);
        std::fs::create_dir_all(&config.dir).map_err(|source| MetadataError::Persist {
            path: config.dir.clone(),
            source,
        })?;
        let cluster_id = Arc::new(ClusterIdGuard::open(
            &config.dir,
            config.cluster_id.as_deref(),
        )?);
        let db = open_sled(config.dir.join("raft")).await?;
        let sled_err = |e: sled::Error| MetadataError::Raft {
            reason: format!("sled: {e}"),
        };
        let mut log_store = SledLogStore::open(&db).map_err(sled_err)?;
        let (tx, _) = watch::channel(Arc::new(ClusterMetadata::default()));
        let sm =
            MetadataStateMachine::open(&db, tx.clone(), cluster_id.clone()).map_err(|reason| {
                MetadataError::Corrupt {
                    path: config.dir.join("raft"),
                    reason,
                }
            })?;
        log_store.limit_purges(sm.saved());
        // A directory whose recorded id disagrees with its own state.
        cluster_id.check()?;
        let channels = Arc::new(Channels::with_tls(config.internal_tls.clone()));
        let network = Network {
            channels: channels.clone(),
            cluster_id: cluster_id.clone(),
            voters: Arc::new(
                config
                    .voters
                    .iter()
                    .map(|(id, addr)| (*id as NodeId, addr.clone()))
                    .collect(),
            ),
        };
        let raft = Raft::new(
            config.node_id as NodeId,
            raft_config,
            network,
            log_store,
            sm,
        )
        .await
        .map_err(|e| MetadataError::Raft {
            reason: e.to_string(),
        })?;
        let store = Arc::new(Self {
            config,
            raft,
            tx,
            cluster_id,
            channels,
            sessions: lifecycle::Sessions::default(),
            cancel: CancellationToken::new(),
            tasks: Mutex::new(JoinSet::new()),
            db: Mutex::new(Some(db)),
            next_voter: AtomicUsize::new(0),
            voters_differ_said: std::sync::atomic::AtomicBool::new(false),
        });
        let mut tasks = store.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if store.config.is_voter && store.config.voters.keys().next() == Some(&store.config.node_id)
        {
            tasks.spawn(bootstrap(store.raft.clone(), store.config.voters.clone()));
        }
        tasks.spawn(lifecycle::run_controller(
            Arc::downgrade(&store),
            store.cancel.clone(),
        ));
        drop(tasks);
        tracing::info!(node_id = store.config.node_id, addr = %store.config.raft_addr, "raft metadata store started");
        Ok(store)
    }

    /// The `runnel.v1.internal.Raft` service to serve on this node's port.
    pub fn raft_service(self: &Arc<Self>) -> RaftServer<RaftService> {
        RaftServer::new(RaftService::new(self.clone())).max_decoding_message_size(64 << 20)
    }

    /// The `runnel.v1.internal.BrokerLifecycle` service to serve on this
    /// node's port.
    pub fn lifecycle_service(self: &Arc<Self>) -> BrokerLifecycleServer<LifecycleService> {
        BrokerLifecycleServer::new(LifecycleService::new(self.clone()))
    }

    /// Stops the background tasks and the Raft node, flushes sled and
    /// releases its lock so the directory can be opened again.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("raft store tasks did not stop in time; aborting them");
            tasks.abort_all();
        }
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "raft shutdown");
        }
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(db) = db {
            let _ = tokio::task::spawn_blocking(move || db.flush()).await;
        }
        tracing::info!(node_id = self.config.node_id, "raft metadata store stopped");
    }

    /// The openraft handle (metrics, membership), for tests and tooling.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// This node's id.
    pub fn node_id(&self) -> i32 {
        self.config.node_id
    }

    /// Waits until the quorum has fixed the cluster id and this node has
    /// applied it.
    pub async fn wait_for_cluster_id(&self, timeout: Duration) -> Result<String, MetadataError> {
        let mut rx = self.tx.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|s| !s.cluster_id.is_empty())).await;
        match waited {
            Ok(Ok(state)) => Ok(state.cluster_id.clone()),
            _ => Err(MetadataError::NotController {
                leader_hint: self.leader().0.map(|id| id as i32),
                waited_ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// The current leader and its address, as this node knows them.
    fn leader(&self) -> (Option<NodeId>, Option<String>) {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let Some(id) = m.current_leader else {
            return (None, None);
        };
        // A voter at the address this node's configuration gives it (see
        // `Network`), a learner at the one it registered.
        let addr = self.config.voters.get(&(id as i32)).cloned().or_else(|| {
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
        });
        (Some(id), addr)
    }

    fn is_leader(&self) -> bool {
        // The metrics of a Raft core that stopped keep their last leader:
        // only a core that still runs as leader counts.
        self.raft.metrics().borrow().state == openraft::ServerState::Leader
            && self.leader().0 == Some(self.config.node_id as NodeId)
    }

    /// Resolves once the Raft core has stopped on its own (a fatal error:
    /// a storage write that failed, say), with that error. A node whose
    /// core stopped keeps a frozen copy of the metadata: it must not go
    /// on serving from it (leading partitions that moved, answering as
    /// controller), so the server stops when this resolves, and a restart
    /// recovers the core from disk.
    pub async fn stopped(&self) -> String {
        let mut metrics = self.raft.metrics();
        let seen = metrics
            .wait_for(|m| m.running_state.is_err() || m.state == openraft::ServerState::Shutdown)
            .await;
        match seen {
            Ok(m) => match &m.running_state {
                Err(fatal) => fatal.to_string(),
                Ok(()) => "the Raft core shut down".to_string(),
            },
            Err(_) => "the Raft core is gone".to_string(),
        }
    }

    /// Membership and progress from the Raft metrics.
    pub fn quorum_status(&self) -> crate::store::QuorumStatus {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners = membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !voters.contains(id))
            .map(|id| id as i32)
            .collect();
        let last = m.last_log_index.unwrap_or(0);
        let lag = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != m.id)
                    .map(|(id, matched)| {
                        (*id as i32, matched.map(|l| last.saturating_sub(l.index)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The leader's own log counts as matched up to its last entry.
        let committed = m.replication.as_ref().map(|r| {
            let mut matched: Vec<u64> = voters
                .iter()
                .map(|id| {
                    if *id == m.id {
                        last
                    } else {
                        r.get(id).and_then(|l| l.map(|l| l.index)).unwrap_or(0)
                    }
                })
                .collect();
            matched.sort_unstable_by(|a, b| b.cmp(a));
            matched.get(matched.len() / 2).copied().unwrap_or(0)
        });
        crate::store::QuorumStatus {
            committed_index: committed,
            term: m.current_term,
            voters: voters.into_iter().map(|id| id as i32).collect(),
            learners,
            last_log_index: last,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            lag,
            millis_since_quorum_ack: m.millis_since_quorum_ack,
        }
    }

    /// Ids of every Raft member (voters and learners).
    /// The Raft members: each node's address, and whether it votes.
    fn members(&self) -> BTreeMap<NodeId, (String, bool)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| (*id, (node.addr.clone(), voters.contains(id))))
            .collect()
    }

    async fn submit_cmd(&self, cmd: MetadataCommand) -> Result<Applied, MetadataError> {
        self.cluster_id.check()?;
        let started = Instant::now();
        let deadline = started + self.config.submit_timeout();
        let mut backoff = Duration::from_millis(10);
        let mut hint = None;
        loop {
            match self.write_once(&cmd, deadline).await {
                Attempt::Done(resp) => {
                    self.wait_applied(resp.applied).await;
                    return resp.result.map_err(Into::into);
                }
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(h) => hint = h.or(hint),
            }
            if self.cancel.is_cancelled() || Instant::now() + backoff > deadline {
                return Err(MetadataError::NotController {
                    leader_hint: hint.map(|id| id as i32),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.cancel.cancelled() => {}
            }
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    async fn write_once(&self, cmd: &MetadataCommand, deadline: Instant) -> Attempt {
        let (leader, leader_addr) = self.leader();
        if leader == Some(self.config.node_id as NodeId) {
            return self.write_local(cmd.clone(), deadline).await;
        }
        let (addr, known) = match leader_addr {
            Some(addr) => (addr, true),
            None => match self.next_voter_addr() {
                Some(addr) => (addr, false),
                None => return Attempt::Retry(None),
            },
        };
        let req = ForwardRequest {
            cmd: cmd.clone(),
            hops: 1,
        };
        self.forward(&addr, &req, deadline, known).await
    }

    /// Proposes on this node, which believes it leads.
    async fn write_local(&self, cmd: MetadataCommand, deadline: Instant) -> Attempt {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, self.raft.client_write(cmd)).await {
            Ok(Ok(resp)) => Attempt::Done(resp.data),
            Ok(Err(e)) => {
                let hint = e.forward_to_leader().and_then(|f| f.leader_id);
                tracing::debug!(error = %e, ?hint, "local write refused");
                Attempt::Retry(hint)
            }
            Err(_) => Attempt::Retry(None),
        }
    }

    /// Sends a command to `addr` over `Raft.ClientWrite`.
    async fn forward(
        &self,
        addr: &str,
        req: &ForwardRequest,
        deadline: Instant,
        to_leader: bool,
    ) -> Attempt {
        // An attempt at a voter picked while no leader is known may not
        // take the whole submission's time: that voter may have stopped
        // answering (paused, cut off), and a leader is elected within an
        // election timeout. One at the known leader may: it may be
        // committing the command, and a second attempt would apply it
        // twice (commands carry no request id).
        let attempt = if to_leader {
            Duration::MAX
        } else {
            Duration::from_millis(self.config.election_timeout_max_ms.max(500) * 2)
        };
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .min(attempt);
        let channel = match self.channels.get(addr) {
            Ok(ch) => ch,
            Err(status) => {
                return Attempt::Fatal(MetadataError::Raft {
                    reason: status.message().to_string(),
                })
            }
        };
        let payload = network::encode(&self.cluster_id, req);
        let resp = match network::call(channel, Rpc::ClientWrite, payload, remaining).await {
            Ok(resp) => resp,
            Err(status) => {
                if let Some(found) = network::refused_cluster_id(&status) {
                    return Attempt::Fatal(MetadataError::ClusterIdMismatch {
                        expected: self.cluster_id.get(),
                        found,
                    });
                }
                tracing::debug!(%addr, %status, "forward failed");
                return Attempt::Retry(None);
            }
        };
        match network::decode::<ForwardResponse>(&self.cluster_id, &resp) {
            Ok(ForwardResponse::Applied(r)) => Attempt::Done(r),
            Ok(ForwardResponse::NotLeader { leader_id }) => Attempt::Retry(leader_id),
            Err(status) => {
                tracing::debug!(%addr, %status, "bad forward response");
                Attempt::Retry(None)
            }
        }
    }

    fn next_voter_addr(&self) -> Option<String> {
        let others: Vec<&String> = self
            .config
            .voters
            .iter()
            .filter(|(id, _)| **id != self.config.node_id)
            .map(|(_, addr)| addr)
            .collect();
        if others.is_empty() {
            return None;
        }
        let i = self.next_voter.fetch_add(1, Ordering::Relaxed) % others.len();
        Some(others[i].clone())
    }

    /// Waits (bounded) until this node's state includes `applied`
    /// commands, so `current()` reflects a successful `submit`.
    async fn wait_applied(&self, applied: u64) {
        let mut rx = self.tx.subscribe();
        let bound = self.config.submit_timeout() / 4;
        let caught_up = tokio::time::timeout(bound, rx.wait_for(|s| s.applied >= applied)).await;
        if !matches!(caught_up, Ok(Ok(_))) {
            tracing::warn!(
                applied,
                "local metadata did not catch up with the leader in time"
            );
        }
    }
}

/// Opens sled, retrying briefly while a previous instance in this process
/// (or an exiting process) still holds the directory lock.
async fn open_sled(path: PathBuf) -> Result<sled::Db, MetadataError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p = path.clone();
        let res = tokio::task::spawn_blocking(move || {
            sled::Config::new()
                .path(p)
                .cache_capacity(16 << 20)
                .flush_every_ms(Some(500))
                .open()
        })
        .await
        .map_err(|e| MetadataError::Raft {
            reason: e.to_string(),
        })?;
        match res {
            Ok(db) => return Ok(db),
            // sled reports a held lock as `Other` with this message.
            Err(sled::Error::Io(e))
                if Instant::now() < deadline
                    && e.to_string().contains("could not acquire lock") =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(sled::Error::Io(source)) => return Err(MetadataError::Persist { path, source }),
            Err(e) => {
                return Err(MetadataError::Corrupt {
                    path,
                    reason: e.to_string(),
                })
            }
        }
    }
}

/// Initializes the quorum from the static voter list. A restarted node
/// (its log already holds a vote or entries) skips it, so openraft does not
/// log a refusal; a race that still ends in `NotAllowed` is success too.
async fn bootstrap(raft: Raft, voters: BTreeMap<i32, String>) {
    if raft.is_initialized().await.unwrap_or(false) {
        tracing::debug!("metadata quorum already initialized");
        return;
    }
    let members: BTreeMap<NodeId, BasicNode> = voters
        .into_iter()
        .map(|(id, addr)| (id as NodeId, BasicNode { addr }))
        .collect();
    match raft.initialize(members).await {
        Ok(()) => tracing::info!("initialized the metadata quorum"),
        Err(openraft::error::RaftError::APIError(
            openraft::error::InitializeError::NotAllowed(_),
        )) => {
            tracing::debug!("metadata quorum already initialized");
        }
        Err(error) => tracing::error!(%error, "could not initialize the metadata quorum"),
    }
}

impl MetadataStore for RaftMetadataStore {
    fn current(&self) -> Arc<ClusterMetadata> {
        self.tx.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Arc<ClusterMetadata>> {
        self.tx.subscribe()
    }

    fn submit(&self, cmd: MetadataCommand) -> BoxFuture<'_, Result<Applied, MetadataError>> {
        Box::pin(self.submit_cmd(cmd))
    }

    fn controller_id(&self) -> i32 {
        self.leader().0.map_or(-1, |id| id as i32)
    }

    fn quorum(&self) -> crate::store::QuorumStatus {
        self.quorum_status()
    }
}

/// The id a new cluster gets: the configured one, or a fresh random one.
fn new_cluster_id(config: &RaftConfig) -> String {
    config.cluster_id.clone().unwrap_or_else(random_id)
}
