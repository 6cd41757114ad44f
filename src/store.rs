//! The durable offline mailbox.
//!
//! Frames for receivers who are not connected are kept in [redb], an embedded,
//! crash-safe (copy-on-write, checksummed, fsync on commit) key-value store written in
//! Rust: no C library, no server, one file under `--data-dir`.
//!
//! All storage runs on one dedicated thread, so blocking file I/O never occupies the
//! async executor. The thread drains every command that is waiting, applies them in one
//! write transaction and commits once (group commit): under load, one fsync covers
//! hundreds of frames. Replies are sent only after the commit, so an `Appended` reply
//! means the frame survives `kill -9`. Commands are applied in the order they were sent,
//! which is what lets the broker order a mailbox against live traffic.

// redb's error type is large; it is built at most once per failed transaction.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread;

use bytes::Bytes;
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use futures::executor::block_on;
use redb::{Builder, Database, ReadableTable, TableDefinition};

/// (receiver, sequence number) -> frame in its server -> client encoding.
const MAILBOX: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("mailbox");

/// Commands waiting beyond this make senders wait: the store's queue is bounded.
const QUEUE: usize = 4096;
/// At most this many commands go into one transaction.
const BATCH: usize = 2048;

/// Memory redb may use to cache pages.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Identifies who an `Appended` or `Page` reply is for (the broker's connection id).
pub type Ticket = u64;

/// Per-receiver mailbox limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_messages: u64,
    pub max_bytes: u64,
}

#[derive(Debug)]
pub enum Command {
    /// Store a frame for `receiver`. With a ticket, the frame is subject to the limits
    /// and an `Appended` reply follows the commit. Without one it is a frame the server
    /// had already accepted and is handing back: it is stored regardless of the limits.
    Append {
        ticket: Option<Ticket>,
        receiver: u32,
        seq: u64,
        wire: Bytes,
    },
    /// Read up to `max_bytes` of `receiver`'s mailbox after sequence `after`.
    Load {
        ticket: Ticket,
        receiver: u32,
        after: Option<u64>,
        max_bytes: usize,
    },
    /// Remove frames that have been written to their receiver's socket.
    Delete { receiver: u32, seqs: Vec<u64> },
}

#[derive(Debug)]
pub enum Reply {
    /// `len` is the frame's size, so the broker can account for it.
    Appended {
        ticket: Ticket,
        outcome: Outcome,
        len: usize,
    },
    Page {
        ticket: Ticket,
        receiver: u32,
        frames: Vec<(u64, Bytes)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// The receiver's mailbox is at its limit; the detail says which.
    Full(String),
    /// The store could not commit; the detail is the error.
    Failed(String),
}

/// The store's command queue, its reply stream, and what it was opened with.
pub struct Store {
    pub commands: mpsc::Sender<Command>,
    pub replies: mpsc::UnboundedReceiver<Reply>,
    /// The next unused sequence number: higher than any stored.
    pub next_seq: u64,
    /// Completes when the store thread has committed everything and exited, which it
    /// does once every `commands` sender is dropped.
    pub closed: oneshot::Receiver<()>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    messages: u64,
    bytes: u64,
}

/// Opens (or creates) `dir/mailbox.redb` and starts the store thread.
pub fn open(dir: &Path, limits: Limits) -> Result<Store, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    let path: PathBuf = dir.join("mailbox.redb");
    // redb's default page cache is 1 GiB; the mailbox is written far more than read,
    // so a small cache keeps the server's memory bounded by its limits instead.
    let db = Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let (usage, next_seq) =
        scan(&db).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (commands, rx) = mpsc::channel(QUEUE);
    // Unbounded, yet bounded in practice: each reply answers a command that had to get
    // through the bounded queue, and the broker drains replies before new events.
    let (reply_tx, replies) = mpsc::unbounded();
    let (closed_tx, closed) = oneshot::channel();
    let worker = Worker { db, limits, usage };
    thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            worker.run(rx, reply_tx);
            let _ = closed_tx.send(());
        })
        .map_err(|e| format!("cannot start store thread: {e}"))?;
    Ok(Store {
        commands,
        replies,
        next_seq,
        closed,
    })
}

fn scan(db: &Database) -> Result<(HashMap<u32, Usage>, u64), redb::Error> {
    let txn = db.begin_write()?;
    let mut usage: HashMap<u32, Usage> = HashMap::new();
    let mut next_seq = 1;
    {
        let table = txn.open_table(MAILBOX)?;
        for entry in table.iter()? {
            let (key, value) = entry?;
            let (receiver, seq) = key.value();
            let u = usage.entry(receiver).or_default();
            u.messages += 1;
            u.bytes += value.value().len() as u64;
            next_seq = next_seq.max(seq + 1);
        }
    }
    txn.commit()?;
    Ok((usage, next_seq))
}

struct Worker {
    db: Database,
    limits: Limits,
    usage: HashMap<u32, Usage>,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Command>, replies: mpsc::UnboundedSender<Reply>) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = block_on(rx.next()) {
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    _ => break,
                }
            }
            for reply in self.apply(&mut batch) {
                // The broker is gone only during shutdown; nobody is waiting then.
                let _ = replies.unbounded_send(reply);
            }
        }
        log::debug!("store closed");
    }

    /// Applies a batch in one transaction and returns the replies to send after it
    /// committed. If the commit fails, nothing in the batch is acknowledged as stored.
    fn apply(&mut self, batch: &mut Vec<Command>) -> Vec<Reply> {
        let before = self.usage.clone();
        let result = self.transact(batch);
        batch.clear();
        match result {
            Ok(replies) => replies,
            Err((e, mut replies)) => {
                log::error!("mailbox commit failed: {e}");
                self.usage = before;
                for reply in &mut replies {
                    if let Reply::Appended { outcome, .. } = reply {
                        *outcome = Outcome::Failed(e.to_string());
                    }
                }
                replies
            }
        }
    }

    fn transact(&mut self, batch: &[Command]) -> Result<Vec<Reply>, (redb::Error, Vec<Reply>)> {
        let mut replies = Vec::new();
        let result = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            // A batch that only reads needs no commit, and so no fsync.
            let mut dirty = false;
            {
                let mut table = txn.open_table(MAILBOX)?;
                for cmd in batch {
                    match cmd {
                        Command::Append {
                            ticket,
                            receiver,
                            seq,
                            wire,
                        } => {
                            let usage = self.usage.entry(*receiver).or_default();
                            let full = if ticket.is_some() {
                                full(&self.limits, usage, wire.len())
                            } else {
                                None
                            };
                            let outcome = match full {
                                Some(why) => Outcome::Full(why),
                                None => {
                                    table.insert((*receiver, *seq), &wire[..])?;
                                    dirty = true;
                                    usage.messages += 1;
                                    usage.bytes += wire.len() as u64;
                                    Outcome::Stored
                                }
                            };
                            if let Some(ticket) = ticket {
                                replies.push(Reply::Appended {
                                    ticket: *ticket,
                                    outcome,
                                    len: wire.len(),
                                });
                            }
                        }
                        Command::Load {
                            ticket,
                            receiver,
                            after,
                            max_bytes,
                        } => {
                            let start = after.map_or(0, |s| s.saturating_add(1));
                            let mut frames = Vec::new();
                            let mut bytes = 0;
                            // Most connections have no mail: answer those from memory.
                            let stored = self.usage.get(receiver).is_some_and(|u| u.messages > 0);
                            let range = (*receiver, start)..=(*receiver, u64::MAX);
                            if stored {
                                for entry in table.range(range)? {
                                    let (key, value) = entry?;
                                    let value = value.value();
                                    if !frames.is_empty() && bytes + value.len() > *max_bytes {
                                        break;
                                    }
                                    bytes += value.len();
                                    frames.push((key.value().1, Bytes::copy_from_slice(value)));
                                }
                            }
                            replies.push(Reply::Page {
                                ticket: *ticket,
                                receiver: *receiver,
                                frames,
                            });
                        }
                        Command::Delete { receiver, seqs } => {
                            for seq in seqs {
                                if let Some(old) = table.remove((*receiver, *seq))? {
                                    dirty = true;
                                    let len = old.value().len() as u64;
                                    let usage = self.usage.entry(*receiver).or_default();
                                    usage.messages = usage.messages.saturating_sub(1);
                                    usage.bytes = usage.bytes.saturating_sub(len);
                                }
                            }
                            if self.usage.get(receiver).is_some_and(|u| u.messages == 0) {
                                self.usage.remove(receiver);
                            }
                        }
                    }
                }
            }
            if dirty {
                txn.commit()?;
            } else {
                txn.abort()?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(replies),
            Err(e) => Err((e, replies)),
        }
    }
}

fn full(limits: &Limits, usage: &Usage, len: usize) -> Option<String> {
    if usage.messages >= limits.max_messages {
        Some(format!("holds {} messages, the limit", usage.messages))
    } else if usage.bytes + len as u64 > limits.max_bytes {
        Some(format!(
            "holds {} bytes; {} more would pass the limit of {}",
            usage.bytes, len, limits.max_bytes
        ))
    } else {
        None
    }
}
