//! Push request bodies, built straight from a [`Batch`] without intermediate per-line objects.
//!
//! Protobuf is written by hand (the schema is four small messages, see
//! `reference/loki-push-api.md` §3) and compressed with snappy's *block* format, which is what
//! Loki's distributor decodes. Lines are declared as bytes on the wire-compatible side; the
//! tailer guarantees they are valid UTF-8 anyway. Streams without entries are never written
//! (Loki answers 422 to them). Structured metadata (entry field 3) carries the fields the
//! tailer extracted and, optionally, ztail's own SPIFFE ID.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use snap::raw::max_compress_len;

use crate::pipeline::{Batch, Chunk, lock};

/// Content type of [`protobuf`] bodies.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";
/// Content type of [`json`] bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Name of the structured-metadata field that carries ztail's own SPIFFE ID when
/// `sink.provenance` is on.
pub const AGENT_ID: &str = "agent_spiffe_id";

/// Snappy-compressed protobuf `PushRequest`. With `agent_id`, every entry carries it as the
/// [`AGENT_ID`] structured-metadata field.
///
/// Snappy's block format compresses its input in independent 64 KiB blocks, so the request is
/// written and compressed one block at a time: the uncompressed bytes never leave the CPU's
/// cache, and the output is byte for byte what compressing the whole request would give. The
/// buffers are pooled (fresh ones per batch cost zeroing and page faults on every request).
pub fn protobuf(batch: &Batch, agent_id: Option<&str>) -> Vec<u8> {
    let mut s = POOL.take();
    let Scratch {
        raw,
        block,
        lens,
        encoder,
    } = &mut s;
    let total = size_protobuf(lens, batch, agent_id);
    // Capacity for the worst case; only the pages written are ever touched.
    let mut body = Vec::with_capacity(varint_len(total as u64) + max_compress_len(total));
    put_varint(&mut body, total as u64);
    // Compresses the full blocks at the front of `raw` (every block with `all`) onto `body`;
    // how many bytes of `raw` it consumed.
    let mut compress = |raw: &mut Vec<u8>, all: bool| {
        let mut done = 0;
        while raw.len() - done >= BLOCK || (all && done < raw.len()) {
            let piece = &raw[done..raw.len().min(done + BLOCK)];
            // Each call writes the piece's own length first: the request has one, in front.
            let n = encoder
                .compress(piece, block)
                .expect("a block of at most 64 KiB fits max_compress_len");
            body.extend_from_slice(&block[varint_len(piece.len() as u64)..n]);
            done += piece.len();
        }
        raw.drain(..done);
        done
    };
    raw.clear();
    write_protobuf(raw, lens, total, batch, agent_id, |raw| {
        compress(raw, false)
    });
    compress(raw, true);
    s.trim();
    POOL.put(s);
    body
}

/// Protobuf `PushRequest` in snappy's block format without compressing it: the request is one
/// literal. Loki reads every protobuf body as snappy, so this is how it takes an uncompressed
/// one (`sink.compression = "none"`): the compressor's CPU (about 60 % of ztail's) is saved, and
/// the body is about three times as large on the wire.
pub fn protobuf_stored(batch: &Batch, agent_id: Option<&str>) -> Vec<u8> {
    let mut s = POOL.take();
    let total = size_protobuf(&mut s.lens, batch, agent_id);
    let mut body = Vec::with_capacity(varint_len(total as u64) + 5 + total);
    put_varint(&mut body, total as u64);
    if total > 0 {
        // A request is at most batch_bytes (64 MiB) and one read past it: far below the 4 GiB
        // a literal's length can say.
        put_literal_tag(&mut body, total);
    }
    write_protobuf(&mut body, &s.lens, total, batch, agent_id, |_| 0);
    s.trim();
    POOL.put(s);
    body
}

/// The tag of a snappy literal of `len` bytes (1 to 2^32): `len - 1` in the tag below 60,
/// else in the one to four bytes after it, the tag saying how many.
fn put_literal_tag(out: &mut Vec<u8>, len: usize) {
    debug_assert!((1..=1 << 32).contains(&len));
    let last = (len - 1) as u32;
    if last < 60 {
        out.push((last as u8) << 2);
    } else {
        let n = (32 - last.leading_zeros() as usize).div_ceil(8);
        out.push(((59 + n) as u8) << 2);
        out.extend_from_slice(&last.to_le_bytes()[..n]);
    }
}

/// The uncompressed protobuf `PushRequest`.
pub fn protobuf_uncompressed(batch: &Batch, agent_id: Option<&str>) -> Vec<u8> {
    let mut lens = Vec::new();
    let total = size_protobuf(&mut lens, batch, agent_id);
    let mut out = Vec::with_capacity(total);
    write_protobuf(&mut out, &lens, total, batch, agent_id, |_| 0);
    out
}

/// Snappy's block size: its compressor starts over every 64 KiB of input.
const BLOCK: usize = 1 << 16;

/// Buffers of [`protobuf`] not in use. A pool rather than per thread: it holds at most one set
/// per request encoded at a time, and [`release_idle_buffers`] can let all of them go.
static POOL: Pool = Pool::new();

/// Frees the pooled buffers if no request was encoded for a second. Called every few seconds,
/// so that an idle ztail does not keep megabytes for its next batch (with 1,000 files watched
/// they were a third of its idle RSS).
pub fn release_idle_buffers() {
    POOL.release_if_idle(1000);
}

struct Pool {
    free: Mutex<Vec<Scratch>>,
    /// When a set was last taken, in [`uptime_ms`].
    last_used: AtomicU64,
}

impl Pool {
    const fn new() -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
            last_used: AtomicU64::new(0),
        }
    }

    fn take(&self) -> Scratch {
        self.last_used.store(uptime_ms(), Ordering::Relaxed);
        lock(&self.free).pop().unwrap_or_default()
    }

    fn put(&self, s: Scratch) {
        lock(&self.free).push(s);
    }

    /// Drops the free sets if none was taken for `idle_ms`; how many it dropped.
    fn release_if_idle(&self, idle_ms: u64) -> usize {
        let idle = uptime_ms().saturating_sub(self.last_used.load(Ordering::Relaxed));
        if idle < idle_ms {
            return 0;
        }
        std::mem::take(&mut *lock(&self.free)).len()
    }
}

/// Milliseconds since the first call: a monotonic clock that fits an atomic.
fn uptime_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The buffers of one [`protobuf`] call.
struct Scratch {
    /// Uncompressed bytes not yet compressed: less than a block and one entry.
    raw: Vec<u8>,
    /// The compressor's output for one block, sized for the worst case once.
    block: Vec<u8>,
    /// Encoded length of each stream and entry, from the sizing pass.
    lens: Vec<u32>,
    encoder: snap::raw::Encoder,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            raw: Vec::new(),
            block: vec![0; max_compress_len(BLOCK)],
            lens: Vec::new(),
            encoder: snap::raw::Encoder::new(),
        }
    }
}

impl Scratch {
    /// Lets go of buffers grown far past their usual size (by a very long entry, or a batch of
    /// very many short ones), so that they do not stay for the next request.
    fn trim(&mut self) {
        if self.raw.capacity() > 4 * BLOCK {
            self.raw = Vec::new();
        }
        if self.lens.capacity() > BLOCK.max(4 * self.lens.len()) {
            self.lens = Vec::new();
        }
    }
}

/// The encoded length of the `PushRequest`; fills `lens` with each stream's length followed by
/// the lengths of its entries, for [`write_protobuf`].
fn size_protobuf(lens: &mut Vec<u32>, batch: &Batch, agent_id: Option<&str>) -> usize {
    let agent = agent_id.map_or(0, |id| {
        field_len(field_len(AGENT_ID.len()) + field_len(id.len()))
    });
    lens.clear();
    let mut total = 0;
    for s in batch.streams.iter().filter(|s| s.entries() > 0) {
        let slot = lens.len();
        lens.push(0);
        let mut stream_len = field_len(s.stream.labels.len());
        for c in &s.chunks {
            for i in 0..c.entries.len() {
                let n = entry_len(c, i, agent);
                lens.push(n as u32);
                stream_len += field_len(n);
            }
        }
        lens[slot] = stream_len as u32;
        total += field_len(stream_len);
    }
    total
}

/// Appends the `PushRequest` of `total` bytes to `out`, with the lengths [`size_protobuf`]
/// computed. After each entry `flush` may take bytes from the front of `out`; it returns how
/// many.
fn write_protobuf(
    out: &mut Vec<u8>,
    lens: &[u32],
    total: usize,
    batch: &Batch,
    agent_id: Option<&str>,
    mut flush: impl FnMut(&mut Vec<u8>) -> usize,
) {
    let start = out.len();
    let mut flushed = 0;
    let mut lens = lens.iter().map(|&n| n as u64);
    for s in batch.streams.iter().filter(|s| s.entries() > 0) {
        put_tag(out, 1, LEN);
        put_varint(out, lens.next().unwrap_or_default());
        put_bytes(out, 1, s.stream.labels.as_bytes());
        for c in &s.chunks {
            for (i, e) in c.entries.iter().enumerate() {
                put_tag(out, 2, LEN);
                put_varint(out, lens.next().unwrap_or_default());
                let (secs, nanos) = split_ts(e.ts);
                put_tag(out, 1, LEN);
                put_varint(out, timestamp_len(secs, nanos) as u64);
                if secs != 0 {
                    put_tag(out, 1, VARINT);
                    put_varint(out, secs as u64);
                }
                if nanos != 0 {
                    put_tag(out, 2, VARINT);
                    put_varint(out, nanos as u64);
                }
                put_bytes(out, 2, c.line(i));
                for (name, value) in c.metadata(i) {
                    put_label_pair(out, name.as_bytes(), value);
                }
                if let Some(id) = agent_id {
                    put_label_pair(out, AGENT_ID.as_bytes(), id.as_bytes());
                }
                flushed += flush(out);
            }
        }
    }
    debug_assert_eq!(
        flushed + out.len() - start,
        total,
        "the sizing pass matches what was written"
    );
}

/// Loki's JSON body: `{"streams":[{"stream":{..},"values":[["<ns>","<line>",{meta}],..]}]}`.
pub fn json(batch: &Batch, agent_id: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.line_bytes + batch.entries * 32 + 256);
    out.extend_from_slice(b"{\"streams\":[");
    let mut first_stream = true;
    for s in batch.streams.iter().filter(|s| s.entries() > 0) {
        if !first_stream {
            out.push(b',');
        }
        first_stream = false;
        out.extend_from_slice(b"{\"stream\":{");
        for (i, (k, v)) in s.stream.label_pairs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_string(&mut out, k);
            out.push(b':');
            json_string(&mut out, v);
        }
        out.extend_from_slice(b"},\"values\":[");
        let mut first = true;
        for c in &s.chunks {
            for (i, e) in c.entries.iter().enumerate() {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(b"[\"");
                out.extend_from_slice(e.ts.to_string().as_bytes());
                out.extend_from_slice(b"\",");
                json_string(&mut out, &String::from_utf8_lossy(c.line(i)));
                if e.meta_len > 0 || agent_id.is_some() {
                    out.extend_from_slice(b",{");
                    let mut first_field = true;
                    let fields = c
                        .metadata(i)
                        .chain(agent_id.map(|id| (AGENT_ID, id.as_bytes())));
                    for (name, value) in fields {
                        if !first_field {
                            out.push(b',');
                        }
                        first_field = false;
                        json_string(&mut out, name);
                        out.push(b':');
                        json_string(&mut out, &String::from_utf8_lossy(value));
                    }
                    out.push(b'}');
                }
                out.push(b']');
            }
        }
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(b"]}");
    out
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

const VARINT: u8 = 0;
const LEN: u8 = 2;

fn split_ts(ts: i64) -> (i64, i32) {
    (
        ts.div_euclid(1_000_000_000),
        ts.rem_euclid(1_000_000_000) as i32,
    )
}

fn timestamp_len(secs: i64, nanos: i32) -> usize {
    let mut n = 0;
    if secs != 0 {
        n += 1 + varint_len(secs as u64);
    }
    if nanos != 0 {
        n += 1 + varint_len(nanos as u64);
    }
    n
}

/// Encoded size of entry `i` of a chunk (without its own tag and length).
fn entry_len(c: &Chunk, i: usize, agent: usize) -> usize {
    let (secs, nanos) = split_ts(c.entries[i].ts);
    let mut n = field_len(timestamp_len(secs, nanos)) + field_len(c.line(i).len());
    for (name, value) in c.metadata(i) {
        n += field_len(field_len(name.len()) + field_len(value.len()));
    }
    n + agent
}

/// A structured-metadata `LabelPair` (entry field 3).
fn put_label_pair(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    put_tag(out, 3, LEN);
    put_varint(out, (field_len(name.len()) + field_len(value.len())) as u64);
    put_bytes(out, 1, name);
    put_bytes(out, 2, value);
}

/// Size of a length-delimited field with a one-byte tag.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn varint_len(v: u64) -> usize {
    // 7 bits per byte: ceil(bits / 7) for bits in 1..=64, without a division.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    (bits * 9 + 64) / 64
}

fn put_tag(out: &mut Vec<u8>, field: u8, wire: u8) {
    out.push((field << 3) | wire);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u8, b: &[u8]) {
    put_tag(out, field, LEN);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loki::labels::LabelSet;
    use crate::pipeline::{Cursor, Entry, Position, Stream};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    /// A batch of two streams with `lines` lines of varied lengths (some far longer than a
    /// block), split into chunks of 100 entries.
    fn batch(lines: usize) -> Batch {
        let streams: Vec<Arc<Stream>> = ["a", "b"]
            .iter()
            .map(|v| {
                let labels = BTreeMap::from([("job".to_owned(), (*v).to_owned())]);
                Arc::new(Stream::new(&LabelSet::new(labels)))
            })
            .collect();
        let cursor = Arc::new(Cursor::new(Position::default()));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut batch = Batch::new();
        for (c, first) in (0..lines).step_by(100).enumerate() {
            let (mut data, mut entries) = (Vec::new(), Vec::new());
            for n in first..lines.min(first + 100) {
                let start = data.len();
                let len = if n % 97 == 0 {
                    70_000
                } else {
                    rng.usize(0..400)
                };
                data.extend((0..len).map(|i| b"ztail logs "[(i + n) % 11]));
                let mut e = Entry::text(start, data.len());
                e.ts = 1_700_000_000_000_000_000 + n as i64;
                entries.push(e);
            }
            batch.push(chunk(&streams[c % 2], &cursor, data, entries));
        }
        batch
    }

    /// A chunk of `entries` over `data`, without metadata.
    fn chunk(
        stream: &Arc<Stream>,
        cursor: &Arc<Cursor>,
        data: Vec<u8>,
        entries: Vec<Entry>,
    ) -> Chunk {
        Chunk {
            stream: stream.clone(),
            cursor: cursor.clone(),
            data: bytes::Bytes::from(data),
            entries,
            meta: Vec::new().into(),
            meta_names: Vec::new().into(),
            end: Position::default(),
            caught_up: false,
        }
    }

    #[test]
    fn stored_bodies_decode_as_snappy_to_the_request() {
        let mut decoder = snap::raw::Decoder::new();
        for lines in [0, 1, 2, 30, 1_000] {
            let b = batch(lines);
            let raw = protobuf_uncompressed(&b, None);
            let stored = protobuf_stored(&b, None);
            assert_eq!(
                decoder.decompress_vec(&stored).unwrap(),
                raw,
                "{lines} lines"
            );
            // Only the lengths are added: the request's own and the literal's tag.
            assert!(stored.len() <= raw.len() + 10, "{lines} lines");
        }
        for len in [1, 300, 70_000, 1 << 24] {
            let line = "x".repeat(len);
            let b = one_line_batch(&line);
            let raw = protobuf_uncompressed(&b, None);
            let stored = protobuf_stored(&b, None);
            assert_eq!(
                decoder.decompress_vec(&stored).unwrap(),
                raw,
                "a line of {len}"
            );
        }
    }

    #[test]
    fn literal_tags_decode_at_every_width_and_its_edges() {
        let mut decoder = snap::raw::Decoder::new();
        // In the tag up to 60; then 1, 2, 3 and 4 bytes after it, each at both ends.
        let lens = [
            1,
            59,
            60,
            61,
            256,
            257,
            65_536,
            65_537,
            1 << 24,
            (1 << 24) + 1,
        ];
        let widths = [1, 1, 1, 2, 2, 3, 3, 4, 4, 5];
        for (len, width) in lens.into_iter().zip(widths) {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut body = Vec::new();
            put_varint(&mut body, len as u64);
            let start = body.len();
            put_literal_tag(&mut body, len);
            assert_eq!(body.len() - start, width, "tag of a literal of {len}");
            body.extend_from_slice(&data);
            assert_eq!(decoder.decompress_vec(&body).unwrap(), data, "{len}");
        }
    }

    /// A batch of one stream with one entry of `line`.
    fn one_line_batch(line: &str) -> Batch {
        let labels = BTreeMap::from([("job".to_owned(), "a".to_owned())]);
        let stream = Arc::new(Stream::new(&LabelSet::new(labels)));
        let cursor = Arc::new(Cursor::new(Position::default()));
        let mut batch = Batch::new();
        let entries = vec![Entry::text(0, line.len())];
        batch.push(chunk(&stream, &cursor, line.as_bytes().to_vec(), entries));
        batch
    }

    #[test]
    fn block_by_block_compression_equals_compressing_the_whole_request() {
        let mut whole = snap::raw::Encoder::new();
        for lines in [0, 1, 30, 1_000, 5_000] {
            let b = batch(lines);
            for agent in [None, Some("spiffe://example.org/ztail")] {
                let raw = protobuf_uncompressed(&b, agent);
                assert!(lines < 1_000 || raw.len() > 8 * BLOCK, "spans many blocks");
                assert_eq!(
                    protobuf(&b, agent),
                    whole.compress_vec(&raw).unwrap(),
                    "{lines} lines, agent {agent:?}"
                );
            }
        }
    }

    #[test]
    fn pooled_buffers_are_kept_while_busy_and_dropped_once_idle() {
        let pool = Pool::new();
        let mut s = pool.take();
        s.raw.resize(300 << 10, b'x');
        pool.put(s);
        assert_eq!(pool.release_if_idle(60_000), 0, "just used: kept");
        let s = pool.take();
        assert_eq!(s.raw.len(), 300 << 10, "the pooled set is reused");
        pool.put(s);
        assert_eq!(pool.release_if_idle(0), 1, "idle: dropped");
        assert_eq!(
            pool.take().raw.capacity(),
            0,
            "a fresh set after the release"
        );
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        let edges = (1..64).flat_map(|bits| [(1u64 << bits) - 1, 1u64 << bits]);
        for v in [0u64, u64::MAX].into_iter().chain(edges) {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }
}
