//! History: every conversation's messages, kept after delivery, in blocks.
//!
//! A conversation (two ids) keeps its messages in blocks of up to [`BLOCK_ENTRIES`]
//! entries or [`BLOCK_BYTES`], each one row of `history` keyed by (the lower id, the
//! higher id, the block's first sequence number), and one row of `blocks` keyed by that
//! first number, which orders blocks by age for pruning and says how much each holds.
//! A commit rewrites the newest block of each conversation it touched, once, however
//! many frames it adds: the cost of history is a row or two per conversation per
//! commit, not rows per frame, which is what lets a busy server keep every frame (a
//! B-tree insert per frame made the store the bottleneck: BENCHMARKS.md).
//!
//! Entries are taken in the order the broker sent the frames (the order of their
//! numbers), when they reach the store, before any is held back for its delivery, so
//! each block is in order and blocks follow each other. A frame refused by the store
//! (`mailbox-full`, a failed write) leaves the history before it is written.

// redb's error type is large; it is built at most once per failed transaction.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use byteorder::{BigEndian, ByteOrder};
use bytes::Bytes;
use redb::ReadableTable;

use super::History;
use super::log::{Tables, Usage};
use super::tables::{BlockMeta, ConversationRow, Entry, NOT_OURS, block_entries, push_entry};
use crate::protocol::session::{Before, MAX_PAGE, Query, Record, What};

/// How many entries one query may look at before it answers with what it found (and
/// `more`), so no query holds the store for long.
pub const SCAN_LIMIT: usize = 20_000;
/// The most bytes of frames one query's answer holds (at least one frame).
pub const ANSWER_BYTES: usize = 1024 * 1024;

/// What a query comes to.
#[derive(Debug)]
pub enum Answer {
    /// Frames for the asking connection only.
    Frames(Vec<Bytes>),
    /// A read marker, for every session of the id.
    Read(Record),
}

/// Entries in one block, at most.
pub const BLOCK_ENTRIES: u32 = 256;
/// Bytes of one block, at most (a larger frame has a block of its own).
pub const BLOCK_BYTES: usize = 32 * 1024;

/// The key of a conversation between `a` and `b`.
pub fn pair(a: u32, b: u32) -> (u32, u32) {
    (a.min(b), a.max(b))
}

/// What history keeps in memory: how much each conversation holds, and the entries
/// taken since the last commit.
#[derive(Debug, Default, Clone)]
pub struct Kept {
    /// Entries and bytes of each conversation.
    pub conversations: HashMap<(u32, u32), Usage>,
    /// The sum of `conversations`.
    pub total: Usage,
    /// Entries taken and not yet written, by conversation, in order.
    pending: BTreeMap<u64, Pending>,
}

#[derive(Debug, Clone)]
struct Pending {
    time: u64,
    receiver: u32,
    origin: u16,
    wire: Bytes,
}

impl Kept {
    /// Reads how much each conversation holds (a row per block).
    pub fn scan(txn: &redb::ReadTransaction) -> Result<Kept, redb::Error> {
        let mut kept = Kept::default();
        let blocks = match txn.open_table(super::tables::BLOCKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(kept),
            Err(e) => return Err(e.into()),
        };
        for row in blocks.iter()? {
            let (_, meta) = row?;
            if let Some(m) = BlockMeta::decode(meta.value()) {
                let u = kept.conversations.entry((m.lo, m.hi)).or_default();
                u.messages += u64::from(m.count);
                u.bytes += m.bytes;
                kept.total.messages += u64::from(m.count);
                kept.total.bytes += m.bytes;
            }
        }
        Ok(kept)
    }

    /// Takes a frame into history, to be written with the next commit.
    pub fn take(&mut self, seq: u64, time: u64, receiver: u32, origin: Option<u16>, wire: Bytes) {
        let origin = origin.unwrap_or(NOT_OURS);
        self.pending.insert(
            seq,
            Pending {
                time,
                receiver,
                origin,
                wire,
            },
        );
    }

    /// A frame taken that the store refused: it leaves history.
    pub fn drop_refused(&mut self, seq: u64) {
        self.pending.remove(&seq);
    }

    /// Forgets what was taken and not written (its commit failed).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// How many frames were taken and not yet written.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes what was taken with numbers below `below`: into each conversation's
    /// newest block, and new blocks past it; notes each conversation's newest message
    /// and unread count; prunes the conversations that went past their bounds.
    pub fn flush(
        &mut self,
        t: &mut Tables,
        history: &History,
        below: u64,
    ) -> Result<(), redb::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let later = self.pending.split_off(&below);
        let taken = std::mem::replace(&mut self.pending, later);
        let mut by_pair: HashMap<(u32, u32), Vec<(u64, Pending)>> = HashMap::new();
        for (seq, p) in taken {
            let author = Entry::author_of(&p.wire);
            by_pair
                .entry(pair(author, p.receiver))
                .or_default()
                .push((seq, p));
        }
        for (key, entries) in by_pair {
            if let Some((seq, last)) = entries.last() {
                let author = Entry::author_of(&last.wire);
                let unread = entries
                    .iter()
                    .filter(|(_, p)| Entry::author_of(&p.wire) == author)
                    .count() as u32;
                let other_unread = entries.len() as u32 - unread;
                converse(t, last.receiver, author, *seq, last.time, unread)?;
                converse(t, author, last.receiver, *seq, last.time, other_unread)?;
            }
            self.write_blocks(t, key, entries, history)?;
            self.bound(t, key, history)?;
        }
        Ok(())
    }

    fn write_blocks(
        &mut self,
        t: &mut Tables,
        key: (u32, u32),
        entries: Vec<(u64, Pending)>,
        history: &History,
    ) -> Result<(), redb::Error> {
        let (lo, hi) = key;
        // The newest block, if it has room.
        let mut block: Option<(u64, Vec<u8>, BlockMeta)> = None;
        let newest = t
            .history
            .range((lo, hi, 0)..=(lo, hi, u64::MAX))?
            .next_back()
            .transpose()?
            .map(|(k, v)| (k.value().2, v.value().to_vec()));
        if let Some((first, bytes)) = newest
            && let Some(meta) = t
                .blocks
                .get(first)?
                .and_then(|m| BlockMeta::decode(m.value()))
        {
            block = Some((first, bytes, meta));
        }
        let span = block_span(history);
        for (seq, p) in entries {
            let len = p.wire.len();
            let fits = block.as_ref().is_some_and(|(_, bytes, meta)| {
                meta.count < BLOCK_ENTRIES
                    && bytes.len() + len <= BLOCK_BYTES
                    && first_time(bytes).is_some_and(|t| p.time.saturating_sub(t) < span)
            });
            if !fits {
                if let Some((first, bytes, meta)) = block.take() {
                    write_block(t, (lo, hi), first, &bytes, &meta)?;
                }
                block = Some((
                    seq,
                    Vec::with_capacity(BLOCK_BYTES.min(len + 64)),
                    BlockMeta {
                        lo,
                        hi,
                        last_time: 0,
                        count: 0,
                        bytes: 0,
                    },
                ));
            }
            if let Some((_, bytes, meta)) = &mut block {
                push_entry(bytes, seq, p.time, p.origin, &p.wire);
                meta.count += 1;
                meta.bytes += len as u64;
                meta.last_time = p.time;
            }
            let u = self.conversations.entry(key).or_default();
            u.messages += 1;
            u.bytes += len as u64;
            self.total.messages += 1;
            self.total.bytes += len as u64;
        }
        if let Some((first, bytes, meta)) = block {
            write_block(t, (lo, hi), first, &bytes, &meta)?;
        }
        Ok(())
    }

    /// Drops a conversation's oldest blocks once it is past its bounds by a 64th, until
    /// it is within them.
    fn bound(
        &mut self,
        t: &mut Tables,
        key: (u32, u32),
        history: &History,
    ) -> Result<(), redb::Error> {
        let slack = |max: u64| max.saturating_add(max / 64 + 1);
        let over = |u: Usage| u.messages > history.max_messages || u.bytes > history.max_bytes;
        let Some(u) = self.conversations.get(&key).copied() else {
            return Ok(());
        };
        if u.messages <= slack(history.max_messages) && u.bytes <= slack(history.max_bytes) {
            return Ok(());
        }
        let (lo, hi) = key;
        // The oldest blocks that bring it within its bounds, and one more: each row read
        // is a whole block from the disk, so the walk stops there rather than reading
        // the conversation (which made pruning the store's largest cost).
        let mut firsts = Vec::new();
        let mut dropping = Usage::default();
        for row in t.history.range((lo, hi, 0)..=(lo, hi, u64::MAX))? {
            let first = row?.0.value().2;
            firsts.push(first);
            let left = Usage {
                messages: u.messages.saturating_sub(dropping.messages),
                bytes: u.bytes.saturating_sub(dropping.bytes),
            };
            if !over(left) || firsts.len() > 1024 {
                break;
            }
            if let Some(meta) = t
                .blocks
                .get(first)?
                .and_then(|m| BlockMeta::decode(m.value()))
            {
                dropping.messages += u64::from(meta.count);
                dropping.bytes += meta.bytes;
            }
        }
        // The last one read stays: it is past what must go, or it is the newest block,
        // which stays whatever the bounds say. Each of the others was needed.
        firsts.pop();
        for first in firsts {
            self.drop_block(t, first)?;
        }
        Ok(())
    }

    fn drop_block(&mut self, t: &mut Tables, first: u64) -> Result<(), redb::Error> {
        let Some(meta) = t
            .blocks
            .remove(first)?
            .and_then(|m| BlockMeta::decode(m.value()))
        else {
            return Ok(());
        };
        t.history.remove((meta.lo, meta.hi, first))?;
        let key = (meta.lo, meta.hi);
        if let Some(u) = self.conversations.get_mut(&key) {
            u.messages = u.messages.saturating_sub(u64::from(meta.count));
            u.bytes = u.bytes.saturating_sub(meta.bytes);
            if u.messages == 0 {
                self.conversations.remove(&key);
            }
        }
        self.total.messages = self.total.messages.saturating_sub(u64::from(meta.count));
        self.total.bytes = self.total.bytes.saturating_sub(meta.bytes);
        Ok(())
    }

    /// Drops blocks whose newest entry was accepted before `cutoff` (ms), oldest first,
    /// at most `max` of them; returns how many it dropped.
    pub fn age(&mut self, t: &mut Tables, cutoff: u64, max: usize) -> Result<usize, redb::Error> {
        let mut old = Vec::new();
        for row in t.blocks.range(0..)?.take(max) {
            let (first, meta) = row?;
            let Some(m) = BlockMeta::decode(meta.value()) else {
                continue;
            };
            if m.last_time >= cutoff {
                // Blocks are in order of their first entry, not their last: a block
                // still being filled keeps those behind it, for at most its span.
                break;
            }
            old.push(first.value());
        }
        for &first in &old {
            self.drop_block(t, first)?;
        }
        Ok(old.len())
    }

    /// The entries and bytes of `id`'s conversations, and its rows in the list.
    pub fn measure(&self, t: &Tables, id: u32) -> Result<(Usage, u64), redb::Error> {
        let mut kept = Usage::default();
        for (_, u) in self
            .conversations
            .iter()
            .filter(|(k, _)| k.0 == id || k.1 == id)
        {
            kept.messages += u.messages;
            kept.bytes += u.bytes;
        }
        let rows = t.conversations.range((id, 0)..=(id, u32::MAX))?.count() as u64;
        Ok((kept, rows))
    }

    /// Deletes `id`'s conversations: their blocks, the id's rows in the list and the
    /// peers' rows for it. What history took and has not written must be flushed
    /// first (it would write the blocks again).
    pub fn forget_id(&mut self, t: &mut Tables, id: u32) -> Result<(), redb::Error> {
        let mut peers: Vec<u32> = self
            .conversations
            .keys()
            .filter(|k| k.0 == id || k.1 == id)
            .map(|&(lo, hi)| if lo == id { hi } else { lo })
            .collect();
        for row in t.conversations.range((id, 0)..=(id, u32::MAX))? {
            peers.push(row?.0.value().1);
        }
        peers.sort_unstable();
        peers.dedup();
        for peer in peers {
            let (lo, hi) = pair(id, peer);
            let mut firsts = Vec::new();
            for row in t.history.range((lo, hi, 0)..=(lo, hi, u64::MAX))? {
                firsts.push(row?.0.value().2);
            }
            for first in firsts {
                self.drop_block(t, first)?;
                // A block whose meta row is missing still goes.
                t.history.remove((lo, hi, first))?;
            }
            t.conversations.remove((id, peer))?;
            t.conversations.remove((peer, id))?;
        }
        Ok(())
    }

    /// The oldest number history keeps (0: none).
    pub fn oldest(&self, t: &Tables) -> Result<u64, redb::Error> {
        Ok(t.blocks.first()?.map_or(0, |(k, _)| k.value()))
    }

    /// Answers a session's query about `id`'s history.
    pub fn query(&mut self, t: &mut Tables, id: u32, query: &Query) -> Result<Answer, redb::Error> {
        match *query {
            Query::History {
                request,
                conversation,
                before,
                limit,
            } => page(t, id, request, conversation, before, limit),
            Query::Conversations {
                request,
                before,
                limit,
            } => conversations(t, id, request, before, limit),
            Query::Read {
                request,
                conversation,
                upto,
            } => read(t, id, request, conversation, upto),
        }
    }

    /// The newest offset of `id`'s conversations (0: none).
    pub fn head(&self, t: &Tables, id: u32) -> Result<u64, redb::Error> {
        let mut head = 0;
        for row in t
            .conversations
            .range((id, 0)..=(id, u32::MAX))?
            .take(SCAN_LIMIT)
        {
            if let Some(c) = ConversationRow::decode(row?.1.value()) {
                head = head.max(c.last);
            }
        }
        Ok(head)
    }
}

/// How long one block may span, from its first entry to its last: a day, or a 32nd
/// of the age history keeps when that is shorter. Age pruning goes block by block in
/// the order of their first entries, so a message goes at most this long after its age.
fn block_span(history: &History) -> u64 {
    let age = u64::try_from(history.max_age.as_millis()).unwrap_or(u64::MAX);
    (age / 32).clamp(1, 24 * 3600 * 1000)
}

/// The time of a block's first entry (see [`super::tables::push_entry`]).
fn first_time(block: &[u8]) -> Option<u64> {
    block.get(8..16).map(BigEndian::read_u64)
}

/// An answer's frames, ended by its `page-end`.
fn ended(mut frames: Vec<Bytes>, request: u32, more: bool, next: u64) -> Answer {
    frames.push(
        Record::PageEnd {
            request,
            more,
            next,
        }
        .encode(),
    );
    Answer::Frames(frames)
}

/// The number a page ends below.
fn end(before: Before) -> u64 {
    match before {
        Before::Newest => u64::MAX,
        Before::Offset(o) => o,
    }
}

fn write_block(
    t: &mut Tables,
    (lo, hi): (u32, u32),
    first: u64,
    bytes: &[u8],
    meta: &BlockMeta,
) -> Result<(), redb::Error> {
    t.history.insert((lo, hi, first), bytes)?;
    t.blocks.insert(first, &meta.encode()[..])?;
    Ok(())
}

/// Notes the newest message of `id`'s conversation with `peer`, and `unread` more
/// messages from the peer.
fn converse(
    t: &mut Tables,
    id: u32,
    peer: u32,
    seq: u64,
    time: u64,
    unread: u32,
) -> Result<(), redb::Error> {
    let mut row = t
        .conversations
        .get((id, peer))?
        .and_then(|r| ConversationRow::decode(r.value()))
        .unwrap_or_default();
    row.last = seq;
    row.time = time;
    row.unread = row.unread.saturating_add(unread);
    t.conversations.insert((id, peer), &row.encode()[..])?;
    Ok(())
}

/// Up to `limit` messages of `id`'s conversation with `conversation` before `before`,
/// newest first, then `page-end`.
fn page(
    t: &Tables,
    id: u32,
    request: u32,
    conversation: u32,
    before: Before,
    limit: u16,
) -> Result<Answer, redb::Error> {
    let end = end(before);
    let (lo, hi) = pair(id, conversation);
    let limit = usize::from(limit.min(MAX_PAGE));
    let mut frames = Vec::new();
    let mut bytes = 0;
    let mut looked = 0;
    let mut next = 0;
    let mut more = false;
    'blocks: for row in t.history.range((lo, hi, 0)..(lo, hi, end))?.rev() {
        let (_, block) = row?;
        let entries = block_entries(block.value());
        for (seq, time, _, wire) in entries.into_iter().rev() {
            if seq >= end {
                continue;
            }
            if frames.len() >= limit || looked >= SCAN_LIMIT || bytes >= ANSWER_BYTES {
                more = true;
                break 'blocks;
            }
            looked += 1;
            next = seq;
            bytes += wire.len();
            let entry = Entry {
                time,
                receiver: if Entry::author_of(wire) == lo { hi } else { lo },
                origin: NOT_OURS,
                wire,
            };
            frames.push(entry.envelope(id, seq, What::Page, request).wrap(wire));
        }
    }
    let next = if more { next } else { 0 };
    Ok(ended(frames, request, more, next))
}

fn conversations(
    t: &Tables,
    id: u32,
    request: u32,
    before: Before,
    limit: u16,
) -> Result<Answer, redb::Error> {
    let end = end(before);
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
    let frames: Vec<Bytes> = rows
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
    Ok(ended(frames, request, more, next))
}

/// Moves `id`'s read marker in its conversation with `conversation` forward to
/// `upto` (at most its last message) and counts what is unread after it.
fn read(
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
        let (lo, hi) = pair(id, conversation);
        let mut unread = 0u32;
        let mut looked = 0;
        'blocks: for block in t.history.range((lo, hi, 0)..=(lo, hi, u64::MAX))?.rev() {
            let (_, block) = block?;
            for (seq, _, _, wire) in block_entries(block.value()).into_iter().rev() {
                looked += 1;
                if seq <= upto || looked > SCAN_LIMIT {
                    break 'blocks;
                }
                if Entry::author_of(wire) != id {
                    unread = unread.saturating_add(1);
                }
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
