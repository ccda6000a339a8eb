//! What the layer tells about a protected request: the span's `outcome`, the outcome metric,
//! and debug events with the phases' durations.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use tracing::Span;

use crate::config::Config;
use crate::metrics;
use crate::rejection::Rejection;

/// What the request's tracing span records as `outcome`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Outcome {
    Acquired,
    Replayed,
    InFlight,
    Mismatch,
    Rejected,
    StoreError,
    FailOpen,
}

impl Outcome {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Acquired => "acquired",
            Self::Replayed => "replayed",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::StoreError => "store_error",
            Self::FailOpen => "fail_open",
        }
    }
}

pub(super) fn record_outcome(outcome: Outcome) {
    if debug_on() {
        Span::current().record("outcome", outcome.as_str());
    }
    metrics::outcome(outcome.as_str());
}

/// Whether anything may take `DEBUG`, the level of the request's span. When nothing does (no
/// subscriber, or a filter below it, as in most production setups) there is no span of the
/// layer's to record on or to carry into the owner's part, and no `Span::current()` lookup is
/// made.
pub(super) fn debug_on() -> bool {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    tracing::Level::DEBUG <= STATIC_MAX_LEVEL && tracing::Level::DEBUG <= LevelFilter::current()
}

/// Records a rejection (outcome, debug event) and renders it: the one path every rejection
/// takes.
pub(super) fn rejected<B: From<Bytes>>(config: &Config, rejection: &Rejection) -> Response<B> {
    record_outcome(Outcome::Rejected);
    tracing::debug!(status = %rejection.status(), %rejection, "rejected");
    config.render(rejection)
}

/// The time now if debug events are on (they carry durations), else nothing: no clock read.
pub(super) fn debug_clock() -> Option<Instant> {
    tracing::enabled!(tracing::Level::DEBUG).then(Instant::now)
}

/// The time since `started`, when [`debug_clock`] gave one.
pub(super) fn since(started: Option<Instant>) -> Option<Duration> {
    started.map(|started| started.elapsed())
}
