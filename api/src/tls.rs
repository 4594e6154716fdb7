//! TLS for the TCP listener (`rustls`, the `ring` provider): a certificate chain and its key
//! from PEM files; HTTP/1.1 only.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::accept::{BoxedIo, Wrap};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the certificate or key.
    #[error("TLS: {0}")]
    Config(#[from] rustls::Error),
}

/// The server configuration of `cert` (a PEM chain, leaf first) and `key` (PEM).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let pem = |path: &Path, reason: String| TlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem(cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
    // `ring` rather than aws-lc-rs (no cmake build); it lacks only the post-quantum key
    // exchanges, which is what the deprecation says.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The accept loop's wrapping of each connection in TLS.
pub(crate) fn wrap(config: rustls::ServerConfig) -> Wrap {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    Arc::new(move |io: BoxedIo| {
        let acceptor = acceptor.clone();
        Box::pin(async move {
            let stream = acceptor.accept(io).await?;
            Ok(Box::pin(stream) as BoxedIo)
        })
    })
}
