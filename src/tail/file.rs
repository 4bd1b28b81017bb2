//! The tailer task of one file: read to the end, hand the chunks to the pipeline, then watch for
//! growth, truncation, rotation and deletion.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::config::{NamedFormat, SourceConfig};
use super::reader::{FileReader, ReadLines};
use super::{FileState, Tailer, TrackedFile};
use crate::k8s::{Metadata, View};
use crate::pipeline::{Chunk, Entry, Meta, Position, Stream};
use crate::stage::Runner;

/// How often an idle file is checked when no inotify event arrives (events can be dropped).
const POLL: Duration = Duration::from_millis(500);

pub(super) struct Context {
    pub tailer: Arc<Tailer>,
    pub tx: mpsc::Sender<Chunk>,
    pub max_partial_age: Duration,
    pub rotate_wait: Duration,
    /// The file's source, an index of the tailer's.
    pub source: usize,
    /// The path that names the file's streams (where it was found).
    pub named: PathBuf,
}

/// What a file's entries become: its streams, its stages and the metadata its pod adds. Made
/// from its source, and again whenever its pod's metadata changes.
struct Shape {
    streams: Vec<Arc<Stream>>,
    runner: Option<Runner>,
    meta_names: Arc<[String]>,
    /// The pod's structured metadata, (index in `meta_names`, value), added to every entry.
    pod_meta: Vec<(u8, Vec<u8>)>,
    /// The pod or its container opted out.
    exclude: bool,
}

/// The source's format a pod's view chose, if any.
fn format_of<'a>(src: &'a SourceConfig, view: Option<&View>) -> Option<&'a NamedFormat> {
    let name = view?.format.as_deref()?;
    src.formats.iter().find(|f| f.name == name)
}

impl Shape {
    fn new(file: &TrackedFile, ctx: &Context, view: Option<&View>) -> Shape {
        let tailer = &ctx.tailer;
        let src = &tailer.sources[ctx.source];
        let format = format_of(src, view);
        let framing = format.map_or(&src.framing, |f| &f.framing);
        let pipeline = format.map_or(&src.stages, |f| &f.stages);
        let tenant = view.and_then(|v| v.tenant.clone());
        let streams: Vec<Arc<Stream>> = super::label_sets(src, &ctx.named)
            .into_iter()
            .map(|mut set| {
                for (k, v) in view.map_or(&[][..], |v| &v.labels) {
                    set = set.with(k, v);
                }
                tailer.streams.get(&set, tenant.clone())
            })
            .collect();
        let mut names = framing.meta_names();
        let mut pod_meta = Vec::new();
        if let Some(k) = tailer.kube.as_ref().filter(|_| src.kubernetes) {
            for (name, _) in &k.config().metadata {
                if let Some((_, v)) = view.and_then(|v| v.metadata.iter().find(|(n, _)| n == name))
                {
                    pod_meta.push((names.len() as u8, v.as_bytes().to_vec()));
                }
                names.push(name.clone());
            }
        }
        let base = names.len();
        if let Some(p) = pipeline {
            names.extend(p.meta_names().iter().cloned());
        }
        let runner = pipeline.clone().map(|p| {
            Runner::new(
                p,
                &streams,
                &tailer.streams,
                base,
                &file.source,
                &tailer.metrics,
            )
        });
        Shape {
            streams,
            runner,
            meta_names: names.into(),
            pod_meta,
            exclude: view.is_some_and(|v| v.exclude),
        }
    }
}

/// A file's pod: where its metadata comes from.
struct PodLink {
    meta: Arc<Metadata>,
    uid: String,
    container: String,
    formats: Vec<String>,
    /// The cache generation `view` is of.
    generation: u64,
    view: Option<View>,
    /// Set once the file's first read is near: its reader's framing is fixed from then on (a
    /// framer holds state between reads), so later views keep the format of that one.
    started: bool,
}

impl PodLink {
    fn of(ctx: &Context) -> Option<PodLink> {
        let src = &ctx.tailer.sources[ctx.source];
        let meta = ctx.tailer.kube.clone().filter(|_| src.kubernetes)?;
        let (uid, container) = crate::k8s::pod_of_path(&ctx.named)?;
        Some(PodLink {
            meta,
            uid: uid.to_owned(),
            container: container.to_owned(),
            formats: src.formats.iter().map(|f| f.name.clone()).collect(),
            generation: u64::MAX,
            view: None,
            started: false,
        })
    }

    /// Looks the pod up again if the cache changed; true if its view did. A pod gone from the
    /// cache leaves the last view in place (its files are drained with its labels); the format
    /// is the one the file started with.
    fn refresh(&mut self, file: &TrackedFile) -> bool {
        let g = self.meta.generation();
        if g == self.generation {
            return false;
        }
        self.generation = g;
        let Some(mut v) = self.meta.view(&self.uid, &self.container, &self.formats) else {
            return false;
        };
        if self.started {
            v.format = self.view.as_ref().and_then(|old| old.format.clone());
        }
        if self.view.as_ref() == Some(&v) {
            return false;
        }
        for why in &v.refused {
            if self
                .view
                .as_ref()
                .is_none_or(|old| !old.refused.contains(why))
            {
                tracing::warn!(path = %file.path().display(), pod_uid = %self.uid, "annotation ignored: {why}");
            }
        }
        self.view = Some(v);
        true
    }

    /// Waits for the pod (and its namespace's labels) to be known, at most `kubernetes.wait`;
    /// the view it ends with fixes the file's format.
    async fn wait(&mut self, file: &TrackedFile, ctx: &Context) {
        let deadline = Instant::now() + self.meta.config().wait;
        loop {
            let seen = self.meta.generation();
            self.refresh(file);
            if self.view.as_ref().is_some_and(|v| v.complete) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if self.view.is_none() {
                    self.meta.note_missing(&ctx.named, &self.uid);
                }
                break;
            }
            tokio::select! {
                _ = self.meta.changed(seen, left) => {}
                _ = ctx.tailer.cancel.cancelled() => break,
            }
        }
        self.started = true;
    }
}

pub(super) async fn run(file: Arc<TrackedFile>, mut reader: FileReader, mut ctx: Context) {
    let mut last_end = reader.position();
    let mut pod = PodLink::of(&ctx);
    if let Some(pod) = &mut pod {
        pod.wait(&file, &ctx).await;
        let src = &ctx.tailer.sources[ctx.source];
        if let Some(f) = format_of(src, pod.view.as_ref()) {
            reader.set_framing(f.framing.clone());
            ctx.max_partial_age = f.framing.max_partial_age(src.partial_line_timeout);
        }
    }
    let mut shape = Shape::new(&file, &ctx, pod.as_ref().and_then(|p| p.view.as_ref()));
    let mut reader = Some(reader);
    let mut partial_since: Option<Instant> = None;
    let mut rotated_since: Option<Instant> = None;
    // The file's own token: cancelled with the tailer's, or alone when the file is given up.
    let cancel = file.stop.clone();
    let metrics = ctx.tailer.metrics.clone();
    'outer: loop {
        if cancel.is_cancelled() {
            break;
        }
        // Read everything there is.
        loop {
            // A read's buffer is held until the chunk is queued; the permit bounds how many
            // files hold one at a time.
            let permit = tokio::select! {
                p = ctx.tailer.read_permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'outer,
                },
                _ = cancel.cancelled() => break 'outer,
            };
            let Some(mut r) = reader.take() else {
                break 'outer;
            };
            let (r, result) = match tokio::task::spawn_blocking(move || {
                let res = r.read_chunk();
                (r, res)
            })
            .await
            {
                Ok(v) => v,
                Err(_) => break 'outer, // the runtime is shutting down
            };
            file.read_offset.store(r.read_offset(), Ordering::Relaxed);
            // The lag is reported while a backlog is read, not only once it is read up.
            file.size.store(r.size(), Ordering::Relaxed);
            file.note_head(r.fingerprint());
            let has_partial = r.has_partial();
            reader = Some(r);
            match result {
                Ok(Some(lines)) => {
                    let sent = send(&file, &ctx, &mut shape, &mut pod, lines, &mut last_end).await;
                    drop(permit);
                    if !sent {
                        break 'outer;
                    }
                    partial_since = has_partial.then(Instant::now);
                    if cancel.is_cancelled() {
                        break 'outer;
                    }
                }
                Ok(None) => {
                    if has_partial && partial_since.is_none() {
                        partial_since = Some(Instant::now());
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(path = %file.path().display(), error = %e, "read error; retrying");
                    break;
                }
            }
        }
        let Some(r) = reader.as_mut() else { break };

        // At the end of what is there: has the file changed under us?
        let meta = match r.file().metadata() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(path = %file.path().display(), error = %e, "cannot stat an open file");
                break;
            }
        };
        file.size.store(meta.len(), Ordering::Relaxed);
        if meta.len() < r.read_offset() || r.rewritten().unwrap_or(false) {
            metrics.file_truncations.inc();
            tracing::warn!(
                path = %file.path().display(),
                offset = r.read_offset(),
                size = meta.len(),
                "file truncated (copytruncate?); reading it again from the beginning. Lines written between the last read and the truncation are lost: prefer rename rotation"
            );
            if r.reset().is_err() {
                break;
            }
            last_end = r.position();
            partial_since = None;
            continue;
        }
        if meta.len() > r.read_offset() {
            continue;
        }
        if let Some(since) = partial_since
            && since.elapsed() >= ctx.max_partial_age
            && let Some(lines) = r.flush_partial()
        {
            partial_since = None;
            if !send(&file, &ctx, &mut shape, &mut pod, lines, &mut last_end).await {
                break;
            }
            continue;
        }

        // Rotation and deletion: is this file still at its path?
        let deleted = meta.nlink() == 0;
        file.deleted.store(deleted, Ordering::Relaxed);
        if file.is_at(&file.path()) && !deleted {
            if rotated_since.take().is_some() {
                file.set_state(FileState::Active);
            }
        } else {
            let since = *rotated_since.get_or_insert_with(|| {
                tracing::info!(path = %file.path().display(), deleted, "file rotated or deleted; draining it before closing");
                file.set_state(FileState::Rotated);
                ctx.tailer.release_path(&file);
                Instant::now()
            });
            if since.elapsed() >= ctx.rotate_wait {
                if let Some(lines) = r.flush_partial() {
                    send(&file, &ctx, &mut shape, &mut pod, lines, &mut last_end).await;
                }
                break;
            }
        }

        let mut wait = POLL;
        if let Some(since) = partial_since {
            wait = wait.min(ctx.max_partial_age.saturating_sub(since.elapsed()));
        }
        tokio::select! {
            _ = file.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => break,
        }
    }
    if ctx.tailer.cancel.is_cancelled() {
        // Shutting down: the file stays tracked so that the final checkpoint records it.
        return;
    }
    if file.abandoned() {
        given_up(&file, &ctx, reader.as_ref());
    }
    file.set_state(FileState::Closed);
    ctx.tailer.release_path(&file);
    tracing::debug!(path = %file.path().display(), "closed");
}

/// Logs and counts a file given up after `tail.max_rotated_hold`: at most what its sink has
/// not acknowledged of it, up to its size now (chunks already queued may still arrive).
fn given_up(file: &TrackedFile, ctx: &Context, reader: Option<&FileReader>) {
    let size = reader
        .and_then(|r| r.file().metadata().ok())
        .map_or(0, |m| m.len());
    file.size.fetch_max(size, Ordering::Relaxed);
    let lost = file.lag();
    let sink = &ctx.tailer.lane.sink;
    tracing::error!(
        path = %file.path().display(),
        sink = %sink,
        lost_bytes = lost,
        held = ?ctx.tailer.cfg.max_rotated_hold,
        "a rotated or deleted file was still not acknowledged by this sink after tail.max_rotated_hold; closed it: up to lost_bytes of it are lost for this sink"
    );
    ctx.tailer.metrics.sink_lost(sink).inc_by(lost);
}

/// Hands entries to the pipeline; false once the pipeline is gone. `last_end` is the position
/// after the previous read; it becomes this read's end.
///
/// Boxed: inline, its state would make every file's task twice as large (half of it never used
/// while a file is idle, which with 1,000 files is a megabyte).
fn send<'a>(
    file: &'a TrackedFile,
    ctx: &'a Context,
    shape: &'a mut Shape,
    pod: &'a mut Option<PodLink>,
    lines: ReadLines,
    last_end: &'a mut Position,
) -> Pin<Box<impl Future<Output = bool> + 'a>> {
    Box::pin(queue(file, ctx, shape, pod, lines, last_end))
}

/// [`send`], unboxed.
async fn queue(
    file: &TrackedFile,
    ctx: &Context,
    shape: &mut Shape,
    pod: &mut Option<PodLink>,
    lines: ReadLines,
    last_end: &mut Position,
) -> bool {
    let metrics = &ctx.tailer.metrics;
    metrics.lines_read.inc_by(lines.records);
    metrics.bytes_read.inc_by(lines.bytes);
    if lines.truncated_lines > 0 {
        metrics.lines_truncated.inc_by(lines.truncated_lines);
        tracing::warn!(path = %file.path().display(), count = lines.truncated_lines, "entries longer than the size limit were truncated");
    }
    metrics.record_framing(&lines.stats);
    let mut entries = lines.entries;
    let mut data = lines.data;
    let mut meta = lines.meta;
    // The pod's metadata changed since the last read: new lines take the new labels.
    if let Some(p) = pod
        && p.refresh(file)
    {
        *shape = Shape::new(file, ctx, p.view.as_ref());
    }
    if shape.exclude {
        let n = entries.len() as u64;
        if n > 0 {
            metrics
                .stage_dropped
                .get_or_create(&crate::metrics::SourceReasonLabel {
                    source: file.source.as_str().into(),
                    reason: "excluded".into(),
                })
                .inc_by(n);
        }
        entries.clear();
    } else if !shape.pod_meta.is_empty() {
        add_pod_meta(&mut data, &mut entries, &mut meta, &shape.pod_meta);
    }
    // The stages: entries dropped or rewritten, each routed to its stream. The position is
    // this read's end whatever is left.
    let mut hold = Duration::ZERO;
    let routes: &[Arc<Stream>] = match &mut shape.runner {
        Some(runner) => {
            let now = crate::pipeline::unix_nanos();
            hold = runner.apply(&mut data, &mut entries, &mut meta, &ctx.tailer.streams, now);
            runner.routes()
        }
        None => &shape.streams,
    };
    // Entries without a timestamp of their own get the read time, strictly increasing per
    // stream so that Loki keeps their order.
    stamp(&mut entries, routes);

    // A read buffer mostly empty (a small file, a slow writer) would pin its whole capacity
    // until the batch is acknowledged; batches gather many such chunks.
    if data.capacity() > 2 * data.len() + 4096 {
        data.shrink_to_fit();
    }
    let data = bytes::Bytes::from(data);
    let meta: Arc<[Meta]> = meta.into();
    let chunks = crate::pipeline::Read {
        routes,
        cursor: &file.cursor,
        data,
        entries,
        meta,
        meta_names: &shape.meta_names,
        start: *last_end,
        end: lines.end,
        caught_up: lines.caught_up,
    }
    .into_chunks();
    *last_end = lines.end;
    for chunk in chunks {
        // At shutdown a chunk stuck behind a full pipeline is dropped unacknowledged: it is
        // read again after the restart.
        let sent = tokio::select! {
            sent = ctx.tx.send(chunk) => sent.is_ok(),
            _ = file.stop.cancelled() => false,
        };
        if !sent {
            return false;
        }
    }
    // A `limit` stage holding this file back: it reads nothing more until the stream is under
    // its rate (its chunk is queued, so what was read is not held in memory twice).
    if !hold.is_zero() {
        ctx.tailer.metrics.stage_holds.inc();
        tokio::select! {
            _ = tokio::time::sleep(hold) => {}
            _ = file.stop.cancelled() => {}
        }
    }
    true
}

/// Stamps entries without a timestamp of their own with the read time, strictly increasing
/// per stream.
fn stamp(entries: &mut [Entry], routes: &[Arc<Stream>]) {
    // One counter per route, per read (not per line).
    let mut next = vec![0i64; routes.len()];
    for e in entries.iter().filter(|e| e.ts == 0) {
        next[e.sub as usize] += 1;
    }
    for (slot, stream) in next.iter_mut().zip(routes) {
        if *slot > 0 {
            *slot = stream.reserve_timestamps(*slot as usize);
        }
    }
    for e in entries.iter_mut().filter(|e| e.ts == 0) {
        e.ts = next[e.sub as usize];
        next[e.sub as usize] += 1;
    }
}

/// Adds the pod's metadata to every entry: the values once to the read's data, their fields
/// after each entry's own.
fn add_pod_meta(
    data: &mut Vec<u8>,
    entries: &mut [Entry],
    meta: &mut Vec<Meta>,
    pod: &[(u8, Vec<u8>)],
) {
    let mut fields = Vec::with_capacity(pod.len());
    for (name, value) in pod {
        let start = data.len() as u32;
        data.extend_from_slice(value);
        fields.push(Meta {
            name: *name,
            start,
            end: data.len() as u32,
        });
    }
    let own = std::mem::replace(
        meta,
        Vec::with_capacity(meta.len() + entries.len() * fields.len()),
    );
    for e in entries.iter_mut() {
        let start = meta.len();
        let from = e.meta_start as usize;
        meta.extend_from_slice(&own[from..from + e.meta_len as usize]);
        meta.extend_from_slice(&fields);
        e.meta_start = start as u32;
        e.meta_len = (meta.len() - start) as u16;
    }
}
