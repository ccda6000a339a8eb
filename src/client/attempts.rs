//! The attempts of one logical request: their count, the time budget, and the wait before the
//! next one. Shared by the Tower layer and the `reqwest` middleware.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode, Uri};
use tracing::Span;

use super::backoff::{self, Budget};
use super::key::{Stamped, is_safe};
use super::layer::Settings;
use super::outcome::ClientOutcome;
use super::policy::{self, Verdict};

/// One logical request on its way: sent once, then again while its answers ask for it and the
/// budgets allow.
#[derive(Debug)]
pub(crate) struct Attempts {
    settings: Arc<Settings>,
    stamped: Stamped,
    /// Whether the request may be sent more than once at all (its body can be replayed, and a
    /// safe method may be retried).
    retryable: bool,
    budget: Budget,
    sent: u32,
    span: Span,
}

impl Attempts {
    /// Starts the budget of a request whose key is decided. `replayable` says whether its body
    /// can be sent again.
    pub(crate) fn start(
        settings: Arc<Settings>,
        method: &Method,
        uri: &Uri,
        stamped: Stamped,
        replayable: bool,
    ) -> Self {
        let retryable = replayable && (settings.retry_safe_methods || !is_safe(method));
        let span = tracing::debug_span!(
            "idempotent_request",
            method = %method,
            uri = %without_query(uri),
            key = tracing::field::Empty,
            attempts = tracing::field::Empty,
            status = tracing::field::Empty,
            replayed = tracing::field::Empty,
        );
        if let Some(key) = &stamped.key {
            span.record("key", key.as_str());
        }
        if !replayable {
            tracing::debug!(parent: &span, "body cannot be replayed: sent once");
        }
        Self {
            budget: Budget::start(settings.max_elapsed),
            settings,
            stamped,
            retryable,
            sent: 0,
            span,
        }
    }

    /// The span of the logical request; every attempt runs inside it.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Whether another attempt could follow the one about to be sent (so the request must be
    /// kept for it).
    pub(crate) fn may_retry(&self) -> bool {
        self.retryable && self.sent + 1 < self.settings.max_attempts
    }

    /// Counts an attempt about to be sent.
    pub(crate) fn sending(&mut self) {
        self.sent += 1;
        tracing::debug!(parent: &self.span, attempt = self.sent, "sending");
    }

    /// The timeout of one attempt, if any.
    pub(crate) fn attempt_timeout(&self) -> Option<Duration> {
        self.settings.attempt_timeout
    }

    /// After a response: how long to wait before sending again, or `None` if it is final.
    pub(crate) fn after_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Duration> {
        let verdict = policy::verdict(
            status,
            headers,
            self.stamped.keyed,
            self.settings.retry_server_errors,
        );
        match verdict {
            Verdict::Final => None,
            Verdict::Retry { retry_after } => {
                self.next_wait(retry_after, format_args!("status {}", status.as_u16()))
            }
        }
    }

    /// After an error: how long to wait before sending again, or `None` to give up. `retry`
    /// says whether the error is one a resend may cure (a connection or timeout error).
    pub(crate) fn after_error(
        &self,
        error: &(dyn std::error::Error + 'static),
        retry: bool,
    ) -> Option<Duration> {
        if !retry {
            tracing::debug!(parent: &self.span, attempt = self.sent, error = %error, "error not retried");
            return None;
        }
        self.next_wait(None, format_args!("error: {error}"))
    }

    /// The wait before the next attempt: the server's `Retry-After` (capped), else the
    /// back-off; `None` when the attempts or the time budget are spent.
    fn next_wait(
        &self,
        retry_after: Option<Duration>,
        what: std::fmt::Arguments<'_>,
    ) -> Option<Duration> {
        let attempt = self.sent;
        if !self.retryable {
            tracing::debug!(parent: &self.span, attempt, "{what}; request not retryable");
            return None;
        }
        if attempt >= self.settings.max_attempts {
            tracing::debug!(parent: &self.span, attempt, "{what}; attempts spent");
            return None;
        }
        let wait = match retry_after {
            Some(asked) => asked.min(self.settings.max_retry_after),
            None => backoff::full_jitter(
                self.settings.initial_backoff,
                self.settings.max_backoff,
                attempt - 1,
            ),
        };
        if !self.budget.allows(wait) {
            tracing::debug!(parent: &self.span, attempt, wait_ms = wait.as_millis() as u64, "{what}; time budget spent");
            return None;
        }
        tracing::debug!(parent: &self.span, attempt, wait_ms = wait.as_millis() as u64, "{what}; retrying");
        Some(wait)
    }

    /// What the caller learns about the request, recorded in the span too.
    pub(crate) fn outcome(&self, status: StatusCode, headers: &HeaderMap) -> ClientOutcome {
        let replayed = policy::replayed(headers);
        self.span.record("attempts", self.sent);
        self.span.record("status", status.as_u16());
        self.span.record("replayed", replayed);
        ClientOutcome {
            key: self.stamped.key.clone(),
            attempts: self.sent,
            replayed,
        }
    }

    /// Records the number of attempts of a request that ended in an error.
    pub(crate) fn failed(&self) {
        self.span.record("attempts", self.sent);
    }
}

/// The URI without its query string, which may hold tokens.
fn without_query(uri: &Uri) -> String {
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}{}", uri.path()),
        _ => uri.path().to_owned(),
    }
}
