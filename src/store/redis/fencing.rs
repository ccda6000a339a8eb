//! Fencing renew and complete: the native `SET .. IFEQ` where the server has it, else the
//! script; which one, asked once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::RedisError;
use redis::aio::ConnectionLike;

use super::command::{Key, REPLACE, command, is_refusal, millis};
use super::{RedisStore, RedisToken};
use crate::clock::unix_ms;
use crate::record::RunningRecord;
use crate::store::{Attempt, StoreError};

/// The key (after the prefix) that [`RedisStore::detect_fencing`] sends its probe to. Never
/// written: the layer's keys are 32 hex digits.
const FENCING_PROBE: &str = "fencing-probe";

/// How a [`RedisStore`] fences renew and complete, so that an attempt that lost its lease
/// cannot overwrite the entry of another ([`RedisStore::fencing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fencing {
    /// Not decided yet: renew and complete use the script until a probe has found out (see
    /// [`RedisStore::detect_fencing`]).
    Undecided,
    /// Native compare-and-set, `SET key <value> IFEQ <running record> PX <ttl>` (Redis 8.4 and
    /// later): one command that costs Redis about what a plain `SET` does.
    Native,
    /// The `replace.lua` script (`EVALSHA`): for servers without `SET .. IFEQ`, or when chosen
    /// with [`RedisStore::fence_with_script`].
    Script,
}

impl Fencing {
    pub(super) fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Native,
            2 => Self::Script,
            _ => Self::Undecided,
        }
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// How renew and complete are fenced: decided when the store is made with
    /// [`RedisStore::new`] or `RedisStore::cluster`, by [`RedisStore::detect_fencing`], or
    /// set with [`RedisStore::fence_with_script`]. A store made with
    /// [`RedisStore::from_connection`] fences with the script until a probe, sent in the
    /// background on its first renew or complete, has found out.
    pub fn fencing(&self) -> Fencing {
        Fencing::from_u8(self.fencing.load(Ordering::Relaxed))
    }

    /// Asks the server whether it has the native compare-and-set (`SET .. IFEQ`, Redis 8.4 and
    /// later, Valkey 8.1 and later) and fences with it from then on, or with the script if not.
    /// One round trip that writes nothing: a `SET .. IFEQ` of a key no entry uses.
    ///
    /// [`RedisStore::new`] and `RedisStore::cluster` call it; call it yourself after
    /// [`RedisStore::from_connection`] to decide before the first request. Leaves a store set
    /// with [`fence_with_script(true)`](RedisStore::fence_with_script) as it is.
    pub async fn detect_fencing(&self) -> Result<Fencing, StoreError> {
        if self.fencing() == Fencing::Script {
            return Ok(Fencing::Script);
        }
        let probe = self.key(FENCING_PROBE);
        let mut cmd = command("SET", 7, probe.len());
        cmd.arg(probe).arg("").arg("IFEQ").arg("").arg("PX").arg(1);
        let mode = match self.query::<redis::Value>(&cmd).await {
            Ok(_) => Fencing::Native,
            Err(err) if is_refusal(&err) => Fencing::Script,
            Err(err) => return Err(StoreError::backend(err)),
        };
        if self.set_fencing(mode) {
            tracing::debug!(fencing = ?mode, "fencing mode decided");
        }
        Ok(mode)
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Replaces the running record the token's attempt owns at `key` with `value`, kept for
    /// `ttl_ms`: natively where the server supports it, else with the script. Returns whether
    /// the attempt still owned it.
    pub(super) async fn replace(
        &self,
        key: Key<'_>,
        token: &RedisToken,
        value: &[u8],
        ttl_ms: u64,
    ) -> Result<bool, RedisError> {
        match self.fencing() {
            Fencing::Native => match self.replace_native(key, token, value, ttl_ms).await {
                // The server stopped accepting `SET .. IFEQ` (a failover to an older server, a
                // proxy): any ERR-coded refusal switches to the script, which every server runs.
                Err(err) if is_refusal(&err) => {
                    if self.set_fencing(Fencing::Script) {
                        tracing::warn!(
                            error = %err,
                            "Redis refused SET .. IFEQ, which it accepted before; \
                             fencing with a script from now on"
                        );
                    }
                }
                other => return other,
            },
            // Not known yet (a store made with `from_connection`): the script, which every server
            // runs, while one probe finds out in the background, never under a request's timeout.
            Fencing::Undecided => self.probe_fencing_in_background(),
            Fencing::Script => {}
        }
        let prefix = RunningRecord::owner_prefix(token.attempt.owner());
        let ttl = ttl_ms.to_string();
        self.eval(&REPLACE, key, &[&prefix, value, ttl.as_bytes()])
            .await
    }

    /// `SET key <value> IFEQ <running record> PX <ttl>`, the running record being the one this
    /// attempt last wrote (its deadline is the token's). If the value there differs, it
    /// is read back: still this attempt's running record (a renewal whose reply was lost wrote a
    /// later deadline), the write is tried again on that exact value; `value` itself (this write,
    /// sent again after its reply was lost), it applied; anything else, the attempt lost the key.
    async fn replace_native(
        &self,
        key: Key<'_>,
        token: &RedisToken,
        value: &[u8],
        ttl_ms: u64,
    ) -> Result<bool, RedisError> {
        let mut expected = Some(running_record_at(&token.attempt, token.deadline_ms).to_vec());
        for _ in 0..3 {
            let current = match expected.take() {
                Some(current) => current,
                None => {
                    let current: Option<Vec<u8>> =
                        self.query(command("GET", 2, key.len()).arg(key)).await?;
                    match current {
                        Some(v) if v == value => return Ok(true),
                        Some(v) if is_running_record_of(&v, &token.attempt) => v,
                        _ => return Ok(false),
                    }
                }
            };
            let mut cmd = command("SET", 7, key.len() + value.len() + current.len());
            cmd.arg(key)
                .arg(value)
                .arg("IFEQ")
                .arg(current)
                .arg("PX")
                .arg(ttl_ms);
            let reply: redis::Value = self.query(&cmd).await?;
            if !matches!(reply, redis::Value::Nil) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`RedisStore::detect_fencing`] for a store being made: a server that cannot answer now
    /// (a read-only replica, a full one) leaves the store undecided, to ask again later.
    pub(super) async fn decide_fencing(&self) {
        if let Err(err) = self.detect_fencing().await {
            tracing::debug!(error = %err, "could not ask Redis about SET .. IFEQ; will ask again");
        }
    }

    /// Starts [`RedisStore::detect_fencing`] in a task of its own, once per store.
    pub(super) fn probe_fencing_in_background(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let store = self.clone();
        runtime.spawn(async move {
            if let Err(err) = store.detect_fencing().await {
                tracing::debug!(error = %err, "could not ask Redis about SET .. IFEQ; will ask again");
                store.probing.store(false, Ordering::Relaxed);
            }
        });
    }

    /// Records the fencing mode; returns whether it changed. Written only on a change, so the
    /// shared flag is not written on every operation.
    fn set_fencing(&self, mode: Fencing) -> bool {
        let mode = mode as u8;
        self.fencing.load(Ordering::Relaxed) != mode
            && self.fencing.swap(mode, Ordering::Relaxed) != mode
    }
}

/// Whether `value` is a running record written for `attempt`.
pub(super) fn is_running_record_of(value: &[u8], attempt: &Attempt) -> bool {
    value.len() == RunningRecord::LEN
        && value.starts_with(&RunningRecord::owner_prefix(attempt.owner()))
}

/// The running record of `attempt` with a deadline `lease` from now, and that deadline.
pub(super) fn running_record(
    attempt: &Attempt,
    lease: Duration,
) -> ([u8; RunningRecord::LEN], u64) {
    let deadline_ms = unix_ms().saturating_add(millis(lease)).max(1);
    (running_record_at(attempt, deadline_ms), deadline_ms)
}

pub(super) fn running_record_at(attempt: &Attempt, deadline_ms: u64) -> [u8; RunningRecord::LEN] {
    RunningRecord {
        owner: *attempt.owner(),
        fingerprint: *attempt.fingerprint(),
        deadline_ms,
    }
    .encode()
}
