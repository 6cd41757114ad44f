//! The embedded store: one node's frames in a file, on a thread of its own.
//!
//! Frames are kept in [redb], an embedded, crash-safe (copy-on-write, checksummed, fsync
//! on commit) key-value store written in Rust: no C library, no server, one file under
//! `--data-dir`. A frame for an online receiver is stored too, alongside its live push,
//! and removed once delivered, so that a crash can only delay it: the store is a
//! write-ahead log for live traffic and the mailbox for offline ids at once.
//!
//! All storage runs on one dedicated thread, so blocking file I/O never occupies the
//! async executor. The thread drains every command that is waiting, applies them in one
//! write transaction and commits once (group commit): under load, one fsync covers
//! hundreds of frames. The append of a frame pushed live is staged for up to
//! `STAGE_WAIT` (5 ms): if its delete (its delivery) arrives first, neither touches the disk,
//! so a receiver that keeps up costs the store almost nothing. Replies are sent only
//! after the commit, so an `Appended` reply means the frame survives `kill -9` (or was
//! already delivered).
//! Commands are applied in the order they were sent, which is what lets the broker order
//! a mailbox against live traffic.
//!
//! When a commit fails (disk full, I/O error) the database handle is dropped, the store
//! reports itself down and reopens the file with backoff until a test write succeeds.
//! Meanwhile appends fail at once (nobody waits on a broken disk), and loads and deletes
//! are held and applied after recovery, so nothing committed before the fault is lost
//! and nothing delivered comes back.

// redb's error type is large; it is built at most once per failed transaction.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use futures::task::ArcWake;
use redb::{Builder, Database, ReadableTable, TableDefinition};

use super::{Command, Failure, Limits, Outcome, QUEUE, Reply, Stage, Store, answer, full, settled};
use crate::metrics::Metrics;
use std::sync::Arc;

/// (receiver, sequence number) -> frame in its server -> client encoding.
const MAILBOX: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("mailbox");
/// One row written to prove that writes work again after a fault.
const PROBE: TableDefinition<&str, u64> = TableDefinition::new("probe");

/// At most this many commands go into one transaction.
const BATCH: usize = 8192;

/// Memory redb may use to cache pages.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Reopening a failed database starts after this long and backs off to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    messages: u64,
    bytes: u64,
}

/// Why the embedded store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data dir {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: redb::Error },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: redb::Error },
    #[error("cannot start store thread: {0}")]
    Thread(std::io::Error),
}

/// Opens (or creates) `dir/mailbox.redb` and starts the store thread.
pub fn open(
    dir: &Path,
    limits: Limits,
    metrics: Option<Arc<Metrics>>,
    faults: Option<Arc<Faults>>,
) -> Result<Store, OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path: PathBuf = dir.join("mailbox.redb");
    let db = open_db(&path, faults.as_ref()).map_err(|source| OpenError::Open {
        path: path.clone(),
        source,
    })?;
    let (usage, next_seq) = scan(&db).map_err(|source| OpenError::Read {
        path: path.clone(),
        source,
    })?;
    let (commands, rx) = mpsc::channel(QUEUE);
    // Unbounded, yet bounded in practice: each reply answers a command that had to get
    // through the bounded queue, and the broker drains replies before new events.
    let (reply_tx, replies) = mpsc::unbounded();
    let (closed_tx, closed) = oneshot::channel();
    let totals = sum(&usage);
    let worker = Worker {
        faults,
        totals,
        metrics,
        db: Some(db),
        path,
        limits,
        usage,
        down: None,
        held: Vec::new(),
        staged: Stage::default(),
        stats: Stats::default(),
        replies: reply_tx,
        live: HashMap::new(),
    };
    worker.publish();
    thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            worker.run(rx);
            let _ = closed_tx.send(());
        })
        .map_err(OpenError::Thread)?;
    Ok(Store {
        commands,
        replies,
        next_seq,
        closed,
    })
}

fn sum(usage: &HashMap<u32, Usage>) -> Usage {
    usage.values().fold(Usage::default(), |t, u| Usage {
        messages: t.messages + u.messages,
        bytes: t.bytes + u.bytes,
    })
}

/// Faults a test can switch on in the store's file: redb reads and writes through a
/// backend, so an I/O error can be made real without a failing disk.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every fsync fails with EIO while set.
    pub fail_sync: std::sync::atomic::AtomicBool,
    /// Every read of the file fails with EIO while set.
    pub fail_read: std::sync::atomic::AtomicBool,
    /// Every write to the file fails with EIO while set.
    pub fail_write: std::sync::atomic::AtomicBool,
}

/// EIO while `fault` is set.
fn injected(fault: &std::sync::atomic::AtomicBool) -> std::io::Result<()> {
    if fault.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// redb's file backend, with [`Faults`].
#[derive(Debug)]
struct FaultyFile {
    file: redb::backends::FileBackend,
    faults: Arc<Faults>,
}

impl redb::StorageBackend for FaultyFile {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        injected(&self.faults.fail_read)?;
        self.file.read(offset, len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
        injected(&self.faults.fail_sync)?;
        self.file.sync_data(eventual)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        injected(&self.faults.fail_write)?;
        self.file.write(offset, data)
    }
}

fn open_db(path: &Path, faults: Option<&Arc<Faults>>) -> Result<Database, redb::Error> {
    // redb's default page cache is 1 GiB; the store is written far more than read, so
    // a small cache keeps the server's memory bounded by its limits instead.
    let mut builder = Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    let Some(faults) = faults else {
        return Ok(builder.create(path)?);
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(redb::Error::Io)?;
    let file = redb::backends::FileBackend::new(file)?;
    let faults = faults.clone();
    Ok(builder.create_with_backend(FaultyFile { file, faults })?)
}

fn scan(db: &Database) -> Result<(HashMap<u32, Usage>, u64), redb::Error> {
    let mut usage: HashMap<u32, Usage> = HashMap::new();
    let mut next_seq = 1;
    let txn = db.begin_read()?;
    let table = match txn.open_table(MAILBOX) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((usage, next_seq)),
        Err(e) => return Err(e.into()),
    };
    for entry in table.iter()? {
        let (key, value) = entry?;
        let (receiver, seq) = key.value();
        let u = usage.entry(receiver).or_default();
        u.messages += 1;
        u.bytes += value.value().len() as u64;
        next_seq = next_seq.max(seq + 1);
    }
    Ok((usage, next_seq))
}

/// Why the store is down, and when it tries again.
struct Down {
    reason: String,
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
}

struct Worker {
    metrics: Option<Arc<Metrics>>,
    faults: Option<Arc<Faults>>,
    /// `None` while the store is down.
    db: Option<Database>,
    path: PathBuf,
    limits: Limits,
    usage: HashMap<u32, Usage>,
    /// The sum of `usage`, for the mailbox gauges.
    totals: Usage,
    down: Option<Down>,
    /// Loads and deletes that arrived while the store was down, in order.
    held: Vec<Command>,
    /// Appends of frames pushed live, not yet written: if their deletes arrive with
    /// the next batch they never touch the disk. Their echoes wait.
    staged: Stage,
    stats: Stats,
    replies: mpsc::UnboundedSender<Vec<Reply>>,
    /// Per receiver, the live frames written since its last first read: the broker
    /// delivers those itself, so later reads leave them out.
    live: HashMap<u32, std::collections::HashSet<u64>>,
}

/// What the store did since it last logged it (at debug level, once a second).
#[derive(Debug, Default)]
struct Stats {
    since: Option<Instant>,
    commits: u64,
    written: u64,
    skipped: u64,
    removed: u64,
}

impl Stats {
    fn tick(&mut self) {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= Duration::from_secs(1) {
            if self.commits + self.skipped > 0 {
                log::debug!(
                    "store: {} commits, {} frames written ({:.1} per commit), {} removed, {} delivered before they needed writing",
                    self.commits,
                    self.written,
                    self.written as f64 / self.commits.max(1) as f64,
                    self.removed,
                    self.skipped
                );
            }
            *self = Stats {
                since: Some(Instant::now()),
                ..Stats::default()
            };
        }
    }
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let ready = rx.try_recv().ok();
            let first = match &self.down {
                _ if ready.is_some() => ready,
                None if self.staged.is_empty() => next_within(&mut rx, None).flatten(),
                None => match next_within(&mut rx, self.staged.next_due()) {
                    Some(cmd) => cmd,
                    None => {
                        // Nothing new: write what is due.
                        self.apply(&mut batch, true);
                        continue;
                    }
                },
                Some(down) => {
                    let wait = down.retry_at.saturating_duration_since(Instant::now());
                    match next_within(&mut rx, Some(wait)) {
                        Some(cmd) => cmd,
                        None => {
                            self.try_recover();
                            continue;
                        }
                    }
                }
            };
            let Some(first) = first else { break };
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    _ => break,
                }
            }
            if self.down.is_some() {
                self.refuse(&mut batch);
            } else {
                self.apply(&mut batch, true);
            }
        }
        if self.down.is_some() {
            self.try_recover();
        }
        if !self.staged.is_empty() {
            self.apply(&mut batch, false);
        }
        log::debug!("store closed");
    }

    /// Sets the mailbox gauges.
    fn publish(&self) {
        if let Some(m) = &self.metrics {
            m.mailbox_frames.set(self.totals.messages as i64);
            m.mailbox_bytes.set(self.totals.bytes as i64);
        }
    }

    fn send(&self, replies: Vec<Reply>) {
        // The broker is gone only during shutdown; nobody is waiting then.
        if !replies.is_empty() {
            let _ = self.replies.unbounded_send(replies);
        }
    }

    /// While down: appends fail at once, loads and deletes wait for recovery.
    fn refuse(&mut self, batch: &mut Vec<Command>) {
        let reason = self.down.as_ref().map_or("", |d| d.reason.as_str());
        let failed = Failure::Down(reason.to_string());
        let replies = self.fail_or_hold(batch.drain(..), &failed);
        self.send(replies);
    }

    /// Applies a batch: settles staged appends its deletes show delivered, stages its
    /// live appends (with `stage`), and writes the rest, with the staged appends that
    /// are due, in one transaction; sends the replies once it committed. If the commit
    /// fails, no append is acknowledged as stored (but those delivered meanwhile),
    /// every append still gets its answer, and the store goes down until it can write
    /// again.
    fn apply(&mut self, batch: &mut Vec<Command>, stage: bool) {
        // A load must see every frame sent before it.
        let stage = stage && !batch.iter().any(|c| matches!(c, Command::Load { .. }));
        // Frames delivered before they reached the disk: neither written nor removed.
        // Sequence numbers are unique across receivers, so they suffice.
        let mut delivered: Vec<u64> = Vec::new();
        for cmd in batch.iter() {
            if let Command::Delete { seqs, .. } = cmd {
                delivered.extend_from_slice(seqs);
            }
        }
        delivered.sort_unstable();
        let mut replies = Vec::new();
        let mut skipped = Vec::new();
        for &seq in &delivered {
            if let Some(cmd) = self.staged.take(seq) {
                replies.extend(settled(cmd));
                skipped.push(seq);
            }
        }
        let mut writes = self.staged.due(!stage);
        for cmd in batch.drain(..) {
            match cmd {
                Command::Append { seq, .. } if delivered.binary_search(&seq).is_ok() => {
                    replies.extend(settled(cmd));
                    skipped.push(seq);
                }
                Command::Append {
                    seq,
                    receiver,
                    live: true,
                    ..
                } if stage => self.staged.hold(seq, receiver, cmd),
                other => writes.push(other),
            }
        }
        self.stats.skipped += skipped.len() as u64;
        skipped.sort_unstable();
        if writes.is_empty() {
            self.send(replies);
            return;
        }
        let before = (self.usage.clone(), self.totals);
        match self.transact(&writes, &skipped) {
            Ok(more) => {
                self.stats.tick();
                self.publish();
                replies.extend(more);
                self.send(replies);
            }
            Err(e) => {
                (self.usage, self.totals) = before;
                let reason = e.to_string();
                self.go_down(reason.clone());
                let staged = self.staged.take_for(None);
                // Pages read in a failed transaction may hold its own appends: loads are
                // answered after recovery instead, deletes redone then.
                let failed = Failure::Store(reason);
                replies.extend(self.fail_or_hold(writes.into_iter().chain(staged), &failed));
                self.send(replies);
            }
        }
    }

    /// Answers appends with `store-failed`; holds loads and deletes for recovery.
    fn fail_or_hold(
        &mut self,
        cmds: impl Iterator<Item = Command>,
        failed: &Failure,
    ) -> Vec<Reply> {
        let mut replies = Vec::new();
        for cmd in cmds {
            match cmd {
                Command::Append { .. } => {
                    replies.extend(answer(cmd, Outcome::Failed(failed.clone())));
                }
                other => self.held.push(other),
            }
        }
        replies
    }

    fn go_down(&mut self, reason: String) {
        if let Some(m) = &self.metrics {
            m.store_failures.inc();
        }
        log::error!("store failed, answering store-failed until it recovers: {reason}");
        // redb asks to be reopened after an I/O error; drop the handle now (it holds the
        // file lock) and reopen it from disk, which re-verifies the last commit.
        self.db = None;
        let now = Instant::now();
        self.down = Some(Down {
            reason: reason.clone(),
            since: now,
            retry_at: now + RETRY_MIN,
            backoff: RETRY_MIN,
        });
        self.send(vec![Reply::Health(Some(reason))]);
    }

    /// Reopens the database and proves it writable; on success applies what was held.
    fn try_recover(&mut self) {
        let Some(down) = &mut self.down else { return };
        let result = reopen(&self.path, self.faults.as_ref());
        match result {
            Ok((db, usage)) => {
                log::info!(
                    "store recovered after {:.1} s",
                    down.since.elapsed().as_secs_f64()
                );
                self.db = Some(db);
                self.totals = sum(&usage);
                self.usage = usage;
                self.publish();
                self.down = None;
                self.send(vec![Reply::Health(None)]);
                let mut held = std::mem::take(&mut self.held);
                if !held.is_empty() {
                    self.apply(&mut held, false);
                }
            }
            Err(e) => {
                log::debug!("store still down: {e}");
                down.backoff = (down.backoff * 2).min(RETRY_MAX);
                down.retry_at = Instant::now() + down.backoff;
            }
        }
    }

    /// Writes `writes` in one transaction, in order; deletes of `skipped` (sorted)
    /// frames, which never reached the disk, are no-ops.
    fn transact(&mut self, writes: &[Command], skipped: &[u64]) -> Result<Vec<Reply>, redb::Error> {
        let mut replies = Vec::new();
        let Some(db) = &self.db else {
            return Err(redb::Error::Io(std::io::Error::other("store is closed")));
        };
        let result = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            // A batch that only reads needs no commit, and so no fsync.
            let mut dirty = false;
            let mut written = 0u32;
            {
                let mut table = txn.open_table(MAILBOX)?;
                for cmd in writes {
                    match cmd {
                        Command::Append {
                            ticket,
                            receiver,
                            seq,
                            wire,
                            live,
                        } => {
                            let usage = self.usage.entry(*receiver).or_default();
                            let outcome = if let Some(why) =
                                full(&self.limits, usage.messages, usage.bytes, wire.len())
                                    .filter(|_| !live)
                            {
                                Outcome::Full(why)
                            } else {
                                table.insert((*receiver, *seq), &wire[..])?;
                                if *live {
                                    self.live.entry(*receiver).or_default().insert(*seq);
                                }
                                self.stats.written += 1;
                                written += 1;
                                dirty = true;
                                usage.messages += 1;
                                usage.bytes += wire.len() as u64;
                                self.totals.messages += 1;
                                self.totals.bytes += wire.len() as u64;
                                Outcome::Stored
                            };
                            replies.push(Reply::Appended {
                                ticket: *ticket,
                                seq: *seq,
                                outcome,
                                len: wire.len(),
                            });
                        }
                        Command::Load {
                            ticket,
                            receiver,
                            after,
                            max_bytes,
                        } => {
                            let start = after.map_or(0, |s| s.saturating_add(1));
                            if after.is_none() {
                                // A new connection: everything stored is for it.
                                self.live.remove(receiver);
                            }
                            let skip = self.live.get(receiver);
                            let mut frames = Vec::new();
                            let mut bytes = 0;
                            // Most connections have no mail: answer those from memory.
                            let stored = self.usage.get(receiver).is_some_and(|u| u.messages > 0);
                            let range = (*receiver, start)..=(*receiver, u64::MAX);
                            if stored {
                                for entry in table.range(range)? {
                                    let (key, value) = entry?;
                                    if skip.is_some_and(|s| s.contains(&key.value().1)) {
                                        continue;
                                    }
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
                                held: Vec::new(),
                                frames,
                            });
                        }
                        Command::Delete { receiver, seqs } => {
                            if let Some(live) = self.live.get_mut(receiver) {
                                for seq in seqs {
                                    live.remove(seq);
                                }
                            }
                            for seq in seqs {
                                if skipped.binary_search(seq).is_ok() {
                                    continue;
                                }
                                if let Some(old) = table.remove((*receiver, *seq))? {
                                    self.stats.removed += 1;
                                    dirty = true;
                                    let len = old.value().len() as u64;
                                    let usage = self.usage.entry(*receiver).or_default();
                                    usage.messages = usage.messages.saturating_sub(1);
                                    usage.bytes = usage.bytes.saturating_sub(len);
                                    self.totals.messages = self.totals.messages.saturating_sub(1);
                                    self.totals.bytes = self.totals.bytes.saturating_sub(len);
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
                let started = Instant::now();
                txn.commit()?;
                self.stats.commits += 1;
                if let Some(m) = &self.metrics {
                    m.commit_seconds.observe(started.elapsed().as_secs_f64());
                    m.frames_per_commit.observe(written as f64);
                }
            } else {
                txn.abort()?;
            }
            Ok(())
        })();
        result.map(|()| replies)
    }
}

/// Waits on this thread for the next command, for at most `limit`: `None` when the
/// time ran out, `Some(None)` once every sender is gone.
///
/// Parks the thread itself rather than arming a runtime timer: the store waits like
/// this once per batch, and a timer per batch cost the runtime's reactor thread a
/// wake-up each time.
fn next_within(
    rx: &mut mpsc::Receiver<Command>,
    limit: Option<Duration>,
) -> Option<Option<Command>> {
    struct Unpark(thread::Thread);
    impl ArcWake for Unpark {
        fn wake_by_ref(this: &std::sync::Arc<Self>) {
            this.0.unpark();
        }
    }
    let waker = futures::task::waker(std::sync::Arc::new(Unpark(thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        if let std::task::Poll::Ready(cmd) = rx.poll_next_unpin(&mut cx) {
            return Some(cmd);
        }
        match deadline {
            None => thread::park(),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                thread::park_timeout(left);
            }
        }
    }
}

/// Opens the database again, rescans it and proves it writable with a probe commit.
fn reopen(
    path: &Path,
    faults: Option<&Arc<Faults>>,
) -> Result<(Database, HashMap<u32, Usage>), redb::Error> {
    let db = open_db(path, faults)?;
    let (usage, _) = scan(&db)?;
    let txn = db.begin_write()?;
    {
        let mut probe = txn.open_table(PROBE)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        probe.insert("last-recovery", now)?;
    }
    txn.commit()?;
    Ok((db, usage))
}
