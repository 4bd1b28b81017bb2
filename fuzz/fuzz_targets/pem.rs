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
        // Errors describe, they never echo key material: no run of 16 base64 characters of
        // the key file (a piece of a PEM body) appears in them. (The fixed messages have no
        // such run: their words are short and separated.)
        let text = format!("{e:#}");
        let base64 = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
        for window in key.windows(16).filter(|w| w.iter().all(base64)) {
            let window = std::str::from_utf8(window).unwrap();
            assert!(
                !text.contains(window),
                "key text {window:?} in an error: {text}"
            );
        }
    }
});
