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

use std::time::Duration;

#[cfg(feature = "metrics")]
pub(crate) fn outcome(outcome: &'static str) {
    metrics::counter!("idempotency_requests_total", "outcome" => outcome).increment(1);
}

#[cfg(feature = "metrics")]
pub(crate) fn store_op(op: &'static str, elapsed: Duration, ok: bool) {
    metrics::histogram!("idempotency_store_duration_seconds", "op" => op)
        .record(elapsed.as_secs_f64());
    if !ok {
        metrics::counter!("idempotency_store_errors_total", "op" => op).increment(1);
    }
}

#[cfg(feature = "metrics")]
pub(crate) fn handler(elapsed: Duration) {
    metrics::histogram!("idempotency_handler_duration_seconds").record(elapsed.as_secs_f64());
}

#[cfg(feature = "metrics")]
pub(crate) fn count(name: &'static str) {
    metrics::counter!(name).increment(1);
}

#[cfg(not(feature = "metrics"))]
pub(crate) fn outcome(_: &'static str) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn store_op(_: &'static str, _: Duration, _: bool) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn handler(_: Duration) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn count(_: &'static str) {}

pub(crate) const RENEWALS: &str = "idempotency_lease_renewals_total";
pub(crate) const LEASES_LOST: &str = "idempotency_leases_lost_total";
#[cfg(feature = "cache")]
pub(crate) const CACHE_HITS: &str = "idempotency_cache_hits_total";
#[cfg(feature = "cache")]
pub(crate) const CACHE_MISSES: &str = "idempotency_cache_misses_total";
