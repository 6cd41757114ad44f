//! Echoes that wait on the history log as well as on the mailbox (sessions in a
//! cluster).
//!
//! A frame's `Appended` reply is its echo's outcome. In a cluster with history, two
//! kinds of frame need the log ([`super::log`]) too:
//! - a frame a session sent: its echo carries the frame's offset in its author's log,
//!   known once that block is stored;
//! - a frame for an id used only from sessions: it goes to no mailbox, so its outcome
//!   is that of its receiver's log.
//!
//! Such a frame's reply is held here until both are known; then the offset goes to the
//! broker first ([`FromCluster::Logged`]), its `Appended` right after.

use std::collections::{HashMap, HashSet};

use crate::cluster::log::Wait;
use crate::cluster::msg::FromCluster;
use crate::cluster::wire;
use crate::ids::Ticket;
use crate::store::{Failure, Outcome, Reply};

#[derive(Default)]
pub(crate) struct Echoes {
    waiting: HashMap<u64, Waiting>,
    /// Frames for ids used only from sessions still on the mailbox's path (on their way
    /// to a node that may hold the receiver), whether or not their echo went: none is
    /// stored in the mailbox, and a second outcome for one is dropped.
    mailbox_free: HashSet<u64>,
}

struct Waiting {
    ticket: Ticket,
    len: usize,
    /// `None` while the echo waits for its offset; 0 when it needs none (or the block
    /// was not stored: the echo says the frame is not kept).
    offset: Option<u64>,
    outcome: Option<Outcome>,
}

impl Echoes {
    /// Frame `seq` of `ticket` waits for its offset (`offset`), and for its outcome
    /// from the log rather than from a mailbox (`from_log`).
    pub fn expect(&mut self, seq: u64, ticket: Ticket, len: usize, offset: bool, from_log: bool) {
        if !offset && !from_log {
            return;
        }
        self.waiting.insert(
            seq,
            Waiting {
                ticket,
                len,
                offset: (!offset).then_some(0),
                outcome: None,
            },
        );
        if from_log {
            self.mailbox_free.insert(seq);
        }
    }

    /// Whether frame `seq` stays out of the mailbox (its outcome is its log's); it
    /// leaves the mailbox's path here.
    pub fn take_mailbox_free(&mut self, seq: u64) -> bool {
        self.mailbox_free.remove(&seq)
    }

    /// A reply about to go to the broker: held if its frame waits here, else handed
    /// back.
    pub fn reply(&mut self, reply: FromCluster) -> Option<FromCluster> {
        let FromCluster::Store(Reply::Appended { seq, outcome, .. }) = &reply else {
            return Some(reply);
        };
        let mailbox_free = self.mailbox_free.remove(seq);
        match self.waiting.get_mut(seq) {
            Some(w) if w.outcome.is_none() => {
                w.outcome = Some(outcome.clone());
                None
            }
            // Answered by its log already (or taken by a holder and answered twice).
            _ if mailbox_free => None,
            Some(_) => None,
            None => Some(reply),
        }
    }

    /// The block holding the entry `wait` names was stored at stream sequence
    /// `stored` (or not: why), as entry `index`.
    pub fn logged(&mut self, wait: Wait, index: usize, stored: &Result<u64, String>) {
        match wait {
            Wait::Offset { seq } => {
                if let Some(w) = self.waiting.get_mut(&seq) {
                    w.offset = Some(match stored {
                        Ok(at) => wire::offset(*at, index),
                        Err(why) => {
                            log::warn!("a frame's copy in its author's history failed: {why}");
                            0
                        }
                    });
                }
            }
            Wait::Outcome { seq } => {
                if let Some(w) = self.waiting.get_mut(&seq) {
                    w.outcome = Some(match stored {
                        Ok(_) => Outcome::Stored,
                        Err(why) => Outcome::Failed(Failure::Store(format!("history: {why}"))),
                    });
                }
            }
        }
    }

    /// The replies of frames no longer waiting: each offset, then its `Appended`.
    pub fn ready(&mut self) -> Vec<FromCluster> {
        let done: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.offset.is_some() && w.outcome.is_some())
            .map(|(seq, _)| *seq)
            .collect();
        let mut out = Vec::new();
        for seq in done {
            let Some(w) = self.waiting.remove(&seq) else {
                continue;
            };
            let (Some(offset), Some(outcome)) = (w.offset, w.outcome) else {
                continue;
            };
            if offset > 0 {
                out.push(FromCluster::Logged {
                    ticket: w.ticket,
                    seq,
                    offset,
                });
            }
            out.push(FromCluster::Store(Reply::Appended {
                ticket: w.ticket,
                seq,
                outcome,
                len: w.len,
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appended(seq: u64, outcome: Outcome) -> FromCluster {
        FromCluster::Store(Reply::Appended {
            ticket: Ticket::Conn(1),
            seq,
            outcome,
            len: 10,
        })
    }

    #[test]
    fn an_echo_goes_once_it_has_its_outcome_and_its_offset_offset_first() {
        let mut e = Echoes::default();
        e.expect(5, Ticket::Conn(1), 10, true, false);
        assert!(
            e.reply(appended(6, Outcome::Stored)).is_some(),
            "not waited for"
        );
        assert!(e.reply(appended(5, Outcome::Stored)).is_none(), "held");
        assert!(e.ready().is_empty(), "no offset yet");
        e.logged(Wait::Offset { seq: 5 }, 2, &Ok(100));
        let out = e.ready();
        assert!(
            matches!(
                out.as_slice(),
                [
                    FromCluster::Logged { seq: 5, offset, .. },
                    FromCluster::Store(Reply::Appended { seq: 5, outcome: Outcome::Stored, .. })
                ] if *offset == wire::offset(100, 2)
            ),
            "{out:?}"
        );
        assert!(e.ready().is_empty());
    }

    #[test]
    fn a_frame_for_sessions_only_takes_its_outcome_from_the_log() {
        let mut e = Echoes::default();
        e.expect(7, Ticket::Conn(1), 10, false, true);
        e.logged(Wait::Outcome { seq: 7 }, 0, &Err("timed out".into()));
        let out = e.ready();
        assert!(
            matches!(
                out.as_slice(),
                [FromCluster::Store(Reply::Appended {
                    outcome: Outcome::Failed(_),
                    ..
                })]
            ),
            "no offset to give, and the failure: {out:?}"
        );
        e.expect(8, Ticket::Conn(1), 10, false, false);
        assert!(
            e.reply(appended(8, Outcome::Stored)).is_some(),
            "waits for nothing"
        );
    }

    #[test]
    fn a_frame_kept_out_of_the_mailbox_is_answered_once_and_stays_out_until_it_leaves() {
        let mut e = Echoes::default();
        e.expect(3, Ticket::Conn(1), 10, false, true);
        e.logged(Wait::Outcome { seq: 3 }, 0, &Ok(40));
        assert_eq!(e.ready().len(), 1, "answered by its log");
        // Still on its way to a holder: it stays out of the mailbox, once.
        assert!(e.take_mailbox_free(3));
        assert!(!e.take_mailbox_free(3));
        // A holder that took it answers too: dropped, the broker had its answer.
        e.expect(4, Ticket::Conn(1), 10, false, true);
        e.logged(Wait::Outcome { seq: 4 }, 0, &Ok(41));
        e.ready();
        assert!(e.reply(appended(4, Outcome::Stored)).is_none());
        assert!(!e.take_mailbox_free(4), "it left the path with that answer");
    }

    #[test]
    fn an_echo_whose_copy_failed_says_the_frame_is_not_kept() {
        let mut e = Echoes::default();
        e.expect(9, Ticket::Conn(1), 10, true, false);
        e.reply(appended(9, Outcome::Stored));
        e.logged(Wait::Offset { seq: 9 }, 0, &Err("no".into()));
        let out = e.ready();
        assert!(
            matches!(
                out.as_slice(),
                [FromCluster::Store(Reply::Appended {
                    outcome: Outcome::Stored,
                    ..
                })]
            ),
            "{out:?}"
        );
    }
}
