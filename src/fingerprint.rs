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
        let mut hasher = blake3::Hasher::new();
        // Each field is length-prefixed, so no two different requests hash the same input.
        for field in [method.as_str().as_bytes(), path_and_query.as_bytes()] {
            hasher.update(&(field.len() as u64).to_le_bytes());
            hasher.update(field);
        }
        hasher.update(&(body.len() as u64).to_le_bytes());
        hasher.update(body);
        Self(*hasher.finalize().as_bytes())
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
