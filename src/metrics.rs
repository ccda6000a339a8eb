//! Metrics through the `metrics` facade (feature `metrics`); no-ops without it.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `idempotency_requests_total` | counter | `outcome`: acquired, replayed, in_flight, mismatch, rejected, store_error, fail_open |
//! | `idempotency_store_duration_seconds` | histogram | `op`: claim, renew, complete, release |
//! | `idempotency_store_errors_total` | counter | `op` |
//! | `idempotency_handler_duration_seconds` | histogram | |
//! | `idempotency_lease_renewals_total` | counter | |
//! | `idempotency_leases_lost_total` | counter | |
//! | `idempotency_cache_hits_total` | counter | |
//! | `idempotency_cache_misses_total` | counter | |

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

/// A point in time for a duration metric; free (no clock read) without the `metrics` feature.
#[derive(Clone, Copy)]
pub(crate) struct Started(#[cfg(feature = "metrics")] std::time::Instant);

impl Started {
    pub(crate) fn now() -> Self {
        Self(
            #[cfg(feature = "metrics")]
            std::time::Instant::now(),
        )
    }

    #[cfg(feature = "metrics")]
    fn seconds(self) -> f64 {
        self.0.elapsed().as_secs_f64()
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
pub(crate) fn store_op(op: &'static str, started: Started, ok: bool) {
    let seconds = started.seconds();
    with_static_label!(
        op,
        ["claim", "renew", "complete", "release"],
        histogram!("idempotency_store_duration_seconds", "op").record(seconds)
    );
    if !ok {
        with_static_label!(
            op,
            ["claim", "renew", "complete", "release"],
            counter!("idempotency_store_errors_total", "op").increment(1)
        );
    }
}

#[cfg(feature = "metrics")]
pub(crate) fn handler(started: Started) {
    metrics::histogram!("idempotency_handler_duration_seconds").record(started.seconds());
}

#[cfg(feature = "metrics")]
pub(crate) fn count(name: &'static str) {
    metrics::counter!(name).increment(1);
}

#[cfg(not(feature = "metrics"))]
pub(crate) fn outcome(_: &'static str) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn store_op(_: &'static str, _: Started, _: bool) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn handler(_: Started) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn count(_: &'static str) {}

pub(crate) const RENEWALS: &str = "idempotency_lease_renewals_total";
pub(crate) const LEASES_LOST: &str = "idempotency_leases_lost_total";
#[cfg(feature = "cache")]
pub(crate) const CACHE_HITS: &str = "idempotency_cache_hits_total";
#[cfg(feature = "cache")]
pub(crate) const CACHE_MISSES: &str = "idempotency_cache_misses_total";
