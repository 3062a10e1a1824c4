//! What both backends share: the column list, the query filters (always as
//! bound parameters), decoding a stored record, and the checks a batch
//! passes before it is written.

use super::{DEFAULT_QUERY_LIMIT, EventQuery, MAX_QUERY_LIMIT, StatsQuery, StoreError};
use crate::event::{BatchRecord, RecordKind, StoredEvent};

/// `audit_events` columns after `id` and `batch_id`, in StoredEvent order.
pub(crate) const EVENT_COLUMNS: [&str; 27] = [
    "kind",
    "time_us",
    "request_id",
    "trace_id",
    "reporter",
    "source_principal",
    "source_ip",
    "destination_workload",
    "destination_port",
    "route",
    "method",
    "path",
    "decision",
    "rule",
    "reason",
    "status",
    "latency_us",
    "ratelimit_id",
    "ratelimit_limit",
    "ratelimit_remaining",
    "jwt_subject",
    "api_key_client",
    "audit_only",
    "shadow_reason",
    "policy_version",
    "headers",
    "lost",
];

/// Which SQL the statements are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub(crate) fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }
}

/// The indexes on `audit_events`, as statements.
///
/// What an index costs on ingest is the pages it dirties per batch: about
/// one per distinct key value in the batch, each rewritten whole into
/// SQLite's WAL at commit. A batch comes from one agent, so its
/// destination, routes and callers are few and those indexes are cheap; a
/// random key like the request id dirties a page per record. Hence:
///
/// - `decision` is indexed only where it is not `allow` (the rare rows one
///   looks for; `allow` matches most rows, found soon enough in id order).
/// - SQLite indexes the request id within its batch, `(batch_id,
///   request_id)`: written next to the batch's other entries, looked up by
///   probing each batch (one index seek per batch); the same index serves
///   verify and retention by `batch_id`. PostgreSQL logs index changes as
///   tuples rather than whole pages and keeps a plain `request_id` index.
pub(crate) fn event_indexes(dialect: Dialect) -> Vec<&'static str> {
    let mut indexes = vec![
        "CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (time_us)",
        "CREATE INDEX IF NOT EXISTS audit_events_source_principal ON audit_events (source_principal)",
        "CREATE INDEX IF NOT EXISTS audit_events_source_ip ON audit_events (source_ip)",
        "CREATE INDEX IF NOT EXISTS audit_events_destination ON audit_events (destination_workload)",
        "CREATE INDEX IF NOT EXISTS audit_events_route ON audit_events (route)",
        "CREATE INDEX IF NOT EXISTS audit_events_decision ON audit_events (decision) \
         WHERE decision <> 'allow'",
    ];
    match dialect {
        Dialect::Sqlite => indexes.push(
            "CREATE INDEX IF NOT EXISTS audit_events_batch_request \
             ON audit_events (batch_id, request_id)",
        ),
        Dialect::Postgres => indexes.extend([
            "CREATE INDEX IF NOT EXISTS audit_events_request_id ON audit_events (request_id)",
            "CREATE INDEX IF NOT EXISTS audit_events_batch ON audit_events (batch_id)",
        ]),
    }
    indexes
}

/// `e.kind, e.time_us, …`
pub(crate) fn event_select_list() -> String {
    EVENT_COLUMNS
        .iter()
        .map(|c| format!("e.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A bound parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Int(i64),
    Text(String),
}

/// A WHERE clause with numbered placeholders and the values they bind.
pub(crate) struct Filter {
    pub(crate) clause: String,
    pub(crate) values: Vec<Value>,
    dialect: Dialect,
}

impl Filter {
    pub(crate) fn new(dialect: Dialect) -> Self {
        Self {
            clause: String::new(),
            values: Vec::new(),
            dialect,
        }
    }

    /// The next placeholder, bound to `value`.
    pub(crate) fn bind(&mut self, value: Value) -> String {
        self.values.push(value);
        self.dialect.placeholder(self.values.len())
    }

    /// Adds `condition` (its text built from placeholders from `bind`).
    pub(crate) fn and(&mut self, condition: String) {
        self.clause.push_str(if self.clause.is_empty() {
            " WHERE "
        } else {
            " AND "
        });
        self.clause.push_str(&condition);
    }

    fn equal(&mut self, column: &str, value: &Option<String>) {
        if let Some(value) = value {
            let p = self.bind(Value::Text(value.clone()));
            self.and(format!("{column} = {p}"));
        }
    }

    fn window(&mut self, from_us: Option<i64>, to_us: Option<i64>) {
        if let Some(from) = from_us {
            let p = self.bind(Value::Int(from));
            self.and(format!("e.time_us >= {p}"));
        }
        if let Some(to) = to_us {
            let p = self.bind(Value::Int(to));
            self.and(format!("e.time_us < {p}"));
        }
    }
}

/// The page size `q` asks for, within bounds.
pub(crate) fn page_limit(q: &EventQuery) -> u32 {
    q.limit
        .unwrap_or(DEFAULT_QUERY_LIMIT)
        .clamp(1, MAX_QUERY_LIMIT)
}

/// `SELECT id, instance, sequence, <event columns>` for `q`, one page.
pub(crate) fn event_query(q: &EventQuery, dialect: Dialect) -> (String, Vec<Value>) {
    let mut f = Filter::new(dialect);
    f.window(q.from_us, q.to_us);
    if let Some(source) = &q.source {
        let a = f.bind(Value::Text(source.clone()));
        let b = f.bind(Value::Text(source.clone()));
        f.and(format!("(e.source_principal = {a} OR e.source_ip = {b})"));
    }
    f.equal("e.destination_workload", &q.destination);
    if let Some(decision) = &q.decision {
        let p = f.bind(Value::Text(decision.clone()));
        f.and(format!("e.decision = {p}"));
        // Spelled out so the planner can use the partial index (the value
        // itself stays bound).
        if decision != "allow" {
            f.and("e.decision <> 'allow'".to_owned());
        }
    }
    f.equal("e.route", &q.route);
    if let Some(status) = q.status {
        let p = f.bind(Value::Int(i64::from(status)));
        f.and(format!("e.status = {p}"));
    }
    if let Some(request_id) = &q.request_id {
        let p = f.bind(Value::Text(request_id.clone()));
        f.and(format!("e.request_id = {p}"));
        if dialect == Dialect::Sqlite {
            // One seek per batch on (batch_id, request_id).
            f.and("e.batch_id IN (SELECT id FROM audit_batches)".to_owned());
        }
    }
    f.equal("e.kind", &q.kind);
    f.equal("e.reporter", &q.reporter);
    if let Some(after) = q.after_id {
        let p = f.bind(Value::Int(after));
        f.and(format!("e.id > {p}"));
    }
    let limit = f.bind(Value::Int(i64::from(page_limit(q))));
    // The page's ids first (filtered, sorted and cut on the indexes alone),
    // then only those rows: a wide time window sorts ids, not whole rows.
    // A record whose batch row is gone (deleted by hand) still shows, with
    // an empty instance and sequence 0.
    let sql = format!(
        "SELECT e.id, COALESCE(b.agent_instance_id, ''), COALESCE(b.sequence, 0), {} \
         FROM audit_events e LEFT JOIN audit_batches b ON b.id = e.batch_id \
         WHERE e.id IN (SELECT e.id FROM audit_events e{} ORDER BY e.id LIMIT {limit}) \
         ORDER BY e.id",
        event_select_list(),
        f.clause
    );
    (sql, f.values)
}

/// The statements `stats` runs: total, the three breakdowns, lost.
pub(crate) struct StatsSql {
    pub(crate) total: String,
    pub(crate) by_decision: String,
    pub(crate) by_route: String,
    pub(crate) by_source: String,
    pub(crate) lost: String,
    pub(crate) values: Vec<Value>,
}

pub(crate) fn stats_sql(q: &StatsQuery, dialect: Dialect) -> StatsSql {
    let mut f = Filter::new(dialect);
    f.window(q.from_us, q.to_us);
    let window = f.clause.clone();
    let decisions = if window.is_empty() {
        " WHERE e.kind = 'decision'".to_owned()
    } else {
        format!("{window} AND e.kind = 'decision'")
    };
    let gaps = if window.is_empty() {
        " WHERE e.kind = 'gap'".to_owned()
    } else {
        format!("{window} AND e.kind = 'gap'")
    };
    let top = |column: &str| {
        format!(
            "SELECT e.{column}, COUNT(*) AS n FROM audit_events e{decisions} \
             GROUP BY e.{column} ORDER BY n DESC, e.{column} ASC LIMIT {}",
            super::STATS_TOP
        )
    };
    StatsSql {
        total: format!("SELECT COUNT(*) FROM audit_events e{decisions}"),
        by_decision: top("decision"),
        by_route: top("route"),
        by_source: top("source_principal"),
        lost: format!("SELECT CAST(COALESCE(SUM(e.lost), 0) AS BIGINT) FROM audit_events e{gaps}"),
        values: f.values,
    }
}

/// Retention by age: per instance, the last batch id of the run of oldest
/// batches all received before the cutoff (placeholder 1). The chain loses
/// a prefix, never a batch in the middle.
pub(crate) fn retention_age_plan(dialect: Dialect) -> String {
    let cutoff = dialect.placeholder(1);
    format!(
        "WITH keep AS (SELECT agent_instance_id, MIN(id) AS first_kept FROM audit_batches \
         WHERE received_us >= {cutoff} GROUP BY agent_instance_id) \
         SELECT o.agent_instance_id, MAX(o.id) FROM audit_batches o \
         LEFT JOIN keep k ON k.agent_instance_id = o.agent_instance_id \
         WHERE o.received_us < {cutoff} AND (k.first_kept IS NULL OR o.id < k.first_kept) \
         GROUP BY o.agent_instance_id"
    )
}

/// Retention by size: the oldest batches (storage order) whose estimated
/// bytes add up to the target (placeholder 1), as (instance, last id).
pub(crate) fn retention_bytes_plan(dialect: Dialect) -> String {
    format!(
        "SELECT agent_instance_id, MAX(id) FROM (SELECT id, agent_instance_id, bytes, \
         CAST(SUM(bytes) OVER (ORDER BY id) AS BIGINT) AS running FROM audit_batches) t \
         WHERE running - bytes < {} GROUP BY agent_instance_id",
        dialect.placeholder(1)
    )
}

/// `value * numerator / denominator` without overflow, as an SQL integer.
pub(crate) fn scale(value: u64, numerator: u64, denominator: u64) -> i64 {
    let scaled = u128::from(value) * u128::from(numerator) / u128::from(denominator.max(1));
    i64::try_from(scaled).unwrap_or(i64::MAX).max(1)
}

/// Reads one column of a result row; both backends implement it.
pub(crate) trait RowAccess {
    fn text(&self, index: usize) -> Result<String, String>;
    fn int(&self, index: usize) -> Result<i64, String>;
    fn opt_int(&self, index: usize) -> Result<Option<i64>, String>;
    fn flag(&self, index: usize) -> Result<bool, String>;
}

/// The record in the [`EVENT_COLUMNS`] starting at column `at`.
pub(crate) fn decode_event(row: &impl RowAccess, at: usize) -> Result<StoredEvent, String> {
    let text = |i: usize| row.text(at + i);
    let int = |i: usize| row.int(at + i);
    let unsigned = |i: usize| {
        let value = row.int(at + i)?;
        u64::try_from(value).map_err(|_| format!("{} is negative", EVENT_COLUMNS[i]))
    };
    let opt_unsigned = |i: usize| match row.opt_int(at + i)? {
        None => Ok(None),
        Some(value) => u64::try_from(value)
            .map(Some)
            .map_err(|_| format!("{} is negative", EVENT_COLUMNS[i])),
    };
    let small = |i: usize| {
        let value = row.int(at + i)?;
        u32::try_from(value).map_err(|_| format!("{} is out of range", EVENT_COLUMNS[i]))
    };
    let kind_text = text(0)?;
    let kind =
        RecordKind::parse(&kind_text).ok_or_else(|| format!("unknown kind {kind_text:?}"))?;
    let headers_json = text(25)?;
    let headers: Vec<(String, String)> = serde_json::from_str(&headers_json)
        .map_err(|e| format!("headers are not a JSON list of pairs: {e}"))?;
    Ok(StoredEvent {
        kind,
        time_us: int(1)?,
        request_id: text(2)?,
        trace_id: text(3)?,
        reporter: text(4)?,
        source_principal: text(5)?,
        source_ip: text(6)?,
        destination_workload: text(7)?,
        destination_port: small(8)?,
        route: text(9)?,
        method: text(10)?,
        path: text(11)?,
        decision: text(12)?,
        rule: text(13)?,
        reason: text(14)?,
        status: small(15)?,
        latency_us: unsigned(16)?,
        ratelimit_id: text(17)?,
        ratelimit_limit: opt_unsigned(18)?,
        ratelimit_remaining: opt_unsigned(19)?,
        jwt_subject: text(20)?,
        api_key_client: text(21)?,
        audit_only: row.flag(at + 22)?,
        shadow_reason: text(23)?,
        policy_version: text(24)?,
        headers,
        lost: unsigned(26)?,
    })
}

/// Headers as stored: a JSON list of `[name, value]` pairs (a list, not an
/// object, so repeated names and their order survive).
pub(crate) fn headers_json(event: &StoredEvent) -> String {
    // Serializing strings cannot fail.
    serde_json::to_string(&event.headers).unwrap_or_else(|_| "[]".to_owned())
}

/// u64 → i64 for a column; checked by `check_ranges` before any write.
pub(crate) fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn opt_int(value: Option<u64>) -> Option<i64> {
    value.map(int)
}

/// Refuses a batch holding a u64 an SQL integer cannot hold.
pub(crate) fn check_ranges(batch: &BatchRecord) -> Result<(), StoreError> {
    let check = |field: &'static str, value: u64| {
        if i64::try_from(value).is_err() {
            Err(StoreError::OutOfRange { field, value })
        } else {
            Ok(())
        }
    };
    check("sequence", batch.sequence)?;
    check("dropped_since_last", batch.dropped_since_last)?;
    for event in &batch.events {
        check("latency_us", event.latency_us)?;
        check("lost", event.lost)?;
        if let Some(limit) = event.ratelimit_limit {
            check("ratelimit_limit", limit)?;
        }
        if let Some(remaining) = event.ratelimit_remaining {
            check("ratelimit_remaining", remaining)?;
        }
    }
    Ok(())
}

/// A count column as u64.
pub(crate) fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Decodes a page row: id, instance, sequence, then the event columns.
pub(crate) fn decode_row(row: &impl RowAccess) -> Result<crate::event::StoredRow, StoreError> {
    let id = row
        .int(0)
        .map_err(|reason| StoreError::Corrupt { id: 0, reason })?;
    let corrupt = |reason: String| StoreError::Corrupt { id, reason };
    let agent_instance_id = row.text(1).map_err(corrupt)?;
    let sequence = row.int(2).map_err(corrupt)?;
    let sequence =
        u64::try_from(sequence).map_err(|_| corrupt("sequence is negative".to_owned()))?;
    let event = decode_event(row, 3).map_err(corrupt)?;
    Ok(crate::event::StoredRow {
        id,
        agent_instance_id,
        sequence,
        event,
    })
}

/// The next page's cursor: the last id when the page is full.
pub(crate) fn next_cursor(rows: &[crate::event::StoredRow], q: &EventQuery) -> Option<i64> {
    if rows.len() >= page_limit(q) as usize {
        rows.last().map(|r| r.id)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_is_a_placeholder() {
        let q = EventQuery {
            from_us: Some(1),
            to_us: Some(2),
            source: Some("' OR 1=1 --".to_owned()),
            destination: Some("d".to_owned()),
            decision: Some("deny".to_owned()),
            route: Some("r".to_owned()),
            status: Some(403),
            request_id: Some("q".to_owned()),
            kind: Some("decision".to_owned()),
            reporter: Some("p".to_owned()),
            after_id: Some(9),
            limit: Some(5000),
        };
        let (sql, values) = event_query(&q, Dialect::Postgres);
        assert!(!sql.contains("OR 1=1"), "{sql}");
        assert_eq!(values.len(), 13);
        assert!(sql.contains("$13"), "{sql}");
        assert_eq!(values.last(), Some(&Value::Int(1000)));
        // The planner's hints are fixed text; values stay bound.
        assert!(sql.contains("e.decision <> 'allow'"), "{sql}");
        assert!(!sql.contains("IN (SELECT id FROM audit_batches)"), "{sql}");
        let (sql, _) = event_query(&q, Dialect::Sqlite);
        assert!(
            sql.contains("e.batch_id IN (SELECT id FROM audit_batches)"),
            "{sql}"
        );
        let allow = EventQuery {
            decision: Some("allow".to_owned()),
            ..Default::default()
        };
        let (sql, _) = event_query(&allow, Dialect::Sqlite);
        assert!(!sql.contains("<> 'allow'"), "{sql}");
        let (sql, values) = event_query(&EventQuery::default(), Dialect::Sqlite);
        assert!(
            sql.contains("FROM audit_events e ORDER BY e.id LIMIT ?1"),
            "{sql}"
        );
        assert_eq!(values, vec![Value::Int(100)]);
    }
}
