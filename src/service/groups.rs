//! `runnel.v1.ConsumerGroups`: thin tonic adapter over
//! [`crate::group::GroupCoordinator`]; errors become statuses with the
//! `runnel-error-code` trailer (NOT_COORDINATOR, UNKNOWN_MEMBER,
//! ILLEGAL_GENERATION, GROUP_NOT_EMPTY, UNKNOWN_GROUP, ...).

use std::sync::Arc;

use runnel_proto::v1 as pb;
use runnel_proto::v1::consumer_groups_server::ConsumerGroups;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::broker::Broker;
use crate::group::GroupCoordinator;
use crate::security;
use runnel_controller::security::{Operation, ResourceType};

/// The group service; owns the coordinator (its background task ends when
/// the service is dropped).
#[derive(Debug, Clone)]
pub struct GroupsService {
    coordinator: Arc<GroupCoordinator>,
    /// For the ACL checks.
    broker: Arc<Broker>,
}

impl GroupsService {
    /// Starts the coordinator for `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self {
            coordinator: GroupCoordinator::start(broker.clone()),
            broker,
        }
    }

    /// PERMISSION_DENIED unless the caller may do `op` on `group`.
    #[allow(clippy::result_large_err)]
    fn check<T>(&self, request: &Request<T>, group: &str, op: Operation) -> Result<(), Status> {
        security::check(&self.broker, request, ResourceType::Group, group, op)
    }

    /// The coordinator (the metrics endpoint reads group lag from it).
    pub fn coordinator(&self) -> Arc<GroupCoordinator> {
        self.coordinator.clone()
    }
}

#[tonic::async_trait]
impl ConsumerGroups for GroupsService {
    #[instrument(skip_all, fields(group = %request.get_ref().group))]
    async fn find_coordinator(
        &self,
        request: Request<pb::FindCoordinatorRequest>,
    ) -> Result<Response<pb::FindCoordinatorResponse>, Status> {
        self.check(
            &request,
            &request.get_ref().group.clone(),
            Operation::Describe,
        )?;
        let r = self
            .coordinator
            .find_coordinator(&request.get_ref().group)
            .await?;
        Ok(Response::new(r))
    }

    #[instrument(skip_all, fields(group = %request.get_ref().group))]
    async fn join_group(
        &self,
        request: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::JoinGroupResponse>, Status> {
        self.check(&request, &request.get_ref().group.clone(), Operation::Read)?;
        // Topics the member may not see are refused, as Kafka's consumer
        // is (TOPIC_AUTHORIZATION_FAILED): the coordinator assigns their
        // partitions itself, and the answer told whether they existed and
        // how many partitions they had.
        for topic in &request.get_ref().topics {
            security::check(
                &self.broker,
                &request,
                ResourceType::Topic,
                topic,
                Operation::Describe,
            )?;
        }
        Ok(Response::new(
            self.coordinator.join(request.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.check(&request, &request.get_ref().group.clone(), Operation::Read)?;
        Ok(Response::new(
            self.coordinator.heartbeat(request.get_ref())?,
        ))
    }

    #[instrument(skip_all, fields(group = %request.get_ref().group))]
    async fn leave_group(
        &self,
        request: Request<pb::LeaveGroupRequest>,
    ) -> Result<Response<pb::LeaveGroupResponse>, Status> {
        self.check(&request, &request.get_ref().group.clone(), Operation::Read)?;
        self.coordinator.leave(request.get_ref())?;
        Ok(Response::new(pb::LeaveGroupResponse {}))
    }

    async fn commit_offsets(
        &self,
        request: Request<pb::CommitOffsetsRequest>,
    ) -> Result<Response<pb::CommitOffsetsResponse>, Status> {
        self.check(&request, &request.get_ref().group.clone(), Operation::Read)?;
        for o in &request.get_ref().offsets {
            security::check(
                &self.broker,
                &request,
                ResourceType::Topic,
                &o.topic,
                Operation::Read,
            )?;
        }
        self.coordinator.commit(request.into_inner()).await?;
        Ok(Response::new(pb::CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<pb::FetchOffsetsRequest>,
    ) -> Result<Response<pb::FetchOffsetsResponse>, Status> {
        self.check(
            &request,
            &request.get_ref().group.clone(),
            Operation::Describe,
        )?;
        let mut answer = self.coordinator.fetch_offsets(request.get_ref())?;
        // Only topics the caller may see (Kafka answers the others
        // TOPIC_AUTHORIZATION_FAILED).
        answer.offsets.retain(|o| {
            security::allowed(
                &self.broker,
                &request,
                ResourceType::Topic,
                &o.topic,
                Operation::Describe,
            )
        });
        Ok(Response::new(answer))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        security::check_cluster(&self.broker, &request, Operation::Describe)?;
        Ok(Response::new(
            self.coordinator
                .list_groups(request.get_ref().local_only)
                .await,
        ))
    }

    #[instrument(skip_all, fields(group = %request.get_ref().group))]
    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::GroupDescription>, Status> {
        self.check(
            &request,
            &request.get_ref().group.clone(),
            Operation::Describe,
        )?;
        let mut d = self.coordinator.describe(&request.get_ref().group).await?;
        // Offsets and high watermarks only of topics the caller may see,
        // as in FetchOffsets.
        let visible = |topic: &str| {
            security::allowed(
                &self.broker,
                &request,
                ResourceType::Topic,
                topic,
                Operation::Describe,
            )
        };
        d.lags.retain(|l| visible(&l.topic));
        // And so are the members' assignments, and the total of the lags
        // left.
        for m in &mut d.members {
            m.assignment.retain(|tp| visible(&tp.topic));
        }
        d.total_lag = if d.lags.iter().any(|l| l.lag < 0) {
            -1
        } else {
            d.lags.iter().map(|l| l.lag).sum()
        };
        Ok(Response::new(d))
    }

    #[instrument(skip_all, fields(group = %request.get_ref().group))]
    async fn reset_offsets(
        &self,
        request: Request<pb::ResetOffsetsRequest>,
    ) -> Result<Response<pb::ResetOffsetsResponse>, Status> {
        self.check(&request, &request.get_ref().group.clone(), Operation::Read)?;
        // As for a commit: the offsets are the topic's (a dry run shows
        // its log start, high watermark and offsets by time).
        security::check(
            &self.broker,
            &request,
            ResourceType::Topic,
            &request.get_ref().topic.clone(),
            Operation::Read,
        )?;
        Ok(Response::new(
            self.coordinator.reset(request.into_inner()).await?,
        ))
    }

    #[instrument(skip_all, fields(group = %request.get_ref().group))]
    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        self.check(
            &request,
            &request.get_ref().group.clone(),
            Operation::Delete,
        )?;
        self.coordinator.delete(&request.get_ref().group).await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }
}
