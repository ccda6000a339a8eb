//! Sending commands: the scripts, the key argument, resending after a lost connection, and
//! the errors the store tells apart.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind};

use super::RedisStore;

/// A Lua script and its SHA-1, computed once.
pub(super) struct Lua {
    source: &'static str,
    script: LazyLock<Script>,
}

macro_rules! lua {
    ($file:literal) => {
        Lua {
            source: include_str!($file),
            script: LazyLock::new(|| Script::new(include_str!($file))),
        }
    };
}

pub(super) static REPLACE: Lua = lua!("lua/replace.lua");
pub(super) static RELEASE: Lua = lua!("lua/release.lua");
pub(super) static CLAIM: Lua = lua!("lua/claim.lua");
pub(super) static FORGET: Lua = lua!("lua/forget.lua");

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Sends `cmd`; if its connection turns out to be gone (Redis closed it for being idle, a
    /// proxy or a failover reset it), sends it once more on the connection the manager makes in
    /// its place. Every command this store sends is safe to send twice (see "Resending" above).
    pub(super) async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisError> {
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Err(err) if err.is_connection_dropped() || err.is_unrecoverable_error() => {
                tracing::debug!(error = %err, "Redis connection lost; sending the command again");
                cmd.query_async(&mut conn).await
            }
            other => other,
        }
    }

    /// Runs a script by its hash, sending its source once if the server does not have it.
    pub(super) async fn eval<T: redis::FromRedisValue>(
        &self,
        lua: &Lua,
        key: Key<'_>,
        args: &[&[u8]],
    ) -> Result<T, RedisError> {
        let build = |verb: &str, body: &str| {
            let data =
                verb.len() + body.len() + key.len() + args.iter().map(|a| a.len()).sum::<usize>();
            let mut cmd = command(verb, 4 + args.len(), data);
            cmd.arg(body).arg(1).arg(key);
            for arg in args {
                cmd.arg(*arg);
            }
            cmd
        };
        match self.query(&build("EVALSHA", lua.script.get_hash())).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // EVAL runs the script and caches it, so the next EVALSHA finds it.
                self.query(&build("EVAL", lua.source)).await
            }
            other => other,
        }
    }
}

/// The Redis key of an entry, `<prefix><scoped key>`, written into a command as one argument
/// without first being joined into a `String`.
#[derive(Clone, Copy)]
pub(super) struct Key<'a> {
    pub(super) prefix: &'a str,
    pub(super) key: &'a str,
}

impl Key<'_> {
    pub(super) fn len(self) -> usize {
        self.prefix.len() + self.key.len()
    }
}

impl redis::ToRedisArgs for Key<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing to a command's buffer cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.key.as_bytes());
    }
}

/// A command with room for `args` arguments (the name included) and `data` bytes of them plus
/// a few short options and numbers, so that adding them never reallocates.
pub(super) fn command(name: &str, args: usize, data: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(args, name.len() + data + 32);
    cmd.arg(name);
    cmd
}

/// Whether the server refused a command it does not know or whose options it does not accept
/// (an `ERR`-coded reply), as opposed to failing to run it.
pub(super) fn is_refusal(err: &RedisError) -> bool {
    err.code() == Some("ERR")
}

/// Whether the server refused a write because it takes none now: out of memory under
/// `maxmemory` with `noeviction`, or a read-only replica.
pub(super) fn refuses_writes(err: &RedisError) -> bool {
    matches!(err.code(), Some("OOM" | "READONLY"))
}

pub(super) fn millis(d: Duration) -> u64 {
    // Redis rejects a PX of 0 (a zero duration means "expire at once", i.e. 1 ms) and one that
    // overflows its clock (capped at the crate's largest TTL).
    const MAX_MS: u64 = crate::config::MAX_TTL.as_millis() as u64;
    u64::try_from(d.as_millis())
        .unwrap_or(MAX_MS)
        .clamp(1, MAX_MS)
}
