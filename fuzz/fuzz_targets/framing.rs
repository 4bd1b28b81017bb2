//! The line splitter and framing (raw, CRI, Docker, multiline) over a real file read in small
//! pieces: no panic, every entry valid UTF-8 within its size limit, and the whole file consumed
//! once the last entry is flushed.
#![no_main]

use std::io::{Seek, Write};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ztail::tail::format::{Format, Framing, Multiline, StreamAs, TimestampRule};
use ztail::tail::reader::FileReader;
use ztail::tail::timestamp::TsFormat;

fn scratch() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        std::path::PathBuf::from(format!("{dir}/ztail-fuzz-framing-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    // Three parameter bytes, then the file's content.
    let [a, b, c, content @ ..] = data else {
        return;
    };
    let max_line = 16 + (*b as usize % 64);
    let mut framing = Framing::raw(max_line);
    framing.format = match a % 4 {
        0 | 3 => Format::Raw,
        1 => Format::Cri,
        _ => Format::Docker,
    };
    framing.stream_as = match (a >> 2) % 3 {
        0 => StreamAs::Label,
        1 => StreamAs::Metadata,
        _ => StreamAs::Drop,
    };
    let mut limit = max_line;
    if a & 16 != 0 || a % 4 == 3 {
        let max_bytes = max_line * 3;
        framing.multiline = Some(Multiline {
            start: regex::bytes::Regex::new("^[A-Z]").unwrap(),
            max_lines: 1 + (*c as usize % 5),
            max_bytes,
            timeout: Duration::from_secs(1),
        });
        limit = max_bytes;
    }
    if a & 32 != 0 {
        framing.json_fields = vec!["level".into(), "trace_id".into()];
    }
    if a & 64 != 0 && framing.format == Format::Raw {
        framing.timestamp = Some(TimestampRule {
            regex: regex::bytes::Regex::new(r"^(\S+)").unwrap(),
            group: 1,
            format: TsFormat::Rfc3339,
            zone: 0,
        });
    }
    let raw = framing.format == Format::Raw;
    let buf = 1 + (*c as usize % 97);

    let path = scratch();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(content).unwrap();
    f.rewind().unwrap();
    let mut r = FileReader::new(f, 0, Arc::new(framing), buf).unwrap();
    let mut texts: Vec<String> = Vec::new();
    let mut check = |chunk: ztail::tail::reader::ReadLines| {
        for e in &chunk.entries {
            let text = &chunk.data[e.start as usize..e.end as usize];
            let text = std::str::from_utf8(text).expect("entry is not UTF-8");
            assert!(
                text.len() <= limit,
                "entry of {} bytes over {limit}",
                text.len()
            );
            texts.push(text.to_owned());
        }
        for m in &chunk.meta {
            assert!(std::str::from_utf8(&chunk.data[m.start as usize..m.end as usize]).is_ok());
        }
    };
    while let Some(chunk) = r.read_chunk().unwrap() {
        check(chunk);
    }
    if let Some(chunk) = r.flush_partial() {
        check(chunk);
    }
    assert_eq!(
        r.position().offset,
        content.len() as u64,
        "the file is consumed"
    );
    // Raw text that needs no repair or cutting comes out whole: however lines are grouped,
    // the entries joined by newlines are the file.
    if let Ok(text) = std::str::from_utf8(content) {
        let body = text.strip_suffix('\n').unwrap_or(text);
        if raw && !text.contains('\r') && body.split('\n').all(|l| l.len() <= max_line) {
            assert_eq!(texts.join("\n"), body, "entries lost, repeated or changed");
        }
    }
});
