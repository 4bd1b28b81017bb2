//! What a line becomes: CRI and Docker framing, multiline groups, labels from paths,
//! timestamps and structured metadata, asserted at the receiver with real files.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use crate::support::receiver::RecordedEntry;
use crate::support::ztail::{Env, LOKI_ID, ZTAIL_ID, Ztail, append_text as append, checkpoints};
use crate::{WAIT, an_hour_ago, now_ns, rfc3339};

/// A CRI source over `logs/pods/<namespace>_<pod>_<uid>/<container>/N.log`; tests append keys.
const PODS: &str = r#"
[[sources]]
name = "pods"
include = ["logs/pods/*/*/*.log"]
start_at = "beginning"
format = "cri"
"#;

/// `ns` as a Java/Python logging time at UTC+01:00: `2026-11-26 04:15:00,250`.
fn local_time(ns: i128) -> String {
    let t = rfc3339(ns + 3_600_000_000_000);
    format!("{} {},{}", &t[..10], &t[11..19], &t[20..23])
}

/// A CRI record.
fn cri(ts: i128, stream: &str, tag: &str, msg: &str) -> String {
    format!("{} {stream} {tag} {msg}\n", rfc3339(ts))
}

/// A Docker json-file record.
fn docker(ts: i128, stream: &str, log: &str) -> String {
    let log = serde_json::to_string(log).unwrap();
    format!(
        "{{\"log\":{log},\"stream\":\"{stream}\",\"time\":\"{}\"}}\n",
        rfc3339(ts)
    )
}

fn find<'a>(entries: &'a [RecordedEntry], line: &str) -> &'a RecordedEntry {
    let found: Vec<_> = entries.iter().filter(|e| e.line == line).collect();
    assert_eq!(found.len(), 1, "{line:?} arrived {} times", found.len());
    found[0]
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_and_docker_files_ship_messages_with_their_time_labels_and_metadata() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let sources = PODS.to_owned()
        + r#"path_labels = '/pods/(?P<namespace>[^/_]+)_(?P<pod>[^/_]+)_[^/]+/(?P<container>[^/]+)/'
partial_line_timeout = "20s"
rotate_wait = "3s"
labels = { cluster = "c1" }

[[sources]]
name = "docker"
include = ["logs/containers/*/*-json.log"]
start_at = "beginning"
format = "docker"
stream_as = "metadata"
path_labels = '/containers/(?P<container_id>[0-9a-f]{12})'
metadata_fields = ["trace_id", "level"]
partial_line_timeout = "20s"
"#;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "provenance = true", &sources));
    let pod_dir = env.path("logs/pods/shop_web-7f9c_0a1b2c3d/nginx");
    let pod = pod_dir.join("0.log");
    let dock = env.path("logs/containers/4f2a9c1b7e3d0000/4f2a9c1b7e3d0000-json.log");
    let t = an_hour_ago();
    let s = 1_000_000_000i128;

    append(
        &pod,
        &(cri(t + 1, "stdout", "F", "hello from nginx") + &cri(t + s, "stderr", "F", "warning: x")),
    );
    append(
        &dock,
        &(docker(t + 1, "stdout", "GET /health 200\n")
            + &docker(
                t + 2 * s,
                "stderr",
                "{\"level\":\"error\",\"trace_id\":\"4bf92f\",\"msg\":\"db down\"}\n",
            )),
    );
    // Partial records, each in its own read (ztail has read up to the end before the next).
    append(&pod, &cri(t + 3 * s, "stdout", "P", "part one | "));
    append(&dock, &docker(t + 3 * s, "stdout", "a long line split "));
    zt.wait_read_to_end(&pod).await;
    zt.wait_read_to_end(&dock).await;
    append(&pod, &cri(t + 4 * s, "stdout", "P", "part two | "));
    zt.wait_read_to_end(&pod).await;
    append(&pod, &cri(t + 5 * s, "stdout", "F", "end"));
    append(&dock, &docker(t + 4 * s, "stdout", "by the runtime\n"));
    // A partial sequence across a rename rotation: the runtime finishes the record through its
    // open descriptor, then writes to the new file.
    append(&pod, &cri(t + 6 * s, "stdout", "P", "before rotation, "));
    zt.wait_read_to_end(&pod).await;
    let rotated = pod_dir.join("0.log.20261126-031506");
    fs::rename(&pod, &rotated).unwrap();
    append(&rotated, &cri(t + 7 * s, "stdout", "F", "after rotation"));
    append(&pod, &cri(t + 8 * s, "stdout", "F", "new file"));

    assert!(
        rx.wait_for(|e| e.len() >= 8, WAIT).await,
        "expected 8 entries, got {:?}",
        rx.entries().iter().map(|e| &e.line).collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entries = rx.entries();
    assert_eq!(entries.len(), 8, "fragments or duplicates: {entries:#?}");

    let pod_file = pod.display().to_string();
    let pod_labels = |stream: &str| {
        labels(&[
            ("cluster", "c1"),
            ("container", "nginx"),
            ("filename", &pod_file),
            ("namespace", "shop"),
            ("pod", "web-7f9c"),
            ("stream", stream),
        ])
    };
    for (line, ts, stream) in [
        ("hello from nginx", t + 1, "stdout"),
        ("warning: x", t + s, "stderr"),
        ("part one | part two | end", t + 3 * s, "stdout"),
        ("before rotation, after rotation", t + 6 * s, "stdout"),
        ("new file", t + 8 * s, "stdout"),
    ] {
        let e = find(&entries, line);
        assert_eq!(e.timestamp_ns, ts, "{line}: the runtime's timestamp");
        assert_eq!(e.labels, pod_labels(stream), "{line}");
        assert_eq!(
            e.structured_metadata,
            labels(&[("agent_spiffe_id", ZTAIL_ID)]),
            "{line}: provenance"
        );
    }

    let dock_file = dock.display().to_string();
    let dock_labels = labels(&[("container_id", "4f2a9c1b7e3d"), ("filename", &dock_file)]);
    let json_line = "{\"level\":\"error\",\"trace_id\":\"4bf92f\",\"msg\":\"db down\"}";
    for (line, ts, meta) in [
        ("GET /health 200", t + 1, vec![("stream", "stdout")]),
        (
            json_line,
            t + 2 * s,
            vec![
                ("stream", "stderr"),
                ("trace_id", "4bf92f"),
                ("level", "error"),
            ],
        ),
        (
            "a long line split by the runtime",
            t + 3 * s,
            vec![("stream", "stdout")],
        ),
    ] {
        let e = find(&entries, line);
        assert_eq!(e.timestamp_ns, ts, "{line}");
        assert_eq!(e.labels, dock_labels, "{line}");
        let mut want = labels(&meta);
        want.insert("agent_spiffe_id".into(), ZTAIL_ID.into());
        assert_eq!(e.structured_metadata, want, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_traces_arrive_as_one_entry_with_the_time_written_in_the_line() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    // Java and Python logs whose records start with a local time (UTC+01:00).
    let source = r#"
[sources.multiline]
start = '^\d{4}-\d{2}-\d{2} '
timeout = "1s"
[sources.timestamp]
regex = '^(?P<ts>\S+ \S+)'
format = "rfc3339"
zone = "+01:00"
"#;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", source));
    let java = env.path("logs/java.log");
    let python = env.path("logs/python.log");
    let base = an_hour_ago();
    let ms = 1_000_000i128;
    let java_trace = format!(
        "{} ERROR [main] c.e.Shop - order failed\n\
java.lang.IllegalStateException: stock below zero\n\
\tat com.example.Stock.take(Stock.java:42)\n\
\tat com.example.Shop.order(Shop.java:17)\n\
Caused by: java.sql.SQLException: deadlock\n\
\t... 2 more\n",
        local_time(base + 250 * ms)
    );
    let next_order = format!(
        "{} INFO [main] c.e.Shop - next order",
        local_time(base + 1000 * ms)
    );
    // Written in three pieces, so the group spans reads.
    let (a, rest) = java_trace.split_at(80);
    let (b, c) = rest.split_at(70);
    append(&java, a);
    zt.wait_read_to_end(&java).await;
    append(&java, b);
    zt.wait_read_to_end(&java).await;
    append(&java, c);
    append(&java, &format!("{next_order}\n"));
    let python_trace = format!(
        "{} ERROR worker crashed\n\
Traceback (most recent call last):\n  File \"worker.py\", line 9, in run\n    step()\n\
ValueError: bad input\n",
        local_time(base + 2500 * ms)
    );
    append(&python, &python_trace);
    append(&python, "no timestamp on this one\n");

    assert!(
        rx.wait_for(|e| e.len() >= 3, WAIT).await,
        "got {:?}",
        rx.entries().iter().map(|e| &e.line).collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let entries = rx.entries();
    assert_eq!(entries.len(), 3, "fragments: {entries:#?}");
    let e = find(&entries, java_trace.trim_end());
    assert_eq!(e.timestamp_ns, base + 250 * ms);
    let e = find(&entries, &next_order);
    assert_eq!(
        e.timestamp_ns,
        base + 1000 * ms,
        "the last group, flushed after the timeout"
    );
    // A group starts only at a start line, so the line without a timestamp continues the
    // Python record.
    let python_entry = format!("{}no timestamp on this one", python_trace);
    let e = find(&entries, &python_entry);
    assert_eq!(e.timestamp_ns, base + 2500 * ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_fall_back_to_read_time_and_future_ones_are_clamped() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let source = r#"max_future = "5m"
[sources.timestamp]
regex = 'ts=(\d+)'
format = "unix_millis"
"#;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", source));
    let log = env.path("logs/app.log");
    let before = now_ns();
    let past_ms = an_hour_ago() / 1_000_000 + 123;
    let future_ms = (before / 1_000_000) + 3_600_000;
    let written = format!("ts={past_ms} written");
    append(
        &log,
        &format!("{written}\nno time\nts={future_ms} from the future\n"),
    );
    assert!(rx.wait_for(|e| e.len() >= 3, WAIT).await);
    let after = now_ns();
    let entries = rx.entries();
    assert_eq!(find(&entries, &written).timestamp_ns, past_ms * 1_000_000);
    for line in [
        "no time".to_owned(),
        format!("ts={future_ms} from the future"),
    ] {
        let ts = find(&entries, &line).timestamp_ns;
        assert!(
            before <= ts && ts <= after,
            "{line}: read time expected, got {ts}"
        );
    }
    assert_eq!(zt.metric("ztail_timestamp_fallbacks_total").await, 1.0);
    assert_eq!(zt.metric("ztail_timestamps_clamped_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_inside_a_multiline_group_or_cri_partial_resends_the_whole_entry() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let sources = r#"
[sources.multiline]
start = '^START'
timeout = "60s"
"#
    .to_owned()
        + PODS
        + "partial_line_timeout = \"60s\"\n";
    let config = env.config(&rx.url(), "", &sources);
    let mut zt = Ztail::start(&env, &config);
    let app = env.path("logs/app.log");
    let pod = env.path("logs/pods/ns_pod_uid/c/0.log");
    let t = now_ns() - 60_000_000_000;

    append(
        &app,
        "START one\n  one continued\nSTART two\n  two, first half\n",
    );
    append(
        &pod,
        &(cri(t, "stdout", "F", "complete record") + &cri(t + 1, "stdout", "P", "half a line, ")),
    );
    assert!(
        rx.wait_for(
            |e| e.iter().any(|e| e.line == "START one\n  one continued")
                && e.iter().any(|e| e.line == "complete record"),
            WAIT
        )
        .await
    );
    // ztail has read everything, and committed only up to the unfinished entries.
    let app_group = "START one\n  one continued\n".len() as u64;
    let pod_partial = cri(t, "stdout", "F", "complete record").len() as u64;
    let app_size = fs::metadata(&app).unwrap().len();
    let pod_size = fs::metadata(&pod).unwrap().len();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let a = zt.offsets(&app).await;
        let p = zt.offsets(&pod).await;
        if a == Some((app_size, app_group)) && p == Some((pod_size, pod_partial)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "offsets never settled: app {a:?} (want ({app_size}, {app_group})), pod {p:?} (want ({pod_size}, {pod_partial}))"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and persisted exactly that: the restart resumes at the start of each entry.
    let want = [
        (app.display().to_string(), app_group),
        (pod.display().to_string(), pod_partial),
    ];
    while !want
        .iter()
        .all(|w| checkpoints(&env.path("state")).contains(w))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "checkpoints {:?}, want {want:?}",
            checkpoints(&env.path("state"))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    zt.kill();

    append(&app, "  two, second half\nSTART three\n");
    append(&pod, &cri(t + 2, "stdout", "F", "and its end"));
    zt.restart();
    assert!(
        rx.wait_for(|e| e.len() >= 4, WAIT).await,
        "got {:?}",
        rx.entries().iter().map(|e| &e.line).collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let entries = rx.entries();
    // "START three" may still grow: it waits for its timeout. No fragment ever arrives.
    let mut sorted: Vec<&str> = entries.iter().map(|e| e.line.as_str()).collect();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "START one\n  one continued",
            "START two\n  two, first half\n  two, second half",
            "complete record",
            "half a line, and its end",
        ],
        "whole entries, each once"
    );
    assert_eq!(
        find(&entries, "half a line, and its end").timestamp_ns,
        t + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_hour_old_backlog_keeps_its_original_timestamps() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", PODS));
    let pod = env.path("logs/pods/ns_pod_uid/c/0.log");
    // The test plays two hours in the past rather than waiting two hours: every record
    // carries the time it was written.
    let start = now_ns() - 2 * 3_600_000_000_000;
    append(
        &pod,
        &cri(start - 1_000_000_000, "stdout", "F", "before the outage"),
    );
    assert!(rx.wait_for(|e| e.len() == 1, WAIT).await);

    // Loki goes away for two hours; the application keeps logging.
    rx.stop().await;
    let mut text = String::new();
    let n = 2_000;
    for i in 0..n {
        // One record every 3.6 s across two hours.
        text.push_str(&cri(
            start + i as i128 * 3_600_000_000,
            "stdout",
            "F",
            &format!("backlog {i:05}"),
        ));
    }
    append(&pod, &text);
    let deadline = std::time::Instant::now() + WAIT;
    while zt.get("/readyz").await.0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outage is not visible"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rx.restart().await;
    assert!(
        rx.wait_for(|e| e.len() > n, WAIT).await,
        "only {} entries after the outage",
        rx.entries().len()
    );
    let entries = rx.entries();
    assert_eq!(entries.len(), n + 1);
    // Each entry has the time it was written, and the stream arrives in time order, so Loki's
    // out-of-order window (1 h behind the newest entry) never rejects any of it.
    let mut newest = 0;
    for e in &entries {
        assert!(
            e.timestamp_ns >= newest - 3_600_000_000_000,
            "{} is out of order",
            e.line
        );
        newest = newest.max(e.timestamp_ns);
    }
    let backlog: Vec<&RecordedEntry> = entries
        .iter()
        .filter(|e| e.line.starts_with("backlog "))
        .collect();
    for (i, e) in backlog.iter().enumerate() {
        assert_eq!(e.line, format!("backlog {i:05}"), "order of arrival");
        assert_eq!(
            e.timestamp_ns,
            start + i as i128 * 3_600_000_000,
            "{}",
            e.line
        );
    }
}
