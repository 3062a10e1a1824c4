//! Keeping a certificate: fetch one, renew at 70 % of its lifetime, retry
//! failures with jittered exponential backoff while the current certificate
//! keeps serving.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade_policy::identity::SpiffeId;
use tokio::sync::broadcast;

use super::backoff::Backoff;
use super::client::{CertifyError, IdentityClient};
use super::status::unix_now;
use super::store::{CertStore, IssuedCert};

#[derive(Clone, Debug)]
pub struct RenewalConfig {
    /// Fraction of the lifetime after which to renew.
    pub renew_at: f64,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Floor on the wait after a success, so a very short-lived certificate
    /// cannot turn the loop into a busy loop against the operator.
    pub min_delay: Duration,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            renew_at: 0.7,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            min_delay: Duration::from_secs(1),
        }
    }
}

/// What the loop did, for logs, tests and (later) metrics.
#[derive(Clone, Debug)]
pub enum RenewalEvent {
    Issued {
        spiffe_id: SpiffeId,
        serial_hex: String,
        not_after: i64,
        next_renewal_in: Duration,
    },
    Failed {
        /// 1 for the first failure since the last success.
        attempt: u32,
        error: String,
        retry_in: Duration,
        /// Of the certificate still in use; `None` before the first one.
        seconds_to_expiry: Option<i64>,
    },
}

/// How long to wait before renewing a certificate valid from `not_before` to
/// `not_after` (Unix seconds), at `now`: until `fraction` of the lifetime has
/// passed, or zero when that moment is already behind us.
pub fn renewal_delay(not_before: i64, not_after: i64, now: SystemTime, fraction: f64) -> Duration {
    let lifetime = (not_after - not_before).max(0) as f64;
    let target = not_before as f64 + lifetime * fraction.clamp(0.0, 1.0);
    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(_) => 0.0,
    };
    Duration::try_from_secs_f64(target - now).unwrap_or(Duration::ZERO)
}

/// The renewal delay for a certificate just received. The operator
/// back-dates not-before for clock skew; that slack is not lifetime the
/// agent had, so the lifetime counts from receipt.
pub fn delay_after_receipt(
    not_before: i64,
    not_after: i64,
    received: SystemTime,
    fraction: f64,
) -> Duration {
    let received_secs = received
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    renewal_delay(not_before.max(received_secs), not_after, received, fraction)
}

pub struct Renewer {
    client: IdentityClient,
    store: Arc<CertStore>,
    config: RenewalConfig,
    events: broadcast::Sender<RenewalEvent>,
}

impl Renewer {
    pub fn new(client: IdentityClient, store: Arc<CertStore>, config: RenewalConfig) -> Self {
        let (events, _) = broadcast::channel(64);
        Self {
            client,
            store,
            config,
            events,
        }
    }

    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RenewalEvent> {
        self.events.subscribe()
    }

    /// One request; on success the operator's bundle (if any) and then the
    /// certificate are swapped in, so the new leaf's root is already trusted.
    pub async fn renew_once(&self) -> Result<Arc<IssuedCert>, CertifyError> {
        let certified = self.client.certify().await?;
        if let Some(bundle) = certified.trust_bundle {
            self.client.trust().bundle().replace(bundle);
        }
        self.store.install(certified.cert);
        self.store
            .current()
            .ok_or_else(|| CertifyError::Response("certificate vanished from the store".into()))
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            let wait = match self.renew_once().await {
                Ok(cert) => {
                    backoff.reset();
                    let wait = delay_after_receipt(
                        cert.not_before(),
                        cert.not_after(),
                        SystemTime::now(),
                        self.config.renew_at,
                    )
                    .max(self.config.min_delay);
                    tracing::info!(
                        spiffe_id = %cert.spiffe_id(),
                        serial = cert.serial_hex(),
                        not_after = cert.not_after(),
                        expires_in_s = cert.not_after() - unix_now(),
                        next_renewal_in_s = wait.as_secs_f64(),
                        "workload certificate installed"
                    );
                    let _ = self.events.send(RenewalEvent::Issued {
                        spiffe_id: cert.spiffe_id().clone(),
                        serial_hex: cert.serial_hex().to_owned(),
                        not_after: cert.not_after(),
                        next_renewal_in: wait,
                    });
                    wait
                }
                Err(error) => {
                    let retry_in = backoff.next_delay();
                    let left = self.store.expiry().seconds_to_expiry();
                    match left {
                        Some(s) if s > 0 => tracing::warn!(
                            %error, attempt = backoff.attempts(), retry_in_s = retry_in.as_secs_f64(),
                            seconds_to_expiry = s, "certificate renewal failed; keeping the current certificate"
                        ),
                        Some(s) => tracing::error!(
                            %error, attempt = backoff.attempts(), retry_in_s = retry_in.as_secs_f64(),
                            expired_s_ago = -s, "certificate renewal failed and the current certificate has expired"
                        ),
                        None => tracing::warn!(
                            %error, attempt = backoff.attempts(), retry_in_s = retry_in.as_secs_f64(),
                            "no workload certificate yet; not ready"
                        ),
                    }
                    let _ = self.events.send(RenewalEvent::Failed {
                        attempt: backoff.attempts(),
                        error: error.to_string(),
                        retry_in,
                        seconds_to_expiry: left,
                    });
                    retry_in
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs_f64(secs)
    }

    #[test]
    fn renews_at_seventy_percent() {
        // 24 h certificate issued at t=1000: renew at 1000 + 16.8 h.
        let d = renewal_delay(1000, 1000 + 86_400, at(1000.0), 0.7);
        assert_eq!(d, Duration::from_secs(60_480));
        let d = renewal_delay(1000, 1010, at(1002.0), 0.7);
        assert!((d.as_secs_f64() - 5.0).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn back_dated_not_before_does_not_count_as_lifetime() {
        // A 30 s certificate back-dated by 5 min, received at t=1000: the
        // renewal loop counts from receipt, so it renews 21 s later.
        let d = delay_after_receipt(1000 - 300, 1030, at(1000.0), 0.7);
        assert_eq!(d, Duration::from_secs(21));
        // Without back-dating it is the plain 70 %.
        assert_eq!(
            delay_after_receipt(1000, 1100, at(1000.0), 0.7),
            Duration::from_secs(70)
        );
    }

    #[test]
    fn overdue_renewal_is_immediate() {
        assert_eq!(renewal_delay(1000, 1010, at(1009.0), 0.7), Duration::ZERO);
        assert_eq!(renewal_delay(1000, 1010, at(2000.0), 0.7), Duration::ZERO);
        // Nonsense validity does not panic.
        assert_eq!(
            renewal_delay(1010, 1000, at(900.0), 0.7),
            Duration::from_secs(110)
        );
    }
}
