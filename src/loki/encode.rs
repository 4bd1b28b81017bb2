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
/// The uncompressed request and the compressor's output are built in pooled buffers: fresh
/// megabytes per batch cost a reallocation, zeroing and page faults on every request (8 % of
/// ztail's CPU in the profile before this), and only the exact compressed bytes leave.
pub fn protobuf(batch: &Batch, agent_id: Option<&str>) -> Vec<u8> {
    let mut s = POOL.take();
    s.raw.clear();
    write_protobuf(&mut s.raw, &mut s.lens, batch, agent_id);
    let max = snap::raw::max_compress_len(s.raw.len());
    if s.compressed.len() < max {
        s.compressed.resize(max, 0);
    }
    // Compression only fails for inputs above snappy's 4 GiB block limit; batches are capped
    // at 64 MiB by the config.
    let n = s
        .encoder
        .compress(&s.raw, &mut s.compressed)
        .unwrap_or_default();
    let body = s.compressed[..n].to_vec();
    s.trim();
    POOL.put(s);
    body
}

/// The uncompressed protobuf `PushRequest`.
pub fn protobuf_uncompressed(batch: &Batch, agent_id: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    write_protobuf(&mut out, &mut Vec::new(), batch, agent_id);
    out
}

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
    raw: Vec<u8>,
    compressed: Vec<u8>,
    /// Encoded length of each stream and entry, from the sizing pass.
    lens: Vec<u32>,
    encoder: snap::raw::Encoder,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            raw: Vec::new(),
            compressed: Vec::new(),
            lens: Vec::new(),
            encoder: snap::raw::Encoder::new(),
        }
    }
}

impl Scratch {
    /// Lets go of buffers far larger than the last request (after a burst, or a batch size
    /// lowered by a 413), so that a quieter ztail does not keep a burst's memory.
    fn trim(&mut self) {
        const KEEP: usize = 256 << 10;
        let used = self.raw.len();
        if self.raw.capacity() > KEEP.max(4 * used) {
            self.raw = Vec::new();
            self.compressed = Vec::new();
            self.lens = Vec::new();
        }
    }
}

/// Appends the `PushRequest` to `out`, sized exactly first (one pass computes every entry's
/// length into `lens`, the second writes).
fn write_protobuf(out: &mut Vec<u8>, lens: &mut Vec<u32>, batch: &Batch, agent_id: Option<&str>) {
    let agent = agent_id.map_or(0, |id| {
        field_len(field_len(AGENT_ID.len()) + field_len(id.len()))
    });
    // `lens` holds each stream's length followed by the lengths of its entries.
    lens.clear();
    let mut total = 0;
    let streams = || batch.streams.iter().filter(|s| s.entries() > 0);
    for s in streams() {
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
    out.reserve_exact(total);
    let start = out.len();
    let mut lens = lens.iter().map(|&n| n as u64);
    for s in streams() {
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
            }
        }
    }
    debug_assert_eq!(
        out.len() - start,
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
