//! One test per semantic rule of DESIGN §4, driven from policy YAML through
//! validation and compilation, as the operator and agent use them.
#![cfg(feature = "crd")]

use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{Value, json};

use super::*;
use crate::compile::{MeshConfig, NoSecrets, Workload, compile_workload};
use crate::documents::load_policies;
use crate::identity::SpiffeId;

const ORDERS_PEER: &str = "spiffe://cluster.local/ns/shop/sa/orders";
/// 2026-11-25 (a Wednesday) 12:00 UTC.
const NOON_WEDNESDAY: i64 = 1_795_608_000;

fn engine_with(yaml: &str, mesh: &MeshConfig) -> PolicyEngine {
    let policies: Vec<_> = load_policies(yaml)
        .expect("yaml")
        .into_iter()
        .map(|p| p.unwrap_or_else(|(l, e)| panic!("{l}: {e}")))
        .collect();
    let workload = Workload {
        namespace: "shop".into(),
        service_account: "api".into(),
        labels: [("app".to_owned(), "api".to_owned())].into(),
        ports: vec![8080, 9090],
    };
    let compiled = compile_workload(&policies, &workload, mesh, &NoSecrets).expect("compile");
    PolicyEngine::load(compiled).expect("load")
}

fn engine(yaml: &str) -> PolicyEngine {
    engine_with(yaml, &MeshConfig::default())
}

/// Wraps route YAML into a policy selecting the test workload.
fn policy(spec: &str) -> String {
    let spec = spec
        .lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: ApiSecurityPolicy\nmetadata:\n  name: p\n  namespace: shop\nspec:\n{spec}\n"
    )
}

/// A request under construction; `decide` runs it.
struct Req {
    method: Method,
    target: String,
    host: Option<String>,
    headers: HeaderMap,
    port: u16,
    peer_addr: IpAddr,
    peer: Option<SpiffeId>,
    claims: Option<Value>,
    api_key: Option<String>,
    credential_error: Option<&'static str>,
    unix: i64,
    monotonic: Duration,
}

fn get(target: &str) -> Req {
    Req {
        method: Method::GET,
        target: target.into(),
        host: None,
        headers: HeaderMap::new(),
        port: 8080,
        peer_addr: "10.1.2.3".parse().unwrap(),
        peer: Some(SpiffeId::parse(ORDERS_PEER).unwrap()),
        claims: None,
        api_key: None,
        credential_error: None,
        unix: NOON_WEDNESDAY,
        monotonic: Duration::from_secs(100),
    }
}

impl Req {
    fn method(mut self, m: &str) -> Self {
        self.method = Method::from_bytes(m.as_bytes()).unwrap();
        self
    }
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        self
    }
    fn host(mut self, h: &str) -> Self {
        self.host = Some(h.into());
        self
    }
    fn plaintext(mut self) -> Self {
        self.peer = None;
        self
    }
    fn peer(mut self, id: &str) -> Self {
        self.peer = Some(SpiffeId::parse(id).unwrap());
        self
    }
    fn claims(mut self, c: Value) -> Self {
        self.claims = Some(c);
        self
    }
    fn api_key(mut self, client: &str) -> Self {
        self.api_key = Some(client.into());
        self
    }
    fn from(mut self, ip: &str) -> Self {
        self.peer_addr = ip.parse().unwrap();
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    fn at(mut self, unix: i64) -> Self {
        self.unix = unix;
        self
    }
    fn after(mut self, d: Duration) -> Self {
        self.monotonic += d;
        self
    }
    fn request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            target: &self.target,
            host: self.host.as_deref(),
            headers: &self.headers,
            port: self.port,
            peer_addr: self.peer_addr,
            peer: self.peer.as_ref(),
            jwt_claims: self.claims.as_ref(),
            api_key_client: self.api_key.as_deref(),
            credential_error: self.credential_error,
            has_body: Request::headers_announce_body(&self.headers),
            time: RequestTime {
                unix_seconds: self.unix,
                monotonic: self.monotonic,
            },
        }
    }
    /// (allowed, status, reason, rule)
    fn decide(&self, e: &PolicyEngine) -> (bool, u16, Reason, Option<String>) {
        let r = self;
        let d = e.decide(&r.request());
        (
            d.verdict.allowed,
            d.verdict.status,
            d.verdict.reason,
            d.verdict.rule.map(String::from),
        )
    }
}

fn allowed(e: &PolicyEngine, r: &Req) -> bool {
    r.decide(e).0
}

// --- secure by default -----------------------------------------------------

#[test]
fn no_policy_admits_authenticated_peers_only() {
    let e = engine("");
    let (ok, _, reason, _) = get("/anything").decide(&e);
    assert!(ok);
    assert_eq!(reason, Reason::DefaultAllAuthenticated);
    // Plaintext under the default strict mTLS is refused.
    let (ok, status, reason, _) = get("/anything").plaintext().decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (401, Reason::MtlsRequired));
}

#[test]
fn mesh_default_deny_refuses_everything_without_allow_rules() {
    let mesh = MeshConfig {
        default_action: pb::DefaultAction::Deny,
        ..MeshConfig::default()
    };
    let e = engine_with("", &mesh);
    let (ok, status, reason, _) = get("/x").decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (403, Reason::DefaultDeny));
}

#[test]
fn permissive_admits_plaintext_connections_but_not_anonymous_requests() {
    let e = engine(&policy(
        "mtls: permissive\nroutes:\n  - rateLimit: {amount: 100, period: 1s}",
    ));
    // Plaintext passes the mTLS step, then the all-authenticated default
    // wants some identity.
    let (ok, status, reason, _) = get("/x").plaintext().decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (401, Reason::Unauthenticated));
    assert!(allowed(
        &e,
        &get("/x").plaintext().claims(json!({"sub": "u"}))
    ));
    // An explicit allow-everyone rule admits anonymous plaintext.
    let e = engine(&policy("mtls: permissive\nroutes:\n  - allow: [{}]"));
    assert!(allowed(&e, &get("/x").plaintext()));
}

#[test]
fn strict_wins_when_policies_disagree_on_mtls() {
    let yaml = format!(
        "{}---\n{}",
        policy("mtls: permissive\nroutes:\n  - allow: [{}]"),
        policy("mtls: strict\nports: [8080]\nroutes:\n  - allow: [{}]")
            .replace("name: p", "name: q")
    );
    let e = engine(&yaml);
    assert_eq!(e.mtls_mode(8080), pb::MtlsMode::Strict);
    assert_eq!(e.mtls_mode(9090), pb::MtlsMode::Permissive);
    assert!(!allowed(&e, &get("/x").plaintext()));
    assert!(allowed(&e, &get("/x").plaintext().port(9090)));
}

// --- deny then allow -------------------------------------------------------

const ADMIN_POLICY: &str = r#"
roles:
  - name: admin
    claims: [{name: roles, values: [admin]}]
  - name: reader
    claims: [{name: roles, values: [reader]}]
routes:
  - name: api
    match: {path: {prefix: /api}}
    allow: [{name: readers, roles: [reader, admin]}]
  - name: api-admin
    match: {path: {exact: /api/admin}}
    allow: [{name: admins, roles: [admin]}]
  - name: internal
    match: {path: {prefix: /api/internal}}
    deny: [{name: everyone}]
  - name: health
    match: {path: {exact: /api/health}}
    rateLimit: {amount: 1000, period: 1s}
"#;

#[test]
fn a_matching_deny_rule_refuses_whatever_allows() {
    let e = engine(&policy(ADMIN_POLICY));
    let (ok, status, reason, rule) = get("/api/internal/x")
        .claims(json!({"roles": ["admin"]}))
        .decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (403, Reason::DenyRule));
    assert_eq!(
        rule.as_deref(),
        Some("shop/p/routes/internal/deny/everyone")
    );
}

#[test]
fn the_most_specific_route_with_allow_rules_decides() {
    let e = engine(&policy(ADMIN_POLICY));
    let reader = json!({"roles": ["reader"]});
    let admin = json!({"roles": ["admin"]});
    assert!(allowed(&e, &get("/api/orders").claims(reader.clone())));
    // The exact route's allow rules replace the prefix's: readers are out.
    let (ok, status, reason, rule) = get("/api/admin").claims(reader).decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (403, Reason::NoAllowMatch));
    assert_eq!(rule.as_deref(), Some("shop/p/routes/api-admin"));
    let (ok, _, _, rule) = get("/api/admin").claims(admin).decide(&e);
    assert!(ok);
    assert_eq!(
        rule.as_deref(),
        Some("shop/p/routes/api-admin/allow/admins")
    );
}

#[test]
fn routes_without_allow_rules_inherit_access_from_the_next_match() {
    let e = engine(&policy(ADMIN_POLICY));
    let r = get("/api/health").claims(json!({"roles": ["reader"]}));
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed);
    assert_eq!(d.route, Some("shop/p/routes/health"));
    assert_eq!(d.verdict.rule, Some("shop/p/routes/api/allow/readers"));
    assert!(!allowed(&e, &get("/api/health")));
}

#[test]
fn with_allow_rules_a_request_matching_no_route_is_refused() {
    let e = engine(&policy(ADMIN_POLICY));
    let (ok, status, reason, rule) = get("/other").decide(&e);
    assert!(!ok);
    assert_eq!((status, reason, rule), (403, Reason::NoAllowMatch, None));
}

#[test]
fn allow_rules_of_one_port_do_not_apply_to_another() {
    let e = engine(&policy(
        "ports: [8080]\nroutes:\n  - allow: [{principals: [\"spiffe://cluster.local/ns/x/sa/y\"]}]",
    ));
    assert!(!allowed(&e, &get("/x")));
    // Port 9090 has no allow rules: the mesh default applies.
    let (ok, _, reason, _) = get("/x").port(9090).decide(&e);
    assert!(ok);
    assert_eq!(reason, Reason::DefaultAllAuthenticated);
}

#[test]
fn status_is_401_without_credentials_and_403_with_insufficient_ones() {
    let yaml = policy(
        r#"authentication:
  jwt: [{issuer: "https://id.example.com", jwksUri: "https://id.example.com/jwks"}]
roles: [{name: admin, claims: [{name: roles, values: [admin]}]}]
routes:
  - allow: [{roles: [admin]}]"#,
    );
    let e = engine(&yaml);
    // A mesh peer without the end-user token the workload asks for: 401.
    assert_eq!(get("/x").decide(&e).1, 401);
    assert_eq!(get("/x").claims(json!({"roles": "user"})).decide(&e).1, 403);
    let mut failed = get("/x");
    failed.credential_error = Some("jwt.expired");
    let (ok, status, reason, _) = failed.decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (401, Reason::AuthenticationFailed));
}

// --- route matching --------------------------------------------------------

#[test]
fn precedence_is_exact_then_template_then_prefix_then_longer() {
    let e = engine(&policy(
        r#"routes:
  - {name: any, allow: [{}]}
  - {name: short, match: {path: {prefix: /a}}, allow: [{}]}
  - {name: long, match: {path: {prefix: /a/b}}, allow: [{}]}
  - {name: tmpl, match: {path: {template: "/a/b/{id}"}}, allow: [{}]}
  - {name: exact, match: {path: {exact: /a/b/c}}, allow: [{}]}"#,
    ));
    let route = |path: &str| e.decide(&get(path).request()).route.map(String::from);
    assert_eq!(route("/a/b/c").as_deref(), Some("shop/p/routes/exact"));
    assert_eq!(route("/a/b/d").as_deref(), Some("shop/p/routes/tmpl"));
    assert_eq!(route("/a/b/d/e").as_deref(), Some("shop/p/routes/long"));
    assert_eq!(route("/a/x").as_deref(), Some("shop/p/routes/short"));
    assert_eq!(route("/ab").as_deref(), Some("shop/p/routes/any"));
}

#[test]
fn methods_headers_and_hosts_narrow_a_route() {
    let e = engine(&policy(
        r#"routes:
  - name: writes
    match:
      path: {prefix: /}
      methods: [POST]
      headers: [{name: X-Version, exact: "2"}]
      hosts: [api.example.com]
    allow: [{}]"#,
    ));
    let ok = get("/x")
        .method("POST")
        .header("x-version", "2")
        .host("API.Example.com.:443");
    assert!(allowed(&e, &ok));
    assert!(!allowed(
        &e,
        &get("/x").header("x-version", "2").host("api.example.com")
    ));
    assert!(!allowed(
        &e,
        &get("/x")
            .method("POST")
            .header("x-version", "3")
            .host("api.example.com")
    ));
    assert!(!allowed(
        &e,
        &get("/x")
            .method("POST")
            .header("x-version", "2")
            .host("evil.com")
    ));
    // A second, different value does not let the route apply.
    let two = get("/x")
        .method("POST")
        .header("x-version", "2")
        .header("x-version", "3")
        .host("api.example.com");
    assert!(!allowed(&e, &two));
}

#[test]
fn query_string_never_takes_part_in_matching() {
    let e = engine(&policy(
        "routes:\n  - {match: {path: {exact: /a}}, allow: [{}]}",
    ));
    let r = get("/a?x=/b");
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed);
    assert_eq!(d.query, Some("x=/b"));
    assert!(!allowed(&e, &get("/b?/a")));
}

// --- one path for everyone -------------------------------------------------

#[test]
fn encoded_spellings_cannot_escape_a_deny_rule() {
    let e = engine(&policy(
        "routes:\n  - {match: {path: {prefix: /admin}}, deny: [{}]}\n  - {allow: [{}]}",
    ));
    for target in [
        "/admin",
        "/admin/users",
        "/x/../admin/users",
        "/%61dmin/users",
        "/%2e/admin",
        "//admin//users",
        "/public/%2e%2E/admin",
        "/./admin/./users",
    ] {
        let r = get(target);
        let d = e.decide(&r.request());
        assert!(!d.verdict.allowed, "{target} was allowed");
        assert!(
            d.normalized_path
                .as_deref()
                .is_none_or(|p| p.starts_with("/admin")),
            "{target}"
        );
    }
    let r = get("/x/../public/%7Eu");
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed);
    assert_eq!(d.normalized_path.as_deref(), Some("/public/~u"));
}

#[test]
fn undecidable_paths_are_refused_with_400() {
    let e = engine(&policy("routes:\n  - {allow: [{}]}"));
    for target in [
        "/a%2fb", "/a%5Cb", "/a\\b", "/a#frag", "relative", "/a%zz", "/a%00",
    ] {
        let (ok, status, reason, _) = get(target).decide(&e);
        assert!(!ok, "{target}");
        assert_eq!((status, reason), (400, Reason::InvalidPath), "{target}");
    }
}

#[test]
fn path_matching_is_case_sensitive() {
    let e = engine(&policy(
        "routes:\n  - {match: {path: {prefix: /admin}}, deny: [{}]}\n  - {allow: [{}]}",
    ));
    assert!(!allowed(&e, &get("/admin")));
    let r = get("/ADMIN");
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed);
    assert_eq!(d.normalized_path.as_deref(), Some("/ADMIN"));
}

#[test]
fn path_parameters_and_overlong_escapes_are_refused_with_their_reason() {
    let e = engine(&policy(
        "routes:\n  - {match: {path: {prefix: /admin}}, deny: [{}]}\n  - {allow: [{}]}",
    ));
    for (target, reason) in [
        ("/admin;x/users", Reason::PathParameter),
        ("/public/..;/admin", Reason::PathParameter),
        ("/%C0%AE%C0%AE/admin", Reason::PathNotUtf8),
    ] {
        let (ok, status, got, _) = get(target).decide(&e);
        assert!(!ok, "{target}");
        assert_eq!((status, got), (400, reason), "{target}");
        assert_eq!(
            reason.as_str(),
            if reason == Reason::PathParameter {
                "request.path_parameter"
            } else {
                "request.path_not_utf8"
            }
        );
    }
    // Opted out: `;` is part of its segment, never a dot segment.
    let e = engine(&policy(
        "http: {pathParameters: allow}\nroutes:\n  - {match: {path: {prefix: /admin}}, deny: [{}]}\n  - {allow: [{}]}",
    ));
    let r = get("/app;jsessionid=1/x");
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed);
    assert_eq!(d.normalized_path.as_deref(), Some("/app;jsessionid=1/x"));
    assert_eq!(get("/public/..;/admin").decide(&e).2, Reason::PathParameter);
}

// --- roles and conditions --------------------------------------------------

#[test]
fn roles_match_principals_namespaces_claims_and_api_key_clients() {
    let e = engine(&policy(
        r#"authentication:
  apiKeys: {keys: [{clientId: acme, sha256: "0000000000000000000000000000000000000000000000000000000000000000"}]}
roles:
  - name: trusted
    principals: ["spiffe://cluster.local/ns/billing/*"]
    namespaces: [ops]
    claims: [{name: realm.groups, values: [staff]}]
    apiKeyClients: [acme]
routes:
  - allow: [{roles: [trusted]}]"#,
    ));
    assert!(allowed(
        &e,
        &get("/").peer("spiffe://cluster.local/ns/billing/sa/x")
    ));
    assert!(allowed(
        &e,
        &get("/").peer("spiffe://cluster.local/ns/ops/sa/y")
    ));
    assert!(allowed(
        &e,
        &get("/").claims(json!({"realm": {"groups": ["users", "staff"]}}))
    ));
    assert!(allowed(&e, &get("/").api_key("acme")));
    assert!(!allowed(
        &e,
        &get("/").peer("spiffe://cluster.local/ns/billingx/sa/x")
    ));
    assert!(!allowed(
        &e,
        &get("/").claims(json!({"realm": {"groups": ["users"]}}))
    ));
    assert!(!allowed(&e, &get("/").api_key("other")));
}

#[test]
fn rule_fields_are_anded_and_list_entries_ored() {
    let e = engine(&policy(
        r#"routes:
  - allow:
      - namespaces: [shop, ops]
        sourceCidrs: [10.0.0.0/8]"#,
    ));
    assert!(allowed(&e, &get("/")));
    assert!(allowed(
        &e,
        &get("/").peer("spiffe://cluster.local/ns/ops/sa/a")
    ));
    assert!(!allowed(&e, &get("/").from("192.168.1.1")));
    assert!(!allowed(
        &e,
        &get("/").peer("spiffe://cluster.local/ns/web/sa/a")
    ));
}

#[test]
fn roles_are_scoped_to_their_policy() {
    let other = policy(
        "roles: [{name: admin, namespaces: [shop]}]\nroutes:\n  - {match: {path: {prefix: /other}}, allow: [{roles: [admin]}]}",
    )
    .replace("name: p\n", "name: q\n");
    let mine = policy(
        "roles: [{name: admin, namespaces: [ops]}]\nroutes:\n  - {match: {path: {prefix: /mine}}, allow: [{roles: [admin]}]}",
    );
    let e = engine(&format!("{mine}---\n{other}"));
    // The shop peer is "admin" only in policy q's sense.
    assert!(allowed(&e, &get("/other")));
    assert!(!allowed(&e, &get("/mine")));
}

#[test]
fn header_conditions_check_every_value() {
    let e = engine(&policy(
        r#"routes:
  - match: {path: {prefix: /t}}
    deny: [{conditions: [{key: "header:x-role", equals: intern}]}]
    allow: [{conditions: [{key: "header:x-tenant", in: [acme, globex]}]}]"#,
    ));
    assert!(allowed(&e, &get("/t").header("x-tenant", "acme")));
    assert!(allowed(&e, &get("/t").header("x-tenant", "acme, globex")));
    // Allow: one value outside the set is enough to fail, comma-joined or repeated.
    assert!(!allowed(&e, &get("/t").header("x-tenant", "acme, initech")));
    assert!(!allowed(
        &e,
        &get("/t")
            .header("x-tenant", "acme")
            .header("x-tenant", "initech")
    ));
    assert!(!allowed(&e, &get("/t")));
    // Deny: any value triggers.
    let r = get("/t")
        .header("x-tenant", "acme")
        .header("x-role", "admin, intern");
    assert_eq!(r.decide(&e).2, Reason::DenyRule);
}

#[test]
fn claim_method_and_prefix_conditions() {
    let e = engine(&policy(
        r#"routes:
  - allow:
      - conditions:
          - {key: "claim:scope", in: [read, write]}
          - {key: method, in: [GET, POST]}
          - {key: "claim:iss", prefix: "https://id."}"#,
    ));
    let claims = json!({"scope": ["read", "write"], "iss": "https://id.example.com"});
    assert!(allowed(&e, &get("/").claims(claims.clone())));
    assert!(!allowed(&e, &get("/").method("DELETE").claims(claims)));
    assert!(!allowed(
        &e,
        &get("/").claims(json!({"scope": ["read", "admin"], "iss": "https://id.x"}))
    ));
    assert!(!allowed(
        &e,
        &get("/").claims(json!({"scope": "read", "iss": "http://id.x"}))
    ));
    assert!(!allowed(
        &e,
        &get("/").claims(json!({"scope": 7, "iss": "https://id.x"}))
    ));
}

#[test]
fn time_of_day_windows_are_utc_end_exclusive_and_may_wrap() {
    let e = engine(&policy(
        r#"routes:
  - match: {path: {prefix: /office}}
    allow: [{conditions: [{timeOfDay: {start: "09:00", end: "17:00", days: [Mon, Tue, Wed, Thu, Fri]}}]}]
  - match: {path: {prefix: /batch}}
    allow: [{conditions: [{timeOfDay: {start: "22:00", end: "02:00"}}]}]"#,
    ));
    let at = |path: &str, t: i64| allowed(&e, &get(path).at(t));
    let h = 3600;
    assert!(at("/office", NOON_WEDNESDAY));
    assert!(at("/office", NOON_WEDNESDAY - 3 * h)); // 09:00
    assert!(!at("/office", NOON_WEDNESDAY + 5 * h)); // 17:00
    assert!(!at("/office", NOON_WEDNESDAY + 3 * 24 * h)); // Saturday noon
    assert!(at("/batch", NOON_WEDNESDAY + 11 * h)); // 23:00
    assert!(at("/batch", NOON_WEDNESDAY + 13 * h)); // 01:00
    assert!(!at("/batch", NOON_WEDNESDAY + 14 * h)); // 02:00
    assert!(!at("/batch", NOON_WEDNESDAY));
}

// --- addresses -------------------------------------------------------------

#[test]
fn ip_filter_uses_the_peer_unless_a_trusted_proxy_forwarded() {
    let e = engine(&policy(
        r#"ipFilter:
  allow: [10.0.0.0/8, 203.0.113.0/24]
  deny: [10.6.6.6]
  trustedProxies: [10.9.0.0/16]
routes:
  - allow: [{}]"#,
    ));
    assert!(allowed(&e, &get("/")));
    let (ok, status, reason, rule) = get("/").from("10.6.6.6").decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (403, Reason::IpFilter));
    assert_eq!(rule.as_deref(), Some("shop/p/ipFilter"));
    assert!(!allowed(&e, &get("/").from("192.0.2.1")));
    // A spoofed header from an untrusted peer is ignored.
    assert!(!allowed(
        &e,
        &get("/")
            .from("192.0.2.1")
            .header("x-forwarded-for", "10.1.1.1")
    ));
    // Through a trusted proxy the forwarded client counts, both ways.
    assert!(allowed(
        &e,
        &get("/")
            .from("10.9.0.1")
            .header("x-forwarded-for", "203.0.113.5")
    ));
    assert!(!allowed(
        &e,
        &get("/")
            .from("10.9.0.1")
            .header("x-forwarded-for", "10.6.6.6")
    ));
    let r = get("/")
        .from("10.9.0.1")
        .header("x-forwarded-for", "6.6.6.6, 203.0.113.5");
    let d = e.decide(&r.request());
    assert_eq!(d.client_ip, "203.0.113.5".parse::<IpAddr>().unwrap());
}

// --- audit mode ------------------------------------------------------------

#[test]
fn audit_mode_policies_report_but_never_block() {
    let enforced = policy("routes:\n  - {allow: [{}]}");
    let audit = policy(
        "mode: audit\nroutes:\n  - {match: {path: {prefix: /admin}}, deny: [{name: nobody}]}",
    )
    .replace("name: p\n", "name: rollout\n");
    let e = engine(&format!("{enforced}---\n{audit}"));
    let r = get("/admin/x");
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed);
    let shadow = d.shadow.expect("shadow verdict");
    assert!(!shadow.allowed);
    assert_eq!(shadow.rule, Some("shop/rollout/routes[0]/deny/nobody"));
    let r = get("/public");
    let d = e.decide(&r.request());
    assert!(d.shadow.is_some_and(|s| s.allowed));
    // Without audit-mode policies there is no shadow verdict at all.
    assert!(
        engine(&enforced)
            .decide(&get("/").request())
            .shadow
            .is_none()
    );
}

#[test]
fn audit_mode_allow_rules_show_what_would_be_refused() {
    let audit = policy("mode: audit\nroutes:\n  - {allow: [{namespaces: [ops]}]}");
    let e = engine(&audit);
    let r = get("/x");
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed, "enforced: mesh default");
    assert_eq!(d.shadow.map(|s| s.reason), Some(Reason::NoAllowMatch));
}

// --- rate limits -----------------------------------------------------------

#[test]
fn every_matching_rate_limit_must_pass() {
    let e = engine(&policy(
        r#"routes:
  - {allow: [{}], rateLimit: {amount: 5, period: 1m, key: principal, algorithm: fixedWindow}}
  - {match: {path: {exact: /login}}, rateLimit: {amount: 2, period: 1m, key: principal, algorithm: fixedWindow}}"#,
    ));
    let results: Vec<_> = (0..3)
        .map(|i| get("/login").after(Duration::from_millis(i)).decide(&e))
        .collect();
    assert!(results[0].0 && results[1].0);
    assert_eq!(results[2].1, 429);
    assert_eq!(results[2].3.as_deref(), Some("shop/p/routes[1]/rateLimit"));
    // Limits are checked most specific first and the refused third request
    // stopped at the narrow one, so the wide limit counted two of five.
    for _ in 0..3 {
        assert!(allowed(&e, &get("/other")));
    }
    let (ok, status, _, rule) = get("/other").decide(&e);
    assert!(!ok);
    assert_eq!(
        (status, rule.as_deref()),
        (429, Some("shop/p/routes[0]/rateLimit"))
    );
}

#[test]
fn rate_limit_report_carries_retry_after() {
    let e = engine(&policy(
        "routes:\n  - {allow: [{}], rateLimit: {amount: 1, period: 10s, key: sourceIp}}",
    ));
    assert!(allowed(&e, &get("/")));
    let r = get("/");
    let d = e.decide(&r.request());
    assert_eq!(d.verdict.status, 429);
    let rl = d.rate_limit.expect("rate-limit state");
    assert!(!rl.outcome.allowed);
    assert_eq!(rl.outcome.limit, 1);
    assert_eq!(rl.outcome.retry_after, Duration::from_secs(10));
    // Another client address has its own bucket.
    assert!(allowed(&e, &get("/").from("10.9.9.9")));
}

#[test]
fn requests_without_the_key_share_one_bucket() {
    let e = engine(&policy(
        "routes:\n  - {allow: [{}], rateLimit: {amount: 2, period: 1m, key: \"header:x-user\", algorithm: fixedWindow}}",
    ));
    assert!(allowed(&e, &get("/").header("x-user", "a")));
    assert!(allowed(&e, &get("/")));
    assert!(allowed(&e, &get("/").from("10.7.7.7")));
    assert!(
        !allowed(&e, &get("/").from("10.8.8.8")),
        "leaving the key out does not escape the limit"
    );
    assert!(allowed(&e, &get("/").header("x-user", "a")));
}

#[test]
fn global_limits_are_left_to_the_agent() {
    let e = engine(&policy(
        "routes:\n  - {allow: [{}], rateLimit: {amount: 1, period: 1m, scope: global, failureMode: open}}",
    ));
    for _ in 0..3 {
        let r = get("/");
        let d = e.decide(&r.request());
        assert!(d.verdict.allowed);
        assert_eq!(d.global_limits.len(), 1);
        assert_eq!(
            d.global_limits[0].failure_mode,
            pb::rate_limit::FailureMode::Open
        );
    }
}

// --- validation, masking, deprecation -------------------------------------

#[test]
fn declared_body_size_and_media_type_are_checked() {
    let e = engine(&policy(
        r#"routes:
  - allow: [{}]
    validation: {maxBodyBytes: 100, contentTypes: [application/json], jsonSchema: {type: object}}
    response: {redact: [/secret]}"#,
    ));
    let post = |len: &str, ct: &str| {
        get("/")
            .method("POST")
            .header("content-length", len)
            .header("content-type", ct)
    };
    let r = post("10", "application/json; charset=utf-8");
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed);
    assert!(
        d.body
            .is_some_and(|b| b.schema.is_some() && b.max_body_bytes == 100)
    );
    assert!(d.response_mask.is_some());
    assert_eq!(post("101", "application/json").decide(&e).1, 413);
    assert_eq!(post("10", "text/plain").decide(&e).1, 415);
    // No body: no media type needed.
    assert!(allowed(&e, &get("/")));
    assert!(allowed(&e, &post("0", "text/plain")));
    // A body announced by the stream alone (HTTP/2 DATA, no length) is
    // checked the same.
    let r = get("/").method("POST").header("content-type", "text/plain");
    let mut req = r.request();
    req.has_body = true;
    assert_eq!(e.decide(&req).verdict.status, 415);
}

#[test]
fn a_json_schema_wants_a_json_body_even_without_a_media_type_list() {
    let e = engine(&policy(
        "routes:\n  - allow: [{}]\n    validation: {jsonSchema: {type: object}}",
    ));
    let post = |ct: &str| {
        get("/")
            .method("POST")
            .header("content-length", "2")
            .header("content-type", ct)
    };
    assert!(allowed(&e, &post("application/json")));
    assert!(allowed(&e, &post("application/merge-patch+json")));
    let (ok, status, reason, _) = post("text/plain").decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (415, Reason::UnsupportedMediaType));
}

#[test]
fn deprecated_routes_announce_and_block_after_sunset() {
    let e = engine(&policy(
        r#"routes:
  - allow: [{}]
  - match: {path: {prefix: /v1}}
    deprecation:
      deprecatedAt: "2026-01-01T00:00:00Z"
      sunset: "2026-12-31T00:00:00Z"
      link: https://docs.example.com/v2
      blockAfterSunset: true"#,
    ));
    let r = get("/v1/orders");
    let d = e.decide(&r.request());
    assert!(d.verdict.allowed);
    let headers: Vec<_> = d
        .response_headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    assert_eq!(
        headers,
        [
            "deprecation: @1767225600",
            "sunset: Thu, 31 Dec 2026 00:00:00 GMT",
            "link: <https://docs.example.com/v2>; rel=\"deprecation\"; type=\"text/html\""
        ]
    );
    let (ok, status, reason, _) = get("/v1/orders").at(1_798_675_200).decide(&e);
    assert!(!ok);
    assert_eq!((status, reason), (410, Reason::Sunset));
    assert!(
        e.decide(&get("/v2/orders").request())
            .response_headers
            .is_empty()
    );
}

#[test]
fn load_refuses_a_broken_wire_policy() {
    let mut p = pb::WorkloadPolicy {
        routes: vec![pb::Route {
            id: "r".into(),
            allow: vec![pb::Rule {
                id: "x".into(),
                source_cidrs: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = PolicyEngine::load(p.clone()).unwrap_err();
    assert!(err.to_string().contains("10.0.0.0/33"), "{err}");
    p.routes[0].allow[0].source_cidrs.clear();
    p.routes[0].allow[0].roles = vec![3];
    assert!(
        PolicyEngine::load(p.clone())
            .unwrap_err()
            .to_string()
            .contains("role index 3")
    );
    p.routes[0].allow[0].roles.clear();
    p.routes[0].rate_limit = Some(pb::RateLimit {
        id: "rl".into(),
        algorithm: 99,
        ..Default::default()
    });
    assert!(
        PolicyEngine::load(p)
            .unwrap_err()
            .to_string()
            .contains("unknown algorithm")
    );
}

#[test]
fn an_extra_header_value_cannot_switch_off_a_deny_route() {
    let e = engine(&policy(
        r#"routes:
  - name: beta
    match: {path: {prefix: /beta}, headers: [{name: x-env, exact: staging}]}
    deny: [{name: all}]
  - name: beta-open
    match: {path: {prefix: /beta}}
    allow: [{name: any}]"#,
    ));
    assert_eq!(
        get("/beta/x").header("x-env", "staging").decide(&e).2,
        Reason::DenyRule
    );
    assert_eq!(
        get("/beta/x")
            .header("x-env", "staging")
            .header("x-env", "prod")
            .decide(&e)
            .2,
        Reason::DenyRule
    );
    assert_eq!(
        get("/beta/x").header("x-env", "staging, prod").decide(&e).2,
        Reason::DenyRule
    );
    assert!(allowed(&e, &get("/beta/x").header("x-env", "prod")));
}

#[test]
fn an_extra_header_value_cannot_select_an_allowing_route() {
    let e = engine(&policy(
        r#"routes:
  - name: internal
    match: {path: {prefix: /}, headers: [{name: x-internal, exact: "yes"}]}
    allow: [{name: any}]
  - name: rest
    allow: [{name: ops, namespaces: [ops]}]"#,
    ));
    assert!(allowed(&e, &get("/x").header("x-internal", "yes")));
    // "yes" among other values is a loose match only: access falls to `rest`.
    let (ok, _, _, rule) = get("/x").header("x-internal", "yes, no").decide(&e);
    assert!(!ok);
    assert_eq!(rule.as_deref(), Some("shop/p/routes/rest"));
}

#[test]
fn audit_mode_authentication_does_not_change_enforcement() {
    let enforced = policy("routes:\n  - {allow: [{namespaces: [web]}]}");
    let audit = policy(
        "mode: audit\nauthentication:\n  jwt: [{issuer: \"https://id.example.com\", jwksUri: \"https://id.example.com/jwks\"}]\nroutes:\n  - {rateLimit: {amount: 5, period: 1s}}",
    )
    .replace("name: p\n", "name: rollout\n");
    let e = engine(&format!("{enforced}---\n{audit}"));
    assert!(e.policy().jwt_providers.is_empty());
    assert_eq!(get("/x").decide(&e).1, 403);
    // The reported route is an enforced one.
    let e = engine(&format!(
        "{}---\n{audit}",
        policy("routes:\n  - {name: all, allow: [{}]}")
    ));
    let r = get("/x");
    assert_eq!(e.decide(&r.request()).route, Some("shop/p/routes/all"));
}

mod never_panics {
    use proptest::prelude::*;

    use super::*;

    fn full_engine() -> PolicyEngine {
        engine(&policy(
            r#"mtls: permissive
ipFilter: {trustedProxies: [10.0.0.0/8], deny: [192.0.2.0/24]}
roles: [{name: r, claims: [{name: a.b, values: [x]}]}]
routes:
  - match: {path: {template: "/o/{id}/x"}, headers: [{name: x-h, prefix: p}], hosts: [a.example]}
    allow: [{roles: [r], conditions: [{key: "header:x-t", in: [a]}, {key: "claim:c", prefix: p}]}]
    rateLimit: {amount: 3, period: 1s, key: "header:x-k"}
    validation: {maxBodyBytes: 10, contentTypes: [application/json]}
  - match: {path: {prefix: /admin}}
    deny: [{conditions: [{timeOfDay: {start: "22:00", end: "06:00"}}]}]
  - allow: [{sourceCidrs: [10.0.0.0/8]}]
    rateLimit: {amount: 2, period: 1s, key: sourceIp, algorithm: slidingWindow}"#,
        ))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever a peer sends, `decide` answers and refusals carry a 4xx.
        #[test]
        fn decide_answers_anything(
            target in "[/a-zA-Z0-9%.\\\\?#;:@!$&'()*+,=~_-]{0,40}",
            method in "[A-Za-z]{1,8}",
            values in proptest::collection::vec(("(x-h|x-t|x-k|x-forwarded-for|content-length|content-type|host|transfer-encoding)", "[ -~]{0,20}"), 0..6),
            claim in "[ -~]{0,10}",
            unix in any::<i64>(),
            mono in any::<u64>(),
            peer_ip in any::<[u8; 4]>(),
        ) {
            let e = full_engine();
            let mut r = get("/");
            r.target = target;
            r.method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
            for (name, value) in values {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    r.headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), v);
                }
            }
            r.claims = Some(json!({"a": {"b": claim.clone()}, "c": claim}));
            r.unix = unix;
            r.monotonic = Duration::from_nanos(mono);
            r.peer_addr = IpAddr::from(peer_ip);
            let d = e.decide(&r.request());
            if d.verdict.allowed {
                prop_assert_eq!(d.verdict.status, 200);
                prop_assert!(d.normalized_path.is_some());
            } else {
                prop_assert!((400..500).contains(&d.verdict.status));
            }
        }
    }
}

// --- port protocols and opaque connections ---------------------------------

const WEB_PEER: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn conn<'a>(peer: Option<&'a SpiffeId>, port: u16, ip: &str) -> Connection<'a> {
    Connection {
        port,
        peer_addr: ip.parse().unwrap(),
        peer,
    }
}

#[test]
fn a_port_is_opaque_only_when_declared_tcp_and_given_no_http_rules() {
    let db = |routes: &str| {
        policy(&format!(
            "ports: [8080, {{port: 9090, protocol: tcp}}]\nroutes:\n{routes}"
        ))
    };
    let e = engine(&db(
        "  - allow: [{principals: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]",
    ));
    assert_eq!(e.port_protocol(9090), pb::PortProtocol::Tcp);
    assert_eq!(e.port_protocol(8080), pb::PortProtocol::Unspecified);
    assert_eq!(e.http_route_for(9090), None);

    // Another policy with HTTP routes for every port makes the tcp port
    // HTTP: declaring tcp never switches a rule off.
    let yaml = format!(
        "{}---\n{}",
        db("  - allow: [{}]"),
        policy("routes:\n  - {match: {path: {prefix: /admin}}, deny: [{}]}")
            .replace("name: p", "name: web")
    );
    let e = engine(&yaml);
    assert_eq!(e.port_protocol(9090), pb::PortProtocol::Http);
    assert_eq!(e.http_route_for(9090), Some("shop/web/routes[0]"));
    // The same HTTP route limited to 8080 leaves 9090 opaque; an audit-mode
    // one never changes what is enforced, nor how a port is read.
    let yaml = format!(
        "{}---\n{}---\n{}",
        db("  - allow: [{}]"),
        policy("ports: [8080]\nroutes:\n  - {match: {path: {prefix: /admin}}, deny: [{}]}")
            .replace("name: p", "name: web"),
        policy("mode: audit\nroutes:\n  - {match: {path: {prefix: /x}}, deny: [{}]}")
            .replace("name: p", "name: shadow")
    );
    let e = engine(&yaml);
    assert_eq!(e.port_protocol(9090), pb::PortProtocol::Tcp);
    assert_eq!(e.port_protocol(8080), pb::PortProtocol::Http);
    // A policy that declares http wins over another's tcp.
    let yaml = format!(
        "{}---\n{}",
        db("  - allow: [{}]"),
        policy("ports: [{port: 9090, protocol: grpc}]").replace("name: p", "name: q")
    );
    assert_eq!(engine(&yaml).port_protocol(9090), pb::PortProtocol::Grpc);
}

#[test]
fn opaque_connections_meet_the_same_filters_and_identity_rules() {
    let e = engine(&policy(
        r#"ports: [{port: 9090, protocol: tcp}]
mtls: permissive
ipFilter: {deny: [192.0.2.0/24]}
roles: [{name: shop, namespaces: [shop]}]
routes:
  - deny: [{name: other, principals: ["spiffe://cluster.local/ns/shop/sa/other"]}]
    allow:
      - {name: web, principals: ["spiffe://cluster.local/ns/shop/sa/web"], sourceCidrs: [10.0.0.0/8]}
      - {name: shop-role, roles: [shop], sourceCidrs: [172.16.0.0/12]}"#,
    ));
    let web = SpiffeId::parse(WEB_PEER).unwrap();
    let orders = SpiffeId::parse(ORDERS_PEER).unwrap();
    let other = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/other").unwrap();
    let decide = |c: Connection<'_>| {
        let d = e.authorize_connection(&c);
        (
            d.verdict.allowed,
            d.verdict.status,
            d.verdict.reason,
            d.verdict.rule.map(String::from),
        )
    };
    assert_eq!(
        decide(conn(Some(&web), 9090, "10.1.1.1")),
        (
            true,
            200,
            Reason::Allowed,
            Some("shop/p/routes[0]/allow/web".into())
        )
    );
    // The rule needs both the identity and the address.
    assert_eq!(
        decide(conn(Some(&web), 9090, "192.168.1.1")).2,
        Reason::NoAllowMatch
    );
    assert_eq!(
        decide(conn(Some(&orders), 9090, "172.16.0.1")).3.as_deref(),
        Some("shop/p/routes[0]/allow/shop-role")
    );
    assert_eq!(
        decide(conn(Some(&other), 9090, "10.1.1.1")).2,
        Reason::DenyRule
    );
    assert_eq!(
        decide(conn(Some(&web), 9090, "192.0.2.7")).2,
        Reason::IpFilter
    );
    // Plaintext is refused even on a permissive port: nothing else to go by.
    assert_eq!(
        decide(conn(None, 9090, "10.1.1.1")),
        (false, 401, Reason::MtlsRequired, None)
    );

    // Without allow rules the mesh default decides; `deny` refuses all.
    let e = engine(&policy("ports: [{port: 9090, protocol: tcp}]"));
    assert!(
        e.authorize_connection(&conn(Some(&web), 9090, "10.0.0.1"))
            .verdict
            .allowed
    );
    let mesh = MeshConfig {
        default_action: pb::DefaultAction::Deny,
        ..MeshConfig::default()
    };
    let e = engine_with(&policy("ports: [{port: 9090, protocol: tcp}]"), &mesh);
    assert_eq!(
        e.authorize_connection(&conn(Some(&web), 9090, "10.0.0.1"))
            .verdict
            .reason,
        Reason::DefaultDeny
    );
}

#[test]
fn an_audit_policy_reports_what_it_would_do_to_a_connection() {
    let yaml = format!(
        "{}---\n{}",
        policy("ports: [{port: 9090, protocol: tcp}]"),
        policy("mode: audit\nports: [9090]\nroutes:\n  - deny: [{namespaces: [shop]}]")
            .replace("name: p", "name: shadow")
    );
    let e = engine(&yaml);
    let web = SpiffeId::parse(WEB_PEER).unwrap();
    let d = e.authorize_connection(&conn(Some(&web), 9090, "10.0.0.1"));
    assert!(d.verdict.allowed);
    let shadow = d.shadow.expect("an audit layer");
    assert!(!shadow.allowed);
    assert_eq!(shadow.reason, Reason::DenyRule);
}

// --- 401 or 403 --------------------------------------------------------------

#[test]
fn a_verified_peer_refused_by_identity_rules_gets_403_even_where_jwts_are_accepted() {
    let yaml = policy(
        r#"mtls: permissive
authentication:
  jwt: [{issuer: "https://id.example.com", jwksUri: "https://id.example.com/jwks"}]
  apiKeys: {keys: [{clientId: partner, sha256: "0000000000000000000000000000000000000000000000000000000000000000"}]}
routes:
  - match: {path: {prefix: /internal}}
    allow: [{principals: ["spiffe://cluster.local/ns/shop/sa/web"]}]
  - match: {path: {prefix: /claims}}
    allow: [{claims: [{name: roles, values: [admin]}]}]
  - match: {path: {prefix: /partners}}
    allow: [{apiKeyClients: [partner]}]"#,
    );
    let e = engine(&yaml);
    // No credential can satisfy "be web": 403 for a verified peer.
    assert_eq!(get("/internal/x").decide(&e).1, 403);
    // Without any identity a mesh certificate could change it: 401.
    assert_eq!(get("/internal/x").plaintext().decide(&e).1, 401);
    // A JWT could change it: 401 without one, 403 with the wrong claims.
    assert_eq!(get("/claims/x").decide(&e).1, 401);
    assert_eq!(
        get("/claims/x")
            .claims(json!({"roles": ["user"]}))
            .decide(&e)
            .1,
        403
    );
    // An API key could change it, though a JWT was presented.
    assert_eq!(
        get("/partners/x").claims(json!({"sub": "u"})).decide(&e).1,
        401
    );
    assert_eq!(get("/partners/x").api_key("other").decide(&e).1, 403);

    // Claims a workload cannot verify (no JWT provider): nothing to present.
    let e = engine(&policy(
        "routes:\n  - allow: [{claims: [{name: roles, values: [admin]}]}]",
    ));
    assert_eq!(get("/x").decide(&e).1, 403);
}

// --- policy pushes -------------------------------------------------------------

#[test]
fn local_rate_limit_state_survives_a_push_that_does_not_change_the_limit() {
    let limited = |amount: u32, extra: &str| {
        policy(&format!(
            "routes:\n  - name: api\n    allow: [{{}}]\n    rateLimit: {{amount: {amount}, period: 1m, key: principal}}{extra}"
        ))
    };
    let first = engine(&limited(2, ""));
    assert!(allowed(&first, &get("/x")));
    assert!(allowed(&first, &get("/x")));
    assert!(!allowed(&first, &get("/x")));

    let compile = |yaml: &str| {
        let policies: Vec<_> = load_policies(yaml)
            .unwrap()
            .into_iter()
            .map(|p| p.unwrap())
            .collect();
        let workload = Workload {
            namespace: "shop".into(),
            service_account: "api".into(),
            ..Workload::default()
        };
        compile_workload(&policies, &workload, &MeshConfig::default(), &NoSecrets).unwrap()
    };
    // Another route added, this limit unchanged: the spent budget stays spent.
    let pushed = PolicyEngine::load_after(
        compile(&limited(
            2,
            "\n  - {match: {path: {prefix: /other}}, allow: [{}]}",
        )),
        Some(&first),
    )
    .unwrap();
    assert_ne!(pushed.version(), first.version());
    assert!(!allowed(&pushed, &get("/x")));
    // The limit's settings changed: a new limit, a new budget.
    let changed = PolicyEngine::load_after(compile(&limited(3, "")), Some(&pushed)).unwrap();
    assert!(allowed(&changed, &get("/x")));
    // Loaded without the previous version: fresh state (the old behaviour).
    let fresh = PolicyEngine::load(compile(&limited(2, ""))).unwrap();
    assert!(allowed(&fresh, &get("/x")));
}

#[test]
fn reauthorize_repeats_authorization_without_charging_limits() {
    let e = engine(&policy(
        r#"routes:
  - match: {path: {prefix: /ws}}
    allow: [{principals: ["spiffe://cluster.local/ns/shop/sa/orders"]}]
    rateLimit: {amount: 1, period: 1m, key: principal}"#,
    ));
    assert!(allowed(&e, &get("/ws/chat")));
    for _ in 0..3 {
        assert!(e.reauthorize(&get("/ws/chat").request()).allowed);
    }
    assert_eq!(
        e.reauthorize(&get("/ws/chat").peer(WEB_PEER).request())
            .reason,
        Reason::NoAllowMatch
    );
    // The budget reauthorize never touched is still spent by the one request.
    assert!(!allowed(&e, &get("/ws/chat")));
}
