//! Checks that follow from `docs/threat-model.md`: no key material in ztail's output, label
//! values from hostile file names cannot inject labels, the state directory is private, and
//! unsafe file permissions are reported.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use crate::WAIT;
use crate::support::ztail::{Env, LOKI_ID, ZTAIL_ID, Ztail, append_lines};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_never_reaches_the_log_even_at_trace_level_or_on_rotation() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let mut zt = Ztail::start_logging(&env, &env.config(&rx.url(), "", ""), "trace");
    let log = env.path("logs/app.log");
    append_lines(&log, "k", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);

    // A new SVID (new key) is picked up; a key that does not match its certificate is refused
    // with an error that names the files, not their contents, and the SVID before it stays.
    let next = env.ca.issue(ZTAIL_ID);
    let mismatched = env.ca.issue(ZTAIL_ID);
    next.write(&env.path("certs"), "ztail");
    zt.add_secret_key(&next.key_pem);
    // Keep writing until a request carries the new SVID (the reload is asynchronous).
    let mut n = 100;
    let deadline = std::time::Instant::now() + WAIT;
    while !rx
        .requests()
        .iter()
        .any(|r| r.client_serial_hex == next.serial_hex)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new SVID is never used"
        );
        append_lines(&log, "k", n..n + 10);
        n += 10;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fs::write(env.path("certs/ztail.key"), &mismatched.key_pem).unwrap();
    zt.add_secret_key(&mismatched.key_pem);
    zt.wait_log("does not match the certificate").await;
    assert!(rx.wait_for(|e| e.len() >= n, WAIT).await);
    let before = rx.request_count();
    append_lines(&log, "k", n..n + 100);
    assert!(rx.wait_for(|e| e.len() >= n + 100, WAIT).await);
    assert!(
        rx.requests()[before..]
            .iter()
            .all(|r| r.client_serial_hex == next.serial_hex),
        "the refused key changed nothing"
    );
    zt.terminate(Duration::from_secs(10));

    let text = zt.log();
    assert!(
        text.lines().count() > 200,
        "trace logging was on ({} lines)",
        text.lines().count()
    );
    assert!(
        text.lines()
            .any(|l| l.contains("does not match") && l.contains("ztail.key")),
        "the mismatched key was reported by file name:\n{text}"
    );
    zt.assert_no_key_material();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_names_cannot_inject_labels() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let source = "path_labels = '/logs/(?P<app>[^/]+)\\.log$'\n";
    let _zt = Ztail::start(&env, &env.config(&rx.url(), "", source));
    let name = "x\", job=\"evil\"}{host=\"forged\nsecond line\\";
    let path = env.path(&format!("logs/{name}.log"));
    append_lines(&path, "inj", 0..3);
    assert!(rx.wait_for(|e| e.len() >= 3, WAIT).await);
    let want: BTreeMap<String, String> = [
        ("app", name),
        ("filename", &path.display().to_string()),
        ("job", "app"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for e in rx.entries() {
        assert_eq!(e.labels, want, "labels are exactly the configured ones");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_directory_is_private_and_unsafe_permissions_are_reported() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let config = env.config(&rx.url(), "", "");
    let mut zt = Ztail::start(&env, &config);
    zt.wait_up().await;
    let state = env.path("state");
    let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "state directory mode {mode:o}");
    zt.terminate(Duration::from_secs(10));

    // A world-writable config, a group-readable key and a group-writable state directory.
    let config_path = env.path("ztail.toml");
    fs::set_permissions(&config_path, fs::Permissions::from_mode(0o666)).unwrap();
    fs::set_permissions(
        env.path("certs/ztail.key"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o770)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["check", "-c"])
        .arg(&config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "warnings, not errors: {stderr}");
    for expected in [
        "ztail.toml is world-writable",
        "ztail.key is readable by its group or others (mode 640)",
        "is writable by its group or others (mode 770)",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in:\n{stderr}");
    }
    // `run` logs them too.
    zt.restart();
    zt.wait_up().await;
    let log = zt.log();
    assert!(log.contains("world-writable"), "{log}");
}
