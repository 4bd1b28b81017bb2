//! Writes a throwaway development PKI for the `files` identity source and the local demo.
//!
//! `cargo run --example certs-dev [-- OUT_DIR]` (default: `certs-dev/` in the repository) writes a
//! trust bundle for `example.org` and three SVIDs (see `certs-dev/README.md`). Every run makes a
//! new CA and new keys, overwriting the previous files. Nothing it writes may be committed: the
//! directory's `.gitignore` excludes `*.key`, `*.crt` and `*.pem`.

#[path = "../tests/support/pki.rs"]
mod pki;

use std::path::PathBuf;
use std::process::ExitCode;

const TRUST_DOMAIN: &str = "example.org";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let out_dir = match (args.next(), args.next()) {
        (None, _) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs-dev"),
        (Some(dir), None) if dir != "-h" && dir != "--help" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: cargo run --example certs-dev [-- OUT_DIR]");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        eprintln!("certs-dev: cannot create {}: {e}", out_dir.display());
        return ExitCode::FAILURE;
    }

    let ca = pki::Ca::new(TRUST_DOMAIN);
    let bundle = ca.write_bundle(&out_dir, "ca");
    println!(
        "{}  trust bundle: CA for spiffe://{TRUST_DOMAIN}",
        bundle.display()
    );

    for (stem, id, role) in [
        ("ztail", "spiffe://example.org/ztail", "ztail's client SVID"),
        (
            "loki",
            "spiffe://example.org/loki",
            "the Loki side's server SVID",
        ),
        (
            "loki-wrong",
            "spiffe://example.org/loki-evil",
            "a server SVID the default peer policy must refuse",
        ),
    ] {
        let leaf = ca.issue(id);
        let (cert, key) = leaf.write(&out_dir, stem);
        println!(
            "{}  {role}: {id} (serial {})",
            cert.display(),
            leaf.serial_hex
        );
        println!("{}  its private key (mode 0600)", key.display());
    }
    println!("all certificates expire in about 23 hours; run this again for fresh ones");
    ExitCode::SUCCESS
}
