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

/// A file name is chosen by whoever can create files in a watched directory. Unescaped in the
/// `path` label of `/metrics`, this one ended its series and printed one of its own
/// (`ztail_fake_total{reason="expired"} 0`) that would forge or hide ztail's alerts. The whole
/// exposition must parse, declare every series it prints, and carry the name exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_names_cannot_inject_metric_series() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let name = "x\"} 1\nztail_fake_total{reason=\"expired\"} 0\n# back\\slash";
    let path = env.path(&format!("logs/{name}.log"));
    append_lines(&path, "m", 0..3);
    assert!(rx.wait_for(|e| e.len() >= 3, WAIT).await);
    let path_text = path.display().to_string();
    let deadline = std::time::Instant::now() + WAIT;
    let samples = loop {
        let text = zt.get("/metrics").await.1;
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        if samples.iter().any(|s| {
            s.name == "ztail_checkpoint_lag_bytes" && s.labels.get("path") == Some(&path_text)
        }) {
            break samples;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no lag series for the file:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        samples.iter().all(|s| !s.name.contains("fake")),
        "an injected series was printed"
    );
}

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
}

/// Parses the Prometheus/OpenMetrics text format strictly: every line is `# HELP`, `# TYPE`,
/// `# UNIT` or `# EOF`, or a sample `name{label="value",...} number` of a family declared by
/// a `# TYPE` line before it, with label values escaped (`\\`, `\"`, `\n` only).
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut families: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for (i, line) in text.lines().enumerate() {
        let at = |what: &str| format!("line {}: {what}: {line:?}", i + 1);
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            match (words.next(), words.next()) {
                (Some("TYPE"), Some(name)) if valid_name(name) => families.push(name.to_owned()),
                (Some("HELP" | "UNIT"), Some(name)) if valid_name(name) => {}
                (Some("EOF"), None) => {}
                _ => return Err(at("unknown comment")),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value"))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at("invalid metric name"));
        }
        let declared = families.iter().any(|f| {
            name == f
                || ["_total", "_bucket", "_sum", "_count", "_created", "_info"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(f))
        });
        if !declared {
            return Err(at("series of an undeclared family"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                let (start, c) = chars.next().ok_or_else(|| at("unterminated labels"))?;
                if c == '}' {
                    rest = &body[start + 1..];
                    break;
                }
                let eq = body[start..]
                    .find("=\"")
                    .ok_or_else(|| at("label without value"))?;
                let key = body[start..start + eq].trim_start_matches(',');
                if !valid_name(key) {
                    return Err(at("invalid label name"));
                }
                while chars.peek().is_some_and(|(j, _)| *j < start + eq + 2) {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next().ok_or_else(|| at("unterminated value"))?.1 {
                        '"' => break,
                        '\\' => match chars.next().ok_or_else(|| at("bad escape"))?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            _ => return Err(at("unknown escape")),
                        },
                        '\n' => return Err(at("line feed in a value")),
                        c => value.push(c),
                    }
                }
                if labels.insert(key.to_owned(), value).is_some() {
                    return Err(at("duplicate label"));
                }
                if chars.peek().is_some_and(|(_, c)| *c == ',') {
                    chars.next();
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before value"))?;
        let number = value.split(' ').next().unwrap_or_default();
        if number.parse::<f64>().is_err() && !["+Inf", "-Inf", "NaN"].contains(&number) {
            return Err(at("value is not a number"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
        });
    }
    Ok(samples)
}

/// Any local user can connect to the admin endpoint. Hundreds of idle connections must not
/// take hundreds of ztail's file descriptors (it needs them for logs, checkpoints and Loki),
/// a client that never finishes its headers is dropped, and shipping goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_cannot_starve_ztail() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    zt.wait_up().await;
    let fds = || {
        fs::read_dir(format!("/proc/{}/fd", zt.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    // Connections beyond the cap wait in the kernel's backlog (4096 here), and past that in
    // SYN retries: a short timeout per connect keeps the test quick either way.
    let mut idle = Vec::new();
    for _ in 0..300 {
        let connect = tokio::net::TcpStream::connect(zt.admin);
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), connect).await {
            idle.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = fds();
    println!(
        "row admin-idle: {} idle connections held {} more descriptors of ztail's",
        idle.len(),
        during - before
    );
    assert!(
        during < before + 64,
        "{} idle admin connections took {} descriptors ({before} before)",
        idle.len(),
        during - before
    );
    // A client that sends half a request is dropped after the header timeout, which frees a
    // slot for the next one.
    let mut slow = tokio::net::TcpStream::connect(zt.admin).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    drop(idle);
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(15), slow.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "a connection that never finished its headers was kept open"
    );
    assert_eq!(zt.get("/healthz").await.0, 200);
    append_lines(&env.path("logs/app.log"), "a", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);
}

/// A web page the operator visits can point a name it controls at 127.0.0.1 (DNS
/// rebinding); the admin endpoint answers only to loopback names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_answers_only_to_loopback_host_names() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    zt.wait_up().await;
    for (host, want) in [
        ("evil.example", "403"),
        ("127.0.0.1:9", "200"),
        ("localhost", "200"),
    ] {
        let mut s = tokio::net::TcpStream::connect(zt.admin).await.unwrap();
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with(&format!("HTTP/1.1 {want}")),
            "{host}: {out}"
        );
    }
}
