//! What a line becomes: the records of a file decoded into log entries.
//!
//! A source's [`Framing`] says how: the record format (`raw`, CRI, Docker JSON), whether
//! partial records are joined, whether lines are grouped into multiline entries, where the
//! timestamp comes from and which structured metadata an entry carries. A [`Framer`] applies
//! it to the lines the reader split.
//!
//! The checkpoint contract decides the shape of this code: a file position is only ever the
//! end of a *complete* entry. Lines that belong to an unfinished entry (a CRI `P` sequence
//! without its `F` record, a multiline group that may still grow) are not consumed: the reader
//! keeps their bytes and hands them to the framer again with the next read, so the framer keeps
//! no half-built entries between reads, and a crash re-reads the whole entry. When records of
//! two streams interleave, an entry that is complete but overlaps an unfinished one is held back
//! with it, so nothing behind the position is ever sent twice or as a fragment.

use std::ops::Range;
use std::time::Duration;

use regex::bytes::Regex;

use super::timestamp::{TsFormat, parse_rfc3339};
use crate::pipeline::{Entry, Meta};

/// How the records of a file are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One line is one entry.
    #[default]
    Raw,
    /// Kubernetes CRI: `<RFC 3339 time> <stdout|stderr> <P|F> <message>`.
    Cri,
    /// Docker's json-file driver: `{"log":"<message>\n","stream":"stdout","time":"..."}`.
    Docker,
}

/// What becomes of the CRI/Docker `stream` (stdout or stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamAs {
    /// A `stream` label: stdout and stderr are two Loki streams (what Promtail does).
    #[default]
    Label,
    /// A `stream` structured-metadata field.
    Metadata,
    /// Not kept.
    Drop,
}

/// Multiline grouping: a line matching `start` begins an entry; other lines continue it.
#[derive(Debug, Clone)]
pub struct Multiline {
    pub start: Regex,
    pub max_lines: usize,
    pub max_bytes: usize,
    /// A group is complete when no line arrives for this long.
    pub timeout: Duration,
}

/// Timestamp extraction for raw lines.
#[derive(Debug, Clone)]
pub struct TimestampRule {
    pub regex: Regex,
    /// The capture group holding the timestamp.
    pub group: usize,
    pub format: TsFormat,
    /// Seconds east of UTC for RFC 3339 text without a zone.
    pub zone: i32,
}

/// A source's framing settings (validated by the config).
#[derive(Debug, Clone)]
pub struct Framing {
    pub format: Format,
    pub stream_as: StreamAs,
    pub multiline: Option<Multiline>,
    pub timestamp: Option<TimestampRule>,
    /// Top-level fields of JSON entries copied into structured metadata.
    pub json_fields: Vec<String>,
    /// Timestamps further in the future than this are clamped to the read time.
    pub max_future: Duration,
    /// Longest entry text (longer ones are cut); a multiline group may reach `max_bytes`.
    pub max_line: usize,
}

/// Default of `max_future`: how far ahead of the read time a timestamp may be.
pub const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(600);

/// Name of the label or metadata field holding a CRI/Docker stream.
pub const STREAM: &str = "stream";
/// Values of [`STREAM`], indexed by an entry's stream key.
pub const STREAMS: [&str; 2] = ["stdout", "stderr"];

impl Framing {
    /// Raw lines, one entry each, stamped at read time: the reader's fast path.
    pub fn raw(max_line: usize) -> Framing {
        Framing {
            format: Format::Raw,
            stream_as: StreamAs::Label,
            multiline: None,
            timestamp: None,
            json_fields: Vec::new(),
            max_future: DEFAULT_MAX_FUTURE,
            max_line,
        }
    }

    pub fn is_plain(&self) -> bool {
        self.format == Format::Raw
            && self.multiline.is_none()
            && self.timestamp.is_none()
            && self.json_fields.is_empty()
    }

    /// Longest record the reader keeps whole: the entry limit plus room for the framing.
    pub fn record_limit(&self) -> usize {
        match self.format {
            Format::Raw => self.max_line,
            Format::Cri => self.max_line + 128,
            // JSON escaping can double a message (and `\u00XX` six-fold, rarely).
            Format::Docker => self.max_line * 2 + 256,
        }
    }

    /// Whether entries carry the stream as a label, so that a file feeds two Loki streams.
    pub fn stream_label(&self) -> bool {
        self.format != Format::Raw && self.stream_as == StreamAs::Label
    }

    /// Whether entries carry the stream as structured metadata.
    pub fn stream_meta(&self) -> bool {
        self.format != Format::Raw && self.stream_as == StreamAs::Metadata
    }

    /// Names of the structured-metadata fields entries may carry, in [`Meta::name`] order.
    /// How long an unfinished entry waits for more lines: the multiline timeout, else the
    /// source's `partial_line_timeout`.
    pub fn max_partial_age(
        &self,
        partial_line_timeout: std::time::Duration,
    ) -> std::time::Duration {
        self.multiline
            .as_ref()
            .map_or(partial_line_timeout, |m| m.timeout)
    }

    pub fn meta_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.stream_meta() {
            names.push(STREAM.to_owned());
        }
        names.extend(self.json_fields.iter().cloned());
        names
    }
}

/// What framing noticed in one read, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrameStats {
    /// Entries cut to the size limit.
    pub truncated: u64,
    /// Records that did not parse as the source's format and were shipped as raw lines.
    pub unparsed: u64,
    /// Entries whose timestamp could not be extracted and that got the read time instead.
    pub ts_fallbacks: u64,
    /// Timestamps too far in the future, replaced by the read time.
    pub ts_clamped: u64,
}

/// The entries of one read.
#[derive(Debug, Default)]
pub struct Framed {
    pub entries: Vec<Entry>,
    pub meta: Vec<Meta>,
    pub stats: FrameStats,
    /// Bytes of the input consumed: everything before the first unfinished entry.
    pub consumed: usize,
}

/// Entry text while it is assembled: a range of the read's bytes while it is one contiguous
/// piece of them, an owned copy once pieces had to be joined.
#[derive(Debug, Clone)]
enum Text {
    Data(Range<usize>),
    Owned(Vec<u8>),
}

impl Text {
    fn len(&self) -> usize {
        match self {
            Text::Data(r) => r.len(),
            Text::Owned(v) => v.len(),
        }
    }

    fn bytes<'a>(&'a self, data: &'a [u8]) -> &'a [u8] {
        match self {
            Text::Data(r) => &data[r.clone()],
            Text::Owned(v) => v,
        }
    }

    /// Appends `more` (after `sep`), keeping at most `limit` bytes. Returns false if cut.
    fn append(&mut self, data: &[u8], more: &Text, sep: Option<u8>, limit: usize) -> bool {
        if let (Text::Data(r), Text::Data(m)) = (&mut *self, more) {
            let contiguous = match sep {
                None => m.start == r.end,
                Some(s) => data.get(r.end) == Some(&s) && m.start == r.end + 1,
            };
            if contiguous {
                if m.end - r.start <= limit {
                    r.end = m.end;
                    return true;
                }
                r.end = r.start + cut_point(&data[r.start..], limit);
                return false;
            }
        }
        let mut v = match std::mem::replace(self, Text::Owned(Vec::new())) {
            Text::Data(r) => data[r].to_vec(),
            Text::Owned(v) => v,
        };
        v.extend(sep);
        v.extend_from_slice(more.bytes(data));
        let fits = v.len() <= limit;
        if !fits {
            v.truncate(cut_point(&v, limit));
        }
        *self = Text::Owned(v);
        fits
    }

    /// Cuts to at most `limit` bytes; returns false if it had to.
    fn limit(&mut self, data: &[u8], limit: usize) -> bool {
        if self.len() <= limit {
            return true;
        }
        match self {
            Text::Data(r) => r.end = r.start + cut_point(&data[r.clone()], limit),
            Text::Owned(v) => v.truncate(cut_point(v, limit)),
        }
        false
    }
}

/// The largest length ≤ `limit` that does not split a UTF-8 sequence of `bytes`.
fn cut_point(bytes: &[u8], limit: usize) -> usize {
    if bytes.len() <= limit {
        return bytes.len();
    }
    let mut end = limit;
    while end > 0 && (bytes[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    end
}

/// An entry (or the start of one) and the bytes of the read it spans.
#[derive(Debug)]
struct Piece {
    raw_start: usize,
    raw_end: usize,
    key: u8,
    ts: i64,
    text: Text,
    truncated: bool,
}

#[derive(Debug, Default)]
struct Open {
    /// Partial records (CRI `P`, Docker lines without `\n`) waiting for their final record.
    join: Option<Piece>,
    /// A multiline group that may still grow, and its line count.
    group: Option<(Piece, usize)>,
}

/// The framing state of one file.
#[derive(Debug)]
pub struct Framer {
    framing: std::sync::Arc<Framing>,
    /// Per stream: the rest of an over-long partial sequence is being skipped up to its final
    /// record. The only state kept between reads (as of the consumed position).
    skipping: [bool; 2],
}

impl Framer {
    pub fn new(framing: std::sync::Arc<Framing>) -> Framer {
        Framer {
            framing,
            skipping: [false; 2],
        }
    }

    /// The file was truncated: start over.
    pub fn reset(&mut self) {
        self.skipping = [false; 2];
    }

    /// Frames the records of one read. `lines[i]` is the text of record `i` in `data` (without
    /// its terminator); a record ends where the next begins, the last at `complete_end`. With
    /// `all`, unfinished entries are completed as they are (a timeout or the end of a file).
    ///
    /// On return `data` holds the consumed bytes followed by the texts that had to be assembled,
    /// and the entries point into it; the unconsumed rest is returned to be read again.
    pub fn frame(
        &mut self,
        data: &mut Vec<u8>,
        lines: &[Range<u32>],
        complete_end: usize,
        all: bool,
        now: i64,
    ) -> (Framed, Vec<u8>) {
        let f = self.framing.clone();
        let mut stats = FrameStats::default();
        let mut open: [Open; 2] = Default::default();
        let mut done: Vec<Piece> = Vec::with_capacity(lines.len());
        let start_skipping = self.skipping;
        // (end of the record that changed it, stream, new state)
        let mut skip_changes: Vec<(usize, u8, bool)> = Vec::new();

        for (i, line) in lines.iter().enumerate() {
            let raw_start = line.start as usize;
            let raw_end = lines
                .get(i + 1)
                .map_or(complete_end, |next| next.start as usize);
            let line = line.start as usize..line.end as usize;
            let (record, partial) = match self.decode(data, line, raw_start, raw_end) {
                Some(r) => r,
                None => {
                    stats.unparsed += 1;
                    let piece = Piece {
                        raw_start,
                        raw_end,
                        key: 0,
                        ts: 0,
                        text: Text::Data(lines[i].start as usize..lines[i].end as usize),
                        truncated: false,
                    };
                    (piece, false)
                }
            };
            let key = record.key as usize;
            if self.skipping[key] {
                if !partial {
                    self.skipping[key] = false;
                    skip_changes.push((raw_end, record.key, false));
                }
                continue;
            }
            let logical = if partial {
                let fits = match open[key].join.as_mut() {
                    Some(j) => {
                        j.raw_end = raw_end;
                        j.text.append(data, &record.text, None, f.max_line)
                    }
                    None => {
                        let j = open[key].join.insert(record);
                        j.text.limit(data, f.max_line)
                    }
                };
                if fits {
                    None
                } else {
                    // Over-long: ship what fits now and skip the rest of the sequence.
                    self.skipping[key] = true;
                    skip_changes.push((raw_end, key as u8, true));
                    open[key].join.take().map(|mut j| {
                        j.truncated = true;
                        j
                    })
                }
            } else {
                match open[key].join.take() {
                    Some(mut j) => {
                        j.raw_end = raw_end;
                        if !j.text.append(data, &record.text, None, f.max_line) {
                            j.truncated = true;
                        }
                        Some(j)
                    }
                    None => Some(record),
                }
            };
            if let Some(mut l) = logical {
                if !l.text.limit(data, f.max_line) {
                    l.truncated = true;
                }
                self.group(data, &mut open[key], l, &mut done);
            }
        }

        let mut boundary = complete_end;
        for o in &mut open {
            if all {
                if let Some(j) = o.join.take() {
                    self.group(data, o, j, &mut done);
                }
                if let Some((g, _)) = o.group.take() {
                    done.push(g);
                }
                continue;
            }
            for p in o.join.iter().chain(o.group.iter().map(|(g, _)| g)) {
                boundary = boundary.min(p.raw_start);
            }
        }
        if !done.is_sorted_by_key(|p| p.raw_start) {
            done.sort_by_key(|p| p.raw_start);
        }
        // A complete entry overlapping the unconsumed part is held back with it.
        loop {
            let before = boundary;
            for p in &done {
                if p.raw_start < boundary && p.raw_end > boundary {
                    boundary = p.raw_start;
                }
            }
            if boundary == before {
                break;
            }
        }
        self.skipping = start_skipping;
        for &(at, key, state) in &skip_changes {
            if at <= boundary {
                self.skipping[key as usize] = state;
            }
        }

        let carry = data.split_off(boundary);
        let mut out = Framed {
            entries: Vec::with_capacity(done.len()),
            meta: Vec::new(),
            stats,
            consumed: boundary,
        };
        self.emit(data, done, boundary, now, &mut out);
        (out, carry)
    }

    /// Decodes one record: the piece of text it contributes and whether it is partial.
    /// `None` if it does not parse as the source's format.
    fn decode(
        &self,
        data: &[u8],
        line: Range<usize>,
        raw_start: usize,
        raw_end: usize,
    ) -> Option<(Piece, bool)> {
        let piece = |key, ts, text| Piece {
            raw_start,
            raw_end,
            key,
            ts,
            text,
            truncated: false,
        };
        match self.framing.format {
            Format::Raw => Some((piece(0, 0, Text::Data(line)), false)),
            Format::Cri => {
                let rec = parse_cri(&data[line.clone()])?;
                let text = Text::Data(line.start + rec.message..line.end);
                Some((piece(rec.key, rec.ts, text), rec.partial))
            }
            Format::Docker => {
                let rec = parse_docker(&data[line])?;
                Some((
                    piece(rec.key, rec.ts, Text::Owned(rec.message)),
                    rec.partial,
                ))
            }
        }
    }

    /// Passes a complete line through multiline grouping (or straight to `done`).
    fn group(&self, data: &[u8], open: &mut Open, line: Piece, done: &mut Vec<Piece>) {
        let Some(ml) = &self.framing.multiline else {
            done.push(line);
            return;
        };
        let starts = ml.start.is_match(line.text.bytes(data));
        match open.group.take() {
            Some((mut g, n)) if !starts && g.text.len() + 1 + line.text.len() <= ml.max_bytes => {
                g.text.append(data, &line.text, Some(b'\n'), ml.max_bytes);
                g.raw_end = line.raw_end;
                g.truncated |= line.truncated;
                if n + 1 >= ml.max_lines {
                    done.push(g);
                } else {
                    open.group = Some((g, n + 1));
                }
            }
            previous => {
                done.extend(previous.map(|(g, _)| g));
                if ml.max_lines <= 1 {
                    done.push(line);
                } else {
                    open.group = Some((line, 1));
                }
            }
        }
    }

    /// Turns the complete pieces before `boundary` into entries, appending assembled texts and
    /// metadata values to `data`.
    fn emit(
        &self,
        data: &mut Vec<u8>,
        done: Vec<Piece>,
        boundary: usize,
        now: i64,
        out: &mut Framed,
    ) {
        let f = &self.framing;
        let stream_meta = f.stream_meta();
        let stream_label = f.stream_label();
        let max_ts = now.saturating_add(f.max_future.as_nanos() as i64);
        let all_valid = std::str::from_utf8(data).is_ok();
        let limit = f.multiline.as_ref().map_or(f.max_line, |m| m.max_bytes);
        // The stream names, once per read, for the entries' `stream` metadata to point at.
        let mut stream_values = [(0u32, 0u32); 2];
        if stream_meta {
            for (slot, name) in stream_values.iter_mut().zip(STREAMS) {
                let start = data.len() as u32;
                data.extend_from_slice(name.as_bytes());
                *slot = (start, data.len() as u32);
            }
        }
        for p in done.into_iter().filter(|p| p.raw_end <= boundary) {
            out.stats.truncated += p.truncated as u64;
            let (start, end) = match p.text {
                Text::Data(r) if all_valid || std::str::from_utf8(&data[r.clone()]).is_ok() => {
                    (r.start, r.end)
                }
                text => {
                    let start = data.len();
                    let bytes = match text {
                        Text::Data(r) => data[r].to_vec(),
                        Text::Owned(v) => v,
                    };
                    // U+FFFD is longer than the byte it replaces: cut again to the limit.
                    let fixed = String::from_utf8_lossy(&bytes);
                    let keep = cut_point(fixed.as_bytes(), limit);
                    out.stats.truncated += (keep < fixed.len()) as u64;
                    data.extend_from_slice(&fixed.as_bytes()[..keep]);
                    (start, data.len())
                }
            };
            let mut ts = p.ts;
            if let Some(rule) = &f.timestamp {
                ts = extract_ts(rule, &data[start..end]).unwrap_or(0);
                out.stats.ts_fallbacks += (ts == 0) as u64;
            }
            if ts > max_ts {
                ts = now;
                out.stats.ts_clamped += 1;
            }
            let meta_start = out.meta.len();
            if stream_meta {
                let (start, end) = stream_values[p.key as usize];
                out.meta.push(Meta {
                    name: 0,
                    start,
                    end,
                });
            }
            if !f.json_fields.is_empty() {
                json_metadata(
                    data,
                    start..end,
                    &f.json_fields,
                    stream_meta as u8,
                    &mut out.meta,
                );
            }
            out.entries.push(Entry {
                start: start as u32,
                end: end as u32,
                ts,
                meta_start: meta_start as u32,
                meta_len: (out.meta.len() - meta_start) as u16,
                sub: if stream_label { p.key as u16 } else { 0 },
            });
        }
    }
}

/// Copies the configured top-level fields of a JSON object entry into metadata values
/// appended to `data`. Entries that are not JSON objects get none.
fn json_metadata(
    data: &mut Vec<u8>,
    text: Range<usize>,
    fields: &[String],
    first_name: u8,
    meta: &mut Vec<Meta>,
) {
    let bytes = &data[text];
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return;
    }
    let Ok(mut object) =
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(bytes)
    else {
        return;
    };
    // Field names are distinct (the config checks), so each value can be moved out.
    for (i, name) in fields.iter().enumerate() {
        let value = match object.remove(name) {
            Some(serde_json::Value::String(s)) => s,
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v.to_string(),
            _ => continue,
        };
        let start = data.len();
        data.extend_from_slice(value.as_bytes());
        meta.push(Meta {
            name: first_name + i as u8,
            start: start as u32,
            end: data.len() as u32,
        });
    }
}

fn extract_ts(rule: &TimestampRule, text: &[u8]) -> Option<i64> {
    let first_line = &text[..memchr::memchr(b'\n', text).unwrap_or(text.len())];
    let caps = rule.regex.captures(first_line)?;
    let m = caps.get(rule.group)?;
    rule.format
        .parse(m.as_bytes(), rule.zone)
        .filter(|&ts| ts != 0)
}

/// A decoded CRI or Docker record.
#[derive(Debug, PartialEq, Eq)]
struct Record<M> {
    ts: i64,
    /// 0 for stdout, 1 for stderr.
    key: u8,
    partial: bool,
    message: M,
}

/// Parses `<time> <stream> <tags> <message>`; `message` is the offset of the message.
fn parse_cri(line: &[u8]) -> Option<Record<usize>> {
    let sp1 = memchr::memchr(b' ', line)?;
    let ts = parse_rfc3339(&line[..sp1], 0)?;
    let rest = &line[sp1 + 1..];
    let key = if rest.starts_with(b"stdout ") {
        0
    } else if rest.starts_with(b"stderr ") {
        1
    } else {
        return None;
    };
    let tags_at = sp1 + 8;
    let tags = &line[tags_at..];
    let (tags, message) = match memchr::memchr(b' ', tags) {
        Some(sp) => (&tags[..sp], tags_at + sp + 1),
        None => (tags, line.len()),
    };
    // The first tag is P (partial) or F (full); more tags may follow after ':'.
    let partial = match tags.split(|&b| b == b':').next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    Some(Record {
        ts,
        key,
        partial,
        message,
    })
}

#[derive(serde::Deserialize)]
struct DockerLine<'a> {
    log: String,
    #[serde(borrow, default)]
    stream: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<std::borrow::Cow<'a, str>>,
}

/// Parses a json-file line; a message without its final `\n` is partial.
fn parse_docker(line: &[u8]) -> Option<Record<Vec<u8>>> {
    let d: DockerLine = serde_json::from_slice(line).ok()?;
    let key = match d.stream.as_deref() {
        Some("stderr") => 1,
        _ => 0,
    };
    let ts = d
        .time
        .as_deref()
        .and_then(|t| parse_rfc3339(t.as_bytes(), 0))
        .unwrap_or(0);
    let mut message = d.log.into_bytes();
    let partial = message.last() != Some(&b'\n');
    if !partial {
        message.pop();
        if message.last() == Some(&b'\r') {
            message.pop();
        }
    }
    Some(Record {
        ts,
        key,
        partial,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const NOW: i64 = 1_795_662_900_000_000_000; // 2026-11-26T03:15:00Z

    /// Splits `input` into lines the way the reader does (complete lines only unless `all`).
    fn lines_of(input: &[u8], all: bool) -> (Vec<Range<u32>>, usize) {
        let mut lines = Vec::new();
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', input) {
            lines.push(start as u32..nl as u32);
            start = nl + 1;
        }
        if all && start < input.len() {
            lines.push(start as u32..input.len() as u32);
            start = input.len();
        }
        (lines, start)
    }

    /// An entry as the tests see it: text, timestamp, metadata, stream key.
    type Seen = (String, i64, Vec<(String, String)>, u16);

    /// Frames `input`; returns the entries, the carry and the stats.
    fn frame(framer: &mut Framer, input: &[u8], all: bool) -> (Vec<Seen>, Vec<u8>, FrameStats) {
        let mut data = input.to_vec();
        let (lines, end) = lines_of(input, all);
        let (framed, carry) = framer.frame(&mut data, &lines, end, all, NOW);
        let names = framer.framing.meta_names();
        let entries = framed
            .entries
            .iter()
            .map(|e| {
                let meta = framed.meta[e.meta_start as usize..][..e.meta_len as usize]
                    .iter()
                    .map(|m| {
                        (
                            names[m.name as usize].clone(),
                            String::from_utf8(data[m.start as usize..m.end as usize].to_vec())
                                .unwrap(),
                        )
                    })
                    .collect();
                let text = String::from_utf8(data[e.start as usize..e.end as usize].to_vec());
                (text.unwrap(), e.ts, meta, e.sub)
            })
            .collect();
        assert_eq!(framed.consumed + carry.len(), input.len());
        (entries, carry, framed.stats)
    }

    fn texts(e: &[Seen]) -> Vec<&str> {
        e.iter().map(|e| e.0.as_str()).collect()
    }

    fn framer(format: Format, f: impl FnOnce(&mut Framing)) -> Framer {
        let mut framing = Framing::raw(1024);
        framing.format = format;
        f(&mut framing);
        Framer::new(Arc::new(framing))
    }

    fn multiline(start: &str) -> Option<Multiline> {
        Some(Multiline {
            start: Regex::new(start).unwrap(),
            max_lines: 100,
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(1),
        })
    }

    const T0: &str = "2026-11-26T03:15:00.000000001Z";
    const T1: &str = "2026-11-26T03:15:01Z";

    #[test]
    fn cri_records_lose_their_framing_and_keep_their_time() {
        let mut fr = framer(Format::Cri, |_| {});
        let input = format!("{T0} stdout F hello world\n{T1} stderr F oops\n{T1} stdout F\n");
        let (e, carry, stats) = frame(&mut fr, input.as_bytes(), false);
        assert_eq!(texts(&e), ["hello world", "oops", ""]);
        assert_eq!(e[0].1, NOW + 1);
        assert_eq!(e[1].1, NOW + 1_000_000_000);
        assert_eq!(
            (e[0].3, e[1].3),
            (0, 1),
            "stdout and stderr are separate streams"
        );
        assert!(carry.is_empty());
        assert_eq!(stats, FrameStats::default());
    }

    #[test]
    fn cri_partials_are_joined_and_an_unfinished_sequence_is_not_consumed() {
        let mut fr = framer(Format::Cri, |_| {});
        let head = format!("{T0} stdout F before\n{T0} stdout P part one, \n");
        let (e, carry, _) = frame(&mut fr, head.as_bytes(), false);
        assert_eq!(texts(&e), ["before"]);
        assert_eq!(carry, format!("{T0} stdout P part one, \n").as_bytes());
        // The next read sees the carried record again, now with its end.
        let mut next = carry;
        next.extend_from_slice(format!("{T1} stdout P two, \n{T1} stdout F three\n").as_bytes());
        let (e, carry, _) = frame(&mut fr, &next, false);
        assert_eq!(texts(&e), ["part one, two, three"]);
        assert_eq!(
            e[0].1,
            NOW + 1,
            "a joined entry has its first record's time"
        );
        assert!(carry.is_empty());
    }

    #[test]
    fn interleaved_streams_hold_back_an_overlapping_complete_entry() {
        let mut fr = framer(Format::Cri, |_| {});
        // stdout P, stderr P, stdout F: stdout's entry is complete but spans stderr's unfinished
        // record, so both stay unconsumed.
        let input =
            format!("{T0} stdout F first\n{T0} stdout P a\n{T0} stderr P b\n{T0} stdout F c\n");
        let (e, carry, _) = frame(&mut fr, input.as_bytes(), false);
        assert_eq!(texts(&e), ["first"]);
        let mut next = carry;
        next.extend_from_slice(format!("{T1} stderr F d\n").as_bytes());
        let (e, carry, _) = frame(&mut fr, &next, false);
        assert_eq!(texts(&e), ["ac", "bd"]);
        assert!(carry.is_empty());
    }

    #[test]
    fn an_over_long_partial_sequence_is_cut_and_its_rest_skipped() {
        let mut fr = framer(Format::Cri, |f| f.max_line = 10);
        let input = format!(
            "{T0} stdout P 123456\n{T0} stdout P 789abc\n{T0} stdout P def\n{T0} stdout F ghi\n{T0} stdout F next\n"
        );
        let (e, carry, stats) = frame(&mut fr, input.as_bytes(), false);
        assert_eq!(texts(&e), ["123456789a", "next"]);
        assert_eq!(stats.truncated, 1);
        assert!(carry.is_empty());
    }

    #[test]
    fn skipping_state_survives_between_reads() {
        let mut fr = framer(Format::Cri, |f| f.max_line = 4);
        let (e, _, _) = frame(&mut fr, format!("{T0} stdout P 123456\n").as_bytes(), false);
        assert_eq!(texts(&e), ["1234"]);
        let (e, _, _) = frame(&mut fr, format!("{T0} stdout P 78\n").as_bytes(), false);
        assert!(e.is_empty());
        let (e, _, _) = frame(
            &mut fr,
            format!("{T0} stdout F 9\n{T0} stdout F ok\n").as_bytes(),
            false,
        );
        assert_eq!(texts(&e), ["ok"]);
    }

    #[test]
    fn malformed_cri_lines_are_shipped_raw_and_counted() {
        let mut fr = framer(Format::Cri, |_| {});
        let input = format!("not cri at all\n{T0} stdin F x\n{T0} stdout X y\n{T0} stdout F ok\n");
        let (e, _, stats) = frame(&mut fr, input.as_bytes(), false);
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].0, "not cri at all");
        assert_eq!(e[0].1, 0, "unparsed lines get the read time");
        assert_eq!(e[3].0, "ok");
        assert_eq!(stats.unparsed, 3);
    }

    #[test]
    fn docker_lines_are_decoded_and_joined() {
        let mut fr = framer(Format::Docker, |f| f.stream_as = StreamAs::Metadata);
        let input = concat!(
            r#"{"log":"hello \"quoted\"\n","stream":"stdout","time":"2026-11-26T03:15:00.000000001Z"}"#,
            "\n",
            r#"{"log":"long ","stream":"stderr","time":"2026-11-26T03:15:01Z"}"#,
            "\n",
            r#"{"log":"line\r\n","stream":"stderr","time":"2026-11-26T03:15:02Z"}"#,
            "\n",
        );
        let (e, carry, _) = frame(&mut fr, input.as_bytes(), false);
        assert_eq!(texts(&e), ["hello \"quoted\"", "long line"]);
        assert_eq!(e[0].1, NOW + 1);
        assert_eq!(e[1].1, NOW + 1_000_000_000);
        assert_eq!(e[1].2, [("stream".to_owned(), "stderr".to_owned())]);
        assert_eq!(e[1].3, 0, "metadata, not a label");
        assert!(carry.is_empty());
    }

    #[test]
    fn multiline_groups_a_stack_trace_without_copying() {
        let mut fr = framer(Format::Raw, |f| f.multiline = multiline(r"^\d{4}-"));
        let input = b"2026-11-26 ERROR boom\njava.lang.IllegalStateException: x\n\tat A.b(A.java:1)\n\tat C.d(C.java:2)\n2026-11-26 INFO next\n";
        let (e, carry, _) = frame(&mut fr, input, false);
        assert_eq!(
            texts(&e),
            [
                "2026-11-26 ERROR boom\njava.lang.IllegalStateException: x\n\tat A.b(A.java:1)\n\tat C.d(C.java:2)"
            ]
        );
        assert_eq!(
            carry, b"2026-11-26 INFO next\n",
            "the last group may still grow"
        );
        let (e, carry, _) = frame(&mut fr, &carry, true);
        assert_eq!(texts(&e), ["2026-11-26 INFO next"]);
        assert!(carry.is_empty());
    }

    #[test]
    fn multiline_limits_split_groups_without_losing_lines() {
        let mut fr = framer(Format::Raw, |f| {
            f.multiline = multiline("^S");
            f.multiline.as_mut().unwrap().max_lines = 3;
        });
        let (e, _, _) = frame(&mut fr, b"S1\nc\nc\nc\nc\nS2\n", true);
        assert_eq!(texts(&e), ["S1\nc\nc", "c\nc", "S2"]);
        let mut fr = framer(Format::Raw, |f| {
            f.multiline = multiline("^S");
            f.multiline.as_mut().unwrap().max_bytes = 8;
        });
        let (e, _, _) = frame(&mut fr, b"S1\nccc\nddd\nS2\n", true);
        assert_eq!(texts(&e), ["S1\nccc", "ddd", "S2"]);
    }

    #[test]
    fn cri_partials_and_multiline_combine() {
        let mut fr = framer(Format::Cri, |f| f.multiline = multiline(r"^Traceback|^\S"));
        let input = format!(
            "{T0} stderr F Traceback (most recent call last):\n{T0} stderr P   File \"x.py\", \n{T0} stderr F line 1\n{T0} stderr F ValueError: bad\n{T1} stderr F next\n"
        );
        // "ValueError" starts with a non-space: a new group under this pattern.
        let (e, carry, _) = frame(&mut fr, input.as_bytes(), true);
        assert!(carry.is_empty());
        assert_eq!(
            texts(&e),
            [
                "Traceback (most recent call last):\n  File \"x.py\", line 1",
                "ValueError: bad",
                "next"
            ]
        );
        assert_eq!(e[0].3, 1);
    }

    #[test]
    fn timestamps_are_extracted_clamped_or_fall_back() {
        let mut fr = framer(Format::Raw, |f| {
            f.timestamp = Some(TimestampRule {
                regex: Regex::new(r"^(\S+) ").unwrap(),
                group: 1,
                format: TsFormat::Rfc3339,
                zone: 3600,
            });
        });
        let input = b"2026-11-26T04:15:00 local time\n2026-11-26T03:15:00Z utc\nno time here\n2030-01-01T00:00:00Z future\n";
        let (e, _, stats) = frame(&mut fr, input, false);
        assert_eq!(e[0].1, NOW, "zone-less time in the configured zone");
        assert_eq!(e[1].1, NOW);
        assert_eq!(e[2].1, 0, "read time");
        assert_eq!(e[3].1, NOW, "clamped to now");
        assert_eq!((stats.ts_fallbacks, stats.ts_clamped), (1, 1));
    }

    #[test]
    fn json_fields_become_structured_metadata() {
        let mut fr = framer(Format::Raw, |f| {
            f.json_fields = vec!["trace_id".into(), "level".into(), "code".into()]
        });
        let input = b"{\"msg\":\"x\",\"level\":\"warn\",\"trace_id\":\"abc\",\"code\":7}\nplain\n{\"level\":{\"nested\":1}}\n";
        let (e, _, _) = frame(&mut fr, input, false);
        let kv = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(
            e[0].2,
            [kv("trace_id", "abc"), kv("level", "warn"), kv("code", "7")]
        );
        assert!(e[1].2.is_empty());
        assert!(e[2].2.is_empty(), "only scalar values");
    }

    #[test]
    fn invalid_utf8_is_replaced_in_assembled_entries() {
        let mut fr = framer(Format::Cri, |_| {});
        // A UTF-8 sequence split across two partial records is whole again once joined.
        let mut input = format!("{T0} stdout P caf").into_bytes();
        input.extend_from_slice(b"\xc3\n");
        input.extend_from_slice(format!("{T0} stdout F ").as_bytes());
        input.extend_from_slice(b"\xa9!\n");
        let (e, _, _) = frame(&mut fr, &input, false);
        assert_eq!(texts(&e), ["caf\u{e9}!"]);
        let mut input = format!("{T0} stdout F bad").into_bytes();
        input.extend_from_slice(b"\xff\n");
        let (e, _, _) = frame(&mut fr, &input, false);
        assert_eq!(texts(&e), ["bad\u{fffd}"]);
        // Replacement never takes an entry past its limit (found by fuzzing).
        let mut fr = framer(Format::Cri, |f| f.max_line = 4);
        let mut input = format!("{T0} stdout F ab").into_bytes();
        input.extend_from_slice(b"\xff\xfe\n");
        let (e, _, stats) = frame(&mut fr, &input, false);
        assert_eq!(texts(&e), ["ab"]);
        assert_eq!(stats.truncated, 1);
    }
}
