//! The node's HTTP endpoint (`metrics_listen`): `/metrics` in the
//! Prometheus text format, `/health` (the process answers) and `/ready`
//! (registered with the controller, not fenced, a controller known, and
//! the broker started: the node has caught up on the metadata far enough
//! to see its own registration). Plain HTTP/1.1, separate from the gRPC
//! port so scrapers and load-balancer probes need no gRPC.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::Listener;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
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
    /// When the controller last answered this broker's heartbeats.
    contact: OnceLock<runnel_controller::raft::HeartbeatContact>,
    started: AtomicBool,
    /// The node is stopping (or a log failed): not ready, whatever the
    /// metadata says, so load balancers stop sending it traffic.
    stopping: AtomicBool,
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

    /// The heartbeat task's record of the controller's answers (set once).
    pub fn set_heartbeat_contact(&self, contact: runnel_controller::raft::HeartbeatContact) {
        let _ = self.contact.set(contact);
    }

    /// The node registered and the broker started.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// The node began to stop.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Why the node is not ready, or None when it is.
    pub fn not_ready(&self) -> Option<String> {
        if self.stopping.load(Ordering::Acquire) {
            return Some("shutting down".into());
        }
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
        let controller = broker.metadata().controller_id();
        if controller < 0 {
            return Some("no active controller known".into());
        }
        // Cut off from the quorum, a node never learns that it was
        // fenced (its metadata copy stays as it was, and a learner keeps
        // its last leader's id): the silence is what tells. Past the
        // session timeout the controller has fenced it, if it still runs.
        let session = broker.config().controller.broker_session_timeout_ms;
        if let Some(silent) = self.contact.get().and_then(|c| c.since_answer()) {
            if silent.as_millis() > u128::from(session) {
                return Some(format!(
                    "no controller answered this broker's heartbeats for {} ms",
                    silent.as_millis()
                ));
            }
        }
        if controller == broker.node_id() {
            let q = broker.metadata().quorum();
            if let Some(ms) = q.millis_since_quorum_ack {
                if q.voters.len() > 1 && ms > session {
                    return Some(format!(
                        "the active controller has heard from no majority of voters for {ms} ms"
                    ));
                }
            }
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

/// How many connections the endpoint serves at once, at most; more wait
/// in the listen backlog. Scrapers and probes need a few.
const CONNECTIONS_MAX: usize = 64;
/// A connection that moves no byte for this long is closed (a client
/// that opened it and sent nothing, or half a request).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection is closed once this old, when it next waits: clients
/// that kept theirs busy (asking again and again on keep-alive, or
/// reading an answer a few bytes at a time) otherwise held every slot for
/// good, and the `/health` and `/ready` probes waited in the backlog
/// unanswered. Scrapers and probes reconnect; a scrape takes well under
/// it.
const LIFETIME: Duration = Duration::from_secs(60);
/// A request must be answered within this long of its first byte: a
/// client that trickles one byte by byte, which the idle timeout never
/// catches, gives its slot back then. Otherwise
/// [`CONNECTIONS_MAX`] such clients held every slot for good, and the
/// `/health` and `/ready` probes failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves the endpoint on `listener` until `shutdown` is cancelled.
///
/// Connections are bounded in number and time: the server has no
/// header-read or idle timeout of its own, and each connection is a file
/// descriptor from the broker's budget, shared with segment files and
/// gRPC.
pub fn spawn(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_bounded(
        listener,
        endpoint,
        shutdown,
        (
            Arc::new(Semaphore::new(CONNECTIONS_MAX)),
            IDLE_TIMEOUT,
            REQUEST_TIMEOUT,
            LIFETIME,
        ),
    )
}

/// [`spawn`] with `slots` (one permit per connection) and its timeouts.
fn spawn_bounded(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    shutdown: CancellationToken,
    (slots, idle, request, lifetime): (Arc<Semaphore>, Duration, Duration, Duration),
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(endpoint);
    let listener = Bounded {
        inner: listener,
        slots,
        idle,
        request,
        lifetime,
    };
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            warn!(%error, "metrics endpoint stopped");
        }
    })
}

/// A listener that accepts while fewer than its slots are taken, and
/// hands out connections that time out.
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
    request: Duration,
    lifetime: Duration,
}

impl Listener for Bounded {
    type Io = Guarded<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (io, addr) = Listener::accept(&mut self.inner).await;
        let guarded = Guarded {
            io,
            idle: Box::pin(tokio::time::sleep_until(Instant::now() + self.idle)),
            idle_for: self.idle,
            answer: Box::pin(tokio::time::sleep_until(Instant::now() + self.request)),
            answer_for: self.request,
            asked: false,
            end: Box::pin(tokio::time::sleep_until(Instant::now() + self.lifetime)),
            _slot: slot,
        };
        (guarded, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Listener::local_addr(&self.inner)
    }
}

/// A connection that fails with TimedOut once it has moved no byte for
/// `idle_for`, or written none for `answer_for` since a request's first
/// byte came in (a request never finished); it holds its slot until
/// dropped.
struct Guarded<T> {
    io: T,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_for: Duration,
    answer: Pin<Box<tokio::time::Sleep>>,
    answer_for: Duration,
    /// A request came in and has not been answered yet: `answer` runs.
    asked: bool,
    /// The end of its [`LIFETIME`].
    end: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl<T> Guarded<T> {
    /// Wraps one poll of the connection: progress restarts the idle
    /// clock; waiting past it fails.
    fn guard<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                let next = Instant::now() + self.idle_for;
                self.idle.as_mut().reset(next);
                Poll::Ready(r)
            }
            Poll::Pending => {
                let idle = self.idle.as_mut().poll(cx).is_ready();
                let ended = self.end.as_mut().poll(cx).is_ready();
                if idle || ended || (self.asked && self.answer.as_mut().poll(cx).is_ready()) {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "metrics connection idle, its request unfinished, or open too long",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if !this.asked && buf.filled().len() > before {
            // A request begins: it has `answer_for` to be answered (the
            // clock is not reset by its later bytes).
            this.asked = true;
            let by = Instant::now() + this.answer_for;
            this.answer.as_mut().reset(by);
        }
        this.guard(cx, polled)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            // Answered: the next request has its own time, from its first
            // byte (an idle kept-alive connection falls to `idle`).
            this.asked = false;
        }
        this.guard(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.guard(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.guard(cx, polled)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get_health(addr: std::net::SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[test]
    fn a_stopping_endpoint_is_not_ready_whatever_else_holds() {
        let e = Endpoint::new();
        e.set_started();
        e.set_stopping();
        assert_eq!(e.not_ready().as_deref(), Some("shutting down"));
    }

    #[tokio::test]
    async fn silent_connections_are_closed_and_connections_are_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let slots = Arc::new(Semaphore::new(2));
        spawn_bounded(
            listener,
            Endpoint::new(),
            shutdown.clone(),
            (
                slots.clone(),
                Duration::from_secs(2),
                Duration::from_secs(60),
                Duration::from_secs(600),
            ),
        );

        // Opened, nothing sent: closed once idle.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("a silent connection stayed open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(silent);

        // Two clients trickling half a request (a byte every 100 ms, well
        // under the idle time) take both slots: a third waits, unanswered,
        // and is answered once they go.
        let trickle = |stop: tokio_util::sync::CancellationToken| async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
            while !stop.is_cancelled() {
                c.write_all(b"a").await.unwrap();
                // Pacing the trickle, not waiting for anything.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let stop = CancellationToken::new();
        let trickling = [
            tokio::spawn(trickle(stop.clone())),
            tokio::spawn(trickle(stop.clone())),
        ];
        // Both slots taken before the third connects (else the look
        // below tested nothing).
        tokio::time::timeout(Duration::from_secs(10), async {
            while slots.available_permits() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the trickling clients never took both slots");
        let third = tokio::spawn(get_health(addr));
        // Nothing to wait for: the third is not to be answered at all
        // while the slots are taken.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!third.is_finished(), "answered beyond the connection cap");
        stop.cancel();
        for t in trickling {
            t.await.unwrap();
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("still waiting after the slots were freed")
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
            "{answer}"
        );
        shutdown.cancel();
    }

    /// An endpoint of two slots and a 30 s idle time, with the request
    /// deadline and connection lifetime given.
    async fn serve_two(
        request: Duration,
        lifetime: Duration,
    ) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        spawn_bounded(
            listener,
            Endpoint::new(),
            shutdown.clone(),
            (
                Arc::new(Semaphore::new(2)),
                Duration::from_secs(30),
                request,
                lifetime,
            ),
        );
        (addr, shutdown)
    }

    /// A client trickling a request (a byte every 100 ms, well under the
    /// idle time) is cut off once the request deadline passes.
    #[tokio::test]
    async fn a_trickled_request_is_cut_off() {
        let (addr, shutdown) = serve_two(Duration::from_secs(1), Duration::from_secs(600)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        let cut = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if c.write_all(b"a").await.is_err() {
                    return;
                }
                let mut buf = [0u8; 16];
                // Pacing the trickle; a closed connection reads 0 or fails.
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await
                {
                    return;
                }
            }
        })
        .await;
        assert!(
            cut.is_ok(),
            "a trickled request held its connection for 20 s"
        );
        shutdown.cancel();
    }

    /// A keep-alive client asking again and again (each request answered
    /// at once, so neither the idle nor the request deadline passes) is
    /// closed once its connection's lifetime is over, giving its slot
    /// back: such clients held every slot for good.
    #[tokio::test]
    async fn a_busy_keep_alive_connection_is_closed_when_old() {
        let (addr, shutdown) = serve_two(Duration::from_secs(20), Duration::from_secs(1)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            let mut answers = 0;
            loop {
                if c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .is_err()
                {
                    return answers;
                }
                let mut buf = [0u8; 1024];
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return answers,
                    Ok(_) => answers += 1,
                }
                // Pacing: a request every 50 ms, well under the idle time.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let answers = closed.expect("a busy connection stayed open for 20 s");
        assert!(answers > 1, "closed after {answers} answers");
        shutdown.cancel();
    }
}
