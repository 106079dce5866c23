//! `runnel server`: binds the client listener, starts the metadata quorum
//! member and the broker, and serves every gRPC service — client APIs,
//! Raft, broker lifecycle, replication, health and reflection — on one
//! port until the shutdown token is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use runnel_controller::raft::spawn_heartbeat;
use runnel_controller::{MetadataError, MetadataStore, RaftConfig, RaftMetadataStore};
use runnel_proto::v1::{
    admin_server::AdminServer, consumer_groups_server::ConsumerGroupsServer,
    security_server::SecurityServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::Broker;
use crate::config::{ConfigError, ServerConfig};
use crate::error::BrokerError;
use crate::security::{AuthLayer, Security};
use crate::service::{AdminService, GroupsService, SecurityService};

/// HTTP/2 receive window per stream (bytes).
pub const HTTP2_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 receive window per connection (bytes).
pub const HTTP2_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest HTTP/2 DATA frame this side accepts (the default is 16 KiB, so
/// a 64 KiB batch or a 4 MiB fetch answer crossed as many frames, each a
/// header parse and a buffer hand-off).
pub const HTTP2_FRAME_MAX: u32 = 1024 * 1024;

/// How often a connection with nothing to read is probed with an HTTP/2
/// PING, on both ends.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection counts as
/// dead and every call on it fails.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's PINGs to its clients: every minute, 20 s to answer.
const SERVER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const SERVER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP/2 and TCP settings every outgoing channel uses (clients and
/// replica fetchers): no Nagle delay, the wide receive windows and the
/// large frames above, and keepalive PINGs even while idle, so a call
/// waiting on a peer that stopped answering (host down, cable out,
/// process frozen) fails within about 20 s instead of after the
/// kernel's TCP retransmission limit, some 15 minutes; a subscription
/// that receives nothing would otherwise wait forever.
pub fn tune_endpoint(e: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    e.tcp_nodelay(true)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_frame_size(HTTP2_FRAME_MAX)
        .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
}

/// How long a starting node waits for the quorum and its registration.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("not registered with the cluster within {waited_s} s: the metadata quorum did not form or did not apply this broker's registration (are a majority of the [controller] voters up and reachable at the addresses configured?)")]
    NotRegistered { waited_s: u64 },
    #[error("data directory {dir} is in use by another runnel process")]
    DataDirLocked { dir: std::path::PathBuf },
    #[error("cannot use data directory {dir}: {source}")]
    DataDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("shut down before the node was ready")]
    Interrupted,
    #[error("stopped: a partition log failed with an I/O error (see the log); a restart recovers it from disk")]
    LogFailed,
    #[error("stopped: the metadata quorum's Raft core stopped ({reason}); a restart recovers it from disk")]
    RaftStopped { reason: String },
    #[error(transparent)]
    Tls(#[from] crate::security::tls::TlsError),
}

/// Runs `work` on the blocking pool every `every` until `shutdown`; its
/// failures are logged as `what` failing.
fn every_interval(
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    every: Duration,
    what: &'static str,
    work: fn(&Broker) -> Result<(), BrokerError>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let b = broker.clone();
            match tokio::task::spawn_blocking(move || work(&b)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, task = what, "periodic storage task failed"),
                Err(e) => warn!(error = %e, task = what, "periodic storage task panicked"),
            }
        }
    })
}

/// Runs a node until `shutdown` is cancelled. Prints
/// `runnel listening on ADDR` on stdout once this broker is registered and
/// serving.
pub async fn run(mut config: ServerConfig, external: CancellationToken) -> Result<(), ServerError> {
    // `external` is the operator's stop request; `shutdown` stops the
    // services once leaderships are handed over.
    let shutdown = CancellationToken::new();
    let early = {
        let (external, shutdown) = (external.clone(), shutdown.clone());
        tokio::spawn(async move {
            // Before the node is ready there is nothing to hand over.
            external.cancelled().await;
            shutdown.cancel();
        })
    };
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| ServerError::DataDir {
        dir: dir.clone(),
        source,
    })?;
    let lock = std::fs::File::create(dir.join(".lock")).map_err(|source| ServerError::DataDir {
        dir: dir.clone(),
        source,
    })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(ServerError::DataDirLocked { dir });
        }
        // Not another process: a file system without locks (some NFS or
        // FUSE mounts), say. Named as it is.
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(ServerError::DataDir { dir, source });
        }
    }

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    // The metrics endpoint comes up first, so /health answers (and /ready
    // says why not) while the quorum forms.
    let endpoint = crate::metrics::http::Endpoint::new();
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            info!(addr = %bound, "metrics endpoint listening");
            if (config.security.authentication || config.security.authorization)
                && !bound.ip().is_loopback()
            {
                // Its labels name every topic and group, which the gRPC
                // API shows only to those allowed to Describe them.
                warn!(addr = %bound, "the metrics endpoint has no authentication and names every topic and group: with security on, bind it to loopback or a network only operators reach");
            }
            println!("runnel metrics listening on {bound}");
            Some(crate::metrics::http::spawn(
                listener,
                endpoint.clone(),
                shutdown.clone(),
            ))
        }
        None => None,
    };
    if config.advertised_address.is_none() {
        config.advertised_address = Some(local.to_string());
    }
    let internal_listener = match config.internal_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            let local = l
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            if config.internal_advertised_address.is_none() {
                config.internal_advertised_address = Some(local.to_string());
            }
            Some(l)
        }
        None => None,
    };
    let client_tls = crate::security::client_listener_tls(&config)?;
    let internal_tls = crate::security::internal_listener_tls(&config)?;
    // Checked here so that bad files stop the start, by name.
    crate::security::internal_client_tls(&config)?;
    let advertised = config.advertised();
    let b = &config.broker;
    let grace = Duration::from_millis(b.shutdown_grace_ms);
    let message_max = b.grpc_message_bytes_max;
    let tick_every = Duration::from_millis(b.maintenance_interval_ms.max(10));
    let writeback_every = (b.writeback_interval_ms > 0)
        .then(|| Duration::from_millis(b.writeback_interval_ms.max(10)));
    // The logs first: recovering them may take a while, and a voter whose
    // Raft core ran meanwhile without its service being reachable stood
    // for election term after term, then deposed the leader once it
    // served (its vote higher): a controller election at every restart.
    let logs = Broker::open_logs(&config)?;
    let c = &config.controller;
    let started = RaftMetadataStore::start(RaftConfig {
        node_id: config.node_id,
        raft_addr: config.internal_advertised(),
        voters: config.voters()?,
        is_voter: config.is_voter(),
        dir: dir.join("meta"),
        election_timeout_min_ms: c.election_timeout_min_ms,
        election_timeout_max_ms: c.election_timeout_max_ms,
        heartbeat_interval_ms: c.heartbeat_interval_ms,
        broker_session_timeout_ms: c.broker_session_timeout_ms,
        broker_heartbeat_interval_ms: c.broker_heartbeat_interval_ms,
        cluster_id: c.cluster_id.clone(),
        submit_timeout_ms: c.submit_timeout_ms,
        rack: config.rack.clone(),
        internal_tls: crate::security::internal_client_tls_files(&config),
        internal_address: config.internal_listen.map(|_| config.internal_advertised()),
        ..RaftConfig::default()
    })
    .await;
    let store = match started {
        Ok(store) => store,
        Err(e) => {
            // Closed cleanly, so the next start need not scan them again.
            if let Ok(Err(close)) = tokio::task::spawn_blocking(move || logs.close()).await {
                warn!(error = %close, "closing the logs failed");
            }
            return Err(e.into());
        }
    };
    let heartbeat_every = Duration::from_millis(c.broker_heartbeat_interval_ms);
    let metadata: Arc<dyn MetadataStore> = store.clone();
    let security = Arc::new(Security::new(config.security.clone(), metadata.clone()));
    let broker = Broker::open(config.clone(), logs, metadata, shutdown.clone());
    broker.set_security(security.clone());
    endpoint.set_broker(broker.clone());
    let groups = GroupsService::new(broker.clone());
    endpoint.set_groups(groups.coordinator());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(runnel_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // HTTP/2's default 64 KiB receive windows cap each producer stream at
    // one window per round trip (about 10 MB/s here): open them up.
    let builder = || {
        tonic::transport::Server::builder()
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .max_frame_size(HTTP2_FRAME_MAX)
            .tcp_nodelay(true)
            // Clients that vanish are found the same way, more patiently
            // (a client process paused for a while keeps its streams):
            // their streams (subscriptions, produce streams) end and free
            // what they hold.
            .http2_keepalive_interval(Some(SERVER_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(SERVER_KEEPALIVE_TIMEOUT))
            .layer(AuthLayer::new(security.clone()))
    };
    let replication = crate::replica::service::replication_server(broker.clone(), message_max);
    let router = builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(crate::service::producer_server(broker.clone(), message_max))
        .add_service(crate::service::consumer_server(broker.clone(), message_max))
        .add_service(AdminServer::new(AdminService::new(broker.clone())))
        .add_service(ConsumerGroupsServer::new(groups))
        .add_service(SecurityServer::new(SecurityService::new(broker.clone())));
    // Internal services share the client port unless they have their own.
    let (router, internal_router) = match internal_listener {
        None => (
            router
                .add_service(store.raft_service())
                .add_service(store.lifecycle_service())
                .add_service(replication),
            None,
        ),
        Some(listener) => (
            router,
            Some((
                listener,
                builder()
                    .add_service(store.raft_service())
                    .add_service(store.lifecycle_service())
                    .add_service(replication),
            )),
        ),
    };
    macro_rules! serve {
        ($router:expr, $listener:expr, $tls:expr) => {
            match $tls {
                Some(tls) => tokio::spawn($router.serve_with_incoming_shutdown(
                    crate::security::tls::incoming($listener, tls, shutdown.clone()),
                    shutdown.clone().cancelled_owned(),
                )),
                None => tokio::spawn($router.serve_with_incoming_shutdown(
                    plain_incoming($listener, shutdown.clone()),
                    shutdown.clone().cancelled_owned(),
                )),
            }
        };
    }
    let serve_client = serve!(router, listener, client_tls);
    let serve_internal = internal_router.map(|(l, r)| serve!(r, l, internal_tls));
    let serve = tokio::spawn(async move {
        let client = serve_client.await;
        if let Some(internal) = serve_internal {
            if let Ok(Err(e)) = internal.await {
                warn!(error = %e, "internal listener failed");
            }
        }
        client.unwrap_or(Ok(()))
    });

    // The quorum forms and this broker registers while the services run.
    let heartbeat = spawn_heartbeat(
        store.clone(),
        config.node_id,
        advertised.clone(),
        heartbeat_every,
        shutdown.clone(),
    );
    endpoint.set_heartbeat_contact(heartbeat.contact());
    let ready = async {
        // One deadline for both waits: the quorum, then this broker's
        // registration.
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        let not_registered = || ServerError::NotRegistered {
            waited_s: STARTUP_TIMEOUT.as_secs(),
        };
        store
            .wait_for_cluster_id(STARTUP_TIMEOUT)
            .await
            .map_err(|_| not_registered())?;
        let mut rx = store.watch();
        let mut registered = heartbeat.registered();
        let node = config.node_id;
        tokio::time::timeout_at(deadline, async {
            // This process's registration, not one left by a crashed
            // predecessor (replayed from the metadata log, unfenced if it
            // died within its session; it may name another port).
            let epoch = registered
                .wait_for(Option::is_some)
                .await
                .map_err(|_| ())?
                .expect("waited for");
            rx.wait_for(|m| {
                m.brokers
                    .get(&node)
                    .is_some_and(|b| !b.fenced && b.epoch >= epoch && b.address == advertised)
            })
            .await
            .map(|_| ())
            .map_err(|_| ())
        })
        .await
        .map_err(|_| not_registered())?
        .map_err(|_| MetadataError::Raft {
            reason: "metadata store stopped".into(),
        })?;
        Ok::<_, ServerError>(())
    };
    let started = tokio::select! {
        r = ready => r,
        _ = shutdown.cancelled() => Err(ServerError::Interrupted),
    };
    if let Err(e) = started {
        // The same way out as a shutdown, bounded as it is: a long-lived
        // stream (a follower's fetch, a produce stream) must not hold
        // the drain open for good, and the logs opened above are closed
        // cleanly so the next start need not scan them. Not registered,
        // it has no leadership to hand over.
        warn!(error = %e, "startup failed; stopping");
        let _ = wind_down(&broker, &store, &heartbeat, &shutdown, serve, None, grace).await;
        let b = broker.clone();
        if let Ok(Err(close)) = tokio::task::spawn_blocking(move || b.close()).await {
            warn!(error = %close, "closing the logs failed");
        }
        return Err(e);
    }
    if let Err(e) = broker.start() {
        // Registered: its leaderships are handed over on the way out.
        let handover = Some(Duration::from_millis(config.controller.submit_timeout_ms));
        let _ = wind_down(
            &broker, &store, &heartbeat, &shutdown, serve, handover, grace,
        )
        .await;
        let b = broker.clone();
        if let Ok(Err(close)) = tokio::task::spawn_blocking(move || b.close()).await {
            warn!(error = %close, "closing the logs failed");
        }
        return Err(e.into());
    }
    for name in HEALTH_SERVICES {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // From now on gRPC health follows /ready: a node fenced by the
    // controller, or cut off from the quorum, reports NOT_SERVING (set
    // once at startup, it said SERVING to container health checks
    // while /ready said why not).
    let health_follower = tokio::spawn(follow_readiness(
        endpoint.clone(),
        broker.clone(),
        health_reporter.clone(),
        shutdown.clone(),
    ));

    let maintenance = every_interval(
        broker.clone(),
        shutdown.clone(),
        tick_every,
        "maintenance",
        |b| b.tick(),
    );
    // Write-back of new appends, started a few times a second so dirty
    // pages never pile up into the kernel flusher's bursts (appends to a
    // file being written back wait on its block-mapping lock).
    let writeback = writeback_every.map(|every| {
        every_interval(broker.clone(), shutdown.clone(), every, "write-back", |b| {
            b.start_writeback()
        })
    });

    endpoint.set_started();
    early.abort();
    info!(node_id = config.node_id, addr = %local, advertised = %advertised, data_dir = %config.data_dir.display(), "runnel listening");
    println!("runnel listening on {local}");

    let mut raft_failed = None;
    let log_failed = tokio::select! {
        () = external.cancelled() => false,
        () = broker.failed().cancelled() => true,
        why = store.stopped() => {
            error!(reason = %why, "the metadata quorum's Raft core stopped; stopping this node");
            raft_failed = Some(why);
            false
        }
    };
    info!(
        log_failed,
        raft_failed = raft_failed.is_some(),
        "shutting down"
    );
    // Not ready from now on: load balancers and health checks stop
    // sending traffic during the handover and the drain.
    endpoint.set_stopping();
    for name in HEALTH_SERVICES {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let result = wind_down(
        &broker,
        &store,
        &heartbeat,
        &shutdown,
        serve,
        Some(Duration::from_millis(config.controller.submit_timeout_ms)),
        grace,
    )
    .await;
    maintenance.abort();
    health_follower.abort();
    if let Some(w) = writeback {
        w.abort();
    }
    if let Some(m) = metrics_server {
        let _ = tokio::time::timeout(grace, m).await;
    }
    let b = broker.clone();
    tokio::task::spawn_blocking(move || b.close())
        .await
        .map_err(|_| BrokerError::ShuttingDown)??;
    info!("runnel stopped");
    drop(lock);
    if log_failed {
        return Err(ServerError::LogFailed);
    }
    if let Some(reason) = raft_failed {
        return Err(ServerError::RaftStopped { reason });
    }
    result
}

/// Keeps gRPC health in step with the metrics endpoint's readiness: on
/// every metadata change, and every second (the controller can change
/// without one), until `shutdown`.
async fn follow_readiness(
    endpoint: Arc<crate::metrics::http::Endpoint>,
    broker: Arc<Broker>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut metadata = broker.metadata().watch();
    let mut watching = true;
    let mut serving = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = metadata.changed(), if watching => watching = changed.is_ok(),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let why = endpoint.not_ready();
        if why.is_none() == serving {
            continue;
        }
        serving = why.is_none();
        match &why {
            Some(why) => warn!(reason = %why, "not ready: gRPC health says NOT_SERVING"),
            None => info!("ready again: gRPC health says SERVING"),
        }
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for name in HEALTH_SERVICES {
            reporter.set_service_status(name, status).await;
        }
    }
}

/// The services gRPC health reports on: the server as a whole ("") and
/// the client-facing ones.
const HEALTH_SERVICES: [&str; 6] = [
    "",
    "runnel.v1.Producer",
    "runnel.v1.Consumer",
    "runnel.v1.Admin",
    "runnel.v1.ConsumerGroups",
    "runnel.v1.Security",
];

/// The way out, after a shutdown request or a failed startup alike:
/// hands leaderships over (with `handover`, bounded by it), leaves the
/// quorum, then stops the listeners and waits at most `grace` for open
/// requests. Returns how the client listener ended. The caller closes the
/// logs.
async fn wind_down(
    broker: &Broker,
    store: &RaftMetadataStore,
    heartbeat: &runnel_controller::raft::Heartbeat,
    shutdown: &CancellationToken,
    serve: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    handover: Option<Duration>,
    grace: Duration,
) -> Result<(), ServerError> {
    // No more heartbeats: a heartbeat seeing the fence below would
    // register this broker again.
    heartbeat.abort();
    if let Some(handover) = handover {
        // This process's own registration: a fence applied late must not
        // land on the next incarnation.
        let epoch = *heartbeat.registered().borrow();
        if let Err(e) = broker.controlled_shutdown(handover, epoch).await {
            warn!(error = %e, "controlled shutdown incomplete; stopping anyway");
        }
    }
    // Leave the quorum before the listener closes: a Raft leader whose
    // port no longer accepts connections would keep leading (its outgoing
    // heartbeats still arrive) while no broker could reach it.
    store.shutdown().await;
    shutdown.cancel();
    match tokio::time::timeout(grace, serve).await {
        Ok(Ok(r)) => r.map_err(ServerError::from),
        Ok(Err(_)) => Ok(()),
        Err(_) => {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "shutdown grace period over; closing the logs with requests still open"
            );
            Ok(())
        }
    }
}

/// Accepts plain TCP connections on `listener` for tonic, until `cancel`.
/// A failed accept (out of file descriptors: EMFILE) is logged and
/// retried after a pause, as the TLS listener does; tonic's own accept
/// loop retried at once, silently, and burnt a core while it lasted.
/// `TCP_NODELAY` is set on every connection (the builder's applies only
/// to `serve`): without it a response larger than one segment waits
/// ~40 ms for a delayed ACK (Nagle).
fn plain_incoming(
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<tokio::net::TcpStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_RETRY).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            if tx.send(Ok(tcp)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
