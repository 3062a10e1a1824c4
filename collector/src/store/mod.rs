//! Where audit batches are kept: SQLite by default, PostgreSQL for several
//! collector replicas. Both keep the same tables, the same hash chain per
//! agent instance and answer the same queries; one test suite runs on both.
//!
//! INTERFACE (shared with the ingest service and the query API; keep these
//! names and shapes, fill in the bodies).

#[allow(unused_imports)]
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
