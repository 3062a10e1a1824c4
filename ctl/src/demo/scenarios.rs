//! The demo's scripted traffic. Each scenario sends real requests through
//! the agents and checks what came back (and what reached the apps, and
//! what the collector stored); its line says what was expected and seen.
//!
//! Most traffic goes through the outbound listener of `web`: plaintext
//! from the demo, mTLS as `spiffe://cluster.local/ns/shop/sa/web` from
//! there to the service's inbound agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use palisade_collector::event::StoredRow;

use super::Apps;
use super::client::{self, Answer, Call};
use super::jwt::Issuer;
use crate::apps::grpc;
use crate::audit::client::{CollectorArgs, QueryClient};
use crate::mesh::{Mesh, admin};
use crate::output::outln;
use crate::progress::Progress;

pub struct Context<'a> {
    pub mesh: &'a Mesh,
    pub apps: &'a Apps,
    pub issuer: Arc<Issuer>,
}

#[derive(serde::Serialize)]
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Request ids of the denials the scenarios caused (to find them in the
/// audit trail afterwards).
#[derive(Default)]
struct Denials(Vec<String>);

impl Denials {
    fn note(&mut self, a: &Answer) {
        if let Some(id) = a.request_id() {
            self.0.push(id);
        }
    }
}

impl Context<'_> {
    fn web(&self, callee: &str) -> anyhow::Result<SocketAddr> {
        let web = self.mesh.agent("web").context("no web agent")?;
        web.outbound
            .iter()
            .find(|(n, _)| n == callee)
            .map(|(_, a)| *a)
            .with_context(|| format!("web has no outbound listener for {callee}"))
    }

    fn inbound(&self, name: &str) -> anyhow::Result<SocketAddr> {
        self.mesh
            .agent(name)
            .and_then(|a| a.inbound)
            .with_context(|| format!("no inbound listener for {name}"))
    }

    fn web_id(&self) -> String {
        crate::mesh::spiffe_id(&self.mesh.trust_domain, "shop", "web")
    }

    fn query_client(&self) -> anyhow::Result<QueryClient> {
        QueryClient::new(&CollectorArgs {
            collector: self.mesh.collector.query.to_string(),
            trust_bundle: Some(self.mesh.bundle.clone()),
            trust_domain: self.mesh.trust_domain.clone(),
            collector_id: Some(self.mesh.collector.id.clone()),
            token_file: Some(self.mesh.query_token.clone()),
            cert: None,
            key: None,
        })
    }
}

fn expect_status(a: &Answer, want: u16, what: &str) -> anyhow::Result<()> {
    if a.status != want {
        bail!(
            "{what}: expected {want}, got {} {}",
            a.status,
            a.body.trim()
        );
    }
    Ok(())
}

/// Runs every scenario in order, printing each line as it completes.
pub async fn run_all(ctx: &Context<'_>, progress: Progress) -> Vec<Outcome> {
    let quiet_lines = !progress_visible(progress);
    let mut denials = Denials::default();
    let mut results = Vec::new();
    macro_rules! scenario {
        ($name:expr, $body:expr) => {{
            let step = progress.step($name);
            let outcome = match $body.await {
                Ok(detail) => Outcome {
                    name: $name.to_owned(),
                    ok: true,
                    detail,
                },
                Err(e) => Outcome {
                    name: $name.to_owned(),
                    ok: false,
                    detail: format!("{e:#}"),
                },
            };
            drop(step);
            if !quiet_lines {
                let mark = if outcome.ok { "✓" } else { "✗" };
                let _ = outln!("{mark} {}: {}", outcome.name, outcome.detail);
            }
            results.push(outcome);
        }};
    }
    scenario!("mTLS between services (HTTP)", mtls_http(ctx));
    scenario!("mTLS between services (gRPC)", mtls_grpc(ctx));
    scenario!("caller without a mesh identity refused", no_identity(ctx));
    scenario!("JWT roles", jwt_roles(ctx, &mut denials));
    scenario!(
        "partner API key rate limit",
        api_key_limit(ctx, &mut denials)
    );
    scenario!("body validation", body_validation(ctx, &mut denials));
    scenario!("response masking", masking(ctx));
    scenario!("deprecated route", deprecation(ctx));
    scenario!("path trick refused", path_trick(ctx, &mut denials));
    scenario!("audit-mode policy", audit_mode(ctx));
    scenario!("audit trail in the collector", audit_trail(ctx, &denials));
    scenario!("alert on a denial burst", alert(ctx));
    scenario!("metrics", metrics(ctx));
    results
}

fn progress_visible(progress: Progress) -> bool {
    progress.visible()
}

async fn mtls_http(ctx: &Context<'_>) -> anyhow::Result<String> {
    let a = client::send(ctx.web("orders")?, &Call::get("/orders/1001")).await?;
    expect_status(&a, 200, "GET /orders/1001 from web")?;
    let caller = a.json()["caller"].as_str().unwrap_or_default().to_owned();
    if caller != ctx.web_id() {
        bail!("orders saw caller {caller:?}, expected {}", ctx.web_id());
    }
    Ok(format!(
        "web → orders GET /orders/1001: 200, orders saw {caller}"
    ))
}

async fn mtls_grpc(ctx: &Context<'_>) -> anyhow::Result<String> {
    let addr = ctx.web("inventory")?;
    let item = grpc::call(addr, grpc::GET_ITEM, "A-1")
        .await
        .map_err(|s| anyhow::anyhow!("GetItem: {} {}", s.code(), s.message()))?;
    if item.caller != ctx.web_id() {
        bail!("inventory saw caller {:?}", item.caller);
    }
    match grpc::call(addr, grpc::DELETE_ITEM, "A-1").await {
        Err(s) if s.code() == tonic::Code::PermissionDenied => {}
        Err(s) => bail!("DeleteItem: expected PERMISSION_DENIED, got {}", s.code()),
        Ok(_) => bail!("DeleteItem: expected PERMISSION_DENIED, it was served"),
    }
    Ok("web → inventory GetItem: OK (caller web); DeleteItem: PERMISSION_DENIED".into())
}

async fn no_identity(ctx: &Context<'_>) -> anyhow::Result<String> {
    let addr = ctx.inbound("orders")?;
    let reached = |path: &str| {
        ctx.apps
            .orders
            .seen
            .lock()
            .map(|s| s.iter().any(|r| r.path == path))
            .unwrap_or(false)
    };
    // In plaintext.
    let plain = "/orders/plaintext-caller";
    let got = client::raw_exchange(
        addr,
        &format!("GET {plain} HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"),
    )
    .await?;
    let status = match got.strip_prefix("HTTP/") {
        Some(rest) => rest.split_whitespace().nth(1).unwrap_or("").to_owned(),
        None => String::new(),
    };
    if status.starts_with('2') || reached(plain) {
        bail!("plaintext GET {plain} straight to the orders agent was answered {status}");
    }
    let plain_seen = if status.is_empty() {
        "no HTTP answer".to_owned()
    } else {
        status.clone()
    };
    // Over TLS, without a client certificate.
    let tls = "/orders/tls-caller-without-certificate";
    let verdict =
        client::tls_without_certificate(addr, &ctx.mesh.bundle, &ctx.mesh.trust_domain, tls).await;
    if let Ok(status) = verdict
        && (200..300).contains(&status)
    {
        bail!("TLS without a client certificate, GET {tls}: answered {status}");
    }
    if reached(tls) {
        bail!("GET {tls} over TLS without a client certificate reached the app");
    }
    let tls_seen = match verdict {
        Ok(status) => status.to_string(),
        Err(_) => "handshake refused".to_owned(),
    };
    Ok(format!(
        "straight to the orders agent: plaintext → {plain_seen}; TLS without a certificate → {tls_seen}; the app saw neither"
    ))
}

async fn jwt_roles(ctx: &Context<'_>, denials: &mut Denials) -> anyhow::Result<String> {
    let addr = ctx.web("orders")?;
    let reader = ctx.issuer.token("alice", &["reader"])?;
    let writer = ctx.issuer.token("bob", &["writer"])?;
    let a = client::send(
        addr,
        &Call::get("/reports/daily").with("authorization", format!("Bearer {reader}")),
    )
    .await?;
    expect_status(&a, 200, "GET /reports/daily as reader")?;
    let mut call = Call::get("/admin/refunds").with("authorization", format!("Bearer {writer}"));
    call.method = "POST";
    let b = client::send(addr, &call).await?;
    expect_status(&b, 403, "POST /admin/refunds as writer")?;
    denials.note(&b);
    Ok("reader GET /reports/daily: 200; writer POST /admin/refunds: 403".into())
}

async fn api_key_limit(ctx: &Context<'_>, denials: &mut Denials) -> anyhow::Result<String> {
    let addr = ctx.web("partner-api")?;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let a = client::send(
            addr,
            &Call::get("/partner/quotes").with("x-api-key", "demo-partner-key"),
        )
        .await?;
        statuses.push(a.status);
        if a.status == 429 {
            retry_after = a.header("retry-after").map(str::to_owned);
            denials.note(&a);
        }
    }
    if statuses != [200, 200, 200, 429] {
        bail!("4 requests with acme's key: expected 200 200 200 429, got {statuses:?}");
    }
    let served = ctx.apps.partner.seen.lock().map(|s| s.len()).unwrap_or(0);
    if served != 3 {
        bail!("the partner app received {served} requests, expected the 3 admitted ones");
    }
    let Some(retry) = retry_after else {
        bail!("the 429 carried no Retry-After");
    };
    Ok(format!(
        "key of partner acme, 4 requests: 200 200 200 429 (Retry-After: {retry})"
    ))
}

async fn body_validation(ctx: &Context<'_>, denials: &mut Denials) -> anyhow::Result<String> {
    let addr = ctx.web("payments")?;
    let post = |body: Vec<u8>| Call {
        method: "POST",
        target: "/payments",
        headers: Vec::new(),
        body: Some(("application/json", body)),
    };
    let bad = client::send(
        addr,
        &post(br#"{"amount": "ten", "currency": "EUR"}"#.to_vec()),
    )
    .await?;
    expect_status(&bad, 400, "POST /payments with amount \"ten\"")?;
    denials.note(&bad);
    let big = format!(
        r#"{{"amount": 1, "currency": "EUR", "pad": "{}"}}"#,
        "x".repeat(2048)
    );
    let large = client::send(addr, &post(big.into_bytes())).await?;
    expect_status(&large, 413, "POST /payments of 2 KiB")?;
    denials.note(&large);
    let good = client::send(
        addr,
        &post(br#"{"amount": 4200, "currency": "EUR"}"#.to_vec()),
    )
    .await?;
    expect_status(&good, 201, "POST /payments, a valid body")?;
    let posts = ctx
        .apps
        .payments
        .seen
        .lock()
        .map(|s| s.iter().filter(|r| r.method == "POST").count())
        .unwrap_or(0);
    if posts != 1 {
        bail!("the payments app received {posts} POSTs, expected only the valid one");
    }
    Ok("schema broken: 400; 2 KiB over a 1 KiB limit: 413; valid: 201 (only that one reached the app)".into())
}

async fn masking(ctx: &Context<'_>) -> anyhow::Result<String> {
    let a = client::send(ctx.web("payments")?, &Call::get("/payments/p-1")).await?;
    expect_status(&a, 200, "GET /payments/p-1")?;
    let v = a.json();
    let number = v["card"]["number"].as_str().unwrap_or_default();
    if number != "************1111" {
        bail!("card number {number:?}, expected ************1111 (the app sent 4111111111111111)");
    }
    if !v["card"]["cvv"].is_null() {
        bail!("the cvv was not removed: {}", v["card"]);
    }
    Ok(format!(
        "app sent 4111111111111111, caller got {number}, cvv removed"
    ))
}

async fn deprecation(ctx: &Context<'_>) -> anyhow::Result<String> {
    let a = client::send(ctx.web("orders")?, &Call::get("/v1/orders/1001")).await?;
    expect_status(&a, 200, "GET /v1/orders/1001")?;
    let Some(sunset) = a.header("sunset") else {
        bail!("no Sunset header on /v1");
    };
    if a.header("deprecation").is_none() {
        bail!("no Deprecation header on /v1");
    }
    Ok(format!("GET /v1/orders/1001: 200, Sunset: {sunset}"))
}

async fn path_trick(ctx: &Context<'_>, denials: &mut Denials) -> anyhow::Result<String> {
    let target = "/orders/%2e%2e/admin/refunds";
    let a = client::send(ctx.web("orders")?, &Call::get(target)).await?;
    if !(400..500).contains(&a.status) {
        bail!("GET {target}: expected a refusal, got {}", a.status);
    }
    denials.note(&a);
    let reached = ctx
        .apps
        .orders
        .seen
        .lock()
        .map(|s| s.iter().any(|r| r.path.contains("admin")))
        .unwrap_or(false);
    if reached {
        bail!("a request for /admin reached the orders app");
    }
    Ok(format!(
        "GET {target} (judged as /admin/refunds, not /orders): {}, the app saw nothing",
        a.status
    ))
}

async fn audit_mode(ctx: &Context<'_>) -> anyhow::Result<String> {
    let mut call = Call::get("/orders/1001");
    call.method = "DELETE";
    let a = client::send(ctx.web("orders")?, &call).await?;
    expect_status(&a, 200, "DELETE /orders/1001 (enforced policy allows it)")?;
    let id = ctx
        .apps
        .orders
        .seen
        .lock()
        .ok()
        .and_then(|s| {
            s.iter()
                .rev()
                .find(|r| r.method == "DELETE")
                .map(|r| r.request_id.clone())
        })
        .context("the app did not record the DELETE")?;
    let client = ctx.query_client()?;
    let row = poll(|| async {
        let rows = events(&client, &[("request_id", id.as_str())]).await?;
        rows.into_iter()
            .next()
            .with_context(|| format!("request {id} not stored yet"))
    })
    .await?;
    if row.event.shadow_reason.is_empty() {
        bail!("the record of request {id} has no shadow decision");
    }
    Ok(format!(
        "DELETE /orders/1001 served (200); stored: would have been denied ({})",
        row.event.shadow_reason
    ))
}

async fn audit_trail(ctx: &Context<'_>, denials: &Denials) -> anyhow::Result<String> {
    let client = ctx.query_client()?;
    let web = ctx.web_id();
    let rows = poll(|| async {
        let rows = events(&client, &[("decision", "deny"), ("source", web.as_str())]).await?;
        let missing: Vec<&String> = denials
            .0
            .iter()
            .filter(|id| !rows.iter().any(|r| &r.event.request_id == *id))
            .collect();
        if let Some(first) = missing.first() {
            bail!(
                "{} of {} denials not stored yet, e.g. {first}",
                missing.len(),
                denials.0.len()
            );
        }
        Ok(rows)
    })
    .await?;
    let mut excerpt = String::new();
    for r in rows
        .iter()
        .filter(|r| denials.0.contains(&r.event.request_id))
    {
        let e = &r.event;
        excerpt.push_str(&format!(
            "\n    {} {:<6} {:<28} {} {}",
            e.status, e.method, e.path, e.reason, e.destination_workload
        ));
    }
    Ok(format!(
        "all {} denials above are stored, bound to web:{excerpt}\n    (palisadectl audit query {})",
        denials.0.len(),
        ctx.mesh.audit_flags()
    ))
}

async fn alert(ctx: &Context<'_>) -> anyhow::Result<String> {
    let addr = ctx.web("orders")?;
    // Twice the threshold less one: however the burst falls across the
    // collector's minute windows, one window holds the threshold.
    let burst = 2 * super::ALERT_THRESHOLD - 1;
    for _ in 0..burst {
        let a = client::send(addr, &Call::get("/admin/export")).await?;
        if a.status < 400 {
            bail!(
                "GET /admin/export without a token was answered {}",
                a.status
            );
        }
    }
    let client = ctx.query_client()?;
    let row = poll(|| async {
        let rows = events(&client, &[("kind", "alert")]).await?;
        rows.into_iter()
            .find(|r| r.event.rule.contains("deny-burst") || r.event.reason.contains("deny-burst"))
            .context("no deny-burst alert stored yet")
    })
    .await?;
    Ok(format!(
        "{burst} denied requests from web: alert {:?} raised ({} {})",
        "deny-burst", row.event.reason, row.event.source_principal
    ))
}

async fn metrics(ctx: &Context<'_>) -> anyhow::Result<String> {
    let orders = ctx.mesh.agent("orders").context("no orders agent")?;
    let (status, text) = admin::get(orders.admin, "/metrics").await?;
    if status != 200 {
        bail!("{}/metrics answered {status}", orders.admin);
    }
    let acked = text
        .lines()
        .find_map(|l| l.strip_prefix("palisade_audit_batches_acked_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    if acked < 1.0 {
        bail!("palisade_audit_batches_acked_total is {acked} on the orders agent");
    }
    let mut lines = format!("orders agent acked {acked} audit batches; Prometheus text at:");
    for a in &ctx.mesh.agents {
        lines.push_str(&format!(
            "\n    agent {:<12} http://{}/metrics",
            a.workload.name, a.admin
        ));
    }
    if let Some(op) = ctx.mesh.operator.admin {
        lines.push_str(&format!("\n    operator           http://{op}/metrics"));
    }
    lines.push_str(&format!(
        "\n    collector          http://{}/metrics",
        ctx.mesh.collector.admin
    ));
    Ok(lines)
}

/// `/v1/events` with `params`, up to 1000 rows.
async fn events(client: &QueryClient, params: &[(&str, &str)]) -> anyhow::Result<Vec<StoredRow>> {
    #[derive(serde::Deserialize)]
    struct Page {
        events: Vec<StoredRow>,
    }
    let mut query = String::from("/v1/events?limit=1000");
    for (k, v) in params {
        query.push_str(&format!("&{k}={}", crate::audit::encode_value(v)));
    }
    let page: Page = client.get_json(&query).await?;
    Ok(page.events)
}

/// Retries `check` every 100 ms for up to 15 s (audit batches are sent
/// every 100 ms); the last error if it never succeeds.
async fn poll<T, F, Fut>(mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
