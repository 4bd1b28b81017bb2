//! The admin endpoint on loopback: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (an identity is held and the sink is not failing), `/status` (JSON),
//! and `POST /-/reload` (reload the config; refused with an `Origin` header, so a web page
//! cannot ask for it).
//!
//! It is unauthenticated by design and therefore only ever bound to a loopback address
//! (enforced at config load). It never shows key material.
//!
//! Any local user can connect, so it must not be a way to starve ztail of file descriptors or
//! tasks: at most [`MAX_CONNECTIONS`] connections are served at once (more wait in the kernel's
//! backlog, holding no descriptor of ztail's), each must send its request headers within
//! [`HEADER_TIMEOUT`], gets one answer (no keep-alive) and is closed after [`CONNECTION_TIMEOUT`]
//! whatever it does; accept errors (EMFILE) back off instead of spinning. A `Host` header must
//! name loopback (an IP address or `localhost`), so a web page cannot reach it by DNS rebinding.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::identity::IdentityWatch;
use crate::loki::client::Sink;
use crate::metrics::Metrics;
use crate::pipeline::lock;
use crate::tail::{FileStatus, Tailer};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may last, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the admin endpoint reads from, replaced at each reload.
pub struct View {
    /// At least one, in the config's order.
    pub sinks: Vec<SinkView>,
    pub identity: IdentityWatch,
    pub probes: Arc<crate::probe::ProbeStatus>,
    pub kube: Option<Arc<crate::k8s::Metadata>>,
}

/// A sink and the tailer that reads for it.
pub struct SinkView {
    pub name: String,
    pub url: String,
    pub tailer: Arc<Tailer>,
    pub sink: Arc<Sink>,
}

impl SinkView {
    fn status(&self) -> SinkStatus {
        let st = &self.sink.state;
        SinkStatus {
            name: self.name.clone(),
            url: self.url.clone(),
            failing: st.is_failing(),
            consecutive_failures: st.consecutive_failures.load(Ordering::Relaxed),
            last_error: lock(&st.last_error).clone(),
            last_success_unix: st.last_success_unix.load(Ordering::Relaxed),
            requests_ok: st.requests_ok.load(Ordering::Relaxed),
            lag_bytes: self.tailer.files().iter().map(|f| f.lag()).sum(),
        }
    }
}

/// The admin endpoint: the metrics, the running parts (a [`View`]) and the way to reload.
pub struct Admin {
    metrics: Arc<Metrics>,
    view: std::sync::Mutex<Arc<View>>,
    reload: crate::ReloadHandle,
    last_reload: std::sync::Mutex<Option<ReloadStatus>>,
}

/// The outcome of the last reload, in `/status`.
#[derive(Serialize, Clone)]
pub struct ReloadStatus {
    pub at_unix: i64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    pub ready: bool,
    pub identity: Option<IdentityStatus>,
    /// The first sink (the only one of a `[sink]` table).
    pub sink: SinkStatus,
    /// Every sink, the first one included.
    pub sinks: Vec<SinkStatus>,
    /// The files as the first sink's tailer sees them (each sink has its own positions; see
    /// `sinks[].lag_bytes`).
    pub files: Vec<FileStatus>,
    pub probes: Vec<crate::probe::ProbeResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::k8s::ApiStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadStatus>,
}

#[derive(Serialize)]
pub struct IdentityStatus {
    pub spiffe_id: String,
    pub serial: String,
    pub not_after_unix: i64,
    pub expires_in_secs: i64,
    pub bundle_trust_domains: Vec<String>,
    /// Identities published since start (the first one and every rotation or bundle update).
    pub updates: u64,
}

#[derive(Serialize)]
pub struct SinkStatus {
    pub name: String,
    pub url: String,
    pub failing: bool,
    pub consecutive_failures: u64,
    pub last_error: Option<String>,
    pub last_success_unix: i64,
    pub requests_ok: u64,
    /// Bytes of the tracked files this sink has not acknowledged yet.
    pub lag_bytes: u64,
}

impl Admin {
    pub fn new(metrics: Arc<Metrics>, view: View, reload: crate::ReloadHandle) -> Admin {
        Admin {
            metrics,
            view: std::sync::Mutex::new(Arc::new(view)),
            reload,
            last_reload: std::sync::Mutex::new(None),
        }
    }

    /// Shows the parts started by a reload.
    pub fn set_view(&self, view: View) {
        *lock(&self.view) = Arc::new(view);
    }

    /// Records a reload's outcome in `/status` and `ztail_config_reloads_total`.
    pub fn reloaded(&self, outcome: &Result<(), String>) {
        let result = if outcome.is_ok() { "ok" } else { "invalid" };
        self.metrics
            .config_reloads
            .get_or_create(&crate::metrics::ResultLabel {
                result: result.into(),
            })
            .inc();
        *lock(&self.last_reload) = Some(ReloadStatus {
            at_unix: crate::pipeline::unix_seconds(),
            ok: outcome.is_ok(),
            error: outcome.as_ref().err().cloned(),
        });
    }

    fn view(&self) -> Arc<View> {
        lock(&self.view).clone()
    }

    /// Binds the listener (so a busy port is a start-up error) and serves until cancelled.
    pub async fn bind(
        self: Arc<Self>,
        addr: SocketAddr,
        cancel: CancellationToken,
    ) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {addr} for the admin endpoint (admin.listen): {e}")
        })?;
        let local = listener.local_addr()?;
        let this = self;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(10);
            loop {
                // A slot first: while all are taken, new connections wait in the backlog.
                let slot = tokio::select! {
                    s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
                    _ = cancel.cancelled() => break,
                };
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(e) => {
                            // EMFILE and the like: retrying at once would spin a core.
                            tracing::warn!(error = %e, retry_in = ?backoff, "admin endpoint cannot accept a connection");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                            continue;
                        }
                    },
                    _ = cancel.cancelled() => break,
                };
                backoff = Duration::from_millis(10);
                let this = this.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let svc = hyper::service::service_fn(move |req| {
                        let this = this.clone();
                        async move {
                            let resp = if req.uri().path() == "/-/reload" {
                                this.handle_reload(&req).await
                            } else {
                                this.handle(&req)
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                });
            }
        });
        Ok(local)
    }

    /// `POST /-/reload`: reloads the config and answers when it is applied or refused. A
    /// request with an `Origin` header (a web page's) is refused: only a local tool may ask.
    async fn handle_reload<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if let Some(refused) = refuse_host(req) {
            return refused;
        }
        if req.method() != hyper::Method::POST {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use POST /-/reload to reload the config\n".into(),
            );
        }
        if req.headers().contains_key(hyper::header::ORIGIN) {
            return reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                "a reload is not accepted from a web page (Origin header)\n".into(),
            );
        }
        match self.reload.reload().await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "reloaded\n".into()),
            Err(why) => reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("not reloaded, the running config stays: {why}\n"),
            ),
        }
    }

    fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if let Some(refused) = refuse_host(req) {
            return refused;
        }
        match req.uri().path() {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render(),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                let (ready, why) = self.readiness();
                let code = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                reply(code, "text/plain", format!("{why}\n"))
            }
            "/status" => {
                let body = serde_json::to_string_pretty(&self.status()).unwrap_or_default();
                reply(StatusCode::OK, "application/json", body)
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics /healthz /readyz /status, or POST /-/reload\n".into(),
            ),
        }
    }

    fn readiness(&self) -> (bool, String) {
        let view = self.view();
        let id = view.identity.borrow().clone();
        match id {
            None => {
                return (
                    false,
                    "not ready: waiting for identity (no valid SVID)".into(),
                );
            }
            Some(id) if id.not_after <= SystemTime::now() => {
                return (false, format!("not ready: SVID {} expired", id.spiffe_id));
            }
            Some(_) => {}
        }
        for s in &view.sinks {
            if s.sink.state.is_failing() {
                let err = lock(&s.sink.state.last_error).clone().unwrap_or_default();
                let name = match view.sinks.len() {
                    1 => String::new(),
                    _ => format!(" {:?}", s.name),
                };
                return (false, format!("not ready: sink{name} failing: {err}"));
            }
        }
        // Missing pod metadata degrades labels, not delivery: ready, and the body says so.
        match view.kube.as_ref().and_then(|k| k.degraded()) {
            Some(why) => (true, format!("ready; {why}")),
            None => (true, "ready".into()),
        }
    }

    pub fn status(&self) -> Status {
        let now = crate::pipeline::unix_seconds();
        let view = self.view();
        let identity = view.identity.borrow().clone().map(|id| {
            let not_after = id
                .not_after
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            IdentityStatus {
                spiffe_id: id.spiffe_id.to_string(),
                serial: id.serial_hex.clone(),
                not_after_unix: not_after,
                expires_in_secs: not_after - now,
                bundle_trust_domains: id.bundle_trust_domains.clone(),
                updates: self.metrics.identity_reloads.get(),
            }
        });
        let sinks: Vec<SinkStatus> = view.sinks.iter().map(SinkView::status).collect();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            ready: self.readiness().0,
            identity,
            sink: view.sinks[0].status(),
            sinks,
            files: view.sinks[0]
                .tailer
                .files()
                .iter()
                .map(|f| f.status())
                .collect(),
            probes: view.probes.results(),
            kubernetes: view.kube.as_ref().map(|k| k.status()),
            last_reload: lock(&self.last_reload).clone(),
        }
    }
}

/// A refusal for a request whose `Host` header is not a loopback name.
fn refuse_host<B>(req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let host = req.headers().get(hyper::header::HOST)?;
    (!is_loopback_host(host.as_bytes())).then(|| {
        reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the admin endpoint answers only to loopback names (127.0.0.1, [::1], localhost)\n"
                .into(),
        )
    })
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Whether a `Host` header names loopback: an IP address (the listener is on loopback, so any
/// address that reached it is one) or `localhost`, with or without a port.
fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod host_tests {
    use super::is_loopback_host;

    #[test]
    fn only_loopback_names_are_answered() {
        for ok in [
            "127.0.0.1:9311",
            "127.0.0.1",
            "localhost:9311",
            "LOCALHOST",
            "[::1]:9311",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "evil.example:9311",
            "evil.example",
            "localhost.evil.example",
            "[evil]",
            "",
            "127.0.0.1.nip.io:80",
        ] {
            assert!(!is_loopback_host(bad.as_bytes()), "{bad}");
        }
    }
}
