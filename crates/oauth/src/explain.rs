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

/// The AADSTS number in a Microsoft error description
/// (`"AADSTS70000: The provided value ..."`).
pub(crate) fn aadsts(description: Option<&str>) -> Option<u32> {
    let d = description?;
    let i = d.find("AADSTS")?;
    let digits: String = d[i + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// What Microsoft's identity platform means by `code` and the AADSTS
/// number in `description`, for an oauthrelay user.
pub(crate) fn explain_microsoft(code: &str, description: Option<&str>) -> Option<&'static str> {
    Some(match aadsts(description) {
        Some(70000) | Some(700082) | Some(50173) | Some(50133) | Some(70008) => {
            "Microsoft refused the refresh token: it expired (90 days unused), was revoked \
             (password change, sessions revoked by an administrator), or was already used once \
             by a refresh whose answer never got stored"
        }
        Some(7000215) => {
            "the client secret is wrong or expired: create a new one under the app registration's \
             Certificates & secrets and put its Value (not its ID) in client_secret_file"
        }
        Some(7000222) => {
            "the client secret expired: create a new one under the app registration's \
             Certificates & secrets"
        }
        Some(7000218) => {
            "Microsoft wants a client secret or assertion: either give the app registration's \
             secret, or turn on Authentication > Allow public client flows for a public client"
        }
        Some(700027) | Some(700024) => {
            "Microsoft refused the client assertion: upload this certificate to the app \
             registration (Certificates & secrets > Certificates), or check this machine's clock"
        }
        Some(9001023) => {
            "the .default scope (app-only) needs a tenant id or domain, not \"common\": set \
             tenant to the directory (tenant) ID"
        }
        Some(700016) => {
            "no application with this client_id in this tenant: check client_id and tenant (the \
             app must be registered in, or consented to by, the tenant)"
        }
        Some(65001) | Some(65004) => {
            "the permission was not consented: grant SMTP.Send (delegated) or \
             SMTP.SendAsApp (application) with admin consent under API permissions"
        }
        Some(50076) | Some(50079) | Some(53003) | Some(50158) => {
            "a Conditional Access policy or multi-factor requirement blocks this sign-in: exclude \
             the account or allow the app, then run authorize again"
        }
        Some(50126) | Some(50034) => "the user name or password is wrong at sign-in",
        _ => match code {
            "invalid_grant" => {
                "Microsoft refused the grant: sign in again with oauthrelay authorize"
            }
            "invalid_client" => {
                "Microsoft does not accept the application's credentials: check client_id, the \
                 client secret or certificate"
            }
            "unauthorized_client" => {
                "the app registration may not use this flow (for device code and public clients: \
                 Authentication > Allow public client flows = Yes)"
            }
            "invalid_scope" => {
                "Microsoft refused the scope: delegated SMTP needs \
                 \"https://outlook.office.com/SMTP.Send offline_access\", app-only \
                 \"https://outlook.office365.com/.default\""
            }
            "consent_required" | "interaction_required" => {
                "the user or an administrator must consent again: run oauthrelay authorize"
            }
            _ => return None,
        },
    })
}

/// `code (description): explanation` for a Microsoft refusal.
pub(crate) fn describe_microsoft(code: &str, description: Option<&str>) -> String {
    let mut s = code.to_string();
    if let Some(d) = description.filter(|d| !d.is_empty()) {
        // Microsoft's descriptions carry trace and correlation ids on
        // further lines: the first line says it.
        let first = d.lines().next().unwrap_or(d).trim();
        s.push_str(&format!(" ({first})"));
    }
    if let Some(e) = explain_microsoft(code, description) {
        s.push_str(": ");
        s.push_str(e);
    }
    s
}

/// Why app-only sending cannot use `tenant` (`common` and friends).
pub(crate) fn app_only_tenant(tenant: &str) -> String {
    format!(
        "the scope https://outlook.office365.com/.default asks for app-only (client credentials) tokens, which Microsoft issues only for one tenant: with tenant = {tenant:?} it refuses with AADSTS9001023; set tenant to your directory (tenant) ID or its primary domain (Entra admin center > Overview), or for delegated sending use scopes = [\"https://outlook.office.com/SMTP.Send\", \"offline_access\"]"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_numbers() {
        assert_eq!(
            aadsts(Some(
                "AADSTS700082: The refresh token has expired due to inactivity.\r\nTrace ID: x"
            )),
            Some(700082)
        );
        assert_eq!(aadsts(Some("no number")), None);
        assert!(
            describe_microsoft(
                "invalid_client",
                Some("AADSTS7000215: Invalid client secret provided.")
            )
            .contains("Certificates & secrets")
        );
    }
}
