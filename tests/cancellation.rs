//! What dropping the layer's response future does: before the request holds its claim it is
//! cancelled like any future (nothing runs, nothing stays claimed); after, the owner's part is
//! detached (tests/layer.rs, client_disconnect_does_not_cancel_or_rerun); a panic in the
//! protected path unwinds once and its future is never polled again.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};

use common::stub::{Fault, Op, Stub};

fn request(key: &str) -> Request<Body> {
    Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from("x"))
        .unwrap()
}

/// A future dropped before its first poll has not claimed anything: the handler does not run,
/// and the next request with the key runs it.
#[tokio::test]
async fn a_future_dropped_unpolled_runs_nothing_and_holds_nothing() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let handler = tower::service_fn(move |_req: Request<Body>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Response::new(Body::from("done")))
        }
    });
    let mut service = IdempotencyLayer::new(MemoryStore::new()).layer(handler);

    let unpolled = service.ready().await.unwrap().call(request("k"));
    drop(unpolled);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "an unpolled request ran");

    let response = service
        .ready()
        .await
        .unwrap()
        .call(request("k"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A panic in the protected path unwinds once, and the dropped future is not handed on to be
/// polled again: neither where the layer calls the handler unprotected (no key in the body,
/// keys not required) nor in the owner's part, which is detached when dropped unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_future_is_not_polled_again() {
    static RESUMED: AtomicUsize = AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.to_string().contains("resumed after panicking") {
            RESUMED.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let handler = tower::service_fn(|_req: Request<Body>| async move {
        if true {
            panic!("the handler fails");
        }
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .key_source(KeySource::json_field("event_id"))
        .require_key(false);
    let mut service = layer.layer(handler);
    let future = service
        .ready()
        .await
        .unwrap()
        .call(Request::post("/hook").body(Body::from("{}")).unwrap());
    let joined = tokio::spawn(future).await;
    assert!(joined.is_err_and(|e| e.is_panic()));

    let handler = tower::service_fn(|_req: Request<Body>| async move {
        Ok::<_, Infallible>(Response::new(Body::from("done")))
    });
    let mut service =
        IdempotencyLayer::new(Stub::memory().with(Op::Complete, Fault::Panic)).layer(handler);
    let future = service.ready().await.unwrap().call(request("k"));
    let joined = tokio::spawn(future).await;
    assert!(joined.is_err_and(|e| e.is_panic()));

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(RESUMED.load(Ordering::SeqCst), 0);
}

/// A server shutting down gracefully waits for the requests still connected; a handler whose
/// client already left belongs to none of them. `DetachedWork` waits for it: after the server
/// stopped, the handler is still running, and once waited for it has finished and its response
/// is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_can_wait_for_handlers_whose_client_left() {
    use axum::Router;
    use axum::routing::post;
    use tokio::io::AsyncWriteExt;

    let finished = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let detached = layer.detached_work();
    let app = Router::new()
        .route(
            "/pay",
            post({
                let finished = finished.clone();
                move || async move {
                    tokio::time::sleep(Duration::from_millis(1_500)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    "paid"
                }
            }),
        )
        .route_layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, on_shutdown) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let app = app.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = on_shutdown.await;
                })
                .await
        }
    });

    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(
            b"POST /pay HTTP/1.1\r\nhost: test\r\nidempotency-key: k\r\ncontent-length: 1\r\n\r\nx",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();

    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "the handler is still running"
    );
    assert_eq!(detached.len(), 1, "the detached handler is tracked");
    assert!(detached.wait_for(Duration::from_secs(10)).await);
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    assert!(detached.is_empty());

    let replay = app.oneshot(request("k")).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(finished.load(Ordering::SeqCst), 1);
}
