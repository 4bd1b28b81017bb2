//! Real SPIRE for tests: a server (sqlite, join-token attestation) and an agent (unix workload
//! attestor) in a temp dir, on a free port and private sockets, built by `scripts/tools` and
//! torn down on drop. Their logs are printed when a test fails.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TRUST_DOMAIN: &str = "example.org";
const PARENT_ID: &str = "spiffe://example.org/host";

/// Where the SPIRE binaries are: `$ZTAIL_TOOLS_BIN` (set by `scripts/test`), else built or
/// reused by `scripts/tools` once per test binary.
pub fn bin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("ZTAIL_TOOLS_BIN") {
            return PathBuf::from(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tools");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/tools");
        assert!(out.status.success(), "scripts/tools failed to build SPIRE");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// The uid of this test process (what the unix workload attestor sees for ztail and the
/// receiver alike).
pub fn uid() -> u32 {
    fs::metadata("/proc/self").unwrap().uid()
}

pub struct Spire {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    server: Option<Child>,
    agent: Option<Child>,
    port: u16,
    token: String,
}

impl Spire {
    /// Starts the server and, unless `with_agent` is false, the agent; waits until both are
    /// healthy.
    pub fn start(with_agent: bool) -> Spire {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        for d in [
            "server/private",
            "server/data",
            "agent/public",
            "agent/data",
        ] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = dir.path().display().to_string();
        // The same configs the demo uses (spire/), with this run's directory and port.
        let fill = |template: &str| {
            template
                .replace("@BASE@", &base)
                .replace("@PORT@", &port.to_string())
        };
        fs::write(
            dir.path().join("server.conf"),
            fill(include_str!("../../spire/server.conf")),
        )
        .unwrap();
        fs::write(
            dir.path().join("agent.conf"),
            fill(include_str!("../../spire/agent.conf")),
        )
        .unwrap();
        let mut spire = Spire {
            dir,
            bin,
            server: None,
            agent: None,
            port,
            token: String::new(),
        };
        spire.server = Some(spire.spawn(
            "spire-server",
            &["run", "-config", "server.conf"],
            "server.log",
        ));
        spire.wait_healthy("spire-server", &spire.server_socket());
        let out = spire.server_cmd(&["token", "generate", "-spiffeID", PARENT_ID, "-ttl", "86400"]);
        spire.token = out
            .split_whitespace()
            .skip_while(|w| *w != "Token:")
            .nth(1)
            .unwrap_or_else(|| panic!("no token in {out:?}"))
            .to_owned();
        if with_agent {
            spire.start_agent();
        }
        spire
    }

    pub fn server_socket(&self) -> PathBuf {
        self.dir.path().join("server/private/api.sock")
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("agent/public/api.sock")
    }

    /// The Workload API address for `SPIFFE_ENDPOINT_SOCKET` or `identity.socket`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.agent_socket().display())
    }

    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let token = self.token.clone();
        self.agent = Some(self.spawn(
            "spire-agent",
            &["run", "-config", "agent.conf", "-joinToken", &token],
            "agent.log",
        ));
        self.wait_healthy("spire-agent", &self.agent_socket());
    }

    /// SIGKILL the agent (its data dir keeps its own SVID, so a restart needs no new token).
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Registers a workload entry for this uid; returns the entry ID.
    pub fn create_entry(&self, spiffe_id: &str, hint: &str, x509_ttl_secs: u32) -> String {
        let selector = format!("unix:uid:{}", uid());
        let ttl = x509_ttl_secs.to_string();
        let out = self.server_cmd(&[
            "entry",
            "create",
            "-parentID",
            PARENT_ID,
            "-spiffeID",
            spiffe_id,
            "-selector",
            &selector,
            "-x509SVIDTTL",
            &ttl,
            "-hint",
            hint,
        ]);
        out.lines()
            .find_map(|l| {
                l.strip_prefix("Entry ID")
                    .map(|r| r.trim_start_matches([' ', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no entry ID in {out:?}"))
    }

    pub fn delete_entry(&self, entry_id: &str) {
        self.server_cmd(&["entry", "delete", "-entryID", entry_id]);
    }

    /// The trust bundle (PEM).
    pub fn bundle_pem(&self) -> String {
        self.server_cmd(&["bundle", "show", "-format", "pem"])
    }

    fn server_cmd(&self, args: &[&str]) -> String {
        let socket = self.server_socket();
        let mut full: Vec<&str> = args.to_vec();
        full.push("-socketPath");
        full.push(socket.to_str().unwrap());
        let out = Command::new(self.bin.join("spire-server"))
            .args(&full)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "spire-server {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    fn spawn(&self, program: &str, args: &[&str], log: &str) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(log))
            .unwrap();
        Command::new(self.bin.join(program))
            .args(args)
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"))
    }

    fn wait_healthy(&self, program: &str, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new(self.bin.join(program))
                .args(["healthcheck", "-socketPath"])
                .arg(socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{program} never became healthy; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "---- server.log (tail) ----\n{}\n---- agent.log (tail) ----\n{}",
            tail("server.log"),
            tail("agent.log")
        )
    }
}

impl Drop for Spire {
    fn drop(&mut self) {
        for child in [self.agent.take(), self.server.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
