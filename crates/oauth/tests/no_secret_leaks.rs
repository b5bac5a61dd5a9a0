//! Secrets never reach logs, `Debug`, `Display` or errors.
//!
//! One test in its own binary: it installs a global tracing subscriber at
//! TRACE that captures everything (ours and the HTTP stack's), drives every
//! path that logs (authorize, refresh, retries, timeouts, needs-authorization,
//! recovery, rotation, the XOAUTH2 challenge, service accounts), then greps
//! the output and the `Debug`/`Display` of every value for every secret the
//! fake Google handed out.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use oauth::authorize::{self, Options};
use oauth::xoauth2;
use oauth::{Account, AccountConfig, ManagerOptions, OAuthMetrics, TokenManager, store};
use secrecy::{ExposeSecret, SecretString};
use testkit::google::{Fault, SERVICE_ACCOUNT_TEST_KEY, browse};
use tokio::io::BufReader;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn install_capture() -> Capture {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    capture
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_debug_or_errors() {
    let capture = install_capture();
    let s = Setup::new().await;
    let mut shown: Vec<String> = Vec::new(); // Debug/Display output to check

    // 1. authorize, through the browser.
    let account = s.account();
    let flow = authorize::Flow::start(
        &account,
        &Options {
            no_browser: true,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    shown.push(format!("{flow:?}"));
    let url = flow.url().to_string();
    let task = tokio::spawn(async move {
        let mut out = Vec::new();
        let r = flow
            .finish::<BufReader<tokio::io::DuplexStream>>(None, &mut out)
            .await;
        (r, String::from_utf8(out).unwrap())
    });
    let visit = browse(&url, Duration::from_secs(10)).await.unwrap();
    let (summary, out) = task.await.unwrap();
    let summary = summary.unwrap();
    shown.push(format!("{summary:?} {summary} {out} {}", visit.final_body));

    // 2. refreshes, with retries, a timeout and rotation.
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = OAuthMetrics::register(&mut registry);
    let options = ManagerOptions {
        request_timeout: Duration::from_secs(1),
        metrics: Some(metrics),
        ..fast()
    };
    let m = TokenManager::new(vec![account.clone()], options.clone()).unwrap();
    shown.push(format!("{m:?}"));
    let token = m.access_token(NAME).await.unwrap();
    s.google.set_rotate_refresh_tokens(true);
    s.google.fail_next(1, Fault::Status(503));
    s.google.fail_next(1, Fault::Hang(Duration::from_secs(3)));
    m.invalidate(NAME, &token).await;
    let token = m.access_token(NAME).await.unwrap();
    shown.push(format!("{token:?}"));
    s.google.set_rotate_refresh_tokens(false);
    m.invalidate(NAME, &token).await;
    let token = m.access_token(NAME).await.unwrap();

    // 3. the XOAUTH2 initial response (the exchange itself is the
    // delivery side's, tested there).
    shown.push(format!("{:?}", xoauth2::initial_response(EMAIL, &token)));

    // 4. temporary failure after retries.
    s.google.fail_next(4, Fault::Status(500));
    m.invalidate(NAME, &token).await;
    let _ = m.access_token(NAME).await; // the still-valid token is handed out
    tokio::time::sleep(Duration::from_millis(250)).await; // past the cool-down

    // 5. invalid_grant -> needs authorization, then recovery by import.
    for rt in s.google.issued_refresh_tokens() {
        s.google.revoke_refresh_token(&rt);
    }
    m.invalidate(NAME, &token).await;
    let err = m.access_token(NAME).await.unwrap_err();
    shown.push(format!("{err:?} {err}"));
    let file = store::load(&account.token_file).unwrap().unwrap();
    shown.push(format!("{file:?}"));
    let rt = s.google.issue_refresh_token(CLIENT_ID, EMAIL);
    let written = oauth::import_refresh_token(&account, &rt).unwrap();
    shown.push(format!("{written:?}"));
    m.access_token(NAME).await.unwrap();
    shown.push(format!("{:?}", m.status()));
    shown.push(serde_json::to_string(&oauth::status(std::slice::from_ref(&account))).unwrap());

    // 6. a wrong client secret: invalid_client.
    let mut wrong = s.config.clone();
    wrong.name = "other".into();
    wrong.client_secret = Some(SecretString::from("GOCSPX-wrong-secret-value"));
    let bad = Account::resolve(&wrong, &s.ctx()).unwrap();
    let other_rt = s.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&bad, &other_rt).unwrap();
    shown.push(format!("{bad:?} {wrong:?} {:?}", bad.credentials));
    let bad_m = TokenManager::new(vec![bad], options.clone()).unwrap();
    let err = bad_m.access_token("other").await.unwrap_err();
    shown.push(format!("{err:?} {err}"));

    // 7. a service account.
    let key = s
        .google
        .add_service_account("relay@x.iam.gserviceaccount.com");
    let key_path = s.dir.path().join("sa.json");
    write_mode(&key_path, &key.json, 0o600);
    let mut sa = AccountConfig::new("sa", "user@example.com");
    sa.service_account_key_file = Some(key_path);
    sa.token_url = s.google.token_url().parse().unwrap();
    let sa = Account::resolve(&sa, &s.ctx()).unwrap();
    shown.push(format!("{sa:?}"));
    let sa_m = TokenManager::new(vec![sa], options).unwrap();
    sa_m.access_token("sa").await.unwrap();

    // Give the watchers a tick to log whatever they log.
    tokio::time::sleep(Duration::from_millis(150)).await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let shown = shown.join("\n");

    // The capture works and saw the interesting paths.
    for expected in [
        "access token refreshed",
        "retrying",
        "needs authorization",
        "oauthrelay authorize --account work",
        "invalid_client",
    ] {
        assert!(logs.contains(expected), "log lacks {expected:?}:\n{logs}");
    }

    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET.to_string(),
        "GOCSPX-wrong-secret-value".to_string(),
    ];
    secrets.extend(s.google.issued_refresh_tokens());
    secrets.extend(s.google.issued_access_tokens());
    secrets.extend(s.google.issued_authorization_codes());
    // A line from the middle of the private key.
    let key_line = SERVICE_ACCOUNT_TEST_KEY.lines().nth(5).unwrap().to_string();
    secrets.push(key_line);
    assert!(secrets.len() >= 10, "{}", secrets.len());
    for secret in &secrets {
        assert!(!secret.is_empty());
        // Also the first half, in case something truncates.
        let half = &secret[..secret.len() / 2];
        assert!(
            !logs.contains(half),
            "a secret ({}...) is in the logs",
            &secret[..6]
        );
        assert!(
            !shown.contains(half),
            "a secret ({}...) is in Debug/Display output",
            &secret[..6]
        );
    }
    // Nor the XOAUTH2 initial response (base64 of the token).
    let initial = xoauth2::initial_response(EMAIL, &token);
    assert!(!logs.contains(initial.expose_secret()));
}
