//! The whole sidecar, assembled (what `palisade-agent run` starts): the
//! workload certificate ([`IdentityOrigin`]), the policy ([`PolicyOrigin`]),
//! the inbound proxy, the outbound proxies and their destination table, the
//! audit reporter (with `--collector`), the admin endpoint, and a graceful
//! drain on SIGTERM.
//!
//! [`Sidecar::start`] binds every listener (so a bad address fails at once)
//! and starts serving; [`Sidecar::run_until_signal`] runs until a proxy or
//! the certificate renewer stops, or until SIGTERM / Ctrl-C, then drains.
//! [`SidecarOptions`] mirrors the `run` flags one to one, and errors name
//! the flag at fault.

mod identity_origin;
mod policy_origin;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, AdminState, IdentityStatus};
use crate::audit::{AuditReporter, AuditSink, ReporterConfig, ReporterHandle};
use crate::discovery::{AdvertisedEndpoint, PolicyStatus};
use crate::identity::{CertStore, Renewer};
use crate::inbound::{
    AppProtocol, AppTarget, InboundConfig, InboundProxy, PortProtocol, SharedPolicy,
};
use crate::outbound::{
    DestinationEntry, DestinationTable, DiscoveredDestinations, OutboundConfig, OutboundProxy,
    OutboundTarget, UnmatchedPolicy,
};
use crate::ratelimit::{GlobalRateLimiter, GlobalRateLimiterConfig};
use crate::tls::{MeshTrust, SharedTrustBundle, TrustBundle};

pub use identity_origin::{
    IdentityFlagsError, IdentityOrigin, IdentityOriginError, OperatorEndpoint,
};
pub use policy_origin::{DiscoveryOptions, PolicyFileError, PolicyOrigin};

// The operator refuses a subscription advertising more endpoints.
use palisade_proto::discovery::limits::MAX_ENDPOINTS as MAX_ADVERTISED_ENDPOINTS;

/// The UID `palisade-agent init` exempts from capture by default.
const DEFAULT_PROXY_UID: u32 = 2137;

/// Explicit mode: accept on `listen`, forward to `target` (the app for the
/// inbound proxy, the destination for an outbound one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExplicitListener {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

/// Transparent mode (after `palisade-agent init`): the listener ports the
/// capture rules redirect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransparentPorts {
    /// Inbound on `0.0.0.0:inbound`, to each connection's original destination.
    pub inbound: u16,
    /// Outbound on `127.0.0.1:outbound`, to each connection's original destination.
    pub outbound: u16,
}

/// Streaming audit events to the collector (`--collector` and the
/// `--audit-*` flags); see [`crate::audit::reporter`].
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// `HOST:PORT` of the collector's `Audit` service.
    pub collector: String,
    /// The identity the collector must present; `None`: any workload of
    /// the trust domain.
    pub collector_id: Option<palisade_policy::identity::SpiffeId>,
    /// Where un-acknowledged batches are kept across outages and restarts.
    pub spool_dir: Option<std::path::PathBuf>,
    pub spool_max_bytes: u64,
    /// Events the in-memory queue holds; more are dropped (and counted).
    pub queue_events: usize,
    pub batch_events: usize,
    pub batch_wait: Duration,
    /// `--agent-instance-id` (see [`ReporterConfig::instance_id`]).
    pub instance_id: Option<String>,
}

impl AuditOptions {
    fn reporter_config(&self) -> ReporterConfig {
        let mut config = ReporterConfig::new(self.collector.clone());
        config.collector_id = self.collector_id.clone();
        config.spool_dir = self.spool_dir.clone();
        config.spool_max_bytes = self.spool_max_bytes;
        config.batch_events = self.batch_events;
        config.batch_wait = self.batch_wait;
        config.instance_id = self.instance_id.clone();
        config
    }
}

/// Everything [`Sidecar::start`] needs (the `palisade-agent run` flags).
#[derive(Clone, Debug)]
pub struct SidecarOptions {
    /// PEM trust anchors peers (and the operator) must chain to.
    pub trust_bundle: std::path::PathBuf,
    pub trust_domain: String,
    pub identity: IdentityOrigin,
    pub policy: PolicyOrigin,
    /// Explicit inbound; wins over `transparent`'s inbound listener.
    pub inbound: Option<ExplicitListener>,
    /// Transparent inbound and outbound listeners.
    pub transparent: Option<TransparentPorts>,
    /// Explicit outbound listeners, always meshed.
    pub outbound: Vec<ExplicitListener>,
    /// The meshed destinations and the identity each must present; they
    /// override what discovery says for the same destinations.
    pub mesh_destinations: Vec<DestinationEntry>,
    /// This pod's addresses (`--advertise-address`), advertised to the
    /// operator where the inbound listener accepts on every address.
    pub advertise_addresses: Vec<IpAddr>,
    /// Transparent mode: connections to destinations no entry covers.
    pub outbound_unmatched: UnmatchedPolicy,
    /// How long the outbound proxy waits for the app's first bytes to pick ALPN.
    pub outbound_detect_timeout: Duration,
    /// Longest the outbound proxy's TCP connect to a destination may take.
    pub outbound_connect_timeout: Duration,
    /// `/healthz`, `/readyz`, `/metrics`, `/app-health/*` for every client,
    /// `/config_dump` for loopback clients only; `None`: no admin endpoint.
    pub admin: Option<SocketAddr>,
    /// The Redis shared for `scope: global` rate limits; `None`: every
    /// global limit acts as its `failureMode` says.
    pub global_rate_limits: Option<GlobalRateLimiterConfig>,
    /// App ports proxied as opaque TCP when the policy declares nothing
    /// about them.
    pub opaque_ports: Vec<u16>,
    /// On HTTP ports, how long a connection without ALPN may stay silent.
    pub detect_timeout: Duration,
    /// `Upgrade` protocols passed on to the app (lower case).
    pub upgrade_protocols: Vec<String>,
    /// Inbound requests in flight across all connections.
    pub max_requests_in_flight: usize,
    /// App ports whose protocol is pinned instead of following the client's.
    pub app_protocols: Vec<(u16, AppProtocol)>,
    /// On shutdown, how long in-flight inbound requests may take to finish.
    pub drain_timeout: Duration,
    /// App health endpoints the kubelet reaches through `/app-health/<name>`.
    pub app_probes: Vec<crate::admin::app_probe::AppProbe>,
    /// Audit events to the collector; `None`: log lines only.
    pub audit: Option<AuditOptions>,
}

/// A started sidecar: every listener bound and serving.
pub struct Sidecar {
    admin: Arc<AdminState>,
    proxies: JoinSet<()>,
    shutdown: watch::Sender<bool>,
    /// `None` with a certificate from files.
    renewer: Option<Renewer>,
    /// The audit reporter, with `--collector`.
    audit: Option<ReporterHandle>,
}

impl Sidecar {
    /// Loads the trust bundle, the certificate and the policy, binds the
    /// proxies and the admin endpoint, and starts serving. Also raises the
    /// process's open-file limit (thousands of connections need thousands
    /// of descriptors). Certificate renewal runs in
    /// [`run_until_signal`](Self::run_until_signal).
    pub async fn start(options: SidecarOptions) -> anyhow::Result<Self> {
        match crate::limits::raise_nofile_limit() {
            Ok(n) => tracing::debug!(nofile = n, "open-file limit raised to the hard limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
        let inbound_listener = match (options.inbound, options.transparent) {
            (Some(explicit), _) => Some((explicit.listen, AppTarget::Fixed(explicit.target))),
            (None, Some(ports)) => Some((
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports.inbound)),
                AppTarget::OriginalDst,
            )),
            (None, None) => None,
        };
        if options.transparent.is_some() {
            warn_unless_proxy_uid();
        }
        let bundle = TrustBundle::from_pem_file(&options.trust_bundle)?;
        let trust = MeshTrust::new(SharedTrustBundle::new(bundle), &options.trust_domain)?;

        let policy = SharedPolicy::default();
        let policy_status = Arc::new(PolicyStatus::new());
        match &options.policy {
            PolicyOrigin::File(path) => {
                let loaded = policy_origin::load_policy_file(path)?;
                tracing::info!(version = loaded.engine.version(), "policy loaded");
                policy_status.set_file(loaded.engine.version());
                policy.replace(loaded);
            }
            PolicyOrigin::None if inbound_listener.is_some() => {
                tracing::warn!("no --policy-file and no --operator: every request is denied")
            }
            PolicyOrigin::None | PolicyOrigin::Discovery(_) => {}
        }
        let store = Arc::new(CertStore::new());
        let renewer = options
            .identity
            .provision(&trust, &options.trust_domain, &store)?;
        // With an operator, discovery also says whom outbound destinations
        // must be (the last table stays in force while it is away).
        let discovered =
            matches!(options.policy, PolicyOrigin::Discovery(_)).then(DiscoveredDestinations::new);

        let status = Arc::new(IdentityStatus::new(store.clone()));
        if let Some(renewer) = &renewer {
            tokio::spawn(status.clone().track(renewer.subscribe()));
        }
        let policy_required = !matches!(options.policy, PolicyOrigin::None);
        let mut admin_state = AdminState::new(status)
            .with_app_probes(options.app_probes.clone())
            .with_policy(
                policy.clone(),
                inbound_listener.is_some() && policy_required,
            )
            .with_metrics(policy_status.clone());

        // The reporter starts before the proxies, so no decision is missed.
        let (audit_sink, audit) = match &options.audit {
            Some(audit) => {
                let (sink, queue) = crate::audit::channel(audit.queue_events);
                let reporter =
                    AuditReporter::new(audit.reporter_config(), queue, &trust, store.clone())
                        .with_context(|| {
                            format!(
                                "audit reporter (--collector {}, --audit-spool-dir)",
                                audit.collector
                            )
                        })?;
                admin_state = admin_state.with_metrics(Arc::new(reporter.metrics().clone()));
                tracing::info!(
                    collector = %audit.collector,
                    instance = reporter.instance_id(),
                    spool = ?audit.spool_dir,
                    "audit events streamed to the collector"
                );
                (sink, Some(reporter.spawn()))
            }
            None => (AuditSink::disabled(), None),
        };

        let mut inbound_proxies = Vec::new();
        // The bound inbound address and the app target, for discovery.
        let mut inbound_bound = None;
        if let Some((listen, app)) = inbound_listener {
            let mut inbound = InboundConfig::new(app, trust.clone(), store.clone(), policy.clone());
            inbound.audit = audit_sink.clone();
            if let Some(config) = &options.global_rate_limits {
                let limiter = GlobalRateLimiter::new(config)
                    .with_context(|| format!("--ratelimit-redis {:?}", config.url))?;
                admin_state = admin_state.with_metrics(limiter.metrics().clone());
                inbound.global_limits = Some(Arc::new(limiter));
            }
            for port in &options.opaque_ports {
                inbound.port_protocols.insert(*port, PortProtocol::Opaque);
            }
            inbound
                .app_protocols
                .extend(options.app_protocols.iter().copied());
            inbound.detect_timeout = options.detect_timeout;
            inbound.upgrade_protocols = options.upgrade_protocols.clone();
            inbound.limits.max_requests_in_flight = options.max_requests_in_flight;
            inbound.drain_timeout = options.drain_timeout;
            let proxy = InboundProxy::bind(listen, inbound)
                .await
                .with_context(|| format!("cannot listen on {listen} (--inbound)"))?;
            let bound = proxy.local_addr()?;
            tracing::info!(listen = %bound, app = ?app, "inbound proxy listening");
            inbound_bound = Some((bound, app));
            admin_state = admin_state.with_metrics(Arc::new(proxy.stats()));
            inbound_proxies.push(proxy);
        }

        // Outbound: one listener per explicit one, plus the transparent one;
        // all share the destination table and the metrics.
        let mut table = DestinationTable::new();
        for entry in options.mesh_destinations {
            table.insert(entry).context("--mesh-destination")?;
        }

        // Until the first version arrives from the operator every inbound
        // request is denied. Started once the inbound listener is bound, so
        // the advertised port is the real one.
        if let (PolicyOrigin::Discovery(discovery), Some(discovered)) =
            (&options.policy, &discovered)
        {
            let ports = match inbound_bound {
                Some((_, AppTarget::Fixed(a))) => vec![a.port()],
                // Transparent (any port may be the app's) or outbound only:
                // every policy port applies.
                _ => Vec::new(),
            };
            let endpoints = advertised_endpoints(inbound_bound, &options.advertise_addresses);
            let watcher = discovery
                .watcher(ports, endpoints, &trust, &store, &policy)
                .context("policy stream configuration")?
                .with_status(policy_status.clone())
                .with_destinations(discovered.clone());
            let operator = &discovery.operator.address;
            tracing::info!(%operator, "policy and mesh destinations from the operator's discovery stream");
            tokio::spawn(watcher.run());
        }

        let mut outbound = OutboundConfig::new(trust, store, table);
        if let Some(discovered) = discovered {
            outbound = outbound.with_discovered(discovered);
        }
        admin_state = admin_state
            .with_metrics(outbound.metrics.clone())
            .with_destinations(outbound.destination_sources());
        outbound.unmatched = options.outbound_unmatched;
        outbound.detect_timeout = options.outbound_detect_timeout;
        outbound.connect_timeout = options.outbound_connect_timeout;
        let mut outbound_listeners: Vec<(SocketAddr, OutboundTarget)> = options
            .outbound
            .iter()
            .map(|explicit| (explicit.listen, OutboundTarget::Fixed(explicit.target)))
            .collect();
        if let Some(ports) = options.transparent {
            outbound_listeners.push((
                SocketAddr::from((Ipv4Addr::LOCALHOST, ports.outbound)),
                OutboundTarget::OriginalDst,
            ));
        }
        let outbound_proxies = bind_outbound(outbound_listeners, &outbound).await?;

        // Everything is bound: serve the admin endpoint, then the proxies.
        let admin_state = Arc::new(admin_state.with_runtime(serde_json::json!({
            "inbound": options.inbound.map(|i| format!("{}={}", i.listen, i.target)),
            "transparent": options.transparent.is_some(),
            "outbound": options.outbound.iter().map(|o| format!("{}={}", o.listen, o.target)).collect::<Vec<_>>(),
            "policy_source": options.policy.kind().as_str(),
            "global_rate_limits": options.global_rate_limits.is_some(),
            "opaque_ports": options.opaque_ports,
            "audit_collector": options.audit.as_ref().map(|a| a.collector.clone()),
        })));
        if let Some(addr) = options.admin {
            let listener = admin::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--admin)"))?;
            let bound = listener.local_addr().context("admin listener address")?;
            tracing::info!(
                addr = %bound,
                "admin endpoint listening (probes and /metrics for all; /config_dump on loopback only)"
            );
            tokio::spawn(admin::serve_state(listener, admin_state.clone()));
        }
        let (proxies, shutdown) = serve(inbound_proxies, outbound_proxies);
        Ok(Self {
            admin: admin_state,
            proxies,
            shutdown,
            renewer,
            audit,
        })
    }

    /// Renews the certificate and serves until a proxy or the renewer stops
    /// (then returns at once), or until SIGTERM or Ctrl-C: then not ready any
    /// more, no new connections, and in-flight inbound requests finish
    /// within the drain timeout.
    pub async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let renewer = self.renewer.take();
        let renew = async move {
            match renewer {
                Some(r) => r.run().await,
                None => std::future::pending().await,
            }
        };
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        let stopped = tokio::select! {
            Some(done) = self.proxies.join_next() => Some(done.context("a proxy stopped")),
            () = renew => Some(Ok(())),
            signal = tokio::signal::ctrl_c() => match signal.context("cannot listen for Ctrl-C") {
                Ok(()) => {
                    tracing::info!("interrupted; draining");
                    None
                }
                Err(e) => Some(Err(e)),
            },
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM; draining");
                None
            }
        };
        if stopped.is_none() {
            // Graceful shutdown: not ready any more, no new connections,
            // in-flight requests finish within the drain timeout (each
            // inbound proxy enforces it).
            self.admin.start_draining();
            let _ = self.shutdown.send(true);
            while self.proxies.join_next().await.is_some() {}
            tracing::info!("drained; exiting");
        }
        // Last, so the drained requests' events are in: flushed to the
        // collector (bounded) or spooled.
        if let Some(audit) = self.audit.take() {
            audit.shutdown().await;
        }
        stopped.unwrap_or(Ok(()))
    }
}

/// Binds the outbound listeners, all sharing `config`, and logs each.
async fn bind_outbound(
    listeners: Vec<(SocketAddr, OutboundTarget)>,
    config: &OutboundConfig,
) -> anyhow::Result<Vec<OutboundProxy>> {
    let mut proxies = Vec::new();
    for (listen, target) in listeners {
        let proxy = OutboundProxy::bind(listen, target, config.clone())
            .await
            .with_context(|| format!("outbound listener {listen}"))?;
        let bound = proxy.local_addr()?;
        match proxy.fixed_destination() {
            Some(dest) => {
                let expected = config.expected_peer(dest).map(|p| p.to_string());
                let expected = expected.as_deref().unwrap_or("(from discovery, else any)");
                tracing::info!(listen = %bound, %dest, expected, "outbound proxy listening")
            }
            None => tracing::info!(
                listen = %bound,
                destinations = config.destinations.entries().len(),
                discovery = config.discovered.is_some(),
                unmatched = ?config.unmatched,
                "outbound proxy listening (transparent)"
            ),
        }
        proxies.push(proxy);
    }
    Ok(proxies)
}

/// Where this agent terminates mTLS, for the operator: an explicit inbound
/// listener on one address is that address and port; on every address
/// (`0.0.0.0`, `::`), each `--advertise-address` with its port; transparent
/// capture, each `--advertise-address` with every port. Empty (and logged
/// why) when there is nothing to advertise.
fn advertised_endpoints(
    inbound: Option<(SocketAddr, AppTarget)>,
    advertise: &[IpAddr],
) -> Vec<AdvertisedEndpoint> {
    let every = |port: Option<u16>| -> Vec<AdvertisedEndpoint> {
        let mut v: Vec<_> = advertise
            .iter()
            .map(|ip| AdvertisedEndpoint {
                ip: ip.to_canonical(),
                port,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let mut endpoints = match inbound {
        None => {
            tracing::info!("no inbound listener: no mesh endpoint advertised to the operator");
            return Vec::new();
        }
        Some((_, AppTarget::OriginalDst)) => every(None),
        Some((listen, _)) if listen.ip().is_unspecified() => every(Some(listen.port())),
        Some((listen, _)) => vec![AdvertisedEndpoint {
            ip: listen.ip().to_canonical(),
            port: Some(listen.port()),
        }],
    };
    if endpoints.len() > MAX_ADVERTISED_ENDPOINTS {
        // The operator refuses a subscription with more.
        tracing::warn!(
            count = endpoints.len(),
            max = MAX_ADVERTISED_ENDPOINTS,
            "too many --advertise-address values; advertising the first ones only"
        );
        endpoints.truncate(MAX_ADVERTISED_ENDPOINTS);
    }
    if endpoints.is_empty() {
        tracing::info!(
            "the inbound listener accepts on every address and no --advertise-address \
             (or POD_IP) names this pod's: no mesh endpoint advertised to the operator"
        );
    } else {
        let list: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
        tracing::info!(endpoints = ?list, "mesh endpoints advertised to the operator");
    }
    endpoints
}

/// Serves every proxy as a task; sending `true` on the returned channel
/// starts the drain.
fn serve(
    inbound_proxies: Vec<InboundProxy>,
    outbound_proxies: Vec<OutboundProxy>,
) -> (JoinSet<()>, watch::Sender<bool>) {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut proxies = JoinSet::new();
    for proxy in inbound_proxies {
        let mut rx = shutdown_rx.clone();
        proxies.spawn(proxy.run_until(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }));
    }
    for proxy in outbound_proxies {
        let mut rx = shutdown_rx.clone();
        // Outbound tunnels carry no request boundary: stop accepting, and let
        // the process exit end them once the inbound side has drained.
        proxies.spawn(async move {
            tokio::select! {
                () = proxy.run() => {}
                _ = rx.wait_for(|stop| *stop) => {}
            }
        });
    }
    (proxies, shutdown)
}

/// Transparent mode: `init` exempts one UID ([`DEFAULT_PROXY_UID`] unless
/// `--proxy-uid` said otherwise) from capture; under any other, every
/// connection the agent makes is redirected back to it.
fn warn_unless_proxy_uid() {
    use std::os::unix::fs::MetadataExt;
    // `/proc/self` belongs to our effective UID.
    if let Ok(meta) = std::fs::metadata("/proc/self")
        && meta.uid() != DEFAULT_PROXY_UID
    {
        tracing::warn!(
            uid = meta.uid(),
            "--transparent: running as a UID other than 2137; unless `init --proxy-uid` \
             names this UID, the agent's own connections are captured and loop"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, port: Option<u16>) -> AdvertisedEndpoint {
        AdvertisedEndpoint {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn advertised_endpoints_follow_the_inbound_listener() {
        let app = AppTarget::Fixed("127.0.0.1:8080".parse().unwrap());
        let pod: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];

        // A listener on one address: that address, whatever was advertised.
        let one = Some(("10.1.1.1:8443".parse().unwrap(), app));
        assert_eq!(
            advertised_endpoints(one, &pod),
            vec![ep("10.1.1.1", Some(8443))]
        );
        // On every address: each advertise address with the listen port.
        let any = Some(("0.0.0.0:8443".parse().unwrap(), app));
        assert_eq!(
            advertised_endpoints(any, &pod),
            vec![ep("10.0.0.5", Some(8443)), ep("fd00::5", Some(8443))]
        );
        let any6 = Some(("[::]:8443".parse().unwrap(), app));
        assert_eq!(advertised_endpoints(any6, &pod).len(), 2);
        // ... and nothing without one.
        assert!(advertised_endpoints(any, &[]).is_empty());
        // Transparent: every port of each advertise address.
        let transparent = Some(("0.0.0.0:15006".parse().unwrap(), AppTarget::OriginalDst));
        assert_eq!(
            advertised_endpoints(transparent, &pod),
            vec![ep("10.0.0.5", None), ep("fd00::5", None)]
        );
        assert!(advertised_endpoints(transparent, &[]).is_empty());
        // No inbound listener: nothing.
        assert!(advertised_endpoints(None, &pod).is_empty());
        // Repeated and IPv4-mapped addresses collapse.
        let dup: Vec<IpAddr> = vec![
            "10.0.0.5".parse().unwrap(),
            "::ffff:10.0.0.5".parse().unwrap(),
        ];
        assert_eq!(
            advertised_endpoints(transparent, &dup),
            vec![ep("10.0.0.5", None)]
        );
    }
}
