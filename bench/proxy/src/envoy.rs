//! Envoy configured like the Palisade agent under test (DESIGN §10): the
//! same certificate and CA, TLS 1.3, a client certificate required and
//! verified against the CA with a SPIFFE URI SAN of our trust domain, RBAC
//! allowing only the load generator's SPIFFE ID, a local rate limit whose
//! bucket never empties, `x-forwarded-client-cert` replaced by its own (By,
//! Hash, URI — what the agent sets), a request id generated, and the same
//! backend over plaintext HTTP/1.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::certs::{LOADGEN_ID, LeafFiles, TRUST_DOMAIN};

/// The envoy binary: `--envoy-bin`, else the one `bench/proxy/envoy.sh`
/// installs into target/bench-venv (running the script if needed).
pub fn locate(explicit: Option<&Path>, workspace: &Path) -> anyhow::Result<PathBuf> {
    if let Some(bin) = explicit {
        anyhow::ensure!(
            bin.is_file(),
            "--envoy-bin {} does not exist",
            bin.display()
        );
        return Ok(bin.to_owned());
    }
    let script = workspace.join("bench/proxy/envoy.sh");
    let out = Command::new("sh")
        .arg(&script)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    anyhow::ensure!(
        path.is_file(),
        "{} printed {path:?}, not a file",
        script.display()
    );
    Ok(path)
}

/// The bootstrap YAML (JSON is YAML, and needs no YAML crate).
pub fn config(
    listen: SocketAddr,
    backend: SocketAddr,
    server: &LeafFiles,
    bundle: &Path,
) -> String {
    let filename = |p: &Path| serde_quote(&p.display().to_string());
    format!(
        r#"{{
  "static_resources": {{
    "listeners": [{{
      "name": "inbound",
      "address": {{"socket_address": {{"address": "{listen_ip}", "port_value": {listen_port}}}}},
      "filter_chains": [{{
        "transport_socket": {{
          "name": "envoy.transport_sockets.tls",
          "typed_config": {{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": {{
              "tls_params": {{"tls_minimum_protocol_version": "TLSv1_3"}},
              "alpn_protocols": ["h2", "http/1.1"],
              "tls_certificates": [{{
                "certificate_chain": {{"filename": {cert}}},
                "private_key": {{"filename": {key}}}
              }}],
              "validation_context": {{
                "trusted_ca": {{"filename": {bundle}}},
                "match_typed_subject_alt_names": [{{
                  "san_type": "URI",
                  "matcher": {{"prefix": "spiffe://{TRUST_DOMAIN}/"}}
                }}]
              }}
            }}
          }}
        }},
        "filters": [{{
          "name": "envoy.filters.network.http_connection_manager",
          "typed_config": {{
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inbound",
            "codec_type": "AUTO",
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {{"uri": true}},
            "route_config": {{
              "virtual_hosts": [{{
                "name": "app",
                "domains": ["*"],
                "routes": [{{"match": {{"prefix": "/"}}, "route": {{"cluster": "app"}}}}]
              }}]
            }},
            "http_filters": [
              {{
                "name": "envoy.filters.http.rbac",
                "typed_config": {{
                  "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                  "rules": {{
                    "action": "ALLOW",
                    "policies": {{
                      "load-generator": {{
                        "permissions": [{{"any": true}}],
                        "principals": [{{"authenticated": {{"principal_name": {{"exact": "{LOADGEN_ID}"}}}}}}]
                      }}
                    }}
                  }}
                }}
              }},
              {{
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {{
                  "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                  "stat_prefix": "local_rate_limit",
                  "token_bucket": {{"max_tokens": 1000000000, "tokens_per_fill": 1000000000, "fill_interval": "1s"}},
                  "filter_enabled": {{"runtime_key": "local_rate_limit_enabled", "default_value": {{"numerator": 100, "denominator": "HUNDRED"}}}},
                  "filter_enforced": {{"runtime_key": "local_rate_limit_enforced", "default_value": {{"numerator": 100, "denominator": "HUNDRED"}}}}
                }}
              }},
              {{
                "name": "envoy.filters.http.router",
                "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
              }}
            ]
          }}
        }}]
      }}]
    }}],
    "clusters": [{{
      "name": "app",
      "type": "STATIC",
      "connect_timeout": "5s",
      "load_assignment": {{
        "cluster_name": "app",
        "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"socket_address": {{"address": "{backend_ip}", "port_value": {backend_port}}}}}}}}}]}}]
      }}
    }}]
  }}
}}
"#,
        listen_ip = listen.ip(),
        listen_port = listen.port(),
        cert = filename(&server.cert),
        key = filename(&server.key),
        bundle = filename(bundle),
        backend_ip = backend.ip(),
        backend_port = backend.port(),
    )
}

/// A JSON string literal (paths are the only free text in the config).
fn serde_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_paths_as_json_strings() {
        assert_eq!(serde_quote(r#"/tmp/a "b"\c"#), r#""/tmp/a \"b\"\\c""#);
        assert_eq!(serde_quote("x\ny"), r#""x\u000ay""#);
    }

    #[test]
    fn config_names_the_files_and_addresses() {
        let files = LeafFiles {
            cert: "/d/backend.pem".into(),
            key: "/d/backend.key".into(),
        };
        let c = config(
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:2000".parse().unwrap(),
            &files,
            Path::new("/d/bundle.pem"),
        );
        assert!(c.contains(r#""port_value": 1000"#));
        assert!(c.contains(r#""port_value": 2000"#));
        assert!(c.contains(r#""filename": "/d/backend.key""#));
        assert!(c.contains(LOADGEN_ID));
    }
}
