//! Who ztail is (its X509-SVID) and whom it trusts as Loki (bundles and the peer policy),
//! published as a live rustls `ClientConfig` over a `tokio::sync::watch`.
//!
//! - `spiffe_id`: SPIFFE ID syntax.
//! - `policy`: the default-deny [`PeerPolicy`] and the [`Refusal`] reasons (pure, shared by both
//!   identity sources).
//! - `verifier`: the rustls server verifier enforcing the X509-SVID rules and the policy.
//! - `files`: the PEM-files identity source (cert chain, key, bundle), watched and reloaded.
//!
//! This module does not make HTTP clients (the Loki sink rebuilds its client on every new
//! [`Identity`]), and never falls back to plaintext or to an unverified peer: without a valid
//! identity it publishes `None` and ztail is not ready.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

pub mod config;
pub mod files;
pub mod policy;
pub mod spiffe_id;
pub mod verifier;
pub mod workload;

/// The test PKI shared with the integration tests (certificates made per test with rcgen).
#[cfg(test)]
#[path = "../../tests/support/pki.rs"]
mod pki;

pub use policy::{PeerPolicy, Refusal};
pub use spiffe_id::SpiffeId;

/// One usable identity: what new TLS connections to Loki present and verify with.
pub struct Identity {
    /// Presents ztail's SVID and verifies Loki against the bundle and the peer policy. Session
    /// resumption is off, so no session outlives the SVID it was made with.
    pub client_config: Arc<rustls::ClientConfig>,
    /// ztail's own SPIFFE ID (the leaf's URI SAN).
    pub spiffe_id: SpiffeId,
    /// When this identity stops being usable: the earliest notAfter of the presented chain
    /// (normally the leaf's).
    pub not_after: SystemTime,
    /// The leaf's serial number: lowercase hex of the DER INTEGER content bytes, no separators.
    pub serial_hex: String,
    /// Trust domains whose bundles this identity can verify peers with.
    pub bundle_trust_domains: Vec<String>,
    /// Builds a client config with the same SVID and bundles for another peer policy (probes).
    pub tls_for: TlsFactory,
}

/// See [`Identity::tls_for`].
pub type TlsFactory =
    Arc<dyn Fn(&PeerPolicy) -> Result<rustls::ClientConfig, String> + Send + Sync>;

/// Never prints key material.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("serial_hex", &self.serial_hex)
            .finish_non_exhaustive()
    }
}

/// The crypto provider of every TLS connection ztail makes: ring, with TLS 1.3's cipher suites
/// only, unless `allow_tls12`. TLS 1.2 sends certificates in the clear, so ztail's SVID (its
/// SPIFFE ID) would be readable by anyone on the path; Loki, VictoriaLogs, Envoy and nginx all
/// speak TLS 1.3. Installed as the process default because spiffe-rustls builds its configs
/// from the default provider; the files source and the probes take it from [`tls_provider`].
/// Returns false if another provider was installed first (it is then left as it is).
pub fn install_tls_provider(allow_tls12: bool) -> bool {
    rustls::crypto::CryptoProvider::install_default(ring_provider(allow_tls12)).is_ok()
}

/// The installed provider (see [`install_tls_provider`]), or TLS 1.3 only if none was.
pub fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(ring_provider(false)))
}

/// ring, with TLS 1.2's cipher suites only if `allow_tls12`: without a suite for a version,
/// rustls does not offer that version at all.
fn ring_provider(allow_tls12: bool) -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    if !allow_tls12 {
        provider
            .cipher_suites
            .retain(|suite| suite.version() == &rustls::version::TLS13);
    }
    provider
}

/// Latest identity; `None` while ztail has none (not ready). A new value means: rebuild the HTTP
/// client.
pub type IdentityWatch = tokio::sync::watch::Receiver<Option<Arc<Identity>>>;
