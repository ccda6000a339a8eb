//! An admin route for operators beside a protected one: look up an idempotency key's state and
//! forget a completed key, behind a bearer token read from `ADMIN_TOKEN`.
//!
//! ```text
//! ADMIN_TOKEN=s3cret cargo run --example admin
//! curl -X POST localhost:3000/orders/7/pay -H 'idempotency-key: k1' -H 'x-tenant: acme'
//! curl 'localhost:3000/admin/idempotency?route=/orders/{id}/pay&key=k1&caller=acme' \
//!      -H 'authorization: Bearer s3cret'
//! curl -X DELETE 'localhost:3000/admin/idempotency?route=/orders/{id}/pay&key=k1&caller=acme' \
//!      -H 'authorization: Bearer s3cret'
//! ```
//!
//! Forget a key to force a delivery through again, once what its first run got wrong is fixed:
//! the next request with the key runs the handler instead of replaying the stored answer.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tower_idempotency::{IdempotencyLayer, KeyQuery, KeyState, MemoryStore};

/// What the admin route needs: the layer (its store and scoping) and the token.
#[derive(Clone)]
struct Admin {
    layer: IdempotencyLayer<MemoryStore>,
    token: Arc<str>,
}

/// `?route=..&key=..&caller=..`: what the layer scopes a key by.
#[derive(Deserialize)]
struct Which {
    route: String,
    key: String,
    caller: Option<String>,
}

impl Which {
    fn query(self) -> KeyQuery {
        let query = KeyQuery::new(self.route, self.key);
        match self.caller {
            Some(caller) => query.caller(caller),
            None => query,
        }
    }
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn inspect(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Query(which): Query<Which>,
) -> Response {
    if !authorized(&headers, &admin.token) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let state = match admin.layer.inspect(&which.query()).await {
        Ok(state) => state,
        Err(err) => return (StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response(),
    };
    let json = match state {
        KeyState::Running { retry_after } => serde_json::json!({
            "state": "running", "retry_after_ms": retry_after.as_millis() as u64,
        }),
        KeyState::Completed {
            status,
            body_len,
            stored_bytes,
            expires_at,
        } => serde_json::json!({
            "state": "completed",
            "status": status.as_u16(),
            "body_len": body_len,
            "stored_bytes": stored_bytes,
            "expires_at_unix": expires_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }),
        _ => serde_json::json!({ "state": "absent" }),
    };
    Json(json).into_response()
}

async fn forget(
    State(admin): State<Admin>,
    headers: HeaderMap,
    Query(which): Query<Which>,
) -> Response {
    if !authorized(&headers, &admin.token) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match admin.layer.forget(&which.query()).await {
        Ok(forgotten) => Json(serde_json::json!({ "forgotten": forgotten })).into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response(),
    }
}

/// The application: a protected payment route, and the admin route beside it (not behind the
/// idempotency layer, which only wraps the payment route).
fn app(token: &str) -> Router {
    let layer = IdempotencyLayer::new(MemoryStore::new()).scope_with(|parts| {
        let tenant = parts.headers.get("x-tenant")?;
        tenant.to_str().ok().map(str::to_owned)
    });
    let admin = Admin {
        layer: layer.clone(),
        token: token.into(),
    };
    Router::new()
        .route(
            "/orders/{id}/pay",
            post(|| async { (StatusCode::CREATED, "paid") }),
        )
        .route_layer(layer)
        .route("/admin/idempotency", get(inspect).delete(forget))
        .with_state(admin)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let token = std::env::var("ADMIN_TOKEN")
        .ok()
        .filter(|t| t.len() >= 16)
        .ok_or("set ADMIN_TOKEN to a secret of at least 16 characters")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app(&token)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const TOKEN: &str = "a-secret-of-some-length";
    const ADMIN: &str = "/admin/idempotency?route=/orders/%7Bid%7D/pay&key=k1&caller=acme";

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        token: Option<&str>,
    ) -> (StatusCode, String) {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("idempotency-key", "k1")
            .header("x-tenant", "acme");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_admin_route_inspects_and_forgets_behind_its_token() {
        let app = app(TOKEN);
        assert_eq!(
            call(&app, "GET", ADMIN, None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&app, "DELETE", ADMIN, Some("wrong")).await.0,
            StatusCode::UNAUTHORIZED
        );
        let (_, absent) = call(&app, "GET", ADMIN, Some(TOKEN)).await;
        assert!(absent.contains("\"absent\""), "{absent}");

        assert_eq!(
            call(&app, "POST", "/orders/7/pay", None).await.0,
            StatusCode::CREATED
        );
        let (status, completed) = call(&app, "GET", ADMIN, Some(TOKEN)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            completed.contains("\"completed\"") && completed.contains("201"),
            "{completed}"
        );

        let (_, forgotten) = call(&app, "DELETE", ADMIN, Some(TOKEN)).await;
        assert!(forgotten.contains("\"forgotten\":true"), "{forgotten}");
        let (_, absent) = call(&app, "GET", ADMIN, Some(TOKEN)).await;
        assert!(absent.contains("\"absent\""), "{absent}");
    }
}
