//! The local domain (`[local] domain`): what unqualified addresses belong
//! to, and which envelope senders go upstream as the account's address.
//! Postfix's `myorigin`: the host's fully qualified name by default.

use std::ffi::{CStr, CString};

use crate::config::Config;

/// `[local] domain`, else the host's FQDN, else the first account's email
/// domain; `None` only with none of these (no account configured, a host
/// name without a dot).
pub fn domain(config: &Config) -> Option<String> {
    domain_with(config, fqdn)
}

fn domain_with(config: &Config, fqdn: impl FnOnce() -> Option<String>) -> Option<String> {
    if let Some(d) = config
        .local
        .domain
        .as_deref()
        .map(|d| d.trim().trim_end_matches('.'))
        .filter(|d| !d.is_empty())
    {
        return Some(d.to_ascii_lowercase());
    }
    fqdn().or_else(|| {
        config
            .accounts
            .first()
            .and_then(|a| a.email.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase())
    })
}

/// The host's fully qualified name: its host name when that has a dot,
/// else the canonical name the resolver (`/etc/hosts` first) gives it.
pub(crate) fn fqdn() -> Option<String> {
    let host = inbound::system_hostname();
    if is_fqdn(&host) {
        return Some(host.to_ascii_lowercase());
    }
    canonical_name(&host).filter(|c| is_fqdn(c))
}

fn is_fqdn(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    name.contains('.') && !name.starts_with('.') && name != "localhost.localdomain"
}

/// `getaddrinfo(host, AI_CANONNAME)`.
fn canonical_name(host: &str) -> Option<String> {
    let c_host = CString::new(host).ok()?;
    // SAFETY: zeroed addrinfo is a valid "no hints" value; fields set below.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = libc::AI_CANONNAME;
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid C string and hints; `res` is freed below.
    let rc = unsafe { libc::getaddrinfo(c_host.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 || res.is_null() {
        return None;
    }
    // SAFETY: `res` is a valid list from getaddrinfo; ai_canonname is a C
    // string or null.
    let name = unsafe {
        let c = (*res).ai_canonname;
        let name = (!c.is_null()).then(|| CStr::from_ptr(c).to_string_lossy().into_owned());
        libc::freeaddrinfo(res);
        name
    };
    name.map(|n| n.trim_end_matches('.').to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(src: &str) -> Config {
        crate::config::parse(src, None).unwrap().config
    }

    #[test]
    fn the_setting_then_the_fqdn_then_the_first_account() {
        let account = "[[accounts]]\nname = \"a\"\nemail = \"me@Example.COM\"\nclient_id = \"x\"\n";
        let set = config(&format!(
            "[local]\ndomain = \"Host.Example.org.\"\n{account}"
        ));
        assert_eq!(
            domain_with(&set, || Some("fqdn.example.net".into())).as_deref(),
            Some("host.example.org")
        );
        let unset = config(account);
        assert_eq!(
            domain_with(&unset, || Some("fqdn.example.net".into())).as_deref(),
            Some("fqdn.example.net")
        );
        assert_eq!(domain_with(&unset, || None).as_deref(), Some("example.com"));
        assert_eq!(domain_with(&config(""), || None), None);
        assert!(is_fqdn("a.b") && !is_fqdn("myhost") && !is_fqdn("localhost.localdomain"));
    }
}
