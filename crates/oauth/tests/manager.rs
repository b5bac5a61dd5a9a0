//! The token manager against the fake Google: caching, single-flight,
//! retries, needs-authorization and recovery.

mod common;

use std::time::Duration;

use common::*;
use oauth::store;
use oauth::{AccountEvent, ManagerOptions, OAuthMetrics, TokenError, TokenManager};
use secrecy::ExposeSecret;
use testkit::google::{Fault, GrantType};

fn refreshes(s: &Setup) -> usize {
    s.google.token_requests(GrantType::RefreshToken)
}

#[tokio::test(start_paused = true)]
async fn cached_token_is_reused_until_the_margin_then_refreshed() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let m = TokenManager::new(
        vec![account],
        ManagerOptions {
            watch_interval: None,
            ..ManagerOptions::default()
        },
    )
    .unwrap();

    let first = m.access_token(NAME).await.unwrap();
    assert_eq!(refreshes(&s), 1);
    assert!(
        s.google
            .is_valid_access_token(first.secret().expose_secret())
    );
    assert_eq!(
        s.google
            .email_for(first.secret().expose_secret())
            .as_deref(),
        Some(EMAIL)
    );

    // Google's tokens live 3599 s; the margin is 5 min: until 3299 s the
    // cached token is handed out without a request.
    tokio::time::advance(Duration::from_secs(3290)).await;
    let again = m.access_token(NAME).await.unwrap();
    assert!(again.same_token(&first));
    assert_eq!(refreshes(&s), 1);

    // Inside the margin: one refresh, a new token, still valid at Google.
    tokio::time::advance(Duration::from_secs(20)).await;
    let second = m.access_token(NAME).await.unwrap();
    assert!(!second.same_token(&first));
    assert_eq!(refreshes(&s), 2);
    assert!(
        s.google
            .is_valid_access_token(second.secret().expose_secret())
    );

    // The old token really expires at Google a few minutes later.
    tokio::time::advance(Duration::from_secs(300)).await;
    assert!(
        !s.google
            .is_valid_access_token(first.secret().expose_secret())
    );
    assert!(
        s.google
            .is_valid_access_token(second.secret().expose_secret())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_callers_cause_exactly_one_request() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    // A slow answer keeps the refresh in flight while everyone piles up.
    s.google
        .fail_next(1, Fault::Slow(Duration::from_millis(300)));
    let m = TokenManager::new(vec![account], fast()).unwrap();

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move { m.access_token(NAME).await }));
    }
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await.unwrap().unwrap());
    }
    assert_eq!(
        refreshes(&s),
        1,
        "single flight: one request for 50 callers"
    );
    assert!(tokens.iter().all(|t| t.same_token(&tokens[0])));
}

#[tokio::test(start_paused = true)]
async fn server_errors_and_timeouts_are_retried_with_backoff() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = OAuthMetrics::register(&mut registry);
    let m = TokenManager::new(
        vec![account],
        ManagerOptions {
            request_timeout: Duration::from_secs(10),
            watch_interval: None,
            metrics: Some(metrics.clone()),
            ..ManagerOptions::default()
        },
    )
    .unwrap();
    s.google.fail_next(1, Fault::Status(500));
    s.google.fail_next(1, Fault::Status(503));
    s.google.fail_next(1, Fault::Hang(Duration::from_secs(600)));

    let started = tokio::time::Instant::now();
    let token = m.access_token(NAME).await.unwrap();
    assert!(
        s.google
            .is_valid_access_token(token.secret().expose_secret())
    );
    assert_eq!(refreshes(&s), 4, "500, 503, a hang, then success");
    // 1 s + 2 s + 4 s of backoff and one 10 s timeout.
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(17), "{waited:?}");
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    assert_eq!(metrics.refresh_count(NAME, false), 3);
    assert_eq!(metrics.refresh_count(NAME, true), 1);
    assert_eq!(metrics.authorized(NAME), 1);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"oauthrelay_token_refreshes_total{account="work",result="error"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"oauthrelay_account_authorized{account="work"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_are_bounded_then_a_temporary_error_without_hammering() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let m = TokenManager::new(
        vec![account],
        ManagerOptions {
            watch_interval: None,
            ..ManagerOptions::default()
        },
    )
    .unwrap();
    s.google.fail_next(4, Fault::Status(503));

    let err = m.access_token(NAME).await.unwrap_err();
    assert!(err.is_temporary(), "{err}");
    assert!(err.to_string().contains("HTTP 503"), "{err}");
    assert_eq!(refreshes(&s), 4);

    // Within the cool-down: the same error at once, no request.
    let err = m.access_token(NAME).await.unwrap_err();
    assert!(err.is_temporary());
    assert_eq!(refreshes(&s), 4);
    let st = m.account_status(NAME).unwrap();
    assert!(
        st.auth.is_authorized(),
        "a temporary failure is not a lost authorization"
    );
    assert_eq!(
        st.last_refresh.as_ref().map(|r| r.result),
        Some(store::RefreshResult::Error)
    );

    // Google is back after the cool-down.
    tokio::time::advance(Duration::from_secs(11)).await;
    m.access_token(NAME).await.unwrap();
    assert_eq!(refreshes(&s), 5);
}

#[tokio::test(start_paused = true)]
async fn a_still_valid_token_is_used_when_refresh_fails_temporarily() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let m = TokenManager::new(
        vec![account],
        ManagerOptions {
            watch_interval: None,
            ..ManagerOptions::default()
        },
    )
    .unwrap();
    let first = m.access_token(NAME).await.unwrap();
    tokio::time::advance(Duration::from_secs(3400)).await; // inside the margin
    s.google.fail_next(4, Fault::Status(500));
    let t = m.access_token(NAME).await.unwrap();
    assert!(t.same_token(&first), "the old token has 199 s left: use it");
    assert_eq!(refreshes(&s), 5);
}

#[tokio::test]
async fn invalidate_forces_a_refresh() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let m = TokenManager::new(vec![account], fast()).unwrap();
    let first = m.access_token(NAME).await.unwrap();
    assert!(m.access_token(NAME).await.unwrap().same_token(&first));
    assert_eq!(refreshes(&s), 1);

    s.google.expire_access_token(first.secret().expose_secret());
    m.invalidate(NAME, &first).await;
    let second = m.access_token(NAME).await.unwrap();
    assert!(!second.same_token(&first));
    assert!(
        s.google
            .is_valid_access_token(second.secret().expose_secret())
    );
    assert_eq!(refreshes(&s), 2);
}

/// Several connections refused the same token (`535` on each): one
/// refresh, and every caller gets the one new token.
#[tokio::test]
async fn invalidating_the_same_refused_token_many_times_refreshes_once() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let m = TokenManager::new(vec![account], fast()).unwrap();
    let stale = m.access_token(NAME).await.unwrap();
    assert_eq!(refreshes(&s), 1);
    s.google.expire_access_token(stale.secret().expose_secret());

    // Four workers, one after the other: each reports the token it was
    // refused, then asks for a new one.
    let mut fresh = Vec::new();
    for _ in 0..4 {
        m.invalidate(NAME, &stale).await;
        fresh.push(m.access_token(NAME).await.unwrap());
    }
    assert_eq!(
        refreshes(&s),
        2,
        "one refresh for four reports of one token"
    );
    assert!(fresh.iter().all(|t| t.same_token(&fresh[0])));
    assert!(!fresh[0].same_token(&stale));

    // Four at once, all refused the same (new) token.
    s.google
        .expire_access_token(fresh[0].secret().expose_secret());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let m = m.clone();
        let refused = fresh[0].clone();
        tasks.push(tokio::spawn(async move {
            m.invalidate(NAME, &refused).await;
            m.access_token(NAME).await.unwrap()
        }));
    }
    let mut third = Vec::new();
    for t in tasks {
        third.push(t.await.unwrap());
    }
    assert_eq!(refreshes(&s), 3, "still one refresh per refused token");
    assert!(third.iter().all(|t| t.same_token(&third[0])));
    assert!(
        s.google
            .is_valid_access_token(third[0].secret().expose_secret())
    );

    // A token that is not the cached one (already replaced) changes nothing.
    m.invalidate(NAME, &stale).await;
    assert!(m.access_token(NAME).await.unwrap().same_token(&third[0]));
    assert_eq!(refreshes(&s), 3);
}

#[tokio::test]
async fn invalid_grant_needs_authorization_until_a_token_import() {
    let s = Setup::new().await;
    let (account, rt) = s.authorized_account();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = OAuthMetrics::register(&mut registry);
    let m = TokenManager::new(
        vec![account.clone()],
        ManagerOptions {
            metrics: Some(metrics.clone()),
            ..fast()
        },
    )
    .unwrap();
    let mut events = m.subscribe();

    s.google.revoke_refresh_token(&rt);
    let err = m.access_token(NAME).await.unwrap_err();
    match &err {
        TokenError::NeedsAuthorization { code, fix, .. } => {
            assert_eq!(code, "invalid_grant");
            assert!(fix.contains("oauthrelay authorize --account work"), "{fix}");
            assert!(
                fix.contains("oauthrelay token import --account work"),
                "{fix}"
            );
        }
        other => panic!("expected NeedsAuthorization, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("Token has been expired or revoked."),
        "{err}"
    );
    assert_eq!(
        events.recv().await.unwrap(),
        AccountEvent::NeedsAuthorization(NAME.into())
    );

    // No more requests, however often delivery asks.
    for _ in 0..10 {
        assert!(
            m.access_token(NAME)
                .await
                .unwrap_err()
                .needs_authorization()
        );
    }
    assert_eq!(refreshes(&s), 1);

    // Visible in status, the token file, `token status` and metrics.
    let st = m.account_status(NAME).unwrap();
    assert!(!st.auth.is_authorized());
    assert!(
        st.auth
            .fix()
            .unwrap()
            .contains("oauthrelay authorize --account work")
    );
    let file = store::load(&account.token_file).unwrap().unwrap();
    assert!(file.needs_authorization);
    assert_eq!(
        file.last_refresh
            .as_ref()
            .and_then(|r| r.error_code.as_deref()),
        Some("invalid_grant")
    );
    let cli = oauth::status(std::slice::from_ref(&account));
    assert!(!cli[0].auth.is_authorized());
    assert_eq!(metrics.authorized(NAME), 0);

    // A restart does not retry a dead refresh token either.
    let restarted = TokenManager::new(vec![account.clone()], fast()).unwrap();
    assert!(
        restarted
            .access_token(NAME)
            .await
            .unwrap_err()
            .needs_authorization()
    );
    assert_eq!(refreshes(&s), 1);
    drop(restarted);

    // `oauthrelay token import` in another process: the watcher notices the
    // file without anyone asking for a token, and says so.
    let fresh = s.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&account, &format!("{fresh}\n")).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the watcher should notice the new token file")
        .unwrap();
    assert_eq!(event, AccountEvent::Authorized(NAME.into()));
    assert!(m.account_status(NAME).unwrap().auth.is_authorized());
    assert_eq!(metrics.authorized(NAME), 1);

    let token = m.access_token(NAME).await.unwrap();
    assert!(
        s.google
            .is_valid_access_token(token.secret().expose_secret())
    );
    assert_eq!(refreshes(&s), 2);
    let file = store::load(&account.token_file).unwrap().unwrap();
    assert!(!file.needs_authorization);
    assert_eq!(file.refresh_token.unwrap().expose_secret(), fresh);
}

#[tokio::test]
async fn a_new_token_file_is_noticed_by_the_next_call_without_the_watcher() {
    let s = Setup::new().await;
    let account = s.account(); // never authorized
    let m = TokenManager::new(
        vec![account.clone()],
        ManagerOptions {
            watch_interval: None,
            ..fast()
        },
    )
    .unwrap();
    let err = m.access_token(NAME).await.unwrap_err();
    assert!(err.needs_authorization());
    assert!(
        err.to_string().contains("no refresh token is stored"),
        "{err}"
    );
    assert_eq!(s.google.total_token_requests(), 0);

    let rt = s.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&account, &rt).unwrap();
    m.access_token(NAME).await.unwrap();
    assert_eq!(refreshes(&s), 1);
}

#[tokio::test]
async fn invalid_client_is_fixed_by_reload_with_the_corrected_config() {
    let s = Setup::new().await;
    let (good, _) = s.authorized_account();
    let mut wrong = s.config.clone();
    wrong.client_secret = Some("not-the-secret".into());
    let bad = oauth::Account::resolve(&wrong, &s.ctx()).unwrap();
    let m = TokenManager::new(vec![bad], fast()).unwrap();
    let mut events = m.subscribe();

    let err = m.access_token(NAME).await.unwrap_err();
    match &err {
        TokenError::NeedsAuthorization {
            code, fix, reason, ..
        } => {
            assert_eq!(code, "invalid_client");
            assert!(reason.contains("client id/secret"), "{reason}");
            assert!(fix.contains("client secret in the config"), "{fix}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        events.recv().await.unwrap(),
        AccountEvent::NeedsAuthorization(NAME.into())
    );

    // SIGHUP after fixing the config.
    m.reload(Some(vec![good])).await.unwrap();
    assert_eq!(
        events.recv().await.unwrap(),
        AccountEvent::Authorized(NAME.into())
    );
    m.access_token(NAME).await.unwrap();
    assert_eq!(refreshes(&s), 2);
    assert!(events.try_recv().is_err(), "exactly one event per change");
}

#[tokio::test]
async fn a_token_imported_during_a_failing_refresh_is_not_overwritten() {
    let s = Setup::new().await;
    let (account, old) = s.authorized_account();
    let m = TokenManager::new(vec![account.clone()], fast()).unwrap();
    s.google.revoke_refresh_token(&old);
    s.google.fail_next(1, Fault::Slow(Duration::from_secs(1)));

    let pending = tokio::spawn({
        let m = m.clone();
        async move { m.access_token(NAME).await }
    });
    // Wait until the fake holds the request (it answers a second later).
    while s.google.token_requests(GrantType::RefreshToken) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // `token import` runs while the refresh with the old token is in flight.
    let fresh = s.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&account, &fresh).unwrap();

    // The old token's invalid_grant does not condemn the new one.
    let err = pending.await.unwrap().unwrap_err();
    assert!(err.is_temporary(), "{err}");
    let file = store::load(&account.token_file).unwrap().unwrap();
    assert!(!file.needs_authorization);
    assert_eq!(file.refresh_token.unwrap().expose_secret(), fresh);
    assert!(m.account_status(NAME).unwrap().auth.is_authorized());
    m.access_token(NAME).await.unwrap();
}

#[tokio::test]
async fn google_policy_errors_also_need_authorization() {
    for (fault, code) in [
        (Fault::unauthorized_client(), "unauthorized_client"),
        (Fault::admin_policy_enforced(), "admin_policy_enforced"),
        (Fault::invalid_client(), "invalid_client"),
    ] {
        let s = Setup::new().await;
        let (account, _) = s.authorized_account();
        let m = TokenManager::new(vec![account], fast()).unwrap();
        s.google.fail_next(1, fault);
        match m.access_token(NAME).await.unwrap_err() {
            TokenError::NeedsAuthorization { code: got, .. } => assert_eq!(got, code),
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(refreshes(&s), 1, "{code}: not retried");
        assert!(
            m.access_token(NAME)
                .await
                .unwrap_err()
                .needs_authorization()
        );
        assert_eq!(refreshes(&s), 1);
    }
}

#[tokio::test]
async fn a_new_refresh_token_from_google_replaces_the_old_one() {
    let s = Setup::new().await;
    s.google.set_rotate_refresh_tokens(true);
    let (account, original) = s.authorized_account();
    let m = TokenManager::new(vec![account.clone()], fast()).unwrap();

    let first = m.access_token(NAME).await.unwrap();
    let stored = store::load(&account.token_file).unwrap().unwrap();
    let rotated = stored.refresh_token.unwrap().expose_secret().to_string();
    assert_ne!(rotated, original);

    // The old one is revoked at the fake: the next refresh only works with
    // the new one.
    m.invalidate(NAME, &first).await;
    let second = m.access_token(NAME).await.unwrap();
    assert_eq!(refreshes(&s), 2);

    // Without rotation the stored refresh token is kept as it is.
    s.google.set_rotate_refresh_tokens(false);
    let before = store::load(&account.token_file).unwrap().unwrap();
    m.invalidate(NAME, &second).await;
    m.access_token(NAME).await.unwrap();
    let after = store::load(&account.token_file).unwrap().unwrap();
    assert_eq!(
        before.refresh_token.unwrap().expose_secret(),
        after.refresh_token.unwrap().expose_secret()
    );
    assert!(after.access_token_expires_at.is_some());
}

#[tokio::test]
async fn each_refresh_is_recorded_in_the_token_file() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let m = TokenManager::new(vec![account.clone()], fast()).unwrap();
    let token = m.access_token(NAME).await.unwrap();

    let file = store::load(&account.token_file).unwrap().unwrap();
    assert_eq!(
        file.access_token.unwrap().expose_secret(),
        token.secret().expose_secret()
    );
    let rec = file.last_refresh.unwrap();
    assert_eq!(rec.result, store::RefreshResult::Ok);
    assert!(!file.needs_authorization);
    assert_eq!(common::mode(&account.token_file), 0o600);

    // What `token status` shows, as JSON.
    let json = serde_json::to_value(oauth::status(std::slice::from_ref(&account))).unwrap();
    let st = &json[0];
    assert_eq!(st["account"], "work");
    assert_eq!(st["authorized"], true);
    assert_eq!(st["refresh_token_stored"], true);
    assert_eq!(st["last_refresh"]["result"], "ok");
    assert!(
        st["access_token_expires_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    // A second manager (a restart) reuses the stored access token.
    drop(m);
    let again = TokenManager::new(vec![account], fast()).unwrap();
    assert!(again.access_token(NAME).await.unwrap().same_token(&token));
    assert_eq!(refreshes(&s), 1);
}

#[tokio::test]
async fn unknown_accounts_and_duplicates_are_errors() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    assert!(matches!(
        TokenManager::new(vec![account.clone(), account.clone()], fast()),
        Err(oauth::ManagerError::DuplicateAccount(_))
    ));
    let m = TokenManager::new(vec![account], fast()).unwrap();
    assert!(matches!(
        m.access_token("nope").await,
        Err(TokenError::UnknownAccount(_))
    ));
    assert_eq!(m.accounts(), vec!["work".to_string()]);
}

#[tokio::test]
async fn reload_adds_and_removes_accounts() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let m = TokenManager::new(vec![], fast()).unwrap();
    assert!(m.status().is_empty());
    m.reload(Some(vec![account])).await.unwrap();
    m.access_token(NAME).await.unwrap();
    m.reload(Some(vec![])).await.unwrap();
    assert!(matches!(
        m.access_token(NAME).await,
        Err(TokenError::UnknownAccount(_))
    ));
}

#[tokio::test]
async fn https_token_endpoint_with_the_configured_ca() {
    let ca = testkit::ca::TestCa::new();
    let google = testkit::google::FakeGoogle::start_with_tls(&ca)
        .await
        .unwrap();
    google.add_client(CLIENT_ID, CLIENT_SECRET);
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca.write_to(dir.path());
    let mut config = client_config(&google);
    config.token_url = google.https_token_url().unwrap().parse().unwrap();
    let ctx = oauth::AccountContext::new(dir.path()).with_credentials_dir(None);

    // Without the CA the certificate is refused: a temporary error.
    let untrusting = oauth::Account::resolve(&config, &ctx).unwrap();
    let rt = google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&untrusting, &rt).unwrap();
    let m = TokenManager::new(
        vec![untrusting],
        ManagerOptions {
            attempts: 1,
            ..fast()
        },
    )
    .unwrap();
    let err = m.access_token(NAME).await.unwrap_err();
    assert!(err.is_temporary(), "{err}");
    assert_eq!(
        google.token_requests(GrantType::RefreshToken),
        0,
        "TLS failed before HTTP"
    );

    config.ca_file = Some(ca_pem);
    let trusting = oauth::Account::resolve(&config, &ctx).unwrap();
    let m = TokenManager::new(vec![trusting], fast()).unwrap();
    let token = m.access_token(NAME).await.unwrap();
    assert!(google.is_valid_access_token(token.secret().expose_secret()));
}

#[tokio::test]
async fn a_token_gmail_refuses_after_a_refresh_needs_authorization_until_import() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = OAuthMetrics::register(&mut registry);
    let m = TokenManager::new(
        vec![account.clone()],
        ManagerOptions {
            metrics: Some(metrics.clone()),
            ..fast()
        },
    )
    .unwrap();
    let mut events = m.subscribe();
    m.access_token(NAME).await.unwrap();

    // Delivery saw `535 5.7.8` for a fresh token: the account, not the
    // token, is the problem.
    m.mark_rejected(NAME, "535 5.7.8 Username and Password not accepted")
        .await;
    assert_eq!(
        events.recv().await.unwrap(),
        AccountEvent::NeedsAuthorization(NAME.into())
    );
    let err = m.access_token(NAME).await.unwrap_err();
    assert!(err.needs_authorization(), "{err:?}");
    assert!(err.to_string().contains("535 5.7.8"), "{err}");
    let st = m.account_status(NAME).unwrap();
    assert!(!st.auth.is_authorized());
    assert!(
        st.auth
            .fix()
            .unwrap()
            .contains("oauthrelay authorize --account work")
    );
    assert_eq!(metrics.authorized(NAME), 0);
    let file = store::load(&account.token_file).unwrap().unwrap();
    assert!(file.needs_authorization);
    assert_eq!(
        file.last_refresh
            .as_ref()
            .and_then(|r| r.error_code.as_deref()),
        Some("smtp_auth_rejected")
    );
    let requests = refreshes(&s);
    assert!(m.access_token(NAME).await.is_err());
    assert_eq!(refreshes(&s), requests, "no requests while held");

    // Re-authorizing (here: token import) brings it back.
    let fresh = s.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&account, &fresh).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the watcher notices the new token file")
        .unwrap();
    assert_eq!(event, AccountEvent::Authorized(NAME.into()));
    assert!(m.access_token(NAME).await.is_ok());
    assert_eq!(metrics.authorized(NAME), 1);
}

/// An OAuth refusal that may be temporary (here `403 admin_policy_enforced`,
/// which an administrator lifts elsewhere) holds the account like any
/// refusal, but the manager asks again on the retry schedule (doubling,
/// capped at an hour) and the hold lifts by itself when the endpoint
/// answers; `invalid_grant` is never asked again until the token changes.
#[tokio::test(start_paused = true)]
async fn a_refusal_that_may_be_temporary_is_probed_again_and_lifts_by_itself() {
    let s = Setup::new().await;
    let (account, _) = s.authorized_account();
    let m = TokenManager::new(
        vec![account],
        ManagerOptions {
            watch_interval: Some(Duration::from_secs(2)),
            probe_initial: Duration::from_secs(60),
            probe_max: Duration::from_secs(4 * 3600),
            ..ManagerOptions::default()
        },
    )
    .unwrap();
    let mut events = m.subscribe();
    let policy = || Fault::Error {
        status: 403,
        error: "admin_policy_enforced".into(),
        description: "Access blocked by an administrator".into(),
    };
    s.google.fail_next(7, policy());
    let err = m.access_token(NAME).await.unwrap_err();
    assert!(err.needs_authorization(), "{err}");
    assert_eq!(
        events.recv().await.unwrap(),
        AccountEvent::NeedsAuthorization(NAME.into())
    );
    let first = refreshes(&s);
    // Held: callers get the refusal without a request until the probe.
    assert!(m.access_token(NAME).await.is_err());
    assert_eq!(refreshes(&s), first);
    let st = m.account_status(NAME).unwrap();
    let retry = st.auth.refusal().and_then(|r| r.retry_at).expect("retried");
    let wait = retry.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(wait <= Duration::from_secs(60), "{wait:?}");
    // Probes at 1, 2, 4, 8, 16, 32 minutes (each refused), then every hour
    // at most: the 7th refusal is at 1 + 2 + ... + 32 = 63 minutes.
    let mut waits = Vec::new();
    for _ in 0..6 {
        let n = refreshes(&s);
        let t0 = tokio::time::Instant::now();
        while refreshes(&s) == n {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        waits.push(t0.elapsed().as_secs());
    }
    for (w, expected) in waits.iter().zip([60u64, 120, 240, 480, 960, 1920]) {
        assert!(*w >= expected && *w <= expected + 4, "{waits:?}");
    }
    let st = m.account_status(NAME).unwrap();
    let retry = st.auth.refusal().and_then(|r| r.retry_at).expect("retried");
    let wait = retry.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        wait <= Duration::from_secs(3600),
        "capped at an hour: {wait:?}"
    );
    // The administrator fixed it: the next probe succeeds, the hold lifts.
    let ev = tokio::time::timeout(Duration::from_secs(3700), async {
        loop {
            match events.recv().await.unwrap() {
                AccountEvent::Authorized(n) => break n,
                _ => continue,
            }
        }
    })
    .await
    .expect("authorized again by itself");
    assert_eq!(ev, NAME);
    assert!(m.account_status(NAME).unwrap().auth.is_authorized());
    assert!(m.access_token(NAME).await.is_ok());

    // invalid_grant waits for `authorize` / `token import`: no retry_at,
    // no request however long.
    for rt in s.google.issued_refresh_tokens() {
        s.google.revoke_refresh_token(&rt);
    }
    let t = m.access_token(NAME).await.unwrap();
    m.invalidate(NAME, &t).await;
    let err = m.access_token(NAME).await.unwrap_err();
    assert!(err.needs_authorization(), "{err}");
    let st = m.account_status(NAME).unwrap();
    assert_eq!(st.auth.refusal().map(|r| r.retry_at), Some(None));
    let n = refreshes(&s);
    tokio::time::sleep(Duration::from_secs(5 * 3600)).await;
    assert_eq!(refreshes(&s), n, "never asked again by itself");
}
