//! Running one test body against both stores.

use std::sync::Arc;

use tower_idempotency::{MemoryStore, RedisStore};

use super::{TestRedis, unique_prefix};

/// A store under test and a way to count the entries it holds.
pub struct Backend<St> {
    pub store: St,
    pub entries: Box<dyn Fn() -> usize + Send + Sync>,
    /// Keeps a spawned redis-server alive for the test.
    pub _redis: Option<Arc<TestRedis>>,
}

pub fn memory() -> Backend<MemoryStore> {
    let store = MemoryStore::new();
    let probe = store.clone();
    Backend {
        store,
        entries: Box::new(move || probe.len()),
        _redis: None,
    }
}

pub async fn redis(test: &str) -> Backend<RedisStore> {
    let redis = Arc::new(TestRedis::get());
    let prefix = unique_prefix(test);
    let store = RedisStore::new(redis.client())
        .await
        .expect("connect to redis")
        .key_prefix(prefix.clone());
    let probe = redis.clone();
    Backend {
        store,
        entries: Box::new(move || probe.count_keys(&prefix)),
        _redis: Some(redis),
    }
}

/// Runs each named `async fn(Backend<St>)` of the calling test file against MemoryStore and
/// RedisStore, as `memory_store::NAME` and `redis_store::NAME`.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::backend::memory()).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::backend::redis(stringify!($name)).await).await;
                }
            )*
        }
    };
}
