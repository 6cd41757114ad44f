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

mod conns;
mod devices;
mod mailbox;
mod remote;
mod storage;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt, select_biased};

use crate::cluster::msg::{FromCluster, Grew, ToCluster};
use crate::ids::Endpoint;
use crate::metrics::{Metrics, Refusal};
use crate::protocol::session::{Device, Envelope, Query, Record, What};
use crate::protocol::{Code, Inbound, SERVER_ID, notice};
use crate::rt;
use crate::server::backend::{Batch, Replies};
use crate::server::blocklist::Blocklist;
use crate::server::budget::Budget;
use crate::server::config::Shared;
use crate::server::directory::Directory;
use crate::server::event::{ConnId, Event, Request, Ticket, Who};
use crate::server::outbox::{Close, EchoTo, Origin, Outbox, Outgoing};
use crate::store::{
    Command, DeviceChange, Failure, Fanout, KnownDevice, Outcome, Reading, Reply, now_ms,
};
use conns::{Bind, Finished, MAX_QUERIES, Registry};
use devices::{Assigned, Devices};
use mailbox::{Admit, Page, page_bytes};
use remote::Remote;
use storage::Storage;

/// How often the broker looks for senders waiting longer.
const TICK: Duration = Duration::from_millis(250);

pub struct Broker {
    /// `--max-pending-bytes`: a receiver with more waiting is cut off.
    max_pending_bytes: usize,
    /// Every connection, its id, and which ids are online here (see [`conns`]).
    conns: Registry,
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
    answers: Vec<ToCluster>,
    /// The named devices of each id that has any (see [`devices`]).
    devices: Devices,
    /// Store commands from where the broker cannot wait (a close), sent once the
    /// current event is handled.
    later: Vec<Command>,
    /// Whether sessions are offered: on one node, and in a cluster that keeps history.
    sessions: bool,
    /// In a cluster, sessions read everything from their id's log in the stream (see
    /// [`crate::cluster`]): nothing is pushed to them live from here, and the echo of
    /// a session's frame learns its offset from the cluster.
    cluster_sessions: bool,
    /// Whether a live frame's echo goes once it is written (see [`Broker::route_wire`]).
    echo_at_write: bool,
    /// In a cluster, how long a sender waits for a frame's outcome before it is told
    /// `store-failed` instead (`--answer-within`); `None` on one node, whose store
    /// answers for itself.
    answer_within: Option<Duration>,
    /// History's retention: a named device unused for longer is forgotten.
    retention: std::time::Duration,
    /// Open connections for operators: the broker notes what each binds.
    directory: Arc<Directory>,
    /// Ids that may not bind.
    blocklist: Arc<Blocklist>,
    /// The node is draining: connections that arrive late (after a TLS handshake or a
    /// PROXY header that was under way) are asked to reconnect too.
    draining: bool,
}

impl Broker {
    /// The broker of the connections in `shared`, numbering frames from `next_seq`,
    /// with the named `devices` the store knows.
    pub fn new(shared: &Shared, next_seq: u64, devices: Vec<KnownDevice>) -> Self {
        let config = &shared.config;
        let max_pending_bytes = config.max_pending_bytes;
        Broker {
            metrics: shared.metrics.clone(),
            directory: shared.directory.clone(),
            blocklist: shared.blocklist.clone(),
            draining: false,
            ack_timeout: config.frame_timeout,
            devices: Devices::new(devices, config.max_devices),
            later: Vec::new(),
            sessions: config.nats.is_none() || config.history.on(),
            cluster_sessions: config.nats.is_some() && config.history.on(),
            echo_at_write: config.nats.is_none() && config.history.on(),
            answer_within: config.nats.as_ref().map(|_| config.answer_within),
            retention: config.history.max_age,
            events: shared.events.clone(),
            stalls: 0,
            pushed: Vec::new(),
            remote: Remote::default(),
            answers: Vec::new(),
            max_pending_bytes,
            inbound: shared.inbound.clone(),
            conns: Registry::default(),
            storage: Storage::new(shared.store.clone()),
            next_seq,
            shutting_down: false,
        }
    }

    /// Runs until shutdown has closed every connection.
    pub async fn run(mut self, events: mpsc::Receiver<Event>, replies: Replies) {
        // Fused, so a finished stream drops out of the select instead of spinning.
        let (mut events, mut replies) = (events.fuse(), replies.fuse());
        // A cluster's answers may wait on other nodes and NATS: a tick looks for echoes
        // that have waited too long (see [`Broker::answer_late`]).
        let mut ticks = match self.answer_within {
            Some(_) => futures::stream::unfold((), |()| async {
                rt::sleep(TICK).await;
                Some(((), ()))
            })
            .boxed(),
            None => futures::stream::pending().boxed(),
        }
        .fuse();
        loop {
            if self.shutting_down && self.conns.is_empty() {
                break;
            }
            if self.storage.is_behind() {
                // The store is behind: only its replies make room, so take no new
                // frames until they do. Readers wait, and TCP pushes back on clients.
                select_biased! {
                    _ = ticks.next() => self.answer_late(),
                    batch = replies.next() => match batch {
                        Some(batch) => self.on_store(batch).await,
                        None => break,
                    },
                }
                self.send_answers().await;
                self.wake_writers();
                continue;
            }
            // The tick first: under steady traffic it would otherwise wait its turn for
            // as long as the traffic lasts.
            select_biased! {
                _ = ticks.next() => self.answer_late(),
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
                self.conns.insert(conn, outbox, self.shutting_down);
                if self.draining && !self.shutting_down {
                    self.ask_to_reconnect(conn);
                }
            }
            Event::Requests {
                conn,
                requests,
                bytes,
            } => {
                for request in requests {
                    if self.conns.live(conn).is_none() {
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
                let written = self.conns.live(conn).and_then(|c| c.mailbox.written());
                if let (true, Some(after)) = (page_end, written) {
                    self.next_page(conn, after).await;
                }
            }
            Event::WriterDone { conn, undelivered } => self.on_writer_done(conn, undelivered).await,
            Event::AckTimeout { conn, stall } => {
                let stalled = self.conns.live(conn).filter(|c| c.mailbox.stalled(stall));
                if let Some(id) = stalled.and_then(|c| c.id) {
                    self.cut_slow_consumer(conn, id);
                }
            }
            Event::Disconnect { who, why } => {
                let conns: Vec<ConnId> = match who {
                    Who::Conn(conn) => vec![conn],
                    Who::Id(id) => self.conns_of(id),
                };
                self.kick(&conns, &why);
            }
            Event::Measure { id, answer } => {
                self.send_store(Command::Measure { id, answer }).await;
            }
            Event::Forget { id, why, answer } => {
                let conns = self.conns_of(id);
                self.kick(&conns, &why);
                self.devices.forget_id(id);
                // Behind the device rows the kicked connections' closes write.
                self.later.push(Command::Forget { id, answer });
            }
            Event::Drain => {
                log::info!("asking {} connections to reconnect", self.conns.len());
                self.draining = true;
                for conn in self.conns.all() {
                    self.ask_to_reconnect(conn);
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
        for conn in self.conns.all() {
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

    async fn on_request(&mut self, conn: ConnId, request: Request) {
        match request {
            Request::Ping => self.reply(conn, notice(Code::Pong, "server is up")),
            Request::BadControl { detail } => self.reply(conn, notice(Code::BadControl, detail)),
            Request::RateLimited { detail } => self.reply(conn, notice(Code::RateLimited, detail)),
            Request::Hello { id, acks } => self.hello(conn, id, acks).await,
            Request::Session { id, device } => self.session(conn, id, device).await,
            Request::Query(query) => self.query(conn, query).await,
            Request::BadQuery { request, why } => {
                if self.is_session(conn) {
                    let failed = Record::QueryFailed { request, why };
                    self.reply(conn, failed.encode());
                } else {
                    self.reply(conn, notice(Code::BadControl, why));
                }
            }
            Request::Ack { h } => self.ack(conn, h).await,
            Request::Data(frame) => {
                if self.bind(conn, frame.sender()).await {
                    self.route(conn, frame).await;
                }
            }
        }
    }

    async fn hello(&mut self, conn: ConnId, id: u32, acks: bool) {
        let was_bound = self.conns.get(conn).is_some_and(|c| c.id.is_some());
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
            let Some(c) = self.conns.live(conn) else {
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

    fn is_session(&self, conn: ConnId) -> bool {
        self.conns.get(conn).is_some_and(|c| c.session.is_some())
    }

    /// Binds a connection to one of `id`'s named devices, with acks on: the device's
    /// `sync` record, then what waits for it, then live frames, each with its envelope.
    async fn session(&mut self, conn: ConnId, id: u32, name: Device) {
        if self.blocked(conn, id) {
            return;
        }
        if !self.sessions {
            let detail = "sessions (control operation 4) need history, which this cluster \
                          does not keep (--history-max-age 0); use hello with acks (operation 3)";
            return self.reply(conn, notice(Code::BadControl, detail));
        }
        let Some(c) = self.conns.live(conn) else {
            return;
        };
        if let Some(bound) = c.id {
            let detail = format!("this connection is bound to id {bound} already");
            return self.reply(conn, notice(Code::BadControl, detail));
        }
        if id == SERVER_ID {
            let detail = format!("sender {SERVER_ID} is reserved for the server");
            return self.reply(conn, notice(Code::BadSender, detail));
        }
        let outbox = c.outbox.clone();
        let now = now_ms();
        let registry = &self.conns;
        let online = |device| registry.online_at(Endpoint { id, device }).is_some();
        let (device, new) = match self.devices.assign(id, &name, now, online) {
            Assigned::Known(device) => (device, false),
            Assigned::New { device, forgotten } => {
                if let Some((old, old_name)) = forgotten {
                    log::info!(
                        "id {id}: forgetting device {old_name}, seen longest ago, for {name}"
                    );
                    let endpoint = Endpoint { id, device: old };
                    let change = DeviceChange::Forget;
                    self.send_store(Command::Device { endpoint, change }).await;
                }
                (device, true)
            }
            Assigned::Full { max } => {
                let detail =
                    format!("id {id} has {max} devices online (--max-devices); sign one out first");
                let notice = Some(notice(Code::TooManyDevices, detail));
                return self.close(
                    conn,
                    Close {
                        notice,
                        drain: true,
                    },
                );
            }
        };
        if self.conns.online_at(Endpoint::default_of(id)).is_some() {
            // The default device is online: the store learns it (again) first, so that
            // frames wait for it too once the id has a named device; its row may have
            // been swept if it bound longer ago than history's retention.
            let endpoint = Endpoint::default_of(id);
            let change = DeviceChange::Seen {
                name: String::new(),
                now,
            };
            self.send_store(Command::Device { endpoint, change }).await;
        }
        let endpoint = Endpoint { id, device };
        let change = DeviceChange::Seen {
            name: name.to_string(),
            now,
        };
        self.send_store(Command::Device { endpoint, change }).await;
        let welcome = format!("bound to id {id} as device {name}, acks on");
        let device_name = name.to_string();
        match self.conns.bind_at(conn, endpoint, Some(name)) {
            Bind::New { replaced, wait } => {
                log::debug!(conn; "id {id} device {device} bound to connection {conn}");
                self.directory.bound(conn, id, Some(&device_name));
                if let Some(old) = replaced {
                    log::info!("id {id}: connection {conn} replaces {old} on device {device}");
                }
                if let Some(c) = self.conns.get_mut(conn) {
                    c.start = Some(new);
                }
                // Acks go on before anything is delivered, as for hello with acks.
                let _ = outbox.push(Outgoing {
                    wire: notice(Code::Welcome, welcome),
                    origin: Origin::AcksOn,
                });
                self.pushed.push(outbox);
                // Listening before the first read: a note after it is heard.
                self.send_hearing().await;
                if !wait {
                    self.load_page(conn, None).await;
                }
            }
            Bind::Reserved | Bind::Other { .. } | Bind::Same | Bind::Gone => {}
        }
    }

    /// A session's question about its id's history: the store answers.
    async fn query(&mut self, conn: ConnId, query: Query) {
        let Some(c) = self.conns.live(conn) else {
            return;
        };
        let (Some(id), Some(_)) = (c.id, &c.session) else {
            let detail = "queries need a session (control operation 4)";
            return self.reply(conn, notice(Code::BadControl, detail));
        };
        if c.queries >= MAX_QUERIES {
            let why =
                format!("busy: at most {MAX_QUERIES} queries at a time; ask again after an answer");
            let failed = Record::QueryFailed {
                request: query.request(),
                why,
            };
            return self.reply(conn, failed.encode());
        }
        c.queries += 1;
        let ticket = Ticket::Conn(conn);
        self.send_store(Command::Query { ticket, id, query }).await;
    }

    /// The client has handled `h` data frames since acks went on: what that covers is
    /// delivered and leaves the store.
    async fn ack(&mut self, conn: ConnId, h: u32) {
        let Some(c) = self.conns.live(conn) else {
            return;
        };
        let device = c.device;
        let (Some(id), result) = (c.id, c.outbox.ack(h)) else {
            let detail = "acks are not on; turn them on with control operation 3";
            return self.reply(conn, notice(Code::BadControl, detail));
        };
        match result {
            Ok(seqs) => {
                if !seqs.is_empty() {
                    self.send_store(Command::Delete {
                        receiver: id,
                        device,
                        seqs,
                    })
                    .await;
                }
                if let Some(after) = self.conns.live(conn).and_then(|c| c.mailbox.acked()) {
                    self.next_page(conn, after).await;
                }
            }
            Err(detail) => self.reply(conn, notice(Code::BadControl, detail)),
        }
    }

    /// Binds `conn` to `id` on its first frame; afterwards, checks that frames carry the
    /// bound id. Refusals get a `bad-sender` notice and go nowhere.
    async fn bind(&mut self, conn: ConnId, id: u32) -> bool {
        if self.blocked(conn, id) {
            return false;
        }
        let refusal = match self.conns.bind(conn, id) {
            Bind::Gone => return false,
            Bind::Same => return true,
            Bind::Reserved => format!("sender {SERVER_ID} is reserved for the server"),
            Bind::Other { bound } => format!("sender {id} is not this connection's id {bound}"),
            Bind::New { replaced, wait } => {
                // docker/cluster-ci.sh finds where an id is bound by this line.
                log::debug!(conn; "id {id} bound to connection {conn}");
                self.directory.bound(conn, id, None);
                if let Some(old) = replaced {
                    log::info!("id {id}: connection {conn} replaces {old}");
                }
                if self.sessions {
                    // The store learns that the id uses its default device, so that
                    // frames wait for it once the id also has named devices.
                    let endpoint = Endpoint::default_of(id);
                    let change = DeviceChange::Seen {
                        name: String::new(),
                        now: now_ms(),
                    };
                    self.send_store(Command::Device { endpoint, change }).await;
                }
                if !wait {
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
            // Only echoed, never kept: a session's echo says so with offset 0.
            let echo = match self.is_session(conn) {
                true => envelope(What::Echo, 0, now_ms(), receiver).wrap(&frame.wire),
                false => frame.wire,
            };
            return self.reply(conn, echo);
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
            self.stored_elsewhere(receiver).await;
        }
        self.remote.open(token);
        for wire in frames {
            self.route_wire(Ticket::Remote(token), receiver, wire).await;
        }
        self.answer_if_done(token);
    }

    /// Stores a frame for `receiver` and pushes it live where it can: to the
    /// receiver's default device and its named ones, and, as their copy, to the
    /// sender's other named devices. `from` is the local connection it came from, or a
    /// batch another node forwarded.
    async fn route_wire(&mut self, from: Ticket, receiver: u32, wire: Bytes) {
        let frame_wire = wire;
        let seq = self.next_seq;
        self.next_seq += 1;
        let arrived = Instant::now();
        let time = now_ms();
        let sender = crate::store::author_of(&frame_wire);
        let origin = match from {
            Ticket::Conn(conn) => self
                .conns
                .get(conn)
                .filter(|c| c.session.is_some())
                .map(|c| c.device),
            Ticket::Remote(_) => None,
        };
        let mut live = None;
        let mut behind = None;
        if let Some(rc) = self.conns.online(receiver)
            && let Some(c) = self.conns.live(rc)
        {
            let pending = c.outbox.pending_bytes();
            match c
                .mailbox
                .admit(frame_wire.len(), pending, self.max_pending_bytes)
            {
                Admit::Live => live = Some(c.outbox.clone()),
                Admit::Behind => behind = Some(rc),
                Admit::Stored => {}
                Admit::Cut => self.cut_slow_consumer(rc, receiver),
            }
        }
        // The named devices that take it now: the receiver's, and the sender's others.
        let mut named = Vec::new();
        if !self.cluster_sessions
            && (self.conns.has_sessions(receiver) || self.conns.has_sessions(sender))
        {
            let mut devices: Vec<(Endpoint, ConnId, What, u32)> = Vec::new();
            for (device, rc) in self.conns.sessions_of(receiver) {
                let e = Endpoint {
                    id: receiver,
                    device,
                };
                devices.push((e, rc, What::Delivery, sender));
            }
            for (device, rc) in self.conns.sessions_of(sender) {
                if Some(device) != origin {
                    let e = Endpoint { id: sender, device };
                    devices.push((e, rc, What::Carbon, receiver));
                }
            }
            for (e, rc, what, conversation) in devices {
                let wrapped = envelope(what, seq, time, conversation).wrap(&frame_wire);
                let Some(c) = self.conns.live(rc) else {
                    continue;
                };
                let pending = c.outbox.pending_bytes();
                match c
                    .mailbox
                    .admit(wrapped.len(), pending, self.max_pending_bytes)
                {
                    Admit::Live => named.push((e, rc, wrapped, false)),
                    Admit::Behind => named.push((e, rc, wrapped, true)),
                    Admit::Stored => {}
                    Admit::Cut => self.cut_slow_consumer(rc, e.id),
                }
            }
        }
        // In a cluster the offset comes with the frame's outcome (0 until then).
        let offset = if self.cluster_sessions { 0 } else { seq };
        let echo = match origin {
            Some(_) => envelope(What::Echo, offset, time, receiver).wrap(&frame_wire),
            None => frame_wire.clone(),
        };
        if self.storage.down().is_some() {
            behind = None;
            named.retain(|(_, _, _, held)| !held);
        }
        if let Some(reason) = self.storage.down() {
            // Nothing can be stored: a frame is accepted only by its delivery, and its
            // echo waits for the first of them.
            let refused = Failure::Unavailable {
                reason: reason.to_string(),
                receiver,
            };
            let mut carrier = true;
            let mut pushed = false;
            let first = Endpoint::default_of(receiver);
            let targets = live
                .map(|outbox| (first, outbox, frame_wire.clone()))
                .into_iter()
                .chain(named.into_iter().filter_map(|(e, rc, wrapped, _)| {
                    Some((e, self.conns.get(rc)?.outbox.clone(), wrapped))
                }))
                .collect::<Vec<_>>();
            // The echo waits before the frame is pushed: a writer may write it, and
            // settle the echo, before this event ends.
            let echo_to = match targets.is_empty() {
                true => None,
                false => {
                    self.wait_for_echo(from, seq, echo);
                    self.echo_to(from)
                }
            };
            for (e, outbox, wire) in targets {
                let item = match carrier {
                    true => Outgoing::unstored(wire, e, seq, echo_to.clone(), arrived),
                    false => Outgoing::live(wire, e, seq, arrived),
                };
                if outbox.push(item).is_ok() {
                    pushed |= carrier;
                    carrier = false;
                }
                self.pushed.push(outbox);
            }
            if !pushed {
                match from {
                    Ticket::Remote(_) => {
                        if echo_to.is_none() {
                            self.wait_for_echo(from, seq, Bytes::new());
                        }
                        self.accepted(from, seq, Outcome::Failed(refused));
                    }
                    Ticket::Conn(conn) => {
                        let refusal = notice(Code::StoreFailed, refused);
                        match echo_to {
                            Some(_) => self.settle_with(conn, seq, refusal),
                            None => self.reply(conn, refusal),
                        }
                    }
                }
            }
            return;
        }
        self.wait_for_echo(from, seq, echo);
        // An early echo (below) only for a frame with one device to reach: with more,
        // it could stand for a frame that a crash before the commit keeps from the
        // devices that are away.
        let one_target = origin.is_none()
            && named.is_empty()
            && !self.devices.has(receiver)
            && !self.devices.has(sender);
        let fanout = (origin.is_some() || !named.is_empty()).then(|| {
            Box::new(Fanout {
                live: named.iter().map(|(e, ..)| *e).collect(),
                origin,
            })
        });
        // With history, on one node, the echo of a frame written to a receiver without
        // acks goes at that write, without waiting for the store, which writes every
        // frame and so takes longer to answer: the frame is delivered (and is being
        // stored all the same). Without history the store answers within its 5 ms
        // (the frame never reaches the disk); a cluster's store settles it too.
        let echo_to = match from {
            Ticket::Conn(_) if self.echo_at_write && one_target => self.echo_to(from),
            _ => None,
        };
        let append = Command::Append {
            ticket: from,
            receiver,
            seq,
            wire: frame_wire.clone(),
            live: live.is_some() || behind.is_some(),
            time,
            fanout,
        };
        // Stored first, then pushed: the writer's delete for this frame must reach the
        // store after its append. A frame pushed now that echoes at its write needs no
        // answer from the store soon: the store takes its append when it next wakes.
        if echo_to.is_some() && live.is_some() {
            self.storage.send_unhurried(append).await;
        } else {
            self.send_store(append).await;
        }
        let item = |wire, e| match &echo_to {
            Some(to) => Outgoing::live_echoing(wire, e, seq, arrived, to.clone()),
            None => Outgoing::live(wire, e, seq, arrived),
        };
        for (e, rc, wrapped, held) in named {
            let Some(c) = self.conns.get_mut(rc) else {
                continue;
            };
            if held {
                c.mailbox.hold(item(wrapped, e));
            } else {
                let _ = c.outbox.push(item(wrapped, e));
                self.pushed.push(c.outbox.clone());
            }
        }
        let first = Endpoint::default_of(receiver);
        if let Some(c) = behind.and_then(|rc| self.conns.get_mut(rc)) {
            c.mailbox.hold(item(frame_wire, first));
            return;
        }
        if let Some(outbox) = live {
            // If its writer has just finished, the frame stays in the store for the
            // receiver's next connection.
            let _ = outbox.push(item(frame_wire, first));
            self.pushed.push(outbox);
        }
    }

    fn wait_for_echo(&mut self, from: Ticket, seq: u64, echo: Bytes) {
        match from {
            Ticket::Remote(token) => self.remote.wait(token, seq),
            Ticket::Conn(conn) => {
                if let Some(c) = self.conns.get(conn) {
                    c.outbox.wait_for_echo(seq, echo);
                }
            }
        }
    }

    /// Whose echo a frame's write settles: a connection's outbox, which the receiver's
    /// writer settles itself, or a forwarded batch, which the broker answers.
    fn echo_to(&self, from: Ticket) -> Option<EchoTo> {
        match from {
            Ticket::Remote(_) => Some(EchoTo::Remote(from)),
            Ticket::Conn(conn) => Some(EchoTo::Conn(self.conns.get(conn)?.outbox.clone())),
        }
    }

    /// Puts `wire` (a notice) in the place of the echo of `seq` on `conn`.
    fn settle_with(&mut self, conn: ConnId, seq: u64, wire: Bytes) {
        if let Some(c) = self.conns.get(conn)
            && c.outbox.settle_with(seq, wire)
        {
            self.pushed.push(c.outbox.clone());
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
        if let Some(c) = self.conns.get(conn)
            && c.outbox.reply(item)
        {
            self.pushed.push(c.outbox.clone());
        }
    }

    /// Tells each sender whose oldest frame has waited `--answer-within` for its outcome
    /// that it was not stored, with the reason, rather than leave it waiting on a node
    /// or a NATS server that is slow or cut off. The frame may still be stored and
    /// delivered (docs/CLUSTER.md): a client that sends it again may repeat it.
    fn answer_late(&mut self) {
        let Some(within) = self.answer_within else {
            return;
        };
        let Some(cutoff) = Instant::now().checked_sub(within) else {
            return;
        };
        let late = || Outcome::Failed(Failure::Late(within));
        for c in self.conns.values_mut() {
            if c.outbox.expire(cutoff, late) {
                self.pushed.push(c.outbox.clone());
            }
        }
    }

    /// Settles an echo that waited for a write that will not come.
    fn settle_echo(&mut self, to: EchoTo, seq: u64, outcome: Outcome) {
        match to {
            EchoTo::Remote(from) => self.accepted(from, seq, outcome),
            EchoTo::Conn(outbox) => {
                if outbox.settle(seq, outcome) {
                    self.pushed.push(outbox);
                }
            }
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
        let Some(c) = self.conns.get(conn) else {
            return;
        };
        if c.outbox.settle(seq, outcome) {
            self.pushed.push(c.outbox.clone());
        }
    }

    /// Answers a forwarded batch once every frame in it has its outcome.
    fn answer_if_done(&mut self, token: u64) {
        if let Some(outcomes) = self.remote.take_if_done(token) {
            self.answers.push(ToCluster::Answer { token, outcomes });
        }
    }

    /// Tells a cluster's actor which ids got their first session here or lost their
    /// last: it listens for their logs' notes meanwhile.
    async fn send_hearing(&mut self) {
        for (id, on) in self.conns.take_hearing() {
            if self.cluster_sessions {
                self.storage.send_cluster(ToCluster::Hear { id, on }).await;
            }
        }
    }

    async fn send_answers(&mut self) {
        self.send_hearing().await;
        for answer in std::mem::take(&mut self.answers) {
            self.storage.send_cluster(answer).await;
        }
        for command in std::mem::take(&mut self.later) {
            self.storage.send(command).await;
        }
    }

    async fn on_store(&mut self, batch: Batch) {
        match batch {
            Batch::One(replies) => {
                for reply in replies {
                    self.on_reply(reply).await;
                }
            }
            Batch::Cluster(replies) => {
                for reply in replies {
                    self.on_cluster(reply).await;
                }
            }
        }
    }

    /// What a cluster's actor said: a store's reply, or the cluster's own news.
    async fn on_cluster(&mut self, reply: FromCluster) {
        match reply {
            FromCluster::Store(reply) => self.on_reply(reply).await,
            FromCluster::Mail { receiver } => self.stored_elsewhere(receiver).await,
            FromCluster::Forwarded {
                token,
                receiver,
                frames,
                behind,
            } => self.forwarded(token, receiver, frames, behind).await,
            FromCluster::Logged {
                ticket: Ticket::Conn(conn),
                seq,
                offset,
            } => {
                if let Some(c) = self.conns.get_mut(conn) {
                    c.outbox.set_offset(seq, offset);
                }
            }
            FromCluster::Logged { .. } => {}
            FromCluster::Grew(grew) => self.log_grew(grew).await,
            FromCluster::Read { id, record } => {
                for (_, conn) in self.conns.sessions_of(id) {
                    self.reply(conn, record.clone());
                }
            }
            FromCluster::Takeover { receiver } => match self.conns.online(receiver) {
                Some(conn) => {
                    log::info!("id {receiver}: bound on another node; closing here");
                    let detail = format_args!("id {receiver} connected on another node");
                    let notice = Some(notice(Code::Replaced, detail));
                    let drain = false;
                    // Its writer's finish sends `Left`, which hands the id over.
                    self.close(conn, Close { notice, drain });
                }
                None if !self.conns.is_returning(receiver) => {
                    self.storage
                        .send_cluster(ToCluster::Left { receiver })
                        .await;
                }
                // A closing connection's writer is still busy: `Left` follows it.
                None => {}
            },
        }
    }

    async fn on_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Idle(endpoints) => self.forget_idle(endpoints).await,
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
                held,
                frames,
                sync,
            } => {
                // Pages are only ever asked for a connection.
                let Ticket::Conn(conn) = ticket else {
                    return;
                };
                let Some(c) = self.conns.live(conn) else {
                    return;
                };
                if let Some(sync) = sync {
                    let _ = c.outbox.push(Outgoing::reply(sync));
                    self.pushed.push(c.outbox.clone());
                }
                let endpoint = Endpoint {
                    id: receiver,
                    device: c.device,
                };
                let session = c.session.is_some();
                let last = frames.last().map(|&(seq, _)| seq);
                match c.mailbox.page(last) {
                    Page::Ignore => {}
                    Page::ReadAgain { after } => self.load_page(conn, after).await,
                    Page::CaughtUp(held) => {
                        // Once: in a cluster a session catches up after every read.
                        if session && !std::mem::replace(&mut c.synced, true) {
                            let head = c.mailbox.paged().unwrap_or(0);
                            let _ = c
                                .outbox
                                .push(Outgoing::reply(Record::Synced { head }.encode()));
                            self.pushed.push(c.outbox.clone());
                        }
                        if !held.is_empty() {
                            for item in held {
                                // If the connection is gone the frames are in the store.
                                let _ = c.outbox.push(item);
                            }
                            self.pushed.push(c.outbox.clone());
                        }
                    }
                    Page::Deliver { last } => {
                        log::debug!("id {receiver}: delivering {} stored frames", frames.len());
                        // Held frames ahead of the page's in the store go first (what is
                        // not held any more was pushed already, in its place).
                        for seq in held {
                            for item in c.mailbox.take_held(seq) {
                                let _ = c.outbox.push(item);
                            }
                        }
                        for (seq, wire) in frames {
                            // If the connection is gone the frames are still in the store.
                            let item = Outgoing::stored(wire, endpoint, seq, seq == last);
                            let _ = c.outbox.push(item);
                        }
                        self.pushed.push(c.outbox.clone());
                    }
                }
            }
            Reply::Answer { ticket, frames } => {
                if let Ticket::Conn(conn) = ticket {
                    self.answered(conn);
                    for frame in frames {
                        self.reply(conn, frame);
                    }
                }
            }
            Reply::Read { ticket, id, record } => {
                if let Ticket::Conn(conn) = ticket {
                    self.answered(conn);
                }
                for (_, conn) in self.conns.sessions_of(id) {
                    self.reply(conn, record.clone());
                }
            }
            Reply::Health(down) => {
                if let Some(m) = &self.metrics {
                    m.set_store_down(down.clone());
                }
                self.storage.set_down(down);
            }
        }
    }

    /// Forgets the named devices the store found unused for history's retention,
    /// unless they are online or were seen since (the store learns of a visit only
    /// with its commit): what waited for them goes, and a device of that name that
    /// comes back is new, its `sync` says so.
    async fn forget_idle(&mut self, endpoints: Vec<Endpoint>) {
        let retention = self.retention.as_millis() as u64;
        let Some(cutoff) = now_ms().checked_sub(retention).filter(|_| retention > 0) else {
            return;
        };
        for endpoint in endpoints {
            if self.conns.online_at(endpoint).is_some() {
                continue;
            }
            if let Some(name) = self.devices.forget_idle(endpoint, cutoff) {
                log::info!(
                    "id {}: forgetting device {name}, unused for --history-max-age",
                    endpoint.id
                );
                let change = DeviceChange::Forget;
                self.send_store(Command::Device { endpoint, change }).await;
            }
        }
    }

    /// Loads the page after `after` once the client has room for it: with acks on,
    /// unacknowledged frames count, so a client reading a large mailbox gets it as fast
    /// as it acknowledges, and one that never acknowledges holds no more than the limit.
    /// A client that leaves that much unacknowledged for `--frame-timeout` is cut off as
    /// a slow consumer.
    async fn next_page(&mut self, conn: ConnId, after: u64) {
        let room = self
            .max_pending_bytes
            .saturating_sub(page_bytes(self.max_pending_bytes));
        let stall = self.stalls + 1;
        let Some(c) = self.conns.live(conn) else {
            return;
        };
        if c.outbox.pending_bytes() <= room {
            return self.load_page(conn, Some(after)).await;
        }
        if !c.mailbox.await_acks(after, stall) {
            // Still waiting: the timer set when the wait began runs on.
            return;
        }
        self.stalls = stall;
        let mut events = self.events.clone();
        let limit = self.ack_timeout;
        rt::spawn(async move {
            rt::sleep(limit).await;
            let _ = events.send(Event::AckTimeout { conn, stall }).await;
        });
    }

    /// Asks the store for the next page of `conn`'s mailbox.
    async fn load_page(&mut self, conn: ConnId, after: Option<u64>) {
        let max_bytes = page_bytes(self.max_pending_bytes);
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        let Some(receiver) = c.id else {
            return;
        };
        let reading = match (&c.session, after) {
            (None, _) => Reading::Plain,
            (Some(_), None) => match c.start.take() {
                Some(new) => Reading::SessionStart {
                    new,
                    bound: now_ms(),
                },
                None => Reading::Session,
            },
            (Some(_), Some(_)) => Reading::Session,
        };
        c.mailbox.loading(after);
        let device = c.device;
        self.send_store(Command::Load {
            ticket: Ticket::Conn(conn),
            receiver,
            device,
            after,
            max_bytes,
            reading,
        })
        .await;
    }

    /// A query of `conn` was answered.
    fn answered(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.queries = c.queries.saturating_sub(1);
        }
    }

    /// Closes `conn` with `auth-failed` if `id` is blocked and not already its id.
    fn blocked(&mut self, conn: ConnId, id: u32) -> bool {
        // Bound already: the common case (every data frame), decided without the lock.
        if self.conns.get(conn).is_some_and(|c| c.id == Some(id)) || !self.blocklist.contains(id) {
            return false;
        }
        log::info!(conn; "refused id {id}: blocked by an operator");
        if let Some(m) = &self.metrics {
            m.refused(Refusal::blocked);
        }
        let notice = notice(Code::AuthFailed, format_args!("id {id} is blocked"));
        self.close(
            conn,
            Close {
                notice: Some(notice),
                drain: true,
            },
        );
        true
    }

    /// Asks `conn` to connect again (elsewhere): the node is draining.
    fn ask_to_reconnect(&mut self, conn: ConnId) {
        let ask = notice(
            Code::Reconnect,
            "this node is draining: connect again and you will reach another",
        );
        self.reply(conn, ask);
    }

    /// An operator disconnects `conns`: each is told so, after what is queued for it.
    /// Every connection bound to `id`, closing ones too.
    fn conns_of(&self, id: u32) -> Vec<ConnId> {
        self.conns
            .all()
            .into_iter()
            .filter(|&c| self.conns.get(c).is_some_and(|c| c.id == Some(id)))
            .collect()
    }

    fn kick(&mut self, conns: &[ConnId], why: &str) {
        for &conn in conns {
            if let Some(m) = &self.metrics {
                m.kicked.inc();
            }
            log::info!(conn; "disconnected by an operator: {why}");
            let notice = notice(Code::Disconnected, why);
            self.close(
                conn,
                Close {
                    notice: Some(notice),
                    drain: true,
                },
            );
        }
    }

    /// Starts closing a connection and takes it offline. It stays in the registry
    /// until its writer has finished. A session's device was in use until now: it is
    /// not the one to forget first when its id needs room.
    fn close(&mut self, conn: ConnId, close: Close) {
        let session = self.conns.live(conn).and_then(|c| {
            let name = match c.session.as_deref() {
                Some(name) => name.to_string(),
                // A default device's row says when it was last seen too, so that the
                // store's sweep of idle rows leaves one that was online until now.
                None if self.sessions => String::new(),
                None => return None,
            };
            Some((c.id?, c.device, name))
        });
        if self.conns.close(conn, close)
            && let Some((id, device, name)) = session
        {
            let now = now_ms();
            self.devices.seen(id, device, now);
            let endpoint = Endpoint { id, device };
            let change = DeviceChange::Seen {
                name: name.to_string(),
                now,
            };
            // Sent once the current event is handled: closing never waits.
            self.later.push(Command::Device { endpoint, change });
        }
    }

    /// Frames for `receiver` were stored where this node did not see them (by another
    /// node, or forwarded behind stored ones): its connection here reads them.
    async fn stored_elsewhere(&mut self, receiver: u32) {
        if let Some(conn) = self.conns.online(receiver) {
            self.read_on(conn).await;
        }
    }

    /// `conn` reads what was stored for it after its last page, now or after the read
    /// it is doing.
    async fn read_on(&mut self, conn: ConnId) {
        let after = self
            .conns
            .live(conn)
            .and_then(|c| c.mailbox.stored_elsewhere());
        if let Some(after) = after {
            self.load_page(conn, Some(after)).await;
        }
    }

    /// In a cluster, the logs of ids with sessions here grew: each such session reads
    /// on, now or after the read it is doing.
    async fn log_grew(&mut self, grew: Grew) {
        let conns: Vec<ConnId> = match grew {
            Grew::Id(id) => self
                .conns
                .sessions_of(id)
                .into_iter()
                .map(|(_, c)| c)
                .collect(),
            Grew::All => self
                .conns
                .all()
                .into_iter()
                .filter(|&c| self.is_session(c))
                .collect(),
        };
        for conn in conns {
            self.read_on(conn).await;
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
                self.settle_echo(sender, seq, Outcome::Failed(Failure::ReceiverLeft));
            }
        }
        match self.conns.writer_done(conn) {
            Finished::Resume(next) => self.load_page(next, None).await,
            Finished::Left(receiver) => {
                let left = ToCluster::Left { receiver };
                self.storage.send_cluster(left).await;
            }
            Finished::Nothing => {}
        }
    }

    async fn send_store(&mut self, command: Command) {
        self.storage.send(command).await;
    }
}

/// A session's envelope for frame `seq`, accepted at `time`, in the conversation with
/// `conversation`.
fn envelope(what: What, seq: u64, time: u64, conversation: u32) -> Envelope {
    Envelope {
        what,
        offset: seq,
        time,
        conversation,
        request: 0,
    }
}
