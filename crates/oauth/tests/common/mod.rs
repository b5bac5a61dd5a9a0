//! Shared set-up for the oauth integration tests: a fake Google and an
//! account pointed at it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use oauth::{Account, AccountConfig, AccountContext, ManagerOptions};
use secrecy::SecretString;
use testkit::google::{Consent, FakeGoogle};

pub const CLIENT_ID: &str = "123456789-test.apps.googleusercontent.com";
pub const CLIENT_SECRET: &str = "GOCSPX-client-secret-for-tests";
pub const EMAIL: &str = "me@gmail.com";
pub const NAME: &str = "work";

pub struct Setup {
    pub google: FakeGoogle,
    pub dir: tempfile::TempDir,
    pub config: AccountConfig,
}

impl Setup {
    pub async fn new() -> Setup {
        let google = FakeGoogle::start().await.unwrap();
        google.add_client(CLIENT_ID, CLIENT_SECRET);
        google.set_consent(Consent::approve(EMAIL));
        let dir = tempfile::tempdir().unwrap();
        let config = client_config(&google);
        Setup {
            google,
            dir,
            config,
        }
    }

    pub fn ctx(&self) -> AccountContext {
        AccountContext::new(self.dir.path())
            .with_config_dir(self.dir.path())
            .with_credentials_dir(None)
    }

    pub fn account(&self) -> Account {
        Account::resolve(&self.config, &self.ctx()).unwrap()
    }

    /// An account holding a fresh refresh token from the fake.
    pub fn authorized_account(&self) -> (Account, String) {
        let account = self.account();
        let rt = self.google.issue_refresh_token(CLIENT_ID, EMAIL);
        oauth::import_refresh_token(&account, &rt).unwrap();
        (account, rt)
    }

    pub fn token_file(&self) -> std::path::PathBuf {
        self.dir.path().join("tokens").join(format!("{NAME}.json"))
    }
}

pub fn client_config(google: &FakeGoogle) -> AccountConfig {
    let mut c = AccountConfig::new(NAME, EMAIL);
    c.client_id = Some(CLIENT_ID.into());
    c.client_secret = Some(SecretString::from(CLIENT_SECRET));
    c.auth_url = google.auth_url().parse().unwrap();
    c.token_url = google.token_url().parse().unwrap();
    c
}

/// Manager options with short waits (the defaults are for production).
pub fn fast() -> ManagerOptions {
    ManagerOptions {
        request_timeout: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
        failure_cooldown: Duration::from_millis(200),
        watch_interval: Some(Duration::from_millis(50)),
        ..ManagerOptions::default()
    }
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

pub fn write_mode(path: &Path, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
