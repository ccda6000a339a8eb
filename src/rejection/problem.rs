//! The default rendering of a [`Rejection`]: an RFC 9457 problem details document,
//! `application/problem+json`, whose `type` links to the [`RejectionKind`] variant's docs.

use bytes::Bytes;
use http::Response;

use super::{Rejection, RejectionKind};

/// The base of every problem `type` URI; the variant name is the fragment.
const TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/enum.RejectionKind.html#variant.";

impl RejectionKind {
    fn type_name(&self) -> &'static str {
        match self {
            Self::MissingKey => "MissingKey",
            Self::InvalidKey(_) => "InvalidKey",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::BodyUnreadable => "BodyUnreadable",
            Self::InFlight => "InFlight",
            Self::KeyReused => "KeyReused",
            Self::StoreUnavailable => "StoreUnavailable",
            Self::CorruptRecord => "CorruptRecord",
            Self::LeaseLost => "LeaseLost",
            Self::CommitFailed => "CommitFailed",
            Self::HandlerFailed => "HandlerFailed",
        }
    }
}

impl Rejection {
    /// The default problem+json response.
    pub fn to_response(&self) -> Response<Bytes> {
        let status = self.status();
        let mut body = String::with_capacity(200 + self.detail.len());
        body.push_str("{\"type\":\"");
        body.push_str(TYPE_BASE);
        body.push_str(self.kind.type_name());
        body.push_str("\",\"title\":");
        push_json_string(&mut body, self.kind.title());
        body.push_str(",\"status\":");
        body.push_str(&status.as_u16().to_string());
        body.push_str(",\"detail\":");
        push_json_string(&mut body, &self.detail);
        body.push('}');
        self.response(status, "application/problem+json", body)
    }
}

/// Appends `s` to `out` as a JSON string, quoted and escaped.
pub(super) fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::header;

    use super::*;
    use crate::key::KeyError;

    #[test]
    fn status_table() {
        let cases = [
            (RejectionKind::MissingKey, 400),
            (RejectionKind::InvalidKey(KeyError::Empty), 400),
            (RejectionKind::BodyUnreadable, 400),
            (RejectionKind::PayloadTooLarge, 413),
            (RejectionKind::InFlight, 409),
            (RejectionKind::KeyReused, 422),
            (RejectionKind::StoreUnavailable, 503),
            (RejectionKind::CorruptRecord, 500),
            (RejectionKind::HandlerFailed, 500),
        ];
        for (kind, status) in cases {
            assert_eq!(kind.status().as_u16(), status, "{kind:?}");
            let response = Rejection::new(kind, "x").to_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
        }
    }

    #[test]
    fn body_is_problem_json() {
        let rejection = Rejection::new(RejectionKind::InFlight, "a \"quoted\"\nline\u{1}")
            .with_retry_after(Duration::from_millis(2500));
        let response = rejection.to_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(json["status"], 409);
        assert_eq!(json["title"], "Request already in progress");
        assert_eq!(json["detail"], "a \"quoted\"\nline\u{1}");
        assert!(
            json["type"]
                .as_str()
                .unwrap()
                .ends_with("#variant.InFlight")
        );
    }
}
