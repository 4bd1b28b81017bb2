//! Reload: SIGHUP and `POST /-/reload` apply a changed config without a restart, refuse an
//! invalid one, and lose or repeat nothing under a steady write load.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::ztail::{Env, LOKI_ID, Ztail, append_lines};
use crate::{WAIT, assert_every_line, assert_once, expected};

/// A second source, over `other/*.log`.
const OTHER: &str = r#"
[[sources]]
name = "other"
include = ["other/*.log"]
start_at = "beginning"
labels = { job = "other" }
"#;

/// Appends 20 lines `a <n>` to `path` every 5 ms until stopped; `written` counts them.
pub(crate) fn writer(
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let n = written.load(Ordering::SeqCst);
            append_lines(&path, "a", n..n + 20);
            written.store(n + 20, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// The `job` label of each line (the last one seen).
fn jobs(rx: &crate::Receiver) -> HashMap<String, String> {
    rx.entries()
        .into_iter()
        .map(|e| (e.line, e.labels.get("job").cloned().unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_apply_under_load_refuse_bad_configs_and_lose_or_repeat_nothing() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let v1 = env.config(&rx.url(), "", "");
    let v2 = env.config(&rx.url(), "", OTHER).replace(
        r#"labels = { job = "app" }"#,
        r#"labels = { job = "app2" }"#,
    );
    assert!(v2.contains("app2") && v2.contains("other"));
    let mut zt = Ztail::start(&env, &v1);
    zt.wait_up().await;
    let a = env.path("logs/a.log");
    std::fs::create_dir_all(env.path("other")).unwrap();
    append_lines(&env.path("other/b.log"), "b", 0..500);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let w = writer(a.clone(), stop.clone(), written.clone());
    assert!(rx.wait_for(|e| e.len() >= 200, WAIT).await);

    // SIGHUP: the labels change and a source is added.
    zt.write_config(&v2);
    zt.hup();
    zt.wait_metric("ztail_config_reloads_total{result=\"ok\"}", |v| v == 1.0)
        .await;
    let after_first = written.load(Ordering::SeqCst);
    assert!(
        rx.wait_for(|e| e.iter().any(|e| e.line == "b 00000499"), WAIT)
            .await,
        "the added source was not read; log:\n{}",
        zt.log()
    );

    // An invalid file and a change a reload cannot make: refused, the running config stays.
    zt.write_config(&v2.replace(r#"batch_wait = "100ms""#, r#"batch_wait = "soon""#));
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("not reloaded") && body.contains("batch_wait"),
        "{body}"
    );
    zt.write_config(&v2.replace(r#"state_dir = "state""#, r#"state_dir = "state2""#));
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("state_dir cannot change on reload"), "{body}");
    assert_eq!(
        zt.metric("ztail_config_reloads_total{result=\"invalid\"}")
            .await,
        2.0
    );
    let (_, status) = zt.get("/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert!(
        status["last_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("state_dir")),
        "{status}"
    );
    // Still shipping, with the labels of the reload that was applied.
    let line = format!("a {:08}", written.load(Ordering::SeqCst) + 40);
    assert!(
        rx.wait_for(|e| e.iter().any(|e| e.line == line), WAIT)
            .await,
        "shipping stopped after a refused reload; log:\n{}",
        zt.log()
    );

    // `POST /-/reload`: the added source is removed again and the labels change once more.
    // A GET or a web page (an Origin header) cannot reload.
    assert_eq!(zt.get("/-/reload").await.0, 405);
    let (code, _) = crate::support::ztail::http_request(
        zt.admin,
        "POST",
        "/-/reload",
        "Origin: http://evil.example\r\n",
    )
    .await;
    assert_eq!(code, 403);
    zt.write_config(&v1.replace(
        r#"labels = { job = "app" }"#,
        r#"labels = { job = "app3" }"#,
    ));
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 200, "{body}");
    let after_second = written.load(Ordering::SeqCst);
    append_lines(&env.path("other/b.log"), "b", 500..600);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let total = written.load(Ordering::SeqCst);
    // Once each, and nothing of what the removed source's file got afterwards.
    assert_once(&rx, total + 500, || zt.log()).await;
    let lines: Vec<String> = rx.entries().into_iter().map(|e| e.line).collect();
    let mut want = expected("a", 0..total);
    want.extend(expected("b", 0..500));
    assert_every_line(&lines, &want);
    let jobs = jobs(&rx);
    for n in 0..total {
        let job = &jobs[&format!("a {n:08}")];
        let allowed: &[&str] = if n >= after_second {
            &["app3"]
        } else if n >= after_first {
            &["app2", "app3"]
        } else {
            &["app", "app2", "app3"]
        };
        assert!(allowed.contains(&job.as_str()), "a {n:08} has job {job}");
    }
    assert!((0..500).all(|n| jobs[&format!("b {n:08}")] == "other"));

    // SIGKILL right after a reload: what was in flight is read again, nothing is lost.
    append_lines(&a, "a", total..total + 1000);
    zt.hup();
    zt.wait_metric("ztail_config_reloads_total{result=\"ok\"}", |v| v == 3.0)
        .await;
    zt.kill();
    append_lines(&a, "a", total + 1000..total + 2000);
    zt.restart();
    assert!(
        rx.wait_for_distinct_lines(total + 2500, WAIT).await,
        "lines lost across a kill after a reload; log:\n{}",
        zt.log()
    );
    let lines: Vec<String> = rx
        .entries()
        .into_iter()
        .map(|e| e.line)
        .filter(|l| l.starts_with("a "))
        .collect();
    assert_every_line(&lines, &expected("a", 0..total + 2000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_reloads_when_the_file_changes_and_tries_refused_content_once() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let v1 = env.config(&rx.url(), "", "");
    let zt = Ztail::start_with_args(&env, &v1, &["--watch-config"]);
    zt.wait_up().await;
    let a = env.path("logs/a.log");
    append_lines(&a, "a", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);

    // A refused file is reported once, not every time the file is looked at.
    zt.write_config(&v1.replace(r#"batch_wait = "100ms""#, r#"batch_wait = "soon""#));
    zt.wait_metric("ztail_config_reloads_total{result=\"invalid\"}", |v| {
        v == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        zt.metric("ztail_config_reloads_total{result=\"invalid\"}")
            .await,
        1.0
    );

    zt.write_config(&v1.replace(
        r#"labels = { job = "app" }"#,
        r#"labels = { job = "app2" }"#,
    ));
    zt.wait_metric("ztail_config_reloads_total{result=\"ok\"}", |v| v == 1.0)
        .await;
    append_lines(&a, "a", 100..200);
    assert_once(&rx, 200, || zt.log()).await;
    let jobs = jobs(&rx);
    assert!((0..100).all(|n| jobs[&format!("a {n:08}")] == "app"));
    assert!((100..200).all(|n| jobs[&format!("a {n:08}")] == "app2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_config_that_cannot_start_gives_way_to_the_running_one() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let v1 = env.config(&rx.url(), "", "");
    let zt = Ztail::start(&env, &v1);
    zt.wait_up().await;
    let a = env.path("logs/a.log");
    append_lines(&a, "a", 0..100);
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);

    // Valid to every check, but its probe's spool cannot be opened (a directory is in the way).
    std::fs::create_dir_all(env.path("state/probes/blocked.log")).unwrap();
    zt.write_config(&format!(
        "{}\n[[probes]]\nname = \"blocked\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:9\"\ninterval = \"2s\"\ntimeout = \"300ms\"\n",
        v1.replace(r#"labels = { job = "app" }"#, r#"labels = { job = "app2" }"#)
    ));
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("cannot open the probe spool") && body.contains("blocked.log"),
        "{body}"
    );
    assert_eq!(
        zt.metric("ztail_config_reloads_total{result=\"invalid\"}")
            .await,
        1.0
    );
    // The config that ran is running again: same labels, nothing lost or repeated.
    append_lines(&a, "a", 100..200);
    assert_once(&rx, 200, || zt.log()).await;
    let jobs = jobs(&rx);
    assert!((0..200).all(|n| jobs[&format!("a {n:08}")] == "app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_just_before_a_reload_is_drained_first() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let config = env
        .config(&rx.url(), "", "")
        .replace(r#"shutdown_timeout = "5s""#, r#"shutdown_timeout = "60s""#);
    assert!(config.contains("60s"));
    let zt = Ztail::start(&env, &config);
    zt.wait_up().await;
    let d = env.path("logs/d.log");
    append_lines(&d, "d", 0..10);
    assert!(rx.wait_for(|e| e.len() >= 10, WAIT).await);

    // Slow answers hold reading back: more is written than the pipeline buffers, and the
    // file is deleted (and ztail told to reload) while most of it is unread.
    rx.push_faults(
        (0..8).map(|_| crate::support::receiver::Fault::Slow(Duration::from_millis(500))),
    );
    const N: usize = 600_000; // 9 MB of lines
    append_lines(&d, "d", 10..N);
    std::fs::remove_file(&d).unwrap();
    zt.hup();
    zt.wait_metric("ztail_config_reloads_total{result=\"ok\"}", |v| v == 1.0)
        .await;
    assert_once(&rx, N, || zt.log()).await;
    let lines: Vec<String> = rx.entries().into_iter().map(|e| e.line).collect();
    assert_every_line(&lines, &expected("d", 0..N));
}
