//! Kubernetes metadata: the pods scheduled on this node and the namespaces' labels, listed and
//! watched through the API server with the pod's service account, and what a log file's pod
//! makes of its streams ([`Metadata::view`]).
//!
//! The contract with the tailer:
//! - A file is matched to its pod by the UID in the kubelet's path
//!   (`/var/log/pods/<namespace>_<pod>_<uid>/<container>/<n>.log`) and to its container by the
//!   directory name. Nothing else about the path is trusted.
//! - Metadata never holds a line back for long: a new file waits at most `kubernetes.wait` for
//!   its pod, then ships with its path's labels (counted in
//!   `ztail_kubernetes_metadata_missing_total`) and takes the pod's labels once it is known.
//! - Every change of the cache bumps a generation; a file's task compares it once per read and
//!   only then asks for its view again, so an unchanged cluster costs one atomic load per read.
//! - A deleted pod or namespace stays in the cache for [`DELETED_KEEP`] (its files are drained
//!   with its labels), and a file keeps the last view it had while its pod is gone.
//! - An unreachable API server stops nothing: the cache is kept, the watch is retried with
//!   backoff (resumed from its resourceVersion, relisted on `410 Gone`: `kube`'s watcher), and
//!   `/readyz`, `/status` and `ztail_kubernetes_api_up` say so.
//!
//! The cache keeps only what the config reads: the pod labels, annotations and namespace
//! labels it names, the control annotations, container names and images, and the controller.

pub mod config;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod as ApiPod};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use crate::loki::labels;
use crate::metrics::{KindLabel, Metrics};
use crate::pipeline::lock;
pub use config::{Field, KubernetesConfig};

/// How long a deleted pod's metadata is kept for files still being drained.
pub const DELETED_KEEP: Duration = Duration::from_secs(600);
/// Namespaces kept in memory at most.
const MAX_NAMESPACES: usize = 10_000;

/// What the cache knows of one pod.
#[derive(Debug, Clone, PartialEq)]
struct Pod {
    namespace: String,
    name: String,
    uid: String,
    /// The labels and annotations the config reads (and the control annotations).
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    /// (name, image) of every container, init and ephemeral ones included.
    containers: Vec<(String, String)>,
    /// The controller: (kind, name).
    owner: Option<(String, String)>,
    template_hash: Option<String>,
    deleted: Option<Instant>,
}

/// What the cache knows of one namespace: the labels the config reads.
#[derive(Debug, Clone, PartialEq)]
struct Ns {
    labels: BTreeMap<String, String>,
    deleted: Option<Instant>,
}

#[derive(Default)]
struct Store {
    pods: HashMap<String, Arc<Pod>>,
    namespaces: HashMap<String, Ns>,
}

impl Store {
    /// Marks the pods for which `gone` holds deleted, now (kept for [`DELETED_KEEP`]).
    fn delete_pods(&mut self, gone: impl Fn(&str) -> bool) {
        let now = Instant::now();
        for (uid, pod) in self.pods.iter_mut() {
            if pod.deleted.is_none() && gone(uid) {
                *pod = Arc::new(Pod {
                    deleted: Some(now),
                    ..(**pod).clone()
                });
            }
        }
    }

    /// The same for namespaces: their pods' files drain with their labels too.
    fn delete_namespaces(&mut self, gone: impl Fn(&str) -> bool) {
        let now = Instant::now();
        for (name, ns) in self.namespaces.iter_mut() {
            if ns.deleted.is_none() && gone(name) {
                ns.deleted = Some(now);
            }
        }
    }
}

/// The API server as the watches last saw it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApiStatus {
    pub connected: bool,
    pub pods_listed: bool,
    pub namespaces_listed: bool,
    pub last_error: Option<String>,
    pub last_error_unix: i64,
    /// The watches failing now, with their last error: `connected` only when none is.
    #[serde(skip)]
    pub failing: BTreeMap<&'static str, String>,
    pub pods: usize,
    /// Of `pods`, those deleted and kept while their files drain.
    pub pods_deleted: usize,
}

/// What a file's pod makes of its streams and entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    /// Stream labels added to the file's own.
    pub labels: Vec<(String, String)>,
    /// Structured metadata of every entry.
    pub metadata: Vec<(String, String)>,
    /// The pod or this container opted out: its entries are dropped, counted.
    pub exclude: bool,
    /// A format of the source the pod chose.
    pub format: Option<String>,
    /// A tenant among `kubernetes.tenants` the pod chose.
    pub tenant: Option<Arc<str>>,
    /// Annotations that asked for something the operator does not allow.
    pub refused: Vec<String>,
    /// False while the namespace labels the config reads may still be on their way (the
    /// namespaces are not listed yet): a new file waits for them within `kubernetes.wait`.
    pub complete: bool,
}

pub struct Metadata {
    cfg: KubernetesConfig,
    store: Mutex<Store>,
    generation: tokio::sync::watch::Sender<u64>,
    status: Mutex<ApiStatus>,
    metrics: Arc<Metrics>,
    pod_labels: HashSet<String>,
    pod_annotations: HashSet<String>,
    namespace_labels: HashSet<String>,
    missing: AtomicU64,
}

/// The pod UID and container name in a kubelet log path, if it is one.
pub fn pod_of_path(path: &std::path::Path) -> Option<(&str, &str)> {
    let mut parts = path.to_str()?.rsplit('/');
    let _file = parts.next()?;
    let container = parts.next()?;
    let pod_dir = parts.next()?;
    let uid = pod_dir.rsplit('_').next()?;
    (pod_dir.matches('_').count() >= 2 && !uid.is_empty() && !container.is_empty())
        .then_some((uid, container))
}

impl Metadata {
    pub fn new(cfg: KubernetesConfig, metrics: Arc<Metrics>) -> Arc<Metadata> {
        let mut pod_labels = HashSet::new();
        let mut pod_annotations = HashSet::new();
        let mut namespace_labels = HashSet::new();
        for f in cfg.labels.iter().chain(&cfg.metadata).flat_map(|(_, f)| f) {
            match f {
                Field::PodLabel(k) => pod_labels.insert(k.clone()),
                Field::PodAnnotation(k) => pod_annotations.insert(k.clone()),
                Field::NamespaceLabel(k) => namespace_labels.insert(k.clone()),
                _ => false,
            };
        }
        Arc::new(Metadata {
            cfg,
            store: Mutex::default(),
            generation: tokio::sync::watch::Sender::new(0),
            // Without namespace labels to read, namespaces are not watched.
            status: Mutex::new(ApiStatus {
                namespaces_listed: namespace_labels.is_empty(),
                ..ApiStatus::default()
            }),
            metrics,
            pod_labels,
            pod_annotations,
            namespace_labels,
            missing: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &KubernetesConfig {
        &self.cfg
    }

    /// Starts the watches; they run until `cancel`.
    pub fn spawn(self: &Arc<Self>, cancel: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = me.run() => {}
                _ = cancel.cancelled() => {}
            }
        });
    }

    /// Bumped on every change of the cache.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Waits until the cache changes after `seen`, or `timeout`.
    pub async fn changed(&self, seen: u64, timeout: Duration) {
        let mut rx = self.generation.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|g| *g != seen)).await;
    }

    /// A file whose pod was not known within the wait: counted and logged.
    pub fn note_missing(&self, path: &std::path::Path, uid: &str) {
        self.missing.fetch_add(1, Ordering::Relaxed);
        self.metrics.kubernetes_metadata_missing.inc();
        tracing::warn!(path = %path.display(), pod_uid = uid, wait = ?self.cfg.wait, api = ?lock(&self.status).last_error, "pod not known to the API server within the wait: shipping with the path's labels until it is");
    }

    pub fn status(&self) -> ApiStatus {
        let mut s = lock(&self.status).clone();
        let store = lock(&self.store);
        s.pods = store.pods.len();
        s.pods_deleted = store.pods.values().filter(|p| p.deleted.is_some()).count();
        s
    }

    /// What is missing, for `/readyz`: `None` when the cache is synced and watched.
    pub fn degraded(&self) -> Option<String> {
        let s = lock(&self.status);
        if s.connected && s.pods_listed && s.namespaces_listed {
            return None;
        }
        Some(match &s.last_error {
            Some(e) => format!(
                "kubernetes metadata unavailable ({e}); shipping with path labels and cached metadata"
            ),
            None => "kubernetes metadata: pods not listed yet".into(),
        })
    }

    /// What the pod with `uid` makes of its container's files, if the pod is known.
    pub fn view(&self, uid: &str, container: &str, formats: &[String]) -> Option<View> {
        let listed = lock(&self.status).namespaces_listed;
        let store = lock(&self.store);
        let pod = store.pods.get(uid)?.clone();
        let ns = store.namespaces.get(&pod.namespace).map(|n| &n.labels);
        let mut v = View {
            complete: self.namespace_labels.is_empty() || ns.is_some() || listed,
            ..View::default()
        };
        let value = |f: &Field| -> Option<String> {
            Some(match f {
                Field::Node => self.cfg.node_name.clone(),
                Field::Namespace => pod.namespace.clone(),
                Field::Pod => pod.name.clone(),
                Field::PodUid => pod.uid.clone(),
                Field::Container => container.to_owned(),
                Field::ContainerImage => pod
                    .containers
                    .iter()
                    .find(|(n, _)| n == container)
                    .map(|(_, i)| i.clone())?,
                Field::OwnerKind => pod.owner.as_ref()?.0.clone(),
                Field::OwnerName => pod.owner.as_ref()?.1.clone(),
                Field::Workload => workload(&pod)?,
                Field::PodLabel(k) => pod.labels.get(k)?.clone(),
                Field::PodAnnotation(k) => pod.annotations.get(k)?.clone(),
                Field::NamespaceLabel(k) => ns?.get(k)?.clone(),
            })
        };
        for (name, first_of) in &self.cfg.labels {
            let val = first_of
                .iter()
                .find_map(|f| value(f).filter(|s| labels::validate_value(s).is_ok()));
            if let Some(val) = val {
                v.labels.push((name.clone(), val));
            }
        }
        for (name, first_of) in &self.cfg.metadata {
            if let Some(val) = first_of
                .iter()
                .find_map(|f| value(f).filter(|s| !s.is_empty()))
            {
                v.metadata.push((name.clone(), val));
            }
        }
        drop(store);
        let ann = |name: &str| {
            pod.annotations
                .get(&format!("{}{name}", self.cfg.annotation_prefix))
                .map(|s| s.trim())
        };
        let p = &self.cfg.annotation_prefix;
        v.exclude = ann("exclude").is_some_and(|s| s.eq_ignore_ascii_case("true"))
            || ann("exclude-containers")
                .is_some_and(|s| s.split(',').any(|c| c.trim() == container));
        if let Some(f) = ann("format") {
            match formats.iter().any(|x| x == f) {
                true => v.format = Some(f.to_owned()),
                false => v.refused.push(format!(
                    "{p}format {f:?} is not a format of this source ({})",
                    formats.join(", ")
                )),
            }
        }
        if let Some(t) = ann("tenant") {
            match self.cfg.tenants.iter().any(|x| x == t) {
                true => v.tenant = Some(t.into()),
                false => v
                    .refused
                    .push(format!("{p}tenant {t:?} is not in kubernetes.tenants")),
            }
        }
        if let Some(list) = ann("labels") {
            for pair in list.split(',').filter(|s| !s.trim().is_empty()) {
                let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
                let (k, val) = (k.trim(), val.trim());
                if !self.cfg.annotation_labels.iter().any(|x| x == k) {
                    v.refused.push(format!(
                        "{p}labels: {k:?} is not in kubernetes.annotation_labels"
                    ));
                } else if labels::validate_value(val).is_err() {
                    v.refused.push(format!(
                        "{p}labels: the value of {k:?} is not a valid label value"
                    ));
                } else if !v.labels.iter().any(|(n, _)| n == k) {
                    v.labels.push((k.to_owned(), val.to_owned()));
                }
            }
        }
        v.labels.sort();
        Some(v)
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
        self.metrics
            .kubernetes_pods
            .set(lock(&self.store).pods.len() as i64);
    }

    fn failed(&self, resource: &'static str, e: &dyn std::fmt::Display) {
        self.metrics
            .kubernetes_watch_errors
            .get_or_create(&KindLabel {
                kind: resource.into(),
            })
            .inc();
        self.metrics.kubernetes_api_up.set(0);
        let msg = format!("{resource}: {e}");
        let mut s = lock(&self.status);
        // Logged when a watch's error changes, not on every retry of an outage.
        if s.failing.get(resource) != Some(&msg) {
            tracing::warn!(api_server = ?self.cfg.api_server, error = %msg, "kubernetes API server: watch failed; retrying with backoff, shipping continues with cached metadata");
        }
        s.failing.insert(resource, msg.clone());
        s.connected = false;
        s.last_error = Some(msg);
        s.last_error_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
    }

    /// A watch of `resource` delivered an event. The API server counts as reachable (and
    /// `ztail_kubernetes_api_up` as 1) only once every failing watch has recovered: pods
    /// created meanwhile are not seen while the pod watch is still backing off.
    fn connected(&self, resource: &'static str) {
        let mut s = lock(&self.status);
        s.failing.remove(resource);
        if !s.connected && s.failing.is_empty() {
            if s.last_error.is_some() {
                tracing::info!(api_server = ?self.cfg.api_server, "kubernetes API server reachable again");
            }
            s.connected = true;
            self.metrics.kubernetes_api_up.set(1);
        }
    }

    fn client(&self) -> Result<kube::Client, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let ca = &self.cfg.ca_file;
        let roots: Vec<Vec<u8>> = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.map(|c| c.map(|c| c.to_vec())).collect())
            .map_err(|e| format!("cannot read the API server's CA {}: {e}", ca.display()))?;
        if roots.is_empty() {
            return Err(format!("{} holds no PEM certificate", ca.display()));
        }
        let url = self
            .cfg
            .api_server
            .clone()
            .ok_or("kubernetes.api_server is not known")?;
        let mut cfg = kube::Config::new(url.clone());
        cfg.root_cert = Some(roots);
        cfg.root_cert_file = Some(ca.clone());
        cfg.auth_info.token_file = Some(self.cfg.token_file.to_string_lossy().into_owned());
        cfg.connect_timeout = Some(Duration::from_secs(10));
        kube::Client::try_from(cfg).map_err(|e| {
            format!(
                "cannot make a client for {url} (token {}): {e}",
                self.cfg.token_file.display()
            )
        })
    }

    async fn run(self: Arc<Self>) {
        let mut delay = Duration::from_secs(1);
        let client = loop {
            match self.client() {
                Ok(c) => break c,
                Err(e) => {
                    self.failed("client", &e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        };
        let pods =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.cfg.node_name));
        let sweep = async {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            loop {
                every.tick().await;
                self.sweep();
            }
        };
        // Namespaces are watched only for the labels the config reads from them.
        let namespaces = async {
            if !self.namespace_labels.is_empty() {
                self.watch::<Namespace>(client.clone(), watcher::Config::default())
                    .await;
            }
        };
        tokio::join!(
            self.watch::<ApiPod>(client.clone(), pods),
            namespaces,
            sweep
        );
    }

    /// Lists and watches one kind into the cache. After every (re)list, what it did not list
    /// is marked deleted.
    async fn watch<K: Cached>(&self, client: kube::Client, cfg: watcher::Config) {
        let mut events = watcher::watcher(kube::Api::<K>::all(client), cfg)
            .default_backoff()
            .boxed();
        let mut listed: HashSet<String> = HashSet::new();
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    self.failed(K::KIND, &e);
                    continue;
                }
            };
            self.connected(K::KIND);
            match ev {
                Event::Init => listed.clear(),
                Event::InitApply(o) => {
                    if let Some(key) = o.cache(self) {
                        listed.insert(key);
                    }
                }
                Event::InitDone => {
                    K::delete(&mut lock(&self.store), |key| !listed.contains(key));
                    K::listed(&mut lock(&self.status));
                    listed.clear();
                    self.bump();
                }
                Event::Apply(o) => {
                    o.cache(self);
                }
                Event::Delete(o) => {
                    if let Some(key) = o.key() {
                        K::delete(&mut lock(&self.store), |k| k == key);
                        self.bump();
                    }
                }
            }
        }
    }

    fn apply_namespace(&self, ns: &Namespace) -> Option<String> {
        let name = ns.metadata.name.clone()?;
        let cached = Ns {
            labels: ns
                .metadata
                .labels
                .iter()
                .flatten()
                .filter(|(k, _)| self.namespace_labels.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            deleted: None,
        };
        let mut store = lock(&self.store);
        if store.namespaces.get(&name) == Some(&cached)
            || (store.namespaces.len() >= MAX_NAMESPACES && !store.namespaces.contains_key(&name))
        {
            return Some(name);
        }
        store.namespaces.insert(name.clone(), cached);
        drop(store);
        self.bump();
        Some(name)
    }

    /// Caches a pod (only what the config reads); its UID.
    pub fn apply_pod(&self, p: &ApiPod) -> Option<String> {
        let m = &p.metadata;
        let uid = m.uid.clone()?;
        let prefix = &self.cfg.annotation_prefix;
        let mut containers = Vec::new();
        if let Some(spec) = &p.spec {
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                containers.push((c.name.clone(), c.image.clone().unwrap_or_default()));
            }
            for c in spec.ephemeral_containers.iter().flatten() {
                containers.push((c.name.clone(), c.image.clone().unwrap_or_default()));
            }
        }
        let pod = Pod {
            namespace: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
            uid: uid.clone(),
            labels: m
                .labels
                .iter()
                .flatten()
                .filter(|(k, _)| self.pod_labels.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            annotations: m
                .annotations
                .iter()
                .flatten()
                .filter(|(k, _)| self.pod_annotations.contains(*k) || k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            containers,
            owner: m
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| (o.kind.clone(), o.name.clone())),
            template_hash: m
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash").cloned()),
            deleted: None,
        };
        let mut store = lock(&self.store);
        if store.pods.get(&uid).is_some_and(|old| **old == pod) {
            return Some(uid);
        }
        if !store.pods.contains_key(&uid) && store.pods.len() >= self.cfg.max_pods {
            evict_deleted(&mut store, self.cfg.max_pods - 1);
            if store.pods.len() >= self.cfg.max_pods {
                tracing::warn!(pod = %pod.name, namespace = %pod.namespace, max_pods = self.cfg.max_pods, "kubernetes.max_pods reached: this pod's files ship with their path's labels");
                return Some(uid);
            }
        }
        store.pods.insert(uid.clone(), Arc::new(pod));
        drop(store);
        self.bump();
        Some(uid)
    }

    /// Forgets pods and namespaces deleted more than [`DELETED_KEEP`] ago.
    fn sweep(&self) {
        let kept = |deleted: Option<Instant>| deleted.is_none_or(|at| at.elapsed() < DELETED_KEEP);
        let mut store = lock(&self.store);
        let before = (store.pods.len(), store.namespaces.len());
        store.pods.retain(|_, p| kept(p.deleted));
        store.namespaces.retain(|_, n| kept(n.deleted));
        let changed = before != (store.pods.len(), store.namespaces.len());
        drop(store);
        if changed {
            self.bump();
        }
    }
}

/// What the cache keeps of a kind the API server lists: pods and namespaces.
trait Cached:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + 'static
{
    /// For metrics and logs.
    const KIND: &'static str;
    /// Caches the object; its key (pod UID, namespace name).
    fn cache(&self, meta: &Metadata) -> Option<String>;
    fn key(&self) -> Option<&str>;
    fn delete(store: &mut Store, gone: impl Fn(&str) -> bool);
    fn listed(status: &mut ApiStatus);
}

impl Cached for ApiPod {
    const KIND: &'static str = "pods";
    fn cache(&self, meta: &Metadata) -> Option<String> {
        meta.apply_pod(self)
    }
    fn key(&self) -> Option<&str> {
        self.metadata.uid.as_deref()
    }
    fn delete(store: &mut Store, gone: impl Fn(&str) -> bool) {
        store.delete_pods(gone);
    }
    fn listed(status: &mut ApiStatus) {
        status.pods_listed = true;
    }
}

impl Cached for Namespace {
    const KIND: &'static str = "namespaces";
    fn cache(&self, meta: &Metadata) -> Option<String> {
        meta.apply_namespace(self)
    }
    fn key(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }
    fn delete(store: &mut Store, gone: impl Fn(&str) -> bool) {
        store.delete_namespaces(gone);
    }
    fn listed(status: &mut ApiStatus) {
        status.namespaces_listed = true;
    }
}

/// Makes room by forgetting the longest-deleted pods, down to `keep`.
fn evict_deleted(store: &mut Store, keep: usize) {
    let mut deleted: Vec<(Instant, String)> = store
        .pods
        .iter()
        .filter_map(|(uid, p)| p.deleted.map(|at| (at, uid.clone())))
        .collect();
    deleted.sort();
    for (_, uid) in deleted {
        if store.pods.len() <= keep {
            break;
        }
        store.pods.remove(&uid);
    }
}

/// The Deployment of a ReplicaSet's pod (the ReplicaSet's name less its `-<pod-template-hash>`),
/// else the controller's name.
fn workload(p: &Pod) -> Option<String> {
    let (kind, name) = p.owner.as_ref()?;
    if kind == "ReplicaSet"
        && let Some(hash) = &p.template_hash
        && let Some(base) = name
            .strip_suffix(hash.as_str())
            .and_then(|b| b.strip_suffix('-'))
    {
        return Some(base.to_owned());
    }
    Some(name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> Arc<Metadata> {
        let cfg = KubernetesConfig {
            node_name: "node-1".into(),
            api_server: None,
            token_file: "/dev/null".into(),
            ca_file: "/dev/null".into(),
            wait: Duration::from_secs(5),
            labels: vec![
                (
                    "app".into(),
                    vec![
                        Field::PodLabel("app.kubernetes.io/name".into()),
                        Field::PodLabel("app".into()),
                        Field::Workload,
                    ],
                ),
                ("team".into(), vec![Field::NamespaceLabel("team".into())]),
            ],
            metadata: vec![("image".into(), vec![Field::ContainerImage])],
            annotation_prefix: "ztail.io/".into(),
            tenants: vec!["team-a".into()],
            annotation_labels: vec![],
            max_pods: 10,
        };
        Metadata::new(cfg, Arc::new(Metrics::new()))
    }

    fn pod(uid: &str, app: &str, annotations: serde_json::Value) -> ApiPod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": uid,
                "labels": {"app": app, "unread": "x"}, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "img:1"}]}
        }))
        .unwrap()
    }

    #[test]
    fn deleted_pods_and_namespaces_keep_their_labels_for_draining_files() {
        let m = metadata();
        let ns: Namespace = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "shop", "labels": {"team": "a"}}}),
        )
        .unwrap();
        m.apply_namespace(&ns);
        m.apply_pod(&pod("u1", "web", serde_json::json!({})));
        let v = m.view("u1", "app", &[]).expect("cached");
        assert_eq!(
            v.labels,
            [("app".into(), "web".into()), ("team".into(), "a".into())]
        );
        assert_eq!(v.metadata, [("image".into(), "img:1".into())]);
        assert!(v.complete);
        // The same pod again changes nothing, so no file looks it up again.
        let g = m.generation();
        m.apply_pod(&pod("u1", "web", serde_json::json!({})));
        assert_eq!(m.generation(), g);
        // Deleted (or not in a relist): still resolvable, with the same labels.
        lock(&m.store).delete_pods(|uid| uid == "u1");
        lock(&m.store).delete_namespaces(|name| name == "shop");
        assert_eq!(m.view("u1", "app", &[]).unwrap().labels, v.labels);
        m.sweep();
        assert!(m.view("u1", "app", &[]).is_some(), "kept for DELETED_KEEP");
    }

    #[test]
    fn a_label_takes_the_first_field_with_a_value() {
        let m = metadata();
        let app = |uid: &str, labels: serde_json::Value| {
            m.apply_pod(
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "web-7d4b9c-x2x", "namespace": "shop", "uid": uid,
                        "labels": labels,
                        "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d4b9c",
                            "controller": true, "apiVersion": "apps/v1", "uid": "r"}]},
                    "spec": {"containers": [{"name": "app", "image": "img:1"}]}
                }))
                .unwrap(),
            );
            let v = m.view(uid, "app", &[]).unwrap();
            v.labels
                .iter()
                .find(|(n, _)| n == "app")
                .map(|(_, v)| v.clone())
        };
        let both = serde_json::json!({"app.kubernetes.io/name": "shop", "app": "old"});
        assert_eq!(app("u1", both).as_deref(), Some("shop"));
        let empty_first = serde_json::json!({"app.kubernetes.io/name": "", "app": "old"});
        assert_eq!(app("u2", empty_first).as_deref(), Some("old"));
        let none = serde_json::json!({"pod-template-hash": "7d4b9c"});
        assert_eq!(app("u3", none).as_deref(), Some("web"), "the Deployment");
    }

    #[test]
    fn the_api_server_is_up_only_when_every_watch_is() {
        let m = metadata();
        let up = |m: &Metadata| (m.status().connected, m.metrics.kubernetes_api_up.get());
        m.connected("pods");
        m.connected("namespaces");
        assert_eq!(up(&m), (true, 1));
        m.failed("pods", &"connection refused");
        m.failed("namespaces", &"connection refused");
        assert_eq!(up(&m), (false, 0));
        // The namespace watch is back first: pods created now would not be seen yet.
        m.connected("namespaces");
        assert_eq!(up(&m), (false, 0));
        m.connected("pods");
        assert_eq!(up(&m), (true, 1));
        assert!(m.status().failing.is_empty());
    }

    #[test]
    fn annotations_only_choose_what_the_config_allows() {
        let m = metadata();
        m.apply_pod(&pod(
            "u1",
            "web",
            serde_json::json!({"ztail.io/tenant": "team-b", "ztail.io/format": "java",
                "ztail.io/exclude-containers": "sidecar, app"}),
        ));
        let v = m.view("u1", "app", &["python".into()]).unwrap();
        assert_eq!((v.tenant, v.format), (None, None));
        assert_eq!(v.refused.len(), 2, "{:?}", v.refused);
        assert!(v.exclude);
        assert!(!m.view("u1", "other", &[]).unwrap().exclude);
        m.apply_pod(&pod(
            "u1",
            "web",
            serde_json::json!({"ztail.io/tenant": "team-a"}),
        ));
        assert_eq!(
            m.view("u1", "app", &[]).unwrap().tenant.as_deref(),
            Some("team-a")
        );
    }

    #[test]
    fn kubelet_paths_name_their_pod_and_container() {
        let p = std::path::Path::new(
            "/var/log/pods/default_web-7d4b9_0b7a1c2e-1111-2222-3333-444455556666/nginx/0.log",
        );
        assert_eq!(
            pod_of_path(p),
            Some(("0b7a1c2e-1111-2222-3333-444455556666", "nginx"))
        );
        assert_eq!(pod_of_path(std::path::Path::new("/var/log/syslog")), None);
        assert_eq!(
            pod_of_path(std::path::Path::new("/var/log/app/x/1.log")),
            None
        );
    }
}
