//! The config parser and validator: any text gives a config or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(e) =
            ztail::config::Config::parse(std::path::Path::new("/etc/ztail/f.toml"), text)
    {
        // Every error names the file.
        assert!(e.to_string().starts_with("/etc/ztail/f.toml"), "{e}");
    }
});
