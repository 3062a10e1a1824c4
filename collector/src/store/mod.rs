//! Where audit batches are kept: SQLite by default, PostgreSQL for several
//! collector replicas. Both keep the same tables, the same hash chain per
//! agent instance and answer the same queries; one test suite runs on both.
//!
//! Tables (the same columns in both; SQLite INTEGER/BLOB where PostgreSQL has
//! BIGINT/BYTEA/BOOLEAN):
//!
//! - `audit_batches`: one row per stored batch: `id`, `agent_instance_id`,
//!   `sequence` (unique together), `reporter`, `received_us`,
//!   `dropped_since_last`, `bytes` (estimated stored size, for retention),
//!   `prev_hash`, `hash`.
//! - `audit_events`: one row per record: `id` (the query cursor), `batch_id`,
//!   then every [`StoredEvent`](crate::event::StoredEvent) field (headers as
//!   JSON text, absent numbers as NULL).
//! - `audit_chains`: one row per agent instance: where its retained chain
//!   starts (`anchor_sequence`, `anchor_prev_hash`; moved by retention), the
//!   last batch appended (`tip_sequence`, `tip_hash`), the highest sequence
//!   ever stored (`max_sequence`) and the highest removed by retention
//!   (`pruned_sequence`). Appends lock this row, so two collectors sharing one
//!   PostgreSQL chain an instance's batches one after the other.
//!
//! Every stored u64 must fit in an i64 (SQL integers are signed); a batch
//! holding a larger value is refused with [`StoreError::OutOfRange`].

mod chain;
mod postgres;
mod sql;
mod sqlite;

pub(crate) use chain::VerifyRun;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::event::{BatchRecord, StoredRow};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(String),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("invalid store address {0:?}: expected a file path, sqlite:PATH or postgres://…")]
    Address(String),
    #[error("invalid cursor")]
    Cursor,
    /// A value the SQL integer columns cannot hold.
    #[error("{field} = {value} is larger than the store can hold")]
    OutOfRange { field: &'static str, value: u64 },
    /// A stored row that no longer decodes (edited by hand, or another
    /// program's table).
    #[error("stored row {id} cannot be read: {reason}")]
    Corrupt { id: i64, reason: String },
    /// The blocking task running a SQLite call panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
}

/// What `append` did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored and chained.
    Stored,
    /// (instance, sequence) was stored before: nothing written.
    Duplicate,
}

/// `/v1/events` filters; every `Some` must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventQuery {
    /// Inclusive, microseconds since the Unix epoch.
    pub from_us: Option<i64>,
    /// Exclusive.
    pub to_us: Option<i64>,
    pub source: Option<String>,
    pub destination: Option<String>,
    pub decision: Option<String>,
    pub route: Option<String>,
    pub status: Option<u32>,
    pub request_id: Option<String>,
    pub kind: Option<String>,
    pub reporter: Option<String>,
    /// Rows with an id greater than this (the previous page's cursor).
    pub after_id: Option<i64>,
    /// At most this many rows (the store caps it at 1000).
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPage {
    /// In id order (oldest first).
    pub events: Vec<StoredRow>,
    /// Pass as `after_id` for the next page; `None` when this was the last.
    pub next_after_id: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsQuery {
    pub from_us: Option<i64>,
    pub to_us: Option<i64>,
}

/// Decision records counted over a window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub total: u64,
    /// (decision, count), by count descending.
    pub by_decision: Vec<(String, u64)>,
    pub by_route: Vec<(String, u64)>,
    pub by_source: Vec<(String, u64)>,
    /// Events agents reported lost in the window.
    pub lost: u64,
}

/// What `audit verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub instances: u64,
    pub batches: u64,
    pub problems: Vec<ChainProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainProblem {
    pub agent_instance_id: String,
    pub sequence: u64,
    pub kind: ChainProblemKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainProblemKind {
    /// The batch's records no longer hash to what was stored.
    Edited,
    /// A batch between two stored ones is gone.
    Missing,
    /// Batches are not in the order they were chained.
    Reordered,
}

/// Retention: records older than `max_age_us` or beyond `max_bytes` of
/// database are removed oldest batch first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age_us: Option<i64>,
    pub max_bytes: Option<u64>,
}

impl Retention {
    pub fn is_empty(&self) -> bool {
        self.max_age_us.is_none() && self.max_bytes.is_none()
    }
}

/// The rows an [`EventQuery`] returns at most when it sets no limit.
pub const DEFAULT_QUERY_LIMIT: u32 = 100;
/// The most rows one query returns, whatever it asks for.
pub const MAX_QUERY_LIMIT: u32 = 1000;
/// How many keys each `Stats` breakdown keeps.
pub const STATS_TOP: u32 = 20;

/// The audit store: one of the two backends, chosen by address.
#[derive(Clone)]
pub enum AuditStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl std::fmt::Debug for AuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditStore::Sqlite(store) => write!(f, "AuditStore::Sqlite({:?})", store.path()),
            AuditStore::Postgres(_) => f.write_str("AuditStore::Postgres"),
        }
    }
}

impl AuditStore {
    /// Opens (creating tables and indexes when missing) the store at
    /// `address`: `postgres://…` or `postgresql://…` for PostgreSQL, a file
    /// path or `sqlite:PATH` for SQLite.
    pub async fn open(address: &str) -> Result<Self, StoreError> {
        let address = address.trim();
        if address.starts_with("postgres://") || address.starts_with("postgresql://") {
            return Ok(AuditStore::Postgres(PgStore::open(address).await?));
        }
        let path = address.strip_prefix("sqlite:").unwrap_or(address);
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() || path.contains("://") {
            return Err(StoreError::Address(address.to_owned()));
        }
        Ok(AuditStore::Sqlite(SqliteStore::open(path).await?))
    }

    /// Stores one batch and chains it, or reports it stored before.
    pub async fn append(&self, batch: &BatchRecord) -> Result<Appended, StoreError> {
        let mut outcome = self.append_many(std::slice::from_ref(batch)).await?;
        outcome
            .pop()
            .ok_or_else(|| StoreError::Task("append returned nothing".to_owned()))
    }

    /// Stores several batches in one transaction (all or none), in order; one
    /// outcome per batch.
    pub async fn append_many(&self, batches: &[BatchRecord]) -> Result<Vec<Appended>, StoreError> {
        for batch in batches {
            sql::check_ranges(batch)?;
        }
        match self {
            AuditStore::Sqlite(store) => store.append_many(batches).await,
            AuditStore::Postgres(store) => store.append_many(batches).await,
        }
    }

    /// Stored records matching `q`, oldest first, one page.
    pub async fn query(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        match self {
            AuditStore::Sqlite(store) => store.query(q).await,
            AuditStore::Postgres(store) => store.query(q).await,
        }
    }

    /// Decision records counted over a window, and the events agents lost.
    pub async fn stats(&self, q: &StatsQuery) -> Result<Stats, StoreError> {
        match self {
            AuditStore::Sqlite(store) => store.stats(q).await,
            AuditStore::Postgres(store) => store.stats(q).await,
        }
    }

    /// Recomputes every instance's chain from the stored rows, one read
    /// snapshot, and reports what no longer matches.
    ///
    /// Each stored batch is rehashed from its batch row and its records;
    /// `prev_hash` links are followed from the instance's anchor (its first
    /// batch, or where retention left the chain starting).
    ///
    /// - [`Edited`](ChainProblemKind::Edited): a batch whose rows no longer
    ///   hash to its stored hash, at its sequence (an UPDATE of any column of
    ///   a record or of the batch row). A batch rewritten with its hash
    ///   recomputed still hashes, but the next batch (or the chain head) no
    ///   longer chains to it: also Edited, at the rewritten batch.
    /// - [`Missing`](ChainProblemKind::Missing): sequences between the anchor
    ///   and the highest ever stored that no batch holds, one problem per run
    ///   at its first sequence (a DELETE of a batch, with or without its
    ///   records; deleted records alone make their batch Edited). The batch
    ///   after the hole is not reported again. Batches retention removed are
    ///   before the anchor and never reported.
    /// - [`Reordered`](ChainProblemKind::Reordered): a batch that does not
    ///   hash under the sequence it now holds but does under the one it was
    ///   chained at (its position following `prev_hash` links, or the
    ///   sequence another such batch now holds). Two batches whose sequence
    ///   numbers (or whole rows) were swapped are both reported, each at the
    ///   sequence it holds now.
    ///
    /// A batch that arrived late (stored after a higher sequence) hashes and
    /// chains where it was stored: not a problem.
    pub async fn verify(&self) -> Result<VerifyReport, StoreError> {
        match self {
            AuditStore::Sqlite(store) => store.verify().await,
            AuditStore::Postgres(store) => store.verify().await,
        }
    }

    /// Removes whole batches, oldest first per instance, received more than
    /// `max_age_us` before `now_us`, then as many more as it takes to bring
    /// the database under `max_bytes`. Returns how many records went.
    pub async fn apply_retention(&self, r: Retention, now_us: i64) -> Result<u64, StoreError> {
        if r.is_empty() {
            return Ok(0);
        }
        match self {
            AuditStore::Sqlite(store) => store.apply_retention(r, now_us).await,
            AuditStore::Postgres(store) => store.apply_retention(r, now_us).await,
        }
    }

    /// The database size retention's `max_bytes` is held to: SQLite's pages
    /// in use; for PostgreSQL the stored batches' own size estimates
    /// (deleted rows keep their space in PostgreSQL's files until vacuumed
    /// and reused, so the files' size would not shrink as batches go).
    pub async fn size_bytes(&self) -> Result<u64, StoreError> {
        match self {
            AuditStore::Sqlite(store) => store.size_bytes().await,
            AuditStore::Postgres(store) => store.size_bytes().await,
        }
    }

    /// The highest sequence ever stored for `instance` (retention does not
    /// lower it).
    pub async fn last_sequence(&self, instance: &str) -> Result<Option<u64>, StoreError> {
        match self {
            AuditStore::Sqlite(store) => store.last_sequence(instance).await,
            AuditStore::Postgres(store) => store.last_sequence(instance).await,
        }
    }
}
