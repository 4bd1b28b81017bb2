//! ztail's integration tests: the real binary, real files, real sockets and real mutual TLS
//! against the in-test Loki receiver (`tests/support/receiver.rs`), which decodes both body
//! formats as Loki does and records the client certificate of every request.

#[path = "../support/mod.rs"]
mod support;

mod check;
mod delivery;
mod demo;
mod deploy;
mod e2e;
mod faults;
mod formats;
mod identity;
mod pki_profile;
mod probes;
mod receiver_selftest;
mod security;
mod sink;
mod spire;
mod workload_faults;

use std::collections::BTreeMap;
use std::time::Duration;

use support::receiver::RecordedEntry;

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
