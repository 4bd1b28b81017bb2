//! Throughput harness: ships a deterministic corpus from disk with a release ztail to a counting
//! Loki receiver in its own process over mutual TLS on loopback, and prints wall time, lines/s,
//! MB/s, ztail's CPU seconds (user+sys) and CPU s per GiB, ztail's peak RSS and the receiver's
//! CPU. It checks that every line arrived exactly once (count and an order-independent digest).
//! The baseline, measured in the same run, is the inherent floor: snappy-compressing the corpus
//! in 1 MiB blocks in one thread.
//!
//!   cargo bench --bench throughput -- [MB] [mixed|short|many|cri|cri-vs-raw|sinks][-100ms]
//!   cargo bench --bench throughput -- [SECONDS] latency|latency-100ms|latency-sinks
//!
//! `latency` writes 20,000 lines/s for SECONDS, each carrying its write time, and prints the
//! p50/p99/max from write to receipt with the default 1 s batch wait (`latency-100ms`: 100 ms).
//! `latency-sinks` (SECONDS default 90) runs it three times: one sink; two sinks with the
//! second one's Loki down for the first 60 s; two with it answering each request after 1 s.
//! It prints the first sink's p99 against the one-sink run, and checks that the second sink
//! got every line once and how long it took to catch up.
//!
//! `cri` writes the mixed corpus as Kubernetes CRI records (`<time> stdout F <line>`) and ships
//! it with `format = "cri"`; `cri-vs-raw` runs `mixed` and `cri` back to back and prints the
//! ratio of their CPU per GiB. A `-100ms` suffix (`mixed-100ms`) ships with a 100 ms batch wait
//! instead of the default 1 s. A `-2sinks` suffix (`mixed-2sinks`) ships every line to two
//! sinks, each with its own receiver; `sinks` alternates `mixed` and `mixed-2sinks` twice and
//! prints the CPU per GiB of each and per sink.
//!
//! `stages-<name>` ships the mixed corpus through a pipeline of processing stages: `all` (the
//! realistic one: drop lines by regex, parse the JSON lines and make `level` a label, every
//! built-in redaction detector, a tenant map over a JSON field), or one of its parts alone
//! (`drop`, `json`, `redact`, `tenant`). `stages` runs `mixed` and every `stages-*` case in
//! turn, `stages-pairs` alternates `mixed` and `stages-all` three times, and both print each
//! case's CPU per GiB of input against `mixed` measured in the same run.
//!
//! An `-uncompressed` suffix (`mixed-uncompressed`) ships with `compression = "none"`: snappy's
//! format with nothing compressed. `compression` alternates `mixed` and `mixed-uncompressed`
//! three times and prints the CPU per GiB and throughput of each against the `mixed` run
//! before it.
//!
//! Under `cargo test` (debug build) it runs a 2 MB corpus only, to keep the harness working.

#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::corpus::line;
use common::receiver::{cert_args, digest, last_words, run_if_asked, spawn};
use common::{cpu_seconds, profile, status_mib, unix_nanos};
use support::ztail::{Env, Ztail};

fn main() {
    let args = common::args();
    if run_if_asked(&args) {
        return;
    }
    // `[NUMBER] [CASE]` in either order; NUMBER is MB, or seconds for the latency cases.
    let number: Option<usize> = args.iter().find_map(|a| a.parse().ok());
    let case = args
        .iter()
        .find(|a| a.parse::<usize>().is_err())
        .cloned()
        .unwrap_or_else(|| "mixed".into());
    let mb = number.unwrap_or(if cfg!(debug_assertions) { 2 } else { 200 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(wait) = case.strip_prefix("latency") {
        // `latency` (1 s batch wait), `latency-100ms` or `latency-sinks`.
        let wait = wait.strip_prefix('-').unwrap_or("1s");
        let secs = if cfg!(debug_assertions) {
            2
        } else {
            number.unwrap_or(20) as u64
        };
        match wait {
            // One sink, then two with the second down for a while, then two with it slow: the
            // first sink's p99 against the one-sink run.
            "sinks" => {
                let (secs, down) = match cfg!(debug_assertions) {
                    true => (3, 1),
                    false => (number.unwrap_or(90) as u64, 60),
                };
                let one = rt.block_on(latency(secs, 20_000, "1s", Second::None));
                let down = rt.block_on(latency(secs, 20_000, "1s", Second::Down(down)));
                let slow = rt.block_on(latency(secs, 20_000, "1s", Second::Slow(1000)));
                println!("sink a's p99 against one sink: {one:.1} ms");
                println!("  sink b down        {down:>8.1} ms  {:>5.2}x", down / one);
                println!("  sink b slow        {slow:>8.1} ms  {:>5.2}x", slow / one);
            }
            wait => {
                rt.block_on(latency(secs, 20_000, wait, Second::None));
            }
        }
    } else if case == "stages" || case == "stages-pairs" {
        let cases: Vec<&str> = if case == "stages" {
            vec![
                "mixed",
                "stages-drop",
                "stages-json",
                "stages-redact",
                "stages-tenant",
                "stages-all",
            ]
        } else {
            ["mixed", "stages-all"].repeat(3)
        };
        let runs: Vec<(&str, Run)> = cases
            .iter()
            .map(|c| (*c, rt.block_on(drive(mb, c))))
            .collect();
        println!("CPU per GiB of input against the no-stage run before it:");
        let mut base = None;
        for (name, run) in &runs {
            if *name == "mixed" {
                base = Some(run.per_file_gib());
            }
            let b = base.unwrap_or(run.per_file_gib());
            println!(
                "  {name:<14} {:>6.2} s per GiB  {:>5.2}x  (+{:.2} s per GiB)",
                run.per_file_gib(),
                run.per_file_gib() / b,
                run.per_file_gib() - b
            );
        }
    } else if case == "compression" {
        println!("CPU per GiB and MB/s over the wall against the snappy run before it:");
        let mut base: Option<Run> = None;
        for c in ["mixed", "mixed-uncompressed"].repeat(3) {
            let run = rt.block_on(drive(mb, c));
            let b = base.as_ref().unwrap_or(&run);
            println!(
                "  {c:<20} {:>6.2} s per GiB {:>5.2}x   {:>6.1} MB/s {:>5.2}x",
                run.per_file_gib(),
                run.per_file_gib() / b.per_file_gib(),
                run.mb_per_s,
                run.mb_per_s / b.mb_per_s
            );
            if c == "mixed" {
                base = Some(run);
            }
        }
    } else if case == "sinks" {
        // The cost of a second sink: CPU per GiB of input, one sink against two, twice over.
        println!("CPU per GiB of input, two sinks against the one-sink run before it:");
        for _ in 0..2 {
            let one = rt.block_on(drive(mb, "mixed"));
            let two = rt.block_on(drive(mb, "mixed-2sinks"));
            println!(
                "  one sink {:>6.2} s per GiB; two sinks {:>6.2} s per GiB = {:.2}x, {:.2} s per GiB per sink",
                one.per_file_gib(),
                two.per_file_gib(),
                two.per_file_gib() / one.per_file_gib(),
                two.per_file_gib() / 2.0
            );
        }
    } else if case == "cri-vs-raw" {
        let raw = rt.block_on(drive(mb, "mixed"));
        let cri = rt.block_on(drive(mb, "cri"));
        println!(
            "cri / raw ztail CPU per GiB: {:.2}x of file bytes, {:.2}x of message bytes",
            cri.per_file_gib() / raw.per_file_gib(),
            cri.per_message_gib() / raw.per_message_gib()
        );
    } else {
        rt.block_on(drive(mb, &case));
    }
}

/// What one run measured.
struct Run {
    cpu: f64,
    /// Over the wall, start-up included.
    mb_per_s: f64,
    file_bytes: u64,
    message_bytes: u64,
}

impl Run {
    fn per_file_gib(&self) -> f64 {
        self.cpu / (self.file_bytes as f64 / (1u64 << 30) as f64)
    }
    fn per_message_gib(&self) -> f64 {
        self.cpu / (self.message_bytes as f64 / (1u64 << 30) as f64)
    }
}

struct Corpus {
    lines: u64,
    bytes: u64,
    /// Bytes of the lines themselves (without CRI framing and newlines).
    message_bytes: u64,
    digest: u64,
}

/// The pipelines of the `stages-*` cases.
fn stages(case: &str) -> Option<String> {
    let part = |name: &str| -> &'static str {
        match name {
            "drop" => {
                "[[sources.stages]]\ntype = \"drop\"\nline = 'DEBUG|level=warn'\nreason = \"noise\"\n"
            }
            "json" => {
                "[[sources.stages]]\ntype = \"json\"\nfields = [\"level\", \"logger\"]\n[[sources.stages]]\ntype = \"labels\"\nfields = [\"level\"]\n"
            }
            "redact" => "[[sources.stages]]\ntype = \"redact\"\n",
            "tenant" => {
                "[[sources.stages]]\ntype = \"json\"\nfields = [\"logger\"]\n[[sources.stages]]\ntype = \"tenant\"\nfield = \"logger\"\nmap = { http = \"team-http\", db = \"team-db\", payments = \"team-pay\" }\ndefault = \"shared\"\n"
            }
            _ => panic!("unknown stages case {name:?}"),
        }
    };
    let name = case.strip_prefix("stages-")?;
    Some(match name {
        "all" => {
            let tenant = part("tenant").replace(
                "[[sources.stages]]\ntype = \"json\"\nfields = [\"logger\"]\n",
                "",
            );
            format!(
                "{}{}{}{}",
                part("drop"),
                part("json"),
                tenant,
                part("redact")
            )
        }
        other => part(other).to_owned(),
    })
}

/// Whether the `stages-*` case's pipeline drops this line.
fn dropped_by(case: &str, line: &str) -> bool {
    matches!(case, "stages-all" | "stages-drop")
        && (line.contains("DEBUG") || line.contains("level=warn"))
}

fn write_corpus(dir: &std::path::Path, mb: usize, case: &str) -> Corpus {
    let mut rng = fastrand::Rng::with_seed(7);
    let files = if case == "many" { 1000 } else { 1 };
    let target = (mb as u64) << 20;
    let per_file = target / files;
    let (mut lines, mut bytes, mut sum, mut message_bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut n_written = 0u64;
    for f in 0..files {
        let path = dir.join(format!("app-{f:04}.log"));
        let mut w =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
        let mut written = 0;
        while written < per_file {
            let l = line(&mut rng, n_written, case == "short");
            if case == "cri" {
                let n = n_written;
                let prefix = format!(
                    "2026-11-26T06:{:02}:{:02}.{:09}Z stdout F ",
                    (n / 60_000) % 60,
                    (n / 1000) % 60,
                    n % 1_000_000_000
                );
                w.write_all(prefix.as_bytes()).unwrap();
                written += prefix.len() as u64;
            }
            w.write_all(l.as_bytes()).unwrap();
            w.write_all(b"\n").unwrap();
            written += l.len() as u64 + 1;
            message_bytes += l.len() as u64;
            // `n` numbers every line written; the receiver sees only those kept.
            n_written += 1;
            if !dropped_by(case, &l) {
                sum = sum.wrapping_add(digest(l.as_bytes()));
                lines += 1;
            }
        }
        w.flush().unwrap();
        bytes += written;
    }
    Corpus {
        lines,
        bytes,
        message_bytes,
        digest: sum,
    }
}

/// The inherent floor: snappy over the corpus in 1 MiB blocks, one thread (wall time of a
/// CPU-bound loop, finer than the 10 ms ticks of /proc CPU times). The files are read before
/// the clock starts.
fn floor_seconds(dir: &std::path::Path) -> f64 {
    let data: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    let start = Instant::now();
    let mut enc = snap::raw::Encoder::new();
    for block in data.iter().flat_map(|d| d.chunks(1 << 20)) {
        std::hint::black_box(enc.compress_vec(block).unwrap());
    }
    start.elapsed().as_secs_f64()
}

async fn drive(mb: usize, case: &str) -> Run {
    let (case, batch_wait) = match case.strip_suffix("-100ms") {
        Some(case) => (case, "100ms"),
        None => (case, "1s"),
    };
    let (case, compression) = match case.strip_suffix("-uncompressed") {
        Some(case) => (case, "none"),
        None => (case, "snappy"),
    };
    let (case, sinks) = match case.strip_suffix("-2sinks") {
        Some(case) => (case, 2),
        None => (case, 1),
    };
    let env = Env::new();
    let logs = env.path("logs");
    let corpus = write_corpus(&logs, mb, case);
    let floor = floor_seconds(&logs);

    // The receiver runs in its own process, so its CPU is not ztail's.
    let common::receiver::Rx {
        child: mut rx,
        port,
        out,
    } = spawn(&cert_args(&env), false, 0);
    let rx_pid = rx.id();
    let count = Arc::new(AtomicU64::new(0));
    let sum = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    // When the first lines, 5 % and 95 % of them had arrived: start-up, and the steady rate
    // without start-up and the last batch.
    let marks = Arc::new(std::sync::Mutex::new([None::<Instant>; 3]));
    let (c, s, m, r) = (count.clone(), sum.clone(), marks.clone(), requests.clone());
    let (low, high) = (corpus.lines / 20, corpus.lines * 19 / 20);
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if let Some(rest) = l.strip_prefix("COUNT ") {
                // The receiver prints one COUNT line per request.
                r.fetch_add(1, Ordering::SeqCst);
                let mut it = rest.split_whitespace();
                let n: u64 = it.next().unwrap().parse().unwrap();
                c.store(n, Ordering::SeqCst);
                s.store(it.nth(1).unwrap().parse().unwrap(), Ordering::SeqCst);
                let mut marks = m.lock().unwrap();
                for (mark, at) in marks.iter_mut().zip([1, low, high]) {
                    if n >= at && mark.is_none() {
                        *mark = Some(Instant::now());
                    }
                }
            }
        }
    });

    // `-2sinks`: a second sink, with its own receiver, gets every line too.
    let second = (sinks == 2).then(|| {
        let rx = spawn(&cert_args(&env), false, 0);
        let (count, sum) = common::receiver::counts(rx.out);
        (rx.child, rx.port, count, sum)
    });

    let pipeline = stages(case);
    let source = if case == "cri" {
        "format = \"cri\""
    } else {
        pipeline.as_deref().unwrap_or("")
    };
    let url = format!("https://127.0.0.1:{port}");
    let wait = format!("batch_wait = \"{batch_wait}\"");
    let limits = format!("max_in_flight = 4\ncompression = \"{compression}\"");
    let mut config = common::config(
        &env,
        &url,
        &limits,
        source,
        &[("batch_wait = \"1s\"", &wait)],
    );
    if let Some((_, port_b, ..)) = &second {
        config = config
            .replace("[sink]\n", "[[sinks]]\nname = \"a\"\n")
            .replace("[sink.peer]", "[sinks.peer]")
            + &format!(
                "[[sinks]]\nname = \"b\"\nurl = \"https://127.0.0.1:{port_b}/loki/api/v1/push\"\n{wait}\n{limits}\n[sinks.peer]\nallowed_ids = [\"{}\"]\n",
                support::ztail::LOKI_ID
            );
    }
    let rx_cpu0 = cpu_seconds(rx_pid);
    let started = Instant::now();
    let zt = Ztail::start(&env, &config);
    let deadline = started + Duration::from_secs(600);
    let done_b = || {
        second
            .as_ref()
            .is_none_or(|(_, _, c, _)| c.load(Ordering::SeqCst) >= corpus.lines)
    };
    while count.load(Ordering::SeqCst) < corpus.lines || !done_b() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} lines arrived; log:\n{}",
            count.load(Ordering::SeqCst),
            corpus.lines,
            zt.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall = started.elapsed().as_secs_f64();
    let zt_cpu = cpu_seconds(zt.pid());
    let zt_peak = status_mib(zt.pid(), "VmHWM:");
    let rx_cpu = cpu_seconds(rx_pid) - rx_cpu0;
    // Idle once everything is acknowledged and checkpointed (for `many`: 1,000 files watched),
    // and ztail's allocator trim (every 5 s) has run.
    std::thread::sleep(Duration::from_secs(6));
    let zt_idle = status_mib(zt.pid(), "VmRSS:");
    let zt_idle_anon = status_mib(zt.pid(), "RssAnon:");
    let exact =
        count.load(Ordering::SeqCst) == corpus.lines && sum.load(Ordering::SeqCst) == corpus.digest;
    let exact = exact
        && second.into_iter().all(|(mut child, _, c, s)| {
            let _ = child.kill();
            let _ = child.wait();
            c.load(Ordering::SeqCst) == corpus.lines && s.load(Ordering::SeqCst) == corpus.digest
        });
    let _ = rx.kill();
    let _ = rx.wait();
    let marks = *marks.lock().unwrap();
    let steady = match marks {
        [_, Some(a), Some(b)] if b > a => Some(b.duration_since(a).as_secs_f64()),
        _ => None,
    };
    let startup = marks[0].map(|t| t.duration_since(started).as_secs_f64());

    let gib = corpus.bytes as f64 / (1u64 << 30) as f64;
    let mbs = corpus.bytes as f64 / 1e6;
    println!(
        "throughput, case {case}: {} lines, {:.1} MB, {} file(s), {} ztail, protobuf with compression {compression} over mTLS to {sinks} sink(s), loopback, batch_wait {batch_wait}",
        corpus.lines,
        mbs,
        if case == "many" { 1000 } else { 1 },
        profile()
    );
    println!("  wall (with start-up)    {:>7.2} s", wall);
    if let Some(t) = startup {
        println!("  first lines received after {:>7.2} s", t);
    }
    println!(
        "  lines/s over the wall {:>8.0}",
        corpus.lines as f64 / wall
    );
    println!("  MB/s over the wall  {:>10.1}", mbs / wall);
    let requests = requests.load(Ordering::SeqCst);
    println!(
        "  push requests       {:>10} ({:.2} MB of lines each)",
        requests,
        mbs / requests.max(1) as f64
    );
    if let Some(t) = steady {
        println!("  MB/s steady (5-95 %) {:>9.1}", 0.9 * mbs / t);
        println!(
            "  lines/s steady      {:>10.0}",
            0.9 * corpus.lines as f64 / t
        );
    }
    println!(
        "  ztail CPU           {:>10.2} s   ({:.2} s per GiB)",
        zt_cpu,
        zt_cpu / gib
    );
    println!("  ztail peak RSS      {:>10.1} MiB", zt_peak);
    println!(
        "  ztail RSS idle after {:>9.1} MiB ({:.1} MiB heap and stacks, the rest mapped files)",
        zt_idle, zt_idle_anon
    );
    println!("  receiver CPU        {:>10.2} s", rx_cpu);
    if compression == "snappy" {
        println!(
            "  floor (snappy only) {:>10.2} s per GiB; ztail / floor = {:.1}x",
            floor / gib,
            zt_cpu / floor.max(1e-9)
        );
    } else {
        println!(
            "  floor (snappy only) {:>10.2} s per GiB (not ztail's floor here: nothing is compressed)",
            floor / gib
        );
    }
    println!(
        "  exactly once        {:>10}",
        if exact { "yes" } else { "NO" }
    );
    assert!(exact, "lines lost or duplicated");
    Run {
        cpu: zt_cpu,
        mb_per_s: mbs / wall,
        file_bytes: corpus.bytes,
        message_bytes: corpus.message_bytes,
    }
}

/// What the latency mode's second sink does, if there is one.
#[derive(Clone, Copy, Debug)]
enum Second {
    /// One sink only.
    None,
    /// A second sink whose Loki is down for the first this many seconds.
    Down(u64),
    /// A second sink whose Loki waits this many milliseconds before each answer.
    Slow(u64),
}

/// Lines received by one receiver: (seq, latency in ns) of each, filled by a thread.
type Seqs = Arc<std::sync::Mutex<(Vec<u64>, Vec<u64>)>>;

/// Reads a receiver's `SEQ` lines into a [`Seqs`], timing each line on arrival.
fn collect(out: std::io::BufReader<std::process::ChildStdout>) -> Seqs {
    let received: Seqs = Arc::default();
    collect_into(out, received.clone());
    received
}

/// [`collect`] into `sink`.
fn collect_into(out: std::io::BufReader<std::process::ChildStdout>, sink: Seqs) {
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if let Some(words) = last_words(&l) {
                let now = unix_nanos();
                let mut r = sink.lock().unwrap();
                for w in words {
                    let (seq, ns) = w.split_once(':').expect("seq:ns");
                    r.0.push(seq.parse().unwrap());
                    r.1.push(now.saturating_sub(ns.parse().unwrap()));
                }
            }
        }
    });
}

/// Sorted latencies of `received` in ms at p50, p99 and the max, after checking that every
/// seq below `written` arrived exactly once.
fn percentiles(received: &Seqs, written: usize, who: &str) -> [f64; 3] {
    let (mut seqs, mut v) = received.lock().unwrap().clone();
    seqs.sort_unstable();
    assert!(
        seqs.iter().copied().eq(0..written as u64),
        "{who}: every line exactly once: {} received for {written} written",
        seqs.len()
    );
    v.sort_unstable();
    // Nearest rank.
    let pct = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1e6;
    [pct(0.50), pct(0.99), pct(1.0)]
}

/// The latency mode: a fixed write rate, every line ending in `<seq>:<write time in ns>`,
/// measured when the receiver's decode of it reaches this process; every seq must arrive once
/// (at every sink). Returns the first sink's p99 in ms.
async fn latency(secs: u64, rate: u64, batch_wait: &str, second: Second) -> f64 {
    let env = Env::new();
    let certs = cert_args(&env);
    let common::receiver::Rx {
        child: mut rx,
        port,
        out,
    } = spawn(&certs, true, 0);
    let received = collect(out);
    let url = format!("https://127.0.0.1:{port}");
    let wait = format!("batch_wait = \"{batch_wait}\"");
    let mut config = common::config(&env, &url, "", "", &[("batch_wait = \"1s\"", &wait)]);
    // The second sink's receiver: started at once (slow) or after its outage (down).
    // Its lines are read as they come, so that a full pipe never slows it.
    let port_b = support::ztail::free_port();
    let received_b: Seqs = Arc::default();
    let start_b = |delay: u64, ms: u64| {
        let (certs, seqs) = (certs.clone(), received_b.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(delay));
            let rx = common::receiver::spawn_slow(&certs, true, port_b, ms);
            collect_into(rx.out, seqs);
            rx.child
        })
    };
    let b = match second {
        Second::None => None,
        Second::Down(down) => Some(start_b(down, 0)),
        Second::Slow(ms) => Some(start_b(0, ms)),
    };
    if b.is_some() {
        config = config
            .replace("[sink]\n", "[[sinks]]\nname = \"a\"\n")
            .replace("[sink.peer]", "[sinks.peer]")
            + &format!(
                "[[sinks]]\nname = \"b\"\nurl = \"https://127.0.0.1:{port_b}/loki/api/v1/push\"\n{wait}\nmin_backoff = \"50ms\"\nmax_backoff = \"1s\"\n[sinks.peer]\nallowed_ids = [\"{}\"]\n",
                support::ztail::LOKI_ID
            );
    }
    // The file exists before ztail starts: the figures do not include its discovery.
    let log = env.path("logs/app.log");
    std::fs::File::create(&log).unwrap();
    let zt = Ztail::start(&env, &config);
    zt.wait_up().await;
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().append(true).open(log).unwrap();
        let per_ms = (rate / 1000).max(1);
        let start = Instant::now();
        let mut seq = 0u64;
        let mut step = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            let mut buf = String::new();
            for _ in 0..per_ms {
                buf.push_str(&format!(
                    "2026-11-26T06:00:00Z INFO [latency] request served path=/api/v1/orders status=200 {seq}:{}\n",
                    unix_nanos()
                ));
                seq += 1;
            }
            f.write_all(buf.as_bytes()).unwrap();
            step += 1;
            let next = start + Duration::from_millis(step);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        seq as usize
    });
    let written = writer.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.lock().unwrap().0.len() < written && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = b.map(|t| (t.join().unwrap(), received_b));
    let caught_up = Instant::now();
    if let Some((_, rb)) = &b {
        let deadline = Instant::now() + Duration::from_secs(300);
        while rb.lock().unwrap().0.len() < written && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let caught_up = caught_up.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let peak = status_mib(zt.pid(), "VmHWM:");
    let cpu = cpu_seconds(zt.pid());
    let _ = rx.kill();
    let _ = rx.wait();
    let [p50, p99, max] = percentiles(&received, written, "sink a");
    println!(
        "latency: {written} lines at {rate}/s for {secs} s, batch_wait {batch_wait}, {} ztail, mTLS, loopback, second sink: {second:?}",
        profile()
    );
    println!("  received            {:>10}", written);
    println!("  p50                 {p50:>10.1} ms");
    println!("  p99                 {p99:>10.1} ms");
    println!("  max                 {max:>10.1} ms");
    println!("  ztail peak RSS      {:>10.1} MiB", peak);
    println!("  ztail CPU           {:>10.2} s", cpu);
    if let Some((mut child, rb)) = b {
        let _ = child.kill();
        let _ = child.wait();
        let [b50, b99, bmax] = percentiles(&rb, written, "sink b");
        println!(
            "  sink b: every line once; caught up {:.1} s after sink a; p50 {b50:.1} ms, p99 {b99:.1} ms, max {bmax:.1} ms",
            caught_up.as_secs_f64()
        );
    }
    p99
}
