//! TLS for TCP listeners (`NBD_OPT_STARTTLS`), on rustls with the AWS-LC provider (the same
//! AWS-LC as the sector cipher).
//!
//! The server presents an X.509 certificate chain and key read from PEM files; with a CA file
//! it also asks for a client certificate and refuses clients whose certificate does not chain
//! to that CA (or who send none). TLS 1.2 and 1.3 only, as the NBD spec asks ("MUST support TLS
//! 1.2, SHOULD NOT support older versions by default").
//!
//! Everything is loaded once, when the daemon starts: a bad file stops the start with the file
//! named, rather than failing the first client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::{self, pki_types::CertificateDer, server::WebPkiClientVerifier, RootCertStore};
use tokio_rustls::TlsAcceptor;
use zeroize::Zeroizing;

use crate::nbd::handshake::TlsMode;

/// Where the TLS credentials live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: CA certificates that client certificates must chain to; `None` accepts clients
    /// without a certificate.
    pub ca: Option<PathBuf>,
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("{path} is not a valid PEM file")]
    Pem {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    /// The key file holds no private key.
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    /// A CA certificate was refused as a trust anchor.
    #[error("{path}: a CA certificate cannot be used as a trust anchor")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA file.
    #[error("{path}: cannot verify client certificates with these CAs")]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the certificate and key (e.g. the key does not match the certificate).
    #[error("the TLS certificate and key are not usable together")]
    Config(#[source] rustls::Error),
}

/// The TLS side of a listener: its mode, and the acceptor when TLS is offered.
#[derive(Clone)]
pub struct TlsSetup {
    pub mode: TlsMode,
    acceptor: Option<TlsAcceptor>,
    /// Client certificates are required.
    pub verifies_clients: bool,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("mode", &self.mode)
            .field("verifies_clients", &self.verifies_clients)
            .finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// No TLS.
    pub fn off() -> Self {
        TlsSetup { mode: TlsMode::Off, acceptor: None, verifies_clients: false }
    }

    /// Loads the credentials for `mode` (`Optional` or `Require`; `Off` ignores `files`).
    pub fn load(mode: TlsMode, files: &TlsFiles) -> Result<Self, TlsError> {
        if mode == TlsMode::Off {
            return Ok(Self::off());
        }
        let config = server_config(files)?;
        Ok(TlsSetup { mode, acceptor: Some(TlsAcceptor::from(Arc::new(config))), verifies_clients: files.ca.is_some() })
    }

    /// The acceptor, when TLS is offered.
    pub fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.acceptor.as_ref()
    }
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    std::fs::read(path).map(Zeroizing::new).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// Builds the rustls server configuration: AWS-LC provider, TLS 1.2 and 1.3, the server's
/// chain and key, and client verification when a CA file is given.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certs(&files.cert)?;
    let key_pem = read(&files.key)?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Pem { path: files.key.clone(), source })?
        .ok_or_else(|| TlsError::NoKey { path: files.key.clone() })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca)? {
                roots.add(cert).map_err(|source| TlsError::BadCa { path: ca.clone(), source })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::Verifier { path: ca.clone(), source })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(chain, key).map_err(TlsError::Config)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem"), ca: None }
    }

    #[test]
    fn missing_certificate_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = server_config(&files(dir.path())).unwrap_err();
        assert!(matches!(&err, TlsError::Read { path, .. } if path.ends_with("cert.pem")), "{err}");
    }

    #[test]
    fn file_without_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "not pem at all\n").unwrap();
        let err = server_config(&files(dir.path())).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }

    #[test]
    fn off_needs_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let t = TlsSetup::load(TlsMode::Off, &files(dir.path())).unwrap();
        assert!(t.acceptor().is_none());
    }
}
