//! Keys, tokens and a tiny JWKS server for the authn tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const RSA_PEM: &str = include_str!("../../tests/data/jwt-test-rsa-2048.pem");
pub const RSA_PUB_PEM: &str = include_str!("../../tests/data/jwt-test-rsa-2048.pub.pem");

/// A signing key and its public JWK.
pub struct TestKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    pub fn rsa(kid: &str) -> TestKey {
        let encoding = EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap();
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
        let mut jwk = serde_json::to_value(jwk).unwrap();
        jwk.as_object_mut().unwrap().remove("alg");
        TestKey {
            kid: Some(kid.into()),
            alg: Algorithm::RS256,
            encoding,
            jwk,
        }
    }

    pub fn ec(kid: &str) -> TestKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let encoding = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 65);
        let jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
        });
        TestKey {
            kid: Some(kid.into()),
            alg: Algorithm::ES256,
            encoding,
            jwk,
        }
    }

    pub fn ed(kid: &str) -> TestKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let encoding = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
        let jwk = json!({
            "kty": "OKP", "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(kp.public_key_raw()),
        });
        TestKey {
            kid: Some(kid.into()),
            alg: Algorithm::EdDSA,
            encoding,
            jwk,
        }
    }

    /// The public JWK, with `kid` and `use: sig`.
    pub fn jwk(&self) -> Value {
        let mut jwk = self.jwk.clone();
        if let Some(kid) = &self.kid {
            jwk["kid"] = kid.clone().into();
        }
        jwk["use"] = "sig".into();
        jwk
    }

    /// A token over `claims`, signed with this key, naming its kid.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

pub fn jwks_json(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

/// `<header>.<payload>.<signature>` from raw JSON and signature bytes.
pub fn hand_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// Serves a JWKS at `/jwks` on 127.0.0.1; body, status and Cache-Control can
/// change mid-test, and requests are counted.
pub struct JwksServer {
    pub addr: SocketAddr,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

struct ServerState {
    body: Mutex<String>,
    cache_control: Mutex<Option<String>>,
    status: AtomicU16,
    hits: AtomicUsize,
}

impl JwksServer {
    pub async fn start(body: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState {
            body: Mutex::new(body),
            cache_control: Mutex::new(None),
            status: AtomicU16::new(200),
            hits: AtomicUsize::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                        let st = st.clone();
                        async move {
                            st.hits.fetch_add(1, Ordering::SeqCst);
                            let mut resp = Response::builder()
                                .status(
                                    StatusCode::from_u16(st.status.load(Ordering::SeqCst)).unwrap(),
                                )
                                .header("content-type", "application/json");
                            if let Some(cc) = st.cache_control.lock().clone() {
                                resp = resp.header("cache-control", cc);
                            }
                            let body = st.body.lock().clone();
                            Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        JwksServer { addr, state, task }
    }

    pub fn uri(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    pub fn set_body(&self, body: String) {
        *self.state.body.lock() = body;
    }

    pub fn set_cache_control(&self, value: Option<&str>) {
        *self.state.cache_control.lock() = value.map(str::to_owned);
    }

    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address nothing listens on.
pub async fn dead_uri() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/jwks")
}
