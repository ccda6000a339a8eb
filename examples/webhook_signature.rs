//! A Standard Webhooks receiver that checks each delivery's signature **before** the idempotency
//! layer sees it.
//!
//! [`IdempotencyLayer::standard_webhooks`] deduplicates deliveries by their `webhook-id`. If it
//! ran first, anyone who can reach the endpoint could send an unsigned request with the id of a
//! delivery that is about to arrive: the forged request would claim the id, and the genuine
//! delivery would then get the forged request's stored answer (or a `422`, its body differing)
//! and never be processed. So the signature is verified in a middleware that wraps the
//! idempotency layer: a request that fails verification is answered `401` and never touches the
//! store.
//!
//! The check follows the [Standard Webhooks specification] (also what Svix sends):
//!
//! - headers `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature` (one or
//!   more space-separated `v1,<base64>` entries; one valid entry is enough, which lets a sender
//!   rotate its secret). Svix's `svix-id`, `svix-timestamp` and `svix-signature` are accepted
//!   instead when `webhook-id` is absent: the same choice the preset makes for its key, so the
//!   id that was signed is always the id the layer deduplicates on;
//! - the signed content is `{webhook-id}.{webhook-timestamp}.{raw body}`, signed with
//!   HMAC-SHA256 keyed with the secret: the part after the `whsec_` prefix, base64-decoded, with
//!   or without its `=` padding (the `standardwebhooks` and `svix` libraries accept both). A
//!   secret without the prefix is base64-decoded all the same, as the reference libraries do; a
//!   secret that is not base64 is refused at startup;
//! - signatures are compared in constant time;
//! - a timestamp more than five minutes (`WEBHOOK_TOLERANCE_SECS`) away from this server's clock
//!   is refused, so a captured delivery cannot be replayed later, once its idempotency record
//!   has expired.
//!
//! The verifier reads the whole body (at most 1 MiB, else `413`) to check the signature, then
//! hands the same bytes on. Its answers are `application/problem+json`, like the layer's.
//!
//! [Standard Webhooks specification]: https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
//!
//! # Running
//!
//! ```text
//! cargo run --example webhook_signature                                  # in-memory store
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example webhook_signature   # records in Redis
//! ```
//!
//! Environment (an empty value counts as unset; an invalid one stops the program with an error
//! message and exit code 2):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `BIND` | address to listen on, `IP:PORT` | `127.0.0.1:3001` |
//! | `WEBHOOK_SECRET` | the endpoint's signing secret, `whsec_<base64>` | the demo secret below |
//! | `WEBHOOK_TOLERANCE_SECS` | largest accepted distance between `webhook-timestamp` and now | `300` |
//! | `REDIS_URL` | Redis to keep idempotency records in; unset: in memory | unset |
//! | `RUST_LOG` | log filter | `info,tower_idempotency=debug` |
//!
//! The default secret, `whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw`, is the example secret of the
//! Standard Webhooks specification: it is public and **for this demo only**. Always set
//! `WEBHOOK_SECRET` to the secret your sender gave you.
//!
//! The program prints `listening on http://ADDR` on standard output once it accepts
//! connections; logs go to standard error. Ctrl-C (or `SIGTERM`) stops it.
//!
//! # Endpoints
//!
//! `POST /webhooks`: a signed delivery whose body is a JSON object with a string `type` (as
//! Standard Webhooks payloads have). Answers:
//!
//! - `200` `{"received": "<type>"}`: processed (once per `webhook-id`; a retry gets the stored
//!   answer with `idempotent-replayed: true`, though it carries a new timestamp and signature);
//! - `400` `{"error"}`: the body is not such an object (stored and replayed like the `200`);
//! - `401` problem: a signature header is missing or repeated, the timestamp is malformed or
//!   outside the tolerance, or no signature matches;
//! - `413` problem: the body is over 1 MiB;
//! - the layer's own answers (`409`, `422`, `503`, ...) as documented in the crate.
//!
//! `GET /status`, unsigned and not behind the layers: `{"processed": n, "replayed": m}`, the
//! deliveries this process has processed and those it answered with a stored answer, since it
//! started. A sender's retry of a delivery already processed adds to `replayed`, never to
//! `processed`.
//!
//! # Sending a signed delivery
//!
//! With the example running, in bash (needs only `openssl` and `od`):
//!
//! ```text
//! SECRET='whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'   # the demo default; use your WEBHOOK_SECRET
//! URL=http://127.0.0.1:3001/webhooks
//! ID="msg_$(openssl rand -hex 12)"
//! BODY='{"type":"invoice.paid","data":{"invoice_id":"inv_1","amount":1000}}'
//!
//! # The HMAC key is the base64 part of the secret, decoded; openssl wants it in hex, and its
//! # padding restored (without it, openssl silently drops the last bytes).
//! B64=${SECRET#whsec_}; while [ $(( ${#B64} % 4 )) -ne 0 ]; do B64="$B64="; done
//! KEY_HEX=$(printf '%s' "$B64" | openssl base64 -d -A | od -An -vtx1 | tr -d ' \n')
//!
//! # Sends $BODY as delivery $ID, signed now (or $1 seconds ago), as a sender and each of its
//! # retries would.
//! send() {
//!   local ts sig
//!   ts=$(( $(date +%s) - ${1:-0} ))
//!   sig=$(printf '%s' "$ID.$ts.$BODY" \
//!     | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$KEY_HEX" -binary | openssl base64 -A)
//!   curl -si "$URL" -H 'content-type: application/json' \
//!     -H "webhook-id: $ID" -H "webhook-timestamp: $ts" -H "webhook-signature: v1,$sig" \
//!     --data-raw "$BODY"
//!   echo
//! }
//! ```
//!
//! A session (`date` and `content-length` headers left out):
//!
//! ```text
//! $ send
//! HTTP/1.1 200 OK
//! content-type: application/json
//!
//! {"received":"invoice.paid"}
//!
//! $ send     # the sender retries: new timestamp and signature, same id: the stored answer
//! HTTP/1.1 200 OK
//! content-type: application/json
//! idempotent-replayed: true
//!
//! {"received":"invoice.paid"}
//!
//! $ # a forged delivery: refused before the idempotency layer, so it claims nothing
//! $ curl -si "$URL" -H "webhook-id: msg_forged" -H "webhook-timestamp: $(date +%s)" \
//!     -H 'webhook-signature: v1,Zm9yZ2VkIHNpZ25hdHVyZSBmb3IgdGhlIGRlbW8gb25seQ==' \
//!     --data-raw "$BODY"
//! HTTP/1.1 401 Unauthorized
//! content-type: application/problem+json
//!
//! {"detail":"no signature in the webhook-signature header matches this request","status":401,"title":"Webhook signature invalid","type":"https://example.com/problems/webhook-signature-invalid"}
//!
//! $ send 600     # signed ten minutes ago: a captured delivery, replayed later
//! HTTP/1.1 401 Unauthorized
//! content-type: application/problem+json
//!
//! {"detail":"the webhook-timestamp is 600 s in the past; at most 300 s either way is accepted","status":401,"title":"Webhook timestamp outside tolerance","type":"https://example.com/problems/webhook-timestamp-outside-tolerance"}
//!
//! $ curl -s http://127.0.0.1:3001/status     # one delivery processed, its retry replayed
//! {"processed":1,"replayed":1}
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, STANDARD_PAD_INDIFFERENT};
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use sha2::Sha256;
use tower_idempotency::{IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore, MemoryStore};
use tracing_subscriber::EnvFilter;

/// The example secret of the Standard Webhooks specification. Public: for the demo only.
const DEMO_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The tolerance the Standard Webhooks reference libraries use.
const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// The largest body the verifier reads; the idempotency layer's default limit too.
const MAX_BODY: usize = 1024 * 1024;

/// The base of the problem `type` URIs. Point it at your own documentation.
const PROBLEM_TYPE_BASE: &str = "https://example.com/problems/";

/// Exit code for an invalid configuration.
const EXIT_CONFIG: u8 = 2;

/// The three header names of one brand.
struct Brand {
    id: &'static str,
    timestamp: &'static str,
    signature: &'static str,
}

const STANDARD_WEBHOOKS: Brand = Brand {
    id: "webhook-id",
    timestamp: "webhook-timestamp",
    signature: "webhook-signature",
};

const SVIX: Brand = Brand {
    id: "svix-id",
    timestamp: "svix-timestamp",
    signature: "svix-signature",
};

/// Checks Standard Webhooks signatures with one endpoint secret.
struct Verifier {
    /// HMAC-SHA256 keyed with the secret; cloned for every request.
    keyed: Hmac<Sha256>,
    tolerance: Duration,
    max_body: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Verifier")
            .field("tolerance", &self.tolerance)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `secret`: `whsec_` followed by base64, or the base64 alone, padded or
    /// not.
    fn new(secret: &str) -> Result<Self, String> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        // Padding optional, as in the reference libraries: some senders show secrets without it.
        let key = STANDARD_PAD_INDIFFERENT
            .decode(encoded)
            .map_err(|err| format!("the secret is not whsec_ followed by base64 ({err})"))?;
        if key.is_empty() {
            return Err("the secret is empty".to_owned());
        }
        let keyed = Hmac::<Sha256>::new_from_slice(&key)
            .map_err(|err| format!("the secret is not a valid HMAC key ({err})"))?;
        Ok(Self {
            keyed,
            tolerance: DEFAULT_TOLERANCE,
            max_body: MAX_BODY,
        })
    }

    /// Sets the largest accepted distance between a delivery's timestamp and now.
    fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Checks the signature headers (everything but the signature itself) at time `now`, Unix
    /// seconds. Runs before the body is read, so most unsigned requests cost nothing more.
    fn check_head(&self, headers: &HeaderMap, now: i64) -> Result<SignedHead, Problem> {
        // Choose the brand as the preset chooses its key header: `webhook-id`, else `svix-id`.
        let brand = if !headers.contains_key(STANDARD_WEBHOOKS.id) && headers.contains_key(SVIX.id)
        {
            &SVIX
        } else {
            &STANDARD_WEBHOOKS
        };
        let id = single(headers, brand.id)?;
        let timestamp = single(headers, brand.timestamp)?;
        let signatures = single(headers, brand.signature)?;

        // Digits only: `+5`, `-5`, `5.0` and the like are refused rather than reinterpreted,
        // since the signed content holds the header's text as sent.
        let seconds = Some(timestamp)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(|| {
                Problem::invalid(format!(
                    "the {} header is not a whole number of seconds",
                    brand.timestamp
                ))
            })?;
        let distance = now.abs_diff(seconds);
        if distance > self.tolerance.as_secs() {
            let direction = if seconds < now {
                "in the past"
            } else {
                "in the future"
            };
            return Err(Problem::stale(format!(
                "the {} is {distance} s {direction}; at most {} s either way is accepted",
                brand.timestamp,
                self.tolerance.as_secs()
            )));
        }

        Ok(SignedHead {
            id: id.to_owned(),
            timestamp: timestamp.to_owned(),
            signatures: signatures.to_owned(),
            signature_header: brand.signature,
        })
    }

    /// Checks that one of the `v1` signatures of `head` signs `{id}.{timestamp}.{body}`.
    fn check_signature(&self, head: &SignedHead, body: &[u8]) -> Result<(), Problem> {
        let mut mac = self.keyed.clone();
        mac.update(head.id.as_bytes());
        mac.update(b".");
        mac.update(head.timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);

        // Other versions (`v1a,` for asymmetric signatures, future ones) and entries that are
        // not base64 are skipped: another entry may still match.
        let matched = head
            .signatures
            .split_ascii_whitespace()
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|signature| BASE64.decode(signature).ok())
            // `verify_slice` compares in constant time, and refuses a truncated signature.
            .any(|signature| mac.clone().verify_slice(&signature).is_ok());
        if matched {
            Ok(())
        } else {
            Err(Problem::invalid(format!(
                "no signature in the {} header matches this request",
                head.signature_header
            )))
        }
    }
}

/// The signature headers of a request, checked but for the signature itself.
#[derive(Debug)]
struct SignedHead {
    id: String,
    timestamp: String,
    signatures: String,
    signature_header: &'static str,
}

/// The value of a header that must be present once.
fn single<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, Problem> {
    let mut values = headers.get_all(name).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(if headers.contains_key(name) {
            Problem::invalid(format!("the {name} header is repeated"))
        } else {
            Problem::missing(format!("the {name} header is missing"))
        });
    };
    value
        .to_str()
        .map_err(|_| Problem::invalid(format!("the {name} header is not visible ASCII")))
}

/// A delivery whose signature was verified, for the handler.
#[derive(Clone, Debug)]
struct VerifiedDelivery {
    id: String,
}

/// The signature middleware. Install it so that it wraps the idempotency layer (see [`app`]).
async fn verify_signature(
    State(verifier): State<Arc<Verifier>>,
    request: Request,
    next: Next,
) -> Response {
    match verified(&verifier, request).await {
        Ok(request) => next.run(request).await,
        Err(problem) => {
            tracing::warn!(
                status = problem.status.as_u16(),
                detail = %problem.detail,
                "webhook refused"
            );
            problem.into_response()
        }
    }
}

/// The request with its body read, checked and put back, or why it is refused.
async fn verified(verifier: &Verifier, request: Request) -> Result<Request, Problem> {
    let head = verifier.check_head(request.headers(), unix_now())?;

    let (mut parts, body) = request.into_parts();
    // A declared `Content-Length` over the limit is refused before reading anything.
    if http_body::Body::size_hint(&body).lower() > verifier.max_body as u64 {
        return Err(Problem::too_large(verifier.max_body));
    }
    let body = match Limited::new(body, verifier.max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => {
            return Err(Problem::too_large(verifier.max_body));
        }
        Err(err) => return Err(Problem::unreadable(&*err)),
    };

    verifier.check_signature(&head, &body)?;

    parts.extensions.insert(VerifiedDelivery { id: head.id });
    Ok(Request::from_parts(parts, Body::from(body)))
}

/// Unix time in seconds.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// An RFC 9457 problem the verifier answers with.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
}

impl Problem {
    fn missing(detail: String) -> Self {
        let (kind, title) = ("webhook-signature-missing", "Webhook signature missing");
        Self::new(StatusCode::UNAUTHORIZED, kind, title, detail)
    }

    fn invalid(detail: String) -> Self {
        let (kind, title) = ("webhook-signature-invalid", "Webhook signature invalid");
        Self::new(StatusCode::UNAUTHORIZED, kind, title, detail)
    }

    fn stale(detail: String) -> Self {
        let kind = "webhook-timestamp-outside-tolerance";
        let title = "Webhook timestamp outside tolerance";
        Self::new(StatusCode::UNAUTHORIZED, kind, title, detail)
    }

    fn too_large(max: usize) -> Self {
        let detail = format!("the request body is larger than {max} bytes");
        let (kind, title) = ("webhook-body-too-large", "Webhook body too large");
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, kind, title, detail)
    }

    fn unreadable(err: &dyn std::error::Error) -> Self {
        let detail = format!("the request body could not be read: {err}");
        let (kind, title) = ("webhook-body-unreadable", "Webhook body unreadable");
        Self::new(StatusCode::BAD_REQUEST, kind, title, detail)
    }

    fn new(status: StatusCode, kind: &'static str, title: &'static str, detail: String) -> Self {
        Self {
            status,
            kind,
            title,
            detail,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": format!("{PROBLEM_TYPE_BASE}{}", self.kind),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let content_type = [(header::CONTENT_TYPE, "application/problem+json")];
        (self.status, content_type, body.to_string()).into_response()
    }
}

/// What the handler and `GET /status` share.
#[derive(Debug, Default)]
struct AppState {
    /// Deliveries processed since startup.
    processed: AtomicUsize,
    /// Deliveries answered with a stored answer since startup: the handler did not run.
    replayed: AtomicUsize,
}

/// The part of a Standard Webhooks payload this receiver reads.
#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    event_type: String,
}

/// `POST /webhooks`: runs once per delivery id, and only for verified deliveries.
async fn receive(
    State(state): State<Arc<AppState>>,
    Extension(delivery): Extension<VerifiedDelivery>,
    body: Bytes,
) -> Response {
    let event: Event = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(err) => {
            let error = format!("the body is not a JSON object with a string `type`: {err}");
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": error })),
            )
                .into_response();
        }
    };
    let count = state.processed.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(
        webhook_id = %delivery.id,
        event_type = %event.event_type,
        processed = count,
        "webhook processed"
    );
    Json(serde_json::json!({ "received": event.event_type })).into_response()
}

/// Counts the deliveries the idempotency layer answers with a stored answer. Install it so that
/// it wraps the idempotency layer, which marks them `idempotent-replayed: true`.
async fn count_replays(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let id = request
        .extensions()
        .get::<VerifiedDelivery>()
        .map(|delivery| delivery.id.clone());
    let response = next.run(request).await;
    if response.headers().contains_key(IDEMPOTENT_REPLAYED) {
        let count = state.replayed.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(
            webhook_id = %id.as_deref().unwrap_or_default(),
            replayed = count,
            "webhook replayed"
        );
    }
    response
}

/// `GET /status`: the counts, for checking from outside which deliveries ran.
async fn status(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "processed": state.processed.load(Ordering::SeqCst),
        "replayed": state.replayed.load(Ordering::SeqCst),
    }))
}

fn app<St: IdempotencyStore>(
    verifier: Verifier,
    idempotency: IdempotencyLayer<St>,
    state: Arc<AppState>,
) -> Router {
    Router::new()
        .route("/webhooks", post(receive))
        // Each `route_layer` wraps the routes as they are at that point, layers included, so the
        // layer added LAST is the outermost and sees the request FIRST (axum 0.8; the opposite
        // of `tower::ServiceBuilder`, whose first layer is the outermost). Here a request goes
        // through the signature check, the replay counter, then the idempotency layer, then
        // the handler: a request that fails the check never reaches the store.
        .route_layer(idempotency)
        .route_layer(middleware::from_fn_with_state(state.clone(), count_replays))
        .route_layer(middleware::from_fn_with_state(
            Arc::new(verifier),
            verify_signature,
        ))
        // Added after the layers, so behind none of them: unsigned, and never deduplicated.
        .route("/status", get(status))
        .with_state(state)
}

struct Config {
    bind: SocketAddr,
    secret: Option<String>,
    tolerance: Duration,
    redis_url: Option<String>,
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let bind = match var("BIND")? {
            None => SocketAddr::from(([127, 0, 0, 1], 3001)),
            Some(v) => v.parse().map_err(|_| {
                format!("BIND={v:?} is not an address of the form IP:PORT, e.g. 127.0.0.1:3001")
            })?,
        };
        let tolerance = match var("WEBHOOK_TOLERANCE_SECS")? {
            None => DEFAULT_TOLERANCE,
            Some(v) => match v.parse::<u32>() {
                Ok(secs) => Duration::from_secs(secs.into()),
                Err(_) => {
                    return Err(format!(
                        "WEBHOOK_TOLERANCE_SECS={v:?} is not a whole number of seconds"
                    ));
                }
            },
        };
        Ok(Self {
            bind,
            secret: var("WEBHOOK_SECRET")?,
            tolerance,
            redis_url: var("REDIS_URL")?,
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

#[cfg(feature = "redis")]
async fn redis_store(url: &str) -> Result<tower_idempotency::RedisStore, ExitCode> {
    let client = redis::Client::open(url).map_err(|err| {
        eprintln!("webhook_signature: invalid configuration: REDIS_URL is not a Redis URL: {err}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    tower_idempotency::RedisStore::new(client)
        .await
        .map_err(|err| {
            eprintln!("webhook_signature: cannot connect to Redis at REDIS_URL: {err}");
            ExitCode::FAILURE
        })
}

/// Without the `redis` feature there is no Redis store: a set `REDIS_URL` is a mistake.
#[cfg(not(feature = "redis"))]
async fn redis_store(_url: &str) -> Result<MemoryStore, ExitCode> {
    eprintln!(
        "webhook_signature: invalid configuration: REDIS_URL is set, but this build lacks the \
         `redis` feature"
    );
    Err(ExitCode::from(EXIT_CONFIG))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_idempotency=debug")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(msg) => {
            eprintln!("webhook_signature: invalid configuration: {msg}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let secret = config.secret.as_deref().unwrap_or_else(|| {
        tracing::warn!(
            "WEBHOOK_SECRET is unset: using the public demo secret; never in production"
        );
        DEMO_SECRET
    });
    let verifier = match Verifier::new(secret) {
        Ok(verifier) => verifier.tolerance(config.tolerance),
        Err(msg) => {
            eprintln!("webhook_signature: invalid configuration: WEBHOOK_SECRET: {msg}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    let state = Arc::new(AppState::default());
    let (router, detached) = match config.redis_url.as_deref() {
        None => {
            tracing::info!("idempotency records kept in memory (set REDIS_URL to share them)");
            let layer = IdempotencyLayer::standard_webhooks(MemoryStore::new());
            let detached = layer.detached_work();
            (app(verifier, layer, state), detached)
        }
        Some(url) => match redis_store(url).await {
            Ok(store) => {
                tracing::info!("idempotency records kept in Redis");
                let layer = IdempotencyLayer::standard_webhooks(store);
                let detached = layer.detached_work();
                (app(verifier, layer, state), detached)
            }
            Err(code) => return code,
        },
    };

    let listener = match tokio::net::TcpListener::bind(config.bind).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("webhook_signature: cannot listen on {}: {err}", config.bind);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(config.bind);
    tracing::info!(
        tolerance_secs = config.tolerance.as_secs(),
        "ready: POST /webhooks, GET /status"
    );
    #[allow(clippy::print_stdout)]
    {
        println!("listening on http://{addr}");
    }

    if let Err(err) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        eprintln!("webhook_signature: server error: {err}");
        return ExitCode::FAILURE;
    }
    // Deliveries whose sender hung up are not connections the server waits for: wait for them
    // too, so that none is cut off halfway.
    if !detached.wait_for(Duration::from_secs(30)).await {
        tracing::warn!(
            running = detached.len(),
            "exiting with detached deliveries still running"
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::http::HeaderValue;
    use futures_util::stream;
    use tower::ServiceExt;

    const SECRET: &str = DEMO_SECRET;
    const BODY: &str = r#"{"type":"invoice.paid","data":{"invoice_id":"inv_1","amount":1000}}"#;

    /// Signs as a sender does, independently of [`Verifier`]: `v1,<base64 HMAC-SHA256>`.
    fn sign(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
        let key = STANDARD_PAD_INDIFFERENT
            .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }

    /// A delivery of `body` as `id`, signed `age_secs` ago with `SECRET`.
    fn delivery(id: &str, age_secs: i64, body: &str) -> Request<Body> {
        let timestamp = (unix_now() - age_secs).to_string();
        let signature = sign(SECRET, id, &timestamp, body.as_bytes());
        Request::post("/webhooks")
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(Body::from(body.to_owned()))
            .unwrap()
    }

    struct Harness {
        app: Router,
        store: MemoryStore,
        state: Arc<AppState>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with(Verifier::new(SECRET).unwrap())
        }

        fn with(verifier: Verifier) -> Self {
            let store = MemoryStore::new();
            let state = Arc::new(AppState::default());
            let layer = IdempotencyLayer::standard_webhooks(store.clone());
            Self {
                app: app(verifier, layer, state.clone()),
                store,
                state,
            }
        }

        async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
            let response = self.app.clone().oneshot(request).await.unwrap();
            let (parts, body) = response.into_parts();
            (
                parts.status,
                parts.headers,
                body.collect().await.unwrap().to_bytes(),
            )
        }

        fn processed(&self) -> usize {
            self.state.processed.load(Ordering::SeqCst)
        }

        /// `GET /status`, as a client outside would ask it.
        async fn status(&self) -> serde_json::Value {
            let request = Request::get("/status").body(Body::empty()).unwrap();
            let (status, headers, body) = self.send(request).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            json(&body)
        }
    }

    fn json(body: &Bytes) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    /// Asserts a `401` problem of `kind` from the verifier.
    fn assert_refused(
        (status, headers, body): &(StatusCode, HeaderMap, Bytes),
        kind: &str,
        why: &str,
    ) {
        assert_eq!(*status, StatusCode::UNAUTHORIZED, "{why}");
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{why}"
        );
        let problem = json(body);
        assert_eq!(
            problem["type"],
            format!("{PROBLEM_TYPE_BASE}{kind}"),
            "{why}"
        );
        assert_eq!(problem["status"], 401, "{why}");
        assert!(problem["title"].is_string(), "{why}");
        assert!(problem["detail"].is_string(), "{why}");
    }

    #[test]
    fn reproduces_the_standard_webhooks_test_vector() {
        // The vector the Standard Webhooks reference libraries test their `sign` against.
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let timestamp = "1614265330";
        let body = br#"{"test": 2432232314}"#;
        let expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            sign(
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                id,
                timestamp,
                body
            ),
            expected
        );

        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_static(id));
        headers.insert("webhook-timestamp", HeaderValue::from_static(timestamp));
        headers.insert("webhook-signature", HeaderValue::from_static(expected));
        let verifier = Verifier::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let head = verifier.check_head(&headers, 1_614_265_330).unwrap();
        verifier.check_signature(&head, body).unwrap();
        // One byte of the body changed: refused.
        assert!(
            verifier
                .check_signature(&head, br#"{"test": 2432232315}"#)
                .is_err()
        );
        // Six minutes later the same delivery is stale.
        assert_eq!(
            verifier
                .check_head(&headers, 1_614_265_330 + 360)
                .unwrap_err()
                .kind,
            "webhook-timestamp-outside-tolerance"
        );
    }

    #[tokio::test]
    async fn a_valid_delivery_runs_the_handler_once() {
        let h = Harness::new();
        let (status, headers, body) = h.send(delivery("msg_1", 0, BODY)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json(&body),
            serde_json::json!({ "received": "invoice.paid" })
        );
        assert!(headers.get(IDEMPOTENT_REPLAYED).is_none());
        assert_eq!(h.processed(), 1);
        assert_eq!(h.store.len(), 1);
    }

    #[tokio::test]
    async fn a_retry_is_replayed_without_running_the_handler() {
        let h = Harness::new();
        assert_eq!(h.send(delivery("msg_1", 0, BODY)).await.0, StatusCode::OK);
        // A sender's retry: the same id and body, a later timestamp, hence a new signature.
        let (status, headers, body) = h.send(delivery("msg_1", -2, BODY)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(
            json(&body),
            serde_json::json!({ "received": "invoice.paid" })
        );
        // The very same request again, too.
        let (status, headers, _) = h.send(delivery("msg_1", 0, BODY)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(h.processed(), 1);
    }

    #[tokio::test]
    async fn the_status_route_tells_processed_from_replayed() {
        let h = Harness::new();
        let counts = |processed: usize, replayed: usize| serde_json::json!({ "processed": processed, "replayed": replayed });
        assert_eq!(h.status().await, counts(0, 0));

        assert_eq!(h.send(delivery("msg_1", 0, BODY)).await.0, StatusCode::OK);
        assert_eq!(h.status().await, counts(1, 0));
        // The sender's retries: answered from the store, counted as such.
        for age in [-2, 0] {
            let (status, headers, _) = h.send(delivery("msg_1", age, BODY)).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers[IDEMPOTENT_REPLAYED], "true");
        }
        assert_eq!(h.status().await, counts(1, 2));

        // Refused deliveries are neither; a new one is processed.
        let mut forged = delivery("msg_2", 0, BODY);
        forged
            .headers_mut()
            .insert("webhook-signature", HeaderValue::from_static("v1,Zm9v"));
        assert_eq!(h.send(forged).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(h.send(delivery("msg_2", 0, BODY)).await.0, StatusCode::OK);
        assert_eq!(h.status().await, counts(2, 2));

        // Not behind the idempotency layer either: asked with a key, still the counts.
        let request = Request::get("/status")
            .header("webhook-id", "msg_1")
            .body(Body::empty())
            .unwrap();
        assert_eq!(json(&h.send(request).await.2), counts(2, 2));
    }

    #[tokio::test]
    async fn a_forged_delivery_claims_nothing() {
        let h = Harness::new();
        // An attacker who knows the next delivery id, but not the secret, sends a body of their
        // own, signed with another secret.
        let forged_body = r#"{"type":"invoice.voided"}"#;
        let mut forged = delivery("msg_1", 0, forged_body);
        let timestamp = forged.headers()["webhook-timestamp"]
            .to_str()
            .unwrap()
            .to_owned();
        let wrong = sign(
            "whsec_dGhpcyBpcyBub3QgdGhlIHNlY3JldA==",
            "msg_1",
            &timestamp,
            forged_body.as_bytes(),
        );
        forged
            .headers_mut()
            .insert("webhook-signature", wrong.parse().unwrap());
        let answer = h.send(forged).await;
        assert_refused(&answer, "webhook-signature-invalid", "wrong secret");
        assert!(answer.1.get(IDEMPOTENT_REPLAYED).is_none());
        assert_eq!(h.store.len(), 0, "the store was touched");
        assert_eq!(h.processed(), 0);

        // The genuine delivery with that id is processed normally: not replayed, not a 422.
        let (status, headers, body) = h.send(delivery("msg_1", 0, BODY)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.get(IDEMPOTENT_REPLAYED).is_none());
        assert_eq!(
            json(&body),
            serde_json::json!({ "received": "invoice.paid" })
        );
        assert_eq!(h.processed(), 1);
    }

    #[tokio::test]
    async fn a_tampered_or_truncated_signature_is_refused() {
        let h = Harness::new();
        let genuine = delivery("msg_1", 0, BODY);
        let (parts, _) = genuine.into_parts();
        let signature = parts.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .to_owned();

        // The genuine headers with another body.
        let tampered = Request::from_parts(parts.clone(), Body::from(BODY.replace("1000", "1")));
        assert_refused(&h.send(tampered).await, "webhook-signature-invalid", "body");

        for (value, why) in [
            ("v1,".to_owned(), "empty signature"),
            (signature[..12].to_owned(), "truncated signature"),
            (signature.replacen("v1,", "v2,", 1), "unknown version"),
            (signature.replacen("v1,", "v1a,", 1), "asymmetric version"),
            ("v1,not base64!".to_owned(), "not base64"),
            (String::new(), "empty header"),
        ] {
            let mut request = Request::from_parts(parts.clone(), Body::from(BODY));
            request
                .headers_mut()
                .insert("webhook-signature", value.parse().unwrap());
            assert_refused(&h.send(request).await, "webhook-signature-invalid", why);
        }
        assert_eq!(h.store.len(), 0);
        assert_eq!(h.processed(), 0);
    }

    #[tokio::test]
    async fn a_stale_or_future_timestamp_is_refused() {
        let h = Harness::new();
        for (age, why) in [(600, "ten minutes old"), (-600, "ten minutes ahead")] {
            let answer = h.send(delivery("msg_1", age, BODY)).await;
            assert_refused(&answer, "webhook-timestamp-outside-tolerance", why);
        }
        // Within the tolerance either way: accepted.
        assert_eq!(h.send(delivery("msg_2", 240, BODY)).await.0, StatusCode::OK);
        assert_eq!(
            h.send(delivery("msg_3", -240, BODY)).await.0,
            StatusCode::OK
        );
        assert_eq!(h.processed(), 2);
        assert_eq!(h.store.len(), 2);
    }

    #[tokio::test]
    async fn the_tolerance_is_configurable() {
        let verifier = Verifier::new(SECRET)
            .unwrap()
            .tolerance(Duration::from_secs(15 * 60));
        let h = Harness::with(verifier);
        assert_eq!(h.send(delivery("msg_1", 600, BODY)).await.0, StatusCode::OK);
        let answer = h.send(delivery("msg_2", 20 * 60, BODY)).await;
        assert_refused(&answer, "webhook-timestamp-outside-tolerance", "20 min");
    }

    #[tokio::test]
    async fn missing_repeated_or_malformed_headers_are_refused() {
        let h = Harness::new();
        // Were the idempotency layer first, a missing `webhook-id` would be its `400`: the
        // verifier answers first.
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let mut request = delivery("msg_1", 0, BODY);
            request.headers_mut().remove(name);
            assert_refused(&h.send(request).await, "webhook-signature-missing", name);

            let mut request = delivery("msg_1", 0, BODY);
            let value = request.headers()[name].clone();
            request.headers_mut().append(name, value);
            let why = format!("{name} repeated");
            assert_refused(&h.send(request).await, "webhook-signature-invalid", &why);
        }
        let unsigned = Request::post("/webhooks").body(Body::from(BODY)).unwrap();
        assert_refused(&h.send(unsigned).await, "webhook-signature-missing", "none");

        for timestamp in [
            "hello",
            "",
            "+1700000000",
            "-1",
            "1.5",
            "99999999999999999999",
        ] {
            let mut request = delivery("msg_1", 0, BODY);
            request
                .headers_mut()
                .insert("webhook-timestamp", timestamp.parse().unwrap());
            assert_refused(
                &h.send(request).await,
                "webhook-signature-invalid",
                timestamp,
            );
        }
        assert_eq!(h.store.len(), 0);
        assert_eq!(h.processed(), 0);
    }

    #[tokio::test]
    async fn one_valid_signature_among_several_is_enough() {
        let h = Harness::new();
        let mut request = delivery("msg_1", 0, BODY);
        let valid = request.headers()["webhook-signature"]
            .to_str()
            .unwrap()
            .to_owned();
        let other = sign("whsec_b2xkIHNlY3JldA==", "msg_1", "0", BODY.as_bytes());
        let several = format!(
            "{other} v1a,c2lnbmF0dXJl {} {valid} v1,Zm9v",
            valid.replacen("v1,", "v2,", 1)
        );
        request
            .headers_mut()
            .insert("webhook-signature", several.parse().unwrap());
        assert_eq!(h.send(request).await.0, StatusCode::OK);
        assert_eq!(h.processed(), 1);

        // Several, none valid: refused.
        let mut request = delivery("msg_2", 0, BODY);
        let none_valid = format!("{other} v1,Zm9v");
        request
            .headers_mut()
            .insert("webhook-signature", none_valid.parse().unwrap());
        assert_refused(
            &h.send(request).await,
            "webhook-signature-invalid",
            "none valid",
        );
    }

    #[tokio::test]
    async fn a_secret_without_the_prefix_is_base64_too() {
        // `MfKQ...` and `whsec_MfKQ...` are the same key, as in the reference libraries.
        let bare = SECRET.strip_prefix("whsec_").unwrap();
        let h = Harness::with(Verifier::new(bare).unwrap());
        assert_eq!(h.send(delivery("msg_1", 0, BODY)).await.0, StatusCode::OK);

        // A secret that is not base64 (a raw string, say) is refused up front, not used as is.
        for secret in [
            "whsec_",
            "",
            "whsec_not base64!",
            "my raw secret",
            "whsec_a",
        ] {
            assert!(Verifier::new(secret).is_err(), "{secret:?} accepted");
        }
    }

    #[tokio::test]
    async fn a_secret_without_its_padding_is_the_same_key() {
        // 22 bytes: base64 with two `=` of padding, which some senders leave out (the
        // `standardwebhooks` and `svix` libraries restore it).
        let padded = "whsec_dGhpcyBpcyBub3QgdGhlIHNlY3JldA==";
        let unpadded = padded.trim_end_matches('=');
        assert_ne!(padded, unpadded);
        for secret in [unpadded, &padded[..padded.len() - 1], padded] {
            let verifier = Verifier::new(secret).unwrap_or_else(|err| panic!("{secret}: {err}"));
            let mut request = delivery("msg_1", 0, BODY);
            let timestamp = request.headers()["webhook-timestamp"].clone();
            // Signed by a sender holding the padded form of the secret.
            let signature = sign(
                padded,
                "msg_1",
                timestamp.to_str().unwrap(),
                BODY.as_bytes(),
            );
            request
                .headers_mut()
                .insert("webhook-signature", signature.parse().unwrap());
            let h = Harness::with(verifier);
            assert_eq!(h.send(request).await.0, StatusCode::OK, "{secret}");
            assert_eq!(h.processed(), 1, "{secret}");
        }
    }

    #[tokio::test]
    async fn svix_headers_are_verified_like_standard_ones() {
        let h = Harness::new();
        let mut request = delivery("msg_1", 0, BODY);
        for (standard, svix) in [
            ("webhook-id", "svix-id"),
            ("webhook-timestamp", "svix-timestamp"),
            ("webhook-signature", "svix-signature"),
        ] {
            let value = request.headers_mut().remove(standard).unwrap();
            request.headers_mut().insert(svix, value);
        }
        assert_eq!(h.send(request).await.0, StatusCode::OK);
        assert_eq!(h.processed(), 1);

        // A `webhook-id` next to signed `svix-*` headers is the id the layer would use, so it is
        // the one that must be signed: without `webhook-*` signature headers, refused.
        let mut request = delivery("msg_2", 0, BODY);
        for (standard, svix) in [
            ("webhook-timestamp", "svix-timestamp"),
            ("webhook-signature", "svix-signature"),
        ] {
            let value = request.headers_mut().remove(standard).unwrap();
            request.headers_mut().insert(svix, value);
        }
        request
            .headers_mut()
            .insert("webhook-id", HeaderValue::from_static("msg_forged"));
        let answer = h.send(request).await;
        assert_refused(&answer, "webhook-signature-missing", "mixed brands");
        assert_eq!(h.processed(), 1);
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused_with_413() {
        let h = Harness::new();
        let big = " ".repeat(MAX_BODY + 1);
        // With a known length, refused before reading.
        let (status, headers, body) = h.send(delivery("msg_1", 0, &big)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(json(&body)["status"], 413);

        // Streamed without a length, refused once the limit is crossed.
        let (parts, _) = delivery("msg_1", 0, &big).into_parts();
        let chunks = big
            .into_bytes()
            .chunks(64 * 1024)
            .map(|chunk| Ok::<_, std::io::Error>(Bytes::copy_from_slice(chunk)))
            .collect::<Vec<_>>();
        let streamed = Request::from_parts(parts, Body::from_stream(stream::iter(chunks)));
        assert_eq!(h.send(streamed).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(h.store.len(), 0);
        assert_eq!(h.processed(), 0);

        // A body of exactly the limit passes the verifier (and the layer, whose limit is the
        // same): the handler answers that it is not an event.
        let (status, _, _) = h.send(delivery("msg_1", 0, &" ".repeat(MAX_BODY))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
