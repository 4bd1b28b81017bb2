//! Memory of the Kubernetes metadata cache: the heap it holds for a full node (110 pods, the
//! kubelet's default maximum) with 20 labels and 10 annotations each, as the API server sends
//! them (managed fields, status, owner). Measured with a counting allocator: bytes still
//! allocated after the pods were applied, less those before (the baseline of the same run).
//!
//!   cargo bench --bench kube_cache
//!
//! Two configs: the deploy example's (3 labels and 1 annotation read), and one that reads every
//! label and annotation (the cache keeps only what the config reads). Prints each delta and its
//! share of the 5 MiB budget; exits non-zero beyond it.

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
        labels,
        metadata,
        annotation_prefix: "ztail.io/".into(),
        tenants: vec![],
        annotation_labels: vec![],
        max_pods: 1000,
    }
}

fn main() {
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
