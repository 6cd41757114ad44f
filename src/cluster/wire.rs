//! What nodes say to each other, as typed values with one encoding each.
//!
//! - Subjects: the mailbox stream's (`chat.mb.<id>`), and those of an id's holder
//!   (`chat.hold.<id>.take`, `.mail`, `.frames`), built and read here only.
//! - Headers of a forwarded batch: who sent it, and whether the receiver's mailbox
//!   holds earlier frames of its senders.
//! - A forwarded batch is its frames, back to back in their server -> client encoding.
//! - The answer to a forwarded batch is one line per frame, in the batch's order:
//!   `stored`, `full <why>` or `failed <why>`; a holder that still holds the id names
//!   its batch subject in [`HOLDER_HEADER`].
//! - A node's batch subject (`chat.node.<token>.frames`) takes the frames for several
//!   ids it holds at once, in [`Section`]s; the answer is, per section, `held` or
//!   `left` and its frames' lines, or `gone` for frames it did not take
//!   ([`SectionAnswer`]).
//! - History (sessions): every conversation in the stream `CHAT_HISTORY`, one subject
//!   per pair of ids (`chat.log.<lower>.<higher>`), each message a [`Block`] of frames;
//!   an id's log is its conversations' subjects; after a block is stored,
//!   `chat.note.<id>` tells the nodes with sessions of either id to read on; each named device's place in its id's log, and each read marker, under a key
//!   of `CHAT_DEVICES` ([`DeviceKey`]); `chat.read.<id>` carries a moved marker's
//!   `read` record to the id's sessions on every node.
//!
//! Nodes of the previous release write and read the same subjects, headers and lines,
//! so old and new nodes understand each other during a rolling upgrade.

use bytes::Bytes;

use crate::store::{Failure, Outcome};

/// The stream's subjects: one per receiver.
pub const MAILBOX_SUBJECTS: &str = "chat.mb.*";
/// Names the node that forwarded a batch.
pub const NODE_HEADER: &str = "Chat-Node";
/// Present when the receiver's mailbox holds earlier frames of the batch's senders.
pub const BEHIND_HEADER: &str = "Chat-Behind";
/// Present when the forwarding node wrote the batch's frames to their ids' logs
/// (history on); a node of the previous release did not, and the holder does.
pub const LOGGED_HEADER: &str = "Chat-Logged";
/// In the answer to a batch for one id: the answering node holds the id, and takes
/// batches for the ids it holds on [`node_batches`] of this token.
pub const HOLDER_HEADER: &str = "Chat-Holder";

/// `receiver`'s subject in the mailbox stream.
pub fn mailbox(receiver: u32) -> String {
    format!("chat.mb.{receiver}")
}

/// The history stream's subjects: one per conversation of each id.
pub const LOG_SUBJECTS: &str = "chat.log.*.*";
/// Every note that an id's read marker moved: its `read` record, for its sessions.
pub const READ_SUBJECTS: &str = "chat.read.*";

/// Where the nodes hear that a read marker of `id` moved.
pub fn read(id: u32) -> String {
    format!("chat.read.{id}")
}

/// The id a read marker's note is for.
pub fn read_by(subject: &str) -> Option<u32> {
    subject.strip_prefix("chat.read.")?.parse().ok()
}

/// The log of the conversation between `a` and `b`: one subject for both, the lower id
/// first, so that a frame is stored once and has one offset in both ids' logs.
pub fn conversation(a: u32, b: u32) -> String {
    format!("chat.log.{}.{}", a.min(b), a.max(b))
}

/// The two subjects that hold every conversation of `id`: those where it is the lower
/// id, and those where it is the higher.
pub fn logs_of(id: u32) -> [String; 2] {
    [format!("chat.log.{id}.*"), format!("chat.log.*.{id}")]
}

/// The two ids of a conversation's subject, lower first.
pub fn logged(subject: &str) -> Option<(u32, u32)> {
    let rest = subject.strip_prefix("chat.log.")?;
    let (lo, hi) = rest.split_once('.')?;
    Some((lo.parse().ok()?, hi.parse().ok()?))
}

/// The other id of a conversation's subject, seen from `id`.
pub fn peer_in(subject: &str, id: u32) -> Option<u32> {
    let (lo, hi) = logged(subject)?;
    match id {
        _ if lo == id => Some(hi),
        _ if hi == id => Some(lo),
        _ => None,
    }
}

/// On a frame in the mailbox stream that is in its receiver's log too: when it was
/// accepted (ms since the epoch). Frames of the previous release have none.
pub const TIME_HEADER: &str = "Chat-Time";

/// Where the nodes hear that `id`'s log grew.
pub fn note(id: u32) -> String {
    format!("chat.note.{id}")
}

/// Entries in one block, at most: an offset is its block's stream sequence times this
/// plus its place in the block.
pub const BLOCK_ENTRIES: usize = 256;

/// The offset of entry `index` of the block stored at stream sequence `seq`.
pub fn offset(seq: u64, index: usize) -> u64 {
    (seq << 8) | (index as u64 & 0xff)
}

/// The block and the place in it an offset names.
pub fn place(offset: u64) -> (u64, usize) {
    (offset >> 8, (offset & 0xff) as usize)
}

/// One frame in an id's log: when it was accepted (ms since the epoch), which named
/// device of its author sent it (empty: none, or the author is the peer), and the frame
/// in its server -> client encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub time: u64,
    pub device: String,
    pub wire: Bytes,
}

/// A message of the history stream: frames of one conversation of one id, in order.
/// `version u8 (1)`, then per entry `time u64 | device_len u8 | device | frame`, the
/// frame with its own 9-byte header saying its length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Block {
    pub entries: Vec<Entry>,
}

const BLOCK_VERSION: u8 = 1;

impl Block {
    pub fn encode(&self) -> Bytes {
        let size: usize = self
            .entries
            .iter()
            .map(|e| 9 + e.device.len() + e.wire.len())
            .sum();
        let mut v = Vec::with_capacity(1 + size);
        v.push(BLOCK_VERSION);
        for e in &self.entries {
            v.extend_from_slice(&e.time.to_be_bytes());
            let device = e.device.as_bytes();
            let len = device.len().min(u8::MAX as usize);
            v.push(len as u8);
            v.extend_from_slice(&device[..len]);
            v.extend_from_slice(&e.wire);
        }
        Bytes::from(v)
    }

    /// A block read back; `None` if it is not one this release can read.
    pub fn decode(payload: &Bytes) -> Option<Block> {
        let (&version, _) = payload.split_first()?;
        if version != BLOCK_VERSION {
            return None;
        }
        let header = crate::protocol::SERVER_HEADER_LEN;
        let mut entries = Vec::new();
        let mut at = 1;
        while at < payload.len() {
            let time = u64::from_be_bytes(payload.get(at..at + 8)?.try_into().ok()?);
            let len = *payload.get(at + 8)? as usize;
            let device = payload.get(at + 9..at + 9 + len)?;
            let device = std::str::from_utf8(device).ok()?.to_string();
            let start = at + 9 + len;
            let body = payload.get(start + 5..start + header)?;
            let body = u32::from_be_bytes(body.try_into().ok()?) as usize;
            let end = start.checked_add(header)?.checked_add(body)?;
            payload.get(start..end)?;
            entries.push(Entry {
                time,
                device,
                wire: payload.slice(start..end),
            });
            at = end;
        }
        Some(Block { entries })
    }
}

/// A key of the devices bucket: what it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKey {
    /// A named device: its value is its cursor, the offset it acknowledged last.
    Named { id: u32, name: String },
    /// The id's default device (connections without a session) has been used since
    /// the id got a named device: frames for it also wait in its mailbox.
    Default { id: u32 },
    /// The id has named devices, written when one binds: the nodes watch this key
    /// and `Default` only, not every cursor's write.
    HasNamed { id: u32 },
    /// The newest cursor of any of the id's devices: where a new device starts.
    Top { id: u32 },
    /// The id's read marker in its conversation with `peer`: the offset read up to.
    Read { id: u32, peer: u32 },
}

impl DeviceKey {
    /// The key; a name is written in hex (keys allow few characters).
    pub fn key(&self) -> String {
        match self {
            DeviceKey::Named { id, name } => {
                let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
                format!("{id}.d{hex}")
            }
            DeviceKey::Default { id } => format!("{id}.default"),
            DeviceKey::HasNamed { id } => format!("{id}.named"),
            DeviceKey::Top { id } => format!("{id}.top"),
            DeviceKey::Read { id, peer } => format!("{id}.r{peer}"),
        }
    }

    pub fn parse(key: &str) -> Option<DeviceKey> {
        let (id, rest) = key.split_once('.')?;
        let id = id.parse().ok()?;
        match rest {
            "default" => Some(DeviceKey::Default { id }),
            "named" => Some(DeviceKey::HasNamed { id }),
            "top" => Some(DeviceKey::Top { id }),
            _ if rest.starts_with('r') => {
                let peer = rest.strip_prefix('r')?.parse().ok()?;
                Some(DeviceKey::Read { id, peer })
            }
            _ => {
                let hex = rest.strip_prefix('d')?;
                if hex.len() % 2 != 0 {
                    return None;
                }
                let bytes: Option<Vec<u8>> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                    .collect();
                let name = String::from_utf8(bytes?).ok()?;
                Some(DeviceKey::Named { id, name })
            }
        }
    }
}

/// What one node asks of the node that holds an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Let the id go (request/reply; the reply comes once it has).
    Take,
    /// Frames were stored for the id: read them.
    Mail,
    /// Take these frames (request/reply; the reply is their outcomes).
    Frames,
}

impl Hold {
    fn word(self) -> &'static str {
        match self {
            Hold::Take => "take",
            Hold::Mail => "mail",
            Hold::Frames => "frames",
        }
    }
}

/// The subject on which `receiver`'s holder hears `what`.
pub fn hold(receiver: u32, what: Hold) -> String {
    format!("chat.hold.{receiver}.{}", what.word())
}

/// Every id's mail: nodes with sessions move what is stored for an id used only
/// from sessions into its log.
pub fn all_mail() -> String {
    format!("chat.hold.*.{}", Hold::Mail.word())
}

/// The id a mail on `subject` is for.
pub fn mailed(subject: &str) -> Option<u32> {
    let rest = subject.strip_prefix("chat.hold.")?;
    let id = rest.strip_suffix(".mail")?;
    id.parse().ok()
}

/// Every subject `receiver`'s holder listens on.
pub fn holds(receiver: u32) -> String {
    format!("chat.hold.{receiver}.*")
}

/// What a holder heard on `subject`, if it is one of [`holds`]'s.
pub fn held(subject: &str) -> Option<Hold> {
    [Hold::Take, Hold::Mail, Hold::Frames]
        .into_iter()
        .find(|h| {
            subject
                .strip_suffix(h.word())
                .is_some_and(|s| s.ends_with('.'))
        })
}

/// Where the answer to batch `token` goes: under the forwarding node's inbox.
pub fn answer_to(inbox: &str, token: u64) -> String {
    format!("{inbox}.{token}")
}

/// Every answer to this node's batches.
pub fn answers(inbox: &str) -> String {
    format!("{inbox}.*")
}

/// The batch an answer on `subject` is for.
pub fn answered(subject: &str) -> Option<u64> {
    subject.rsplit('.').next().and_then(|t| t.parse().ok())
}

/// Where the node whose batch token is `token` hears batches for several ids it holds.
/// The token is the random part of the node's inbox: unique to one run of one node, so
/// a batch for a node that restarted finds nobody rather than a stranger.
pub fn node_batches(token: &str) -> String {
    format!("chat.node.{token}.frames")
}

/// A node's batch token: the last part of its inbox.
pub fn batch_token(inbox: &str) -> &str {
    inbox.rsplit('.').next().unwrap_or(inbox)
}

/// One receiver's part of a batch for several receivers held on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub receiver: u32,
    /// The receiver's mailbox holds earlier frames of these senders (as
    /// [`BEHIND_HEADER`]).
    pub behind: bool,
    /// Whole frames in their server -> client encoding.
    pub frames: Vec<Bytes>,
}

/// Bytes before a section's frames: receiver u32, behind u8, length u32.
const SECTION_HEADER: usize = 9;

impl Section {
    /// How many bytes the section takes in a batch.
    pub fn encoded_len(frames: usize) -> usize {
        SECTION_HEADER + frames
    }

    /// Appends the section to `out`: `receiver u32 | behind u8 | length u32 | frames`,
    /// big-endian like the client protocol.
    pub fn encode(receiver: u32, behind: bool, frames: &[Bytes], out: &mut bytes::BytesMut) {
        let len: usize = frames.iter().map(Bytes::len).sum();
        out.extend_from_slice(&receiver.to_be_bytes());
        out.extend_from_slice(&[u8::from(behind)]);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        for frame in frames {
            out.extend_from_slice(frame);
        }
    }

    /// A batch's sections; `None` unless it is whole sections of whole frames.
    pub fn decode_all(payload: &Bytes) -> Option<Vec<Section>> {
        let mut sections = Vec::new();
        let mut at = 0;
        while at < payload.len() {
            let head = payload.get(at..at + SECTION_HEADER)?;
            let receiver = u32::from_be_bytes(head[0..4].try_into().ok()?);
            let behind = match head[4] {
                0 => false,
                1 => true,
                _ => return None,
            };
            let len = u32::from_be_bytes(head[5..9].try_into().ok()?) as usize;
            let start = at + SECTION_HEADER;
            let end = start.checked_add(len)?;
            payload.get(start..end)?;
            let frames = split_frames(&payload.slice(start..end))?;
            sections.push(Section {
                receiver,
                behind,
                frames,
            });
            at = end;
        }
        Some(sections)
    }
}

/// What became of one section of a batch for several receivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectionAnswer {
    /// The node took the frames and still holds the receiver: one outcome per frame.
    Held(Vec<Outcome>),
    /// The node took the frames but let the receiver go meanwhile (they went on, or to
    /// the stream): their outcomes; the next batch goes to the id's subject.
    Left(Vec<Outcome>),
    /// The node did not hold the receiver and did not take the frames: the sender
    /// sends them again, to the id's subject, ahead of what it queued since.
    Gone,
}

impl SectionAnswer {
    /// Per section a line, `held`, `left` or `gone`; after `held` and `left`, one line
    /// per frame ([`encode_outcomes`]).
    pub fn encode_all(answers: &[SectionAnswer]) -> String {
        let mut text = String::new();
        for answer in answers {
            match answer {
                SectionAnswer::Held(outcomes) => {
                    text.push_str("held\n");
                    text.push_str(&encode_outcomes(outcomes));
                }
                SectionAnswer::Left(outcomes) => {
                    text.push_str("left\n");
                    text.push_str(&encode_outcomes(outcomes));
                }
                SectionAnswer::Gone => text.push_str("gone\n"),
            }
        }
        text
    }

    /// The answers to sections of `counts[i]` frames each. A section whose outcomes
    /// the text does not cover has them failed without an answer ([`decode_outcome`]);
    /// one it does not reach at all, or cannot read, is `Left` so: its frames may have
    /// been taken, and a sender must not send them again.
    pub fn decode_all(text: &str, counts: &[usize]) -> Vec<SectionAnswer> {
        let mut lines = text.lines();
        counts
            .iter()
            .map(|&n| {
                let outcomes = |lines: &mut std::str::Lines| -> Vec<Outcome> {
                    (0..n).map(|_| decode_outcome(lines.next())).collect()
                };
                match lines.next() {
                    Some("held") => SectionAnswer::Held(outcomes(&mut lines)),
                    Some("gone") => SectionAnswer::Gone,
                    _ => SectionAnswer::Left(outcomes(&mut lines)),
                }
            })
            .collect()
    }
}

/// Cuts a forwarded batch into its server -> client frames; `None` if it is not
/// whole frames.
pub fn split_frames(payload: &Bytes) -> Option<Vec<Bytes>> {
    let header = crate::protocol::SERVER_HEADER_LEN;
    let mut frames = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let len = payload.get(at + 5..at + header)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let end = at.checked_add(header)?.checked_add(len)?;
        frames.push(payload.get(at..end).map(|_| payload.slice(at..end))?);
        at = end;
    }
    Some(frames)
}

/// Why JetStream did not take a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The receiver's subject holds `--mailbox-max-messages` already.
    Full,
    /// Anything else, in the client's or the server's words.
    Failed(String),
}

/// Classifies a failed publish. The server reports a full subject with the code it
/// uses for every failed store (10077), so the description tells them apart.
pub fn refused(e: &async_nats::jetstream::context::PublishError) -> Refused {
    use async_nats::jetstream::{self, ErrorCode};
    let js = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
    match js {
        Some(js)
            if js.error_code() == ErrorCode::STREAM_STORE_FAILED
                && js.to_string().contains("maximum messages per subject") =>
        {
            Refused::Full
        }
        _ => Refused::Failed(e.to_string()),
    }
}

/// The answer to a forwarded batch: one line per outcome.
pub fn encode_outcomes(outcomes: &[Outcome]) -> String {
    let mut text = String::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Stored => text.push_str("stored"),
            Outcome::Full(why) => {
                text.push_str("full ");
                text.push_str(why);
            }
            Outcome::Failed(why) => {
                text.push_str("failed ");
                text.push_str(&why.to_string());
            }
        }
        text.push('\n');
    }
    text
}

/// One frame's outcome from its line of an answer; no line means the node that held
/// the receiver gave none for this frame.
pub fn decode_outcome(line: Option<&str>) -> Outcome {
    match line {
        Some("stored") => Outcome::Stored,
        Some(line) => match line.strip_prefix("full ") {
            Some(why) => Outcome::Full(why.to_string()),
            None => {
                let why = line.strip_prefix("failed ").unwrap_or(line);
                Outcome::Failed(Failure::Remote(why.to_string()))
            }
        },
        None => Outcome::Failed(Failure::NoAnswer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_the_previous_release_s_and_read_back() {
        assert_eq!(mailbox(7), "chat.mb.7");
        assert_eq!(hold(7, Hold::Take), "chat.hold.7.take");
        assert_eq!(hold(7, Hold::Mail), "chat.hold.7.mail");
        assert_eq!(hold(7, Hold::Frames), "chat.hold.7.frames");
        assert_eq!(holds(7), "chat.hold.7.*");
        for h in [Hold::Take, Hold::Mail, Hold::Frames] {
            assert_eq!(held(&hold(42, h)), Some(h));
        }
        assert_eq!(held("chat.hold.7.unmail"), None);
        assert_eq!(mailed(&hold(7, Hold::Mail)), Some(7));
        assert_eq!(mailed(&hold(7, Hold::Take)), None);
        assert_eq!(all_mail(), "chat.hold.*.mail");
        assert_eq!(held("chat.hold.7.other"), None);
        assert_eq!(answer_to("_INBOX.abc", 12), "_INBOX.abc.12");
        assert_eq!(answers("_INBOX.abc"), "_INBOX.abc.*");
        assert_eq!(answered("_INBOX.abc.12"), Some(12));
        assert_eq!(answered("_INBOX.abc.x"), None);
    }

    #[test]
    fn log_subjects_offsets_and_device_keys_read_back() {
        assert_eq!(conversation(7, 5), "chat.log.5.7");
        assert_eq!(
            conversation(5, 7),
            conversation(7, 5),
            "one subject for both"
        );
        assert_eq!(logged(&conversation(7, 5)), Some((5, 7)));
        assert_eq!(peer_in(&conversation(7, 5), 7), Some(5));
        assert_eq!(peer_in(&conversation(7, 5), 5), Some(7));
        assert_eq!(peer_in(&conversation(7, 5), 9), None);
        assert_eq!(logged("chat.log.7"), None);
        assert_eq!(logged("chat.mb.7"), None);
        assert_eq!(logs_of(7), ["chat.log.7.*", "chat.log.*.7"]);
        assert_eq!(note(9), "chat.note.9");
        assert_eq!(read_by(&read(9)), Some(9));
        assert_eq!(place(offset(1000, 3)), (1000, 3));
        assert!(
            offset(1000, 255) < offset(1001, 0),
            "offsets grow with the stream"
        );
        for key in [
            DeviceKey::Named {
                id: 7,
                name: "laptop é".into(),
            },
            DeviceKey::Default { id: 7 },
            DeviceKey::HasNamed { id: 7 },
            DeviceKey::Top { id: 7 },
            DeviceKey::Read { id: 7, peer: 9 },
        ] {
            assert_eq!(DeviceKey::parse(&key.key()), Some(key.clone()), "{key:?}");
            assert!(
                key.key()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.'),
                "a key NATS takes: {}",
                key.key()
            );
        }
        assert_eq!(DeviceKey::parse("7.dzz"), None);
        assert_eq!(DeviceKey::parse("x.top"), None);
    }

    #[test]
    fn a_block_reads_back_and_a_cut_one_does_not() {
        let a = crate::protocol::notice(crate::protocol::Code::Pong, "a");
        let b = crate::protocol::notice(crate::protocol::Code::Pong, "bb");
        let block = Block {
            entries: vec![
                Entry {
                    time: 5,
                    device: "phone".into(),
                    wire: a,
                },
                Entry {
                    time: 6,
                    device: String::new(),
                    wire: b,
                },
            ],
        };
        let bytes = block.encode();
        assert_eq!(Block::decode(&bytes), Some(block));
        assert_eq!(Block::decode(&bytes.slice(..bytes.len() - 1)), None);
        assert_eq!(
            Block::decode(&Bytes::from_static(&[2])),
            None,
            "a later version"
        );
        assert_eq!(Block::decode(&Bytes::new()), None);
    }

    #[test]
    fn sections_and_their_answers_read_back_and_a_cut_batch_does_not() {
        assert_eq!(node_batches("abc"), "chat.node.abc.frames");
        assert_eq!(batch_token("_INBOX.XyZ12"), "XyZ12");
        let one = crate::protocol::notice(crate::protocol::Code::Pong, "one");
        let two = crate::protocol::notice(crate::protocol::Code::Pong, "two");
        let mut out = bytes::BytesMut::new();
        Section::encode(7, false, &[one.clone(), two.clone()], &mut out);
        Section::encode(9, true, std::slice::from_ref(&one), &mut out);
        let payload = out.freeze();
        assert_eq!(
            &payload[..9],
            &[0, 0, 0, 7, 0, 0, 0, 0, (one.len() + two.len()) as u8]
        );
        let sections = Section::decode_all(&payload).expect("whole");
        assert_eq!(sections.len(), 2);
        assert_eq!((sections[0].receiver, sections[0].behind), (7, false));
        assert_eq!(sections[0].frames, [one.clone(), two.clone()]);
        assert_eq!((sections[1].receiver, sections[1].behind), (9, true));
        assert_eq!(sections[1].frames, std::slice::from_ref(&one));
        let first = Section::encoded_len(one.len() + two.len());
        for cut in 1..payload.len() {
            let read = Section::decode_all(&payload.slice(..cut));
            match cut == first {
                true => assert_eq!(read.map(|s| s.len()), Some(1), "the first section whole"),
                false => assert_eq!(read, None, "cut at {cut}"),
            }
        }
        let mut bad = payload.to_vec();
        bad[4] = 2;
        assert_eq!(
            Section::decode_all(&Bytes::from(bad)),
            None,
            "behind is 0 or 1"
        );

        let answers = [
            SectionAnswer::Held(vec![Outcome::Stored, Outcome::Full("at the limit".into())]),
            SectionAnswer::Gone,
            SectionAnswer::Left(vec![Outcome::Stored]),
        ];
        let text = SectionAnswer::encode_all(&answers);
        assert_eq!(
            text,
            "held\nstored\nfull at the limit\ngone\nleft\nstored\n"
        );
        assert_eq!(SectionAnswer::decode_all(&text, &[2, 3, 1]), answers);
        let short = SectionAnswer::decode_all("held\nstored\n", &[2, 1]);
        assert_eq!(
            short,
            [
                SectionAnswer::Held(vec![Outcome::Stored, Outcome::Failed(Failure::NoAnswer)]),
                SectionAnswer::Left(vec![Outcome::Failed(Failure::NoAnswer)]),
            ],
            "not covered: failed without an answer, never sent again"
        );
    }

    #[test]
    fn a_batch_splits_into_whole_frames_only() {
        let a = crate::protocol::notice(crate::protocol::Code::Pong, "a");
        let b = crate::protocol::notice(crate::protocol::Code::Pong, "bb");
        let batch = Bytes::from([a.clone(), b.clone()].concat());
        assert_eq!(split_frames(&batch), Some(vec![a, b]));
        assert_eq!(split_frames(&Bytes::new()), Some(vec![]));
        assert_eq!(split_frames(&batch.slice(..batch.len() - 1)), None);
        assert_eq!(split_frames(&batch.slice(..4)), None);
    }

    #[test]
    fn a_full_subject_is_told_from_other_refusals() {
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        let js = |text: &str, code: u64| -> async_nats::jetstream::Error {
            let json = format!(r#"{{"code":503,"err_code":{code},"description":"{text}"}}"#);
            serde_json::from_str(&json).expect("an error")
        };
        let full = PublishError::with_source(
            PublishErrorKind::Other,
            js("maximum messages per subject exceeded", 10077),
        );
        assert_eq!(refused(&full), Refused::Full);
        let other = PublishError::with_source(PublishErrorKind::Other, js("disk full", 10077));
        assert!(matches!(refused(&other), Refused::Failed(t) if t.contains("disk full")));
        let timeout = PublishError::new(PublishErrorKind::TimedOut);
        assert!(matches!(refused(&timeout), Refused::Failed(_)));
    }

    #[test]
    fn outcomes_cross_between_nodes_with_their_words() {
        let sent = [
            Outcome::Stored,
            Outcome::Full("holds the limit of --mailbox-max-messages".into()),
            Outcome::Failed(Failure::NatsUnreachable),
        ];
        let text = encode_outcomes(&sent);
        assert_eq!(
            text,
            "stored\nfull holds the limit of --mailbox-max-messages\nfailed NATS is unreachable\n"
        );
        let mut lines = text.lines();
        let got: Vec<Outcome> = (0..4).map(|_| decode_outcome(lines.next())).collect();
        assert_eq!(got[0], Outcome::Stored);
        assert_eq!(got[1], sent[1]);
        // A refusal keeps its words, as the other node's.
        assert_eq!(
            got[2],
            Outcome::Failed(Failure::Remote("NATS is unreachable".into()))
        );
        if let Outcome::Failed(why) = &got[2] {
            assert_eq!(why.to_string(), "NATS is unreachable");
        }
        assert_eq!(got[3], Outcome::Failed(Failure::NoAnswer));
    }
}
