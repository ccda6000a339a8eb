//! What the fingerprint covers: the whole request (the default), the body only, selected or
//! all-but-some JSON fields, or a function of the user's.

use std::fmt;
use std::sync::Arc;

use http::request;

use super::{Fingerprint, digest_fields};

type CustomFn = dyn Fn(&request::Parts, &[u8]) -> Fingerprint + Send + Sync;

/// What of a request the [`Fingerprint`] covers, set with
/// [`IdempotencyLayer::fingerprint_with`](crate::IdempotencyLayer::fingerprint_with).
///
/// A request whose key is already taken by a request with a different fingerprint is refused
/// with `422`, whatever the spec. Narrow the fingerprint when real retries differ in parts that
/// do not change the operation (a `sent_at` timestamp, a trace id in the body); keep it as wide
/// as you can otherwise, since whatever it leaves out, a reused key no longer catches.
///
/// Headers are never part of the fingerprint (except through [`custom`](Self::custom)), so
/// headers that change on every retry (signatures, timestamps, trace headers) need nothing.
///
/// ```
/// # #[cfg(feature = "json")] {
/// use tower_idempotency::{FingerprintSpec, IdempotencyLayer, MemoryStore};
///
/// // Two retries differing only in `sent_at` and `meta.trace_id` are the same request.
/// let layer = IdempotencyLayer::new(MemoryStore::new())
///     .fingerprint_with(FingerprintSpec::ignore_json_fields(["sent_at", "meta.trace_id"]));
/// # }
/// ```
#[derive(Clone, Default)]
pub struct FingerprintSpec(Kind);

#[derive(Clone, Default)]
enum Kind {
    #[default]
    Request,
    BodyOnly,
    #[cfg(feature = "json")]
    JsonFields(Arc<[super::json::Path]>),
    #[cfg(feature = "json")]
    IgnoreJsonFields(Arc<[super::json::Path]>),
    Custom(Arc<CustomFn>),
}

/// Separates the inputs of the non-default specs from each other and from the default's, so
/// that no two specs can give the same fingerprint for different material.
const BODY_ONLY: &[u8] = b"tower-idempotency/body-only";
#[cfg(feature = "json")]
pub(super) const JSON_FIELDS: &[u8] = b"tower-idempotency/json-fields";
#[cfg(feature = "json")]
pub(super) const IGNORE_JSON_FIELDS: &[u8] = b"tower-idempotency/ignore-json-fields";
/// A body that is not JSON, where JSON fields were selected: the whole body is compared.
#[cfg(feature = "json")]
pub(super) const NOT_JSON: &[u8] = b"tower-idempotency/not-json";
const CUSTOM: &[u8] = b"tower-idempotency/custom";

impl FingerprintSpec {
    /// The method, the path and query, and the whole body: today's and the default
    /// fingerprint ([`Fingerprint::of`]).
    pub fn request() -> Self {
        Self::default()
    }

    /// The body alone, byte for byte: the method, path and query are left out. Keys are scoped
    /// by route anyway; use it where the query carries something volatile (a cache buster, a
    /// signature timestamp).
    pub fn body_only() -> Self {
        Self(Kind::BodyOnly)
    }

    /// The method, the path and query, and only the listed fields of a JSON body, by dotted path
    /// as in [`KeySource::json_field`](crate::KeySource::json_field) (`"order.id"`, a numeric
    /// segment indexes an array: `"items.0.sku"`). A field that is absent or `null` counts as
    /// absent; two requests agree when every listed field has the same JSON value in both
    /// (object keys in any order, numbers by value: `0.1` and `0.10` agree).
    ///
    /// A body that is not JSON is compared whole, byte for byte, as with the default spec: the
    /// request is not refused for it, and a retry of it must repeat it exactly. So is a body
    /// with a number that a JSON tree would round (an integer beyond 64 bits, more than 15
    /// significant digits, an exponent beyond ±300), so that two such numbers never compare
    /// equal. The body is parsed into a tree for each keyed request, which takes several times
    /// its size in memory: keep [`max_request_body`](crate::IdempotencyLayer::max_request_body)
    /// to what the route needs.
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn json_fields<I, P>(paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<str>,
    {
        Self(Kind::JsonFields(super::json::paths(paths)))
    }

    /// The method, the path and query, and a JSON body with the listed fields (dotted paths, as
    /// in [`json_fields`](Self::json_fields)) removed: everything but what is known to change
    /// between retries (`"sent_at"`, `"meta.trace_id"`). An array element named by its index
    /// is compared as `null`, so that the elements after it keep their places. Object keys may
    /// come in any order.
    ///
    /// A body that is not JSON is compared whole, byte for byte, as with the default spec.
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn ignore_json_fields<I, P>(paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<str>,
    {
        Self(Kind::IgnoreJsonFields(super::json::paths(paths)))
    }

    /// A function of the request's head and complete body: it returns the bytes to compare
    /// (a `Vec<u8>`, a `String`, a slice of the body), which are hashed into the fingerprint.
    /// Only what it returns is compared: include the method or the path if they matter.
    ///
    /// ```
    /// use tower_idempotency::{FingerprintSpec, IdempotencyLayer, MemoryStore};
    ///
    /// // The body and one header, say a tenant's API version.
    /// let spec = FingerprintSpec::custom(|parts, body| {
    ///     let version = parts.headers.get("api-version").map_or(&b""[..], |v| v.as_bytes());
    ///     [version, b"\n", body].concat()
    /// });
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).fingerprint_with(spec);
    /// ```
    pub fn custom<F, R>(f: F) -> Self
    where
        F: Fn(&request::Parts, &[u8]) -> R + Send + Sync + 'static,
        R: AsRef<[u8]>,
    {
        Self(Kind::Custom(Arc::new(move |parts, body| {
            let material = f(parts, body);
            Fingerprint(*digest_fields(&[CUSTOM, material.as_ref()]).as_bytes())
        })))
    }

    /// The fingerprint of a request under this spec.
    pub(crate) fn fingerprint(&self, parts: &request::Parts, body: &[u8]) -> Fingerprint {
        match &self.0 {
            Kind::Request => Fingerprint::of(&parts.method, &parts.uri, body),
            Kind::BodyOnly => Fingerprint(*digest_fields(&[BODY_ONLY, body]).as_bytes()),
            #[cfg(feature = "json")]
            Kind::JsonFields(paths) => super::json::selected(parts, body, paths),
            #[cfg(feature = "json")]
            Kind::IgnoreJsonFields(paths) => super::json::without(parts, body, paths),
            Kind::Custom(f) => f(parts, body),
        }
    }
}

impl fmt::Debug for FingerprintSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Request => f.write_str("FingerprintSpec::request()"),
            Kind::BodyOnly => f.write_str("FingerprintSpec::body_only()"),
            #[cfg(feature = "json")]
            Kind::JsonFields(paths) => {
                write!(f, "FingerprintSpec::json_fields({paths:?})")
            }
            #[cfg(feature = "json")]
            Kind::IgnoreJsonFields(paths) => {
                write!(f, "FingerprintSpec::ignore_json_fields({paths:?})")
            }
            Kind::Custom(_) => f.write_str("FingerprintSpec::custom(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> request::Parts {
        http::Request::post(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_default_is_todays_fingerprint() {
        let p = parts("/pay?x=1");
        let spec = FingerprintSpec::default();
        assert_eq!(
            spec.fingerprint(&p, b"body"),
            Fingerprint::of(&p.method, &p.uri, b"body")
        );
    }

    #[test]
    fn body_only_ignores_method_path_and_query() {
        let spec = FingerprintSpec::body_only();
        let a = spec.fingerprint(&parts("/a?t=1"), b"body");
        assert_eq!(a, spec.fingerprint(&parts("/b?t=2"), b"body"));
        assert_ne!(a, spec.fingerprint(&parts("/a?t=1"), b"bodY"));
        // Not the default's digest of the same bytes.
        assert_ne!(
            a,
            FingerprintSpec::custom(|_, body| body.to_vec()).fingerprint(&parts("/a"), b"body")
        );
    }

    #[test]
    fn custom_compares_what_it_returns() {
        let spec = FingerprintSpec::custom(|parts, _| parts.uri.path().to_owned());
        assert_eq!(
            spec.fingerprint(&parts("/a?x=1"), b"one"),
            spec.fingerprint(&parts("/a?x=2"), b"two")
        );
        assert_ne!(
            spec.fingerprint(&parts("/a"), b""),
            spec.fingerprint(&parts("/b"), b"")
        );
    }
}
