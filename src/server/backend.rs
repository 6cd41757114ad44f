//! The server's way into storage: one node's embedded store, or a cluster's actor.
//!
//! The broker and the writers send the store's commands without caring which is
//! behind; only the broker sends what a cluster needs besides ([`ToCluster`]), and on
//! one node that has nobody to go to. Replies come back in batches of the same two
//! kinds.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::{SinkExt, Stream};

use std::sync::Arc;

use crate::cluster::msg::{FromCluster, ToCluster};
use crate::store::{Command, Deliveries, Reply, Store, Wake};

/// Where commands go; cheap to clone (a channel sender).
#[derive(Clone, Debug)]
pub enum Backend {
    /// One node's store: its queue, and where writers leave what they delivered.
    One {
        commands: mpsc::Sender<Command>,
        deliveries: Arc<Deliveries>,
    },
    Cluster(mpsc::Sender<ToCluster>),
}

/// The backend is gone: the server is stopping.
#[derive(Debug)]
pub struct Gone;

impl Backend {
    /// One node's store, with `commands` its queue and deliveries left for nobody:
    /// for tests that read the queue themselves.
    pub fn one(commands: mpsc::Sender<Command>) -> Backend {
        Backend::One {
            commands,
            deliveries: Arc::default(),
        }
    }

    /// Sends a store command, waiting for room in the queue. One node's store looks
    /// at it at once, or with `Wake::WhenDue` when it next wakes anyway (see
    /// [`crate::store::Deliveries`]); a cluster's actor takes every command as it comes.
    pub async fn send(&mut self, command: Command, wake: Wake) -> Result<(), Gone> {
        match self {
            Backend::One {
                commands,
                deliveries,
            } => {
                commands.send(command).await.map_err(|_| Gone)?;
                deliveries.sent(wake);
                Ok(())
            }
            Backend::Cluster(tx) => tx.send(ToCluster::Store(command)).await.map_err(|_| Gone),
        }
    }

    /// Sends what only a cluster needs; one node has nobody to tell.
    pub async fn send_cluster(&mut self, command: ToCluster) -> Result<(), Gone> {
        match self {
            Backend::One { .. } => Ok(()),
            Backend::Cluster(tx) => tx.send(command).await.map_err(|_| Gone),
        }
    }

    /// Tells the store what a writer delivered (a [`Command::Delete`]). One node's
    /// store finds it when it next wakes, without being woken for it
    /// ([`crate::store::Deliveries`]); a cluster's actor gets it as a command, without
    /// waiting when there is room. Only a full queue makes a wait, boxed, which keeps
    /// the send future and its command out of every writer task.
    pub fn delivered(&self, delete: Command) -> Option<BoxFuture<'static, ()>> {
        match self {
            Backend::One { deliveries, .. } => {
                deliveries.leave(delete);
                None
            }
            Backend::Cluster(tx) => send_soon(tx, ToCluster::Store(delete)),
        }
    }
}

/// Sends on `channel` without waiting when there is room (or when its receiver is
/// gone: the server is stopping); a full channel hands back the wait, boxed. The
/// sender is cloned only here, when needed: each clone of a bounded sender is an
/// allocation, and an idle connection should hold none.
pub fn send_soon<T: Send + 'static>(
    channel: &mpsc::Sender<T>,
    item: T,
) -> Option<BoxFuture<'static, ()>> {
    let mut channel = channel.clone();
    match channel.try_send(item) {
        Err(full) if full.is_full() => {
            let item = full.into_inner();
            Some(Box::pin(async move {
                let _ = channel.send(item).await;
            }))
        }
        _ => None,
    }
}

/// A batch of replies, one per store transaction or cluster step.
#[derive(Debug)]
pub enum Batch {
    One(Vec<Reply>),
    Cluster(Vec<FromCluster>),
}

/// Where replies come from.
pub enum Replies {
    One(mpsc::UnboundedReceiver<Vec<Reply>>),
    Cluster(mpsc::UnboundedReceiver<Vec<FromCluster>>),
}

impl Stream for Replies {
    type Item = Batch;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        match self.get_mut() {
            Replies::One(rx) => Pin::new(rx).poll_next(cx).map(|b| b.map(Batch::One)),
            Replies::Cluster(rx) => Pin::new(rx).poll_next(cx).map(|b| b.map(Batch::Cluster)),
        }
    }
}

/// An opened store or a started cluster, as the server runs it.
pub struct Opened {
    pub backend: Backend,
    pub replies: Replies,
    /// The next unused sequence number: higher than any stored.
    pub next_seq: u64,
    /// The devices the store knows.
    pub devices: Vec<crate::store::KnownDevice>,
    /// Completes when the store has committed everything and exited.
    pub closed: futures::channel::oneshot::Receiver<()>,
}

impl From<Store> for Opened {
    fn from(s: Store) -> Opened {
        Opened {
            backend: Backend::One {
                commands: s.commands,
                deliveries: s.deliveries.unwrap_or_default(),
            },
            replies: Replies::One(s.replies),
            next_seq: s.next_seq,
            devices: s.devices,
            closed: s.closed,
        }
    }
}

impl From<Store<ToCluster, FromCluster>> for Opened {
    fn from(s: Store<ToCluster, FromCluster>) -> Opened {
        Opened {
            backend: Backend::Cluster(s.commands),
            replies: Replies::Cluster(s.replies),
            next_seq: s.next_seq,
            devices: s.devices,
            closed: s.closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn one_node_gets_store_commands_only_and_a_cluster_gets_both_in_order() {
        crate::rt::block_on(async {
            let (tx, mut rx) = mpsc::channel(4);
            let mut one = Backend::one(tx);
            let delete = || Command::Delete {
                receiver: 2,
                device: 0,
                seqs: vec![1],
            };
            assert!(one.send(delete(), Wake::Now).await.is_ok());
            let left = || ToCluster::Left { receiver: 2 };
            assert!(one.send_cluster(left()).await.is_ok());
            drop(one);
            let got: Vec<Command> = rx.by_ref().collect().await;
            assert!(
                matches!(got.as_slice(), [Command::Delete { .. }]),
                "{got:?}"
            );

            let (tx, mut rx) = mpsc::channel(4);
            let mut cluster = Backend::Cluster(tx);
            assert!(cluster.send(delete(), Wake::Now).await.is_ok());
            assert!(cluster.send_cluster(left()).await.is_ok());
            assert!(cluster.delivered(delete()).is_none(), "room: sent at once");
            drop(cluster);
            let got: Vec<ToCluster> = rx.by_ref().collect().await;
            assert!(matches!(
                got.as_slice(),
                [
                    ToCluster::Store(Command::Delete { .. }),
                    ToCluster::Left { receiver: 2 },
                    ToCluster::Store(Command::Delete { .. })
                ]
            ));
        });
    }
}
