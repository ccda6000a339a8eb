//! `CompletedRecord::decode` on arbitrary bytes (what a store may hold under a key): never
//! panics; whatever it accepts re-encodes to bytes that decode to the same record.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tower_idempotency::CompletedRecord;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = CompletedRecord::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    assert!(!record.body_omitted || record.body.is_empty());
    let encoded = record.encode();
    assert_eq!(encoded.len(), record.encoded_len());
    let again = CompletedRecord::decode(Bytes::from(encoded)).expect("a re-encoded record decodes");
    assert_eq!(again, record);
});
