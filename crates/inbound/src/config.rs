//! The `[server]` section: listeners, who may relay, limits and timeouts.
//!
//! Every field has a safe default so `oauthrelay serve` runs with no file at
//! all. Parsing errors carry the TOML span, so the binary can report
//! `file:line:col: message`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// SMTP listeners.
    #[serde(deserialize_with = "de_listen")]
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listeners (SMTPS, RFC 8314: TLS from the first byte,
    /// usually port 465). Needs `[server.tls]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen_tls: Vec<SocketAddr>,
    /// Name used in the greeting, EHLO reply and `Received:` header.
    /// `None`: the system host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Clients that may relay without AUTH.
    pub allow_networks: Vec<Network>,
    /// Clients whose DATA may end with a lone dot next to a bare LF
    /// (`LF.LF`, `CRLF.LF`, `LF.CRLF`); everyone else must send `CRLF.CRLF`
    /// (as Postfix's `smtpd_forbid_bare_newline_exclusions`). `None`:
    /// `allow_networks`; `[]`: nobody.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bare_lf_end_networks: Option<Vec<Network>>,
    /// Largest message accepted, in bytes; advertised in the EHLO `SIZE`.
    pub max_message_size: ByteSize,
    /// Recipients per message; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Simultaneous SMTP sessions; more get `421 4.7.0`.
    pub max_connections: usize,
    /// Simultaneous sessions of one client outside `allow_networks` (an
    /// IPv4 address or an IPv6 /64); more get `421 4.7.0`.
    pub max_connections_per_client: usize,
    /// Of `max_connections`, slots only clients in `allow_networks` may
    /// take, so strangers never lock out a printer. `None`: a fifth of
    /// `max_connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_connections: Option<usize>,
    /// Longest command line, CRLF included; longer get `500 5.5.2`.
    pub max_line_length: usize,
    /// Protocol errors (5xx replies to the client's mistakes) a session may
    /// make; at this count it gets `421 4.7.0` and is disconnected (0 counts
    /// as 1).
    pub max_errors: u32,
    /// AUTH only after STARTTLS (loopback clients are exempt).
    pub require_tls_for_auth: bool,
    /// Deadline for a whole command line, counted from our previous reply
    /// (RFC 5321 4.5.3.2 server timeout: 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Deadline for a DATA or BDAT transfer (RFC 5321: 3 minutes per data
    /// block), extended by one second per `min_data_rate` bytes received.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// The command deadline for clients outside `allow_networks` until they
    /// authenticate (the shorter of this and `command_timeout`).
    #[serde(with = "humantime_serde")]
    pub untrusted_command_timeout: Duration,
    /// Commands that do nothing (NOOP, RSET, VRFY, EXPN, HELP, a repeated
    /// HELO/EHLO, an AUTH refused with `454`) a client outside
    /// `allow_networks` may send before it authenticates; the next one
    /// gets `421 4.7.0` and the connection is closed (as Postfix's
    /// `smtpd_junk_command_limit`).
    pub untrusted_junk_command_limit: u32,
    /// Bytes per second that extend `data_timeout` (as Postfix's
    /// `smtpd_min_data_rate`): a slow but honest client is not cut off.
    pub min_data_rate: u64,
    /// On shutdown, how long sessions in DATA may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Failed AUTH attempts per client (IPv4 address, IPv6 /64) within
    /// `auth_failure_window` before AUTH is refused with `454 4.7.0`.
    pub auth_failure_limit: u32,
    #[serde(with = "humantime_serde")]
    pub auth_failure_window: Duration,
    /// Password checks (argon2, about 19 MiB and a core each) that may run
    /// at once; an AUTH that finds none free within 2 seconds gets
    /// `454 4.7.0`.
    pub max_password_checks: usize,
    /// Optional STARTTLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Optional SMTP AUTH users.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            listen_tls: Vec::new(),
            hostname: None,
            allow_networks: vec![
                Network::new(IpAddr::from([127, 0, 0, 0]), 8),
                Network::new(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), 128),
            ],
            bare_lf_end_networks: None,
            max_message_size: ByteSize(36_700_160),
            max_recipients: 100,
            max_connections: 100,
            max_connections_per_client: 10,
            reserved_connections: None,
            max_line_length: 2048,
            max_errors: 20,
            require_tls_for_auth: true,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            untrusted_command_timeout: Duration::from_secs(10),
            untrusted_junk_command_limit: 10,
            min_data_rate: 500,
            shutdown_grace: Duration::from_secs(30),
            auth_failure_limit: 5,
            auth_failure_window: Duration::from_secs(900),
            max_password_checks: 2,
            tls: None,
            users: Vec::new(),
        }
    }
}

/// `[server.tls]`: certificate and key in PEM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[[server.users]]`: a client that may relay after AUTH PLAIN or LOGIN.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// A PHC string (`$argon2id$...`) from `oauthrelay hash-password`.
    /// Serialized (the effective settings of `check-config`) as
    /// `<redacted>`: a hash can be attacked offline.
    #[serde(deserialize_with = "de_password_hash", serialize_with = "ser_redacted")]
    pub password_hash: String,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .finish()
    }
}

fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse_listen_address(s).map_err(serde::de::Error::custom))
        .collect()
}

/// A listen address as the config file gives it: `IP:PORT` (an IPv6
/// address in brackets). The error says what is wrong and what is wanted.
pub fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.trim().parse::<SocketAddr>() {
        return Ok(a);
    }
    const WANTED: &str = "expected IP:PORT like \"127.0.0.1:2525\" or \"[::1]:2525\", port 1-65535 (0: any free port), host names are not accepted";
    let s = s.trim();
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.ends_with(':') => (h, Some(p)),
        _ => (s, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let why = if s.is_empty() {
        "it is empty".to_string()
    } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
        "it has no port; an IPv6 address with a port needs brackets".to_string()
    } else if s.parse::<IpAddr>().is_ok() || host.parse::<IpAddr>().is_err() && port.is_none() {
        "it has no port".to_string()
    } else if host.parse::<IpAddr>().is_err() {
        format!("{host:?} is not an IP address")
    } else if host.contains(':') && !s.starts_with('[') {
        "an IPv6 address needs brackets".to_string()
    } else {
        match port.map(str::parse::<u64>) {
            Some(Ok(p)) => format!("port {p} is out of range"),
            _ => format!("{:?} is not a port number", port.unwrap_or_default()),
        }
    };
    Err(format!("invalid listen address {s:?} ({why}): {WANTED}"))
}

fn ser_redacted<S: Serializer>(_: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

fn de_password_hash<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if argon2::PasswordHash::new(&s).is_err() {
        return Err(serde::de::Error::custom(
            "password_hash is not a PHC hash string; create one with `oauthrelay hash-password` \
             (plaintext passwords are not accepted)",
        ));
    }
    Ok(s)
}

/// An IP network in CIDR notation (`192.168.1.0/24`, `::1/128`); a bare
/// address means a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// A network; host bits of `addr` are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Network {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.min(max);
        Network {
            addr: mask(addr, prefix),
            prefix,
        }
    }

    /// Whether `ip` is inside this network. IPv4-mapped IPv6 addresses
    /// (`::ffff:127.0.0.1`) are compared as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::from((bits & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::from((bits & m).to_be_bytes())
        }
    }
}

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        let bad =
            || format!("invalid network {s:?}: expected an address or CIDR like 192.168.1.0/24");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(bad()),
            },
            None => max,
        };
        Ok(Network::new(addr, prefix))
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Network, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A size in bytes: an integer, or a string with a unit
/// (`"35MB"`, `"35 MiB"`, `"512k"`). Units are powers of 1000 (`kB`, `MB`,
/// `GB`) or 1024 (`KiB`, `MiB`, `GiB`, and the bare `k`/`M`/`G`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!(
                "invalid size {s:?}: expected bytes, or a number with a unit like \"35MB\" or \"512KiB\""
            )
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" | "b" => 1,
            "kB" | "KB" | "kb" => 1_000,
            "MB" | "mb" => 1_000_000,
            "GB" | "gb" => 1_000_000_000,
            "k" | "K" | "KiB" | "kiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, or a string like \"35MB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_like_cidr() {
        let n: Network = "127.0.0.1/32".parse().unwrap();
        assert!(n.contains("127.0.0.1".parse().unwrap()));
        assert!(!n.contains("127.0.0.2".parse().unwrap()));
        assert!(n.contains("::ffff:127.0.0.1".parse().unwrap()));
        let n: Network = "10.1.2.3/8".parse().unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(n.contains("10.200.0.1".parse().unwrap()));
        let v6: Network = "::1".parse().unwrap();
        assert!(v6.contains("::1".parse().unwrap()));
        assert!(!v6.contains("127.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("nonsense".parse::<Network>().is_err());
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!("35MB".parse::<ByteSize>().unwrap().0, 35_000_000);
        assert_eq!("35 MiB".parse::<ByteSize>().unwrap().0, 35 << 20);
        assert_eq!("512k".parse::<ByteSize>().unwrap().0, 512 << 10);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("".parse::<ByteSize>().is_err());
    }
}

#[cfg(test)]
mod listen_address_tests {
    use super::parse_listen_address;

    #[test]
    fn listen_addresses_say_what_is_wrong() {
        assert!(parse_listen_address("127.0.0.1:25").is_ok());
        assert!(parse_listen_address("[::1]:2525").is_ok());
        assert!(parse_listen_address("0.0.0.0:0").is_ok());
        for (bad, why) in [
            ("localhost:25", "\"localhost\" is not an IP address"),
            ("mail.example.com:25", "is not an IP address"),
            ("127.0.0.1", "it has no port"),
            ("localhost", "it has no port"),
            ("127.0.0.1:99999", "port 99999 is out of range"),
            ("127.0.0.1:smtp", "\"smtp\" is not a port number"),
            ("::1:25", "needs brackets"),
            ("", "it is empty"),
        ] {
            let e = parse_listen_address(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(
                e.contains("IP:PORT")
                    && e.contains("port 1-65535")
                    && e.contains("host names are not accepted"),
                "{e}"
            );
        }
    }
}
