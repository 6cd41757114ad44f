//! One connection's way through its stored frames: the paging state machine.
//!
//! A bound connection reads its mailbox a page at a time before it takes frames live:
//! until it has caught up, frames for it are stored behind what is already there (and
//! held here, in `backlog`, to be pushed once the mailbox is read). A page is asked
//! for, written, and the next asked for once it is written, or, with acks on, once the
//! client's unacknowledged frames leave room for it. A read that comes back empty ends
//! the paging, unless frames were stored meanwhile (by another node, or forwarded
//! behind stored ones), which makes it read again.
//!
//! The broker does the I/O (asking the store, pushing to the outbox, the ack timer);
//! this type only decides, so every step can be tested on its own.

use std::collections::VecDeque;

use crate::server::outbox::Outgoing;

/// Mailbox pages are at most this large (and at most half the pending limit).
pub(super) const PAGE_BYTES: usize = 1024 * 1024;

/// The largest page for a `--max-pending-bytes` of `max_pending`.
pub(super) fn page_bytes(max_pending: usize) -> usize {
    PAGE_BYTES.min(max_pending / 2)
}

/// Where a bound connection is in delivering its stored frames. Until it is `Live`,
/// frames for it go to the store, behind what is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum State {
    #[default]
    Live,
    /// Waiting for an earlier connection with the same id to finish writing.
    Waiting,
    /// A page read is in flight; `stored` says frames were stored since it was asked.
    Loading { after: Option<u64>, stored: bool },
    /// A page is being written; the next one starts after `after`.
    Writing { after: u64 },
    /// A page was written, and the next waits until acks make room for it; `stall`
    /// tells this wait from a later one when its timer fires.
    AwaitingAcks { after: u64, stall: u64 },
}

/// What a frame for this connection should do, given how much already waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    /// Push it now.
    Live,
    /// Store it, and hold it here to push once the mailbox is read.
    Behind,
    /// Store it only: the first read, still to come, will find it.
    Stored,
    /// Too much waits already: the receiver is a slow consumer.
    Cut,
}

/// What to do with a page the store read.
#[derive(Debug)]
pub(super) enum Page {
    /// Not asked for (the state moved on): drop it; its frames stay stored.
    Ignore,
    /// Push these frames; the page ends after `last`.
    Deliver { last: u64 },
    /// Empty, but frames were stored since it was asked for: read again after `after`.
    ReadAgain { after: Option<u64> },
    /// Empty: the connection is live now; push what was held back meanwhile.
    CaughtUp(VecDeque<Outgoing>),
}

#[derive(Debug, Default)]
pub(super) struct Mailbox {
    state: State,
    /// The last stored frame pushed to this connection from its mailbox: frames stored
    /// later (by another node) are read after it.
    paged: Option<u64>,
    /// Frames that arrived while the mailbox was being read, in order: pushed once it
    /// has been, so they follow it. They are stored as live frames, which mailbox
    /// reads after the first leave out. Boxed, and only while there are any: every
    /// connection has a mailbox, and few ever hold a frame back.
    backlog: Option<Box<Backlog>>,
}

#[derive(Debug, Default)]
struct Backlog {
    frames: VecDeque<Outgoing>,
    bytes: usize,
}

impl Mailbox {
    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    /// The last stored frame pushed from the mailbox, if any.
    pub fn paged(&self) -> Option<u64> {
        self.paged
    }

    pub fn is_waiting(&self) -> bool {
        self.state == State::Waiting
    }

    /// An earlier connection's writer must finish before this one reads.
    pub fn wait(&mut self) {
        self.state = State::Waiting;
    }

    /// A read of the page after `after` is asked for.
    pub fn loading(&mut self, after: Option<u64>) {
        let stored = false;
        self.state = State::Loading { after, stored };
    }

    /// Where a frame of `len` bytes for this connection goes, with `pending` bytes in
    /// its outbox and at most `limit` allowed. An empty queue takes any frame, however
    /// large.
    pub fn admit(&self, len: usize, pending: usize, limit: usize) -> Admit {
        let fits = |waiting: usize| waiting == 0 || waiting + len <= limit;
        match self.state {
            State::Live if fits(pending) => Admit::Live,
            State::Live => Admit::Cut,
            // Before its first read the mailbox may still hold this frame's
            // predecessors: the store keeps it.
            State::Waiting => Admit::Stored,
            _ if fits(pending + self.backlog.as_ref().map_or(0, |b| b.bytes)) => Admit::Behind,
            _ => Admit::Cut,
        }
    }

    /// Holds a frame [`Admit::Behind`] until the mailbox is read.
    pub fn hold(&mut self, item: Outgoing) {
        let backlog = self.backlog.get_or_insert_with(Box::default);
        backlog.bytes += item.wire.len();
        backlog.frames.push_back(item);
    }

    /// Takes frame `seq` out of what is held back, with every frame held before it,
    /// in order, to be pushed now (a page found it in the store ahead of others);
    /// nothing if it is not held (pushed already). The frames before it go too, so
    /// what is held keeps its order even when one of them never reached the store.
    pub fn take_held(&mut self, seq: u64) -> Vec<Outgoing> {
        let Some(backlog) = self.backlog.as_mut() else {
            return Vec::new();
        };
        let Some(i) = backlog.frames.iter().position(|item| {
            matches!(item.origin, crate::server::outbox::Origin::Data { seq: s, .. } if s == seq)
        }) else {
            return Vec::new();
        };
        let taken: Vec<Outgoing> = backlog.frames.drain(..=i).collect();
        let bytes: usize = taken.iter().map(|item| item.wire.len()).sum();
        backlog.bytes = backlog.bytes.saturating_sub(bytes);
        if backlog.frames.is_empty() {
            self.backlog = None;
        }
        taken
    }

    /// The store read a page whose last frame is `last` (`None`: empty).
    pub fn page(&mut self, last: Option<u64>) -> Page {
        let State::Loading { after, stored } = self.state else {
            return Page::Ignore;
        };
        match last {
            Some(last) => {
                self.state = State::Writing { after: last };
                self.paged = Some(last);
                Page::Deliver { last }
            }
            None if stored => Page::ReadAgain { after },
            None => {
                self.state = State::Live;
                let held = self.backlog.take().map(|b| b.frames);
                Page::CaughtUp(held.unwrap_or_default())
            }
        }
    }

    /// Frames were stored for this connection elsewhere (another node, or forwarded
    /// behind stored ones): the page to read, if a read must start now.
    pub fn stored_elsewhere(&mut self) -> Option<u64> {
        match &mut self.state {
            State::Live => Some(self.paged.unwrap_or(0)),
            State::Loading { stored, .. } => {
                *stored = true;
                None
            }
            // A page is on its way, and the pages go on until one comes back empty;
            // or the first read has not been asked for yet.
            _ => None,
        }
    }

    /// A page has been written: the next one starts after the returned frame.
    pub fn written(&self) -> Option<u64> {
        match self.state {
            State::Writing { after } => Some(after),
            _ => None,
        }
    }

    /// Acks came: the page waiting for room, if one does.
    pub fn acked(&self) -> Option<u64> {
        match self.state {
            State::AwaitingAcks { after, .. } => Some(after),
            _ => None,
        }
    }

    /// The next page waits for acks; false if it already did (its timer runs on).
    pub fn await_acks(&mut self, after: u64, stall: u64) -> bool {
        if matches!(self.state, State::AwaitingAcks { .. }) {
            return false;
        }
        self.state = State::AwaitingAcks { after, stall };
        true
    }

    /// The ack timer of wait `stall` fired: true if that wait still goes on.
    pub fn stalled(&self, stall: u64) -> bool {
        matches!(self.state, State::AwaitingAcks { stall: s, .. } if s == stall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Instant;

    fn frame(len: usize, seq: u64) -> Outgoing {
        Outgoing::live(
            Bytes::from(vec![0; len]),
            crate::ids::Endpoint::default_of(7),
            seq,
            Instant::now(),
        )
    }

    #[test]
    fn pages_until_one_comes_back_empty_then_pushes_what_was_held() {
        let mut m = Mailbox::default();
        m.loading(None);
        assert_eq!(m.admit(10, 0, 100), Admit::Behind);
        m.hold(frame(10, 50));
        assert!(matches!(m.page(Some(3)), Page::Deliver { last: 3 }));
        assert_eq!(m.written(), Some(3));
        m.loading(Some(3));
        m.hold(frame(10, 51));
        let Page::CaughtUp(held) = m.page(None) else {
            panic!("caught up");
        };
        let seqs: Vec<_> = held
            .iter()
            .map(|i| match i.origin {
                crate::server::outbox::Origin::Data { seq, .. } => seq,
                _ => 0,
            })
            .collect();
        assert_eq!(seqs, [50, 51], "in order");
        assert_eq!(m.state(), State::Live);
        assert_eq!(
            m.admit(10, 95, 100),
            Admit::Cut,
            "held bytes no longer count"
        );
        assert_eq!(m.admit(10, 90, 100), Admit::Live);
        assert!(matches!(m.page(None), Page::Ignore), "not asked for");
    }

    #[test]
    fn frames_stored_during_a_read_make_it_read_again_and_a_live_one_reads_after_its_last_page() {
        let mut m = Mailbox::default();
        m.loading(None);
        assert_eq!(
            m.stored_elsewhere(),
            None,
            "the read in flight will be redone"
        );
        assert!(matches!(m.page(None), Page::ReadAgain { after: None }));
        m.loading(None);
        assert!(matches!(m.page(Some(9)), Page::Deliver { last: 9 }));
        assert_eq!(m.stored_elsewhere(), None, "writing: the pages go on");
        m.loading(Some(9));
        assert!(matches!(m.page(None), Page::CaughtUp(_)));
        assert_eq!(
            m.stored_elsewhere(),
            Some(9),
            "live: read after the last page"
        );
        let mut fresh = Mailbox::default();
        assert_eq!(fresh.stored_elsewhere(), Some(0));
    }

    #[test]
    fn a_waiting_connection_leaves_frames_in_the_store() {
        let mut m = Mailbox::default();
        m.wait();
        assert!(m.is_waiting());
        assert_eq!(m.admit(1 << 30, 0, 100), Admit::Stored);
        assert_eq!(m.stored_elsewhere(), None);
        assert!(matches!(m.page(Some(1)), Page::Ignore));
    }

    #[test]
    fn while_paging_the_outbox_and_what_is_held_count_against_the_limit() {
        let mut m = Mailbox::default();
        m.loading(None);
        assert_eq!(
            m.admit(1000, 0, 100),
            Admit::Behind,
            "nothing waits: any size"
        );
        m.hold(frame(60, 1));
        assert_eq!(m.admit(30, 10, 100), Admit::Behind);
        assert_eq!(m.admit(31, 10, 100), Admit::Cut);
    }

    #[test]
    fn an_ack_wait_is_told_from_a_later_one() {
        let mut m = Mailbox::default();
        m.loading(None);
        m.page(Some(4));
        assert!(m.await_acks(4, 1));
        assert!(
            !m.await_acks(4, 2),
            "already waiting: the first timer runs on"
        );
        assert_eq!(m.acked(), Some(4));
        assert!(m.stalled(1));
        assert!(!m.stalled(2));
        m.loading(Some(4));
        assert!(!m.stalled(1), "the wait is over");
        assert_eq!(m.acked(), None);
        assert_eq!(page_bytes(64 << 20), PAGE_BYTES);
        assert_eq!(page_bytes(1000), 500);
    }

    #[test]
    fn a_held_frame_found_ahead_in_the_store_leaves_the_backlog_with_those_before_it() {
        let mut m = Mailbox::default();
        m.loading(None);
        for seq in [1, 2, 3] {
            m.hold(frame(10, seq));
        }
        let seq_of = |item: &Outgoing| match item.origin {
            crate::server::outbox::Origin::Data { seq, .. } => seq,
            _ => 0,
        };
        let seqs = |items: Vec<Outgoing>| items.iter().map(seq_of).collect::<Vec<_>>();
        assert_eq!(
            seqs(m.take_held(2)),
            [1, 2],
            "with the frame held before it"
        );
        assert!(m.take_held(2).is_empty(), "once");
        assert!(m.take_held(9).is_empty(), "pushed already, or never held");
        assert_eq!(
            m.admit(30, 0, 40),
            Admit::Behind,
            "10 bytes held now, not 30"
        );
        assert_eq!(m.admit(31, 0, 40), Admit::Cut);
        let Page::CaughtUp(rest) = m.page(None) else {
            panic!("caught up");
        };
        assert_eq!(seqs(rest.into()), [3]);
    }
}
