//! `palisadectl policy simulate`: one request through the engine the agent runs.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use palisade_policy::compile::{MeshConfig, NoSecrets, Workload, compile_workload};
use palisade_policy::crd::ApiSecurityPolicy;
use palisade_policy::engine::{Decision, PolicyEngine, Request, RequestTime, Verdict};
use palisade_policy::identity::SpiffeId;
use palisade_policy::request_shape;
use serde_json::{Value, json};

use crate::output::outln;

/// Which workload the policies are compiled for.
#[derive(Args)]
pub struct WorkloadArgs {
    /// Workload label (repeatable), e.g. app=orders. Without any, every policy in the files applies.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Workload namespace. Default: the first policy's namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Workload service account.
    #[arg(long, default_value = "default")]
    service_account: String,
}

impl WorkloadArgs {
    /// The workload, and the policies adjusted for "no labels: all apply".
    pub fn resolve(
        &self,
        mut policies: Vec<ApiSecurityPolicy>,
    ) -> (Vec<ApiSecurityPolicy>, Workload) {
        let namespace = self.namespace.clone().unwrap_or_else(|| {
            policies
                .first()
                .and_then(|p| p.metadata.namespace.clone())
                .unwrap_or_else(|| "default".into())
        });
        let labels = self.labels.iter().cloned().collect();
        if self.labels.is_empty() {
            for p in &mut policies {
                p.spec.selector = None;
                p.metadata.namespace = Some(namespace.clone());
            }
        }
        let workload = Workload {
            namespace,
            service_account: self.service_account.clone(),
            labels,
            ports: Vec::new(),
        };
        (policies, workload)
    }
}

/// `--label KEY=VALUE`: a non-empty key, `=`, and a value (which may be
/// empty, as in Kubernetes). Anything else is refused, not skipped: a
/// dropped label would select other policies than the user asked for.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        Some(_) => Err(format!(
            "{text:?} has an empty key; expected KEY=VALUE, e.g. app=orders"
        )),
        None => Err(format!(
            "{text:?} has no '='; expected KEY=VALUE, e.g. app=orders"
        )),
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args)]
pub struct SimulateArgs {
    /// Policy files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request target as sent: path and optional query, not normalized.
    #[arg(long)]
    path: String,
    #[arg(long)]
    host: Option<String>,
    /// Verified mTLS peer identity (SPIFFE ID). Without it the request is plaintext.
    #[arg(long)]
    principal: Option<String>,
    /// Request header (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Claim of a verified JWT (repeatable; a repeated name makes an array).
    #[arg(long = "claim", value_name = "NAME=VALUE")]
    claims: Vec<String>,
    /// Client id of a verified API key.
    #[arg(long)]
    api_key_client: Option<String>,
    /// Address of the TCP peer.
    #[arg(long, default_value = "10.0.0.1")]
    source_ip: IpAddr,
    /// Application port the request arrives on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Time of the request (RFC 3339). Default: now.
    #[arg(long)]
    time: Option<String>,
    /// Send the request this many times (shows rate limits at work); the last decision is printed.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    workload: WorkloadArgs,
}

pub fn run(args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    let policies = super::load_valid(&args.files)?;
    let (policies, workload) = args.workload.resolve(policies);
    let compiled = compile_workload(&policies, &workload, &MeshConfig::default(), &NoSecrets)?;
    let engine = PolicyEngine::load(compiled).context("compiled policy does not load")?;

    let method = Method::from_bytes(args.method.as_bytes()).context("invalid --method")?;
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once('=') else {
            bail!("--header {h:?} is not NAME=VALUE");
        };
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("header name {name:?}"))?,
            HeaderValue::from_str(value).with_context(|| format!("header value {value:?}"))?,
        );
    }
    let claims = claims_object(&args.claims)?;
    let peer = args
        .principal
        .as_deref()
        .map(SpiffeId::parse)
        .transpose()
        .context("--principal is not a SPIFFE ID")?;
    let unix_seconds = match &args.time {
        Some(t) => t.parse::<jiff::Timestamp>().context("--time")?.as_second(),
        None => jiff::Timestamp::now().as_second(),
    };
    let host = args.host.clone().or_else(|| {
        headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(String::from)
    });
    // The agent refuses ambiguous requests before any rule sees them. The
    // request is read as HTTP/2 would carry it: --host is its authority.
    let shape = request_shape::check(
        &request_shape::Head {
            method: &method,
            version: http::Version::HTTP_2,
            authority: args.host.as_deref(),
            ambiguous_framing: false,
        },
        &mut headers,
        &request_shape::ShapeOptions {
            drop_underscore_headers: engine.drop_underscore_headers(),
            upgrade_protocols: &["websocket".to_owned()],
        },
    );
    if let Err(refused) = shape {
        let mut report = json!({
            "decision": "deny",
            "status": 400,
            "reason": refused.code(),
            "rule": null,
            "policyVersion": engine.version(),
        });
        report["detail"] = json!(refused.to_string());
        match args.output {
            Output::Json => outln!("{}", serde_json::to_string_pretty(&report)?)?,
            Output::Text => print_text(&report)?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let has_body = Request::headers_announce_body(&headers);
    let mut admitted = 0;
    let mut last = None;
    for i in 0..args.repeat.max(1) {
        let request = Request {
            method: &method,
            target: &args.path,
            host: host.as_deref(),
            headers: &headers,
            port: args.port,
            peer_addr: args.source_ip,
            peer: peer.as_ref(),
            jwt_claims: claims.as_ref(),
            api_key_client: args.api_key_client.as_deref(),
            credential_error: None,
            has_body,
            // Requests of a --repeat run arrive 1 ms apart.
            time: RequestTime {
                unix_seconds,
                monotonic: Duration::from_secs(1) + Duration::from_millis(u64::from(i)),
            },
        };
        let decision = engine.decide(&request);
        if decision.allowed() {
            admitted += 1;
        }
        last = Some(report(&decision));
    }
    let mut report = last.unwrap_or(Value::Null);
    report["policyVersion"] = json!(engine.version());
    if args.repeat > 1 {
        report["repeat"] = json!({"sent": args.repeat, "admitted": admitted});
    }
    match args.output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&report)?)?,
        Output::Text => print_text(&report)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn claims_object(claims: &[String]) -> anyhow::Result<Option<Value>> {
    if claims.is_empty() {
        return Ok(None);
    }
    let mut object = serde_json::Map::new();
    for c in claims {
        let Some((name, value)) = c.split_once('=') else {
            bail!("--claim {c:?} is not NAME=VALUE");
        };
        let value = Value::String(value.to_owned());
        match object.get_mut(name) {
            Some(Value::Array(items)) => items.push(value),
            Some(existing) => *existing = Value::Array(vec![existing.take(), value]),
            None => {
                object.insert(name.to_owned(), value);
            }
        }
    }
    Ok(Some(Value::Object(object)))
}

fn verdict_json(v: &Verdict<'_>) -> Value {
    json!({
        "decision": if v.allowed { "allow" } else { "deny" },
        "status": v.status,
        "reason": v.reason.as_str(),
        "rule": v.rule,
    })
}

fn report(d: &Decision<'_, '_>) -> Value {
    let mut out = verdict_json(&d.verdict);
    out["route"] = json!(d.route);
    out["normalizedPath"] = json!(d.normalized_path.as_deref());
    out["clientIp"] = json!(d.client_ip.to_string());
    if let Some(shadow) = &d.shadow {
        out["auditMode"] = verdict_json(shadow);
    }
    if let Some(rl) = &d.rate_limit {
        out["rateLimit"] = json!({
            "limit": rl.limit_id,
            "allowed": rl.outcome.allowed,
            "max": rl.outcome.limit,
            "remaining": rl.outcome.remaining,
            "resetAfterMs": rl.outcome.reset_after.as_millis() as u64,
            "retryAfterMs": rl.outcome.retry_after.as_millis() as u64,
        });
    }
    if !d.global_limits.is_empty() {
        out["globalLimits"] = json!(d.global_limits.iter().map(|l| &*l.id).collect::<Vec<_>>());
    }
    if !d.response_headers.is_empty() {
        out["responseHeaders"] = d
            .response_headers
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
    }
    if let Some(body) = d.body {
        out["bodyValidation"] = json!({
            "rule": &*body.id,
            "maxBodyBytes": body.max_body_bytes,
            "jsonSchema": body.schema.is_some(),
        });
    }
    if d.response_mask.is_some() {
        out["responseMasking"] = json!(true);
    }
    out
}

fn print_text(report: &Value) -> std::io::Result<()> {
    let field = |k: &str| match &report[k] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    outln!("decision: {}", field("decision"))?;
    outln!("status:   {}", field("status"))?;
    outln!("reason:   {}", field("reason"))?;
    outln!("rule:     {}", field("rule"))?;
    outln!("route:    {}", field("route"))?;
    outln!("path:     {}", field("normalizedPath"))?;
    if let Some(a) = report.get("auditMode") {
        outln!(
            "audit mode would: {} {} ({}, rule {})",
            a["decision"].as_str().unwrap_or("-"),
            a["status"],
            a["reason"].as_str().unwrap_or("-"),
            a["rule"].as_str().unwrap_or("-")
        )?;
    }
    if let Some(rl) = report.get("rateLimit") {
        outln!(
            "rate limit: {} remaining {}/{} (retry after {} ms)",
            rl["limit"].as_str().unwrap_or("-"),
            rl["remaining"],
            rl["max"],
            rl["retryAfterMs"]
        )?;
    }
    if let Some(g) = report.get("globalLimits") {
        outln!("global limits (checked in Redis by the agent): {g}")?;
    }
    if let Some(Value::Object(h)) = report.get("responseHeaders") {
        for (k, v) in h {
            outln!("response header: {k}: {}", v.as_str().unwrap_or_default())?;
        }
    }
    if let Some(b) = report.get("bodyValidation") {
        outln!("body validation: {b}")?;
    }
    if report.get("responseMasking").is_some() {
        outln!("response masking: on")?;
    }
    if let Some(r) = report.get("repeat") {
        outln!("repeat: admitted {} of {}", r["admitted"], r["sent"])?;
    }
    Ok(())
}
