//! What of a response is stored, and how a stored one is replayed.

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, header, response};

use crate::config::Config;
use crate::fingerprint::Fingerprint;
use crate::record::CompletedRecord;
use crate::store_policy::StorePolicy;

/// The header added to every replayed response.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

const REPLAYED_NAME: HeaderName = HeaderName::from_static(IDEMPOTENT_REPLAYED);

/// The record to store for a response, and whether it took the response's headers (`parts`
/// is left without them, and `Ctx::complete` gives them back once the store has the record):
/// when every header is stored as it is, the usual case, they are moved rather than copied.
pub(super) fn record_of(
    config: &Config,
    fingerprint: Fingerprint,
    parts: &mut response::Parts,
    body: &Bytes,
) -> (CompletedRecord, bool) {
    // The handler's policy can only keep less than the settings.
    let policy = StorePolicy::of(&parts.extensions);
    let status_only = config.status_only || policy == StorePolicy::ProcessedOnly;
    let too_large = body.len() > config.max_response_body;
    let omitted = status_only || too_large || policy == StorePolicy::StatusAndHeaders;
    let (mut headers, lent) = if status_only {
        (HeaderMap::new(), false)
    } else {
        match storable_headers(&parts.headers, &config.excluded_headers) {
            Some(filtered) => (filtered, false),
            // Its `Content-Length` is removed below; the client's response keeps it.
            None if omitted => (parts.headers.clone(), false),
            None => (std::mem::take(&mut parts.headers), true),
        }
    };
    if omitted && !status_only {
        headers.remove(header::CONTENT_LENGTH);
    }
    if too_large && !status_only {
        tracing::warn!(
            size = body.len(),
            limit = config.max_response_body,
            "response larger than the limit: stored without its body"
        );
    }
    let expires_at = SystemTime::now() + config.record_ttl;
    let record = CompletedRecord::new(fingerprint, parts.status, expires_at).with_headers(headers);
    let record = if omitted {
        record.with_body_omitted()
    } else {
        record.with_body(body.clone())
    };
    (record, lent)
}

/// Headers never stored: hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, not the
/// response.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The headers worth storing: everything but hop-by-hop headers, headers the `Connection` header
/// names, `Upgrade`, and the caller's `excluded` list. `None` when that is all of them (the usual
/// case), so the caller can store the map as it is.
fn storable_headers(headers: &HeaderMap, excluded: &[HeaderName]) -> Option<HeaderMap> {
    let connection_named: Vec<&str> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let dropped = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || *name == header::UPGRADE
            || *name == crate::encryption::SEALED
            || excluded.contains(name)
            || connection_named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_str()))
    };
    if !headers.keys().any(dropped) {
        return None;
    }
    // Only a hint, kept small: `with_capacity` panics far below the number of values a
    // `HeaderMap` can hold.
    let mut out = HeaderMap::with_capacity(headers.len().min(1024));
    for (name, value) in headers {
        if !dropped(name) {
            out.append(name.clone(), value.clone());
        }
    }
    Some(out)
}

pub(super) fn replay<B: From<Bytes>>(record: CompletedRecord) -> Response<B> {
    let mut response = Response::new(B::from(record.body));
    *response.status_mut() = record.status;
    *response.headers_mut() = record.headers;
    response
        .headers_mut()
        .insert(REPLAYED_NAME, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_headers_drops_hop_by_hop_and_excluded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-conn"),
        );
        h.insert("x-conn", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::SET_COOKIE, HeaderValue::from_static("a=b"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.append("x-keep", HeaderValue::from_static("1"));
        h.append("x-keep", HeaderValue::from_static("2"));
        let out = storable_headers(&h, &[header::SET_COOKIE]).expect("some dropped");
        let names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-keep"]);
        assert_eq!(out.get_all("x-keep").iter().count(), 2);
        let out = storable_headers(&h, &[]).expect("hop-by-hop dropped");
        assert!(out.contains_key(header::SET_COOKIE));
    }

    #[test]
    fn storable_headers_keeps_everything_when_nothing_is_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.append("x-keep", HeaderValue::from_static("1"));
        h.append("x-keep", HeaderValue::from_static("2"));
        h.insert(header::SET_COOKIE, HeaderValue::from_static("a=b"));
        assert_eq!(storable_headers(&h, &[]), None, "stored as it is");
        let mut without_cookie = h.clone();
        without_cookie.remove(header::SET_COOKIE);
        assert_eq!(
            storable_headers(&h, &[header::SET_COOKIE]),
            Some(without_cookie)
        );
    }
}
