//! The CA in a state directory (local mode): `<state-dir>/ca/` holds the
//! files named in [`super::material`].
//!
//! Creation is create-if-absent and atomic: a new CA is written into a
//! private temporary directory beside `ca/` and renamed into place. Renaming
//! a directory onto an existing non-empty one fails, so when two operators
//! start together on one state directory exactly one rename wins; the loser
//! deletes its own CA and loads the winner's. Readers never see a half-written
//! `ca/`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

use super::material::{
    CHAIN_FILE, CaMaterial, ISSUER_FILE, ISSUER_KEY_FILE, Origin, TRUST_BUNDLE_FILE,
};

/// The CA's directory inside a state directory.
pub const CA_DIR: &str = "ca";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{dir} exists but has no {file}; put the issuer files there or remove the directory to generate a CA"
    )]
    Missing { dir: PathBuf, file: &'static str },
    #[error("generating a CA: {0}")]
    Generate(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DirError + '_ {
    move |source| DirError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn ca_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(CA_DIR)
}

/// Path of the trust bundle agents and scripts read.
pub fn trust_bundle_path(state_dir: &Path) -> PathBuf {
    ca_dir(state_dir).join(TRUST_BUNDLE_FILE)
}

/// Loads `<state-dir>/ca/`. `Ok(None)` when it does not exist.
pub fn load(state_dir: &Path) -> Result<Option<CaMaterial>, DirError> {
    let dir = ca_dir(state_dir);
    match fs::metadata(&dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&dir)(e)),
    }
    let read = |file: &'static str, required: bool| -> Result<String, DirError> {
        let path = dir.join(file);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(String::new()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(DirError::Missing {
                dir: dir.clone(),
                file,
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    };
    Ok(Some(CaMaterial {
        issuer_pem: read(ISSUER_FILE, true)?,
        issuer_key_pem: read(ISSUER_KEY_FILE, true)?,
        chain_pem: read(CHAIN_FILE, false)?,
        trust_bundle_pem: read(TRUST_BUNDLE_FILE, true)?,
    }))
}

/// Loads the CA, or creates it with `generate` if there is none. Safe to
/// race: every caller ends up with the same CA.
pub fn load_or_create<E: std::fmt::Display>(
    state_dir: &Path,
    generate: impl FnOnce() -> Result<CaMaterial, E>,
) -> Result<(CaMaterial, Origin), DirError> {
    if let Some(existing) = load(state_dir)? {
        return Ok((existing, Origin::Existing));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io_err(state_dir))?;
    let material = generate().map_err(|e| DirError::Generate(e.to_string()))?;

    let mut suffix = [0u8; 8];
    rand::rng().fill_bytes(&mut suffix);
    let staging = state_dir.join(format!(".{CA_DIR}-new-{}", hex::encode(suffix)));
    let written = write_all(&staging, &material);
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    let target = ca_dir(state_dir);
    match fs::rename(&staging, &target) {
        Ok(()) => {
            // Make the rename itself durable.
            sync_dir(state_dir)?;
            Ok((material, Origin::Created))
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            // Lost the race (ENOTEMPTY / EEXIST): use the winner's CA.
            match load(state_dir)? {
                Some(winner) => Ok((winner, Origin::Existing)),
                None => Err(io_err(&target)(e)),
            }
        }
    }
}

fn write_all(dir: &Path, material: &CaMaterial) -> Result<(), DirError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    write_file(dir, ISSUER_FILE, &material.issuer_pem, 0o644)?;
    // The key is readable by the operator's user only.
    write_file(dir, ISSUER_KEY_FILE, &material.issuer_key_pem, 0o600)?;
    if !material.chain_pem.is_empty() {
        write_file(dir, CHAIN_FILE, &material.chain_pem, 0o644)?;
    }
    write_file(dir, TRUST_BUNDLE_FILE, &material.trust_bundle_pem, 0o644)?;
    sync_dir(dir)
}

fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), DirError> {
    let path = dir.join(name);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(io_err(&path))?;
    file.write_all(text.as_bytes()).map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))
}

fn sync_dir(dir: &Path) -> Result<(), DirError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn material(tag: &str) -> CaMaterial {
        CaMaterial {
            issuer_pem: format!("issuer {tag}"),
            issuer_key_pem: format!("key {tag}"),
            chain_pem: String::new(),
            trust_bundle_pem: format!("bundle {tag}"),
        }
    }

    #[test]
    fn creates_once_then_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let (first, origin) = load_or_create(&state, || Ok::<_, String>(material("a"))).unwrap();
        assert_eq!(origin, Origin::Created);
        let (second, origin) = load_or_create(&state, || Ok::<_, String>(material("b"))).unwrap();
        assert_eq!(origin, Origin::Existing);
        assert_eq!(first, second);
        let key_mode = fs::metadata(ca_dir(&state).join(ISSUER_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        // No staging directory is left behind.
        let leftovers: Vec<_> = fs::read_dir(&state).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn racing_threads_end_with_one_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().to_owned();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let state = state.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    load_or_create(&state, || Ok::<_, String>(material(&i.to_string()))).unwrap()
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let created = results
            .iter()
            .filter(|(_, o)| *o == Origin::Created)
            .count();
        assert_eq!(created, 1);
        assert!(results.iter().all(|(m, _)| *m == results[0].0));
        assert_eq!(fs::read_dir(&state).unwrap().count(), 1);
    }

    #[test]
    fn an_incomplete_directory_is_an_error_not_a_new_ca() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(ca_dir(tmp.path())).unwrap();
        let err = load_or_create(tmp.path(), || Ok::<_, String>(material("x"))).unwrap_err();
        assert!(
            matches!(
                err,
                DirError::Missing {
                    file: ISSUER_FILE,
                    ..
                }
            ),
            "{err}"
        );
    }
}
