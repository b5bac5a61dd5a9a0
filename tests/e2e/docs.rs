//! Documentation that must not drift from the code: every message quoted
//! in docs/troubleshooting.md is one the program really prints (and
//! tests elsewhere check what the daemon really logs against those
//! quotes: [`assert_troubleshooting_quotes`]), and every test that can
//! skip for a missing program shows its SKIPPED line after the nextest
//! summary (.config/nextest.toml).

use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The program's source as its strings read: `\"` is `"`, and a `\` at
/// the end of a line joins the next line without its indentation.
fn program_text() -> String {
    let mut files = Vec::new();
    for c in std::fs::read_dir(Path::new(ROOT).join("crates"))
        .unwrap()
        .flatten()
    {
        let src = c.path().join("src");
        if src.is_dir() && !c.path().ends_with("testkit") && !c.path().ends_with("bench") {
            rust_files(&src, &mut files);
        }
    }
    let mut text = String::new();
    for f in files {
        let raw = std::fs::read_to_string(&f).unwrap();
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('\\', Some('"')) => {
                    text.push('"');
                    chars.next();
                }
                ('\\', Some('\n')) => {
                    chars.next();
                    while chars.peek().is_some_and(|c| c.is_whitespace()) {
                        chars.next();
                    }
                }
                _ => text.push(c),
            }
        }
        text.push('\n');
    }
    text
}

/// The messages docs/troubleshooting.md quotes (lines `> ...`).
pub fn troubleshooting_quotes() -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/troubleshooting.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.trim_start().strip_prefix("> "))
        .filter(|q| *q != "this")
        .map(str::to_string)
        .collect()
}

/// Whether `text` (a log line, a hold reason) contains `quote`, each `…`
/// standing for any text: the fixed pieces appear in order.
pub fn quote_matches(quote: &str, text: &str) -> bool {
    // A quote may start anywhere in a log line (after its timestamp and
    // fields): only the order of the pieces counts.
    let mut rest = text;
    for piece in quote.split('…').filter(|p| !p.is_empty()) {
        let Some(at) = rest.find(piece) else {
            return false;
        };
        rest = &rest[at + piece.len()..];
    }
    true
}

/// Each of `quotes` (copied from docs/troubleshooting.md) is quoted there
/// and matches `text`, what the program really printed.
#[track_caller]
pub fn assert_troubleshooting_quotes(text: &str, quotes: &[&str]) {
    let doc = troubleshooting_quotes();
    for q in quotes {
        assert!(
            doc.iter().any(|d| d == q),
            "docs/troubleshooting.md does not quote {q:?}"
        );
        assert!(
            quote_matches(q, text),
            "docs/troubleshooting.md quotes {q:?}, but the program printed:\n{text}"
        );
    }
}

#[test]
fn quotes_match_with_their_gaps() {
    assert!(quote_matches(
        "a needs …; held until …",
        "x: a needs y; held until z"
    ));
    assert!(quote_matches("scope (…) cannot", "the scope (s) cannot be"));
    assert!(!quote_matches(
        "held until …; needs",
        "needs x; held until y"
    ));
    assert!(!quote_matches("scope (…) cannot", "the scope (s) can"));
}

#[test]
fn every_message_in_troubleshooting_md_is_one_the_program_prints() {
    let source = program_text();
    let quotes = troubleshooting_quotes();
    let quoted: Vec<&str> = quotes.iter().map(String::as_str).collect();
    assert!(quoted.len() >= 30, "only {} quoted messages", quoted.len());
    let mut missing = Vec::new();
    for q in quoted {
        // `…` marks what varies; each fixed piece must be in the source.
        for piece in q.split('…').filter(|p| p.trim().len() >= 6) {
            if !source.contains(piece) {
                missing.push(format!("{piece:?} (from {q:?})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md quotes text the program does not print:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_readme_and_install_guide_link_the_troubleshooting_page() {
    for doc in ["README.md", "docs/install.md"] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(doc)).unwrap();
        assert!(
            text.contains("troubleshooting.md"),
            "{doc} does not link it"
        );
    }
}

/// Tests that call `have_tool` pass without running where the program is
/// missing; nextest hides their "SKIPPED" line unless the test is in the
/// `success-output = "final"` override of .config/nextest.toml.
#[test]
fn every_test_that_can_skip_shows_its_output_after_the_summary() {
    let nextest = std::fs::read_to_string(Path::new(ROOT).join(".config/nextest.toml")).unwrap();
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("tests/e2e"), &mut files);
    let mut found = 0;
    let mut missing = Vec::new();
    for f in files {
        let module = f.file_stem().unwrap().to_string_lossy().into_owned();
        if module == "docs" || module == "harness" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let mut current: Option<String> = None;
        let mut listed = std::collections::BTreeSet::new();
        for line in text.lines() {
            let t = line.trim_start();
            if let Some(rest) = t
                .strip_prefix("async fn ")
                .or_else(|| t.strip_prefix("fn "))
            {
                current = rest.split('(').next().map(str::to_string);
            }
            if line.contains("have_tool(")
                && !t.starts_with("pub fn have_tool")
                && let Some(name) = &current
            {
                listed.insert(name.clone());
            }
        }
        for name in listed {
            found += 1;
            let filter = format!("test(={module}::{name})");
            if !nextest.contains(&filter) {
                missing.push(filter);
            }
        }
    }
    assert!(found >= 10, "found only {found} tests calling have_tool");
    assert!(
        missing.is_empty(),
        "add these to the success-output = \"final\" override in .config/nextest.toml:\n{}",
        missing.join("\n")
    );
}
