#!/usr/bin/env python3
"""Write the hand-made seed inputs of the fuzz targets (see ../README.md).

Run from anywhere: python3 fuzz/seeds/make_seeds.py. It rewrites
fuzz/seeds/{smtp_session,dot,config}/ in place.
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# smtp_session flags (first byte): see fuzz_targets/smtp_session.rs.
TRUSTED, TLS, TIGHT, NO_USERS = 0x01, 0x02, 0x20, 0x40
def pipe(i):  # 0..7 -> 1, 3, 16, 64, 512, 4096, 16384, 65536 bytes
    return i << 2

B64_U, B64_P = "dQ==", "cA=="        # user "u", password "p"
PLAIN_OK = "AHUAcA=="                # \0u\0p
PLAIN_BAD = "AHUAcQ=="               # \0u\0q

def crlf(s):
    return s.replace("\n", "\r\n").encode()

BODY = crlf("From: a@example.com\nTo: b@example.net\nSubject: seed\n\n..a stuffed dot line\nbody\n.\n")

SESSIONS = {
    "basic": crlf("EHLO client.example\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\n")
        + BODY + crlf("QUIT\n"),
    "helo_null_sender": crlf("HELO old\nMAIL FROM:<>\nRCPT TO:<b@example.net>\nDATA\n")
        + BODY + crlf("QUIT\n"),
    "pipelined_two_messages": crlf(
        "EHLO p\nMAIL FROM:<a@example.com> SIZE=200 BODY=8BITMIME\nRCPT TO:<b@example.net>\n"
        "RCPT TO:<c@example.net>\nDATA\n") + BODY + crlf(
        "MAIL FROM:<d@example.com>\nRCPT TO:<e@example.net>\nDATA\n") + BODY + crlf("RSET\nNOOP\nQUIT\n"),
    "smuggling_lf_dot_lf": crlf("EHLO s\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\n")
        + b"Subject: smuggle\r\n\r\nhi\n.\nMAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nevil\r\n.\r\n"
        + crlf(".\nQUIT\n"),
    "smuggling_crlf_dot_lf": crlf("EHLO s\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\n")
        + b"x\r\n.\nMAIL FROM:<admin@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\nevil\r\n.\r\n\r\n.\r\n",
    "smuggling_lf_dot_crlf": crlf("EHLO s\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\n")
        + b"x\n.\r\nMAIL FROM:<admin@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\nevil\r\n.\r\n\r\n.\r\n",
    "smuggling_cr_dot_cr": crlf("EHLO s\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\n")
        + b"x\r.\rMAIL FROM:<admin@example.com>\r\n\r\n.\r\n",
    "bdat": crlf("EHLO b\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\n")
        + b"BDAT 12\r\nSubject: b\r\n\r\nBDAT 6 LAST\r\nhello\nQUIT\r\n",
    "bdat_zero_last_and_mix": crlf("EHLO b\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\n")
        + b"BDAT 3\r\nabcDATA\r\nBDAT 0 LAST\r\nBDAT 4 LAST\r\nxyzwRSET\r\nQUIT\r\n",
    "bdat_pipelined_huge": crlf("EHLO b\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\n")
        + b"BDAT 2000\r\n" + b"y" * 2000 + b"BDAT 18446744073709551615 LAST\r\nzz\r\n",
    "auth_login": crlf(f"EHLO a\nAUTH LOGIN\n{B64_U}\n{B64_P}\nMAIL FROM:<a@example.com>\n"
        "RCPT TO:<b@example.net>\nDATA\n") + BODY + crlf("QUIT\n"),
    "auth_login_initial": crlf(f"EHLO a\nAUTH LOGIN {B64_U}\n{B64_P}\nMAIL FROM:<a@example.com>\n"
        "RCPT TO:<b@example.net>\nBDAT 5 LAST\n") + b"hello" + crlf("QUIT\n"),
    "auth_plain": crlf(f"EHLO a\nAUTH PLAIN {PLAIN_OK}\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\n")
        + BODY + crlf("AUTH PLAIN\nQUIT\n"),
    "auth_plain_challenge_bad_cancel": crlf(f"EHLO a\nAUTH PLAIN\n{PLAIN_BAD}\nAUTH LOGIN\n*\n"
        "AUTH PLAIN =\nAUTH PLAIN !!!notbase64\nAUTH CRAM-MD5\nAUTH PLAIN " + PLAIN_OK + "\nQUIT\n"),
    "relay_denied": crlf("EHLO u\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\nQUIT\n"),
    "starttls_injection": crlf("EHLO t\nSTARTTLS\nMAIL FROM:<inject@example.com>\nRCPT TO:<b@example.net>\n"),
    "starttls_client_hello": crlf("EHLO t\nSTARTTLS\n")
        + bytes.fromhex("16030100a5010000a10303") + b"\x00" * 32 + bytes.fromhex("00000813021303130100ff0100"),
    "errors": crlf("FOO\n\nMAIL FROM:<a@example.com>\nEHLO\nHELP\nVRFY root\nEXPN staff\nETRN x\n"
        "EHLO e\nMAIL FROM:a@example.com\nMAIL FROM:<a@@b>\nMAIL FROM:<a@example.com> FROB=1\n"
        "MAIL FROM:<a@example.com> SIZE=abc\nRCPT TO:<b@example.net>\nDATA\nMAIL FROM:<jörg@exämple.de>\n"
        "MAIL FROM:<jörg@exämple.de> SMTPUTF8\nRCPT TO:<ü@例え.jp>\nRCPT TO:<Postmaster>\n"
        "RCPT TO:<@route.example:x@y.example>\nMAIL FROM:<\"quoted local\"@example.com>\nQUIT\n"),
    "long_line": b"EHLO " + b"h" * 2100 + b"\r\nNOOP\r\n" + b"X" * 600 + b"\nAUTH LOGIN\r\n" + b"Y" * 1000 + b"\r\nQUIT\r\n",
    "too_many_recipients": crlf("EHLO r\nMAIL FROM:<a@example.com>\n"
        + "".join(f"RCPT TO:<r{i}@example.net>\n" for i in range(5)) + "DATA\n") + BODY + crlf("QUIT\n"),
    "oversized": crlf("EHLO big\nMAIL FROM:<a@example.com> SIZE=999999999999\nMAIL FROM:<a@example.com>\n"
        "RCPT TO:<b@example.net>\nDATA\n") + b"A" * 3000 + b"\r\n.\r\n" + crlf("QUIT\n"),
    "bare_lf_session": b"EHLO lf\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\nline\n..dot\n.\nQUIT\n",
    "no_quit_eof_in_data": crlf("EHLO e\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.net>\nDATA\npartial body"),
    "strict_parameters": crlf("EHLO p\nMAIL FROM:<a@example.com> SIZE=99999999999999999999999\n"
        "MAIL FROM:<a@example.com> RET=HDRS ENVID=x\nMAIL FROM:<a@example.com> AUTH=<>\n"
        "MAIL FROM:<a@example.com> SIZE=0000000000000000000000010\n"
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS ORCPT=rfc822;b@example.net\nRCPT TO:<b@example.net>\n"
        "BDAT 99999999999999999999999999 LAST\nDATA x\nRSET x\nSTARTTLS foo\nQUIT now\nQUIT\n"),
    "junk_commands": crlf("EHLO j\n" + "NOOP\nRSET\nEHLO j\nHELP\nVRFY x\n" * 5 + "QUIT\n"),
}

# (name suffix, flags, cut byte) variants per session.
VARIANTS = [
    ("trusted", TRUSTED | pipe(5), 0),
    ("trusted_bytewise", TRUSTED | pipe(1), 1),
    ("untrusted", pipe(5), 7),
    ("untrusted_tls", TLS | pipe(4), 0),
    ("tight", TRUSTED | TIGHT | pipe(3), 40),
    ("untrusted_nousers", NO_USERS | pipe(6), 0),
]

def write(dirname, name, data):
    d = os.path.join(HERE, dirname)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# Seeds written by hand, not by this script.
KEPT = {"interface.toml"}

def main():
    for sub in ("smtp_session", "dot", "config"):
        d = os.path.join(HERE, sub)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            if f not in KEPT:
                os.remove(os.path.join(d, f))
    for name, text in SESSIONS.items():
        for suffix, flags, cut in VARIANTS:
            write("smtp_session", f"{name}.{suffix}", bytes([flags, cut]) + text)

    # dot: flags (bit 0 trusted), cut, what follows 354.
    bodies = {
        "plain": BODY,
        "smuggle_lf": b"hi\n.\nMAIL FROM:<x@y>\r\n.\r\n",
        "smuggle_mixed": b"a\r\n.\nb\n.\r\nc\r.\r\n.\r\n",
        "stuffed": b"..\r\n...\r\n.x\r\n\r\n.\r\n",
        "crs": b"\r\r\n\r.\r\r\n.\r\r\n.\r\n",
        "empty": b".\r\n",
        "unended": b"no end here\r\n.. \r\n",
    }
    for name, b in bodies.items():
        for t in (0, 1):
            for cut in (0, 1, 5):
                write("dot", f"{name}.t{t}.c{cut}", bytes([t, cut]) + b)

    # config: the shipped example and broken ones. (`interface.toml`, a
    # second complete configuration, is kept as written, not generated.)
    with open(os.path.join(ROOT, "config", "oauthrelay.example.toml"), "rb") as f:
        write("config", "example.toml", f.read())
    broken = {
        "unknown_key.toml": '[server]\nlisten = ["127.0.0.1:25"]\nlisen = 3\n',
        "bad_port.toml": '[server]\nlisten = ["127.0.0.1:99999"]\n',
        "bad_network.toml": '[server]\nallow_networks = ["10.0.0.0/40"]\n',
        "sizes.toml": '[server]\nmax_message_size = "35 MiB"\nmax_connections = 0\nmax_line_length = 10\n',
        "durations.toml": '[delivery]\nretry_initial = "2h"\nretry_max = "1h"\nconcurrency = 0\n'
                          '[server]\ncommand_timeout = "5m"\ndata_timeout = "soon"\n',
        "accounts.toml": '[[accounts]]\nname = "a"\nemail = "a@gmail.com"\nclient_id = "x"\n'
                         'client_secret = "s"\nclient_secret_file = "/f"\n'
                         'token_url = "http://example.com/token"\n\n[[accounts]]\nname = "a"\n'
                         'email = "nope"\nsenders = []\n',
        "users.toml": '[[server.users]]\nname = "printer"\npassword_hash = "plaintext"\n',
        "tls_metrics_log.toml": '[server.tls]\ncert_file = "c.pem"\nkey_file = "k.pem"\n'
                                '[metrics]\nlisten = ""\n[log]\nlevel = "debug"\n[spool]\ndir = "/x"\n',
        "syntax.toml": '[server\nlisten = [\n',
        "crlf_unicode.toml": '[server]\r\nhostname = "relais-été.example"\r\n# ü\r\nmax_recipients = -1\r\n',
    }
    for name, text in broken.items():
        write("config", name, text.encode())

if __name__ == "__main__":
    main()
