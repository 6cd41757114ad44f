//! The broker: one task that owns every routing decision.
//!
//! Readers send it [`Event`]s; it owns the map of connected clients (id -> connection)
//! and pushes each outbound frame into the right connection's [`Outbox`]. Because one
//! loop sees every event in order, binding, takeover, forwarding and the mailbox need no
//! locks, and ordering per (sender, receiver) pair follows from the order of events.
//!
//! The broker never waits on a client: outboxes are pushed to without blocking, and a
//! receiver whose outbox passes `--max-pending-bytes` is disconnected. The only thing it
//! awaits is room in the store's queue, which the store thread empties on its own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt, select_biased};

use crate::protocol::{Code, Inbound, SERVER_ID, notice};
use crate::server::budget::Budget;
use crate::server::writer::{Close, Origin, Outbox, Outgoing};
use crate::store::{Command, Outcome, Reply};

/// Identifies one accepted connection for its whole life.
pub type ConnId = u64;

/// Mailbox pages are at most this large (and at most half the pending limit).
const PAGE_BYTES: usize = 1024 * 1024;
/// Bytes of frames the store may have queued before the broker waits for it.
const STORE_BUDGET: usize = 8 * 1024 * 1024;

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
    /// The last frame of a mailbox page was written.
    PageWritten { conn: ConnId },
    /// The writer finished; `undelivered` is what it never wrote.
    WriterDone {
        conn: ConnId,
        undelivered: Vec<Outgoing>,
    },
    /// Stop: close every connection after flushing it, then return.
    Shutdown,
}

#[derive(Debug)]
pub enum Request {
    /// Bind the connection to `id` (already authenticated, when auth is on).
    Hello {
        id: u32,
    },
    Ping,
    /// A control frame with an operation this server does not know.
    BadControl {
        op: u32,
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

struct Conn {
    outbox: Arc<Outbox>,
    id: Option<u32>,
    closing: bool,
    /// Replies in the order their frames arrived. A frame for an offline receiver
    /// holds its place until the store has committed it.
    replies: VecDeque<Reply_>,
    mailbox: Mailbox,
}

enum Reply_ {
    Ready(Bytes),
    /// The echo to send once the store has the frame.
    Storing(Bytes),
}

/// Where a bound connection is in delivering its stored frames. Until it is `Live`,
/// frames for it go to the store, behind what is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mailbox {
    Live,
    /// Waiting for an earlier connection with the same id to hand back its queue.
    Waiting,
    /// A page read is in flight; `stored` says frames were stored since it was asked.
    Loading {
        after: Option<u64>,
        stored: bool,
    },
    /// A page is being written; the next one starts after `after`.
    Writing {
        after: u64,
    },
}

pub struct Broker {
    /// `--max-pending-bytes`: a receiver with more waiting is cut off.
    max_pending_bytes: usize,
    conns: HashMap<ConnId, Conn>,
    online: HashMap<u32, ConnId>,
    /// Ids whose previous connection has not yet handed back its queue, with a count.
    returning: HashMap<u32, usize>,
    store: mpsc::Sender<Command>,
    /// Bytes sent to the store and not yet acknowledged; see [`STORE_BUDGET`].
    storing: usize,
    inbound: Arc<Budget>,
    next_seq: u64,
    shutting_down: bool,
}

impl Broker {
    pub fn new(
        max_pending_bytes: usize,
        store: mpsc::Sender<Command>,
        inbound: Arc<Budget>,
        next_seq: u64,
    ) -> Self {
        Broker {
            max_pending_bytes,
            storing: 0,
            inbound,
            conns: HashMap::new(),
            online: HashMap::new(),
            returning: HashMap::new(),
            store,
            next_seq,
            shutting_down: false,
        }
    }

    /// Runs until shutdown has closed every connection.
    pub async fn run(
        mut self,
        events: mpsc::Receiver<Event>,
        replies: mpsc::UnboundedReceiver<Reply>,
    ) {
        // Fused, so a finished stream drops out of the select instead of spinning.
        let (mut events, mut replies) = (events.fuse(), replies.fuse());
        loop {
            if self.shutting_down && self.conns.is_empty() {
                break;
            }
            if self.storing > STORE_BUDGET {
                // The store is behind: only its replies make room, so take no new
                // frames until they do. Readers wait, and TCP pushes back on clients.
                match replies.next().await {
                    Some(reply) => self.on_store(reply).await,
                    None => break,
                }
                continue;
            }
            select_biased! {
                reply = replies.next() => match reply {
                    Some(reply) => self.on_store(reply).await,
                    None => {
                        log::error!("store thread stopped; shutting down");
                        self.shutdown();
                    }
                },
                event = events.next() => match event {
                    Some(event) => self.on_event(event).await,
                    None => break,
                },
            }
        }
        log::debug!("broker stopped");
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { conn, outbox } => {
                if self.shutting_down {
                    outbox.close(Close {
                        notice: Some(notice(Code::ShuttingDown, "server is stopping")),
                        drain: false,
                    });
                }
                self.conns.insert(
                    conn,
                    Conn {
                        outbox,
                        id: None,
                        closing: self.shutting_down,
                        replies: VecDeque::new(),
                        mailbox: Mailbox::Live,
                    },
                );
            }
            Event::Requests {
                conn,
                requests,
                bytes,
            } => {
                for request in requests {
                    if self.conns.get(&conn).is_none_or(|c| c.closing) {
                        break;
                    }
                    self.on_request(conn, request).await;
                }
                self.inbound.release(bytes);
            }
            Event::Closed { conn, notice } => {
                let drain = true;
                self.close(conn, Close { notice, drain });
            }
            Event::PageWritten { conn } => {
                if let Some(Mailbox::Writing { after }) = self.live_conn(conn).map(|c| c.mailbox) {
                    self.load_page(conn, Some(after)).await;
                }
            }
            Event::WriterDone { conn, undelivered } => self.on_writer_done(conn, undelivered).await,
            Event::Shutdown => self.shutdown(),
        }
    }

    fn shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        log::info!("closing {} connections", self.conns.len());
        self.shutting_down = true;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in ids {
            let notice = Some(notice(Code::ShuttingDown, "server is stopping"));
            self.close(
                conn,
                Close {
                    notice,
                    drain: true,
                },
            );
        }
    }

    fn live_conn(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&conn).filter(|c| !c.closing)
    }

    async fn on_request(&mut self, conn: ConnId, request: Request) {
        match request {
            Request::Ping => self.reply(conn, notice(Code::Pong, "server is up")),
            Request::BadControl { op } => self.reply(
                conn,
                notice(
                    Code::BadControl,
                    format_args!("unknown control operation {op}"),
                ),
            ),
            Request::Hello { id } => {
                if self.bind(conn, id).await {
                    self.reply(
                        conn,
                        notice(Code::Welcome, format_args!("bound to id {id}")),
                    );
                }
            }
            Request::Data(frame) => {
                if self.bind(conn, frame.sender()).await {
                    self.route(conn, frame).await;
                }
            }
        }
    }

    /// Binds `conn` to `id` on its first frame; afterwards, checks that frames carry the
    /// bound id. Refusals get a `bad-sender` notice and go nowhere.
    async fn bind(&mut self, conn: ConnId, id: u32) -> bool {
        let Some(c) = self.live_conn(conn) else {
            return false;
        };
        let refusal = match c.id {
            _ if id == SERVER_ID => format!("sender {SERVER_ID} is reserved for the server"),
            Some(bound) if bound == id => return true,
            Some(bound) => format!("sender {id} is not this connection's id {bound}"),
            None => {
                c.id = Some(id);
                if let Some(old) = self.online.insert(id, conn) {
                    log::info!("id {id}: connection {conn} replaces {old}");
                    self.close(
                        old,
                        Close {
                            notice: Some(notice(
                                Code::Replaced,
                                format_args!("id {id} connected elsewhere"),
                            )),
                            drain: false,
                        },
                    );
                }
                if self.returning.contains_key(&id) {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.mailbox = Mailbox::Waiting;
                    }
                } else {
                    self.load_page(conn, None).await;
                }
                return true;
            }
        };
        self.reply(conn, notice(Code::BadSender, refusal));
        false
    }

    /// Delivers a data frame and echoes it once it is delivered or stored.
    async fn route(&mut self, conn: ConnId, frame: Inbound) {
        let sender = frame.sender();
        let receiver = frame.receiver;
        if receiver == SERVER_ID || receiver == sender {
            return self.reply(conn, frame.wire);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(&rc) = self.online.get(&receiver) {
            let limit = self.max_pending_bytes;
            let target = self.conns.get_mut(&rc).filter(|c| !c.closing);
            match target {
                Some(c) if c.mailbox == Mailbox::Live => {
                    // An empty outbox takes any frame, however large the frame.
                    let pending = c.outbox.pending_bytes();
                    let item = Outgoing {
                        wire: frame.wire.clone(),
                        origin: Origin::Live { seq },
                    };
                    let fits = pending == 0 || pending + frame.wire.len() <= limit;
                    if !fits {
                        self.cut_slow_consumer(rc, receiver);
                    } else if c.outbox.push(item).is_ok() {
                        return self.reply(conn, frame.wire);
                    }
                    // Otherwise its writer has already finished: the connection is
                    // going, and the frame goes to the mailbox like any for an offline id.
                }
                Some(c) => {
                    if let Mailbox::Loading { stored, .. } = &mut c.mailbox {
                        *stored = true;
                    }
                }
                None => {}
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.replies.push_back(Reply_::Storing(frame.wire.clone()));
        }
        self.storing += frame.wire.len();
        self.send_store(Command::Append {
            ticket: Some(conn),
            receiver,
            seq,
            wire: frame.wire,
        })
        .await;
    }

    /// Disconnects a receiver that has more than `--max-pending-bytes` waiting; what it
    /// has not been sent goes back to its mailbox when its writer stops.
    fn cut_slow_consumer(&mut self, conn: ConnId, id: u32) {
        let limit = self.max_pending_bytes;
        log::warn!("id {id}: slow consumer, {limit} bytes pending; disconnecting");
        let detail =
            format_args!("more than {limit} bytes waiting; undelivered frames kept in the mailbox");
        let notice = Some(notice(Code::SlowConsumer, detail));
        self.close(
            conn,
            Close {
                notice,
                drain: false,
            },
        );
    }

    /// Queues a reply behind any that wait for the store, so replies keep frame order.
    fn reply(&mut self, conn: ConnId, wire: Bytes) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.replies.is_empty() {
                c.outbox.push_reply(wire);
            } else {
                c.replies.push_back(Reply_::Ready(wire));
            }
        }
    }

    async fn on_store(&mut self, reply: Reply) {
        match reply {
            Reply::Appended {
                ticket,
                outcome,
                len,
            } => {
                self.storing = self.storing.saturating_sub(len);
                let Some(c) = self.conns.get_mut(&ticket) else {
                    return;
                };
                let Some(slot) = c
                    .replies
                    .iter_mut()
                    .find(|r| matches!(r, Reply_::Storing(_)))
                else {
                    return;
                };
                if let Reply_::Storing(echo) = slot {
                    let wire = match outcome {
                        Outcome::Stored => echo.clone(),
                        Outcome::Full(why) => {
                            notice(Code::MailboxFull, format_args!("receiver's mailbox {why}"))
                        }
                        Outcome::Failed(why) => {
                            notice(Code::StoreFailed, format_args!("frame not stored: {why}"))
                        }
                    };
                    *slot = Reply_::Ready(wire);
                }
                while let Some(Reply_::Ready(_)) = c.replies.front() {
                    if let Some(Reply_::Ready(wire)) = c.replies.pop_front() {
                        c.outbox.push_reply(wire);
                    }
                }
            }
            Reply::Page {
                ticket,
                receiver,
                frames,
            } => {
                let Some(c) = self.conns.get_mut(&ticket).filter(|c| !c.closing) else {
                    return;
                };
                let Mailbox::Loading { after, stored } = c.mailbox else {
                    return;
                };
                let Some(&(last, _)) = frames.last() else {
                    if stored {
                        // Frames were stored after this read was asked for: read again.
                        self.load_page(ticket, after).await;
                    } else {
                        c.mailbox = Mailbox::Live;
                    }
                    return;
                };
                log::debug!("id {receiver}: delivering {} stored frames", frames.len());
                for (seq, wire) in frames {
                    // If the connection is gone the frames are still in the store.
                    let _ = c.outbox.push(Outgoing {
                        wire,
                        origin: Origin::Mailbox {
                            receiver,
                            seq,
                            last: seq == last,
                        },
                    });
                }
                c.mailbox = Mailbox::Writing { after: last };
            }
        }
    }

    /// Asks the store for the next page of `conn`'s mailbox.
    async fn load_page(&mut self, conn: ConnId, after: Option<u64>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(receiver) = c.id else {
            return;
        };
        c.mailbox = Mailbox::Loading {
            after,
            stored: false,
        };
        let max_bytes = PAGE_BYTES.min(self.max_pending_bytes / 2);
        self.send_store(Command::Load {
            ticket: conn,
            receiver,
            after,
            max_bytes,
        })
        .await;
    }

    /// Starts closing a connection and takes it offline. It stays in `conns` until its
    /// writer hands back what it did not write.
    fn close(&mut self, conn: ConnId, close: Close) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.outbox.close(close);
        if c.closing {
            return;
        }
        c.closing = true;
        if let Some(id) = c.id {
            if self.online.get(&id) == Some(&conn) {
                self.online.remove(&id);
            }
            *self.returning.entry(id).or_default() += 1;
        }
    }

    /// Stores what a finished writer did not write, then lets a waiting connection with
    /// the same id read its mailbox, which now includes those frames.
    async fn on_writer_done(&mut self, conn: ConnId, undelivered: Vec<Outgoing>) {
        // A writer can stop before the broker has heard that its reader did (the reader
        // abandons the outbox at once); take the connection offline first, so frames
        // for its id go to the mailbox and the hand-back is counted as for any close.
        self.close(
            conn,
            Close {
                notice: None,
                drain: false,
            },
        );
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let Some(id) = c.id else {
            return;
        };
        let mut returned = 0;
        for item in undelivered {
            if let Origin::Live { seq } = item.origin {
                returned += 1;
                self.send_store(Command::Append {
                    ticket: None,
                    receiver: id,
                    seq,
                    wire: item.wire,
                })
                .await;
            }
        }
        if returned > 0 {
            log::info!("id {id}: {returned} undelivered frames returned to the mailbox");
        }
        let Some(count) = self.returning.get_mut(&id) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.returning.remove(&id);
        let waiting = self.online.get(&id).copied().filter(|next| {
            self.conns
                .get(next)
                .is_some_and(|c| c.mailbox == Mailbox::Waiting)
        });
        if let Some(next) = waiting {
            self.load_page(next, None).await;
        }
    }

    async fn send_store(&mut self, command: Command) {
        if self.store.send(command).await.is_err() {
            log::error!("store is gone; frame not stored");
        }
    }
}
