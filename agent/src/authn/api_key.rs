//! API keys (`ApiKeyAuth` of a `WorkloadPolicy`).
//!
//! The policy carries only SHA-256 digests of the keys and the client id each
//! belongs to. A presented key is hashed and compared with every stored digest
//! in constant time (all of them, no early exit), so neither timing nor the
//! number of clients tells an attacker how close a guess was. What comes out is
//! the client id; the key itself never reaches an error, a log line, a policy
//! decision or audit.

use std::fmt;

use http::{HeaderMap, HeaderName};
use palisade_proto::policy::v1::ApiKeyAuth;
use sha2::{Digest as _, Sha256};

use super::ct_eq;

/// Why an API key was not accepted. `code()` goes into `credential_error`
/// and audit; no variant holds the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    /// The header is absent: not a credential error.
    #[error("apikey.missing: no API key presented")]
    Missing,
    /// The key matches no stored digest (or is empty / not visible ASCII).
    #[error("apikey.unknown: API key not recognised")]
    Unknown,
    /// The header appears more than once.
    #[error("apikey.ambiguous: API key header present more than once")]
    Ambiguous,
}

impl ApiKeyError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiKeyError::Missing => "apikey.missing",
            ApiKeyError::Unknown => "apikey.unknown",
            ApiKeyError::Ambiguous => "apikey.ambiguous",
        }
    }

    pub fn is_missing(&self) -> bool {
        matches!(self, ApiKeyError::Missing)
    }
}

/// A policy's `ApiKeyAuth` that cannot be used; the policy should be NACKed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyConfigError {
    #[error("invalid API key header name {0:?}")]
    InvalidHeader(String),
    #[error("API key of client {client_id:?}: digest is {len} bytes, SHA-256 needs 32")]
    BadDigest { client_id: String, len: usize },
    #[error("API key entry with an empty client id")]
    EmptyClientId,
}

struct Entry {
    digest: [u8; 32],
    client_id: String,
}

/// Verifies API keys against stored digests.
pub struct ApiKeyVerifier {
    /// `None`: API-key authentication is off.
    header: Option<HeaderName>,
    keys: Vec<Entry>,
}

impl fmt::Debug for ApiKeyVerifier {
    // Digests are not secrets, but there is no reason to print them either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyVerifier")
            .field("header", &self.header)
            .field("clients", &self.keys.len())
            .finish()
    }
}

impl ApiKeyVerifier {
    pub fn new(auth: &ApiKeyAuth) -> Result<ApiKeyVerifier, ApiKeyConfigError> {
        if auth.header.is_empty() {
            return Ok(ApiKeyVerifier {
                header: None,
                keys: Vec::new(),
            });
        }
        let header = HeaderName::from_bytes(auth.header.as_bytes())
            .map_err(|_| ApiKeyConfigError::InvalidHeader(auth.header.clone()))?;
        let keys = auth
            .keys
            .iter()
            .map(|k| {
                if k.client_id.is_empty() {
                    return Err(ApiKeyConfigError::EmptyClientId);
                }
                let digest = <[u8; 32]>::try_from(k.sha256.as_slice()).map_err(|_| {
                    ApiKeyConfigError::BadDigest {
                        client_id: k.client_id.clone(),
                        len: k.sha256.len(),
                    }
                })?;
                Ok(Entry {
                    digest,
                    client_id: k.client_id.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ApiKeyVerifier {
            header: Some(header),
            keys,
        })
    }

    /// Whether API-key authentication is configured.
    pub fn is_enabled(&self) -> bool {
        self.header.is_some()
    }

    /// The header keys are read from.
    pub fn header(&self) -> Option<&HeaderName> {
        self.header.as_ref()
    }

    /// Reads the key from the request and answers its client id.
    pub fn verify(&self, headers: &HeaderMap) -> Result<&str, ApiKeyError> {
        let Some(header) = &self.header else {
            return Err(ApiKeyError::Missing);
        };
        let mut values = headers.get_all(header).iter();
        let Some(value) = values.next() else {
            return Err(ApiKeyError::Missing);
        };
        if values.next().is_some() {
            return Err(ApiKeyError::Ambiguous);
        }
        // Invalid bytes are hashed like any other key and will not match;
        // handled without branching on content beyond this point.
        self.verify_key(value.as_bytes())
    }

    /// Client id of a key given directly.
    pub fn verify_key(&self, key: &[u8]) -> Result<&str, ApiKeyError> {
        let key = trim_ascii_whitespace(key);
        if key.is_empty() {
            return Err(ApiKeyError::Unknown);
        }
        let digest: [u8; 32] = Sha256::digest(key).into();
        // Compare with every entry; remember the match without leaving early.
        let mut found: Option<&str> = None;
        for entry in &self.keys {
            let equal = ct_eq(&digest, &entry.digest);
            if equal && found.is_none() {
                found = Some(&entry.client_id);
            }
        }
        found.ok_or(ApiKeyError::Unknown)
    }
}

fn trim_ascii_whitespace(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_proto::policy::v1::ApiKeyHash;

    const KEY_A: &str = "pk_live_4f9a1c0e7b2d4c8a9e6f";
    const KEY_B: &str = "pk_live_0000ffff1111eeee2222";

    fn verifier() -> ApiKeyVerifier {
        let hash = |k: &str| Sha256::digest(k.as_bytes()).to_vec();
        ApiKeyVerifier::new(&ApiKeyAuth {
            header: "x-api-key".into(),
            keys: vec![
                ApiKeyHash {
                    client_id: "billing".into(),
                    sha256: hash(KEY_A),
                },
                ApiKeyHash {
                    client_id: "reports".into(),
                    sha256: hash(KEY_B),
                },
            ],
        })
        .unwrap()
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-api-key", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn right_key_gives_client_id() {
        let v = verifier();
        assert_eq!(v.verify(&headers(&[KEY_A])), Ok("billing"));
        assert_eq!(v.verify(&headers(&[KEY_B])), Ok("reports"));
        assert_eq!(v.verify(&headers(&[&format!(" {KEY_A} ")])), Ok("billing"));
    }

    #[test]
    fn wrong_missing_and_duplicate() {
        let v = verifier();
        let wrong = format!("{KEY_A}x");
        assert_eq!(v.verify(&headers(&[&wrong])), Err(ApiKeyError::Unknown));
        assert_eq!(v.verify(&headers(&[""])), Err(ApiKeyError::Unknown));
        assert_eq!(v.verify(&HeaderMap::new()), Err(ApiKeyError::Missing));
        // Two values, even two right ones, are ambiguous.
        assert_eq!(
            v.verify(&headers(&[KEY_A, KEY_B])),
            Err(ApiKeyError::Ambiguous)
        );
        assert_eq!(
            v.verify(&headers(&[KEY_A, KEY_A])),
            Err(ApiKeyError::Ambiguous)
        );
        // A key in another header is not read.
        let mut h = HeaderMap::new();
        h.insert("authorization", KEY_A.parse().unwrap());
        assert_eq!(v.verify(&h), Err(ApiKeyError::Missing));
        assert_eq!(ApiKeyError::Missing.code(), "apikey.missing");
        assert_eq!(ApiKeyError::Unknown.code(), "apikey.unknown");
        assert_eq!(ApiKeyError::Ambiguous.code(), "apikey.ambiguous");
    }

    #[test]
    fn key_never_in_errors_or_debug() {
        let v = verifier();
        for h in [
            headers(&[&format!("{KEY_A}x")]),
            headers(&[KEY_A, KEY_B]),
            HeaderMap::new(),
        ] {
            let e = v.verify(&h).unwrap_err();
            for text in [e.to_string(), format!("{e:?}"), format!("{v:?}")] {
                assert!(!text.contains(KEY_A) && !text.contains(KEY_B), "{text}");
                assert!(!text.contains("pk_live"), "{text}");
            }
        }
    }

    #[test]
    fn disabled_and_invalid_configs() {
        let off = ApiKeyVerifier::new(&ApiKeyAuth::default()).unwrap();
        assert!(!off.is_enabled());
        assert_eq!(off.verify(&headers(&[KEY_A])), Err(ApiKeyError::Missing));

        let bad = ApiKeyVerifier::new(&ApiKeyAuth {
            header: "x-api-key".into(),
            keys: vec![ApiKeyHash {
                client_id: "c".into(),
                sha256: vec![1, 2, 3],
            }],
        });
        assert!(matches!(
            bad,
            Err(ApiKeyConfigError::BadDigest { len: 3, .. })
        ));
        let bad = ApiKeyVerifier::new(&ApiKeyAuth {
            header: "bad header".into(),
            keys: vec![],
        });
        assert!(matches!(bad, Err(ApiKeyConfigError::InvalidHeader(_))));
    }
}
