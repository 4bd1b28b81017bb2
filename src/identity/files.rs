//! The `files` identity source: ztail's SVID chain, private key and trust bundle read from PEM
//! files (what spiffe-helper and `spire-agent api fetch x509 -write` produce), validated as a set
//! and republished whenever the files change.
//!
//! Owns: reading and checking the three files ([`load`]), and the watcher task ([`spawn`]) that
//! reloads them on inotify events (debounced) and on a 2 s poll, keeps the last good identity when
//! an update is bad, and withdraws it (`None`) when it expires with no valid replacement.
//!
//! Does not: talk to the SPIRE Workload API, hold bundles of federated trust domains (the bundle
//! file is the bundle of ztail's own trust domain, so Loki must be in that trust domain for now),
//! build HTTP clients, or ever log key material.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::policy::PeerPolicy;
use super::spiffe_id::SpiffeId;
use super::verifier::{
    BundleCa, SpiffeServerVerifier, describe_chain_error, svid_info, system_time,
};
use super::{Identity, IdentityWatch};
use crate::metrics::Metrics;

/// The safety-net poll: inotify drops events under load and misses some atomic-swap patterns.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Quiet time after a file event before reloading, so that a writer replacing the three files in
/// sequence is seen as one change.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Upper bound on the debounce when events keep coming.
const MAX_DEBOUNCE: Duration = Duration::from_secs(1);
/// Warn when this fraction of the SVID's lifetime has passed without a renewal (SPIRE renews at
/// about half-life).
const EXPIRY_WARNING_FRACTION: f64 = 0.75;

/// Where the PEM files are. Built by the config module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesConfig {
    /// ztail's X509-SVID: PEM certificates, leaf first, then any intermediates.
    pub cert: PathBuf,
    /// The SVID's private key: one PKCS#8, SEC1 or PKCS#1 PEM block.
    pub key: PathBuf,
    /// The trust bundle of ztail's own trust domain: one or more CA certificates, PEM.
    pub bundle: PathBuf,
}

/// Loads once (for `ztail check` and start-up). Validates everything; errors name the file and
/// the fix.
///
/// Checks: each file parses; the key matches the leaf; the leaf is a valid X509-SVID; the chain
/// verifies against the bundle for client authentication now; the peer policy allows ztail's own
/// trust domain (the only one it has a bundle for).
pub fn load(
    cfg: &FilesConfig,
    policy: &PeerPolicy,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Identity> {
    Ok(load_set(cfg, policy, metrics, SystemTime::now())?.identity)
}

/// Loads now, then watches the three files and publishes every valid change.
///
/// - If the first load fails, the error is logged, `None` is published (ztail starts not ready)
///   and loading is retried at every poll until it succeeds.
/// - Changes are noticed through notify on the files' parent directories (debounced ~100 ms, so a
///   writer replacing the three files in sequence is seen as one change) and a poll every 2 s
///   comparing `(len, mtime, inode)` as a safety net. If the set is inconsistent at that instant,
///   the next event or poll retries.
/// - A half-written or mismatched set (key does not match the certificate, certificate does not
///   chain to the bundle, not a valid SVID, unparsable PEM, expired) is rejected: a warning names
///   the file and the reason, `identity_reload_errors` counts it, the previous identity stays.
/// - Files rewritten with identical content publish nothing (no needless HTTP client rebuild).
/// - When the current identity expires and no valid replacement exists, `None` is published.
///
/// The first load runs on the calling thread (three small files), so the returned receiver
/// already holds the identity when the files are good. Must be called inside a tokio runtime;
/// the task stops when `cancel` fires or every receiver is dropped.
pub fn spawn(
    cfg: FilesConfig,
    policy: PeerPolicy,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> IdentityWatch {
    let (tx, rx) = watch::channel(None);
    let wake = Arc::new(Notify::new());
    // Watch before the first load so that no change between the two goes unnoticed.
    let watcher = watch_directories(&cfg, Arc::clone(&wake));
    let mut reloader = Reloader {
        inputs: Arc::new(Inputs {
            cfg,
            policy,
            metrics,
        }),
        tx,
        current: None,
        seen: None,
        last_error: None,
    };
    let first = reloader.fingerprint();
    reloader.apply(first, reloader.inputs.load());
    tokio::spawn(reloader.run(watcher, wake, cancel));
    rx
}

/// A validated identity plus what the reloader needs to tell a real change from a rewrite.
struct Loaded {
    identity: Identity,
    /// The certificate and bundle files as read: a new value means new material to publish.
    material: (Vec<u8>, Vec<u8>),
    /// The leaf's notBefore, for the expiry warning.
    not_before: SystemTime,
}

fn load_set(
    cfg: &FilesConfig,
    policy: &PeerPolicy,
    metrics: &Arc<Metrics>,
    now: SystemTime,
) -> anyhow::Result<Loaded> {
    let cert_pem = read(&cfg.cert, "certificate")?;
    // Invariant: `parse_chain` returns at least one certificate, so `chain[0]` (the leaf) and
    // `chain[1..]` (the intermediates) below cannot panic.
    let chain = parse_chain(&cert_pem, &cfg.cert)?;
    let key = parse_key(&read(&cfg.key, "private key")?, &cfg.key)?;
    let bundle_pem = read(&cfg.bundle, "trust bundle")?;
    let anchors = parse_bundle(&bundle_pem, &cfg.bundle)?;

    let (spiffe_id, leaf_not_after, serial_hex) = svid_info(&chain[0]).map_err(|reason| {
        anyhow!(
            "certificate in {} is not a valid X509-SVID: {reason}",
            cfg.cert.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    check_key_matches(&chain, &key, &provider, cfg)?;
    verify_own_chain(&chain, &anchors, &provider, now, cfg, &spiffe_id)?;

    let own_td = spiffe_id.trust_domain().to_owned();
    if !policy.allows_trust_domain(&own_td) {
        let allowed: Vec<&str> = policy.trust_domains().collect();
        bail!(
            "the peer policy allows Loki only in trust domain(s) {allowed:?}, but the trust \
             bundle in {} is for ztail's own trust domain {own_td:?} and federated bundles are not \
             supported with the files identity source; allow Loki IDs in {own_td:?}",
            cfg.bundle.display()
        );
    }

    let (not_before, _) = validity(&chain[0]).unwrap_or((SystemTime::UNIX_EPOCH, leaf_not_after));
    // The identity is unusable as soon as any certificate it presents has expired.
    let not_after = chain[1..]
        .iter()
        .filter_map(|der| validity(der).map(|(_, not_after)| not_after))
        .fold(leaf_not_after, std::cmp::min);

    let build = {
        let (chain, key, metrics) = (chain.clone(), key.clone_key(), Arc::clone(metrics));
        let bundles = HashMap::from([(own_td.clone(), anchors)]);
        move |policy: &PeerPolicy| -> Result<ClientConfig, String> {
            client_config(&chain, key.clone_key(), &bundles, policy, &metrics)
        }
    };
    let config = build(policy).map_err(|e| {
        anyhow::anyhow!(
            "using the certificate in {} with the key in {}: {e}",
            cfg.cert.display(),
            cfg.key.display()
        )
    })?;

    Ok(Loaded {
        identity: Identity {
            client_config: Arc::new(config),
            tls_for: Arc::new(build),
            spiffe_id,
            not_after,
            bundle_trust_domains: vec![own_td.clone()],
            serial_hex,
        },
        material: (cert_pem, bundle_pem),
        not_before,
    })
}

/// A client config presenting this SVID and verifying peers against `bundles` and `policy`.
fn client_config(
    chain: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
    bundles: &HashMap<String, Vec<BundleCa>>,
    policy: &PeerPolicy,
    metrics: &Arc<Metrics>,
) -> Result<ClientConfig, String> {
    let provider = super::tls_provider();
    let verifier = SpiffeServerVerifier::new(
        bundles.clone(),
        policy.clone(),
        Arc::clone(metrics),
        &provider,
    );
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain.to_vec(), key)
        .map_err(|e| e.to_string())?;
    // A resumed session skips certificate checks, so it could outlive a short-lived SVID.
    config.resumption = rustls::client::Resumption::disabled();
    // Peers are identified by their SPIFFE ID, not by a host name.
    config.enable_sni = false;
    Ok(config)
}

/// Parses a certificate chain, key and bundle as [`load`] does, without touching the disk or
/// checking validity times; returns the SVID's SPIFFE ID. For the fuzzer (`fuzz/`).
#[doc(hidden)]
pub fn parse_material(cert: &[u8], key: &[u8], bundle: &[u8]) -> anyhow::Result<String> {
    let path = Path::new("<input>");
    let chain = parse_chain(cert, path)?;
    parse_key(key, path)?;
    parse_bundle(bundle, path)?;
    let (id, _, _) = svid_info(&chain[0]).map_err(|r| anyhow!("not a valid X509-SVID: {r}"))?;
    Ok(id.to_string())
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} file {}", path.display()))
}

fn parse_chain(pem: &[u8], path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow!(
                "unparsable PEM in certificate file {}: {}",
                path.display(),
                describe_pem_error(&e)
            )
        })?;
    if chain.is_empty() {
        bail!(
            "no CERTIFICATE block in {}; expected ztail's SVID as PEM, leaf first, then any \
             intermediates",
            path.display()
        );
    }
    Ok(chain)
}

fn parse_key(pem: &[u8], path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    // The pem error never carries key bytes, but describe it ourselves anyway: nothing derived
    // from the key file's content reaches a log.
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow!(
            "no private key in {}; expected one PKCS#8 (BEGIN PRIVATE KEY), SEC1 (BEGIN EC \
             PRIVATE KEY) or PKCS#1 (BEGIN RSA PRIVATE KEY) PEM block",
            path.display()
        ),
        other => anyhow!(
            "unparsable PEM in private key file {}: {}",
            path.display(),
            describe_pem_error(&other)
        ),
    })
}

fn parse_bundle(pem: &[u8], path: &Path) -> anyhow::Result<Vec<BundleCa>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow!(
                "unparsable PEM in trust bundle file {}: {}",
                path.display(),
                describe_pem_error(&e)
            )
        })?;
    if certs.is_empty() {
        bail!(
            "no CERTIFICATE block in trust bundle file {}; expected the CA certificates of \
             ztail's trust domain as PEM",
            path.display()
        );
    }
    certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            BundleCa::from_der(der).map_err(|e| {
                anyhow!(
                    "certificate #{} in trust bundle file {} cannot be a trust anchor: {}",
                    i + 1,
                    path.display(),
                    describe_chain_error(&e)
                )
            })
        })
        .collect()
}

fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    provider: &CryptoProvider,
    cfg: &FilesConfig,
) -> anyhow::Result<()> {
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            anyhow!(
                "private key in {} is not usable: {e}; expected an ECDSA, Ed25519 or RSA key",
                cfg.key.display()
            )
        })?;
    match rustls::sign::CertifiedKey::new(chain.to_vec(), signing_key).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => bail!(
            "private key in {} does not match the certificate in {}; write the key and \
             certificate of the same SVID (a set caught mid-rotation is retried on the next \
             change)",
            cfg.key.display(),
            cfg.cert.display()
        ),
        Err(e) => bail!(
            "cannot check that the private key in {} matches the certificate in {}: {e}",
            cfg.key.display(),
            cfg.cert.display()
        ),
    }
}

fn verify_own_chain(
    chain: &[CertificateDer<'static>],
    cas: &[BundleCa],
    provider: &CryptoProvider,
    now: SystemTime,
    cfg: &FilesConfig,
    id: &SpiffeId,
) -> anyhow::Result<()> {
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO),
    );
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
        anyhow!(
            "certificate in {} is not a valid certificate: {}",
            cfg.cert.display(),
            describe_chain_error(&e)
        )
    })?;
    let anchors = super::verifier::valid_anchors(cas, now);
    if anchors.is_empty() {
        bail!(
            "every CA in the trust bundle {} has expired (or is not valid yet); write the current bundle of trust domain {:?}",
            cfg.bundle.display(),
            id.trust_domain()
        );
    }
    let result = leaf.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        &chain[1..],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    );
    match result {
        Ok(_) => Ok(()),
        Err(e @ webpki::Error::CertExpired { .. }) => bail!(
            "certificate in {} ({id}) has {}; renew it (spiffe-helper, or `spire-agent api \
             fetch x509 -write`)",
            cfg.cert.display(),
            describe_chain_error(&e)
        ),
        Err(e @ webpki::Error::CertNotValidYet { .. }) => bail!(
            "certificate in {} ({id}) is {}; check the system clock",
            cfg.cert.display(),
            describe_chain_error(&e)
        ),
        Err(e) => bail!(
            "certificate in {} ({id}) does not chain to the trust bundle in {}: {}; the bundle \
             must hold the CA of trust domain {:?} that issued it",
            cfg.cert.display(),
            cfg.bundle.display(),
            describe_chain_error(&e),
            id.trust_domain()
        ),
    }
}

/// `(notBefore, notAfter)` of a DER certificate, if it parses.
fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.validity();
    Some((
        system_time(v.not_before.timestamp()),
        system_time(v.not_after.timestamp()),
    ))
}

fn describe_pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => {
            "a PEM section has no END line (is the file half-written?)".to_owned()
        }
        Error::IllegalSectionStart { .. } => "a malformed BEGIN line".to_owned(),
        Error::Base64Decode(_) => "invalid base64 in a PEM section".to_owned(),
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "no PEM section of the expected type".to_owned(),
        Error::SectionTooLarge => "a PEM section is too large".to_owned(),
        _ => "unparsable PEM".to_owned(),
    }
}

/// Watches the parent directories of the three files (not the files: writers replace them by
/// rename, and Kubernetes swaps a `..data` symlink). Any event but a read wakes the reloader,
/// which then compares fingerprints. Without a watcher the poll still works.
fn watch_directories(cfg: &FilesConfig, wake: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    use notify::event::{AccessKind, AccessMode, EventKind};

    let is_read = |kind: &EventKind| match kind {
        EventKind::Access(access) => *access != AccessKind::Close(AccessMode::Write),
        _ => false,
    };
    let handler = move |event: notify::Result<notify::Event>| match event {
        // Our own reads produce open/close events: ignore those, or every reload wakes itself.
        Ok(ev) if is_read(&ev.kind) => {}
        _ => wake.notify_one(),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(error) => {
            tracing::warn!(%error, "cannot watch the identity files; relying on the 2 s poll");
            return None;
        }
    };
    let mut dirs: Vec<&Path> = [&cfg.cert, &cfg.key, &cfg.bundle]
        .into_iter()
        .map(|p| match p.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Err(error) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(
                path = %dir.display(),
                %error,
                "cannot watch identity directory; relying on the 2 s poll"
            );
        }
    }
    Some(watcher)
}

/// What a reload needs, shared with the blocking thread that does it.
struct Inputs {
    cfg: FilesConfig,
    policy: PeerPolicy,
    metrics: Arc<Metrics>,
}

impl Inputs {
    fn load(&self) -> anyhow::Result<Loaded> {
        load_set(&self.cfg, &self.policy, &self.metrics, SystemTime::now())
    }
}

/// `(len, mtime, dev, inode)` of each file (following symlinks), `None` where stat fails.
type FileStamp = Option<(u64, Option<SystemTime>, u64, u64)>;
type Fingerprint = [FileStamp; 3];

fn stamp(path: &Path) -> FileStamp {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (dev, ino) = {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino())
    };
    #[cfg(not(unix))]
    let (dev, ino) = (0, 0);
    Some((meta.len(), meta.modified().ok(), dev, ino))
}

/// The published identity and the bookkeeping around it.
struct Current {
    identity: Arc<Identity>,
    material: (Vec<u8>, Vec<u8>),
    not_before: SystemTime,
    warned_expiry: bool,
}

/// The watcher task's state.
struct Reloader {
    inputs: Arc<Inputs>,
    tx: watch::Sender<Option<Arc<Identity>>>,
    current: Option<Current>,
    /// The fingerprint of the files at the last load attempt.
    seen: Option<Fingerprint>,
    /// The last load error, so an unchanged failure is not logged every poll.
    last_error: Option<String>,
}

enum Wake {
    Cancelled,
    Closed,
    Event,
    Poll,
    Expiry,
}

impl Reloader {
    async fn run(
        mut self,
        // Held for its lifetime: dropping it stops the notifications.
        _watcher: Option<notify::RecommendedWatcher>,
        wake: Arc<Notify>,
        cancel: CancellationToken,
    ) {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await; // the first tick is immediate; the first load already happened
        loop {
            let until_expiry = self.current.as_ref().map(|c| {
                c.identity
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            });
            let woke = tokio::select! {
                _ = cancel.cancelled() => Wake::Cancelled,
                _ = self.tx.closed() => Wake::Closed,
                _ = wake.notified() => Wake::Event,
                _ = poll.tick() => Wake::Poll,
                _ = sleep_or_forever(until_expiry) => Wake::Expiry,
            };
            match woke {
                Wake::Cancelled | Wake::Closed => return,
                Wake::Event => {
                    debounce(&wake).await;
                    self.check().await;
                }
                Wake::Poll => {
                    self.expire_if_due();
                    self.warn_if_expiring();
                    self.check().await;
                }
                Wake::Expiry => self.expire_if_due(),
            }
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        let cfg = &self.inputs.cfg;
        [stamp(&cfg.cert), stamp(&cfg.key), stamp(&cfg.bundle)]
    }

    /// Reloads when the files changed, or every time while there is no identity (a not-yet-valid
    /// certificate becomes valid without any file changing).
    async fn check(&mut self) {
        let fingerprint = self.fingerprint();
        if self.current.is_some() && self.seen.as_ref() == Some(&fingerprint) {
            return;
        }
        let inputs = Arc::clone(&self.inputs);
        let result = match tokio::task::spawn_blocking(move || inputs.load()).await {
            Ok(result) => result,
            Err(join_error) => Err(anyhow!("identity reload task failed: {join_error}")),
        };
        self.apply(fingerprint, result);
    }

    fn apply(&mut self, fingerprint: Fingerprint, result: anyhow::Result<Loaded>) {
        let changed = self.seen.as_ref() != Some(&fingerprint);
        self.seen = Some(fingerprint);
        match result {
            Ok(loaded) => {
                self.last_error = None;
                if self
                    .current
                    .as_ref()
                    .is_some_and(|c| c.material == loaded.material)
                {
                    return; // rewritten with the same content: keep the HTTP client
                }
                self.publish(loaded);
            }
            Err(error) => {
                let message = format!("{error:#}");
                let repeated = self.last_error.as_deref() == Some(message.as_str());
                if changed || !repeated {
                    self.inputs.metrics.identity_reload_errors.inc();
                }
                match &self.current {
                    Some(current) if !repeated => tracing::warn!(
                        spiffe_id = %current.identity.spiffe_id,
                        serial = %current.identity.serial_hex,
                        "rejected identity update from files, keeping the previous identity: \
                         {message}"
                    ),
                    None if !repeated => tracing::error!(
                        "no usable identity from files, not ready; retrying when they change: \
                         {message}"
                    ),
                    _ => tracing::debug!("identity files still rejected: {message}"),
                }
                self.last_error = Some(message);
            }
        }
    }

    fn publish(&mut self, loaded: Loaded) {
        let identity = Arc::new(loaded.identity);
        tracing::info!(
            spiffe_id = %identity.spiffe_id,
            serial = %identity.serial_hex,
            not_after = %humantime::format_rfc3339_seconds(identity.not_after),
            "loaded identity from files"
        );
        let metrics = &self.inputs.metrics;
        metrics
            .identity_not_after
            .set(unix_seconds(identity.not_after));
        metrics.identity_reloads.inc();
        self.current = Some(Current {
            identity: Arc::clone(&identity),
            material: loaded.material,
            not_before: loaded.not_before,
            warned_expiry: false,
        });
        self.tx.send_replace(Some(identity));
    }

    /// Withdraws an expired identity: better not ready than handshakes that fail or, worse, a
    /// peer that does not check expiry.
    fn expire_if_due(&mut self) {
        let Some(current) = &self.current else {
            return;
        };
        if SystemTime::now() < current.identity.not_after {
            return;
        }
        tracing::error!(
            spiffe_id = %current.identity.spiffe_id,
            serial = %current.identity.serial_hex,
            "identity expired at {} and {} holds no valid replacement; not ready until the \
             files are renewed",
            humantime::format_rfc3339_seconds(current.identity.not_after),
            self.inputs.cfg.cert.display()
        );
        self.current = None;
        self.tx.send_replace(None);
    }

    fn warn_if_expiring(&mut self) {
        let Some(current) = &mut self.current else {
            return;
        };
        let Ok(lifetime) = current
            .identity
            .not_after
            .duration_since(current.not_before)
        else {
            return;
        };
        let warn_at = current.not_before + lifetime.mul_f64(EXPIRY_WARNING_FRACTION);
        if current.warned_expiry || SystemTime::now() < warn_at {
            return;
        }
        current.warned_expiry = true;
        tracing::warn!(
            spiffe_id = %current.identity.spiffe_id,
            serial = %current.identity.serial_hex,
            "identity expires at {} and {} has not been renewed; is spiffe-helper running?",
            humantime::format_rfc3339_seconds(current.identity.not_after),
            self.inputs.cfg.cert.display()
        );
    }
}

/// Waits out a burst of events: returns after `DEBOUNCE` of quiet, or `MAX_DEBOUNCE` at most.
async fn debounce(wake: &Notify) {
    let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
    loop {
        tokio::select! {
            _ = wake.notified() => {
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
            }
            _ = tokio::time::sleep(DEBOUNCE) => return,
        }
    }
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::pki::{Ca, Leaf};
    use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{RootCertStore, ServerConfig};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const WAIT: Duration = Duration::from_secs(15);

    struct Fixture {
        dir: tempfile::TempDir,
        ca: Ca,
        cfg: FilesConfig,
        policy: PeerPolicy,
        metrics: Arc<Metrics>,
    }

    impl Fixture {
        /// A directory holding a valid SVID set for `spiffe://example.org/ztail`.
        fn new() -> (Fixture, Leaf) {
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::new("example.org");
            let bundle = ca.write_bundle(dir.path(), "bundle");
            let leaf = ca.issue("spiffe://example.org/ztail");
            let (cert, key) = leaf.write(dir.path(), "svid");
            let fixture = Fixture {
                dir,
                ca,
                cfg: FilesConfig { cert, key, bundle },
                policy: PeerPolicy::new(vec!["spiffe://example.org/loki".into()], vec![], vec![])
                    .unwrap(),
                metrics: Arc::new(Metrics::new()),
            };
            (fixture, leaf)
        }

        fn load(&self) -> anyhow::Result<Identity> {
            load(&self.cfg, &self.policy, &self.metrics)
        }

        /// Replaces a file by rename, as spiffe-helper and pki.rs do.
        fn replace(&self, path: &Path, contents: &str) {
            let tmp = self.dir.path().join(".replacing.tmp");
            std::fs::write(&tmp, contents).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }

    fn err_text(result: anyhow::Result<Identity>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn load_accepts_a_valid_set() {
        let (f, leaf) = Fixture::new();
        let identity = f.load().unwrap();
        assert_eq!(identity.spiffe_id.to_string(), "spiffe://example.org/ztail");
        assert_eq!(identity.serial_hex, leaf.serial_hex);
        assert!(identity.not_after > SystemTime::now());
        assert!(!identity.client_config.enable_sni);
        assert!(identity.client_config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn load_rejects_a_key_that_does_not_match() {
        let (f, _) = Fixture::new();
        let other = f.ca.issue("spiffe://example.org/ztail");
        f.replace(&f.cfg.key, &other.key_pem);
        let err = err_text(f.load());
        assert!(err.contains("does not match"), "{err}");
        assert!(err.contains(&*f.cfg.key.to_string_lossy()), "{err}");
        assert!(err.contains(&*f.cfg.cert.to_string_lossy()), "{err}");
        assert!(!err.contains("PRIVATE KEY-----"), "{err}");
    }

    #[test]
    fn load_rejects_a_certificate_from_another_ca() {
        let (f, _) = Fixture::new();
        let rogue = Ca::new("example.org").issue("spiffe://example.org/ztail");
        rogue.write(f.dir.path(), "svid");
        let err = err_text(f.load());
        assert!(err.contains("does not chain to the trust bundle"), "{err}");
        assert!(err.contains(&*f.cfg.cert.to_string_lossy()), "{err}");
        assert!(err.contains(&*f.cfg.bundle.to_string_lossy()), "{err}");
    }

    #[test]
    fn load_rejects_expired_invalid_and_unparsable_material() {
        let (f, _) = Fixture::new();
        f.ca.issue_expired("spiffe://example.org/ztail")
            .write(f.dir.path(), "svid");
        let err = err_text(f.load());
        assert!(err.contains("has expired at"), "{err}");

        f.ca.issue_ca_flagged("spiffe://example.org/ztail")
            .write(f.dir.path(), "svid");
        let err = err_text(f.load());
        assert!(err.contains("is not a valid X509-SVID"), "{err}");

        f.ca.issue("spiffe://example.org/ztail")
            .write(f.dir.path(), "svid");
        f.replace(&f.cfg.cert, "-----BEGIN CERTIFICATE-----\nMIIB");
        let err = err_text(f.load());
        assert!(err.contains("unparsable PEM in certificate file"), "{err}");
        assert!(err.contains("half-written"), "{err}");

        f.replace(&f.cfg.cert, "");
        let err = err_text(f.load());
        assert!(err.contains("no CERTIFICATE block"), "{err}");

        f.ca.issue("spiffe://example.org/ztail")
            .write(f.dir.path(), "svid");
        f.replace(&f.cfg.key, "nothing here");
        let err = err_text(f.load());
        assert!(err.contains("no private key in"), "{err}");

        f.ca.issue("spiffe://example.org/ztail")
            .write(f.dir.path(), "svid");
        std::fs::remove_file(&f.cfg.bundle).unwrap();
        let err = err_text(f.load());
        assert!(err.contains("reading trust bundle file"), "{err}");
    }

    #[test]
    fn load_rejects_a_policy_without_own_trust_domain() {
        let (mut f, _) = Fixture::new();
        f.policy = PeerPolicy::new(vec!["spiffe://other.org/loki".into()], vec![], vec![]).unwrap();
        let err = err_text(f.load());
        assert!(err.contains("federated bundles are not supported"), "{err}");
    }

    /// The built config does mutual TLS: it presents the SVID to a server that requires a client
    /// certificate from the CA, and accepts that server's allowed SVID.
    #[tokio::test]
    async fn loaded_identity_does_mutual_tls() {
        let (f, _) = Fixture::new();
        let identity = f.load().unwrap();
        let loki = f.ca.issue("spiffe://example.org/loki");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(f.ca.cert_der.clone()))
            .unwrap();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .unwrap();
        let server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(
                vec![CertificateDer::from(loki.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(loki.key_der.clone())),
            )
            .unwrap();

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let (client, server) = tokio::join!(
            TlsConnector::from(Arc::clone(&identity.client_config)).connect(name, client_io),
            TlsAcceptor::from(Arc::new(server)).accept(server_io),
        );
        client.unwrap();
        let server = server.unwrap();
        let presented = server.get_ref().1.peer_certificates().unwrap();
        let (id, _, serial) = svid_info(&presented[0]).unwrap();
        assert_eq!(id, identity.spiffe_id);
        assert_eq!(serial, identity.serial_hex);
    }

    async fn wait_for_serial(rx: &mut IdentityWatch, serial: &str) {
        tokio::time::timeout(
            WAIT,
            rx.wait_for(|id| id.as_ref().is_some_and(|id| id.serial_hex == serial)),
        )
        .await
        .unwrap_or_else(|_| panic!("identity with serial {serial} not published"))
        .unwrap();
    }

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        tokio::time::timeout(WAIT, async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test]
    async fn spawn_republishes_replaced_files_and_keeps_the_last_good_identity() {
        let (f, first) = Fixture::new();
        let cancel = CancellationToken::new();
        let mut rx = spawn(
            f.cfg.clone(),
            f.policy.clone(),
            Arc::clone(&f.metrics),
            cancel.clone(),
        );
        // The first load is synchronous.
        assert_eq!(
            rx.borrow_and_update().as_ref().unwrap().serial_hex,
            first.serial_hex
        );
        assert_eq!(f.metrics.identity_reloads.get(), 1);

        // A rotation: certificate renamed into place, then the key (briefly mismatched).
        let second = f.ca.issue("spiffe://example.org/ztail");
        second.write(f.dir.path(), "svid");
        wait_for_serial(&mut rx, &second.serial_hex).await;
        let published = rx.borrow_and_update().clone().unwrap();
        let not_after = unix_seconds(published.not_after);
        assert_eq!(f.metrics.identity_not_after.get(), not_after);

        // A broken certificate is rejected and counted; the second identity stays.
        let errors_before = f.metrics.identity_reload_errors.get();
        f.replace(&f.cfg.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n");
        wait_until("the broken certificate to be rejected", || {
            f.metrics.identity_reload_errors.get() > errors_before
        })
        .await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow().as_ref().unwrap().serial_hex, second.serial_hex);

        // A certificate from another CA is rejected too.
        let errors_before = f.metrics.identity_reload_errors.get();
        Ca::new("example.org")
            .issue("spiffe://example.org/ztail")
            .write(f.dir.path(), "svid");
        wait_until("the foreign certificate to be rejected", || {
            f.metrics.identity_reload_errors.get() > errors_before
        })
        .await;
        assert_eq!(rx.borrow().as_ref().unwrap().serial_hex, second.serial_hex);

        // And a good set after that is published.
        let third = f.ca.issue("spiffe://example.org/ztail");
        third.write(f.dir.path(), "svid");
        wait_for_serial(&mut rx, &third.serial_hex).await;
        cancel.cancel();
    }

    #[tokio::test]
    async fn spawn_starts_not_ready_and_recovers() {
        let (f, _) = Fixture::new();
        f.replace(
            &f.cfg.key,
            &f.ca.issue("spiffe://example.org/ztail").key_pem,
        );
        let cancel = CancellationToken::new();
        let mut rx = spawn(
            f.cfg.clone(),
            f.policy.clone(),
            Arc::clone(&f.metrics),
            cancel.clone(),
        );
        assert!(rx.borrow_and_update().is_none());
        assert_eq!(f.metrics.identity_reload_errors.get(), 1);

        let good = f.ca.issue("spiffe://example.org/ztail");
        good.write(f.dir.path(), "svid");
        wait_for_serial(&mut rx, &good.serial_hex).await;
        cancel.cancel();
    }

    fn reloader(f: &Fixture) -> (Reloader, IdentityWatch) {
        let (tx, rx) = watch::channel(None);
        let reloader = Reloader {
            inputs: Arc::new(Inputs {
                cfg: f.cfg.clone(),
                policy: f.policy.clone(),
                metrics: Arc::clone(&f.metrics),
            }),
            tx,
            current: None,
            seen: None,
            last_error: None,
        };
        (reloader, rx)
    }

    /// The poll path alone (no inotify): a reload happens when the fingerprint changes, and a
    /// publish only when the material does.
    #[tokio::test]
    async fn poll_reloads_on_changed_files_and_publishes_only_new_material() {
        let (f, first) = Fixture::new();
        let (mut reloader, mut rx) = reloader(&f);
        reloader.check().await;
        assert_eq!(
            rx.borrow_and_update().as_ref().unwrap().serial_hex,
            first.serial_hex
        );
        assert_eq!(f.metrics.identity_reloads.get(), 1);

        reloader.check().await;
        f.replace(&f.cfg.cert, &first.cert_pem); // same content, new inode
        reloader.check().await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(f.metrics.identity_reloads.get(), 1);

        let second = f.ca.issue("spiffe://example.org/ztail");
        second.write(f.dir.path(), "svid");
        reloader.check().await;
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update().as_ref().unwrap().serial_hex,
            second.serial_hex
        );
        assert_eq!(f.metrics.identity_reloads.get(), 2);
        assert_eq!(f.metrics.identity_reload_errors.get(), 0);
    }

    #[tokio::test]
    async fn expired_identity_is_withdrawn() {
        let (f, _) = Fixture::new();
        let (mut reloader, rx) = reloader(&f);
        let fingerprint = reloader.fingerprint();
        let mut loaded = reloader.inputs.load().unwrap();
        loaded.identity.not_after = SystemTime::now() - Duration::from_secs(1);
        reloader.apply(fingerprint, Ok(loaded));
        assert!(rx.borrow().is_some());
        reloader.expire_if_due();
        assert!(rx.borrow().is_none());
        assert!(reloader.current.is_none());
    }
}
