//! A throw-away certificate authority for tests: a CA certificate (written to
//! a PEM file so the daemon can be pointed at it with `ca_file`) and server
//! certificates for `localhost` / `127.0.0.1` signed by it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A generated CA plus one server certificate for the loopback names.
pub struct TestCa {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_cert_pem: String,
    server_key_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
}

impl TestCa {
    /// Generate a CA and a server certificate valid for `localhost`,
    /// `127.0.0.1`, `::1` and `smtp.gmail.com` (so a test can keep Gmail's
    /// host name while connecting to a loopback address).
    pub fn new() -> TestCa {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "oauthrelay test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("ca key");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");

        let names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
            "smtp.gmail.com".to_string(),
            "oauth2.googleapis.com".to_string(),
            "accounts.google.com".to_string(),
        ];
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca).expect("server cert");

        TestCa {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
            server_chain: vec![cert.der().clone()],
            server_key_der: key.serialize_der(),
        }
    }

    /// The CA certificate in PEM, what `ca_file` points at.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate in DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The server certificate and key in PEM (for `[server.tls]`).
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }
    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    /// Write `ca.pem`, `server.pem` and `server.key` (0600) into `dir`;
    /// returns the path of `ca.pem`.
    pub fn write_to(&self, dir: &Path) -> PathBuf {
        std::fs::write(dir.join("server.pem"), &self.server_cert_pem).expect("write server.pem");
        write_private(&dir.join("server.key"), self.server_key_pem.as_bytes());
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &self.ca_pem).expect("write ca.pem");
        ca
    }

    /// A rustls server config presenting the server certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.server_chain.clone(), key)
            .expect("server cert");
        Arc::new(cfg)
    }

    /// A rustls client config that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

fn write_private(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("open private file");
    f.write_all(bytes).expect("write private file");
}
