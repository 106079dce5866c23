//! The Raft transport: openraft's RPCs as JSON in `RaftPayload`, over the
//! `runnel.v1.internal.Raft` tonic service, plus the `ClientWrite` forward
//! and the broker-lifecycle client. One lazily connected channel per peer
//! address, shared by all callers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use runnel_proto::v1::internal::raft_client::RaftClient;
use runnel_proto::v1::internal::RaftPayload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::cluster_id::ClusterIdGuard;
use super::type_config::{Envelope, NodeId, TypeConfig, WIRE_VERSION};

/// gRPC metadata key naming the receiver's cluster id when it refuses a
/// peer from another cluster (status `FAILED_PRECONDITION`).
pub const CLUSTER_ID_HEADER: &str = "runnel-cluster-id";
/// gRPC metadata key with the known leader id on `UNAVAILABLE` answers of
/// the lifecycle service.
pub const LEADER_HEADER: &str = "runnel-controller-id";

/// The PEM files of a broker's TLS identity for its outgoing internal
/// calls. They are re-read when one changes (checked at most once a
/// second), and the cached channels dropped, so a rotated certificate is
/// used from the next connection on.
#[derive(Clone, Debug)]
pub struct InternalTlsFiles {
    /// CA bundle the peers' certificates must chain to.
    pub ca_file: Option<PathBuf>,
    /// This broker's certificate chain.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
}

impl InternalTlsFiles {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.ca_file.iter().chain([&self.cert_file, &self.key_file])
    }

    /// Each file's modification time and length (a rewrite in place can
    /// end within the time's granularity of a read of its first half).
    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .map(|p| {
                std::fs::metadata(p)
                    .and_then(|m| Ok((m.modified()?, m.len())))
                    .ok()
            })
            .collect()
    }

    /// The files, read and checked: a configuration whose PEM does not
    /// parse (a file read half-written) is refused here rather than
    /// taken, which made every later channel fail.
    fn load(&self) -> std::io::Result<ClientTlsConfig> {
        let mut config = ClientTlsConfig::new().identity(Identity::from_pem(
            std::fs::read(&self.cert_file)?,
            std::fs::read(&self.key_file)?,
        ));
        if let Some(ca) = &self.ca_file {
            config = config.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        }
        Endpoint::from_static("https://localhost")
            .tls_config(config.clone())
            .map_err(std::io::Error::other)?;
        Ok(config)
    }
}

/// The current client TLS configuration and what it was built from.
#[derive(Debug)]
struct TlsState {
    files: InternalTlsFiles,
    checked: Instant,
    /// The files' stamps when `config` was loaded from them.
    stamps: Vec<Option<(SystemTime, u64)>>,
    /// Stamps of files that changed but failed to load (not tried again
    /// until they change once more).
    failed: Option<Vec<Option<(SystemTime, u64)>>>,
    config: Option<ClientTlsConfig>,
}

/// Channels by peer address.
#[derive(Debug, Default)]
pub struct Channels {
    by_addr: Mutex<HashMap<String, Channel>>,
    /// TLS for every peer (`https://`), or plaintext when `None`.
    tls: Option<Mutex<TlsState>>,
}

impl Channels {
    /// Channels that speak TLS to every peer when `tls` is set.
    pub fn with_tls(tls: Option<InternalTlsFiles>) -> Self {
        let tls = tls.map(|files| {
            let stamps = files.stamps();
            let config = files
                .load()
                .map_err(|error| tracing::warn!(%error, "cannot read internal TLS files"))
                .ok();
            Mutex::new(TlsState {
                failed: config.is_none().then(|| stamps.clone()),
                stamps,
                files,
                checked: Instant::now(),
                config,
            })
        });
        Self {
            by_addr: Mutex::default(),
            tls,
        }
    }

    /// The TLS configuration for a new channel, reloaded (and the cached
    /// channels dropped) when a file changed.
    fn current_tls(&self) -> Option<ClientTlsConfig> {
        let mut state = self.tls.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= Duration::from_secs(1) {
            state.checked = Instant::now();
            let stamps = state.files.stamps();
            if stamps != state.stamps && state.failed.as_ref() != Some(&stamps) {
                match state.files.load() {
                    Ok(config) => {
                        tracing::info!("internal TLS client certificate reloaded");
                        state.config = Some(config);
                        state.stamps = stamps;
                        state.failed = None;
                        self.by_addr
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clear();
                    }
                    Err(error) => {
                        tracing::warn!(%error, "internal TLS files changed but cannot be loaded; keeping the previous ones");
                        state.failed = Some(stamps);
                    }
                }
            }
        }
        state.config.clone()
    }

    /// The channel to `addr` (HOST:PORT), connected on first use.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::Status> {
        let tls = self.current_tls();
        let mut map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| tonic::Status::invalid_argument(format!("bad address {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            // A peer gone without closing its connection (a host crash, a
            // partition) is noticed in about 20 s and the connection
            // dropped, as the broker's own channels do: without pings,
            // calls went down the dead connection until the kernel gave
            // up on it (about 15 minutes), past a peer back at a new
            // address under the same name.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| tonic::Status::invalid_argument(format!("TLS for {addr}: {e}")))?;
        }
        let ch = endpoint.connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }
}

/// HTTP/2 keepalive ping interval on Raft and heartbeat channels.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Wraps `body` with the sender's cluster id.
pub fn encode<T: Serialize>(cluster_id: &ClusterIdGuard, body: &T) -> RaftPayload {
    let env = Envelope {
        version: WIRE_VERSION,
        cluster_id: cluster_id.get(),
        body,
    };
    RaftPayload {
        data: serde_json::to_vec(&env)
            .expect("raft messages serialise")
            .into(),
    }
}

/// Unwraps a payload, refusing another version or another cluster.
#[allow(clippy::result_large_err)]
pub fn decode<T: DeserializeOwned>(
    cluster_id: &ClusterIdGuard,
    payload: &RaftPayload,
) -> Result<T, tonic::Status> {
    let env: Envelope<T> = serde_json::from_slice(&payload.data)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad raft payload: {e}")))?;
    if env.version != WIRE_VERSION {
        return Err(tonic::Status::invalid_argument(format!(
            "raft payload version {} (expected {WIRE_VERSION})",
            env.version
        )));
    }
    if !cluster_id.accepts(&env.cluster_id) {
        let mut status = tonic::Status::failed_precondition(format!(
            "peer belongs to cluster '{}', this node to '{}'",
            env.cluster_id,
            cluster_id.get()
        ));
        if let Ok(v) = cluster_id.get().parse() {
            status.metadata_mut().insert(CLUSTER_ID_HEADER, v);
        }
        return Err(status);
    }
    Ok(env.body)
}

/// The cluster id a refusing peer named, if that is why it refused.
pub fn refused_cluster_id(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    let v = status.metadata().get(CLUSTER_ID_HEADER)?;
    v.to_str().ok().map(str::to_string)
}

/// Which Raft RPC to call.
#[derive(Clone, Copy, Debug)]
pub enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    ClientWrite,
}

/// One unary call of the Raft service, payload in, payload out.
pub async fn call(
    channel: Channel,
    rpc: Rpc,
    payload: RaftPayload,
    timeout: Duration,
) -> Result<RaftPayload, tonic::Status> {
    let mut client = RaftClient::new(channel).max_decoding_message_size(64 << 20);
    let mut req = tonic::Request::new(payload);
    req.set_timeout(timeout);
    let resp = match rpc {
        Rpc::AppendEntries => client.append_entries(req).await,
        Rpc::Vote => client.vote(req).await,
        Rpc::InstallSnapshot => client.install_snapshot(req).await,
        Rpc::ClientWrite => client.client_write(req).await,
    };
    // Bound the whole exchange even if the peer ignores the deadline.
    resp.map(tonic::Response::into_inner)
}

/// openraft's network factory: one [`PeerClient`] per replication target.
#[derive(Clone, Debug)]
pub struct Network {
    pub channels: Arc<Channels>,
    pub cluster_id: Arc<ClusterIdGuard>,
    /// The voters' addresses from this node's configuration
    /// (`[controller] voters`).
    pub voters: Arc<std::collections::BTreeMap<NodeId, String>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    /// A voter is dialled at the address this node's configuration gives
    /// it, not the one stored in the membership when the cluster first
    /// formed: otherwise moving the voters (say to an `internal_listen`
    /// port) in every node's configuration left each dialling the old
    /// port for good, a quorum that never formed again. A learner (a
    /// broker-only node) is dialled where it registered.
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: self
                .voters
                .get(&target)
                .cloned()
                .unwrap_or_else(|| node.addr.clone()),
            net: self.clone(),
        }
    }
}

/// A connection to one peer.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    addr: String,
    net: Network,
}

impl PeerClient {
    /// One call; `entries`, for AppendEntries, is how many it carries.
    async fn send<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
        entries: Option<u64>,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self
            .net
            .channels
            .get(&self.addr)
            .map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        let payload = encode(&self.net.cluster_id, req);
        let resp = call(channel, rpc, payload, option.hard_ttl())
            .await
            .map_err(|s| match (s.code(), entries) {
                (tonic::Code::Unavailable | tonic::Code::Cancelled, _) => {
                    RPCError::Unreachable(Unreachable::new(&s))
                }
                // The peer would not decode a message this large (its
                // limit is 64 MiB): openraft sends fewer entries at once
                // only when told so. As a network error the same batch
                // was sent again for good, and the follower never moved.
                (tonic::Code::OutOfRange | tonic::Code::ResourceExhausted, Some(n)) if n > 1 => {
                    RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(n / 2))
                }
                _ => RPCError::Network(NetworkError::new(&s)),
            })?;
        let body: Result<Resp, RaftError<NodeId, E>> = decode(&self.net.cluster_id, &resp)
            .map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        body.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len() as u64;
        self.send(Rpc::AppendEntries, &rpc, &option, Some(entries))
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(Rpc::InstallSnapshot, &rpc, &option, None).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(Rpc::Vote, &rpc, &option, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Raft service refusing every call as too large to decode.
    struct TooLarge;

    #[tonic::async_trait]
    impl runnel_proto::v1::internal::raft_server::Raft for TooLarge {
        async fn append_entries(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::out_of_range(
                "Error, decoded message length too large",
            ))
        }
        async fn vote(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::out_of_range("too large"))
        }
        async fn install_snapshot(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::out_of_range("too large"))
        }
        async fn client_write(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::out_of_range("too large"))
        }
    }

    /// Entries a peer will not decode (past its 64 MiB message limit) are
    /// reported as too large, with a hint of half as many, so openraft
    /// sends fewer at once: as a network error the same batch went again
    /// for good and the follower never moved.
    #[tokio::test]
    async fn entries_a_peer_will_not_decode_are_sent_fewer_at_once() {
        let incoming =
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(runnel_proto::v1::internal::raft_server::RaftServer::new(
                    TooLarge,
                ))
                .serve_with_incoming(incoming),
        );
        let dir = tempfile::tempdir().unwrap();
        let mut net = Network {
            channels: Arc::new(Channels::with_tls(None)),
            cluster_id: Arc::new(ClusterIdGuard::open(dir.path(), Some("c")).unwrap()),
            voters: Arc::new(std::collections::BTreeMap::from([(2, addr.to_string())])),
        };
        let mut peer = net.new_client(2, &BasicNode::default()).await;
        let entries: Vec<_> = (1..=10)
            .map(|i| openraft::Entry::<TypeConfig> {
                log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
                payload: openraft::EntryPayload::Blank,
            })
            .collect();
        let request = |entries| AppendEntriesRequest {
            vote: openraft::Vote::new(1, 1),
            prev_log_id: None,
            entries,
            leader_commit: None,
        };
        let option = RPCOption::new(Duration::from_secs(5));
        let err = peer
            .append_entries(request(entries.clone()), option.clone())
            .await
            .unwrap_err();
        let RPCError::PayloadTooLarge(too_large) = &err else {
            panic!("{err:?}");
        };
        assert_eq!(too_large.entries_hint(), 5);
        // One entry alone cannot be split: a network error, as before.
        let err = peer
            .append_entries(request(entries[..1].to_vec()), option)
            .await
            .unwrap_err();
        assert!(matches!(err, RPCError::Network(_)), "{err:?}");
    }

    #[tokio::test]
    async fn changed_tls_files_are_reloaded_and_channels_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let files = InternalTlsFiles {
            ca_file: Some(dir.path().join("ca.pem")),
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(files.ca_file.as_ref().unwrap(), cert.pem()).unwrap();
        std::fs::write(&files.cert_file, cert.pem()).unwrap();
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        let channels = Channels::with_tls(Some(files.clone()));
        assert!(channels.current_tls().is_some());
        channels.get("127.0.0.1:1").unwrap();
        assert_eq!(channels.by_addr.lock().unwrap().len(), 1);
        let age = |channels: &Channels| {
            channels.tls.as_ref().unwrap().lock().unwrap().checked -= Duration::from_secs(2);
        };
        // Nothing changed: the channel stays.
        age(&channels);
        channels.current_tls();
        assert_eq!(channels.by_addr.lock().unwrap().len(), 1);
        // A new certificate: channels are dropped, to reconnect with it.
        let f = std::fs::File::options()
            .write(true)
            .open(&files.cert_file)
            .unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        age(&channels);
        assert!(channels.current_tls().is_some());
        assert!(channels.by_addr.lock().unwrap().is_empty());
        // Half a certificate (a rewrite read midway) is not taken: the
        // channels and the configuration stay. Taken, every later channel
        // failed to build.
        channels.get("127.0.0.1:1").unwrap();
        let pem = cert.pem();
        std::fs::write(&files.cert_file, &pem[..pem.len() / 2]).unwrap();
        age(&channels);
        assert!(channels.current_tls().is_some());
        assert_eq!(
            channels.by_addr.lock().unwrap().len(),
            1,
            "dropped for a broken file"
        );
        // Whole again, with the same modification time: loaded.
        let at = std::fs::metadata(&files.cert_file)
            .unwrap()
            .modified()
            .unwrap();
        std::fs::write(&files.cert_file, &pem).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&files.cert_file)
            .unwrap()
            .set_modified(at)
            .unwrap();
        age(&channels);
        assert!(channels.current_tls().is_some());
        assert!(
            channels.by_addr.lock().unwrap().is_empty(),
            "the whole file was not loaded"
        );
        channels.get("127.0.0.1:1").unwrap();
    }
}
