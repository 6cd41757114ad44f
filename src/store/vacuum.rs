//! Rewriting the store's file with only what it holds now (`chat-server vacuum`).
//!
//! redb copies a page on write and frees the old one, and a freed page keeps its bytes
//! until a later write reuses it: deleting rows (an operator forgetting an id, history's
//! pruning) removes them from every read at once, but not from the disk. The way to
//! wipe them is the way SQLite's and PostgreSQL's `VACUUM FULL` take: copy every live
//! row into a new file, then put it in the old one's place.
//!
//! The node must be stopped: redb locks its file, so a vacuum of a file in use is
//! refused with a clear error. Crash-safe: the copy is committed (synced) under another
//! name and renamed over the file in one step, then the directory is synced; until the
//! rename the old file is whole and in use, and a copy left by a crash is started
//! over.

// redb's error type is large; it is built at most once.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use redb::{Database, ReadTransaction, TableDefinition, TableHandle, WriteTransaction};

use super::FILE;
use super::tables::{BLOCKS, CONVERSATIONS, DEVICES, FRAMES, HISTORY, INBOX, MAILBOX, META, PROBE};

/// The copy being written, until it replaces [`FILE`].
const COPY: &str = "mailbox.redb.vacuum";

/// What a vacuum did: the file's size before and after, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vacuumed {
    pub before: u64,
    pub after: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VacuumError {
    #[error("{} does not exist: nothing to vacuum", .0.display())]
    Missing(PathBuf),
    #[error("{} is in use: stop the server first", .0.display())]
    InUse(PathBuf),
    #[error("{} has a table this release does not know, {table:?}: vacuum it with the release that wrote it", path.display())]
    Unknown { path: PathBuf, table: String },
    #[error("{}: {source}", path.display())]
    Db { path: PathBuf, source: redb::Error },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Rewrites `dir`'s store file with only its live rows.
pub fn vacuum(dir: &Path) -> Result<Vacuumed, VacuumError> {
    let path = dir.join(FILE);
    let copy = dir.join(COPY);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VacuumError::Io { path, source }
    };
    let before = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VacuumError::Missing(path));
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let db = match Database::open(&path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(VacuumError::InUse(path)),
        Err(e) => {
            return Err(VacuumError::Db {
                path,
                source: e.into(),
            });
        }
    };
    let tables = db
        .begin_read()
        .and_then(|r| {
            Ok(r.list_tables()?
                .map(|t| t.name().to_string())
                .collect::<Vec<_>>())
        })
        .map_err(|e| VacuumError::Db {
            path: path.clone(),
            source: e.into(),
        })?;
    if let Some(table) = tables.into_iter().find(|t| !KNOWN.contains(&t.as_str())) {
        return Err(VacuumError::Unknown { path, table });
    }
    match std::fs::remove_file(&copy) {
        Ok(()) => log::info!("removed {}, left by a vacuum that stopped", copy.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&copy)(e)),
    }
    let db_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: redb::Error| VacuumError::Db { path, source }
    };
    let fresh = Database::create(&copy)
        .map_err(redb::Error::from)
        .map_err(db_err(&copy))?;
    copy_all(&db, &fresh).map_err(db_err(&copy))?;
    drop(fresh);
    same_owner_and_mode(&path, &copy).map_err(io(&copy))?;
    // The old file stays open, and locked, until the copy has its place: a server
    // starting meanwhile is refused rather than writing to a file about to go.
    std::fs::rename(&copy, &path).map_err(io(&path))?;
    drop(db);
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    let after = std::fs::metadata(&path).map_err(io(&path))?.len();
    Ok(Vacuumed { before, after })
}

/// Gives the copy the file's owner and permissions, so that the server that ran on it
/// can open it (a vacuum run as root would otherwise leave a file root's own).
fn same_owner_and_mode(file: &Path, copy: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file)?;
    std::fs::set_permissions(copy, meta.permissions())?;
    match std::os::unix::fs::chown(copy, Some(meta.uid()), Some(meta.gid())) {
        // Only root may give a file away; anyone else made the copy their own already.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

/// Every table [`copy_all`] copies: a file with another is not vacuumed (a table left
/// out would be lost).
const KNOWN: [&str; 9] = [
    "frames",
    "inbox",
    "devices",
    "history",
    "blocks",
    "conversations",
    "meta",
    "mailbox",
    "probe",
];

/// Copies every table the store has into `to`, in one commit.
fn copy_all(from: &Database, to: &Database) -> Result<(), redb::Error> {
    let read = from.begin_read()?;
    let write = to.begin_write()?;
    copy(&read, &write, FRAMES)?;
    copy(&read, &write, INBOX)?;
    copy(&read, &write, DEVICES)?;
    copy(&read, &write, HISTORY)?;
    copy(&read, &write, BLOCKS)?;
    copy(&read, &write, CONVERSATIONS)?;
    copy(&read, &write, META)?;
    copy(&read, &write, MAILBOX)?;
    copy(&read, &write, PROBE)?;
    write.commit()?;
    Ok(())
}

/// Copies one table, if `read` has it.
fn copy<K: redb::Key + 'static, V: redb::Value + 'static>(
    read: &ReadTransaction,
    write: &WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<(), redb::Error> {
    let from = match read.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut to = write.open_table(def)?;
    for row in redb::ReadableTable::iter(&from)? {
        let (k, v) = row?;
        to.insert(k.value(), v.value())?;
    }
    Ok(())
}
