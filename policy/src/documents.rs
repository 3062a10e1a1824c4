//! Reading policy files: YAML (several documents per file) or JSON.

use serde_json::Value;

use crate::crd::ApiSecurityPolicy;
use crate::validate::{ValidationErrors, validate_document};

#[derive(Debug, thiserror::Error)]
#[error("not valid YAML: {0}")]
pub struct ParseError(String);

/// Every non-empty document of a YAML (or JSON) text, as JSON values.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, ParseError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ParseError(e.to_string()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// A document's `namespace/name` for messages, or its position when unnamed.
pub fn document_label(doc: &Value, index: usize) -> String {
    match doc.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) => format!(
            "{}/{name}",
            doc.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
        ),
        None => format!("document {}", index + 1),
    }
}

/// One document: the valid policy, or its label and every problem.
pub type LoadedPolicy = Result<ApiSecurityPolicy, (String, ValidationErrors)>;

/// Parses and validates every document; the namespace defaults to `default`.
pub fn load_policies(text: &str) -> Result<Vec<LoadedPolicy>, ParseError> {
    Ok(parse_documents(text)?
        .iter()
        .enumerate()
        .map(|(i, doc)| {
            validate_document(doc)
                .map(|mut p| {
                    p.metadata.namespace.get_or_insert_with(|| "default".into());
                    p
                })
                .map_err(|e| (document_label(doc, i), e))
        })
        .collect())
}
