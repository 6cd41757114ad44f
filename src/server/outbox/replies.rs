//! A connection's replies in the order of the frames that caused them.
//!
//! The echo of a frame for another id means "accepted": it waits until the store has
//! committed the frame (or, while the store is down, until the frame is delivered).
//! Replies to later frames (a pong, a notice, the echo of a frame to oneself) must not
//! overtake it, so each holds its place in this queue until everything ahead of it is
//! ready.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::{Outgoing, SMALL_QUEUE};
use crate::protocol::{Code, notice};
use crate::store::Outcome;

#[derive(Debug, Default)]
pub(super) struct Replies {
    queue: VecDeque<Pending>,
}

#[derive(Debug)]
enum Pending {
    Ready(Outgoing),
    /// The echo of the frame stored under `seq`, sent once the frame is accepted;
    /// waiting since `since`.
    Echo {
        seq: u64,
        echo: Bytes,
        since: Instant,
    },
}

impl Replies {
    /// A reply that waits for nothing of its own: handed back to send at once when
    /// nothing waits ahead of it, else queued behind what does.
    pub fn reply(&mut self, item: Outgoing) -> Option<Outgoing> {
        if self.queue.is_empty() {
            return Some(item);
        }
        self.queue.push_back(Pending::Ready(item));
        None
    }

    /// The echo of the frame numbered `seq` takes its place now, and waits for
    /// [`Replies::settle`].
    pub fn wait_for_echo(&mut self, seq: u64, echo: Bytes) {
        self.queue.push_back(Pending::Echo {
            seq,
            echo,
            since: Instant::now(),
        });
    }

    /// The echo of `seq` names its frame's offset (a cluster learns it once the frame's
    /// history block is stored): written into the echo's envelope.
    pub fn set_offset(&mut self, seq: u64, offset: u64) {
        let slot = self
            .queue
            .iter_mut()
            .find(|r| matches!(r, Pending::Echo { seq: s, .. } if *s == seq));
        if let Some(Pending::Echo { echo, .. }) = slot {
            // The envelope follows the 9-byte header: its length, its kind, the offset.
            let at = crate::protocol::SERVER_HEADER_LEN + 2;
            if echo.len() >= at + 8 {
                let mut patched = echo.to_vec();
                patched[at..at + 8].copy_from_slice(&offset.to_be_bytes());
                *echo = Bytes::from(patched);
            }
        }
    }

    /// Answers every echo that has waited since before `cutoff` with `outcome`, and
    /// hands `send` every reply that no longer waits, in order; the echo's own outcome,
    /// when it comes, finds nothing to settle. Echoes wait in the order they came, so
    /// only the oldest are looked at. Returns whether it sent any.
    pub fn expire(
        &mut self,
        cutoff: Instant,
        outcome: impl Fn() -> Outcome,
        send: impl FnMut(Outgoing),
    ) -> bool {
        for pending in self.queue.iter_mut() {
            match pending {
                Pending::Echo { since, echo, .. } if *since < cutoff => {
                    *pending = Pending::Ready(Outgoing::reply(answer(echo, outcome())));
                }
                Pending::Echo { .. } => break,
                Pending::Ready(_) => {}
            }
        }
        self.send_ready(send)
    }

    /// Settles the echo of `seq` with `outcome` (the echo itself, or the notice that
    /// replaces it), then hands `send` every reply that no longer waits, in order.
    /// Returns whether it sent any.
    pub fn settle(&mut self, seq: u64, outcome: Outcome, send: impl FnMut(Outgoing)) -> bool {
        self.settle_as(seq, |echo| answer(echo, outcome), send)
    }

    /// Settles the echo of `seq` with `wire` in its place (a notice that says why the
    /// frame was refused), then hands `send` every reply that no longer waits.
    pub fn settle_with(&mut self, seq: u64, wire: Bytes, send: impl FnMut(Outgoing)) -> bool {
        self.settle_as(seq, |_| wire, send)
    }

    /// Puts `answer(echo)` in the place of the echo of `seq`, if it still waits, then
    /// hands `send` every reply that no longer waits.
    fn settle_as(
        &mut self,
        seq: u64,
        answer: impl FnOnce(&Bytes) -> Bytes,
        send: impl FnMut(Outgoing),
    ) -> bool {
        let slot = self
            .queue
            .iter_mut()
            .find(|r| matches!(r, Pending::Echo { seq: s, .. } if *s == seq));
        let Some(slot) = slot else {
            return false;
        };
        if let Pending::Echo { echo, .. } = slot {
            *slot = Pending::Ready(Outgoing::reply(answer(echo)));
        }
        self.send_ready(send)
    }

    /// Hands `send` the replies at the front that no longer wait, in order; whether
    /// there were any.
    fn send_ready(&mut self, mut send: impl FnMut(Outgoing)) -> bool {
        let mut sent = false;
        while let Some(Pending::Ready(_)) = self.queue.front() {
            if let Some(Pending::Ready(item)) = self.queue.pop_front() {
                send(item);
                sent = true;
            }
        }
        if self.queue.is_empty() && self.queue.capacity() <= SMALL_QUEUE {
            // Like the outbox: a connection sending a frame at a time keeps no queue.
            self.queue = VecDeque::new();
        }
        sent
    }
}

/// What the sender of a frame is told once its outcome is known.
fn answer(echo: &Bytes, outcome: Outcome) -> Bytes {
    match outcome {
        Outcome::Stored => echo.clone(),
        Outcome::Full(why) => notice(Code::MailboxFull, format_args!("receiver's mailbox {why}")),
        Outcome::Failed(why) => notice(Code::StoreFailed, format_args!("frame not stored: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Failure;

    fn item(tag: &str) -> Outgoing {
        Outgoing::reply(Bytes::from(tag.to_string()))
    }

    fn settled(replies: &mut Replies, seq: u64, outcome: Outcome) -> Vec<Bytes> {
        let mut sent = Vec::new();
        replies.settle(seq, outcome, |o| sent.push(o.wire));
        sent
    }

    #[test]
    fn a_reply_with_nothing_ahead_goes_at_once() {
        let mut r = Replies::default();
        assert_eq!(
            r.reply(item("pong")).map(|o| o.wire),
            Some(Bytes::from("pong"))
        );
    }

    #[test]
    fn replies_keep_frame_order_behind_a_waiting_echo() {
        let mut r = Replies::default();
        r.wait_for_echo(1, Bytes::from("echo 1"));
        assert!(
            r.reply(item("pong")).is_none(),
            "a pong must not overtake echo 1"
        );
        r.wait_for_echo(2, Bytes::from("echo 2"));
        // Echo 2 is accepted first: it still waits behind echo 1.
        assert!(settled(&mut r, 2, Outcome::Stored).is_empty());
        assert_eq!(
            settled(&mut r, 1, Outcome::Stored),
            ["echo 1", "pong", "echo 2"].map(Bytes::from)
        );
        assert_eq!(
            r.reply(item("next")).map(|o| o.wire),
            Some(Bytes::from("next"))
        );
    }

    #[test]
    fn a_refused_frame_gets_its_notice_in_its_echo_s_place() {
        let mut r = Replies::default();
        r.wait_for_echo(1, Bytes::from("echo 1"));
        r.wait_for_echo(2, Bytes::from("echo 2"));
        let sent = settled(&mut r, 1, Outcome::Full("holds 3 frames".into()));
        assert_eq!(sent.len(), 1);
        assert!(sent[0].ends_with(b"mailbox-full: receiver's mailbox holds 3 frames"));
        let failed = Failure::Store("No space left on device (os error 28)".into());
        let sent = settled(&mut r, 2, Outcome::Failed(failed));
        assert!(
            sent[0].ends_with(
                b"store-failed: frame not stored: No space left on device (os error 28)"
            )
        );
    }

    #[test]
    fn an_unknown_or_settled_echo_changes_nothing() {
        let mut r = Replies::default();
        r.wait_for_echo(1, Bytes::from("echo 1"));
        assert!(settled(&mut r, 7, Outcome::Stored).is_empty());
        assert_eq!(settled(&mut r, 1, Outcome::Stored).len(), 1);
        assert!(settled(&mut r, 1, Outcome::Stored).is_empty());
    }

    #[test]
    fn echoes_waiting_too_long_are_answered_in_order_and_only_once() {
        let mut r = Replies::default();
        r.wait_for_echo(1, Bytes::from("echo 1"));
        assert!(r.reply(item("pong")).is_none());
        // Time apart, so that echo 1 waited since before the cutoff and echo 2 after.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let cutoff = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        r.wait_for_echo(2, Bytes::from("echo 2"));
        let later = || Outcome::Failed(Failure::Late(std::time::Duration::from_secs(2)));
        let mut sent = Vec::new();
        assert!(r.expire(cutoff, later, |o| sent.push(o.wire)));
        assert_eq!(sent.len(), 2, "echo 1's notice, then the pong");
        assert!(
            sent[0].ends_with(b"it may still be delivered"),
            "{:?}",
            sent[0]
        );
        assert_eq!(sent[1], Bytes::from("pong"));
        assert!(
            settled(&mut r, 1, Outcome::Stored).is_empty(),
            "answered once"
        );
        assert_eq!(settled(&mut r, 2, Outcome::Stored), [Bytes::from("echo 2")]);
    }

    #[test]
    fn a_connection_sending_a_frame_at_a_time_keeps_no_queue() {
        let mut r = Replies::default();
        r.wait_for_echo(1, Bytes::from("echo"));
        settled(&mut r, 1, Outcome::Stored);
        assert_eq!(r.queue.capacity(), 0);
    }
}
