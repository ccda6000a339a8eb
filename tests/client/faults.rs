//! Lost responses, resets, delays, and a server that keeps failing: each logical request runs
//! once, and the client gets the original answer or, after its bounds, the last error.

use std::time::Duration;

use http::Method;
use tower_idempotency::IdempotencyKey;

use crate::proxy::{Fault, FaultyProxy};
use crate::server::Server;
use crate::{SENDERS, post, quick, send, until};

#[tokio::test]
async fn lost_responses_and_resets_run_each_request_once_and_return_the_original_answer() {
    use Fault::*;
    // (faults of the attempts, whether the final answer is a replay)
    let scripts: &[(&[Fault], bool)] = &[
        (&[Pass], false),
        (&[DropResponse, Pass], true),
        (&[ResetAfterForward, Pass], true),
        (&[ResetBeforeForward, Pass], false),
        (
            &[ResetBeforeForward, DropResponse, ResetAfterForward, Pass],
            true,
        ),
    ];
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        let mut keys = Vec::new();
        for (i, (faults, replayed)) in scripts.iter().enumerate() {
            let order = format!("o-{i}");
            proxy.script(faults.iter().copied());
            let body = format!(r#"{{"order":"{order}"}}"#);
            let answer = post(sender, quick(), &proxy.url("/orders"), &body)
                .await
                .unwrap_or_else(|e| panic!("{sender:?} {faults:?}: {e:?}"));
            let what = format!("{sender:?} {faults:?}");
            assert_eq!(answer.status, 200, "{what}");
            assert_eq!(server.seen.runs_of(&order), 1, "{what}: runs");
            assert_eq!(answer.json()["order"], order.as_str(), "{what}");
            // The original answer: the run number of the one execution, replayed or not.
            assert_eq!(
                answer.json()["run"].as_u64(),
                server.seen.run_of(&order).map(|r| r as u64),
                "{what}"
            );
            assert_eq!(answer.outcome.attempts() as usize, faults.len(), "{what}");
            assert_eq!(answer.outcome.replayed(), *replayed, "{what}");
            let key = answer.outcome.key().expect("a POST is sent with a key");
            assert_eq!(
                server.seen.keys().last(),
                Some(&key.as_str().to_owned()),
                "{what}"
            );
            keys.push(key.clone());
        }
        assert_eq!(server.seen.runs(), scripts.len(), "{sender:?}");
        assert_eq!(
            proxy.connections(),
            scripts.iter().map(|s| s.0.len()).sum::<usize>()
        );
        keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        keys.dedup();
        assert_eq!(
            keys.len(),
            scripts.len(),
            "{sender:?}: one key per logical request"
        );
    }
}

#[tokio::test]
async fn a_delayed_response_times_out_and_the_retry_gets_the_replay() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        proxy.script([Fault::Delay(Duration::from_millis(800))]);
        let layer = quick().attempt_timeout(Duration::from_millis(150));
        let answer = post(sender, layer, &proxy.url("/orders"), r#"{"order":"late"}"#)
            .await
            .unwrap_or_else(|e| panic!("{sender:?}: {e:?}"));
        assert_eq!(answer.status, 200, "{sender:?}");
        assert!(
            answer.outcome.attempts() >= 2,
            "{sender:?}: {:?}",
            answer.outcome
        );
        assert!(answer.outcome.replayed(), "{sender:?}");
        assert_eq!(server.seen.runs_of("late"), 1, "{sender:?}");
        assert_eq!(answer.json()["run"], 1, "{sender:?}");
    }
}

#[tokio::test]
async fn a_409_in_flight_is_waited_for_and_the_replay_returned() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        let url = proxy.url("/slow");
        let key = IdempotencyKey::new_v4();
        let body = r#"{"order":"slow"}"#;
        let spawn = |key: IdempotencyKey| {
            let url = url.clone();
            tokio::spawn(
                async move { send(sender, quick(), Method::POST, &url, body, Some(key)).await },
            )
        };
        let first = spawn(key.clone());
        until("the first request runs", || {
            server
                .seen
                .slow_started
                .load(std::sync::atomic::Ordering::SeqCst)
                == 1
        })
        .await;
        // The same operation sent again while the first still runs: the server answers 409
        // with Retry-After until the first completes.
        let second = spawn(key);
        until("a 409", || {
            server
                .seen
                .conflicts
                .load(std::sync::atomic::Ordering::SeqCst)
                >= 1
        })
        .await;
        server.seen.gate.0.add_permits(1);
        let first = first
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{sender:?}: {e:?}"));
        let second = second
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{sender:?}: {e:?}"));
        assert_eq!((first.status, second.status), (200, 200), "{sender:?}");
        assert_eq!(first.outcome.attempts(), 1, "{sender:?}");
        assert!(!first.outcome.replayed(), "{sender:?}");
        assert!(
            second.outcome.attempts() >= 2,
            "{sender:?}: {:?}",
            second.outcome
        );
        assert!(second.outcome.replayed(), "{sender:?}");
        assert_eq!(second.body, first.body, "{sender:?}: the original answer");
        assert_eq!(server.seen.runs(), 1, "{sender:?}");
    }
}

#[tokio::test]
async fn a_server_that_keeps_failing_ends_after_the_bound() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;

        // Every connection reset: the last transport error, after exactly three attempts.
        proxy.then(Fault::ResetBeforeForward);
        let failure = post(
            sender,
            quick().max_attempts(3),
            &proxy.url("/orders"),
            r#"{"order":"x"}"#,
        )
        .await
        .expect_err("every attempt was reset");
        assert!(failure.is_transport(), "{sender:?}: {failure:?}");
        assert_eq!(proxy.connections(), 3, "{sender:?}");
        assert_eq!(server.seen.runs(), 0, "{sender:?}");

        // Every answer a 500: the last one, after three runs, all with the same key.
        proxy.then(Fault::Pass);
        let answer = post(
            sender,
            quick().max_attempts(3),
            &proxy.url("/fail"),
            r#"{"order":"f"}"#,
        )
        .await
        .unwrap_or_else(|e| panic!("{sender:?}: {e:?}"));
        assert_eq!(answer.status, 500, "{sender:?}");
        assert_eq!(answer.outcome.attempts(), 3, "{sender:?}");
        assert_eq!(answer.json()["run"], 3, "{sender:?}: the last answer");
        let key = answer.outcome.key().unwrap().as_str().to_owned();
        assert_eq!(server.seen.keys(), vec![key; 3], "{sender:?}");

        // With retries of 5xx turned off, one attempt.
        let answer = post(
            sender,
            quick().retry_server_errors(false),
            &proxy.url("/fail"),
            r#"{"order":"g"}"#,
        )
        .await
        .unwrap();
        assert_eq!(
            (answer.status, answer.outcome.attempts()),
            (500, 1),
            "{sender:?}"
        );
    }
}

#[tokio::test]
async fn a_key_of_the_callers_own_lets_a_restarted_process_finish_the_operation() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        let url = proxy.url("/orders");
        let body = r#"{"order":"o-77"}"#;
        // The key is kept with the order, so it outlives the process that first sent it.
        let key = IdempotencyKey::new("order-77:paid").unwrap();

        // Every response lost: the sender gives up (and, say, its process dies).
        proxy.then(Fault::DropResponse);
        let failure = send(
            sender,
            quick().max_attempts(2),
            Method::POST,
            &url,
            body,
            Some(key.clone()),
        )
        .await
        .expect_err("every response was lost");
        assert!(failure.is_transport(), "{sender:?}: {failure:?}");

        // A new process, a new client: same key, same body.
        proxy.then(Fault::Pass);
        let answer = send(sender, quick(), Method::POST, &url, body, Some(key.clone()))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{sender:?}");
        assert!(answer.outcome.replayed(), "{sender:?}");
        assert_eq!(answer.outcome.key(), Some(&key), "{sender:?}");
        assert_eq!(server.seen.runs_of("o-77"), 1, "{sender:?}");
        assert_eq!(
            server.seen.keys(),
            vec!["order-77:paid".to_owned()],
            "{sender:?}"
        );
    }
}
