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
    ///
    /// One batch is filled per tenant (a request carries one `X-Scope-OrgID`); each flushes on
    /// its own size and age.
    pub async fn run(mut self) {
        let mut open: Vec<Batch> = Vec::new();
        loop {
            let oldest = open.iter().map(|b| b.opened).min();
            let deadline = oldest.map(|o| tokio::time::Instant::from_std(o) + self.batch_wait);
            tokio::select! {
                chunk = self.rx.recv() => match chunk {
                    Some(chunk) => {
                        let caught_up = chunk.caught_up;
                        let tenant = chunk.stream.tenant.clone();
                        let i = match open.iter().position(|b| b.tenant == tenant) {
                            Some(i) => i,
                            None => {
                                let mut b = Batch::new();
                                b.tenant = tenant;
                                b.seq = self.tracker.open();
                                open.push(b);
                                open.len() - 1
                            }
                        };
                        let batch = &mut open[i];
                        self.tracker.add(batch.seq, &chunk.cursor, chunk.end);
                        batch.push(chunk);
                        if caught_up {
                            // The end of a backlog: its entries may be in any tenant's batch.
                            for batch in open.drain(..) {
                                self.flush(batch).await;
                            }
                        } else if batch.line_bytes >= self.batch_bytes {
                            let batch = open.swap_remove(i);
                            self.flush(batch).await;
                        }
                    }
                    None => break,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    let now = std::time::Instant::now();
                    let mut i = 0;
                    while i < open.len() {
                        if now >= open[i].opened + self.batch_wait {
                            let batch = open.swap_remove(i);
                            self.flush(batch).await;
                        } else {
                            i += 1;
                        }
                    }
                }
            }
        }
        for batch in open {
            self.flush(batch).await;
        }
    }

    async fn flush(&self, batch: Batch) {
        let seq = batch.seq;
        if batch.entries == 0 {
            // Only positions (a discarded over-long line, entries a stage dropped): nothing
            // to send, but the positions must still wait for earlier batches of their files.
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

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
