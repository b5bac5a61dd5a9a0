//! The aliases file, in /etc/aliases format (aliases(5)):
//!
//! ```text
//! # comment
//! root: admin@example.com, ops@example.com
//! postmaster: root
//! webmaster: admin@example.com,
//!     www-team@example.com          (a continuation line starts with blanks)
//! ```
//!
//! Names are matched without regard to case. Targets are addresses or
//! other local names (resolved again, see [`super::LocalNames`]). The
//! targets only a local delivery agent can have (`:include:FILE`,
//! `|command`, `/file`) are refused, naming the file and line: oauthrelay
//! delivers nothing locally, and would otherwise drop that mail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::sendmail::address;

/// The largest aliases file read.
const MAX_FILE: u64 = 4 << 20;

/// A parsed aliases file: lower-case name -> targets (checked addresses or
/// bare names), in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aliases {
    pub file: Option<PathBuf>,
    pub map: BTreeMap<String, Vec<String>>,
}

/// An aliases file that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct AliasError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl Aliases {
    /// Read and parse `file`.
    pub fn load(file: &Path) -> Result<Aliases, AliasError> {
        let err = |line, message: String| AliasError {
            file: file.to_path_buf(),
            line,
            message,
        };
        let f = std::fs::File::open(file).map_err(|e| {
            err(
                0,
                format!("cannot read the aliases file ([local] aliases): {e}"),
            )
        })?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_FILE + 1), &mut text)
            .map_err(|e| err(0, format!("cannot read the aliases file: {e}")))?;
        if text.len() as u64 > MAX_FILE {
            return Err(err(0, format!("larger than {MAX_FILE} bytes")));
        }
        let mut a = parse(&text).map_err(|(line, message)| err(line, message))?;
        a.file = Some(file.to_path_buf());
        Ok(a)
    }

    pub fn get(&self, name: &str) -> Option<&[String]> {
        self.map.get(&name.to_ascii_lowercase()).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// Parse aliases text; an error is (line, message).
pub fn parse(text: &str) -> Result<Aliases, (usize, String)> {
    // Logical entries: (first line number, text with continuations joined).
    let mut entries: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            match entries.last_mut() {
                Some((_, e)) => {
                    e.push(' ');
                    e.push_str(line.trim());
                    continue;
                }
                None => return Err((n, "a continuation line with no entry before it".into())),
            }
        }
        entries.push((n, line.to_string()));
    }
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut first_line: BTreeMap<String, usize> = BTreeMap::new();
    for (n, entry) in entries {
        let Some((name, targets)) = entry.split_once(':') else {
            return Err((n, "expected `name: address, ...`".into()));
        };
        let name = name.trim().trim_matches('"').to_ascii_lowercase();
        if name.is_empty() || address::check(&name).ok().as_deref() != Some(name.as_str()) {
            return Err((n, format!("bad alias name {}", address::shown(&name))));
        }
        if let Some(first) = first_line.get(&name) {
            return Err((
                n,
                format!("alias {name:?} is defined twice (first on line {first})"),
            ));
        }
        let mut list = Vec::new();
        for t in split_targets(targets) {
            let t = t.trim();
            if t.is_empty() {
                continue;
            }
            let unquoted = t.trim_matches('"');
            let refused = if unquoted.starts_with(":include:") {
                Some("`:include:` files")
            } else if unquoted.starts_with('|') {
                Some("pipes to commands (`|command`)")
            } else if unquoted.starts_with('/') {
                Some("delivery to files (`/path`)")
            } else {
                None
            };
            if let Some(what) = refused {
                return Err((
                    n,
                    format!(
                        "alias {name:?}: {} is not supported: oauthrelay delivers nothing locally; give an email address instead",
                        what
                    ),
                ));
            }
            let addr = address::list(t).map_err(|e| (n, format!("alias {name:?}: {e}")))?;
            list.extend(addr);
        }
        if list.is_empty() {
            return Err((n, format!("alias {name:?} has no target")));
        }
        first_line.insert(name.clone(), n);
        map.insert(name, list);
    }
    Ok(Aliases { file: None, map })
}

/// Targets split on commas outside quotes.
fn split_targets(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut start) = (false, 0);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etc_aliases_format() {
        let a = parse(
            "# Debian's default\n\
             postmaster:    root\n\
             \n\
             Root: admin@example.com, \"ops team\"@example.com\n\
             webmaster: admin@example.com,\n\
             \t www@example.com\n\
             \x20   # an indented comment\n\
             cron: Cron Owner <cron@example.com>\r\n",
        )
        .unwrap();
        assert_eq!(a.get("postmaster").unwrap(), ["root"]);
        assert_eq!(
            a.get("ROOT").unwrap(),
            ["admin@example.com", "\"ops team\"@example.com"]
        );
        assert_eq!(
            a.get("webmaster").unwrap(),
            ["admin@example.com", "www@example.com"]
        );
        assert_eq!(a.get("cron").unwrap(), ["cron@example.com"]);
        assert_eq!(a.len(), 4);
    }

    #[test]
    fn local_delivery_targets_are_refused_with_their_line() {
        for (text, line, what) in [
            ("a: b@x\nlist: :include:/etc/list\n", 2, ":include:"),
            ("root: |/usr/bin/procmail\n", 1, "pipes"),
            ("root: \"|/usr/bin/procmail\"\n", 1, "pipes"),
            ("a: b@x\n\nlog: /var/log/mail\n", 3, "files"),
            ("root: a@x,\n  |cmd\n", 1, "pipes"),
        ] {
            let (n, msg) = parse(text).unwrap_err();
            assert_eq!(n, line, "{text:?}: {msg}");
            assert!(msg.contains(what), "{msg}");
        }
    }

    #[test]
    fn other_mistakes() {
        assert_eq!(parse("  b@x\n").unwrap_err().0, 1);
        assert_eq!(parse("root admin@x\n").unwrap_err().0, 1);
        assert_eq!(parse("root:\n").unwrap_err().0, 1);
        assert_eq!(parse("root: a@x\nROOT: b@x\n").unwrap_err().0, 2);
        assert_eq!(
            parse("root: a@x\nops: bad address here\n").unwrap_err().0,
            2
        );
        assert_eq!(parse("ro ot: a@x\n").unwrap_err().0, 1);
        assert!(parse("").unwrap().map.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("aliases");
        std::fs::write(&f, "root: a@x\nbin: |/bin/true\n").unwrap();
        let e = Aliases::load(&f).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:2: ", f.display())), "{e}");
        let e = Aliases::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
