//! A throwaway test and development PKI that issues certificates in SPIRE's X509-SVID profile.
//!
//! Owns: a per-trust-domain CA ([`Ca`]) and the leaves it signs ([`Leaf`]), with ECDSA P-256 keys,
//! plus writing them as PEM files (what `spire-agent api fetch x509 -write` and spiffe-helper
//! produce). Every certificate is made fresh in memory with `rcgen`; nothing here is ever meant to
//! be committed or to protect anything real.
//!
//! Profile (SPIFFE X509-SVID standard §4, as SPIRE issues it):
//! - CA: self-signed, BasicConstraints `cA=true` (critical), KeyUsage `keyCertSign`+`cRLSign`
//!   (critical), one URI SAN `spiffe://<trust domain>`, valid from 7 days ago for 37 days.
//! - Leaf: BasicConstraints `cA=false` (critical), KeyUsage `digitalSignature`+`keyEncipherment`
//!   (critical), EKU `serverAuth`+`clientAuth`, exactly one URI SAN (the SPIFFE ID) plus the DNS SAN
//!   `localhost` and the IP SAN `127.0.0.1` (so the same leaf can serve TLS on the loopback),
//!   a random 16-byte serial and an authority key identifier.
//!
//! Does not: build intermediate chains, validate SPIFFE IDs (negative tests need bad ones) or
//! touch any process-wide state. It depends only on crates (rcgen, x509-parser, fastrand, std), so
//! it can be included from integration tests (`mod support;`), from `src` unit tests and from
//! examples (`#[path = "../tests/support/pki.rs"] mod pki;`).
#![allow(dead_code)]

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// Now, as the `time::OffsetDateTime` that rcgen's validity fields want. `time` is not a direct
/// dependency, so the value comes from rcgen's `date_time_ymd` (which returns one) plus
/// `std::time::Duration` arithmetic, without naming the type.
macro_rules! now {
    () => {
        rcgen::date_time_ymd(1970, 1, 1) + since_epoch()
    };
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A certificate authority for one SPIFFE trust domain (the signing certificate of a bundle).
pub struct Ca {
    /// The trust domain name, e.g. `example.org` (no scheme).
    pub trust_domain: String,
    /// The self-signed CA certificate, PEM.
    pub cert_pem: String,
    /// The self-signed CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// The CA's subject, key identifier method, key usages and private key.
    issuer: Issuer<'static, KeyPair>,
}

/// An X509-SVID (or, for negative tests, something that looks like one) and its private key.
#[derive(Clone)]
pub struct Leaf {
    /// The SPIFFE ID in the certificate's only URI SAN.
    pub spiffe_id: String,
    /// The leaf certificate alone, PEM (no chain: the CA is self-signed and sits in the bundle).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The serial number as lowercase hex without separators: exactly the content bytes of the
    /// DER INTEGER (x509-parser's `raw_serial()`, i.e. `raw_serial_as_string()` without the
    /// colons). The serial is generated with a first byte in `0x01..=0x7f`, so it is always 32 hex
    /// digits with no sign-padding byte.
    pub serial_hex: String,
}

/// Which flavour of leaf [`Ca::sign`] makes.
#[derive(Clone, Copy)]
enum LeafKind {
    Svid,
    CaFlagged,
}

impl Ca {
    /// A new self-signed CA for `trust_domain` (e.g. `example.org`), with a fresh P-256 key.
    pub fn new(trust_domain: &str) -> Ca {
        // Valid from a week ago for 30 days more.
        Ca::with_validity(trust_domain, 7 * DAY, 37 * DAY)
    }

    /// A CA like [`Ca::new`] that expired a day ago (valid from 60 days ago for 59 days).
    pub fn new_expired(trust_domain: &str) -> Ca {
        Ca::with_validity(trust_domain, 60 * DAY, 59 * DAY)
    }

    fn with_validity(trust_domain: &str, starts_ago: Duration, lasts: Duration) -> Ca {
        let key = new_key();
        let mut params = Ca::params(trust_domain);
        params.not_before = now!() - starts_ago;
        params.not_after = params.not_before + lasts;
        let cert = params
            .self_signed(&key)
            .expect("pki: self-signing the test CA failed");
        Ca {
            trust_domain: trust_domain.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An intermediate CA of the same trust domain signed by this one, with keyUsage
    /// keyCertSign or (for negative tests) without it. Its leaves must be presented with the
    /// intermediate's certificate after them.
    pub fn intermediate(&self, key_cert_sign: bool) -> Ca {
        let key = new_key();
        let mut params = Ca::params(&self.trust_domain);
        if !key_cert_sign {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("pki: signing the intermediate CA failed");
        Ca {
            trust_domain: self.trust_domain.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    fn params(trust_domain: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CountryName, "US");
            dn.push(DnType::OrganizationName, "SPIFFE");
            dn.push(
                DnType::CommonName,
                format!("ztail test CA {trust_domain} {:08x}", fastrand::u32(..)),
            );
            dn
        };
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))];
        let now = now!();
        params.not_before = now - 7 * DAY;
        params.not_after = now + 30 * DAY;
        params
    }

    /// An X509-SVID for `spiffe_id`, valid from 1 hour ago for 1 day.
    pub fn issue(&self, spiffe_id: &str) -> Leaf {
        self.sign(spiffe_id, LeafKind::Svid, HOUR, DAY)
    }

    /// An X509-SVID for `spiffe_id` that has already expired: valid from 2 days ago until 1 day ago.
    pub fn issue_expired(&self, spiffe_id: &str) -> Leaf {
        self.sign(spiffe_id, LeafKind::Svid, 2 * DAY, DAY)
    }

    /// A short-lived X509-SVID: valid from 1 minute ago until `secs` seconds from now.
    pub fn issue_expiring_in(&self, spiffe_id: &str, secs: u64) -> Leaf {
        let minute = Duration::from_secs(60);
        self.sign(
            spiffe_id,
            LeafKind::Svid,
            minute,
            minute + Duration::from_secs(secs),
        )
    }

    /// A leaf that is not a valid SVID because it has the CA flag (`cA=true`) set; otherwise like
    /// [`Ca::issue`]. For negative tests: SPIFFE verifiers and webpki must refuse it as a peer.
    pub fn issue_ca_flagged(&self, spiffe_id: &str) -> Leaf {
        self.sign(spiffe_id, LeafKind::CaFlagged, HOUR, DAY)
    }

    /// Writes `<stem>.crt` holding the CA certificate PEM (a one-CA trust bundle) into `dir`;
    /// returns its path.
    pub fn write_bundle(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.crt"));
        write_atomically(&path, self.cert_pem.as_bytes(), 0o644);
        path
    }

    /// Signs a leaf valid from `starts_ago` before now for `lasts`.
    fn sign(&self, spiffe_id: &str, kind: LeafKind, starts_ago: Duration, lasts: Duration) -> Leaf {
        let key = new_key();
        let mut params = CertificateParams::default();
        params.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CountryName, "US");
            dn.push(DnType::OrganizationName, "SPIRE");
            dn
        };
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.is_ca = match kind {
            LeafKind::Svid => IsCa::ExplicitNoCa,
            LeafKind::CaFlagged => IsCa::Ca(BasicConstraints::Unconstrained),
        };
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![
            uri_san(spiffe_id),
            SanType::DnsName(
                "localhost"
                    .try_into()
                    .expect("pki: `localhost` is a valid IA5 string"),
            ),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        params.use_authority_key_identifier_extension = true;
        let not_before = now!() - starts_ago;
        params.not_before = not_before;
        params.not_after = not_before + lasts;

        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("pki: signing a leaf for {spiffe_id} failed: {e}"));
        let cert_der = cert.der().to_vec();
        let serial_hex = serial_hex_of(&cert_der);
        debug_assert_eq!(serial_hex, hex(&serial.to_bytes()));
        Leaf {
            spiffe_id: spiffe_id.to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der,
            key_der: key.serialize_der(),
            serial_hex,
        }
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Leaf {
    /// Writes `<stem>.crt` (the leaf PEM, mode 0644) and `<stem>.key` (the PKCS#8 PEM key, mode
    /// 0600) into `dir`; returns `(cert_path, key_path)`.
    ///
    /// Each file is written to a temporary name in `dir` and renamed into place, so a watcher
    /// never reads a half-written file (but it can observe the new certificate before the new
    /// key: the certificate is renamed first).
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        write_atomically(&cert_path, self.cert_pem.as_bytes(), 0o644);
        write_atomically(&key_path, self.key_pem.as_bytes(), 0o600);
        (cert_path, key_path)
    }
}

/// Never prints key material.
impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial_hex", &self.serial_hex)
            .finish_non_exhaustive()
    }
}

/// The serial of a DER certificate in [`Leaf::serial_hex`] format (lowercase hex of the DER
/// INTEGER content bytes, no separators).
pub fn serial_hex_of(cert_der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .expect("pki: x509-parser cannot parse a certificate");
    hex(cert.raw_serial())
}

/// How long ago the Unix epoch was.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("pki: the clock is before 1970")
}

fn new_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("pki: generating a P-256 key failed")
}

/// 16 random bytes whose first byte is in `0x01..=0x7f`: positive and minimal as a DER INTEGER, so
/// the encoded content bytes are exactly these bytes.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    bytes[0] = fastrand::u8(0x01..=0x7f);
    for b in &mut bytes[1..] {
        *b = fastrand::u8(..);
    }
    SerialNumber::from_slice(&bytes)
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(
        uri.try_into()
            .unwrap_or_else(|e| panic!("pki: {uri:?} is not an IA5 string: {e}")),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let dir = path.parent().expect("pki: output path has a parent");
    let name = path
        .file_name()
        .expect("pki: output path has a file name")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{:08x}.tmp", fastrand::u32(..)));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .unwrap_or_else(|e| panic!("pki: cannot create {}: {e}", tmp.display()));
    // The umask may have narrowed `mode`; make it exact.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("pki: cannot chmod {}: {e}", tmp.display()));
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .unwrap_or_else(|e| panic!("pki: cannot write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| {
        panic!(
            "pki: cannot rename {} to {}: {e}",
            tmp.display(),
            path.display()
        )
    });
}
