//! Memory of the Kubernetes metadata cache: the heap it holds for a full node (110 pods, the
//! kubelet's default maximum) with 20 labels and 10 annotations each, as the API server sends
//! them (managed fields, status, owner). Measured with a counting allocator: bytes still
//! allocated after the pods were applied, less those before (the baseline of the same run).
//!
//!   cargo bench --bench kube_cache            # the cache alone, in process
//!   cargo bench --bench kube_cache -- rss     # two release ztails against a real API server
//!
//! Two configs: the deploy example's (3 labels and 1 annotation read), and one that reads every
//! label and annotation (the cache keeps only what the config reads). Prints each delta and its
//! share of the 5 MiB budget; exits non-zero beyond it.
//!
//! `rss` starts etcd and kube-apiserver (`scripts/tools`), creates the 110 pods through the API
//! with a log file each at its kubelet path, and runs two ztails over the same files, one
//! without `[kubernetes]` (the baseline) and one with it reading every label and annotation;
//! once both have shipped every line it prints their resident and peak memory and the
//! difference. Not run by `cargo test`.

#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use ztail::k8s::{Field, KubernetesConfig, Metadata};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds
// GlobalAlloc's contract; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout, forwarded.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `System.alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const PODS: usize = 110;
const BUDGET: isize = 5 << 20;

fn pod(i: usize) -> Pod {
    let mut labels = serde_json::Map::new();
    labels.insert(
        "app.kubernetes.io/name".into(),
        json!(format!("app-{}", i % 20)),
    );
    labels.insert("pod-template-hash".into(), json!("7d4b9c6f8"));
    for j in 0..18 {
        labels.insert(
            format!("example.com/label-{j}"),
            json!(format!("value-{i}-{j}")),
        );
    }
    let mut annotations = serde_json::Map::new();
    annotations.insert("ztail.io/format".into(), json!("java"));
    for j in 0..9 {
        annotations.insert(
            format!("example.com/annotation-{j}"),
            json!(format!("{:0>60}", i * 100 + j)),
        );
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("app-{i}-7d4b9c6f8-x{i:04}"), "namespace": format!("ns-{}", i % 10),
            "uid": format!("00000000-0000-0000-0000-{i:012}"), "resourceVersion": "12345",
            "labels": labels, "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("app-{i}-7d4b9c6f8"), "uid": "u", "controller": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
        },
        "spec": {"nodeName": "node-1", "containers": [
            {"name": "app", "image": format!("registry.example/app-{i}:1.{i}")},
            {"name": "sidecar", "image": "registry.example/proxy:2.0"}]},
        "status": {"phase": "Running", "podIP": "10.1.2.3"}
    }))
    .unwrap()
}

fn config(all: bool) -> KubernetesConfig {
    let mut labels = vec![
        (
            "app".to_owned(),
            Field::PodLabel("app.kubernetes.io/name".into()),
        ),
        ("team".to_owned(), Field::NamespaceLabel("team".into())),
    ];
    let mut metadata = vec![
        ("image".to_owned(), Field::ContainerImage),
        ("workload".to_owned(), Field::Workload),
    ];
    if all {
        for j in 0..18 {
            labels.push((
                format!("l{j}"),
                Field::PodLabel(format!("example.com/label-{j}")),
            ));
        }
        for j in 0..9 {
            metadata.push((
                format!("a{j}"),
                Field::PodAnnotation(format!("example.com/annotation-{j}")),
            ));
        }
    }
    KubernetesConfig {
        node_name: "node-1".into(),
        api_server: None,
        token_file: "/dev/null".into(),
        ca_file: "/dev/null".into(),
        wait: Duration::from_secs(5),
        // One field each: the first with a value wins, and there is one.
        labels: labels.into_iter().map(|(n, f)| (n, vec![f])).collect(),
        metadata: metadata.into_iter().map(|(n, f)| (n, vec![f])).collect(),
        annotation_prefix: "ztail.io/".into(),
        tenants: vec![],
        annotation_labels: vec![],
        max_pods: 1000,
    }
}

fn main() {
    if common::args().iter().any(|a| a == "rss") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(rss());
        return;
    }
    let metrics = Arc::new(ztail::metrics::Metrics::new());
    let pods: Vec<Pod> = (0..PODS).map(pod).collect();
    let mut over = false;
    for (name, all) in [
        ("deploy example", false),
        ("every label and annotation", true),
    ] {
        let before = LIVE.load(Ordering::Relaxed);
        let meta = Metadata::new(config(all), metrics.clone());
        for p in &pods {
            meta.apply_pod(p);
        }
        let held = LIVE.load(Ordering::Relaxed) - before;
        // Every pod must be resolvable, or the figure measures nothing.
        let uid = pods[7].metadata.uid.clone().unwrap();
        let view = meta
            .view(&uid, "app", &["java".into()])
            .expect("pod cached");
        assert_eq!(view.format.as_deref(), Some("java"));
        println!(
            "{name}: {PODS} pods, {held} bytes held ({:.1} KiB per pod), {:.3} of the 5 MiB budget",
            held as f64 / 1024.0 / PODS as f64,
            held as f64 / BUDGET as f64
        );
        over |= held > BUDGET;
        drop(meta);
    }
    if over {
        eprintln!("over the 5 MiB budget");
        std::process::exit(1);
    }
}

/// Resident and peak memory of ztail with and without Kubernetes metadata, 110 pods.
async fn rss() {
    use support::kube::{Kube, NODE, cri, log_path};
    use support::ztail::{Env, LOKI_ID, Ztail, append_text};

    let kube = Kube::start().await;
    let with = Env::new();
    let without = Env::new();
    kube.ztail_token("bench", &with.path("token")).await;
    let root = with.path("node");
    for n in 0..10 {
        kube.namespace(&format!("ns-{n}"), json!({"team": format!("team-{n}")}))
            .await;
    }
    for i in 0..PODS {
        let p = pod(i);
        let mut labels = p.metadata.labels.clone().unwrap();
        labels.remove("pod-template-hash");
        let ns = p.metadata.namespace.clone().unwrap();
        let name = p.metadata.name.clone().unwrap();
        let uid = kube
            .pod(
                &ns,
                &name,
                serde_json::to_value(&labels).unwrap(),
                serde_json::to_value(p.metadata.annotations.as_ref().unwrap()).unwrap(),
                None,
            )
            .await;
        let lines: Vec<String> = (0..20).map(|j| format!("{name} line {j}")).collect();
        append_text(&log_path(&root, &ns, &name, &uid), &cri(&lines));
    }
    let source = format!(
        "\n[[sources]]\nname = \"pods\"\ninclude = [\"{}/pods/*/*/*.log\"]\nformat = \"cri\"\nstart_at = \"beginning\"\npath_labels = '/pods/(?P<namespace>[^/_]+)_(?P<pod>[^/_]+)_[^/]+/(?P<container>[^/]+)/'\n",
        root.display()
    );
    let mut k8s = format!(
        "kubernetes = true\n[kubernetes]\nnode_name = \"{NODE}\"\napi_server = \"{}\"\ntoken_file = \"token\"\nca_file = \"{}\"\n[kubernetes.labels]\napp = \"pod_label:app.kubernetes.io/name\"\nteam = \"namespace_label:team\"\n",
        kube.url(),
        kube.ca_file().display()
    );
    // Loki allows 15 labels per stream: the other pod labels go to structured metadata.
    k8s.push_str("[kubernetes.metadata]\nimage = \"container_image\"\nworkload = \"workload\"\n");
    for j in 0..18 {
        k8s.push_str(&format!("l{j} = \"pod_label:example.com/label-{j}\"\n"));
    }
    for j in 0..9 {
        k8s.push_str(&format!(
            "a{j} = \"pod_annotation:example.com/annotation-{j}\"\n"
        ));
    }
    let mut figures = Vec::new();
    for (name, env, extra) in [
        ("without [kubernetes]", &without, source.clone()),
        ("with [kubernetes]", &with, format!("{source}{k8s}")),
    ] {
        let rx = env.receiver(LOKI_ID).await;
        let zt = Ztail::start(env, &env.config(&rx.url(), "", &extra));
        let want = PODS * 20;
        assert!(
            rx.wait_for(|e| e.len() >= want, Duration::from_secs(120))
                .await,
            "{name}: {} of {want} lines; log:\n{}",
            rx.entries().len(),
            zt.log()
        );
        if name.starts_with("with ") {
            let e = rx.entries();
            assert!(
                e.iter().all(|e| e.labels.contains_key("app")),
                "every entry has its pod's labels"
            );
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pid = zt.pid();
        let (rss, hwm) = (
            common::status_mib(pid, "VmRSS:"),
            common::status_mib(pid, "VmHWM:"),
        );
        println!(
            "{name}: RSS {rss:.1} MiB, peak {hwm:.1} MiB ({} build)",
            common::profile()
        );
        figures.push((rss, hwm));
    }
    let (d_rss, d_hwm) = (figures[1].0 - figures[0].0, figures[1].1 - figures[0].1);
    println!(
        "difference for {PODS} pods with 20 labels and 10 annotations: RSS {d_rss:+.1} MiB, peak {d_hwm:+.1} MiB (budget 5 MiB: {:.2} and {:.2} of it)",
        d_rss / 5.0,
        d_hwm / 5.0
    );
}
