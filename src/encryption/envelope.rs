//! A sealed record: the status, fingerprint and expiry stay in the clear (the layer and the
//! stores read them); the headers, the body and whether the body was omitted are encoded
//! together and encrypted into the body, and one marker header says so.
//!
//! ```text
//! headers: tower-idempotency-sealed: 1
//! body:    [version: 1][key id: u32 LE][nonce: 24][ciphertext of the inner record + tag: 16]
//! associated data: [DOMAIN][scoped key][status: u16 LE][fingerprint: 32][flags: u8][key id: u32 LE]
//! ```
//!
//! The stored record always has a body (the ciphertext), so it is never marked body-omitted;
//! the inner record carries that flag.

use std::time::UNIX_EPOCH;

use bytes::Bytes;
use chacha20poly1305::XNonce;
use chacha20poly1305::aead::{Aead, Payload};
use http::{HeaderMap, HeaderValue};

use super::KeyRing;
use crate::fingerprint::Fingerprint;
use crate::record::CompletedRecord;
use crate::store::StoreError;

use super::SEALED;
const VERSION: u8 = 1;
const DOMAIN: &[u8] = b"tower-idempotency sealed record v1\0";
const NONCE_LEN: usize = 24;
const PREFIX_LEN: usize = 1 + 4 + NONCE_LEN;

/// Seals `record`'s headers and body with the ring's current key, bound to `scoped`.
pub(super) fn seal(
    ring: &KeyRing,
    scoped: &str,
    record: &CompletedRecord,
) -> Result<CompletedRecord, StoreError> {
    let (id, cipher) = ring.current();
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|err| {
        StoreError::corrupt(format!("no randomness for an encryption nonce: {err}"))
    })?;
    // The crate's own record encoding carries the headers and body; its other fields are
    // placeholders, the real ones stay in the clear.
    let mut inner = CompletedRecord::new(Fingerprint([0; 32]), record.status, UNIX_EPOCH)
        .with_headers(record.headers.clone())
        .with_body(record.body.clone());
    if record.body_omitted {
        inner = inner.with_body_omitted();
    }
    let plain = inner.encode();
    let mut headers = HeaderMap::with_capacity(1);
    headers.insert(SEALED, HeaderValue::from_static("1"));
    let mut out = record.clone().with_headers(headers);
    out.body_omitted = false;
    let aad = associated_data(scoped, &out, id);
    let sealed = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &plain,
                aad: &aad,
            },
        )
        .map_err(|_| StoreError::corrupt("the record could not be encrypted"))?;
    let mut body = Vec::with_capacity(PREFIX_LEN + sealed.len());
    body.push(VERSION);
    body.extend_from_slice(&id.to_le_bytes());
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&sealed);
    out.body = Bytes::from(body);
    Ok(out)
}

/// Opens a record stored under `scoped`. A sealed record opens only with a key of the ring and
/// only under the key it was sealed for; a plaintext one passes only when the ring accepts
/// plaintext, or when no ring is configured.
pub(super) fn open(
    ring: Option<&KeyRing>,
    scoped: &str,
    record: CompletedRecord,
) -> Result<CompletedRecord, StoreError> {
    let sealed = record.headers.contains_key(SEALED);
    let ring = match (ring, sealed) {
        (None, false) => return Ok(record),
        (None, true) => {
            return Err(StoreError::corrupt(
                "the record is encrypted and the layer has no key ring",
            ));
        }
        (Some(ring), false) if ring.accepts_plaintext() => return Ok(record),
        (Some(_), false) => {
            return Err(StoreError::corrupt(
                "the record is not encrypted and the key ring refuses plaintext records",
            ));
        }
        (Some(ring), true) => ring,
    };
    let body = &record.body;
    if body.len() < PREFIX_LEN || body[0] != VERSION {
        return Err(StoreError::corrupt("unknown encrypted record format"));
    }
    let id = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
    let cipher = ring
        .get(id)
        .ok_or_else(|| StoreError::corrupt(format!("no key with id {id} in the key ring")))?;
    let aad = associated_data(scoped, &record, id);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&body[5..PREFIX_LEN]);
    let nonce = &XNonce::from(nonce);
    let plain = cipher
        .decrypt(
            nonce,
            Payload {
                msg: &body[PREFIX_LEN..],
                aad: &aad,
            },
        )
        .map_err(|_| {
            StoreError::corrupt("the record does not decrypt under its key (moved or altered)")
        })?;
    let inner = CompletedRecord::decode(Bytes::from(plain))?;
    let mut out = record;
    out.headers = inner.headers;
    out.body = inner.body;
    out.body_omitted = inner.body_omitted;
    Ok(out)
}

fn associated_data(scoped: &str, record: &CompletedRecord, id: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(DOMAIN.len() + scoped.len() + 2 + 32 + 1 + 4);
    aad.extend_from_slice(DOMAIN);
    aad.extend_from_slice(scoped.as_bytes());
    aad.extend_from_slice(&record.status.as_u16().to_le_bytes());
    aad.extend_from_slice(record.fingerprint.as_bytes());
    aad.push(u8::from(record.body_omitted));
    aad.extend_from_slice(&id.to_le_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn record() -> CompletedRecord {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        CompletedRecord::new(Fingerprint([7; 32]), StatusCode::CREATED, UNIX_EPOCH)
            .with_headers(headers)
            .with_body(Bytes::from_static(b"{\"card\":\"4242\"}"))
    }

    #[test]
    fn a_sealed_record_opens_under_its_key_only() {
        let ring = KeyRing::new(1, [1; 32]);
        let sealed = seal(&ring, "key-a", &record()).unwrap();
        assert!(
            !sealed.body.windows(4).any(|w| w == b"4242"),
            "body in the clear"
        );
        assert_eq!(sealed.headers.len(), 1, "headers in the clear");
        assert_eq!(sealed.status, StatusCode::CREATED);
        assert_eq!(
            open(Some(&ring), "key-a", sealed.clone()).unwrap(),
            record()
        );
        assert!(matches!(
            open(Some(&ring), "key-b", sealed.clone()),
            Err(StoreError::Corrupt(_))
        ));
        let mut restatused = sealed.clone();
        restatused.status = StatusCode::OK;
        assert!(
            open(Some(&ring), "key-a", restatused).is_err(),
            "status is bound"
        );
        assert!(open(None, "key-a", sealed).is_err(), "no ring, no replay");
    }

    #[test]
    fn old_keys_open_and_the_current_key_seals() {
        let old = KeyRing::new(1, [1; 32]);
        let sealed_by_old = seal(&old, "k", &record()).unwrap();
        let rotated = KeyRing::new(2, [2; 32]).with_old(1, [1; 32]);
        assert_eq!(
            open(Some(&rotated), "k", sealed_by_old.clone()).unwrap(),
            record()
        );
        let sealed_by_new = seal(&rotated, "k", &record()).unwrap();
        assert_eq!(sealed_by_new.body[1..5], 2u32.to_le_bytes());
        assert!(
            open(Some(&old), "k", sealed_by_new).is_err(),
            "key 2 unknown"
        );
        let wrong_bytes = KeyRing::new(1, [9; 32]);
        assert!(open(Some(&wrong_bytes), "k", sealed_by_old).is_err());
    }

    #[test]
    fn plaintext_records_pass_only_when_accepted() {
        let ring = KeyRing::new(1, [1; 32]);
        assert!(open(Some(&ring), "k", record()).is_err());
        let migrating = ring.accept_plaintext(true);
        assert_eq!(open(Some(&migrating), "k", record()).unwrap(), record());
        assert_eq!(open(None, "k", record()).unwrap(), record());
    }

    #[test]
    fn debug_shows_ids_not_keys() {
        let ring = KeyRing::new(3, [0xab; 32]).with_old(2, [0xcd; 32]);
        let shown = format!("{ring:?}");
        assert!(
            shown.contains("current_id: 3") && shown.contains("[2]"),
            "{shown}"
        );
        assert!(
            !shown.to_lowercase().contains("ab, ") && !shown.contains("171"),
            "{shown}"
        );
        assert_eq!(KeyRing::key_from_hex(&"ab".repeat(32)), Ok([0xab; 32]));
        assert!(KeyRing::key_from_hex("abc").is_err());
        assert!(KeyRing::key_from_hex(&"zz".repeat(32)).is_err());
    }
}
