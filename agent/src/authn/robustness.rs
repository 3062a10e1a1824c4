//! Property-based robustness tests of credential checking (DESIGN §6: each
//! inbound step has its tests and a fuzz target beside it; on the stable
//! toolchain the fuzz target is a proptest). Tokens, keys and JWKS documents
//! are all attacker- or IdP-controlled bytes.
//!
//! - [`JwtVerifier`]: garbage, base64 garbage, tokens with any JOSE header and
//!   a real-looking claim set, and a real token with one character changed,
//!   never verify (and never panic); the real token does.
//! - [`ApiKeyVerifier`]: `Ok` exactly for a stored key (modulo surrounding
//!   whitespace), for any header value.
//! - [`KeySet::from_json`]: any JSON (and any bytes) is parsed or refused
//!   without panicking, with consistent counts; a verifier built on such a
//!   document never panics checking a token against its keys.

use std::sync::{Arc, LazyLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue};
use palisade_proto::policy::v1::jwt_provider::Keys;
use palisade_proto::policy::v1::{ApiKeyAuth, ApiKeyHash, JwtProvider};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::jwks::{JwksError, KeySet, MAX_KEYS};
use super::test_support::{TestKey, hand_token, jwks_json};
use super::{ApiKeyError, ApiKeyVerifier, JwtOptions, JwtVerifier, ManualClock};

const T0: i64 = 1_700_000_000;
const ISS: &str = "https://idp.example";
const AUD: &str = "orders";

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
});

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

fn options() -> JwtOptions {
    JwtOptions {
        clock: Arc::new(ManualClock::new(T0)),
        ..JwtOptions::default()
    }
}

fn claims() -> Value {
    json!({ "iss": ISS, "aud": AUD, "sub": "alice", "exp": T0 + 600, "iat": T0 })
}

/// A verifier trusting one key of each type, and a valid token of each.
struct Fixture {
    verifier: JwtVerifier,
    tokens: Vec<String>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let keys = [TestKey::rsa("r1"), TestKey::ec("e1"), TestKey::ed("d1")];
    let refs: Vec<&TestKey> = keys.iter().collect();
    let verifier =
        JwtVerifier::new(&[provider(Keys::JwksJson(jwks_json(&refs)))], options()).unwrap();
    let tokens = keys.iter().map(|k| k.sign(&claims())).collect();
    Fixture { verifier, tokens }
});

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------
// Strategies: JSON.

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        select(vec![
            "RSA", "EC", "OKP", "oct", "P-256", "P-384", "Ed25519", "X25519", "sig", "enc",
            "RS256", "ES256", "EdDSA", "HS256", "none", "AQAB", "AA", "", "r1", "e1", "d1", ISS,
            AUD,
        ])
        .prop_map(Value::from),
        // base64url of a length the parsers care about (32, 256, 257 bytes).
        (
            select(vec![0usize, 1, 3, 31, 32, 33, 255, 256, 257]),
            any::<u8>()
        )
            .prop_map(|(n, b)| Value::from(b64(&vec![b; n]))),
        any::<String>().prop_map(Value::from),
    ]
}

const JWK_MEMBERS: &[&str] = &[
    "kty", "crv", "x", "y", "n", "e", "kid", "use", "alg", "keys", "d", "k", "p", "oth", "crit",
    "iss", "exp", "nbf", "aud",
];

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![4 => select(JWK_MEMBERS).prop_map(str::to_owned), 1 => any::<String>()],
                    inner
                ),
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JWK-shaped object: a real type and curve with random members.
fn jwk_like() -> impl Strategy<Value = Value> {
    (
        select(vec!["RSA", "EC", "OKP", "oct", "x"]),
        select(vec!["P-256", "Ed25519", "P-384"]),
        proptest::collection::vec((select(JWK_MEMBERS), json_leaf()), 0..6),
        proptest::option::of(select(vec!["r1", "e1", "d1", "zz"])),
    )
        .prop_map(|(kty, crv, members, kid)| {
            let mut o = serde_json::Map::new();
            o.insert("kty".into(), kty.into());
            o.insert("crv".into(), crv.into());
            for (k, v) in members {
                if k != "kty" {
                    o.insert(k.into(), v);
                }
            }
            if let Some(kid) = kid {
                o.insert("kid".into(), kid.into());
            }
            Value::Object(o)
        })
}

fn jwks_doc() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => json_value(),
        3 => proptest::collection::vec(prop_oneof![jwk_like(), json_value()], 0..80)
            .prop_map(|keys| json!({ "keys": keys })),
    ]
}

// ---------------------------------------------------------------------------
// Strategies: tokens.

fn b64ish() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| b64(&b)),
        "[A-Za-z0-9_-]{0,100}",
        "[A-Za-z0-9_+/=-]{0,40}",
    ]
}

fn jose_header() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(prop_oneof![
            4 => select(vec!["RS256", "ES256", "EdDSA", "none", "HS256", "RS512", "ES384", ""])
                .prop_map(Value::from),
            1 => json_leaf(),
        ]),
        proptest::option::of(prop_oneof![
            select(vec!["r1", "e1", "d1", "nope"]).prop_map(Value::from),
            json_leaf(),
        ]),
        proptest::collection::vec((select(JWK_MEMBERS), json_leaf()), 0..3),
    )
        .prop_map(|(alg, kid, extra)| {
            let mut o = serde_json::Map::new();
            for (k, v) in extra {
                o.insert(k.into(), v);
            }
            if let Some(alg) = alg {
                o.insert("alg".into(), alg);
            }
            if let Some(kid) = kid {
                o.insert("kid".into(), kid);
            }
            Value::Object(o)
        })
}

fn token_claims() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => Just(claims()),
        1 => json_value(),
        1 => (json_leaf(), json_leaf(), json_leaf()).prop_map(|(exp, nbf, aud)| {
            json!({ "iss": ISS, "exp": exp, "nbf": nbf, "aud": aud })
        }),
    ]
}

fn garbage_token() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,200}",
        (b64ish(), b64ish(), b64ish()).prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
        (
            jose_header(),
            token_claims(),
            proptest::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(h, c, s)| hand_token(&h, &c, &s)),
    ]
}

fn verify_token(v: &JwtVerifier, token: &str) -> Result<super::VerifiedJwt, super::JwtError> {
    RT.block_on(v.verify_token(token))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// No key can verify garbage, whatever shape it has.
    #[test]
    fn jwt_garbage_never_verifies(token in garbage_token()) {
        let r = verify_token(&FIXTURE.verifier, &token);
        prop_assert!(r.is_err(), "verified {:?}", token);
        // The error never carries the token (when the token is not trivially
        // short enough to occur in the fixed texts).
        let e = r.unwrap_err();
        if token.len() > 16 {
            prop_assert!(!e.to_string().contains(&token));
        }
    }

    /// Through the header path too: any `authorization` value(s).
    #[test]
    fn jwt_any_authorization_header_never_verifies(
        values in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(
                    prop_oneof![8 => 0x20u8..0x7f, 1 => Just(b'\t'), 1 => 0x80u8..=0xff],
                    0..200,
                )
                .prop_map(|b| HeaderValue::from_bytes(&b).unwrap()),
                garbage_token().prop_filter_map("not a header value", |t| {
                    HeaderValue::from_str(&format!("Bearer {t}")).ok()
                }),
            ],
            0..3,
        ),
    ) {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(http::header::AUTHORIZATION, v);
        }
        prop_assert!(RT.block_on(FIXTURE.verifier.verify(&h)).is_err());
    }

    /// A real token with one character of it replaced never verifies.
    #[test]
    fn jwt_one_changed_character_never_verifies(
        which in 0..3usize,
        at in any::<proptest::sample::Index>(),
        with in prop_oneof![
            proptest::char::range('A', 'Z'),
            proptest::char::range('a', 'z'),
            proptest::char::range('0', '9'),
            Just('-'), Just('_'), Just('.'), Just('='), Just(' '),
        ],
    ) {
        let good = &FIXTURE.tokens[which];
        prop_assert!(verify_token(&FIXTURE.verifier, good).is_ok());
        let i = at.index(good.len());
        prop_assume!(good.as_bytes()[i] != with as u8);
        let mut bad = good.clone().into_bytes();
        bad[i] = with as u8;
        let bad = String::from_utf8(bad).unwrap();
        prop_assert!(verify_token(&FIXTURE.verifier, &bad).is_err(), "{}", bad);
    }

    /// `Ok` exactly for a stored key, whatever the header holds.
    #[test]
    fn api_key_ok_only_for_the_real_key(
        values in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(
                    prop_oneof![8 => 0x20u8..0x7f, 1 => Just(b'\t'), 1 => 0x80u8..=0xff],
                    0..64,
                ),
                (select(vec![" ", "\t", ""]), select(vec![API_KEY, OTHER_KEY]), select(vec![" ", "\t", "", "x"]))
                    .prop_map(|(a, k, b)| format!("{a}{k}{b}").into_bytes()),
                (any::<proptest::sample::Index>(), 0x21u8..0x7f).prop_map(|(i, c)| {
                    let mut k = API_KEY.as_bytes().to_vec();
                    let i = i.index(k.len());
                    k[i] = c;
                    k
                }),
            ],
            0..3,
        ),
    ) {
        let v = ApiKeyVerifier::new(&ApiKeyAuth {
            header: "x-api-key".into(),
            keys: vec![
                ApiKeyHash { client_id: "billing".into(), sha256: Sha256::digest(API_KEY).to_vec() },
                ApiKeyHash { client_id: "reports".into(), sha256: Sha256::digest(OTHER_KEY).to_vec() },
            ],
        })
        .unwrap();
        let mut h = HeaderMap::new();
        for b in &values {
            h.append("x-api-key", HeaderValue::from_bytes(b).unwrap());
        }
        let got = v.verify(&h);
        match values.as_slice() {
            [] => prop_assert_eq!(got, Err(ApiKeyError::Missing)),
            [one] => {
                let trimmed = one.trim_ascii();
                let want = if trimmed == API_KEY.as_bytes() {
                    Ok("billing")
                } else if trimmed == OTHER_KEY.as_bytes() {
                    Ok("reports")
                } else {
                    Err(ApiKeyError::Unknown)
                };
                prop_assert_eq!(got, want);
            }
            _ => prop_assert_eq!(got, Err(ApiKeyError::Ambiguous)),
        }
    }

    /// Any JSON document: parsed or refused, never a panic, and the counts
    /// add up.
    #[test]
    fn jwks_any_json_is_parsed_or_refused(doc in jwks_doc()) {
        let text = doc.to_string();
        match KeySet::from_json(text.as_bytes()) {
            Ok(set) => {
                let keys = doc["keys"].as_array().expect("accepted only with a keys array");
                prop_assert!(set.len() <= MAX_KEYS);
                prop_assert_eq!(set.len() + set.skipped(), keys.len());
                for k in set.keys() {
                    if let Some(kid) = &k.kid {
                        prop_assert!(set.has_kid(kid));
                        prop_assert!(set.candidates(Some(kid)).count() >= 1);
                    }
                }
                prop_assert_eq!(set.candidates(None).count(), set.len());
            }
            Err(JwksError::PrivateMember { index, member }) => {
                prop_assert!(doc["keys"][index].get(member).is_some());
            }
            Err(JwksError::Malformed(_)) => {
                prop_assert!(doc.get("keys").and_then(Value::as_array).is_none());
            }
            Err(JwksError::TooLarge) => prop_assert!(text.len() > super::jwks::MAX_JWKS_BYTES),
        }
    }

    /// Any bytes as a JWKS document: no panic.
    #[test]
    fn jwks_any_bytes_never_panic(doc in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = KeySet::from_json(&doc);
    }
}

const API_KEY: &str = "pk_live_4f9a1c0e7b2d4c8a9e6f";
const OTHER_KEY: &str = "pk_live_0000ffff1111eeee2222";

proptest! {
    // Each case builds a verifier (and may check signatures with random
    // key material): fewer cases.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A verifier built on any JWKS document (random RSA moduli, EC points,
    /// Ed25519 keys) never panics checking a token against those keys, and
    /// no such key verifies a random signature.
    #[test]
    fn jwt_with_random_key_material_never_panics(
        keys in proptest::collection::vec(jwk_like(), 0..6),
        header in jose_header(),
        signature in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let doc = json!({ "keys": keys }).to_string();
        let Ok(v) = JwtVerifier::new(&[provider(Keys::JwksJson(doc))], options()) else {
            return Ok(());
        };
        let token = hand_token(&header, &claims(), &signature);
        prop_assert!(verify_token(&v, &token).is_err());
    }
}
