//! Roles, allow/deny rules and attribute conditions, compiled for matching.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;
use palisade_proto::policy::v1 as pb;
use serde_json::Value;
use smallvec::SmallVec;

use super::LoadError;
use super::request::Request;
use crate::identity::{SpiffeId, principal_matches};

/// Everything a rule may look at, gathered once per request.
pub(crate) struct MatchContext<'a> {
    pub request: &'a Request<'a>,
    pub client_ip: IpAddr,
    /// Minutes after midnight UTC and ISO weekday (1 = Monday).
    pub minute_of_day: u32,
    pub weekday: u32,
    /// Which roles the request holds, computed lazily: bit i of word i/64.
    pub roles: RoleCache,
}

/// Whether a rule is an allow rule or a deny rule changes how multi-valued
/// conditions are read: an extra value may only ever make an allow rule fail
/// and a deny rule match, so adding values cannot widen access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Polarity {
    Allow,
    Deny,
}

pub(crate) struct CompiledRole {
    principals: Vec<Box<str>>,
    namespaces: Vec<Box<str>>,
    claims: Vec<ClaimMatch>,
    api_key_clients: Vec<Box<str>>,
}

struct ClaimMatch {
    name: Box<str>,
    values: Vec<Box<str>>,
}

pub(crate) struct CompiledRule {
    pub id: Box<str>,
    roles: Vec<u32>,
    principals: Vec<Box<str>>,
    namespaces: Vec<Box<str>>,
    api_key_clients: Vec<Box<str>>,
    claims: Vec<ClaimMatch>,
    source_cidrs: Vec<IpNet>,
    conditions: Vec<Condition>,
}

enum Condition {
    Header {
        name: http::HeaderName,
        op: Operator,
    },
    Claim {
        name: Box<str>,
        op: Operator,
    },
    Method(Operator),
    TimeOfDay {
        start: u32,
        end: u32,
        weekdays: u8,
    },
}

enum Operator {
    Equals(Box<str>),
    In(Vec<Box<str>>),
    Prefix(Box<str>),
}

impl Operator {
    fn holds(&self, value: &str) -> bool {
        match self {
            Operator::Equals(v) => value == &**v,
            Operator::In(vs) => vs.iter().any(|v| value == &**v),
            Operator::Prefix(p) => value.starts_with(&**p),
        }
    }
}

/// Lazily computed role membership for one request.
pub(crate) struct RoleCache {
    known: SmallVec<[u64; 4]>,
    held: SmallVec<[u64; 4]>,
}

impl RoleCache {
    pub fn new(role_count: usize) -> Self {
        let words = role_count.div_ceil(64);
        Self {
            known: smallvec::smallvec![0; words],
            held: smallvec::smallvec![0; words],
        }
    }
}

fn boxed(values: &[String]) -> Vec<Box<str>> {
    values.iter().map(|v| v.as_str().into()).collect()
}

fn compile_claims(claims: &[pb::ClaimMatch]) -> Vec<ClaimMatch> {
    claims
        .iter()
        .map(|c| ClaimMatch {
            name: c.name.as_str().into(),
            values: boxed(&c.values),
        })
        .collect()
}

/// Which credentials a rule can be satisfied with (for 401 versus 403).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Credentials {
    pub jwt: bool,
    pub api_key: bool,
    /// A mesh identity (principals, namespaces).
    pub peer: bool,
}

impl CompiledRole {
    /// Holding the role can depend on the request, not only on the peer
    /// (claims, API-key clients).
    fn needs_request(&self) -> bool {
        !self.claims.is_empty() || !self.api_key_clients.is_empty()
    }

    /// Whether a peer holds the role on identity alone.
    fn held_by_peer(&self, peer: Option<&SpiffeId>) -> bool {
        any_principal(&self.principals, peer) || any_namespace(&self.namespaces, peer)
    }

    pub fn compile(role: &pb::Role) -> Self {
        Self {
            principals: boxed(&role.principals),
            namespaces: boxed(&role.namespaces),
            claims: compile_claims(&role.claims),
            api_key_clients: boxed(&role.api_key_clients),
        }
    }

    fn holds(&self, request: &Request<'_>) -> bool {
        self.held_by_peer(request.peer)
            || self.claims.iter().any(|c| claim_has_value(request, c))
            || self
                .api_key_clients
                .iter()
                .any(|c| request.api_key_client == Some(&**c))
    }
}

impl CompiledRule {
    pub fn compile(rule: &pb::Rule, role_count: usize) -> Result<Self, LoadError> {
        let field = |what: &str| format!("rule {}: {what}", rule.id);
        let mut roles = Vec::with_capacity(rule.roles.len());
        for &r in &rule.roles {
            if r as usize >= role_count {
                return Err(LoadError::new(field(&format!(
                    "role index {r} out of range"
                ))));
            }
            roles.push(r);
        }
        let mut source_cidrs = Vec::with_capacity(rule.source_cidrs.len());
        for c in &rule.source_cidrs {
            source_cidrs.push(parse_cidr(c).map_err(|e| LoadError::new(field(&e)))?);
        }
        let mut conditions = Vec::with_capacity(rule.conditions.len());
        for c in &rule.conditions {
            conditions.push(Condition::compile(c).map_err(|e| LoadError::new(field(&e)))?);
        }
        Ok(Self {
            id: rule.id.as_str().into(),
            roles,
            principals: boxed(&rule.principals),
            namespaces: boxed(&rule.namespaces),
            api_key_clients: boxed(&rule.api_key_clients),
            claims: compile_claims(&rule.claims),
            source_cidrs,
            conditions,
        })
    }

    /// The rule looks at more than the connection: claims, API keys, headers,
    /// the method or the time (directly or through a role). Such a rule
    /// makes its port HTTP.
    pub fn needs_request(&self, roles: &[CompiledRole]) -> bool {
        !self.api_key_clients.is_empty()
            || !self.claims.is_empty()
            || !self.conditions.is_empty()
            || self
                .roles
                .iter()
                .any(|&r| roles[r as usize].needs_request())
    }

    /// What presenting a credential could satisfy in this rule.
    pub fn credentials(&self, roles: &[CompiledRole]) -> Credentials {
        let mut c = Credentials {
            jwt: !self.claims.is_empty()
                || self
                    .conditions
                    .iter()
                    .any(|c| matches!(c, Condition::Claim { .. })),
            api_key: !self.api_key_clients.is_empty(),
            peer: !self.principals.is_empty() || !self.namespaces.is_empty(),
        };
        for &r in &self.roles {
            let role = &roles[r as usize];
            c.jwt |= !role.claims.is_empty();
            c.api_key |= !role.api_key_clients.is_empty();
            c.peer |= !role.principals.is_empty() || !role.namespaces.is_empty();
        }
        c
    }

    /// For an opaque connection, which has a peer and an address but no
    /// request. Ports are opaque only when their rules are identity-level
    /// ([`needs_request`](Self::needs_request) false), so this is exact for
    /// them; a rule that needs a request never admits, and refuses when it
    /// is a deny rule (fail closed).
    pub fn matches_connection(
        &self,
        peer: Option<&SpiffeId>,
        client_ip: IpAddr,
        roles: &[CompiledRole],
        polarity: Polarity,
    ) -> bool {
        if self.needs_request(roles) {
            return polarity == Polarity::Deny;
        }
        (self.roles.is_empty()
            || self
                .roles
                .iter()
                .any(|&r| roles[r as usize].held_by_peer(peer)))
            && self.connection_fields_match(peer, client_ip)
    }

    /// The fields a connection carries: principals, namespaces, source CIDRs.
    fn connection_fields_match(&self, peer: Option<&SpiffeId>, client_ip: IpAddr) -> bool {
        (self.principals.is_empty() || any_principal(&self.principals, peer))
            && (self.namespaces.is_empty() || any_namespace(&self.namespaces, peer))
            && (self.source_cidrs.is_empty()
                || self.source_cidrs.iter().any(|n| n.contains(&client_ip)))
    }

    /// Every set field must match; within a field any entry.
    pub fn matches(
        &self,
        ctx: &mut MatchContext<'_>,
        roles: &[CompiledRole],
        polarity: Polarity,
    ) -> bool {
        let request = ctx.request;
        let peer = request.peer;
        (self.roles.is_empty() || self.roles.iter().any(|&r| holds_role(ctx, roles, r)))
            && self.connection_fields_match(peer, ctx.client_ip)
            && (self.api_key_clients.is_empty()
                || self
                    .api_key_clients
                    .iter()
                    .any(|c| request.api_key_client == Some(&**c)))
            && (self.claims.is_empty() || self.claims.iter().any(|c| claim_has_value(request, c)))
            && self.conditions.iter().all(|c| c.holds(ctx, polarity))
    }
}

/// `peer` is one of `principals` (a trailing `*` matches any suffix).
fn any_principal(principals: &[Box<str>], peer: Option<&SpiffeId>) -> bool {
    peer.is_some_and(|id| principals.iter().any(|p| principal_matches(p, id.as_str())))
}

/// `peer` is in one of `namespaces`.
fn any_namespace(namespaces: &[Box<str>], peer: Option<&SpiffeId>) -> bool {
    peer.is_some_and(|id| namespaces.iter().any(|ns| id.namespace() == &**ns))
}

fn holds_role(ctx: &mut MatchContext<'_>, roles: &[CompiledRole], index: u32) -> bool {
    let i = index as usize;
    let (word, bit) = (i / 64, 1u64 << (i % 64));
    if ctx.roles.known[word] & bit == 0 {
        ctx.roles.known[word] |= bit;
        if roles[i].holds(ctx.request) {
            ctx.roles.held[word] |= bit;
        }
    }
    ctx.roles.held[word] & bit != 0
}

impl Condition {
    fn compile(c: &pb::Condition) -> Result<Self, String> {
        use pb::condition::{Operator as Op, Subject};
        let op = || -> Result<Operator, String> {
            let first = || {
                c.values
                    .first()
                    .map(|v| v.as_str().into())
                    .ok_or_else(|| "condition has no value".to_owned())
            };
            match Op::try_from(c.operator) {
                Ok(Op::Equals) => Ok(Operator::Equals(first()?)),
                Ok(Op::Prefix) => Ok(Operator::Prefix(first()?)),
                Ok(Op::In) if !c.values.is_empty() => Ok(Operator::In(boxed(&c.values))),
                Ok(Op::In) => Err("condition `in` has no values".to_owned()),
                _ => Err(format!("unknown condition operator {}", c.operator)),
            }
        };
        match Subject::try_from(c.subject) {
            Ok(Subject::Header) => Ok(Condition::Header {
                name: http::HeaderName::from_bytes(c.name.as_bytes())
                    .map_err(|_| format!("invalid header name {:?}", c.name))?,
                op: op()?,
            }),
            Ok(Subject::Claim) if !c.name.is_empty() => Ok(Condition::Claim {
                name: c.name.as_str().into(),
                op: op()?,
            }),
            Ok(Subject::Method) => Ok(Condition::Method(op()?)),
            Ok(Subject::TimeOfDay) => {
                if c.start_minute >= 1440 || c.end_minute >= 1440 {
                    return Err("time of day out of range".to_owned());
                }
                let mut weekdays = 0u8;
                for &d in &c.weekdays {
                    if !(1..=7).contains(&d) {
                        return Err(format!("weekday {d} out of range"));
                    }
                    weekdays |= 1 << d;
                }
                Ok(Condition::TimeOfDay {
                    start: c.start_minute,
                    end: c.end_minute,
                    weekdays,
                })
            }
            _ => Err(format!("unknown condition subject {}", c.subject)),
        }
    }

    fn holds(&self, ctx: &MatchContext<'_>, polarity: Polarity) -> bool {
        match self {
            Condition::Header { name, op } => {
                check_values(header_values(ctx.request.headers, name), op, polarity)
            }
            Condition::Claim { name, op } => {
                match ctx.request.jwt_claims.and_then(|c| lookup_claim(c, name)) {
                    Some(value) => check_values(claim_values(value), op, polarity),
                    None => false,
                }
            }
            Condition::Method(op) => op.holds(ctx.request.method.as_str()),
            Condition::TimeOfDay {
                start,
                end,
                weekdays,
            } => {
                let day_ok = *weekdays == 0 || weekdays & (1 << ctx.weekday) != 0;
                let m = ctx.minute_of_day;
                let in_window = if start <= end {
                    *start <= m && m < *end
                } else {
                    m >= *start || m < *end
                };
                day_ok && in_window
            }
        }
    }
}

/// Allow: at least one value, and every value satisfies the operator.
/// Deny: any value satisfies it.
fn check_values<'v>(
    values: impl Iterator<Item = &'v str>,
    op: &Operator,
    polarity: Polarity,
) -> bool {
    match polarity {
        Polarity::Deny => {
            let mut values = values;
            values.any(|v| op.holds(v))
        }
        Polarity::Allow => {
            let mut seen = false;
            for v in values {
                if !op.holds(v) {
                    return false;
                }
                seen = true;
            }
            seen
        }
    }
}

/// Every value of a header: repeated fields and comma-joined lists alike.
/// A value that is not visible ASCII reads as U+0000, which no policy value
/// contains, so it can only make an allow condition fail.
fn header_values<'h>(
    headers: &'h HeaderMap,
    name: &http::HeaderName,
) -> impl Iterator<Item = &'h str> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(str::trim)
}

/// A claim's values: the string itself, or every element of an array.
/// Non-string scalars are compared in their JSON spelling.
fn claim_values(value: &Value) -> impl Iterator<Item = &str> {
    let (single, many): (Option<&Value>, &[Value]) = match value {
        Value::Array(items) => (None, items.as_slice()),
        other => (Some(other), &[]),
    };
    single.into_iter().chain(many.iter()).map(scalar_str)
}

fn scalar_str(value: &Value) -> &str {
    match value {
        Value::String(s) => s,
        Value::Bool(true) => "true",
        Value::Bool(false) => "false",
        // Numbers, null and nested values never equal a configured string:
        // U+0000 cannot appear in a policy value.
        _ => "\u{0}",
    }
}

/// Looks a claim up by its exact name first (names may contain dots, e.g.
/// URLs), then as a dotted path into nested objects.
pub(crate) fn lookup_claim<'c>(claims: &'c Value, name: &str) -> Option<&'c Value> {
    let object = claims.as_object()?;
    if let Some(v) = object.get(name) {
        return Some(v);
    }
    let mut current = claims;
    for part in name.split('.') {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

fn claim_has_value(request: &Request<'_>, m: &ClaimMatch) -> bool {
    request
        .jwt_claims
        .and_then(|c| lookup_claim(c, &m.name))
        .is_some_and(|v| claim_values(v).any(|v| m.values.iter().any(|want| v == &**want)))
}

/// Parses `10.0.0.0/8` or a single address.
pub(crate) fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is not a CIDR or IP address"))
}
