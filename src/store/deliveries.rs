//! What the writers delivered, left for the store thread without waking it.
//!
//! A writer tells the store what each written batch delivered, so that the frames
//! leave their inboxes. At window 1 that is once per frame, just after the broker's
//! append of the same frame woke the store: woken twice per frame, the store thread
//! was a quarter of the server's time (`perf`, BENCHMARKS.md). So a writer leaves its
//! delete here and wakes the store only when the store waits with nothing due (or when
//! [`WAKE_AT`] deletes wait). A store with appends staged takes the deletes when it
//! wakes for its next command or when what is staged falls due (`STAGE_WAIT`): in time
//! for a delete to keep its frame's append off the disk, which is what staging is for.
//!
//! **Order.** A delete must come after its frame's append, or it removes nothing and
//! the frame stays in the inbox, to be delivered again; and before every command sent
//! after it (a mailbox load must not return what was delivered). The store takes the
//! deletes after it has drained its queue into a batch, so every command sent after a
//! delete it takes is in that batch or a later one, and [`place`] puts each delete
//! right after its frame's append in the batch, or first when the append was in an
//! earlier batch. A delete whose append the store has not received yet waits, with
//! the store, for a later batch: appends come in the order of their sequence numbers
//! (the broker numbers frames as it sends their appends). It does not wait here, where
//! it would wake the store again and again: some frames never have an append (copies
//! routed while the store was down), and their deletes wait for a newer append.
//!
//! **Appends that need no answer soon.** The same goes for the broker's append of a
//! frame it pushes live to its only device with history on: the frame's echo goes when
//! it is written, not when the store answers, and the append is staged for its delete
//! anyway. The broker sends it through the queue as usual ([`Wake::WhenDue`]), but the
//! store's waker (`wake_for_queue`) leaves a store that waits with something due
//! asleep, so at window 1 the store wakes once per `STAGE_WAIT` rather than once per
//! frame. Every other command wakes it at once ([`Wake::Now`]): the sender unparks it
//! itself after the send, since the queue's waker may already have been spent by an
//! append that woke nobody. Order is the queue's, as always; only when the store
//! looks changes. [`WAKE_AT`] such appends wake it too, so the queue never fills.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering, fence};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

use super::Command;

/// This many deletes waiting (or appends sent with [`Wake::WhenDue`]) wake the store
/// whatever it is doing, so that the queues stay small when a store with appends staged
/// does not wake for a while.
pub const WAKE_AT: usize = 1024;

/// When a command sent through the store's queue needs the store to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Now: someone waits for the answer, or order depends on it being seen.
    Now,
    /// When the store next wakes anyway (it is woken if it waits with nothing due):
    /// an append staged for its delete, whose echo does not wait for the store.
    WhenDue,
}

/// What the store thread is doing, as the writers see it.
const RUNNING: u8 = 0;
/// Waiting for a command or for staged appends to fall due: deletes wait too.
const WAITING_DUE: u8 = 1;
/// Waiting with nothing due: a delete wakes it.
const IDLE: u8 = 2;

/// The deletes left for the store, and how to wake it.
#[derive(Debug, Default)]
pub struct Deliveries {
    deletes: Mutex<Vec<Command>>,
    /// Commands sent with [`Wake::WhenDue`] since the store last took its queue.
    unhurried: AtomicUsize,
    state: AtomicU8,
    store: OnceLock<Thread>,
}

impl Deliveries {
    /// Leaves `delete` (a [`Command::Delete`]) for the store, waking it if it waits
    /// with nothing due.
    pub fn leave(&self, delete: Command) {
        let waiting = {
            let mut deletes = self.lock();
            deletes.push(delete);
            deletes.len()
        };
        // SeqCst, paired with the store's in `wait`: either it sees this delete before
        // it parks, or this sees it idle and wakes it.
        let wake = self.state.load(Ordering::SeqCst) == IDLE || waiting >= WAKE_AT;
        if let Some(store) = self.store.get().filter(|_| wake) {
            store.unpark();
        }
    }

    /// A command was just sent through the store's queue: wakes the store if it must
    /// look now. The queue's own waker (`wake_for_queue`) wakes a store
    /// that waits with nothing due; this wakes one that waits with something due, for
    /// [`Wake::Now`], or once `WAKE_AT` commands wait unseen.
    pub fn sent(&self, wake: Wake) {
        // Paired with the fence in `wait`: either the store's poll of the queue (after
        // its state) sees this command, or this sees the state it waits in.
        fence(Ordering::SeqCst);
        if let Some(store) = self.store.get().filter(|_| self.must_look(wake)) {
            store.unpark();
        }
    }

    /// Whether a command just sent with `wake` must wake the store.
    fn must_look(&self, wake: Wake) -> bool {
        match wake {
            Wake::Now => self.state.load(Ordering::SeqCst) != RUNNING,
            Wake::WhenDue => self.unhurried.fetch_add(1, Ordering::Relaxed) + 1 >= WAKE_AT,
        }
    }

    /// The store's queue has something new (its waker): wakes the store unless it
    /// waits with something due, which it will see then ([`Wake::WhenDue`]; a command
    /// sent with [`Wake::Now`] wakes it through [`Deliveries::sent`]).
    pub(super) fn wake_for_queue(&self) {
        if let Some(store) = self.store.get().filter(|_| self.queue_wakes()) {
            store.unpark();
        }
    }

    /// Whether the queue's waker wakes the store: unless it waits with something due.
    fn queue_wakes(&self) -> bool {
        self.state.load(Ordering::SeqCst) != WAITING_DUE
    }

    /// The store is about to take what waits in its queue.
    pub(super) fn taking_queue(&self) {
        self.unhurried.store(0, Ordering::Relaxed);
    }

    /// The store thread calls this once, before it first waits.
    pub(super) fn attach(&self, store: Thread) {
        let _ = self.store.set(store);
    }

    /// The store is about to look at its queue and then park, with something due
    /// (`due`) or not. True when it should not park: deletes wait that must be taken
    /// now. Called before the store polls its queue, so that a send after that poll
    /// finds the state it parks in.
    pub(super) fn wait(&self, due: bool) -> bool {
        let state = if due { WAITING_DUE } else { IDLE };
        self.state.store(state, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let waiting = self.lock().len();
        waiting >= WAKE_AT || (!due && waiting > 0)
    }

    /// The store has woken.
    pub(super) fn woken(&self) {
        self.state.store(RUNNING, Ordering::SeqCst);
    }

    /// Every delete left so far.
    pub(super) fn take(&self) -> Vec<Command> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Command>> {
        // Each critical section is a push or a swap: a poisoned lock is consistent.
        self.deletes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The store's queue's waker is the doorbell itself.
impl futures::task::ArcWake for Deliveries {
    fn wake_by_ref(this: &std::sync::Arc<Self>) {
        this.wake_for_queue();
    }
}

/// Puts each of `deletes` into `batch`: right after the append of its newest frame
/// when that is in the batch, first when that append came in an earlier batch (its
/// sequence number is at most `appended_through`). Returns the deletes whose appends
/// have not come yet.
pub(super) fn place(
    batch: &mut Vec<Command>,
    deletes: Vec<Command>,
    appended_through: u64,
) -> Vec<Command> {
    // The appends in the batch, in order: their sequence numbers grow.
    let appends: Vec<(u64, usize)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            Command::Append { seq, .. } => Some((*seq, i)),
            _ => None,
        })
        .collect();
    let newest_in_batch = appends.last().map_or(0, |&(seq, _)| seq);
    let mut first = Vec::new();
    // (index of the append it follows, delete), in the order they were left.
    let mut after: Vec<(usize, Command)> = Vec::new();
    let mut early = Vec::new();
    for delete in deletes {
        let newest = match &delete {
            Command::Delete { seqs, .. } => seqs.iter().copied().max().unwrap_or(0),
            _ => 0,
        };
        if newest <= appended_through {
            first.push(delete);
        } else if newest <= newest_in_batch {
            // After the last append at or below its newest frame: that frame's own
            // append, since every frame has one.
            let k = appends.partition_point(|&(seq, _)| seq <= newest);
            match k.checked_sub(1).map(|k| appends[k].1) {
                Some(i) => after.push((i, delete)),
                None => first.push(delete),
            }
        } else {
            early.push(delete);
        }
    }
    if first.is_empty() && after.is_empty() {
        return early;
    }
    after.sort_by_key(|&(i, _)| i);
    let mut placed = Vec::with_capacity(batch.len() + first.len() + after.len());
    placed.extend(first);
    let mut after = after.into_iter().peekable();
    for (i, cmd) in batch.drain(..).enumerate() {
        placed.push(cmd);
        while let Some((_, delete)) = after.next_if(|&(j, _)| j == i) {
            placed.push(delete);
        }
    }
    *batch = placed;
    early
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Ticket;
    use bytes::Bytes;

    fn append(seq: u64) -> Command {
        Command::Append {
            ticket: Ticket::Conn(1),
            receiver: 2,
            seq,
            wire: Bytes::from_static(b"x"),
            live: true,
            time: 0,
            fanout: None,
        }
    }

    fn delete(seqs: &[u64]) -> Command {
        Command::Delete {
            receiver: 2,
            device: 0,
            seqs: seqs.to_vec(),
        }
    }

    fn load() -> Command {
        Command::Load {
            ticket: Ticket::Conn(3),
            receiver: 2,
            device: 0,
            after: None,
            max_bytes: 1,
            reading: crate::store::Reading::Plain,
        }
    }

    /// The batch as letters: A<seq>, D<newest seq>, L.
    fn shape(batch: &[Command]) -> Vec<String> {
        batch
            .iter()
            .map(|c| match c {
                Command::Append { seq, .. } => format!("A{seq}"),
                Command::Delete { seqs, .. } => format!("D{}", seqs.iter().max().unwrap_or(&0)),
                Command::Load { .. } => "L".to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_delete_goes_after_its_append_or_first_and_waits_for_an_append_not_yet_come() {
        // Frame 5 was appended in an earlier batch; 7 and 8 are in this one, with a
        // load between them; 9 has not come yet.
        let mut batch = vec![append(7), load(), append(8)];
        let deletes = vec![delete(&[8]), delete(&[9]), delete(&[4, 5]), delete(&[7])];
        let early = place(&mut batch, deletes, 6);
        assert_eq!(shape(&batch), ["D5", "A7", "D7", "L", "A8", "D8"]);
        assert_eq!(shape(&early), ["D9"]);
        // Nothing to place: the batch is left alone.
        let mut batch = vec![append(10)];
        let early = place(&mut batch, vec![delete(&[11])], 9);
        assert_eq!(shape(&batch), ["A10"]);
        assert_eq!(shape(&early), ["D11"]);
    }

    #[test]
    fn an_idle_store_is_told_to_take_deletes_and_a_store_with_something_due_is_not() {
        let d = Deliveries::default();
        assert!(!d.wait(false), "nothing waits");
        d.leave(delete(&[1]));
        assert!(d.wait(false), "idle, with a delete waiting");
        assert!(!d.wait(true), "something due: the delete waits for it");
        for seq in 2..=WAKE_AT as u64 {
            d.leave(delete(&[seq]));
        }
        assert!(d.wait(true), "{WAKE_AT} deletes wait: take them now");
    }

    #[test]
    fn an_unhurried_append_leaves_a_store_with_something_due_asleep_and_others_wake_it() {
        let d = Deliveries::default();
        d.woken();
        assert!(d.queue_wakes(), "running: a wake costs nothing");
        assert!(
            !d.must_look(Wake::Now),
            "running: it polls its queue before parking"
        );
        assert!(!d.wait(false));
        assert!(d.queue_wakes(), "idle: the queue's waker wakes it");
        assert!(d.must_look(Wake::Now));
        assert!(!d.wait(true));
        assert!(
            !d.queue_wakes(),
            "something due: the queue's waker leaves it"
        );
        assert!(
            d.must_look(Wake::Now),
            "a command sent now wakes it all the same"
        );
        d.taking_queue();
        for n in 1..WAKE_AT {
            assert!(!d.must_look(Wake::WhenDue), "unhurried append {n}");
        }
        assert!(
            d.must_look(Wake::WhenDue),
            "{WAKE_AT} unhurried appends wake it"
        );
    }
}
