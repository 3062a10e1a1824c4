//! Local-mode tokens that follow edits of the token file without a restart
//! (rotation, revocation).
//!
//! The file is re-read every poll interval and re-parsed only when its
//! SHA-256 changed (the same reasoning as the policy `dir:` source: a
//! content hash cannot miss an edit that keeps size and mtime, nor fire on
//! a `touch`; no inotify, which misses edits on network and some container
//! filesystems).
//!
//! The file is accepted or rejected as a whole. When it cannot be read or
//! does not parse, the error is logged (file and line) and the **last good
//! content stays in force**. Both alternatives are worse: dropping to no
//! tokens would lock every workload out because of a typo, and applying the
//! lines that did parse could re-admit a token that the half-finished edit
//! was revoking (or drop one it was not). A deleted or unreadable file is
//! treated the same way; to revoke every token, write an empty file.
//!
//! Replace the file by writing a new one and renaming it over the old one.
//! An in-place write can be read half-way: new content whose last line has
//! no newline is applied only once two polls in a row read it unchanged.
//!
//! Revocation stops *new* certificates: a removed token is refused from the
//! next poll on, so its workload cannot renew, but certificates already
//! issued stay valid until they expire. A short `--cert-ttl` bounds that.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::file::{self, TokenDiff, TokenFile, TokenFileError};
use super::{TokenValidator, ValidateFuture};

/// What one poll did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// Same content as last time (good or bad): nothing parsed.
    Unchanged,
    /// New content whose last line has no newline: possibly a write caught
    /// half-way, so it is applied only if the next poll reads it again.
    Pending,
    /// New content parsed and now in force.
    Reloaded { tokens: usize, diff: TokenDiff },
}

#[derive(Debug)]
struct PollState {
    /// Hash of the content last read, good or bad, so an unchanged broken
    /// file is not re-parsed and re-logged every poll.
    seen: [u8; 32],
    /// Hash of new content without a final newline, seen once.
    pending: Option<[u8; 32]>,
    /// The last read error, logged once rather than every poll.
    read_error: Option<String>,
}

/// A [`TokenValidator`] over a token file that [`run`](Self::run) keeps
/// up to date.
#[derive(Debug)]
pub struct ReloadingTokenFile {
    path: PathBuf,
    /// Swapped whole, so a validation sees either the old or the new file,
    /// never a mix.
    current: RwLock<Arc<TokenFile>>,
    state: Mutex<PollState>,
}

impl ReloadingTokenFile {
    /// Reads the file once. Any error here is the same as
    /// [`TokenFile::load`]'s: a broken file stops the start.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let bytes = file::read(path)?;
        let tokens = TokenFile::from_bytes(path, &bytes)?;
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(tokens)),
            state: Mutex::new(PollState {
                seen: Sha256::digest(&bytes).into(),
                pending: None,
                read_error: None,
            }),
        })
    }

    /// The token file in force now.
    pub fn current(&self) -> Arc<TokenFile> {
        // A panic while holding the lock cannot leave a half-swapped Arc
        // behind, so a poisoned lock still holds a usable value.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file and swaps in its content if it changed and parses.
    /// On error the previous tokens stay in force; the error is logged (a
    /// read error once until it changes) and returned.
    pub fn poll(&self) -> Result<Reload, TokenFileError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = match file::read(&self.path) {
            Ok(bytes) => {
                if state.read_error.take().is_some() {
                    tracing::info!(file = %self.path.display(), "token file readable again");
                }
                bytes
            }
            Err(e) => {
                let msg = e.to_string();
                if state.read_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(file = %self.path.display(), error = %msg,
                        kept = self.current().len(),
                        "cannot read the token file; the previous tokens stay in force");
                }
                state.read_error = Some(msg);
                return Err(e);
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if state.seen == hash {
            state.pending = None;
            return Ok(Reload::Unchanged);
        }
        // An in-place write (`>`, some editors) can be read half-way. A cut
        // at a line end only drops tokens (fail closed), but a cut inside
        // the last line can leave three valid fields with a shorter
        // ServiceAccount (`payments.admin` -> `payments`) and map a token
        // to an identity nobody wrote. So such content must read the same
        // on two polls in a row before it counts.
        if !bytes.is_empty() && !bytes.ends_with(b"\n") && state.pending != Some(hash) {
            state.pending = Some(hash);
            return Ok(Reload::Pending);
        }
        state.pending = None;
        state.seen = hash;
        let tokens = match TokenFile::from_bytes(&self.path, &bytes) {
            Ok(tokens) => tokens,
            Err(e) => {
                // The error names the line; it never contains a token.
                tracing::error!(file = %self.path.display(), error = %e,
                    kept = self.current().len(),
                    "token file rejected; the previous tokens stay in force");
                return Err(e);
            }
        };
        let diff = tokens.diff(&self.current());
        let count = tokens.len();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tokens);
        tracing::info!(file = %self.path.display(), tokens = count, added = diff.added,
            removed = diff.removed, remapped = diff.remapped, "token file reloaded");
        if count == 0 {
            tracing::warn!(file = %self.path.display(),
                "the token file holds no tokens; every Certify is refused");
        }
        Ok(Reload::Reloaded {
            tokens: count,
            diff,
        })
    }

    /// Polls every `interval`, forever.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let this = self.clone();
            // File reads block; keep them off the async workers. Errors are
            // logged by `poll` itself.
            if let Err(e) = tokio::task::spawn_blocking(move || this.poll()).await {
                tracing::error!(file = %self.path.display(), error = %e,
                    "token file poller failed; the tokens in force are frozen");
                return;
            }
        }
    }
}

impl TokenValidator for ReloadingTokenFile {
    fn validate<'a>(&'a self, token: &'a str) -> ValidateFuture<'a> {
        // Take the current file out of the lock first, so no lock is held
        // across the await.
        let current = self.current();
        Box::pin(async move { current.validate(token).await })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ServiceAccount, TokenError};
    use super::*;

    const A: &str = "tok-orders-9f2c41d7a0b3e8c5";
    const B: &str = "tok-payments-1b7e93c0d4a2f6e8";

    fn write(path: &Path, text: &str) {
        // Write and rename, as operators are told to.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    async fn identity(t: &ReloadingTokenFile, token: &str) -> Result<ServiceAccount, TokenError> {
        t.validate(token).await
    }

    fn setup(text: &str) -> (tempfile::TempDir, PathBuf, ReloadingTokenFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        write(&path, text);
        let tokens = ReloadingTokenFile::load(&path).unwrap();
        (dir, path, tokens)
    }

    #[tokio::test]
    async fn added_token_is_accepted_and_removed_one_refused_after_a_poll() {
        let (_dir, path, tokens) = setup(&format!("{A} shop orders\n"));
        assert!(identity(&tokens, B).await.is_err());

        write(&path, &format!("{A} shop orders\n{B} shop payments\n"));
        // Nothing changes before the poll.
        assert!(identity(&tokens, B).await.is_err());
        assert_eq!(
            tokens.poll().unwrap(),
            Reload::Reloaded {
                tokens: 2,
                diff: TokenDiff {
                    added: 1,
                    removed: 0,
                    remapped: 0
                }
            }
        );
        assert_eq!(
            identity(&tokens, B).await.unwrap(),
            ServiceAccount::new("shop", "payments").unwrap()
        );

        write(&path, &format!("{B} shop payments\n"));
        assert!(matches!(
            tokens.poll(),
            Ok(Reload::Reloaded { tokens: 1, .. })
        ));
        assert!(matches!(
            identity(&tokens, A).await,
            Err(TokenError::Rejected(_))
        ));
        assert!(identity(&tokens, B).await.is_ok());

        // An empty file revokes everything.
        write(&path, "# nobody\n");
        assert!(matches!(
            tokens.poll(),
            Ok(Reload::Reloaded { tokens: 0, .. })
        ));
        assert!(identity(&tokens, B).await.is_err());
    }

    #[tokio::test]
    async fn broken_edit_keeps_the_previous_tokens() {
        let (_dir, path, tokens) = setup(&format!("{B} shop payments\n"));
        // A half-finished edit that would re-admit A if applied line by line.
        write(
            &path,
            &format!("{A} shop orders\n{B} shop payments\nhalf-typed shop\n"),
        );
        let err = tokens.poll().unwrap_err();
        assert!(matches!(err, TokenFileError::Fields { line: 3 }), "{err}");
        assert!(
            identity(&tokens, A).await.is_err(),
            "a broken file re-admitted a token"
        );
        assert!(
            identity(&tokens, B).await.is_ok(),
            "a broken file locked B out"
        );
        // The same broken content is not re-parsed (nor re-logged).
        assert_eq!(tokens.poll().unwrap(), Reload::Unchanged);

        // A deleted file also keeps the tokens, and reports every poll.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(tokens.poll(), Err(TokenFileError::Read { .. })));
        assert!(matches!(tokens.poll(), Err(TokenFileError::Read { .. })));
        assert!(identity(&tokens, B).await.is_ok());

        // Fixing the file applies it.
        write(&path, &format!("{A} shop orders\n"));
        assert!(matches!(
            tokens.poll(),
            Ok(Reload::Reloaded { tokens: 1, .. })
        ));
        assert!(identity(&tokens, A).await.is_ok());
        assert!(identity(&tokens, B).await.is_err());
    }

    #[tokio::test]
    async fn unchanged_content_is_not_reparsed() {
        let text = format!("{A} shop orders\n");
        let (_dir, path, tokens) = setup(&text);
        let before = tokens.current();
        assert_eq!(tokens.poll().unwrap(), Reload::Unchanged);
        // Rewritten with identical bytes (a new inode, a new mtime).
        write(&path, &text);
        assert_eq!(tokens.poll().unwrap(), Reload::Unchanged);
        assert!(
            Arc::ptr_eq(&before, &tokens.current()),
            "the token file was swapped although nothing changed"
        );
        // A comment-only edit is new content: parsed, same tokens.
        write(&path, &format!("# rotated monthly\n{text}"));
        assert_eq!(
            tokens.poll().unwrap(),
            Reload::Reloaded {
                tokens: 1,
                diff: TokenDiff::default()
            }
        );
    }

    #[tokio::test]
    async fn a_last_line_without_newline_waits_for_a_second_read() {
        let (_dir, path, tokens) = setup(&format!("{A} shop orders\n"));
        // An in-place write read half-way through B's ServiceAccount.
        std::fs::write(&path, format!("{A} shop orders\n{B} shop payments")).unwrap();
        assert_eq!(tokens.poll().unwrap(), Reload::Pending);
        assert!(
            identity(&tokens, B).await.is_err(),
            "a possibly cut last line was applied at once"
        );
        // The writer finishes.
        std::fs::write(&path, format!("{A} shop orders\n{B} shop payments.admin")).unwrap();
        assert_eq!(tokens.poll().unwrap(), Reload::Pending);
        assert!(identity(&tokens, B).await.is_err());
        // Stable for one poll: applied, with the whole name.
        assert!(matches!(
            tokens.poll(),
            Ok(Reload::Reloaded { tokens: 2, .. })
        ));
        assert_eq!(
            identity(&tokens, B).await.unwrap(),
            ServiceAccount::new("shop", "payments.admin").unwrap()
        );
        assert_eq!(tokens.poll().unwrap(), Reload::Unchanged);
    }

    #[test]
    fn a_broken_file_at_start_fails_with_the_token_file_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "tok-orders-9f2c41d7a0b3e8c5 Shop orders\n").unwrap();
        let err = ReloadingTokenFile::load(&path).unwrap_err();
        assert!(matches!(err, TokenFileError::Name { line: 1, .. }), "{err}");
        assert!(ReloadingTokenFile::load(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn run_polls_on_the_interval() {
        let (_dir, path, tokens) = setup(&format!("{A} shop orders\n"));
        let tokens = Arc::new(tokens);
        let poller = tokio::spawn(tokens.clone().run(Duration::from_millis(50)));
        write(&path, &format!("{B} shop payments\n"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while identity(&tokens, B).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(identity(&tokens, A).await.is_err());
        poller.abort();
    }
}
