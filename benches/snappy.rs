//! Snappy implementations on ztail's own push request bodies: MB/s per core, output size, and
//! that every output decodes (with `snap`'s decoder, the one the receiver and the fuzz targets
//! use) to the exact body.
//!
//!   cargo bench --bench snappy -- [MB]
//!
//! The bodies are built by ztail's encoder (`protobuf_uncompressed`) from the mixed corpus of
//! the throughput harness, in requests of the default `batch_bytes` (1 MiB) with read-sized
//! chunks of 1,000 lines and timestamps one nanosecond apart, as the tailer stamps them. Every
//! implementation compresses the same bodies one 64 KiB block at a time (snappy's own block
//! size, which is how `encode::protobuf` feeds it), single-threaded, so MB/s over the wall is
//! MB/s per core. Rounds alternate the implementations so that a drift of the machine hits all
//! of them; the median round is printed. Rows:
//!
//! - `snap`: the `snap` crate, ztail's compressor.
//! - `snappy C++`: Google's snappy, built from source by the `snappy_src` crate. Its build
//!   script passes no `config.h`; `.cargo/config.toml` sets the macros snappy's CMake build
//!   defines (`NDEBUG`, `HAVE_BUILTIN_CTZ`, ...), without which it runs its portable fallbacks
//!   and asserts at about 0.6x its speed. No `-march`, as a distributable binary is built.
//! - `ztail encode::protobuf`: what ztail does per request, building the body and compressing
//!   it block by block (so its MB/s includes the protobuf writing).
//! - `ztail, compression = none`: `encode::protobuf_stored`, the body in snappy's format with
//!   nothing compressed: the cost of writing the protobuf alone.
//! - `snap, raw corpus`: `snap` on the corpus file itself (lines and newlines), for how much the
//!   protobuf framing changes the compressor's speed.

#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ztail::loki::encode::{protobuf, protobuf_stored, protobuf_uncompressed};
use ztail::loki::labels::LabelSet;
use ztail::pipeline::{Batch, Chunk, Cursor, Entry, Position, Stream};

const BLOCK: usize = 1 << 16;

fn main() {
    let mb: usize = common::args()
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 2 } else { 256 });
    let rounds = if cfg!(debug_assertions) { 1 } else { 5 };
    let (batches, raw) = corpus(mb);
    let bodies: Vec<Vec<u8>> = batches
        .iter()
        .map(|b| protobuf_uncompressed(b, None))
        .collect();
    let body_bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "snappy, {} MB of corpus in {} requests ({:.1} MB of protobuf bodies), 64 KiB blocks, {rounds} rounds, {}",
        raw.len() / 1_000_000,
        bodies.len(),
        body_bytes as f64 / 1e6,
        common::profile()
    );

    let mut cases: Vec<Case> = vec![
        Case::new("snap", |b, out| {
            let mut enc = snap::raw::Encoder::new();
            blocks(b, out, |piece, dst| enc.compress(piece, dst).unwrap())
        }),
        Case::new("snappy C++ (snappy_src)", |b, out| {
            blocks(b, out, |piece, dst| {
                let mut len = dst.len();
                // SAFETY: `piece` and `dst` are live slices of the lengths passed with them;
                // snappy_compress reads `piece.len()` bytes from the first, writes at most
                // `len` bytes to the second and stores how many in `len`. `dst` has
                // max_compress_len(piece.len()) bytes, what the C API asks for.
                let status = unsafe {
                    snappy_src::snappy_compress(
                        piece.as_ptr().cast(),
                        piece.len(),
                        dst.as_mut_ptr().cast(),
                        &mut len,
                    )
                };
                assert_eq!(status, 0, "snappy_compress failed");
                len
            })
        }),
    ];
    let mut whole = Vec::new();
    let mut stored = Vec::new();
    let mut raw_secs = Vec::new();
    for _ in 0..rounds {
        for case in &mut cases {
            case.run(&bodies);
        }
        whole.push(encode_all(&batches, protobuf));
        stored.push(encode_all(&batches, protobuf_stored));
        let mut enc = snap::raw::Encoder::new();
        let mut dst = vec![0; snap::raw::max_compress_len(BLOCK)];
        let start = Instant::now();
        let mut n = 0;
        for piece in raw.chunks(BLOCK) {
            n += enc.compress(piece, &mut dst).unwrap();
        }
        raw_secs.push((start.elapsed().as_secs_f64(), n));
    }

    let base = median(&cases[0].secs);
    println!(
        "  {:<28} {:>9} {:>10} {:>12} {:>9}",
        "implementation", "MB/s", "s per GiB", "output/input", "vs snap"
    );
    for case in &cases {
        let secs = median(&case.secs);
        row(&case.name, secs, body_bytes, case.out_bytes, base / secs);
    }
    let (secs, out) = median_pair(&whole);
    row("ztail encode::protobuf", secs, body_bytes, out, base / secs);
    let (secs, out) = median_pair(&stored);
    row(
        "ztail, compression = none",
        secs,
        body_bytes,
        out,
        base / secs,
    );
    let (secs, out) = median_pair(&raw_secs);
    let per_byte = secs / raw.len() as f64 / (base / body_bytes as f64);
    row("snap, raw corpus", secs, raw.len(), out, 1.0 / per_byte);
    let mut dec = snap::raw::Decoder::new();
    for (b, body) in batches.iter().zip(&bodies) {
        assert!(dec.decompress_vec(&protobuf(b, None)).unwrap() == *body);
        assert!(dec.decompress_vec(&protobuf_stored(b, None)).unwrap() == *body);
    }
    println!("  (every output above decoded with snap's decoder to the exact body)");
}

/// Seconds to encode every batch with ztail's `encode`, and the bytes it made.
fn encode_all(batches: &[Batch], encode: fn(&Batch, Option<&str>) -> Vec<u8>) -> (f64, usize) {
    let start = Instant::now();
    let n = batches
        .iter()
        .map(|b| std::hint::black_box(encode(b, None)).len())
        .sum();
    (start.elapsed().as_secs_f64(), n)
}

/// Appends the snappy block-format body of its first argument to the second.
type Compress = Box<dyn FnMut(&[u8], &mut Vec<u8>)>;

/// One implementation: its name, the compressor and its timings.
struct Case {
    name: String,
    compress: Compress,
    secs: Vec<f64>,
    out_bytes: usize,
}

impl Case {
    fn new(name: &str, compress: impl FnMut(&[u8], &mut Vec<u8>) + 'static) -> Case {
        Case {
            name: name.into(),
            compress: Box::new(compress),
            secs: Vec::new(),
            out_bytes: 0,
        }
    }

    /// Compresses every body (timed), then checks every output against its body (not timed).
    fn run(&mut self, bodies: &[Vec<u8>]) {
        let mut outs = Vec::with_capacity(bodies.len());
        let start = Instant::now();
        for b in bodies {
            let mut out = Vec::new();
            (self.compress)(b, &mut out);
            outs.push(out);
        }
        self.secs.push(start.elapsed().as_secs_f64());
        self.out_bytes = outs.iter().map(Vec::len).sum();
        let mut dec = snap::raw::Decoder::new();
        for (b, out) in bodies.iter().zip(&outs) {
            let back = dec
                .decompress_vec(out)
                .unwrap_or_else(|e| panic!("{}: its output does not decode: {e}", self.name));
            assert!(back == *b, "{}: decodes to other bytes", self.name);
        }
    }
}

/// A snappy block-format body of `body`: its length, then each 64 KiB block compressed by
/// `compress` (which writes the block's own length first, dropped here) into `out`.
fn blocks(body: &[u8], out: &mut Vec<u8>, mut compress: impl FnMut(&[u8], &mut [u8]) -> usize) {
    let mut dst = vec![0; snap::raw::max_compress_len(BLOCK)];
    put_varint(out, body.len() as u64);
    for piece in body.chunks(BLOCK) {
        let n = compress(piece, &mut dst);
        let prefix = varint_len(piece.len() as u64);
        out.extend_from_slice(&dst[prefix..n]);
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    let mut n = 1;
    let mut v = v >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

fn row(name: &str, secs: f64, input: usize, output: usize, vs: f64) {
    println!(
        "  {:<28} {:>9.1} {:>10.2} {:>12.3} {:>8.2}x",
        name,
        input as f64 / secs / 1e6,
        secs / input as f64 * (1u64 << 30) as f64,
        output as f64 / input as f64,
        vs
    );
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_pair(v: &[(f64, usize)]) -> (f64, usize) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v[v.len() / 2]
}

/// The mixed corpus as request batches (1 MiB of lines each, chunks of 1,000 lines, one
/// stream) and as the file it would be.
fn corpus(mb: usize) -> (Vec<Batch>, Vec<u8>) {
    let labels = BTreeMap::from([
        ("job".to_owned(), "bench".to_owned()),
        (
            "filename".to_owned(),
            "/var/log/app/app-0000.log".to_owned(),
        ),
    ]);
    let stream = Arc::new(Stream::new(&LabelSet::new(labels)));
    let cursor = Arc::new(Cursor::new(Position::default()));
    let mut rng = fastrand::Rng::with_seed(7);
    let mut raw = Vec::with_capacity(mb << 20);
    let (mut batches, mut batch, mut batch_bytes) = (Vec::new(), Batch::new(), 0);
    let mut ts = 1_764_136_800_000_000_000i64;
    let mut n = 0u64;
    while raw.len() < mb << 20 {
        let (mut data, mut entries) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            let l = common::corpus::line(&mut rng, n, false);
            n += 1;
            raw.extend_from_slice(l.as_bytes());
            raw.push(b'\n');
            let start = data.len();
            data.extend_from_slice(l.as_bytes());
            let mut e = Entry::text(start, data.len());
            e.ts = ts;
            ts += 1;
            entries.push(e);
        }
        batch_bytes += data.len();
        batch.push(Chunk {
            stream: stream.clone(),
            cursor: cursor.clone(),
            data: data.into(),
            entries,
            meta: Vec::new().into(),
            meta_names: Vec::new().into(),
            end: Position::default(),
            caught_up: false,
        });
        if batch_bytes >= 1 << 20 {
            batches.push(std::mem::replace(&mut batch, Batch::new()));
            batch_bytes = 0;
        }
    }
    if batch_bytes > 0 {
        batches.push(batch);
    }
    (batches, raw)
}
