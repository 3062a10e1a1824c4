//! `mesh.yaml`: the services of a local mesh (see docs/quickstart.md).
//!
//! ```yaml
//! trustDomain: cluster.local        # optional
//! policies: policies                # optional; a directory next to this file
//! services:
//!   - name: orders
//!     namespace: shop               # identity: spiffe://<td>/ns/shop/sa/orders
//!     serviceAccount: orders
//!     labels: {app: orders}         # what policies select on
//!     ports:                        # at most one today (one --inbound per agent)
//!       - {port: 18081, app: 19081, protocol: http}
//!     calls: [inventory]            # an outbound listener per callee
//!     run: [palisadectl, demo-app, http, --listen, "{app}"]
//! ```
//!
//! In `run`, `{app}` is the app's address and `{call:NAME}` the plaintext
//! address through which it reaches service NAME (its agent's outbound
//! listener, mTLS from there). A program found next to palisadectl is run
//! from there; any other is looked up on `PATH`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::mesh::Protocol;

#[derive(serde::Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshFile {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default = "default_policies")]
    pub policies: PathBuf,
    pub services: Vec<Service>,
}

#[derive(serde::Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub calls: Vec<String>,
    /// The app's command line; none for a caller-only service.
    #[serde(default)]
    pub run: Vec<String>,
}

#[derive(serde::Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// Where the agent takes mTLS, on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// Where the app listens, on 127.0.0.1 (0: any free port).
    pub app: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_policies() -> PathBuf {
    PathBuf::from("policies")
}

fn default_protocol() -> Protocol {
    Protocol::Http
}

pub const FILE_NAME: &str = "mesh.yaml";

impl MeshFile {
    /// Reads `<dir>/mesh.yaml` and checks what the agents cannot.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FILE_NAME);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (a mesh directory holds a {FILE_NAME}; see examples/quickstart/)",
                path.display()
            )
        })?;
        let file: Self = serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        file.check()
            .with_context(|| format!("{}", path.display()))?;
        Ok(file)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.services.is_empty() {
            bail!("no services");
        }
        for s in &self.services {
            if s.ports.len() > 1 {
                bail!(
                    "service {:?} has {} ports; an agent fronts one app port today, so give each port its own service",
                    s.name,
                    s.ports.len()
                );
            }
            if !s.run.is_empty() && s.ports.is_empty() && s.calls.is_empty() {
                bail!(
                    "service {:?} runs an app but has no ports and no calls",
                    s.name
                );
            }
            for arg in &s.run {
                for placeholder in placeholders(arg) {
                    let ok = placeholder == "app" && !s.ports.is_empty()
                        || placeholder
                            .strip_prefix("call:")
                            .is_some_and(|c| s.calls.iter().any(|x| x == c));
                    if !ok {
                        bail!(
                            "service {:?}: run has {{{placeholder}}}; known here: {}",
                            s.name,
                            known_placeholders(s)
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

fn placeholders(arg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        out.push(&rest[start + 1..start + len]);
        rest = &rest[start + len + 1..];
    }
    out
}

fn known_placeholders(s: &Service) -> String {
    let mut known = Vec::new();
    if !s.ports.is_empty() {
        known.push("{app}".to_owned());
    }
    known.extend(s.calls.iter().map(|c| format!("{{call:{c}}}")));
    if known.is_empty() {
        "none".into()
    } else {
        known.join(", ")
    }
}

/// `arg` with `{app}` and `{call:NAME}` filled in.
pub fn expand(arg: &str, app: Option<SocketAddr>, calls: &[(String, SocketAddr)]) -> String {
    let mut out = arg.to_owned();
    if let Some(app) = app {
        out = out.replace("{app}", &app.to_string());
    }
    for (name, addr) in calls {
        out = out.replace(&format!("{{call:{name}}}"), &addr.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_and_filled_in() {
        assert_eq!(
            placeholders("a={call:orders},{app}"),
            ["call:orders", "app"]
        );
        let app: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let orders: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert_eq!(
            expand(
                "x={call:orders}/{app}",
                Some(app),
                &[("orders".into(), orders)]
            ),
            "x=127.0.0.1:2/127.0.0.1:1"
        );
    }

    #[test]
    fn the_quickstart_mesh_file_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let file = MeshFile::load(&dir).unwrap();
        assert_eq!(file.services.len(), 3);
    }

    #[test]
    fn mistakes_are_named() {
        let parse = |text: &str| -> anyhow::Result<MeshFile> {
            let f: MeshFile = serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
            f.check()?;
            Ok(f)
        };
        let e = parse(
            "services: [{name: a, namespace: n, run: [x, '{call:b}'], ports: [{port: 1, app: 2}]}]",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("{call:b}"), "{e:#}");
        let e = parse("services: [{name: a, namespace: n, port: 1}]").unwrap_err();
        assert!(format!("{e:#}").contains("port"), "{e:#}");
    }
}
