//! Several sinks: each reads for itself with positions of its own, so a sink that is down holds
//! back only its own lines; sources choose their sinks; a reload adds and removes sinks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::reload::writer;
use crate::support::ztail::{Env, LOKI_ID, Ztail, append_lines};
use crate::{WAIT, assert_every_line, assert_once, expected};

const TEAM_ID: &str = "spiffe://example.org/loki-team";

/// The test config with `[[sinks]]` "ops" (at `ops`, the usual Loki ID) and "team" (at `team`,
/// its own ID), and a source "other" that only "team" gets.
fn two_sinks(env: &Env, ops: &str, team: &str) -> String {
    let base = only_ops(env, ops);
    format!(
        r#"{base}
[[sources]]
name = "other"
include = ["other/*.log"]
start_at = "beginning"
labels = {{ job = "other" }}
sinks = ["team"]

[[sinks]]
name = "team"
url = "{team}/loki/api/v1/push"
batch_wait = "100ms"
min_backoff = "50ms"
max_backoff = "500ms"
shutdown_timeout = "5s"
[sinks.peer]
allowed_ids = ["{TEAM_ID}"]
"#
    )
}

/// The test config with one `[[sinks]]`, "ops".
fn only_ops(env: &Env, ops: &str) -> String {
    env.config(ops, "", "")
        .replace("[sink]\n", "[[sinks]]\nname = \"ops\"\n")
        .replace("[sink.peer]", "[sinks.peer]")
}

/// 300 lines `b <n>` in `other/b.log`, and a [`writer`] appending to `logs/a.log`.
struct Load {
    a: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicUsize>,
    w: std::thread::JoinHandle<()>,
}

fn load(env: &Env) -> Load {
    std::fs::create_dir_all(env.path("other")).unwrap();
    append_lines(&env.path("other/b.log"), "b", 0..300);
    let a = env.path("logs/a.log");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let w = writer(a.clone(), stop.clone(), written.clone());
    Load {
        a,
        stop,
        written,
        w,
    }
}

fn lines(rx: &crate::Receiver, prefix: &str) -> Vec<String> {
    rx.entries()
        .into_iter()
        .map(|e| e.line)
        .filter(|l| l.starts_with(prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_sink_holds_back_only_itself_and_catches_up_exactly_once() {
    let env = Env::new();
    let ops = env.receiver(LOKI_ID).await;
    let team = env.receiver(TEAM_ID).await;
    let config = two_sinks(&env, &ops.url(), &team.url());
    let mut zt = Ztail::start(&env, &config);
    zt.wait_up().await;
    let Load {
        a,
        stop,
        written,
        w,
    } = load(&env);
    assert!(ops.wait_for(|e| e.len() >= 200, WAIT).await);
    assert!(team.wait_for(|e| e.len() >= 500, WAIT).await);

    // "team" goes down for 6 s: "ops" keeps receiving what is written, at once.
    team.stop().await;
    let down = Instant::now();
    let mut worst = Duration::ZERO;
    while down.elapsed() < Duration::from_secs(6) {
        let line = format!("a {:08}", written.load(Ordering::SeqCst) + 20);
        let asked = Instant::now();
        assert!(
            ops.wait_for(|e| e.iter().any(|e| e.line == line), WAIT)
                .await,
            "ops stalled while team was down; log:\n{}",
            zt.log()
        );
        worst = worst.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // batch_wait is 100 ms: a line waits for its batch, not for the other sink.
    assert!(
        worst < Duration::from_secs(2),
        "ops took {worst:?} for a line"
    );
    assert_eq!(zt.metric("ztail_sink_failing{sink=\"team\"}").await, 1.0);
    assert_eq!(zt.metric("ztail_sink_failing{sink=\"ops\"}").await, 0.0);
    assert!(zt.metric("ztail_sink_lag_bytes{sink=\"team\"}").await > 0.0);
    let (code, body) = zt.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"team\""), "{body}");
    let (_, status) = zt.get("/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["sinks"][1]["name"], "team", "{status}");
    assert_eq!(status["sinks"][1]["failing"], true, "{status}");
    assert_eq!(status["sinks"][0]["failing"], false, "{status}");

    // Back: "team" catches up from its own positions.
    team.restart().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let total = written.load(Ordering::SeqCst);
    assert_once(&ops, total, || zt.log()).await;
    assert_once(&team, total + 300, || zt.log()).await;
    assert_every_line(&lines(&ops, "a "), &expected("a", 0..total));
    assert_every_line(&lines(&team, "a "), &expected("a", 0..total));
    assert_every_line(&lines(&team, "b "), &expected("b", 0..300));
    assert!(
        lines(&ops, "b ").is_empty(),
        "ops got a source it is not for"
    );
    assert!(env.path("state/checkpoints.ops.jsonl").exists());
    assert!(env.path("state/checkpoints.team.jsonl").exists());

    // SIGKILL while "team" is down again: each sink resumes from its own positions.
    team.stop().await;
    append_lines(&a, "a", total..total + 1000);
    assert!(
        ops.wait_for_distinct_lines(total + 1000, WAIT).await,
        "log:\n{}",
        zt.log()
    );
    zt.kill();
    append_lines(&a, "a", total + 1000..total + 2000);
    team.restart().await;
    zt.restart();
    assert!(
        ops.wait_for_distinct_lines(total + 2000, WAIT).await,
        "ops lost lines across a kill; log:\n{}",
        zt.log()
    );
    assert!(
        team.wait_for_distinct_lines(total + 2300, WAIT).await,
        "team lost lines across a kill; log:\n{}",
        zt.log()
    );
    assert_every_line(&lines(&ops, "a "), &expected("a", 0..total + 2000));
    assert_every_line(&lines(&team, "a "), &expected("a", 0..total + 2000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_sinks_and_a_removed_sink_drops_its_positions() {
    let env = Env::new();
    let ops = env.receiver(LOKI_ID).await;
    let team = env.receiver(TEAM_ID).await;
    let one = only_ops(&env, &ops.url());
    let both = two_sinks(&env, &ops.url(), &team.url());
    let zt = Ztail::start(&env, &one);
    zt.wait_up().await;
    let a = env.path("logs/a.log");
    append_lines(&a, "a", 0..1000);
    assert_once(&ops, 1000, || zt.log()).await;

    // Added: "team" starts as at a first start (start_at = "beginning": the whole file).
    zt.write_config(&both);
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 200, "{body}");
    append_lines(&a, "a", 1000..2000);
    assert_once(&ops, 2000, || zt.log()).await;
    assert_once(&team, 2000, || zt.log()).await;
    assert!(env.path("state/checkpoints.team.jsonl").exists());

    // Removed: its positions go, and it gets nothing more.
    zt.write_config(&one);
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(!env.path("state/checkpoints.team.jsonl").exists());
    append_lines(&a, "a", 2000..3000);
    assert_once(&ops, 3000, || zt.log()).await;
    assert_eq!(team.entries().len(), 2000);
    assert_every_line(&lines(&ops, "a "), &expected("a", 0..3000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_bound_to_a_peer_is_sent_only_to_that_peer() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    // The sink accepts both IDs, but tenant t1 is bound to the other one: the receiver (LOKI_ID)
    // is refused in the handshake, before any byte of t1's lines.
    let bound_to = |id: &str| {
        env.config(
            &rx.url(),
            &format!("tenant = \"t1\"\ntenants = {{ t1 = [\"{id}\"] }}"),
            "",
        )
        .replace(
            &format!("allowed_ids = [\"{LOKI_ID}\"]"),
            &format!("allowed_ids = [\"{LOKI_ID}\", \"{TEAM_ID}\"]"),
        )
    };
    let zt = Ztail::start(&env, &bound_to(TEAM_ID));
    zt.wait_up().await;
    append_lines(&env.path("logs/a.log"), "a", 0..500);
    zt.wait_metric(
        "ztail_peer_refusals_total{reason=\"id_not_allowed\"}",
        |v| v >= 1.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.request_count(),
        0,
        "t1 was sent to a peer it is not bound to"
    );

    // Bound to the receiver's ID: every line arrives once, as tenant t1.
    zt.write_config(&bound_to(LOKI_ID));
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 200, "{body}");
    assert_once(&rx, 500, || zt.log()).await;
    assert!(
        rx.requests()
            .iter()
            .all(|r| r.tenant.as_deref() == Some("t1"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_file_a_down_sink_never_read_is_given_up_after_the_hold_bound() {
    let env = Env::new();
    let ops = env.receiver(LOKI_ID).await;
    let team = env.receiver(TEAM_ID).await;
    team.stop().await;
    // Small reads and batches, so that "team" holds little of the file in memory.
    let config = two_sinks(&env, &ops.url(), &team.url())
        .replace(
            "[tail]\n",
            "[tail]\nmax_rotated_hold = \"2s\"\nread_buffer = \"16KiB\"\n",
        )
        .replace(
            "name = \"team\"\n",
            "name = \"team\"\nmax_in_flight = 1\nbatch_bytes = \"64KiB\"\n",
        );
    let zt = Ztail::start(&env, &config);
    zt.wait_up().await;
    // More than "team" can hold in memory while it is down (its batches, its queue), and more
    // after its task is blocked behind them; then deleted.
    let a = env.path("logs/a.log");
    append_lines(&a, "a", 0..400_000);
    assert_once(&ops, 400_000, || zt.log()).await;
    append_lines(&a, "a", 400_000..401_000);
    assert_once(&ops, 401_000, || zt.log()).await;
    let size = std::fs::metadata(&a).unwrap().len();
    std::fs::remove_file(&a).unwrap();
    // "team" acknowledged none of it: all of it is counted, up to the last line written.
    zt.wait_metric("ztail_sink_lost_bytes_total{sink=\"team\"}", |v| v > 0.0)
        .await;
    assert_eq!(
        zt.metric("ztail_sink_lost_bytes_total{sink=\"team\"}")
            .await,
        size as f64
    );
    assert!(
        zt.log()
            .contains("still not acknowledged by this sink after tail.max_rotated_hold"),
        "{}",
        zt.log()
    );
    assert_eq!(
        zt.metric("ztail_sink_lost_bytes_total{sink=\"ops\"}").await,
        0.0,
        "ops had read it all"
    );
    // Closed by both sinks: the deleted file's disk space is free.
    let pid = zt.pid();
    let until = Instant::now() + WAIT;
    while open_deleted(pid, "a.log") {
        assert!(
            Instant::now() < until,
            "a.log is still open; log:\n{}",
            zt.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A reload does not wait for a file given up.
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        !zt.log()
            .contains("before every rotated or deleted file was drained"),
        "{}",
        zt.log()
    );
    // "team" is back: what it had queued may arrive, the rest is gone; new lines flow again.
    team.restart().await;
    append_lines(&env.path("logs/b.log"), "b", 0..100);
    assert!(
        team.wait_for(
            |e| e.iter().filter(|e| e.line.starts_with("b ")).count() >= 100,
            WAIT
        )
        .await,
        "log:\n{}",
        zt.log()
    );
    assert!(lines(&team, "a ").len() < 100_000, "nothing was given up");
}

/// Whether process `pid` holds a deleted file named `name` open.
fn open_deleted(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|t| t.to_string_lossy().ends_with(&format!("{name} (deleted)")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_change_sinks_and_routes_under_load_and_a_kill_after_one_loses_nothing() {
    let env = Env::new();
    let ops = env.receiver(LOKI_ID).await;
    let team = env.receiver(TEAM_ID).await;
    let one = only_ops(&env, &ops.url());
    let both = two_sinks(&env, &ops.url(), &team.url());
    // Changed: "app" goes to "ops" only, and "ops" pushes as tenant t-ops.
    let app_to_ops = both
        .replace(
            r#"labels = { job = "app" }"#,
            "labels = { job = \"app\" }\nsinks = [\"ops\"]",
        )
        .replace("name = \"ops\"\n", "name = \"ops\"\ntenant = \"t-ops\"\n");
    assert!(app_to_ops.contains("sinks = [\"ops\"]") && app_to_ops.contains("t-ops"));
    let mut zt = Ztail::start(&env, &one);
    zt.wait_up().await;
    let Load {
        a,
        stop,
        written,
        w,
    } = load(&env);
    assert!(ops.wait_for(|e| e.len() >= 200, WAIT).await);

    // Added: "team" and the source only it gets.
    zt.write_config(&both);
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 200, "{body}");
    let added = written.load(Ordering::SeqCst);
    assert!(
        team.wait_for(
            |e| e.iter().filter(|e| e.line.starts_with("a ")).count() >= added
                && e.iter().filter(|e| e.line.starts_with("b ")).count() >= 300,
            WAIT
        )
        .await,
        "the added sink did not catch up; log:\n{}",
        zt.log()
    );

    // Invalid in between: a source names a sink that does not exist. Refused; shipping goes on.
    zt.write_config(&both.replace("sinks = [\"team\"]", "sinks = [\"tema\"]"));
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("sources[1].sinks[0]"), "{body}");
    let line = format!("a {:08}", written.load(Ordering::SeqCst) + 40);
    for rx in [&ops, &team] {
        assert!(
            rx.wait_for(|e| e.iter().any(|e| e.line == line), WAIT)
                .await,
            "shipping stopped after a refused reload; log:\n{}",
            zt.log()
        );
    }

    // Changed: from here on "team" gets no more of "app", and "ops" gets it as t-ops.
    zt.write_config(&app_to_ops);
    let (code, body) = zt.post("/-/reload").await;
    assert_eq!(code, 200, "{body}");
    // The writer stores its count after appending: 20 more may be in the file already.
    let changed = written.load(Ordering::SeqCst) + 20;
    append_lines(&env.path("other/b.log"), "b", 300..400);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let total = written.load(Ordering::SeqCst);
    assert_once(&ops, total, || zt.log()).await;
    assert_every_line(&lines(&ops, "a "), &expected("a", 0..total));
    for e in ops.entries() {
        let n: usize = e.line[2..].parse().unwrap();
        assert!(
            n < changed || e.tenant.as_deref() == Some("t-ops"),
            "{} went to ops as {:?} after the change",
            e.line,
            e.tenant
        );
    }
    // "team": "app" from the start up to where the change was applied, once; "other" whole.
    assert_once(&team, 400 + team_a(&team), || zt.log()).await;
    let kept = team_a(&team);
    assert!(
        (added..=changed).contains(&kept),
        "team has {kept} lines of app; added at {added}, changed at {changed}"
    );
    assert_every_line(&lines(&team, "a "), &expected("a", 0..kept));
    assert_every_line(&lines(&team, "b "), &expected("b", 0..400));

    // Back to both, SIGKILL right after: each sink resumes from its own positions; "team" reads
    // "app" again from where it stopped.
    zt.write_config(&both);
    zt.hup();
    zt.wait_metric("ztail_config_reloads_total{result=\"ok\"}", |v| v == 3.0)
        .await;
    zt.kill();
    append_lines(&a, "a", total..total + 1000);
    zt.restart();
    for (rx, n) in [(&ops, total + 1000), (&team, total + 1400)] {
        assert!(
            rx.wait_for_distinct_lines(n, WAIT).await,
            "lines lost across a kill after a reload; log:\n{}",
            zt.log()
        );
    }
    assert_every_line(&lines(&ops, "a "), &expected("a", 0..total + 1000));
    assert!(
        lines(&ops, "b ").is_empty(),
        "ops got a source it is not for"
    );
    assert_every_line(&lines(&team, "a "), &expected("a", 0..total + 1000));
    assert_every_line(&lines(&team, "b "), &expected("b", 0..400));
    // "team" kept its position in "app" while it did not get it: what it had, it got once.
    let before = expected("a", 0..kept);
    let again = lines(&team, "a ")
        .into_iter()
        .filter(|l| before.binary_search(l).is_ok())
        .count();
    assert_eq!(
        again, kept,
        "team read app again from before where it had stopped"
    );
}

/// How many lines of "app" (`a …`) `rx` has.
fn team_a(rx: &crate::Receiver) -> usize {
    lines(rx, "a ").len()
}
