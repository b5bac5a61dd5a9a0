//! Account resolution, secret sources, permissions and token files.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use oauth::{Account, AccountConfig, AccountContext, ImportError, SecretSource, store};
use secrecy::{ExposeSecret, SecretString};

fn base_config() -> AccountConfig {
    let mut c = AccountConfig::new(NAME, EMAIL);
    c.client_id = Some(CLIENT_ID.into());
    c
}

fn ctx(dir: &Path) -> AccountContext {
    AccountContext::new(dir.join("state"))
        .with_config_dir(dir)
        .with_credentials_dir(None)
}

fn too_open(path: &Path, mode: u32) -> String {
    format!(
        "permissions {mode:04o} for '{0}' are too open; run: chmod 600 {0}",
        path.display()
    )
}

#[test]
fn a_readable_secret_file_is_refused_ssh_style() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret");
    write_mode(&secret, "GOCSPX-x\n", 0o644);
    let mut c = base_config();
    c.client_secret_file = Some("client_secret".into());
    let err = Account::resolve(&c, &ctx(dir.path())).unwrap_err();
    assert_eq!(err.to_string(), too_open(&secret, 0o644));

    write_mode(&secret, "GOCSPX-x\n", 0o640);
    let err = Account::resolve(&c, &ctx(dir.path())).unwrap_err();
    assert_eq!(err.to_string(), too_open(&secret, 0o640));

    write_mode(&secret, "GOCSPX-x\n", 0o600);
    let account = Account::resolve(&c, &ctx(dir.path())).unwrap();
    match &account.credentials {
        oauth::Credentials::Client {
            client_secret,
            secret_source,
            ..
        } => {
            assert_eq!(client_secret.expose_secret(), "GOCSPX-x", "trimmed");
            assert_eq!(secret_source, &SecretSource::File(secret.clone()));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_readable_token_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = base_config();
    c.client_secret = Some(SecretString::from("s"));
    let account = Account::resolve(&c, &ctx(dir.path())).unwrap();
    assert_eq!(
        account.token_file,
        dir.path().join("state/tokens/work.json")
    );
    oauth::import_refresh_token(&account, "1//0g-token").unwrap();
    std::fs::set_permissions(
        &account.token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let err = Account::resolve(&c, &ctx(dir.path())).unwrap_err();
    assert_eq!(err.to_string(), too_open(&account.token_file, 0o644));
    // The daemon's loader refuses it too.
    let err = store::load(&account.token_file).unwrap_err();
    assert_eq!(err.to_string(), too_open(&account.token_file, 0o644));
    // `token status` reports it instead of failing.
    let st = oauth::status(std::slice::from_ref(&account));
    assert!(st[0].problem.as_deref().unwrap().contains("chmod 600"));
}

#[test]
fn exactly_one_client_secret_source() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let file = dir.path().join("secret");
    write_mode(&file, "from-file", 0o600);

    // None at all.
    let err = Account::resolve(&base_config(), &ctx(dir.path())).unwrap_err();
    assert!(err.to_string().contains("no client secret"), "{err}");
    assert!(err.to_string().contains("LoadCredential"), "{err}");

    // Inline and file.
    let mut both = base_config();
    both.client_secret = Some("inline".into());
    both.client_secret_file = Some(file.clone());
    let err = Account::resolve(&both, &ctx(dir.path())).unwrap_err();
    assert!(err.to_string().contains("more than once"), "{err}");

    // The systemd credential <name>.client_secret.
    write_mode(
        &creds.join("work.client_secret"),
        "from-credential\n",
        0o400,
    );
    let with_creds = ctx(dir.path()).with_credentials_dir(Some(creds.clone()));
    let account = Account::resolve(&base_config(), &with_creds).unwrap();
    match &account.credentials {
        oauth::Credentials::Client {
            client_secret,
            secret_source,
            ..
        } => {
            assert_eq!(client_secret.expose_secret(), "from-credential");
            assert!(matches!(secret_source, SecretSource::Credential(_)));
        }
        other => panic!("{other:?}"),
    }
    // Credential plus inline: ambiguous.
    let mut inline = base_config();
    inline.client_secret = Some("inline".into());
    let err = Account::resolve(&inline, &with_creds).unwrap_err();
    assert!(err.to_string().contains("the systemd credential"), "{err}");

    // No client id.
    let mut no_id = base_config();
    no_id.client_id = None;
    no_id.client_secret = Some("s".into());
    assert!(Account::resolve(&no_id, &ctx(dir.path())).is_err());
}

#[test]
fn names_and_paths() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = base_config();
    c.client_secret = Some("s".into());
    for bad in ["", "../x", ".hidden", "a b", "a/b"] {
        c.name = bad.into();
        assert!(Account::resolve(&c, &ctx(dir.path())).is_err(), "{bad:?}");
    }
    c.name = "work".into();
    c.token_file = Some("tok/work.json".into());
    let account = Account::resolve(&c, &ctx(dir.path())).unwrap();
    assert_eq!(account.token_file, dir.path().join("tok/work.json"));

    c.email = "not-an-address".into();
    assert!(Account::resolve(&c, &ctx(dir.path())).is_err());

    let mut a = base_config();
    a.client_secret = Some("s".into());
    let b = a.clone();
    let err = oauth::resolve_all(&[a, b], &ctx(dir.path())).unwrap_err();
    assert!(err.to_string().contains("two [[accounts]]"), "{err}");
}

#[test]
fn token_files_are_written_atomically_0600_in_a_0700_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/tokens/work.json");
    let written = store::update(&path, |f| {
        f.account = "work".into();
        f.refresh_token = Some("1//0g-first".into());
    })
    .unwrap();
    assert_eq!(written.version, store::FORMAT_VERSION);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    let first_inode = std::fs::metadata(&path).unwrap().ino();

    store::update(&path, |f| f.refresh_token = Some("1//0g-second".into())).unwrap();
    // Replaced by rename (new inode), no temporary files left behind.
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), first_inode);
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["work.json".to_string()]);
    let loaded = store::load(&path).unwrap().unwrap();
    assert_eq!(
        loaded.refresh_token.unwrap().expose_secret(),
        "1//0g-second"
    );
    assert_eq!(loaded.account, "work", "other fields kept");

    // A corrupt file is an error that says what to do.
    write_mode(&path, "{not json", 0o600);
    let err = store::load(&path).unwrap_err();
    assert!(err.to_string().contains("oauthrelay authorize"), "{err}");
}

#[test]
fn root_hands_the_file_to_the_token_directory_owner() {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    std::fs::write(&probe, "").unwrap();
    if std::fs::metadata(&probe).unwrap().uid() != 0 {
        eprintln!("not root: nothing to hand over, skipping");
        return;
    }
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::os::unix::fs::chown(&tokens, Some(65534), Some(65534)).unwrap();
    let path = tokens.join("work.json");
    store::update(&path, |f| f.refresh_token = Some("1//0g".into())).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(mode(&path), 0o600);

    // `sudo oauthrelay authorize` before the daemon ever ran: the state
    // directory exists (owned by the service user), `tokens/` does not.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let path = state.join("tokens/sub/work.json");
    store::update(&path, |f| f.refresh_token = Some("1//0g".into())).unwrap();
    for p in [state.join("tokens"), state.join("tokens/sub"), path.clone()] {
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{}", p.display());
    }
    assert_eq!(mode(&state.join("tokens")), 0o700);
}

#[test]
fn import_validates_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = base_config();
    c.client_secret = Some("s".into());
    let account = Account::resolve(&c, &ctx(dir.path())).unwrap();
    for bad in ["", "  \n", "two tokens", "ya29.an-access-token"] {
        assert!(
            matches!(
                oauth::import_refresh_token(&account, bad),
                Err(ImportError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
    assert!(!account.token_file.exists());
    let written = oauth::import_refresh_token(&account, "  1//0g-abc\r\n").unwrap();
    assert_eq!(written.refresh_token.unwrap().expose_secret(), "1//0g-abc");
    let st = &oauth::status(std::slice::from_ref(&account))[0];
    assert!(st.refresh_token_stored && st.authorized && !st.needs_authorization);
    assert_eq!(mode(&account.token_file), 0o600);
}

#[test]
fn status_of_an_account_never_authorized() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = base_config();
    c.client_secret = Some("s".into());
    let account = Account::resolve(&c, &ctx(dir.path())).unwrap();
    let st = &oauth::status(std::slice::from_ref(&account))[0];
    assert!(!st.refresh_token_stored && !st.authorized && st.needs_authorization);
    assert!(
        st.fix
            .as_deref()
            .unwrap()
            .contains("oauthrelay authorize --account work")
    );
    let json = serde_json::to_value(st).unwrap();
    assert_eq!(json["kind"], "oauth_client");
    assert!(json["access_token_expires_at"].is_null());
}
