//! Shared by the benchmark harnesses: the counting receiver (a process of its own), ztail's
//! production settings, and figures read from `/proc`.

pub mod corpus;
pub mod receiver;

use support::ztail::Env;

use crate::support;

/// "release" or "debug": which build of ztail a figure is for.
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// The harness's arguments without the `--bench` cargo adds.
pub fn args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect()
}

/// [`Env::config`] with production intervals instead of the test suite's fast ones, then
/// `overrides` (each `(from, to)` must occur in the config, so a change to the test config
/// cannot silently turn into a benchmark with test settings).
pub fn config(
    env: &Env,
    url: &str,
    sink_extra: &str,
    source_extra: &str,
    overrides: &[(&str, &str)],
) -> String {
    let production = [
        ("level = \"info\"", "level = \"warn\""),
        ("batch_wait = \"100ms\"", "batch_wait = \"1s\""),
        ("rescan_interval = \"500ms\"", "rescan_interval = \"10s\""),
        (
            "checkpoint_interval = \"100ms\"",
            "checkpoint_interval = \"1s\"",
        ),
    ];
    let mut config = env.config(url, sink_extra, source_extra);
    for (from, to) in production.iter().chain(overrides) {
        assert!(
            config.contains(from),
            "the test config no longer has {from:?}"
        );
        config = config.replacen(from, to, 1);
    }
    config
}

/// User + system CPU seconds of a live process.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ
}

/// A `/proc/<pid>/status` figure in MiB (`VmRSS:`, `VmHWM:`).
pub fn status_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} for {pid}"));
    kib / 1024.0
}

/// Open file descriptors of a live process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"))
        .count()
}

/// Unix nanoseconds now.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
