//! What flows from the tailers to the Loki sink, and the acknowledgements that flow back.
//!
//! A tailer hands the pipeline [`Chunk`]s: the bytes it read from one file, the [`Entry`]s in
//! them (text range, timestamp, structured metadata) and the file [`Position`] just after them.
//! Chunks are never copied between stages: the batcher groups them into a [`Batch`] per label
//! set, the sink encodes the batch once, and on a 2xx the [`ack::AckTracker`] advances each
//! file's committed position, which is the only position the checkpointer ever persists.

pub mod ack;
pub mod batcher;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// A place in a file: the byte offset after the last consumed byte, and a hash of the bytes just
/// before it so that a resume can tell whether the file is still the one that was read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    /// Number of bytes before `offset` covered by `tail_hash` (at most [`TAIL_LEN`]).
    pub tail_len: u32,
    pub tail_hash: u64,
}

/// How many bytes before a position its hash covers.
pub const TAIL_LEN: usize = 64;

/// Acknowledgement state of one source file: positions handed to the sink and not yet
/// acknowledged, and the committed position (everything before it is in Loki).
#[derive(Debug, Default)]
pub struct Cursor {
    pending: Mutex<VecDeque<(u64, Position)>>,
    committed: Mutex<Position>,
}

impl Cursor {
    /// A cursor whose committed position is where reading starts.
    pub fn new(start: Position) -> Self {
        Cursor {
            pending: Mutex::default(),
            committed: Mutex::new(start),
        }
    }

    pub fn committed(&self) -> Position {
        *lock(&self.committed)
    }

    /// True when every position handed to the sink has been acknowledged.
    pub fn is_settled(&self) -> bool {
        lock(&self.pending).is_empty()
    }
}

/// The wall clock in Unix nanoseconds, the unit of entry timestamps.
pub fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The wall clock in Unix seconds, for what `/status` shows.
pub fn unix_seconds() -> i64 {
    unix_nanos() / 1_000_000_000
}

/// Locks a mutex, ignoring poisoning: every critical section in ztail leaves its data
/// consistent at each step, and the release profile aborts on panic anyway.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One Loki stream: its rendered label string and a clock that hands out strictly increasing
/// timestamps, so the entries of a stream keep their read order in Loki even when two files (a
/// rotated one and its successor) feed the same stream.
#[derive(Debug)]
pub struct Stream {
    pub labels: String,
    pub label_pairs: Vec<(String, String)>,
    /// The tenant a `tenant` stage chose (`X-Scope-OrgID`); `None` for the sink's.
    pub tenant: Option<Arc<str>>,
    /// Labels and tenant: what tells streams apart.
    pub key: String,
    clock: AtomicI64,
}

impl Stream {
    pub fn new(labels: &crate::loki::labels::LabelSet) -> Self {
        Stream::with_tenant(labels, None)
    }

    pub fn with_tenant(labels: &crate::loki::labels::LabelSet, tenant: Option<Arc<str>>) -> Self {
        let rendered = labels.render();
        Stream {
            key: stream_key(&rendered, tenant.as_deref()),
            labels: rendered,
            label_pairs: labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            tenant,
            clock: AtomicI64::new(0),
        }
    }

    /// Reserves `n` consecutive nanosecond timestamps at or after now; returns the first.
    pub fn reserve_timestamps(&self, n: usize) -> i64 {
        let now = unix_nanos();
        let n = n.max(1) as i64;
        let mut last = self.clock.load(Ordering::Relaxed);
        loop {
            let first = now.max(last + 1);
            match self.clock.compare_exchange_weak(
                last,
                first + n - 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return first,
                Err(actual) => last = actual,
            }
        }
    }
}

fn stream_key(labels: &str, tenant: Option<&str>) -> String {
    match tenant {
        Some(t) => format!("{labels}\u{0}{t}"),
        None => labels.to_owned(),
    }
}

/// Every stream ztail has made, so that the files feeding a stream (a rotated file and its
/// successor, two files whose stages set the same labels) share its clock.
#[derive(Debug, Default)]
pub struct Streams {
    known: Mutex<HashMap<String, Arc<Stream>>>,
}

impl Streams {
    pub fn get(
        &self,
        labels: &crate::loki::labels::LabelSet,
        tenant: Option<Arc<str>>,
    ) -> Arc<Stream> {
        let key = stream_key(&labels.render(), tenant.as_deref());
        lock(&self.known)
            .entry(key)
            .or_insert_with(|| Arc::new(Stream::with_tenant(labels, tenant)))
            .clone()
    }
}

/// One log entry of a [`Chunk`]: its text in the chunk's data, its timestamp and its
/// structured metadata (a range of the chunk's `meta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub start: u32,
    pub end: u32,
    /// Unix nanoseconds; 0 until the tailer stamps the entry with its read time.
    pub ts: i64,
    pub meta_start: u32,
    pub meta_len: u16,
    /// Which of the file's streams the entry belongs to: its CRI/Docker `stream` when that is
    /// a label, then the route the stages chose ([`crate::stage::Runner::routes`]).
    pub sub: u16,
}

impl Entry {
    /// An entry with the text `start..end` and no timestamp or metadata yet.
    pub fn text(start: usize, end: usize) -> Entry {
        Entry {
            start: start as u32,
            end: end as u32,
            ts: 0,
            meta_start: 0,
            meta_len: 0,
            sub: 0,
        }
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// One structured-metadata field of an entry: the index of its name in the chunk's
/// `meta_names` and its value in the chunk's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub name: u8,
    pub start: u32,
    pub end: u32,
}

/// Bytes read from one file and the entries in them. Entry texts are valid UTF-8 without their
/// line terminator. The data is shared (a split for a 413 does not copy it).
#[derive(Debug)]
pub struct Chunk {
    pub stream: Arc<Stream>,
    pub cursor: Arc<Cursor>,
    pub data: Bytes,
    pub entries: Vec<Entry>,
    pub meta: Arc<[Meta]>,
    pub meta_names: Arc<[String]>,
    /// The file position after the last byte this chunk consumed.
    pub end: Position,
    /// The chunk's file has just caught up with a backlog (see [`ReadLines::caught_up`]): its
    /// batch goes now rather than waiting out `batch_wait`, which would only delay the end of a
    /// burst. At most two early requests per read buffer of input.
    ///
    /// [`ReadLines::caught_up`]: crate::tail::reader::ReadLines::caught_up
    pub caught_up: bool,
}

impl Chunk {
    pub fn line(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        &self.data[e.start as usize..e.end as usize]
    }

    /// The structured metadata of entry `i`, as (name, value) pairs.
    pub fn metadata(&self, i: usize) -> impl Iterator<Item = (&str, &[u8])> {
        let e = &self.entries[i];
        let start = e.meta_start as usize;
        self.meta[start..start + e.meta_len as usize]
            .iter()
            .map(|m| {
                (
                    self.meta_names[m.name as usize].as_str(),
                    &self.data[m.start as usize..m.end as usize],
                )
            })
    }

    pub fn line_bytes(&self) -> usize {
        self.entries.iter().map(Entry::len).sum()
    }

    /// Splits off the entries from `at` on into a new chunk sharing the data. Only the 413 path
    /// uses it.
    fn split_off(&mut self, at: usize) -> Chunk {
        Chunk {
            stream: self.stream.clone(),
            cursor: self.cursor.clone(),
            data: self.data.clone(),
            entries: self.entries.split_off(at),
            meta: self.meta.clone(),
            meta_names: self.meta_names.clone(),
            end: self.end,
            caught_up: false,
        }
    }
}

/// What one read of a source became: its entries (each `sub` indexing `routes`), the data and
/// metadata they point into, and the positions before and after the read.
pub struct Read<'a> {
    pub routes: &'a [Arc<Stream>],
    pub cursor: &'a Arc<Cursor>,
    pub data: Bytes,
    pub entries: Vec<Entry>,
    pub meta: Arc<[Meta]>,
    pub meta_names: &'a Arc<[String]>,
    pub start: Position,
    pub end: Position,
    pub caught_up: bool,
}

impl Read<'_> {
    /// One chunk per stream, each keeping its entries' order. Only the last carries the read's
    /// end (the committed position cannot pass the read until every one of them is
    /// acknowledged) and whether the read ended a backlog; the others carry its start.
    pub fn into_chunks(self) -> Vec<Chunk> {
        let Read {
            routes,
            cursor,
            data,
            mut entries,
            meta,
            meta_names,
            start,
            end,
            caught_up,
        } = self;
        let chunk = |sub: usize, entries: Vec<Entry>| Chunk {
            stream: routes[sub].clone(),
            cursor: cursor.clone(),
            data: data.clone(),
            entries,
            meta: meta.clone(),
            meta_names: meta_names.clone(),
            end: start,
            caught_up: false,
        };
        let first_sub = entries.first().map_or(0, |e| e.sub as usize);
        let mut chunks = if entries.iter().all(|e| e.sub as usize == first_sub) {
            vec![chunk(first_sub, entries)]
        } else {
            entries.sort_by_key(|e| e.sub);
            entries
                .chunk_by(|a, b| a.sub == b.sub)
                .map(|run| chunk(run[0].sub as usize, run.to_vec()))
                .collect()
        };
        if let Some(last) = chunks.last_mut() {
            last.end = end;
            last.caught_up = caught_up;
        }
        chunks
    }
}

/// The chunks of one stream within a batch.
#[derive(Debug)]
pub struct StreamBatch {
    pub stream: Arc<Stream>,
    pub chunks: Vec<Chunk>,
}

impl StreamBatch {
    pub fn entries(&self) -> usize {
        self.chunks.iter().map(|c| c.entries.len()).sum()
    }
}

/// Chunks grouped by stream, sent as one push request.
#[derive(Debug)]
pub struct Batch {
    pub streams: Vec<StreamBatch>,
    /// Every stream of a batch has this tenant (`None`: the sink's).
    pub tenant: Option<Arc<str>>,
    /// The batch's number in the [`ack::AckTracker`].
    pub seq: u64,
    pub line_bytes: usize,
    pub entries: usize,
    pub opened: Instant,
}

impl Batch {
    pub fn new() -> Self {
        Batch {
            streams: Vec::new(),
            tenant: None,
            seq: 0,
            line_bytes: 0,
            entries: 0,
            opened: Instant::now(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub fn push(&mut self, chunk: Chunk) {
        if self.streams.is_empty() {
            self.opened = Instant::now();
        }
        self.line_bytes += chunk.line_bytes();
        self.entries += chunk.entries.len();
        // Few streams per batch in practice; a linear scan beats hashing here.
        match self
            .streams
            .iter_mut()
            .find(|s| Arc::ptr_eq(&s.stream, &chunk.stream))
        {
            Some(s) => s.chunks.push(chunk),
            None => self.streams.push(StreamBatch {
                stream: chunk.stream.clone(),
                chunks: vec![chunk],
            }),
        }
    }

    /// The last position of every file in this batch, in the order chunks arrived.
    pub fn positions(&self) -> Vec<(Arc<Cursor>, Position)> {
        let mut out: Vec<(Arc<Cursor>, Position)> = Vec::new();
        for c in self.streams.iter().flat_map(|s| &s.chunks) {
            match out.iter_mut().find(|(k, _)| Arc::ptr_eq(k, &c.cursor)) {
                Some(slot) => slot.1 = c.end,
                None => out.push((c.cursor.clone(), c.end)),
            }
        }
        out
    }

    /// Splits into two batches of about half the entries each (for a 413). `None` when the batch
    /// holds a single entry.
    pub fn split(self) -> Result<(Batch, Batch), Batch> {
        if self.entries < 2 {
            return Err(self);
        }
        let half = self.entries / 2;
        let mut first = Batch::new();
        let mut second = Batch::new();
        first.tenant = self.tenant.clone();
        second.tenant = self.tenant.clone();
        let mut taken = 0;
        for s in self.streams {
            for mut c in s.chunks {
                let n = c.entries.len();
                if taken >= half {
                    second.push(c);
                } else if taken + n <= half {
                    taken += n;
                    first.push(c);
                } else {
                    let rest = c.split_off(half - taken);
                    taken = half;
                    first.push(c);
                    second.push(rest);
                }
            }
        }
        Ok((first, second))
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}
