//! `ztail convert promtail-positions`: Promtail's `positions.yaml` as ztail checkpoints, so that
//! ztail starts where Promtail stopped (exactly, after a clean stop of Promtail: its positions
//! are what it read, written every `sync_period` and at exit).
//!
//! Promtail keys a position by path only, and its offset may be stale (the file rotated or was
//! truncated since) or, in a file being written, fall inside a line. An entry is imported only
//! when the file at its path was not created after the positions file was last written, is at
//! least as long as the offset, and the offset is the start of the file or falls just after a
//! newline; the checkpoint then names the file by device and
//! inode with ztail's own fingerprint of its first bytes and of the bytes before the offset,
//! taken now. Every other entry is reported with its reason, and its file starts at the
//! source's `start_at` as at any first start.
//!
//! A journal job's cursor (`cursor-<job>`, `journal-<job>` in older Promtail) is systemd's
//! cursor text, which ztail's journal source keeps too: it is carried over as the cursor of the
//! source `ztail convert promtail` names after the job, which resumes strictly after it.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::convert::promtail::source_name;
use crate::pipeline::TAIL_LEN;
use crate::tail::checkpoint::{Entry, JournalEntry, StateDir};
use crate::tail::reader::{HEAD_LEN, hash, read_head};

/// What the conversion did with each position.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The state directory written.
    pub state_dir: PathBuf,
    pub imported: Vec<Imported>,
    /// Journal cursors, each for the journal source named after its job.
    pub cursors: Vec<Cursor>,
    pub not_imported: Vec<NotImported>,
}

#[derive(Debug, Serialize)]
pub struct Cursor {
    /// The key in `positions.yaml`.
    pub key: String,
    /// The ztail source it is for.
    pub source: String,
    pub cursor: String,
}

#[derive(Debug, Serialize)]
pub struct Imported {
    pub path: String,
    pub offset: u64,
}

#[derive(Debug, Serialize)]
pub struct NotImported {
    /// The key in `positions.yaml`: a path, or a cursor's `cursor-<job>` (`journal-<job>` before).
    pub key: String,
    pub reason: String,
}

/// `positions.yaml` as Promtail writes it.
#[derive(Deserialize)]
struct Positions {
    #[serde(default)]
    positions: BTreeMap<String, Offset>,
}

/// Promtail writes offsets as quoted strings; a hand-edited file may have plain numbers.
#[derive(Deserialize)]
#[serde(untagged)]
enum Offset {
    Number(u64),
    Text(String),
}

/// Reads Promtail's positions file and writes the checkpoints of the positions that can be
/// taken over into `state_dir`. Refuses a state directory that already has checkpoints (ztail
/// has run there) unless `force`.
pub fn convert(positions: &Path, state_dir: &Path, force: bool) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(positions).with_context(|| {
        format!(
            "cannot read {} (Promtail writes it readable by its own user only; copy it where \
             ztail's user can read it)",
            positions.display()
        )
    })?;
    // When Promtail last wrote its positions: a file at one of its paths created later is a
    // successor (the path rotated since), whatever its offsets look like.
    let written = std::fs::metadata(positions)
        .and_then(|m| m.modified())
        .with_context(|| {
            format!(
                "cannot read the modification time of {}",
                positions.display()
            )
        })?;
    let parsed: Positions = yaml_serde::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a Promtail positions file: {e} (expected `positions:` with `path: \"offset\"` entries)",
            positions.display()
        )
    })?;
    // Taking the lock first: a ztail running on this directory would overwrite the result.
    let state = StateDir::open(state_dir).context(
        "run `ztail convert` as the user ztail runs as, so that the state directory is theirs",
    )?;
    // An earlier conversion's file is replaced freely; ztail's own only with --force.
    if state.is_intact() && !state.is_imported() && !force {
        anyhow::bail!(
            "{} already has ztail checkpoints: ztail has run with this state directory, and \
             its positions are newer than Promtail's. --force replaces all of them with \
             Promtail's, and ztail then starts as at a first start (files Promtail has no \
             position for start at start_at)",
            state_dir.display()
        );
    }
    let mut report = Report {
        state_dir: state_dir.to_owned(),
        ..Report::default()
    };
    let mut entries: Vec<Entry> = Vec::new();
    for (key, offset) in parsed.positions {
        if let Some(job) = key
            .strip_prefix("cursor-")
            .or_else(|| key.strip_prefix("journal-"))
        {
            let entry = journal_cursor(&offset).map(|cursor| JournalEntry {
                journal: source_name(job),
                cursor,
            });
            match entry.filter(JournalEntry::is_bounded) {
                Some(e) => report.cursors.push(Cursor {
                    key,
                    source: e.journal,
                    cursor: e.cursor,
                }),
                None => report.not_imported.push(NotImported {
                    key,
                    reason: "a cursor that is not a journal's (a Docker container's or \
                             Cloudflare's): ztail takes over file positions and journal cursors"
                        .into(),
                }),
            }
            continue;
        }
        match take_over(&key, &offset, written) {
            Ok(entry) => {
                // Two keys for one file (a hard link, or a path and its symlink): the one
                // further behind wins, so nothing between them is skipped.
                if let Some(kept) = entries
                    .iter_mut()
                    .find(|e| (e.dev, e.ino) == (entry.dev, entry.ino))
                {
                    let dropped = if entry.offset < kept.offset {
                        std::mem::replace(kept, entry)
                    } else {
                        entry
                    };
                    report.not_imported.push(NotImported {
                        key: dropped.path.display().to_string(),
                        reason: format!(
                            "the same file as {} (kept, at the lower offset {})",
                            kept.path.display(),
                            kept.offset
                        ),
                    });
                    continue;
                }
                entries.push(entry);
            }
            Err(reason) => report.not_imported.push(NotImported { key, reason }),
        }
    }
    report.imported = entries
        .iter()
        .map(|e| Imported {
            path: e.path.display().to_string(),
            offset: e.offset,
        })
        .collect();
    let cursors: Vec<JournalEntry> = report
        .cursors
        .iter()
        .map(|c| JournalEntry {
            journal: c.source.clone(),
            cursor: c.cursor.clone(),
        })
        .collect();
    state
        .save_imported(&entries, &cursors)
        .with_context(|| format!("cannot write checkpoints into {}", state_dir.display()))?;
    Ok(report)
}

/// A position that is systemd's cursor text.
fn journal_cursor(offset: &Offset) -> Option<String> {
    let Offset::Text(t) = offset else {
        return None;
    };
    let t = t.trim();
    crate::journal::file::parse_cursor(t).map(|_| t.to_owned())
}

/// The checkpoint of one position, or why it cannot be taken over.
fn take_over(key: &str, offset: &Offset, written: SystemTime) -> Result<Entry, String> {
    let path = Path::new(key);
    if !path.is_absolute() {
        return Err(
            "not a file path (another kind of target's position); ztail takes over \
                    file positions only"
                .into(),
        );
    }
    let offset = match offset {
        Offset::Number(n) => *n,
        Offset::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| format!("offset {t:?} is not a number"))?,
    };
    // Non-blocking: opening a FIFO for reading would wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open the file: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read the file's metadata: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    // Filesystems without a birth time (and kernels before statx) cannot tell; then the
    // length and newline checks below are all there is.
    if let Ok(born) = meta.created()
        && born > written
    {
        return Err(
            "the file was created after Promtail last wrote its positions: the path \
                    rotated since, and the offset belongs to its predecessor"
                .into(),
        );
    }
    let size = meta.len();
    if size < offset {
        return Err(format!(
            "the file has {size} bytes, fewer than the offset {offset}: it was rotated or \
             truncated since Promtail stopped"
        ));
    }
    let tail_len = offset.min(TAIL_LEN as u64) as usize;
    let mut tail = vec![0; tail_len];
    file.read_exact_at(&mut tail, offset - tail_len as u64)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if tail.last().is_some_and(|&b| b != b'\n') {
        return Err(format!(
            "the offset {offset} is inside a line: Promtail stopped while the line was being \
             written, so the file may have changed since"
        ));
    }
    let head = read_head(&file, HEAD_LEN).map_err(|e| format!("cannot read the file: {e}"))?;
    Ok(Entry {
        dev: meta.dev(),
        ino: meta.ino(),
        path: path.to_owned(),
        head_len: head.len() as u32,
        head_hash: hash(&head),
        offset,
        tail_len: tail_len as u32,
        tail_hash: hash(&tail),
    })
}

impl Report {
    /// The summary printed to stderr.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "imported {} of {} positions into {}\n",
            self.imported.len() + self.cursors.len(),
            self.imported.len() + self.cursors.len() + self.not_imported.len(),
            self.state_dir.display()
        );
        for i in &self.imported {
            out += &format!("  {} from offset {}\n", i.path, i.offset);
        }
        for c in &self.cursors {
            out += &format!(
                "  {}: the journal source {:?} resumes after {}\n",
                c.key, c.source, c.cursor
            );
        }
        if !self.not_imported.is_empty() {
            out += "not imported (a file among these starts at its source's start_at, unless \
                    it is the same file as an imported one):\n";
            for n in &self.not_imported {
                out += &format!("  {}: {}\n", n.key, n.reason);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_keys_for_one_file_keep_the_lower_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        let link = dir.path().join("link.log");
        std::fs::write(&log, "one\ntwo\nthree\n").unwrap();
        std::fs::hard_link(&log, &link).unwrap();
        let positions = dir.path().join("positions.yaml");
        for (first, second) in [(8, 4), (4, 8)] {
            std::fs::write(
                &positions,
                format!(
                    "positions:\n  {}: \"{first}\"\n  {}: \"{second}\"\n",
                    log.display(),
                    link.display()
                ),
            )
            .unwrap();
            let state = dir.path().join(format!("state-{first}"));
            let report = convert(&positions, &state, false).unwrap();
            assert_eq!(report.imported.len(), 1, "{report:?}");
            assert_eq!(report.imported[0].offset, 4, "{report:?}");
            assert_eq!(report.not_imported.len(), 1, "{report:?}");
            assert!(report.not_imported[0].reason.contains("lower offset 4"));
            let loaded = StateDir::open(&state).unwrap().load();
            assert_eq!(
                loaded
                    .entries
                    .values()
                    .map(|e| e.offset)
                    .collect::<Vec<_>>(),
                [4]
            );
        }
    }

    #[test]
    fn positions_are_taken_over_only_after_a_newline_within_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "one\ntwo\nthree").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        let at = |n: u64| take_over(log.to_str().unwrap(), &Offset::Text(n.to_string()), later);
        assert_eq!(at(0).unwrap().offset, 0);
        assert_eq!(at(4).unwrap().offset, 4);
        let e = at(8).unwrap();
        assert_eq!((e.offset, e.tail_len), (8, 8));
        assert_eq!(e.tail_hash, hash(b"one\ntwo\n"));
        assert_eq!((e.head_len, e.head_hash), (13, hash(b"one\ntwo\nthree")));
        assert!(at(6).unwrap_err().contains("inside a line"));
        assert!(at(13).unwrap_err().contains("inside a line"));
        assert!(at(14).unwrap_err().contains("fewer than the offset"));
        let n = take_over(log.to_str().unwrap(), &Offset::Number(4), later).unwrap();
        assert_eq!(n.offset, 4);
        assert!(
            take_over(log.to_str().unwrap(), &Offset::Text("x".into()), later)
                .unwrap_err()
                .contains("not a number")
        );
        assert!(take_over("journal-systemd", &Offset::Text("s=1".into()), later).is_err());
        assert!(take_over("relative.log", &Offset::Number(0), later).is_err());
        let gone = dir.path().join("gone.log");
        assert!(
            take_over(gone.to_str().unwrap(), &Offset::Number(0), later)
                .unwrap_err()
                .contains("cannot open")
        );
        // A file born after the positions were written is a successor at that path (where
        // the filesystem records birth times, as this test's does).
        if std::fs::metadata(&log).unwrap().created().is_ok() {
            let earlier = SystemTime::now() - std::time::Duration::from_secs(3600);
            let err = take_over(log.to_str().unwrap(), &Offset::Number(4), earlier).unwrap_err();
            assert!(err.contains("created after Promtail"), "{err}");
        }
        // A FIFO is refused without blocking on its open.
        let fifo = dir.path().join("fifo.log");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let err = take_over(fifo.to_str().unwrap(), &Offset::Number(0), later).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
