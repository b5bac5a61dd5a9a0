//! `cargo xtask`: tasks that run on the build host, not in the product.
//!
//! The man pages and completion scripts are generated from the command line
//! definition itself (`crates/oauthrelay/src/cli.rs`, included below), so
//! they cannot drift from `--help`. They are made here rather than by a
//! hidden `oauthrelay` subcommand because a package may be cross-compiled
//! (an arm64 `.deb` for a Raspberry Pi built on amd64): the build host
//! cannot run the target's binary, but it can run this. It also keeps
//! clap_mangen and the pages' prose out of the shipped binary.
//! (`oauthrelay completions SHELL` uses the same `write_completions`.)
//!
//! ```text
//! cargo xtask dist OUT     # OUT/man/*.8 *.5, OUT/completions/{bash,zsh,fish}
//! cargo xtask check OUT    # every command and flag in every page and script
//! ```

#[allow(dead_code)]
#[path = "../../oauthrelay/src/cli.rs"]
mod cli;

/// sendmail's option table and its clap description (std + clap only),
/// for oauthrelay-sendmail(8).
#[allow(dead_code)]
#[path = "../../oauthrelay/src/sendmail/args.rs"]
mod sendmail_args;

mod check;
mod man;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Build-host tasks for oauthrelay's packages"
)]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Generate the man pages and completion scripts into OUT.
    Dist {
        /// Output directory (created; existing files are replaced).
        out: PathBuf,
    },
    /// Check that the pages and scripts in OUT (from `dist`) list every
    /// command and flag, and that bash and fish complete them.
    Check {
        /// The directory `dist` wrote.
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().task {
        Task::Dist { out } => dist(&out),
        Task::Check { out } => check::run(&out),
    }
}

/// Where each shell's script goes under OUT/completions (and, in a
/// package, the directory the shell searches by default).
pub const COMPLETIONS: [(cli::Shell, &str); 3] = [
    (cli::Shell::Bash, "bash/oauthrelay"),
    (cli::Shell::Zsh, "zsh/_oauthrelay"),
    (cli::Shell::Fish, "fish/oauthrelay.fish"),
];

fn dist(out: &Path) -> anyhow::Result<()> {
    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    let pages = man::generate(&cli::Cli::command(), &man_dir)?;
    for page in &pages {
        println!("{}", page.display());
    }
    for (shell, rel) in COMPLETIONS {
        let path = out.join("completions").join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut text = Vec::new();
        cli::write_completions(shell, &mut text);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// The repository's root (this crate is crates/xtask).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
