//! The counting Loki receiver the benchmark harnesses run in a process of their own, so that
//! its CPU is not counted as ztail's.

use std::sync::Arc;

use crate::support::receiver::proto::PushRequest;

/// FNV-1a of a line, summed over lines: equal sums and counts mean the same multiset of lines
/// (with overwhelming probability), whatever the arrival order.
pub fn digest(line: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in line {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The counting receiver: decodes every request fully (snappy, protobuf) and prints running
/// totals (`COUNT n DIGEST d`), and with `seqs` the trailing number of every line (`SEQ a b ..`).
/// Args: server cert, key, client CA bundle (PEM files), optionally a port.
pub fn receiver(args: &[String], seqs: bool) {
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
                            let push = PushRequest::decode(raw.as_slice()).expect("protobuf");
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
                            let (count, sum) = {
                                let mut t = totals.lock().unwrap();
                                t.0 += n;
                                t.1 = t.1.wrapping_add(s);
                                *t
                            };
                            println!("COUNT {count} DIGEST {sum}");
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
