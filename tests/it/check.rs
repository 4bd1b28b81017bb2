//! `ztail check`: broken configs name the key and the reason and exit non-zero.

use std::process::Command;

use crate::support::ztail::Env;

fn check(env: &Env, config: &str) -> (i32, String) {
    let path = env.path("check.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn broken_configs_name_the_key_and_the_reason() {
    let env = Env::new();
    let good = env.config("https://127.0.0.1:3100", "", "");
    let (code, out) = check(&env, &good);
    assert_eq!(code, 0, "{out}");

    let cases = [
        (
            good.replace("name = \"app\"", "name = \"app\"\nfolow = true"),
            "sources[0].folow",
            "unknown field `folow`",
        ),
        (
            good.replace("https://127.0.0.1:3100", "http://127.0.0.1:3100"),
            "sink.url",
            "not https",
        ),
        (
            good.replace("allowed_ids = [\"spiffe://example.org/loki\"]", ""),
            "sink.peer",
            "never trusts a peer by address",
        ),
        (
            good.replace(
                "allowed_ids = [\"spiffe://example.org/loki\"]",
                "allowed_path_prefixes = [\"spiffe://example.org/loki/\"]",
            ),
            "sink.peer",
            "spiffe://example.org/loki/",
        ),
        (
            good.replace("job = \"app\"", "\"job-name\" = \"app\""),
            "sources[0].labels.job-name",
            "invalid label name",
        ),
        (
            good.replace("batch_wait = \"100ms\"", "batch_wait = \"1 fortnight\""),
            "sink.batch_wait",
            "invalid duration",
        ),
        (
            good.replace(
                "[[sources]]",
                "[[sources]]\nmax_line_bytes = \"12 parsecs\"",
            ),
            "sources[0].max_line_bytes",
            "invalid size",
        ),
        (
            good.replace("logs/*.log", "logs/[*.log"),
            "sources[0].include[0]",
            "invalid glob",
        ),
        (
            good.replace("start_at = \"beginning\"", "start_at = \"middle\""),
            "sources[0].start_at",
            "unknown variant `middle`",
        ),
        (
            good.replace("[tail]", "[admin]\nlisten = \"0.0.0.0:9311\"\n[tail]"),
            "admin.listen",
            "not a loopback address",
        ),
        (
            format!("{good}format = \"syslog\"\n"),
            "sources[0].format",
            "unknown variant `syslog`",
        ),
        (
            format!("{good}path_labels = '/logs/(?P<job>[^/]+)'\n"),
            "sources[0].path_labels",
            "would replace the label",
        ),
        (
            format!("{good}path_labels = '/logs/(?P<app-name>[^/]+)'\n"),
            "sources[0].path_labels",
            "invalid regex",
        ),
        (
            format!("{good}format = \"cri\"\nlabels = {{ stream = \"x\" }}\n")
                .replace("labels = { job = \"app\" }\n", ""),
            "sources[0].labels.stream",
            "stream_as",
        ),
        (
            format!("{good}[sources.multiline]\nstart = '^(unclosed'\n"),
            "sources[0].multiline.start",
            "invalid regex",
        ),
        (
            format!("{good}format = \"cri\"\n[sources.timestamp]\nregex = '^(\\S+)'\n"),
            "sources[0].timestamp",
            "raw sources only",
        ),
        (
            format!("{good}[sources.timestamp]\nregex = '^(\\S+)'\nzone = \"Europe/Paris\"\n"),
            "sources[0].timestamp.zone",
            "fixed offset",
        ),
        (
            format!("{good}metadata_fields = [\"trace-id\"]\n"),
            "sources[0].metadata_fields[0]",
            "invalid label name",
        ),
        (
            format!(
                "{good}path_labels = '/(?P<a>.)(?P<b>.)(?P<c>.)(?P<d>.)(?P<e>.)(?P<f>.)(?P<g>.)(?P<h>.)(?P<i>.)(?P<j>.)(?P<k>.)(?P<l>.)(?P<m>.)(?P<n>.)'\n"
            ),
            "sources[0].labels",
            "exceed Loki's default limit",
        ),
    ];
    for (config, key, reason) in cases {
        let (code, out) = check(&env, &config);
        assert_eq!(code, 2, "expected exit 2 for {key}: {out}");
        assert!(
            out.contains(&format!(": {key}: ")),
            "expected key {key} in: {out}"
        );
        assert!(out.contains(reason), "expected {reason:?} in: {out}");
        assert!(out.contains("check.toml"), "names the file: {out}");
    }
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_a_check_error() {
    let env = Env::new();
    let other = env.ca.issue("spiffe://example.org/ztail");
    std::fs::write(env.path("certs/ztail.key"), &other.key_pem).unwrap();
    let (code, out) = check(&env, &env.config("https://127.0.0.1:3100", "", ""));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("ztail.key") || out.contains("ztail.crt"),
        "names the file: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_identity_sink_and_files_of_a_running_ztail() {
    use crate::support::ztail::{LOKI_ID, Ztail, append_lines};
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "st", 0..10);
    assert!(rx.wait_for(|e| e.len() >= 10, crate::WAIT).await);
    let mut out = String::new();
    // The committed offset reaches the file size once the checkpointer has seen the ack.
    for _ in 0..100 {
        let o = Command::new(env!("CARGO_BIN_EXE_ztail"))
            .args(["status", "--addr", &zt.admin.to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out = String::from_utf8_lossy(&o.stdout).into_owned();
        if out.contains("  READY\n") && out.contains(" 0B  ") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(out.contains("  READY\n"), "{out}");
    assert!(
        out.contains("identity  spiffe://example.org/ztail"),
        "{out}"
    );
    assert!(out.contains(&log.display().to_string()), "{out}");
    assert!(out.contains("sink      ok"), "{out}");

    // A ztail that is not there gives a clear error, not a stack trace.
    let o = Command::new(env!("CARGO_BIN_EXE_ztail"))
        .args(["status", "--addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is ztail running"));
}

/// `ztail check` refuses what would break the trust promise and warns about what weakens it,
/// without ever printing a secret back.
#[test]
fn check_refuses_remote_workload_apis_and_passwords_and_warns_about_weak_trust() {
    let env = Env::new();
    let good = env.config("https://127.0.0.1:3100", "", "");
    let files_identity = "source = \"files\"\ncert = \"certs/ztail.crt\"\nkey = \"certs/ztail.key\"\nbundle = \"certs/ca.crt\"";
    let spiffe = |socket: &str| {
        good.replace(
            files_identity,
            &format!("source = \"spiffe\"\nsocket = \"{socket}\""),
        )
    };

    // The Workload API is plaintext gRPC: over TCP only on loopback.
    let (code, out) = check(&env, &spiffe("tcp://10.0.0.5:8081"));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("identity.socket") && out.contains("not on loopback"),
        "{out}"
    );
    let (code, out) = check(&env, &spiffe("tcp://127.0.0.1:8081"));
    assert_eq!(code, 0, "{out}");

    // A socket in a directory others can write: they could replace it.
    let sockets = env.path("sockets");
    std::fs::create_dir(&sockets).unwrap();
    std::fs::set_permissions(
        &sockets,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let (code, out) = check(
        &env,
        &spiffe(&format!("unix://{}/api.sock", sockets.display())),
    );
    assert_eq!(code, 0, "a warning, not an error: {out}");
    assert!(
        out.contains("socket's directory") && out.contains("could replace the socket"),
        "{out}"
    );

    // A password in the push URL is refused and never printed back.
    let (code, out) = check(
        &env,
        &good.replace(
            "https://127.0.0.1:3100",
            "https://loki:hunter2@127.0.0.1:3100",
        ),
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("sink.url") && !out.contains("hunter2"),
        "{out}"
    );

    // Any workload of the trust domain may act as Loki: valid, but said.
    let (code, out) = check(
        &env,
        &good.replace(
            "allowed_ids = [\"spiffe://example.org/loki\"]",
            "allowed_trust_domains = [\"example.org\"]",
        ),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("allows any workload of trust domain"), "{out}");
    let (_, out) = check(&env, &good);
    assert!(!out.contains("allows any workload"), "{out}");
}

#[test]
fn several_sinks_show_which_sources_each_gets() {
    let env = Env::new();
    let config = env
        .config("https://127.0.0.1:3100", "", "")
        .replace("[sink]\n", "[[sinks]]\nname = \"ops\"\n")
        .replace("[sink.peer]", "[sinks.peer]")
        + r#"
[[sources]]
name = "audit"
include = ["audit/*.log"]
labels = { job = "audit" }
sinks = ["security"]

[[sinks]]
name = "security"
url = "https://10.0.0.9:3100/loki/api/v1/push"
[sinks.peer]
allowed_ids = ["spiffe://example.org/loki-security"]
"#;
    let (code, out) = check(&env, &config);
    assert_eq!(code, 0, "{out}");
    let ops = "(https://127.0.0.1:3100/loki/api/v1/push)";
    let sec = "(https://10.0.0.9:3100/loki/api/v1/push)";
    assert!(
        out.contains(&format!("  app -> ops {ops} -> (no tenant)\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("  app -> security {sec} -> (no tenant)\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("  audit -> security {sec} -> (no tenant)\n")),
        "{out}"
    );
    assert!(!out.contains("audit -> ops"), "{out}");

    // Tenants bound to peers: the matrix names them, and a route that could send the
    // security sink an unbound tenant (or none) is refused.
    let bound = config.replace(
        "name = \"security\"\n",
        "name = \"security\"\ntenant = \"sec\"\ntenants = { sec = [\"spiffe://example.org/loki-security\"] }\n",
    ) + "[[sources.stages]]\ntype = \"json\"\nfields = [\"team\"]\n[[sources.stages]]\ntype = \"tenant\"\nfield = \"team\"\nmap = { a = \"sec\", b = \"team-b\" }\ndefault = \"sec\"\n";
    let (code, out) = check(&env, &bound.replace(", b = \"team-b\"", ""));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "  audit -> security {sec} -> sec (only to spiffe://example.org/loki-security)\n"
        )),
        "{out}"
    );
    let (code, out) = check(&env, &bound);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("sinks[1].tenants: source \"audit\" may send sink \"security\"")
            && out.contains("tenant \"team-b\" is not bound to a peer"),
        "{out}"
    );
    let (code, out) = check(&env, &bound.replace("tenant = \"sec\"\n", ""));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("source \"app\" may send sink \"security\""),
        "{out}"
    );
    assert!(out.contains("entries without a tenant"), "{out}");
    let (code, out) = check(
        &env,
        &bound.replace(
            "sec = [\"spiffe://example.org/loki-security\"]",
            "sec = [\"spiffe://example.org/elsewhere\"]",
        ),
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(
            "sinks[1].tenants.sec: spiffe://example.org/elsewhere is not allowed by sinks[1].peer"
        ),
        "{out}"
    );
}
