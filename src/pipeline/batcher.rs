//! Groups chunks into batches and hands them to the sink, flushing on size or age, or as soon as
//! a file has caught up with a backlog.
//!
//! Backpressure lives here: a batch is handed over only with one of the sink's `max_in_flight`
//! permits. While none is free the batcher stops receiving, its bounded channel fills, and the
//! tailers stop reading: the files on disk are the buffer, and memory stays bounded.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

use super::ack::AckTracker;
use super::{Batch, Chunk};
use crate::loki::client::Sink;

pub struct Batcher {
    pub rx: mpsc::Receiver<Chunk>,
    pub batch_bytes: usize,
    pub batch_wait: Duration,
    pub tracker: Arc<AckTracker>,
    pub sink: Arc<Sink>,
    pub permits: Arc<Semaphore>,
}

impl Batcher {
    /// Runs until every sender is gone (the tailers stopped), then flushes what is left.
    pub async fn run(mut self) {
        let mut batch = Batch::new();
        loop {
            let deadline = tokio::time::Instant::from_std(batch.opened) + self.batch_wait;
            tokio::select! {
                chunk = self.rx.recv() => match chunk {
                    Some(chunk) => {
                        let caught_up = chunk.caught_up;
                        batch.push(chunk);
                        if batch.line_bytes >= self.batch_bytes || caught_up {
                            self.flush(std::mem::take(&mut batch)).await;
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {
                    self.flush(std::mem::take(&mut batch)).await;
                }
            }
        }
        if !batch.is_empty() {
            self.flush(batch).await;
        }
    }

    async fn flush(&self, batch: Batch) {
        let seq = self.tracker.register(batch.positions());
        if batch.entries == 0 {
            // Only positions (a discarded over-long line, say): nothing to send, but the
            // position must still wait for earlier batches of the same file.
            self.tracker.ack(seq);
            return;
        }
        // The semaphore is never closed, so acquiring cannot fail.
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        self.sink.clone().spawn_send(seq, batch, permit);
    }
}
