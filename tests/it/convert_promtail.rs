//! `ztail convert promtail`: real Promtail configs (tests/data/promtail, each with its
//! provenance) convert into configs that `ztail check` accepts, with a report that matches its
//! golden file; and Promtail's stage semantics, written down from its documentation, hold for
//! the converted stages when sample lines go through `ztail try`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::support::ztail::Env;

fn ztail(args: &[&std::ffi::OsStr], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztail"));
    cmd.args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Converts `yaml` and returns the written config's path and the report.
fn convert(env: &Env, yaml: &Path, name: &str) -> (PathBuf, Value) {
    let out = env.path(&format!("{name}.toml"));
    let report = env.path(&format!("{name}.json"));
    let args: Vec<&std::ffi::OsStr> = vec![
        "convert".as_ref(),
        "promtail".as_ref(),
        yaml.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--report".as_ref(),
        report.as_os_str(),
    ];
    let o = ztail(&args, None);
    assert!(
        o.status.success(),
        "{}: {}",
        yaml.display(),
        text(&o.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (out, report)
}

/// The environment the corpus's `${VAR}` files are converted with (`tests/data/promtail/env`).
fn corpus_env(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("env"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Every real Promtail config in the corpus either converts into a config that `ztail check`
/// accepts, or is refused with the reason Promtail would refuse it for too (no clients, a
/// fragment, an invalid stage) or because nothing in it is a file ztail can read; either way
/// the report (or error) is exactly its golden file's.
#[test]
fn every_real_promtail_config_converts_into_one_ztail_check_accepts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/promtail");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let vars = corpus_env(&dir);
    let bless = std::env::var_os("ZTAIL_BLESS").is_some();
    let env = Env::new();
    let (mut converted, mut failures) = (0, Vec::new());
    for yaml in &files {
        let name = yaml.file_stem().unwrap().to_string_lossy().into_owned();
        let out = env.path(&format!("{name}.toml"));
        let report = env.path(&format!("{name}.json"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztail"));
        cmd.current_dir(&dir)
            .args(["convert", "promtail"])
            .arg(yaml.file_name().unwrap())
            .arg("-o")
            .arg(&out)
            .arg("--report")
            .arg(&report)
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .envs(vars.iter().map(|(k, v)| (k, v)));
        if std::fs::read_to_string(yaml).unwrap().contains("${") {
            cmd.arg("--expand-env");
        }
        let o = cmd.output().unwrap();
        let stderr = text(&o.stderr);
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        let code = o.status.code().unwrap_or(-1);
        let error = stderr
            .lines()
            .rfind(|l| l.starts_with("ztail: "))
            .filter(|_| code != 0)
            .map(str::to_owned);
        let got = json!({
            "exit": code,
            "error": error,
            "report": std::fs::read(&report).ok().map(|r| serde_json::from_slice::<Value>(&r).unwrap()),
        });
        if code == 0 {
            converted += 1;
            let check = ztail(&["check".as_ref(), out.as_os_str()], None);
            assert!(
                check.status.success(),
                "{name}: ztail check refused the converted config: {}\n{}",
                text(&check.stderr),
                std::fs::read_to_string(&out).unwrap()
            );
        }
        let golden = dir.join(format!("{name}.golden.json"));
        let got = serde_json::to_string_pretty(&got).unwrap() + "\n";
        if bless {
            std::fs::write(&golden, &got).unwrap();
        } else {
            let want = std::fs::read_to_string(&golden).unwrap_or_default();
            if want != got {
                failures.push(format!(
                    "{name}: differs from {} (ZTAIL_BLESS=1 rewrites it):\n{got}",
                    golden.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        converted >= 20,
        "only {converted} of {} files convert",
        files.len()
    );
}

/// One stage's documented Promtail behaviour: the pipeline, sample lines, and what Promtail
/// makes of each line (a JSON object whose keys must match `ztail try`'s output for it).
struct Case {
    stage: &'static str,
    pipeline: &'static str,
    input: &'static str,
    want: Vec<Value>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            stage: "regex + labels",
            pipeline: r#"
      - regex:
          expression: 'level=(?P<level>\w+)'
      - labels:
          level:"#,
            input: "ts=1 level=warn msg=disk\nno level here\n",
            want: vec![
                json!({"line": "ts=1 level=warn msg=disk", "labels": {"level": "warn"}}),
                json!({"line": "no level here", "labels": {"level": null}}),
            ],
        },
        Case {
            stage: "json + output",
            pipeline: r#"
      - json:
          expressions:
            msg: message
      - output:
          source: msg"#,
            input: "{\"level\":\"info\",\"message\":\"hello\"}\nnot json\n",
            want: vec![json!({"line": "hello"}), json!({"line": "not json"})],
        },
        Case {
            stage: "logfmt + labels (renamed)",
            pipeline: r#"
      - logfmt:
          mapping:
            lvl: level
      - labels:
          severity: lvl"#,
            input: "level=error msg=\"a b\"\n",
            want: vec![json!({"labels": {"severity": "error"}})],
        },
        Case {
            stage: "drop (expression)",
            pipeline: r#"
      - drop:
          expression: ".*debug.*"
          drop_counter_reason: noise"#,
            input: "a debug line\nan info line\n",
            want: vec![
                json!({"line": "a debug line", "dropped": "noise"}),
                json!({"line": "an info line"}),
            ],
        },
        Case {
            stage: "drop (source + value)",
            pipeline: r#"
      - json:
          expressions:
            level:
      - drop:
          source: level
          value: debug"#,
            input: "{\"level\":\"debug\"}\n{\"level\":\"debugger\"}\n",
            want: vec![
                json!({"line": "{\"level\":\"debug\"}", "dropped": "drop_stage"}),
                json!({"line": "{\"level\":\"debugger\"}"}),
            ],
        },
        Case {
            stage: "match with action drop",
            pipeline: r#"
      - match:
          selector: '{job="app"} |= "healthz"'
          action: drop
          drop_counter_reason: health"#,
            input: "GET /healthz 200\nGET /api 200\n",
            want: vec![
                json!({"dropped": "health"}),
                json!({"line": "GET /api 200", "labels": {"job": "app"}}),
            ],
        },
        Case {
            stage: "replace (the group, not the match)",
            pipeline: r#"
      - replace:
          expression: 'password=(\S+)'
          replace: '****'"#,
            input: "login user=bob password=hunter2 ok\n",
            want: vec![json!({"line": "login user=bob password=**** ok"})],
        },
        Case {
            stage: "template + output",
            pipeline: r#"
      - json:
          expressions:
            level:
            msg: message
      - template:
          source: out
          template: '{{ .level }}: {{ .msg }}'
      - output:
          source: out"#,
            input: "{\"level\":\"warn\",\"message\":\"disk full\"}\n",
            want: vec![json!({"line": "warn: disk full"})],
        },
        Case {
            stage: "timestamp",
            pipeline: r#"
      - regex:
          expression: '^(?P<time>\S+) '
      - timestamp:
          source: time
          format: RFC3339"#,
            input: "2024-01-01T00:00:00Z started\n",
            want: vec![
                json!({"line": "2024-01-01T00:00:00Z started", "timestamp": 1_704_067_200_000_000_000i64}),
            ],
        },
        Case {
            stage: "timestamp (a JSON key)",
            pipeline: r#"
      - json:
          expressions:
            ts: time
      - timestamp:
          source: ts
          format: RFC3339Nano"#,
            input: "{\"time\":\"2024-01-01T00:00:01.5Z\",\"msg\":\"x\"}\n",
            want: vec![json!({"timestamp": 1_704_067_201_500_000_000i64})],
        },
        Case {
            stage: "timestamp (a logfmt key, Unix milliseconds)",
            pipeline: r#"
      - logfmt:
          mapping:
            t:
      - timestamp:
          source: t
          format: UnixMs"#,
            input: "level=info t=1704067202000 msg=x\n",
            want: vec![json!({"timestamp": 1_704_067_202_000_000_000i64})],
        },
        Case {
            stage: "static_labels + labeldrop",
            pipeline: r#"
      - static_labels:
          env: prod
          tier: web
      - labeldrop:
          - tier"#,
            input: "x\n",
            want: vec![json!({"labels": {"env": "prod", "tier": null}})],
        },
        Case {
            stage: "labelallow",
            pipeline: r#"
      - static_labels:
          env: prod
      - labelallow:
          - env
          - job
          - filename"#,
            input: "x\n",
            want: vec![json!({"labels": {"env": "prod", "job": "app"}})],
        },
        Case {
            stage: "structured_metadata",
            pipeline: r#"
      - json:
          expressions:
            trace_id:
      - structured_metadata:
          trace_id:"#,
            input: "{\"trace_id\":\"abc\"}\n",
            want: vec![json!({"metadata": {"trace_id": "abc"}, "labels": {"trace_id": null}})],
        },
        Case {
            stage: "decolorize",
            pipeline: "\n      - decolorize:",
            input: "\u{1b}[31mred\u{1b}[0m text\n",
            want: vec![json!({"line": "red text"})],
        },
        Case {
            stage: "multiline",
            pipeline: r#"
      - multiline:
          firstline: '^\d{4}-'
          max_wait_time: 3s"#,
            input: "2024-01-01 boom\n  at a.b\n  at c.d\n2024-01-01 next\n",
            want: vec![
                json!({"line": "2024-01-01 boom\n  at a.b\n  at c.d"}),
                json!({"line": "2024-01-01 next"}),
            ],
        },
        Case {
            stage: "cri",
            pipeline: "\n      - cri: {}",
            input: "2024-01-01T00:00:00.5Z stderr P hel\n2024-01-01T00:00:00.6Z stderr F lo\n",
            want: vec![
                json!({"line": "hello", "labels": {"stream": "stderr"}, "timestamp": 1_704_067_200_500_000_000i64}),
            ],
        },
        Case {
            stage: "docker",
            pipeline: "\n      - docker: {}",
            input: "{\"log\":\"hello\\n\",\"stream\":\"stdout\",\"time\":\"2024-01-01T00:00:00Z\"}\n",
            want: vec![json!({"line": "hello", "labels": {"stream": "stdout"}})],
        },
        Case {
            stage: "match + tenant",
            pipeline: r#"
      - match:
          selector: '{job="app"}'
          stages:
            - tenant:
                value: team-app"#,
            input: "x\n",
            want: vec![json!({"tenant": "team-app"})],
        },
        Case {
            stage: "limit (drop)",
            pipeline: r#"
      - limit:
          rate: 1
          burst: 1
          drop: true"#,
            input: "a\nb\nc\n",
            want: vec![
                json!({"line": "a"}),
                json!({"line": "b", "dropped": "limit"}),
                json!({"line": "c", "dropped": "limit"}),
            ],
        },
    ]
}

/// `want`'s keys hold in `got`; a null label means the label is absent; an entry `want` does
/// not say was dropped must have been shipped.
fn matches(got: &Value, want: &Value) -> bool {
    let want = want.as_object().unwrap();
    if !want.contains_key("dropped") && !got["dropped"].is_null() {
        return false;
    }
    want.iter().all(|(k, w)| match (k.as_str(), w) {
        ("labels" | "metadata", Value::Object(m)) => m.iter().all(|(name, v)| {
            let g = &got[k][name];
            if v.is_null() { g.is_null() } else { g == v }
        }),
        _ => &got[k] == w,
    })
}

#[test]
fn promtail_stage_semantics_hold_for_the_converted_stages() {
    let env = Env::new();
    let log = env.path("logs/app.log");
    let mut failures = Vec::new();
    for (i, case) in cases().into_iter().enumerate() {
        let yaml = format!(
            "clients:\n  - url: http://loki:3100/loki/api/v1/push\nscrape_configs:\n  - job_name: app\n    static_configs:\n      - labels:\n          job: app\n          __path__: {}\n    pipeline_stages:{}\n",
            log.display(),
            case.pipeline
        );
        let promtail = env.path(&format!("case{i}.yaml"));
        std::fs::write(&promtail, yaml).unwrap();
        let (toml, report) = convert(&env, &promtail, &format!("case{i}"));
        assert_eq!(
            report["not_converted"],
            json!([]),
            "{}: {report}",
            case.stage
        );
        let o = ztail(
            &[
                "try".as_ref(),
                "-c".as_ref(),
                toml.as_os_str(),
                "--path".as_ref(),
                log.as_os_str(),
            ],
            Some(case.input.as_bytes()),
        );
        assert!(o.status.success(), "{}: {}", case.stage, text(&o.stderr));
        let got: Vec<Value> = text(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ok =
            got.len() == case.want.len() && got.iter().zip(&case.want).all(|(g, w)| matches(g, w));
        if !ok {
            failures.push(format!(
                "{}: want {:?}\n got {:?}\n{}",
                case.stage,
                case.want,
                got,
                std::fs::read_to_string(&toml).unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn bad_promtail_files_get_the_yaml_path_and_line_never_a_panic() {
    let env = Env::new();
    for (name, yaml, want) in [
        (
            "syntax",
            "clients:\n  - url: x\n   bad: y\n",
            "syntax.yaml:3: clients: did not find expected '-' indicator",
        ),
        (
            "unknown-stage",
            "clients:\n  - url: http://l/loki/api/v1/push\nscrape_configs:\n  - job_name: a\n    pipeline_stages:\n      - regexp:\n          expression: x\n",
            "unknown-stage.yaml:6: scrape_configs[0].pipeline_stages[0].regexp: unknown variant `regexp`",
        ),
        (
            "wrong-type",
            "clients:\n  - url: http://l/loki/api/v1/push\nscrape_configs:\n  - job_name: a\n    pipeline_stages:\n      - limit:\n          rate: fast\n          burst: 1\n",
            "wrong-type.yaml:7: scrape_configs[0].pipeline_stages[0].limit.rate: invalid type",
        ),
        ("no-client", "scrape_configs: []\n", "no `clients`"),
    ] {
        let path = env.path(&format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let o = ztail(
            &["convert".as_ref(), "promtail".as_ref(), path.as_os_str()],
            None,
        );
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}
