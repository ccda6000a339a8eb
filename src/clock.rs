//! The wall clock of record expiries and lease deadlines.

/// Milliseconds since the Unix epoch on this machine's wall clock: the clock of record expiries
/// and lease deadlines, in the store and in the cache alike.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
