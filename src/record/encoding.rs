//! The binary form of a record, versioned (first byte) and self-describing enough that a
//! corrupted or foreign value is detected and refused instead of replayed.
//!
//! ```text
//! running:   [version][b'R'][owner: 16][fingerprint: 32][lease deadline, unix ms: u64 LE]
//! completed: [version][b'D'][fingerprint: 32][flags: u8][expires, unix ms: u64 LE]
//!            [status: u16 LE][header count: u16 LE, or 0xFFFF then the count as a varint]
//!            { [name len: varint][name][value len: varint][value] } * header count
//!            [body len: varint][body: exactly body len bytes]
//! ```
//!
//! A varint is LEB128: 7 bits a byte, low bits first, the high bit set on every byte but the
//! last. Lengths under 128 take one byte, which keeps a small record in a smaller allocation
//! class of Redis' allocator. The running record is the Redis store's own (`running.rs`).

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::CompletedRecord;
use crate::clock::from_unix_ms;
use crate::fingerprint::Fingerprint;
use crate::varint::{put_varint, varint_len};

/// The encoding version written by this crate.
pub(super) const VERSION: u8 = 1;
/// The tag of a completed record (the second byte; `D` for the name the state once had).
pub(super) const COMPLETED: u8 = b'D';
const FLAG_BODY_OMITTED: u8 = 1;
/// A header count from this value up is written as this value and a varint.
const COUNT_ESCAPE: usize = u16::MAX as usize;

impl CompletedRecord {
    /// The size of [`encode`](Self::encode)'s output, without encoding.
    pub fn encoded_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| {
                let (name, value) = (name.as_str().len(), value.len());
                varint_len(name as u64) + name + varint_len(value as u64) + value
            })
            .sum();
        let body = self.body.len();
        let count = match self.headers.len() {
            n if n < COUNT_ESCAPE => 0,
            n => varint_len(n as u64),
        };
        2 + 32 + 1 + 8 + 2 + 2 + count + headers + varint_len(body as u64) + body
    }

    /// Encodes the record in the crate's versioned binary format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&[VERSION, COMPLETED]);
        out.extend_from_slice(self.fingerprint.as_bytes());
        out.push(if self.body_omitted {
            FLAG_BODY_OMITTED
        } else {
            0
        });
        out.extend_from_slice(&self.expires_at_ms().to_le_bytes());
        out.extend_from_slice(&self.status.as_u16().to_le_bytes());
        // A map holds up to 32,768 names but any number of values under them: counts from
        // 0xFFFF up are escaped.
        let count = self.headers.len();
        if count < COUNT_ESCAPE {
            out.extend_from_slice(&(count as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&u16::MAX.to_le_bytes());
            put_varint(&mut out, count as u64);
        }
        for (name, value) in &self.headers {
            let name = name.as_str().as_bytes();
            put_varint(&mut out, name.len() as u64);
            out.extend_from_slice(name);
            put_varint(&mut out, value.len() as u64);
            out.extend_from_slice(value.as_bytes());
        }
        put_varint(&mut out, self.body.len() as u64);
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes a record written by [`encode`](Self::encode). The body shares `bytes`' buffer.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        r.header(COMPLETED)?;
        let fingerprint = Fingerprint(r.array()?);
        let flags = r.u8()?;
        if flags & !FLAG_BODY_OMITTED != 0 {
            return Err(DecodeError("unknown flags"));
        }
        let expires_at_ms = r.u64()?;
        let status =
            StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError("invalid status code"))?;
        let count = match r.u16()? {
            u16::MAX => r.len()?,
            n => usize::from(n),
        };
        // Each header takes at least 3 bytes (two lengths and a one-byte name); a count the
        // remaining bytes cannot hold is corrupt.
        if count.saturating_mul(3) > bytes.len() - r.pos {
            return Err(DecodeError("header count larger than the record"));
        }
        let mut headers = HeaderMap::new();
        for _ in 0..count {
            let len = r.len()?;
            let name = HeaderName::from_bytes(r.take(len)?)
                .map_err(|_| DecodeError("invalid header name"))?;
            let len = r.len()?;
            let value = HeaderValue::from_bytes(r.take(len)?)
                .map_err(|_| DecodeError("invalid header value"))?;
            headers
                .try_append(name, value)
                .map_err(|_| DecodeError("too many headers"))?;
        }
        // The body length is stored, so a record cut short (or padded) anywhere is refused
        // rather than replayed with a partial body.
        let body_len = r.len()?;
        if body_len != bytes.len() - r.pos {
            return Err(DecodeError("body length does not match the record"));
        }
        let body = bytes.slice(r.pos..);
        let body_omitted = flags & FLAG_BODY_OMITTED != 0;
        if body_omitted && !body.is_empty() {
            return Err(DecodeError("body present on a record marked body-omitted"));
        }
        Ok(Self {
            fingerprint,
            status,
            headers,
            body,
            body_omitted,
            expires_at: from_unix_ms(expires_at_ms),
        })
    }
}

/// A stored value that is not a record this crate wrote (corrupted, truncated, another version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub(super) &'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stored idempotency record is unreadable: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Reads a record's fields in order, each checked against what is left.
pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(DecodeError("record truncated"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    /// A varint length, which must fit in what is left of the record.
    pub(super) fn len(&mut self) -> Result<usize, DecodeError> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= self.buf.len() - self.pos)
                    .ok_or(DecodeError("length beyond the end of the record"));
            }
        }
        Err(DecodeError("varint too long"))
    }

    pub(super) fn header(&mut self, kind: u8) -> Result<(), DecodeError> {
        match self.array()? {
            [VERSION, k] if k == kind => Ok(()),
            [VERSION, _] => Err(DecodeError("unexpected record kind")),
            _ => Err(DecodeError("unknown record version")),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http::header;

    /// A record with a repeated header and a small body.
    pub(in crate::record) fn sample() -> CompletedRecord {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        CompletedRecord::new(
            Fingerprint([7; 32]),
            StatusCode::CREATED,
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_800_000_000_000),
        )
        .with_headers(headers)
        .with_body(Bytes::from_static(b"{\"ok\":true}"))
    }

    #[test]
    fn many_small_headers_round_trip() {
        let mut headers = HeaderMap::new();
        for i in 0..1000 {
            headers.insert(
                HeaderName::try_from(format!("h{i}")).unwrap(),
                HeaderValue::from_static(""),
            );
        }
        let rec = CompletedRecord::new(
            Fingerprint([1; 32]),
            StatusCode::OK,
            std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
        )
        .with_headers(headers);
        let back = CompletedRecord::decode(Bytes::from(rec.encode())).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn completed_round_trip() {
        let rec = sample();
        let bytes = rec.encode();
        assert_eq!(bytes.len(), rec.encoded_len());
        let back = CompletedRecord::decode(Bytes::from(bytes)).unwrap();
        assert_eq!(back, rec);
        let multi: Vec<_> = back.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
    }

    #[test]
    fn varint_lengths_are_read_within_the_record() {
        // A length past the end of the record is refused.
        let mut r = Reader {
            buf: &[5, 1, 2],
            pos: 0,
        };
        assert!(r.len().is_err());
        let mut r = Reader {
            buf: &[2, 1, 2],
            pos: 0,
        };
        assert_eq!(r.len(), Ok(2));
        let mut r = Reader {
            buf: &[0xff; 11],
            pos: 0,
        };
        assert!(r.len().is_err());
    }

    #[test]
    fn huge_header_counts_are_an_error_not_a_panic() {
        // 65535 headers of empty name: invalid names, and more headers than a HeaderMap holds.
        let mut bytes = sample().encode();
        bytes[45..47].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(CompletedRecord::decode(Bytes::from(bytes)).is_err());
        // 40000 distinct valid header names: more than a HeaderMap can hold.
        let mut bytes = sample().encode()[..45].to_vec();
        bytes.extend_from_slice(&40_000u16.to_le_bytes());
        for i in 0..40_000 {
            let name = format!("h{i}");
            put_varint(&mut bytes, name.len() as u64);
            bytes.extend_from_slice(name.as_bytes());
            put_varint(&mut bytes, 0);
        }
        assert!(CompletedRecord::decode(Bytes::from(bytes)).is_err());
    }

    #[test]
    fn stored_header_values_are_checked_as_header_values() {
        let encoded = sample().encode();
        let at = encoded
            .windows(3)
            .position(|w| w == b"one")
            .expect("the sample's value is in the record");
        for (byte, valid) in [
            (b'\n', false),
            (b'\r', false),
            (0u8, false),
            (0x7f, false),
            (b'\t', true),
            (b' ', true),
            (0x80, true),
            (0xff, true),
        ] {
            let mut bytes = encoded.clone();
            bytes[at + 1] = byte;
            let decoded = CompletedRecord::decode(Bytes::from(bytes));
            if valid {
                let record = decoded.unwrap_or_else(|e| panic!("byte {byte:#x}: {e}"));
                let values: Vec<&[u8]> = record
                    .headers
                    .get_all("x-multi")
                    .iter()
                    .map(HeaderValue::as_bytes)
                    .collect();
                assert_eq!(values, [&[b'o', byte, b'e'][..], b"two"], "byte {byte:#x}");
            } else {
                assert_eq!(
                    decoded.err(),
                    Some(DecodeError("invalid header value")),
                    "byte {byte:#x}"
                );
            }
        }
    }

    /// A map holds any number of values under its names: counts that do not fit the u16 field
    /// are escaped, and every value comes back.
    #[test]
    fn header_counts_beyond_u16_round_trip() {
        for values in [0xFFFE_usize, 0xFFFF, 0x1_0000, 70_000] {
            let mut headers = HeaderMap::new();
            for i in 0..values {
                headers.append("x-a", HeaderValue::from(i));
            }
            let record = CompletedRecord::new(
                Fingerprint([3; 32]),
                StatusCode::OK,
                std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
            )
            .with_headers(headers)
            .with_body(Bytes::from_static(b"body"));
            let encoded = record.encode();
            assert_eq!(encoded.len(), record.encoded_len(), "{values}");
            let decoded = CompletedRecord::decode(Bytes::from(encoded)).unwrap();
            assert_eq!(decoded.headers.len(), values);
            assert_eq!(decoded, record, "{values}");
        }
    }
}
