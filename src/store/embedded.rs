//! The embedded store: one node's frames in a file, on a thread of its own.
//!
//! Frames are kept in [redb], an embedded, crash-safe (copy-on-write, checksummed, fsync
//! on commit) key-value store written in Rust: no C library, no server, one file under
//! `--data-dir`. A frame for an online receiver is stored too, alongside its live push,
//! and leaves its device's inbox once delivered, so that a crash can only delay it:
//! the store is a write-ahead log for live traffic, the mailbox of every device that
//! is away, and (with `--history-max-age`) each id's history. The tables and what each
//! command does to them are in `store/tables.rs`, `store/log.rs` and `store/history.rs`.
//!
//! All storage runs on one dedicated thread, so blocking file I/O never occupies the
//! async executor. The thread drains every command that is waiting, applies them in one
//! write transaction and commits once (group commit): under load, one fsync covers
//! hundreds of frames. The append of a frame pushed live is staged for up to
//! `STAGE_WAIT` (5 ms): if its delete (its delivery) arrives first, it is written
//! without an inbox row (with history) or not at all (without), so a receiver that
//! keeps up costs the store one row per frame, or nothing. Those deletes do not come
//! through the queue: writers leave them in [`Deliveries`], which wakes the thread only
//! when it waits with nothing due, and the thread places them in its next batch.
//! Replies are sent only after the commit, so an `Appended` reply means the frame
//! survives `kill -9` (or was already delivered).
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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use redb::{Builder, Database};

use super::deliveries::{self, Deliveries};
use super::history::{Answer, Kept};
use super::log::{Appending, Log, Tables};
use super::tables::{Entry, PROBE};
use super::{
    Command, DeviceChange, Endpoint, Failure, History, KnownDevice, Limits, Outcome, QUEUE,
    Reading, Reply, Stage, Store, Stored, answer, settled, upgrade,
};
use crate::metrics::Metrics;
use std::sync::Arc;

/// At most this many commands go into one transaction.
const BATCH: usize = 8192;
/// How often history is pruned by age, and how many frames one pass looks at.
const AGE_EVERY: Duration = Duration::from_secs(1);
const AGE_BATCH: usize = 4096;

/// How long history taken from frames that need no other write (delivered before their
/// append was due) may wait for company before it is committed, and how many such
/// frames one commit waits for at most. Without the wait, a receiver that keeps up made
/// each small batch a commit of its own: at window 1 that was most of the store's time.
/// A crash within the wait leaves those frames (all delivered already) out of history.
const HISTORY_WAIT: Duration = Duration::from_millis(5);
const HISTORY_BATCH: usize = 4096;

/// Memory redb may use to cache pages.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Reopening a failed database starts after this long and backs off to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

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

/// Opens (or creates) `dir/mailbox.redb`, takes over what the previous release stored
/// there, and starts the store thread.
pub fn open(
    dir: &Path,
    limits: Limits,
    history: History,
    metrics: Option<Arc<Metrics>>,
    faults: Option<Arc<Faults>>,
) -> Result<Store, OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path: PathBuf = dir.join(super::FILE);
    let db = open_db(&path, faults.as_ref()).map_err(|source| OpenError::Open {
        path: path.clone(),
        source,
    })?;
    let read = |source| OpenError::Read {
        path: path.clone(),
        source,
    };
    let (mut log, mut kept) = scan(&db).map_err(read)?;
    upgrade::run(&db, &mut log, &mut kept, &history, now_ms()).map_err(read)?;
    let devices = known_devices(&db).map_err(read)?;
    let next_seq = log.next_seq(now_micros());
    let (commands, rx) = mpsc::channel(QUEUE);
    // Unbounded, yet bounded in practice: each reply answers a command that had to get
    // through the bounded queue, and the broker drains replies before new events.
    let (reply_tx, replies) = mpsc::unbounded();
    let (closed_tx, closed) = oneshot::channel();
    let deliveries = Arc::new(Deliveries::default());
    let worker = Worker {
        faults,
        metrics,
        db: Some(db),
        path,
        limits,
        history,
        log,
        kept,
        kept_since: None,
        aged_at: Instant::now(),
        swept_to: (0, 0),
        swept_conversations: (0, 0),
        buf: Vec::new(),
        down: None,
        held: Vec::new(),
        staged: Stage::default(),
        stats: Stats::default(),
        replies: reply_tx,
        live: HashMap::new(),
        deliveries: deliveries.clone(),
        appended_through: next_seq.saturating_sub(1),
        early: Vec::new(),
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
        devices,
        deliveries: Some(deliveries),
        closed,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Every device the file knows, for the broker.
fn known_devices(db: &Database) -> Result<Vec<KnownDevice>, redb::Error> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(super::tables::DEVICES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut devices = Vec::new();
    for row in redb::ReadableTable::iter(&table)? {
        let (key, value) = row?;
        let (id, device) = key.value();
        if let Some(row) = super::tables::DeviceRow::decode(value.value()) {
            devices.push(KnownDevice {
                endpoint: Endpoint { id, device },
                name: row.name,
                last_seen: row.last_seen,
            });
        }
    }
    Ok(devices)
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

fn scan(db: &Database) -> Result<(Log, Kept), redb::Error> {
    let txn = db.begin_read()?;
    Ok((Log::scan(&txn)?, Kept::scan(&txn)?))
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
    history: History,
    /// What the file holds for delivery, in counts (see [`Log`]).
    log: Log,
    /// History's counts, and what it took since the last commit (see [`Kept`]).
    kept: Kept,
    /// When history took the oldest frame it has not written (see [`HISTORY_WAIT`]).
    kept_since: Option<Instant>,
    /// When history was last pruned by age.
    aged_at: Instant,
    /// Where the next sweep of the device and conversation rows starts (see
    /// [`Worker::sweep_idle_rows`]).
    swept_to: (u32, u16),
    swept_conversations: (u32, u32),
    /// Room to encode a frame's row in.
    buf: Vec<u8>,
    down: Option<Down>,
    /// Loads and deletes that arrived while the store was down, in order.
    held: Vec<Command>,
    /// Appends of frames pushed live, not yet written: if their deletes arrive with
    /// the next batch they never touch the disk. Their echoes wait.
    staged: Stage,
    stats: Stats,
    replies: mpsc::UnboundedSender<Vec<Reply>>,
    /// Per device, the live frames written since its last first read: the broker
    /// delivers those itself, so later reads leave them out.
    live: HashMap<Endpoint, HashSet<u64>>,
    /// Where writers leave the deletes of what they delivered.
    deliveries: Arc<Deliveries>,
    /// The newest frame whose append came in an earlier batch.
    appended_through: u64,
    /// Deletes taken before their frames' appends came, for a later batch.
    early: Vec<Command>,
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
        self.deliveries.attach(thread::current());
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let ready = rx.try_recv().ok();
            let deliveries = &self.deliveries;
            let next = match &self.down {
                _ if ready.is_some() => ready.map_or(Next::Closed, Next::Command),
                None if self.due().is_none() => {
                    match next_within(&mut rx, self.age_due(), deliveries, false) {
                        Next::TimedOut => {
                            self.age();
                            continue;
                        }
                        next => next,
                    }
                }
                None => next_within(&mut rx, self.due(), deliveries, true),
                Some(down) => {
                    let wait = down.retry_at.saturating_duration_since(Instant::now());
                    // Waiting as idle, not as with something due: any command wakes a
                    // store that is down (to be refused or held), not only its retry.
                    match next_within(&mut rx, Some(wait), deliveries, false) {
                        Next::TimedOut => {
                            self.try_recover();
                            continue;
                        }
                        next => next,
                    }
                }
            };
            match next {
                Next::Command(first) => batch.push(first),
                Next::Closed => break,
                // Nothing new, or only deletes: write what is due, and take them.
                Next::TimedOut | Next::Deliveries => {}
            }
            self.gather(&mut batch, &mut rx);
            if self.down.is_some() {
                self.refuse(&mut batch);
            } else {
                self.apply(&mut batch, true);
                if self.age_due().is_some_and(|d| d.is_zero()) {
                    self.age();
                }
            }
        }
        if self.down.is_some() {
            self.try_recover();
        }
        // Every writer has finished: what they left goes in the last commit.
        let deletes = self.waiting_deletes();
        let early = deliveries::place(&mut batch, deletes, u64::MAX);
        debug_assert!(early.is_empty());
        if !batch.is_empty() || !self.staged.is_empty() || self.kept.has_pending() {
            if self.down.is_some() {
                self.refuse(&mut batch);
            } else {
                self.apply(&mut batch, false);
            }
        }
        log::debug!("store closed");
    }

    /// The deletes waiting to be placed: those kept back for appends not yet come,
    /// then those the writers left since.
    fn waiting_deletes(&mut self) -> Vec<Command> {
        let mut deletes = std::mem::take(&mut self.early);
        deletes.extend(self.deliveries.take());
        deletes
    }

    /// Adds to `batch` the commands waiting in the queue, then the deletes writers
    /// left, each where its order allows (see [`super::deliveries`]).
    fn gather(&mut self, batch: &mut Vec<Command>, rx: &mut mpsc::Receiver<Command>) {
        self.deliveries.taking_queue();
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                _ => break,
            }
        }
        let deletes = self.waiting_deletes();
        if !deletes.is_empty() {
            self.early = deliveries::place(batch, deletes, self.appended_through);
        }
        let newest = batch.iter().filter_map(|c| match c {
            Command::Append { seq, .. } => Some(*seq),
            _ => None,
        });
        if let Some(newest) = newest.max() {
            self.appended_through = self.appended_through.max(newest);
        }
    }

    /// Sets the mailbox and history gauges.
    fn publish(&self) {
        if let Some(m) = &self.metrics {
            m.mailbox_frames.set(self.log.waiting.messages as i64);
            m.mailbox_bytes.set(self.log.waiting.bytes as i64);
            m.history_frames.set(self.kept.total.messages as i64);
            m.history_bytes.set(self.kept.total.bytes as i64);
            let pruned = self.log.pruned.saturating_sub(m.history_pruned.get());
            m.history_pruned.inc_by(pruned);
        }
    }

    /// How long until held appends or history's waiting frames are due to be written;
    /// `None` when nothing waits.
    fn due(&self) -> Option<Duration> {
        let history = self
            .kept_since
            .filter(|_| self.kept.has_pending())
            .map(|t| HISTORY_WAIT.saturating_sub(t.elapsed()));
        match (self.staged.next_due(), history) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// History's waiting frames must be committed now: they waited long enough, or
    /// are many, or (not `stage`) everything is written now.
    fn history_due(&self, stage: bool) -> bool {
        self.kept.has_pending()
            && (!stage
                || self.kept.pending() >= HISTORY_BATCH
                || self.kept_since.is_none_or(|t| t.elapsed() >= HISTORY_WAIT))
    }

    /// How long until history is next pruned by age; `None` without history.
    fn age_due(&self) -> Option<Duration> {
        self.history
            .on()
            .then(|| AGE_EVERY.saturating_sub(self.aged_at.elapsed()))
    }

    /// Prunes history by age, a batch at a time, each its own transaction.
    fn age(&mut self) {
        self.aged_at = Instant::now();
        let (Some(cutoff), Some(db)) = (self.history.cutoff(now_ms()), &self.db) else {
            return;
        };
        let result = (|| -> Result<(), redb::Error> {
            loop {
                let txn = db.begin_write()?;
                let looked = {
                    let mut t = Tables::open(&txn)?;
                    self.kept.age(&mut t, cutoff, AGE_BATCH)?
                };
                if looked == 0 {
                    txn.abort()?;
                    return Ok(());
                }
                txn.commit()?;
                if looked < AGE_BATCH {
                    return Ok(());
                }
            }
        })();
        let result = result.and_then(|()| self.sweep_idle_rows(cutoff));
        match result {
            Ok(()) => self.publish(),
            // The counts may be off now; recovery reads them from the file again.
            Err(e) => self.go_down(e.to_string()),
        }
    }

    /// Looks at the next [`AGE_BATCH`] device rows (from where the last pass stopped,
    /// round the table) for devices unused since `cutoff` (ms): named ones go to the
    /// broker, which forgets those not online ([`Reply::Idle`]); a default device's row
    /// goes at once when nothing waits for it and its id has no named devices (it only
    /// says when the id last bound; the next bind writes it again), so one row per id
    /// that ever connected does not stay forever. A default device of an id that uses
    /// named devices stays: frames wait for it too. Conversations past the retention
    /// go the same way, a batch of rows a pass.
    fn sweep_idle_rows(&mut self, cutoff: u64) -> Result<(), redb::Error> {
        use redb::ReadableTable;
        let txn = match &self.db {
            Some(db) => db.begin_write()?,
            None => return Ok(()),
        };
        let mut idle = Vec::new();
        let mut gone = Vec::new();
        let mut looked = 0;
        {
            let t = Tables::open(&txn)?;
            for row in t.devices.range(self.swept_to..)?.take(AGE_BATCH) {
                let (key, value) = row?;
                looked += 1;
                let (id, device) = key.value();
                self.swept_to = (id, device.saturating_add(1));
                let Some(row) = super::tables::DeviceRow::decode(value.value()) else {
                    continue;
                };
                if row.last_seen >= cutoff {
                    continue;
                }
                let e = Endpoint { id, device };
                if device != super::tables::DEFAULT_DEVICE {
                    idle.push(e);
                } else if !self.log.devices.contains_key(&id)
                    && self.log.inboxes.get(&e).is_none_or(|u| u.messages == 0)
                {
                    gone.push(e);
                }
            }
        }
        if looked < AGE_BATCH {
            // The end of the table: the next pass starts over.
            self.swept_to = (0, 0);
        }
        // A conversation whose newest message is past the retention has no history
        // left (or will not once its block goes): its row (newest message, read
        // marker, unread count) goes too, or every pair that ever talked kept one.
        let mut ended = Vec::new();
        let mut looked = 0;
        {
            let t = Tables::open(&txn)?;
            for row in t
                .conversations
                .range(self.swept_conversations..)?
                .take(AGE_BATCH)
            {
                let (key, value) = row?;
                looked += 1;
                let (id, peer) = key.value();
                self.swept_conversations = (id, peer.saturating_add(1));
                let old = super::tables::ConversationRow::decode(value.value())
                    .is_some_and(|c| c.time < cutoff);
                if old {
                    ended.push((id, peer));
                }
            }
        }
        if looked < AGE_BATCH {
            self.swept_conversations = (0, 0);
        }
        if gone.is_empty() && ended.is_empty() {
            txn.abort()?;
        } else {
            {
                let mut t = Tables::open(&txn)?;
                for e in &gone {
                    t.devices.remove((e.id, e.device))?;
                }
                for &key in &ended {
                    t.conversations.remove(key)?;
                }
            }
            txn.commit()?;
            log::debug!(
                "forgot {} default devices unused within history's retention, and {} conversations past it",
                gone.len(),
                ended.len()
            );
        }
        if !idle.is_empty() {
            self.send(vec![Reply::Idle(idle)]);
        }
        Ok(())
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
        // A load must see every frame sent before it, and so must an operator's
        // measure or forget of an id.
        let stage = stage
            && !batch.iter().any(|c| {
                matches!(
                    c,
                    Command::Load { .. } | Command::Measure { .. } | Command::Forget { .. }
                )
            });
        // Frames delivered before they reached the disk: neither written nor removed.
        // Sequence numbers are unique across receivers, so they suffice.
        let mut delivered: Vec<u64> = Vec::new();
        for cmd in batch.iter() {
            if let Command::Delete { seqs, .. } = cmd {
                delivered.extend_from_slice(seqs);
            }
        }
        delivered.sort_unstable();
        // History takes every frame in the order the broker sent them, before any is
        // held back for its delivery (see [`super::history`]).
        if self.history.on() {
            for cmd in batch.iter() {
                if let Command::Append {
                    receiver,
                    seq,
                    wire,
                    time,
                    fanout,
                    ..
                } = cmd
                {
                    let origin = fanout.as_ref().and_then(|f| f.origin);
                    self.kept.take(*seq, *time, *receiver, origin, wire.clone());
                }
            }
            if self.kept.has_pending() && self.kept_since.is_none() {
                self.kept_since = Some(Instant::now());
            }
        }
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
                // Only a frame for one device can be settled by one delivery.
                Command::Append {
                    seq,
                    receiver,
                    ref wire,
                    fanout: None,
                    ..
                } if delivered.binary_search(&seq).is_ok()
                    && self.log.single(receiver, Entry::author_of(wire)) =>
                {
                    replies.extend(settled(cmd));
                    skipped.push(seq);
                }
                Command::Append {
                    seq,
                    receiver,
                    ref wire,
                    live: true,
                    fanout: None,
                    ..
                } if stage && self.log.single(receiver, Entry::author_of(wire)) => {
                    self.staged.hold(seq, receiver, cmd)
                }
                other => writes.push(other),
            }
        }
        self.stats.skipped += skipped.len() as u64;
        skipped.sort_unstable();
        // The delete of a frame that was never written changes nothing on disk: it
        // must not make a commit of its own (history waits for company, above).
        writes.retain(|c| match c {
            Command::Delete { seqs, .. } => !seqs.iter().all(|s| skipped.binary_search(s).is_ok()),
            _ => true,
        });
        if writes.is_empty() && !self.history_due(stage) {
            self.send(replies);
            return;
        }
        let result = self.transact(&writes, &skipped);
        // A commit writes (or, failing, drops) everything history took.
        self.kept_since = None;
        match result {
            Ok((more, measured)) => {
                self.stats.tick();
                self.publish();
                replies.extend(more);
                self.send(replies);
                answer_operator(writes, measured);
            }
            Err(e) => {
                // What history took in the failed commit is lost with it: frames that
                // were delivered meanwhile are not in it, refused ones must not be. The
                // counts in memory may be off now: recovery reads them from the file
                // again before anything uses them.
                self.kept.clear_pending();
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
        // What history held back is lost with the failed commit (recovery reads the
        // counts from the file again): nothing waits to be written now.
        self.kept.clear_pending();
        self.kept_since = None;
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
            Ok((db, log)) => {
                log::info!(
                    "store recovered after {:.1} s",
                    down.since.elapsed().as_secs_f64()
                );
                self.db = Some(db);
                let pruned = self.log.pruned;
                (self.log, self.kept) = log;
                self.log.pruned = pruned;
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

    /// Writes `writes` in one transaction, in order, and what history took; deletes
    /// of `skipped` (sorted) frames, which never reached the disk, are no-ops.
    /// Also returns what each measure and forget among `writes` found, in order.
    fn transact(
        &mut self,
        writes: &[Command],
        skipped: &[u64],
    ) -> Result<(Vec<Reply>, Vec<Stored>), redb::Error> {
        let mut replies = Vec::new();
        let mut measured = Vec::new();
        let Some(db) = &self.db else {
            return Err(redb::Error::Io(std::io::Error::other("store is closed")));
        };
        let txn = db.begin_write()?;
        // A batch that only reads needs no commit, and so no fsync.
        let mut dirty = self.kept.has_pending();
        let mut written = 0u32;
        // For each command, the number of the next append after it: what history took
        // below that has its outcome (refused frames have left), so it may be written
        // early, before a read that must see it.
        let mut next_append = vec![u64::MAX; writes.len()];
        let mut next = u64::MAX;
        for (i, cmd) in writes.iter().enumerate().rev() {
            next_append[i] = next;
            if let Command::Append { seq, .. } = cmd {
                next = *seq;
            }
        }
        {
            let mut t = Tables::open(&txn)?;
            for (i, cmd) in writes.iter().enumerate() {
                match cmd {
                    Command::Append {
                        ticket,
                        receiver,
                        seq,
                        wire,
                        live,
                        time,
                        fanout,
                    } => {
                        let (live_named, origin) = match fanout {
                            Some(f) => (&f.live[..], f.origin),
                            None => (&[][..], None),
                        };
                        let sender = super::tables::Entry::author_of(wire);
                        let targets = self
                            .log
                            .targets(*receiver, sender, origin, *live, live_named);
                        let a = Appending {
                            receiver: *receiver,
                            seq: *seq,
                            time: *time,
                            wire,
                            origin,
                            targets: &targets,
                        };
                        let outcome =
                            match self.log.append(&mut t, &a, &self.limits, &mut self.buf)? {
                                Err(why) => {
                                    self.kept.drop_refused(*seq);
                                    Outcome::Full(why)
                                }
                                Ok(()) => {
                                    for target in targets.iter().filter(|t| t.live) {
                                        self.live.entry(target.endpoint).or_default().insert(*seq);
                                    }
                                    self.stats.written += 1;
                                    written += 1;
                                    dirty = true;
                                    Outcome::Stored
                                }
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
                        device,
                        after,
                        max_bytes,
                        reading,
                    } => {
                        let e = Endpoint {
                            id: *receiver,
                            device: *device,
                        };
                        if after.is_none() {
                            // A new connection: everything stored is for it.
                            self.live.remove(&e);
                        }
                        let session = *reading != Reading::Plain;
                        let frames =
                            self.log
                                .page(&t, e, *after, *max_bytes, session, self.live.get(&e))?;
                        let sync = match reading {
                            Reading::SessionStart { new, .. } => {
                                dirty = true;
                                self.kept.flush(&mut t, &self.history, next_append[i])?;
                                let head = self.kept.head(&t, e.id)?;
                                let oldest = self.kept.oldest(&t)?;
                                Some(self.log.sync(&mut t, e, *new, head, oldest)?.encode())
                            }
                            _ => None,
                        };
                        replies.push(Reply::Page {
                            ticket: *ticket,
                            receiver: *receiver,
                            held: Vec::new(),
                            frames,
                            sync,
                        });
                    }
                    Command::Delete {
                        receiver,
                        device,
                        seqs,
                    } => {
                        let e = Endpoint {
                            id: *receiver,
                            device: *device,
                        };
                        if let Some(live) = self.live.get_mut(&e) {
                            for seq in seqs {
                                live.remove(seq);
                            }
                        }
                        for seq in seqs {
                            if skipped.binary_search(seq).is_ok() {
                                continue;
                            }
                            if self.log.delivered(&mut t, e, *seq)? {
                                self.stats.removed += 1;
                                dirty = true;
                            }
                        }
                    }
                    Command::Device { endpoint, change } => {
                        dirty = true;
                        match change {
                            DeviceChange::Seen { name, now } => {
                                self.log.register(&mut t, *endpoint, name, *now)?
                            }
                            DeviceChange::Forget => {
                                self.live.remove(endpoint);
                                self.log.forget(&mut t, *endpoint)?
                            }
                        }
                    }
                    Command::Measure { id, .. } => {
                        dirty |= self.kept.has_pending();
                        self.kept.flush(&mut t, &self.history, next_append[i])?;
                        measured.push(self.measure(&t, *id)?);
                    }
                    Command::Forget { id, .. } => {
                        dirty = true;
                        // Blocks history has yet to write would come back after it.
                        self.kept.flush(&mut t, &self.history, next_append[i])?;
                        measured.push(self.measure(&t, *id)?);
                        self.log.forget_id(&mut t, *id)?;
                        self.kept.forget_id(&mut t, *id)?;
                        self.live.retain(|e, _| e.id != *id);
                        log::info!("store: everything stored for id {id} deleted");
                    }
                    Command::Query { ticket, id, query } => {
                        if !self.history.on() {
                            let why = "history is off on this server (--history-max-age 0)";
                            let failed = crate::protocol::session::Record::QueryFailed {
                                request: query.request(),
                                why: why.into(),
                            };
                            replies.push(Reply::Answer {
                                ticket: *ticket,
                                frames: vec![failed.encode()],
                            });
                            continue;
                        }
                        self.kept.flush(&mut t, &self.history, next_append[i])?;
                        match self.kept.query(&mut t, *id, query)? {
                            Answer::Frames(frames) => replies.push(Reply::Answer {
                                ticket: *ticket,
                                frames,
                            }),
                            Answer::Read(record) => {
                                dirty = true;
                                replies.push(Reply::Read {
                                    ticket: *ticket,
                                    id: *id,
                                    record: record.encode(),
                                })
                            }
                        }
                    }
                }
            }
            if dirty {
                self.kept.flush(&mut t, &self.history, u64::MAX)?;
                self.log.flush_missed(&mut t)?;
                self.log.save_seq(&mut t)?;
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
        Ok((replies, measured))
    }

    /// What is stored for `id`, in this transaction.
    fn measure(&self, t: &Tables, id: u32) -> Result<Stored, redb::Error> {
        let (waiting, devices) = self.log.measure(t, id)?;
        let (kept, conversations) = self.kept.measure(t, id)?;
        Ok(Stored {
            mailbox_messages: waiting.messages,
            mailbox_bytes: Some(waiting.bytes),
            history_messages: kept.messages,
            history_bytes: kept.bytes,
            conversations,
            devices,
        })
    }
}

/// Answers the operator's measures and forgets among `writes`, once committed, with
/// what each found (in order). An operator who stopped waiting is no error.
fn answer_operator(writes: Vec<Command>, measured: Vec<Stored>) {
    let mut measured = measured.into_iter();
    for cmd in writes {
        if let Command::Measure { answer, .. } | Command::Forget { answer, .. } = cmd
            && let Some(found) = measured.next()
        {
            let _ = answer.send(found);
        }
    }
}

/// What woke the store thread.
enum Next {
    Command(Command),
    /// Every sender is gone.
    Closed,
    /// The time ran out.
    TimedOut,
    /// Writers left deletes that must be taken now (see [`Deliveries::wait`]).
    Deliveries,
}

/// Waits on this thread for the next command, for at most `limit`, or for deletes left
/// by writers when they must be taken (`due`: something is due when the time runs out,
/// and the deletes can wait for it).
///
/// Parks the thread itself rather than arming a runtime timer: the store waits like
/// this once per batch, and a timer per batch cost the runtime's reactor thread a
/// wake-up each time.
fn next_within(
    rx: &mut mpsc::Receiver<Command>,
    limit: Option<Duration>,
    deliveries: &Arc<Deliveries>,
    due: bool,
) -> Next {
    let waker = futures::task::waker(deliveries.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    let deadline = limit.map(|l| Instant::now() + l);
    let next = loop {
        // The state first, then the queue: see `Deliveries::sent`.
        if deliveries.wait(due) {
            break Next::Deliveries;
        }
        if let std::task::Poll::Ready(cmd) = rx.poll_next_unpin(&mut cx) {
            break cmd.map_or(Next::Closed, Next::Command);
        }
        match deadline {
            None => thread::park(),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Next::TimedOut;
                }
                thread::park_timeout(left);
            }
        }
    };
    deliveries.woken();
    next
}

/// Opens the database again, rescans it and proves it writable with a probe commit.
fn reopen(
    path: &Path,
    faults: Option<&Arc<Faults>>,
) -> Result<(Database, (Log, Kept)), redb::Error> {
    let db = open_db(path, faults)?;
    let log = scan(&db)?;
    let txn = db.begin_write()?;
    {
        let mut probe = txn.open_table(PROBE)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        probe.insert("last-recovery", now)?;
    }
    txn.commit()?;
    Ok((db, log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::backend::Backend;
    use crate::store::Wake;

    fn delete() -> Command {
        Command::Delete {
            receiver: 2,
            device: 0,
            seqs: vec![1],
        }
    }

    /// Runs `next_within` on a thread of its own, as the store does, with something
    /// due in a minute (`due`) or nothing due; says what woke it.
    fn waiting_store(due: bool) -> (Backend, std::sync::mpsc::Receiver<bool>) {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let deliveries = Arc::new(Deliveries::default());
        let backend = Backend::One {
            commands: tx,
            deliveries: deliveries.clone(),
        };
        let (woke_tx, woke) = std::sync::mpsc::channel();
        let (attached_tx, attached) = std::sync::mpsc::channel();
        thread::spawn(move || {
            deliveries.attach(thread::current());
            let _ = attached_tx.send(());
            let limit = due.then_some(Duration::from_secs(60));
            let next = next_within(&mut rx, limit, &deliveries, due);
            let _ = woke_tx.send(matches!(next, Next::Command(_)));
        });
        attached
            .recv_timeout(Duration::from_secs(10))
            .expect("the store thread starts");
        (backend, woke)
    }

    #[test]
    fn a_command_sent_now_wakes_a_store_waiting_with_something_due() {
        // Without the sender's own unpark, the store would sleep its minute: the
        // queue's waker leaves a store with something due asleep.
        let (mut backend, woke) = waiting_store(true);
        crate::rt::block_on(backend.send(delete(), Wake::Now)).expect("store is there");
        assert_eq!(woke.recv_timeout(Duration::from_secs(10)), Ok(true));
    }

    #[test]
    fn an_unhurried_append_wakes_a_store_with_nothing_due() {
        let (mut backend, woke) = waiting_store(false);
        crate::rt::block_on(backend.send(delete(), Wake::WhenDue)).expect("store is there");
        assert_eq!(woke.recv_timeout(Duration::from_secs(10)), Ok(true));
    }
}
