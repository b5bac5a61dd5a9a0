//! XOAUTH2 against a scripted SMTP peer over a real socket.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use oauth::AccessToken;
use oauth::xoauth2::{self, SmtpTransport, StreamTransport, Xoauth2Error};
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const USER: &str = "me@gmail.com";
const TOKEN: &str = "ya29.a0-test-access-token";
const CHALLENGE_JSON: &str =
    r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#;

fn token() -> AccessToken {
    AccessToken::new(
        SecretString::from(TOKEN),
        SystemTime::now() + Duration::from_secs(3600),
    )
}

/// A peer that checks the AUTH line, then plays `script`: for each entry,
/// optionally expect a line from the client, then send the bytes. Returns
/// the lines it received.
fn peer(
    listener: TcpListener,
    script: Vec<(Option<&'static str>, &'static str)>,
) -> JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut seen = Vec::new();
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        seen.push(line.clone());
        for (expect, send) in script {
            if let Some(expected) = expect {
                line.clear();
                r.read_line(&mut line).await.unwrap();
                assert_eq!(line, expected, "client sent an unexpected line");
                seen.push(line.clone());
            }
            w.write_all(send.as_bytes()).await.unwrap();
        }
        // Hold the connection until the client is done.
        line.clear();
        let _ = r.read_line(&mut line).await;
        seen
    })
}

async fn connect() -> (TcpListener, impl FnOnce() -> JoinHandle<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, move || {
        tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() })
    })
}

fn auth_line_ok(line: &str) {
    let b64 = line
        .strip_prefix("AUTH XOAUTH2 ")
        .unwrap()
        .trim_end_matches("\r\n");
    let raw = STANDARD.decode(b64).unwrap();
    assert_eq!(
        raw,
        format!("user={USER}\x01auth=Bearer {TOKEN}\x01\x01").as_bytes()
    );
    assert!(line.ends_with("\r\n"));
}

#[tokio::test]
async fn accepted_token() {
    let (listener, dial) = connect().await;
    let server = peer(listener, vec![(None, "235 2.7.0 Accepted\r\n250 leftover")]);
    let mut t = StreamTransport::new(dial().await.unwrap());
    xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(5))
        .await
        .unwrap();
    // Bytes after the reply stay for the caller.
    assert_eq!(t.buffered(), b"250 leftover");
    drop(t);
    let seen = server.await.unwrap();
    auth_line_ok(&seen[0]);
}

#[tokio::test]
async fn refused_token_runs_the_334_dance() {
    let (listener, dial) = connect().await;
    let challenge = format!("334 {}\r\n", STANDARD.encode(CHALLENGE_JSON));
    let challenge: &'static str = Box::leak(challenge.into_boxed_str());
    let server = peer(
        listener,
        vec![
            (None, challenge),
            (
                // The client must answer the challenge with an empty line,
                // not with the token again.
                Some("\r\n"),
                "535-5.7.8 Username and Password not accepted. For more information, go to\r\n\
                 535 5.7.8  https://support.google.com/mail/?p=BadCredentials abc - gsmtp\r\n",
            ),
        ],
    );
    let mut t = StreamTransport::new(dial().await.unwrap());
    let err = xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(5))
        .await
        .unwrap_err();
    match &err {
        Xoauth2Error::TokenRejected {
            status,
            scope,
            reply,
        } => {
            assert_eq!(status.as_deref(), Some("400"));
            assert_eq!(scope.as_deref(), Some("https://mail.google.com/"));
            assert_eq!(reply.code, 535);
            assert_eq!(reply.esc, [5, 7, 8]);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("535 5.7.8"), "{err}");
    assert!(!err.to_string().contains(TOKEN));
    drop(t);
    let seen = server.await.unwrap();
    auth_line_ok(&seen[0]);
    assert_eq!(seen[1], "\r\n");
}

#[tokio::test]
async fn a_refused_long_line_falls_back_to_the_two_step_form() {
    let (listener, dial) = connect().await;
    let expected_line: &'static str = Box::leak(
        format!(
            "{}\r\n",
            STANDARD.encode(format!("user={USER}\x01auth=Bearer {TOKEN}\x01\x01"))
        )
        .into_boxed_str(),
    );
    let server = peer(
        listener,
        vec![
            (
                None,
                "555-5.5.2 Syntax error, command line too long.\r\n555 5.5.2 x - gsmtp\r\n",
            ),
            (Some("AUTH XOAUTH2\r\n"), "334 \r\n"),
            (Some(expected_line), "235 2.7.0 Accepted\r\n"),
        ],
    );
    let mut t = StreamTransport::new(dial().await.unwrap());
    xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(5))
        .await
        .unwrap();
    drop(t);
    let seen = server.await.unwrap();
    auth_line_ok(&seen[0]);
    assert_eq!(seen.len(), 3);
}

#[tokio::test]
async fn other_refusals_carry_the_reply_for_classification() {
    for (reply, code, esc) in [
        (
            "454-4.7.0 Too many login attempts, please try again later. For more information, go to\r\n\
             454 4.7.0  https://support.google.com/mail/answer/7126229 x - gsmtp\r\n",
            454,
            [4, 7, 0],
        ),
        (
            "535-5.7.8 Username and Password not accepted. For more information, go to\r\n\
             535 5.7.8  https://support.google.com/mail/?p=BadCredentials x - gsmtp\r\n",
            535,
            [5, 7, 8],
        ),
        (
            "504 5.7.4 Unrecognized authentication type.\r\n",
            504,
            [5, 7, 4],
        ),
    ] {
        let (listener, dial) = connect().await;
        let server = peer(listener, vec![(None, reply)]);
        let mut t = StreamTransport::new(dial().await.unwrap());
        let err = xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(5))
            .await
            .unwrap_err();
        match &err {
            Xoauth2Error::Refused { reply } => {
                assert_eq!(reply.code, code);
                assert_eq!(reply.esc, esc);
            }
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(err.reply().unwrap().code, code);
        drop(t);
        server.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_times_out() {
    let (listener, dial) = connect().await;
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(s);
    });
    let mut t = StreamTransport::new(dial().await.unwrap());
    let err = xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, Xoauth2Error::Timeout(_)), "{err:?}");
    server.abort();
}

#[tokio::test]
async fn a_closed_connection_is_an_io_error() {
    let (listener, dial) = connect().await;
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        drop(s);
    });
    let mut t = StreamTransport::new(dial().await.unwrap());
    server.await.unwrap();
    let err = xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Xoauth2Error::Io(_)), "{err:?}");
}

/// Any connection type can implement the trait (here: a scripted fake).
struct Scripted {
    sent: Vec<Vec<u8>>,
    replies: Vec<smtp_proto::Response<String>>,
}

impl SmtpTransport for Scripted {
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sent.push(bytes.to_vec());
        Ok(())
    }
    async fn read_reply(&mut self) -> std::io::Result<smtp_proto::Response<String>> {
        Ok(self.replies.remove(0))
    }
}

#[tokio::test]
async fn works_over_any_transport() {
    let mut t = Scripted {
        sent: Vec::new(),
        replies: vec![smtp_proto::Response::new(
            235,
            2,
            7,
            0,
            "Accepted".to_string(),
        )],
    };
    xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(t.sent.len(), 1);
    let initial = xoauth2::initial_response(USER, &token());
    use secrecy::ExposeSecret;
    assert_eq!(
        t.sent[0],
        format!("AUTH XOAUTH2 {}\r\n", initial.expose_secret()).into_bytes()
    );
}

#[tokio::test]
async fn delivery_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync + Clone>(_: &T) {}
    let manager = oauth::TokenManager::new(vec![], oauth::ManagerOptions::default()).unwrap();
    send_sync(&manager);
    let (stream, _peer) = tokio::io::duplex(64);
    let mut transport = StreamTransport::new(stream);
    let delivery = async move {
        let token = manager.access_token("default").await?;
        xoauth2::authenticate(&mut transport, USER, &token, Duration::from_secs(1))
            .await
            .ok();
        Ok::<_, oauth::TokenError>(())
    };
    // Spawnable on a multi-threaded runtime.
    send(&delivery);
}

fn reply(code: u16, esc: [u8; 3], text: &str) -> smtp_proto::Response<String> {
    smtp_proto::Response::new(code, esc[0], esc[1], esc[2], text.to_string())
}

/// Only a 535 after the challenge is a verdict on the token; anything else
/// (a 454, or a 501 saying our answer was wrong) is no reason to refresh.
#[tokio::test]
async fn after_the_challenge_only_a_535_means_the_token_was_rejected() {
    let challenge = reply(334, [0, 0, 0], &STANDARD.encode(CHALLENGE_JSON));
    for last in [
        reply(
            454,
            [4, 7, 0],
            "Cannot authenticate due to a temporary system problem.",
        ),
        reply(501, [5, 5, 2], "Invalid response"),
    ] {
        let code = last.code;
        let mut t = Scripted {
            sent: Vec::new(),
            replies: vec![challenge.clone(), last],
        };
        let err = xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(5))
            .await
            .unwrap_err();
        match &err {
            Xoauth2Error::Refused { reply } => assert_eq!(reply.code, code),
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(t.sent[1], b"\r\n");
    }
}

/// A TLS session with the fake Gmail, greeted and after EHLO.
async fn gmail_session(
    gmail: &testkit::gmail::FakeGmail,
    ca: &testkit::ca::TestCa,
) -> StreamTransport<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(gmail.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(ca.client_config())
        .connect(name, tcp)
        .await
        .unwrap();
    let mut t = StreamTransport::new(tls);
    assert_eq!(t.read_reply().await.unwrap().code, 220);
    t.send(b"EHLO client.test\r\n").await.unwrap();
    assert_eq!(t.read_reply().await.unwrap().code, 250);
    t
}

/// The fake Gmail checks the client's answer to its `334` failure
/// challenge: the empty line earns the 535 a correct client expects, while
/// a client that re-sends the token there (mail-send 0.7 and lettre do) gets
/// a 501, so the delivery tests of the 334 dance catch that regression.
#[tokio::test]
async fn the_fake_gmail_refuses_a_token_sent_again_after_its_challenge() {
    let ca = testkit::ca::TestCa::new();
    let gmail = testkit::gmail::FakeGmail::start(&ca, testkit::gmail::TlsMode::Implicit)
        .await
        .unwrap();
    gmail.reject_tokens(3);

    // Right: the empty line, then 535 5.7.8.
    let mut t = gmail_session(&gmail, &ca).await;
    let err = xoauth2::authenticate(&mut t, USER, &token(), Duration::from_secs(5))
        .await
        .unwrap_err();
    match &err {
        Xoauth2Error::TokenRejected { reply, status, .. } => {
            assert_eq!((reply.code, reply.esc), (535, [5, 7, 8]));
            assert_eq!(status.as_deref(), Some("400"));
        }
        other => panic!("{other:?}"),
    }

    // Wrong: the token again (and, on another connection, any other text).
    let initial = xoauth2::initial_response(USER, &token());
    let initial = secrecy::ExposeSecret::expose_secret(&initial).to_string();
    for answer in [initial.clone(), "hello".to_string()] {
        let mut t = gmail_session(&gmail, &ca).await;
        t.send(format!("AUTH XOAUTH2 {initial}\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(t.read_reply().await.unwrap().code, 334);
        t.send(format!("{answer}\r\n").as_bytes()).await.unwrap();
        let last = t.read_reply().await.unwrap();
        assert_eq!((last.code, last.esc), (501, [5, 5, 2]), "{last:?}");
        // The session goes on: a MAIL is still refused for want of AUTH.
        t.send(b"MAIL FROM:<me@gmail.com>\r\n").await.unwrap();
        assert_eq!(t.read_reply().await.unwrap().code, 530);
    }
}
