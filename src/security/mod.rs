//! Security: who is calling (authentication), what they may do
//! (authorisation with ACLs) and how fast (quotas).
//!
//! Where it sits on the data path: in front of the services. Every
//! request passes [`AuthLayer`], which finds the caller's [`Principal`]
//! (a verified username/password from gRPC metadata, else the subject CN
//! of a verified client certificate, else `ANONYMOUS`) and refuses
//! unauthenticated callers when authentication is on. The services then
//! ask [`check`] before acting (PERMISSION_DENIED unless an ACL allows
//! it) and delay answers by [`throttle`] when a quota is exceeded.
//!
//! - [`tls`]: listener TLS with file reload, client TLS, the CN of a cert.
//! - [`password`]: salted PBKDF2-HMAC-SHA256 password hashes.
//! - [`quota`]: the Kafka-style throttle clocks.

pub mod password;
pub mod quota;
pub mod slots;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use runnel_controller::security::{authorize, Operation, ResourceType, DEFAULT_QUOTA_KEY};
use runnel_controller::MetadataStore;
use runnel_proto::v1::ErrorCode;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

use crate::broker::Broker;
use crate::config::{SecuritySection, ServerConfig};

pub use quota::Direction;

/// gRPC metadata key carrying the user name.
pub const USER_HEADER: &str = "runnel-user";
/// gRPC metadata key carrying the password (binary metadata, so any
/// bytes are allowed; only ever sent over TLS).
pub const PASSWORD_HEADER: &str = "runnel-password-bin";
/// The principal of a caller that did not identify itself.
pub const ANONYMOUS: &str = "ANONYMOUS";

/// The single answer to any wrong user name or password.
const AUTH_FAILED: &str = "authentication failed";

/// Who made a request; set by [`AuthLayer`] in the request extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal(pub Arc<str>);

impl Principal {
    /// The anonymous principal.
    pub fn anonymous() -> Self {
        Principal(Arc::from(ANONYMOUS))
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// A request authenticated by password: the stored hash its password
/// matched. Set by [`AuthLayer`] beside the [`Principal`]; a stream keeps
/// it and checks it for each item ([`check_login`]), so that removing the
/// user, or changing its password, ends the streams it has open.
#[derive(Clone, Debug)]
pub struct Login {
    user: Arc<str>,
    hash: Vec<u8>,
}

/// The password login a request was authenticated by, if any.
pub fn login_of<T>(request: &tonic::Request<T>) -> Option<Login> {
    request.extensions().get::<Login>().cloned()
}

/// Refuses with UNAUTHENTICATED when `login`'s user is gone or its
/// password changed since the login (always passes without one: a
/// certificate, or no authentication).
#[allow(clippy::result_large_err)]
pub fn check_login(broker: &Broker, login: Option<&Login>) -> Result<(), Status> {
    let Some(login) = login else {
        return Ok(());
    };
    let state = broker.metadata().current();
    match state.users.get(&*login.user) {
        Some(cred) if cred.hash == login.hash => Ok(()),
        _ => Err(unauthenticated(
            "the user was removed or its password changed since this stream opened: log in again",
        )),
    }
}

/// A status with the `runnel-error-code` trailer, like broker errors.
fn status(code: tonic::Code, error: ErrorCode, message: impl Into<String>) -> Status {
    let mut s = Status::new(code, message);
    if let Ok(v) = error.as_str_name().parse() {
        s.metadata_mut().insert(crate::error::ERROR_CODE_HEADER, v);
    }
    s
}

/// UNAUTHENTICATED.
fn unauthenticated(message: &str) -> Status {
    status(
        tonic::Code::Unauthenticated,
        ErrorCode::AuthenticationFailed,
        message,
    )
}

/// PERMISSION_DENIED.
pub fn permission_denied(message: String) -> Status {
    status(
        tonic::Code::PermissionDenied,
        ErrorCode::AuthorizationFailed,
        message,
    )
}

/// Failed attempts of one (peer address, user name).
#[derive(Debug)]
struct Failures {
    count: u32,
    since: Instant,
}

/// Failed attempts are counted per (peer address, user name).
type FailureKey = (Option<IpAddr>, String);

/// A password verified before: SHA-256 of salt and password, and the
/// stored hash it matched.
type Verified = (Vec<u8>, Vec<u8>);

/// Most failure records kept; expired ones are dropped first.
const FAILURE_RECORDS_MAX: usize = 10_000;

/// The broker's security state: settings, the metadata that holds users,
/// ACLs and quotas, failure counters and throttle clocks.
pub struct Security {
    settings: SecuritySection,
    super_users: HashSet<String>,
    broker_principals: HashSet<String>,
    metadata: Arc<dyn MetadataStore>,
    failures: Mutex<HashMap<FailureKey, Failures>>,
    /// Passwords verified before, by user: SHA-256 of salt and password,
    /// and the stored hash it was verified against (so a password change
    /// invalidates the entry). Spares PBKDF2 on every request.
    verified: Mutex<HashMap<String, Verified>>,
    /// Room for [`VERIFICATIONS_MAX`] password verifications at once.
    verifications: Arc<tokio::sync::Semaphore>,
    /// Verifications waiting or running, by peer address.
    verifying: slots::PeerSlots,
    throttle: quota::Throttle,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("settings", &self.settings)
            .finish()
    }
}

/// The client's address (and port: one per TCP connection) of a request
/// served over TCP, with or without TLS; `None` for other transports.
pub fn peer_addr(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|t| t.get_ref().remote_addr())
        .or_else(|| {
            extensions
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        })
}

impl Security {
    /// Security with `settings` over the metadata in `metadata`.
    pub fn new(settings: SecuritySection, metadata: Arc<dyn MetadataStore>) -> Self {
        Self {
            super_users: settings.super_users.iter().cloned().collect(),
            broker_principals: settings.broker_principals.iter().cloned().collect(),
            settings,
            metadata,
            failures: Mutex::default(),
            verified: Mutex::default(),
            verifications: Arc::new(tokio::sync::Semaphore::new(VERIFICATIONS_MAX)),
            verifying: slots::PeerSlots::new(VERIFICATIONS_PER_PEER_MAX, VERIFICATIONS_QUEUED_MAX),
            throttle: quota::Throttle::default(),
        }
    }

    /// A place in the queue of password verifications for `peer`, or
    /// `None` when that address already has [`VERIFICATIONS_PER_PEER_MAX`]
    /// waiting or running, or all addresses [`VERIFICATIONS_QUEUED_MAX`]:
    /// a flood of unknown user names (each a miss of the cache) from one
    /// address cannot queue without bound ahead of other clients.
    fn queue_verification(&self, peer: Option<IpAddr>) -> Option<slots::Slot> {
        self.verifying.try_take(peer)
    }

    /// Finds the principal of one HTTP/2 request to `path`. A password
    /// not verified before is left to [`Authenticated::Verify`], to be
    /// checked off the runtime's threads.
    #[allow(clippy::result_large_err)]
    pub fn authenticate(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Authenticated {
        match self.authenticate_inner(path, headers, extensions) {
            Ok(a) => a,
            Err(status) => Authenticated::Done(Err(status)),
        }
    }

    #[allow(clippy::result_large_err)]
    fn authenticate_inner(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Authenticated, Status> {
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let peer = peer_addr(extensions).map(|a| a.ip());
        let cert_principal = tls
            .and_then(|t| t.peer_certs())
            .and_then(|certs| certs.first().and_then(|c| tls::principal_of_cert(c)));
        if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
            return Ok(Authenticated::Done(Ok(Principal::anonymous())));
        }
        if path.starts_with("/runnel.v1.internal.") {
            // Broker-to-broker services: only the brokers' own identities
            // when those are configured.
            if !self.broker_principals.is_empty()
                && !cert_principal
                    .as_ref()
                    .is_some_and(|p| self.broker_principals.contains(p))
            {
                return Err(permission_denied(
                    "internal services accept only broker certificates".into(),
                ));
            }
            return Ok(Authenticated::Done(Ok(
                cert_principal.map_or_else(Principal::anonymous, |p| Principal(p.into()))
            )));
        }
        if self.settings.authentication {
            let metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
            if let Some(user) = metadata.get(USER_HEADER) {
                let user = user
                    .to_str()
                    .map_err(|_| unauthenticated(AUTH_FAILED))?
                    .to_string();
                if user.is_empty() || user.len() > USER_NAME_BYTES_MAX {
                    // No such user can exist: refused without a
                    // verification or a failure record (whose keys, up to
                    // a header's 16 KiB each, filled memory; an empty name
                    // is the source-wide record's key, which it counted
                    // twice toward the lockout of every user there).
                    return Err(unauthenticated(AUTH_FAILED));
                }
                let password = metadata
                    .get_bin(PASSWORD_HEADER)
                    .and_then(|p| p.to_bytes().ok())
                    .unwrap_or_default();
                if let Some(done) = self.check_password_cached(peer, &user, &password) {
                    return Ok(Authenticated::Done(done));
                }
                return Ok(Authenticated::Verify {
                    peer,
                    user,
                    password: password.to_vec(),
                });
            }
        }
        Ok(Authenticated::Done(match cert_principal {
            Some(p) => Ok(Principal(p.into())),
            None if self.settings.authentication => Err(unauthenticated(
                "authentication required: send a user name and password, or a client certificate",
            )),
            None => Ok(Principal::anonymous()),
        }))
    }

    /// The answer for a password without its slow verification: a
    /// lockout, or a password verified before. `None` when it must be
    /// verified ([`Security::check_password`]).
    fn check_password_cached(
        &self,
        peer: Option<IpAddr>,
        user: &str,
        password: &[u8],
    ) -> Option<Result<Principal, Status>> {
        // Not the source-wide lockout: a client whose password was
        // verified before keeps working while another at its address (a
        // NAT, a shared host) fails over and over.
        let key = (peer.map(source_of), user.to_string());
        if let Err(status) = self.check_lockout(&mut self.lock_failures(), &key, Instant::now()) {
            return Some(Err(status));
        }
        let state = self.metadata.current();
        let cred = state.users.get(user)?;
        if !self.verified_before(user, cred, &password_digest(&cred.salt, password)) {
            return None;
        }
        self.lock_failures().remove(&key);
        Some(Ok(Principal(user.into())))
    }

    /// The login to record for `user`, whose `password` was just
    /// accepted: the stored hash, if the password is the one verified
    /// against it (the `verified` cache, which every accepted password
    /// is in). A password changed between the check and this read gives a
    /// login that matches no stored hash, so the stream it opens ends at
    /// its first check instead of running on under the new credential.
    fn login(&self, user: &str, password: &[u8]) -> Login {
        let state = self.metadata.current();
        let hash = state
            .users
            .get(user)
            .filter(|cred| self.verified_before(user, cred, &password_digest(&cred.salt, password)))
            .map(|cred| cred.hash.clone())
            .unwrap_or_default();
        Login {
            user: Arc::from(user),
            hash,
        }
    }

    fn lock_failures(&self) -> std::sync::MutexGuard<'_, HashMap<FailureKey, Failures>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses `key` while it has made too many failed attempts within
    /// the window; forgets an expired record.
    #[allow(clippy::result_large_err)]
    fn check_lockout(
        &self,
        failures: &mut HashMap<FailureKey, Failures>,
        key: &FailureKey,
        now: Instant,
    ) -> Result<(), Status> {
        self.check_lockout_max(failures, key, now, self.settings.auth_failures_max)
    }

    /// [`Security::check_lockout`] with `max` failures allowed.
    #[allow(clippy::result_large_err)]
    fn check_lockout_max(
        &self,
        failures: &mut HashMap<FailureKey, Failures>,
        key: &FailureKey,
        now: Instant,
        max: u32,
    ) -> Result<(), Status> {
        let window = Duration::from_millis(self.settings.auth_failure_window_ms);
        if let Some(f) = failures.get(key) {
            if now.duration_since(f.since) >= window {
                failures.remove(key);
            } else if f.count >= max {
                return Err(locked_out());
            }
        }
        Ok(())
    }

    /// Failed password checks one source may make within the window,
    /// over every user name: without, a source could try other names (or
    /// made-up ones, flooding the records until its own were dropped)
    /// and keep guessing each user's password at several times the rate
    /// the per-user count allows.
    fn source_failures_max(&self) -> u32 {
        self.settings
            .auth_failures_max
            .saturating_mul(SOURCE_FAILURES_FACTOR)
    }

    /// Whether `user`'s password with this digest was verified against
    /// its current credential before.
    fn verified_before(
        &self,
        user: &str,
        cred: &runnel_controller::security::UserCredential,
        digest: &[u8],
    ) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .is_some_and(|(d, h)| d == digest && *h == cred.hash)
    }

    #[allow(clippy::result_large_err)]
    fn check_password(
        &self,
        peer: Option<IpAddr>,
        user: &str,
        password: &[u8],
    ) -> Result<Principal, Status> {
        let window = Duration::from_millis(self.settings.auth_failure_window_ms);
        let source = peer.map(source_of);
        let key = (source, user.to_string());
        // Every user name from this source (user names are not empty).
        let source_key = (source, String::new());
        let now = Instant::now();
        {
            let mut failures = self.lock_failures();
            self.check_lockout(&mut failures, &key, now)?;
            self.check_lockout_max(&mut failures, &source_key, now, self.source_failures_max())?;
            if failures.len() >= FAILURE_RECORDS_MAX {
                bound_failures(&mut failures, now, window, self.settings.auth_failures_max);
            }
            // The attempt counts as failed until it succeeds, under the
            // same lock as the check: concurrent guesses cannot all pass
            // the check before any of them is counted.
            for k in [&key, &source_key] {
                failures
                    .entry(k.clone())
                    .or_insert(Failures {
                        count: 0,
                        since: now,
                    })
                    .count += 1;
            }
        }
        let state = self.metadata.current();
        let ok = match state.users.get(user) {
            Some(cred) => {
                let digest = password_digest(&cred.salt, password);
                // Another request may have verified it meanwhile.
                self.verified_before(user, cred, &digest) || {
                    let ok = password::verify(cred, password);
                    if ok {
                        let mut v = self.verified.lock().unwrap_or_else(|e| e.into_inner());
                        if v.len() >= FAILURE_RECORDS_MAX {
                            v.clear();
                        }
                        v.insert(user.to_string(), (digest, cred.hash.clone()));
                    }
                    ok
                }
            }
            None => {
                password::verify_dummy(password);
                false
            }
        };
        let mut failures = self.lock_failures();
        if ok {
            failures.remove(&key);
            // This attempt was no failure of the source's either (its
            // earlier ones stay counted: a login between guesses must not
            // clear them).
            if let Some(f) = failures.get_mut(&source_key) {
                f.count = f.count.saturating_sub(1);
            }
            return Ok(Principal(user.into()));
        }
        let count = failures.get(&key).map_or(0, |f| f.count);
        tracing::info!(user, peer = ?peer, failures = count, "authentication failed");
        Err(unauthenticated(AUTH_FAILED))
    }

    /// Whether no ACL applies to `principal`: authorization off, or a
    /// super user or broker.
    fn bypasses_acls(&self, principal: &Principal) -> bool {
        !self.settings.authorization
            || self.super_users.contains(principal.name())
            || self.broker_principals.contains(principal.name())
    }

    /// Whether `principal` may do `operation` on the resource.
    pub fn allowed(
        &self,
        principal: &Principal,
        resource_type: ResourceType,
        name: &str,
        operation: Operation,
    ) -> bool {
        if self.bypasses_acls(principal) {
            return true;
        }
        let state = self.metadata.current();
        authorize(
            &state.acls,
            principal.name(),
            resource_type,
            name,
            operation,
        )
    }

    /// Whether `principal` may do `operation` on some resource of
    /// `resource_type` ([`runnel_controller::security::authorize_any`]).
    pub fn allowed_on_any(
        &self,
        principal: &Principal,
        resource_type: ResourceType,
        operation: Operation,
    ) -> bool {
        if self.bypasses_acls(principal) {
            return true;
        }
        let state = self.metadata.current();
        runnel_controller::security::authorize_any(
            &state.acls,
            principal.name(),
            resource_type,
            operation,
        )
    }

    /// The byte rate `principal` may move in `direction`, if limited.
    fn quota_rate(&self, principal: &Principal, direction: Direction) -> Option<u64> {
        let state = self.metadata.current();
        if state.quotas.is_empty() {
            return None;
        }
        let pick = |q: &runnel_controller::security::Quota| match direction {
            Direction::Produce => q.produce_bytes_per_sec,
            Direction::Fetch => q.fetch_bytes_per_sec,
        };
        state
            .quotas
            .get(principal.name())
            .and_then(pick)
            .or_else(|| state.quotas.get(DEFAULT_QUOTA_KEY).and_then(pick))
    }

    /// How long a stream of `principal` waits before taking in more
    /// ([`quota::Throttle::admission`]; zero without a quota).
    pub fn admission(&self, principal: &Principal, direction: Direction) -> Duration {
        match self.quota_rate(principal, direction) {
            Some(_) => self
                .throttle
                .admission(principal.name(), direction, Instant::now()),
            None => Duration::ZERO,
        }
    }

    /// What `principal` owes in `direction` ([`quota::Throttle::owed`];
    /// zero without a quota).
    pub fn owed(&self, principal: &Principal, direction: Direction) -> Duration {
        match self.quota_rate(principal, direction) {
            Some(_) => self
                .throttle
                .owed(principal.name(), direction, Instant::now()),
            None => Duration::ZERO,
        }
    }

    /// How long to hold back the answer to `bytes` moved by `principal`
    /// (zero without a quota).
    pub fn throttle(&self, principal: &Principal, direction: Direction, bytes: u64) -> Duration {
        match self.quota_rate(principal, direction) {
            Some(rate) => {
                self.throttle
                    .record(principal.name(), direction, bytes, rate, Instant::now())
            }
            None => Duration::ZERO,
        }
    }
}

/// The principal [`AuthLayer`] found for a request (anonymous without).
pub fn principal_of<T>(request: &tonic::Request<T>) -> Principal {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or_else(Principal::anonymous)
}

/// [`check`] for the cluster resource (admin, user, ACL and quota calls).
pub fn check_cluster<T>(
    broker: &Broker,
    request: &tonic::Request<T>,
    operation: Operation,
) -> Result<(), Status> {
    check(broker, request, ResourceType::Cluster, "", operation)
}

/// Refuses with PERMISSION_DENIED unless the caller may do `operation`
/// on the resource (always allowed when the broker has no security).
#[allow(clippy::result_large_err)]
pub fn check<T>(
    broker: &Broker,
    request: &tonic::Request<T>,
    resource_type: ResourceType,
    name: &str,
    operation: Operation,
) -> Result<(), Status> {
    check_principal(
        broker,
        &principal_of(request),
        resource_type,
        name,
        operation,
    )
}

/// [`check`] for a principal found earlier (a stream's, checked again
/// for each item).
pub fn check_principal(
    broker: &Broker,
    principal: &Principal,
    resource_type: ResourceType,
    name: &str,
    operation: Operation,
) -> Result<(), Status> {
    let Some(security) = broker.security() else {
        return Ok(());
    };
    if security.allowed(principal, resource_type, name, operation) {
        return Ok(());
    }
    let what = match resource_type {
        ResourceType::Cluster => "the cluster".to_string(),
        ResourceType::Topic => format!("topic '{name}'"),
        ResourceType::Group => format!("group '{name}'"),
    };
    Err(permission_denied(format!(
        "principal '{}' may not {operation:?} {what}",
        principal.name()
    )))
}

/// Whether the caller may do `operation` (for filtering lists).
pub fn allowed<T>(
    broker: &Broker,
    request: &tonic::Request<T>,
    resource_type: ResourceType,
    name: &str,
    operation: Operation,
) -> bool {
    check(broker, request, resource_type, name, operation).is_ok()
}

/// The quota delay for `bytes` moved by `principal` on `broker`.
pub fn throttle(
    broker: &Broker,
    principal: &Principal,
    direction: Direction,
    bytes: u64,
) -> Duration {
    broker
        .security()
        .map_or(Duration::ZERO, |s| s.throttle(principal, direction, bytes))
}

/// A quota charge for a unary produce, whose append waits for it:
/// [`QuotaCharge::hold`] waits, and a charge dropped
/// before that wait ends (the call's deadline passed, or its client
/// went) is refunded, since nothing was moved. Kept, each retry of a
/// client whose deadline is shorter than its hold would be charged again
/// and held longer, and none would ever be served.
#[must_use = "a charge is refunded when dropped before `hold` ends"]
pub struct QuotaCharge {
    refund: Option<(Arc<Security>, Principal, Direction, u64, u64)>,
    until: Option<tokio::time::Instant>,
}

impl QuotaCharge {
    /// Waits out the quota delay; from then on the charge stands.
    pub async fn hold(mut self) {
        hold_until(self.until).await;
        self.refund = None;
    }
}

impl Drop for QuotaCharge {
    fn drop(&mut self) {
        if let Some((security, principal, direction, bytes, rate)) = self.refund.take() {
            security
                .throttle
                .refund(principal.name(), direction, bytes, rate, Instant::now());
        }
    }
}

/// Charges `bytes` moved by `principal` on `broker` to its quota.
pub fn charge(
    broker: &Broker,
    principal: &Principal,
    direction: Direction,
    bytes: u64,
) -> QuotaCharge {
    let Some(security) = broker.security() else {
        return QuotaCharge {
            refund: None,
            until: None,
        };
    };
    let Some(rate) = security.quota_rate(principal, direction) else {
        return QuotaCharge {
            refund: None,
            until: None,
        };
    };
    let delay = security
        .throttle
        .record(principal.name(), direction, bytes, rate, Instant::now());
    QuotaCharge {
        // Only a held charge can be dropped before its wait ends.
        refund: (!delay.is_zero()).then(|| {
            (
                Arc::clone(security),
                principal.clone(),
                direction,
                bytes,
                rate,
            )
        }),
        until: answer_deadline(delay),
    }
}

/// Until when `principal` on `broker` owes for what it moved before, if
/// it does ([`Security::owed`]).
pub fn owed_until(
    broker: &Broker,
    principal: &Principal,
    direction: Direction,
) -> Option<tokio::time::Instant> {
    let owed = broker
        .security()
        .map_or(Duration::ZERO, |s| s.owed(principal, direction));
    answer_deadline(owed)
}

/// When a stream of `principal` on `broker` may take in more (its next
/// request or chunk), if it must wait.
pub fn admission_at(
    broker: &Broker,
    principal: &Principal,
    direction: Direction,
) -> Option<tokio::time::Instant> {
    let wait = broker
        .security()
        .map_or(Duration::ZERO, |s| s.admission(principal, direction));
    answer_deadline(wait)
}

/// The most one fetch of `principal` may ask for: what its fetch quota
/// allows in [`quota::THROTTLE_MAX`] (at least one byte; a fetch always
/// answers one batch), or `usize::MAX` without a quota. Without the cut,
/// an answer worth more than that put the principal's clock more than
/// the longest hold ahead, and it read faster than its rate.
pub fn fetch_bytes_cap(broker: &Broker, principal: &Principal) -> usize {
    broker
        .security()
        .and_then(|s| s.quota_rate(principal, Direction::Fetch))
        .map_or(usize::MAX, |rate| {
            let cap = rate.saturating_mul(quota::THROTTLE_MAX.as_secs()).max(1);
            usize::try_from(cap).unwrap_or(usize::MAX)
        })
}

/// Holds an answer until `deadline` (a quota delay, Kafka's throttle).
/// Without a deadline it returns at once. Tokio rounds every deadline up
/// to its timer's next millisecond tick, so even a zero sleep held each
/// answer for up to a millisecond; on an in-order produce stream that
/// cost one tick per window of in-flight batches.
pub async fn hold_until(deadline: Option<tokio::time::Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// When an answer delayed by `delay` may leave: `None` = now.
pub fn answer_deadline(delay: Duration) -> Option<tokio::time::Instant> {
    (!delay.is_zero()).then(|| tokio::time::Instant::now() + delay)
}

/// TLS for this broker's outgoing internal calls (replication, Raft,
/// heartbeats): `[internal_tls]` when the cluster runs internal
/// listeners, else `[tls]`; `None` = plaintext.
pub fn internal_client_tls(
    config: &ServerConfig,
) -> Result<Option<tonic::transport::ClientTlsConfig>, tls::TlsError> {
    if config.internal_listen.is_some() {
        return config
            .internal_tls
            .as_ref()
            .map(|t| tls::client_config(Some(&t.ca_file), Some((&t.cert_file, &t.key_file))))
            .transpose();
    }
    config
        .tls
        .as_ref()
        .map(|t| tls::client_config(t.ca_file.as_deref(), Some((&t.cert_file, &t.key_file))))
        .transpose()
}

/// The files behind [`internal_client_tls`], for the controller's Raft
/// and heartbeat channels (which reload them when they change).
pub fn internal_client_tls_files(
    config: &ServerConfig,
) -> Option<runnel_controller::raft::InternalTlsFiles> {
    if config.internal_listen.is_some() {
        return config
            .internal_tls
            .as_ref()
            .map(|t| runnel_controller::raft::InternalTlsFiles {
                ca_file: Some(t.ca_file.clone()),
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
            });
    }
    config
        .tls
        .as_ref()
        .map(|t| runnel_controller::raft::InternalTlsFiles {
            ca_file: t.ca_file.clone(),
            cert_file: t.cert_file.clone(),
            key_file: t.key_file.clone(),
        })
}

/// A channel to another broker's client port (group listings, offset
/// lookups), over TLS with this broker's certificate when the client
/// listeners speak TLS, connected when first used (concurrent first
/// calls share one connection attempt). `None` when the address or the
/// TLS files are unusable.
pub fn peer_channel(config: &ServerConfig, addr: &str) -> Option<tonic::transport::Channel> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // A peer that does not accept fails the call within its caller's own
    // bound, not the OS's connect timeout (minutes, when packets vanish).
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .ok()?
        .connect_timeout(std::time::Duration::from_secs(2));
    if let Some(t) = &config.tls {
        let tls = tls::client_config(t.ca_file.as_deref(), Some((&t.cert_file, &t.key_file)))
            .map_err(|error| tracing::warn!(%error, "cannot load TLS files for a peer call"))
            .ok()?;
        endpoint = endpoint.tls_config(tls).ok()?;
    }
    Some(endpoint.connect_lazy())
}

/// Logs a failed call from this broker to another's client listener (a
/// group list, a partition's offsets for describe, a group's lags): a
/// refusal by the peer's authentication or ACLs is a configuration to
/// fix, said at warn; the answer is left out either way.
pub fn peer_call_failed(addr: &str, call: &str, status: &tonic::Status) {
    if matches!(
        status.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    ) {
        tracing::warn!(peer = addr, call, error = %status.message(), "a broker's call to another's client listener was refused: calls between brokers there present the [tls] certificate, which the peer must ask for (tls.client_auth, tls.ca_file) and whose name must be in security.broker_principals");
    } else {
        tracing::debug!(peer = addr, call, error = %status, "a call to another broker failed");
    }
}

/// The client listener's TLS, when configured.
pub fn client_listener_tls(
    config: &ServerConfig,
) -> Result<Option<Arc<tls::ReloadingTls>>, tls::TlsError> {
    config
        .tls
        .as_ref()
        .map(|t| {
            tls::ReloadingTls::new(tls::TlsFiles {
                cert: t.cert_file.clone(),
                key: t.key_file.clone(),
                ca: t.ca_file.clone(),
                client_auth: t.client_auth,
            })
            .map(Arc::new)
        })
        .transpose()
}

/// The internal listener's TLS, when configured: client certificates
/// from `ca_file` are required.
pub fn internal_listener_tls(
    config: &ServerConfig,
) -> Result<Option<Arc<tls::ReloadingTls>>, tls::TlsError> {
    config
        .internal_tls
        .as_ref()
        .map(|t| {
            tls::ReloadingTls::new(tls::TlsFiles {
                cert: t.cert_file.clone(),
                key: t.key_file.clone(),
                ca: Some(t.ca_file.clone()),
                client_auth: tls::ClientAuth::Required,
            })
            .map(Arc::new)
        })
        .transpose()
}

/// What [`Security::authenticate`] found.
pub enum Authenticated {
    /// The principal, or why the request is refused.
    Done(Result<Principal, Status>),
    /// A password not verified before: [`Security::check_password`]
    /// decides, on the blocking pool (PBKDF2 takes milliseconds, and a
    /// caller trying names would otherwise stall the runtime's threads).
    Verify {
        peer: Option<IpAddr>,
        user: String,
        password: Vec<u8>,
    },
}

/// Verifications (PBKDF2) running at once, at most: a flood of attempts
/// takes no more of the machine than this.
const VERIFICATIONS_MAX: usize = 2;

/// Verifications waiting or running from one peer address, at most.
const VERIFICATIONS_PER_PEER_MAX: usize = 8;

/// Verifications waiting or running in all, at most.
const VERIFICATIONS_QUEUED_MAX: usize = 256;

/// Longest wait for a verification to start.
const VERIFICATION_WAIT_MAX: Duration = Duration::from_secs(5);

/// Longest user name that can exist (as `UpsertUser` takes them).
const USER_NAME_BYTES_MAX: usize = 255;

/// A source's failed password checks over all user names, at most, as a
/// multiple of `auth_failures_max` (per user name).
const SOURCE_FAILURES_FACTOR: u32 = 10;

/// Where a password check comes from, for counting its failures: the
/// address, or for IPv6 its /64 (one host commonly holds a whole /64,
/// and rotating addresses within it made every guess a first one). An
/// IPv4 address mapped into IPv6 counts as itself.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Keeps the failure records under [`FAILURE_RECORDS_MAX`]: expired ones
/// go first, then those not locked out, then the oldest. Dropping only
/// expired ones let a flood of names grow the map for a whole window.
fn bound_failures(
    failures: &mut HashMap<FailureKey, Failures>,
    now: Instant,
    window: Duration,
    failures_max: u32,
) {
    failures.retain(|_, f| now.duration_since(f.since) < window);
    if failures.len() >= FAILURE_RECORDS_MAX {
        failures.retain(|_, f| f.count >= failures_max);
    }
    while failures.len() >= FAILURE_RECORDS_MAX {
        let oldest = failures
            .iter()
            .min_by_key(|(_, f)| f.since)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => failures.remove(&k),
            None => break,
        };
    }
}

fn verifications_backed_up() -> Status {
    Status::unavailable("too many password checks are waiting; try again shortly")
}

fn locked_out() -> Status {
    status(
        tonic::Code::ResourceExhausted,
        ErrorCode::AuthenticationFailed,
        "too many failed authentication attempts; try again later",
    )
}

/// SHA-256 of salt and password: the key of a password verified before.
fn password_digest(salt: &[u8], password: &[u8]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(salt);
    ctx.update(password);
    ctx.finish().as_ref().to_vec()
}

/// A tower layer that authenticates every request before the services
/// see it, putting its [`Principal`] in the request extensions.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    security: Arc<Security>,
}

impl AuthLayer {
    /// A layer over `security`.
    pub fn new(security: Arc<Security>) -> Self {
        Self { security }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            security: self.security.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the routes.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    security: Arc<Security>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> AuthService<S> {
    /// The login to record beside `principal`: when the request named a
    /// user (password authentication) and that user is `principal`.
    fn login_for(&self, headers: &http::HeaderMap, principal: &Principal) -> Option<Login> {
        if !self.security.settings.authentication || !headers.contains_key(USER_HEADER) {
            return None;
        }
        let metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
        let password = metadata
            .get_bin(PASSWORD_HEADER)
            .and_then(|p| p.to_bytes().ok())
            .unwrap_or_default();
        Some(self.security.login(principal.name(), &password))
    }
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is the one made ready by `poll_ready`'s caller's
        // contract (tower's clone-and-swap idiom).
        let take_inner = |this: &mut Self| {
            let clone = this.inner.clone();
            std::mem::replace(&mut this.inner, clone)
        };
        match self.security.authenticate(
            request.uri().path(),
            request.headers(),
            request.extensions(),
        ) {
            Authenticated::Done(Ok(principal)) => {
                if let Some(login) = self.login_for(request.headers(), &principal) {
                    request.extensions_mut().insert(login);
                }
                request.extensions_mut().insert(principal);
                Box::pin(take_inner(self).call(request))
            }
            Authenticated::Done(Err(status)) => Box::pin(async move { Ok(status.into_http()) }),
            Authenticated::Verify {
                peer,
                user,
                password,
            } => {
                let security = self.security.clone();
                let for_login = self.security.clone();
                let typed = password.clone();
                let mut inner = take_inner(self);
                Box::pin(async move {
                    let Some(queued) = security.queue_verification(peer) else {
                        return Ok(verifications_backed_up().into_http());
                    };
                    let permit = tokio::time::timeout(
                        VERIFICATION_WAIT_MAX,
                        security.verifications.clone().acquire_owned(),
                    )
                    .await;
                    let checked = match permit {
                        Ok(Ok(permit)) => tokio::task::spawn_blocking(move || {
                            let _permit = permit;
                            let _queued = queued;
                            security.check_password(peer, &user, &password)
                        })
                        .await
                        .unwrap_or_else(|_| {
                            Err(Status::unavailable("the broker is shutting down"))
                        }),
                        Ok(Err(_)) => Err(Status::unavailable("the broker is shutting down")),
                        Err(_) => Err(verifications_backed_up()),
                    };
                    match checked {
                        Ok(principal) => {
                            request
                                .extensions_mut()
                                .insert(for_login.login(principal.name(), &typed));
                            request.extensions_mut().insert(principal);
                            inner.call(request).await
                        }
                        Err(status) => Ok(status.into_http()),
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    /// Metadata that never changes: these users, nothing else.
    struct Users(Arc<runnel_controller::ClusterMetadata>);

    impl MetadataStore for Users {
        fn current(&self) -> Arc<runnel_controller::ClusterMetadata> {
            self.0.clone()
        }
        fn watch(&self) -> tokio::sync::watch::Receiver<Arc<runnel_controller::ClusterMetadata>> {
            tokio::sync::watch::channel(self.0.clone()).1
        }
        fn submit(
            &self,
            _: runnel_controller::MetadataCommand,
        ) -> futures_util::future::BoxFuture<
            '_,
            Result<runnel_controller::metadata::Applied, runnel_controller::MetadataError>,
        > {
            unimplemented!("read-only")
        }
        fn controller_id(&self) -> i32 {
            1
        }
    }

    /// Authentication on, user `u` with password "correct horse", three
    /// failures a minute allowed.
    fn user_u_three_failures() -> Security {
        let mut meta = runnel_controller::ClusterMetadata::default();
        meta.users
            .insert("u".into(), password::hash("correct horse"));
        let settings = SecuritySection {
            authentication: true,
            auth_failures_max: 3,
            auth_failure_window_ms: 60_000,
            ..SecuritySection::default()
        };
        Security::new(settings, Arc::new(Users(Arc::new(meta))))
    }

    #[test]
    fn concurrent_guesses_stop_at_the_failure_limit() {
        let security = user_u_three_failures();
        let peer = Some(IpAddr::from([127, 0, 0, 1]));
        let barrier = std::sync::Barrier::new(16);
        let verified = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    barrier.wait();
                    let err = security.check_password(peer, "u", b"guess").unwrap_err();
                    if err.code() == tonic::Code::Unauthenticated {
                        verified.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    } else {
                        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
                    }
                });
            }
        });
        assert_eq!(
            verified.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "guesses checked"
        );
        // Locked out now, even with the right password.
        let err = security
            .check_password(peer, "u", b"correct horse")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // Another address is not.
        let other = Some(IpAddr::from([127, 0, 0, 2]));
        security
            .check_password(other, "u", b"correct horse")
            .unwrap();
    }

    /// Failures count per source over all user names too, and an IPv6
    /// source is its /64: trying other names, or other addresses of one
    /// /64, no longer gives fresh guesses.
    #[test]
    fn a_source_guessing_many_names_is_locked_out() {
        let security = user_u_three_failures();
        let peer = |last: u16| Some(IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]));
        // Two guesses per name (under the per-name limit of 3), a new
        // address of the /64 each time: 15 names make 30 failures.
        for n in 0..15u16 {
            for g in 0..2u16 {
                let err = security
                    .check_password(peer(n * 2 + g), &format!("name{n}"), b"guess")
                    .unwrap_err();
                assert_eq!(err.code(), tonic::Code::Unauthenticated, "{n}/{g}");
            }
        }
        // The source's 30 failures are the most it may make.
        let err = security
            .check_password(peer(999), "u", b"correct horse")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // Another /64 is another source; an IPv4-mapped address is its
        // IPv4 address.
        security
            .check_password(
                Some(IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1])),
                "u",
                b"correct horse",
            )
            .unwrap();
        assert_eq!(
            source_of(IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1])),
            IpAddr::from([127, 0, 0, 1])
        );
    }

    #[test]
    fn only_a_password_not_verified_before_is_left_for_the_blocking_pool() {
        let mut meta = runnel_controller::ClusterMetadata::default();
        meta.users
            .insert("u".into(), password::hash("correct horse"));
        let settings = SecuritySection {
            authentication: true,
            ..SecuritySection::default()
        };
        let security = Security::new(settings, Arc::new(Users(Arc::new(meta))));
        let headers = |password: &[u8]| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert(USER_HEADER, "u".parse().unwrap());
            m.insert_bin(
                PASSWORD_HEADER,
                tonic::metadata::MetadataValue::from_bytes(password),
            );
            m.into_headers()
        };
        let extensions = http::Extensions::new();
        let path = "/runnel.v1.Admin/ListTopics";
        let right = headers(b"correct horse");
        match security.authenticate(path, &right, &extensions) {
            Authenticated::Verify { user, password, .. } => {
                assert_eq!(
                    (user.as_str(), password.as_slice()),
                    ("u", &b"correct horse"[..])
                );
                security.check_password(None, &user, &password).unwrap();
            }
            Authenticated::Done(r) => panic!("decided without verifying: {r:?}"),
        }
        // Verified once: answered on the spot from then on.
        match security.authenticate(path, &right, &extensions) {
            Authenticated::Done(Ok(p)) => assert_eq!(p.name(), "u"),
            _ => panic!("not taken from the verified passwords"),
        }
        // Another password is verified again (and fails there).
        assert!(matches!(
            security.authenticate(path, &headers(b"guess"), &extensions),
            Authenticated::Verify { .. }
        ));
    }

    /// A password verified before keeps working while another client at
    /// the same source (a NAT, a shared host) has it locked out over
    /// every user name; a password not verified yet is refused there.
    #[test]
    fn a_verified_password_outlasts_its_sources_lockout() {
        let mut meta = runnel_controller::ClusterMetadata::default();
        for user in ["u", "v"] {
            meta.users
                .insert(user.into(), password::hash("correct horse"));
        }
        let settings = SecuritySection {
            authentication: true,
            auth_failures_max: 1,
            ..SecuritySection::default()
        };
        let security = Security::new(settings, Arc::new(Users(Arc::new(meta))));
        let peer = Some(IpAddr::from([10, 0, 0, 7]));
        security
            .check_password(peer, "u", b"correct horse")
            .unwrap();
        for i in 0..SOURCE_FAILURES_FACTOR {
            assert!(security
                .check_password(peer, &format!("nobody-{i}"), b"guess")
                .is_err());
        }
        let cached = security.check_password_cached(peer, "u", b"correct horse");
        assert!(matches!(&cached, Some(Ok(_))), "{cached:?}");
        assert!(security
            .check_password(peer, "v", b"correct horse")
            .is_err());
    }

    /// A login records the stored hash only for the password verified
    /// against it: for any other (a password changed between the check
    /// and the read), a hash that matches nothing, so the stream ends.
    #[test]
    fn a_login_records_the_hash_its_password_was_verified_against() {
        let mut meta = runnel_controller::ClusterMetadata::default();
        let cred = password::hash("correct horse");
        meta.users.insert("u".into(), cred.clone());
        let settings = SecuritySection {
            authentication: true,
            ..SecuritySection::default()
        };
        let security = Security::new(settings, Arc::new(Users(Arc::new(meta))));
        security
            .check_password(None, "u", b"correct horse")
            .unwrap();
        assert_eq!(security.login("u", b"correct horse").hash, cred.hash);
        assert!(security.login("u", b"another").hash.is_empty());
        assert!(security.login("nobody", b"correct horse").hash.is_empty());
    }

    /// A flood of attempts is bounded: an overlong or empty user name is refused
    /// on the spot, without a verification or a failure record;
    /// verifications queue at most [`VERIFICATIONS_PER_PEER_MAX`] per
    /// address; failure records stay under [`FAILURE_RECORDS_MAX`],
    /// keeping lockouts longest.
    #[test]
    fn a_flood_of_attempts_is_bounded() {
        let settings = SecuritySection {
            authentication: true,
            auth_failures_max: 3,
            ..SecuritySection::default()
        };
        let meta = runnel_controller::ClusterMetadata::default();
        let security = Security::new(settings, Arc::new(Users(Arc::new(meta))));
        // So is an empty one (the source-wide record's key).
        for name in ["x".repeat(4000), String::new()] {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert(USER_HEADER, name.parse().unwrap());
            let refused = security.authenticate(
                "/runnel.v1.Admin/ListTopics",
                &m.into_headers(),
                &http::Extensions::new(),
            );
            assert!(
                matches!(&refused, Authenticated::Done(Err(s)) if s.code() == tonic::Code::Unauthenticated),
                "{} bytes: not refused on the spot",
                name.len()
            );
            assert!(security.lock_failures().is_empty());
        }

        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let held: Vec<_> = (0..VERIFICATIONS_PER_PEER_MAX)
            .map(|_| security.queue_verification(a).unwrap())
            .collect();
        assert!(security.queue_verification(a).is_none());
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        assert!(security.queue_verification(b).is_some());
        drop(held);
        assert!(security.queue_verification(a).is_some());

        let now = Instant::now();
        let window = Duration::from_secs(60);
        let mut failures: HashMap<FailureKey, Failures> = (0..FAILURE_RECORDS_MAX)
            .map(|i| {
                let count = if i == 7 { 3 } else { 1 };
                ((a, format!("u{i}")), Failures { count, since: now })
            })
            .collect();
        bound_failures(&mut failures, now, window, 3);
        assert!(failures.len() < FAILURE_RECORDS_MAX);
        assert!(
            failures.contains_key(&(a, "u7".to_string())),
            "a lockout kept"
        );
    }

    /// No quota delay means no timer: a zero sleep would still wait for
    /// tokio's next millisecond tick before the answer could leave.
    #[tokio::test]
    async fn an_answer_without_delay_is_ready_at_once() {
        assert_eq!(answer_deadline(Duration::ZERO), None);
        let before = tokio::time::Instant::now();
        let deadline = answer_deadline(Duration::from_secs(60)).expect("a delay has a deadline");
        assert!(deadline >= before + Duration::from_secs(60));
        // Ready on its first poll: no timer is involved.
        assert!(hold_until(None).now_or_never().is_some());
        // A real delay is still waited for.
        assert!(hold_until(Some(deadline)).now_or_never().is_none());
    }
}
