//! Model-based tests of reading and framing: random CRI and multiline files, written in random
//! pieces (cut anywhere, mid-record included), read with random crashes that resume from a
//! random acknowledged position. Whatever the interleaving, every entry must arrive whole
//! (never a fragment), each stream in order, and duplicates only after a crash.
//!
//! `ZTAIL_MODEL_CASES=10000 cargo test --lib model` runs the long mode; each case prints its
//! seed on failure, and `ZTAIL_MODEL_SEED=<n>` replays one.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use regex::bytes::Regex;

use super::format::{Format, Framing, Multiline};
use super::reader::FileReader;
use crate::pipeline::Position;

/// One expected entry: its stream key and text.
type Expected = (u16, String);

/// A CRI file: entries of 1–4 records (P… F), two streams interleaved record by record.
fn cri_file(rng: &mut fastrand::Rng) -> (Vec<u8>, Vec<Expected>) {
    let n = rng.usize(1..40);
    let mut pending: [Vec<Vec<String>>; 2] = Default::default();
    let mut expected = Vec::new();
    for i in 0..n {
        let key = rng.u16(0..2);
        let parts = rng.usize(1..5);
        let pieces: Vec<String> = (0..parts)
            .map(|p| format!("e{i}p{p}{}", "x".repeat(rng.usize(0..30))))
            .collect();
        expected.push((key, pieces.concat()));
        pending[key as usize].push(pieces);
    }
    // Interleave the records of the two streams, each stream's in order.
    let mut queues: [std::collections::VecDeque<(bool, String)>; 2] = Default::default();
    for (k, entries) in pending.iter().enumerate() {
        for pieces in entries {
            for (p, piece) in pieces.iter().enumerate() {
                queues[k].push_back((p + 1 == pieces.len(), piece.clone()));
            }
        }
    }
    let mut out = Vec::new();
    let mut ns = 1_795_662_900_000_000_000i64;
    while !queues[0].is_empty() || !queues[1].is_empty() {
        let k = match (queues[0].is_empty(), queues[1].is_empty()) {
            (false, false) => rng.usize(0..2),
            (false, true) => 0,
            _ => 1,
        };
        let (last, piece) = queues[k].pop_front().unwrap();
        ns += 1_000_000;
        let ts = format!(
            "2026-11-26T03:15:{:02}.{:09}Z",
            (ns / 1_000_000_000) % 60,
            ns % 1_000_000_000
        );
        let stream = ["stdout", "stderr"][k];
        let tag = if last { "F" } else { "P" };
        out.extend_from_slice(format!("{ts} {stream} {tag} {piece}\n").as_bytes());
    }
    (out, expected)
}

/// A raw multiline file: groups of a START line and 0–5 continuation lines.
fn multiline_file(rng: &mut fastrand::Rng) -> (Vec<u8>, Vec<Expected>) {
    let n = rng.usize(1..40);
    let mut out = Vec::new();
    let mut expected = Vec::new();
    for i in 0..n {
        let mut lines = vec![format!("START {i}")];
        for c in 0..rng.usize(0..6) {
            lines.push(format!("  at {i}.{c}{}", "y".repeat(rng.usize(0..20))));
        }
        let text = lines.join("\n");
        out.extend_from_slice(text.as_bytes());
        out.push(b'\n');
        expected.push((0, text));
    }
    (out, expected)
}

fn framing(format: Format) -> Arc<Framing> {
    let mut f = Framing::raw(1 << 20);
    f.format = format;
    if format == Format::Raw {
        f.multiline = Some(Multiline {
            start: Regex::new("^START").unwrap(),
            max_lines: 1000,
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(1),
        });
    }
    Arc::new(f)
}

/// Runs one case; returns the number of crashes it went through.
fn run_case(seed: u64, format: Format) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (content, expected) = match format {
        Format::Cri => cri_file(&mut rng),
        _ => multiline_file(&mut rng),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.log");
    let mut writer = std::fs::File::create(&path).unwrap();
    let framing = framing(format);
    let open = |at: u64| {
        let f = std::fs::File::open(&path).unwrap();
        FileReader::new(f, at, framing.clone(), 1 + rng_buf(seed)).unwrap()
    };
    let mut reader = open(0);
    // Positions handed out, oldest first; acknowledging pops a prefix into `committed`.
    let mut sent: Vec<Position> = Vec::new();
    let mut committed = reader.position();
    let mut got: Vec<Expected> = Vec::new();
    let mut written = 0;
    let mut crashes = 0;
    let mut steps = 0;
    while written < content.len() || steps < 20 {
        steps += 1;
        match rng.u8(0..10) {
            // Write a piece of the file (cut anywhere).
            0..=3 if written < content.len() => {
                let n = rng.usize(1..=(content.len() - written).min(200));
                writer.write_all(&content[written..written + n]).unwrap();
                written += n;
            }
            // Read what is there.
            0..=6 => {
                while let Some(chunk) = reader.read_chunk().unwrap() {
                    collect(&chunk, &mut got);
                    sent.push(chunk.end);
                }
            }
            // Acknowledge a prefix of what was sent.
            7 | 8 => {
                let k = rng.usize(0..=sent.len());
                if k > 0 {
                    committed = sent[k - 1];
                    sent.drain(..k);
                }
            }
            // Crash: resume from the committed position.
            _ => {
                crashes += 1;
                sent.clear();
                reader = open(committed.offset);
                assert_eq!(
                    reader.position(),
                    committed,
                    "seed {seed}: the resumed position"
                );
            }
        }
    }
    // Everything is written: read to the end, then the timeout completes the last entry.
    while let Some(chunk) = reader.read_chunk().unwrap() {
        collect(&chunk, &mut got);
    }
    if let Some(chunk) = reader.flush_partial() {
        collect(&chunk, &mut got);
    }
    assert_eq!(
        reader.position().offset,
        content.len() as u64,
        "seed {seed}: read to the end"
    );
    check(seed, &expected, &got, crashes);
    crashes
}

fn rng_buf(seed: u64) -> usize {
    fastrand::Rng::with_seed(seed ^ 0x5eed).usize(0..300)
}

fn collect(chunk: &super::reader::ReadLines, got: &mut Vec<Expected>) {
    for e in &chunk.entries {
        let text = std::str::from_utf8(&chunk.data[e.start as usize..e.end as usize]).unwrap();
        got.push((e.sub, text.to_owned()));
    }
}

fn check(seed: u64, expected: &[Expected], got: &[Expected], crashes: usize) {
    let want: HashSet<&Expected> = expected.iter().collect();
    for g in got {
        assert!(
            want.contains(g),
            "seed {seed}: a fragment or unknown entry {g:?}"
        );
    }
    let seen: HashSet<&Expected> = got.iter().collect();
    for w in expected {
        assert!(seen.contains(w), "seed {seed}: {w:?} never arrived");
    }
    if crashes == 0 {
        assert_eq!(
            got.len(),
            expected.len(),
            "seed {seed}: duplicates without a crash"
        );
    }
    // Each stream in order: first arrivals follow the written order.
    for key in 0..2u16 {
        let mut first = Vec::new();
        let mut dedup = HashSet::new();
        for g in got.iter().filter(|g| g.0 == key) {
            if dedup.insert(g) {
                first.push(g);
            }
        }
        let order: Vec<&Expected> = expected.iter().filter(|e| e.0 == key).collect();
        assert_eq!(first, order, "seed {seed}: stream {key} out of order");
    }
}

fn cases() -> u64 {
    std::env::var("ZTAIL_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn seeds() -> Vec<u64> {
    match std::env::var("ZTAIL_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => vec![seed],
        None => (0..cases()).collect(),
    }
}

#[test]
fn model_cri_partials_survive_random_writes_reads_and_crashes() {
    let crashes: usize = seeds().into_iter().map(|s| run_case(s, Format::Cri)).sum();
    assert!(crashes > 0, "the generator must exercise crashes");
}

#[test]
fn model_multiline_groups_survive_random_writes_reads_and_crashes() {
    let crashes: usize = seeds().into_iter().map(|s| run_case(s, Format::Raw)).sum();
    assert!(crashes > 0, "the generator must exercise crashes");
}
