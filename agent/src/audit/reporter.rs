//! The [`AuditReporter`]: one task that drains the audit queue into
//! batches, numbers them, and streams them to the collector with
//! `Audit.Report` over mutual TLS, at least once and in order.
//!
//! - **Batches** are cut at [`ReporterConfig::batch_events`] events or
//!   [`ReporterConfig::batch_wait`] after their first event, whichever comes
//!   first (and before they pass [`ReporterConfig::batch_max_bytes`]). The
//!   defaults, 500 events or 1 s, follow the Kubernetes API server's audit
//!   webhook batching (`--audit-webhook-batch-max-size=400`,
//!   `--audit-webhook-batch-max-wait=30s`, buffer 10 000, which is also our
//!   queue): about the same size, as a 500-event batch is ~170 KB, far
//!   below gRPC's 4 MiB message limit and cheap to resend; but a wait of
//!   1 s rather than 30 s, because the collector's alert rules (deny-rate
//!   spikes, authentication-failure bursts) should see a flood within a
//!   second, and one small message a second is no load for a quiet agent.
//! - **Sequences** start at 1 and grow by one per batch kept; a batch that
//!   cannot be kept takes no number, and the next batch kept says how many
//!   events were lost since the previous one (`dropped_since_last`), so the
//!   collector stores a gap record and sequences stay gap-free.
//! - **Delivery**: batches are sent as soon as they are cut, up to
//!   [`ReporterConfig::in_flight_batches`] ahead of the acknowledgements; a
//!   `ReportAck{sequence}` releases every batch up to it. When the stream
//!   breaks, what was not acknowledged is sent again, in order, after a
//!   reconnect with jittered exponential backoff. The collector
//!   de-duplicates by (instance, sequence).
//! - **Where un-acknowledged batches wait** ([`super::backlog`]): in memory
//!   while the collector is connected, up to
//!   [`ReporterConfig::memory_max_bytes`]; beyond that, or while it is away,
//!   in the spool (when `--audit-spool-dir` is set, up to its bound);
//!   batches neither can take are dropped and counted.
//! - **Restarts**: with a spool, the instance id and the last sequence live
//!   in it, so a restarted agent first sends what was spooled under its
//!   original instance id and sequence, then continues that sequence.
//!   Without one, nothing survives a restart, so the instance id is unique
//!   per process (random, or `--agent-instance-id` with a random suffix) and
//!   sequences start at 1.
//! - **Identity**: our certificate comes from the [`CertStore`] at every
//!   handshake; the collector's must chain to the mesh trust bundle and be
//!   exactly `--collector-id` when given, else any workload of the trust
//!   domain (as for the operator). Every event is stamped with our SPIFFE ID
//!   (`reporter`) when it joins a batch, off the request path.
//!
//! Spool I/O is synchronous in this task: appends are page-cache writes of
//! at most one batch per cut, without fsync, and the request path never
//! waits on this task.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use palisade_policy::identity::SpiffeId;
use palisade_proto::audit::v1 as pb;
use palisade_proto::audit::v1::audit_client::AuditClient;
use prost::Message;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use super::backlog::{Backlog, Next, Stored};
use super::metrics::{AuditMetrics, AuditStats};
use super::sink::AuditQueue;
use super::spool::{self, Spool, SpoolError};
use crate::identity::{Backoff, CertStore, OperatorConnector};
use crate::tls::{MeshTrust, TlsConfigError};

/// How often to look for the first certificate before connecting.
const CERT_POLL: Duration = Duration::from_millis(100);

/// How the reporter batches, where it sends, and what it may hold.
#[derive(Clone, Debug)]
pub struct ReporterConfig {
    /// `HOST:PORT` of the collector's `Audit` service (`--collector`).
    pub collector_address: String,
    /// When set, the collector's certificate must carry exactly this ID
    /// (`--collector-id`); otherwise any workload of the trust domain.
    pub collector_id: Option<SpiffeId>,
    /// `--agent-instance-id`: names a new spool's instance; without a
    /// spool, the prefix of this process's instance id.
    pub instance_id: Option<String>,
    /// `--audit-spool-dir`; `None`: un-acknowledged batches live in memory
    /// only.
    pub spool_dir: Option<PathBuf>,
    /// `--audit-spool-max-bytes`.
    pub spool_max_bytes: u64,
    /// `--audit-batch-events`: a batch is cut at this many events.
    pub batch_events: usize,
    /// `--audit-batch-ms`: ... or this long after its first event.
    pub batch_wait: Duration,
    /// ... or before it would pass this many encoded bytes.
    pub batch_max_bytes: usize,
    /// Un-acknowledged batches held in memory (encoded bytes) while the
    /// collector is connected; beyond it they go to the spool.
    pub memory_max_bytes: usize,
    /// Batches sent ahead of the acknowledgements.
    pub in_flight_batches: usize,
    /// Bound on connecting, the TLS handshake and the collector's answer.
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long to wait for the collector to acknowledge what
    /// is in flight before spooling it.
    pub flush_timeout: Duration,
}

impl ReporterConfig {
    pub const DEFAULT_BATCH_EVENTS: usize = 500;
    pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_secs(1);

    pub fn new(collector_address: impl Into<String>) -> Self {
        Self {
            collector_address: collector_address.into(),
            collector_id: None,
            instance_id: None,
            spool_dir: None,
            spool_max_bytes: spool::DEFAULT_MAX_BYTES,
            batch_events: Self::DEFAULT_BATCH_EVENTS,
            batch_wait: Self::DEFAULT_BATCH_WAIT,
            batch_max_bytes: 1024 * 1024,
            memory_max_bytes: 8 * 1024 * 1024,
            in_flight_batches: 16,
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            flush_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReporterError {
    #[error("collector address {0:?} is not HOST:PORT")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error("audit spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("cannot reach the collector: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the collector did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the collector refused: {0}")]
    Rpc(#[from] tonic::Status),
}

/// Drains an [`AuditQueue`] to the collector. Build with
/// [`AuditReporter::new`], then [`spawn`](Self::spawn) it.
pub struct AuditReporter {
    config: ReporterConfig,
    queue: AuditQueue,
    store: Arc<CertStore>,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    instance_id: String,
    /// The sequence the next batch kept gets.
    next_seq: u64,
    acked: u64,
    backlog: Backlog,
}

impl std::fmt::Debug for AuditReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditReporter")
            .field("config", &self.config)
            .field("instance_id", &self.instance_id)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl AuditReporter {
    /// Checks the address, builds the TLS client (our certificate from
    /// `store` at each handshake) and opens the spool, if any.
    pub fn new(
        config: ReporterConfig,
        queue: AuditQueue,
        trust: &MeshTrust,
        store: Arc<CertStore>,
    ) -> Result<Self, ReporterError> {
        let address = &config.collector_address;
        let host = address
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| ReporterError::Address(address.clone()))?;
        // Only SNI; the verifier checks the SPIFFE ID, not this name.
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| ReporterError::Address(address.clone()))?;
        let mut tls = trust.client_config(Some(store.clone()), config.collector_id.clone())?;
        tls.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];

        let (spool, instance_id, last_seq, acked) = match &config.spool_dir {
            Some(dir) => {
                let given = config.instance_id.clone();
                let spool = Spool::open(dir, config.spool_max_bytes, || {
                    given.unwrap_or_else(random_id)
                })?;
                let state = spool.state().clone();
                if let Some(given) = &config.instance_id
                    && *given != state.instance_id
                {
                    tracing::info!(spool = %dir.display(), instance = %state.instance_id, given = %given,
                        "audit spool belongs to an earlier instance id; continuing it");
                }
                let last = state.last_sequence.max(spool.last_seq().unwrap_or(0));
                tracing::info!(spool = %dir.display(), instance = %state.instance_id,
                    batches = spool.len(), bytes = spool.bytes(), last_sequence = last,
                    "audit spool opened");
                (Some(spool), state.instance_id, last, state.acked)
            }
            None => {
                let id = match &config.instance_id {
                    Some(given) => format!("{given}-{}", &random_id()[..8]),
                    None => random_id(),
                };
                (None, id, 0, 0)
            }
        };
        let backlog = Backlog::new(config.memory_max_bytes, spool);
        queue
            .stats
            .spool_bytes
            .store(backlog.spool_bytes(), Ordering::Relaxed);
        Ok(Self {
            server_name,
            tls: Arc::new(tls),
            store,
            instance_id,
            next_seq: last_seq + 1,
            acked,
            backlog,
            queue,
            config,
        })
    }

    /// The `agent_instance_id` of every batch.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn metrics(&self) -> &AuditMetrics {
        &self.queue.metrics
    }

    /// Runs the reporter as a task until [`ReporterHandle::shutdown`], or
    /// until every [`AuditSink`](super::AuditSink) is gone.
    pub fn spawn(self) -> ReporterHandle {
        let (stop, stopped) = oneshot::channel();
        let metrics = self.queue.metrics.clone();
        let instance_id = self.instance_id.clone();
        let task = tokio::spawn(self.run(stopped));
        ReporterHandle {
            task: Some(task),
            stop: Some(stop),
            metrics,
            instance_id,
        }
    }

    async fn run(self, stopped: oneshot::Receiver<()>) {
        let mut run = Run::new(self);
        run.main_loop(stopped).await;
        run.finish();
    }
}

/// A running reporter; dropping it aborts the task (batches held only in
/// memory are then lost, spooled ones are not).
#[derive(Debug)]
pub struct ReporterHandle {
    task: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
    metrics: AuditMetrics,
    instance_id: String,
}

impl ReporterHandle {
    pub fn metrics(&self) -> &AuditMetrics {
        &self.metrics
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Cuts what is queued, waits up to the flush timeout for the
    /// collector to acknowledge what is in flight, spools what is left
    /// (when there is a spool) and stops.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops the task at once, as a crash would: nothing more is written.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ReporterHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// Boxed: a tonic stream is large, the other states are not.
type Connecting = Pin<Box<dyn Future<Output = Result<Box<Session>, ReporterError>> + Send>>;

struct Session {
    batches: mpsc::Sender<pb::AuditBatch>,
    acks: tonic::Streaming<pb::ReportAck>,
}

enum Link {
    Down { retry_at: Instant },
    Connecting(Connecting),
    Up(Box<Session>),
}

/// What woke the loop.
enum Wake {
    Stop,
    Events,
    QueueClosed,
    BatchDue,
    Retry,
    Connected(Result<Box<Session>, ReporterError>),
    Ack(Result<Option<pb::ReportAck>, tonic::Status>),
    FlushTimeout,
}

/// The reporter's state while it runs.
struct Run {
    r: AuditReporter,
    stats: Arc<AuditStats>,
    link: Link,
    backoff: Backoff,
    /// The batch being filled, its encoded size and when it is due.
    batch: Vec<pb::AuditEvent>,
    batch_bytes: usize,
    due: Option<Instant>,
    /// Events lost by this task (batches it could not keep) and not yet
    /// reported in a batch.
    owed: u64,
    /// The last sequence written to the current stream.
    sent_through: u64,
    received: Vec<pb::AuditEvent>,
    queue_open: bool,
    /// Set on stop: until when to wait for acknowledgements.
    flush_until: Option<Instant>,
    /// Losses are logged once per run of them.
    losing: bool,
}

impl Run {
    fn new(r: AuditReporter) -> Self {
        let backoff = Backoff::new(r.config.backoff_initial, r.config.backoff_max);
        Self {
            stats: r.queue.stats.clone(),
            link: Link::Down {
                retry_at: Instant::now(),
            },
            backoff,
            batch: Vec::new(),
            batch_bytes: 0,
            due: None,
            owed: 0,
            sent_through: r.acked,
            received: Vec::with_capacity(r.config.batch_events.max(1)),
            queue_open: true,
            flush_until: None,
            losing: false,
            r,
        }
    }

    fn connected(&self) -> bool {
        matches!(self.link, Link::Up(_))
    }

    async fn main_loop(&mut self, mut stopped: oneshot::Receiver<()>) {
        let mut stop_seen = false;
        loop {
            if let Some(until) = self.flush_until
                && (self.flushed() || !self.connected() || Instant::now() >= until)
            {
                return;
            }
            let wake = {
                let limit = self.r.config.batch_events.max(1);
                let queue = &mut self.r.queue.events;
                let received = &mut self.received;
                let due = self.due;
                let flush_until = self.flush_until;
                let link = &mut self.link;
                tokio::select! {
                    biased;
                    _ = &mut stopped, if !stop_seen => Wake::Stop,
                    wake = link_event(link) => wake,
                    n = queue.recv_many(received, limit), if self.queue_open => {
                        if n == 0 { Wake::QueueClosed } else { Wake::Events }
                    }
                    () = sleep_until(due), if due.is_some() => Wake::BatchDue,
                    () = sleep_until(flush_until), if flush_until.is_some() => Wake::FlushTimeout,
                }
            };
            match wake {
                Wake::Stop => {
                    stop_seen = true;
                    self.begin_flush();
                }
                Wake::QueueClosed => {
                    self.queue_open = false;
                    self.begin_flush();
                }
                Wake::Events => self.take_received(),
                Wake::BatchDue => self.cut(),
                Wake::Retry => self.start_connecting(),
                Wake::Connected(Ok(session)) => {
                    tracing::info!(collector = %self.r.config.collector_address,
                        instance = %self.r.instance_id, resend_from = self.r.acked + 1,
                        "audit stream to the collector open");
                    self.stats.connected.store(true, Ordering::Relaxed);
                    self.sent_through = self.r.acked;
                    self.link = Link::Up(session);
                }
                Wake::Connected(Err(e)) => self.link_failed(&e.to_string()),
                Wake::Ack(Ok(Some(ack))) => self.acked(ack.sequence),
                Wake::Ack(Ok(None)) => self.link_failed("the collector closed the stream"),
                Wake::Ack(Err(status)) => self.link_failed(&format!("stream failed: {status}")),
                Wake::FlushTimeout => return,
            }
            self.pump();
        }
    }

    /// Stops waiting for a fuller batch: cuts what is there and, while the
    /// collector is connected, waits (bounded) for its acknowledgements.
    fn begin_flush(&mut self) {
        self.drain_queue();
        self.cut();
        if self.flush_until.is_none() {
            self.flush_until = Some(Instant::now() + self.r.config.flush_timeout);
        }
    }

    fn flushed(&self) -> bool {
        self.batch.is_empty() && self.backlog_empty() && self.r.queue.events.is_empty()
    }

    fn backlog_empty(&self) -> bool {
        self.r.backlog.is_empty()
    }

    /// Everything still queued, without waiting.
    fn drain_queue(&mut self) {
        while let Ok(event) = self.r.queue.events.try_recv() {
            self.received.push(event);
            if self.received.len() >= self.r.config.batch_events.max(1) {
                self.take_received();
            }
        }
        self.take_received();
    }

    /// Moves received events into batches, stamped with our identity.
    fn take_received(&mut self) {
        if self.received.is_empty() {
            return;
        }
        let reporter = self
            .r
            .store
            .current()
            .map(|c| c.spiffe_id().to_string())
            .unwrap_or_default();
        let mut received = std::mem::take(&mut self.received);
        for mut event in received.drain(..) {
            event.reporter.clone_from(&reporter);
            let len = event.encoded_len();
            let len = 1 + prost::length_delimiter_len(len) + len;
            if !self.batch.is_empty() && self.batch_bytes + len > self.r.config.batch_max_bytes {
                self.cut();
            }
            if self.batch.is_empty() {
                self.due = Some(Instant::now() + self.r.config.batch_wait);
            }
            self.batch.push(event);
            self.batch_bytes += len;
            if self.batch.len() >= self.r.config.batch_events.max(1) {
                self.cut();
            }
        }
        // Keep the allocation for the next `recv_many`.
        self.received = received;
    }

    /// Turns the current batch (or, with none, a loss to report) into a
    /// numbered batch and keeps it.
    fn cut(&mut self) {
        self.due = None;
        let dropped = self.owed + self.stats.dropped_unreported.swap(0, Ordering::Relaxed);
        if self.batch.is_empty() && dropped == 0 {
            return;
        }
        let events = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let seq = self.r.next_seq;
        // Recorded before the batch can reach the collector, so a restart
        // never reuses a sequence the collector may have stored.
        self.save_positions(seq);
        let batch = pb::AuditBatch {
            agent_instance_id: self.r.instance_id.clone(),
            sequence: seq,
            events,
            dropped_since_last: dropped,
        };
        match self.r.backlog.store(batch, self.connected()) {
            Stored::Memory | Stored::Spool => {
                self.r.next_seq += 1;
                self.owed = 0;
                self.losing = false;
            }
            Stored::Dropped { events } => {
                self.owed = dropped + events as u64;
                self.stats
                    .events_dropped
                    .fetch_add(events as u64, Ordering::Relaxed);
                if !self.losing {
                    tracing::warn!(
                        events,
                        backlog = self.r.backlog.len(),
                        "audit: memory and spool are full; dropping events (counted, reported to the collector later)"
                    );
                    self.losing = true;
                }
                // Report the loss even if no further event comes.
                self.due = Some(Instant::now() + self.r.config.batch_wait);
            }
        }
        self.update_spool_bytes();
    }

    fn save_positions(&mut self, last_sequence: u64) {
        let acked = self.r.acked;
        if let Some(spool) = self.r.backlog.spool_mut()
            && let Err(e) = spool.set_positions(last_sequence, acked)
        {
            tracing::warn!(error = %e, "audit spool: cannot record the sequence");
        }
    }

    fn update_spool_bytes(&self) {
        self.stats
            .spool_bytes
            .store(self.r.backlog.spool_bytes(), Ordering::Relaxed);
    }

    /// Sends what is not sent on this stream yet, up to the window.
    fn pump(&mut self) {
        let window = self.r.config.in_flight_batches.max(1) as u64;
        while let Link::Up(session) = &self.link {
            if self.sent_through.saturating_sub(self.r.acked) >= window {
                return;
            }
            let Some(next) = self.r.backlog.next_after(self.sent_through) else {
                return;
            };
            let batch = match next {
                Next::Batch(batch) => batch,
                Next::Lost(lost) => {
                    tracing::warn!(seq = lost.seq, events = lost.events, error = %lost.error,
                        "audit spool: a batch cannot be read back; its events are lost");
                    self.stats
                        .events_dropped
                        .fetch_add(lost.events as u64, Ordering::Relaxed);
                    self.owed += lost.events as u64;
                    self.update_spool_bytes();
                    continue;
                }
            };
            let seq = batch.sequence;
            match session.batches.try_send(batch) {
                Ok(()) => {
                    self.sent_through = seq;
                    self.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                }
                // The stream takes it on the next wake.
                Err(mpsc::error::TrySendError::Full(_)) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.link_failed("the stream's sender closed");
                    return;
                }
            }
        }
    }

    fn acked(&mut self, seq: u64) {
        if seq > self.sent_through {
            tracing::warn!(
                seq,
                sent_through = self.sent_through,
                "audit: the collector acknowledged a batch not sent on this stream; ignored"
            );
            return;
        }
        if seq <= self.r.acked {
            return;
        }
        let released = self.r.backlog.release_through(seq);
        self.r.acked = seq;
        self.stats
            .batches_acked
            .fetch_add(released as u64, Ordering::Relaxed);
        self.backoff.reset();
        self.save_positions(self.r.next_seq - 1);
        self.update_spool_bytes();
    }

    fn start_connecting(&mut self) {
        if self.r.store.current().is_none() {
            // No certificate yet: the collector would refuse us.
            self.link = Link::Down {
                retry_at: Instant::now() + CERT_POLL,
            };
            return;
        }
        let address = self.r.config.collector_address.clone();
        let timeout = self.r.config.connect_timeout;
        let window = self.r.config.in_flight_batches.max(1);
        let connector = OperatorConnector::new(
            address.as_str().into(),
            self.r.server_name.clone(),
            self.r.tls.clone(),
        );
        self.link = Link::Connecting(Box::pin(async move {
            tokio::time::timeout(timeout, async move {
                let endpoint = Endpoint::from_shared(format!("http://{address}"))
                    .map_err(|_| ReporterError::Address(address.clone()))?
                    .connect_timeout(timeout)
                    // Notice a dead collector (or path) within a minute.
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .keep_alive_while_idle(true);
                let channel = endpoint
                    .connect_with_connector(connector)
                    .await
                    .map_err(ReporterError::Connect)?;
                let (batches, rx) = mpsc::channel(window);
                let acks = AuditClient::new(channel)
                    .report(ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                Ok(Box::new(Session { batches, acks }))
            })
            .await
            .map_err(|_| ReporterError::Timeout(timeout))?
        }));
    }

    fn link_failed(&mut self, why: &str) {
        let was_up = self.connected();
        self.stats.connected.store(false, Ordering::Relaxed);
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        let delay = self.backoff.next_delay();
        tracing::warn!(collector = %self.r.config.collector_address, error = why,
            retry_in = ?delay, unacknowledged = self.r.backlog.len(),
            "audit stream to the collector {}; events are kept and sent after reconnecting",
            if was_up { "lost" } else { "not established" });
        self.link = Link::Down {
            retry_at: Instant::now() + delay,
        };
        self.sent_through = self.r.acked;
        // While it is away, what waits in memory is safer on disk.
        self.r.backlog.persist_memory();
        self.update_spool_bytes();
    }

    /// After the loop: whatever is left goes to the spool (or is lost with
    /// the process when there is none).
    fn finish(&mut self) {
        self.link = Link::Down {
            retry_at: Instant::now(),
        };
        self.stats.connected.store(false, Ordering::Relaxed);
        self.drain_queue();
        self.cut();
        let held = self.r.backlog.len();
        if !self.r.backlog.persist_memory() {
            tracing::warn!(
                batches = held,
                "audit: un-acknowledged batches could not be spooled and are lost on exit"
            );
        }
        self.save_positions(self.r.next_seq - 1);
        self.update_spool_bytes();
        tracing::info!(
            instance = %self.r.instance_id,
            spooled = self.r.backlog.spool().map_or(0, Spool::len),
            "audit reporter stopped"
        );
    }
}

/// The next thing the connection has to say: reconnect time, connection
/// result, or an acknowledgement.
async fn link_event(link: &mut Link) -> Wake {
    match link {
        Link::Down { retry_at } => {
            tokio::time::sleep_until(*retry_at).await;
            Wake::Retry
        }
        Link::Connecting(connecting) => Wake::Connected(connecting.await),
        Link::Up(session) => Wake::Ack(session.acks.message().await),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
