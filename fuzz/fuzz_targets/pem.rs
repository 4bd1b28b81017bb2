//! The PEM loader of the files identity source: certificate chain, key and bundle from
//! arbitrary bytes give an identity or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Three inputs separated by NUL bytes.
    let mut parts = data.splitn(3, |&b| b == 0);
    let cert = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let bundle = parts.next().unwrap_or_default();
    if let Err(e) = ztail::identity::files::parse_material(cert, key, bundle) {
        // Errors describe, they never echo key material.
        let text = format!("{e:#}");
        assert!(!text.contains("PRIVATE KEY-----"), "{text}");
    }
});
