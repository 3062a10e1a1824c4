use std::sync::Arc;

use http::HeaderMap;
use jsonwebtoken::{EncodingKey, Header};
use palisade_proto::policy::v1::JwtProvider;
use palisade_proto::policy::v1::jwt_provider::Keys;
use serde_json::{Value, json};

use super::*;
use crate::authn::ManualClock;
use crate::authn::test_support::*;

const T0: i64 = 1_700_000_000;
const ISS: &str = "https://idp.example";
const AUD: &str = "orders";

fn provider(keys: Keys) -> JwtProvider {
    JwtProvider {
        id: "idp".into(),
        issuer: ISS.into(),
        audiences: vec![AUD.into()],
        keys: Some(keys),
        header: String::new(),
        prefix: String::new(),
        leeway_seconds: 30,
        algorithms: vec!["RS256".into(), "ES256".into(), "EdDSA".into()],
    }
}

fn inline(keys: &[&TestKey]) -> JwtProvider {
    provider(Keys::JwksJson(jwks_json(keys)))
}

fn verifier_with(providers: &[JwtProvider], clock: &Arc<ManualClock>) -> JwtVerifier {
    let options = JwtOptions {
        clock: clock.clone(),
        ..JwtOptions::default()
    };
    JwtVerifier::new(providers, options).unwrap()
}

fn claims() -> Value {
    json!({ "iss": ISS, "aud": AUD, "sub": "alice", "exp": T0 + 600, "iat": T0 })
}

fn with(mut base: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    h
}

fn code(r: Result<VerifiedJwt, JwtError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

#[tokio::test]
async fn accepts_rs256_es256_eddsa() {
    let clock = Arc::new(ManualClock::new(T0));
    let (rsa, ec, ed) = (TestKey::rsa("r1"), TestKey::ec("e1"), TestKey::ed("d1"));
    let v = verifier_with(&[inline(&[&rsa, &ec, &ed])], &clock);
    for key in [&rsa, &ec, &ed] {
        let token = key.sign(&claims());
        let verified = v.verify(&bearer(&token)).await.unwrap();
        assert_eq!(&*verified.provider_id, "idp");
        assert_eq!(verified.claims["sub"], "alice");
    }
    assert_eq!(v.signature_checks(), 3);

    // A token without kid is checked against the keys of its alg.
    let mut anon = TestKey::ed("unused");
    anon.kid = None;
    let v = verifier_with(&[inline(&[&rsa, &anon])], &clock);
    assert_eq!(code(v.verify(&bearer(&anon.sign(&claims()))).await), "ok");
}

#[tokio::test]
async fn time_claims_with_leeway_at_the_edge() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::ec("e1");
    let v = verifier_with(&[inline(&[&key])], &clock); // leeway 30 s
    let check = |patch: Value| {
        let token = key.sign(&with(claims(), patch));
        let v = &v;
        async move { code(v.verify_token(&token).await) }
    };
    assert_eq!(check(json!({ "exp": T0 - 29 })).await, "ok");
    assert_eq!(check(json!({ "exp": T0 - 30 })).await, "jwt.expired");
    assert_eq!(check(json!({ "exp": T0 - 3600 })).await, "jwt.expired");
    assert_eq!(check(json!({ "nbf": T0 + 30 })).await, "ok");
    assert_eq!(check(json!({ "nbf": T0 + 31 })).await, "jwt.not_yet_valid");
    assert_eq!(check(json!({ "exp": null })).await, "jwt.malformed");
    assert_eq!(check(json!({ "exp": "tomorrow" })).await, "jwt.malformed");
    assert_eq!(check(json!({ "exp": (T0 + 60) as f64 + 0.5 })).await, "ok");

    let mut strict = inline(&[&key]);
    strict.leeway_seconds = 0;
    let v0 = verifier_with(&[strict], &clock);
    let token = key.sign(&with(claims(), json!({ "exp": T0 })));
    assert_eq!(code(v0.verify_token(&token).await), "jwt.expired");
    let token = key.sign(&with(claims(), json!({ "exp": T0 + 1, "nbf": T0 })));
    assert_eq!(code(v0.verify_token(&token).await), "ok");
}

#[tokio::test]
async fn audience_and_issuer() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::rsa("r1");
    let v = verifier_with(&[inline(&[&key])], &clock);
    let check = |patch: Value| {
        let token = key.sign(&with(claims(), patch));
        let v = &v;
        async move { code(v.verify_token(&token).await) }
    };
    assert_eq!(
        check(json!({ "aud": "payments" })).await,
        "jwt.wrong_audience"
    );
    assert_eq!(check(json!({ "aud": null })).await, "jwt.wrong_audience");
    assert_eq!(check(json!({ "aud": ["payments", AUD] })).await, "ok");
    assert_eq!(
        check(json!({ "aud": ["payments"] })).await,
        "jwt.wrong_audience"
    );
    assert_eq!(
        check(json!({ "iss": "https://evil.example" })).await,
        "jwt.wrong_issuer"
    );
    assert_eq!(check(json!({ "iss": null })).await, "jwt.wrong_issuer");
    assert_eq!(
        check(json!({ "iss": format!("{ISS}/") })).await,
        "jwt.wrong_issuer"
    );

    // No audiences configured: aud is not checked.
    let mut any_aud = inline(&[&key]);
    any_aud.audiences.clear();
    let v = verifier_with(&[any_aud], &clock);
    let token = key.sign(&with(claims(), json!({ "aud": "payments" })));
    assert_eq!(code(v.verify_token(&token).await), "ok");

    // Two policies with the same issuer and different audiences: either fits.
    let mut other = inline(&[&key]);
    other.id = "idp-payments".into();
    other.audiences = vec!["payments".into()];
    let v = verifier_with(&[inline(&[&key]), other], &clock);
    let token = key.sign(&with(claims(), json!({ "aud": "payments" })));
    assert_eq!(
        &*v.verify_token(&token).await.unwrap().provider_id,
        "idp-payments"
    );
    let token = key.sign(&with(claims(), json!({ "aud": "nobody" })));
    assert_eq!(code(v.verify_token(&token).await), "jwt.wrong_audience");
}

#[tokio::test]
async fn alg_none_and_hmac_refused() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::rsa("r1");
    let v = verifier_with(&[inline(&[&key])], &clock);

    for alg in ["none", "None", "NONE"] {
        let token = hand_token(&json!({ "alg": alg, "kid": "r1" }), &claims(), b"");
        let err = v.verify(&bearer(&token)).await.unwrap_err();
        assert_eq!(err.code(), "jwt.alg_not_allowed", "{alg}");
    }
    for alg in ["HS256", "HS384", "HS512", "PS256", "RS512", "ES384", "foo"] {
        let token = hand_token(&json!({ "alg": alg, "kid": "r1" }), &claims(), b"sig");
        assert_eq!(
            code(v.verify_token(&token).await),
            "jwt.alg_not_allowed",
            "{alg}"
        );
    }
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn key_confusion_hs256_with_the_rsa_public_key_refused() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::rsa("r1");
    let v = verifier_with(&[inline(&[&key])], &clock);
    // The classic attack: HMAC over the token with the server's public key
    // (as the PEM bytes it might hold) as the secret.
    for secret in [RSA_PUB_PEM.as_bytes(), RSA_PUB_PEM.trim().as_bytes()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("r1".into());
        let token = jsonwebtoken::encode(
            &header,
            &claims(),
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap();
        let err = v.verify(&bearer(&token)).await.unwrap_err();
        assert_eq!(err.code(), "jwt.alg_not_allowed");
    }
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn alg_must_match_key_type_and_provider() {
    let clock = Arc::new(ManualClock::new(T0));
    let (rsa, ec) = (TestKey::rsa("r1"), TestKey::ec("e1"));
    let v = verifier_with(&[inline(&[&rsa, &ec])], &clock);

    // ES256 token naming the RSA key's kid.
    let mut liar = TestKey::ec("r1");
    liar.kid = Some("r1".into());
    assert_eq!(
        code(v.verify_token(&liar.sign(&claims())).await),
        "jwt.alg_not_allowed"
    );

    // EdDSA is a fine alg, but this provider only accepts RS256.
    let ed = TestKey::ed("d1");
    let mut rs_only = inline(&[&rsa, &ed]);
    rs_only.algorithms = vec!["RS256".into()];
    let v = verifier_with(&[rs_only], &clock);
    assert_eq!(
        code(v.verify_token(&ed.sign(&claims())).await),
        "jwt.alg_not_allowed"
    );
    assert_eq!(code(v.verify_token(&rsa.sign(&claims())).await), "ok");
}

#[tokio::test]
async fn bad_signature_and_unknown_kid() {
    let clock = Arc::new(ManualClock::new(T0));
    let ec = TestKey::ec("e1");
    let v = verifier_with(&[inline(&[&ec])], &clock);

    // Another key claiming kid e1.
    let impostor = TestKey::ec("e1");
    assert_eq!(
        code(v.verify_token(&impostor.sign(&claims())).await),
        "jwt.bad_signature"
    );

    // A genuine token with its claims swapped.
    let token = ec.sign(&claims());
    let forged = with(claims(), json!({ "sub": "admin" }));
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(forged.to_string());
    assert_eq!(
        code(v.verify_token(&parts.join(".")).await),
        "jwt.bad_signature"
    );
    // Signature stripped.
    parts[1] = token.split('.').nth(1).unwrap().to_owned();
    parts[2] = String::new();
    assert_eq!(
        code(v.verify_token(&parts.join(".")).await),
        "jwt.bad_signature"
    );

    let stranger = TestKey::ec("e9");
    let err = v.verify_token(&stranger.sign(&claims())).await.unwrap_err();
    assert_eq!(err.code(), "jwt.unknown_kid");
    assert!(err.to_string().contains("e9"));
}

#[tokio::test]
async fn malformed_tokens() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::ed("d1");
    let v = verifier_with(&[inline(&[&key])], &clock);
    let good = key.sign(&claims());
    let (h, p, s) = {
        let mut it = good.split('.');
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    };
    let crit = hand_token(
        &json!({ "alg": "EdDSA", "kid": "d1", "crit": ["b64"] }),
        &claims(),
        b"x",
    );
    let cases = [
        format!("{h}.{p}"),
        format!("{h}.{p}.{s}.{s}"),
        format!("{h}=.{p}.{s}"),
        format!("{h}.{p}+.{s}"),
        format!("{}.{p}.{s}", URL_SAFE_NO_PAD.encode("[1]")),
        format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode("not json")),
        format!("{}.{p}.{s}", URL_SAFE_NO_PAD.encode(r#"{"kid":"d1"}"#)),
        crit,
        "x".repeat(MAX_TOKEN_BYTES + 1),
    ];
    for token in cases {
        assert_eq!(
            code(v.verify_token(&token).await),
            "jwt.malformed",
            "{token:.80}"
        );
    }
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn where_the_token_is_read() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::ec("e1");
    let v = verifier_with(&[inline(&[&key])], &clock);
    let token = key.sign(&claims());

    assert_eq!(
        v.verify(&HeaderMap::new()).await.unwrap_err(),
        JwtError::Missing
    );
    assert!(JwtError::Missing.is_missing());
    let mut h = HeaderMap::new();
    h.insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
    assert_eq!(v.verify(&h).await.unwrap_err(), JwtError::Missing);
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        format!("bearer   {token}").parse().unwrap(),
    );
    assert_eq!(code(v.verify(&h).await), "ok");
    let mut h = bearer(&token);
    h.append("authorization", format!("Bearer {token}").parse().unwrap());
    assert_eq!(code(v.verify(&h).await), "jwt.malformed");
    let mut h = bearer(&token);
    h.append("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
    assert_eq!(code(v.verify(&h).await), "jwt.malformed");
    assert_eq!(code(v.verify(&bearer("")).await), "jwt.malformed");

    // A custom header without prefix, beside the default location.
    let mut custom = inline(&[&key]);
    custom.id = "gateway".into();
    custom.header = "x-jwt-assertion".into();
    let v = verifier_with(&[inline(&[&key]), custom], &clock);
    let mut h = HeaderMap::new();
    h.insert("x-jwt-assertion", token.parse().unwrap());
    assert_eq!(&*v.verify(&h).await.unwrap().provider_id, "gateway");
    // The same token in both: fine; different tokens: ambiguous.
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    assert_eq!(code(v.verify(&h).await), "ok");
    let other = key.sign(&with(claims(), json!({ "sub": "bob" })));
    h.insert("authorization", format!("Bearer {other}").parse().unwrap());
    assert_eq!(code(v.verify(&h).await), "jwt.malformed");
}

#[tokio::test]
async fn cached_token_costs_no_signature_check() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::rsa("r1");
    let v = verifier_with(&[inline(&[&key])], &clock);
    let token = key.sign(&with(claims(), json!({ "exp": T0 + 100 })));

    let first = v.verify(&bearer(&token)).await.unwrap();
    assert_eq!(v.signature_checks(), 1);
    for _ in 0..100 {
        let again = v.verify(&bearer(&token)).await.unwrap();
        assert_eq!(again, first);
    }
    assert_eq!(v.signature_checks(), 1);
    assert_eq!(v.cached_tokens(), 1);

    // Failures are never cached.
    let mut tampered = token.clone();
    tampered.push('A');
    for _ in 0..3 {
        assert!(v.verify_token(&tampered).await.is_err());
    }
    assert_eq!(v.signature_checks(), 4);

    // At exp the entry is gone: verified again (accepted within leeway,
    // not cached again), then expired.
    clock.set(T0 + 99);
    v.verify_token(&token).await.unwrap();
    assert_eq!(v.signature_checks(), 4);
    clock.set(T0 + 100);
    v.verify_token(&token).await.unwrap();
    assert_eq!(v.signature_checks(), 5);
    assert_eq!(v.cached_tokens(), 0);
    clock.set(T0 + 130);
    assert_eq!(code(v.verify_token(&token).await), "jwt.expired");
}

#[tokio::test]
async fn cache_ttl_and_capacity_are_bounded() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::ed("d1");
    let options = JwtOptions {
        clock: clock.clone(),
        cache_capacity: 2,
        cache_max_ttl: Duration::from_secs(60),
        ..JwtOptions::default()
    };
    let v = JwtVerifier::new(&[inline(&[&key])], options).unwrap();
    let token = key.sign(&with(claims(), json!({ "exp": T0 + 3600 })));
    v.verify_token(&token).await.unwrap();
    clock.advance(59);
    v.verify_token(&token).await.unwrap();
    assert_eq!(v.signature_checks(), 1);
    clock.advance(1);
    v.verify_token(&token).await.unwrap();
    assert_eq!(v.signature_checks(), 2, "re-verified after cache_max_ttl");

    for sub in ["a", "b", "c", "d"] {
        v.verify_token(&key.sign(&with(claims(), json!({ "sub": sub }))))
            .await
            .unwrap();
        assert!(v.cached_tokens() <= 2);
    }
    assert_eq!(v.cached_tokens(), 2);
}

#[tokio::test]
async fn jwks_rotation_via_unknown_kid_refetch_is_rate_bounded() {
    let clock = Arc::new(ManualClock::new(T0));
    let (old, new) = (TestKey::ec("2024"), TestKey::ed("2025"));
    let server = JwksServer::start(jwks_json(&[&old])).await;
    let v = verifier_with(&[provider(Keys::JwksUri(server.uri()))], &clock);

    assert_eq!(code(v.verify(&bearer(&old.sign(&claims()))).await), "ok");
    assert_eq!(server.hits(), 1);

    // The identity provider rotates.
    server.set_body(jwks_json(&[&new]));
    let new_token = new.sign(&claims());

    // Within 30 s of the last fetch: no refetch, the kid stays unknown, and a
    // flood of made-up kids costs the identity provider nothing.
    clock.advance(10);
    assert_eq!(code(v.verify(&bearer(&new_token)).await), "jwt.unknown_kid");
    for i in 0..20 {
        let forged = TestKey::ed(&format!("made-up-{i}"));
        assert_eq!(
            code(v.verify_token(&forged.sign(&claims())).await),
            "jwt.unknown_kid"
        );
    }
    assert_eq!(server.hits(), 1);

    // 30 s after the last fetch, the new kid triggers exactly one refetch.
    clock.advance(20);
    assert_eq!(code(v.verify(&bearer(&new_token)).await), "ok");
    assert_eq!(server.hits(), 2);

    clock.advance(1);
    for i in 0..20 {
        let forged = TestKey::ed(&format!("again-{i}"));
        assert_eq!(
            code(v.verify_token(&forged.sign(&claims())).await),
            "jwt.unknown_kid"
        );
    }
    assert_eq!(server.hits(), 2);
    clock.advance(29);
    let forged = TestKey::ed("later");
    assert_eq!(
        code(v.verify_token(&forged.sign(&claims())).await),
        "jwt.unknown_kid"
    );
    assert_eq!(server.hits(), 3);

    // The old key is gone from the JWKS: a fresh token under it is refused.
    let old_token = old.sign(&with(claims(), json!({ "sub": "fresh" })));
    assert_eq!(code(v.verify_token(&old_token).await), "jwt.unknown_kid");
}

#[tokio::test]
async fn unreachable_jwks_fails_closed() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::rsa("r1");
    let v = verifier_with(&[provider(Keys::JwksUri(dead_uri().await))], &clock);
    let err = v.verify(&bearer(&key.sign(&claims()))).await.unwrap_err();
    assert_eq!(err.code(), "jwt.keys_unavailable");
    assert_eq!(v.signature_checks(), 0);

    // A server answering 500 is no better.
    let server = JwksServer::start(String::new()).await;
    server.set_status(500);
    let v = verifier_with(&[provider(Keys::JwksUri(server.uri()))], &clock);
    let err = v.verify_token(&key.sign(&claims())).await.unwrap_err();
    assert_eq!(err.code(), "jwt.keys_unavailable");
    assert!(err.to_string().contains("500"), "{err}");
}

#[tokio::test]
async fn policy_update_reuses_jwks_fetchers() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::ec("e1");
    let server = JwksServer::start(jwks_json(&[&key])).await;
    let p = provider(Keys::JwksUri(server.uri()));
    let v1 = verifier_with(std::slice::from_ref(&p), &clock);
    v1.verify_token(&key.sign(&claims())).await.unwrap();
    let options = JwtOptions {
        clock: clock.clone(),
        ..JwtOptions::default()
    };
    let v2 = JwtVerifier::new_reusing(&[p], options, Some(&v1)).unwrap();
    v2.verify_token(&key.sign(&claims())).await.unwrap();
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn token_never_appears_in_errors() {
    let clock = Arc::new(ManualClock::new(T0));
    let key = TestKey::ec("e1");
    let v = verifier_with(&[inline(&[&key])], &clock);
    let tokens = [
        key.sign(&with(claims(), json!({ "exp": T0 - 3600 }))),
        key.sign(&with(claims(), json!({ "aud": "x" }))),
        TestKey::ec("e1").sign(&claims()),
        TestKey::ec("zz").sign(&claims()),
        hand_token(&json!({ "alg": "none" }), &claims(), b""),
        "abc.def".to_owned(),
    ];
    for token in &tokens {
        let err = v.verify(&bearer(token)).await.unwrap_err();
        for text in [err.to_string(), format!("{err:?}")] {
            for part in token.split('.').filter(|p| p.len() > 8) {
                assert!(!text.contains(part), "{text} contains token material");
            }
        }
    }
    // Attacker-chosen alg/kid are escaped and truncated.
    let token = hand_token(
        &json!({ "alg": "x\n\u{1b}[31m".repeat(30) }),
        &claims(),
        b"",
    );
    let text = v.verify_token(&token).await.unwrap_err().to_string();
    assert!(
        !text.contains('\n') && !text.contains('\u{1b}') && text.len() < 120,
        "{text}"
    );
}

#[test]
fn invalid_providers_are_config_errors() {
    let key = TestKey::ec("e1");
    let mut p = inline(&[&key]);
    p.algorithms = vec!["HS256".into()];
    assert!(JwtVerifier::new(&[p], JwtOptions::default()).is_err());
    let mut p = inline(&[&key]);
    p.keys = None;
    assert!(JwtVerifier::new(&[p], JwtOptions::default()).is_err());
    let mut jwk = key.jwk();
    jwk["d"] = "AAAA".into();
    let p = provider(Keys::JwksJson(json!({ "keys": [jwk] }).to_string()));
    let err = JwtVerifier::new(&[p], JwtOptions::default()).unwrap_err();
    assert!(err.reason.contains("private"), "{err}");
    let mut p = inline(&[&key]);
    p.issuer.clear();
    assert!(JwtVerifier::new(&[p], JwtOptions::default()).is_err());
    assert!(
        JwtVerifier::new(&[], JwtOptions::default())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn error_codes_are_stable() {
    let all = [
        (JwtError::Missing, "jwt.missing"),
        (JwtError::Malformed("x"), "jwt.malformed"),
        (JwtError::AlgNotAllowed("x".into()), "jwt.alg_not_allowed"),
        (JwtError::UnknownKid("x".into()), "jwt.unknown_kid"),
        (JwtError::BadSignature, "jwt.bad_signature"),
        (JwtError::Expired, "jwt.expired"),
        (JwtError::NotYetValid, "jwt.not_yet_valid"),
        (JwtError::WrongIssuer("x"), "jwt.wrong_issuer"),
        (JwtError::WrongAudience, "jwt.wrong_audience"),
        (
            JwtError::KeysUnavailable("x".into()),
            "jwt.keys_unavailable",
        ),
    ];
    for (err, code) in all {
        assert_eq!(err.code(), code);
        assert!(err.to_string().starts_with(code));
    }
}

#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let v = JwtVerifier::new(&[], JwtOptions::default()).unwrap();
    let headers = HeaderMap::new();
    assert_send(&v.verify(&headers));
    assert_send(&v.verify_token("a.b.c"));
}
