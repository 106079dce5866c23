//! The node's HTTP endpoint (`metrics_listen`): `/metrics` in the
//! Prometheus text format, `/health` (the process answers) and `/ready`
//! (registered with the controller, not fenced, a controller known, and
//! the broker started: the node has caught up on the metadata far enough
//! to see its own registration). Plain HTTP/1.1, separate from the gRPC
//! port so scrapers and load-balancer probes need no gRPC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::snapshot::{self, Snapshot};
use crate::broker::Broker;
use crate::group::GroupCoordinator;

/// What the endpoint reads; filled in as the node starts.
#[derive(Debug, Default)]
pub struct Endpoint {
    broker: OnceLock<Arc<Broker>>,
    groups: OnceLock<Arc<GroupCoordinator>>,
    started: AtomicBool,
    /// One scrape at a time: group lag may ask other brokers.
    scrape: tokio::sync::Mutex<()>,
}

impl Endpoint {
    /// An endpoint that reports not ready until [`Endpoint::set_started`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The broker whose metrics are served (set once).
    pub fn set_broker(&self, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// The group coordinator whose lag is served (set once).
    pub fn set_groups(&self, groups: Arc<GroupCoordinator>) {
        let _ = self.groups.set(groups);
    }

    /// The node registered and the broker started.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Why the node is not ready, or None when it is.
    pub fn not_ready(&self) -> Option<String> {
        let Some(broker) = self.broker.get() else {
            return Some("starting".into());
        };
        if !self.started.load(Ordering::Acquire) {
            return Some("waiting for the metadata quorum and registration".into());
        }
        let meta = broker.metadata().current();
        match meta.brokers.get(&broker.node_id()) {
            None => return Some("not registered with the controller".into()),
            Some(b) if b.fenced => return Some("fenced by the controller".into()),
            Some(_) => {}
        }
        if broker.metadata().controller_id() < 0 {
            return Some("no active controller known".into());
        }
        None
    }

    async fn metrics(&self) -> Response {
        let Some(broker) = self.broker.get() else {
            return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
        };
        let _one = self.scrape.lock().await;
        let snapshot = Snapshot::take(broker, self.groups.get()).await;
        match snapshot::encode(broker.metrics().registry(), snapshot) {
            Ok(body) => (
                [(
                    header::CONTENT_TYPE,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                )],
                body,
            )
                .into_response(),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
        }
    }
}

/// Serves the endpoint on `listener` until `shutdown` is cancelled.
pub fn spawn(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(endpoint);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            warn!(%error, "metrics endpoint stopped");
        }
    })
}

async fn metrics(State(endpoint): State<Arc<Endpoint>>) -> Response {
    endpoint.metrics().await
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(endpoint): State<Arc<Endpoint>>) -> Response {
    match endpoint.not_ready() {
        None => "ready\n".into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}
