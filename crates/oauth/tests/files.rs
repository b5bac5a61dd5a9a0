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
            assert_eq!(
                client_secret.as_ref().unwrap().expose_secret(),
                "GOCSPX-x",
                "trimmed"
            );
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
    assert!(st[0].auth.problem().unwrap().contains("chmod 600"));
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
            assert_eq!(
                client_secret.as_ref().unwrap().expose_secret(),
                "from-credential"
            );
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
    assert!(st.refresh_token_stored && st.auth.is_authorized());
    assert_eq!(mode(&account.token_file), 0o600);
}

#[test]
fn status_of_an_account_never_authorized() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = base_config();
    c.client_secret = Some("s".into());
    let account = Account::resolve(&c, &ctx(dir.path())).unwrap();
    let st = &oauth::status(std::slice::from_ref(&account))[0];
    assert!(!st.refresh_token_stored && !st.auth.is_authorized());
    assert!(
        st.auth
            .fix()
            .unwrap()
            .contains("oauthrelay authorize --account work")
    );
    let json = serde_json::to_value(st).unwrap();
    assert_eq!(json["kind"], "oauth_client");
    assert!(json["access_token_expires_at"].is_null());
}

fn client_secret_of(account: &Account) -> (String, SecretSource) {
    match &account.credentials {
        oauth::Credentials::Client {
            client_secret,
            secret_source,
            ..
        } => (
            client_secret.as_ref().unwrap().expose_secret().to_string(),
            secret_source.clone(),
        ),
        other => panic!("{other:?}"),
    }
}

/// systemd writes credentials root-owned, mode 0400, and gives the service
/// user read access with an ACL; `stat` then shows the ACL mask as group
/// bits (0440). That must not be refused; others' bits still are.
#[test]
fn a_systemd_credential_with_an_acl_mask_in_the_group_bits_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let credential = creds.join("work.client_secret");
    write_mode(&credential, "GOCSPX-from-credential\n", 0o440);
    let with_creds = ctx(dir.path()).with_credentials_dir(Some(creds.clone()));
    let account = Account::resolve(&base_config(), &with_creds).unwrap();
    assert_eq!(
        client_secret_of(&account),
        (
            "GOCSPX-from-credential".to_string(),
            SecretSource::Credential(credential.clone())
        )
    );

    // World-readable is not what systemd makes: refused, without the bogus
    // `chmod 600` hint.
    write_mode(&credential, "GOCSPX-from-credential\n", 0o444);
    let err = Account::resolve(&base_config(), &with_creds).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "permissions 0444 for the credential '{}' are too open: others can read it",
            credential.display()
        )),
        "{text}"
    );
    assert!(!text.contains("chmod 600"), "{text}");

    // The same 0440 file outside the credentials directory is an ordinary
    // secret file: the ssh rule applies.
    std::fs::remove_file(&credential).unwrap();
    let plain = dir.path().join("plain.secret");
    write_mode(&plain, "GOCSPX-x\n", 0o440);
    let mut c = base_config();
    c.client_secret_file = Some(plain.clone());
    let err = Account::resolve(&c, &with_creds).unwrap_err();
    assert_eq!(err.to_string(), too_open(&plain, 0o440));
}

/// The documented systemd setup: `client_secret_file` in the config, and
/// the unit loads that file as the credential for its service user. Inside
/// the unit the credential wins; outside (the commands, run as root) the
/// file is read.
#[test]
fn client_secret_file_together_with_a_credential_for_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let file = dir.path().join("work.secret");
    write_mode(&file, "GOCSPX-from-file\n", 0o600);
    let mut c = base_config();
    c.client_secret_file = Some("work.secret".into());

    // Outside the unit: no credential, the file.
    let account = Account::resolve(&c, &ctx(dir.path())).unwrap();
    assert_eq!(
        client_secret_of(&account),
        ("GOCSPX-from-file".into(), SecretSource::File(file.clone()))
    );
    // Inside: the credential; the file (unreadable to the service user) is
    // not even looked at.
    let credential = creds.join("work.client_secret");
    write_mode(&credential, "GOCSPX-from-credential\n", 0o440);
    write_mode(&file, "GOCSPX-from-file\n", 0o644);
    let with_creds = ctx(dir.path()).with_credentials_dir(Some(creds.clone()));
    let account = Account::resolve(&c, &with_creds).unwrap();
    assert_eq!(
        client_secret_of(&account),
        (
            "GOCSPX-from-credential".into(),
            SecretSource::Credential(credential)
        )
    );
    // A credentials directory without this account's credential: the file.
    write_mode(&file, "GOCSPX-from-file\n", 0o600);
    let other = dir.path().join("other-credentials");
    std::fs::create_dir(&other).unwrap();
    let account = Account::resolve(&c, &ctx(dir.path()).with_credentials_dir(Some(other))).unwrap();
    assert_eq!(client_secret_of(&account).0, "GOCSPX-from-file");
}

#[test]
fn without_a_secret_outside_the_unit_the_error_says_what_to_add() {
    let dir = tempfile::tempdir().unwrap();
    let err = Account::resolve(&base_config(), &ctx(dir.path())).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no client secret"), "{text}");
    assert!(
        text.contains("$CREDENTIALS_DIRECTORY is not set")
            && text.contains("LoadCredential=work.client_secret:FILE")
            && text.contains("client_secret_file"),
        "{text}"
    );
}

/// `token status` and `token import` resolve accounts without secrets: a
/// secret that only the unit can see (a credential) does not stop them.
#[test]
fn token_status_and_import_need_no_client_secret() {
    let dir = tempfile::tempdir().unwrap();
    let no_secret = base_config();
    assert!(Account::resolve(&no_secret, &ctx(dir.path())).is_err());

    let lean = ctx(dir.path()).without_secrets();
    let account = Account::resolve(&no_secret, &lean).unwrap();
    assert!(matches!(
        account.credentials,
        oauth::Credentials::NotLoaded {
            service_account: false
        }
    ));
    assert!(!account.is_service_account());
    assert!(
        !oauth::status(std::slice::from_ref(&account))[0]
            .auth
            .is_authorized()
    );
    oauth::import_refresh_token(&account, "1//0g-imported").unwrap();
    let st = &oauth::status(std::slice::from_ref(&account))[0];
    assert!(st.refresh_token_stored && st.auth.is_authorized(), "{st:?}");
    assert_eq!(mode(&account.token_file), 0o600);

    // Not readable either: an unreadable secret file is not opened.
    let mut unreadable = base_config();
    unreadable.client_secret_file = Some(dir.path().join("missing.secret"));
    assert!(Account::resolve(&unreadable, &lean).is_ok());

    // Such an account cannot be used to get tokens.
    let err = oauth::TokenManager::new(vec![account.clone()], Default::default()).unwrap_err();
    assert!(
        err.to_string().contains("without its client secret"),
        "{err}"
    );

    // A service account is still known as one (import refuses it).
    let mut sa = AccountConfig::new("sa", "printer@example.com");
    sa.service_account_key_file = Some(dir.path().join("not-read.json"));
    let sa = Account::resolve(&sa, &lean).unwrap();
    assert!(sa.is_service_account());
    assert!(matches!(
        oauth::import_refresh_token(&sa, "1//0g-x"),
        Err(ImportError::ServiceAccount(_))
    ));
}

/// An existing token directory others can write to is refused (they could
/// swap the token file), as ssh does; one they can only read is fine.
#[test]
fn a_token_directory_group_or_others_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let set = |m: u32| {
        std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    let mut c = base_config();
    c.client_secret = Some("s".into());
    c.token_file = Some(tokens.join("work.json"));
    let expected = |m: u32| {
        format!(
            "permissions {m:04o} for the token directory '{0}' are too open: group or others can write to it and replace the token file; run: chmod go-w {0}",
            tokens.display()
        )
    };

    // Readable by all, like /etc/oauthrelay: fine; the file is 0600.
    set(0o755);
    let account = Account::resolve(&c, &ctx(dir.path())).unwrap();
    oauth::import_refresh_token(&account, "1//0g-first").unwrap();
    assert_eq!(mode(&account.token_file), 0o600);

    for m in [0o775, 0o777, 0o1777, 0o757] {
        set(m);
        // The daemon refuses to start, and so do the commands.
        let err = Account::resolve(&c, &ctx(dir.path())).unwrap_err();
        assert_eq!(err.to_string(), expected(m));
        let err = Account::resolve(&c, &ctx(dir.path()).without_secrets()).unwrap_err();
        assert_eq!(err.to_string(), expected(m));
        // Reading and writing through the store (a running daemon, when
        // the mode changes under it) refuse too.
        let err = store::load(&account.token_file).unwrap_err();
        assert_eq!(err.to_string(), expected(m));
        let err = oauth::import_refresh_token(&account, "1//0g-second").unwrap_err();
        assert_eq!(err.to_string(), expected(m));
    }

    // The fix it names works.
    set(0o777);
    let status = std::process::Command::new("chmod")
        .arg("go-w")
        .arg(&tokens)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(mode(&tokens), 0o755);
    assert!(Account::resolve(&c, &ctx(dir.path())).is_ok());
    let loaded = store::load(&account.token_file).unwrap().unwrap();
    assert_eq!(loaded.refresh_token.unwrap().expose_secret(), "1//0g-first");
}
