//! The `journal` source: systemd journal files read directly, with ztail's own reader of the
//! documented file format ([`file`]); no libsystemd, no `journalctl`.
//!
//! ## Positions
//! A journal directory holds one or more *journals*, each a series of files sharing a seqnum
//! id (the system journal, a user's, a volatile one in `/run`); within one, every entry has a
//! higher seqnum than the one before. Each journal a source reads is a [`Chain`] with its own
//! position, like a file's: the pipeline's [`Cursor`] counts the entries consumed in this run,
//! and each chunk end is remembered with systemd's cursor text of its last entry. The
//! checkpoint holds, per source and journal, the cursor before which Loki acknowledged every
//! selected entry; a restart resumes strictly after it.
//!
//! Entries are read in seqnum order across the files of a journal (merged, so files written
//! at once, or one rotated while read, keep their order). A journal whose files no longer
//! reach back to the saved cursor lost entries to vacuuming before ztail read them: they are
//! counted in `ztail_journal_entries_lost_total` and reading goes on from the oldest entry
//! there is. A journal without a saved cursor (new, or wiped and recreated) is read from its
//! oldest entry; only at ztail's very first start does `start_at = "end"` skip what exists.
//!
//! ## What an entry becomes
//! Its line is `MESSAGE` (invalid UTF-8 replaced, as for files; cut at `max_line_bytes`), its
//! timestamp the journal's realtime clock. The source's `journal.fields` are given to its
//! stages as fields ([`crate::stage::Given`]): `labels`, `metadata`, `drop`, `tenant` and
//! templates read them like parsed ones, with the same cardinality guard. Entries the
//! source's matches (`units`, `identifiers`, `priority`) do not select are passed over; the
//! position moves past them.

pub mod config;
pub mod file;

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::pipeline::{Chunk, Cursor, Entry, Meta, Position, Stream, lock};
use crate::stage::{Given, Runner};
use crate::tail::Tailer;
use crate::tail::checkpoint::JournalEntry;
use config::JournalConfig;
use file::JournalFile;

/// How often the files are looked at for new entries (journald itself coalesces its
/// notifications over 250 ms).
const POLL: Duration = Duration::from_millis(250);
/// How often the directories are listed for new, rotated and removed files.
const RESCAN: Duration = Duration::from_secs(1);
/// Most entries in one chunk.
const MAX_ENTRIES: usize = 8192;

/// One journal (seqnum id) of a source: its acknowledged position.
#[derive(Debug)]
pub struct Chain {
    pub source: String,
    pub seqnum_id: [u8; 16],
    pub cursor: Arc<Cursor>,
    /// (entries consumed, cursor of the last of them) for each chunk end not yet committed.
    marks: Mutex<VecDeque<(u64, String)>>,
    committed: Mutex<Option<String>>,
}

impl Chain {
    fn new(source: &str, seqnum_id: [u8; 16], start: Option<String>) -> Chain {
        Chain {
            source: source.to_owned(),
            seqnum_id,
            cursor: Arc::new(Cursor::new(Position::default())),
            marks: Mutex::default(),
            committed: Mutex::new(start),
        }
    }

    /// systemd's cursor of the last entry before which everything was acknowledged.
    pub fn committed_cursor(&self) -> Option<String> {
        let done = self.cursor.committed().offset;
        let mut marks = lock(&self.marks);
        let mut committed = lock(&self.committed);
        while marks.front().is_some_and(|(n, _)| *n <= done) {
            if let Some((_, c)) = marks.pop_front() {
                *committed = Some(c);
            }
        }
        committed.clone()
    }

    /// The checkpoint line of this chain, if it has a position.
    pub fn entry(&self) -> Option<JournalEntry> {
        self.committed_cursor().map(|cursor| JournalEntry {
            journal: self.source.clone(),
            cursor,
        })
    }
}

/// What the source selects and which journal fields it reads.
struct Select {
    /// Journal field names read besides `MESSAGE`: the given fields first, then those the
    /// matches need.
    wanted: Vec<String>,
    given: usize,
    unit: Option<(u16, u16)>,
    identifier: Option<u16>,
    priority: Option<u16>,
    cfg: Arc<JournalConfig>,
}

impl Select {
    fn new(cfg: Arc<JournalConfig>) -> Select {
        let mut wanted: Vec<String> = cfg.fields.iter().map(|(_, f)| f.clone()).collect();
        let given = wanted.len();
        let mut index = |name: &str| -> u16 {
            match wanted.iter().position(|w| w == name) {
                Some(i) => i as u16,
                None => {
                    wanted.push(name.to_owned());
                    (wanted.len() - 1) as u16
                }
            }
        };
        let unit = (!cfg.units.is_empty()).then(|| (index("_SYSTEMD_UNIT"), index("UNIT")));
        let identifier = (!cfg.identifiers.is_empty()).then(|| index("SYSLOG_IDENTIFIER"));
        let priority = cfg.priority.map(|_| index("PRIORITY"));
        Select {
            wanted,
            given,
            unit,
            identifier,
            priority,
            cfg,
        }
    }

    fn selects(&self, e: &file::Entry) -> bool {
        let value = |i: u16| e.field(i);
        let any = |list: &[String], v: Option<&[u8]>| {
            v.is_some_and(|v| list.iter().any(|u| u.as_bytes() == v))
        };
        if let Some((a, b)) = self.unit
            && !any(&self.cfg.units, value(a))
            && !any(&self.cfg.units, value(b))
        {
            return false;
        }
        if let Some(i) = self.identifier
            && !any(&self.cfg.identifiers, value(i))
        {
            return false;
        }
        if let (Some(i), Some(max)) = (self.priority, self.cfg.priority) {
            match value(i) {
                Some([d]) if d.is_ascii_digit() && d - b'0' <= max => {}
                _ => return false,
            }
        }
        true
    }
}

/// The files of one journal being read, and how far.
struct ChainReader {
    chain: Arc<Chain>,
    files: Vec<Open>,
    /// The seqnum of the last entry consumed (or of the saved cursor).
    last: Option<u64>,
    /// Entries consumed in this run (the pipeline position).
    consumed: u64,
    /// At a first start with `start_at = "end"`: the files found first start at their end.
    at_end: bool,
    /// The previous read stopped at its size limit, not at the end of the journal.
    behind: bool,
    /// Set once the files found at the start have been positioned (and the loss check made).
    started: bool,
    /// The seqnum after a gap (an entry after `last + 1`) for which the directories have been
    /// listed again: a gap may be entries in a file not found yet (a user's first journal).
    gap_checked: Option<u64>,
}

struct Open {
    f: JournalFile,
    /// The file's next entry, read ahead to merge the files in seqnum order.
    peeked: Option<file::Entry>,
    /// An entry's buffers to read the next one into.
    spare: Option<file::Entry>,
    positioned: bool,
    done: bool,
}

/// One read of a journal: entries and where it ended.
struct Read {
    data: Vec<u8>,
    entries: Vec<Entry>,
    given: Given,
    consumed: u64,
    cursor: Option<String>,
    records: u64,
    bytes: u64,
    truncated: u64,
    lost: u64,
    errors: Vec<(PathBuf, String)>,
    caught_up: bool,
    /// Stopped before a gap in the seqnums: list the directories, then read on.
    rescan: bool,
}

impl ChainReader {
    fn new(chain: Arc<Chain>, last: Option<u64>, at_end: bool) -> ChainReader {
        ChainReader {
            chain,
            files: Vec::new(),
            last,
            consumed: 0,
            at_end,
            behind: false,
            started: false,
            gap_checked: None,
        }
    }

    /// Positions the files not read yet: after the last entry consumed (or the saved
    /// cursor), or at their end for the files found at a first start with `start_at = "end"`.
    fn position(&mut self, out: &mut Read) {
        let mut end: Option<(file::Entry, [u8; 16])> = None;
        for o in self.files.iter_mut().filter(|o| !o.positioned && !o.done) {
            o.positioned = true;
            let r = match self.last {
                Some(s) => o.f.seek_after(s).map(|_| ()),
                None if self.at_end => {
                    let mut e = file::Entry::default();
                    o.f.last(&mut e).map(|found| {
                        if found && end.as_ref().is_none_or(|(b, _)| b.seqnum < e.seqnum) {
                            end = Some((e, o.f.header.seqnum_id));
                        }
                    })
                }
                None => Ok(()),
            };
            if let Err(e) = r {
                out.errors.push((o.f.path.clone(), e.to_string()));
                out.lost += o.f.unread();
                o.done = true;
            }
        }
        if let Some((e, id)) = end {
            // The position of a first start at the end: a restart resumes here.
            self.last = Some(e.seqnum);
            let mut committed = lock(&self.chain.committed);
            if committed.is_none() {
                *committed = Some(file::cursor(&id, &e));
            }
        }
        if !self.started {
            self.started = true;
            self.at_end = false;
            // Nothing left of the journal reaches back to the entry after the cursor: the
            // entries between were removed before ztail read them.
            let oldest = self
                .files
                .iter()
                .map(|o| o.f.header.head_seqnum)
                .filter(|&h| h > 0)
                .min();
            if let (Some(s), Some(oldest)) = (self.last, oldest)
                && oldest > s.saturating_add(1)
            {
                out.lost += oldest - s - 1;
            }
        }
    }

    /// Reads entries in seqnum order up to `limit` bytes of lines.
    fn read(&mut self, select: &Select, limit: usize, max_line: usize) -> Read {
        let mut out = Read {
            // Room for the limit and the entry that crosses it: growing copies the lines.
            data: Vec::with_capacity(limit + (64 << 10)),
            // Sized for lines of 128 bytes: growing it copies the entries.
            entries: Vec::with_capacity((limit / 128).clamp(16, MAX_ENTRIES)),
            given: Given::default(),
            consumed: self.consumed,
            cursor: None,
            records: 0,
            bytes: 0,
            truncated: 0,
            lost: 0,
            errors: Vec::new(),
            caught_up: false,
            rescan: false,
        };
        out.given.clear();
        for o in self.files.iter_mut().filter(|o| !o.done) {
            if let Err(e) = o.f.refresh() {
                out.errors.push((o.f.path.clone(), e.to_string()));
                out.lost += o.f.unread();
                o.done = true;
            }
        }
        self.position(&mut out);
        let mut last: Option<(file::Entry, [u8; 16])> = None;
        let mut full = false;
        loop {
            self.peek(&mut out);
            let Some((seqnum, i)) = self.lowest() else {
                break;
            };
            if let Some(l) = self.last
                && seqnum > l.saturating_add(1)
            {
                // A gap: entries between may have been linked in another file after its
                // header was read, or be in a file not found yet. Look again before passing.
                for o in self
                    .files
                    .iter_mut()
                    .filter(|o| !o.done && o.peeked.is_none())
                {
                    if let Err(e) = o.f.refresh() {
                        out.errors.push((o.f.path.clone(), e.to_string()));
                        out.lost += o.f.unread();
                        o.done = true;
                    }
                }
                self.peek(&mut out);
                if self.lowest().is_some_and(|(s, _)| s < seqnum) {
                    continue;
                }
                if self.gap_checked != Some(seqnum) {
                    self.gap_checked = Some(seqnum);
                    out.rescan = true;
                    break;
                }
            }
            let Some(e) = self.files[i].peeked.take() else {
                break;
            };
            self.consumed += 1;
            self.last = Some(e.seqnum);
            if select.selects(&e) {
                add(&mut out, &e, select, max_line);
            }
            // The last entry is kept for its cursor; the one before goes back for reuse.
            let id = self.files[i].f.header.seqnum_id;
            if let Some((prev, _)) = last.replace((e, id)) {
                self.files[i].spare = Some(prev);
            }
            if out.data.len() >= limit || out.entries.len() >= MAX_ENTRIES {
                full = true;
                break;
            }
        }
        // A file journald will not write again, read to its end, is let go (with its cache).
        for o in &mut self.files {
            if o.f.header.state == file::STATE_ARCHIVED && o.f.unread() == 0 && o.peeked.is_none() {
                o.done = true;
            }
        }
        out.caught_up = !full && !out.rescan && self.behind;
        self.behind = full;
        out.consumed = self.consumed;
        out.cursor = last.map(|(e, id)| file::cursor(&id, &e));
        out
    }

    /// Reads ahead the next entry of each file that has none. An entry that cannot be read is
    /// counted lost and passed; a file whose structure is damaged is given up (its unread
    /// entries counted).
    fn peek(&mut self, out: &mut Read) {
        for o in self
            .files
            .iter_mut()
            .filter(|o| !o.done && o.peeked.is_none())
        {
            while o.f.unread() > 0 {
                let mut e = o.spare.take().unwrap_or_default();
                match o.f.next(&mut e) {
                    Ok(true) => {
                        o.peeked = Some(e);
                        break;
                    }
                    Ok(false) => break,
                    Err(file::Error::BadEntry(at, why)) => {
                        out.lost += 1;
                        out.errors
                            .push((o.f.path.clone(), format!("entry at {at}: {why}")));
                    }
                    Err(err) => {
                        out.errors.push((o.f.path.clone(), err.to_string()));
                        out.lost += o.f.unread();
                        o.done = true;
                        break;
                    }
                }
            }
        }
    }

    /// The seqnum and file of the lowest entry read ahead.
    fn lowest(&self) -> Option<(u64, usize)> {
        self.files
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.peeked.as_ref().map(|e| (e.seqnum, i)))
            .min()
    }
}

/// Adds a selected entry to a read.
fn add(out: &mut Read, e: &file::Entry, select: &Select, max_line: usize) {
    out.records += 1;
    let message = e.message().unwrap_or_default();
    out.bytes += message.len() as u64;
    let text = match std::str::from_utf8(message) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => String::from_utf8_lossy(message),
    };
    let mut text: &str = &text;
    if text.len() > max_line {
        let mut cut = max_line;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text = &text[..cut];
        out.truncated += 1;
    }
    let start = out.data.len();
    out.data.extend_from_slice(text.as_bytes());
    let mut entry = Entry::text(start, out.data.len());
    entry.ts = i64::try_from(e.realtime)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000);
    out.entries.push(entry);
    for (i, v) in e.fields() {
        if (i as usize) < select.given {
            out.given.push(i, v);
        }
    }
    out.given.next_entry();
}

/// Lists the journal files of the source's directories: `*.journal` and `*.journal~` in each,
/// and in each subdirectory that is not a namespace's (`<machine-id>.<namespace>`), as
/// `journalctl` reads them.
fn list(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let is_journal = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".journal") || n.ends_with(".journal~"))
    };
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_file() && is_journal(&path) {
                out.push(path);
            } else if t.is_dir() && !e.file_name().to_string_lossy().contains('.') {
                let Ok(sub) = std::fs::read_dir(&path) else {
                    continue;
                };
                for f in sub.flatten() {
                    let p = f.path();
                    if f.file_type().is_ok_and(|t| t.is_file()) && is_journal(&p) {
                        out.push(p);
                    }
                }
            }
        }
    }
    out.sort();
    out
}

/// The state of one journal source's task.
struct Source {
    tailer: Arc<Tailer>,
    name: String,
    select: Arc<Select>,
    chains: Vec<ChainReader>,
    /// Files open or known unusable, by (device, inode).
    known: HashSet<(u64, u64)>,
    /// Files that could not be opened, reported once each.
    refused: HashSet<PathBuf>,
    /// Saved cursors of this source, by seqnum id.
    saved: HashMap<[u8; 16], (u64, String)>,
    first_start: bool,
    start_at_end: bool,
}

impl Source {
    /// Opens the files not seen before and adds them to their journals.
    fn discover(&mut self) {
        let dirs = self.select.cfg.directories.clone();
        let paths = list(&dirs);
        let mut present = HashSet::new();
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            present.insert(key);
            if self.known.contains(&key) {
                continue;
            }
            let f = match JournalFile::open(&path, &self.select.wanted) {
                // journald sets a new file's seqnum id with its first entry: until then, the
                // file cannot be placed in its journal.
                Ok(f) if f.header.n_entries == 0 => continue,
                Ok(f) => f,
                // Being created: its header is not written yet.
                Err(file::Error::NotJournal) if meta.len() < 4096 => continue,
                Err(e) => {
                    if self.refused.insert(path.clone()) {
                        tracing::warn!(source = %self.name, path = %path.display(), error = %e, "cannot read this journal file; skipping it");
                        self.tailer
                            .metrics
                            .journal_file_errors
                            .get_or_create(&crate::metrics::SourceLabel {
                                source: self.name.as_str().into(),
                            })
                            .inc();
                    }
                    self.known.insert(key);
                    continue;
                }
            };
            self.known.insert(key);
            let id = f.header.seqnum_id;
            let chain = match self.chains.iter_mut().position(|c| c.chain.seqnum_id == id) {
                Some(i) => &mut self.chains[i],
                None => {
                    let (last, start) = match self.saved.remove(&id) {
                        Some((seqnum, cursor)) => (Some(seqnum), Some(cursor)),
                        None => (None, None),
                    };
                    let at_end = last.is_none() && self.first_start && self.start_at_end;
                    let chain = Arc::new(Chain::new(&self.name, id, start));
                    self.tailer.add_journal(chain.clone());
                    self.chains.push(ChainReader::new(chain, last, at_end));
                    let last = self.chains.len() - 1;
                    &mut self.chains[last]
                }
            };
            tracing::debug!(source = %self.name, path = %path.display(), "reading journal file");
            chain.files.push(Open {
                f,
                peeked: None,
                spare: None,
                positioned: false,
                done: false,
            });
        }
        // A file is let go once it failed, or once it is read to its end and journald will
        // not write it again (archived) or it was deleted (vacuumed, wiped). A file renamed by
        // a rotation while the directory was listed is still open under its old key.
        for c in &mut self.chains {
            c.files.retain(|o| {
                let drained = o.f.unread() == 0 && o.peeked.is_none();
                let deleted = o.f.deleted();
                !(o.done || drained && deleted)
            });
            for o in &c.files {
                present.insert((o.f.dev, o.f.ino));
            }
        }
        self.known.retain(|k| present.contains(k));
        // A journal whose files are all gone (the volatile one after the flush at boot, a
        // wiped one) is forgotten once everything read from it was acknowledged.
        let tailer = &self.tailer;
        self.chains.retain(|c| {
            let keep = !c.files.is_empty() || !c.chain.cursor.is_settled();
            if !keep {
                tailer.remove_journal(&c.chain);
            }
            keep
        });
        self.first_start = false;
    }
}

/// Runs one journal source until reading stops.
pub(crate) async fn run(
    tailer: Arc<Tailer>,
    index: usize,
    tx: mpsc::Sender<Chunk>,
    first_start: bool,
    saved: Vec<JournalEntry>,
) {
    let src = &tailer.sources()[index];
    let Some(cfg) = src.journal.clone() else {
        return;
    };
    let name = src.name.clone();
    let mut by_id = HashMap::new();
    for j in saved.into_iter().filter(|j| j.journal == name) {
        match file::parse_cursor(&j.cursor) {
            Some((id, seqnum)) => {
                by_id.insert(id, (seqnum, j.cursor));
            }
            None => {
                tracing::warn!(source = %name, cursor = %j.cursor, "ignoring a saved journal cursor ztail cannot read")
            }
        }
    }
    let stream = tailer.streams().get(&src.labels, None);
    let streams = vec![stream];
    let meta_names: Arc<[String]> = src.meta_names().into();
    let mut runner = src
        .stages
        .clone()
        .map(|p| Runner::new(p, &streams, tailer.streams(), 0, &name, &tailer.metrics));
    let max_line = src.framing.max_line;
    let limit = tailer.read_buffer();
    let start_at_end = src.start_at == crate::tail::config::StartAt::End;
    let mut source = Source {
        tailer: tailer.clone(),
        name: name.clone(),
        select: Arc::new(Select::new(cfg)),
        chains: Vec::new(),
        known: HashSet::new(),
        refused: HashSet::new(),
        saved: by_id,
        first_start,
        start_at_end,
    };
    let cancel = tailer.cancel().clone();
    let started = std::time::Instant::now();
    let mut warned_unclaimed = false;
    let mut last_scan: Option<tokio::time::Instant> = None;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        if last_scan.is_none_or(|t| t.elapsed() >= RESCAN) {
            let mut s = source;
            source = match tokio::task::spawn_blocking(move || {
                s.discover();
                s
            })
            .await
            {
                Ok(s) => s,
                Err(_) => break,
            };
            last_scan = Some(tokio::time::Instant::now());
            if !warned_unclaimed && started.elapsed() >= crate::tail::UNCLAIMED_CHECKPOINT_TTL {
                warned_unclaimed = true;
                for (_, cursor) in source.saved.values() {
                    tracing::warn!(source = %name, cursor = %cursor, "the journal of this saved cursor is gone (wiped or moved); its entries that still exist elsewhere are read from the oldest");
                }
                source.saved.clear();
            }
        }
        let mut busy = false;
        for c in 0..source.chains.len() {
            let permit = tokio::select! {
                p = tailer.read_permits().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = cancel.cancelled() => return,
            };
            let placeholder = ChainReader::new(source.chains[c].chain.clone(), None, false);
            let mut reader = std::mem::replace(&mut source.chains[c], placeholder);
            let select = source.select.clone();
            let (reader, read) = match tokio::task::spawn_blocking(move || {
                let r = reader.read(&select, limit, max_line);
                (reader, r)
            })
            .await
            {
                Ok(v) => v,
                Err(_) => return,
            };
            source.chains[c] = reader;
            let chain = source.chains[c].chain.clone();
            report(&tailer, &name, &read);
            if read.rescan {
                last_scan = None;
                busy = true;
            }
            if read.consumed == chain_position(&chain) {
                continue;
            }
            busy |= !read.caught_up;
            let sent = queue(
                &tailer,
                &chain,
                &mut runner,
                &streams,
                &meta_names,
                read,
                &tx,
            )
            .await;
            drop(permit);
            if !sent {
                return;
            }
        }
        if !busy {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = cancel.cancelled() => break,
            }
        }
    }
}

/// The position last handed to the pipeline for a chain.
fn chain_position(chain: &Chain) -> u64 {
    lock(&chain.marks)
        .back()
        .map_or(chain.cursor.committed().offset, |(n, _)| *n)
}

fn report(tailer: &Tailer, name: &str, read: &Read) {
    let m = &tailer.metrics;
    m.lines_read.inc_by(read.records);
    m.bytes_read.inc_by(read.bytes);
    if read.truncated > 0 {
        m.lines_truncated.inc_by(read.truncated);
    }
    let label = crate::metrics::SourceLabel {
        source: name.into(),
    };
    if read.lost > 0 {
        m.journal_entries_lost
            .get_or_create(&label)
            .inc_by(read.lost);
        tracing::warn!(source = %name, count = read.lost, "journal entries were removed (vacuumed) or damaged before ztail read them");
    }
    for (path, why) in &read.errors {
        m.journal_file_errors.get_or_create(&label).inc();
        tracing::warn!(source = %name, path = %path.display(), error = %why, "stopped reading a journal file");
    }
}

/// Runs the stages over a read and hands its chunks to the pipeline; false once the pipeline
/// is gone.
async fn queue(
    tailer: &Tailer,
    chain: &Chain,
    runner: &mut Option<Runner>,
    streams: &[Arc<Stream>],
    meta_names: &Arc<[String]>,
    read: Read,
    tx: &mpsc::Sender<Chunk>,
) -> bool {
    let Read {
        mut data,
        mut entries,
        given,
        consumed,
        cursor,
        caught_up,
        ..
    } = read;
    let mut meta: Vec<Meta> = Vec::new();
    let mut hold = Duration::ZERO;
    let routes: &[Arc<Stream>] = match runner {
        Some(r) => {
            let now = crate::pipeline::unix_nanos();
            hold = r.apply_given(
                &mut data,
                &mut entries,
                &mut meta,
                tailer.streams(),
                now,
                Some(&given),
            );
            r.routes()
        }
        None => streams,
    };
    // A small read keeps only what it holds while its entries wait for Loki.
    if data.capacity() > 2 * data.len() + 4096 {
        data.shrink_to_fit();
    }
    if entries.capacity() > 2 * entries.len() + 64 {
        entries.shrink_to_fit();
    }
    let data = bytes::Bytes::from(data);
    let meta: Arc<[Meta]> = meta.into();
    let position = |offset| Position {
        offset,
        ..Position::default()
    };
    let chunks = crate::pipeline::Read {
        routes,
        cursor: &chain.cursor,
        data,
        entries,
        meta,
        meta_names,
        start: position(chain_position(chain)),
        end: position(consumed),
        caught_up,
    }
    .into_chunks();
    if let Some(c) = cursor {
        lock(&chain.marks).push_back((consumed, c));
    }
    for chunk in chunks {
        let sent = tokio::select! {
            sent = tx.send(chunk) => sent.is_ok(),
            _ = tailer.cancel().cancelled() => false,
        };
        if !sent {
            return false;
        }
    }
    if !hold.is_zero() {
        tailer.metrics.stage_holds.inc();
        tokio::select! {
            _ = tokio::time::sleep(hold) => {}
            _ = tailer.cancel().cancelled() => {}
        }
    }
    true
}
