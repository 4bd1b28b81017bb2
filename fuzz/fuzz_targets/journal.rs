//! The journal file reader over any bytes: every entry is read, positioned after or at the end
//! of, or refused with an error; nothing panics, loops or allocates beyond the file's size.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use ztail::journal::file::{Entry, JournalFile};

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    let wanted = ["_SYSTEMD_UNIT".to_owned(), "PRIORITY".to_owned()];
    let Ok(mut j) = JournalFile::open(f.path(), &wanted) else {
        return;
    };
    let mut e = Entry::default();
    let mut seen = 0u64;
    loop {
        match j.next(&mut e) {
            Ok(true) => seen += 1,
            Ok(false) => break,
            Err(ztail::journal::file::Error::BadEntry(..)) => seen += 1,
            Err(_) => break,
        }
        assert!(
            seen <= j.header.n_entries,
            "more entries than the header counts"
        );
    }
    if let Ok(mut j) = JournalFile::open(f.path(), &wanted) {
        let _ = j.seek_after(seen / 2);
        let _ = j.next(&mut e);
        let _ = j.last(&mut e);
    }
});
