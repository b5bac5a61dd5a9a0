//! `oauthrelay authorize` end to end: the test plays the browser against the
//! fake Google's consent endpoint and the flow's loopback listener.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use oauth::authorize::{self, AuthorizeError, Options, Via};
use oauth::store;
use secrecy::ExposeSecret;
use testkit::google::{Consent, GrantType, browse, http_get};
use tokio::io::{AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::mpsc;

/// A writer the test can read while `run` is still going.
struct ChanWriter(mpsc::UnboundedSender<String>);

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.send(String::from_utf8_lossy(buf).into_owned());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Wait until the printed text contains an indented URL line; return it.
async fn printed_url(rx: &mut mpsc::UnboundedReceiver<String>, printed: &mut String) -> String {
    loop {
        if let Some(line) = printed
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("http://") && l.contains("/o/oauth2/v2/auth?"))
        {
            return line.to_string();
        }
        let more = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("authorize printed no URL")
            .expect("authorize ended without printing a URL");
        printed.push_str(&more);
    }
}

fn no_browser() -> Options {
    Options {
        no_browser: true,
        timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

type Paste = BufReader<DuplexStream>;

#[tokio::test]
async fn full_flow_through_the_browser() {
    let s = Setup::new().await;
    let account = s.account();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn({
        let account = account.clone();
        async move {
            let mut out = ChanWriter(tx);
            authorize::run::<Paste>(&account, &no_browser(), &mut out, None).await
        }
    });

    let mut printed = String::new();
    let url = printed_url(&mut rx, &mut printed).await;
    assert!(printed.contains("ssh -L"), "{printed}");
    assert!(printed.contains("paste it here"), "{printed}");

    // The browser: consent page redirects to the loopback listener, which
    // answers with a success page once the code is exchanged.
    let visit = browse(&url, Duration::from_secs(10)).await.unwrap();
    assert_eq!(visit.consent_status, 302);
    let redirect = visit.redirected_to.clone().unwrap();
    assert!(redirect.starts_with("http://127.0.0.1:"), "{redirect}");
    assert!(redirect.contains("code="), "{redirect}");
    assert_eq!(visit.final_status, Some(200));
    assert!(
        visit.final_body.contains("Authorized"),
        "{}",
        visit.final_body
    );
    assert!(visit.final_body.contains(EMAIL));

    let summary = task.await.unwrap().unwrap();
    assert_eq!(summary.via, Via::Redirect);
    assert_eq!(summary.account, NAME);
    assert_eq!(summary.token_file, s.token_file());
    let next = summary.to_string();
    assert!(
        next.contains("oauthrelay token status --account work"),
        "{next}"
    );

    // What the authorization URL asked Google for.
    let consent = s.google.last_consent_request().unwrap();
    assert_eq!(consent.get("client_id"), Some(CLIENT_ID));
    assert_eq!(consent.get("response_type"), Some("code"));
    assert_eq!(consent.get("access_type"), Some("offline"));
    assert_eq!(consent.get("prompt"), Some("consent"));
    assert_eq!(consent.get("code_challenge_method"), Some("S256"));
    assert_eq!(consent.get("scope"), Some("https://mail.google.com/"));
    assert_eq!(consent.get("login_hint"), Some(EMAIL));
    assert!(consent.get("state").is_some_and(|s| s.len() >= 16));
    assert!(
        consent
            .get("redirect_uri")
            .is_some_and(|r| r.starts_with("http://127.0.0.1:"))
    );
    // The code was exchanged once, with the PKCE verifier (the fake checks it).
    assert_eq!(s.google.token_requests(GrantType::AuthorizationCode), 1);

    // Stored: a refresh token Google knows, in a 0600 file in a 0700 dir.
    let file = store::load(&s.token_file()).unwrap().unwrap();
    let rt = file.refresh_token.unwrap().expose_secret().to_string();
    assert!(s.google.issued_refresh_tokens().contains(&rt));
    assert!(!file.needs_authorization);
    assert!(file.access_token_expires_at.is_some());
    assert_eq!(mode(&s.token_file()), 0o600);
    assert_eq!(mode(s.token_file().parent().unwrap()), 0o700);

    // And it works for delivery.
    let m = oauth::TokenManager::new(vec![account], fast()).unwrap();
    let token = m.access_token(NAME).await.unwrap();
    assert!(
        s.google
            .is_valid_access_token(token.secret().expose_secret())
    );
}

#[tokio::test]
async fn headless_paste_the_final_address() {
    let s = Setup::new().await;
    let account = s.account();
    let flow = authorize::Flow::start(&account, &no_browser())
        .await
        .unwrap();
    let url = flow.url().to_string();
    let (mut keyboard, stdin) = tokio::io::duplex(4096);
    let task = tokio::spawn(async move {
        let mut out = Vec::new();
        let r = flow.finish(Some(BufReader::new(stdin)), &mut out).await;
        (r, String::from_utf8(out).unwrap())
    });

    // The browser is on another machine: it gets the redirect address but
    // cannot load it. The user copies it from the address bar.
    let (status, headers, _) = http_get(&url, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status, 302);
    let location = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("location"))
        .unwrap()
        .1
        .clone();
    keyboard.write_all(b"\n").await.unwrap(); // stray Enter: ignored
    keyboard.write_all(b"something else\n").await.unwrap(); // explained, ignored
    keyboard
        .write_all(format!("  {location}  \n").as_bytes())
        .await
        .unwrap();

    let (result, out) = task.await.unwrap();
    let summary = result.unwrap();
    assert_eq!(summary.via, Via::Pasted);
    assert!(out.contains("That is not the redirect address"), "{out}");
    let file = store::load(&s.token_file()).unwrap().unwrap();
    assert!(file.refresh_token.is_some());
    assert_eq!(s.google.token_requests(GrantType::AuthorizationCode), 1);
}

#[tokio::test]
async fn a_mismatched_state_is_refused() {
    let s = Setup::new().await;
    let account = s.account();
    let flow = authorize::Flow::start(&account, &no_browser())
        .await
        .unwrap();
    let url = flow.url().to_string();
    let task = tokio::spawn(async move { flow.finish::<Paste>(None, &mut Vec::new()).await });

    let (_, headers, _) = http_get(&url, Duration::from_secs(5)).await.unwrap();
    let location = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("location"))
        .unwrap()
        .1
        .clone();
    // A stale or forged answer: right listener, wrong state.
    let mut forged = url::Url::parse(&location).unwrap();
    let pairs: Vec<(String, String)> = forged
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                "forged-state".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(pairs);
    let (status, _, body) = http_get(forged.as_str(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("state does not match"), "{body}");

    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, AuthorizeError::StateMismatch), "{err:?}");
    assert!(err.to_string().contains("CSRF"), "{err}");
    assert_eq!(
        s.google.token_requests(GrantType::AuthorizationCode),
        0,
        "code never exchanged"
    );
    assert!(!s.token_file().exists());
}

#[tokio::test]
async fn access_denied_is_explained() {
    let s = Setup::new().await;
    s.google.set_consent(Consent::cancel());
    let account = s.account();
    let flow = authorize::Flow::start(&account, &no_browser())
        .await
        .unwrap();
    let url = flow.url().to_string();
    let task = tokio::spawn(async move { flow.finish::<Paste>(None, &mut Vec::new()).await });
    let visit = browse(&url, Duration::from_secs(5)).await.unwrap();
    assert!(visit.redirected_to.unwrap().contains("error=access_denied"));
    assert!(
        visit.final_body.contains("Authorization failed"),
        "{}",
        visit.final_body
    );

    let err = task.await.unwrap().unwrap_err();
    match &err {
        AuthorizeError::Google {
            code, explanation, ..
        } => {
            assert_eq!(code, "access_denied");
            assert!(explanation.contains("clicked Cancel"), "{explanation}");
            assert!(explanation.contains("test user"), "{explanation}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!s.token_file().exists());
}

#[tokio::test]
async fn invalid_scope_is_explained() {
    let mut s = Setup::new().await;
    // A scope the transport can use, and one Google does not know.
    s.config.scopes = vec![
        "https://mail.google.com/".into(),
        "https://www.googleapis.com/auth/gmail.bogus".into(),
    ];
    let account = s.account();
    let flow = authorize::Flow::start(&account, &no_browser())
        .await
        .unwrap();
    let url = flow.url().to_string();
    let task = tokio::spawn(async move { flow.finish::<Paste>(None, &mut Vec::new()).await });
    browse(&url, Duration::from_secs(5)).await.unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, AuthorizeError::Google { code, .. } if code == "invalid_scope"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("https://mail.google.com/"),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_client_secret_fails_the_exchange_with_an_explanation() {
    let mut s = Setup::new().await;
    s.config.client_secret = Some("wrong".into());
    let account = s.account();
    let flow = authorize::Flow::start(&account, &no_browser())
        .await
        .unwrap();
    let url = flow.url().to_string();
    let task = tokio::spawn(async move { flow.finish::<Paste>(None, &mut Vec::new()).await });
    browse(&url, Duration::from_secs(5)).await.unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, AuthorizeError::Google { code, .. } if code == "invalid_client"),
        "{err:?}"
    );
    assert!(err.to_string().contains("client id/secret"), "{err}");
}

#[tokio::test]
async fn gives_up_after_the_timeout() {
    let s = Setup::new().await;
    let account = s.account();
    let opts = Options {
        timeout: Duration::from_millis(300),
        ..no_browser()
    };
    let err = authorize::run::<Paste>(&account, &opts, &mut Vec::new(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, AuthorizeError::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("paste"), "{err}");
}

#[tokio::test]
async fn a_fixed_port_for_ssh_forwarding() {
    let s = Setup::new().await;
    let account = s.account();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let flow = authorize::Flow::start(
        &account,
        &Options {
            port,
            ..no_browser()
        },
    )
    .await
    .unwrap();
    assert_eq!(flow.port(), port);
    assert_eq!(flow.redirect_uri(), format!("http://127.0.0.1:{port}/"));
    assert!(
        flow.instructions(false)
            .contains(&format!("ssh -L {port}:127.0.0.1:{port}"))
    );

    // The port is taken now: a second run says so.
    let err = authorize::Flow::start(
        &account,
        &Options {
            port,
            ..no_browser()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AuthorizeError::Listen { .. }), "{err:?}");
    assert!(err.to_string().contains("--port"), "{err}");

    // Other paths on the listener are not the callback.
    let url = flow.url().to_string();
    let task = tokio::spawn(async move { flow.finish::<Paste>(None, &mut Vec::new()).await });
    let (status, _, _) = http_get(
        &format!("http://127.0.0.1:{port}/favicon.ico"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    browse(&url, Duration::from_secs(5)).await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn service_accounts_have_nothing_to_authorize() {
    let s = Setup::new().await;
    let key = s
        .google
        .add_service_account("relay@project.iam.gserviceaccount.com");
    let key_path = s.dir.path().join("sa.json");
    write_mode(&key_path, &key.json, 0o600);
    let mut config = oauth::AccountConfig::new("sa", "user@example.com");
    config.service_account_key_file = Some(key_path);
    config.token_url = s.google.token_url().parse().unwrap();
    let account = oauth::Account::resolve(&config, &s.ctx()).unwrap();
    let err = authorize::Flow::start(&account, &no_browser())
        .await
        .unwrap_err();
    assert!(matches!(err, AuthorizeError::ServiceAccount(_)), "{err:?}");
}
