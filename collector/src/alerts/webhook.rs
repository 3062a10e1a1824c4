//! Posting alerts to a webhook: each alert as a JSON object (the serialized
//! [`Alert`]) in its own `POST`, over plain HTTP.
//!
//! Ingestion never waits on the webhook: [`WebhookNotifier::notify`] puts the
//! alert on a bounded queue and returns; one task delivers them in order,
//! retrying with exponential backoff. An alert that finds the queue full is
//! dropped and counted; one that fails every attempt is counted as failed.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Alert;

/// A webhook's reply body is read (so the connection can be reused) up to
/// this much and discarded.
const MAX_REPLY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Alerts waiting for delivery; beyond this they are dropped.
    pub queue_capacity: usize,
    /// Tries per alert, the first included.
    pub attempts: u32,
    /// Wait before the second try; doubled for each further one.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Per try: connecting, sending and reading the reply.
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            attempts: 3,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL {url:?}: {problem}")]
    Url { url: String, problem: String },
    #[error("webhook {field}: {problem}")]
    Config {
        field: &'static str,
        problem: &'static str,
    },
    #[error("the webhook notifier must be created inside a Tokio runtime")]
    NoRuntime,
}

/// Delivery counters.
#[derive(Debug, Default)]
pub struct WebhookMetrics {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

impl WebhookMetrics {
    /// Alerts the webhook accepted (a 2xx reply).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Alerts given up on after every attempt failed, or refused outright.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Alerts dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Prometheus text (format 0.0.4).
    pub fn render(&self, out: &mut String) {
        for (name, help, value) in [
            (
                "palisade_collector_alert_webhook_delivered_total",
                "Alerts the webhook accepted.",
                self.delivered(),
            ),
            (
                "palisade_collector_alert_webhook_failed_total",
                "Alerts not delivered after every attempt failed.",
                self.failed(),
            ),
            (
                "palisade_collector_alert_webhook_dropped_total",
                "Alerts dropped because the webhook queue was full.",
                self.dropped(),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

pub struct WebhookNotifier {
    queue: mpsc::Sender<Alert>,
    metrics: Arc<WebhookMetrics>,
    task: JoinHandle<()>,
}

impl WebhookNotifier {
    /// Starts the delivery task for `url` (`http://host[:port]/path`). Must be
    /// called inside a Tokio runtime.
    pub fn new(url: &str, config: WebhookConfig) -> Result<Self, WebhookError> {
        let uri = parse_url(url)?;
        if config.queue_capacity == 0 {
            return Err(WebhookError::Config {
                field: "queue_capacity",
                problem: "must be > 0",
            });
        }
        if config.attempts == 0 {
            return Err(WebhookError::Config {
                field: "attempts",
                problem: "must be > 0",
            });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| WebhookError::NoRuntime)?;
        let (queue, alerts) = mpsc::channel(config.queue_capacity);
        let metrics = Arc::new(WebhookMetrics::default());
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let task = runtime.spawn(deliver_all(
            alerts,
            Delivery {
                client,
                uri,
                config,
                metrics: Arc::clone(&metrics),
            },
        ));
        Ok(Self {
            queue,
            metrics,
            task,
        })
    }

    /// Queues `alert` for delivery without waiting. `false` when the queue
    /// was full and the alert was dropped (and counted).
    pub fn notify(&self, alert: &Alert) -> bool {
        match self.queue.try_send(alert.clone()) {
            Ok(()) => true,
            Err(_) => {
                self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(rule = %alert.rule, "alert webhook queue full; alert not posted");
                false
            }
        }
    }

    pub fn metrics(&self) -> Arc<WebhookMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Stops taking alerts and waits until every queued one was delivered
    /// or given up on.
    pub async fn shutdown(self) {
        drop(self.queue);
        if let Err(error) = self.task.await {
            tracing::warn!(%error, "alert webhook task ended abnormally");
        }
    }
}

fn parse_url(url: &str) -> Result<Uri, WebhookError> {
    let bad = |problem: &str| WebhookError::Url {
        url: url.to_owned(),
        problem: problem.to_owned(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported (the webhook client speaks plain HTTP)",
            ));
        }
        _ => return Err(bad("must start with http://")),
    }
    if uri.authority().is_none() {
        return Err(bad("has no host"));
    }
    Ok(uri)
}

struct Delivery {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    config: WebhookConfig,
    metrics: Arc<WebhookMetrics>,
}

async fn deliver_all(mut alerts: mpsc::Receiver<Alert>, delivery: Delivery) {
    // One at a time: alerts arrive in the order they were raised, and a slow
    // webhook backs up into the bounded queue instead of into connections.
    while let Some(alert) = alerts.recv().await {
        delivery.deliver(&alert).await;
    }
}

enum AttemptError {
    Retryable(String),
    Permanent(String),
}

impl Delivery {
    async fn deliver(&self, alert: &Alert) {
        let body = match serde_json::to_vec(alert) {
            Ok(body) => Bytes::from(body),
            Err(error) => {
                self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, rule = %alert.rule, "alert could not be encoded for the webhook");
                return;
            }
        };
        let mut backoff = self.config.initial_backoff;
        for attempt in 1..=self.config.attempts {
            let problem = match self.attempt(body.clone()).await {
                Ok(()) => {
                    self.metrics.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(rule = %alert.rule, attempt, "alert posted to webhook");
                    return;
                }
                Err(AttemptError::Retryable(problem)) if attempt < self.config.attempts => problem,
                Err(AttemptError::Retryable(problem) | AttemptError::Permanent(problem)) => {
                    self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(rule = %alert.rule, attempt, %problem, "alert webhook delivery failed");
                    return;
                }
            };
            tracing::debug!(rule = %alert.rule, attempt, %problem, ?backoff, "alert webhook attempt failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(self.config.max_backoff);
        }
    }

    async fn attempt(&self, body: Bytes) -> Result<(), AttemptError> {
        let request = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("palisade-collector/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| AttemptError::Permanent(format!("building the request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| AttemptError::Retryable(format!("sending: {e}")))?;
            let status = response.status();
            // Read (and drop) the reply so the connection can be reused; a
            // reply too big to read only costs the connection.
            let _ = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await;
            Ok::<_, AttemptError>(status)
        };
        let status = tokio::time::timeout(self.config.timeout, exchange)
            .await
            .map_err(|_| AttemptError::Retryable("timed out".to_owned()))??;
        if status.is_success() {
            Ok(())
        } else if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            Err(AttemptError::Retryable(format!(
                "webhook answered {status}"
            )))
        } else {
            // Another 4xx will not change on a retry.
            Err(AttemptError::Permanent(format!(
                "webhook answered {status}"
            )))
        }
    }
}
