//! The example's configuration, from the environment.

use std::net::SocketAddr;
use std::time::Duration;

/// The largest TTL accepted from the environment: 100 years, far beyond any retry policy and
/// well within what a clock or a Redis `PX` can represent.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Where the idempotency records (and, with Postgres, the stock) are kept.
pub(crate) enum Backend {
    Memory,
    Redis {
        url: String,
    },
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Postgres {
        url: String,
        schema: String,
    },
}

pub(crate) struct Config {
    pub(crate) bind: SocketAddr,
    pub(crate) backend: Backend,
    pub(crate) initial_stock: u64,
    pub(crate) work: Duration,
    pub(crate) hold: Duration,
    pub(crate) key_ttl: Duration,
    pub(crate) lease_ttl: Duration,
}

impl Config {
    pub(crate) fn from_env() -> Result<Self, String> {
        let bind = match var("BIND")? {
            None => SocketAddr::from(([127, 0, 0, 1], 3000)),
            Some(v) => v.parse().map_err(|_| {
                format!("BIND={v:?} is not an address of the form IP:PORT, e.g. 127.0.0.1:3000")
            })?,
        };
        let backend = match (var("REDIS_URL")?, var("DATABASE_URL")?) {
            (Some(_), Some(_)) => {
                return Err("REDIS_URL and DATABASE_URL are both set; set one of them \
                            (Redis or Postgres keeps the records), or neither (memory)"
                    .to_owned());
            }
            (Some(url), None) => Backend::Redis { url },
            (None, Some(url)) => Backend::Postgres {
                url,
                schema: var("DATABASE_SCHEMA")?.unwrap_or_else(|| "public".to_owned()),
            },
            (None, None) => Backend::Memory,
        };
        // The Postgres stock column is a `bigint`.
        let max_stock = match backend {
            Backend::Postgres { .. } => i64::MAX as u64,
            _ => u64::MAX,
        };
        let key_ttl = Duration::from_secs(number("KEY_TTL_SECS", 86_400, 1, MAX_TTL.as_secs())?);
        let lease_ttl = Duration::from_millis(number(
            "LOCK_TTL_MS",
            30_000,
            1,
            MAX_TTL.as_millis() as u64,
        )?);
        Ok(Self {
            bind,
            backend,
            initial_stock: number("INITIAL_STOCK", 100, 0, max_stock)?,
            work: Duration::from_millis(number("WORK_MS", 0, 0, u64::MAX)?),
            hold: Duration::from_millis(number("HOLD_MS", 0, 0, u64::MAX)?),
            key_ttl,
            lease_ttl,
        })
    }
}

/// An environment variable; unset and empty (or blank) are both `None`.
fn var(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v.trim().to_owned())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

/// A whole number from the environment, `default` when unset, within `min..=max`.
fn number(name: &str, default: u64, min: u64, max: u64) -> Result<u64, String> {
    let Some(v) = var(name)? else {
        return Ok(default);
    };
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ if max == u64::MAX => Err(format!(
            "{name}={v:?} is not a whole number of at least {min}"
        )),
        _ => Err(format!(
            "{name}={v:?} is not a whole number between {min} and {max}"
        )),
    }
}
