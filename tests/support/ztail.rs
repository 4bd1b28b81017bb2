//! Runs the real `ztail` binary in a fresh temp dir with a throwaway PKI, and talks to its
//! admin endpoint.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pki::{Ca, Leaf};
use super::receiver::{Receiver, ReceiverOpts};

pub const LOKI_ID: &str = "spiffe://example.org/loki";
pub const ZTAIL_ID: &str = "spiffe://example.org/ztail";

/// A temp dir with `certs/` (CA bundle, ztail's SVID), `logs/` and a place for state.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub client: Leaf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("example.org");
        let client = ca.issue(ZTAIL_ID);
        fs::create_dir_all(dir.path().join("certs")).unwrap();
        fs::create_dir_all(dir.path().join("logs")).unwrap();
        ca.write_bundle(&dir.path().join("certs"), "ca");
        client.write(&dir.path().join("certs"), "ztail");
        Env { dir, ca, client }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A receiver presenting `spiffe_id`, issued by this env's CA, trusting ztail's CA.
    pub async fn receiver(&self, spiffe_id: &str) -> Receiver {
        let leaf = self.ca.issue(spiffe_id);
        Receiver::start(ReceiverOpts::new(&leaf, &self.ca)).await
    }

    /// A config for the receiver at `url` with test-friendly timings; `extra` is appended as-is
    /// (more tables, or keys for the last `[[sources]]` table).
    pub fn config(&self, url: &str, sink_extra: &str, source_extra: &str) -> String {
        format!(
            r#"state_dir = "state"
host_label = false
[log]
level = "info"
[identity]
source = "files"
cert = "certs/ztail.crt"
key = "certs/ztail.key"
bundle = "certs/ca.crt"
[sink]
url = "{url}/loki/api/v1/push"
batch_wait = "100ms"
min_backoff = "50ms"
max_backoff = "1s"
shutdown_timeout = "5s"
{sink_extra}
[sink.peer]
allowed_ids = ["{LOKI_ID}"]
[tail]
rescan_interval = "500ms"
checkpoint_interval = "100ms"
[[sources]]
name = "app"
include = ["logs/*.log"]
start_at = "beginning"
rotate_wait = "1s"
partial_line_timeout = "1s"
labels = {{ job = "app" }}
{source_extra}
"#
        )
    }
}

/// The identity block of [`Env::config`].
const FILES_IDENTITY: &str = "source = \"files\"\ncert = \"certs/ztail.crt\"\nkey = \"certs/ztail.key\"\nbundle = \"certs/ca.crt\"";

/// `config` with its identity taken from the Workload API at `endpoint` instead of PEM files.
pub fn with_workload_api(config: &str, endpoint: &str, hint: Option<&str>) -> String {
    assert!(
        config.contains(FILES_IDENTITY),
        "not a config made by Env::config"
    );
    let hint = hint
        .map(|h| format!("\nhint = \"{h}\""))
        .unwrap_or_default();
    config.replace(
        FILES_IDENTITY,
        &format!("source = \"spiffe\"\nsocket = \"{endpoint}\"{hint}"),
    )
}

/// A plain HTTP/1.1 GET: (status code, body); (0, "") if nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "").await
}

/// A plain HTTP/1.1 request with no body; `headers` are extra header lines, each ending in
/// `\r\n`.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or(("", ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (code, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Appends `line-<prefix>-<n>` lines for n in `range` to a file.
pub fn append_lines(path: &Path, prefix: &str, range: std::ops::Range<usize>) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut buf = String::new();
    for n in range {
        buf.push_str(&format!("{prefix} {n:08}\n"));
    }
    f.write_all(buf.as_bytes()).unwrap();
}

/// Gives a whole tree to `uid` (and gid `uid`).
pub fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in fs::read_dir(path).unwrap().flatten() {
            chown_tree(&entry.path(), uid);
        }
    }
}

/// Appends `text` to a file, creating it and its directories.
pub fn append_text(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// The checkpoints persisted in `state_dir`: (path, offset) per file. What a restart would
/// resume from.
pub fn checkpoints(state_dir: &Path) -> Vec<(String, u64)> {
    let text = fs::read_to_string(state_dir.join("checkpoints.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(_, json)| serde_json::from_str::<serde_json::Value>(json).ok())
        .filter_map(|v| Some((v["path"].as_str()?.to_owned(), v["offset"].as_u64()?)))
        .collect()
}

/// The highest offset persisted in `state_dir` (0 if none).
pub fn checkpointed_offset(state_dir: &Path) -> u64 {
    checkpoints(state_dir)
        .into_iter()
        .map(|(_, o)| o)
        .max()
        .unwrap_or(0)
}

/// ztail's log level in tests unless a test asks for another.
const RUST_LOG: &str = "info,ztail=debug";

/// A running ztail process.
pub struct Ztail {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub log_path: PathBuf,
    /// Logs of the runs before the last `restart`, checked for key material too.
    earlier_logs: Vec<PathBuf>,
    pub config_path: PathBuf,
    rust_log: String,
    /// Runs as this uid (and gid) when set.
    user: Option<u32>,
    /// Environment variables set for ztail (every run).
    vars: Vec<(String, String)>,
    /// Arguments after `run -c FILE` (every run).
    args: Vec<String>,
    /// Strings that must never appear in ztail's output (see [`key_needles`]).
    pub secrets: Vec<String>,
}

/// Strings that would show a private key in a log: the PEM armour, each base64 line of the
/// key, and a slice of its bytes in hex and in Rust's `Debug` list notation.
pub fn key_needles(key_pem: &str) -> Vec<String> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let mut needles = vec!["PRIVATE KEY".to_owned()];
    needles.extend(
        key_pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_owned),
    );
    if let Ok(der) = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
        let bytes = der.secret_der();
        let mid = &bytes[bytes.len() / 2..][..16.min(bytes.len() / 2)];
        needles.push(mid.iter().map(|b| format!("{b:02x}")).collect());
        needles.push(mid.iter().map(u8::to_string).collect::<Vec<_>>().join(", "));
    }
    needles
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Ztail {
    /// Writes `config` (plus an admin address) to `ztail.toml` in the env and starts ztail.
    pub fn start(env: &Env, config: &str) -> Ztail {
        Ztail::start_logging(env, config, RUST_LOG)
    }

    /// [`Ztail::start`] as an unprivileged user (uid and gid `uid`, via `setpriv`): the test
    /// suite runs as root, which no file permission stops.
    pub fn start_as(env: &Env, config: &str, uid: u32) -> Ztail {
        Ztail::start_full(env, config, RUST_LOG, Some(uid))
    }

    /// [`Ztail::start`] with this `RUST_LOG`.
    pub fn start_logging(env: &Env, config: &str, rust_log: &str) -> Ztail {
        Ztail::start_full(env, config, rust_log, None)
    }

    /// [`Ztail::start`] with these environment variables set (for this run and restarts).
    pub fn start_with_vars(env: &Env, config: &str, vars: &[(&str, &str)]) -> Ztail {
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ztail::start_full_vars(env, config, RUST_LOG, None, vars, Vec::new())
    }

    fn start_full(env: &Env, config: &str, rust_log: &str, user: Option<u32>) -> Ztail {
        Ztail::start_full_vars(env, config, rust_log, user, Vec::new(), Vec::new())
    }

    fn start_full_vars(
        env: &Env,
        config: &str,
        rust_log: &str,
        user: Option<u32>,
        vars: Vec<(String, String)>,
        args: Vec<String>,
    ) -> Ztail {
        let port = free_port();
        let config_path = env.path("ztail.toml");
        fs::write(
            &config_path,
            format!("{config}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n"),
        )
        .unwrap();
        if let Some(uid) = user {
            chown_tree(env.dir.path(), uid);
        }
        let mut zt = Ztail::start_with(&config_path, port, rust_log, user, vars, args);
        zt.add_secret_key(&env.client.key_pem);
        zt
    }

    fn start_with(
        config_path: &Path,
        port: u16,
        rust_log: &str,
        user: Option<u32>,
        vars: Vec<(String, String)>,
        args: Vec<String>,
    ) -> Ztail {
        let dir = config_path.parent().unwrap();
        let n = fs::read_dir(dir).unwrap().count();
        let log_path = dir.join(format!("ztail-{n}.log"));
        let log = fs::File::create(&log_path).unwrap();
        let mut cmd = match user {
            None => Command::new(env!("CARGO_BIN_EXE_ztail")),
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg(env!("CARGO_BIN_EXE_ztail"));
                c
            }
        };
        let child = cmd
            .arg("run")
            .arg("-c")
            .arg(config_path)
            .args(&args)
            .env("RUST_LOG", rust_log)
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ztail");
        Ztail {
            child: Some(child),
            admin: SocketAddr::from(([127, 0, 0, 1], port)),
            log_path,
            earlier_logs: Vec::new(),
            config_path: config_path.to_owned(),
            rust_log: rust_log.to_owned(),
            secrets: Vec::new(),
            user,
            vars,
            args,
        }
    }

    /// [`Ztail::start`] with these arguments after `run -c FILE` (for this run and restarts).
    pub fn start_with_args(env: &Env, config: &str, args: &[&str]) -> Ztail {
        let args = args.iter().map(|a| a.to_string()).collect();
        Ztail::start_full_vars(env, config, RUST_LOG, None, Vec::new(), args)
    }

    /// Starts ztail again with the same config and admin port.
    pub fn restart(&mut self) {
        let port = self.admin.port();
        let secrets = std::mem::take(&mut self.secrets);
        let mut earlier = std::mem::take(&mut self.earlier_logs);
        earlier.push(self.log_path.clone());
        let rust_log = self.rust_log.clone();
        let vars = std::mem::take(&mut self.vars);
        let args = std::mem::take(&mut self.args);
        *self = Ztail::start_with(
            &self.config_path.clone(),
            port,
            &rust_log,
            self.user,
            vars,
            args,
        );
        self.secrets = secrets;
        self.earlier_logs = earlier;
    }

    /// Adds a private key (PEM) that ztail may hold and must never show.
    pub fn add_secret_key(&mut self, key_pem: &str) {
        self.secrets.extend(key_needles(key_pem));
    }

    /// Panics if ztail's output so far, over every run of this harness, shows any of
    /// [`Ztail::secrets`].
    pub fn assert_no_key_material(&self) {
        for path in self.earlier_logs.iter().chain([&self.log_path]) {
            let log = fs::read_to_string(path).unwrap_or_default();
            for needle in &self.secrets {
                assert!(
                    !log.contains(needle.as_str()),
                    "ztail's log {} shows key material ({}…)",
                    path.display(),
                    &needle[..needle.len().min(12)]
                );
            }
        }
    }

    /// The pid, or None after `kill`/`terminate`.
    pub fn pid_if_running(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "ztail did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    fs::read_to_string(&self.log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident set size in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Replaces the config file ztail runs with (keeping its admin address); ztail reads it
    /// at its next reload or restart.
    pub fn write_config(&self, config: &str) {
        // Whole or not at all, as an editor or a ConfigMap update writes it: `--watch-config`
        // must not see half a file.
        let tmp = self.config_path.with_extension("toml.new");
        fs::write(
            &tmp,
            format!("{config}\n[admin]\nlisten = \"{}\"\n", self.admin),
        )
        .unwrap();
        fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Sends SIGHUP (reload).
    pub fn hup(&self) {
        let st = Command::new("kill")
            .arg("-HUP")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// POST on the admin endpoint: (status code, body).
    pub async fn post(&self, path: &str) -> (u16, String) {
        http_request(self.admin, "POST", path, "").await
    }

    /// GET on the admin endpoint: (status code, body). Errors while it starts give (0, "").
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// The value of a metric sample line that starts with `prefix` (e.g.
    /// `ztail_peer_refusals_total{reason="id_not_allowed"}`), or 0.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until the metric sample `prefix` satisfies `ok`; returns its value.
    pub async fn wait_metric(&self, prefix: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.metric(prefix).await;
            if ok(v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{prefix} stayed at {v}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until ztail's log contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} never logged; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The file's (read offset, committed offset) in `/status` (in memory, not yet persisted).
    pub async fn offsets(&self, path: &Path) -> Option<(u64, u64)> {
        let (_, body) = self.get("/status").await;
        let status: serde_json::Value = serde_json::from_str(&body).ok()?;
        let file = status["files"]
            .as_array()?
            .iter()
            .find(|f| f["path"].as_str() == Some(&path.display().to_string()))?
            .clone();
        Some((
            file["read_offset"].as_u64()?,
            file["committed_offset"].as_u64()?,
        ))
    }

    /// Waits until ztail has read `path` to its current end (so what is written next arrives in
    /// a later read).
    pub async fn wait_read_to_end(&self, path: &Path) {
        let size = fs::metadata(path).unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.offsets(path).await.map(|o| o.0) != Some(size) {
            assert!(
                Instant::now() < deadline,
                "{} never read to {size}: {:?}",
                path.display(),
                self.offsets(path).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the admin endpoint answers.
    pub async fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.get("/healthz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "ztail admin never came up; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Ztail {
    fn drop(&mut self) {
        self.kill();
        // Every test that runs ztail also checks that its output never showed the key.
        if !std::thread::panicking() {
            self.assert_no_key_material();
        } else {
            eprintln!(
                "---- ztail log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}
