//! An in-test Grafana Loki push receiver behind mutual TLS, with recording and fault injection.
//!
//! Owns: an HTTPS server on `127.0.0.1` (rustls through tokio-rustls, hyper 1 HTTP/1.1, ALPN
//! `http/1.1` only, ring provider passed explicitly, never the process default) that *requires* a
//! client certificate chaining to the configured CA(s); strict decoding of `POST
//! /loki/api/v1/push` bodies as Loki defines them (snappy-block protobuf `PushRequest`, or JSON
//! for `Content-Type: application/json`); Loki's request validation with its default limits; a
//! record of every push request (status, client certificate serial and SPIFFE ID, tenant, headers)
//! and every stored entry; scriptable faults (status codes, 429 with `Retry-After`, full and
//! partial 400s, 413, slow responses, connection resets); and `stop()`/`restart()` on the same
//! port for outage tests. `GET /ready` answers 200 like Loki.
//!
//! Does not: check the client's SPIFFE ID against a policy (it records it; tests assert on it),
//! forward to a real store, decode gzip or deflate bodies (they are answered 400, because no gzip
//! crate is a dependency), serve a query API (tests read [`Receiver::entries`] instead) or
//! deduplicate entries in [`Receiver::entries`] (see [`Receiver::distinct_entries`] for Loki's
//! view).
//!
//! Waiting: the `wait_*` helpers are woken by every recorded change (no polling) and time out on
//! the real (std) clock, and the receiver uses no tokio timers except for [`Fault::Slow`], so
//! paused tokio time (`start_paused`, which needs tokio's `test-util` feature) cannot fire a
//! timeout early.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pki::{Ca, Leaf};

/// The push endpoint path.
pub const PUSH_PATH: &str = "/loki/api/v1/push";
/// Loki's `distributor.max-recv-msg-size`: bigger bodies are answered 413.
pub const MAX_BODY_BYTES: usize = 100 << 20;
/// [`RecordedRequest::status`] of a request answered by dropping the connection ([`Fault::Reset`]).
pub const STATUS_RESET: u16 = 0;

/// How to start a [`Receiver`].
#[derive(Clone)]
pub struct ReceiverOpts {
    /// Server certificate chain, PEM, leaf first.
    pub cert_pem: String,
    /// Server private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key_pem: String,
    /// CA certificates (PEM, one or more) that client certificates must chain to.
    pub client_ca_pem: String,
    /// Port to bind on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Loki's request validation limits.
    pub limits: Limits,
    /// A ready server config (e.g. `spiffe_rustls::mtls_server` over a live SPIRE source) used
    /// instead of the PEM fields, which are then ignored.
    pub server_config: Option<Arc<ServerConfig>>,
    /// Speak TLS 1.2 only (an old proxy or Loki behind one).
    pub tls12_only: bool,
}

/// Loki's per-tenant validation limits (reference `loki-push-api.md` §5, §7). A limit set to
/// `None` is not checked.
#[derive(Clone, Debug)]
pub struct Limits {
    /// `max_line_size` (bytes): longer lines are dropped as `line_too_long`.
    pub max_line_bytes: Option<usize>,
    /// `max_label_names_per_series` (`service_name` does not count).
    pub max_label_names: Option<usize>,
    /// `max_label_name_length`.
    pub max_label_name_len: Option<usize>,
    /// `max_label_value_length`.
    pub max_label_value_len: Option<usize>,
    /// `reject_old_samples_max_age`: older entries are dropped as `greater_than_max_sample_age`.
    pub max_age: Option<Duration>,
    /// `creation_grace_period`: entries further in the future are dropped as
    /// `too_far_in_future`.
    pub future_grace: Option<Duration>,
}

/// A scripted reaction to one push request (see [`Receiver::push_faults`]).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status code and a short text body; store nothing.
    Status(u16),
    /// Answer 429 with `Retry-After: <retry_after_secs>` and Loki's rate-limit text; store nothing.
    TooManyRequests {
        /// Value of the `Retry-After` header, in seconds.
        retry_after_secs: u64,
    },
    /// Answer 400 with `reason` as the body; store nothing.
    BadRequest {
        /// The response body.
        reason: String,
    },
    /// Loki's partial success: store the valid entries except those whose line contains
    /// `drop_lines_containing`, then answer 400 with a body naming `reason` for each dropped one.
    /// It answers 400 even if no line matched.
    PartialBadRequest {
        /// Entries whose line contains this substring are dropped.
        drop_lines_containing: String,
        /// The Loki reason, e.g. `line_too_long`, written into the body.
        reason: String,
    },
    /// Answer 413 (store nothing) if the request holds more than `max_entries` entries, else
    /// accept normally. Consumed only when it fires: while it does not, it stays at the head of
    /// the queue and the faults behind it wait.
    PayloadTooLarge {
        /// Largest entry count that is still accepted.
        max_entries: usize,
    },
    /// Answer `302 Found` with this `Location` and an empty body; store nothing (a proxy or a
    /// misrouted ingress). `GET /ready` answers 200, so a client that follows the redirect
    /// gets a success for a request that stored nothing.
    Redirect {
        /// The `Location` header.
        location: String,
    },
    /// Wait this long (tokio time), then handle the request normally.
    Slow(Duration),
    /// Drop the TCP connection (with RST) without responding.
    Reset,
}

/// One push request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Status returned, or [`STATUS_RESET`] if the connection was dropped instead.
    pub status: u16,
    /// Response body text (empty for 204 and resets).
    pub response_body: String,
    /// Serial of the client certificate, in `pki::Leaf::serial_hex` format.
    pub client_serial_hex: String,
    /// The client certificate's SPIFFE ID: its URI SAN if it has exactly one and it starts with
    /// `spiffe://`.
    pub client_spiffe_id: Option<String>,
    /// Receiver-assigned id of the TLS connection (1, 2, ... in handshake order); shows
    /// connection reuse and reconnects.
    pub connection_id: u64,
    /// `X-Scope-OrgID`.
    pub tenant: Option<String>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Content-Encoding`.
    pub content_encoding: Option<String>,
    /// `User-Agent`.
    pub user_agent: Option<String>,
    /// Body size on the wire (compressed).
    pub body_bytes: usize,
    /// Streams in the decoded request (0 if it did not decode or was not decoded).
    pub stream_count: usize,
    /// Entries in the decoded request (0 if it did not decode or was not decoded).
    pub entry_count: usize,
    /// Entries stored from this request.
    pub stored_entries: usize,
}

/// One stored log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEntry {
    /// The stream's labels (labels with empty values dropped, as Loki does).
    pub labels: BTreeMap<String, String>,
    /// Unix nanoseconds.
    pub timestamp_ns: i128,
    /// The line, decoded as UTF-8 lossily.
    pub line: String,
    /// Structured metadata.
    pub structured_metadata: BTreeMap<String, String>,
    /// `X-Scope-OrgID` of the request.
    pub tenant: Option<String>,
    /// SPIFFE ID of the client that pushed it.
    pub client_spiffe_id: Option<String>,
    /// Index of the request in [`Receiver::requests`].
    pub request_index: usize,
}

/// Counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Push requests received (any status, including resets).
    pub requests: usize,
    /// Entries stored.
    pub entries: usize,
    /// Bytes of stored lines.
    pub line_bytes: u64,
    /// TLS handshakes that completed.
    pub connections: usize,
    /// TCP connections whose TLS handshake failed (including clients that closed early).
    pub handshake_failures: usize,
}

/// A running (or stopped) receiver. Clones share the same server; dropping the last clone stops
/// it.
#[derive(Clone)]
pub struct Receiver {
    handle: Arc<Handle>,
}

impl ReceiverOpts {
    /// Serve as `server` (its DNS SAN `localhost` and IP SAN `127.0.0.1` match the address) and
    /// accept clients whose certificates chain to `client_ca`; random port; Loki's default limits.
    pub fn new(server: &Leaf, client_ca: &Ca) -> ReceiverOpts {
        ReceiverOpts::from_pem(&server.cert_pem, &server.key_pem, &client_ca.cert_pem)
    }

    /// Like [`ReceiverOpts::new`] from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str, client_ca_pem: &str) -> ReceiverOpts {
        ReceiverOpts {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            client_ca_pem: client_ca_pem.to_owned(),
            port: 0,
            limits: Limits::default(),
            server_config: None,
            tls12_only: false,
        }
    }

    /// Speak TLS 1.2 only.
    pub fn tls12_only(mut self) -> ReceiverOpts {
        self.tls12_only = true;
        self
    }

    /// Serve with a ready rustls server config (it must require and verify client
    /// certificates); random port; Loki's default limits.
    pub fn with_server_config(config: Arc<ServerConfig>) -> ReceiverOpts {
        ReceiverOpts {
            server_config: Some(config),
            ..ReceiverOpts::from_pem("", "", "")
        }
    }

    /// Bind this port instead of a random one.
    pub fn with_port(mut self, port: u16) -> ReceiverOpts {
        self.port = port;
        self
    }

    /// Also accept clients whose certificates chain to `ca_pem` (e.g. a second trust domain).
    pub fn trust_also(mut self, ca_pem: &str) -> ReceiverOpts {
        self.client_ca_pem.push('\n');
        self.client_ca_pem.push_str(ca_pem);
        self
    }

    /// Use these validation limits (e.g. [`Limits::none`] to accept synthetic timestamps).
    pub fn with_limits(mut self, limits: Limits) -> ReceiverOpts {
        self.limits = limits;
        self
    }
}

impl Limits {
    /// Loki's defaults: 256 KiB lines, 15 label names, 1024/2048-byte names/values, 7 days old
    /// to 10 minutes ahead.
    pub fn loki_defaults() -> Limits {
        Limits {
            max_line_bytes: Some(256 * 1024),
            max_label_names: Some(15),
            max_label_name_len: Some(1024),
            max_label_value_len: Some(2048),
            max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            future_grace: Some(Duration::from_secs(600)),
        }
    }

    /// No limits (label syntax, duplicate and missing labels are still checked).
    pub fn none() -> Limits {
        Limits {
            max_line_bytes: None,
            max_label_names: None,
            max_label_name_len: None,
            max_label_value_len: None,
            max_age: None,
            future_grace: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::loki_defaults()
    }
}

impl Receiver {
    /// Binds `127.0.0.1:<opts.port>` and starts serving. Panics (with the reason) on bad key
    /// material or a failed bind.
    pub async fn start(opts: ReceiverOpts) -> Receiver {
        let config = match &opts.server_config {
            Some(c) => c.clone(),
            None => Arc::new(server_config(&opts)),
        };
        let acceptor = TlsAcceptor::from(config);
        let listener = bind(opts.port).unwrap_or_else(|e| {
            panic!("receiver: cannot bind 127.0.0.1:{}: {e}", opts.port);
        });
        let addr = listener
            .local_addr()
            .expect("receiver: listener has a local address");
        let handle = Arc::new(Handle {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                limits: opts.limits,
                next_connection_id: AtomicU64::new(1),
            }),
            addr,
            acceptor,
            running: Mutex::new(None),
        });
        handle.serve(listener);
        Receiver { handle }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.handle.addr
    }

    /// `https://127.0.0.1:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("https://{}", self.handle.addr)
    }

    /// `https://127.0.0.1:<port>/loki/api/v1/push`.
    pub fn push_url(&self) -> String {
        format!("{}{PUSH_PATH}", self.url())
    }

    /// All stored entries in arrival order, duplicates included.
    pub fn entries(&self) -> Vec<RecordedEntry> {
        self.handle.shared.lock().entries.clone()
    }

    /// Stored entries with exact duplicates (same labels, tenant, timestamp and line) removed,
    /// keeping the first: what Loki would return for a query.
    pub fn distinct_entries(&self) -> Vec<RecordedEntry> {
        let state = self.handle.shared.lock();
        let mut seen = HashSet::new();
        state
            .entries
            .iter()
            .filter(|e| seen.insert((&e.tenant, &e.labels, e.timestamp_ns, &e.line)))
            .cloned()
            .collect()
    }

    /// Every push request received, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.handle.shared.lock().requests.clone()
    }

    /// Number of push requests received (any status).
    pub fn request_count(&self) -> usize {
        self.handle.shared.lock().requests.len()
    }

    /// Number of TLS handshakes that completed.
    pub fn connection_count(&self) -> usize {
        self.handle.shared.lock().connections
    }

    /// Number of TCP connections whose TLS handshake failed.
    pub fn handshake_failures(&self) -> usize {
        self.handle.shared.lock().handshake_failures
    }

    /// Total bytes of stored lines.
    pub fn line_bytes(&self) -> u64 {
        self.handle.shared.lock().line_bytes
    }

    /// All counters at once.
    pub fn stats(&self) -> Stats {
        self.handle.shared.lock().stats()
    }

    /// Forgets recorded requests and entries and resets the counters (faults stay queued).
    pub fn clear_records(&self) {
        let mut state = self.handle.shared.lock();
        state.entries.clear();
        state.requests.clear();
        state.line_bytes = 0;
        state.connections = 0;
        state.handshake_failures = 0;
    }

    /// Appends faults to the queue; each push request consumes the head (see
    /// [`Fault::PayloadTooLarge`] for the one exception).
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.handle.shared.lock().faults.extend(faults);
    }

    /// Faults not consumed yet.
    pub fn pending_faults(&self) -> usize {
        self.handle.shared.lock().faults.len()
    }

    /// Answer 413 (storing nothing) to every request with more entries than this, until reset
    /// with `None`.
    pub fn set_max_entries_per_request(&self, max: Option<usize>) {
        self.handle.shared.lock().max_entries_per_request = max;
    }

    /// Waits until `cond(entries)` holds; false if `timeout` (real time) passes first.
    pub async fn wait_for(
        &self,
        mut cond: impl FnMut(&[RecordedEntry]) -> bool,
        timeout: Duration,
    ) -> bool {
        self.handle
            .shared
            .wait(|state| cond(&state.entries), timeout)
            .await
    }

    /// Waits until at least `n` distinct lines are stored (duplicates from retries and crashes
    /// do not count); false if `timeout` passes first.
    pub async fn wait_for_distinct_lines(&self, n: usize, timeout: Duration) -> bool {
        self.wait_for(
            |e| {
                e.iter()
                    .map(|e| e.line.as_str())
                    .collect::<HashSet<_>>()
                    .len()
                    >= n
            },
            timeout,
        )
        .await
    }

    /// Waits until `cond(requests)` holds; false if `timeout` (real time) passes first.
    pub async fn wait_for_requests(
        &self,
        mut cond: impl FnMut(&[RecordedRequest]) -> bool,
        timeout: Duration,
    ) -> bool {
        self.handle
            .shared
            .wait(|state| cond(&state.requests), timeout)
            .await
    }

    /// Waits until `cond(stats)` holds; false if `timeout` (real time) passes first.
    pub async fn wait_for_stats(
        &self,
        mut cond: impl FnMut(Stats) -> bool,
        timeout: Duration,
    ) -> bool {
        self.handle
            .shared
            .wait(|state| cond(state.stats()), timeout)
            .await
    }

    /// Stops serving: closes the listener (new connections are refused) and drops every live
    /// connection, in-flight requests included. Returns once all of that has happened. A no-op
    /// if already stopped.
    pub async fn stop(&self) {
        let running = self
            .handle
            .running
            .lock()
            .expect("receiver: running lock poisoned")
            .take();
        if let Some(running) = running {
            running.token.cancel();
            running.tracker.close();
            running.tracker.wait().await;
        }
    }

    /// Serves again on the same port after [`Receiver::stop`] (recorded data and queued faults
    /// are kept). A no-op if running. Panics if the port cannot be bound again.
    pub async fn restart(&self) {
        if self.is_running() {
            return;
        }
        let port = self.handle.addr.port();
        let listener = bind(port).unwrap_or_else(|e| {
            panic!("receiver: cannot rebind 127.0.0.1:{port}: {e}");
        });
        self.handle.serve(listener);
    }

    /// Whether it is serving (not stopped).
    pub fn is_running(&self) -> bool {
        self.handle
            .running
            .lock()
            .expect("receiver: running lock poisoned")
            .is_some()
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("addr", &self.handle.addr)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

/// The control side: what `stop`/`restart` act on. Dropping it stops serving.
struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    running: Mutex<Option<Running>>,
}

struct Running {
    token: CancellationToken,
    tracker: TaskTracker,
}

/// What the serving tasks share with the handle.
struct Shared {
    state: Mutex<State>,
    /// Notified (`notify_waiters`) after every change to `state`.
    changed: Notify,
    limits: Limits,
    next_connection_id: AtomicU64,
}

#[derive(Default)]
struct State {
    entries: Vec<RecordedEntry>,
    requests: Vec<RecordedRequest>,
    faults: VecDeque<Fault>,
    max_entries_per_request: Option<usize>,
    connections: usize,
    handshake_failures: usize,
    line_bytes: u64,
}

/// The authenticated peer of one TLS connection.
struct Peer {
    connection_id: u64,
    serial_hex: String,
    spiffe_id: Option<String>,
    /// Wakes the connection task to drop the connection with RST ([`Fault::Reset`]).
    reset: Notify,
}

/// A tokio `TcpStream` shared between the TLS stream (reading and writing through it) and the
/// connection task (which sets zero linger on it for [`Fault::Reset`]).
struct SharedTcp(Arc<TcpStream>);

/// A request decoded from either body format.
struct PushBody {
    streams: Vec<BodyStream>,
}

struct BodyStream {
    /// Labels as sent (for messages).
    labels_text: String,
    /// Parsed label pairs in order, duplicates kept, or the parse error.
    labels: Result<Vec<(String, String)>, String>,
    entries: Vec<BodyEntry>,
}

struct BodyEntry {
    timestamp_ns: Option<i128>,
    line: Vec<u8>,
    structured_metadata: BTreeMap<String, String>,
}

/// A response, before it is recorded and sent.
struct Answer {
    status: u16,
    body: String,
    retry_after: Option<u64>,
    location: Option<String>,
}

impl Handle {
    fn serve(&self, listener: TcpListener) {
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            listener,
            self.shared.clone(),
            self.acceptor.clone(),
            token.clone(),
            tracker.clone(),
        ));
        *self
            .running
            .lock()
            .expect("receiver: running lock poisoned") = Some(Running { token, tracker });
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.running.lock()
            && let Some(running) = guard.take()
        {
            running.token.cancel();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("receiver: state lock poisoned")
    }

    /// Applies `f` to the state and wakes the waiters.
    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.notify_waiters();
        out
    }

    /// Waits until `cond` holds, re-checking after every change; the timeout runs on a std
    /// thread so that paused tokio time cannot fire it early.
    async fn wait(&self, mut cond: impl FnMut(&State) -> bool, timeout: Duration) -> bool {
        let (tx, mut deadline) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            let _ = tx.send(());
        });
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if cond(&self.lock()) {
                return true;
            }
            tokio::select! {
                () = &mut changed => {}
                _ = &mut deadline => return cond(&self.lock()),
            }
        }
    }

    /// Takes the fault for a new request: pops the head unless it is
    /// [`Fault::PayloadTooLarge`], which is only peeked (see [`Shared::fire_payload_too_large`]).
    fn take_fault(&self) -> Option<Fault> {
        let mut state = self.lock();
        match state.faults.front() {
            None => None,
            Some(fault @ Fault::PayloadTooLarge { .. }) => Some(fault.clone()),
            Some(_) => state.faults.pop_front(),
        }
    }

    /// Consumes the head fault if it is the `PayloadTooLarge` that just fired.
    fn fire_payload_too_large(&self) {
        let mut state = self.lock();
        if matches!(state.faults.front(), Some(Fault::PayloadTooLarge { .. })) {
            state.faults.pop_front();
        }
    }
}

impl State {
    fn stats(&self) -> Stats {
        Stats {
            requests: self.requests.len(),
            entries: self.entries.len(),
            line_bytes: self.line_bytes,
            connections: self.connections,
            handshake_failures: self.handshake_failures,
        }
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // `try_read` cleared the readiness; poll it again to register the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The TLS layer has already sent close_notify; the FIN follows when the connection task
    /// drops the socket.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn server_config(opts: &ReceiverOpts) -> ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(opts.client_ca_pem.as_bytes()) {
        let ca = ca.expect("receiver: client CA PEM does not parse");
        roots
            .add(ca)
            .expect("receiver: client CA is not a usable trust anchor");
    }
    assert!(
        !roots.is_empty(),
        "receiver: no client CA certificate given"
    );
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("receiver: building the client certificate verifier failed");

    let chain = CertificateDer::pem_slice_iter(opts.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("receiver: server certificate PEM does not parse");
    assert!(!chain.is_empty(), "receiver: no server certificate given");
    let key = PrivateKeyDer::from_pem_slice(opts.key_pem.as_bytes())
        .expect("receiver: server key PEM does not parse");

    let versions: &[&rustls::SupportedProtocolVersion] = match opts.tls12_only {
        true => &[&rustls::version::TLS12],
        false => rustls::DEFAULT_VERSIONS,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("receiver: ring supports the protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("receiver: server certificate and key do not match");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// A listener on `127.0.0.1:port` with `SO_REUSEADDR`, so `restart` can rebind a port whose old
/// connections are in TIME_WAIT.
fn bind(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let tcp = tokio::select! {
            () = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                // E.g. EMFILE; a later accept may succeed.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        tracker.spawn(serve_connection(
            tcp,
            shared.clone(),
            acceptor.clone(),
            token.clone(),
        ));
    }
}

async fn serve_connection(
    tcp: TcpStream,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    token: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let tcp = Arc::new(tcp);
    let handshake = tokio::select! {
        () = token.cancelled() => return,
        handshake = acceptor.accept(SharedTcp(tcp.clone())) => handshake,
    };
    let Ok(tls) = handshake else {
        shared.update(|state| state.handshake_failures += 1);
        return;
    };
    let peer = Arc::new(peer_of(
        tls.get_ref().1.peer_certificates(),
        shared.next_connection_id.fetch_add(1, Ordering::Relaxed),
    ));
    shared.update(|state| state.connections += 1);

    let service = {
        let shared = shared.clone();
        let peer = peer.clone();
        hyper::service::service_fn(move |request| {
            let shared = shared.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(route(&shared, &peer, request).await) }
        })
    };
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        () = token.cancelled() => {}
        () = peer.reset.notified() => {
            // Zero linger: closing sends RST instead of FIN.
            let _ = tcp.set_zero_linger();
        }
        _ = connection => {}
    }
    // Dropping the connection (and with it the last `Arc<TcpStream>`) closes the socket.
}

fn peer_of(chain: Option<&[CertificateDer<'static>]>, connection_id: u64) -> Peer {
    let leaf = chain
        .and_then(|c| c.first())
        .expect("receiver: the verifier requires a client certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .expect("receiver: a verified client certificate parses");
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let spiffe_id = match uris.as_slice() {
        [uri] if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
        _ => None,
    };
    Peer {
        connection_id,
        serial_hex: super::pki::serial_hex_of(leaf),
        spiffe_id,
        reset: Notify::new(),
    }
}

async fn route(shared: &Shared, peer: &Peer, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let answer = match (method, path.as_str()) {
        (Method::POST, PUSH_PATH) => return push(shared, peer, request).await,
        (Method::GET, "/ready") => Answer::text(200, "ready"),
        (_, PUSH_PATH | "/ready") => Answer::text(405, "method not allowed"),
        _ => Answer::text(404, "404 page not found"),
    };
    answer.into_response()
}

async fn push(shared: &Shared, peer: &Peer, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let mut record = RecordedRequest {
        status: 0,
        response_body: String::new(),
        client_serial_hex: peer.serial_hex.clone(),
        client_spiffe_id: peer.spiffe_id.clone(),
        connection_id: peer.connection_id,
        tenant: header(&parts.headers, "x-scope-orgid"),
        content_type: header(&parts.headers, CONTENT_TYPE.as_str()),
        content_encoding: header(&parts.headers, CONTENT_ENCODING.as_str()),
        user_agent: header(&parts.headers, USER_AGENT.as_str()),
        body_bytes: 0,
        stream_count: 0,
        entry_count: 0,
        stored_entries: 0,
    };
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return finish(
                shared,
                record,
                Vec::new(),
                Answer::text(413, "request_body_too_large"),
            );
        }
        // The client went away mid-body (or sent a broken chunked body).
        Err(e) => {
            return finish(
                shared,
                record,
                Vec::new(),
                Answer::text(400, &format!("reading body: {e}")),
            );
        }
    };
    record.body_bytes = body.len();

    let fault = shared.take_fault();
    match &fault {
        Some(Fault::Reset) => {
            shared.update(|state| {
                record.status = STATUS_RESET;
                state.requests.push(record);
            });
            peer.reset.notify_one();
            // The connection task drops this future together with the connection.
            return std::future::pending().await;
        }
        Some(Fault::Status(code)) => {
            let answer = Answer::text(*code, &format!("injected fault: status {code}"));
            return finish(shared, record, Vec::new(), answer);
        }
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            let mut answer = Answer::text(
                429,
                "Ingestion rate limit exceeded for user fake (limit: 4194304 bytes/sec) while \
                 attempting to ingest lines, reduce log volume or contact your Loki administrator \
                 to see if the limit can be increased",
            );
            answer.retry_after = Some(*retry_after_secs);
            return finish(shared, record, Vec::new(), answer);
        }
        Some(Fault::BadRequest { reason }) => {
            return finish(shared, record, Vec::new(), Answer::text(400, reason));
        }
        Some(Fault::Redirect { location }) => {
            let mut answer = Answer::text(302, "");
            answer.location = Some(location.clone());
            return finish(shared, record, Vec::new(), answer);
        }
        Some(Fault::Slow(delay)) => tokio::time::sleep(*delay).await,
        Some(Fault::PartialBadRequest { .. } | Fault::PayloadTooLarge { .. }) | None => {}
    }

    let decoded = match decode(&parts.headers, &body) {
        Ok(decoded) => decoded,
        Err(answer) => return finish(shared, record, Vec::new(), answer),
    };
    record.stream_count = decoded.streams.len();
    record.entry_count = decoded.streams.iter().map(|s| s.entries.len()).sum();
    if decoded.streams.is_empty() || decoded.streams.iter().any(|s| s.entries.is_empty()) {
        let answer = Answer::text(
            422,
            "push request has no streams or a stream with no entries",
        );
        return finish(shared, record, Vec::new(), answer);
    }

    if let Some(Fault::PayloadTooLarge { max_entries }) = &fault
        && record.entry_count > *max_entries
    {
        shared.fire_payload_too_large();
        let answer = Answer::text(
            413,
            &format!(
                "request_body_too_large: {} entries, at most {max_entries} (injected fault)",
                record.entry_count
            ),
        );
        return finish(shared, record, Vec::new(), answer);
    }
    let max = shared.lock().max_entries_per_request;
    if let Some(max) = max
        && record.entry_count > max
    {
        let answer = Answer::text(
            413,
            &format!(
                "request_body_too_large: {} entries, at most {max}",
                record.entry_count
            ),
        );
        return finish(shared, record, Vec::new(), answer);
    }

    let drop_containing = match &fault {
        Some(Fault::PartialBadRequest {
            drop_lines_containing,
            reason,
        }) => Some((drop_lines_containing.as_str(), reason.as_str())),
        _ => None,
    };
    let (entries, errors) = validate(
        decoded,
        &shared.limits,
        drop_containing,
        &record.tenant,
        &peer.spiffe_id,
    );
    let answer = match drop_containing {
        Some(_) if errors.is_empty() => Answer::text(
            400,
            &format!(
                "{}: no entry matched the injected fault",
                drop_reason(fault.as_ref())
            ),
        ),
        _ if errors.is_empty() => Answer::text(204, ""),
        _ => Answer::text(400, &errors.join("\n")),
    };
    finish(shared, record, entries, answer)
}

fn drop_reason(fault: Option<&Fault>) -> &str {
    match fault {
        Some(Fault::PartialBadRequest { reason, .. }) => reason,
        _ => "",
    }
}

/// Records the request (and its stored entries) atomically, then builds the response.
fn finish(
    shared: &Shared,
    mut record: RecordedRequest,
    mut entries: Vec<RecordedEntry>,
    answer: Answer,
) -> Response<Full<Bytes>> {
    record.status = answer.status;
    record.response_body = answer.body.clone();
    record.stored_entries = entries.len();
    shared.update(|state| {
        let index = state.requests.len();
        for entry in &mut entries {
            entry.request_index = index;
            state.line_bytes += entry.line.len() as u64;
        }
        state.entries.append(&mut entries);
        state.requests.push(record);
    });
    answer.into_response()
}

impl Answer {
    fn text(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.to_owned(),
            retry_after: None,
            location: None,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut builder = Response::builder().status(
            StatusCode::from_u16(self.status)
                .unwrap_or_else(|_| panic!("receiver: {} is not an HTTP status", self.status)),
        );
        if !self.body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "text/plain; charset=utf-8");
        }
        if let Some(secs) = self.retry_after {
            builder = builder.header(RETRY_AFTER, secs.to_string());
        }
        if let Some(location) = self.location {
            builder = builder.header(hyper::header::LOCATION, location);
        }
        builder
            .body(Full::new(Bytes::from(self.body)))
            .expect("receiver: response parts are valid")
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Decodes a push body the way Loki's `parsePushRequestBody` does: `Content-Encoding` must be
/// empty or `snappy` (a no-op marker); gzip and deflate are valid in Loki but not supported here;
/// `application/json` selects JSON, anything else snappy-block protobuf.
fn decode(headers: &HeaderMap, body: &[u8]) -> Result<PushBody, Answer> {
    let encoding = header(headers, CONTENT_ENCODING.as_str()).unwrap_or_default();
    match encoding.trim().to_ascii_lowercase().as_str() {
        "" | "snappy" => {}
        "gzip" | "deflate" => {
            return Err(Answer::text(
                400,
                &format!("Content-Encoding {encoding:?} is not supported by the test receiver"),
            ));
        }
        _ => {
            return Err(Answer::text(
                400,
                &format!("Content-Encoding {encoding:?} not supported"),
            ));
        }
    }
    let content_type = header(headers, CONTENT_TYPE.as_str()).unwrap_or_default();
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if media_type == "application/json" {
        decode_json(body)
    } else {
        decode_protobuf(body)
    }
}

fn decode_protobuf(body: &[u8]) -> Result<PushBody, Answer> {
    use prost::Message as _;

    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| Answer::text(400, &format!("snappy block decode: {e}")))?;
    let request = proto::PushRequest::decode(raw.as_slice())
        .map_err(|e| Answer::text(400, &format!("protobuf decode: {e}")))?;
    let mut streams = Vec::with_capacity(request.streams.len());
    for stream in request.streams {
        let mut entries = Vec::with_capacity(stream.entries.len());
        for entry in stream.entries {
            let timestamp_ns = match entry.timestamp {
                None => None,
                Some(ts) if (0..1_000_000_000).contains(&ts.nanos) => {
                    Some(i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos))
                }
                Some(ts) => {
                    return Err(Answer::text(
                        400,
                        &format!("timestamp: nanos {} not in [0, 1e9)", ts.nanos),
                    ));
                }
            };
            entries.push(BodyEntry {
                timestamp_ns,
                line: entry.line.to_vec(),
                structured_metadata: entry
                    .structured_metadata
                    .into_iter()
                    .map(|p| (p.name, p.value))
                    .collect(),
            });
        }
        streams.push(BodyStream {
            labels: parse_labels(&stream.labels),
            labels_text: stream.labels,
            entries,
        });
    }
    Ok(PushBody { streams })
}

fn decode_json(body: &[u8]) -> Result<PushBody, Answer> {
    use serde_json::Value;

    fn bad(msg: impl fmt::Display) -> Answer {
        Answer::text(400, &format!("json push body: {msg}"))
    }
    fn string_map(v: &Value, what: &str) -> Result<Vec<(String, String)>, Answer> {
        let Value::Object(map) = v else {
            return Err(bad(format!("{what} is not an object")));
        };
        map.iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(bad(format!("{what}.{k} is not a string"))),
            })
            .collect()
    }

    let root: Value = serde_json::from_slice(body).map_err(bad)?;
    let Value::Object(root) = root else {
        return Err(bad("not an object"));
    };
    let streams = match root.get("streams") {
        None | Some(Value::Null) => return Ok(PushBody { streams: vec![] }),
        Some(Value::Array(streams)) => streams,
        Some(_) => return Err(bad("streams is not an array")),
    };
    let mut out = Vec::with_capacity(streams.len());
    for stream in streams {
        let Value::Object(stream) = stream else {
            return Err(bad("a stream is not an object"));
        };
        let labels = match stream.get("stream") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => string_map(v, "stream")?,
        };
        let values: &[Value] = match stream.get("values") {
            None | Some(Value::Null) => &[],
            Some(Value::Array(values)) => values,
            Some(_) => return Err(bad("values is not an array")),
        };
        let mut entries = Vec::with_capacity(values.len());
        for value in values {
            let Value::Array(value) = value else {
                return Err(bad("a value is not an array"));
            };
            let (ts, line, metadata) = match value.as_slice() {
                [ts, line] => (ts, line, None),
                [ts, line, metadata] => (ts, line, Some(metadata)),
                _ => return Err(bad("a value is not [ts, line] or [ts, line, metadata]")),
            };
            let Value::String(ts) = ts else {
                return Err(bad("a timestamp is not a string"));
            };
            let ts: i64 = ts
                .parse()
                .map_err(|e| bad(format!("timestamp {ts:?}: {e}")))?;
            let Value::String(line) = line else {
                return Err(bad("a line is not a string"));
            };
            let structured_metadata = match metadata {
                None => BTreeMap::new(),
                Some(m) => string_map(m, "structured metadata")?.into_iter().collect(),
            };
            entries.push(BodyEntry {
                timestamp_ns: Some(i128::from(ts)),
                line: line.clone().into_bytes(),
                structured_metadata,
            });
        }
        out.push(BodyStream {
            labels_text: format_labels(&labels),
            labels: Ok(labels),
            entries,
        });
    }
    Ok(PushBody { streams: out })
}

/// Applies Loki's validation (and an injected partial drop) to a decoded request: returns the
/// entries to store and one error line per dropped stream or entry.
fn validate(
    body: PushBody,
    limits: &Limits,
    drop_containing: Option<(&str, &str)>,
    tenant: &Option<String>,
    spiffe_id: &Option<String>,
) -> (Vec<RecordedEntry>, Vec<String>) {
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let mut stored = Vec::new();
    let mut errors = Vec::new();
    for stream in body.streams {
        let labels = match stream
            .labels
            .and_then(|pairs| validate_labels(pairs, limits))
        {
            Ok(labels) => labels,
            Err(e) => {
                errors.push(format!(
                    "{e} for stream '{}' ({} entries dropped)",
                    stream.labels_text,
                    stream.entries.len()
                ));
                continue;
            }
        };
        for entry in stream.entries {
            let line = String::from_utf8_lossy(&entry.line).into_owned();
            let problem = match entry.timestamp_ns {
                None => Some("invalid_timestamp: entry has no timestamp".to_owned()),
                Some(ts)
                    if limits
                        .max_age
                        .is_some_and(|a| ts < now_ns - a.as_nanos() as i128) =>
                {
                    Some(format!(
                        "greater_than_max_sample_age: entry has timestamp {ts} (ns) too old"
                    ))
                }
                Some(ts)
                    if limits
                        .future_grace
                        .is_some_and(|g| ts > now_ns + g.as_nanos() as i128) =>
                {
                    Some(format!(
                        "too_far_in_future: entry has timestamp {ts} (ns) too new"
                    ))
                }
                Some(_) if limits.max_line_bytes.is_some_and(|m| entry.line.len() > m) => {
                    Some(format!(
                        "line_too_long: line of {} bytes exceeds the limit",
                        entry.line.len()
                    ))
                }
                Some(_) => match drop_containing {
                    Some((needle, reason)) if line.contains(needle) => Some(format!(
                        "{reason}: line contains {needle:?} (injected fault)"
                    )),
                    _ => None,
                },
            };
            if let Some(problem) = problem {
                errors.push(format!("{problem} for stream '{}'", stream.labels_text));
                continue;
            }
            stored.push(RecordedEntry {
                labels: labels.clone(),
                timestamp_ns: entry.timestamp_ns.unwrap_or_default(),
                line,
                structured_metadata: entry.structured_metadata,
                tenant: tenant.clone(),
                client_spiffe_id: spiffe_id.clone(),
                request_index: 0,
            });
        }
    }
    (stored, errors)
}

/// Loki's stream label checks (`pkg/distributor/validator.go`), after dropping empty values.
fn validate_labels(
    pairs: Vec<(String, String)>,
    limits: &Limits,
) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for (name, value) in pairs {
        if !is_label_name(&name) {
            return Err(format!("invalid_labels: invalid label name {name:?}"));
        }
        if limits.max_label_name_len.is_some_and(|m| name.len() > m) {
            return Err(format!("label_name_too_long: {name:?}"));
        }
        if limits.max_label_value_len.is_some_and(|m| value.len() > m) {
            return Err(format!("label_value_too_long: value of {name:?}"));
        }
        if labels.contains_key(&name) {
            return Err(format!("duplicate_label_names: {name:?}"));
        }
        labels.insert(name, value);
    }
    labels.retain(|_, v| !v.is_empty());
    if labels.is_empty() {
        return Err("missing_labels: at least one label pair is required per stream".to_owned());
    }
    let counted = labels.keys().filter(|k| *k != "service_name").count();
    if let Some(max) = limits.max_label_names
        && counted > max
    {
        return Err(format!(
            "max_label_names_per_series: {counted} label names, at most {max}"
        ));
    }
    Ok(labels)
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Renders labels in Promtail's form (`{a="b", c="d"}`, Go quoting), for messages.
pub fn format_labels(pairs: &[(String, String)]) -> String {
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let mut quoted = String::with_capacity(v.len() + 2);
            quoted.push('"');
            for c in v.chars() {
                match c {
                    '\\' => quoted.push_str("\\\\"),
                    '"' => quoted.push_str("\\\""),
                    '\n' => quoted.push_str("\\n"),
                    '\t' => quoted.push_str("\\t"),
                    '\r' => quoted.push_str("\\r"),
                    c => quoted.push(c),
                }
            }
            quoted.push('"');
            format!("{k}={quoted}")
        })
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// Parses a Loki/PromQL label set `{name="value", ...}` (`ParseLabels`): whitespace between
/// tokens, an optional trailing comma, values in `"..."` or `'...'` with Go escapes (`\a \b \f
/// \n \r \t \v \\ \" \' \xNN \NNN \uNNNN \UNNNNNNNN`) or raw in backticks. Returns the pairs in
/// order, duplicates kept (the validator rejects them), or a message.
pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>, String> {
    let err = |msg: &str, at: usize| Err(format!("invalid_labels: {msg} at byte {at} of {text:?}"));
    let bytes = text.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && matches!(bytes[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if bytes.get(i) != Some(&b'{') {
        return err("expected '{'", i);
    }
    i += 1;
    let mut pairs = Vec::new();
    loop {
        skip_ws(&mut i);
        if bytes.get(i) == Some(&b'}') {
            i += 1;
            break;
        }
        // Label name.
        let start = i;
        while i < bytes.len()
            && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b':'))
        {
            i += 1;
        }
        if start == i || bytes[start].is_ascii_digit() {
            return err("expected a label name", start);
        }
        let name = text[start..i].to_owned();
        skip_ws(&mut i);
        if bytes.get(i) != Some(&b'=') || matches!(bytes.get(i + 1), Some(b'~')) {
            return err("expected '='", i);
        }
        i += 1;
        skip_ws(&mut i);
        let value = match parse_quoted(text, &mut i) {
            Ok(value) => value,
            Err(msg) => return err(&msg, i),
        };
        pairs.push((name, value));
        skip_ws(&mut i);
        match bytes.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => {
                i += 1;
                break;
            }
            _ => return err("expected ',' or '}'", i),
        }
    }
    skip_ws(&mut i);
    if i != bytes.len() {
        return err("unexpected text after '}'", i);
    }
    Ok(pairs)
}

/// Parses one quoted string starting at `*i`, leaving `*i` after the closing quote.
fn parse_quoted(text: &str, i: &mut usize) -> Result<String, String> {
    let bytes = text.as_bytes();
    let quote = match bytes.get(*i) {
        Some(q @ (b'"' | b'\'' | b'`')) => *q,
        _ => return Err("expected a quoted value".to_owned()),
    };
    *i += 1;
    let mut out: Vec<u8> = Vec::new();
    loop {
        let Some(&b) = bytes.get(*i) else {
            return Err("unterminated string".to_owned());
        };
        *i += 1;
        if b == quote {
            break;
        }
        if quote == b'`' {
            out.push(b);
            continue;
        }
        match b {
            b'\n' => return Err("newline in string".to_owned()),
            b'\\' => {
                let Some(&e) = bytes.get(*i) else {
                    return Err("unterminated escape".to_owned());
                };
                *i += 1;
                match e {
                    b'a' => out.push(0x07),
                    b'b' => out.push(0x08),
                    b'f' => out.push(0x0c),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'v' => out.push(0x0b),
                    b'\\' => out.push(b'\\'),
                    e if e == quote => out.push(e),
                    b'x' => out.push(hex_escape(text, i, 2)? as u8),
                    b'u' | b'U' => {
                        let digits = if e == b'u' { 4 } else { 8 };
                        let c = char::from_u32(hex_escape(text, i, digits)?)
                            .ok_or("escape is not a Unicode scalar value")?;
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                    b'0'..=b'7' => {
                        let digits = text
                            .get(*i - 1..*i + 2)
                            .filter(|d| d.bytes().all(|b| (b'0'..=b'7').contains(&b)))
                            .ok_or("bad octal escape")?;
                        let v = u32::from_str_radix(digits, 8).map_err(|e| e.to_string())?;
                        out.push(u8::try_from(v).map_err(|_| "octal escape above 255")?);
                        *i += 2;
                    }
                    _ => return Err(format!("unknown escape \\{}", e as char)),
                }
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| "string is not valid UTF-8".to_owned())
}

fn hex_escape(text: &str, i: &mut usize, digits: usize) -> Result<u32, String> {
    let hex = text
        .get(*i..*i + digits)
        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("bad hex escape")?;
    *i += digits;
    u32::from_str_radix(hex, 16).map_err(|e| e.to_string())
}

/// Loki's push protobuf (`pkg/push/push.proto`, package `logproto`), hand-written for prost.
/// `line` is `bytes` (same wire type as Loki's `string`), so non-UTF-8 lines decode.
pub mod proto {
    /// `logproto.PushRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        /// Field 1.
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<Stream>,
    }

    /// `logproto.StreamAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Stream {
        /// Field 1: label-selector syntax.
        #[prost(string, tag = "1")]
        pub labels: String,
        /// Field 2.
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<Entry>,
        /// Field 3: clients leave it 0.
        #[prost(uint64, tag = "3")]
        pub hash: u64,
    }

    /// `logproto.EntryAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        /// Field 1.
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        /// Field 2. `Bytes`, so that decoding a `Bytes` body does not copy each line.
        #[prost(bytes = "bytes", tag = "2")]
        pub line: bytes::Bytes,
        /// Field 3.
        #[prost(message, repeated, tag = "3")]
        pub structured_metadata: Vec<LabelPair>,
    }

    /// `google.protobuf.Timestamp`.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct Timestamp {
        /// Field 1.
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        /// Field 2: in `0..1_000_000_000`.
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }

    /// `logproto.LabelPairAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        /// Field 1.
        #[prost(string, tag = "1")]
        pub name: String,
        /// Field 2.
        #[prost(string, tag = "2")]
        pub value: String,
    }

    impl Timestamp {
        /// From Unix nanoseconds.
        pub fn from_unix_nanos(ns: i128) -> Timestamp {
            Timestamp {
                seconds: i64::try_from(ns.div_euclid(1_000_000_000))
                    .expect("receiver: timestamp seconds fit i64"),
                nanos: ns.rem_euclid(1_000_000_000) as i32,
            }
        }
    }

    /// Encodes a request as a push body: protobuf, then snappy block format.
    pub fn encode_push_body(request: &PushRequest) -> Vec<u8> {
        use prost::Message as _;
        snap::raw::Encoder::new()
            .compress_vec(&request.encode_to_vec())
            .expect("receiver: snappy block compression does not fail on a Vec")
    }
}
