//! The push encoders: any batch (texts, timestamps, structured metadata, several streams)
//! encodes to a protobuf body that decodes, with an independent decoder, to exactly that batch,
//! a snappy block (compressed, and stored as one literal) that decompresses to it, and a JSON
//! body that parses to it.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ztail::loki::encode;
use ztail::loki::labels::LabelSet;
use ztail::pipeline::{Batch, Chunk, Cursor, Entry, Meta, Position, Stream};

#[derive(Clone, PartialEq, prost::Message)]
struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    streams: Vec<PStream>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct PStream {
    #[prost(string, tag = "1")]
    labels: String,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<PEntry>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct PEntry {
    #[prost(message, optional, tag = "1")]
    timestamp: Option<Ts>,
    #[prost(bytes = "vec", tag = "2")]
    line: Vec<u8>,
    #[prost(message, repeated, tag = "3")]
    structured_metadata: Vec<LabelPair>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Ts {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}
#[derive(Clone, PartialEq, prost::Message)]
struct LabelPair {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// An entry as both decoders see it: labels, timestamp, line, metadata.
type Seen = (String, i64, String, Vec<(String, String)>);

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let agent = (flags & 1 == 1).then_some("spiffe://example.org/ztail");
    let streams: Vec<Arc<Stream>> = (0..3)
        .map(|i| {
            let labels = BTreeMap::from([("job".to_owned(), format!("s{i}\"\\"))]);
            Arc::new(Stream::new(&LabelSet::new(labels)))
        })
        .collect();
    let names: Arc<[String]> = vec!["level".to_owned(), "trace_id".to_owned()].into();
    let cursor = Arc::new(Cursor::new(Position::default()));
    let mut batch = Batch::new();
    let mut expected: Vec<Vec<Seen>> = vec![Vec::new(); 3];
    let mut order: Vec<usize> = Vec::new();
    // Consecutive records of one stream share a chunk (up to three entries), each text at a
    // non-zero offset of the shared data, as the tailer builds them.
    let mut open: Option<(usize, Vec<u8>, Vec<Entry>, Vec<Meta>)> = None;
    let flush = |open: &mut Option<(usize, Vec<u8>, Vec<Entry>, Vec<Meta>)>, batch: &mut Batch| {
        if let Some((s, bytes, entries, meta)) = open.take() {
            batch.push(Chunk {
                stream: streams[s].clone(),
                cursor: cursor.clone(),
                data: bytes::Bytes::from(bytes),
                entries,
                meta: meta.into(),
                meta_names: names.clone(),
                end: Position::default(),
                caught_up: false,
            });
        }
    };
    for (i, record) in data.split(|&b| b == 0xff).enumerate() {
        let (head, rest) = record.split_at(record.len().min(9));
        let s = head.first().map_or(0, |b| *b as usize % 3);
        let ts = head
            .get(1..9)
            .map_or(i as i64, |b| i64::from_le_bytes(b.try_into().unwrap()));
        let text = String::from_utf8_lossy(rest).into_owned();
        let meta_value = format!("v{i}");
        let with_meta = head.first().is_some_and(|b| b & 8 != 0);
        if open.as_ref().is_some_and(|o| o.0 != s || o.2.len() == 3) {
            flush(&mut open, &mut batch);
        }
        let (_, bytes, entries, meta) =
            open.get_or_insert_with(|| (s, Vec::new(), Vec::new(), Vec::new()));
        bytes.push(b'#');
        let start = bytes.len();
        bytes.extend_from_slice(text.as_bytes());
        let end = bytes.len();
        let meta_start = meta.len();
        if with_meta {
            let at = bytes.len();
            bytes.extend_from_slice(meta_value.as_bytes());
            meta.push(Meta {
                name: (i % 2) as u8,
                start: at as u32,
                end: bytes.len() as u32,
            });
        }
        entries.push(Entry {
            start: start as u32,
            end: end as u32,
            ts,
            meta_start: meta_start as u32,
            meta_len: with_meta as u16,
            sub: 0,
        });
        let mut seen_meta = Vec::new();
        if with_meta {
            seen_meta.push((names[i % 2].clone(), meta_value));
        }
        if let Some(a) = agent {
            seen_meta.push((encode::AGENT_ID.to_owned(), a.to_owned()));
        }
        expected[s].push((streams[s].labels.clone(), ts, text, seen_meta));
        if !order.contains(&s) {
            order.push(s);
        }
    }
    flush(&mut open, &mut batch);
    let want: Vec<Seen> = order.iter().flat_map(|&s| expected[s].clone()).collect();

    let raw = encode::protobuf_uncompressed(&batch, agent);
    let push = PushRequest::decode(raw.as_slice()).expect("protobuf decodes");
    let got: Vec<Seen> = push
        .streams
        .iter()
        .flat_map(|s| {
            s.entries.iter().map(|e| {
                let ts = e.timestamp.clone().unwrap_or_default();
                assert!(
                    (0..1_000_000_000).contains(&ts.nanos),
                    "nanos out of range: {ts:?}"
                );
                (
                    s.labels.clone(),
                    ts.seconds
                        .wrapping_mul(1_000_000_000)
                        .wrapping_add(ts.nanos as i64),
                    String::from_utf8(e.line.clone()).unwrap(),
                    e.structured_metadata
                        .iter()
                        .map(|p| (p.name.clone(), p.value.clone()))
                        .collect(),
                )
            })
        })
        .collect();
    assert_eq!(got, want, "protobuf");
    assert!(
        push.streams.iter().all(|s| !s.entries.is_empty()),
        "no empty stream"
    );
    let compressed = encode::protobuf(&batch, agent);
    let decompressed = snap::raw::Decoder::new()
        .decompress_vec(&compressed)
        .unwrap();
    assert_eq!(decompressed, raw, "snappy block");
    let stored = encode::protobuf_stored(&batch, agent);
    let decoded = snap::raw::Decoder::new().decompress_vec(&stored).unwrap();
    assert_eq!(decoded, raw, "snappy block, stored");

    let json: serde_json::Value =
        serde_json::from_slice(&encode::json(&batch, agent)).expect("JSON parses");
    let mut got = Vec::new();
    for s in json["streams"].as_array().unwrap() {
        let pairs: BTreeMap<String, String> = s["stream"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let labels = LabelSet::new(pairs).render();
        for v in s["values"].as_array().unwrap() {
            let meta = v
                .get(2)
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            got.push((
                labels.clone(),
                v[0].as_str().unwrap().parse::<i64>().unwrap(),
                v[1].as_str().unwrap().to_owned(),
                meta,
            ));
        }
    }
    // JSON objects are maps: compare metadata order-independently.
    let sort = |v: Vec<Seen>| -> Vec<Seen> {
        v.into_iter()
            .map(|(l, t, x, mut m)| {
                m.sort();
                (l, t, x, m)
            })
            .collect()
    };
    assert_eq!(sort(got), sort(want), "json");
});
