//! The Loki status-code policy and both body formats, asserted at the receiver.

use std::time::Duration;

use crate::support::receiver::Fault;
use crate::support::ztail::{Env, LOKI_ID, Ztail, append_lines};
use crate::{WAIT, expected, lines_by_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_and_500_until_they_succeed() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults([
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        Fault::Status(500),
        Fault::Status(503),
        Fault::Reset,
        Fault::TooManyRequests {
            retry_after_secs: 0,
        },
    ]);
    let zt = Ztail::start(&env, &env.config(&rx.url(), "tenant = \"team-a\"", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "r", 0..100);
    assert!(
        rx.wait_for(|e| e.len() >= 100, WAIT).await,
        "lines never arrived"
    );
    let statuses: Vec<u16> = rx.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        &statuses[..5],
        &[429, 500, 503, 0, 429],
        "faults served in order"
    );
    assert!(statuses[5..].iter().all(|s| *s == 204), "{statuses:?}");
    let entries = rx.entries();
    assert_eq!(entries.len(), 100, "a retry must not duplicate");
    assert!(
        entries
            .iter()
            .all(|e| e.tenant.as_deref() == Some("team-a"))
    );
    assert_eq!(
        lines_by_file(&entries)[&log.display().to_string()],
        expected("r", 0..100)
    );
    assert!(zt.metric("ztail_push_retries_total").await >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_drops_only_what_loki_refused_and_the_pipeline_goes_on() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults([Fault::PartialBadRequest {
        drop_lines_containing: "p 00000007".into(),
        reason: "line_too_long".into(),
    }]);
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "p", 0..50);
    assert!(rx.wait_for(|e| e.len() >= 49, WAIT).await);
    append_lines(&log, "p", 50..100);
    assert!(
        rx.wait_for(|e| e.len() >= 99, WAIT).await,
        "the pipeline stalled after a 400"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = &lines_by_file(&rx.entries())[&log.display().to_string()];
    let mut want = expected("p", 0..100);
    want.remove(7);
    assert_eq!(
        lines, &want,
        "400 is final: the refused line is not retried, the rest is kept"
    );
    assert!(
        zt.metric("ztail_dropped_entries_total{reason=\"line_too_long\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_splits_the_batch_until_it_fits() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.set_max_entries_per_request(Some(300));
    let _zt = Ztail::start(
        &env,
        &env.config(&rx.url(), "", "")
            .replace("batch_wait = \"100ms\"", "batch_wait = \"2s\""),
    );
    let log = env.path("logs/app.log");
    append_lines(&log, "s", 0..2000);
    assert!(
        rx.wait_for(|e| e.len() >= 2000, WAIT).await,
        "split batches never all arrived"
    );
    let requests = rx.requests();
    assert!(
        requests.iter().any(|r| r.status == 413),
        "no 413 was provoked"
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.status == 204)
            .all(|r| r.stored_entries <= 300)
    );
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("s", 0..2000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_carry_the_same_lines_and_labels() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let _zt = Ztail::start(&env, &env.config(&rx.url(), "body = \"json\"", ""));
    let log = env.path("logs/app.log");
    std::fs::write(
        &log,
        "plain\nquote \" and \\ backslash\r\nunicode é ✓\n\nbad \u{fffd}\n",
    )
    .unwrap();
    assert!(rx.wait_for(|e| e.len() >= 5, WAIT).await);
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        [
            "plain",
            "quote \" and \\ backslash",
            "unicode é ✓",
            "",
            "bad \u{fffd}"
        ]
    );
    assert!(
        rx.requests()
            .iter()
            .all(|r| r.content_type.as_deref() == Some("application/json"))
    );
}
