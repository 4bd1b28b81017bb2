//! `ztail convert promtail-positions`: ztail started on the converted checkpoints ships exactly
//! the lines after each position it could take over, and starts every other file at
//! `start_at`.

use std::process::Command;

use crate::support::ztail::{Env, LOKI_ID, Ztail, append_text};
use crate::{WAIT, lines_by_file};

fn convert(env: &Env, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["convert", "promtail-positions"])
        .arg(env.path("positions.yaml"))
        .arg("--state-dir")
        .arg(env.path("state"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztail_starts_where_promtail_stopped() {
    let env = Env::new();
    let file = |name: &str, lines: &[&str]| {
        let path = env.path(&format!("logs/{name}.log"));
        std::fs::write(
            &path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        path.display().to_string()
    };
    // Promtail had shipped the first two lines of `valid` and nothing of `zero`.
    let valid = file("valid", &["v1", "v2", "v3", "v4"]);
    let zero = file("zero", &["z1", "z2"]);
    // Rotated since (shorter than the offset), stopped inside a line, gone, never seen.
    let stale = file("stale", &["s1"]);
    let midline = file("midline", &["m1 long line", "m2"]);
    let missing = env.path("logs/missing.log").display().to_string();
    let unknown = file("unknown", &["u1"]);
    std::fs::write(
        env.path("positions.yaml"),
        format!(
            "positions:\n  {valid}: \"6\"\n  {zero}: \"0\"\n  {stale}: \"9999\"\n  {midline}: \"5\"\n  {missing}: \"10\"\n  journal-systemd: s=0a1b;i=42\n"
        ),
    )
    .unwrap();

    let (code, out) = convert(
        &env,
        &["--report", env.path("report.json").to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("imported 2 of 6 positions"), "{out}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.path("report.json")).unwrap()).unwrap();
    let imported: Vec<(&str, u64)> = report["imported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["path"].as_str().unwrap(), i["offset"].as_u64().unwrap()))
        .collect();
    assert_eq!(imported, [(valid.as_str(), 6), (zero.as_str(), 0)]);
    let reason = |key: &str| {
        report["not_imported"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["key"] == key)
            .unwrap_or_else(|| panic!("{key} not reported: {report}"))["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(reason(&stale).contains("fewer than the offset"));
    assert!(reason(&midline).contains("inside a line"));
    assert!(reason(&missing).contains("cannot open"));
    assert!(reason("journal-systemd").contains("journal"));

    // An earlier conversion is replaced without --force (ztail has not run on it).
    let (code, out) = convert(&env, &[]);
    assert_eq!(code, 0, "{out}");

    let rx = env.receiver(LOKI_ID).await;
    let config = env
        .config(&rx.url(), "", "")
        .replace("start_at = \"beginning\"", "start_at = \"end\"");
    let zt = Ztail::start(&env, &config);
    // The taken-over files are read from their positions at the first scan; the others from
    // their ends.
    assert!(
        rx.wait_for(|e| e.len() >= 4, WAIT).await,
        "{:?}\nlog:\n{}",
        lines_by_file(&rx.entries()),
        zt.log()
    );
    for path in [&valid, &zero, &stale, &midline, &unknown] {
        append_text(std::path::Path::new(path), "after\n");
    }
    assert!(
        rx.wait_for(|e| e.len() >= 9, WAIT).await,
        "log:\n{}",
        zt.log()
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let got = lines_by_file(&rx.entries());
    let want = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert_eq!(got[&valid], want(&["v3", "v4", "after"]));
    assert_eq!(got[&zero], want(&["z1", "z2", "after"]));
    for path in [&stale, &midline, &unknown] {
        assert_eq!(got[path], want(&["after"]), "{path}: start_at = end");
    }
    assert_eq!(got.len(), 5, "{got:?}");

    // While ztail holds the state directory, nothing is written into it.
    let (code, out) = convert(&env, &["--force"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("another ztail is using"), "{out}");
    // Once ztail has run, its checkpoints are its own: replaced only with --force.
    let mut zt = zt;
    zt.kill();
    let before = std::fs::read(env.path("state/checkpoints.jsonl")).unwrap();
    let (code, out) = convert(&env, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("already has ztail checkpoints") && out.contains("--force"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(env.path("state/checkpoints.jsonl")).unwrap(),
        before
    );
    let (code, out) = convert(&env, &["--force"]);
    assert_eq!(code, 0, "{out}");
}
