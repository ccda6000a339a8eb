//! The key a request is sent with: the caller's, else a fresh one, written in the header.

use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderValue, Method};

use super::layer::Settings;
use crate::key::IdempotencyKey;

#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
impl IdempotencyKey {
    /// A fresh random key: a UUID version 4 in its usual lowercase form
    /// (`5104d412-11c9-42b7-832d-20d0469b2d2b`), 122 bits from the operating system's
    /// random source.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let key = IdempotencyKey::new_v4();
    /// assert_eq!(key.as_str().len(), 36);
    /// assert_ne!(key, IdempotencyKey::new_v4());
    /// ```
    pub fn new_v4() -> Self {
        let mut bytes = random_bytes();
        bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
        bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 9562 variant
        let mut text = String::with_capacity(36);
        for (i, b) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                text.push('-');
            }
            text.push(char::from(HEX[usize::from(b >> 4)]));
            text.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        Self::new(text).expect("a UUID is a valid key")
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// 16 random bytes; without an OS random source (never seen on supported platforms), a digest
/// of the clock, the process and a counter, which still never repeats within a process.
fn random_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut hasher = blake3::Hasher::new();
        hasher.update(&nanos.to_le_bytes());
        hasher.update(&std::process::id().to_le_bytes());
        hasher.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    }
    bytes
}

/// The key of one logical request, decided once before its first attempt.
#[derive(Debug)]
pub(crate) struct Stamped {
    /// The key sent, when there is one and it is readable.
    pub(crate) key: Option<IdempotencyKey>,
    /// Whether the request carries a key header at all (the caller's may be unreadable).
    pub(crate) keyed: bool,
}

/// Decides the request's key and writes it in `headers`:
///
/// 1. a key header the caller set is kept as it is;
/// 2. else an [`IdempotencyKey`] the caller put in the request's extensions is sent;
/// 3. else a request with a method that is not safe gets a fresh key;
/// 4. else (`GET`, `HEAD`, `OPTIONS`, `TRACE`) the request goes without one.
pub(crate) fn stamp(
    settings: &Settings,
    method: &Method,
    headers: &mut HeaderMap,
    chosen: Option<&IdempotencyKey>,
) -> Stamped {
    let mut present = headers.get_all(&settings.key_header).iter();
    if let Some(value) = present.next() {
        let key = match present.next() {
            None => IdempotencyKey::parse(value.as_bytes()).ok(),
            Some(_) => None,
        };
        return Stamped { key, keyed: true };
    }
    let key = match chosen {
        Some(key) => key.clone(),
        None if is_safe(method) => {
            return Stamped {
                key: None,
                keyed: false,
            };
        }
        None => (settings.key_generator)(),
    };
    headers.insert(
        settings.key_header.clone(),
        header_value(&key, settings.quote_key),
    );
    Stamped {
        key: Some(key),
        keyed: true,
    }
}

/// The header value for `key`: bare, or an RFC 8941 sf-string (`"..."`, with `"` and `\`
/// escaped) when `quote` is set or the key holds a `"` (which a bare value cannot carry).
pub(crate) fn header_value(key: &IdempotencyKey, quote: bool) -> HeaderValue {
    let key = key.as_str();
    let value = if quote || key.contains('"') {
        let mut quoted = String::with_capacity(key.len() + 2);
        quoted.push('"');
        for c in key.chars() {
            if matches!(c, '"' | '\\') {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        quoted
    } else {
        key.to_owned()
    };
    HeaderValue::try_from(value).expect("visible ASCII is a valid header value")
}

/// `GET`, `HEAD`, `OPTIONS` and `TRACE`: sent without a key, as the server layer passes them
/// through.
pub(crate) fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::IdempotentClientLayer;

    #[test]
    fn new_v4_is_a_version_4_uuid() {
        for _ in 0..100 {
            let key = IdempotencyKey::new_v4();
            let text = key.as_str();
            let groups: Vec<&str> = text.split('-').collect();
            let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
            assert_eq!(lens, [8, 4, 4, 4, 12], "{text}");
            assert!(
                text.bytes().all(|b| b == b'-' || HEX.contains(&b)),
                "{text}"
            );
            assert!(groups[2].starts_with('4'), "version nibble: {text}");
            assert!(
                matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
                "variant bits: {text}"
            );
        }
    }

    #[test]
    fn header_values_parse_back_to_the_key() {
        let cases: &[(&str, bool, &str)] = &[
            ("abc", false, "abc"),
            ("abc", true, "\"abc\""),
            ("a\"b", false, "\"a\\\"b\""),
            ("a\\b", false, "a\\b"),
            ("a\\b", true, "\"a\\\\b\""),
        ];
        for (key, quote, wire) in cases {
            let key = IdempotencyKey::new(key).unwrap();
            let value = header_value(&key, *quote);
            assert_eq!(value.to_str().unwrap(), *wire, "{key:?} quote={quote}");
            assert_eq!(IdempotencyKey::parse(value.as_bytes()).unwrap(), key);
        }
    }

    #[test]
    fn stamp_table() {
        let settings = IdempotentClientLayer::new()
            .key_with(|| IdempotencyKey::new("generated").unwrap())
            .settings();
        let chosen = IdempotencyKey::new("chosen").unwrap();
        // (method, header already set, extension, key sent on the wire, key reported, keyed)
        type Case<'a> = (
            Method,
            Option<&'a str>,
            Option<&'a IdempotencyKey>,
            Option<&'a str>,
            Option<&'a str>,
            bool,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                Method::POST,
                None,
                None,
                Some("generated"),
                Some("generated"),
                true,
            ),
            (
                Method::PATCH,
                None,
                None,
                Some("generated"),
                Some("generated"),
                true,
            ),
            (
                Method::DELETE,
                None,
                None,
                Some("generated"),
                Some("generated"),
                true,
            ),
            (
                Method::POST,
                Some("mine"),
                None,
                Some("mine"),
                Some("mine"),
                true,
            ),
            (
                Method::POST,
                Some("\"mine\""),
                None,
                Some("\"mine\""),
                Some("mine"),
                true,
            ),
            (
                Method::POST,
                Some("bad key"),
                None,
                Some("bad key"),
                None,
                true,
            ),
            (
                Method::POST,
                Some("mine"),
                Some(&chosen),
                Some("mine"),
                Some("mine"),
                true,
            ),
            (
                Method::POST,
                None,
                Some(&chosen),
                Some("chosen"),
                Some("chosen"),
                true,
            ),
            (Method::GET, None, None, None, None, false),
            (Method::HEAD, None, None, None, None, false),
            (
                Method::GET,
                None,
                Some(&chosen),
                Some("chosen"),
                Some("chosen"),
                true,
            ),
            (
                Method::GET,
                Some("mine"),
                None,
                Some("mine"),
                Some("mine"),
                true,
            ),
        ];
        for (method, header, ext, wire, reported, keyed) in cases {
            let mut headers = HeaderMap::new();
            if let Some(h) = header {
                headers.insert("idempotency-key", HeaderValue::from_str(h).unwrap());
            }
            let got = stamp(&settings, &method, &mut headers, ext);
            let sent: Vec<_> = headers.get_all("idempotency-key").iter().collect();
            assert_eq!(
                sent.first().map(|v| v.to_str().unwrap()),
                wire,
                "{method} {header:?}"
            );
            assert!(sent.len() <= 1);
            assert_eq!(got.key.as_ref().map(|k| k.as_str()), reported, "{method}");
            assert_eq!(got.keyed, keyed, "{method} {header:?}");
        }
    }
}
