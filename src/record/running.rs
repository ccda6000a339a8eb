//! The running record the Redis store writes while an attempt holds a key: owner, fingerprint
//! and lease deadline, 58 bytes. Other stores keep it in their own form.

use bytes::Bytes;

use super::CompletedRecord;
use super::encoding::{COMPLETED, DecodeError, Reader, VERSION};
use crate::fingerprint::Fingerprint;

/// The tag of a running record (the second byte).
const RUNNING: u8 = b'R';

/// A running claim as the Redis store encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunningRecord {
    pub(crate) owner: [u8; 16],
    pub(crate) fingerprint: Fingerprint,
    /// When the lease lapses, in milliseconds since the Unix epoch (the owner's clock).
    pub(crate) deadline_ms: u64,
}

/// The length of the prefix that identifies a running record's owner: version, tag, owner.
pub(crate) const OWNER_PREFIX_LEN: usize = 18;

impl RunningRecord {
    pub(crate) const LEN: usize = OWNER_PREFIX_LEN + 32 + 8;

    pub(crate) fn owner_prefix(owner: &[u8; 16]) -> [u8; OWNER_PREFIX_LEN] {
        let mut out = [0; OWNER_PREFIX_LEN];
        out[0] = VERSION;
        out[1] = RUNNING;
        out[2..].copy_from_slice(owner);
        out
    }

    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..OWNER_PREFIX_LEN].copy_from_slice(&Self::owner_prefix(&self.owner));
        out[OWNER_PREFIX_LEN..OWNER_PREFIX_LEN + 32].copy_from_slice(self.fingerprint.as_bytes());
        out[OWNER_PREFIX_LEN + 32..].copy_from_slice(&self.deadline_ms.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        r.header(RUNNING)?;
        let owner = r.array()?;
        let fingerprint = Fingerprint(r.array()?);
        let deadline_ms = u64::from_le_bytes(r.array()?);
        if r.pos != bytes.len() {
            return Err(DecodeError("trailing bytes after a running record"));
        }
        Ok(Self {
            owner,
            fingerprint,
            deadline_ms,
        })
    }
}

/// Either kind of stored value, as read back from a store that keeps encoded bytes.
#[derive(Debug)]
pub(crate) enum Stored {
    Running(RunningRecord),
    Completed(CompletedRecord),
}

impl Stored {
    pub(crate) fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        match bytes.get(..2) {
            Some([VERSION, RUNNING]) => RunningRecord::decode(&bytes).map(Self::Running),
            Some([VERSION, COMPLETED]) => CompletedRecord::decode(bytes).map(Self::Completed),
            Some([VERSION, _]) => Err(DecodeError("unknown record kind")),
            Some(_) => Err(DecodeError("unknown record version")),
            None => Err(DecodeError("record too short")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::encoding::tests::sample;

    #[test]
    fn running_round_trip() {
        let rec = RunningRecord {
            owner: [3; 16],
            fingerprint: Fingerprint([9; 32]),
            deadline_ms: 1_700_000_000_123,
        };
        let bytes = rec.encode();
        assert_eq!(
            &bytes[..OWNER_PREFIX_LEN],
            &RunningRecord::owner_prefix(&[3; 16])
        );
        assert_eq!(RunningRecord::decode(&bytes).unwrap(), rec);
        match Stored::decode(Bytes::copy_from_slice(&bytes)).unwrap() {
            Stored::Running(r) => assert_eq!(r, rec),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            let res = Stored::decode(Bytes::copy_from_slice(&bytes[..cut]));
            assert!(res.is_err(), "cut at {cut} decoded: {res:?}");
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for garbage in [
            &b""[..],
            b"x",
            b"hello world",
            b"\x02D",
            b"\x01Z0000",
            b"\x01R",
        ] {
            assert!(
                Stored::decode(Bytes::from_static(garbage)).is_err(),
                "{garbage:?}"
            );
        }
        let mut bytes = sample().encode();
        bytes[34] = 0xff; // flags
        assert!(Stored::decode(Bytes::from(bytes)).is_err());
        let mut bytes = sample().encode();
        bytes[43..45].copy_from_slice(&42u16.to_le_bytes()); // status 42
        assert!(Stored::decode(Bytes::from(bytes)).is_err());
    }
}
