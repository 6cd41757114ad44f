//! Frames for ids held on other nodes, forwarded to the node that holds them, and the
//! batches other nodes forward here.
//!
//! A frame for an id bound elsewhere goes straight to its holder
//! ([`Hold::Frames`], request/reply), in batches, one batch in flight per receiver:
//! that keeps them in order whichever way each batch goes. The holder routes them as
//! its own senders' frames and answers with each one's outcome. A batch nobody takes
//! (no responders, or no answer within [`FORWARD_WAIT`]) is published to the stream
//! instead, and the next batch tells the holder to read its mailbox first. The actor
//! does the publishing; this part keeps the routes and the batches in flight.

use std::collections::HashMap;
use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use async_nats::{Client, Message, StatusCode, Subject};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{FutureExt, StreamExt};

use crate::cluster::link::sleep;
use crate::cluster::wire::{self, Hold};
use crate::store::{Command, Reply, answer};

/// How long a node waits for the holder of an id to take frames forwarded to it
/// before it stores them in the stream itself (they may then arrive twice).
pub(super) const FORWARD_WAIT: Duration = Duration::from_secs(5);

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
}

impl Route {
    fn busy(&self) -> bool {
        self.forwarding.is_some() || self.storing > 0
    }
}

/// A batch in flight.
struct Batch {
    receiver: u32,
    frames: Vec<Command>,
}

/// What became of a batch this node forwarded.
pub(super) enum Settled {
    /// Not a batch in flight (answered already, or timed out).
    Nothing,
    /// The holder answered: the appends' replies, with their outcomes.
    Answered(Vec<Reply>),
    /// Nobody took it: the actor publishes these to the stream, then calls
    /// [`Forwards::storing`].
    Unclaimed { receiver: u32, frames: Vec<Command> },
}

/// What the forwarding part waits for.
pub(super) enum Due {
    /// An answer to a batch.
    Answer(Message),
    /// Batch `token` has waited [`FORWARD_WAIT`].
    Timeout(u64),
}

pub(super) struct Forwards {
    /// This node's name, sent with each batch.
    node: String,
    routes: HashMap<u32, Route>,
    /// Batches forwarded and not yet answered, by token.
    in_flight: HashMap<u64, Batch>,
    next_token: u64,
    /// Where answers to this node's batches arrive: `<inbox>.<token>`.
    inbox: String,
    answers: SelectAll<BoxStream<'static, Message>>,
    timeouts: FuturesUnordered<BoxFuture<'static, u64>>,
    /// Routes that may forward their next batch, or whose parked reads may go on.
    kicked: Vec<u32>,
    /// Batches other nodes forwarded here, waiting for the broker's outcomes, with
    /// where to answer.
    answering: HashMap<u64, Subject>,
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
            routes: HashMap::new(),
            in_flight: HashMap::new(),
            next_token: 1,
            inbox,
            answers: SelectAll::from_iter([answers]),
            timeouts: FuturesUnordered::new(),
            kicked: Vec::new(),
            answering: HashMap::new(),
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
    /// still on its way. A batch that could not be sent, or that nobody holds the
    /// receiver for (`nobody_holds`), comes back, to be stored.
    pub async fn forward(
        &mut self,
        client: &Client,
        receiver: u32,
        nobody_holds: bool,
    ) -> Option<Vec<Command>> {
        let route = self.routes.get_mut(&receiver)?;
        if route.busy() {
            return None;
        }
        if route.queue.is_empty() {
            self.routes.remove(&receiver);
            return None;
        }
        let frames = std::mem::take(&mut route.queue);
        if nobody_holds {
            return Some(frames);
        }
        let mut payload = bytes::BytesMut::new();
        for cmd in &frames {
            if let Command::Append { wire, .. } = cmd {
                payload.extend_from_slice(wire);
            }
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(wire::NODE_HEADER, self.node.as_str());
        if route.behind {
            headers.insert(wire::BEHIND_HEADER, "1");
        }
        if self.logged {
            headers.insert(wire::LOGGED_HEADER, "1");
        }
        let token = self.next_token;
        self.next_token += 1;
        route.forwarding = Some(token);
        let sent = client
            .publish_with_reply_and_headers(
                wire::hold(receiver, Hold::Frames),
                wire::answer_to(&self.inbox, token),
                headers,
                payload.freeze(),
            )
            .await;
        match sent {
            Ok(()) => {
                self.in_flight.insert(token, Batch { receiver, frames });
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
                log::debug!("id {receiver}: frames not forwarded: {e}");
                Some(frames)
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
        let Some(Batch { receiver, frames }) = batch else {
            return Settled::Nothing;
        };
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            // Nobody holds the id: the frames go to its mailbox.
            return Settled::Unclaimed { receiver, frames };
        }
        let text = String::from_utf8_lossy(&msg.payload);
        let mut lines = text.lines();
        let replies = frames
            .into_iter()
            .filter_map(|cmd| answer(cmd, wire::decode_outcome(lines.next())))
            .collect();
        if let Some(route) = self.routes.get_mut(&receiver) {
            route.forwarding = None;
            route.behind = false;
        }
        self.kicked.push(receiver);
        Settled::Answered(replies)
    }

    /// Batch `token` waited [`FORWARD_WAIT`]: if it is still in flight, nobody took it.
    pub fn timed_out(&mut self, token: u64) -> Settled {
        match self.in_flight.remove(&token) {
            Some(Batch { receiver, frames }) => {
                log::warn!(
                    "id {receiver}: its node did not answer within {FORWARD_WAIT:?}; storing {} frames in the stream (they may arrive twice)",
                    frames.len()
                );
                Settled::Unclaimed { receiver, frames }
            }
            None => Settled::Nothing,
        }
    }

    /// Another node forwarded a batch that waits on `reply`: the token the broker
    /// answers it by.
    pub fn answering(&mut self, reply: Subject) -> u64 {
        let token = self.next_answering;
        self.next_answering += 1;
        self.answering.insert(token, reply);
        token
    }

    /// Tells the node that forwarded batch `token` what became of its frames.
    pub async fn answer(
        &mut self,
        client: &Client,
        token: u64,
        outcomes: &[crate::store::Outcome],
    ) {
        let Some(reply) = self.answering.remove(&token) else {
            return;
        };
        let text = wire::encode_outcomes(outcomes);
        if let Err(e) = client.publish(reply, text.into()).await {
            log::debug!("answer not sent: {e}");
        }
    }
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
                receiver: 7,
                frames,
            },
        );
        f.routes.entry(7).or_default().forwarding = Some(token);
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
        let outcomes: Vec<_> = replies
            .into_iter()
            .map(|r| match r {
                Reply::Appended { seq, outcome, .. } => (seq, outcome),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            outcomes,
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
        let Settled::Unclaimed { receiver, frames } = f.answered(&nobody) else {
            panic!("unclaimed");
        };
        assert_eq!((receiver, frames.len()), (7, 1));
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
        assert!(matches!(f.timed_out(5), Settled::Unclaimed { .. }));
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
        assert!(matches!(f.timed_out(6), Settled::Unclaimed { .. }));
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
        assert!(matches!(f.timed_out(4), Settled::Unclaimed { .. }));
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
        assert!(matches!(f.timed_out(5), Settled::Unclaimed { .. }));
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
    fn batches_forwarded_here_are_answered_once() {
        let mut f = forwards();
        let a = f.answering("_INBOX.b.1".into());
        let b = f.answering("_INBOX.b.2".into());
        assert_ne!(a, b);
        assert_eq!(
            f.answering.remove(&a).map(|s| s.to_string()),
            Some("_INBOX.b.1".into())
        );
    }
}
