//! One systemd journal file, read the way ztail needs it: entries in the order they were
//! linked, each with its `MESSAGE`, its realtime timestamp, its cursor and the few fields the
//! source asked for, and nothing else decoded.
//!
//! The layout is systemd's documented journal file format (`docs/journal-readers.md` lists the
//! facts used). Reads go through `pread` and a small block cache; no `mmap`, so a file that
//! shrinks or has holes punched into it (vacuuming) reads as zeros or short, which shows up as
//! an error here rather than a `SIGBUS`.
//!
//! A live file is read up to its header's `n_entries`, the number of entries linked into the
//! global entry array: journald links an entry only once it and its data objects are written.
//! Every read pass starts with [`JournalFile::refresh`], which re-reads the header and forgets
//! the cached blocks when entries were added (a block read earlier may predate them).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The header fields ztail reads (all little-endian).
mod off {
    pub const SIGNATURE: usize = 0;
    pub const INCOMPATIBLE: usize = 12;
    pub const STATE: usize = 16;
    pub const FILE_ID: usize = 24;
    pub const SEQNUM_ID: usize = 72;
    pub const HEADER_SIZE: usize = 88;
    pub const N_ENTRIES: usize = 152;
    pub const HEAD_SEQNUM: usize = 168;
    pub const ENTRY_ARRAY: usize = 176;
    /// Enough of the header for every field above.
    pub const MIN_HEADER: usize = 208;
}

const SIGNATURE: &[u8; 8] = b"LPKSHHRH";
const INCOMPATIBLE_XZ: u32 = 1;
const INCOMPATIBLE_LZ4: u32 = 2;
const INCOMPATIBLE_KEYED_HASH: u32 = 4;
const INCOMPATIBLE_ZSTD: u32 = 8;
const INCOMPATIBLE_COMPACT: u32 = 16;
const INCOMPATIBLE_KNOWN: u32 = INCOMPATIBLE_XZ
    | INCOMPATIBLE_LZ4
    | INCOMPATIBLE_KEYED_HASH
    | INCOMPATIBLE_ZSTD
    | INCOMPATIBLE_COMPACT;

const OBJECT_DATA: u8 = 1;
const OBJECT_ENTRY: u8 = 3;
const OBJECT_ENTRY_ARRAY: u8 = 6;
const OBJECT_COMPRESSED_XZ: u8 = 1;
const OBJECT_COMPRESSED_LZ4: u8 = 2;
const OBJECT_COMPRESSED_ZSTD: u8 = 4;

/// The header state of a file journald will not write again.
pub const STATE_ARCHIVED: u8 = 2;

const BLOCK: u64 = 64 << 10;
const BLOCKS: usize = 4;
/// Slots of the table of data objects whose field is known, per file (8 bytes each).
const KNOWN_SLOTS_LOG2: u32 = 14;
/// The largest decompressed field ztail accepts (journald's own default limit on a field is
/// far below it).
const MAX_FIELD: usize = 64 << 20;
/// The largest entry object accepted (its items: 4 or 16 bytes per field).
const MAX_ENTRY: u64 = 4 << 20;
/// Decompressed bytes enough to tell a field by its name (names are at most 64 bytes).
const NAME_PREFIX: usize = 80;

/// What a data object holds, by its offset: a field the source reads (its index), or not.
const OTHER: u16 = u16::MAX;
const MESSAGE: u16 = u16::MAX - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub incompatible: u32,
    pub state: u8,
    pub file_id: [u8; 16],
    pub seqnum_id: [u8; 16],
    pub n_entries: u64,
    pub head_seqnum: u64,
    pub entry_array: u64,
}

impl Header {
    fn compact(&self) -> bool {
        self.incompatible & INCOMPATIBLE_COMPACT != 0
    }
}

/// One entry, as far as the reader decoded it. Its buffers are reused from entry to entry.
#[derive(Debug, Default, Clone)]
pub struct Entry {
    pub seqnum: u64,
    pub realtime: u64,
    pub monotonic: u64,
    pub boot_id: [u8; 16],
    pub xor_hash: u64,
    has_message: bool,
    message: Vec<u8>,
    /// (wanted field index, range in `values`) for each wanted field the entry has.
    fields: Vec<(u16, u32, u32)>,
    values: Vec<u8>,
}

impl Entry {
    /// `MESSAGE`, if the entry has one.
    pub fn message(&self) -> Option<&[u8]> {
        self.has_message.then_some(&self.message[..])
    }

    /// The wanted fields the entry has: (index among the wanted names, value).
    pub fn fields(&self) -> impl Iterator<Item = (u16, &[u8])> {
        self.fields
            .iter()
            .map(|&(i, a, b)| (i, &self.values[a as usize..b as usize]))
    }

    pub fn field(&self, i: u16) -> Option<&[u8]> {
        self.fields().find(|(f, _)| *f == i).map(|(_, v)| v)
    }

    fn push_field(&mut self, i: u16, v: &[u8]) {
        let a = self.values.len() as u32;
        self.values.extend_from_slice(v);
        self.fields.push((i, a, self.values.len() as u32));
    }
}

/// Data object offsets are distinct and well spread: a multiply is hash enough (SipHash was a
/// sixth of the reader's time).
#[derive(Default, Clone, Copy)]
struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type OffsetMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<OffsetHasher>>;

/// What is known of data objects, by offset: a direct-mapped table, one probe per item of an
/// entry (two hash map lookups were the largest part of reading an entry). A slot holds the
/// object's offset (a multiple of 8) with a tag in its low bits; an object whose slot another
/// took is read again, which costs time, never correctness.
struct Known(Box<[u64]>);

/// Tags of [`Known`]: not a field the source reads; a wanted field whose value is in `values`.
const KNOWN_OTHER: u64 = 1;
const KNOWN_VALUE: u64 = 2;

impl Known {
    fn new() -> Known {
        Known(vec![0; 1 << KNOWN_SLOTS_LOG2].into_boxed_slice())
    }

    fn slot(at: u64) -> usize {
        ((at >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - KNOWN_SLOTS_LOG2)) as usize
    }

    /// The tag of the object at `at`, or 0 when it is not known.
    fn get(&self, at: u64) -> u64 {
        let s = self.0[Self::slot(at)];
        if s & !7 == at { s & 7 } else { 0 }
    }

    fn set(&mut self, at: u64, tag: u64) {
        self.0[Self::slot(at)] = at | tag;
    }
}

/// A wanted field's value kept by its data object's offset, up to this size, and how many.
const CACHED_VALUE: usize = 256;
const CACHED_VALUES: usize = 4096;

/// Why a file cannot be read (further).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a journal file (bad signature)")]
    NotJournal,
    #[error("unsupported journal format (incompatible flags {0:#x}): a newer systemd wrote it")]
    Unsupported(u32),
    #[error("damaged or vacuumed at offset {0}: {1}")]
    Damaged(u64, &'static str),
    /// One entry could not be read; the walk is past it and the file can be read on.
    #[error("entry at offset {0} unreadable: {1}")]
    BadEntry(u64, String),
}

/// An open journal file and where reading it has got to.
pub struct JournalFile {
    file: File,
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub header: Header,
    /// The file's length at the last [`refresh`](Self::refresh): no object lies beyond it.
    len: u64,
    cache: Cache,
    known: Known,
    /// Values of wanted fields (not `MESSAGE`) by data object: they repeat across entries.
    values: OffsetMap<(u16, Box<[u8]>)>,
    /// Wanted journal fields, each with its `=`: `_SYSTEMD_UNIT=`.
    wanted: Vec<Vec<u8>>,
    /// The entry array being walked and the next slot in it; 0: not started.
    array: u64,
    array_len: u64,
    slot: u64,
    /// Entries read so far (their index in the global order).
    pub read: u64,
    entry_buf: Vec<u8>,
    items: Vec<u64>,
}

/// The last blocks read, least recently used replaced first.
#[derive(Default)]
struct Cache {
    blocks: Vec<(u64, Vec<u8>, u64)>,
    tick: u64,
    /// The block read last: most reads fall into it.
    last: usize,
    spill: Vec<u8>,
}

impl Cache {
    /// `len` bytes at `at`, through the block cache.
    fn bytes(&mut self, file: &File, at: u64, len: usize) -> Result<&[u8], Error> {
        let end = at
            .checked_add(len as u64)
            .ok_or(Error::Damaged(at, "offset out of range"))?;
        let first = at / BLOCK;
        let last = end.saturating_sub(1) / BLOCK;
        if len == 0 {
            return Ok(&[]);
        }
        if first != last {
            // A large object read once does not keep its buffer.
            if self.spill.capacity() > 4 * BLOCK as usize && len <= 4 * BLOCK as usize {
                self.spill = Vec::new();
            }
            self.spill.resize(len, 0);
            let n = read_full(file, &mut self.spill, at)?;
            if n < len {
                return Err(Error::Damaged(at, "object beyond the end of the file"));
            }
            return Ok(&self.spill);
        }
        if self.blocks.get(self.last).is_none_or(|b| b.0 != first) {
            self.last = self.load(file, first)?;
        }
        let start = (at - first * BLOCK) as usize;
        self.blocks[self.last]
            .1
            .get(start..start + len)
            .ok_or(Error::Damaged(at, "object beyond the end of the file"))
    }

    /// The index of block `first` (read if it is not cached), marked as used now.
    fn load(&mut self, file: &File, first: u64) -> Result<usize, Error> {
        self.tick += 1;
        let i = match self.blocks.iter().position(|b| b.0 == first) {
            Some(i) => i,
            None => {
                let mut buf = if self.blocks.len() < BLOCKS {
                    vec![0; BLOCK as usize]
                } else {
                    let lru = (0..self.blocks.len())
                        .min_by_key(|&i| self.blocks[i].2)
                        .unwrap_or(0);
                    let mut b = self.blocks.swap_remove(lru).1;
                    b.resize(BLOCK as usize, 0);
                    b
                };
                let n = read_full(file, &mut buf, first * BLOCK)?;
                buf.truncate(n);
                self.blocks.push((first, buf, 0));
                self.blocks.len() - 1
            }
        };
        self.blocks[i].2 = self.tick;
        Ok(i)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn id_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0; 16];
    a.copy_from_slice(&b[at..at + 16]);
    a
}

impl JournalFile {
    /// Opens a journal file; `wanted` are the journal field names the caller reads besides
    /// `MESSAGE`.
    pub fn open(path: &Path, wanted: &[String]) -> Result<JournalFile, Error> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let mut f = JournalFile {
            file,
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            header: Header {
                incompatible: 0,
                state: 0,
                file_id: [0; 16],
                seqnum_id: [0; 16],
                n_entries: 0,
                head_seqnum: 0,
                entry_array: 0,
            },
            len: meta.len(),
            cache: Cache::default(),
            known: Known::new(),
            values: OffsetMap::default(),
            wanted: wanted
                .iter()
                .map(|w| format!("{w}=").into_bytes())
                .collect(),
            array: 0,
            array_len: 0,
            slot: 0,
            read: 0,
            entry_buf: Vec::new(),
            items: Vec::new(),
        };
        f.header = f.read_header()?;
        Ok(f)
    }

    fn read_header(&self) -> Result<Header, Error> {
        let mut h = [0u8; off::MIN_HEADER];
        let n = read_full(&self.file, &mut h, 0)?;
        if n < off::MIN_HEADER || &h[off::SIGNATURE..off::SIGNATURE + 8] != SIGNATURE {
            return Err(Error::NotJournal);
        }
        let incompatible = u32_at(&h, off::INCOMPATIBLE);
        if incompatible & !INCOMPATIBLE_KNOWN != 0 {
            return Err(Error::Unsupported(incompatible));
        }
        if u64_at(&h, off::HEADER_SIZE) < off::MIN_HEADER as u64 {
            return Err(Error::NotJournal);
        }
        Ok(Header {
            incompatible,
            state: h[off::STATE],
            file_id: id_at(&h, off::FILE_ID),
            seqnum_id: id_at(&h, off::SEQNUM_ID),
            n_entries: u64_at(&h, off::N_ENTRIES),
            head_seqnum: u64_at(&h, off::HEAD_SEQNUM),
            entry_array: u64_at(&h, off::ENTRY_ARRAY),
        })
    }

    /// Reads the header again; true if entries were added since the last time.
    pub fn refresh(&mut self) -> Result<bool, Error> {
        let h = self.read_header()?;
        if h.file_id != self.header.file_id || h.seqnum_id != self.header.seqnum_id {
            return Err(Error::Damaged(0, "the file's id changed"));
        }
        self.len = self.file.metadata()?.len();
        let grew = h.n_entries != self.header.n_entries;
        if grew {
            self.cache.blocks.clear();
        }
        self.header = h;
        Ok(grew)
    }

    /// Whether the file has no name left (vacuumed, or its journal wiped).
    pub fn deleted(&self) -> bool {
        self.file.metadata().map_or(true, |m| m.nlink() == 0)
    }

    /// Entries linked and not read yet, as of the last [`refresh`](Self::refresh).
    pub fn unread(&self) -> u64 {
        self.header.n_entries.saturating_sub(self.read)
    }

    fn bytes(&mut self, at: u64, len: usize) -> Result<&[u8], Error> {
        self.cache.bytes(&self.file, at, len)
    }

    /// An object's type, flags and size, checked against what the caller expects.
    fn object(&mut self, at: u64, kind: u8, min: u64) -> Result<(u8, u64), Error> {
        if at == 0 || !at.is_multiple_of(8) {
            return Err(Error::Damaged(at, "misaligned object offset"));
        }
        let h = self.bytes(at, 16)?;
        let (t, flags, size) = (h[0], h[1], u64_at(h, 8));
        if t != kind {
            return Err(Error::Damaged(at, "unexpected object type (vacuumed?)"));
        }
        let limit = if kind == OBJECT_ENTRY {
            MAX_ENTRY
        } else {
            self.len
        };
        if size < min || size > limit || at.saturating_add(size) > self.len {
            return Err(Error::Damaged(at, "bad object size"));
        }
        Ok((flags, size))
    }

    /// The offset of the next linked entry, advancing the walk; `None` at the last linked one.
    fn next_offset(&mut self) -> Result<Option<u64>, Error> {
        if self.read >= self.header.n_entries {
            return Ok(None);
        }
        let item = if self.header.compact() { 4 } else { 8 };
        if self.array == 0 || self.slot >= self.array_len {
            let next = if self.array == 0 {
                self.header.entry_array
            } else {
                let a = self.array;
                u64_at(self.bytes(a + 16, 8)?, 0)
            };
            if next == 0 {
                return Ok(None);
            }
            let (_, size) = self.object(next, OBJECT_ENTRY_ARRAY, 24 + item)?;
            self.array = next;
            self.array_len = (size - 24) / item;
            self.slot = 0;
        }
        let at = self.array + 24 + self.slot * item;
        let b = self.bytes(at, item as usize)?;
        let offset = if item == 4 {
            u64::from(u32_at(b, 0))
        } else {
            u64_at(b, 0)
        };
        if offset == 0 {
            // Not linked yet, although the header counted it: read again next pass.
            return Ok(None);
        }
        self.slot += 1;
        self.read += 1;
        Ok(Some(offset))
    }

    /// The next linked entry, or `None` when every entry counted by the header was read.
    pub fn next(&mut self, out: &mut Entry) -> Result<bool, Error> {
        let Some(at) = self.next_offset()? else {
            return Ok(false);
        };
        match self.entry_at(at, out) {
            Ok(()) => Ok(true),
            Err(Error::Io(e)) => Err(Error::Io(e)),
            Err(e) => Err(Error::BadEntry(at, e.to_string())),
        }
    }

    /// The seqnum of the entry at `at`.
    fn seqnum_at(&mut self, at: u64) -> Result<u64, Error> {
        self.object(at, OBJECT_ENTRY, 64)?;
        Ok(u64_at(self.bytes(at + 16, 8)?, 0))
    }

    /// Moves the walk to just after the entry with `seqnum`, or before the first entry with
    /// a higher one. Returns whether that entry itself was found.
    pub fn seek_after(&mut self, seqnum: u64) -> Result<bool, Error> {
        self.array = 0;
        self.slot = 0;
        self.read = 0;
        let item = if self.header.compact() { 4 } else { 8 };
        let mut found = false;
        // Whole arrays whose last linked entry is not past `seqnum` are skipped; the one that
        // holds it is bisected.
        loop {
            let next = if self.array == 0 {
                self.header.entry_array
            } else {
                let a = self.array;
                u64_at(self.bytes(a + 16, 8)?, 0)
            };
            if next == 0 || self.read >= self.header.n_entries {
                return Ok(found);
            }
            let (_, size) = self.object(next, OBJECT_ENTRY_ARRAY, 24 + item)?;
            let cap = (size - 24) / item;
            let linked = cap.min(self.header.n_entries - self.read);
            let slot_offset = |f: &mut Self, s: u64| -> Result<u64, Error> {
                let b = f.bytes(next + 24 + s * item, item as usize)?;
                Ok(if item == 4 {
                    u64::from(u32_at(b, 0))
                } else {
                    u64_at(b, 0)
                })
            };
            let last = slot_offset(self, linked - 1)?;
            if last == 0 {
                return Err(Error::Damaged(next, "a counted entry is not linked"));
            }
            self.array = next;
            self.array_len = cap;
            if self.seqnum_at(last)? <= seqnum {
                found = self.seqnum_at(last)? == seqnum;
                self.slot = linked;
                self.read += linked;
                continue;
            }
            // The first slot whose entry is past `seqnum`.
            let (mut lo, mut hi) = (0, linked - 1);
            while lo < hi {
                let mid = (lo + hi) / 2;
                let o = slot_offset(self, mid)?;
                if self.seqnum_at(o)? <= seqnum {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            if lo > 0 {
                let o = slot_offset(self, lo - 1)?;
                found = self.seqnum_at(o)? == seqnum;
            }
            self.slot = lo;
            self.read += lo;
            return Ok(found);
        }
    }

    /// Moves the walk past the last linked entry and reads that entry; false if the file
    /// has none.
    pub fn last(&mut self, out: &mut Entry) -> Result<bool, Error> {
        self.seek_after(u64::MAX)?;
        if self.read == 0 || self.slot == 0 {
            return Ok(false);
        }
        let item = if self.header.compact() { 4 } else { 8 };
        let at = self.array + 24 + (self.slot - 1) * item;
        let b = self.bytes(at, item as usize)?;
        let offset = if item == 4 {
            u64::from(u32_at(b, 0))
        } else {
            u64_at(b, 0)
        };
        self.entry_at(offset, out)?;
        Ok(true)
    }

    fn entry_at(&mut self, at: u64, out: &mut Entry) -> Result<(), Error> {
        let (_, size) = self.object(at, OBJECT_ENTRY, 64)?;
        let compact = self.header.compact();
        let b = self.cache.bytes(&self.file, at, size as usize)?;
        out.seqnum = u64_at(b, 16);
        out.realtime = u64_at(b, 24);
        out.monotonic = u64_at(b, 32);
        out.boot_id = id_at(b, 40);
        out.xor_hash = u64_at(b, 56);
        out.has_message = false;
        out.fields.clear();
        out.values.clear();
        let item = if compact { 4 } else { 16 };
        let n = (size as usize - 64) / item;
        // Most items are objects known to be of no interest: they are passed over here, while
        // the entry is at hand; the rest are read after it.
        let mut items = std::mem::take(&mut self.items);
        items.clear();
        for c in b[64..64 + n * item].chunks_exact(item) {
            let data = if compact {
                u64::from(u32_at(c, 0))
            } else {
                u64_at(c, 0)
            };
            if self.known.get(data) != KNOWN_OTHER {
                items.push(data);
            }
        }
        for &data in &items {
            if self.known.get(data) == KNOWN_VALUE
                && let Some((i, v)) = self.values.get(&data)
            {
                out.push_field(*i, v);
                continue;
            }
            self.data(data, out)?;
        }
        self.items = items;
        Ok(())
    }

    /// Reads the data object at `at` if it holds `MESSAGE` or a wanted field.
    fn data(&mut self, at: u64, out: &mut Entry) -> Result<(), Error> {
        let payload = if self.header.compact() { 72 } else { 64 };
        let (flags, size) = self.object(at, OBJECT_DATA, payload)?;
        let len = (size - payload) as usize;
        let compressed =
            flags & (OBJECT_COMPRESSED_XZ | OBJECT_COMPRESSED_LZ4 | OBJECT_COMPRESSED_ZSTD);
        let mut value = std::mem::take(&mut self.entry_buf);
        value.clear();
        if compressed == 0 {
            // The field name first: most objects are not wanted and need no more than it.
            let peek = len.min(72);
            let head = self.cache.bytes(&self.file, at + payload, peek)?;
            let kind = kind_of(head, &self.wanted);
            if kind == OTHER {
                // journald stamps each native entry with its own source time: an object that
                // never repeats is not worth remembering.
                if !head.starts_with(b"_SOURCE_") {
                    self.known.set(at, KNOWN_OTHER);
                }
                self.entry_buf = value;
                return Ok(());
            }
            if kind == MESSAGE {
                // Straight from the cache: the common case, once per entry.
                let m = self.cache.bytes(&self.file, at + payload, len)?;
                out.message.clear();
                out.message.extend_from_slice(&m[b"MESSAGE=".len()..]);
                out.has_message = true;
                self.entry_buf = value;
                return Ok(());
            }
            value.extend_from_slice(self.bytes(at + payload, len)?);
        } else {
            let raw = self.bytes(at + payload, len)?.to_vec();
            // The name first (a core dump's field can be hundreds of megabytes).
            let kind = match decompress(compressed, &raw, &mut value, NAME_PREFIX) {
                Ok(_) => kind_of(&value, &self.wanted),
                Err(why) => {
                    self.entry_buf = value;
                    return Err(Error::Damaged(at, why));
                }
            };
            value.clear();
            let whole = kind != OTHER
                && decompress(compressed, &raw, &mut value, MAX_FIELD)
                    .map_err(|why| Error::Damaged(at, why))?;
            if !whole {
                // Not wanted, or an lz4 field larger than ztail reads: passed over.
                self.known.set(at, KNOWN_OTHER);
                self.entry_buf = value;
                return Ok(());
            }
        }
        let kind = kind_of(&value, &self.wanted);
        match kind {
            OTHER => self.known.set(at, KNOWN_OTHER),
            MESSAGE => {
                out.message.clear();
                out.message.extend_from_slice(&value[b"MESSAGE=".len()..]);
                out.has_message = true;
            }
            i => {
                let v = &value[self.wanted[i as usize].len()..];
                out.push_field(i, v);
                if v.len() <= CACHED_VALUE {
                    if self.values.len() >= CACHED_VALUES {
                        self.values.clear();
                    }
                    self.values.insert(at, (i, v.into()));
                    self.known.set(at, KNOWN_VALUE);
                }
            }
        }
        self.entry_buf = value;
        Ok(())
    }
}

/// Which field a payload (`NAME=value`, or its first bytes) is.
fn kind_of(payload: &[u8], wanted: &[Vec<u8>]) -> u16 {
    if payload.starts_with(b"MESSAGE=") {
        return MESSAGE;
    }
    wanted
        .iter()
        .position(|w| payload.starts_with(w))
        .map_or(OTHER, |i| i as u16)
}

/// Decompresses at most `limit` bytes of a data object's payload (`NAME=value`) into `out`;
/// a longer payload is cut there. False only for an lz4 payload longer than `limit`, which
/// cannot be decoded in part.
fn decompress(how: u8, raw: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<bool, &'static str> {
    match how {
        OBJECT_COMPRESSED_ZSTD => {
            let mut d =
                ruzstd::decoding::StreamingDecoder::new(raw).map_err(|_| "bad zstd frame")?;
            (&mut d)
                .take(limit as u64)
                .read_to_end(out)
                .map_err(|_| "bad zstd data")?;
        }
        OBJECT_COMPRESSED_LZ4 => {
            if raw.len() < 8 {
                return Err("short lz4 object");
            }
            let size = u64_at(raw, 0);
            if size > MAX_FIELD as u64 {
                return Ok(false);
            }
            out.resize(size as usize, 0);
            let n = lz4_flex::block::decompress_into(&raw[8..], out).map_err(|_| "bad lz4 data")?;
            out.truncate(n.min(limit));
        }
        OBJECT_COMPRESSED_XZ => {
            let mut w = LimitedWriter(out, limit);
            match lzma_rs::xz_decompress(&mut io::BufReader::new(raw), &mut w) {
                Ok(()) => {}
                // Stopped at the limit: what is there is the part wanted.
                Err(_) if w.0.len() >= limit => {}
                Err(_) => return Err("bad xz data"),
            }
        }
        _ => return Err("several compressions at once"),
    }
    Ok(true)
}

/// A writer that takes up to its limit, then refuses.
struct LimitedWriter<'a>(&'a mut Vec<u8>, usize);

impl io::Write for LimitedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.1.saturating_sub(self.0.len());
        if room == 0 {
            return Err(io::Error::other("limit reached"));
        }
        let n = room.min(buf.len());
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads as much of `buf` as the file has at `at`.
fn read_full(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// systemd's cursor text for an entry of a file with `seqnum_id`.
pub fn cursor(seqnum_id: &[u8; 16], e: &Entry) -> String {
    format!(
        "s={};i={:x};b={};m={:x};t={:x};x={:x}",
        hex(seqnum_id),
        e.seqnum,
        hex(&e.boot_id),
        e.monotonic,
        e.realtime,
        e.xor_hash
    )
}

pub fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The seqnum id and seqnum of a cursor (the parts ztail resumes by).
pub fn parse_cursor(c: &str) -> Option<([u8; 16], u64)> {
    let mut id = None;
    let mut seqnum = None;
    for part in c.split(';') {
        match part.split_once('=')? {
            ("s", v) if v.len() == 32 => {
                let mut out = [0u8; 16];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = u8::from_str_radix(v.get(2 * i..2 * i + 2)?, 16).ok()?;
                }
                id = Some(out);
            }
            ("i", v) => seqnum = Some(u64::from_str_radix(v, 16).ok()?),
            _ => {}
        }
    }
    Some((id?, seqnum?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tests/data/journal/small.journal`: written by a real journald (see its README).
    #[test]
    fn reads_a_file_journald_wrote() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/journal/small.journal");
        let wanted = ["SYSLOG_IDENTIFIER".to_owned(), "PRIORITY".to_owned()];
        let mut f = JournalFile::open(&path, &wanted).unwrap();
        assert_ne!(f.header.incompatible & INCOMPATIBLE_COMPACT, 0);
        assert_ne!(f.header.incompatible & INCOMPATIBLE_ZSTD, 0);
        let mut e = Entry::default();
        let mut all = Vec::new();
        while f.next(&mut e).unwrap() {
            let fields: Vec<(u16, Vec<u8>)> = e.fields().map(|(i, v)| (i, v.to_vec())).collect();
            all.push((e.seqnum, e.message().map(<[u8]>::to_vec), fields));
        }
        assert_eq!(all.len() as u64, f.header.n_entries);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "seqnum order");
        let field = |fields: &[(u16, Vec<u8>)], i: u16| {
            fields.iter().find(|(f, _)| *f == i).map(|(_, v)| v.clone())
        };
        let seed: Vec<_> = all
            .iter()
            .filter(|x| field(&x.2, 0).as_deref() == Some(b"seed"))
            .collect();
        assert_eq!(seed.len(), 8);
        for (i, x) in seed.iter().enumerate() {
            assert_eq!(x.1.as_deref(), Some(format!("seed {i}").as_bytes()));
            assert_eq!(field(&x.2, 1), Some(i.to_string().into_bytes()));
        }
        // Compressed by journald (1,000 bytes), and bytes that are not text.
        let long = "long ".repeat(200);
        assert!(all.iter().any(|x| x.1.as_deref() == Some(long.as_bytes())));
        assert!(
            all.iter()
                .any(|x| x.1.as_deref() == Some(&b"bin\x00\xffary"[..]))
        );

        // Positioning: after an entry, and at the end.
        let mut f = JournalFile::open(&path, &wanted).unwrap();
        assert!(f.seek_after(all[5].0).unwrap());
        assert!(f.next(&mut e).unwrap());
        assert_eq!(e.seqnum, all[6].0);
        assert!(!f.seek_after(all[5].0 - 1).unwrap() || all[5].0 - 1 == all[4].0);
        let mut f = JournalFile::open(&path, &wanted).unwrap();
        assert!(f.last(&mut e).unwrap());
        assert_eq!(e.seqnum, all.last().unwrap().0);
        assert!(!f.next(&mut e).unwrap());
        let c = cursor(&f.header.seqnum_id, &e);
        assert_eq!(parse_cursor(&c), Some((f.header.seqnum_id, e.seqnum)));
    }

    /// A copy with its last bytes zeroed, as vacuuming leaves an open file: an error, no panic.
    #[test]
    fn a_file_with_holes_is_an_error_not_a_panic() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/journal/small.journal");
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n / 2..].fill(0);
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("holes.journal");
        std::fs::write(&copy, &data).unwrap();
        let mut f = JournalFile::open(&copy, &[]).unwrap();
        let mut e = Entry::default();
        let mut errors = 0;
        for _ in 0..100 {
            match f.next(&mut e) {
                Ok(true) => {}
                Ok(false) => break,
                Err(Error::BadEntry(..)) => errors += 1,
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
        }
        assert!(errors > 0);
    }

    #[test]
    fn cursors_round_trip_in_systemds_form() {
        let e = Entry {
            seqnum: 0x1f,
            realtime: 0x5f0,
            monotonic: 0x2,
            boot_id: [0xab; 16],
            xor_hash: 0xdead,
            ..Entry::default()
        };
        let id = [0x01; 16];
        let c = cursor(&id, &e);
        assert_eq!(
            c,
            "s=01010101010101010101010101010101;i=1f;b=abababababababababababababababab;m=2;t=5f0;x=dead"
        );
        assert_eq!(parse_cursor(&c), Some((id, 0x1f)));
        assert_eq!(parse_cursor("i=1f"), None);
        assert_eq!(parse_cursor("s=zz;i=1"), None);
    }

    #[test]
    fn payload_kinds_by_field_name() {
        let wanted = vec![b"_SYSTEMD_UNIT=".to_vec(), b"PRIORITY=".to_vec()];
        assert_eq!(kind_of(b"MESSAGE=hi", &wanted), MESSAGE);
        assert_eq!(kind_of(b"PRIORITY=6", &wanted), 1);
        assert_eq!(kind_of(b"PRIORITY_X=6", &wanted), OTHER);
        assert_eq!(kind_of(b"MESSAGE_ID=1", &wanted), OTHER);
    }

    #[test]
    fn compressed_payloads_decode() {
        let text = b"MESSAGE="
            .iter()
            .chain(&[b'x'; 900])
            .copied()
            .collect::<Vec<u8>>();
        let mut lz4 = (text.len() as u64).to_le_bytes().to_vec();
        lz4.extend(lz4_flex::block::compress(&text));
        let mut out = Vec::new();
        assert!(decompress(OBJECT_COMPRESSED_LZ4, &lz4, &mut out, MAX_FIELD).unwrap());
        assert_eq!(out, text);
        out.clear();
        decompress(OBJECT_COMPRESSED_LZ4, &lz4, &mut out, NAME_PREFIX).unwrap();
        assert_eq!(out, &text[..NAME_PREFIX]);
        out.clear();
        assert!(decompress(OBJECT_COMPRESSED_ZSTD, &lz4, &mut out, MAX_FIELD).is_err());
        assert!(decompress(OBJECT_COMPRESSED_LZ4, &lz4[..6], &mut out, MAX_FIELD).is_err());
        // A declared size beyond what ztail reads is passed over, not allocated.
        let mut huge = lz4.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!decompress(OBJECT_COMPRESSED_LZ4, &huge, &mut out, MAX_FIELD).unwrap());
    }
}
