//! The scope of a key: the route it was sent to (and the caller, where configured), hashed
//! with the key into the scoped key the store sees.

use http::request;

use crate::config::Config;
use crate::fingerprint::digest_fields;
use crate::key::IdempotencyKey;

/// The key the store sees: 32 hex characters of BLAKE3 over the route, the namespace, the caller
/// scope (after a marker saying whether there is one) and the idempotency key, laid out as
/// `digest_fields` describes. Fixed-size, so a store key never grows with the input, and free of
/// the raw key.
pub(super) fn scoped_key(
    parts: &request::Parts,
    route: &RouteName,
    config: &Config,
    key: &IdempotencyKey,
) -> ScopedKey {
    let caller = config.scope.as_ref().and_then(|f| f(parts));
    scoped_key_of(route.as_str(), config, caller.as_deref(), key.as_str())
}

/// [`scoped_key`] from its parts: also what the operator tools
/// ([`IdempotencyLayer::inspect`](crate::IdempotencyLayer::inspect)) compute from a query.
pub(crate) fn scoped_key_of(
    route: &str,
    config: &Config,
    caller: Option<&str>,
    key: &str,
) -> ScopedKey {
    let route = route.as_bytes();
    let namespace = config.namespace.as_deref().unwrap_or("").as_bytes();
    let digest = match caller {
        Some(caller) => {
            digest_fields(&[route, namespace, b"\x01", caller.as_bytes(), key.as_bytes()])
        }
        None => digest_fields(&[route, namespace, b"\x00", key.as_bytes()]),
    };
    let mut hex = [0u8; 32];
    for (pair, b) in hex.chunks_exact_mut(2).zip(&digest.as_bytes()[..16]) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    ScopedKey(hex)
}

/// The key the store sees: 128 bits of the scope's digest in 32 lowercase hex digits, kept
/// inline (no allocation per request).
#[derive(Clone, Copy)]
pub(crate) struct ScopedKey([u8; 32]);

impl ScopedKey {
    pub(crate) fn as_str(&self) -> &str {
        // Only ever hex digits: valid UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The route of a protected request, named in the layer's warnings and errors: the span that
/// also carries it is at `DEBUG` level, which production filters usually leave off. Cloning it
/// costs a reference count.
#[derive(Clone)]
pub(super) enum RouteName {
    #[cfg(feature = "axum")]
    Matched(axum::extract::MatchedPath),
    Path(http::Uri),
}

impl RouteName {
    /// The route part of the scope: the matched route where the router provides it, else the
    /// path.
    pub(super) fn of(parts: &request::Parts) -> Self {
        #[cfg(feature = "axum")]
        if let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() {
            return Self::Matched(matched.clone());
        }
        Self::Path(parts.uri.clone())
    }

    /// Warns, once per process, that keys are scoped by the request path because the request
    /// carried no axum 0.8 `MatchedPath`: the mark of an application on another axum version
    /// (or of a layer outside the router). Called once the handler has answered, so that a
    /// request no route matched (axum's fallback under `Router::layer`, which has no matched
    /// route by design) raises nothing. Costs one relaxed load, and only on the path variant.
    pub(super) fn warn_if_scoped_by_path(&self) {
        #[cfg(feature = "axum")]
        if let Self::Path(uri) = self {
            use std::sync::atomic::{AtomicBool, Ordering};
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.load(Ordering::Relaxed) && !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    path = uri.path(),
                    "idempotency keys are scoped by the raw request path, not by a matched route: \
                     the request reached the layer without axum 0.8's MatchedPath. With axum, \
                     add the layer with Router::route_layer in an application on axum 0.8 (a \
                     router of another axum version does not provide it, and its handlers \
                     cannot take the IdempotencyKey extractor; `cargo tree -i axum` lists the \
                     versions built). In front of a plain Tower service this is expected; build \
                     without the `axum` feature to silence it. Logged once per process"
                );
            }
        }
    }

    pub(super) fn as_str(&self) -> &str {
        match self {
            #[cfg(feature = "axum")]
            Self::Matched(matched) => matched.as_str(),
            Self::Path(uri) => uri.path(),
        }
    }

    /// Whether `status` is a router's answer rather than the handler's result, which must not
    /// consume the key: `405` (axum's method router answers it for a method the route lacks,
    /// inside `Router::route_layer`), and with axum, `404` for a request no route matched (the
    /// router's fallback, inside `Router::layer`).
    pub(super) fn answered_by_router(&self, status: http::StatusCode) -> bool {
        match self {
            _ if status == http::StatusCode::METHOD_NOT_ALLOWED => true,
            #[cfg(feature = "axum")]
            Self::Path(_) => status == http::StatusCode::NOT_FOUND,
            _ => false,
        }
    }
}

impl std::fmt::Display for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
