//! Running one test body against both stores, and reading the answers.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{MemoryStore, RedisStore};

use super::{TestRedis, bounded, unique_prefix};

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

/// A response read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// Asserts a problem+json body consistent with the status, and returns it.
    pub fn problem(&self) -> serde_json::Value {
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{}",
            self.text()
        );
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(json["status"], self.status.as_u16());
        for field in ["type", "title", "detail"] {
            assert!(json[field].is_string(), "problem lacks {field}: {json}");
        }
        json
    }
}

/// Sends `req` through `app` (within 10 s) and reads the whole response.
pub async fn send(app: &Router, req: Request<Body>) -> Reply {
    let response: Response = bounded(
        Duration::from_secs(10),
        "a request",
        app.clone().oneshot(req),
    )
    .await
    .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}
