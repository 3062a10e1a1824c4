//! The identity in a certificate is the one the token proves: the agent
//! library, certified by the real `palisade-operator serve`, checked with the
//! real `palisadectl certs inspect`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use palisade_agent::identity::{
    CertStore, CertifyError, IdentityClient, RenewalConfig, Renewer, TokenSource,
};
use palisade_e2e::{Operator, pem_encode, within, workspace_bin};
use serde_json::Value;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const WEB_TOKEN: &str = "e2e-web-token-0123456789abcdef";
const ORDERS_TOKEN: &str = "e2e-orders-token-0123456789abcdef";

fn client(operator: &Operator, token: &str) -> IdentityClient {
    operator.identity_client(operator.trust(), TokenSource::Static(token.into()))
}

/// `palisadectl certs inspect --file … --bundle … --output json`: exit status and report.
fn inspect(file: &Path, bundle: &Path) -> (bool, Value) {
    let out = Command::new(workspace_bin("palisadectl"))
        .args(["certs", "inspect", "--output", "json", "--file"])
        .arg(file)
        .arg("--bundle")
        .arg(bundle)
        .output()
        .expect("run palisadectl");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "palisadectl printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// Gets a certificate with `token` through the renewal loop's `renew_once`,
/// writes the leaf PEM from the store, and has palisadectl check it.
async fn certify_and_inspect(operator: &Operator, token: &str, dir: &Path) -> (String, Value) {
    let store = Arc::new(CertStore::new());
    let renewer = Renewer::new(
        client(operator, token),
        store.clone(),
        RenewalConfig::default(),
    );
    renewer.renew_once().await.expect("certify");
    assert!(store.is_ready());
    let current = store.current().expect("installed certificate");
    let leaf = current.chain()[0].as_ref();
    let file = dir.join(format!("{}.pem", current.serial_hex()));
    std::fs::write(&file, pem_encode("CERTIFICATE", leaf)).unwrap();
    let (ok, report) = inspect(&file, &operator.bundle);
    assert!(ok, "palisadectl refused the certificate: {report:#}");
    assert_eq!(
        report["verifiesAgainstBundle"],
        Value::Bool(true),
        "{report:#}"
    );
    assert_eq!(
        report["spiffeId"].as_str(),
        Some(current.spiffe_id().as_str()),
        "{report:#}"
    );
    (current.spiffe_id().to_string(), report)
}

/// `Identity.Certify` by hand (tonic's own TLS, host name `localhost` from the
/// operator's certificate) with a CSR that asks for `asked_for`.
async fn certify_raw(operator: &Operator, token: &str, asked_for: &str) -> Vec<String> {
    use palisade_proto::identity::v1::CertifyRequest;
    use palisade_proto::identity::v1::identity_client::IdentityClient as Grpc;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "orders");
    params.subject_alt_names = vec![
        SanType::URI(asked_for.try_into().unwrap()),
        SanType::DnsName("orders.shop.svc".try_into().unwrap()),
    ];
    let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let bundle = std::fs::read_to_string(&operator.bundle).unwrap();
    let channel = Endpoint::from_shared(format!("https://{}", operator.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(bundle))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the operator");
    let resp = Grpc::new(channel)
        .certify(CertifyRequest {
            token: token.into(),
            csr_pem,
            requested_ttl_seconds: 0,
        })
        .await
        .expect("certify")
        .into_inner();
    assert_eq!(resp.spiffe_id, WEB);
    resp.cert_chain_pem
}

#[tokio::test]
async fn the_certificate_carries_the_tokens_identity() {
    within(Duration::from_secs(60), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Operator::start_in(
        dir.path(),
        &[(WEB_TOKEN, "shop", "web"), (ORDERS_TOKEN, "shop", "orders")],
        "1h",
    )
    .await;

    let (id, report) = certify_and_inspect(&operator, WEB_TOKEN, dir.path()).await;
    assert_eq!(id, WEB);
    let leaf = &report["chain"][0];
    assert_eq!(leaf["uriSans"], serde_json::json!([WEB]), "{report:#}");
    assert_eq!(leaf["isCa"], Value::Bool(false), "{report:#}");

    // The other token, the other identity.
    let (id, _) = certify_and_inspect(&operator, ORDERS_TOKEN, dir.path()).await;
    assert_eq!(id, ORDERS);

    // A CSR asking for another identity (SANs and subject of orders) with
    // web's token still gets web's certificate, and nothing else in it.
    let chain = certify_raw(&operator, WEB_TOKEN, ORDERS).await;
    let file = dir.path().join("raw.pem");
    std::fs::write(&file, chain.concat()).unwrap();
    let (ok, report) = inspect(&file, &operator.bundle);
    assert!(ok, "{report:#}");
    assert_eq!(report["spiffeId"].as_str(), Some(WEB), "{report:#}");
    assert_eq!(
        report["chain"][0]["uriSans"],
        serde_json::json!([WEB]),
        "{report:#}"
    );
    assert_eq!(
        report["chain"][0]["dnsSans"],
        serde_json::json!([]),
        "{report:#}"
    );
    assert_eq!(report["chain"][0]["subject"], "", "{report:#}");

    // An unknown token gets nothing.
    let err = client(&operator, "e2e-unknown-token-0123456789")
        .certify()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CertifyError::Rpc(s) if s.code() == tonic::Code::Unauthenticated),
        "{err:?}"
    );
}
