//! Trust: refused peers get no request at all; rotated client certificates are used without a
//! restart.

use std::fs;
use std::time::{Duration, Instant};

use crate::support::pki::Ca;
use crate::support::receiver::{Receiver, ReceiverOpts};
use crate::support::ztail::{Env, LOKI_ID, Ztail, append_lines};
use crate::{WAIT, expected, lines_by_file};

async fn assert_refused(env: &Env, rx: &Receiver, reason: &str) {
    let zt = Ztail::start(env, &env.config(&rx.url(), "", ""));
    append_lines(&env.path("logs/app.log"), "secret", 0..10);
    let metric = format!("ztail_peer_refusals_total{{reason=\"{reason}\"}}");
    let deadline = Instant::now() + WAIT;
    while zt.metric(&metric).await < 2.0 || rx.stats().handshake_failures < 2 {
        assert!(
            Instant::now() < deadline,
            "no refusal {reason} reported; log:\n{}",
            zt.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        rx.request_count(),
        0,
        "a refused peer must never see an HTTP request"
    );
    assert!(rx.entries().is_empty());
    let (code, body) = zt.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(zt.log().contains("refused"), "the refusal is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_disallowed_spiffe_id_gets_no_request() {
    let env = Env::new();
    let rx = env.receiver("spiffe://example.org/loki-evil").await;
    assert_refused(&env, &rx, "id_not_allowed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_another_ca_gets_no_request() {
    let env = Env::new();
    let other = Ca::new("example.org");
    let leaf = other.issue(LOKI_ID);
    let rx = Receiver::start(ReceiverOpts::new(&leaf, &env.ca)).await;
    assert_refused(&env, &rx, "untrusted_chain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_an_expired_certificate_gets_no_request() {
    let env = Env::new();
    let leaf = env.ca.issue_expired(LOKI_ID);
    let rx = Receiver::start(ReceiverOpts::new(&leaf, &env.ca)).await;
    assert_refused(&env, &rx, "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_cert_files_are_used_without_a_restart() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "c", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);
    let first_serial = env.client.serial_hex.clone();
    assert!(
        rx.requests()
            .iter()
            .all(|r| r.client_serial_hex == first_serial)
    );
    let pid = zt.pid();

    // Rotate like spiffe-helper: new files written beside, then renamed into place.
    let next = env.ca.issue("spiffe://example.org/ztail");
    let staging = env.path("staging");
    fs::create_dir_all(&staging).unwrap();
    let (cert, key) = next.write(&staging, "ztail");
    fs::rename(key, env.path("certs/ztail.key")).unwrap();
    fs::rename(cert, env.path("certs/ztail.crt")).unwrap();

    let deadline = Instant::now() + WAIT;
    let mut n = 100;
    while !rx
        .requests()
        .iter()
        .any(|r| r.client_serial_hex == next.serial_hex)
    {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never presented; log:\n{}",
            zt.log()
        );
        append_lines(&log, "c", n..n + 10);
        n += 10;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(rx.wait_for(|e| e.len() >= n, WAIT).await);
    assert_eq!(zt.pid(), pid, "no restart");
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("c", 0..n)
    );
    let (_, status) = zt.get("/status").await;
    assert!(
        status.contains(&next.serial_hex),
        "/status shows the new serial: {status}"
    );
}
