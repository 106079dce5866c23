//! `runnel.v1.ConsumerGroups`: the contract is fixed; the coordinator is
//! not built yet (issue "Consumer groups"), so every call answers
//! UNIMPLEMENTED with error code UNSUPPORTED rather than pretending.

use runnel_proto::v1 as pb;
use runnel_proto::v1::consumer_groups_server::ConsumerGroups;
use tonic::{Request, Response, Status};

use crate::error::BrokerError;

/// Placeholder group service.
#[derive(Debug, Clone, Default)]
pub struct GroupsService;

fn unsupported<T>() -> Result<Response<T>, Status> {
    Err(BrokerError::Unsupported {
        what: "consumer groups",
    }
    .into())
}

macro_rules! unsupported_rpcs {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl ConsumerGroups for GroupsService {
            $(async fn $name(&self, _request: Request<$req>) -> Result<Response<$resp>, Status> {
                unsupported()
            })*
        }
    };
}

unsupported_rpcs! {
    find_coordinator(pb::FindCoordinatorRequest) -> pb::FindCoordinatorResponse;
    join_group(pb::JoinGroupRequest) -> pb::JoinGroupResponse;
    heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
    leave_group(pb::LeaveGroupRequest) -> pb::LeaveGroupResponse;
    commit_offsets(pb::CommitOffsetsRequest) -> pb::CommitOffsetsResponse;
    fetch_offsets(pb::FetchOffsetsRequest) -> pb::FetchOffsetsResponse;
    list_groups(pb::ListGroupsRequest) -> pb::ListGroupsResponse;
    describe_group(pb::DescribeGroupRequest) -> pb::GroupDescription;
    reset_offsets(pb::ResetOffsetsRequest) -> pb::ResetOffsetsResponse;
    delete_group(pb::DeleteGroupRequest) -> pb::DeleteGroupResponse;
}
