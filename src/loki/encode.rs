//! Push request bodies, built straight from a [`Batch`] without intermediate per-line objects.
//!
//! Protobuf is written by hand (the schema is four small messages, see
//! `reference/loki-push-api.md` §3) and compressed with snappy's *block* format, which is what
//! Loki's distributor decodes. Lines are declared as bytes on the wire-compatible side; the
//! tailer guarantees they are valid UTF-8 anyway. Streams without entries are never written
//! (Loki answers 422 to them). Structured metadata (entry field 3) carries the fields the
//! tailer extracted and, optionally, ztail's own SPIFFE ID.

use crate::pipeline::{Batch, Chunk};

/// Content type of [`protobuf`] bodies.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";
/// Content type of [`json`] bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Name of the structured-metadata field that carries ztail's own SPIFFE ID when
/// `sink.provenance` is on.
pub const AGENT_ID: &str = "agent_spiffe_id";

/// Snappy-compressed protobuf `PushRequest`. With `agent_id`, every entry carries it as the
/// [`AGENT_ID`] structured-metadata field.
pub fn protobuf(batch: &Batch, agent_id: Option<&str>) -> Vec<u8> {
    let raw = protobuf_uncompressed(batch, agent_id);
    // Compression only fails for inputs above snappy's 4 GiB block limit; batches are capped
    // at 64 MiB by the config.
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .unwrap_or_default()
}

/// The uncompressed protobuf `PushRequest`.
pub fn protobuf_uncompressed(batch: &Batch, agent_id: Option<&str>) -> Vec<u8> {
    let agent = agent_id.map(|id| field_len(field_len(AGENT_ID.len()) + field_len(id.len())));
    let mut out =
        Vec::with_capacity(batch.line_bytes + batch.entries * (16 + agent.unwrap_or(0)) + 256);
    for s in batch.streams.iter().filter(|s| s.entries() > 0) {
        let labels = s.stream.labels.as_bytes();
        let mut stream_len = field_len(labels.len());
        for c in &s.chunks {
            for i in 0..c.entries.len() {
                stream_len += field_len(entry_len(c, i, agent));
            }
        }
        put_tag(&mut out, 1, LEN);
        put_varint(&mut out, stream_len as u64);
        put_bytes(&mut out, 1, labels);
        for c in &s.chunks {
            for (i, e) in c.entries.iter().enumerate() {
                put_tag(&mut out, 2, LEN);
                put_varint(&mut out, entry_len(c, i, agent) as u64);
                let (secs, nanos) = split_ts(e.ts);
                put_tag(&mut out, 1, LEN);
                put_varint(&mut out, timestamp_len(secs, nanos) as u64);
                if secs != 0 {
                    put_tag(&mut out, 1, VARINT);
                    put_varint(&mut out, secs as u64);
                }
                if nanos != 0 {
                    put_tag(&mut out, 2, VARINT);
                    put_varint(&mut out, nanos as u64);
                }
                put_bytes(&mut out, 2, c.line(i));
                for (name, value) in c.metadata(i) {
                    put_label_pair(&mut out, name.as_bytes(), value);
                }
                if let Some(id) = agent_id {
                    put_label_pair(&mut out, AGENT_ID.as_bytes(), id.as_bytes());
                }
            }
        }
    }
    out
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
fn entry_len(c: &Chunk, i: usize, agent: Option<usize>) -> usize {
    let (secs, nanos) = split_ts(c.entries[i].ts);
    let mut n = field_len(timestamp_len(secs, nanos)) + field_len(c.line(i).len());
    for (name, value) in c.metadata(i) {
        n += field_len(field_len(name.len()) + field_len(value.len()));
    }
    n + agent.unwrap_or(0)
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
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
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
    fn varint_lengths_match_the_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }
}
