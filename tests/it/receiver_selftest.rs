//! Proves that `support::receiver` itself works, with a raw client: rustls (ring) over tokio with
//! hand-written HTTP/1.1, one request per connection. ztail's own tests can then trust it.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::pki::{Ca, Leaf};
use crate::support::receiver::proto::{self, Entry, LabelPair, PushRequest, Stream, Timestamp};
use crate::support::receiver::{Fault, Limits, Receiver, ReceiverOpts, STATUS_RESET, parse_labels};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const WAIT: Duration = Duration::from_secs(10);

/// A CA, a receiver serving `spiffe://example.org/loki`, and a client SVID for ztail.
struct Setup {
    ca: Ca,
    client: Leaf,
    receiver: Receiver,
}

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

async fn setup() -> Setup {
    let ca = Ca::new("example.org");
    let server = ca.issue("spiffe://example.org/loki");
    let receiver = Receiver::start(ReceiverOpts::new(&server, &ca)).await;
    let client = ca.issue("spiffe://example.org/ztail");
    Setup {
        ca,
        client,
        receiver,
    }
}

fn client_config(ca: &Ca, leaf: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der.clone()))
        .expect("CA is a trust anchor");
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_root_certificates(roots);
    let mut config = match leaf {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(leaf.cert_der.clone())],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key parses"),
            )
            .expect("client cert and key match"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Sends one HTTP/1.1 request over a fresh mTLS connection and reads the response to EOF.
async fn send(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<RawResponse> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("valid server name");
    let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes()).await?;
    tls.write_all(body).await?;
    tls.flush().await?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A peer that closes without close_notify after a full response is fine here.
            Err(_) if !raw.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<RawResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no complete response"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(RawResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

fn entry(ts: i128, line: &str, metadata: &[(&str, &str)]) -> Entry {
    Entry {
        timestamp: Some(Timestamp::from_unix_nanos(ts)),
        line: line.as_bytes().to_vec().into(),
        structured_metadata: metadata
            .iter()
            .map(|(k, v)| LabelPair {
                name: (*k).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
    }
}

fn stream(labels: &str, entries: Vec<Entry>) -> Stream {
    Stream {
        labels: labels.to_owned(),
        entries,
        hash: 0,
    }
}

/// A protobuf push of one stream `{job="app"}` with `lines`.
fn simple_push(lines: &[&str]) -> Vec<u8> {
    let ts = now_ns();
    proto::encode_push_body(&PushRequest {
        streams: vec![stream(
            r#"{job="app"}"#,
            lines
                .iter()
                .enumerate()
                .map(|(i, l)| entry(ts + i as i128, l, &[]))
                .collect(),
        )],
    })
}

const PROTO: &[(&str, &str)] = &[("Content-Type", "application/x-protobuf")];

impl Setup {
    async fn push(&self, body: &[u8]) -> io::Result<RawResponse> {
        self.push_with(PROTO, body).await
    }

    async fn push_with(&self, headers: &[(&str, &str)], body: &[u8]) -> io::Result<RawResponse> {
        send(
            self.receiver.addr(),
            client_config(&self.ca, Some(&self.client)),
            "/loki/api/v1/push",
            headers,
            body,
        )
        .await
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn protobuf_push_is_recorded_with_the_client_identity() {
    let s = setup().await;
    assert!(s.receiver.url().starts_with("https://127.0.0.1:"));
    let ts = now_ns();
    let body = proto::encode_push_body(&PushRequest {
        streams: vec![
            stream(
                r#"{filename="/var/log/a.log", job="app"}"#,
                vec![
                    entry(ts, "first", &[("trace_id", "abc")]),
                    entry(ts + 1, "second", &[]),
                ],
            ),
            stream(
                r#"{job="we\"ird\\", x="a\nb\tc", empty=""}"#,
                vec![entry(ts + 2, "third", &[])],
            ),
        ],
    });
    let response = s
        .push_with(
            &[
                ("Content-Type", "application/x-protobuf"),
                ("X-Scope-OrgID", "tenant-1"),
                ("User-Agent", "ztail/0.1.0"),
            ],
            &body,
        )
        .await
        .expect("push succeeds");
    assert_eq!(response.status, 204, "{}", response.body);
    assert!(response.body.is_empty());

    let entries = s.receiver.entries();
    assert_eq!(entries.len(), 3);
    assert_eq!(
        entries[0].labels,
        labels(&[("filename", "/var/log/a.log"), ("job", "app")])
    );
    assert_eq!(entries[0].timestamp_ns, ts);
    assert_eq!(entries[0].line, "first");
    assert_eq!(
        entries[0].structured_metadata,
        labels(&[("trace_id", "abc")])
    );
    assert_eq!(entries[1].line, "second");
    assert_eq!(entries[1].timestamp_ns, ts + 1);
    // Escapes decoded, the empty-valued label dropped as Loki does.
    assert_eq!(
        entries[2].labels,
        labels(&[("job", "we\"ird\\"), ("x", "a\nb\tc")])
    );
    for e in &entries {
        assert_eq!(e.tenant.as_deref(), Some("tenant-1"));
        assert_eq!(
            e.client_spiffe_id.as_deref(),
            Some("spiffe://example.org/ztail")
        );
        assert_eq!(e.request_index, 0);
    }

    let requests = s.receiver.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.status, 204);
    assert_eq!(r.client_serial_hex, s.client.serial_hex);
    assert_eq!(
        r.client_spiffe_id.as_deref(),
        Some("spiffe://example.org/ztail")
    );
    assert_eq!(r.tenant.as_deref(), Some("tenant-1"));
    assert_eq!(r.content_type.as_deref(), Some("application/x-protobuf"));
    assert_eq!(r.user_agent.as_deref(), Some("ztail/0.1.0"));
    assert_eq!((r.stream_count, r.entry_count, r.stored_entries), (2, 3, 3));
    assert_eq!(r.body_bytes, body.len());
    assert_eq!(s.receiver.request_count(), 1);
    assert_eq!(s.receiver.connection_count(), 1);
    assert_eq!(s.receiver.handshake_failures(), 0);
    assert_eq!(s.receiver.line_bytes(), 5 + 6 + 5);
}

#[tokio::test]
async fn json_push_is_recorded() {
    let s = setup().await;
    let ts = now_ns();
    let body = serde_json::json!({
        "streams": [{
            "stream": {"job": "app", "host": "h1"},
            "values": [
                [ts.to_string(), "json line 1"],
                [(ts + 1).to_string(), "json line 2", {"trace_id": "t1"}],
            ],
        }],
    })
    .to_string();
    let response = s
        .push_with(
            &[("Content-Type", "application/json; charset=utf-8")],
            body.as_bytes(),
        )
        .await
        .expect("push succeeds");
    assert_eq!(response.status, 204, "{}", response.body);
    let entries = s.receiver.entries();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].labels, labels(&[("host", "h1"), ("job", "app")]));
    assert_eq!(entries[0].line, "json line 1");
    assert_eq!(entries[0].timestamp_ns, ts);
    assert!(entries[0].structured_metadata.is_empty());
    assert_eq!(
        entries[1].structured_metadata,
        labels(&[("trace_id", "t1")])
    );
    assert_eq!(entries[1].tenant, None);
    assert_eq!(
        s.receiver.requests()[0].content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );

    // gzip is valid for Loki but not supported by the receiver: a clear 400.
    let response = s
        .push_with(
            &[
                ("Content-Type", "application/json"),
                ("Content-Encoding", "gzip"),
            ],
            body.as_bytes(),
        )
        .await
        .expect("response");
    assert_eq!(response.status, 400);
    assert!(response.body.contains("gzip"), "{}", response.body);
}

#[tokio::test]
async fn faults_429_and_413_then_success() {
    let s = setup().await;
    s.receiver.push_faults([
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
        Fault::PayloadTooLarge { max_entries: 1 },
    ]);
    let body = simple_push(&["a", "b"]);

    let r = s.push(&body).await.expect("response");
    assert_eq!(r.status, 429);
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "retry-after" && v == "7"),
        "{:?}",
        r.headers
    );
    let r = s.push(&body).await.expect("response");
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(s.receiver.pending_faults(), 0);
    assert!(
        s.receiver.entries().is_empty(),
        "failed requests store nothing"
    );

    let r = s.push(&body).await.expect("response");
    assert_eq!(r.status, 204);
    assert_eq!(s.receiver.entries().len(), 2);
    let statuses: Vec<u16> = s.receiver.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 413, 204]);

    // PayloadTooLarge that does not fire stays queued.
    s.receiver
        .push_faults([Fault::PayloadTooLarge { max_entries: 5 }]);
    let r = s.push(&body).await.expect("response");
    assert_eq!(r.status, 204);
    assert_eq!(s.receiver.pending_faults(), 1);

    // The persistent limit.
    s.receiver.push_faults([]);
    s.receiver.set_max_entries_per_request(Some(1));
    let r = s
        .push(&simple_push(&["x", "y", "z"]))
        .await
        .expect("response");
    assert_eq!(r.status, 413);
    s.receiver.set_max_entries_per_request(None);
}

#[tokio::test]
async fn status_slow_bad_request_and_partial_bad_request() {
    let s = setup().await;
    s.receiver.push_faults([
        Fault::Status(503),
        Fault::BadRequest {
            reason: "invalid_labels: nope".to_owned(),
        },
        Fault::Slow(Duration::from_millis(200)),
        Fault::PartialBadRequest {
            drop_lines_containing: "bad".to_owned(),
            reason: "line_too_long".to_owned(),
        },
    ]);
    let body = simple_push(&["good 1", "bad 2", "good 3"]);
    assert_eq!(s.push(&body).await.expect("response").status, 503);
    let r = s.push(&body).await.expect("response");
    assert_eq!((r.status, r.body.as_str()), (400, "invalid_labels: nope"));
    assert!(s.receiver.entries().is_empty());

    let started = Instant::now();
    assert_eq!(s.push(&body).await.expect("response").status, 204);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(s.receiver.entries().len(), 3);

    let r = s.push(&body).await.expect("response");
    assert_eq!(r.status, 400);
    assert!(r.body.contains("line_too_long"), "{}", r.body);
    let lines: Vec<String> = s.receiver.entries().into_iter().map(|e| e.line).collect();
    assert_eq!(
        lines,
        ["good 1", "bad 2", "good 3", "good 1", "good 3"],
        "the valid part of a partial 400 is stored"
    );
    assert_eq!(s.receiver.requests()[3].stored_entries, 2);
    // Same timestamps and lines: Loki's view has no duplicates.
    assert_eq!(s.receiver.distinct_entries().len(), 3);
}

#[tokio::test]
async fn reset_drops_the_connection_without_a_response() {
    let s = setup().await;
    s.receiver.push_faults([Fault::Reset]);
    let result = s.push(&simple_push(&["a"])).await;
    let err = result.err().expect("no response after a reset");
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionReset,
        "an RST, not a FIN: {err}"
    );
    assert!(s.receiver.wait_for_requests(|r| r.len() == 1, WAIT).await);
    assert_eq!(s.receiver.requests()[0].status, STATUS_RESET);
    assert!(s.receiver.entries().is_empty());
    // The next request is served normally.
    assert_eq!(
        s.push(&simple_push(&["a"])).await.expect("response").status,
        204
    );
}

#[tokio::test]
async fn malformed_and_empty_requests_are_rejected_like_loki() {
    let s = setup().await;
    let ts = now_ns();

    // A stream with malformed labels is dropped with 400; the valid stream is stored.
    let body = proto::encode_push_body(&PushRequest {
        streams: vec![
            stream(r#"{job="app""#, vec![entry(ts, "lost", &[])]),
            stream(r#"{job="app"}"#, vec![entry(ts, "kept", &[])]),
        ],
    });
    let r = s.push(&body).await.expect("response");
    assert_eq!(r.status, 400);
    assert!(r.body.contains("invalid_labels"), "{}", r.body);
    let lines: Vec<String> = s.receiver.entries().into_iter().map(|e| e.line).collect();
    assert_eq!(lines, ["kept"]);

    // No streams, or a stream without entries: 422, nothing stored.
    let r = s
        .push(&proto::encode_push_body(&PushRequest { streams: vec![] }))
        .await
        .expect("response");
    assert_eq!(r.status, 422);
    let body = proto::encode_push_body(&PushRequest {
        streams: vec![
            stream(r#"{job="app"}"#, vec![entry(ts, "x", &[])]),
            stream(r#"{job="other"}"#, vec![]),
        ],
    });
    assert_eq!(s.push(&body).await.expect("response").status, 422);

    // Not snappy block format (e.g. raw protobuf): 400.
    use prost::Message as _;
    let raw = PushRequest {
        streams: vec![stream(r#"{job="app"}"#, vec![entry(ts, "x", &[])])],
    }
    .encode_to_vec();
    assert_eq!(s.push(&raw).await.expect("response").status, 400);

    // Old timestamps are refused with Loki's default limits.
    let body = proto::encode_push_body(&PushRequest {
        streams: vec![stream(r#"{job="app"}"#, vec![entry(1_000, "old", &[])])],
    });
    let r = s.push(&body).await.expect("response");
    assert_eq!(r.status, 400);
    assert!(r.body.contains("greater_than_max_sample_age"), "{}", r.body);
    assert_eq!(s.receiver.entries().len(), 1);
}

#[tokio::test]
async fn limits_none_accepts_synthetic_timestamps() {
    let ca = Ca::new("example.org");
    let server = ca.issue("spiffe://example.org/loki");
    let receiver =
        Receiver::start(ReceiverOpts::new(&server, &ca).with_limits(Limits::none())).await;
    let client = ca.issue("spiffe://example.org/ztail");
    let body = proto::encode_push_body(&PushRequest {
        streams: vec![stream(r#"{job="app"}"#, vec![entry(1, "t=1ns", &[])])],
    });
    let r = send(
        receiver.addr(),
        client_config(&ca, Some(&client)),
        "/loki/api/v1/push",
        PROTO,
        &body,
    )
    .await
    .expect("response");
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(receiver.entries()[0].timestamp_ns, 1);
}

#[tokio::test]
async fn client_without_certificate_fails_the_handshake() {
    let s = setup().await;
    let result = send(
        s.receiver.addr(),
        client_config(&s.ca, None),
        "/loki/api/v1/push",
        PROTO,
        &simple_push(&["a"]),
    )
    .await;
    assert!(result.is_err(), "no HTTP response without a client cert");
    assert!(
        s.receiver
            .wait_for_stats(|st| st.handshake_failures == 1, WAIT)
            .await
    );
    assert_eq!(s.receiver.request_count(), 0);
    assert_eq!(s.receiver.connection_count(), 0);
}

#[tokio::test]
async fn client_certificate_from_another_ca_fails_the_handshake() {
    let s = setup().await;
    let other = Ca::new("example.org");
    let stranger = other.issue("spiffe://example.org/ztail");
    let result = send(
        s.receiver.addr(),
        client_config(&s.ca, Some(&stranger)),
        "/loki/api/v1/push",
        PROTO,
        &simple_push(&["a"]),
    )
    .await;
    assert!(result.is_err());
    assert!(
        s.receiver
            .wait_for_stats(|st| st.handshake_failures == 1, WAIT)
            .await
    );
    assert_eq!(s.receiver.request_count(), 0);
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_serves_on_the_same_port() {
    let s = setup().await;
    let addr = s.receiver.addr();
    assert_eq!(
        s.push(&simple_push(&["before"])).await.expect("ok").status,
        204
    );

    s.receiver.stop().await;
    assert!(!s.receiver.is_running());
    let err = TcpStream::connect(addr).await.expect_err("listener closed");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);

    s.receiver.restart().await;
    assert_eq!(s.receiver.addr(), addr);
    assert_eq!(
        s.push(&simple_push(&["after"])).await.expect("ok").status,
        204
    );
    let lines: Vec<String> = s.receiver.entries().into_iter().map(|e| e.line).collect();
    assert_eq!(lines, ["before", "after"]);
}

#[tokio::test]
async fn stop_aborts_in_flight_requests() {
    let s = setup().await;
    s.receiver
        .push_faults([Fault::Slow(Duration::from_secs(60))]);
    let addr = s.receiver.addr();
    let config = client_config(&s.ca, Some(&s.client));
    let body = simple_push(&["slow"]);
    let pending =
        tokio::spawn(async move { send(addr, config, "/loki/api/v1/push", PROTO, &body).await });
    assert!(
        s.receiver
            .wait_for_stats(|st| st.connections == 1, WAIT)
            .await
    );
    // Whether the request has reached the handler yet or not, stop drops the connection.
    let started = Instant::now();
    s.receiver.stop().await;
    let result = pending.await.expect("client task");
    assert!(result.is_err(), "the slow request got no response");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(s.receiver.entries().is_empty());
}

/// `wait_for` is woken by each recorded change and times out on the real clock. (Its std-thread
/// deadline is meant to keep it correct under `start_paused`, which cannot be exercised here:
/// tokio's `test-util` feature is not enabled.)
#[tokio::test]
async fn wait_for_wakes_on_change_and_times_out() {
    let s = setup().await;
    let addr = s.receiver.addr();
    let config = client_config(&s.ca, Some(&s.client));
    let body = simple_push(&["waited"]);
    tokio::spawn(async move { send(addr, config, "/loki/api/v1/push", PROTO, &body).await });
    assert!(
        s.receiver
            .wait_for(|entries| entries.iter().any(|e| e.line == "waited"), WAIT)
            .await
    );
    let started = Instant::now();
    assert!(
        !s.receiver
            .wait_for(|entries| entries.len() > 1, Duration::from_millis(100))
            .await
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < WAIT,
        "{waited:?}"
    );
}

#[test]
fn label_strings_parse_with_go_escapes() {
    let ok = |s: &str| parse_labels(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert_eq!(ok("{}"), pairs(&[]));
    assert_eq!(ok(r#"{a="b", c="d"}"#), pairs(&[("a", "b"), ("c", "d")]));
    assert_eq!(
        ok(" { a = \"b\" ,\n c='d', } "),
        pairs(&[("a", "b"), ("c", "d")])
    );
    assert_eq!(
        ok(r#"{a="q\"b\\s\nn\tt\x41\u00e9\101"}"#),
        pairs(&[("a", "q\"b\\s\nn\ttA\u{e9}A")])
    );
    assert_eq!(ok(r#"{a=`raw\n`}"#), pairs(&[("a", r"raw\n")]));
    assert_eq!(
        ok(r#"{a="1", a="2"}"#).len(),
        2,
        "duplicates kept for the validator"
    );
    for bad in [
        "",
        "a=\"b\"",
        "{a=\"b\"",
        "{a=b}",
        "{a!=\"b\"}",
        "{a=~\"b\"}",
        "{1a=\"b\"}",
        "{a=\"b\" c=\"d\"}",
        "{a=\"b\\q\"}",
        "{a=\"line\nbreak\"}",
        "{a=\"b\"} x",
        "name{a=\"b\"}",
    ] {
        assert!(parse_labels(bad).is_err(), "{bad:?} should not parse");
    }
}
