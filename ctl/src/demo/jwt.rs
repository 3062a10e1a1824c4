//! The demo's token issuer: an Ed25519 key made for this run, its public
//! JWKS (written into the orders policy inline) and signed tokens with
//! a `roles` claim.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

pub const ISSUER: &str = "https://id.demo.palisade.local";
pub const AUDIENCE: &str = "orders";
const KID: &str = "demo-1";

pub struct Issuer {
    key: EncodingKey,
    pub jwks: String,
}

impl Issuer {
    pub fn new() -> anyhow::Result<Self> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let key = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes())?;
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "kid": KID,
            "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw()),
        }]})
        .to_string();
        Ok(Self { key, jwks })
    }

    /// A token for `subject` holding `roles`, valid for ten minutes.
    pub fn token(&self, subject: &str, roles: &[&str]) -> anyhow::Result<String> {
        let now = jiff::Timestamp::now().as_second();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": subject,
            "iat": now, "exp": now + 600, "roles": roles,
        });
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KID.to_owned());
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}
