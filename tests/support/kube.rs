//! A real Kubernetes control plane for tests: etcd and kube-apiserver (built by
//! `scripts/tools`) on loopback in a temp dir, with RBAC on, a static admin token for the test
//! and service-account tokens for ztail. No kubelet or controller-manager: the test creates
//! namespaces, service accounts and pods (with `spec.nodeName`) through the API itself.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::spire::bin_dir;
use super::ztail::free_port;

pub const NODE: &str = "node-1";
const ADMIN_TOKEN: &str = "ztail-test-admin-token";

pub struct Kube {
    pub dir: tempfile::TempDir,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    port: u16,
    etcd_port: u16,
}

impl Kube {
    /// Starts etcd and kube-apiserver and waits until the API answers.
    pub async fn start() -> Kube {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        fs::write(dir.path().join("sa.key"), key.serialize_pem()).unwrap();
        fs::write(dir.path().join("sa.pub"), key.public_key_pem()).unwrap();
        fs::write(
            dir.path().join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,system:masters\n"),
        )
        .unwrap();
        fs::write(dir.path().join("admin.token"), ADMIN_TOKEN).unwrap();
        let mut k = Kube {
            dir,
            etcd: None,
            apiserver: None,
            port: free_port(),
            etcd_port: free_port(),
        };
        k.start_etcd();
        k.start_apiserver().await;
        k
    }

    fn log(&self, name: &str) -> fs::File {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    fn start_etcd(&mut self) {
        let peer = free_port();
        let url = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin_dir().join("etcd"))
            .args(["--data-dir", &self.path("etcd").display().to_string()])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(self.log("etcd"))
            .spawn()
            .expect("start etcd (scripts/tools builds it)");
        self.etcd = Some(child);
    }

    /// Starts (or restarts) the API server on its port and waits for `/readyz`.
    pub async fn start_apiserver(&mut self) {
        let d = |name: &str| self.path(name).display().to_string();
        let child = Command::new(bin_dir().join("kube-apiserver"))
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.etcd_port
            ))
            .arg(format!("--secure-port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--cert-dir={}", d("certs")))
            .arg(format!("--token-auth-file={}", d("tokens.csv")))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-key-file={}", d("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d("sa.key")
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--v=1")
            .stdout(Stdio::null())
            .stderr(self.log("apiserver"))
            .spawn()
            .expect("start kube-apiserver (scripts/tools builds it)");
        self.apiserver = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self.ca_file().exists()
                && let Ok(c) = self.client_with(&self.path("admin.token")).await
                && c.apiserver_version().await.is_ok()
                && Api::<Namespace>::all(c.clone())
                    .get("default")
                    .await
                    .is_ok()
            {
                return;
            }
            let exited = self
                .apiserver
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "kube-apiserver not ready ({exited:?}); its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Kills the API server (etcd keeps its data).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The self-signed serving certificate (and its CA) the API server made in `--cert-dir`.
    pub fn ca_file(&self) -> PathBuf {
        self.path("certs/apiserver.crt")
    }

    pub fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "---- apiserver ----\n{}\n---- etcd ----\n{}",
            tail("apiserver"),
            tail("etcd")
        )
    }

    async fn client_with(&self, token_file: &std::path::Path) -> Result<Client, String> {
        let url: http::Uri = self.url().parse().unwrap();
        let mut cfg = kube::Config::new(url);
        let pem = fs::read(self.ca_file()).map_err(|e| e.to_string())?;
        let roots = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
            .map(|c: Result<rustls::pki_types::CertificateDer, _>| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        cfg.root_cert = Some(roots);
        cfg.auth_info.token_file = Some(token_file.display().to_string());
        Client::try_from(cfg).map_err(|e| e.to_string())
    }

    /// A client with the admin token.
    pub async fn admin(&self) -> Client {
        self.client_with(&self.path("admin.token")).await.unwrap()
    }

    /// A namespace with labels (unless it exists) and its `default` service account (no
    /// controller makes it).
    pub async fn namespace(&self, name: &str, labels: serde_json::Value) {
        let c = self.admin().await;
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
        match Api::<Namespace>::all(c.clone())
            .create(&PostParams::default(), &ns)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {} // made by an earlier call
            Err(e) => panic!("create namespace {name}: {e}"),
        }
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
        let _ = Api::<ServiceAccount>::namespaced(c, name)
            .create(&PostParams::default(), &sa)
            .await;
    }

    /// ztail's service account with exactly the RBAC of `deploy/kubernetes/` (get, list, watch
    /// on pods and namespaces), and a token for it bound to a new Secret `secret` (deleting the
    /// Secret revokes the token), written to `token_file`.
    pub async fn ztail_token(&self, secret: &str, token_file: &std::path::Path) {
        let c = self.admin().await;
        self.namespace("ztail", json!({})).await;
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "ztail"}})).unwrap();
        let _ = Api::<ServiceAccount>::namespaced(c.clone(), "ztail")
            .create(&PostParams::default(), &sa)
            .await;
        let role: ClusterRole = serde_json::from_value(json!({
            "metadata": {"name": "ztail"},
            "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]}]
        }))
        .unwrap();
        let _ = Api::<ClusterRole>::all(c.clone())
            .create(&PostParams::default(), &role)
            .await;
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "ztail"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ztail"},
            "subjects": [{"kind": "ServiceAccount", "name": "ztail", "namespace": "ztail"}]
        }))
        .unwrap();
        let _ = Api::<ClusterRoleBinding>::all(c.clone())
            .create(&PostParams::default(), &binding)
            .await;
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": secret}, "type": "Opaque"}))
                .unwrap();
        let s = Api::<Secret>::namespaced(c.clone(), "ztail")
            .create(&PostParams::default(), &s)
            .await
            .unwrap();
        let req = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": secret, "uid": s.metadata.uid}
            }
        });
        let body = serde_json::to_vec(&req).unwrap();
        let http_req = http::Request::post("/api/v1/namespaces/ztail/serviceaccounts/ztail/token")
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let resp: serde_json::Value = c.request(http_req).await.unwrap();
        let token = resp["status"]["token"]
            .as_str()
            .expect("a token")
            .to_owned();
        let tmp = token_file.with_extension("new");
        fs::write(&tmp, token).unwrap();
        fs::rename(&tmp, token_file).unwrap();
    }

    /// Revokes the tokens bound to `secret`.
    pub async fn delete_secret(&self, secret: &str) {
        Api::<Secret>::namespaced(self.admin().await, "ztail")
            .delete(secret, &DeleteParams::default())
            .await
            .unwrap();
    }

    /// Creates a pod on [`NODE`] with `labels`, `annotations` and one container `app` (image
    /// `image`), owned by ReplicaSet `<name-prefix>` when `owner` is set; returns its UID.
    pub async fn pod(
        &self,
        ns: &str,
        name: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
        owner: Option<&str>,
    ) -> String {
        let owners = match owner {
            Some(rs) => json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]),
            None => json!([]),
        };
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations,
                "ownerReferences": owners},
            "spec": {"nodeName": NODE, "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": format!("registry.example/{name}:1.0")}]}
        }))
        .unwrap();
        let pod = Api::<Pod>::namespaced(self.admin().await, ns)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
        pod.metadata.uid.unwrap()
    }

    pub async fn label_pod(&self, ns: &str, name: &str, labels: serde_json::Value) {
        Api::<Pod>::namespaced(self.admin().await, ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await
            .unwrap();
    }

    /// Deletes a pod at once (no kubelet would confirm a graceful deletion).
    pub async fn delete_pod(&self, ns: &str, name: &str) {
        Api::<Pod>::namespaced(self.admin().await, ns)
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The kubelet's path of a container's log, under `root`.
pub fn log_path(root: &std::path::Path, ns: &str, pod: &str, uid: &str) -> PathBuf {
    let dir = root.join(format!("pods/{ns}_{pod}_{uid}/app"));
    fs::create_dir_all(&dir).unwrap();
    dir.join("0.log")
}

/// CRI lines (`<time> stdout F <text>`).
pub fn cri(lines: &[String]) -> String {
    cri_at("2026-12-04T00:00:00.000000000Z", lines)
}

/// CRI lines written at `time` (RFC 3339).
pub fn cri_at(time: &str, lines: &[String]) -> String {
    let mut out = String::new();
    for l in lines {
        out.push_str(&format!("{time} stdout F {l}\n"));
    }
    out
}
