//! The hash chain both backends keep per agent instance, and the check
//! `verify` runs over what is stored.
//!
//! A batch's hash is `sha256(prev_hash || canonical bytes)`, `prev_hash`
//! being the hash of the batch stored before it for the same instance (32
//! zero bytes for the first). The canonical bytes are, every string and byte
//! run preceded by its length as a big-endian u64 and every number a
//! big-endian 8-byte integer:
//!
//! ```text
//! "palisade.audit.batch.v1"  instance  reporter  received_us  dropped_since_last
//! per event: 0x01 then every StoredEvent field in declaration order
//!            (options: 0x00, or 0x01 and the value; bools one byte;
//!             headers: count, then name and value of each)
//! 0x00  event count  sequence
//! ```
//!
//! The sequence comes last so `verify` can finish the same digest under
//! another sequence without reading the batch's rows again (that is how it
//! tells a moved batch from an edited one).

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use super::{ChainProblem, ChainProblemKind, VerifyReport};
use crate::event::{BatchRecord, StoredEvent};

pub(crate) type Hash = [u8; 32];

/// `prev_hash` of an instance's first batch.
pub(crate) const GENESIS: Hash = [0; 32];

const DOMAIN: &[u8] = b"palisade.audit.batch.v1";

/// Rows a stored record costs beyond its canonical bytes (row header, ids,
/// column headers, one entry in each index), used for byte accounting.
const EVENT_OVERHEAD_BYTES: u64 = 160;
const BATCH_OVERHEAD_BYTES: u64 = 200;

/// A batch's digest with everything but the trailer's sequence absorbed.
#[derive(Clone)]
pub(crate) struct BatchDigest {
    hasher: Sha256,
    events: u64,
    bytes: u64,
}

impl BatchDigest {
    pub(crate) fn new(
        prev_hash: &Hash,
        instance: &str,
        reporter: &str,
        received_us: i64,
        dropped_since_last: u64,
    ) -> Self {
        let mut digest = Self {
            hasher: Sha256::new(),
            events: 0,
            bytes: 0,
        };
        digest.raw(prev_hash);
        digest.bytes_field(DOMAIN);
        digest.text(instance);
        digest.text(reporter);
        digest.i64(received_us);
        digest.u64(dropped_since_last);
        digest
    }

    pub(crate) fn event(&mut self, event: &StoredEvent) {
        // Destructured so that a field added to StoredEvent fails to compile
        // here until it is hashed too.
        let StoredEvent {
            kind,
            time_us,
            request_id,
            trace_id,
            reporter,
            source_principal,
            source_ip,
            destination_workload,
            destination_port,
            route,
            method,
            path,
            decision,
            rule,
            reason,
            status,
            latency_us,
            ratelimit_id,
            ratelimit_limit,
            ratelimit_remaining,
            jwt_subject,
            api_key_client,
            audit_only,
            shadow_reason,
            policy_version,
            headers,
            lost,
        } = event;
        self.raw(&[1]);
        self.text(kind.as_str());
        self.i64(*time_us);
        self.text(request_id);
        self.text(trace_id);
        self.text(reporter);
        self.text(source_principal);
        self.text(source_ip);
        self.text(destination_workload);
        self.u64(u64::from(*destination_port));
        self.text(route);
        self.text(method);
        self.text(path);
        self.text(decision);
        self.text(rule);
        self.text(reason);
        self.u64(u64::from(*status));
        self.u64(*latency_us);
        self.text(ratelimit_id);
        self.opt_u64(*ratelimit_limit);
        self.opt_u64(*ratelimit_remaining);
        self.text(jwt_subject);
        self.text(api_key_client);
        self.raw(&[u8::from(*audit_only)]);
        self.text(shadow_reason);
        self.text(policy_version);
        self.u64(headers.len() as u64);
        for (name, value) in headers {
            self.text(name);
            self.text(value);
        }
        self.u64(*lost);
        self.events += 1;
    }

    /// The batch's hash if it sits at `sequence`.
    pub(crate) fn at(&self, sequence: u64) -> Hash {
        let mut hasher = self.hasher.clone();
        hasher.update([0]);
        hasher.update(self.events.to_be_bytes());
        hasher.update(sequence.to_be_bytes());
        hasher.finalize().into()
    }

    /// Estimated bytes the batch takes in the database.
    pub(crate) fn stored_bytes(&self) -> u64 {
        self.bytes
            .saturating_add(BATCH_OVERHEAD_BYTES)
            .saturating_add(self.events.saturating_mul(EVENT_OVERHEAD_BYTES))
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.bytes = self.bytes.saturating_add(bytes.len() as u64);
    }

    fn u64(&mut self, value: u64) {
        self.raw(&value.to_be_bytes());
    }

    fn i64(&mut self, value: i64) {
        self.raw(&value.to_be_bytes());
    }

    fn opt_u64(&mut self, value: Option<u64>) {
        match value {
            None => self.raw(&[0]),
            Some(value) => {
                self.raw(&[1]);
                self.u64(value);
            }
        }
    }

    fn bytes_field(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.raw(bytes);
    }

    fn text(&mut self, text: &str) {
        self.bytes_field(text.as_bytes());
    }
}

/// `batch` chained after `prev_hash`: its hash and estimated stored bytes.
pub(crate) fn chain_batch(prev_hash: &Hash, batch: &BatchRecord) -> (Hash, u64) {
    let mut digest = BatchDigest::new(
        prev_hash,
        &batch.agent_instance_id,
        &batch.reporter,
        batch.received_us,
        batch.dropped_since_last,
    );
    for event in &batch.events {
        digest.event(event);
    }
    (digest.at(batch.sequence), digest.stored_bytes())
}

/// An instance's chain-head row while a transaction holds it.
pub(crate) struct HeadState {
    pub(crate) tip_sequence: Option<u64>,
    pub(crate) tip_hash: Hash,
    pub(crate) max_sequence: Option<u64>,
    pub(crate) pruned_sequence: Option<u64>,
    pub(crate) changed: bool,
}

impl HeadState {
    /// Whether `sequence` was stored before and removed by retention.
    pub(crate) fn pruned(&self, sequence: u64) -> bool {
        self.pruned_sequence.is_some_and(|p| sequence <= p)
    }

    pub(crate) fn advance(&mut self, sequence: u64, hash: Hash) {
        self.tip_sequence = Some(sequence);
        self.tip_hash = hash;
        self.max_sequence = Some(self.max_sequence.map_or(sequence, |m| m.max(sequence)));
        self.changed = true;
    }
}

/// An instance's chain-head row: where its retained chain starts (the first
/// batch ever, or the first after retention) and the last batch appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainHead {
    pub(crate) anchor_sequence: u64,
    pub(crate) anchor_prev_hash: Hash,
    pub(crate) tip_sequence: Option<u64>,
    pub(crate) tip_hash: Hash,
    pub(crate) max_sequence: Option<u64>,
}

/// One stored batch row as `verify` reads it, before its events.
pub(crate) struct StoredBatch {
    pub(crate) id: i64,
    pub(crate) sequence: i64,
    pub(crate) reporter: String,
    pub(crate) received_us: i64,
    pub(crate) dropped_since_last: i64,
    pub(crate) prev_hash: Vec<u8>,
    pub(crate) hash: Vec<u8>,
}

struct Entry {
    id: i64,
    sequence: u64,
    prev: Option<Hash>,
    hash: Option<Hash>,
    /// Kept only while the batch does not hash under its own sequence.
    digest: Option<BatchDigest>,
    /// Why the rows could not be read back, when they could not.
    unreadable: Option<String>,
    intact: bool,
}

/// Checks one instance's stored chain: fed its batches in sequence order,
/// each followed by its records in id order.
///
/// How the three kinds of tampering show:
///
/// - **Edited**: a batch whose records (or batch columns) no longer hash to
///   its stored hash under any position it could have been chained at. A
///   batch whose content was changed *and* its hash recomputed still hashes,
///   but the next batch no longer chains to it: that batch is reported as
///   edited too (so is the last one when the chain head disagrees).
/// - **Missing**: a sequence between the instance's anchor (its first batch,
///   or the first after retention) and the highest sequence the chain head
///   recorded that no stored batch holds; one problem per run of missing
///   sequences, at its first. The batch after a deleted one no longer chains
///   to a stored hash, which the gap already explains, so it is not reported
///   twice. Batches removed by retention are behind the anchor: never
///   reported.
/// - **Reordered**: a batch that does not hash under the sequence it now
///   holds but does under the sequence of the position it was chained at
///   (following `prev_hash` links from the anchor), or under the sequence
///   another such batch now holds. Two batches whose sequence numbers (or,
///   equivalently, whole rows) were swapped are both reported, each at the
///   sequence it now holds.
///
/// Records moved from one batch to another make both batches Edited. A batch
/// stored after a later one (a late retry) hashes under its own sequence and
/// chains to whatever was stored before it: not a problem.
pub(crate) struct ChainCheck {
    instance: String,
    head: Option<ChainHead>,
    entries: Vec<Entry>,
    open: Option<(StoredBatch, Option<BatchDigest>, Option<String>)>,
}

impl ChainCheck {
    pub(crate) fn new(instance: String, head: Option<ChainHead>) -> Self {
        Self {
            instance,
            head,
            entries: Vec::new(),
            open: None,
        }
    }

    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    pub(crate) fn batches(&self) -> u64 {
        (self.entries.len() + usize::from(self.open.is_some())) as u64
    }

    /// Starts the next batch (in sequence order).
    pub(crate) fn batch(&mut self, batch: StoredBatch) {
        self.close();
        let mut unreadable = None;
        let prev = to_hash(&batch.prev_hash);
        let dropped = u64::try_from(batch.dropped_since_last).ok();
        if prev.is_none() {
            unreadable = Some("prev_hash is not 32 bytes".to_owned());
        } else if dropped.is_none() {
            unreadable = Some("dropped_since_last is negative".to_owned());
        } else if batch.sequence < 0 {
            unreadable = Some("sequence is negative".to_owned());
        }
        let digest = match (prev, dropped, &unreadable) {
            (Some(prev), Some(dropped), None) => Some(BatchDigest::new(
                &prev,
                &self.instance,
                &batch.reporter,
                batch.received_us,
                dropped,
            )),
            _ => None,
        };
        self.open = Some((batch, digest, unreadable));
    }

    /// One record of the batch last started, or why it could not be read.
    pub(crate) fn event(&mut self, event: Result<StoredEvent, String>) {
        let Some((_, digest, unreadable)) = self.open.as_mut() else {
            return;
        };
        match event {
            Ok(event) => {
                if let Some(digest) = digest {
                    digest.event(&event);
                }
            }
            Err(why) => {
                *digest = None;
                unreadable.get_or_insert(why);
            }
        }
    }

    fn close(&mut self) {
        let Some((batch, digest, unreadable)) = self.open.take() else {
            return;
        };
        let sequence = u64::try_from(batch.sequence).unwrap_or(0);
        let hash = to_hash(&batch.hash);
        let intact = match (&digest, hash) {
            (Some(digest), Some(hash)) => digest.at(sequence) == hash,
            _ => false,
        };
        let unreadable = match (&unreadable, hash) {
            (None, None) => Some("hash is not 32 bytes".to_owned()),
            _ => unreadable,
        };
        self.entries.push(Entry {
            id: batch.id,
            sequence,
            prev: to_hash(&batch.prev_hash),
            hash,
            digest: if intact { None } else { digest },
            unreadable,
            intact,
        });
    }

    pub(crate) fn finish(mut self) -> Vec<ChainProblem> {
        self.close();
        let entries = &self.entries;
        let mut problems: BTreeMap<(u64, u8), (ChainProblemKind, String)> = BTreeMap::new();
        let mut report = |sequence: u64, kind: ChainProblemKind, detail: String| {
            let rank = match kind {
                ChainProblemKind::Missing => 0,
                ChainProblemKind::Reordered => 1,
                ChainProblemKind::Edited => 2,
            };
            problems.entry((sequence, rank)).or_insert((kind, detail));
        };

        let (anchor_sequence, anchor_prev) = match &self.head {
            Some(head) => (head.anchor_sequence, head.anchor_prev_hash),
            // No chain-head row: start at the first stored batch, from the
            // genesis hash (a prefix deleted with it then still shows).
            None => (entries.first().map_or(0, |e| e.sequence), GENESIS),
        };

        // Entries are in sequence order; index them by hash, by the hash they
        // chain to (children in storage order) and by sequence.
        let mut by_hash: HashMap<Hash, usize> = HashMap::new();
        let mut by_prev: HashMap<Hash, Vec<usize>> = HashMap::new();
        let mut by_sequence: HashMap<u64, usize> = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            if let Some(hash) = entry.hash {
                by_hash
                    .entry(hash)
                    .and_modify(|i| {
                        if entries[*i].id > entry.id {
                            *i = index;
                        }
                    })
                    .or_insert(index);
            }
            if let Some(prev) = entry.prev {
                by_prev.entry(prev).or_default().push(index);
            }
            by_sequence.entry(entry.sequence).or_insert(index);
        }
        for children in by_prev.values_mut() {
            children.sort_by_key(|&i| entries[i].id);
        }

        // The sequence each batch was chained at, once known.
        let mut resolved: Vec<Option<u64>> = entries
            .iter()
            .map(|e| e.intact.then_some(e.sequence))
            .collect();
        let mut visited = vec![false; entries.len()];
        let mut moved: Vec<(usize, u64)> = Vec::new();

        // Follows prev_hash links from `start`, which chains after a batch
        // that sat at `expected - 1`.
        let walk = |start: usize,
                    mut expected: Option<u64>,
                    visited: &mut Vec<bool>,
                    resolved: &mut Vec<Option<u64>>,
                    moved: &mut Vec<(usize, u64)>| {
            let mut next = Some(start);
            while let Some(index) = next {
                visited[index] = true;
                let entry = &entries[index];
                if resolved[index].is_none()
                    && let (Some(digest), Some(hash), Some(at)) =
                        (&entry.digest, entry.hash, expected)
                    && at != entry.sequence
                    && digest.at(at) == hash
                {
                    resolved[index] = Some(at);
                    moved.push((index, at));
                }
                expected = Some(resolved[index].unwrap_or(entry.sequence).saturating_add(1));
                next = entry
                    .hash
                    .and_then(|hash| by_prev.get(&hash))
                    .and_then(|children| children.iter().copied().find(|&c| !visited[c]));
            }
        };

        // From the anchor.
        let first = by_prev
            .get(&anchor_prev)
            .and_then(|children| children.first().copied());
        if let Some(first) = first {
            walk(
                first,
                Some(anchor_sequence),
                &mut visited,
                &mut resolved,
                &mut moved,
            );
        }

        // Batches chained to a hash no stored batch has: the one before them
        // is gone, or was rewritten.
        let mut roots = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            if visited[index] {
                continue;
            }
            let chained_to_stored = entry
                .prev
                .is_some_and(|prev| prev == anchor_prev || by_hash.contains_key(&prev));
            if !chained_to_stored {
                roots.push(index);
                walk(index, None, &mut visited, &mut resolved, &mut moved);
            }
        }
        // What is left forks the chain or loops: not how append chains.
        let mut strays = Vec::new();
        for index in 0..entries.len() {
            if !visited[index] {
                strays.push(index);
                walk(index, None, &mut visited, &mut resolved, &mut moved);
            }
        }

        // Batches still not hashing: moved to where another such batch was?
        let unresolved: Vec<usize> = (0..entries.len())
            .filter(|&i| resolved[i].is_none() && entries[i].digest.is_some())
            .collect();
        const MAX_SWAP_SEARCH: usize = 1024;
        if unresolved.len() <= MAX_SWAP_SEARCH {
            for &index in &unresolved {
                let entry = &entries[index];
                let (Some(digest), Some(hash)) = (&entry.digest, entry.hash) else {
                    continue;
                };
                let found = unresolved
                    .iter()
                    .map(|&other| entries[other].sequence)
                    .filter(|&at| at != entry.sequence)
                    .find(|&at| digest.at(at) == hash);
                if let Some(at) = found {
                    resolved[index] = Some(at);
                    moved.push((index, at));
                }
            }
        }

        for (index, entry) in entries.iter().enumerate() {
            if resolved[index].is_none() {
                let detail = match &entry.unreadable {
                    Some(why) => format!("stored rows cannot be read back: {why}"),
                    None => "records do not hash to the stored hash".to_owned(),
                };
                report(entry.sequence, ChainProblemKind::Edited, detail);
            }
        }
        for &(index, at) in &moved {
            report(
                entries[index].sequence,
                ChainProblemKind::Reordered,
                format!("holds the batch chained as sequence {at}"),
            );
        }
        for &index in &roots {
            let entry = &entries[index];
            let Some(at) = resolved[index] else { continue };
            let before = at.checked_sub(1).and_then(|s| by_sequence.get(&s).copied());
            if let Some(before) = before
                && resolved[before].is_some()
            {
                report(
                    entries[before].sequence,
                    ChainProblemKind::Edited,
                    format!(
                        "batch {} chains to a hash this batch no longer has: rewritten",
                        entry.sequence
                    ),
                );
            }
        }
        for &index in &strays {
            report(
                entries[index].sequence,
                ChainProblemKind::Edited,
                "chains to a batch another batch already follows: inserted or rewritten".to_owned(),
            );
        }

        // Nothing chains to the anchor although the batch there is stored:
        // the batches before it (or the anchor) were removed by hand.
        if first.is_none()
            && let Some(&at_anchor) = by_sequence.get(&anchor_sequence)
            && resolved[at_anchor].is_some()
        {
            report(
                anchor_sequence.saturating_sub(1),
                ChainProblemKind::Missing,
                format!(
                    "batch {anchor_sequence} does not chain to where the retained chain starts"
                ),
            );
        }

        // Sequences from the anchor to the highest ever appended.
        let highest = entries
            .iter()
            .map(|e| e.sequence)
            .chain(self.head.as_ref().and_then(|h| h.max_sequence))
            .max();
        if let Some(highest) = highest {
            let mut stored: Vec<u64> = entries
                .iter()
                .map(|e| e.sequence)
                .filter(|&s| s >= anchor_sequence)
                .collect();
            stored.sort_unstable();
            stored.dedup();
            let mut expect = anchor_sequence;
            for sequence in stored.into_iter().chain(highest.checked_add(1)) {
                if sequence > expect {
                    let last = sequence - 1;
                    let detail = if last == expect {
                        format!("batch {expect} is gone")
                    } else {
                        format!("batches {expect}..={last} are gone ({})", last - expect + 1)
                    };
                    report(expect, ChainProblemKind::Missing, detail);
                }
                expect = expect.max(sequence.saturating_add(1));
            }
        }

        // The chain head remembers the last batch's hash.
        if let Some(head) = &self.head
            && let Some(tip) = head.tip_sequence
            && !entries.is_empty()
            && !by_hash.contains_key(&head.tip_hash)
            && let Some(&index) = by_sequence.get(&tip)
            && resolved[index].is_some()
        {
            report(
                tip,
                ChainProblemKind::Edited,
                "the chain head recorded another hash for this last batch: rewritten".to_owned(),
            );
        }

        problems
            .into_iter()
            .map(|((sequence, _), (kind, detail))| ChainProblem {
                agent_instance_id: self.instance.clone(),
                sequence,
                kind,
                detail,
            })
            .collect()
    }
}

/// A whole `verify`: fed every stored batch ordered by instance then
/// sequence (each followed by its records), with every chain-head row read
/// in the same snapshot.
pub(crate) struct VerifyRun {
    heads: HashMap<String, Option<ChainHead>>,
    current: Option<ChainCheck>,
    report: VerifyReport,
}

impl VerifyRun {
    /// `heads`: each instance's chain-head row, `None` where it does not
    /// decode.
    pub(crate) fn new(heads: HashMap<String, Option<ChainHead>>) -> Self {
        Self {
            heads,
            current: None,
            report: VerifyReport::default(),
        }
    }

    pub(crate) fn batch(&mut self, instance: &str, batch: StoredBatch) {
        if self
            .current
            .as_ref()
            .is_none_or(|c| c.instance() != instance)
        {
            self.finish_current();
            let head = self.heads.remove(instance).flatten();
            self.current = Some(ChainCheck::new(instance.to_owned(), head));
        }
        if let Some(check) = self.current.as_mut() {
            check.batch(batch);
        }
    }

    pub(crate) fn event(&mut self, event: Result<StoredEvent, String>) {
        if let Some(check) = self.current.as_mut() {
            check.event(event);
        }
    }

    fn finish_current(&mut self) {
        if let Some(check) = self.current.take() {
            self.report.instances += 1;
            self.report.batches += check.batches();
            self.report.problems.extend(check.finish());
        }
    }

    pub(crate) fn finish(mut self) -> VerifyReport {
        self.finish_current();
        // Instances with no batch left: all of them gone by hand shows as
        // Missing; retention moves the anchor past the last one instead.
        let mut rest: Vec<_> = std::mem::take(&mut self.heads).into_iter().collect();
        rest.sort_by(|a, b| a.0.cmp(&b.0));
        for (instance, head) in rest {
            self.current = Some(ChainCheck::new(instance, head));
            self.finish_current();
        }
        let mut report = self.report;
        report.problems.sort_by(|a, b| {
            (&a.agent_instance_id, a.sequence).cmp(&(&b.agent_instance_id, b.sequence))
        });
        for problem in &report.problems {
            tracing::warn!(
                instance = %problem.agent_instance_id,
                sequence = problem.sequence,
                kind = ?problem.kind,
                detail = %problem.detail,
                "audit chain problem"
            );
        }
        report
    }
}

fn to_hash(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RecordKind;

    fn batch(sequence: u64, events: usize) -> BatchRecord {
        BatchRecord {
            agent_instance_id: "inst".to_owned(),
            sequence,
            reporter: "spiffe://td/ns/a/sa/b".to_owned(),
            received_us: 1_000 + sequence as i64,
            dropped_since_last: 0,
            events: (0..events)
                .map(|i| {
                    let mut e = StoredEvent::new(RecordKind::Decision, i as i64);
                    e.decision = "deny".to_owned();
                    e.request_id = format!("{sequence}-{i}");
                    e
                })
                .collect(),
        }
    }

    /// Stores `batches` as append would, returning (id, row, prev, hash).
    fn chained(batches: &[BatchRecord]) -> Vec<(i64, BatchRecord, Hash, Hash)> {
        let mut prev = GENESIS;
        let mut out = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            let (hash, _) = chain_batch(&prev, b);
            out.push((i as i64 + 1, b.clone(), prev, hash));
            prev = hash;
        }
        out
    }

    fn check(rows: &[(i64, BatchRecord, Hash, Hash)], head: ChainHead) -> Vec<ChainProblem> {
        let mut rows: Vec<_> = rows.to_vec();
        rows.sort_by_key(|r| r.1.sequence);
        let mut check = ChainCheck::new("inst".to_owned(), Some(head));
        for (id, b, prev, hash) in rows {
            check.batch(StoredBatch {
                id,
                sequence: b.sequence as i64,
                reporter: b.reporter.clone(),
                received_us: b.received_us,
                dropped_since_last: b.dropped_since_last as i64,
                prev_hash: prev.to_vec(),
                hash: hash.to_vec(),
            });
            for e in b.events {
                check.event(Ok(e));
            }
        }
        check.finish()
    }

    fn head(rows: &[(i64, BatchRecord, Hash, Hash)]) -> ChainHead {
        let last = rows.last().unwrap();
        ChainHead {
            anchor_sequence: rows[0].1.sequence,
            anchor_prev_hash: GENESIS,
            tip_sequence: Some(last.1.sequence),
            tip_hash: last.3,
            max_sequence: rows.iter().map(|r| r.1.sequence).max(),
        }
    }

    fn kinds(problems: &[ChainProblem]) -> Vec<(u64, ChainProblemKind)> {
        problems.iter().map(|p| (p.sequence, p.kind)).collect()
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = batch(1, 1);
        let (reference, _) = chain_batch(&GENESIS, &base);
        let mut variants = Vec::new();
        let mut b = base.clone();
        b.agent_instance_id.push('x');
        variants.push(b);
        let mut b = base.clone();
        b.sequence = 2;
        variants.push(b);
        let mut b = base.clone();
        b.received_us += 1;
        variants.push(b);
        let mut b = base.clone();
        b.dropped_since_last = 1;
        variants.push(b);
        let mut b = base.clone();
        b.events[0].ratelimit_limit = Some(0);
        variants.push(b);
        let mut b = base.clone();
        b.events[0].headers.push((String::new(), String::new()));
        variants.push(b);
        let mut b = base.clone();
        b.events[0].audit_only = true;
        variants.push(b);
        // Moving bytes between adjacent strings must not collide.
        let mut b = base.clone();
        b.events[0].request_id = "1-".to_owned();
        b.events[0].trace_id = "0".to_owned();
        variants.push(b);
        for variant in variants {
            assert_ne!(chain_batch(&GENESIS, &variant).0, reference, "{variant:?}");
        }
        assert_ne!(chain_batch(&[1; 32], &base).0, reference);
    }

    #[test]
    fn clean_chain_and_late_arrival_report_nothing() {
        let rows = chained(&[
            batch(1, 2),
            batch(2, 0),
            batch(4, 1),
            batch(3, 1),
            batch(5, 1),
        ]);
        let mut h = head(&rows);
        h.max_sequence = Some(5);
        assert_eq!(check(&rows, h), vec![]);
    }

    #[test]
    fn swap_is_reordered_at_both() {
        let rows = chained(&[batch(1, 1), batch(2, 1), batch(3, 1), batch(4, 1)]);
        let h = head(&rows);
        let mut swapped = rows.clone();
        swapped[1].1.sequence = 3;
        swapped[2].1.sequence = 2;
        assert_eq!(
            kinds(&check(&swapped, h.clone())),
            vec![
                (2, ChainProblemKind::Reordered),
                (3, ChainProblemKind::Reordered)
            ]
        );
        // Far apart, and involving the first batch.
        let mut swapped = rows.clone();
        swapped[0].1.sequence = 4;
        swapped[3].1.sequence = 1;
        assert_eq!(
            kinds(&check(&swapped, h)),
            vec![
                (1, ChainProblemKind::Reordered),
                (4, ChainProblemKind::Reordered)
            ]
        );
    }

    #[test]
    fn rewritten_batch_with_recomputed_hash_is_edited() {
        let rows = chained(&[batch(1, 1), batch(2, 1), batch(3, 1)]);
        let h = head(&rows);
        let mut forged = rows.clone();
        forged[1].1.events[0].decision = "allow".to_owned();
        forged[1].3 = chain_batch(&forged[1].2, &forged[1].1).0;
        assert_eq!(
            kinds(&check(&forged, h.clone())),
            vec![(2, ChainProblemKind::Edited)]
        );
        // The last one: the chain head disagrees.
        let mut forged = rows.clone();
        forged[2].1.events[0].decision = "allow".to_owned();
        forged[2].3 = chain_batch(&forged[2].2, &forged[2].1).0;
        assert_eq!(
            kinds(&check(&forged, h)),
            vec![(3, ChainProblemKind::Edited)]
        );
    }

    #[test]
    fn deletions_are_missing_once() {
        let rows = chained(&[
            batch(1, 1),
            batch(2, 1),
            batch(3, 1),
            batch(4, 1),
            batch(5, 1),
        ]);
        let h = head(&rows);
        let mut cut = rows.clone();
        cut.remove(2);
        cut.remove(2);
        assert_eq!(
            kinds(&check(&cut, h.clone())),
            vec![(3, ChainProblemKind::Missing)]
        );
        let mut cut = rows.clone();
        cut.remove(0);
        assert_eq!(
            kinds(&check(&cut, h.clone())),
            vec![(1, ChainProblemKind::Missing)]
        );
        let mut cut = rows.clone();
        cut.pop();
        assert_eq!(kinds(&check(&cut, h)), vec![(5, ChainProblemKind::Missing)]);
    }

    #[test]
    fn anchor_moved_by_retention_is_clean_but_hides_nothing_after_it() {
        let rows = chained(&[batch(1, 1), batch(2, 1), batch(3, 1), batch(4, 1)]);
        let mut h = head(&rows);
        h.anchor_sequence = 3;
        h.anchor_prev_hash = rows[1].3;
        assert_eq!(check(&rows[2..], h.clone()), vec![]);
        assert_eq!(
            kinds(&check(&rows[3..], h)),
            vec![(3, ChainProblemKind::Missing)]
        );
    }
}
