//! The CA in a Kubernetes Secret (`palisade-identity` in the operator's
//! namespace), with the same keys as the state-directory files. A Secret
//! written by cert-manager (`tls.crt`, `tls.key`, `ca.crt`) is accepted too.
//!
//! Creation is create-if-absent: GET, and if there is none, POST a freshly
//! generated CA. When several replicas race, the API server accepts exactly
//! one POST; the others get 409 AlreadyExists, GET the winner's Secret and
//! use it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use super::material::{
    CERT_MANAGER_CA, CERT_MANAGER_CERT, CERT_MANAGER_KEY, CHAIN_FILE, CaMaterial, ISSUER_FILE,
    ISSUER_KEY_FILE, Origin, TRUST_BUNDLE_FILE,
};

/// Default name of the CA Secret.
pub const DEFAULT_SECRET_NAME: &str = "palisade-identity";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("Secret {namespace}/{name}: {reason}")]
    Content {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("generating a CA: {0}")]
    Generate(String),
}

/// Loads the CA Secret, creating it with `generate` if absent.
pub async fn load_or_create<E: std::fmt::Display>(
    client: kube::Client,
    namespace: &str,
    name: &str,
    generate: impl FnOnce() -> Result<CaMaterial, E>,
) -> Result<(CaMaterial, Origin), SecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(existing) = api.get_opt(name).await? {
        return Ok((from_secret(&existing, namespace, name)?, Origin::Existing));
    }
    let material = generate().map_err(|e| SecretError::Generate(e.to_string()))?;
    match api
        .create(
            &PostParams::default(),
            &to_secret(&material, namespace, name),
        )
        .await
    {
        Ok(created) => Ok((from_secret(&created, namespace, name)?, Origin::Created)),
        Err(kube::Error::Api(status)) if status.is_already_exists() || status.code == 409 => {
            tracing::info!(
                namespace,
                name,
                "another operator created the CA Secret first; using it"
            );
            let winner = api.get(name).await?;
            Ok((from_secret(&winner, namespace, name)?, Origin::Existing))
        }
        Err(e) => Err(e.into()),
    }
}

/// The Secret object for a CA.
pub fn to_secret(material: &CaMaterial, namespace: &str, name: &str) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |key: &str, value: &str| {
        data.insert(key.to_owned(), ByteString(value.as_bytes().to_vec()));
    };
    put(ISSUER_FILE, &material.issuer_pem);
    put(ISSUER_KEY_FILE, &material.issuer_key_pem);
    if !material.chain_pem.is_empty() {
        put(CHAIN_FILE, &material.chain_pem);
    }
    put(TRUST_BUNDLE_FILE, &material.trust_bundle_pem);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "palisade".to_owned()),
                (
                    "app.kubernetes.io/component".to_owned(),
                    "identity".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Reads CA material out of a Secret: our keys first, cert-manager's as the
/// fallback.
pub fn from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
) -> Result<CaMaterial, SecretError> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| -> Result<Option<String>, SecretError> {
        data.get(key)
            .map(|v| {
                String::from_utf8(v.0.clone()).map_err(|_| SecretError::Content {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    reason: format!("{key} is not UTF-8 PEM"),
                })
            })
            .transpose()
    };
    let missing = |keys: &str| SecretError::Content {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason: format!("has neither our keys nor cert-manager's (missing {keys})"),
    };
    if let (Some(issuer), Some(key), Some(bundle)) = (
        text(ISSUER_FILE)?,
        text(ISSUER_KEY_FILE)?,
        text(TRUST_BUNDLE_FILE)?,
    ) {
        return Ok(CaMaterial {
            issuer_pem: issuer,
            issuer_key_pem: key,
            chain_pem: text(CHAIN_FILE)?.unwrap_or_default(),
            trust_bundle_pem: bundle,
        });
    }
    match (
        text(CERT_MANAGER_CERT)?,
        text(CERT_MANAGER_KEY)?,
        text(CERT_MANAGER_CA)?,
    ) {
        // tls.crt holds the issuer followed by its chain; ca.crt the root.
        (Some(issuer), Some(key), Some(ca)) => Ok(CaMaterial {
            issuer_pem: issuer,
            issuer_key_pem: key,
            chain_pem: String::new(),
            trust_bundle_pem: text(TRUST_BUNDLE_FILE)?.unwrap_or(ca),
        }),
        _ => Err(missing(&format!(
            "{ISSUER_FILE}, {ISSUER_KEY_FILE}, {TRUST_BUNDLE_FILE}"
        ))),
    }
}
