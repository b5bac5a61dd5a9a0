//! Gmail API answers as typed outcomes (`docs/gmail-replies.md`, "Gmail
//! API"). Google answers the same condition with different HTTP statuses
//! (a rate limit comes as 403 or 429), so the error's `reason`, `status`
//! and message decide, not the status alone.

use std::time::{Duration, SystemTime};

use crate::classify::{AccountSignal, RcptOutcome};
use crate::reply::{Answer, Reply, Status};

/// Where the Gmail API is enabled for a Cloud project.
pub(crate) const ENABLE_API_URL: &str =
    "https://console.cloud.google.com/apis/library/gmail.googleapis.com";

/// Google's JSON error model, the parts we act on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub http: u16,
    /// `UNAUTHENTICATED`, `PERMISSION_DENIED`, `RESOURCE_EXHAUSTED`...
    pub status: String,
    pub message: String,
    /// `errors[].reason` and `details[].reason`.
    pub reasons: Vec<String>,
    /// `Retry-After` in seconds (or an HTTP date turned into a delay).
    pub retry_after: Option<Duration>,
    /// A console link Google gave (`activationUrl`), if any.
    pub link: Option<String>,
}

impl ApiError {
    pub(crate) fn parse(http: u16, retry_after: Option<&str>, body: &[u8]) -> ApiError {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let e = &v["error"];
        let mut reasons = Vec::new();
        for list in [&e["errors"], &e["details"]] {
            if let Some(a) = list.as_array() {
                for x in a {
                    if let Some(r) = x["reason"].as_str() {
                        reasons.push(r.to_string());
                    }
                }
            }
        }
        let link = e["details"].as_array().and_then(|d| {
            d.iter()
                .find_map(|x| x["metadata"]["activationUrl"].as_str().map(str::to_string))
        });
        let message = e["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        let retry_after = retry_after.and_then(|r| {
            r.trim()
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs)
                .or_else(|| {
                    humantime::parse_rfc3339_weak(r.trim())
                        .ok()
                        .and_then(|t| t.duration_since(SystemTime::now()).ok())
                })
        });
        ApiError {
            http,
            status: e["status"].as_str().unwrap_or("").to_string(),
            message,
            reasons,
            retry_after,
            link,
        }
    }

    fn has(&self, reason: &str) -> bool {
        self.reasons.iter().any(|r| r.eq_ignore_ascii_case(reason))
    }

    /// The first reason, for the reply text.
    fn reason(&self) -> &str {
        self.reasons
            .first()
            .map(String::as_str)
            .unwrap_or(if self.status.is_empty() {
                "error"
            } else {
                &self.status
            })
    }

    /// "User-rate limit exceeded. Retry after 2026-12-03T08:00:00.000Z
    /// (Mail sending)": the per-user sending limit, and until when.
    pub(crate) fn sending_limit_until(&self) -> Option<SystemTime> {
        let m = &self.message;
        let at = m.find("Retry after ")? + "Retry after ".len();
        let rest = &m[at..];
        let end = rest.find(" (").unwrap_or(rest.len());
        if !m[at + end..].contains("Mail sending") {
            return None;
        }
        humantime::parse_rfc3339_weak(rest[..end].trim()).ok()
    }

    /// As a reply line: an SMTP-like code and enhanced status for the log,
    /// `queue show` and the bounce, with Google's own words.
    pub(crate) fn reply(&self, code: u16, status: Status) -> Reply {
        Reply::new(
            code,
            Some(status),
            &format!(
                "Gmail API: HTTP {} {}: {}",
                self.http,
                self.reason(),
                self.message
            ),
        )
    }

    pub(crate) fn is_unauthenticated(&self) -> bool {
        self.http == 401 || self.status == "UNAUTHENTICATED"
    }
}

/// What an error answer means for the message and the account. `account`
/// names the account in the fix.
pub(crate) fn classify(
    e: &ApiError,
    account: &str,
    now: SystemTime,
) -> (RcptOutcome, Option<AccountSignal>) {
    let defer = |code, st: Status| RcptOutcome::Deferred(Answer::Reply(e.reply(code, st)));
    let temp = Status::new(4, 7, 0);
    if e.has("insufficientPermissions") || e.has("ACCESS_TOKEN_SCOPE_INSUFFICIENT") {
        let answer = Answer::Reply(e.reply(454, temp));
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::Refused {
                answer,
                problem: "the access token has no scope that allows users.messages.send (Gmail API: insufficientPermissions)".into(),
                fix: format!(
                    "set scopes = [\"https://www.googleapis.com/auth/gmail.send\"] (or remove `scopes`), then run: oauthrelay authorize --account {account}"
                ),
            }),
        );
    }
    if e.has("accessNotConfigured") || e.has("SERVICE_DISABLED") {
        let answer = Answer::Reply(e.reply(454, temp));
        let link = e.link.clone().unwrap_or_else(|| ENABLE_API_URL.to_string());
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::Refused {
                answer,
                problem: "the Gmail API is not enabled in the OAuth client's Google Cloud project (accessNotConfigured)".into(),
                fix: format!(
                    "enable the Gmail API at {link} (or {ENABLE_API_URL}), wait a few minutes, then run: oauthrelay queue retry --all"
                ),
            }),
        );
    }
    if let Some(until) = e.sending_limit_until() {
        let answer = Answer::Reply(e.reply(450, Status::new(4, 5, 3)));
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::DailyLimit {
                answer,
                until: Some(until.max(now)),
            }),
        );
    }
    if e.has("dailyLimitExceeded") || e.has("quotaExceeded") {
        let answer = Answer::Reply(e.reply(450, Status::new(4, 5, 3)));
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::DailyLimit {
                answer,
                until: e.retry_after.map(|d| now + d),
            }),
        );
    }
    if e.has("rateLimitExceeded")
        || e.has("userRateLimitExceeded")
        || e.http == 429
        || e.status == "RESOURCE_EXHAUSTED"
    {
        let answer = Answer::Reply(e.reply(450, Status::new(4, 7, 0)));
        return (
            RcptOutcome::Deferred(answer.clone()),
            Some(AccountSignal::RateLimited {
                answer,
                until: Some(now + e.retry_after.unwrap_or(Duration::from_secs(1))),
            }),
        );
    }
    match e.http {
        // The message itself: a bad header, no recipient. Bounce with
        // Google's reason.
        400 => (
            RcptOutcome::Failed(Answer::Reply(e.reply(554, Status::new(5, 6, 0)))),
            None,
        ),
        413 => (
            RcptOutcome::Failed(Answer::Reply(e.reply(552, Status::new(5, 3, 4)))),
            None,
        ),
        // An unknown refusal of the account: hold, never bounce.
        403 => {
            let answer = Answer::Reply(e.reply(454, temp));
            (
                RcptOutcome::Deferred(answer.clone()),
                Some(AccountSignal::Refused {
                    answer,
                    problem: format!("the Gmail API refused the account: {}", e.message),
                    fix: format!(
                        "check the account in the Google Admin console / Cloud console, then run: oauthrelay queue retry --all (or: oauthrelay authorize --account {account})"
                    ),
                }),
            )
        }
        500..=599 => (defer(451, Status::new(4, 3, 0)), None),
        _ => (defer(451, Status::new(4, 0, 0)), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(http: u16, retry: Option<&str>, body: &str) -> ApiError {
        ApiError::parse(http, retry, body.as_bytes())
    }

    fn body(code: u16, status: &str, reason: &str, message: &str) -> String {
        serde_json::json!({"error": {"code": code, "message": message, "status": status,
            "errors": [{"message": message, "domain": "usageLimits", "reason": reason}]}})
        .to_string()
    }

    #[test]
    fn the_same_rate_limit_as_403_or_429_pauses() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for (http, status) in [(403, "PERMISSION_DENIED"), (429, "RESOURCE_EXHAUSTED")] {
            let e = err(
                http,
                Some("30"),
                &body(http, status, "rateLimitExceeded", "Rate Limit Exceeded"),
            );
            let (o, s) = classify(&e, "a", now);
            assert!(matches!(o, RcptOutcome::Deferred(_)));
            assert_eq!(
                s,
                Some(AccountSignal::RateLimited {
                    answer: Answer::Reply(e.reply(450, Status::new(4, 7, 0))),
                    until: Some(now + Duration::from_secs(30)),
                })
            );
        }
    }

    #[test]
    fn the_sending_limit_pauses_until_the_time_in_the_message() {
        let now = SystemTime::UNIX_EPOCH;
        let e = err(
            429,
            None,
            &body(
                429,
                "RESOURCE_EXHAUSTED",
                "rateLimitExceeded",
                "User-rate limit exceeded.  Retry after 2026-12-03T08:00:00.000Z (Mail sending)",
            ),
        );
        let until = humantime::parse_rfc3339("2026-12-03T08:00:00Z").unwrap();
        assert_eq!(e.sending_limit_until(), Some(until));
        assert!(
            matches!(classify(&e, "a", now).1, Some(AccountSignal::DailyLimit { until: Some(u), .. }) if u == until)
        );
    }

    #[test]
    fn scope_and_api_problems_hold_with_the_fix() {
        let scope = r#"{"error":{"code":403,"message":"Request had insufficient authentication scopes.","errors":[{"message":"Insufficient Permission","domain":"global","reason":"insufficientPermissions"}],"status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"ACCESS_TOKEN_SCOPE_INSUFFICIENT"}]}}"#;
        let (_, s) = classify(&err(403, None, scope), "acct", SystemTime::now());
        match s {
            Some(AccountSignal::Refused { fix, .. }) => {
                assert!(fix.contains("authorize --account acct"), "{fix}")
            }
            other => panic!("{other:?}"),
        }
        let api = r#"{"error":{"code":403,"message":"Gmail API has not been used in project 1 before or it is disabled.","status":"PERMISSION_DENIED","errors":[{"reason":"accessNotConfigured"}],"details":[{"reason":"SERVICE_DISABLED","metadata":{"activationUrl":"https://console.developers.google.com/apis/api/gmail.googleapis.com/overview?project=1"}}]}}"#;
        match classify(&err(403, None, api), "acct", SystemTime::now()).1 {
            Some(AccountSignal::Refused { fix, .. }) => {
                assert!(fix.contains("overview?project=1"), "{fix}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_argument_bounces_quoting_google() {
        let e = err(
            400,
            None,
            &body(
                400,
                "INVALID_ARGUMENT",
                "invalidArgument",
                "Invalid To header",
            ),
        );
        let (o, s) = classify(&e, "a", SystemTime::now());
        assert!(s.is_none());
        match o {
            RcptOutcome::Failed(a) => assert_eq!(
                a.to_string(),
                "554 5.6.0 Gmail API: HTTP 400 invalidArgument: Invalid To header"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_errors_defer_and_daily_limit_pauses() {
        let (o, s) = classify(&err(503, None, "oops"), "a", SystemTime::now());
        assert!(matches!(o, RcptOutcome::Deferred(_)) && s.is_none());
        let d = err(
            403,
            None,
            &body(
                403,
                "PERMISSION_DENIED",
                "dailyLimitExceeded",
                "Daily Limit Exceeded",
            ),
        );
        assert!(matches!(
            classify(&d, "a", SystemTime::now()).1,
            Some(AccountSignal::DailyLimit { until: None, .. })
        ));
    }
}
