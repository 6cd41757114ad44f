//! Wire format: frames, notices, limits and an incremental decoder.
//!
//! Every integer is big-endian, as the seed's `struct.pack("!...")` writes it.
//!
//! ```text
//! client -> server: sender u32 | receiver u32 | type u8 | length u32 | body[length]   (13-byte header)
//! server -> client: sender u32 | type u8 | length u32 | body[length]                  ( 9-byte header)
//! ```
//!
//! Type 0 is reserved for control frames; types 1-255 carry opaque data. Sender 0 is the
//! server itself: its notices are `0 | 0 | length | "code: detail"`.

pub mod session;

use std::fmt;

use byteorder::{BigEndian, ByteOrder};
use bytes::Bytes;

/// Length of the client -> server header.
pub const CLIENT_HEADER_LEN: usize = 13;
/// Length of the server -> client header.
pub const SERVER_HEADER_LEN: usize = 9;
/// Default for `--max-frame-bytes`: the largest body a peer may announce.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 8 * 1024 * 1024;
/// The id of the server; no client may use it.
pub const SERVER_ID: u32 = 0;
/// Frame type reserved for control frames (hello, ping) and notices.
pub const CONTROL: u8 = 0;
/// Control operation carried in the receiver field of a type-0 frame: bind an id.
pub const OP_HELLO: u32 = 0;
/// Control operation: liveness probe, answered with a `pong` notice; binds nothing.
pub const OP_PING: u32 = 1;
/// Control operation: the body is a big-endian u32 `h`, the number of data frames the
/// client has handled since it turned acks on (modulo 2^32).
pub const OP_ACK: u32 = 2;
/// Control operation: a hello that also turns acknowledged delivery on, or, on a bound
/// connection, turns it on from that point.
pub const OP_HELLO_ACKS: u32 = 3;

/// Bytes read from a socket at a time when no larger frame is pending.
const READ_CHUNK: usize = 16 * 1024;

/// The seed's message types. Any other type 1-255 is data too.
pub const TEXT: u8 = 1;
pub const PICTURE: u8 = 2;
pub const VOICE: u8 = 3;
pub const VIDEO: u8 = 4;

/// A human name for a frame type, as the CLI prints it.
pub fn type_name(kind: u8) -> String {
    match kind {
        CONTROL => "notice".into(),
        TEXT => "text".into(),
        PICTURE => "picture".into(),
        VOICE => "voice".into(),
        VIDEO => "video".into(),
        other => format!("type-{other}"),
    }
}

/// Parses a type given by name (`text`) or number (`7`).
pub fn parse_type(name: &str) -> Option<u8> {
    match name {
        "text" => Some(TEXT),
        "picture" => Some(PICTURE),
        "voice" => Some(VOICE),
        "video" => Some(VIDEO),
        n => n.parse().ok(),
    }
}

/// A client -> server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    pub sender: u32,
    pub receiver: u32,
    pub kind: u8,
    pub body: Bytes,
}

impl ClientFrame {
    /// Appends the wire encoding to `dst`.
    ///
    /// # Panics
    /// If the body is longer than `u32::MAX` bytes, which the protocol cannot express.
    pub fn encode(&self, dst: &mut Vec<u8>) {
        let mut header = [0u8; CLIENT_HEADER_LEN];
        BigEndian::write_u32(&mut header[0..4], self.sender);
        BigEndian::write_u32(&mut header[4..8], self.receiver);
        header[8] = self.kind;
        BigEndian::write_u32(&mut header[9..13], body_len(&self.body));
        dst.extend_from_slice(&header);
        dst.extend_from_slice(&self.body);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CLIENT_HEADER_LEN + self.body.len());
        self.encode(&mut v);
        v
    }

    /// A hello binding `sender`, carrying an auth token or nothing.
    pub fn hello(sender: u32, token: &[u8]) -> Self {
        ClientFrame {
            sender,
            receiver: OP_HELLO,
            kind: CONTROL,
            body: Bytes::copy_from_slice(token),
        }
    }

    /// A hello that also turns acks on (on a bound connection: acks on, body empty).
    pub fn hello_acks(sender: u32, token: &[u8]) -> Self {
        ClientFrame {
            receiver: OP_HELLO_ACKS,
            ..Self::hello(sender, token)
        }
    }

    /// Acknowledges the first `h` data frames received since acks went on.
    pub fn ack(sender: u32, h: u32) -> Self {
        ClientFrame {
            sender,
            receiver: OP_ACK,
            kind: CONTROL,
            body: Bytes::copy_from_slice(&h.to_be_bytes()),
        }
    }

    pub fn ping() -> Self {
        ClientFrame {
            sender: 0,
            receiver: OP_PING,
            kind: CONTROL,
            body: Bytes::new(),
        }
    }
}

/// A server -> client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    pub sender: u32,
    pub kind: u8,
    pub body: Bytes,
}

impl ServerFrame {
    pub fn encode(&self, dst: &mut Vec<u8>) {
        dst.extend_from_slice(&server_header(self.sender, self.kind, body_len(&self.body)));
        dst.extend_from_slice(&self.body);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(SERVER_HEADER_LEN + self.body.len());
        self.encode(&mut v);
        v
    }

    /// The notice this frame carries, if it is one.
    pub fn notice(&self) -> Option<Notice> {
        (self.sender == SERVER_ID && self.kind == CONTROL).then(|| Notice::parse(&self.body))
    }
}

fn body_len(body: &[u8]) -> u32 {
    u32::try_from(body.len()).expect("body longer than u32::MAX bytes")
}

fn server_header(sender: u32, kind: u8, len: u32) -> [u8; SERVER_HEADER_LEN] {
    let mut header = [0u8; SERVER_HEADER_LEN];
    BigEndian::write_u32(&mut header[0..4], sender);
    header[4] = kind;
    BigEndian::write_u32(&mut header[5..9], len);
    header
}

/// A frame a client sent, held in the server -> client encoding it is echoed and
/// forwarded in: the body is copied out of the read buffer once and then shared by the
/// echo, the forward and the mailbox without further copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub receiver: u32,
    /// `sender | type | length | body`, ready to write to any client.
    pub wire: Bytes,
}

impl Inbound {
    pub fn sender(&self) -> u32 {
        BigEndian::read_u32(&self.wire[0..4])
    }
    pub fn kind(&self) -> u8 {
        self.wire[4]
    }
    pub fn body(&self) -> &[u8] {
        &self.wire[SERVER_HEADER_LEN..]
    }
}

/// Every notice code the server sends; docs/PROTOCOL.md describes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Welcome,
    AcksOn,
    Pong,
    FrameTooLarge,
    BadSender,
    BadControl,
    Replaced,
    MailboxFull,
    StoreFailed,
    Timeout,
    ServerBusy,
    SlowConsumer,
    AuthFailed,
    ShuttingDown,
    BadMessage,
    TooManyDevices,
    RateLimited,
    Disconnected,
    Reconnect,
}

impl Code {
    pub const ALL: [Code; 19] = [
        Code::Welcome,
        Code::AcksOn,
        Code::Pong,
        Code::FrameTooLarge,
        Code::BadSender,
        Code::BadControl,
        Code::Replaced,
        Code::MailboxFull,
        Code::StoreFailed,
        Code::Timeout,
        Code::ServerBusy,
        Code::SlowConsumer,
        Code::AuthFailed,
        Code::ShuttingDown,
        Code::BadMessage,
        Code::TooManyDevices,
        Code::RateLimited,
        Code::Disconnected,
        Code::Reconnect,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Welcome => "welcome",
            Code::AcksOn => "acks-on",
            Code::Pong => "pong",
            Code::FrameTooLarge => "frame-too-large",
            Code::BadSender => "bad-sender",
            Code::BadControl => "bad-control",
            Code::Replaced => "replaced",
            Code::MailboxFull => "mailbox-full",
            Code::StoreFailed => "store-failed",
            Code::Timeout => "timeout",
            Code::ServerBusy => "server-busy",
            Code::SlowConsumer => "slow-consumer",
            Code::AuthFailed => "auth-failed",
            Code::ShuttingDown => "shutting-down",
            Code::BadMessage => "bad-message",
            Code::TooManyDevices => "too-many-devices",
            Code::RateLimited => "rate-limited",
            Code::Disconnected => "disconnected",
            Code::Reconnect => "reconnect",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A server notice as a client sees it: `code: detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub code: String,
    pub detail: String,
}

impl Notice {
    fn parse(body: &[u8]) -> Notice {
        let text = String::from_utf8_lossy(body);
        let (code, detail) = text.split_once(": ").unwrap_or((&text, ""));
        Notice {
            code: code.to_string(),
            detail: detail.to_string(),
        }
    }

    pub fn is(&self, code: Code) -> bool {
        self.code == code.as_str()
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// Encodes a notice frame from the server.
pub fn notice(code: Code, detail: impl fmt::Display) -> Bytes {
    let body = format!("{code}: {detail}");
    let mut v = Vec::with_capacity(SERVER_HEADER_LEN + body.len());
    v.extend_from_slice(&server_header(
        SERVER_ID,
        CONTROL,
        body_len(body.as_bytes()),
    ));
    v.extend_from_slice(body.as_bytes());
    Bytes::from(v)
}

/// A header announced a body larger than the configured limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLarge {
    pub length: u32,
    pub max: u32,
}

impl fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "frame body of {} bytes exceeds the limit of {} bytes",
            self.length, self.max
        )
    }
}

impl std::error::Error for FrameTooLarge {}

/// Bytes read from a socket and not yet decoded.
///
/// Decoding is incremental, so a frame split over any number of reads, or many frames in
/// one read, decode the same. The buffer is only allocated while bytes are pending:
/// [`FrameBuf::release`] gives it back, so an idle connection holds no read buffer.
#[derive(Debug, Default)]
pub struct FrameBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
    /// Total bytes the frame at `start` needs, once its header has been read.
    want: usize,
}

impl FrameBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when no undecoded byte is held: the stream is between frames.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Frees the allocation when nothing is pending.
    pub fn release(&mut self) {
        if self.is_empty() {
            *self = Self::default();
        }
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.compact();
        let need = self.end + bytes.len();
        if self.data.len() < need {
            self.data.resize(need, 0);
        }
        self.data[self.end..need].copy_from_slice(bytes);
        self.end = need;
    }

    /// Room to read into: enough for the pending frame when its header is known,
    /// otherwise a chunk. Call [`FrameBuf::filled`] with the count read.
    pub fn space(&mut self) -> &mut [u8] {
        self.compact();
        let room = self.want.saturating_sub(self.end).max(READ_CHUNK);
        if self.data.len() < self.end + room {
            self.data.resize(self.end + room, 0);
        }
        &mut self.data[self.end..]
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Takes `len` bytes once they are all here; records `len` as wanted otherwise.
    fn take(&mut self, len: usize) -> Option<&[u8]> {
        if self.len() < len {
            self.want = len;
            return None;
        }
        self.want = 0;
        let range = self.start..self.start + len;
        self.start += len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        // The bytes stay in `data` until the next write into the buffer.
        Some(&self.data[range])
    }

    /// Decodes one client -> server frame, in its server -> client encoding.
    ///
    /// The length is checked against `max` as soon as the header is complete, before any
    /// room for the body is reserved.
    pub fn decode_client(&mut self, max: u32) -> Result<Option<Inbound>, FrameTooLarge> {
        let Some(header) = self.pending().get(..CLIENT_HEADER_LEN) else {
            return Ok(None);
        };
        let sender = BigEndian::read_u32(&header[0..4]);
        let receiver = BigEndian::read_u32(&header[4..8]);
        let kind = header[8];
        let length = BigEndian::read_u32(&header[9..13]);
        if length > max {
            return Err(FrameTooLarge { length, max });
        }
        let Some(frame) = self.take(CLIENT_HEADER_LEN + length as usize) else {
            return Ok(None);
        };
        let mut wire = Vec::with_capacity(SERVER_HEADER_LEN + length as usize);
        wire.extend_from_slice(&server_header(sender, kind, length));
        wire.extend_from_slice(&frame[CLIENT_HEADER_LEN..]);
        Ok(Some(Inbound {
            receiver,
            wire: Bytes::from(wire),
        }))
    }

    /// Decodes one server -> client frame.
    pub fn decode_server(&mut self, max: u32) -> Result<Option<ServerFrame>, FrameTooLarge> {
        let Some(header) = self.pending().get(..SERVER_HEADER_LEN) else {
            return Ok(None);
        };
        let sender = BigEndian::read_u32(&header[0..4]);
        let kind = header[4];
        let length = BigEndian::read_u32(&header[5..9]);
        if length > max {
            return Err(FrameTooLarge { length, max });
        }
        let Some(frame) = self.take(SERVER_HEADER_LEN + length as usize) else {
            return Ok(None);
        };
        Ok(Some(ServerFrame {
            sender,
            kind,
            body: Bytes::copy_from_slice(&frame[SERVER_HEADER_LEN..]),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client_frames() -> impl Strategy<Value = Vec<ClientFrame>> {
        let frame = (
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(sender, receiver, kind, body)| ClientFrame {
                sender,
                receiver,
                kind,
                body: body.into(),
            });
        prop::collection::vec(frame, 0..20)
    }

    fn decode_all_client(chunks: &[&[u8]]) -> Vec<Inbound> {
        let mut buf = FrameBuf::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend(chunk);
            while let Some(f) = buf.decode_client(u32::MAX).expect("within limit") {
                out.push(f);
            }
        }
        assert!(buf.is_empty());
        out
    }

    fn expected(frames: &[ClientFrame]) -> Vec<Inbound> {
        frames
            .iter()
            .map(|f| Inbound {
                receiver: f.receiver,
                wire: ServerFrame {
                    sender: f.sender,
                    kind: f.kind,
                    body: f.body.clone(),
                }
                .to_bytes()
                .into(),
            })
            .collect()
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(frames in client_frames(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40)) {
            let stream: Vec<u8> = frames.iter().flat_map(|f| f.to_bytes()).collect();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points {
                chunks.push(&stream[last..p]);
                last = p;
            }
            chunks.push(&stream[last..]);
            prop_assert_eq!(decode_all_client(&chunks), expected(&frames));
        }

        #[test]
        fn server_frames_round_trip(sender in any::<u32>(), kind in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..2000)) {
            let frame = ServerFrame { sender, kind, body: body.into() };
            let mut buf = FrameBuf::new();
            buf.extend(&frame.to_bytes());
            prop_assert_eq!(buf.decode_server(u32::MAX).expect("within limit"), Some(frame));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn client_frames_round_trip(frames in client_frames()) {
            for f in &frames {
                let mut buf = FrameBuf::new();
                buf.extend(&f.to_bytes());
                let inbound = buf.decode_client(u32::MAX).expect("within limit").expect("complete");
                prop_assert_eq!(inbound.sender(), f.sender);
                prop_assert_eq!(inbound.receiver, f.receiver);
                prop_assert_eq!(inbound.kind(), f.kind);
                prop_assert_eq!(inbound.body(), &f.body[..]);
            }
        }

        /// Arbitrary bytes never panic and never make the buffer reserve beyond the limit.
        #[test]
        fn arbitrary_bytes_are_bounded(bytes in prop::collection::vec(any::<u8>(), 0..4096), max in 0u32..1024) {
            let mut buf = FrameBuf::new();
            buf.extend(&bytes);
            loop {
                match buf.decode_client(max) {
                    Ok(Some(f)) => prop_assert!(f.body().len() <= max as usize),
                    Ok(None) => break,
                    Err(e) => { prop_assert!(e.length > max); break; }
                }
            }
            let room = buf.space().len();
            prop_assert!(room <= READ_CHUNK.max(CLIENT_HEADER_LEN + max as usize));
        }
    }

    #[test]
    fn seed_text_frame_decodes() {
        // struct.pack("!IIBI6s", 10000000, 10000001, 1, 6, "你好".encode()) with the length in bytes.
        let mut raw = vec![];
        raw.extend_from_slice(&10_000_000u32.to_be_bytes());
        raw.extend_from_slice(&10_000_001u32.to_be_bytes());
        raw.push(1);
        raw.extend_from_slice(&6u32.to_be_bytes());
        raw.extend_from_slice("你好".as_bytes());
        let mut buf = FrameBuf::new();
        buf.extend(&raw);
        let f = buf.decode_client(DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
        assert_eq!(f.sender(), 10_000_000);
        assert_eq!(f.receiver, 10_000_001);
        assert_eq!(f.kind(), TEXT);
        assert_eq!(f.body(), "你好".as_bytes());
        assert_eq!(&f.wire[..9], &[0, 0x98, 0x96, 0x80, 1, 0, 0, 0, 6]);
    }

    #[test]
    fn oversized_header_is_refused_before_the_body_arrives() {
        let mut raw = vec![0u8; 9];
        raw.extend_from_slice(&(u32::MAX).to_be_bytes());
        let mut buf = FrameBuf::new();
        buf.extend(&raw);
        let err = buf.decode_client(1024).unwrap_err();
        assert_eq!(
            err,
            FrameTooLarge {
                length: u32::MAX,
                max: 1024
            }
        );
    }

    #[test]
    fn notices_carry_code_and_detail() {
        let wire = notice(Code::BadSender, "sender 5 is not bound id 6");
        let mut buf = FrameBuf::new();
        buf.extend(&wire);
        let frame = buf.decode_server(1024).unwrap().unwrap();
        let n = frame.notice().unwrap();
        assert!(n.is(Code::BadSender));
        assert_eq!(n.detail, "sender 5 is not bound id 6");
    }

    /// Every code the server can send is documented for client authors.
    #[test]
    fn every_notice_code_is_in_the_protocol_doc() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        for code in Code::ALL {
            assert!(
                doc.contains(&format!("| `{code}` |")),
                "{code} missing from docs/PROTOCOL.md"
            );
        }
    }

    #[test]
    fn release_frees_only_when_empty() {
        let mut buf = FrameBuf::new();
        buf.extend(&[1, 2, 3]);
        buf.release();
        assert_eq!(buf.len(), 3);
        buf.take(3);
        buf.release();
        assert_eq!(buf.data.capacity(), 0);
    }
}
