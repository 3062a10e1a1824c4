//! Local-mode CA that follows edits of `<state-dir>/ca/` without a restart,
//! so a root rotation (docs/operations.md) is a series of file edits.
//!
//! Same scheme as the token file (`tokens::reload`): the files are re-read
//! every poll interval and the CA is rebuilt only when their SHA-256
//! changed. The rebuild is [`Ca::load`], the start-up path, so a reloaded
//! CA passed the same checks (key matches issuer, issuer chains to the
//! bundle, a probe leaf verifies). When the files cannot be read or do not
//! load, the error is logged and the **previous CA stays in force**: a typo
//! in the bundle must not stop issuance, and half of a rotation must never
//! be applied.
//!
//! A rotation step can touch several files (issuer and key together), and a
//! file written in place can be read half-way. So new content counts only
//! once two polls in a row read it unchanged; a state caught between two
//! writes has moved on by the next poll and is never loaded. Write each
//! file elsewhere and rename it into place anyway.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::dir::{self, DirError};
use super::material::{CHAIN_FILE, CaMaterial, ISSUER_FILE, ISSUER_KEY_FILE, TRUST_BUNDLE_FILE};
use super::{Ca, CaError};

/// The CA in force, shared by everything that issues or verifies. Swapped
/// whole, so a caller sees either the old or the new CA, never a mix. A
/// watch channel is the swap cell, so the TLS endpoint can also wait for a
/// change (to re-issue its serving certificate at once).
#[derive(Clone, Debug)]
pub struct CurrentCa {
    cell: Arc<watch::Sender<Arc<Ca>>>,
}

impl CurrentCa {
    pub fn new(ca: Arc<Ca>) -> Self {
        Self {
            cell: Arc::new(watch::Sender::new(ca)),
        }
    }

    /// The CA in force now. Take it once per operation and use that.
    pub fn get(&self) -> Arc<Ca> {
        self.cell.borrow().clone()
    }

    /// Notified on every swap.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Ca>> {
        self.cell.subscribe()
    }

    fn replace(&self, ca: Arc<Ca>) {
        self.cell.send_replace(ca);
    }
}

impl From<Arc<Ca>> for CurrentCa {
    fn from(ca: Arc<Ca>) -> Self {
        Self::new(ca)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Read(#[from] DirError),
    #[error("{0} no longer exists")]
    Gone(PathBuf),
    #[error(transparent)]
    Invalid(#[from] CaError),
}

/// What one poll did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reload {
    /// Same content as last time (good or bad): nothing loaded.
    Unchanged,
    /// New content, read once: loaded only if the next poll reads it again.
    Pending,
    /// New content loaded and now in force.
    Reloaded {
        roots: usize,
        changed: Vec<&'static str>,
    },
}

/// The files [`dir::load`] reads, in [`file_hashes`] order.
const FILES: [&str; 4] = [ISSUER_FILE, ISSUER_KEY_FILE, CHAIN_FILE, TRUST_BUNDLE_FILE];

type Hashes = [[u8; 32]; 4];

fn file_hashes(m: &CaMaterial) -> Hashes {
    [
        &m.issuer_pem,
        &m.issuer_key_pem,
        &m.chain_pem,
        &m.trust_bundle_pem,
    ]
    .map(|text| Sha256::digest(text.as_bytes()).into())
}

#[derive(Debug)]
struct PollState {
    /// Hashes of the content last loaded, good or bad, so an unchanged
    /// broken file is not reloaded and re-logged every poll.
    seen: Hashes,
    /// New content seen once.
    pending: Option<Hashes>,
    /// The last read error, logged once rather than every poll.
    read_error: Option<String>,
}

/// Keeps a [`CurrentCa`] in step with the CA files of a state directory.
#[derive(Debug)]
pub struct ReloadingCa {
    state_dir: PathBuf,
    current: CurrentCa,
    state: Mutex<PollState>,
}

impl ReloadingCa {
    /// `material` is what `current` was loaded from (read from `state_dir`
    /// at start), so the first poll finds it unchanged.
    pub fn new(state_dir: &Path, material: &CaMaterial, current: CurrentCa) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            current,
            state: Mutex::new(PollState {
                seen: file_hashes(material),
                pending: None,
                read_error: None,
            }),
        }
    }

    pub fn current(&self) -> &CurrentCa {
        &self.current
    }

    /// Re-reads the CA files and swaps in a new CA if they changed (and
    /// stayed so for one poll) and load. On error the previous CA stays in
    /// force; the error is logged (a read error once until it changes) and
    /// returned.
    pub fn poll(&self) -> Result<Reload, ReloadError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let ca_dir = dir::ca_dir(&self.state_dir);
        let read = match dir::load(&self.state_dir) {
            Ok(Some(material)) => Ok(material),
            Ok(None) => Err(ReloadError::Gone(ca_dir.clone())),
            Err(e) => Err(ReloadError::Read(e)),
        };
        let material = match read {
            Ok(material) => {
                if state.read_error.take().is_some() {
                    tracing::info!(dir = %ca_dir.display(), "CA files readable again");
                }
                material
            }
            Err(e) => {
                let msg = e.to_string();
                if state.read_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(dir = %ca_dir.display(), error = %msg,
                        "cannot read the CA files; the previous CA stays in force");
                }
                state.read_error = Some(msg);
                return Err(e);
            }
        };
        let hashes = file_hashes(&material);
        if state.seen == hashes {
            state.pending = None;
            return Ok(Reload::Unchanged);
        }
        if state.pending != Some(hashes) {
            state.pending = Some(hashes);
            return Ok(Reload::Pending);
        }
        let changed: Vec<&'static str> = FILES
            .iter()
            .zip(state.seen.iter().zip(hashes.iter()))
            .filter(|(_, (old, new))| old != new)
            .map(|(name, _)| *name)
            .collect();
        state.pending = None;
        state.seen = hashes;
        let ca = match Ca::load(&material) {
            Ok(ca) => ca,
            Err(e) => {
                // CaError names the file where it can; never key material.
                tracing::error!(dir = %ca_dir.display(), changed = ?changed, error = %e,
                    kept_roots = ?self.current.get().root_fingerprints(),
                    "CA files rejected; the previous CA stays in force");
                return Err(e.into());
            }
        };
        let roots = ca.trust_bundle().len();
        tracing::info!(dir = %ca_dir.display(), changed = ?changed,
            roots = ?ca.root_fingerprints(), intermediates = ca.intermediates().len(),
            "CA reloaded");
        self.current.replace(Arc::new(ca));
        Ok(Reload::Reloaded { roots, changed })
    }

    /// Polls every `interval`, forever.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let this = self.clone();
            // File reads and key checks block; keep them off the async
            // workers. Errors are logged by `poll` itself.
            if let Err(e) = tokio::task::spawn_blocking(move || this.poll()).await {
                tracing::error!(dir = %dir::ca_dir(&self.state_dir).display(), error = %e,
                    "CA file poller failed; the CA in force is frozen");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::ca::generate::generate_root;

    /// Write and rename, as operators are told to.
    fn write(state: &Path, file: &str, text: &str) {
        let path = dir::ca_dir(state).join(file);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    fn setup() -> (tempfile::TempDir, CaMaterial, ReloadingCa) {
        let tmp = tempfile::tempdir().unwrap();
        let (material, _) =
            dir::load_or_create(tmp.path(), || generate_root(SystemTime::now())).unwrap();
        let current = CurrentCa::new(Arc::new(Ca::load(&material).unwrap()));
        let reloading = ReloadingCa::new(tmp.path(), &material, current);
        (tmp, material, reloading)
    }

    /// Polls until the content settles; returns the final outcome.
    fn settle(ca: &ReloadingCa) -> Result<Reload, ReloadError> {
        assert_eq!(ca.poll().unwrap(), Reload::Pending);
        ca.poll()
    }

    #[test]
    fn unchanged_files_are_not_reloaded() {
        let (tmp, material, ca) = setup();
        let before = ca.current().get();
        assert_eq!(ca.poll().unwrap(), Reload::Unchanged);
        // Rewritten with identical bytes (new inode, new mtime).
        write(tmp.path(), TRUST_BUNDLE_FILE, &material.trust_bundle_pem);
        assert_eq!(ca.poll().unwrap(), Reload::Unchanged);
        assert_eq!(ca.poll().unwrap(), Reload::Unchanged);
        assert!(
            Arc::ptr_eq(&before, &ca.current().get()),
            "the CA was swapped although nothing changed"
        );
    }

    #[test]
    fn a_second_root_is_swapped_in_after_it_settles() {
        let (tmp, material, ca) = setup();
        let changes = ca.current().subscribe();
        let second = generate_root(SystemTime::now()).unwrap();
        let bundle = format!("{}{}", material.trust_bundle_pem, second.trust_bundle_pem);
        write(tmp.path(), TRUST_BUNDLE_FILE, &bundle);
        // Read once: not applied yet.
        assert_eq!(ca.poll().unwrap(), Reload::Pending);
        assert_eq!(ca.current().get().trust_bundle().len(), 1);
        assert!(!changes.has_changed().unwrap());
        assert_eq!(
            ca.poll().unwrap(),
            Reload::Reloaded {
                roots: 2,
                changed: vec![TRUST_BUNDLE_FILE]
            }
        );
        assert_eq!(ca.current().get().trust_bundle().len(), 2);
        assert!(changes.has_changed().unwrap(), "subscribers not told");
        assert_eq!(ca.poll().unwrap(), Reload::Unchanged);

        // Switch the issuer to the new root: new leaves come from it.
        write(tmp.path(), ISSUER_KEY_FILE, &second.issuer_key_pem);
        write(tmp.path(), ISSUER_FILE, &second.issuer_pem);
        assert_eq!(
            settle(&ca).unwrap(),
            Reload::Reloaded {
                roots: 2,
                changed: vec![ISSUER_FILE, ISSUER_KEY_FILE]
            }
        );
        // A leaf from the CA in force verifies against the new root alone.
        let only_second = Ca::load(&second).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let id = palisade_policy::identity::SpiffeId::parse("spiffe://t/ns/a/sa/b").unwrap();
        let now = SystemTime::now();
        let current = ca.current().get();
        let leaf = current
            .issue(
                &key,
                &crate::ca::LeafProfile::workload(id, Duration::from_secs(60)),
                now,
            )
            .unwrap();
        only_second
            .verify(&leaf.der, current.intermediates(), now)
            .unwrap();
        assert_eq!(current.trust_bundle().len(), 2);
    }

    #[test]
    fn a_broken_edit_keeps_the_previous_ca() {
        let (tmp, material, ca) = setup();
        let before = ca.current().get();
        write(
            tmp.path(),
            TRUST_BUNDLE_FILE,
            "-----BEGIN CERTIFICATE-----\nnope\n",
        );
        let err = settle(&ca).unwrap_err();
        assert!(
            matches!(
                err,
                ReloadError::Invalid(CaError::Pem {
                    file: TRUST_BUNDLE_FILE,
                    ..
                })
            ),
            "{err}"
        );
        assert!(Arc::ptr_eq(&before, &ca.current().get()));
        // The same broken content is not reloaded (nor re-logged).
        assert_eq!(ca.poll().unwrap(), Reload::Unchanged);

        // A bundle without the issuer's root fails the chain check.
        let other = generate_root(SystemTime::now()).unwrap();
        write(tmp.path(), TRUST_BUNDLE_FILE, &other.trust_bundle_pem);
        let err = settle(&ca).unwrap_err();
        assert!(
            matches!(err, ReloadError::Invalid(CaError::Chain(_))),
            "{err}"
        );
        // So does a key that is not the issuer's.
        write(tmp.path(), TRUST_BUNDLE_FILE, &material.trust_bundle_pem);
        write(tmp.path(), ISSUER_KEY_FILE, &other.issuer_key_pem);
        let err = settle(&ca).unwrap_err();
        assert!(
            matches!(err, ReloadError::Invalid(CaError::KeyMismatch)),
            "{err}"
        );
        assert!(Arc::ptr_eq(&before, &ca.current().get()));

        // A deleted file also keeps the CA, and reports every poll.
        std::fs::remove_file(dir::trust_bundle_path(tmp.path())).unwrap();
        assert!(matches!(ca.poll(), Err(ReloadError::Read(_))));
        assert!(matches!(ca.poll(), Err(ReloadError::Read(_))));
        assert!(Arc::ptr_eq(&before, &ca.current().get()));

        // Fixing the files applies them.
        write(tmp.path(), ISSUER_KEY_FILE, &material.issuer_key_pem);
        let bundle = format!("{}{}", material.trust_bundle_pem, other.trust_bundle_pem);
        write(tmp.path(), TRUST_BUNDLE_FILE, &bundle);
        assert!(matches!(settle(&ca), Ok(Reload::Reloaded { roots: 2, .. })));
    }

    #[test]
    fn content_that_changes_between_polls_waits() {
        let (tmp, material, ca) = setup();
        let other = generate_root(SystemTime::now()).unwrap();
        // A rotation step caught half-way: new key, old issuer.
        write(tmp.path(), ISSUER_KEY_FILE, &other.issuer_key_pem);
        assert_eq!(ca.poll().unwrap(), Reload::Pending);
        // Finished before the next poll: that state is never loaded.
        write(tmp.path(), ISSUER_KEY_FILE, &material.issuer_key_pem);
        let bundle = format!("{}{}", material.trust_bundle_pem, other.trust_bundle_pem);
        write(tmp.path(), TRUST_BUNDLE_FILE, &bundle);
        assert_eq!(ca.poll().unwrap(), Reload::Pending);
        assert!(matches!(ca.poll(), Ok(Reload::Reloaded { roots: 2, .. })));
    }

    #[tokio::test]
    async fn run_polls_on_the_interval() {
        let (tmp, material, ca) = setup();
        let ca = Arc::new(ca);
        let poller = tokio::spawn(ca.clone().run(Duration::from_millis(50)));
        let other = generate_root(SystemTime::now()).unwrap();
        let bundle = format!("{}{}", material.trust_bundle_pem, other.trust_bundle_pem);
        write(tmp.path(), TRUST_BUNDLE_FILE, &bundle);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ca.current().get().trust_bundle().len() != 2 {
            assert!(std::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        poller.abort();
    }
}
