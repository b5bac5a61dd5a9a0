//! Microsoft app-only accounts with a certificate: the application proves
//! who it is with a signed JWT ("client assertion", RFC 7523 / OpenID
//! Connect `private_key_jwt`) instead of a client secret.
//!
//! The assertion follows Microsoft's "certificate credentials" page: header
//! `alg` = `PS256`, `typ` = `JWT`, `x5t#S256` = the base64url SHA-256
//! thumbprint of the certificate's DER encoding (how Microsoft finds the
//! certificate uploaded to the app registration); claims `aud` = the token
//! endpoint, `iss` = `sub` = the client id, a random `jti`, `nbf` = `iat`
//! = now, `exp` ten minutes later. Signed with RSA-PSS SHA-256 by ring, as
//! the service account assertion is.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::RsaKeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::jwt;

/// `client_assertion_type` for a JWT client assertion.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid (Microsoft: 5-10 minutes after `nbf`).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// An application certificate and its private key.
#[derive(Clone)]
pub struct ClientCertificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// `x5t#S256`: base64url SHA-256 of the certificate's DER.
    pub thumbprint_s256: String,
    /// The SHA-1 thumbprint in hex, as the Entra admin center shows it
    /// under Certificates & secrets (for messages).
    pub thumbprint_sha1_hex: String,
    key: Arc<RsaKeyPair>,
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("thumbprint", &self.thumbprint_sha1_hex)
            .field("private_key", &"[REDACTED]")
            .finish()
    }
}

/// What is wrong with the certificate or its key.
#[derive(Debug, thiserror::Error)]
#[error("client certificate '{}': {reason}", path.display())]
pub struct CertError {
    pub path: PathBuf,
    pub reason: String,
}

impl ClientCertificate {
    /// Read the certificate (PEM; the first certificate is the
    /// application's) and its RSA private key (PEM, PKCS#8 or PKCS#1).
    /// Permissions of the key file are checked by the caller.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<ClientCertificate, CertError> {
        let cert_err = |reason: String| CertError {
            path: cert_path.to_path_buf(),
            reason,
        };
        let key_err = |reason: String| CertError {
            path: key_path.to_path_buf(),
            reason,
        };
        let cert = CertificateDer::pem_file_iter(cert_path)
            .map_err(|e| cert_err(format!("cannot read: {e}")))?
            .next()
            .ok_or_else(|| {
                cert_err("no PEM certificate (-----BEGIN CERTIFICATE-----) found".into())
            })?
            .map_err(|e| cert_err(format!("not a PEM certificate: {e}")))?;
        let key = match PrivateKeyDer::from_pem_file(key_path) {
            Ok(PrivateKeyDer::Pkcs8(der)) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
            Ok(PrivateKeyDer::Pkcs1(der)) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
            Ok(_) => {
                return Err(key_err(
                    "the key must be an RSA private key (Microsoft signs app certificates with RSA)"
                        .into(),
                ));
            }
            Err(e) => return Err(key_err(format!("not a PEM private key: {e}"))),
        }
        .map_err(|e| key_err(format!("not a usable RSA key ({e})")))?;
        let sha256 = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
        Ok(ClientCertificate {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            thumbprint_s256: URL_SAFE_NO_PAD.encode(sha256.as_ref()),
            thumbprint_sha1_hex: sha1.as_ref().iter().map(|b| format!("{b:02X}")).collect(),
            key: Arc::new(key),
        })
    }

    /// A signed assertion for `client_id` at the token endpoint `audience`.
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<String, CertError> {
        let err = |reason: &str| CertError {
            path: self.key_path.clone(),
            reason: reason.to_string(),
        };
        let rng = SystemRandom::new();
        let mut jti = [0u8; 16];
        rng.fill(&mut jti).map_err(|_| err("no randomness"))?;
        // A GUID-shaped (version 4) jti.
        jti[6] = (jti[6] & 0x0f) | 0x40;
        jti[8] = (jti[8] & 0x3f) | 0x80;
        let hex: String = jti.iter().map(|b| format!("{b:02x}")).collect();
        let jti = format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        );
        let iat = jwt::unix_seconds(now);
        let header = serde_json::json!({ "x5t#S256": self.thumbprint_s256 });
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": jti,
            "nbf": iat,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        jwt::sign(&self.key, jwt::Alg::Ps256, header, &claims, &rng)
            .ok_or_else(|| err("RSA-PSS signing failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{KeyPair, RSA_PSS_2048_8192_SHA256, UnparsedPublicKey};

    #[test]
    fn assertion_is_ps256_with_the_sha256_thumbprint_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, any_cert_pem()).unwrap();
        std::fs::write(&key, testkit::google::SERVICE_ACCOUNT_TEST_KEY).unwrap();
        let c = ClientCertificate::load(&cert, &key).unwrap();
        assert_eq!(c.thumbprint_s256.len(), 43);
        assert!(!format!("{c:?}").contains("PRIVATE"));
        let jwt = c
            .assertion(
                "client-1",
                "https://login.example/t/oauth2/v2.0/token",
                SystemTime::now(),
            )
            .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["x5t#S256"], c.thumbprint_s256.as_str());
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://login.example/t/oauth2/v2.0/token");
        assert_eq!(claims["jti"].as_str().unwrap().len(), 36);
        let public = c.key.public_key().as_ref().to_vec();
        UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, &public)
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .expect("signature verifies");
        // A key that is not a key.
        std::fs::write(&key, "not a key").unwrap();
        assert!(ClientCertificate::load(&cert, &key).is_err());
    }

    /// Any certificate PEM: the thumbprint is over its DER, whatever it
    /// is (the fake identity platform checks the pairing end to end).
    fn any_cert_pem() -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = testkit::ca::TestCa::new().write_to(dir.path());
        std::fs::read_to_string(path).unwrap()
    }
}
