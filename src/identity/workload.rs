//! Identity from the SPIFFE Workload API (a SPIRE agent): the `spiffe` crate's `X509Source`
//! keeps the SVID and bundles current over a streaming gRPC connection, and `spiffe-rustls`
//! builds the client config that presents the SVID and verifies Loki against the bundle of its
//! trust domain and the shared [`PeerPolicy`].
//!
//! Every SVID or bundle update publishes a new [`Identity`], which makes the sink rebuild its HTTP
//! client, so no pooled connection outlives the SVID it was made with. While no valid SVID is
//! held (agent down, no registration entry, entry deleted, SVID expired) `None` is published:
//! ztail is not ready and sends nothing; the data waits on disk. Key material stays in memory.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spiffe::x509_source::{MetricsErrorKind, MetricsRecorder, SvidPicker, X509SourceError};
use spiffe::{TrustDomain, X509Source, X509Svid};
use spiffe_rustls::TrustDomainPolicy;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::verifier::svid_info;
use super::{Identity, IdentityWatch, PeerPolicy};
use crate::metrics::Metrics;
use crate::pipeline::lock;

/// How long one attempt to get the first SVID lasts before ztail logs why it has none and tries
/// again (the source itself retries with backoff inside the attempt).
const INITIAL_SYNC: Duration = Duration::from_secs(5);
/// An SVID is withdrawn this long before its notAfter, so that no handshake in progress
/// presents an expired certificate.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);
/// How often the held SVID is checked for expiry and withdrawal between updates.
const HEALTH_CHECK: Duration = Duration::from_secs(1);

/// `identity.source = "spiffe"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// `unix:///path/api.sock` or `tcp://ip:port`.
    pub endpoint: String,
    /// Picks the SVID with this hint when the workload is issued several.
    pub hint: Option<String>,
}

/// Starts following the Workload API; the watch holds `None` until the first SVID arrives.
pub fn spawn(
    cfg: WorkloadConfig,
    policy: PeerPolicy,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> IdentityWatch {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        Supervisor {
            cfg,
            policy,
            metrics,
            tx,
            cancel,
        }
        .run()
        .await;
    });
    rx
}

struct Supervisor {
    cfg: WorkloadConfig,
    policy: PeerPolicy,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Option<Arc<Identity>>>,
    cancel: CancellationToken,
}

impl Supervisor {
    async fn run(self) {
        let recorder = Arc::new(Recorder {
            metrics: self.metrics.clone(),
            last_error: Mutex::new(None),
        });
        let mut delay = Duration::from_millis(500);
        loop {
            let mut builder = X509Source::builder()
                .endpoint(&self.cfg.endpoint)
                .initial_sync_timeout(INITIAL_SYNC)
                .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(5))
                .metrics(recorder.clone());
            if let Some(hint) = &self.cfg.hint {
                builder = builder.picker(HintPicker(hint.clone()));
            }
            let built = tokio::select! {
                r = builder.build() => r,
                _ = self.cancel.cancelled() => return,
            };
            match built {
                Ok(source) => {
                    delay = Duration::from_millis(500);
                    tracing::info!(endpoint = %self.cfg.endpoint, "connected to the SPIFFE Workload API");
                    self.follow(source).await;
                    if self.cancel.is_cancelled() {
                        return;
                    }
                }
                Err(e) => {
                    let final_error = matches!(e, X509SourceError::UnsupportedRpc(_))
                        || matches!(&e, X509SourceError::Source(w) if w.is_invalid_argument());
                    let last = lock(&recorder.last_error).take();
                    if final_error {
                        self.metrics.workload_api_error("invalid_argument");
                        tracing::error!(endpoint = %self.cfg.endpoint, error = %e, "the Workload API refused the request for good (InvalidArgument/Unimplemented): not retrying; check identity.socket points at a SPIFFE Workload API");
                        self.cancel.cancelled().await;
                        return;
                    }
                    self.metrics.workload_api_error(match e {
                        X509SourceError::InitialSyncTimeout => "no_identity",
                        _ => "connect",
                    });
                    tracing::warn!(
                        endpoint = %self.cfg.endpoint,
                        error = %e,
                        last_workload_api_error = last.unwrap_or("none"),
                        hint = self.cfg.hint.as_deref().unwrap_or(""),
                        "waiting for identity: no SVID from the Workload API yet (is the SPIRE agent running, and is there a registration entry for this workload?); nothing is sent meanwhile, data waits on disk"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cancel.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Publishes the source's material on every update and withdraws it when it stops being
    /// valid; returns when the source closes or ztail stops.
    async fn follow(&self, source: X509Source) {
        let mut updates = source.updated();
        self.publish(&source);
        let mut tick = tokio::time::interval(HEALTH_CHECK);
        loop {
            tokio::select! {
                changed = updates.changed() => match changed {
                    Ok(_) => self.publish(&source),
                    Err(e) => {
                        tracing::warn!(error = %e, "the Workload API source closed; reconnecting");
                        self.withdraw("source closed");
                        break;
                    }
                },
                _ = tick.tick() => self.check(&source),
                _ = self.cancel.cancelled() => break,
            }
        }
        source.shutdown().await;
    }

    fn publish(&self, source: &X509Source) {
        let svid = match source.svid() {
            Ok(s) => s,
            Err(e) if withdrawn(&e) => {
                self.withdraw(&e.to_string());
                return;
            }
            Err(e) => {
                // An update without a usable SVID: keep the last good one until it expires.
                self.metrics.identity_reload_errors.inc();
                tracing::warn!(error = %e, "skipping an update from the Workload API without a usable SVID; keeping the previous SVID until it expires");
                return;
            }
        };
        match self.identity(source, &svid) {
            Ok(identity) => {
                let rotated = self
                    .tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|cur| cur.serial_hex != identity.serial_hex);
                tracing::info!(
                    spiffe_id = %identity.spiffe_id,
                    serial = %identity.serial_hex,
                    not_after = %humantime::format_rfc3339_seconds(identity.not_after),
                    bundles = ?identity.bundle_trust_domains,
                    rotated,
                    "identity from the Workload API"
                );
                self.metrics.identity_reloads.inc();
                self.metrics
                    .identity_not_after
                    .set(unix_secs(identity.not_after));
                self.tx.send_replace(Some(Arc::new(identity)));
            }
            Err(reason) => {
                // The previous identity stays until it expires (checked every second).
                self.metrics.identity_reload_errors.inc();
                tracing::warn!(%reason, "skipping an unusable update from the Workload API; keeping the previous SVID until it expires");
            }
        }
    }

    fn identity(&self, source: &X509Source, svid: &X509Svid) -> Result<Identity, String> {
        let (spiffe_id, not_after, serial_hex) = svid_info(svid.leaf().as_bytes())?;
        if not_after <= SystemTime::now() + EXPIRY_MARGIN {
            return Err(format!(
                "SVID {spiffe_id} (serial {serial_hex}) has expired or is about to"
            ));
        }
        let tls_for: super::TlsFactory = {
            let (source, metrics) = (source.clone(), self.metrics.clone());
            Arc::new(move |policy: &PeerPolicy| client_config(&source, policy, &metrics))
        };
        let config = tls_for(&self.policy)?;
        let bundle_trust_domains = source
            .bundle_set()
            .map(|set| set.iter().map(|(td, _)| td.to_string()).collect())
            .unwrap_or_default();
        Ok(Identity {
            client_config: Arc::new(config),
            tls_for,
            spiffe_id,
            not_after,
            serial_hex,
            bundle_trust_domains,
        })
    }

    /// Withdraws an identity that expired or that the agent withdrew, and brings it back when a
    /// valid one is there again.
    fn check(&self, source: &X509Source) {
        let current = self.tx.borrow().clone();
        match (current, source.svid()) {
            (Some(id), _) if id.not_after <= SystemTime::now() + EXPIRY_MARGIN => {
                self.withdraw(&format!(
                    "SVID {} expired and no renewal arrived",
                    id.spiffe_id
                ));
            }
            (Some(_), Err(e)) if withdrawn(&e) => self.withdraw(&e.to_string()),
            (None, Ok(_)) => self.publish(source),
            _ => {}
        }
    }

    fn withdraw(&self, why: &str) {
        if self.tx.borrow().is_some() {
            tracing::warn!(
                reason = why,
                "identity withdrawn: not ready, nothing is sent until a valid SVID arrives"
            );
            self.tx.send_replace(None);
        }
    }
}

/// A spiffe-rustls client config over the live source, authorizing peers with `policy` and
/// accepting only the trust domains it names.
fn client_config(
    source: &X509Source,
    policy: &PeerPolicy,
    metrics: &Arc<Metrics>,
) -> Result<rustls::ClientConfig, String> {
    let allowed: BTreeSet<TrustDomain> = policy
        .trust_domains()
        .filter_map(|td| TrustDomain::new(td).ok())
        .collect();
    let (policy, metrics) = (policy.clone(), metrics.clone());
    spiffe_rustls::mtls_client(source.clone())
        .authorize(move |peer: &spiffe::SpiffeId| authorize(&policy, &metrics, peer))
        .trust_domain_policy(TrustDomainPolicy::AllowList(allowed))
        .build()
        .map_err(|e| format!("cannot build the TLS client config: {e}"))
}

/// The agent took the identity away (entry deleted: PermissionDenied) or the source is gone, as
/// opposed to an update that merely carried nothing usable.
fn withdrawn(e: &X509SourceError) -> bool {
    matches!(e, X509SourceError::Withdrawn(_) | X509SourceError::Closed)
}

/// The shared peer policy as a spiffe-rustls authorizer; refusals are logged and counted.
fn authorize(policy: &PeerPolicy, metrics: &Metrics, peer: &spiffe::SpiffeId) -> bool {
    let parsed = match peer.to_string().parse::<super::SpiffeId>() {
        Ok(id) => id,
        Err(e) => {
            metrics.peer_refused("invalid_svid");
            tracing::warn!(peer_spiffe_id = %peer, error = %e, "refused Loki peer: unparsable SPIFFE ID");
            return false;
        }
    };
    match policy.check(&parsed) {
        Ok(()) => true,
        Err(refusal) => {
            metrics.peer_refused(refusal.reason());
            tracing::warn!(peer_spiffe_id = %peer, reason = refusal.reason(), "refused Loki peer: {refusal}");
            false
        }
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Selects the SVID carrying a given hint.
struct HintPicker(String);

impl SvidPicker for HintPicker {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0.as_str()))
    }
}

/// Feeds the source's own events into ztail's metrics.
struct Recorder {
    metrics: Arc<Metrics>,
    last_error: Mutex<Option<&'static str>>,
}

impl MetricsRecorder for Recorder {
    fn record_update(&self) {}

    fn record_reconnect(&self) {
        self.metrics.workload_api_error("reconnect");
    }

    fn record_error(&self, kind: MetricsErrorKind) {
        self.metrics.workload_api_error(kind.as_str());
        *lock(&self.last_error) = Some(kind.as_str());
    }
}
