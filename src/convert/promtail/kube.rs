//! `kubernetes_sd_configs` (role `pod`) with `relabel_configs`: the pod files under
//! `/var/log/pods` as a `cri`/`docker` source, and the relabelled `__meta_kubernetes_*` labels
//! as `[kubernetes.labels]` fields, in the shapes Grafana's Helm chart and docs ship.

use std::collections::{BTreeMap, BTreeSet};

use super::Converter;
use super::model::ScrapeConfig;
use super::out::{Item, Kubernetes, Source, Table, strings};

/// The labels a `cri`/`docker` source takes from the kubelet's path.
const PATH_LABELS: [&str; 3] = ["namespace", "pod", "container"];

/// Well-known label and annotation keys, by the name Promtail's discovery gives them (every
/// character outside `[a-zA-Z0-9_]` written `_`).
const KNOWN_KEYS: &[&str] = &[
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/created-by",
    "helm.sh/chart",
    "k8s-app",
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "kubernetes.io/config.hash",
    "kubernetes.io/config.mirror",
];

fn sanitized(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The Kubernetes key a sanitized name stands for, and whether that is a guess.
fn key(name: &str) -> (String, bool) {
    match KNOWN_KEYS.iter().find(|k| sanitized(k) == name) {
        Some(k) => ((*k).to_owned(), false),
        None => (name.to_owned(), name.contains('_')),
    }
}

/// The ztail metadata field of a discovery label, and whether its key is a guess.
fn meta_field(label: &str) -> Option<(String, bool)> {
    let m = label.strip_prefix("__meta_kubernetes_")?;
    let fixed = match m {
        "namespace" => "namespace",
        "pod_name" => "pod",
        "pod_uid" => "pod_uid",
        "pod_container_name" => "container",
        "pod_container_image" => "container_image",
        "pod_node_name" => "node",
        "pod_controller_kind" => "owner_kind",
        "pod_controller_name" => "owner_name",
        _ => {
            for (prefix, field) in [
                ("pod_label_", "pod_label"),
                ("pod_annotation_", "pod_annotation"),
                ("namespace_label_", "namespace_label"),
            ] {
                if let Some(name) = m.strip_prefix(prefix) {
                    let (k, guess) = key(name);
                    return Some((format!("{field}:{k}"), guess));
                }
            }
            return None;
        }
    };
    Some((fixed.to_owned(), false))
}

/// Promtail's Helm chart picks the first non-empty of several labels with this regex.
const FIRST_NON_EMPTY: &str = "^;*([^;]+)(;.*)?$";

pub(super) fn source(c: &mut Converter, at: &str, sc: &ScrapeConfig) -> Option<Source> {
    let mut pods = false;
    let mut filters = Vec::new();
    for (i, sd) in sc.kubernetes_sd_configs.iter().enumerate() {
        let sat = format!("{at}.kubernetes_sd_configs[{i}]");
        if sd.role != "pod" {
            c.report.not_converted(
                format!("{sat}.role"),
                format!(
                    "role {:?}: ztail reads the logs of its node's pods (role pod)",
                    sd.role
                ),
            );
            continue;
        }
        pods = true;
        for (k, v) in &sd.rest {
            let names: Vec<String> = v
                .get("names")
                .and_then(|n| n.as_sequence())
                .map(|s| {
                    s.iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if k == "namespaces" && !names.is_empty() {
                let alt: Vec<String> = names.iter().map(|n| regex::escape(n)).collect();
                let mut t = Table::new(format!("promtail: {sat}.namespaces"));
                t.set("type", "keep");
                t.set("label", "namespace");
                t.set("value", format!("^(?:{})$", alt.join("|")));
                t.set("reason", "namespace");
                filters.push(t);
                c.report.changed(
                    format!("{sat}.namespaces"),
                    "ztail watches every namespace's pods on its node and drops the other namespaces' lines (counted)",
                );
            } else {
                let reason = match k.as_str() {
                    "selectors" => {
                        "ztail matches every pod of its node; drop or keep by label with a stage, or exclude pods with the ztail.io/exclude annotation"
                    }
                    "api_server" | "kubeconfig_file" | "tls_config" | "bearer_token_file"
                    | "basic_auth" => {
                        "ztail talks to the API server of its own cluster (`[kubernetes]` api_server, token_file, ca_file)"
                    }
                    _ => "not a kubernetes_sd_configs setting this converter knows",
                };
                c.report.not_converted(format!("{sat}.{k}"), reason);
            }
        }
    }
    if !pods {
        return None;
    }

    // What each label the relabelling writes is: a metadata field, or a constant.
    // A label's value is the first of these fields with one.
    let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    let mut constants: BTreeMap<String, (String, String)> = BTreeMap::new();
    // Notes on a field a temporary label holds, reported when a real label takes it.
    let mut notes: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let resolve =
        |fields: &BTreeMap<String, Vec<String>>, name: &str| -> Option<(Vec<String>, bool)> {
            meta_field(name)
                .map(|(f, g)| (vec![f], g))
                .or_else(|| fields.get(name).map(|f| (f.clone(), false)))
        };
    for (i, r) in sc.relabel_configs.iter().enumerate() {
        let rat = format!("{at}.relabel_configs[{i}]");
        c.report.rest(&rat, &r.rest, |_| None);
        let action = r.action();
        let (regex, replacement) = (r.regex(), r.replacement());
        let (default_regex, plain_replacement) = (r.takes_all(), r.plain_replacement());
        match action.as_str() {
            "replace" => {
                let Some(target) = r.target_label.as_deref() else {
                    c.report.not_converted(rat, "replace without target_label");
                    continue;
                };
                if target == "__path__" {
                    continue; // The source's include covers every pod's files.
                }
                let found: Option<(Vec<String>, bool, Option<String>)> = match r.source_labels.as_slice() {
                    [] if !replacement.contains('$') => {
                        if !target.starts_with("__") {
                            constants.insert(target.to_owned(), (replacement.to_owned(), rat.clone()));
                        }
                        continue;
                    }
                    [one] if default_regex && plain_replacement => {
                        resolve(&fields, one).map(|(f, g)| (f, g, None))
                    }
                    [one] if one == "__meta_kubernetes_pod_controller_name"
                        && regex.contains("[0-9a-f]")
                        && plain_replacement =>
                    {
                        Some((
                            vec!["workload".to_owned()],
                            false,
                            Some("the controller's name without its hash suffix became ztail's workload: the Deployment of a ReplicaSet's pod, else the controller's name".to_owned()),
                        ))
                    }
                    many if regex == FIRST_NON_EMPTY
                        && plain_replacement
                        && r.separator.as_deref().is_none_or(|s| s == ";") => {
                        // The first with a value: a list of fields, in order.
                        let (mut list, mut guess, mut skipped) = (Vec::new(), false, Vec::new());
                        for n in many {
                            match resolve(&fields, n) {
                                Some((f, g)) => {
                                    guess |= g;
                                    for x in f {
                                        if !list.contains(&x) {
                                            list.push(x);
                                        }
                                    }
                                }
                                None => skipped.push(n.as_str()),
                            }
                        }
                        let change = (!skipped.is_empty()).then(|| {
                            format!("{} has no ztail counterpart and is left out of the fallbacks", skipped.join(", "))
                        });
                        (!list.is_empty()).then_some((list, guess, change))
                    }
                    _ => None,
                };
                let Some((field, guess, change)) = found else {
                    c.report.not_converted(
                        rat,
                        "a relabelling ztail cannot express: a ztail label takes one piece of pod metadata as it is (no regex, no joined labels)",
                    );
                    continue;
                };
                // What changed is reported where a label gets the field, not for a temporary.
                let mut why: Vec<(String, String)> =
                    field.iter().flat_map(|f| notes.get(f).cloned().unwrap_or_default()).collect();
                if let Some(w) = change {
                    why.push((rat.clone(), w));
                }
                if guess {
                    why.push((rat.clone(), format!("{}: a Kubernetes key is guessed from Promtail's label name (Promtail writes . / - as _); check it", field.join(", "))));
                }
                if target.starts_with("__") {
                    for f in &field {
                        notes.insert(f.clone(), why.clone());
                    }
                } else {
                    for (p, w) in why {
                        c.report.changed(p, w);
                    }
                }
                constants.remove(target);
                fields.insert(target.to_owned(), field);
                origins.insert(target.to_owned(), rat);
            }
            "keep" | "drop" => {
                let label = match r.source_labels.as_slice() {
                    [one] => resolve(&fields, one)
                        .and_then(|(f, _)| {
                            // The label a stage can test: a path label, or one written above.
                            let path = f.first().filter(|p| f.len() == 1 && PATH_LABELS.contains(&p.as_str()));
                            if let Some(p) = path.filter(|p| fields.get(*p).is_none_or(|x| *x == f)) {
                                Some(p.clone())
                            } else {
                                fields.iter().find(|(t, v)| **v == f && !t.starts_with("__")).map(|(t, _)| t.clone())
                            }
                        }),
                    _ => None,
                };
                match label {
                    _ if r.matches_empty() => c.report.not_converted(
                        rat,
                        "the regex matches an empty value: Promtail tests a missing label as \"\", ztail's stages never match a missing label",
                    ),
                    Some(l) if action == "keep" && !PATH_LABELS.contains(&l.as_str()) => c.report.not_converted(
                        rat,
                        "keep by pod metadata: ztail's pod labels can arrive after a file's first lines, which a keep would drop for good; exclude the other pods with the ztail.io/exclude annotation",
                    ),
                    Some(l) => {
                        let mut t = Table::new(format!("promtail: {rat}"));
                        t.set("type", action.as_str());
                        t.set("label", l);
                        t.set("value", r.anchored());
                        filters.push(t);
                    }
                    None => c.report.not_converted(
                        rat,
                        format!("{action} by pod metadata that is not a label here: exclude pods with the ztail.io/exclude annotation, or make the field a label and {action} it with a stage"),
                    ),
                }
            }
            "labelmap" => c.report.not_converted(
                rat,
                "ztail makes labels only of the pod metadata the config names: add a [kubernetes.labels] entry (`app = \"pod_label:app\"`) for each label you query by",
            ),
            "labeldrop" | "labelkeep" => {
                if let Err(e) = r.filter_labels(&mut fields, &mut constants) {
                    c.report.not_converted(rat, format!("not a regex ztail reads: {e}"));
                }
            }
            other => c.report.not_converted(rat, format!("action {other:?} has no ztail counterpart")),
        }
    }

    let mut s = Source::default();
    let name = c.name(&sc.job_name);
    s.table.origin = format!(
        "promtail: {at} (job_name: {}, kubernetes pods)",
        sc.job_name
    );
    s.table.set("name", name);
    s.table
        .set("include", strings(["/var/log/pods/*/*/*.log"]))
        .note = Some(
        "every container's files on the node; ztail finds the pod by the UID in the path".into(),
    );
    s.table.set("start_at", "beginning").note =
        Some("Promtail reads a file it has no position for from its start".into());
    let mut known: BTreeSet<String> = ["filename".to_owned()].into();
    for (target, (value, rat)) in &constants {
        s.labels
            .push(Item::new(target, value.as_str()).note(format!("promtail: {rat}")));
        known.insert(target.clone());
    }
    known.extend(s.labels.iter().map(|i| i.key.clone()));

    let k = c.doc.kubernetes.get_or_insert_with(|| Kubernetes {
        origin: "promtail: kubernetes_sd_configs (the pods of ztail's node, from the API server)"
            .into(),
        labels: Vec::new(),
    });
    let mut pod_labels = BTreeSet::new();
    for (target, field) in &fields {
        if target.starts_with("__") {
            continue;
        }
        known.insert(target.clone());
        if PATH_LABELS.contains(&target.as_str()) && *field == [target.clone()] {
            continue; // Taken from the path by every cri/docker source.
        }
        pod_labels.insert(target.clone());
        let origin = format!("promtail: {}", origins[target]);
        let value = match field.as_slice() {
            [one] => toml::Value::String(one.clone()),
            many => strings(many),
        };
        match k.labels.iter().find(|i| i.key == *target) {
            Some(existing) if existing.value == value => {}
            Some(_) => c.report.not_converted(
                origins[target].clone(),
                format!("another job gives {target:?} another meaning; ztail's Kubernetes labels are the same for every source"),
            ),
            None => k.labels.push(Item::new(target, value).note(origin)),
        }
    }
    c.pod_labels.push(pod_labels);
    // The kubelet path's labels this job's relabelling sets, and those its filters test.
    let tests = |l: &str| {
        filters
            .iter()
            .any(|t| t.get("label").and_then(|v| v.as_str()) == Some(l))
    };
    let mut path_set = Vec::new();
    for l in PATH_LABELS {
        let set = fields.get(l).is_some_and(|f| *f == [l.to_owned()]);
        if !set && tests(l) {
            c.report.changed(
                format!("{at}.relabel_configs"),
                format!("ztail keeps the {l:?} label to filter on it (Promtail's relabelling filtered on it without keeping it)"),
            );
        }
        if set || tests(l) {
            path_set.push(l);
        }
    }
    known.extend(path_set.iter().map(|l| (*l).to_owned()));
    s.stages.extend(filters);
    super::stages::pipeline(c, at, &sc.pipeline_stages, &mut s, known);
    if s.table.has("format") {
        if path_set.len() < PATH_LABELS.len() {
            let group = |name: &str, pattern: &str| {
                if path_set.contains(&name) {
                    format!("(?P<{name}>{pattern})")
                } else {
                    pattern.to_owned()
                }
            };
            let re = if path_set.is_empty() {
                String::new()
            } else {
                format!(
                    "^/var/log/pods/{}_{}_[^/]+/{}/",
                    group("namespace", "[^/_]+"),
                    group("pod", "[^/_]+"),
                    group("container", "[^/]+")
                )
            };
            s.table.set("path_labels", re).note =
                Some("only the path labels the relabelling set".into());
        }
    } else {
        c.report.changed(
            format!("{at}.pipeline_stages"),
            "no cri or docker stage: lines are shipped as the runtime wrote them, and ztail adds pod metadata only to cri and docker sources",
        );
        // A raw source has no path labels to filter on.
        let before = s.stages.len();
        s.stages.retain(|t| {
            !t.get("label")
                .and_then(|v| v.as_str())
                .is_some_and(|l| PATH_LABELS.contains(&l))
        });
        if s.stages.len() != before {
            c.report.not_converted(
                format!("{at}.relabel_configs"),
                "filters on namespace, pod or container: a source without cri or docker has no such labels",
            );
        }
    }
    Some(s)
}
