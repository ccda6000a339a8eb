//! Fingerprints over parts of a JSON body: selected fields, or all but some.
//!
//! The compared material is the selected values re-serialized by `serde_json` (object keys
//! sorted, numbers written one way), so formatting and key order do not matter. A body that is
//! not JSON is compared whole.

use std::sync::Arc;

use http::request;
use serde_json::Value;

use super::spec::{IGNORE_JSON_FIELDS, JSON_FIELDS, NOT_JSON};
use super::{Fingerprint, digest_fields};

/// A dotted path, split into its segments.
pub(super) type Path = Box<[Box<str>]>;

pub(super) fn paths<I, P>(paths: I) -> Arc<[Path]>
where
    I: IntoIterator<Item = P>,
    P: AsRef<str>,
{
    paths
        .into_iter()
        .map(|p| p.as_ref().split('.').map(Into::into).collect())
        .collect()
}

/// The body as a JSON tree, or `None` when it is not JSON or holds a number the tree would not
/// keep exactly.
fn parse(body: &[u8]) -> Option<Value> {
    if !numbers_are_exact(body) {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Whether every number in `body` (outside strings) keeps its value in a `serde_json::Value`,
/// which holds an integer as an `i64` or `u64` and any other number as an `f64` (the crate
/// does not turn on `serde_json`'s `arbitrary_precision` for everyone): integers of up to 18
/// digits (19 when positive), others of up to 15 significant digits and an exponent within
/// ±300. A body with another number is compared whole, so that two bodies that differ in it
/// never look the same.
fn numbers_are_exact(body: &[u8]) -> bool {
    let mut at = 0;
    let mut in_string = false;
    while at < body.len() {
        let byte = body[at];
        if in_string {
            match byte {
                b'\\' => at += 1,
                b'"' => in_string = false,
                _ => {}
            }
            at += 1;
            continue;
        }
        if byte == b'"' {
            in_string = true;
            at += 1;
        } else if byte == b'-' || byte.is_ascii_digit() {
            let start = at;
            while at < body.len()
                && matches!(body[at], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
            {
                at += 1;
            }
            if !exact(&body[start..at]) {
                return false;
            }
        } else {
            at += 1;
        }
    }
    true
}

/// See [`numbers_are_exact`]; `number` is one number's text.
fn exact(number: &[u8]) -> bool {
    let mut halves = number.splitn(2, |&b| b == b'e' || b == b'E');
    let mantissa = halves.next().unwrap_or_default();
    let exponent = halves.next();
    let significant = mantissa
        .iter()
        .filter(|b| b.is_ascii_digit())
        .skip_while(|&&b| b == b'0')
        .count();
    if exponent.is_none() && !mantissa.contains(&b'.') {
        let limit = if number.starts_with(b"-") { 18 } else { 19 };
        return significant <= limit;
    }
    let exponent_ok = exponent.is_none_or(|e| {
        let digits: Vec<u8> = e.iter().copied().filter(u8::is_ascii_digit).collect();
        digits.len() <= 3
            && std::str::from_utf8(&digits)
                .ok()
                .and_then(|d| d.parse::<u16>().ok())
                .is_some_and(|e| e <= 300)
    });
    significant <= 15 && exponent_ok
}

/// The method, path and query, and the listed fields' values (or their absence).
pub(super) fn selected(parts: &request::Parts, body: &[u8], paths: &[Path]) -> Fingerprint {
    let Some(mut root) = parse(body) else {
        return not_json(parts, body);
    };
    sort_keys(&mut root);
    // Each value is one field, a `null` (also what an absent field gives) included: the list
    // has the same length for every request, so the fields stay delimited.
    let values: Vec<Vec<u8>> = paths
        .iter()
        .map(|path| {
            let value = find(&root, path).unwrap_or(&Value::Null);
            serde_json::to_vec(value).expect("a JSON value serializes")
        })
        .collect();
    let mut fields: Vec<&[u8]> = vec![JSON_FIELDS, parts.method.as_str().as_bytes()];
    fields.push(path_and_query(parts));
    fields.extend(values.iter().map(Vec::as_slice));
    Fingerprint(*digest_fields(&fields).as_bytes())
}

/// The method, path and query, and the body without the listed fields.
pub(super) fn without(parts: &request::Parts, body: &[u8], paths: &[Path]) -> Fingerprint {
    let Some(mut root) = parse(body) else {
        return not_json(parts, body);
    };
    for path in paths {
        remove(&mut root, path);
    }
    sort_keys(&mut root);
    let rest = serde_json::to_vec(&root).expect("a JSON value serializes");
    let fields: [&[u8]; 4] = [
        IGNORE_JSON_FIELDS,
        parts.method.as_str().as_bytes(),
        path_and_query(parts),
        &rest,
    ];
    Fingerprint(*digest_fields(&fields).as_bytes())
}

fn not_json(parts: &request::Parts, body: &[u8]) -> Fingerprint {
    let fields: [&[u8]; 4] = [
        NOT_JSON,
        parts.method.as_str().as_bytes(),
        path_and_query(parts),
        body,
    ];
    Fingerprint(*digest_fields(&fields).as_bytes())
}

fn path_and_query(parts: &request::Parts) -> &[u8] {
    parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .as_bytes()
}

/// Sorts every object's keys, so that key order never matters (`serde_json`'s maps keep it
/// where an application enables its `preserve_order` feature).
fn sort_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

fn child<'a>(value: &'a Value, segment: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    }
}

fn find<'a>(root: &'a Value, path: &[Box<str>]) -> Option<&'a Value> {
    path.iter()
        .try_fold(root, |value, segment| child(value, segment))
}

/// Removes the field at `path`; an array element becomes `null`, so the rest keep their
/// indices. Nothing happens where the path leads nowhere.
fn remove(root: &mut Value, path: &[Box<str>]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut value = root;
    for segment in parents {
        let next = match value {
            Value::Object(map) => map.get_mut(&**segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        match next {
            Some(next) => value = next,
            None => return,
        }
    }
    match value {
        Value::Object(map) => {
            map.remove(&**last);
        }
        Value::Array(items) => {
            if let Some(item) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                *item = Value::Null;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::FingerprintSpec;

    fn fp(spec: &FingerprintSpec, uri: &str, body: &str) -> crate::Fingerprint {
        let parts = http::Request::post(uri).body(()).unwrap().into_parts().0;
        spec.fingerprint(&parts, body.as_bytes())
    }

    #[test]
    fn json_fields_compare_only_the_listed_fields() {
        let spec = FingerprintSpec::json_fields(["order.id", "amount"]);
        let a = fp(
            &spec,
            "/p",
            r#"{"order":{"id":"o1"},"amount":5,"sent_at":"t1"}"#,
        );
        // Another timestamp, other key order and spacing: the same request.
        let b = fp(
            &spec,
            "/p",
            r#"{ "sent_at":"t2", "amount":5, "order":{"id":"o1","x":1} }"#,
        );
        assert_eq!(a, b);
        assert_ne!(a, fp(&spec, "/p", r#"{"order":{"id":"o2"},"amount":5}"#));
        assert_ne!(a, fp(&spec, "/p", r#"{"order":{"id":"o1"},"amount":6}"#));
        assert_ne!(a, fp(&spec, "/q", r#"{"order":{"id":"o1"},"amount":5}"#));
        // Absent and null are alike; absent and the string "null" are not.
        let absent = fp(&spec, "/p", r#"{"amount":5}"#);
        assert_eq!(
            absent,
            fp(&spec, "/p", r#"{"order":{"id":null},"amount":5}"#)
        );
        assert_ne!(
            absent,
            fp(&spec, "/p", r#"{"order":{"id":"null"},"amount":5}"#)
        );
        // Values cannot slide from one field into the next.
        let two = FingerprintSpec::json_fields(["a", "b"]);
        assert_ne!(
            fp(&two, "/p", r#"{"a":"xy","b":""}"#),
            fp(&two, "/p", r#"{"a":"x","b":"y"}"#)
        );
    }

    #[test]
    fn ignore_json_fields_compares_the_rest() {
        let spec = FingerprintSpec::ignore_json_fields(["sent_at", "meta.trace_id", "items.0"]);
        let a = fp(
            &spec,
            "/p",
            r#"{"sent_at":1,"meta":{"trace_id":"a","v":1},"items":["x","y"],"n":1}"#,
        );
        let b = fp(
            &spec,
            "/p",
            r#"{"n":1,"items":["z","y"],"meta":{"v":1,"trace_id":"b"},"sent_at":2}"#,
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            fp(
                &spec,
                "/p",
                r#"{"sent_at":1,"meta":{"v":2},"items":["x","y"],"n":1}"#
            )
        );
        assert_ne!(
            a,
            fp(
                &spec,
                "/p",
                r#"{"sent_at":1,"meta":{"v":1},"items":["x","w"],"n":1}"#
            )
        );
    }

    #[test]
    fn numbers_a_json_tree_would_round_are_compared_as_written() {
        let spec = FingerprintSpec::json_fields(["amount"]);
        for (a, b) in [
            ("18446744073709551616", "18446744073709551617"),
            ("-9999999999999999999", "-9999999999999999998"),
            ("0.30000000000000001", "0.3"),
            ("1e-400", "2e-400"),
            ("12345678901234567.5", "12345678901234567.0"),
        ] {
            let one = fp(&spec, "/p", &format!(r#"{{"amount":{a},"sent_at":1}}"#));
            let other = fp(&spec, "/p", &format!(r#"{{"amount":{b},"sent_at":1}}"#));
            assert_ne!(one, other, "{a} and {b}");
        }
        // Exact numbers are still compared by value, and other fields still ignored.
        assert_eq!(
            fp(&spec, "/p", r#"{"amount":9223372036854775807,"sent_at":1}"#),
            fp(
                &spec,
                "/p",
                r#"{"sent_at":2, "amount":9223372036854775807}"#
            )
        );
        assert_eq!(
            fp(&spec, "/p", r#"{"amount":0.1,"sent_at":1}"#),
            fp(&spec, "/p", r#"{"amount":0.10,"sent_at":2}"#)
        );
        // A number inside a string is text, not a number.
        assert_eq!(
            fp(
                &spec,
                "/p",
                r#"{"amount":1,"sent_at":"18446744073709551616\"x"}"#
            ),
            fp(&spec, "/p", r#"{"amount":1,"sent_at":"other"}"#)
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_compared_whole() {
        for spec in [
            FingerprintSpec::json_fields(["id"]),
            FingerprintSpec::ignore_json_fields(["id"]),
        ] {
            let a = fp(&spec, "/p", "not json");
            assert_eq!(a, fp(&spec, "/p", "not json"));
            assert_ne!(a, fp(&spec, "/p", "not json!"));
            assert_ne!(a, fp(&spec, "/p", ""));
            assert_ne!(a, fp(&spec, "/q", "not json"));
        }
    }
}
