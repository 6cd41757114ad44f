//! Every id's log, its devices' inboxes and its conversations, inside one write
//! transaction: what the embedded store does with each command, apart from when it
//! commits and what it does when the disk fails ([`super::embedded`]).
//!
//! [`Log`] is what the store keeps in memory about the file (counts per inbox and per
//! log, the devices of each id), rebuilt from the file when it opens; [`Tables`] are
//! the open tables of one transaction. Every method takes both, so the bookkeeping and
//! the rows change together, and a failed transaction restores the bookkeeping from a
//! copy ([`Log::clone`]) as the rows roll back.

// redb's error type is large; it is built at most once per failed transaction.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use redb::{ReadableTable, Table, WriteTransaction};

use super::tables::{
    CONVERSATIONS, ConversationRow, DEFAULT_DEVICE, DEVICES, DeviceRow, Entry, FRAMES, INBOX, LOG,
    META, NOT_OURS,
};
use super::{Endpoint, History, Limits, Target, full};
use crate::protocol::session::{Before, MAX_PAGE, Query, Record, What};

/// How many log rows one query may look at before it answers with what it found (and
/// `more`), so no query holds the store for long.
const SCAN_LIMIT: usize = 20_000;
/// The most bytes of frames one query's answer holds (at least one frame).
pub(crate) const ANSWER_BYTES: usize = 1024 * 1024;

/// Rows and bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub bytes: u64,
}

impl Usage {
    fn add(&mut self, len: usize) {
        self.messages += 1;
        self.bytes += len as u64;
    }

    fn sub(&mut self, len: usize) {
        self.messages = self.messages.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(len as u64);
    }
}

/// The open tables of one write transaction.
pub struct Tables<'t> {
    pub frames: Table<'t, u64, &'static [u8]>,
    pub log: Table<'t, (u32, u64), u32>,
    pub inbox: Table<'t, (u32, u16, u64), ()>,
    pub devices: Table<'t, (u32, u16), &'static [u8]>,
    pub conversations: Table<'t, (u32, u32), &'static [u8]>,
    pub meta: Table<'t, &'static str, u64>,
    /// Conversation rows changed in this transaction, written once by
    /// [`Tables::flush`]: a batch of frames between two ids rewrites their rows once.
    touched: HashMap<(u32, u32), ConversationRow>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, redb::Error> {
        Ok(Tables {
            frames: txn.open_table(FRAMES)?,
            log: txn.open_table(LOG)?,
            inbox: txn.open_table(INBOX)?,
            devices: txn.open_table(DEVICES)?,
            conversations: txn.open_table(CONVERSATIONS)?,
            meta: txn.open_table(META)?,
            touched: HashMap::new(),
        })
    }

    /// Writes the conversation rows changed so far; before a commit, and before
    /// anything reads them.
    pub fn flush(&mut self) -> Result<(), redb::Error> {
        for ((id, peer), row) in self.touched.drain() {
            self.conversations.insert((id, peer), &row.encode()[..])?;
        }
        Ok(())
    }
}

/// What the store knows about its file, kept in memory.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Frames waiting in each device's inbox (the mailbox limits apply to these).
    pub inboxes: HashMap<Endpoint, Usage>,
    /// The sum of `inboxes`, for the mailbox gauges.
    pub waiting: Usage,
    /// Each id's log: entries and their bytes.
    pub logs: HashMap<u32, Usage>,
    /// The sum of `logs`, for the history gauges.
    pub kept: Usage,
    /// The devices besides the default one of each id that has any.
    pub devices: HashMap<u32, Vec<u16>>,
    /// Of the ids in `devices`, those whose default device connected (since the
    /// upgrade): frames for them wait for it too.
    pub defaults: HashSet<u32>,
    /// Frames dropped before every device had them, since the start (for metrics).
    pub pruned: u64,
    /// The highest sequence number the store has seen.
    pub seq_high: u64,
    /// Frames older than this sequence number have been pruned by age, apart from
    /// those some device still waits for.
    pub aged: u64,
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
    /// Write inbox rows for the targets (false: every target has it already).
    pub inbox: bool,
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
        if let Some(rows) = open_read(txn, LOG)? {
            for row in rows.iter()? {
                let (key, len) = row?;
                let (id, _) = key.value();
                let len = len.value() as usize;
                log.logs.entry(id).or_default().add(len);
                log.kept.add(len);
            }
        }
        if let (Some(rows), Some(lens)) = (open_read(txn, INBOX)?, open_read(txn, LOG)?) {
            for row in rows.iter()? {
                let (key, _) = row?;
                let (id, device, seq) = key.value();
                let len = lens.get((id, seq))?.map_or(0, |l| l.value() as usize);
                log.inboxes
                    .entry(Endpoint { id, device })
                    .or_default()
                    .add(len);
                log.waiting.add(len);
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
        !self.devices.contains_key(&receiver) && !self.devices.contains_key(&sender)
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

    /// Appends a frame: its row, a log row for its receiver (and its sender, with
    /// history on or when the sender's other devices get it), an inbox row per target.
    /// `Err(why)`: no target can take it (each inbox is full); nothing was written.
    /// A target whose inbox is full while another takes the frame misses it (and is
    /// told so when it next connects).
    pub fn append(
        &mut self,
        t: &mut Tables,
        a: &Appending,
        limits: &Limits,
        history: &History,
        buf: &mut Vec<u8>,
    ) -> Result<Result<(), String>, redb::Error> {
        let len = a.wire.len();
        let mut take: Vec<Target> = Vec::with_capacity(a.targets.len());
        let mut refusal = None;
        if a.inbox {
            for target in a.targets {
                let u = self
                    .inboxes
                    .get(&target.endpoint)
                    .copied()
                    .unwrap_or_default();
                match full(limits, u.messages, u.bytes, len).filter(|_| !target.live) {
                    Some(why) => refusal = Some(why),
                    None => take.push(*target),
                }
            }
            if take.is_empty()
                && let Some(why) = refusal
            {
                return Ok(Err(why));
            }
            if take.len() < a.targets.len() {
                for missed in a.targets.iter().filter(|t| !take.contains(t)) {
                    self.missed(t, missed.endpoint, 1)?;
                }
            }
        }
        let sender = Entry::author_of(a.wire);
        let sender_logs = history.on() || take.iter().any(|t| t.endpoint.id == sender);
        Entry {
            time: a.time,
            receiver: a.receiver,
            origin: a.origin.unwrap_or(NOT_OURS),
            wire: a.wire,
        }
        .encode(buf);
        t.frames.insert(a.seq, &buf[..])?;
        let stored = buf.len();
        self.seq_high = self.seq_high.max(a.seq);
        let receiver_logs = history.on() || take.iter().any(|t| t.endpoint.id == a.receiver);
        for (id, logs) in [(a.receiver, receiver_logs), (sender, sender_logs)] {
            if logs {
                t.log.insert((id, a.seq), stored as u32)?;
                self.logs.entry(id).or_default().add(stored);
                self.kept.add(stored);
            }
        }
        for target in &take {
            let e = target.endpoint;
            t.inbox.insert((e.id, e.device, a.seq), ())?;
            self.inboxes.entry(e).or_default().add(stored);
            self.waiting.add(stored);
        }
        if history.on() {
            self.converse(t, a.receiver, sender, a.seq, a.time, true)?;
            self.converse(t, sender, a.receiver, a.seq, a.time, false)?;
            for id in [a.receiver, sender] {
                self.bound(t, id, history)?;
            }
        }
        Ok(Ok(()))
    }

    /// Notes the newest message of a conversation.
    fn converse(
        &mut self,
        t: &mut Tables,
        id: u32,
        peer: u32,
        seq: u64,
        time: u64,
        unread: bool,
    ) -> Result<(), redb::Error> {
        let row = match t.touched.entry((id, peer)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let stored = t
                    .conversations
                    .get((id, peer))?
                    .and_then(|r| ConversationRow::decode(r.value()))
                    .unwrap_or_default();
                e.insert(stored)
            }
        };
        row.last = seq;
        row.time = time;
        if unread {
            row.unread = row.unread.saturating_add(1);
        }
        Ok(())
    }

    /// Counts `n` frames a device will never get.
    fn missed(&mut self, t: &mut Tables, e: Endpoint, n: u64) -> Result<(), redb::Error> {
        self.pruned += n;
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
        Ok(())
    }

    /// Removes a delivered frame from a device's inbox; without history, also the
    /// frame once no device waits for it.
    pub fn delivered(
        &mut self,
        t: &mut Tables,
        e: Endpoint,
        seq: u64,
        history: &History,
    ) -> Result<bool, redb::Error> {
        if t.inbox.remove((e.id, e.device, seq))?.is_none() {
            return Ok(false);
        }
        let len = t.log.get((e.id, seq))?.map_or(0, |l| l.value() as usize);
        if let Some(u) = self.inboxes.get_mut(&e) {
            u.sub(len);
            if u.messages == 0 {
                self.inboxes.remove(&e);
            }
        }
        self.waiting.sub(len);
        if !history.on() || seq < self.aged {
            self.unlog(t, e.id, seq)?;
        }
        Ok(true)
    }

    /// Removes `id`'s log row for `seq` unless a device of it still waits for the
    /// frame, and the frame itself once no log holds it.
    fn unlog(&mut self, t: &mut Tables, id: u32, seq: u64) -> Result<bool, redb::Error> {
        if self.awaited(t, id, seq)? {
            return Ok(false);
        }
        let Some(len) = t.log.remove((id, seq))?.map(|l| l.value() as usize) else {
            return Ok(false);
        };
        if let Some(u) = self.logs.get_mut(&id) {
            u.sub(len);
            if u.messages == 0 {
                self.logs.remove(&id);
            }
        }
        self.kept.sub(len);
        let parties = t
            .frames
            .get(seq)?
            .and_then(|f| Entry::decode(f.value()).map(|e| (e.author(), e.receiver)));
        if let Some((author, receiver)) = parties
            && t.log.get((author, seq))?.is_none()
            && t.log.get((receiver, seq))?.is_none()
        {
            t.frames.remove(seq)?;
        }
        Ok(true)
    }

    /// Prunes `id`'s oldest entries once its log is past its history bounds by a
    /// 64th (never one a device still waits for): down to the bounds in one pass, so
    /// a busy id costs one short range read every few dozen frames, not one a frame.
    fn bound(&mut self, t: &mut Tables, id: u32, history: &History) -> Result<(), redb::Error> {
        let slack = |max: u64| max.saturating_add(max / 64 + 1);
        let Some(u) = self.logs.get(&id).copied() else {
            return Ok(());
        };
        if u.messages <= slack(history.max_messages) && u.bytes <= slack(history.max_bytes) {
            return Ok(());
        }
        let over = |u: Usage| u.messages > history.max_messages || u.bytes > history.max_bytes;
        let excess = u.messages.saturating_sub(history.max_messages).max(1) as usize;
        let mut seqs = Vec::with_capacity(excess);
        // Bytes may call for more than the count does: read on until under both.
        for row in t
            .log
            .range((id, 0)..=(id, u64::MAX))?
            .take(excess.max(64) * 2)
        {
            seqs.push(row?.0.value().1);
        }
        for seq in seqs {
            if !self.logs.get(&id).copied().is_some_and(over) {
                break;
            }
            self.unlog(t, id, seq)?;
        }
        Ok(())
    }

    /// Prunes frames accepted before `cutoff` (ms since the epoch), at most `max` of
    /// them: from both logs, unless a device still waits for them (those go when
    /// delivered). Returns how many frames it looked at.
    pub fn age(&mut self, t: &mut Tables, cutoff: u64, max: usize) -> Result<usize, redb::Error> {
        let mut old = Vec::new();
        for row in t.frames.range(self.aged..)?.take(max) {
            let (seq, value) = row?;
            let Some(e) = Entry::decode(value.value()) else {
                continue;
            };
            if e.time >= cutoff {
                break;
            }
            old.push((seq.value(), e.author(), e.receiver));
        }
        for &(seq, author, receiver) in &old {
            self.unlog(t, author, seq)?;
            self.unlog(t, receiver, seq)?;
            self.aged = seq + 1;
        }
        Ok(old.len())
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

    /// What a device's session learns when it starts: the `sync` record.
    pub fn sync(&self, t: &mut Tables, e: Endpoint, new: bool) -> Result<Record, redb::Error> {
        let mut range = t.log.range((e.id, 0)..=(e.id, u64::MAX))?;
        let oldest = range.next().transpose()?.map_or(0, |r| r.0.value().1);
        let head = range
            .next_back()
            .transpose()?
            .map_or(oldest, |r| r.0.value().1);
        drop(range);
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
    pub fn forget(
        &mut self,
        t: &mut Tables,
        e: Endpoint,
        history: &History,
    ) -> Result<(), redb::Error> {
        let mut seqs = Vec::new();
        for row in t
            .inbox
            .range((e.id, e.device, 0)..=(e.id, e.device, u64::MAX))?
        {
            seqs.push(row?.0.value().2);
        }
        for seq in seqs {
            self.delivered(t, e, seq, history)?;
        }
        t.devices.remove((e.id, e.device))?;
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

    /// Answers a session's query: the frames and records to send, in order.
    pub fn query(&mut self, t: &mut Tables, id: u32, query: &Query) -> Result<Answer, redb::Error> {
        t.flush()?;
        match *query {
            Query::History {
                request,
                conversation,
                before,
                limit,
            } => self.history(t, id, request, conversation, before, limit),
            Query::Conversations {
                request,
                before,
                limit,
            } => self.conversations(t, id, request, before, limit),
            Query::Read {
                request,
                conversation,
                upto,
            } => self.read(t, id, request, conversation, upto),
        }
    }

    fn history(
        &self,
        t: &Tables,
        id: u32,
        request: u32,
        conversation: u32,
        before: Before,
        limit: u16,
    ) -> Result<Answer, redb::Error> {
        let end = match before {
            Before::Newest => u64::MAX,
            Before::Offset(o) => o,
        };
        let mut frames = Vec::new();
        let mut bytes = 0;
        let mut next = 0;
        let mut more = false;
        for (scanned, row) in t.log.range((id, 0)..(id, end))?.rev().enumerate() {
            let seq = row?.0.value().1;
            if frames.len() >= usize::from(limit.min(MAX_PAGE))
                || scanned >= SCAN_LIMIT
                || bytes >= ANSWER_BYTES
            {
                more = true;
                break;
            }
            next = seq;
            let Some(value) = t.frames.get(seq)? else {
                continue;
            };
            let Some(entry) = Entry::decode(value.value()) else {
                continue;
            };
            if entry.conversation_of(id) != conversation {
                continue;
            }
            bytes += entry.wire.len();
            frames.push(
                entry
                    .envelope(id, seq, What::Page, request)
                    .wrap(entry.wire),
            );
        }
        let next = if more { next } else { 0 };
        frames.push(
            Record::PageEnd {
                request,
                more,
                next,
            }
            .encode(),
        );
        Ok(Answer::Frames(frames))
    }

    fn conversations(
        &self,
        t: &Tables,
        id: u32,
        request: u32,
        before: Before,
        limit: u16,
    ) -> Result<Answer, redb::Error> {
        let end = match before {
            Before::Newest => u64::MAX,
            Before::Offset(o) => o,
        };
        let mut rows = Vec::new();
        for row in t
            .conversations
            .range((id, 0)..=(id, u32::MAX))?
            .take(SCAN_LIMIT)
        {
            let (key, value) = row?;
            if let Some(c) = ConversationRow::decode(value.value())
                && c.last < end
            {
                rows.push((key.value().1, c));
            }
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.1.last));
        let limit = usize::from(limit.min(MAX_PAGE));
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more {
            rows.last().map_or(0, |r| r.1.last)
        } else {
            0
        };
        let mut frames: Vec<Bytes> = rows
            .into_iter()
            .map(|(peer, c)| {
                Record::Conversation {
                    request,
                    peer,
                    last: c.last,
                    time: c.time,
                    unread: c.unread,
                    read: c.read,
                }
                .encode()
            })
            .collect();
        frames.push(
            Record::PageEnd {
                request,
                more,
                next,
            }
            .encode(),
        );
        Ok(Answer::Frames(frames))
    }

    fn read(
        &self,
        t: &mut Tables,
        id: u32,
        request: u32,
        conversation: u32,
        upto: u64,
    ) -> Result<Answer, redb::Error> {
        let Some(mut row) = t
            .conversations
            .get((id, conversation))?
            .and_then(|r| ConversationRow::decode(r.value()))
        else {
            let why = format!("id {id} has no conversation with {conversation}");
            return Ok(Answer::Frames(vec![
                Record::QueryFailed { request, why }.encode(),
            ]));
        };
        let upto = upto.min(row.last);
        if upto > row.read {
            row.read = upto;
            let mut unread = 0u32;
            for r in t
                .log
                .range((id, upto + 1)..=(id, row.last))?
                .take(SCAN_LIMIT)
            {
                let seq = r?.0.value().1;
                let Some(value) = t.frames.get(seq)? else {
                    continue;
                };
                if let Some(entry) = Entry::decode(value.value())
                    && entry.conversation_of(id) == conversation
                    && entry.author() != id
                {
                    unread = unread.saturating_add(1);
                }
            }
            row.unread = unread;
            t.conversations
                .insert((id, conversation), &row.encode()[..])?;
        }
        Ok(Answer::Read(Record::Read {
            conversation,
            upto: row.read,
            unread: row.unread,
        }))
    }
}

/// What a query comes to.
#[derive(Debug)]
pub enum Answer {
    /// Frames for the asking connection only.
    Frames(Vec<Bytes>),
    /// A read marker, for every session of the id.
    Read(Record),
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

impl History {
    /// The oldest acceptance time kept at `now` (ms since the epoch).
    pub fn cutoff(&self, now: u64) -> Option<u64> {
        self.on().then(|| {
            now.saturating_sub(u64::try_from(self.max_age.as_millis()).unwrap_or(u64::MAX))
        })
    }
}

impl Default for History {
    fn default() -> History {
        History {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_messages: 50_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}
