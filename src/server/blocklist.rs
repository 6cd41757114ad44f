//! Ids an operator has blocked (`PUT /v1/blocked/{id}` on the admin listener): their
//! hellos, sessions and first frames get `auth-failed: id N is blocked` and a close.
//!
//! Kept in memory for the broker's check at every bind, and in `blocked-ids` in the
//! data directory (one id per line) so that a block survives a restart. The file is
//! replaced whole, through a temporary file, fsync and rename, so a crash leaves the
//! old list or the new one, never half of either. In a cluster each node keeps its
//! own list (docs/ADMIN.md says so).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

/// The file's name in the data directory.
pub const FILE: &str = "blocked-ids";

#[derive(Debug)]
pub struct Blocklist {
    /// Read at every bind; written only for the moment a new list is swapped in.
    ids: RwLock<BTreeSet<u32>>,
    /// Taken by a change for as long as it writes the file, so that changes follow
    /// one another without holding up the binds that read `ids`.
    writing: Mutex<()>,
    /// Where the list is kept; `None`: in memory only (tests of the broker alone).
    path: Option<PathBuf>,
}

/// Why the list could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {text:?} is not an id")]
    Parse {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Blocklist {
    /// An empty list kept nowhere.
    pub fn in_memory() -> Blocklist {
        Blocklist {
            ids: RwLock::default(),
            writing: Mutex::default(),
            path: None,
        }
    }

    /// The list kept in `dir`, read if it exists.
    pub fn open(dir: &Path) -> Result<Blocklist, Error> {
        let path = dir.join(FILE);
        let ids = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => return Err(Error::Read { path, source }),
        };
        Ok(Blocklist {
            ids: RwLock::new(ids),
            writing: Mutex::default(),
            path: Some(path),
        })
    }

    pub fn contains(&self, id: u32) -> bool {
        self.ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    pub fn list(&self) -> Vec<u32> {
        let ids = self.ids.read().unwrap_or_else(|e| e.into_inner());
        ids.iter().copied().collect()
    }

    /// Blocks (`on`) or unblocks `id`, keeping the list on disk before it takes effect;
    /// returns whether anything changed. It writes and syncs a file: call it where
    /// blocking is allowed (`rt::spawn_blocking`).
    pub fn set(&self, id: u32, on: bool) -> Result<bool, Error> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = self.ids.read().unwrap_or_else(|e| e.into_inner()).clone();
        let changed = if on {
            next.insert(id)
        } else {
            next.remove(&id)
        };
        if !changed {
            return Ok(false);
        }
        if let Some(path) = &self.path {
            save(path, &next).map_err(|source| Error::Write {
                path: path.clone(),
                source,
            })?;
        }
        *self.ids.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(true)
    }
}

fn parse(path: &Path, text: &str) -> Result<BTreeSet<u32>, Error> {
    let mut ids = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let id = line.parse().map_err(|_| Error::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            text: line.to_string(),
        })?;
        ids.insert(id);
    }
    Ok(ids)
}

/// Replaces the file at `path` with `ids`, crash-safely.
fn save(path: &Path, ids: &BTreeSet<u32>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    for id in ids {
        writeln!(file, "{id}")?;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The new list is in place; a failure to sync the directory only leaves its
    // durability to the next sync, so it is logged, not reported as a failed change.
    if let Some(dir) = path.parent()
        && let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all())
    {
        log::warn!("{}: the directory could not be synced: {e}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_survive_reopening_and_bad_lines_are_one_clear_error() {
        let dir = tempfile::tempdir().expect("dir");
        let list = Blocklist::open(dir.path()).expect("opens empty");
        assert!(list.set(7, true).expect("blocks"));
        assert!(!list.set(7, true).expect("again"), "nothing changes");
        assert!(list.set(9, true).expect("blocks"));
        assert!(list.set(7, false).expect("unblocks"));
        let again = Blocklist::open(dir.path()).expect("reopens");
        assert_eq!(again.list(), [9]);
        assert!(again.contains(9) && !again.contains(7));
        std::fs::write(dir.path().join(FILE), "9\nnine\n").expect("writes");
        let err = Blocklist::open(dir.path()).expect_err("a bad line");
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
