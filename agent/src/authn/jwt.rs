//! JWT verification against the `JwtProvider`s of a `WorkloadPolicy`.
//!
//! Per request: find the token (each provider names a header and a prefix,
//! default `authorization` / `Bearer `; a header present twice, or different
//! tokens in two headers, is refused), read its header only to learn `alg` and
//! `kid`, refuse `none`, every HMAC alg and anything but RS256/ES256/EdDSA,
//! pick the provider(s) whose issuer equals the token's `iss`, refuse an alg
//! the provider does not list, check the signature with a key of the matching
//! type only (a token cannot make us use an RSA key as an HMAC secret), then
//! check `exp` (required), `nbf`, and `aud` with the provider's leeway.
//!
//! Verified tokens are cached under the SHA-256 of the token (never the token)
//! until `exp`, capped at [`JwtOptions::cache_max_ttl`] so a key removed from a
//! JWKS stops being honoured within that time. A cache hit costs one hash and
//! no signature check ([`JwtVerifier::signature_checks`] counts those).
//!
//! Headers such as `jku`, `x5u`, `jwk` and `x5c` are ignored: keys come only
//! from the policy. A `crit` header is refused (we implement no extension).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderName};
use jsonwebtoken::Algorithm;
use palisade_proto::policy::v1::JwtProvider;
use palisade_proto::policy::v1::jwt_provider::Keys;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::jwks::KeySet;
use super::jwks_fetch::{JwksFetchConfig, JwksFetcher};
use super::{Clock, SystemClock};

/// Longest token accepted (bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token was not accepted. `code()` is stable and goes into
/// `credential_error` and audit; `Display` adds a short detail that never
/// contains the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// No token in any configured header: not a credential error.
    #[error("jwt.missing: no token presented")]
    Missing,
    #[error("jwt.malformed: {0}")]
    Malformed(&'static str),
    #[error("jwt.alg_not_allowed: {0}")]
    AlgNotAllowed(String),
    #[error("jwt.unknown_kid: no key {0}")]
    UnknownKid(String),
    #[error("jwt.bad_signature: signature does not verify")]
    BadSignature,
    #[error("jwt.expired: token expired")]
    Expired,
    #[error("jwt.not_yet_valid: nbf is in the future")]
    NotYetValid,
    #[error("jwt.wrong_issuer: {0}")]
    WrongIssuer(&'static str),
    #[error("jwt.wrong_audience: no accepted audience in aud")]
    WrongAudience,
    #[error("jwt.keys_unavailable: {0}")]
    KeysUnavailable(String),
}

impl JwtError {
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Missing => "jwt.missing",
            JwtError::Malformed(_) => "jwt.malformed",
            JwtError::AlgNotAllowed(_) => "jwt.alg_not_allowed",
            JwtError::UnknownKid(_) => "jwt.unknown_kid",
            JwtError::BadSignature => "jwt.bad_signature",
            JwtError::Expired => "jwt.expired",
            JwtError::NotYetValid => "jwt.not_yet_valid",
            JwtError::WrongIssuer(_) => "jwt.wrong_issuer",
            JwtError::WrongAudience => "jwt.wrong_audience",
            JwtError::KeysUnavailable(_) => "jwt.keys_unavailable",
        }
    }

    /// True when no token was presented: the request carries no JWT, which
    /// policy may or may not accept; it is not a failed credential.
    pub fn is_missing(&self) -> bool {
        matches!(self, JwtError::Missing)
    }
}

/// A `JwtProvider` the agent cannot use; the policy should be NACKed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("JWT provider {provider:?}: {reason}")]
pub struct JwtConfigError {
    pub provider: String,
    pub reason: String,
}

/// A verified token.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedJwt {
    /// `JwtProvider.id` of the provider that accepted it.
    pub provider_id: Arc<str>,
    /// The token's claims (a JSON object), for `Request::jwt_claims`.
    pub claims: Arc<Value>,
}

/// Tunables of [`JwtVerifier`].
#[derive(Clone, Debug)]
pub struct JwtOptions {
    pub clock: Arc<dyn Clock>,
    pub fetch: JwksFetchConfig,
    /// Client configuration for `https://` JWKS URIs (its roots decide which
    /// CAs are trusted); without it https URIs are unavailable.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Most verified tokens kept.
    pub cache_capacity: usize,
    /// Longest a verified token is trusted without a new signature check.
    pub cache_max_ttl: Duration,
}

impl Default for JwtOptions {
    fn default() -> Self {
        JwtOptions {
            clock: Arc::new(SystemClock),
            fetch: JwksFetchConfig::default(),
            tls: None,
            cache_capacity: 10_000,
            cache_max_ttl: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    header: HeaderName,
    /// Compared ASCII case-insensitively; empty: the whole value.
    prefix: String,
}

#[derive(Debug)]
enum KeySource {
    Inline(Arc<KeySet>),
    Remote(Arc<JwksFetcher>),
}

#[derive(Debug)]
struct Provider {
    id: Arc<str>,
    issuer: String,
    audiences: Vec<String>,
    location: usize,
    leeway: i64,
    algorithms: Vec<Algorithm>,
    keys: KeySource,
}

#[derive(Debug)]
struct CacheEntry {
    provider: usize,
    claims: Arc<Value>,
    expires_at: i64,
}

/// Verifies JWTs for one version of a workload's policy.
#[derive(Debug)]
pub struct JwtVerifier {
    providers: Vec<Provider>,
    locations: Vec<Location>,
    clock: Arc<dyn Clock>,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
    cache_capacity: usize,
    cache_max_ttl: i64,
    signature_checks: AtomicU64,
}

impl JwtVerifier {
    /// Builds the verifier. Nothing is fetched yet.
    pub fn new(
        providers: &[JwtProvider],
        options: JwtOptions,
    ) -> Result<JwtVerifier, JwtConfigError> {
        Self::new_reusing(providers, options, None)
    }

    /// Like [`new`](Self::new), but keeps the JWKS fetchers (and their cached
    /// keys and refetch history) of `previous` for URIs it also had, so a
    /// policy update does not refetch every JWKS.
    pub fn new_reusing(
        providers: &[JwtProvider],
        options: JwtOptions,
        previous: Option<&JwtVerifier>,
    ) -> Result<JwtVerifier, JwtConfigError> {
        let mut locations: Vec<Location> = Vec::new();
        let mut fetchers: HashMap<String, Arc<JwksFetcher>> = HashMap::new();
        if let Some(prev) = previous {
            for f in prev.fetchers() {
                if *f.config() == options.fetch {
                    fetchers.insert(f.uri().to_owned(), f.clone());
                }
            }
        }
        let mut built = Vec::with_capacity(providers.len());
        for p in providers {
            let err = |reason: String| JwtConfigError {
                provider: p.id.clone(),
                reason,
            };
            if p.issuer.is_empty() {
                return Err(err("no issuer".into()));
            }
            let (header, prefix) = if p.header.is_empty() {
                (
                    "authorization",
                    if p.prefix.is_empty() {
                        "Bearer "
                    } else {
                        p.prefix.as_str()
                    },
                )
            } else {
                (p.header.as_str(), p.prefix.as_str())
            };
            let header = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| err(format!("invalid header name {header:?}")))?;
            let location = Location {
                header,
                prefix: prefix.to_owned(),
            };
            let location = match locations.iter().position(|l| *l == location) {
                Some(i) => i,
                None => {
                    locations.push(location);
                    locations.len() - 1
                }
            };
            let algorithms = if p.algorithms.is_empty() {
                vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
            } else {
                p.algorithms
                    .iter()
                    .map(|a| match a.as_str() {
                        "RS256" => Ok(Algorithm::RS256),
                        "ES256" => Ok(Algorithm::ES256),
                        "EdDSA" => Ok(Algorithm::EdDSA),
                        other => Err(err(format!("algorithm {other:?} is not supported"))),
                    })
                    .collect::<Result<_, _>>()?
            };
            let keys = match &p.keys {
                Some(Keys::JwksJson(doc)) => KeySource::Inline(Arc::new(
                    KeySet::from_json(doc.as_bytes()).map_err(|e| err(e.to_string()))?,
                )),
                Some(Keys::JwksUri(uri)) => {
                    let fetcher = match fetchers.get(uri) {
                        Some(f) => f.clone(),
                        None => {
                            let mut f =
                                JwksFetcher::new(uri, options.fetch.clone(), options.clock.clone());
                            if let Some(tls) = &options.tls {
                                f = f.with_tls(tls.clone());
                            }
                            let f = Arc::new(f);
                            fetchers.insert(uri.clone(), f.clone());
                            f
                        }
                    };
                    KeySource::Remote(fetcher)
                }
                None => return Err(err("no JWKS (neither jwks_uri nor jwks_json)".into())),
            };
            built.push(Provider {
                id: Arc::from(p.id.as_str()),
                issuer: p.issuer.clone(),
                audiences: p.audiences.clone(),
                location,
                leeway: i64::from(p.leeway_seconds),
                algorithms,
                keys,
            });
        }
        Ok(JwtVerifier {
            providers: built,
            locations,
            clock: options.clock,
            cache: Mutex::new(HashMap::new()),
            cache_capacity: options.cache_capacity,
            cache_max_ttl: i64::try_from(options.cache_max_ttl.as_secs()).unwrap_or(i64::MAX),
            signature_checks: AtomicU64::new(0),
        })
    }

    /// No providers: JWT authentication is off.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Signature verifications performed so far (cache hits do none).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// Verified tokens currently cached.
    pub fn cached_tokens(&self) -> usize {
        self.cache.lock().len()
    }

    /// The JWKS fetchers in use (metrics, reuse).
    pub fn fetchers(&self) -> impl Iterator<Item = &Arc<JwksFetcher>> {
        self.providers.iter().filter_map(|p| match &p.keys {
            KeySource::Remote(f) => Some(f),
            KeySource::Inline(_) => None,
        })
    }

    /// Finds the token in the request headers and verifies it.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<VerifiedJwt, JwtError> {
        let mut found: Option<(usize, &str)> = None;
        for (index, location) in self.locations.iter().enumerate() {
            let mut values = headers.get_all(&location.header).iter();
            let Some(value) = values.next() else { continue };
            if values.next().is_some() {
                return Err(JwtError::Malformed("token header present more than once"));
            }
            let value = value
                .to_str()
                .map_err(|_| JwtError::Malformed("token header is not visible ASCII"))?
                .trim();
            let Some(token) = strip_prefix_ignore_case(value, &location.prefix) else {
                continue; // another scheme, e.g. Basic
            };
            let token = token.trim();
            match found {
                Some((_, other)) if other != token => {
                    return Err(JwtError::Malformed(
                        "different tokens in more than one header",
                    ));
                }
                Some(_) => {}
                None => found = Some((index, token)),
            }
        }
        let (location, token) = found.ok_or(JwtError::Missing)?;
        self.verify_at(Some(location), token).await
    }

    /// Verifies a token against every provider (whatever header it came in).
    pub async fn verify_token(&self, token: &str) -> Result<VerifiedJwt, JwtError> {
        self.verify_at(None, token).await
    }

    async fn verify_at(
        &self,
        location: Option<usize>,
        token: &str,
    ) -> Result<VerifiedJwt, JwtError> {
        if token.is_empty() {
            return Err(JwtError::Malformed("empty token"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed("token too long"));
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = self.clock.unix_seconds();
        if let Some(hit) = self.cache_get(&hash, location, now) {
            return Ok(hit);
        }

        let parsed = parse(token)?;
        let alg = match parsed.alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            "EdDSA" => Algorithm::EdDSA,
            other => {
                return Err(JwtError::AlgNotAllowed(format!(
                    "alg {} refused",
                    printable(other)
                )));
            }
        };
        let issuer = match parsed.claims.get("iss") {
            Some(Value::String(iss)) => iss.as_str(),
            _ => return Err(JwtError::WrongIssuer("token has no iss")),
        };

        let mut first_error = None;
        for (index, provider) in self.providers.iter().enumerate() {
            if location.is_some_and(|l| l != provider.location) || provider.issuer != issuer {
                continue;
            }
            match self.verify_with(provider, &parsed, alg, now).await {
                Ok(expires_at) => {
                    let claims = Arc::new(Value::Object(parsed.claims));
                    self.cache_put(hash, index, claims.clone(), expires_at, now);
                    return Ok(VerifiedJwt {
                        provider_id: provider.id.clone(),
                        claims,
                    });
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(JwtError::WrongIssuer("no provider for this iss")))
    }

    /// Signature and claims against one provider; answers `exp`.
    async fn verify_with(
        &self,
        provider: &Provider,
        token: &Parsed<'_>,
        alg: Algorithm,
        now: i64,
    ) -> Result<i64, JwtError> {
        if !provider.algorithms.contains(&alg) {
            return Err(JwtError::AlgNotAllowed(format!(
                "alg {alg:?} not accepted by the provider"
            )));
        }
        match &provider.keys {
            KeySource::Inline(keys) => self.check_signature(keys, token, alg)?,
            KeySource::Remote(fetcher) => {
                let unavailable = |e: super::jwks_fetch::KeysUnavailable| {
                    JwtError::KeysUnavailable(e.to_string())
                };
                let keys = fetcher.keys().await.map_err(unavailable)?;
                match self.check_signature(&keys, token, alg) {
                    Err(JwtError::UnknownKid(_)) if token.kid.is_some() => {
                        let keys = fetcher
                            .keys_after_unknown_kid(&keys)
                            .await
                            .map_err(unavailable)?;
                        self.check_signature(&keys, token, alg)?;
                    }
                    other => other?,
                }
            }
        }
        check_claims(provider, &token.claims, now)
    }

    fn check_signature(
        &self,
        keys: &KeySet,
        token: &Parsed<'_>,
        alg: Algorithm,
    ) -> Result<(), JwtError> {
        let mut tried = false;
        let mut other_type = false;
        for key in keys.candidates(token.kid.as_deref()) {
            if key.key_type.algorithm() != alg {
                other_type = true;
                continue;
            }
            tried = true;
            self.signature_checks.fetch_add(1, Ordering::Relaxed);
            if let Ok(true) = jsonwebtoken::crypto::verify(
                token.signature,
                token.signing_input.as_bytes(),
                &key.key,
                alg,
            ) {
                return Ok(());
            }
        }
        if tried {
            Err(JwtError::BadSignature)
        } else if other_type {
            Err(JwtError::AlgNotAllowed(format!(
                "alg {alg:?} does not match the key type"
            )))
        } else {
            Err(JwtError::UnknownKid(match &token.kid {
                Some(kid) => format!("with kid {}", printable(kid)),
                None => "for this alg".to_owned(),
            }))
        }
    }

    fn cache_get(&self, hash: &[u8; 32], location: Option<usize>, now: i64) -> Option<VerifiedJwt> {
        let mut cache = self.cache.lock();
        let entry = cache.get(hash)?;
        if entry.expires_at <= now {
            cache.remove(hash);
            return None;
        }
        let provider = &self.providers[entry.provider];
        if location.is_some_and(|l| l != provider.location) {
            return None;
        }
        Some(VerifiedJwt {
            provider_id: provider.id.clone(),
            claims: entry.claims.clone(),
        })
    }

    fn cache_put(&self, hash: [u8; 32], provider: usize, claims: Arc<Value>, exp: i64, now: i64) {
        let expires_at = exp.min(now.saturating_add(self.cache_max_ttl));
        if expires_at <= now || self.cache_capacity == 0 {
            return;
        }
        let mut cache = self.cache.lock();
        if cache.len() >= self.cache_capacity && !cache.contains_key(&hash) {
            cache.retain(|_, e| e.expires_at > now);
            if cache.len() >= self.cache_capacity
                && let Some(soonest) = cache
                    .iter()
                    .min_by_key(|(_, e)| e.expires_at)
                    .map(|(k, _)| *k)
            {
                cache.remove(&soonest);
            }
        }
        cache.insert(
            hash,
            CacheEntry {
                provider,
                claims,
                expires_at,
            },
        );
    }
}

/// A token split and decoded, not yet trusted.
struct Parsed<'t> {
    alg: String,
    kid: Option<String>,
    claims: Map<String, Value>,
    /// `<header>.<payload>`, what the signature covers.
    signing_input: &'t str,
    signature: &'t str,
}

fn parse(token: &str) -> Result<Parsed<'_>, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    let is_b64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !is_b64url(header) || !is_b64url(payload) || !is_b64url(signature) {
        return Err(JwtError::Malformed("not base64url"));
    }
    let decode_object = |part: &str, what: &'static str| -> Result<Map<String, Value>, JwtError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| JwtError::Malformed(what))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(JwtError::Malformed(what)),
        }
    };
    let jose = decode_object(header, "header is not a JSON object")?;
    let claims = decode_object(payload, "claims are not a JSON object")?;
    if jose.contains_key("crit") {
        return Err(JwtError::Malformed("crit header not supported"));
    }
    let alg = match jose.get("alg") {
        Some(Value::String(alg)) => alg.clone(),
        _ => return Err(JwtError::Malformed("header has no alg")),
    };
    let kid = match jose.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed("kid is not a string")),
    };
    Ok(Parsed {
        alg,
        kid,
        claims,
        signing_input: &token[..header.len() + 1 + payload.len()],
        signature,
    })
}

/// `exp` (required), `nbf` and `aud`; answers `exp`. Accepted while
/// `now < exp + leeway` and once `now >= nbf - leeway`.
fn check_claims(
    provider: &Provider,
    claims: &Map<String, Value>,
    now: i64,
) -> Result<i64, JwtError> {
    let exp = numeric_date(claims, "exp")?.ok_or(JwtError::Malformed("no exp claim"))?;
    if now >= exp.saturating_add(provider.leeway) {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && now < nbf.saturating_sub(provider.leeway)
    {
        return Err(JwtError::NotYetValid);
    }
    if !provider.audiences.is_empty() {
        let accepted = |a: &Value| {
            a.as_str()
                .is_some_and(|a| provider.audiences.iter().any(|x| x == a))
        };
        let ok = match claims.get("aud") {
            Some(Value::Array(auds)) => auds.iter().any(accepted),
            Some(aud) => accepted(aud),
            None => false,
        };
        if !ok {
            return Err(JwtError::WrongAudience);
        }
    }
    Ok(exp)
}

/// A NumericDate claim in whole seconds (fractions rounded down).
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let Value::Number(n) = value else {
        return Err(JwtError::Malformed(match name {
            "exp" => "exp is not a number",
            _ => "nbf is not a number",
        }));
    };
    Ok(Some(match (n.as_i64(), n.as_u64(), n.as_f64()) {
        (Some(i), _, _) => i,
        (None, Some(_), _) => i64::MAX,
        (None, None, Some(f)) => f.floor().clamp(i64::MIN as f64, i64::MAX as f64) as i64,
        _ => return Err(JwtError::Malformed("bad NumericDate")),
    }))
}

/// The value after `prefix` (ASCII case-insensitive). A prefix ending in
/// whitespace (`"Bearer "`) also matches the bare scheme (`"Bearer"`, giving an
/// empty token) but not a longer word (`"Bearerx"`).
fn strip_prefix_ignore_case<'v>(value: &'v str, prefix: &str) -> Option<&'v str> {
    let word = prefix.trim_end();
    let head = value.get(..word.len())?;
    if !head.eq_ignore_ascii_case(word) {
        return None;
    }
    let rest = &value[word.len()..];
    let needs_space = word.len() < prefix.len();
    if needs_space && !rest.is_empty() && !rest.starts_with(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    Some(rest)
}

/// Up to 64 characters of attacker-supplied text, safe for a log line.
fn printable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    format!("{out:?}")
}

#[cfg(test)]
mod tests;
