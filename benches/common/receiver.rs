//! The counting Loki receiver the benchmark harnesses run in a process of their own, so that
//! its CPU is not counted as ztail's: [`spawn`] starts it (the harness re-runs itself with
//! `--receiver`), [`receiver`] is its body.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::support::receiver::proto::PushRequest;
use crate::support::ztail::{Env, LOKI_ID};

/// A running receiver process and its output (`COUNT` and, with seqs, `SEQ` lines).
pub struct Rx {
    pub child: Child,
    pub port: u16,
    pub out: BufReader<ChildStdout>,
}

/// The arguments [`spawn`] passes after `--receiver`: the receiver's certificate, key and the
/// client CA bundle, written into the env once.
pub fn cert_args(env: &Env) -> Vec<String> {
    let dir = env.path("receiver");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = env.ca.issue(LOKI_ID).write(&dir, "loki");
    let bundle = env.ca.write_bundle(&dir, "ca");
    [cert, key, bundle]
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

/// Starts the receiver on `port` (0: any); `seqs` adds the `SEQ` lines. Returns once it
/// listens; panics if it could not take the port asked for.
pub fn spawn(certs: &[String], seqs: bool, port: u16) -> Rx {
    spawn_slow(certs, seqs, port, 0)
}

/// [`spawn`], with a receiver that waits `delay_ms` before it answers each request.
pub fn spawn_slow(certs: &[String], seqs: bool, port: u16, delay_ms: u64) -> Rx {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg(if seqs {
            "--receiver-seqs"
        } else {
            "--receiver"
        })
        .args(certs)
        .arg(port.to_string())
        .arg(delay_ms.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let got: u16 = first
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the receiver did not start: {first:?}"));
    assert!(port == 0 || got == port, "asked for port {port}, got {got}");
    Rx {
        child,
        port: got,
        out,
    }
}

/// Runs the receiver if the harness was started as one (`--receiver[-seqs] ARGS`).
pub fn run_if_asked(args: &[String]) -> bool {
    match args.first().map(String::as_str) {
        Some("--receiver") => receiver(&args[1..], false),
        Some("--receiver-seqs") => receiver(&args[1..], true),
        _ => return false,
    }
    true
}

/// The words of a `SEQ` line: the last word of each line the receiver decoded.
pub fn last_words(line: &str) -> Option<impl Iterator<Item = &str>> {
    Some(line.strip_prefix("SEQ")?.split_whitespace())
}

/// A hash of a line, summed over lines: equal sums and counts mean the same multiset of lines
/// (with overwhelming probability), whatever the arrival order. Word at a time, so that the
/// receiver, which shares the cores with ztail, spends little on it.
pub fn digest(line: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ line.len() as u64;
    let mut words = line.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().unwrap());
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (h >> 31)
}

/// The counting receiver: decodes every request fully (snappy, protobuf) and prints running
/// totals (`COUNT n DIGEST d`), and with `seqs` the trailing number of every line (`SEQ a b ..`).
/// Args: server cert, key, client CA bundle (PEM files), optionally a port.
fn receiver(args: &[String], seqs: bool) {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use prost::Message;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args[0])
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&args[1]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&args[2]).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let port: u16 = args.get(3).and_then(|p| p.parse().ok()).unwrap_or(0);
        let delay =
            std::time::Duration::from_millis(args.get(4).and_then(|p| p.parse().ok()).unwrap_or(0));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        println!("PORT {}", listener.local_addr().unwrap().port());
        let totals = Arc::new(std::sync::Mutex::new((0u64, 0u64)));
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, totals) = (acceptor.clone(), totals.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let totals = totals.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let raw = snap::raw::Decoder::new()
                                .decompress_vec(&body)
                                .expect("snappy block");
                            let push = PushRequest::decode(Bytes::from(raw)).expect("protobuf");
                            let (mut n, mut s) = (0u64, 0u64);
                            let mut seq_line = String::new();
                            for stream in &push.streams {
                                for e in &stream.entries {
                                    n += 1;
                                    s = s.wrapping_add(digest(&e.line));
                                    if seqs {
                                        let tail = e
                                            .line
                                            .rsplit(|&b| b == b' ')
                                            .next()
                                            .unwrap_or_default();
                                        seq_line.push(' ');
                                        seq_line.push_str(&String::from_utf8_lossy(tail));
                                    }
                                }
                            }
                            if seqs {
                                println!("SEQ{seq_line}");
                            }
                            {
                                // Printed under the lock, so the totals never go backwards.
                                let mut t = totals.lock().unwrap();
                                t.0 += n;
                                t.1 = t.1.wrapping_add(s);
                                println!("COUNT {} DIGEST {}", t.0, t.1);
                            }
                            tokio::time::sleep(delay).await;
                            let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = hyper::StatusCode::NO_CONTENT;
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
}

/// Follows a receiver's `COUNT` lines (one per request): the lines so far and their digest sum.
pub fn counts(out: BufReader<ChildStdout>) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
    let (count, sum) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (c, s) = (count.clone(), sum.clone());
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if let Some(rest) = l.strip_prefix("COUNT ") {
                let mut it = rest.split_whitespace();
                c.store(it.next().unwrap().parse().unwrap(), Ordering::SeqCst);
                s.store(it.nth(1).unwrap().parse().unwrap(), Ordering::SeqCst);
            }
        }
    });
    (count, sum)
}
