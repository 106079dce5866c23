//! The security admin calls: users, ACLs and quotas (`runnel.v1.Security`).

use runnel_proto::v1 as pb;
use runnel_proto::v1::security_client::SecurityClient;

use super::{Client, ClientError, REQUEST_TIMEOUT};

impl Client {
    fn security(&self) -> SecurityClient<super::Channel> {
        SecurityClient::new(self.bootstrap_channel())
            .max_decoding_message_size(super::MESSAGE_BYTES_MAX)
    }

    /// The error of a failed call; a transport failure also moves the
    /// client to another live broker (in the background) for its next
    /// call, as the admin calls do: else every call failed until some
    /// other call happened to fail over.
    fn failed_over(&self, status: tonic::Status) -> ClientError {
        let e = ClientError::from(status);
        // One at a time: a caller retrying fast must not pile them up.
        if !matches!(e, ClientError::Broker { .. })
            && !self
                .inner
                .failing_over
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let client = self.clone();
            tokio::spawn(async move {
                let _ = client.metadata(&[]).await;
                client
                    .inner
                    .failing_over
                    .store(false, std::sync::atomic::Ordering::Release);
            });
        }
        e
    }

    fn timed<T>(req: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(req);
        r.set_timeout(REQUEST_TIMEOUT);
        r
    }

    /// Creates a user or changes its password.
    pub async fn upsert_user(&self, name: &str, password: &str) -> Result<(), ClientError> {
        self.security()
            .upsert_user(Self::timed(pb::UpsertUserRequest {
                name: name.to_string(),
                password: password.to_string(),
            }))
            .await
            .map_err(|status| self.failed_over(status))?;
        Ok(())
    }

    /// Deletes a user.
    pub async fn delete_user(&self, name: &str) -> Result<(), ClientError> {
        self.security()
            .delete_user(Self::timed(pb::DeleteUserRequest {
                name: name.to_string(),
            }))
            .await
            .map_err(|status| self.failed_over(status))?;
        Ok(())
    }

    /// Lists users.
    pub async fn list_users(&self) -> Result<Vec<pb::UserSummary>, ClientError> {
        Ok(self
            .security()
            .list_users(Self::timed(pb::ListUsersRequest {}))
            .await
            .map_err(|status| self.failed_over(status))?
            .into_inner()
            .users)
    }

    /// Adds an ACL.
    pub async fn create_acl(&self, acl: pb::Acl) -> Result<(), ClientError> {
        self.security()
            .create_acl(Self::timed(pb::CreateAclRequest { acl: Some(acl) }))
            .await
            .map_err(|status| self.failed_over(status))?;
        Ok(())
    }

    /// Removes an ACL.
    pub async fn delete_acl(&self, acl: pb::Acl) -> Result<(), ClientError> {
        self.security()
            .delete_acl(Self::timed(pb::DeleteAclRequest { acl: Some(acl) }))
            .await
            .map_err(|status| self.failed_over(status))?;
        Ok(())
    }

    /// Lists ACLs (of one principal when `principal` is not empty).
    pub async fn list_acls(&self, principal: &str) -> Result<Vec<pb::Acl>, ClientError> {
        Ok(self
            .security()
            .list_acls(Self::timed(pb::ListAclsRequest {
                principal: principal.to_string(),
            }))
            .await
            .map_err(|status| self.failed_over(status))?
            .into_inner()
            .acls)
    }

    /// Sets the quotas of `principal` (the default when empty); `None`
    /// removes a limit.
    pub async fn set_quota(
        &self,
        principal: &str,
        produce_bytes_per_sec: Option<u64>,
        fetch_bytes_per_sec: Option<u64>,
    ) -> Result<(), ClientError> {
        self.security()
            .set_quota(Self::timed(pb::SetQuotaRequest {
                principal: principal.to_string(),
                produce_bytes_per_sec,
                fetch_bytes_per_sec,
            }))
            .await
            .map_err(|status| self.failed_over(status))?;
        Ok(())
    }

    /// Lists quotas.
    pub async fn describe_quotas(&self) -> Result<Vec<pb::QuotaEntry>, ClientError> {
        Ok(self
            .security()
            .describe_quotas(Self::timed(pb::DescribeQuotasRequest {}))
            .await
            .map_err(|status| self.failed_over(status))?
            .into_inner()
            .quotas)
    }
}
