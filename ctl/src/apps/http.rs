//! The demo HTTP JSON API: a small shop (orders, payments with card numbers,
//! partner quotes, a legacy /v1, an admin area). Every answer names the
//! caller the agent vouched for (`x-forwarded-client-cert`) so a demo can
//! show who got through. `/call/<service>/<path>` calls another service
//! through this app's agent (`--upstream NAME=ADDR`), as a frontend would.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

/// The app's name (in every answer) and the services `/call/` reaches.
#[derive(Clone, Debug, Default)]
pub struct HttpApp {
    pub name: String,
    pub upstreams: BTreeMap<String, SocketAddr>,
    /// Every request that reached the app: method, path, `x-request-id`.
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub request_id: String,
}

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, app: HttpApp) {
    let app = Arc::new(app);
    while let Ok((tcp, _)) = listener.accept().await {
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(answer(&app, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The caller's SPIFFE ID from the agent's `x-forwarded-client-cert`.
fn caller(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
        .unwrap_or("")
        .to_owned()
}

async fn answer(app: &HttpApp, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let caller = caller(&req);
    if let Ok(mut seen) = app.seen.lock() {
        seen.push(Seen {
            method: method.to_string(),
            path: path.clone(),
            request_id: req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
        });
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let served = |mut v: Value| {
        v["served_by"] = json!(app.name);
        v["caller"] = json!(caller);
        v
    };
    match (&method, segments.as_slice()) {
        (_, ["call", service, rest @ ..]) => {
            call_upstream(app, service, &rest.join("/"), req.uri().query()).await
        }
        (&Method::GET, ["items", sku]) => match app.upstreams.get("inventory") {
            // Through this app's agent to the gRPC inventory service.
            Some(addr) => match super::grpc::call(*addr, super::grpc::GET_ITEM, sku).await {
                Ok(item) => json_response(
                    StatusCode::OK,
                    &served(json!({
                        "sku": item.sku, "name": item.name, "stock": item.stock,
                        "inventory_saw": item.caller,
                    })),
                ),
                Err(status) => json_response(
                    StatusCode::BAD_GATEWAY,
                    &served(json!({
                        "error": "inventory refused",
                        "grpc_status": format!("{:?}", status.code()),
                        "message": status.message(),
                    })),
                ),
            },
            None => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("{} has no upstream \"inventory\"", app.name)}),
            ),
        },
        (&Method::GET, ["healthz"]) => json_response(StatusCode::OK, &json!({"ok": true})),
        (&Method::GET, ["orders"]) => json_response(
            StatusCode::OK,
            &served(json!({"orders": [{"id": "1001", "status": "shipped"}]})),
        ),
        (&Method::GET, ["orders", id]) | (&Method::GET, ["v1", "orders", id]) => json_response(
            StatusCode::OK,
            &served(json!({"id": id, "status": "shipped", "total_cents": 4200})),
        ),
        (&Method::DELETE, ["orders", id]) => {
            json_response(StatusCode::OK, &served(json!({"id": id, "deleted": true})))
        }
        (&Method::POST, ["orders"]) | (&Method::POST, ["payments"]) => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            json_response(
                StatusCode::CREATED,
                &served(json!({"accepted": true, "bytes": body.len()})),
            )
        }
        (&Method::GET, ["payments", id]) => json_response(
            StatusCode::OK,
            &served(json!({
                "id": id,
                "amount": 4200,
                "currency": "EUR",
                "card": {"number": "4111111111111111", "expiry": "12/29", "cvv": "123"}
            })),
        ),
        (&Method::GET, ["reports", name]) => json_response(
            StatusCode::OK,
            &served(json!({"report": name, "orders": 17})),
        ),
        (&Method::GET, ["partner", "quotes"]) => json_response(
            StatusCode::OK,
            &served(json!({"quotes": [{"sku": "A-1", "price_cents": 990}]})),
        ),
        (_, ["admin", ..]) => json_response(
            StatusCode::OK,
            &served(json!({"admin": true, "path": path})),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &served(json!({"error": "not found", "path": path})),
        ),
    }
}

/// `GET /<rest>` on the upstream `service` (plaintext to this app's agent,
/// which tunnels it over mTLS); its answer is passed back.
async fn call_upstream(
    app: &HttpApp,
    service: &str,
    rest: &str,
    query: Option<&str>,
) -> Response<Full<Bytes>> {
    let Some(addr) = app.upstreams.get(service) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("{} has no upstream {service:?}", app.name)}),
        );
    };
    let target = match query {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    match get(*addr, &target).await {
        Ok((status, content_type, body)) => {
            let mut r = Response::new(Full::new(body));
            *r.status_mut() = status;
            if let Some(ct) = content_type {
                r.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            r
        }
        Err(e) => json_response(
            StatusCode::BAD_GATEWAY,
            &json!({"error": format!("calling {service}: {e}")}),
        ),
    }
}

async fn get(
    addr: SocketAddr,
    target: &str,
) -> anyhow::Result<(StatusCode, Option<header::HeaderValue>, Bytes)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(target)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, ct, body))
}
