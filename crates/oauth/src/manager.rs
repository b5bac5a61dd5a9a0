//! The token manager: one cached access token per account, refreshed
//! single-flight before it expires, and the needs-authorization state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Mutex, broadcast};
use tokio::time::Instant;

use crate::account::{Account, AppAuth, Credentials};
use crate::http::{self, Failure, Grant};
use crate::metrics::OAuthMetrics;
use crate::service_account::{JWT_BEARER_GRANT, ServiceAccountKey};
use crate::status::{AccountStatus, AuthState, Refusal};
use crate::store::{self, Fingerprint, RefreshRecord, RefreshResult, StoreError, TokenFile};
use crate::token::AccessToken;

/// Tuning for [`TokenManager`]. `Default` gives the production values.
#[derive(Clone)]
pub struct ManagerOptions {
    /// Refresh when the cached token has less than this left (capped at half
    /// the token's lifetime). Default 5 minutes.
    pub refresh_margin: Duration,
    /// Bound on one token request (connect + TLS + answer). Default 30 s.
    pub request_timeout: Duration,
    /// Token requests per refresh before giving up with
    /// [`TokenError::Temporary`]. Default 4.
    pub attempts: u32,
    /// First wait between attempts; doubles each time. Default 1 s.
    pub backoff_initial: Duration,
    /// Longest wait between attempts. Default 20 s.
    pub backoff_max: Duration,
    /// After a refresh failed temporarily, callers get the error (or the
    /// still-valid old token) without a new request for this long.
    /// Default 10 s.
    pub failure_cooldown: Duration,
    /// How often token files (and service-account keys) are checked for
    /// changes. `None`: no watcher. Default 2 s.
    pub watch_interval: Option<Duration>,
    /// Where to count refreshes and publish `oauthrelay_account_authorized`.
    pub metrics: Option<OAuthMetrics>,
    /// After an OAuth refusal that may be temporary (see [`Refusal::retry_at`]),
    /// the first new try comes after this long; the wait doubles up to
    /// `probe_max`. Default 1 minute (the daemon uses `[delivery]
    /// retry_initial`).
    pub probe_initial: Duration,
    /// Longest wait between those tries, at most one hour. Default 1 hour
    /// (the daemon uses `[delivery] retry_max`, capped at an hour).
    pub probe_max: Duration,
}

/// [`ManagerOptions::probe_max`] never exceeds this.
pub const PROBE_MAX_CAP: Duration = Duration::from_secs(3600);

impl Default for ManagerOptions {
    fn default() -> ManagerOptions {
        ManagerOptions {
            refresh_margin: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            attempts: 4,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(20),
            failure_cooldown: Duration::from_secs(10),
            watch_interval: Some(Duration::from_secs(2)),
            metrics: None,
            probe_initial: Duration::from_secs(60),
            probe_max: PROBE_MAX_CAP,
        }
    }
}

/// A change in an account's ability to get tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountEvent {
    /// The account can get tokens again (new token file, reload): release
    /// its held mail.
    Authorized(String),
    /// Google refused the account's credentials: hold its mail.
    NeedsAuthorization(String),
}

/// Why [`TokenManager::access_token`] gave no token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    /// Google refused the credentials for good (or none are stored). No
    /// request is made until the token file changes or the manager is
    /// reloaded. `fix` names the command that fixes it.
    #[error("account {account:?} needs authorization: {reason}; {fix}")]
    NeedsAuthorization {
        account: String,
        /// OAuth error code (`invalid_grant`, `invalid_client`...) or
        /// `not_authorized` when no refresh token is stored.
        code: String,
        reason: String,
        fix: String,
    },
    /// The token endpoint could not be reached or failed (5xx, timeouts),
    /// after retries. Try again later.
    #[error("account {account:?}: no access token for now: {reason}")]
    Temporary { account: String, reason: String },
}

impl TokenError {
    /// Worth retrying later without human action.
    pub fn is_temporary(&self) -> bool {
        matches!(self, TokenError::Temporary { .. })
    }

    /// The account waits for a human (authorize, import, config fix).
    pub fn needs_authorization(&self) -> bool {
        matches!(self, TokenError::NeedsAuthorization { .. })
    }
}

/// Why the manager could not be built or reloaded.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("two accounts are named {0:?}")]
    DuplicateAccount(String),
    #[error("account {account:?}: {source}")]
    TokenFile {
        account: String,
        #[source]
        source: StoreError,
    },
    #[error("account {account:?}: {reason}")]
    Setup { account: String, reason: String },
}

/// Access tokens for delivery. Cheap to clone (an `Arc`); `Send + Sync`.
///
/// - [`access_token`](TokenManager::access_token) returns the cached token
///   while it has more than `refresh_margin` to live; otherwise exactly one
///   caller refreshes it (the others wait for that result), with a timeout
///   and bounded retries with exponential backoff on 5xx, timeouts and
///   network errors.
/// - [`invalidate`](TokenManager::invalidate) after Gmail refused the token
///   (`535 5.7.8`) makes the next call refresh (once, however many callers
///   report the same refused token).
/// - `invalid_grant`, `invalid_client`, `unauthorized_client`,
///   `admin_policy_enforced` (any OAuth error from Google) put the account in
///   *needs authorization*: callers get [`TokenError::NeedsAuthorization`]
///   at once, without requests, the log names the fixing command, the token
///   file, [`status`](TokenManager::status) and the
///   `oauthrelay_account_authorized` gauge show it, and
///   [`AccountEvent::NeedsAuthorization`] is sent.
/// - A changed token file (`authorize`, `token import`), seen by the
///   watcher or by the next call, or [`reload`](TokenManager::reload)
///   (SIGHUP) brings the account back and sends
///   [`AccountEvent::Authorized`].
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

struct Inner {
    slots: RwLock<HashMap<String, Arc<Slot>>>,
    options: ManagerOptions,
    events: broadcast::Sender<AccountEvent>,
}

struct Slot {
    name: String,
    state: Mutex<State>,
    view: StdMutex<AccountStatus>,
    /// Bumped by `invalidate`; a cached token from an older generation is
    /// not handed out.
    invalidations: AtomicU64,
}

struct State {
    account: Account,
    http: reqwest::Client,
    refresh_token: Option<SecretString>,
    /// The refresh token the file held when we last read or wrote it.
    on_disk: Option<SecretString>,
    /// A refresh of a rotating refresh token (Microsoft) was started at
    /// this time and its outcome never stored: the process stopped between
    /// the request and the write.
    interrupted_refresh: Option<SystemTime>,
    cached: Option<Cached>,
    blocked: Option<Blocked>,
    cooldown: Option<(Instant, String)>,
    last_refresh: Option<RefreshRecord>,
    token_seen: Option<Fingerprint>,
    key_seen: Option<Fingerprint>,
    /// Last token-file problem logged (not repeated every poll).
    file_problem: Option<String>,
    /// `ManagerOptions::refresh_margin`.
    margin: Duration,
    /// For the probe schedule.
    options: ManagerOptions,
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
    expires: Instant,
    generation: u64,
}

#[derive(Clone, Debug)]
struct Blocked {
    code: String,
    reason: String,
    /// For refusals that may be temporary: when to ask again by itself.
    probe: Option<Probe>,
}

#[derive(Clone, Copy, Debug)]
struct Probe {
    at: Instant,
    wall: SystemTime,
    /// Consecutive refusals so far (the wait doubles with each).
    n: u32,
}

/// Whether a refusal with this code may go away without anyone acting (an
/// OAuth 4xx such as a transient `access_denied`, `admin_policy_enforced`
/// or `invalid_scope` that an administrator fixes elsewhere): such holds
/// are re-probed. A dead grant, a wrong client, a missing delegation, no
/// token at all, or Gmail refusing a fresh token wait for a human.
pub(crate) fn may_heal(code: &str) -> bool {
    !matches!(
        code,
        "invalid_grant"
            | "invalid_client"
            | "unauthorized_client"
            | "not_authorized"
            | "smtp_auth_rejected"
    )
}

/// The code of a block from Gmail refusing even a freshly refreshed token.
pub(crate) const SMTP_AUTH_REJECTED: &str = "smtp_auth_rejected";

/// Whether only a person can lift a refusal with this code: a dead grant, a
/// wrong client or missing delegation, no refresh token at all. A new
/// refresh token, a fixed client or key does it (`authorize`, `token
/// import`, a reload); asking again cannot. Every other refusal (an OAuth
/// 4xx that may be temporary, Gmail refusing fresh tokens at AUTH) may be
/// lifted by a delivery's hold probe ([`TokenManager::probe_token`]).
pub(crate) fn needs_person(code: &str) -> bool {
    matches!(
        code,
        "invalid_grant" | "invalid_client" | "unauthorized_client" | "not_authorized"
    )
}

impl Probe {
    /// The probe after `previous` (or the first), on the retry schedule.
    fn next(previous: Option<Probe>, options: &ManagerOptions) -> Probe {
        let n = previous.map_or(1, |p| p.n.saturating_add(1));
        let max = options
            .probe_max
            .min(PROBE_MAX_CAP)
            .max(Duration::from_secs(1));
        let factor = 2u32.saturating_pow((n - 1).min(30));
        let wait = options.probe_initial.saturating_mul(factor).min(max);
        Probe {
            at: Instant::now() + wait,
            wall: SystemTime::now() + wait,
            n,
        }
    }
}

impl TokenManager {
    /// Load every account's token file and start the watcher (when
    /// `options.watch_interval` is set and this runs inside a Tokio
    /// runtime; the watcher stops when the last clone is dropped).
    ///
    /// Fails on duplicate names and on token files that cannot be used
    /// (unreadable, too open, corrupt).
    pub fn new(
        accounts: Vec<Account>,
        options: ManagerOptions,
    ) -> Result<TokenManager, ManagerError> {
        let (events, _) = broadcast::channel(64);
        let mut slots = HashMap::new();
        for account in accounts {
            if slots.contains_key(&account.name) {
                return Err(ManagerError::DuplicateAccount(account.name));
            }
            let slot = Slot::load(account, &options)?;
            slots.insert(slot.name.clone(), Arc::new(slot));
        }
        let inner = Arc::new(Inner {
            slots: RwLock::new(slots),
            options,
            events,
        });
        if let Some(every) = inner.options.watch_interval
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(watch(Arc::downgrade(&inner), every));
        }
        Ok(TokenManager { inner })
    }

    /// A valid access token for `account` (see the type's docs).
    pub async fn access_token(&self, account: &str) -> Result<AccessToken, TokenError> {
        let slot = self.slot(account)?;
        let mut st = slot.state.lock().await;
        if st.blocked.is_some() {
            // Cheap: one stat. Picks up `authorize` / `token import` at once
            // instead of at the next watcher tick.
            self.inner.check_files(&slot, &mut st, false);
        }
        if let Some(b) = &st.blocked {
            if b.probe.is_none_or(|p| p.at > Instant::now()) {
                return Err(b.error(&st.account));
            }
            tracing::info!(account = %slot.name, code = %b.code, "asking the token endpoint again after a refusal that may have been temporary");
            return self.inner.refresh(&slot, &mut st).await;
        }
        let generation = slot.invalidations.load(Ordering::Acquire);
        let now = Instant::now();
        if let Some(c) = &st.cached
            && c.generation == generation
            && now < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        if let Some((until, reason)) = &st.cooldown
            && now < *until
        {
            if let Some(c) = &st.cached
                && c.generation == generation
                && now < c.expires
            {
                return Ok(c.token.clone());
            }
            return Err(TokenError::Temporary {
                account: slot.name.clone(),
                reason: reason.clone(),
            });
        }
        self.inner.refresh(&slot, &mut st).await
    }

    /// A token for a hold probe (delivery checking whether a held account
    /// works again): fresh from the token endpoint now, whatever the cache
    /// and the refusal's own schedule, so the probe tries the credentials
    /// for real. Refused without a request when only a person can lift the
    /// account's refusal ([`Refusal::needs_person`]: `authorize`, `token
    /// import`, a reload); a changed token file is picked up first.
    ///
    /// An OAuth refusal that may have been temporary lifts when the refresh
    /// works, as it does by itself on its schedule. A block because Gmail
    /// refused fresh tokens (`smtp_auth_rejected`) stays until the
    /// upstream takes one: the caller says so with
    /// [`auth_accepted`](TokenManager::auth_accepted).
    pub async fn probe_token(&self, account: &str) -> Result<AccessToken, TokenError> {
        let slot = self.slot(account)?;
        let mut st = slot.state.lock().await;
        self.inner.check_files(&slot, &mut st, false);
        let lift = match &st.blocked {
            Some(b) if needs_person(&b.code) => return Err(b.error(&st.account)),
            Some(b) => b.code != SMTP_AUTH_REJECTED,
            None => true,
        };
        st.cooldown = None;
        self.inner.refresh_with(&slot, &mut st, lift).await
    }

    /// The upstream accepted a token of `account` (a hold probe's AUTH
    /// worked): lifts a block because Gmail had refused fresh tokens
    /// (`smtp_auth_rejected`), with the log line, event, metrics and token
    /// file of any account authorized again. Other blocks are left alone.
    pub async fn auth_accepted(&self, account: &str) {
        let Ok(slot) = self.slot(account) else {
            return;
        };
        let mut st = slot.state.lock().await;
        if st
            .blocked
            .as_ref()
            .is_none_or(|b| b.code != SMTP_AUTH_REJECTED)
        {
            return;
        }
        st.blocked = None;
        self.inner
            .persist(&slot, &mut st, move |f| {
                f.needs_authorization = false;
            })
            .await;
        self.inner.publish(&slot, &st, true);
    }

    /// Gmail refused `rejected`, a token this account handed out
    /// (`535 5.7.8` after the XOAUTH2 challenge): the next [`access_token`]
    /// call refreshes.
    ///
    /// Single-flight across callers: when several connections were refused
    /// the same token, only the first invalidation counts; once the cached
    /// token is another one (already refreshed, or being refreshed: this
    /// waits for a refresh in progress) the call does nothing, so each
    /// caller's next [`access_token`] gets the one new token.
    ///
    /// [`access_token`]: TokenManager::access_token
    pub async fn invalidate(&self, account: &str, rejected: &AccessToken) {
        let Ok(slot) = self.slot(account) else {
            return;
        };
        let st = slot.state.lock().await;
        let generation = slot.invalidations.load(Ordering::Acquire);
        let current = st
            .cached
            .as_ref()
            .is_some_and(|c| c.generation == generation && c.token.same_token(rejected));
        if current {
            slot.invalidations.fetch_add(1, Ordering::AcqRel);
            tracing::info!(account = %account, "access token invalidated; the next use refreshes it");
        } else {
            tracing::debug!(account = %account, "refused access token already replaced; nothing to invalidate");
        }
    }

    /// Gmail refused even a freshly refreshed token (`535 5.7.8` twice):
    /// the credentials work at Google's token endpoint but not for SMTP
    /// (authorized as another Google account than `email`, a token without
    /// the `https://mail.google.com/` scope, or SMTP access disabled for the
    /// user). The account then needs authorization, exactly as after
    /// `invalid_grant`: callers get [`TokenError::NeedsAuthorization`], the
    /// token file, status, metrics and events say so, and `authorize` /
    /// `token import` (or a reload or restart, for one more try) lift it.
    /// `reply` is Gmail's answer, for the log and `token status`.
    pub async fn mark_rejected(&self, account: &str, reply: &str) {
        let Ok(slot) = self.slot(account) else {
            return;
        };
        let mut st = slot.state.lock().await;
        if st.blocked.is_some() {
            return;
        }
        let code = SMTP_AUTH_REJECTED.to_string();
        let reason = if st.account.config.provider == crate::config::Provider::Microsoft {
            format!(
                "Exchange Online refused a freshly refreshed access token for {} ({reply}): the token is for another mailbox, lacks SMTP.Send (delegated) or SMTP.SendAsApp (app-only, with the Exchange service principal given FullAccess to the mailbox), or SMTP AUTH is disabled for the mailbox",
                st.account.email
            )
        } else {
            let likely = match st.account.config.transport {
                crate::TransportKind::Smtp => {
                    "without the https://mail.google.com/ scope, or SMTP access is disabled for this user"
                }
                crate::TransportKind::GmailApi => "or the Gmail API is not allowed for this user",
            };
            format!(
                "Gmail refused a freshly refreshed access token for {} ({reply}): it was probably authorized with another Google account, {likely}",
                st.account.email
            )
        };
        st.blocked = Some(Blocked {
            code: code.clone(),
            reason: reason.clone(),
            probe: None,
        });
        st.cached = None;
        st.cooldown = None;
        let record = RefreshRecord {
            at: SystemTime::now(),
            result: RefreshResult::Error,
            error_code: Some(code),
            error: Some(reason),
        };
        st.last_refresh = Some(record.clone());
        self.inner
            .persist(&slot, &mut st, move |f| {
                f.access_token = None;
                f.access_token_expires_at = None;
                f.last_refresh = Some(record);
                f.needs_authorization = true;
            })
            .await;
        self.inner.publish(&slot, &st, false);
    }

    /// Re-read token files and service-account keys, and give accounts
    /// blocked by a client or policy error one more try (SIGHUP). With
    /// `Some(accounts)`, the account list is replaced: new accounts are
    /// added, missing ones dropped, changed ones updated in place.
    /// An account blocked by `invalid_grant` stays blocked until its token
    /// file changes: only a new refresh token can fix that.
    pub async fn reload(&self, accounts: Option<Vec<Account>>) -> Result<(), ManagerError> {
        let current: Vec<Arc<Slot>> = self.slots_snapshot();
        let Some(accounts) = accounts else {
            for slot in current {
                let mut st = slot.state.lock().await;
                let was_blocked = st.blocked.is_some();
                if let Credentials::ServiceAccount(key) = &st.account.credentials {
                    let path = key.path.clone();
                    self.inner.reload_key(&slot, &mut st, &path);
                }
                st.cooldown = None;
                self.inner.sync_files(&slot, &mut st, true);
                self.inner.publish(&slot, &st, was_blocked);
            }
            return Ok(());
        };

        let mut seen = std::collections::HashSet::new();
        for a in &accounts {
            if !seen.insert(a.name.clone()) {
                return Err(ManagerError::DuplicateAccount(a.name.clone()));
            }
        }
        let mut first_error = None;
        for account in accounts {
            let existing = self.slot(&account.name).ok();
            match existing {
                Some(_) if matches!(account.credentials, Credentials::NotLoaded { .. }) => {
                    first_error.get_or_insert(ManagerError::Setup {
                        account: account.name.clone(),
                        reason: "resolved without its client secret or key (AccountContext::without_secrets): it cannot get tokens".into(),
                    });
                }
                Some(slot) => {
                    let client = match http::client(
                        &account.extra_roots,
                        self.inner.options.request_timeout,
                    ) {
                        Ok(c) => c,
                        Err(reason) => {
                            first_error.get_or_insert(ManagerError::Setup {
                                account: account.name.clone(),
                                reason,
                            });
                            continue;
                        }
                    };
                    let mut st = slot.state.lock().await;
                    let was_blocked = st.blocked.is_some();
                    st.account = account;
                    st.http = client;
                    st.key_seen = key_fingerprint(&st.account);
                    st.cooldown = None;
                    if st.is_service_account() {
                        // New config, new try (delegation may be fixed).
                        st.blocked = None;
                    }
                    self.inner.sync_files(&slot, &mut st, true);
                    self.inner.publish(&slot, &st, was_blocked);
                }
                None => match Slot::load(account, &self.inner.options) {
                    Ok(slot) => {
                        let mut slots = self.inner.slots.write().unwrap_or_else(|e| e.into_inner());
                        slots.insert(slot.name.clone(), Arc::new(slot));
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                },
            }
        }
        {
            let mut slots = self.inner.slots.write().unwrap_or_else(|e| e.into_inner());
            slots.retain(|name, _| {
                let keep = seen.contains(name);
                if !keep && let Some(m) = &self.inner.options.metrics {
                    m.remove_account(name);
                }
                keep
            });
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Account state changes, for releasing held mail at once. A receiver
    /// that falls more than 64 events behind gets `RecvError::Lagged`: then
    /// read [`status`](TokenManager::status) instead.
    pub fn subscribe(&self) -> broadcast::Receiver<AccountEvent> {
        self.inner.events.subscribe()
    }

    /// Live per-account state (for `/readyz` and the control socket),
    /// sorted by name. Does not wait for refreshes in progress.
    pub fn status(&self) -> Vec<AccountStatus> {
        let mut out: Vec<AccountStatus> = self
            .slots_snapshot()
            .iter()
            .map(|s| s.view.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        out.sort_by(|a, b| a.account.cmp(&b.account));
        out
    }

    /// Live state of one account.
    pub fn account_status(&self, account: &str) -> Option<AccountStatus> {
        let slot = self.slot(account).ok()?;
        let view = slot.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(view)
    }

    /// Names of the managed accounts, sorted.
    pub fn accounts(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .slots_snapshot()
            .iter()
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        names
    }

    fn slot(&self, account: &str) -> Result<Arc<Slot>, TokenError> {
        self.inner
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(account)
            .cloned()
            .ok_or_else(|| TokenError::UnknownAccount(account.to_string()))
    }

    fn slots_snapshot(&self) -> Vec<Arc<Slot>> {
        self.inner
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("accounts", &self.accounts())
            .finish_non_exhaustive()
    }
}

impl Slot {
    fn load(account: Account, options: &ManagerOptions) -> Result<Slot, ManagerError> {
        if let Credentials::NotLoaded { .. } = account.credentials {
            return Err(ManagerError::Setup {
                account: account.name.clone(),
                reason: "resolved without its client secret or key (AccountContext::without_secrets): it cannot get tokens".into(),
            });
        }
        let http =
            http::client(&account.extra_roots, options.request_timeout).map_err(|reason| {
                ManagerError::Setup {
                    account: account.name.clone(),
                    reason,
                }
            })?;
        let token_seen = store::fingerprint(&account.token_file);
        let file = store::load(&account.token_file).map_err(|source| ManagerError::TokenFile {
            account: account.name.clone(),
            source,
        })?;
        let name = account.name.clone();
        let key_seen = key_fingerprint(&account);
        let mut st = State {
            account,
            http,
            refresh_token: None,
            on_disk: None,
            interrupted_refresh: None,
            cached: None,
            blocked: None,
            cooldown: None,
            last_refresh: None,
            token_seen,
            key_seen,
            file_problem: None,
            margin: options.refresh_margin,
            options: options.clone(),
        };
        st.apply_file(file.as_ref(), true);
        let slot = Slot {
            name,
            view: StdMutex::new(st.view()),
            state: Mutex::new(st),
            invalidations: AtomicU64::new(0),
        };
        let authorized = slot
            .view
            .lock()
            .map(|v| v.auth.is_authorized())
            .unwrap_or(false);
        if let Some(m) = &options.metrics {
            m.init_account(&slot.name, authorized);
        }
        if let Ok(st) = slot.state.try_lock()
            && let Some(b) = &st.blocked
        {
            // An error, like the same line when a grant is revoked later:
            // `journalctl -p err` must show every account waiting for a human.
            tracing::error!(
                account = %slot.name,
                "account needs authorization: {}; its mail is held until you {}",
                b.reason,
                fix_for(&st.account, &b.code)
            );
        }
        Ok(slot)
    }
}

fn key_fingerprint(account: &Account) -> Option<Fingerprint> {
    match &account.credentials {
        Credentials::ServiceAccount(key) => store::fingerprint(&key.path),
        Credentials::AppOnly {
            auth: AppAuth::Certificate(c),
            ..
        } => store::fingerprint(&c.key_path),
        Credentials::Client { .. }
        | Credentials::AppOnly { .. }
        | Credentials::NotLoaded { .. } => None,
    }
}

impl Blocked {
    fn error(&self, account: &Account) -> TokenError {
        TokenError::NeedsAuthorization {
            account: account.name.clone(),
            code: self.code.clone(),
            reason: self.reason.clone(),
            fix: fix_for(account, &self.code),
        }
    }
}

/// The refusal code of a token whose scope cannot serve the account's
/// transport.
pub const SCOPE_MISMATCH: &str = "scope_mismatch";

/// What to tell the user to run for an account blocked with `code`.
pub(crate) fn fix_for(account: &Account, code: &str) -> String {
    let name = &account.name;
    if code == SCOPE_MISMATCH {
        // The scopes Google granted are in the token file (recorded when
        // the mismatch was found): the fix can name a transport they serve.
        let granted = crate::store::load(&account.token_file)
            .ok()
            .flatten()
            .map(|f| f.scopes)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec!["(another scope)".to_string()]);
        if let Some((_, fix)) = account.config.scope_problem(&granted) {
            return fix;
        }
    }
    if account.is_app_only() {
        return "fix the application's client secret or certificate in the config (or its permissions: SMTP.SendAsApp with admin consent, the Exchange service principal with FullAccess to the mailbox), then reload the daemon (systemctl reload oauthrelay)".into();
    }
    if account.is_service_account() {
        return "fix the service account key or its domain-wide delegation, then reload the daemon (systemctl reload oauthrelay)".into();
    }
    let authorize = format!(
        "oauthrelay authorize --account {name} (or: oauthrelay token import --account {name})"
    );
    match code {
        "invalid_client" | "unauthorized_client" | "disabled_client" | "redirect_uri_mismatch" => {
            format!(
                "correct client_id / client secret in the config and reload the daemon, then run: oauthrelay authorize --account {name}"
            )
        }
        "admin_policy_enforced" => format!(
            "ask the Workspace administrator to trust the OAuth client, then run: oauthrelay authorize --account {name}"
        ),
        "invalid_scope" => format!(
            "fix `scopes` in the config (SMTP needs {}), then run: oauthrelay authorize --account {name}",
            match account.config.provider {
                crate::config::Provider::Microsoft => crate::config::MICROSOFT_SMTP_SCOPE,
                crate::config::Provider::Google => crate::config::GMAIL_SCOPE,
            }
        ),
        SMTP_AUTH_REJECTED => format!(
            "run: {authorize}; if the account is right, its login is probed now and then and the hold lifts when {} takes it (`oauthrelay queue retry --all` probes at once)",
            match account.config.provider {
                crate::config::Provider::Microsoft => "Exchange Online",
                crate::config::Provider::Google => "Gmail",
            }
        ),
        _ => format!("run: {authorize}"),
    }
}

impl State {
    fn is_service_account(&self) -> bool {
        self.account.is_service_account()
    }

    /// Microsoft issues a new refresh token with every refresh.
    fn rotates_refresh_tokens(&self) -> bool {
        !self.is_service_account()
            && self.account.config.provider == crate::config::Provider::Microsoft
    }

    /// Take the token file's content as the truth about the refresh token
    /// and the needs-authorization flag. With `fresh_try`, a flag set by
    /// anything but `invalid_grant` on a refresh token is ignored (startup,
    /// reload: the config may have been fixed).
    fn apply_file(&mut self, file: Option<&TokenFile>, fresh_try: bool) {
        let empty = TokenFile::default();
        let file = file.unwrap_or(&empty);
        let now = SystemTime::now();
        let file_token = file.valid_access_token(now);

        if self.is_service_account() {
            // A service account's block lives in memory only: the key file
            // or a reload lifts it, not the token file.
            if self.cached.is_none()
                && self.blocked.is_none()
                && let Some(t) = file_token
            {
                self.cached = Some(cached_from_file(t, self.margin));
            }
            self.last_refresh = file.last_refresh.clone();
            return;
        } else {
            self.on_disk = file.refresh_token.clone();
            self.interrupted_refresh = file.refresh_started_at;
            let changed = match (&self.refresh_token, &file.refresh_token) {
                (Some(a), Some(b)) => a.expose_secret() != b.expose_secret(),
                (None, None) => false,
                _ => true,
            };
            if changed {
                self.refresh_token = file.refresh_token.clone();
                self.cached = file_token.map(|t| cached_from_file(t, self.margin));
                self.cooldown = None;
            } else if self.cached.is_none()
                && let Some(t) = file_token
            {
                self.cached = Some(cached_from_file(t, self.margin));
            }
        }
        self.last_refresh = file.last_refresh.clone();

        let flagged_code = file
            .last_refresh
            .as_ref()
            .and_then(|r| r.error_code.clone())
            .unwrap_or_else(|| "invalid_grant".into());
        self.blocked = if self.refresh_token.is_none() {
            Some(Blocked {
                code: "not_authorized".into(),
                reason: format!(
                    "no refresh token is stored in {}",
                    self.account.token_file.display()
                ),
                probe: None,
            })
        } else if file.needs_authorization && !(fresh_try && flagged_code != "invalid_grant") {
            let reason = file
                .last_refresh
                .as_ref()
                .and_then(|r| r.error.clone())
                .unwrap_or_else(|| format!("Google refused the credentials ({flagged_code})"));
            let probe = may_heal(&flagged_code).then(|| {
                self.blocked
                    .as_ref()
                    .and_then(|b| b.probe)
                    .unwrap_or_else(|| Probe::next(None, &self.options))
            });
            Some(Blocked {
                code: flagged_code,
                reason,
                probe,
            })
        } else {
            None
        };
        if self.blocked.is_some() {
            self.cached = None;
        }
    }

    fn view(&self) -> AccountStatus {
        let mut v = AccountStatus::base(&self.account);
        v.refresh_token_stored = self.refresh_token.is_some();
        v.access_token_expires_at = self.cached.as_ref().map(|c| c.token.expires_at());
        v.last_refresh = self.last_refresh.clone();
        v.auth = match &self.blocked {
            Some(b) => AuthState::NeedsAuthorization(Refusal {
                code: b.code.clone(),
                problem: b.reason.clone(),
                fix: fix_for(&self.account, &b.code),
                retry_at: b.probe.map(|p| p.wall),
            }),
            None => AuthState::Authorized {
                trouble: self
                    .cooldown
                    .as_ref()
                    .map(|(_, reason)| format!("token refresh failing: {reason}")),
            },
        };
        v
    }
}

fn cached_from_file(token: AccessToken, margin: Duration) -> Cached {
    let left = token.expires_in().min(http::MAX_LIFETIME);
    let now = Instant::now();
    Cached {
        refresh_at: now + left.saturating_sub(margin),
        expires: now + left,
        token,
        generation: 0,
    }
}

impl Inner {
    /// Publish the state to `status()`, metrics and events after a change.
    fn publish(&self, slot: &Slot, st: &State, was_blocked: bool) {
        let view = st.view();
        *slot.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
        let blocked = st.blocked.is_some();
        if let Some(m) = &self.options.metrics {
            m.set_authorized(&slot.name, !blocked);
        }
        if was_blocked && !blocked {
            tracing::info!(account = %slot.name, "account is authorized again; held mail can go");
            let _ = self
                .events
                .send(AccountEvent::Authorized(slot.name.clone()));
        } else if !was_blocked && let Some(b) = &st.blocked {
            tracing::error!(
                account = %slot.name,
                code = %b.code,
                "account needs authorization: {}; its mail is held until you {}",
                b.reason,
                fix_for(&st.account, &b.code)
            );
            let _ = self
                .events
                .send(AccountEvent::NeedsAuthorization(slot.name.clone()));
        }
    }

    /// Reload the token file (and service-account key) if it changed since
    /// last seen, and publish what changed.
    fn check_files(&self, slot: &Slot, st: &mut State, fresh_try: bool) {
        let was_blocked = st.blocked.is_some();
        if self.sync_files(slot, st, fresh_try) {
            self.publish(slot, st, was_blocked);
        }
    }

    /// Reload changed files (all of them with `fresh_try`) into the state,
    /// without publishing. Returns whether anything was reloaded.
    fn sync_files(&self, slot: &Slot, st: &mut State, fresh_try: bool) -> bool {
        let mut reloaded = false;
        if let Credentials::ServiceAccount(key) = &st.account.credentials {
            let fp = store::fingerprint(&key.path);
            if fp.is_some() && fp != st.key_seen {
                let path = key.path.clone();
                self.reload_key(slot, st, &path);
                reloaded = true;
            }
        }
        let fp = store::fingerprint(&st.account.token_file);
        if fp == st.token_seen && !fresh_try {
            return reloaded;
        }
        st.token_seen = fp;
        match store::load(&st.account.token_file) {
            Ok(file) => {
                st.file_problem = None;
                st.apply_file(file.as_ref(), fresh_try);
            }
            Err(e) => {
                let text = e.to_string();
                if st.file_problem.as_deref() != Some(text.as_str()) {
                    tracing::error!(account = %slot.name, "cannot use the token file: {text}");
                    st.file_problem = Some(text);
                }
            }
        }
        true
    }

    /// Re-read a service account's key file; a new key lifts a block (the
    /// caller publishes).
    fn reload_key(&self, slot: &Slot, st: &mut State, path: &std::path::Path) {
        st.key_seen = store::fingerprint(path);
        let loaded = crate::perms::check_secret_file(path, st.account.credentials_dir.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|()| ServiceAccountKey::load(path).map_err(|e| e.to_string()));
        match loaded {
            Ok(key) => {
                st.account.credentials = Credentials::ServiceAccount(key);
                st.blocked = None;
                st.cooldown = None;
                tracing::info!(account = %slot.name, key = %path.display(), "service account key reloaded");
            }
            Err(e) => {
                tracing::error!(account = %slot.name, "cannot reload the service account key: {e}")
            }
        }
    }

    async fn refresh(&self, slot: &Slot, st: &mut State) -> Result<AccessToken, TokenError> {
        self.refresh_with(slot, st, true).await
    }

    /// Refresh; with `lift` false a success leaves the account's block (and
    /// its record in the token file) as it is: only the token is new.
    async fn refresh_with(
        &self,
        slot: &Slot,
        st: &mut State,
        lift: bool,
    ) -> Result<AccessToken, TokenError> {
        let opts = &self.options;
        let mut delay = opts.backoff_initial;
        let mut attempt: u32 = 1;
        if st.rotates_refresh_tokens() && st.refresh_token.is_some() {
            // Microsoft answers with a new refresh token: if this process
            // dies between its answer and the write, the file must say so.
            let started = SystemTime::now();
            self.persist(slot, st, move |f| f.refresh_started_at = Some(started))
                .await;
        }
        loop {
            let outcome = request(st, opts.request_timeout).await;
            if let Some(m) = &opts.metrics {
                m.refresh(&slot.name, outcome.is_ok());
            }
            match outcome {
                Ok(grant) => return self.on_success(slot, st, grant, lift).await,
                Err(Failure::Rejected {
                    status,
                    code,
                    description,
                }) => {
                    return Err(self.on_rejected(slot, st, status, code, description).await);
                }
                Err(Failure::Temporary(reason)) => {
                    if attempt >= opts.attempts.max(1) {
                        return self.on_temporary(slot, st, reason, attempt).await;
                    }
                    tracing::warn!(
                        account = %slot.name,
                        attempt,
                        retry_in = %humantime::format_duration(delay),
                        "token refresh failed, retrying: {reason}"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(opts.backoff_max);
                    attempt += 1;
                }
            }
        }
    }

    async fn on_success(
        &self,
        slot: &Slot,
        st: &mut State,
        grant: Grant,
        lift: bool,
    ) -> Result<AccessToken, TokenError> {
        let was_blocked = st.blocked.is_some();
        let granted: Vec<String> = grant
            .scope
            .as_deref()
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        if let Some((problem, _)) = st.account.config.scope_problem(&granted) {
            // A token this account's transport cannot use (a gmail.send
            // token for SMTP...): never offered upstream; held with the fix.
            return Err(self
                .on_scope_mismatch(slot, st, problem, granted, was_blocked)
                .await);
        }
        let lifetime = grant.expires_in;
        let margin = self.options.refresh_margin.min(lifetime / 2);
        let now = Instant::now();
        let token = AccessToken::new(grant.access_token, SystemTime::now() + lifetime);
        st.cached = Some(Cached {
            token: token.clone(),
            refresh_at: now + (lifetime - margin),
            expires: now + lifetime,
            generation: slot.invalidations.load(Ordering::Acquire),
        });
        let rotated = grant.refresh_token.is_some();
        if let Some(rt) = grant.refresh_token.clone() {
            st.refresh_token = Some(rt);
        }
        st.cooldown = None;
        let record = RefreshRecord {
            at: SystemTime::now(),
            result: RefreshResult::Ok,
            error_code: None,
            error: None,
        };
        if lift {
            st.blocked = None;
            st.last_refresh = Some(record.clone());
        }
        tracing::info!(
            account = %slot.name,
            expires_in = %humantime::format_duration(lifetime),
            new_refresh_token = rotated,
            "access token refreshed"
        );

        let access = token.secret().clone();
        let expires_at = token.expires_at();
        let scopes = grant
            .scope
            .map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>());
        let new_rt = grant.refresh_token;
        self.persist(slot, st, move |f| {
            f.access_token = Some(access);
            f.access_token_expires_at = Some(expires_at);
            if let Some(s) = scopes {
                f.scopes = s;
            }
            if let Some(rt) = new_rt {
                f.refresh_token = Some(rt);
            }
            // Without `lift` the block and why it was set stay recorded
            // (a restart then holds the account as before).
            if lift {
                f.last_refresh = Some(record);
                f.needs_authorization = false;
            }
            f.refresh_started_at = None;
        })
        .await;
        st.interrupted_refresh = None;
        self.publish(slot, st, was_blocked);
        Ok(token)
    }

    /// Google granted scopes the account's transport cannot use: block
    /// the account (like a refusal, with no probe: only a new
    /// authorization or a config change fixes it) and record the granted
    /// scopes in the token file for `token status`.
    async fn on_scope_mismatch(
        &self,
        slot: &Slot,
        st: &mut State,
        problem: String,
        granted: Vec<String>,
        was_blocked: bool,
    ) -> TokenError {
        let code = SCOPE_MISMATCH.to_string();
        st.blocked = Some(Blocked {
            code: code.clone(),
            reason: problem.clone(),
            probe: None,
        });
        st.cached = None;
        st.cooldown = None;
        let record = RefreshRecord {
            at: SystemTime::now(),
            result: RefreshResult::Error,
            error_code: Some(code),
            error: Some(problem),
        };
        st.last_refresh = Some(record.clone());
        self.persist(slot, st, move |f| {
            f.access_token = None;
            f.access_token_expires_at = None;
            f.scopes = granted;
            f.last_refresh = Some(record);
            f.needs_authorization = true;
            f.refresh_started_at = None;
        })
        .await;
        self.publish(slot, st, was_blocked);
        match &st.blocked {
            Some(b) => b.error(&st.account),
            None => TokenError::Temporary {
                account: slot.name.clone(),
                reason: "the credentials changed during the refresh; try again".into(),
            },
        }
    }

    async fn on_rejected(
        &self,
        slot: &Slot,
        st: &mut State,
        status: u16,
        code: String,
        description: Option<String>,
    ) -> TokenError {
        let was_blocked = st.blocked.is_some();
        let microsoft = st.account.config.provider == crate::config::Provider::Microsoft;
        let mut reason = if microsoft {
            crate::explain::describe_microsoft(&code, description.as_deref())
        } else if st.is_service_account() {
            crate::explain::describe_jwt(&code, description.as_deref())
        } else {
            crate::explain::describe(&code, description.as_deref())
        };
        if code == "invalid_grant"
            && let Some(at) = st.interrupted_refresh
        {
            reason.push_str(&format!(
                "; a refresh sent at {} was interrupted before its answer was stored (the daemon stopped between {}'s answer and writing the new refresh token), so the provider may have replaced this refresh token then: the new one is lost and the account must be signed in again",
                crate::timefmt::rfc3339(at),
                st.account.provider_name()
            ));
        }
        let reason = format!("the token endpoint refused (HTTP {status}): {reason}");
        let probe = may_heal(&code).then(|| {
            let previous = st.blocked.as_ref().and_then(|b| b.probe);
            Probe::next(previous, &self.options)
        });
        if let Some(p) = probe {
            tracing::warn!(
                account = %slot.name,
                code = %code,
                retry_in = %humantime::format_duration(Duration::from_secs(
                    p.wall.duration_since(SystemTime::now()).unwrap_or_default().as_secs()
                )),
                "the token endpoint refused the account; this may be temporary: asking again on the retry schedule"
            );
        }
        let blocked = Blocked {
            code: code.clone(),
            reason: reason.clone(),
            probe,
        };
        st.blocked = Some(blocked.clone());
        st.cached = None;
        st.cooldown = None;
        let record = RefreshRecord {
            at: SystemTime::now(),
            result: RefreshResult::Error,
            error_code: Some(code),
            error: Some(reason),
        };
        st.last_refresh = Some(record.clone());
        self.persist(slot, st, move |f| {
            f.access_token = None;
            f.access_token_expires_at = None;
            f.last_refresh = Some(record);
            f.needs_authorization = true;
        })
        .await;
        self.publish(slot, st, was_blocked);
        match &st.blocked {
            Some(b) => b.error(&st.account),
            // The token file was replaced meanwhile and lifted the block.
            None => TokenError::Temporary {
                account: slot.name.clone(),
                reason: "the credentials changed during the refresh; try again".into(),
            },
        }
    }

    async fn on_temporary(
        &self,
        slot: &Slot,
        st: &mut State,
        reason: String,
        attempts: u32,
    ) -> Result<AccessToken, TokenError> {
        let reason = format!("{reason} (after {attempts} attempts)");
        // A re-probe of a refusal that found the endpoint down: the next
        // one follows the schedule, not every call.
        if let Some(b) = st.blocked.as_mut()
            && let Some(p) = b.probe
        {
            b.probe = Some(Probe::next(Some(p), &self.options));
        }
        st.cooldown = Some((
            Instant::now() + self.options.failure_cooldown,
            reason.clone(),
        ));
        let record = RefreshRecord {
            at: SystemTime::now(),
            result: RefreshResult::Error,
            error_code: None,
            error: Some(reason.clone()),
        };
        st.last_refresh = Some(record.clone());
        self.persist(slot, st, move |f| f.last_refresh = Some(record))
            .await;
        let was_blocked = st.blocked.is_some();
        self.publish(slot, st, was_blocked);
        let generation = slot.invalidations.load(Ordering::Acquire);
        if let Some(c) = &st.cached
            && c.generation == generation
            && Instant::now() < c.expires
        {
            tracing::warn!(
                account = %slot.name,
                "token refresh failed: {reason}; using the current access token, valid for {} more",
                humantime::format_duration(Duration::from_secs(c.token.expires_in().as_secs()))
            );
            return Ok(c.token.clone());
        }
        tracing::warn!(account = %slot.name, "token refresh failed: {reason}");
        Err(TokenError::Temporary {
            account: slot.name.clone(),
            reason,
        })
    }

    /// Write the refresh outcome to the token file, unless the file now
    /// holds another refresh token than the one used (`authorize` or
    /// `token import` ran meanwhile): then take that file instead.
    async fn persist<F>(&self, slot: &Slot, st: &mut State, f: F)
    where
        F: FnOnce(&mut TokenFile) + Send + 'static,
    {
        let path = st.account.token_file.clone();
        let name = st.account.name.clone();
        let email = st.account.email.clone();
        let is_sa = st.is_service_account();
        // What the file held when last read or written by us: if it holds
        // something else now, `authorize` or `token import` replaced it.
        let used = st.on_disk.clone();
        let task = tokio::task::spawn_blocking(move || {
            store::update_if(&path, |file| {
                let same = is_sa
                    || match (&file.refresh_token, &used) {
                        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
                        (None, None) => true,
                        _ => false,
                    };
                if same {
                    file.account = name;
                    file.email = email;
                    f(file);
                }
                same
            })
        });
        match task.await {
            Ok(Ok((written, wrote))) => {
                if wrote {
                    st.token_seen = store::fingerprint(&st.account.token_file);
                    st.on_disk = written.as_ref().and_then(|w| w.refresh_token.clone());
                }
                if !is_sa {
                    let on_disk = written.as_ref().and_then(|w| w.refresh_token.as_ref());
                    let differs = match (on_disk, &st.refresh_token) {
                        (Some(a), Some(b)) => a.expose_secret() != b.expose_secret(),
                        (None, None) => false,
                        _ => true,
                    };
                    if differs {
                        st.token_seen = store::fingerprint(&st.account.token_file);
                        st.apply_file(written.as_ref(), false);
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::error!(account = %slot.name, "cannot write the token file: {e}");
            }
            Err(e) => {
                tracing::error!(account = %slot.name, "token file writer failed: {e}");
            }
        }
    }
}

async fn request(st: &State, timeout: Duration) -> Result<Grant, Failure> {
    let url = st.account.token_url.url();
    match &st.account.credentials {
        Credentials::Client {
            client_id,
            client_secret,
            ..
        } => {
            let Some(rt) = &st.refresh_token else {
                return Err(Failure::Rejected {
                    status: 0,
                    code: "not_authorized".into(),
                    description: Some("no refresh token stored".into()),
                });
            };
            let mut form = vec![
                ("grant_type", "refresh_token"),
                ("client_id", client_id.as_str()),
                ("refresh_token", rt.expose_secret()),
            ];
            if let Some(secret) = client_secret {
                form.push(("client_secret", secret.expose_secret()));
            }
            let scope = st.account.scopes.join(" ");
            if st.account.config.provider == crate::config::Provider::Microsoft {
                // Microsoft's v2.0 endpoint wants the scopes on refresh too.
                form.push(("scope", scope.as_str()));
            }
            http::post_token(&st.http, url, &form, timeout).await
        }
        Credentials::AppOnly { client_id, auth } => {
            let scope = st.account.scopes.join(" ");
            let mut form = vec![
                ("grant_type", "client_credentials"),
                ("client_id", client_id.as_str()),
                ("scope", scope.as_str()),
            ];
            let assertion;
            match auth {
                AppAuth::Secret { secret, .. } => {
                    form.push(("client_secret", secret.expose_secret()));
                }
                AppAuth::Certificate(cert) => {
                    assertion = cert
                        .assertion(client_id, url.as_str(), SystemTime::now())
                        .map_err(|e| Failure::Temporary(e.to_string()))?;
                    form.push((
                        "client_assertion_type",
                        crate::client_cert::CLIENT_ASSERTION_TYPE,
                    ));
                    form.push(("client_assertion", assertion.as_str()));
                }
            }
            http::post_token(&st.http, url, &form, timeout).await
        }
        Credentials::ServiceAccount(key) => {
            let assertion = key
                .assertion(
                    &st.account.email,
                    &st.account.scopes,
                    url.as_str(),
                    SystemTime::now(),
                )
                .map_err(|e| Failure::Temporary(e.to_string()))?;
            let form = [
                ("grant_type", JWT_BEARER_GRANT),
                ("assertion", assertion.as_str()),
            ];
            http::post_token(&st.http, url, &form, timeout).await
        }
        // Refused by Slot::load; never reached.
        Credentials::NotLoaded { .. } => Err(Failure::Rejected {
            status: 0,
            code: "invalid_client".into(),
            description: Some("the client secret was not loaded".into()),
        }),
    }
}

/// Poll token files (and service-account keys) for changes.
async fn watch(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let slots: Vec<Arc<Slot>> = inner
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for slot in slots {
            // Busy (a refresh in progress): look again next tick.
            if let Ok(mut st) = slot.state.try_lock() {
                inner.check_files(&slot, &mut st, false);
                let due = st
                    .blocked
                    .as_ref()
                    .and_then(|b| b.probe)
                    .is_some_and(|p| p.at <= Instant::now());
                if due {
                    tracing::info!(account = %slot.name, "asking the token endpoint again after a refusal that may have been temporary");
                    let _ = inner.refresh(&slot, &mut st).await;
                }
            }
        }
    }
}
