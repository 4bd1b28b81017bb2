//! Whom ztail accepts as Loki: the peer policy over SPIFFE IDs, and the reasons a peer is refused.
//!
//! Pure logic, no I/O: the same [`PeerPolicy`] drives the PEM-files verifier (`verifier.rs`) and,
//! in Workload API mode, spiffe-rustls' authorizer and trust-domain policy. This module does not
//! know about certificates, bundles or files.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::spiffe_id::{SpiffeId, validate_trust_domain};

/// Which Loki peers ztail talks to, by SPIFFE ID. Default deny.
///
/// Built from the three config lists `allowed_ids`, `allowed_trust_domains` and
/// `allowed_path_prefixes`; at least one must be non-empty, because ztail never trusts a peer by
/// its address or DNS name.
///
/// - **Authentication** (which bundles may vouch for the peer): the peer's trust domain must be
///   one of [`PeerPolicy::trust_domains`]. When `allowed_trust_domains` is empty, that set is
///   derived from the trust domains named by `allowed_ids` and `allowed_path_prefixes`. This is
///   stricter than spiffe-rustls' default, which accepts any trust domain in the bundle set.
/// - **Authorization** (which IDs are Loki): when `allowed_ids` or `allowed_path_prefixes` is
///   non-empty, the peer ID must equal one of the IDs or lie within one of the prefixes (whole
///   path segments: `spiffe://td/loki` allows `/loki` and `/loki/x`, never `/loki-evil`). When
///   both are empty, every ID of an allowed trust domain is authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    ids: Vec<SpiffeId>,
    path_prefixes: Vec<SpiffeId>,
    trust_domains: BTreeSet<String>,
}

impl PeerPolicy {
    /// Validates the three config lists. The error names the offending value and says what is
    /// expected; `ztail check` shows it under the key path.
    pub fn new(
        ids: Vec<String>,
        trust_domains: Vec<String>,
        path_prefixes: Vec<String>,
    ) -> Result<PeerPolicy, String> {
        if ids.is_empty() && trust_domains.is_empty() && path_prefixes.is_empty() {
            return Err("no peer policy: set allowed_ids, allowed_trust_domains or \
                 allowed_path_prefixes; ztail never trusts a peer by address"
                .to_owned());
        }
        let ids = ids
            .iter()
            .map(|raw| {
                let id: SpiffeId = raw
                    .parse()
                    .map_err(|e| format!("invalid SPIFFE ID {raw:?}: {e}"))?;
                if id.path().is_empty() {
                    return Err(format!(
                        "invalid SPIFFE ID {raw:?}: it names a trust domain, not a workload; \
                         use allowed_trust_domains or allowed_path_prefixes for that"
                    ));
                }
                Ok(id)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let path_prefixes = path_prefixes
            .iter()
            .map(|raw| {
                raw.parse::<SpiffeId>().map_err(|e| {
                    format!(
                        "invalid SPIFFE ID path prefix {raw:?}: {e} \
                         (expected a full ID such as \"spiffe://example.org/loki\")"
                    )
                })
            })
            .collect::<Result<Vec<_>, String>>()?;

        let named: BTreeSet<String> = ids
            .iter()
            .chain(&path_prefixes)
            .map(|id| id.trust_domain().to_owned())
            .collect();
        let trust_domains = if trust_domains.is_empty() {
            named
        } else {
            let explicit = trust_domains
                .iter()
                .map(|raw| parse_trust_domain(raw))
                .collect::<Result<BTreeSet<_>, String>>()?;
            // An ID outside every allowed trust domain could never be authorized: say so now
            // rather than refusing every handshake later.
            if let Some(id) = ids
                .iter()
                .chain(&path_prefixes)
                .find(|id| !explicit.contains(id.trust_domain()))
            {
                return Err(format!(
                    "{id} is in trust domain {:?}, which is not in allowed_trust_domains; \
                     add it there or remove the ID",
                    id.trust_domain()
                ));
            }
            explicit
        };
        Ok(PeerPolicy {
            ids,
            path_prefixes,
            trust_domains,
        })
    }

    /// Whether `peer` may be Loki. Call only after the peer's certificate chain has been
    /// verified against the bundle of `peer`'s trust domain.
    pub fn check(&self, peer: &SpiffeId) -> Result<(), Refusal> {
        if !self.allows_trust_domain(peer.trust_domain()) {
            return Err(Refusal::TrustDomainNotAllowed { id: peer.clone() });
        }
        if self.ids.is_empty() && self.path_prefixes.is_empty() {
            return Ok(());
        }
        let authorized = self.ids.iter().any(|id| id == peer)
            || self.path_prefixes.iter().any(|p| peer.is_within(p));
        if authorized {
            Ok(())
        } else {
            Err(Refusal::IdNotAllowed { id: peer.clone() })
        }
    }

    /// Whether bundles of this trust domain may authenticate a peer.
    pub fn allows_trust_domain(&self, trust_domain: &str) -> bool {
        self.trust_domains.contains(trust_domain)
    }

    /// The trust domains whose bundles may authenticate a peer (bare names, sorted).
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.trust_domains.iter().map(String::as_str)
    }

    /// The exact IDs allowed (`allowed_ids`).
    pub fn ids(&self) -> &[SpiffeId] {
        &self.ids
    }

    /// The ID prefixes allowed (`allowed_path_prefixes`), matched on whole path segments.
    pub fn path_prefixes(&self) -> &[SpiffeId] {
        &self.path_prefixes
    }
}

/// Accepts `example.org` or `spiffe://example.org`.
fn parse_trust_domain(raw: &str) -> Result<String, String> {
    let bare = raw.strip_prefix("spiffe://").unwrap_or(raw);
    validate_trust_domain(bare).map_err(|e| {
        format!("invalid trust domain {raw:?}: {e} (expected e.g. \"example.org\")")
    })?;
    Ok(bare.to_owned())
}

/// Why a TLS peer was refused as Loki. Each variant has a stable metric label
/// ([`Refusal::reason`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The peer's trust domain is not one whose bundles may authenticate Loki.
    #[error(
        "peer {id} is in trust domain {:?}, which the peer policy does not allow; \
         add it to allowed_trust_domains if this is really Loki",
        id.trust_domain()
    )]
    TrustDomainNotAllowed {
        /// The peer's (unverified) SPIFFE ID.
        id: SpiffeId,
    },
    /// The peer's certificate verified, but its ID is not one the policy names.
    #[error(
        "peer {id} is not an allowed Loki identity; add it to allowed_ids or \
         allowed_path_prefixes if this is really Loki"
    )]
    IdNotAllowed {
        /// The peer's verified SPIFFE ID.
        id: SpiffeId,
    },
    /// The peer's leaf certificate is not a valid X509-SVID (SAN, CA flag or key usage).
    #[error("peer certificate is not a valid X509-SVID: {reason}")]
    InvalidSvid {
        /// What is wrong with the leaf.
        reason: String,
    },
    /// The peer's chain does not verify against the bundle of its trust domain.
    #[error(
        "peer certificate does not chain to the trust bundle of its trust domain: {reason}; \
         check that ztail's bundle holds the CA that issued Loki's certificate"
    )]
    UntrustedChain {
        /// The path validation error, naming the peer.
        reason: String,
    },
    /// The peer's certificate (or one in its chain) has expired.
    #[error("peer certificate has expired; renew Loki's certificate or check the clocks")]
    Expired,
    /// The peer's certificate (or one in its chain) is not valid yet.
    #[error("peer certificate is not valid yet; check the clocks of ztail and Loki")]
    NotYetValid,
    /// No trust bundle is held for the peer's (allowed) trust domain.
    #[error(
        "no trust bundle for trust domain {trust_domain:?}, so the peer cannot be verified; \
         federated bundles are needed to talk to another trust domain"
    )]
    NoBundle {
        /// The peer's trust domain.
        trust_domain: String,
    },
}

impl Refusal {
    /// A stable label for the `peer_refusals` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TrustDomainNotAllowed { .. } => "trust_domain_not_allowed",
            Refusal::IdNotAllowed { .. } => "id_not_allowed",
            Refusal::InvalidSvid { .. } => "invalid_svid",
            Refusal::UntrustedChain { .. } => "untrusted_chain",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::NoBundle { .. } => "no_bundle",
        }
    }

    /// Finds a refusal in an error chain, e.g. the one reqwest or tokio-rustls returns when the
    /// handshake was refused, so that callers can tell "peer refused" from transport errors.
    ///
    /// Looks through `std::io::Error` payloads and `rustls::Error::{InvalidCertificate(Other),
    /// Other}`, which do not expose their payload as `source()`.
    pub fn find_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
        let mut next = Some(err);
        while let Some(e) = next {
            if let Some(found) = Self::downcast(e) {
                return Some(found);
            }
            next = match e.downcast_ref::<std::io::Error>() {
                Some(io) => io.get_ref().map(|inner| inner as _),
                None => e.source(),
            };
        }
        None
    }

    fn downcast<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            return Some(r);
        }
        let other = match e.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))
            | rustls::Error::Other(o) => o,
            _ => return None,
        };
        let inner: &Arc<dyn std::error::Error + Send + Sync> = &other.0;
        inner.downcast_ref::<Refusal>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn default_deny_without_any_list() {
        let err = PeerPolicy::new(vec![], vec![], vec![]).unwrap_err();
        assert!(err.starts_with("no peer policy"), "{err}");
        assert!(err.contains("never trusts a peer by address"), "{err}");
    }

    #[test]
    fn trust_domains_are_derived_from_ids_and_prefixes() {
        let p = PeerPolicy::new(
            s(&["spiffe://a.org/loki"]),
            vec![],
            s(&["spiffe://b.org/logs", "spiffe://a.org/x"]),
        )
        .unwrap();
        assert_eq!(p.trust_domains().collect::<Vec<_>>(), ["a.org", "b.org"]);
        assert!(p.check(&id("spiffe://a.org/loki")).is_ok());
        assert!(p.check(&id("spiffe://b.org/logs/loki")).is_ok());
        assert_eq!(
            p.check(&id("spiffe://a.org/other")),
            Err(Refusal::IdNotAllowed {
                id: id("spiffe://a.org/other")
            })
        );
        assert_eq!(
            p.check(&id("spiffe://c.org/loki")),
            Err(Refusal::TrustDomainNotAllowed {
                id: id("spiffe://c.org/loki")
            })
        );
    }

    #[test]
    fn trust_domains_alone_authorize_every_id_in_them() {
        let p = PeerPolicy::new(vec![], s(&["spiffe://a.org", "b.org"]), vec![]).unwrap();
        assert_eq!(p.trust_domains().collect::<Vec<_>>(), ["a.org", "b.org"]);
        assert!(p.check(&id("spiffe://a.org/anything")).is_ok());
        assert!(p.check(&id("spiffe://b.org/x/y")).is_ok());
        let refusal = p.check(&id("spiffe://c.org/x")).unwrap_err();
        assert_eq!(refusal.reason(), "trust_domain_not_allowed");
    }

    #[test]
    fn explicit_trust_domains_restrict_ids() {
        let p = PeerPolicy::new(s(&["spiffe://a.org/loki"]), s(&["a.org"]), vec![]).unwrap();
        assert!(p.check(&id("spiffe://a.org/loki")).is_ok());
        assert_eq!(
            p.check(&id("spiffe://a.org/loki2")).unwrap_err().reason(),
            "id_not_allowed"
        );

        let err = PeerPolicy::new(s(&["spiffe://a.org/loki"]), s(&["b.org"]), vec![]).unwrap_err();
        assert!(err.contains("spiffe://a.org/loki"), "{err}");
        assert!(err.contains("allowed_trust_domains"), "{err}");
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let p = PeerPolicy::new(vec![], vec![], s(&["spiffe://td/loki"])).unwrap();
        assert!(p.check(&id("spiffe://td/loki")).is_ok());
        assert!(p.check(&id("spiffe://td/loki/ingester")).is_ok());
        assert_eq!(
            p.check(&id("spiffe://td/loki-evil")).unwrap_err().reason(),
            "id_not_allowed"
        );
        assert_eq!(
            p.check(&id("spiffe://other/loki")).unwrap_err().reason(),
            "trust_domain_not_allowed"
        );
    }

    #[test]
    fn errors_name_the_bad_value() {
        let err = PeerPolicy::new(s(&["spiffe://x/"]), vec![], vec![]).unwrap_err();
        assert!(
            err.starts_with("invalid SPIFFE ID \"spiffe://x/\": "),
            "{err}"
        );
        let err = PeerPolicy::new(s(&["spiffe://x"]), vec![], vec![]).unwrap_err();
        assert!(err.contains("names a trust domain"), "{err}");
        let err = PeerPolicy::new(vec![], s(&["Bad.Domain"]), vec![]).unwrap_err();
        assert!(
            err.starts_with("invalid trust domain \"Bad.Domain\""),
            "{err}"
        );
        let err = PeerPolicy::new(vec![], vec![], s(&["/loki"])).unwrap_err();
        assert!(
            err.starts_with("invalid SPIFFE ID path prefix \"/loki\""),
            "{err}"
        );
    }

    #[test]
    fn reasons_are_stable() {
        let a = id("spiffe://td/a");
        let cases = [
            (
                Refusal::TrustDomainNotAllowed { id: a.clone() },
                "trust_domain_not_allowed",
            ),
            (Refusal::IdNotAllowed { id: a.clone() }, "id_not_allowed"),
            (Refusal::InvalidSvid { reason: "x".into() }, "invalid_svid"),
            (
                Refusal::UntrustedChain { reason: "x".into() },
                "untrusted_chain",
            ),
            (Refusal::Expired, "expired"),
            (Refusal::NotYetValid, "not_yet_valid"),
            (
                Refusal::NoBundle {
                    trust_domain: "td".into(),
                },
                "no_bundle",
            ),
        ];
        for (refusal, reason) in cases {
            assert_eq!(refusal.reason(), reason);
        }
        let msg = Refusal::IdNotAllowed { id: a }.to_string();
        assert!(
            msg.contains("spiffe://td/a") && msg.contains("allowed_ids"),
            "{msg}"
        );
    }

    #[test]
    fn find_in_sees_through_rustls_and_io_errors() {
        let refusal = Refusal::Expired;
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(Arc::new(refusal.clone())),
        ));
        assert_eq!(Refusal::find_in(&tls), Some(&refusal));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert_eq!(Refusal::find_in(&io), Some(&refusal));
        let plain = std::io::Error::other("boom");
        assert_eq!(Refusal::find_in(&plain), None);
    }
}
