//! The embedded store's tables and the bytes of their rows.
//!
//! One redb file holds, per id:
//!
//! | table | key | value |
//! |---|---|---|
//! | `frames` | seq | [`Entry`]: time, receiver, the author's device, the frame |
//! | `log` | (id, seq) | the entry's size: frame `seq` is in `id`'s log |
//! | `inbox` | (id, device, seq) | nothing: frame `seq` waits for that device |
//! | `devices` | (id, device) | [`DeviceRow`]: its name, when last seen, frames it missed |
//! | `conversations` | (id, peer) | [`ConversationRow`]: last message, read marker, unread |
//! | `meta` | name | a number (the highest sequence number handed out) |
//!
//! A frame is stored once, and listed in the log of each id it belongs to (the
//! receiver's; with history on, or when the sender's other devices are to get it, the
//! sender's too) and in the `inbox` of every device that has yet to receive it;
//! delivering it to a device removes that row. Without history a log row goes with the
//! id's last `inbox` row for it, and the frame with its last log row; with history they
//! stay until pruned. Sequence numbers are the broker's, unique and increasing across
//! the node, so a frame has one number in both logs, and the numbers follow time.
//!
//! The previous release kept only `mailbox` (receiver, seq) -> frame: see
//! [`super::upgrade`].

use byteorder::{BigEndian, ByteOrder};
use redb::TableDefinition;

use crate::protocol::session::{Envelope, What};

/// seq -> [`Entry`].
pub const FRAMES: TableDefinition<u64, &[u8]> = TableDefinition::new("frames");
/// (id, seq) -> the size of the entry: `seq` is in `id`'s log.
pub const LOG: TableDefinition<(u32, u64), u32> = TableDefinition::new("log");
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
    }
}
