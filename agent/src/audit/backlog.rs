//! Every batch that has a sequence number and is not acknowledged yet, in
//! sequence order: first those held in memory, then those in the spool.
//!
//! The order holds because a batch goes to memory only while the spool is
//! empty; once something is spooled, newer batches follow it there until
//! acknowledgements drain it. Memory is used while the collector is
//! connected and the un-acknowledged batches in memory stay within a bound;
//! otherwise batches go to the spool (when there is one, and it has room),
//! and as a last resort to memory. A batch neither can take is dropped.

use std::collections::VecDeque;

use palisade_proto::audit::v1 as pb;
use prost::Message;

use super::spool::{Spool, Unreadable};

/// Where [`Backlog::store`] put a batch.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stored {
    Memory,
    Spool,
    /// No room anywhere: the batch's events are lost.
    Dropped {
        events: usize,
    },
}

/// What [`Backlog::next_after`] found.
#[derive(Debug)]
pub(super) enum Next {
    Batch(pb::AuditBatch),
    /// A spooled batch that cannot be read back: forgotten, its events lost.
    Lost(Unreadable),
}

#[derive(Debug)]
struct Held {
    batch: pb::AuditBatch,
    /// Encoded length with the length prefix (what spooling it would take).
    len: usize,
}

#[derive(Debug)]
pub(super) struct Backlog {
    /// Older than anything in the spool.
    memory: VecDeque<Held>,
    memory_bytes: usize,
    memory_max: usize,
    spool: Option<Spool>,
    /// Spool append errors are logged once per run of failures.
    spool_failing: bool,
}

impl Backlog {
    pub(super) fn new(memory_max: usize, spool: Option<Spool>) -> Self {
        Self {
            memory: VecDeque::new(),
            memory_bytes: 0,
            memory_max,
            spool,
            spool_failing: false,
        }
    }

    pub(super) fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
    }

    pub(super) fn spool_mut(&mut self) -> Option<&mut Spool> {
        self.spool.as_mut()
    }

    pub(super) fn spool_bytes(&self) -> u64 {
        self.spool.as_ref().map_or(0, Spool::bytes)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.memory.is_empty() && self.spool.as_ref().is_none_or(Spool::is_empty)
    }

    /// Batches held (memory and spool).
    pub(super) fn len(&self) -> usize {
        self.memory.len() + self.spool.as_ref().map_or(0, Spool::len)
    }

    /// Keeps `batch`, newer than everything held. `connected`: the
    /// collector is there, so memory is the place unless over its bound.
    pub(super) fn store(&mut self, batch: pb::AuditBatch, connected: bool) -> Stored {
        let body = batch.encoded_len();
        let len = body + prost::length_delimiter_len(body);
        let spool_empty = self.spool.as_ref().is_none_or(Spool::is_empty);
        let memory_fits = self.memory_bytes + len <= self.memory_max;
        if spool_empty && memory_fits && (connected || self.spool.is_none()) {
            return self.keep_in_memory(batch, len);
        }
        if let Some(spool) = self.spool.as_mut()
            && spool.fits(len as u64)
        {
            match spool.append(&batch) {
                Ok(()) => {
                    self.spool_failing = false;
                    return Stored::Spool;
                }
                Err(e) => {
                    if !self.spool_failing {
                        tracing::warn!(error = %e, "audit spool: cannot write a batch");
                        self.spool_failing = true;
                    }
                }
            }
        }
        let spool_empty = self.spool.as_ref().is_none_or(Spool::is_empty);
        if spool_empty && memory_fits {
            return self.keep_in_memory(batch, len);
        }
        Stored::Dropped {
            events: batch.events.len(),
        }
    }

    fn keep_in_memory(&mut self, batch: pb::AuditBatch, len: usize) -> Stored {
        self.memory_bytes += len;
        self.memory.push_back(Held { batch, len });
        Stored::Memory
    }

    /// The oldest batch held with a sequence after `after`.
    pub(super) fn next_after(&mut self, after: u64) -> Option<Next> {
        let i = self.memory.partition_point(|h| h.batch.sequence <= after);
        if let Some(held) = self.memory.get(i) {
            return Some(Next::Batch(held.batch.clone()));
        }
        match self.spool.as_mut()?.next_after(after)? {
            Ok(batch) => Some(Next::Batch(batch)),
            Err(lost) => Some(Next::Lost(lost)),
        }
    }

    /// Forgets every batch up to `seq`; how many there were.
    pub(super) fn release_through(&mut self, seq: u64) -> usize {
        let mut released = 0;
        while self.memory.front().is_some_and(|h| h.batch.sequence <= seq) {
            if let Some(held) = self.memory.pop_front() {
                self.memory_bytes -= held.len;
                released += 1;
            }
        }
        released + self.spool.as_mut().map_or(0, |s| s.release_through(seq))
    }

    /// Moves the batches held in memory to the spool, all or none (so the
    /// order holds), when there is a spool with room: they then survive a
    /// restart. Whether memory is empty afterwards.
    pub(super) fn persist_memory(&mut self) -> bool {
        if self.memory.is_empty() {
            return true;
        }
        let Some(spool) = self.spool.as_mut() else {
            return false;
        };
        if !spool.fits(self.memory_bytes as u64) {
            return false;
        }
        let batches: Vec<&pb::AuditBatch> = self.memory.iter().map(|h| &h.batch).collect();
        match spool.prepend(&batches) {
            Ok(()) => {
                self.memory.clear();
                self.memory_bytes = 0;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit spool: cannot keep un-acknowledged batches on disk");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64) -> pb::AuditBatch {
        pb::AuditBatch {
            agent_instance_id: "i".into(),
            sequence: seq,
            events: vec![pb::AuditEvent {
                request_id: format!("r{seq}"),
                ..Default::default()
            }],
            dropped_since_last: 0,
        }
    }

    fn len() -> usize {
        let b = batch(1).encoded_len();
        b + prost::length_delimiter_len(b)
    }

    fn seqs(backlog: &mut Backlog) -> Vec<u64> {
        let mut out = Vec::new();
        let mut after = 0;
        while let Some(Next::Batch(b)) = backlog.next_after(after) {
            after = b.sequence;
            out.push(after);
        }
        out
    }

    fn spool(dir: &std::path::Path, batches: usize) -> Spool {
        Spool::open(dir, (len() * batches) as u64, || "i".into()).unwrap()
    }

    #[test]
    fn connected_batches_stay_in_memory_up_to_the_bound_then_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut backlog = Backlog::new(len() * 2, Some(spool(dir.path(), 10)));
        assert_eq!(backlog.store(batch(1), true), Stored::Memory);
        assert_eq!(backlog.store(batch(2), true), Stored::Memory);
        assert_eq!(backlog.store(batch(3), true), Stored::Spool);
        // Memory has room again, but the spool is not empty: order first.
        assert_eq!(backlog.release_through(1), 1);
        assert_eq!(backlog.store(batch(4), true), Stored::Spool);
        assert_eq!(seqs(&mut backlog), [2, 3, 4]);
        // Once the spool drains, memory again.
        assert_eq!(backlog.release_through(4), 3);
        assert!(backlog.is_empty());
        assert_eq!(backlog.store(batch(5), true), Stored::Memory);
    }

    #[test]
    fn disconnected_batches_go_to_the_spool_then_memory_then_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut backlog = Backlog::new(len() * 2, Some(spool(dir.path(), 2)));
        assert_eq!(backlog.store(batch(1), false), Stored::Spool);
        assert_eq!(backlog.store(batch(2), false), Stored::Spool);
        // Spool full and not empty: memory would come after it, out of order.
        assert_eq!(
            backlog.store(batch(3), false),
            Stored::Dropped { events: 1 }
        );
        assert_eq!(seqs(&mut backlog), [1, 2]);

        let dir = tempfile::tempdir().unwrap();
        let mut backlog = Backlog::new(len() * 2, Some(spool(dir.path(), 0)));
        // A spool with no room at all: memory is the last resort.
        assert_eq!(backlog.store(batch(1), false), Stored::Memory);
        assert_eq!(backlog.store(batch(2), false), Stored::Memory);
        assert_eq!(
            backlog.store(batch(3), false),
            Stored::Dropped { events: 1 }
        );
    }

    #[test]
    fn without_a_spool_memory_is_all_there_is() {
        let mut backlog = Backlog::new(len(), None);
        assert_eq!(backlog.store(batch(1), false), Stored::Memory);
        assert_eq!(backlog.store(batch(2), true), Stored::Dropped { events: 1 });
        assert!(!backlog.persist_memory());
        assert_eq!(backlog.len(), 1);
    }

    #[test]
    fn memory_moves_ahead_of_the_spool_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut backlog = Backlog::new(len() * 2, Some(spool(dir.path(), 10)));
        backlog.store(batch(1), true);
        backlog.store(batch(2), true);
        assert_eq!(backlog.store(batch(3), false), Stored::Spool);
        assert!(backlog.persist_memory());
        assert_eq!(backlog.memory.len(), 0);
        assert_eq!(seqs(&mut backlog), [1, 2, 3]);
        drop(backlog);
        let mut backlog = Backlog::new(len() * 2, Some(spool(dir.path(), 10)));
        assert_eq!(seqs(&mut backlog), [1, 2, 3]);
    }

    #[test]
    fn memory_that_does_not_fit_the_spool_stays_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut backlog = Backlog::new(len() * 4, Some(spool(dir.path(), 1)));
        backlog.store(batch(1), true);
        backlog.store(batch(2), true);
        assert!(!backlog.persist_memory());
        assert_eq!(seqs(&mut backlog), [1, 2]);
        assert_eq!(backlog.spool_bytes(), 0);
    }
}
