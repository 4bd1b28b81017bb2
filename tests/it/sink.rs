//! The Loki status-code policy and both body formats, asserted at the receiver.

use std::time::Duration;

use crate::support::receiver::Fault;
use crate::support::ztail::{Env, LOKI_ID, Ztail, append_lines};
use crate::{WAIT, expected, lines_by_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_and_500_until_they_succeed() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults([
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        Fault::Status(500),
        Fault::Status(503),
        Fault::Reset,
        Fault::TooManyRequests {
            retry_after_secs: 0,
        },
    ]);
    let zt = Ztail::start(&env, &env.config(&rx.url(), "tenant = \"team-a\"", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "r", 0..100);
    assert!(
        rx.wait_for(|e| e.len() >= 100, WAIT).await,
        "lines never arrived"
    );
    let statuses: Vec<u16> = rx.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        &statuses[..5],
        &[429, 500, 503, 0, 429],
        "faults served in order"
    );
    assert!(statuses[5..].iter().all(|s| *s == 204), "{statuses:?}");
    let entries = rx.entries();
    assert_eq!(entries.len(), 100, "a retry must not duplicate");
    assert!(
        entries
            .iter()
            .all(|e| e.tenant.as_deref() == Some("team-a"))
    );
    assert_eq!(
        lines_by_file(&entries)[&log.display().to_string()],
        expected("r", 0..100)
    );
    assert!(zt.metric("ztail_push_retries_total").await >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_drops_only_what_loki_refused_and_the_pipeline_goes_on() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults([Fault::PartialBadRequest {
        drop_lines_containing: "p 00000007".into(),
        reason: "line_too_long".into(),
    }]);
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "p", 0..50);
    assert!(rx.wait_for(|e| e.len() >= 49, WAIT).await);
    append_lines(&log, "p", 50..100);
    assert!(
        rx.wait_for(|e| e.len() >= 99, WAIT).await,
        "the pipeline stalled after a 400"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = &lines_by_file(&rx.entries())[&log.display().to_string()];
    let mut want = expected("p", 0..100);
    want.remove(7);
    assert_eq!(
        lines, &want,
        "400 is final: the refused line is not retried, the rest is kept"
    );
    assert!(
        zt.metric("ztail_dropped_entries_total{reason=\"line_too_long\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_splits_the_batch_until_it_fits() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.set_max_entries_per_request(Some(300));
    let _zt = Ztail::start(
        &env,
        &env.config(&rx.url(), "", "")
            .replace("batch_wait = \"100ms\"", "batch_wait = \"2s\""),
    );
    let log = env.path("logs/app.log");
    append_lines(&log, "s", 0..2000);
    assert!(
        rx.wait_for(|e| e.len() >= 2000, WAIT).await,
        "split batches never all arrived"
    );
    let requests = rx.requests();
    assert!(
        requests.iter().any(|r| r.status == 413),
        "no 413 was provoked"
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.status == 204)
            .all(|r| r.stored_entries <= 300)
    );
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("s", 0..2000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_carry_the_same_lines_and_labels() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let _zt = Ztail::start(&env, &env.config(&rx.url(), "body = \"json\"", ""));
    let log = env.path("logs/app.log");
    std::fs::write(
        &log,
        "plain\nquote \" and \\ backslash\r\nunicode é ✓\n\nbad \u{fffd}\n",
    )
    .unwrap();
    assert!(rx.wait_for(|e| e.len() >= 5, WAIT).await);
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        [
            "plain",
            "quote \" and \\ backslash",
            "unicode é ✓",
            "",
            "bad \u{fffd}"
        ]
    );
    assert!(
        rx.requests()
            .iter()
            .all(|r| r.content_type.as_deref() == Some("application/json"))
    );
}

/// `compression = "none"`: the same lines and labels arrive, in protobuf bodies that decode as
/// snappy and are as large as the request (a compressed one of the same lines is far smaller).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncompressed_protobuf_bodies_carry_the_same_lines() {
    let lines: Vec<String> = (0..2000)
        .map(|i| {
            format!("2026-12-04T08:00:00Z INFO [api] request served path=/orders/{i} status=200")
        })
        .collect();
    let mut sizes = Vec::new();
    for compression in ["snappy", "none"] {
        let env = Env::new();
        let rx = env.receiver(LOKI_ID).await;
        let sink = format!("compression = \"{compression}\"");
        let _zt = Ztail::start(&env, &env.config(&rx.url(), &sink, ""));
        let log = env.path("logs/app.log");
        std::fs::write(
            &log,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        assert!(
            rx.wait_for(|e| e.len() >= lines.len(), WAIT).await,
            "{compression}"
        );
        assert_eq!(
            lines_by_file(&rx.entries())[&log.display().to_string()],
            lines,
            "{compression}"
        );
        let requests = rx.requests();
        assert!(requests.iter().all(|r| r.status == 204
            && r.content_type.as_deref() == Some("application/x-protobuf")
            && r.content_encoding.is_none()));
        sizes.push(requests.iter().map(|r| r.body_bytes).sum::<usize>());
    }
    let line_bytes: usize = lines.iter().map(String::len).sum();
    let (snappy, none) = (sizes[0], sizes[1]);
    assert!(
        none > line_bytes,
        "uncompressed: {none} bytes for {line_bytes} of lines"
    );
    assert!(
        snappy * 3 < none,
        "snappy {snappy} bytes, uncompressed {none}"
    );
}

/// A redirect proves nothing was stored: following it turned the POST into a body-less GET of
/// `/ready`, whose 200 was taken for an acknowledgement and every line was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failed_push_never_an_acknowledgement() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let redirects = 6;
    rx.push_faults((0..redirects).map(|_| Fault::Redirect {
        location: "/ready".into(),
    }));
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "r", 0..300);
    // While the redirects last, ztail is not ready.
    let mut saw_not_ready = false;
    let started = std::time::Instant::now();
    while rx.pending_faults() > 1 && started.elapsed() < WAIT {
        saw_not_ready |= zt.get("/readyz").await.0 == 503;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        rx.wait_for(|e| e.len() >= 300, WAIT).await,
        "lines answered with a redirect were never stored: {:?}",
        rx.requests().iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(saw_not_ready, "/readyz stayed ready through the redirects");
    let statuses: Vec<u16> = rx.requests().iter().map(|r| r.status).collect();
    assert_eq!(&statuses[..redirects], &[302; 6], "{statuses:?}");
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("r", 0..300)
    );
    assert_eq!(
        zt.metric("ztail_push_requests_total{status=\"302\"}").await,
        redirects as f64
    );
    println!(
        "row redirect: {redirects} × 302 retried, not ready meanwhile, 300/300 lines stored once"
    );
}

/// nginx's own 400 page: nothing was stored, so nothing may be acknowledged.
const NGINX_400: &str = "<html>\r\n<head><title>400 Bad Request</title></head>\r\n<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_that_names_no_stream_stored_nothing_and_is_retried() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    rx.push_faults(
        [NGINX_400, "snappy: corrupt input", NGINX_400].map(|body| Fault::BadRequest {
            reason: body.into(),
        }),
    );
    let zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    let log = env.path("logs/app.log");
    append_lines(&log, "h", 0..2000);
    assert!(
        rx.wait_for(|e| e.len() >= 2000, WAIT).await,
        "lines answered with a whole-request 400 were never stored: {} of 2000",
        rx.entries().len()
    );
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("h", 0..2000)
    );
    assert_eq!(
        zt.metric("ztail_push_requests_total{status=\"400\"}").await,
        3.0
    );
    let metrics = zt.get("/metrics").await.1;
    assert!(
        !metrics.contains("ztail_dropped_entries_total{"),
        "nothing was dropped: {metrics}"
    );
    zt.wait_log("without per-stream validation errors").await;
    println!(
        "row html-400: 3 × 400 without per-stream errors retried, 2000/2000 lines stored, 0 dropped"
    );
}

/// `HTTPS_PROXY` and `ALL_PROXY` are not ztail's business: pushes go straight to Loki, and
/// through a proxy only when `sink.proxy` names one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_come_from_the_config_never_from_the_environment() {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    let proxy = ConnectProxy::start().await;
    let proxy_url = format!("http://{}", proxy.addr);
    let log = env.path("logs/app.log");
    append_lines(&log, "p", 0..100);
    let mut zt = Ztail::start_with_vars(
        &env,
        &env.config(&rx.url(), "", ""),
        &[
            ("HTTPS_PROXY", &proxy_url),
            ("https_proxy", &proxy_url),
            ("ALL_PROXY", &proxy_url),
            ("all_proxy", &proxy_url),
        ],
    );
    assert!(rx.wait_for(|e| e.len() >= 100, WAIT).await);
    assert_eq!(
        proxy.tunnels(),
        Vec::<String>::new(),
        "the environment's proxy was used"
    );
    restart_with_sink_key(&mut zt, &format!("proxy = \"{proxy_url}\""));
    append_lines(&log, "p", 100..200);
    assert!(rx.wait_for(|e| e.len() >= 200, WAIT).await);
    assert_eq!(
        proxy.tunnels(),
        vec![rx.addr().to_string()],
        "sink.proxy was not used"
    );
    assert_eq!(
        lines_by_file(&rx.entries())[&log.display().to_string()],
        expected("p", 0..200)
    );
}

/// TLS 1.2 sends ztail's certificate, with its SPIFFE ID, in the clear: refused unless the
/// operator allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_is_refused_unless_allowed() {
    let env = Env::new();
    let leaf = env.ca.issue(LOKI_ID);
    let rx = crate::support::receiver::Receiver::start(
        crate::support::receiver::ReceiverOpts::new(&leaf, &env.ca).tls12_only(),
    )
    .await;
    let log = env.path("logs/app.log");
    append_lines(&log, "t", 0..50);
    let mut zt = Ztail::start(&env, &env.config(&rx.url(), "", ""));
    assert!(
        rx.wait_for_stats(|s| s.handshake_failures >= 2, WAIT).await,
        "ztail never tried"
    );
    assert!(rx.entries().is_empty(), "a line went over TLS 1.2");
    assert_eq!(zt.get("/readyz").await.0, 503);
    restart_with_sink_key(&mut zt, "allow_tls12 = true");
    assert!(rx.wait_for(|e| e.len() >= 50, WAIT).await);
    zt.wait_log("sink.allow_tls12 is set").await;
}

/// Stops ztail, adds `key` to its `[sink]` table and starts it again.
fn restart_with_sink_key(zt: &mut Ztail, key: &str) {
    zt.terminate(Duration::from_secs(10));
    let config = std::fs::read_to_string(&zt.config_path).unwrap();
    std::fs::write(
        &zt.config_path,
        config.replace("[sink]\n", &format!("[sink]\n{key}\n")),
    )
    .unwrap();
    zt.restart();
}

/// A minimal HTTP CONNECT proxy on loopback that records the targets it tunnelled to.
struct ConnectProxy {
    addr: std::net::SocketAddr,
    tunnels: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ConnectProxy {
    async fn start() -> ConnectProxy {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = tunnels.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut client = BufReader::new(client);
                    let mut request = String::new();
                    client.read_line(&mut request).await.ok()?;
                    let target = request
                        .strip_prefix("CONNECT ")?
                        .split(' ')
                        .next()?
                        .to_owned();
                    loop {
                        let mut header = String::new();
                        client.read_line(&mut header).await.ok()?;
                        if header.trim().is_empty() {
                            break;
                        }
                    }
                    let mut upstream = tokio::net::TcpStream::connect(&target).await.ok()?;
                    seen.lock().unwrap().push(target);
                    let mut client = client.into_inner();
                    client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .ok()?;
                    tokio::io::copy_bidirectional(&mut client, &mut upstream)
                        .await
                        .ok()
                });
            }
        });
        ConnectProxy { addr, tunnels }
    }

    /// Distinct tunnel targets, in order.
    fn tunnels(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in self.tunnels.lock().unwrap().iter() {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }
}
