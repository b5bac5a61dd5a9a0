//! Workspace service accounts: the JWT bearer grant, checked by the fake.

mod common;

use std::time::Duration;

use common::*;
use oauth::{Account, AccountConfig, TokenError, TokenManager};
use secrecy::ExposeSecret;
use testkit::google::{FakeGoogle, GrantType, ServiceAccountKeyFile};

const SA: &str = "relay@oauthrelay-test.iam.gserviceaccount.com";
const USER: &str = "printer@example.com";

fn sa_account(google: &FakeGoogle, dir: &std::path::Path, key_json: &str) -> Account {
    let key_path = dir.join("sa.json");
    write_mode(&key_path, key_json, 0o600);
    let mut config = AccountConfig::new("workspace", USER);
    config.service_account_key_file = Some("sa.json".into()); // relative to the config dir
    config.token_url = google.token_url().parse().unwrap();
    let ctx = oauth::AccountContext::new(dir)
        .with_config_dir(dir)
        .with_credentials_dir(None);
    Account::resolve(&config, &ctx).unwrap()
}

async fn setup() -> (FakeGoogle, tempfile::TempDir, ServiceAccountKeyFile) {
    let google = FakeGoogle::start().await.unwrap();
    let key = google.add_service_account(SA);
    (google, tempfile::tempdir().unwrap(), key)
}

#[tokio::test]
async fn jwt_bearer_exchange_is_verified_by_the_fake() {
    let (google, dir, key) = setup().await;
    google.add_workspace_user(USER);
    let account = sa_account(&google, dir.path(), &key.json);
    assert!(account.is_service_account());
    let m = TokenManager::new(vec![account], fast()).unwrap();

    let token = m.access_token("workspace").await.unwrap();
    assert_eq!(google.token_requests(GrantType::JwtBearer), 1);
    // The access token acts as the impersonated user (XOAUTH2 user=).
    assert_eq!(
        google.email_for(token.secret().expose_secret()).as_deref(),
        Some(USER)
    );

    // What was signed (the signature itself was checked with the public key).
    let (header, claims) = google.last_jwt().unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], key.private_key_id.as_str());
    assert_eq!(claims["iss"], SA);
    assert_eq!(claims["sub"], USER);
    assert_eq!(claims["scope"], "https://mail.google.com/");
    assert_eq!(claims["aud"], google.token_url().as_str());
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert!(exp > iat && exp - iat <= 3600);

    // Cached like any other token.
    assert!(
        m.access_token("workspace")
            .await
            .unwrap()
            .same_token(&token)
    );
    assert_eq!(google.token_requests(GrantType::JwtBearer), 1);
    let st = m.account_status("workspace").unwrap();
    assert!(st.auth.is_authorized());
    assert!(!st.refresh_token_stored);
}

#[tokio::test]
async fn a_bad_signature_is_refused_and_explained() {
    let (google, dir, key) = setup().await;
    let forged = google.forged_service_account_key(&key);
    let account = sa_account(&google, dir.path(), &forged);
    let m = TokenManager::new(vec![account], fast()).unwrap();
    match m.access_token("workspace").await.unwrap_err() {
        TokenError::NeedsAuthorization { code, reason, .. } => {
            assert_eq!(code, "invalid_grant");
            assert!(reason.contains("Invalid JWT Signature"), "{reason}");
            assert!(reason.contains("new JSON key"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        google.last_jwt().is_none(),
        "nothing passed the signature check"
    );

    // Replacing the key file lifts the block (the watcher sees the change).
    let mut events = m.subscribe();
    write_mode(&dir.path().join("sa.json"), &key.json, 0o600);
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    m.access_token("workspace").await.unwrap();
}

#[tokio::test]
async fn missing_delegation_explains_the_admin_console_steps() {
    let (google, dir, key) = setup().await;
    google.set_delegation(SA, false);
    let account = sa_account(&google, dir.path(), &key.json);
    let m = TokenManager::new(vec![account], fast()).unwrap();
    let err = m.access_token("workspace").await.unwrap_err();
    match &err {
        TokenError::NeedsAuthorization {
            code, reason, fix, ..
        } => {
            assert_eq!(code, "unauthorized_client");
            assert!(reason.contains("Domain-wide delegation"), "{reason}");
            assert!(reason.contains("https://mail.google.com/"), "{reason}");
            assert!(fix.contains("reload"), "{fix}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(google.token_requests(GrantType::JwtBearer), 1);
    assert!(m.access_token("workspace").await.is_err());
    assert_eq!(
        google.token_requests(GrantType::JwtBearer),
        1,
        "not retried"
    );

    // The admin grants delegation; SIGHUP gives the account another try.
    google.set_delegation(SA, true);
    m.reload(None).await.unwrap();
    let token = m.access_token("workspace").await.unwrap();
    assert_eq!(google.token_requests(GrantType::JwtBearer), 2);

    // Same with a SIGHUP that re-read the config.
    google.set_delegation(SA, false);
    m.invalidate("workspace", &token).await;
    assert!(
        m.access_token("workspace")
            .await
            .unwrap_err()
            .needs_authorization()
    );
    google.set_delegation(SA, true);
    let account = sa_account(&google, dir.path(), &key.json);
    m.reload(Some(vec![account])).await.unwrap();
    m.access_token("workspace").await.unwrap();
    assert_eq!(google.token_requests(GrantType::JwtBearer), 4);
}

#[tokio::test]
async fn key_files_are_checked() {
    let (google, dir, key) = setup().await;
    let key_path = dir.path().join("sa.json");
    let ctx = oauth::AccountContext::new(dir.path()).with_credentials_dir(None);
    let mut config = AccountConfig::new("workspace", USER);
    config.service_account_key_file = Some(key_path.clone());
    config.token_url = google.token_url().parse().unwrap();

    write_mode(&key_path, &key.json, 0o644);
    let err = Account::resolve(&config, &ctx).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "permissions 0644 for '{0}' are too open; run: chmod 600 {0}",
            key_path.display()
        )
    );

    write_mode(
        &key_path,
        r#"{"type":"authorized_user","client_id":"x"}"#,
        0o600,
    );
    let err = Account::resolve(&config, &ctx).unwrap_err();
    assert!(
        err.to_string().contains("expected \"service_account\""),
        "{err}"
    );

    write_mode(&key_path, &key.json, 0o600);
    config.client_id = Some("x.apps.googleusercontent.com".into());
    let err = Account::resolve(&config, &ctx).unwrap_err();
    assert!(err.to_string().contains("cannot be combined"), "{err}");
}

/// Under the unit the key comes as the credential
/// `<name>.service_account_key` (0440: root's file with an ACL for the
/// service user) and wins over `service_account_key_file`, which the
/// commands run as root outside the unit read instead.
#[tokio::test]
async fn the_key_as_a_systemd_credential_wins_over_the_file() {
    let (google, dir, key) = setup().await;
    google.add_workspace_user(USER);
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let credential = creds.join("workspace.service_account_key");
    write_mode(&credential, &key.json, 0o440);
    let file = dir.path().join("sa.json");
    let mut config = AccountConfig::new("workspace", USER);
    config.service_account_key_file = Some(file.clone());
    config.token_url = google.token_url().parse().unwrap();
    let outside = oauth::AccountContext::new(dir.path()).with_credentials_dir(None);
    let inside = outside.clone().with_credentials_dir(Some(creds.clone()));

    // The file does not exist: only the unit can work.
    assert!(Account::resolve(&config, &outside).is_err());
    let account = Account::resolve(&config, &inside).unwrap();
    match &account.credentials {
        oauth::Credentials::ServiceAccount(k) => assert_eq!(k.path, credential),
        other => panic!("{other:?}"),
    }
    let m = TokenManager::new(vec![account], fast()).unwrap();
    let token = m.access_token("workspace").await.unwrap();
    assert_eq!(
        google.last_jwt().unwrap().0["kid"],
        key.private_key_id.as_str()
    );

    // A new key in the credential is picked up on reload (SIGHUP), with the
    // credential rule again.
    let rotated = google.add_service_account(SA);
    write_mode(&credential, &rotated.json, 0o440);
    m.reload(None).await.unwrap();
    m.invalidate("workspace", &token).await;
    m.access_token("workspace").await.unwrap();
    assert_eq!(
        google.last_jwt().unwrap().0["kid"],
        rotated.private_key_id.as_str()
    );
}
