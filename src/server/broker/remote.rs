//! Batches of frames that other nodes forwarded here for receivers bound on this node.
//!
//! Each frame of a batch is routed like a local one; the node that sent the batch
//! waits for one answer with every frame's outcome, in the batch's order, so its
//! senders' echoes mean the same as on one node. An answer goes once every outcome is
//! known.

use std::collections::HashMap;

use crate::store::Outcome;

#[derive(Debug, Default)]
pub(super) struct Remote {
    /// By the token the cluster link gave each batch: each frame's number and outcome.
    batches: HashMap<u64, Vec<(u64, Option<Outcome>)>>,
}

impl Remote {
    /// A batch starts; its frames follow with [`Remote::wait`].
    pub fn open(&mut self, token: u64) {
        self.batches.insert(token, Vec::new());
    }

    /// The frame numbered `seq` belongs to batch `token` and waits for its outcome.
    pub fn wait(&mut self, token: u64, seq: u64) {
        if let Some(batch) = self.batches.get_mut(&token) {
            batch.push((seq, None));
        }
    }

    /// The outcome of frame `seq` of batch `token`.
    pub fn settle(&mut self, token: u64, seq: u64, outcome: Outcome) {
        let slot = self
            .batches
            .get_mut(&token)
            .and_then(|b| b.iter_mut().find(|(s, _)| *s == seq));
        if let Some((_, slot)) = slot {
            *slot = Some(outcome);
        }
    }

    /// Every outcome of batch `token`, in order, once they are all known; the batch is
    /// then done.
    pub fn take_if_done(&mut self, token: u64) -> Option<Vec<Outcome>> {
        let done = self
            .batches
            .get(&token)
            .is_some_and(|b| b.iter().all(|(_, o)| o.is_some()));
        if !done {
            return None;
        }
        let batch = self.batches.remove(&token)?;
        Some(batch.into_iter().filter_map(|(_, o)| o).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_answered_once_every_frame_has_its_outcome_in_order() {
        let mut r = Remote::default();
        r.open(9);
        r.wait(9, 1);
        r.wait(9, 2);
        r.settle(9, 2, Outcome::Full("holds 3 frames".into()));
        assert!(r.take_if_done(9).is_none(), "frame 1 has no outcome yet");
        r.settle(9, 1, Outcome::Stored);
        let outcomes = r.take_if_done(9).expect("done");
        assert!(matches!(
            outcomes.as_slice(),
            [Outcome::Stored, Outcome::Full(_)]
        ));
        assert!(r.take_if_done(9).is_none(), "answered once");
    }

    #[test]
    fn an_empty_batch_is_done_at_once_and_unknown_tokens_are_ignored() {
        let mut r = Remote::default();
        r.open(1);
        assert_eq!(r.take_if_done(1).map(|o| o.len()), Some(0));
        r.wait(2, 1);
        r.settle(2, 1, Outcome::Stored);
        assert!(r.take_if_done(2).is_none());
    }
}
