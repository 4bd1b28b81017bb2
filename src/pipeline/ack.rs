//! Ordered acknowledgements: a file's committed position advances only when every batch that
//! carried an earlier position of that file has been acknowledged, whatever order the
//! responses come back in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Cursor, Position, lock};

/// Tracks batches from registration (in send order) to acknowledgement.
#[derive(Default)]
pub struct AckTracker {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    /// Batch sequence number → (files it carried a position for, acknowledged?).
    batches: HashMap<u64, (Vec<Arc<Cursor>>, bool)>,
}

impl AckTracker {
    /// Registers a batch's positions and returns its sequence number. Must be called in the
    /// order in which the batches' chunks were read.
    pub fn register(&self, positions: Vec<(Arc<Cursor>, Position)>) -> u64 {
        let mut inner = lock(&self.inner);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let mut files = Vec::with_capacity(positions.len());
        for (cursor, pos) in positions {
            lock(&cursor.pending).push_back((seq, pos));
            files.push(cursor);
        }
        inner.batches.insert(seq, (files, false));
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
                    b.0.retain(|c| !Arc::ptr_eq(c, &cursor));
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
