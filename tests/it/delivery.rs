//! Delivery: rotation, crashes, outages and shutdown lose nothing.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::ztail::{Env, LOKI_ID, Ztail, append_lines};
use crate::{WAIT, expected, lines_by_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_and_copytruncate_rotation_deliver_every_line_once_in_order() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let _zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let (a, b, c) = (
        env.path("logs/a.log"),
        env.path("logs/b.log"),
        env.path("logs/c.log"),
    );
    append_lines(&a, "a", 0..1000);
    append_lines(&b, "b1", 0..1000);
    append_lines(&c, "c", 0..1000);
    assert!(
        rx.wait_for(|e| e.len() >= 3000, WAIT).await,
        "first 3000 lines never arrived"
    );

    // b: rename rotation, with the application still writing to the old file a little before
    // it reopens (lines reach the renamed file through ztail's open descriptor).
    fs::rename(&b, env.path("logs/b.log.1")).unwrap();
    append_lines(&env.path("logs/b.log.1"), "b1", 1000..1100);
    append_lines(&b, "b2", 0..900);
    // c: copytruncate. Its loss window (lines written between ztail's last read and the
    // truncation) is unavoidable and documented, so the test copies only once ztail has read
    // everything, then truncates and goes on writing.
    fs::copy(&c, env.path("logs/c.log.1")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&c)
        .unwrap()
        .set_len(0)
        .unwrap();
    for i in 0..10 {
        append_lines(&a, "a", 1000 + i * 100..1100 + i * 100);
        append_lines(&c, "c", 1000 + i * 100..1100 + i * 100);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        rx.wait_for(|e| e.len() >= 6000, WAIT).await,
        "expected 6000 lines, got {}",
        rx.entries().len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // would-be duplicates arrive too
    let entries = rx.entries();
    assert_eq!(entries.len(), 6000, "duplicates or extra lines");
    let by_file = lines_by_file(&entries);
    let file = |p: &std::path::Path| by_file[&p.display().to_string()].clone();
    assert_eq!(file(&a), expected("a", 0..2000));
    assert_eq!(file(&c), expected("c", 0..2000));
    // Both generations of b.log share its stream; each is in order, nothing twice.
    let b_lines = file(&b);
    let gen1: Vec<_> = b_lines
        .iter()
        .filter(|l| l.starts_with("b1 "))
        .cloned()
        .collect();
    let gen2: Vec<_> = b_lines
        .iter()
        .filter(|l| l.starts_with("b2 "))
        .cloned()
        .collect();
    assert_eq!(gen1, expected("b1", 0..1100));
    assert_eq!(gen2, expected("b2", 0..900));
    for e in &entries {
        assert_eq!(e.labels.get("job").map(String::as_str), Some("app"));
        assert_eq!(
            e.client_spiffe_id.as_deref(),
            Some("spiffe://example.org/ztail")
        );
    }
}

/// logrotate's `app.log.1` and the kubelet's `0.log.<timestamp>` are outside `*.log`. A file
/// renamed there while Loki was down, then a restart: its checkpoint names an inode that is
/// still on disk beside the old path, so its unacknowledged tail is found and shipped, under
/// its old `filename`, before the new file at that path. A file already acknowledged to its
/// end is not shipped again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rotated_outside_the_glob_during_an_outage_is_drained_after_a_restart() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let mut zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let (log, done) = (env.path("logs/app.log"), env.path("logs/done.log"));
    append_lines(&log, "a", 0..100);
    append_lines(&done, "done", 0..10);
    assert!(rx.wait_for(|e| e.len() >= 110, WAIT).await);
    // Acknowledged to its end, then rotated away: nothing of it may come again.
    fs::rename(&done, env.path("logs/done.log.1")).unwrap();

    rx.stop().await;
    append_lines(&log, "a", 100..200);
    zt.wait_read_to_end(&log).await;
    fs::rename(&log, env.path("logs/app.log.1")).unwrap();
    zt.terminate(Duration::from_secs(10));
    append_lines(&log, "b", 0..50);

    rx.restart().await;
    zt.restart();
    assert!(
        rx.wait_for(|e| e.len() >= 260, WAIT).await,
        "the rotated file's unacknowledged lines never arrived ({} of 260): {}",
        rx.entries().len(),
        zt.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let by_file = lines_by_file(&rx.entries());
    let mut want = expected("a", 0..200);
    want.extend(expected("b", 0..50));
    assert_eq!(
        by_file[&log.display().to_string()],
        want,
        "the rotated file first, then its successor, each line once"
    );
    assert_eq!(
        by_file[&done.display().to_string()],
        expected("done", 0..10)
    );
    assert_eq!(zt.metric("ztail_rotated_files_found_total").await, 1.0);
    println!(
        "row rotated-outside-glob: 100/100 unacknowledged lines of app.log.1 after the restart, then 50/50 of the new app.log; 0 duplicates; the acknowledged done.log.1 not re-read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    // The fault matrix's long mode: ZTAIL_KILL_LINES=1000000 ZTAIL_KILLS=50.
    let env_or = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    // Written in 400 bursts over two files: a multiple of 800 lines.
    let per = env_or("ZTAIL_KILL_LINES", 200_000) / 800;
    let lines_total = per * 800;
    let min_kills = env_or("ZTAIL_KILLS", 3);
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let mut zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let files = [env.path("logs/k1.log"), env.path("logs/k2.log")];
    let writer_files = files.clone();
    // Halfway, k1.log is renamed to a name outside the glob (as the kubelet renames `0.log`
    // to `0.log.<timestamp>`), and ztail is killed right after: the rotated file's
    // unacknowledged tail must be found again after the restart.
    let rotated = Arc::new(AtomicBool::new(false));
    let rotated_flag = rotated.clone();
    let writer = std::thread::spawn(move || {
        // 400 bursts over about 8 s, alternating between two files.
        for burst in 0..400 {
            for (i, f) in writer_files.iter().enumerate() {
                let start = burst * per;
                append_lines(f, &format!("k{}", i + 1), start..start + per);
            }
            if burst == 200 {
                fs::rename(&writer_files[0], writer_files[0].with_extension("log.1")).unwrap();
                rotated_flag.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut kills = 0;
    let started = Instant::now();
    let cap = Duration::from_secs(60.max(2 * min_kills as u64));
    while !writer.is_finished() || kills < min_kills {
        let pause = Duration::from_millis(fastrand::u64(300..1200));
        let slept = Instant::now();
        while slept.elapsed() < pause && !rotated.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if rotated.swap(false, Ordering::SeqCst) {
            // Within the rotated file's rotate_wait and before its last lines are acknowledged.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
        }
        zt.kill();
        kills += 1;
        zt.restart();
        if started.elapsed() > cap {
            break;
        }
    }
    writer.join().unwrap();
    assert!(kills >= min_kills, "only {kills} kills before the cap");
    let want = lines_total;
    let ok = rx
        .wait_for_distinct_lines(want, Duration::from_secs(120))
        .await;
    let entries = rx.entries();
    let distinct: HashSet<&str> = entries.iter().map(|e| e.line.as_str()).collect();
    assert!(
        ok,
        "only {} of {want} distinct lines arrived after {kills} kills",
        distinct.len()
    );
    let by_file = lines_by_file(&entries);
    for (i, f) in files.iter().enumerate() {
        let got = &by_file[&f.display().to_string()];
        let prefix = format!("k{}", i + 1);
        // Duplicates come only from re-reading the unacknowledged tail after a kill: in
        // Loki's (timestamp) order each file's lines run forward, and rewind at most once per
        // kill, to the last persisted checkpoint.
        let seqs: Vec<usize> = got
            .iter()
            .map(|l| {
                l.strip_prefix(&format!("{prefix} "))
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        let rewinds = seqs.windows(2).filter(|w| w[1] <= w[0]).count();
        assert!(
            rewinds <= kills,
            "{prefix}: {rewinds} rewinds for {kills} kills"
        );
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted,
            (0..lines_total / 2).collect::<Vec<_>>(),
            "{prefix}: lines missing"
        );
    }
    println!(
        "row sigkill: {kills} kills and a rotation outside the glob: {} entries received for {} lines ({} duplicates), 0 lost",
        entries.len(),
        want,
        entries.len() - want
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30s_receiver_outage_loses_nothing_and_memory_stays_bounded() {
    const CEILING_KIB: u64 = 96 * 1024;
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/busy.log");
    append_lines(&log, "before", 0..1000);
    assert!(rx.wait_for(|e| e.len() >= 1000, WAIT).await);

    rx.stop().await;
    let outage = Instant::now();
    // About 60 MB written while Loki is away: far more than ztail may hold in memory.
    let pad = "x".repeat(200);
    let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
    let mut buf = String::new();
    for n in 0..300_000 {
        buf.push_str(&format!("during {n:08} {pad}\n"));
        if buf.len() > 1 << 20 {
            std::io::Write::write_all(&mut f, buf.as_bytes()).unwrap();
            buf.clear();
        }
    }
    std::io::Write::write_all(&mut f, buf.as_bytes()).unwrap();
    // ztail reports the outage.
    let deadline = Instant::now() + WAIT;
    while zt.get("/readyz").await.0 != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    rx.restart().await;

    assert!(
        rx.wait_for(|e| e.len() >= 301_000, Duration::from_secs(180))
            .await,
        "only {} of 301000 lines after the outage",
        rx.entries().len()
    );
    let entries = rx.entries();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for e in &entries {
        *seen.entry(e.line.as_str()).or_default() += 1;
    }
    assert_eq!(seen.len(), 301_000, "lines missing");
    let rss = zt.peak_rss_kib();
    eprintln!("peak RSS during the outage test: {} KiB", rss);
    assert!(
        rss < CEILING_KIB,
        "peak RSS {rss} KiB above the {CEILING_KIB} KiB ceiling"
    );
    assert_eq!(
        zt.get("/readyz").await.0,
        200,
        "ready again once Loki is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_sent_once_read_up_while_a_trickle_waits_for_the_batch_wait() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    // A batch wait far longer than the test: only the catch-up flush can deliver in time.
    let config = env
        .config(&rx.url(), "", "")
        .replace("batch_wait = \"100ms\"", "batch_wait = \"1h\"");
    let log = env.path("logs/app.log");
    // 1.1 MB there before ztail starts: several 256 KiB reads, and 1,000,000 bytes of lines, just
    // under one 1 MiB batch, so only the catch-up flush sends any of it before the batch wait.
    append_lines(&log, "b", 0..100_000);
    let mut zt = Ztail::start(&env, &config);
    let soon = Duration::from_secs(20);
    assert!(
        rx.wait_for(|e| e.len() >= 100_000, soon).await,
        "the end of the backlog waited for the batch wait"
    );
    // A burst while running: read up, then sent.
    append_lines(&log, "b", 100_000..150_000);
    assert!(
        rx.wait_for(|e| e.len() >= 150_000, soon).await,
        "the end of a burst waited for the batch wait"
    );
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("b", 0..150_000)
    );
    // A few lines at a time are no backlog: they wait for their batch to fill or age (or, here,
    // for the shutdown flush).
    append_lines(&log, "b", 150_000..150_010);
    zt.wait_read_to_end(&log).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.entries().len(),
        150_000,
        "a trickle was sent before its batch wait"
    );
    let status = zt.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}\n{}", zt.log());
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("b", 0..150_010),
        "the trickle is kept until shutdown, then sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_whose_last_multiline_entry_is_held_open_sends_it_after_the_group_timeout() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let source = "[sources.multiline]\nstart = '^rec '\ntimeout = \"1s\"\n";
    let config = env
        .config(&rx.url(), "", source)
        .replace("batch_wait = \"100ms\"", "batch_wait = \"1h\"");
    // 0.6 MB of two-line records. The framer keeps the last record open until its timeout,
    // so the read that meets the end sends all but that one; the record follows on its own.
    let log = env.path("logs/app.log");
    let records: String = (0..20_000)
        .map(|n| format!("rec {n:08}\n  detail {n:08}\n"))
        .collect();
    fs::write(&log, &records).unwrap();
    let _zt = Ztail::start(&env, &config);
    assert!(
        rx.wait_for(|e| e.len() >= 20_000, Duration::from_secs(20))
            .await,
        "the held-back end of the backlog waited for the batch wait: {} of 20000",
        rx.entries().len()
    );
    let want: Vec<String> = (0..20_000)
        .map(|n| format!("rec {n:08}\n  detail {n:08}"))
        .collect();
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        want
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_a_restart_resumes_without_duplicates() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    // A long batch wait: only the shutdown flush can deliver these lines in time.
    let config = env
        .config(&rx.url(), "", "")
        .replace("batch_wait = \"100ms\"", "batch_wait = \"30s\"");
    let mut zt = Ztail::start(&env, &config);
    zt.wait_up().await;
    let log = env.path("logs/app.log");
    append_lines(&log, "t", 0..5000);
    let deadline = Instant::now() + WAIT;
    while zt.metric("ztail_lines_read_total").await < 5000.0 {
        assert!(Instant::now() < deadline, "ztail never read the lines");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        rx.entries().len(),
        0,
        "nothing is sent before the batch wait"
    );
    let status = zt.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}\n{}", zt.log());
    assert_eq!(rx.entries().len(), 5000, "SIGTERM must flush what was read");

    append_lines(&log, "t", 5000..6000);
    let _zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    assert!(rx.wait_for(|e| e.len() >= 6000, WAIT).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let by_file = lines_by_file(&rx.entries());
    assert_eq!(by_file[&log.display().to_string()], expected("t", 0..6000));
}
