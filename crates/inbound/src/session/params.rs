//! Strict arguments, read from the command line itself where smtp-proto is
//! lenient:
//!
//! - sizes (`MAIL ... SIZE=`, `BDAT n`) as exact 64-bit numbers: smtp-proto
//!   wraps a digit string too long for an integer around to a small number,
//!   so `SIZE=99999999999999999999999` would pass as `999`;
//! - ESMTP parameters of extensions we do not advertise (DSN's `RET`,
//!   `ENVID`, `NOTIFY`, `ORCPT`; `REQUIRETLS`, `HOLDFOR`, `MT-PRIORITY`...):
//!   smtp-proto parses them, and taking them silently would make the client
//!   believe they are honoured. They get `555 5.5.4` (RFC 5321 4.1.1.11);
//! - commands that take no argument (`DATA`, `RSET`, `QUIT`, `STARTTLS`)
//!   refuse one with `501 5.5.4` instead of ignoring it.

/// MAIL parameters we advertise: SIZE (RFC 1870), BODY (8BITMIME),
/// SMTPUTF8; AUTH (RFC 4954 5) only while AUTH is offered.
const MAIL_PARAMS: &[&str] = &["SIZE", "BODY", "SMTPUTF8"];

/// Parameters smtp-proto knows (so they reach us) that belong to extensions
/// we do not advertise, by their usual spelling.
const KNOWN: &[&str] = &[
    "RET",
    "ENVID",
    "NOTIFY",
    "ORCPT",
    "AUTH",
    "REQUIRETLS",
    "HOLDFOR",
    "HOLDUNTIL",
    "BY",
    "SOLICIT",
    "TRANSID",
    "MTRK",
    "MT-PRIORITY",
    "CONPERM",
    "RRVS",
    "CONNEG",
];

/// A declared size that no integer holds: bigger than any limit.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TooBig;

/// The ESMTP parameters in `params` (the text after a MAIL or RCPT path),
/// as `(keyword, value)`.
fn parameters(params: &[u8]) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
    params
        .split(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .filter(|t| !t.is_empty())
        .map(|t| match t.iter().position(|&b| b == b'=') {
            Some(i) => (t.get(..i).unwrap_or_default(), t.get(i + 1..)),
            None => (t, None),
        })
}

/// The first parameter in `params` that is not in `allowed`: its name, for
/// the `555` reply.
fn first_unadvertised<'a>(params: &'a [u8], allowed: &[&str]) -> Option<&'a str> {
    parameters(params).find_map(|(key, _)| {
        if allowed
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(key))
        {
            return None;
        }
        Some(
            KNOWN
                .iter()
                .find(|k| k.as_bytes().eq_ignore_ascii_case(key))
                .copied()
                .unwrap_or_else(|| std::str::from_utf8(key).unwrap_or("parameter")),
        )
    })
}

/// A MAIL parameter we do not advertise (`auth`: whether AUTH is offered).
pub(super) fn unadvertised_mail(params: &[u8], auth: bool) -> Option<&str> {
    if auth {
        first_unadvertised(params, &[MAIL_PARAMS, &["AUTH"]].concat())
    } else {
        first_unadvertised(params, MAIL_PARAMS)
    }
}

/// A RCPT parameter: we advertise none (no DSN).
pub(super) fn unadvertised_rcpt(params: &[u8]) -> Option<&str> {
    first_unadvertised(params, &[])
}

/// The `SIZE=` of MAIL parameters, exactly (leading zeros and all); `None`
/// without one. Syntax errors are smtp-proto's to report.
pub(super) fn declared_size(params: &[u8]) -> Result<Option<u64>, TooBig> {
    let Some((_, Some(v))) = parameters(params).find(|(k, _)| k.eq_ignore_ascii_case(b"SIZE"))
    else {
        return Ok(None);
    };
    exact(v).map(Some)
}

/// The chunk size of a `BDAT n [LAST]` line that smtp-proto accepted.
pub(super) fn bdat_size(line: &[u8]) -> Result<u64, TooBig> {
    let n = line
        .split(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .filter(|t| !t.is_empty())
        .nth(1)
        .unwrap_or_default();
    exact(n)
}

/// Decimal digits as a `u64`; `TooBig` past `u64::MAX`. Anything that is
/// not a digit string counts as 0 (smtp-proto has already refused it).
fn exact(digits: &[u8]) -> Result<u64, TooBig> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Ok(0);
    }
    digits.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(TooBig)
    })
}

/// Whether a command line carries anything after its verb (`verb_len`
/// bytes), white space and the line ending aside.
pub(super) fn has_argument(line: &[u8], verb_len: usize) -> bool {
    super::trim_line(line).len() > verb_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_exact_or_too_big() {
        assert_eq!(declared_size(b" SIZE=1000\r\n"), Ok(Some(1000)));
        assert_eq!(declared_size(b" BODY=8BITMIME size=7"), Ok(Some(7)));
        assert_eq!(declared_size(b"\r\n"), Ok(None));
        assert_eq!(
            declared_size(b" SIZE=18446744073709551615"),
            Ok(Some(u64::MAX))
        );
        assert_eq!(declared_size(b" SIZE=18446744073709551616"), Err(TooBig));
        assert_eq!(declared_size(b" SIZE=99999999999999999999999"), Err(TooBig));
        assert_eq!(
            declared_size(b" SIZE=0000000000000000000000000000042"),
            Ok(Some(42))
        );
        assert_eq!(bdat_size(b"BDAT 42 LAST\r\n"), Ok(42));
        assert_eq!(bdat_size(b"bdat   7\r\n"), Ok(7));
        assert_eq!(
            bdat_size(b"BDAT 99999999999999999999999999 LAST"),
            Err(TooBig)
        );
    }

    #[test]
    fn only_advertised_parameters_pass() {
        assert_eq!(
            unadvertised_mail(b" SIZE=1 BODY=8BITMIME SMTPUTF8\r\n", false),
            None
        );
        assert_eq!(unadvertised_mail(b" ret=hdrs", false), Some("RET"));
        assert_eq!(unadvertised_mail(b" SIZE=1 ENVID=x", false), Some("ENVID"));
        assert_eq!(unadvertised_mail(b" AUTH=<>", false), Some("AUTH"));
        assert_eq!(unadvertised_mail(b" AUTH=<>", true), None);
        assert_eq!(
            unadvertised_mail(b" MT-PRIORITY=0", true),
            Some("MT-PRIORITY")
        );
        assert_eq!(unadvertised_mail(b" X-FOO", true), Some("X-FOO"));
        assert_eq!(unadvertised_rcpt(b"\r\n"), None);
        assert_eq!(unadvertised_rcpt(b" notify=never"), Some("NOTIFY"));
        assert_eq!(unadvertised_rcpt(b" ORCPT=rfc822;a@b"), Some("ORCPT"));
    }

    #[test]
    fn arguments_are_what_follows_the_verb() {
        assert!(!has_argument(b"DATA\r\n", 4));
        assert!(!has_argument(b"DATA \t \r\n", 4));
        assert!(has_argument(b"DATA x\r\n", 4));
        assert!(has_argument(b"STARTTLS foo\r\n", 8));
        assert!(has_argument(b"QUIT \0\r\n", 4));
    }
}
