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

/// A request to read the config file again; answered with what became of it.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// Where reload requests come from (SIGHUP, `POST /-/reload`) and go to ([`run`]).
pub struct Reloads {
    tx: mpsc::Sender<ReloadRequest>,
    rx: mpsc::Receiver<ReloadRequest>,
}

impl Default for Reloads {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(4);
        Reloads { tx, rx }
    }
}

impl Reloads {
    pub fn handle(&self) -> ReloadHandle {
        ReloadHandle(self.tx.clone())
    }
}

/// Asks the running ztail to reload its config.
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<ReloadRequest>);

impl ReloadHandle {
    /// Reloads and waits for the outcome: `Err` says why the running config stays.
    pub async fn reload(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        if self.0.send(tx).await.is_err() {
            return Err("ztail is shutting down".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("ztail is shutting down".into()))
    }
}

/// Checks a loaded config the way `ztail check` does, beyond parsing: identity files that
/// exist must load and pass the peer policy's trust domain. Returns the warnings.
pub fn validate(config: &Config) -> anyhow::Result<Vec<String>> {
    let mut warnings = config.permission_warnings();
    if let IdentityConfig::Files(files) = &config.identity {
        let missing: Vec<_> = [&files.cert, &files.key, &files.bundle]
            .into_iter()
            .filter(|p| !p.exists())
            .collect();
        if missing.is_empty() {
            let metrics = Arc::new(Metrics::new());
            identity::files::load(files, &config.sink().policy, &metrics)
                .map_err(|e| anyhow::anyhow!("{}: identity: {e:#}", config.file.display()))?;
        }
        for p in missing {
            warnings.push(format!(
                "identity file {} does not exist yet; `ztail run` will wait for it (not ready until then)",
                p.display()
            ));
        }
    }
    Ok(warnings)
}

/// The settings a reload cannot change (they are taken once, at start), by key.
fn fixed(c: &Config) -> [(&'static str, String); 5] {
    [
        ("state_dir", c.state_dir.display().to_string()),
        ("admin.listen", c.admin.listen.to_string()),
        ("log.format", format!("{:?}", c.log.format)),
        ("log.level", c.log.level.clone()),
        ("sink.allow_tls12", c.sink().allow_tls12.to_string()),
    ]
}

/// Runs ztail until `shutdown` is cancelled, then stops reading, flushes what is in flight
/// within `sink.shutdown_timeout` and writes the final checkpoints.
///
/// A reload reads the config file again and checks it completely; an invalid file changes
/// nothing. A valid one is applied the way a graceful restart would, inside the process:
/// rotated and deleted files are drained, reading stops, what is in flight is flushed and
/// acknowledged, checkpoints are written, and everything that reads, identifies and sends
/// starts again from the new config and those checkpoints. The admin endpoint, the metrics,
/// the state directory and (while its settings are unchanged) the pod metadata stay.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    mut reloads: Reloads,
) -> anyhow::Result<()> {
    if !identity::install_tls_provider(config.sink().allow_tls12) {
        tracing::warn!(
            "a TLS provider was installed before ztail's: sink.allow_tls12 may not apply"
        );
    }
    if config.sink().allow_tls12 {
        tracing::warn!(
            "sink.allow_tls12 is set: TLS 1.2 sends ztail's certificate, and with it its SPIFFE ID, in the clear"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let state_dir = Arc::new(StateDir::open(&config.state_dir)?);
    let fixed = fixed(&config);
    let admin_listen = config.admin.listen;
    let url = config
        .sinks
        .iter()
        .map(|s| s.url.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let path = config.file.clone();
    // The text of the running config: started again if a reloaded one fails to start.
    let mut running = std::fs::read_to_string(&path).ok();
    let mut kube = Kube::default();
    let (plane, view) = Plane::start(config, &metrics, &state_dir, &mut kube)?;
    // None only when a SIGTERM came during a reload's flush: it is stopped already.
    let mut plane = Some(plane);
    let admin = Arc::new(admin::Admin::new(metrics.clone(), view, reloads.handle()));
    let background = CancellationToken::new();
    let admin_addr = admin.clone().bind(admin_listen, background.clone()).await?;
    tracing::info!(admin = %admin_addr, loki = %url, "ztail started");

    while let Some(running_plane) = plane.take() {
        let first = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = reloads.rx.recv() => r,
        };
        let Some(first) = first else {
            plane = Some(running_plane);
            break;
        };
        // Requests made while one waited are answered by the same reload.
        let mut requests = vec![first];
        while let Ok(r) = reloads.rx.try_recv() {
            requests.push(r);
        }
        let outcome = match load_for_reload(&path, &fixed) {
            Ok((c, text, warnings)) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!(config = %path.display(), "reloading: draining rotated files, then flushing batches in flight");
                running_plane.drain_rotated().await;
                running_plane.stop().await;
                if shutdown.is_cancelled() {
                    for r in requests {
                        let _ = r.send(Err("ztail is shutting down".into()));
                    }
                    break;
                }
                match Plane::start(c, &metrics, &state_dir, &mut kube) {
                    Ok((p, view)) => {
                        plane = Some(p);
                        running = Some(text);
                        admin.set_view(view);
                        tracing::info!(config = %path.display(), "config reloaded");
                        Ok(())
                    }
                    Err(e) => {
                        // The new config cannot start: the one that ran starts again.
                        let why = format!("{}: {e:#}", path.display());
                        tracing::error!(error = %why, "the reloaded config cannot start; starting the previous one again");
                        let old = running
                            .as_deref()
                            .ok_or_else(|| anyhow::anyhow!("the previous config's text is gone"))
                            .and_then(|t| Config::parse(&path, t).map_err(anyhow::Error::from))
                            .and_then(|c| Plane::start(c, &metrics, &state_dir, &mut kube));
                        let (p, view) = old.map_err(|e2| {
                            anyhow::anyhow!(
                                "{why}; and the previous config cannot start again: {e2:#}"
                            )
                        })?;
                        plane = Some(p);
                        admin.set_view(view);
                        Err(why)
                    }
                }
            }
            Err(why) => {
                tracing::error!(config = %path.display(), error = %why, "config not reloaded; the running config stays");
                plane = Some(running_plane);
                Err(why)
            }
        };
        admin.reloaded(&outcome);
        for r in requests {
            let _ = r.send(outcome.clone());
        }
    }
    if let Some(plane) = plane {
        tracing::info!(timeout = ?plane.shutdown_timeout, "shutting down: reading stopped, flushing batches in flight");
        plane.stop().await;
    }
    kube.stop();
    background.cancel();
    tracing::info!("stopped; checkpoints written");
    Ok(())
}

/// Loads and checks the config file for a reload: the config, its text and the warnings, or
/// why it is refused.
fn load_for_reload(
    path: &std::path::Path,
    running: &[(&'static str, String)],
) -> Result<(Config, String, Vec<String>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the config file: {e}", path.display()))?;
    let config = Config::parse(path, &text).map_err(|e| e.to_string())?;
    let warnings = validate(&config).map_err(|e| format!("{e:#}"))?;
    let keys: Vec<&str> = running
        .iter()
        .zip(fixed(&config))
        .filter(|(old, new)| **old != *new)
        .map(|(old, _)| old.0)
        .collect();
    if !keys.is_empty() {
        return Err(format!(
            "{}: {} cannot change on reload; restart ztail to apply it",
            path.display(),
            keys.join(", ")
        ));
    }
    // `ztail check` only warns (it may run off the node); a running ztail needs it.
    if let Some(why) = config.kubernetes.as_ref().and_then(|k| k.unresolved()) {
        return Err(format!("{}: {why}", path.display()));
    }
    Ok((config, text, warnings))
}

/// The pod metadata, kept across reloads while `[kubernetes]` is unchanged: a new one would
/// forget the pods deleted in the last minutes, whose files may still be read.
#[derive(Default)]
struct Kube(Option<(k8s::KubernetesConfig, Arc<k8s::Metadata>, CancellationToken)>);

impl Kube {
    /// The metadata for `cfg`: the running one if its settings are the same.
    fn get(
        &mut self,
        cfg: Option<k8s::KubernetesConfig>,
        metrics: &Arc<Metrics>,
    ) -> Option<Arc<k8s::Metadata>> {
        if let (Some((running, meta, _)), Some(new)) = (&self.0, &cfg)
            && running == new
        {
            return Some(meta.clone());
        }
        self.stop();
        let cfg = cfg?;
        let cancel = CancellationToken::new();
        let meta = k8s::Metadata::new(cfg.clone(), metrics.clone());
        meta.spawn(cancel.clone());
        self.0 = Some((cfg, meta.clone(), cancel));
        Some(meta)
    }

    fn stop(&mut self) {
        if let Some((_, _, cancel)) = self.0.take() {
            cancel.cancel();
        }
    }
}

/// Everything that reads, identifies and sends, started from one config.
struct Plane {
    /// One per sink, in the config's order.
    lanes: Vec<Lane>,
    /// The probes' tasks: each writes its spool, which the next plane's probe opens again.
    tasks: tokio_util::task::TaskTracker,
    /// Identity and probes.
    background: CancellationToken,
    reading: CancellationToken,
    /// The longest of the sinks' `shutdown_timeout`.
    shutdown_timeout: std::time::Duration,
}

/// A sink and the tailer that reads for it: its own positions (its checkpoint file), its own
/// batches, permits and requests. A sink that is down or slow holds back only its own reading;
/// the files are its buffer.
struct Lane {
    tailer: Arc<Tailer>,
    sink: Arc<Sink>,
    tailing: tokio::task::JoinHandle<()>,
    batcher: tokio::task::JoinHandle<()>,
    checkpoints: tokio::task::JoinHandle<()>,
    sink_done: oneshot::Sender<()>,
    shutdown_timeout: std::time::Duration,
}

impl Plane {
    fn start(
        config: Config,
        metrics: &Arc<Metrics>,
        state_dir: &Arc<StateDir>,
        kube: &mut Kube,
    ) -> anyhow::Result<(Plane, admin::View)> {
        if let Some(why) = config.kubernetes.as_ref().and_then(|k| k.unresolved()) {
            anyhow::bail!("{}: {why}", config.file.display());
        }
        let background = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let policy = config.sink().policy.clone();
        let identity = match config.identity {
            IdentityConfig::Files(files) => {
                identity::files::spawn(files, policy, metrics.clone(), background.clone())
            }
            IdentityConfig::Spiffe(workload) => {
                identity::workload::spawn(workload, policy, metrics.clone(), background.clone())
            }
        };
        // Probes spool into the state directory; their spools are sources of the tailers.
        let probes = probe::spawn(
            config.probes,
            &config.state_dir,
            identity.clone(),
            metrics.clone(),
            background.clone(),
            &tasks,
        )?;
        let reading = CancellationToken::new();
        let kube = kube.get(config.kubernetes, metrics);
        let names: Vec<&str> = config.sinks.iter().map(|s| s.name.as_str()).collect();
        state_dir.drop_other_sinks(&names);
        metrics.forget_sink_gauges();
        let mut lanes = Vec::with_capacity(config.sinks.len());
        let mut views = Vec::with_capacity(config.sinks.len());
        for (i, sc) in config.sinks.iter().enumerate() {
            let sources: Vec<_> = config
                .sources
                .iter()
                .filter(|s| s.sinks.is_empty() || s.sinks.contains(&sc.name))
                .cloned()
                .collect();
            let tracker = Arc::new(AckTracker::default());
            let mut settings = loki::client::SinkSettings::from(sc);
            if i > 0 {
                settings.policy = Some(sc.policy.clone());
            }
            let sink = Arc::new(Sink::new(
                settings,
                identity.clone(),
                metrics.clone(),
                tracker.clone(),
            ));
            let tailer = Tailer::new(
                sources,
                config.tail.clone(),
                Arc::new(state_dir.for_sink(&sc.name)),
                metrics.clone(),
                reading.clone(),
                kube.clone(),
                tail::Lane {
                    sink: sc.name.clone(),
                    file_gauges: i == 0,
                },
            );
            let (tx, rx) = mpsc::channel(CHUNK_QUEUE);
            let batcher = tokio::spawn(
                Batcher {
                    rx,
                    batch_bytes: sc.batch_bytes,
                    batch_wait: sc.batch_wait,
                    tracker,
                    sink: sink.clone(),
                    permits: Arc::new(Semaphore::new(sc.max_in_flight)),
                }
                .run(),
            );
            let tailing = tokio::spawn(tailer.clone().run(tx));
            let (sink_done, sink_done_rx) = oneshot::channel::<()>();
            let checkpoints = tokio::spawn(tailer.clone().checkpoint_loop(async {
                let _ = sink_done_rx.await;
            }));
            views.push(admin::SinkView {
                name: sc.name.clone(),
                url: sc.url.to_string(),
                tailer: tailer.clone(),
                sink: sink.clone(),
            });
            lanes.push(Lane {
                tailer,
                sink,
                tailing,
                batcher,
                checkpoints,
                sink_done,
                shutdown_timeout: sc.shutdown_timeout,
            });
        }
        let view = admin::View {
            sinks: views,
            identity,
            probes,
            kube,
        };
        let plane = Plane {
            shutdown_timeout: lanes
                .iter()
                .map(|l| l.shutdown_timeout)
                .max()
                .unwrap_or_default(),
            lanes,
            tasks,
            background,
            reading,
        };
        Ok((plane, view))
    }

    /// Waits (at most `sink.shutdown_timeout`) until the files renamed or deleted away are read
    /// and acknowledged to their end by every sink: the next plane can find a file rotated
    /// within its directory by its checkpoint, but not one deleted or moved elsewhere.
    async fn drain_rotated(&self) {
        let until = tokio::time::Instant::now() + self.shutdown_timeout;
        loop {
            // Pending: moved away, and either its task has not reached its end since (it marks
            // the file rotated there, with its size), or not all of it is acknowledged. A file
            // given up (`tail.max_rotated_hold`) is not waited for.
            let pending = self
                .lanes
                .iter()
                .flat_map(|l| l.tailer.files())
                .filter(|f| !f.abandoned() && f.moved_away())
                .map(|f| f.status())
                .filter(|f| f.state == tail::FileState::Active || f.committed_offset < f.size)
                .count();
            if pending == 0 {
                return;
            }
            if tokio::time::Instant::now() >= until {
                tracing::warn!(
                    files = pending,
                    "reloading before every rotated or deleted file was drained (sink.shutdown_timeout): the unread lines of a deleted one are lost"
                );
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Stops reading, flushes what is in flight within each sink's `shutdown_timeout` and
    /// writes the final checkpoints.
    async fn stop(self) {
        let Plane {
            lanes,
            tasks,
            background,
            reading,
            ..
        } = self;
        reading.cancel();
        futures::future::join_all(lanes.into_iter().map(Lane::stop)).await;
        background.cancel();
        tasks.close();
        tasks.wait().await;
    }
}

impl Lane {
    async fn stop(self) {
        let Lane {
            sink,
            mut tailing,
            mut batcher,
            checkpoints,
            sink_done,
            shutdown_timeout,
            ..
        } = self;
        let flushed = tokio::time::timeout(shutdown_timeout, async {
            let _ = (&mut tailing).await;
            let _ = (&mut batcher).await;
            sink.drain().await;
        })
        .await;
        if flushed.is_err() {
            tracing::warn!(
                sink = %sink.name(),
                "shutdown timeout reached with batches unacknowledged; they will be read and sent again"
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
    }
}
