//! The checkpoint line reader: any line parses or is rejected, every entry ztail can write
//! round-trips, and one it cannot (a field out of bounds) is rejected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztail::tail::checkpoint::{Entry, format_line, parse_line};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let _ = parse_line(line);
    }
    if data.len() < 56 {
        return;
    }
    let n = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap());
    let entry = Entry {
        dev: n(0),
        ino: n(1),
        path: String::from_utf8_lossy(&data[56..]).into_owned().into(),
        head_len: n(2) as u32,
        head_hash: n(3),
        offset: n(4),
        tail_len: n(5) as u32,
        tail_hash: n(6),
    };
    let line = format_line(&entry);
    assert!(!line.contains('\n'), "one entry, one line: {line:?}");
    if !entry.is_bounded() {
        assert_eq!(
            parse_line(&line),
            None,
            "an entry out of bounds was accepted"
        );
        return;
    }
    assert_eq!(parse_line(&line), Some(entry.clone()));
    // A flipped bit is detected: the line is rejected or still means the same entry (e.g. a
    // hex digit changed case); it never yields a different position.
    let mut damaged = line.into_bytes();
    let at = data[0] as usize % damaged.len();
    damaged[at] ^= 1 << (data[1] % 7);
    if let Ok(d) = String::from_utf8(damaged)
        && let Some(parsed) = parse_line(&d)
    {
        assert_eq!(parsed, entry, "a damaged line read as another entry: {d:?}");
    }
});
