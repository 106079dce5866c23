//! The tonic server of `runnel.v1.internal.Raft`: hands openraft's RPCs to
//! the local Raft node, and runs forwarded `ClientWrite`s on the leader.

use std::sync::Arc;
use std::time::Instant;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};
use runnel_proto::v1::internal::raft_server::Raft as RaftRpc;
use runnel_proto::v1::internal::RaftPayload;
use tonic::{Request, Response, Status};

use super::network::{decode, encode};
use super::type_config::{ForwardRequest, ForwardResponse, NodeId, TypeConfig};
use super::{Attempt, RaftMetadataStore};

/// Serves the Raft RPCs of one [`RaftMetadataStore`].
#[derive(Debug, Clone)]
pub struct RaftService {
    store: Arc<RaftMetadataStore>,
}

impl RaftService {
    /// A service for `store`.
    pub fn new(store: Arc<RaftMetadataStore>) -> Self {
        Self { store }
    }

    fn reply<T: serde::Serialize>(&self, body: &T) -> Result<Response<RaftPayload>, Status> {
        Ok(Response::new(encode(&self.store.cluster_id, body)))
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let received = Instant::now();
        let req: AppendEntriesRequest<TypeConfig> =
            decode(&self.store.cluster_id, request.get_ref())?;
        let sender = req.vote.leader_id().voted_for();
        let resp = self.store.raft.append_entries(req).await;
        // Proof that the sending leader was alive at `received`, unless it
        // was refused as stale: a successor controller starts that node's
        // broker session from here (see `lifecycle`).
        if let (Some(leader), Ok(r)) = (sender, &resp) {
            if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                self.store.sessions.leader_contact(leader, received);
            }
        }
        self.reply(&resp)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let req: VoteRequest<NodeId> = decode(&self.store.cluster_id, request.get_ref())?;
        let resp = self.store.raft.vote(req).await;
        self.reply(&resp)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> =
            decode(&self.store.cluster_id, request.get_ref())?;
        let resp = self.store.raft.install_snapshot(req).await;
        self.reply(&resp)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn client_write(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: ForwardRequest = decode(&self.store.cluster_id, request.get_ref())?;
        let store = &self.store;
        let deadline = Instant::now() + store.config.submit_timeout();
        let (leader, leader_addr) = store.leader();
        let me = store.config.node_id as NodeId;
        let attempt = if leader == Some(me) {
            store.write_local(req.cmd, deadline).await
        } else if let (true, Some(addr)) = (req.hops > 0 && leader.is_some(), leader_addr) {
            let next = ForwardRequest {
                cmd: req.cmd,
                hops: req.hops - 1,
            };
            store.forward(&addr, &next, deadline, true).await
        } else {
            Attempt::Retry(leader)
        };
        let resp = match attempt {
            Attempt::Done(r) => ForwardResponse::Applied(r),
            Attempt::Retry(hint) => ForwardResponse::NotLeader {
                leader_id: hint.or(leader),
            },
            Attempt::Fatal(e) => return Err(Status::unavailable(e.to_string())),
        };
        self.reply(&resp)
    }
}
