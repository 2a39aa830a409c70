//! Downstream TLS: the certificate comes from the snapshot in force, so a
//! renewed certificate file is served from the next handshake on, without a
//! restart. Its expiry is exported as a metric.

use std::path::Path;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::control::runtime::App;

pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub expiry_days: f64,
}

pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<LoadedCert, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("server.tls.cert_file {}: {e}", cert_file.display()))?;
    let leaf = chain.first().ok_or_else(|| {
        format!(
            "server.tls.cert_file {}: no PEM certificate in it",
            cert_file.display()
        )
    })?;
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("server.tls.cert_file {}: {e}", cert_file.display()))?
        .1
        .validity()
        .not_after
        .timestamp();
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("server.tls.key_file {}: {e}", key_file.display()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("server.tls.key_file {}: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|e| format!("server.tls: certificate and key do not match: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Ok(LoadedCert {
        key: Arc::new(certified),
        expiry_days: (not_after - now) as f64 / 86_400.0,
    })
}

/// Serves whatever certificate the snapshot in force holds.
#[derive(Debug)]
pub struct SnapshotCert(pub Arc<App>);

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("App")
    }
}

impl ResolvesServerCert for SnapshotCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.snapshot.load().downstream_cert.clone()
    }
}

pub fn server_config(app: Arc<App>) -> Result<rustls::ServerConfig, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(SnapshotCert(app)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
