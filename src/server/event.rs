//! What connection tasks tell the broker: the broker's inbox, shared by the reader,
//! the writer and the listener, so none of them depends on the broker itself.

use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;

pub use crate::ids::{ConnId, Ticket};
use crate::protocol::Inbound;
use crate::protocol::session::{Device, Query};
use crate::server::outbox::{Outbox, Outgoing};
use crate::store::Stored;

#[derive(Debug)]
pub enum Event {
    /// A connection was accepted; its writer reads `outbox`.
    Connected { conn: ConnId, outbox: Arc<Outbox> },
    /// Frames a reader decoded, in order; `bytes` of the inbound budget to give back.
    Requests {
        conn: ConnId,
        requests: Vec<Request>,
        bytes: usize,
    },
    /// The reader stopped: end of stream, or a protocol violation answered by `notice`.
    Closed { conn: ConnId, notice: Option<Bytes> },
    /// The writer wrote the last frame of a mailbox page (`page_end`), or frames of
    /// batches forwarded by other nodes whose answers waited for delivery
    /// (`delivered`: whose answer, sequence). A connection's echo that waited for a
    /// write is settled by the writer in that connection's outbox, not here.
    Written {
        conn: ConnId,
        page_end: bool,
        delivered: Vec<(Ticket, u64)>,
    },
    /// The writer finished; `undelivered` is what it never wrote.
    WriterDone {
        conn: ConnId,
        undelivered: Vec<Outgoing>,
    },
    /// A client's mailbox delivery has waited `--frame-timeout` for acks (the wait
    /// numbered `stall`).
    AckTimeout { conn: ConnId, stall: u64 },
    /// An operator disconnects connections (the admin listener): each gets the
    /// `disconnected` notice with `why`, after what is queued for it.
    Disconnect { who: Who, why: String },
    /// An operator asks what is stored for `id` (the admin listener).
    Measure {
        id: u32,
        answer: oneshot::Sender<Stored>,
    },
    /// An operator deletes everything stored for `id`: its connections here get the
    /// `disconnected` notice with `why` first, then the store forgets it.
    Forget {
        id: u32,
        why: String,
        answer: oneshot::Sender<Stored>,
    },
    /// The node is draining: every connection is asked to reconnect (elsewhere).
    Drain,
    /// Stop: close every connection after flushing it, then return.
    Shutdown,
}

/// Whom an operator disconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// One connection.
    Conn(ConnId),
    /// Every connection bound to the id, on every device.
    Id(u32),
}

#[derive(Debug)]
pub enum Request {
    /// Bind the connection to `id` (already authenticated, when auth is on); with
    /// `acks`, also turn acknowledged delivery on (control operation 3).
    Hello {
        id: u32,
        acks: bool,
    },
    /// Bind the connection to one of `id`'s named devices, with acks on (control
    /// operation 4; already authenticated, when auth is on).
    Session {
        id: u32,
        device: Device,
    },
    /// A session's question about its id's history (control operations 5-7).
    Query(Query),
    /// A query whose body is wrong: answered with a `query-failed` record naming
    /// `request` (or `bad-control` without a session).
    BadQuery {
        request: u32,
        why: String,
    },
    Ping,
    /// The client's running count of data frames handled (control operation 2).
    Ack {
        h: u32,
    },
    /// A control frame the server cannot take; `detail` says why.
    BadControl {
        detail: String,
    },
    /// The reader tells the client it has been over its rate limit for a while
    /// (`rate-limited`, the connection stays).
    RateLimited {
        detail: String,
    },
    Data(Inbound),
}

impl Request {
    /// Bytes this request holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Request::Data(frame) => frame.wire.len(),
            _ => 0,
        }
    }
}
