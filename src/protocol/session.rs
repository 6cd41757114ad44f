//! The session wire: what a client that opts in (control operation 4) sends and
//! receives beyond the seed's frames, as plain values with their encodings.
//!
//! Sans-IO like the rest of [`crate::protocol`]: the server parses queries and encodes
//! envelopes and records here, and the library client does the reverse, so both sides
//! of the wire live in one file with one set of tests. docs/design/devices-and-history.md
//! says why each field is there; in short:
//!
//! ```text
//! session hello (op 4) body: version u8 | device_len u8 | device | token
//! message on a session:      sender u32 | type u8 | length u32 | envelope | payload
//!   envelope:                len u8 (26) | what u8 | offset u64 | time u64 | conversation u32 | request u32
//! record on a session:       0 u32 | 0 u8 | length u32 | kind u8 (< 0x20) | fields
//! ```
//!
//! Everything is fixed-width big-endian or length-prefixed UTF-8, so a Python client
//! reads it with `struct` and a JavaScript one with `DataView`. A record is told from a
//! notice (`code: detail`, always printable) by its first byte; a kind this code does
//! not know decodes as [`Record::Unknown`], so older clients skip newer records.

use std::fmt;

use byteorder::{BigEndian, ByteOrder};
use bytes::Bytes;

use super::{CONTROL, ClientFrame, SERVER_HEADER_LEN, SERVER_ID, ServerFrame, server_header};

/// Control operation: open a session (bind with a device name; acks, carbons and
/// envelopes on).
pub const OP_SESSION: u32 = 4;
/// Control operation: a page of one conversation's history.
pub const OP_HISTORY: u32 = 5;
/// Control operation: the list of conversations.
pub const OP_CONVERSATIONS: u32 = 6;
/// Control operation: move a conversation's read marker.
pub const OP_READ: u32 = 7;

/// The session version this code speaks.
pub const VERSION: u8 = 1;
/// Longest device name, in bytes.
pub const MAX_DEVICE_LEN: usize = 64;
/// Length of a message's envelope as this code writes it, between the header and the
/// payload. The envelope starts with its own length, so later fields can be appended
/// without a new session version: a reader skips what it does not know.
pub const ENVELOPE_LEN: usize = 26;
/// The fields this code reads; a longer envelope has more after them.
const ENVELOPE_MIN: usize = 26;
/// The most entries one query answers with, whatever its `limit`.
pub const MAX_PAGE: u16 = 100;

/// Why a session hello or a query's body was refused. The text is the detail of the
/// `bad-control` notice or `query-failed` record the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadBody {
    #[error("session version {0} is not supported (this server speaks {VERSION})")]
    Version(u8),
    #[error("a session body is version, device length, device, token: {0}")]
    Session(&'static str),
    #[error("a device name is 1 to {MAX_DEVICE_LEN} bytes of UTF-8 without control characters")]
    Device,
    #[error("operation {op}'s body is {want} bytes, not {got}")]
    Length { op: u32, want: usize, got: usize },
    #[error("a limit of 0 asks for nothing")]
    ZeroLimit,
    #[error("conversation {0} is not an id")]
    Conversation(u32),
    #[error("offset 0 is before every message: mark read up to an offset a message has")]
    ZeroOffset,
    #[error("request 0 is reserved for deliveries: number a query from 1")]
    ZeroRequest,
}

/// A device's name: the client's key for one place an id is signed in from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Device(String);

impl Device {
    pub fn new(name: &str) -> Result<Device, BadBody> {
        let ok = (1..=MAX_DEVICE_LEN).contains(&name.len()) && !name.chars().any(char::is_control);
        ok.then(|| Device(name.to_string())).ok_or(BadBody::Device)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The body of a session hello (control operation 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHello {
    pub device: Device,
    /// The auth token, as for hello; empty in open mode.
    pub token: Bytes,
}

impl SessionHello {
    pub fn parse(body: &Bytes) -> Result<SessionHello, BadBody> {
        let (&version, rest) = body.split_first().ok_or(BadBody::Session("empty"))?;
        if version != VERSION {
            return Err(BadBody::Version(version));
        }
        let (&len, rest) = rest
            .split_first()
            .ok_or(BadBody::Session("no device length"))?;
        let name = rest
            .get(..len as usize)
            .ok_or(BadBody::Session("shorter than its device length"))?;
        let name = std::str::from_utf8(name).map_err(|_| BadBody::Device)?;
        Ok(SessionHello {
            device: Device::new(name)?,
            token: body.slice(2 + len as usize..),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let name = self.device.as_str().as_bytes();
        let mut v = Vec::with_capacity(2 + name.len() + self.token.len());
        v.push(VERSION);
        // A Device is at most MAX_DEVICE_LEN (64) bytes.
        v.push(name.len() as u8);
        v.extend_from_slice(name);
        v.extend_from_slice(&self.token);
        v
    }
}

/// Where a page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// From the newest.
    Newest,
    /// From the one before this offset.
    Offset(u64),
}

impl Before {
    fn from_wire(offset: u64) -> Before {
        match offset {
            0 => Before::Newest,
            o => Before::Offset(o),
        }
    }

    fn to_wire(self) -> u64 {
        match self {
            Before::Newest => 0,
            Before::Offset(o) => o,
        }
    }
}

/// What a session asks besides sending frames (control operations 5-7). Every query
/// carries the client's number for it, `request`, from 1 (0 marks deliveries), which
/// the answer repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Up to `limit` (capped at [`MAX_PAGE`]) messages of the conversation with
    /// `conversation` before `before`, newest first, then a [`Record::PageEnd`].
    History {
        request: u32,
        conversation: u32,
        before: Before,
        limit: u16,
    },
    /// Up to `limit` conversations, the most recently active first, whose last message
    /// is before `before`, then a [`Record::PageEnd`].
    Conversations {
        request: u32,
        before: Before,
        limit: u16,
    },
    /// The id has read the conversation up to `upto`; every session of the id hears a
    /// [`Record::Read`].
    Read {
        request: u32,
        conversation: u32,
        upto: u64,
    },
}

impl Query {
    /// Parses the body of control operation `op`, if it is a query's operation.
    pub fn parse(op: u32, body: &[u8]) -> Option<Result<Query, BadBody>> {
        let want = match op {
            OP_HISTORY => 18,
            OP_CONVERSATIONS => 14,
            OP_READ => 16,
            _ => return None,
        };
        if body.len() != want {
            return Some(Err(BadBody::Length {
                op,
                want,
                got: body.len(),
            }));
        }
        let u32_at = |i: usize| BigEndian::read_u32(&body[i..i + 4]);
        let u64_at = |i: usize| BigEndian::read_u64(&body[i..i + 8]);
        let limit = |i: usize| match BigEndian::read_u16(&body[i..i + 2]) {
            0 => Err(BadBody::ZeroLimit),
            n => Ok(n.min(MAX_PAGE)),
        };
        let conversation = |i: usize| match u32_at(i) {
            SERVER_ID => Err(BadBody::Conversation(SERVER_ID)),
            c => Ok(c),
        };
        let parsed = (|| {
            let request = match u32_at(0) {
                0 => return Err(BadBody::ZeroRequest),
                r => r,
            };
            Ok(match op {
                OP_HISTORY => Query::History {
                    request,
                    conversation: conversation(4)?,
                    before: Before::from_wire(u64_at(8)),
                    limit: limit(16)?,
                },
                OP_CONVERSATIONS => Query::Conversations {
                    request,
                    before: Before::from_wire(u64_at(4)),
                    limit: limit(12)?,
                },
                _ => Query::Read {
                    request,
                    conversation: conversation(4)?,
                    upto: Some(u64_at(8))
                        .filter(|&o| o != 0)
                        .ok_or(BadBody::ZeroOffset)?,
                },
            })
        })();
        Some(parsed)
    }

    /// The client's number for this query.
    pub fn request(&self) -> u32 {
        match *self {
            Query::History { request, .. }
            | Query::Conversations { request, .. }
            | Query::Read { request, .. } => request,
        }
    }

    /// The number a body that failed to parse asked under, if it got that far (0
    /// otherwise), for its `query-failed` record.
    pub fn request_of(body: &[u8]) -> u32 {
        body.get(0..4).map_or(0, BigEndian::read_u32)
    }

    /// The control frame that asks this, from `sender`.
    pub fn frame(&self, sender: u32) -> ClientFrame {
        let mut body = Vec::with_capacity(18);
        body.extend_from_slice(&self.request().to_be_bytes());
        let op = match *self {
            Query::History {
                conversation,
                before,
                limit,
                ..
            } => {
                body.extend_from_slice(&conversation.to_be_bytes());
                body.extend_from_slice(&before.to_wire().to_be_bytes());
                body.extend_from_slice(&limit.to_be_bytes());
                OP_HISTORY
            }
            Query::Conversations { before, limit, .. } => {
                body.extend_from_slice(&before.to_wire().to_be_bytes());
                body.extend_from_slice(&limit.to_be_bytes());
                OP_CONVERSATIONS
            }
            Query::Read {
                conversation, upto, ..
            } => {
                body.extend_from_slice(&conversation.to_be_bytes());
                body.extend_from_slice(&upto.to_be_bytes());
                OP_READ
            }
        };
        ClientFrame {
            sender,
            receiver: op,
            kind: CONTROL,
            body: Bytes::from(body),
        }
    }
}

impl ClientFrame {
    /// A session hello for `sender` as `device`, with an auth token or nothing.
    pub fn session(sender: u32, device: &Device, token: &[u8]) -> ClientFrame {
        let hello = SessionHello {
            device: device.clone(),
            token: Bytes::copy_from_slice(token),
        };
        ClientFrame {
            sender,
            receiver: OP_SESSION,
            kind: CONTROL,
            body: Bytes::from(hello.encode()),
        }
    }
}

/// How a message reached a session: what the client counts for acks, and what it
/// shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// A frame for the id, from another id: counted by acks.
    Delivery,
    /// The answer to this connection's own frame: not counted.
    Echo,
    /// A frame another device of the id sent: counted by acks.
    Carbon,
    /// An entry of a query's answer: not counted.
    Page,
    /// A kind this code does not know: not counted.
    Other(u8),
}

impl What {
    fn to_wire(self) -> u8 {
        match self {
            What::Delivery => 0,
            What::Echo => 1,
            What::Carbon => 2,
            What::Page => 3,
            What::Other(n) => n,
        }
    }

    fn from_wire(n: u8) -> What {
        match n {
            0 => What::Delivery,
            1 => What::Echo,
            2 => What::Carbon,
            3 => What::Page,
            n => What::Other(n),
        }
    }

    /// Whether acks count it (see docs/PROTOCOL.md, acknowledged delivery).
    pub fn counted(self) -> bool {
        matches!(self, What::Delivery | What::Carbon)
    }
}

/// What a session learns about a message besides its author and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    pub what: What,
    /// Its position in this id's log; 0 for a frame that is not kept.
    pub offset: u64,
    /// When the server accepted it, in milliseconds since the Unix epoch.
    pub time: u64,
    /// Whom the id talks with in it: the peer (either direction) or a group.
    pub conversation: u32,
    /// The query's number for an entry of its answer; 0 otherwise.
    pub request: u32,
}

impl Envelope {
    pub fn encode(&self) -> [u8; ENVELOPE_LEN] {
        let mut e = [0u8; ENVELOPE_LEN];
        e[0] = ENVELOPE_LEN as u8;
        e[1] = self.what.to_wire();
        BigEndian::write_u64(&mut e[2..10], self.offset);
        BigEndian::write_u64(&mut e[10..18], self.time);
        BigEndian::write_u32(&mut e[18..22], self.conversation);
        BigEndian::write_u32(&mut e[22..26], self.request);
        e
    }

    /// The envelope at the start of a message's body, and where its payload starts.
    pub fn decode(bytes: &[u8]) -> Option<(Envelope, usize)> {
        let len = *bytes.first()? as usize;
        if len < ENVELOPE_MIN {
            return None;
        }
        let e = bytes.get(..len)?;
        let envelope = Envelope {
            what: What::from_wire(e[1]),
            offset: BigEndian::read_u64(&e[2..10]),
            time: BigEndian::read_u64(&e[10..18]),
            conversation: BigEndian::read_u32(&e[18..22]),
            request: BigEndian::read_u32(&e[22..26]),
        };
        Some((envelope, len))
    }

    /// `wire`, a frame in the server -> client encoding (`sender | type | length |
    /// payload`), as a session receives it: with this envelope before its payload.
    pub fn wrap(&self, wire: &[u8]) -> Bytes {
        let payload = wire.get(SERVER_HEADER_LEN..).unwrap_or_default();
        let mut v = Vec::with_capacity(SERVER_HEADER_LEN + ENVELOPE_LEN + payload.len());
        let len = u32::try_from(ENVELOPE_LEN + payload.len()).unwrap_or(u32::MAX);
        let sender = wire.get(0..4).map_or(0, BigEndian::read_u32);
        let kind = wire.get(4).copied().unwrap_or(CONTROL);
        v.extend_from_slice(&server_header(sender, kind, len));
        v.extend_from_slice(&self.encode());
        v.extend_from_slice(payload);
        Bytes::from(v)
    }
}

/// A server -> client frame as a session reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A message: its author, type, envelope and payload.
    Message {
        sender: u32,
        kind: u8,
        envelope: Envelope,
        payload: Bytes,
    },
    /// A notice, as [`ServerFrame::notice`] reads it.
    Notice(super::Notice),
    /// A record.
    Record(Record),
}

/// Why a frame on a session could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a message of {0} bytes does not hold a whole envelope")]
    Envelope(usize),
    #[error("a {kind} record of {len} bytes is too short")]
    Record { kind: &'static str, len: usize },
}

impl Received {
    /// Reads a frame received on a session.
    pub fn read(frame: ServerFrame) -> Result<Received, Malformed> {
        if frame.sender == SERVER_ID && frame.kind == CONTROL {
            return Ok(match frame.body.first() {
                Some(&kind) if kind < RECORD_KINDS_END => {
                    Received::Record(Record::decode(&frame.body)?)
                }
                _ => Received::Notice(super::Notice::parse(&frame.body)),
            });
        }
        let (envelope, start) =
            Envelope::decode(&frame.body).ok_or(Malformed::Envelope(frame.body.len()))?;
        Ok(Received::Message {
            sender: frame.sender,
            kind: frame.kind,
            envelope,
            payload: frame.body.slice(start..),
        })
    }
}

/// Record kinds are below this byte; a notice's code starts with a printable one.
const RECORD_KINDS_END: u8 = 0x20;

/// The server's structured answers on a session (type 0, sender 0, first byte < 0x20).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Sent once after the welcome, before the backlog. `new`: the server did not know
    /// this device (first session, or forgotten), so it has no backlog and what it
    /// holds locally may be stale. `head`: the log's newest offset; `oldest`: the
    /// oldest it keeps (pages end there). `backlog`: frames about to be delivered.
    /// `missed`: frames for this device dropped before it received them (0: nothing
    /// was lost).
    Sync {
        new: bool,
        head: u64,
        oldest: u64,
        backlog: u64,
        missed: u64,
    },
    /// The backlog is delivered: from here on, deliveries are live.
    Synced { head: u64 },
    /// Ends a query's answer; `more` says whether another page follows from `next`.
    PageEnd { request: u32, more: bool, next: u64 },
    /// One row of the conversation list.
    Conversation {
        request: u32,
        peer: u32,
        last: u64,
        time: u64,
        unread: u32,
        read: u64,
    },
    /// A conversation's read marker moved (on any device of the id).
    Read {
        conversation: u32,
        upto: u64,
        unread: u32,
    },
    /// A query was refused, and why.
    QueryFailed { request: u32, why: String },
    /// A kind this code does not know: skip it.
    Unknown { kind: u8, body: Bytes },
}

const SYNC: u8 = 1;
const SYNCED: u8 = 2;
const PAGE_END: u8 = 3;
const CONVERSATION: u8 = 4;
const READ: u8 = 5;
const QUERY_FAILED: u8 = 6;

impl Record {
    fn name(kind: u8) -> &'static str {
        match kind {
            SYNC => "sync",
            SYNCED => "synced",
            PAGE_END => "page-end",
            CONVERSATION => "conversation",
            READ => "read",
            QUERY_FAILED => "query-failed",
            _ => "unknown",
        }
    }

    /// The record as a whole server -> client frame.
    pub fn encode(&self) -> Bytes {
        let mut body = Vec::with_capacity(48);
        match self {
            Record::Sync {
                new,
                head,
                oldest,
                backlog,
                missed,
            } => {
                body.push(SYNC);
                body.push(u8::from(*new));
                for n in [head, oldest, backlog, missed] {
                    body.extend_from_slice(&n.to_be_bytes());
                }
            }
            Record::Synced { head } => {
                body.push(SYNCED);
                body.extend_from_slice(&head.to_be_bytes());
            }
            Record::PageEnd {
                request,
                more,
                next,
            } => {
                body.push(PAGE_END);
                body.extend_from_slice(&request.to_be_bytes());
                body.push(u8::from(*more));
                body.extend_from_slice(&next.to_be_bytes());
            }
            Record::Conversation {
                request,
                peer,
                last,
                time,
                unread,
                read,
            } => {
                body.push(CONVERSATION);
                body.extend_from_slice(&request.to_be_bytes());
                body.extend_from_slice(&peer.to_be_bytes());
                body.extend_from_slice(&last.to_be_bytes());
                body.extend_from_slice(&time.to_be_bytes());
                body.extend_from_slice(&unread.to_be_bytes());
                body.extend_from_slice(&read.to_be_bytes());
            }
            Record::Read {
                conversation,
                upto,
                unread,
            } => {
                body.push(READ);
                body.extend_from_slice(&conversation.to_be_bytes());
                body.extend_from_slice(&upto.to_be_bytes());
                body.extend_from_slice(&unread.to_be_bytes());
            }
            Record::QueryFailed { request, why } => {
                body.push(QUERY_FAILED);
                body.extend_from_slice(&request.to_be_bytes());
                body.extend_from_slice(why.as_bytes());
            }
            Record::Unknown { kind, body: rest } => {
                body.push(*kind);
                body.extend_from_slice(rest);
            }
        }
        ServerFrame {
            sender: SERVER_ID,
            kind: CONTROL,
            body: Bytes::from(body),
        }
        .to_bytes()
        .into()
    }

    /// Reads a record's body (its kind byte first).
    pub fn decode(body: &Bytes) -> Result<Record, Malformed> {
        let Some((&kind, fields)) = body.split_first() else {
            return Err(Malformed::Record {
                kind: "empty",
                len: 0,
            });
        };
        let want = match kind {
            SYNC => 33,
            SYNCED => 8,
            PAGE_END => 13,
            CONVERSATION => 36,
            READ => 16,
            QUERY_FAILED => 4,
            _ => 0,
        };
        if fields.len() < want {
            return Err(Malformed::Record {
                kind: Record::name(kind),
                len: body.len(),
            });
        }
        let u32_at = |i: usize| BigEndian::read_u32(&fields[i..i + 4]);
        let u64_at = |i: usize| BigEndian::read_u64(&fields[i..i + 8]);
        Ok(match kind {
            SYNC => Record::Sync {
                new: fields[0] != 0,
                head: u64_at(1),
                oldest: u64_at(9),
                backlog: u64_at(17),
                missed: u64_at(25),
            },
            SYNCED => Record::Synced { head: u64_at(0) },
            PAGE_END => Record::PageEnd {
                request: u32_at(0),
                more: fields[4] != 0,
                next: u64_at(5),
            },
            CONVERSATION => Record::Conversation {
                request: u32_at(0),
                peer: u32_at(4),
                last: u64_at(8),
                time: u64_at(16),
                unread: u32_at(24),
                read: u64_at(28),
            },
            READ => Record::Read {
                conversation: u32_at(0),
                upto: u64_at(4),
                unread: u32_at(12),
            },
            QUERY_FAILED => Record::QueryFailed {
                request: u32_at(0),
                why: String::from_utf8_lossy(&fields[4..]).into_owned(),
            },
            kind => Record::Unknown {
                kind,
                body: body.slice(1..),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FrameBuf;
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The byte examples of docs/PROTOCOL.md, "Sessions".
    #[test]
    fn the_documented_bytes() {
        let laptop = Device::new("laptop").expect("a name");
        assert_eq!(
            hex(&ClientFrame::session(5, &laptop, b"").to_bytes()),
            "00 00 00 05 00 00 00 04 00 00 00 00 08 01 06 6c 61 70 74 6f 70"
        );
        let hi = ServerFrame {
            sender: 7,
            kind: 1,
            body: Bytes::from_static(b"hi"),
        }
        .to_bytes();
        let envelope = Envelope {
            what: What::Delivery,
            offset: 1000,
            time: 1_796_284_800_000,
            conversation: 7,
            request: 0,
        };
        assert_eq!(
            hex(&envelope.wrap(&hi)),
            "00 00 00 07 01 00 00 00 1c 1a 00 00 00 00 00 00 00 03 e8 00 00 01 a2 3a ea dc 00 \
             00 00 00 07 00 00 00 00 68 69"
        );
        let sync = Record::Sync {
            new: false,
            head: 1200,
            oldest: 3,
            backlog: 40,
            missed: 0,
        };
        assert_eq!(
            hex(&sync.encode()),
            "00 00 00 00 00 00 00 00 22 01 00 00 00 00 00 00 00 04 b0 00 00 00 00 00 00 00 03 \
             00 00 00 00 00 00 00 28 00 00 00 00 00 00 00 00"
        );
        let history = Query::History {
            request: 1,
            conversation: 7,
            before: Before::Newest,
            limit: 20,
        };
        assert_eq!(
            hex(&history.frame(5).to_bytes()),
            "00 00 00 05 00 00 00 05 00 00 00 00 12 00 00 00 01 00 00 00 07 00 00 00 00 00 00 \
             00 00 00 14"
        );
    }

    #[test]
    fn session_bodies_are_checked() {
        let parse = |b: &[u8]| SessionHello::parse(&Bytes::copy_from_slice(b));
        assert_eq!(parse(b""), Err(BadBody::Session("empty")));
        assert_eq!(parse(&[2, 1, b'a']), Err(BadBody::Version(2)));
        assert_eq!(parse(&[1]), Err(BadBody::Session("no device length")));
        assert_eq!(
            parse(&[1, 5, b'a']),
            Err(BadBody::Session("shorter than its device length"))
        );
        assert_eq!(parse(&[1, 0]), Err(BadBody::Device));
        assert_eq!(parse(&[1, 1, b'\n']), Err(BadBody::Device));
        assert_eq!(parse(&[1, 2, 0xc3, 0x28]), Err(BadBody::Device));
        let long = [&[1u8, 65][..], &[b'x'; 65]].concat();
        assert_eq!(parse(&long), Err(BadBody::Device));
        let ok = parse(&[1, 2, b'p', b'c', b't', b'k']).expect("valid");
        assert_eq!(ok.device.as_str(), "pc");
        assert_eq!(&ok.token[..], b"tk");
    }

    #[test]
    fn queries_are_checked() {
        assert_eq!(Query::parse(2, &[]), None);
        assert_eq!(
            Query::parse(OP_READ, &[0; 3]),
            Some(Err(BadBody::Length {
                op: OP_READ,
                want: 16,
                got: 3
            }))
        );
        let history = |request: u32, limit: u16, conversation: u32| {
            Query::History {
                request,
                conversation,
                before: Before::Newest,
                limit,
            }
            .frame(5)
        };
        let parse = |f: ClientFrame| Query::parse(f.receiver, &f.body).expect("a query");
        assert_eq!(parse(history(1, 0, 7)), Err(BadBody::ZeroLimit));
        assert_eq!(parse(history(1, 5, 0)), Err(BadBody::Conversation(0)));
        assert_eq!(parse(history(0, 5, 7)), Err(BadBody::ZeroRequest));
        assert_eq!(Query::request_of(&history(9, 0, 7).body), 9);
        assert_eq!(Query::request_of(&[1, 2]), 0);
        let capped = parse(history(1, 5000, 7)).expect("valid");
        assert!(matches!(
            capped,
            Query::History {
                limit: MAX_PAGE,
                ..
            }
        ));
        let read = Query::Read {
            request: 3,
            conversation: 7,
            upto: 0,
        };
        assert_eq!(parse(read.frame(5)), Err(BadBody::ZeroOffset));
    }

    #[test]
    fn notices_and_records_are_told_apart() {
        let mut buf = FrameBuf::new();
        buf.extend(&crate::protocol::notice(
            crate::protocol::Code::Welcome,
            "hi",
        ));
        buf.extend(&Record::Synced { head: 3 }.encode());
        let mut read = || {
            let f = buf.decode_server(1 << 20).expect("fits").expect("whole");
            Received::read(f).expect("readable")
        };
        assert!(matches!(read(), Received::Notice(n) if n.is(crate::protocol::Code::Welcome)));
        assert_eq!(read(), Received::Record(Record::Synced { head: 3 }));
        let short = ServerFrame {
            sender: 0,
            kind: 0,
            body: Bytes::from_static(&[SYNC, 0, 0]),
        };
        assert!(Received::read(short).is_err());
        let bare = ServerFrame {
            sender: 3,
            kind: 1,
            body: Bytes::from_static(b"no envelope"),
        };
        assert_eq!(Received::read(bare), Err(Malformed::Envelope(11)));
    }

    /// A longer envelope (a later server's) is read up to the fields this code knows,
    /// and the payload starts where the envelope says it ends.
    #[test]
    fn a_longer_envelope_is_skipped_to_its_payload() {
        let mut body = Envelope {
            what: What::Carbon,
            offset: 5,
            time: 6,
            conversation: 7,
            request: 0,
        }
        .encode()
        .to_vec();
        body[0] = 30;
        body.extend_from_slice(&[9, 9, 9, 9]);
        body.extend_from_slice(b"payload");
        let frame = ServerFrame {
            sender: 5,
            kind: 1,
            body: body.into(),
        };
        match Received::read(frame) {
            Ok(Received::Message {
                envelope, payload, ..
            }) => {
                assert_eq!(envelope.what, What::Carbon);
                assert!(envelope.what.counted());
                assert_eq!(&payload[..], b"payload");
            }
            other => panic!("{other:?}"),
        }
    }

    fn records() -> impl Strategy<Value = Record> {
        let s = ".{0,40}";
        prop_oneof![
            (
                any::<bool>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(new, head, oldest, backlog, missed)| Record::Sync {
                    new,
                    head,
                    oldest,
                    backlog,
                    missed
                }),
            any::<u64>().prop_map(|head| Record::Synced { head }),
            (any::<u32>(), any::<bool>(), any::<u64>()).prop_map(|(request, more, next)| {
                Record::PageEnd {
                    request,
                    more,
                    next,
                }
            }),
            (
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u64>()
            )
                .prop_map(|(request, peer, last, time, unread, read)| {
                    Record::Conversation {
                        request,
                        peer,
                        last,
                        time,
                        unread,
                        read,
                    }
                }),
            (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(conversation, upto, unread)| {
                Record::Read {
                    conversation,
                    upto,
                    unread,
                }
            }),
            (any::<u32>(), s).prop_map(|(request, why)| Record::QueryFailed { request, why }),
            (7u8..0x20, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(kind, body)| {
                Record::Unknown {
                    kind,
                    body: body.into(),
                }
            }),
        ]
    }

    fn queries() -> impl Strategy<Value = Query> {
        let before = any::<u64>().prop_map(Before::from_wire);
        prop_oneof![
            (1u32.., 1u32.., before.clone(), 1u16..=MAX_PAGE).prop_map(
                |(request, conversation, before, limit)| Query::History {
                    request,
                    conversation,
                    before,
                    limit
                }
            ),
            (1u32.., before, 1u16..=MAX_PAGE).prop_map(|(request, before, limit)| {
                Query::Conversations {
                    request,
                    before,
                    limit,
                }
            }),
            (1u32.., 1u32.., 1u64..).prop_map(|(request, conversation, upto)| Query::Read {
                request,
                conversation,
                upto
            }),
        ]
    }

    proptest! {
        #[test]
        fn records_round_trip(record in records()) {
            let wire = record.encode();
            let mut buf = FrameBuf::new();
            buf.extend(&wire);
            let frame = buf.decode_server(1 << 20).expect("fits").expect("whole");
            prop_assert_eq!(Received::read(frame), Ok(Received::Record(record)));
        }

        #[test]
        fn queries_round_trip(query in queries(), sender in any::<u32>()) {
            let frame = query.frame(sender);
            prop_assert_eq!(frame.sender, sender);
            prop_assert_eq!(Query::parse(frame.receiver, &frame.body), Some(Ok(query)));
        }

        #[test]
        fn messages_round_trip(sender in 1u32.., kind in 1u8.., payload in prop::collection::vec(any::<u8>(), 0..300),
                               what in any::<u8>(), offset in any::<u64>(), time in any::<u64>(),
                               conversation in any::<u32>(), request in any::<u32>()) {
            let wire = ServerFrame { sender, kind, body: payload.clone().into() }.to_bytes();
            let envelope = Envelope { what: What::from_wire(what), offset, time, conversation, request };
            let mut buf = FrameBuf::new();
            buf.extend(&envelope.wrap(&wire));
            let frame = buf.decode_server(1 << 20).expect("fits").expect("whole");
            prop_assert_eq!(Received::read(frame), Ok(Received::Message {
                sender, kind, envelope, payload: payload.into()
            }));
        }

        #[test]
        fn any_body_is_refused_or_read(op in 4u32..9, body in prop::collection::vec(any::<u8>(), 0..40)) {
            let bytes = Bytes::from(body.clone());
            if op == OP_SESSION {
                if let Ok(hello) = SessionHello::parse(&bytes) {
                    prop_assert_eq!(hello.encode(), body);
                }
            } else if let Some(Ok(q)) = Query::parse(op, &body) {
                prop_assert_eq!(Query::parse(op, &q.frame(1).body), Some(Ok(q)));
            }
        }

        #[test]
        fn any_frame_on_a_session_is_refused_or_read(sender in 0u32..3, kind in 0u8..3,
                                                     body in prop::collection::vec(any::<u8>(), 0..60)) {
            let _ = Received::read(ServerFrame { sender, kind, body: body.into() });
        }
    }
}
