//! What is retried: which answers mean "send the same request again", and when.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header};

use crate::service::IDEMPOTENT_REPLAYED;

/// What an answer asks of the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The answer is final: hand it to the caller.
    Final,
    /// Worth sending again, after the server's `Retry-After` if it gave one.
    Retry { retry_after: Option<Duration> },
}

/// The verdict on a response.
///
/// - A replay (`Idempotent-Replayed: true`) is final whatever its status: the server has an
///   answer for the key, and sending the key again gets the same one.
/// - `429` and `503` are retried; so is `409` on a request that carried a key (the server
///   is still running the first request with it).
/// - Other `5xx` are retried when `server_errors` is set, except `501` and `505`, which no
///   retry changes.
/// - Every other status is final: `400`, `401`, `403`, `404`, `422` and the rest.
pub(crate) fn verdict(
    status: StatusCode,
    headers: &HeaderMap,
    keyed: bool,
    server_errors: bool,
) -> Verdict {
    if replayed(headers) {
        return Verdict::Final;
    }
    let retry = match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => true,
        StatusCode::CONFLICT => keyed,
        StatusCode::NOT_IMPLEMENTED | StatusCode::HTTP_VERSION_NOT_SUPPORTED => false,
        s => s.is_server_error() && server_errors,
    };
    if retry {
        Verdict::Retry {
            retry_after: retry_after(headers, SystemTime::now()),
        }
    } else {
        Verdict::Final
    }
}

/// Whether the response says it is a replay of a stored answer (`Idempotent-Replayed: true`).
pub(crate) fn replayed(headers: &HeaderMap) -> bool {
    headers
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"true"))
}

/// The wait `Retry-After` asks for, in seconds or as an HTTP date (a date in the past is no
/// wait). `None` when absent or unreadable.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // An absurd number of seconds is still "a long time"; the caller's cap applies.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn verdict_table() {
        let retry = Verdict::Retry { retry_after: None };
        let after_2s = Verdict::Retry {
            retry_after: Some(Duration::from_secs(2)),
        };
        let fin = Verdict::Final;
        const RA: &[(&str, &str)] = &[("retry-after", "2")];
        const REPLAY: &[(&str, &str)] = &[("idempotent-replayed", "true"), ("retry-after", "2")];
        // (status, headers, keyed, retry 5xx, verdict)
        type Case = (
            u16,
            &'static [(&'static str, &'static str)],
            bool,
            bool,
            Verdict,
        );
        let cases: &[Case] = &[
            (200, &[], true, true, fin),
            (201, &[], true, true, fin),
            (304, &[], true, true, fin),
            (400, &[], true, true, fin),
            (401, &[], true, true, fin),
            (403, &[], true, true, fin),
            (404, &[], true, true, fin),
            (408, &[], true, true, fin),
            (413, &[], true, true, fin),
            (422, RA, true, true, fin),
            (409, RA, true, true, after_2s),
            (409, &[], true, true, retry),
            (409, RA, false, true, fin),
            (409, REPLAY, true, true, fin),
            (429, RA, true, true, after_2s),
            (429, &[], false, false, retry),
            (503, RA, true, false, after_2s),
            (503, REPLAY, true, true, fin),
            (500, &[], true, true, retry),
            (500, &[], false, true, retry),
            (500, &[], true, false, fin),
            (502, &[], true, true, retry),
            (504, &[], true, true, retry),
            (504, &[], true, false, fin),
            (501, &[], true, true, fin),
            (505, &[], true, true, fin),
            (200, REPLAY, true, true, fin),
        ];
        for (status, pairs, keyed, server_errors, want) in cases {
            let status = StatusCode::from_u16(*status).unwrap();
            let got = verdict(status, &headers(pairs), *keyed, *server_errors);
            assert_eq!(
                got, *want,
                "{status} {pairs:?} keyed={keyed} 5xx={server_errors}"
            );
        }
    }

    #[test]
    fn retry_after_table() {
        // Sun, 06 Nov 1994 08:49:37 GMT, the RFC's example date, as "now".
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("7", Some(7)),
            (" 30 ", Some(30)),
            ("99999999999999999999999", Some(u64::MAX)),
            ("Sun, 06 Nov 1994 08:50:07 GMT", Some(30)),
            ("Sunday, 06-Nov-94 08:50:07 GMT", Some(30)),
            ("Sun Nov  6 08:50:07 1994", Some(30)),
            ("Sun, 06 Nov 1994 08:49:00 GMT", Some(0)),
            ("-1", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
        ];
        for (value, want) in cases {
            let map = headers(&[("retry-after", value)]);
            let got = retry_after(&map, now);
            assert_eq!(got, want.map(Duration::from_secs), "{value:?}");
        }
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn replayed_reads_the_header_loosely() {
        for (value, want) in [
            ("true", true),
            ("True", true),
            (" true ", true),
            ("false", false),
            ("1", false),
        ] {
            assert_eq!(
                replayed(&headers(&[("idempotent-replayed", value)])),
                want,
                "{value}"
            );
        }
        assert!(!replayed(&HeaderMap::new()));
    }
}
