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

mod remote;
mod replies;
mod storage;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt, select_biased};

use crate::metrics::Metrics;
use crate::protocol::{Code, Inbound, SERVER_ID, notice};
use crate::rt;
use crate::server::budget::Budget;
use crate::server::event::{ConnId, Event, Request, Ticket};
use crate::server::outbox::{Close, Origin, Outbox, Outgoing};
use crate::store::{Command, Failure, Outcome, Reply};
use remote::Remote;
use replies::Replies;
use storage::Storage;

/// Mailbox pages are at most this large (and at most half the pending limit).
const PAGE_BYTES: usize = 1024 * 1024;

struct Conn {
    outbox: Arc<Outbox>,
    id: Option<u32>,
    closing: bool,
    /// Replies in the order their frames arrived (see [`replies`]).
    replies: Replies,
    mailbox: Mailbox,
    /// The last stored frame pushed to this connection from its mailbox: frames stored
    /// later (by another node) are read after it.
    paged: Option<u64>,
    /// Frames that arrived while the mailbox was being read, in order: pushed once it
    /// has been, so they follow it. They are stored as live frames, which mailbox
    /// reads after the first leave out.
    backlog: VecDeque<Outgoing>,
    backlog_bytes: usize,
}

/// Where a bound connection is in delivering its stored frames. Until it is `Live`,
/// frames for it go to the store, behind what is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mailbox {
    Live,
    /// Waiting for an earlier connection with the same id to finish writing.
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
    /// A page was written, and the next waits until acks make room for it; `stall`
    /// tells this wait from a later one when its timer fires.
    AwaitingAcks {
        after: u64,
        stall: u64,
    },
}

pub struct Broker {
    /// `--max-pending-bytes`: a receiver with more waiting is cut off.
    max_pending_bytes: usize,
    /// Boxed: the map keeps spare room for growth, and a spare place costs the size of
    /// a value; a pointer there instead of a whole `Conn` saves each idle connection
    /// about 90 bytes.
    conns: HashMap<ConnId, Box<Conn>>,
    online: HashMap<u32, ConnId>,
    /// Ids whose previous connection's writer has not finished yet, with a count.
    returning: HashMap<u32, usize>,
    /// The store's queue, the bytes it holds for us, its health (see [`storage`]).
    storage: Storage,
    inbound: Arc<Budget>,
    next_seq: u64,
    shutting_down: bool,
    /// How long a client may leave a full window unacknowledged (`--frame-timeout`).
    ack_timeout: Duration,
    /// For the timers that cut off clients that stop acknowledging.
    events: mpsc::Sender<Event>,
    metrics: Option<Arc<Metrics>>,
    stalls: u64,
    /// Outboxes pushed to while handling the current event, woken once it is done.
    pushed: Vec<Arc<Outbox>>,
    /// Batches forwarded by other nodes, until each is answered.
    remote: Remote,
    /// Answers to forwarded batches, sent once the current event is handled.
    answers: Vec<Command>,
}

impl Broker {
    pub fn new(
        max_pending_bytes: usize,
        ack_timeout: Duration,
        store: mpsc::Sender<Command>,
        events: mpsc::Sender<Event>,
        inbound: Arc<Budget>,
        next_seq: u64,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Broker {
            metrics,
            ack_timeout,
            events,
            stalls: 0,
            pushed: Vec::new(),
            remote: Remote::default(),
            answers: Vec::new(),
            max_pending_bytes,
            inbound,
            conns: HashMap::new(),
            online: HashMap::new(),
            returning: HashMap::new(),
            storage: Storage::new(store),
            next_seq,
            shutting_down: false,
        }
    }

    /// Runs until shutdown has closed every connection.
    pub async fn run(
        mut self,
        events: mpsc::Receiver<Event>,
        replies: mpsc::UnboundedReceiver<Vec<Reply>>,
    ) {
        // Fused, so a finished stream drops out of the select instead of spinning.
        let (mut events, mut replies) = (events.fuse(), replies.fuse());
        loop {
            if self.shutting_down && self.conns.is_empty() {
                break;
            }
            if self.storage.is_behind() {
                // The store is behind: only its replies make room, so take no new
                // frames until they do. Readers wait, and TCP pushes back on clients.
                match replies.next().await {
                    Some(batch) => self.on_store(batch).await,
                    None => break,
                }
                self.send_answers().await;
                self.wake_writers();
                continue;
            }
            select_biased! {
                batch = replies.next() => match batch {
                    Some(batch) => self.on_store(batch).await,
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
            self.send_answers().await;
            self.wake_writers();
        }
        self.wake_writers();
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
                    Box::new(Conn {
                        outbox,
                        id: None,
                        closing: self.shutting_down,
                        replies: Replies::default(),
                        mailbox: Mailbox::Live,
                        paged: None,
                        backlog: VecDeque::new(),
                        backlog_bytes: 0,
                    }),
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
            Event::Written {
                conn,
                page_end,
                delivered,
            } => {
                for (sender, seq) in delivered {
                    self.accepted(sender, seq, Outcome::Stored);
                }
                let mailbox = self.live_conn(conn).map(|c| c.mailbox);
                if let (true, Some(Mailbox::Writing { after })) = (page_end, mailbox) {
                    self.next_page(conn, after).await;
                }
            }
            Event::WriterDone { conn, undelivered } => self.on_writer_done(conn, undelivered).await,
            Event::AckTimeout { conn, stall } => {
                let waiting = self.live_conn(conn).map(|c| (c.mailbox, c.id));
                if let Some((Mailbox::AwaitingAcks { stall: s, .. }, Some(id))) = waiting
                    && s == stall
                {
                    self.cut_slow_consumer(conn, id);
                }
            }
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

    fn wake_writers(&mut self) {
        for outbox in self.pushed.drain(..) {
            outbox.wake();
        }
    }

    fn live_conn(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns
            .get_mut(&conn)
            .map(|c| &mut **c)
            .filter(|c| !c.closing)
    }

    async fn on_request(&mut self, conn: ConnId, request: Request) {
        match request {
            Request::Ping => self.reply(conn, notice(Code::Pong, "server is up")),
            Request::BadControl { detail } => self.reply(conn, notice(Code::BadControl, detail)),
            Request::Hello { id, acks } => self.hello(conn, id, acks).await,
            Request::Ack { h } => self.ack(conn, h).await,
            Request::Data(frame) => {
                if self.bind(conn, frame.sender()).await {
                    self.route(conn, frame).await;
                }
            }
        }
    }

    async fn hello(&mut self, conn: ConnId, id: u32, acks: bool) {
        let was_bound = self.conns.get(&conn).is_some_and(|c| c.id.is_some());
        if !acks {
            if self.bind(conn, id).await {
                let welcome = notice(Code::Welcome, format_args!("bound to id {id}"));
                self.reply(conn, welcome);
            }
            return;
        }
        if !was_bound {
            // Acks go on before anything is delivered: the welcome is queued at once,
            // ahead of the first mailbox page, which bind() has only asked for. An
            // unbound connection has no echo waiting that it could overtake.
            let Some(c) = self.live_conn(conn) else {
                return;
            };
            let outbox = c.outbox.clone();
            if self.bind(conn, id).await {
                let welcome = notice(Code::Welcome, format_args!("bound to id {id}, acks on"));
                let _ = outbox.push(Outgoing {
                    wire: welcome,
                    origin: Origin::AcksOn,
                });
                self.pushed.push(outbox);
            }
        } else if self.bind(conn, id).await {
            let on = notice(
                Code::AcksOn,
                "data frames after this notice are kept until acknowledged",
            );
            self.reply_item(
                conn,
                Outgoing {
                    wire: on,
                    origin: Origin::AcksOn,
                },
            );
        }
    }

    /// The client has handled `h` data frames since acks went on: what that covers is
    /// delivered and leaves the store.
    async fn ack(&mut self, conn: ConnId, h: u32) {
        let Some(c) = self.live_conn(conn) else {
            return;
        };
        let (Some(id), result) = (c.id, c.outbox.ack(h)) else {
            let detail = "acks are not on; turn them on with control operation 3";
            return self.reply(conn, notice(Code::BadControl, detail));
        };
        match result {
            Ok(seqs) => {
                if !seqs.is_empty() {
                    self.send_store(Command::Delete { receiver: id, seqs })
                        .await;
                }
                if let Some(Mailbox::AwaitingAcks { after, .. }) =
                    self.live_conn(conn).map(|c| c.mailbox)
                {
                    self.next_page(conn, after).await;
                }
            }
            Err(detail) => self.reply(conn, notice(Code::BadControl, detail)),
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
                // docker/cluster-ci.sh finds where an id is bound by this line.
                log::debug!(conn; "id {id} bound to connection {conn}");
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

    /// Stores a data frame, pushes it to its receiver if that one is online and caught
    /// up, and echoes it once it is stored.
    async fn route(&mut self, conn: ConnId, frame: Inbound) {
        let sender = frame.sender();
        let receiver = frame.receiver;
        if receiver == SERVER_ID || receiver == sender {
            return self.reply(conn, frame.wire);
        }
        self.route_wire(Ticket::Conn(conn), receiver, frame.wire)
            .await;
    }

    /// Routes frames another node forwarded for `receiver`, which is bound here, as if
    /// a local connection had sent them; their outcomes go back in one answer.
    async fn forwarded(&mut self, token: u64, receiver: u32, frames: Vec<Bytes>, behind: bool) {
        if behind {
            // Older frames of the same senders are in the mailbox: read them first;
            // these wait behind them.
            let conn = self.online.get(&receiver).copied();
            if let Some(c) = conn.and_then(|conn| self.live_conn(conn)) {
                match &mut c.mailbox {
                    Mailbox::Live => {
                        let after = c.paged.unwrap_or(0);
                        if let Some(conn) = conn {
                            self.load_page(conn, Some(after)).await;
                        }
                    }
                    Mailbox::Loading { stored, .. } => *stored = true,
                    _ => {}
                }
            }
        }
        self.remote.open(token);
        for wire in frames {
            self.route_wire(Ticket::Remote(token), receiver, wire).await;
        }
        self.answer_if_done(token);
    }

    /// Stores a frame for `receiver` and pushes it live if it can; `from` is the local
    /// connection it came from, or a batch another node forwarded.
    async fn route_wire(&mut self, from: Ticket, receiver: u32, wire: Bytes) {
        let frame_wire = wire;
        let seq = self.next_seq;
        self.next_seq += 1;
        let arrived = Instant::now();
        let mut live = None;
        let mut behind = None;
        if let Some(&rc) = self.online.get(&receiver) {
            let limit = self.max_pending_bytes;
            let len = frame_wire.len();
            match self.conns.get_mut(&rc).filter(|c| !c.closing) {
                Some(c) if c.mailbox == Mailbox::Live => {
                    // An empty outbox takes any frame, however large the frame.
                    let pending = c.outbox.pending_bytes();
                    if pending == 0 || pending + len <= limit {
                        live = Some(c.outbox.clone());
                    } else {
                        self.cut_slow_consumer(rc, receiver);
                    }
                }
                // Before its first read the connection's mailbox may still hold this
                // frame's predecessors: the store keeps it.
                Some(c) if c.mailbox == Mailbox::Waiting => {}
                Some(c) => {
                    let waiting = c.outbox.pending_bytes() + c.backlog_bytes;
                    if waiting == 0 || waiting + len <= limit {
                        behind = Some(rc);
                    } else {
                        self.cut_slow_consumer(rc, receiver);
                    }
                }
                None => {}
            }
        }
        if self.storage.down().is_some() {
            behind = None;
        }
        if let Some(reason) = self.storage.down() {
            // Nothing can be stored: a frame is accepted only by its delivery.
            let refused = Failure::Unavailable {
                reason: reason.to_string(),
                receiver,
            };
            let pushed = live.is_some_and(|outbox| {
                let item = Outgoing::unstored(frame_wire.clone(), receiver, seq, from, arrived);
                let ok = outbox.push(item).is_ok();
                self.pushed.push(outbox);
                ok
            });
            match from {
                _ if pushed => self.wait_for_echo(from, seq, frame_wire),
                Ticket::Remote(_) => {
                    self.wait_for_echo(from, seq, frame_wire);
                    self.accepted(from, seq, Outcome::Failed(refused));
                }
                Ticket::Conn(conn) => self.reply(conn, notice(Code::StoreFailed, refused)),
            }
            return;
        }
        self.wait_for_echo(from, seq, frame_wire.clone());
        // Stored first, then pushed: the writer's delete for this frame must reach the
        // store after its append.
        self.send_store(Command::Append {
            ticket: from,
            receiver,
            seq,
            wire: frame_wire.clone(),
            live: live.is_some() || behind.is_some(),
        })
        .await;
        if let Some(c) = behind.and_then(|rc| self.conns.get_mut(&rc)) {
            c.backlog_bytes += frame_wire.len();
            c.backlog
                .push_back(Outgoing::live(frame_wire, receiver, seq, arrived));
            return;
        }
        if let Some(outbox) = live {
            // If its writer has just finished, the frame stays in the store for the
            // receiver's next connection.
            let _ = outbox.push(Outgoing::live(frame_wire, receiver, seq, arrived));
            self.pushed.push(outbox);
        }
    }

    fn wait_for_echo(&mut self, from: Ticket, seq: u64, echo: Bytes) {
        match from {
            Ticket::Remote(token) => self.remote.wait(token, seq),
            Ticket::Conn(conn) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.replies.wait_for_echo(seq, echo);
                }
            }
        }
    }

    /// Disconnects a receiver that has more than `--max-pending-bytes` waiting; what it
    /// has not been sent stays in the store for its next connection.
    fn cut_slow_consumer(&mut self, conn: ConnId, id: u32) {
        if let Some(m) = &self.metrics {
            m.slow_consumers.inc();
        }
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

    /// Queues a reply behind any echo that waits, so replies keep frame order.
    fn reply(&mut self, conn: ConnId, wire: Bytes) {
        self.reply_item(conn, Outgoing::reply(wire));
    }

    fn reply_item(&mut self, conn: ConnId, item: Outgoing) {
        if let Some(c) = self.conns.get_mut(&conn)
            && let Some(item) = c.replies.reply(item)
        {
            let _ = c.outbox.push(item);
            self.pushed.push(c.outbox.clone());
        }
    }

    /// Settles the echo of `seq` for `from` and, on a connection, sends every reply that
    /// no longer waits.
    fn accepted(&mut self, from: Ticket, seq: u64, outcome: Outcome) {
        let conn = match from {
            Ticket::Conn(conn) => conn,
            Ticket::Remote(token) => {
                self.remote.settle(token, seq, outcome);
                return self.answer_if_done(token);
            }
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let outbox = &c.outbox;
        if c.replies.settle(seq, outcome, |item| {
            let _ = outbox.push(item);
        }) {
            self.pushed.push(c.outbox.clone());
        }
    }

    /// Answers a forwarded batch once every frame in it has its outcome.
    fn answer_if_done(&mut self, token: u64) {
        if let Some(outcomes) = self.remote.take_if_done(token) {
            self.answers.push(Command::Answer { token, outcomes });
        }
    }

    async fn send_answers(&mut self) {
        for answer in std::mem::take(&mut self.answers) {
            self.send_store(answer).await;
        }
    }

    async fn on_store(&mut self, batch: Vec<Reply>) {
        for reply in batch {
            self.on_reply(reply).await;
        }
    }

    async fn on_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Appended {
                ticket,
                seq,
                outcome,
                len,
            } => {
                self.storage.answered(len);
                self.accepted(ticket, seq, outcome);
            }
            Reply::Page {
                ticket,
                receiver,
                frames,
            } => {
                // Pages are only ever asked for a connection.
                let Ticket::Conn(conn) = ticket else {
                    return;
                };
                let Some(c) = self.conns.get_mut(&conn).filter(|c| !c.closing) else {
                    return;
                };
                let Mailbox::Loading { after, stored } = c.mailbox else {
                    return;
                };
                let Some(&(last, _)) = frames.last() else {
                    if stored {
                        // Frames were stored after this read was asked for: read again.
                        self.load_page(conn, after).await;
                    } else {
                        c.mailbox = Mailbox::Live;
                        c.backlog_bytes = 0;
                        if !c.backlog.is_empty() {
                            for item in c.backlog.drain(..) {
                                // If the connection is gone the frames are in the store.
                                let _ = c.outbox.push(item);
                            }
                            self.pushed.push(c.outbox.clone());
                        }
                    }
                    return;
                };
                log::debug!("id {receiver}: delivering {} stored frames", frames.len());
                for (seq, wire) in frames {
                    // If the connection is gone the frames are still in the store.
                    let _ = c
                        .outbox
                        .push(Outgoing::stored(wire, receiver, seq, seq == last));
                }
                c.mailbox = Mailbox::Writing { after: last };
                c.paged = Some(last);
                self.pushed.push(c.outbox.clone());
            }
            Reply::Mail { receiver } => {
                let Some(&conn) = self.online.get(&receiver) else {
                    return;
                };
                let Some(c) = self.live_conn(conn) else {
                    return;
                };
                match &mut c.mailbox {
                    Mailbox::Live => {
                        let after = c.paged.unwrap_or(0);
                        self.load_page(conn, Some(after)).await;
                    }
                    Mailbox::Loading { stored, .. } => *stored = true,
                    // A page is on its way, and the pages go on until one comes back
                    // empty; or the first read has not been asked for yet.
                    _ => {}
                }
            }
            Reply::Forwarded {
                token,
                receiver,
                frames,
                behind,
            } => self.forwarded(token, receiver, frames, behind).await,
            Reply::Takeover { receiver } => match self.online.get(&receiver) {
                Some(&conn) => {
                    log::info!("id {receiver}: bound on another node; closing here");
                    let detail = format_args!("id {receiver} connected on another node");
                    let notice = Some(notice(Code::Replaced, detail));
                    let drain = false;
                    // Its writer's finish sends `Left`, which hands the id over.
                    self.close(conn, Close { notice, drain });
                }
                None if !self.returning.contains_key(&receiver) => {
                    self.send_store(Command::Left { receiver }).await;
                }
                // A closing connection's writer is still busy: `Left` follows it.
                None => {}
            },
            Reply::Health(down) => {
                if let Some(m) = &self.metrics {
                    m.set_store_down(down.clone());
                }
                self.storage.set_down(down);
            }
        }
    }

    /// Loads the page after `after` once the client has room for it: with acks on,
    /// unacknowledged frames count, so a client reading a large mailbox gets it as fast
    /// as it acknowledges, and one that never acknowledges holds no more than the limit.
    /// A client that leaves that much unacknowledged for `--frame-timeout` is cut off as
    /// a slow consumer.
    async fn next_page(&mut self, conn: ConnId, after: u64) {
        let room = self.max_pending_bytes.saturating_sub(self.page_bytes());
        let stall = self.stalls + 1;
        let Some(c) = self.live_conn(conn) else {
            return;
        };
        if c.outbox.pending_bytes() <= room {
            return self.load_page(conn, Some(after)).await;
        }
        if matches!(c.mailbox, Mailbox::AwaitingAcks { .. }) {
            // Still waiting: the timer set when the wait began runs on.
            return;
        }
        c.mailbox = Mailbox::AwaitingAcks { after, stall };
        self.stalls = stall;
        let mut events = self.events.clone();
        let limit = self.ack_timeout;
        rt::spawn(async move {
            rt::sleep(limit).await;
            let _ = events.send(Event::AckTimeout { conn, stall }).await;
        });
    }

    fn page_bytes(&self) -> usize {
        PAGE_BYTES.min(self.max_pending_bytes / 2)
    }

    /// Asks the store for the next page of `conn`'s mailbox.
    async fn load_page(&mut self, conn: ConnId, after: Option<u64>) {
        let max_bytes = self.page_bytes();
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
        self.send_store(Command::Load {
            ticket: Ticket::Conn(conn),
            receiver,
            after,
            max_bytes,
        })
        .await;
    }

    /// Starts closing a connection and takes it offline. It stays in `conns` until its
    /// writer has finished.
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

    /// Forgets a finished connection, then lets a waiting connection with the same id
    /// read its mailbox: the finished writer's deletes are in the store's queue ahead
    /// of that read, so what it delivered does not come again.
    async fn on_writer_done(&mut self, conn: ConnId, undelivered: Vec<Outgoing>) {
        // A writer can stop before the broker has heard that its reader did (the reader
        // abandons the outbox at once); take the connection offline first, so frames
        // for its id go to the mailbox and the finish is counted as for any close.
        self.close(
            conn,
            Close {
                notice: None,
                drain: false,
            },
        );
        for item in undelivered {
            if let Origin::Data {
                seq,
                echo_to: Some(sender),
                stored: false,
                ..
            } = item.origin
            {
                self.accepted(sender, seq, Outcome::Failed(Failure::ReceiverLeft));
            }
        }
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let Some(id) = c.id else {
            return;
        };
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
        match waiting {
            Some(next) => self.load_page(next, None).await,
            None if !self.online.contains_key(&id) => {
                self.send_store(Command::Left { receiver: id }).await;
            }
            // Bound again here and not waiting: it has already read its mailbox.
            None => {}
        }
    }

    async fn send_store(&mut self, command: Command) {
        self.storage.send(command).await;
    }
}
