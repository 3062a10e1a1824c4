//! JWKS documents (RFC 7517) turned into verification keys.
//!
//! Accepted keys: `RSA` (`n`, `e`; modulus of at least 2048 bits), `EC` on
//! `P-256` (`x`, `y`) and `OKP` on `Ed25519` (`x`). Keys of any other type or
//! curve, keys whose `use` is not `sig`, and keys whose `alg` names an
//! algorithm we do not verify are skipped, so an identity provider can publish
//! keys for other consumers in the same document. A document carrying any
//! private or symmetric member (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, `k`) is
//! refused as a whole: somebody published a secret, and we will not build
//! anything on it.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// Largest JWKS document accepted, inline or fetched.
pub const MAX_JWKS_BYTES: usize = 512 * 1024;
/// Most keys kept from one document (a JWKS normally has a handful).
pub const MAX_KEYS: usize = 64;

const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Why a JWKS document was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwksError {
    #[error("JWKS is not a JSON object with a \"keys\" array: {0}")]
    Malformed(String),
    #[error("JWKS key #{index} carries the private or symmetric member {member:?}")]
    PrivateMember { index: usize, member: &'static str },
    #[error("JWKS larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
}

/// The key families we verify with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    Rsa,
    EcP256,
    Ed25519,
}

impl KeyType {
    /// The one algorithm each key type verifies: a token must name exactly
    /// this `alg` to be checked with such a key (no key confusion).
    pub fn algorithm(self) -> Algorithm {
        match self {
            KeyType::Rsa => Algorithm::RS256,
            KeyType::EcP256 => Algorithm::ES256,
            KeyType::Ed25519 => Algorithm::EdDSA,
        }
    }
}

/// One usable verification key.
#[derive(Clone, Debug)]
pub struct JwkKey {
    pub kid: Option<String>,
    pub key_type: KeyType,
    pub key: DecodingKey,
}

/// The usable keys of one JWKS document.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: Vec<JwkKey>,
    by_kid: HashMap<String, Vec<usize>>,
    /// Keys skipped (unsupported type, curve, use or alg; bad encoding).
    skipped: usize,
}

impl KeySet {
    /// Parses a JWKS document. Unsupported keys are skipped; private members
    /// anywhere refuse the document.
    pub fn from_json(doc: &[u8]) -> Result<KeySet, JwksError> {
        if doc.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let value: Value =
            serde_json::from_slice(doc).map_err(|e| JwksError::Malformed(e.to_string()))?;
        let keys = value
            .as_object()
            .and_then(|o| o.get("keys"))
            .and_then(Value::as_array)
            .ok_or_else(|| JwksError::Malformed("missing \"keys\" array".into()))?;

        // Refuse private material before looking at anything else.
        for (index, key) in keys.iter().enumerate() {
            let Some(obj) = key.as_object() else {
                continue;
            };
            if let Some(member) = PRIVATE_MEMBERS.iter().find(|m| obj.contains_key(**m)) {
                return Err(JwksError::PrivateMember { index, member });
            }
        }

        let mut set = KeySet::default();
        for key in keys {
            if set.keys.len() == MAX_KEYS {
                set.skipped += 1;
                continue;
            }
            match parse_key(key) {
                Some(k) => {
                    if let Some(kid) = &k.kid {
                        set.by_kid
                            .entry(kid.clone())
                            .or_default()
                            .push(set.keys.len());
                    }
                    set.keys.push(k);
                }
                None => set.skipped += 1,
            }
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys of the document were not usable.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    pub fn keys(&self) -> &[JwkKey] {
        &self.keys
    }

    /// Whether any key has this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// The keys a token naming `kid` may be checked with: those with that kid,
    /// or, for a token without a kid, every key.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&str>,
    ) -> Box<dyn Iterator<Item = &'a JwkKey> + 'a> {
        match kid {
            Some(kid) => match self.by_kid.get(kid) {
                Some(idx) => Box::new(idx.iter().map(|&i| &self.keys[i])),
                None => Box::new(std::iter::empty()),
            },
            None => Box::new(self.keys.iter()),
        }
    }
}

fn parse_key(key: &Value) -> Option<JwkKey> {
    let obj = key.as_object()?;
    let kty = obj.get("kty")?.as_str()?;
    let text = |name: &str| obj.get(name).and_then(Value::as_str);
    let b64 = |name: &str| text(name).and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());

    if let Some(u) = obj.get("use")
        && u.as_str() != Some("sig")
    {
        return None;
    }
    let kid = match obj.get("kid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return None,
    };

    let (key_type, key) = match kty {
        "RSA" => {
            let n = b64("n")?;
            let e = b64("e")?;
            let n = strip_leading_zeros(&n);
            let e = strip_leading_zeros(&e);
            // At least 2048 bits; exponent odd and > 1 (RFC 8017).
            if n.len() < 256 || e.is_empty() || e.len() > 8 || e.last()? & 1 == 0 || e == [1] {
                return None;
            }
            (KeyType::Rsa, DecodingKey::from_rsa_raw_components(n, e))
        }
        "EC" => {
            if text("crv")? != "P-256" {
                return None;
            }
            let x = b64("x")?;
            let y = b64("y")?;
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (KeyType::EcP256, DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            if text("crv")? != "Ed25519" {
                return None;
            }
            let x = b64("x")?;
            if x.len() != 32 {
                return None;
            }
            (KeyType::Ed25519, DecodingKey::from_ed_der(&x))
        }
        _ => return None,
    };

    // A key that declares its algorithm is used for nothing else.
    if let Some(alg) = obj.get("alg") {
        let expected = match key_type.algorithm() {
            Algorithm::RS256 => "RS256",
            Algorithm::ES256 => "ES256",
            _ => "EdDSA",
        };
        if alg.as_str() != Some(expected) {
            return None;
        }
    }
    Some(JwkKey { kid, key_type, key })
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::test_support::*;

    #[test]
    fn parses_rsa_ec_and_ed25519_and_indexes_by_kid() {
        let rsa = TestKey::rsa("r1");
        let ec = TestKey::ec("e1");
        let ed = TestKey::ed("d1");
        let mut no_kid = TestKey::ec("unused");
        no_kid.kid = None;
        let doc = jwks_json(&[&rsa, &ec, &ed, &no_kid]);
        let set = KeySet::from_json(doc.as_bytes()).unwrap();
        assert_eq!(set.len(), 4);
        assert_eq!(set.skipped(), 0);
        assert!(set.has_kid("r1") && set.has_kid("e1") && set.has_kid("d1"));
        let types: Vec<_> = set.candidates(Some("r1")).map(|k| k.key_type).collect();
        assert_eq!(types, vec![KeyType::Rsa]);
        assert_eq!(
            set.candidates(Some("d1")).next().unwrap().key_type,
            KeyType::Ed25519
        );
        assert_eq!(set.candidates(Some("nope")).count(), 0);
        assert_eq!(set.candidates(None).count(), 4);
    }

    #[test]
    fn skips_other_types_curves_uses_and_algs() {
        let ec = TestKey::ec("e1");
        let mut keys: Vec<Value> = vec![ec.jwk()];
        keys.push(
            serde_json::json!({"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA", "kid": "p384"}),
        );
        keys.push(serde_json::json!({"kty": "OKP", "crv": "X25519", "x": "AA", "kid": "x"}));
        keys.push(serde_json::json!({"kty": "foo", "kid": "foo"}));
        let mut enc = ec.jwk();
        enc["use"] = "enc".into();
        enc["kid"] = "enc".into();
        keys.push(enc);
        let mut wrong_alg = ec.jwk();
        wrong_alg["alg"] = "RS256".into();
        wrong_alg["kid"] = "wrong-alg".into();
        keys.push(wrong_alg);
        // 1024-bit RSA: too small.
        keys.push(serde_json::json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xc1u8; 128]), "e": "AQAB", "kid": "small"}));
        keys.push(serde_json::json!("not an object"));
        let doc = serde_json::json!({ "keys": keys }).to_string();
        let set = KeySet::from_json(doc.as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.skipped(), 7);
        assert!(set.has_kid("e1"));
    }

    #[test]
    fn refuses_private_members() {
        for member in PRIVATE_MEMBERS {
            let mut jwk = TestKey::ec("e1").jwk();
            jwk[member] = "AAAA".into();
            let doc = serde_json::json!({ "keys": [TestKey::ed("ok").jwk(), jwk] }).to_string();
            let err = KeySet::from_json(doc.as_bytes()).unwrap_err();
            assert_eq!(err, JwksError::PrivateMember { index: 1, member });
        }
        // A symmetric key is refused too, even though we would not use it.
        let doc = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(matches!(
            KeySet::from_json(doc.as_bytes()),
            Err(JwksError::PrivateMember { member: "k", .. })
        ));
    }

    #[test]
    fn refuses_malformed_documents() {
        for doc in ["", "[]", "{}", r#"{"keys": {}}"#, "not json"] {
            assert!(
                matches!(
                    KeySet::from_json(doc.as_bytes()),
                    Err(JwksError::Malformed(_))
                ),
                "{doc}"
            );
        }
        let big = vec![b' '; MAX_JWKS_BYTES + 1];
        assert_eq!(KeySet::from_json(&big).unwrap_err(), JwksError::TooLarge);
        assert!(KeySet::from_json(br#"{"keys": []}"#).unwrap().is_empty());
    }
}
