//! The state directory: a lock file that keeps a second ztail off it, and the checkpoint file
//! that records, per file, the position up to which Loki has acknowledged every line.
//!
//! The checkpoint file is JSON lines, one file per line, each with its own checksum, written
//! atomically (temp file, fsync, rename, fsync of the directory). A damaged line costs that one
//! file its checkpoint (with a warning) and never stops ztail from starting: the file is then
//! read from its beginning, so the failure mode is duplicates, not loss.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::reader::hash;

const FILE_NAME: &str = "checkpoints.jsonl";
const HEADER: &str = "ztail-checkpoints v1";

/// One file's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub dev: u64,
    pub ino: u64,
    /// Where the file was last seen (informational: identity is dev + inode + fingerprint).
    pub path: PathBuf,
    /// Length and hash of the file's first bytes.
    pub head_len: u32,
    pub head_hash: u64,
    pub offset: u64,
    pub tail_len: u32,
    pub tail_hash: u64,
}

/// The held state directory.
pub struct StateDir {
    dir: PathBuf,
    // Held for the lifetime of the process: the lock is released when the file is closed.
    _lock: File,
}

/// What was found in the state directory at start.
pub struct Loaded {
    /// True if no checkpoint file existed: ztail's first start with this state directory.
    pub first_start: bool,
    pub entries: HashMap<(u64, u64), Entry>,
}

impl StateDir {
    /// Creates (if needed) and locks the state directory.
    pub fn open(dir: &Path) -> anyhow::Result<StateDir> {
        // Only ztail's user may read or write its checkpoints (they decide what is re-sent).
        std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open the lock file {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another ztail is using the state directory {} (it holds {}); stop it or give this one its own state_dir",
                dir.display(),
                lock_path.display()
            ),
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
            }
        }
        Ok(StateDir {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads the checkpoint file, skipping (with a warning) any line that is damaged.
    pub fn load(&self) -> Loaded {
        let path = self.dir.join(FILE_NAME);
        let text = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Loaded {
                    first_start: true,
                    entries: HashMap::new(),
                };
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the checkpoint file; every file will be read from its beginning (duplicates possible, nothing lost)");
                return Loaded {
                    first_start: false,
                    entries: HashMap::new(),
                };
            }
        };
        let text = String::from_utf8_lossy(&text);
        let mut entries = HashMap::new();
        let mut damaged = 0;
        for (i, line) in text.lines().enumerate() {
            if i == 0 && line == HEADER || line.is_empty() {
                continue;
            }
            match parse_line(line) {
                Some(e) => {
                    entries.insert((e.dev, e.ino), e);
                }
                None => damaged += 1,
            }
        }
        if damaged > 0 || !text.starts_with(HEADER) {
            tracing::warn!(path = %path.display(), damaged_lines = damaged, "the checkpoint file is damaged; files without a readable checkpoint will be read from their beginning (duplicates possible, nothing lost)");
        }
        Loaded {
            first_start: false,
            entries,
        }
    }

    /// Replaces the checkpoint file atomically.
    pub fn save(&self, entries: &[Entry]) -> io::Result<()> {
        let mut out = String::with_capacity(64 + entries.len() * 160);
        out.push_str(HEADER);
        out.push('\n');
        for e in entries {
            out.push_str(&format_line(e));
            out.push('\n');
        }
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(out.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join(FILE_NAME))?;
        File::open(&self.dir)?.sync_all()
    }
}

/// One checkpoint line: the FNV-1a hash of the JSON, in hex, then the JSON.
pub fn format_line(e: &Entry) -> String {
    // Serializing plain integers and a path cannot fail.
    let json = serde_json::to_string(e).unwrap_or_default();
    format!("{:016x} {json}", hash(json.as_bytes()))
}

/// Parses a line written by [`format_line`]; `None` if it is damaged in any way.
pub fn parse_line(line: &str) -> Option<Entry> {
    let (sum, json) = line.split_once(' ')?;
    let sum = u64::from_str_radix(sum, 16).ok()?;
    if sum != hash(json.as_bytes()) {
        return None;
    }
    serde_json::from_str(json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ino: u64, offset: u64) -> Entry {
        Entry {
            dev: 1,
            ino,
            path: PathBuf::from(format!("/var/log/{ino}.log")),
            head_len: 10,
            head_hash: 7,
            offset,
            tail_len: 4,
            tail_hash: 9,
        }
    }

    #[test]
    fn round_trips_and_survives_damage_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.load().first_start);
        state
            .save(&[entry(1, 100), entry(2, 200), entry(3, 300)])
            .unwrap();
        let loaded = state.load();
        assert!(!loaded.first_start);
        assert_eq!(loaded.entries.len(), 3);
        assert_eq!(loaded.entries[&(1, 2)].offset, 200);

        // Damage the second file's line: only that file loses its checkpoint.
        let path = dir.path().join(FILE_NAME);
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("\"offset\":200", "\"offset\":999");
        fs::write(&path, text).unwrap();
        let loaded = state.load();
        assert_eq!(loaded.entries.len(), 2);
        assert!(!loaded.entries.contains_key(&(1, 2)));

        // Garbage is a warning, not a refusal to start.
        fs::write(&path, b"\0\0\0garbage\xff").unwrap();
        let loaded = state.load();
        assert!(!loaded.first_start);
        assert!(loaded.entries.is_empty());
    }

    #[test]
    fn a_second_ztail_cannot_take_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _held = StateDir::open(dir.path()).unwrap();
        let err = StateDir::open(dir.path())
            .err()
            .expect("second open must fail")
            .to_string();
        assert!(err.contains("another ztail"), "{err}");
    }
}
