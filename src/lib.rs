//! ztail: tails log files and pushes them to Grafana Loki over SPIFFE mutual TLS, persisting a
//! file position only after Loki has acknowledged every line before it.
//!
//! Data flows one way, acknowledgements flow back (see `ARCHITECTURE.md`):
//! [`tail`] reads files into chunks → [`pipeline`] batches them → [`loki`] pushes them with the
//! client config published by [`identity`] → acknowledgements advance the positions that
//! [`tail::checkpoint`] persists. [`admin`] shows it all on loopback.
//!
//! ztail transforms log lines only as a source's framing says (CRI/Docker records decoded,
//! partial records joined, multiline groups, timestamps and metadata extracted; see
//! [`tail::format`]), and it never sends anything without verified mutual TLS.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod convert;
pub mod identity;
pub mod journal;
pub mod k8s;
pub mod loki;
pub mod metrics;
pub mod pipeline;
pub mod probe;
pub mod stage;
pub mod tail;

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use config::Config;
use identity::config::IdentityConfig;
use loki::client::Sink;
use metrics::Metrics;
use pipeline::ack::AckTracker;
use pipeline::batcher::Batcher;
use tail::Tailer;
use tail::checkpoint::StateDir;

/// Chunks queued between the tailers and the batcher (each at most `tail.read_buffer` bytes).
const CHUNK_QUEUE: usize = 8;

/// Lets go of the buffers kept for reuse if ztail has been idle since the previous call. The
/// binary calls it every few seconds, before handing free heap pages back to the kernel.
pub fn release_idle_memory() {
    loki::encode::release_idle_buffers();
}

/// Runs ztail until `shutdown` is cancelled, then stops reading, flushes what is in flight
/// within `sink.shutdown_timeout` and writes the final checkpoints.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !identity::install_tls_provider(config.sink.allow_tls12) {
        tracing::warn!(
            "a TLS provider was installed before ztail's: sink.allow_tls12 may not apply"
        );
    }
    if config.sink.allow_tls12 {
        tracing::warn!(
            "sink.allow_tls12 is set: TLS 1.2 sends ztail's certificate, and with it its SPIFFE ID, in the clear"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let state_dir = StateDir::open(&config.state_dir)?;
    let background = CancellationToken::new();
    let identity = match config.identity {
        IdentityConfig::Files(files) => identity::files::spawn(
            files,
            config.sink.policy.clone(),
            metrics.clone(),
            background.clone(),
        ),
        IdentityConfig::Spiffe(workload) => identity::workload::spawn(
            workload,
            config.sink.policy.clone(),
            metrics.clone(),
            background.clone(),
        ),
    };
    let tracker = Arc::new(AckTracker::default());
    let sink = Arc::new(Sink::new(
        (&config.sink).into(),
        identity.clone(),
        metrics.clone(),
        tracker.clone(),
    ));
    // Probes spool into the state directory; their spools are sources of the tailer.
    let probes = probe::spawn(
        config.probes,
        &config.state_dir,
        identity.clone(),
        metrics.clone(),
        background.clone(),
    )?;
    let reading = CancellationToken::new();
    if let Some(why) = config.kubernetes.as_ref().and_then(|k| k.unresolved()) {
        anyhow::bail!("{}: {why}", config.file.display());
    }
    let kube = config.kubernetes.map(|k| {
        let meta = k8s::Metadata::new(k, metrics.clone());
        meta.spawn(background.clone());
        meta
    });
    let tailer = Tailer::new(
        config.sources,
        config.tail,
        state_dir,
        metrics.clone(),
        reading.clone(),
        kube.clone(),
    );
    let admin = admin::Admin {
        metrics: metrics.clone(),
        tailer: tailer.clone(),
        sink: sink.clone(),
        identity,
        probes,
        kube,
    };
    let admin_addr = admin.bind(config.admin.listen, background.clone()).await?;
    tracing::info!(admin = %admin_addr, loki = %config.sink.url, "ztail started");

    let (tx, rx) = mpsc::channel(CHUNK_QUEUE);
    let mut batcher = tokio::spawn(
        Batcher {
            rx,
            batch_bytes: config.sink.batch_bytes,
            batch_wait: config.sink.batch_wait,
            tracker,
            sink: sink.clone(),
            permits: Arc::new(Semaphore::new(config.sink.max_in_flight)),
        }
        .run(),
    );
    let mut tailing = tokio::spawn(tailer.clone().run(tx));
    let (sink_done, sink_done_rx) = oneshot::channel::<()>();
    let checkpoints = tokio::spawn(tailer.clone().checkpoint_loop(async {
        let _ = sink_done_rx.await;
    }));

    shutdown.cancelled().await;
    tracing::info!(timeout = ?config.sink.shutdown_timeout, "shutting down: reading stopped, flushing batches in flight");
    reading.cancel();
    let flushed = tokio::time::timeout(config.sink.shutdown_timeout, async {
        let _ = (&mut tailing).await;
        let _ = (&mut batcher).await;
        sink.drain().await;
    })
    .await;
    if flushed.is_err() {
        tracing::warn!(
            "shutdown timeout reached with batches unacknowledged; they will be read and sent again after the restart"
        );
        sink.stop();
        // A JoinHandle must not be awaited again once the timed-out future saw it complete.
        if !tailing.is_finished() {
            let _ = tailing.await;
        }
        if !batcher.is_finished() {
            let _ = batcher.await;
        }
        sink.drain().await;
    }
    let _ = sink_done.send(());
    let _ = checkpoints.await;
    background.cancel();
    tracing::info!("stopped; checkpoints written");
    Ok(())
}
