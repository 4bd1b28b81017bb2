//! The tailer task of one file: read to the end, hand the chunks to the pipeline, then watch for
//! growth, truncation, rotation and deletion.

use std::os::unix::fs::MetadataExt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::reader::{FileReader, ReadLines};
use super::{FileState, Tailer, TrackedFile};
use crate::pipeline::{Chunk, Entry, Meta, Position, Stream};
use crate::stage::Runner;

/// How often an idle file is checked when no inotify event arrives (events can be dropped).
const POLL: Duration = Duration::from_millis(500);

pub(super) struct Context {
    pub tailer: Arc<Tailer>,
    pub tx: mpsc::Sender<Chunk>,
    pub max_partial_age: Duration,
    pub rotate_wait: Duration,
}

pub(super) async fn run(file: Arc<TrackedFile>, reader: FileReader, ctx: Context) {
    let mut last_end = reader.position();
    let mut reader = Some(reader);
    let mut partial_since: Option<Instant> = None;
    let mut rotated_since: Option<Instant> = None;
    let cancel = ctx.tailer.cancel.clone();
    let metrics = ctx.tailer.metrics.clone();
    let mut stages = file.stages.clone().map(|p| {
        Runner::new(
            p,
            &file.streams,
            &ctx.tailer.streams,
            file.framing_meta,
            &file.source,
            &metrics,
        )
    });
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
                    let sent = send(&file, &ctx, &mut stages, lines, &mut last_end).await;
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
            if !send(&file, &ctx, &mut stages, lines, &mut last_end).await {
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
                    send(&file, &ctx, &mut stages, lines, &mut last_end).await;
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
    if cancel.is_cancelled() {
        // Shutting down: the file stays tracked so that the final checkpoint records it.
        return;
    }
    file.set_state(FileState::Closed);
    ctx.tailer.release_path(&file);
    tracing::debug!(path = %file.path().display(), "closed");
}

/// Hands entries to the pipeline; false once the pipeline is gone. `last_end` is the position
/// after the previous read; it becomes this read's end.
///
/// Boxed: inline, its state would make every file's task twice as large (half of it never used
/// while a file is idle, which with 1,000 files is a megabyte).
fn send<'a>(
    file: &'a TrackedFile,
    ctx: &'a Context,
    stages: &'a mut Option<Runner>,
    lines: ReadLines,
    last_end: &'a mut Position,
) -> Pin<Box<impl Future<Output = bool> + 'a>> {
    Box::pin(queue(file, ctx, stages, lines, last_end))
}

/// [`send`], unboxed.
async fn queue(
    file: &TrackedFile,
    ctx: &Context,
    stages: &mut Option<Runner>,
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
    // The stages: entries dropped or rewritten, each routed to its stream. The position is
    // this read's end whatever is left.
    let mut hold = Duration::ZERO;
    let routes: &[Arc<Stream>] = match stages {
        Some(runner) => {
            let now = crate::pipeline::unix_nanos();
            hold = runner.apply(&mut data, &mut entries, &mut meta, &ctx.tailer.streams, now);
            runner.routes()
        }
        None => &file.streams,
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
    // Every chunk starts at the previous read's end; the last one is given this read's.
    let chunk = |sub: usize, entries: Vec<Entry>| Chunk {
        stream: routes[sub].clone(),
        cursor: file.cursor.clone(),
        data: data.clone(),
        entries,
        meta: meta.clone(),
        meta_names: file.meta_names.clone(),
        end: *last_end,
        caught_up: false,
    };
    let first_sub = entries.first().map_or(0, |e| e.sub as usize);
    let mut chunks = if entries.iter().all(|e| e.sub as usize == first_sub) {
        vec![chunk(first_sub, entries)]
    } else {
        // One chunk per stream, each keeping its entries' order.
        entries.sort_by_key(|e| e.sub);
        entries
            .chunk_by(|a, b| a.sub == b.sub)
            .map(|run| chunk(run[0].sub as usize, run.to_vec()))
            .collect::<Vec<_>>()
    };
    // Only the last chunk carries the new position (the file's committed position cannot pass
    // this read until every one of them is acknowledged) and whether the read ended a backlog.
    if let Some(last) = chunks.last_mut() {
        last.end = lines.end;
        last.caught_up = lines.caught_up;
    }
    *last_end = lines.end;
    for chunk in chunks {
        // At shutdown a chunk stuck behind a full pipeline is dropped unacknowledged: it is
        // read again after the restart.
        let sent = tokio::select! {
            sent = ctx.tx.send(chunk) => sent.is_ok(),
            _ = ctx.tailer.cancel.cancelled() => false,
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
            _ = ctx.tailer.cancel.cancelled() => {}
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
