//! The audit collector (DESIGN §7): receives `Audit.Report` streams from
//! agents over mTLS, binds every event to the reporting peer's identity,
//! stores batches hash-chained per agent instance, and serves them back.

pub mod alerts;
pub mod api;
pub mod binding;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod observers;
pub mod otlp;
pub mod serve;
pub mod store;
