//! Taking over what the previous release stored.
//!
//! The previous release kept one table, `mailbox` (receiver, seq) -> frame: the frames
//! each id had not received yet. Each of them becomes a frame in the receiver's log,
//! waiting in its default device's inbox, so every one is delivered after the upgrade,
//! in the same order. The rows move in batches, each one transaction that writes the
//! new rows and deletes the old ones, so a crash in the middle leaves every frame in
//! exactly one of the two tables, and the next start finishes the move.
//!
//! A file this release wrote already (an older release ran on it again, then this one)
//! has numbers of its own, and the older release numbered from 1 again: the moved
//! frames are numbered above every number the file has (a base kept in `meta` until
//! the move ends, so a move that resumes after a crash uses the same one), and only
//! they are taken into history.

// redb's error type is large; it is built at most once per failed transaction.
#![allow(clippy::result_large_err)]

use std::time::Instant;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableHandle};

use super::History;
use super::history::Kept;
use super::log::{Appending, Log, Tables};
use super::tables::{Entry, MAILBOX, META};

/// The `meta` row that keeps the number the moved frames are numbered above.
const UPGRADE_BASE: &str = "upgrade-base";
use super::{Endpoint, Limits, Target};

/// Rows moved per transaction.
const BATCH: usize = 4096;

/// Moves every row of the previous release's table into the log; returns how many
/// there were. `now` (ms since the epoch) stands for their acceptance time, which the
/// old table did not keep.
pub fn run(
    db: &Database,
    log: &mut Log,
    kept: &mut Kept,
    history: &History,
    now: u64,
) -> Result<u64, redb::Error> {
    let exists = db
        .begin_read()?
        .list_tables()?
        .any(|t| t.name() == MAILBOX.name());
    if !exists {
        return Ok(0);
    }
    let started = Instant::now();
    let mut moved = 0u64;
    let base = {
        let txn = db.begin_read()?;
        let saved = match txn.open_table(META) {
            Ok(meta) => meta.get(UPGRADE_BASE)?.map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        saved.unwrap_or(log.seq_high)
    };
    // The old rows are delivered as they were, whatever the limits say now.
    let unlimited = Limits {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
        per_sender: super::PerSender::OFF,
    };
    let mut buf = Vec::new();
    loop {
        let txn = db.begin_write()?;
        let done = {
            let mut old = txn.open_table(MAILBOX)?;
            if old.is_empty()? {
                true
            } else {
                let mut rows = Vec::with_capacity(BATCH);
                for row in old.iter()?.take(BATCH) {
                    let (key, value) = row?;
                    rows.push((key.value(), value.value().to_vec()));
                }
                let mut t = Tables::open(&txn)?;
                t.meta.insert(UPGRADE_BASE, base)?;
                for ((receiver, old_seq), wire) in &rows {
                    let seq = &(base + old_seq);
                    let targets = [Target {
                        endpoint: Endpoint::default_of(*receiver),
                        live: false,
                    }];
                    let a = Appending {
                        receiver: *receiver,
                        seq: *seq,
                        time: now,
                        wire,
                        origin: None,
                        targets: &targets,
                    };
                    // Never refused: the limits are lifted.
                    let _ = log.append(&mut t, &a, &unlimited, &mut buf)?;
                    old.remove((*receiver, *old_seq))?;
                }
                log.save_seq(&mut t)?;
                moved += rows.len() as u64;
                false
            }
        };
        if done {
            // Every frame moved is in `frames`, in the order of its number (nothing
            // else has been stored yet): history takes them in that order, in the
            // transaction that ends the move, so a crash before it does this again.
            if history.on() {
                let mut t = Tables::open(&txn)?;
                let mut after = base + 1;
                loop {
                    let mut n = 0;
                    for row in t.frames.range(after..)?.take(BATCH) {
                        let (seq, value) = row?;
                        if let Some(e) = Entry::decode(value.value()) {
                            let wire = bytes::Bytes::copy_from_slice(e.wire);
                            kept.take(seq.value(), e.time, e.receiver, None, wire);
                        }
                        after = seq.value() + 1;
                        n += 1;
                    }
                    kept.flush(&mut t, history, u64::MAX)?;
                    if n < BATCH {
                        break;
                    }
                }
            }
            {
                let mut meta = txn.open_table(META)?;
                meta.remove(UPGRADE_BASE)?;
            }
            txn.delete_table(MAILBOX)?;
            txn.commit()?;
            break;
        }
        txn.commit()?;
    }
    if moved > 0 {
        log::info!(
            "upgrade: moved {moved} stored frames from the previous release's mailbox into the history log in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(moved)
}
