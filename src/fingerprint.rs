//! The request fingerprint: a digest of what makes two requests "the same request".

#[cfg(feature = "json")]
mod json;
mod spec;

use http::{Method, Uri};

use crate::varint::{MAX_VARINT, write_varint};

pub use spec::FingerprintSpec;

/// A 256-bit BLAKE3 digest of a request's method, path and query, and body (by default; see
/// [`FingerprintSpec`] for narrower choices).
///
/// Two requests with the same key but different fingerprints are a client error (`422`): the key
/// was reused for a different operation. Headers are not part of the fingerprint, so a retry
/// through a proxy that adds or reorders headers is still recognised as the same request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub(crate) [u8; 32]);

impl Fingerprint {
    /// Computes the fingerprint of a request from its parts and its complete body.
    pub fn of(method: &Method, uri: &Uri, body: &[u8]) -> Self {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        // Each field is length-prefixed, so no two different requests hash the same input.
        let fields = [method.as_str().as_bytes(), path_and_query.as_bytes(), body];
        Self(*digest_fields(&fields).as_bytes())
    }

    /// The fingerprint's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a fingerprint from bytes previously obtained with [`Fingerprint::as_bytes`].
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// BLAKE3 of `fields`, each but the last preceded by its length (unsigned LEB128: one byte below
/// 128), the last running to the end of the input.
///
/// For a given number of fields no two lists give the same input: the lengths delimit every
/// field but the last, and the last is what remains. (Where the number of fields varies, as in
/// the scope key with and without a caller, a marker field before the optional one tells them
/// apart.) Short lengths take one byte, so a scope key for a short route and a 36-character key
/// is about 45 bytes: one BLAKE3 block, one compression.
///
/// Short inputs (the usual case: a scope key, a small JSON body) are laid out in one stack buffer
/// and hashed with a single call, which costs far less than many small `update`s; longer ones are
/// fed to a [`blake3::Hasher`] piece by piece, the same byte stream.
pub(crate) fn digest_fields(fields: &[&[u8]]) -> blake3::Hash {
    let Some((last, rest)) = fields.split_last() else {
        return blake3::hash(&[]);
    };
    // At most this long: each length takes one byte below 128, up to `MAX_VARINT`.
    let total = fields.iter().map(|f| f.len()).sum::<usize>() + MAX_VARINT * rest.len();
    // Two sizes of buffer, so the usual short input does not pay for zeroing the larger one.
    if total <= 256 {
        digest_inline::<256>(rest, last)
    } else if total <= 1024 {
        digest_inline::<1024>(rest, last)
    } else {
        let mut hasher = blake3::Hasher::new();
        let mut len = [0u8; MAX_VARINT];
        for field in rest {
            let n = write_varint(&mut len, field.len() as u64);
            hasher.update(&len[..n]);
            hasher.update(field);
        }
        hasher.update(last);
        hasher.finalize()
    }
}

fn digest_inline<const N: usize>(rest: &[&[u8]], last: &[u8]) -> blake3::Hash {
    let mut buf = [0u8; N];
    let mut at = 0;
    for field in rest {
        at += write_varint(&mut buf[at..], field.len() as u64);
        buf[at..at + field.len()].copy_from_slice(field);
        at += field.len();
    }
    buf[at..at + last.len()].copy_from_slice(last);
    at += last.len();
    blake3::hash(&buf[..at])
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differs_by_each_component() {
        let base = Fingerprint::of(&Method::POST, &"/a?x=1".parse().unwrap(), b"body");
        assert_eq!(
            base,
            Fingerprint::of(&Method::POST, &"/a?x=1".parse().unwrap(), b"body")
        );
        assert_ne!(
            base,
            Fingerprint::of(&Method::PUT, &"/a?x=1".parse().unwrap(), b"body")
        );
        assert_ne!(
            base,
            Fingerprint::of(&Method::POST, &"/b?x=1".parse().unwrap(), b"body")
        );
        assert_ne!(
            base,
            Fingerprint::of(&Method::POST, &"/a?x=2".parse().unwrap(), b"body")
        );
        assert_ne!(
            base,
            Fingerprint::of(&Method::POST, &"/a?x=1".parse().unwrap(), b"bodY")
        );
    }

    /// The input as the doc of `digest_fields` describes it, built independently: LEB128 by
    /// repeated division, every field but the last prefixed.
    fn reference_input(fields: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, field) in fields.iter().enumerate() {
            if i + 1 < fields.len() {
                let mut n = field.len();
                loop {
                    let low = (n % 128) as u8;
                    n /= 128;
                    if n == 0 {
                        out.push(low);
                        break;
                    }
                    out.push(low + 128);
                }
            }
            out.extend_from_slice(field);
        }
        out
    }

    /// The one-buffer paths and the streaming path hash the same byte stream, the documented
    /// one, so digests (and the store keys and records built on them) do not depend on the
    /// input's size.
    #[test]
    fn digest_fields_hashes_the_documented_input() {
        let big = vec![7u8; 20_000];
        // The buffer is chosen by the longest the input could be: 12 bytes of method and path,
        // the body, and room for two 10-byte lengths. A 224-byte body is the longest for the
        // small buffer, a 992-byte one the longest hashed in one call.
        for body_len in [0, 1, 100, 223, 224, 225, 991, 992, 993, 5000] {
            let fields: [&[u8]; 3] = [b"POST", b"/pay?x=1", &big[..body_len]];
            assert_eq!(
                digest_fields(&fields),
                blake3::hash(&reference_input(&fields)),
                "body {body_len}"
            );
        }
        // Lengths of two and three bytes, in each path.
        for first in [127, 128, 200, 16_383, 16_384] {
            for last in [0, 10, 900, 2000] {
                let fields: [&[u8]; 3] = [&big[..first], b"", &big[..last]];
                assert_eq!(
                    digest_fields(&fields),
                    blake3::hash(&reference_input(&fields)),
                    "first {first}, last {last}"
                );
            }
        }
        assert_eq!(digest_fields(&[]), blake3::hash(&[]));
        assert_eq!(digest_fields(&[b"only"]), blake3::hash(b"only"));
    }

    /// The layout spelled out byte by byte: store keys and stored fingerprints depend on it, so
    /// a change to it must be deliberate (records written before it would no longer be found).
    #[test]
    fn digest_input_layout() {
        let fields: [&[u8]; 4] = [b"/pay", b"", b"\x00", b"key-1"];
        assert_eq!(
            digest_fields(&fields),
            blake3::hash(b"\x04/pay\x00\x01\x00key-1")
        );
        let long = [b'a'; 300];
        // 300 = 0b10_0101100: 0xac (low seven bits, continued), then 0x02.
        let mut expected = vec![0xac, 0x02];
        expected.extend_from_slice(&long);
        expected.extend_from_slice(b"tail");
        assert_eq!(digest_fields(&[&long, b"tail"]), blake3::hash(&expected));
    }

    #[test]
    fn host_is_not_part_of_it() {
        let a = Fingerprint::of(&Method::POST, &"http://a.example/p".parse().unwrap(), b"");
        let b = Fingerprint::of(&Method::POST, &"/p".parse().unwrap(), b"");
        assert_eq!(a, b);
    }

    #[test]
    fn fields_are_delimited() {
        // Moving bytes between path and body must change the digest.
        let a = Fingerprint::of(&Method::POST, &"/ab".parse().unwrap(), b"c");
        let b = Fingerprint::of(&Method::POST, &"/a".parse().unwrap(), b"bc");
        assert_ne!(a, b);
        // Between any two fields, and with the optional field's marker.
        let fields = |a: &[u8], b: &[u8]| digest_fields(&[a, b, b"\x00", b"key"]);
        assert_ne!(fields(b"/ab", b"c"), fields(b"/a", b"bc"));
        assert_ne!(
            digest_fields(&[b"/a", b"", b"\x00", b"\x01\x03abckey"]),
            digest_fields(&[b"/a", b"", b"\x01", b"abc", b"key"])
        );
    }
}
