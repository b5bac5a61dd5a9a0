//! The envelope sender that goes upstream. Gmail refuses senders it cannot
//! make sense of (`root@myhost`, plain `root`: `553 5.1.7`), and a bounce
//! to such an address is refused too, so:
//!
//! - `envelope_from = "addr"` on the account: every message goes as `addr`;
//! - `rewrite_from = true`: every message goes as the account's `email`;
//! - else a sender in the local domain (`[local] domain`) or without a
//!   domain goes as the account's `email`; any other as it is.
//!
//! The null sender (bounces) is never changed. The queue, the logs and the
//! routing by `[[accounts]] senders` keep the original.

use oauth::config::AccountConfig;

/// Why the sender sent upstream differs from the envelope's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// The account's `envelope_from`.
    EnvelopeFrom,
    /// The account's `rewrite_from`.
    RewriteFrom,
    /// The sender is in the local domain.
    LocalDomain,
    /// The sender has no domain.
    Unqualified,
}

impl Why {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Why::EnvelopeFrom => "the account's envelope_from",
            Why::RewriteFrom => "the account's rewrite_from",
            Why::LocalDomain => "a sender in the local domain",
            Why::Unqualified => "a sender without a domain",
        }
    }
}

/// The sender for `original` through `acct`, and why it changed (`None`:
/// unchanged). `local_domain`: `[local] domain`.
pub(crate) fn upstream<'a>(
    original: &'a str,
    acct: &'a AccountConfig,
    local_domain: Option<&str>,
) -> (&'a str, Option<Why>) {
    if original.is_empty() {
        return (original, None);
    }
    let (chosen, why) = if let Some(forced) = acct.envelope_from.as_deref() {
        (forced, Why::EnvelopeFrom)
    } else if acct.rewrite_from {
        (acct.email.as_str(), Why::RewriteFrom)
    } else {
        match original.rsplit_once('@') {
            None => (acct.email.as_str(), Why::Unqualified),
            Some((_, domain))
                if local_domain
                    .is_some_and(|l| domain.eq_ignore_ascii_case(l.trim_end_matches('.'))) =>
            {
                (acct.email.as_str(), Why::LocalDomain)
            }
            Some(_) => return (original, None),
        }
    };
    if chosen.eq_ignore_ascii_case(original) {
        (original, None)
    } else {
        (chosen, Some(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> AccountConfig {
        AccountConfig::new("default", "me@gmail.com")
    }

    #[test]
    fn local_and_unqualified_senders_go_as_the_account() {
        let a = account();
        let local = Some("host.example.org");
        assert_eq!(
            upstream("root@host.example.org", &a, local),
            ("me@gmail.com", Some(Why::LocalDomain))
        );
        assert_eq!(
            upstream("cron@HOST.Example.org", &a, local),
            ("me@gmail.com", Some(Why::LocalDomain))
        );
        assert_eq!(
            upstream("root", &a, local),
            ("me@gmail.com", Some(Why::Unqualified))
        );
        assert_eq!(
            upstream("root", &a, None),
            ("me@gmail.com", Some(Why::Unqualified))
        );
        // Other domains, subdomains and the null sender stay.
        for other in ["app@example.com", "x@sub.host.example.org", "x@example.org"] {
            assert_eq!(upstream(other, &a, local), (other, None));
        }
        assert_eq!(upstream("", &a, local), ("", None));
        assert_eq!(upstream("me@gmail.com", &a, None), ("me@gmail.com", None));
    }

    #[test]
    fn envelope_from_forces_one_address_and_rewrite_from_the_account() {
        let mut a = account();
        a.envelope_from = Some("alerts@example.com".into());
        for s in ["app@example.com", "root", "root@host.example.org"] {
            assert_eq!(
                upstream(s, &a, Some("host.example.org")),
                ("alerts@example.com", Some(Why::EnvelopeFrom))
            );
        }
        assert_eq!(upstream("", &a, None), ("", None), "bounces stay <>");
        let mut a = account();
        a.rewrite_from = true;
        assert_eq!(
            upstream("app@example.com", &a, None),
            ("me@gmail.com", Some(Why::RewriteFrom))
        );
    }
}
