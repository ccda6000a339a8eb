//! The SQL of one table, built once from validated identifiers.

use std::sync::Arc;

/// The statements for one table, built once from validated identifiers.
pub(super) struct Statements {
    pub(super) schema: String,
    pub(super) table: String,
    pub(super) claim: Arc<str>,
    pub(super) renew: Arc<str>,
    pub(super) complete: Arc<str>,
    pub(super) release: Arc<str>,
    pub(super) purge: Arc<str>,
    pub(super) lookup: Arc<str>,
    pub(super) forget: Arc<str>,
}

impl Statements {
    pub(super) fn new(schema: &str, table: &str) -> Self {
        let t = format!("\"{schema}\".\"{table}\"");
        // `live` reads the row that holds the key, if it is not expired; only when there is
        // none does the INSERT run, so a replay or an in-flight duplicate takes no row lock.
        // The INSERT claims an absent or expired key. Under READ COMMITTED `live` uses the
        // statement's snapshot, so a claim another attempt committed meanwhile can be missing
        // from it while the INSERT, which sees it, leaves it alone: the statement then returns
        // no row, and the caller runs it again.
        let claim = format!(
            "WITH live AS (
                SELECT owner, fingerprint, record, expires_at FROM {t}
                WHERE key = $1 AND expires_at > clock_timestamp()
            ),
            claimed AS (
                INSERT INTO {t} AS e (key, owner, fingerprint, record, expires_at)
                SELECT $1, $2, $3, NULL, clock_timestamp() + $4 * interval '1 millisecond'
                WHERE NOT EXISTS (SELECT 1 FROM live)
                ON CONFLICT (key) DO UPDATE
                    SET owner = EXCLUDED.owner, fingerprint = EXCLUDED.fingerprint,
                        record = NULL, expires_at = EXCLUDED.expires_at
                    WHERE e.expires_at <= clock_timestamp()
                RETURNING e.key
            )
            SELECT true AS acquired, NULL::bytea AS owner, NULL::bytea AS fingerprint,
                   NULL::bytea AS record, 0::int8 AS left_ms
            FROM claimed
            UNION ALL
            SELECT false, owner, fingerprint, record,
                   (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::int8
            FROM live"
        );
        let renew = format!(
            "UPDATE {t} SET expires_at = clock_timestamp() + $3 * interval '1 millisecond'
             WHERE key = $1 AND owner = $2 AND record IS NULL AND expires_at > clock_timestamp()"
        );
        let complete = format!(
            "UPDATE {t} SET record = $3, expires_at = clock_timestamp() + $4 * interval '1 millisecond'
             WHERE key = $1 AND owner = $2 AND (record IS NULL OR record = $3)"
        );
        let release = format!("DELETE FROM {t} WHERE key = $1 AND owner = $2 AND record IS NULL");
        let purge = format!(
            "DELETE FROM {t} WHERE key IN (
                SELECT key FROM {t} WHERE expires_at < clock_timestamp() LIMIT $1
                FOR UPDATE SKIP LOCKED)"
        );
        // The operator's read (the columns `held` reads) and delete of a completed record.
        let lookup = format!(
            "SELECT owner, fingerprint, record,
                    (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::int8 AS left_ms
             FROM {t} WHERE key = $1 AND expires_at > clock_timestamp()"
        );
        let forget = format!(
            "DELETE FROM {t}
             WHERE key = $1 AND record IS NOT NULL AND expires_at > clock_timestamp()"
        );
        Self {
            schema: schema.to_owned(),
            table: table.to_owned(),
            claim: claim.into(),
            renew: renew.into(),
            complete: complete.into(),
            release: release.into(),
            purge: purge.into(),
            lookup: lookup.into(),
            forget: forget.into(),
        }
    }

    /// The statements that create the schema, the table and its expiry index.
    pub(super) fn ddl(&self) -> Vec<String> {
        let (schema, table) = (&self.schema, &self.table);
        let t = format!("\"{schema}\".\"{table}\"");
        vec![
            format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (\n    \
                 key text PRIMARY KEY,\n    \
                 owner bytea NOT NULL,\n    \
                 fingerprint bytea NOT NULL,\n    \
                 record bytea,\n    \
                 expires_at timestamptz NOT NULL\n)"
            ),
            format!("CREATE INDEX IF NOT EXISTS \"{table}_expires_at\" ON {t} (expires_at)"),
        ]
    }
}

/// A schema or table name that is not a plain SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidIdentifier(String);

impl std::fmt::Display for InvalidIdentifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} is not a plain SQL identifier (ASCII letters, digits and `_`, not starting \
             with a digit, at most 63 bytes)",
            self.0
        )
    }
}

impl std::error::Error for InvalidIdentifier {}

pub(super) fn identifier(name: &str) -> Result<&str, InvalidIdentifier> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plain {
        Ok(name)
    } else {
        Err(InvalidIdentifier(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_accepted() {
        for ok in ["idempotency_keys", "_x", "a1", "Schema"] {
            assert_eq!(identifier(ok), Ok(ok));
        }
        for bad in ["", "1a", "a-b", "a\"b", "a b", "é", &"x".repeat(64)] {
            assert!(identifier(bad).is_err(), "{bad:?}");
        }
    }
}
