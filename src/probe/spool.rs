//! The per-probe spool: results appended as JSON lines, rotated by size (rename, so the tailer
//! drains the old file through its open descriptor), at most one rotated file kept by name.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Rotate a spool file once it is this big.
const ROTATE_BYTES: u64 = 1 << 20;

pub struct Spool {
    path: PathBuf,
    /// Open for appending; reopened only at rotation, so a result costs one `write`.
    file: File,
    len: u64,
}

impl Spool {
    pub fn new(path: PathBuf) -> std::io::Result<Spool> {
        let named = |e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open the probe spool {}: {e}", path.display()),
            )
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(named)?;
        }
        let file = open(&path).map_err(named)?;
        let len = file.metadata()?.len();
        Ok(Spool { path, file, len })
    }

    /// Appends one line (a newline is added). One `write` per line, so a reader never sees half
    /// of one.
    pub fn append(&mut self, line: &str) -> std::io::Result<()> {
        if self.len >= ROTATE_BYTES {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            fs::rename(&self.path, rotated)?;
            self.file = open(&self.path)?;
            self.len = 0;
        }
        let mut buf = String::with_capacity(line.len() + 1);
        buf.push_str(line);
        buf.push('\n');
        self.file.write_all(buf.as_bytes())?;
        self.len += buf.len() as u64;
        Ok(())
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_rename_once_full_and_loses_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("probes").join("p.log");
        let mut spool = Spool::new(path.clone()).unwrap();
        let line = "x".repeat(1023);
        let n = (ROTATE_BYTES / 1024) as usize + 10;
        for _ in 0..n {
            spool.append(&line).unwrap();
        }
        let old = fs::read_to_string(dir.path().join("probes/p.log.1")).unwrap();
        let new = fs::read_to_string(&path).unwrap();
        assert_eq!(
            old.len() as u64,
            ROTATE_BYTES,
            "rotated exactly at the size limit"
        );
        assert_eq!(old.lines().count() + new.lines().count(), n);
        // A restarted ztail appends to the existing file and knows its size.
        drop(spool);
        let mut spool = Spool::new(path.clone()).unwrap();
        spool.append("after restart").unwrap();
        assert!(
            fs::read_to_string(&path)
                .unwrap()
                .ends_with("after restart\n")
        );
    }
}
