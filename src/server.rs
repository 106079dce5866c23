//! `runnel server`: binds the client listener, opens the metadata store and
//! the broker, and serves every gRPC service (plus gRPC health checking and
//! server reflection) until the shutdown token is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use runnel_controller::{LocalMetadataStore, MetadataError};
use runnel_proto::v1::{
    admin_server::AdminServer, consumer_groups_server::ConsumerGroupsServer,
    consumer_server::ConsumerServer, producer_server::ProducerServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::config::ServerConfig;
use crate::error::BrokerError;
use crate::service::{AdminService, ConsumerService, GroupsService, ProducerService};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {dir} is in use by another runnel process")]
    DataDirLocked { dir: std::path::PathBuf },
    #[error("cannot use data directory {dir}: {source}")]
    DataDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Runs a broker until `shutdown` is cancelled. Prints
/// `runnel listening on ADDR` on stdout once it accepts connections.
pub async fn run(mut config: ServerConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| ServerError::DataDir {
        dir: dir.clone(),
        source,
    })?;
    let lock_path = dir.join(".lock");
    let lock = std::fs::File::create(&lock_path).map_err(|source| ServerError::DataDir {
        dir: dir.clone(),
        source,
    })?;
    if lock.try_lock().is_err() {
        return Err(ServerError::DataDirLocked { dir });
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
    if config.advertised_address.is_none() {
        config.advertised_address = Some(local.to_string());
    }
    let grace = Duration::from_millis(config.broker.shutdown_grace_ms);
    let message_max = config.broker.grpc_message_bytes_max;
    let tick_every = Duration::from_millis(config.broker.maintenance_interval_ms.max(10));

    let metadata = Arc::new(LocalMetadataStore::open(dir.join("meta"), config.node_id)?);
    let broker = Broker::open(config.clone(), metadata, shutdown.clone()).await?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ProducerServer<ProducerService>>()
        .await;
    health_reporter
        .set_serving::<ConsumerServer<ConsumerService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(runnel_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let maintenance = {
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick_every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let b = broker.clone();
                match tokio::task::spawn_blocking(move || b.tick()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "maintenance failed"),
                    Err(e) => warn!(error = %e, "maintenance task panicked"),
                }
            }
        })
    };

    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            ProducerServer::new(ProducerService::new(broker.clone()))
                .max_decoding_message_size(message_max)
                .max_encoding_message_size(message_max),
        )
        .add_service(
            ConsumerServer::new(ConsumerService::new(broker.clone()))
                .max_decoding_message_size(message_max)
                .max_encoding_message_size(message_max),
        )
        .add_service(AdminServer::new(AdminService::new(broker.clone())))
        .add_service(ConsumerGroupsServer::new(GroupsService));

    info!(node_id = config.node_id, addr = %local, data_dir = %config.data_dir.display(), "runnel listening");
    println!("runnel listening on {local}");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let serve = router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tokio::pin!(serve);
    let result = tokio::select! {
        r = &mut serve => r,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!(grace_ms = grace.as_millis() as u64, "shutdown grace period over; dropping open requests");
            Ok(())
        }
    };
    maintenance.abort();
    let b = broker.clone();
    tokio::task::spawn_blocking(move || b.close())
        .await
        .map_err(|_| BrokerError::ShuttingDown)??;
    info!("runnel stopped");
    drop(lock);
    Ok(result?)
}
