//! The journal source against a real systemd-journald (`tests/support/journald.rs`): entries
//! sent through journald's socket, read by the real binary from the files journald wrote,
//! judged at the receiver.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::journald::Journald;
use crate::support::receiver::{Receiver, RecordedEntry};
use crate::support::ztail::{Env, LOKI_ID, Ztail};
use crate::{WAIT, now_ns};

/// A journal source over `j`'s files; `extra` goes into its table.
fn journal_source(j: &Journald, start_at: &str, journal_extra: &str, stages: &str) -> String {
    format!(
        r#"
[[sources]]
name = "journal"
start_at = "{start_at}"
labels = {{ job = "journal" }}
{stages}
[sources.journal]
directories = ["{}"]
{journal_extra}
"#,
        j.dir.display()
    )
}

/// Waits until `n` entries arrived, then a while longer for any that should not come, and
/// returns them all in timestamp order.
async fn settled(rx: &Receiver, n: usize, zt: &Ztail) -> Vec<RecordedEntry> {
    assert!(
        rx.wait_for(|e| e.len() >= n, WAIT).await,
        "got {:?}\n{}",
        rx.entries().iter().map(|e| &e.line).collect::<Vec<_>>(),
        zt.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut entries = rx.entries();
    entries.sort_by_key(|e| e.timestamp_ns);
    entries
}

/// `journalctl -o json` of `j`'s entries, oldest first; `args` select.
fn journal_json(j: &Journald, args: &[&str]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("journalctl")
        .arg(format!("--namespace={}", j.namespace))
        .args(["-o", "json", "-q", "--no-pager"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_arrive_in_order_with_their_fields_time_and_matches() {
    let j = Journald::start("fields", "8M");
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let before = now_ns();
    // Written before ztail's first start: start_at = "beginning" reads them.
    j.log("app", 6, "first");
    j.log("app", 7, "debug is above the priority");
    j.log("other", 3, "another identifier");
    let stages = r#"
[[sources.stages]]
type = "labels"
fields = ["ident"]
[[sources.stages]]
type = "metadata"
fields = ["prio"]
[[sources.stages]]
type = "drop"
field = "prio"
value = "^2$"
reason = "critical_test"
"#;
    let config = env.config(
        &rx.url(),
        "",
        &journal_source(
            &j,
            "beginning",
            r#"identifiers = ["app"]
priority = "info"
fields = { ident = "SYSLOG_IDENTIFIER", prio = "PRIORITY" }"#,
            stages,
        ),
    );
    let mut zt = Ztail::start(&env, &config);
    // Written while it runs: a long message (journald compresses fields of 512 bytes and more),
    // a multi-line one, one with bytes that are not UTF-8 and a NUL, one a stage drops.
    let long = "x".repeat(3000) + " end";
    j.log("app", 4, &long);
    j.log("app", 5, "two\nlines");
    j.send(&[
        ("MESSAGE", b"bin\xffary\x00tail"),
        ("SYSLOG_IDENTIFIER", b"app"),
        ("PRIORITY", b"6"),
    ]);
    j.log("app", 2, "dropped by the stage");
    j.log("app", 6, "last");
    let want = [
        "first".to_owned(),
        long.clone(),
        "two\nlines".to_owned(),
        "bin\u{fffd}ary\u{0}tail".to_owned(),
        "last".to_owned(),
    ];
    let entries = settled(&rx, want.len(), &zt).await;
    let lines: Vec<&str> = entries.iter().map(|e| e.line.as_str()).collect();
    assert_eq!(lines, want.iter().map(String::as_str).collect::<Vec<_>>());
    for e in &entries {
        assert_eq!(e.labels.get("job").map(String::as_str), Some("journal"));
        assert_eq!(e.labels.get("ident").map(String::as_str), Some("app"));
        assert!(e.structured_metadata.contains_key("prio"), "{e:?}");
        // The journal's realtime clock, microseconds: when journald received it.
        assert!(e.timestamp_ns >= before / 1000 * 1000 && e.timestamp_ns <= now_ns());
        assert_eq!(e.timestamp_ns % 1000, 0);
    }
    assert_eq!(entries[1].structured_metadata["prio"], "4");
    let dropped = zt
        .metric("ztail_stage_dropped_total{source=\"journal\",reason=\"critical_test\"}")
        .await;
    assert_eq!(dropped, 1.0);

    // The cursor is checkpointed: a restart sends nothing again and resumes after it.
    zt.terminate(Duration::from_secs(10));
    let state = std::fs::read_to_string(env.path("state/checkpoints.jsonl")).unwrap();
    assert!(state.contains("\"journal\":\"journal\""), "{state}");
    j.log("app", 6, "after the restart");
    zt.restart();
    assert!(
        rx.wait_for(|e| e.len() > want.len(), WAIT).await,
        "{}",
        zt.log()
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let lines: Vec<String> = rx.entries().into_iter().map(|e| e.line).collect();
    assert_eq!(lines.len(), want.len() + 1, "{lines:?}");
    assert_eq!(lines.last().unwrap(), "after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_through_kills_rotations_and_a_journald_restart() {
    const TOTAL: usize = 100_000;
    const KILLS: usize = 20;
    let mut j = Journald::start("kills", "64M");
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let config = env.config(&rx.url(), "", &journal_source(&j, "end", "", ""));
    let mut zt = Ztail::start(&env, &config);
    zt.wait_up().await;
    // Started at the end of an empty journal: everything written from now on must arrive.
    let per_kill = TOTAL / KILLS;
    for k in 0..KILLS {
        for i in k * per_kill..(k + 1) * per_kill {
            j.log("load", 6, &format!("entry {i:06} {}", "p".repeat(150)));
        }
        if k == 6 || k == 13 {
            j.rotate();
        }
        if k == 10 {
            j.restart();
        }
        // Let it read some, then kill it mid-stream.
        tokio::time::sleep(Duration::from_millis(150 + 20 * (k as u64 % 5))).await;
        zt.kill();
        zt.restart();
    }
    j.wait_written(TOTAL);
    let indexes = |entries: &[crate::support::receiver::RecordedEntry]| -> BTreeSet<usize> {
        entries
            .iter()
            .filter_map(|e| e.line.strip_prefix("entry ")?.get(..6)?.parse().ok())
            .collect()
    };
    let done = rx
        .wait_for(
            |e| e.len() >= TOTAL && indexes(e).len() >= TOTAL,
            Duration::from_secs(180),
        )
        .await;
    let entries = rx.entries();
    let got = indexes(&entries);
    let missing: Vec<usize> = (0..TOTAL).filter(|i| !got.contains(i)).take(10).collect();
    assert!(
        done,
        "{} of {TOTAL} distinct entries arrived; first missing: {missing:?}\n{}",
        got.len(),
        zt.log()
    );
    assert!(got.iter().all(|&i| i < TOTAL));
    // Duplicates only from the kills: each re-sends what was unacknowledged (about 1,600 per
    // kill measured). Reading again from an older position, let alone the journal's start
    // (about 950,000 over these kills), goes far past this.
    let dups = entries.len() - TOTAL;
    assert!(dups <= TOTAL, "{dups} duplicates");
    let lost = zt
        .metric("ztail_journal_entries_lost_total{source=\"journal\"}")
        .await;
    assert_eq!(lost, 0.0);
    println!(
        "row journal-sigkill: {KILLS} kills, 2 rotations and a journald restart: {} entries received for {TOTAL} ({dups} duplicates), 0 lost",
        entries.len()
    );
}

/// The seqnums of a journald's entries, oldest first, with their messages (`journalctl`).
fn seqnums(j: &Journald) -> Vec<(u64, String)> {
    journal_json(j, &[])
        .into_iter()
        .map(|v| {
            let cursor = v["__CURSOR"].as_str().unwrap();
            let i = cursor
                .split(';')
                .find_map(|p| p.strip_prefix("i="))
                .unwrap();
            let message = v["MESSAGE"].as_str().unwrap_or_default().to_owned();
            (u64::from_str_radix(i, 16).unwrap(), message)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuumed_entries_are_counted_and_a_wiped_journal_is_read_from_its_oldest_entry() {
    let j = Journald::start("vacuum", "8M");
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let config = env.config(
        &rx.url(),
        "",
        &journal_source(&j, "beginning", "identifiers = [\"t\"]", ""),
    );
    let lines = |entries: Vec<RecordedEntry>| -> Vec<String> {
        entries.into_iter().map(|e| e.line).collect::<Vec<_>>()
    };
    let mut zt = Ztail::start(&env, &config);
    j.log("t", 6, "a");
    assert!(rx.wait_for(|e| !e.is_empty(), WAIT).await, "{}", zt.log());
    zt.terminate(Duration::from_secs(10));

    // While ztail is stopped: two rotations, then the older archived file is vacuumed.
    for i in 0..10 {
        j.log("t", 6, &format!("b{i}"));
    }
    j.rotate();
    j.log("t", 6, "c");
    j.rotate();
    j.log("t", 6, "d");
    let archived = j.archived();
    assert_eq!(archived.len(), 2, "{archived:?}");
    let a = seqnums(&j).iter().find(|(_, m)| m == "a").expect("a").0;
    let ok = std::process::Command::new("journalctl")
        .arg(format!("--namespace={}", j.namespace))
        .arg("--vacuum-files=1")
        .status()
        .unwrap()
        .success();
    assert!(ok && !archived[0].exists(), "journalctl --vacuum-files=1");
    // "a" was shipped; every entry after it and before the oldest left was never read.
    let oldest = seqnums(&j)[0].0;
    let vacuumed = oldest - a - 1;
    assert!(vacuumed >= 10, "the b entries were vacuumed");
    // Which archived files journalctl removes depends on their sizes: "c" may be gone too.
    let mut want = vec!["a".to_owned()];
    want.extend(
        seqnums(&j)
            .into_iter()
            .map(|(_, m)| m)
            .filter(|m| m == "c" || m == "d"),
    );
    assert_eq!(want.last().map(String::as_str), Some("d"));
    zt.restart();
    assert_eq!(lines(settled(&rx, want.len(), &zt).await), want);
    let lost = zt
        .metric("ztail_journal_entries_lost_total{source=\"journal\"}")
        .await;
    assert_eq!(lost, vacuumed as f64, "every vacuumed entry is counted");
    println!(
        "row journal-vacuum: {vacuumed} entries vacuumed while ztail was stopped, {vacuumed} counted lost; {}/{} of what was left arrived once",
        want.len(),
        want.len()
    );

    // The journal wiped: journald starts a new one (a new seqnum id). Its entries are read
    // from the oldest, not from the end, although the saved cursor is of the old journal.
    zt.terminate(Duration::from_secs(10));
    let dir = j.dir.clone();
    drop(j);
    assert!(!dir.exists());
    let j = Journald::start("vacuum", "8M");
    assert_eq!(j.dir, dir);
    j.log("t", 6, "e");
    zt.restart();
    want.push("e".to_owned());
    assert_eq!(lines(settled(&rx, want.len(), &zt).await), want);
}

/// Promtail's journal cursor (`cursor-<job>` in its positions file) taken over by `ztail convert
/// promtail-positions`: the source named after the job resumes strictly after it, although
/// `start_at = "end"` would skip everything on a first start without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promtail_journal_cursor_is_taken_over() {
    let j = Journald::start("cursor", "8M");
    let env = Env::new();
    for m in ["p1", "p2", "p3"] {
        j.log("app", 6, m);
    }
    let deadline = std::time::Instant::now() + WAIT;
    let written = loop {
        let v = journal_json(&j, &["-t", "app"]);
        if v.len() >= 3 {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "journald wrote {v:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(written[1]["MESSAGE"], "p2");
    let cursor = written[1]["__CURSOR"].as_str().unwrap().to_owned();
    // As Promtail writes it for `job_name: journal`.
    std::fs::write(
        env.path("positions.yaml"),
        format!("positions:\n  cursor-journal: \"{cursor}\"\n  cursor-docker: \"1700000000\"\n"),
    )
    .unwrap();
    let converted = std::process::Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["convert", "promtail-positions"])
        .arg(env.path("positions.yaml"))
        .arg("--state-dir")
        .arg(env.path("state"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&converted.stderr);
    assert!(converted.status.success(), "{said}");
    assert!(said.contains("imported 1 of 2 positions"), "{said}");
    assert!(
        said.contains(&format!(
            "the journal source \"journal\" resumes after {cursor}"
        )),
        "{said}"
    );
    assert!(
        said.contains("cursor-docker: a cursor that is not a journal's"),
        "{said}"
    );

    let rx = env.receiver(LOKI_ID).await;
    let config = env.config(
        &rx.url(),
        "",
        &journal_source(&j, "end", r#"identifiers = ["app"]"#, ""),
    );
    let zt = Ztail::start(&env, &config);
    j.log("app", 6, "p4");
    let entries = settled(&rx, 2, &zt).await;
    let lines: Vec<&str> = entries.iter().map(|e| e.line.as_str()).collect();
    assert_eq!(lines, ["p3", "p4"]);
}

/// A Promtail journal job converted by `ztail convert promtail` ships what Promtail would have:
/// its matches select, its relabelled journal fields become labels, a relabel `drop` drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converted_promtail_journal_job_ships_what_promtail_would() {
    let j = Journald::start("convert", "8M");
    let env = Env::new();
    let promtail = format!(
        r#"clients:
  - url: https://loki.example/loki/api/v1/push
scrape_configs:
  - job_name: node journal
    journal:
      path: {}
      max_age: 12h
      labels:
        job: systemd-journal
      matches: SYSLOG_IDENTIFIER=app SYSLOG_IDENTIFIER=web
    relabel_configs:
      - source_labels: ['__journal_syslog_identifier']
        target_label: ident
      - source_labels: ['__journal_priority_keyword']
        target_label: level
      - source_labels: ['__journal_priority']
        regex: '7'
        action: drop
      - source_labels: ['__journal_my_field']
        target_label: custom
"#,
        j.dir.display()
    );
    std::fs::write(env.path("promtail.yaml"), promtail).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["convert", "promtail"])
        .arg(env.path("promtail.yaml"))
        .arg("-o")
        .arg(env.path("converted.toml"))
        .args(["--peer-id", LOKI_ID])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("journal.max_age"), "{said}");
    assert!(said.contains("not Promtail's keyword"), "{said}");
    let converted = std::fs::read_to_string(env.path("converted.toml")).unwrap();
    // The converted sources, under the test's own identity and sink.
    let sources = &converted[converted.find("[[sources]]").expect("a source")..];

    j.log("app", 6, "a1");
    j.log("web", 3, "w1");
    j.log("other", 6, "not matched");
    j.log("app", 7, "dropped by the relabelling");
    j.send(&[
        ("MESSAGE", b"c1"),
        ("SYSLOG_IDENTIFIER", b"app"),
        ("PRIORITY", b"5"),
        ("MY_FIELD", b"x"),
    ]);
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", sources));
    let entries = settled(&rx, 3, &zt).await;
    // Every label (the test config adds no host label): nothing beyond what Promtail shipped.
    let got: Vec<(&str, Vec<(&str, &str)>)> = entries
        .iter()
        .map(|e| {
            let labels = e
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            (e.line.as_str(), labels)
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "a1",
                vec![("ident", "app"), ("job", "systemd-journal"), ("level", "6")]
            ),
            (
                "w1",
                vec![("ident", "web"), ("job", "systemd-journal"), ("level", "3")]
            ),
            (
                "c1",
                vec![
                    ("custom", "x"),
                    ("ident", "app"),
                    ("job", "systemd-journal"),
                    ("level", "5")
                ]
            ),
        ]
    );
}
