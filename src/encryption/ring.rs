//! The keys records are sealed with: one current key, which seals, and older ones, which still
//! open what they sealed.

use std::fmt;

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};

/// The keys that seal stored responses (feature `encryption`): give it to
/// [`IdempotencyLayer::encrypt_with`](crate::IdempotencyLayer::encrypt_with).
///
/// Each key is 32 random bytes with an id of your choosing. The current key seals every new
/// record; a record is opened with whichever key its id names, so rotating is: make the new key
/// current and keep the old one with [`with_old`](Self::with_old) for one record lifetime
/// ([`record_ttl`](crate::IdempotencyLayer::record_ttl)), then drop it.
///
/// Generate a key with `openssl rand -hex 32` and load it from your secret store or an
/// environment variable with [`key_from_hex`](Self::key_from_hex):
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, KeyRing, MemoryStore};
///
/// # unsafe { std::env::set_var("IDEMPOTENCY_KEY_2", "11".repeat(32)) };
/// # unsafe { std::env::set_var("IDEMPOTENCY_KEY_1", "22".repeat(32)) };
/// let current = KeyRing::key_from_hex(&std::env::var("IDEMPOTENCY_KEY_2")?)?;
/// let previous = KeyRing::key_from_hex(&std::env::var("IDEMPOTENCY_KEY_1")?)?;
/// let ring = KeyRing::new(2, current).with_old(1, previous);
/// let layer = IdempotencyLayer::new(MemoryStore::new()).encrypt_with(ring);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Its `Debug` output shows the key ids, never the keys.
#[derive(Clone)]
pub struct KeyRing {
    current: (u32, XChaCha20Poly1305),
    old: Vec<(u32, XChaCha20Poly1305)>,
    accept_plaintext: bool,
}

impl KeyRing {
    /// A ring whose current key, `key`, has id `id`.
    pub fn new(id: u32, key: [u8; 32]) -> Self {
        Self {
            current: (id, XChaCha20Poly1305::new(&key.into())),
            old: Vec::new(),
            accept_plaintext: false,
        }
    }

    /// Adds an older key, which opens the records it sealed but seals none. A key with the
    /// current key's id (or an id already in the ring) replaces nothing: the first one wins,
    /// and a warning is logged, since records sealed with the other key will not open. Give
    /// each key an id of its own.
    pub fn with_old(mut self, id: u32, key: [u8; 32]) -> Self {
        if self.get(id).is_none() {
            self.old.push((id, XChaCha20Poly1305::new(&key.into())));
        } else {
            tracing::warn!(
                key_id = id,
                "a key ring was given two keys with one id; the second is ignored"
            );
        }
        self
    }

    /// Whether a record stored **without** encryption is still replayed: turn this on while
    /// migrating a running deployment to encryption, for one record lifetime, so that records
    /// written before it are replayed rather than refused; then turn it off again. A plaintext
    /// record is bound to no key, so anyone able to write to the store can plant one while
    /// this is on.
    ///
    /// Defaults to `false`: a plaintext record is treated as unreadable (`500`, handler not
    /// run).
    pub fn accept_plaintext(mut self, accept: bool) -> Self {
        self.accept_plaintext = accept;
        self
    }

    /// Reads a 32-byte key written as 64 hexadecimal digits (what `openssl rand -hex 32`
    /// prints); surrounding whitespace is ignored.
    pub fn key_from_hex(hex: &str) -> Result<[u8; 32], InvalidKey> {
        let hex = hex.trim().as_bytes();
        if hex.len() != 64 {
            return Err(InvalidKey);
        }
        let mut key = [0u8; 32];
        for (byte, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
            let digit = |c: u8| char::from(c).to_digit(16).ok_or(InvalidKey);
            *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(key)
    }

    /// The id of the key that seals new records.
    pub fn current_id(&self) -> u32 {
        self.current.0
    }

    pub(super) fn current(&self) -> (u32, &XChaCha20Poly1305) {
        (self.current.0, &self.current.1)
    }

    pub(super) fn get(&self, id: u32) -> Option<&XChaCha20Poly1305> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .find(|(kid, _)| *kid == id)
            .map(|(_, cipher)| cipher)
    }

    pub(super) fn accepts_plaintext(&self) -> bool {
        self.accept_plaintext
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let old: Vec<u32> = self.old.iter().map(|(id, _)| *id).collect();
        f.debug_struct("KeyRing")
            .field("current_id", &self.current.0)
            .field("old_ids", &old)
            .field("accept_plaintext", &self.accept_plaintext)
            .finish_non_exhaustive()
    }
}

/// A key that is not 64 hexadecimal digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidKey;

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an encryption key must be 32 bytes written as 64 hexadecimal digits")
    }
}

impl std::error::Error for InvalidKey {}
