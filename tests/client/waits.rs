//! Waits and bounds, on Tokio's paused clock against a scripted service (no network): the
//! elapsed times below are the clock's, advanced only by the client's own sleeps.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;
use tokio::time::Instant;

use tower::ServiceExt;
use tower::util::BoxCloneService;
use tower_idempotency::client::{ClientOutcome, IdempotentClientLayer};

/// A scripted answer: a status and its `Retry-After`.
type Answer = (u16, Option<String>);
/// A request as the service saw it: its key header and its body.
type Seen = (Option<String>, Bytes);

/// A service that answers from a script (the last answer repeats), and records each request's
/// key and body.
#[derive(Clone, Default)]
pub(crate) struct Scripted {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    pub(crate) fn new(answers: &[(u16, Option<&str>)]) -> Self {
        let answers = answers
            .iter()
            .map(|(s, ra)| (*s, ra.map(str::to_owned)))
            .collect();
        Self {
            answers: Arc::new(Mutex::new(answers)),
            seen: Arc::default(),
        }
    }

    pub(crate) fn service(
        &self,
    ) -> BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible> {
        let this = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let this = this.clone();
            async move {
                let key = req
                    .headers()
                    .get("idempotency-key")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body = req.into_body().collect().await.unwrap().to_bytes();
                this.seen.lock().unwrap().push((key, body));
                let (status, retry_after) = {
                    let mut answers = this.answers.lock().unwrap();
                    if answers.len() > 1 {
                        answers.pop_front().unwrap()
                    } else {
                        answers.front().cloned().unwrap()
                    }
                };
                let mut res = Response::builder().status(status);
                if let Some(ra) = retry_after {
                    res = res.header("retry-after", ra);
                }
                Ok::<_, Infallible>(res.body(Full::new(Bytes::new())).unwrap())
            }
        })
        .boxed_clone()
    }
}

/// Sends one POST through `layer` to `scripted`; the answer's status, outcome, and the time it
/// took on the paused clock.
async fn post(layer: IdempotentClientLayer, scripted: &Scripted) -> (u16, ClientOutcome, Duration) {
    let client = tower::ServiceBuilder::new()
        .layer(layer)
        .service(scripted.service());
    let started = Instant::now();
    let res = client
        .oneshot(
            Request::post("http://stub/orders")
                .body(Full::from("order"))
                .unwrap(),
        )
        .await
        .unwrap();
    let outcome = res.extensions().get::<ClientOutcome>().unwrap().clone();
    (res.status().as_u16(), outcome, started.elapsed())
}

fn layer() -> IdempotentClientLayer {
    IdempotentClientLayer::new()
        .max_retry_after(Duration::from_secs(60))
        .max_elapsed(Duration::from_secs(120))
}

const S: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn retry_after_in_seconds_is_waited_for() {
    let scripted = Scripted::new(&[(503, Some("3")), (200, None)]);
    let (status, outcome, took) = post(layer(), &scripted).await;
    assert_eq!((status, outcome.attempts()), (200, 2));
    assert!(took >= 3 * S && took < 4 * S, "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_a_date_is_waited_for() {
    let date = httpdate::fmt_http_date(SystemTime::now() + 6 * S);
    let scripted = Scripted::new(&[(429, Some(&date)), (200, None)]);
    let (status, outcome, took) = post(layer(), &scripted).await;
    assert_eq!((status, outcome.attempts()), (200, 2));
    // The date has whole seconds: between five and six seconds from now.
    assert!(took >= 5 * S && took <= 6 * S, "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_capped() {
    let scripted = Scripted::new(&[(409, Some("3600")), (200, None)]);
    let (status, outcome, took) = post(layer().max_retry_after(2 * S), &scripted).await;
    assert_eq!((status, outcome.attempts()), (200, 2));
    assert!(took >= 2 * S && took < 3 * S, "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_time_budget_returns_the_answer_at_once() {
    let scripted = Scripted::new(&[(503, Some("30")), (200, None)]);
    let (status, outcome, took) = post(layer().max_elapsed(10 * S), &scripted).await;
    assert_eq!((status, outcome.attempts()), (503, 1));
    assert_eq!(took, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn the_time_budget_bounds_the_attempts() {
    // Attempts at 0, 2 and 4 s; a fourth would start at 6 s, past the 5 s budget.
    let scripted = Scripted::new(&[(503, Some("2"))]);
    let (status, outcome, took) =
        post(layer().max_elapsed(5 * S).max_attempts(10), &scripted).await;
    assert_eq!((status, outcome.attempts()), (503, 3));
    assert_eq!(took, 4 * S);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_sends_the_same_key_and_body_with_growing_jittered_waits() {
    let scripted = Scripted::new(&[(500, None)]);
    let layer = layer()
        .max_attempts(4)
        .initial_backoff(Duration::from_millis(100))
        .max_backoff(Duration::from_millis(250));
    let (status, outcome, took) = post(layer, &scripted).await;
    assert_eq!((status, outcome.attempts()), (500, 4));
    // Three waits, each at most its bound: 100 + 200 + 250 ms.
    assert!(took <= Duration::from_millis(550), "{took:?}");
    let seen = scripted.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    let key = outcome.key().unwrap().as_str();
    for (sent_key, body) in seen {
        assert_eq!(sent_key.as_deref(), Some(key));
        assert_eq!(body, "order");
    }
}

#[tokio::test(start_paused = true)]
async fn a_replayed_answer_is_final_whatever_its_status() {
    // A server that stored a 503 replays it: sending the key again would get it again.
    let scripted = Scripted::new(&[(503, None)]);
    let svc = scripted
        .service()
        .map_response(|mut res: Response<Full<Bytes>>| {
            res.headers_mut().insert(
                "idempotent-replayed",
                http::HeaderValue::from_static("true"),
            );
            res
        });
    let client = tower::ServiceBuilder::new().layer(layer()).service(svc);
    let res = client
        .oneshot(
            Request::post("http://stub/orders")
                .body(Full::from("order"))
                .unwrap(),
        )
        .await
        .unwrap();
    let outcome = res.extensions().get::<ClientOutcome>().unwrap();
    assert_eq!(
        (
            res.status().as_u16(),
            outcome.attempts(),
            outcome.replayed()
        ),
        (503, 1, true)
    );
}
