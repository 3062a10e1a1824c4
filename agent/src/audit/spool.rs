//! The disk spool (`--audit-spool-dir`): batches not yet acknowledged by the
//! collector, kept across collector outages and agent restarts.
//!
//! Layout of the directory (created `0700`, files `0600`):
//!
//! - `lock`: held (`flock`) while an agent uses the spool, so two agents
//!   never interleave appends;
//! - `state.json`: `{"instance_id", "last_sequence", "acked"}`, rewritten
//!   (write + rename) when a batch is cut and when one is acknowledged, so
//!   a restarted agent continues the same instance's sequence and does not
//!   resend what was acknowledged;
//! - `<first sequence, 20 digits>.seg`: segments, each a run of
//!   length-delimited `palisade.audit.v1.AuditBatch` messages (a protobuf
//!   varint length, then the message), in increasing sequence. Appends are
//!   not fsynced: the spool rides out collector outages and agent restarts,
//!   not a host crash. A segment is deleted once every batch in it is
//!   acknowledged.
//!
//! On open every segment is read back; a truncated or undecodable tail (an
//! append cut short) ends that segment, and the rest of it is cut off.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use palisade_proto::audit::v1 as pb;
use prost::Message;
use serde::{Deserialize, Serialize};

/// The spool's default bound (`--audit-spool-max-bytes`): at ~330 bytes a
/// denial, about 200 000 events, i.e. minutes of a heavy denial flood or
/// hours of ordinary traffic with the collector away.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Largest segment file; a spool's space is freed a segment at a time.
const MAX_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

const STATE: &str = "state.json";
const LOCK: &str = "lock";
const SEGMENT_SUFFIX: &str = ".seg";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: another agent is using this audit spool", .0.display())]
    Locked(PathBuf),
    #[error("{}: not a spool state file: {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: batch {sequence} cannot be read back: {source}", path.display())]
    Decode {
        path: PathBuf,
        sequence: u64,
        #[source]
        source: prost::DecodeError,
    },
    #[error("sequence {0} is not after the spool's last")]
    OutOfOrder(u64),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the spool remembers about the agent instance that wrote it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolState {
    pub instance_id: String,
    /// The last sequence number given to a batch.
    pub last_sequence: u64,
    /// Every batch up to this one is stored by the collector.
    pub acked: u64,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    last_seq: u64,
    path: PathBuf,
    bytes: u64,
}

/// Where one batch sits.
#[derive(Clone, Copy, Debug)]
struct Record {
    seq: u64,
    /// The segment's `first_seq`.
    segment: u64,
    offset: u64,
    len: u64,
    events: usize,
}

/// A spooled batch that cannot be read back any more (its events are lost).
#[derive(Debug)]
pub(crate) struct Unreadable {
    pub(crate) seq: u64,
    pub(crate) events: usize,
    pub(crate) error: SpoolError,
}

/// An open spool: segments in sequence order, the index of every batch
/// not yet released, and the append handle of the last segment.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_max: u64,
    segments: VecDeque<Segment>,
    records: VecDeque<Record>,
    bytes: u64,
    /// Appends go here; `None`: the next append starts a segment.
    tail: Option<File>,
    state: SpoolState,
    _lock: File,
}

impl Spool {
    /// Opens (creating it if need be) the spool in `dir`, bounded to
    /// `max_bytes` of segments. A spool without a state names its instance
    /// `new_instance()` (unless its batches name one).
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        new_instance: impl FnOnce() -> String,
    ) -> Result<Self, SpoolError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(dir))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        lock.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => SpoolError::Locked(dir.to_owned()),
            fs::TryLockError::Error(source) => SpoolError::Io {
                path: lock_path.clone(),
                source,
            },
        })?;
        let state_path = dir.join(STATE);
        let saved =
            match fs::read(&state_path) {
                Ok(bytes) => Some(serde_json::from_slice::<SpoolState>(&bytes).map_err(
                    |source| SpoolError::State {
                        path: state_path.clone(),
                        source,
                    },
                )?),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_error(&state_path)(e)),
            };
        let mut spool = Self {
            dir: dir.to_owned(),
            max_bytes,
            segment_max: (max_bytes / 8).clamp(1, MAX_SEGMENT_BYTES),
            segments: VecDeque::new(),
            records: VecDeque::new(),
            bytes: 0,
            tail: None,
            state: saved.clone().unwrap_or_default(),
            _lock: lock,
        };
        spool.load(saved.is_some())?;
        if spool.state.instance_id.is_empty() {
            spool.state.instance_id = new_instance();
        }
        spool.save_state()?;
        Ok(spool)
    }

    /// Reads every segment back, dropping what is acknowledged, truncated
    /// or foreign.
    fn load(&mut self, have_state: bool) -> Result<(), SpoolError> {
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            let name = entry.file_name();
            let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            names.push((first, entry.path()));
        }
        names.sort();
        for (first, path) in names {
            let data = fs::read(&path).map_err(io_error(&path))?;
            let mut offset = 0usize;
            let mut kept: Vec<Record> = Vec::new();
            let mut last_seq = 0;
            while offset < data.len() {
                let Some((batch, len)) = decode_at(&data[offset..]) else {
                    tracing::warn!(
                        segment = %path.display(), offset,
                        "audit spool: segment ends in a cut-off or unreadable batch; the rest of it is dropped"
                    );
                    break;
                };
                if self.state.instance_id.is_empty() && !have_state {
                    // State lost: the batches still say whose they are.
                    self.state.instance_id = batch.agent_instance_id.clone();
                }
                let seq = batch.sequence;
                let in_order = seq > self.records.back().map_or(0, |r| r.seq) && seq > last_seq;
                if batch.agent_instance_id != self.state.instance_id {
                    tracing::warn!(segment = %path.display(), seq,
                        "audit spool: batch of another agent instance skipped");
                } else if !in_order {
                    tracing::warn!(segment = %path.display(), seq,
                        "audit spool: batch out of sequence order skipped");
                } else if seq > self.state.acked {
                    kept.push(Record {
                        seq,
                        segment: first,
                        offset: offset as u64,
                        len: len as u64,
                        events: batch.events.len(),
                    });
                }
                last_seq = last_seq.max(seq);
                offset += len;
            }
            if offset < data.len() {
                // Cut off the unreadable tail, so later appends stay readable.
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error(&path))?;
                f.set_len(offset as u64).map_err(io_error(&path))?;
            }
            if kept.is_empty() {
                fs::remove_file(&path).map_err(io_error(&path))?;
                continue;
            }
            self.state.last_sequence = self.state.last_sequence.max(last_seq);
            self.bytes += offset as u64;
            self.segments.push_back(Segment {
                first_seq: first,
                last_seq,
                path,
                bytes: offset as u64,
            });
            self.records.extend(kept);
        }
        if let Some(last) = self.segments.back() {
            self.tail = Some(
                OpenOptions::new()
                    .append(true)
                    .open(&last.path)
                    .map_err(io_error(&last.path))?,
            );
        }
        Ok(())
    }

    pub fn state(&self) -> &SpoolState {
        &self.state
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Bytes of segments on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether `len` more bytes stay within the bound.
    pub fn fits(&self, len: u64) -> bool {
        self.bytes.saturating_add(len) <= self.max_bytes
    }

    pub fn first_seq(&self) -> Option<u64> {
        self.records.front().map(|r| r.seq)
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.records.back().map(|r| r.seq)
    }

    /// Appends `batch` (newer than everything held).
    pub fn append(&mut self, batch: &pb::AuditBatch) -> Result<(), SpoolError> {
        let seq = batch.sequence;
        if self.last_seq().is_some_and(|last| seq <= last) {
            return Err(SpoolError::OutOfOrder(seq));
        }
        let bytes = batch.encode_length_delimited_to_vec();
        let len = bytes.len() as u64;
        let roll = match (self.segments.back(), &self.tail) {
            (Some(last), Some(_)) => last.bytes > 0 && last.bytes + len > self.segment_max,
            _ => true,
        };
        if roll {
            self.start_segment(seq)?;
        }
        let (Some(segment), Some(tail)) = (self.segments.back_mut(), self.tail.as_mut()) else {
            // `start_segment` sets both; nothing to append to otherwise.
            return Err(SpoolError::OutOfOrder(seq));
        };
        if let Err(e) = tail.write_all(&bytes) {
            let error = io_error(&segment.path)(e);
            // Leave no half batch behind; the next append starts afresh.
            let _ = tail.set_len(segment.bytes);
            self.tail = None;
            if segment.bytes == 0 {
                let _ = fs::remove_file(&segment.path);
                self.segments.pop_back();
            }
            return Err(error);
        }
        self.records.push_back(Record {
            seq,
            segment: segment.first_seq,
            offset: segment.bytes,
            len,
            events: batch.events.len(),
        });
        segment.last_seq = seq;
        segment.bytes += len;
        self.bytes += len;
        Ok(())
    }

    fn start_segment(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        let path = self.segment_path(first_seq);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error(&path))?;
        self.segments.push_back(Segment {
            first_seq,
            last_seq: first_seq,
            path,
            bytes: 0,
        });
        self.tail = Some(file);
        Ok(())
    }

    fn segment_path(&self, first_seq: u64) -> PathBuf {
        self.dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
    }

    /// Writes `batches` (in increasing sequence, all older than anything
    /// held) as a segment of their own in front of the others.
    pub fn prepend(&mut self, batches: &[&pb::AuditBatch]) -> Result<(), SpoolError> {
        let (Some(first), Some(last)) = (batches.first(), batches.last()) else {
            return Ok(());
        };
        let ordered = batches.windows(2).all(|w| w[0].sequence < w[1].sequence);
        if !ordered || self.first_seq().is_some_and(|f| last.sequence >= f) {
            return Err(SpoolError::OutOfOrder(first.sequence));
        }
        let path = self.segment_path(first.sequence);
        let mut data = Vec::new();
        let mut records = Vec::with_capacity(batches.len());
        for batch in batches {
            let offset = data.len() as u64;
            data.extend_from_slice(&batch.encode_length_delimited_to_vec());
            records.push(Record {
                seq: batch.sequence,
                segment: first.sequence,
                offset,
                len: data.len() as u64 - offset,
                events: batch.events.len(),
            });
        }
        let written = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&data));
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(io_error(&path)(e));
        }
        self.segments.push_front(Segment {
            first_seq: first.sequence,
            last_seq: last.sequence,
            path,
            bytes: data.len() as u64,
        });
        if self.segments.len() == 1 {
            // The only segment: appends may continue it.
            self.tail = OpenOptions::new()
                .append(true)
                .open(&self.segments[0].path)
                .ok();
        }
        for r in records.into_iter().rev() {
            self.records.push_front(r);
        }
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// The oldest batch held after sequence `after`, read back from disk.
    /// A batch that cannot be read is forgotten and reported.
    pub(crate) fn next_after(&mut self, after: u64) -> Option<Result<pb::AuditBatch, Unreadable>> {
        let i = self.records.partition_point(|r| r.seq <= after);
        let record = *self.records.get(i)?;
        match self.read(&record) {
            Ok(batch) => Some(Ok(batch)),
            Err(error) => {
                self.records.remove(i);
                Some(Err(Unreadable {
                    seq: record.seq,
                    events: record.events,
                    error,
                }))
            }
        }
    }

    fn read(&self, record: &Record) -> Result<pb::AuditBatch, SpoolError> {
        let path = self.segment_path(record.segment);
        let mut data = vec![0; record.len as usize];
        File::open(&path)
            .and_then(|f| f.read_exact_at(&mut data, record.offset))
            .map_err(io_error(&path))?;
        pb::AuditBatch::decode_length_delimited(data.as_slice()).map_err(|source| {
            SpoolError::Decode {
                path,
                sequence: record.seq,
                source,
            }
        })
    }

    /// Forgets every batch up to `seq` (the collector stored them) and
    /// deletes segments left with none. Returns how many were forgotten.
    pub fn release_through(&mut self, seq: u64) -> usize {
        let before = self.records.len();
        while self.records.front().is_some_and(|r| r.seq <= seq) {
            self.records.pop_front();
        }
        // Segments before the one holding the oldest batch left hold only
        // released ones (or none).
        let keep_from = self.records.front().map(|r| r.segment);
        while let Some(segment) = self.segments.front() {
            if keep_from.is_some_and(|k| segment.first_seq >= k) {
                break;
            }
            if let Err(e) = fs::remove_file(&segment.path) {
                tracing::warn!(segment = %segment.path.display(), error = %e,
                    "audit spool: cannot delete an acknowledged segment");
            }
            self.bytes -= segment.bytes;
            if self.segments.len() == 1 {
                self.tail = None;
            }
            self.segments.pop_front();
        }
        before - self.records.len()
    }

    /// Records the sequence and acknowledgement positions.
    pub fn set_positions(&mut self, last_sequence: u64, acked: u64) -> Result<(), SpoolError> {
        if (last_sequence, acked) == (self.state.last_sequence, self.state.acked) {
            return Ok(());
        }
        self.state.last_sequence = last_sequence;
        self.state.acked = acked;
        self.save_state()
    }

    fn save_state(&self) -> Result<(), SpoolError> {
        let path = self.dir.join(STATE);
        let tmp = self.dir.join(format!("{STATE}.tmp"));
        let json = serde_json::to_vec(&self.state).map_err(|source| SpoolError::State {
            path: path.clone(),
            source,
        })?;
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&json))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(io_error(&path))
    }
}

/// One length-delimited batch at the start of `data`, and its length with
/// the prefix; `None` when it is cut off or does not decode.
fn decode_at(data: &[u8]) -> Option<(pb::AuditBatch, usize)> {
    let mut cursor = data;
    let body = prost::decode_length_delimiter(&mut cursor).ok()?;
    let prefix = data.len() - cursor.len();
    let end = prefix.checked_add(body)?;
    let batch = pb::AuditBatch::decode(data.get(prefix..end)?).ok()?;
    Some((batch, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, events: usize) -> pb::AuditBatch {
        pb::AuditBatch {
            agent_instance_id: "i-1".into(),
            sequence: seq,
            events: (0..events)
                .map(|n| pb::AuditEvent {
                    request_id: format!("{seq}-{n}"),
                    ..Default::default()
                })
                .collect(),
            dropped_since_last: 0,
        }
    }

    fn open(dir: &Path, max: u64) -> Spool {
        Spool::open(dir, max, || "i-1".into()).unwrap()
    }

    fn drain(spool: &mut Spool) -> Vec<u64> {
        let mut seen = Vec::new();
        let mut after = 0;
        while let Some(next) = spool.next_after(after) {
            let b = next.unwrap();
            after = b.sequence;
            seen.push(b.sequence);
        }
        seen
    }

    #[test]
    fn batches_come_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20);
        for seq in 1..=5 {
            spool.append(&batch(seq, 3)).unwrap();
        }
        spool.set_positions(5, 0).unwrap();
        assert_eq!(drain(&mut spool), [1, 2, 3, 4, 5]);
        drop(spool);
        let mut spool = open(dir.path(), 1 << 20);
        assert_eq!(spool.state().instance_id, "i-1");
        assert_eq!(spool.state().last_sequence, 5);
        assert_eq!(drain(&mut spool), [1, 2, 3, 4, 5]);
        let b = spool.next_after(2).unwrap().unwrap();
        assert_eq!(b.events[1].request_id, "3-1");
        // Appends continue after a reopen.
        spool.append(&batch(6, 1)).unwrap();
        assert_eq!(drain(&mut spool), [1, 2, 3, 4, 5, 6]);
        assert!(matches!(
            spool.append(&batch(6, 1)),
            Err(SpoolError::OutOfOrder(6))
        ));
    }

    #[test]
    fn acknowledged_batches_free_their_segments_and_stay_gone() {
        let dir = tempfile::tempdir().unwrap();
        // Tiny segments: one batch each.
        let mut spool = open(dir.path(), 64);
        for seq in 1..=3 {
            spool.append(&batch(seq, 1)).unwrap();
        }
        let full = spool.bytes();
        assert_eq!(spool.release_through(2), 2);
        assert!(spool.bytes() < full);
        spool.set_positions(3, 2).unwrap();
        assert_eq!(drain(&mut spool), [3]);
        drop(spool);
        let mut spool = open(dir.path(), 64);
        assert_eq!(drain(&mut spool), [3]);
        assert_eq!(spool.release_through(3), 1);
        assert_eq!(spool.bytes(), 0);
        assert!(spool.is_empty());
        // Only the lock and the state remain.
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["lock", "state.json"]);
    }

    #[test]
    fn acknowledged_batches_in_a_shared_segment_are_not_resent_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20);
        for seq in 1..=4 {
            spool.append(&batch(seq, 1)).unwrap();
        }
        assert_eq!(spool.release_through(2), 2);
        spool.set_positions(4, 2).unwrap();
        drop(spool);
        let mut spool = open(dir.path(), 1 << 20);
        assert_eq!(drain(&mut spool), [3, 4]);
    }

    #[test]
    fn a_cut_off_tail_is_dropped_and_appends_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20);
        spool.append(&batch(1, 2)).unwrap();
        spool.append(&batch(2, 2)).unwrap();
        drop(spool);
        let seg = dir.path().join(format!("{:020}.seg", 1));
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut spool = open(dir.path(), 1 << 20);
        assert_eq!(drain(&mut spool), [1]);
        spool.append(&batch(3, 1)).unwrap();
        drop(spool);
        let mut spool = open(dir.path(), 1 << 20);
        assert_eq!(drain(&mut spool), [1, 3]);
    }

    #[test]
    fn the_bound_is_the_bytes_of_segments() {
        let dir = tempfile::tempdir().unwrap();
        let one = batch(1, 2).encode_length_delimited_to_vec().len() as u64;
        let mut spool = open(dir.path(), one * 2);
        assert!(spool.fits(one));
        spool.append(&batch(1, 2)).unwrap();
        spool.append(&batch(2, 2)).unwrap();
        assert_eq!(spool.bytes(), one * 2);
        assert!(!spool.fits(1));
    }

    #[test]
    fn prepended_batches_come_first_also_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = open(dir.path(), 1 << 20);
        spool.append(&batch(4, 1)).unwrap();
        spool.append(&batch(5, 1)).unwrap();
        let older = [batch(1, 1), batch(2, 1), batch(3, 1)];
        spool.prepend(&older.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(drain(&mut spool), [1, 2, 3, 4, 5]);
        assert!(matches!(
            spool.prepend(&[&batch(4, 1)]),
            Err(SpoolError::OutOfOrder(4))
        ));
        drop(spool);
        let mut spool = open(dir.path(), 1 << 20);
        assert_eq!(drain(&mut spool), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn one_agent_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path(), 1024);
        assert!(matches!(
            Spool::open(dir.path(), 1024, || "i-2".into()),
            Err(SpoolError::Locked(_))
        ));
    }

    #[test]
    fn a_new_spool_takes_the_given_instance_and_a_lost_state_the_batches_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, || "fresh".into()).unwrap();
        assert_eq!(spool.state().instance_id, "fresh");
        let mut b = batch(7, 1);
        b.agent_instance_id = "fresh".into();
        spool.append(&b).unwrap();
        drop(spool);
        fs::remove_file(dir.path().join(STATE)).unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, || "other".into()).unwrap();
        assert_eq!(spool.state().instance_id, "fresh");
        assert_eq!(spool.state().last_sequence, 7);
    }
}
