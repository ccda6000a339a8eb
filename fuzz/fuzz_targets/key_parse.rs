//! `IdempotencyKey::parse` on arbitrary bytes: never panics; whatever it accepts is 1 to 255
//! characters of visible ASCII, and parses back to itself from its sf-string form (and from its
//! bare form when it has no quote).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::{IdempotencyKey, MAX_KEY_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(key) = IdempotencyKey::parse(data) else {
        return;
    };
    let s = key.as_str();
    assert!((1..=MAX_KEY_LEN).contains(&s.len()), "length {}", s.len());
    assert!(s.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{s:?}");

    let mut quoted = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    let again = IdempotencyKey::parse(quoted.as_bytes()).expect("the sf-string form parses");
    assert_eq!(again.as_str(), s);
    if !s.contains('"') {
        let bare = IdempotencyKey::parse(s.as_bytes()).expect("the bare form parses");
        assert_eq!(bare.as_str(), s);
    }
});
