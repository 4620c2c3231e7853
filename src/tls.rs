//! TLS settings built from `[proxy]`: the certificate pgmux shows clients
//! (`tls_cert`/`tls_key`, `tls_mode`) and how it talks to servers
//! (`server_tls`, `server_tls_ca`). rustls with the ring provider.
//!
//! Built once at start and on each reload ([`TlsContext::load`]), then
//! shared through the [`Config`](crate::config::Config).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{ProxyConfig, ServerTlsMode};
use crate::net::{Stream, TlsStream};

/// The SSLRequest code (1234.5679).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Built TLS configurations; `Default` is "no TLS".
#[derive(Clone, Default)]
pub struct TlsContext {
    /// For clients, when `tls_cert`/`tls_key` are set.
    pub server: Option<Arc<ServerConfig>>,
    /// For servers, unless `server_tls = "disable"`.
    pub client: BackendTls,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext").field("server", &self.server.is_some()).field("client", &self.client.mode).finish()
    }
}

/// How pgmux opens server connections.
#[derive(Clone)]
pub struct BackendTls {
    pub mode: ServerTlsMode,
    pub config: Option<Arc<ClientConfig>>,
}

impl Default for BackendTls {
    fn default() -> Self {
        BackendTls { mode: ServerTlsMode::Disable, config: None }
    }
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.mode)
    }
}

/// Same mode and same built configuration.
impl PartialEq for BackendTls {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode
            && match (&self.config, &other.config) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Eq for BackendTls {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsContext {
    /// Reads the PEM files `[proxy]` names. Errors name the file.
    pub fn load(proxy: &ProxyConfig) -> Result<TlsContext, String> {
        let server = match (&proxy.tls_cert, &proxy.tls_key) {
            (Some(cert), Some(key)) => Some(server_config(cert, key)?),
            _ => None,
        };
        let config = match proxy.server_tls {
            ServerTlsMode::Disable => None,
            ServerTlsMode::Prefer | ServerTlsMode::Require => Some(unverified_client_config()?),
            ServerTlsMode::VerifyFull => {
                let ca = proxy.server_tls_ca.as_deref().ok_or("server_tls = \"verify-full\" needs server_tls_ca")?;
                Some(verifying_client_config(ca)?)
            }
        };
        Ok(TlsContext { server, client: BackendTls { mode: proxy.server_tls, config } })
    }
}

/// Certificate chains and keys are a few kilobytes.
const MAX_PEM_FILE: u64 = 1 << 20;

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    crate::config::read_bounded(path, MAX_PEM_FILE).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read_pem(key)?).map_err(|e| format!("{}: {e}", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

fn verifying_client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub(crate) fn unverified_client_config() -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `server_tls = "prefer"/"require"`: encryption without authentication,
/// like libpq's `sslmode=require`. Any certificate is accepted, so there is
/// no protection against a man in the middle; the handshake signatures are
/// still checked (the peer must hold the key of the certificate it shows).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS handshake with a client that sent SSLRequest and got `S`.
pub async fn accept(tcp: TcpStream, config: &Arc<ServerConfig>) -> std::io::Result<Stream> {
    let conn = rustls::ServerConnection::new(config.clone()).map_err(std::io::Error::other)?;
    Ok(Stream::Tls(Box::new(TlsStream::handshake(tcp, conn).await?)))
}

/// Negotiates encryption on a fresh server connection to `addr`
/// (`host:port`) as `tls.mode` says. Cancel requests do not come here: they
/// stay plaintext, as Postgres allows.
pub async fn connect(mut tcp: TcpStream, tls: &BackendTls, addr: &str) -> std::io::Result<Stream> {
    let Some(config) = tls.config.as_ref().filter(|_| tls.mode != ServerTlsMode::Disable) else {
        return Ok(Stream::Plain(tcp));
    };
    tcp.write_all(&SSL_REQUEST).await?;
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => {}
        b'N' if tls.mode == ServerTlsMode::Prefer => return Ok(Stream::Plain(tcp)),
        b'N' => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the server does not support TLS, and server_tls requires it",
            ));
        }
        _ => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected answer to SSLRequest")),
    }
    let host = host_of(addr);
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS server name {host:?}: {e}")))?;
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let stream = TlsStream::handshake(tcp, conn)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake with the server failed: {e}")))?;
    Ok(Stream::Tls(Box::new(stream)))
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_of() {
        assert_eq!(super::host_of("127.0.0.1:5432"), "127.0.0.1");
        assert_eq!(super::host_of("db.example:5432"), "db.example");
        assert_eq!(super::host_of("[::1]:5432"), "::1");
    }

    /// An endless file named as a certificate, key or CA fails the load at
    /// once (and so `pgmux check`, and a reload, which keeps the old config).
    #[test]
    fn endless_files_are_refused_not_read() {
        let zero = std::path::PathBuf::from("/dev/zero");
        for proxy in [
            crate::config::ProxyConfig {
                tls_cert: Some(zero.clone()),
                tls_key: Some(zero.clone()),
                ..Default::default()
            },
            crate::config::ProxyConfig {
                server_tls: crate::config::ServerTlsMode::VerifyFull,
                server_tls_ca: Some(zero.clone()),
                ..Default::default()
            },
        ] {
            let e = super::TlsContext::load(&proxy).unwrap_err();
            assert!(e.starts_with("/dev/zero: larger than"), "{e}");
        }
    }
}
