//! `cargo xtask check OUT`: the generated pages and scripts list every
//! command and flag of the command line (CI runs it after `dist`).
//!
//! Man pages are read as text. bash and fish run their script and are asked
//! what they complete after each command, as a user pressing Tab would;
//! zsh's script is read as text and, where zsh is installed, parsed by it.
//! A missing shell skips loudly, and fails under `CI=true`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use clap::CommandFactory;

use crate::cli;
use crate::man::{PENDING, page_name};

/// One command of the tree: its words after `oauthrelay`, and itself.
struct Node {
    words: Vec<String>,
    cmd: clap::Command,
}

fn nodes() -> Vec<Node> {
    fn walk(cmd: &clap::Command, words: Vec<String>, out: &mut Vec<Node>) {
        out.push(Node {
            words: words.clone(),
            cmd: cmd.clone(),
        });
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut w = words.clone();
            w.push(sub.get_name().to_string());
            walk(sub, w, out);
        }
    }
    let mut cmd = cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    walk(&cmd, Vec::new(), &mut out);
    out
}

fn children(cmd: &clap::Command) -> Vec<String> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name().to_string())
        .collect()
}

fn long_flags(cmd: &clap::Command) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect()
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let nodes = nodes();
    let mut problems = Vec::new();
    man_pages(out, &nodes, &mut problems)?;
    bash(out, &nodes, &mut problems)?;
    fish(out, &nodes, &mut problems)?;
    zsh(out, &nodes, &mut problems)?;
    if !problems.is_empty() {
        bail!(
            "{} problem(s) in {}:\n  {}",
            problems.len(),
            out.display(),
            problems.join("\n  ")
        );
    }
    let commands = nodes.len() - 1;
    println!(
        "xtask check: {commands} commands, their flags and pages: man, bash, fish, zsh all complete"
    );
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn man_pages(out: &Path, nodes: &[Node], problems: &mut Vec<String>) -> anyhow::Result<()> {
    let dir = out.join("man");
    for node in nodes {
        let name = page_name(&node.cmd);
        if PENDING.contains(&name.as_str()) {
            eprintln!("xtask check: {name}(8) is not generated yet (see man::PENDING)");
            continue;
        }
        let path = dir.join(format!("{name}.8"));
        if !path.exists() {
            problems.push(format!("no man page {}", path.display()));
            continue;
        }
        // roff escapes '-' as '\-'.
        let text = read(&path)?.replace("\\-", "-");
        if !text.contains(&format!(".SH NAME\n{name} - ")) {
            problems.push(format!("{name}.8: no NAME line for {name}"));
        }
        if name == crate::man::SENDMAIL_PAGE {
            for o in crate::sendmail_args::OPTIONS {
                let flag = format!("-{}", o.letter);
                if !text.contains(&flag) {
                    problems.push(format!("{name}.8 does not document {flag}"));
                }
            }
        }
        for flag in long_flags(&node.cmd) {
            if !text.contains(&flag) {
                problems.push(format!("{name}.8 does not document {flag}"));
            }
        }
        for child in children(&node.cmd) {
            if !text.contains(&format!("{name}-{child}(8)")) {
                problems.push(format!("{name}.8 does not list {name}-{child}(8)"));
            }
        }
    }
    for hand in crate::man::hand_written()? {
        let name = hand.file_name().context("page name")?;
        if !dir.join(name).exists() {
            problems.push(format!(
                "the hand-written page {} is missing from {}",
                hand.display(),
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Whether `tool` is installed; missing: say so, and fail under CI.
fn have(tool: &str) -> anyhow::Result<bool> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        let msg = format!("`{tool}` is not installed, so its completion script was not tried");
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("{msg} (.ci/run installs it)");
        }
        eprintln!("\n!!!! SKIPPED: {msg} !!!!\n");
    }
    Ok(found)
}

/// The candidates a shell offers after `oauthrelay WORDS... PARTIAL`.
fn offered(shell: &str, script: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new(shell)
        .args(if shell == "fish" {
            vec!["--no-config", "-c", script]
        } else {
            vec!["--norc", "--noprofile", "-c", script]
        })
        .output()
        .with_context(|| format!("running {shell}"))?;
    if !out.status.success() {
        bail!(
            "{shell} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        // fish prints `candidate<TAB>description`.
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .collect())
}

fn expect(
    shell: &str,
    node: &Node,
    partial: &str,
    wanted: &[String],
    got: &[String],
    problems: &mut Vec<String>,
) {
    for w in wanted {
        if !got.contains(w) {
            problems.push(format!(
                "{shell}: `oauthrelay {}{}<Tab>` does not offer {w} (it offers {got:?})",
                node.words
                    .iter()
                    .map(|w| format!("{w} "))
                    .collect::<String>(),
                partial
            ));
        }
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn bash(out: &Path, nodes: &[Node], problems: &mut Vec<String>) -> anyhow::Result<()> {
    if !have("bash")? {
        return Ok(());
    }
    let script = out.join("completions/bash/oauthrelay");
    read(&script)?;
    for node in nodes {
        for (partial, wanted) in [("", children(&node.cmd)), ("--", long_flags(&node.cmd))] {
            if wanted.is_empty() {
                continue;
            }
            let mut words = vec!["oauthrelay".to_string()];
            words.extend(node.words.iter().cloned());
            let prev = words.last().cloned().unwrap_or_default();
            words.push(partial.to_string());
            // What bash's programmable completion does on Tab: COMP_WORDS,
            // COMP_CWORD, then the function with (command, word, previous).
            let run = format!(
                "source {script}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\nCOMP_LINE={line}\nCOMP_POINT=${{#COMP_LINE}}\n_oauthrelay oauthrelay {cur} {prev}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script = sh_quote(&script.display().to_string()),
                words = words
                    .iter()
                    .map(|w| sh_quote(w))
                    .collect::<Vec<_>>()
                    .join(" "),
                cword = words.len() - 1,
                line = sh_quote(&words.join(" ")),
                cur = sh_quote(partial),
                prev = sh_quote(&prev),
            );
            let got = offered("bash", &run)?;
            expect("bash", node, partial, &wanted, &got, problems);
        }
    }
    Ok(())
}

fn fish(out: &Path, nodes: &[Node], problems: &mut Vec<String>) -> anyhow::Result<()> {
    if !have("fish")? {
        return Ok(());
    }
    let script = out.join("completions/fish/oauthrelay.fish");
    read(&script)?;
    for node in nodes {
        for (partial, wanted) in [("", children(&node.cmd)), ("--", long_flags(&node.cmd))] {
            if wanted.is_empty() {
                continue;
            }
            let line: String = std::iter::once("oauthrelay".to_string())
                .chain(node.words.iter().cloned())
                .chain(std::iter::once(partial.to_string()))
                .collect::<Vec<_>>()
                .join(" ");
            let run = format!(
                "source {}; complete --do-complete {}",
                sh_quote(&script.display().to_string()),
                sh_quote(&line)
            );
            let got = offered("fish", &run)?;
            expect("fish", node, partial, &wanted, &got, problems);
        }
    }
    Ok(())
}

fn zsh(out: &Path, nodes: &[Node], problems: &mut Vec<String>) -> anyhow::Result<()> {
    let script = out.join("completions/zsh/_oauthrelay");
    let text = read(&script)?;
    if !text.starts_with("#compdef oauthrelay") {
        problems.push(format!(
            "{}: no `#compdef oauthrelay` line",
            script.display()
        ));
    }
    // clap_complete lists each subcommand as 'NAME:ABOUT' and each flag as
    // '--flag[HELP]' or '--flag=[HELP]'.
    for node in nodes {
        for child in children(&node.cmd) {
            if !text.contains(&format!("'{child}:")) {
                problems.push(format!("zsh: no entry for the command {child}"));
            }
        }
        for flag in long_flags(&node.cmd) {
            // A flag that conflicts with others starts with their list:
            // '(--device)--port=[HELP]'.
            let listed = ["'", ")"].iter().any(|before| {
                text.contains(&format!("{before}{flag}["))
                    || text.contains(&format!("{before}{flag}=["))
            });
            if !listed {
                problems.push(format!("zsh: no entry for {flag}"));
            }
        }
    }
    if have("zsh")? {
        let out = Command::new("zsh")
            .arg("-n")
            .arg(&script)
            .output()
            .context("running zsh -n")?;
        if !out.status.success() {
            problems.push(format!(
                "zsh -n {}: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}
