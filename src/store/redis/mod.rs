//! The Redis store.

mod command;
mod fencing;
mod operator;

pub use fencing::Fencing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::RedisError;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};

use self::command::{CLAIM, Key, RELEASE, command, is_refusal, millis, refuses_writes};
use self::fencing::running_record;
use super::{Attempt, Claim, Fenced, IdempotencyStore, Lookup, StoreError};
use crate::clock::unix_ms;
use crate::record::{CompletedRecord, RunningRecord, Stored};

/// The key prefix used unless [`RedisStore::key_prefix`] sets another.
pub const DEFAULT_KEY_PREFIX: &str = "idempotency:";

/// An [`IdempotencyStore`] on Redis (or any server speaking its protocol, such as Valkey).
///
/// # Layout
///
/// Each scoped key is **one** Redis string, `<prefix><digest>`, where the digest (32 hex
/// characters) is derived by the layer from the scope and the idempotency key. The value is the
/// binary record (see [`CompletedRecord`]); its TTL is the lease while running and the record TTL
/// once completed. No operation touches more than one key, so the layout works unchanged on
/// Redis Cluster; every entry hashes to its own slot.
///
/// # Commands
///
/// | operation | command | round trips |
/// |---|---|---|
/// | claim | `SET key <running> NX PX <lease> GET` (native, Redis ≥ 7.0) | 1 |
/// | renew, complete | `SET key <value> IFEQ <running> PX <ttl>` (native, Redis ≥ 8.4), else `EVALSHA replace.lua` (owner check + `SET .. PX`) | 1 (3 after a lost renewal reply, see below) |
/// | release | `EVALSHA release.lua` (owner check + `DEL`) | 1 |
///
/// The claim needs no script: `SET .. NX GET` either writes the running record or returns the
/// value already there, and the layer decides from it. A native command costs Redis a fraction of
/// a script's CPU. On servers older than 7.0, which reject `NX` with `GET`, the store switches by
/// itself to an equivalent script (`claim.lua`) the first time the server refuses the command.
///
/// Renew and complete are *fenced*: they write only over the running record of the same attempt.
/// On Redis 8.4 and later (and Valkey 8.1 and later) that is the native compare-and-set
/// `SET .. IFEQ`, compared against the exact running record this attempt last wrote (its
/// deadline is kept in the claim's [`RedisToken`]); if that comparison fails, the store reads
/// the value back and retries only when it is still this attempt's running record (a renewal
/// whose reply was lost), so a lost reply never costs the key; that takes two more round trips.
/// On older servers it is `replace.lua`, which checks the owner token with `GETRANGE`. Which one
/// a server takes is asked once, when the store is made ([`RedisStore::detect_fencing`]);
/// [`RedisStore::fencing`] tells which is in use. Release, which only runs when a handler
/// failed, always uses its script.
///
/// # Resending
///
/// A command whose connection turns out to be gone (Redis closed it for being idle, a proxy or
/// a failover reset it) is sent once more on the new connection, within the layer's store
/// timeout. Each operation is safe to send twice, because the second copy recognises the first:
///
/// - a claim that finds this attempt's own running record is this attempt's claim;
/// - a renew or complete that finds exactly the value it writes has applied;
/// - a release that finds nothing to delete has nothing left to do.
///
/// # Refused writes
///
/// When Redis takes no writes (`OOM` under `maxmemory` with `noeviction`, `READONLY` on a
/// replica after a failover), a claim reads the key instead: a completed record is still
/// replayed and a running one still answered `409`; only a new key gets the error (`503`).
/// This costs the extra `GET` only when the claim was refused.
///
/// A first delivery therefore costs two round trips (claim, complete), a replay or a conflict one.
///
/// # Connection
///
/// [`RedisStore::new`] uses a [`ConnectionManager`], which multiplexes requests over one
/// connection and reconnects by itself after Redis restarts. `RedisStore::cluster` (feature
/// `cluster`) connects to Redis Cluster. Any other [`ConnectionLike`] connection that is `Clone`
/// works through [`RedisStore::from_connection`].
#[derive(Clone)]
pub struct RedisStore<C = ConnectionManager> {
    conn: C,
    prefix: Arc<str>,
    claim_script: Arc<AtomicBool>,
    fencing: Arc<AtomicU8>,
    /// Whether a fencing probe has been started (see [`RedisStore::detect_fencing`]).
    probing: Arc<AtomicBool>,
}

/// What [`RedisStore`] remembers about a claim it granted: the attempt, and the deadline of the
/// running record it last wrote for it, which its next renew or complete is fenced on with
/// `SET .. IFEQ`.
#[derive(Clone, Debug)]
pub struct RedisToken {
    attempt: Attempt,
    deadline_ms: u64,
}

impl<C> std::fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("claim_script", &self.claim_script.load(Ordering::Relaxed))
            .field(
                "fencing",
                &Fencing::from_u8(self.fencing.load(Ordering::Relaxed)),
            )
            .finish_non_exhaustive()
    }
}

impl RedisStore<ConnectionManager> {
    /// Connects to Redis through a [`ConnectionManager`] and returns the store.
    ///
    /// The manager tries each connection for at most 2 seconds and keeps reconnecting in the
    /// background after Redis restarts. It sets no response timeout of its own: the layer's
    /// [`store_timeout`](crate::IdempotencyLayer::store_timeout) bounds every operation, waits
    /// for a reconnection included, with one timer per operation instead of two. Calling the
    /// store directly (outside the layer), bound its operations yourself, or build the
    /// connection with a response timeout and use [`RedisStore::from_connection`].
    ///
    /// Fails if the first connection cannot be made.
    pub async fn new(client: redis::Client) -> Result<Self, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(StoreError::backend)?;
        let store = Self::from_connection(conn);
        store.decide_fencing().await;
        Ok(store)
    }
}

#[cfg(feature = "cluster")]
impl RedisStore<redis::cluster_async::ClusterConnection> {
    /// Connects to a Redis Cluster and returns the store (feature `cluster`).
    ///
    /// Every operation touches exactly one key, so each entry lives in one slot and the same
    /// commands and scripts work unchanged; the cluster connection routes each to the slot's
    /// master and follows `MOVED`/`ASK` redirections. Set connection and response timeouts on the
    /// [`ClusterClientBuilder`](redis::cluster::ClusterClientBuilder).
    ///
    /// Do not put a hash tag (`{...}`) in the key prefix: it would send every entry to the same
    /// slot, and so to one node. Entries need no co-location.
    pub async fn cluster(client: redis::cluster::ClusterClient) -> Result<Self, StoreError> {
        let conn = client
            .get_async_connection()
            .await
            .map_err(StoreError::backend)?;
        let store = Self::from_connection(conn);
        store.decide_fencing().await;
        Ok(store)
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over an existing connection.
    pub fn from_connection(conn: C) -> Self {
        Self {
            conn,
            prefix: DEFAULT_KEY_PREFIX.into(),
            claim_script: Arc::new(AtomicBool::new(false)),
            fencing: Arc::new(AtomicU8::new(Fencing::Undecided as u8)),
            probing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets the prefix of every Redis key this store writes, to share a server between
    /// applications or environments.
    ///
    /// Defaults to `"idempotency:"`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self
    }

    /// Claims with `claim.lua` instead of the native `SET .. NX GET`, for servers (or proxies)
    /// that do not support it. Not needed for Redis < 7.0, which is detected by itself.
    ///
    /// Defaults to `false`.
    pub fn claim_with_script(self, enabled: bool) -> Self {
        self.claim_script.store(enabled, Ordering::Relaxed);
        self
    }

    /// Fences renew and complete with `replace.lua` even where the server has `SET .. IFEQ`
    /// (`true`), or lets the store decide from the server (`false`, see
    /// [`RedisStore::detect_fencing`]).
    ///
    /// Defaults to `false`.
    pub fn fence_with_script(self, enabled: bool) -> Self {
        let mode = if enabled {
            Fencing::Script
        } else {
            Fencing::Undecided
        };
        self.fencing.store(mode as u8, Ordering::Relaxed);
        self
    }

    /// The Redis key holding the entry for the layer's scoped `key`.
    pub fn redis_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + key.len());
        out.push_str(&self.prefix);
        out.push_str(key);
        out
    }

    fn key<'a>(&'a self, key: &'a str) -> Key<'a> {
        Key {
            prefix: &self.prefix,
            key,
        }
    }

    async fn claim_value(
        &self,
        key: Key<'_>,
        running: &[u8],
        lease_ms: u64,
    ) -> Result<Option<Bytes>, RedisError> {
        if !self.claim_script.load(Ordering::Relaxed) {
            let mut cmd = command("SET", 7, key.len() + running.len());
            cmd.arg(key)
                .arg(running)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .arg("GET");
            match self.query(&cmd).await {
                // Redis < 7.0 answers "ERR syntax error" to NX with GET; any ERR-coded refusal
                // switches to the script (see `replace`).
                Err(err) if is_refusal(&err) => {
                    if !self.claim_script.swap(true, Ordering::Relaxed) {
                        tracing::debug!(
                            error = %err,
                            "Redis refused SET .. NX GET (a server older than 7.0?); \
                             claiming with a script from now on"
                        );
                    }
                }
                other => return other,
            }
        }
        self.eval(&CLAIM, key, &[running, lease_ms.to_string().as_bytes()])
            .await
    }
}

impl<C> IdempotencyStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    type Token = RedisToken;

    async fn claim(
        &self,
        key: &str,
        attempt: &Attempt,
        lease: Duration,
    ) -> Result<Claim<RedisToken>, StoreError> {
        let key = self.key(key);
        let (running, deadline_ms) = running_record(attempt, lease);
        let existing = match self.claim_value(key, &running, millis(lease)).await {
            Ok(existing) => existing,
            // Redis refuses writes (`OOM` under `maxmemory` with `noeviction`, `READONLY` on a
            // replica): what is there may still be answered. Nothing there, the refusal stands.
            Err(err) if refuses_writes(&err) => {
                let current: Option<Bytes> = self
                    .query(command("GET", 2, key.len()).arg(key))
                    .await
                    .map_err(StoreError::backend)?;
                match current {
                    Some(current) => Some(current),
                    None => return Err(StoreError::backend(err)),
                }
            }
            Err(err) => return Err(StoreError::backend(err)),
        };
        let token = |deadline_ms| RedisToken {
            attempt: *attempt,
            deadline_ms,
        };
        let Some(existing) = existing else {
            return Ok(Claim::Acquired(token(deadline_ms)));
        };
        match Stored::decode(existing)? {
            // This claim, sent again after its reply was lost: it applied the first time.
            Stored::Running(r) if r.owner == *attempt.owner() => {
                Ok(Claim::Acquired(token(r.deadline_ms)))
            }
            Stored::Running(r) => Ok(Claim::InFlight {
                fingerprint: r.fingerprint,
                retry_after: Duration::from_millis(r.deadline_ms.saturating_sub(unix_ms())),
            }),
            Stored::Completed(record) => Ok(Claim::Completed(record)),
        }
    }

    async fn renew(
        &self,
        key: &str,
        token: &mut RedisToken,
        lease: Duration,
    ) -> Result<Fenced, StoreError> {
        let key = self.key(key);
        let (running, deadline_ms) = running_record(&token.attempt, lease);
        let renewed = self
            .replace(key, token, &running, millis(lease))
            .await
            .map_err(StoreError::backend)?;
        if renewed {
            token.deadline_ms = deadline_ms;
        }
        Ok(fenced(renewed))
    }

    async fn complete(
        &self,
        key: &str,
        token: &RedisToken,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> Result<Fenced, StoreError> {
        let key = self.key(key);
        let value = record.encode();
        self.replace(key, token, &value, millis(ttl))
            .await
            .map(fenced)
            .map_err(StoreError::backend)
    }

    async fn release(&self, key: &str, attempt: &Attempt) -> Result<Fenced, StoreError> {
        let key = self.key(key);
        let prefix = RunningRecord::owner_prefix(attempt.owner());
        self.eval(&RELEASE, key, &[&prefix])
            .await
            .map(fenced)
            .map_err(StoreError::backend)
    }

    async fn lookup(&self, key: &str) -> Result<Lookup, StoreError> {
        self.lookup_value(key).await
    }

    async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        self.forget_value(key).await
    }
}

fn fenced(applied: bool) -> Fenced {
    if applied {
        Fenced::Applied
    } else {
        Fenced::NotOwner
    }
}
