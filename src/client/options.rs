//! How the client reaches a secured cluster: TLS (a CA to trust, and a
//! certificate for mutual TLS) and user-name/password credentials, sent as
//! gRPC metadata on every request.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::metadata::{AsciiMetadataValue, BinaryMetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;

use super::ClientError;
use crate::security::{PASSWORD_HEADER, USER_HEADER};

/// Every connection of a [`super::Client`]: a tonic channel that adds the
/// credentials to each request.
pub type Channel = InterceptedService<tonic::transport::Channel, Credentials>;

/// TLS files of a client.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// PEM CA bundle the brokers' certificates must chain to; the
    /// system's roots are not used.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl ClientTls {
    /// The tonic configuration (files are read here).
    pub fn to_tonic(&self) -> Result<tonic::transport::ClientTlsConfig, ClientError> {
        // No roots otherwise: every handshake failed as an unknown issuer,
        // reported as a retriable transport error, retried for good.
        if self.ca_file.is_none() {
            return Err(ClientError::Invalid(
                "TLS needs the CA that signed the brokers' certificates (--tls-ca): the system's \
                 roots are not used"
                    .into(),
            ));
        }
        let cert_key = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                return Err(ClientError::Invalid(
                    "a TLS client certificate needs both --tls-cert and --tls-key".into(),
                ))
            }
        };
        crate::security::tls::client_config(self.ca_file.as_deref(), cert_key)
            .map_err(|e| ClientError::Invalid(e.to_string()))
    }
}

/// A user name and password, added to every request. `Debug` hides the
/// password.
#[derive(Clone, Default)]
pub struct Credentials {
    inner: Option<Arc<(AsciiMetadataValue, BinaryMetadataValue)>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.inner.as_ref().map(|c| c.0.clone()))
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// No credentials.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether a user name and password are set.
    pub fn is_set(&self) -> bool {
        self.inner.is_some()
    }

    /// `user` with `password`.
    pub fn new(user: &str, password: &str) -> Result<Self, ClientError> {
        let user: AsciiMetadataValue = user
            .parse()
            .map_err(|_| ClientError::Invalid("the user name must be printable ASCII".into()))?;
        let password = BinaryMetadataValue::from_bytes(password.as_bytes());
        Ok(Self {
            inner: Some(Arc::new((user, password))),
        })
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(c) = &self.inner {
            let md = request.metadata_mut();
            md.insert(USER_HEADER, c.0.clone());
            md.insert_bin(PASSWORD_HEADER, c.1.clone());
        }
        Ok(request)
    }
}

/// TLS and credentials of a client; the default is plaintext and
/// anonymous.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// TLS, or plaintext when `None`.
    pub tls: Option<ClientTls>,
    /// Sent with every request.
    pub credentials: Credentials,
}

impl ClientOptions {
    /// Wraps a transport channel so that requests carry the credentials.
    pub(crate) fn wrap(&self, channel: tonic::transport::Channel) -> Channel {
        InterceptedService::new(channel, self.credentials.clone())
    }
}
