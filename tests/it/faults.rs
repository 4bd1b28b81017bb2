//! Fault matrix rows (issue 8) not covered by the delivery, sink, identity and SPIRE tests:
//! hostile receivers, hostile files, a broken state directory, shutdown during a retry storm.
//! Each row asserts what the receiver got and prints its figures; `scripts/faults` runs the
//! whole matrix.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::time::{Duration, Instant};

use crate::support::pki::Ca;
use crate::support::receiver::{Fault, Receiver, ReceiverOpts};
use crate::support::ztail::{
    Env, LOKI_ID, ZTAIL_ID, Ztail, append_lines, checkpointed_offset, free_port,
};
use crate::{WAIT, assert_every_line, expected, lines_by_file, lines_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_accepts_tcp_and_never_speaks_tls_stalls_nothing() {
    let env = Env::new();
    let port = free_port();
    // Accepts connections and holds them open without a byte of TLS; records when.
    let silent = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let hold = Duration::from_secs(6);
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        let mut accepted_at = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let until = Instant::now() + hold;
        while Instant::now() < until {
            if let Ok((c, _)) = silent.accept() {
                conns.push(c);
                accepted_at.push(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        accepted_at
    });
    let started = Instant::now();
    let url = format!("https://127.0.0.1:{port}");
    let config = env
        .config(&url, "timeout = \"1s\"", "")
        .replace("max_backoff = \"1s\"", "max_backoff = \"500ms\"");
    let zt = Ztail::start(&env, &config);
    let log = env.path("logs/app.log");
    append_lines(&log, "s", 0..1000);
    // While the peer stalls (not refuses), ztail reports not ready.
    zt.wait_up().await;
    let deadline = started + hold - Duration::from_secs(1);
    while zt.get("/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "ready while Loki stalls");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted_at = held.join().unwrap();
    // A retry after the 1 s request timeout, not just parallel connects.
    let span = match (accepted_at.first(), accepted_at.last()) {
        (Some(a), Some(b)) => b.duration_since(*a),
        _ => Duration::ZERO,
    };
    assert!(
        span >= Duration::from_millis(900),
        "ztail timed out and retried the stalled handshake ({} connections over {span:?})",
        accepted_at.len()
    );
    let accepted = accepted_at.len();

    // The real receiver takes over the port: everything arrives, once.
    let leaf = env.ca.issue(LOKI_ID);
    let rx = Receiver::start(ReceiverOpts::new(&leaf, &env.ca).with_port(port)).await;
    assert!(rx.wait_for(|e| e.len() >= 1000, WAIT).await, "{}", zt.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lines_of(&rx, &log), expected("s", 0..1000));
    println!("row silent-tls: {accepted} stalled connections, 1000/1000 lines, 0 duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_responses_are_retried_and_nothing_is_lost() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults([
        Fault::Slow(Duration::from_secs(10)),
        Fault::Slow(Duration::from_secs(10)),
    ]);
    let zt = Ztail::start(&env, &env.config(&rx.url(), "timeout = \"2s\"", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "slow", 0..500);
    // Sooner than the first slow answer could come: only timeouts and retries get there.
    assert!(
        rx.wait_for(|e| e.len() >= 500, Duration::from_secs(9))
            .await,
        "{}",
        zt.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = lines_of(&rx, &log);
    let mut distinct = lines.clone();
    distinct.dedup();
    assert_eq!(distinct, expected("slow", 0..500), "every line, in order");
    let timeouts = zt
        .metric("ztail_push_requests_total{status=\"timeout\"}")
        .await;
    assert!(timeouts >= 1.0, "the slow answers timed out ({timeouts})");
    println!(
        "row slow-10s: {timeouts} timeouts, 500/500 lines, {} duplicates",
        lines.len() - distinct.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_directories_and_symlinks_matching_the_glob_never_block_or_duplicate() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let logs = env.path("logs");
    // A FIFO nobody writes to: opening it for reading would block forever.
    let fifo = logs.join("pipe.log");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success(), "mkfifo {}", fifo.display());
    fs::create_dir(logs.join("dir.log")).unwrap();
    // A symlink to a file that also matches: one inode, read once.
    let real = logs.join("real.log");
    std::os::unix::fs::symlink(&real, logs.join("link.log")).unwrap();
    append_lines(&real, "r", 0..300);
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    assert!(rx.wait_for(|e| e.len() >= 300, WAIT).await, "{}", zt.log());
    tokio::time::sleep(Duration::from_millis(1500)).await; // two rescans
    assert_eq!(rx.entries().len(), 300, "the symlinked file is read once");
    assert_eq!(zt.get("/healthz").await.0, 200, "not blocked by the FIFO");
    append_lines(&real, "r", 300..400);
    assert!(rx.wait_for(|e| e.len() >= 400, WAIT).await);
}

/// Whoever can create a symlink in a watched directory must not be able to ship any file ztail
/// can read: a link to a file outside every glob is skipped, logged and counted once, unless
/// its target lies under the source's `follow_symlinks_under` (as `/var/log/containers` links
/// into `/var/log/pods`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_to_a_file_outside_the_globs_is_not_read_unless_its_root_is_allowed() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let secrets = env.path("secrets");
    let pods = env.path("pods");
    fs::create_dir_all(&secrets).unwrap();
    fs::create_dir_all(&pods).unwrap();
    append_lines(&secrets.join("key.txt"), "secret", 0..5);
    append_lines(&pods.join("0.log"), "pod", 0..5);
    std::os::unix::fs::symlink(secrets.join("key.txt"), env.path("logs/stolen.log")).unwrap();
    std::os::unix::fs::symlink(pods.join("0.log"), env.path("logs/pod.log")).unwrap();
    append_lines(&env.path("logs/app.log"), "app", 0..5);
    let zt = Ztail::start(
        &env,
        &env.config(&rx.url(), "", "follow_symlinks_under = [\"pods\"]"),
    );
    assert!(rx.wait_for(|e| e.len() >= 10, WAIT).await, "{}", zt.log());
    tokio::time::sleep(Duration::from_millis(1500)).await; // two rescans
    let by_file = lines_by_file(&rx.entries());
    assert!(
        !rx.entries().iter().any(|e| e.line.starts_with("secret")),
        "a file outside the globs was shipped through a symlink"
    );
    assert_eq!(
        by_file[&env.path("logs/pod.log").display().to_string()],
        expected("pod", 0..5)
    );
    assert_eq!(
        zt.metric("ztail_files_skipped_total{reason=\"symlink_outside\"}")
            .await,
        1.0,
        "counted once over several rescans"
    );
    zt.wait_log("not following a symlink").await;
    println!(
        "row symlink-outside: 0 of 5 lines of the linked file shipped, 1 skip counted; the allowed root's 5 lines shipped"
    );
}

/// A file read while Loki was down has a checkpoint at offset 0 (nothing acknowledged). A
/// restart must resume it quietly, not report it as changed below its checkpoint and count a
/// truncation every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_at_offset_zero_is_not_a_truncation() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.stop().await;
    let log = env.path("logs/app.log");
    append_lines(&log, "z", 0..50);
    let mut zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    zt.wait_read_to_end(&log).await;
    let state = env.path("state");
    let started = Instant::now();
    while !fs::read_to_string(state.join("checkpoints.jsonl"))
        .unwrap_or_default()
        .contains("\"offset\":0,")
    {
        assert!(started.elapsed() < WAIT, "no checkpoint at offset 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..2 {
        zt.terminate(Duration::from_secs(10));
        zt.restart();
        zt.wait_read_to_end(&log).await;
        assert_eq!(zt.metric("ztail_file_truncations_total").await, 0.0);
    }
    assert!(
        !zt.log().contains("changed below its checkpoint"),
        "{}",
        zt.log()
    );
    rx.restart().await;
    assert!(rx.wait_for(|e| e.len() >= 50, WAIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lines_of(&rx, &log), expected("z", 0..50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_and_invalid_utf8_arrive_as_data() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let _zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/bytes.log");
    fs::write(&log, b"nul\0inside\nbad \xff\xfe utf8\nok\n").unwrap();
    assert!(rx.wait_for(|e| e.len() >= 3, WAIT).await);
    assert_eq!(
        lines_of(&rx, &log),
        ["nul\0inside", "bad \u{fffd}\u{fffd} utf8", "ok"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_gib_line_without_a_newline_is_cut_and_memory_stays_bounded() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(
        &env,
        &env.config(&rx.url(), "", "max_line_bytes = \"64KiB\""),
    );
    let log = env.path("logs/huge.log");
    // A sparse file: "before", then 2 GiB of NUL bytes without a newline, then "after".
    let mut f = fs::File::create(&log).unwrap();
    f.write_all(b"before\n").unwrap();
    let gib2 = 2u64 << 30;
    f.write_all_at(b"\nafter\n", 7 + gib2).unwrap();
    drop(f);
    let started = Instant::now();
    assert!(
        rx.wait_for(
            |e| e.iter().any(|e| e.line == "after"),
            Duration::from_secs(300)
        )
        .await,
        "{}",
        zt.log()
    );
    let lines = lines_of(&rx, &log);
    assert_eq!(lines.len(), 3, "before, the cut line, after");
    assert_eq!(lines[0], "before");
    assert_eq!(lines[1].len(), 64 << 10, "cut at max_line_bytes");
    assert!(lines[1].bytes().all(|b| b == 0));
    assert_eq!(lines[2], "after");
    let rss = zt.peak_rss_kib();
    assert!(
        rss < 128 * 1024,
        "peak RSS {rss} KiB while reading a 2 GiB line"
    );
    assert_eq!(zt.metric("ztail_lines_truncated_total").await, 1.0);
    println!(
        "row 2gib-line: read in {:.1} s, peak RSS {} MiB",
        started.elapsed().as_secs_f64(),
        rss / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_checkpoint_file_costs_duplicates_never_lines() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let config = env.config(&rx.url(), "", "");
    let mut zt = Ztail::start(&env, &config);
    let log = env.path("logs/app.log");
    append_lines(&log, "g", 0..1000);
    assert!(rx.wait_for(|e| e.len() >= 1000, WAIT).await);
    let checkpoint = env.path("state/checkpoints.jsonl");
    let mut duplicates = 0;
    let mut written = 1000;
    // Garbage, then an empty file: both cost a re-read, never a line.
    for damage in [&b"\x00\xffgarbage{{{\n\n}"[..], b""] {
        zt.terminate(Duration::from_secs(10));
        assert!(checkpoint.exists(), "a checkpoint file was written");
        fs::write(&checkpoint, damage).unwrap();
        append_lines(&log, "g", written..written + 500);
        written += 500;
        zt.restart();
        assert!(
            rx.wait_for_distinct_lines(written, WAIT).await,
            "{}",
            zt.log()
        );
        zt.wait_log("damaged").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        duplicates = assert_every_line(&lines_of(&rx, &log), &expected("g", 0..written));
    }
    println!("row garbage-checkpoint: {duplicates} duplicates over two damaged restarts, 0 lost");
}

/// Deletes a directory that ztail may be writing a checkpoint into meanwhile (then `rmdir`
/// finds it not empty): tried again until it is gone, as an operator would.
fn remove_dir(dir: &std::path::Path) {
    for _ in 0..50 {
        match fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("remove {}: {e}", dir.display()),
        }
    }
    panic!("{} kept being written into", dir.display());
}

/// A cleanup job or a wrong `rm` takes the state directory while ztail runs. With the default
/// `start_at = "end"`, a restart that found no checkpoint file took itself for the first start
/// and skipped what was written while it was down. The directory is recreated (locked, 0700)
/// with the positions held in memory, so a restart, also after a SIGKILL, resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_deleted_while_running_is_recreated_and_a_restart_resumes() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let config = env
        .config(&rx.url(), "", "")
        .replace("start_at = \"beginning\"", "start_at = \"end\"");
    let log = env.path("logs/app.log");
    append_lines(&log, "old", 0..10); // before the first start: skipped by start_at = "end"
    let mut zt = Ztail::start(&env, &config);
    zt.wait_read_to_end(&log).await;
    append_lines(&log, "d", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);
    let state = env.path("state");
    remove_dir(&state);
    append_lines(&log, "d", 100..200);
    assert!(rx.wait_for(|e| e.len() >= 200, WAIT).await);
    zt.wait_log("the state directory disappeared").await;
    let started = Instant::now();
    while !state.join("checkpoints.jsonl").exists() {
        assert!(
            started.elapsed() < WAIT,
            "the state directory was not recreated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // Deleted again, then a graceful stop: the final checkpoint recreates it.
    remove_dir(&state);
    zt.terminate(Duration::from_secs(10));
    append_lines(&log, "d", 200..300);
    zt.restart();
    assert!(
        rx.wait_for(|e| e.len() >= 300, WAIT).await,
        "lines written while ztail was down were skipped: {}",
        zt.log()
    );

    // And a crash after the recreation.
    remove_dir(&state);
    append_lines(&log, "d", 300..400);
    assert!(rx.wait_for(|e| e.len() >= 400, WAIT).await);
    let started = Instant::now();
    while checkpointed_offset(&state) < fs::metadata(&log).unwrap().len() {
        assert!(
            started.elapsed() < WAIT,
            "the positions were not written again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    zt.kill();
    append_lines(&log, "d", 400..500);
    zt.restart();
    assert!(rx.wait_for(|e| e.len() >= 500, WAIT).await, "{}", zt.log());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lines_of(&rx, &log), expected("d", 0..500));
    println!(
        "row state-deleted: recreated 3 times, 500/500 lines across a restart and a SIGKILL, 0 duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_retry_storm_exits_in_bounded_time_and_loses_nothing() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults((0..10_000).map(|_| Fault::Status(503)));
    let mut zt = Ztail::start(
        &env,
        &env.config(&rx.url(), "", "")
            .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"2s\""),
    );
    let log = env.path("logs/app.log");
    append_lines(&log, "storm", 0..2000);
    assert!(
        rx.wait_for_requests(|r| r.len() >= 20, WAIT).await,
        "no retry storm:\n{}",
        zt.log()
    );
    let t = Instant::now();
    let status = zt.terminate(Duration::from_secs(15));
    let took = t.elapsed();
    assert!(status.success(), "{status:?}\n{}", zt.log());
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} (timeout 2 s)"
    );
    // Nothing was acknowledged, so nothing is checkpointed past the start.
    assert_eq!(checkpointed_offset(&env.path("state")), 0);

    // Loki recovers; the restart ships everything the storm held back.
    let rx2 = env.receiver(LOKI_ID).await;
    let config = env.config(&rx2.url(), "", "");
    let _zt = Ztail::start(&env, &config);
    assert!(rx2.wait_for(|e| e.len() >= 2000, WAIT).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lines_of(&rx2, &log), expected("storm", 0..2000));
    println!(
        "row sigterm-storm: shutdown in {:.2} s, 2000/2000 lines after restart",
        took.as_secs_f64()
    );
}

/// A tmpfs mounted over a directory for one test (needs root, as ztail's CI has), unmounted
/// on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a small tmpfs for the state directory needs root"
        );
        Tmpfs(dir.to_owned())
    }

    fn remount(&self, mode: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {mode}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_state_directory_is_reported_and_nothing_is_lost() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let state = env.path("state");
    let fs_ = Tmpfs::mount(&state, "64k");
    let mut zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "n", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await, "{}", zt.log());

    // Full: checkpoints cannot be written, shipping goes on.
    let mut filler = fs::File::create(state.join("filler")).unwrap();
    while filler.write_all(&[0u8; 4096]).is_ok() {}
    drop(filler);
    append_lines(&log, "n", 100..300);
    assert!(rx.wait_for(|e| e.len() >= 300, WAIT).await);
    let write_errors = zt
        .wait_metric("ztail_checkpoint_write_errors_total", |v| v >= 1.0)
        .await;
    zt.wait_log("No space left on device").await;
    assert_eq!(zt.get("/healthz").await.0, 200);

    // Space again: the next checkpoint records everything acknowledged.
    fs::remove_file(state.join("filler")).unwrap();
    let size = fs::metadata(&log).unwrap().len();
    let deadline = Instant::now() + WAIT;
    while checkpointed_offset(&state) < size {
        assert!(
            Instant::now() < deadline,
            "checkpoints never resumed:\n{}",
            zt.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A crash, and the state directory comes back read-only: ztail refuses to start and says
    // why (it could not keep its promise), rather than shipping without checkpoints.
    zt.kill();
    fs_.remount("ro");
    append_lines(&log, "n", 300..400);
    let mut refused = std::process::Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["run", "-c"])
        .arg(&zt.config_path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A ztail that started anyway would run forever: fail instead of hanging.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = refused.kill();
            panic!("ztail started on a read-only state directory");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut refused.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "a read-only state directory is an error");
    assert!(
        stderr.contains(&state.display().to_string()) && stderr.contains("Read-only"),
        "names the directory and the reason: {stderr}"
    );
    // Writable again: the restart resumes from the last checkpoint, nothing is lost.
    fs_.remount("rw");
    append_lines(&log, "n", 400..500);
    zt.restart();
    assert!(rx.wait_for_distinct_lines(500, WAIT).await, "{}", zt.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let duplicates = assert_every_line(&lines_of(&rx, &log), &expected("n", 0..500));
    println!(
        "row state-full-and-read-only: {write_errors} checkpoint write errors, {duplicates} duplicates after the crash, 0 lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_svid_expiring_while_loki_is_down_is_replaced_and_nothing_is_lost() {
    let env = Env::new();
    // ztail's SVID expires in 8 s.
    let short = env.ca.issue_expiring_in(ZTAIL_ID, 8);
    let expires = Instant::now() + Duration::from_secs(8);
    short.write(&env.path("certs"), "ztail");
    let rx = env.receiver(LOKI_ID).await;
    let mut zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    zt.add_secret_key(&short.key_pem);
    let log = env.path("logs/app.log");
    append_lines(&log, "x", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await, "{}", zt.log());
    rx.stop().await;
    append_lines(&log, "x", 100..300);
    // The SVID expires during the outage; Loki comes back before the renewal: nothing may
    // reach it with the expired SVID.
    tokio::time::sleep(expires.saturating_duration_since(Instant::now()) + Duration::from_secs(1))
        .await;
    let requests_before = rx.request_count();
    rx.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rx.request_count(),
        requests_before,
        "no request with an expired SVID"
    );
    assert_eq!(rx.entries().len(), 100);
    assert_eq!(zt.get("/readyz").await.0, 503);
    // The renewed SVID arrives (as spiffe-helper would write it).
    let renewed = env.ca.issue(ZTAIL_ID);
    renewed.write(&env.path("certs"), "ztail");
    zt.add_secret_key(&renewed.key_pem);
    assert!(rx.wait_for(|e| e.len() >= 300, WAIT).await, "{}", zt.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lines_of(&rx, &log), expected("x", 0..300));
    let late: HashSet<String> = rx.requests()[requests_before..]
        .iter()
        .filter(|r| r.status == 204)
        .map(|r| r.client_serial_hex.clone())
        .collect();
    assert_eq!(
        late,
        HashSet::from([renewed.serial_hex.clone()]),
        "only the renewed SVID after the outage"
    );
    println!("row svid-expired-during-outage: 300/300 lines, renewed SVID only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_mid_stream_loses_nothing() {
    let env = Env::new();
    let ca2 = Ca::new("example.org");
    let port = free_port();
    let rx = Receiver::start(
        ReceiverOpts::new(&env.ca.issue(LOKI_ID), &env.ca)
            .trust_also(&ca2.cert_pem)
            .with_port(port),
    )
    .await;
    let mut zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    let writer_log = log.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..60 {
            append_lines(&writer_log, "ca", i * 100..(i + 1) * 100);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // 1. The bundle gains the new CA; 2. ztail gets an SVID from it; 3. Loki moves to it.
    assert!(rx.wait_for(|e| !e.is_empty(), WAIT).await);
    let reloads = zt.metric("ztail_identity_reloads_total").await;
    let bundle = format!("{}{}", env.ca.cert_pem, ca2.cert_pem);
    fs::write(env.path("certs/ca.crt.tmp"), bundle).unwrap();
    fs::rename(env.path("certs/ca.crt.tmp"), env.path("certs/ca.crt")).unwrap();
    zt.wait_metric("ztail_identity_reloads_total", |v| v > reloads)
        .await;
    let client2 = ca2.issue(ZTAIL_ID);
    client2.write(&env.path("certs"), "ztail");
    zt.add_secret_key(&client2.key_pem);
    assert!(
        rx.wait_for_requests(
            |r| r.iter().any(|r| r.client_serial_hex == client2.serial_hex),
            WAIT
        )
        .await,
        "the old Loki sees the new SVID before it moves:\n{}",
        zt.log()
    );
    rx.stop().await;
    let rx2 = Receiver::start(
        ReceiverOpts::new(&ca2.issue(LOKI_ID), &ca2)
            .trust_also(&env.ca.cert_pem)
            .with_port(port),
    )
    .await;
    writer.join().unwrap();
    assert!(
        rx2.wait_for(|e| e.iter().any(|e| e.line == "ca 00005999"), WAIT)
            .await,
        "{}",
        zt.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut all: Vec<String> = lines_of(&rx, &log);
    all.extend(lines_of(&rx2, &log));
    let duplicates = assert_every_line(&all, &expected("ca", 0..6000));
    assert!(
        rx2.requests()
            .iter()
            .all(|r| r.client_serial_hex == client2.serial_hex),
        "the new Loki saw only the new SVID"
    );
    println!("row ca-rotation: 6000/6000 lines, {duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_rotation_every_50ms_under_load_loses_nothing() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(
        &env,
        &env.config(&rx.url(), "", "")
            .replace("logs/*.log", "logs/app.log*"),
    );
    let log = env.path("logs/app.log");
    let dir = env.path("logs");
    // 100 rotations, 100 lines between each; rotated files keep matching the glob and are
    // followed under their new names, so everything shares the stream of app.log.*.
    for r in 0..100 {
        append_lines(&log, "rot", r * 100..(r + 1) * 100);
        fs::rename(&log, dir.join(format!("app.log.{r:03}"))).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rx.wait_for(|e| e.len() >= 10_000, WAIT).await,
        "{} of 10000\n{}",
        rx.entries().len(),
        zt.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines: Vec<String> = rx.entries().into_iter().map(|e| e.line).collect();
    let duplicates = assert_every_line(&lines, &expected("rot", 0..10_000));
    assert_eq!(duplicates, 0, "no duplicates");
    println!(
        "row rotate-50ms: 100 rotations, 10000/10000 lines, 0 duplicates, peak RSS {} MiB",
        zt.peak_rss_kib() / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copytruncate_storm_loses_and_duplicates_nothing_outside_its_window() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    // 50 truncations in quick succession. Each comes once the lines before it have arrived,
    // so copytruncate's inherent window (lines written between ztail's last read and the
    // truncation) is empty and every line must arrive, once.
    let mut written = 0;
    for _ in 0..50 {
        append_lines(&log, "ct", written..written + 100);
        written += 100;
        let last = format!("ct {:08}", written - 1);
        assert!(
            rx.wait_for(|e| e.iter().any(|e| e.line == last), WAIT)
                .await,
            "{}",
            zt.log()
        );
        fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    append_lines(&log, "ct", written..written + 100);
    written += 100;
    assert!(
        rx.wait_for(|e| e.len() >= written, WAIT).await,
        "{}",
        zt.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got: Vec<String> = rx.entries().into_iter().map(|e| e.line).collect();
    let duplicates = assert_every_line(&got, &expected("ct", 0..written));
    assert_eq!(duplicates, 0, "no duplicates");
    println!("row copytruncate-storm: 50 truncations, {written}/{written} lines, 0 duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_files_matching_a_glob_are_all_shipped() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let dir = env.path("logs");
    for i in 0..10_000 {
        fs::write(dir.join(format!("f{i:05}.log")), format!("file {i:05}\n")).unwrap();
    }
    let started = Instant::now();
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    assert!(
        rx.wait_for(|e| e.len() >= 10_000, Duration::from_secs(240))
            .await,
        "{} of 10000\n{}",
        rx.entries().len(),
        zt.log()
    );
    let took = started.elapsed();
    let rss = zt.peak_rss_kib() / 1024;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines: Vec<String> = rx.entries().into_iter().map(|e| e.line).collect();
    let want: Vec<String> = (0..10_000).map(|i| format!("file {i:05}")).collect();
    assert_eq!(assert_every_line(&lines, &want), 0, "each file once");
    assert!(rss < 512, "peak RSS {rss} MiB with 10,000 files");
    println!(
        "row 10k-files: 10000/10000 in {:.1} s, peak RSS {rss} MiB",
        took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_while_being_read_is_drained_then_released() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "del", 0..1000);
    assert!(
        rx.wait_for(|e| e.len() >= 1000, WAIT).await,
        "ztail has the file open"
    );
    // The rest is written and the file deleted at once: it is read through the open descriptor.
    append_lines(&log, "del", 1000..50_000);
    fs::remove_file(&log).unwrap();
    assert!(
        rx.wait_for(|e| e.len() >= 50_000, WAIT).await,
        "{}",
        zt.log()
    );
    // Closed once drained (rotate_wait 1 s) and acknowledged: the kernel no longer shows
    // the deleted file among ztail's descriptors, so its disk space is released.
    let held = || {
        fs::read_dir(format!("/proc/{}/fd", zt.pid()))
            .unwrap()
            .flatten()
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .any(|target| target.to_string_lossy() == format!("{} (deleted)", log.display()))
    };
    let deadline = Instant::now() + WAIT;
    while held() {
        assert!(Instant::now() < deadline, "the deleted file is still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lines_of(&rx, &log), expected("del", 0..50_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_growing_faster_than_loki_accepts_reports_lag_and_memory_stays_bounded() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    // Loki answers every request after 300 ms; one request in flight.
    rx.push_faults((0..40).map(|_| Fault::Slow(Duration::from_millis(300))));
    let zt = Ztail::start(&env, &env.config(&rx.url(), "max_in_flight = 1", ""));
    let log = env.path("logs/app.log");
    // Tailed while still empty, so the lag must come from reading, not from the size at discovery.
    fs::write(&log, "").unwrap();
    zt.wait_read_to_end(&log).await;
    // About 105 MB, more than the memory bound below: ztail must read it as Loki accepts it.
    let prefix = format!("fast {}", "x".repeat(195));
    append_lines(&log, &prefix, 0..500_000);
    let lag = zt
        .wait_metric(
            &format!("ztail_checkpoint_lag_bytes{{path=\"{}\"}}", log.display()),
            // Most of the file: what is still to read counts, not only what is in flight.
            |v| v > 50e6,
        )
        .await;
    assert!(
        rx.wait_for(|e| e.len() >= 500_000, Duration::from_secs(240))
            .await
    );
    let rss = zt.peak_rss_kib() / 1024;
    assert!(
        rss < 96,
        "peak RSS {rss} MiB while lagging behind a 105 MB file"
    );
    assert_eq!(lines_of(&rx, &log), expected(&prefix, 0..500_000));
    println!(
        "row faster-than-sink: lag {lag} bytes reported, peak RSS {rss} MiB, 500000/500000 lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inode_reuse_across_a_restart_reads_the_new_file_from_its_start() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let mut zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "old", 0..1000);
    assert!(rx.wait_for(|e| e.len() >= 1000, WAIT).await);
    zt.terminate(Duration::from_secs(10));
    let old_ino = fs::metadata(&log).unwrap().ino();
    fs::remove_file(&log).unwrap();
    // Filesystems hand a freed inode to the next file: try until the new file gets it.
    let mut reused = false;
    for i in 0..100 {
        let p = env.path(&format!("logs/new{i}.log"));
        append_lines(&p, "new", 0..10);
        if fs::metadata(&p).unwrap().ino() == old_ino {
            fs::rename(&p, &log).unwrap();
            reused = true;
            break;
        }
        fs::remove_file(&p).unwrap();
    }
    if !reused {
        // Still a valid row: a different file at the same path.
        append_lines(&log, "new", 0..10);
    }
    append_lines(&log, "new", 10..2000);
    zt.restart();
    assert!(rx.wait_for(|e| e.len() >= 3000, WAIT).await, "{}", zt.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let news: Vec<String> = rx
        .entries()
        .into_iter()
        .map(|e| e.line)
        .filter(|l| l.starts_with("new "))
        .collect();
    assert_eq!(
        news,
        expected("new", 0..2000),
        "the new file, whole, from offset 0"
    );
    if reused {
        zt.wait_log("inode reused by a different file").await;
    }
    println!("row inode-reuse: inode reused = {reused}, 2000/2000 lines of the new file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_ztail_may_not_read_is_reported_and_read_once_permitted() {
    const NOBODY: u32 = 65534;
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let ok = env.path("logs/ok.log");
    append_lines(&ok, "ok", 0..100);
    let config = env.config(&rx.url(), "", "");
    let zt = Ztail::start_as(&env, &config, NOBODY);
    // Created by root after the tree was handed to nobody: unreadable for ztail.
    let secret = env.path("logs/secret.log");
    fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&secret)
        .unwrap();
    append_lines(&secret, "secret", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await, "{}", zt.log());
    zt.wait_log("cannot open a matching file").await;
    assert_eq!(lines_of(&rx, &secret).len(), 0);
    // Permitted: the next rescan reads it whole; the readable file never stopped.
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    append_lines(&ok, "ok", 100..200);
    assert!(rx.wait_for(|e| e.len() >= 300, WAIT).await, "{}", zt.log());
    assert_eq!(lines_of(&rx, &secret), expected("secret", 0..100));
    assert_eq!(lines_of(&rx, &ok), expected("ok", 0..200));
    println!("row permission-denied: reported, then 100/100 lines once readable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_with_and_without_retry_after_loses_and_duplicates_nothing() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults((0..150).map(|i| match i % 3 {
        0 => Fault::TooManyRequests {
            retry_after_secs: 0,
        },
        1 => Fault::Status(429),
        _ => Fault::Status(503),
    }));
    let config = env
        .config(&rx.url(), "", "")
        .replace("max_backoff = \"1s\"", "max_backoff = \"100ms\"");
    let zt = Ztail::start(&env, &config);
    let log = env.path("logs/app.log");
    for i in 0..20 {
        append_lines(&log, "st", i * 1000..(i + 1) * 1000);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rx.wait_for(|e| e.len() >= 20_000, WAIT).await,
        "{}",
        zt.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.pending_faults(), 0, "the whole storm was served");
    assert_eq!(
        lines_of(&rx, &log),
        expected("st", 0..20_000),
        "once, in order"
    );
    let requests = rx.request_count();
    assert!(
        requests > 150,
        "every refusal was retried ({requests} requests)"
    );
    println!(
        "row 429-storm: 150 refusals, {requests} requests, 20000/20000 lines, 0 duplicates, peak RSS {} MiB",
        zt.peak_rss_kib() / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults([Fault::TooManyRequests {
        retry_after_secs: 2,
    }]);
    // Without Retry-After the retry would come after min_backoff (50 ms).
    let config = env
        .config(&rx.url(), "", "")
        .replace("max_backoff = \"1s\"", "max_backoff = \"5s\"");
    let zt = Ztail::start(&env, &config);
    let log = env.path("logs/app.log");
    append_lines(&log, "ra", 0..100);
    assert!(rx.wait_for_requests(|r| !r.is_empty(), WAIT).await);
    let refused = Instant::now();
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await, "{}", zt.log());
    let waited = refused.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "retried after {waited:?}, Retry-After was 2 s"
    );
    assert_eq!(lines_of(&rx, &log), expected("ra", 0..100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_receiver_loses_nothing() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    let writer_log = log.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..50 {
            append_lines(&writer_log, "flap", i * 200..(i + 1) * 200);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // Down and up every half second while the writer runs.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rx.stop().await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        rx.restart().await;
    }
    writer.join().unwrap();
    assert!(
        rx.wait_for_distinct_lines(10_000, WAIT).await,
        "{}",
        zt.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let duplicates = assert_every_line(&lines_of(&rx, &log), &expected("flap", 0..10_000));
    let connections = rx.connection_count();
    assert!(
        connections > 10,
        "ztail reconnected after each outage ({connections})"
    );
    println!(
        "row flapping: 10 outages, {connections} connections, 10000/10000 lines, {duplicates} duplicates (requests cut mid-flight are resent)"
    );
}
