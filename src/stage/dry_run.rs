//! `ztail try`: sample lines through a source's framing and stages, and what each entry becomes
//! (line, labels, metadata, tenant) or why it was dropped. Nothing is kept, no identity is
//! loaded, nothing is sent: the input goes through the same reader, framer and [`Runner`] as
//! a tailed file's, into memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::Runner;
use crate::metrics::Metrics;
use crate::pipeline::{Meta, Streams};
use crate::tail::config::SourceConfig;
use crate::tail::reader::{FileReader, ReadLines};

/// What one entry became.
#[derive(Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Tried {
    Shipped {
        line: String,
        labels: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        metadata: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        /// Unix nanoseconds from the entry itself; absent when it would get the read time.
        #[serde(skip_serializing_if = "Option::is_none")]
        timestamp: Option<i64>,
    },
    Dropped {
        line: String,
        dropped: String,
    },
}

/// Frames `input` as if it were the file `path` of `src` and runs its stages.
pub fn dry_run(src: &SourceConfig, path: &Path, input: &[u8]) -> std::io::Result<Vec<Tried>> {
    let file = anonymous_file(input)?;
    let mut reader = FileReader::new(file, 0, src.framing.clone(), 1 << 20)?;
    let streams = Streams::default();
    let bases: Vec<_> = crate::tail::label_sets(src, path)
        .iter()
        .map(|set| streams.get(set, None))
        .collect();
    let metrics = Metrics::new();
    let framing_meta = src.framing.meta_names().len();
    let names = src.meta_names();
    let mut runner = src.stages.clone().map(|p| {
        let mut r = Runner::new(p, &bases, &streams, framing_meta, &src.name, &metrics);
        r.trace = Some(Vec::new());
        r
    });
    let mut out = Vec::new();
    let mut lines = Vec::new();
    while let Some(read) = reader.read_chunk()? {
        lines.push(read);
    }
    lines.extend(reader.flush_partial());
    for read in lines {
        tried(read, &mut runner, &bases, &streams, &names, &mut out);
    }
    Ok(out)
}

fn tried(
    read: ReadLines,
    runner: &mut Option<Runner>,
    bases: &[Arc<crate::pipeline::Stream>],
    streams: &Streams,
    names: &[String],
    out: &mut Vec<Tried>,
) {
    let ReadLines {
        mut data,
        mut entries,
        mut meta,
        ..
    } = read;
    let text = |data: &[u8], start: u32, end: u32| {
        String::from_utf8_lossy(&data[start as usize..end as usize]).into_owned()
    };
    let originals: Vec<String> = entries
        .iter()
        .map(|e| text(&data, e.start, e.end))
        .collect();
    let (routes, dropped) = match runner {
        Some(r) => {
            r.apply(
                &mut data,
                &mut entries,
                &mut meta,
                streams,
                crate::pipeline::unix_nanos(),
            );
            let dropped = r.trace.clone().unwrap_or_default();
            (r.routes().to_vec(), dropped)
        }
        None => (bases.to_vec(), Vec::new()),
    };
    // Entries kept, in order, interleaved with those dropped at their original places.
    let mut kept = entries.iter();
    let mut dropped = dropped.into_iter().peekable();
    for (i, original) in originals.into_iter().enumerate() {
        if dropped.peek().is_some_and(|(j, _)| *j == i) {
            let (_, reason) = dropped.next().unwrap_or_default();
            out.push(Tried::Dropped {
                line: original,
                dropped: reason,
            });
            continue;
        }
        let Some(e) = kept.next() else { break };
        let stream = &routes[e.sub as usize];
        let metadata = meta[e.meta_start as usize..][..e.meta_len as usize]
            .iter()
            .map(|m: &Meta| (names[m.name as usize].clone(), text(&data, m.start, m.end)))
            .collect();
        out.push(Tried::Shipped {
            line: text(&data, e.start, e.end),
            labels: stream.label_pairs.iter().cloned().collect(),
            metadata,
            tenant: stream.tenant.as_deref().map(str::to_owned),
            timestamp: (e.ts != 0).then_some(e.ts),
        });
    }
}

/// The input in an unnamed temporary file (`O_TMPFILE`: it has no name and disappears when
/// closed), so that it is read by the file reader itself.
fn anonymous_file(input: &[u8]) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(&dir)?;
    f.write_all(input)?;
    f.rewind()?;
    Ok(f)
}

/// Reads all of `r` (stdin, a file).
pub fn read_input(mut r: impl Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)?;
    Ok(buf)
}
