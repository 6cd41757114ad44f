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
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt, TryStreamExt, select_biased};

use crate::cluster::StartError;
use crate::cluster::echoes::Echoes;
use crate::cluster::forward::{Due, Forwards, Settled};
use crate::cluster::holds::{CLAIM_WAIT, Heard, Holds};
use crate::cluster::link::{self, Link, Servers, sleep, within};
use crate::cluster::log::{Log, Logged};
use crate::cluster::msg::{FromCluster, Grew, ToCluster};
use crate::cluster::wire::{self, Hold, Refused};
use crate::ids::Endpoint;
use crate::metrics::Metrics;
use crate::store::{
    Command, DeviceChange, Failure, History, Limits, Outcome, QUEUE, Reply, Stage, Store, Stored,
    Ticket, answer, author_of, settled,
};

/// The stream that holds every node's frames.
pub const STREAM: &str = "CHAT_MAILBOX";
/// How long setting up the stream may take (a new cluster first elects its leaders,
/// which on a loaded machine can take most of a minute).
const SETUP_LIMIT: Duration = Duration::from_secs(60);
/// A mailbox read that failed is tried again after this long.
const READ_RETRY: Duration = Duration::from_millis(250);
/// Frames in one page of a mailbox, at most.
const READ_BATCH: usize = 256;
/// How long one read of a frame may take before the page is read again: short, since
/// a leader that does not answer is being replaced.
const READ_WAIT: Duration = Duration::from_secs(1);
/// How long JetStream may take to confirm a frame before its sender is told
/// `store-failed` (it may still have been stored: a resend can repeat it).
const ACK_WAIT: Duration = Duration::from_secs(5);
/// How long an operator's count or purge of a mailbox may take.
const OPERATOR_WAIT: Duration = Duration::from_secs(5);
/// How often every session here reads on, whatever it heard: a note is a core NATS
/// message, and one lost (a NATS server cut off for a moment) would leave a session
/// behind until its id's next frame. (A `chat-chaos` run with sessions found a device
/// that never got a frame.)
const SWEEP: Duration = Duration::from_secs(5);
/// Commands applied before replies are sent and timers looked at.
const BATCH: usize = 1024;

/// What the link's thread hands the store.
pub struct Setup {
    /// How many NATS URLs the node was given.
    pub given_servers: usize,
    pub client: async_nats::Client,
    /// Which NATS server the link is on (see [`link::watch`]).
    pub(crate) servers: Servers,
    pub node: String,
    pub replicas: Option<usize>,
    pub limits: Limits,
    /// History's bounds; with history on, sessions are offered and each id's log is
    /// kept in the stream [`crate::cluster::log::STREAM`].
    pub history: History,
    pub max_frame_bytes: u32,
    pub metrics: Option<Arc<Metrics>>,
    pub link: mpsc::UnboundedReceiver<Link>,
    /// Where the watch says JetStream is back (see [`link::watch`]).
    pub(crate) watch_link: mpsc::UnboundedSender<Link>,
}

/// Sets up the stream, reports the store ready (or why not) and serves it until every
/// command sender is gone.
pub async fn run(
    setup: Setup,
    ready: std::sync::mpsc::Sender<Result<Store<ToCluster, FromCluster>, StartError>>,
) {
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
    // Mailbox reads wait less than publishes (see [`READ_WAIT`]).
    let reads = jetstream::ContextBuilder::new()
        .timeout(READ_WAIT)
        .build(setup.client.clone())
        .get_stream_no_info(STREAM)
        .await;
    let reads = match reads {
        Ok(reads) => reads,
        Err(e) => {
            let reason = e.to_string();
            let _ = ready.send(Err(StartError::Stream {
                stream: STREAM,
                reason,
            }));
            return;
        }
    };
    let log = match setup.history.on() {
        false => None,
        true => {
            let replicas = stream.cached_info().config.num_replicas;
            let max_frame = setup.max_frame_bytes as usize + crate::protocol::SERVER_HEADER_LEN;
            let started = Instant::now();
            let made = loop {
                match crate::cluster::log::ensure(&js, &setup.history, replicas, max_frame).await {
                    Ok(made) => break Ok(made),
                    Err(e) if started.elapsed() < SETUP_LIMIT => {
                        log::debug!("history stream not ready yet: {e}");
                        sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            let made = match made {
                Ok((history, kv)) => {
                    let history_reads = jetstream::ContextBuilder::new()
                        .timeout(READ_WAIT)
                        .build(setup.client.clone())
                        .get_stream_no_info(crate::cluster::log::STREAM)
                        .await
                        .map_err(|e| e.to_string());
                    match history_reads {
                        Ok(history_reads) => {
                            let mailbox = crate::cluster::log::Mailbox {
                                reads: reads.clone(),
                                stream: stream.clone(),
                            };
                            let client = setup.client.clone();
                            Log::new(js.clone(), mailbox, client, history_reads, history, kv).await
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match made {
                Ok(log) => {
                    log::info!(
                        "node {}: history kept in stream {}",
                        setup.node,
                        crate::cluster::log::STREAM
                    );
                    Some(log)
                }
                Err(reason) => {
                    let _ = ready.send(Err(StartError::Stream {
                        stream: crate::cluster::log::STREAM,
                        reason,
                    }));
                    return;
                }
            }
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
        // Each node numbers the named devices it sees; their cursors are in the bucket.
        devices: Vec::new(),
        // Writers' deliveries come to the actor as commands.
        deliveries: None,
        closed,
    };
    let inbox = setup.client.new_inbox();
    let answers = match setup.client.subscribe(wire::answers(&inbox)).await {
        Ok(sub) => sub.boxed(),
        Err(e) => {
            let _ = ready.send(Err(StartError::Subscribe(e.to_string())));
            return;
        }
    };
    let batches = match setup
        .client
        .subscribe(wire::node_batches(wire::batch_token(&inbox)))
        .await
    {
        Ok(sub) => sub.fuse().boxed(),
        Err(e) => {
            let _ = ready.send(Err(StartError::Subscribe(e.to_string())));
            return;
        }
    };
    if ready.send(Ok(store)).is_err() {
        return;
    }
    let _watch = link::watch(
        setup.client.clone(),
        STREAM,
        setup.servers.clone(),
        setup.node.clone(),
        setup.watch_link.clone(),
    );
    let actor = Actor {
        js,
        client: setup.client,
        stream,
        reads,
        holds: Holds::new(setup.node.clone(), batches),
        forwards: Forwards::new(setup.node.clone(), inbox, answers, log.is_some()),
        node: setup.node,
        max_frame: setup.max_frame_bytes as usize + crate::protocol::SERVER_HEADER_LEN,
        metrics: setup.metrics,
        replies: reply_tx,
        out: Vec::new(),
        staged: Stage::default(),
        published: HashMap::new(),
        live: HashMap::new(),
        pending: FuturesUnordered::new(),
        retries: FuturesUnordered::new(),
        releases: HashMap::new(),
        mail: HashSet::new(),
        parked: HashMap::new(),
        high_seq: 0,
        down: None,
        held: VecDeque::new(),
        claiming: HashMap::new(),
        log,
        echoes: Echoes::default(),
        unlogged: HashSet::new(),
        next_sweep: Instant::now() + SWEEP,
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
        subjects: vec![wire::MAILBOX_SUBJECTS.into()],
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

/// A frame's place in the stream. The broker knows a frame read from the stream by
/// [`StreamSeq::number`]: the stream's sequence with the top bit set, so it never
/// meets the numbers the broker gives the frames it appends (which count up from 1 in
/// one process), and a delete tells at once which of the two it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamSeq(u64);

impl StreamSeq {
    const MARK: u64 = 1 << 63;

    /// The frame the broker numbers `number`, if it was read from the stream.
    fn of(number: u64) -> Option<StreamSeq> {
        (number & Self::MARK != 0).then_some(StreamSeq(number & !Self::MARK))
    }

    /// The number the broker knows this frame by.
    fn number(self) -> u64 {
        self.0 | Self::MARK
    }
}

/// A live frame this node published: its stream sequence once acknowledged, and
/// whether it was delivered before that.
struct Live {
    receiver: u32,
    stream_seq: Option<u64>,
    delivered: bool,
}

/// Work in flight on the NATS connection.
enum Done {
    Published {
        ticket: Ticket,
        seq: u64,
        receiver: u32,
        live: bool,
        len: usize,
        result: Result<u64, Refused>,
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
    /// The same stream, for mailbox reads, which wait [`READ_WAIT`] at most.
    reads: stream::Stream<()>,
    node: String,
    /// The largest frame in its wire encoding.
    max_frame: usize,
    metrics: Option<Arc<Metrics>>,
    replies: mpsc::UnboundedSender<Vec<FromCluster>>,
    /// Replies gathered while handling one batch of work.
    out: Vec<FromCluster>,
    staged: Stage,
    /// Live frames published, by the broker's sequence number.
    published: HashMap<u64, Live>,
    /// Per receiver, the stream sequences of live frames this node published and
    /// pushed (or holds, to push once a read is done), with the broker's numbers for
    /// them: a mailbox read after the last page skips them.
    live: HashMap<u32, HashMap<u64, u64>>,
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Reads that failed, to be tried again, with the mark of their first attempt and
    /// how often their id had been let go when they failed (see [`Actor::retry`]).
    retries: FuturesUnordered<BoxFuture<'static, (Command, u64, u64)>>,
    /// How often each id was let go by this node while reads waited to be tried
    /// again (cleared when none waits): a read retried after its id was let go is for
    /// a connection that is gone.
    releases: HashMap<u32, u64>,
    /// The ids this node holds and what it hears for them (see [`crate::cluster::holds`]).
    holds: Holds,
    /// Frames for ids held elsewhere, and batches forwarded here (see
    /// [`crate::cluster::forward`]).
    forwards: Forwards,
    /// First reads of ids this node is about to hold, waiting until the frames it was
    /// forwarding for them elsewhere are settled (so the read sees them, in order).
    parked: HashMap<u32, Vec<(Command, u64)>>,
    /// The highest frame number appended so far.
    high_seq: u64,
    /// Receivers that got frames through the stream since mail was last sent.
    mail: HashSet<u32>,
    down: Option<Down>,
    /// Loads, deletes and releases that arrived while the link was down, in order.
    held: VecDeque<ToCluster>,
    /// Ids this node is claiming: the first read that started the claim, and the
    /// commands for the id that came meanwhile, in order. They go on once the claim is
    /// done; commands for other ids go on at once.
    claiming: HashMap<u32, (FirstRead, VecDeque<ToCluster>)>,
    /// History and named devices (see [`crate::cluster::log`]); `None` with history off.
    log: Option<Log>,
    /// Echoes waiting on the log too (see [`crate::cluster::echoes`]).
    echoes: Echoes,
    /// Forwarded batches whose frames are in no log yet (a node of the previous
    /// release sent them), until answered: this node writes them.
    unlogged: HashSet<u64>,
    /// When the sessions here next read on regardless (see [`SWEEP`]).
    next_sweep: Instant,
}

/// A first read of an id's mailbox, waiting for this node's claim of the id.
struct FirstRead {
    ticket: Ticket,
    max_bytes: usize,
    /// The highest frame number appended before it was asked for.
    mark: u64,
}

/// The id a command is about, if it is about one.
fn concerns(cmd: &ToCluster) -> Option<u32> {
    match cmd {
        ToCluster::Store(
            Command::Append { receiver, .. }
            | Command::Load { receiver, .. }
            | Command::Delete { receiver, .. },
        )
        | ToCluster::Left { receiver } => Some(*receiver),
        ToCluster::Store(Command::Measure { id, .. } | Command::Forget { id, .. }) => Some(*id),
        ToCluster::Store(Command::Device { .. } | Command::Query { .. })
        | ToCluster::Answer { .. }
        | ToCluster::Hear { .. } => None,
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<ToCluster>, link: mpsc::UnboundedReceiver<Link>) {
        let mut link = link.fuse();
        loop {
            let logging = self.log.as_ref().and_then(Log::next_due);
            let sweep = self
                .log
                .as_ref()
                .map(|_| self.next_sweep.saturating_duration_since(Instant::now()));
            let due = [self.staged.next_due(), logging, sweep]
                .into_iter()
                .flatten()
                .min();
            let mut timer = match due {
                Some(left) => sleep(left).boxed().fuse(),
                None => futures::future::pending().boxed().fuse(),
            };
            select_biased! {
                state = link.next() => match state {
                    Some(Link::Up) => self.link_up().await,
                    Some(Link::Down) => self.link_down("the connection to NATS was lost"),
                    Some(Link::Recovered) => self.mail_held(),
                    None => {}
                },
                done = self.pending.select_next_some() => self.on_done(done),
                (load, mark, released) = self.retries.select_next_some() => {
                    self.retry(load, mark, released).await;
                }
                due = self.forwards.next().fuse() => match due {
                    Due::Answer(msg) => {
                        let settled = self.forwards.answered(&msg);
                        self.settled(settled).await;
                    }
                    Due::Timeout(token) => {
                        let settled = self.forwards.timed_out(token);
                        self.settled(settled).await;
                    }
                },
                heard = self.holds.next().fuse() => self.heard(heard).await,
                logged = log_next(&mut self.log).fuse() => self.logged(logged),
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
                () = timer => {
                    self.publish_due().await;
                    self.sweep();
                }
            }
            for receiver in self.forwards.kicked() {
                if let Some(loads) = self.parked.remove(&receiver) {
                    for (load, mark) in loads {
                        if let Command::Load {
                            ticket,
                            receiver,
                            after,
                            max_bytes,
                            ..
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
        // Every sender is gone: finish the claims (what waits for them goes on), write
        // what is staged and finish what is in flight.
        while !self.claiming.is_empty() {
            match within(CLAIM_WAIT * 2, self.holds.next()).await {
                Some(heard) => self.heard(heard).await,
                None => break,
            }
        }
        self.publish_staged(None).await;
        self.settle().await;
        self.flush_log(true).await;
        let logged = match &mut self.log {
            Some(log) => within(ACK_WAIT, log.settle()).await.unwrap_or_default(),
            None => Vec::new(),
        };
        for done in logged {
            self.logged(done);
        }
        self.flush().await;
        let _ = within(ACK_WAIT, self.client.flush()).await;
        log::debug!("JetStream store closed");
    }

    /// Sends the replies gathered so far and the mail for receivers held elsewhere;
    /// publishes the history blocks filled meanwhile.
    async fn flush(&mut self) {
        self.flush_log(false).await;
        self.send_ready().await;
        self.send_out().await;
    }

    /// Sends the frames waiting for a batch to their receivers' known holders; what
    /// could not be sent goes to the stream.
    async fn send_ready(&mut self) {
        let (back, unknown) = self.forwards.send_ready(&self.client).await;
        for (receiver, frames) in back {
            self.store_batch(receiver, frames).await;
        }
        for receiver in unknown {
            self.forward(receiver).await;
        }
    }

    /// Publishes the history blocks that are due (or all of them).
    async fn flush_log(&mut self, all: bool) {
        if let Some(log) = &mut self.log {
            for (waits, why) in log.flush(all).await {
                let failed = Err(why);
                for (index, wait) in waits {
                    self.echoes.logged(wait, index, &failed);
                }
            }
        }
    }

    /// Stores every history block being filled, and waits for them.
    async fn store_log_now(&mut self) {
        let stored = match &mut self.log {
            Some(log) => log.store_now().await,
            None => Vec::new(),
        };
        for done in stored {
            self.logged(done);
        }
    }

    /// Sends the replies gathered so far and the mail for receivers held elsewhere.
    async fn send_out(&mut self) {
        let out = std::mem::take(&mut self.out);
        self.out = out
            .into_iter()
            .filter_map(|reply| self.echoes.reply(reply))
            .collect();
        self.out.extend(self.echoes.ready());
        if !self.out.is_empty() {
            let _ = self.replies.unbounded_send(std::mem::take(&mut self.out));
        }
        for receiver in std::mem::take(&mut self.mail) {
            let subject = wire::hold(receiver, Hold::Mail);
            if let Err(e) = self.client.publish(subject, self.node.clone().into()).await {
                log::debug!("mail for id {receiver} not sent: {e}");
            }
        }
    }

    async fn on_command(&mut self, cmd: ToCluster) {
        if let Some(receiver) = concerns(&cmd)
            && let Some((_, waiting)) = self.claiming.get_mut(&receiver)
        {
            waiting.push_back(cmd);
            return;
        }
        match cmd {
            ToCluster::Store(cmd) => self.on_store(cmd).await,
            ToCluster::Answer { token, outcomes } => {
                self.unlogged.remove(&token);
                let holds = &self.holds;
                let held = |receiver| holds.holds(receiver);
                self.forwards
                    .answer(&self.client, token, &outcomes, held)
                    .await;
            }
            // Behind the loads and deletes held before it.
            left @ ToCluster::Left { .. } if self.down.is_some() => self.held.push_back(left),
            ToCluster::Left { receiver } => self.release(receiver).await,
            ToCluster::Hear { id, on } => {
                if let Some(log) = &mut self.log {
                    log.hear(id, on).await;
                }
            }
        }
    }

    async fn on_store(&mut self, cmd: Command) {
        if let Command::Append { seq, .. } = cmd {
            self.high_seq = self.high_seq.max(seq);
        }
        if self.down.is_some() {
            match cmd {
                Command::Append { .. } => self.out.extend(failed(cmd).map(FromCluster::Store)),
                // A connection reading on: nothing more for now, so it stays live;
                // it reads again once the link is back.
                Command::Load {
                    ticket,
                    receiver,
                    after: Some(_),
                    ..
                } => self.out.push(FromCluster::Store(Reply::Page {
                    ticket,
                    receiver,
                    held: Vec::new(),
                    frames: Vec::new(),
                    sync: None,
                })),
                other => self.held.push_back(ToCluster::Store(other)),
            }
            return;
        }
        let cmd = self.logging(cmd);
        match cmd {
            // Older frames for the receiver are still on their way to its previous
            // holder, or to the stream: this one goes behind them, whichever way they
            // go (staged, it could reach the stream first, and a later reader would
            // get it before them).
            Command::Append {
                receiver,
                live: true,
                ..
            } if self.forwards.pending(receiver) => self.forwards.queue(receiver, cmd),
            Command::Append {
                seq,
                receiver,
                live: true,
                ..
            } => self.staged.hold(seq, receiver, cmd),
            Command::Append { receiver, .. } if self.holds.holds(receiver) => {
                // Behind anything this node stages for the same receiver.
                self.publish_staged(Some(receiver)).await;
                self.publish(cmd).await;
            }
            Command::Append { receiver, .. } => {
                self.forwards.queue(receiver, cmd);
                self.forward(receiver).await;
            }
            Command::Delete {
                seqs,
                receiver,
                device,
            } if device != 0 => {
                if let (Some(log), Some(&upto)) = (&mut self.log, seqs.iter().max()) {
                    log.ack(
                        Endpoint {
                            id: receiver,
                            device,
                        },
                        upto,
                    );
                }
            }
            Command::Delete { seqs, receiver, .. } => {
                for seq in seqs {
                    self.delete(receiver, seq);
                }
            }
            Command::Load {
                ticket,
                receiver,
                device,
                after,
                max_bytes,
                reading,
            } if device != 0 => {
                let endpoint = Endpoint {
                    id: receiver,
                    device,
                };
                let bound = match reading {
                    crate::store::Reading::SessionStart { bound, .. } => Some(bound),
                    _ => None,
                };
                match &mut self.log {
                    Some(log) => log.load(ticket, endpoint, after, max_bytes, bound),
                    None => self.out.push(FromCluster::Store(Reply::Page {
                        ticket,
                        receiver,
                        held: Vec::new(),
                        frames: Vec::new(),
                        sync: None,
                    })),
                }
            }
            Command::Load {
                ticket,
                receiver,
                after,
                max_bytes,
                ..
            } => {
                let mark = self.high_seq;
                self.load(ticket, receiver, after, max_bytes, mark).await;
            }
            Command::Device { endpoint, change } => {
                if let Some(log) = &mut self.log {
                    match change {
                        DeviceChange::Seen { name, .. } => log.seen(endpoint, &name),
                        DeviceChange::Forget => log.forget(endpoint),
                    }
                }
            }
            Command::Measure { id, answer } => {
                // Behind what this node stages for it, as a load would be.
                self.publish_staged(Some(id)).await;
                self.settle().await;
                self.store_log_now().await;
                if let Some(waiting) = self.waiting_in_stream(id).await {
                    let mut history = 0;
                    if let Some(log) = &self.log {
                        match within(OPERATOR_WAIT, log.blocks(id)).await {
                            Some(Ok(n)) => history = n,
                            Some(Err(e)) => log::warn!("id {id}: history not counted: {e}"),
                            None => log::warn!("id {id}: history not counted in {OPERATOR_WAIT:?}"),
                        }
                    }
                    let _ = answer.send(Stored {
                        mailbox_messages: waiting,
                        history_messages: history,
                        ..Stored::default()
                    });
                }
            }
            Command::Forget { id, answer } => {
                self.publish_staged(Some(id)).await;
                self.settle().await;
                self.store_log_now().await;
                if let Some(purged) = self.purge(id).await {
                    self.live.remove(&id);
                    self.mail.remove(&id);
                    let mut history = 0;
                    if let Some(log) = &mut self.log {
                        match within(OPERATOR_WAIT, log.purge(id)).await {
                            Some(Ok(n)) => history = n,
                            Some(Err(e)) => log::warn!("id {id}: history not purged: {e}"),
                            None => log::warn!("id {id}: history not purged in {OPERATOR_WAIT:?}"),
                        }
                    }
                    let _ = answer.send(Stored {
                        mailbox_messages: purged,
                        history_messages: history,
                        ..Stored::default()
                    });
                }
            }
            Command::Query { ticket, query, id } if self.log.is_some() => {
                if let Some(log) = &mut self.log {
                    log.query(ticket, id, query);
                }
            }
            Command::Query { ticket, query, .. } => {
                let failed = crate::protocol::session::Record::QueryFailed {
                    request: query.request(),
                    why: "history is not kept in a cluster yet".into(),
                };
                self.out.push(FromCluster::Store(Reply::Answer {
                    ticket,
                    frames: vec![failed.encode()],
                }));
            }
        }
    }

    /// With history on, a frame a connection here sent goes into its conversation's
    /// log. Hands the append back for the mailbox's path; when its receiver is used
    /// only from sessions, that path goes as far as a node that holds the receiver
    /// (one that bound it a moment ago), and nobody stores it in the mailbox.
    fn logging(&mut self, cmd: Command) -> Command {
        let Some(log) = &mut self.log else {
            return cmd;
        };
        let Command::Append {
            ticket,
            receiver,
            seq,
            wire,
            live,
            time,
            fanout,
        } = &cmd
        else {
            return cmd;
        };
        // Frames from a connection here; and frames a node of the previous release
        // forwarded, which it did not log.
        let ours = match ticket {
            Ticket::Conn(_) => true,
            Ticket::Remote(token) => self.unlogged.contains(token),
        };
        if !ours {
            return cmd;
        }
        let origin = fanout.as_ref().and_then(|f| f.origin);
        let sessions_only = !*live && log.sessions_only(*receiver);
        let sender = author_of(wire);
        log.append(
            sender,
            *receiver,
            origin,
            wire,
            *time,
            *seq,
            origin.is_some(),
            sessions_only,
        );
        self.echoes
            .expect(*seq, *ticket, wire.len(), origin.is_some(), sessions_only);
        cmd
    }

    /// What the log's work came to.
    fn logged(&mut self, logged: Logged) {
        let Some(log) = &mut self.log else {
            return;
        };
        match logged {
            Logged::Stored { ids, waits, result } => {
                if result.is_ok() {
                    log.stored(ids);
                } else if let Err(e) = &result {
                    let (a, b) = ids;
                    log::warn!("ids {a} and {b}: a history block was not stored: {e}");
                }
                for (index, wait) in waits {
                    self.echoes.logged(wait, index, &result);
                }
            }
            Logged::Page {
                ticket,
                endpoint,
                through,
                frames,
                sync,
            } => {
                log.read_through(endpoint, ticket, through);
                self.out.push(FromCluster::Store(Reply::Page {
                    ticket,
                    receiver: endpoint.id,
                    held: Vec::new(),
                    frames,
                    sync,
                }));
            }
            Logged::Answer { ticket, frames } => {
                self.out
                    .push(FromCluster::Store(Reply::Answer { ticket, frames }));
            }
            Logged::Grew { id } => self.out.push(FromCluster::Grew(Grew::Id(id))),
            Logged::Read { id, record } => self.out.push(FromCluster::Read { id, record }),
            Logged::Mail { id } => log.mail(id),
            Logged::Imported { id } => log.imported(id),
            Logged::Key(key) => {
                // An id held here by its default device got a named device: frames
                // must keep waiting in its mailbox.
                if let wire::DeviceKey::Named { id, .. } | wire::DeviceKey::HasNamed { id } = key
                    && self.holds.holds(id)
                {
                    log.seen(Endpoint::default_of(id), "");
                }
                log.key(key);
            }
            Logged::Default { id, in_use } => log.default_known(id, in_use),
            Logged::Done => {}
        }
    }

    /// How many frames wait in `id`'s subject of the stream; `None` (logged) when
    /// the stream does not answer within [`OPERATOR_WAIT`].
    async fn waiting_in_stream(&self, id: u32) -> Option<u64> {
        let subject = wire::mailbox(id);
        let count = async {
            let mut info = self.stream.info_with_subjects(&subject).await?;
            let mut n = 0;
            while let Some((_, count)) = info.try_next().await? {
                n += count as u64;
            }
            Ok::<u64, stream::InfoError>(n)
        };
        match within(OPERATOR_WAIT, count).await {
            Some(Ok(n)) => Some(n),
            Some(Err(e)) => {
                log::warn!("could not count {subject}: {e}");
                None
            }
            None => {
                log::warn!("could not count {subject}: no answer in {OPERATOR_WAIT:?}");
                None
            }
        }
    }

    /// Purges `id`'s subject of the stream: how many frames went; `None` (logged) when
    /// the stream does not answer within [`OPERATOR_WAIT`].
    async fn purge(&self, id: u32) -> Option<u64> {
        let subject = wire::mailbox(id);
        let purge = self.stream.purge().filter(subject.clone());
        match within(OPERATOR_WAIT, async move { purge.await }).await {
            Some(Ok(done)) => {
                log::info!(
                    "node {}: purged {} frames of {subject}",
                    self.node,
                    done.purged
                );
                Some(done.purged)
            }
            Some(Err(e)) => {
                log::warn!("could not purge {subject}: {e}");
                None
            }
            None => {
                log::warn!("could not purge {subject}: no answer in {OPERATOR_WAIT:?}");
                None
            }
        }
    }

    /// Sends `receiver`'s queued frames to the node that holds it, unless a batch is
    /// still on its way; a batch that could not be sent goes to the stream.
    async fn forward(&mut self, receiver: u32) {
        let store_instead = self.holds.just_let_go(receiver);
        let forwarding = self.forwards.forward(&self.client, receiver, store_instead);
        if let Some(frames) = forwarding.await {
            self.store_batch(receiver, frames).await;
        }
    }

    /// What became of a batch this node forwarded: its outcomes, or nobody took it.
    async fn settled(&mut self, settled: Settled) {
        match settled {
            Settled::Nothing => {}
            Settled::Answered(replies) => {
                self.out.extend(replies.into_iter().map(FromCluster::Store));
            }
            Settled::Unclaimed(sections) => {
                for (receiver, frames) in sections {
                    self.store_batch(receiver, frames).await;
                }
            }
        }
    }

    /// Publishes a batch nobody took to the stream, in order; the next batch for the
    /// receiver waits until these are stored, and tells the holder to read them first.
    async fn store_batch(&mut self, receiver: u32, batch: Vec<Command>) {
        let (mut queued, mut gap) = (0, false);
        for cmd in batch {
            if let Command::Append { seq, .. } = cmd
                && self.echoes.take_mailbox_free(seq)
            {
                // Nobody took it: its receiver's log has it, and no mailbox.
                continue;
            }
            // Only these are counted back when they land (see `on_done`); a live
            // frame queued behind them keeps its place by being published after them.
            let counted = matches!(cmd, Command::Append { live: false, .. });
            match self.publish(cmd).await {
                true if counted => queued += 1,
                false => gap = true,
                true => {}
            }
        }
        let behind = self.forwards.storing(receiver, queued, gap);
        self.refuse_behind_gap(receiver, behind);
    }

    /// What the node heard for an id it holds, or that its claim of one is done.
    async fn heard(&mut self, heard: Heard) {
        let news = match heard {
            Heard::Claimed { receiver } => return self.claimed(receiver).await,
            Heard::Frames {
                receiver,
                frames,
                behind,
                logged,
                reply,
            } => {
                let token = self.forwards.answering(reply, receiver);
                if !logged && self.log.is_some() {
                    self.unlogged.insert(token);
                }
                FromCluster::Forwarded {
                    token,
                    receiver,
                    frames,
                    behind,
                }
            }
            Heard::Batch {
                sections,
                logged,
                reply,
            } => {
                // A section for an id not held here is not taken: its sender sends it
                // to the id's subject instead. Taken, it would wait here for the id's
                // next holder, and the whole batch's answer with it.
                let parts: Vec<(u32, usize, bool)> = sections
                    .iter()
                    .map(|s| (s.receiver, s.frames.len(), self.holds.holds(s.receiver)))
                    .collect();
                let tokens = self
                    .forwards
                    .take_sections(&self.client, reply, &parts)
                    .await;
                for (section, token) in sections.into_iter().zip(tokens) {
                    let Some(token) = token else { continue };
                    if !logged && self.log.is_some() {
                        self.unlogged.insert(token);
                    }
                    self.out.push(FromCluster::Forwarded {
                        token,
                        receiver: section.receiver,
                        frames: section.frames,
                        behind: section.behind,
                    });
                }
                return;
            }
            Heard::Mail { receiver } => FromCluster::Mail { receiver },
            Heard::Take { receiver } => FromCluster::Takeover { receiver },
        };
        self.out.push(news);
    }

    /// Publishes an append; false if it was refused at once (and answered).
    async fn publish(&mut self, cmd: Command) -> bool {
        let Command::Append {
            ticket,
            receiver,
            seq,
            wire: frame,
            live,
            time,
            ..
        } = cmd
        else {
            return false;
        };
        let len = frame.len();
        let published = match &self.log {
            // In its conversation's log too (see `logging`; a forwarded frame by the
            // node that forwarded it, or here): marked, so that moving the mailbox
            // into the log does not append it twice.
            Some(_) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(wire::TIME_HEADER, time.to_string().as_str());
                let subject = wire::mailbox(receiver);
                self.js.publish_with_headers(subject, headers, frame).await
            }
            None => self.js.publish(wire::mailbox(receiver), frame).await,
        };
        match published {
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
                        let result = ack.await.map(|a| a.sequence);
                        let result = result.map_err(|e| wire::refused(&e));
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
                self.out.push(FromCluster::Store(Reply::Appended {
                    ticket,
                    seq,
                    outcome: Outcome::Failed(Failure::Store(e.to_string())),
                    len,
                }));
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
                if !live {
                    let behind = self.forwards.stored_one(receiver, result.is_ok());
                    self.refuse_behind_gap(receiver, behind);
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
                    Err(Refused::Full) => {
                        self.published.remove(&seq);
                        let why = "holds the limit of --mailbox-max-messages".to_string();
                        Outcome::Full(why)
                    }
                    Err(Refused::Failed(e)) => {
                        self.published.remove(&seq);
                        if let Some(m) = &self.metrics {
                            m.store_failures.inc();
                        }
                        Outcome::Failed(Failure::Store(e))
                    }
                };
                self.out.push(FromCluster::Store(Reply::Appended {
                    ticket,
                    seq,
                    outcome,
                    len,
                }));
            }
            Done::Deleted => {}
        }
    }

    /// Refuses the frames that were queued for `receiver` behind one that could not
    /// be stored (see [`Forwards::stored_one`]): their senders send them again, in
    /// order.
    ///
    /// A live frame among them keeps its place in the queue instead: the connection
    /// here that holds it delivers it whatever its append's outcome, so refusing it
    /// would only make its sender send it again, behind its own copy.
    fn refuse_behind_gap(&mut self, receiver: u32, behind: Vec<Command>) {
        let (live, behind): (Vec<Command>, Vec<Command>) = behind
            .into_iter()
            .partition(|cmd| matches!(cmd, Command::Append { live: true, .. }));
        for cmd in live {
            self.forwards.queue(receiver, cmd);
        }
        if behind.is_empty() {
            return;
        }
        log::warn!(
            "id {receiver}: a frame for it could not be stored; refusing the {} frames queued behind it, so none arrives before it",
            behind.len()
        );
        let why = "an earlier frame for this receiver could not be stored";
        let refused = behind
            .into_iter()
            .filter_map(|cmd| answer(cmd, Outcome::Failed(Failure::Store(why.into()))));
        self.out.extend(refused.map(FromCluster::Store));
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
                .insert(stream_seq, seq);
        }
    }

    /// A frame for `receiver` was delivered: drop its staged or queued append, or
    /// remove it from the stream.
    fn delete(&mut self, receiver: u32, seq: u64) {
        if let Some(stream_seq) = StreamSeq::of(seq) {
            return self.delete_stream_seq(stream_seq.0);
        }
        if let Some(cmd) = self
            .staged
            .take(seq)
            .or_else(|| self.forwards.unqueue(receiver, seq))
        {
            self.out.extend(settled(cmd).map(FromCluster::Store));
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
    /// id for this node, and waits for the claim (commands for other ids do not).
    /// `mark`: the highest frame number appended before this load was asked for.
    async fn load(
        &mut self,
        ticket: Ticket,
        receiver: u32,
        after: Option<u64>,
        max_bytes: usize,
        mark: u64,
    ) {
        if let Some((_, waiting)) = self.claiming.get_mut(&receiver) {
            // A parked read's turn came while the id is being claimed: behind the claim.
            let load = Command::Load {
                ticket,
                receiver,
                device: 0,
                after,
                max_bytes,
                reading: crate::store::Reading::Plain,
            };
            waiting.push_back(ToCluster::Store(load));
            return;
        }
        if after.is_none() {
            // Frames this node was sending to the id's previous holder go first: wait
            // for the batch in flight, then store the rest, so the read below has them.
            if self.forwards.busy(receiver) {
                let load = Command::Load {
                    ticket,
                    receiver,
                    device: 0,
                    after,
                    max_bytes,
                    reading: crate::store::Reading::Plain,
                };
                self.parked.entry(receiver).or_default().push((load, mark));
                return;
            }
            for cmd in self.forwards.take_queue(receiver) {
                match cmd {
                    Command::Append { seq, .. } if self.echoes.take_mailbox_free(seq) => {}
                    cmd => {
                        self.publish(cmd).await;
                    }
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
            if self.holds.claim(&self.client, receiver) {
                // The read waits for the claim, and so does what comes for the id.
                let first = FirstRead {
                    ticket,
                    max_bytes,
                    mark,
                };
                self.claiming.insert(receiver, (first, VecDeque::new()));
                return;
            }
        }
        self.read_page(ticket, receiver, after, max_bytes, mark)
            .await;
    }

    /// Tries `load` again after [`READ_RETRY`].
    fn retry_later(&mut self, load: Command, mark: u64, released: u64) {
        self.retries.push(
            async move {
                sleep(READ_RETRY).await;
                (load, mark, released)
            }
            .boxed(),
        );
    }

    /// How often this node let `receiver` go, counted while reads wait to be tried
    /// again (see [`Actor::releases`]).
    fn released(&self, receiver: u32) -> u64 {
        self.releases.get(&receiver).copied().unwrap_or(0)
    }

    /// A read that failed, again. It keeps its first attempt's mark: a first read
    /// asked for again with a later one would take this connection's own live frames,
    /// come since, for stored ones, and deliver them twice. Behind a claim, or while
    /// the link is down, it waits another [`READ_RETRY`].
    ///
    /// A read whose id this node let go since it failed is dropped: its connection is
    /// gone (the broker would drop the page), and a first read asked again would claim
    /// the id once more. The node then held an id it had no connection for, took the
    /// frames for it into the stream, and the id's real holder heard of them only by
    /// mail, which a cut can lose (the chaos run left 95 frames undelivered).
    async fn retry(&mut self, load: Command, mark: u64, released: u64) {
        let Command::Load {
            ticket,
            receiver,
            after,
            max_bytes,
            ..
        } = load
        else {
            return;
        };
        if self.released(receiver) != released {
            log::debug!(
                "id {receiver}: a read to try again for a connection that has left; dropped"
            );
            return;
        }
        if self.down.is_some() || self.claiming.contains_key(&receiver) {
            // Not yet: it stays a retry, with its mark and its id's release count, so
            // that a release meanwhile still drops it.
            self.retry_later(load, mark, released);
            return;
        }
        self.load(ticket, receiver, after, max_bytes, mark).await;
    }

    /// This node holds `receiver` now: the first read goes on, then what waited.
    async fn claimed(&mut self, receiver: u32) {
        let Some((first, waiting)) = self.claiming.remove(&receiver) else {
            return;
        };
        self.read_page(first.ticket, receiver, None, first.max_bytes, first.mark)
            .await;
        for cmd in waiting {
            Box::pin(self.on_command(cmd)).await;
        }
    }

    /// Reads the page after `after` and answers with it; a read that fails is tried
    /// again shortly, with the same `mark` (see [`Actor::load`]).
    async fn read_page(
        &mut self,
        ticket: Ticket,
        receiver: u32,
        after: Option<u64>,
        max_bytes: usize,
        mark: u64,
    ) {
        // A page ends with a frame read from the stream; 0 reads from the start.
        let start = after.and_then(StreamSeq::of).map_or(1, |s| s.0 + 1);
        let (held, frames) = match self.read(receiver, start, max_bytes).await {
            Ok(page) => page,
            Err(e) => {
                // Read the page again shortly (JetStream may be electing a leader).
                log::warn!("id {receiver}: mailbox read failed, trying again: {e}");
                let load = Command::Load {
                    ticket,
                    receiver,
                    device: 0,
                    after,
                    max_bytes,
                    reading: crate::store::Reading::Plain,
                };
                let released = self.released(receiver);
                self.retry_later(load, mark, released);
                return;
            }
        };
        self.out.push(FromCluster::Store(Reply::Page {
            ticket,
            receiver,
            held,
            frames,
            sync: None,
        }));
    }

    /// Reads `receiver`'s frames from stream sequence `start` on, up to `max_bytes` (at
    /// least one frame) and [`READ_BATCH`] frames, leaving out the live frames this
    /// node pushed itself.
    ///
    /// Its live frames that come in the stream before the page's first frame are named
    /// apart (the broker's numbers), so that a connection that holds them back while it
    /// reads pushes them first: a frame another node stored after them (a batch nobody
    /// took in time) must not pass them. A page ends before such frames further on;
    /// the next read starts with them.
    ///
    /// Each frame is asked of the stream's leader by subject and first sequence
    /// (`STREAM.MSG.GET` with `next_by_subj`), which sees every frame JetStream has
    /// acknowledged. A consumer, as used before, reads from whichever replica it is
    /// placed on: one that lagged behind left out a frame another node had just stored
    /// (the chaos run saw a frame delivered after later ones), and one placed on a
    /// server that was down made reads time out for as long as it stayed down.
    async fn read(
        &mut self,
        receiver: u32,
        start: u64,
        max_bytes: usize,
    ) -> Result<(Vec<u64>, Vec<(u64, Bytes)>), String> {
        use jetstream::stream::RawMessageErrorKind;
        let subject = wire::mailbox(receiver);
        // Room for the largest frame, so that a page is never empty while frames wait.
        let room = max_bytes.max(self.max_frame);
        let mut held = Vec::new();
        let mut frames = Vec::new();
        let mut bytes = 0;
        let mut next = start;
        while bytes < room && frames.len() < READ_BATCH {
            let msg = match self
                .reads
                .get_first_raw_message_by_subject(&subject, next)
                .await
            {
                Ok(msg) => msg,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(e.to_string()),
            };
            next = msg.sequence + 1;
            if let Some(&seq) = self.live.get(&receiver).and_then(|l| l.get(&msg.sequence)) {
                if !frames.is_empty() {
                    // Ahead of what may follow: the next page starts with it.
                    break;
                }
                held.push(seq);
                continue;
            }
            bytes += msg.payload.len();
            frames.push((StreamSeq(msg.sequence).number(), msg.payload));
        }
        if frames.is_empty() {
            // Nothing after them: they keep their place behind what was read.
            held.clear();
        }
        Ok((held, frames))
    }

    /// This node no longer delivers to `receiver`: write what it stages for it, stop
    /// listening for it, and answer the nodes waiting to take it over.
    ///
    /// If frames for it are left in the stream undelivered, the id's holder (if it has
    /// one already) is told at once, before anything this node forwards to it next:
    /// a node that bound the id without this one's answer (it was frozen, or cut off)
    /// has read its mailbox already, and would otherwise deliver the frames sent after
    /// these before them (the chaos run found it: stored while the holder moved, then
    /// passed by the frames their sender sent once they were echoed).
    async fn release(&mut self, receiver: u32) {
        if self.retries.is_empty() {
            // No read waits to be tried again: nothing to compare with.
            self.releases.clear();
        } else {
            *self.releases.entry(receiver).or_default() += 1;
        }
        self.publish_staged(Some(receiver)).await;
        self.settle().await;
        let left_in_stream = self.live.remove(&receiver).is_some_and(|l| !l.is_empty());
        self.holds.release(&self.client, receiver).await;
        if left_in_stream {
            let subject = wire::hold(receiver, Hold::Mail);
            if let Err(e) = self.client.publish(subject, self.node.clone().into()).await {
                log::debug!("mail for id {receiver} not sent: {e}");
            }
        }
    }

    /// Every session here reads on, every [`SWEEP`].
    fn sweep(&mut self) {
        if self.log.is_some() && Instant::now() >= self.next_sweep {
            self.next_sweep = Instant::now() + SWEEP;
            self.out.push(FromCluster::Grew(Grew::All));
        }
    }

    /// Every id held here reads its mailbox: frames may have been stored for them
    /// while the mail saying so could not reach this node (mail is a core NATS
    /// message, lost across a reconnect or a cut).
    fn mail_held(&mut self) {
        let mail = self
            .holds
            .ids()
            .map(|receiver| FromCluster::Mail { receiver });
        self.out.extend(mail);
        if self.log.is_some() {
            self.out.push(FromCluster::Grew(Grew::All));
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
        let failed = staged.into_iter().filter_map(failed);
        self.out.extend(failed.map(FromCluster::Store));
        let health = Reply::Health(Some(format!("NATS unreachable: {why}")));
        self.out.push(FromCluster::Store(health));
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
        self.out.push(FromCluster::Store(Reply::Health(None)));
        if let Some(log) = &mut self.log
            && let Err(e) = log.listen().await
        {
            log::warn!("node {}: history notes not heard again: {e}", self.node);
        }
        self.mail_held();
        let held: Vec<ToCluster> = self.held.drain(..).collect();
        for cmd in held {
            Box::pin(self.on_command(cmd)).await;
        }
    }
}

/// The log's next news; never, with history off.
async fn log_next(log: &mut Option<Log>) -> Logged {
    match log {
        Some(log) => log.next().await,
        None => futures::future::pending().await,
    }
}

/// The answer to an append that cannot be stored while NATS is unreachable.
fn failed(cmd: Command) -> Option<Reply> {
    answer(cmd, Outcome::Failed(Failure::NatsUnreachable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_numbers_never_meet_the_broker_s() {
        let read = StreamSeq(5).number();
        assert_eq!(StreamSeq::of(read), Some(StreamSeq(5)));
        assert_eq!(StreamSeq::of(5), None, "a number the broker gave");
        assert_eq!(StreamSeq::of(0), None);
        assert_eq!(
            StreamSeq::of(StreamSeq(u64::MAX >> 1).number()).map(|s| s.0),
            Some(u64::MAX >> 1)
        );
    }
}
