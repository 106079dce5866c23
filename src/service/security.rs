//! `runnel.v1.Security`: users, ACLs and quotas, as metadata commands.

use std::sync::Arc;

use runnel_controller::security::{
    Acl, Operation, PatternType, Permission, Quota, ResourceType, DEFAULT_QUOTA_KEY,
};
use runnel_controller::MetadataCommand;
use runnel_proto::v1 as pb;
use runnel_proto::v1::security_server::Security;
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::security::{check_cluster, password};

/// Serves the security admin calls.
#[derive(Debug, Clone)]
pub struct SecurityService {
    broker: Arc<Broker>,
}

impl SecurityService {
    /// Wraps a broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }

    async fn submit(&self, cmd: MetadataCommand) -> Result<(), Status> {
        self.broker
            .metadata()
            .submit(cmd)
            .await
            .map_err(BrokerError::from)?;
        Ok(())
    }
}

fn invalid(reason: impl Into<String>) -> Status {
    BrokerError::InvalidRequest {
        reason: reason.into(),
    }
    .into()
}

/// The ACL of a request, refusing unset enums.
#[allow(clippy::result_large_err)]
pub fn acl_from_pb(acl: Option<pb::Acl>) -> Result<Acl, Status> {
    let acl = acl.ok_or_else(|| invalid("missing acl"))?;
    let resource_type = match pb::AclResourceType::try_from(acl.resource_type) {
        Ok(pb::AclResourceType::Cluster) => ResourceType::Cluster,
        Ok(pb::AclResourceType::Topic) => ResourceType::Topic,
        Ok(pb::AclResourceType::Group) => ResourceType::Group,
        _ => return Err(invalid("acl.resource_type must be cluster, topic or group")),
    };
    let pattern = match pb::AclPatternType::try_from(acl.pattern_type) {
        Ok(pb::AclPatternType::Prefixed) => PatternType::Prefixed,
        Ok(_) => PatternType::Literal,
        Err(_) => return Err(invalid("unknown acl.pattern_type")),
    };
    let operation = match pb::AclOperation::try_from(acl.operation) {
        Ok(pb::AclOperation::Read) => Operation::Read,
        Ok(pb::AclOperation::Write) => Operation::Write,
        Ok(pb::AclOperation::Create) => Operation::Create,
        Ok(pb::AclOperation::Delete) => Operation::Delete,
        Ok(pb::AclOperation::Alter) => Operation::Alter,
        Ok(pb::AclOperation::Describe) => Operation::Describe,
        _ => return Err(invalid("acl.operation is not set")),
    };
    let permission = match pb::AclPermission::try_from(acl.permission) {
        Ok(pb::AclPermission::Allow) => Permission::Allow,
        Ok(pb::AclPermission::Deny) => Permission::Deny,
        _ => return Err(invalid("acl.permission must be allow or deny")),
    };
    if acl.principal.is_empty() {
        return Err(invalid("acl.principal is empty"));
    }
    let name = if resource_type == ResourceType::Cluster {
        String::new()
    } else {
        acl.resource_name
    };
    Ok(Acl {
        principal: acl.principal,
        resource_type,
        name,
        pattern: if resource_type == ResourceType::Cluster {
            PatternType::Literal
        } else {
            pattern
        },
        operation,
        permission,
    })
}

/// The wire form of an ACL.
pub fn acl_to_pb(acl: &Acl) -> pb::Acl {
    pb::Acl {
        principal: acl.principal.clone(),
        resource_type: match acl.resource_type {
            ResourceType::Cluster => pb::AclResourceType::Cluster,
            ResourceType::Topic => pb::AclResourceType::Topic,
            ResourceType::Group => pb::AclResourceType::Group,
        } as i32,
        resource_name: acl.name.clone(),
        pattern_type: match acl.pattern {
            PatternType::Literal => pb::AclPatternType::Literal,
            PatternType::Prefixed => pb::AclPatternType::Prefixed,
        } as i32,
        operation: match acl.operation {
            Operation::Read => pb::AclOperation::Read,
            Operation::Write => pb::AclOperation::Write,
            Operation::Create => pb::AclOperation::Create,
            Operation::Delete => pb::AclOperation::Delete,
            Operation::Alter => pb::AclOperation::Alter,
            Operation::Describe => pb::AclOperation::Describe,
        } as i32,
        permission: match acl.permission {
            Permission::Allow => pb::AclPermission::Allow,
            Permission::Deny => pb::AclPermission::Deny,
        } as i32,
    }
}

#[tonic::async_trait]
impl Security for SecurityService {
    async fn upsert_user(
        &self,
        request: Request<pb::UpsertUserRequest>,
    ) -> Result<Response<pb::UpsertUserResponse>, Status> {
        check_cluster(&self.broker, &request, Operation::Alter)?;
        let req = request.into_inner();
        if req.password.is_empty() {
            return Err(invalid("the password is empty"));
        }
        // A user logs in by a header value, which carries visible ASCII
        // only (clients and this server refuse the rest): a user named
        // otherwise could be created but never log in. Checked here, not
        // by the metadata (older entries must apply as they did).
        if !req.name.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(invalid(format!(
                "user name {:?}: only visible ASCII characters (a user logs in by a header that carries no others)",
                req.name
            )));
        }
        // The password the user has already: nothing to change. A new
        // salt would change the stored hash, and with it end every stream
        // the user has open (re-running provisioning did that).
        let stored = self
            .broker
            .metadata()
            .current()
            .users
            .get(&req.name)
            .cloned();
        // PBKDF2 takes milliseconds: off the runtime threads. Always
        // submitted (this broker's copy may lag: a delete, or another
        // password, not applied here yet), but with the stored salt when
        // the password is unchanged, so the credential is the same bytes.
        let credential = tokio::task::spawn_blocking(move || match stored {
            Some(cred)
                if cred.iterations >= password::ITERATIONS
                    && password::verify(&cred, req.password.as_bytes()) =>
            {
                password::hash_with_salt(&req.password, cred.salt)
            }
            _ => password::hash(&req.password),
        })
        .await
        .map_err(|_| Status::internal("hashing failed"))?;
        self.submit(MetadataCommand::UpsertUser {
            name: req.name,
            credential,
        })
        .await?;
        Ok(Response::new(pb::UpsertUserResponse {}))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        check_cluster(&self.broker, &request, Operation::Alter)?;
        self.submit(MetadataCommand::DeleteUser {
            name: request.into_inner().name,
        })
        .await?;
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        check_cluster(&self.broker, &request, Operation::Describe)?;
        let state = self.broker.metadata().current();
        let users = state
            .users
            .iter()
            .map(|(name, c)| pb::UserSummary {
                name: name.clone(),
                mechanism: c.mechanism.clone(),
                iterations: c.iterations,
            })
            .collect();
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn create_acl(
        &self,
        request: Request<pb::CreateAclRequest>,
    ) -> Result<Response<pb::CreateAclResponse>, Status> {
        check_cluster(&self.broker, &request, Operation::Alter)?;
        let acl = acl_from_pb(request.into_inner().acl)?;
        self.submit(MetadataCommand::CreateAcl { acl }).await?;
        Ok(Response::new(pb::CreateAclResponse {}))
    }

    async fn delete_acl(
        &self,
        request: Request<pb::DeleteAclRequest>,
    ) -> Result<Response<pb::DeleteAclResponse>, Status> {
        check_cluster(&self.broker, &request, Operation::Alter)?;
        let acl = acl_from_pb(request.into_inner().acl)?;
        self.submit(MetadataCommand::DeleteAcl { acl }).await?;
        Ok(Response::new(pb::DeleteAclResponse {}))
    }

    async fn list_acls(
        &self,
        request: Request<pb::ListAclsRequest>,
    ) -> Result<Response<pb::ListAclsResponse>, Status> {
        check_cluster(&self.broker, &request, Operation::Describe)?;
        let principal = request.into_inner().principal;
        let state = self.broker.metadata().current();
        let acls = state
            .acls
            .iter()
            .filter(|a| principal.is_empty() || a.principal == principal)
            .map(acl_to_pb)
            .collect();
        Ok(Response::new(pb::ListAclsResponse { acls }))
    }

    async fn set_quota(
        &self,
        request: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::SetQuotaResponse>, Status> {
        check_cluster(&self.broker, &request, Operation::Alter)?;
        let req = request.into_inner();
        let principal = if req.principal.is_empty() {
            DEFAULT_QUOTA_KEY.to_string()
        } else {
            req.principal
        };
        self.submit(MetadataCommand::SetQuota {
            principal,
            quota: Quota {
                produce_bytes_per_sec: req.produce_bytes_per_sec,
                fetch_bytes_per_sec: req.fetch_bytes_per_sec,
            },
        })
        .await?;
        Ok(Response::new(pb::SetQuotaResponse {}))
    }

    async fn describe_quotas(
        &self,
        request: Request<pb::DescribeQuotasRequest>,
    ) -> Result<Response<pb::DescribeQuotasResponse>, Status> {
        check_cluster(&self.broker, &request, Operation::Describe)?;
        let state = self.broker.metadata().current();
        let quotas = state
            .quotas
            .iter()
            .map(|(p, q)| pb::QuotaEntry {
                principal: if p == DEFAULT_QUOTA_KEY {
                    String::new()
                } else {
                    p.clone()
                },
                produce_bytes_per_sec: q.produce_bytes_per_sec,
                fetch_bytes_per_sec: q.fetch_bytes_per_sec,
            })
            .collect();
        Ok(Response::new(pb::DescribeQuotasResponse { quotas }))
    }
}
