//! Property tests of address parsing, through whole sessions: what a client
//! sends in `MAIL FROM:<...>` and `RCPT TO:<...>`, what it is answered, and
//! what lands in the queue's envelope.
//!
//! (The DATA decoder's round trips are in `dot_props.rs`.)
//!
//! Sessions run over an in-memory pipe against one real spool per test
//! binary; every case ends with its message removed again.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use inbound::{Inbound, Metrics, ServerConfig, Settings};
use proptest::prelude::*;
use spool::{MessageId, Spool};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

const HOST: &str = "relay.test";

struct Env {
    rt: tokio::runtime::Runtime,
    spool: Spool,
    inbound: Inbound,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
        let cfg = ServerConfig {
            listen: Vec::new(),
            hostname: Some(HOST.into()),
            ..ServerConfig::default()
        };
        let settings = Settings::new(cfg, HOST, inbound::accept_all_senders()).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let inbound = Inbound::new(settings, spool.clone(), Metrics::new(&mut registry));
        Env {
            rt,
            spool,
            inbound,
            _dir: dir,
        }
    })
}

/// A client on an in-memory pipe to a session from 127.0.0.1 (trusted).
struct Client {
    r: BufReader<ReadHalf<DuplexStream>>,
    w: WriteHalf<DuplexStream>,
}

impl Client {
    async fn open() -> Client {
        let (client, server) = tokio::io::duplex(64 << 10);
        let inbound = env().inbound.clone();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        tokio::spawn(async move { inbound.handle(server, peer, CancellationToken::new()).await });
        let (r, w) = tokio::io::split(client);
        let mut c = Client {
            r: BufReader::new(r),
            w,
        };
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        let ehlo = c.cmd("EHLO client.test").await;
        assert!(ehlo.starts_with("250"), "{ehlo}");
        c
    }

    /// One reply; a multi-line reply is returned as its last line.
    async fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line))
                .await
                .expect("a reply within 10 s")
                .unwrap();
            assert!(n > 0, "the server closed the connection");
            assert!(line.ends_with("\r\n"), "{line:?}");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.trim_end().to_string();
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.reply().await
    }

    /// DATA with a small body; the queue id from the `250`.
    async fn data(&mut self) -> MessageId {
        let r = self.cmd("DATA").await;
        assert!(r.starts_with("354 "), "{r}");
        self.w
            .write_all(b"Subject: property\r\n\r\nbody\r\n.\r\n")
            .await
            .unwrap();
        let r = self.reply().await;
        let id = r
            .strip_prefix("250 2.0.0 Ok: queued as ")
            .unwrap_or_else(|| panic!("not queued: {r}"));
        id.parse().unwrap()
    }
}

/// Take a queued message's envelope (sender, recipients) out of the spool.
async fn take(id: MessageId) -> (String, Vec<String>) {
    let e = env();
    let env = e
        .spool
        .message(id)
        .expect("the queued message is listed")
        .envelope;
    e.spool.remove(id).await.unwrap();
    (env.sender.clone(), env.recipients.clone())
}

// ---- strategies -------------------------------------------------------------

/// RFC 5321 `Atom`: one or more `atext`.
fn atom() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => prop::char::range('a', 'z'),
            1 => prop::char::range('A', 'Z'),
            1 => prop::char::range('0', '9'),
            1 => prop::sample::select("!#$%&'*+-/=?^_`{|}~".chars().collect::<Vec<_>>()),
        ],
        1..8,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

/// `Dot-string`: atoms joined by single dots.
fn local_part() -> impl Strategy<Value = String> {
    prop::collection::vec(atom(), 1..4).prop_map(|a| a.join("."))
}

/// A host name: letter-digit-hyphen labels joined by dots.
fn domain() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", 1..5)
        .prop_map(|l| l.join("."))
}

fn mailbox() -> impl Strategy<Value = String> {
    (local_part(), domain()).prop_map(|(l, d)| format!("{l}@{d}"))
}

/// Non-ASCII mailboxes (RFC 6531): accented and CJK letters in either part.
fn utf8_mailbox() -> impl Strategy<Value = String> {
    let letter = prop_oneof![
        prop::char::range('a', 'z'),
        prop::sample::select(vec!['é', 'ö', 'ß', 'ñ', 'ø', '例', 'え', 'д', 'λ']),
    ];
    let word = prop::collection::vec(letter, 1..8).prop_map(|c| c.into_iter().collect::<String>());
    (word.clone(), prop::collection::vec(word, 1..3))
        .prop_filter("some non-ASCII", |(l, d)| {
            !l.is_ascii() || d.iter().any(|x| !x.is_ascii())
        })
        .prop_map(|(l, d)| format!("{l}@{}", d.join(".")))
}

/// A `Quoted-string` local part with any printable ASCII in it (spaces,
/// `"`, `\`, `@`, dots, brackets), escaped where it must be and now and
/// then where it need not be; with its value.
fn quoted_local_part() -> impl Strategy<Value = (String, String)> {
    let ch = prop_oneof![
        3 => prop::char::range(' ', '~'),
        2 => prop::sample::select(vec![' ', '"', '\\', '@', '.', '<', '>', ',', ':']),
    ];
    prop::collection::vec((ch, prop::bool::weighted(0.1)), 1..16).prop_map(|cs| {
        let value: String = cs.iter().map(|(c, _)| *c).collect();
        let mut written = String::from("\"");
        for (c, needless) in cs {
            if c == '"' || c == '\\' || needless {
                written.push('\\');
            }
            written.push(c);
        }
        written.push('"');
        (written, value)
    })
}

/// The value of a stored address's local part: without quotes and escapes.
fn local_value(stored: &str) -> String {
    let local = &stored[..stored.rfind('@').expect("an @")];
    match local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        Some(quoted) => {
            let mut value = String::new();
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                value.push(if c == '\\' {
                    chars.next().expect("an escaped character")
                } else {
                    c
                });
            }
            value
        }
        None => local.to_string(),
    }
}

/// The verb as clients write it: any letter case.
fn verb(word: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<bool>(), word.len()).prop_map(move |up| {
        word.chars()
            .zip(up)
            .map(|(c, u)| {
                if u {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

/// Paths that RFC 5321 does not allow, each of a kind a broken client or
/// an attacker sends.
fn bad_path() -> impl Strategy<Value = String> {
    prop_oneof![
        // No domain at all.
        local_part().prop_filter("not postmaster", |l| !l.eq_ignore_ascii_case("postmaster")),
        // Two @.
        (local_part(), domain(), domain()).prop_map(|(l, a, b)| format!("{l}@{a}@{b}")),
        // Empty local part.
        domain().prop_map(|d| format!("@{d}")),
        // Empty atoms in the local part.
        (local_part(), domain()).prop_map(|(l, d)| format!(".{l}@{d}")),
        (atom(), atom(), domain()).prop_map(|(a, b, d)| format!("{a}..{b}@{d}")),
        // White space and control characters outside quotes.
        (
            atom(),
            atom(),
            domain(),
            prop::sample::select(vec![" ", "\t", "\x01", "\x7f\x00"])
        )
            .prop_map(|(a, b, d, s)| format!("{a}{s}{b}@{d}")),
        // Angle brackets inside the path.
        (atom(), domain()).prop_map(|(a, d)| format!("{a}<x>@{d}")),
        // Longer than the 256 octets a path may have.
        (local_part(), domain()).prop_map(|(l, d)| format!("{}{l}@{d}", "x".repeat(260))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any dot-atom address, with the verbs in any case and the usual
    /// parameters, is accepted and queued exactly as written.
    #[test]
    fn valid_addresses_are_queued_exactly(
        from in mailbox(),
        rcpts in prop::collection::vec(mailbox(), 1..4),
        mail in verb("MAIL FROM"),
        rcpt in verb("RCPT TO"),
        params in prop::sample::select(vec!["", " SIZE=100", " BODY=8BITMIME", " BODY=7BIT SIZE=5"]),
    ) {
        let (replies, stored) = env().rt.block_on(async {
            let mut c = Client::open().await;
            let mut replies = vec![c.cmd(&format!("{mail}:<{from}>{params}")).await];
            for r in &rcpts {
                replies.push(c.cmd(&format!("{rcpt}:<{r}>")).await);
            }
            let id = c.data().await;
            (replies, take(id).await)
        });
        prop_assert!(replies[0].starts_with("250 2.1.0"), "MAIL: {}", replies[0]);
        for r in &replies[1..] {
            prop_assert!(r.starts_with("250 2.1.5"), "RCPT: {}", r);
        }
        prop_assert_eq!(stored, (from, rcpts));
    }

    /// What the queue stores is what the next hop is sent
    /// (`MAIL FROM:<stored>`, `RCPT TO:<stored>`): written back as a path,
    /// it must be accepted again and mean the same address. Covers quoted
    /// local parts (spaces, `"`, `\`, `@`, needless quotes and escapes)
    /// and source routes, which are rewritten on the way in.
    #[test]
    fn stored_addresses_can_be_sent_on(
        (local, value) in prop_oneof![
            local_part().prop_map(|l| (l.clone(), l)),
            // A quoted string with no characters that need quoting.
            local_part().prop_map(|l| (format!("\"{l}\""), l)),
            quoted_local_part(),
        ],
        d in domain(),
        route in prop::option::of(domain()),
    ) {
        let written = match &route {
            Some(r) => format!("@{r}:{local}@{d}"),
            None => format!("{local}@{d}"),
        };
        let (first, again) = env().rt.block_on(async {
            let mut c = Client::open().await;
            let r = c.cmd(&format!("MAIL FROM:<{written}>")).await;
            assert!(r.starts_with("250 2.1.0"), "MAIL FROM:<{written}>: {r}");
            let r = c.cmd(&format!("RCPT TO:<{written}>")).await;
            assert!(r.starts_with("250 2.1.5"), "RCPT TO:<{written}>: {r}");
            let first = take(c.data().await).await;
            let r = c.cmd(&format!("MAIL FROM:<{}>", first.0)).await;
            assert!(r.starts_with("250 2.1.0"), "stored {:?} sent on: {r}", first.0);
            let r = c.cmd(&format!("RCPT TO:<{}>", first.1[0])).await;
            assert!(r.starts_with("250 2.1.5"), "stored {:?} sent on: {r}", first.1[0]);
            let again = take(c.data().await).await;
            (first, again)
        });
        prop_assert_eq!(&first, &again);
        prop_assert_eq!(&first.1, &vec![first.0.clone()]);
        let stored = first.0;
        prop_assert!(stored.ends_with(&format!("@{d}")), "{} for {}", stored, written);
        prop_assert_eq!(local_value(&stored), value, "{} for {}", stored, written);
    }

    /// Malformed paths get a 5xx naming the address syntax, and the session
    /// goes on: the same client's next, valid transaction is queued.
    #[test]
    fn malformed_addresses_are_refused_and_the_session_goes_on(
        bad in bad_path(),
        good in mailbox(),
        in_rcpt in any::<bool>(),
    ) {
        let (refusal, queued) = env().rt.block_on(async {
            let mut c = Client::open().await;
            let refusal = if in_rcpt {
                let r = c.cmd(&format!("MAIL FROM:<{good}>")).await;
                assert!(r.starts_with("250 2.1.0"), "{r}");
                let refusal = c.cmd(&format!("RCPT TO:<{bad}>")).await;
                let r = c.cmd("RSET").await;
                assert!(r.starts_with("250"), "{r}");
                refusal
            } else {
                c.cmd(&format!("MAIL FROM:<{bad}>")).await
            };
            let r = c.cmd(&format!("MAIL FROM:<{good}>")).await;
            assert!(r.starts_with("250 2.1.0"), "after the refusal: {r}");
            let r = c.cmd(&format!("RCPT TO:<{good}>")).await;
            assert!(r.starts_with("250 2.1.5"), "after the refusal: {r}");
            let queued = take(c.data().await).await;
            (refusal, queued)
        });
        let expected = if in_rcpt { "501 5.1.3 " } else { "501 5.1.7 " };
        prop_assert!(
            refusal.starts_with(expected) || refusal.starts_with("501 5.5.4 "),
            "{:?} was answered {}",
            bad,
            refusal
        );
        prop_assert_eq!(queued, (good.clone(), vec![good]));
    }

    /// Non-ASCII addresses need SMTPUTF8 (RFC 6531): without it `553 5.6.7`,
    /// with it they are queued exactly.
    #[test]
    fn utf8_addresses_need_smtputf8(from in utf8_mailbox(), to in utf8_mailbox()) {
        let (without, with, stored) = env().rt.block_on(async {
            let mut c = Client::open().await;
            let without = c.cmd(&format!("MAIL FROM:<{from}>")).await;
            let with = c.cmd(&format!("MAIL FROM:<{from}> SMTPUTF8")).await;
            let r = c.cmd(&format!("RCPT TO:<{to}>")).await;
            assert!(r.starts_with("250 2.1.5"), "{r}");
            (without, with, take(c.data().await).await)
        });
        prop_assert!(without.starts_with("553 5.6.7"), "{}", without);
        prop_assert!(with.starts_with("250 2.1.0"), "{}", with);
        prop_assert_eq!(stored, (from, vec![to]));
    }
}

/// The null reverse-path is the sender of bounces; it is queued as `""`.
#[test]
fn the_null_sender_is_queued_as_empty() {
    let stored = env().rt.block_on(async {
        let mut c = Client::open().await;
        let r = c.cmd("MAIL FROM:<>").await;
        assert!(r.starts_with("250 2.1.0"), "{r}");
        let r = c.cmd("RCPT TO:<r@example.net>").await;
        assert!(r.starts_with("250 2.1.5"), "{r}");
        take(c.data().await).await
    });
    assert_eq!(stored, (String::new(), vec!["r@example.net".to_string()]));
}
