//! Property tests of the two parsers that read untrusted bytes: the key from a request header
//! (`IdempotencyKey::parse`) and the stored record (`CompletedRecord::decode`, which reads
//! whatever is under the key in the store).
//!
//! The same properties are checked without bounds by the cargo-fuzz targets in `fuzz/`
//! (`scripts/fuzz.sh`).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::collection::vec;
use proptest::prelude::*;
use tower_idempotency::{CompletedRecord, Fingerprint, IdempotencyKey, MAX_KEY_LEN};

// ---------------------------------------------------------------------------------------------
// Keys.
// ---------------------------------------------------------------------------------------------

/// Any valid key: 1 to 255 characters of visible ASCII.
fn valid_key() -> impl Strategy<Value = String> {
    vec(0x21u8..=0x7e, 1..=MAX_KEY_LEN).prop_map(|b| String::from_utf8(b).unwrap())
}

/// A valid key as an RFC 8941 sf-string: quoted, `\` and `"` escaped.
fn sf_quote(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    out.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Inputs near the grammar: quotes, escapes, separators, spaces, tabs, controls, high bytes.
fn keyish() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => 0x21u8..=0x7e,
        2 => Just(b'"'),
        2 => Just(b'\\'),
        1 => prop::sample::select(vec![b' ', b'\t', b';', b',', b'=', 0, 0x7f, 0x80, 0xff]),
    ];
    vec(byte, 0..300)
}

fn assert_valid(key: &IdempotencyKey) -> Result<(), TestCaseError> {
    let s = key.as_str();
    prop_assert!((1..=MAX_KEY_LEN).contains(&s.len()), "length {}", s.len());
    prop_assert!(
        s.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "not visible ASCII: {s:?}"
    );
    Ok(())
}

proptest! {
    #[test]
    fn every_valid_key_round_trips_sf_quoted(key in valid_key()) {
        let parsed = IdempotencyKey::parse(sf_quote(&key).as_bytes());
        prop_assert_eq!(parsed.map(|k| k.as_str().to_owned()), Ok(key));
    }

    #[test]
    fn every_valid_key_without_a_quote_round_trips_bare(
        key in valid_key().prop_filter("a bare key has no quote", |k| !k.contains('"'))
    ) {
        let parsed = IdempotencyKey::parse(key.as_bytes());
        prop_assert_eq!(parsed.map(|k| k.as_str().to_owned()), Ok(key));
    }

    #[test]
    fn a_quote_inside_a_bare_key_is_refused(
        (key, at) in valid_key().prop_flat_map(|k| { let n = k.len(); (Just(k), 0..n) })
    ) {
        // Not at the start: a leading quote makes it an sf-string.
        let mut bytes = format!("k{key}").into_bytes();
        bytes.truncate(MAX_KEY_LEN);
        let at = (at + 1).min(bytes.len() - 1);
        bytes[at] = b'"';
        prop_assert!(IdempotencyKey::parse(&bytes).is_err());
    }

    #[test]
    fn keys_longer_than_the_limit_are_refused_bare_and_quoted(
        key in vec(0x21u8..=0x7e, MAX_KEY_LEN + 1..MAX_KEY_LEN * 3)
            .prop_map(|b| String::from_utf8(b).unwrap())
    ) {
        prop_assert!(IdempotencyKey::parse(key.as_bytes()).is_err());
        prop_assert!(IdempotencyKey::parse(sf_quote(&key).as_bytes()).is_err());
    }

    #[test]
    fn any_bytes_parse_to_an_error_or_a_valid_key(bytes in vec(any::<u8>(), 0..600)) {
        if let Ok(key) = IdempotencyKey::parse(&bytes) {
            assert_valid(&key)?;
        }
    }

    #[test]
    fn near_grammar_inputs_parse_to_an_error_or_a_valid_key(bytes in keyish()) {
        if let Ok(key) = IdempotencyKey::parse(&bytes) {
            assert_valid(&key)?;
            if bytes.first() != Some(&b'"') {
                // A bare key is taken as sent; only quoting transforms.
                prop_assert_eq!(key.as_str().as_bytes(), &bytes[..]);
            } else {
                // And a quoted one is exactly its sf-string form.
                let quoted = sf_quote(key.as_str());
                prop_assert_eq!(quoted.as_bytes(), &bytes[..]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Records.
// ---------------------------------------------------------------------------------------------

fn header_name() -> impl Strategy<Value = HeaderName> {
    "[a-z0-9!#$%&'*+.^_`|~-]{1,40}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
}

/// Every byte a header value may hold: visible ASCII, space, tab and obs-text.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![0x20u8..=0x7e, 0x80u8..=0xff, Just(b'\t')];
    vec(byte, 0..80).prop_map(|v| HeaderValue::from_bytes(&v).unwrap())
}

fn record() -> impl Strategy<Value = CompletedRecord> {
    (
        any::<[u8; 32]>(),
        100u16..=999,
        vec((header_name(), header_value()), 0..24),
        vec(any::<u8>(), 0..2048),
        any::<bool>(),
    )
        .prop_map(|(fingerprint, status, pairs, body, omitted)| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(name, value); // repeated names keep every value, in order
            }
            let record = CompletedRecord::new(
                Fingerprint::from_bytes(fingerprint),
                StatusCode::from_u16(status).unwrap(),
                std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
            )
            .with_headers(headers);
            if omitted {
                record.with_body_omitted()
            } else {
                record.with_body(Bytes::from(body))
            }
        })
}

/// The encoding of a record without headers or body: its fixed head, which ends with the
/// header count (so this stays true whatever fields the head holds before it).
fn head_of(fingerprint: [u8; 32], status: u16, omitted: bool) -> Vec<u8> {
    let record = CompletedRecord::new(
        Fingerprint::from_bytes(fingerprint),
        StatusCode::from_u16(status).unwrap(),
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    );
    if omitted {
        record.with_body_omitted()
    } else {
        record
    }
    .encode()
}

/// Byte strings shaped like a completed record up to its header count (a valid head), then an
/// arbitrary count and anything after it: the decoder's deep paths.
fn record_shaped() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<[u8; 32]>(),
        any::<bool>(),
        100u16..=999,
        any::<u16>(),
        vec(any::<u8>(), 0..512),
    )
        .prop_map(|(fingerprint, omitted, status, count, tail)| {
            let mut out = head_of(fingerprint, status, omitted);
            let at = out.len() - 2;
            out[at..].copy_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&tail);
            out
        })
}

/// Decodes, and if that succeeds, checks the record re-encodes to something that decodes to
/// the same record.
fn decode_is_stable(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    if let Ok(record) = CompletedRecord::decode(Bytes::from(bytes)) {
        let again = CompletedRecord::decode(Bytes::from(record.encode()));
        prop_assert_eq!(again.as_ref(), Ok(&record));
        prop_assert!(!record.body_omitted || record.body.is_empty());
    }
    Ok(())
}

proptest! {
    #[test]
    fn every_record_round_trips(record in record()) {
        let encoded = record.encode();
        prop_assert_eq!(encoded.len(), record.encoded_len());
        let decoded = CompletedRecord::decode(Bytes::from(encoded)).unwrap();
        for name in record.headers.keys() {
            let want: Vec<_> = record.headers.get_all(name).iter().collect();
            let got: Vec<_> = decoded.headers.get_all(name).iter().collect();
            prop_assert_eq!(got, want, "values of {}", name);
        }
        prop_assert_eq!(decoded, record);
    }

    #[test]
    fn decoding_any_bytes_never_panics(bytes in vec(any::<u8>(), 0..600)) {
        decode_is_stable(bytes)?;
    }

    #[test]
    fn decoding_record_shaped_bytes_never_panics(bytes in record_shaped()) {
        decode_is_stable(bytes)?;
    }

    #[test]
    fn decoding_a_damaged_record_never_panics(
        record in record(),
        cut in any::<prop::sample::Index>(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut bytes = record.encode();
        for (at, xor) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        decode_is_stable(bytes)?;
    }

    #[test]
    fn a_record_cut_in_its_head_or_headers_is_an_error(
        record in record(),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = record.encode();
        let head_and_headers = bytes.len() - record.body.len();
        let cut = cut.index(head_and_headers);
        prop_assert!(CompletedRecord::decode(Bytes::copy_from_slice(&bytes[..cut])).is_err());
    }
}

/// A header count above what a `HeaderMap` can hold (a damaged or foreign record) must be a
/// decode error, not a panic: the store hands `decode` whatever the key holds.
#[test]
fn a_huge_header_count_is_an_error_not_a_panic() {
    for count in [24_577u16, 32_768, u16::MAX] {
        let mut bytes = head_of([0; 32], 200, false);
        let at = bytes.len() - 2;
        bytes[at..].copy_from_slice(&count.to_le_bytes());
        let result = std::panic::catch_unwind(|| CompletedRecord::decode(Bytes::from(bytes)));
        match result {
            Ok(decoded) => assert!(decoded.is_err(), "count {count}: {decoded:?}"),
            Err(_) => panic!("CompletedRecord::decode panicked on a header count of {count}"),
        }
    }
}
