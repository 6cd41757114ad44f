//! Live appends held back briefly, shared by both stores.
//!
//! A frame pushed to an online receiver is appended too (its echo means "stored or
//! delivered"), but its append waits up to [`STAGE_WAIT`]: if its delivery (the
//! writer's delete) comes first, neither the append nor the delete reaches the disk
//! or the stream. Receivers that keep up therefore cost the storage almost nothing.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Command;

/// How long a live frame's append may wait for its delivery before it is written.
pub(crate) const STAGE_WAIT: Duration = Duration::from_millis(5);

/// The held appends, in the order of their sequence numbers (the broker numbers
/// frames in the order it appends them).
#[derive(Debug, Default)]
pub(crate) struct Stage {
    queue: VecDeque<Staged>,
}

/// A held append; `append` is taken once it is delivered or written.
#[derive(Debug)]
struct Staged {
    at: Instant,
    seq: u64,
    receiver: u32,
    append: Option<Command>,
}

impl Stage {
    /// Holds the live append `cmd` of frame `seq` for `receiver`.
    pub fn hold(&mut self, seq: u64, receiver: u32, cmd: Command) {
        self.queue.push_back(Staged {
            at: Instant::now(),
            seq,
            receiver,
            append: Some(cmd),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// How long until the oldest held append is due; `None` when nothing is held.
    pub fn next_due(&self) -> Option<Duration> {
        self.queue
            .front()
            .map(|s| STAGE_WAIT.saturating_sub(s.at.elapsed()))
    }

    /// The append of frame `seq` if it is still held: its delivery came first, so it
    /// need not be written.
    pub fn take(&mut self, seq: u64) -> Option<Command> {
        let i = self.queue.binary_search_by_key(&seq, |s| s.seq).ok()?;
        self.queue[i].append.take()
    }

    /// The appends that are due, oldest first: all of them with `all`, else those
    /// held for [`STAGE_WAIT`] (and none behind one that is not yet due, so order
    /// holds).
    pub fn due(&mut self, all: bool) -> Vec<Command> {
        let mut due = Vec::new();
        while let Some(front) = self.queue.front() {
            if front.append.is_some() && !all && front.at.elapsed() < STAGE_WAIT {
                break;
            }
            if let Some(cmd) = self.queue.pop_front().and_then(|s| s.append) {
                due.push(cmd);
            }
        }
        due
    }

    /// Every held append for `receiver` (or for every receiver), in order, due or
    /// not: what must be written before something that follows it.
    pub fn take_for(&mut self, receiver: Option<u32>) -> Vec<Command> {
        let mut taken = Vec::new();
        for s in self.queue.iter_mut() {
            if receiver.is_none_or(|r| r == s.receiver)
                && let Some(cmd) = s.append.take()
            {
                taken.push(cmd);
            }
        }
        while self.queue.front().is_some_and(|s| s.append.is_none()) {
            self.queue.pop_front();
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Ticket;

    fn append(seq: u64, receiver: u32) -> Command {
        Command::Append {
            ticket: Ticket::Conn(1),
            receiver,
            seq,
            wire: bytes::Bytes::new(),
            live: true,
            time: 0,
            fanout: None,
        }
    }

    fn seqs(cmds: &[Command]) -> Vec<u64> {
        cmds.iter()
            .map(|c| match c {
                Command::Append { seq, .. } => *seq,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn a_delivery_that_comes_first_takes_the_append_out() {
        let mut s = Stage::default();
        s.hold(1, 7, append(1, 7));
        s.hold(2, 7, append(2, 7));
        assert!(s.take(1).is_some());
        assert!(s.take(1).is_none(), "taken once");
        assert!(s.take(9).is_none());
        assert_eq!(seqs(&s.due(true)), [2]);
        assert!(s.is_empty());
    }

    #[test]
    fn an_append_is_due_after_its_wait_and_holds_back_those_behind_it() {
        let mut s = Stage::default();
        assert_eq!(s.next_due(), None);
        let long_ago = Instant::now() - STAGE_WAIT;
        s.queue.push_back(Staged {
            at: long_ago,
            seq: 1,
            receiver: 7,
            append: Some(append(1, 7)),
        });
        // Held far into the future: not due, and nothing behind it is either.
        s.queue.push_back(Staged {
            at: Instant::now() + Duration::from_secs(3600),
            seq: 2,
            receiver: 7,
            append: Some(append(2, 7)),
        });
        s.hold(3, 7, append(3, 7));
        assert_eq!(s.next_due(), Some(Duration::ZERO));
        assert_eq!(seqs(&s.due(false)), [1]);
        assert!(s.next_due().is_some_and(|d| d == STAGE_WAIT));
        assert!(s.due(false).is_empty());
        assert_eq!(seqs(&s.due(true)), [2, 3]);
    }

    #[test]
    fn one_receiver_s_appends_go_in_order_and_leave_the_others() {
        let mut s = Stage::default();
        s.hold(1, 7, append(1, 7));
        s.hold(2, 8, append(2, 8));
        s.hold(3, 7, append(3, 7));
        assert_eq!(seqs(&s.take_for(Some(7))), [1, 3]);
        assert_eq!(seqs(&s.take_for(None)), [2]);
        assert!(s.is_empty());
    }
}
