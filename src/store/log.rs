//! Delivery inside one write transaction: the frames some device of an id has yet to
//! receive, each device's inbox, and the devices themselves. History is apart
//! ([`super::history`]); when to commit and what to do when the disk fails is
//! [`super::embedded`].
//!
//! [`Log`] is what the store keeps in memory about the file (counts per inbox, the
//! devices of each id), rebuilt from the file when it opens; [`Tables`] are the open
//! tables of one transaction. Every method takes both, so the bookkeeping and the rows
//! change together, and a failed transaction restores the bookkeeping from a copy
//! ([`Log::clone`]) as the rows roll back.

// redb's error type is large; it is built at most once per failed transaction.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use redb::{ReadableTable, Table, WriteTransaction};

use super::tables::{
    BLOCKS, CONVERSATIONS, DEFAULT_DEVICE, DEVICES, DeviceRow, Entry, FRAMES, HISTORY, INBOX, META,
    NOT_OURS,
};
use super::{Endpoint, Limits, Target, full, full_from};
use crate::protocol::session::{Record, What};

/// Rows and bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub bytes: u64,
}

impl Usage {
    pub fn add(&mut self, len: usize) {
        self.messages += 1;
        self.bytes += len as u64;
    }

    pub fn sub(&mut self, len: usize) {
        self.messages = self.messages.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(len as u64);
    }
}

/// The open tables of one write transaction.
pub struct Tables<'t> {
    pub frames: Table<'t, u64, &'static [u8]>,
    pub inbox: Table<'t, (u32, u16, u64), ()>,
    pub devices: Table<'t, (u32, u16), &'static [u8]>,
    pub history: Table<'t, (u32, u32, u64), &'static [u8]>,
    pub blocks: Table<'t, u64, &'static [u8]>,
    pub conversations: Table<'t, (u32, u32), &'static [u8]>,
    pub meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, redb::Error> {
        Ok(Tables {
            frames: txn.open_table(FRAMES)?,
            inbox: txn.open_table(INBOX)?,
            devices: txn.open_table(DEVICES)?,
            history: txn.open_table(HISTORY)?,
            blocks: txn.open_table(BLOCKS)?,
            conversations: txn.open_table(CONVERSATIONS)?,
            meta: txn.open_table(META)?,
        })
    }
}

/// What the store knows about its file, kept in memory.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Frames waiting in each device's inbox (the mailbox limits apply to these).
    pub inboxes: HashMap<Endpoint, Usage>,
    /// The sum of `inboxes`, for the mailbox gauges.
    pub waiting: Usage,
    /// Of each device's inbox, what each sender's frames take (the per-sender bound);
    /// an id's own frames waiting for its other devices are not counted.
    from: HashMap<(Endpoint, u32), Usage>,
    /// The devices besides the default one of each id that has any.
    pub devices: HashMap<u32, Vec<u16>>,
    /// Of the ids in `devices`, those whose default device connected (since the
    /// upgrade): frames for them wait for it too.
    pub defaults: HashSet<u32>,
    /// Frames dropped before every device had them, since the start (for metrics).
    pub pruned: u64,
    /// The highest sequence number the store has seen.
    pub seq_high: u64,
    /// Frames each device missed since the last commit, written with it.
    missed: HashMap<Endpoint, u64>,
}

/// One frame as it is appended.
pub struct Appending<'a> {
    pub receiver: u32,
    pub seq: u64,
    pub time: u64,
    pub wire: &'a [u8],
    /// The sender's device that sent it, when the sender opened a session.
    pub origin: Option<u16>,
    /// Who waits for it: without a fan-out, the receiver's default device.
    pub targets: &'a [Target],
}

/// The key of the `meta` row with the highest sequence number handed out.
const SEQ_HIGH: &str = "seq-high";

impl Log {
    /// Reads what the file holds (every log and inbox row: a scan as long as the file).
    pub fn scan(txn: &redb::ReadTransaction) -> Result<Log, redb::Error> {
        let mut log = Log::default();
        if let Some(meta) = open_read(txn, META)? {
            log.seq_high = meta.get(SEQ_HIGH)?.map_or(0, |v| v.value());
        }
        if let Some(frames) = open_read(txn, FRAMES)?
            && let Some(last) = frames.last()?
        {
            log.seq_high = log.seq_high.max(last.0.value());
        }
        if let (Some(rows), Some(frames)) = (open_read(txn, INBOX)?, open_read(txn, FRAMES)?) {
            for row in rows.iter()? {
                let (key, _) = row?;
                let (id, device, seq) = key.value();
                let frame = frames.get(seq)?;
                let len = frame.as_ref().map_or(0, |f| f.value().len());
                let author = frame.and_then(|f| Entry::decode(f.value()).map(|e| e.author()));
                let e = Endpoint { id, device };
                log.inboxes.entry(e).or_default().add(len);
                log.waiting.add(len);
                if let Some(author) = author.filter(|&a| a != id) {
                    log.from.entry((e, author)).or_default().add(len);
                }
            }
        }
        if let Some(rows) = open_read(txn, DEVICES)? {
            let mut defaults = HashSet::new();
            for row in rows.iter()? {
                let (key, _) = row?;
                let (id, device) = key.value();
                if device == DEFAULT_DEVICE {
                    defaults.insert(id);
                } else {
                    log.devices.entry(id).or_default().push(device);
                }
            }
            defaults.retain(|id| log.devices.contains_key(id));
            log.defaults = defaults;
        }
        Ok(log)
    }

    /// The first sequence number the broker may hand out: above every one stored or
    /// seen, and above the clock in microseconds, so numbers a crash never let the
    /// store see (frames delivered before their commit) are not handed out again
    /// after a restart, unless the node ran more than a million frames a second
    /// ahead of its clock just before it.
    pub fn next_seq(&self, now_micros: u64) -> u64 {
        (self.seq_high + 1).max(now_micros)
    }

    /// Every device a frame from `sender` (its device `origin`, if it opened a
    /// session) to `receiver` is for, and which of them have it pushed live: the
    /// receiver's default device if `live_default`, and those in `live`. The receiver's
    /// devices (its default one, unless it uses named devices only) and the sender's
    /// other named devices (their copy).
    pub fn targets(
        &self,
        receiver: u32,
        sender: u32,
        origin: Option<u16>,
        live_default: bool,
        live: &[Endpoint],
    ) -> Vec<Target> {
        let target = |endpoint: Endpoint| Target {
            endpoint,
            live: live.contains(&endpoint)
                || (live_default && endpoint == Endpoint::default_of(receiver)),
        };
        let mut targets = Vec::with_capacity(2);
        match self.devices.get(&receiver) {
            None => targets.push(target(Endpoint::default_of(receiver))),
            Some(named) => {
                if self.defaults.contains(&receiver) {
                    targets.push(target(Endpoint::default_of(receiver)));
                }
                targets.extend(named.iter().map(|&device| {
                    target(Endpoint {
                        id: receiver,
                        device,
                    })
                }));
            }
        }
        if let Some(named) = self.devices.get(&sender) {
            let mine = named.iter().filter(|&&d| Some(d) != origin);
            targets.extend(mine.map(|&device| target(Endpoint { id: sender, device })));
        }
        targets
    }

    /// Whether the store may hold back a live frame for its delivery: it is for one
    /// device only, which has it.
    pub fn single(&self, receiver: u32, sender: u32) -> bool {
        self.devices.is_empty()
            || (!self.devices.contains_key(&receiver) && !self.devices.contains_key(&sender))
    }

    fn endpoints_of(&self, id: u32) -> impl Iterator<Item = Endpoint> + '_ {
        std::iter::once(DEFAULT_DEVICE)
            .chain(self.devices.get(&id).into_iter().flatten().copied())
            .map(move |device| Endpoint { id, device })
    }

    /// Whether any device of `id` still waits for frame `seq`.
    fn awaited(&self, t: &Tables, id: u32, seq: u64) -> Result<bool, redb::Error> {
        for e in self.endpoints_of(id) {
            if self.inboxes.get(&e).is_some_and(|u| u.messages > 0)
                && t.inbox.get((e.id, e.device, seq))?.is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Puts a frame in the inbox of each target device (and the frame itself in
    /// `frames`, once). `Err(why)`: none of the receiver's devices can take it (each
    /// inbox is full, or holds its sender's share); nothing was written. A target whose
    /// inbox is full while one of the receiver's takes the frame misses it (and is told
    /// so when it next connects).
    pub fn append(
        &mut self,
        t: &mut Tables,
        a: &Appending,
        limits: &Limits,
        buf: &mut Vec<u8>,
    ) -> Result<Result<(), String>, redb::Error> {
        let len = a.wire.len();
        let author = Entry::author_of(a.wire);
        let mut take: Vec<Target> = Vec::with_capacity(a.targets.len());
        let mut refusal = None;
        for target in a.targets {
            let e = target.endpoint;
            let u = self.inboxes.get(&e).copied().unwrap_or_default();
            let from = self.from.get(&(e, author)).copied().unwrap_or_default();
            let why = full(limits, u.messages, u.bytes, len).or_else(|| {
                (e.id != author)
                    .then(|| full_from(limits, author, from.messages, from.bytes, len))
                    .flatten()
            });
            match why.filter(|_| !target.live) {
                Some(why) => refusal = Some(why),
                None => take.push(*target),
            }
        }
        // Refused when none of the receiver's devices can take it: copies for the
        // sender's other devices alone would leave the sender unaware.
        if let Some(why) = refusal
            && !take.iter().any(|t| t.endpoint.id == a.receiver)
        {
            return Ok(Err(why));
        }
        if take.len() < a.targets.len() {
            for missed in a.targets.iter().filter(|t| !take.contains(t)) {
                self.missed(missed.endpoint, 1);
            }
        }
        self.seq_high = self.seq_high.max(a.seq);
        if take.is_empty() {
            return Ok(Ok(()));
        }
        Entry {
            time: a.time,
            receiver: a.receiver,
            origin: a.origin.unwrap_or(NOT_OURS),
            wire: a.wire,
        }
        .encode(buf);
        t.frames.insert(a.seq, &buf[..])?;
        let stored = buf.len();
        for target in &take {
            let e = target.endpoint;
            t.inbox.insert((e.id, e.device, a.seq), ())?;
            self.inboxes.entry(e).or_default().add(stored);
            self.waiting.add(stored);
            if e.id != author {
                self.from.entry((e, author)).or_default().add(stored);
            }
        }
        Ok(Ok(()))
    }

    /// Counts `n` frames a device will never get.
    fn missed(&mut self, e: Endpoint, n: u64) {
        self.pruned += n;
        *self.missed.entry(e).or_default() += n;
    }

    /// Writes what devices missed since the last commit into their rows: once per
    /// commit, however many frames a device at its limit missed.
    pub fn flush_missed(&mut self, t: &mut Tables) -> Result<(), redb::Error> {
        for (e, n) in std::mem::take(&mut self.missed) {
            let mut row = t
                .devices
                .get((e.id, e.device))?
                .and_then(|r| DeviceRow::decode(r.value()))
                .unwrap_or(DeviceRow {
                    last_seen: 0,
                    missed: 0,
                    name: String::new(),
                });
            row.missed = row.missed.saturating_add(n);
            t.devices.insert((e.id, e.device), &row.encode()[..])?;
        }
        Ok(())
    }

    /// Removes a delivered frame from a device's inbox, and the frame once no device
    /// waits for it.
    pub fn delivered(
        &mut self,
        t: &mut Tables,
        e: Endpoint,
        seq: u64,
    ) -> Result<bool, redb::Error> {
        if t.inbox.remove((e.id, e.device, seq))?.is_none() {
            return Ok(false);
        }
        let parties = t.frames.get(seq)?.and_then(|f| {
            Entry::decode(f.value()).map(|en| (f.value().len(), en.author(), en.receiver))
        });
        let Some((len, author, receiver)) = parties else {
            return Ok(true);
        };
        if let Some(u) = self.inboxes.get_mut(&e) {
            u.sub(len);
            if u.messages == 0 {
                self.inboxes.remove(&e);
            }
        }
        self.waiting.sub(len);
        if let Some(u) = self.from.get_mut(&(e, author)) {
            u.sub(len);
            if u.messages == 0 {
                self.from.remove(&(e, author));
            }
        }
        if !self.awaited(t, receiver, seq)? && !self.awaited(t, author, seq)? {
            t.frames.remove(seq)?;
        }
        Ok(true)
    }

    /// Persists the highest sequence number seen.
    pub fn save_seq(&self, t: &mut Tables) -> Result<(), redb::Error> {
        t.meta.insert(SEQ_HIGH, self.seq_high)?;
        Ok(())
    }

    /// Reads up to `max_bytes` of what device `e` waits for after `after`, leaving out
    /// `skip`; as a session's deliveries (with envelopes) when `session`.
    pub fn page(
        &self,
        t: &Tables,
        e: Endpoint,
        after: Option<u64>,
        max_bytes: usize,
        session: bool,
        skip: Option<&std::collections::HashSet<u64>>,
    ) -> Result<Vec<(u64, Bytes)>, redb::Error> {
        let mut frames = Vec::new();
        if self.inboxes.get(&e).is_none_or(|u| u.messages == 0) {
            return Ok(frames);
        }
        let start = after.map_or(0, |s| s.saturating_add(1));
        let mut bytes = 0;
        for row in t
            .inbox
            .range((e.id, e.device, start)..=(e.id, e.device, u64::MAX))?
        {
            let seq = row?.0.value().2;
            if skip.is_some_and(|s| s.contains(&seq)) {
                continue;
            }
            let Some(value) = t.frames.get(seq)? else {
                continue;
            };
            let Some(entry) = Entry::decode(value.value()) else {
                continue;
            };
            if !frames.is_empty() && bytes + entry.wire.len() > max_bytes {
                break;
            }
            bytes += entry.wire.len();
            let wire = if session {
                entry
                    .envelope(e.id, seq, What::Delivery, 0)
                    .wrap(entry.wire)
            } else {
                Bytes::copy_from_slice(entry.wire)
            };
            frames.push((seq, wire));
        }
        Ok(frames)
    }

    /// What a device's session learns when it starts: the `sync` record, with the
    /// id's newest offset and the oldest history keeps.
    pub fn sync(
        &mut self,
        t: &mut Tables,
        e: Endpoint,
        new: bool,
        head: u64,
        oldest: u64,
    ) -> Result<Record, redb::Error> {
        self.flush_missed(t)?;
        let mut missed = 0;
        let row = t
            .devices
            .get((e.id, e.device))?
            .and_then(|r| DeviceRow::decode(r.value()));
        if let Some(mut row) = row
            && row.missed > 0
        {
            missed = row.missed;
            row.missed = 0;
            t.devices.insert((e.id, e.device), &row.encode()[..])?;
        }
        Ok(Record::Sync {
            new,
            head,
            oldest,
            backlog: self.inboxes.get(&e).map_or(0, |u| u.messages),
            missed,
        })
    }

    /// Records a device of `id` (or that it was seen again).
    pub fn register(
        &mut self,
        t: &mut Tables,
        e: Endpoint,
        name: &str,
        now: u64,
    ) -> Result<(), redb::Error> {
        let missed = t
            .devices
            .get((e.id, e.device))?
            .and_then(|r| DeviceRow::decode(r.value()))
            .map_or(0, |r| r.missed);
        let row = DeviceRow {
            last_seen: now,
            missed,
            name: name.to_string(),
        };
        t.devices.insert((e.id, e.device), &row.encode()[..])?;
        if e.device == DEFAULT_DEVICE {
            if self.devices.contains_key(&e.id) {
                self.defaults.insert(e.id);
            }
        } else {
            if !self.devices.contains_key(&e.id) && t.devices.get((e.id, DEFAULT_DEVICE))?.is_some()
            {
                self.defaults.insert(e.id);
            }
            let list = self.devices.entry(e.id).or_default();
            if !list.contains(&e.device) {
                list.push(e.device);
            }
        }
        Ok(())
    }

    /// Forgets a device: its row and everything waiting for it.
    pub fn forget(&mut self, t: &mut Tables, e: Endpoint) -> Result<(), redb::Error> {
        let mut seqs = Vec::new();
        for row in t
            .inbox
            .range((e.id, e.device, 0)..=(e.id, e.device, u64::MAX))?
        {
            seqs.push(row?.0.value().2);
        }
        for seq in seqs {
            self.delivered(t, e, seq)?;
        }
        t.devices.remove((e.id, e.device))?;
        // Its missed count would write the row again at the end of the commit.
        self.missed.remove(&e);
        if e.device == DEFAULT_DEVICE {
            self.defaults.remove(&e.id);
        } else if let Some(list) = self.devices.get_mut(&e.id) {
            list.retain(|&d| d != e.device);
            if list.is_empty() {
                self.devices.remove(&e.id);
                self.defaults.remove(&e.id);
            }
        }
        Ok(())
    }
}

impl Log {
    /// What waits for `id`'s devices, and how many devices the file remembers for it.
    pub fn measure(&self, t: &Tables, id: u32) -> Result<(Usage, u64), redb::Error> {
        let mut waiting = Usage::default();
        for (_, u) in self.inboxes.iter().filter(|(e, _)| e.id == id) {
            waiting.messages += u.messages;
            waiting.bytes += u.bytes;
        }
        let devices = t.devices.range((id, 0)..=(id, u16::MAX))?.count() as u64;
        Ok((waiting, devices))
    }

    /// Forgets every device of `id` with everything that waits for it: each device
    /// the file or the memory knows, and any inbox row left without one.
    pub fn forget_id(&mut self, t: &mut Tables, id: u32) -> Result<(), redb::Error> {
        let mut devices: Vec<u16> = self.endpoints_of(id).map(|e| e.device).collect();
        for row in t.devices.range((id, 0)..=(id, u16::MAX))? {
            devices.push(row?.0.value().1);
        }
        for row in t.inbox.range((id, 0, 0)..=(id, u16::MAX, u64::MAX))? {
            devices.push(row?.0.value().1);
        }
        devices.extend(self.inboxes.keys().filter(|e| e.id == id).map(|e| e.device));
        devices.sort_unstable();
        devices.dedup();
        for device in devices {
            self.forget(t, Endpoint { id, device })?;
        }
        // What is left counted for the id (an inbox row whose frame was gone) leaves
        // the gauge's sum too.
        for (_, u) in self.inboxes.iter().filter(|(e, _)| e.id == id) {
            self.waiting.messages = self.waiting.messages.saturating_sub(u.messages);
            self.waiting.bytes = self.waiting.bytes.saturating_sub(u.bytes);
        }
        self.inboxes.retain(|e, _| e.id != id);
        self.from.retain(|(e, _), _| e.id != id);
        self.devices.remove(&id);
        self.defaults.remove(&id);
        Ok(())
    }
}

/// A table of a read transaction, if it exists yet.
fn open_read<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: redb::TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, redb::Error> {
    match txn.open_table(def) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
