//! The directory of open connections, for operators (`GET /v1/connections` on the
//! admin listener): who is connected, from where, over what, since when, and how much
//! waits for them.
//!
//! It sits beside the data path, not on it: the listener adds a connection when it
//! starts and removes it when it ends (through [`Listed`], a drop guard), the broker
//! notes the id a connection binds, and the admin listener reads it. None of them waits
//! on another through it; the lock is taken on connect, bind and close, never per frame.
//! A `BTreeMap` keeps connections in the order they were accepted, so a listing pages
//! by connection number. It holds each connection's outbox, which carries the
//! connection's [`Card`]: what an operator is shown, kept where the connection's other
//! shared state is (see [`crate::server::card`] for what that saves).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::ids::ConnId;
use crate::server::card::{Arrival, Card, Transport};
use crate::server::outbox::Outbox;

/// A connection as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub conn: ConnId,
    pub id: Option<u32>,
    pub device: Option<String>,
    pub transport: Transport,
    pub client: SocketAddr,
    pub since: SystemTime,
    /// Bytes queued for it and not yet written.
    pub queued_bytes: usize,
    /// Bytes written to it and not yet acknowledged (acks on), or 0.
    pub unacked_bytes: usize,
}

/// Every open connection, by number: its outbox, which carries its [`Card`].
#[derive(Debug, Default)]
pub struct Directory {
    conns: Mutex<BTreeMap<ConnId, Arc<Outbox>>>,
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ConnId, Arc<Outbox>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists `conn`, whose outbox carries its card, until the returned guard drops.
    pub fn add(self: &Arc<Directory>, conn: ConnId, outbox: Arc<Outbox>) -> Listed {
        self.lock().insert(conn, outbox);
        Listed {
            directory: self.clone(),
            conn,
        }
    }

    /// Lists a new connection, with the outbox its writer will read: what a transport
    /// hands to the listener's `connection`. Boxed, so that the tasks
    /// that pass it along carry a pointer, not its bytes, for the connection's life.
    pub fn register(self: &Arc<Directory>, arrival: Arrival) -> Box<Registered> {
        let outbox = Arc::new(Outbox::new(Card::arriving(&arrival)));
        let listed = self.add(arrival.conn, outbox.clone());
        Box::new(Registered {
            conn: arrival.conn,
            outbox,
            _listed: listed,
        })
    }

    /// `conn` is bound to `id` (as the named `device`, for a session).
    pub fn bound(&self, conn: ConnId, id: u32, device: Option<&str>) {
        if let Some(outbox) = self.lock().get(&conn) {
            outbox.card().bind(id, device);
        }
    }

    /// Up to `limit` connections numbered above `after`, in order, and whether more
    /// follow.
    pub fn page(&self, after: ConnId, limit: usize) -> (Vec<ConnInfo>, bool) {
        let conns = self.lock();
        let mut range = conns.range(after.saturating_add(1)..);
        let page = range
            .by_ref()
            .take(limit)
            .map(|(&conn, outbox)| {
                let card = outbox.card();
                let binding = card.binding();
                let queued = outbox.queued_bytes();
                ConnInfo {
                    conn,
                    id: binding.as_ref().map(|b| b.id),
                    device: binding.and_then(|b| b.device).map(String::from),
                    transport: card.transport,
                    client: card.client,
                    since: card.since,
                    queued_bytes: queued,
                    unacked_bytes: outbox.pending_bytes().saturating_sub(queued),
                }
            })
            .collect();
        (page, range.next().is_some())
    }

    /// The connections bound to `id`.
    pub fn of(&self, id: u32) -> Vec<ConnId> {
        self.lock()
            .iter()
            .filter(|(_, outbox)| outbox.card().id() == Some(id))
            .map(|(&conn, _)| conn)
            .collect()
    }

    /// Whether `conn` is open.
    pub fn has(&self, conn: ConnId) -> bool {
        self.lock().contains_key(&conn)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection listed in the [`Directory`], with its outbox; it leaves the directory
/// when this drops.
#[derive(Debug)]
pub struct Registered {
    pub conn: ConnId,
    pub outbox: Arc<Outbox>,
    _listed: Listed,
}

/// A connection's place in the [`Directory`], removed when dropped.
#[derive(Debug)]
pub struct Listed {
    directory: Arc<Directory>,
    conn: ConnId,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.directory.lock().remove(&self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_in_order_notes_bindings_and_forgets_closed_connections() {
        let d = Arc::new(Directory::default());
        let addr: SocketAddr = "192.0.2.1:5000".parse().expect("addr");
        let listed: Vec<_> = (1..=5)
            .map(|conn| {
                let arrival = Arrival {
                    conn,
                    client: addr,
                    transport: Transport::Tcp,
                };
                d.add(conn, Arc::new(Outbox::new(Card::arriving(&arrival))))
            })
            .collect();
        d.bound(2, 42, None);
        d.bound(4, 42, Some("phone"));
        let (first, more) = d.page(0, 3);
        assert_eq!(first.iter().map(|c| c.conn).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(more);
        assert_eq!(first[1].id, Some(42));
        assert_eq!(
            (first[0].client, first[0].transport),
            (addr, Transport::Tcp)
        );
        let (rest, more) = d.page(3, 3);
        assert_eq!(rest.iter().map(|c| c.conn).collect::<Vec<_>>(), [4, 5]);
        assert!(!more);
        assert_eq!(rest[0].device.as_deref(), Some("phone"));
        assert_eq!(d.of(42), [2, 4]);
        drop(listed);
        assert!(d.is_empty(), "a closed connection leaves the directory");
    }
}
