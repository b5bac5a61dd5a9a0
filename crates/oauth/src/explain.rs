//! Google's OAuth error codes in plain words.

/// What an OAuth error code from Google means for an oauthrelay user, or
/// `None` for a code without a specific explanation.
pub fn explain(code: &str) -> Option<&'static str> {
    Some(match code {
        "access_denied" => {
            "access was denied: you clicked Cancel on Google's consent screen, or this Google \
             account is not a test user of the app (Google Cloud console > APIs & Services > \
             OAuth consent screen > Test users), or you did not tick the Gmail permission"
        }
        "invalid_scope" => {
            "Google refused the requested scope; SMTP needs exactly \"https://mail.google.com/\" \
             (check `scopes` in the account's config)"
        }
        "invalid_client" => {
            "Google does not accept the OAuth client id/secret: copy client_id and the client \
             secret again from Google Cloud console > APIs & Services > Credentials (a deleted \
             or reset client also causes this)"
        }
        "redirect_uri_mismatch" => {
            "the OAuth client is not of type \"Desktop app\"; create a Desktop app client \
             (APIs & Services > Credentials > Create credentials > OAuth client ID > Desktop app) \
             and use its id and secret"
        }
        "invalid_grant" => {
            "Google refused the grant: the refresh token expired or was revoked (password change, \
             access removed at myaccount.google.com/permissions, unused for 6 months, more than \
             100 tokens for this client, or an External app in \"Testing\" whose tokens die \
             after 7 days)"
        }
        "unauthorized_client" => {
            "this client is not allowed to use this grant: for a Workspace service account the \
             domain-wide delegation is missing (Admin console > Security > Access and data \
             control > API controls > Domain-wide delegation: add the service account's client \
             ID with scope https://mail.google.com/)"
        }
        "admin_policy_enforced" => {
            "a Google Workspace administrator blocks this app: ask them to trust the OAuth client \
             (Admin console > Security > Access and data control > API controls > App access \
             control)"
        }
        "org_internal" => {
            "the app's consent screen is \"Internal\" and this Google account is outside the \
             organisation"
        }
        "disabled_client" => "the OAuth client was disabled in the Google Cloud console",
        _ => return None,
    })
}

/// `code: description` followed by the explanation, for one line of log.
pub(crate) fn describe(code: &str, description: Option<&str>) -> String {
    let mut s = code.to_string();
    if let Some(d) = description.filter(|d| !d.is_empty()) {
        s.push_str(&format!(" ({d})"));
    }
    if let Some(e) = explain(code) {
        s.push_str(": ");
        s.push_str(e);
    }
    s
}

/// Explanation of `invalid_grant` for the JWT bearer grant, where it means
/// something else than for a refresh token.
pub(crate) fn describe_jwt(code: &str, description: Option<&str>) -> String {
    match code {
        "invalid_grant" => {
            let mut s = String::from("invalid_grant");
            if let Some(d) = description.filter(|d| !d.is_empty()) {
                s.push_str(&format!(" ({d})"));
            }
            s.push_str(
                ": Google refused the service account's assertion: the key was deleted or \
                 disabled (create a new JSON key), the account's email is not a user of the \
                 Workspace domain, or this machine's clock is wrong",
            );
            s
        }
        _ => describe(code, description),
    }
}
