//! How long to wait before the next attempt: exponential back-off with full jitter, within the
//! attempt and time budgets.

use std::time::Duration;

use tokio::time::Instant;

/// `initial * 2^retry`, capped at `max`: the upper bound of the wait before retry number
/// `retry` (0 for the first retry).
pub(crate) fn ceiling(initial: Duration, max: Duration, retry: u32) -> Duration {
    let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

/// Full jitter: a uniformly random wait between zero and the [`ceiling`], so that clients
/// that failed together do not come back together.
pub(crate) fn full_jitter(initial: Duration, max: Duration, retry: u32) -> Duration {
    let ceiling = ceiling(initial, max, retry);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let draw = random_u64();
    Duration::from_nanos(nanos.checked_add(1).map_or(draw, |range| draw % range))
}

/// A random number for the jitter; without an OS random source, the clock's nanoseconds.
fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos().into())
    })
}

/// The total time one logical request may take: no wait is started that would end after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    started: Instant,
    total: Duration,
}

impl Budget {
    pub(crate) fn start(total: Duration) -> Self {
        Self {
            started: Instant::now(),
            total,
        }
    }

    /// Whether waiting `wait` from now still ends within the budget.
    pub(crate) fn allows(&self, wait: Duration) -> bool {
        self.started.elapsed().saturating_add(wait) <= self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_then_caps() {
        let cases = [
            (0, 100),
            (1, 200),
            (2, 400),
            (3, 800),
            (4, 1000),
            (40, 1000),
            (u32::MAX, 1000),
        ];
        for (retry, want) in cases {
            assert_eq!(
                ceiling(100 * MS, 1000 * MS, retry),
                want * MS,
                "retry {retry}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_the_ceiling_and_varies() {
        let mut seen = std::collections::HashSet::new();
        for retry in 0..6 {
            for _ in 0..200 {
                let wait = full_jitter(10 * MS, 200 * MS, retry);
                assert!(wait <= ceiling(10 * MS, 200 * MS, retry), "{wait:?}");
                seen.insert(wait);
            }
        }
        // 1200 draws over ranges of millions of nanoseconds: a constant would give one value.
        assert!(seen.len() > 100, "only {} distinct waits", seen.len());
        assert_eq!(
            full_jitter(Duration::ZERO, Duration::ZERO, 3),
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refuses_a_wait_that_ends_after_it() {
        let budget = Budget::start(Duration::from_secs(10));
        assert!(budget.allows(Duration::from_secs(10)));
        assert!(!budget.allows(Duration::from_secs(11)));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(budget.allows(Duration::from_secs(6)));
        assert!(!budget.allows(Duration::from_secs(7)));
    }
}
