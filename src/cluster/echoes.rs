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

use std::collections::HashMap;

use crate::cluster::log::Wait;
use crate::cluster::msg::FromCluster;
use crate::cluster::wire;
use crate::ids::Ticket;
use crate::store::{Failure, Outcome, Reply};

#[derive(Default)]
pub(crate) struct Echoes {
    waiting: HashMap<u64, Waiting>,
}

struct Waiting {
    ticket: Ticket,
    len: usize,
    /// `None` while the echo waits for its offset; 0 when it needs none (or the block
    /// was not stored: the echo says the frame is not kept).
    offset: Option<u64>,
    outcome: Option<Outcome>,
    /// Its receiver keeps no mailbox: a node that holds the receiver may still take
    /// it, but nobody stores it in the mailbox.
    from_log: bool,
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
                from_log,
            },
        );
    }

    /// Whether frame `seq` stays out of the mailbox (its outcome is its log's).
    pub fn mailbox_free(&self, seq: u64) -> bool {
        self.waiting.get(&seq).is_some_and(|w| w.from_log)
    }

    /// A reply about to go to the broker: held if its frame waits here, else handed
    /// back.
    pub fn reply(&mut self, reply: FromCluster) -> Option<FromCluster> {
        let FromCluster::Store(Reply::Appended { seq, outcome, .. }) = &reply else {
            return Some(reply);
        };
        match self.waiting.get_mut(seq) {
            Some(w) if w.outcome.is_none() => {
                w.outcome = Some(outcome.clone());
                None
            }
            _ => Some(reply),
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
