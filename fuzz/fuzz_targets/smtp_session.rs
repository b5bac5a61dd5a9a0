//! Whole SMTP sessions from hostile clients.
//!
//! Each input drives one real `inbound` session (the same code the daemon
//! runs per connection) over an in-memory pipe, with a real spool on tmpfs.
//!
//! Input layout (so seeds can be written by hand):
//!
//! - byte 0, flags:
//!   - bit 0: the client is trusted (127.0.0.1, in `allow_networks`);
//!     otherwise it is 192.0.2.1 and must authenticate to relay.
//!   - bit 1: STARTTLS is offered (and AUTH then needs TLS, as in
//!     production); otherwise AUTH works in plain text, so the fuzzer can
//!     reach it.
//!   - bits 2-4: size of the pipe's buffer (1 byte to 64 KiB): how the
//!     server's reads and the client's writes are cut.
//!   - bit 5: tight limits (1 KiB messages, 2 recipients, 512-byte lines,
//!     5 errors) instead of the defaults, to reach the refusal paths.
//!   - bit 6: no `[[server.users]]` (an untrusted client is refused at
//!     connect and the connection closed).
//! - byte 1: how the rest is cut into separate writes (0: one write;
//!   otherwise pseudo-random pieces of 1..=2*byte bytes).
//! - the rest: what the client sends. It is written piece by piece, letting
//!   the session run between writes, then the client closes its side.
//!
//! The one configured user is `u` with password `p` (`AUTH PLAIN AHUAcA==`).
//!
//! What must hold for every input:
//!
//! - no panic, and the session ends within `HANG_LIMIT` of the client's
//!   end of input;
//! - every reply line is `NNN` + space or dash + text + CRLF, and every
//!   single-line 2xx/4xx/5xx reply but the greeting and HELO carries an
//!   enhanced status code of the same class (checked up to STARTTLS, after
//!   which the bytes are TLS records);
//! - a message is in the spool if and only if the client got
//!   `250 2.0.0 Ok: queued as ID` for it, and its stored body starts with
//!   our `Received:` header;
//! - an untrusted client that did not get `235` never gets a message queued.

#![no_main]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use inbound::{ByteSize, Inbound, Metrics, ServerConfig, Settings, TlsConfig, UserConfig};
use libfuzzer_sys::fuzz_target;
use spool::Spool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Longest a session may take after the client's last byte. Real sessions
/// here finish in microseconds; only a wait that nothing will end can take
/// this long.
const HANG_LIMIT: Duration = Duration::from_secs(20);
const HOST: &str = "fuzz.test";

struct World {
    rt: tokio::runtime::Runtime,
    spool: Spool,
    cert_file: PathBuf,
    key_file: PathBuf,
    password_hash: String,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        // tmpfs: the spool's fdatasync is cheap there, so the fuzzer spends
        // its time in the session code.
        let dir = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm"),
            false => tempfile::tempdir(),
        }
        .expect("temporary directory");
        let options = spool::Options {
            // Small segments, so space taken by abandoned bodies is
            // reclaimed as the run goes.
            segment_size: 1 << 20,
            ..spool::Options::default()
        };
        let (spool, _) = Spool::open_with(&dir.path().join("spool"), options).expect("spool");
        let ca = testkit::ca::TestCa::new();
        ca.write_to(dir.path());
        World {
            rt,
            spool,
            cert_file: dir.path().join("server.pem"),
            key_file: dir.path().join("server.key"),
            password_hash: cheap_hash("p"),
            _dir: dir,
        }
    })
}

/// An argon2id PHC string with the smallest cost, so a correct password is
/// checked in microseconds (the session takes the cost from the string).
fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).expect("argon2 params");
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"fuzz-salt-16byte").expect("salt");
    argon
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hash")
        .to_string()
}

struct Case<'a> {
    trusted: bool,
    tls: bool,
    pipe: usize,
    tight: bool,
    users: bool,
    cut: u8,
    stream: &'a [u8],
}

impl<'a> Case<'a> {
    fn parse(data: &'a [u8]) -> Option<Case<'a>> {
        let (&flags, rest) = data.split_first()?;
        let (&cut, stream) = rest.split_first()?;
        const PIPES: [usize; 8] = [1, 3, 16, 64, 512, 4096, 16384, 65536];
        Some(Case {
            trusted: flags & 1 != 0,
            tls: flags & 2 != 0,
            pipe: PIPES[usize::from((flags >> 2) & 7)],
            tight: flags & 0x20 != 0,
            users: flags & 0x40 == 0,
            cut,
            stream,
        })
    }

    fn config(&self, w: &World) -> ServerConfig {
        let mut c = ServerConfig {
            listen: Vec::new(),
            hostname: Some(HOST.into()),
            require_tls_for_auth: self.tls,
            // Each failed AUTH for an unknown user costs a full-price argon2
            // check (so timing does not reveal names): keep it to a few.
            auth_failure_limit: 3,
            ..ServerConfig::default()
        };
        if self.tls {
            c.tls = Some(TlsConfig {
                cert_file: w.cert_file.clone(),
                key_file: w.key_file.clone(),
            });
        }
        if self.users {
            c.users = vec![UserConfig {
                name: "u".into(),
                password_hash: w.password_hash.clone(),
            }];
        }
        if self.tight {
            c.max_message_size = ByteSize(1024);
            c.max_recipients = 2;
            c.max_line_length = 512;
            c.max_errors = 5;
        }
        c
    }

    /// The client's writes.
    fn pieces(&self) -> Vec<&'a [u8]> {
        if self.cut == 0 {
            return vec![self.stream];
        }
        let max = usize::from(self.cut) * 2;
        let mut state = u32::from(self.cut).wrapping_mul(0x9E37_79B9) | 1;
        let mut out = Vec::new();
        let mut rest = self.stream;
        while !rest.is_empty() {
            // xorshift32
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let n = (1 + state as usize % max).min(rest.len());
            let (a, b) = rest.split_at(n);
            out.push(a);
            rest = b;
        }
        out
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = Case::parse(data) else {
        return;
    };
    let w = world();
    w.rt.block_on(run(w, &case));
});

async fn run(w: &World, case: &Case<'_>) {
    let settings = Settings::new(case.config(w), HOST, inbound::accept_all_senders())
        .expect("the fuzz configuration is valid");
    let mut registry = prometheus_client::registry::Registry::default();
    let server = Inbound::new(settings, w.spool.clone(), Metrics::new(&mut registry));
    let peer: SocketAddr = if case.trusted {
        "127.0.0.1:40000".parse().expect("address")
    } else {
        "192.0.2.1:40000".parse().expect("address")
    };
    let (client, server_io) = tokio::io::duplex(case.pipe);
    let session = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .handle(server_io, peer, CancellationToken::new())
                .await
        })
    };
    let (mut rd, mut wr) = tokio::io::split(client);
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    });
    let pieces = case.pieces();
    let drive = async {
        for p in pieces {
            if wr.write_all(p).await.is_err() {
                break; // the server has closed the connection
            }
            // Let the session handle this write before the next one comes.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        let _ = wr.shutdown().await;
        session.await.expect("the session task panicked");
        reader.await.expect("the reader task panicked")
    };
    let out = match tokio::time::timeout(HANG_LIMIT, drive).await {
        Ok(out) => out,
        Err(_) => {
            panic!("the session did not end within {HANG_LIMIT:?} of the client's last byte (hang)")
        }
    };
    assert_eq!(server.active_sessions(), 0, "a session is still counted");

    let queued = check_replies(&out);
    let authenticated = out.split(|&b| b == b'\n').any(|l| l.starts_with(b"235 "));
    if !case.trusted && !authenticated {
        assert!(
            queued.is_empty(),
            "an unauthenticated untrusted client got mail queued: {queued:?}"
        );
    }
    let mut stored: Vec<String> = w
        .spool
        .list()
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    stored.sort();
    let mut acked = queued.clone();
    acked.sort();
    assert_eq!(
        stored, acked,
        "the spool must hold exactly the messages answered 250"
    );
    for (id, _) in w.spool.list() {
        let body = w
            .spool
            .read_body(id)
            .expect("read a queued body")
            .read_to_end()
            .await
            .expect("read a queued body");
        assert!(
            body.starts_with(b"Received: from "),
            "queued body without our Received: header"
        );
        w.spool.remove(id).await.expect("remove from the spool");
    }
}

/// Check the reply stream's shape; returns the ids of queued messages.
fn check_replies(out: &[u8]) -> Vec<String> {
    let mut queued = Vec::new();
    let mut rest = out;
    let mut multi: Option<[u8; 3]> = None;
    while !rest.is_empty() {
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            panic!(
                "reply without CRLF at the end: {:?}",
                String::from_utf8_lossy(rest)
            );
        };
        let (line, tail) = rest.split_at(lf + 1);
        rest = tail;
        let text = String::from_utf8_lossy(line);
        assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {text:?}");
        let line = &line[..line.len() - 2];
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "stray CR/LF in a reply line: {text:?}"
        );
        assert!(line.len() >= 4, "short reply line: {text:?}");
        let code = [line[0], line[1], line[2]];
        assert!(
            matches!(code[0], b'2'..=b'5') && code[1].is_ascii_digit() && code[2].is_ascii_digit(),
            "bad reply code: {text:?}"
        );
        if let Some(c) = multi {
            assert_eq!(c, code, "one multi-line reply changed its code: {text:?}");
        }
        let sep = line[3];
        assert!(sep == b' ' || sep == b'-', "bad separator: {text:?}");
        let body = std::str::from_utf8(&line[4..]).unwrap_or("");
        let single = multi.is_none() && sep == b' ';
        multi = (sep == b'-').then_some(code);
        if single && code[0] != b'3' {
            let greeting_or_helo =
                (code == *b"220" && body.starts_with(HOST)) || (code == *b"250" && body == HOST);
            if !greeting_or_helo {
                let esc = body.split(' ').next().unwrap_or("");
                let parts: Vec<&str> = esc.split('.').collect();
                assert!(
                    parts.len() == 3
                        && parts[0].as_bytes() == [code[0]]
                        && parts[1..]
                            .iter()
                            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
                    "reply without a matching enhanced status code: {text:?}"
                );
            }
        }
        if let Some(id) = body.strip_prefix("2.0.0 Ok: queued as ") {
            assert_eq!(&code, b"250");
            queued.push(id.to_string());
        }
        if code == *b"220" && body.starts_with("2.0.0 ") {
            // STARTTLS accepted: what follows is TLS, not text.
            assert!(multi.is_none());
            break;
        }
    }
    assert!(multi.is_none(), "the last reply was left unfinished");
    queued
}
