//! Where a request's idempotency key comes from.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, request};

use crate::key::{self, IdempotencyKey, KeyError};

type KeyFn =
    dyn Fn(&request::Parts, &Bytes) -> Result<Option<IdempotencyKey>, KeyError> + Send + Sync;

/// Where the layer reads the idempotency key from: headers (the default), a field of a JSON
/// body, or a function of the request.
///
/// ```
/// use http::HeaderName;
/// use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};
///
/// // Stripe-style: the event id in the JSON body (feature `json`).
/// # #[cfg(feature = "json")]
/// let layer = IdempotencyLayer::new(MemoryStore::new()).key_source(KeySource::json_field("id"));
/// // A delivery header of your own.
/// let layer = IdempotencyLayer::new(MemoryStore::new())
///     .key_source(KeySource::header(HeaderName::from_static("x-delivery-id")));
/// ```
#[derive(Clone)]
pub struct KeySource(Kind);

#[derive(Clone)]
enum Kind {
    /// Every header that is present must carry the same key.
    Headers(Vec<HeaderName>),
    /// The first header present is the key.
    FirstHeader(Vec<HeaderName>),
    #[cfg(feature = "json")]
    JsonField(Vec<Box<str>>),
    Custom(Arc<KeyFn>),
}

impl KeySource {
    /// One header.
    pub fn header(name: HeaderName) -> Self {
        Self::headers([name])
    }

    /// Several headers that name the same thing (such as `Idempotency-Key` and
    /// `X-Idempotency-Key`): the key is read from whichever is present, and a request carrying
    /// two of them with different keys is rejected (`400`).
    pub fn headers(names: impl IntoIterator<Item = HeaderName>) -> Self {
        Self(Kind::Headers(names.into_iter().collect()))
    }

    /// Several headers in order of preference: the first one present is the key, the others are
    /// not looked at. For senders that send more than one id (Shopify's event and webhook ids).
    pub fn first_header_of(names: impl IntoIterator<Item = HeaderName>) -> Self {
        Self(Kind::FirstHeader(names.into_iter().collect()))
    }

    /// A string (or integer) field of a JSON object body, by a dotted path: `"id"`,
    /// `"data.object.id"`; a numeric segment indexes an array (`"events.0.id"`).
    ///
    /// The body is buffered (as always) and parsed once more to find the key. A body that is not
    /// JSON, or a field that is neither a string nor an integer, is rejected (`400`); a missing
    /// field counts as a missing key.
    #[cfg(feature = "json")]
    pub fn json_field(path: &str) -> Self {
        Self(Kind::JsonField(path.split('.').map(Into::into).collect()))
    }

    /// A function of the request's parts and complete body. Return `Ok(None)` for "no key", and
    /// build keys with [`IdempotencyKey::parse`], which enforces the key rules.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&request::Parts, &Bytes) -> Result<Option<IdempotencyKey>, KeyError>
            + Send
            + Sync
            + 'static,
    {
        Self(Kind::Custom(Arc::new(f)))
    }

    /// Extracts the key from the request head alone; `None` if it needs the body.
    pub(crate) fn extract_from_head(
        &self,
        parts: &request::Parts,
    ) -> Option<Result<Option<IdempotencyKey>, KeyError>> {
        match &self.0 {
            Kind::Headers(names) => Some(key::from_headers(&parts.headers, names)),
            Kind::FirstHeader(names) => Some(
                names
                    .iter()
                    .find(|name| parts.headers.contains_key(*name))
                    .map_or(Ok(None), |name| {
                        key::from_headers(&parts.headers, std::slice::from_ref(name))
                    }),
            ),
            _ => None,
        }
    }

    /// Extracts the key from the head and the complete body.
    pub(crate) fn extract(
        &self,
        parts: &request::Parts,
        body: &Bytes,
    ) -> Result<Option<IdempotencyKey>, KeyError> {
        match &self.0 {
            #[cfg(feature = "json")]
            Kind::JsonField(path) => json_field(body, path),
            Kind::Custom(f) => f(parts, body),
            _ => self.extract_from_head(parts).unwrap_or(Ok(None)),
        }
    }

    /// Where the key is expected, for error messages.
    pub(crate) fn describe(&self) -> String {
        let names = |names: &[HeaderName]| {
            let names: Vec<&str> = names.iter().map(HeaderName::as_str).collect();
            format!("the {} header", names.join(" or "))
        };
        match &self.0 {
            Kind::Headers(n) | Kind::FirstHeader(n) => names(n),
            #[cfg(feature = "json")]
            Kind::JsonField(path) => format!("the JSON body field `{}`", path.join(".")),
            Kind::Custom(_) => "the request".to_owned(),
        }
    }
}

impl Default for KeySource {
    /// `Idempotency-Key`, else `X-Idempotency-Key`.
    fn default() -> Self {
        Self::headers([
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-idempotency-key"),
        ])
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeySource({})", self.describe())
    }
}

#[cfg(feature = "json")]
fn json_field(body: &[u8], path: &[Box<str>]) -> Result<Option<IdempotencyKey>, KeyError> {
    use serde_json::Value;
    let root: Value = serde_json::from_slice(body).map_err(|_| KeyError::BodyNotJson)?;
    let mut value = &root;
    for segment in path {
        let next = match value {
            Value::Object(map) => map.get(&**segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(next) => value = next,
            None => return Ok(None),
        }
    }
    match value {
        Value::Null => Ok(None),
        Value::String(s) => IdempotencyKey::parse(s.as_bytes()).map(Some),
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            IdempotencyKey::parse(n.to_string().as_bytes()).map(Some)
        }
        _ => Err(KeyError::NotAString),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&'static str, &'static str)]) -> request::Parts {
        let mut req = http::Request::post("/");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap().into_parts().0
    }

    fn key(r: Result<Option<IdempotencyKey>, KeyError>) -> Result<Option<String>, KeyError> {
        r.map(|k| k.map(|k| k.as_str().to_owned()))
    }

    #[test]
    fn first_header_of_takes_the_first_present() {
        let source = KeySource::first_header_of([
            HeaderName::from_static("x-event-id"),
            HeaderName::from_static("x-webhook-id"),
        ]);
        let both = parts(&[("x-webhook-id", "w"), ("x-event-id", "e")]);
        assert_eq!(
            key(source.extract_from_head(&both).unwrap()),
            Ok(Some("e".into()))
        );
        let one = parts(&[("x-webhook-id", "w")]);
        assert_eq!(
            key(source.extract_from_head(&one).unwrap()),
            Ok(Some("w".into()))
        );
        assert_eq!(
            key(source.extract_from_head(&parts(&[])).unwrap()),
            Ok(None)
        );
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_field_table() {
        type Case = (
            &'static str,
            &'static [u8],
            Result<Option<&'static str>, KeyError>,
        );
        let cases: &[Case] = &[
            ("id", br#"{"id":"evt_1"}"#, Ok(Some("evt_1"))),
            ("id", br#"{"id":42}"#, Ok(Some("42"))),
            (
                "data.object.id",
                br#"{"data":{"object":{"id":"ch_1"}}}"#,
                Ok(Some("ch_1")),
            ),
            (
                "events.1.id",
                br#"{"events":[{"id":"a"},{"id":"b"}]}"#,
                Ok(Some("b")),
            ),
            ("id", br#"{"other":1}"#, Ok(None)),
            ("id", br#"{"id":null}"#, Ok(None)),
            ("a.b", br#"{"a":"not an object"}"#, Ok(None)),
            ("id", br#"{"id":{"x":1}}"#, Err(KeyError::NotAString)),
            ("id", br#"{"id":1.5}"#, Err(KeyError::NotAString)),
            (
                "id",
                br#"{"id":"has space"}"#,
                Err(KeyError::InvalidCharacter),
            ),
            ("id", br#"{"id":""}"#, Err(KeyError::Empty)),
            ("id", b"not json", Err(KeyError::BodyNotJson)),
            ("id", b"", Err(KeyError::BodyNotJson)),
        ];
        for (path, body, expected) in cases {
            let source = KeySource::json_field(path);
            assert!(
                source.extract_from_head(&parts(&[])).is_none(),
                "needs the body"
            );
            let got = key(source.extract(&parts(&[]), &Bytes::from_static(body)));
            let expected = (*expected).map(|k| k.map(str::to_owned));
            assert_eq!(got, expected, "{path} {:?}", String::from_utf8_lossy(body));
        }
    }
}
