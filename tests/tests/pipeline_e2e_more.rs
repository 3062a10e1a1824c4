//! More request-pipeline features seen from outside, through the real
//! `palisade-agent run` and policies compiled by the real `palisadectl`
//! (same harness as `pipeline_e2e.rs`, `fixtures/mod.rs`):
//!
//! - the IP filter on the real TCP peer address, and `X-Forwarded-For`
//!   believed only from `trustedProxies` (policy.md §11);
//! - `mode: audit` policies: served anyway, reported as `shadow_reason` in
//!   the `palisade::audit` records; enforced denials recorded without the
//!   query (policy.md §12, agent-admin-and-audit.md);
//! - EdDSA (Ed25519) JWTs from an inline JWKS and from a JWKS server, and a
//!   JWKS that cannot be fetched failing closed (authentication.md);
//! - rate-limit keys `header:<name>` and `claim:<name>`, and the one shared
//!   bucket of requests lacking the key (policy.md §9);
//! - `mtls: permissive` serving plaintext clients (without an XFCC) while
//!   `strict` refuses them (policy.md §2, `spec.mtls`).
//!
//! Every "allowed" assertion also checks that the app saw the request, and
//! every "denied" one that it did not.

mod fixtures;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fixtures::{
    AUDIT_LOG, JwksServer, Req, Setup, WEB, assert_denied, assert_ok, bounded, deny_request_id,
    send_plaintext, setup_with, unix_now,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use palisade_e2e::log_field;
use serde_json::{Value, json};

/// Every agent of this file writes its audit records.
async fn setup(policy: &str, vars: &[(&str, &str)]) -> Setup {
    setup_with(policy, vars, AUDIT_LOG).await
}

// --- 1. IP filter ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_filter_sees_the_real_peer_and_trusts_xff_only_from_trusted_proxies() {
    bounded("the IP-filter scenario", 25, ip_filter_scenario()).await;
}

async fn ip_filter_scenario() {
    let ipfilter =
        |f: &'static str| async move { setup("ipfilter.yaml", &[("IPFILTER", f)]).await };
    let (deny_loopback, allow_other, allow_loopback, trusted, untrusted) = tokio::join!(
        ipfilter("{deny: [127.0.0.0/8]}"),
        ipfilter("{allow: [10.0.0.0/8]}"),
        ipfilter("{allow: [127.0.0.1]}"),
        ipfilter("{trustedProxies: [127.0.0.1], allow: [198.51.100.0/24], deny: [198.51.100.66]}"),
        ipfilter("{allow: [198.51.100.0/24]}"),
    );
    let web = deny_loopback.pki.client(WEB);
    let client = |s: &Setup| s.pki.client(WEB);

    // The TCP peer is 127.0.0.1: denied by the deny list, before the route
    // (which admits anyone) is looked at.
    let r = deny_loopback.send(&web, Req::get("/items/1")).await;
    assert_denied(&r, 403, "forbidden", "peer 127.0.0.1 in deny 127.0.0.0/8");
    assert!(
        deny_loopback.backend.seen().is_empty(),
        "the app saw nothing"
    );

    // An allow list without 127.0.0.1.
    let r = allow_other
        .send(&client(&allow_other), Req::get("/items/1"))
        .await;
    assert_denied(
        &r,
        403,
        "forbidden",
        "peer 127.0.0.1 not in allow 10.0.0.0/8",
    );
    // XFF is ignored without trusted proxies, even naming an allowed address.
    let r = allow_other
        .send(
            &client(&allow_other),
            Req::get("/items/1").header("x-forwarded-for", "10.1.2.3"),
        )
        .await;
    assert_denied(
        &r,
        403,
        "forbidden",
        "spoofed XFF 10.1.2.3 from an untrusted peer",
    );
    assert!(allow_other.backend.seen().is_empty(), "the app saw nothing");

    // An allow list with 127.0.0.1.
    let r = allow_loopback
        .send(&client(&allow_loopback), Req::get("/items/1"))
        .await;
    assert_ok(&r, "peer 127.0.0.1 in allow [127.0.0.1]");
    assert_eq!(allow_loopback.backend.seen_under("/items/1").len(), 1);

    // 127.0.0.1 is a trusted proxy: the client is the XFF's last address.
    let c = client(&trusted);
    let r = trusted
        .send(
            &c,
            Req::get("/xff/allowed").header("x-forwarded-for", "198.51.100.7"),
        )
        .await;
    assert_ok(&r, "trusted XFF naming an allowed address");
    let r = trusted
        .send(
            &c,
            Req::get("/xff/denied").header("x-forwarded-for", "198.51.100.66"),
        )
        .await;
    assert_denied(&r, 403, "forbidden", "trusted XFF naming a denied address");
    // Walked from the right: the nearest untrusted hop counts, not the
    // leftmost entry a client could have written.
    let r = trusted
        .send(
            &c,
            Req::get("/xff/denied-right").header("x-forwarded-for", "198.51.100.7, 198.51.100.66"),
        )
        .await;
    assert_denied(
        &r,
        403,
        "forbidden",
        "the rightmost untrusted hop is denied",
    );
    let r = trusted
        .send(
            &c,
            Req::get("/xff/allowed-right").header("x-forwarded-for", "203.0.113.9, 198.51.100.8"),
        )
        .await;
    assert_ok(&r, "the rightmost untrusted hop is allowed");
    let r = trusted
        .send(
            &c,
            Req::get("/xff/trusted-hop").header("x-forwarded-for", "198.51.100.9, 127.0.0.1"),
        )
        .await;
    assert_ok(&r, "a trusted hop is skipped");
    // No XFF: the client is the proxy itself, 127.0.0.1, not in the allow list.
    let r = trusted.send(&c, Req::get("/xff/none")).await;
    assert_denied(
        &r,
        403,
        "forbidden",
        "no XFF: the peer 127.0.0.1 is the client",
    );
    assert_eq!(
        trusted
            .backend
            .seen()
            .iter()
            .map(|s| s.target.as_str())
            .collect::<Vec<_>>(),
        ["/xff/allowed", "/xff/allowed-right", "/xff/trusted-hop"],
        "exactly the admitted requests reached the app"
    );

    // 127.0.0.1 is NOT trusted: a spoofed XFF naming an allowed address is
    // ignored; the client stays 127.0.0.1, outside the allow list.
    let c = client(&untrusted);
    for xff in ["198.51.100.7", "198.51.100.7, 198.51.100.8"] {
        let r = untrusted
            .send(&c, Req::get("/spoofed").header("x-forwarded-for", xff))
            .await;
        assert_denied(&r, 403, "forbidden", &format!("untrusted peer, XFF {xff}"));
    }
    assert!(untrusted.backend.seen().is_empty(), "the app saw nothing");

    // The refusals are the IP filter's, recorded as such.
    for s in [&deny_loopback, &allow_other, &untrusted] {
        let lines = s.audit_lines();
        assert!(
            !lines.is_empty()
                && lines
                    .iter()
                    .all(|l| log_field(l, "reason").as_deref() == Some("ipfilter.denied")),
            "every refusal is ipfilter.denied:\n{}",
            s.log()
        );
    }
}

// --- 2. audit mode -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_serves_and_reports_and_denials_are_audited_without_query() {
    bounded("the audit scenario", 25, audit_scenario()).await;
}

async fn audit_scenario() {
    let s = setup("audit_mode.yaml", &[]).await;
    let web = s.pki.client(WEB);

    // Denied by the audit-mode policy only: still served.
    let r = s
        .send(
            &web,
            Req::new("PUT", "/catalog/items/1")
                .header("content-type", "application/json")
                .body(r#"{"n":1}"#),
        )
        .await;
    assert_ok(&r, "a write the audit-mode policy would deny");
    let seen = s.backend.seen_under("/catalog/items/1");
    assert_eq!(seen.len(), 1, "the app saw the write");
    assert_eq!(seen[0].method, "PUT");
    let rid = seen[0]
        .header("x-request-id")
        .expect("the app got an x-request-id")
        .to_owned();
    let line = s.audit_record(&rid).await;
    assert_eq!(
        log_field(&line, "decision").as_deref(),
        Some("allow"),
        "{line}"
    );
    assert_eq!(log_field(&line, "status").as_deref(), Some("200"), "{line}");
    assert_eq!(
        log_field(&line, "shadow_reason").as_deref(),
        Some("authz.deny_rule"),
        "the audit-mode deny rule is reported: {line}"
    );

    // A read the audit policy does not object to: sampled (100 %), no shadow.
    let r = s.send(&web, Req::get("/catalog/items/2")).await;
    assert_ok(&r, "a read");
    let seen = s.backend.seen_under("/catalog/items/2");
    assert_eq!(seen.len(), 1);
    let rid = seen[0].header("x-request-id").unwrap().to_owned();
    let line = s.audit_record(&rid).await;
    assert_eq!(
        log_field(&line, "decision").as_deref(),
        Some("allow"),
        "{line}"
    );
    assert_eq!(log_field(&line, "shadow_reason"), None, "{line}");

    // An enforced denial, with a secret in the query.
    const SECRET: &str = "s3cr3t-e2e-0b5f";
    let r = s
        .send(&web, Req::get(&format!("/secret/x?token={SECRET}&a=b")))
        .await;
    assert_denied(&r, 403, "forbidden", "the enforced deny rule");
    assert!(
        s.backend.seen_under("/secret").is_empty(),
        "the app saw nothing"
    );
    let rid = deny_request_id(&r);
    let line = s.audit_record(&rid).await;
    assert_eq!(
        log_field(&line, "decision").as_deref(),
        Some("deny"),
        "{line}"
    );
    assert_eq!(log_field(&line, "status").as_deref(), Some("403"), "{line}");
    assert_eq!(
        log_field(&line, "reason").as_deref(),
        Some("authz.deny_rule"),
        "{line}"
    );
    assert_eq!(
        log_field(&line, "rule").as_deref(),
        Some("shop/catalog/routes/secret/deny/everyone"),
        "{line}"
    );
    assert_eq!(
        log_field(&line, "path").as_deref(),
        Some("/secret/x"),
        "{line}"
    );
    let log = s.log();
    assert!(
        !log.contains(SECRET) && !log.contains("token="),
        "the query string appears in the agent's log:\n{log}"
    );
}

// --- 3. EdDSA JWTs ----------------------------------------------------------------

/// An Ed25519 signing key and its public JWK.
struct EdKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl EdKey {
    fn new(kid: &str) -> Self {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let encoding = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 32, "an Ed25519 public key");
        let jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(raw),
        });
        Self {
            kid: kid.to_owned(),
            encoding,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    /// Signs with this key's private half under `other`'s kid.
    fn sign_as(&self, other: &EdKey, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(other.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn jwks(keys: &[&EdKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// Claims of a token for `issuer`, distinct each time (`jti`), plus `extra`.
fn claims(issuer: &str, extra: Value) -> Value {
    static JTI: AtomicUsize = AtomicUsize::new(0);
    let now = unix_now();
    let mut c = json!({
        "iss": issuer,
        "aud": "orders",
        "sub": "user-1",
        "iat": now,
        "exp": now + 600,
        "jti": format!("t{}", JTI.fetch_add(1, Ordering::SeqCst)),
    });
    if let Value::Object(extra) = extra {
        c.as_object_mut().unwrap().extend(extra);
    }
    c
}

const INLINE: &str = "https://inline.palisade.test";
const SERVED: &str = "https://served.palisade.test";
const DOWN: &str = "https://down.palisade.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_jwts_inline_and_served_and_an_unreachable_jwks_fails_closed() {
    bounded("the EdDSA scenario", 25, eddsa_scenario()).await;
}

async fn eddsa_scenario() {
    let inline = EdKey::new("ed-inline");
    let served = EdKey::new("ed-served");
    let down = EdKey::new("ed-down");
    let stranger = EdKey::new("ed-stranger");
    let jwks_server = JwksServer::start(jwks(&[&served])).await;
    // Nothing listens there (the listener is closed at once).
    let dead = palisade_e2e::free_port();
    let s = setup(
        "jwt_eddsa.yaml",
        &[
            ("INLINE_JWKS", &jwks(&[&inline])),
            ("JWKS_URI", &jwks_server.uri()),
            ("DEAD_JWKS_URI", &format!("http://{dead}/jwks.json")),
        ],
    )
    .await;
    let web = s.pki.client(WEB);
    let get = |target: &str, token: &str| Req::get(target).bearer(token);

    let r = s
        .send(
            &web,
            get("/orders/inline", &inline.sign(&claims(INLINE, json!({})))),
        )
        .await;
    assert_ok(&r, "EdDSA token, key from the inline JWKS");
    let r = s
        .send(
            &web,
            get("/orders/served", &served.sign(&claims(SERVED, json!({})))),
        )
        .await;
    assert_ok(&r, "EdDSA token, key from the JWKS server");
    assert_eq!(jwks_server.hits(), 1, "the JWKS was fetched once");

    // Tokens that must not verify.
    let refused = [
        (
            "inline kid, signed by another Ed25519 key",
            stranger.sign_as(&inline, &claims(INLINE, json!({}))),
        ),
        (
            "served kid, signed by another Ed25519 key",
            stranger.sign_as(&served, &claims(SERVED, json!({}))),
        ),
        (
            "the inline key for the served issuer",
            inline.sign_as(&served, &claims(SERVED, json!({}))),
        ),
        (
            "wrong audience",
            inline.sign(&claims(INLINE, json!({"aud": "billing"}))),
        ),
        ("no token", String::new()),
    ];
    for (what, token) in &refused {
        let req = if token.is_empty() {
            Req::get("/orders/refused")
        } else {
            get("/orders/refused", token)
        };
        let r = s.send(&web, req).await;
        assert_denied(&r, 401, "unauthorized", what);
    }

    // The JWKS of this issuer cannot be fetched: fail closed, every time
    // (also after the retry interval would allow a new fetch).
    for i in 0..3 {
        let r = s
            .send(
                &web,
                get("/orders/down", &down.sign(&claims(DOWN, json!({})))),
            )
            .await;
        assert_denied(&r, 401, "unauthorized", &format!("unreachable JWKS #{i}"));
        let line = s.audit_record(&deny_request_id(&r)).await;
        assert_eq!(
            log_field(&line, "reason").as_deref(),
            Some("authn.failed"),
            "refused as a failed credential, not as a missing one: {line}"
        );
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(5200)).await;
        }
    }
    // The other issuers are unaffected.
    let r = s
        .send(
            &web,
            get("/orders/inline", &inline.sign(&claims(INLINE, json!({})))),
        )
        .await;
    assert_ok(&r, "the inline issuer after the failures");

    assert_eq!(
        s.backend
            .seen()
            .iter()
            .map(|s| s.target.as_str())
            .collect::<Vec<_>>(),
        ["/orders/inline", "/orders/served", "/orders/inline"],
        "exactly the admitted requests reached the app"
    );
}

// --- 4. rate-limit keys -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_keyed_by_header_and_claim() {
    bounded("the keyed rate-limit scenario", 25, keyed_limit_scenario()).await;
}

async fn keyed_limit_scenario() {
    let key = EdKey::new("ed-inline");
    let s = setup("ratelimit_keys.yaml", &[("INLINE_JWKS", &jwks(&[&key]))]).await;
    let web = s.pki.client(WEB);
    let other = s.pki.client(fixtures::OTHER);

    // --- header:X-Client, 2 per hour per value.
    let with = |value: Option<&str>| {
        let req = Req::get("/by-header");
        match value {
            Some(v) => req.header("x-client", v),
            None => req,
        }
    };
    let mut admitted = 0;
    for (i, (client, value)) in [(&web, "alpha"), (&other, "alpha")].into_iter().enumerate() {
        // Two different mTLS clients, the same header value: one budget.
        let r = s.send(client, with(Some(value))).await;
        assert_ok(&r, &format!("alpha #{i}"));
        assert_eq!(r.header("ratelimit-limit"), Some("2"), "{r}");
        assert_eq!(
            r.header("ratelimit-remaining"),
            Some((1 - i).to_string().as_str()),
            "{r}"
        );
        admitted += 1;
    }
    let r = s.send(&web, with(Some("alpha"))).await;
    assert_denied(&r, 429, "too_many_requests", "alpha's third request");
    let r = s.send(&other, with(Some("alpha"))).await;
    assert_denied(
        &r,
        429,
        "too_many_requests",
        "alpha's fourth, another client",
    );
    // Another value, same client: its own budget.
    for i in 0..2 {
        let r = s.send(&web, with(Some("beta"))).await;
        assert_ok(&r, &format!("beta #{i}"));
        assert_eq!(
            r.header("ratelimit-remaining"),
            Some((1 - i).to_string().as_str()),
            "{r}"
        );
        admitted += 1;
    }
    let r = s.send(&web, with(Some("beta"))).await;
    assert_denied(&r, 429, "too_many_requests", "beta's third request");
    // Header name matching is case-insensitive.
    let r = s
        .send(&web, Req::get("/by-header").header("X-CLIENT", "beta"))
        .await;
    assert_denied(
        &r,
        429,
        "too_many_requests",
        "beta under an upper-case name",
    );
    // No header: not exempt. All such requests share one bucket, whoever
    // sends them, separate from every value's.
    for (i, client) in [&web, &other].into_iter().enumerate() {
        let r = s.send(client, with(None)).await;
        assert_ok(&r, &format!("no header #{i}"));
        assert_eq!(
            r.header("ratelimit-remaining"),
            Some((1 - i).to_string().as_str()),
            "{r}"
        );
        admitted += 1;
    }
    for client in [&web, &other] {
        let r = s.send(client, with(None)).await;
        assert_denied(
            &r,
            429,
            "too_many_requests",
            "the shared no-header bucket is spent",
        );
    }
    // A new value still has its own budget.
    let r = s.send(&other, with(Some("gamma"))).await;
    assert_ok(&r, "gamma");
    admitted += 1;
    assert_eq!(
        s.backend.seen_under("/by-header").len(),
        admitted,
        "the app saw exactly the admitted requests"
    );

    // --- claim:tenant, 2 per hour per tenant; each token is distinct.
    let token = |tenant: Value| {
        let extra = if tenant.is_null() {
            json!({})
        } else {
            json!({ "tenant": tenant })
        };
        key.sign(&claims(INLINE, extra))
    };
    let by_claim = |tenant: Value| Req::get("/by-claim").bearer(&token(tenant));
    let mut admitted = 0;
    for i in 0..2 {
        let r = s.send(&web, by_claim(json!("acme"))).await;
        assert_ok(&r, &format!("acme #{i}"));
        assert_eq!(r.header("ratelimit-limit"), Some("2"), "{r}");
        admitted += 1;
    }
    let r = s.send(&other, by_claim(json!("acme"))).await;
    assert_denied(
        &r,
        429,
        "too_many_requests",
        "acme's third request (a new token, another client)",
    );
    let r = s.send(&web, by_claim(json!("initech"))).await;
    assert_ok(&r, "initech has its own budget");
    assert_eq!(r.header("ratelimit-remaining"), Some("1"), "{r}");
    admitted += 1;
    // No tenant claim, or a non-string one: one shared bucket.
    let r = s.send(&web, by_claim(Value::Null)).await;
    assert_ok(&r, "no tenant claim #0");
    assert_eq!(r.header("ratelimit-remaining"), Some("1"), "{r}");
    admitted += 1;
    let r = s.send(&other, by_claim(json!(42))).await;
    assert_ok(&r, "a numeric tenant claim shares the no-claim bucket");
    assert_eq!(r.header("ratelimit-remaining"), Some("0"), "{r}");
    admitted += 1;
    let r = s.send(&web, by_claim(Value::Null)).await;
    assert_denied(
        &r,
        429,
        "too_many_requests",
        "the shared no-claim bucket is spent",
    );
    // Unauthenticated requests are refused before the limit.
    let r = s.send(&web, Req::get("/by-claim")).await;
    assert_denied(&r, 401, "unauthorized", "no token on /by-claim");
    assert_eq!(
        s.backend.seen_under("/by-claim").len(),
        admitted,
        "the app saw exactly the admitted requests"
    );
}

// --- 5. permissive mTLS ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mtls_serves_plaintext_and_strict_refuses_it() {
    bounded("the mTLS-mode scenario", 25, mtls_mode_scenario()).await;
}

async fn mtls_mode_scenario() {
    let (permissive, strict) = tokio::join!(
        setup("mtls_modes.yaml", &[("MTLS", "permissive")]),
        setup("mtls_modes.yaml", &[("MTLS", "strict")]),
    );

    // Permissive: a plaintext client is served, without an identity. A
    // client-written XFCC is removed, not passed on.
    let r = send_plaintext(permissive.agent.addr, &Req::get("/plain"))
        .await
        .unwrap_or_else(|e| panic!("plaintext on permissive: {e}\n{}", permissive.log()));
    assert_ok(&r, "plaintext on a permissive port");
    let r = send_plaintext(
        permissive.agent.addr,
        &Req::get("/plain-spoofed").header(
            "x-forwarded-client-cert",
            "By=spiffe://cluster.local/ns/shop/sa/orders;URI=spiffe://cluster.local/ns/shop/sa/web",
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("plaintext with XFCC on permissive: {e}"));
    assert_ok(&r, "plaintext with a spoofed XFCC");
    // An mTLS client still works, and is named.
    let web = permissive.pki.client(WEB);
    let r = permissive.send(&web, Req::get("/mtls")).await;
    assert_ok(&r, "mTLS on a permissive port");
    let seen = permissive.backend.seen();
    assert_eq!(
        seen.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
        ["/plain", "/plain-spoofed", "/mtls"]
    );
    for plain in &seen[..2] {
        assert!(
            plain.header_all("x-forwarded-client-cert").is_empty(),
            "a plaintext request reached the app with an XFCC: {plain:?}"
        );
    }
    let xfcc = seen[2].header_all("x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{xfcc:?}");
    assert!(xfcc[0].ends_with(&format!("URI={WEB}")), "{xfcc:?}");

    // Strict: the same plaintext request gets no 200 (the agent expects a
    // TLS handshake), and nothing reaches the app.
    match send_plaintext(strict.agent.addr, &Req::get("/plain")).await {
        Err(_) => {}
        Ok(r) => assert!(
            r.status != 200 && !(200..400).contains(&r.status),
            "plaintext on a strict port was answered {r}"
        ),
    }
    let r = strict
        .send(&strict.pki.client(WEB), Req::get("/mtls"))
        .await;
    assert_ok(&r, "mTLS on a strict port");
    assert_eq!(
        strict
            .backend
            .seen()
            .iter()
            .map(|s| s.target.as_str())
            .collect::<Vec<_>>(),
        ["/mtls"],
        "only the mTLS request reached the app"
    );
}
