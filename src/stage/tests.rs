//! Unit tests of the stages, through the dry run (the reader, framer and runner a tailed file
//! goes through) and through [`Runner::apply`] directly where counts and routes matter.

use std::path::Path;
use std::sync::Arc;

use super::dry_run::{Tried, dry_run};
use super::*;
use crate::config::Config;
use crate::pipeline::Streams;
use crate::tail::config::SourceConfig;

/// A source `app` over `/var/log/app/*.log` with these stages (TOML of `[[sources.stages]]`
/// tables, or a full source body when `raw` holds other keys too).
fn source(stages: &str) -> Result<SourceConfig, String> {
    let text = format!(
        r#"
state_dir = "/tmp/ztail-stage-tests"
host_label = false
[identity]
source = "files"
cert = "c.crt"
key = "c.key"
bundle = "ca.crt"
[sink]
url = "https://loki:3100/loki/api/v1/push"
[sink.peer]
allowed_ids = ["spiffe://example.org/loki"]
[[sources]]
name = "app"
include = ["/var/log/app/*.log"]
labels = {{ job = "app" }}
{stages}
"#
    );
    Config::parse(Path::new("/etc/ztail/ztail.toml"), &text)
        .map(|c| c.sources.into_iter().next().unwrap())
        .map_err(|e| e.to_string())
}

fn run(stages: &str, input: &str) -> Vec<Tried> {
    let src = source(stages).unwrap();
    dry_run(&src, Path::new("/var/log/app/a.log"), input.as_bytes()).unwrap()
}

fn shipped(
    t: &Tried,
) -> (
    &str,
    &BTreeMap<String, String>,
    &BTreeMap<String, String>,
    Option<&str>,
) {
    match t {
        Tried::Shipped {
            line,
            labels,
            metadata,
            tenant,
            ..
        } => (line, labels, metadata, tenant.as_deref()),
        Tried::Dropped { line, dropped } => panic!("{line:?} dropped by {dropped}"),
    }
}

use std::collections::BTreeMap;

/// A runner over the source's own stream, with its registry and metrics.
fn runner(src: &SourceConfig) -> (Runner, Streams, Metrics) {
    let metrics = Metrics::new();
    let streams = Streams::default();
    let base = vec![streams.get(&src.labels, None)];
    let r = Runner::new(
        src.stages.clone().unwrap(),
        &base,
        &streams,
        0,
        "app",
        &metrics,
    );
    (r, streams, metrics)
}

fn dropped(t: &Tried) -> &str {
    match t {
        Tried::Dropped { dropped, .. } => dropped,
        Tried::Shipped { line, .. } => panic!("{line:?} shipped"),
    }
}

fn lines(out: &[Tried]) -> Vec<&str> {
    out.iter()
        .filter_map(|t| match t {
            Tried::Shipped { line, .. } => Some(line.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn drop_and_keep_by_line_field_label_length_and_age() {
    let out = run(
        r#"
[[sources.stages]]
type = "drop"
line = "GET /healthz"
reason = "healthcheck"
[[sources.stages]]
type = "drop"
longer_than = "20B"
"#,
        "GET /healthz 200\nGET /api 200\nthis line is far longer than twenty bytes\n",
    );
    assert_eq!(dropped(&out[0]), "healthcheck");
    assert_eq!(shipped(&out[1]).0, "GET /api 200");
    assert_eq!(dropped(&out[2]), "stages[1]");

    let out = run(
        r#"
[[sources.stages]]
type = "logfmt"
fields = ["level"]
[[sources.stages]]
type = "keep"
field = "level"
value = "^(warn|error)$"
"#,
        "level=info msg=a\nlevel=error msg=b\nmsg=no-level\nlevel=warn msg=c\n",
    );
    assert_eq!(lines(&out), ["level=error msg=b", "level=warn msg=c"]);
    assert_eq!(
        dropped(&out[2]),
        "stages[1]",
        "a missing field fails a keep"
    );

    let out = run(
        r#"
[[sources.stages]]
type = "drop"
label = "job"
value = "^app$"
"#,
        "x\n",
    );
    assert_eq!(dropped(&out[0]), "stages[0]");
}

#[test]
fn drop_older_than_uses_the_entries_own_timestamp() {
    let src = source(
        r#"
timestamp = { regex = "^(\\S+)", format = "rfc3339" }
[[sources.stages]]
type = "drop"
older_than = "1h"
reason = "too_old"
"#,
    )
    .unwrap();
    let now = time_now();
    let recent = format_rfc3339(now - 60);
    let input = format!("2020-01-01T00:00:00Z old\n{recent} recent\nno-timestamp here\n");
    let out = dry_run(&src, Path::new("/var/log/app/a.log"), input.as_bytes()).unwrap();
    assert_eq!(dropped(&out[0]), "too_old");
    assert!(shipped(&out[1]).0.ends_with("recent"));
    assert_eq!(
        shipped(&out[2]).0,
        "no-timestamp here",
        "the read time is never old"
    );
}

fn time_now() -> i64 {
    crate::pipeline::unix_nanos() / 1_000_000_000
}

fn format_rfc3339(secs: i64) -> String {
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn json_fields_become_labels_metadata_and_the_line() {
    let out = run(
        r#"
[[sources.stages]]
type = "json"
fields = ["level", "msg", "trace.id", "unused"]
[[sources.stages]]
type = "labels"
fields = ["level"]
[[sources.stages]]
type = "metadata"
set = { trace_id = "trace.id" }
[[sources.stages]]
type = "output"
field = "msg"
"#,
        concat!(
            r#"{"level":"info","msg":"hello \"world\"","trace":{"id":"abc"}}"#,
            "\n",
            "not json at all\n",
        ),
    );
    let (line, labels, meta, tenant) = shipped(&out[0]);
    assert_eq!(line, "hello \"world\"");
    assert_eq!(labels["level"], "info");
    assert_eq!(labels["job"], "app");
    assert_eq!(labels["filename"], "/var/log/app/a.log");
    assert_eq!(meta["trace_id"], "abc");
    assert_eq!(tenant, None);
    let (line, labels, meta, _) = shipped(&out[1]);
    assert_eq!(line, "not json at all", "nothing parsed: the line stays");
    assert!(!labels.contains_key("level"));
    assert!(meta.is_empty());
}

#[test]
fn regex_logfmt_template_replace_and_decolorize() {
    let out = run(
        r#"
[[sources.stages]]
type = "decolorize"
[[sources.stages]]
type = "regex"
expression = '^(?P<ip>\S+) \S+ (?P<status>\d{3})'
[[sources.stages]]
type = "replace"
expression = '\d+\.\d+\.\d+\.\d+'
replace = "<ip>"
[[sources.stages]]
type = "template"
line = "[{{ .status }}] {{ .Entry }} from {{ .ip }}"
"#,
        "\x1b[32m10.0.0.1 GET 200\x1b[0m ok\n",
    );
    // The regex parsed the line before the replace rewrote it.
    assert_eq!(shipped(&out[0]).0, "[200] <ip> GET 200 ok from 10.0.0.1");
}

#[test]
fn labels_overflow_into_metadata_beyond_max_values() {
    let src = source(
        r#"
[[sources.stages]]
type = "logfmt"
fields = ["user"]
[[sources.stages]]
type = "labels"
fields = ["user"]
max_values = 2
"#,
    )
    .unwrap();
    let input = "user=a\nuser=b\nuser=c\nuser=a\nuser=d\n";
    let out = dry_run(&src, Path::new("/var/log/app/a.log"), input.as_bytes()).unwrap();
    let users: Vec<(Option<&String>, Option<&String>)> = out
        .iter()
        .map(|t| {
            let (_, l, m, _) = shipped(t);
            (l.get("user"), m.get("user"))
        })
        .collect();
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        users,
        [
            (s("a").as_ref(), None),
            (s("b").as_ref(), None),
            (None, s("c").as_ref()),
            (s("a").as_ref(), None),
            (None, s("d").as_ref()),
        ]
    );

    let out = run(
        r#"
[[sources.stages]]
type = "logfmt"
fields = ["user"]
[[sources.stages]]
type = "labels"
fields = ["user"]
max_values = 1
overflow_value = "other"
"#,
        "user=a\nuser=b\n",
    );
    assert_eq!(shipped(&out[1]).1["user"], "other");
    assert!(shipped(&out[1]).2.is_empty());
}

#[test]
fn tenants_come_only_from_the_map() {
    let stages = |unmapped: &str| {
        format!(
            r#"
[[sources.stages]]
type = "json"
fields = ["ns"]
[[sources.stages]]
type = "tenant"
field = "ns"
map = {{ payments = "team-pay", web = "team-web" }}
{unmapped}
"#
        )
    };
    let input = concat!(
        r#"{"ns":"payments"}"#,
        "\n",
        r#"{"ns":"web"}"#,
        "\n",
        r#"{"ns":"evil"}"#,
        "\n",
        "no namespace\n",
    );
    let out = run(&stages("drop_unmapped = true"), input);
    assert_eq!(shipped(&out[0]).3, Some("team-pay"));
    assert_eq!(shipped(&out[1]).3, Some("team-web"));
    assert_eq!(dropped(&out[2]), "tenant_unmapped");
    assert_eq!(dropped(&out[3]), "tenant_unmapped");
    let out = run(&stages("default = \"shared\""), input);
    assert_eq!(shipped(&out[2]).3, Some("shared"));
    assert_eq!(shipped(&out[3]).3, Some("shared"));
}

#[test]
fn a_tenant_can_come_from_a_path_label() {
    let src = source(
        r#"
format = "cri"
[[sources.stages]]
type = "tenant"
label = "namespace"
map = { shop = "team-shop" }
drop_unmapped = true
"#,
    )
    .unwrap();
    let input = "2026-11-26T03:15:00.000000000Z stdout F hello\n";
    let out = dry_run(
        &src,
        Path::new("/var/log/pods/shop_web-1_0a0b/web/0.log"),
        input.as_bytes(),
    )
    .unwrap();
    assert_eq!(shipped(&out[0]).3, Some("team-shop"));
    let out = dry_run(
        &src,
        Path::new("/var/log/pods/other_web-1_0a0b/web/0.log"),
        input.as_bytes(),
    )
    .unwrap();
    assert_eq!(dropped(&out[0]), "tenant_unmapped");
}

#[test]
fn redaction_covers_the_line_metadata_and_labels_whatever_its_place() {
    let out = run(
        r#"
[[sources.stages]]
type = "redact"
rules = [{ name = "session", regex = 'session=(?P<secret>\w+)' }]
[[sources.stages]]
type = "logfmt"
fields = ["session", "user"]
[[sources.stages]]
type = "metadata"
fields = ["session"]
[[sources.stages]]
type = "labels"
set = { who = "user" }
[[sources.stages]]
type = "template"
line = "{{ .Entry }} again session={{ .session }}"
"#,
        "user=session=abc123 session=s3cr3t\n",
    );
    let (line, labels, meta, _) = shipped(&out[0]);
    let all = format!("{line} {labels:?} {meta:?}");
    assert!(!all.contains("s3cr3t"), "{all}");
    assert!(!all.contains("abc123"), "{all}");
    assert!(line.contains("<redacted:session>"), "{line}");
}

#[test]
fn built_in_detectors_catch_every_sample_in_line_and_metadata() {
    for (name, text, secret) in redact::SAMPLES {
        let input = format!("{{\"msg\":{}}}\n", serde_json::to_string(text).unwrap());
        let out = run(
            r#"
[[sources.stages]]
type = "redact"
[[sources.stages]]
type = "json"
fields = ["msg"]
[[sources.stages]]
type = "metadata"
set = { copy = "msg" }
"#,
            &input,
        );
        let (line, _, meta, _) = shipped(&out[0]);
        assert!(!line.contains(secret), "{name}: {line}");
        assert!(!meta["copy"].contains(secret), "{name}: {meta:?}");
    }
}

#[test]
fn runner_counts_drops_and_keeps_positions_for_the_ack_path() {
    let src = source(
        r#"
[[sources.stages]]
type = "drop"
line = "DEBUG"
reason = "debug"
"#,
    )
    .unwrap();
    let (mut r, streams, metrics) = runner(&src);
    let mut data = b"DEBUG a\nINFO b\nDEBUG c\n".to_vec();
    let mut entries = vec![Entry::text(0, 7), Entry::text(8, 14), Entry::text(15, 22)];
    let mut meta = Vec::new();
    let hold = r.apply(&mut data, &mut entries, &mut meta, &streams, 0);
    assert_eq!(hold, Duration::ZERO);
    assert_eq!(entries.len(), 1);
    assert_eq!(
        &data[entries[0].start as usize..entries[0].end as usize],
        b"INFO b"
    );
    assert!(
        metrics
            .render()
            .contains(r#"ztail_stage_dropped_total{source="app",reason="debug"} 2"#),
        "{}",
        metrics.render()
    );
    // All dropped: nothing left, and the read's chunk still carries its position.
    let mut entries = vec![Entry::text(0, 7)];
    r.apply(&mut data, &mut entries, &mut meta, &streams, 0);
    assert!(entries.is_empty());
}

#[test]
fn limit_drops_or_holds_per_stream() {
    let src = source(
        r#"
[[sources.stages]]
type = "limit"
lines_per_second = 2
burst_lines = 2
action = "drop"
"#,
    )
    .unwrap();
    let out = dry_run(&src, Path::new("/var/log/app/a.log"), b"1\n2\n3\n4\n").unwrap();
    assert_eq!(lines(&out), ["1", "2"]);
    assert_eq!(dropped(&out[2]), "limit");

    let src = source(
        r#"
[[sources.stages]]
type = "limit"
lines_per_second = 10
burst_lines = 2
"#,
    )
    .unwrap();
    let (mut r, streams, _metrics) = runner(&src);
    let mut data = b"1\n2\n3\n4\n".to_vec();
    let mut entries: Vec<Entry> = (0..4).map(|i| Entry::text(2 * i, 2 * i + 1)).collect();
    let hold = r.apply(&mut data, &mut entries, &mut Vec::new(), &streams, 0);
    assert_eq!(entries.len(), 4, "holding drops nothing");
    // Two lines over the burst at 10 lines/s: about 0.2 s of debt.
    assert!(
        hold > Duration::from_millis(150) && hold <= Duration::from_millis(200),
        "{hold:?}"
    );
}

#[test]
fn config_errors_name_the_stage_and_the_reason() {
    let err = |stages: &str| source(stages).unwrap_err();
    let e = err(r#"
[[sources.stages]]
type = "labels"
fields = ["level"]
"#);
    assert!(
        e.contains("sources[0].stages[0].set.level") && e.contains("no earlier stage"),
        "{e}"
    );
    let e = err(r#"
[[sources.stages]]
type = "drop"
line = "("
"#);
    assert!(
        e.contains("sources[0].stages[0].line: invalid regex"),
        "{e}"
    );
    let e = err(r#"
[[sources.stages]]
type = "redact"
rules = [{ name = "x", regex = "[" }]
"#);
    assert!(e.contains("sources[0].stages[0].rules[0]"), "{e}");
    let e = err(r#"
[[sources.stages]]
type = "json"
fields = ["job"]
[[sources.stages]]
type = "labels"
fields = ["job"]
"#);
    assert!(e.contains("already set"), "{e}");
    let e = err(r#"
[[sources.stages]]
type = "tenant"
label = "job"
map = { app = "a" }
"#);
    assert!(e.contains("drop_unmapped"), "{e}");
    let e = err(r#"
[[sources.stages]]
type = "tenant"
label = "job"
map = { app = "a|b" }
default = "x"
"#);
    assert!(
        e.contains("sources[0].stages[0].map.app: invalid tenant"),
        "{e}"
    );
    let e = err(r#"
[[sources.stages]]
type = "template"
line = "{{ .msg | upper }}"
"#);
    assert!(e.contains("not a field reference"), "{e}");
    let e = err(r#"
[[sources.stages]]
type = "sparkle"
"#);
    assert!(
        e.contains("sources[0].stages[0]") && e.contains("sparkle"),
        "{e}"
    );
}

#[test]
fn a_stage_adds_no_allocation_per_line_on_its_no_match_path() {
    // The work buffers grow once and are reused: after a first pass, a second pass over the
    // same entries leaves every buffer's capacity unchanged.
    let src = source(
        r#"
[[sources.stages]]
type = "drop"
line = "DEBUG"
[[sources.stages]]
type = "json"
fields = ["level"]
[[sources.stages]]
type = "labels"
fields = ["level"]
[[sources.stages]]
type = "redact"
"#,
    )
    .unwrap();
    let (mut r, streams, _metrics) = runner(&src);
    let line = br#"{"level":"info","msg":"a quiet line"}"#;
    let mut data = Vec::new();
    let mut entries = Vec::new();
    for _ in 0..100 {
        let start = data.len();
        data.extend_from_slice(line);
        entries.push(Entry::text(start, data.len()));
        data.push(b'\n');
    }
    let mut d1 = data.clone();
    let mut e1 = entries.clone();
    r.apply(&mut d1, &mut e1, &mut Vec::new(), &streams, 0);
    let caps = (
        r.work.buf.capacity(),
        r.work.line.capacity(),
        r.work.scratch.capacity(),
    );
    let mut d2 = data.clone();
    let mut e2 = entries.clone();
    r.apply(&mut d2, &mut e2, &mut Vec::new(), &streams, 0);
    assert_eq!(
        caps,
        (
            r.work.buf.capacity(),
            r.work.line.capacity(),
            r.work.scratch.capacity()
        )
    );
    assert_eq!(d2.len(), data.len(), "nothing rewritten, nothing appended");
    assert_eq!(e2.len(), 100);
    assert!(Arc::ptr_eq(
        &r.routes()[e2[0].sub as usize],
        &r.routes()[e2[99].sub as usize]
    ));
}

#[test]
fn the_per_read_screen_finds_every_sample_among_many_lines() {
    // One read holding every sample among quiet lines: the screen of the whole read must
    // send each line with a secret to the rules, and only those.
    let mut input = String::new();
    for (i, (_, text, _)) in redact::SAMPLES.iter().enumerate() {
        input.push_str(&format!("quiet line {i} with nothing to hide\n"));
        input.push_str(&serde_json::to_string(text).unwrap());
        input.push('\n');
    }
    let out = run(
        r#"
[[sources.stages]]
type = "redact"
"#,
        &input,
    );
    let all = lines(&out).join("\n");
    for (name, _, secret) in redact::SAMPLES {
        assert!(!all.contains(secret), "{name} survived: {all}");
    }
    assert_eq!(
        lines(&out)
            .iter()
            .filter(|l| l.contains("<redacted:"))
            .count(),
        redact::SAMPLES.len()
    );
}

#[test]
fn a_short_secret_copied_out_of_its_line_is_scrubbed_too() {
    let out = run(
        r#"
[[sources.stages]]
type = "redact"
builtin = false
rules = [{ name = "pin", regex = 'pin=(?P<secret>\d{3})' }]
[[sources.stages]]
type = "logfmt"
fields = ["pin"]
[[sources.stages]]
type = "metadata"
fields = ["pin"]
"#,
        "user=a pin=123\n",
    );
    let (line, _, meta, _) = shipped(&out[0]);
    assert_eq!(line, "user=a pin=<redacted:pin>");
    assert_eq!(meta["pin"], "<redacted:pin>");
}

#[test]
fn stage_values_out_of_range_are_config_errors() {
    let e = source(
        r#"
[[sources.stages]]
type = "tenant"
label = "team"
map = { a = "t" }
default = "x"
[[sources.stages]]
type = "json"
fields = ["team"]
[[sources.stages]]
type = "labels"
fields = ["team"]
"#,
    )
    .unwrap_err();
    assert!(
        e.contains("stages[0].label") && e.contains("earlier stage"),
        "{e}"
    );
    let e = source("[[sources.stages]]\ntype = \"drop\"\nolder_than = \"300y\"\n").unwrap_err();
    assert!(e.contains("older_than: too large"), "{e}");
    let e = source("[[sources.stages]]\ntype = \"limit\"\nlines_per_second = 1e-20\n").unwrap_err();
    assert!(e.contains("at least 0.001"), "{e}");
}

#[test]
fn a_read_with_more_label_values_than_routes_keeps_every_entry_and_its_tenant() {
    let src = source(
        r#"
[[sources.stages]]
type = "logfmt"
fields = ["user", "ns"]
[[sources.stages]]
type = "labels"
fields = ["user"]
max_values = 100000
[[sources.stages]]
type = "tenant"
field = "ns"
map = { a = "team-a" }
drop_unmapped = true
"#,
    )
    .unwrap();
    let (mut r, streams, _metrics) = runner(&src);
    let n = MAX_ROUTES_PER_READ + 500;
    let mut data = Vec::new();
    let mut entries = Vec::new();
    for i in 0..n {
        let start = data.len();
        data.extend_from_slice(format!("ns=a user=u{i}").as_bytes());
        entries.push(Entry::text(start, data.len()));
        data.push(b'\n');
    }
    let mut meta = Vec::new();
    r.apply(&mut data, &mut entries, &mut meta, &streams, 0);
    assert_eq!(entries.len(), n, "nothing lost");
    let routes = r.routes();
    assert!(routes.len() <= MAX_ROUTES_PER_READ + 2);
    for e in &entries {
        assert_eq!(routes[e.sub as usize].tenant.as_deref(), Some("team-a"));
    }
    // The last entries kept their user as metadata instead of a label.
    let last = entries.last().unwrap();
    assert!(
        !routes[last.sub as usize]
            .label_pairs
            .iter()
            .any(|(k, _)| k == "user")
    );
    let m = meta[last.meta_start as usize];
    assert_eq!(
        &data[m.start as usize..m.end as usize],
        format!("u{}", n - 1).as_bytes()
    );
}
