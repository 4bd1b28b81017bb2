//! File sources: discovery (globs, inotify events, periodic rescans), one tailer task per file,
//! and checkpoints of acknowledged positions.
//!
//! A file is identified by device + inode, checked against a fingerprint of its first bytes, so
//! a renamed file that still matches a glob is not read twice and a reused inode is not taken
//! for the old file. Rotation is followed through the open descriptor: a file renamed or deleted
//! away is drained and kept for `rotate_wait` before it is closed; its successor at the same
//! path is started once the old one has been read to its end. A file rotated away (also outside
//! every glob) before it was acknowledged is found again at the next start through its
//! checkpoint, among the files beside its old path. A symlink is followed only to a target the
//! source allows. This module does not parse lines
//! (see [`reader`]) or know about Loki (it hands [`Chunk`]s to the pipeline).

pub mod checkpoint;
pub mod config;
mod file;
pub mod format;
pub mod reader;
pub mod timestamp;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tailer_model_tests;

use std::collections::{HashMap, HashSet};
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::loki::labels::{FILENAME, LabelSet};
use crate::metrics::{Metrics, PathLabel};
use crate::pipeline::{Chunk, Cursor, Position, Streams, lock};
use crate::tail::config::{SourceConfig, StartAt, TailConfig};
use checkpoint::{Entry, JournalEntry, StateDir};
use reader::{FileReader, hash, read_head};

/// How long checkpoints of files not found again after a start are kept.
pub(crate) const UNCLAIMED_CHECKPOINT_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Lifecycle of a tracked file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileState {
    /// At its path, being read.
    Active = 0,
    /// Renamed or deleted away: drained until `rotate_wait` has passed.
    Rotated = 1,
    /// Descriptor closed; kept until Loki has acknowledged its last lines.
    Closed = 2,
}

/// A file being tailed, shared by its tailer task, discovery, the checkpointer and `/status`.
pub struct TrackedFile {
    pub dev: u64,
    pub ino: u64,
    pub source: String,
    path: Mutex<PathBuf>,
    pub cursor: Arc<Cursor>,
    read_offset: AtomicU64,
    size: AtomicU64,
    head: Mutex<(u32, u64)>,
    state: AtomicU8,
    deleted: AtomicBool,
    wake: Notify,
    /// Stops this file's task: a child of the tailer's token, also cancelled alone when the
    /// file is given up (`tail.max_rotated_hold`).
    stop: CancellationToken,
    /// When the checkpoint loop first saw the file away from its path (with a hold bound).
    away_since: Mutex<Option<std::time::Instant>>,
    /// Given up before it was read to its end.
    abandoned: AtomicBool,
}

impl TrackedFile {
    pub fn path(&self) -> PathBuf {
        lock(&self.path).clone()
    }

    pub fn state(&self) -> FileState {
        match self.state.load(Ordering::Relaxed) {
            0 => FileState::Active,
            1 => FileState::Rotated,
            _ => FileState::Closed,
        }
    }

    fn set_state(&self, s: FileState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// Whether `path` names this file (it may have been renamed or deleted away since).
    fn is_at(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (self.dev, self.ino))
    }

    /// Whether it was given up (`tail.max_rotated_hold`) before its sink had it all.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Whether the file is no longer at its path: renamed or deleted away.
    pub fn moved_away(&self) -> bool {
        self.deleted.load(Ordering::Relaxed) || !self.is_at(&self.path())
    }

    /// Bytes on disk not yet acknowledged by Loki.
    pub fn lag(&self) -> u64 {
        self.size
            .load(Ordering::Relaxed)
            .saturating_sub(self.cursor.committed().offset)
    }

    /// Records the file's first bytes as far as they have been read (the fingerprint grows
    /// with the file up to [`reader::HEAD_LEN`]).
    fn note_head(&self, fingerprint: (u32, u64)) {
        *lock(&self.head) = fingerprint;
    }

    fn entry(&self) -> Entry {
        let (head_len, head_hash) = *lock(&self.head);
        let pos = self.cursor.committed();
        Entry {
            dev: self.dev,
            ino: self.ino,
            path: self.path(),
            head_len,
            head_hash,
            offset: pos.offset,
            tail_len: pos.tail_len,
            tail_hash: pos.tail_hash,
        }
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> FileStatus {
        let size = self.size.load(Ordering::Relaxed);
        let committed = self.cursor.committed().offset;
        FileStatus {
            path: self.path(),
            source: self.source.clone(),
            state: self.state(),
            deleted: self.deleted.load(Ordering::Relaxed),
            size,
            read_offset: self.read_offset.load(Ordering::Relaxed),
            committed_offset: committed,
            lag_bytes: size.saturating_sub(committed),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct FileStatus {
    pub path: PathBuf,
    pub source: String,
    pub state: FileState,
    pub deleted: bool,
    pub size: u64,
    pub read_offset: u64,
    pub committed_offset: u64,
    pub lag_bytes: u64,
}

#[derive(Default)]
struct Registry {
    by_inode: HashMap<(u64, u64), Arc<TrackedFile>>,
    /// The file currently read at each path.
    by_path: HashMap<PathBuf, Arc<TrackedFile>>,
}

/// Which sink a tailer reads for. Each sink has a tailer of its own, with its own positions
/// (see `lib.rs`), so a sink that is down holds back only its own reading.
#[derive(Debug, Clone)]
pub struct Lane {
    /// The sink's name, for its metrics.
    pub sink: String,
    /// Whether this tailer reports the per-file gauges (`ztail_checkpoint_lag_bytes{path}`,
    /// `ztail_files_open`): the first sink's does, so that they have one writer.
    pub file_gauges: bool,
}

#[cfg(test)]
impl Default for Lane {
    fn default() -> Self {
        Lane {
            sink: "default".into(),
            file_gauges: true,
        }
    }
}

/// All file sources.
pub struct Tailer {
    lane: Lane,
    sources: Vec<SourceConfig>,
    cfg: TailConfig,
    pub(crate) metrics: Arc<Metrics>,
    state_dir: Arc<StateDir>,
    files: Mutex<Registry>,
    streams: Streams,
    /// Checkpoints loaded at start and not yet claimed by a file.
    resume: Mutex<HashMap<(u64, u64), Entry>>,
    /// Symlinks not followed, reported once each.
    skipped: Mutex<HashSet<PathBuf>>,
    first_start: AtomicBool,
    rescan: Notify,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Chunks read and not yet handed to the pipeline, across all files: without this bound,
    /// every file would hold a read buffer while the pipeline is full (a thousand files, a
    /// quarter of a gigabyte).
    read_permits: Arc<tokio::sync::Semaphore>,
    /// Pod metadata for the sources that ask for it.
    kube: Option<Arc<crate::k8s::Metadata>>,
    /// The journals the journal sources read, each with its position.
    journal: Mutex<Vec<Arc<crate::journal::Chain>>>,
    /// Journal cursors loaded at start; kept in the checkpoint as long as `resume`.
    journal_saved: Mutex<Vec<JournalEntry>>,
}

/// How many files may hold a chunk that is read but not yet queued.
const READS_IN_FLIGHT: usize = 4;

impl Tailer {
    pub fn new(
        sources: Vec<SourceConfig>,
        cfg: TailConfig,
        state_dir: Arc<StateDir>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        kube: Option<Arc<crate::k8s::Metadata>>,
        lane: Lane,
    ) -> Arc<Self> {
        let loaded = state_dir.load();
        Arc::new(Tailer {
            lane,
            sources,
            cfg,
            metrics,
            state_dir,
            files: Mutex::default(),
            streams: Streams::default(),
            resume: Mutex::new(loaded.entries),
            skipped: Mutex::default(),
            first_start: AtomicBool::new(loaded.first_start),
            rescan: Notify::new(),
            cancel,
            tasks: TaskTracker::new(),
            read_permits: Arc::new(tokio::sync::Semaphore::new(READS_IN_FLIGHT)),
            kube,
            journal: Mutex::default(),
            journal_saved: Mutex::new(loaded.journal),
        })
    }

    pub(crate) fn sources(&self) -> &[SourceConfig] {
        &self.sources
    }

    pub(crate) fn streams(&self) -> &Streams {
        &self.streams
    }

    pub(crate) fn read_permits(&self) -> Arc<tokio::sync::Semaphore> {
        self.read_permits.clone()
    }

    pub(crate) fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    pub(crate) fn read_buffer(&self) -> usize {
        self.cfg.read_buffer
    }

    pub(crate) fn add_journal(&self, chain: Arc<crate::journal::Chain>) {
        lock(&self.journal).push(chain);
    }

    pub(crate) fn remove_journal(&self, chain: &Arc<crate::journal::Chain>) {
        lock(&self.journal).retain(|c| !Arc::ptr_eq(c, chain));
    }

    /// The journals read, for `/status`.
    pub fn journals(&self) -> Vec<Arc<crate::journal::Chain>> {
        lock(&self.journal).clone()
    }

    /// Every tracked file, for `/status`.
    pub fn files(&self) -> Vec<Arc<TrackedFile>> {
        let mut v: Vec<_> = lock(&self.files).by_inode.values().cloned().collect();
        v.sort_by_key(|f| f.path());
        v
    }

    /// Runs discovery and the tailers until cancelled; returns once every tailer has stopped,
    /// which drops the last sender of `tx`.
    pub async fn run(self: Arc<Self>, tx: mpsc::Sender<Chunk>) {
        let mut watcher = self.clone().watcher();
        let mut watched = HashSet::new();
        let started = std::time::Instant::now();
        let mut first_pass = true;
        let saved = lock(&self.journal_saved).clone();
        for (i, src) in self.sources.iter().enumerate() {
            if src.journal.is_some() {
                self.tasks.spawn(crate::journal::run(
                    self.clone(),
                    i,
                    tx.clone(),
                    self.first_start.load(Ordering::Relaxed),
                    saved.clone(),
                ));
            }
        }
        loop {
            if let Some(w) = watcher.as_mut() {
                self.watch_dirs(w, &mut watched);
            }
            let this = self.clone();
            let found = tokio::task::spawn_blocking(move || this.scan())
                .await
                .unwrap_or_default();
            if std::mem::take(&mut first_pass) {
                // Before the files at the globs' paths: a rotated file found again is their
                // predecessor and is drained first.
                let at_globs: HashSet<(u64, u64)> =
                    found.iter().map(|(_, _, m)| (m.dev(), m.ino())).collect();
                let this = self.clone();
                let moved = tokio::task::spawn_blocking(move || this.find_moved(&at_globs))
                    .await
                    .unwrap_or_default();
                for m in moved {
                    self.start_moved(m, &tx);
                }
            }
            for (source, path, meta) in found {
                self.start_file(source, path, &meta, &tx);
            }
            self.first_start.store(false, Ordering::Relaxed);
            // Checkpoints not claimed by the scans of the first minute belong to files that are
            // gone or no longer match; they are kept that long in case a file was briefly
            // unreadable, then forgotten so the checkpoint file does not grow forever.
            if started.elapsed() >= UNCLAIMED_CHECKPOINT_TTL {
                lock(&self.journal_saved).clear();
                let mut resume = lock(&self.resume);
                if !resume.is_empty() {
                    tracing::info!(
                        count = resume.len(),
                        "forgetting checkpoints of files that no longer exist or match"
                    );
                    resume.clear();
                }
            }
            tokio::select! {
                _ = self.rescan.notified() => {
                    // Coalesce bursts of events (a rotation is a rename plus a create).
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                _ = tokio::time::sleep(self.cfg.rescan_interval) => {}
                _ = self.cancel.cancelled() => break,
            }
        }
        drop(watcher);
        drop(tx);
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Writes checkpoints every `checkpoint_interval` until cancelled, then once more after
    /// `done` resolves (the sink has finished), so the final state is on disk.
    pub async fn checkpoint_loop(self: Arc<Self>, done: impl std::future::Future<Output = ()>) {
        let mut last = (Vec::new(), Vec::new());
        tokio::pin!(done);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.checkpoint_interval) => self.checkpoint(&mut last),
                _ = &mut done => break,
            }
        }
        self.checkpoint(&mut last);
    }

    fn checkpoint(&self, last: &mut (Vec<Entry>, Vec<JournalEntry>)) {
        let mut entries = Vec::new();
        let (mut open, mut deleted, mut lag) = (0, 0, 0);
        let gauges = self.lane.file_gauges;
        {
            let mut reg = lock(&self.files);
            let mut retired = Vec::new();
            for (key, f) in &reg.by_inode {
                let state = f.state();
                if state == FileState::Closed && f.cursor.is_settled() {
                    retired.push(*key);
                    continue;
                }
                if state != FileState::Closed {
                    open += 1;
                    deleted += f.deleted.load(Ordering::Relaxed) as i64;
                }
                if state != FileState::Closed
                    && let Some(max) = self.cfg.max_rotated_hold
                {
                    self.hold_bound(f, max);
                }
                lag += f.lag() as i64;
                if gauges {
                    self.metrics
                        .checkpoint_lag_bytes
                        .get_or_create(&PathLabel {
                            path: f.path().display().to_string().into(),
                        })
                        .set(f.lag() as i64);
                }
                entries.push(f.entry());
            }
            for key in retired {
                if let Some(f) = reg.by_inode.remove(&key)
                    && gauges
                {
                    self.metrics.checkpoint_lag_bytes.remove(&PathLabel {
                        path: f.path().display().to_string().into(),
                    });
                }
            }
        }
        if gauges {
            self.metrics.files_open.set(open);
            self.metrics.deleted_files_open.set(deleted);
        }
        self.metrics.sink_lag(&self.lane.sink).set(lag);
        // A checkpoint is in `resume` until its file is in the registry; while both hold it
        // (see `track`), the registry's is the newer.
        let tracked: HashSet<(u64, u64)> = entries.iter().map(|e| (e.dev, e.ino)).collect();
        entries.extend(
            lock(&self.resume)
                .values()
                .filter(|e| !tracked.contains(&(e.dev, e.ino)))
                .cloned(),
        );
        entries.sort_by_key(|e| (e.dev, e.ino));
        let journal = self.journal_entries();
        if entries == last.0 && journal == last.1 && self.state_dir.is_intact() {
            return;
        }
        match self.state_dir.save_all(&entries, &journal) {
            Ok(()) => *last = (entries, journal),
            Err(e) => {
                self.metrics.checkpoint_write_errors.inc();
                tracing::error!(dir = %self.state_dir.path().display(), error = %e, "cannot write checkpoints; positions are kept in memory and retried (a crash now re-sends more lines)");
            }
        }
    }

    /// Gives up a file renamed or deleted away that this tailer's sink has still not
    /// acknowledged to its end after `max`: its task closes it (a deleted file's disk space is
    /// freed) and counts what the sink may have lost of it. A file that comes back to its path
    /// starts the clock again when it next leaves.
    fn hold_bound(&self, f: &TrackedFile, max: std::time::Duration) {
        if f.abandoned.load(Ordering::Relaxed) {
            return;
        }
        if !f.moved_away() {
            *lock(&f.away_since) = None;
            return;
        }
        let since = *lock(&f.away_since).get_or_insert_with(std::time::Instant::now);
        if since.elapsed() < max || f.lag() == 0 {
            return;
        }
        f.abandoned.store(true, Ordering::Relaxed);
        f.stop.cancel();
    }

    /// The journal cursors to save: each journal's, and those loaded at start whose journal
    /// has not been found (yet).
    fn journal_entries(&self) -> Vec<JournalEntry> {
        let chains = lock(&self.journal).clone();
        let mut out: Vec<JournalEntry> = chains.iter().filter_map(|c| c.entry()).collect();
        for j in lock(&self.journal_saved).iter() {
            let live = crate::journal::file::parse_cursor(&j.cursor).is_some_and(|(id, _)| {
                chains
                    .iter()
                    .any(|c| c.source == j.journal && c.seqnum_id == id)
            });
            if !live {
                out.push(j.clone());
            }
        }
        out
    }

    /// Lists the regular files matching each source's globs.
    fn scan(&self) -> Vec<(usize, PathBuf, Metadata)> {
        let mut out = Vec::new();
        for (i, src) in self.sources.iter().enumerate() {
            for pattern in &src.include {
                let Ok(paths) = glob::glob_with(pattern, GLOB_OPTIONS) else {
                    continue;
                };
                for path in paths.flatten() {
                    if src.exclude.is_match(&path) {
                        continue;
                    }
                    if !self.may_follow(src, &path) {
                        continue;
                    }
                    // Follows symlinks; directories, FIFOs and sockets are skipped here so that
                    // opening never blocks.
                    match std::fs::metadata(&path) {
                        Ok(m) if m.is_file() => out.push((i, path, m)),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(path = %path.display(), error = %e, "cannot stat")
                        }
                    }
                }
            }
        }
        out
    }

    fn start_file(
        self: &Arc<Self>,
        source: usize,
        path: PathBuf,
        meta: &Metadata,
        tx: &mpsc::Sender<Chunk>,
    ) {
        let key = (meta.dev(), meta.ino());
        {
            let mut reg = lock(&self.files);
            if let Some(f) = reg.by_inode.get(&key).cloned() {
                // Known file. If it was renamed to a path that still matches, follow it there,
                // and let go of the old path so that the file now created there is tailed. A
                // second name for the same file (a hard link, or a symlink the glob also
                // matches) is not a rename: the file stays where it is.
                let old = f.path();
                if old != path
                    && f.state() != FileState::Closed
                    && !reg.by_path.contains_key(&path)
                    && !f.is_at(&old)
                {
                    if reg
                        .by_path
                        .get(&old)
                        .is_some_and(|cur| Arc::ptr_eq(cur, &f))
                    {
                        reg.by_path.remove(&old);
                        // The old path may already have been passed over in this scan.
                        self.rescan.notify_one();
                    }
                    *lock(&f.path) = path.clone();
                    reg.by_path.insert(path, f.clone());
                    f.wake.notify_one();
                }
                return;
            }
            if let Some(old) = reg.by_path.get(&path) {
                // The file at this path was replaced; its predecessor is drained first.
                old.wake.notify_one();
                return;
            }
        }
        let Some((file, fmeta)) = open_regular(&path, key) else {
            return;
        };
        let src = &self.sources[source];
        let start = match self.start_position(&file, &fmeta, &path, src.start_at) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a matching file; will retry at the next scan");
                return;
            }
        };
        self.track(source, path, file, &fmeta, start, tx);
    }

    /// Starts the tailer task of an open file at `start`. `path` is where the file is (or, for
    /// a rotated file found again, was) matched; it names its streams.
    fn track(
        self: &Arc<Self>,
        source: usize,
        path: PathBuf,
        file: File,
        fmeta: &Metadata,
        start: Position,
        tx: &mpsc::Sender<Chunk>,
    ) {
        let src = &self.sources[source];
        let key = (fmeta.dev(), fmeta.ino());
        let reader = match FileReader::new(
            file,
            start.offset,
            src.framing.clone(),
            self.cfg.read_buffer,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a matching file; will retry at the next scan");
                return;
            }
        };
        let tracked = Arc::new(TrackedFile {
            dev: key.0,
            ino: key.1,
            source: src.name.clone(),
            path: Mutex::new(path.clone()),
            cursor: Arc::new(Cursor::new(start)),
            read_offset: AtomicU64::new(start.offset),
            size: AtomicU64::new(fmeta.len()),
            head: Mutex::new(reader.fingerprint()),
            state: AtomicU8::new(FileState::Active as u8),
            deleted: AtomicBool::new(false),
            wake: Notify::new(),
            stop: self.cancel.child_token(),
            away_since: Mutex::new(None),
            abandoned: AtomicBool::new(false),
        });
        {
            let mut reg = lock(&self.files);
            reg.by_inode.insert(key, tracked.clone());
            reg.by_path
                .entry(path.clone())
                .or_insert_with(|| tracked.clone());
            // Only now, with the file in the registry, does its checkpoint leave `resume`: a
            // checkpoint written in between must still name it, or a crash right then would
            // forget a file that only its checkpoint can find (one rotated outside the globs).
            lock(&self.resume).remove(&key);
        }
        tracing::info!(path = %path.display(), source = %src.name, offset = start.offset, "tailing");
        let ctx = file::Context {
            tailer: self.clone(),
            tx: tx.clone(),
            max_partial_age: src.framing.max_partial_age(src.partial_line_timeout),
            rotate_wait: src.rotate_wait,
            source,
            named: path,
        };
        self.tasks.spawn(file::run(tracked, reader, ctx));
    }

    /// Checkpoints of files that are no longer at their paths: rotated away (logrotate's
    /// `app.log.1`, the kubelet's `0.log.<timestamp>`, also outside every glob) before ztail
    /// had drained them, then ztail stopped or crashed. Each is looked for among the siblings
    /// of its old path, by device and inode; [`Tailer::start_moved`] then confirms it by its
    /// fingerprint and the bytes before its offset. Only at start, for at most
    /// [`MAX_MOVED_SEARCH`] checkpoints, reading each directory once.
    fn find_moved(&self, at_globs: &HashSet<(u64, u64)>) -> Vec<Moved> {
        use std::os::unix::fs::DirEntryExt;
        let mut by_dir: HashMap<PathBuf, HashMap<u64, Entry>> = HashMap::new();
        for e in lock(&self.resume)
            .values()
            .filter(|e| !at_globs.contains(&(e.dev, e.ino)))
            .take(MAX_MOVED_SEARCH)
        {
            if let Some(dir) = e.path.parent() {
                by_dir
                    .entry(dir.to_owned())
                    .or_default()
                    .insert(e.ino, e.clone());
            }
        }
        let mut out = Vec::new();
        for (dir, mut wanted) in by_dir {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for found in entries.flatten() {
                let Some(e) = wanted.get(&found.ino()) else {
                    continue;
                };
                let path = found.path();
                let same_inode = std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == (e.dev, e.ino));
                // A new name that a glob matches is the scans' to claim (the first scan may
                // have missed it while it was being renamed).
                if !same_inode || self.source_of(&path).is_some() {
                    continue;
                }
                let Some(source) = self.source_of(&e.path) else {
                    continue;
                };
                let Some(e) = wanted.remove(&found.ino()) else {
                    continue;
                };
                out.push(Moved {
                    source,
                    was: e.path,
                    now: path,
                    key: (e.dev, e.ino),
                });
                if wanted.is_empty() {
                    break;
                }
            }
        }
        out
    }

    /// Drains a rotated file found by [`Tailer::find_moved`] from its checkpoint, if it is
    /// provably the file the checkpoint was taken of. It is tracked under its old path (its
    /// streams keep their `filename`), which no longer names it, so its task treats it as
    /// rotated: read to its end, kept for `rotate_wait`, closed once acknowledged.
    fn start_moved(self: &Arc<Self>, m: Moved, tx: &mpsc::Sender<Chunk>) {
        let Some((file, fmeta)) = open_regular(&m.now, m.key) else {
            return;
        };
        let Some(e) = lock(&self.resume).get(&m.key).cloned() else {
            return;
        };
        let start = match verify(&file, fmeta.len(), &e) {
            // Acknowledged to its end: nothing to do. The checkpoint stays (and is forgotten
            // with the other unclaimed ones), so nothing is read twice if the file is found at
            // a glob's path after all.
            Ok(Verdict::Same(p)) if p.offset == fmeta.len() => return,
            Ok(Verdict::Same(p)) => Ok(p),
            // Its first bytes are those ztail was reading, but it shrank or changed below the
            // offset (a copytruncate before the rotation): read again from its start, as
            // ztail does with a truncated file at its path.
            Ok(Verdict::Changed) => {
                self.metrics.file_truncations.inc();
                Ok(Position::default())
            }
            Ok(Verdict::OtherFile) => Err(None),
            Err(e) => Err(Some(e)),
        };
        match start {
            Ok(start) => {
                self.metrics.rotated_files_found.inc();
                tracing::info!(path = %m.was.display(), now_at = %m.now.display(), offset = start.offset, unacknowledged_bytes = fmeta.len() - start.offset, "found a file rotated away before it was drained; draining it from its checkpoint");
                self.track(m.source, m.was, file, &fmeta, start, tx);
            }
            Err(None) => {
                tracing::info!(path = %m.was.display(), now_at = %m.now.display(), "a file with the inode of a rotated file's checkpoint holds other bytes; not read");
            }
            Err(Some(e)) => {
                tracing::warn!(path = %m.now.display(), error = %e, "cannot read a rotated file found again; its unacknowledged tail is not shipped");
            }
        }
    }

    /// The source whose globs match `path`, if any.
    fn source_of(&self, path: &Path) -> Option<usize> {
        self.sources.iter().position(|src| matches_globs(src, path))
    }

    /// Whether a path the globs matched may be read: a symlink only if its target also matches
    /// one of the source's globs or lies under one of its `follow_symlinks_under` roots.
    /// Otherwise whoever can create a symlink in a watched directory could ship any file ztail
    /// can read (another tenant's log, a key). Skips are logged and counted once per path.
    fn may_follow(&self, src: &SourceConfig, path: &Path) -> bool {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return true; // gone; the stat that follows says so
        };
        if !meta.file_type().is_symlink() {
            return true;
        }
        let Ok(target) = std::fs::canonicalize(path) else {
            return true; // dangling; skipped as unreadable
        };
        let matches_glob = matches_globs(src, &target);
        let under_root = src.follow_symlinks_under.iter().any(|root| {
            target.starts_with(root)
                || std::fs::canonicalize(root).is_ok_and(|root| target.starts_with(root))
        });
        if matches_glob || under_root {
            return true;
        }
        let mut reported = lock(&self.skipped);
        if reported.len() >= MAX_SKIPPED_REMEMBERED {
            reported.clear();
        }
        if reported.insert(path.to_owned()) {
            self.metrics
                .files_skipped
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: "symlink_outside".into(),
                })
                .inc();
            tracing::warn!(path = %path.display(), target = %target.display(), source = %src.name, "not following a symlink whose target matches none of the source's globs; add its directory to the source's follow_symlinks_under if it should be read");
        }
        false
    }

    /// Where to start reading a newly found file: its checkpoint if it is provably the same file,
    /// else `start_at` for files present at the very first start, else the beginning.
    fn start_position(
        &self,
        file: &File,
        meta: &Metadata,
        path: &Path,
        start_at: StartAt,
    ) -> std::io::Result<Position> {
        let key = (meta.dev(), meta.ino());
        // Left in `resume` until the file is tracked (see `track`).
        let saved = lock(&self.resume).get(&key).cloned();
        if let Some(e) = saved {
            match verify(file, meta.len(), &e)? {
                Verdict::Same(p) => return Ok(p),
                Verdict::OtherFile => {
                    tracing::info!(path = %path.display(), "inode reused by a different file; reading it from the beginning");
                }
                Verdict::Changed => {
                    self.metrics.file_truncations.inc();
                    tracing::warn!(path = %path.display(), offset = e.offset, size = meta.len(), "file changed below its checkpoint while ztail was down (truncated?); reading it from the beginning");
                }
            }
            return Ok(Position::default());
        }
        if self.first_start.load(Ordering::Relaxed) && start_at == StartAt::End {
            let size = meta.len();
            let from = size.saturating_sub(crate::pipeline::TAIL_LEN as u64);
            let mut tail = vec![0; (size - from) as usize];
            file.read_exact_at(&mut tail, from)?;
            return Ok(Position {
                offset: size,
                tail_len: tail.len() as u32,
                tail_hash: hash(&tail),
            });
        }
        Ok(Position::default())
    }

    /// A path stopped pointing at this file: let its successor be found.
    fn release_path(&self, f: &Arc<TrackedFile>) {
        let path = f.path();
        let mut reg = lock(&self.files);
        if reg
            .by_path
            .get(&path)
            .is_some_and(|cur| Arc::ptr_eq(cur, f))
        {
            reg.by_path.remove(&path);
        }
        drop(reg);
        self.rescan.notify_one();
    }

    fn watcher(self: Arc<Self>) -> Option<notify::RecommendedWatcher> {
        let weak = Arc::downgrade(&self);
        let result = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let (Ok(event), Some(t)) = (res, weak.upgrade()) else {
                return;
            };
            t.on_event(&event);
        });
        match result {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "file events unavailable; relying on rescans and polling");
                None
            }
        }
    }

    fn on_event(&self, event: &notify::Event) {
        use notify::EventKind;
        let structural = matches!(
            event.kind,
            EventKind::Create(_)
                | EventKind::Remove(_)
                | EventKind::Modify(notify::event::ModifyKind::Name(_))
        );
        let reg = lock(&self.files);
        for p in &event.paths {
            if let Some(f) = reg.by_path.get(p) {
                f.wake.notify_one();
            }
        }
        drop(reg);
        if structural {
            self.rescan.notify_one();
        }
    }

    fn watch_dirs(&self, w: &mut notify::RecommendedWatcher, watched: &mut HashSet<PathBuf>) {
        use notify::Watcher;
        for src in &self.sources {
            for pattern in &src.include {
                let (dir, recursive) = watch_root(pattern);
                if watched.contains(&dir) {
                    continue;
                }
                let mode = if recursive {
                    notify::RecursiveMode::Recursive
                } else {
                    notify::RecursiveMode::NonRecursive
                };
                if w.watch(&dir, mode).is_ok() {
                    watched.insert(dir);
                }
            }
        }
    }
}

/// How glob patterns match paths (scans, and matching a path found otherwise).
const GLOB_OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Whether `path` matches one of the source's include globs and none of its excludes, as a
/// scan would find it. (Only for paths found otherwise: rotated files, symlink targets.)
fn matches_globs(src: &SourceConfig, path: &Path) -> bool {
    !src.exclude.is_match(path)
        && src
            .include
            .iter()
            .any(|p| glob::Pattern::new(p).is_ok_and(|p| p.matches_path_with(path, GLOB_OPTIONS)))
}

/// At most this many checkpoints are looked for among their old siblings at start.
const MAX_MOVED_SEARCH: usize = 1000;

/// Skipped symlinks remembered so that each is reported once (then forgotten all at once).
const MAX_SKIPPED_REMEMBERED: usize = 10_000;

/// A rotated file found again at start (see [`Tailer::find_moved`]).
struct Moved {
    source: usize,
    /// The path its checkpoint names.
    was: PathBuf,
    /// Where it is now.
    now: PathBuf,
    key: (u64, u64),
}

/// Opens a regular file without blocking (FIFOs) and checks it is still the inode `key`.
fn open_regular(path: &Path, key: (u64, u64)) -> Option<(File, Metadata)> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open a matching file; will retry at the next scan (check its permissions)");
            return None;
        }
    };
    let meta = file.metadata().ok()?;
    // Replaced between stat and open: the next scan sees the new one.
    (meta.is_file() && (meta.dev(), meta.ino()) == key).then_some((file, meta))
}

/// What a checkpoint says about an open file with its inode.
enum Verdict {
    /// Same first bytes and same bytes before the offset: resume there.
    Same(Position),
    /// Other first bytes: the inode was reused by another file.
    OtherFile,
    /// Same start, but shorter than the offset or other bytes before it.
    Changed,
}

fn verify(file: &File, size: u64, e: &Entry) -> std::io::Result<Verdict> {
    let head = read_head(file, e.head_len as usize)?;
    if head.len() != e.head_len as usize || hash(&head) != e.head_hash {
        return Ok(Verdict::OtherFile);
    }
    if e.offset == 0 {
        // Nothing was acknowledged yet: there is nothing below the checkpoint to compare.
        return Ok(Verdict::Same(Position::default()));
    }
    if size >= e.offset {
        // Bounded when the checkpoint was parsed: tail_len <= TAIL_LEN and <= offset.
        let mut tail = vec![0; e.tail_len as usize];
        file.read_exact_at(&mut tail, e.offset - e.tail_len as u64)?;
        if hash(&tail) == e.tail_hash {
            return Ok(Verdict::Same(Position {
                offset: e.offset,
                tail_len: e.tail_len,
                tail_hash: e.tail_hash,
            }));
        }
    }
    Ok(Verdict::Changed)
}

/// The directory to watch for a glob pattern: its longest literal prefix, recursively if a
/// directory component has wildcards.
fn watch_root(pattern: &str) -> (PathBuf, bool) {
    let is_glob = |c: &str| c.contains(['*', '?', '[', '{']);
    let comps: Vec<&str> = pattern.split('/').collect();
    let first_glob = comps
        .iter()
        .position(|c| is_glob(c))
        .unwrap_or(comps.len() - 1);
    let dir = comps[..first_glob].join("/");
    let dir = if dir.is_empty() { "/".to_owned() } else { dir };
    (PathBuf::from(dir), first_glob < comps.len() - 1)
}

/// The label sets of a file's streams: the source's static labels, `filename`, the labels
/// captured from the path, and `stream` when CRI/Docker streams are labels (then two sets,
/// stdout's and stderr's, which a framed entry's `sub` indexes).
pub fn label_sets(src: &SourceConfig, path: &Path) -> Vec<LabelSet> {
    let path = path.to_string_lossy();
    let mut labels = src.labels.with(FILENAME, &path);
    if let Some(re) = &src.path_labels
        && let Some(caps) = re.captures(&path)
    {
        for name in re.capture_names().flatten() {
            // Values are escaped when rendered; invalid ones (empty, too long) are left out.
            if let Some(m) = caps.name(name)
                && crate::loki::labels::validate_value(m.as_str()).is_ok()
            {
                labels = labels.with(name, m.as_str());
            }
        }
    }
    match src.framing.stream_label() {
        true => format::STREAMS
            .iter()
            .map(|s| labels.with(format::STREAM, s))
            .collect(),
        false => vec![labels],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_roots() {
        assert_eq!(
            watch_root("/var/log/app/*.log"),
            (PathBuf::from("/var/log/app"), false)
        );
        assert_eq!(
            watch_root("/var/log/pods/*/*/*.log"),
            (PathBuf::from("/var/log/pods"), true)
        );
        assert_eq!(
            watch_root("/var/log/**/x.log"),
            (PathBuf::from("/var/log"), true)
        );
        assert_eq!(
            watch_root("/var/log/a.log"),
            (PathBuf::from("/var/log"), false)
        );
    }
}

#[cfg(test)]
mod rotation_tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    /// A tailer over `dir/app.log*`. The tests enter a current-thread runtime that is never
    /// yielded to: the file tasks do not run, so only the scans act.
    fn tailer_over(dir: &Path) -> Arc<Tailer> {
        Tailer::new(
            vec![super::tailer_model_tests::source(dir)],
            TailConfig {
                rescan_interval: Duration::from_secs(10),
                checkpoint_interval: Duration::from_secs(1),
                read_buffer: 4096,
                max_rotated_hold: None,
            },
            Arc::new(StateDir::open(&dir.join("state")).unwrap()),
            Arc::new(Metrics::new()),
            CancellationToken::new(),
            None,
            Lane::default(),
        )
    }

    fn scan(tailer: &Arc<Tailer>, tx: &mpsc::Sender<Chunk>) {
        for (source, path, meta) in tailer.scan() {
            tailer.start_file(source, path, &meta, tx);
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Found by the tailer model's long mode: when a scan followed a renamed file before the
    /// file's own task noticed the rename, the old path stayed claimed by the rotated file and
    /// the file created there was never tailed.
    #[test]
    fn a_scan_that_follows_a_rename_frees_the_old_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let log = dir.join("app.log");
        std::fs::write(&log, "first\n").unwrap();
        let tailer = tailer_over(dir);
        let rt = runtime();
        let _guard = rt.enter();
        let (tx, _rx) = mpsc::channel(8);
        scan(&tailer, &tx);
        std::fs::rename(&log, dir.join("app.log.1")).unwrap();
        std::fs::File::create(&log)
            .unwrap()
            .write_all(b"second\n")
            .unwrap();
        scan(&tailer, &tx); // follows the rename; `app.log` sorts first, so it was passed over
        scan(&tailer, &tx);
        let new_ino = std::fs::metadata(&log).unwrap().ino();
        let paths: Vec<(PathBuf, u64)> = tailer.files().iter().map(|f| (f.path(), f.ino)).collect();
        assert!(
            paths.contains(&(log.clone(), new_ino)),
            "the file created at the rotated path is tailed: {paths:?}"
        );
        assert!(
            paths.iter().any(|(p, _)| p == &dir.join("app.log.1")),
            "the rotated file is followed: {paths:?}"
        );
    }

    /// A checkpoint of `path` as it is now, fully acknowledged, written to `dir/state`.
    fn checkpoint_of(dir: &Path, path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        let meta = std::fs::metadata(path).unwrap();
        let tail = &bytes[bytes.len().saturating_sub(crate::pipeline::TAIL_LEN)..];
        let entry = Entry {
            dev: meta.dev(),
            ino: meta.ino(),
            path: path.to_owned(),
            head_len: bytes.len().min(reader::HEAD_LEN) as u32,
            head_hash: hash(&bytes[..bytes.len().min(reader::HEAD_LEN)]),
            offset: bytes.len() as u64,
            tail_len: tail.len() as u32,
            tail_hash: hash(tail),
        };
        StateDir::open(&dir.join("state"))
            .unwrap()
            .save(&[entry])
            .unwrap();
    }

    /// Found by the tailer model under load: a file renamed to a name its glob matches while
    /// ztail started was missed by the first scan, taken for one rotated outside the globs,
    /// found acknowledged to its end, and its checkpoint dropped, so the next scan read it
    /// again from its start. Only names outside the globs are looked for.
    #[test]
    fn only_files_outside_the_globs_are_looked_for_as_rotated() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let log = dir.join("app.log");
        std::fs::write(&log, "one\ntwo\n").unwrap();
        checkpoint_of(dir, &log);
        std::fs::rename(&log, dir.join("app.log.3")).unwrap();
        let tailer = tailer_over(dir);
        let moved = tailer.find_moved(&HashSet::new());
        assert!(
            moved.is_empty(),
            "a name the glob matches is the scans' to claim"
        );
        drop(tailer);

        std::fs::rename(dir.join("app.log.3"), dir.join("rotated")).unwrap();
        let tailer = tailer_over(dir);
        let moved = tailer.find_moved(&HashSet::new());
        assert_eq!(moved.len(), 1);
        assert_eq!(
            (moved[0].was.clone(), moved[0].now.clone()),
            (log, dir.join("rotated"))
        );
    }

    /// A symlink the glob also matches is a second name, not a rename: the file keeps its path
    /// (following it back and forth would rescan forever).
    #[test]
    fn a_second_name_for_a_file_is_not_a_rename() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("app.log"), "one\n").unwrap();
        std::os::unix::fs::symlink(dir.join("app.log"), dir.join("app.log.link")).unwrap();
        let tailer = tailer_over(dir);
        let rt = runtime();
        let _guard = rt.enter();
        let (tx, _rx) = mpsc::channel(8);
        let mut seen = Vec::new();
        for _ in 0..3 {
            scan(&tailer, &tx);
            let paths: Vec<PathBuf> = tailer.files().iter().map(|f| f.path()).collect();
            assert_eq!(paths.len(), 1, "one inode, one tracked file: {paths:?}");
            seen.push(paths[0].clone());
        }
        assert!(
            seen.iter().all(|p| p == &dir.join("app.log")),
            "the file stays at its first name: {seen:?}"
        );
    }
}
