//! Waiting for a fake's state to change, without polling.

use std::time::Duration;

use tokio::sync::Notify;

/// Wait until `check` holds or `timeout` passes; whether it held. `changed`
/// is notified (`notify_waiters`) after every change `check` may see; the
/// waiter is registered before `check` runs, so no change falls between.
pub(crate) async fn until_changed(
    changed: &Notify,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if check() {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return check();
        }
    }
}
