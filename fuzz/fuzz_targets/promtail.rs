//! `ztail convert promtail`: any text gives a ztail config that passes ztail's validation, or
//! an error naming the file, never a panic. The first byte chooses `--expand-env`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ztail::convert::promtail::{Options, convert};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let opts = Options {
        expand_env: flags & 1 == 1,
        ..Options::default()
    };
    let out = Path::new("/etc/ztail/ztail.toml");
    match convert("p.yaml", text, out, &opts) {
        Ok(c) => {
            if let Err(e) = ztail::config::Config::parse(out, &c.toml) {
                panic!("the converted config does not pass: {e}\n{}", c.toml);
            }
        }
        Err(e) => assert!(e.to_string().starts_with("p.yaml"), "{e}"),
    }
});
