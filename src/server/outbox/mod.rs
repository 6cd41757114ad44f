//! The queue between the broker and one connection's writer, and what it remembers
//! about acknowledged delivery.
//!
//! The broker pushes without ever waiting; the writer takes batches and reports what
//! it wrote. Frames from other ids are in the store from before they are pushed until
//! they are delivered: written to the socket, or, once the client has turned acks on,
//! acknowledged. The outbox decides which, because only it knows where in the byte
//! stream acks were turned on.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;

use crate::ids::{Endpoint, Ticket};
use crate::server::card::Card;
use crate::store::Outcome;
use replies::Replies;

mod replies;

/// Frames up to this size are copied into the batch buffer; larger ones are written
/// straight from their own allocation.
const COALESCE_MAX_FRAME: usize = 64 * 1024;
/// The capacity a queue first grows to (Rust's smallest for items of this size).
pub(crate) const SMALL_QUEUE: usize = 4;
/// A batch stops growing at this size.
const BATCH_BYTES: usize = 256 * 1024;

/// Whose echo a frame's write settles.
#[derive(Clone)]
pub enum EchoTo {
    /// A connection of this node: the writer settles the echo in its outbox itself,
    /// without a trip through the broker.
    Conn(Arc<Outbox>),
    /// A batch forwarded by another node: the broker answers it.
    Remote(Ticket),
}

impl std::fmt::Debug for EchoTo {
    // The sender's outbox by its address, not its contents (which may name this one).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EchoTo::Conn(outbox) => write!(f, "Conn({:p})", Arc::as_ptr(outbox)),
            EchoTo::Remote(ticket) => write!(f, "Remote({ticket:?})"),
        }
    }
}

/// Where a queued frame came from, which decides what happens once it is written.
#[derive(Debug, Clone)]
pub enum Origin {
    /// An echo or a notice: meaningful only on this connection.
    Reply,
    /// A notice (`welcome` or `acks-on`) from which on data frames are kept until the
    /// client acknowledges them.
    AcksOn,
    /// A frame from another id, numbered `seq`. `page_end` marks the last frame of a
    /// mailbox page, after which the broker loads the next one. `stored` is false when
    /// the store was down: then delivery is the only way the frame can be accepted,
    /// and `echo_to` names the sender's connection, whose echo waits for this write.
    /// `arrived` is when a live frame reached the broker (for the delivery-time
    /// metric); a frame from the mailbox has none.
    Data {
        receiver: Endpoint,
        seq: u64,
        page_end: bool,
        echo_to: Option<EchoTo>,
        stored: bool,
        arrived: Option<Instant>,
    },
}

#[derive(Debug, Clone)]
pub struct Outgoing {
    pub wire: Bytes,
    pub origin: Origin,
}

impl Outgoing {
    pub fn reply(wire: Bytes) -> Outgoing {
        Outgoing {
            wire,
            origin: Origin::Reply,
        }
    }

    /// A live frame for `receiver`, stored (or being stored) under `seq`, that reached
    /// the broker at `arrived`.
    pub fn live(wire: Bytes, receiver: Endpoint, seq: u64, arrived: Instant) -> Outgoing {
        Outgoing {
            wire,
            origin: Origin::Data {
                receiver,
                seq,
                page_end: false,
                echo_to: None,
                stored: true,
                arrived: Some(arrived),
            },
        }
    }

    /// A live frame whose write to a client without acks settles `echo_to`'s echo (it
    /// is delivered, whether or not the store has committed it yet).
    pub fn live_echoing(
        wire: Bytes,
        receiver: Endpoint,
        seq: u64,
        arrived: Instant,
        echo_to: EchoTo,
    ) -> Outgoing {
        let mut item = Outgoing::live(wire, receiver, seq, arrived);
        if let Origin::Data { echo_to: e, .. } = &mut item.origin {
            *e = Some(echo_to);
        }
        item
    }

    /// A live frame that could not be stored (the store is down): its delivery alone
    /// accepts it, and then `echo_to`'s echo goes.
    pub fn unstored(
        wire: Bytes,
        receiver: Endpoint,
        seq: u64,
        echo_to: Option<EchoTo>,
        arrived: Instant,
    ) -> Outgoing {
        let mut item = Outgoing::live(wire, receiver, seq, arrived);
        if let Origin::Data {
            echo_to: e, stored, ..
        } = &mut item.origin
        {
            *e = echo_to;
            *stored = false;
        }
        item
    }

    /// A frame read from the mailbox; `page_end` on the last of its page.
    pub fn stored(wire: Bytes, receiver: Endpoint, seq: u64, page_end: bool) -> Outgoing {
        Outgoing {
            wire,
            origin: Origin::Data {
                receiver,
                seq,
                page_end,
                echo_to: None,
                stored: true,
                arrived: None,
            },
        }
    }
}

/// How a connection is to be closed.
#[derive(Debug, Clone)]
pub struct Close {
    /// Written last, if the stream is at a frame boundary.
    pub notice: Option<Bytes>,
    /// Write what is queued first (within the writer's drain limit), or abandon it.
    pub drain: bool,
}

/// What a close asks of a writer that is in the middle of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Stop writing now: what is queued goes back to the broker.
    Abandon,
    /// Write what is queued, within the writer's drain deadline.
    Drain,
}

/// What a written batch means for the store and the broker.
#[derive(Debug, Default)]
pub struct Written {
    /// The device whose frames `delete` names (every data frame here is for one).
    pub receiver: Option<Endpoint>,
    /// Frames delivered: remove them from the store.
    pub delete: Vec<u64>,
    /// The last frame of a mailbox page was written.
    pub page_end: bool,
    /// Whose echoes this write settles, and the sequence numbers of their frames.
    pub delivered: Vec<(EchoTo, u64)>,
}

/// The queue between the broker and one writer task. It also carries its
/// connection's [`Card`] for the directory (see [`crate::server::card`] for why here).
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    card: Card,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Outgoing>,
    /// Bytes in `queue`.
    queued: usize,
    /// Set once the client's `AcksOn` notice has been written. Boxed, like `close`:
    /// most of an idle connection's outbox would otherwise be room for these two.
    acks: Option<Box<Acks>>,
    close: Option<Box<Close>>,
    /// The writer, waiting for frames, or in a write or flush for a close.
    waker: Option<Waker>,
    /// The reader, waiting for room (see [`Outbox::poll_room`]).
    room_waker: Option<Waker>,
    /// The writer has taken what was left and stopped: nothing more may be queued.
    finished: bool,
    /// Replies that wait for the echo of an earlier frame (see
    /// [`replies`]): here, so that a receiver's writer can settle an
    /// echo that waits for its write.
    replies: Replies,
}

impl State {
    /// Queues a reply unless the writer has finished (the connection is gone, and so
    /// is whoever the reply was for).
    fn queue_reply(&mut self, item: Outgoing) -> bool {
        if self.finished {
            return false;
        }
        self.queued += item.wire.len();
        self.queue.push_back(item);
        true
    }
}

/// Data frames written since acks were turned on and not yet acknowledged.
///
/// A client may ack a frame before the writer has reported writing it (the bytes reach
/// the client first); such frames are `owed`: acknowledged as soon as they are reported.
#[derive(Debug, Default)]
struct Acks {
    /// The `AcksOn` notice has been written: data frames written from now on count.
    counting: bool,
    /// The client's running count so far (XEP-0198's `h`), modulo 2^32.
    h: u32,
    /// Frames the client has acknowledged that the writer has not reported yet.
    owed: usize,
    /// Sequence number (if it is stored) and size of each written, unacknowledged
    /// frame, in order.
    unacked: VecDeque<(Option<u64>, usize)>,
    bytes: usize,
}

impl Outbox {
    /// The outbox of the connection `card` describes.
    pub fn new(card: Card) -> Outbox {
        Outbox {
            state: Mutex::default(),
            card,
        }
    }

    pub fn card(&self) -> &Card {
        &self.card
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the queue half-updated: every critical section
        // is a few field assignments, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame without waking the writer: the broker wakes each outbox it
    /// pushed to once it has handled a whole event ([`Outbox::wake`]), so a writer
    /// finds everything one event produced for it and writes it with one call. Once
    /// the writer has finished (its connection is gone, though the broker may not have
    /// heard yet) the frame is given back, so the caller can deal with it instead of
    /// losing it.
    pub fn push(&self, item: Outgoing) -> Result<(), Outgoing> {
        let mut s = self.lock();
        if s.finished {
            return Err(item);
        }
        s.queued += item.wire.len();
        s.queue.push_back(item);
        Ok(())
    }

    /// A reply: queued at once when no echo waits ahead of it, else behind that echo,
    /// so that replies keep the order of the frames that caused them. Whether it was
    /// queued (the writer needs waking).
    pub fn reply(&self, item: Outgoing) -> bool {
        let mut s = self.lock();
        match s.replies.reply(item) {
            Some(item) => s.queue_reply(item),
            None => false,
        }
    }

    /// The echo of the frame numbered `seq` takes its place among the replies, and
    /// waits for [`Outbox::settle`].
    pub fn wait_for_echo(&self, seq: u64, echo: Bytes) {
        self.lock().replies.wait_for_echo(seq, echo);
    }

    /// Settles the echo of `seq` with `outcome` and queues every reply that no longer
    /// waits; whether it queued any (the writer needs waking).
    pub fn settle(&self, seq: u64, outcome: Outcome) -> bool {
        self.settling(|replies, ready| replies.settle(seq, outcome, ready))
    }

    /// Settles the echo of `seq` with `wire` in its place (a notice); as
    /// [`Outbox::settle`] otherwise.
    pub fn settle_with(&self, seq: u64, wire: Bytes) -> bool {
        self.settling(|replies, ready| replies.settle_with(seq, wire, ready))
    }

    /// Answers every echo that has waited since before `cutoff` with `outcome`, and
    /// queues every reply that no longer waits; whether it queued any.
    pub fn expire(&self, cutoff: Instant, outcome: impl Fn() -> Outcome) -> bool {
        self.settling(|replies, ready| replies.expire(cutoff, outcome, ready))
    }

    /// Runs `settle` on the replies, under the lock, and queues what it hands over.
    fn settling(
        &self,
        settle: impl FnOnce(&mut Replies, &mut dyn FnMut(Outgoing)) -> bool,
    ) -> bool {
        let mut guard = self.lock();
        let s = &mut *guard;
        let mut ready = Vec::new();
        settle(&mut s.replies, &mut |item| ready.push(item));
        ready
            .into_iter()
            .fold(false, |queued, item| s.queue_reply(item) | queued)
    }

    /// The echo of `seq` names its frame's offset (learnt once the frame is stored).
    pub fn set_offset(&self, seq: u64, offset: u64) {
        self.lock().replies.set_offset(seq, offset);
    }

    /// Wakes the writer if it waits for frames.
    pub fn wake(&self) {
        let waker = self.lock().waker.take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Bytes this client holds up: queued, plus written and not yet acknowledged.
    /// `--max-pending-bytes` bounds this.
    pub fn pending_bytes(&self) -> usize {
        let s = self.lock();
        s.queued + s.acks.as_ref().map_or(0, |a| a.bytes)
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.lock().queued
    }

    /// Takes the client's running count `h`: frames up to it are delivered, and their
    /// sequence numbers are returned for the store to remove.
    pub fn ack(&self, h: u32) -> Result<Vec<u64>, String> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let written = s.acks.as_ref().map_or(0, |a| a.unacked.len());
        let n = s.acks.as_ref().map(|a| h.wrapping_sub(a.h) as usize);
        // Usually the ack covers frames reported written; only otherwise count the
        // frames queued after acks went on, some of which may be in flight already.
        let in_flight = if n.is_some_and(|n| n <= written) {
            0
        } else {
            let mut on = s.acks.as_ref().is_some_and(|a| a.counting);
            let mut count: usize = 0;
            for item in &s.queue {
                match item.origin {
                    Origin::AcksOn => on = true,
                    Origin::Data { .. } if on => count += 1,
                    _ => {}
                }
            }
            if s.acks.is_none() {
                if !on {
                    return Err("acks are not on; turn them on with control operation 3".into());
                }
                // The `AcksOn` notice is on its way: the client may have seen it already.
                s.acks = Some(Box::default());
            }
            count
        };
        let Some(acks) = &mut s.acks else {
            return Err("acks are not on".into());
        };
        // Modulo 2^32: an `h` behind the last one looks like a huge step forward.
        let n = h.wrapping_sub(acks.h) as usize;
        let sent = written + in_flight.saturating_sub(acks.owed);
        if n > sent {
            return Err(format!(
                "ack h={h} is behind the last ack ({}) or past the {sent} frames sent since",
                acks.h
            ));
        }
        acks.h = h;
        let now = n.min(written);
        acks.owed += n - now;
        let mut stored = Vec::with_capacity(now);
        for (seq, len) in acks.unacked.drain(..now) {
            acks.bytes -= len;
            stored.extend(seq);
        }
        Ok(stored)
    }

    /// Asks the writer to finish. An abandoning close overrides a draining one.
    pub fn close(&self, close: Close) {
        let mut s = self.lock();
        match &s.close {
            Some(c) if !c.drain || close.drain => return,
            _ => s.close = Some(Box::new(close)),
        }
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        if let Some(w) = s.room_waker.take() {
            w.wake();
        }
    }

    /// Ready while at most `limit` bytes are queued, or once the connection is closing.
    /// The connection's reader waits here before reading more, so a client that does
    /// not read its own echoes stops being read instead of making them pile up. (Frames
    /// awaiting acknowledgement do not count here: the reader must stay free to read
    /// the acks that release them.)
    pub fn poll_room(&self, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
        let mut s = self.lock();
        if s.queued <= limit || s.close.is_some() {
            return Poll::Ready(());
        }
        s.room_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next batch to write (clones of queued frames, which stay queued until
    /// [`Outbox::written`]), or the close once there is nothing left to write.
    pub fn poll_work(
        &self,
        cx: &mut Context<'_>,
        batch: &mut Vec<Outgoing>,
    ) -> Poll<Option<Close>> {
        let mut s = self.lock();
        let abandon = s.close.as_ref().is_some_and(|c| !c.drain);
        if abandon || (s.queue.is_empty() && s.close.is_some()) {
            return Poll::Ready(s.close.as_deref().cloned());
        }
        if s.queue.is_empty() {
            // The writer is about to wait. A connection that is idle, or sees a frame
            // at a time, keeps neither the queue's nor the batch's smallest allocation
            // (a few hundred bytes each, most of an idle connection's cost); a busy
            // one keeps what it grew to rather than growing it again on every wake.
            if s.queue.capacity() <= SMALL_QUEUE {
                s.queue = VecDeque::new();
            }
            if batch.capacity() <= SMALL_QUEUE {
                *batch = Vec::new();
            }
            s.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut bytes = 0;
        for item in &s.queue {
            let len = item.wire.len();
            if !batch.is_empty() && (len > COALESCE_MAX_FRAME || bytes + len > BATCH_BYTES) {
                break;
            }
            bytes += len;
            batch.push(item.clone());
            if len > COALESCE_MAX_FRAME {
                break;
            }
        }
        Poll::Ready(None)
    }

    /// Ready with [`Closing::Abandon`] once the outbox is told to abandon its queue;
    /// unless the writer already `draining`, ready with [`Closing::Drain`] once it is
    /// told to close at all, so a writer blocked in a write to a client that reads
    /// nothing starts its drain deadline then, not after the write.
    pub fn poll_closing(&self, cx: &mut Context<'_>, draining: bool) -> Poll<Closing> {
        let mut s = self.lock();
        match &s.close {
            Some(c) if !c.drain => return Poll::Ready(Closing::Abandon),
            Some(_) if !draining => return Poll::Ready(Closing::Drain),
            _ => {}
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Removes the first `n` frames, which have been written, and says what that
    /// delivered: without acks a written data frame is delivered; with acks it waits
    /// for the client's count.
    pub fn written(&self, n: usize) -> Written {
        let mut s = self.lock();
        let mut out = Written::default();
        let mut bytes = 0;
        for _ in 0..n {
            let Some(item) = s.queue.pop_front() else {
                break;
            };
            bytes += item.wire.len();
            match item.origin {
                Origin::Reply => {}
                Origin::AcksOn => s.acks.get_or_insert_with(Box::default).counting = true,
                Origin::Data {
                    receiver,
                    seq,
                    page_end,
                    echo_to,
                    stored,
                    ..
                } => {
                    out.receiver = Some(receiver);
                    out.page_end |= page_end;
                    // Written is delivered for a frame that could not be stored, and
                    // for a client without acks; with acks it waits for the count.
                    let counting = s.acks.as_ref().is_some_and(|a| a.counting);
                    if let Some(sender) = echo_to.filter(|_| !stored || !counting) {
                        out.delivered.push((sender, seq));
                    }
                    let stored = stored.then_some(seq);
                    match &mut s.acks {
                        Some(acks) if acks.counting && acks.owed > 0 => {
                            acks.owed -= 1;
                            out.delete.extend(stored);
                        }
                        Some(acks) if acks.counting => {
                            acks.unacked.push_back((stored, item.wire.len()));
                            acks.bytes += item.wire.len();
                        }
                        _ => out.delete.extend(stored),
                    }
                }
            }
        }
        s.queued -= bytes;
        if let Some(w) = s.room_waker.take() {
            w.wake();
        }
        out
    }

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// The close the broker asked for, if any.
    pub fn close_requested(&self) -> Option<Close> {
        self.lock().close.as_deref().cloned()
    }

    /// Stops the outbox for good and returns what was never written.
    pub fn take_all(&self) -> Vec<Outgoing> {
        let mut s = self.lock();
        s.finished = true;
        s.queued = 0;
        // Other queues may hold this outbox a while (echoes to settle): nothing waits
        // here any more.
        s.replies = Replies::default();
        s.queue.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seq: u64) -> Outgoing {
        Outgoing {
            wire: Bytes::from(vec![0u8; 10]),
            origin: Origin::Data {
                receiver: Endpoint::default_of(7),
                seq,
                page_end: false,
                echo_to: None,
                stored: true,
                arrived: None,
            },
        }
    }

    fn poll_work(o: &Outbox, batch: &mut Vec<Outgoing>) -> Poll<Option<Close>> {
        o.poll_work(&mut Context::from_waker(Waker::noop()), batch)
    }

    /// A writer blocked in a write learns of a draining close at once (to start its
    /// drain deadline), and of an abandoning one whether draining or not.
    #[test]
    fn a_close_reaches_a_writer_in_the_middle_of_a_write() {
        let o = Outbox::default();
        let poll = |draining| o.poll_closing(&mut Context::from_waker(Waker::noop()), draining);
        assert!(poll(false).is_pending());
        o.close(Close {
            notice: None,
            drain: true,
        });
        assert_eq!(poll(false), Poll::Ready(Closing::Drain));
        assert!(
            poll(true).is_pending(),
            "already draining: wait for the deadline"
        );
        o.close(Close {
            notice: None,
            drain: false,
        });
        assert_eq!(poll(true), Poll::Ready(Closing::Abandon));
        assert_eq!(poll(false), Poll::Ready(Closing::Abandon));
    }

    #[test]
    fn a_writer_that_waits_after_a_frame_at_a_time_holds_no_queue() {
        let o = Outbox::default();
        let mut batch = Vec::new();
        o.push(data(1)).unwrap();
        assert!(poll_work(&o, &mut batch).is_ready());
        o.written(batch.len());
        batch.clear();
        assert!(poll_work(&o, &mut batch).is_pending());
        assert_eq!(o.lock().queue.capacity(), 0);
        assert_eq!(batch.capacity(), 0);

        // A queue that grew past the smallest size is kept for the next burst.
        for seq in 0..2 * SMALL_QUEUE as u64 {
            o.push(data(seq)).unwrap();
        }
        assert!(poll_work(&o, &mut batch).is_ready());
        o.written(batch.len());
        batch.clear();
        assert!(poll_work(&o, &mut batch).is_pending());
        assert!(o.lock().queue.capacity() > SMALL_QUEUE);
        assert!(batch.capacity() > SMALL_QUEUE);
    }

    #[test]
    fn frames_written_before_acks_on_are_delivered_and_after_it_wait_for_acks() {
        let o = Outbox::default();
        o.push(data(1)).unwrap();
        o.push(Outgoing {
            wire: Bytes::from_static(b"notice"),
            origin: Origin::AcksOn,
        })
        .unwrap();
        o.push(data(2)).unwrap();
        o.push(data(3)).unwrap();
        let w = o.written(4);
        assert_eq!(w.delete, vec![1]);
        assert_eq!(o.pending_bytes(), 20, "two unacknowledged frames count");
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.ack(1), Ok(vec![2]));
        assert!(o.ack(0).is_err(), "backwards");
        assert!(o.ack(3).is_err(), "past what was sent");
        assert_eq!(o.ack(2), Ok(vec![3]));
        assert_eq!(o.pending_bytes(), 0);
    }

    #[test]
    fn acks_count_modulo_2_pow_32() {
        let o = Outbox::default();
        o.push(Outgoing {
            wire: Bytes::new(),
            origin: Origin::AcksOn,
        })
        .unwrap();
        o.written(1);
        o.lock().acks.as_mut().unwrap().h = u32::MAX;
        o.push(data(1)).unwrap();
        o.push(data(2)).unwrap();
        o.written(2);
        assert_eq!(o.ack(1), Ok(vec![1, 2]), "u32::MAX + 2 wraps to 1");
    }

    /// The bytes reach the client before the writer reports them written: an ack for
    /// frames still in flight (and for the `AcksOn` notice itself) is taken.
    #[test]
    fn an_ack_may_overtake_the_writers_report() {
        let o = Outbox::default();
        o.push(data(1)).unwrap();
        o.push(Outgoing {
            wire: Bytes::new(),
            origin: Origin::AcksOn,
        })
        .unwrap();
        o.push(data(2)).unwrap();
        o.push(data(3)).unwrap();
        assert_eq!(o.ack(1), Ok(vec![]), "frame 2 is in flight");
        assert!(o.ack(3).is_err(), "only two were sent after acks-on");
        let w = o.written(4);
        assert_eq!(w.delete, vec![1, 2], "1 before acks, 2 acknowledged early");
        assert_eq!(o.pending_bytes(), 10, "3 waits for its ack");
        assert_eq!(o.ack(2), Ok(vec![3]));
    }

    #[test]
    fn ack_without_acks_on_is_refused() {
        assert!(Outbox::default().ack(0).is_err());
    }
}
