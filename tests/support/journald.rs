//! A real systemd-journald for the journal source's tests: Debian's `systemd-journald`, run
//! standalone in a namespace of its own (`/run/systemd/journal.NS/socket` in,
//! `/var/log/journal/<machine-id>.NS/` out), so that tests running at once do not meet.
//! Entries are sent with journald's native protocol. Needs root; `.ci/run` installs the
//! `systemd` package where it is missing. Stopped and removed on drop.
#![allow(dead_code)]

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const JOURNALD: &str = "/lib/systemd/systemd-journald";

/// A running journald in its own namespace.
pub struct Journald {
    pub namespace: String,
    /// Where it writes its journal files.
    pub dir: PathBuf,
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
}

impl Journald {
    /// Starts journald in namespace `ztail-<tag>-<pid>`, without rate limits, with files of
    /// `max_file` bytes at most (journald rotates on its own past it).
    pub fn start(tag: &str, max_file: &str) -> Journald {
        assert!(
            Path::new(JOURNALD).exists(),
            "{JOURNALD} is missing: install Debian's systemd package (.ci/run does)"
        );
        assert!(
            rustix_is_root(),
            "the journal tests run systemd-journald, which needs root"
        );
        let namespace = format!("ztail-{tag}-{}", std::process::id());
        let machine = fs::read_to_string("/etc/machine-id")
            .expect("/etc/machine-id (journald names its directory after it)")
            .trim()
            .to_owned();
        fs::create_dir_all("/var/log/journal").unwrap();
        let dir = PathBuf::from(format!("/var/log/journal/{machine}.{namespace}"));
        let _ = fs::remove_dir_all(&dir);
        let conf = PathBuf::from(format!("/etc/systemd/journald@{namespace}.conf"));
        fs::create_dir_all("/etc/systemd").unwrap();
        fs::write(
            &conf,
            format!(
                "[Journal]\nStorage=persistent\nRateLimitBurst=0\nSystemMaxFileSize={max_file}\nSystemMaxUse=1G\nCompress=yes\n"
            ),
        )
        .unwrap();
        let log = std::env::temp_dir().join(format!("journald-{namespace}.log"));
        let mut j = Journald {
            namespace,
            dir,
            child: None,
            conf,
            log,
        };
        j.spawn();
        j
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/systemd/journal.{}/socket", self.namespace))
    }

    fn spawn(&mut self) {
        let _ = fs::remove_file(self.socket());
        let out = fs::File::create(&self.log).unwrap();
        let child = Command::new(JOURNALD)
            .arg(&self.namespace)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start systemd-journald");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(self.socket().exists() && self.dir.join("system.journal").exists()) {
            assert!(
                Instant::now() < deadline,
                "journald did not start: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one entry; values may hold any bytes (newlines, NULs, invalid UTF-8).
    pub fn send(&self, fields: &[(&str, &[u8])]) {
        let mut d = Vec::new();
        for (name, value) in fields {
            d.extend_from_slice(name.as_bytes());
            d.push(b'\n');
            d.extend_from_slice(&(value.len() as u64).to_le_bytes());
            d.extend_from_slice(value);
            d.push(b'\n');
        }
        let s = UnixDatagram::unbound().unwrap();
        // The socket's buffer can be full for a moment under a burst.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.send_to(&d, self.socket()) {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("send to journald: {e}"),
            }
        }
    }

    /// Sends `MESSAGE=message` from `SYSLOG_IDENTIFIER=ident` with `PRIORITY=priority`.
    pub fn log(&self, ident: &str, priority: u8, message: &str) {
        self.send(&[
            ("MESSAGE", message.as_bytes()),
            ("SYSLOG_IDENTIFIER", ident.as_bytes()),
            ("PRIORITY", priority.to_string().as_bytes()),
        ]);
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} journald");
    }

    /// Rotates the journal files (what `journalctl --rotate` asks for): waits until the
    /// active file is a new one.
    pub fn rotate(&self) {
        let before = self.archived().len();
        self.signal("USR2");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.archived().len() <= before {
            assert!(Instant::now() < deadline, "journald did not rotate");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Archived files (`system@…journal`), oldest first.
    pub fn archived(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().contains('@'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
        v
    }

    /// Entries journald has written, counted by `journalctl` (waits for `n`).
    pub fn wait_written(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new("journalctl")
                .arg(format!("--namespace={}", self.namespace))
                .args(["-o", "cat", "--no-pager", "-q"])
                .output()
                .unwrap();
            let count = out.stdout.split(|&b| b == b'\n').count() - 1;
            if count >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "journald wrote {count} of {n} entries"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops journald (SIGTERM: it closes its files cleanly) and starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn journald_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.conf);
        let _ = fs::remove_file(&self.log);
        let _ = fs::remove_dir_all(format!("/run/systemd/journal.{}", self.namespace));
    }
}

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}
