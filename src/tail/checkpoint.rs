//! The state directory: a lock file that keeps a second ztail off it, and the checkpoint file
//! that records, per file, the position up to which Loki has acknowledged every line.
//!
//! The checkpoint file is JSON lines, one file per line, each with its own checksum, written
//! atomically (temp file, fsync, rename, fsync of the directory). A damaged line costs that one
//! file its checkpoint (with a warning) and never stops ztail from starting: the file is then
//! read from its beginning, so the failure mode is duplicates, not loss.
//!
//! The checkpoint file is written as soon as the directory is first taken, so its absence means
//! "ztail has never run here" (`start_at` applies) and nothing else. A directory that disappears
//! while ztail runs (a cleanup job, a wrong `rm`) is recreated at the next checkpoint, with its
//! lock, and the positions in memory are written into it; a file that disappears is rewritten.
//! The window in which a crash could still find no checkpoint file is one `checkpoint_interval`.
//!
//! Others must not steer ztail through this directory: it must belong to ztail's user, the lock
//! and the temporary file are never opened through a symlink, and every field read back is
//! bounded before it sizes a read.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::reader::{HEAD_LEN, hash};
use crate::pipeline::TAIL_LEN;

const FILE_NAME: &str = "checkpoints.jsonl";
const HEADER: &str = "ztail-checkpoints v1";
/// The header of a checkpoint file written by `ztail convert promtail-positions`: positions
/// taken over from another shipper, before ztail's first start. Files without one of them
/// start as at a first start (`start_at`); the first load rewrites the file with [`HEADER`],
/// so that only one start is a first start.
const HEADER_IMPORTED: &str = "ztail-checkpoints v1 imported";

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

/// A journal source's position in one journal (one seqnum id): systemd's cursor of the last
/// entry before which Loki acknowledged everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalEntry {
    /// The source's name.
    pub journal: String,
    pub cursor: String,
}

impl JournalEntry {
    /// Whether it fits the bounds a checkpoint line is loaded with.
    pub fn is_bounded(&self) -> bool {
        self.journal.len() <= 1024 && self.cursor.len() <= 512
    }
}

/// The held state directory.
pub struct StateDir {
    dir: PathBuf,
    // Held for the lifetime of the process: the lock is released when the file is closed.
    // Replaced when the directory had to be recreated. Shared by every sink's view.
    lock: Arc<Mutex<File>>,
    /// The checkpoint file of the sink this view is for.
    file: String,
}

/// What was found in the state directory at start.
pub struct Loaded {
    /// True if no checkpoint file existed: ztail's first start with this state directory.
    pub first_start: bool,
    pub entries: HashMap<(u64, u64), Entry>,
    pub journal: Vec<JournalEntry>,
}

impl StateDir {
    /// Creates (if needed) and locks the state directory. Refuses a directory owned by another
    /// user: whoever owns it can rewind ztail (re-sending days of logs) or move it past lines
    /// never sent.
    pub fn open(dir: &Path) -> anyhow::Result<StateDir> {
        let lock = take(dir)?;
        let state = StateDir {
            dir: dir.to_owned(),
            lock: Arc::new(Mutex::new(lock)),
            file: FILE_NAME.to_owned(),
        };
        Ok(state)
    }

    /// The same directory, for the positions of the sink named `sink`: each sink has its own
    /// checkpoint file, `checkpoints.jsonl` for the one named `default` (the `[sink]` table, so
    /// a config moved to `[[sinks]]` keeps its positions under that name) and
    /// `checkpoints.<sink>.jsonl` for the others.
    pub fn for_sink(&self, sink: &str) -> StateDir {
        StateDir {
            dir: self.dir.clone(),
            lock: self.lock.clone(),
            file: file_of(sink),
        }
    }

    /// Removes the checkpoint files of sinks not in `sinks`: a sink removed from the config
    /// drops its positions, and if it is added again it starts as at a first start.
    pub fn drop_other_sinks(&self, sinks: &[&str]) {
        let keep: HashSet<String> = sinks.iter().map(|s| file_of(s)).collect();
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // `checkpoints.jsonl` (the `default` sink's) or `checkpoints.<sink>.jsonl`.
            let ours = name.starts_with("checkpoints.") && name.ends_with(".jsonl");
            if ours && !keep.contains(&name) {
                match fs::remove_file(e.path()) {
                    Ok(()) => {
                        tracing::info!(file = %e.path().display(), "removed the positions of a sink no longer configured")
                    }
                    Err(err) => {
                        tracing::warn!(file = %e.path().display(), error = %err, "cannot remove the positions of a sink no longer configured")
                    }
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads the checkpoint file, skipping (with a warning) any line that is damaged. At the
    /// first start (no checkpoint file), writes an empty one at once: from now on a missing
    /// file means it was lost, and the files found are read from their beginning.
    pub fn load(&self) -> Loaded {
        let path = self.dir.join(&self.file);
        let text = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Err(e) = self.save(&[]) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the first checkpoint file; retried at the next checkpoint");
                }
                return Loaded {
                    first_start: true,
                    entries: HashMap::new(),
                    journal: Vec::new(),
                };
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the checkpoint file; every file will be read from its beginning (duplicates possible, nothing lost)");
                return Loaded {
                    first_start: false,
                    entries: HashMap::new(),
                    journal: Vec::new(),
                };
            }
        };
        let text = String::from_utf8_lossy(&text);
        let imported = text.lines().next() == Some(HEADER_IMPORTED);
        let mut entries = HashMap::new();
        let mut journal = Vec::new();
        let mut damaged = 0;
        for (i, line) in text.lines().enumerate() {
            if i == 0 && (line == HEADER || line == HEADER_IMPORTED) || line.is_empty() {
                continue;
            }
            match parse_line(line) {
                Some(e) => {
                    entries.insert((e.dev, e.ino), e);
                }
                None => match parse_journal_line(line) {
                    Some(j) => journal.push(j),
                    None => damaged += 1,
                },
            }
        }
        if imported {
            if damaged > 0 {
                tracing::warn!(path = %path.display(), damaged_lines = damaged, "the imported checkpoint file is damaged; files without a readable checkpoint start at their source's start_at");
            }
            // The first start with imported positions is this one only: written back as ztail's
            // own at once, a crash before the first checkpoint makes the next start read new
            // files from their beginning (duplicates), never skip to their end again (loss).
            let own: Vec<Entry> = entries.values().cloned().collect();
            if let Err(e) = self.save_all(&own, &journal) {
                tracing::warn!(path = %path.display(), error = %e, "cannot rewrite the imported checkpoint file; retried at the next checkpoint");
            }
        } else if damaged > 0 || !text.starts_with(HEADER) {
            tracing::warn!(path = %path.display(), damaged_lines = damaged, "the checkpoint file is damaged; files without a readable checkpoint will be read from their beginning (duplicates possible, nothing lost)");
        }
        Loaded {
            first_start: imported,
            entries,
            journal,
        }
    }

    /// Whether the checkpoint file was written by `ztail convert` and no ztail has started
    /// on it since.
    pub fn is_imported(&self) -> bool {
        let Ok(f) = File::open(self.dir.join(&self.file)) else {
            return false;
        };
        let mut first = String::new();
        let _ = io::BufRead::read_line(&mut io::BufReader::new(f), &mut first);
        first.trim_end() == HEADER_IMPORTED
    }

    /// Writes positions taken over from another shipper as the checkpoint file of a ztail
    /// that has not started yet: at its first start, these files resume at their positions
    /// and every other file starts at `start_at`.
    pub fn save_imported(&self, entries: &[Entry], journal: &[JournalEntry]) -> io::Result<()> {
        self.write(&render(HEADER_IMPORTED, entries, journal))
    }

    /// Whether the checkpoint file is where it should be (a cleanup job may have removed it,
    /// or the whole directory). Unlike [`load`](Self::load), never writes one.
    pub fn is_intact(&self) -> bool {
        self.dir.join(&self.file).exists()
    }

    /// Replaces the checkpoint file atomically. If the directory is gone, it is recreated and
    /// locked again first.
    pub fn save(&self, entries: &[Entry]) -> io::Result<()> {
        self.save_all(entries, &[])
    }

    /// [`save`](Self::save) with the journal sources' cursors.
    pub fn save_all(&self, entries: &[Entry], journal: &[JournalEntry]) -> io::Result<()> {
        let out = render(HEADER, entries, journal);
        match self.write(&out) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.dir.exists() => {
                let lock = take(&self.dir).map_err(io::Error::other)?;
                tracing::warn!(dir = %self.dir.display(), "the state directory disappeared while ztail was running; recreated it and wrote the positions held in memory");
                *crate::pipeline::lock(&self.lock) = lock;
                self.write(&out)
            }
            result => result,
        }
    }

    fn write(&self, text: &str) -> io::Result<()> {
        let tmp = self.dir.join(format!("{}.tmp", self.file));
        // Whatever is at the temporary name (a symlink planted to make ztail truncate another
        // file) is removed, not followed; `create_new` refuses anything that appears meanwhile.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join(&self.file))?;
        File::open(&self.dir)?.sync_all()
    }
}

/// The checkpoint file of the sink named `sink`.
fn file_of(sink: &str) -> String {
    match sink {
        "default" => FILE_NAME.to_owned(),
        s => format!("checkpoints.{s}.jsonl"),
    }
}

/// The checkpoint file's text: the header, then a line per entry.
fn render(header: &str, entries: &[Entry], journal: &[JournalEntry]) -> String {
    let mut out = String::with_capacity(64 + entries.len() * 160 + journal.len() * 160);
    out.push_str(header);
    out.push('\n');
    for e in entries {
        out.push_str(&format_line(e));
        out.push('\n');
    }
    for j in journal {
        out.push_str(&checksummed(j));
        out.push('\n');
    }
    out
}

/// Creates the directory (mode 0700) if needed, checks its owner and takes its lock.
fn take(dir: &Path) -> anyhow::Result<File> {
    // Only ztail's user may read or write its checkpoints (they decide what is re-sent).
    std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    let owner = fs::metadata(dir)
        .with_context(|| format!("cannot read the state directory {}", dir.display()))?
        .uid();
    let me = rustix::process::geteuid().as_raw();
    if owner != me {
        anyhow::bail!(
            "the state directory {} belongs to uid {owner}, not to ztail's user (uid {me}): its owner could rewind or advance ztail's positions; chown it to ztail's user or choose another state_dir",
            dir.display()
        );
    }
    let lock_path = dir.join("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock_path)
        .with_context(|| {
            format!(
                "cannot open the lock file {} (a symlink there is refused; remove it)",
                lock_path.display()
            )
        })?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another ztail is using the state directory {} (it holds {}); stop it or give this one its own state_dir",
            dir.display(),
            lock_path.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
        }
    }
}

/// One checkpoint line: the FNV-1a hash of the JSON, in hex, then the JSON.
pub fn format_line(e: &Entry) -> String {
    checksummed(e)
}

fn checksummed(e: &impl Serialize) -> String {
    // Serializing plain integers, paths and strings cannot fail.
    let json = serde_json::to_string(e).unwrap_or_default();
    format!("{:016x} {json}", hash(json.as_bytes()))
}

/// Parses a journal cursor line; `None` if it is damaged in any way.
fn parse_journal_line(line: &str) -> Option<JournalEntry> {
    let (sum, json) = line.split_once(' ')?;
    if u64::from_str_radix(sum, 16).ok()? != hash(json.as_bytes()) {
        return None;
    }
    let j: JournalEntry = serde_json::from_str(json).ok()?;
    j.is_bounded().then_some(j)
}

/// Parses a line written by [`format_line`]; `None` if it is damaged in any way, or holds a
/// field ztail could not have written (they size reads and subtractions at start).
pub fn parse_line(line: &str) -> Option<Entry> {
    let (sum, json) = line.split_once(' ')?;
    let sum = u64::from_str_radix(sum, 16).ok()?;
    if sum != hash(json.as_bytes()) {
        return None;
    }
    let e: Entry = serde_json::from_str(json).ok()?;
    e.is_bounded().then_some(e)
}

impl Entry {
    /// Whether every field is one ztail can write: the fingerprint at most [`HEAD_LEN`] bytes,
    /// the tail at most [`TAIL_LEN`] and not before the start of the file.
    pub fn is_bounded(&self) -> bool {
        self.head_len as usize <= HEAD_LEN
            && self.tail_len as usize <= TAIL_LEN
            && u64::from(self.tail_len) <= self.offset
            && self.offset <= i64::MAX as u64
    }
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
        // The first start is recorded at once: the next one is not a first start.
        assert!(!state.load().first_start);
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
    fn journal_cursors_share_the_file_and_its_damage_rules() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let j = |n: &str, c: &str| JournalEntry {
            journal: n.into(),
            cursor: c.into(),
        };
        state
            .save_all(
                &[entry(1, 100)],
                &[j("journal", "s=01;i=2"), j("other", "s=03;i=4")],
            )
            .unwrap();
        let loaded = state.load();
        assert_eq!(loaded.entries.len(), 1);
        assert_eq!(
            loaded.journal,
            vec![j("journal", "s=01;i=2"), j("other", "s=03;i=4")]
        );
        let path = dir.path().join(FILE_NAME);
        let text = fs::read_to_string(&path).unwrap().replace("i=4", "i=5");
        fs::write(&path, text).unwrap();
        assert_eq!(state.load().journal, vec![j("journal", "s=01;i=2")]);
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

    /// A checkpoint line with a valid checksum but fields ztail never writes (a hand edit,
    /// another program) is ignored, not used to size a read or a subtraction.
    #[test]
    fn fields_out_of_bounds_cost_only_that_checkpoint() {
        for e in [
            Entry {
                head_len: u32::MAX,
                ..entry(1, 100)
            },
            Entry {
                tail_len: 65,
                ..entry(1, 100)
            },
            Entry {
                tail_len: 10,
                ..entry(1, 5)
            },
            Entry {
                offset: u64::MAX,
                ..entry(1, 0)
            },
        ] {
            assert_eq!(parse_line(&format_line(&e)), None, "{e:?}");
        }
        assert!(parse_line(&format_line(&entry(1, 100))).is_some());
    }

    /// Symlinks planted at the lock or temporary file are never followed (`File::create`
    /// would truncate their target), and a directory of another user is refused.
    #[test]
    fn symlinks_in_the_state_directory_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("lock")).unwrap();
        let err = StateDir::open(&dir)
            .err()
            .expect("a symlinked lock is refused");
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        fs::remove_file(dir.join("lock")).unwrap();

        let state = StateDir::open(&dir).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(format!("{FILE_NAME}.tmp"))).unwrap();
        state.save(&[entry(1, 100)]).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(state.load().entries.len(), 1);
    }

    #[test]
    fn a_state_directory_of_another_user_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).unwrap();
        let me = rustix::process::geteuid().as_raw();
        std::os::unix::fs::chown(&dir, Some(me + 1), None).unwrap();
        let err = StateDir::open(&dir).err().expect("refused").to_string();
        assert!(err.contains("belongs to uid"), "{err}");
    }

    /// A cleanup job removed the whole directory: the next save recreates it, locks it and
    /// writes the positions, so a restart is not taken for a first start.
    #[test]
    fn a_state_directory_removed_while_running_is_recreated() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let state = StateDir::open(&dir).unwrap();
        assert!(state.load().first_start);
        fs::remove_dir_all(&dir).unwrap();
        assert!(!state.is_intact());
        state.save(&[entry(1, 100)]).unwrap();
        assert!(state.is_intact());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(
            StateDir::open(&dir).is_err(),
            "the recreated directory is locked again"
        );
        let loaded = state.load();
        assert!(!loaded.first_start);
        assert_eq!(loaded.entries[&(1, 1)].offset, 100);
    }

    #[test]
    fn imported_positions_load_as_a_first_start_once() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        assert!(!state.is_intact());
        state.save_imported(&[entry(1, 100)], &[]).unwrap();
        assert!(state.is_imported());
        let loaded = state.load();
        assert!(loaded.first_start, "other files start at start_at");
        assert_eq!(loaded.entries[&(1, 1)].offset, 100);
        assert!(
            !state.is_imported(),
            "written back as ztail's own when loaded"
        );
        // Loaded again (ztail killed before its first checkpoint): not a first start any more,
        // so files found now are read from their beginning, never skipped to their end.
        let loaded = state.load();
        assert!(!loaded.first_start);
        assert_eq!(loaded.entries[&(1, 1)].offset, 100);
        state.save(&[entry(1, 200)]).unwrap();
        let loaded = state.load();
        assert!(!loaded.first_start);
        assert_eq!(loaded.entries[&(1, 1)].offset, 200);
    }
}
