//! The store: every frame for another id, from its acceptance until its delivery.
//!
//! The broker talks to the store through one bounded command queue and one reply
//! stream, in the [`Command`]s and [`Reply`]s below, whichever implementation answers:
//!
//! - [`embedded`]: one node; frames in a redb file under `--data-dir`, on a thread of
//!   its own.
//! - a cluster's: frames in a replicated JetStream stream shared by every node, reached
//!   through the NATS link's thread ([`crate::cluster`]). Its queue also carries what
//!   only a cluster needs (releasing ids, forwarded frames), in types of the cluster's
//!   own ([`crate::cluster::msg`]), so nothing here is meant for one of them only.
//!
//! Both keep the same promises: commands are applied in the order they were sent (a
//! load sees every append sent before it); an `Appended` reply with
//! [`Outcome::Stored`] means the frame survives `kill -9` of this process, or was
//! already delivered; a live append may be held back briefly and dropped if its
//! delivery comes first; when storage fails, appends are refused at once and loads
//! and deletes wait for recovery.

mod deliveries;
pub use deliveries::{Deliveries, Wake};
pub mod embedded;
mod history;
mod log;
mod stage;
mod tables;
mod upgrade;
mod vacuum;

use std::time::Duration;

use bytes::Bytes;
use futures::channel::{mpsc, oneshot};

pub use crate::ids::Endpoint;
use crate::protocol::session::Query;
pub use embedded::Faults;
pub(crate) use stage::Stage;
pub use vacuum::{VacuumError, Vacuumed, vacuum};

/// The store's file in `--data-dir`.
pub const FILE: &str = "mailbox.redb";

/// Commands waiting beyond this make senders wait: the store's queue is bounded.
pub(crate) const QUEUE: usize = 8192;

pub use crate::ids::Ticket;

/// Per-receiver mailbox limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_messages: u64,
    pub max_bytes: u64,
    /// Of those, what one sender's frames may take in one device's inbox, so that a
    /// flood from one sender is refused while the receiver's other contacts get
    /// through (the embedded store; a cluster's stream bounds each receiver only). A
    /// copy of an id's own frame for its other devices is not bounded by it.
    pub per_sender: PerSender,
}

/// `--mailbox-max-per-sender`, `--mailbox-max-bytes-per-sender`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerSender {
    pub messages: u64,
    pub bytes: u64,
}

impl PerSender {
    /// No bound beyond the receiver's.
    pub const OFF: PerSender = PerSender {
        messages: u64::MAX,
        bytes: u64::MAX,
    };

    /// The default: a quarter of the receiver's limits, and room for at least one
    /// frame of `max_frame` bytes (its wire encoding), so that a sender's largest frame
    /// to an empty mailbox is never refused for its share.
    pub fn quarter_of(max_messages: u64, max_bytes: u64, max_frame: u64) -> PerSender {
        PerSender {
            messages: (max_messages / 4).max(1),
            bytes: (max_bytes / 4).max(max_frame),
        }
    }
}

/// How long what was delivered is kept, and how much of it per conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// `--history-max-age`; zero turns history off (a frame goes once delivered).
    pub max_age: Duration,
    /// `--history-max-messages`: entries per conversation.
    pub max_messages: u64,
    /// `--history-max-bytes`: bytes per conversation.
    pub max_bytes: u64,
}

impl History {
    pub fn on(&self) -> bool {
        !self.max_age.is_zero()
    }

    /// History off: today's delete-on-delivery.
    pub fn off() -> History {
        History {
            max_age: Duration::ZERO,
            ..History::default()
        }
    }
}

/// A device a frame is for; `live` when it is being pushed to it now (its outbox
/// bounds it, so the mailbox limits do not refuse it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub endpoint: Endpoint,
    pub live: bool,
}

/// What the broker adds about a frame when its sender or receiver opened sessions:
/// the named devices it pushed the frame to live, and the sender's device. The store
/// knows every device of an id (it fans the frame out to those that are away).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fanout {
    pub live: Vec<Endpoint>,
    /// The sender's device that sent it.
    pub origin: Option<u16>,
}

/// How a connection reads its stored frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// As the seed's frames.
    Plain,
    /// As a session: with envelopes.
    Session,
    /// As a session starting: its `sync` record first (`new`: a device the server did
    /// not know). `bound`: when it was asked for, at the session's bind (ms since the
    /// epoch): in a cluster, an id's first device starts with what was accepted since,
    /// however long the read waits.
    SessionStart { new: bool, bound: u64 },
}

/// A change to an id's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    /// The device connected (for the first time, or again), at `now` (ms).
    Seen { name: String, now: u64 },
    /// The device is forgotten, with everything waiting for it.
    Forget,
}

#[derive(Debug)]
pub enum Command {
    /// Store a frame for `receiver`; an `Appended` reply follows the commit. A `live`
    /// frame is also being pushed to its connected receiver, whose outbox bounds it, so
    /// the mailbox limits do not apply to it (they still count it while it is stored).
    /// `time` is when the broker accepted it (ms since the epoch). Without a `fanout`
    /// the frame is for the receiver's default device only.
    Append {
        ticket: Ticket,
        receiver: u32,
        seq: u64,
        wire: Bytes,
        live: bool,
        time: u64,
        fanout: Option<Box<Fanout>>,
    },
    /// Read up to `max_bytes` of what `receiver`'s `device` waits for, after sequence
    /// `after`.
    Load {
        ticket: Ticket,
        receiver: u32,
        device: u16,
        after: Option<u64>,
        max_bytes: usize,
        reading: Reading,
    },
    /// Remove frames that have been delivered to `receiver`'s `device`.
    Delete {
        receiver: u32,
        device: u16,
        seqs: Vec<u64>,
    },
    /// Record a change to a device of an id.
    Device {
        endpoint: Endpoint,
        change: DeviceChange,
    },
    /// Answer a session's query about `id`'s history.
    Query {
        ticket: Ticket,
        id: u32,
        query: Query,
    },
    /// Say what is stored for `id` (the admin API), once everything sent before is in.
    Measure {
        id: u32,
        answer: oneshot::Sender<Stored>,
    },
    /// Delete everything stored for `id` (the admin API's "forget this user"): what
    /// waits for its devices, the devices, its conversations' history and rows (the
    /// peers' rows of those conversations too). Frames it sent that wait for others
    /// stay: they are the others' mail. Answered with what was there, once committed.
    Forget {
        id: u32,
        answer: oneshot::Sender<Stored>,
    },
}

/// What a store holds for one id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// Frames waiting for the id's devices, counted once per device that waits.
    pub mailbox_messages: u64,
    /// Their bytes, where the store can tell (a cluster's stream counts messages per
    /// subject only).
    pub mailbox_bytes: Option<u64>,
    /// Entries in the history of the id's conversations (a frame between two ids is
    /// one entry of their conversation), and their bytes.
    pub history_messages: u64,
    pub history_bytes: u64,
    /// The id's rows in the conversation list.
    pub conversations: u64,
    /// The devices the store remembers for it (the default device counts once seen).
    pub devices: u64,
}

impl Stored {
    pub fn is_empty(&self) -> bool {
        self.mailbox_messages == 0
            && self.history_messages == 0
            && self.conversations == 0
            && self.devices == 0
    }
}

#[derive(Debug)]
pub enum Reply {
    /// `len` is the frame's size, so the broker can account for it.
    Appended {
        ticket: Ticket,
        seq: u64,
        outcome: Outcome,
        len: usize,
    },
    Page {
        ticket: Ticket,
        receiver: u32,
        /// Frames this connection holds back to push once its mailbox is read (the
        /// broker's numbers) that are in the store ahead of `frames`: pushed first.
        /// Only a cluster's stream, which other nodes write to, has any.
        held: Vec<u64>,
        frames: Vec<(u64, Bytes)>,
        /// A session's `sync` record, to push before the frames (first reads of
        /// sessions only).
        sync: Option<Bytes>,
    },
    /// The answer to a query, for the asking connection.
    Answer { ticket: Ticket, frames: Vec<Bytes> },
    /// A read marker of `id` moved: every session of the id gets the record (the
    /// ticket is the asking connection's).
    Read {
        ticket: Ticket,
        id: u32,
        record: Bytes,
    },
    /// The store went down (with the reason) or came back (`None`).
    Health(Option<String>),
    /// Named devices last seen before history's retention (`--history-max-age`): the
    /// broker forgets those that are not online (a device online for that long was
    /// last *recorded* then too).
    Idle(Vec<Endpoint>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed, or delivered before it needed to be.
    Stored,
    /// The receiver's mailbox is at its limit; the detail says which.
    Full(String),
    /// The frame could not be stored (nor delivered in its place); why.
    Failed(Failure),
}

/// Why a frame could not be stored. Its text is the detail of the sender's
/// `store-failed` notice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The store's own error: a failed write, sync or publish.
    #[error("{0}")]
    Store(String),
    /// The store is down (since the error given) and takes nothing until it recovers.
    #[error("store unavailable: {0}")]
    Down(String),
    /// The store is down and the receiver is not online to take the frame instead.
    #[error("store unavailable ({reason}) and receiver {receiver} offline")]
    Unavailable { reason: String, receiver: u32 },
    /// The store is down and the receiver left before the frame was written to it.
    #[error("the store is unavailable and the receiver left first")]
    ReceiverLeft,
    /// A cluster node without its link to NATS.
    #[error("NATS is unreachable")]
    NatsUnreachable,
    /// The node holding the receiver did not answer for this frame.
    #[error("the receiving node gave no answer")]
    NoAnswer,
    /// A cluster node had no outcome for the frame within this long
    /// (`--answer-within`: a node or NATS is slow or cut off): the sender hears so
    /// rather than nothing. The frame may
    /// still be stored and delivered.
    #[error("no answer within {} s (a node or NATS is slow); it may still be delivered", .0.as_secs_f64())]
    Late(std::time::Duration),
    /// The node holding the receiver refused it, in its words.
    #[error("{0}")]
    Remote(String),
}

/// The store's command queue, its reply stream, and what it was opened with. A
/// cluster's actor is a store with more to say: `Store<ToCluster, FromCluster>`
/// ([`crate::cluster::msg`]).
pub struct Store<C = Command, R = Reply> {
    pub commands: mpsc::Sender<C>,
    /// Replies come in batches, one per transaction, to wake the broker once for all.
    pub replies: mpsc::UnboundedReceiver<Vec<R>>,
    /// The next unused sequence number: higher than any stored.
    pub next_seq: u64,
    /// Every device the store knows (none in a cluster, for now).
    pub devices: Vec<KnownDevice>,
    /// Where writers leave what they delivered, on one node (a cluster's actor takes
    /// deliveries as commands).
    pub deliveries: Option<std::sync::Arc<Deliveries>>,
    /// Completes when the store thread has committed everything and exited, which it
    /// does once every `commands` sender is dropped.
    pub closed: oneshot::Receiver<()>,
}

/// A device an id has used, as the store remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDevice {
    pub endpoint: Endpoint,
    pub name: String,
    /// ms since the Unix epoch.
    pub last_seen: u64,
}

/// The sender of a frame in the server -> client encoding.
pub fn author_of(wire: &[u8]) -> u32 {
    tables::Entry::author_of(wire)
}

pub use embedded::now_ms;

/// The reply to an append with `outcome` (`None` for other commands).
pub(crate) fn answer(cmd: Command, outcome: Outcome) -> Option<Reply> {
    match cmd {
        Command::Append {
            ticket, seq, wire, ..
        } => Some(Reply::Appended {
            ticket,
            seq,
            outcome,
            len: wire.len(),
        }),
        _ => None,
    }
}

/// The reply to an append that was delivered before it needed writing.
pub(crate) fn settled(cmd: Command) -> Option<Reply> {
    answer(cmd, Outcome::Stored)
}

/// Why a receiver's mailbox cannot take `len` more bytes, if it cannot.
pub(crate) fn full(limits: &Limits, messages: u64, bytes: u64, len: usize) -> Option<String> {
    if messages >= limits.max_messages {
        Some(format!("holds {messages} messages, the limit"))
    } else if bytes + len as u64 > limits.max_bytes {
        Some(format!(
            "holds {bytes} bytes; {len} more would pass the limit of {}",
            limits.max_bytes
        ))
    } else {
        None
    }
}

/// Why a device's inbox cannot take `len` more bytes from one sender that has
/// `messages` frames of `bytes` waiting there, if it cannot.
pub(crate) fn full_from(
    limits: &Limits,
    sender: u32,
    messages: u64,
    bytes: u64,
    len: usize,
) -> Option<String> {
    let per = limits.per_sender;
    if messages >= per.messages {
        Some(format!(
            "holds {messages} frames from {sender}, the limit for one sender"
        ))
    } else if bytes + len as u64 > per.bytes {
        Some(format!(
            "holds {bytes} bytes from {sender}; {len} more would pass the limit of {} for one sender",
            per.bytes
        ))
    } else {
        None
    }
}
