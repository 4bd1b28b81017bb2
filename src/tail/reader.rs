//! Reading one file through its open descriptor and splitting what was read into lines.
//!
//! Pure of scheduling: [`FileReader::read_chunk`] does blocking reads and is run on tokio's
//! blocking pool by the tailer. Offsets count raw bytes up to the last line terminator consumed,
//! independent of decoding. A line longer than `max_line` is cut at `max_line` bytes (on a UTF-8
//! boundary), counted, and the rest of it is skipped up to its newline: the file keeps being
//! read. Invalid UTF-8 is replaced with U+FFFD. A trailing `\r` is stripped.
//!
//! Raw sources take a fast path: every line is an entry pointing into the bytes read. Other
//! sources hand their lines to a [`Framer`], which may leave the lines of an unfinished entry
//! unconsumed; they stay in the carry and are framed again with the next read.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::format::{FrameStats, Framer, Framing};
use crate::pipeline::{Entry, Meta, Position, TAIL_LEN, unix_nanos};

/// How many leading bytes of a file identify it (its fingerprint grows up to this).
pub const HEAD_LEN: usize = 1024;

/// Entries read by one [`FileReader::read_chunk`] call.
#[derive(Debug)]
pub struct ReadLines {
    pub data: Vec<u8>,
    pub entries: Vec<Entry>,
    pub meta: Vec<Meta>,
    pub end: Position,
    pub truncated_lines: u64,
    pub bytes: u64,
    /// Lines (records) consumed.
    pub records: u64,
    pub stats: FrameStats,
    /// These lines end a backlog: the read reached the end of a file after a read that filled
    /// the whole buffer (that one included), so a burst, a restart or an outage has just been
    /// read up. Also set on the next lines out after such a read if it left bytes held back (an
    /// unfinished line, an entry a framer keeps open), which are the backlog's real end.
    pub caught_up: bool,
}

enum ReadStep {
    Lines(ReadLines),
    NothingComplete,
    Eof,
}

/// Reads a file sequentially from a position.
pub struct FileReader {
    file: File,
    /// Offset of the next byte to read from the file.
    read_at: u64,
    /// Offset of the first byte not yet consumed (start of `carry`).
    consumed: u64,
    /// Bytes of an unfinished line.
    carry: Vec<u8>,
    /// Skipping the remainder of an over-long line up to its newline.
    discarding: bool,
    /// The last bytes consumed (for the position's tail hash).
    tail: Vec<u8>,
    /// The file's first bytes as far as read (its fingerprint), kept while fewer than
    /// [`HEAD_LEN`]; then only their length and hash, 1 KiB less per watched file.
    head: Vec<u8>,
    head_len: usize,
    head_hash: u64,
    max_line: usize,
    buf_size: usize,
    /// The file's size as of the last read: at least `read_at`.
    size: u64,
    /// The last read filled the whole buffer and the file went on: it has a backlog.
    behind: bool,
    /// A backlog was read up with bytes held back: the next lines out are caught up too.
    held_back: bool,
    /// `None` for raw sources without multiline, timestamps or metadata.
    framer: Option<Framer>,
}

impl FileReader {
    /// A reader starting at `start`, which must be a position this file was read to before (or 0).
    pub fn new(file: File, start: u64, framing: Arc<Framing>, buf_size: usize) -> io::Result<Self> {
        let max_line = framing.record_limit();
        let framer = (!framing.is_plain()).then(|| Framer::new(framing));
        let mut r = FileReader {
            file,
            read_at: start,
            consumed: start,
            carry: Vec::new(),
            discarding: false,
            tail: Vec::with_capacity(TAIL_LEN),
            head: Vec::new(),
            head_len: 0,
            head_hash: hash(&[]),
            max_line,
            buf_size,
            size: start,
            behind: false,
            held_back: false,
            framer,
        };
        r.file.seek(SeekFrom::Start(start))?;
        let head = read_head(&r.file, (start as usize).min(HEAD_LEN))?;
        r.set_head(head);
        let from = start.saturating_sub(TAIL_LEN as u64);
        let mut tail = vec![0; (start - from) as usize];
        r.file.read_exact_at(&mut tail, from)?;
        r.tail = tail;
        Ok(r)
    }

    /// Frames what is read from now on with `framing` (the format a file's pod chose). Only
    /// before the first read: a framer holds state between reads.
    pub fn set_framing(&mut self, framing: Arc<Framing>) {
        self.max_line = framing.record_limit();
        self.framer = (!framing.is_plain()).then(|| Framer::new(framing));
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Offset of the next unread byte.
    pub fn read_offset(&self) -> u64 {
        self.read_at
    }

    /// The file's size as of the last read: while a backlog is read, how much of it is left.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The position after the last consumed byte.
    pub fn position(&self) -> Position {
        Position {
            offset: self.consumed,
            tail_len: self.tail.len() as u32,
            tail_hash: hash(&self.tail),
        }
    }

    /// Length and hash of the file's first bytes as far as they have been read (up to
    /// [`HEAD_LEN`]).
    pub fn fingerprint(&self) -> (u32, u64) {
        (self.head_len as u32, self.head_hash)
    }

    fn set_head(&mut self, head: Vec<u8>) {
        self.head_len = head.len();
        self.head_hash = hash(&head);
        self.head = if head.len() < HEAD_LEN {
            head
        } else {
            Vec::new()
        };
    }

    pub fn has_partial(&self) -> bool {
        !self.carry.is_empty()
    }

    /// Starts over at offset 0 (the file was truncated).
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.read_at = 0;
        self.consumed = 0;
        self.size = 0;
        self.carry.clear();
        self.tail.clear();
        self.set_head(Vec::new());
        self.discarding = false;
        self.behind = false;
        self.held_back = false;
        if let Some(f) = &mut self.framer {
            f.reset();
        }
        Ok(())
    }

    /// True if the file is no longer the one read so far: its first bytes, or the bytes just
    /// before the position, are not those read earlier (it was truncated and rewritten,
    /// possibly beyond our offset, before we noticed). Both are compared: a copytruncate of a
    /// file whose first kilobyte is always the same (a banner, a header) leaves the head
    /// unchanged, and reading on would skip everything between the start and our offset.
    pub fn rewritten(&self) -> io::Result<bool> {
        if self.head_len > 0 {
            let now = read_head(&self.file, self.head_len)?;
            if now.len() != self.head_len || hash(&now) != self.head_hash {
                return Ok(true);
            }
        }
        let tail_len = self.tail.len() as u64;
        // Within the head, the tail was just compared.
        if tail_len == 0 || self.consumed <= self.head_len as u64 {
            return Ok(false);
        }
        let mut now = [0u8; TAIL_LEN];
        let now = &mut now[..tail_len as usize];
        match self.file.read_exact_at(now, self.consumed - tail_len) {
            Ok(()) => Ok(now != self.tail.as_slice()),
            // Shorter than our position.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Reads until at least one line is complete (or an over-long line was cut) and returns the
    /// lines read, or `None` at end of file. Reads one buffer at a time; an unfinished line is
    /// carried into the next read (bounded by `max_line`).
    pub fn read_chunk(&mut self) -> io::Result<Option<ReadLines>> {
        loop {
            match self.read_once()? {
                ReadStep::Lines(lines) => return Ok(Some(lines)),
                ReadStep::Eof => return Ok(None),
                ReadStep::NothingComplete => {}
            }
        }
    }

    fn read_once(&mut self) -> io::Result<ReadStep> {
        let carried = self.carry.len();
        let mut data = Vec::with_capacity(carried + self.buf_size);
        data.append(&mut self.carry);
        let n = (&self.file)
            .take(self.buf_size as u64)
            .read_to_end(&mut data)?;
        if n == 0 {
            // Keep only the carried bytes: an idle file must not pin a whole read buffer.
            self.carry = data[..carried].to_vec();
            self.behind = false;
            return Ok(ReadStep::Eof);
        }
        // A file truncated and rewritten past our offset (copytruncate) reads as plausible
        // bytes from the middle of its new content: they are dropped unshipped, and the tailer
        // sees `rewritten` and reads the file again from its start.
        if self.rewritten()? {
            self.file.seek(SeekFrom::Start(self.read_at))?;
            self.carry = data[..carried].to_vec();
            return Ok(ReadStep::Eof);
        }
        if (self.read_at as usize) < HEAD_LEN {
            let want = HEAD_LEN - self.read_at as usize;
            let mut head = std::mem::take(&mut self.head);
            head.extend_from_slice(&data[carried..carried + want.min(n)]);
            self.set_head(head);
        }
        self.read_at += n as u64;
        // A short read met the end of the file; after a full one, its size tells. (Not `?`: the
        // bytes are read, and an error now would skip them.)
        self.size = if n < self.buf_size {
            self.read_at
        } else {
            self.file.metadata().map_or(self.read_at, |m| m.len())
        };
        let at_end = self.size <= self.read_at;
        let caught_up = at_end && (self.behind || n == self.buf_size);
        self.behind = !at_end;
        Ok(match self.split(data, false) {
            Some(lines) => {
                let flagged = caught_up || std::mem::take(&mut self.held_back);
                self.held_back = caught_up && self.has_partial();
                ReadStep::Lines(ReadLines {
                    caught_up: flagged,
                    ..lines
                })
            }
            None => {
                self.held_back |= caught_up;
                ReadStep::NothingComplete
            }
        })
    }

    /// Emits the unfinished line as a line of its own (after the partial-line timeout, or when
    /// a rotated file is closed).
    pub fn flush_partial(&mut self) -> Option<ReadLines> {
        if self.carry.is_empty() {
            return None;
        }
        let data = std::mem::take(&mut self.carry);
        let caught_up = std::mem::take(&mut self.held_back);
        self.split(data, true)
            .map(|lines| ReadLines { caught_up, ..lines })
    }

    /// Splits `data` (which starts at `self.consumed`) into lines. With `all`, a final line
    /// without a newline is consumed too.
    fn split(&mut self, mut data: Vec<u8>, all: bool) -> Option<ReadLines> {
        let mut lines = Vec::new();
        let mut truncated = 0;
        let mut start = 0usize;
        for nl in memchr::memchr_iter(b'\n', &data) {
            if self.discarding {
                self.discarding = false;
            } else {
                truncated += self.push_line(&data, start, nl, &mut lines) as u64;
            }
            start = nl + 1;
        }
        let mut consumed = start;
        let mut complete = all;
        if self.discarding {
            consumed = data.len();
        } else if data.len() - start > self.max_line {
            // An over-long line still without its newline: emit its first max_line bytes now and
            // skip the rest up to the newline. Everything before it is complete.
            truncated += self.push_line(&data, start, data.len(), &mut lines) as u64;
            self.discarding = true;
            consumed = data.len();
            complete = true;
        } else if all && start < data.len() {
            truncated += self.push_line(&data, start, data.len(), &mut lines) as u64;
            consumed = data.len();
        }
        let mut records = lines.len() as u64;
        let mut stats = FrameStats::default();
        let (entries, meta) = match &mut self.framer {
            Some(framer) => {
                let (framed, carry) =
                    framer.frame(&mut data, &lines, consumed, complete, unix_nanos());
                self.carry = carry;
                consumed = framed.consumed;
                self.remember_tail(&data[..consumed]);
                // Lines of unfinished entries are read again with the next read.
                records = lines
                    .iter()
                    .filter(|l| (l.start as usize) < consumed)
                    .count() as u64;
                stats = framed.stats;
                (framed.entries, framed.meta)
            }
            None => {
                self.carry.extend_from_slice(&data[consumed..]);
                data.truncate(consumed);
                // The position hashes the bytes of the file, not their UTF-8 repair.
                self.remember_tail(&data);
                if std::str::from_utf8(&data).is_err() {
                    (data, lines) = replace_invalid_utf8(&data, &lines, self.max_line);
                }
                let entries = lines
                    .iter()
                    .map(|l| Entry::text(l.start as usize, l.end as usize))
                    .collect();
                (entries, Vec::new())
            }
        };
        if consumed == 0 {
            return None;
        }
        self.consumed += consumed as u64;
        Some(ReadLines {
            data,
            entries,
            meta,
            end: self.position(),
            truncated_lines: truncated + stats.truncated,
            bytes: consumed as u64,
            records,
            stats,
            caught_up: false,
        })
    }

    /// Adds the line `data[start..end]` (without `\r`), cut to `max_line`. Returns whether it was cut.
    fn push_line(
        &self,
        data: &[u8],
        start: usize,
        mut end: usize,
        lines: &mut Vec<Range<u32>>,
    ) -> bool {
        if end > start && data[end - 1] == b'\r' {
            end -= 1;
        }
        let cut = end - start > self.max_line;
        if cut {
            end = start + self.max_line;
            // Do not split a UTF-8 sequence.
            while end > start && (data[end] & 0xC0) == 0x80 {
                end -= 1;
            }
        }
        lines.push(start as u32..end as u32);
        cut
    }

    fn remember_tail(&mut self, consumed: &[u8]) {
        if consumed.len() >= TAIL_LEN {
            self.tail.clear();
            self.tail
                .extend_from_slice(&consumed[consumed.len() - TAIL_LEN..]);
        } else {
            self.tail.extend_from_slice(consumed);
            let excess = self.tail.len().saturating_sub(TAIL_LEN);
            self.tail.drain(..excess);
        }
    }
}

fn replace_invalid_utf8(
    data: &[u8],
    lines: &[Range<u32>],
    max_line: usize,
) -> (Vec<u8>, Vec<Range<u32>>) {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut ranges = Vec::with_capacity(lines.len());
    for r in lines {
        let line = &data[r.start as usize..r.end as usize];
        let s = String::from_utf8_lossy(line);
        // U+FFFD (3 bytes) may replace a single byte: cut again to max_line, on a character
        // boundary.
        let mut keep = s.len().min(max_line);
        while !s.is_char_boundary(keep) {
            keep -= 1;
        }
        let start = out.len() as u32;
        out.extend_from_slice(&s.as_bytes()[..keep]);
        ranges.push(start..out.len() as u32);
    }
    (out, ranges)
}

/// Reads up to `len` bytes from the start of a file.
pub fn read_head(file: &File, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// FNV-1a, 64 bit: stable across Rust releases (unlike `DefaultHasher`), so it can be persisted.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn reader_over(
        content: &[u8],
        max_line: usize,
        buf: usize,
    ) -> (tempfile::NamedTempFile, FileReader) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        let framing = Arc::new(Framing::raw(max_line));
        let r = FileReader::new(f.reopen().unwrap(), 0, framing, buf).unwrap();
        (f, r)
    }

    fn all_lines(r: &mut FileReader) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(c) = r.read_chunk().unwrap() {
            for l in &c.entries {
                out.push(
                    String::from_utf8(c.data[l.start as usize..l.end as usize].to_vec()).unwrap(),
                );
            }
        }
        out
    }

    #[test]
    fn splits_lines_across_reads_and_strips_cr() {
        let (_f, mut r) = reader_over(b"alpha\r\nbeta\n\ngamma\npartial", 1000, 4);
        assert_eq!(all_lines(&mut r), ["alpha", "beta", "", "gamma"]);
        assert_eq!(r.position().offset, 19);
        assert!(r.has_partial());
        let c = r.flush_partial().unwrap();
        assert_eq!(
            &c.data[c.entries[0].start as usize..c.entries[0].end as usize],
            b"partial"
        );
        assert_eq!(c.end.offset, 26);
    }

    /// The `caught_up` flag of every chunk read until the end of the file.
    fn caught_up_flags(r: &mut FileReader) -> Vec<bool> {
        std::iter::from_fn(|| r.read_chunk().unwrap())
            .map(|c| c.caught_up)
            .collect()
    }

    #[test]
    fn only_the_read_that_ends_a_backlog_is_caught_up() {
        // 10 lines of 10 bytes through a 32-byte buffer: three full reads, then a short one.
        let lines: Vec<u8> = (0..10)
            .flat_map(|n| format!("line {n:04}\n").into_bytes())
            .collect();
        let (mut f, mut r) = reader_over(&lines, 1000, 32);
        r.read_chunk().unwrap();
        assert_eq!(r.size(), 100, "a full read sees how much is left");
        assert_eq!(caught_up_flags(&mut r), [false, false, true]);
        // A slow writer: reads shorter than the buffer are never a backlog.
        for _ in 0..3 {
            f.write_all(b"trickle\n").unwrap();
            assert_eq!(caught_up_flags(&mut r), [false]);
        }
        // A burst of exactly one buffer is read in one full read that meets the end.
        f.write_all(b"line 0010\nline 0011\nline 000012\n").unwrap();
        assert_eq!(caught_up_flags(&mut r), [true]);
        // A full read that does not meet the end is not the end of the backlog.
        f.write_all(&lines).unwrap();
        assert_eq!(caught_up_flags(&mut r), [false, false, false, true]);
    }

    #[test]
    fn a_backlog_ending_in_an_unfinished_line_flags_the_lines_that_end_it() {
        // A full read of two lines, then a last read holding only an unfinished line: the
        // flag waits for that line.
        let (mut f, mut r) = reader_over(b"line 0000\nline 0001\nunfinished", 1000, 20);
        assert_eq!(caught_up_flags(&mut r), [false]);
        assert!(r.has_partial());
        let end = r.flush_partial().unwrap();
        assert!(end.caught_up, "the held-back end of the backlog");
        // Once only: a slow writer's lines after that are not.
        f.write_all(b"slow\n").unwrap();
        assert_eq!(caught_up_flags(&mut r), [false]);

        // A last read with a complete line and an unfinished one: both go early, once each.
        f.write_all(b"line 0002\nline 0003\nline 0004\nunfi")
            .unwrap();
        assert_eq!(caught_up_flags(&mut r), [false, true]);
        assert!(r.has_partial());
        f.write_all(b"nished\n").unwrap();
        assert_eq!(caught_up_flags(&mut r), [true]);
        f.write_all(b"slow\n").unwrap();
        assert_eq!(caught_up_flags(&mut r), [false]);
    }

    #[test]
    fn the_fingerprint_grows_with_the_file_then_keeps_only_a_hash() {
        let (mut f, mut r) = reader_over(b"first\n", 1000, 64);
        all_lines(&mut r);
        assert_eq!(r.fingerprint(), (6, hash(b"first\n")));
        f.write_all(b"second\n").unwrap();
        assert_eq!(all_lines(&mut r), ["second"]);
        assert_eq!(r.fingerprint(), (13, hash(b"first\nsecond\n")));
        // Rewritten in place, same length: a short head is still compared.
        f.as_file().write_all_at(b"FIRST", 0).unwrap();
        assert!(r.rewritten().unwrap());
        f.as_file().write_all_at(b"first", 0).unwrap();
        assert!(!r.rewritten().unwrap());

        // Grown past HEAD_LEN: the bytes are dropped, the hash still tells a rewrite.
        let long: String = (0..200).map(|i| format!("line {i:03}\n")).collect();
        f.write_all(long.as_bytes()).unwrap();
        assert_eq!(all_lines(&mut r).len(), 200);
        let content = format!("first\nsecond\n{long}");
        let head = &content.as_bytes()[..HEAD_LEN];
        assert_eq!(r.fingerprint(), (HEAD_LEN as u32, hash(head)));
        assert_eq!(r.head.capacity(), 0, "a complete head keeps no bytes");
        assert!(!r.rewritten().unwrap());
        f.as_file().write_all_at(b"X", HEAD_LEN as u64 - 1).unwrap();
        assert!(r.rewritten().unwrap());
    }

    #[test]
    fn a_file_rewritten_past_the_offset_is_not_read_from_the_middle() {
        let old: String = (0..100).map(|i| format!("old line {i:03}\n")).collect();
        let (f, mut r) = reader_over(old.as_bytes(), 1000, 256);
        assert_eq!(all_lines(&mut r).len(), 100);
        // copytruncate, then the application writes more than was read before.
        let new: Vec<String> = (0..300).map(|i| format!("new {i:03}")).collect();
        f.as_file().set_len(0).unwrap();
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(f.path())
            .unwrap();
        w.write_all((new.join("\n") + "\n").as_bytes()).unwrap();
        assert!(
            r.read_chunk().unwrap().is_none(),
            "bytes from the middle of the new content must not be shipped"
        );
        assert!(r.rewritten().unwrap());
        r.reset().unwrap();
        assert_eq!(all_lines(&mut r), new);
    }

    /// A copytruncate that writes the same first kilobyte again (a banner every run prints)
    /// and regrows past the offset before the tailer looks: the head alone matches, so the
    /// bytes before the position must be compared too, or the middle would be skipped.
    #[test]
    fn a_rewrite_with_the_same_head_is_caught_by_the_bytes_before_the_offset() {
        let banner: String = (0..40)
            .map(|i| format!("banner {i:02} ======================\n"))
            .collect();
        assert!(banner.len() > HEAD_LEN);
        let old: String = (0..100).map(|i| format!("old line {i:03}\n")).collect();
        let (f, mut r) = reader_over(format!("{banner}{old}").as_bytes(), 1000, 256);
        assert_eq!(all_lines(&mut r).len(), 140);
        let new: String = (0..300).map(|i| format!("new line {i:03}\n")).collect();
        f.as_file().set_len(0).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(f.path())
            .unwrap()
            .write_all(format!("{banner}{new}").as_bytes())
            .unwrap();
        assert!(
            r.read_chunk().unwrap().is_none(),
            "bytes from the middle of the new content must not be shipped"
        );
        assert!(r.rewritten().unwrap());
        r.reset().unwrap();
        let lines = all_lines(&mut r);
        assert_eq!(lines.len(), 340);
        assert_eq!(lines[40], "new line 000");
    }

    #[test]
    fn long_lines_are_truncated_and_the_file_goes_on() {
        let long = "x".repeat(100);
        let content = format!("short\n{long}\nafter\n");
        for buf in [7, 64, 4096] {
            let (_f, mut r) = reader_over(content.as_bytes(), 10, buf);
            let mut truncated = 0;
            let mut lines = Vec::new();
            while let Some(c) = r.read_chunk().unwrap() {
                truncated += c.truncated_lines;
                for l in &c.entries {
                    lines.push(
                        String::from_utf8(c.data[l.start as usize..l.end as usize].to_vec())
                            .unwrap(),
                    );
                }
            }
            assert_eq!(lines, ["short", "xxxxxxxxxx", "after"], "buf {buf}");
            assert_eq!(truncated, 1);
            assert_eq!(r.position().offset, content.len() as u64);
        }
    }

    #[test]
    fn truncation_respects_utf8_boundaries() {
        let (_f, mut r) = reader_over("ééééé\n".as_bytes(), 5, 4096);
        assert_eq!(all_lines(&mut r), ["éé"]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let (_f, mut r) = reader_over(b"ok\nbad\xff\xfeend\n", 100, 4096);
        assert_eq!(all_lines(&mut r), ["ok", "bad\u{fffd}\u{fffd}end"]);
        // Replacement never takes a line past max_line.
        let (_f, mut r) = reader_over(b"ab\xff\xfe\xfd\n", 5, 4096);
        assert_eq!(all_lines(&mut r), ["ab\u{fffd}"]);
    }

    #[test]
    fn the_position_hashes_the_file_bytes_even_when_utf8_was_repaired() {
        // A checkpoint taken after invalid UTF-8 must still match the file on resume; hashing
        // the repaired text instead made every restart re-read such files from the start.
        let content = b"valid line\ninvalid \xff\xfe line\n";
        for framing in [Framing::raw(100), {
            let mut f = Framing::raw(100);
            f.json_fields = vec!["x".into()];
            f
        }] {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(content).unwrap();
            let framing = Arc::new(framing);
            let mut r = FileReader::new(f.reopen().unwrap(), 0, framing.clone(), 4096).unwrap();
            all_lines(&mut r);
            let end = r.position();
            assert_eq!(end.offset, content.len() as u64);
            assert_eq!(
                end.tail_hash,
                hash(&content[content.len() - end.tail_len as usize..])
            );
            let resumed = FileReader::new(f.reopen().unwrap(), end.offset, framing, 64).unwrap();
            assert_eq!(resumed.position(), end);
        }
    }

    #[test]
    fn tail_hash_is_independent_of_read_sizes() {
        let content: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let (_f, mut a) = reader_over(content.as_bytes(), 1000, 5);
        let (_g, mut b) = reader_over(content.as_bytes(), 1000, 4096);
        all_lines(&mut a);
        all_lines(&mut b);
        assert_eq!(a.position(), b.position());
        // A reader resumed at that offset computes the same position.
        let (_h, c) = reader_over(content.as_bytes(), 1000, 4096);
        let resumed = FileReader::new(
            c.file.try_clone().unwrap(),
            a.position().offset,
            Arc::new(Framing::raw(1000)),
            64,
        )
        .unwrap();
        assert_eq!(resumed.position(), a.position());
        let head = &content.as_bytes()[..HEAD_LEN];
        assert_eq!(a.fingerprint(), (HEAD_LEN as u32, hash(head)));
        assert_eq!(resumed.fingerprint(), a.fingerprint());
    }
}
