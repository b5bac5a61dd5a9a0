//! Local names (`[local]`): the domain unqualified addresses get, the
//! aliases file, and where mail for local names without an alias goes (the
//! postmaster), like Postfix's `myorigin`, `mydestination` and aliases.
//!
//! A recipient is *local* when it has no domain (`root`), or its domain is
//! `[local] domain` when that is set or is the host's FQDN, the host name,
//! `[server] hostname` or `localhost`. When the domain is only the first
//! account's email domain (a host without an FQDN), bare names get it, but
//! qualified addresses in it are not local: they are real mailboxes at the
//! provider.

pub mod aliases;
mod domain;

use tracing::warn;

pub use aliases::{AliasError, Aliases};
pub use domain::domain;

use crate::config::Config;

/// Where the domain came from (`check-config` says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainSource {
    Configured,
    HostFqdn,
    AccountEmail,
    HostName,
}

impl DomainSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainSource::Configured => "[local] domain",
            DomainSource::HostFqdn => "the host's FQDN",
            DomainSource::AccountEmail => "the first account's email domain (the host has no FQDN)",
            DomainSource::HostName => "the host name (no FQDN and no account)",
        }
    }
}

/// The resolved `[local]` table.
#[derive(Debug, Clone)]
pub struct LocalNames {
    pub domain: String,
    pub source: DomainSource,
    /// Lower-case domains whose addresses are local.
    pub local_domains: Vec<String>,
    pub postmaster: Option<String>,
    pub aliases: Aliases,
}

/// How deep aliases may nest (a loop is cut here too).
const MAX_DEPTH: usize = 20;

/// Where one recipient goes, and how it got there (`sendmail -bv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub address: String,
    pub via: Via,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// Not a local name: sent as it is.
    Direct,
    /// Through the aliases named, in order.
    Alias(Vec<String>),
    /// A local name without an alias.
    Postmaster(String),
    /// A local name without an alias, and no postmaster to give it to.
    Unresolved,
    /// An alias loop, given to the postmaster.
    Loop(Vec<String>),
}

/// The postmaster: `[delivery] postmaster`, else the first account's email.
pub fn postmaster(config: &Config) -> Option<String> {
    config
        .delivery
        .postmaster
        .clone()
        .or_else(|| config.accounts.first().map(|a| a.email.clone()))
}

impl LocalNames {
    /// Resolve `[local]` for `config`, reading the aliases file; `base` is
    /// the config file's directory and `hostname` the SMTP host name.
    pub fn load(
        config: &Config,
        base: &std::path::Path,
        hostname: &str,
    ) -> Result<LocalNames, AliasError> {
        let system = inbound::system_hostname();
        // The same domain delivery uses ([local] domain, else the FQDN,
        // else the first account's); where it came from decides whether
        // its addresses are local.
        let (domain, source) = match domain(config) {
            Some(d)
                if config
                    .local
                    .domain
                    .as_deref()
                    .is_some_and(|c| !c.trim().is_empty()) =>
            {
                (d, DomainSource::Configured)
            }
            Some(d) if domain::fqdn().as_deref() == Some(d.as_str()) => (d, DomainSource::HostFqdn),
            Some(d) => (d, DomainSource::AccountEmail),
            None => (system.clone(), DomainSource::HostName),
        };
        let mut local_domains: Vec<String> = Vec::new();
        if source != DomainSource::AccountEmail {
            local_domains.push(domain.to_ascii_lowercase());
        }
        for d in [system.as_str(), hostname, "localhost"] {
            let d = d.to_ascii_lowercase();
            if !local_domains.contains(&d) {
                local_domains.push(d);
            }
        }
        let aliases = match &config.local.aliases {
            Some(f) => Aliases::load(&crate::paths::absolute(base, f))?,
            None => Aliases::default(),
        };
        Ok(LocalNames {
            domain,
            source,
            local_domains,
            postmaster: postmaster(config),
            aliases,
        })
    }

    /// `name@domain`.
    pub fn qualify(&self, name: &str) -> String {
        format!("{name}@{}", self.domain)
    }

    /// The local part of `addr` (lower case) when it is a local address.
    fn local_name(&self, addr: &str) -> Option<String> {
        match addr.rsplit_once('@') {
            None => Some(addr.to_ascii_lowercase()),
            Some((l, d)) if self.local_domains.contains(&d.to_ascii_lowercase()) => {
                Some(l.to_ascii_lowercase())
            }
            Some(_) => None,
        }
    }

    /// Where mail for `addr` goes, with how.
    pub fn resolve(&self, addr: &str) -> Vec<Resolved> {
        let mut out = Vec::new();
        self.walk(addr, &mut Vec::new(), &mut out);
        let mut seen = Vec::new();
        out.retain(|r| {
            if seen.contains(&r.address) {
                false
            } else {
                seen.push(r.address.clone());
                true
            }
        });
        out
    }

    fn walk(&self, addr: &str, chain: &mut Vec<String>, out: &mut Vec<Resolved>) {
        let Some(name) = self.local_name(addr) else {
            let via = if chain.is_empty() {
                Via::Direct
            } else {
                Via::Alias(chain.clone())
            };
            out.push(Resolved {
                address: addr.to_string(),
                via,
            });
            return;
        };
        let looped = chain.contains(&name) || chain.len() >= MAX_DEPTH;
        match self.aliases.get(&name) {
            Some(targets) if !looped => {
                chain.push(name);
                for t in targets {
                    self.walk(t, chain, out);
                }
                chain.pop();
            }
            _ => {
                let mut names = chain.clone();
                names.push(name);
                match &self.postmaster {
                    Some(pm) => out.push(Resolved {
                        address: pm.clone(),
                        via: if looped {
                            Via::Loop(names)
                        } else {
                            Via::Postmaster(addr.to_string())
                        },
                    }),
                    None => out.push(Resolved {
                        address: if addr.contains('@') {
                            addr.to_string()
                        } else {
                            self.qualify(addr)
                        },
                        via: Via::Unresolved,
                    }),
                }
            }
        }
    }
}

impl inbound::LocalNames for LocalNames {
    fn qualify(&self, name: &str) -> String {
        LocalNames::qualify(self, name)
    }

    fn expand(&self, rcpt: &str) -> Vec<String> {
        let resolved = self.resolve(rcpt);
        for r in &resolved {
            match &r.via {
                Via::Loop(names) => warn!(
                    "alias loop through {}: mail for <{}> goes to the postmaster <{}>",
                    names.join(" -> "),
                    outbound::escape_controls(rcpt),
                    r.address
                ),
                Via::Unresolved => warn!(
                    "<{}> is a local name with no alias and there is no postmaster (no account): it is sent as <{}>",
                    outbound::escape_controls(rcpt),
                    r.address
                ),
                _ => {}
            }
        }
        resolved.into_iter().map(|r| r.address).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(aliases: &str, postmaster: Option<&str>) -> LocalNames {
        LocalNames {
            domain: "host.example.org".into(),
            source: DomainSource::Configured,
            local_domains: vec!["host.example.org".into(), "host".into(), "localhost".into()],
            postmaster: postmaster.map(str::to_string),
            aliases: aliases::parse(aliases).unwrap(),
        }
    }

    fn addrs(l: &LocalNames, a: &str) -> Vec<String> {
        l.resolve(a).into_iter().map(|r| r.address).collect()
    }

    #[test]
    fn aliases_resolve_recursively() {
        let l = names(
            "postmaster: root\nroot: admin, ops@example.com\nadmin: me@gmail.com\n",
            Some("pm@example.com"),
        );
        assert_eq!(addrs(&l, "root"), ["me@gmail.com", "ops@example.com"]);
        assert_eq!(
            addrs(&l, "ROOT@host.example.org"),
            ["me@gmail.com", "ops@example.com"]
        );
        assert_eq!(
            addrs(&l, "postmaster@localhost"),
            ["me@gmail.com", "ops@example.com"]
        );
        assert_eq!(addrs(&l, "someone@else.org"), ["someone@else.org"]);
        // No alias: the postmaster.
        let r = l.resolve("www-data");
        assert_eq!(r[0].address, "pm@example.com");
        assert_eq!(r[0].via, Via::Postmaster("www-data".into()));
    }

    #[test]
    fn loops_are_cut_and_go_to_the_postmaster() {
        let l = names("a: b\nb: a\nself: self, x@y.org\n", Some("pm@example.com"));
        let r = l.resolve("a");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].address, "pm@example.com");
        assert!(matches!(r[0].via, Via::Loop(_)));
        assert_eq!(addrs(&l, "self"), ["pm@example.com", "x@y.org"]);
    }

    #[test]
    fn without_a_postmaster_the_name_is_qualified() {
        let l = names("", None);
        let r = l.resolve("root");
        assert_eq!(r[0].address, "root@host.example.org");
        assert_eq!(r[0].via, Via::Unresolved);
    }

    #[test]
    fn an_account_domain_is_appended_but_not_local() {
        let mut l = names("root: me@gmail.com\n", Some("me@gmail.com"));
        l.domain = "gmail.com".into();
        l.source = DomainSource::AccountEmail;
        assert_eq!(l.qualify("root"), "root@gmail.com");
        assert_eq!(addrs(&l, "friend@gmail.com"), ["friend@gmail.com"]);
        assert_eq!(addrs(&l, "root"), ["me@gmail.com"]);
    }
}
