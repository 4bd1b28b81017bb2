//! The real Loki-protocol store for end-to-end tests: VictoriaLogs (Apache-2.0, an independent
//! implementation of Loki's push API) in a temp dir on a free port, behind `ztail-terminator`
//! for SPIFFE mutual TLS. Logs are printed when a test fails.
#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::spire::{Spire, bin_dir};
use super::ztail::{free_port, http_get};

/// A running VictoriaLogs.
pub struct VictoriaLogs {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Child,
}

impl VictoriaLogs {
    pub async fn start() -> VictoriaLogs {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = fs::File::create(dir.path().join("victoria-logs.log")).unwrap();
        let child = Command::new(bin_dir().join("victoria-logs"))
            .arg(format!(
                "-storageDataPath={}",
                dir.path().join("data").display()
            ))
            .arg(format!("-httpListenAddr={addr}"))
            // Lines are stored as sent; JSON inside a line is not split into fields.
            .arg("-loki.disableMessageParsing")
            .arg("-retentionPeriod=7d")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start victoria-logs");
        let vl = VictoriaLogs { dir, addr, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while vl.get("/health").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "victoria-logs never became healthy:\n{}",
                vl.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        vl
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("victoria-logs.log")).unwrap_or_default()
    }

    async fn get(&self, path_and_query: &str) -> (u16, String) {
        http_get(self.addr, path_and_query).await
    }

    /// Entries matching a LogsQL query, as JSON objects (`_msg`, `_time`, `_stream` and the
    /// stream's labels as fields), in time order.
    pub async fn query(&self, logsql: &str) -> Vec<serde_json::Value> {
        let q = encode(&format!("{logsql} | sort by (_time)"));
        let (code, body) = self
            .get(&format!("/select/logsql/query?query={q}&limit=1000000"))
            .await;
        assert_eq!(code, 200, "query {logsql:?} failed: {body}");
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until the query returns at least `n` entries; returns them.
    pub async fn wait_for(
        &self,
        logsql: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(logsql).await;
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for VictoriaLogs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- victoria-logs.log (tail) ----\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// `ztail-terminator` in front of a store, with an SVID from SPIRE picked by hint.
pub struct Terminator {
    pub addr: SocketAddr,
    child: Child,
    log_path: std::path::PathBuf,
}

impl Terminator {
    pub async fn start(
        spire: &Spire,
        hint: &str,
        allow_id: &str,
        upstream: SocketAddr,
    ) -> Terminator {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log_path = spire
            .dir
            .path()
            .join(format!("terminator-{hint}-{}.log", addr.port()));
        let log = fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ztail-terminator"))
            .args([
                "--listen",
                &addr.to_string(),
                "--upstream",
                &upstream.to_string(),
            ])
            .args([
                "--allow-id",
                allow_id,
                "--hint",
                hint,
                "--socket",
                &spire.endpoint(),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ztail-terminator");
        let t = Terminator {
            addr,
            child,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "terminator never listened:\n{}",
                t.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- terminator log ----\n{}", self.log());
        }
    }
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
