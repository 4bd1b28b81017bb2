//! Soak harness: a release ztail ships a steady stream of lines for an hour while the file is
//! rotated by rename every 30 s (the oldest rotated file deleted) and the receiver (a process
//! of its own) goes down for 10 s every minute. Every 30 s it prints ztail's RSS, open file
//! descriptors, files open, lag, and lines written/received/duplicated; at the end it checks
//! that every line arrived.
//!
//!   cargo bench --bench soak -- [SECONDS] [LINES_PER_SECOND]
//!
//! Defaults: 3600 s at 1000 lines/s. Under `cargo test` (debug build) it runs 8 s only, to keep
//! the harness working. Not part of CI.

#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::io::{BufRead, Write};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::receiver::{cert_args, last_words, run_if_asked, spawn};
use common::{open_fds, profile, status_mib};
use support::ztail::{Env, Ztail, free_port};

fn main() {
    let args = common::args();
    if run_if_asked(&args) {
        return;
    }
    let debug = cfg!(debug_assertions);
    let secs: u64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(if debug { 8 } else { 3600 });
    let rate: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(drive(secs, rate, debug));
}

/// Lines seen by the receiver, across its restarts.
#[derive(Default)]
struct Seen {
    bits: Vec<bool>,
    distinct: u64,
    total: u64,
}

impl Seen {
    fn mark(&mut self, seq: usize) {
        if seq >= self.bits.len() {
            self.bits.resize(seq + 1, false);
        }
        self.total += 1;
        if !self.bits[seq] {
            self.bits[seq] = true;
            self.distinct += 1;
        }
    }
}

/// The receiver process, restarted on the same port after each outage; what it saw survives.
struct Receiver {
    certs: Vec<String>,
    port: u16,
    seen: Arc<Mutex<Seen>>,
    child: Option<Child>,
}

impl Receiver {
    fn start(&mut self) {
        let rx = spawn(&self.certs, true, self.port);
        let (seen, out) = (self.seen.clone(), rx.out);
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Some(words) = last_words(&line) {
                    let mut s = seen.lock().unwrap();
                    for n in words {
                        s.mark(n.parse().expect("a line number"));
                    }
                }
            }
        });
        self.child = Some(rx.child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sum of the samples of a metric family.
async fn metric_sum(zt: &Ztail, name: &str) -> f64 {
    let (_, body) = zt.get("/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One line of the table.
async fn report(zt: &Ztail, rx: &Receiver, written: &AtomicU64, started: Instant) {
    let (distinct, total) = {
        let s = rx.seen.lock().unwrap();
        (s.distinct, s.total)
    };
    let pid = zt.pid();
    let lag = metric_sum(zt, "ztail_checkpoint_lag_bytes").await;
    let files = metric_sum(zt, "ztail_files_open").await;
    println!(
        "{:>6} {:>9} {:>9} {:>5} {:>8.1} {:>4} {:>6} {:>8.0}",
        started.elapsed().as_secs(),
        written.load(Ordering::Relaxed),
        distinct,
        total - distinct,
        status_mib(pid, "VmRSS:"),
        open_fds(pid),
        files,
        lag / 1024.0
    );
}

async fn drive(secs: u64, rate: u64, debug: bool) {
    let env = Env::new();
    let port = free_port();
    let mut rx = Receiver {
        certs: cert_args(&env),
        port,
        seen: Arc::default(),
        child: None,
    };
    rx.start();
    let config = common::config(
        &env,
        &format!("https://127.0.0.1:{port}"),
        "",
        "",
        &[
            ("max_backoff = \"1s\"", "max_backoff = \"5s\""),
            ("logs/*.log", "logs/app.log*"),
            ("rotate_wait = \"1s\"", "rotate_wait = \"5s\""),
        ],
    );
    let zt = Ztail::start(&env, &config);

    // Writer: `rate` lines/s in 10 ms steps; rename rotation every 30 s, three rotated files kept.
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let dir = env.path("logs");
    let writer = {
        let (written, stop, dir) = (written.clone(), stop.clone(), dir.clone());
        std::thread::spawn(move || {
            let per_step = (rate / 100).max(1);
            let mut last_rotation = Instant::now();
            let mut step_at = Instant::now();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("app.log"))
                    .unwrap();
                let mut buf = String::new();
                for _ in 0..per_step {
                    buf.push_str(&format!(
                        "2026-11-26T06:00:00Z INFO [soak] steady line for the soak run {seq}\n"
                    ));
                    seq += 1;
                }
                f.write_all(buf.as_bytes()).unwrap();
                written.store(seq, Ordering::Relaxed);
                if last_rotation.elapsed() >= Duration::from_secs(30) {
                    let _ = std::fs::remove_file(dir.join("app.log.3"));
                    for n in (1..3).rev() {
                        let _ = std::fs::rename(
                            dir.join(format!("app.log.{n}")),
                            dir.join(format!("app.log.{}", n + 1)),
                        );
                    }
                    std::fs::rename(dir.join("app.log"), dir.join("app.log.1")).unwrap();
                    last_rotation = Instant::now();
                }
                step_at += Duration::from_millis(10);
                std::thread::sleep(step_at.saturating_duration_since(Instant::now()));
            }
        })
    };

    println!(
        "soak: {secs} s at {rate} lines/s, rotation every 30 s, receiver down 10 s every 60 s, {} ztail",
        profile()
    );
    println!("  t(s)   written  received  dups  RSS MiB  fds  files  lag KiB");
    let started = Instant::now();
    let mut next_report = Duration::from_secs(if debug { 2 } else { 30 });
    let mut next_flap = Duration::from_secs(if debug { 3 } else { 60 });
    let flap_for = Duration::from_secs(if debug { 2 } else { 10 });
    let mut down_since: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() >= next_report {
            report(&zt, &rx, &written, started).await;
            next_report += Duration::from_secs(if debug { 2 } else { 30 });
        }
        match down_since {
            None if started.elapsed() >= next_flap => {
                rx.stop();
                down_since = Some(Instant::now());
            }
            Some(t) if t.elapsed() >= flap_for => {
                rx.start();
                down_since = None;
                next_flap += Duration::from_secs(if debug { 3 } else { 60 });
            }
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    if down_since.is_some() {
        rx.start();
    }
    let total = written.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(180);
    while rx.seen.lock().unwrap().distinct < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report(&zt, &rx, &written, started).await;
    let distinct = rx.seen.lock().unwrap().distinct;
    rx.stop();
    println!(
        "  every line arrived: {}",
        if distinct == total { "yes" } else { "NO" }
    );
    assert_eq!(distinct, total, "lines lost");
}
