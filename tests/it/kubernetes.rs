//! Kubernetes metadata against a real kube-apiserver (with etcd): pod labels, annotations and
//! namespace labels on the streams and entries, per-pod controls by annotation, label changes,
//! deleted pods, an API server outage and a rotated service-account token.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::WAIT;
use crate::support::kube::{Kube, NODE, cri, cri_at, log_path};
use crate::support::receiver::RecordedEntry;
use crate::support::spire::Spire;
use crate::support::store::{Terminator, VictoriaLogs};
use crate::support::ztail::{Env, LOKI_ID, ZTAIL_ID, Ztail, append_text, with_workload_api};

fn config(env: &Env, kube: &Kube, url: &str) -> String {
    let extra = format!(
        r#"
[[sources]]
name = "pods"
include = ["pods/*/*/*.log"]
format = "cri"
start_at = "beginning"
path_labels = '/pods/(?P<namespace>[^/_]+)_(?P<pod>[^/_]+)_[^/]+/(?P<container>[^/]+)/'
[sources.formats.java]
multiline = {{ start = '^\d{{4}}-' }}

[kubernetes]
node_name = "{NODE}"
api_server = "{api}"
token_file = "token"
ca_file = "{ca}"
wait = "2s"
tenants = ["team-c"]
annotation_labels = ["tier"]
[kubernetes.labels]
app = "pod_label:app.kubernetes.io/name"
team = "namespace_label:team"
[kubernetes.metadata]
image = "container_image"
commit = "pod_annotation:example.com/commit"
workload = "workload"
"#,
        api = kube.url(),
        ca = kube.ca_file().display(),
    );
    env.config(url, "", &extra)
}

fn of_pod<'a>(entries: &'a [RecordedEntry], pod: &str) -> Vec<&'a RecordedEntry> {
    entries
        .iter()
        .filter(|e| e.labels.get("pod").map(String::as_str) == Some(pod))
        .collect()
}

fn lines(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix} {i}")).collect()
}

async fn wait_lines(rx: &crate::support::receiver::Receiver, pod: &str, n: usize) -> bool {
    rx.wait_for(|e| of_pod(e, pod).len() >= n, WAIT).await
}

fn labels(e: &RecordedEntry) -> BTreeMap<&str, &str> {
    e.labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// An API server with the `shop` namespace (label `team=shop-team`), and a test env holding
/// ztail's service-account token; the kubelet's `pods/` directory is in the env.
async fn cluster() -> (Kube, Env) {
    let kube = Kube::start().await;
    let env = Env::new();
    kube.ztail_token("token-1", &env.path("token")).await;
    kube.namespace("shop", json!({"team": "shop-team"})).await;
    (kube, env)
}

/// Pod `web-7d4b9-abcde` of Deployment `web` (ReplicaSet `web-7d4b9`) in `shop`; its UID.
async fn web_pod(kube: &Kube, annotations: serde_json::Value) -> String {
    kube.pod(
        "shop",
        "web-7d4b9-abcde",
        json!({"app.kubernetes.io/name": "web", "pod-template-hash": "7d4b9"}),
        annotations,
        Some("web-7d4b9"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_and_namespace_metadata_reach_the_receiver_and_annotations_control_each_pod() {
    let (kube, env) = cluster().await;
    let root = env.dir.path();

    // A pod that exists before ztail starts.
    let web = web_pod(
        &kube,
        json!({"example.com/commit": "abc123", "ztail.io/labels": "tier=frontend",
               "ztail.io/tenant": "not-allowed"}),
    )
    .await;
    let web_log = log_path(root, "shop", "web-7d4b9-abcde", &web);
    append_text(&web_log, &cri(&lines("web", 0..20)));

    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &config(&env, &kube, &rx.url()));
    assert!(
        wait_lines(&rx, "web-7d4b9-abcde", 20).await,
        "web's lines never arrived; log:\n{}",
        zt.log()
    );
    for e in of_pod(&rx.entries(), "web-7d4b9-abcde") {
        let l = labels(e);
        assert_eq!(l["app"], "web", "{e:?}");
        assert_eq!(l["team"], "shop-team", "{e:?}");
        assert_eq!(l["tier"], "frontend", "{e:?}");
        assert_eq!(l["namespace"], "shop");
        assert_eq!(l["container"], "app");
        assert_eq!(
            e.structured_metadata.get("image").map(String::as_str),
            Some("registry.example/web-7d4b9-abcde:1.0")
        );
        assert_eq!(
            e.structured_metadata.get("commit").map(String::as_str),
            Some("abc123")
        );
        assert_eq!(
            e.structured_metadata.get("workload").map(String::as_str),
            Some("web")
        );
        assert_eq!(
            e.tenant, None,
            "a tenant outside kubernetes.tenants is refused"
        );
    }
    assert!(
        zt.log().contains("not-allowed"),
        "the refused tenant annotation is logged"
    );

    // Pods created while ztail runs: one excluded, one choosing a format and a tenant.
    let quiet = kube
        .pod(
            "shop",
            "quiet",
            json!({}),
            json!({"ztail.io/exclude": "true"}),
            None,
        )
        .await;
    let java = kube
        .pod(
            "shop",
            "java",
            json!({"app.kubernetes.io/name": "billing"}),
            json!({"ztail.io/format": "java", "ztail.io/tenant": "team-c"}),
            None,
        )
        .await;
    append_text(
        &log_path(root, "shop", "quiet", &quiet),
        &cri(&lines("quiet", 0..10)),
    );
    let trace: Vec<String> = (0..3)
        .flat_map(|i| {
            [
                format!("2026-12-04 error {i}"),
                "  at a.b(C.java:1)".to_owned(),
                "  at d.e(F.java:2)".to_owned(),
            ]
        })
        .chain(["2026-12-04 done".to_owned()])
        .collect();
    append_text(&log_path(root, "shop", "java", &java), &cri(&trace));
    assert!(
        wait_lines(&rx, "java", 3).await,
        "java's entries never arrived; log:\n{}",
        zt.log()
    );
    let got = rx.entries();
    let java_entries = of_pod(&got, "java");
    assert_eq!(
        java_entries[0].line, "2026-12-04 error 0\n  at a.b(C.java:1)\n  at d.e(F.java:2)",
        "the pod's format joins its stack traces"
    );
    assert!(
        java_entries
            .iter()
            .all(|e| e.tenant.as_deref() == Some("team-c") && labels(e)["app"] == "billing")
    );
    zt.wait_metric(
        "ztail_stage_dropped_total{source=\"pods\",reason=\"excluded\"}",
        |v| v >= 10.0,
    )
    .await;
    assert!(
        of_pod(&rx.entries(), "quiet").is_empty(),
        "excluded pod shipped"
    );

    // A label changed on the running pod: new lines take it.
    kube.label_pod(
        "shop",
        "web-7d4b9-abcde",
        json!({"app.kubernetes.io/name": "web-v2"}),
    )
    .await;
    // ztail has the change once a line written now arrives with it.
    for n in 0.. {
        assert!(n < 200, "the new label never arrived; log:\n{}", zt.log());
        let probe = format!("probe {n}");
        append_text(&web_log, &cri(std::slice::from_ref(&probe)));
        assert!(
            rx.wait_for(|e| e.iter().any(|e| e.line == probe), WAIT)
                .await,
            "log:\n{}",
            zt.log()
        );
        let got = rx.entries();
        if got
            .iter()
            .any(|e| e.line == probe && labels(e)["app"] == "web-v2")
        {
            break;
        }
    }
    let before = of_pod(&rx.entries(), "web-7d4b9-abcde").len();
    append_text(&web_log, &cri(&lines("relabelled", 20..30)));
    assert!(wait_lines(&rx, "web-7d4b9-abcde", before + 10).await);
    let relabelled = of_pod(&rx.entries(), "web-7d4b9-abcde")
        .into_iter()
        .filter(|e| e.line.starts_with("relabelled"))
        .map(|e| labels(e)["app"].to_owned())
        .collect::<Vec<_>>();
    assert_eq!(relabelled, vec!["web-v2"; 10]);

    // The pod deleted: its remaining lines keep its labels.
    kube.delete_pod("shop", "web-7d4b9-abcde").await;
    // ztail has seen the deletion once its status counts the pod as deleted.
    let deadline = std::time::Instant::now() + WAIT;
    while !zt.get("/status").await.1.contains("\"pods_deleted\": 1") {
        assert!(std::time::Instant::now() < deadline, "deletion never seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = of_pod(&rx.entries(), "web-7d4b9-abcde").len();
    append_text(&web_log, &cri(&lines("deleted", 30..40)));
    assert!(wait_lines(&rx, "web-7d4b9-abcde", before + 10).await);
    let deleted: Vec<_> = of_pod(&rx.entries(), "web-7d4b9-abcde")
        .into_iter()
        .filter(|e| e.line.starts_with("deleted"))
        .cloned()
        .collect();
    assert_eq!(deleted.len(), 10);
    for e in &deleted {
        assert_eq!(labels(e)["app"], "web-v2");
        assert_eq!(labels(e)["team"], "shop-team");
    }
    let (code, status) = zt.get("/status").await;
    assert_eq!(code, 200);
    assert!(status.contains("\"pods_listed\": true"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_and_a_rotated_token_stop_nothing() {
    let (mut kube, env) = cluster().await;
    let root = env.dir.path().to_owned();
    let web = kube
        .pod(
            "shop",
            "web",
            json!({"app.kubernetes.io/name": "web"}),
            json!({}),
            None,
        )
        .await;
    let web_log = log_path(&root, "shop", "web", &web);
    append_text(&web_log, &cri(&lines("web", 0..10)));
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &config(&env, &kube, &rx.url()));
    assert!(wait_lines(&rx, "web", 10).await, "log:\n{}", zt.log());
    assert_eq!(zt.metric("ztail_kubernetes_api_up").await, 1.0);

    // The token rotates (the kubelet rewrites the projected file) and the old one is revoked.
    kube.ztail_token("token-2", &env.path("token")).await;
    kube.delete_secret("token-1").await;

    // The API server goes away for a minute.
    kube.stop_apiserver();
    append_text(&web_log, &cri(&lines("web", 10..20)));
    assert!(wait_lines(&rx, "web", 20).await, "log:\n{}", zt.log());
    assert!(
        of_pod(&rx.entries(), "web")
            .iter()
            .all(|e| labels(e)["app"] == "web"),
        "the cached metadata is used during the outage"
    );
    // A pod the cache does not know ships after the wait with its path's labels, counted.
    let unknown = log_path(&root, "shop", "new", "11111111-2222-3333-4444-555555555555");
    append_text(&unknown, &cri(&lines("new", 0..5)));
    assert!(wait_lines(&rx, "new", 5).await, "log:\n{}", zt.log());
    for e in of_pod(&rx.entries(), "new") {
        assert!(!e.labels.contains_key("app"), "{e:?}");
        assert_eq!(labels(e)["namespace"], "shop");
    }
    zt.wait_metric("ztail_kubernetes_metadata_missing_total", |v| v >= 1.0)
        .await;
    zt.wait_metric("ztail_kubernetes_api_up", |v| v == 0.0)
        .await;
    let (code, body) = zt.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("kubernetes metadata unavailable"), "{body}");
    tokio::time::sleep(Duration::from_secs(50)).await;

    // Back: the watch resumes with the new token (the old one is revoked: with it, the API
    // server would answer 401 forever) and sees a pod created after the outage.
    kube.start_apiserver().await;
    // Its watches resume after their backoff (at most 30 s, as client-go's), often through a
    // `410 Gone` and a relist.
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    while zt.metric("ztail_kubernetes_api_up").await != 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the watches never resumed; log:\n{}",
            zt.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late = kube
        .pod(
            "shop",
            "late",
            json!({"app.kubernetes.io/name": "late"}),
            json!({}),
            None,
        )
        .await;
    append_text(
        &log_path(&root, "shop", "late", &late),
        &cri(&lines("late", 0..5)),
    );
    assert!(
        wait_lines(&rx, "late", 5).await,
        "log:\n{}\n{}",
        zt.log(),
        kube.logs()
    );
    for e in of_pod(&rx.entries(), "late") {
        assert_eq!(labels(e)["app"], "late", "{e:?}; log:\n{}", zt.log());
    }
    // ztail says what happened in its own words, once, not in the client library's.
    let log = zt.log();
    assert!(log.contains("watch failed; retrying with backoff"), "{log}");
    assert!(
        log.contains("kubernetes API server reachable again"),
        "{log}"
    );
    assert!(
        !log.contains("eof in poll") && !log.contains("kube_client"),
        "{log}"
    );
}

/// End to end with real components only: SPIRE issues the SVIDs, the API server the pod
/// metadata, VictoriaLogs stores what `ztail-terminator` forwards; the pod's labels and
/// metadata are fields of the stored entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_metadata_is_queryable_in_victorialogs() {
    let spire = Spire::start(true);
    spire.create_entry(LOKI_ID, "loki", 600);
    spire.create_entry(ZTAIL_ID, "ztail", 60);
    let vl = VictoriaLogs::start().await;
    let term = Terminator::start(&spire, "loki", ZTAIL_ID, vl.addr).await;
    let (kube, env) = cluster().await;
    let root = env.dir.path();
    let uid = web_pod(&kube, json!({"example.com/commit": "abc123"})).await;
    let time = crate::rfc3339(crate::an_hour_ago());
    append_text(
        &log_path(root, "shop", "web-7d4b9-abcde", &uid),
        &cri_at(&time, &lines("stored", 0..3)),
    );
    let config = with_workload_api(
        &config(&env, &kube, &format!("{}/insert", term.url())),
        &spire.endpoint(),
        Some("ztail"),
    );
    let zt = Ztail::start(&env, &config);
    let got = vl
        .wait_for("app:=web team:=shop-team", 3, Duration::from_secs(90))
        .await;
    assert_eq!(got.len(), 3, "{got:?}\nztail log:\n{}", zt.log());
    for e in &got {
        assert_eq!(e["namespace"], "shop", "{e}");
        assert_eq!(e["pod"], "web-7d4b9-abcde", "{e}");
        assert_eq!(e["workload"], "web", "{e}");
        assert_eq!(e["commit"], "abc123", "{e}");
        assert_eq!(e["image"], "registry.example/web-7d4b9-abcde:1.0", "{e}");
        assert!(e["_msg"].as_str().unwrap().starts_with("stored "), "{e}");
    }
}
