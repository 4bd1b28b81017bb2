//! The deployment files (which cannot run here: no Docker engine, no cluster) are checked
//! against the configs they ship and the tested SPIRE configs.

use std::path::Path;

use ztail::config::Config;
use ztail::identity::config::IdentityConfig;

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn load(rel: &str) -> Config {
    Config::load(&repo(rel)).unwrap_or_else(|e| panic!("{e}"))
}

fn socket_dir(c: &Config) -> String {
    let IdentityConfig::Spiffe(w) = &c.identity else {
        panic!("expected a spiffe identity")
    };
    let path = w.endpoint.strip_prefix("unix://").unwrap();
    Path::new(path).parent().unwrap().display().to_string()
}

#[test]
fn every_shipped_config_is_valid() {
    for rel in [
        "config.toml",
        "deploy/compose/ztail.toml",
        "deploy/kubernetes/ztail.toml",
    ] {
        load(rel);
    }
}

#[test]
fn the_daemonset_mounts_what_its_config_uses() {
    let c = load("deploy/kubernetes/ztail.toml");
    let ds = read("deploy/kubernetes/daemonset.yaml");
    assert!(
        ds.contains(&format!("mountPath: {}", socket_dir(&c))),
        "Workload API socket dir"
    );
    assert!(
        ds.contains(&format!("mountPath: {}", c.state_dir.display())),
        "state dir"
    );
    assert!(
        ds.contains("mountPath: /var/log/pods, readOnly: true"),
        "logs read-only"
    );
    assert!(
        c.sources[0]
            .include
            .iter()
            .all(|g| g.starts_with("/var/log/pods/"))
    );
    // The journal source reads the host's journal directories, mounted read-only.
    let journal = c
        .sources
        .iter()
        .find_map(|s| s.journal.as_ref())
        .expect("a journal source");
    for dir in &journal.directories {
        assert!(
            ds.contains(&format!("mountPath: {}, readOnly: true", dir.display())),
            "journal directory {} mounted read-only",
            dir.display()
        );
    }
    assert!(ds.contains("mountPath: /etc/ztail") && ds.contains("\"/etc/ztail/ztail.toml\""));
    assert!(
        ds.contains(&c.admin.listen.to_string()),
        "probe uses the admin address"
    );
    assert!(ds.contains("readOnlyRootFilesystem: true"));
    // Kubernetes metadata: the node's name from the downward API, and exactly the RBAC the
    // tests grant against the real API server (get, list, watch on pods and namespaces).
    assert!(c.kubernetes.is_some());
    assert!(ds.contains("name: NODE_NAME") && ds.contains("fieldPath: spec.nodeName"));
    assert!(ds.contains("resources: [\"pods\", \"namespaces\"]"));
    assert!(ds.contains("verbs: [\"get\", \"list\", \"watch\"]"));
    assert!(ds.contains("serviceAccountName: ztail") && ds.contains("kind: ClusterRoleBinding"));
}

#[test]
fn the_compose_file_matches_its_config_and_the_tested_spire_configs() {
    let c = load("deploy/compose/ztail.toml");
    let compose = read("docker-compose.yml");
    assert!(compose.contains(&format!("spire-sockets:{}", socket_dir(&c))));
    assert!(compose.contains(&format!("ztail-state:{}", c.state_dir.display())));
    assert!(compose.contains("./deploy/compose/ztail.toml:/etc/ztail/ztail.toml:ro"));
    assert!(compose.contains("logs:/logs:ro") && c.sources[0].include == ["/logs/*.log"]);
    assert_eq!(c.sink().url.host_str(), Some("terminator"));
    assert!(
        compose.contains(&format!("\"0.0.0.0:{}\"", c.sink().url.port().unwrap())),
        "terminator port"
    );
    // The SPIRE containers run the very configs the tests run, and the entries of spire/register.
    assert!(compose.contains("./spire/server.conf:") && compose.contains("./spire/agent.conf:"));
    assert!(compose.contains("./spire/register:"));
    let register = read("spire/register");
    let IdentityConfig::Spiffe(w) = &c.identity else {
        unreachable!()
    };
    assert!(register.contains(&format!(
        "entry spiffe://example.org/ztail {}",
        w.hint.as_deref().unwrap()
    )));
    assert!(
        c.sink()
            .policy
            .ids()
            .iter()
            .any(|id| register.contains(&format!("entry {id} loki")))
    );
}

#[test]
fn the_demo_config_matches_the_demo_script() {
    let c = load("config.toml");
    let demo = read("scripts/demo");
    assert!(socket_dir(&c).ends_with(".demo/spire/agent/public"));
    assert!(demo.contains("term_port=3100") && c.sink().url.port() == Some(3100));
    assert!(
        demo.contains("job:=demo")
            && c.sources[0]
                .labels
                .iter()
                .any(|(k, v)| k == "job" && v == "demo")
    );
}

#[test]
fn the_dockerfile_is_multi_stage_and_non_root() {
    let d = read("deploy/Dockerfile");
    assert_eq!(
        d.matches("\nFROM ").count() + usize::from(d.starts_with("FROM ")),
        2,
        "two stages"
    );
    assert!(d.contains("USER nonroot"));
    assert!(d.contains("cargo build --release --locked"));
}
