//! Running probes: one task per probe on its own interval (start offsets spread over the
//! interval), attempts bounded by the timeout to the millisecond (connect, TLS handshake and
//! response all inside it), results spooled and recorded in metrics and `/status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::spool::Spool;
use super::{Check, LastResults, ProbeConfig, ProbeResult, Tls};
use crate::identity::{Identity, IdentityWatch, Refusal};
use crate::metrics::Metrics;
use crate::pipeline::lock;

/// The last result of every probe, for `/status`.
#[derive(Default)]
pub struct ProbeStatus {
    pub last: LastResults,
}

impl ProbeStatus {
    pub fn results(&self) -> Vec<ProbeResult> {
        lock(&self.last).values().cloned().collect()
    }
}

/// Starts every probe; they stop when `cancel` is cancelled.
pub fn spawn(
    probes: Vec<ProbeConfig>,
    state_dir: &std::path::Path,
    identity: IdentityWatch,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> std::io::Result<Arc<ProbeStatus>> {
    let status = Arc::new(ProbeStatus {
        last: Arc::new(Mutex::new(BTreeMap::new())),
    });
    for probe in probes {
        let spool = Spool::new(probe.spool_path(state_dir))?;
        let runner = Runner {
            probe,
            spool,
            identity: identity.clone(),
            metrics: metrics.clone(),
            status: status.clone(),
            tls_cache: None,
            reuse: None,
        };
        tasks.spawn(runner.run(cancel.clone()));
    }
    Ok(status)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

struct Runner {
    probe: ProbeConfig,
    spool: Spool,
    identity: IdentityWatch,
    metrics: Arc<Metrics>,
    status: Arc<ProbeStatus>,
    /// The TLS config for the current identity (rebuilt when it changes).
    tls_cache: Option<(Arc<Identity>, Arc<rustls::ClientConfig>)>,
    /// A kept connection when `reuse_connections` is on.
    reuse: Option<(Sender, Option<String>)>,
}

/// Why an attempt failed.
struct Failure {
    kind: &'static str,
    status: Option<u16>,
    detail: String,
}

fn fail(kind: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        kind,
        status: None,
        detail: detail.into(),
    }
}

impl Runner {
    async fn run(mut self, cancel: CancellationToken) {
        // Spread start times over the interval (stable per name) so many probes do not fire in
        // the same millisecond.
        let offset = self
            .probe
            .interval
            .mul_f64((hash(&self.probe.name) % 1000) as f64 / 1000.0);
        let start = tokio::time::Instant::now() + offset;
        let mut ticks = tokio::time::interval_at(start, self.probe.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = cancel.cancelled() => return,
            }
            // A probe under way when ztail stops or reloads is abandoned: nothing is written to
            // its spool after that (the next plane's probe opens it again).
            let result = tokio::select! {
                r = self.run_once() => r,
                _ = cancel.cancelled() => return,
            };
            self.record(result);
        }
    }

    async fn run_once(&mut self) -> ProbeResult {
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut attempts = 0;
        let (outcome, latency) = loop {
            attempts += 1;
            let started = Instant::now();
            let outcome = match tokio::time::timeout(self.probe.timeout, self.attempt()).await {
                Ok(o) => o,
                Err(_) => {
                    self.reuse = None;
                    Err(fail(
                        "timeout",
                        format!("no answer within {:?}", self.probe.timeout),
                    ))
                }
            };
            let latency = started.elapsed();
            if outcome.is_ok() || attempts >= self.probe.attempts {
                break (outcome, latency);
            }
            tokio::time::sleep(self.probe.backoff.after(attempts)).await;
        };
        let (ok, status, error, peer) = match outcome {
            Ok((status, peer)) => (true, status, None, peer),
            Err(f) => {
                tracing::debug!(probe = %self.probe.name, kind = f.kind, detail = %f.detail, "probe attempt failed");
                (false, f.status, Some(f.kind.to_owned()), None)
            }
        };
        ProbeResult {
            ts,
            probe: self.probe.name.clone(),
            kind: self.probe.kind,
            target: self.probe.target.clone(),
            ok,
            attempts,
            status,
            error,
            latency_ms: (latency.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            peer_spiffe_id: peer,
        }
    }

    fn record(&mut self, r: ProbeResult) {
        let name = &self.probe.name;
        self.metrics.probe_finished(
            name,
            r.ok,
            r.attempts,
            r.latency_ms / 1000.0,
            r.error.as_deref(),
        );
        // Serializing plain fields cannot fail.
        let line = serde_json::to_string(&r).unwrap_or_default();
        if let Err(e) = self.spool.append(&line) {
            tracing::error!(probe = %name, error = %e, "cannot write a probe result to the spool; it is lost");
        }
        lock(&self.status.last).insert(name.clone(), r);
    }

    /// One attempt: Ok((HTTP status, peer SPIFFE ID)).
    async fn attempt(&mut self) -> Result<(Option<u16>, Option<String>), Failure> {
        let tls = self.tls_config()?;
        match self.probe.check.clone() {
            Check::Tcp { host, port } => {
                let tcp = connect(&host, port).await?;
                match tls {
                    Some(cfg) => {
                        let (_, peer) = handshake(cfg, &host, tcp).await?;
                        Ok((None, peer))
                    }
                    None => Ok((None, None)),
                }
            }
            Check::Http {
                url,
                host,
                port,
                method,
                expect_status,
                expect_body,
                headers,
            } => {
                let (mut sender, peer) = match self.reuse.take() {
                    Some((s, peer)) if s.is_ready() => (s, peer),
                    _ => {
                        let tcp = connect(&host, port).await?;
                        match tls {
                            Some(cfg) => {
                                let (stream, peer) = handshake(cfg, &host, tcp).await?;
                                (http_handshake(stream).await?, peer)
                            }
                            None => (http_handshake(tcp).await?, None),
                        }
                    }
                };
                let mut req = hyper::Request::builder()
                    .method(method)
                    .uri(
                        url.path().to_owned()
                            + url
                                .query()
                                .map(|q| format!("?{q}"))
                                .as_deref()
                                .unwrap_or(""),
                    )
                    .header(hyper::header::HOST, url.host_str().unwrap_or(&host))
                    .header(
                        hyper::header::USER_AGENT,
                        concat!("ztail-probe/", env!("CARGO_PKG_VERSION")),
                    );
                if !self.probe.reuse_connections {
                    req = req.header(hyper::header::CONNECTION, "close");
                }
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let req = req
                    .body(Empty::new())
                    .map_err(|e| fail("http_error", e.to_string()))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| fail("http_error", e.to_string()))?;
                let status = resp.status().as_u16();
                let body_ok = match &expect_body {
                    None => true,
                    Some(want) => {
                        let body = resp
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| fail("http_error", e.to_string()))?
                            .to_bytes();
                        String::from_utf8_lossy(&body).contains(want.as_str())
                    }
                };
                if self.probe.reuse_connections {
                    self.reuse = Some((sender, peer.clone()));
                }
                if !expect_status.iter().any(|r| r.contains(&status)) {
                    return Err(Failure {
                        kind: "status_mismatch",
                        status: Some(status),
                        detail: format!("status {status}"),
                    });
                }
                if !body_ok {
                    return Err(Failure {
                        kind: "body_mismatch",
                        status: Some(status),
                        detail: "body does not contain the expected text".into(),
                    });
                }
                Ok((Some(status), peer))
            }
        }
    }

    /// The TLS client config for this probe, if it uses TLS.
    fn tls_config(&mut self) -> Result<Option<Arc<rustls::ClientConfig>>, Failure> {
        match &self.probe.tls {
            None => Ok(None),
            Some(Tls::Server(cfg)) => Ok(Some(cfg.clone())),
            Some(Tls::Spiffe(policy)) => {
                let Some(id) = self.identity.borrow().clone() else {
                    return Err(fail("tls_error", "no SVID yet: waiting for identity"));
                };
                if let Some((cur, cfg)) = &self.tls_cache
                    && Arc::ptr_eq(cur, &id)
                {
                    return Ok(Some(cfg.clone()));
                }
                let cfg = Arc::new((id.tls_for)(policy).map_err(|e| fail("tls_error", e))?);
                self.reuse = None; // no connection outlives the SVID it was made with
                self.tls_cache = Some((id, cfg.clone()));
                Ok(Some(cfg))
            }
        }
    }
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, Failure> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| fail("dns", format!("cannot resolve {host}: {e}")))?;
    let addr = addrs
        .next()
        .ok_or_else(|| fail("dns", format!("{host} has no address")))?;
    TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => fail("refused", e.to_string()),
        _ => fail("connect_error", e.to_string()),
    })
}

async fn handshake(
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Option<String>), Failure> {
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| fail("tls_error", format!("invalid server name {host}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            let refused = Refusal::find_in(&e).is_some()
                || e.get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|tls| match tls {
                        rustls::Error::InvalidCertificate(_) => true,
                        rustls::Error::Other(o) => {
                            o.0.downcast_ref::<spiffe_rustls::Error>().is_some()
                        }
                        _ => false,
                    });
            fail(
                if refused {
                    "tls_peer_refused"
                } else {
                    "tls_error"
                },
                e.to_string(),
            )
        })?;
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| crate::identity::verifier::svid_info(leaf.as_ref()).ok())
        .map(|(id, _, _)| id.to_string());
    Ok((stream, peer))
}

async fn http_handshake<S>(stream: S) -> Result<Sender, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail("http_error", e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn hash(s: &str) -> u64 {
    crate::tail::reader::hash(s.as_bytes())
}
