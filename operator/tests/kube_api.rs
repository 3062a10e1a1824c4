//! Kubernetes mode at the HTTP boundary: the CA Secret (create-if-absent,
//! the 201/409 race, user-provided and cert-manager Secrets) and TokenReview
//! (the request the operator sends, and how it judges each answer), plus
//! the identity service over real TLS and gRPC backed by TokenReview.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::mock_api::MockApi;
use common::*;
use palisade_operator::ca::{self, Ca, CaMaterial, Origin};
use palisade_operator::identity::IssuanceCounters;
use palisade_operator::server::{ServeConfig, Server};
use palisade_operator::tokens::review::TokenReviewer;
use palisade_operator::tokens::{ServiceAccount, TokenError, TokenValidator};
use serde_json::json;
use tonic::Code;

const NS: &str = "palisade-system";
const SECRET: &str = "palisade-identity";

fn generate() -> Result<CaMaterial, ca::CaError> {
    ca::generate::generate_root(SystemTime::now())
}

fn b64(text: &str) -> String {
    // Reuse the PEM encoder's base64 by stripping the armour.
    palisade_operator::ca::pem::encode("X", text.as_bytes())
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect()
}

#[tokio::test]
async fn racing_operators_create_one_secret_and_share_it() {
    let api = MockApi::new().with_racing_gets(2);
    let (a, b) = tokio::join!(
        ca::secret::load_or_create(api.client(), NS, SECRET, generate),
        ca::secret::load_or_create(api.client(), NS, SECRET, generate),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut origins = [a.1, b.1];
    origins.sort_by_key(|o| *o == Origin::Existing);
    assert_eq!(origins, [Origin::Created, Origin::Existing]);
    assert_eq!(a.0, b.0, "both operators hold the same CA");
    let (ca_a, ca_b) = (Ca::load(&a.0).unwrap(), Ca::load(&b.0).unwrap());
    assert_eq!(ca_a.root_fingerprints(), ca_b.root_fingerprints());

    let requests = api.requests();
    let calls: Vec<(String, u16)> = requests
        .iter()
        .map(|r| (format!("{} {}", r.method, r.path), r.status))
        .collect();
    let get = format!("GET /api/v1/namespaces/{NS}/secrets/{SECRET}");
    let post = format!("POST /api/v1/namespaces/{NS}/secrets");
    assert_eq!(
        calls.iter().filter(|c| **c == (get.clone(), 404)).count(),
        2,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| **c == (post.clone(), 201)).count(),
        1,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| **c == (post.clone(), 409)).count(),
        1,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| **c == (get.clone(), 200)).count(),
        1,
        "{calls:?}"
    );

    // The Secret the winner POSTed: our keys, base64 PEM, Opaque, labelled.
    let created = requests
        .iter()
        .find(|r| r.method == http::Method::POST && r.status == 201)
        .unwrap()
        .body
        .clone()
        .unwrap();
    assert_eq!(created["metadata"]["name"], SECRET);
    assert_eq!(created["metadata"]["namespace"], NS);
    assert_eq!(created["type"], "Opaque");
    assert_eq!(
        created["metadata"]["labels"]["app.kubernetes.io/name"],
        "palisade"
    );
    let data = created["data"].as_object().unwrap();
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["issuer-key.pem", "issuer.pem", "trust-bundle.pem"]);
    let winner = if a.1 == Origin::Created { &a.0 } else { &b.0 };
    assert_eq!(data["trust-bundle.pem"], b64(&winner.trust_bundle_pem));
}

/// Loads the CA Secret `api` holds; generating one fails the test.
async fn load_existing(api: &MockApi) -> (CaMaterial, Origin) {
    ca::secret::load_or_create(api.client(), NS, SECRET, || {
        Err::<CaMaterial, _>("must not generate")
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn an_existing_secret_is_used_and_never_recreated() {
    let pki = user_pki();
    let api = MockApi::new();
    api.put_secret(
        NS,
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": SECRET},
            "data": {
                "issuer.pem": b64(&pki.intermediate_pem),
                "issuer-key.pem": b64(&pki.intermediate_key_pem),
                "chain.pem": b64(&pki.root_pem),
                "trust-bundle.pem": b64(&pki.root_pem),
            }
        }),
    );
    let (material, origin) = load_existing(&api).await;
    assert_eq!(origin, Origin::Existing);
    let ca = Ca::load(&material).unwrap();
    assert_eq!(ca.intermediates(), &[der(&pki.intermediate_pem)]);
    assert!(api.requests().iter().all(|r| r.method == http::Method::GET));
}

#[tokio::test]
async fn a_cert_manager_secret_works_as_is() {
    let pki = user_pki();
    let api = MockApi::new();
    // cert-manager: tls.crt = the issued CA cert followed by its chain.
    api.put_secret(
        NS,
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": SECRET, "annotations": {"cert-manager.io/certificate-name": "palisade-identity"}},
            "data": {
                "tls.crt": b64(&format!("{}{}", pki.intermediate_pem, pki.root_pem)),
                "tls.key": b64(&pki.intermediate_key_pem),
                "ca.crt": b64(&pki.root_pem),
            }
        }),
    );
    let (material, _) = load_existing(&api).await;
    let ca = Ca::load(&material).unwrap();
    assert_eq!(ca.intermediates(), &[der(&pki.intermediate_pem)]);
    assert_eq!(ca.trust_bundle(), &[der(&pki.root_pem)]);
}

fn authenticated(user: &str, audiences: &[&str]) -> serde_json::Value {
    json!({
        "authenticated": true,
        "user": {
            "username": user,
            "uid": "3c1f5f1e-8a7b-4c2d-9e0f-1a2b3c4d5e6f",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": ["orders-7d9f8b6c5-x2x4z"],
                "authentication.kubernetes.io/pod-uid": ["0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"]
            }
        },
        "audiences": audiences
    })
}

fn scripted_api() -> MockApi {
    let api = MockApi::new();
    api.answer_review(
        "good-token",
        authenticated("system:serviceaccount:shop:orders", &["palisade.dev"]),
    );
    // What the API server says when the token was minted for another audience.
    api.answer_review(
        "other-audience-token",
        json!({
            "user": {},
            "audiences": ["palisade.dev"],
            "error": "[invalid bearer token, token audiences [\"https://kubernetes.default.svc.cluster.local\"] is invalid for the target audiences [\"palisade.dev\"]]"
        }),
    );
    // An authenticator that ignores audiences and answers with its own.
    api.answer_review(
        "wrong-audience-token",
        authenticated(
            "system:serviceaccount:shop:orders",
            &["https://kubernetes.default.svc.cluster.local"],
        ),
    );
    api.answer_review(
        "user-token",
        authenticated("alice@example.com", &["palisade.dev"]),
    );
    api.answer_review(
        "node-token",
        authenticated("system:node:worker-1", &["palisade.dev"]),
    );
    api.fail_review("forbidden-token", 403);
    api
}

#[tokio::test]
async fn token_review_request_and_judgement() {
    let api = scripted_api();
    let reviewer = TokenReviewer::new(api.client(), palisade_operator::TOKEN_AUDIENCE);

    assert_eq!(
        reviewer.validate("good-token").await.unwrap(),
        ServiceAccount::new("shop", "orders").unwrap()
    );
    // The request at the HTTP boundary.
    let sent = api.requests().pop().unwrap();
    assert_eq!(sent.method, http::Method::POST);
    assert_eq!(sent.path, "/apis/authentication.k8s.io/v1/tokenreviews");
    let body = sent.body.unwrap();
    assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(
        body["spec"],
        json!({"token": "good-token", "audiences": ["palisade.dev"]})
    );
    assert!(body.get("status").is_none());

    for token in [
        "other-audience-token",
        "wrong-audience-token",
        "user-token",
        "node-token",
        "garbage-token",
    ] {
        let err = reviewer.validate(token).await.unwrap_err();
        assert!(matches!(err, TokenError::Rejected(_)), "{token}: {err:?}");
        assert!(
            !err.to_string().contains(token),
            "the reason must not echo the token"
        );
    }
    let err = reviewer.validate("forbidden-token").await.unwrap_err();
    assert!(matches!(err, TokenError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn certify_over_tls_with_token_review() {
    install_ring();
    let api = scripted_api();
    let (material, _) = ca::secret::load_or_create(api.client(), NS, SECRET, generate)
        .await
        .unwrap();
    let ca = Arc::new(Ca::load(&material).unwrap());
    let counters = Arc::new(IssuanceCounters::default());
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        trust_domain: "cluster.local".into(),
        namespace: NS.into(),
        cert_ttl: Duration::from_secs(3600),
    };
    let reviewer = Arc::new(TokenReviewer::new(
        api.client(),
        palisade_operator::TOKEN_AUDIENCE,
    ));
    let server = Server::bind(&config, ca.clone(), reviewer, counters.clone())
        .await
        .unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let bundle = ca.trust_bundle_pem().concat();
    let mut client = client(addr, &bundle).await;
    let (_k, csr_pem) = csr(vec![uri_san(
        "spiffe://cluster.local/ns/kube-system/sa/admin",
    )]);
    let resp = certify(&mut client, "good-token", &csr_pem, 0)
        .await
        .unwrap();
    assert_eq!(resp.spiffe_id, "spiffe://cluster.local/ns/shop/sa/orders");
    assert_eq!(
        sans(&chain_der(&resp)[0]),
        vec!["URI:spiffe://cluster.local/ns/shop/sa/orders".to_owned()]
    );
    verify(&chain_der(&resp), &bundle_der(&resp)).unwrap();

    let err = certify(&mut client, "wrong-audience-token", &csr_pem, 0)
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "token not accepted")
    );
    // The API server refusing us is not the caller's fault: retryable, no detail.
    let err = certify(&mut client, "forbidden-token", &csr_pem, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(!err.message().contains("forbidden"));
    // A valid token with a bad CSR.
    let err = certify(&mut client, "good-token", "junk", 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let totals = counters.snapshot();
    assert_eq!((totals.issued, totals.refused(), totals.failed), (1, 2, 1));
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}
