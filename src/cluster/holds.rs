//! Which ids this node holds, and what it hears for them.
//!
//! A node that binds an id *holds* it: it subscribes to the id's holder subjects
//! ([`wire::holds`]). Before that it asks the current holder to let go
//! ([`Hold::Take`], request/reply); the holder closes its connection (`replaced`),
//! writes what it still stages for the id, and answers once the broker has released
//! the id. "No responders" means nobody held it. Once it holds the id, the node hears
//! the mail other nodes send when they store frames for it, and the frames they
//! forward to it.
//!
//! A claim runs beside the actor, not in its way: the holder's answer may take up to
//! [`CLAIM_WAIT`], and a node that waited for it in line would answer nothing else
//! meanwhile, its own take requests from other nodes included. Two nodes claiming
//! each from the other then each waited out the other's limit, again and again (the
//! chaos run found it). [`Heard::Claimed`] says when a claim is done.

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_nats::{Client, Message, Subject, Subscriber};
use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{FutureExt, StreamExt};

use crate::cluster::link::{sleep, within};
use crate::cluster::wire::{self, Hold};

/// How long a node waits for the holder of an id to let it go before binding anyway.
pub(super) const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// Mail published while a new holder's interest was still on its way across the
/// cluster could miss it: the holder looks once more after this long.
const RECHECK: Duration = Duration::from_millis(500);
/// A bounded flush: while the link is down a flush would wait for its return.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// How long after letting an id go (by itself or to a new holder) a node stores frames
/// for it at once rather than forwarding them (see [`Holds::just_let_go`]): longer than
/// its subscription takes to drain.
const LET_GO_FOR: Duration = Duration::from_secs(2);

/// What a holder heard, or its own reminder.
#[derive(Debug)]
pub(super) enum Heard {
    /// Another node forwarded these frames for `receiver` and waits on `reply` for
    /// their outcomes; `behind`: the mailbox holds earlier frames of their senders.
    Frames {
        receiver: u32,
        frames: Vec<Bytes>,
        behind: bool,
        /// The forwarding node wrote them to their logs.
        logged: bool,
        reply: Subject,
    },
    /// Another node forwarded frames for several receivers it believes are held here,
    /// one section each, and waits on `reply` for their outcomes, section by section.
    Batch {
        sections: Vec<wire::Section>,
        logged: bool,
        reply: Subject,
    },
    /// Frames for `receiver` were stored: read them (also [`RECHECK`]'s reminder).
    Mail { receiver: u32 },
    /// Another node binds `receiver`; it is answered once the id is released here.
    Take { receiver: u32 },
    /// This node's claim of `receiver` is done: it holds the id now (or could not
    /// subscribe, which was logged, and goes on without).
    Claimed { receiver: u32 },
}

pub(super) struct Holds {
    /// This node's name: what it says itself is not heard.
    node: String,
    /// Ids held here; dropping the sender ends the id's subscription.
    held: HashMap<u32, oneshot::Sender<()>>,
    heard: SelectAll<BoxStream<'static, (u32, Message)>>,
    /// This node's batch subject ([`wire::node_batches`]).
    batches: BoxStream<'static, Message>,
    /// Nodes waiting for this one to let an id go, by their reply subjects.
    takeovers: HashMap<u32, Vec<Subject>>,
    /// Ids to look at once more after they were claimed (see [`RECHECK`]).
    rechecks: FuturesUnordered<BoxFuture<'static, u32>>,
    /// Claims in flight: the take request, then the subscription.
    claims: FuturesUnordered<BoxFuture<'static, (u32, Option<Subscriber>)>>,
    claiming: HashSet<u32>,
    /// Ids this node let go of, and when (see [`Holds::just_let_go`]).
    let_go: HashMap<u32, Instant>,
}

impl Holds {
    /// `batches`: the subscription to this node's batch subject.
    pub fn new(node: String, batches: BoxStream<'static, Message>) -> Holds {
        Holds {
            node,
            held: HashMap::new(),
            heard: SelectAll::new(),
            batches,
            takeovers: HashMap::new(),
            rechecks: FuturesUnordered::new(),
            claims: FuturesUnordered::new(),
            claiming: HashSet::new(),
            let_go: HashMap::new(),
        }
    }

    pub fn holds(&self, receiver: u32) -> bool {
        self.held.contains_key(&receiver)
    }

    /// Every id held here.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.held.keys().copied()
    }

    /// Starts making this node the holder of `receiver`: asks the current holder to
    /// let go, then subscribes to the id's subjects; [`Heard::Claimed`] follows. False
    /// if the id is held here already, or being claimed.
    pub fn claim(&mut self, client: &Client, receiver: u32) -> bool {
        if self.holds(receiver) || !self.claiming.insert(receiver) {
            return false;
        }
        self.let_go.remove(&receiver);
        let client = client.clone();
        let node = Bytes::from(self.node.clone());
        self.claims.push(
            async move {
                let request = async_nats::Request::new()
                    .payload(node)
                    .timeout(Some(CLAIM_WAIT));
                match client
                    .send_request(wire::hold(receiver, Hold::Take), request)
                    .await
                {
                    Ok(_) => log::debug!("id {receiver}: released by its previous node"),
                    Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                    Err(e) => log::warn!(
                        "id {receiver}: the node holding it did not let go ({e}); binding anyway"
                    ),
                }
                let subscriber = match client.subscribe(wire::holds(receiver)).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        log::warn!("id {receiver}: cannot subscribe to its mail: {e}");
                        None
                    }
                };
                let _ = within(FLUSH_WAIT, client.flush()).await;
                (receiver, subscriber)
            }
            .boxed(),
        );
        true
    }

    /// A claim is done: hold the id, and look once more after [`RECHECK`].
    fn claimed(&mut self, receiver: u32, subscriber: Option<Subscriber>) {
        self.claiming.remove(&receiver);
        let Some(subscriber) = subscriber else {
            return;
        };
        let (cancel, cancelled) = oneshot::channel();
        self.held.insert(receiver, cancel);
        self.heard.push(
            draining_on(subscriber, cancelled)
                .map(move |m| (receiver, m))
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

    /// Whether this node let `receiver` go a moment ago (its client left, or another
    /// node took the id over). Its subscription here may still be draining: it would
    /// hear a batch this node forwards and leave it to the holder (see
    /// [`Holds::hear`]), but there may be none yet (a node taking the id over
    /// subscribes only once this one let go, and its interest takes a moment to cross
    /// the cluster), and nobody would answer before the forward's wait ran out: the
    /// sender heard `store-failed` after `--answer-within`. Such a batch goes straight
    /// to the stream instead, as when nobody answers; the new holder reads it there
    /// when its claim is done, or at its recheck.
    pub fn just_let_go(&mut self, receiver: u32) -> bool {
        self.let_go.retain(|_, at| at.elapsed() < LET_GO_FOR);
        self.let_go.contains_key(&receiver)
    }

    /// Stops holding `receiver` and answers the nodes waiting to take it over.
    pub async fn release(&mut self, client: &Client, receiver: u32) {
        self.held.remove(&receiver);
        let takers = self.takeovers.remove(&receiver).unwrap_or_default();
        self.let_go.retain(|_, at| at.elapsed() < LET_GO_FOR);
        self.let_go.insert(receiver, Instant::now());
        for reply in takers {
            if let Err(e) = client.publish(reply, Bytes::new()).await {
                log::debug!("id {receiver}: release not sent: {e}");
            }
        }
    }

    /// The next thing heard for an id held here (or a reminder to look once more).
    pub fn next(&mut self) -> impl Future<Output = Heard> + '_ {
        poll_fn(move |cx| {
            loop {
                if let Poll::Ready(Some((receiver, subscriber))) = self.claims.poll_next_unpin(cx) {
                    self.claimed(receiver, subscriber);
                    return Poll::Ready(Heard::Claimed { receiver });
                }
                if let Poll::Ready(Some(receiver)) = self.rechecks.poll_next_unpin(cx) {
                    if self.holds(receiver) {
                        return Poll::Ready(Heard::Mail { receiver });
                    }
                    continue;
                }
                if let Poll::Ready(Some(msg)) = self.batches.poll_next_unpin(cx) {
                    if let Some(heard) = hear_batch(msg) {
                        return Poll::Ready(heard);
                    }
                    continue;
                }
                let Poll::Ready(Some((receiver, msg))) = self.heard.poll_next_unpin(cx) else {
                    return Poll::Pending;
                };
                if let Some(heard) = self.hear(receiver, msg) {
                    return Poll::Ready(heard);
                }
            }
        })
    }

    /// What `msg` on `receiver`'s subjects says, unless it is this node's own or
    /// malformed.
    fn hear(&mut self, receiver: u32, msg: Message) -> Option<Heard> {
        if msg.payload[..] == *self.node.as_bytes() {
            return None;
        }
        match (wire::held(&msg.subject), msg.reply) {
            (Some(Hold::Frames), Some(reply)) => {
                // This node's own batch, heard on a subscription still draining after
                // the id was let go: the id's holder answers it, not this node.
                let own = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(wire::NODE_HEADER))
                    .is_some_and(|n| n.as_str() == self.node);
                if own {
                    return None;
                }
                let behind = has_header(msg.headers.as_ref(), wire::BEHIND_HEADER);
                let logged = has_header(msg.headers.as_ref(), wire::LOGGED_HEADER);
                let Some(frames) = wire::split_frames(&msg.payload) else {
                    log::warn!("id {receiver}: malformed frames from another node; ignored");
                    return None;
                };
                Some(Heard::Frames {
                    receiver,
                    frames,
                    behind,
                    logged,
                    reply,
                })
            }
            (Some(Hold::Mail), _) => Some(Heard::Mail { receiver }),
            (Some(Hold::Take), Some(reply)) => {
                // Heard while letting go: the id has a new holder.
                self.let_go.remove(&receiver);
                log::debug!(
                    "id {receiver}: node {} takes it over",
                    String::from_utf8_lossy(&msg.payload)
                );
                self.takeovers.entry(receiver).or_default().push(reply);
                Some(Heard::Take { receiver })
            }
            _ => None,
        }
    }
}

/// Whether a message's `headers` include `name`.
fn has_header(headers: Option<&async_nats::HeaderMap>, name: &str) -> bool {
    headers.is_some_and(|h| h.get(name).is_some())
}

/// What a batch on this node's batch subject says, unless it is malformed. Its
/// sections go to the broker whether or not this node holds their receivers: it sends
/// frames for an id held elsewhere on, or stores them, as any other node's frames, and
/// the answer says the id is gone from here.
fn hear_batch(msg: Message) -> Option<Heard> {
    let Some(reply) = msg.reply else {
        log::warn!("a batch from another node without a reply subject; ignored");
        return None;
    };
    let logged = has_header(msg.headers.as_ref(), wire::LOGGED_HEADER);
    let Some(sections) = wire::Section::decode_all(&msg.payload) else {
        log::warn!("malformed batch of frames from another node; ignored");
        return None;
    };
    Some(Heard::Batch {
        sections,
        logged,
        reply,
    })
}

/// `subscriber`'s messages until `release` fires, then until the subscription is
/// drained: NATS stops sending to it, and what it sent before (a batch of frames
/// forwarded as the id was let go, a take request) is still heard and answered.
/// Dropping the subscriber at once lost such a batch unanswered, and its sender waited
/// the forward's 5 s before storing it itself, in normal operation.
fn draining_on(
    subscriber: Subscriber,
    release: oneshot::Receiver<()>,
) -> impl futures::Stream<Item = Message> {
    futures::stream::unfold(
        (subscriber, Some(release)),
        |(mut subscriber, release)| async move {
            let Some(mut release) = release else {
                // Draining: what is left, then the end.
                let msg = subscriber.next().await?;
                return Some((msg, (subscriber, None)));
            };
            futures::select_biased! {
                msg = subscriber.next().fuse() => {
                    let msg = msg?;
                    Some((msg, (subscriber, Some(release))))
                }
                _ = (&mut release).fuse() => {
                    if let Err(e) = subscriber.drain().await {
                        log::debug!("a released id's subscription not drained: {e}");
                        return None;
                    }
                    let msg = subscriber.next().await?;
                    Some((msg, (subscriber, None)))
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(subject: String, payload: &[u8], reply: Option<&str>) -> Message {
        Message {
            subject: subject.into(),
            reply: reply.map(Subject::from),
            payload: Bytes::copy_from_slice(payload),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn a_holder_hears_takes_mail_and_frames_but_not_its_own_words() {
        let mut h = Holds::new("node-a".into(), futures::stream::empty().boxed());
        let take = msg(wire::hold(7, Hold::Take), b"node-b", Some("_INBOX.x"));
        assert!(matches!(h.hear(7, take), Some(Heard::Take { receiver: 7 })));
        assert_eq!(
            h.takeovers.get(&7).map(Vec::len),
            Some(1),
            "answered on release"
        );
        let own = msg(wire::hold(7, Hold::Mail), b"node-a", None);
        assert!(h.hear(7, own).is_none());
        let mail = msg(wire::hold(7, Hold::Mail), b"node-b", None);
        assert!(matches!(h.hear(7, mail), Some(Heard::Mail { receiver: 7 })));
        let frame = crate::protocol::notice(crate::protocol::Code::Pong, "x");
        let frames = msg(wire::hold(7, Hold::Frames), &frame, Some("_INBOX.y.3"));
        let Some(Heard::Frames {
            frames,
            behind,
            reply,
            ..
        }) = h.hear(7, frames)
        else {
            panic!("frames");
        };
        assert_eq!(frames, vec![frame.clone()]);
        assert!(!behind);
        assert_eq!(reply.as_str(), "_INBOX.y.3");
        let cut = msg(wire::hold(7, Hold::Frames), &frame[..4], Some("_INBOX.y.4"));
        assert!(h.hear(7, cut).is_none(), "malformed: ignored");
        let no_reply = msg(wire::hold(7, Hold::Frames), &frame, None);
        assert!(h.hear(7, no_reply).is_none());
    }

    #[test]
    fn a_batch_of_sections_is_heard_whole_or_not_at_all() {
        let frame = crate::protocol::notice(crate::protocol::Code::Pong, "x");
        let mut payload = bytes::BytesMut::new();
        wire::Section::encode(7, true, std::slice::from_ref(&frame), &mut payload);
        let payload = payload.freeze();
        let mut m = msg(wire::node_batches("t"), &payload, Some("_INBOX.y.5"));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(wire::LOGGED_HEADER, "1");
        m.headers = Some(headers);
        let Some(Heard::Batch {
            sections,
            logged,
            reply,
        }) = hear_batch(m)
        else {
            panic!("a batch");
        };
        assert_eq!((sections.len(), sections[0].receiver), (1, 7));
        assert!(sections[0].behind && logged);
        assert_eq!(reply.as_str(), "_INBOX.y.5");
        let cut = msg(
            wire::node_batches("t"),
            &payload[..payload.len() - 1],
            Some("_INBOX.y.6"),
        );
        assert!(hear_batch(cut).is_none(), "malformed: ignored");
        let no_reply = msg(wire::node_batches("t"), &payload, None);
        assert!(hear_batch(no_reply).is_none());
    }
}
