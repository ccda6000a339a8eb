//! What the caller learns about a request: its key, its attempts, whether it was a replay.

use std::fmt;
use std::time::Duration;

use crate::key::IdempotencyKey;

/// How a request went, in the extensions of the final response (of both the Tower layer and the
/// `reqwest` middleware).
///
/// ```
/// # use http::Response;
/// use tower_idempotency::client::ClientOutcome;
///
/// fn report<B>(response: &Response<B>) {
///     if let Some(outcome) = response.extensions().get::<ClientOutcome>() {
///         let key = outcome.key().map(|k| k.as_str()).unwrap_or("-");
///         tracing::info!(key, attempts = outcome.attempts(), replayed = outcome.replayed());
///     }
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub struct ClientOutcome {
    pub(crate) key: Option<IdempotencyKey>,
    pub(crate) attempts: u32,
    pub(crate) replayed: bool,
}

impl ClientOutcome {
    /// The key the request was sent with: the caller's own, or the one generated for it. `None`
    /// for a request sent without a key (a safe method), or whose own key header is not a valid
    /// key.
    pub fn key(&self) -> Option<&IdempotencyKey> {
        self.key.as_ref()
    }

    /// How many times the request was sent, the last one included (`1`: no retry).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the server answered with a stored response (`Idempotent-Replayed: true`): an
    /// earlier attempt, or an earlier request with the same key, had already run.
    pub fn replayed(&self) -> bool {
        self.replayed
    }
}

/// The error of an attempt that got no response within
/// [`attempt_timeout`](super::IdempotentClientLayer::attempt_timeout). It is retried like a
/// connection error; once the attempts or the time budget are spent it is the request's error.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub struct AttemptTimedOut {
    pub(crate) after: Duration,
}

impl AttemptTimedOut {
    /// The timeout that elapsed.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for AttemptTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no response within {:?}", self.after)
    }
}

impl std::error::Error for AttemptTimedOut {}
