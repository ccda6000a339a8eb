//! Metrics through the `metrics` facade (feature `metrics`); no-ops without it.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `idempotency_requests_total` | counter | `outcome`: acquired, replayed, in_flight, mismatch, rejected, store_error, fail_open |
//! | `idempotency_store_duration_seconds` | histogram | `op`: claim, prepare (transactional stores), renew, complete, release |
//! | `idempotency_store_errors_total` | counter | `op` |
//! | `idempotency_handler_duration_seconds` | histogram | |
//! | `idempotency_lease_renewals_total` | counter | |
//! | `idempotency_leases_lost_total` | counter | |
//! | `idempotency_complete_retries_total` | counter | |
//! | `idempotency_background_releases_total` | counter | |
//! | `idempotency_cache_hits_total` | counter | |
//! | `idempotency_cache_misses_total` | counter | |
//! | `idempotency_memory_store_full_total` | counter | |
//!
//! A request's claim, handler and `complete` (or `release`) are timed back to back with one
//! `Stopwatch`: four clock reads for the three instead of six.

/// Calls `$mac!` with `$value` as a literal label value, so the metric's key is a `static`
/// (no allocation per call): the `metrics` macros build keys with non-literal labels at run time.
#[cfg(feature = "metrics")]
macro_rules! with_static_label {
    ($value:expr, [$($known:literal),*], $mac:ident!($name:literal, $label:literal).$method:ident $args:tt) => {
        match $value {
            $($known => metrics::$mac!($name, $label => $known).$method $args,)*
            other => metrics::$mac!($name, $label => other).$method $args,
        }
    };
}

/// The clock of the duration metrics: [`lap`](Self::lap) reads the time once and gives the time
/// since the previous lap (or the start), so the consecutive phases of a request (claim, handler,
/// complete) share their boundaries' clock reads. Free (no clock read) without the `metrics`
/// feature.
pub(crate) struct Stopwatch(#[cfg(feature = "metrics")] std::time::Instant);

/// The length of one phase, for a duration metric.
pub(crate) struct Lap(#[cfg(feature = "metrics")] f64);

impl Stopwatch {
    pub(crate) fn start() -> Self {
        Self(
            #[cfg(feature = "metrics")]
            std::time::Instant::now(),
        )
    }

    pub(crate) fn lap(&mut self) -> Lap {
        #[cfg(feature = "metrics")]
        {
            let now = std::time::Instant::now();
            let seconds = now.duration_since(self.0).as_secs_f64();
            self.0 = now;
            Lap(seconds)
        }
        #[cfg(not(feature = "metrics"))]
        Lap()
    }
}

#[cfg(feature = "metrics")]
pub(crate) fn outcome(outcome: &'static str) {
    with_static_label!(
        outcome,
        [
            "acquired",
            "replayed",
            "in_flight",
            "mismatch",
            "rejected",
            "store_error",
            "fail_open"
        ],
        counter!("idempotency_requests_total", "outcome").increment(1)
    );
}

#[cfg(feature = "metrics")]
pub(crate) fn store_op(op: &'static str, lap: Lap, ok: bool) {
    let seconds = lap.0;
    with_static_label!(
        op,
        ["claim", "prepare", "renew", "complete", "release"],
        histogram!("idempotency_store_duration_seconds", "op").record(seconds)
    );
    if !ok {
        with_static_label!(
            op,
            ["claim", "prepare", "renew", "complete", "release"],
            counter!("idempotency_store_errors_total", "op").increment(1)
        );
    }
}

#[cfg(feature = "metrics")]
pub(crate) fn handler(lap: Lap) {
    metrics::histogram!("idempotency_handler_duration_seconds").record(lap.0);
}

#[cfg(feature = "metrics")]
pub(crate) fn count(name: &'static str) {
    metrics::counter!(name).increment(1);
}

#[cfg(not(feature = "metrics"))]
pub(crate) fn outcome(_: &'static str) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn store_op(_: &'static str, _: Lap, _: bool) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn handler(_: Lap) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn count(_: &'static str) {}

pub(crate) const RENEWALS: &str = "idempotency_lease_renewals_total";
pub(crate) const LEASES_LOST: &str = "idempotency_leases_lost_total";
pub(crate) const COMPLETE_RETRIES: &str = "idempotency_complete_retries_total";
pub(crate) const BACKGROUND_RELEASES: &str = "idempotency_background_releases_total";
pub(crate) const MEMORY_STORE_FULL: &str = "idempotency_memory_store_full_total";
#[cfg(feature = "cache")]
pub(crate) const CACHE_HITS: &str = "idempotency_cache_hits_total";
#[cfg(feature = "cache")]
pub(crate) const CACHE_MISSES: &str = "idempotency_cache_misses_total";
