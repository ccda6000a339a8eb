//! The keys of the store: the layer's digests (32 lowercase hex digits) filed as the 128-bit
//! number they spell, any other key as text.

/// A key as a shard files it.
#[derive(Clone, Copy)]
pub(super) enum Key<'a> {
    Digest(u128),
    Named(&'a str),
}

impl<'a> Key<'a> {
    pub(super) fn of(key: &'a str) -> Self {
        digest(key).map_or(Self::Named(key), Self::Digest)
    }
}

/// The number spelled by exactly 32 lowercase hex digits; `None` for any other text (so no two
/// different keys map to the same number).
pub(super) fn digest(key: &str) -> Option<u128> {
    digest_bytes(key.as_bytes().try_into().ok()?)
}

pub(super) fn digest_bytes(bytes: &[u8; 32]) -> Option<u128> {
    let mut n = 0u128;
    for chunk in bytes.as_chunks::<8>().0 {
        n = (n << 32) | u128::from(hex8(u64::from_be_bytes(*chunk))?);
    }
    Some(n)
}

/// The number spelled by eight lowercase hex digits packed in a `u64`, the first digit in the
/// most significant byte; `None` if any byte is not one. All eight bytes at once: a quarter of
/// the instructions of a table lookup per digit.
pub(super) fn hex8(x: u64) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    if x & HIGH != 0 {
        return None;
    }
    // Every byte is below 0x80 and every addend below 0x80, so no sum carries into the next
    // byte, and a byte's high bit says whether it reached the bound.
    let from_0 = x + ONES * (0x80 - u64::from(b'0'));
    let past_9 = x + ONES * (0x7f - u64::from(b'9'));
    let from_a = x + ONES * (0x80 - u64::from(b'a'));
    let past_f = x + ONES * (0x7f - u64::from(b'f'));
    let digit = from_0 & !past_9;
    let letter = from_a & !past_f;
    if (digit | letter) & HIGH != HIGH {
        return None;
    }
    // A digit's value is its low nibble; a letter's ('a' is 0x61) its low nibble plus 9.
    let v = (x & (ONES * 0x0f)) + ((letter & HIGH) >> 7) * 9;
    // Pack the eight nibbles, the first byte's on top.
    let v = (v | (v >> 4)) & 0x00ff_00ff_00ff_00ff;
    let v = (v | (v >> 8)) & 0x0000_ffff_0000_ffff;
    let v = (v | (v >> 16)) & 0x0000_0000_ffff_ffff;
    u32::try_from(v).ok()
}
