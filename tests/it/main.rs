//! ztail's integration tests: the real binary, real files, real sockets and real mutual TLS
//! against the in-test Loki receiver (`tests/support/receiver.rs`), which decodes both body
//! formats as Loki does and records the client certificate of every request.

#[path = "../support/mod.rs"]
mod support;

mod check;
mod convert;
mod convert_promtail;
mod delivery;
mod demo;
mod deploy;
mod e2e;
mod faults;
mod formats;
mod identity;
mod journal;
mod kubernetes;
mod pki_profile;
mod probes;
mod receiver_selftest;
mod reload;
mod security;
mod sink;
mod sinks;
mod spire;
mod stages;
mod workload_faults;

use std::collections::BTreeMap;
use std::time::Duration;

use support::receiver::{Receiver, RecordedEntry};

/// Generous timeout for conditions that normally hold within a second.
pub const WAIT: Duration = Duration::from_secs(60);

/// Lines per `filename` label, ordered by timestamp (Loki's order).
pub fn lines_by_file(entries: &[RecordedEntry]) -> BTreeMap<String, Vec<String>> {
    let mut sorted: Vec<&RecordedEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.timestamp_ns);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in sorted {
        let file = e.labels.get("filename").cloned().unwrap_or_default();
        out.entry(file).or_default().push(e.line.clone());
    }
    out
}

/// The expected lines `"{prefix} {n:08}"` for n in range.
pub fn expected(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("{prefix} {n:08}")).collect()
}

/// The lines of one file as the receiver has them, in Loki's (timestamp) order.
pub fn lines_of(rx: &Receiver, path: &std::path::Path) -> Vec<String> {
    lines_by_file(&rx.entries())
        .remove(&path.display().to_string())
        .unwrap_or_default()
}

/// Waits until `n` distinct lines are stored, gives would-be duplicates half a second to
/// arrive too, and asserts that `n` entries are stored: each line once. `log` is shown if they
/// never arrive. (Which lines they are is the caller's to check.)
pub async fn assert_once(rx: &Receiver, n: usize, log: impl Fn() -> String) {
    assert!(
        rx.wait_for_distinct_lines(n, WAIT).await,
        "{} of {n} lines arrived; log:\n{}",
        rx.distinct_entries().len(),
        log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.entries().len(), n, "lines sent twice");
}

/// Asserts that `lines` hold exactly the lines of `want`, each at least once (at-least-once
/// delivery); returns how many arrived twice or more.
#[track_caller]
pub fn assert_every_line(lines: &[String], want: &[String]) -> usize {
    let mut distinct = lines.to_vec();
    distinct.sort();
    distinct.dedup();
    let mut sorted_want = want.to_vec();
    sorted_want.sort();
    assert!(
        distinct == sorted_want,
        "{} distinct lines, {} expected; first missing: {:?}",
        distinct.len(),
        want.len(),
        sorted_want
            .iter()
            .find(|l| distinct.binary_search(l).is_err())
    );
    lines.len() - distinct.len()
}

/// Unix nanoseconds now.
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// A whole second about an hour ago: recent enough for Loki's age limit on any day the tests
/// run, old enough to tell a written timestamp from the read time.
pub fn an_hour_ago() -> i128 {
    let s = 1_000_000_000;
    (now_ns() - 3600 * s) / s * s
}

/// RFC 3339 with nanoseconds, UTC (`2026-11-26T03:15:00.000000001Z`).
pub fn rfc3339(ns: i128) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(ns as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}
