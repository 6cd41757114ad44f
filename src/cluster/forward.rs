//! Frames for ids held on other nodes, forwarded to the node that holds them, and the
//! batches other nodes forward here.
//!
//! A frame for an id bound elsewhere goes straight to its holder, in batches, one
//! batch in flight per receiver: that keeps them in order whichever way each batch
//! goes. The holder routes them as its own senders' frames and answers with each
//! one's outcome. A batch nobody takes (no responders, or no answer within
//! [`FORWARD_WAIT`]) is published to the stream instead, and the next batch tells the
//! holder to read its mailbox first. The actor does the publishing; this part keeps
//! the routes and the batches in flight.
//!
//! Where a batch goes: while this node does not know the holder, to the receiver's
//! subject ([`Hold::Frames`]), which only its holder hears. A holder's answer names the
//! subject on which it takes batches for every id it holds ([`wire::HOLDER_HEADER`]);
//! from then on, the receiver's frames travel in one batch with those of the other
//! receivers held on that node, one section each ([`wire::Section`]). Across two nodes
//! that is one request and one answer per round for all their pairs, where it was one
//! per receiver, and NATS carried most of the cluster's work. Each section still waits
//! for its own answer before the next, so the order rule is unchanged. A node that no
//! longer holds an id takes its section as any frames from another node (it sends them
//! on, or stores them) and answers it `gone`: the next batch goes to the id's subject
//! again. A node that restarted has a new subject, so a batch for its old one finds no
//! responders and is stored, as a batch for an id nobody holds.

use std::collections::HashMap;
use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use async_nats::{Client, Message, StatusCode, Subject};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{FutureExt, StreamExt};

use crate::cluster::link::sleep;
use crate::cluster::wire::{self, Hold, Section, SectionAnswer};
use crate::store::{Command, Failure, Outcome, Reply, answer};

/// How long a node waits for the holder of an id to take frames forwarded to it
/// before it stores them in the stream itself (they may then arrive twice).
pub(super) const FORWARD_WAIT: Duration = Duration::from_secs(5);

/// A batch for several receivers is cut after this many bytes (a single receiver's
/// frames go whole, as in a batch of their own): well under NATS's default
/// `max_payload` of 1 MiB, and large enough that a round between two busy nodes is
/// one batch.
const NODE_BATCH_BYTES: usize = 256 * 1024;

/// How many receivers' holders a node remembers; past it, it forgets them all and
/// learns them again from the next answers, one batch each.
const MAX_HOLDERS: usize = 65_536;

/// Frames waiting to be forwarded to the node holding their receiver.
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
    /// A frame of the batch being stored could not be stored.
    gap: bool,
    /// Waits in [`Forwards::ready`] for the next batch to its holder.
    ready: bool,
}

impl Route {
    fn busy(&self) -> bool {
        self.forwarding.is_some() || self.storing > 0
    }
}

/// A batch in flight: the frames of one receiver, or sections for several held on one
/// node.
struct Batch {
    sections: Vec<(u32, Vec<Command>)>,
    /// Sent to this node's batch subject (by its token): answered per section.
    to_node: Option<String>,
}

/// What became of a batch this node forwarded.
pub(super) enum Settled {
    /// Not a batch in flight (answered already, or timed out).
    Nothing,
    /// The holder answered: the appends' replies, with their outcomes.
    Answered(Vec<Reply>),
    /// Nobody took them: the actor publishes each receiver's frames to the stream,
    /// then calls [`Forwards::storing`].
    Unclaimed(Vec<(u32, Vec<Command>)>),
}

/// What the forwarding part waits for.
pub(super) enum Due {
    /// An answer to a batch.
    Answer(Message),
    /// Batch `token` has waited [`FORWARD_WAIT`].
    Timeout(u64),
}

/// A batch another node forwarded here, waiting for the broker's outcomes.
enum Answering {
    /// Frames for one receiver, from its subject.
    One { reply: Subject, receiver: u32 },
    /// Section `index` of a batch for several receivers.
    Part { group: u64, index: usize },
}

/// A batch for several receivers forwarded here: answered once every section is.
struct Group {
    reply: Subject,
    sections: Vec<Part>,
    /// Sections still waiting for the broker's outcomes.
    left: usize,
}

/// One section of a batch forwarded here.
struct Part {
    receiver: u32,
    /// How many frames it holds: its answer has exactly as many outcomes.
    frames: usize,
    state: PartState,
}

enum PartState {
    /// Not held here when it came: not taken ([`SectionAnswer::Gone`]).
    NotTaken,
    Waiting,
    Done(Vec<Outcome>),
}

pub(super) struct Forwards {
    /// This node's name, sent with each batch.
    node: String,
    /// This node's batch token (see [`wire::node_batches`]).
    token: String,
    routes: HashMap<u32, Route>,
    /// Routes whose holder is known, with frames for the next batch to it.
    ready: Vec<u32>,
    /// The batch token of the node that last answered as each receiver's holder. Kept
    /// while a receiver's route comes and goes, up to [`MAX_HOLDERS`].
    holders: HashMap<u32, String>,
    /// Holders with a batch of sections in flight, by how many: the frames for the
    /// receivers they hold wait for its answer and go together in the next.
    to_nodes: HashMap<String, usize>,
    /// Batches forwarded and not yet answered, by token.
    in_flight: HashMap<u64, Batch>,
    next_token: u64,
    /// Where answers to this node's batches arrive: `<inbox>.<token>`.
    inbox: String,
    answers: SelectAll<BoxStream<'static, Message>>,
    timeouts: FuturesUnordered<BoxFuture<'static, u64>>,
    /// Routes that may forward their next batch, or whose parked reads may go on.
    kicked: Vec<u32>,
    /// Batches other nodes forwarded here, waiting for the broker's outcomes.
    answering: HashMap<u64, Answering>,
    groups: HashMap<u64, Group>,
    next_answering: u64,
    /// This node writes the frames it accepts to their logs: its batches say so.
    logged: bool,
}

impl Forwards {
    /// `answers`: the subscription to [`wire::answers`] of `inbox`.
    pub fn new(
        node: String,
        inbox: String,
        answers: BoxStream<'static, Message>,
        logged: bool,
    ) -> Forwards {
        Forwards {
            node,
            token: wire::batch_token(&inbox).to_string(),
            routes: HashMap::new(),
            ready: Vec::new(),
            holders: HashMap::new(),
            to_nodes: HashMap::new(),
            in_flight: HashMap::new(),
            next_token: 1,
            inbox,
            answers: SelectAll::from_iter([answers]),
            timeouts: FuturesUnordered::new(),
            kicked: Vec::new(),
            answering: HashMap::new(),
            groups: HashMap::new(),
            next_answering: 1,
            logged,
        }
    }

    /// Queues an append for `receiver`, held on another node (or on none).
    pub fn queue(&mut self, receiver: u32, append: Command) {
        self.routes.entry(receiver).or_default().queue.push(append);
    }

    /// A batch for `receiver` is in flight, or being stored.
    pub fn busy(&self, receiver: u32) -> bool {
        self.routes.get(&receiver).is_some_and(Route::busy)
    }

    /// Frames for `receiver` are still on their way (in flight, being stored, or
    /// queued): a later frame for it must go behind them.
    pub fn pending(&self, receiver: u32) -> bool {
        self.routes
            .get(&receiver)
            .is_some_and(|r| r.busy() || !r.queue.is_empty())
    }

    /// Takes the queued append of frame `seq` for `receiver` out of its queue: it was
    /// delivered before it was sent on.
    pub fn unqueue(&mut self, receiver: u32, seq: u64) -> Option<Command> {
        let route = self.routes.get_mut(&receiver)?;
        let i = route
            .queue
            .iter()
            .position(|c| matches!(c, Command::Append { seq: s, .. } if *s == seq))?;
        Some(route.queue.remove(i))
    }

    /// This node is to hold `receiver` now: what it still had queued for another
    /// holder, to publish in order.
    pub fn take_queue(&mut self, receiver: u32) -> Vec<Command> {
        self.holders.remove(&receiver);
        self.routes
            .remove(&receiver)
            .map(|r| r.queue)
            .unwrap_or_default()
    }

    /// Routes to look at again: they may forward, or reads parked on them may go on.
    pub fn kicked(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.kicked)
    }

    /// Sends `receiver`'s queued frames to the node that holds it, unless a batch is
    /// still on its way; where the holder is known, they wait for
    /// [`Forwards::send_ready`], to go with other receivers' frames. A batch that could
    /// not be sent, or that should not be forwarded now (`store_instead`: this node
    /// has just let the receiver go), comes back, to be stored.
    pub async fn forward(
        &mut self,
        client: &Client,
        receiver: u32,
        store_instead: bool,
    ) -> Option<Vec<Command>> {
        let route = self.routes.get_mut(&receiver)?;
        if route.busy() {
            return None;
        }
        if route.queue.is_empty() {
            self.routes.remove(&receiver);
            return None;
        }
        if store_instead {
            self.holders.remove(&receiver);
            return Some(std::mem::take(&mut route.queue));
        }
        if self.holders.contains_key(&receiver) {
            if !std::mem::replace(&mut route.ready, true) {
                self.ready.push(receiver);
            }
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        route.forwarding = Some(token);
        let behind = route.behind;
        let frames = std::mem::take(&mut route.queue);
        let mut payload = BytesMut::new();
        for cmd in &frames {
            if let Command::Append { wire, .. } = cmd {
                payload.extend_from_slice(wire);
            }
        }
        let mut headers = self.headers();
        if behind {
            headers.insert(wire::BEHIND_HEADER, "1");
        }
        let subject = wire::hold(receiver, Hold::Frames);
        let batch = Batch {
            sections: vec![(receiver, frames)],
            to_node: None,
        };
        self.send(client, subject, token, headers, payload.freeze(), batch)
            .await
            .and_then(|mut back| back.pop().map(|(_, frames)| frames))
    }

    /// Sends the frames of the routes [`Forwards::forward`] left ready, one batch per
    /// holder (cut at [`NODE_BATCH_BYTES`]) once its batch in flight, if any, is
    /// answered: then one round carries what every receiver on the node gathered
    /// meanwhile, where batches of a few receivers each would stay apart. What could
    /// not be sent comes back, per receiver, to be stored; so do the routes whose
    /// holder was forgotten meanwhile, to be forwarded to their ids' subjects.
    pub async fn send_ready(&mut self, client: &Client) -> (Vec<(u32, Vec<Command>)>, Vec<u32>) {
        let mut by_node: HashMap<String, Vec<(u32, Vec<Command>)>> = HashMap::new();
        let mut waiting = Vec::new();
        let mut unknown = Vec::new();
        for receiver in std::mem::take(&mut self.ready) {
            let Some(route) = self.routes.get_mut(&receiver) else {
                continue;
            };
            if route.busy() || route.queue.is_empty() {
                route.ready = false;
                continue;
            }
            let Some(holder) = self.holders.get(&receiver).cloned() else {
                // Forgotten since (past MAX_HOLDERS, or its node went): to its subject.
                route.ready = false;
                unknown.push(receiver);
                continue;
            };
            if self.to_nodes.contains_key(&holder) {
                waiting.push(receiver);
                continue;
            }
            route.ready = false;
            let frames = std::mem::take(&mut route.queue);
            by_node.entry(holder).or_default().push((receiver, frames));
        }
        let mut back = Vec::new();
        for (holder, sections) in by_node {
            let mut cut: Vec<(u32, Vec<Command>)> = Vec::new();
            let mut payload = BytesMut::new();
            for (receiver, frames) in sections {
                let wires: Vec<Bytes> = frames
                    .iter()
                    .filter_map(|cmd| match cmd {
                        Command::Append { wire, .. } => Some(wire.clone()),
                        _ => None,
                    })
                    .collect();
                let len = Section::encoded_len(wires.iter().map(Bytes::len).sum());
                if !cut.is_empty() && payload.len() + len > NODE_BATCH_BYTES {
                    let sent = std::mem::take(&mut cut);
                    let full = std::mem::take(&mut payload).freeze();
                    back.extend(self.send_node(client, &holder, full, sent).await);
                }
                let behind = self.routes.get(&receiver).is_some_and(|r| r.behind);
                Section::encode(receiver, behind, &wires, &mut payload);
                cut.push((receiver, frames));
            }
            if !cut.is_empty() {
                back.extend(self.send_node(client, &holder, payload.freeze(), cut).await);
            }
        }
        self.ready.extend(waiting);
        (back, unknown)
    }

    /// Sends `sections` to `holder`'s batch subject.
    async fn send_node(
        &mut self,
        client: &Client,
        holder: &str,
        payload: Bytes,
        sections: Vec<(u32, Vec<Command>)>,
    ) -> Vec<(u32, Vec<Command>)> {
        let token = self.next_token;
        self.next_token += 1;
        for (receiver, _) in &sections {
            if let Some(route) = self.routes.get_mut(receiver) {
                route.forwarding = Some(token);
            }
        }
        *self.to_nodes.entry(holder.to_string()).or_default() += 1;
        let batch = Batch {
            sections,
            to_node: Some(holder.to_string()),
        };
        let headers = self.headers();
        let subject = wire::node_batches(holder);
        self.send(client, subject, token, headers, payload, batch)
            .await
            .unwrap_or_default()
    }

    /// The headers every batch carries.
    fn headers(&self) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(wire::NODE_HEADER, self.node.as_str());
        if self.logged {
            headers.insert(wire::LOGGED_HEADER, "1");
        }
        headers
    }

    /// Publishes `batch` as `token`, to be answered on this node's inbox; if it could
    /// not be sent, its routes are free again and its frames come back.
    async fn send(
        &mut self,
        client: &Client,
        subject: String,
        token: u64,
        headers: async_nats::HeaderMap,
        payload: Bytes,
        batch: Batch,
    ) -> Option<Vec<(u32, Vec<Command>)>> {
        let reply = wire::answer_to(&self.inbox, token);
        let sent = client
            .publish_with_reply_and_headers(subject, reply, headers, payload)
            .await;
        match sent {
            Ok(()) => {
                self.in_flight.insert(token, batch);
                self.timeouts.push(
                    async move {
                        sleep(FORWARD_WAIT).await;
                        token
                    }
                    .boxed(),
                );
                None
            }
            Err(e) => {
                if let Some(holder) = &batch.to_node {
                    self.node_answered(holder);
                }
                for (receiver, _) in &batch.sections {
                    log::debug!("id {receiver}: frames not forwarded: {e}");
                    if let Some(route) = self.routes.get_mut(receiver) {
                        route.forwarding = None;
                    }
                    self.holders.remove(receiver);
                }
                Some(batch.sections)
            }
        }
    }

    /// `queued` frames of a batch nobody took are being published to the stream: the
    /// next batch for `receiver` waits for them and tells the holder to read first.
    /// `gap`: some of the batch could not even be published; if none of it is in
    /// flight, the frames queued behind it come back at once, to be refused (see
    /// [`Forwards::stored_one`]).
    pub fn storing(&mut self, receiver: u32, queued: usize, gap: bool) -> Vec<Command> {
        self.kicked.push(receiver);
        let Some(route) = self.routes.get_mut(&receiver) else {
            return Vec::new();
        };
        route.forwarding = None;
        route.storing += queued;
        route.behind = true;
        route.gap |= gap;
        if route.storing == 0 && std::mem::take(&mut route.gap) {
            std::mem::take(&mut route.queue)
        } else {
            Vec::new()
        }
    }

    /// One frame of an unclaimed batch for `receiver` reached the stream, or (not
    /// `stored`) could not be stored. Once the batch is done, if one of its frames
    /// could not be stored, the frames queued behind it come back to be refused: stored
    /// after the gap, a frame of the same sender would reach the receiver before the
    /// frame it follows, which its sender sends again.
    pub fn stored_one(&mut self, receiver: u32, stored: bool) -> Vec<Command> {
        let Some(route) = self.routes.get_mut(&receiver) else {
            return Vec::new();
        };
        if route.storing == 0 {
            return Vec::new();
        }
        route.storing -= 1;
        route.gap |= !stored;
        if route.storing > 0 {
            return Vec::new();
        }
        self.kicked.push(receiver);
        if std::mem::take(&mut route.gap) {
            std::mem::take(&mut route.queue)
        } else {
            Vec::new()
        }
    }

    /// The next answer to a batch, or a batch that waited too long. Answers first: an
    /// answer that is in when its batch's time is also up settles the batch (stored by
    /// its holder, not published again).
    pub fn next(&mut self) -> impl Future<Output = Due> + '_ {
        poll_fn(move |cx| {
            if let Poll::Ready(Some(msg)) = self.answers.poll_next_unpin(cx) {
                return Poll::Ready(Due::Answer(msg));
            }
            match self.timeouts.poll_next_unpin(cx) {
                Poll::Ready(Some(token)) => Poll::Ready(Due::Timeout(token)),
                _ => Poll::Pending,
            }
        })
    }

    /// What an answer on this node's inbox says of its batch.
    pub fn answered(&mut self, msg: &Message) -> Settled {
        let batch = wire::answered(&msg.subject).and_then(|t| self.in_flight.remove(&t));
        let Some(Batch { sections, to_node }) = batch else {
            return Settled::Nothing;
        };
        if let Some(holder) = &to_node {
            self.node_answered(holder);
        }
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            // Nobody holds the id, or the node is gone: the frames go to the mailbox.
            self.forget_holders(&sections, to_node.as_deref());
            return Settled::Unclaimed(sections);
        }
        let text = String::from_utf8_lossy(&msg.payload);
        let answers = if to_node.is_some() {
            let counts: Vec<usize> = sections.iter().map(|(_, f)| f.len()).collect();
            SectionAnswer::decode_all(&text, &counts)
        } else {
            let holder = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(wire::HOLDER_HEADER))
                .map(|v| v.as_str().to_string());
            let n = sections.first().map_or(0, |(_, f)| f.len());
            let mut lines = text.lines();
            let outcomes = (0..n).map(|_| wire::decode_outcome(lines.next())).collect();
            // Never this node's own token: a batch it heard on a subscription still
            // draining is left to the holder, not answered.
            match holder.filter(|h| *h != self.token) {
                Some(holder) => {
                    if let Some(&(receiver, _)) = sections.first() {
                        if self.holders.len() >= MAX_HOLDERS {
                            self.holders.clear();
                        }
                        self.holders.insert(receiver, holder);
                    }
                    vec![SectionAnswer::Held(outcomes)]
                }
                None => vec![SectionAnswer::Left(outcomes)],
            }
        };
        let mut replies = Vec::new();
        for ((receiver, frames), answered) in sections.into_iter().zip(answers) {
            let route = self.routes.entry(receiver).or_default();
            route.forwarding = None;
            self.kicked.push(receiver);
            let outcomes = match answered {
                SectionAnswer::Held(outcomes) => outcomes,
                SectionAnswer::Left(outcomes) => {
                    self.holders.remove(&receiver);
                    outcomes
                }
                SectionAnswer::Gone => {
                    // Not taken: first in line again, for the id's own subject.
                    route.queue.splice(0..0, frames);
                    self.holders.remove(&receiver);
                    continue;
                }
            };
            route.behind = false;
            replies.extend(
                frames
                    .into_iter()
                    .zip(outcomes)
                    .filter_map(|(cmd, outcome)| answer(cmd, outcome)),
            );
        }
        Settled::Answered(replies)
    }

    /// Batch `token` waited [`FORWARD_WAIT`]: if it is still in flight, nobody took it.
    pub fn timed_out(&mut self, token: u64) -> Settled {
        let Some(Batch { sections, to_node }) = self.in_flight.remove(&token) else {
            return Settled::Nothing;
        };
        if let Some(holder) = &to_node {
            self.node_answered(holder);
        }
        for (receiver, frames) in &sections {
            log::warn!(
                "id {receiver}: its node did not answer within {FORWARD_WAIT:?}; storing {} frames in the stream (they may arrive twice)",
                frames.len()
            );
        }
        self.forget_holders(&sections, to_node.as_deref());
        Settled::Unclaimed(sections)
    }

    /// A batch to `holder`'s subject is settled: the routes waiting for it may go.
    fn node_answered(&mut self, holder: &str) {
        if let Some(n) = self.to_nodes.get_mut(holder) {
            *n -= 1;
            if *n == 0 {
                self.to_nodes.remove(holder);
            }
        }
    }

    /// The node these receivers' frames went to did not take them: the next batch goes
    /// to each receiver's subject; so does the next for every receiver learnt to be
    /// held on that node (`to_node`), which is gone or hangs.
    fn forget_holders(&mut self, sections: &[(u32, Vec<Command>)], to_node: Option<&str>) {
        for (receiver, _) in sections {
            self.holders.remove(receiver);
        }
        if let Some(token) = to_node {
            self.holders.retain(|_, holder| holder != token);
        }
    }

    /// Another node forwarded a batch for `receiver` that waits on `reply`: the token
    /// the broker answers it by.
    pub fn answering(&mut self, reply: Subject, receiver: u32) -> u64 {
        let token = self.next_answering;
        self.next_answering += 1;
        self.answering
            .insert(token, Answering::One { reply, receiver });
        token
    }

    /// Another node forwarded a batch of sections that waits on `reply`: per section,
    /// its receiver, its number of frames and whether this node holds the receiver and
    /// takes them. The tokens the broker answers the taken ones by; when none is
    /// taken, the answer goes at once.
    pub async fn take_sections(
        &mut self,
        client: &Client,
        reply: Subject,
        sections: &[(u32, usize, bool)],
    ) -> Vec<Option<u64>> {
        let (tokens, now) = self.sections_taken(reply, sections);
        if let Some((reply, text)) = now
            && let Err(e) = client.publish(reply, text.into()).await
        {
            log::debug!("answer not sent: {e}");
        }
        tokens
    }

    /// [`Forwards::take_sections`] without the publishing: the tokens, and the answer
    /// to send at once when no section is taken.
    fn sections_taken(
        &mut self,
        reply: Subject,
        sections: &[(u32, usize, bool)],
    ) -> (Vec<Option<u64>>, Option<(Subject, String)>) {
        let group = self.next_answering;
        self.next_answering += 1;
        let mut parts = Vec::with_capacity(sections.len());
        let mut tokens = Vec::with_capacity(sections.len());
        for (index, &(receiver, frames, taken)) in sections.iter().enumerate() {
            let token = taken.then(|| {
                let token = self.next_answering;
                self.next_answering += 1;
                self.answering
                    .insert(token, Answering::Part { group, index });
                token
            });
            tokens.push(token);
            let state = match taken {
                true => PartState::Waiting,
                false => PartState::NotTaken,
            };
            parts.push(Part {
                receiver,
                frames,
                state,
            });
        }
        let left = tokens.iter().flatten().count();
        if left > 0 {
            let g = Group {
                reply,
                sections: parts,
                left,
            };
            self.groups.insert(group, g);
            return (tokens, None);
        }
        let text = SectionAnswer::encode_all(&answers_of(parts, |_| false));
        (tokens, Some((reply, text)))
    }

    /// Tells the node that forwarded batch `token` what became of its frames, and
    /// whether this node (`holds`) still holds their receiver. A section's answer waits
    /// for the rest of its batch.
    pub async fn answer(
        &mut self,
        client: &Client,
        token: u64,
        outcomes: &[Outcome],
        holds: impl Fn(u32) -> bool,
    ) {
        let Some((reply, headers, text)) = self.answer_of(token, outcomes, holds) else {
            return;
        };
        let sent = client
            .publish_with_headers(reply, headers, text.into())
            .await;
        if let Err(e) = sent {
            log::debug!("answer not sent: {e}");
        }
    }

    /// The answer [`Forwards::answer`] sends, once there is one to send.
    fn answer_of(
        &mut self,
        token: u64,
        outcomes: &[Outcome],
        holds: impl Fn(u32) -> bool,
    ) -> Option<(Subject, async_nats::HeaderMap, String)> {
        let mut headers = async_nats::HeaderMap::new();
        match self.answering.remove(&token)? {
            Answering::One { reply, receiver } => {
                if holds(receiver) {
                    headers.insert(wire::HOLDER_HEADER, self.token.as_str());
                }
                Some((reply, headers, wire::encode_outcomes(outcomes)))
            }
            Answering::Part { group, index } => {
                let g = self.groups.get_mut(&group)?;
                let part = g.sections.get_mut(index)?;
                if matches!(part.state, PartState::Waiting) {
                    // Exactly one outcome per frame, whatever the broker gave: a
                    // short answer must not shift the sections after it.
                    let mut outcomes = outcomes.to_vec();
                    outcomes.resize(part.frames, Outcome::Failed(Failure::NoAnswer));
                    part.state = PartState::Done(outcomes);
                    g.left -= 1;
                }
                if g.left > 0 {
                    return None;
                }
                let g = self.groups.remove(&group)?;
                let text = SectionAnswer::encode_all(&answers_of(g.sections, holds));
                Some((g.reply, headers, text))
            }
        }
    }
}

/// The answers to a batch's sections once each is done.
fn answers_of(sections: Vec<Part>, holds: impl Fn(u32) -> bool) -> Vec<SectionAnswer> {
    sections
        .into_iter()
        .map(|part| match part.state {
            PartState::NotTaken => SectionAnswer::Gone,
            PartState::Done(outcomes) if holds(part.receiver) => SectionAnswer::Held(outcomes),
            PartState::Done(outcomes) => SectionAnswer::Left(outcomes),
            PartState::Waiting => {
                SectionAnswer::Left(vec![Outcome::Failed(Failure::NoAnswer); part.frames])
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Ticket;
    use crate::store::Outcome;
    use bytes::Bytes;

    fn append(seq: u64) -> Command {
        Command::Append {
            ticket: Ticket::Conn(1),
            receiver: 7,
            seq,
            wire: Bytes::from_static(b"frame"),
            live: false,
            time: 0,
            fanout: None,
        }
    }

    fn forwards() -> Forwards {
        Forwards::new(
            "a".into(),
            "_INBOX.a".into(),
            futures::stream::empty().boxed(),
            false,
        )
    }

    fn answer_msg(token: u64, payload: &'static [u8], status: Option<StatusCode>) -> Message {
        Message {
            subject: wire::answer_to("_INBOX.a", token).into(),
            reply: None,
            payload: Bytes::from_static(payload),
            headers: None,
            status,
            description: None,
            length: 0,
        }
    }

    fn in_flight(f: &mut Forwards, token: u64, seqs: &[u64]) {
        let frames = seqs.iter().map(|&s| append(s)).collect();
        f.in_flight.insert(
            token,
            Batch {
                sections: vec![(7, frames)],
                to_node: None,
            },
        );
        f.routes.entry(7).or_default().forwarding = Some(token);
    }

    fn seqs(replies: Vec<Reply>) -> Vec<(u64, Outcome)> {
        replies
            .into_iter()
            .map(|r| match r {
                Reply::Appended { seq, outcome, .. } => (seq, outcome),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_answer_gives_each_frame_its_outcome_and_frees_the_route() {
        let mut f = forwards();
        in_flight(&mut f, 3, &[10, 11]);
        f.queue(7, append(12));
        assert!(f.busy(7));
        let Settled::Answered(replies) =
            f.answered(&answer_msg(3, b"stored\nfull at the limit\n", None))
        else {
            panic!("answered");
        };
        assert_eq!(
            seqs(replies),
            [
                (10, Outcome::Stored),
                (11, Outcome::Full("at the limit".into()))
            ]
        );
        assert!(!f.busy(7), "the next batch may go");
        assert_eq!(f.kicked(), [7]);
        assert!(matches!(
            f.answered(&answer_msg(3, b"stored\n", None)),
            Settled::Nothing
        ));
        assert_eq!(
            f.take_queue(7).len(),
            1,
            "the queued frame waits for the next batch"
        );
    }

    #[test]
    fn a_batch_nobody_takes_is_stored_and_the_next_waits_for_it() {
        let mut f = forwards();
        in_flight(&mut f, 4, &[10]);
        let nobody = answer_msg(4, b"", Some(StatusCode::NO_RESPONDERS));
        let Settled::Unclaimed(sections) = f.answered(&nobody) else {
            panic!("unclaimed");
        };
        assert_eq!(sections.len(), 1);
        assert_eq!((sections[0].0, sections[0].1.len()), (7, 1));
        assert!(f.storing(7, 2, false).is_empty());
        assert!(f.busy(7), "storing");
        assert!(f.stored_one(7, true).is_empty());
        assert!(f.busy(7));
        assert_eq!(f.kicked(), [7]);
        f.queue(7, append(12));
        assert!(f.stored_one(7, true).is_empty(), "nothing to refuse");
        assert!(!f.busy(7));
        assert_eq!(f.kicked(), [7], "stored: the route may go on");
        assert!(
            f.routes.get(&7).is_some_and(|r| r.behind),
            "the holder reads first"
        );
        in_flight(&mut f, 5, &[11]);
        assert!(matches!(f.timed_out(5), Settled::Unclaimed(_)));
        assert!(matches!(f.timed_out(5), Settled::Nothing));
    }

    #[test]
    fn frames_are_pending_until_the_route_is_free_and_empty_and_a_delivered_one_leaves_the_queue() {
        let mut f = forwards();
        assert!(!f.pending(7), "no route");
        f.queue(7, append(10));
        assert!(f.pending(7) && !f.busy(7), "queued, not yet sent");
        in_flight(&mut f, 6, &[9]);
        f.queue(7, append(11));
        assert!(f.pending(7));
        assert!(
            f.unqueue(7, 10).is_some(),
            "a delivered frame leaves the queue"
        );
        assert!(f.unqueue(7, 10).is_none(), "once");
        assert!(f.unqueue(8, 11).is_none(), "another receiver's route");
        assert!(matches!(f.timed_out(6), Settled::Unclaimed(_)));
        assert!(f.storing(7, 0, false).is_empty());
        let queued: Vec<u64> = f
            .take_queue(7)
            .iter()
            .filter_map(|c| match c {
                Command::Append { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(queued, [11]);
        assert!(!f.pending(7), "taken");
    }

    #[test]
    fn a_frame_that_could_not_be_stored_turns_back_the_frames_queued_behind_it() {
        let mut f = forwards();
        in_flight(&mut f, 4, &[10, 11]);
        assert!(matches!(f.timed_out(4), Settled::Unclaimed(_)));
        assert!(f.storing(7, 2, false).is_empty());
        f.queue(7, append(12));
        assert!(f.stored_one(7, false).is_empty(), "the batch is not done");
        f.queue(7, append(13));
        let back: Vec<u64> = f
            .stored_one(7, true)
            .iter()
            .filter_map(|c| match c {
                Command::Append { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(back, [12, 13], "both queued behind the gap");
        in_flight(&mut f, 5, &[15]);
        assert!(matches!(f.timed_out(5), Settled::Unclaimed(_)));
        f.queue(7, append(16));
        assert_eq!(
            f.storing(7, 0, true).len(),
            1,
            "nothing of the batch in flight: what is queued comes back at once"
        );
        assert!(!f.pending(7));
        f.queue(7, append(14));
        assert!(f.pending(7), "a frame after them goes on");
    }

    #[test]
    fn batches_forwarded_here_are_answered_once_and_name_this_holder_while_it_holds() {
        let mut f = forwards();
        let a = f.answering("_INBOX.b.1".into(), 7);
        let b = f.answering("_INBOX.b.2".into(), 8);
        assert_ne!(a, b);
        let (reply, headers, text) = f
            .answer_of(a, &[Outcome::Stored], |r| r == 7)
            .expect("answered");
        assert_eq!((reply.as_str(), text.as_str()), ("_INBOX.b.1", "stored\n"));
        assert_eq!(
            headers.get(wire::HOLDER_HEADER).map(|v| v.as_str()),
            Some("a"),
            "this node's batch token"
        );
        assert!(
            f.answer_of(a, &[Outcome::Stored], |_| true).is_none(),
            "once"
        );
        let (_, headers, _) = f.answer_of(b, &[], |r| r == 7).expect("answered");
        assert!(
            headers.get(wire::HOLDER_HEADER).is_none(),
            "not held here: no holder named"
        );
    }

    #[test]
    fn a_batch_of_sections_is_answered_once_every_taken_section_is_with_one_outcome_per_frame() {
        let mut f = forwards();
        let (tokens, now) = f.sections_taken(
            "_INBOX.b.9".into(),
            &[(7, 2, true), (6, 4, false), (8, 1, true)],
        );
        assert!(now.is_none(), "two sections taken: their outcomes first");
        let (Some(first), None, Some(third)) = (tokens[0], tokens[1], tokens[2]) else {
            panic!("tokens for the taken sections only: {tokens:?}");
        };
        assert!(
            f.answer_of(third, &[Outcome::Stored], |_| true).is_none(),
            "waits for the first section"
        );
        // The broker answered the first section short (one outcome for two frames).
        let (reply, _, text) = f
            .answer_of(first, &[Outcome::Full("at the limit".into())], |r| r == 8)
            .expect("every taken section answered");
        assert_eq!(reply.as_str(), "_INBOX.b.9");
        let missing = encode_outcomes_of(&[Outcome::Failed(Failure::NoAnswer)]);
        assert_eq!(
            text,
            format!("left\nfull at the limit\n{missing}gone\nheld\nstored\n"),
            "7 let go meanwhile; 6 not taken; 8 held"
        );
        let counts = [2, 4, 1];
        let read = SectionAnswer::decode_all(&text, &counts);
        assert!(matches!(read[2], SectionAnswer::Held(ref o) if o == &[Outcome::Stored]));
        assert!(f.groups.is_empty() && f.answering.is_empty());
        let (tokens, now) = f.sections_taken("_INBOX.b.10".into(), &[(6, 1, false)]);
        assert_eq!(tokens, [None]);
        assert_eq!(
            now.map(|(r, t)| (r.to_string(), t)),
            Some(("_INBOX.b.10".to_string(), "gone\n".to_string())),
            "nothing taken: answered at once"
        );
        assert!(f.groups.is_empty());
    }

    fn encode_outcomes_of(outcomes: &[Outcome]) -> String {
        wire::encode_outcomes(outcomes)
    }

    #[test]
    fn a_holder_learned_from_an_answer_takes_the_next_frames_with_others_until_it_says_gone() {
        let mut f = forwards();
        in_flight(&mut f, 3, &[10]);
        let mut named = answer_msg(3, b"stored\n", None);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(wire::HOLDER_HEADER, "b");
        named.headers = Some(headers);
        assert!(matches!(f.answered(&named), Settled::Answered(_)));
        assert_eq!(f.holders.get(&7).map(String::as_str), Some("b"));

        // This node's own token is never learned.
        in_flight(&mut f, 4, &[11]);
        let mut own = answer_msg(4, b"stored\n", None);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(wire::HOLDER_HEADER, "a");
        own.headers = Some(headers);
        f.answered(&own);
        assert_eq!(f.holders.get(&7), None);

        // Three receivers held on b, in one batch: 7's section not taken (gone), 8's
        // held, 9's taken as b let 9 go (left).
        for receiver in [7, 8, 9] {
            f.holders.insert(receiver, "b".into());
            let route = f.routes.entry(receiver).or_default();
            route.forwarding = Some(5);
            route.behind = true;
        }
        f.in_flight.insert(
            5,
            Batch {
                sections: vec![
                    (7, vec![append(20), append(21)]),
                    (8, vec![append(30)]),
                    (9, vec![append(40)]),
                ],
                to_node: Some("b".into()),
            },
        );
        f.queue(7, append(22));
        f.kicked();
        let Settled::Answered(replies) = f.answered(&answer_msg(
            5,
            b"gone\nheld\nfailed no room\nleft\nstored\n",
            None,
        )) else {
            panic!("answered");
        };
        let got = seqs(replies);
        assert_eq!(got.len(), 2, "no outcome for frames not taken: {got:?}");
        assert_eq!((got[0].0, got[1].0), (30, 40));
        assert!(matches!(got[0].1, Outcome::Failed(_)));
        assert_eq!(got[1].1, Outcome::Stored);
        let queued: Vec<u64> = f.routes[&7]
            .queue
            .iter()
            .filter_map(|c| match c {
                Command::Append { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(queued, [20, 21, 22], "not taken: first in line again");
        assert!(f.routes[&7].behind, "the mailbox still comes first for 7");
        assert_eq!(f.holders.get(&7), None, "gone: back to the id's subject");
        assert_eq!(f.holders.get(&8).map(String::as_str), Some("b"));
        assert_eq!(f.holders.get(&9), None, "left: back to the id's subject");
        assert!(!f.busy(7) && !f.busy(8) && !f.busy(9));
        assert!(!f.routes[&8].behind && !f.routes[&9].behind);
        assert_eq!(f.kicked(), [7, 8, 9]);

        // b stops answering (it restarted): what went is stored, and every receiver
        // learnt to be held there goes to its own subject next.
        f.holders.insert(10, "b".into());
        f.holders.insert(11, "c".into());
        if let Some(route) = f.routes.get_mut(&8) {
            route.forwarding = Some(6);
        }
        f.in_flight.insert(
            6,
            Batch {
                sections: vec![(8, vec![append(31)])],
                to_node: Some("b".into()),
            },
        );
        let nobody = answer_msg(6, b"", Some(StatusCode::NO_RESPONDERS));
        assert!(matches!(f.answered(&nobody), Settled::Unclaimed(s) if s.len() == 1));
        assert_eq!(f.holders.get(&8), None);
        assert_eq!(f.holders.get(&10), None, "held on b too");
        assert_eq!(f.holders.get(&11).map(String::as_str), Some("c"));
    }
}
