//! Checks that `support::pki` issues certificates in SPIRE's X509-SVID profile, as x509-parser and
//! rustls' webpki verifiers (ring provider) see them.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::pki::*;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

const DAY: i64 = 24 * 3600;

fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der)
        .expect("certificate parses")
        .1
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

fn uris<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    cert.subject_alternative_name()
        .expect("SAN extension parses")
        .expect("SAN extension present")
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect()
}

fn roots(ca: &Ca) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der.clone()))
        .expect("CA is a usable trust anchor");
    Arc::new(roots)
}

/// Verifies `leaf` as a TLS server (for `localhost`) and as a TLS client, against `ca`.
fn verify_both_ways(
    ca: &Ca,
    leaf: &Leaf,
) -> (Result<(), rustls::Error>, Result<(), rustls::Error>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ee = CertificateDer::from(leaf.cert_der.clone());
    let server = WebPkiServerVerifier::builder_with_provider(roots(ca), provider.clone())
        .build()
        .expect("server verifier builds")
        .verify_server_cert(
            &ee,
            &[],
            &ServerName::try_from("localhost").expect("valid name"),
            &[],
            UnixTime::now(),
        )
        .map(|_| ());
    let client = WebPkiClientVerifier::builder_with_provider(roots(ca), provider)
        .build()
        .expect("client verifier builds")
        .verify_client_cert(&ee, &[], UnixTime::now())
        .map(|_| ());
    (server, client)
}

#[test]
fn ca_has_the_spire_ca_profile() {
    let ca = Ca::new("example.org");
    assert_eq!(ca.trust_domain, "example.org");
    assert_eq!(
        CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("CA PEM parses"),
        CertificateDer::from(ca.cert_der.clone())
    );
    let cert = parse(&ca.cert_der);
    assert_eq!(cert.subject(), cert.issuer(), "self-signed");

    let bc = cert.basic_constraints().unwrap().expect("basicConstraints");
    assert!(bc.critical);
    assert!(bc.value.ca);

    let ku = cert.key_usage().unwrap().expect("keyUsage");
    assert!(ku.critical);
    assert!(ku.value.key_cert_sign());
    assert!(ku.value.crl_sign());
    assert!(!ku.value.digital_signature());

    assert_eq!(uris(&cert), ["spiffe://example.org"]);

    let validity = cert.validity();
    assert!(validity.not_before.timestamp() < now() - DAY);
    assert!(validity.not_after.timestamp() > now() + 7 * DAY);
}

#[test]
fn leaf_has_the_x509_svid_profile() {
    let ca = Ca::new("example.org");
    let leaf = ca.issue("spiffe://example.org/ztail");
    assert_eq!(leaf.spiffe_id, "spiffe://example.org/ztail");
    let cert = parse(&leaf.cert_der);
    assert_eq!(cert.issuer(), parse(&ca.cert_der).subject());

    let bc = cert.basic_constraints().unwrap().expect("basicConstraints");
    assert!(bc.critical);
    assert!(!bc.value.ca);

    let ku = cert.key_usage().unwrap().expect("keyUsage");
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    assert!(!ku.value.crl_sign());

    let eku = cert
        .extended_key_usage()
        .unwrap()
        .expect("extendedKeyUsage");
    assert!(eku.value.server_auth);
    assert!(eku.value.client_auth);

    assert_eq!(uris(&cert), ["spiffe://example.org/ztail"]);
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(names.contains(&GeneralName::DNSName("localhost")));
    assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));

    // Valid from 1 hour ago for 1 day (allow a minute of slack for slow machines).
    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    assert!((not_before - (now() - 3600)).abs() < 60, "{not_before}");
    assert_eq!(validity.not_after.timestamp() - not_before, DAY);

    // ECDSA P-256 (id-ecPublicKey with the prime256v1 curve).
    let spki = &cert.public_key().algorithm;
    assert_eq!(spki.algorithm.to_id_string(), "1.2.840.10045.2.1");
    let curve = spki
        .parameters
        .as_ref()
        .expect("EC parameters")
        .as_oid()
        .expect("named curve");
    assert_eq!(curve.to_id_string(), "1.2.840.10045.3.1.7");
}

#[test]
fn serial_hex_is_the_der_serial_in_lowercase_hex() {
    let ca = Ca::new("example.org");
    let a = ca.issue("spiffe://example.org/a");
    let b = ca.issue("spiffe://example.org/a");
    let cert = parse(&a.cert_der);
    assert_eq!(a.serial_hex, cert.raw_serial_as_string().replace(':', ""));
    assert_eq!(a.serial_hex.len(), 32);
    assert!(
        a.serial_hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    );
    assert_ne!(a.serial_hex, b.serial_hex, "serials are random");
    assert_eq!(serial_hex_of(&a.cert_der), a.serial_hex);
}

#[test]
fn key_is_pkcs8_and_matches_pem() {
    let leaf = Ca::new("example.org").issue("spiffe://example.org/ztail");
    assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let key = PrivatePkcs8KeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key PEM parses");
    assert_eq!(key.secret_pkcs8_der(), leaf.key_der.as_slice());
    assert_eq!(
        CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("cert PEM parses"),
        CertificateDer::from(leaf.cert_der.clone())
    );
    // The key signs for the certificate: rustls accepts the pair.
    rustls::crypto::ring::sign::any_ecdsa_type(&key.into()).expect("ring loads the P-256 key");
    assert!(
        !format!("{leaf:?}").contains("PRIVATE"),
        "Debug hides the key"
    );
}

#[test]
fn webpki_accepts_a_leaf_as_server_and_client() {
    let ca = Ca::new("example.org");
    let (server, client) = verify_both_ways(&ca, &ca.issue("spiffe://example.org/loki"));
    server.expect("valid as a server for localhost");
    client.expect("valid as a client");
}

#[test]
fn expired_leaf_is_expired() {
    let ca = Ca::new("example.org");
    let leaf = ca.issue_expired("spiffe://example.org/ztail");
    let validity = parse(&leaf.cert_der).validity().clone();
    assert!((validity.not_before.timestamp() - (now() - 2 * DAY)).abs() < 60);
    assert!((validity.not_after.timestamp() - (now() - DAY)).abs() < 60);
    let (server, client) = verify_both_ways(&ca, &leaf);
    assert!(server.is_err() && client.is_err(), "{server:?} {client:?}");
}

#[test]
fn ca_flagged_leaf_is_refused_as_an_end_entity() {
    let ca = Ca::new("example.org");
    let leaf = ca.issue_ca_flagged("spiffe://example.org/ztail");
    let cert = parse(&leaf.cert_der);
    assert!(cert.is_ca());
    assert_eq!(uris(&cert), ["spiffe://example.org/ztail"]);
    let (server, client) = verify_both_ways(&ca, &leaf);
    assert!(server.is_err() && client.is_err(), "{server:?} {client:?}");
}

#[test]
fn leaf_of_another_ca_is_refused() {
    let ca = Ca::new("example.org");
    let other = Ca::new("example.org");
    let (server, client) = verify_both_ways(&ca, &other.issue("spiffe://example.org/loki"));
    assert!(server.is_err() && client.is_err(), "{server:?} {client:?}");
}

#[test]
fn write_puts_pem_files_with_private_key_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("example.org");
    let leaf = ca.issue("spiffe://example.org/ztail");

    let (cert_path, key_path) = leaf.write(dir.path(), "ztail");
    assert_eq!(cert_path, dir.path().join("ztail.crt"));
    assert_eq!(key_path, dir.path().join("ztail.key"));
    assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), leaf.cert_pem);
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), leaf.key_pem);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&cert_path), 0o644);

    // Overwriting works and leaves no temporary files behind.
    let again = ca.issue("spiffe://example.org/ztail");
    again.write(dir.path(), "ztail");
    assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), again.cert_pem);

    let bundle = ca.write_bundle(dir.path(), "bundle");
    assert_eq!(bundle, dir.path().join("bundle.crt"));
    assert_eq!(std::fs::read_to_string(&bundle).unwrap(), ca.cert_pem);

    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bundle.crt", "ztail.crt", "ztail.key"]);
}
