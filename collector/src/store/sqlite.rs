//! The embedded store: one SQLite file in WAL mode. Appends and retention go
//! through one writer connection, queries through one reader connection (WAL
//! lets them run side by side), verify through a connection of its own; every
//! call runs on the blocking pool so the async runtime never waits on disk.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::chain::{self, ChainHead, GENESIS, Hash, HeadState, StoredBatch};
use super::sql::{self, RowAccess, Value};
use super::{
    Appended, EventPage, EventQuery, Retention, Stats, StatsQuery, StoreError, VerifyReport,
};
use crate::event::{BatchRecord, StoredEvent};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_instance_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    reporter TEXT NOT NULL,
    received_us INTEGER NOT NULL,
    dropped_since_last INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    UNIQUE (agent_instance_id, sequence)
);
CREATE INDEX IF NOT EXISTS audit_batches_instance_id ON audit_batches (agent_instance_id, id);
CREATE INDEX IF NOT EXISTS audit_batches_received ON audit_batches (received_us);
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    reporter TEXT NOT NULL,
    source_principal TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    destination_workload TEXT NOT NULL,
    destination_port INTEGER NOT NULL,
    route TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    decision TEXT NOT NULL,
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER NOT NULL,
    latency_us INTEGER NOT NULL,
    ratelimit_id TEXT NOT NULL,
    ratelimit_limit INTEGER,
    ratelimit_remaining INTEGER,
    jwt_subject TEXT NOT NULL,
    api_key_client TEXT NOT NULL,
    audit_only INTEGER NOT NULL,
    shadow_reason TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    headers TEXT NOT NULL,
    lost INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_chains (
    agent_instance_id TEXT PRIMARY KEY,
    anchor_sequence INTEGER NOT NULL,
    anchor_prev_hash BLOB NOT NULL,
    tip_sequence INTEGER,
    tip_hash BLOB NOT NULL,
    max_sequence INTEGER,
    pruned_sequence INTEGER
);
";

const INSERT_BATCH: &str = "INSERT INTO audit_batches \
    (agent_instance_id, sequence, reporter, received_us, dropped_since_last, bytes, prev_hash, hash) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
    ON CONFLICT (agent_instance_id, sequence) DO NOTHING RETURNING id";

const INSERT_EVENT: &str = "INSERT INTO audit_events (batch_id, kind, time_us, request_id, \
    trace_id, reporter, source_principal, source_ip, destination_workload, destination_port, \
    route, method, path, decision, rule, reason, status, latency_us, ratelimit_id, \
    ratelimit_limit, ratelimit_remaining, jwt_subject, api_key_client, audit_only, \
    shadow_reason, policy_version, headers, lost) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
    ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)";

/// All of a batch's records, one prepared single-row INSERT each, in
/// order (ids increase in batch order). Multi-row INSERTs measured slower.
fn insert_events(tx: &Connection, batch_id: i64, events: &[StoredEvent]) -> Result<(), StoreError> {
    let mut insert = tx.prepare_cached(INSERT_EVENT)?;
    for e in events {
        insert.execute(params![
            batch_id,
            e.kind.as_str(),
            e.time_us,
            e.request_id,
            e.trace_id,
            e.reporter,
            e.source_principal,
            e.source_ip,
            e.destination_workload,
            e.destination_port,
            e.route,
            e.method,
            e.path,
            e.decision,
            e.rule,
            e.reason,
            e.status,
            sql::int(e.latency_us),
            e.ratelimit_id,
            sql::opt_int(e.ratelimit_limit),
            sql::opt_int(e.ratelimit_remaining),
            e.jwt_subject,
            e.api_key_client,
            e.audit_only,
            e.shadow_reason,
            e.policy_version,
            sql::headers_json(e),
            sql::int(e.lost),
        ])?;
    }
    Ok(())
}

const SELECT_HEAD: &str = "SELECT anchor_sequence, anchor_prev_hash, tip_sequence, tip_hash, \
    max_sequence, pruned_sequence FROM audit_chains WHERE agent_instance_id = ?1";

/// SQLite behind [`AuditStore`](super::AuditStore).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    /// `None` for an in-memory database, which only the writer can see.
    reader: Option<Mutex<Connection>>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e.to_string())
    }
}

impl SqliteStore {
    pub(super) async fn open(path: &str) -> Result<Self, StoreError> {
        let path = PathBuf::from(path);
        blocking(move || Self::open_blocking(path)).await
    }

    fn open_blocking(path: PathBuf) -> Result<Self, StoreError> {
        let memory = path.as_os_str() == ":memory:";
        let writer = Connection::open(&path)?;
        configure(&writer)?;
        if !memory {
            let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(path = %path.display(), mode, "SQLite refused WAL mode");
            }
        }
        writer.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints (the only fsyncs with synchronous=NORMAL) every 32 MiB
        // of WAL rather than every 4 MiB: a batch rewrites one page per key
        // value per index, so the default checkpointed after almost every
        // append. The WAL file is cut back to 64 MiB after each.
        writer.pragma_update(None, "wal_autocheckpoint", 8192)?;
        writer.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        writer.execute_batch(SCHEMA)?;
        for index in sql::event_indexes(sql::Dialect::Sqlite) {
            writer.execute_batch(index)?;
        }
        let reader = if memory {
            None
        } else {
            let reader = Connection::open_with_flags(&path, read_only_flags())?;
            configure(&reader)?;
            Some(Mutex::new(reader))
        };
        tracing::debug!(path = %path.display(), "opened SQLite audit store");
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                reader,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn with_writer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        blocking(move || f(&mut inner.writer.lock())).await
    }

    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        blocking(move || match &inner.reader {
            Some(reader) => f(&reader.lock()),
            None => f(&inner.writer.lock()),
        })
        .await
    }

    pub(super) async fn append_many(
        &self,
        batches: &[BatchRecord],
    ) -> Result<Vec<Appended>, StoreError> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        // On a multi-thread runtime the worker hands its other tasks over
        // and writes in place: no copy of the batches. A current-thread
        // runtime cannot do that; its copy goes to the blocking pool.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            let inner = &self.inner;
            return tokio::task::block_in_place(|| {
                append_blocking(&mut inner.writer.lock(), batches)
            });
        }
        let batches = batches.to_vec();
        self.with_writer(move |conn| append_blocking(conn, &batches))
            .await
    }

    pub(super) async fn query(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        let q = q.clone();
        self.with_reader(move |conn| {
            let (text, values) = sql::event_query(&q, sql::Dialect::Sqlite);
            let mut stmt = conn.prepare_cached(&text)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(bind(values)))?;
            let mut events = Vec::new();
            while let Some(row) = rows.next()? {
                events.push(sql::decode_row(row)?);
            }
            let next_after_id = sql::next_cursor(&events, &q);
            Ok(EventPage {
                events,
                next_after_id,
            })
        })
        .await
    }

    pub(super) async fn stats(&self, q: &StatsQuery) -> Result<Stats, StoreError> {
        let q = q.clone();
        self.with_reader(move |conn| {
            let s = sql::stats_sql(&q, sql::Dialect::Sqlite);
            // One read transaction: the figures come from one snapshot.
            conn.execute_batch("BEGIN")?;
            let result = (|| {
                let values = || rusqlite::params_from_iter(bind(s.values.clone()));
                let total: i64 = conn
                    .prepare_cached(&s.total)?
                    .query_row(values(), |r| r.get(0))?;
                let lost: i64 = conn
                    .prepare_cached(&s.lost)?
                    .query_row(values(), |r| r.get(0))?;
                let top = |text: &str| -> Result<Vec<(String, u64)>, StoreError> {
                    let mut stmt = conn.prepare_cached(text)?;
                    let rows = stmt.query_map(values(), |r| {
                        Ok((r.get::<_, String>(0)?, sql::count(r.get(1)?)))
                    })?;
                    Ok(rows.collect::<Result<_, _>>()?)
                };
                Ok(Stats {
                    total: sql::count(total),
                    by_decision: top(&s.by_decision)?,
                    by_route: top(&s.by_route)?,
                    by_source: top(&s.by_source)?,
                    lost: sql::count(lost),
                })
            })();
            conn.execute_batch("COMMIT")?;
            result
        })
        .await
    }

    pub(super) async fn verify(&self) -> Result<VerifyReport, StoreError> {
        let inner = self.inner.clone();
        blocking(move || {
            if inner.reader.is_none() {
                return verify_blocking(&mut inner.writer.lock());
            }
            // Its own connection: a long verify holds up neither appends nor
            // queries.
            let mut conn = Connection::open_with_flags(&inner.path, read_only_flags())?;
            configure(&conn)?;
            verify_blocking(&mut conn)
        })
        .await
    }

    pub(super) async fn apply_retention(
        &self,
        r: Retention,
        now_us: i64,
    ) -> Result<u64, StoreError> {
        self.with_writer(move |conn| retention_blocking(conn, r, now_us))
            .await
    }

    pub(super) async fn size_bytes(&self) -> Result<u64, StoreError> {
        self.with_reader(used_bytes).await
    }

    pub(super) async fn last_sequence(&self, instance: &str) -> Result<Option<u64>, StoreError> {
        let instance = instance.to_owned();
        self.with_reader(move |conn| {
            let max: Option<Option<i64>> = conn
                .prepare_cached(
                    "SELECT max_sequence FROM audit_chains WHERE agent_instance_id = ?1",
                )?
                .query_row([&instance], |r| r.get(0))
                .optional()?;
            Ok(max.flatten().map(sql::count))
        })
        .await
    }
}

fn read_only_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    // Another process (a second collector, `sqlite3`) may hold the write
    // lock for a moment.
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    // Index pages of a busy store stay in memory (32 MiB).
    conn.pragma_update(None, "cache_size", -32768)?;
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

fn bind(values: Vec<Value>) -> Vec<rusqlite::types::Value> {
    values
        .into_iter()
        .map(|v| match v {
            Value::Int(i) => rusqlite::types::Value::Integer(i),
            Value::Text(t) => rusqlite::types::Value::Text(t),
        })
        .collect()
}

impl RowAccess for rusqlite::Row<'_> {
    fn text(&self, index: usize) -> Result<String, String> {
        self.get(index).map_err(|e| e.to_string())
    }
    fn int(&self, index: usize) -> Result<i64, String> {
        self.get(index).map_err(|e| e.to_string())
    }
    fn opt_int(&self, index: usize) -> Result<Option<i64>, String> {
        self.get(index).map_err(|e| e.to_string())
    }
    fn flag(&self, index: usize) -> Result<bool, String> {
        self.get(index).map_err(|e| e.to_string())
    }
}

fn hash_column(bytes: Vec<u8>, what: &str) -> Result<Hash, StoreError> {
    bytes.try_into().map_err(|_| StoreError::Corrupt {
        id: 0,
        reason: format!("{what} is not 32 bytes"),
    })
}

fn head_state(conn: &Connection, instance: &str) -> Result<Option<HeadState>, StoreError> {
    let row = conn
        .prepare_cached(SELECT_HEAD)?
        .query_row([instance], |r| {
            Ok((
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })
        .optional()?;
    let Some((tip_sequence, tip_hash, max_sequence, pruned_sequence)) = row else {
        return Ok(None);
    };
    Ok(Some(HeadState {
        tip_sequence: tip_sequence.map(sql::count),
        tip_hash: hash_column(tip_hash, "tip_hash")?,
        max_sequence: max_sequence.map(sql::count),
        pruned_sequence: pruned_sequence.map(sql::count),
        changed: false,
    }))
}

fn append_blocking(
    conn: &mut Connection,
    batches: &[BatchRecord],
) -> Result<Vec<Appended>, StoreError> {
    // IMMEDIATE: take the write lock before reading the chain heads, so
    // another process appending to the same file cannot chain in between.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut heads: HashMap<String, HeadState> = HashMap::new();
    let mut outcome = Vec::with_capacity(batches.len());
    for batch in batches {
        let head = match heads.entry(batch.agent_instance_id.clone()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let head = match head_state(&tx, &batch.agent_instance_id)? {
                    Some(head) => head,
                    None => {
                        tx.prepare_cached(
                            "INSERT INTO audit_chains (agent_instance_id, anchor_sequence, \
                             anchor_prev_hash, tip_hash) VALUES (?1, ?2, ?3, ?3)",
                        )?
                        .execute(params![
                            batch.agent_instance_id,
                            sql::int(batch.sequence),
                            GENESIS.as_slice()
                        ])?;
                        HeadState {
                            tip_sequence: None,
                            tip_hash: GENESIS,
                            max_sequence: None,
                            pruned_sequence: None,
                            changed: false,
                        }
                    }
                };
                entry.insert(head)
            }
        };
        if head.pruned(batch.sequence) {
            outcome.push(Appended::Duplicate);
            continue;
        }
        let (hash, bytes) = chain::chain_batch(&head.tip_hash, batch);
        let batch_id: Option<i64> = tx
            .prepare_cached(INSERT_BATCH)?
            .query_row(
                params![
                    batch.agent_instance_id,
                    sql::int(batch.sequence),
                    batch.reporter,
                    batch.received_us,
                    sql::int(batch.dropped_since_last),
                    sql::int(bytes),
                    head.tip_hash.as_slice(),
                    hash.as_slice(),
                ],
                |r| r.get(0),
            )
            .optional()?;
        let Some(batch_id) = batch_id else {
            outcome.push(Appended::Duplicate);
            continue;
        };
        insert_events(&tx, batch_id, &batch.events)?;
        head.advance(batch.sequence, hash);
        outcome.push(Appended::Stored);
    }
    {
        let mut update = tx.prepare_cached(
            "UPDATE audit_chains SET tip_sequence = ?2, tip_hash = ?3, max_sequence = ?4 \
             WHERE agent_instance_id = ?1",
        )?;
        for (instance, head) in &heads {
            if head.changed {
                update.execute(params![
                    instance,
                    head.tip_sequence.map(sql::int),
                    head.tip_hash.as_slice(),
                    head.max_sequence.map(sql::int),
                ])?;
            }
        }
    }
    tx.commit()?;
    Ok(outcome)
}

/// Pages in use (freed pages are reused before the file grows).
fn used_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(sql::count(pages.saturating_sub(free)).saturating_mul(sql::count(size)))
}

fn retention_blocking(conn: &mut Connection, r: Retention, now_us: i64) -> Result<u64, StoreError> {
    let mut removed = 0;
    if let Some(max_age) = r.max_age_us {
        let cutoff = now_us.saturating_sub(max_age);
        let plan = plan_rows(conn, &sql::retention_age_plan(sql::Dialect::Sqlite), cutoff)?;
        for (instance, through) in plan {
            removed += prune(conn, &instance, through)?;
        }
    }
    if let Some(max_bytes) = r.max_bytes {
        let used = used_bytes(conn)?;
        if used > max_bytes {
            let logical: i64 = conn.query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM audit_batches",
                [],
                |r| r.get(0),
            )?;
            // The database's excess share, in the batches' own size
            // estimates; pages are measured again on the next run.
            let target = sql::scale(used - max_bytes, sql::count(logical), used);
            let plan = plan_rows(
                conn,
                &sql::retention_bytes_plan(sql::Dialect::Sqlite),
                target,
            )?;
            for (instance, through) in plan {
                removed += prune(conn, &instance, through)?;
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "audit retention removed records");
    }
    Ok(removed)
}

/// (instance, last batch id to remove) rows of a retention plan.
fn plan_rows(conn: &Connection, text: &str, bound: i64) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(text)?;
    let rows = stmt.query_map([bound], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Removes `instance`'s batches with ids up to `through` and their records,
/// and moves its anchor to where the rest of the chain now starts.
fn prune(conn: &mut Connection, instance: &str, through: i64) -> Result<u64, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let last: Option<Vec<u8>> = tx
        .prepare_cached(
            "SELECT hash FROM audit_batches WHERE agent_instance_id = ?1 AND id <= ?2 \
             ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![instance, through], |r| r.get(0))
        .optional()?;
    let Some(last_hash) = last else {
        return Ok(0);
    };
    let max_sequence: i64 = tx
        .prepare_cached(
            "SELECT MAX(sequence) FROM audit_batches WHERE agent_instance_id = ?1 AND id <= ?2",
        )?
        .query_row(params![instance, through], |r| r.get(0))?;
    let removed = tx
        .prepare_cached(
            "DELETE FROM audit_events WHERE batch_id IN \
             (SELECT id FROM audit_batches WHERE agent_instance_id = ?1 AND id <= ?2)",
        )?
        .execute(params![instance, through])?;
    tx.prepare_cached("DELETE FROM audit_batches WHERE agent_instance_id = ?1 AND id <= ?2")?
        .execute(params![instance, through])?;
    tx.prepare_cached(
        "UPDATE audit_chains SET anchor_sequence = MAX(anchor_sequence, ?2 + 1), \
         anchor_prev_hash = ?3, pruned_sequence = MAX(COALESCE(pruned_sequence, ?2), ?2) \
         WHERE agent_instance_id = ?1",
    )?
    .execute(params![instance, max_sequence, last_hash])?;
    tx.commit()?;
    Ok(removed as u64)
}

fn verify_blocking(conn: &mut Connection) -> Result<VerifyReport, StoreError> {
    // One read transaction: heads and batches from the same snapshot.
    let tx = conn.transaction()?;
    let mut heads = HashMap::new();
    {
        let mut stmt = tx.prepare(
            "SELECT agent_instance_id, anchor_sequence, anchor_prev_hash, tip_sequence, \
             tip_hash, max_sequence FROM audit_chains",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let instance: String = row.get(0)?;
            let head = (|| -> Option<ChainHead> {
                Some(ChainHead {
                    anchor_sequence: u64::try_from(row.get::<_, i64>(1).ok()?).ok()?,
                    anchor_prev_hash: row.get::<_, Vec<u8>>(2).ok()?.try_into().ok()?,
                    tip_sequence: row
                        .get::<_, Option<i64>>(3)
                        .ok()?
                        .map(u64::try_from)
                        .transpose()
                        .ok()?,
                    tip_hash: row.get::<_, Vec<u8>>(4).ok()?.try_into().ok()?,
                    max_sequence: row
                        .get::<_, Option<i64>>(5)
                        .ok()?
                        .map(u64::try_from)
                        .transpose()
                        .ok()?,
                })
            })();
            heads.insert(instance, head);
        }
    }
    let mut run = super::VerifyRun::new(heads);
    {
        let mut stmt = tx.prepare(&format!(
            "SELECT b.agent_instance_id, b.id, b.sequence, b.reporter, b.received_us, \
             b.dropped_since_last, b.prev_hash, b.hash, e.id, {} \
             FROM audit_batches b LEFT JOIN audit_events e ON e.batch_id = b.id \
             ORDER BY b.agent_instance_id, b.sequence, b.id, e.id",
            sql::event_select_list()
        ))?;
        let mut rows = stmt.query([])?;
        let mut current = None;
        while let Some(row) = rows.next()? {
            let batch_id: i64 = row.get(1)?;
            if current != Some(batch_id) {
                current = Some(batch_id);
                let instance: String = row.get(0)?;
                run.batch(
                    &instance,
                    StoredBatch {
                        id: batch_id,
                        sequence: row.get(2)?,
                        reporter: row.get(3).unwrap_or_default(),
                        received_us: row.get(4).unwrap_or_default(),
                        dropped_since_last: row.get(5).unwrap_or(-1),
                        prev_hash: row.get(6).unwrap_or_default(),
                        hash: row.get(7).unwrap_or_default(),
                    },
                );
            }
            if row.get::<_, Option<i64>>(8)?.is_some() {
                run.event(sql::decode_event(row, 9));
            }
        }
    }
    tx.commit()?;
    Ok(run.finish())
}
