//! End to end with real components only: SPIRE issues the SVIDs, ztail ships over mutual TLS to
//! `ztail-terminator`, which forwards to VictoriaLogs, an independent implementation of Loki's
//! push protocol; assertions query VictoriaLogs.

use std::time::{Duration, Instant};

use crate::support::spire::Spire;
use crate::support::store::{Terminator, VictoriaLogs};
use crate::support::ztail::{Env, LOKI_ID, ZTAIL_ID, Ztail, append_text, with_workload_api};

fn spiffe_config(env: &Env, url: &str, spire: &Spire, job: &str, body: &str) -> String {
    spiffe_config_with(env, url, spire, job, body, "")
}

fn spiffe_config_with(
    env: &Env,
    url: &str,
    spire: &Spire,
    job: &str,
    body: &str,
    extra: &str,
) -> String {
    // `protobuf-uncompressed`: protobuf in snappy's format with nothing compressed.
    let sink = match body.strip_suffix("-uncompressed") {
        Some(body) => format!("body = \"{body}\"\ncompression = \"none\""),
        None => format!("body = \"{body}\""),
    };
    let config = env.config(
        &format!("{url}/insert"),
        &(sink + "\nprovenance = true"),
        extra,
    );
    with_workload_api(&config, &spire.endpoint(), Some("ztail"))
        .replace("job = \"app\"", &format!("job = \"{job}\""))
}

const LINES: [&str; 5] = [
    "2026-11-26T06:00:00Z INFO [api] request served path=/orders status=200 took=3ms",
    "quotes \" and backslashes \\ survive",
    "unicode: grüße ✓ 日本",
    "{\"level\":\"warn\",\"msg\":\"json stays a line\"}",
    "level=error msg=\"logfmt too\" code=42",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_arrive_in_victorialogs_with_labels_and_exact_text_in_every_body_format() {
    let spire = Spire::start(true);
    spire.create_entry(LOKI_ID, "loki", 600);
    spire.create_entry(ZTAIL_ID, "ztail", 60);
    let vl = VictoriaLogs::start().await;
    let term = Terminator::start(&spire, "loki", ZTAIL_ID, vl.addr).await;

    // Probe results take the same path: a TCP probe of the store itself.
    let probe = format!(
        "\n[[probes]]\nname = \"store\"\nkind = \"tcp\"\ntarget = \"{}\"\ninterval = \"1s\"\ntimeout = \"200ms\"\n",
        vl.addr
    );
    for body in ["protobuf", "json", "protobuf-uncompressed"] {
        let env = Env::new();
        let job = format!("e2e-{body}");
        // A container log in the CRI format, beside the raw file.
        let cri_source = format!(
            "\n[[sources]]\nname = \"pods\"\ninclude = [\"logs/pods/*/*/*.log\"]\nstart_at = \"beginning\"\nformat = \"cri\"\nstream_as = \"metadata\"\npath_labels = '/pods/(?P<namespace>[^/_]+)_(?P<pod>[^/_]+)_[^/]+/(?P<container>[^/]+)/'\nlabels = {{ job = \"{job}-cri\" }}\n"
        );
        // A source with stages: its labels and fields must be queryable in the store.
        let staged_source = format!(
            r#"
[[sources]]
name = "staged"
include = ["logs/staged/*.log"]
start_at = "beginning"
labels = {{ job = "{job}-staged" }}
[[sources.stages]]
type = "drop"
line = "DEBUG"
[[sources.stages]]
type = "json"
fields = ["level", "msg", "user"]
[[sources.stages]]
type = "labels"
fields = ["level"]
[[sources.stages]]
type = "metadata"
fields = ["user"]
[[sources.stages]]
type = "output"
field = "msg"
"#
        );
        let config = spiffe_config_with(
            &env,
            &term.url(),
            &spire,
            &job,
            body,
            &format!("{cri_source}{staged_source}"),
        ) + &probe;
        let zt = Ztail::start(&env, &config);
        let pod = env.path("logs/pods/shop_web-0_uid/nginx/0.log");
        let time = crate::rfc3339(crate::an_hour_ago() + 123_456_789);
        append_text(
            &pod,
            &format!("{time} stderr P joined \n{time} stderr F across records\n"),
        );
        append_text(
            &env.path("logs/staged/app.log"),
            concat!(
                "DEBUG dropped on the node\n",
                r#"{"level":"error","msg":"payment failed","user":"u-42"}"#,
                "\n",
                r#"{"level":"info","msg":"payment ok","user":"u-43"}"#,
                "\n",
            ),
        );
        let log = env.path("logs/app.log");
        std::fs::write(
            &log,
            LINES.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        let got = vl
            .wait_for(&format!("job:={job}"), LINES.len(), Duration::from_secs(90))
            .await;
        assert_eq!(
            got.len(),
            LINES.len(),
            "{body}: {got:?}\nztail log:\n{}",
            zt.log()
        );
        let msgs: Vec<&str> = got.iter().map(|e| e["_msg"].as_str().unwrap()).collect();
        assert_eq!(msgs, LINES, "{body}: exact text, in order");

        // The CRI entry: framing stripped, partials joined, the runtime's time, labels from the
        // path, and as structured metadata its stream and the SPIFFE ID SPIRE gave ztail.
        let cri = vl
            .wait_for(&format!("job:={job}-cri"), 1, Duration::from_secs(60))
            .await;
        assert_eq!(cri.len(), 1, "{body}: {cri:?}");
        let e = &cri[0];
        assert_eq!(e["_msg"], "joined across records", "{body}: {e}");
        assert_eq!(
            e["_time"],
            time.as_str(),
            "{body}: the runtime's timestamp: {e}"
        );
        assert_eq!(
            (&e["namespace"], &e["pod"], &e["container"]),
            (&"shop".into(), &"web-0".into(), &"nginx".into()),
            "{body}: path labels: {e}"
        );
        assert_eq!(e["stream"], "stderr", "{body}: {e}");
        assert_eq!(e["agent_spiffe_id"], ZTAIL_ID, "{body}: provenance: {e}");
        // The stages' label and metadata are fields of the store's entries.
        let staged = vl
            .wait_for(
                &format!("job:={job}-staged level:=error"),
                1,
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(staged.len(), 1, "{body}: {staged:?}");
        assert_eq!(staged[0]["_msg"], "payment failed", "{body}: {}", staged[0]);
        assert_eq!(staged[0]["user"], "u-42", "{body}: {}", staged[0]);
        let all = vl
            .wait_for(&format!("job:={job}-staged"), 2, Duration::from_secs(60))
            .await;
        assert_eq!(all.len(), 2, "{body}: the DEBUG line was dropped: {all:?}");
        for e in &got {
            assert_eq!(e["job"], job.as_str(), "{body}: job label");
            assert_eq!(
                e["filename"],
                log.display().to_string().as_str(),
                "{body}: filename label"
            );
        }
    }
    let results = vl
        .wait_for("job:=ztail-probe probe:=store", 2, Duration::from_secs(60))
        .await;
    assert!(
        results.len() >= 2,
        "probe results in the store: {results:?}"
    );
    let r: serde_json::Value = serde_json::from_str(results[0]["_msg"].as_str().unwrap()).unwrap();
    assert_eq!(
        (r["probe"].as_str(), r["ok"].as_bool()),
        (Some("store"), Some(true)),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminator_with_a_disallowed_id_receives_nothing() {
    let spire = Spire::start(true);
    spire.create_entry("spiffe://example.org/loki-evil", "evil", 600);
    spire.create_entry(ZTAIL_ID, "ztail", 60);
    let vl = VictoriaLogs::start().await;
    let term = Terminator::start(&spire, "evil", ZTAIL_ID, vl.addr).await;
    let env = Env::new();
    let zt = Ztail::start(
        &env,
        &spiffe_config(&env, &term.url(), &spire, "e2e-evil", "protobuf"),
    );
    std::fs::write(env.path("logs/app.log"), "secret line\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while zt
        .metric("ztail_peer_refusals_total{reason=\"id_not_allowed\"}")
        .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "no refusal; log:\n{}", zt.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        vl.query("*").await.is_empty(),
        "the store must receive nothing through a refused terminator"
    );
}
