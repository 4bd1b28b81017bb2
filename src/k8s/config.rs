//! The `[kubernetes]` table: where the API server is, what a pod's metadata becomes, and what
//! a pod's annotations may choose.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Validator, humantime_serde};
use crate::loki::labels;

/// Where the service account's token and CA are mounted in every pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesConfig {
    /// `spec.nodeName` of the pods whose logs are on this node; empty if not configured and
    /// not in the environment (see [`KubernetesConfig::unresolved`]).
    pub node_name: String,
    pub api_server: Option<http::Uri>,
    /// Re-read at least once a minute: projected tokens rotate hourly.
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    /// How long a new file waits for its pod before it ships with its path's labels.
    pub wait: Duration,
    /// Stream labels: (label name, what it is: the first of these pieces that has a value).
    pub labels: Vec<(String, Vec<Field>)>,
    /// Structured metadata of every entry: (name, the first of these that has a value).
    pub metadata: Vec<(String, Vec<Field>)>,
    /// Prefix of the per-pod control annotations, with its slash (`ztail.io/`).
    pub annotation_prefix: String,
    /// Tenants a pod's `tenant` annotation may choose.
    pub tenants: Vec<String>,
    /// Label names a pod's `labels` annotation may set.
    pub annotation_labels: Vec<String>,
    /// Pods kept in memory at most (the kubelet's default limit is 110 per node).
    pub max_pods: usize,
}

/// One piece of a pod's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Node,
    Namespace,
    Pod,
    PodUid,
    Container,
    ContainerImage,
    /// Kind of the pod's controller (`ReplicaSet`, `DaemonSet`, `Job`, ...).
    OwnerKind,
    OwnerName,
    /// The workload: the Deployment of a ReplicaSet's pod, else the controller's name.
    Workload,
    PodLabel(String),
    PodAnnotation(String),
    NamespaceLabel(String),
}

impl Field {
    fn parse(s: &str) -> Result<Field, String> {
        let keyed = |key: &str, f: fn(String) -> Field| {
            if key.is_empty() || key.len() > 316 {
                Err(format!("{s:?} needs a key after the colon"))
            } else {
                Ok(f(key.to_owned()))
            }
        };
        Ok(match s.split_once(':') {
            Some(("pod_label", k)) => keyed(k, Field::PodLabel)?,
            Some(("pod_annotation", k)) => keyed(k, Field::PodAnnotation)?,
            Some(("namespace_label", k)) => keyed(k, Field::NamespaceLabel)?,
            Some(_) => return Err(format!("unknown field {s:?}: {FIELDS}")),
            None => match s {
                "node" => Field::Node,
                "namespace" => Field::Namespace,
                "pod" => Field::Pod,
                "pod_uid" => Field::PodUid,
                "container" => Field::Container,
                "container_image" => Field::ContainerImage,
                "owner_kind" => Field::OwnerKind,
                "owner_name" => Field::OwnerName,
                "workload" => Field::Workload,
                _ => return Err(format!("unknown field {s:?}: {FIELDS}")),
            },
        })
    }
}

const FIELDS: &str = "use node, namespace, pod, pod_uid, container, container_image, owner_kind, \
owner_name, workload, pod_label:KEY, pod_annotation:KEY or namespace_label:KEY";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKubernetes {
    node_name: Option<String>,
    api_server: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_wait", with = "humantime_serde")]
    wait: Duration,
    #[serde(default)]
    labels: BTreeMap<String, Spec>,
    #[serde(default)]
    metadata: BTreeMap<String, Spec>,
    #[serde(default = "default_prefix")]
    annotation_prefix: String,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    annotation_labels: Vec<String>,
    #[serde(default = "default_max_pods")]
    max_pods: usize,
}

/// One piece of pod metadata, or a list whose first piece with a value is taken
/// (`["pod_label:app.kubernetes.io/name", "pod_label:app", "workload"]`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Spec {
    One(String),
    FirstOf(Vec<String>),
}

fn default_wait() -> Duration {
    Duration::from_secs(5)
}
fn default_prefix() -> String {
    "ztail.io".into()
}
fn default_max_pods() -> usize {
    1000
}

impl KubernetesConfig {
    /// `env` reads the environment (`NODE_NAME`, `KUBERNETES_SERVICE_HOST`/`_PORT`), which the
    /// downward API and the kubelet set in the pod.
    pub(crate) fn validate(
        v: &Validator,
        raw: RawKubernetes,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<KubernetesConfig, ConfigError> {
        // In a pod both come from the environment; elsewhere (`ztail check` on a laptop, in CI)
        // their absence is reported by `unresolved`, and `ztail run` refuses to start.
        let node_name = raw
            .node_name
            .or_else(|| env("NODE_NAME"))
            .map(|n| n.trim().to_owned())
            .unwrap_or_default();
        let api_server = match raw.api_server {
            Some(url) => Some(url),
            None => match (
                env("KUBERNETES_SERVICE_HOST"),
                env("KUBERNETES_SERVICE_PORT"),
            ) {
                (Some(host), Some(port)) if host.contains(':') => {
                    Some(format!("https://[{host}]:{port}"))
                }
                (Some(host), Some(port)) => Some(format!("https://{host}:{port}")),
                _ => None,
            },
        };
        let api_server = match api_server {
            None => None,
            Some(url) => {
                let uri: http::Uri = url.parse().map_err(|e| {
                    v.err("kubernetes.api_server", format!("invalid URL {url:?}: {e}"))
                })?;
                if uri.scheme_str() != Some("https") || uri.host().is_none() {
                    return Err(v.err(
                        "kubernetes.api_server",
                        format!("{uri} must be an https:// URL: a service account token is never sent in plaintext"),
                    ));
                }
                Some(uri)
            }
        };
        let sa = PathBuf::from(SERVICE_ACCOUNT_DIR);
        let mut taken: Vec<&str> = Vec::new();
        let fields = |table: &str, raw: BTreeMap<String, Spec>| {
            let mut out = Vec::with_capacity(raw.len());
            for (name, spec) in raw {
                let k = format!("kubernetes.{table}.{name}");
                labels::validate_name(&name).map_err(|r| v.err(&k, r))?;
                let specs = match spec {
                    Spec::One(s) => vec![s],
                    Spec::FirstOf(list) if list.is_empty() || list.len() > 8 => {
                        return Err(v.err(
                            &k,
                            "a list takes 1 to 8 fields, the first with a value wins",
                        ));
                    }
                    Spec::FirstOf(list) => list,
                };
                let mut first_of = Vec::with_capacity(specs.len());
                for spec in specs {
                    first_of.push(Field::parse(&spec).map_err(|r| v.err(&k, r))?);
                }
                out.push((name, first_of));
            }
            Ok::<_, ConfigError>(out)
        };
        let labels = fields("labels", raw.labels)?;
        let metadata = fields("metadata", raw.metadata)?;
        for (name, _) in &metadata {
            if name == crate::loki::encode::AGENT_ID {
                return Err(v.err(
                    format!("kubernetes.metadata.{name}"),
                    "is set by ztail (sink.provenance): a pod must not be able to claim it",
                ));
            }
        }
        if raw.wait > Duration::from_secs(60) {
            return Err(v.err(
                "kubernetes.wait",
                "at most 60s: lines of a pod the API server does not know are held this long",
            ));
        }
        for (name, _) in labels.iter().chain(&metadata) {
            if taken.contains(&name.as_str()) {
                return Err(v.err(
                    format!("kubernetes.metadata.{name}"),
                    "is also a label: a name is either a label or metadata",
                ));
            }
            taken.push(name);
        }
        if labels.len() + raw.annotation_labels.len() > labels::MAX_LABELS {
            return Err(v.err(
                "kubernetes.labels",
                format!(
                    "more labels than Loki's default limit of {} per stream",
                    labels::MAX_LABELS
                ),
            ));
        }
        if metadata.len() > 32 {
            return Err(v.err(
                "kubernetes.metadata",
                "at most 32 fields: structured metadata counts against Loki's per-entry limits",
            ));
        }
        let prefix = raw.annotation_prefix.trim_end_matches('/');
        if prefix.is_empty() || prefix.contains(['/', ' ']) || prefix.len() > 253 {
            return Err(v.err(
                "kubernetes.annotation_prefix",
                format!("{prefix:?} is not a DNS prefix such as \"ztail.io\""),
            ));
        }
        for (j, t) in raw.tenants.iter().enumerate() {
            crate::stage::config::validate_tenant(t)
                .map_err(|r| v.err(format!("kubernetes.tenants[{j}]"), r))?;
        }
        for (j, name) in raw.annotation_labels.iter().enumerate() {
            let k = format!("kubernetes.annotation_labels[{j}]");
            labels::validate_name(name).map_err(|r| v.err(&k, r))?;
            if taken.contains(&name.as_str()) {
                return Err(v.err(&k, format!("{name:?} is already set from pod metadata")));
            }
        }
        if raw.max_pods == 0 {
            return Err(v.err("kubernetes.max_pods", "must be above zero"));
        }
        Ok(KubernetesConfig {
            node_name,
            api_server,
            token_file: v.path(&raw.token_file.unwrap_or_else(|| sa.join("token"))),
            ca_file: v.path(&raw.ca_file.unwrap_or_else(|| sa.join("ca.crt"))),
            wait: raw.wait,
            labels,
            metadata,
            annotation_prefix: format!("{prefix}/"),
            tenants: raw.tenants,
            annotation_labels: raw.annotation_labels,
            max_pods: raw.max_pods,
        })
    }

    /// What the environment must still provide: `ztail check` warns, `ztail run` refuses.
    pub fn unresolved(&self) -> Option<String> {
        let mut missing = Vec::new();
        if self.node_name.is_empty() {
            missing.push("kubernetes.node_name is not set and NODE_NAME is not in the environment: give the DaemonSet `env: [{name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]`");
        }
        if self.api_server.is_none() {
            missing.push("kubernetes.api_server is not set and KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not in the environment (the kubelet sets them in every pod): set api_server = \"https://HOST:PORT\"");
        }
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// Every stream label name the metadata can set: configured ones and those annotations may.
    pub fn label_names(&self) -> impl Iterator<Item = &str> {
        self.labels
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.annotation_labels.iter().map(String::as_str))
    }

    /// What the per-pod annotations may choose, for `ztail check`.
    pub fn describe_annotations(&self, formats: &[String]) -> Vec<String> {
        let p = &self.annotation_prefix;
        let list = |v: &[String]| {
            if v.is_empty() {
                "(none configured)".to_owned()
            } else {
                v.join(", ")
            }
        };
        vec![
            format!("{p}exclude: \"true\" ships nothing of the pod"),
            format!("{p}exclude-containers: \"a,b\" ships nothing of those containers"),
            format!("{p}format: one of {}", list(formats)),
            format!("{p}tenant: one of {}", list(&self.tenants)),
            format!(
                "{p}labels: \"name=value,...\" with names among {}",
                list(&self.annotation_labels)
            ),
        ]
    }
}
