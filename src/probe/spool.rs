//! The per-probe spool: results appended as JSON lines, rotated by size (rename, so the tailer
//! drains the old file through its open descriptor), at most one rotated file kept by name.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

/// Rotate a spool file once it is this big.
const ROTATE_BYTES: u64 = 1 << 20;

pub struct Spool {
    path: PathBuf,
}

impl Spool {
    pub fn new(path: PathBuf) -> std::io::Result<Spool> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        Ok(Spool { path })
    }

    /// Appends one line (a newline is added). One `write` per line, so a reader never sees half
    /// of one.
    pub fn append(&self, line: &str) -> std::io::Result<()> {
        if fs::metadata(&self.path)
            .map(|m| m.len() >= ROTATE_BYTES)
            .unwrap_or(false)
        {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            fs::rename(&self.path, rotated)?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut buf = String::with_capacity(line.len() + 1);
        buf.push_str(line);
        buf.push('\n');
        f.write_all(buf.as_bytes())
    }
}
