//! `ztail-terminator`: a SPIFFE mutual-TLS terminator for a log store that cannot verify client
//! certificates itself (VictoriaLogs' open-source build, a Loki without TLS). It takes its own
//! SVID from the SPIFFE Workload API, accepts only clients whose SPIFFE ID is allowed, and
//! forwards the decrypted bytes to the store on loopback. SVID rotation is live (spiffe-rustls
//! reads the current SVID at every handshake).
//!
//! It is the Loki side of ztail's demo and end-to-end tests; in production put Loki behind
//! whatever terminator you trust (ghostunnel, Envoy with SDS) or give Loki its own SVID.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use spiffe::X509Source;
use spiffe::x509_source::SvidPicker;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

#[derive(Parser)]
#[command(
    name = "ztail-terminator",
    about = "SPIFFE mutual-TLS terminator in front of a log store"
)]
struct Args {
    /// Address to accept TLS on.
    #[arg(long)]
    listen: SocketAddr,
    /// The store's plain-TCP address (loopback).
    #[arg(long)]
    upstream: SocketAddr,
    /// SPIFFE IDs allowed to connect (repeatable).
    #[arg(long = "allow-id", required = true)]
    allow_ids: Vec<String>,
    /// Workload API address (default: $SPIFFE_ENDPOINT_SOCKET).
    #[arg(long)]
    socket: Option<String>,
    /// Use the SVID with this hint.
    #[arg(long)]
    hint: Option<String>,
}

struct Hint(String);

impl SvidPicker for Hint {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0.as_str()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let endpoint = match args.socket.clone() {
        Some(s) => s,
        None => std::env::var("SPIFFE_ENDPOINT_SOCKET")
            .context("no --socket and SPIFFE_ENDPOINT_SOCKET is empty")?,
    };
    let mut builder = X509Source::builder()
        .endpoint(&endpoint)
        .initial_sync_timeout(Duration::from_secs(120));
    if let Some(h) = &args.hint {
        builder = builder.picker(Hint(h.clone()));
    }
    let source = builder
        .build()
        .await
        .with_context(|| format!("no SVID from the Workload API at {endpoint}"))?;
    let svid = source.svid()?;
    let config = spiffe_rustls::mtls_server(source.clone())
        .authorize(spiffe_rustls::authorizer::exact(
            args.allow_ids.iter().map(String::as_str),
        )?)
        .build()?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, upstream = %args.upstream, spiffe_id = %svid.spiffe_id(), allowed = ?args.allow_ids, "terminating SPIFFE mTLS");

    let serve = async {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let upstream = args.upstream;
            tokio::spawn(async move {
                if let Err(e) = forward(acceptor, tcp, upstream).await {
                    tracing::warn!(%peer, error = %format!("{e:#}"), "connection refused or failed");
                }
            });
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = shutdown() => tracing::info!("stopping"),
    }
    source.shutdown().await;
    Ok(())
}

async fn forward(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    upstream: SocketAddr,
) -> anyhow::Result<()> {
    let mut tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let peer_id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| spiffe::cert::spiffe_id_from_der(leaf.as_ref()).ok())
        .map(|id| id.to_string())
        .unwrap_or_default();
    tracing::debug!(client = %peer_id, "accepted");
    let mut up = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("cannot reach the store at {upstream}"))?;
    tokio::io::copy_bidirectional(&mut tls, &mut up).await?;
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    if let Ok(mut term) = signal(SignalKind::terminate()) {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    } else {
        let _ = tokio::signal::ctrl_c().await;
    }
}
