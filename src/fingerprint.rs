//! The request fingerprint: a digest of what makes two requests "the same request".

use http::{Method, Uri};

/// A 256-bit BLAKE3 digest of a request's method, path and query, and body.
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

/// BLAKE3 of `fields`, each preceded by its length as a little-endian `u64`.
///
/// The digest is the same as feeding each length and field to a [`blake3::Hasher`] in turn; short
/// inputs (the usual case: a scope key, a small JSON body) are laid out in one stack buffer and
/// hashed with a single call, which costs far less than many small `update`s.
pub(crate) fn digest_fields(fields: &[&[u8]]) -> blake3::Hash {
    let total: usize = fields.iter().map(|f| 8 + f.len()).sum();
    // Two sizes of buffer, so the usual short input does not pay for zeroing the larger one.
    if total <= 256 {
        digest_inline::<256>(fields, total)
    } else if total <= 1024 {
        digest_inline::<1024>(fields, total)
    } else {
        let mut hasher = blake3::Hasher::new();
        for field in fields {
            hasher.update(&(field.len() as u64).to_le_bytes());
            hasher.update(field);
        }
        hasher.finalize()
    }
}

fn digest_inline<const N: usize>(fields: &[&[u8]], total: usize) -> blake3::Hash {
    let mut buf = [0u8; N];
    let mut at = 0;
    for field in fields {
        buf[at..at + 8].copy_from_slice(&(field.len() as u64).to_le_bytes());
        at += 8;
        buf[at..at + field.len()].copy_from_slice(field);
        at += field.len();
    }
    debug_assert_eq!(at, total);
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

    /// The one-buffer path and the streaming path give the digest of the same byte stream, so
    /// digests (and stored records) do not depend on the input's size.
    #[test]
    fn digest_fields_matches_streaming() {
        let reference = |fields: &[&[u8]]| {
            let mut hasher = blake3::Hasher::new();
            for field in fields {
                hasher.update(&(field.len() as u64).to_le_bytes());
                hasher.update(field);
            }
            hasher.finalize()
        };
        let big = vec![7u8; 5000];
        // The fields add 36 bytes of lengths, method and path: a 220-byte body makes exactly
        // 256, the largest input of the small buffer, and a 988-byte body 1024, the largest
        // input hashed in one call.
        for body_len in [0, 1, 100, 219, 220, 221, 987, 988, 989, 1024, 5000] {
            let fields: [&[u8]; 3] = [b"POST", b"/pay?x=1", &big[..body_len]];
            assert_eq!(
                digest_fields(&fields),
                reference(&fields),
                "body {body_len}"
            );
        }
        assert_eq!(digest_fields(&[]), reference(&[]));
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
    }
}
