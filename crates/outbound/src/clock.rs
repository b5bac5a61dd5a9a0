//! Delivery's clock comes from the runtime: wall-clock times (`next_attempt`,
//! ages, log delays) are the wall time at start plus Tokio's monotonic
//! time since, so tests that pause and advance Tokio's clock move both.

use std::time::SystemTime;

use tokio::time::Instant;

/// Wall time that follows Tokio's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall: SystemTime,
    mono: Instant,
}

impl Clock {
    /// Anchored now.
    pub(crate) fn new() -> Clock {
        Clock {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// The wall time now, as Tokio's clock has moved since the anchor.
    pub(crate) fn now(&self) -> SystemTime {
        self.wall + self.mono.elapsed()
    }

    /// The Tokio instant at wall time `t` (now, for times in the past).
    pub(crate) fn instant_at(&self, t: SystemTime) -> Instant {
        let now = Instant::now();
        match t.duration_since(self.now()) {
            Ok(d) => now + d,
            Err(_) => now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn follows_the_runtime_clock() {
        let c = Clock::new();
        let t0 = c.now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(
            c.now().duration_since(t0).unwrap(),
            Duration::from_secs(3600)
        );
        let at = c.instant_at(t0 + Duration::from_secs(7200));
        assert_eq!(at - Instant::now(), Duration::from_secs(3600));
    }
}
