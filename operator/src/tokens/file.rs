//! Local-mode tokens: a file of `TOKEN NAMESPACE SERVICEACCOUNT` lines.
//! Blank lines and `#` comments are ignored. Tokens are kept only as
//! SHA-256 digests, so lookups do not compare secret bytes one by one and a
//! memory dump does not reveal them.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{NameError, ServiceAccount, TokenError, TokenValidator, ValidateFuture};

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("line {line}: expected `TOKEN NAMESPACE SERVICEACCOUNT`")]
    Fields { line: usize },
    #[error("line {line}: {source}")]
    Name { line: usize, source: NameError },
    #[error("line {line}: the token already appears on line {first}")]
    Duplicate { line: usize, first: usize },
}

pub struct TokenFile {
    // digest -> (identity, line number for logs)
    tokens: HashMap<[u8; 32], (ServiceAccount, usize)>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl TokenFile {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut tokens = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = strip_comment(raw).trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [token, namespace, service_account] = fields[..] else {
                return Err(TokenFileError::Fields { line });
            };
            let identity = ServiceAccount::new(namespace, service_account)
                .map_err(|source| TokenFileError::Name { line, source })?;
            if token.len() < 16 {
                tracing::warn!(
                    line,
                    "token file: tokens shorter than 16 characters are easy to guess"
                );
            }
            if let Some((_, first)) = tokens.insert(digest(token), (identity, line)) {
                return Err(TokenFileError::Duplicate { line, first });
            }
        }
        Ok(Self { tokens })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn lookup(&self, token: &str) -> Result<ServiceAccount, TokenError> {
        self.tokens
            .get(&digest(token))
            .map(|(sa, _)| sa.clone())
            .ok_or_else(|| TokenError::Rejected("not in the token file".into()))
    }
}

/// `#` starts a comment at the beginning of a line or after whitespace, so
/// a token may still contain `#`.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            return &line[..i];
        }
    }
    line
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenValidator for TokenFile {
    fn validate<'a>(&'a self, token: &'a str) -> ValidateFuture<'a> {
        let result = self.lookup(token);
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_comments_and_blanks() {
        let file = TokenFile::parse(
            "# local tokens\n\
             tok-orders-0123456789 shop orders\n\
             \n\
             tok-pay-0123456789\tshop   payments  # trailing comment\n",
        )
        .unwrap();
        assert_eq!(file.len(), 2);
        assert_eq!(
            file.lookup("tok-pay-0123456789").unwrap(),
            ServiceAccount::new("shop", "payments").unwrap()
        );
        assert!(matches!(
            file.lookup("tok-pay"),
            Err(TokenError::Rejected(_))
        ));
        assert!(matches!(file.lookup(""), Err(TokenError::Rejected(_))));
    }

    #[test]
    fn refuses_bad_lines_without_echoing_tokens() {
        let err = TokenFile::parse("secret-token shop\n").unwrap_err();
        assert!(matches!(err, TokenFileError::Fields { line: 1 }));
        assert!(!err.to_string().contains("secret-token"));
        let err = TokenFile::parse("a b c\nsecret-token Shop x\n").unwrap_err();
        assert!(matches!(err, TokenFileError::Name { line: 2, .. }));
        assert!(!err.to_string().contains("secret-token"));
        let err = TokenFile::parse("t a b\nt c d\n").unwrap_err();
        assert!(matches!(
            err,
            TokenFileError::Duplicate { line: 2, first: 1 }
        ));
        assert!(TokenFile::parse("t a b extra\n").is_err());
        let file = TokenFile::parse("a#b shop orders #comment\n").unwrap();
        assert!(file.lookup("a#b").is_ok());
    }
}
