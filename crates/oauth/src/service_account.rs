//! Google Workspace service accounts: the JSON key and the RS256 JWT used
//! with the JWT bearer grant (RFC 7523) for domain-wide delegation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use ring::signature::RsaKeyPair;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

use crate::jwt;

/// The grant type Google expects for service-account assertions.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Lifetime of an assertion (Google accepts at most one hour).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// A service account's key, loaded from the JSON file Google issues
/// (IAM & Admin > Service accounts > Keys > Add key > JSON).
#[derive(Clone)]
pub struct ServiceAccountKey {
    /// `client_email`: the assertion's `iss`.
    pub client_email: String,
    /// `client_id`: what the Workspace admin enters for domain-wide
    /// delegation.
    pub client_id: Option<String>,
    /// `private_key_id`: the JWT header's `kid`.
    pub private_key_id: String,
    /// `token_uri` from the key (informational; the account's `token_url`
    /// is what is used).
    pub token_uri: Option<String>,
    /// Where the key was read from.
    pub path: PathBuf,
    key: Arc<RsaKeyPair>,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("client_id", &self.client_id)
            .field("private_key_id", &self.private_key_id)
            .field("path", &self.path)
            .field("private_key", &"[REDACTED]")
            .finish()
    }
}

/// What is wrong with a service-account key file.
#[derive(Debug, thiserror::Error)]
#[error("service account key '{}': {reason}", path.display())]
pub struct KeyError {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Deserialize)]
struct KeyJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    client_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
    token_uri: Option<String>,
}

impl ServiceAccountKey {
    /// Parse Google's JSON key (`type` = `service_account`, `client_email`,
    /// `private_key` as PKCS#8 PEM, `private_key_id`, `token_uri`).
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<ServiceAccountKey, KeyError> {
        let err = |reason: String| KeyError {
            path: path.to_path_buf(),
            reason,
        };
        let json: KeyJson =
            serde_json::from_slice(bytes).map_err(|e| err(format!("not a JSON key file ({e})")))?;
        if let Some(kind) = &json.kind
            && kind != "service_account"
        {
            return Err(err(format!(
                "\"type\" is {kind:?}, expected \"service_account\" (this looks like an OAuth client file, not a service account key)"
            )));
        }
        let client_email = json
            .client_email
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| err("missing \"client_email\"".into()))?;
        let private_key_id = json
            .private_key_id
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| err("missing \"private_key_id\"".into()))?;
        let pem = json
            .private_key
            .ok_or_else(|| err("missing \"private_key\"".into()))?;
        let der = match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(der)) => der,
            Ok(_) => {
                return Err(err(
                    "\"private_key\" must be a PKCS#8 RSA key (-----BEGIN PRIVATE KEY-----)".into(),
                ));
            }
            Err(_) => return Err(err("\"private_key\" is not a PEM private key".into())),
        };
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| err(format!("\"private_key\" is not a usable RSA key ({e})")))?;
        Ok(ServiceAccountKey {
            client_email,
            client_id: json.client_id,
            private_key_id,
            token_uri: json.token_uri,
            path: path.to_path_buf(),
            key: Arc::new(key),
        })
    }

    /// Read and parse the key file (permissions are checked by the caller).
    pub fn load(path: &Path) -> Result<ServiceAccountKey, KeyError> {
        let bytes = std::fs::read(path).map_err(|e| KeyError {
            path: path.to_path_buf(),
            reason: format!("cannot read: {e}"),
        })?;
        ServiceAccountKey::from_json(&bytes, path)
    }

    /// A signed RS256 assertion: `iss` = the service account, `sub` = the
    /// user to act as, `aud` = the token URL, valid from `now` for one hour.
    pub fn assertion(
        &self,
        subject: &str,
        scopes: &[String],
        audience: &str,
        now: SystemTime,
    ) -> Result<String, KeyError> {
        let iat = jwt::unix_seconds(now);
        let header = serde_json::json!({ "kid": self.private_key_id });
        let claims = serde_json::json!({
            "iss": self.client_email,
            "sub": subject,
            "scope": scopes.join(" "),
            "aud": audience,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        jwt::sign(
            &self.key,
            jwt::Alg::Rs256,
            header,
            &claims,
            &SystemRandom::new(),
        )
        .ok_or_else(|| KeyError {
            path: self.path.clone(),
            reason: "RSA signing failed".into(),
        })
    }
}
