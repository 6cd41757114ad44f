//! The embedded store's tables and the bytes of their rows.
//!
//! One redb file holds, per id:
//!
//! | table | key | value |
//! |---|---|---|
//! | `frames` | seq | [`Entry`]: time, receiver, the author's device, the frame |
//! | `inbox` | (id, device, seq) | nothing: frame `seq` waits for that device |
//! | `devices` | (id, device) | [`DeviceRow`]: its name, when last seen, frames it missed |
//! | `history` | (lower id, higher id, first seq) | a block of a conversation's entries ([`push_entry`]) |
//! | `blocks` | first seq | [`BlockMeta`]: whose block, its newest time, entries, bytes |
//! | `conversations` | (id, peer) | [`ConversationRow`]: last message, read marker, unread |
//! | `meta` | name | a number (the highest sequence number handed out) |
//!
//! Delivery and history are apart. A frame some device has yet to receive is in
//! `frames`, with an `inbox` row for each such device; delivering it to a device removes
//! that row, and the frame goes with its last one. A frame delivered live before it was
//! due to be written never reaches `frames`. History keeps every frame, delivered or
//! not, in its conversation's blocks ([`super::history`]). Sequence numbers are the
//! broker's, unique and increasing across the node, so a frame has one number for both
//! ids, and the numbers follow time.
//!
//! The previous release kept only `mailbox` (receiver, seq) -> frame: see
//! [`super::upgrade`].

use byteorder::{BigEndian, ByteOrder};
use redb::TableDefinition;

use crate::protocol::session::{Envelope, What};

/// seq -> [`Entry`].
pub const FRAMES: TableDefinition<u64, &[u8]> = TableDefinition::new("frames");
/// (lower id, higher id, first seq) -> a block of entries.
pub const HISTORY: TableDefinition<(u32, u32, u64), &[u8]> = TableDefinition::new("history");
/// first seq -> [`BlockMeta`].
pub const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
/// name -> number.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (id, device, seq) -> (): frame `seq` of `id`'s log waits for that device.
pub const INBOX: TableDefinition<(u32, u16, u64), ()> = TableDefinition::new("inbox");
/// (id, device) -> [`DeviceRow`].
pub const DEVICES: TableDefinition<(u32, u16), &[u8]> = TableDefinition::new("devices");
/// (id, peer) -> [`ConversationRow`].
pub const CONVERSATIONS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("conversations");
/// The previous release's table: (receiver, seq) -> frame. Emptied by the upgrade.
pub const MAILBOX: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("mailbox");
/// One row written to prove that writes work again after a fault.
pub const PROBE: TableDefinition<&str, u64> = TableDefinition::new("probe");

/// The device number of a connection that named none: the seed's client, and every
/// client that binds without a session.
pub const DEFAULT_DEVICE: u16 = 0;
/// [`Entry::origin`] of a frame another id wrote.
pub const NOT_OURS: u16 = crate::ids::NO_DEVICE;

const ENTRY_HEAD: usize = 14;

/// A stored frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// When the server accepted it, ms since the Unix epoch.
    pub time: u64,
    /// Whom it was sent to.
    pub receiver: u32,
    /// The device of its sender that sent it, or [`NOT_OURS`] (a client without a
    /// session).
    pub origin: u16,
    /// The frame in the server -> client encoding.
    pub wire: &'a [u8],
}

impl<'a> Entry<'a> {
    pub fn encode(&self, dst: &mut Vec<u8>) {
        dst.clear();
        dst.extend_from_slice(&self.time.to_be_bytes());
        dst.extend_from_slice(&self.receiver.to_be_bytes());
        dst.extend_from_slice(&self.origin.to_be_bytes());
        dst.extend_from_slice(self.wire);
    }

    /// `None` for a row too short to be an entry (a damaged file).
    pub fn decode(bytes: &'a [u8]) -> Option<Entry<'a>> {
        (bytes.len() >= ENTRY_HEAD).then(|| Entry {
            time: BigEndian::read_u64(&bytes[0..8]),
            receiver: BigEndian::read_u32(&bytes[8..12]),
            origin: BigEndian::read_u16(&bytes[12..14]),
            wire: &bytes[ENTRY_HEAD..],
        })
    }

    /// The frame's author (its wire's sender).
    pub fn author(&self) -> u32 {
        Entry::author_of(self.wire)
    }

    /// The sender of a frame in the server -> client encoding.
    pub fn author_of(wire: &[u8]) -> u32 {
        wire.get(0..4).map_or(0, BigEndian::read_u32)
    }

    /// Whom `id` talks with in this frame: the other party.
    pub fn conversation_of(&self, id: u32) -> u32 {
        match self.author() {
            author if author == id => self.receiver,
            author => author,
        }
    }

    /// Its envelope in `id`'s log, as `what`, for query `request` (0: a delivery).
    pub fn envelope(&self, id: u32, seq: u64, what: What, request: u32) -> Envelope {
        let what = match what {
            What::Delivery if self.author() == id => What::Carbon,
            other => other,
        };
        Envelope {
            what,
            offset: seq,
            time: self.time,
            conversation: self.conversation_of(id),
            request,
        }
    }

    /// Bytes the entry takes in the log.
    #[cfg(test)]
    pub fn stored_len(wire_len: usize) -> usize {
        ENTRY_HEAD + wire_len
    }
}

/// Appends an entry to a block's bytes: `seq u64 | time u64 | origin u16 | len u32 |
/// frame`.
pub fn push_entry(block: &mut Vec<u8>, seq: u64, time: u64, origin: u16, wire: &[u8]) {
    block.extend_from_slice(&seq.to_be_bytes());
    block.extend_from_slice(&time.to_be_bytes());
    block.extend_from_slice(&origin.to_be_bytes());
    block.extend_from_slice(&(wire.len() as u32).to_be_bytes());
    block.extend_from_slice(wire);
}

/// A block's entries, in order: (seq, time, origin, frame). A damaged tail is left
/// out.
pub fn block_entries(mut block: &[u8]) -> Vec<(u64, u64, u16, &[u8])> {
    let mut entries = Vec::new();
    while block.len() >= 22 {
        let seq = BigEndian::read_u64(&block[0..8]);
        let time = BigEndian::read_u64(&block[8..16]);
        let origin = BigEndian::read_u16(&block[16..18]);
        let len = BigEndian::read_u32(&block[18..22]) as usize;
        let Some(wire) = block.get(22..22 + len) else {
            break;
        };
        entries.push((seq, time, origin, wire));
        block = &block[22 + len..];
    }
    entries
}

/// What a block of history holds, in `blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMeta {
    pub lo: u32,
    pub hi: u32,
    /// When its newest entry was accepted, ms since the epoch.
    pub last_time: u64,
    pub count: u32,
    /// Bytes of its frames.
    pub bytes: u64,
}

impl BlockMeta {
    pub fn encode(&self) -> [u8; 28] {
        let mut v = [0u8; 28];
        BigEndian::write_u32(&mut v[0..4], self.lo);
        BigEndian::write_u32(&mut v[4..8], self.hi);
        BigEndian::write_u64(&mut v[8..16], self.last_time);
        BigEndian::write_u32(&mut v[16..20], self.count);
        BigEndian::write_u64(&mut v[20..28], self.bytes);
        v
    }

    pub fn decode(bytes: &[u8]) -> Option<BlockMeta> {
        (bytes.len() >= 28).then(|| BlockMeta {
            lo: BigEndian::read_u32(&bytes[0..4]),
            hi: BigEndian::read_u32(&bytes[4..8]),
            last_time: BigEndian::read_u64(&bytes[8..16]),
            count: BigEndian::read_u32(&bytes[16..20]),
            bytes: BigEndian::read_u64(&bytes[20..28]),
        })
    }
}

/// A device of an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    /// ms since the Unix epoch.
    pub last_seen: u64,
    /// Frames for it that were dropped before it received them, not yet told.
    pub missed: u64,
    pub name: String,
}

impl DeviceRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.name.len());
        v.extend_from_slice(&self.last_seen.to_be_bytes());
        v.extend_from_slice(&self.missed.to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    pub fn decode(bytes: &[u8]) -> Option<DeviceRow> {
        (bytes.len() >= 16).then(|| DeviceRow {
            last_seen: BigEndian::read_u64(&bytes[0..8]),
            missed: BigEndian::read_u64(&bytes[8..16]),
            name: String::from_utf8_lossy(&bytes[16..]).into_owned(),
        })
    }
}

/// One conversation of an id: its newest message, and how far the id has read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConversationRow {
    pub last: u64,
    pub time: u64,
    pub read: u64,
    pub unread: u32,
}

impl ConversationRow {
    pub fn encode(&self) -> [u8; 28] {
        let mut v = [0u8; 28];
        BigEndian::write_u64(&mut v[0..8], self.last);
        BigEndian::write_u64(&mut v[8..16], self.time);
        BigEndian::write_u64(&mut v[16..24], self.read);
        BigEndian::write_u32(&mut v[24..28], self.unread);
        v
    }

    pub fn decode(bytes: &[u8]) -> Option<ConversationRow> {
        (bytes.len() >= 28).then(|| ConversationRow {
            last: BigEndian::read_u64(&bytes[0..8]),
            time: BigEndian::read_u64(&bytes[8..16]),
            read: BigEndian::read_u64(&bytes[16..24]),
            unread: BigEndian::read_u32(&bytes[24..28]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_and_short_ones_are_refused() {
        let wire = [0, 0, 0, 7, 1, 0, 0, 0, 2, b'h', b'i'];
        let e = Entry {
            time: 1_796_284_800_000,
            receiver: 5,
            origin: NOT_OURS,
            wire: &wire,
        };
        let mut v = Vec::new();
        e.encode(&mut v);
        assert_eq!(v.len(), Entry::stored_len(wire.len()));
        assert_eq!(Entry::decode(&v), Some(e));
        assert_eq!(Entry::decode(&v).map(|e| e.author()), Some(7));
        assert_eq!(e.conversation_of(5), 7);
        assert_eq!(e.conversation_of(7), 5);
        assert_eq!(e.envelope(7, 9, What::Delivery, 0).what, What::Carbon);
        assert_eq!(e.envelope(5, 9, What::Delivery, 0).what, What::Delivery);
        assert_eq!(Entry::decode(&v[..13]), None);
        let d = DeviceRow {
            last_seen: 5,
            missed: 3,
            name: "laptop".into(),
        };
        assert_eq!(DeviceRow::decode(&d.encode()), Some(d));
        assert_eq!(DeviceRow::decode(&[0; 15]), None);
        let c = ConversationRow {
            last: 9,
            time: 8,
            read: 4,
            unread: 2,
        };
        assert_eq!(ConversationRow::decode(&c.encode()), Some(c));
        assert_eq!(ConversationRow::decode(&[0; 27]), None);
        let m = BlockMeta {
            lo: 5,
            hi: 7,
            last_time: 9,
            count: 3,
            bytes: 300,
        };
        assert_eq!(BlockMeta::decode(&m.encode()), Some(m));
        assert_eq!(BlockMeta::decode(&[0; 27]), None);
    }

    #[test]
    fn a_block_reads_back_its_entries_and_leaves_out_a_damaged_tail() {
        let mut block = Vec::new();
        push_entry(&mut block, 10, 100, NOT_OURS, b"first");
        push_entry(&mut block, 12, 101, 3, b"");
        push_entry(&mut block, 15, 102, 0, b"third");
        let entries = block_entries(&block);
        assert_eq!(
            entries,
            vec![
                (10, 100, NOT_OURS, &b"first"[..]),
                (12, 101, 3, &b""[..]),
                (15, 102, 0, &b"third"[..])
            ]
        );
        assert_eq!(block_entries(&block[..block.len() - 1]).len(), 2);
        assert!(block_entries(&[]).is_empty());
    }
}
