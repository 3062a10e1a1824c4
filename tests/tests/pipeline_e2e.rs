//! Every request-pipeline feature of the sidecar, allowed and denied, seen
//! from outside: the real `palisade-agent run` enforcing a policy compiled
//! from YAML (`fixtures/*.yaml`) by the real `palisadectl policy compile`,
//! a recording app behind it, mTLS clients with rcgen SPIFFE certificates in
//! front, and (for JWTs) a JWKS server in the test.
//!
//! Each test function runs its own agent, so the functions run in parallel;
//! the JWT one is the longest (about 30 s: the agent refetches a JWKS for an
//! unknown `kid` at most once per 30 s, docs/authentication.md).
//!
//! Every "allowed" assertion also checks that the app saw the request, and
//! every "denied" one that it did not.

mod fixtures;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fixtures::{
    INVOICER, JwksServer, ORDERS, OTHER, Req, WEB, assert_denied, assert_ok, bounded, setup,
    sha256_hex, unix_now,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

// --- JWT ---------------------------------------------------------------------

const ISSUER: &str = "https://id.palisade.test";
const RSA_PEM: &str = include_str!("fixtures/jwt-test-rsa-2048.pem");
const RSA_PUB_PEM: &str = include_str!("fixtures/jwt-test-rsa-2048.pub.pem");

/// A signing key and its public JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn rsa(kid: &str) -> Self {
        let encoding = EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap();
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
        Self::with_jwk(
            kid,
            Algorithm::RS256,
            encoding,
            serde_json::to_value(jwk).unwrap(),
        )
    }

    fn ec(kid: &str) -> Self {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let encoding = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 65, "uncompressed P-256 point");
        let jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
        });
        Self::with_jwk(kid, Algorithm::ES256, encoding, jwk)
    }

    fn with_jwk(kid: &str, alg: Algorithm, encoding: EncodingKey, mut jwk: Value) -> Self {
        jwk["kid"] = kid.into();
        jwk["use"] = "sig".into();
        Self {
            kid: kid.to_owned(),
            alg,
            encoding,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// Claims of a token the policy accepts; `jti` keeps every token distinct
/// (the agent caches verified tokens by their hash).
fn claims(scope: &[&str]) -> Value {
    static JTI: AtomicUsize = AtomicUsize::new(0);
    let now = unix_now();
    json!({
        "iss": ISSUER,
        "aud": "orders",
        "sub": "user-1",
        "iat": now,
        "exp": now + 600,
        "scope": scope,
        "jti": format!("t{}", JTI.fetch_add(1, Ordering::SeqCst)),
    })
}

/// `<header>.<claims>.<signature>` from raw JSON.
fn hand_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authentication_claims_and_jwks_rotation() {
    bounded("the JWT scenario", 80, jwt_scenario()).await;
}

async fn jwt_scenario() {
    let rsa = SigningKey::rsa("rsa-1");
    let ec = SigningKey::ec("ec-1");
    let jwks_server = JwksServer::start(jwks(&[&rsa, &ec])).await;
    let s = setup("jwt.yaml", &[("JWKS_URI", &jwks_server.uri())]).await;
    let web = s.pki.client(WEB);
    let get = |token: &str| Req::get("/orders/1").bearer(token);

    // A valid RS256 token: the first that needs the keys, so the JWKS is
    // fetched now (the 30 s refetch interval of the rotation below starts here).
    let r = s
        .send(&web, get(&rsa.sign(&claims(&["orders:read"]))))
        .await;
    assert_ok(&r, "valid RS256 token");
    let first_fetch = Instant::now();
    assert_eq!(jwks_server.hits(), 1, "fetched on first use");
    let seen = s.backend.seen_under("/orders");
    assert_eq!(seen.len(), 1, "the app saw the allowed request");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/orders/1");

    // A valid ES256 token from the same JWKS.
    let r = s.send(&web, get(&ec.sign(&claims(&["orders:read"])))).await;
    assert_ok(&r, "valid ES256 token");

    // No token at all (the mTLS peer alone is not enough here): 401 with a challenge.
    let r = s.send(&web, Req::get("/orders/1")).await;
    assert_denied(&r, 401, "unauthorized", "no token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{r}");

    // Tokens that must fail verification: 401 authn.failed, with the challenge.
    let now = unix_now();
    let mut expired = claims(&["orders:read"]);
    expired["iat"] = (now - 7200).into();
    expired["exp"] = (now - 3600).into();
    let mut wrong_aud = claims(&["orders:read"]);
    wrong_aud["aud"] = "billing".into();
    let mut wrong_iss = claims(&["orders:read"]);
    wrong_iss["iss"] = "https://evil.example".into();
    let mut missing_exp = claims(&["orders:read"]);
    missing_exp.as_object_mut().unwrap().remove("exp");

    let valid = claims(&["orders:read"]);
    let alg_none = hand_token(&json!({"alg": "none", "typ": "JWT"}), &valid, b"");
    let alg_none_kid = hand_token(
        &json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
        &valid,
        b"",
    );
    let alg_none_caps = hand_token(&json!({"alg": "NONE", "typ": "JWT"}), &valid, b"");
    // Key confusion: HS256 keyed with the RSA public key the JWKS publishes.
    let hs256 = |kid: Option<&str>| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            &claims(&["orders:read"]),
            &EncodingKey::from_secret(RSA_PUB_PEM.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    // Published keys under the other key's kid: the kid picks the key, and
    // its type must fit the algorithm (no trying every key of the type).
    let ec_under_rsa_kid = {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("rsa-1".into());
        jsonwebtoken::encode(&header, &claims(&["orders:read"]), &ec.encoding).unwrap()
    };
    let rsa_under_ec_kid = {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("ec-1".into());
        jsonwebtoken::encode(&header, &claims(&["orders:read"]), &rsa.encoding).unwrap()
    };
    // A valid token whose claims were edited after signing.
    let signed = rsa.sign(&claims(&["orders:read"]));
    let parts: Vec<&str> = signed.split('.').collect();
    let mut edited_claims = claims(&["orders:read", "orders:write"]);
    edited_claims["sub"] = "admin".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(edited_claims.to_string()),
        parts[2]
    );

    let refused = [
        ("expired", rsa.sign(&expired)),
        ("wrong audience", rsa.sign(&wrong_aud)),
        ("wrong issuer", rsa.sign(&wrong_iss)),
        ("no exp", rsa.sign(&missing_exp)),
        ("alg none", alg_none),
        ("alg none with a kid", alg_none_kid),
        ("alg NONE", alg_none_caps),
        (
            "HS256 keyed with the RSA public key, kid",
            hs256(Some("rsa-1")),
        ),
        ("HS256 keyed with the RSA public key, no kid", hs256(None)),
        ("ES256 signed by ec-1 under the kid rsa-1", ec_under_rsa_kid),
        ("RS256 signed by rsa-1 under the kid ec-1", rsa_under_ec_kid),
        ("claims edited after signing", tampered.clone()),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (what, token) in &refused {
        let r = s.send(&web, get(token)).await;
        assert_denied(&r, 401, "unauthorized", what);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}: {r}");
    }
    // The tampered token cannot write either.
    let r = s
        .send(&web, Req::post("/orders").bearer(&tampered).body("{}"))
        .await;
    assert_denied(&r, 401, "unauthorized", "tampered token on POST");

    // Claim-based role: scope holds orders:write → POST allowed; without it → 403.
    let r = s
        .send(
            &web,
            Req::post("/orders")
                .bearer(&ec.sign(&claims(&["orders:read", "orders:write"])))
                .header("content-type", "application/json")
                .body(r#"{"item":1}"#),
        )
        .await;
    assert_ok(&r, "POST with orders:write");
    let r = s
        .send(
            &web,
            Req::post("/orders")
                .bearer(&rsa.sign(&claims(&["orders:read"])))
                .header("content-type", "application/json")
                .body(r#"{"item":2}"#),
        )
        .await;
    assert_denied(&r, 403, "forbidden", "POST without orders:write");
    let r = s
        .send(
            &web,
            Req::post("/orders")
                .bearer(&rsa.sign(&claims(&[])))
                .body(r#"{"item":3}"#),
        )
        .await;
    assert_denied(&r, 403, "forbidden", "POST with an empty scope");

    let seen = s.backend.seen_under("/orders");
    assert_eq!(
        seen.iter().map(|s| s.method.as_str()).collect::<Vec<_>>(),
        ["GET", "GET", "POST"],
        "only the two valid reads and the authorized write reached the app"
    );
    assert_eq!(seen[2].body, br#"{"item":1}"#);

    // --- JWKS rotation: a key the agent has never seen. ---
    let rotated = SigningKey::ec("ec-2");
    let new_token = rotated.sign(&claims(&["orders:read"]));
    // Not published yet: refused.
    let r = s.send(&web, get(&new_token)).await;
    assert_denied(&r, 401, "unauthorized", "kid not in the JWKS");
    assert_eq!(
        jwks_server.hits(),
        1,
        "every request so far used the cached JWKS (Cache-Control: max-age=600)"
    );

    // The identity provider rotates: publishes ec-2, retires ec-1.
    jwks_server.serve(jwks(&[&rsa, &rotated]));
    let deadline = first_fetch + Duration::from_secs(50);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let r = s.send(&web, get(&new_token)).await;
        if r.status == 200 {
            break;
        }
        assert_denied(&r, 401, "unauthorized", "new kid before the refetch");
        assert!(
            Instant::now() < deadline,
            "a token signed with the rotated-in key was never accepted ({attempts} attempts, \
             {} JWKS fetches). Agent log:\n{}",
            jwks_server.hits(),
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        jwks_server.hits(),
        2,
        "{attempts} requests with an unknown kid caused exactly one refetch"
    );
    assert!(
        first_fetch.elapsed() >= Duration::from_secs(28),
        "the refetch for an unknown kid came {:?} after the first fetch, before the \
         documented 30 s interval",
        first_fetch.elapsed()
    );
    // A new token of the retired key is refused; the kept RSA key still works.
    let r = s.send(&web, get(&ec.sign(&claims(&["orders:read"])))).await;
    assert_denied(&r, 401, "unauthorized", "a new token of the retired key");
    let r = s
        .send(&web, get(&rsa.sign(&claims(&["orders:read"]))))
        .await;
    assert_ok(&r, "RS256 after the rotation");
    assert_eq!(s.backend.seen_under("/orders").len(), 5);
}

// --- API keys ----------------------------------------------------------------

const ACME_KEY: &str = "acme-e2e-key-5f1c0d8a";
const INITECH_KEY: &str = "initech-e2e-key-93b27e41";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_identify_clients() {
    bounded("the API-key scenario", 40, api_key_scenario()).await;
}

async fn api_key_scenario() {
    let s = setup(
        "apikeys.yaml",
        &[
            ("ACME_SHA256", &sha256_hex(ACME_KEY)),
            ("INITECH_SHA256", &sha256_hex(INITECH_KEY)),
        ],
    )
    .await;
    let gateway = s.pki.client(WEB);
    let with_key = |target: &str, key: &str| Req::get(target).header("x-api-key", key);

    let r = s.send(&gateway, with_key("/orders/7", ACME_KEY)).await;
    assert_ok(&r, "acme on /orders");
    let seen = s.backend.seen_under("/orders");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/orders/7");
    // The workload accepts only API keys, no JWTs: no Bearer challenge.
    let r = s.send(&gateway, with_key("/orders/7", INITECH_KEY)).await;
    assert_denied(&r, 403, "forbidden", "initech is not a trading partner");
    let r = s.send(&gateway, with_key("/quotes/1", INITECH_KEY)).await;
    assert_ok(&r, "initech on /quotes");

    let r = s
        .send(&gateway, with_key("/orders/7", "acme-e2e-key-5f1c0d8b"))
        .await;
    assert_denied(&r, 401, "unauthorized", "unknown key");
    assert_eq!(r.header("www-authenticate"), None, "{r}");
    let r = s.send(&gateway, with_key("/orders/7", "")).await;
    assert_denied(&r, 401, "unauthorized", "empty key");
    let r = s
        .send(
            &gateway,
            with_key("/orders/7", ACME_KEY).header("x-api-key", INITECH_KEY),
        )
        .await;
    assert_denied(&r, 401, "unauthorized", "two keys");
    let r = s
        .send(
            &gateway,
            with_key("/orders/7", ACME_KEY).header("x-api-key", ACME_KEY),
        )
        .await;
    assert_denied(&r, 401, "unauthorized", "the same key twice");
    let r = s.send(&gateway, Req::get("/orders/7")).await;
    assert_denied(&r, 401, "unauthorized", "no key, mTLS peer only");
    // A key SHA-256 itself is not a key.
    let r = s
        .send(&gateway, with_key("/orders/7", &sha256_hex(ACME_KEY)))
        .await;
    assert_denied(&r, 401, "unauthorized", "the stored hash as the key");

    // Rate limit keyed by the API-key client id: 2 per hour each.
    for i in 0..2 {
        let r = s.send(&gateway, with_key("/metered", ACME_KEY)).await;
        assert_ok(&r, &format!("acme metered #{i}"));
        assert_eq!(r.header("ratelimit-limit"), Some("2"), "{r}");
    }
    let r = s.send(&gateway, with_key("/metered", ACME_KEY)).await;
    assert_denied(&r, 429, "too_many_requests", "acme's third metered request");
    let r = s.send(&gateway, with_key("/metered", INITECH_KEY)).await;
    assert_ok(&r, "initech has its own bucket");
    assert_eq!(r.header("ratelimit-remaining"), Some("1"), "{r}");

    let seen = s.backend.seen();
    assert_eq!(
        seen.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
        ["/orders/7", "/quotes/1", "/metered", "/metered", "/metered"],
        "exactly the admitted requests reached the app"
    );
}

// --- roles and conditions ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_principals_namespaces_and_conditions() {
    bounded("the roles scenario", 40, roles_scenario()).await;
}

async fn roles_scenario() {
    let s = setup("mesh.yaml", &[]).await;
    let web = s.pki.client(WEB);
    let other = s.pki.client(OTHER);
    let invoicer = s.pki.client(INVOICER);

    // Principal-based.
    assert_ok(
        &s.send(&web, Req::get("/principal/x")).await,
        "web on /principal",
    );
    let r = s.send(&other, Req::get("/principal/x")).await;
    assert_denied(
        &r,
        403,
        "forbidden",
        "another principal of the same namespace",
    );
    let r = s.send(&invoicer, Req::get("/principal/x")).await;
    assert_denied(&r, 403, "forbidden", "a principal of another namespace");

    // Namespace-based.
    assert_ok(
        &s.send(&invoicer, Req::get("/billing/run")).await,
        "billing namespace",
    );
    let r = s.send(&web, Req::get("/billing/run")).await;
    assert_denied(&r, 403, "forbidden", "shop namespace on /billing");

    // Header condition: every value must be allowed; extra values only narrow.
    let tenant = |values: &[&str]| {
        values
            .iter()
            .fold(Req::get("/tenant/data"), |r, v| r.header("x-tenant", v))
    };
    assert_ok(&s.send(&web, tenant(&["a"])).await, "x-tenant: a");
    for (what, values) in [
        ("a second x-tenant field", &["a", "b"][..]),
        ("a second field, reversed", &["b", "a"][..]),
        ("a comma-joined second value", &["a, b"][..]),
        ("another tenant", &["b"][..]),
        ("no x-tenant", &[][..]),
    ] {
        let r = s.send(&web, tenant(values)).await;
        assert_denied(&r, 403, "forbidden", what);
    }

    // Time of day: two windows covering the whole day admit at any time;
    // the same two ANDed never do.
    assert_ok(
        &s.send(&web, Req::get("/hours/always")).await,
        "a window covering all day",
    );
    let r = s.send(&web, Req::get("/hours/never")).await;
    assert_denied(&r, 403, "forbidden", "a window that never opens");

    // Anything no route allows (the port has allow rules): refused.
    let r = s.send(&web, Req::get("/unlisted")).await;
    assert_denied(&r, 403, "forbidden", "no route");

    let seen = s.backend.seen();
    let got: Vec<(&str, Option<&str>)> = seen
        .iter()
        .map(|s| {
            (
                s.target.as_str(),
                s.header("x-forwarded-client-cert")
                    .and_then(|x| x.rsplit_once(";URI="))
                    .map(|(_, uri)| uri),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/principal/x", Some(WEB)),
            ("/billing/run", Some(INVOICER)),
            ("/tenant/data", Some(WEB)),
            ("/hours/always", Some(WEB)),
        ],
        "exactly the allowed requests reached the app, each naming its real caller"
    );
}

// --- rate limits ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rate_limit_algorithm_admits_n_then_429() {
    bounded("the rate-limit scenario", 40, rate_limit_scenario()).await;
}

async fn rate_limit_scenario() {
    let s = setup("mesh.yaml", &[]).await;
    let web = s.pki.client(WEB);
    let other = s.pki.client(OTHER);
    const N: usize = 3;
    for algorithm in ["token-bucket", "fixed-window", "sliding-window"] {
        let target = format!("/limits/{algorithm}");
        // Unauthorized callers (same client address, the limit's key) are
        // refused before the limit and do not spend anybody's budget.
        for _ in 0..4 {
            let r = s.send(&other, Req::get(&target)).await;
            assert_denied(&r, 403, "forbidden", &format!("{algorithm}: unauthorized"));
            assert_eq!(r.header("ratelimit-limit"), None, "{algorithm}: {r}");
        }
        for i in 0..N {
            let r = s.send(&web, Req::get(&target)).await;
            assert_ok(&r, &format!("{algorithm} request {i}"));
            assert_eq!(r.header("ratelimit-limit"), Some("3"), "{algorithm}: {r}");
            assert_eq!(
                r.header("ratelimit-remaining"),
                Some((N - 1 - i).to_string().as_str()),
                "{algorithm} request {i}: {r}"
            );
            assert!(r.header("ratelimit-reset").is_some(), "{algorithm}: {r}");
            assert_eq!(r.header("retry-after"), None, "{algorithm}: {r}");
        }
        for i in 0..2 {
            let r = s.send(&web, Req::get(&target)).await;
            assert_denied(
                &r,
                429,
                "too_many_requests",
                &format!("{algorithm} over the limit #{i}"),
            );
            let retry: u64 = r
                .header("retry-after")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{algorithm}: no numeric Retry-After: {r}"));
            // At most two periods away (the sliding window's next admission
            // can lie in the window after the next one).
            assert!(
                (1..=7200).contains(&retry),
                "{algorithm}: Retry-After {retry}"
            );
            assert_eq!(
                r.header("ratelimit-remaining"),
                Some("0"),
                "{algorithm}: {r}"
            );
            assert_eq!(r.header("ratelimit-limit"), Some("3"), "{algorithm}: {r}");
        }
        assert_eq!(
            s.backend.seen_under(&target).len(),
            N,
            "{algorithm}: the app saw exactly the admitted requests"
        );
    }
}

// --- attacks from outside --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_and_encoded_paths_do_not_work() {
    bounded("the attack scenario", 40, attack_scenario()).await;
}

async fn attack_scenario() {
    let s = setup("mesh.yaml", &[]).await;
    let web = s.pki.client(WEB);

    // A client-written XFCC and x-palisade-* header are replaced/removed: the
    // app sees exactly one XFCC, the agent's, naming the real client.
    let r = s
        .send(
            &web,
            Req::get("/public/whoami")
                .header(
                    "x-forwarded-client-cert",
                    "By=spiffe://cluster.local/ns/shop/sa/orders;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
                )
                .header("x-forwarded-client-cert", "URI=spiffe://evil.example/ns/x/sa/y")
                .header("x-palisade-principal", "spiffe://cluster.local/ns/kube-system/sa/admin")
                .header("X-Palisade-Namespace", "kube-system"),
        )
        .await;
    assert_ok(&r, "spoofed identity headers");
    // The same spoof named as hop-by-hop in Connection.
    let r = s
        .send(
            &web,
            Req::get("/public/whoami2")
                .header("connection", "x-forwarded-client-cert")
                .header(
                    "x-forwarded-client-cert",
                    "URI=spiffe://cluster.local/ns/kube-system/sa/admin",
                ),
        )
        .await;
    assert_ok(&r, "spoofed XFCC named by Connection");
    let expected_xfcc = format!("By={ORDERS};Hash={};URI={WEB}", web.cert_sha256);
    let seen = s.backend.seen();
    assert_eq!(seen.len(), 2);
    for seen in &seen {
        assert_eq!(
            seen.header_all("x-forwarded-client-cert"),
            std::slice::from_ref(&expected_xfcc),
            "{}: exactly the agent's XFCC",
            seen.target
        );
        let palisade: Vec<_> = seen
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-palisade-"))
            .collect();
        assert!(palisade.is_empty(), "{}: {palisade:?}", seen.target);
    }

    // Spellings of /admin (denied to everyone) that must never reach it.
    let tricks: &[(&str, u16)] = &[
        ("/admin", 403),
        ("/admin/users", 403),
        ("/public/..%2Fadmin", 400),
        ("/public/..%2fadmin", 400),
        ("/public/..%5Cadmin", 400),
        ("/public/%2e%2e/admin", 403),
        ("/public/%2E%2E/admin", 403),
        ("/public/.%2e/admin", 403),
        ("/public/../admin", 403),
        ("/public/./../admin/", 403),
        ("//admin", 403),
        ("///admin//users", 403),
        ("/admin/.", 403),
        ("/admin/./", 403),
        ("/./admin", 403),
        ("/%61dmin", 403),
        ("/%61%64%6d%69%6e/users", 403),
        ("/../admin", 403),
        ("/admin?next=/public", 403),
        ("/public/x/../../admin", 403),
        ("/admin%00", 400),
        ("/public/..%2F..%2Fadmin", 400),
    ];
    for (target, status) in tricks {
        let r = s.send(&web, Req::get(target)).await;
        let word = if *status == 400 {
            "bad_request"
        } else {
            "forbidden"
        };
        assert_denied(&r, *status, word, target);
    }
    // A fragment is refused (or dropped by the HTTP parser before the
    // agent sees it, leaving /admin): never admitted either way.
    for target in ["/admin#x", "/public/%2e%2e/admin#frag"] {
        let r = s.send(&web, Req::get(target)).await;
        assert!(matches!(r.status, 400 | 403), "{target}: {r}");
    }

    // Ambiguous requests are refused, not guessed at.
    let r = s
        .send(&web, Req::get("/public/a").header("host", "admin.shop"))
        .await;
    assert_eq!(r.status, 400, "two Host headers: {r}");
    let r = s
        .send(
            &web,
            Req::post("/public/a")
                .header("content-length", "4")
                .body("abcdefgh")
                .chunked(),
        )
        .await;
    assert_eq!(r.status, 400, "Content-Length and Transfer-Encoding: {r}");
    let r = s.send(&web, Req::new("get", "/public/a")).await;
    assert_eq!(r.status, 400, "lower-case method: {r}");

    // Allowed but oddly spelled targets reach the app normalized.
    let normalized: &[(&str, &str)] = &[
        ("/public/a/./b/../c?q=%2e%2e/x", "/public/a/c?q=%2e%2e/x"),
        ("//public///x", "/public/x"),
        ("/public/%7Euser", "/public/~user"),
        ("/public/%2e%2e/public/y", "/public/y"),
        ("/admin/../public/z", "/public/z"),
        ("/public/a%3ab", "/public/a%3Ab"),
        ("/public/q/.", "/public/q/"),
    ];
    for (sent, _) in normalized {
        assert_ok(&s.send(&web, Req::get(sent)).await, sent);
    }
    let seen = s.backend.seen();
    let targets: Vec<&str> = seen[2..].iter().map(|s| s.target.as_str()).collect();
    assert_eq!(
        targets,
        normalized.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        "the app receives the normalized path and the original query"
    );
    for seen in &seen {
        let path = seen.target.split('?').next().unwrap();
        assert!(
            !path.starts_with("/admin")
                && !path.contains("//")
                && !path.split('/').any(|seg| seg == "." || seg == "..")
                && !path.to_ascii_lowercase().contains("%2e")
                && !path.to_ascii_lowercase().contains("%2f")
                && !path.contains("%61"),
            "a target that is not normalized (or is /admin) reached the app: {}",
            seen.target
        );
    }
}

// --- validation, masking, deprecation --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_refuses_bad_bodies_with_400_413_415() {
    bounded("the validation scenario", 40, validation_scenario()).await;
}

async fn validation_scenario() {
    let s = setup("body.yaml", &[]).await;
    let web = s.pki.client(WEB);
    let json = |body: &str| {
        Req::post("/payments")
            .header("content-type", "application/json")
            .body(body)
    };

    // Header-level checks (declared size, content type).
    let r = s
        .send(
            &web,
            json(&format!(
                r#"{{"amount":1,"currency":"EUR"{}}}"#,
                " ".repeat(300)
            )),
        )
        .await;
    assert_denied(
        &r,
        413,
        "payload_too_large",
        "declared length over maxBodyBytes",
    );
    let r = s
        .send(
            &web,
            Req::post("/payments")
                .header("content-type", "text/plain")
                .body(r#"{"amount":1,"currency":"EUR"}"#),
        )
        .await;
    assert_denied(&r, 415, "unsupported_media_type", "text/plain");
    let r = s
        .send(
            &web,
            Req::post("/payments").body(r#"{"amount":1,"currency":"EUR"}"#),
        )
        .await;
    assert_denied(&r, 415, "unsupported_media_type", "no Content-Type");
    let r = s
        .send(
            &web,
            Req::post("/payments")
                .header("content-type", "application/json, text/plain")
                .body(r#"{"amount":1,"currency":"EUR"}"#),
        )
        .await;
    assert_denied(&r, 415, "unsupported_media_type", "a list of media types");

    // Body checks (JSON Schema, streamed size).
    for (what, body) in [
        ("below the minimum", r#"{"amount":0,"currency":"EUR"}"#),
        ("not in the enum", r#"{"amount":5,"currency":"GBP"}"#),
        ("missing a required member", r#"{"amount":5}"#),
        ("wrong type", r#"{"amount":"5","currency":"EUR"}"#),
        (
            "an extra member",
            r#"{"amount":5,"currency":"EUR","admin":true}"#,
        ),
        ("not JSON", "amount=5&currency=EUR"),
        ("empty", ""),
        ("trailing data", r#"{"amount":5,"currency":"EUR"} {}"#),
        (
            "a duplicate member",
            r#"{"amount":1,"amount":99999,"currency":"EUR"}"#,
        ),
    ] {
        let r = s.send(&web, json(body)).await;
        assert_denied(&r, 400, "bad_request", what);
    }
    let big = format!(r#"{{"amount":1,"currency":"EUR"{}}}"#, " ".repeat(1000));
    let r = s.send(&web, json(&big).chunked()).await;
    assert_denied(
        &r,
        413,
        "payload_too_large",
        "a chunked body over maxBodyBytes",
    );
    assert!(
        s.backend.seen_under("/payments").is_empty(),
        "no refused body reached the app: {:?}",
        s.backend.seen_under("/payments")
    );

    // Valid bodies pass, byte for byte.
    let good = r#"{"amount":100,"currency":"EUR"}"#;
    assert_ok(&s.send(&web, json(good)).await, "a valid body");
    let r = s
        .send(
            &web,
            Req::post("/payments")
                .header("content-type", "Application/JSON; charset=utf-8")
                .body(r#"{"amount":7,"currency":"USD"}"#),
        )
        .await;
    assert_ok(&r, "a valid body with charset");
    assert_ok(
        &s.send(&web, json(r#"{"amount":9,"currency":"USD"}"#).chunked())
            .await,
        "a valid chunked body",
    );
    let seen = s.backend.seen_under("/payments");
    assert_eq!(
        seen.iter().map(|s| s.body.as_slice()).collect::<Vec<_>>(),
        [
            good.as_bytes(),
            br#"{"amount":7,"currency":"USD"}"#,
            br#"{"amount":9,"currency":"USD"}"#
        ],
        "the app got exactly the valid bodies"
    );

    // A size-only route: declared and streamed sizes.
    let upload = |body: &[u8]| {
        Req::post("/uploads")
            .header("content-type", "application/octet-stream")
            .body(body)
    };
    let r = s.send(&web, upload(&[b'x'; 65])).await;
    assert_denied(&r, 413, "payload_too_large", "declared 65 > 64");
    let r = s.send(&web, upload(&[b'x'; 1000]).chunked()).await;
    assert_eq!(r.status, 413, "streamed 1000 > 64: {r}");
    assert_ok(&s.send(&web, upload(&[b'y'; 64])).await, "declared 64");
    assert_ok(
        &s.send(&web, upload(&[b'z'; 40]).chunked()).await,
        "streamed 40",
    );
    let seen = s.backend.seen_under("/uploads");
    assert_eq!(
        seen.iter().map(|s| s.body.clone()).collect::<Vec<_>>(),
        [vec![b'y'; 64], vec![b'z'; 40]],
        "only bodies within the limit reached the app, whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_masking_redacts_masks_and_fails_closed() {
    bounded("the masking scenario", 40, masking_scenario()).await;
}

async fn masking_scenario() {
    let s = setup("body.yaml", &[]).await;
    let web = s.pki.client(WEB);
    let profile = br#"{"name":"Ada","ssn":"123-45-6789",
            "card":{"number":"4111111111111111","brand":"visa"},
            "accounts":[{"iban":"GB82WEST12345698765432","id":1},{"iban":"DE89370400440532013000","id":2}]}"#;
    s.backend.respond("/profile", "application/json", profile);
    s.backend
        .respond("/profile/problem", "application/problem+json", profile);
    // Not JSON, or JSON a parser could read two ways, while labelled JSON
    // (or not labelled at all, which a client may sniff as JSON).
    s.backend
        .respond("/profile/broken", "application/json", b"ssn 123-45-6789");
    s.backend.respond(
        "/profile/duplicate",
        "application/json",
        br#"{"ssn":"1","ssn":"123-45-6789"}"#,
    );
    s.backend
        .respond("/profile/unlabelled", "", b"ssn=123-45-6789");
    // Declared as something other than JSON: passed through untouched
    // (docs/validation-and-masking.md, "Response masking (mask step)").
    s.backend
        .respond("/profile/plain", "text/plain", b"plain text, no pointers");
    s.backend.respond(
        "/profile/unrelated",
        "application/json",
        br#"{"status":  "ok"}"#,
    );

    let masked = json!({
        "name": "Ada",
        "card": {"number": "************1111", "brand": "visa"},
        "accounts": [{"id": 1}, {"id": 2}],
    });
    for target in ["/profile", "/profile/problem"] {
        let r = s.send(&web, Req::get(target)).await;
        assert_ok(&r, target);
        assert_eq!(r.json(), masked, "{target}: {r}");
        let text = r.text();
        assert!(
            !text.contains("6789") && !text.contains("4111") && !text.contains("GB82"),
            "{target}: {text}"
        );
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str()),
            "{target}: Content-Length of the masked body: {r}"
        );
    }

    // A response the agent cannot inspect is withheld, never passed on unmasked.
    for target in [
        "/profile/broken",
        "/profile/duplicate",
        "/profile/unlabelled",
    ] {
        let r = s.send(&web, Req::get(target)).await;
        assert_denied(&r, 502, "bad_gateway", target);
        assert!(!r.text().contains("6789"), "{target}: {r}");
    }
    // Nothing to mask: the original bytes.
    let r = s.send(&web, Req::get("/profile/unrelated")).await;
    assert_ok(&r, "nothing to mask");
    assert_eq!(r.body, br#"{"status":  "ok"}"#);
    let r = s.send(&web, Req::get("/profile/plain")).await;
    assert_ok(&r, "a text/plain response");
    assert_eq!(r.body, b"plain text, no pointers");
    assert_eq!(s.backend.seen_under("/profile").len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprecation_headers_and_gone_after_sunset() {
    bounded("the deprecation scenario", 40, deprecation_scenario()).await;
}

async fn deprecation_scenario() {
    let s = setup("body.yaml", &[]).await;
    let web = s.pki.client(WEB);
    let other = s.pki.client(OTHER);

    let r = s.send(&web, Req::get("/v1/customers/7")).await;
    assert_ok(&r, "deprecated route before its sunset");
    assert_eq!(r.header("deprecation"), Some("@1735689600"), "{r}");
    assert_eq!(
        r.header("sunset"),
        Some("Thu, 01 Jan 2099 00:00:00 GMT"),
        "{r}"
    );
    assert_eq!(
        r.header("link"),
        Some(
            r#"<https://developer.example.com/migrate-to-v2>; rel="deprecation"; type="text/html""#
        ),
        "{r}"
    );
    // Deprecation headers are for authorized callers only.
    let r = s.send(&other, Req::get("/v1/customers/7")).await;
    assert_denied(&r, 403, "forbidden", "unauthorized caller on /v1");
    assert_eq!(r.header("deprecation"), None, "{r}");

    // Past the sunset with blockAfterSunset: 410 to authorized callers,
    // 403 still to others.
    let r = s.send(&web, Req::get("/v0/customers/7")).await;
    assert_denied(&r, 410, "gone", "route past its sunset");
    let r = s.send(&other, Req::get("/v0/customers/7")).await;
    assert_denied(&r, 403, "forbidden", "unauthorized caller past the sunset");

    let seen = s.backend.seen();
    assert_eq!(
        seen.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
        ["/v1/customers/7"]
    );
}
