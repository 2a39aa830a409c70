//! Downstream TLS certificates, read and checked here: the snapshot in
//! force holds one and the server's resolver (`serve::server`) serves it, so
//! a renewed certificate file is served from the next handshake on, without
//! a restart. Its expiry is exported as a metric.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
