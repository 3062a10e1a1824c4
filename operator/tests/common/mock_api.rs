//! A Kubernetes API server at the HTTP boundary: `kube::Client` talks to
//! this tower `Service`, which answers with the JSON shapes, status codes and
//! metadata a real API server produces (Secrets: GET 200/404, POST 201/409
//! AlreadyExists; TokenReview: POST 201 with `status`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub body: Option<Value>,
    pub status: u16,
}

#[derive(Default)]
struct State {
    secrets: HashMap<(String, String), Value>,
    requests: Vec<Recorded>,
    /// token -> TokenReview `status`, or an HTTP error code for the request.
    reviews: HashMap<String, Result<Value, u16>>,
}

#[derive(Clone, Default)]
pub struct MockApi {
    state: Arc<Mutex<State>>,
    resource_version: Arc<AtomicU64>,
    /// When set, the first `n` Secret GETs wait for each other, so racing
    /// operators all see 404 before any of them POSTs.
    get_barrier: Option<(usize, Arc<tokio::sync::Barrier>)>,
    gets: Arc<AtomicUsize>,
}

impl MockApi {
    pub fn new() -> Self {
        Self {
            resource_version: Arc::new(AtomicU64::new(48_213)),
            ..Self::default()
        }
    }

    pub fn with_racing_gets(mut self, n: usize) -> Self {
        self.get_barrier = Some((n, Arc::new(tokio::sync::Barrier::new(n))));
        self
    }

    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn put_secret(&self, namespace: &str, secret: Value) {
        let name = secret["metadata"]["name"].as_str().unwrap().to_owned();
        let stored = self.stamp(namespace, secret);
        self.state
            .lock()
            .unwrap()
            .secrets
            .insert((namespace.to_owned(), name), stored);
    }

    pub fn answer_review(&self, token: &str, status: Value) {
        self.state
            .lock()
            .unwrap()
            .reviews
            .insert(token.to_owned(), Ok(status));
    }

    pub fn fail_review(&self, token: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .reviews
            .insert(token.to_owned(), Err(code));
    }

    /// Server-set metadata, as the API server adds it on create.
    fn stamp(&self, namespace: &str, mut obj: Value) -> Value {
        let rv = self.resource_version.fetch_add(1, Ordering::SeqCst);
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("namespace".into(), json!(namespace));
        meta.insert(
            "uid".into(),
            json!(format!("6f1c1f0e-0000-4000-8000-{rv:012}")),
        );
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), json!("2025-06-01T10:00:00Z"));
        meta.insert(
            "managedFields".into(),
            json!([{
                "manager": "palisade-operator",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2025-06-01T10:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:data": {}, "f:type": {}}
            }]),
        );
        obj
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(&bytes).expect("kube sends JSON"))
        };
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (code, answer) = match (&method, segments.as_slice()) {
            (&Method::GET, ["api", "v1", "namespaces", ns, "secrets", name]) => {
                let found = self
                    .state
                    .lock()
                    .unwrap()
                    .secrets
                    .get(&(ns.to_string(), name.to_string()))
                    .cloned();
                // Answer only after the racing GETs have all been looked up,
                // so each of them sees the state before any POST.
                if let Some((n, barrier)) = &self.get_barrier
                    && self.gets.fetch_add(1, Ordering::SeqCst) < *n
                {
                    barrier.wait().await;
                }
                match found {
                    Some(secret) => (200, secret),
                    None => (
                        404,
                        status_failure(
                            404,
                            "NotFound",
                            &format!("secrets \"{name}\" not found"),
                            name,
                        ),
                    ),
                }
            }
            (&Method::POST, ["api", "v1", "namespaces", ns, "secrets"]) => {
                let secret = body.clone().expect("POST has a body");
                assert_eq!(secret["kind"], "Secret");
                assert_eq!(secret["apiVersion"], "v1");
                let name = secret["metadata"]["name"].as_str().unwrap().to_owned();
                let stored = self.stamp(ns, secret);
                // One lock around check-and-insert: creation is atomic on a
                // real API server too.
                let mut state = self.state.lock().unwrap();
                match state.secrets.entry((ns.to_string(), name.clone())) {
                    std::collections::hash_map::Entry::Occupied(_) => (
                        409,
                        status_failure(
                            409,
                            "AlreadyExists",
                            &format!("secrets \"{name}\" already exists"),
                            &name,
                        ),
                    ),
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(stored.clone());
                        (201, stored)
                    }
                }
            }
            (&Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
                let review = body.clone().expect("POST has a body");
                let token = review["spec"]["token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let answer = self.state.lock().unwrap().reviews.get(&token).cloned();
                match answer {
                    Some(Ok(status)) => (201, token_review(&review, status)),
                    Some(Err(403)) => (
                        403,
                        json!({
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure",
                            "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:palisade-system:palisade-operator\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
                            "reason": "Forbidden",
                            "details": {"group": "authentication.k8s.io", "kind": "tokenreviews"},
                            "code": 403
                        }),
                    ),
                    Some(Err(code)) => (code, status_failure(code, "InternalError", "boom", "")),
                    // Unknown tokens: what the API server answers for garbage.
                    None => (
                        201,
                        token_review(
                            &review,
                            json!({"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}),
                        ),
                    ),
                }
            }
            _ => (
                404,
                status_failure(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                    "",
                ),
            ),
        };
        self.state.lock().unwrap().requests.push(Recorded {
            method,
            path,
            body,
            status: code,
        });
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .header("content-type", "application/json")
            .header("audit-id", "0d6c5a4e-5d3c-4a5b-9b1e-0c6f1c1f0e00")
            .body(Full::new(Bytes::from(answer.to_string())))
            .unwrap()
    }
}

/// The API server's answer to the TokenReview `request`: it echoes the
/// spec and adds the status.
fn token_review(request: &Value, status: Value) -> Value {
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": request["spec"],
        "status": status,
    })
}

fn status_failure(code: u16, reason: &str, message: &str, name: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": "secrets"},
        "code": code
    })
}
