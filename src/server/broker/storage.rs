//! The broker's side of the store: the command queue, how many bytes of frames the
//! store holds for the broker and has not yet answered for, and whether it is up.
//!
//! The store's queue is bounded in commands, but a command may carry a frame of up to
//! `--max-frame-bytes`: the broker also counts the bytes it has handed over, and past
//! [`STORE_BUDGET`] it takes no new frames until the store's answers make room.

use crate::cluster::msg::ToCluster;
use crate::server::backend::Backend;
use crate::store::{Command, Wake};

/// Bytes of frames the store may have queued before the broker waits for it.
pub(super) const STORE_BUDGET: usize = 8 * 1024 * 1024;

pub(super) struct Storage {
    commands: Backend,
    /// Bytes of appends sent and not yet answered.
    storing: usize,
    /// Why the store is down, while it is.
    down: Option<String>,
}

impl Storage {
    pub fn new(commands: Backend) -> Storage {
        Storage {
            commands,
            storing: 0,
            down: None,
        }
    }

    /// Sends a command for the store to take now; an append's bytes count until its
    /// answer ([`Storage::answered`]).
    pub async fn send(&mut self, command: Command) {
        self.send_waking(command, Wake::Now).await;
    }

    /// Sends the append of a frame pushed live whose echo does not wait for the store:
    /// one node's store takes it when it next wakes anyway ([`Wake::WhenDue`]).
    pub async fn send_unhurried(&mut self, append: Command) {
        self.send_waking(append, Wake::WhenDue).await;
    }

    async fn send_waking(&mut self, command: Command, wake: Wake) {
        if let Command::Append { wire, .. } = &command {
            self.storing += wire.len();
        }
        if self.commands.send(command, wake).await.is_err() {
            log::error!("store is gone; frame not stored");
        }
    }

    /// Sends what only a cluster needs (on one node, nothing).
    pub async fn send_cluster(&mut self, command: ToCluster) {
        if self.commands.send_cluster(command).await.is_err() {
            log::error!("the cluster's link is gone");
        }
    }

    /// The store answered for an append of `len` bytes.
    pub fn answered(&mut self, len: usize) {
        self.storing = self.storing.saturating_sub(len);
    }

    /// More than [`STORE_BUDGET`] waits for the store: take no new frames.
    pub fn is_behind(&self) -> bool {
        self.storing > STORE_BUDGET
    }

    /// Why the store is down, while it is.
    pub fn down(&self) -> Option<&str> {
        self.down.as_deref()
    }

    /// The store reported its health: `Some(why)` while down.
    pub fn set_down(&mut self, down: Option<String>) {
        self.down = down;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Ticket;
    use bytes::Bytes;
    use futures::StreamExt;
    use futures::channel::mpsc;

    fn append(len: usize) -> Command {
        Command::Append {
            ticket: Ticket::Conn(1),
            receiver: 2,
            seq: 1,
            wire: Bytes::from(vec![0; len]),
            live: false,
            time: 0,
            fanout: None,
        }
    }

    #[test]
    fn appends_count_until_answered_and_past_the_budget_the_broker_waits() {
        crate::rt::block_on(async {
            let (tx, mut rx) = mpsc::channel(16);
            let mut s = Storage::new(Backend::one(tx));
            s.send(append(STORE_BUDGET)).await;
            assert!(!s.is_behind(), "at the budget, not past it");
            s.send(append(1)).await;
            assert!(s.is_behind());
            s.send(Command::Delete {
                receiver: 2,
                device: 0,
                seqs: vec![1],
            })
            .await;
            s.answered(1);
            assert!(!s.is_behind());
            s.answered(usize::MAX);
            s.answered(1);
            assert!(!s.is_behind(), "answers never go below zero");
            assert_eq!(
                rx.next().await.map(|c| matches!(c, Command::Append { .. })),
                Some(true)
            );
        });
    }

    #[test]
    fn health_is_what_the_store_last_said() {
        let (tx, _rx) = mpsc::channel(1);
        let mut s = Storage::new(Backend::one(tx));
        assert_eq!(s.down(), None);
        s.set_down(Some("No space left on device".into()));
        assert_eq!(s.down(), Some("No space left on device"));
        s.set_down(None);
        assert_eq!(s.down(), None);
    }
}
