//! A fault-injecting stand-in for the SPIFFE Workload API, on a Unix socket in a temp dir, for
//! what a real SPIRE agent cannot be made to do: fail a stream mid-flight, answer
//! InvalidArgument, send malformed or expired SVIDs, send empty bundles.
//!
//! It speaks gRPC over HTTP/2 by hand (length-prefixed protobuf frames, `grpc-status`
//! trailers): only `FetchX509SVID` is served. Each call plays the next [`Call`] script.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Request, Response};
use prost::Message;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// `X509SVIDResponse` (workload.proto).
#[derive(Clone, PartialEq, Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    /// Bundles of federated trust domains, keyed by `spiffe://<trust domain>`.
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: std::collections::HashMap<String, Vec<u8>>,
}

/// `X509SVID` (workload.proto).
#[derive(Clone, PartialEq, Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

impl X509Svid {
    /// An SVID message from a test leaf and its CA.
    pub fn from_leaf(leaf: &super::pki::Leaf, ca: &super::pki::Ca) -> X509Svid {
        X509Svid {
            spiffe_id: leaf.spiffe_id.clone(),
            x509_svid: leaf.cert_der.clone(),
            x509_svid_key: leaf.key_der.clone(),
            bundle: ca.cert_der.clone(),
            hint: String::new(),
        }
    }
}

/// One step of a call.
#[derive(Clone, Debug)]
pub enum Step {
    /// Send this response on the stream.
    Send(X509SvidResponse),
    Wait(Duration),
    /// End the call with this gRPC status code (3 InvalidArgument, 7 PermissionDenied,
    /// 14 Unavailable ...).
    Fail(u32, String),
}

/// The script of one `FetchX509SVID` call; after its last step the stream stays open.
pub type Call = Vec<Step>;

pub struct StandIn {
    pub dir: tempfile::TempDir,
    calls: Arc<Mutex<VecDeque<Call>>>,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl StandIn {
    /// Serves on `<tempdir>/api.sock`; calls beyond the scripts hang without sending anything.
    pub fn start(scripts: Vec<Call>) -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("api.sock")).unwrap();
        let calls = Arc::new(Mutex::new(VecDeque::from(scripts)));
        let served = Arc::new(AtomicUsize::new(0));
        let (c, s) = (calls.clone(), served.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, s) = (c.clone(), s.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| handle(req, c.clone(), s.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        StandIn {
            dir,
            calls,
            served,
            task,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// `FetchX509SVID` calls received so far.
    pub fn calls(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

async fn handle(
    req: Request<hyper::body::Incoming>,
    calls: Arc<Mutex<VecDeque<Call>>>,
    served: Arc<AtomicUsize>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let has_header = req
        .headers()
        .get("workload.spiffe.io")
        .is_some_and(|v| v == "true");
    let _ = req.into_body().collect().await;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
    let response = Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    if path != "/SpiffeWorkloadAPI/FetchX509SVID" {
        tokio::spawn(finish(tx, 12, "only FetchX509SVID is served".into()));
        return Ok(response);
    }
    if !has_header {
        tokio::spawn(finish(tx, 3, "security header missing from request".into()));
        return Ok(response);
    }
    served.fetch_add(1, Ordering::SeqCst);
    let script = calls.lock().unwrap().pop_front().unwrap_or_default();
    tokio::spawn(async move {
        for step in script {
            match step {
                Step::Send(msg) => {
                    let body = msg.encode_to_vec();
                    let mut frame = Vec::with_capacity(5 + body.len());
                    frame.push(0);
                    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
                    frame.extend_from_slice(&body);
                    if tx.send(Ok(Frame::data(Bytes::from(frame)))).await.is_err() {
                        return;
                    }
                }
                Step::Wait(d) => tokio::time::sleep(d).await,
                Step::Fail(code, msg) => return finish(tx, code, msg).await,
            }
        }
        // Keep the stream open until the client goes away.
        tx.closed().await;
    });
    Ok(response)
}

async fn finish(tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>, code: u32, message: String) {
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", code.to_string().parse().unwrap());
    trailers.insert("grpc-message", message.parse().unwrap());
    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
}
