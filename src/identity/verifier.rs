//! Verifying Loki's X509-SVID during the TLS handshake, and the X509-SVID leaf rules.
//!
//! [`SpiffeServerVerifier`] is the rustls server-certificate verifier of the PEM-files identity
//! source. It enforces the same rules as spiffe-rustls: the leaf is a valid X509-SVID, the chain
//! verifies against the bundle of the peer's own trust domain (bundles are kept apart per trust
//! domain, so one domain's CA cannot vouch for another's IDs), and the [`PeerPolicy`] authorizes
//! the ID. The server name is ignored: Loki's identity is its URI SAN, so connecting by IP works.
//!
//! This module does not load files or bundles (`files.rs` does) and keeps no state between
//! handshakes.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use x509_parser::extensions::GeneralName;

use super::policy::{PeerPolicy, Refusal};
use super::spiffe_id::SpiffeId;
use crate::metrics::Metrics;

/// A CA of a trust bundle: the anchor webpki verifies with, and the validity webpki ignores
/// in anchors (go-spiffe's verifier refuses a chain to an expired CA; so does ztail's).
#[derive(Clone, Debug)]
pub struct BundleCa {
    pub anchor: TrustAnchor<'static>,
    /// Validity, in Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

impl BundleCa {
    pub fn from_der(der: &CertificateDer<'_>) -> Result<BundleCa, webpki::Error> {
        let anchor = webpki::anchor_from_trusted_cert(der)?.to_owned();
        let (not_before, not_after) = x509_parser::parse_x509_certificate(der)
            .map(|(_, cert)| {
                let v = cert.validity();
                (
                    v.not_before.timestamp().max(0) as u64,
                    v.not_after.timestamp().max(0) as u64,
                )
            })
            .map_err(|_| webpki::Error::BadDer)?;
        Ok(BundleCa {
            anchor,
            not_before,
            not_after,
        })
    }

    pub fn is_valid_at(&self, now: UnixTime) -> bool {
        (self.not_before..=self.not_after).contains(&now.as_secs())
    }
}

/// The anchors of `cas` valid at `now`.
pub fn valid_anchors(cas: &[BundleCa], now: UnixTime) -> Vec<TrustAnchor<'static>> {
    cas.iter()
        .filter(|ca| ca.is_valid_at(now))
        .map(|ca| ca.anchor.clone())
        .collect()
}

/// What is wrong with a certificate used as an intermediate CA, if anything: an X509-SVID
/// signing certificate must be a CA (basicConstraints CA=true) allowed to sign certificates
/// (keyUsage keyCertSign). webpki checks the first and not the second.
fn intermediate_problem(der: &CertificateDer<'_>) -> Option<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Some("an intermediate certificate does not parse".to_owned());
    };
    let subject = cert.subject().to_string();
    if !cert.is_ca() {
        return Some(format!(
            "intermediate {subject:?} is not a CA (basicConstraints CA=true missing)"
        ));
    }
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => None,
        _ => Some(format!(
            "intermediate CA {subject:?} may not sign certificates (keyUsage keyCertSign missing)"
        )),
    }
}

/// Verifies that the TLS server is a Loki allowed by the peer policy.
///
/// Every refusal is logged with the peer's SPIFFE ID, counted in `peer_refusals{reason}` and
/// fails the handshake with `rustls::Error::InvalidCertificate(CertificateError::Other(..))`
/// wrapping the [`Refusal`] (see [`Refusal::find_in`]), before any HTTP byte is sent.
pub struct SpiffeServerVerifier {
    bundles: HashMap<String, Vec<BundleCa>>,
    policy: PeerPolicy,
    metrics: Arc<Metrics>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// `bundles` maps a bare trust domain name (`example.org`) to the CAs of that trust domain.
    /// Signature algorithms come from `provider` (ztail uses ring throughout).
    pub fn new(
        bundles: HashMap<String, Vec<BundleCa>>,
        policy: PeerPolicy,
        metrics: Arc<Metrics>,
        provider: &CryptoProvider,
    ) -> Self {
        SpiffeServerVerifier {
            bundles,
            policy,
            metrics,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// The whole decision, without side effects. On refusal, also returns the peer's ID when
    /// it could be read, for the log.
    fn decide(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, (Option<SpiffeId>, Refusal)> {
        let (id, _, _) =
            svid_info(end_entity).map_err(|reason| (None, Refusal::InvalidSvid { reason }))?;
        let refuse = |refusal| (Some(id.clone()), refusal);
        if !self.policy.allows_trust_domain(id.trust_domain()) {
            return Err(refuse(Refusal::TrustDomainNotAllowed { id: id.clone() }));
        }
        let Some(cas) = self.bundles.get(id.trust_domain()) else {
            return Err(refuse(Refusal::NoBundle {
                trust_domain: id.trust_domain().to_owned(),
            }));
        };
        let anchors = valid_anchors(cas, now);
        if anchors.is_empty() {
            return Err(refuse(Refusal::UntrustedChain {
                reason: format!(
                    "{id}: every CA in the bundle of trust domain {:?} has expired (or is not valid yet)",
                    id.trust_domain()
                ),
            }));
        }
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            refuse(Refusal::InvalidSvid {
                reason: format!("not a valid certificate: {}", describe_chain_error(&e)),
            })
        })?;
        leaf.verify_for_usage(
            self.algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            refuse(match e {
                webpki::Error::CertExpired { .. } => Refusal::Expired,
                webpki::Error::CertNotValidYet { .. } => Refusal::NotYetValid,
                other => Refusal::UntrustedChain {
                    reason: format!("{id}: {}", describe_chain_error(&other)),
                },
            })
        })?;
        if let Some(reason) = intermediates.iter().find_map(intermediate_problem) {
            return Err(refuse(Refusal::UntrustedChain {
                reason: format!("{id}: {reason}"),
            }));
        }
        self.policy.check(&id).map_err(refuse)?;
        Ok(id)
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("trust_domains", &self.bundles.keys().collect::<Vec<_>>())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.decide(end_entity, intermediates, now) {
            Ok(id) => {
                tracing::debug!(peer_spiffe_id = %id, "verified Loki peer");
                Ok(ServerCertVerified::assertion())
            }
            Err((id, refusal)) => {
                let peer = id.map_or_else(|| "unknown".to_owned(), |id| id.to_string());
                tracing::warn!(
                    peer_spiffe_id = %peer,
                    reason = refusal.reason(),
                    "refused Loki peer: {refusal}"
                );
                self.metrics.peer_refused(refusal.reason());
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(refusal)),
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks the X509-SVID leaf rules and returns the leaf's SPIFFE ID, notAfter and serial number
/// (lowercase hex of the DER serial bytes).
///
/// The rules (X509-SVID §2–§4, as spiffe-rustls enforces them): exactly one URI SAN, a valid
/// SPIFFE ID with a non-root path; BasicConstraints present with `cA=false`; KeyUsage present
/// with `digitalSignature` and without `keyCertSign` or `cRLSign`. Neither the chain nor the
/// validity period is checked here.
pub fn svid_info(leaf_der: &[u8]) -> Result<(SpiffeId, SystemTime, String), String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| format!("not a parsable X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".to_owned());
    }

    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("invalid subjectAltName extension: {e}"))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match uris.as_slice() {
        [uri] => *uri,
        [] => {
            return Err("no URI SAN; an X509-SVID carries its SPIFFE ID as its one URI SAN".into());
        }
        many => {
            return Err(format!(
                "{} URI SANs; an X509-SVID has exactly one",
                many.len()
            ));
        }
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e| format!("URI SAN {uri:?} is not a valid SPIFFE ID: {e}"))?;
    if id.path().is_empty() {
        return Err(format!(
            "SPIFFE ID {id} has no path; only CAs carry a trust domain ID"
        ));
    }

    let basic = cert
        .basic_constraints()
        .map_err(|e| format!("invalid BasicConstraints extension: {e}"))?;
    match basic {
        None => {
            return Err(format!(
                "{id}: no BasicConstraints extension (cA=false is required)"
            ));
        }
        Some(bc) if bc.value.ca => {
            return Err(format!(
                "{id}: it is a CA certificate (BasicConstraints cA=true)"
            ));
        }
        Some(_) => {}
    }
    let key_usage = cert
        .key_usage()
        .map_err(|e| format!("invalid KeyUsage extension: {e}"))?;
    let Some(key_usage) = key_usage else {
        return Err(format!(
            "{id}: no KeyUsage extension (digitalSignature is required)"
        ));
    };
    if !key_usage.value.digital_signature() {
        return Err(format!("{id}: KeyUsage lacks digitalSignature"));
    }
    if key_usage.value.key_cert_sign() || key_usage.value.crl_sign() {
        return Err(format!(
            "{id}: KeyUsage has keyCertSign or cRLSign, which a leaf must not have"
        ));
    }

    let not_after = system_time(cert.validity().not_after.timestamp());
    Ok((id, not_after, hex(cert.raw_serial())))
}

/// Seconds since the Unix epoch (possibly negative) as a `SystemTime`.
pub(crate) fn system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs()),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing into a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A path-validation error in words an operator can act on.
pub(crate) fn describe_chain_error(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => {
            "issued by a CA that is not in the trust bundle (UnknownIssuer)".to_owned()
        }
        webpki::Error::CertExpired { not_after, .. } => {
            format!("expired at {}", rfc3339(not_after))
        }
        webpki::Error::CertNotValidYet { not_before, .. } => {
            format!("not valid before {}", rfc3339(not_before))
        }
        webpki::Error::InvalidSignatureForPublicKey => {
            "a signature in the chain does not verify (InvalidSignatureForPublicKey)".to_owned()
        }
        webpki::Error::CaUsedAsEndEntity => {
            "the leaf is a CA certificate (CaUsedAsEndEntity)".to_owned()
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "the leaf's extended key usage does not allow this use (RequiredEkuNotFound)".to_owned()
        }
        other => format!("{other:?}"),
    }
}

fn rfc3339(t: &UnixTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::pki::{Ca, Leaf};
    use crate::metrics::ReasonLabel;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ClientConfig, ServerConfig};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn server_config(
        leaf: &Leaf,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()));
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(leaf.cert_der.clone())], key)
            .unwrap();
        Arc::new(config)
    }

    fn verifier(ca: &Ca, policy: PeerPolicy, metrics: &Arc<Metrics>) -> SpiffeServerVerifier {
        let ca_der = CertificateDer::from(ca.cert_der.clone());
        let anchor = BundleCa::from_der(&ca_der).unwrap();
        SpiffeServerVerifier::new(
            HashMap::from([(ca.trust_domain.clone(), vec![anchor])]),
            policy,
            Arc::clone(metrics),
            &provider(),
        )
    }

    fn client_config(verifier: SpiffeServerVerifier) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A real handshake over an in-memory pipe; returns the client's verdict.
    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<(), Refusal> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        // An IP address: the verifier must ignore the server name.
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let (client_result, _) = tokio::join!(
            TlsConnector::from(client).connect(name, client_io),
            TlsAcceptor::from(server).accept(server_io),
        );
        match client_result {
            Ok(_) => Ok(()),
            Err(e) => Err(Refusal::find_in(&e)
                .unwrap_or_else(|| panic!("handshake failed without a refusal: {e}"))
                .clone()),
        }
    }

    fn policy_ids(ids: &[&str]) -> PeerPolicy {
        PeerPolicy::new(ids.iter().map(|s| s.to_string()).collect(), vec![], vec![]).unwrap()
    }

    fn refusals(metrics: &Metrics, reason: &str) -> u64 {
        metrics
            .peer_refusals
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .get()
    }

    #[tokio::test]
    async fn allowed_id_is_accepted_over_tls13_and_tls12() {
        let ca = Ca::new("example.org");
        let loki = ca.issue("spiffe://example.org/loki");
        let metrics = Arc::new(Metrics::new());
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = client_config(verifier(
                &ca,
                policy_ids(&["spiffe://example.org/loki"]),
                &metrics,
            ));
            handshake(client, server_config(&loki, version))
                .await
                .unwrap();
        }
        assert_eq!(metrics.render().matches("peer_refusals_total{").count(), 0);
    }

    #[tokio::test]
    async fn disallowed_id_is_refused_and_counted() {
        let ca = Ca::new("example.org");
        let evil = ca.issue("spiffe://example.org/loki-evil");
        let metrics = Arc::new(Metrics::new());
        let policy =
            PeerPolicy::new(vec![], vec![], vec!["spiffe://example.org/loki".into()]).unwrap();
        let client = client_config(verifier(&ca, policy, &metrics));
        let refusal = handshake(client, server_config(&evil, &rustls::version::TLS13))
            .await
            .unwrap_err();
        assert_eq!(
            refusal,
            Refusal::IdNotAllowed {
                id: "spiffe://example.org/loki-evil".parse().unwrap()
            }
        );
        assert_eq!(refusals(&metrics, "id_not_allowed"), 1);
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_untrusted() {
        let ca = Ca::new("example.org");
        let rogue_ca = Ca::new("example.org");
        let rogue = rogue_ca.issue("spiffe://example.org/loki");
        let metrics = Arc::new(Metrics::new());
        let client = client_config(verifier(
            &ca,
            policy_ids(&["spiffe://example.org/loki"]),
            &metrics,
        ));
        let refusal = handshake(client, server_config(&rogue, &rustls::version::TLS13))
            .await
            .unwrap_err();
        assert!(
            matches!(&refusal, Refusal::UntrustedChain { reason }
                if reason.contains("UnknownIssuer")),
            "{refusal:?}"
        );
        assert_eq!(refusals(&metrics, "untrusted_chain"), 1);
    }

    #[tokio::test]
    async fn expired_certificate_is_refused() {
        let ca = Ca::new("example.org");
        let old = ca.issue_expired("spiffe://example.org/loki");
        let metrics = Arc::new(Metrics::new());
        let client = client_config(verifier(
            &ca,
            policy_ids(&["spiffe://example.org/loki"]),
            &metrics,
        ));
        let refusal = handshake(client, server_config(&old, &rustls::version::TLS13))
            .await
            .unwrap_err();
        assert_eq!(refusal, Refusal::Expired);
        assert_eq!(refusals(&metrics, "expired"), 1);
    }

    #[tokio::test]
    async fn ca_flagged_leaf_is_not_an_svid() {
        let ca = Ca::new("example.org");
        let flagged = ca.issue_ca_flagged("spiffe://example.org/loki");
        let metrics = Arc::new(Metrics::new());
        let client = client_config(verifier(
            &ca,
            policy_ids(&["spiffe://example.org/loki"]),
            &metrics,
        ));
        let refusal = handshake(client, server_config(&flagged, &rustls::version::TLS13))
            .await
            .unwrap_err();
        assert!(
            matches!(&refusal, Refusal::InvalidSvid { reason }
                if reason.contains("CA certificate")),
            "{refusal:?}"
        );
        assert_eq!(refusals(&metrics, "invalid_svid"), 1);
    }

    #[tokio::test]
    async fn other_trust_domain_is_refused() {
        let ca = Ca::new("example.org");
        let other_ca = Ca::new("other.org");
        let other = other_ca.issue("spiffe://other.org/loki");
        let metrics = Arc::new(Metrics::new());
        let client = client_config(verifier(
            &ca,
            policy_ids(&["spiffe://example.org/loki"]),
            &metrics,
        ));
        let refusal = handshake(client, server_config(&other, &rustls::version::TLS13))
            .await
            .unwrap_err();
        assert_eq!(
            refusal,
            Refusal::TrustDomainNotAllowed {
                id: "spiffe://other.org/loki".parse().unwrap()
            }
        );
        assert_eq!(refusals(&metrics, "trust_domain_not_allowed"), 1);
    }

    #[tokio::test]
    async fn allowed_trust_domain_without_bundle_is_refused() {
        let ca = Ca::new("example.org");
        let other = Ca::new("other.org").issue("spiffe://other.org/loki");
        let metrics = Arc::new(Metrics::new());
        let policy = PeerPolicy::new(
            vec![],
            vec!["example.org".into(), "other.org".into()],
            vec![],
        )
        .unwrap();
        let client = client_config(verifier(&ca, policy, &metrics));
        let refusal = handshake(client, server_config(&other, &rustls::version::TLS13))
            .await
            .unwrap_err();
        assert_eq!(
            refusal,
            Refusal::NoBundle {
                trust_domain: "other.org".into()
            }
        );
        assert_eq!(refusals(&metrics, "no_bundle"), 1);
    }

    #[test]
    fn svid_info_reads_id_expiry_and_serial() {
        let ca = Ca::new("example.org");
        let leaf = ca.issue("spiffe://example.org/ztail");
        let (id, not_after, serial) = svid_info(&leaf.cert_der).unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/ztail");
        assert_eq!(serial, leaf.serial_hex);
        let left = not_after.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > Duration::from_secs(22 * 3600) && left <= Duration::from_secs(23 * 3600),
            "{left:?}"
        );
    }

    #[test]
    fn svid_info_refuses_non_svids() {
        let ca = Ca::new("example.org");
        let err = svid_info(&ca.cert_der).unwrap_err();
        assert!(err.contains("has no path"), "{err}");
        let err = svid_info(&ca.issue_ca_flagged("spiffe://example.org/x").cert_der).unwrap_err();
        assert!(err.contains("CA certificate"), "{err}");
        let err = svid_info(&ca.issue("spiffe://example.org/x/").cert_der).unwrap_err();
        assert!(err.contains("not a valid SPIFFE ID"), "{err}");
        let err = svid_info(&ca.issue("https://example.org/x").cert_der).unwrap_err();
        assert!(err.contains("not a valid SPIFFE ID"), "{err}");
        let err = svid_info(b"not a certificate").unwrap_err();
        assert!(err.contains("not a parsable X.509 certificate"), "{err}");
    }

    const LOKI: &str = "spiffe://example.org/loki";

    fn chain_server_config(leaf: &Leaf, intermediate: &Ca) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()));
        let chain = vec![
            CertificateDer::from(leaf.cert_der.clone()),
            CertificateDer::from(intermediate.cert_der.clone()),
        ];
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    /// An X509-SVID signing certificate must carry keyCertSign; webpki does not check it,
    /// go-spiffe does, and so must ztail.
    #[tokio::test]
    async fn an_intermediate_that_may_not_sign_certificates_is_refused() {
        let root = Ca::new("example.org");
        let metrics = Arc::new(Metrics::new());
        for (key_cert_sign, accepted) in [(true, true), (false, false)] {
            let sub = root.intermediate(key_cert_sign);
            let leaf = sub.issue(LOKI);
            let client = client_config(verifier(&root, policy_ids(&[LOKI]), &metrics));
            let result = handshake(client, chain_server_config(&leaf, &sub)).await;
            match (accepted, result) {
                (true, Ok(())) => {}
                (false, Err(Refusal::UntrustedChain { reason })) => {
                    assert!(reason.contains("keyCertSign"), "{reason}");
                }
                (_, other) => panic!("keyCertSign {key_cert_sign}: {other:?}"),
            }
        }
    }

    /// webpki ignores a trust anchor's validity; a bundle CA that has expired vouches for
    /// nothing.
    #[tokio::test]
    async fn a_chain_to_an_expired_bundle_ca_is_refused() {
        let ca = Ca::new_expired("example.org");
        let leaf = ca.issue(LOKI);
        let metrics = Arc::new(Metrics::new());
        let client = client_config(verifier(&ca, policy_ids(&[LOKI]), &metrics));
        match handshake(client, server_config(&leaf, &rustls::version::TLS13)).await {
            Err(Refusal::UntrustedChain { reason }) => {
                assert!(reason.contains("expired"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
