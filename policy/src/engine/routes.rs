//! Routes compiled for matching: the path index, per-route checks, limits,
//! body rules, masking and deprecation.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, header};
use palisade_proto::policy::v1 as pb;
use smallvec::SmallVec;

use super::LoadError;
use super::authz::{CompiledRole, CompiledRule, lookup_claim};
use super::request::{Reason, Request, Verdict};
use crate::body::{BodySchema, content_type_allowed, is_json_content_type};
use crate::masking::ResponseMask;
use crate::path_index::{PathIndex, PathPattern, Specificity};
use crate::ratelimit::{Algorithm, LimitConfig, RateLimitOutcome, RateLimiter};

pub(crate) struct CompiledRoute {
    pub id: Box<str>,
    pub audit_only: bool,
    ports: SmallVec<[u16; 4]>,
    methods: Vec<http::Method>,
    headers: Vec<HeaderCheck>,
    hosts: Vec<Box<str>>,
    pub allow: Vec<CompiledRule>,
    pub deny: Vec<CompiledRule>,
    pub rate_limit: Option<CompiledRateLimit>,
    pub body: Option<BodyRules>,
    pub response: Option<ResponseMask>,
    pub deprecation: Option<CompiledDeprecation>,
    /// Method, header and host constraints make a route more specific than
    /// one with the same path match and fewer constraints.
    constraints: u8,
    /// Matches every request of its ports: no path (or prefix `/`), no
    /// method, header or host match.
    pub catch_all: bool,
    /// Needs an HTTP request to be enforced (see
    /// `PolicyEngine::port_protocol`).
    pub http_level: bool,
}

struct HeaderCheck {
    name: HeaderName,
    kind: HeaderCheckKind,
}

enum HeaderCheckKind {
    Exact(Box<str>),
    Prefix(Box<str>),
    Present(bool),
}

/// What a rate limit counts requests by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateLimitKey {
    Principal,
    SourceIp,
    ApiKey,
    Header(HeaderName),
    Claim(Box<str>),
}

/// A compiled rate limit. Local limits hold their counters here; global
/// limits are checked by the agent against the shared store.
pub struct CompiledRateLimit {
    pub id: Box<str>,
    pub key: RateLimitKey,
    pub scope: pb::rate_limit::Scope,
    pub failure_mode: pb::rate_limit::FailureMode,
    pub config: LimitConfig,
    /// Shared with the next policy version when this limit's id and
    /// settings stay the same, so a push keeps every key's state.
    limiter: Arc<RateLimiter>,
}

impl std::fmt::Debug for CompiledRateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRateLimit")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Requests that lack the key share one bucket, marked by a byte no string
/// key can start with, so leaving the key out never escapes the limit.
const MISSING_KEY: &[u8] = &[0xff];

impl CompiledRateLimit {
    /// The bytes this request is counted under.
    pub fn key_bytes<'a>(
        &self,
        request: &Request<'a>,
        client_ip: IpAddr,
        buf: &'a mut [u8; 16],
    ) -> &'a [u8] {
        match &self.key {
            RateLimitKey::Principal => request.peer.map_or(MISSING_KEY, |p| p.as_str().as_bytes()),
            RateLimitKey::ApiKey => request.api_key_client.map_or(MISSING_KEY, str::as_bytes),
            RateLimitKey::SourceIp => match client_ip {
                IpAddr::V4(v4) => {
                    buf[..4].copy_from_slice(&v4.octets());
                    &buf[..4]
                }
                IpAddr::V6(v6) => {
                    *buf = v6.octets();
                    &buf[..]
                }
            },
            RateLimitKey::Header(name) => request
                .headers
                .get(name)
                .map_or(MISSING_KEY, |v| v.as_bytes()),
            RateLimitKey::Claim(name) => request
                .jwt_claims
                .and_then(|c| lookup_claim(c, name))
                .and_then(|v| v.as_str())
                .map_or(MISSING_KEY, str::as_bytes),
        }
    }

    pub(crate) fn check(
        &self,
        request: &Request<'_>,
        client_ip: IpAddr,
        now: Duration,
    ) -> RateLimitOutcome {
        let mut buf = [0u8; 16];
        let key = self.key_bytes(request, client_ip, &mut buf);
        self.limiter.check(key, now)
    }

    /// Whether `self`'s counters are `other`'s: the same limit, counted the
    /// same way.
    fn same_counters_as(&self, other: &CompiledRateLimit) -> bool {
        self.id == other.id
            && self.key == other.key
            && self.scope == other.scope
            && self.config == other.config
    }

    /// How many keys this limit tracks now.
    pub fn tracked_keys(&self) -> usize {
        self.limiter.tracked_keys()
    }

    fn compile(
        limit: &pb::RateLimit,
        previous: &HashMap<&str, &CompiledRateLimit>,
    ) -> Result<Self, LoadError> {
        use pb::rate_limit::{Algorithm as A, FailureMode, KeyKind, Scope};
        let err = |what: String| LoadError::new(format!("rate limit {}: {what}", limit.id));
        let algorithm = match A::try_from(limit.algorithm) {
            Ok(A::TokenBucket) => Algorithm::TokenBucket,
            Ok(A::FixedWindow) => Algorithm::FixedWindow,
            Ok(A::SlidingWindow) => Algorithm::SlidingWindow,
            _ => return Err(err(format!("unknown algorithm {}", limit.algorithm))),
        };
        let key = match KeyKind::try_from(limit.key) {
            Ok(KeyKind::Principal) => RateLimitKey::Principal,
            Ok(KeyKind::SourceIp) => RateLimitKey::SourceIp,
            Ok(KeyKind::ApiKey) => RateLimitKey::ApiKey,
            Ok(KeyKind::Header) => RateLimitKey::Header(
                HeaderName::from_bytes(limit.key_name.as_bytes())
                    .map_err(|_| err(format!("invalid header name {:?}", limit.key_name)))?,
            ),
            Ok(KeyKind::Claim) if !limit.key_name.is_empty() => {
                RateLimitKey::Claim(limit.key_name.as_str().into())
            }
            _ => return Err(err(format!("unknown key kind {}", limit.key))),
        };
        let scope = match Scope::try_from(limit.scope) {
            Ok(Scope::Global) => Scope::Global,
            Ok(_) => Scope::Local,
            Err(_) => return Err(err(format!("unknown scope {}", limit.scope))),
        };
        let failure_mode = match FailureMode::try_from(limit.failure_mode) {
            Ok(FailureMode::Open) => FailureMode::Open,
            Ok(_) => FailureMode::Closed,
            Err(_) => return Err(err(format!("unknown failure mode {}", limit.failure_mode))),
        };
        let config = LimitConfig {
            algorithm,
            amount: limit.amount,
            period: Duration::from_millis(limit.period_ms),
            burst: limit.burst,
            max_keys: if limit.max_keys == 0 {
                100_000
            } else {
                limit.max_keys as usize
            },
        };
        let limiter = Arc::new(RateLimiter::new(config.clone()).map_err(|e| err(e.to_string()))?);
        let mut compiled = Self {
            id: limit.id.as_str().into(),
            key,
            scope,
            failure_mode,
            config,
            limiter,
        };
        if let Some(old) = previous.get(limit.id.as_str())
            && compiled.same_counters_as(old)
        {
            compiled.limiter = old.limiter.clone();
        }
        Ok(compiled)
    }
}

/// Request body rules, applied by the agent as the body streams in.
pub struct BodyRules {
    pub id: Box<str>,
    /// 0: no limit.
    pub max_body_bytes: u64,
    pub content_types: Vec<String>,
    pub schema: Option<BodySchema>,
}

impl std::fmt::Debug for BodyRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyRules")
            .field("id", &self.id)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("content_types", &self.content_types)
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

impl BodyRules {
    /// What can be decided before reading the body: a declared length over
    /// the limit (413), and for a request that carries a body its media type
    /// (415: not in `contentTypes`, or not JSON where a JSON Schema applies).
    /// This is the one place the media type is checked; a body without a
    /// declared length is counted by the agent while it streams.
    pub(crate) fn check_headers(&self, headers: &HeaderMap, has_body: bool) -> Option<Verdict<'_>> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if self.max_body_bytes > 0 && declared.is_some_and(|n| n > self.max_body_bytes) {
            return Some(Verdict::deny(413, Reason::BodyTooLarge, Some(&*self.id)));
        }
        if has_body {
            // A value that is not visible ASCII matches no media type.
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap_or("\u{0}"));
            let schema_wants_json = self.schema.is_some() && !is_json_content_type(content_type);
            if schema_wants_json || !content_type_allowed(content_type, &self.content_types) {
                return Some(Verdict::deny(
                    415,
                    Reason::UnsupportedMediaType,
                    Some(&*self.id),
                ));
            }
        }
        None
    }

    fn compile(id: &str, v: &pb::Validation) -> Result<Self, LoadError> {
        let schema = if v.json_schema.is_empty() {
            None
        } else {
            Some(
                BodySchema::compile(&v.json_schema)
                    .map_err(|e| LoadError::new(format!("{id}: {e}")))?,
            )
        };
        Ok(Self {
            id: format!("{id}/validation").into(),
            max_body_bytes: v.max_body_bytes,
            content_types: v.content_types.clone(),
            schema,
        })
    }
}

pub(crate) struct CompiledDeprecation {
    pub id: Box<str>,
    pub deprecated_at: Option<i64>,
    pub sunset: Option<i64>,
    pub link: Option<Box<str>>,
    pub block_after_sunset: bool,
}

impl CompiledDeprecation {
    /// `Deprecation` (RFC 9745), `Sunset` (RFC 8594) and `Link` headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(3);
        if let Some(at) = self.deprecated_at {
            out.push(("deprecation", format!("@{at}")));
        }
        if let Some(sunset) = self.sunset.and_then(http_date) {
            out.push(("sunset", sunset));
        }
        if let Some(link) = &self.link {
            out.push((
                "link",
                format!("<{link}>; rel=\"deprecation\"; type=\"text/html\""),
            ));
        }
        out
    }
}

/// An IMF-fixdate, as HTTP dates are written.
fn http_date(unix_seconds: i64) -> Option<String> {
    let ts = jiff::Timestamp::from_second(unix_seconds).ok()?;
    Some(ts.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string())
}

/// All routes of a workload, indexed by path.
pub(crate) struct RouteTable {
    routes: Vec<CompiledRoute>,
    index: PathIndex<u32>,
    /// Ports with enforced allow rules.
    allow_ports: PortSet,
    allow_ports_with_audit: PortSet,
    /// Ports an enforced route gives HTTP rules.
    http_ports: PortSet,
}

/// The ports of some routes: every port, or a list; with the first route
/// that put each there.
#[derive(Default)]
struct PortSet {
    every_port: Option<u32>,
    ports: SmallVec<[(u16, u32); 8]>,
}

impl PortSet {
    fn add(&mut self, route: &CompiledRoute, slot: u32) {
        if route.ports.is_empty() {
            self.every_port.get_or_insert(slot);
        } else {
            for &p in &route.ports {
                if !self.ports.iter().any(|(q, _)| *q == p) {
                    self.ports.push((p, slot));
                }
            }
        }
    }
    fn contains(&self, port: u16) -> bool {
        self.first(port).is_some()
    }
    /// The first route that put `port` here.
    fn first(&self, port: u16) -> Option<u32> {
        self.every_port.or_else(|| {
            self.ports
                .iter()
                .find(|(p, _)| *p == port)
                .map(|(_, slot)| *slot)
        })
    }
}

impl RouteTable {
    /// Compiles `routes`; local rate limits unchanged since `previous` keep
    /// its counters.
    pub fn compile(
        routes: &[pb::Route],
        roles: &[CompiledRole],
        previous: Option<&RouteTable>,
    ) -> Result<Self, LoadError> {
        let previous_limits: HashMap<&str, &CompiledRateLimit> = previous
            .into_iter()
            .flat_map(|t| t.routes.iter())
            .filter_map(|r| r.rate_limit.as_ref())
            .map(|l| (&*l.id, l))
            .collect();
        let mut table = Self {
            routes: Vec::with_capacity(routes.len()),
            index: PathIndex::new(),
            allow_ports: PortSet::default(),
            allow_ports_with_audit: PortSet::default(),
            http_ports: PortSet::default(),
        };
        for (i, r) in routes.iter().enumerate() {
            let route = CompiledRoute::compile(r, roles, &previous_limits)?;
            let slot = u32::try_from(i).map_err(|_| LoadError::new("too many routes"))?;
            match r.path.as_ref().and_then(|p| p.kind.as_ref()) {
                None => table.index.insert_any(slot),
                Some(kind) => {
                    let pattern = match kind {
                        pb::path_match::Kind::Exact(p) => PathPattern::Exact(p.clone()),
                        pb::path_match::Kind::Template(p) => PathPattern::Template(p.clone()),
                        pb::path_match::Kind::Prefix(p) => PathPattern::Prefix(p.clone()),
                    };
                    table
                        .index
                        .insert(pattern, slot)
                        .map_err(|e| LoadError::new(format!("route {}: {e}", r.id)))?;
                }
            }
            if !route.allow.is_empty() {
                table.allow_ports_with_audit.add(&route, slot);
                if !route.audit_only {
                    table.allow_ports.add(&route, slot);
                }
            }
            // Audit-mode routes never change enforcement, so they cannot
            // turn an opaque port into an HTTP one either.
            if route.http_level && !route.audit_only {
                table.http_ports.add(&route, slot);
            }
            table.routes.push(route);
        }
        Ok(table)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn get(&self, i: u32) -> &CompiledRoute {
        &self.routes[i as usize]
    }

    pub fn has_audit_routes(&self) -> bool {
        self.routes.iter().any(|r| r.audit_only)
    }

    /// An enforced route gives `port` HTTP rules.
    pub fn gives_http_rules(&self, port: u16) -> bool {
        self.http_ports.contains(port)
    }

    /// The id of the first enforced route that gives `port` HTTP rules.
    pub fn http_route_for(&self, port: u16) -> Option<&str> {
        self.http_ports.first(port).map(|slot| &*self.get(slot).id)
    }

    /// The catch-all routes of `port`, the only ones an opaque connection
    /// meets, most specific first (prefix `/` before no path, then in the
    /// order listed).
    pub fn matching_connection(&self, port: u16) -> SmallVec<[MatchedRoute; 8]> {
        let mut found: SmallVec<[(Specificity, MatchedRoute); 8]> = SmallVec::new();
        self.index.for_each_match("/", |&slot, specificity| {
            let route = &self.routes[slot as usize];
            if route.catch_all && (route.ports.is_empty() || route.ports.contains(&port)) {
                found.push((specificity, MatchedRoute { slot, strict: true }));
            }
        });
        found.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.slot.cmp(&b.1.slot)));
        found.into_iter().map(|(_, m)| m).collect()
    }

    pub fn has_allow_rules(&self, port: u16, with_audit: bool) -> bool {
        if with_audit {
            self.allow_ports_with_audit.contains(port)
        } else {
            self.allow_ports.contains(port)
        }
    }

    /// Routes matching the request, most specific first: path match kind and
    /// length, then number of method/header/host constraints, then the order
    /// the policy listed them in. Each comes with whether it matches
    /// strictly: a header match holds strictly when every value of the header
    /// matches, loosely when any does. Restrictions (deny rules, limits,
    /// validation, masking, sunsets) apply on a loose match, allow rules only
    /// on a strict one, so adding a header value can only narrow access.
    pub fn matching(&self, path: &str, request: &Request<'_>) -> SmallVec<[MatchedRoute; 8]> {
        let mut found: SmallVec<[(Specificity, u8, MatchedRoute); 8]> = SmallVec::new();
        self.index.for_each_match(path, |&slot, specificity| {
            let route = &self.routes[slot as usize];
            if let Some(strict) = route.applies(request) {
                found.push((
                    specificity,
                    route.constraints,
                    MatchedRoute { slot, strict },
                ));
            }
        });
        found.sort_unstable_by(|a, b| {
            b.0.cmp(&a.0)
                .then(b.1.cmp(&a.1))
                .then(a.2.slot.cmp(&b.2.slot))
        });
        found.into_iter().map(|(_, _, m)| m).collect()
    }
}

/// A route that matched a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MatchedRoute {
    pub slot: u32,
    /// Every value of every matched header matched (see `RouteTable::matching`).
    pub strict: bool,
}

impl CompiledRoute {
    fn compile(
        r: &pb::Route,
        roles: &[CompiledRole],
        previous_limits: &HashMap<&str, &CompiledRateLimit>,
    ) -> Result<Self, LoadError> {
        let role_count = roles.len();
        let err = |what: String| LoadError::new(format!("route {}: {what}", r.id));
        let mut methods = Vec::with_capacity(r.methods.len());
        for m in &r.methods {
            methods.push(
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| err(format!("invalid method {m:?}")))?,
            );
        }
        let mut headers = Vec::with_capacity(r.headers.len());
        for h in &r.headers {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| err(format!("invalid header {:?}", h.name)))?;
            let kind = match &h.kind {
                Some(pb::header_match::Kind::Exact(v)) => HeaderCheckKind::Exact(v.as_str().into()),
                Some(pb::header_match::Kind::Prefix(v)) => {
                    HeaderCheckKind::Prefix(v.as_str().into())
                }
                Some(pb::header_match::Kind::Present(p)) => HeaderCheckKind::Present(*p),
                None => return Err(err(format!("header match {:?} has no condition", h.name))),
            };
            headers.push(HeaderCheck { name, kind });
        }
        let ports = r
            .ports
            .iter()
            .map(|&p| u16::try_from(p).map_err(|_| err(format!("port {p} out of range"))))
            .collect::<Result<_, _>>()?;
        let compile_rules = |rules: &[pb::Rule]| -> Result<Vec<CompiledRule>, LoadError> {
            rules
                .iter()
                .map(|rule| CompiledRule::compile(rule, role_count))
                .collect()
        };
        let response = match &r.response {
            Some(resp) if !resp.redact.is_empty() || !resp.mask.is_empty() => {
                let masks: Vec<(String, u32)> = resp
                    .mask
                    .iter()
                    .map(|m| (m.pointer.clone(), m.show_last))
                    .collect();
                Some(ResponseMask::compile(&resp.redact, &masks).map_err(|e| err(e.to_string()))?)
            }
            _ => None,
        };
        let deprecation = r.deprecation.as_ref().map(|d| CompiledDeprecation {
            id: format!("{}/deprecation", r.id).into(),
            deprecated_at: (d.deprecated_at != 0).then_some(d.deprecated_at),
            sunset: (d.sunset != 0).then_some(d.sunset),
            link: (!d.link.is_empty()).then(|| d.link.as_str().into()),
            block_after_sunset: d.block_after_sunset,
        });
        let constraints = u8::from(!r.methods.is_empty())
            + u8::try_from(r.headers.len()).unwrap_or(u8::MAX).min(100)
            + u8::from(!r.hosts.is_empty());
        let every_path = match r.path.as_ref().and_then(|p| p.kind.as_ref()) {
            None => true,
            Some(pb::path_match::Kind::Prefix(p)) => p == "/",
            Some(_) => false,
        };
        let catch_all = every_path && constraints == 0;
        let allow = compile_rules(&r.allow)?;
        let deny = compile_rules(&r.deny)?;
        let http_level = !catch_all
            || r.rate_limit.is_some()
            || r.validation.is_some()
            || response.is_some()
            || r.deprecation.is_some()
            || allow
                .iter()
                .chain(&deny)
                .any(|rule| rule.needs_request(roles));
        Ok(Self {
            id: r.id.as_str().into(),
            audit_only: r.audit_only,
            ports,
            methods,
            headers,
            hosts: r.hosts.iter().map(|h| h.as_str().into()).collect(),
            allow,
            deny,
            rate_limit: r
                .rate_limit
                .as_ref()
                .map(|l| CompiledRateLimit::compile(l, previous_limits))
                .transpose()?,
            body: r
                .validation
                .as_ref()
                .map(|v| BodyRules::compile(&r.id, v))
                .transpose()?,
            response,
            deprecation,
            constraints,
            catch_all,
            http_level,
        })
    }

    /// Port, method, header and host constraints (the path is the index's
    /// job): `None` when the route does not apply, else whether it applies
    /// strictly.
    fn applies(&self, request: &Request<'_>) -> Option<bool> {
        let fixed = (self.ports.is_empty() || self.ports.contains(&request.port))
            && (self.methods.is_empty() || self.methods.contains(request.method))
            && (self.hosts.is_empty() || request.host.is_some_and(|host| self.host_matches(host)));
        if !fixed {
            return None;
        }
        let mut strict = true;
        for h in &self.headers {
            let (any, all) = h.matches(request.headers);
            if !any {
                return None;
            }
            strict &= all;
        }
        Some(strict)
    }

    fn host_matches(&self, host: &str) -> bool {
        let host = canonical_host(host);
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// A Host value without port and trailing dot.
fn canonical_host(host: &str) -> &str {
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split_once(']').map_or(host, |(addr, _)| addr)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    without_port.strip_suffix('.').unwrap_or(without_port)
}

impl HeaderCheck {
    /// (some value matches, every value matches), over repeated fields and
    /// comma-joined values alike. `present: false` holds only for an absent
    /// header.
    fn matches(&self, headers: &HeaderMap) -> (bool, bool) {
        let values = || {
            headers
                .get_all(&self.name)
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
                .map(str::trim)
        };
        let present = values().next().is_some();
        let test = |v: &str| match &self.kind {
            HeaderCheckKind::Exact(want) => v == &**want,
            HeaderCheckKind::Prefix(p) => v.starts_with(&**p),
            HeaderCheckKind::Present(_) => true,
        };
        match &self.kind {
            HeaderCheckKind::Present(want) => (present == *want, present == *want),
            _ => (values().any(test), present && values().all(test)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_host;

    #[test]
    fn hosts_lose_port_and_trailing_dot() {
        assert_eq!(canonical_host("api.example.com"), "api.example.com");
        assert_eq!(canonical_host("api.example.com:8443"), "api.example.com");
        assert_eq!(canonical_host("api.example.com."), "api.example.com");
        assert_eq!(canonical_host("api.example.com.:80"), "api.example.com");
        assert_eq!(canonical_host("[::1]:8080"), "::1");
    }
}
