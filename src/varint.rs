//! LEB128 varints: 7 bits a byte, low bits first, the high bit set on every byte but the last.
//! Lengths under 128 take one byte. Used by record encoding and by digest layouts.

/// The most bytes a varint takes (a `u64`).
pub(crate) const MAX_VARINT: usize = 10;

/// Writes `n` as a varint at the start of `out`; returns how many bytes it took.
pub(crate) fn write_varint(out: &mut [u8], mut n: u64) -> usize {
    let mut i = 0;
    while n >= 0x80 {
        out[i] = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    out[i] = n as u8;
    i + 1
}

/// Appends `n` as a varint: the bytes of [`write_varint`], pushed one by one.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// How many bytes `n` takes as a varint.
pub(crate) fn varint_len(n: u64) -> usize {
    (64 - n.max(1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> u64 {
        let mut n = 0;
        for (i, byte) in bytes.iter().enumerate() {
            n |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                assert_eq!(i + 1, bytes.len(), "bytes after the last");
                return n;
            }
        }
        panic!("unterminated varint {bytes:?}")
    }

    #[test]
    fn varints_round_trip_and_size() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(u64::MAX), MAX_VARINT);
        let mut buf = [0u8; MAX_VARINT];
        assert_eq!(write_varint(&mut buf, u64::MAX), MAX_VARINT);
        assert_eq!(buf[MAX_VARINT - 1], 0x01);
        for n in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            assert_eq!(out.len(), varint_len(n), "{n}");
            assert!(out.len() <= MAX_VARINT, "{n}");
            let mut written = [0u8; MAX_VARINT];
            let len = write_varint(&mut written, n);
            assert_eq!(&written[..len], &out[..], "{n}");
            assert_eq!(read(&out), n);
        }
    }
}
