//! What the broker and a cluster's actor say to each other.
//!
//! On one node the broker talks to the embedded store in [`Command`]s and
//! [`Reply`]s only. In a cluster the actor on the NATS link's thread is both the
//! store (the mailbox in JetStream) and the node's voice in the cluster (holding ids,
//! taking them over, forwarding frames to the node that holds their receiver), so its
//! queue carries the store's commands and the cluster's own, and its replies likewise.
//!
//! They share one queue, each way, because their order matters:
//! - a [`ToCluster::Left`] must reach the actor after the deletes the id's last writer
//!   sent before it: the node that takes the id over reads its mailbox next, and must
//!   not find what was delivered here;
//! - a [`FromCluster::Mail`] or [`FromCluster::Forwarded`] must reach the broker after
//!   the pages and outcomes the actor answered before it, so a connection reads, and
//!   takes forwarded frames, in the order the actor saw them.

use bytes::Bytes;

use crate::store::{Command, Outcome, Reply, Ticket};

/// The broker's queue to a cluster's actor.
#[derive(Debug)]
pub enum ToCluster {
    /// What any store is asked.
    Store(Command),
    /// This node no longer delivers to `receiver`: its last connection has finished
    /// writing, and no other connection for it is waiting here. This releases the id
    /// to whichever node binds it next.
    Left { receiver: u32 },
    /// The outcomes of frames another node forwarded here
    /// ([`FromCluster::Forwarded`]), in their order.
    Answer { token: u64, outcomes: Vec<Outcome> },
    /// `id` has sessions here now (`on`), or its last one closed: this node hears
    /// the notes that its log grew only while it has sessions of it (every note to
    /// every node was a message per node for each block stored). Sent before the
    /// first session's first read.
    Hear { id: u32, on: bool },
}

/// What a cluster's actor tells the broker.
#[derive(Debug)]
pub enum FromCluster {
    /// What any store answers.
    Store(Reply),
    /// Another node stored frames for `receiver`, which is bound here: read them.
    Mail { receiver: u32 },
    /// Another node bound `receiver`: close its connection here, then send `Left`.
    Takeover { receiver: u32 },
    /// Frames from another node for `receiver`, which is bound here: route them as if
    /// they came from a local sender, then `Answer` with their outcomes. `behind`: the
    /// mailbox holds earlier frames of theirs, to be read first.
    Forwarded {
        token: u64,
        receiver: u32,
        frames: Vec<Bytes>,
        behind: bool,
    },
    /// The frame the broker numbered `seq` is at `offset` in its author's log: the
    /// echo of a session's frame says so. Comes before the frame's `Appended`.
    Logged {
        ticket: Ticket,
        seq: u64,
        offset: u64,
    },
    /// History logs grew: the sessions here of the ids named read on.
    Grew(Grew),
    /// A read marker of `id` moved, on any node: its sessions here get the record.
    Read { id: u32, record: Bytes },
}

/// Whose logs grew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grew {
    Id(u32),
    /// Any id's: notes may have been lost (the link to NATS was down).
    All,
}

impl From<Reply> for FromCluster {
    fn from(reply: Reply) -> FromCluster {
        FromCluster::Store(reply)
    }
}
