//! `palisadectl audit …`: read the audit trail from the collector's query
//! API.

mod client;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use http_body_util::BodyExt as _;
use palisade_collector::event::StoredRow;
use palisade_collector::store::{Stats, VerifyReport};

use crate::output::outln;
use client::{CollectorArgs, QueryClient};

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    collector: CollectorArgs,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Stored audit records, oldest first, filtered.
    Query(QueryArgs),
    /// Decisions counted by decision, route and source over a window.
    Stats(WindowArgs),
    /// Records as the collector stores them, until interrupted.
    Tail(TailArgs),
    /// Check the hash chains: exits 1 if any batch was edited, deleted or reordered.
    Verify(OutputArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct OutputArgs {
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
struct WindowArgs {
    /// Only records newer than this, e.g. 15m, 2h, 1d.
    #[arg(long, value_parser = parse_age)]
    since: Option<i64>,
    /// Start of the window (RFC 3339), instead of --since.
    #[arg(long, conflicts_with = "since")]
    from: Option<String>,
    /// End of the window (RFC 3339).
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args)]
struct Filters {
    /// The caller: its SPIFFE ID or IP.
    #[arg(long)]
    source: Option<String>,
    /// The workload that decided.
    #[arg(long)]
    destination: Option<String>,
    #[arg(long, value_parser = ["allow", "deny"])]
    decision: Option<String>,
    #[arg(long)]
    route: Option<String>,
    #[arg(long)]
    status: Option<u16>,
    #[arg(long)]
    request_id: Option<String>,
    /// decision, gap, refused_report or alert.
    #[arg(long)]
    kind: Option<String>,
}

#[derive(Args)]
struct QueryArgs {
    #[command(flatten)]
    window: WindowArgs,
    #[command(flatten)]
    filters: Filters,
    /// At most this many records (all pages are followed up to it).
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Args)]
struct TailArgs {
    #[command(flatten)]
    filters: Filters,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = QueryClient::new(&args.collector)?;
        match args.command {
            AuditCommand::Query(q) => query(&client, q).await,
            AuditCommand::Stats(w) => stats(&client, w).await,
            AuditCommand::Tail(t) => tail(&client, t).await,
            AuditCommand::Verify(o) => verify(&client, o).await,
        }
    })
}

#[derive(serde::Deserialize)]
struct EventsBody {
    events: Vec<StoredRow>,
    next_after: Option<i64>,
}

async fn query(client: &QueryClient, args: QueryArgs) -> anyhow::Result<ExitCode> {
    let mut params = window_params(&args.window)?;
    params.extend(filter_params(&args.filters));
    let mut rows = Vec::new();
    let mut after = None;
    while rows.len() < args.limit {
        let mut page_params = params.clone();
        let want = (args.limit - rows.len()).min(1000);
        page_params.push(("limit".into(), want.to_string()));
        if let Some(id) = after {
            page_params.push(("after".into(), format!("{id}")));
        }
        let page: EventsBody = client
            .get_json(&format!("/v1/events{}", encode(&page_params)))
            .await?;
        rows.extend(page.events);
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    rows.truncate(args.limit);
    if args.window.output.output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<24} {:<14} {:<6} {:<40} {:<7} {:<30} {:<24} REQUEST-ID",
        "TIME",
        "KIND",
        "STATUS",
        "SOURCE",
        "METHOD",
        "PATH",
        "REASON"
    )?;
    for row in &rows {
        let e = &row.event;
        let kind = if e.decision.is_empty() {
            e.kind.as_str()
        } else {
            &e.decision
        };
        let source = if e.source_principal.is_empty() {
            &e.source_ip
        } else {
            &e.source_principal
        };
        let reason = if e.lost > 0 {
            format!("{} ({} lost)", e.reason, e.lost)
        } else {
            e.reason.clone()
        };
        outln!(
            "{:<24} {:<14} {:<6} {:<40} {:<7} {:<30} {:<24} {}",
            time(e.time_us),
            kind,
            e.status,
            source,
            e.method,
            e.path,
            reason,
            e.request_id
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn stats(client: &QueryClient, args: WindowArgs) -> anyhow::Result<ExitCode> {
    let params = window_params(&args)?;
    let stats: Stats = client
        .get_json(&format!("/v1/stats{}", encode(&params)))
        .await?;
    if args.output.output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&stats)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("decisions: {}   lost: {}", stats.total, stats.lost)?;
    for (title, counts) in [
        ("by decision", &stats.by_decision),
        ("by route", &stats.by_route),
        ("by source", &stats.by_source),
    ] {
        outln!("{title}:")?;
        for (key, count) in counts {
            let key = if key.is_empty() { "(none)" } else { key };
            outln!("  {count:>8}  {key}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn tail(client: &QueryClient, args: TailArgs) -> anyhow::Result<ExitCode> {
    let params = filter_params(&args.filters);
    let answer = client.get(&format!("/v1/tail{}", encode(&params))).await?;
    let mut body = answer.body;
    if !answer.status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        anyhow::bail!("{}", client::explain(answer.status, &bytes));
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the collector's stream broke off")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if args.output.output == Output::Json {
                outln!("{text}")?;
            } else {
                outln!("{}", tail_line(&text))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One live record as a line a person reads.
fn tail_line(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return json.to_owned();
    };
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
    let n = |k: &str| v.get(k).and_then(|x| x.as_i64()).unwrap_or(0);
    let source = match s("source_principal") {
        p if p.is_empty() => s("source_ip"),
        p => p,
    };
    let kind = match s("decision") {
        d if d.is_empty() => s("kind"),
        d => d,
    };
    format!(
        "{} {:<6} {:<4} {} {} {} {} {}",
        time(n("time_us")),
        kind,
        n("status"),
        source,
        s("method"),
        s("path"),
        s("reason"),
        s("request_id")
    )
}

async fn verify(client: &QueryClient, args: OutputArgs) -> anyhow::Result<ExitCode> {
    let report: VerifyReport = client.get_json("/v1/verify").await?;
    if args.output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "{} agent instances, {} batches checked",
            report.instances,
            report.batches
        )?;
        for p in &report.problems {
            outln!(
                "{:?}: instance {} batch {}: {}",
                p.kind,
                p.agent_instance_id,
                p.sequence,
                p.detail
            )?;
        }
        if report.problems.is_empty() {
            outln!("every chain is intact")?;
        }
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn window_params(w: &WindowArgs) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if let Some(age_us) = w.since {
        let from = jiff::Timestamp::now().as_microsecond() - age_us;
        out.push(("from".into(), from.to_string()));
    }
    if let Some(from) = &w.from {
        from.parse::<jiff::Timestamp>()
            .with_context(|| format!("--from {from:?} is not RFC 3339"))?;
        out.push(("from".into(), from.clone()));
    }
    if let Some(to) = &w.to {
        to.parse::<jiff::Timestamp>()
            .with_context(|| format!("--to {to:?} is not RFC 3339"))?;
        out.push(("to".into(), to.clone()));
    }
    Ok(out)
}

fn filter_params(f: &Filters) -> Vec<(String, String)> {
    let pairs = [
        ("source", f.source.clone()),
        ("destination", f.destination.clone()),
        ("decision", f.decision.clone()),
        ("route", f.route.clone()),
        ("status", f.status.map(|s| s.to_string())),
        ("request_id", f.request_id.clone()),
        ("kind", f.kind.clone()),
    ];
    pairs
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .collect()
}

/// `?k=v&…`, percent-encoding everything but unreserved characters.
fn encode(params: &[(String, String)]) -> String {
    let escape = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    if params.is_empty() {
        return String::new();
    }
    let body: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect();
    format!("?{}", body.join("&"))
}

/// `15m`, `2h`, `1d`, `30s` → microseconds.
fn parse_age(text: &str) -> Result<i64, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: i64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and s, m, h or d, e.g. 15m"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(n.saturating_mul(seconds).saturating_mul(1_000_000))
}

fn time(us: i64) -> String {
    jiff::Timestamp::from_microsecond(us)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|_| us.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_encoding() {
        assert_eq!(parse_age("15m"), Ok(15 * 60 * 1_000_000));
        assert!(parse_age("15").is_err());
        assert!(parse_age("m").is_err());
        assert_eq!(
            encode(&[("source".into(), "spiffe://td/ns/a/sa/b".into())]),
            "?source=spiffe%3A%2F%2Ftd%2Fns%2Fa%2Fsa%2Fb"
        );
        assert_eq!(encode(&[]), "");
    }
}
