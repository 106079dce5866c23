//! TLS for the listeners (rustls, ring provider) and for the brokers'
//! outgoing internal calls.
//!
//! A listener's certificate, key and CA bundle are files; a
//! [`ReloadingTls`] re-reads them when one's modification time changes
//! (checked at most once a second, on the next connection), so
//! certificates rotate without a restart. A bad new file is logged and
//! the previous configuration kept.
//!
//! With a CA configured, client certificates are verified against it
//! (expired, not-yet-valid and foreign certificates are refused in the
//! handshake), and the subject CN of the verified certificate becomes the
//! connection's principal ([`principal_of_cert`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// Whether a listener asks clients for a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates.
    #[default]
    None,
    /// A certificate is verified when sent; clients without one connect
    /// (and must authenticate otherwise if authentication is on).
    Optional,
    /// Every client must present a certificate from the CA.
    Required,
}

/// The files of one listener's TLS configuration.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle verifying client certificates.
    pub ca: Option<PathBuf>,
    /// Whether client certificates are asked for.
    pub client_auth: ClientAuth,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: format!("no private key: {e}"),
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(path)? {
        store.add(c).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

/// Builds a server configuration (ALPN h2) from the files.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match (&files.ca, files.client_auth) {
        (_, ClientAuth::None) | (None, _) => builder.with_no_client_auth(),
        (Some(ca), auth) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            );
            let verifier = if auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Rustls(e.to_string()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// How often file modification times are looked at, at most.
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A listener's TLS configuration that follows its files.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    state: Mutex<ReloadState>,
}

#[derive(Debug)]
struct ReloadState {
    checked: Instant,
    /// The files' stamps when `config` was loaded from them.
    stamps: Vec<Option<FileStamp>>,
    /// Stamps of files that changed but failed to load (not tried again
    /// until they change once more).
    failed: Option<Vec<Option<FileStamp>>>,
    config: Arc<rustls::ServerConfig>,
}

/// What tells a changed file: its modification time and its length. The
/// length as well, since a rewrite in place (`cp` truncates, then
/// writes) can end within the time's granularity of the failed read
/// of its first half.
type FileStamp = (SystemTime, u64);

impl ReloadingTls {
    /// Loads the files once; errors here stop the server from starting.
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let stamps = Self::stamps(&files);
        let config = Arc::new(server_config(&files)?);
        Ok(Self {
            files,
            state: Mutex::new(ReloadState {
                checked: Instant::now(),
                stamps,
                failed: None,
                config,
            }),
        })
    }

    fn stamps(files: &TlsFiles) -> Vec<Option<FileStamp>> {
        [Some(&files.cert), Some(&files.key), files.ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| {
                std::fs::metadata(p)
                    .and_then(|m| Ok((m.modified()?, m.len())))
                    .ok()
            })
            .collect()
    }

    /// The configuration for a new connection, reloaded first when a
    /// file changed.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK_EVERY {
            state.checked = Instant::now();
            self.reload_if_changed(&mut state);
        }
        state.config.clone()
    }

    /// Loads the files again if they changed since they were last loaded
    /// (or last failed to). A failed load is tried again once they
    /// change again: taken as loaded, a certificate whose rewrite was
    /// read half-written was never read whole.
    fn reload_if_changed(&self, state: &mut ReloadState) {
        let stamps = Self::stamps(&self.files);
        if stamps == state.stamps || state.failed.as_ref() == Some(&stamps) {
            return;
        }
        match server_config(&self.files) {
            Ok(c) => {
                info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                state.config = Arc::new(c);
                state.stamps = stamps;
                state.failed = None;
            }
            Err(error) => {
                warn!(%error, "TLS files changed but cannot be loaded; keeping the previous ones");
                state.failed = Some(stamps);
            }
        }
    }
}

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, at most.
const HANDSHAKES_MAX: usize = 256;
/// Handshakes in progress from one peer address, at most.
const HANDSHAKES_PER_PEER_MAX: usize = 16;

/// Accepts TCP connections on `listener` and yields those that complete a
/// TLS handshake, for tonic's `serve_with_incoming`. Stops at `cancel`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = super::slots::PeerSlots::new(HANDSHAKES_PER_PEER_MAX, HANDSHAKES_MAX);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            // No place: the connection is closed at once, not left in the
            // listen backlog while the accept loop waits for a place
            // (connections that never send a ClientHello, each holding a
            // place for the handshake timeout, stalled every client and
            // broker behind them). One address holds at most a few.
            let Some(permit) = slots.try_take(Some(peer.ip())) else {
                debug!(%peer, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake refused"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A tonic client TLS configuration: trust `ca`, present `cert`/`key`
/// when given.
pub fn client_config(
    ca: Option<&Path>,
    cert_key: Option<(&Path, &Path)>,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    let mut config = tonic::transport::ClientTlsConfig::new();
    if let Some(ca) = ca {
        // Checked here so a bad file is reported at start, by name.
        certs(ca)?;
        config = config.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key_path)) = cert_key {
        certs(cert)?;
        key(key_path)?;
        config = config.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key_path)?,
        ));
    }
    Ok(config)
}

/// The subject common name (OID 2.5.4.3) of a DER certificate, the
/// principal of an mTLS client. `None` when there is none or the DER is
/// malformed.
pub fn principal_of_cert(der: &[u8]) -> Option<String> {
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    // [0] version, optional.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (tag, mut subject, _) = tlv(tbs)?;
    if tag != 0x30 {
        return None;
    }
    while !subject.is_empty() {
        let (_, mut rdn, rest) = tlv(subject)?;
        subject = rest;
        while !rdn.is_empty() {
            let (_, atv, rest) = tlv(rdn)?;
            rdn = rest;
            let (tag, oid, value) = tlv(atv)?;
            if tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (_, v, _) = tlv(value)?;
                return std::str::from_utf8(v).ok().map(str::to_string);
            }
        }
    }
    None
}

/// One DER tag-length-value: (tag, contents, the bytes after it).
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *buf.first()?;
    let first = *buf.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *buf.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    if end > buf.len() {
        return None;
    }
    Some((tag, &buf[header..end], &buf[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and key for `name`, as PEM.
    fn pem_pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.into()]).unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    /// A certificate read half-written (a failed load) is loaded once
    /// whole, even when the rewrite ends within the same modification
    /// time: the failed attempt used to be taken as the files' state.
    #[test]
    fn a_failed_reload_is_tried_again_once_the_file_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let (old_cert, old_key) = pem_pair("old");
        std::fs::write(&cert, &old_cert).unwrap();
        std::fs::write(&key, &old_key).unwrap();
        let tls = ReloadingTls::new(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: None,
            client_auth: ClientAuth::None,
        })
        .unwrap();
        let at = SystemTime::now() + Duration::from_secs(60);
        let stamp = |path: &std::path::Path| {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        };
        let reload = || {
            let mut state = tls.state.lock().unwrap();
            tls.reload_if_changed(&mut state);
            state.config.clone()
        };
        let before = reload();
        // Half of the new certificate: refused, the old one kept.
        let (new_cert, new_key) = pem_pair("new");
        std::fs::write(&key, &new_key).unwrap();
        std::fs::write(&cert, &new_cert[..new_cert.len() / 2]).unwrap();
        stamp(&cert);
        stamp(&key);
        assert!(
            Arc::ptr_eq(&reload(), &before),
            "a half certificate was loaded"
        );
        // Whole, with the same modification time.
        std::fs::write(&cert, &new_cert).unwrap();
        stamp(&cert);
        assert!(
            !Arc::ptr_eq(&reload(), &before),
            "the whole certificate was not loaded"
        );
    }

    #[test]
    fn common_name_is_read_from_the_subject() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Org");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(principal_of_cert(cert.der()).as_deref(), Some("alice"));
        let no_cn = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        let mut no_cn = no_cn;
        no_cn.distinguished_name = rcgen::DistinguishedName::new();
        let cert = no_cn.self_signed(&key).unwrap();
        assert_eq!(principal_of_cert(cert.der()), None);
        assert_eq!(principal_of_cert(&[0x30, 0x85, 1]), None);
        assert_eq!(principal_of_cert(&[]), None);
    }
}
