//! Upstream trouble: dead pooled connections, temporary replies, account
//! pauses, token problems, the upstream going away, shutdown.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use outbound::{AttemptResult, PauseKind};
use testkit::gmail::{Stage, replies};
use testkit::google::GrantType;

const T: Duration = Duration::from_secs(15);

fn deferred(h: &Harness) -> u64 {
    h.metrics.attempts_count(AttemptResult::Deferred)
}

// ---- pooled connections ------------------------------------------------------

#[tokio::test]
async fn pooled_connection_dead_at_next_command_is_replaced_without_deferring() {
    let h = Harness::new().await;
    // After one message the server drops the connection as soon as the
    // client sends the next command: the client only finds out when using it.
    h.gmail.drop_on_command_after_messages(Some(1));
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("p1", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(a, T).await);
    let b = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("p2", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(b, T).await, "delivered on a fresh connection");
    assert_eq!(h.gmail.messages().len(), 2);
    assert_eq!(h.gmail.stats().connections, 2);
    assert_eq!(deferred(&h), 0, "the message was not deferred");
    assert_eq!(h.metrics.attempts_count(AttemptResult::Sent), 2);
}

#[tokio::test]
async fn pooled_connection_closed_by_the_server_is_noticed_while_idle() {
    let h = Harness::new().await;
    h.gmail.close_after_messages(Some(1));
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("c1", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(a, T).await);
    assert!(
        h.gmail.wait_for_stats(T, |s| s.closed >= 1).await,
        "the server closed the pooled connection"
    );
    let b = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("c2", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(b, T).await);
    assert_eq!(h.gmail.stats().connections, 2);
    assert_eq!(deferred(&h), 0);
}

#[tokio::test]
async fn server_idle_timeout_421_is_handled_and_our_idle_timeout_quits() {
    let mut config = fast_config();
    config.idle_timeout = Duration::from_millis(600);
    let h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    h.gmail.set_idle_timeout(Some(Duration::from_millis(200)));
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("i1", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(a, T).await);
    assert!(
        h.gmail.wait_for_stats(T, |s| s.closed >= 1).await,
        "the server's idle timeout closed the pooled connection"
    );
    let b = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("i2", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(b, T).await);
    assert_eq!(
        deferred(&h),
        0,
        "a pooled connection timed out by the server costs nothing"
    );
    assert_eq!(h.gmail.stats().connections, 2);
    // Now our own idle timeout (shorter than the server's this time).
    h.gmail.set_idle_timeout(None);
    let c = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("i3", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(c, T).await);
    assert!(
        h.gmail.wait_for_stats(T, |s| s.quits >= 1).await,
        "idle connection closed with QUIT"
    );
}

// ---- temporary failures --------------------------------------------------------

#[tokio::test]
async fn mail_421_defers_backs_off_the_account_then_delivers() {
    let h = Harness::new().await;
    h.gmail
        .fail_next(Stage::Mail, 1, replies::TRY_AGAIN_LATER_421);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("421", "x\r\n"),
        )
        .await;
    assert!(
        wait_until(T, || h.view(id).is_some_and(|e| e.attempts == 1)).await,
        "first attempt recorded"
    );
    let env = h.view(id).unwrap();
    assert!(
        env.last_error
            .as_deref()
            .unwrap_or("")
            .starts_with("421 4.7.0 Try again later"),
        "{env:?}"
    );
    let (_, next) = after_attempt(&h, Some(id), env.next_attempt.expect("next attempt"));
    assert_jittered(next, Duration::from_millis(200), "retry_initial");
    let st = &h.outbound().account_states()[0];
    assert_eq!(st.pause_kind, Some(PauseKind::Unreachable), "{st:?}");
    assert!(h.wait_gone(id, T).await, "delivered after the pause");
    assert_eq!(deferred(&h), 1);
    assert_eq!(h.gmail.stats().connections, 2, "421 closes the connection");
    assert_eq!(h.metrics.bounced_count(), 0);
}

#[tokio::test]
async fn repeated_421s_after_a_good_login_double_the_account_pause() {
    let mut config = fast_config();
    config.retry_initial = Duration::from_millis(200);
    config.retry_max = Duration::from_secs(10);
    let h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    // Every login works; then Gmail says 421 at MAIL, at RCPT, at the end
    // of the data: connection-level trouble each time.
    h.gmail
        .fail_next(Stage::Mail, 1, replies::TRY_AGAIN_LATER_421);
    h.gmail
        .fail_next(Stage::Rcpt, 1, replies::TEMPORARY_SYSTEM_PROBLEM_421);
    h.gmail
        .fail_next(Stage::DataEnd, 1, replies::TRY_AGAIN_LATER_421);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("421x3", "x\r\n"),
        )
        .await;
    // The pause after each attempt: retry_initial doubling (0.2, 0.4,
    // 0.8 s, jitter up to +20 %), not 0.2 s every time.
    let mut seen = Vec::new();
    for n in 1..=3u32 {
        assert!(
            wait_until(T, || h.view(id).is_some_and(|e| e.attempts >= n)).await,
            "attempt {n} recorded"
        );
        let st = h.outbound().account_states()[0].clone();
        assert_eq!(st.pause_kind, Some(PauseKind::Unreachable), "{n}: {st:?}");
        assert!(
            st.pause_reason.as_deref().unwrap_or("").starts_with("421"),
            "{st:?}"
        );
        // (A test slower than the pause sees the next attempt's.)
        let (k, pause) = after_attempt(&h, Some(id), st.paused_until.expect("paused"));
        let base = Duration::from_millis(200) * 2u32.pow(k - 1);
        assert_jittered(pause, base, &format!("the pause after attempt {k}"));
        seen.push(k);
    }
    assert!(seen.contains(&3), "the third pause: {seen:?}");
    assert!(h.wait_gone(id, T).await, "delivered once Gmail takes it");
    let s = h.gmail.stats();
    assert_eq!((s.connections, s.auth_ok), (4, 4), "{s:?}");

    // A delivery ended the run: the next 421 starts at retry_initial again.
    // (At the end of the data: a 421 to MAIL on the pooled connection only
    // means it was stale, and a fresh one is used at once.)
    h.gmail
        .fail_next(Stage::DataEnd, 1, replies::TRY_AGAIN_LATER_421);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("421again", "x\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(id).is_some_and(|e| e.attempts >= 1)).await);
    let st = h.outbound().account_states()[0].clone();
    let (_, pause) = after_attempt(&h, Some(id), st.paused_until.expect("paused"));
    assert_jittered(pause, Duration::from_millis(200), "back to retry_initial");
    assert!(h.wait_gone(id, T).await);
    assert_eq!(h.metrics.bounced_count(), 0);
}

#[tokio::test]
async fn data_451_defers_the_message_but_not_the_account() {
    let h = Harness::new().await;
    h.gmail.fail_next(Stage::DataEnd, 1, replies::TRY_AGAIN_451);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("451", "x\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(id).is_some_and(|e| e.attempts == 1)).await);
    let env = h.view(id).unwrap();
    assert_eq!(
        env.recipients[0].reply.as_deref(),
        Some("451 4.3.0 Mail server temporarily rejected message. fake - gsmtp")
    );
    assert_eq!(h.outbound().account_states()[0].paused_until, None);
    assert!(h.wait_gone(id, T).await);
    assert_eq!(deferred(&h), 1);
    // A refused BDAT chunk may not have been read: the next message gets a
    // fresh connection rather than replies that belong to the chunk.
    assert_eq!(
        h.gmail.stats().connections,
        2,
        "a refused BDAT drops the connection"
    );
    assert_eq!(h.gmail.messages().len(), 1);
}

#[tokio::test]
async fn the_next_attempt_counts_from_the_end_of_a_slow_attempt() {
    let mut config = fast_config();
    config.retry_initial = Duration::from_millis(300);
    let h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    // A slow upstream (0.25 s per batch of replies: the attempt takes a
    // second or so) that then answers 451.
    h.gmail.set_reply_delay(Duration::from_millis(250));
    h.gmail.fail_next(Stage::DataEnd, 1, replies::TRY_AGAIN_451);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("slow451", "x\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(id).is_some_and(|e| e.attempts == 1)).await);
    let env = h.view(id).unwrap();
    // Counted from the attempt's end (about a second after it began).
    let (_, next) = after_attempt(&h, Some(id), env.next_attempt.expect("next attempt"));
    assert_jittered(
        next,
        Duration::from_millis(300),
        "retry_initial after the 451",
    );
    assert!(h.wait_gone(id, T).await);
}

#[tokio::test]
async fn connection_dropped_after_the_final_dot_is_resent() {
    let h = Harness::new().await;
    h.gmail.drop_after_data(1);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("drop", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(id, T).await, "re-sent later: at-least-once");
    let s = h.gmail.stats();
    assert_eq!((s.dropped_after_data, s.messages), (1, 1), "{s:?}");
    assert_eq!(deferred(&h), 1);
}

#[tokio::test]
async fn upstream_down_then_up_delivers_everything_with_bounded_attempts() {
    let h = Harness::new().await;
    h.gmail.stop_listening();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            h.submit(
                "app@example.com",
                &["r@example.org"],
                &message(&format!("down{i}"), "x\r\n"),
            )
            .await,
        );
    }
    // The account backs off as a whole, one probe at a time: after the
    // first attempts (`concurrency` = 2 at once) it waits 0.2, then 0.4 s
    // (plus up to 20% jitter) before each probe. Retrying each message on
    // its own schedule would try all five at once. The attempts' times are
    // the scheduler's own (when each ended); load only makes the gaps
    // longer.
    assert!(
        wait_until(T, || deferred(&h) >= 4).await,
        "attempts while down: {}",
        deferred(&h)
    );
    let mut ends: Vec<_> = h
        .outbound()
        .recent_attempts()
        .iter()
        .map(|a| a.at)
        .collect();
    ends.sort();
    let gaps: Vec<Duration> = ends
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .collect();
    let burst = gaps
        .iter()
        .take_while(|g| **g < Duration::from_millis(100))
        .count();
    assert!(burst <= 1, "only the first two run side by side: {gaps:?}");
    for (k, g) in gaps[burst..].iter().enumerate() {
        let pause = (Duration::from_millis(200) * 2u32.pow(k as u32)).min(Duration::from_secs(1));
        assert!(
            *g >= pause.mul_f64(0.95),
            "probe {} came {g:?} after the attempt before, the pause was {pause:?}: {gaps:?}",
            k + 1
        );
    }
    let st = &h.outbound().account_states()[0];
    assert!(st.pause_reason.is_some() || st.in_flight > 0, "{st:?}");
    h.gmail.resume_listening().expect("listen again");
    for id in ids {
        assert!(
            h.wait_gone(id, T).await,
            "delivered once the upstream is back"
        );
    }
    assert_eq!(h.gmail.messages().len(), 5);
    assert_eq!(h.metrics.bounced_count(), 0);
}

// ---- account-wide pauses -------------------------------------------------------

#[tokio::test]
async fn daily_limit_pauses_the_account_and_bounces_nothing() {
    let h = Harness::new().await;
    h.gmail.fail_next(Stage::DataEnd, 1, replies::DAILY_LIMIT);
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("d1", "x\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(a).is_some_and(|e| e.attempts == 1)).await);
    let st = h.outbound().account_states()[0].clone();
    assert_eq!(st.pause_kind, Some(PauseKind::DailyLimit), "{st:?}");
    let until = st.paused_until.expect("paused");
    let (_, pause) = after_attempt(&h, Some(a), until);
    assert_eq!(
        pause,
        Duration::from_millis(800),
        "daily_limit_pause (0.8 s here, an hour by default)"
    );
    assert!(st.pause_reason.unwrap().contains("5.4.5"));
    let env = h.view(a).unwrap();
    assert!(
        // (The record keeps milliseconds.)
        env.next_attempt.unwrap() + Duration::from_millis(1) >= until,
        "the message waits for the pause: {:?} {until:?}",
        env.next_attempt
    );
    // Mail queued during the pause is not tried.
    let mails = h.gmail.stats().mail_commands;
    let b = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("d2", "x\r\n"),
        )
        .await;
    // The scheduler has seen the commit (and would have dispatched it).
    assert!(h.outbound().ping().await);
    assert_eq!(
        h.gmail.stats().mail_commands,
        mails,
        "nothing sent while paused"
    );
    assert!(h.wait_gone(a, T).await && h.wait_gone(b, T).await);
    let msgs = h.gmail.messages();
    assert_eq!(msgs.len(), 2);
    assert!(msgs.iter().all(|m| !m.mail_from.is_empty()), "no bounce");
    assert_eq!(h.metrics.bounced_count(), 0);
}

#[tokio::test]
async fn login_throttling_pauses_the_account_then_delivers() {
    let h = Harness::new().await;
    h.gmail.throttle_logins(1);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("454", "x\r\n"),
        )
        .await;
    assert!(
        wait_until(T, || h
            .outbound()
            .account_states()
            .first()
            .is_some_and(|a| a.pause_kind == Some(PauseKind::LoginThrottled)))
        .await
    );
    let until = h.outbound().account_states()[0].paused_until.unwrap();
    let (_, pause) = after_attempt(&h, Some(id), until);
    assert_eq!(pause, Duration::from_millis(500), "login_throttle_pause");
    assert!(h.wait_gone(id, T).await);
    let s = h.gmail.stats();
    assert_eq!((s.auth_scripted, s.auth_ok), (1, 1), "{s:?}");
}

// ---- tokens and authentication ---------------------------------------------------

#[tokio::test]
async fn refused_access_token_is_refreshed_once_and_the_mail_delivered() {
    let h = Harness::new().await;
    // Gmail considers the token expired: the 334 challenge dance.
    h.gmail.reject_tokens(1);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("tok", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(id, T).await);
    let s = h.gmail.stats();
    assert_eq!((s.auth_rejected, s.auth_ok), (1, 1), "{s:?}");
    assert_eq!(
        h.google.token_requests(GrantType::RefreshToken),
        2,
        "refreshed once more"
    );
    assert_eq!(deferred(&h), 0);
}

#[tokio::test]
async fn access_token_expiring_mid_run_is_refreshed() {
    let h = Harness::new().await;
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("e1", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(a, T).await);
    // Google expires the token the relay still caches; the pooled
    // connection goes away, so the next message needs a new AUTH.
    h.google.expire_all_access_tokens();
    h.gmail.close_connections();
    assert!(h.gmail.wait_for_stats(T, |s| s.closed >= 1).await);
    let b = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("e2", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(b, T).await);
    let s = h.gmail.stats();
    assert_eq!((s.auth_ok, s.auth_rejected), (2, 1), "{s:?}");
    assert_eq!(deferred(&h), 0);
    assert_eq!(h.gmail.messages().len(), 2);
}

#[tokio::test]
async fn invalid_grant_holds_mail_until_a_token_is_imported() {
    let mut h = Harness::with(Setup {
        start: false,
        ..Setup::default()
    })
    .await;
    h.google.revoke_refresh_token(&h.refresh_token);
    h.start();
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("h1", "x\r\n"),
        )
        .await;
    assert!(
        wait_until(T, || h.view(a).is_some_and(|e| e.held.is_some())).await,
        "held durably"
    );
    let held = h.view(a).unwrap().held.unwrap();
    assert!(
        held.contains("oauthrelay authorize --account default"),
        "{held}"
    );
    let st = h.outbound().account_states()[0].clone();
    assert!(st.held.is_some() && !st.is_ready(), "{st:?}");
    let b = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("h2", "x\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(b).is_some_and(|e| e.held.is_some())).await);
    assert_eq!(h.gmail.stats().connections, 0, "nothing tried upstream");
    assert_eq!(h.metrics.bounced_count(), 0);

    // `oauthrelay token import`: a new refresh token in the token file.
    let fresh = h.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&h.resolved, &fresh).expect("import");
    assert!(
        h.wait_gone(a, T).await && h.wait_gone(b, T).await,
        "flows without a restart"
    );
    assert_eq!(h.gmail.messages().len(), 2);
    assert!(h.outbound().account_states()[0].held.is_none());
}

#[tokio::test]
async fn authentication_refused_even_after_refresh_holds_and_never_bounces() {
    let h = Harness::new().await;
    h.gmail.set_token_validator(|_, _| false);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("ar", "x\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(id).is_some_and(|e| e.held.is_some())).await);
    let held = h.outbound().account_states()[0]
        .held
        .clone()
        .expect("account held")
        .to_string();
    assert!(
        (held.contains("even after a refresh") || held.contains("freshly refreshed"))
            && held.contains("oauthrelay authorize --account default"),
        "{held}"
    );
    // The token manager knows too: readyz, token status and the metric
    // show the account needs authorization.
    let status = h.tokens.account_status("default").expect("status");
    assert!(!status.auth.is_authorized(), "{status:?}");
    assert_eq!(
        h.gmail.stats().auth_rejected,
        2,
        "one refresh, one more try, then stop"
    );
    // The next probe is minutes away (`hold.rs` tests the schedule).
    assert!(h.outbound().ping().await);
    assert_eq!(h.gmail.stats().auth_rejected, 2, "no hammering while held");
    assert_eq!(h.metrics.bounced_count(), 0);
    // Fixed by a new authorization (`oauthrelay token import` here): the
    // mail flows without anyone retrying by hand.
    let validator = h.google.token_validator();
    h.gmail.set_token_validator(validator);
    let fresh = h.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&h.resolved, &fresh).expect("import");
    assert!(h.wait_gone(id, T).await);
    assert_eq!(h.gmail.messages().len(), 1);
}

/// `queue retry` until `id` is gone (each retry probes a held account at
/// once; a probe still running ignores the next), polling with a deadline.
async fn retry_until_gone(h: &Harness, id: spool::MessageId) -> bool {
    let end = tokio::time::Instant::now() + T;
    while tokio::time::Instant::now() < end {
        if h.view(id).is_none() {
            return true;
        }
        h.outbound().retry(id).await;
        if h.wait_gone(id, Duration::from_millis(100)).await {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn a_refused_login_blip_holds_and_a_probe_lifts_the_hold() {
    let h = Harness::new().await;
    // Gmail refuses three logins in a row, then takes them again.
    h.gmail.reject_tokens(3);
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("blip", "x\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(id).is_some_and(|e| e.held.is_some())).await);
    assert_eq!(
        h.gmail.stats().auth_rejected,
        2,
        "refused, then refreshed once"
    );
    let refusal = h
        .tokens
        .account_status("default")
        .and_then(|s| s.auth.refusal().cloned())
        .expect("the token manager holds the account");
    assert_eq!(refusal.code, "smtp_auth_rejected");
    assert!(!refusal.needs_person(), "a probe may lift it");
    let refreshes = h.google.token_requests(GrantType::RefreshToken);

    // `queue retry ID`: a probe at once (a fresh token, one AUTH, nothing
    // sent). The first is refused too: still held, no message attempted.
    assert!(h.outbound().retry(id).await);
    assert!(h.gmail.wait_for_stats(T, |s| s.auth_rejected >= 3).await);
    assert!(
        h.google.token_requests(GrantType::RefreshToken) > refreshes,
        "the probe refreshed the token"
    );
    assert_eq!(h.gmail.stats().mail_commands, 0, "a probe sends nothing");
    assert!(h.outbound().account_states()[0].held.is_some());
    assert!(h.view(id).is_some_and(|e| e.held.is_some()));

    // The next probe is accepted: the hold lifts and the mail goes.
    assert!(
        retry_until_gone(&h, id).await,
        "released by a probe and delivered"
    );
    let s = h.gmail.stats();
    assert_eq!(s.auth_rejected, 3, "{s:?}");
    assert!(s.auth_ok >= 1, "{s:?}");
    assert_eq!(h.gmail.messages().len(), 1);
    assert!(h.outbound().account_states()[0].held.is_none());
    let status = h.tokens.account_status("default").expect("status");
    assert!(status.auth.is_authorized(), "{status:?}");
    assert_eq!(h.metrics.bounced_count(), 0);
}

#[tokio::test]
async fn a_hold_only_a_person_can_lift_is_not_probed() {
    let mut h = Harness::with(Setup {
        start: false,
        ..Setup::default()
    })
    .await;
    h.google.revoke_refresh_token(&h.refresh_token);
    h.start();
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("dead", "x\r\n"),
        )
        .await;
    assert!(wait_until(T, || h.view(id).is_some_and(|e| e.held.is_some())).await);
    let refreshes = h.google.token_requests(GrantType::RefreshToken);
    // `queue retry` answers once the scheduler handled it: by then a probe
    // would have started. Twice, in case of a race with the hold itself.
    for _ in 0..2 {
        assert!(h.outbound().retry(id).await);
        h.outbound().ping().await;
    }
    assert_eq!(
        h.google.token_requests(GrantType::RefreshToken),
        refreshes,
        "invalid_grant waits for authorize: no request"
    );
    assert_eq!(h.gmail.stats().connections, 0, "nothing tried upstream");
    assert!(h.view(id).is_some_and(|e| e.held.is_some()));
    // The person's fix (`token import`) releases it.
    let fresh = h.google.issue_refresh_token(CLIENT_ID, EMAIL);
    oauth::import_refresh_token(&h.resolved, &fresh).expect("import");
    assert!(h.wait_gone(id, T).await);
}

// ---- shutdown ---------------------------------------------------------------------

#[tokio::test]
async fn shutdown_lets_the_running_transaction_finish_and_leaves_the_rest_queued() {
    let mut config = fast_config();
    config.concurrency = 1;
    let mut h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    h.gmail.set_reply_delay(Duration::from_millis(150));
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            h.submit(
                "app@example.com",
                &["r@example.org"],
                &message(&format!("sd{i}"), "x\r\n"),
            )
            .await,
        );
    }
    assert!(h.gmail.wait_for_stats(T, |s| s.mail_commands >= 1).await);
    let t0 = std::time::Instant::now();
    h.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    let delivered = h.gmail.messages().len();
    assert_eq!(delivered, 1, "the running transaction finished");
    let left: Vec<_> = ids.iter().filter_map(|id| h.view(*id)).collect();
    assert_eq!(left.len(), 3, "the rest stays queued");
    assert!(left.iter().all(|e| e.attempts == 0 && e.held.is_none()));
    assert!(
        h.gmail.wait_for_stats(T, |s| s.quits >= 1).await,
        "pooled connection closed with QUIT"
    );
}

#[tokio::test]
async fn shutdown_grace_bounds_a_hanging_transaction() {
    let (logs, _guard) = Logs::capture("info");
    let mut config = fast_config();
    config.shutdown_grace = Duration::from_millis(200);
    let mut h = Harness::with(Setup {
        config,
        ..Setup::default()
    })
    .await;
    let a = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("g0", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(a, T).await);
    // An upstream that would answer in a minute: the grace (0.2 s) ends
    // the attempt long before.
    h.gmail.set_reply_delay(Duration::from_secs(60));
    let b = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("g1", "x\r\n"),
        )
        .await;
    assert!(h.gmail.wait_for_stats(T, |s| s.mail_commands >= 2).await);
    let t0 = std::time::Instant::now();
    h.stop().await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "stopped after the grace: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        logs.count("shutdown grace over: delivery attempt abandoned"),
        1,
        "{}",
        logs.text()
    );
    let env = h.view(b).expect("still queued");
    assert_eq!(env.attempts, 0);
    assert!(env.next_attempt.is_none_or(|t| t <= SystemTime::now()));
}

// ---- hostile upstream ---------------------------------------------------------------

/// A plain TCP server that answers every connection with `reply` and then
/// keeps silent (or closes).
async fn garbage_server(reply: &'static [u8]) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(reply).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn garbage_or_oversized_replies_are_temporary_errors_not_panics() {
    let h = Harness::new().await;
    for (reply, expect) in [
        (
            b"HTTP/1.1 400 Bad Request\r\n\r\n".as_slice(),
            "malformed reply",
        ),
        (&[b'2'; 9000][..], "malformed reply"),
        (b"554 5.7.1 go away\r\n".as_slice(), "554 5.7.1 go away"),
    ] {
        let port = garbage_server(reply).await;
        let mut account = h.account.clone();
        account.smtp_port = port;
        account.smtp_tls = oauth::config::SmtpTls::Starttls;
        h.outbound().reload(vec![account], h.config.clone());
        // Applied before the message arrives (the scheduler answers in
        // order), or it could still go to the good upstream.
        assert!(h.outbound().ping().await);
        let id = h
            .submit(
                "app@example.com",
                &["r@example.org"],
                &message("g", "x\r\n"),
            )
            .await;
        assert!(
            wait_until(T, || h.view(id).is_some_and(|e| e.attempts >= 1)).await,
            "attempt recorded"
        );
        let env = h.view(id).unwrap();
        let err = env.last_error.clone().unwrap_or_default();
        assert!(err.contains(expect), "{err}");
        assert!(env.next_attempt.is_some(), "deferred, not failed");
        h.spool.remove(id).await.unwrap();
    }
    assert_eq!(h.metrics.bounced_count(), 0);
}

#[tokio::test]
async fn account_unauthorized_at_start_holds_queued_mail_then_releases_it() {
    let mut h = Harness::with(Setup {
        start: false,
        ..Setup::default()
    })
    .await;
    let queued = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("s1", "x\r\n"),
        )
        .await;
    // No refresh token stored at all: the manager knows before any attempt.
    std::fs::remove_file(&h.resolved.token_file).expect("remove token file");
    h.tokens = oauth::TokenManager::new(
        vec![h.resolved.clone()],
        oauth::ManagerOptions {
            watch_interval: Some(Duration::from_millis(100)),
            ..Default::default()
        },
    )
    .expect("token manager");
    h.start();
    assert!(wait_until(T, || h.view(queued).is_some_and(|e| e.held.is_some())).await);
    let held = h.outbound().account_states()[0]
        .held
        .clone()
        .expect("held at start");
    let held = held.to_string();
    assert!(held.contains("needs authorization"), "{held}");
    assert_eq!(h.view(queued).unwrap().attempts, 0, "nothing attempted");
    assert_eq!(h.gmail.stats().connections, 0);
    oauth::import_refresh_token(&h.resolved, &h.refresh_token).expect("import");
    assert!(
        h.wait_gone(queued, T).await,
        "released by the Authorized event"
    );
}

// ---- certificates -------------------------------------------------------------------

#[tokio::test]
async fn an_upstream_certificate_not_from_a_trusted_root_is_refused_and_the_mail_deferred() {
    let h = Harness::new().await;
    // The fake's certificate is signed by the harness CA. Trust another CA
    // instead, or only the public web roots.
    let other = testkit::ca::TestCa::new();
    let other_dir = h.dir.path().join("other-ca");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_ca = other.write_to(&other_dir);
    for ca_file in [Some(other_ca), None] {
        let mut account = h.account.clone();
        account.ca_file = ca_file.clone();
        h.outbound().reload(vec![account], h.config.clone());
        // Lift the backoff left by the previous round.
        h.outbound().retry_all().await;
        let before = h.gmail.stats().connections;
        let id = h
            .submit(
                "app@example.com",
                &["r@example.org"],
                &message("cert", "x\r\n"),
            )
            .await;
        assert!(
            wait_until(T, || h.view(id).is_some_and(|e| e.attempts >= 1)).await,
            "attempt recorded ({ca_file:?})"
        );
        let env = h.view(id).unwrap();
        let err = env.last_error.clone().unwrap_or_default();
        assert!(
            err.contains("TLS handshake") && err.contains("certificate"),
            "{ca_file:?}: {err}"
        );
        assert!(env.next_attempt.is_some() && env.held.is_none(), "{env:?}");
        assert!(
            env.recipients
                .iter()
                .all(|r| r.state == outbound::RcptState::Pending)
        );
        let s = h.gmail.stats();
        assert!(s.connections > before, "the upstream was reached: {s:?}");
        assert_eq!(
            (s.auth_ok, s.auth_rejected, s.auth_scripted, s.mail_commands),
            (0, 0, 0, 0),
            "no token or mail over an unverified connection: {s:?}"
        );
        h.spool.remove(id).await.unwrap();
    }
    assert!(h.gmail.messages().is_empty());
    assert_eq!(h.metrics.bounced_count(), 0);
    // The same upstream with the right CA: delivered (the refusal above was
    // the certificate, nothing else).
    h.outbound()
        .reload(vec![h.account.clone()], h.config.clone());
    h.outbound().retry_all().await;
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("cert-ok", "x\r\n"),
        )
        .await;
    assert!(h.wait_gone(id, T).await);
    assert_eq!(h.gmail.messages().len(), 1);
}

// ---- timeouts -----------------------------------------------------------------------

/// Where [`stalling_server`] stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// Accepts TCP, never speaks TLS.
    Handshake,
    /// TLS, then no greeting.
    Greeting,
    /// No reply to `AUTH`.
    Auth,
    /// No reply to `MAIL FROM`.
    Mail,
    /// No reply to the final dot of `DATA`.
    DataEnd,
}

/// A small SMTP server (implicit TLS with the harness CA's certificate, any
/// XOAUTH2 token accepted, PIPELINING, no CHUNKING) that goes silent at
/// `stall`, keeping the connection open. Records when it got there.
async fn stalling_server(
    ca: &testkit::ca::TestCa,
    stall: Stall,
) -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config());
    let stalled = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mark = stalled.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let mark = mark.clone();
            tokio::spawn(async move {
                let hang = || async {
                    mark.lock().unwrap().push(std::time::Instant::now());
                    tokio::time::sleep(Duration::from_secs(60)).await;
                };
                if stall == Stall::Handshake {
                    let _keep = tcp;
                    return hang().await;
                }
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (r, mut w) = tokio::io::split(tls);
                let mut r = BufReader::new(r);
                if stall == Stall::Greeting {
                    return hang().await;
                }
                let _ = w.write_all(b"220 stall.test ESMTP\r\n").await;
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250-stall.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH XOAUTH2\r\n"
                    } else if cmd.starts_with("AUTH") {
                        if stall == Stall::Auth {
                            return hang().await;
                        }
                        b"235 2.7.0 Accepted\r\n"
                    } else if cmd.starts_with("MAIL") {
                        if stall == Stall::Mail {
                            return hang().await;
                        }
                        b"250 2.1.0 OK\r\n"
                    } else if cmd.starts_with("RCPT") {
                        b"250 2.1.5 OK\r\n"
                    } else if cmd.starts_with("DATA") {
                        let _ = w.write_all(b"354 Go ahead\r\n").await;
                        loop {
                            line.clear();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == ".\r\n" {
                                break;
                            }
                        }
                        if stall == Stall::DataEnd {
                            return hang().await;
                        }
                        b"250 2.0.0 OK\r\n"
                    } else if cmd.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 OK\r\n"
                    };
                    let _ = w.write_all(reply).await;
                }
            });
        }
    });
    (port, stalled)
}

/// One attempt against a server that stalls at `stall`: it must end
/// within the timeout for that step (`connect_timeout` 400 ms,
/// `command_timeout` 300 ms, `data_timeout` 500 ms) and leave the message
/// deferred with the reason.
async fn attempt_against_a_stall(stall: Stall, limit: Duration, expect: &[&str]) {
    let mut config = fast_config();
    config.connect_timeout = Duration::from_millis(400);
    config.command_timeout = Duration::from_millis(300);
    config.data_timeout = Duration::from_millis(500);
    // One attempt in this test.
    config.retry_initial = Duration::from_secs(60);
    config.retry_max = Duration::from_secs(120);
    let mut h = Harness::with(Setup {
        config,
        start: false,
        ..Setup::default()
    })
    .await;
    let (port, stalled) = stalling_server(&h.ca, stall).await;
    h.account.smtp_port = port;
    h.start();
    let id = h
        .submit(
            "app@example.com",
            &["r@example.org"],
            &message("stall", "x\r\n"),
        )
        .await;
    assert!(
        wait_until(T, || !stalled.lock().unwrap().is_empty()).await,
        "{stall:?}: the server got to its stall"
    );
    let at = stalled.lock().unwrap()[0];
    assert!(
        wait_until(T, || h.view(id).is_some_and(|e| e.attempts >= 1)).await,
        "{stall:?}: attempt recorded"
    );
    let took = at.elapsed();
    assert!(
        took >= limit.mul_f64(0.8) && took < limit + Duration::from_millis(1500),
        "{stall:?}: the attempt ended {took:?} after the server went silent (timeout {limit:?})"
    );
    let env = h.view(id).unwrap();
    let err = env.last_error.clone().unwrap_or_default();
    for e in expect {
        assert!(err.contains(e), "{stall:?}: {err:?} lacks {e:?}");
    }
    let (_, next) = after_attempt(&h, Some(id), env.next_attempt.expect("deferred"));
    assert!(
        next > Duration::from_secs(30),
        "{stall:?}: retried later, not at once: {next:?}"
    );
    assert!(env.held.is_none());
    assert!(
        env.recipients
            .iter()
            .all(|r| r.state == outbound::RcptState::Pending)
    );
    assert_eq!(h.metrics.attempts_count(AttemptResult::Deferred), 1);
    assert_eq!(h.metrics.bounced_count(), 0);
    assert_eq!(stalled.lock().unwrap().len(), 1, "one connection");
}

#[tokio::test]
async fn a_tls_handshake_that_never_completes_times_out() {
    attempt_against_a_stall(
        Stall::Handshake,
        Duration::from_millis(400),
        &["timed out after 400ms in the TLS handshake"],
    )
    .await;
}

#[tokio::test]
async fn an_upstream_that_never_greets_times_out() {
    attempt_against_a_stall(
        Stall::Greeting,
        Duration::from_millis(300),
        &["timed out after 300ms reading the greeting"],
    )
    .await;
}

#[tokio::test]
async fn an_upstream_silent_after_auth_times_out() {
    attempt_against_a_stall(
        Stall::Auth,
        Duration::from_millis(300),
        &["timed out after 300ms", "AUTH"],
    )
    .await;
}

#[tokio::test]
async fn an_upstream_silent_after_mail_times_out() {
    attempt_against_a_stall(
        Stall::Mail,
        Duration::from_millis(300),
        &["timed out after 300ms after MAIL FROM"],
    )
    .await;
}

#[tokio::test]
async fn an_upstream_silent_after_the_end_of_data_times_out_on_data_timeout() {
    attempt_against_a_stall(
        Stall::DataEnd,
        Duration::from_millis(500),
        &["timed out after 500ms after the end of the message (DATA)"],
    )
    .await;
}

/// Issue 10: after a reply to BDAT the client did not expect (`999`, or a
/// `451` from a server that did not read the chunk, which then answers the
/// chunk's lines as commands), the connection was reused and the next
/// message got a stale `502` and was bounced. Now the connection is
/// dropped before the next message uses it: nothing is judged by a reply
/// that belonged to another command.
#[tokio::test]
async fn a_desynchronised_upstream_never_decides_the_next_message() {
    for reply in [
        "999 what is this",
        "451 4.3.0 Mail server temporarily rejected message. fake - gsmtp",
    ] {
        let h = Harness::new().await;
        h.gmail.fail_next(Stage::BdatUnread, 1, reply);
        let a = h
            .submit(
                "app@example.com",
                &["r@example.org"],
                &message("desync-a", "line one\r\nline two\r\nRCPT TO:<x@y>\r\n"),
            )
            .await;
        assert!(wait_until(T, || h.view(a).is_some_and(|v| v.attempts >= 1)).await);
        let b = h
            .submit(
                "app@example.com",
                &["r@example.org"],
                &message("desync-b", "x\r\n"),
            )
            .await;
        assert!(
            h.wait_gone(b, T).await,
            "{reply}: the next message is delivered"
        );
        assert!(
            h.wait_gone(a, T).await,
            "{reply}: the first is retried and delivered"
        );
        assert_eq!(h.metrics.bounced_count(), 0, "{reply}: nothing bounced");
        assert_eq!(h.metrics.attempts_count(AttemptResult::Failed), 0);
        let msgs = h.gmail.messages();
        assert_eq!(msgs.len(), 2, "{reply}: both delivered, no bounce");
        assert!(msgs.iter().all(|m| !m.mail_from.is_empty()));
        assert!(
            h.gmail.stats().connections >= 2,
            "{reply}: a fresh connection"
        );
    }
}
