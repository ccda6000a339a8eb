//! The wall clock of record expiries and lease deadlines, in milliseconds since the Unix epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch on this machine's wall clock: the clock of record expiries
/// and lease deadlines, in the store and in the cache alike.
#[cfg(any(feature = "redis", feature = "cache"))]
pub(crate) fn unix_ms() -> u64 {
    unix_ms_of(SystemTime::now())
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `ms` milliseconds after the Unix epoch.
pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}
