//! Probes against real local servers: every outcome kind, results shipped as JSON lines with
//! their labels, and none lost across a receiver outage and a ztail restart.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::WAIT;
use crate::support::http_target::{HttpTarget, Silent, closed_port};
use crate::support::receiver::{Receiver, RecordedEntry};
use crate::support::ztail::{Env, LOKI_ID, Ztail};

fn probe(name: &str, kind: &str, target: &str, extra: &str) -> String {
    format!(
        "\n[[probes]]\nname = \"{name}\"\nkind = \"{kind}\"\ntarget = \"{target}\"\ninterval = \"2s\"\ntimeout = \"300ms\"\n{extra}\n"
    )
}

/// Probe results shipped to the receiver, by probe, in run order.
fn shipped(entries: &[RecordedEntry]) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<(i128, Value)>> = BTreeMap::new();
    for e in entries
        .iter()
        .filter(|e| e.labels.get("job").map(String::as_str) == Some("ztail-probe"))
    {
        let v: Value = serde_json::from_str(&e.line)
            .unwrap_or_else(|err| panic!("not JSON: {:?}: {err}", e.line));
        assert_eq!(
            e.labels.get("probe"),
            v["probe"].as_str().map(str::to_owned).as_ref(),
            "probe label matches"
        );
        out.entry(v["probe"].as_str().unwrap().to_owned())
            .or_default()
            .push((e.timestamp_ns, v));
    }
    out.into_iter()
        .map(|(k, mut v)| {
            v.sort_by_key(|(ts, _)| *ts);
            (k, v.into_iter().map(|(_, v)| v).collect())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_shipped_as_one_result_per_run_with_its_labels() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let evil = env.receiver("spiffe://example.org/loki-evil").await;
    let tcp_up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_up_addr = tcp_up.local_addr().unwrap();
    let _accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = tcp_up.accept().await {
            held.push(s);
        }
    });
    let silent = Silent::start().await;
    let flaky = HttpTarget::start(Arc::new(|n| {
        (
            if n == 0 {
                Duration::from_secs(1)
            } else {
                Duration::ZERO
            },
            200,
            "ok",
        )
    }))
    .await;
    let unhealthy = HttpTarget::start(Arc::new(|_| (Duration::ZERO, 503, "down"))).await;
    let wrong_body = HttpTarget::start(Arc::new(|_| (Duration::ZERO, 200, "nope"))).await;
    let spiffe_tls = format!("[probes.tls]\nmode = \"spiffe\"\nallowed_ids = [\"{LOKI_ID}\"]");

    let mut config = env.config(&rx.url(), "", "");
    config += &probe(
        "tcp-up",
        "tcp",
        &tcp_up_addr.to_string(),
        "labels = { team = \"core\" }",
    );
    config += &probe(
        "tcp-refused",
        "tcp",
        &format!("127.0.0.1:{}", closed_port()),
        "",
    );
    config += &probe(
        "silent",
        "http",
        &format!("http://{}/healthz", silent.addr),
        "",
    );
    config += &probe(
        "flaky",
        "http",
        &flaky.url("/healthz"),
        "retries = 1\nbackoff = { kind = \"fixed\", delay = \"50ms\" }\nexpect_body = \"ok\"",
    );
    config += &probe("unhealthy", "http", &unhealthy.url("/"), "");
    config += &probe(
        "wrong-body",
        "http",
        &wrong_body.url("/"),
        "expect_body = \"ok\"",
    );
    config += &probe(
        "mtls-ok",
        "http",
        &format!("{}/ready", rx.url()),
        &spiffe_tls,
    );
    config += &probe(
        "mtls-impostor",
        "http",
        &format!("{}/ready", evil.url()),
        &spiffe_tls,
    );
    let zt = Ztail::start(&env, &config);

    let names = [
        "tcp-up",
        "tcp-refused",
        "silent",
        "flaky",
        "unhealthy",
        "wrong-body",
        "mtls-ok",
        "mtls-impostor",
    ];
    let ok = rx
        .wait_for(
            |e| {
                let s = shipped(e);
                names.iter().all(|n| s.contains_key(*n))
            },
            WAIT,
        )
        .await;
    let results = shipped(&rx.entries());
    assert!(
        ok,
        "not every probe's result arrived: {:?}\n{}",
        results.keys().collect::<Vec<_>>(),
        zt.log()
    );
    let first = |n: &str| results[n][0].clone();

    let r = first("tcp-up");
    assert_eq!(
        (
            r["ok"].as_bool(),
            r["attempts"].as_u64(),
            r["kind"].as_str()
        ),
        (Some(true), Some(1), Some("tcp"))
    );
    assert_eq!(first("tcp-refused")["error"], "refused");
    let r = first("silent");
    assert_eq!(r["error"], "timeout");
    let latency = r["latency_ms"].as_f64().unwrap();
    assert!(
        (300.0..350.0).contains(&latency),
        "the timeout fires at 300 ms, took {latency} ms"
    );
    let r = first("flaky");
    assert_eq!(
        (
            r["ok"].as_bool(),
            r["attempts"].as_u64(),
            r["status"].as_u64()
        ),
        (Some(true), Some(2), Some(200)),
        "{r}"
    );
    let r = first("unhealthy");
    assert_eq!(
        (r["error"].as_str(), r["status"].as_u64()),
        (Some("status_mismatch"), Some(503))
    );
    assert_eq!(first("wrong-body")["error"], "body_mismatch");
    let r = first("mtls-ok");
    assert_eq!(
        (r["ok"].as_bool(), r["peer_spiffe_id"].as_str()),
        (Some(true), Some(LOKI_ID)),
        "{r}"
    );
    assert_eq!(first("mtls-impostor")["error"], "tls_peer_refused");
    assert_eq!(evil.request_count(), 0, "an impostor gets no request");
    assert!(r["ts"].as_str().unwrap().ends_with('Z'));

    // Labels: job, probe, and the probe's own.
    let e = rx
        .entries()
        .into_iter()
        .find(|e| e.labels.get("probe").map(String::as_str) == Some("tcp-up"))
        .unwrap();
    assert_eq!(e.labels.get("team").map(String::as_str), Some("core"));
    // Metrics and `ztail status`.
    assert_eq!(zt.metric("ztail_probe_up{probe=\"tcp-up\"}").await, 1.0);
    assert!(
        zt.metric("ztail_probe_failures_total{probe=\"tcp-refused\",kind=\"refused\"}")
            .await
            >= 1.0
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["status", "--addr", &zt.admin.to_string()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("mtls-impostor") && out.contains("tls_peer_refused"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_survive_a_30s_receiver_outage_and_a_restart() {
    let env = Env::new();
    let rx: Receiver = env.receiver(LOKI_ID).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _accept = tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    let config = env.config(&rx.url(), "", "")
        + &probe("beat", "tcp", &addr.to_string(), "")
            .replace("interval = \"2s\"", "interval = \"200ms\"")
            .replace("timeout = \"300ms\"", "timeout = \"100ms\"");
    let mut zt = Ztail::start(&env, &config);
    assert!(
        rx.wait_for(
            |e| shipped(e).get("beat").is_some_and(|v| v.len() >= 3),
            WAIT
        )
        .await
    );

    rx.stop().await;
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let status = zt.terminate(Duration::from_secs(15));
    assert!(status.success());
    zt.restart();
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    rx.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = zt.terminate(Duration::from_secs(15));
    assert!(status.success());

    // Every result spooled before the final stop reached the receiver.
    let spool_dir = env.path("state/probes");
    let mut spooled = Vec::new();
    for f in ["beat.log.1", "beat.log"] {
        if let Ok(text) = std::fs::read_to_string(spool_dir.join(f)) {
            spooled.extend(text.lines().map(str::to_owned));
        }
    }
    assert!(
        spooled.len() > 100,
        "the probe ran through the outage: {} results",
        spooled.len()
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let got: HashSet<String> = rx.entries().into_iter().map(|e| e.line).collect();
        let missing: Vec<&String> = spooled.iter().filter(|l| !got.contains(*l)).collect();
        if missing.is_empty() {
            break;
        }
        // The last results before the final SIGTERM may not have been read yet: a restart ships them.
        if Instant::now() > deadline {
            panic!(
                "{} of {} results lost, e.g. {:?}",
                missing.len(),
                spooled.len(),
                missing.first()
            );
        }
        if zt.pid_if_running().is_none() {
            zt.restart();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
