//! `Audit.Report`: batches from agents, bound to the mTLS peer, stored once,
//! acknowledged after they are stored (DESIGN §7).
//!
//! Each stream is read one batch at a time: a batch is checked, stored (a
//! duplicate `(instance, sequence)` is acknowledged without storing it
//! again), then acknowledged, so an ack always means "stored". A batch
//! holding an event that is not the peer's own is refused as a whole: the
//! stream ends with `PERMISSION_DENIED` and the attempt is itself stored as
//! a `refused_report` record in the collector's own chain.
//!
//! Agent instance ids are scoped to the reporting identity: a batch of
//! instance `I` from peer `P` is stored as instance `I@P`, so one workload
//! cannot pre-empt another's sequence numbers and have its real batches
//! discarded as duplicates.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use palisade_policy::identity::SpiffeId;
use palisade_proto::audit::v1::{AuditBatch, ReportAck, audit_server::Audit};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::binding::{self, Mismatch};
use crate::event::{BatchRecord, RecordKind, StoredEvent};
use crate::metrics::CollectorMetrics;
use crate::observers::Observers;
use crate::store::{Appended, AuditStore};

/// The most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// The longest agent instance id accepted.
const MAX_INSTANCE_ID_BYTES: usize = 128;
/// Live records kept for slow `tail` readers before they miss some.
const LIVE_BUFFER: usize = 4096;

/// A batch just stored, for live readers (`/v1/tail`).
#[derive(Debug, Clone)]
pub struct LiveBatch {
    pub agent_instance_id: String,
    pub sequence: u64,
    pub events: Vec<StoredEvent>,
}

/// What every report stream shares: the store, the live feed, the
/// collector's own record chain and what watches stored records.
pub struct Ingest {
    store: Arc<AuditStore>,
    live: broadcast::Sender<Arc<LiveBatch>>,
    own: OwnChain,
    metrics: Arc<CollectorMetrics>,
    observers: Observers,
    trust_domain: String,
}

/// The collector's own records (refused reports, alerts) are chained like
/// an agent's, under an instance id random per collector process.
struct OwnChain {
    instance: String,
    next: AtomicU64,
}

impl Ingest {
    pub fn new(
        store: Arc<AuditStore>,
        metrics: Arc<CollectorMetrics>,
        observers: Observers,
        trust_domain: &str,
    ) -> Arc<Self> {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Arc::new(Self {
            store,
            live,
            own: OwnChain {
                instance: format!("collector-{:016x}", rand::random::<u64>()),
                next: AtomicU64::new(1),
            },
            metrics,
            observers,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// Alert and export counters, for `/metrics`.
    pub fn render_observer_metrics(&self, out: &mut String) {
        self.observers.render_metrics(out);
    }

    pub fn store(&self) -> &Arc<AuditStore> {
        &self.store
    }

    /// Records stored from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveBatch>> {
        self.live.subscribe()
    }

    /// Checks, binds and stores one batch from `peer`.
    pub async fn accept(&self, peer: &SpiffeId, batch: AuditBatch) -> Result<Appended, Status> {
        if batch.agent_instance_id.is_empty()
            || batch.agent_instance_id.len() > MAX_INSTANCE_ID_BYTES
        {
            self.metrics.batches_refused.inc();
            return Err(Status::invalid_argument(
                "agent_instance_id must be 1 to 128 bytes",
            ));
        }
        if batch.sequence == 0 {
            self.metrics.batches_refused.inc();
            return Err(Status::invalid_argument("sequence starts at 1"));
        }
        if batch.events.len() > MAX_BATCH_EVENTS {
            self.metrics.batches_refused.inc();
            return Err(Status::invalid_argument(format!(
                "a batch carries at most {MAX_BATCH_EVENTS} events"
            )));
        }
        if let Some(mismatch) = batch
            .events
            .iter()
            .find_map(|e| binding::check_event(peer, e).err())
        {
            self.refuse(peer, &batch, &mismatch).await;
            return Err(Status::permission_denied(format!(
                "audit report refused: {mismatch}"
            )));
        }
        let received_us = now_us();
        let reporter = peer.as_str();
        let mut events = Vec::with_capacity(batch.events.len() + 1);
        if batch.dropped_since_last > 0 {
            events.push(StoredEvent::gap(
                reporter,
                received_us,
                batch.dropped_since_last,
            ));
        }
        let decisions = batch.events.len() as u64;
        events.extend(
            batch
                .events
                .into_iter()
                .map(|e| StoredEvent::from_wire(e, reporter)),
        );
        let record = BatchRecord {
            agent_instance_id: format!("{}@{reporter}", batch.agent_instance_id),
            sequence: batch.sequence,
            reporter: reporter.to_owned(),
            received_us,
            dropped_since_last: batch.dropped_since_last,
            events,
        };
        let appended = self.store_batch(record).await?;
        match appended {
            Appended::Stored => {
                self.metrics.events_stored.inc_by(decisions);
                self.metrics.events_lost.inc_by(batch.dropped_since_last);
            }
            Appended::Duplicate => self.metrics.batches_duplicate.inc(),
        }
        Ok(appended)
    }

    /// Stores records the collector itself makes (refusals, alerts) in its
    /// own chain.
    pub async fn store_own(&self, events: Vec<StoredEvent>) -> Result<(), Status> {
        let record = BatchRecord {
            agent_instance_id: self.own.instance.clone(),
            sequence: self.own.next.fetch_add(1, Ordering::Relaxed),
            reporter: format!("spiffe://{}/collector", self.trust_domain),
            received_us: now_us(),
            dropped_since_last: 0,
            events,
        };
        self.store_batch(record).await.map(|_| ())
    }

    async fn store_batch(&self, record: BatchRecord) -> Result<Appended, Status> {
        let started = std::time::Instant::now();
        let result = self.store.append(&record).await;
        self.metrics.store_latency.observe(started.elapsed());
        match result {
            Ok(Appended::Stored) => {
                let live = Arc::new(LiveBatch {
                    agent_instance_id: record.agent_instance_id,
                    sequence: record.sequence,
                    events: record.events,
                });
                // The collector's own records (alerts, refusals) are
                // exported but not counted by the alert rules again.
                let from_agent = live.agent_instance_id != self.own.instance;
                let raised = self.observers.observe(&live.events, from_agent);
                if !raised.is_empty()
                    && let Err(e) = Box::pin(self.store_own(raised)).await
                {
                    tracing::error!(error = %e.message(), "raised alerts could not be stored");
                }
                // No live reader is not an error.
                let _ = self.live.send(live);
                Ok(Appended::Stored)
            }
            Ok(Appended::Duplicate) => Ok(Appended::Duplicate),
            // A number the store cannot hold (beyond i64): this batch can
            // never be stored, which is the sender's error, not the store's.
            Err(e @ crate::store::StoreError::OutOfRange { .. }) => {
                self.metrics.batches_refused.inc();
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "storing an audit batch failed");
                Err(Status::unavailable("the audit store is unavailable"))
            }
        }
    }

    async fn refuse(&self, peer: &SpiffeId, batch: &AuditBatch, mismatch: &Mismatch) {
        self.metrics.batches_refused.inc();
        tracing::warn!(peer = %peer, instance = %batch.agent_instance_id,
            sequence = batch.sequence, error = %mismatch, "audit report refused");
        let mut record = StoredEvent::new(RecordKind::RefusedReport, now_us());
        record.source_principal = peer.as_str().to_owned();
        record.reporter = mismatch.claimed().to_owned();
        record.request_id = mismatch.request_id().to_owned();
        record.reason = "report.identity_mismatch".to_owned();
        record.rule = mismatch.to_string();
        if let Err(e) = self.store_own(vec![record]).await {
            tracing::error!(error = %e.message(), "the refused report could not be recorded");
        }
    }
}

pub fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

/// The gRPC face of [`Ingest`].
pub struct AuditService {
    ingest: Arc<Ingest>,
    trust_domain: String,
}

impl AuditService {
    pub fn new(ingest: Arc<Ingest>, trust_domain: &str) -> Self {
        Self {
            ingest,
            trust_domain: trust_domain.to_owned(),
        }
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    type ReportStream = ReceiverStream<Result<ReportAck, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<AuditBatch>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let peer = peer_identity(&request, &self.trust_domain)?;
        let mut batches = request.into_inner();
        let ingest = self.ingest.clone();
        let (acks, rx) = mpsc::channel(16);
        ingest.metrics.streams.inc();
        tokio::spawn(async move {
            loop {
                let batch = match batches.message().await {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(peer = %peer, error = %status, "report stream ended");
                        break;
                    }
                };
                let sequence = batch.sequence;
                let answer = ingest
                    .accept(&peer, batch)
                    .await
                    .map(|_| ReportAck { sequence });
                let failed = answer.is_err();
                if acks.send(answer).await.is_err() || failed {
                    break;
                }
            }
            ingest.metrics.streams.dec();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The SPIFFE ID of the verified client certificate (rustls has checked the
/// chain; this reads the identity).
fn peer_identity<T>(request: &Request<T>, trust_domain: &str) -> Result<SpiffeId, Status> {
    let certs = request.peer_certs().unwrap_or_default();
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a mesh client certificate is required"))?;
    palisade_policy::spiffe_cert::spiffe_id_of_certificate(leaf.as_ref(), trust_domain)
        .map_err(|_| Status::unauthenticated("the client certificate has no workload identity"))
}
