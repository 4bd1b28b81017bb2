//! The one-command demo, run as a newcomer would: it must print lines read back from the store,
//! and Ctrl-C must stop everything it started.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Processes whose command line mentions the demo's directory or its fixed ports.
fn leftovers(demo_dir: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(demo_dir) || cmd.contains("127.0.0.1:3100") || cmd.contains("demo-writer") {
            found.push(cmd);
        }
    }
    found
}

#[test]
fn the_demo_prints_lines_from_the_store_and_ctrl_c_leaves_nothing_running() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let demo_dir = repo.join(".demo").display().to_string();
    assert!(
        leftovers(&demo_dir).is_empty(),
        "a demo is already running: {:?}",
        leftovers(&demo_dir)
    );
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_ztail")).parent().unwrap();
    // As from a terminal: SIGINT and SIGTERM at their defaults even if this test process
    // inherited them ignored (a shell without job control ignores SIGINT in background jobs).
    let mut child = Command::new("env")
        .arg("--default-signal=INT,TERM")
        .arg(repo.join("scripts/demo"))
        .env("ZTAIL_BIN_DIR", bin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start scripts/demo");
    let pgid = child.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });

    let mut output = Vec::new();
    let mut read_back = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while read_back < 5 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            if line.contains("<=") {
                read_back += 1;
            }
            output.push(line);
        }
    }
    // Ctrl-C reaches the whole foreground process group.
    Command::new("kill")
        .args(["-s", "INT", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < stop_deadline,
            "the demo did not stop within 30 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        output.push(line);
    }
    let output = output.join("\n");
    let errors = errors.join().unwrap();
    assert!(
        read_back >= 5,
        "no lines read back from the store:\n{output}\n{errors}"
    );
    assert!(
        output.contains("ztail status"),
        "it says where to look:\n{output}"
    );
    assert!(
        output.contains("stopped: nothing left running"),
        "{output}\n{status:?}"
    );
    // Ctrl-C reached the whole group, but the services were stopped in order: ztail flushed
    // to a store still running.
    let ztail_log = std::fs::read_to_string(repo.join(".demo/ztail.log")).unwrap_or_default();
    assert!(
        ztail_log.contains("stopped; checkpoints written")
            && !ztail_log.contains("shutdown timeout reached"),
        "ztail did not flush before the store stopped:\n{ztail_log}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        leftovers(&demo_dir).is_empty(),
        "left running: {:?}",
        leftovers(&demo_dir)
    );
}
