use std::path::Path;

use super::*;

fn conv(yaml: &str) -> Conversion {
    convert(
        "promtail.yaml",
        yaml,
        Path::new("ztail.toml"),
        &Options::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

const CLIENT: &str = "clients:\n  - url: http://loki:3100/loki/api/v1/push\n";

#[test]
fn a_static_job_becomes_a_source_that_passes_check() {
    let c = conv(&format!(
        "{CLIENT}scrape_configs:\n  - job_name: system\n    static_configs:\n      - targets: [localhost]\n        labels:\n          job: varlogs\n          __path__: /var/log/{{a,b}}/*.log\n"
    ));
    let cfg = crate::config::Config::parse(Path::new("ztail.toml"), &c.toml).unwrap();
    assert_eq!(cfg.sources.len(), 1);
    assert_eq!(
        cfg.sources[0].include,
        ["/var/log/a/*.log", "/var/log/b/*.log"]
    );
    assert!(
        c.toml
            .contains("# promtail: scrape_configs[0].static_configs[0] (job_name: system)"),
        "{}",
        c.toml
    );
    assert_eq!(
        cfg.sink().url.as_str(),
        "https://loki:3100/loki/api/v1/push"
    );
    assert!(
        c.report
            .not_converted
            .iter()
            .any(|n| n.path == "scrape_configs[0].static_configs[0].targets")
    );
    assert!(
        c.report
            .to_do
            .iter()
            .any(|n| n.reason.contains("allowed_ids"))
    );
}

#[test]
fn yaml_errors_unknown_stages_and_wrong_types_name_path_and_line() {
    for (yaml, path, line) in [
        (
            format!(
                "{CLIENT}scrape_configs:\n  - job_name: a\n    pipeline_stages:\n      - regexp:\n          expression: x\n"
            ),
            "scrape_configs[0].pipeline_stages[0]",
            6,
        ),
        (
            format!(
                "{CLIENT}scrape_configs:\n  - job_name: a\n    pipeline_stages:\n      - json:\n          expressions: [a, b]\n"
            ),
            "scrape_configs[0].pipeline_stages[0].json.expressions",
            7,
        ),
        (
            format!("{CLIENT}scrape_configs:\n  - job_name: a\n     bad: [\n"),
            "",
            5,
        ),
    ] {
        let e = convert("p.yaml", &yaml, Path::new("z.toml"), &Options::default()).unwrap_err();
        assert!(e.path.starts_with(path), "{e} / {path}");
        assert_eq!(e.line, Some(line), "{e}");
        assert!(
            e.to_string().starts_with(&format!("p.yaml:{line}: ")),
            "{e}"
        );
    }
}

#[test]
fn promtail_replace_rewrites_groups_only() {
    let (e, r) = stages::test_replace(r"password=(\S+)", "****").unwrap();
    let re = regex::Regex::new(&e).unwrap();
    assert_eq!(
        re.replace_all("a password=hunter2 b password=x", r.as_str()),
        "a password=**** b password=****"
    );
    let (e, r) = stages::test_replace(r"(?i)user (?P<u>\w+) ip ([0-9.]+)!", "$x").unwrap();
    let re = regex::Regex::new(&e).unwrap();
    assert_eq!(
        re.replace_all("USER bob ip 1.2.3.4!", r.as_str()),
        "USER $x ip $x!"
    );
    assert!(stages::test_replace("a|(b)", "x").is_err());
    assert!(stages::test_replace("((a)b)", "x").is_err());
    assert!(stages::test_replace("ab", "x").is_err());
    let (e, _) = stages::test_replace(r"[(]x(\d)[)]", "N").unwrap();
    assert_eq!(
        regex::Regex::new(&e)
            .unwrap()
            .replace_all("(x1)", "${1}N${2}"),
        "(xN)"
    );
}

#[test]
fn selectors_parse() {
    assert_eq!(
        stages::test_selector(r#"{app="a", env=~"p.*"} |= "x" !~ `y`"#),
        Ok(4)
    );
    assert!(stages::test_selector(r#"{app="a""#).is_err());
    assert!(stages::test_selector(r#"app="a""#).is_err());
}

#[test]
fn env_expands_as_promtail_does() {
    let mut r = Report::default();
    let get = |n: &str| match n {
        "HOST" => Some("h1".to_owned()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    let out = env::expand_with(
        r"a ${HOST} $HOST ${NOPE:-d} ${EMPTY:-e} ${EMPTY=f} ${NOPE:+g} ${NOPE} $$HOST $${HOST} x$ $1 \\d \/ \w ${NOPE:-http://${HOST}:1/p} ${HOST:-${NOPE}}",
        &mut r,
        &get,
    )
    .ok()
    .unwrap();
    assert_eq!(
        out,
        r"a h1 $HOST d e f g  $HOST ${HOST} x$ $1 \d / \w http://h1:1/p h1"
    );
    assert_eq!(r.changed.len(), 1, "{r:?}");
    for (bad, line) in [
        ("a\n${HOST-d}", 2),
        ("${HOST", 1),
        ("${#HOST}", 1),
        ("${A:-${B}", 1),
        ("${ڭ", 1),
    ] {
        let e = env::expand_with(bad, &mut r, &get).err().unwrap();
        assert_eq!(e.line, line, "{bad}: {}", e.reason);
    }
}

/// The pod job in the shape of Grafana's Helm chart (written here from its structure): pod
/// metadata becomes [kubernetes.labels], the path labels stay, and what ztail cannot express
/// (a label joined from two, labelmap) is reported.
#[test]
fn the_helm_charts_pod_job_becomes_a_kubernetes_source() {
    let c = conv(&format!(
        r#"{CLIENT}scrape_configs:
  - job_name: kubernetes-pods
    pipeline_stages:
      - cri: {{}}
      - labeldrop: [stream]
    kubernetes_sd_configs:
      - role: pod
        namespaces:
          names: [shop, web]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_controller_name]
        regex: ([0-9a-z-.]+?)(-[0-9a-f]{{8,10}})?
        action: replace
        target_label: __tmp_controller_name
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name, __meta_kubernetes_pod_label_app, __tmp_controller_name, __meta_kubernetes_pod_name]
        regex: ^;*([^;]+)(;.*)?$
        action: replace
        target_label: app
      - source_labels: [__meta_kubernetes_pod_label_team_x]
        target_label: team
      - action: replace
        source_labels: [__meta_kubernetes_pod_node_name]
        target_label: node_name
      - action: replace
        source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - action: replace
        replacement: $1
        separator: /
        source_labels: [namespace, app]
        target_label: job
      - action: replace
        source_labels: [__meta_kubernetes_pod_container_name]
        target_label: container
      - action: drop
        regex: kube-system
        source_labels: [namespace]
      - action: replace
        replacement: /var/log/pods/*$1/*.log
        separator: /
        source_labels: [__meta_kubernetes_pod_uid, __meta_kubernetes_pod_container_name]
        target_label: __path__
      - action: labelmap
        regex: __meta_kubernetes_pod_label_(.+)
"#
    ));
    let cfg = crate::config::Config::parse(Path::new("ztail.toml"), &c.toml).expect(&c.toml);
    let k = cfg.kubernetes.as_ref().expect("a [kubernetes] table");
    let labels: Vec<(String, String)> = k
        .labels
        .iter()
        .map(|(n, f)| (n.clone(), format!("{f:?}")))
        .collect();
    assert_eq!(
        labels,
        [
            (
                "app".to_owned(),
                r#"[PodLabel("app.kubernetes.io/name"), PodLabel("app"), Workload, Pod]"#
                    .to_owned()
            ),
            ("node_name".to_owned(), "[Node]".to_owned()),
            ("team".to_owned(), r#"[PodLabel("team_x")]"#.to_owned()),
        ],
        "{}",
        c.toml
    );
    let src = &cfg.sources[0];
    assert_eq!(src.include, ["/var/log/pods/*/*/*.log"]);
    assert!(c.toml.contains("stream_as = \"drop\""), "{}", c.toml);
    assert!(c.toml.contains("value = \"^(?:shop|web)$\""), "{}", c.toml);
    assert!(
        c.toml.contains("value = \"^(?:kube-system)$\""),
        "{}",
        c.toml
    );
    let paths = |notes: &[Note]| notes.iter().map(|n| n.path.clone()).collect::<Vec<_>>();
    assert_eq!(
        paths(&c.report.not_converted),
        [
            "scrape_configs[0].relabel_configs[5]",
            "scrape_configs[0].relabel_configs[9]"
        ],
        "{:?}",
        c.report
    );
    // The workload for the controller's trimmed name, the guessed key and the namespace
    // filter are called out; the fallback chain itself converts whole.
    let changed = paths(&c.report.changed);
    for p in [
        "scrape_configs[0].relabel_configs[0]",
        "scrape_configs[0].relabel_configs[2]",
        "scrape_configs[0].kubernetes_sd_configs[0].namespaces",
    ] {
        assert!(changed.iter().any(|c| c == p), "{p}: {changed:?}");
    }
}

/// Semantics the review found at risk: Promtail's external labels come after the pipeline (no
/// stage sees or removes them), and a missing label is Promtail's "" but never matches in ztail.
#[test]
fn external_labels_and_missing_labels_keep_promtails_meaning() {
    let c = conv(
        r#"clients:
  - url: https://loki/loki/api/v1/push
    external_labels: {cluster: prod, job: ext}
scrape_configs:
  - job_name: app
    static_configs:
      - labels: {job: app, __path__: /var/log/app.log}
    pipeline_stages:
      - labelallow: [job, filename]
      - match:
          selector: '{app=~"web|"}'
          action: drop
      - json:
          expressions: {level: ""}
      - drop:
          source: level
          value: ""
"#,
    );
    let cfg = crate::config::Config::parse(Path::new("ztail.toml"), &c.toml).expect(&c.toml);
    let labels: Vec<(&str, &str)> = cfg.sources[0].labels.iter().collect();
    assert_eq!(labels, [("cluster", "prod"), ("job", "app")], "{}", c.toml);
    let not: Vec<&str> = c
        .report
        .not_converted
        .iter()
        .map(|n| n.path.as_str())
        .collect();
    assert_eq!(
        not,
        [
            "scrape_configs[0].pipeline_stages[1].match",
            "scrape_configs[0].pipeline_stages[3].drop"
        ],
        "{:?}",
        c.report
    );
}

/// `[kubernetes.labels]` are shared by every pod source: two pod jobs that label differently
/// are called out, whichever job has the extra label.
#[test]
fn pod_jobs_that_label_differently_are_reported() {
    let job = |name: &str, relabel: &str| {
        format!(
            "  - job_name: {name}\n    pipeline_stages: [{{cri: {{}}}}]\n    kubernetes_sd_configs: [{{role: pod}}]\n    relabel_configs:{relabel}\n"
        )
    };
    let team = "\n      - {source_labels: [__meta_kubernetes_pod_label_team], target_label: team}";
    for (a, b) in [(team, " []"), (" []", team)] {
        let c = conv(&format!(
            "{CLIENT}scrape_configs:\n{}{}",
            job("a", a),
            job("b", b)
        ));
        assert!(
            c.report.changed.iter().any(|n| n.path == "scrape_configs"),
            "{:?}",
            c.report
        );
    }
    let same = conv(&format!(
        "{CLIENT}scrape_configs:\n{}{}",
        job("a", team),
        job("b", team)
    ));
    assert!(
        !same
            .report
            .changed
            .iter()
            .any(|n| n.path == "scrape_configs")
    );
}

/// Credentials in Promtail's URL are refused and never written into the ztail config.
#[test]
fn a_password_in_the_url_is_left_out_and_reported() {
    let c = conv(
        "clients:\n  - url: http://user:s3cret@loki:3100/loki/api/v1/push\nscrape_configs:\n  - job_name: a\n    static_configs:\n      - labels: {__path__: /var/log/a.log}\n",
    );
    assert!(
        !c.toml.contains("s3cret") && !c.toml.contains("user"),
        "{}",
        c.toml
    );
    assert!(
        c.toml
            .contains(r#"url = "https://loki:3100/loki/api/v1/push""#),
        "{}",
        c.toml
    );
    assert!(
        c.report
            .not_converted
            .iter()
            .any(|n| n.path == "clients[0].url")
    );
    assert!(!format!("{:?}", c.report).contains("s3cret"));
}

#[test]
fn a_journal_job_becomes_a_journal_source() {
    let c = conv(&format!(
        r#"{CLIENT}scrape_configs:
  - job_name: journal
    journal:
      path: /var/log/journal
      labels:
        job: systemd-journal
      matches: _SYSTEMD_UNIT=kubelet.service _SYSTEMD_UNIT=containerd.service SYSLOG_IDENTIFIER=sshd _TRANSPORT=kernel
    relabel_configs:
      - source_labels: ['__journal__systemd_unit']
        target_label: unit
      - source_labels: ['__journal__hostname']
        target_label: __tmp
      - source_labels: ['__tmp']
        target_label: node
      - source_labels: ['__journal__comm']
        regex: 'sshd|kubelet'
        action: keep
      - source_labels: ['__journal_priority_keyword']
        target_label: level
      - regex: '__journal_(.+)'
        action: labelmap
"#
    ));
    let cfg = crate::config::Config::parse(Path::new("ztail.toml"), &c.toml)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.toml));
    let s = &cfg.sources[0];
    let j = s.journal.as_ref().expect("a journal source");
    assert_eq!(j.directories, [Path::new("/var/log/journal")]);
    assert_eq!(j.units, ["kubelet.service", "containerd.service"]);
    assert_eq!(j.identifiers, ["sshd"]);
    let mut fields = j.fields.clone();
    fields.sort();
    assert_eq!(
        fields,
        [
            ("comm", "_COMM"),
            ("level", "PRIORITY"),
            ("node", "_HOSTNAME"),
            ("transport", "_TRANSPORT"),
            ("unit", "_SYSTEMD_UNIT"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    // The match on _TRANSPORT, the keep on _COMM, then the labels.
    assert!(
        c.toml
            .contains("type = \"keep\"\nfield = \"transport\"\nvalue = \"^(?:kernel)$\""),
        "{}",
        c.toml
    );
    assert!(
        c.toml
            .contains("type = \"keep\"\nfield = \"comm\"\nvalue = \"^(?:sshd|kubelet)$\""),
        "{}",
        c.toml
    );
    assert!(
        c.toml
            .contains("set = { level = \"level\", node = \"node\", unit = \"unit\" }"),
        "{}",
        c.toml
    );
    let has = |list: &[Note], path: &str, what: &str| {
        list.iter()
            .any(|n| n.path == path && n.reason.contains(what))
    };
    assert!(has(
        &c.report.not_converted,
        "scrape_configs[0].relabel_configs[5]",
        "journal.fields"
    ));
    assert!(has(
        &c.report.changed,
        "scrape_configs[0].relabel_configs[4]",
        "keyword"
    ));
    assert!(has(
        &c.report.changed,
        "scrape_configs[0].journal.matches",
        "UNIT"
    ));
    assert!(has(&c.report.changed, "scrape_configs[0].journal", "7h"));
}

#[test]
fn journal_jobs_ztail_cannot_express_are_reported() {
    // A disjunction of matches, and a job whose entries get no label (Promtail ships nothing).
    let e = convert(
        "promtail.yaml",
        &format!(
            "{CLIENT}scrape_configs:\n  - job_name: j\n    journal:\n      matches: _SYSTEMD_UNIT=a.service + SYSLOG_IDENTIFIER=b\n"
        ),
        Path::new("ztail.toml"),
        &Options::default(),
    )
    .expect_err("refused: nothing to ship");
    let report = e.report.expect("a report");
    assert!(
        report
            .not_converted
            .iter()
            .any(|n| n.path == "scrape_configs[0].journal.matches" && n.reason.contains("(+)"))
    );
    assert!(
        report
            .not_converted
            .iter()
            .any(|n| n.path == "scrape_configs[0]" && n.reason.contains("no label"))
    );
}
