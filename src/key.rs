//! Parsing and validation of the idempotency key carried by a request.

use std::fmt;

use http::{HeaderMap, HeaderName};

/// The longest key accepted, in characters (bytes: keys are ASCII).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1 to 255 characters of visible ASCII (`0x21..=0x7E`).
///
/// The layer inserts the key into the request's extensions before it calls the inner service, so a
/// handler can read it (with the `axum` feature, as an extractor) and forward it downstream or
/// write it in the same database transaction as its side effect.
///
/// Its `Debug` output is redacted: keys are bearer-like secrets for the duration of their
/// record and never appear in logs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Box<str>);

impl IdempotencyKey {
    /// Parses one header value: a bare key, or an RFC 8941 sf-string (`"..."`, with `\"` and
    /// `\\` escapes) that is unquoted before use. Parameters after a quoted key are rejected.
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        match value.first() {
            Some(b'"') => {
                let unquoted = unquote_sf_string(value)?;
                validate(&unquoted)?;
                Self::from_visible_ascii(&unquoted)
            }
            Some(_) => {
                // A bare key: one pass over it finds both a stray quote and an invisible byte.
                let (quote, invisible) = scan(value);
                if quote {
                    return Err(KeyError::InvalidCharacter);
                }
                if value.len() > MAX_KEY_LEN {
                    return Err(KeyError::TooLong);
                }
                if invisible {
                    return Err(KeyError::InvalidCharacter);
                }
                Self::from_visible_ascii(value)
            }
            None => Err(KeyError::Empty),
        }
    }

    /// A key from its text as is (no unquoting): 1 to 255 characters of visible ASCII.
    ///
    /// For a key a sender chooses itself, such as an order id kept with the operation so that a
    /// retry after a restart sends the same key.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let key = IdempotencyKey::new("order-1234").unwrap();
    /// assert_eq!(key.as_str(), "order-1234");
    /// assert!(IdempotencyKey::new("two words").is_err());
    /// ```
    pub fn new(key: impl AsRef<str>) -> Result<Self, KeyError> {
        let key = key.as_ref().as_bytes();
        validate(key)?;
        Self::from_visible_ascii(key)
    }

    /// The key from bytes already checked to be visible ASCII (so valid UTF-8).
    fn from_visible_ascii(key: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(key).map_err(|_| KeyError::InvalidCharacter)?;
        Ok(Self(text.into()))
    }

    /// The key as it was sent (unquoted).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey(<{} chars>)", self.0.len())
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn validate(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if scan(key).1 {
        return Err(KeyError::InvalidCharacter);
    }
    Ok(())
}

/// Whether `bytes` hold a `"`, and whether any byte is outside visible ASCII (`0x21..=0x7E`).
/// Written without an early exit, so the compiler checks many bytes per instruction.
fn scan(bytes: &[u8]) -> (bool, bool) {
    let (mut quote, mut invisible) = (false, false);
    for &b in bytes {
        quote |= b == b'"';
        invisible |= !(0x21..=0x7e).contains(&b);
    }
    (quote, invisible)
}

/// Unquotes an RFC 8941 sf-string. Anything after the closing quote (parameters, a list) is an
/// error: an idempotency key is a single string.
fn unquote_sf_string(value: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(value.len());
    let mut iter = value[1..].iter();
    loop {
        match iter.next() {
            None => return Err(KeyError::Unterminated),
            Some(b'\\') => match iter.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(c),
                _ => return Err(KeyError::InvalidEscape),
            },
            Some(b'"') => break,
            Some(&c) if (0x20..=0x7e).contains(&c) => out.push(c),
            Some(_) => return Err(KeyError::InvalidCharacter),
        }
    }
    if iter.next().is_some() {
        return Err(KeyError::TrailingCharacters);
    }
    Ok(out)
}

/// Why a request's key was refused. Every variant becomes a `400 Bad Request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is present but empty (or the quoted string is empty).
    Empty,
    /// Longer than [`MAX_KEY_LEN`] characters.
    TooLong,
    /// A character outside visible ASCII, or a stray `"`.
    InvalidCharacter,
    /// A quoted key without its closing quote.
    Unterminated,
    /// A backslash in a quoted key not followed by `"` or `\`.
    InvalidEscape,
    /// Something (parameters, another list member) after the closing quote.
    TrailingCharacters,
    /// The same header sent more than once.
    Repeated,
    /// Two of the configured key headers carry different keys.
    Conflicting,
    /// The key is read from the JSON body, and the body is not JSON.
    BodyNotJson,
    /// The JSON field holding the key is neither a string nor an integer.
    NotAString,
    /// Shorter than the layer's [`min_key_len`](crate::IdempotencyLayer::min_key_len).
    TooShort,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "the idempotency key is empty",
            Self::TooLong => "the idempotency key is longer than 255 characters",
            Self::InvalidCharacter => {
                "the idempotency key may only contain visible ASCII characters (0x21-0x7E)"
            }
            Self::Unterminated => "the quoted idempotency key has no closing quote",
            Self::InvalidEscape => "the quoted idempotency key has an invalid escape sequence",
            Self::TrailingCharacters => {
                "the idempotency key header has characters after the quoted key"
            }
            Self::Repeated => "the idempotency key header is sent more than once",
            Self::Conflicting => "two idempotency key headers carry different keys",
            Self::BodyNotJson => "the request body is not JSON, so it carries no idempotency key",
            Self::NotAString => "the idempotency key field is neither a string nor an integer",
            Self::TooShort => "the idempotency key is shorter than this API requires",
        })
    }
}

impl std::error::Error for KeyError {}

/// Reads the key from the first of `names` present in `headers`.
///
/// Returns `Ok(None)` when none is present. A header sent twice, or two configured headers with
/// different keys, is an error.
pub(crate) fn from_headers(
    headers: &HeaderMap,
    names: &[HeaderName],
) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut found: Option<IdempotencyKey> = None;
    for name in names {
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else { continue };
        if values.next().is_some() {
            return Err(KeyError::Repeated);
        }
        let key = IdempotencyKey::parse(value.as_bytes())?;
        match &found {
            Some(first) if *first != key => return Err(KeyError::Conflicting),
            Some(_) => {}
            None => found = Some(key),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn parse_table() {
        let long = "a".repeat(255);
        let too_long = "a".repeat(256);
        let quoted_long = format!("\"{long}\"");
        let cases: &[(&[u8], Result<&str, KeyError>)] = &[
            (b"abc", Ok("abc")),
            (
                b"5104d412-11c9-42b7-832d-20d0469b2d2b",
                Ok("5104d412-11c9-42b7-832d-20d0469b2d2b"),
            ),
            (b"\"abc\"", Ok("abc")),
            (b"\"a\\\"b\\\\c\"", Ok("a\"b\\c")),
            (b"a,b", Ok("a,b")),
            (b"~!#$%&'()*+", Ok("~!#$%&'()*+")),
            (long.as_bytes(), Ok(long.as_str())),
            (quoted_long.as_bytes(), Ok(long.as_str())),
            (too_long.as_bytes(), Err(KeyError::TooLong)),
            (b"", Err(KeyError::Empty)),
            (b"\"\"", Err(KeyError::Empty)),
            (b"a b", Err(KeyError::InvalidCharacter)),
            (b"\"a b\"", Err(KeyError::InvalidCharacter)),
            (b"a\tb", Err(KeyError::InvalidCharacter)),
            (b"a\x01b", Err(KeyError::InvalidCharacter)),
            (b"\xc3\xa9t\xc3\xa9", Err(KeyError::InvalidCharacter)),
            (b"\"\xc3\xa9\"", Err(KeyError::InvalidCharacter)),
            (b"a\"b", Err(KeyError::InvalidCharacter)),
            (b"\"abc", Err(KeyError::Unterminated)),
            (b"\"a\\bc\"", Err(KeyError::InvalidEscape)),
            (b"\"abc\";p=1", Err(KeyError::TrailingCharacters)),
            (b"\"abc\", \"def\"", Err(KeyError::TrailingCharacters)),
        ];
        for (input, expected) in cases {
            let got = IdempotencyKey::parse(input);
            match (expected, got) {
                (Ok(want), Ok(key)) => assert_eq!(key.as_str(), *want, "input {input:?}"),
                (Err(want), Err(err)) => assert_eq!(err, *want, "input {input:?}"),
                (want, got) => panic!("input {input:?}: expected {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn every_byte_at_every_position_of_a_long_key() {
        // Keys long enough that the scan takes many bytes per step (and has a tail), with each
        // byte value tried at each position, bare and quoted.
        for len in [1, 17, 36, 64, 255] {
            for pos in 0..len {
                for b in 0..=u8::MAX {
                    let mut key = vec![b'k'; len];
                    key[pos] = b;
                    let visible = (0x21..=0x7e).contains(&b);
                    let bare = IdempotencyKey::parse(&key);
                    let want_bare = if b == b'"' && pos == 0 {
                        // A leading `"` opens a quoted string, which never closes here.
                        Err(KeyError::Unterminated)
                    } else if visible && b != b'"' {
                        Ok(())
                    } else {
                        Err(KeyError::InvalidCharacter)
                    };
                    assert_eq!(
                        bare.map(|_| ()),
                        want_bare,
                        "bare, len {len}, byte {b} at {pos}"
                    );
                    if b != b'"' && b != b'\\' {
                        let mut quoted = vec![b'"'];
                        quoted.extend_from_slice(&key);
                        quoted.push(b'"');
                        let want = if visible {
                            Ok(())
                        } else {
                            Err(KeyError::InvalidCharacter)
                        };
                        let got = IdempotencyKey::parse(&quoted).map(|_| ());
                        assert_eq!(got, want, "quoted, len {len}, byte {b} at {pos}");
                    }
                }
            }
        }
    }

    fn names() -> Vec<HeaderName> {
        vec![
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-idempotency-key"),
        ]
    }

    #[test]
    fn headers_table() {
        let v = HeaderValue::from_static;
        type Case = (
            Vec<(&'static str, HeaderValue)>,
            Result<Option<&'static str>, KeyError>,
        );
        let cases: Vec<Case> = vec![
            (vec![], Ok(None)),
            (vec![("idempotency-key", v("k1"))], Ok(Some("k1"))),
            (vec![("x-idempotency-key", v("k2"))], Ok(Some("k2"))),
            (
                vec![
                    ("idempotency-key", v("k1")),
                    ("x-idempotency-key", v("\"k1\"")),
                ],
                Ok(Some("k1")),
            ),
            (
                vec![("idempotency-key", v("k1")), ("x-idempotency-key", v("k2"))],
                Err(KeyError::Conflicting),
            ),
            (
                vec![("idempotency-key", v("k1")), ("idempotency-key", v("k1"))],
                Err(KeyError::Repeated),
            ),
            (
                vec![("x-idempotency-key", v("bad key"))],
                Err(KeyError::InvalidCharacter),
            ),
            (vec![("other", v("k1"))], Ok(None)),
        ];
        for (headers, expected) in cases {
            let mut map = HeaderMap::new();
            for (name, value) in &headers {
                map.append(HeaderName::from_static(name), value.clone());
            }
            let got = from_headers(&map, &names()).map(|k| k.map(|k| k.as_str().to_owned()));
            assert_eq!(
                got,
                expected.map(|k| k.map(str::to_owned)),
                "headers {headers:?}"
            );
        }
    }

    #[test]
    fn debug_is_redacted() {
        let key = IdempotencyKey::parse(b"secret-key").unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
