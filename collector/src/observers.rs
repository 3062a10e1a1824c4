//! What watches records as they are stored: alert rules and the OTLP log
//! export. Neither may slow ingestion: alerts are counted in memory, and
//! deliveries (webhook, OTLP) go through bounded queues of their own.

use parking_lot::Mutex;

use crate::alerts::{AlertEngine, WebhookNotifier};
use crate::event::StoredEvent;
use crate::otlp::OtlpLogExporter;

#[derive(Default)]
pub struct Observers {
    alerts: Option<Mutex<AlertEngine>>,
    webhook: Option<WebhookNotifier>,
    otlp: Option<OtlpLogExporter>,
}

impl Observers {
    pub fn with_alerts(mut self, engine: AlertEngine) -> Self {
        self.alerts = Some(Mutex::new(engine));
        self
    }

    pub fn with_webhook(mut self, webhook: WebhookNotifier) -> Self {
        self.webhook = Some(webhook);
        self
    }

    pub fn with_otlp(mut self, otlp: OtlpLogExporter) -> Self {
        self.otlp = Some(otlp);
        self
    }

    /// Looks at newly stored records: every one is exported; agents'
    /// records (`from_agent`) also go through the alert rules. Returns the
    /// alerts raised, as records for the collector to store.
    pub fn observe(&self, events: &[StoredEvent], from_agent: bool) -> Vec<StoredEvent> {
        if let Some(otlp) = &self.otlp {
            otlp.export(events);
        }
        let (Some(alerts), true) = (&self.alerts, from_agent) else {
            return Vec::new();
        };
        let raised = alerts.lock().observe(events, crate::ingest::now_us());
        raised
            .iter()
            .map(|alert| {
                tracing::warn!(rule = %alert.rule, key = %alert.key, count = alert.count,
                    threshold = alert.threshold, "alert raised");
                if let Some(webhook) = &self.webhook
                    && !webhook.notify(alert)
                {
                    tracing::warn!(rule = %alert.rule, "alert webhook queue full: not delivered");
                }
                alert.to_stored_event()
            })
            .collect()
    }

    pub fn render_metrics(&self, out: &mut String) {
        if let Some(alerts) = &self.alerts {
            alerts.lock().metrics().render(out);
        }
        if let Some(webhook) = &self.webhook {
            webhook.metrics().render(out);
        }
        if let Some(otlp) = &self.otlp {
            otlp.metrics().render(out);
        }
    }
}
