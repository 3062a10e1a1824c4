//! The decision engine: a `WorkloadPolicy` compiled once into lookup
//! structures, then asked about every request.
//!
//! Evaluation order (DESIGN §4): client address and IP filter → mTLS
//! requirement → path normalization → authentication result → deny rules of
//! every matching route → allow rules of the most specific matching route
//! that has any (or the mesh default) → sunset → rate limits of every
//! matching route → request validation. `mode: audit` routes are evaluated
//! in a second, shadow pass that is reported and never enforced. Requests
//! are assumed to have passed [`crate::request_shape::check`] first.
//!
//! Opaque TCP connections have no request: [`PolicyEngine::authorize_connection`]
//! applies the same IP filters and identity-level rules to the connection.
//! Which ports are opaque is [`PolicyEngine::port_protocol`]: only a port
//! declared `tcp` to which no enforced route gives HTTP rules.

mod authz;
mod client_ip;
mod connection;
mod request;
mod routes;

use std::net::IpAddr;

use ipnet::IpNet;
use palisade_proto::policy::v1 as pb;
use smallvec::SmallVec;

pub use connection::{Connection, ConnectionDecision};
pub use request::{Decision, RateLimitReport, Reason, Request, RequestTime, Verdict};
pub use routes::{BodyRules, CompiledRateLimit, RateLimitKey};

use authz::{CompiledRole, MatchContext, Polarity, RoleCache, parse_cidr};
use routes::{MatchedRoute, RouteTable};

use crate::normalize::{NormalizeOptions, NormalizedTarget, normalize_target};

/// Why a `WorkloadPolicy` cannot be enforced. The agent NACKs with this text
/// and keeps the policy it has.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct LoadError(String);

impl LoadError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A refusal before routing, with the normalized path when there is one.
type RefusedEarly<'e, 'r> = (Verdict<'e>, Option<std::borrow::Cow<'r, str>>);

/// Which routes an evaluation pass looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// Enforced policies only.
    Enforced,
    /// Enforced and audit-mode policies together: "what would happen if the
    /// audit policies were enforced too".
    WithAudit,
}

impl Layer {
    fn includes(self, audit_only: bool) -> bool {
        self == Layer::WithAudit || !audit_only
    }
}

struct CompiledIpFilter {
    id: Box<str>,
    audit_only: bool,
    ports: SmallVec<[u16; 4]>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

/// What one application port is: its mTLS mode and declared protocol.
#[derive(Clone, Copy, Debug)]
struct PortSettings {
    port: u16,
    mtls: pb::MtlsMode,
    protocol: pb::PortProtocol,
}

/// A loaded, enforceable `WorkloadPolicy`.
pub struct PolicyEngine {
    version: String,
    default_action: pb::DefaultAction,
    default_mtls: pb::MtlsMode,
    ports: Vec<PortSettings>,
    roles: Vec<CompiledRole>,
    routes: RouteTable,
    ip_filters: Vec<CompiledIpFilter>,
    trusted_proxies: Vec<IpNet>,
    /// JWTs, API keys are verified: a refusal that such a credential could
    /// have turned around is a 401.
    accepts_jwt: bool,
    accepts_api_keys: bool,
    has_audit_layer: bool,
    normalize: NormalizeOptions,
    drop_underscore_headers: bool,
    audit: pb::AuditConfig,
    source: pb::WorkloadPolicy,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("version", &self.version)
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl PolicyEngine {
    /// Compiles a `WorkloadPolicy`: parses every address, schema and pointer
    /// and builds the route index, so nothing is parsed per request.
    pub fn load(policy: pb::WorkloadPolicy) -> Result<Self, LoadError> {
        Self::load_after(policy, None)
    }

    /// [`load`](Self::load), keeping the counters of `previous`'s local rate
    /// limits whose identity and settings did not change: a policy push must
    /// not hand every client a fresh budget.
    pub fn load_after(
        policy: pb::WorkloadPolicy,
        previous: Option<&PolicyEngine>,
    ) -> Result<Self, LoadError> {
        let default_action = match pb::DefaultAction::try_from(policy.default_action) {
            Ok(pb::DefaultAction::Deny) => pb::DefaultAction::Deny,
            Ok(_) => pb::DefaultAction::AllAuthenticated,
            Err(_) => {
                return Err(LoadError::new(format!(
                    "unknown default action {}",
                    policy.default_action
                )));
            }
        };
        let mtls = |value: i32| match pb::MtlsMode::try_from(value) {
            Ok(pb::MtlsMode::Permissive) => Ok(pb::MtlsMode::Permissive),
            Ok(_) => Ok(pb::MtlsMode::Strict),
            Err(_) => Err(LoadError::new(format!("unknown mTLS mode {value}"))),
        };
        let default_mtls = mtls(policy.default_mtls)?;
        let mut ports = Vec::with_capacity(policy.ports.len());
        for p in &policy.ports {
            ports.push(PortSettings {
                port: port(p.port)?,
                // A port listed only for its protocol keeps the default.
                mtls: match p.mtls {
                    0 => default_mtls,
                    m => mtls(m)?,
                },
                protocol: pb::PortProtocol::try_from(p.protocol).map_err(|_| {
                    LoadError::new(format!("port {}: unknown protocol {}", p.port, p.protocol))
                })?,
            });
        }
        let roles: Vec<CompiledRole> = policy.roles.iter().map(CompiledRole::compile).collect();
        let reuse = previous.map(|p| &p.routes);
        let routes = RouteTable::compile(&policy.routes, &roles, reuse)?;
        let mut ip_filters = Vec::with_capacity(policy.ip_filters.len());
        for f in &policy.ip_filters {
            ip_filters.push(CompiledIpFilter {
                id: f.id.as_str().into(),
                audit_only: f.audit_only,
                ports: f.ports.iter().map(|&p| port(p)).collect::<Result<_, _>>()?,
                allow: cidrs(&f.allow, &f.id)?,
                deny: cidrs(&f.deny, &f.id)?,
            });
        }
        let trusted_proxies = cidrs(&policy.trusted_proxies, "trusted proxies")?;
        for jwt in &policy.jwt_providers {
            if jwt.issuer.is_empty() || jwt.keys.is_none() {
                return Err(LoadError::new(format!(
                    "JWT provider {} lacks an issuer or keys",
                    jwt.id
                )));
            }
        }
        let api_keys = policy.api_keys.as_ref().filter(|a| !a.header.is_empty());
        if let Some(a) = api_keys {
            if http::HeaderName::from_bytes(a.header.as_bytes()).is_err() {
                return Err(LoadError::new(format!(
                    "invalid API-key header {:?}",
                    a.header
                )));
            }
            if let Some(k) = a.keys.iter().find(|k| k.sha256.len() != 32) {
                return Err(LoadError::new(format!(
                    "API key of client {} is not a SHA-256 hash",
                    k.client_id
                )));
            }
        }
        let has_audit_layer = routes.has_audit_routes() || ip_filters.iter().any(|f| f.audit_only);
        let http = policy.http.unwrap_or_default();
        Ok(Self {
            version: policy.version.clone(),
            default_action,
            default_mtls,
            ports,
            accepts_jwt: !policy.jwt_providers.is_empty(),
            accepts_api_keys: api_keys.is_some(),
            roles,
            routes,
            ip_filters,
            trusted_proxies,
            has_audit_layer,
            normalize: NormalizeOptions {
                allow_encoded_slash: false,
                allow_path_parameters: http.allow_path_parameters,
            },
            drop_underscore_headers: http.drop_underscore_headers,
            audit: policy.audit.clone().unwrap_or_default(),
            source: policy,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The policy this engine was loaded from.
    pub fn policy(&self) -> &pb::WorkloadPolicy {
        &self.source
    }

    pub fn audit_config(&self) -> &pb::AuditConfig {
        &self.audit
    }

    /// The mTLS mode of an application port.
    pub fn mtls_mode(&self, port: u16) -> pb::MtlsMode {
        self.port(port).map_or(self.default_mtls, |p| p.mtls)
    }

    fn port(&self, port: u16) -> Option<&PortSettings> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// What an application port speaks. A port to which an enforced route
    /// gives HTTP rules (a path, method, header or host match, a limit, body
    /// or response rules, a rule on claims, API keys or request attributes)
    /// is HTTP whatever was declared: declaring `tcp` never switches rules
    /// off. `Tcp` only for a port declared so with identity-level rules
    /// only; `Unspecified` when nothing was declared (the agent's own
    /// configuration decides, HTTP by default).
    pub fn port_protocol(&self, port: u16) -> pb::PortProtocol {
        let declared = self
            .port(port)
            .map_or(pb::PortProtocol::Unspecified, |p| p.protocol);
        match declared {
            pb::PortProtocol::Tcp | pb::PortProtocol::Unspecified
                if self.routes.gives_http_rules(port) =>
            {
                pb::PortProtocol::Http
            }
            other => other,
        }
    }

    /// The enforced route that makes `port` HTTP, if one does (for messages
    /// that explain why a declared `tcp` does not hold).
    pub fn http_route_for(&self, port: u16) -> Option<&str> {
        self.routes.http_route_for(port)
    }

    /// Whether `ip` is a hop whose `X-Forwarded-For` entries are believed.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The path normalization this policy asks for.
    pub fn normalize_options(&self) -> &NormalizeOptions {
        &self.normalize
    }

    /// Whether header fields with `_` in their name are dropped (rather
    /// than refused) by the shape step.
    pub fn drop_underscore_headers(&self) -> bool {
        self.drop_underscore_headers
    }

    /// Decides one request.
    pub fn decide<'e, 'r>(&'e self, request: &Request<'r>) -> Decision<'e, 'r> {
        let client_ip =
            client_ip::client_ip(request.peer_addr, request.headers, &self.trusted_proxies);
        let mut decision = Decision {
            verdict: Verdict::allow(Reason::Allowed, None),
            shadow: None,
            normalized_path: None,
            query: None,
            route: None,
            client_ip,
            rate_limit: None,
            global_limits: Vec::new(),
            response_headers: Vec::new(),
            body: None,
            response_mask: None,
        };
        let shadow_filter = self
            .has_audit_layer
            .then(|| self.ip_filter(request.port, client_ip, Layer::WithAudit))
            .flatten();
        let target = match self.before_routing(request, client_ip) {
            Ok(target) => target,
            Err((verdict, path)) => {
                decision.verdict = verdict;
                decision.normalized_path = path;
                return decision;
            }
        };

        let (minute_of_day, weekday) = time_of_day(request.time.unix_seconds);
        let mut ctx = MatchContext {
            request,
            client_ip,
            minute_of_day,
            weekday,
            roles: RoleCache::new(self.roles.len()),
        };
        let matched = self.routes.matching(&target.path, request);
        decision.route = matched
            .iter()
            .map(|m| self.routes.get(m.slot))
            .find(|r| !r.audit_only)
            .map(|r| &*r.id);

        decision.verdict = self.evaluate(&mut ctx, &matched, Layer::Enforced, &mut decision);
        if self.has_audit_layer {
            decision.shadow = Some(match shadow_filter {
                Some(v) => v,
                None => self.evaluate_shadow(&mut ctx, &matched, &decision),
            });
        }
        decision.normalized_path = Some(target.path);
        decision.query = target.query;
        decision
    }

    /// Whether a request admitted earlier would still be admitted, for a
    /// connection it upgraded (a WebSocket) when a new policy arrives: the
    /// same steps as [`decide`](Self::decide) up to authorization and the
    /// sunset, without charging rate limits or looking at a body.
    pub fn reauthorize<'e>(&'e self, request: &Request<'_>) -> Verdict<'e> {
        let client_ip =
            client_ip::client_ip(request.peer_addr, request.headers, &self.trusted_proxies);
        let target = match self.before_routing(request, client_ip) {
            Ok(target) => target,
            Err((verdict, _)) => return verdict,
        };
        let (minute_of_day, weekday) = time_of_day(request.time.unix_seconds);
        let mut ctx = MatchContext {
            request,
            client_ip,
            minute_of_day,
            weekday,
            roles: RoleCache::new(self.roles.len()),
        };
        let matched = self.routes.matching(&target.path, request);
        let verdict = self.authorize(&mut ctx, &matched, Layer::Enforced);
        if !verdict.allowed {
            return verdict;
        }
        let sunset = matched
            .iter()
            .map(|m| self.routes.get(m.slot))
            .filter(|r| !r.audit_only)
            .find_map(|r| r.deprecation.as_ref())
            .filter(|d| {
                d.block_after_sunset && d.sunset.is_some_and(|s| request.time.unix_seconds >= s)
            });
        match sunset {
            Some(d) => Verdict::deny(410, Reason::Sunset, Some(&*d.id)),
            None => verdict,
        }
    }

    /// The steps before routing, shared by [`decide`](Self::decide) and
    /// [`reauthorize`](Self::reauthorize): the enforced IP filter, the mTLS
    /// requirement, path normalization, a credential that failed. A refusal
    /// comes with the normalized path when there is one.
    fn before_routing<'e, 'r>(
        &'e self,
        request: &Request<'r>,
        client_ip: IpAddr,
    ) -> Result<NormalizedTarget<'r>, RefusedEarly<'e, 'r>> {
        if let Some(v) = self.ip_filter(request.port, client_ip, Layer::Enforced) {
            return Err((v, None));
        }
        if request.peer.is_none() && self.mtls_mode(request.port) == pb::MtlsMode::Strict {
            return Err((Verdict::deny(401, Reason::MtlsRequired, None), None));
        }
        let target = normalize_target(request.target, &self.normalize)
            .map_err(|e| (Verdict::deny(400, Reason::invalid_path(&e), None), None))?;
        if request.credential_error.is_some() {
            let refused = Verdict::deny(401, Reason::AuthenticationFailed, None);
            return Err((refused, Some(target.path)));
        }
        Ok(target)
    }

    fn ip_filter(&self, port: u16, ip: IpAddr, layer: Layer) -> Option<Verdict<'_>> {
        self.ip_filters
            .iter()
            .filter(|f| layer.includes(f.audit_only))
            .filter(|f| f.ports.is_empty() || f.ports.contains(&port))
            .find(|f| {
                f.deny.iter().any(|n| n.contains(&ip))
                    || (!f.allow.is_empty() && !f.allow.iter().any(|n| n.contains(&ip)))
            })
            .map(|f| Verdict::deny(403, Reason::IpFilter, Some(&*f.id)))
    }

    /// Authorization, sunset, rate limits and validation for one layer.
    /// Fills the decision's side outputs (limits, headers, body rules) for
    /// the enforced layer.
    fn evaluate<'e>(
        &'e self,
        ctx: &mut MatchContext<'_>,
        matched: &[MatchedRoute],
        layer: Layer,
        decision: &mut Decision<'e, '_>,
    ) -> Verdict<'e> {
        let verdict = self.authorize(ctx, matched, layer);
        if !verdict.allowed {
            return verdict;
        }
        let now = ctx.request.time;
        let routes = || {
            matched
                .iter()
                .map(|m| self.routes.get(m.slot))
                .filter(|r| layer.includes(r.audit_only))
        };

        if let Some(dep) = routes().find_map(|r| r.deprecation.as_ref()) {
            decision.response_headers = dep.headers();
            if dep.block_after_sunset && dep.sunset.is_some_and(|s| now.unix_seconds >= s) {
                return Verdict::deny(410, Reason::Sunset, Some(&*dep.id));
            }
        }

        for route in routes() {
            let Some(limit) = &route.rate_limit else {
                continue;
            };
            if limit.scope == pb::rate_limit::Scope::Global {
                decision.global_limits.push(limit);
                continue;
            }
            let outcome = limit.check(ctx.request, ctx.client_ip, now.monotonic);
            let tighter = decision
                .rate_limit
                .is_none_or(|r| !outcome.allowed || outcome.remaining < r.outcome.remaining);
            if tighter {
                decision.rate_limit = Some(RateLimitReport {
                    limit_id: &limit.id,
                    outcome,
                });
            }
            if !outcome.allowed {
                return Verdict::deny(429, Reason::RateLimited, Some(&*limit.id));
            }
        }

        if let Some(body) = routes().find_map(|r| r.body.as_ref()) {
            decision.body = Some(body);
            if let Some(v) = body.check_headers(ctx.request.headers, ctx.request.has_body) {
                return v;
            }
        }
        decision.response_mask = routes().find_map(|r| r.response.as_ref());
        verdict
    }

    /// The shadow pass: authorization over enforced and audit routes, and the
    /// audit routes' own limits. Enforced limits are not charged twice.
    fn evaluate_shadow<'e>(
        &'e self,
        ctx: &mut MatchContext<'_>,
        matched: &[MatchedRoute],
        decision: &Decision<'e, '_>,
    ) -> Verdict<'e> {
        let verdict = self.authorize(ctx, matched, Layer::WithAudit);
        if !verdict.allowed {
            return verdict;
        }
        // Authorization passed here; a request the enforced layer refused after authorization (limit,
        // sunset, validation) is refused by the wider layer too.
        let after_authz = matches!(
            decision.verdict.reason,
            Reason::RateLimited
                | Reason::Sunset
                | Reason::BodyTooLarge
                | Reason::UnsupportedMediaType
        );
        if !decision.verdict.allowed && after_authz {
            return decision.verdict;
        }
        for route in matched
            .iter()
            .map(|m| self.routes.get(m.slot))
            .filter(|r| r.audit_only)
        {
            if let Some(dep) = &route.deprecation
                && dep.block_after_sunset
                && dep
                    .sunset
                    .is_some_and(|s| ctx.request.time.unix_seconds >= s)
            {
                return Verdict::deny(410, Reason::Sunset, Some(&*dep.id));
            }
            if let Some(limit) = route
                .rate_limit
                .as_ref()
                .filter(|l| l.scope == pb::rate_limit::Scope::Local)
            {
                let outcome = limit.check(ctx.request, ctx.client_ip, ctx.request.time.monotonic);
                if !outcome.allowed {
                    return Verdict::deny(429, Reason::RateLimited, Some(&*limit.id));
                }
            }
            if let Some(v) = route
                .body
                .as_ref()
                .and_then(|b| b.check_headers(ctx.request.headers, ctx.request.has_body))
            {
                return v;
            }
        }
        verdict
    }

    /// Deny rules of every matching route, then the allow rules of the most
    /// specific matching route that has any, else the mesh default.
    fn authorize<'e>(
        &'e self,
        ctx: &mut MatchContext<'_>,
        matched: &[MatchedRoute],
        layer: Layer,
    ) -> Verdict<'e> {
        let routes = || {
            matched
                .iter()
                .map(|m| self.routes.get(m.slot))
                .filter(|r| layer.includes(r.audit_only))
        };
        for route in routes() {
            if let Some(rule) = route
                .deny
                .iter()
                .find(|rule| rule.matches(ctx, &self.roles, Polarity::Deny))
            {
                return Verdict::deny(403, Reason::DenyRule, Some(&*rule.id));
            }
        }
        if self
            .routes
            .has_allow_rules(ctx.request.port, layer == Layer::WithAudit)
        {
            // Only a strict match may grant access (see `RouteTable::matching`).
            let strict = matched
                .iter()
                .filter(|m| m.strict)
                .map(|m| self.routes.get(m.slot))
                .filter(|r| layer.includes(r.audit_only));
            let Some(route) = strict.clone().find(|r| !r.allow.is_empty()) else {
                // No allow rule speaks about this request: no credential
                // could change that.
                return Verdict::deny(403, Reason::NoAllowMatch, None);
            };
            return match route
                .allow
                .iter()
                .find(|rule| rule.matches(ctx, &self.roles, Polarity::Allow))
            {
                Some(rule) => Verdict::allow(Reason::Allowed, Some(&*rule.id)),
                None => Verdict::deny(
                    self.refusal_status(ctx.request, &route.allow),
                    Reason::NoAllowMatch,
                    Some(&*route.id),
                ),
            };
        }
        let request = ctx.request;
        match self.default_action {
            // Nothing is allowed: no credential could change that.
            pb::DefaultAction::Deny => Verdict::deny(403, Reason::DefaultDeny, None),
            _ if request.peer.is_some()
                || request.jwt_claims.is_some()
                || request.api_key_client.is_some() =>
            {
                Verdict::allow(Reason::DefaultAllAuthenticated, None)
            }
            _ => Verdict::deny(401, Reason::Unauthenticated, None),
        }
    }

    /// 401 only when presenting a credential could change the decision: one
    /// of the refusing `rules` asks for a JWT, an API key or (from a caller
    /// with no identity at all) a mesh identity the request does not carry,
    /// and the workload accepts that credential. 403 when who the caller is
    /// was established and no credential could satisfy the rules.
    fn refusal_status(&self, request: &Request<'_>, rules: &[authz::CompiledRule]) -> u16 {
        let anonymous = request.peer.is_none()
            && request.jwt_claims.is_none()
            && request.api_key_client.is_none();
        let could_change = rules.iter().any(|rule| {
            let wants = rule.credentials(&self.roles);
            (wants.jwt && self.accepts_jwt && request.jwt_claims.is_none())
                || (wants.api_key && self.accepts_api_keys && request.api_key_client.is_none())
                || (wants.peer && anonymous)
        });
        if could_change { 401 } else { 403 }
    }
}

fn port(value: u32) -> Result<u16, LoadError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| LoadError::new(format!("port {value} out of range")))
}

fn cidrs(values: &[String], owner: &str) -> Result<Vec<IpNet>, LoadError> {
    values
        .iter()
        .map(|c| parse_cidr(c).map_err(|e| LoadError::new(format!("{owner}: {e}"))))
        .collect()
}

/// Minute of the day (UTC) and ISO weekday (1 = Monday) of a Unix time.
fn time_of_day(unix_seconds: i64) -> (u32, u32) {
    let days = unix_seconds.div_euclid(86_400);
    let seconds = unix_seconds.rem_euclid(86_400);
    // 1970-01-01 was a Thursday (ISO 4).
    let weekday = (days + 3).rem_euclid(7) + 1;
    ((seconds / 60) as u32, weekday as u32)
}

#[cfg(test)]
mod tests;
