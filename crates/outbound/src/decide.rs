//! What an attempt's results mean for the message: deliver, defer, fail,
//! bounce, expire, pause or hold. A pure function of (state, results,
//! config, now): the worker applies the decision (spool writes, the bounce,
//! the log lines); the scheduler applies the account signal.

use std::time::{Duration, SystemTime};

use spool::Envelope;

use crate::DeliveryConfig;
use crate::classify::{AccountSignal, RcptOutcome};
use crate::hold::HoldReason;
use crate::metrics::AttemptResult;
use crate::reply::{Answer, Status};
use crate::state::{DeliveryState, RcptState};
use crate::transport::Attempt;

/// `initial * 2^(n-1)` capped at `max`, times `1 + 0.2 * jitter` (jitter in
/// [0, 1)), capped again: never sooner than the schedule says, and
/// concurrent retries spread out.
pub(crate) fn backoff(initial: Duration, max: Duration, n: u32, jitter: f64) -> Duration {
    let n = n.max(1);
    let factor = 2u32.saturating_pow((n - 1).min(30));
    let base = initial.saturating_mul(factor).min(max);
    let jittered = base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) * 0.2);
    jittered.min(max.max(initial))
}

/// The word of a delivery log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStatus {
    Sent,
    Deferred,
    Bounced,
    Held,
}

impl LogStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStatus::Sent => "sent",
            LogStatus::Deferred => "deferred",
            LogStatus::Bounced => "bounced",
            LogStatus::Held => "held",
        }
    }
}

/// One Postfix-style log line to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub status: LogStatus,
    pub rcpts: Vec<usize>,
    pub dsn: Status,
    pub text: String,
}

/// The `dsn=` of a deferral: the reply's own enhanced status, whatever its
/// class (a daily limit's `550 5.4.5` defers, and says `5.4.5`), else one
/// from the reply code's class; `4.0.0` when no reply came (a network
/// error).
fn deferral_status(answer: &Answer) -> Status {
    match answer.reply() {
        Some(r) => r
            .status
            .unwrap_or(Status::new(if r.code >= 500 { 5 } else { 4 }, 0, 0)),
        None => Status::new(4, 0, 0),
    }
}

/// Who hears of a message's failed recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// A bounce (RFC 3464 report) to the envelope sender.
    Sender,
    /// The message is a bounce, or has the null sender: nobody would read
    /// a bounce of it, so a copy goes to the postmaster with the failed
    /// message attached (Postfix's double bounce).
    Postmaster,
    /// The message is the postmaster's copy: nobody is left to tell. It
    /// is dropped, with an ERROR line and
    /// `oauthrelay_messages_dropped_total{reason}`.
    Drop,
}

/// Who is told of the failures of a message with `sender` and `state`.
pub(crate) fn notice_for(sender: &str, state: &DeliveryState) -> Notice {
    if state.postmaster_copy {
        Notice::Drop
    } else if sender.is_empty() || state.bounce_of.is_some() {
        Notice::Postmaster
    } else {
        Notice::Sender
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    /// The state to record.
    pub state: DeliveryState,
    /// Recipients that failed in this attempt: reported in one notice now
    /// (see `notice`), or, for [`Notice::Drop`], dropped (already marked
    /// reported).
    pub bounce: Vec<usize>,
    /// Who `bounce` is reported to.
    pub notice: Notice,
    /// Every recipient has its final outcome: remove the message (after
    /// the bounce is queued).
    pub done: bool,
    /// Recipients delivered in this attempt.
    pub delivered: usize,
    pub result: AttemptResult,
    pub lines: Vec<Line>,
}

/// What the account's state means for the message's next attempt.
#[derive(Debug, Clone, Default)]
pub(crate) struct AccountEffect {
    /// Why the account's mail is held, when the attempt's signal holds it
    /// (the token manager's words).
    pub hold: Option<HoldReason>,
    /// Until when the account pauses after the attempt's signal (the
    /// scheduler applies the same pause).
    pub paused_until: Option<SystemTime>,
}

/// Decide what `attempt` means for a message in `before` at `now`.
/// `jitter` in [0, 1) spreads retries.
pub(crate) fn decide(
    env: &Envelope,
    before: &DeliveryState,
    attempt: &Attempt,
    account: &AccountEffect,
    cfg: &DeliveryConfig,
    now: SystemTime,
    jitter: f64,
) -> Decision {
    let mut state = before.clone();
    state.attempts = state.attempts.saturating_add(1);
    // Waiting is over: the time held or paused stays out of the age.
    state.end_waits(now);

    let mut sent = Vec::new();
    let mut deferred = Vec::new();
    let mut failed = Vec::new();
    let mut sent_answer: Option<Answer> = None;
    let mut first_deferred: Option<Answer> = None;
    let mut unanswered = Vec::new();
    for (i, o) in &attempt.outcomes {
        let Some(r) = state.recipients.get_mut(*i) else {
            continue;
        };
        if r.state != RcptState::Pending {
            continue;
        }
        match o {
            RcptOutcome::Delivered(a) => {
                r.state = RcptState::Delivered;
                r.answer = Some(a.clone());
                sent_answer = Some(a.clone());
                sent.push(*i);
            }
            RcptOutcome::Failed(a) => {
                r.state = RcptState::Failed;
                r.answer = Some(a.clone());
                failed.push(*i);
            }
            RcptOutcome::Deferred(a) => {
                first_deferred.get_or_insert_with(|| a.clone());
                r.answer = Some(a.clone());
                deferred.push(*i);
            }
            RcptOutcome::Again => {
                unanswered.push(*i);
                deferred.push(*i);
            }
        }
    }
    let signal_answer = attempt.signal.as_ref().map(|s| s.answer().clone());
    let fallback = first_deferred
        .clone()
        .or_else(|| signal_answer.clone())
        .unwrap_or_else(|| Answer::error("not attempted"));

    // Too old: recipients this real attempt left deferred for a temporary
    // reason of the message, the connection or the upstream fail for good,
    // with this attempt's answer. Never when the account is throttled,
    // over its daily limit or cannot authenticate: that mail waits.
    let ages = attempt.signal.as_ref().is_none_or(AccountSignal::ages_mail);
    let mut expired = Vec::new();
    if ages && state.age(env, now) >= cfg.max_age {
        for &i in &deferred {
            if attempt.local.contains(&i) {
                continue;
            }
            let r = &mut state.recipients[i];
            r.state = RcptState::Failed;
            r.expired = true;
            if unanswered.contains(&i) || r.answer.is_none() {
                r.answer = Some(fallback.clone());
            }
            expired.push(i);
        }
        deferred.retain(|i| !expired.contains(i));
    }

    // One bounce per attempt, for what this attempt failed.
    let bounce: Vec<usize> = failed.iter().chain(&expired).copied().collect();
    let notice = notice_for(&env.sender, &state);
    for &i in &bounce {
        // A notice is queued before the recipient counts as reported; a
        // drop reports nothing to anyone.
        state.recipients[i].reported = notice == Notice::Drop;
    }

    state.last_error = first_deferred.clone().or_else(|| signal_answer.clone());
    let done = state.is_done();
    let held = match (&attempt.signal, &account.hold) {
        (Some(s), Some(h)) if s.holds() => Some(h.clone()),
        _ => None,
    };
    state.next_attempt = None;
    if !done {
        match &held {
            Some(h) => state.hold(h.clone(), now),
            None => {
                let mut next =
                    now + backoff(cfg.retry_initial, cfg.retry_max, state.attempts, jitter);
                // Not before the account's pause is over.
                if let Some(until) = account.paused_until {
                    next = next.max(until);
                }
                if attempt.signal.as_ref().is_some_and(|s| !s.ages_mail()) {
                    state.paused_since = Some(now);
                }
                state.next_attempt = Some(next);
            }
        }
    }

    let mut lines = Vec::new();
    if !sent.is_empty() {
        let answer = sent_answer.unwrap_or_else(|| Answer::error("sent"));
        lines.push(Line {
            status: LogStatus::Sent,
            dsn: answer
                .reply()
                .and_then(|r| r.status)
                .unwrap_or(Status::new(2, 0, 0)),
            text: answer.to_string(),
            rcpts: sent.clone(),
        });
    }
    for &i in &failed {
        let answer = state.recipients[i]
            .answer
            .clone()
            .unwrap_or(fallback.clone());
        lines.push(Line {
            status: LogStatus::Bounced,
            dsn: answer
                .reply()
                .map(|r| r.dsn_status())
                .unwrap_or(Status::new(5, 0, 0)),
            text: answer.to_string(),
            rcpts: vec![i],
        });
    }
    for &i in &expired {
        let last = state.recipients[i]
            .answer
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "none".into());
        lines.push(Line {
            status: LogStatus::Bounced,
            dsn: Status::new(5, 4, 7),
            text: format!(
                "message expired after {} in the queue; last reply: {last}",
                humantime::format_duration(cfg.max_age)
            ),
            rcpts: vec![i],
        });
    }
    if !deferred.is_empty() {
        lines.push(Line {
            status: if held.is_some() {
                LogStatus::Held
            } else {
                LogStatus::Deferred
            },
            dsn: deferral_status(&fallback),
            text: fallback.to_string(),
            rcpts: deferred.clone(),
        });
    }
    let result = if !deferred.is_empty() {
        AttemptResult::Deferred
    } else if !failed.is_empty() || !expired.is_empty() {
        AttemptResult::Failed
    } else {
        AttemptResult::Sent
    };
    Decision {
        state,
        bounce,
        notice,
        done,
        delivered: sent.len(),
        result,
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{TxReplies, classify};
    use crate::clock::Clock;
    use crate::reply::Reply;

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_age: Duration::from_secs(5 * 86_400),
            login_throttle_pause: Duration::from_secs(300),
            daily_limit_pause: Duration::from_secs(3600),
            ..DeliveryConfig::default()
        }
    }

    fn env(n: usize, received: SystemTime) -> Envelope {
        let mut e = Envelope::new(
            "app@example.com",
            (0..n).map(|i| format!("r{i}@example.org")),
        );
        e.received = received;
        e
    }

    fn reply(line: &str) -> Reply {
        Reply::parse(line).unwrap()
    }

    /// An attempt whose only transaction got `line` at `stage` (0 MAIL, 1
    /// RCPT, 2 end of data), everything else accepted.
    fn at_stage(stage: u8, line: &str) -> Attempt {
        let ok = |l: &str| Some(reply(l));
        let mut tx = TxReplies {
            mail: ok("250 2.1.0 OK"),
            rcpts: vec![ok("250 2.1.5 OK")],
            data: ok("250 2.0.0 OK  1700000000 id - gsmtp"),
            chunk_refused: false,
        };
        match stage {
            0 => tx.mail = ok(line),
            1 => tx.rcpts[0] = ok(line),
            _ => tx.data = ok(line),
        }
        let c = classify(&tx, 1, "relay@contoso.com");
        Attempt {
            outcomes: c.rcpts.into_iter().enumerate().collect(),
            signal: c.signal,
            connected: true,
            transacted: true,
            ..Attempt::default()
        }
    }

    fn hold() -> HoldReason {
        HoldReason::NeedsAuthorization {
            account: "default".into(),
            problem: "Gmail refused a freshly refreshed access token".into(),
            fix: "run: oauthrelay authorize --account default".into(),
        }
    }

    /// The account effect the scheduler's runtime gives `attempt`'s signal.
    fn effect(attempt: &Attempt, now: SystemTime) -> AccountEffect {
        let mut rt = crate::account::Runtime::default();
        let hold = attempt
            .signal
            .as_ref()
            .is_some_and(AccountSignal::holds)
            .then(hold);
        if let Some(sig) = &attempt.signal {
            rt.apply(
                sig,
                hold.clone(),
                &cfg(),
                tokio::time::Instant::now(),
                now,
                0.5,
            );
        }
        AccountEffect {
            hold,
            paused_until: rt.pause.map(|p| p.until_wall),
        }
    }

    #[derive(Debug, PartialEq)]
    enum Verdict {
        Delivered,
        Deferred,
        Bounced,
        Held,
    }

    /// Run `attempt` on a one-recipient message received `age` ago.
    fn verdict(attempt: &Attempt, age: Duration, clock: &Clock) -> (Verdict, Decision) {
        let now = clock.now();
        let e = env(1, now - age);
        let d = decide(
            &e,
            &DeliveryState::new(1),
            attempt,
            &effect(attempt, now),
            &cfg(),
            now,
            0.5,
        );
        let v = match d.state.recipients[0].state {
            RcptState::Delivered => Verdict::Delivered,
            RcptState::Failed => Verdict::Bounced,
            RcptState::Pending if d.state.hold.is_some() => Verdict::Held,
            RcptState::Pending => Verdict::Deferred,
        };
        (v, d)
    }

    /// Every row of docs/gmail-replies.md, at every stage it can come at,
    /// young and past `max_age`.
    #[tokio::test(start_paused = true)]
    async fn each_row_of_the_gmail_reply_table() {
        use Verdict::*;
        let clock = Clock::new();
        let young = Duration::from_secs(60);
        let old = Duration::from_secs(6 * 86_400);
        // (reply, verdict when young, verdict when past max_age)
        let rows: &[(&str, Verdict, Verdict)] = &[
            ("421 4.3.0 Temporary System Problem", Deferred, Bounced),
            ("421 4.4.5 Server busy, try again later", Deferred, Bounced),
            (
                "421 4.7.0 Try again later, closing connection.",
                Deferred,
                Bounced,
            ),
            (
                "450 4.2.1 The user you are trying to contact is receiving mail too quickly",
                Deferred,
                Bounced,
            ),
            (
                "451 4.3.0 Mail server temporarily rejected message",
                Deferred,
                Bounced,
            ),
            ("451 4.4.2 Timeout - closing connection", Deferred, Bounced),
            (
                "454 4.7.0 Cannot authenticate due to a temporary system problem",
                Deferred,
                Bounced,
            ),
            (
                "454 4.7.0 Too many login attempts, please try again later.",
                Deferred,
                Deferred,
            ),
            (
                "550 5.4.5 Daily user sending limit exceeded.",
                Deferred,
                Deferred,
            ),
            (
                "552 5.3.4 Your message exceeded Google's message size limits.",
                Bounced,
                Bounced,
            ),
            (
                "552 5.7.0 This message was blocked because its content presents a potential security issue.",
                Bounced,
                Bounced,
            ),
            (
                "550 5.1.1 The email account that you tried to reach does not exist.",
                Bounced,
                Bounced,
            ),
            (
                "553 5.1.2 We weren't able to find the recipient domain.",
                Bounced,
                Bounced,
            ),
            (
                "553 5.1.7 The sender address is not a valid RFC 5321 address.",
                Bounced,
                Bounced,
            ),
            ("530 5.7.0 Authentication Required.", Held, Held),
            ("535 5.7.8 Username and Password not accepted.", Held, Held),
        ];
        for (line, when_young, when_old) in rows {
            // The daily limit and throttling come at MAIL (and the limit at
            // the end of data); the rest at any stage.
            for stage in 0..3u8 {
                let a = at_stage(stage, line);
                let (v, d) = verdict(&a, young, &clock);
                assert_eq!(&v, when_young, "{line} at stage {stage}");
                let (v, _) = verdict(&a, old, &clock);
                assert_eq!(&v, when_old, "{line} at stage {stage}, past max_age");
                if v == Bounced {
                    assert_eq!(d.done, *when_young == Bounced);
                }
                tokio::time::advance(Duration::from_secs(1)).await;
            }
        }
        // 452 4.5.3: the rest go in the next transaction (the transport
        // does that); if even the first is refused, defer.
        let a = at_stage(1, "452 4.5.3 Your message has too many recipients");
        assert_eq!(verdict(&a, young, &clock).0, Deferred);
        // A network, TLS or timeout error: defer, and expire when old.
        let net = Attempt {
            outcomes: vec![(
                0,
                RcptOutcome::Deferred(Answer::error(
                    "connect to smtp.gmail.com[1.2.3.4]:465 failed: refused",
                )),
            )],
            signal: Some(AccountSignal::Unreachable(Answer::error("connect failed"))),
            ..Attempt::default()
        };
        assert_eq!(verdict(&net, young, &clock).0, Deferred);
        let (v, d) = verdict(&net, old, &clock);
        assert_eq!(v, Bounced);
        assert_eq!(d.lines[0].dsn, Status::new(5, 4, 7));
        // 250: delivered.
        let ok = at_stage(2, "250 2.0.0 OK  1700000000 id - gsmtp");
        let (v, d) = verdict(&ok, old, &clock);
        assert_eq!(v, Delivered);
        assert_eq!(d.result, AttemptResult::Sent);
        assert!(d.done && d.bounce.is_empty());
    }

    /// Every row of docs/microsoft-replies.md that comes in a transaction,
    /// at every stage it can come at, young and past `max_age`.
    #[tokio::test(start_paused = true)]
    async fn each_row_of_the_microsoft_reply_table() {
        use Verdict::*;
        let clock = Clock::new();
        let young = Duration::from_secs(60);
        let old = Duration::from_secs(6 * 86_400);
        let rows: &[(&str, Verdict, Verdict, &str)] = &[
            (
                "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
                Bounced,
                Bounced,
                "",
            ),
            (
                "554 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as app@example.com",
                Bounced,
                Bounced,
                "",
            ),
            (
                "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
                Deferred,
                Deferred,
                "rate_limited",
            ),
            (
                "421 4.4.2 Message submission rate for this client has exceeded the configured limit",
                Deferred,
                Deferred,
                "rate_limited",
            ),
            (
                "554 5.2.0 STOREDRV.Submission.Exception:OutboundSpamException; Failed to process message due to a permanent exception",
                Held,
                Held,
                "restricted entities",
            ),
            (
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox",
                Held,
                Held,
                "Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false",
            ),
            (
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
                Held,
                Held,
                "Set-TransportConfig -SmtpClientAuthenticationDisabled $false",
            ),
            (
                "535 5.7.139 Authentication unsuccessful, the user is locked by your organization's security defaults policy",
                Held,
                Held,
                "security defaults",
            ),
            (
                "535 5.7.3 Authentication unsuccessful [SN4PR0601CA0005.namprd06.prod.outlook.com]",
                Held,
                Held,
                "",
            ),
        ];
        for (line, when_young, when_old, words) in rows {
            for stage in 0..3u8 {
                let a = at_stage(stage, line);
                let (v, _) = verdict(&a, young, &clock);
                assert_eq!(&v, when_young, "{line} at stage {stage}");
                let (v, _) = verdict(&a, old, &clock);
                assert_eq!(&v, when_old, "{line} at stage {stage}, past max_age");
                match (&a.signal, *words) {
                    (Some(AccountSignal::Refused { problem, fix, .. }), w) if !w.is_empty() => {
                        assert!(
                            problem.contains(w) || fix.contains(w),
                            "{line}: {problem}; {fix}"
                        );
                    }
                    (Some(AccountSignal::RateLimited { .. }), "rate_limited") => {}
                    (_, "") => {}
                    (s, w) => panic!("{line}: signal {s:?}, expected {w}"),
                }
                tokio::time::advance(Duration::from_secs(1)).await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_recipients_bounce_at_the_attempt_that_failed_them() {
        let clock = Clock::new();
        let e = env(3, clock.now());
        let a = Attempt {
            outcomes: vec![
                (
                    0,
                    RcptOutcome::Failed(Answer::Reply(reply("550 5.1.1 no such user"))),
                ),
                (
                    1,
                    RcptOutcome::Deferred(Answer::Reply(reply("451 4.3.0 later"))),
                ),
                (
                    2,
                    RcptOutcome::Delivered(Answer::Reply(reply("250 2.0.0 OK"))),
                ),
            ],
            ..Attempt::default()
        };
        let none = AccountEffect::default();
        let d = decide(
            &e,
            &DeliveryState::new(3),
            &a,
            &none,
            &cfg(),
            clock.now(),
            0.0,
        );
        assert_eq!(d.bounce, vec![0], "bounced now, while r1 stays deferred");
        assert!(!d.done);
        assert!(
            !d.state.recipients[0].reported,
            "reported once the bounce is queued"
        );
        assert_eq!(d.result, AttemptResult::Deferred);
        let next = d.state.next_attempt.unwrap();
        assert_eq!(
            next.duration_since(clock.now()).unwrap(),
            Duration::from_secs(60)
        );

        // The next attempt delivers r1: nothing more to bounce (one DSN per
        // attempt, each recipient once).
        let mut before = d.state.clone();
        before.recipients[0].reported = true;
        tokio::time::advance(Duration::from_secs(60)).await;
        let a = Attempt {
            outcomes: vec![(
                1,
                RcptOutcome::Delivered(Answer::Reply(reply("250 2.0.0 OK"))),
            )],
            ..Attempt::default()
        };
        let d = decide(&e, &before, &a, &none, &cfg(), clock.now(), 0.0);
        assert!(d.bounce.is_empty() && d.done);
        assert_eq!(d.result, AttemptResult::Sent);

        // The null sender gets no bounce: the postmaster gets a copy.
        let mut null = e.clone();
        null.sender.clear();
        let a = Attempt {
            outcomes: vec![(
                0,
                RcptOutcome::Failed(Answer::Reply(reply("550 5.1.1 no such user"))),
            )],
            ..Attempt::default()
        };
        let d = decide(
            &null,
            &DeliveryState::new(3),
            &a,
            &none,
            &cfg(),
            clock.now(),
            0.0,
        );
        assert_eq!((d.bounce.clone(), d.notice), (vec![0], Notice::Postmaster));
        assert!(!d.state.recipients[0].reported, "reported once queued");
    }

    /// A bounce that fails for good goes to the postmaster; the
    /// postmaster's copy that fails for good is dropped (and counts as
    /// reported, so nothing is queued for it); a sender bounce is the
    /// rule. Refused at once or expired after `max_age`.
    #[tokio::test(start_paused = true)]
    async fn an_undeliverable_bounce_goes_to_the_postmaster_and_its_copy_is_dropped() {
        let clock = Clock::new();
        let refused = at_stage(
            1,
            "550 5.1.1 The email account that you tried to reach does not exist.",
        );
        let mut bounce = env(1, clock.now());
        bounce.sender.clear();
        let mut bounce_state = DeliveryState::new(1);
        bounce_state.bounce_of = Some(spool::MessageId::from_u64(7));
        bounce_state.reports = vec![0];
        let mut copy_state = bounce_state.clone();
        copy_state.postmaster_copy = true;
        let cases = [
            (env(1, clock.now()), DeliveryState::new(1), Notice::Sender),
            (bounce.clone(), DeliveryState::new(1), Notice::Postmaster),
            (bounce.clone(), bounce_state.clone(), Notice::Postmaster),
            (bounce.clone(), copy_state.clone(), Notice::Drop),
        ];
        for (e, before, notice) in &cases {
            assert_eq!(notice_for(&e.sender, before), *notice);
            let d = decide(
                e,
                before,
                &refused,
                &AccountEffect::default(),
                &cfg(),
                clock.now(),
                0.0,
            );
            assert_eq!(d.notice, *notice);
            assert_eq!(d.bounce, vec![0], "{notice:?}");
            assert!(d.done);
            assert_eq!(d.state.recipients[0].reported, *notice == Notice::Drop);
            assert_eq!(d.lines[0].status, LogStatus::Bounced);
        }
        // Expired: the postmaster's copy, six days undelivered.
        let net = Attempt {
            outcomes: vec![(
                0,
                RcptOutcome::Deferred(Answer::error("connect to smtp.gmail.com failed")),
            )],
            signal: Some(AccountSignal::Unreachable(Answer::error("connect failed"))),
            ..Attempt::default()
        };
        let young = decide(
            &bounce,
            &copy_state,
            &net,
            &AccountEffect::default(),
            &cfg(),
            clock.now(),
            0.0,
        );
        assert!(young.bounce.is_empty() && !young.done, "a young copy waits");
        tokio::time::advance(Duration::from_secs(6 * 86_400)).await;
        let d = decide(
            &bounce,
            &copy_state,
            &net,
            &AccountEffect::default(),
            &cfg(),
            clock.now(),
            0.0,
        );
        assert_eq!(
            (d.notice, d.bounce.clone(), d.done),
            (Notice::Drop, vec![0], true)
        );
        assert!(d.state.recipients[0].expired && d.state.recipients[0].reported);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_and_daily_limit_pause_without_aging_mail() {
        let clock = Clock::new();
        let t0 = clock.now();
        let e = env(1, t0);
        let limit = at_stage(2, "550 5.4.5 Daily user sending limit exceeded.");
        let mut state = DeliveryState::new(1);
        // Four days of daily-limit pauses, then a day of 4xx: the message
        // has aged one day, not five.
        for _ in 0..4 {
            let d = decide(
                &e,
                &state,
                &limit,
                &effect(&limit, clock.now()),
                &cfg(),
                clock.now(),
                0.0,
            );
            assert!(d.bounce.is_empty());
            assert!(d.state.next_attempt.unwrap() >= clock.now() + Duration::from_secs(3600));
            // The log line says what Gmail said, not a made-up 4.0.0.
            let line = &d.lines[0];
            assert_eq!(
                (line.status, line.dsn),
                (LogStatus::Deferred, Status::new(5, 4, 5))
            );
            state = d.state;
            tokio::time::advance(Duration::from_secs(86_400)).await;
        }
        let later = at_stage(0, "451 4.3.0 try later");
        assert_eq!(
            deferral_status(&Answer::Reply(
                Reply::parse("421 Service not available").unwrap()
            )),
            Status::new(4, 0, 0)
        );
        assert_eq!(
            deferral_status(&Answer::error("connect failed")),
            Status::new(4, 0, 0)
        );
        let d = decide(
            &e,
            &state,
            &later,
            &AccountEffect::default(),
            &cfg(),
            clock.now(),
            0.0,
        );
        assert_eq!(
            d.state.recipients[0].state,
            RcptState::Pending,
            "not expired"
        );
        let age = d.state.age(&e, clock.now());
        assert!(age <= Duration::from_secs(86_400), "{age:?}");

        let throttled = at_stage(
            0,
            "454 4.7.0 Too many login attempts, please try again later.",
        );
        let d = decide(
            &e,
            &DeliveryState::new(1),
            &throttled,
            &effect(&throttled, clock.now()),
            &cfg(),
            clock.now(),
            0.0,
        );
        assert_eq!(
            d.state
                .next_attempt
                .unwrap()
                .duration_since(clock.now())
                .unwrap(),
            Duration::from_secs(300)
        );
        assert!(d.state.paused_since.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_authentication_failure_holds_and_the_hold_is_not_aged() {
        let clock = Clock::new();
        let t0 = clock.now();
        let e = env(2, t0);
        let a = Attempt {
            outcomes: vec![
                (
                    0,
                    RcptOutcome::Deferred(Answer::Reply(reply(
                        "535 5.7.8 Username and Password not accepted",
                    ))),
                ),
                (
                    1,
                    RcptOutcome::Deferred(Answer::Reply(reply(
                        "535 5.7.8 Username and Password not accepted",
                    ))),
                ),
            ],
            signal: Some(AccountSignal::AuthFailed(Answer::Reply(reply(
                "535 5.7.8 Username and Password not accepted",
            )))),
            ..Attempt::default()
        };
        let d = decide(
            &e,
            &DeliveryState::new(2),
            &a,
            &effect(&a, clock.now()),
            &cfg(),
            clock.now(),
            0.0,
        );
        assert_eq!(d.state.hold.as_ref().map(|h| &h.reason), Some(&hold()));
        assert_eq!(d.state.next_attempt, None);
        assert!(d.bounce.is_empty());
        assert_eq!(d.lines.last().unwrap().status, LogStatus::Held);
        // A week later the account is authorized again and the attempt
        // gets a 4xx: the week held does not count.
        tokio::time::advance(Duration::from_secs(7 * 86_400)).await;
        let later = Attempt {
            outcomes: vec![
                (
                    0,
                    RcptOutcome::Deferred(Answer::Reply(reply("451 4.3.0 later"))),
                ),
                (
                    1,
                    RcptOutcome::Deferred(Answer::Reply(reply("451 4.3.0 later"))),
                ),
            ],
            ..Attempt::default()
        };
        let d = decide(
            &e,
            &d.state,
            &later,
            &AccountEffect::default(),
            &cfg(),
            clock.now(),
            0.0,
        );
        assert!(d.state.hold.is_none());
        assert!(d.bounce.is_empty(), "{d:?}");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let (i, m) = (Duration::from_secs(60), Duration::from_secs(3600));
        for n in 1..8u32 {
            let base = (i * 2u32.pow(n - 1)).min(m);
            assert_eq!(backoff(i, m, n, 0.0), base);
            assert!(backoff(i, m, n, 0.99) <= base.mul_f64(1.2).min(m));
        }
        assert_eq!(backoff(i, m, 40, 0.5), m);
    }
}
