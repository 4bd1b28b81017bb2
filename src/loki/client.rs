//! Sends batches to Loki and acts on the answer (design §4):
//! 2xx ⇒ acknowledge; 429, 5xx, other 4xx and transport or TLS errors ⇒ retry the same bytes with
//! jittered exponential backoff, honouring `Retry-After`, for as long as it takes (the data is on
//! disk); a 400 that carries Loki's per-stream validation errors ⇒ Loki stored the valid part:
//! log its reason, count the drops, acknowledge; any other 400 (a body Loki could not decode, a
//! proxy's error page) ⇒ nothing was stored: retried like a 5xx; 413 ⇒ split and resend.
//! Redirects are never followed: a 3xx is a failed push, not an acknowledgement (following one
//! would turn the POST into a body-less GET whose 200 proves nothing was stored).
//!
//! No proxy is taken from the environment (`HTTPS_PROXY`, `ALL_PROXY`): only `sink.proxy`.
//!
//! The HTTP client is rebuilt whenever the identity changes, so no pooled connection outlives
//! the SVID (or trust bundle) it was established with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::encode;
use crate::identity::{Identity, IdentityWatch, Refusal};
use crate::loki::config::{BodyFormat, Compression, SinkConfig};
use crate::metrics::Metrics;
use crate::pipeline::ack::AckTracker;
use crate::pipeline::{Batch, lock};

const USER_AGENT: &str = concat!("ztail/", env!("CARGO_PKG_VERSION"));

/// Settings the sink needs from [`SinkConfig`].
#[derive(Debug, Clone)]
pub struct SinkSettings {
    pub name: String,
    /// The peer policy, when it is not the one the identity's client config carries.
    pub policy: Option<crate::identity::PeerPolicy>,
    pub url: reqwest::Url,
    pub tenant: Option<String>,
    pub body: BodyFormat,
    pub compression: Compression,
    pub timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub provenance: bool,
    pub proxy: Option<reqwest::Url>,
    /// Tenants bound to peers (see [`SinkConfig::tenants`]).
    pub tenants: Option<std::collections::BTreeMap<String, crate::identity::PeerPolicy>>,
}

impl From<&SinkConfig> for SinkSettings {
    fn from(c: &SinkConfig) -> Self {
        SinkSettings {
            name: c.name.clone(),
            policy: None,
            url: c.url.clone(),
            tenant: c.tenant.clone(),
            body: c.body,
            compression: c.compression,
            timeout: c.timeout,
            min_backoff: c.min_backoff,
            max_backoff: c.max_backoff,
            provenance: c.provenance,
            proxy: c.proxy.clone(),
            tenants: c.tenants.clone(),
        }
    }
}

/// What the sink reports to `/readyz` and `/status`.
#[derive(Debug, Default)]
pub struct SinkState {
    pub consecutive_failures: AtomicU64,
    pub last_success_unix: AtomicI64,
    pub last_error: Mutex<Option<String>>,
    pub requests_ok: AtomicU64,
}

impl SinkState {
    fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.last_success_unix
            .store(crate::pipeline::unix_seconds(), Ordering::Relaxed);
        self.requests_ok.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self, error: String) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(error);
    }

    /// True when the last push attempt failed.
    pub fn is_failing(&self) -> bool {
        self.consecutive_failures.load(Ordering::Relaxed) > 0
    }
}

/// HTTP clients by bound tenant (`None`: the sink's own peer policy).
type Clients = HashMap<Option<String>, reqwest::Client>;

/// The Loki push client.
pub struct Sink {
    settings: SinkSettings,
    identity: IdentityWatch,
    metrics: Arc<Metrics>,
    tracker: Arc<AckTracker>,
    pub state: SinkState,
    /// `ztail_sink_entries_sent_total` and `ztail_sink_failing` of this sink.
    sent: prometheus_client::metrics::counter::Counter,
    failing: prometheus_client::metrics::gauge::Gauge,
    /// The HTTP clients of the current identity, one per bound tenant (one, `None`, without).
    client: Mutex<Option<(Arc<Identity>, Clients)>>,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// One request is encoded per core at a time: more would not be faster, and would only
    /// take blocking-pool threads from file reads.
    encoders: tokio::sync::Semaphore,
}

enum Outcome {
    Stored,
    /// 400: Loki kept the valid part and refused the rest for good.
    Refused {
        reason: &'static str,
        entries: u64,
    },
    TooLarge,
    Stopped,
}

impl Sink {
    pub fn new(
        settings: SinkSettings,
        identity: IdentityWatch,
        metrics: Arc<Metrics>,
        tracker: Arc<AckTracker>,
    ) -> Self {
        let sent = metrics.sink_sent(&settings.name);
        let failing = metrics.sink_failing(&settings.name);
        Sink {
            settings,
            sent,
            failing,
            identity,
            metrics,
            tracker,
            state: SinkState::default(),
            client: Mutex::new(None),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            encoders: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
        }
    }

    /// Delivers a batch in the background; the permit is held until it is delivered (or the
    /// sink is stopped), which bounds the number of batches in flight.
    pub fn spawn_send(self: Arc<Self>, seq: u64, batch: Batch, permit: OwnedSemaphorePermit) {
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            let _permit = permit;
            self.metrics.in_flight_requests.inc();
            if self.deliver(batch).await {
                self.tracker.ack(seq);
            }
            self.metrics.in_flight_requests.dec();
        });
    }

    /// The sink's name (`default` for the `[sink]` table).
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Waits for every delivery to finish.
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Abandons deliveries still retrying (at the end of the shutdown timeout). Their positions
    /// stay unacknowledged, so the lines are read again after a restart.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Builds a batch's body on the blocking pool: compressing a megabyte would hold a runtime
    /// worker for milliseconds, and reads, probes and `/healthz` would wait behind it. `None`
    /// if the runtime shut down first.
    async fn encode(&self, part: Batch, agent_id: &Option<Arc<str>>) -> Option<(Batch, Vec<u8>)> {
        let _permit = self.encoders.acquire().await.ok()?;
        let (format, compression) = (self.settings.body, self.settings.compression);
        let agent_id = agent_id.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            let agent_id = agent_id.as_deref();
            let body = match (format, compression) {
                (BodyFormat::Protobuf, Compression::Snappy) => encode::protobuf(&part, agent_id),
                (BodyFormat::Protobuf, Compression::None) => {
                    encode::protobuf_stored(&part, agent_id)
                }
                (BodyFormat::Json, _) => encode::json(&part, agent_id),
            };
            (part, body)
        })
        .await;
        match encoded {
            Ok(v) => Some(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }

    async fn deliver(&self, batch: Batch) -> bool {
        // The ID stamped on a batch is the one about to authenticate it (rotation renews the
        // SVID, not the ID).
        let agent_id = match self.settings.provenance {
            true => match self.await_identity(&mut self.identity.clone()).await {
                Some(id) => Some(id.spiffe_id.to_string()),
                None => return false,
            },
            false => None,
        };
        let agent_id: Option<Arc<str>> = agent_id.map(Into::into);
        let mut parts = vec![batch];
        while let Some(part) = parts.pop() {
            let Some((part, body)) = self.encode(part, &agent_id).await else {
                return false;
            };
            let body_len = body.len() as u64;
            let tenant = part.tenant.as_deref().or(self.settings.tenant.as_deref());
            match self.push(bytes::Bytes::from(body), tenant).await {
                Outcome::Stored => {
                    self.metrics.entries_sent.inc_by(part.entries as u64);
                    self.sent.inc_by(part.entries as u64);
                    self.metrics.bytes_sent.inc_by(body_len);
                }
                Outcome::Refused { reason, entries } => {
                    let refused = entries.min(part.entries as u64);
                    self.metrics.dropped(reason, refused);
                    self.metrics
                        .entries_sent
                        .inc_by(part.entries as u64 - refused);
                    self.sent.inc_by(part.entries as u64 - refused);
                }
                Outcome::TooLarge => match part.split() {
                    Ok((first, second)) => {
                        tracing::info!(
                            entries = first.entries + second.entries,
                            "Loki answered 413 (request too large): splitting the batch"
                        );
                        parts.push(second);
                        parts.push(first);
                    }
                    Err(single) => {
                        tracing::error!(
                            bytes = single.line_bytes,
                            "Loki refuses even a single-entry request as too large (413): dropping the entry; raise Loki's distributor.max-recv-msg-size or lower max_line_bytes"
                        );
                        self.metrics.dropped("request_too_large", 1);
                    }
                },
                Outcome::Stopped => return false,
            }
        }
        true
    }

    /// The current identity, waiting (and saying so in `/status`) while there is none; `None`
    /// once the sink is stopped or the identity source is gone.
    async fn await_identity(&self, identity: &mut IdentityWatch) -> Option<Arc<Identity>> {
        loop {
            if let Some(id) = identity.borrow_and_update().clone() {
                return Some(id);
            }
            lock(&self.state.last_error).replace("waiting for identity: no valid SVID".to_owned());
            tokio::select! {
                changed = identity.changed() => changed.ok()?,
                _ = self.stop.cancelled() => return None,
            }
        }
    }

    /// Sends one body until Loki gives a final answer or the sink is stopped.
    async fn push(&self, body: bytes::Bytes, tenant: Option<&str>) -> Outcome {
        // With tenants bound to peers, a tenant bound to none is never sent (the config check
        // refuses a route that could make one; this is the last line).
        let bound = match &self.settings.tenants {
            None => None,
            Some(map) => match tenant.and_then(|t| map.get_key_value(t)) {
                Some((t, policy)) => Some((t.as_str(), policy)),
                None => {
                    tracing::error!(
                        sink = %self.settings.name,
                        tenant = tenant.unwrap_or("(none)"),
                        "a batch's tenant is not bound to a peer of this sink: not sent, dropped"
                    );
                    return Outcome::Refused {
                        reason: "tenant_not_bound",
                        entries: u64::MAX,
                    };
                }
            },
        };
        let mut identity = self.identity.clone();
        let mut attempt: u32 = 0;
        loop {
            let Some(id) = self.await_identity(&mut identity).await else {
                return Outcome::Stopped;
            };
            let mut retry_after = None;
            match self.client_for(&id, bound) {
                Err(e) => {
                    self.state
                        .failed(format!("cannot build the HTTP client: {e:#}"));
                    self.metrics.push_finished("client_error");
                }
                Ok(client) => {
                    let mut req = client
                        .post(self.settings.url.clone())
                        .header(
                            CONTENT_TYPE,
                            match self.settings.body {
                                BodyFormat::Protobuf => encode::PROTOBUF_CONTENT_TYPE,
                                BodyFormat::Json => encode::JSON_CONTENT_TYPE,
                            },
                        )
                        .body(body.clone());
                    if let Some(t) = tenant {
                        req = req.header("X-Scope-OrgID", t);
                    }
                    let result = tokio::select! {
                        r = req.send() => r,
                        _ = self.stop.cancelled() => return Outcome::Stopped,
                    };
                    match result {
                        Ok(resp) => {
                            let status = resp.status();
                            self.metrics.push_finished(status.as_str());
                            if status.is_success() {
                                self.state.succeeded();
                                self.failing.set(0);
                                return Outcome::Stored;
                            }
                            retry_after = resp
                                .headers()
                                .get(RETRY_AFTER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.trim().parse::<u64>().ok())
                                .map(Duration::from_secs);
                            let resp_location = resp
                                .headers()
                                .get(reqwest::header::LOCATION)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let text = resp.text().await.unwrap_or_default();
                            match status {
                                StatusCode::BAD_REQUEST if is_validation_answer(&text) => {
                                    self.state.succeeded();
                                    self.failing.set(0);
                                    let (reason, entries) = refusal_of(&text);
                                    tracing::warn!(
                                        reason,
                                        entries,
                                        loki_says = %first_line(&text),
                                        "Loki refused part of a push (400); it stored the rest, the refused entries are dropped"
                                    );
                                    return Outcome::Refused { reason, entries };
                                }
                                StatusCode::PAYLOAD_TOO_LARGE => return Outcome::TooLarge,
                                _ => {
                                    let msg = match status {
                                        StatusCode::BAD_REQUEST => format!(
                                            "Loki answered 400 without per-stream validation errors, so nothing was stored (a body it could not decode, or a proxy's answer): {}",
                                            first_line(&text)
                                        ),
                                        s if s.is_redirection() => format!(
                                            "Loki answered {status} (a redirect, to {:?}): redirects are never followed, point sink.url at the push endpoint itself",
                                            resp_location.as_deref().unwrap_or("nowhere")
                                        ),
                                        _ => {
                                            format!("Loki answered {status}: {}", first_line(&text))
                                        }
                                    };
                                    tracing::warn!(attempt, "{msg}; retrying");
                                    self.state.failed(msg);
                                }
                            }
                        }
                        Err(e) => {
                            let kind = error_kind(&e, &self.metrics);
                            self.metrics.push_finished(kind);
                            let msg = format!(
                                "push to {} failed ({kind}): {}",
                                self.settings.url,
                                chain(&e)
                            );
                            tracing::warn!(attempt, "{msg}; retrying");
                            self.state.failed(msg);
                            if kind == "peer_refused" {
                                // A refused peer is an alarm, not a reason to keep a pool.
                                lock(&self.client).take();
                            }
                        }
                    }
                }
            }
            attempt = attempt.saturating_add(1);
            self.failing.set(1);
            self.metrics.push_retries.inc();
            let mut delay = backoff(
                self.settings.min_backoff,
                self.settings.max_backoff,
                attempt,
            );
            if let Some(ra) = retry_after {
                delay = delay.max(ra.min(self.settings.max_backoff));
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => return Outcome::Stopped,
            }
        }
    }

    /// The HTTP client for this identity, built once per identity so that pooled connections
    /// never outlive the material they were established with.
    fn client_for(
        &self,
        id: &Arc<Identity>,
        bound: Option<(&str, &crate::identity::PeerPolicy)>,
    ) -> anyhow::Result<reqwest::Client> {
        let mut slot = lock(&self.client);
        if !slot.as_ref().is_some_and(|(cur, _)| Arc::ptr_eq(cur, id)) {
            *slot = Some((id.clone(), HashMap::new()));
        }
        let Some((_, clients)) = slot.as_mut() else {
            unreachable!("set just above")
        };
        let (key, policy) = match bound {
            Some((tenant, policy)) => (Some(tenant.to_owned()), Some(policy)),
            None => (None, self.settings.policy.as_ref()),
        };
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let tls = match policy {
            None => (*id.client_config).clone(),
            Some(policy) => match (id.tls_for)(policy) {
                Ok(c) => c,
                Err(e) => anyhow::bail!("the TLS config for this sink's peer policy: {e}"),
            },
        };
        let builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.settings.timeout)
            .connect_timeout(self.settings.timeout)
            .user_agent(USER_AGENT);
        let builder = match &self.settings.proxy {
            Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy.clone())?),
            None => builder.no_proxy(),
        };
        let client = builder.build()?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}

/// Jittered exponential backoff: a delay in [min·2ⁿ⁻¹, min·2ⁿ), capped at max.
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let base = min.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let jittered = base + base.mul_f64(fastrand::f64());
    jittered.min(max)
}

/// Whether a 400's body is Loki's answer to per-stream validation (it stored the valid part)
/// rather than a refusal of the whole request. Loki's validation errors name the stream they
/// refused ("entry for stream '{...}' has timestamp too old", "stream '{...}' has label name too
/// long", "Max entry size ... for stream '{...}'") or end in "total ignored: N out of M"; a body
/// that did not decode, a missing header or a proxy's HTML page names no stream.
fn is_validation_answer(body: &str) -> bool {
    !body.trim_start().starts_with('<') && body.lines().any(is_validation_line)
}

/// One of Loki's per-stream validation errors (or its "total ignored" summary).
fn is_validation_line(line: &str) -> bool {
    const MARKS: [&str; 5] = [
        "for stream '",
        "stream '{",
        "for stream: {",
        "total ignored:",
        "at least one label pair is required per stream",
    ];
    let line = line.to_ascii_lowercase();
    MARKS.iter().any(|mark| line.contains(mark))
}

/// Loki's reason for a 400 and how many entries it refused. Loki lists one error per line and
/// may end with "total ignored: N out of M".
fn refusal_of(body: &str) -> (&'static str, u64) {
    const REASONS: [(&str, &str); 10] = [
        ("line_too_long", "line_too_long"),
        ("max entry size", "line_too_long"),
        ("too far behind", "too_far_behind"),
        ("out of order", "too_far_behind"),
        ("too old", "greater_than_max_sample_age"),
        ("greater_than_max_sample_age", "greater_than_max_sample_age"),
        ("too new", "too_far_in_future"),
        ("too_far_in_future", "too_far_in_future"),
        ("label", "invalid_labels"),
        ("structured metadata", "structured_metadata"),
    ];
    let lower = body.to_ascii_lowercase();
    let reason = REASONS
        .iter()
        .find(|(needle, _)| lower.contains(needle))
        .map(|(_, r)| *r)
        .unwrap_or("bad_request");
    let ignored = lower
        .split("total ignored:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    let entries = ignored.unwrap_or_else(|| {
        body.lines()
            .filter(|l| is_validation_line(l))
            .count()
            .max(1) as u64
    });
    (reason, entries)
}

fn first_line(text: &str) -> &str {
    let line = text.lines().next().unwrap_or("").trim();
    match line.char_indices().nth(300) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

/// A metric label for a transport error. Peer refusals found by spiffe-rustls (Workload API
/// mode) are counted here; the files-mode verifier and the policy authorizer count their own.
fn error_kind(e: &reqwest::Error, metrics: &Metrics) -> &'static str {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            if Refusal::find_in(err).is_some() {
                return "peer_refused";
            }
            match tls {
                rustls::Error::InvalidCertificate(cert) => {
                    metrics.peer_refused(match cert {
                        rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. } => "expired",
                        rustls::CertificateError::NotValidYet
                        | rustls::CertificateError::NotValidYetContext { .. } => "not_yet_valid",
                        _ => "untrusted_chain",
                    });
                    return "peer_refused";
                }
                rustls::Error::Other(other) => {
                    if let Some(spiffe) = other.0.downcast_ref::<spiffe_rustls::Error>() {
                        match spiffe {
                            // Counted (with the policy's reason) by the authorizer.
                            spiffe_rustls::Error::UnauthorizedSpiffeId(_) => {}
                            spiffe_rustls::Error::TrustDomainNotAllowed(_) => {
                                metrics.peer_refused("trust_domain_not_allowed")
                            }
                            spiffe_rustls::Error::NoBundle(_) => metrics.peer_refused("no_bundle"),
                            _ => metrics.peer_refused("invalid_svid"),
                        }
                        return "peer_refused";
                    }
                    return "tls";
                }
                _ => return "tls",
            }
        }
        src = match err.downcast_ref::<std::io::Error>() {
            // io::Error::source skips the wrapped error itself; look inside.
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

/// The error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_millis(500);
        let max = Duration::from_secs(300);
        for attempt in 1..30 {
            let d = backoff(min, max, attempt);
            let base = min.saturating_mul(1 << (attempt - 1).min(20));
            assert!(
                d >= base.min(max) && d <= (base * 2).min(max),
                "{attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn loki_400_bodies_are_classified() {
        let body = "entry for stream '{job=\"a\"}' has timestamp too old: 2020-01-01\nuser 'fake', total ignored: 3 out of 10";
        assert_eq!(refusal_of(body), ("greater_than_max_sample_age", 3));
        assert_eq!(
            refusal_of(
                "Max entry size '256' bytes exceeded for stream '{a=\"b\"}' while adding an entry with length '300' bytes"
            ),
            ("line_too_long", 1)
        );
        assert_eq!(refusal_of("weird"), ("bad_request", 1));
    }

    /// Only Loki's per-stream validation answer is a partial success; a 400 that names no
    /// stream stored nothing and must be retried.
    #[test]
    fn only_per_stream_validation_errors_are_a_partial_success() {
        for body in [
            "entry for stream '{job=\"a\"}' has timestamp too old: 2020-01-01T00:00:00Z, oldest acceptable timestamp is: 2026-11-26T00:00:00Z",
            "stream '{job=\"a\", x=\"y\"}' has label name too long: 'x'",
            "Max entry size '262144' bytes exceeded for stream '{job=\"a\"}' while adding an entry with length '300000' bytes",
            "entry with timestamp 2026-12-03 ignored, reason: 'entry out of order' for stream: {job=\"a\"},\nuser 'fake', total ignored: 1 out of 10",
            "error at least one label pair is required per stream",
            "line_too_long: line of 300 bytes exceeds the limit for stream '{job=\"a\"}'",
        ] {
            assert!(is_validation_answer(body), "{body}");
        }
        for body in [
            "",
            "<html>\r\n<head><title>400 Bad Request</title></head>\r\n<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>",
            "snappy: corrupt input",
            "failed to parse push request: proto: cannot parse invalid wire-format data",
            "Content-Encoding \"zstd\" not supported",
            "Request Header Or Cookie Too Large",
        ] {
            assert!(!is_validation_answer(body), "{body}");
        }
    }
}
