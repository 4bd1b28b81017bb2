//! Ordered acknowledgements: a file's committed position advances only when every batch that
//! carried an earlier position of that file has been acknowledged, whatever order the
//! responses come back in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Cursor, Position, lock};

/// Tracks batches from the first chunk they take to their acknowledgement.
///
/// A file's positions are queued in the order its chunks were read, whichever batch each
/// joins: with several batches open at once (one per tenant), a later chunk of a file may
/// be sent before an earlier one, and the committed position still passes only the
/// acknowledged prefix.
#[derive(Default)]
pub struct AckTracker {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    /// Batch sequence number → (one entry per position of it still queued by a file,
    /// acknowledged?).
    batches: HashMap<u64, (Vec<Arc<Cursor>>, bool)>,
}

impl AckTracker {
    /// Opens a batch: positions are added to it as its chunks arrive.
    pub fn open(&self) -> u64 {
        let mut inner = lock(&self.inner);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.batches.insert(seq, (Vec::new(), false));
        seq
    }

    /// Queues a file position carried by a chunk of batch `seq`. Must be called in the order
    /// in which each file's chunks were read.
    pub fn add(&self, seq: u64, cursor: &Arc<Cursor>, pos: Position) {
        let mut inner = lock(&self.inner);
        let Some(batch) = inner.batches.get_mut(&seq) else {
            return;
        };
        let mut pending = lock(&cursor.pending);
        match pending.back_mut() {
            // Consecutive chunks of a file in the same batch: the later position stands for
            // both.
            Some(back) if back.0 == seq => back.1 = pos,
            _ => {
                pending.push_back((seq, pos));
                batch.0.push(cursor.clone());
            }
        }
    }

    /// Registers a whole batch's positions at once and returns its sequence number.
    pub fn register(&self, positions: Vec<(Arc<Cursor>, Position)>) -> u64 {
        let seq = self.open();
        for (cursor, pos) in positions {
            self.add(seq, &cursor, pos);
        }
        seq
    }

    /// Marks a batch acknowledged (Loki stored it, or refused it for good) and advances the
    /// committed positions it unblocks.
    pub fn ack(&self, seq: u64) {
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.batches.get_mut(&seq) else {
            return;
        };
        entry.1 = true;
        let files = entry.0.clone();
        if files.is_empty() {
            inner.batches.remove(&seq);
            return;
        }
        for cursor in files {
            let mut pending = lock(&cursor.pending);
            while let Some(&(front, pos)) = pending.front() {
                let acked = inner.batches.get(&front).is_some_and(|b| b.1);
                if !acked {
                    break;
                }
                pending.pop_front();
                *lock(&cursor.committed) = pos;
                // Forget a batch once no file still queues a position of it.
                if let Some(b) = inner.batches.get_mut(&front) {
                    if let Some(i) = b.0.iter().position(|c| Arc::ptr_eq(c, &cursor)) {
                        b.0.swap_remove(i);
                    }
                    if b.0.is_empty() {
                        inner.batches.remove(&front);
                    }
                }
            }
        }
    }

    /// Batches registered and not yet forgotten (for tests and status).
    pub fn outstanding(&self) -> usize {
        lock(&self.inner).batches.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(offset: u64) -> Position {
        Position {
            offset,
            ..Position::default()
        }
    }

    #[test]
    fn commits_only_the_acknowledged_prefix() {
        let t = AckTracker::default();
        let a = Arc::new(Cursor::new(pos(0)));
        let b = Arc::new(Cursor::new(pos(0)));
        let s1 = t.register(vec![(a.clone(), pos(10)), (b.clone(), pos(5))]);
        let s2 = t.register(vec![(a.clone(), pos(20))]);
        let s3 = t.register(vec![(a.clone(), pos(30)), (b.clone(), pos(9))]);
        t.ack(s2);
        assert_eq!(a.committed().offset, 0, "s1 still pending");
        t.ack(s3);
        assert_eq!(b.committed().offset, 0);
        t.ack(s1);
        assert_eq!(a.committed().offset, 30);
        assert_eq!(b.committed().offset, 9);
        assert!(a.is_settled() && b.is_settled());
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_file_in_two_open_batches_commits_in_read_order() {
        // Two tenants' batches open at once: chunk 1 (A), chunk 2 (B), chunk 3 (A).
        let t = AckTracker::default();
        let f = Arc::new(Cursor::new(pos(0)));
        let a = t.open();
        let b = t.open();
        t.add(a, &f, pos(10));
        t.add(b, &f, pos(20));
        t.add(a, &f, pos(30));
        t.ack(b);
        assert_eq!(f.committed().offset, 0, "chunk 1 is not acknowledged");
        t.ack(a);
        assert_eq!(f.committed().offset, 30);
        assert!(f.is_settled());
        assert_eq!(t.outstanding(), 0);

        // The other way round: A acknowledged first commits chunk 1 only.
        let a = t.open();
        let b = t.open();
        t.add(a, &f, pos(40));
        t.add(b, &f, pos(50));
        t.add(a, &f, pos(60));
        t.ack(a);
        assert_eq!(f.committed().offset, 40);
        t.ack(b);
        assert_eq!(f.committed().offset, 60);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_file_is_not_held_back_by_batches_of_other_files() {
        let t = AckTracker::default();
        let a = Arc::new(Cursor::new(pos(0)));
        let b = Arc::new(Cursor::new(pos(0)));
        let _s1 = t.register(vec![(a.clone(), pos(10))]);
        let s2 = t.register(vec![(b.clone(), pos(7))]);
        t.ack(s2);
        assert_eq!(b.committed().offset, 7);
        assert_eq!(a.committed().offset, 0);
    }
}
