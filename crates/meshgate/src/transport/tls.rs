//! TLS: the server side of the mqtts listener (with optional client-certificate verification) and the client side toward brokers with `tls = true`.
//!
//! Certificates are loaded from PEM files when meshgate starts and again on every reload, so
//! a renewed certificate is picked up with SIGHUP; a file that cannot be used refuses the
//! reload and the running certificate stays.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[tls] {key}: cannot read {path}: {err}")]
    Read { key: &'static str, path: String, err: std::io::Error },
    #[error("[tls] {key}: {path} holds no {what} (expected PEM)")]
    Empty { key: &'static str, path: String, what: &'static str },
    #[error("[tls] {key}: {path}: {err}")]
    Invalid { key: &'static str, path: String, err: String },
    #[error("TLS listener configured without [tls] cert and key")]
    Missing,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::Read { key, path: path.display().to_string(), err })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid { key, path: path.display().to_string(), err: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { key, path: path.display().to_string(), what: "certificate" });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key", path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            Err(TlsError::Empty { key: "key", path: path.display().to_string(), what: "private key" })
        }
        Err(e) => Err(TlsError::Invalid { key: "key", path: path.display().to_string(), err: e.to_string() }),
    }
}

fn roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(key, path)? {
        store.add(c).map_err(|e| TlsError::Invalid { key, path: path.display().to_string(), err: e.to_string() })?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The acceptor for the mqtts listener.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else { return Err(TlsError::Missing) };
    let chain = certs("cert", cert)?;
    let key_der = private_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid { key: "cert", path: cert.display().to_string(), err: e.to_string() })?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots("client_ca", ca)?), provider())
                .build()
                .map_err(|e| TlsError::Invalid {
                    key: "client_ca",
                    path: ca.display().to_string(),
                    err: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key_der).map_err(|e| TlsError::Invalid {
        key: "key",
        path: key.display().to_string(),
        err: e.to_string(),
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What reaching TLS brokers takes: the connector, and the CA roots it trusts (for clients
/// that need a configuration of their own).
pub struct BrokerTls {
    pub connector: TlsConnector,
    roots: Arc<RootCertStore>,
}

/// The client side for brokers with `tls = true`, or `None` when no broker needs one.
pub fn connector(cfg: &TlsConfig) -> Result<Option<BrokerTls>, TlsError> {
    let Some(ca) = &cfg.broker_ca else { return Ok(None) };
    let roots = Arc::new(roots("broker_ca", ca)?);
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid { key: "broker_ca", path: ca.display().to_string(), err: e.to_string() })?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    Ok(Some(BrokerTls { connector: TlsConnector::from(Arc::new(config)), roots }))
}

impl BrokerTls {
    /// The configuration for a client that names the broker by its address (rumqttc does):
    /// with a `tls_name`, the certificate is checked against that name instead, as for every
    /// other connection to that broker.
    pub fn config_for(&self, address: &str, tls_name: Option<&str>) -> Result<Arc<ClientConfig>, String> {
        let base = self.connector.config().clone();
        let Some(name) = tls_name else { return Ok(base) };
        let name = server_name(address, Some(name))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| e.to_string())?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// Checks a broker's certificate against a configured name rather than the one the client
/// connected with; everything else is the standard WebPKI verification.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The name a broker's certificate must carry: `tls_name`, or the host part of its address.
pub fn server_name(address: &str, tls_name: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = match tls_name {
        Some(n) => n.to_string(),
        None => address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address).trim_matches(['[', ']']).to_string(),
    };
    ServerName::try_from(host.clone()).map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))
}
