//! The Workload API faults real SPIRE cannot be made to produce, through the stand-in
//! (`tests/support/workload_api.rs`): each must end in the documented behaviour.

use std::time::{Duration, Instant};

use crate::support::pki::Ca;
use crate::support::receiver::{Receiver, ReceiverOpts};
use crate::support::workload_api::{StandIn, Step, X509Svid, X509SvidResponse};
use crate::support::ztail::{Env, LOKI_ID, ZTAIL_ID, Ztail, append_lines, with_workload_api};
use crate::{WAIT, expected, lines_by_file};

fn response(svid: X509Svid) -> X509SvidResponse {
    X509SvidResponse {
        svids: vec![svid],
        ..Default::default()
    }
}

/// ztail configured for the stand-in, and a receiver from the same CA.
async fn setup(ca: &Ca, standin: &StandIn) -> (Env, Receiver, Ztail) {
    let env = Env::new();
    let rx = Receiver::start(ReceiverOpts::new(&ca.issue(LOKI_ID), ca)).await;
    let config = with_workload_api(&env.config(&rx.url(), "", ""), &standin.endpoint(), None);
    let zt = Ztail::start(&env, &config);
    (env, rx, zt)
}

async fn wait_metric_above(zt: &Ztail, names: &[&str], what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut total = 0.0;
        for n in names {
            total += zt.metric(n).await;
        }
        if total > 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never counted; log:\n{}",
            zt.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_error_mid_flight_keeps_shipping_and_reconnects() {
    let ca = Ca::new("example.org");
    let (a, b) = (ca.issue(ZTAIL_ID), ca.issue(ZTAIL_ID));
    // The source reads one message of a first call for its initial sync, then follows a
    // second, long-lived call.
    let standin = StandIn::start(vec![
        vec![Step::Send(response(X509Svid::from_leaf(&a, &ca)))],
        vec![
            Step::Send(response(X509Svid::from_leaf(&a, &ca))),
            Step::Wait(Duration::from_secs(2)),
            Step::Fail(14, "agent going away".into()),
        ],
        vec![Step::Send(response(X509Svid::from_leaf(&b, &ca)))],
    ]);
    let (env, rx, zt) = setup(&ca, &standin).await;
    let log = env.path("logs/app.log");
    let mut n = 0;
    let deadline = Instant::now() + WAIT;
    while !rx
        .requests()
        .iter()
        .any(|r| r.client_serial_hex == b.serial_hex)
    {
        assert!(
            Instant::now() < deadline,
            "never reconnected to get the second SVID; log:\n{}",
            zt.log()
        );
        append_lines(&log, "s", n..n + 10);
        n += 10;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(rx.wait_for(|e| e.len() >= n, WAIT).await);
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("s", 0..n)
    );
    assert!(
        rx.requests()
            .iter()
            .any(|r| r.client_serial_hex == a.serial_hex)
    );
    assert!(
        standin.calls() >= 3,
        "the client reconnected after the stream error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_is_final() {
    let ca = Ca::new("example.org");
    let standin = StandIn::start(vec![vec![Step::Fail(3, "malformed request".into())]]);
    let (env, rx, zt) = setup(&ca, &standin).await;
    append_lines(&env.path("logs/app.log"), "x", 0..10);
    let deadline = Instant::now() + WAIT;
    while !zt.log().contains("not retrying") {
        assert!(
            Instant::now() < deadline,
            "no final error logged; log:\n{}",
            zt.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(standin.calls(), 1, "InvalidArgument must not be retried");
    assert_eq!(zt.get("/readyz").await.0, 503);
    assert_eq!(rx.request_count(), 0);
}

async fn bad_update_is_skipped(bad: X509SvidResponse, what: &str) {
    let ca = Ca::new("example.org");
    let good = ca.issue(ZTAIL_ID);
    let standin = StandIn::start(vec![
        vec![Step::Send(response(X509Svid::from_leaf(&good, &ca)))],
        vec![
            Step::Send(response(X509Svid::from_leaf(&good, &ca))),
            Step::Wait(Duration::from_secs(2)),
            Step::Send(bad),
        ],
    ]);
    let (env, rx, zt) = setup(&ca, &standin).await;
    let log = env.path("logs/app.log");
    append_lines(&log, "b", 0..10);
    assert!(
        rx.wait_for(|e| e.len() >= 10, WAIT).await,
        "log:\n{}",
        zt.log()
    );
    wait_metric_above(
        &zt,
        &[
            "ztail_identity_reload_errors_total",
            "ztail_workload_api_errors_total{kind=\"update_rejected\"}",
            "ztail_workload_api_errors_total{kind=\"stream_error\"}",
        ],
        what,
    )
    .await;
    // Shipping goes on with the last good SVID.
    append_lines(&log, "b", 10..20);
    assert!(
        rx.wait_for(|e| e.len() >= 20, WAIT).await,
        "{what}: shipping stopped; log:\n{}",
        zt.log()
    );
    assert!(
        rx.requests()
            .iter()
            .all(|r| r.client_serial_hex == good.serial_hex),
        "{what}: only the good SVID is used"
    );
    assert_eq!(
        zt.get("/readyz").await.0,
        200,
        "{what}: still ready with the last good SVID"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_svid_update_is_skipped() {
    let ca = Ca::new("example.org");
    let mut bad = X509Svid::from_leaf(&ca.issue(ZTAIL_ID), &ca);
    bad.x509_svid = b"not a certificate".to_vec();
    bad_update_is_skipped(response(bad), "malformed SVID").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_svid_update_is_skipped() {
    let ca = Ca::new("example.org");
    let expired = ca.issue_expired(ZTAIL_ID);
    bad_update_is_skipped(response(X509Svid::from_leaf(&expired, &ca)), "expired SVID").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_bundle_gives_no_identity() {
    let ca = Ca::new("example.org");
    let mut svid = X509Svid::from_leaf(&ca.issue(ZTAIL_ID), &ca);
    svid.bundle.clear();
    let standin = StandIn::start(vec![vec![Step::Send(response(svid))]]);
    let (env, rx, zt) = setup(&ca, &standin).await;
    append_lines(&env.path("logs/app.log"), "e", 0..10);
    zt.wait_up().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (code, body) = zt.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(rx.request_count(), 0, "no identity, nothing sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_bundle_authenticates_another_trust_domain_only_when_the_policy_names_it() {
    let ca = Ca::new("example.org");
    let other = Ca::new("other.org");
    let ztail = ca.issue(ZTAIL_ID);
    let mut msg = response(X509Svid::from_leaf(&ztail, &ca));
    msg.federated_bundles
        .insert("spiffe://other.org".into(), other.cert_der.clone());
    let remote = Receiver::start(ReceiverOpts::new(
        &other.issue("spiffe://other.org/loki"),
        &ca,
    ))
    .await;

    for (allowed, delivered) in [
        ("spiffe://example.org/loki", false),
        ("spiffe://other.org/loki", true),
    ] {
        let standin = StandIn::start(vec![
            vec![Step::Send(msg.clone())],
            vec![Step::Send(msg.clone())],
        ]);
        let env = Env::new();
        let config = with_workload_api(
            &env.config(&remote.url(), "", ""),
            &standin.endpoint(),
            None,
        )
        .replace(
            "allowed_ids = [\"spiffe://example.org/loki\"]",
            &format!("allowed_ids = [\"{allowed}\"]"),
        );
        let zt = Ztail::start(&env, &config);
        let log = env.path("logs/app.log");
        append_lines(&log, allowed, 0..5);
        if delivered {
            assert!(
                remote.wait_for(|e| e.len() >= 5, WAIT).await,
                "a policy naming other.org must accept a Loki authenticated by its federated bundle; log:\n{}",
                zt.log()
            );
        } else {
            wait_metric_above(
                &zt,
                &["ztail_peer_refusals_total{reason=\"trust_domain_not_allowed\"}"],
                "refusal",
            )
            .await;
            assert_eq!(
                remote.request_count(),
                0,
                "a bundle alone authorizes nothing"
            );
        }
    }
}
