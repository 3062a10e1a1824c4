//! The local policy source (`--source dir:<path>`, DESIGN §9): every
//! `*.yaml` / `*.yml` file of one directory, re-read on a poll interval.
//!
//! Each file is accepted or rejected as a whole. A file that does not parse
//! or validate is logged (file, document, field, problem) and its **last
//! good** content stays in force: an editing mistake must never silently
//! drop a policy that was protecting a workload. Deleting a file is a
//! deliberate act, so its policies go away.
//!
//! Change detection reads and hashes every file on each poll. Policy
//! directories are small, and a content hash cannot miss an edit that
//! keeps size and mtime (coarse-mtime filesystems, `cp -p`), nor fire on a
//! `touch` that changes nothing. No inotify: it misses edits on network and
//! some container filesystems, and ConfigMap volumes swap a symlink.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::crd::ApiSecurityPolicy;
use palisade_policy::documents::load_policies;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// Every policy currently in force, in a stable order (file name, then
/// position in the file).
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub policies: Vec<ApiSecurityPolicy>,
    /// Increases by one with every change; for logs.
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--source {0:?}: expected dir:<path>")]
    Spec(String),
    #[error("policy directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("policy directory {0} is not a directory")]
    NotADirectory(String),
}

/// Where policies come from, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    Dir(PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("dir:") {
            Some(path) if !path.is_empty() => Ok(Self::Dir(PathBuf::from(path))),
            _ => Err(SourceError::Spec(s.to_owned())),
        }
    }
}

#[derive(Debug, Default)]
struct FileState {
    /// Hash of the content last read, good or bad, so an unchanged broken
    /// file is not re-parsed and re-logged every poll.
    seen: Option<[u8; 32]>,
    /// The last content that parsed and validated; empty if none ever did.
    good: Vec<ApiSecurityPolicy>,
    /// The last read error, logged once rather than every poll.
    read_error: Option<String>,
}

/// Polls one directory and publishes the policies in force on a watch
/// channel.
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    dir_error: Option<String>,
    revision: u64,
    tx: watch::Sender<Arc<PolicySet>>,
}

impl DirSource {
    /// Reads the directory once (so the first subscribers see its policies)
    /// and returns the source with a receiver of the set in force. A missing
    /// directory is an error; broken files are not (they are logged).
    pub fn open(dir: &Path) -> Result<(Self, watch::Receiver<Arc<PolicySet>>), SourceError> {
        let meta = std::fs::metadata(dir).map_err(|source| SourceError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SourceError::NotADirectory(dir.display().to_string()));
        }
        let (tx, rx) = watch::channel(Arc::new(PolicySet::default()));
        let mut source = Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            dir_error: None,
            revision: 0,
            tx,
        };
        source.poll();
        Ok((source, rx))
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<PolicySet> {
        self.tx.borrow().clone()
    }

    /// Re-reads the directory; publishes a new set when anything in force
    /// changed. Returns whether it did.
    pub fn poll(&mut self) -> bool {
        let listed = match self.list() {
            Ok(listed) => {
                if self.dir_error.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "policy directory readable again");
                }
                listed
            }
            Err(e) => {
                // Keep everything in force: an unreadable directory (a
                // remount, a permission slip) is not a request to delete.
                let msg = e.to_string();
                if self.dir_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(dir = %self.dir.display(), error = %msg,
                        "cannot list the policy directory; keeping the policies in force");
                }
                self.dir_error = Some(msg);
                return false;
            }
        };
        let mut changed = false;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !listed.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(state) = self.files.remove(&path) {
                tracing::info!(file = %path.display(), policies = state.good.len(),
                    "policy file removed; its policies are withdrawn");
                changed |= !state.good.is_empty();
            }
        }
        for path in listed {
            let state = self.files.entry(path.clone()).or_default();
            changed |= refresh(&path, state);
        }
        if changed {
            self.publish();
        }
        changed
    }

    /// Polls every `interval`, forever.
    pub async fn run(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            // File reads block; keep them off the async workers.
            match tokio::task::spawn_blocking(move || {
                self.poll();
                self
            })
            .await
            {
                Ok(source) => self = source,
                Err(e) => {
                    tracing::error!(error = %e, "policy directory poller failed; policies are frozen");
                    return;
                }
            }
        }
    }

    /// Regular `*.yaml` / `*.yml` files, hidden ones (editor swap files,
    /// ConfigMap `..data`) excluded. Symlinks are followed.
    fn list(&self) -> std::io::Result<BTreeSet<PathBuf>> {
        let mut out = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                out.insert(path);
            }
        }
        Ok(out)
    }

    fn publish(&mut self) {
        self.revision += 1;
        let mut seen: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
        let mut policies = Vec::new();
        for (path, state) in &self.files {
            for p in &state.good {
                let key = (
                    p.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    p.metadata.name.clone().unwrap_or_default(),
                );
                // One name, one object, as in Kubernetes: the first file in
                // name order wins, deterministically.
                if let Some(first) = seen.get(&key) {
                    tracing::warn!(policy = %format!("{}/{}", key.0, key.1),
                        file = %path.display(), kept = %first.display(),
                        "duplicate policy name; this copy is ignored");
                    continue;
                }
                seen.insert(key, path.clone());
                policies.push(p.clone());
            }
        }
        tracing::info!(
            revision = self.revision,
            policies = policies.len(),
            "policy set updated"
        );
        self.tx.send_replace(Arc::new(PolicySet {
            policies,
            revision: self.revision,
        }));
    }
}

/// Re-reads one file; returns whether its policies in force changed.
fn refresh(path: &Path, state: &mut FileState) -> bool {
    let bytes = match std::fs::read(path) {
        Ok(b) => {
            state.read_error = None;
            b
        }
        Err(e) => {
            let msg = e.to_string();
            if state.read_error.as_deref() != Some(msg.as_str()) {
                tracing::error!(file = %path.display(), error = %msg,
                    "cannot read policy file; its last good content stays in force");
            }
            state.read_error = Some(msg);
            return false;
        }
    };
    let hash: [u8; 32] = Sha256::digest(&bytes).into();
    if state.seen == Some(hash) {
        return false;
    }
    state.seen = Some(hash);
    let kept = state.good.len();
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(_) => {
            tracing::error!(file = %path.display(), kept,
                "policy file rejected: not UTF-8 text; its last good content stays in force");
            return false;
        }
    };
    let docs = match load_policies(&text) {
        Ok(docs) => docs,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, kept,
                "policy file rejected; its last good content stays in force");
            return false;
        }
    };
    let mut good = Vec::with_capacity(docs.len());
    let mut rejected = false;
    for doc in docs {
        match doc {
            Ok(p) => good.push(p),
            Err((label, errors)) => {
                rejected = true;
                for e in &errors.0 {
                    tracing::error!(file = %path.display(), policy = %label,
                        field = %e.path, problem = %e.message, "invalid policy document");
                }
            }
        }
    }
    if rejected {
        // All or nothing per file: applying the good half of an edit could
        // leave a combination nobody wrote.
        tracing::error!(file = %path.display(), kept,
            "policy file rejected; its last good content stays in force");
        return false;
    }
    // A comment-only edit changes nothing in force; no need to publish.
    // (The resource type has no PartialEq; its JSON form is the content.)
    let changed = serde_json::to_value(&good).ok() != serde_json::to_value(&state.good).ok();
    tracing::info!(file = %path.display(), policies = good.len(), "policy file loaded");
    state.good = good;
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: palisade.dev/v1alpha1\nkind: ApiSecurityPolicy\n\
        metadata: {name: a, namespace: shop}\nspec:\n  routes: [{allow: [{namespaces: [shop]}]}]\n";
    const BAD: &str = "apiVersion: palisade.dev/v1alpha1\nkind: ApiSecurityPolicy\n\
        metadata: {name: a, namespace: shop}\nspec:\n  routes: [{allow: [{namespaces: [shop]}], bogus: 1}]\n";

    #[test]
    fn spec_parses() {
        assert_eq!(
            "dir:/etc/p".parse::<SourceSpec>().unwrap(),
            SourceSpec::Dir("/etc/p".into())
        );
        assert!("dir:".parse::<SourceSpec>().is_err());
        assert!("kubernetes".parse::<SourceSpec>().is_err());
    }

    #[test]
    fn broken_edit_keeps_last_good_and_delete_withdraws() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, GOOD).unwrap();
        std::fs::write(dir.path().join(".p.yaml.swp"), "garbage: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "garbage: [").unwrap();
        let (mut src, rx) = DirSource::open(dir.path()).unwrap();
        assert_eq!(rx.borrow().policies.len(), 1);

        std::fs::write(&file, BAD).unwrap();
        assert!(!src.poll());
        assert_eq!(src.current().policies.len(), 1);
        std::fs::write(&file, "not: [yaml").unwrap();
        assert!(!src.poll());
        assert_eq!(src.current().policies.len(), 1);

        // Unchanged content: nothing published.
        std::fs::write(&file, GOOD).unwrap();
        assert!(!src.poll(), "same content as the last good one");

        std::fs::remove_file(&file).unwrap();
        assert!(src.poll());
        assert!(src.current().policies.is_empty());
    }

    #[test]
    fn duplicate_names_first_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yml"), GOOD.replace("[shop]", "[other]")).unwrap();
        let (src, _rx) = DirSource::open(dir.path()).unwrap();
        let set = src.current();
        assert_eq!(set.policies.len(), 1);
        let allow = &set.policies[0].spec.routes[0].allow[0];
        assert_eq!(allow.namespaces, vec!["shop".to_owned()]);
    }

    #[test]
    fn missing_directory_is_an_error() {
        assert!(DirSource::open(Path::new("/nonexistent/palisade-policies")).is_err());
    }
}
