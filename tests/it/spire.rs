//! Identity from a real SPIRE (server + agent built from the pinned release): SVIDs of 60 s
//! rotate under load, the agent goes away and comes back, entries are deleted and re-created,
//! and receivers with the wrong identity get nothing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffe::X509Source;
use spiffe::x509_source::SvidPicker;

use crate::support::receiver::{Receiver, ReceiverOpts};
use crate::support::spire::Spire;
use crate::support::ztail::{
    Env, LOKI_ID, ZTAIL_ID, Ztail, append_lines, free_port, with_workload_api,
};
use crate::{WAIT, expected, lines_by_file};

struct Hint(&'static str);

impl SvidPicker for Hint {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0))
    }
}

async fn source(spire: &Spire, hint: &'static str) -> X509Source {
    X509Source::builder()
        .endpoint(spire.endpoint())
        .picker(Hint(hint))
        .initial_sync_timeout(Duration::from_secs(60))
        .build()
        .await
        .unwrap_or_else(|e| panic!("no SVID with hint {hint} from SPIRE: {e}\n{}", spire.logs()))
}

/// A receiver whose live SVID comes from SPIRE (hint `hint`) and that accepts only ztail.
async fn spire_receiver(spire: &Spire, hint: &'static str, port: u16) -> (Receiver, X509Source) {
    let src = source(spire, hint).await;
    let config = spiffe_rustls::mtls_server(src.clone())
        .authorize(spiffe_rustls::authorizer::exact([ZTAIL_ID]).unwrap())
        .build()
        .unwrap();
    let rx =
        Receiver::start(ReceiverOpts::with_server_config(Arc::new(config)).with_port(port)).await;
    (rx, src)
}

fn spiffe_config(env: &Env, url: &str, endpoint: &str) -> String {
    with_workload_api(&env.config(url, "", ""), endpoint, Some("ztail"))
}

async fn status_serial(zt: &Ztail) -> Option<String> {
    let (code, body) = zt.get("/status").await;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["identity"]["serial"].as_str().map(str::to_owned)
}

async fn wait_ready(zt: &Ztail, want: u16) {
    let deadline = Instant::now() + WAIT;
    while zt.get("/readyz").await.0 != want {
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {want}; log:\n{}",
            zt.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ships_for_five_minutes_through_svid_rotations() {
    let spire = Spire::start(true);
    spire.create_entry(LOKI_ID, "loki", 600);
    spire.create_entry(ZTAIL_ID, "ztail", 60);
    let (rx, _src) = spire_receiver(&spire, "loki", 0).await;
    let env = Env::new();
    let zt = Ztail::start(&env, &spiffe_config(&env, &rx.url(), &spire.endpoint()));
    let log = env.path("logs/app.log");
    let pid = zt.pid();

    // serial → (first seen in ztail's /status, first seen at the receiver)
    let mut seen: BTreeMap<String, (Option<Instant>, Option<Instant>)> = BTreeMap::new();
    let started = Instant::now();
    let mut n = 0;
    // Run five minutes, then on (at most 15 s) until the serial ztail published last has reached
    // the receiver: a rotation in the loop's final moment is not a failure to use it.
    let unreceived = |seen: &BTreeMap<String, (Option<Instant>, Option<Instant>)>| {
        seen.values().any(|(p, r)| p.is_some() && r.is_none())
    };
    while started.elapsed() < Duration::from_secs(300)
        || (unreceived(&seen) && started.elapsed() < Duration::from_secs(315))
    {
        append_lines(&log, "rot", n..n + 20);
        n += 20;
        if let Some(serial) = status_serial(&zt).await {
            seen.entry(serial)
                .or_default()
                .0
                .get_or_insert_with(Instant::now);
        }
        for r in rx.requests() {
            seen.entry(r.client_serial_hex)
                .or_default()
                .1
                .get_or_insert_with(Instant::now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        rx.wait_for(|e| e.len() >= n, WAIT).await,
        "only {} of {n} lines arrived; log:\n{}",
        rx.entries().len(),
        zt.log()
    );
    assert_eq!(zt.pid(), pid, "no restart");
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("rot", 0..n)
    );

    let rotations = seen.len().saturating_sub(1);
    assert!(
        rotations >= 5,
        "only {rotations} rotations in 5 minutes: {seen:?}"
    );
    for (serial, (published, received)) in &seen {
        let published =
            published.unwrap_or_else(|| panic!("receiver saw {serial}, never shown by ztail"));
        let received = received
            .unwrap_or_else(|| panic!("ztail published {serial}, the receiver never saw it"));
        let delay = received.saturating_duration_since(published);
        assert!(
            delay < Duration::from_secs(5),
            "serial {serial} reached the receiver {delay:?} after ztail had it"
        );
    }
    // No connection outlives its SVID: once a newer serial is used, an older one never is.
    let order: Vec<String> = rx
        .requests()
        .into_iter()
        .map(|r| r.client_serial_hex)
        .collect();
    let mut retired = HashSet::new();
    for w in order.windows(2) {
        if w[0] != w[1] {
            retired.insert(w[0].clone());
            assert!(
                !retired.contains(&w[1]),
                "serial {} used again after rotation",
                w[1]
            );
        }
    }
    eprintln!("{rotations} rotations, {n} lines, {} requests", order.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_before_the_agent_and_the_entry_it_waits_then_ships_everything() {
    let mut spire = Spire::start(false);
    let port = free_port();
    let env = Env::new();
    let zt = Ztail::start(
        &env,
        &spiffe_config(
            &env,
            &format!("https://127.0.0.1:{port}"),
            &spire.endpoint(),
        ),
    );
    let log = env.path("logs/app.log");
    append_lines(&log, "early", 0..100);
    zt.wait_up().await;
    // No agent: not ready and nothing sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, body) = zt.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for identity"), "{body}");
    assert_eq!(
        zt.metric("ztail_push_requests_total{status=\"204\"}").await,
        0.0
    );

    // Agent up, but no entry for ztail yet: still waiting.
    spire.start_agent();
    spire.create_entry(LOKI_ID, "loki", 600);
    let (rx, _src) = spire_receiver(&spire, "loki", port).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(zt.get("/readyz").await.0, 503);
    assert_eq!(
        rx.request_count(),
        0,
        "nothing may be sent without an identity"
    );
    assert!(
        zt.log().contains("waiting for identity"),
        "the wait is logged"
    );

    spire.create_entry(ZTAIL_ID, "ztail", 60);
    append_lines(&log, "early", 100..200);
    assert!(
        rx.wait_for(|e| e.len() >= 200, WAIT).await,
        "log:\n{}",
        zt.log()
    );
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("early", 0..200)
    );
    wait_ready(&zt, 200).await;
    assert!(
        rx.requests()
            .iter()
            .all(|r| r.client_spiffe_id.as_deref() == Some(ZTAIL_ID))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_killed_and_restarted_mid_stream_loses_nothing() {
    let mut spire = Spire::start(true);
    spire.create_entry(LOKI_ID, "loki", 600);
    spire.create_entry(ZTAIL_ID, "ztail", 60);
    let (rx, _src) = spire_receiver(&spire, "loki", 0).await;
    let env = Env::new();
    let zt = Ztail::start(&env, &spiffe_config(&env, &rx.url(), &spire.endpoint()));
    let pid = zt.pid();
    let log = env.path("logs/app.log");
    append_lines(&log, "a", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);

    spire.kill_agent();
    for i in 0..10 {
        append_lines(&log, "a", 100 + i * 10..110 + i * 10);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    spire.start_agent();
    append_lines(&log, "a", 200..300);
    assert!(
        rx.wait_for(|e| e.len() >= 300, WAIT).await,
        "log:\n{}",
        zt.log()
    );
    assert_eq!(zt.pid(), pid, "no ztail restart");
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("a", 0..300)
    );
    assert!(
        zt.metric("ztail_workload_api_errors_total{kind=\"reconnect\"}")
            .await
            + zt.metric("ztail_workload_api_errors_total{kind=\"stream_error\"}")
                .await
            + zt.metric("ztail_workload_api_errors_total{kind=\"stream_connect\"}")
                .await
            > 0.0,
        "the agent's absence shows in the Workload API error metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_entry_stops_shipping_and_a_recreated_one_resumes_without_loss() {
    let spire = Spire::start(true);
    spire.create_entry(LOKI_ID, "loki", 600);
    let entry = spire.create_entry(ZTAIL_ID, "ztail", 60);
    let (rx, _src) = spire_receiver(&spire, "loki", 0).await;
    let env = Env::new();
    let zt = Ztail::start(&env, &spiffe_config(&env, &rx.url(), &spire.endpoint()));
    let log = env.path("logs/app.log");
    append_lines(&log, "d", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);

    spire.delete_entry(&entry);
    // The agent's next update no longer carries ztail's SVID; ztail ships with the one it holds
    // until that expires (at most the 60 s TTL), then stops and reports not ready.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !zt.get("/readyz").await.1.contains("waiting for identity") {
        assert!(
            Instant::now() < deadline,
            "still ready long after the SVID expired; log:\n{}",
            zt.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let requests_at_withdrawal = rx.request_count();
    append_lines(&log, "d", 100..200);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        rx.request_count(),
        requests_at_withdrawal,
        "nothing is sent without a valid SVID"
    );

    spire.create_entry(ZTAIL_ID, "ztail", 60);
    assert!(
        rx.wait_for(|e| e.len() >= 200, WAIT).await,
        "log:\n{}",
        zt.log()
    );
    wait_ready(&zt, 200).await;
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("d", 0..200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_with_a_disallowed_id_or_an_unnamed_trust_domain_get_no_request() {
    let spire = Spire::start(true);
    spire.create_entry("spiffe://example.org/loki-evil", "evil", 600);
    spire.create_entry(ZTAIL_ID, "ztail", 60);
    let (evil, _src) = spire_receiver(&spire, "evil", 0).await;

    // A server of another trust domain, trusting SPIRE's CA for client certificates.
    let other = crate::support::pki::Ca::new("other.org");
    let leaf = other.issue("spiffe://other.org/loki");
    let foreign = Receiver::start(ReceiverOpts::from_pem(
        &leaf.cert_pem,
        &leaf.key_pem,
        &spire.bundle_pem(),
    ))
    .await;

    for (rx, reason) in [
        (&evil, "id_not_allowed"),
        (&foreign, "trust_domain_not_allowed"),
    ] {
        let env = Env::new();
        let zt = Ztail::start(&env, &spiffe_config(&env, &rx.url(), &spire.endpoint()));
        append_lines(&env.path("logs/app.log"), "secret", 0..10);
        let metric = format!("ztail_peer_refusals_total{{reason=\"{reason}\"}}");
        let deadline = Instant::now() + WAIT;
        while zt.metric(&metric).await < 1.0 {
            assert!(
                Instant::now() < deadline,
                "no {reason} refusal; log:\n{}",
                zt.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            rx.request_count(),
            0,
            "{reason}: a refused peer must never see a request"
        );
        assert_eq!(zt.get("/readyz").await.0, 503);
    }
}
