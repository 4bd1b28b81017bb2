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

/// Latest identity; `None` while ztail has none (not ready). A new value means: rebuild the HTTP
/// client.
pub type IdentityWatch = tokio::sync::watch::Receiver<Option<Arc<Identity>>>;
