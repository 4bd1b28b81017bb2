//! Processing stages through the real binary: drops counted and committed past, labels and
//! metadata made from fields, a tenant per entry with one `X-Scope-OrgID` per request, and
//! redaction, asserted at the receiver and in `/metrics`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::WAIT;
use crate::support::ztail::{Env, LOKI_ID, Ztail, append_text, checkpointed_offset};

/// A realistic pipeline: noise dropped, JSON parsed, `level` a label, `trace_id` metadata,
/// the line reduced to `msg`, a tenant per namespace, every built-in detector.
const PIPELINE: &str = r#"
[[sources.stages]]
type = "drop"
line = "DEBUG|GET /healthz"
reason = "noise"
[[sources.stages]]
type = "json"
fields = ["level", "ns", "msg", "trace_id"]
[[sources.stages]]
type = "labels"
fields = ["level"]
[[sources.stages]]
type = "metadata"
fields = ["trace_id"]
[[sources.stages]]
type = "tenant"
field = "ns"
map = { shop = "team-shop", pay = "team-pay" }
drop_unmapped = true
[[sources.stages]]
type = "output"
field = "msg"
[[sources.stages]]
type = "redact"
"#;

const AWS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";

fn json_line(level: &str, ns: &str, msg: &str, trace: usize) -> String {
    format!(
        "{{\"level\":\"{level}\",\"ns\":\"{ns}\",\"msg\":\"{msg}\",\"trace_id\":\"t{trace}\"}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_drop_label_route_tenants_and_redact_end_to_end_at_the_receiver() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let config = env.config(&rx.url(), "tenant = \"fallback\"", PIPELINE);
    let mut zt = Ztail::start(&env, &config);
    let log = env.path("logs/app.log");

    let mut text = String::new();
    let mut want = BTreeSet::new();
    for i in 0..300 {
        match i % 6 {
            0 => text.push_str(&format!("DEBUG noise {i}\n")),
            1 => text.push_str("GET /healthz 200\n"),
            2 => text.push_str(&json_line("info", "elsewhere", &format!("m{i}"), i)),
            3 => {
                text.push_str(&json_line(
                    "error",
                    "pay",
                    &format!("m{i} key {AWS_KEY}"),
                    i,
                ));
                want.insert(("team-pay", format!("m{i} key <redacted:aws_access_key>")));
            }
            _ => {
                text.push_str(&json_line("info", "shop", &format!("m{i}"), i));
                want.insert(("team-shop", format!("m{i}")));
            }
        }
    }
    append_text(&log, &text);
    assert!(
        rx.wait_for(|e| e.len() >= want.len(), WAIT).await,
        "{} of {} entries arrived",
        rx.entries().len(),
        want.len()
    );

    let entries = rx.entries();
    let got: BTreeSet<(&str, String)> = entries
        .iter()
        .map(|e| {
            let tenant = match e.tenant.as_deref() {
                Some("team-pay") => "team-pay",
                Some("team-shop") => "team-shop",
                other => panic!("entry {:?} went to tenant {other:?}", e.line),
            };
            (tenant, e.line.clone())
        })
        .collect();
    assert_eq!(
        got, want,
        "every kept entry exactly where its namespace maps"
    );
    assert_eq!(entries.len(), want.len(), "no duplicates");
    for e in &entries {
        let level = if e.tenant.as_deref() == Some("team-pay") {
            "error"
        } else {
            "info"
        };
        assert_eq!(e.labels["level"], level, "{e:?}");
        assert_eq!(e.labels["job"], "app");
        assert!(e.structured_metadata["trace_id"].starts_with('t'), "{e:?}");
        assert!(!e.line.contains(AWS_KEY));
    }
    // One tenant per request: the header names the tenant of every entry in it.
    for r in rx.requests().iter().filter(|r| r.status == 204) {
        assert!(
            matches!(r.tenant.as_deref(), Some("team-pay" | "team-shop")),
            "a request went to {:?}",
            r.tenant
        );
    }

    // Drops are counted by reason, and the checkpoint passes dropped lines: the file ends in
    // lines that are all dropped, yet its committed offset reaches its end.
    append_text(&log, "DEBUG tail 1\nDEBUG tail 2\n");
    let size = std::fs::metadata(&log).unwrap().len();
    zt.wait_metric(
        "ztail_stage_dropped_total{source=\"app\",reason=\"noise\"}",
        |v| v >= 102.0,
    )
    .await;
    assert_eq!(
        zt.metric("ztail_stage_dropped_total{source=\"app\",reason=\"tenant_unmapped\"}")
            .await,
        50.0
    );
    assert_eq!(
        zt.metric("ztail_redactions_total{source=\"app\",rule=\"aws_access_key\"}")
            .await,
        50.0
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while checkpointed_offset(&env.path("state")) < size {
        assert!(
            tokio::time::Instant::now() < deadline,
            "checkpoint stuck at {} of {size}",
            checkpointed_offset(&env.path("state"))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A restart re-sends nothing: neither what was shipped nor what was dropped.
    let before = rx.entries().len();
    assert!(zt.terminate(Duration::from_secs(10)).success());
    zt.restart();
    append_text(&log, &json_line("info", "shop", "after restart", 0));
    assert!(
        rx.wait_for(|e| e.iter().any(|e| e.line == "after restart"), WAIT)
            .await
    );
    assert_eq!(rx.entries().len(), before + 1, "nothing read twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztail_try_prints_what_each_entry_becomes_without_state_or_network() {
    let env = Env::new();
    // Nothing listens at this address and no identity files exist: `try` needs neither.
    let config = env.config("https://127.0.0.1:9", "", PIPELINE);
    let path = env.path("ztail.toml");
    std::fs::write(&path, &config).unwrap();
    let input = format!(
        "DEBUG x\n{}{}",
        json_line("warn", "shop", &format!("hi {AWS_KEY}"), 7),
        json_line("info", "nowhere", "lost", 8)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["try", "--config"])
        .arg(&path)
        .arg("--path")
        .arg(env.path("logs/app.log"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["dropped"], "noise");
    assert_eq!(lines[1]["line"], "hi <redacted:aws_access_key>");
    assert_eq!(lines[1]["labels"]["level"], "warn");
    assert_eq!(lines[1]["metadata"]["trace_id"], "t7");
    assert_eq!(lines[1]["tenant"], "team-shop");
    assert_eq!(lines[2]["dropped"], "tenant_unmapped");
    assert!(!env.path("state").exists(), "try keeps no state");
}
