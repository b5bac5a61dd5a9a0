//! The configuration file, as `oauthrelay check-config` and `serve` read it.
//!
//! The parser is the binary's own `src/config.rs`, compiled in here as it is
//! (it is a private module of a binary crate, so it cannot be a dependency).
//!
//! What must hold for any text:
//!
//! - no panic;
//! - every error names a place inside the text: line 1..=lines, column
//!   1..=length of that line + 1, and a non-empty message;
//! - a text that parses renders (`check-config`'s output) without error, and
//!   the rendering parses again and renders the same.

#![no_main]

#[allow(dead_code)]
#[path = "../../crates/oauthrelay/src/config.rs"]
mod config;

// config.rs re-exports `cli::LogFormat`; cli.rs uses nothing of the crate.
#[allow(dead_code)]
#[path = "../../crates/oauthrelay/src/cli.rs"]
mod cli;

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/oauthrelay/oauthrelay.toml");
    match config::parse(source, Some(path)) {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result without errors");
            for e in &errors.0 {
                check_place(source, e);
                assert_eq!(e.file.as_deref(), Some(path));
                let shown = e.to_string();
                assert!(
                    shown.starts_with(&format!("{}:{}:{}: ", path.display(), e.line, e.col)),
                    "{shown}"
                );
            }
        }
        Ok(loaded) => {
            let rendered = config::render(&loaded.config);
            assert!(
                !rendered.starts_with("# cannot render"),
                "a configuration that parses cannot be rendered:\n{rendered}\nfrom:\n{source}"
            );
            let again = match config::parse(&rendered, Some(path)) {
                Ok(l) => l,
                Err(e) => panic!(
                    "the rendered configuration does not parse: {e}\nrendered:\n{rendered}\nfrom:\n{source}"
                ),
            };
            assert_eq!(
                config::render(&again.config),
                rendered,
                "rendering is not stable"
            );
        }
    }
});

fn check_place(source: &str, e: &config::ConfigError) {
    assert!(!e.message.trim().is_empty(), "an error without a message");
    let lines: Vec<&str> = source.split('\n').collect();
    assert!(
        e.line >= 1 && e.line <= lines.len(),
        "line {} outside a text of {} lines: {}",
        e.line,
        lines.len(),
        e.message
    );
    let len = lines[e.line - 1].len();
    assert!(
        e.col >= 1 && e.col <= len + 1,
        "column {} outside line {} of {} bytes: {}",
        e.col,
        e.line,
        len,
        e.message
    );
}
