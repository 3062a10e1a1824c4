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
        let bytes = read(path)?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses content already read from `path` (the reloader hashes the
    /// bytes before deciding to parse them); `path` only names errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, TokenFileError> {
        // Same error as `read_to_string` gave before the split, so a start
        // with a non-UTF-8 file fails exactly as it always did.
        let text = std::str::from_utf8(bytes).map_err(|_| TokenFileError::Read {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            ),
        })?;
        Self::parse(text)
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

    /// How `self` differs from `old`: tokens added, tokens removed, and
    /// tokens kept but now mapped to another identity. For logs; counts
    /// only, never tokens.
    pub fn diff(&self, old: &TokenFile) -> TokenDiff {
        let mut diff = TokenDiff::default();
        for (digest, (sa, _)) in &self.tokens {
            match old.tokens.get(digest) {
                None => diff.added += 1,
                Some((before, _)) if before != sa => diff.remapped += 1,
                Some(_) => {}
            }
        }
        diff.removed = old
            .tokens
            .keys()
            .filter(|d| !self.tokens.contains_key(*d))
            .count();
        diff
    }

    fn lookup(&self, token: &str) -> Result<ServiceAccount, TokenError> {
        self.tokens
            .get(&digest(token))
            .map(|(sa, _)| sa.clone())
            .ok_or_else(|| TokenError::Rejected("not in the token file".into()))
    }
}

/// What changed between two versions of a token file (see [`TokenFile::diff`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenDiff {
    pub added: usize,
    pub removed: usize,
    pub remapped: usize,
}

/// Reads the raw bytes of a token file, naming the file on error.
pub fn read(path: &Path) -> Result<Vec<u8>, TokenFileError> {
    std::fs::read(path).map_err(|source| TokenFileError::Read {
        path: path.display().to_string(),
        source,
    })
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

    #[test]
    fn non_utf8_content_is_a_read_error_naming_the_file() {
        let err =
            TokenFile::from_bytes(Path::new("/etc/tokens"), b"tok \xff shop a\n").unwrap_err();
        assert!(matches!(err, TokenFileError::Read { .. }));
        assert!(err.to_string().starts_with("/etc/tokens: "), "{err}");
    }

    #[test]
    fn diff_counts_added_removed_and_remapped() {
        let old = TokenFile::parse("t1 shop a\nt2 shop b\nt3 shop c\n").unwrap();
        let new = TokenFile::parse("t1 shop a\nt3 shop other\nt4 shop d\nt5 shop e\n").unwrap();
        assert_eq!(
            new.diff(&old),
            TokenDiff {
                added: 2,
                removed: 1,
                remapped: 1
            }
        );
        assert_eq!(old.diff(&old), TokenDiff::default());
    }
}
