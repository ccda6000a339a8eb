//! The settings every clone of a layer and its services share.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Response, StatusCode, header, request, response};
use tokio::sync::Semaphore;

use crate::detached::DetachedWork;
use crate::fingerprint::FingerprintSpec;
use crate::rejection::Rejection;
use crate::source::KeySource;

const DEFAULT_MAX_WAITERS: usize = 1024;

/// The longest TTL the setters accept (100 years); longer values are clamped to it, so that no
/// deadline computation overflows and Redis accepts every `PX`.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

type ScopeFn = dyn Fn(&request::Parts) -> Option<String> + Send + Sync;
type StorePredicate = dyn Fn(&response::Parts) -> bool + Send + Sync;
type RejectionFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// Settings shared by every clone of the service.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) key_source: KeySource,
    pub(crate) fingerprint: FingerprintSpec,
    pub(crate) min_key_len: usize,
    pub(crate) namespace: Option<Arc<str>>,
    pub(crate) require_key: bool,
    pub(crate) skip_safe_methods: bool,
    pub(crate) lease_ttl: Duration,
    pub(crate) record_ttl: Duration,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) store_timeout: Duration,
    pub(crate) fail_open: bool,
    pub(crate) excluded_headers: Vec<HeaderName>,
    pub(crate) store_response: Arc<StorePredicate>,
    pub(crate) scope: Option<Arc<ScopeFn>>,
    pub(crate) rejection: Option<Arc<RejectionFn>>,
    pub(crate) wait_in_flight: Duration,
    pub(crate) status_only: bool,
    pub(crate) waiters: Arc<Semaphore>,
    pub(crate) detached: DetachedWork,
    #[cfg(feature = "cache")]
    pub(crate) cache: Option<crate::cache::LocalCache>,
    #[cfg(feature = "encryption")]
    pub(crate) encryption: Option<Arc<crate::encryption::KeyRing>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            key_source: KeySource::default(),
            fingerprint: FingerprintSpec::default(),
            min_key_len: 0,
            namespace: None,
            require_key: true,
            skip_safe_methods: true,
            lease_ttl: Duration::from_secs(30),
            record_ttl: Duration::from_secs(24 * 60 * 60),
            max_request_body: 1024 * 1024,
            max_response_body: 1024 * 1024,
            store_timeout: Duration::from_secs(2),
            fail_open: false,
            excluded_headers: vec![header::SET_COOKIE],
            store_response: Arc::new(|parts| parts.status < StatusCode::INTERNAL_SERVER_ERROR),
            scope: None,
            rejection: None,
            wait_in_flight: Duration::ZERO,
            status_only: false,
            #[cfg(feature = "cache")]
            cache: None,
            #[cfg(feature = "encryption")]
            encryption: None,
            waiters: Arc::new(Semaphore::new(DEFAULT_MAX_WAITERS)),
            detached: DetachedWork::default(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("key_source", &self.key_source)
            .field("fingerprint", &self.fingerprint)
            .field("min_key_len", &self.min_key_len)
            .field("namespace", &self.namespace)
            .field("require_key", &self.require_key)
            .field("skip_safe_methods", &self.skip_safe_methods)
            .field("lease_ttl", &self.lease_ttl)
            .field("record_ttl", &self.record_ttl)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("store_timeout", &self.store_timeout)
            .field("fail_open", &self.fail_open)
            .field("excluded_headers", &self.excluded_headers)
            .field("scope", &self.scope.is_some())
            .field("rejection", &self.rejection.is_some())
            .field("wait_in_flight", &self.wait_in_flight)
            .field("status_only", &self.status_only)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Renders a rejection with the configured renderer.
    pub(crate) fn render<B: From<Bytes>>(&self, rejection: &Rejection) -> Response<B> {
        let response = match &self.rejection {
            Some(f) => f(rejection),
            None => rejection.to_response(),
        };
        response.map(B::from)
    }
}
