//! Man pages: oauthrelay(8) and one page per subcommand, git-style
//! (oauthrelay-queue(8), oauthrelay-queue-retry(8), ...), generated with
//! clap_mangen; the hand-written pages in man/ (oauthrelay.toml(5)) copied
//! next to them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

/// Subcommands whose page is not generated from the command line yet.
pub const PENDING: &[&str] = &[];

/// `sendmail` takes Postfix's options, which its clap subcommand (one
/// trailing ARGS) does not describe: its page is made from
/// `sendmail::args::command()`, built from the same table the parser uses.
pub const SENDMAIL_PAGE: &str = "oauthrelay-sendmail";

const SECTION: &str = "8";
const MANUAL: &str = "oauthrelay manual";

/// Write every page into `dir`; returns their paths.
pub fn generate(cli: &clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut cmd = cli.clone().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    page(&cmd, None, dir, &mut written)?;
    for hand in hand_written()? {
        let name = hand.file_name().context("a page without a name")?;
        let to = dir.join(name);
        std::fs::copy(&hand, &to)
            .with_context(|| format!("copying {} to {}", hand.display(), to.display()))?;
        written.push(to);
    }
    Ok(written)
}

/// The hand-written pages: man/NAME.SECTION in the repository.
pub fn hand_written() -> anyhow::Result<Vec<PathBuf>> {
    let dir = crate::repo_root().join("man");
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let is_page = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.len() == 1 && e.chars().all(|c| c.is_ascii_digit()));
        if is_page {
            pages.push(path);
        }
    }
    pages.sort();
    Ok(pages)
}

/// The page's name: `oauthrelay`, `oauthrelay-queue-retry`.
pub fn page_name(cmd: &clap::Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

fn page(
    cmd: &clap::Command,
    parent: Option<&clap::Command>,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let name = page_name(cmd);
    if PENDING.contains(&name.as_str()) {
        return Ok(());
    }
    let page_cmd = if name == SENDMAIL_PAGE {
        let mut c = crate::sendmail_args::command()
            .name(SENDMAIL_PAGE)
            .display_name(SENDMAIL_PAGE)
            .bin_name("sendmail")
            .version(env!("CARGO_PKG_VERSION"));
        c.build();
        c
    } else {
        cmd.clone()
    };
    let cmd = &page_cmd;
    let mut man = Man::new(cmd.clone())
        .section(SECTION)
        .manual(MANUAL)
        .source(format!(
            "oauthrelay {}",
            cmd.get_version().unwrap_or(env!("CARGO_PKG_VERSION"))
        ));
    // Always a date: without it the .TH line's later fields shift.
    man = man.date(source_date());
    let mut text = Vec::new();
    man.render_title(&mut text)?;
    man.render_name_section(&mut text)?;
    man.render_synopsis_section(&mut text)?;
    man.render_description_section(&mut text)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut text)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut text)?;
    }
    let mut extra = Roff::new();
    match parent {
        None => top_page_sections(&mut extra),
        Some(_) if name == SENDMAIL_PAGE => sendmail_sections(&mut extra),
        Some(parent) => {
            extra.control("SH", ["SEE ALSO"]);
            let mut refs = vec![bold("oauthrelay"), roman("(8)")];
            if parent.get_display_name() != Some("oauthrelay") {
                refs.extend([roman(", "), bold(page_name(parent)), roman("(8)")]);
            }
            refs.extend([roman(", "), bold("oauthrelay.toml"), roman("(5)")]);
            extra.text(refs);
        }
    }
    extra.to_writer(&mut text)?;
    if parent.is_none() {
        man.render_version_section(&mut text)?;
    }
    let path = dir.join(format!("{name}.{SECTION}"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub, Some(cmd), dir, written)?;
    }
    Ok(())
}

/// FILES, ENVIRONMENT, EXIT STATUS, SIGNALS and SEE ALSO of oauthrelay(8):
/// what `--help` has no room for (docs/configuration.md has the details).
fn top_page_sections(r: &mut Roff) {
    let item = |r: &mut Roff, term: &str, text: &str| {
        r.control("TP", []);
        r.text([bold(term)]);
        r.text([roman(text)]);
    };
    r.control("SH", ["FILES"]);
    item(
        r,
        "/etc/oauthrelay/oauthrelay.toml",
        "The configuration (see oauthrelay.toml(5)). Without --config, \
         $OAUTHRELAY_CONFIG, then this file, then \
         ~/.config/oauthrelay/oauthrelay.toml are tried; with none, built-in \
         defaults apply.",
    );
    item(
        r,
        "/var/lib/oauthrelay/spool/",
        "The queue: append-only segment files, a lock file, and control.sock, \
         through which the queue commands reach the running daemon. Under \
         systemd the state directory is $STATE_DIRECTORY.",
    );
    item(
        r,
        "/var/lib/oauthrelay/tokens/NAME.json",
        "The stored OAuth tokens of account NAME (mode 0600).",
    );
    item(
        r,
        "/usr/sbin/sendmail, /usr/bin/mailq, /usr/bin/newaliases",
        "Links to oauthrelay installed by the package: invoked by these names it \
         behaves like the sendmail program, lists the queue, or checks the \
         aliases.",
    );

    r.control("SH", ["ENVIRONMENT"]);
    item(
        r,
        "OAUTHRELAY_CONFIG",
        "Configuration file used when --config is not given.",
    );
    item(
        r,
        "RUST_LOG",
        "Log filter (for example info,outbound=debug); wins over [log] level.",
    );
    item(
        r,
        "STATE_DIRECTORY, CREDENTIALS_DIRECTORY, LISTEN_FDS, NOTIFY_SOCKET",
        "Set by systemd: the state directory, the credentials \
         (NAME.client_secret, NAME.service_account_key), passed sockets, \
         readiness notification.",
    );

    r.control("SH", ["EXIT STATUS"]);
    r.text([roman(
        "0 on success, non-zero on failure: 78 (EX_CONFIG) when the \
         configuration is wrong (the unit does not restart on it), except \
         check-config, which exits 1 with the errors on stderr; token \
         status exits 1 when an account is not authorized. sendmail follows sysexits(3): 0 queued, 64 usage \
         error, 65 message refused, 75 temporary failure (try again \
         later). A command whose output pipe is closed early (| head) \
         ends quietly, as if killed by SIGPIPE (status 141 in a shell).",
    )]);

    r.control("SH", ["SIGNALS"]);
    item(
        r,
        "SIGHUP",
        "serve re-reads the configuration and token files (systemctl reload \
         oauthrelay); an invalid new configuration is logged and the running \
         one kept.",
    );
    item(
        r,
        "SIGTERM, SIGINT",
        "serve stops accepting, lets transfers in progress finish, leaves the \
         rest queued, and exits 0.",
    );

    r.control("SH", ["SEE ALSO"]);
    r.text([
        bold("oauthrelay.toml"),
        roman("(5), "),
        bold("oauthrelay-serve"),
        roman("(8), "),
        bold("oauthrelay-authorize"),
        roman("(8), "),
        bold("oauthrelay-queue"),
        roman("(8), "),
        bold("systemctl"),
        roman("(1), "),
        bold("journalctl"),
        roman("(1); "),
        italic("/usr/share/doc/oauthrelay/"),
        roman(" (install.md, gmail-setup.md, configuration.md)."),
    ]);
}

/// FILES, EXIT STATUS and SEE ALSO of oauthrelay-sendmail(8).
fn sendmail_sections(r: &mut Roff) {
    let item = |r: &mut Roff, term: &str, text: &str| {
        r.control("TP", []);
        r.text([bold(term)]);
        r.text([roman(text)]);
    };
    r.control("SH", ["EXAMPLES"]);
    item(
        r,
        "sendmail -t -i < message",
        "What PHP's mail() and many scripts run: recipients from To:, Cc: and Bcc:.",
    );
    item(
        r,
        "sendmail -FCronDaemon -i -B8BITMIME -oem root",
        "What Debian's cron runs: root goes through [local] aliases, else to the postmaster.",
    );
    item(
        r,
        "sendmail -bs",
        "What Symfony Mailer and Laravel run: an SMTP dialogue on stdin and stdout.",
    );
    item(
        r,
        "sendmail -bv root",
        "Where mail for root would go (aliases, account), sending nothing.",
    );
    r.control("SH", ["FILES"]);
    item(
        r,
        "/usr/sbin/sendmail, /usr/bin/mailq, /usr/bin/newaliases",
        "Links to oauthrelay: sendmail, -bp and -bi.",
    );
    item(
        r,
        "/var/spool/oauthrelay-maildrop/",
        "The maildrop ([local] maildrop): root:oauthrelay-maildrop, mode 0770. While the \
         daemon is stopped, mail of users other than root is left here (the binary is \
         installed setgid oauthrelay-maildrop and uses the group for nothing else); \
         the daemon imports it when it starts.",
    );
    item(
        r,
        "/etc/aliases",
        "The usual aliases file ([local] aliases): name: address, ... with comments and \
         continuation lines; :include:, |command and /file are refused.",
    );
    r.control("SH", ["EXIT STATUS"]);
    r.text([roman(
        "sysexits(3): 0 queued; 64 usage error (a missing option value, no recipients); \
         65 bad data (an address or -F name with control characters, an unusable To:, Cc: \
         or Bcc: with -t: nothing is sent); 75 temporary failure (the daemon does not run \
         and neither the queue nor the maildrop can be written: nothing was queued, try \
         again); 78 configuration error.",
    )]);
    r.control("SH", ["SEE ALSO"]);
    r.text([
        bold("oauthrelay"),
        roman("(8), "),
        bold("oauthrelay.toml"),
        roman("(5), "),
        bold("aliases"),
        roman("(5), "),
        bold("sendmail"),
        roman("(1) (Postfix)."),
    ]);
}

/// The pages' date: `SOURCE_DATE_EPOCH` (reproducible builds), else the
/// last commit's, else today.
fn source_date() -> String {
    let from_env = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    let from_git = || {
        let out = std::process::Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(crate::repo_root())
            .output()
            .ok()?;
        String::from_utf8(out.stdout)
            .ok()?
            .trim()
            .parse::<i64>()
            .ok()
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    };
    let secs = from_env.or_else(from_git).unwrap_or_else(now);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
