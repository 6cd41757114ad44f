//! The JetStream store: a cluster's frames in one replicated stream every node shares.
//!
//! Runs on the NATS link's thread ([`crate::cluster`]) and answers the same commands as
//! the embedded store, so the broker works unchanged on one node or many:
//!
//! - Frames live in the stream `CHAT_MAILBOX`, one subject per receiver
//!   (`chat.mb.<id>`), with the stream's replicas (3 on a cluster of three). A publish
//!   acknowledged by JetStream is an `Appended` reply: the frame survives the loss of
//!   this node and of one NATS server out of three.
//! - A node that binds an id *holds* it: it subscribes to `chat.hold.<id>.*`. Before
//!   that it asks the current holder to let go (`chat.hold.<id>.take`, request/reply);
//!   the holder closes its connection (`replaced`), writes what it still stages for
//!   the id, and answers. "No responders" means nobody held it.
//! - A frame for an id that is not bound on this node is published to the stream;
//!   once stored, `chat.hold.<id>.mail` tells the holder (if any) to read it. The holder
//!   reads its mailbox after the last frame it read, skipping the frames it published
//!   itself and has pushed live.
//! - As in the embedded store, a live frame's append waits up to `STAGE_WAIT` and is
//!   dropped if its delivery comes first.
//!
//! Sequence numbers: the broker numbers the frames it appends; frames read from the
//! stream carry the stream's sequence with the top bit set, so the two never meet.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::channel::{mpsc, oneshot};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{FutureExt, StreamExt, select_biased};

use crate::cluster::link::{Link, sleep};
use crate::cluster::{StartError, wire};
use crate::metrics::Metrics;
use crate::store::{
    Command, Failure, Limits, Outcome, QUEUE, Reply, Stage, Store, Ticket, answer, settled,
};

/// The stream that holds every node's frames.
pub const STREAM: &str = "CHAT_MAILBOX";
/// Marks a sequence number as the stream's.
const STREAM_SEQ: u64 = 1 << 63;
/// How long a node waits for the holder of an id to let it go before binding anyway.
const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// How long setting up the stream may take (a new cluster first elects its leaders,
/// which on a loaded machine can take most of a minute).
const SETUP_LIMIT: Duration = Duration::from_secs(60);
/// Mail published while a new holder's interest was still on its way across the
/// cluster could miss it: the holder looks once more after this long.
const RECHECK: Duration = Duration::from_millis(500);
/// How long a node waits for the holder of an id to take frames forwarded to it
/// before it stores them in the stream itself (they may then arrive twice).
const FORWARD_WAIT: Duration = Duration::from_secs(5);
/// A mailbox read that failed is tried again after this long.
const READ_RETRY: Duration = Duration::from_millis(250);
/// Frames asked for in one read of a mailbox.
const READ_BATCH: usize = 256;
/// How long JetStream may take to confirm a frame before its sender is told
/// `store-failed` (it may still have been stored: a resend can repeat it).
const ACK_WAIT: Duration = Duration::from_secs(5);
/// Commands applied before replies are sent and timers looked at.
const BATCH: usize = 1024;

/// What the link's thread hands the store.
pub struct Setup {
    /// How many NATS URLs the node was given.
    pub given_servers: usize,
    pub client: async_nats::Client,
    pub node: String,
    pub replicas: Option<usize>,
    pub limits: Limits,
    pub max_frame_bytes: u32,
    pub metrics: Option<Arc<Metrics>>,
    pub link: mpsc::UnboundedReceiver<Link>,
}

/// Sets up the stream, reports the store ready (or why not) and serves it until every
/// command sender is gone.
pub async fn run(setup: Setup, ready: std::sync::mpsc::Sender<Result<Store, StartError>>) {
    let js = jetstream::ContextBuilder::new()
        .timeout(ACK_WAIT)
        .ack_timeout(ACK_WAIT)
        .build(setup.client.clone());
    let stream = match ensure_stream(&js, &setup).await {
        Ok(stream) => stream,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (commands, rx) = mpsc::channel(QUEUE);
    let (reply_tx, replies) = mpsc::unbounded();
    let (closed_tx, closed) = oneshot::channel();
    let store = Store {
        commands,
        replies,
        // The broker's numbers need only be unique within this process.
        next_seq: 1,
        closed,
    };
    let inbox = setup.client.new_inbox();
    let answers = match setup.client.subscribe(format!("{inbox}.*")).await {
        Ok(sub) => SelectAll::from_iter([sub.boxed()]),
        Err(e) => {
            let _ = ready.send(Err(StartError::Subscribe(e.to_string())));
            return;
        }
    };
    if ready.send(Ok(store)).is_err() {
        return;
    }
    let actor = Actor {
        js,
        client: setup.client,
        stream,
        node: setup.node,
        max_frame: setup.max_frame_bytes as usize + crate::protocol::SERVER_HEADER_LEN,
        metrics: setup.metrics,
        replies: reply_tx,
        out: Vec::new(),
        staged: Stage::default(),
        published: HashMap::new(),
        live: HashMap::new(),
        pending: FuturesUnordered::new(),
        rechecks: FuturesUnordered::new(),
        retries: FuturesUnordered::new(),
        holds: HashMap::new(),
        remote: SelectAll::new(),
        takeovers: HashMap::new(),
        mail: HashSet::new(),
        routes: HashMap::new(),
        forwards: HashMap::new(),
        next_token: 1,
        inbox,
        answers,
        timeouts: FuturesUnordered::new(),
        kick: Vec::new(),
        answering: HashMap::new(),
        parked: HashMap::new(),
        high_seq: 0,
        down: None,
        held: VecDeque::new(),
    };
    actor.run(rx, setup.link).await;
    let _ = closed_tx.send(());
}

async fn ensure_stream(
    js: &jetstream::Context,
    setup: &Setup,
) -> Result<stream::Stream, StartError> {
    // The servers the node was given or has been told of; the latter may still be
    // incomplete while a new cluster forms.
    let servers = setup
        .client
        .server_info()
        .connect_urls
        .len()
        .max(setup.given_servers);
    let replicas = setup.replicas.unwrap_or(if servers >= 3 { 3 } else { 1 });
    let config = stream::Config {
        name: STREAM.into(),
        subjects: vec!["chat.mb.*".into()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: i64::try_from(setup.limits.max_messages).unwrap_or(i64::MAX),
        // A full mailbox refuses the new frame rather than dropping an old one.
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        max_message_size: i32::try_from(
            setup.max_frame_bytes as usize + crate::protocol::SERVER_HEADER_LEN,
        )
        .unwrap_or(i32::MAX),
        ..Default::default()
    };
    let started = Instant::now();
    loop {
        let attempt = async {
            match js.get_stream(STREAM).await {
                Ok(mut existing) => {
                    let info = existing.info().await.map_err(|e| e.to_string())?;
                    let mut wanted = config.clone();
                    if setup.replicas.is_none() {
                        // Another node created it; keep its replicas.
                        wanted.num_replicas = info.config.num_replicas;
                    }
                    if info.config != wanted {
                        js.update_stream(&wanted).await.map_err(|e| e.to_string())?;
                    }
                    Ok(existing)
                }
                Err(_) => js
                    .create_stream(config.clone())
                    .await
                    .map_err(|e| e.to_string()),
            }
        };
        match attempt.await {
            Ok(stream) => {
                let replicas = stream.cached_info().config.num_replicas;
                log::info!(
                    "node {}: stream {STREAM} ready, {replicas} replicas",
                    setup.node
                );
                return Ok(stream);
            }
            Err(e) if started.elapsed() < SETUP_LIMIT => {
                log::debug!("stream {STREAM} not ready yet: {e}");
                sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(StartError::Stream {
                    stream: STREAM,
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// A live frame this node published: its stream sequence once acknowledged, and
/// whether it was delivered before that.
struct Live {
    receiver: u32,
    stream_seq: Option<u64>,
    delivered: bool,
}

/// Frames waiting to be forwarded to the node holding their receiver. One batch is in
/// flight at a time, which keeps them in order whichever way each batch goes.
#[derive(Default)]
struct Route {
    queue: Vec<Command>,
    /// The token of the batch in flight.
    forwarding: Option<u64>,
    /// Frames of a batch nobody took, being published to the stream.
    storing: usize,
    /// Frames went to the stream since the last batch the holder took: it must read
    /// its mailbox before the next.
    behind: bool,
}

impl Route {
    fn busy(&self) -> bool {
        self.forwarding.is_some() || self.storing > 0
    }
}

struct Forward {
    receiver: u32,
    batch: Vec<Command>,
}

/// Work in flight on the NATS connection.
enum Done {
    Published {
        ticket: Ticket,
        seq: u64,
        receiver: u32,
        live: bool,
        len: usize,
        result: Result<u64, String>,
    },
    Deleted,
}

struct Down {
    since: Instant,
}

struct Actor {
    js: jetstream::Context,
    client: async_nats::Client,
    stream: stream::Stream,
    node: String,
    /// The largest frame in its wire encoding.
    max_frame: usize,
    metrics: Option<Arc<Metrics>>,
    replies: mpsc::UnboundedSender<Vec<Reply>>,
    /// Replies gathered while handling one batch of work.
    out: Vec<Reply>,
    staged: Stage,
    /// Live frames published, by the broker's sequence number.
    published: HashMap<u64, Live>,
    /// Per receiver, the stream sequences of live frames this node published and
    /// pushed: a mailbox read after the last page skips them.
    live: HashMap<u32, HashSet<u64>>,
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Reads that failed, to be tried again.
    retries: FuturesUnordered<BoxFuture<'static, Command>>,
    /// Ids to look at once more after they were claimed (see [`RECHECK`]).
    rechecks: FuturesUnordered<BoxFuture<'static, u32>>,
    /// Ids bound here; dropping the sender ends the id's subscription.
    holds: HashMap<u32, oneshot::Sender<()>>,
    remote: SelectAll<BoxStream<'static, (u32, async_nats::Message)>>,
    /// Nodes waiting for this one to let an id go, by their reply subjects.
    takeovers: HashMap<u32, Vec<async_nats::Subject>>,
    /// Frames for ids bound on other nodes, per receiver, forwarded one batch at a time.
    routes: HashMap<u32, Route>,
    /// Batches forwarded and not yet answered, by token.
    forwards: HashMap<u64, Forward>,
    next_token: u64,
    /// Where answers to this node's forwards arrive: `<inbox>.<token>`.
    inbox: String,
    answers: SelectAll<BoxStream<'static, async_nats::Message>>,
    timeouts: FuturesUnordered<BoxFuture<'static, u64>>,
    /// Routes that may forward their next batch.
    kick: Vec<u32>,
    /// First reads of ids this node is about to hold, waiting until the frames it was
    /// forwarding for them elsewhere are settled (so the read sees them, in order).
    parked: HashMap<u32, Vec<(Command, u64)>>,
    /// The highest frame number appended so far.
    high_seq: u64,
    /// Batches forwarded to this node, waiting for the broker's outcomes.
    answering: HashMap<u64, async_nats::Subject>,
    /// Receivers that got frames through the stream since mail was last sent.
    mail: HashSet<u32>,
    down: Option<Down>,
    /// Loads, deletes and releases that arrived while the link was down, in order.
    held: VecDeque<Command>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, link: mpsc::UnboundedReceiver<Link>) {
        let mut link = link.fuse();
        loop {
            let due = self.staged.next_due();
            let mut timer = match due {
                Some(left) => sleep(left).boxed().fuse(),
                None => futures::future::pending().boxed().fuse(),
            };
            select_biased! {
                state = link.next() => match state {
                    Some(Link::Up) => self.link_up().await,
                    Some(Link::Down) => self.link_down("the connection to NATS was lost"),
                    None => {}
                },
                done = self.pending.select_next_some() => self.on_done(done),
                load = self.retries.select_next_some() => self.on_command(load).await,
                answer = self.answers.select_next_some() => self.on_answer(answer).await,
                token = self.timeouts.select_next_some() => self.forward_timed_out(token).await,
                receiver = self.rechecks.select_next_some() => {
                    if self.holds.contains_key(&receiver) {
                        self.out.push(Reply::Mail { receiver });
                    }
                }
                msg = self.remote.select_next_some() => self.on_remote(msg.0, msg.1),
                cmd = rx.next() => match cmd {
                    Some(cmd) => {
                        self.on_command(cmd).await;
                        for _ in 1..BATCH {
                            match rx.try_recv() {
                                Ok(cmd) => self.on_command(cmd).await,
                                _ => break,
                            }
                        }
                    }
                    None => break,
                },
                () = timer => self.publish_due().await,
            }
            for receiver in std::mem::take(&mut self.kick) {
                if let Some(loads) = self.parked.remove(&receiver) {
                    for (load, mark) in loads {
                        if let Command::Load {
                            ticket,
                            receiver,
                            after,
                            max_bytes,
                        } = load
                        {
                            self.load(ticket, receiver, after, max_bytes, mark).await;
                        }
                    }
                    continue;
                }
                self.forward(receiver).await;
            }
            self.flush().await;
        }
        // Every sender is gone: write what is staged and finish what is in flight.
        self.publish_staged(None).await;
        self.settle().await;
        self.flush().await;
        let _ = within(ACK_WAIT, self.client.flush()).await;
        log::debug!("JetStream store closed");
    }

    /// Sends the replies gathered so far and the mail for receivers held elsewhere.
    async fn flush(&mut self) {
        if !self.out.is_empty() {
            let _ = self.replies.unbounded_send(std::mem::take(&mut self.out));
        }
        for receiver in std::mem::take(&mut self.mail) {
            let subject = format!("chat.hold.{receiver}.mail");
            if let Err(e) = self.client.publish(subject, self.node.clone().into()).await {
                log::debug!("mail for id {receiver} not sent: {e}");
            }
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        if let Command::Answer { token, outcomes } = cmd {
            return self.answer(token, outcomes).await;
        }
        if let Command::Append { seq, .. } = cmd {
            self.high_seq = self.high_seq.max(seq);
        }
        if self.down.is_some() {
            match cmd {
                Command::Append { .. } => self.out.extend(failed(cmd)),
                // A connection reading on: nothing more for now, so it stays live;
                // it reads again once the link is back.
                Command::Load {
                    ticket,
                    receiver,
                    after: Some(_),
                    ..
                } => self.out.push(Reply::Page {
                    ticket,
                    receiver,
                    frames: Vec::new(),
                }),
                other => self.held.push_back(other),
            }
            return;
        }
        match cmd {
            Command::Append {
                seq,
                receiver,
                live: true,
                ..
            } => self.staged.hold(seq, receiver, cmd),
            Command::Append { receiver, .. } if self.holds.contains_key(&receiver) => {
                // Behind anything this node stages for the same receiver.
                self.publish_staged(Some(receiver)).await;
                self.publish(cmd).await;
            }
            Command::Append { receiver, .. } => {
                self.routes.entry(receiver).or_default().queue.push(cmd);
                self.forward(receiver).await;
            }
            Command::Delete { seqs, .. } => {
                for seq in seqs {
                    self.delete(seq);
                }
            }
            Command::Load {
                ticket,
                receiver,
                after,
                max_bytes,
            } => {
                let mark = self.high_seq;
                self.load(ticket, receiver, after, max_bytes, mark).await;
            }
            Command::Left { receiver } => self.release(receiver).await,
            Command::Answer { .. } => {}
        }
    }

    /// Sends `receiver`'s queued frames to the node that holds it, unless a batch is
    /// still on its way.
    async fn forward(&mut self, receiver: u32) {
        let Some(route) = self.routes.get_mut(&receiver) else {
            return;
        };
        if route.busy() {
            return;
        }
        if route.queue.is_empty() {
            self.routes.remove(&receiver);
            return;
        }
        let batch = std::mem::take(&mut route.queue);
        let mut payload = bytes::BytesMut::new();
        for cmd in &batch {
            if let Command::Append { wire, .. } = cmd {
                payload.extend_from_slice(wire);
            }
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Chat-Node", self.node.as_str());
        if route.behind {
            headers.insert("Chat-Behind", "1");
        }
        let token = self.next_token;
        self.next_token += 1;
        route.forwarding = Some(token);
        let sent = self
            .client
            .publish_with_reply_and_headers(
                format!("chat.hold.{receiver}.frames"),
                format!("{}.{token}", self.inbox),
                headers,
                payload.freeze(),
            )
            .await;
        match sent {
            Ok(()) => {
                self.forwards.insert(token, Forward { receiver, batch });
                self.timeouts.push(
                    async move {
                        sleep(FORWARD_WAIT).await;
                        token
                    }
                    .boxed(),
                );
            }
            Err(e) => {
                log::debug!("id {receiver}: frames not forwarded: {e}");
                self.store_batch(receiver, batch).await;
            }
        }
    }

    /// Publishes a batch nobody took to the stream, in order; the next batch for the
    /// receiver waits until these are stored, and tells the holder to read them first.
    async fn store_batch(&mut self, receiver: u32, batch: Vec<Command>) {
        let mut queued = 0;
        for cmd in batch {
            if self.publish(cmd).await {
                queued += 1;
            }
        }
        if let Some(route) = self.routes.get_mut(&receiver) {
            route.forwarding = None;
            route.storing += queued;
            route.behind = true;
        }
        self.kick.push(receiver);
    }

    async fn on_answer(&mut self, msg: async_nats::Message) {
        let token = msg
            .subject
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u64>().ok());
        let Some(Forward { receiver, batch }) = token.and_then(|t| self.forwards.remove(&t)) else {
            return;
        };
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            // Nobody holds the id: the frames go to its mailbox.
            return self.store_batch(receiver, batch).await;
        }
        let text = String::from_utf8_lossy(&msg.payload);
        let mut lines = text.lines();
        for cmd in batch {
            if let Command::Append { .. } = cmd {
                let outcome = wire::decode_outcome(lines.next());
                self.out.extend(answer(cmd, outcome));
            }
        }
        if let Some(route) = self.routes.get_mut(&receiver) {
            route.forwarding = None;
            route.behind = false;
        }
        self.kick.push(receiver);
    }

    async fn forward_timed_out(&mut self, token: u64) {
        if let Some(Forward { receiver, batch }) = self.forwards.remove(&token) {
            log::warn!(
                "id {receiver}: its node did not answer within {FORWARD_WAIT:?}; storing {} frames in the stream (they may arrive twice)",
                batch.len()
            );
            self.store_batch(receiver, batch).await;
        }
    }

    /// Tells the node that forwarded a batch what became of its frames.
    async fn answer(&mut self, token: u64, outcomes: Vec<Outcome>) {
        let Some(reply) = self.answering.remove(&token) else {
            return;
        };
        let text = wire::encode_outcomes(&outcomes);
        if let Err(e) = self.client.publish(reply, text.into()).await {
            log::debug!("answer not sent: {e}");
        }
    }

    /// Publishes an append; false if it was refused at once (and answered).
    async fn publish(&mut self, cmd: Command) -> bool {
        let Command::Append {
            ticket,
            receiver,
            seq,
            wire,
            live,
        } = cmd
        else {
            return false;
        };
        let len = wire.len();
        match self.js.publish(format!("chat.mb.{receiver}"), wire).await {
            Ok(ack) => {
                if live {
                    self.published.insert(
                        seq,
                        Live {
                            receiver,
                            stream_seq: None,
                            delivered: false,
                        },
                    );
                }
                self.pending.push(
                    async move {
                        let result = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
                        Done::Published {
                            ticket,
                            seq,
                            receiver,
                            live,
                            len,
                            result,
                        }
                    }
                    .boxed(),
                );
                true
            }
            Err(e) => {
                self.out.push(Reply::Appended {
                    ticket,
                    seq,
                    outcome: Outcome::Failed(Failure::Store(e.to_string())),
                    len,
                });
                false
            }
        }
    }

    /// Publishes the staged appends that are due.
    async fn publish_due(&mut self) {
        for cmd in self.staged.due(false) {
            self.publish(cmd).await;
        }
    }

    /// Publishes what is staged (for one receiver, or all), in order.
    async fn publish_staged(&mut self, receiver: Option<u32>) {
        for cmd in self.staged.take_for(receiver) {
            self.publish(cmd).await;
        }
    }

    /// Waits for everything in flight, so that what follows sees it.
    async fn settle(&mut self) {
        while let Some(done) = self.pending.next().await {
            self.on_done(done);
        }
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Published {
                ticket,
                seq,
                receiver,
                live,
                len,
                result,
            } => {
                if !live
                    && let Some(route) = self.routes.get_mut(&receiver)
                    && route.storing > 0
                {
                    route.storing -= 1;
                    if route.storing == 0 {
                        self.kick.push(receiver);
                    }
                }
                let outcome = match result {
                    Ok(stream_seq) => {
                        if live {
                            self.published_live(seq, stream_seq);
                        } else {
                            self.mail.insert(receiver);
                        }
                        Outcome::Stored
                    }
                    Err(e) => {
                        self.published.remove(&seq);
                        if e.contains("maximum messages per subject") {
                            let why = "holds the limit of --mailbox-max-messages".to_string();
                            Outcome::Full(why)
                        } else {
                            if let Some(m) = &self.metrics {
                                m.store_failures.inc();
                            }
                            Outcome::Failed(Failure::Store(e))
                        }
                    }
                };
                self.out.push(Reply::Appended {
                    ticket,
                    seq,
                    outcome,
                    len,
                });
            }
            Done::Deleted => {}
        }
    }

    /// A live frame reached the stream: remember it, or remove it again if it was
    /// delivered meanwhile.
    fn published_live(&mut self, seq: u64, stream_seq: u64) {
        let Some(live) = self.published.get_mut(&seq) else {
            return;
        };
        if live.delivered {
            self.published.remove(&seq);
            self.delete_stream_seq(stream_seq);
        } else {
            live.stream_seq = Some(stream_seq);
            self.live
                .entry(live.receiver)
                .or_default()
                .insert(stream_seq);
        }
    }

    /// A frame was delivered: drop its staged append, or remove it from the stream.
    fn delete(&mut self, seq: u64) {
        if seq & STREAM_SEQ != 0 {
            return self.delete_stream_seq(seq & !STREAM_SEQ);
        }
        if let Some(cmd) = self.staged.take(seq) {
            self.out.extend(settled(cmd));
            return;
        }
        let Some(live) = self.published.get_mut(&seq) else {
            return;
        };
        match live.stream_seq {
            // Its publish is still in flight: remove it once it lands.
            None => live.delivered = true,
            Some(stream_seq) => {
                let receiver = live.receiver;
                self.published.remove(&seq);
                if let Some(set) = self.live.get_mut(&receiver) {
                    set.remove(&stream_seq);
                }
                self.delete_stream_seq(stream_seq);
            }
        }
    }

    fn delete_stream_seq(&mut self, stream_seq: u64) {
        let stream = self.stream.clone();
        self.pending.push(
            async move {
                // A frame that stays after a failed delete comes again: at least once.
                if let Err(e) = stream.delete_message(stream_seq).await {
                    log::debug!("stream sequence {stream_seq} not removed: {e}");
                }
                Done::Deleted
            }
            .boxed(),
        );
    }

    /// Reads a page of `receiver`'s mailbox. The first read of a connection claims the
    /// id for this node.
    /// `mark`: the highest frame number appended before this load was asked for.
    async fn load(
        &mut self,
        ticket: Ticket,
        receiver: u32,
        after: Option<u64>,
        max_bytes: usize,
        mark: u64,
    ) {
        if after.is_none() {
            // Frames this node was sending to the id's previous holder go first: wait
            // for the batch in flight, then store the rest, so the read below has them.
            if self.routes.get(&receiver).is_some_and(Route::busy) {
                let load = Command::Load {
                    ticket,
                    receiver,
                    after,
                    max_bytes,
                };
                self.parked.entry(receiver).or_default().push((load, mark));
                return;
            }
            if let Some(route) = self.routes.remove(&receiver) {
                for cmd in route.queue {
                    self.publish(cmd).await;
                }
            }
        }
        // A load sees every append and delete sent before it.
        self.publish_staged(Some(receiver)).await;
        self.settle().await;
        if after.is_none() {
            // A new connection reads everything pushed live to the ones before it
            // (frames numbered up to `mark`); its own live frames, which may have come
            // while this read waited, stay left out: the broker delivers those.
            let old: Vec<u64> = self
                .published
                .iter()
                .filter(|(seq, l)| l.receiver == receiver && **seq <= mark)
                .map(|(seq, _)| *seq)
                .collect();
            for seq in old {
                if let Some(stream_seq) = self.published.remove(&seq).and_then(|l| l.stream_seq)
                    && let Some(set) = self.live.get_mut(&receiver)
                {
                    set.remove(&stream_seq);
                }
            }
            self.claim(receiver).await;
        }
        let start = after.map_or(1, |a| (a & !STREAM_SEQ) + 1);
        let frames = match self.read(receiver, start, max_bytes).await {
            Ok(frames) => frames,
            Err(e) => {
                // Read the page again shortly (JetStream may be electing a leader).
                log::warn!("id {receiver}: mailbox read failed, trying again: {e}");
                let load = Command::Load {
                    ticket,
                    receiver,
                    after,
                    max_bytes,
                };
                self.retries.push(
                    async move {
                        sleep(READ_RETRY).await;
                        load
                    }
                    .boxed(),
                );
                return;
            }
        };
        self.out.push(Reply::Page {
            ticket,
            receiver,
            frames,
        });
    }

    /// Reads `receiver`'s frames from stream sequence `start` on, up to `max_bytes` (at
    /// least one frame), leaving out the live frames this node pushed itself. JetStream
    /// 2.9 has no batched read by subject: a short-lived consumer filtered on the id's
    /// subject reads the page in one batch and is deleted.
    async fn read(
        &mut self,
        receiver: u32,
        start: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, String> {
        use jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        let config = pull::Config {
            filter_subject: format!("chat.mb.{receiver}"),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ack_policy: AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            // Removed by the server too, should this node die before deleting it.
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        };
        let consumer = self
            .stream
            .create_consumer(config)
            .await
            .map_err(|e| e.to_string())?;
        let name = consumer.cached_info().name.clone();
        let result = self.fetch(&consumer, receiver, max_bytes).await;
        let stream = self.stream.clone();
        self.pending.push(
            async move {
                if let Err(e) = stream.delete_consumer(&name).await {
                    log::debug!("reader {name} not deleted (it expires): {e}");
                }
                Done::Deleted
            }
            .boxed(),
        );
        result
    }

    async fn fetch(
        &self,
        consumer: &jetstream::consumer::PullConsumer,
        receiver: u32,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, String> {
        let skip = self.live.get(&receiver);
        // Room for the largest frame, so that a page is never empty while frames wait.
        let room = max_bytes.max(self.max_frame);
        let mut frames = Vec::new();
        let mut bytes = 0;
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(READ_BATCH)
                .max_bytes(room.saturating_sub(bytes).max(self.max_frame))
                .messages()
                .await
                .map_err(|e| e.to_string())?;
            let mut got = 0;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(|e| e.to_string())?;
                got += 1;
                let seq = msg.info().map_err(|e| e.to_string())?.stream_sequence;
                if skip.is_some_and(|s| s.contains(&seq)) {
                    continue;
                }
                bytes += msg.payload.len();
                frames.push((seq | STREAM_SEQ, msg.payload.clone()));
            }
            // Done when the batch came back short, or a page is made.
            if got < READ_BATCH || !frames.is_empty() {
                return Ok(frames);
            }
        }
    }

    /// Makes this node the holder of `receiver`: asks the current holder to let go,
    /// then subscribes to the id's subjects.
    async fn claim(&mut self, receiver: u32) {
        if self.holds.contains_key(&receiver) {
            return;
        }
        let request = async_nats::Request::new()
            .payload(Bytes::from(self.node.clone()))
            .timeout(Some(CLAIM_WAIT));
        let take = format!("chat.hold.{receiver}.take");
        match self.client.send_request(take, request).await {
            Ok(_) => log::debug!("id {receiver}: released by its previous node"),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
            Err(e) => log::warn!(
                "id {receiver}: the node holding it did not let go ({e}); binding anyway"
            ),
        }
        let subscriber = match self
            .client
            .subscribe(format!("chat.hold.{receiver}.*"))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                log::warn!("id {receiver}: cannot subscribe to its mail: {e}");
                return;
            }
        };
        // Bounded: while the link is down a flush would wait for its return.
        let _ = within(ACK_WAIT, self.client.flush()).await;
        let (cancel, cancelled) = oneshot::channel();
        self.holds.insert(receiver, cancel);
        self.remote.push(
            subscriber
                .map(move |m| (receiver, m))
                .take_until(cancelled)
                .boxed(),
        );
        self.rechecks.push(
            async move {
                sleep(RECHECK).await;
                receiver
            }
            .boxed(),
        );
    }

    /// This node no longer delivers to `receiver`: write what it stages for it, stop
    /// listening for it, and answer the nodes waiting to take it over.
    async fn release(&mut self, receiver: u32) {
        self.publish_staged(Some(receiver)).await;
        self.settle().await;
        self.holds.remove(&receiver);
        self.live.remove(&receiver);
        for reply in self.takeovers.remove(&receiver).unwrap_or_default() {
            if let Err(e) = self.client.publish(reply, Bytes::new()).await {
                log::debug!("id {receiver}: release not sent: {e}");
            }
        }
    }

    fn on_remote(&mut self, receiver: u32, msg: async_nats::Message) {
        if msg.payload[..] == *self.node.as_bytes() {
            return;
        }
        if msg.subject.ends_with(".frames")
            && let Some(reply) = msg.reply
        {
            let behind = msg
                .headers
                .as_ref()
                .is_some_and(|h| h.get("Chat-Behind").is_some());
            let Some(frames) = split_frames(&msg.payload) else {
                log::warn!("id {receiver}: malformed frames from another node; ignored");
                return;
            };
            let token = self.next_token;
            self.next_token += 1;
            self.answering.insert(token, reply);
            self.out.push(Reply::Forwarded {
                token,
                receiver,
                frames,
                behind,
            });
        } else if msg.subject.ends_with(".mail") {
            self.out.push(Reply::Mail { receiver });
        } else if msg.subject.ends_with(".take")
            && let Some(reply) = msg.reply
        {
            log::debug!(
                "id {receiver}: node {} takes it over",
                String::from_utf8_lossy(&msg.payload)
            );
            self.takeovers.entry(receiver).or_default().push(reply);
            self.out.push(Reply::Takeover { receiver });
        }
    }

    fn link_down(&mut self, why: &str) {
        if self.down.is_some() {
            return;
        }
        log::error!(
            "node {}: {why}; frames that cannot be delivered on this node get store-failed until NATS is back",
            self.node
        );
        if let Some(m) = &self.metrics {
            m.store_failures.inc();
        }
        self.down = Some(Down {
            since: Instant::now(),
        });
        // Staged frames cannot be stored now; their echoes fail, their pushes go on.
        let staged = self.staged.take_for(None);
        self.out.extend(staged.into_iter().filter_map(failed));
        self.out
            .push(Reply::Health(Some(format!("NATS unreachable: {why}"))));
    }

    async fn link_up(&mut self) {
        let Some(down) = self.down.take() else {
            return;
        };
        log::info!(
            "node {}: NATS is back after {:.1} s",
            self.node,
            down.since.elapsed().as_secs_f64()
        );
        self.out.push(Reply::Health(None));
        // Frames may have been stored for them meanwhile.
        let mail = self.holds.keys().map(|&receiver| Reply::Mail { receiver });
        self.out.extend(mail);
        let held: Vec<Command> = self.held.drain(..).collect();
        for cmd in held {
            Box::pin(self.on_command(cmd)).await;
        }
    }
}

/// Cuts a forwarded batch into its server -> client frames.
fn split_frames(payload: &Bytes) -> Option<Vec<Bytes>> {
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

/// `future`'s output, unless it takes longer than `limit`.
async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> Option<T> {
    let future = std::pin::pin!(future);
    match futures::future::select(future, std::pin::pin!(sleep(limit))).await {
        futures::future::Either::Left((out, _)) => Some(out),
        futures::future::Either::Right(_) => None,
    }
}

/// The answer to an append that cannot be stored while NATS is unreachable.
fn failed(cmd: Command) -> Option<Reply> {
    answer(cmd, Outcome::Failed(Failure::NatsUnreachable))
}
