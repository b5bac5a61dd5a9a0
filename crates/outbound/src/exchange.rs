//! What Exchange Online's account-level refusals mean and what fixes them
//! (`docs/microsoft-replies.md`). The words end up in the hold reason: the
//! log, `/readyz`, `queue list` and the status page all show them.

use crate::classify::AccountSignal;
use crate::reply::{Answer, AuthDisabled, Reply};

/// The hold for `535 5.7.139` (SMTP AUTH disabled), with the fix for the
/// variant Exchange named. `mailbox` is the account's address.
pub(crate) fn auth_disabled(reply: &Reply, mailbox: &str) -> AccountSignal {
    let (problem, fix) = match reply.smtp_auth_disabled_for() {
        AuthDisabled::Tenant => (
            "SMTP AUTH is disabled for the whole Microsoft 365 tenant".to_string(),
            format!(
                "an Exchange administrator runs: Set-TransportConfig -SmtpClientAuthenticationDisabled $false (or, for this mailbox only: Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false); then: oauthrelay queue retry --all"
            ),
        ),
        AuthDisabled::Mailbox => (
            format!("SMTP AUTH is disabled for the mailbox {mailbox}"),
            format!(
                "an Exchange administrator runs: Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false (or Microsoft 365 admin center > Users > Active users > {mailbox} > Mail > Manage email apps > Authenticated SMTP); then: oauthrelay queue retry --all"
            ),
        ),
        AuthDisabled::SecurityDefaults => (
            "the tenant's security defaults block SMTP AUTH".to_string(),
            "a Global Administrator turns security defaults off (Entra admin center > Identity > Overview > Properties > Manage security defaults) and protects sign-ins with Conditional Access instead; then: oauthrelay queue retry --all".to_string(),
        ),
        AuthDisabled::ConditionalAccess => (
            "a Conditional Access policy blocks SMTP AUTH for this mailbox".to_string(),
            "an administrator excludes the mailbox or the application from the policy (Entra admin center > Protection > Conditional Access); then: oauthrelay queue retry --all".to_string(),
        ),
        AuthDisabled::Unspecified => (
            "Exchange Online refuses SMTP AUTH for this mailbox".to_string(),
            format!(
                "an Exchange administrator enables it: Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false, and for the tenant Set-TransportConfig -SmtpClientAuthenticationDisabled $false; security defaults also block it; then: oauthrelay queue retry --all"
            ),
        ),
    };
    AccountSignal::Refused {
        answer: Answer::Reply(reply.clone()),
        problem: format!("{problem} ({reply})"),
        fix,
    }
}

/// The hold for `554 5.2.0 ... OutboundSpamException`.
pub(crate) fn outbound_spam(reply: &Reply, mailbox: &str) -> AccountSignal {
    AccountSignal::Refused {
        answer: Answer::Reply(reply.clone()),
        problem: format!(
            "Microsoft blocked the mailbox {mailbox} from sending: it is on the restricted entities list for sending spam ({reply})"
        ),
        fix: "an administrator reviews the mailbox (it may be compromised: reset its password, revoke sessions), then releases it in the Microsoft Defender portal > Email & collaboration > Review > Restricted entities; then: oauthrelay queue retry --all".to_string(),
    }
}

/// The words a bounce adds for a send-as refusal.
pub(crate) fn send_as_hint(mailbox: &str, sender: &str) -> String {
    format!(
        "The mailbox {mailbox} that this relay sends through may not send as <{sender}>: Exchange Online checks the envelope sender and the From: header. Either give {mailbox} Send As permission for that address (Exchange admin center > Recipients > Mailboxes > that mailbox > Delegation > Send as), or set rewrite_from = true for the relay's account, which sends as {mailbox} and keeps the original sender in Reply-To:."
    )
}
