//! Journal harness: the same entries (about 200 bytes of `MESSAGE` each) shipped by a release
//! ztail from the files of a real systemd-journald (a journal source) and from one plain file (a
//! file source), alternated in the same run, to the counting receiver in its own process over
//! mutual TLS on loopback. Prints each run's ztail CPU per GiB of message bytes and the journal
//! runs against the file run before each; checks that every entry arrived exactly once (count
//! and digest).
//!
//!   cargo bench --bench journal -- [ENTRIES] [reader | journal-only]
//!
//! `reader` stops after timing ztail's journal reader alone (in this process); `journal-only`
//! runs the journal case once, for a profiler.
//!
//! Default 500,000 entries (about 100 MB). Needs root: it runs `systemd-journald` in a
//! namespace of its own. Under `cargo test` (debug build) it runs 2,000 entries, to keep the
//! harness working.

#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::receiver::{cert_args, digest, run_if_asked, spawn};
use common::{cpu_seconds, profile, status_mib};
use support::journald::Journald;
use support::ztail::{Env, Ztail};

/// The `i`th entry's message: about 200 bytes, distinct, with some variety.
fn message(i: usize) -> String {
    const WORDS: [&str; 8] = [
        "GET",
        "/api/v1/orders",
        "200",
        "user=4711",
        "latency_ms=12",
        "POST",
        "/login",
        "503",
    ];
    let mut s = format!("entry {i:08}");
    let mut k = i;
    while s.len() < 190 {
        s.push(' ');
        s.push_str(WORDS[k % WORDS.len()]);
        k = k / 3 + 7;
    }
    s
}

struct Run {
    cpu: f64,
    wall: f64,
    peak: f64,
}

fn main() {
    let args = common::args();
    if run_if_asked(&args) {
        return;
    }
    let n: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            2_000
        } else {
            500_000
        });
    let journald = Journald::start("bench", "128M");
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut sum = 0u64;
    for i in 0..n {
        let m = message(i);
        bytes += m.len() as u64;
        sum = sum.wrapping_add(digest(m.as_bytes()));
        journald.log("bench", 6, &m);
    }
    journald.wait_written(n);
    let files = journald.archived().len() + 1;
    println!(
        "{n} entries, {:.1} MB of MESSAGE, written through journald in {:.1} s ({files} journal file(s)); {} ztail",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        profile()
    );
    let gib = bytes as f64 / (1u64 << 30) as f64;
    // ztail's journal reader alone, in this process: the part of a journal run that reads the
    // journal's files, without the pipeline a file run has too.
    for _ in 0..2 {
        let (cpu, read) = read_alone(&journald);
        assert_eq!(read, n, "the reader alone found other entries");
        println!(
            "  reader alone: {:.2} s ({:.2} s per GiB of messages, {:.2} µs per entry)",
            cpu,
            cpu / gib,
            cpu * 1e6 / n as f64
        );
    }
    if args.iter().any(|a| a == "reader") {
        return;
    }
    let mut base: Option<f64> = None;
    // `journal-only`: the journal case once (for a profiler).
    let cases: &[&str] = if args.iter().any(|a| a == "journal-only") {
        &["journal"]
    } else {
        &["file", "journal", "file", "journal"]
    };
    for &case in cases {
        let run = drive(case, &journald, n, sum);
        let per_gib = run.cpu / gib;
        let against = match (case, base) {
            ("journal", Some(b)) => format!("{:>5.2}x the file run before it", per_gib / b),
            _ => String::new(),
        };
        if case == "file" {
            base = Some(per_gib);
        }
        println!(
            "  {case:<8} ztail CPU {:>6.2} s ({:>6.2} s per GiB of messages) {against}; wall {:>5.1} s, {:>7.0} entries/s, peak RSS {:.1} MiB",
            run.cpu,
            per_gib,
            run.wall,
            n as f64 / run.wall,
            run.peak
        );
    }
}

/// Reads every file of the bench's journal with ztail's reader, as the source does: returns the
/// CPU seconds a pass took and the entries with the bench's identifier.
fn read_alone(journald: &Journald) -> (f64, usize) {
    let mut files = journald.archived();
    files.push(journald.dir.join("system.journal"));
    let wanted = ["SYSLOG_IDENTIFIER".to_owned()];
    // Five passes: the CPU clock ticks in hundredths of a second.
    const PASSES: usize = 5;
    let before = cpu_seconds(std::process::id());
    let mut entry = ztail::journal::file::Entry::default();
    let mut n = 0;
    for _ in 0..PASSES {
        for path in &files {
            let mut f = ztail::journal::file::JournalFile::open(path, &wanted).unwrap();
            while f.next(&mut entry).unwrap() {
                if entry.field(0) == Some(b"bench") && entry.message().is_some() {
                    n += 1;
                }
            }
        }
    }
    (
        (cpu_seconds(std::process::id()) - before) / PASSES as f64,
        n / PASSES,
    )
}

fn drive(case: &str, journald: &Journald, n: usize, sum: u64) -> Run {
    let env = Env::new();
    let source = if case == "file" {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(env.path("logs/bench.log")).unwrap());
        for i in 0..n {
            writeln!(f, "{}", message(i)).unwrap();
        }
        f.flush().unwrap();
        String::new()
    } else {
        format!(
            "\n[[sources]]\nname = \"journal\"\nstart_at = \"beginning\"\nlabels = {{ job = \"journal\" }}\n[sources.journal]\ndirectories = [\"{}\"]\nidentifiers = [\"bench\"]\n",
            journald.dir.display()
        )
    };
    let common::receiver::Rx {
        child: mut rx,
        port,
        out,
    } = spawn(&cert_args(&env), false, 0);
    let (count, got_sum) = common::receiver::counts(out);
    let url = format!("https://127.0.0.1:{port}");
    let config = common::config(&env, &url, "max_in_flight = 4", &source, &[]);
    let started = Instant::now();
    let zt = Ztail::start(&env, &config);
    let deadline = started + Duration::from_secs(600);
    while count.load(Ordering::SeqCst) < n as u64 {
        assert!(
            Instant::now() < deadline,
            "{case}: only {} of {n} entries arrived; log:\n{}",
            count.load(Ordering::SeqCst),
            zt.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(zt.pid());
    let peak = status_mib(zt.pid(), "VmHWM:");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count.load(Ordering::SeqCst), n as u64, "{case}: duplicates");
    assert_eq!(
        got_sum.load(Ordering::SeqCst),
        sum,
        "{case}: other lines arrived"
    );
    let _ = rx.kill();
    let _ = rx.wait();
    Run { cpu, wall, peak }
}
