//! The status of a running local mesh: per service its identity, policy
//! version, readiness and certificate expiry (from each agent's
//! `/config_dump`), and where to reach it.

use crate::mesh::Mesh;
use crate::mesh::admin::{self, AgentStatus};
use crate::output::outln;

pub struct Row {
    pub service: String,
    pub status: AgentStatus,
}

pub async fn collect(mesh: &Mesh) -> Vec<Row> {
    let mut rows = Vec::new();
    for a in &mesh.agents {
        let status = admin::agent_status(a.admin)
            .await
            .unwrap_or_else(|_| AgentStatus {
                ready: false,
                identity: a.spiffe_id.clone(),
                policy_version: String::new(),
                cert_not_after: None,
            });
        rows.push(Row {
            service: a.workload.name.clone(),
            status,
        });
    }
    rows
}

fn expiry(not_after: Option<i64>) -> String {
    not_after
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn print_table(mesh: &Mesh, rows: &[Row]) -> std::io::Result<()> {
    outln!(
        "{:<12} {:<44} {:<14} {:<6} {:<21} {:<16} CALLS",
        "SERVICE",
        "IDENTITY",
        "POLICY",
        "READY",
        "CERT EXPIRES",
        "MTLS ON"
    )?;
    for (row, agent) in rows.iter().zip(&mesh.agents) {
        let calls: Vec<String> = agent
            .outbound
            .iter()
            .map(|(name, addr)| format!("{name} via {addr}"))
            .collect();
        outln!(
            "{:<12} {:<44} {:<14} {:<6} {:<21} {:<16} {}",
            row.service,
            row.status.identity,
            super::short(&row.status.policy_version),
            if row.status.ready { "yes" } else { "no" },
            expiry(row.status.cert_not_after),
            agent
                .inbound
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
            if calls.is_empty() {
                "-".to_owned()
            } else {
                calls.join(", ")
            }
        )?;
    }
    outln!(
        "operator {} (metrics http://{}/metrics)   collector query API {}",
        mesh.operator.addr,
        mesh.operator
            .admin
            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        mesh.collector.query
    )
}

/// One line of JSON: everything a script needs to use the mesh.
pub fn json(mesh: &Mesh, rows: &[Row], apps: &[(String, u32)]) -> String {
    let services: Vec<serde_json::Value> = rows
        .iter()
        .zip(&mesh.agents)
        .map(|(row, a)| {
            serde_json::json!({
                "service": row.service,
                "identity": row.status.identity,
                "policy_version": row.status.policy_version,
                "ready": row.status.ready,
                "cert_not_after": row.status.cert_not_after,
                "listen": a.inbound.map(|x| x.to_string()),
                "app": a.workload.inbound.as_ref().map(|i| i.app.to_string()),
                "outbound": a.outbound.iter()
                    .map(|(n, addr)| (n.clone(), serde_json::json!(addr.to_string())))
                    .collect::<serde_json::Map<_, _>>(),
                "admin": a.admin.to_string(),
                "app_pid": apps.iter().find(|(n, _)| n == &row.service).map(|(_, p)| p),
            })
        })
        .collect();
    let mut pids = mesh.pids();
    pids.extend(apps.iter().map(|(_, p)| *p));
    serde_json::json!({
        "services": services,
        "operator": mesh.operator.addr.to_string(),
        "collector": {
            "ingest": mesh.collector.ingest.to_string(),
            "query": mesh.collector.query.to_string(),
        },
        "trust_bundle": mesh.bundle,
        "query_token_file": mesh.query_token,
        "logs": mesh.logs,
        "pids": pids,
    })
    .to_string()
}
